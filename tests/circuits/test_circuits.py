"""Attribution graphs (backend/circuits): edges and total attributions against independent computations on the
tiny random models, transcoder edge factorisation, pruning, strongest paths and the faithfulness check.

The independent computations here use only TransformerLens hooks on the real model:

* **finite differences of the frozen-attention linearised model**: norms' scales and attention patterns are
  forced to their clean values, every sublayer output (embedding, attention output, MLP output) is forced to
  its clean value, and one source node's output is added on top; the target reads the live stream (its own
  norm input / hook_z / logits). The change in the target's value is the edge weight.
* **autograd through the replacement model**: transcoders spliced in with their clean errors, norms and
  patterns frozen, each head's output let vary only along its clean direction; activation × gradient is the
  total attribution.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

from backend.circuits.build import BuildParams, build_graph
from backend.circuits.faithfulness import check, reference_means
from backend.circuits.prune import influence, prune, strongest_paths
from backend.dictionaries.attention_sae import encode_z, make_random_sae, preactivation
from backend.model.hooks import EMBED, FINAL_SCALE, hook_name
from backend.model.registry import load_model

pytestmark = pytest.mark.usefixtures("one_thread")
PROMPT = "When Mary and John went to the store, John gave a drink to"


def random_transcoders(model: Any, layers: list[int], seed: int = 0) -> dict[int, Any]:
    """Random ReLU transcoders whose features fire on real activations (a few per token)."""
    from sae_lens import Transcoder, TranscoderConfig

    d = model.cfg.d_model
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for layer in layers:
        tc = Transcoder(TranscoderConfig(d_in=d, d_sae=4 * d, d_out=d, apply_b_dec_to_input=False))
        with torch.no_grad():
            tc.W_enc.copy_(torch.randn(d, 4 * d, generator=gen) / d ** 0.5)
            tc.b_enc.fill_(-1.0)
            tc.W_dec.copy_(torch.randn(4 * d, d, generator=gen) * 0.05)
            tc.b_dec.copy_(torch.randn(d, generator=gen) * 0.01)
        out[layer] = tc.eval()
    return out


@pytest.fixture(scope="module", params=[("tiny-llama", "all"), ("tiny-gpt2", "all"), ("tiny-llama", "partial")],
                ids=["llama", "gpt2", "llama-partial"])
def setup(request: Any) -> dict[str, Any]:
    """A graph with every candidate kept. "all": transcoders on every layer and an attention SAE on the last;
    "partial": no transcoder on the last layer (its MLP is one error node per position) and no attention SAE."""
    import copy

    name, variant = request.param
    model = copy.deepcopy(load_model(name))
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():  # random init leaves norm weights at 1 and biases at 0: make them matter
        for module in [model.ln_final] + [m for b in model.blocks for m in (b.ln1, b.ln2)]:
            for param in (getattr(module, "w", None), getattr(module, "b", None)):
                if param is not None:
                    param.add_(0.3 * torch.randn(param.shape, generator=gen))
    L = model.cfg.n_layers
    tcs = random_transcoders(model, list(range(L)) if variant == "all" else list(range(L - 1)))
    saes = {L - 1: make_random_sae(model.cfg.n_heads * model.cfg.d_head, 64, k=4, seed=1)} if variant == "all" else {}
    graph = build_graph(model, PROMPT, tcs, saes, params=BuildParams(max_nodes=100_000))
    return {"model": model, "tcs": tcs, "saes": saes, "graph": graph, "variant": variant}


def _clean_cache(model: Any, tokens: torch.Tensor) -> dict[str, torch.Tensor]:
    _, cache = model.run_with_cache(tokens[None])
    return {k: v[0].detach() for k, v in cache.items()}


def _frozen_hooks(model: Any, cache: dict[str, torch.Tensor], delta: dict[str, tuple[int, torch.Tensor]]) -> list:
    """Hooks forcing norm scales, patterns and every sublayer output to their clean values, plus ``delta``
    (hook name -> (position, vector)) added to one sublayer output."""
    def force(name: str) -> Any:
        def hook(act: torch.Tensor, hook: Any) -> torch.Tensor:
            new = cache[name].clone()
            if name in delta:
                pos, vec = delta[name]
                new[pos] = new[pos] + vec
            return new[None]
        return hook

    names = [EMBED, FINAL_SCALE] + (["hook_pos_embed"] if "hook_pos_embed" in model.hook_dict else [])
    for layer in range(model.cfg.n_layers):
        names += [hook_name(k, layer) for k in ("attn_scale", "mlp_scale", "pattern", "attn_out", "mlp_out")]
    return [(n, force(n)) for n in names]


def _source_delta(model: Any, setup: dict[str, Any], cache: dict[str, torch.Tensor], node: dict) -> tuple[str, int, torch.Tensor]:
    """(hook, position, vector) that a source node writes, computed from the clean cache."""
    k, l, p, i = node["kind"], int(node["layer"]), int(node["pos"]), node["feature"]
    if k == "embedding":
        return EMBED, p, cache[EMBED][p] + (cache["hook_pos_embed"][p] if "hook_pos_embed" in cache else 0)
    if k in ("transcoder", "mlp_error"):
        name = hook_name("mlp_out", l)
        tc = setup["tcs"].get(l)
        if tc is None:
            return name, p, cache[name][p]
        with torch.no_grad():
            f = tc.encode(cache[hook_name("mlp_in", l)][p])
        if k == "transcoder":
            return name, p, f[int(i)] * tc.W_dec[int(i)].detach()
        return name, p, cache[name][p] - tc.decode(f).detach()
    W_O = model.blocks[l].attn.W_O.detach()
    z = cache[hook_name("z", l)][p]
    if k == "head":
        return hook_name("attn_out", l), p, z[int(i)] @ W_O[int(i)]
    sae = setup["saes"][l]
    flat = z.reshape(-1)
    f = encode_z(sae, flat)
    if k == "attn_feature":
        return hook_name("attn_out", l), p, torch.einsum("hk,hkd->d", (f[int(i)] * sae.W_dec[int(i)]).detach().reshape(W_O.shape[0], -1), W_O)
    err = (flat - sae.decode(f).detach()).reshape(W_O.shape[0], -1)
    return hook_name("attn_out", l), p, torch.einsum("hk,hkd->d", err, W_O)


def _readout(model: Any, setup: dict[str, Any], cache: dict[str, torch.Tensor], node: dict, hooks: list,
             tokens: torch.Tensor, graph: Any) -> float:
    """The target node's value when the model runs with ``hooks`` (read from the live stream)."""
    k, l, p, i = node["kind"], int(node["layer"]), int(node["pos"]), node["feature"]
    seen: dict[str, torch.Tensor] = {}

    def grab(act: torch.Tensor, hook: Any) -> None:
        seen[hook.name] = act[0].detach()

    names = [hook_name("mlp_in", l), hook_name("z", l)] if l >= 0 and k != "logit" else []
    with torch.no_grad():
        logits = model.run_with_hooks(tokens[None], fwd_hooks=hooks + [(n, grab) for n in names])[0, -1]
    if k == "logit":
        t = graph.metadata["target"]
        return float(logits[t["token_id"]] - (logits[t["wrong_id"]] if t["wrong_id"] is not None else 0))
    if k == "transcoder":
        tc = setup["tcs"][l]
        return float((seen[hook_name("mlp_in", l)][p] @ tc.W_enc[:, int(i)] + tc.b_enc[int(i)]).detach())
    z = seen[hook_name("z", l)][p]
    if k == "head":
        W_O = model.blocks[l].attn.W_O.detach()
        o_clean = cache[hook_name("z", l)][p, int(i)] @ W_O[int(i)]
        return float((z[int(i)] @ W_O[int(i)]) @ (o_clean / o_clean.norm()))
    return float(preactivation(setup["saes"][l], z.reshape(-1))[int(i)])


def test_edge_weights_match_finite_differences_of_the_frozen_linearised_model(setup: dict[str, Any]) -> None:
    """A sample of edges of every (source kind, target kind) pair, plus pairs the graph says have no edge."""
    model, graph = setup["model"], setup["graph"]
    tokens = torch.tensor(graph.metadata["token_ids"])
    cache = _clean_cache(model, tokens)
    nodes = graph.nodes.set_index("node_id", drop=False)
    edges = graph.edges.merge(nodes[["kind"]], left_on="source", right_index=True).merge(
        nodes[["kind"]], left_on="target", right_index=True, suffixes=("_s", "_t"))
    sample = edges.groupby(["kind_s", "kind_t"]).head(3)
    pairs = {(k_s, k_t) for k_s, k_t in zip(sample["kind_s"], sample["kind_t"])}
    # every kind of edge the replacement model has shows up
    expected_pairs = [("embedding", "transcoder"), ("head", "transcoder"), ("embedding", "head"), ("transcoder", "logit"), ("mlp_error", "logit")]
    if setup["variant"] == "all":
        expected_pairs += [("transcoder", "transcoder"), ("attn_feature", "logit"), ("attn_error", "logit"),
                           ("transcoder", "attn_feature"), ("mlp_error", "attn_feature"), ("attn_feature", "transcoder")]
    else:
        expected_pairs += [("head", "head"), ("transcoder", "head"), ("mlp_error", "head")]
    for expected in expected_pairs:
        assert expected in pairs, expected
    checks = [(r.source, r.target, r.weight) for r in sample.itertuples()]
    # pairs without an edge: a source after the target's position, and a source deeper than the target
    t_node = nodes[(nodes["kind"] == "transcoder") & (nodes["layer"] == 0)].iloc[0]
    later = nodes[(nodes["kind"] == "embedding") & (nodes["pos"] > t_node["pos"])]
    deeper = nodes[(nodes["kind"] == "transcoder") & (nodes["layer"] > 0) & (nodes["pos"] == t_node["pos"])]
    for src in list(later["node_id"][:1]) + list(deeper["node_id"][:1]):
        assert not ((graph.edges["source"] == src) & (graph.edges["target"] == t_node["node_id"])).any()
        checks.append((src, t_node["node_id"], 0.0))
    assert len(checks) > 25
    base_cache: dict = {}
    for src, tgt, weight in checks:
        s_node, t_node_ = nodes.loc[src].to_dict(), nodes.loc[tgt].to_dict()
        if tgt not in base_cache:
            base_cache[tgt] = _readout(model, setup, cache, t_node_, _frozen_hooks(model, cache, {}), tokens, graph)
        name, pos, vec = _source_delta(model, setup, cache, s_node)
        moved = _readout(model, setup, cache, t_node_, _frozen_hooks(model, cache, {name: (pos, vec)}), tokens, graph)
        fd = moved - base_cache[tgt]
        assert fd == pytest.approx(weight, rel=2e-3, abs=2e-4 * max(1.0, abs(base_cache[tgt]))), (src, tgt)


def test_node_values_are_the_clean_run(setup: dict[str, Any]) -> None:
    """Each node's recorded value is what the frozen model (= the clean run) reads; logit = the metric."""
    model, graph = setup["model"], setup["graph"]
    tokens = torch.tensor(graph.metadata["token_ids"])
    cache = _clean_cache(model, tokens)
    hooks = _frozen_hooks(model, cache, {})
    readers = graph.nodes[graph.nodes["kind"].isin(["transcoder", "head", "attn_feature", "logit"])]
    for row in readers.groupby("kind").head(4).to_dict("records"):
        assert row["value"] == pytest.approx(_readout(model, setup, cache, row, hooks, tokens, graph), rel=1e-4, abs=1e-4)


def test_total_attribution_matches_autograd_through_the_replacement_model(setup: dict[str, Any]) -> None:
    model, graph, tcs, saes = setup["model"], setup["graph"], setup["tcs"], setup["saes"]
    tokens = torch.tensor(graph.metadata["token_ids"])
    cache = _clean_cache(model, tokens)
    leaves: dict[str, torch.Tensor] = {}
    P = len(tokens)

    def freeze(name: str) -> Any:
        return lambda act, hook: cache[name][None]

    def mlp(layer: int) -> Any:
        def hook(out: torch.Tensor, hook: Any) -> torch.Tensor:
            x = live[hook_name("mlp_in", layer)][0]
            y = cache[hook_name("mlp_out", layer)]
            tc = tcs.get(layer)
            if tc is None:
                err = y[1:].clone().requires_grad_(True)
                leaves[f"M{layer}"] = err
                return torch.cat([y[:1], err])[None]
            f = tc.encode(x[1:])
            f.retain_grad()
            leaves[f"T{layer}"] = f
            with torch.no_grad():
                err0 = y[1:] - tc.decode(tc.encode(cache[hook_name("mlp_in", layer)][1:]))
            err = err0.clone().requires_grad_(True)
            leaves[f"M{layer}"] = err
            return torch.cat([y[:1], tc.decode(f) + err])[None]
        return hook

    def attn(layer: int) -> Any:
        def hook(z: torch.Tensor, hook: Any) -> torch.Tensor:
            W_O = model.blocks[layer].attn.W_O
            if layer in saes:
                sae = saes[layer]
                flat = z[0, 1:].reshape(P - 1, -1)
                with torch.no_grad():
                    active = encode_z(sae, flat) > 0
                pre = flat @ sae.W_enc + sae.b_enc  # random SAEs here have b_dec = 0
                f = torch.where(active, pre, torch.zeros_like(pre))
                f.retain_grad()
                leaves[f"A{layer}"] = f
                zc = cache[hook_name("z", layer)][1:].reshape(P - 1, -1)
                with torch.no_grad():
                    e0 = zc - sae.decode(encode_z(sae, zc))
                err = e0.clone().requires_grad_(True)
                leaves[f"AE{layer}"] = err
                new = (f @ sae.W_dec + sae.b_dec + err).reshape(P - 1, *z.shape[2:])
                out = torch.einsum("phk,hkd->pd", new, W_O)
                return torch.cat([cache[hook_name("attn_out", layer)][:1], out])[None]
            o = torch.einsum("phk,hkd->phd", z[0, 1:], W_O)
            oc = torch.einsum("phk,hkd->phd", cache[hook_name("z", layer)][1:], W_O)
            o_hat = oc / oc.norm(dim=-1, keepdim=True)
            s = (o * o_hat).sum(-1)
            s.retain_grad()
            leaves[f"H{layer}"] = s
            along = s[..., None] * o_hat + (o - s[..., None] * o_hat).detach()
            return torch.cat([cache[hook_name("attn_out", layer)][:1], along.sum(1)])[None]
        return hook

    live: dict[str, torch.Tensor] = {}

    def keep(act: torch.Tensor, hook: Any) -> None:
        live[hook.name] = act

    emb = cache[EMBED].clone().requires_grad_(True)  # (tiny-gpt2's positional embedding stays clean: same effect)
    if "hook_pos_embed" in cache:
        emb_total = emb + cache["hook_pos_embed"]
    hooks = [(EMBED, lambda act, hook: emb[None]), (FINAL_SCALE, freeze(FINAL_SCALE))]
    for layer in range(model.cfg.n_layers):
        for k in ("attn_scale", "mlp_scale", "pattern"):
            hooks.append((hook_name(k, layer), freeze(hook_name(k, layer))))
        hooks.append((hook_name("mlp_in", layer), keep))
        hooks.append((hook_name("mlp_out", layer), mlp(layer)))
    # the attention output is rebuilt from hook_z so the head direction can be constrained
    for layer in range(model.cfg.n_layers):
        hooks.append((hook_name("attn_out", layer), _replace_with(live, layer)))
        hooks.append((hook_name("z", layer), _capture_z(live, layer, attn(layer))))
    logits = model.run_with_hooks(tokens[None], fwd_hooks=hooks)[0, -1]
    t = graph.metadata["target"]
    metric = logits[t["token_id"]] - (logits[t["wrong_id"]] if t["wrong_id"] is not None else 0)
    metric.backward()
    expected: dict[str, float] = {}
    for row in graph.nodes.to_dict("records"):
        k, l, p, i = row["kind"], row["layer"], row["pos"], row["feature"]
        if k == "embedding":
            written = emb_total[p] if "hook_pos_embed" in cache else emb[p]
            expected[row["node_id"]] = float(written.detach() @ emb.grad[p])
        elif k == "transcoder":
            f = leaves[f"T{l}"]
            expected[row["node_id"]] = float(f[p - 1, i] * f.grad[p - 1, i])
        elif k == "mlp_error":
            e = leaves[f"M{l}"]
            expected[row["node_id"]] = float(e[p - 1] @ e.grad[p - 1])
        elif k == "head":
            s = leaves[f"H{l}"]
            expected[row["node_id"]] = float(s[p - 1, i] * s.grad[p - 1, i])
        elif k == "attn_feature":
            f = leaves[f"A{l}"]
            expected[row["node_id"]] = float(f[p - 1, i] * f.grad[p - 1, i])
        elif k == "attn_error":
            e = leaves[f"AE{l}"]
            expected[row["node_id"]] = float(e[p - 1] @ e.grad[p - 1])
    got = graph.nodes.set_index("node_id")["attribution"]
    scale = max(abs(v) for v in expected.values())
    for nid, value in expected.items():
        assert got[nid] == pytest.approx(value, abs=1e-4 * scale, rel=1e-3), nid


def _capture_z(live: dict, layer: int, attn_hook: Any) -> Any:
    def hook(z: torch.Tensor, hook: Any) -> torch.Tensor:
        live[f"attn_out_new{layer}"] = attn_hook(z, hook)
        return z
    return hook


def _replace_with(live: dict, layer: int) -> Any:
    return lambda act, hook: live[f"attn_out_new{layer}"]


def test_transcoder_edges_factorise_into_activation_invariant_and_norm(setup: dict[str, Any]) -> None:
    model, graph, tcs = setup["model"], setup["graph"], setup["tcs"]
    nodes = graph.nodes.set_index("node_id")
    tt = graph.edges[graph.edges["invariant"].notna()]
    if setup["variant"] == "partial":  # one transcoder layer: no transcoder -> transcoder edges
        assert len(tt) == 0
        return
    assert len(tt) > 0
    kinds = set(nodes.loc[tt["source"], "kind"]) | set(nodes.loc[tt["target"], "kind"])
    assert kinds == {"transcoder"}
    n_tc_pairs = sum(1 for s, t in zip(graph.edges["source"], graph.edges["target"])
                     if nodes.loc[s, "kind"] == "transcoder" and nodes.loc[t, "kind"] == "transcoder")
    assert n_tc_pairs == len(tt)  # every transcoder -> transcoder edge has its factors
    tokens = torch.tensor(graph.metadata["token_ids"])
    cache = _clean_cache(model, tokens)
    for r in tt.head(20).itertuples():
        s, t = nodes.loc[r.source], nodes.loc[r.target]
        W_dec, W_enc = tcs[int(s["layer"])].W_dec.detach(), tcs[int(t["layer"])].W_enc.detach()
        enc = W_enc[:, int(t["feature"])]
        if model.cfg.normalization_type.startswith("LN"):
            enc = enc - enc.mean()
        assert r.invariant == pytest.approx(float(W_dec[int(s["feature"])] @ enc), rel=1e-4, abs=1e-6)
        assert r.source_factor == pytest.approx(float(s["activation"]), rel=1e-6)
        scale = cache[hook_name("mlp_scale", int(t["layer"]))][int(t["pos"]), 0]
        assert r.norm_factor == pytest.approx(float(1 / scale), rel=1e-5)
        assert r.weight == pytest.approx(r.source_factor * r.invariant * r.norm_factor, rel=1e-3, abs=1e-6)


def test_pruning_keeps_the_target_and_is_monotone(setup: dict[str, Any]) -> None:
    graph = setup["graph"]
    previous_nodes: set[str] = set()
    previous_edges: set[tuple[str, str]] = set()
    for threshold in (0.1, 0.3, 0.5, 0.7, 0.9, 0.99):
        p = prune(graph, node_threshold=threshold, edge_threshold=min(0.999, threshold + 0.05))
        nodes = set(p.nodes["node_id"])
        edges = set(zip(p.edges["source"], p.edges["target"]))
        assert graph.target_id in nodes
        assert previous_nodes <= nodes and previous_edges <= edges
        assert edges <= {(s, t) for s, t in zip(graph.edges["source"], graph.edges["target"])}
        previous_nodes, previous_edges = nodes, edges
    assert len(previous_nodes) > 10
    # every kept node reaches the target
    import networkx as nx

    g = nx.DiGraph(list(previous_edges))
    assert all(n == graph.target_id or nx.has_path(g, n, graph.target_id) for n in previous_nodes)
    capped = prune(graph, 0.99, 0.999, max_nodes=5)
    assert len(capped.nodes) <= 5 and graph.target_id in set(capped.nodes["node_id"])


def test_influence_is_the_path_sum_of_normalised_weights() -> None:
    """A hand-made graph: a -> b -> t and a -> t, with row-normalised fractions."""
    import pandas as pd

    from backend.circuits.graph import NODE_COLUMNS, Graph

    nodes = pd.DataFrame([{c: None for c in NODE_COLUMNS} | {"node_id": n, "is_target": n == "t"} for n in "abt"])
    edges = pd.DataFrame({"source": ["a", "b", "a"], "target": ["b", "t", "t"], "weight": [2.0, -3.0, 1.0],
                          "source_factor": float("nan"), "invariant": float("nan"), "norm_factor": float("nan")})
    inf = influence(Graph(nodes, edges))
    # t's inputs: b 3/4, a 1/4; b's input: a 1/1 -> a: 1/4 + 3/4 x 1 = 1
    assert inf["b"] == pytest.approx(0.75) and inf["a"] == pytest.approx(1.0) and inf["t"] == 1.0


def test_strongest_paths_end_at_the_target_and_are_ordered(setup: dict[str, Any]) -> None:
    p = prune(setup["graph"], 0.8, 0.98)
    paths = strongest_paths(p, k=4)
    assert 1 <= len(paths) <= 4
    strengths = [s for _, s in paths]
    assert strengths == sorted(strengths, reverse=True)
    edges = set(zip(p.edges["source"], p.edges["target"]))
    for path, strength in paths:
        assert path[-1] == p.target_id and 0 < strength <= 1
        assert all((a, b) in edges for a, b in zip(path[:-1], path[1:]))


def test_faithfulness_full_circuit_is_the_clean_metric_and_empty_differs(setup: dict[str, Any]) -> None:
    model, graph, tcs, saes = setup["model"], setup["graph"], setup["tcs"], setup["saes"]
    clean = graph.metadata["target"]["value"]
    whole = check(model, graph, tcs, saes)  # the unpruned graph holds every candidate node
    assert whole.metric_full == pytest.approx(clean, abs=1e-3)
    assert whole.metric_circuit == pytest.approx(clean, abs=1e-3)
    assert whole.fraction == pytest.approx(1.0, abs=1e-3)
    small = check(model, prune(graph, 0.3, 0.9), tcs, saes)
    assert small.metric_empty != pytest.approx(clean, abs=1e-3)
    tokens = torch.randint(0, model.cfg.d_vocab, (3, 12))
    tokens[:, 0] = graph.metadata["token_ids"][0]
    mean = check(model, prune(graph, 0.3, 0.9), tcs, saes, mode="mean",
                 means=reference_means(model, tcs, saes, tokens))
    assert mean.metric_full == pytest.approx(clean, abs=1e-3)
    assert mean.metric_empty != pytest.approx(small.metric_empty, abs=1e-4)


def test_invariant_neighbours_rank_decoder_encoder_products() -> None:
    from backend.circuits.invariant import invariant_neighbours

    model = load_model("tiny-llama")
    tcs = random_transcoders(model, [0, 1])
    up, down = invariant_neighbours(tcs, 1, 5, k=4)
    brute = tcs[0].W_dec.detach() @ tcs[1].W_enc.detach()[:, 5]
    best = torch.argsort(-brute.abs())[:4]
    assert up["feature"].tolist() == best.tolist() and set(up["layer"]) == {0}
    assert up["invariant"].tolist() == pytest.approx(brute[best].tolist(), rel=1e-5)
    up0, down0 = invariant_neighbours(tcs, 0, 7, k=3)
    assert up0.empty and len(down0) == 3
    brute = tcs[0].W_dec.detach()[7] @ tcs[1].W_enc.detach()
    assert down0["invariant"].abs().max() == pytest.approx(float(brute.abs().max()), rel=1e-5)


def test_store_round_trip_keeps_every_node_edge_and_fact(setup: dict[str, Any], tmp_path: Any) -> None:
    import pandas as pd

    from backend.circuits.storage import list_graphs, read_graph, write_graph
    from backend.store.access import StoreWriter, reading

    graph = setup["graph"]
    store = tmp_path / "g.duckdb"
    with StoreWriter(store, kind="graph", model="m", params={}) as w:
        gid = write_graph(w.con, graph, w.run_id, source="cli")
        again = write_graph(w.con, graph, w.run_id, source="cli")  # same graph: replaced, not duplicated
    assert gid == again
    with reading(store) as con:
        listed = list_graphs(con)
        back = read_graph(con, gid)
    assert listed["graph_id"].tolist() == [gid] and listed["n_nodes"].iloc[0] == len(graph.nodes)
    assert back.metadata == json_round(graph.metadata)
    pd.testing.assert_frame_equal(back.nodes.reset_index(drop=True), graph.nodes.reset_index(drop=True),
                                  check_dtype=False)
    pd.testing.assert_frame_equal(back.edges.reset_index(drop=True), graph.edges.reset_index(drop=True),
                                  check_dtype=False)


def json_round(value: Any) -> Any:
    import json

    return json.loads(json.dumps(value, default=str))


def test_store_without_the_graph_says_what_to_do(tmp_path: Any) -> None:
    from backend.circuits.storage import read_graph
    from backend.errors import StoreError
    from backend.store.access import StoreWriter, reading

    store = tmp_path / "g.duckdb"
    with StoreWriter(store, kind="graph", model="m", params={}):
        pass
    with reading(store) as con, pytest.raises(StoreError, match="no graph 'g-x'.*pick one"):
        read_graph(con, "g-x")


def test_targets_are_validated_with_one_sentence() -> None:
    from backend.circuits.build import resolve_target
    from backend.errors import InputError

    model = load_model("tiny-llama")
    ids = [1, 5, 6]
    with pytest.raises(InputError, match="single token"):
        resolve_target(model, ids, answer=" Paris is lovely today")
    with pytest.raises(InputError, match="same token"):
        resolve_target(model, ids, answer=7, wrong=7)
    with pytest.raises(InputError, match="outside the vocabulary"):
        resolve_target(model, ids, answer=10**9)
    top = resolve_target(model, ids)
    with torch.no_grad():
        assert top.token_id == int(model(torch.tensor([ids]))[0, -1].argmax()) and top.wrong_id is None


@pytest.fixture(scope="module")
def live_setup() -> dict[str, Any]:
    """A short prompt on tiny-llama with transcoders on both layers (few targets: autograd edges are per target)."""
    model = load_model("tiny-llama")
    tcs = random_transcoders(model, [0, 1])
    graphs = {m: build_graph(model, "Mary and John went to", tcs, {}, params=BuildParams(max_nodes=60, method=m,
                                                                                         ig_steps=6))
              for m in ("relp", "gradient", "ig")}
    return {"model": model, "tcs": tcs, "graphs": graphs}


def _edge_map(graph: Any) -> dict[tuple[str, str], float]:
    return {(s, t): w for s, t, w in zip(graph.edges["source"], graph.edges["target"], graph.edges["weight"])}


def test_methods_share_nodes_and_differ_only_through_live_attention_and_norms(live_setup: dict[str, Any]) -> None:
    g = live_setup["graphs"]
    assert g["relp"].nodes["node_id"].tolist() == g["gradient"].nodes["node_id"].tolist() == g["ig"].nodes["node_id"].tolist()
    relp, grad = _edge_map(g["relp"]), _edge_map(g["gradient"])
    # same-position transcoder -> transcoder edges pass only through ln2, whose scale the gradient also moves:
    # they differ, but a node never gains an edge from a later position or a deeper layer
    nodes = g["gradient"].nodes.set_index("node_id")
    for (s, t) in grad:
        assert nodes.loc[s, "pos"] <= nodes.loc[t, "pos"]
    assert set(grad) - set(relp) or any(abs(grad[k] - relp[k]) > 1e-6 for k in grad if k in relp)
    assert g["gradient"].edges["source_factor"].isna().all() and g["relp"].edges["source_factor"].notna().any()


def test_gradient_edges_match_central_differences_of_the_live_model(live_setup: dict[str, Any]) -> None:
    """Perturb one source's activation by ±ε (its write only; every other sublayer output held at its clean value,
    norms and patterns live) and read the target: (v+ − v−)/2ε · a_u = the gradient edge."""
    model, tcs, graph = live_setup["model"], live_setup["tcs"], live_setup["graphs"]["gradient"]
    tokens = torch.tensor(graph.metadata["token_ids"])
    cache = _clean_cache(model, tokens)
    nodes = graph.nodes.set_index("node_id", drop=False)
    edges = graph.edges.reindex(graph.edges["weight"].abs().sort_values(ascending=False).index).head(12)
    setup = {"tcs": tcs, "saes": {}}

    def forced(delta: dict[str, tuple[int, torch.Tensor]]) -> list:
        def force(name: str) -> Any:
            def hook(act: torch.Tensor, hook: Any) -> torch.Tensor:
                new = cache[name].clone()
                if name in delta:
                    new[delta[name][0]] += delta[name][1]
                return new[None]
            return hook
        names = [EMBED] + [hook_name(k, l) for l in range(model.cfg.n_layers) for k in ("attn_out", "mlp_out")]
        return [(n, force(n)) for n in names]

    eps = 1e-2
    for r in edges.itertuples():
        s_node, t_node = nodes.loc[r.source].to_dict(), nodes.loc[r.target].to_dict()
        name, pos, vec = _source_delta(model, setup, cache, s_node)
        up = _readout(model, setup, cache, t_node, forced({name: (pos, eps * vec)}), tokens, graph)
        down = _readout(model, setup, cache, t_node, forced({name: (pos, -eps * vec)}), tokens, graph)
        assert (up - down) / (2 * eps) == pytest.approx(r.weight, rel=2e-2, abs=2e-3), (r.source, r.target)


def test_ig_edges_integrate_the_live_derivative_along_the_path(live_setup: dict[str, Any]) -> None:
    """Chain rule: for each target, the IG weights of its inputs add up to the midpoint-rule average of
    dvalue/dα along the path where every kept node's write is scaled by α (derivatives by central differences
    here, through the live model). As steps grow this tends to value(clean) − value(kept nodes at 0)
    (completeness); with live norms the path can be nearly scale-invariant, which is why the sum is checked
    against the same quadrature rather than the endpoint difference."""
    model, tcs, graph = live_setup["model"], live_setup["tcs"], live_setup["graphs"]["ig"]
    steps = graph.metadata["params"]["ig_steps"]
    tokens = torch.tensor(graph.metadata["token_ids"])
    cache = _clean_cache(model, tokens)
    setup = {"tcs": tcs, "saes": {}}
    nodes = graph.nodes.set_index("node_id", drop=False)
    deltas: dict[str, list[tuple[int, torch.Tensor]]] = {}
    for r in graph.nodes.to_dict("records"):
        if r["kind"] != "logit":
            name, pos, vec = _source_delta(model, setup, cache, r)
            deltas.setdefault(name, []).append((pos, vec))

    def at(alpha: float) -> list:
        def force(name: str) -> Any:
            def hook(act: torch.Tensor, hook: Any) -> torch.Tensor:
                new = cache[name].clone()
                for pos, vec in deltas.get(name, []):
                    new[pos] -= (1 - alpha) * vec
                return new[None]
            return hook
        names = [EMBED] + [hook_name(k, l) for l in range(model.cfg.n_layers) for k in ("attn_out", "mlp_out")]
        return [(n, force(n)) for n in names]

    sums = graph.edges.groupby("target")["weight"].sum()
    h = 1e-3
    for tid, total in list(sums.items())[:8]:
        t_node = nodes.loc[tid].to_dict()
        slopes = []
        for k in range(steps):
            alpha = (k + 0.5) / steps
            up = _readout(model, setup, cache, t_node, at(alpha + h), tokens, graph)
            down = _readout(model, setup, cache, t_node, at(alpha - h), tokens, graph)
            slopes.append((up - down) / (2 * h))
        assert total == pytest.approx(sum(slopes) / steps, rel=3e-2, abs=3e-3), tid
