"""Attribution graphs (backend/circuits): every edge, every total attribution and every per-head split against an
oracle written here, conservation, graph scores, faithfulness, pruning, storage and targets.

**The oracle** (:class:`Oracle`) is the frozen-attention linearised replacement model run through plain
TransformerLens hooks, written independently of ``backend.circuits``: norm scales and attention patterns are forced
to their clean values, each MLP with a transcoder is replaced by its features + the clean error + ``b_dec`` + the
live skip term, layers without one output their clean MLP output, attention-SAE layers are rebuilt from their
features + the clean z error, and every other attention layer runs live. In ``"direct"`` mode the features stay at
their clean activations (so a perturbation reaches a node only through attention and skip paths: an edge); in
``"linear"`` mode every feature is its pre-activation times its clean on/off mask (so a perturbation flows through
every node: a total attribution). Each batch row adds one perturbation; a node's value is read from the live run.
The system is linear, so doubling a node's activation changes a value by exactly the edge / attribution.
"""

from __future__ import annotations

import copy
from typing import Any

import numpy as np
import pandas as pd
import pytest
import torch

from circuit_fixtures import random_sae, random_transcoders

from backend.circuits.build import BuildParams, build_graph
from backend.circuits.faithfulness import Faithfulness, check, reference_means
from backend.circuits.prune import graph_scores, influence, prune, strongest_paths
from backend.dictionaries.attention_sae import encode_z
from backend.model.hooks import EMBED, FINAL_SCALE, hook_name
from backend.model.registry import load_model

pytestmark = pytest.mark.usefixtures("one_thread")
PROMPT = "When Mary and John went to the store, John gave a drink to"


def perturbed(model: Any, seed: int = 3) -> Any:
    """A copy of ``model`` whose norm weights and biases are not 1 and 0 (random init leaves them so)."""
    model = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in [model.ln_final] + [m for b in model.blocks for m in (b.ln1, b.ln2)]:
            for param in (getattr(module, "w", None), getattr(module, "b", None)):
                if param is not None:
                    param.add_(0.3 * torch.randn(param.shape, generator=gen))
    return model


def three_layer_llama() -> Any:
    """tiny-llama with three layers (for an attention-SAE layer between two pass-through layers)."""
    from transformer_lens import HookedTransformer

    base = load_model("tiny-llama")
    cfg = copy.deepcopy(base.cfg)
    cfg.n_layers = 3
    model = HookedTransformer(cfg, tokenizer=base.tokenizer, move_to_device=False).eval()
    model.cfg.model_name = "tiny-llama-3"
    return model


VARIANTS = {
    # name: (model, transcoder architectures by layer, attention-SAE layers)
    "llama": ("tiny-llama", {0: "transcoder", 1: "transcoder"}, [1]),
    "gpt2": ("tiny-gpt2", {0: "transcoder", 1: "transcoder"}, [1]),
    "llama-partial": ("tiny-llama", {0: "transcoder"}, []),
    "gpt2-skip": ("tiny-gpt2", {0: "skip_transcoder", 1: "skip_transcoder"}, []),
    "llama3-mixed": ("tiny-llama-3", {0: "jumprelu_skip_transcoder", 1: "transcoder"}, [1]),
}


@pytest.fixture(scope="module", params=list(VARIANTS))
def setup(request: Any) -> dict[str, Any]:
    """A graph with every candidate kept. Variants cover Llama-like (RMSNorm, GQA) and GPT-2-like (LayerNorm)
    models, layers with and without transcoders, skip and JumpReLU-skip transcoders, and attention layers with
    and without an attention SAE (so multi-hop paths through several pass-through layers occur)."""
    name, arch, sae_layers = VARIANTS[request.param]
    model = perturbed(three_layer_llama() if name == "tiny-llama-3" else load_model(name))
    tcs = random_transcoders(model, arch)
    saes = {l: random_sae(model, seed=1 + l) for l in sae_layers}
    graph = build_graph(model, PROMPT, tcs, saes, params=BuildParams(max_nodes=100_000))
    return {"model": model, "tcs": tcs, "saes": saes, "graph": graph, "variant": request.param}


# ---------------------------------------------------------------------------------------------------------------
# The oracle


class Oracle:
    """The frozen replacement model of one prompt as TransformerLens hooks (see the module docstring)."""

    def __init__(self, model: Any, tokens: torch.Tensor, tcs: dict[int, Any], saes: dict[int, Any],
                 target: dict[str, Any]) -> None:
        self.model, self.tokens, self.tcs, self.saes, self.target = model, tokens, tcs, saes, target
        with torch.no_grad():
            _, cache = model.run_with_cache(tokens[None])
        self.clean = {k: v[0].detach() for k, v in cache.items()}
        self.P = len(tokens)
        self.H = model.cfg.n_heads
        c = self.clean
        self.f_clean, self.err, self.fa_clean, self.ez = {}, {}, {}, {}
        with torch.no_grad():
            for l, tc in tcs.items():
                x, y = c[hook_name("mlp_in", l)], c[hook_name("mlp_out", l)]
                f = tc.encode(x)
                self.f_clean[l] = f
                self.err[l] = y - (f @ tc.W_dec + tc.b_dec + self.skip(tc, x))
            for l, sae in saes.items():
                z = c[hook_name("z", l)].reshape(self.P, -1)
                f = encode_z(sae, z)
                self.fa_clean[l] = f
                self.ez[l] = z - (f @ sae.W_dec + sae.b_dec)

    @staticmethod
    def skip(tc: Any, x: torch.Tensor) -> Any:
        return x @ tc.W_skip.T if hasattr(tc, "W_skip") else 0.0

    @staticmethod
    def sae_pre(sae: Any, z: torch.Tensor) -> torch.Tensor:
        x = z - sae.b_dec if sae.cfg.apply_b_dec_to_input else z
        return x @ sae.W_enc + sae.b_enc

    def embedding(self, p: int) -> torch.Tensor:
        c = self.clean
        return c[EMBED][p] + (c["hook_pos_embed"][p] if "hook_pos_embed" in c else 0)

    def run(self, B: int, deltas: dict[Any, torch.Tensor], mode: str = "direct",
            open_heads: dict[int, torch.Tensor] | None = None) -> dict[str, Any]:
        """Run ``B`` rows; ``deltas`` adds per-row perturbations: ``"embed"`` [B, P, d] to the embedding,
        ``("f", l)`` / ``("fa", l)`` [B, P, d_sae] to transcoder / attention-SAE activations, ``("err", l)`` [B, P, d]
        to an MLP error (or a whole MLP without transcoder), ``("ez", l)`` [B, P, d_z] to an attention error.
        ``open_heads[l]`` [B, H]: heads of pass-through layer ``l`` whose output may change (others forced clean).
        Returns the live readouts: transcoder and attention-SAE pre-activations, z, and the metric."""
        model, c, P = self.model, self.clean, self.P
        stash: dict[str, torch.Tensor] = {}
        out: dict[str, Any] = {"tc_pre": {}, "sae_pre": {}, "z": {}}

        def force(name: str) -> Any:
            return lambda act, hook: c[name].expand(B, *c[name].shape)

        def embed(act: torch.Tensor, hook: Any) -> torch.Tensor:
            return c[EMBED][None] + deltas.get("embed", 0)

        def z_hook(layer: int) -> Any:
            def hook(z: torch.Tensor, hook: Any) -> torch.Tensor:
                out["z"][layer] = z
                if layer in self.saes:
                    sae = self.saes[layer]
                    flat = z.reshape(B, P, -1)
                    out["sae_pre"][layer] = self.sae_pre(sae, flat)
                    if mode == "direct":
                        f = self.fa_clean[layer][None].expand(B, -1, -1)
                    else:
                        f = self.sae_pre(sae, flat) * (self.fa_clean[layer] > 0)
                    f = f + deltas.get(("fa", layer), 0)
                    new = f @ sae.W_dec + sae.b_dec + self.ez[layer] + deltas.get(("ez", layer), 0)
                    new[:, 0] = flat[:, 0]  # BOS untouched
                    return new.reshape(z.shape)
                if open_heads is not None and layer in open_heads:
                    zc = c[hook_name("z", layer)][None]
                    return torch.where(open_heads[layer][:, None, :, None], z, zc)
                return z
            return hook

        def keep_x(x: torch.Tensor, hook: Any) -> None:
            stash[hook.name] = x

        def mlp_hook(layer: int) -> Any:
            def hook(y: torch.Tensor, hook: Any) -> torch.Tensor:
                tc = self.tcs.get(layer)
                if tc is None:
                    return c[hook_name("mlp_out", layer)][None] + deltas.get(("err", layer), 0)
                x = stash[hook_name("mlp_in", layer)]
                out["tc_pre"][layer] = x @ tc.W_enc + tc.b_enc
                if mode == "direct":
                    f = self.f_clean[layer][None].expand(B, -1, -1)
                else:
                    f = (x @ tc.W_enc + tc.b_enc) * (self.f_clean[layer] > 0)
                f = f + deltas.get(("f", layer), 0)
                new = f @ tc.W_dec + tc.b_dec + self.skip(tc, x) + self.err[layer] + deltas.get(("err", layer), 0)
                new[:, 0] = y[:, 0]  # BOS untouched
                return new
            return hook

        hooks: list[tuple[str, Any]] = [(EMBED, embed), (FINAL_SCALE, force(FINAL_SCALE))]
        for l in range(model.cfg.n_layers):
            for k in ("attn_scale", "mlp_scale", "pattern"):
                hooks.append((hook_name(k, l), force(hook_name(k, l))))
            hooks += [(hook_name("z", l), z_hook(l)), (hook_name("mlp_in", l), keep_x),
                      (hook_name("mlp_out", l), mlp_hook(l))]
        with torch.no_grad():
            logits = model.run_with_hooks(self.tokens.expand(B, -1), fwd_hooks=hooks)[:, -1]
        t = self.target
        other = logits.mean(-1) if t.get("wrong_id") is None else logits[:, int(t["wrong_id"])]
        out["metric"] = logits[:, int(t["token_id"])] - other
        return out

    def value(self, out: dict[str, Any], node: dict[str, Any]) -> torch.Tensor:
        """A reader node's value in every row of a run."""
        k, l, p = node["kind"], int(node["layer"]), int(node["pos"])
        if k == "logit":
            return out["metric"]
        if k == "transcoder":
            return out["tc_pre"][l][:, p, int(node["feature"])]
        return out["sae_pre"][l][:, p, int(node["feature"])]

    def doubling(self, nodes: list[dict[str, Any]], sign: float = 1.0) -> tuple[int, dict[Any, torch.Tensor]]:
        """Deltas with one row per node adding ``sign`` × the node's own clean write (so its activation doubles
        for sign 1), plus a last row with no change."""
        B = len(nodes) + 1
        d, P = self.model.cfg.d_model, self.P
        deltas: dict[Any, torch.Tensor] = {}

        def at(key: Any, width: int) -> torch.Tensor:
            if key not in deltas:
                deltas[key] = torch.zeros(B, P, width)
            return deltas[key]

        for b, n in enumerate(nodes):
            k, l, p = n["kind"], int(n["layer"]), int(n["pos"])
            if k == "embedding":
                at("embed", d)[b, p] = sign * self.embedding(p)
            elif k == "transcoder":
                i = int(n["feature"])
                at(("f", l), self.f_clean[l].shape[-1])[b, p, i] = sign * self.f_clean[l][p, i]
            elif k == "mlp_error":
                e = self.err[l][p] if l in self.tcs else self.clean[hook_name("mlp_out", l)][p]
                at(("err", l), d)[b, p] = sign * e
            elif k == "attn_feature":
                i = int(n["feature"])
                at(("fa", l), self.fa_clean[l].shape[-1])[b, p, i] = sign * self.fa_clean[l][p, i]
            elif k == "attn_error":
                at(("ez", l), self.ez[l].shape[-1])[b, p] = sign * self.ez[l][p]
            else:
                raise ValueError(k)
        return B, deltas


def oracle_for(setup: dict[str, Any]) -> Oracle:
    g = setup["graph"]
    return Oracle(setup["model"], torch.tensor(g.metadata["token_ids"]), setup["tcs"], setup["saes"],
                  g.metadata["target"])


def _rows(graph: Any) -> tuple[list[dict], list[dict]]:
    rows = graph.nodes.to_dict("records")
    return [r for r in rows if r["kind"] != "logit"], [r for r in rows if r["kind"] in ("transcoder", "attn_feature",
                                                                                           "logit")]


# ---------------------------------------------------------------------------------------------------------------
# Edges, total attributions, conservation


def test_no_head_nodes_and_every_error_is_kept(setup: dict[str, Any]) -> None:
    g = setup["graph"]
    kinds = set(g.nodes["kind"])
    assert "head" not in kinds and g.metadata["attention"] == "pass-through"
    P, L = len(g.metadata["token_ids"]), setup["model"].cfg.n_layers
    assert (g.nodes["kind"] == "mlp_error").sum() == L * (P - 1)
    assert (g.nodes["kind"] == "attn_error").sum() == len(setup["saes"]) * (P - 1)


def test_every_edge_matches_finite_differences_of_the_frozen_model(setup: dict[str, Any]) -> None:
    """All sources at once (one batch row each) in the oracle's direct mode: every (source, reader) pair, so
    missing edges are caught as well as wrong ones."""
    graph = setup["graph"]
    o = oracle_for(setup)
    sources, readers = _rows(graph)
    B, deltas = o.doubling(sources)
    out = o.run(B, deltas, mode="direct")
    expected = torch.stack([o.value(out, t)[:-1] - o.value(out, t)[-1] for t in readers])  # [readers, sources]
    got = torch.zeros_like(expected)
    r_index = {t["node_id"]: i for i, t in enumerate(readers)}
    s_index = {s["node_id"]: j for j, s in enumerate(sources)}
    for s, t, w in zip(graph.edges["source"], graph.edges["target"], graph.edges["weight"]):
        got[r_index[t], s_index[s]] = w
    scale = float(expected.abs().max())
    assert scale > 0
    bad = (got - expected).abs() > 1e-4 * scale + 2e-3 * expected.abs()
    assert not bool(bad.any()), f"{int(bad.sum())} of {bad.numel()} edges differ; worst " \
                                f"{float((got - expected).abs().max()):.3g} (scale {scale:.3g})"
    # cross-position edges exist (attention is inside the edges) and reach the target
    nodes = graph.nodes.set_index("node_id")
    cross = graph.edges[nodes.loc[graph.edges["source"], "pos"].to_numpy() != nodes.loc[graph.edges["target"],
                                                                                        "pos"].to_numpy()]
    assert len(cross) > 0 and (cross["target"] == graph.target_id).any()


def test_every_total_attribution_matches_finite_differences(setup: dict[str, Any]) -> None:
    graph = setup["graph"]
    o = oracle_for(setup)
    sources, _ = _rows(graph)
    B, deltas = o.doubling(sources)
    out = o.run(B, deltas, mode="linear")
    expected = out["metric"][:-1] - out["metric"][-1]
    got = torch.tensor([s["attribution"] for s in sources])
    scale = float(expected.abs().max())
    assert torch.allclose(got, expected, atol=1e-4 * scale, rtol=2e-3), float((got - expected).abs().max())
    assert graph.nodes.set_index("node_id").loc[graph.target_id, "attribution"] == pytest.approx(
        float(out["metric"][-1]), rel=1e-4)


def test_the_target_is_its_direct_edges_plus_a_constant(setup: dict[str, Any]) -> None:
    """Conservation: with every node's write removed (the oracle's direct mode) the target and every reader keep
    only their constant term; the graph's edges from all candidates plus that constant give back the value."""
    graph = setup["graph"]
    o = oracle_for(setup)
    sources, readers = _rows(graph)
    B, deltas = o.doubling(sources, sign=-1.0)
    removed = {k: v.sum(0, keepdim=True) for k, v in deltas.items()}  # every node removed in one row
    out = o.run(1, removed, mode="direct")
    metric = graph.metadata["target"]["value"]
    into = graph.edges[graph.edges["target"] == graph.target_id]["weight"].sum()
    constant = float(out["metric"][0])
    assert into + constant == pytest.approx(metric, abs=1e-4 * abs(metric) + 1e-4)
    cons = graph.metadata["conservation"]
    assert cons["direct"]["constant"] == pytest.approx(constant, abs=1e-3 * abs(metric) + 1e-4)
    parts = cons["direct"]
    assert parts["features"] + parts["errors"] + parts["embeddings"] + parts["constant"] == pytest.approx(metric)
    kinds = graph.nodes.set_index("node_id")["kind"]
    e = graph.edges[graph.edges["target"] == graph.target_id]
    assert parts["errors"] == pytest.approx(e[kinds.loc[e["source"]].isin(["mlp_error", "attn_error"]).to_numpy()][
        "weight"].sum(), abs=1e-4)
    # every reader's bias column is its constant term
    nodes = graph.nodes.set_index("node_id")
    for t in readers:
        assert nodes.loc[t["node_id"], "bias"] == pytest.approx(float(o.value(out, t)[0]), abs=2e-4 * max(1.0, abs(
            t["value"])))
    # cancellation ratios: as defined, from the graph's own numbers
    absum = e["weight"].abs().sum()
    assert cons["direct_cancellation"] == pytest.approx(absum / abs(e["weight"].sum()), rel=1e-3)
    inputs = graph.nodes[graph.nodes["kind"].isin(["embedding", "mlp_error", "attn_error"])]
    assert cons["input_cancellation"] == pytest.approx(inputs["attribution"].abs().sum() / abs(metric), rel=1e-3)


def test_single_logit_targets_are_demeaned(setup: dict[str, Any]) -> None:
    model, graph = setup["model"], setup["graph"]
    t = graph.metadata["target"]
    assert t["kind"] == "logit" and t["demeaned"] is True
    with torch.no_grad():
        logits = model(torch.tensor([graph.metadata["token_ids"]]))[0, -1]
    assert t["value"] == pytest.approx(float(logits[t["token_id"]] - logits.mean()), abs=1e-4)


def test_logit_difference_targets_are_not_demeaned() -> None:
    model = load_model("tiny-llama")
    tcs = random_transcoders(model, [0, 1])
    g = build_graph(model, "Mary and John went to", tcs, {}, answer=" Mary", wrong=" John",
                    params=BuildParams(max_nodes=30))
    t = g.metadata["target"]
    with torch.no_grad():
        logits = model(torch.tensor([g.metadata["token_ids"]]))[0, -1]
    assert t["kind"] == "logit_diff" and not t["demeaned"]
    assert t["value"] == pytest.approx(float(logits[t["token_id"]] - logits[t["wrong_id"]]), abs=1e-4)


# ---------------------------------------------------------------------------------------------------------------
# The per-head split


def _split_cases(graph: Any, k: int = 4) -> list[tuple[str, list[str]]]:
    """(target, strongest sources) for the target, a transcoder feature of the last transcoder layer, and an
    attention-SAE feature when there is one; cross-position sources first."""
    nodes = graph.nodes.set_index("node_id")
    cases = []
    picks = [graph.target_id]
    for kind in ("transcoder", "attn_feature"):
        feats = graph.nodes[graph.nodes["kind"] == kind]
        if len(feats):
            last = feats[feats["layer"] == feats["layer"].max()]
            picks.append(last.reindex(last["attribution"].abs().sort_values(ascending=False).index)["node_id"].iloc[0])
    for t in picks:
        e = graph.edges[graph.edges["target"] == t].copy()
        e["cross"] = nodes.loc[e["source"], "pos"].to_numpy() != nodes.loc[t, "pos"]
        e = e.reindex(e["weight"].abs().sort_values(ascending=False).index)
        chosen = list(dict.fromkeys(e[e["cross"]]["source"].head(k).tolist() + e["source"].head(2).tolist()))
        cases.append((t, chosen))
    return cases


def test_head_split_sums_to_each_edge_and_each_part_is_its_own_finite_difference(setup: dict[str, Any]) -> None:
    """Each part (layer, head) is a difference of two oracle runs: u's write passing every attention layer below
    that one plus only that head at that layer (no attention above it), minus the same without that head — what
    is left are the paths whose last hop is that head. The residual part is the run with every pass-through
    attention layer closed. For an attention-SAE target the parts are its own read of each head's z."""
    from backend.circuits.split import refreeze, split_edges

    model, graph, tcs, saes = setup["model"], setup["graph"], setup["tcs"], setup["saes"]
    fz = refreeze(model, graph, tcs, saes)
    o = oracle_for(setup)
    nodes = graph.nodes.set_index("node_id", drop=False)
    weights = {(s, t): w for s, t, w in zip(graph.edges["source"], graph.edges["target"], graph.edges["weight"])}
    L, H = model.cfg.n_layers, model.cfg.n_heads
    passes = [l for l in range(L) if l not in saes]
    checked_cross = 0
    for target, sources in _split_cases(graph):
        split = split_edges(fz, graph, target, sources)
        t_row = nodes.loc[target].to_dict()
        scale = max(abs(weights.get((s, target), 0.0)) for s in sources) or 1.0
        for s in sources:
            parts = split[split["source"] == s]
            assert parts["weight"].sum() == pytest.approx(weights[(s, target)], abs=1e-4 * scale + 1e-6)
            checked_cross += int(nodes.loc[s, "pos"] != t_row["pos"])
        src_rows = [nodes.loc[s].to_dict() for s in sources]
        if t_row["kind"] == "attn_feature":  # its own read, head by head
            lt, p, i = int(t_row["layer"]), int(t_row["pos"]), int(t_row["feature"])
            B, deltas = o.doubling(src_rows)
            out = o.run(B, deltas, mode="direct")
            dz = out["z"][lt][:-1, p] - out["z"][lt][-1, p]  # [S, H, dh]
            W_enc = saes[lt].W_enc.detach()[:, i].reshape(H, -1)
            expected = (dz * W_enc[None]).sum(-1)  # [S, H]
            for k, s in enumerate(sources):
                parts = split[split["source"] == s].set_index("carrier")["weight"]
                for h in range(H):
                    got = parts.get(f"L{lt}.H{h}", 0.0)
                    assert got == pytest.approx(float(expected[k, h]), abs=1e-4 * scale + 1e-6), (s, h)
            continue
        # rows per source: ("below", l, -1) opens every pass-through layer under l; (name, l, h) also opens head h
        # of layer l. Paths whose last hop is (l, h) = the second minus the first; no layer open = residual only.
        runs = [("below", l, -1) for l in passes] + [(f"L{l}.H{h}", l, h) for l in passes for h in range(H)]
        rows, opens = [], []
        for s in src_rows:
            for _, l, h in runs:
                rows.append(s)
                gate = {lay: torch.full((H,), lay < l) for lay in passes}
                if h >= 0:
                    gate[l][h] = True
                opens.append(gate)
        B, deltas = o.doubling(rows)
        open_heads = {lay: torch.stack([g[lay] for g in opens] + [torch.ones(H, dtype=torch.bool)]) for lay in passes}
        out = o.run(B, deltas, mode="direct", open_heads=open_heads)
        fd = (o.value(out, t_row)[:-1] - o.value(out, t_row)[-1]).reshape(len(sources), len(runs))
        below = {l: j for j, (name, l, _) in enumerate(runs) if name == "below"}
        for k, s in enumerate(sources):
            parts = split[split["source"] == s].set_index("carrier")["weight"]
            lowest = fd[k, below[min(passes)]] if passes else None
            if lowest is not None:
                assert parts.get("residual", 0.0) == pytest.approx(float(lowest), abs=1e-4 * scale + 1e-6)
            for j, (name, l, h) in enumerate(runs):
                if h < 0:
                    continue
                expected = float(fd[k, j] - fd[k, below[l]])
                assert parts.get(name, 0.0) == pytest.approx(expected, abs=1e-4 * scale + 1e-6), (s, target, name)
    assert checked_cross > 0


def test_two_source_toy_case_splits_attention_credit_by_each_source_own_path() -> None:
    """One layer, three tokens: the target at position 2 reads one attention layer that attends to positions 1
    and 2. Each embedding's edge to the target is its own value through every head's OV circuit, weighted by its
    frozen pattern, plus (for position 2) the residual path — computed here by hand from the weights."""
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    cfg = HookedTransformerConfig(d_model=16, d_head=4, n_heads=2, n_layers=1, d_mlp=32, d_vocab=11, n_ctx=8,
                                  act_fn="relu", normalization_type="LN", seed=5, device="cpu", dtype=torch.float32)
    model = perturbed(HookedTransformer(cfg, move_to_device=False).eval(), seed=9)
    ids = [0, 3, 7]
    graph = build_graph(model, ids, {}, {}, answer=4, params=BuildParams(max_nodes=10))
    _, cache = model.run_with_cache(torch.tensor([ids]))
    c = {k: v[0].detach() for k, v in cache.items()}
    W_U = model.W_U.detach()
    u = W_U[:, 4] - W_U.mean(1)
    r = model.ln_final.w.detach() * u
    r = (r - r.mean()) / c["ln_final.hook_scale"][2, 0]
    attn = model.blocks[0].attn
    expected = {}
    for s in (1, 2):
        emb = c["hook_embed"][s] + c["hook_pos_embed"][s]
        x = (emb - emb.mean()) / c["blocks.0.ln1.hook_scale"][s, 0] * model.blocks[0].ln1.w.detach()
        per_head = [float((c["blocks.0.attn.hook_pattern"][h, 2, s] * (x @ attn.W_V[h] @ attn.W_O[h]) @ r).detach())
                    for h in range(2)]
        expected[s] = (per_head, float(emb @ r) if s == 2 else 0.0)
    edges = {(a, b): w for a, b, w in zip(graph.edges["source"], graph.edges["target"], graph.edges["weight"])}
    for s in (1, 2):
        heads, residual = expected[s]
        assert edges[(f"E_{s}", graph.target_id)] == pytest.approx(sum(heads) + residual, rel=1e-4, abs=1e-6)
    from backend.circuits.split import refreeze, split_edges

    split = split_edges(refreeze(model, graph, {}, {}), graph, graph.target_id, ["E_1", "E_2"])
    for s in (1, 2):
        parts = split[split["source"] == f"E_{s}"].set_index("carrier")["weight"]
        assert [parts.get(f"L0.H{h}", 0.0) for h in range(2)] == pytest.approx(expected[s][0], rel=1e-4, abs=1e-6)
        assert parts.get("residual", 0.0) == pytest.approx(expected[s][1], rel=1e-4, abs=1e-6)


def test_same_position_transcoder_edges_factorise_their_residual_part(setup: dict[str, Any]) -> None:
    """The residual-stream part of a same-position transcoder -> transcoder edge is source activation ×
    (decoder row · encoder column) × 1/ln2 scale; the per-head split's residual part equals that product when no
    skip term lies between the two layers."""
    from backend.circuits.split import refreeze, split_edges

    model, graph, tcs = setup["model"], setup["graph"], setup["tcs"]
    nodes = graph.nodes.set_index("node_id")
    tt = graph.edges[graph.edges["invariant"].notna()]
    if len(tcs) < 2:
        assert len(tt) == 0
        return
    assert len(tt) > 0
    assert set(nodes.loc[tt["source"], "kind"]) | set(nodes.loc[tt["target"], "kind"]) == {"transcoder"}
    assert (nodes.loc[tt["source"], "pos"].to_numpy() == nodes.loc[tt["target"], "pos"].to_numpy()).all()
    o = oracle_for(setup)
    fz = refreeze(model, graph, tcs, setup["saes"])
    skips = {l for l, tc in tcs.items() if hasattr(tc, "W_skip")}
    for r in tt.head(10).itertuples():
        s, t = nodes.loc[r.source], nodes.loc[r.target]
        enc = tcs[int(t["layer"])].W_enc.detach()[:, int(t["feature"])]
        if model.cfg.normalization_type.startswith("LN"):
            enc = enc - enc.mean()
        assert r.invariant == pytest.approx(float(tcs[int(s["layer"])].W_dec.detach()[int(s["feature"])] @ enc),
                                            rel=1e-4, abs=1e-6)
        assert r.source_factor == pytest.approx(float(s["activation"]), rel=1e-6)
        scale = o.clean[hook_name("mlp_scale", int(t["layer"]))][int(t["pos"]), 0]
        assert r.norm_factor == pytest.approx(float(1 / scale), rel=1e-5)
        if not any(int(s["layer"]) < l < int(t["layer"]) for l in skips):
            split = split_edges(fz, graph, r.target, [r.source]).set_index("carrier")["weight"]
            assert split.get("residual", 0.0) == pytest.approx(r.source_factor * r.invariant * r.norm_factor,
                                                               rel=1e-3, abs=1e-6)


def test_graphs_with_head_nodes_are_refused_a_split_in_one_sentence() -> None:
    from backend.circuits.split import refreeze
    from backend.errors import InputError
    from circuit_fixtures import make_graph

    with pytest.raises(InputError, match="rebuild it"):
        refreeze(None, make_graph(), {}, {})


# ---------------------------------------------------------------------------------------------------------------
# Graph scores, pruning, paths


def _hand_graph() -> Any:
    from backend.circuits.graph import NODE_COLUMNS, Graph

    kinds = {"e1": "embedding", "e2": "embedding", "m": "mlp_error", "f1": "transcoder", "f2": "transcoder",
             "t": "logit"}
    nodes = pd.DataFrame([{c: None for c in NODE_COLUMNS} | {"node_id": n, "kind": k, "is_target": n == "t"}
                          for n, k in kinds.items()])
    edges = [("e1", "f1", 2.0), ("m", "f1", -1.0), ("e2", "f2", 0.5), ("f1", "f2", 1.5), ("m", "f2", 0.25),
             ("f1", "t", 3.0), ("f2", "t", -1.0), ("m", "t", 0.5), ("e2", "t", 0.2)]
    e = pd.DataFrame(edges, columns=["source", "target", "weight"])
    for col in ("source_factor", "invariant", "norm_factor"):
        e[col] = float("nan")
    return Graph(nodes, e), list(kinds), edges


def test_graph_scores_match_a_numpy_power_series() -> None:
    graph, ids, edges = _hand_graph()
    n = len(ids)
    A = np.zeros((n, n))
    for s, t, w in edges:
        A[ids.index(t), ids.index(s)] = w
    An = np.abs(A) / np.maximum(np.abs(A).sum(1, keepdims=True), 1e-30)
    w = np.zeros(n)
    w[ids.index("t")] = 1.0
    infl, term = np.zeros(n), w.copy()
    for _ in range(n + 1):
        term = term @ An
        infl += term
    emb = [ids.index("e1"), ids.index("e2")]
    err = [ids.index("m")]
    replacement = infl[emb].sum() / (infl[emb].sum() + infl[err].sum())
    completeness = ((1 - An[:, err].sum(1)) * (infl + w)).sum() / (infl + w).sum()
    error_share = infl[err].sum() / infl.sum()
    got = graph_scores(graph)
    assert got["replacement"] == pytest.approx(replacement, rel=1e-9)
    assert got["completeness"] == pytest.approx(completeness, rel=1e-9)
    assert got["error_share"] == pytest.approx(error_share, rel=1e-9)
    assert 0 < got["replacement"] < 1 and 0 < got["completeness"] < 1


def test_every_graph_carries_its_scores_as_built_and_pruned(setup: dict[str, Any]) -> None:
    graph = setup["graph"]
    assert graph.metadata["scores"] == pytest.approx(graph_scores(graph))
    p = prune(graph, 0.8, 0.98)
    assert p.metadata["pruning"]["scores"] == pytest.approx(graph_scores(p))
    for s in (graph.metadata["scores"], p.metadata["pruning"]["scores"]):
        assert 0 <= s["replacement"] <= 1 and 0 <= s["completeness"] <= 1 and 0 <= s["error_share"] <= 1


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
    import networkx as nx

    g = nx.DiGraph(list(previous_edges))
    assert all(n == graph.target_id or nx.has_path(g, n, graph.target_id) for n in previous_nodes)
    capped = prune(graph, 0.99, 0.999, max_nodes=5)
    assert len(capped.nodes) <= 5 and graph.target_id in set(capped.nodes["node_id"])


def test_influence_is_the_path_sum_of_normalised_weights() -> None:
    """A hand-made graph: a -> b -> t and a -> t, with row-normalised fractions."""
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


# ---------------------------------------------------------------------------------------------------------------
# Faithfulness


def _independent_ablation(setup: dict[str, Any], circuit: Any, errors: str) -> float:
    """The metric with everything outside ``circuit`` zero-ablated, written with plain TransformerLens hooks:
    transcoder / attention-SAE features recomputed live and kept only if in the circuit, error nodes kept (clean
    or recomputed live) only if in the circuit, skip terms and non-SAE attention live, BOS untouched."""
    model, tcs, saes, graph = setup["model"], setup["tcs"], setup["saes"], setup["graph"]
    tokens = torch.tensor(graph.metadata["token_ids"])
    P = len(tokens)
    with torch.no_grad():
        _, cache = model.run_with_cache(tokens[None])
    in_circuit = set(circuit.nodes["node_id"])

    def kept(kind: str, layer: int, pos: int, feature: int | None = None) -> bool:
        from backend.circuits.graph import node_id

        return pos == 0 or node_id(kind, layer, pos, feature) in in_circuit

    stash: dict[str, torch.Tensor] = {}

    def keep_x(x: torch.Tensor, hook: Any) -> None:
        stash[hook.name] = x[0]

    def mlp(layer: int) -> Any:
        def hook(y: torch.Tensor, hook: Any) -> torch.Tensor:
            y = y[0]
            tc = tcs.get(layer)
            new = torch.zeros_like(y)
            if tc is None:
                clean = cache[hook_name("mlp_out", layer)][0]
                for p in range(P):
                    if kept("mlp_error", layer, p):
                        new[p] = y[p] if errors == "live" or p == 0 else clean[p]
                return new[None]
            x = stash[hook_name("mlp_in", layer)]
            xc = cache[hook_name("mlp_in", layer)][0]
            f = tc.encode(x)
            skip = x @ tc.W_skip.T if hasattr(tc, "W_skip") else torch.zeros_like(y)
            skip_c = xc @ tc.W_skip.T if hasattr(tc, "W_skip") else torch.zeros_like(y)
            for p in range(P):
                if p == 0:
                    new[p] = y[p]
                    continue
                mask = torch.tensor([kept("transcoder", layer, p, i) for i in range(f.shape[-1])])
                new[p] = (f[p] * mask) @ tc.W_dec + tc.b_dec + skip[p]
                if kept("mlp_error", layer, p):
                    if errors == "live":
                        new[p] += y[p] - (f[p] @ tc.W_dec + tc.b_dec + skip[p])
                    else:
                        new[p] += cache[hook_name("mlp_out", layer)][0, p] - (tc.encode(xc[p]) @ tc.W_dec + tc.b_dec
                                                                             + skip_c[p])
            return new[None]
        return hook

    def z_hook(layer: int) -> Any:
        def hook(z: torch.Tensor, hook: Any) -> torch.Tensor:
            if layer not in saes:
                return z
            sae = saes[layer]
            flat = z[0].reshape(P, -1)
            zc = cache[hook_name("z", layer)][0].reshape(P, -1)
            f = encode_z(sae, flat)
            new = flat.clone()
            for p in range(1, P):
                mask = torch.tensor([kept("attn_feature", layer, p, i) for i in range(f.shape[-1])])
                new[p] = (f[p] * mask) @ sae.W_dec + sae.b_dec
                if kept("attn_error", layer, p):
                    src = flat[p] - (f[p] @ sae.W_dec + sae.b_dec) if errors == "live" else \
                        zc[p] - (encode_z(sae, zc[p:p + 1])[0] @ sae.W_dec + sae.b_dec)
                    new[p] += src
            return new.reshape(z.shape)
        return hook

    hooks = []
    for l in range(model.cfg.n_layers):
        hooks += [(hook_name("mlp_in", l), keep_x), (hook_name("mlp_out", l), mlp(l)), (hook_name("z", l), z_hook(l))]
    with torch.no_grad():
        logits = model.run_with_hooks(tokens[None], fwd_hooks=hooks)[0, -1]
    t = graph.metadata["target"]
    return float(logits[t["token_id"]] - logits.mean())


def test_faithfulness_full_circuit_is_the_clean_metric_with_frozen_and_live_errors(setup: dict[str, Any]) -> None:
    model, graph, tcs, saes = setup["model"], setup["graph"], setup["tcs"], setup["saes"]
    clean = graph.metadata["target"]["value"]
    for errors in ("frozen", "live"):
        whole = check(model, graph, tcs, saes, errors=errors)  # the unpruned graph holds every candidate node
        assert whole.metric_full == pytest.approx(clean, abs=1e-3)
        assert whole.metric_circuit == pytest.approx(clean, abs=1e-3)
        assert whole.errors == errors


def test_partial_ablation_matches_an_independent_hook_computation(setup: dict[str, Any]) -> None:
    model, graph, tcs, saes = setup["model"], setup["graph"], setup["tcs"], setup["saes"]
    small = prune(graph, 0.3, 0.9)
    for errors in ("frozen", "live"):
        result = check(model, small, tcs, saes, errors=errors)
        assert result.metric_circuit == pytest.approx(_independent_ablation(setup, small, errors), abs=1e-3)
        nothing = graph.subgraph({graph.target_id})
        assert result.metric_empty == pytest.approx(_independent_ablation(setup, nothing, errors), abs=1e-3)
    from backend.circuits.faithfulness import check_both
    from backend.circuits.split import refreeze

    reused = check_both(model, small, tcs, saes, recording=refreeze(model, graph, tcs, saes).rec)  # no clean rerun
    for errors, result in reused.items():
        assert result.as_dict() == pytest.approx(check(model, small, tcs, saes, errors=errors).as_dict())
    tokens = torch.randint(0, model.cfg.d_vocab, (3, 12))
    tokens[:, 0] = graph.metadata["token_ids"][0]
    mean = check(model, small, tcs, saes, mode="mean", means=reference_means(model, tcs, saes, tokens), errors="live")
    assert mean.metric_full == pytest.approx(graph.metadata["target"]["value"], abs=1e-3)


def test_graphs_with_head_nodes_still_ablate_their_heads(setup: dict[str, Any]) -> None:
    """A graph stored before attention became a pass-through (head nodes, no "attention" key) keeps its own
    semantics: heads outside the circuit are ablated."""
    model, graph, tcs, saes = setup["model"], setup["graph"], setup["tcs"], setup["saes"]
    if saes:
        return
    old = copy.deepcopy(graph)
    del old.metadata["attention"]
    head = old.nodes.iloc[:1].copy()
    head[["node_id", "kind", "layer", "pos", "feature"]] = ["H0.1_3", "head", 0, 3, 1]
    old.nodes = pd.concat([old.nodes, head], ignore_index=True)
    result = check(model, old, tcs, saes)
    assert result.metric_full == pytest.approx(graph.metadata["target"]["value"], abs=1e-3)
    assert result.metric_circuit != pytest.approx(result.metric_full, abs=1e-4)  # the other heads are ablated


def test_faithfulness_says_when_the_fraction_means_nothing() -> None:
    fine = Faithfulness("zero", metric_full=4.0, metric_circuit=3.0, metric_empty=0.0, n_nodes=5)
    assert fine.caveat is None and fine.fraction == pytest.approx(0.75) and "fraction kept 0.750" in fine.summary()
    above = Faithfulness("zero", metric_full=4.0, metric_circuit=5.0, metric_empty=4.5, n_nodes=5)
    assert "beyond the full model" in above.caveat and "fraction" not in above.summary().split("->")[1][:20]
    negative = Faithfulness("zero", metric_full=-2.0, metric_circuit=-1.0, metric_empty=-3.0, n_nodes=5)
    assert negative.caveat is not None
    tiny = Faithfulness("mean", metric_full=4.0, metric_circuit=3.9, metric_empty=3.8, n_nodes=5)
    assert "differ by only 0.200" in tiny.caveat
    for f in (above, negative, tiny):
        assert f.caveat.count(". ") == 0 and f.caveat.endswith(".")  # one sentence
        assert f.as_dict()["caveat"] == f.caveat


# ---------------------------------------------------------------------------------------------------------------
# Invariant view, storage, targets


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
    assert back.metadata["scores"] == pytest.approx(graph.metadata["scores"])
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


# ---------------------------------------------------------------------------------------------------------------
# Gradient and IG edges (live attention patterns and norms)


@pytest.fixture(scope="module")
def live_setup() -> dict[str, Any]:
    """A short prompt on tiny-llama with transcoders on both layers (few targets: autograd edges are per target)."""
    model = load_model("tiny-llama")
    tcs = random_transcoders(model, [0, 1])
    graphs = {m: build_graph(model, "Mary and John went to", tcs, {}, params=BuildParams(max_nodes=40, method=m,
                                                                                         ig_steps=6))
              for m in ("relp", "gradient", "ig")}
    return {"model": model, "tcs": tcs, "graphs": graphs}


def _edge_map(graph: Any) -> dict[tuple[str, str], float]:
    return {(s, t): w for s, t, w in zip(graph.edges["source"], graph.edges["target"], graph.edges["weight"])}


def _live_readout(model: Any, tcs: dict[int, Any], node: dict, hooks: list, tokens: torch.Tensor, graph: Any) -> float:
    """A node's value with ``hooks`` on the live model (norms and patterns not frozen)."""
    seen: dict[str, torch.Tensor] = {}
    l = int(node["layer"])

    def grab(act: torch.Tensor, hook: Any) -> None:
        seen[hook.name] = act[0].detach()

    names = [hook_name("mlp_in", l)] if node["kind"] == "transcoder" else []
    with torch.no_grad():
        logits = model.run_with_hooks(tokens[None], fwd_hooks=hooks + [(n, grab) for n in names])[0, -1]
    if node["kind"] == "logit":
        t = graph.metadata["target"]
        return float(logits[t["token_id"]] - logits.mean())
    tc = tcs[l]
    i = int(node["feature"])
    return float(seen[hook_name("mlp_in", l)][int(node["pos"])] @ tc.W_enc[:, i].detach() + tc.b_enc[i].detach())


def _live_forced(model: Any, cache: dict[str, torch.Tensor], deltas: dict[str, list[tuple[int, torch.Tensor]]],
                 alpha: float = 1.0) -> list:
    """Hooks holding every node sublayer (embedding, MLP outputs) at its clean value plus ``deltas`` scaled:
    attention runs live (a path)."""
    def force(name: str) -> Any:
        def hook(act: torch.Tensor, hook: Any) -> torch.Tensor:
            new = cache[name].clone()
            for pos, vec in deltas.get(name, []):
                new[pos] += alpha * vec
            return new[None]
        return hook
    names = [EMBED] + [hook_name("mlp_out", l) for l in range(model.cfg.n_layers)]
    return [(n, force(n)) for n in names]


def _write(model: Any, tcs: dict[int, Any], cache: dict[str, torch.Tensor], node: dict) -> tuple[str, int, torch.Tensor]:
    k, l, p = node["kind"], int(node["layer"]), int(node["pos"])
    if k == "embedding":
        return EMBED, p, cache[EMBED][p]
    name = hook_name("mlp_out", l)
    tc = tcs[l]
    with torch.no_grad():
        f = tc.encode(cache[hook_name("mlp_in", l)][p])
    if k == "transcoder":
        return name, p, f[int(node["feature"])] * tc.W_dec[int(node["feature"])].detach()
    return name, p, cache[name][p] - tc.forward(cache[hook_name("mlp_in", l)][p]).detach()


def test_methods_share_nodes_and_differ_only_through_live_attention_and_norms(live_setup: dict[str, Any]) -> None:
    g = live_setup["graphs"]
    assert g["relp"].nodes["node_id"].tolist() == g["gradient"].nodes["node_id"].tolist() == g["ig"].nodes["node_id"].tolist()
    relp, grad = _edge_map(g["relp"]), _edge_map(g["gradient"])
    nodes = g["gradient"].nodes.set_index("node_id")
    for (s, t) in grad:
        assert nodes.loc[s, "pos"] <= nodes.loc[t, "pos"]
    assert set(grad) - set(relp) or any(abs(grad[k] - relp[k]) > 1e-6 for k in grad if k in relp)
    assert g["gradient"].edges["source_factor"].isna().all() and g["relp"].edges["source_factor"].notna().any()


def test_gradient_edges_match_central_differences_of_the_live_model(live_setup: dict[str, Any]) -> None:
    """Perturb one source's write by ±ε (every node sublayer held at its clean value, attention, norms and
    patterns live) and read the target: (v+ − v−)/2ε = the gradient edge."""
    model, tcs, graph = live_setup["model"], live_setup["tcs"], live_setup["graphs"]["gradient"]
    tokens = torch.tensor(graph.metadata["token_ids"])
    with torch.no_grad():
        _, cache = model.run_with_cache(tokens[None])
    cache = {k: v[0] for k, v in cache.items()}
    nodes = graph.nodes.set_index("node_id", drop=False)
    edges = graph.edges.reindex(graph.edges["weight"].abs().sort_values(ascending=False).index).head(12)
    eps = 1e-2
    for r in edges.itertuples():
        s_node, t_node = nodes.loc[r.source].to_dict(), nodes.loc[r.target].to_dict()
        name, pos, vec = _write(model, tcs, cache, s_node)
        up = _live_readout(model, tcs, t_node, _live_forced(model, cache, {name: [(pos, eps * vec)]}), tokens, graph)
        down = _live_readout(model, tcs, t_node, _live_forced(model, cache, {name: [(pos, -eps * vec)]}), tokens,
                             graph)
        assert (up - down) / (2 * eps) == pytest.approx(r.weight, rel=2e-2, abs=2e-3), (r.source, r.target)


def test_ig_edges_integrate_the_live_derivative_along_the_path(live_setup: dict[str, Any]) -> None:
    """Chain rule: for each target, the IG weights of its inputs add up to the midpoint-rule average of
    dvalue/dα along the path where every kept node's write is scaled by α (derivatives by central differences
    here, through the live model)."""
    model, tcs, graph = live_setup["model"], live_setup["tcs"], live_setup["graphs"]["ig"]
    steps = graph.metadata["params"]["ig_steps"]
    tokens = torch.tensor(graph.metadata["token_ids"])
    with torch.no_grad():
        _, cache = model.run_with_cache(tokens[None])
    cache = {k: v[0] for k, v in cache.items()}
    nodes = graph.nodes.set_index("node_id", drop=False)
    deltas: dict[str, list[tuple[int, torch.Tensor]]] = {}
    for r in graph.nodes.to_dict("records"):
        if r["kind"] != "logit":
            name, pos, vec = _write(model, tcs, cache, r)
            deltas.setdefault(name, []).append((pos, -vec))  # alpha scales the removal: write × (1 − (1 − α))

    def at(alpha: float) -> list:
        return _live_forced(model, cache, deltas, alpha=1 - alpha)

    sums = graph.edges.groupby("target")["weight"].sum()
    h = 1e-3
    for tid, total in list(sums.items())[:8]:
        t_node = nodes.loc[tid].to_dict()
        slopes = []
        for k in range(steps):
            alpha = (k + 0.5) / steps
            up = _live_readout(model, tcs, t_node, at(alpha + h), tokens, graph)
            down = _live_readout(model, tcs, t_node, at(alpha - h), tokens, graph)
            slopes.append((up - down) / (2 * h))
        assert total == pytest.approx(sum(slopes) / steps, rel=3e-2, abs=3e-3), tid
