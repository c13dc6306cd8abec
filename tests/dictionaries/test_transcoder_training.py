"""The transcoder training recipe (backend.dictionaries.transcoder_training) on synthetic data — a random ReLU "MLP" plus
a linear part — each result checked against an independent computation (numpy least squares, the training class's own
forward pass, a hand-written JumpReLU)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from backend.dictionaries import transcoder_training as tt

pytestmark = pytest.mark.usefixtures("one_thread")


def synthetic(n: int = 6000, d: int = 48, hidden: int = 192, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g) * 2 + 0.5
    w1 = torch.randn(d, hidden, generator=g) / d**0.5
    w2 = torch.randn(hidden, d, generator=g) / hidden**0.5
    lin = torch.randn(d, d, generator=g) / d**0.5
    y = torch.relu(x @ w1 - 1.0) @ w2 + 0.3 * x @ lin + 3.0
    return x, y


def test_linear_baseline_equals_numpy_lstsq():
    x, y = synthetic()
    fit = tt.fit_linear((x, y), ridge=0.0)
    a = np.concatenate([x.double().numpy(), np.ones((x.shape[0], 1))], 1)
    coef, *_ = np.linalg.lstsq(a, y.double().numpy(), rcond=None)
    assert np.allclose(fit.W.T.numpy(), coef[:-1], atol=2e-4)
    assert np.allclose(fit.b.numpy(), coef[-1], atol=2e-4)
    # the train FVE from sufficient statistics equals the FVE of its predictions
    assert fit.train_fve == pytest.approx(tt.explained_variance(fit.predict, (x, y)), abs=1e-5)


def test_streamed_statistics_equal_in_memory():
    x, y = synthetic()
    chunks = [(x[i : i + 777], y[i : i + 777]) for i in range(0, x.shape[0], 777)]
    a, b = tt.data_statistics((x, y)), tt.data_statistics(chunks)
    assert torch.allclose(a.W, b.W, atol=1e-5) and torch.allclose(a.b, b.b, atol=1e-5)
    assert a.scale_x == pytest.approx(b.scale_x) and a.scale_y == pytest.approx(b.scale_y)
    assert a.scale_x == pytest.approx(float(x.pow(2).mean().sqrt()), rel=1e-6)


@pytest.mark.parametrize("skip", [True, False])
def test_inference_conversion_equals_training_computation(skip):
    """The converted JumpReLU transcoder on raw x equals the training SAE's own computation in normalised units
    with the same threshold, rescaled: sy·(f·W_dec/n + b_dec + (x/sx)·W_skipᵀ), f = h'·[h' > θ], h' = h·n."""
    x, y = synthetic()
    stats = tt.data_statistics((x, y))
    cfg = tt.BatchTopKTranscoderTrainingSAEConfig(d_in=48, d_sae=96, d_out=48, k=8.0, skip=skip, decoder_init_norm=None)
    sae = tt.BatchTopKTranscoderTrainingSAE(cfg)
    tt.init_from_data(sae, x, y, stats, stats.scale_x, stats.scale_y)
    with torch.no_grad():  # make the decoder norms non-trivial, as after Adam
        sae.W_dec.mul_(torch.rand(96, 1) + 0.5)
    theta = 0.3
    tc = tt.to_inference(sae, stats.scale_x, stats.scale_y, threshold=theta)
    with torch.no_grad():
        xs = x[:500] / stats.scale_x
        n = sae.W_dec.norm(dim=1)
        h = (xs @ sae.W_enc + sae.b_enc) * n
        f = h.relu() * (h > theta)
        want = stats.scale_y * (f @ (sae.W_dec / n[:, None]) + sae.b_dec + (xs @ sae.W_skip.T if skip else 0))
        got = tc(x[:500])
        assert torch.allclose(got, want, atol=1e-4 * float(want.abs().max()))
        assert torch.allclose(tc.encode(x[:500]), stats.scale_y * f, atol=1e-4)
    assert torch.allclose(tc.W_dec.norm(dim=1), torch.ones(96), atol=1e-5)  # unit decoder rows
    assert type(tc).__name__ == ("JumpReLUSkipTranscoder" if skip else "JumpReLUTranscoder")


def test_batchtopk_training_output_equals_inference_at_batch_cutoff():
    """On one batch, BatchTopK keeps the top k·B pre-activations: the converted JumpReLU transcoder with its
    threshold just under that batch's smallest kept value gives the training class' own output (its
    training_forward_pass on cat([x, y]), skip and decoder-norm rescaling included), times the y scale."""
    from sae_lens.saes.sae import TrainStepInput

    x, y = synthetic()
    stats = tt.data_statistics((x, y))
    cfg = tt.BatchTopKTranscoderTrainingSAEConfig(d_in=48, d_sae=96, d_out=48, k=8.0, skip=True, decoder_init_norm=None)
    sae = tt.BatchTopKTranscoderTrainingSAE(cfg)
    tt.init_from_data(sae, x, y, stats, stats.scale_x, stats.scale_y)
    with torch.no_grad():
        sae.W_dec.mul_(torch.rand(96, 1) + 0.5)
        batch = torch.cat([x[:256] / stats.scale_x, y[:256] / stats.scale_y], -1)
        out = sae.training_forward_pass(TrainStepInput(sae_in=batch, coefficients={}, dead_neuron_mask=None,
                                                       n_training_steps=0, is_logging_step=False))
        cutoff = float(out.feature_acts[out.feature_acts > 0].min())
        tc = tt.to_inference(sae, stats.scale_x, stats.scale_y, threshold=cutoff * (1 - 1e-6))
        assert float((out.feature_acts > 0).sum()) == 8 * 256
        assert torch.allclose(tc(x[:256]), stats.scale_y * out.sae_out, atol=1e-4 * float(y.abs().max()))
        # the MSE the trainer optimises is the transcoder's error on y, not a reconstruction of x
        assert float(out.losses["mse_loss"]) == pytest.approx(float((out.sae_out - batch[:, 48:]).pow(2).sum(-1).mean()), rel=1e-5)


def test_calibrated_threshold_gives_k_features_per_token():
    x, y = synthetic()
    tc, info = tt.train_transcoder((x, y), d_sae=96, k=8, skip=True, epochs=1, batch_size=256, lr=2e-3)
    l0 = float((tc.encode(x[:4096]) != 0).sum(-1).float().mean())
    assert l0 == pytest.approx(8, rel=0.05)  # calibrated on the first 8192 rows of the training data


def test_scale_invariance_of_the_recipe():
    """Inputs and targets are normalised before training and the scales folded back: training on (c·x, d·y)
    gives d times the prediction on c·x (same seed, same data order)."""
    x, y = synthetic()
    kw = dict(d_sae=96, k=8, skip=True, epochs=1, batch_size=256, lr=2e-3, seed=3)
    tc1, _ = tt.train_transcoder((x, y), **kw)
    tc2, _ = tt.train_transcoder((7.0 * x, 0.05 * y), **kw)
    with torch.no_grad():
        assert torch.allclose(tc2(7.0 * x[:300]), 0.05 * tc1(x[:300]), atol=2e-3 * 0.05 * float(y.abs().max()))


def test_training_beats_linear_baseline_and_is_sparse():
    x, y = synthetic(n=8000)
    held_x, held_y = x[-2000:], y[-2000:]
    train = (x[:-2000], y[:-2000])
    lin = tt.fit_linear(train)
    tc, info = tt.train_transcoder(train, d_sae=192, k=12, skip=True, epochs=4, batch_size=256, lr=3e-3)
    fve_tc = tt.explained_variance(tc, (held_x, held_y))
    fve_lin = tt.explained_variance(lin.predict, (held_x, held_y))
    assert fve_tc > fve_lin + 0.05
    l0 = float((tc.encode(held_x) != 0).sum(-1).float().mean())
    assert 6 <= l0 <= 18


def test_streamed_training_runs_and_matches_in_memory_quality():
    x, y = synthetic(n=8000)
    chunks = [(x[i : i + 1000], y[i : i + 1000]) for i in range(0, 6000, 1000)]
    tc_s, info = tt.train_transcoder(chunks, d_sae=96, k=8, skip=True, epochs=3, batch_size=256, lr=3e-3,
                                     shuffle_buffer=2500)
    tc_m, _ = tt.train_transcoder((x[:6000], y[:6000]), d_sae=96, k=8, skip=True, epochs=3, batch_size=256, lr=3e-3)
    held = (x[6000:], y[6000:])
    assert info["training_samples"] == info["steps"] * 256 and info["steps"] == 6000 * 3 // 256
    assert tt.explained_variance(tc_s, held) == pytest.approx(tt.explained_variance(tc_m, held), abs=0.03)


def test_round_trip_through_sae_lens_and_the_store(tmp_path):
    from sae_lens import SAE

    x, y = synthetic()
    tc, _ = tt.train_transcoder((x, y), d_sae=96, k=8, skip=True, epochs=1, batch_size=256,
                                metadata={"hook_name": "blocks.0.ln2.hook_normalized"})
    # sae-lens' own directory format
    tc.save_model(tmp_path / "tc")
    again = SAE.load_from_disk(tmp_path / "tc", device="cpu")
    with torch.no_grad():
        assert torch.allclose(again(x[:100]), tc(x[:100]))
    # circuitscope's store (cfg JSON + safetensors via SAE.from_dict)
    from backend.dictionaries.storage import load_dictionary, save_dictionary, to_stored_precision
    from backend.store.access import StoreWriter, reading

    path = tmp_path / "s.duckdb"
    to_stored_precision(tc)  # the transcoder step rounds before evaluating; the store then holds exactly this
    with StoreWriter(path, kind="precompute", model="synthetic") as w:
        save_dictionary(w, tc, {"dict_id": "syn/L0/mlp/jumprelu_skip_transcoder-96", "model": "synthetic",
                                "kind": "transcoder", "architecture": tc.cfg.architecture(), "layer": 0,
                                "hook_name": "blocks.0.ln2.hook_normalized"})
    with reading(path) as con:
        loaded = load_dictionary(con, "syn/L0/mlp/jumprelu_skip_transcoder-96")
    with torch.no_grad():
        assert torch.allclose(loaded(x[:100]), tc(x[:100]))
    assert loaded.cfg.metadata["training"]["k"] == 8
