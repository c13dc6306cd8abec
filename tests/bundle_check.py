"""Checks of a graph bundle's files against independent queries of the store (used by tests/features/test_exports.py and
the browser test of the bundle download)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from backend.store.access import reading


def check_bundle(files: dict[str, Any], store: Path, graph_id: str) -> None:
    """Every file of a bundle parses and holds what independent queries of the store give (also used by the
    browser test)."""
    from backend.circuits.export.neuronpedia import cantor, validate_neuronpedia
    from backend.features.queries import WINDOW_AFTER, WINDOW_BEFORE

    index = files["graph-metadata.json"]["graphs"]
    assert len(index) == 1
    graph = files[f"{index[0]['slug']}.json"]
    assert validate_neuronpedia(graph) == []
    assert graph["metadata"]["feature_details"]["feature_json_base_url"] == "/features/viewer"
    feature_nodes = [n for n in graph["nodes"] if n["kind"] in ("transcoder", "attn_feature")]
    assert feature_nodes and all(n["feature_json"] in files for n in feature_nodes)
    features = {p: d for p, d in files.items() if p.startswith("features/") and not p.startswith("features/viewer/")}
    assert set(features) == {n["feature_json"] for n in feature_nodes}
    viewer = {p: d for p, d in files.items() if p.startswith("features/viewer/")}
    assert len(viewer) == len({n["feature"] for n in feature_nodes if n["kind"] == "transcoder"})
    with reading(store) as con:
        assert sorted(n["circuitscope_id"] for n in graph["nodes"]) == sorted(
            r[0] for r in con.execute("SELECT node_id FROM graph_nodes WHERE graph_id = ?", [graph_id]).fetchall()
            if r[0] in {m["circuitscope_id"] for m in graph["nodes"]})
        for path, d in features.items():
            dict_id, f = d["dict_id"], d["feature"]
            s = con.execute("SELECT f.density, f.max_act, f.n_active, d.layer FROM features f JOIN dictionaries d "
                            "USING (dict_id) WHERE dict_id = ? AND feature = ?", [dict_id, f]).fetchall()[0]
            assert d["activation_frequency"] == pytest.approx(s[0]) and d["act_max"] == pytest.approx(s[1])
            assert d["n_active"] == s[2] and d["layer"] == s[3] and d["index"] == cantor(s[3], f)
            hist = con.execute("SELECT lo, count FROM feature_histograms WHERE dict_id = ? AND feature = ? ORDER BY "
                               "bin", [dict_id, f]).fetchall()
            assert d["histogram"]["count"] == [c for _, c in hist] and sum(d["histogram"]["count"]) == s[2]
            assert d["activation_range"]["min"] == pytest.approx(min(lo for lo, _ in hist))
            for kind, key in (("promoted", "top_logits"), ("suppressed", "bottom_logits")):
                want = con.execute("SELECT v.token_str, l.value FROM feature_logits l JOIN vocab v ON v.token_id = "
                                   "l.token_id AND v.model = (SELECT model FROM dictionaries WHERE dict_id = ?) "
                                   "WHERE l.dict_id = ? AND l.feature = ? AND l.kind = ? ORDER BY l.rank LIMIT 10",
                                   [dict_id, dict_id, f, kind]).fetchall()
                assert d[key + "_values"] == pytest.approx([v for _, v in want])
                assert len(d[key]) == len(want)
            auto = con.execute("SELECT label FROM feature_labels WHERE dict_id = ? AND feature = ?",
                               [dict_id, f]).fetchall()
            user = con.execute("SELECT label FROM user_labels WHERE dict_id = ? AND feature = ? ORDER BY created_at "
                               "DESC LIMIT 1", [dict_id, f]).fetchall()
            if user and user[0][0]:
                assert d["label"] == user[0][0] and d["label_is_automatic"] is False
            else:
                assert d["label"] == (auto[0][0] if auto else None)
            top = d["examples_quantiles"][0]
            assert top["quantile_name"] == "Top activations" and top["examples"]
            acts = [e["act"] for e in top["examples"]]
            assert acts == sorted(acts, reverse=True) and acts[0] == pytest.approx(s[1])
            for e in top["examples"]:
                # the shown activation at the example's token is the stored one, and no two windows overlap
                stored = con.execute("SELECT act FROM feature_activations WHERE dict_id = ? AND feature = ? AND "
                                     "context_id = ? AND pos = ?", [dict_id, f, e["context_id"], e["pos"]]).fetchall()
                assert e["tokens_acts_list"][e["train_token_ind"]] == pytest.approx(stored[0][0])
                assert len(e["tokens"]) == len(e["tokens_acts_list"])
            for a, b in ((a, b) for i, a in enumerate(top["examples"]) for b in top["examples"][i + 1:]):
                assert a["context_id"] != b["context_id"] or abs(a["pos"] - b["pos"]) > WINDOW_BEFORE + WINDOW_AFTER
            assert path == f"features/{dict_id.replace('/', '__')}/{f}.json"
