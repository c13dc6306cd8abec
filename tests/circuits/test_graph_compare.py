"""Comparing two attribution graphs (backend.circuits.compare) on a hand-built pair of tiny graphs whose influences
are worked out by hand below (no model, no code under test in the expectations)."""

from __future__ import annotations

import math

import pandas as pd
import pytest

from backend.circuits.compare import compare_graphs, node_key
from backend.circuits.graph import EDGE_COLUMNS, NODE_COLUMNS, Graph


def _graph(prompt: str, nodes: list[tuple[str, str, int, int, int | None]], edges: list[tuple[str, str, float]],
           target: str) -> Graph:
    """nodes: (node_id, kind, layer, pos, feature)."""
    rows = [{"node_id": n, "kind": k, "layer": layer, "pos": pos, "feature": f, "activation": 1.0, "value": 1.0,
             "bias": 0.0, "attribution": 0.0, "influence": math.nan, "label": n, "dict_id": None,
             "is_target": n == target} for n, k, layer, pos, f in nodes]
    frame = pd.DataFrame(rows, columns=list(NODE_COLUMNS))
    frame["feature"] = frame["feature"].astype("Int64")
    e = pd.DataFrame([{"source": s, "target": t, "weight": w, "source_factor": math.nan, "invariant": math.nan,
                       "norm_factor": math.nan} for s, t, w in edges], columns=list(EDGE_COLUMNS))
    return Graph(nodes=frame, edges=e, metadata={"prompt": prompt, "tokens": ["<s>", "x", "y"]})


# A: E_1 (token 7) -> T0_1_5 -> target, and the MLP-0 error -> target.
# Target's inputs |3| and |1|: T0_1_5 carries 3/4, M0_1 1/4; E_1 reaches it only through T0_1_5: 3/4 · 1.
GRAPH_A = _graph("a", [("E_1", "embedding", -1, 1, 7), ("T0_1_5", "transcoder", 0, 1, 5), ("M0_1", "mlp_error", 0, 1, None),
                       ("L_9", "logit", 2, 2, 9)],
                 [("E_1", "T0_1_5", 2.0), ("T0_1_5", "L_9", 3.0), ("M0_1", "L_9", 1.0)], "L_9")
# B: the same token at position 2, feature 5 of layer 0 at two positions, feature 6 (only B), an attention feature.
# Target's inputs |1|, |-2|, |1|: T0_2_5 1/4, T0_1_6 2/4, A1_2_3 1/4. T0_2_5's inputs: E_2 and T0_1_5, 1/2 each,
# so T0_1_5 gets 1/4 · 1/2 = 1/8 and E_2 gets 1/4 · 1/2 (via T0_2_5) + 1/4 (via A1_2_3) = 3/8.
GRAPH_B = _graph("b", [("E_2", "embedding", -1, 2, 7), ("T0_2_5", "transcoder", 0, 2, 5), ("T0_1_5", "transcoder", 0, 1, 5),
                       ("T0_1_6", "transcoder", 0, 1, 6), ("A1_2_3", "attn_feature", 1, 2, 3), ("L_9", "logit", 2, 2, 9)],
                 [("E_2", "T0_2_5", 1.0), ("T0_1_5", "T0_2_5", 1.0), ("T0_2_5", "L_9", 1.0), ("T0_1_6", "L_9", -2.0),
                  ("E_2", "A1_2_3", 1.0), ("A1_2_3", "L_9", 1.0)], "L_9")


def test_keys_are_position_independent() -> None:
    assert node_key({"kind": "transcoder", "layer": 3, "pos": 4, "feature": 12}) == \
        node_key({"kind": "transcoder", "layer": 3, "pos": 9, "feature": 12})
    assert node_key({"kind": "embedding", "layer": -1, "pos": 1, "feature": 7}) != \
        node_key({"kind": "embedding", "layer": -1, "pos": 1, "feature": 8})
    assert node_key({"kind": "mlp_error", "layer": 2, "pos": 1, "feature": pd.NA}) == \
        node_key({"kind": "mlp_error", "layer": 2, "pos": 5, "feature": pd.NA})
    assert node_key({"kind": "mlp_error", "layer": 2, "pos": 1, "feature": pd.NA}) != \
        node_key({"kind": "attn_error", "layer": 2, "pos": 1, "feature": pd.NA})


def test_shared_and_unique_nodes() -> None:
    cmp = compare_graphs(GRAPH_A, GRAPH_B)
    assert set(cmp.shared["key"]) == {("transcoder", 0, 5), ("embedding", 7), ("logit", 9)}
    assert set(cmp.only_a["key"]) == {("mlp_error", 0)}
    assert set(cmp.only_b["key"]) == {("transcoder", 0, 6), ("attn_feature", 1, 3)}
    assert cmp.counts() == {"shared": 3, "only_a": 1, "only_b": 2}
    sets = cmp.node_sets()
    assert sets["shared_a"] == {"E_1", "T0_1_5", "L_9"}
    assert sets["shared_b"] == {"E_2", "T0_2_5", "T0_1_5", "L_9"}  # both positions of feature 5
    assert sets["only_a"] == {"M0_1"} and sets["only_b"] == {"T0_1_6", "A1_2_3"}


def test_influence_change_is_summed_per_key_and_ranked() -> None:
    cmp = compare_graphs(GRAPH_A, GRAPH_B)
    row = {k: r for k, r in zip(cmp.table["key"], cmp.table.to_dict("records"))}
    expected = {("transcoder", 0, 5): (3 / 4, 1 / 4 + 1 / 8), ("embedding", 7): (3 / 4, 3 / 8),
                ("mlp_error", 0): (1 / 4, 0.0), ("transcoder", 0, 6): (0.0, 2 / 4), ("attn_feature", 1, 3): (0.0, 1 / 4),
                ("logit", 9): (1.0, 1.0)}
    for key, (ia, ib) in expected.items():
        assert row[key]["influence_a"] == pytest.approx(ia)
        assert row[key]["influence_b"] == pytest.approx(ib)
        assert row[key]["change"] == pytest.approx(ib - ia)
    changes = [abs(c) for c in cmp.table["change"]]
    assert changes == sorted(changes, reverse=True)
    assert cmp.changed(1)["key"].iloc[0] == ("transcoder", 0, 6)  # |+1/2| is the largest change
    assert len(cmp.changed(3)) == 3


def test_a_graph_compared_with_itself_shares_everything() -> None:
    cmp = compare_graphs(GRAPH_B, GRAPH_B)
    assert cmp.counts() == {"shared": 5, "only_a": 0, "only_b": 0}
    assert (cmp.table["change"].abs() < 1e-12).all()


# ---------------------------------------------------------------------------------------------------------------
# The API and the CLI on the test store: each gives what the comparison of the graphs built directly here gives.

PROMPT_A = "When Mary and John went to the store, John gave a drink to"
PROMPT_B = "When Alice and Bob went to the park, Bob gave a ball to"


def _direct(tiny_model, tiny_store):  # type: ignore[no-untyped-def]
    from backend.circuits.build import build_graph
    from backend.circuits.prune import prune
    from backend.dictionaries.storage import graph_dictionaries
    from backend.store.access import reading

    with reading(tiny_store) as con:
        transcoders, saes = graph_dictionaries(con, "tiny-llama")
    graphs = [prune(build_graph(tiny_model, p, transcoders, saes, model_name="tiny-llama")) for p in (PROMPT_A, PROMPT_B)]
    return graphs


def test_api_compare_graphs_matches_the_graphs_built_directly(tiny_model, tiny_store) -> None:  # type: ignore[no-untyped-def]
    from backend.api import open_workspace

    a, b = _direct(tiny_model, tiny_store)
    result = open_workspace(tiny_store, model="tiny-llama").compare_graphs(PROMPT_A, PROMPT_B)
    assert result.counts() == compare_graphs(a, b).counts()
    # every key is where the built graphs put it
    keys_a = {node_key(r) for r in a.nodes.to_dict("records")}
    keys_b = {node_key(r) for r in b.nodes.to_dict("records")}
    assert set(result.shared["key"]) == keys_a & keys_b
    assert set(result.only_a["key"]) == keys_a - keys_b and set(result.only_b["key"]) == keys_b - keys_a


def test_cli_compare_graphs_prints_counts_and_changes(tiny_model, tiny_store, capsys) -> None:  # type: ignore[no-untyped-def]
    from backend.cli import main

    a, b = _direct(tiny_model, tiny_store)
    expected = compare_graphs(a, b)
    args = ["compare-graphs", "--store", str(tiny_store), "--model", "tiny-llama"]
    assert main([*args, "--prompt-a", PROMPT_A, "--prompt-b", PROMPT_B, "--top", "3"]) == 0
    out = capsys.readouterr().out
    c = expected.counts()
    assert f"{c['shared']} shared, {c['only_a']} only in A, {c['only_b']} only in B" in out
    assert expected.changed(1)["text"].iloc[0] in out
    assert main([*args, "--prompt-a", PROMPT_A]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "--prompt-b" in err and "\n" not in err
