"""Ten users at once: each gets the answer to its own prompt — its tokens, and the same
per-token features this process computes on its own — and the server loads the model once for all of them
(Streamlit's cache_resource, backend.ui.get_model). Times are reported by ``make bench`` (benchmarks/e2e_bench.py),
never asserted here."""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import pytest
from e2e_harness import SessionResult, StreamlitServer, chromium_problem, distinct_prompts, run_prompt_sessions
from tiny_stores import TEST_MODEL

from backend.features import queries as feature_queries
from backend.store.access import reading

pytestmark = pytest.mark.e2e
N_SESSIONS = 10
TOP_N = 5  # pages/prompt_explorer.py FEATURE_TOP_N


@functools.cache
def _saes(store: Path) -> dict[int, Any]:
    """The store's attention SAEs by layer."""
    from backend.dictionaries.storage import load_dictionary

    with reading(store) as con:
        dicts = feature_queries.feature_dictionaries(con, kind="attn_sae")
        assert dicts["layer"].is_unique  # one SAE per layer: the page's overview shows exactly these
        return {int(row.layer): load_dictionary(con, row.dict_id) for row in dicts.itertuples()}


def _expected_features(model: Any, store: Path, prompt: str) -> dict[str, list[tuple[list[int], list[float]]]]:
    """Per SAE layer ("L1") and token (BOS first): the top feature ids and activations, one more than the page
    shows (to see ties at the cut), computed here, independently of the server."""
    from backend.features.live import analyze_prompt
    from backend.inputs.prompts import encode_prompt

    res = analyze_prompt(model, _saes(store), encode_prompt(model, prompt).ids, top_n=TOP_N + 1)
    return {f"L{layer}": [([int(f) for f in lf.features[p]], [float(a) for a in lf.acts[p]])
                          for p in range(len(res.token_ids))]
            for layer, lf in sorted(res.layers.items())}


def _mismatches(result: SessionResult, expected: dict[str, list[tuple[list[int], list[float]]]]) -> list[str]:
    """Where the page's features disagree with ``expected``: activations to the 3 decimals shown; feature ids
    wherever no other feature's activation is within 1e-4 (float noise may order such near-ties either way)."""
    shown = result.features or {}
    if sorted(shown) != sorted(expected):
        return [f"layers {sorted(shown)} shown, {sorted(expected)} expected"]
    out = []
    for layer, per_pos in expected.items():
        if len(shown[layer]) != len(per_pos):
            out.append(f"{layer}: {len(shown[layer])} tokens shown, {len(per_pos)} expected")
            continue
        for p, (page_feats, (ids, acts)) in enumerate(zip(shown[layer], per_pos)):
            want = [(f, a) for f, a in zip(ids, acts) if f >= 0][:TOP_N] if p > 0 else []
            if len(page_feats) != len(want):
                out.append(f"{layer} pos {p}: {page_feats} vs {want}")
                continue
            for rank, ((f, a), (ef, ea)) in enumerate(zip(page_feats, want)):
                tied = any(abs(ea - other) < 1e-4 for j, other in enumerate(acts) if j != rank)
                if abs(a - ea) > 0.0006 or (f != ef and not tied):
                    out.append(f"{layer} pos {p} rank {rank}: shown #{f} {a}, expected #{ef} {ea:.4f}")
    return out


def test_ten_concurrent_sessions_get_their_own_answers(server: StreamlitServer, tiny_store: Path, tiny_model: Any,
                                                        artifacts: Path) -> None:
    # This file sorts first in tests/e2e, so in a full run the ten sessions reach a server that has loaded nothing
    # yet (the hardest case for "load once"); run alone or later it checks the same with the model cached.
    problem = chromium_problem()
    if problem:
        pytest.fail(problem, pytrace=False)
    prompts = distinct_prompts(N_SESSIONS)
    results = run_prompt_sessions(server.url, prompts, artifacts / "concurrent")
    assert [r.prompt for r in results] == prompts
    wrong = [(r.prompt, r.strip, r.tokens_shown, r.problems, r.dialogs) for r in results if not r.correct]
    assert wrong == []  # every session shows its own prompt's tokens and features at every token, no error
    mixed = {r.prompt: m for r in results
             if (m := _mismatches(r, _expected_features(tiny_model, tiny_store, r.prompt)))}
    assert mixed == {}  # and the features of its own prompt, not another session's
    assert server.model_loads() == [TEST_MODEL]  # one load for all sessions of this server
