"""Views of a graph (backend/circuits/view.py): the prefix rule the browser and the page share, pins / hides / error
nodes / labels, the link form and its refusals, saved views, the Neuronpedia JSON round trip with pins, supernodes and
labels, reading a circuit-tracer JSON, read-only mode, and graph nodes turned into interventions."""

from __future__ import annotations

import json
import math
import random
import shutil
from pathlib import Path

import pytest
from circuit_fixtures import make_graph

from backend.circuits.export.neuronpedia import to_neuronpedia_json
from backend.circuits.export.neuronpedia_read import graph_from_json, import_graph, parse_json
from backend.circuits.prune import _starts, in_prefix, ranking
from backend.circuits.view import (
    MAX_PARAM_CHARS,
    ViewState,
    apply_view,
    from_dict,
    from_params,
    to_params,
)
from backend.errors import InputError, StoreError


def _shortest_prefix(scores: list[float], t: float) -> set[int]:
    """Independent: walk the scores in descending order (stable) until their running sum reaches t of the total."""
    s = [max(0.0, x) for x in scores]
    order = sorted(range(len(s)), key=lambda i: -s[i])
    total = sum(s)
    if t >= 1:
        return set(range(len(s)))
    if total <= 0:
        return set()
    out, running = set(), 0.0
    for i in order:
        out.add(i)
        running += s[i]
        if running >= t * total:
            break
    return out


@pytest.mark.parametrize("seed", range(5))
def test_prefix_starts_select_the_shortest_prefix(seed: int) -> None:
    import torch

    rng = random.Random(seed)
    scores = [rng.choice([0.0, rng.expovariate(1.0)]) for _ in range(40)]
    start, _ = _starts(torch.tensor(scores, dtype=torch.float64))
    for t in (0.0, 0.1, 0.37, 0.5, 0.8, 0.99, 1.0):
        assert set(map(int, in_prefix(start, t).nonzero()[0])) == _shortest_prefix(scores, t), t


def test_view_pins_hides_errors_and_labels() -> None:
    g = make_graph()
    ranked = ranking(g)
    base = apply_view(ranked, ViewState(node_threshold=0.5, edge_threshold=0.9))
    shown = set(base.nodes["node_id"])
    outside = sorted(set(g.nodes["node_id"]) - shown)
    assert outside, "the thresholds should leave something out"
    pin = next(n for n in outside if ((g.edges["source"] == n) & g.edges["target"].isin(shown)).any())
    hide = next(n for n in sorted(shown) if n != g.target_id)
    view = apply_view(ranked, ViewState(node_threshold=0.5, edge_threshold=0.9, pinned=(pin,),
                                        hidden=(hide, g.target_id), labels=((pin, "my label"),)))
    ids = set(view.nodes["node_id"])
    assert pin in ids and hide not in ids and g.target_id in ids  # the target cannot be hidden
    assert ((view.edges["source"] == pin) | (view.edges["target"] == pin)).any()  # a pinned node keeps its edges
    assert view.nodes.set_index("node_id").loc[pin, "label"] == "my label"
    assert set(view.edges["source"]) | set(view.edges["target"]) <= ids
    no_errors = apply_view(ranked, ViewState(node_threshold=1.0, edge_threshold=0.99, show_errors=False))
    assert not no_errors.nodes["kind"].isin(["mlp_error", "attn_error"]).any()
    assert no_errors.metadata["pruning"]["hidden"]


def test_link_form_round_trips_and_refuses_bad_values() -> None:
    g = make_graph()
    known = set(g.nodes["node_id"])
    state = ViewState(node_threshold=0.55, edge_threshold=0.9, pinned=("T0_5_17",), hidden=("M1_5",),
                      supernodes=(("say Paris", ("T1_5_1034", "T2_5_77")),),
                      labels=(("A2_5_42", 'label <b>&"quotes"'),), selected="T0_2_5", show_errors=False,
                      search="capital")
    params = {k: v for k, v in to_params(state).items() if v is not None}
    back, problems = from_params(params, known)
    assert problems == [] and back == state
    assert to_params(ViewState()) == dict.fromkeys(to_params(ViewState()), None)  # defaults leave the link short

    cases = {"nt": "1.5", "et": "abc", "pin": "T0_5_17,<script>", "hide": "T9_9_9", "sn": "[[\"x\"", "lbl": "[1]",
             "node": "nope"}
    state, problems = from_params(cases, known)
    assert state == ViewState() and len(problems) == len(cases)
    assert all(p.endswith("it was left out.") and "\n" not in p for p in problems)
    _, problems = from_params({"q": "x" * (MAX_PARAM_CHARS + 1)}, known)
    assert "characters long" in problems[0]
    _, problems = from_dict({"pinned": ["T0_5_17"] * 101}, known)
    assert "at most 100" in problems[0]


def test_neuronpedia_round_trip_keeps_nodes_edges_pins_supernodes_and_labels() -> None:
    g = make_graph()
    state = ViewState(node_threshold=1.0, edge_threshold=0.99, pinned=("T0_2_5", "A2_4_9"),
                      supernodes=(("late", ("T1_5_1034", "T2_5_77")), ("attn", ("A2_5_42",))),
                      labels=(("T0_5_17", "capital <city> & co"),), selected="T1_5_8")
    view = apply_view(ranking(g), state)
    doc = json.loads(json.dumps(to_neuronpedia_json(view), allow_nan=False))
    assert len(doc["qParams"]["pinnedIds"]) == 2 and doc["qParams"]["supernodes"][0][0] == "late"
    assert {n["clerp"] for n in doc["nodes"]} >= {"capital <city> & co"}
    graph, v = graph_from_json(parse_json(json.dumps(doc)))
    assert sorted(graph.nodes["node_id"]) == sorted(view.nodes["node_id"])
    ours = view.edges.set_index(["source", "target"])["weight"].sort_index()
    theirs = graph.edges.set_index(["source", "target"])["weight"].sort_index()
    assert list(ours.index) == list(theirs.index)
    assert max(abs(a - b) for a, b in zip(ours, theirs)) < 1e-12
    back, problems = from_dict(v, set(graph.nodes["node_id"]))
    assert problems == []
    assert back.pinned == state.pinned and back.supernodes == state.supernodes and back.labels == state.labels
    assert back.selected == "T1_5_8"
    assert graph.target_id == g.target_id
    labels = dict(zip(graph.nodes["node_id"], graph.nodes["label"]))
    assert labels["T0_5_17"] == "capital <city> & co"
    assert labels["T0_2_5"] == dict(zip(g.nodes["node_id"], g.nodes["label"]))["T0_2_5"]


def _circuit_tracer_doc() -> dict:
    """A graph JSON as circuit-tracer's create_graph_files writes it (node ids ``{layer}_{feature}_{pos}``,
    embeddings ``E_{token}_{pos}``, errors ``{layer}_-1_{pos}``, one logit node per top token, ``layer`` a string)."""

    def node(node_id, ftype, layer, ctx, feature, clerp="", target=False, prob=0.0):
        return {"node_id": node_id, "feature": feature, "layer": layer, "ctx_idx": ctx, "feature_type": ftype,
                "token_prob": prob, "is_target_logit": target, "run_idx": 0, "reverse_ctx_idx": 0,
                "jsNodeId": node_id, "clerp": clerp, "influence": 0.5, "activation": 1.0}

    nodes = [node("E_651_1", "embedding", "E", 1, 1), node("E_9_2", "embedding", "E", 2, 2),
             node("0_123_1", "cross layer transcoder", "0", 1, 999, "says France"),
             node("1_7_2", "cross layer transcoder", "1", 2, 998),
             node("1_-1_2", "mlp reconstruction error", "1", 2, -1),
             node("3_5000_2", "logit", "3", 2, 5000, 'Output " Paris" (p=0.612)', True, 0.612),
             node("3_77_2", "logit", "3", 2, 77, 'Output " Lyon" (p=0.05)', False, 0.05)]
    links = [{"source": "E_651_1", "target": "0_123_1", "weight": 1.5},
             {"source": "0_123_1", "target": "1_7_2", "weight": 0.75},
             {"source": "E_9_2", "target": "1_7_2", "weight": -0.25},
             {"source": "1_-1_2", "target": "3_5000_2", "weight": 0.3},
             {"source": "1_7_2", "target": "3_5000_2", "weight": 2.0},
             {"source": "1_7_2", "target": "3_77_2", "weight": 0.1}]
    return {"metadata": {"slug": "ct", "scan": "gemma-2-2b", "prompt": "<bos>The capital of France is",
                         "prompt_tokens": ["<bos>", "The", " capital"], "transcoder_list": []},
            "qParams": {"pinnedIds": ["1_7_2"], "supernodes": [["France", "0_123_1", "E_651_1"]], "linkType": "both",
                        "clickedId": "", "sg_pos": ""},
            "nodes": nodes, "links": links}


def test_reads_a_circuit_tracer_json() -> None:
    graph, view = graph_from_json(parse_json(json.dumps(_circuit_tracer_doc())))
    assert sorted(graph.nodes["node_id"]) == sorted(["E_1", "E_2", "T0_1_123", "T1_2_7", "M1_2", "L_5000"])
    assert graph.target_id == "L_5000"  # the flagged logit; the other logit and its link are left out
    assert len(graph.edges) == 5
    w = graph.edges.set_index(["source", "target"])["weight"]
    assert w[("T0_1_123", "T1_2_7")] == 0.75 and w[("E_2", "T1_2_7")] == -0.25
    assert graph.metadata["model"] == "gemma-2-2b" and graph.metadata["token_ids"][1:] == [651, 9]
    assert graph.metadata["target"]["token"] == " Paris"
    assert dict(zip(graph.nodes["node_id"], graph.nodes["label"]))["T0_1_123"] == "says France"
    assert view["pinned"] == ["T1_2_7"] and view["supernodes"] == [["France", "T0_1_123", "E_1"]]
    # and it can be viewed and pruned like a graph built here
    shown = apply_view(ranking(graph), ViewState(node_threshold=1.0, edge_threshold=0.99))
    assert set(shown.nodes["node_id"]) == set(graph.nodes["node_id"])


@pytest.mark.parametrize("data, words", [
    (b"not json", "not valid JSON"),
    ("[" * 100_000 + "]" * 100_000, "not valid JSON"),
    (json.dumps({"nodes": {}, "links": []}), "no 'nodes' and 'links'"),
    (json.dumps({"nodes": [], "links": []}), "no logit node"),
    (json.dumps({**_circuit_tracer_doc(), "nodes": [{**n, "feature_type": "<img src=x>"} if i == 2 else n
                                                    for i, n in enumerate(_circuit_tracer_doc()["nodes"])]}),
     "does not know"),
    (json.dumps({**_circuit_tracer_doc(), "links": [{"source": "E_651_1", "target": "nowhere", "weight": 1}]}),
     "not in nodes"),
    (json.dumps({**_circuit_tracer_doc(), "links": [{"source": "E_651_1", "target": "0_123_1", "weight": "1e999"}]}),
     "finite number"),
])
def test_hostile_json_is_refused_with_a_sentence(data, words) -> None:
    with pytest.raises(InputError) as err:
        graph_from_json(parse_json(data))
    assert words in str(err.value) and str(err.value).count(".") >= 1 and "\n" not in str(err.value)


def test_too_big_json_is_refused_before_parsing(monkeypatch) -> None:
    from backend.circuits.export import neuronpedia_read

    monkeypatch.setattr(neuronpedia_read, "MAX_BYTES", 100)
    with pytest.raises(InputError, match="MB"):
        parse_json("{" + " " * 200 + "}")


def _store_copy(tiny_store: Path, tmp_path: Path) -> Path:
    target = tmp_path / "s.duckdb"
    shutil.copy(tiny_store, target)
    return target


def test_import_saves_graph_and_view_and_api_and_cli_read_them(tiny_store: Path, tmp_path: Path) -> None:
    from backend.api import open_workspace
    from backend.circuits.storage import read_graph, read_view
    from backend.cli import main
    from backend.store.access import reading

    store = _store_copy(tiny_store, tmp_path)
    path = tmp_path / "ct.json"
    path.write_text(json.dumps(_circuit_tracer_doc()))
    assert main(["import-graph", str(path), "--store", str(store), "--model", "tiny-llama"]) == 0
    ws = open_workspace(store, model="tiny-llama")
    gid = ws.import_graph(path)  # the same graph again: same id, replaced
    with reading(store) as con:
        graph = read_graph(con, gid)
        view = read_view(con, gid)
    assert "L_5000" in set(graph.nodes["node_id"])
    assert view["pinned"] == ["T1_2_7"] and view["supernodes"] == [["France", "T0_1_123", "E_1"]]
    assert ws.stored_view(gid) == view
    bad = tmp_path / "bad.json"
    bad.write_text("{")
    assert main(["import-graph", str(bad), "--store", str(store)]) == 2


def test_read_only_mode_refuses_every_save(tiny_store: Path, tmp_path: Path, monkeypatch) -> None:
    from backend.circuits.storage import list_graphs, save_graph, save_view
    from backend.store.access import READ_ONLY_MESSAGE, reading

    store = _store_copy(tiny_store, tmp_path)
    with reading(store) as con:
        before = len(list_graphs(con))
    monkeypatch.setenv("CIRCUITSCOPE_READ_ONLY", "1")
    with pytest.raises(StoreError) as err:
        save_graph(store, make_graph(), source="test")
    assert str(err.value) == READ_ONLY_MESSAGE
    with pytest.raises(StoreError):
        save_view(store, "g-x", ViewState().to_dict(), "tiny-llama")
    with pytest.raises(StoreError):
        import_graph(store, json.dumps(_circuit_tracer_doc()))
    monkeypatch.setenv("CIRCUITSCOPE_READ_ONLY", "0")
    with reading(store) as con:
        assert len(list_graphs(con)) == before
    assert not any(store.parent.glob(".s.duckdb.saves/*.duckdb"))


def test_saved_view_round_trips(tiny_store: Path, tmp_path: Path) -> None:
    from backend.circuits.storage import read_view, save_graph, save_view
    from backend.store.access import reading

    store = _store_copy(tiny_store, tmp_path)
    g = make_graph()
    state = ViewState(pinned=("T0_2_5",), supernodes=(("a", ("T0_5_17", "T1_5_8")),), labels=(("E_1", "x"),))
    gid = save_graph(store, g, source="test", view=state.to_dict())
    with reading(store) as con:
        assert from_dict(read_view(con, gid), set(g.nodes["node_id"]))[0] == state
    later = ViewState(node_threshold=0.3)
    save_view(store, gid, later.to_dict(), "tiny-llama")
    with reading(store) as con:
        assert from_dict(read_view(con, gid))[0] == later
        assert read_view(con, "g-none") is None


def test_graph_nodes_become_zero_interventions() -> None:
    from backend.interventions.spec import from_graph_nodes, parse, render

    ivs, skipped = from_graph_nodes(["T12_3_1034", "A8_5_77", "E_1", "M3_4", "AE2_5", "L_651", "T12_3_1034"])
    text = render(ivs)
    assert text == "transcoder:12:1034@3=zero;attn:8:77@5=zero"
    assert [(i.kind, i.layer, i.index, i.positions, i.mode) for i in parse(text)] == [
        ("transcoder", 12, 1034, (3,), "zero"), ("attn", 8, 77, (5,), "zero")]
    assert skipped == ["E_1", "M3_4", "AE2_5", "L_651"]
    assert not math.isnan(len(ivs))


def test_a_v4_store_without_saved_views_opens_and_gains_them_on_save(tiny_store: Path, tmp_path: Path) -> None:
    import duckdb

    from backend.circuits.storage import list_graphs, read_view, save_view
    from backend.store.access import reading

    store = _store_copy(tiny_store, tmp_path)
    con = duckdb.connect(str(store))
    con.execute("DROP TABLE graph_views")
    con.execute("UPDATE meta SET value = '4' WHERE key = 'schema_version'")
    con.close()
    with reading(store) as con:
        gid = str(list_graphs(con)["graph_id"].iloc[0])
        assert read_view(con, gid) is None
    save_view(store, gid, ViewState(node_threshold=0.4).to_dict(), "tiny-llama")
    with reading(store) as con:
        assert from_dict(read_view(con, gid))[0].node_threshold == 0.4
