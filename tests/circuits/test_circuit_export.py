"""Drawing and export of attribution graphs (backend.circuits.layout / figure / export) on a hand-built graph.

The SVG / PNG tests render through kaleido with Debian's chromium (``make browser``); they are skipped when
/usr/bin/chromium is missing (the error path itself is tested without a browser).
"""

from __future__ import annotations

import io
import json
import os
import shutil
import struct
import subprocess
import xml.etree.ElementTree as ET

import networkx as nx
import pytest
from circuit_fixtures import HOSTILE_HTML, QUOTES_TOKEN, TOKENS, make_graph

from backend.circuits import export as ex
from backend.circuits.export import dot, graphml, images, neuronpedia
from backend.circuits.figure import KIND_STYLE, escape_text, figure
from backend.circuits.graph import NODE_KINDS
from backend.circuits.layout import columns, layout, row_labels, row_of
from backend.errors import CircuitscopeError, InputError

HAS_CHROMIUM = os.access(images.CHROMIUM, os.X_OK)
needs_chromium = pytest.mark.skipif(not HAS_CHROMIUM, reason="needs /usr/bin/chromium (make browser)")


@pytest.fixture(scope="module")
def graph():
    return make_graph()


@pytest.fixture(scope="module", autouse=True)
def _stop_browser():
    yield
    images.close_renderer()  # the chromium started for this module's images


# ------------------------------------------------------------------------------------------------ fixture


def test_fixture_is_realistic(graph):
    assert set(graph.nodes["kind"]) == set(NODE_KINDS)
    assert graph.target_id == "L_651"
    assert (graph.edges["weight"] > 0).any() and (graph.edges["weight"] < 0).any()
    ids = set(graph.nodes["node_id"])
    assert set(graph.edges["source"]) <= ids and set(graph.edges["target"]) <= ids
    tc = graph.edges.dropna(subset=["source_factor"])
    assert len(tc) >= 3
    kinds = dict(zip(graph.nodes["node_id"], graph.nodes["kind"]))
    assert all(kinds[s] == kinds[t] == "transcoder" for s, t in zip(tc["source"], tc["target"]))
    assert (tc["weight"] - tc["source_factor"] * tc["invariant"] * tc["norm_factor"]).abs().max() < 1e-12
    other = graph.edges[graph.edges["source_factor"].isna()]
    assert other[["invariant", "norm_factor"]].isna().all().all()
    assert graph.nodes["influence"].notna().all()


# ------------------------------------------------------------------------------------------------- layout


def test_layout_rows_and_columns(graph):
    pos = layout(graph)
    cols = columns(graph)
    assert set(pos) == set(graph.nodes["node_id"])
    # rows without nodes are collapsed: y counts the non-empty rows below, in row order
    full_rows = {row["node_id"]: row_of(row["kind"], row["layer"], 3) for row in graph.nodes.to_dict("records")}
    used = sorted(set(full_rows.values()))
    for row in graph.nodes.to_dict("records"):
        x, y = pos[row["node_id"]]
        centre, width = cols[int(row["pos"])]
        assert abs(x - centre) <= 0.41 * width  # inside its token column
        assert y == used.index(full_rows[row["node_id"]])
    # columns tile the axis left to right without overlapping, each at least one unit wide
    lefts = [c - w / 2 for c, w in cols]
    assert lefts[0] == -0.5 and all(w >= 1.0 for _, w in cols)
    assert all(abs(lefts[i + 1] - (lefts[i] + cols[i][1])) < 1e-12 for i in range(len(cols) - 1))


def test_empty_layers_are_collapsed():
    g = make_graph()
    g = g.subgraph(set(g.nodes.loc[~g.nodes["kind"].isin(["head", "attn_feature", "attn_error"]), "node_id"]))
    ys = sorted({y for _, y in layout(g).values()})
    assert ys == list(range(len(ys)))  # no gap where the attention rows were
    rows = {row_of(r["kind"], r["layer"], 3) for r in g.nodes.to_dict("records")}
    assert len(ys) == len(rows) < len(row_labels(3))


def test_a_crowded_column_widens_so_its_nodes_keep_their_spacing():
    import pandas as pd

    from backend.circuits.layout import MAX_SPACING

    g = make_graph()
    extra = [dict(node_id=f"T1_5_{900 + i}", kind="transcoder", layer=1, pos=5, feature=900 + i, activation=0.1,
                  influence=0.001 * i, label=f"T1#{900 + i}", dict_id="tc/L1", is_target=False) for i in range(12)]
    g.nodes = pd.concat([g.nodes, pd.DataFrame(extra)], ignore_index=True)
    pos, cols = layout(g), columns(g)
    cell = sorted(x for nid, (x, y) in pos.items() if nid.startswith("T1_5_") or nid == "M1_5")
    gaps = [b - a for a, b in zip(cell, cell[1:])]
    assert min(gaps) == pytest.approx(MAX_SPACING)  # not squeezed: the column grew instead
    assert cols[5][1] > 1.0 and all(w == 1.0 for x, (_, w) in enumerate(cols) if x != 5)
    y = {nid: xy[1] for nid, xy in pos.items()}
    assert y["E_0"] < y["H0.1_5"] < y["T0_5_17"] < y["H1.3_5"] < y["T1_5_1034"] < y["A2_5_42"] < y["T2_5_77"]
    assert y["L_651"] == max(y.values())
    assert y["AE2_5"] == y["A2_5_42"] and y["M2_5"] == y["T2_5_77"]
    # a shared cell spreads its nodes, most influential (T1_5_1034: 0.33) leftmost
    cell = sorted(["T1_5_1034", "M1_5", "T1_5_8"], key=lambda n: pos[n][0])
    assert cell[0] == "T1_5_1034" and len({pos[n] for n in cell}) == 3
    assert row_labels(3) == ["emb", "L0 attn", "L0 mlp", "L1 attn", "L1 mlp", "L2 attn", "L2 mlp", "logit"]


def test_layout_is_deterministic_and_falls_back_to_activation():
    assert layout(make_graph()) == layout(make_graph())
    g = make_graph(with_influence=False)
    pos = layout(g)
    cell = sorted(["T1_5_1034", "M1_5", "T1_5_8"], key=lambda n: pos[n][0])
    assert cell == ["T1_5_1034", "M1_5", "T1_5_8"]  # activations 4.2 > 1.1 > 0.6


# ------------------------------------------------------------------------------------------------- figure


def test_escape_text_makes_html_inert():
    out = escape_text(HOSTILE_HTML)
    assert "<" not in out and ">" not in out
    assert out == "&lt;img src=x onerror=alert(1)&gt;"
    assert escape_text("a & b") == "a &amp; b"
    assert escape_text("&lt;") == "&amp;lt;"  # an entity in the token shows as typed, not decoded
    assert escape_text('say "hi"') == 'say "hi"'  # plotly would show &quot; literally
    out = escape_text("\u202eevil\u200b\x1b\n")
    assert "\u202e" not in out and "\u200b" not in out and "\x1b" not in out and "\n" not in out
    assert "U+202E" in out
    assert escape_text(" 👩\u200d🔬 café") == " 👩\u200d🔬 café"


def _node_traces(fig):
    return [t for t in fig.data if t.mode == "markers"]


def test_figure_traces_per_kind_and_customdata(graph):
    fig = figure(graph)
    traces = _node_traces(fig)
    assert [t.name for t in traces] == [KIND_STYLE[k]["name"] for k in NODE_KINDS]  # one per present kind
    assert sorted(i for t in traces for i in t.customdata) == sorted(graph.nodes["node_id"])
    kinds = dict(zip(graph.nodes["node_id"], graph.nodes["kind"]))
    for t, kind in zip(traces, NODE_KINDS):
        assert {kinds[i] for i in t.customdata} == {kind}
        assert len({t.marker.symbol}) == 1
    assert len({t.marker.symbol for t in traces}) == len(traces)
    # sizes follow |influence|: the biggest non-target transcoder is T2_5_77 (0.40)
    tc = traces[NODE_KINDS.index("transcoder")]
    sizes = dict(zip(tc.customdata, tc.marker.size))
    assert max(sizes, key=sizes.get) == "T2_5_77"
    # no trace without a kind present
    g = graph.subgraph([n for n in graph.nodes["node_id"] if not n.startswith(("H", "A"))])
    assert len(_node_traces(figure(g))) == len(NODE_KINDS) - 3


def test_figure_edges_colour_by_sign_and_few_traces(graph):
    fig = figure(graph)
    lines = [t for t in fig.data if t.mode == "lines"]
    pos_lines = [t for t in lines if t.name == "positive edge"]
    neg_lines = [t for t in lines if t.name == "negative edge"]
    assert pos_lines and neg_lines
    assert all("31, 119, 180" in t.line.color for t in pos_lines)
    assert all("214, 39, 40" in t.line.color for t in neg_lines)
    n_segments = sum(sum(1 for x in t.x if x is None) for t in lines)
    assert n_segments == len(graph.edges)
    assert sum(1 for t in lines if t.showlegend) == 2
    widths = sorted({t.line.width for t in lines})
    assert len(widths) > 1  # strong edges are drawn wider

    big = make_graph(extra_edges=3000)
    big_fig = figure(big)
    big_lines = [t for t in big_fig.data if t.mode == "lines"]
    assert len(big_lines) <= 8  # binned, never one trace per edge
    assert sum(sum(1 for x in t.x if x is None) for t in big_lines) == len(big.edges)


def test_figure_ticks_are_tokens_and_escaped(graph):
    fig = figure(graph, title="<script>alert(1)</script>")
    ticks = list(fig.layout.xaxis.ticktext)
    assert len(ticks) == len(TOKENS)
    assert ticks[1].startswith("&lt;img src=x onerror=alert(1)&gt;")
    assert all("<img" not in t and "<script" not in t for t in ticks)
    assert list(fig.layout.yaxis.ticktext) == row_labels(3)
    assert "<script" not in fig.layout.title.text
    for t in _node_traces(fig):
        for text in t.hovertext:
            assert "<img" not in text and "<script" not in text
    embedding = _node_traces(fig)[0]
    hover = dict(zip(embedding.customdata, embedding.hovertext))
    assert "&lt;img src=x onerror=alert(1)&gt;" in hover["E_1"]


def test_figure_hover_override_is_escaped(graph):
    fig = figure(graph, hover={"T1_5_1034": "top examples:\n<b>Paris</b> & London"})
    tc = _node_traces(fig)[NODE_KINDS.index("transcoder")]
    hover = dict(zip(tc.customdata, tc.hovertext))
    assert hover["T1_5_1034"] == "top examples:<br>&lt;b&gt;Paris&lt;/b&gt; &amp; London"
    assert "capital city" not in hover["T1_5_1034"] and "say Paris" in hover["T2_5_77"]


def test_figure_highlight_emphasises_and_fades(graph):
    plain = figure(graph)
    hl = figure(graph, highlight_nodes=["T2_5_77", "L_651"], highlight_edges=[("T1_5_1034", "T2_5_77")])
    assert plain.to_dict() != hl.to_dict()
    for t in _node_traces(hl):
        for nid, opacity in zip(t.customdata, t.marker.opacity):
            assert (opacity == 1.0) == (nid in {"T2_5_77", "L_651", "T1_5_1034"}), nid
    for t in _node_traces(plain):
        assert all(o == 1.0 for o in t.marker.opacity)
    lines = [t for t in hl.data if t.mode == "lines"]
    alphas = [float(t.line.color.rsplit(",", 1)[1].rstrip(")")) for t in lines]
    assert max(alphas) > 0.8 and min(alphas) < 0.1
    # given edges, exactly those are emphasised (not T1_5_1034 -> L_651, though both ends are highlighted)
    assert _strong_edges(hl) == 1
    # given only nodes, the edges among them are: T1_5_1034 -> T2_5_77, T2_5_77 -> L_651, T1_5_1034 -> L_651
    assert _strong_edges(figure(graph, highlight_nodes=["T1_5_1034", "T2_5_77", "L_651"])) == 3


def _strong_edges(fig) -> int:
    lines = [t for t in fig.data if t.mode == "lines"]
    strong = [t for t in lines if float(t.line.color.rsplit(",", 1)[1].rstrip(")")) > 0.3]
    return sum(sum(1 for x in t.x if x is None) for t in strong)


# ------------------------------------------------------------------------------------------------ GraphML


def test_graphml_round_trip(graph):
    text = graphml.to_graphml(graph)
    g = nx.read_graphml(io.StringIO(text))
    assert set(g.nodes) == set(graph.nodes["node_id"])
    assert g.number_of_edges() == len(graph.edges)
    for s, t, w in zip(graph.edges["source"], graph.edges["target"], graph.edges["weight"]):
        assert g.edges[s, t]["weight"] == pytest.approx(float(w), rel=1e-12)
    pos = layout(graph)
    for nid, (x, y) in pos.items():
        assert (g.nodes[nid]["x"], g.nodes[nid]["y"]) == pytest.approx((x, y))
    assert g.nodes["E_1"]["label"] == HOSTILE_HTML
    assert g.nodes["E_2"]["label"] == QUOTES_TOKEN
    assert "\\x1b" in g.nodes["E_3"]["label"]  # the control character is kept, escaped (XML cannot hold it)
    assert json.loads(g.graph["tokens_json"]) == TOKENS
    assert g.edges["T0_5_17", "T1_5_1034"]["invariant"] == pytest.approx(0.42)
    assert "invariant" not in g.edges["E_1", "T0_1_17"]


# ---------------------------------------------------------------------------------------------------- DOT


def _dot_nodes(parsed):
    return {n.get_name().strip('"'): n for n in parsed.get_nodes() if n.get_name() not in ("node", "edge", "graph")}


def test_dot_round_trip_and_quoting(graph):
    import pydot

    text = dot.to_dot(graph)
    parsed = pydot.graph_from_dot_data(text)
    assert parsed, "pydot could not parse the DOT"
    nodes = _dot_nodes(parsed[0])
    assert set(nodes) == set(graph.nodes["node_id"])
    assert len(parsed[0].get_edges()) == len(graph.edges)
    label = dot.dot_unquote(nodes["E_2"].get("label"))
    assert label == f"{QUOTES_TOKEN}\nE_2"  # quotes and backslashes survive
    assert dot.dot_unquote(nodes["E_1"].get("label")).startswith(HOSTILE_HTML)
    assert nodes["E_1"].get("label").startswith('"')  # quoted, so never read as an HTML-like <label>
    xy = {nid: tuple(float(v) for v in dot.dot_unquote(n.get("pos")).rstrip("!").split(",")) for nid, n in nodes.items()}
    expected = dot.dot_positions(graph)
    assert set(xy) == set(expected)
    assert all(xy[n] == pytest.approx(expected[n], abs=0.1) for n in xy)
    # same rows and left-to-right order as the plotly layout; nodes in a cell a full pitch apart
    pos = layout(graph)
    assert {n: y for n, (_, y) in xy.items()} == pytest.approx({n: y * dot.ROW_PITCH for n, (_, y) in pos.items()})
    cell = ["T1_5_1034", "M1_5", "T1_5_8"]
    assert sorted(cell, key=lambda n: xy[n][0]) == sorted(cell, key=lambda n: pos[n][0])
    assert xy["M1_5"][0] - xy["T1_5_1034"][0] == pytest.approx(dot.NODE_PITCH)
    assert max(x for n, (x, _) in xy.items() if pos[n][0] < 4.5) < min(x for n, (x, _) in xy.items() if pos[n][0] > 4.5)
    assert "H0.1_5" in nodes  # ids with dots are quoted


def test_dot_quote_inverse():
    for text in ['plain', 'say "hi"', "back\\slash\\", "\\n is not a newline", "two\nlines", '\\"', ""]:
        assert dot.dot_unquote(dot.dot_quote(text)) == text


@pytest.mark.skipif(shutil.which("neato") is None, reason="needs Debian graphviz")
def test_dot_renders_with_graphviz(graph, tmp_path):
    path = tmp_path / "g.dot"
    path.write_text(dot.to_dot(graph), encoding="utf-8")
    out = subprocess.run(["neato", "-n2", "-Tsvg", str(path)], capture_output=True, timeout=60)
    assert out.returncode == 0, out.stderr.decode()
    root = ET.fromstring(out.stdout)
    assert not [e for e in root.iter() if e.tag.split("}")[-1] == "img"]
    assert HOSTILE_HTML in "".join(root.itertext())


# ---------------------------------------------------------------------------------------------- Neuronpedia


def test_neuronpedia_json_schema(graph):
    doc = neuronpedia.to_neuronpedia_json(graph)
    assert neuronpedia.validate_neuronpedia(doc) == []
    back = json.loads(json.dumps(doc, allow_nan=False))
    assert back == doc
    assert set(doc) == {"metadata", "qParams", "nodes", "links"}
    node_ids = {n["node_id"] for n in doc["nodes"]}
    assert len(node_ids) == len(doc["nodes"]) == len(graph.nodes)
    assert all(link["source"] in node_ids and link["target"] in node_ids for link in doc["links"])
    assert len(doc["links"]) == len(graph.edges)
    assert sum(n["is_target_logit"] for n in doc["nodes"]) == 1
    assert doc["metadata"]["scan"] == "tiny-llama"
    assert doc["metadata"]["prompt_tokens"][1] == HOSTILE_HTML
    assert doc["metadata"]["node_threshold"] == 0.8
    by_ours = {n["circuitscope_id"]: n for n in doc["nodes"]}
    tc = by_ours["T1_5_1034"]
    assert (tc["node_id"], tc["jsNodeId"], tc["layer"], tc["ctx_idx"], tc["feature_type"]) == (
        "1_1034_5", "1_1034-0", "1", 5, "cross layer transcoder")
    assert tc["feature"] == neuronpedia.cantor(1, 1034) and tc["activation"] == 4.2
    err = by_ours["M1_5"]
    assert (err["node_id"], err["jsNodeId"], err["feature"], err["feature_type"]) == (
        "1_-1_5", "1_-1-5", -1, "mlp reconstruction error")
    emb = by_ours["E_1"]
    assert (emb["node_id"], emb["jsNodeId"], emb["layer"], emb["feature"]) == ("E_1022_1", "E_1022-1", "E", 1)
    logit = by_ours["L_651"]
    assert (logit["node_id"], logit["jsNodeId"], logit["layer"], logit["feature"]) == ("4_651_5", "L_651-5", "4", 651)
    assert logit["is_target_logit"] and logit["token_prob"] == pytest.approx(0.4213)
    assert logit["clerp"].split("(p=")[1].split(")")[0] == "0.421"  # the viewer parses p from the clerp
    assert {by_ours[i]["feature_type"] for i in ("H1.3_5", "A2_5_42")} == {"lorsa"}
    assert by_ours["AE2_5"]["feature_type"] == "lorsa error"
    # cumulative influence: the most influential node has the smallest score, the least ~1
    scores = {i: n["influence"] for i, n in by_ours.items() if n["influence"] is not None}
    assert min(scores, key=scores.get) == "T2_5_77" and max(scores.values()) == pytest.approx(1.0)


def test_neuronpedia_json_carries_the_graph_scores_of_a_built_and_pruned_graph():
    """A graph built now (no head nodes, demeaned target) exports valid JSON whose metadata carries the graph
    scores as built and for the pruned view, the conservation split and the target's metric."""
    from backend.circuits.build import BuildParams, build_graph
    from backend.circuits.prune import graph_scores, prune
    from backend.model.registry import load_model
    from circuit_fixtures import random_transcoders

    model = load_model("tiny-llama")
    built = build_graph(model, "Mary and John went to", random_transcoders(model, [0, 1]), {},
                        params=BuildParams(max_nodes=40))
    pruned = prune(built, 0.8, 0.98)
    doc = json.loads(ex.export(pruned, "json"))
    assert neuronpedia.validate_neuronpedia(doc) == []
    meta = doc["metadata"]
    assert meta["graph_scores"]["as_built"] == pytest.approx(built.metadata["scores"])
    assert meta["graph_scores"]["pruned"] == pytest.approx(graph_scores(pruned))
    assert meta["conservation"]["direct"]["constant"] == pytest.approx(built.metadata["conservation"]["direct"]["constant"])
    assert meta["target_metric"] == "logit minus mean logit"
    assert "scores" not in meta["pruning_settings"]
    as_built = json.loads(ex.export(built, "json"))["metadata"]["graph_scores"]
    assert as_built["as_built"] == pytest.approx(built.metadata["scores"]) and as_built["pruned"] is None


def test_neuronpedia_without_influence_and_validator_catches_problems():
    doc = neuronpedia.to_neuronpedia_json(make_graph(with_influence=False))
    assert neuronpedia.validate_neuronpedia(doc) == []
    assert all(n["influence"] is None for n in doc["nodes"])
    bad = json.loads(json.dumps(doc))
    del bad["metadata"]["scan"]
    bad["nodes"][0]["layer"] = 3
    bad["nodes"][1]["feature_type"] = "attention head"
    bad["links"].append({"source": "nope", "target": bad["nodes"][0]["node_id"], "weight": 1.0})
    bad["nodes"][2]["is_target_logit"] = True
    problems = neuronpedia.validate_neuronpedia(bad)
    assert len(problems) == 5, problems
    assert neuronpedia.validate_neuronpedia({"nodes": []})  # missing top-level keys


# ---------------------------------------------------------------------------------------------- registry


def test_registry_and_files(graph, tmp_path):
    assert set(ex.FORMATS) == {"svg", "png", "graphml", "dot", "json"}
    for name, fmt in ex.FORMATS.items():
        assert fmt.name == name and fmt.extension.startswith(".") and "/" in fmt.mime
    data = ex.export(graph, "json")
    assert neuronpedia.validate_neuronpedia(json.loads(data)) == []
    with pytest.raises(InputError, match="does not exist"):  # a typo in a directory never creates directories
        ex.export_to_file(graph, tmp_path / "sub" / "g.graphml")
    assert not (tmp_path / "sub").exists()
    (tmp_path / "sub").mkdir()
    path = ex.export_to_file(graph, tmp_path / "sub" / "g.graphml")
    assert nx.read_graphml(path).number_of_nodes() == len(graph.nodes)
    path = ex.export_to_file(graph, tmp_path / "g.gv")
    assert path.read_text(encoding="utf-8").startswith("strict digraph")
    with pytest.raises(InputError) as err:
        ex.export_to_file(graph, tmp_path / "g.xlsx")
    assert ".graphml" in str(err.value) and str(err.value).count(".") >= 2
    assert not (tmp_path / "g.xlsx").exists()
    with pytest.raises(InputError):
        ex.export(graph, "bmp")


def test_missing_browser_is_one_sentence(graph, monkeypatch):
    monkeypatch.setattr(images, "CHROMIUM", "/nonexistent/chromium")
    with pytest.raises(CircuitscopeError) as err:
        images.to_svg(graph)
    message = str(err.value)
    assert "make browser" in message and message.count(". ") == 0 and message.endswith(".")
    with pytest.raises(CircuitscopeError):
        ex.export(graph, "png")


# ---------------------------------------------------------------------------------------------- images


@needs_chromium
def test_svg_parses_and_hostile_text_is_inert(graph):
    text = images.to_svg(graph)
    root = ET.fromstring(text)
    assert root.tag.split("}")[-1] == "svg"
    tags = {e.tag.split("}")[-1] for e in root.iter()}
    assert "img" not in tags and "script" not in tags and "foreignObject" not in tags
    assert not [e for e in root.iter() if any(a.lower().startswith("on") for a in e.attrib)]
    shown = "".join(root.itertext())
    assert HOSTILE_HTML in shown  # shown as text
    assert "L0 attn" in shown and "logit" in shown


@needs_chromium
def test_png_size_and_scale(graph):
    data = images.to_png(graph, width=500, height=400, scale=2)
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    assert data[12:16] == b"IHDR"
    width, height = struct.unpack(">II", data[16:24])
    assert (width, height) == (1000, 800)
    try:
        from PIL import Image
    except ImportError:
        return
    with Image.open(io.BytesIO(data)) as image:
        assert image.size == (1000, 800)
        assert len(set(image.convert("L").getdata())) > 2  # not blank


@needs_chromium
def test_images_through_registry(graph, tmp_path):
    path = ex.export_to_file(graph, tmp_path / "g.svg")
    assert ET.fromstring(path.read_bytes()).tag.endswith("svg")
    assert ex.export(graph, "png")[:4] == b"\x89PNG"
    highlighted = images.to_svg(graph, highlight_nodes=["T2_5_77"])
    assert highlighted != path.read_text(encoding="utf-8")


def test_exports_of_a_pruned_graph_stay_valid():
    from backend.circuits.prune import prune

    pruned = prune(make_graph(with_influence=False), node_threshold=0.6, edge_threshold=0.9)
    assert 1 < len(pruned.nodes) < len(make_graph().nodes)
    assert neuronpedia.validate_neuronpedia(neuronpedia.to_neuronpedia_json(pruned)) == []
    assert nx.read_graphml(io.StringIO(graphml.to_graphml(pruned))).number_of_nodes() == len(pruned.nodes)
    fig = figure(pruned)
    assert sorted(i for t in _node_traces(fig) for i in t.customdata) == sorted(pruned.nodes["node_id"])
