"""The evaluation protocol (backend/attribution/evaluation.py, backend/stats.py) against computations written here:
the split re-derived from its definition, correlations from numpy / pandas, bootstrap coverage on data with a known
mean, a resumable run on tiny-llama, and the new task families (equal lengths, answers; on SmolLM2, slow: the clean
metric clearly above the corrupt one)."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import torch

from backend import stats
from backend.attribution import evaluation as ev
from backend.inputs.tasks import build_task


def test_split_is_the_stated_rule() -> None:
    for family in ev.FAMILIES:
        parts = ev.split_indices(family)
        seeds = {i: int(hashlib.sha256(f"{ev.SPLIT_SALT}:{family}:{ev.BUILD_SEED}:{i}".encode()).hexdigest()[:8], 16)
                 for i in range(ev.N_PAIRS)}
        dev = sorted(sorted(seeds, key=seeds.__getitem__)[: ev.N_PAIRS // 2])
        assert parts["dev"] == dev
        assert sorted(parts["dev"] + parts["eval"]) == list(range(ev.N_PAIRS))
        assert len(parts["eval"]) == ev.N_PAIRS - len(dev) >= 8
    assert ev.split_indices("ioi") != ev.split_indices("sva")  # not the same halves for every family


def test_correlations_and_top_k_against_numpy_and_pandas() -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(size=50)
    y = x + rng.normal(size=50)
    y[:5] = y[5]  # ties
    assert stats.pearson(x, y) == pytest.approx(np.corrcoef(x, y)[0, 1], abs=1e-12)
    rx, ry = pd.Series(x).rank().to_numpy(), pd.Series(y).rank().to_numpy()
    assert stats.spearman(x, y) == pytest.approx(np.corrcoef(rx, ry)[0, 1], abs=1e-12)
    truth = np.arange(20.0) - 10  # |truth| largest: -10..-6 and 5..9
    est = truth.copy()
    est[[0, 19]] = 0.0  # two of the true top 10 pushed out
    top_true = set(np.argsort(-np.abs(truth), kind="mergesort")[:10])
    top_est = set(np.argsort(-np.abs(est), kind="mergesort")[:10])
    assert stats.top_k_overlap(est, truth, 10) == len(top_true & top_est) / 10 == 0.8


def test_bootstrap_interval_covers_a_known_mean() -> None:
    rng = np.random.default_rng(1)
    data = rng.normal(loc=3.0, scale=1.0, size=400)
    point, low, high = stats.percentile_bootstrap(lambda idx: float(data[idx].mean()), len(data), 2000, seed=0)
    assert point == pytest.approx(data.mean())
    half_width = 1.96 / np.sqrt(len(data))  # the normal-theory interval of a mean with sd 1
    assert low < 3.0 < high
    assert (high - low) / 2 == pytest.approx(half_width, rel=0.15)


def test_cell_statistics_average_pairs_first() -> None:
    rng = np.random.default_rng(2)
    truth = rng.normal(size=(6, 4, 5))
    estimate = 0.5 * truth + 0.3 * rng.normal(size=truth.shape)
    estimate[:, 0, 0] = truth[:, 0, 0] = 0.0  # a component both score exactly 0: left out
    cell = ev.cell_statistics(estimate, truth, resamples=200)
    e, t = estimate.mean(0).ravel()[1:], truth.mean(0).ravel()[1:]
    assert cell["r"] == pytest.approx(np.corrcoef(e, t)[0, 1], abs=1e-12)
    assert cell["r_lo"] <= cell["r"] <= cell["r_hi"]
    same = ev.cell_statistics(truth, truth, resamples=50)
    assert same["r"] == same["r_lo"] == same["r_hi"] == pytest.approx(1.0)
    assert same["top10"] == 1.0


def test_protocol_run_is_resumable_and_tabulates(tiny_model: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
                                                 ) -> None:
    from backend.attribution.patching import activation_patching

    monkeypatch.setitem(ev.FAMILIES, "ioi", {})
    settings = [ev.Setting("patching", "patching"), ev.Setting("atp", "atp")]
    records = ev.run_protocol(tiny_model, "tiny-llama", settings, tmp_path, families=["ioi"], splits=["dev"],
                              log=lambda s: None)
    assert len(records) == 2
    again = ev.run_protocol(tiny_model, "tiny-llama", settings, tmp_path, families=["ioi"], splits=["dev"],
                            log=lambda s: None)
    assert len(again) == 2  # nothing re-run
    rec = next(r for r in records if r["label"] == "patching")
    assert rec["indices"] == ev.split_indices("ioi")["dev"] and rec["wall_s"] > 0 and rec["cpu_s"] > 0
    sub = ev.family_batch(tiny_model, "ioi").select(rec["indices"])
    direct = activation_patching(tiny_model, sub, ["mlp"]).examples["mlp"].numpy()
    np.testing.assert_allclose(np.asarray(rec["scores"]["mlp"]["values"]).reshape(direct.shape), direct,
                               rtol=1e-6, atol=1e-7)
    table = ev.faithfulness_table(records, "dev", resamples=50)
    assert set(table["kind"]) == {"resid", "mlp", "head"} and set(table["label"]) == {"atp"}
    atp_rec = next(r for r in records if r["label"] == "atp")
    e = np.asarray(atp_rec["scores"]["head"]["values"]).reshape(atp_rec["scores"]["head"]["shape"]).mean(0).ravel()
    t = np.asarray(rec["scores"]["head"]["values"]).reshape(rec["scores"]["head"]["shape"]).mean(0).ravel()
    keep = ~((e == 0) & (t == 0))
    got = table[(table.kind == "head")]["r"].iloc[0]
    assert got == pytest.approx(np.corrcoef(e[keep], t[keep])[0, 1], abs=1e-5)


def test_per_example_scores_average_to_the_batch_scores(tiny_model: Any) -> None:
    """Each method's ``examples`` are its per-pair scores: one pair alone gives that pair's row."""
    from backend.attribution import METHODS

    batch = build_task("ioi", tiny_model, n=3, seed=5)
    for name in ("patching", "atp", "atpstar", "relp", "ig"):
        fn = METHODS[name].load()
        whole = fn(tiny_model, batch, ["resid", "head"])
        alone = fn(tiny_model, batch.select([1]), ["resid", "head"])
        for kind in ("resid", "head"):
            torch.testing.assert_close(whole.examples[kind].mean(0), whole.values[kind])
            torch.testing.assert_close(whole.examples[kind][1], alone.values[kind], rtol=1e-4, atol=1e-5,
                                       msg=f"{name} {kind}")


@pytest.mark.parametrize("family", ["factual", "sva"])
def test_new_families_are_equal_length_pairs(tiny_model: Any, family: str) -> None:
    tok = tiny_model.tokenizer
    batch = build_task(family, tiny_model, n=16, seed=0)
    assert batch.clean.shape == batch.corrupt.shape and len(batch) == 16 and batch.metric_name == "logit_diff"
    assert bool((batch.clean != batch.corrupt).any(1).all())  # every pair differs somewhere
    assert bool((batch.answer != batch.wrong).all())
    for i in range(len(batch)):
        assert tok.decode(batch.clean[i]).endswith(batch.prompts[i])
    if family == "sva":
        words = {tok.decode([int(a)]) for a in batch.answer}
        assert words == {" is", " are"}  # both numbers of subject
    else:
        from backend.inputs.tasks import FACT_CAPITALS

        for i in range(len(batch)):
            country = next(c for c in FACT_CAPITALS if f" {c} " in f" {batch.prompts[i]} ".replace(",", " "))
            assert tok.decode([int(batch.answer[i])]) == " " + FACT_CAPITALS[country]
    assert build_task(family, tiny_model, n=16, seed=0).clean.tolist() == batch.clean.tolist()  # deterministic


@pytest.mark.slow
def test_families_separate_clean_from_corrupt_on_smollm2() -> None:
    from backend.model.registry import load_model

    model = load_model("smollm2-135m")
    for family in ev.FAMILIES:
        batch = ev.family_batch(model, family)
        with torch.no_grad():
            clean = batch.metric_per_example(model(batch.clean))
            corrupt = batch.metric_per_example(model(batch.corrupt))
        gap = clean - corrupt
        assert float(gap.mean()) > 1.0 and float(gap.min()) > 0.2, (family, gap)
