"""Interventions (backend.interventions) on the tiny random Llama-like model with random dictionaries, each compared with
an independent TransformerLens hook written here."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from backend.dictionaries.attention_sae import make_random_sae
from backend.dictionaries.transcoder import make_random_transcoder
from backend.errors import InputError
from backend.interventions.run import run_intervention
from backend.interventions.spec import Intervention, check, parse, render

pytestmark = pytest.mark.usefixtures("one_thread")
IDS = [1, 504, 3421, 314, 2114, 30, 9601, 284, 260, 3218]


@pytest.fixture(scope="module")
def dicts(tiny_model: Any) -> tuple[dict[int, Any], dict[int, Any]]:
    d = tiny_model.cfg.d_model
    transcoders = {0: make_random_transcoder(d, 128, d, seed=0, l0=16), 1: make_random_transcoder(d, 128, d, seed=1, l0=16)}
    saes = {1: make_random_sae(tiny_model.cfg.n_heads * tiny_model.cfg.d_head, 96, k=12, seed=2)}
    return transcoders, saes


def _rms(x: torch.Tensor, eps: float) -> torch.Tensor:
    return x / (x.pow(2).mean(-1, keepdim=True) + eps).sqrt()


def _logits(model: Any, ids: list[int], hooks: list[tuple[str, Any]]) -> torch.Tensor:
    with torch.no_grad():
        return model.run_with_hooks(torch.tensor([ids]), fwd_hooks=hooks)[0, -1].float()


def _firing(tc: Any, model: Any, ids: list[int], layer: int) -> tuple[int, int]:
    """A (feature, position) pair where the transcoder's feature fires on this prompt, at the last position for the
    last layer (there a change at an earlier position cannot reach the logits read at the last one)."""
    with torch.no_grad():
        _, cache = model.run_with_cache(torch.tensor([ids]), names_filter=[f"blocks.{layer}.ln2.hook_normalized"])
        f = tc.encode(cache[f"blocks.{layer}.ln2.hook_normalized"][0])
    pos = len(ids) - 1 if layer == model.cfg.n_layers - 1 else 1
    feat = int(f[pos].argmax())
    assert f[pos, feat] > 0
    return feat, pos


def test_text_form_round_trips_and_bad_text_is_one_sentence() -> None:
    items = parse("transcoder:12:1034@3,4=scale:2; attn:8:77=zero;head:18:6@5=scale:0.5")
    assert items[0] == Intervention("transcoder", 12, 1034, "scale", 2.0, (3, 4))
    assert parse(render(items)) == items
    for bad in ("", "transcoder:1:2", "mlp:1:2=zero", "head:1:2=zero:3", "attn:1:2=scale", "attn:1:2@=zero",
                "transcoder:1:2=set:abc", "x" * 5000):
        with pytest.raises(InputError) as err:
            parse(bad)
        assert "\n" not in str(err.value)
    with pytest.raises(InputError, match="vector"):
        check(Intervention("head", 0, 1, "set", 1.0), 2, 4, {})
    with pytest.raises(InputError, match="no MLP transcoder at layer 1"):
        check(Intervention("transcoder", 1, 1), 2, 4, {("transcoder", 0): 128})
    with pytest.raises(InputError, match="outside the prompt"):
        check(Intervention("transcoder", 0, 1, positions=(0,)), 2, 4, {("transcoder", 0): 128}, n_positions=5)


@pytest.mark.parametrize("mode, value", [("zero", 0.0), ("scale", 3.0), ("set", 5.0)])
def test_transcoder_feature_matches_an_independent_hook(tiny_model: Any, dicts: Any, mode: str, value: float) -> None:
    transcoders, saes = dicts
    tc = transcoders[1]
    feat, pos = _firing(tc, tiny_model, IDS, 1)
    result = run_intervention(tiny_model, IDS, [Intervention("transcoder", 1, feat, mode, value, (pos,))],
                              transcoders, saes, top_k=5)
    state: dict[str, torch.Tensor] = {}

    def read(r: torch.Tensor, hook: Any) -> None:  # the MLP input, recomputed from resid_mid (tiny-llama is RMS)
        state["x"] = _rms(r, tiny_model.cfg.eps)

    def steer(y: torch.Tensor, hook: Any) -> torch.Tensor:
        a = float(tc.encode(state["x"][0, pos])[feat])
        new = {"zero": 0.0, "scale": a * value, "set": value}[mode]
        y = y.clone()
        y[0, pos] += (new - a) * tc.W_dec[feat]
        return y

    want = _logits(tiny_model, IDS, [("blocks.1.hook_resid_mid", read), ("blocks.1.hook_mlp_out", steer)])
    base = _logits(tiny_model, IDS, [])
    assert result.intervened.top_ids == want.topk(5).indices.tolist()
    assert result.intervened.top_probs == pytest.approx(want.softmax(-1).topk(5).values.tolist(), abs=1e-5)
    assert result.baseline.top_ids == base.topk(5).indices.tolist()
    lp, lq = base.log_softmax(-1), want.log_softmax(-1)
    assert result.kl == pytest.approx(float((lp.exp() * (lp - lq)).sum()), abs=1e-5)
    assert result.kl > 0  # the feature fired, so changing it changed something


def test_attention_feature_and_head_match_independent_hooks(tiny_model: Any, dicts: Any) -> None:
    transcoders, saes = dicts
    sae = saes[1]
    H, dh = tiny_model.cfg.n_heads, tiny_model.cfg.d_head
    with torch.no_grad():
        _, cache = tiny_model.run_with_cache(torch.tensor([IDS]), names_filter=["blocks.1.attn.hook_z"])
        f = sae.encode(cache["blocks.1.attn.hook_z"][0].reshape(len(IDS), -1))
    feat = int(f[1:].sum(0).argmax())
    items = [Intervention("attn", 1, feat, "scale", 0.5), Intervention("head", 1, 2, "zero", positions=(4, 6))]
    result = run_intervention(tiny_model, IDS, items, transcoders, saes, target=(IDS[3], IDS[5]))

    def steer(z: torch.Tensor, hook: Any) -> torch.Tensor:
        flat = z[0].reshape(len(IDS), -1)
        a = sae.encode(flat)[:, feat]
        a[0] = 0.0  # BOS is never intervened on
        z = z + (-0.5 * a)[:, None].mul(sae.W_dec[feat]).reshape(1, len(IDS), H, dh)
        z[0, [4, 6], 2] = 0.0
        return z

    want = _logits(tiny_model, IDS, [("blocks.1.attn.hook_z", steer)])
    with torch.no_grad():
        base = tiny_model(torch.tensor([IDS]))[0, -1]
    assert result.intervened.metric == pytest.approx(float(want[IDS[3]] - want[IDS[5]]), abs=1e-4)
    assert result.baseline.metric == pytest.approx(float(base[IDS[3]] - base[IDS[5]]), abs=1e-4)
    assert result.metric_name == "logit difference" and result.metric_change != 0


def test_frozen_model_is_exact_without_intervention_and_holds_patterns(tiny_model: Any, dicts: Any) -> None:
    transcoders, saes = dicts
    none = run_intervention(tiny_model, IDS, [], transcoders, saes, mode="frozen", target=(IDS[2], None))
    with torch.no_grad():
        clean = tiny_model(torch.tensor([IDS]))[0, -1]
    assert none.intervened.metric == pytest.approx(float(clean[IDS[2]] - clean.mean()), abs=1e-4)
    assert none.kl == pytest.approx(0.0, abs=1e-6)
    # An independent frozen run: patterns and norm scales forced to the clean ones, the transcoder of layer 0 with its
    # clean error, with layer-0 feature `feat` zeroed at `pos`.
    tc = transcoders[0]
    feat, pos = _firing(tc, tiny_model, IDS, 0)
    names = [n for n in tiny_model.hook_dict if n.endswith("hook_pattern") or n.endswith("hook_scale")]
    with torch.no_grad():
        _, cache = tiny_model.run_with_cache(torch.tensor([IDS]), names_filter=names + [
            "blocks.0.ln2.hook_normalized", "blocks.0.hook_mlp_out", "blocks.1.ln2.hook_normalized",
            "blocks.1.hook_mlp_out", "blocks.1.attn.hook_z"])
    err0 = cache["blocks.0.hook_mlp_out"][0] - tc(cache["blocks.0.ln2.hook_normalized"][0])
    err1 = cache["blocks.1.hook_mlp_out"][0] - transcoders[1](cache["blocks.1.ln2.hook_normalized"][0])
    z1 = cache["blocks.1.attn.hook_z"][0]
    zerr = z1 - saes[1].decode(saes[1].encode(z1.reshape(len(IDS), -1))).reshape(z1.shape)
    state: dict[str, torch.Tensor] = {}

    def freeze(act: torch.Tensor, hook: Any) -> torch.Tensor:
        return cache[hook.name]

    def keep(x: torch.Tensor, hook: Any) -> None:
        state[hook.name] = x[0]

    def mlp0(y: torch.Tensor, hook: Any) -> torch.Tensor:
        f = tc.encode(state["blocks.0.ln2.hook_normalized"])
        f[pos, feat] = 0.0
        return (f @ tc.W_dec + tc.b_dec + state["blocks.0.ln2.hook_normalized"] @ tc.W_skip.T
                if hasattr(tc, "W_skip") else f @ tc.W_dec + tc.b_dec)[None] + err0

    def mlp1(y: torch.Tensor, hook: Any) -> torch.Tensor:
        return transcoders[1](state["blocks.1.ln2.hook_normalized"])[None] + err1

    def z_1(z: torch.Tensor, hook: Any) -> torch.Tensor:
        flat = z[0].reshape(len(IDS), -1)
        return saes[1].decode(saes[1].encode(flat)).reshape(z.shape) + zerr

    hooks = [(n, freeze) for n in names] + [
        ("blocks.0.ln2.hook_normalized", keep), ("blocks.0.hook_mlp_out", mlp0),
        ("blocks.1.ln2.hook_normalized", keep), ("blocks.1.hook_mlp_out", mlp1), ("blocks.1.attn.hook_z", z_1)]
    want = _logits(tiny_model, IDS, hooks)
    got = run_intervention(tiny_model, IDS, [Intervention("transcoder", 0, feat, "zero", positions=(pos,))],
                           transcoders, saes, mode="frozen", target=(IDS[2], None))
    assert got.intervened.metric == pytest.approx(float(want[IDS[2]] - want.mean()), abs=1e-4)
    live = run_intervention(tiny_model, IDS, [Intervention("transcoder", 0, feat, "zero", positions=(pos,))],
                            transcoders, saes, mode="live", target=(IDS[2], None))
    assert live.intervened.metric != pytest.approx(got.intervened.metric, abs=1e-6)  # two different models
    with pytest.raises(InputError, match="no continuation"):
        run_intervention(tiny_model, IDS, [], transcoders, saes, mode="frozen", continue_tokens=3)


def test_greedy_continuation_matches_an_independent_loop(tiny_model: Any, dicts: Any) -> None:
    transcoders, saes = dicts
    tc = transcoders[1]
    feat, _ = _firing(tc, tiny_model, IDS, 1)
    result = run_intervention(tiny_model, IDS, [Intervention("transcoder", 1, feat, "set", 8.0)], transcoders, saes,
                              continue_tokens=4)
    state: dict[str, torch.Tensor] = {}

    def read(r: torch.Tensor, hook: Any) -> None:
        state["x"] = _rms(r, tiny_model.cfg.eps)

    def steer(y: torch.Tensor, hook: Any) -> torch.Tensor:  # every position after BOS, generated ones included
        a = tc.encode(state["x"][0])[:, feat]
        change = (8.0 - a)
        change[0] = 0.0
        return y + change[None, :, None] * tc.W_dec[feat]

    seq = list(IDS)
    plain = list(IDS)
    for _ in range(4):
        seq.append(int(_logits(tiny_model, seq, [("blocks.1.hook_resid_mid", read), ("blocks.1.hook_mlp_out", steer)]).argmax()))
        plain.append(int(_logits(tiny_model, plain, []).argmax()))
    assert result.intervened.continuation == seq[len(IDS):]
    assert result.baseline.continuation == plain[len(IDS):]


def test_cli_intervene_prints_both_runs_and_refuses_bad_input(tiny_store: Any, capsys: pytest.CaptureFixture) -> None:
    from backend.cli import main

    args = ["intervene", "--store", str(tiny_store), "--model", "tiny-llama", "--prompt", "When Mary and John went"]
    assert main([*args, "--set", "transcoder:1:5=set:4;head:0:1=zero", "--continue", "2", "--answer", " store"]) == 0
    out = capsys.readouterr().out
    assert "unchanged:" in out and "intervened:" in out and out.count("continues:") == 2
    assert "logit − mean logit:" in out and "KL(unchanged ‖ intervened)" in out
    for bad, needle in ((["--set", "transcoder:1:999999=zero"], "does not exist"),
                        (["--set", "attn:1:3=zero", "--on", "frozen", "--continue", "2"], "no continuation"),
                        (["--set", "head:0:1@99=zero"], "outside the prompt"),
                        (["--set", "nonsense"], "is not an intervention")):
        assert main([*args, *bad]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and "\n" not in err and needle in err, err
