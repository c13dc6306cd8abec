"""Activation collection (backend.activations) and its reuse across precompute steps: what the corpus step gathers
during its scoring pass must be exactly what the dictionary steps would have collected themselves."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from backend.model.activations import Precollector, ResidualCarry, capture_batch, collect
from backend.store.access import reading

pytestmark = pytest.mark.usefixtures("one_thread")
SITES = [("z", 0), ("mlp_in", 1), ("mlp_out", 0)]


@pytest.fixture(scope="module")
def tokens(tiny_model: Any) -> torch.Tensor:
    gen = torch.Generator().manual_seed(0)
    t = torch.randint(1, tiny_model.cfg.d_vocab, (5, 12), generator=gen)
    t[:, 0] = 0  # a BOS-like first token (dropped by collection)
    return t


def test_collect_matches_the_transformer_lens_cache(tiny_model: Any, tokens: torch.Tensor) -> None:
    got = collect(tiny_model, tokens, SITES, batch_size=2)
    with torch.no_grad():
        _, cache = tiny_model.run_with_cache(tokens)
    for kind, name in (("z", "blocks.0.attn.hook_z"), ("mlp_in", "blocks.1.ln2.hook_normalized"),
                       ("mlp_out", "blocks.0.hook_mlp_out")):
        layer = int(name.split(".")[1])
        want = cache[name][:, 1:].reshape(tokens.shape[0] * (tokens.shape[1] - 1), -1)  # heads flattened head-major
        torch.testing.assert_close(got[(kind, layer)], want, rtol=1e-5, atol=1e-6)


def test_a_carried_residual_stream_gives_the_full_passes_values_without_rerunning_earlier_blocks(
        tiny_model: Any, tokens: torch.Tensor) -> None:
    """Layer groups collected one after another: the second pass starts at the block the first one stopped at."""
    with torch.no_grad():
        _, cache = tiny_model.run_with_cache(tokens)
    carry = ResidualCarry()
    first = collect(tiny_model, tokens, [("z", 0), ("mlp_out", 0)], batch_size=2, carry=carry)
    assert carry.layer == 1
    torch.testing.assert_close(carry.resid, cache["blocks.0.hook_resid_post"], rtol=0, atol=0)
    ran: list[str] = []
    tiny_model.blocks[0].hook_resid_pre.add_hook(lambda value, hook: ran.append(hook.name))
    try:
        second = collect(tiny_model, tokens, [("mlp_in", 1), ("z", 1)], batch_size=3, carry=carry)
    finally:
        tiny_model.reset_hooks()
    assert ran == []  # block 0 did not run again
    assert carry.layer == 2 and carry.resid is not None
    rows = tokens.shape[0] * (tokens.shape[1] - 1)
    for (kind, layer), name in {("z", 0): "blocks.0.attn.hook_z", ("mlp_out", 0): "blocks.0.hook_mlp_out",
                                ("mlp_in", 1): "blocks.1.ln2.hook_normalized", ("z", 1): "blocks.1.attn.hook_z"}.items():
        got = (first if layer == 0 else second)[(kind, layer)]
        torch.testing.assert_close(got, cache[name][:, 1:].reshape(rows, -1), rtol=1e-5, atol=1e-6)
    # A carry that starts above a requested site is not used: that pass runs from the embeddings.
    again = collect(tiny_model, tokens, [("z", 0)], batch_size=5, carry=carry)
    torch.testing.assert_close(again[("z", 0)], first[("z", 0)], rtol=1e-5, atol=1e-6)


def test_a_last_group_starts_from_the_carry_and_keeps_nothing(tiny_model: Any, tokens: torch.Tensor) -> None:
    with torch.no_grad():
        _, cache = tiny_model.run_with_cache(tokens)
    carry = ResidualCarry()
    collect(tiny_model, tokens, [("z", 0)], batch_size=2, carry=carry)
    carry.keep = False
    ran: list[str] = []
    tiny_model.blocks[0].hook_resid_pre.add_hook(lambda value, hook: ran.append(hook.name))
    try:
        last = collect(tiny_model, tokens, [("z", 1)], batch_size=3, carry=carry)
    finally:
        tiny_model.reset_hooks()
    assert ran == [] and carry.resid is None and carry.layer == 0
    rows = tokens.shape[0] * (tokens.shape[1] - 1)
    torch.testing.assert_close(last[("z", 1)], cache["blocks.1.attn.hook_z"][:, 1:].reshape(rows, -1),
                               rtol=1e-5, atol=1e-6)


def test_capture_batch_stops_after_its_last_site_with_the_full_passes_values(tiny_model: Any,
                                                                            tokens: torch.Tensor) -> None:
    ran: list[str] = []
    tiny_model.blocks[1].hook_mlp_out.add_hook(lambda value, hook: ran.append(hook.name))
    try:
        got = capture_batch(tiny_model, tokens, [("z", 0), ("z", 1)])
    finally:
        tiny_model.reset_hooks()
    assert ran == []  # the pass ended at blocks.1.attn.hook_z, before layer 1's MLP
    assert not any(hp.fwd_hooks for hp in tiny_model.hook_dict.values())  # no capture hook left behind
    with torch.no_grad():
        _, cache = tiny_model.run_with_cache(tokens)
    for layer in (0, 1):
        torch.testing.assert_close(got[("z", layer)], cache[f"blocks.{layer}.attn.hook_z"][:, 1:], rtol=0, atol=0)


def test_precollector_in_a_loss_pass_keeps_only_wanted_leading_contexts(tiny_model: Any, tokens: torch.Tensor) -> None:
    """Hooks that copy must not change the loss, and each site gets exactly its leading contexts' rows."""
    wants = {("z", 0): 5, ("mlp_in", 1): 3, ("mlp_out", 0): 1}
    gather = Precollector(wants, tokens.shape[1])
    losses = []
    with torch.no_grad():
        for start in range(0, 5, 2):
            batch = tokens[start : start + 2]
            losses.append(tiny_model.run_with_hooks(batch, return_type="loss", loss_per_token=True,
                                                    fwd_hooks=gather.hooks(start, len(batch))))
        plain = tiny_model(tokens, return_type="loss", loss_per_token=True)
    torch.testing.assert_close(torch.cat(losses), plain, rtol=1e-5, atol=1e-6)
    full = collect(tiny_model, tokens, SITES, batch_size=5)
    rows = tokens.shape[1] - 1
    for site, n in wants.items():
        assert gather.result()[site].shape[0] == n * rows
        torch.testing.assert_close(gather.result()[site], full[site][: n * rows], rtol=1e-5, atol=1e-6)


def _run(path: Path, model: Any, monkeypatch: pytest.MonkeyPatch, precollect: bool) -> dict[str, Any]:
    from backend.pipeline import run as pc

    if not precollect:
        from backend.dictionaries import steps

        monkeypatch.setattr(pc, "PRECOLLECT", [])
        # One layer per collection group: each group's pass starts from the residual stream the previous one left.
        monkeypatch.setattr(steps, "SAE_MEMORY_BYTES", 1)
        monkeypatch.setattr(steps, "TRANSCODER_MEMORY_BYTES", 1)
    try:
        pc.precompute("tiny-llama", path, preset="demo", n_contexts=8, model=model)
    finally:
        monkeypatch.undo()
    with reading(path) as con:
        return json.loads(con.execute("SELECT summary FROM runs").fetchall()[0][0])


def test_reusing_the_scoring_pass_changes_no_result(tmp_path: Path, tiny_model: Any,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """The demo preset with and without the corpus step's gathering (without: one collection pass per layer, each
    starting from the residual stream the previous one left): same dictionaries, same feature rows."""
    fast = _run(tmp_path / "reuse.duckdb", tiny_model, monkeypatch, precollect=True)
    slow = _run(tmp_path / "plain.duckdb", tiny_model, monkeypatch, precollect=False)
    assert fast["attention_saes"]["reused_activations"] and fast["transcoders"]["reused_activations"]
    assert fast["features"]["reused_activations"] and fast["features"]["forward_s"] == 0.0
    assert not slow["attention_saes"]["reused_activations"] and not slow["transcoders"]["reused_activations"]
    assert not slow["features"]["reused_activations"]
    queries = {
        "dictionaries": "SELECT dict_id, l0, fve, ce_loss_recovered, dead_fraction FROM dictionaries",
        "feature_activations": "SELECT dict_id, feature, context_id, pos, act FROM feature_activations",
        "features": "SELECT dict_id, feature, n_active, max_act, top_head FROM features",
    }
    with reading(tmp_path / "reuse.duckdb") as a, reading(tmp_path / "plain.duckdb") as b:
        for table, q in queries.items():
            got, want = a.execute(f"{q} ORDER BY ALL").df(), b.execute(f"{q} ORDER BY ALL").df()
            assert len(got) == len(want) > 0, table
            assert got["dict_id"].tolist() == want["dict_id"].tolist(), table
            num = got.drop(columns="dict_id").to_numpy(float)
            np.testing.assert_allclose(num, want.drop(columns="dict_id").to_numpy(float), rtol=1e-4, atol=1e-5,
                                       err_msg=table)


def test_steps_ask_for_nothing_beyond_their_memory_budget(tiny_model: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """The dictionary steps' precollect wants give the scoring pass a list only when it fits their memory budgets."""
    from types import SimpleNamespace

    from backend.dictionaries import steps
    from backend.model.registry import get_spec
    from backend.pipeline.config import PRESETS
    from backend.pipeline.context import RunContext

    gen = torch.Generator().manual_seed(1)
    ctx = RunContext(model=tiny_model, spec=get_spec("tiny-llama"), writer=None, preset=PRESETS["demo"],  # type: ignore[arg-type]
                     layers=[0, 1], corpus_source="", transcoder_layers=[0, 1],
                     contexts=SimpleNamespace(tokens=torch.randint(1, 100, (40, 16), generator=gen)))  # type: ignore[arg-type]
    sae_wants, tc_wants = steps.sae_precollect_wants(ctx), steps.transcoder_precollect_wants(ctx)
    assert sae_wants == {("z", 0): 40, ("z", 1): 40}  # every context: the features step scores them all
    n_train = len(steps._eval_split(ctx)[0])
    assert tc_wants == {(k, l): n_train for l in (0, 1) for k in ("mlp_in", "mlp_out")} and n_train < 40
    monkeypatch.setattr(steps, "SAE_MEMORY_BYTES", 1000)
    monkeypatch.setattr(steps, "TRANSCODER_MEMORY_BYTES", 1000)
    assert steps.sae_precollect_wants(ctx) == {} and steps.transcoder_precollect_wants(ctx) == {}
    ctx.sae_sources, ctx.transcoder_sources = ["some/release"], ["some/release"]  # importing: nothing to train on
    monkeypatch.undo()
    assert steps.sae_precollect_wants(ctx) == {} and steps.transcoder_precollect_wants(ctx) == {}
