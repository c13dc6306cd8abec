"""Attribution methods (backend/attribution): exactness on a linearised model, independent patching checks, IG
completeness, the gradient-capture contract RelP relies on, store round trip and Pearson r via SQL.

The linearised models are the tiny test models with permanent TransformerLens hooks that remove every
non-linearity: each norm's scale is a constant, every attention pattern is a fixed uniform causal pattern, and the
MLP's output activation is a fixed linear function of its (up-projection) pre-activation. With the metric
``logit_diff`` (linear in the logits), the metric is then affine in every component, so AtP and IG (any number of
steps) must equal activation patching up to float64 rounding.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from backend.attribution import METHODS, available_methods
from backend.attribution.atp import atp, gradient_estimate
from backend.attribution.components import Scores, build_sites
from backend.attribution.ig import integrated_gradients
from backend.attribution.patching import activation_patching
from backend.errors import InputError
from backend.inputs.tasks import build_task
from backend.model.hooks import hook_name
from backend.model.registry import load_model

KINDS = ["resid", "mlp", "head"]


def linearise(model: Any) -> Any:
    """A float64 copy of ``model`` with permanent hooks making every non-linearity linear (see the module doc)."""
    lin = copy.deepcopy(model).to(torch.float64)
    lin.cfg.dtype = torch.float64  # TL's norms cast back to cfg.dtype
    lin.reset_hooks(including_permanent=True)
    stash: dict[int, torch.Tensor] = {}

    def const_scale(x: torch.Tensor, hook: Any) -> torch.Tensor:
        return torch.full_like(x, 2.0)

    def fixed_pattern(p: torch.Tensor, hook: Any) -> torch.Tensor:
        q, k = p.shape[-2:]
        causal = torch.tril(torch.ones(q, k, dtype=p.dtype))
        return (causal / causal.sum(-1, keepdim=True)).expand_as(p)

    def keep(layer: int) -> Any:
        def hook(x: torch.Tensor, hook: Any) -> torch.Tensor:
            stash[layer] = x
            return x
        return hook

    def linear_post(layer: int) -> Any:
        def hook(x: torch.Tensor, hook: Any) -> torch.Tensor:
            return 0.5 * stash.pop(layer)
        return hook

    for name in list(lin.hook_dict):
        if name.endswith("hook_scale"):
            lin.add_hook(name, const_scale, is_permanent=True)
        elif name.endswith("attn.hook_pattern"):
            lin.add_hook(name, fixed_pattern, is_permanent=True)
    gated = hasattr(lin.blocks[0].mlp, "W_gate")
    for layer in range(lin.cfg.n_layers):
        pre = f"blocks.{layer}.mlp.hook_pre_linear" if gated else f"blocks.{layer}.mlp.hook_pre"
        lin.add_hook(pre, keep(layer), is_permanent=True)
        lin.add_hook(f"blocks.{layer}.mlp.hook_post", linear_post(layer), is_permanent=True)
    return lin


_LINEAR: dict[str, Any] = {}


def _linear(name: str) -> Any:
    if name not in _LINEAR:
        _LINEAR[name] = linearise(load_model(name))
    return _LINEAR[name]


@pytest.fixture(scope="module", params=["tiny-llama", "tiny-gpt2"])
def linear_model(request: pytest.FixtureRequest) -> Any:
    return _linear(request.param)


@pytest.fixture(scope="module")
def ioi(tiny_model: Any) -> Any:
    return build_task("ioi", tiny_model, n=3, seed=1)


def _metric(model: Any, batch: Any, tokens: torch.Tensor, hooks: list | None = None) -> float:
    with torch.no_grad():
        return float(batch.metric(model.run_with_hooks(tokens, fwd_hooks=hooks or [])))


def _close(a: Scores, b: Scores, **tol: float) -> None:
    assert a.values.keys() == b.values.keys()
    for kind in a.values:
        torch.testing.assert_close(a.values[kind], b.values[kind], **tol, msg=lambda m: f"{kind}: {m}")


# --------------------------------------------------------------------------------------------------------------
# Exactness and sign convention on a linear model


@pytest.mark.parametrize("name, per_position_heads", [("tiny-llama", False), ("tiny-llama", True),
                                                     ("tiny-gpt2", False)])
def test_linear_model_atp_and_ig_equal_patching(name: str, per_position_heads: bool) -> None:
    linear_model = _linear(name)
    batch = build_task("ioi", linear_model, n=2, seed=3)
    truth = activation_patching(linear_model, batch, KINDS, per_position_heads=per_position_heads)
    assert all(bool((v != 0).any()) for v in truth.values.values())  # not a vacuous comparison
    _close(atp(linear_model, batch, KINDS, per_position_heads=per_position_heads), truth, rtol=1e-9, atol=1e-10)
    _close(integrated_gradients(linear_model, batch, KINDS, steps=3, per_position_heads=per_position_heads), truth,
           rtol=1e-9, atol=1e-10)


def test_sign_convention_noising(linear_model: Any) -> None:
    """Scores estimate m(clean with c <- corrupt) - m(clean): on a linear model the resid_pre-0 scores of all
    positions add up to m(corrupt) - m(clean), computed here with two plain forward passes."""
    batch = build_task("ioi", linear_model, n=2, seed=4)
    expected = _metric(linear_model, batch, batch.corrupt) - _metric(linear_model, batch, batch.clean)
    assert abs(expected) > 1e-6  # far above float64 rounding
    for fn in (activation_patching, atp, integrated_gradients):
        total = float(fn(linear_model, batch, ["resid"]).values["resid"][0].sum())
        assert total == pytest.approx(expected, rel=1e-9, abs=1e-10), fn.__name__


def test_features_on_linear_model(linear_model: Any) -> None:
    """SAE latents spliced in on hook_z (error held fixed) are linear too: AtP and IG equal patching."""
    from backend.dictionaries.attention_sae import make_random_sae

    cfg = linear_model.cfg
    sae = make_random_sae(cfg.n_heads * cfg.d_head, 48, k=6, seed=0)
    batch = build_task("ioi", linear_model, n=2, seed=5)
    dicts = {1: sae}
    truth = activation_patching(linear_model, batch, ["feature"], dictionaries=dicts)
    assert truth.feature_layers == (1,) and tuple(truth.values["feature"].shape) == (1, 48)
    assert int((truth.values["feature"] != 0).sum()) > 5
    # The SAE runs in float32 inside a float64 model, so agreement is to float32 precision.
    _close(atp(linear_model, batch, ["feature"], dictionaries=dicts), truth, rtol=1e-4, atol=1e-5)
    _close(integrated_gradients(linear_model, batch, ["feature"], steps=2, dictionaries=dicts), truth,
           rtol=1e-4, atol=1e-5)


# --------------------------------------------------------------------------------------------------------------
# Patching checked by hand on the real (non-linear) tiny model


def _replace(index: tuple, corrupt_act: torch.Tensor) -> Any:
    def hook(act: torch.Tensor, hook: Any) -> torch.Tensor:
        act = act.clone()
        act[index] = corrupt_act[index]
        return act
    return hook


@pytest.mark.parametrize("kind, layer, index, per_pos, pick", [
    ("resid", 1, (slice(None), 5), False, (1, 5)),
    ("mlp", 0, (slice(None), 7), False, (0, 7)),
    ("head", 1, (slice(None), slice(None), 2), False, (1, 2)),
    ("head", 0, (slice(None), 4, 1), True, (0, 1, 4)),
])
def test_batched_patching_equals_a_hand_written_patch(tiny_model: Any, ioi: Any, kind: str, layer: int,
                                                      index: tuple, per_pos: bool, pick: tuple) -> None:
    name = hook_name({"resid": "resid_pre", "mlp": "mlp_out", "head": "z"}[kind], layer)
    with torch.no_grad():
        _, cache = tiny_model.run_with_cache(ioi.corrupt, names_filter=[name])
    expected = _metric(tiny_model, ioi, ioi.clean, [(name, _replace(index, cache[name]))]) - \
        _metric(tiny_model, ioi, ioi.clean)
    # max_tokens: 2 copies of the 3-example batch per pass, so chunking is exercised too
    scores = activation_patching(tiny_model, ioi, [kind], per_position_heads=per_pos, max_tokens=100)
    assert abs(expected) > 1e-4
    assert float(scores.values[kind][pick]) == pytest.approx(expected, rel=1e-4, abs=1e-5)


def test_patching_skips_unchanged_components(tiny_model: Any, ioi: Any) -> None:
    scores = activation_patching(tiny_model, ioi, ["resid"])
    first_diff = int((ioi.clean != ioi.corrupt).any(0).nonzero()[0])
    assert first_diff > 0
    assert bool((scores.values["resid"][:, :first_diff] == 0).all())  # identical prompts so far: effect 0
    assert bool((scores.values["resid"][:, first_diff:] != 0).any())


def test_feature_patching_equals_a_hand_written_splice(tiny_model: Any, ioi: Any) -> None:
    from backend.dictionaries.attention_sae import encode_z, make_random_sae

    cfg = tiny_model.cfg
    sae = make_random_sae(cfg.n_heads * cfg.d_head, 32, k=4, seed=1)
    scores = activation_patching(tiny_model, ioi, ["feature"], dictionaries={0: sae})
    feature = int(scores.values["feature"][0].abs().argmax())
    name = hook_name("z", 0)
    with torch.no_grad():
        _, cache = tiny_model.run_with_cache(ioi.corrupt, names_filter=[name])
    f_corrupt = encode_z(sae, cache[name])[..., feature]

    def splice(z: torch.Tensor, hook: Any) -> torch.Tensor:  # z + (f_i,corrupt - f_i) * W_dec[i], all positions
        f = encode_z(sae, z)[..., feature]
        return z + ((f_corrupt - f)[..., None] * sae.W_dec[feature]).reshape(z.shape)

    expected = _metric(tiny_model, ioi, ioi.clean, [(name, splice)]) - _metric(tiny_model, ioi, ioi.clean)
    assert float(scores.values["feature"][0, feature]) == pytest.approx(expected, rel=1e-4, abs=1e-5)


# --------------------------------------------------------------------------------------------------------------
# IG completeness on the non-linear tiny model


@pytest.mark.parametrize("kind, layer", [("resid", 1), ("head", 1)])
def test_ig_completeness_per_layer(tiny_model: Any, ioi: Any, kind: str, layer: int) -> None:
    """Sum of one layer's IG scores -> the exact effect of patching the whole layer, error shrinking with steps."""
    name = hook_name({"resid": "resid_pre", "mlp": "mlp_out", "head": "z"}[kind], layer)
    with torch.no_grad():
        _, cache = tiny_model.run_with_cache(ioi.corrupt, names_filter=[name])
    exact = _metric(tiny_model, ioi, ioi.clean, [(name, lambda act, hook: cache[name])]) - \
        _metric(tiny_model, ioi, ioi.clean)
    errors = []
    for steps in (1, 4, 32):
        total = float(integrated_gradients(tiny_model, ioi, [kind], steps=steps).values[kind][layer].sum())
        errors.append(abs(total - exact))
    assert abs(exact) > 1e-3
    assert errors[0] > errors[1] > errors[2], errors
    assert errors[2] < 0.01 * abs(exact) + 1e-5, (errors, exact)


# --------------------------------------------------------------------------------------------------------------
# The gradient-estimate contract (RelP's rule hooks)


def _half_gradient(x: torch.Tensor, hook: Any) -> torch.Tensor:
    return 0.5 * x + 0.5 * x.detach()  # same value, half the gradient to whatever produced x


def test_extra_hooks_act_in_the_backward_pass(tiny_model: Any, ioi: Any) -> None:
    """A rule hook halving the gradient at the unembedding's input halves every score."""
    assert "unembed.hook_in" in tiny_model.hook_dict
    plain = atp(tiny_model, ioi, KINDS)
    half = gradient_estimate(tiny_model, ioi, KINDS, fwd_hooks=[("unembed.hook_in", _half_gradient)])
    for kind in KINDS:
        assert bool((plain.values[kind] != 0).any())
        torch.testing.assert_close(half.values[kind], 0.5 * plain.values[kind], rtol=1e-5, atol=1e-7)


def test_a_rule_on_a_component_hook_point_acts_upstream_of_it(tiny_model: Any, ioi: Any) -> None:
    """A rule hook on a scored hook point runs before the capture: the component's own score uses the gradient of
    the value flowing downstream, and only what lies upstream sees the rule (here: no gradient through MLP 1)."""
    plain = atp(tiny_model, ioi, ["mlp"])
    ruled = gradient_estimate(tiny_model, ioi, ["mlp"], fwd_hooks=[(hook_name("mlp_out", 1),
                                                                    lambda x, hook: x.detach())])
    torch.testing.assert_close(ruled.values["mlp"][1], plain.values["mlp"][1], rtol=1e-5, atol=1e-7)
    # Independent: MLP 0's gradient with MLP 1's output detached, from a hand-written backward pass.
    detach_mlp1 = [(hook_name("mlp_out", 1), lambda x, hook: x.detach())]
    expected = _handwritten_estimate(tiny_model, ioi, hook_name("mlp_out", 0), detach_mlp1).double()
    torch.testing.assert_close(ruled.values["mlp"][0], expected, rtol=1e-5, atol=1e-7)
    assert not torch.allclose(ruled.values["mlp"][0], plain.values["mlp"][0])


def _handwritten_estimate(model: Any, batch: Any, name: str, extra_hooks: list[Any] | None = None) -> torch.Tensor:
    """grad · (corrupt − clean) per position at hook ``name`` from a hand-written backward pass (independent of
    backend.attribution), with ``extra_hooks`` active in the clean pass."""
    with torch.no_grad():
        _, cache = model.run_with_cache(batch.corrupt, names_filter=[name])
    store: dict[str, torch.Tensor] = {}

    def leaf(act: torch.Tensor, hook: Any) -> torch.Tensor:
        store["a"] = act.detach().requires_grad_(True)
        return store["a"]

    with torch.enable_grad():
        m = batch.metric(model.run_with_hooks(batch.clean, fwd_hooks=[(name, leaf), *(extra_hooks or [])]))
        (grad,) = torch.autograd.grad(m, [store["a"]])
    return (grad * (cache[name] - store["a"].detach())).sum((0, 2))


def test_atp_is_the_first_order_estimate(tiny_model: Any, ioi: Any) -> None:
    """Independent check of AtP's arithmetic: grad from a hand-written backward pass times the delta."""
    expected = _handwritten_estimate(tiny_model, ioi, hook_name("resid_pre", 1))
    torch.testing.assert_close(atp(tiny_model, ioi, ["resid"]).values["resid"][1], expected.double(),
                               rtol=1e-5, atol=1e-7)


@pytest.mark.skipif("relp" not in available_methods(), reason="backend/attribution/relp.py is not present")
def test_relp_with_gradient_rules_is_atp(tiny_model: Any, ioi: Any) -> None:
    from backend.attribution import relp

    rules = getattr(relp, "GRADIENT_RULES", None)
    if rules is None:
        pytest.skip("relp has no GRADIENT_RULES")
    _close(relp.relp(tiny_model, ioi, KINDS, rules=rules), atp(tiny_model, ioi, KINDS), rtol=1e-4, atol=1e-6)


def test_permanent_hooks_survive(linear_model: Any) -> None:
    n_before = sum(len(hp.fwd_hooks) for hp in linear_model.hook_dict.values())
    batch = build_task("ioi", linear_model, n=1, seed=0)
    atp(linear_model, batch, ["resid"])
    integrated_gradients(linear_model, batch, ["mlp"], steps=1)
    activation_patching(linear_model, batch, ["head"])
    assert sum(len(hp.fwd_hooks) for hp in linear_model.hook_dict.values()) == n_before


def test_bad_input_is_a_sentence(tiny_model: Any, ioi: Any) -> None:
    with pytest.raises(InputError, match="Unknown component kind"):
        atp(tiny_model, ioi, ["neurons"])
    with pytest.raises(InputError, match="needs attention SAEs"):
        atp(tiny_model, ioi, ["feature"])
    with pytest.raises(InputError, match="positive whole number"):
        integrated_gradients(tiny_model, ioi, ["resid"], steps=0)


def test_registry() -> None:
    assert set(METHODS) == {"patching", "atp", "atpstar", "relp", "ig"}
    assert {"patching", "atp", "ig"} <= set(available_methods())
    for spec in METHODS.values():
        assert spec.description and spec.cost


def test_scores_frame_matches_the_table(tiny_model: Any, ioi: Any) -> None:
    s = atp(tiny_model, ioi, KINDS, per_position_heads=True)
    df = s.to_frame()
    assert list(df.columns) == ["component", "layer", "head", "pos", "feature", "score"]
    n_layers, n_heads, seq = tiny_model.cfg.n_layers, tiny_model.cfg.n_heads, ioi.seq_len
    assert df.groupby("component").size().to_dict() == {"resid": n_layers * seq, "mlp": n_layers * seq,
                                                         "head": n_layers * n_heads * seq}
    row = df[(df["component"] == "head") & (df["layer"] == 1) & (df["head"] == 2) & (df["pos"] == 3)]
    assert float(row.score.iloc[0]) == pytest.approx(float(s.values["head"][1, 2, 3]))
    assert df[df.component == "resid"]["head"].isna().all()
    assert [s.label for s in build_sites(tiny_model, ["mlp", "resid"])] == \
        ["resid@L0", "mlp@L0", "resid@L1", "mlp@L1"]


# --------------------------------------------------------------------------------------------------------------
# Comparisons in the store


@pytest.fixture(scope="module")
def comparison(tiny_model: Any) -> Any:
    from backend.attribution.compare import run_comparison

    batch = build_task("ioi", tiny_model, n=2, seed=2)
    return run_comparison(tiny_model, batch, "tiny-llama", methods=["patching", "atp", "ig"], ig_steps=2)


def test_store_round_trip_and_sql_pearson(tmp_path: Path, tiny_store: Path, tiny_model: Any, comparison: Any
                                          ) -> None:
    import shutil

    from backend.attribution import queries as q
    from backend.attribution.compare import write_comparison
    from backend.inputs.prompts import token_strings
    from backend.store.access import StoreWriter, reading

    path = tmp_path / "s.duckdb"
    shutil.copy(tiny_store, path)
    with StoreWriter(path, kind="attribution", model="tiny-llama") as w:
        write_comparison(w.con, comparison, w.run_id)
    cid = comparison.comparison_id
    with reading(path) as con:
        listed = q.attribution_comparisons(con, "tiny-llama")
        scores = q.attribution_scores(con, cid)
        pearson = q.attribution_pearson(con, cid).set_index(["method", "component"])
        methods = q.attribution_methods(con, cid).set_index("method")
        row = q.attribution_comparison(con, cid)
        tokens = q.attribution_tokens(con, cid)
    assert cid in set(listed["comparison_id"]) and listed.set_index("comparison_id").loc[cid, "methods"] == \
        "atp, ig, patching"
    assert row["clean_tokens"] == comparison.batch.clean.tolist() and row["task"] == "ioi"
    assert tokens["clean_id"].tolist() == comparison.batch.clean[0].tolist()
    assert tokens["clean"].iloc[1] == token_strings(tiny_model.tokenizer, [int(comparison.batch.clean[0, 1])])[0]
    for method, run in comparison.runs.items():
        stored = scores[scores.method == method].drop(columns="method").reset_index(drop=True)
        expected = run.scores.to_frame().sort_values(["component", "layer", "head", "pos", "feature"]) \
            .reset_index(drop=True)
        assert len(stored) == len(expected)
        np.testing.assert_allclose(stored["score"].to_numpy(), expected["score"].to_numpy(), rtol=0, atol=0)
        assert methods.loc[method, "seconds"] == pytest.approx(run.seconds)
    assert methods.loc["patching", "speedup_vs_patching"] == pytest.approx(1.0)
    # SQL corr() equals numpy's Pearson r over the same pairs (both-zero pairs left out).
    for method in ("atp", "ig"):
        for kind in ("resid", "mlp", "head"):
            est = comparison.runs[method].scores.values[kind].flatten().numpy()
            ref = comparison.runs["patching"].scores.values[kind].flatten().numpy()
            keep = ~((est == 0) & (ref == 0))
            r = np.corrcoef(est[keep], ref[keep])[0, 1]
            assert pearson.loc[(method, kind), "pearson_r"] == pytest.approx(r, abs=1e-9)
            assert pearson.loc[(method, kind), "n_components"] == int(keep.sum())
    params = json.loads(methods.loc["ig", "params"])
    assert params["steps"] == 2 and params["kinds"] == ["resid", "mlp", "head"]


def test_live_comparison_db_reads_like_a_store(tiny_model: Any, comparison: Any) -> None:
    from backend.attribution import queries as q
    from backend.attribution.compare import comparison_db

    con = comparison_db(comparison, tiny_model.tokenizer)
    pearson = q.attribution_pearson(con, comparison.comparison_id)
    assert set(pearson["method"]) == {"atp", "ig"} and set(pearson["component"]) == {"resid", "mlp", "head"}
    assert pearson["pearson_r"].between(-1, 1).all()
    toks = q.attribution_tokens(con, comparison.comparison_id)
    assert not toks["clean"].str.startswith("#").any()


# --------------------------------------------------------------------------------------------------------------
# CLI


def _cli(*args: str) -> Any:
    import os
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[2]
    return subprocess.run([sys.executable, "-m", "backend", "attribute", *args], capture_output=True, text=True,
                          cwd=root, env={**os.environ, "PYTHONPATH": str(root)}, timeout=600)


def test_cli_attribute_writes_a_comparison(tmp_path: Path) -> None:
    from backend.attribution import queries as q
    from backend.store.access import reading

    store = tmp_path / "cli.duckdb"
    out = _cli("--store", str(store), "--model", "tiny-llama", "--clean", "When Mary and John met, John thanked",
               "--corrupt", "When Alice and Bob met, Carol thanked", "--answer", " Mary", "--wrong", " John",
               "--methods", "patching,atp", "--kinds", "resid,head")
    assert out.returncode == 0, out.stderr[-2000:]
    with reading(store) as con:
        comps = q.attribution_comparisons(con)
        cid = comps["comparison_id"].iloc[0]
        pearson = q.attribution_pearson(con, cid)
        tokens = q.attribution_tokens(con, cid)
    assert comps["source"].tolist() == ["cli"] and comps["methods"].tolist() == ["atp, patching"]
    assert set(pearson["component"]) == {"resid", "head"}
    assert tokens["clean"].iloc[2] == " Mary"  # vocab recorded for the new store
    assert cid in out.stdout and "Pearson r" in out.stdout


@pytest.mark.parametrize("args, needle", [
    (("--task", "ioi", "--clean", "x"), "either --task"),
    (("--task", "ioi", "--methods", "shap"), "Unknown attribution method 'shap'"),
    (("--task", "ioi", "--kinds", "neurons"), "Unknown component kind 'neurons'"),
    (("--clean", "When Mary met John, he thanked", "--corrupt", "When Alice met Bob, he thanked", "--answer",
      " Maryland-Virginia", "--wrong", " John"), "single token"),
])
def test_cli_attribute_bad_input_is_one_line(tmp_path: Path, args: tuple[str, ...], needle: str) -> None:
    out = _cli("--store", str(tmp_path / "x.duckdb"), "--model", "tiny-llama", *args)
    assert out.returncode == 2
    assert "Traceback" not in out.stderr
    lines = [line for line in out.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and needle in lines[0], out.stderr[-2000:]
    assert not (tmp_path / "x.duckdb").exists()
