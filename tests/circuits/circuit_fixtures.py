"""A small, hand-built attribution graph for tests of drawing and export (no model needed), and random
dictionaries for tests that build graphs (:func:`random_transcoders`, :func:`random_sae`).

``make_graph()`` returns a :class:`backend.circuits.graph.Graph` for a 6-token prompt (BOS included) on a 3-layer
model with every node kind, a logit target, positive and negative edges, transcoder -> transcoder edges whose
weight is ``source_factor x invariant x norm_factor`` (NaN factors on every other edge), influence values, and
hostile token text: HTML (``<img src=x onerror=alert(1)>``), ``&``, quotes and backslashes, RTL override,
zero-width and control characters, and emoji.
"""

from __future__ import annotations

import math
import random

from typing import Any

import pandas as pd

from backend.circuits.graph import EDGE_COLUMNS, NODE_COLUMNS, Graph, node_id

HOSTILE_HTML = "<img src=x onerror=alert(1)>"
QUOTES_TOKEN = ' & "quoted" \'single\' back\\slash\\'
TOKENS: list[str] = [
    "<|endoftext|>",
    HOSTILE_HTML,
    QUOTES_TOKEN,
    "\u202eevil\u200b\x1b[0m",  # RTL override, zero-width space, an escape sequence (not valid in XML)
    " 👩\u200d🔬 café",  # emoji ZWJ sequence and a non-ASCII letter
    " is",
]
TOKEN_IDS: list[int] = [0, 1022, 5, 777, 4242, 318]
TARGET_TOKEN = " <b>Paris</b>"
TARGET_ID = 651
N_LAYERS = 3

# (kind, layer, pos, index, activation, influence, label); index = feature / head / token id.
_NODES: list[tuple[str, int, int, int | None, float, float, str]] = [
    *[("embedding", -1, p, TOKEN_IDS[p], 1.0 + 0.1 * p, 0.02 * (p + 1), TOKENS[p]) for p in range(len(TOKENS))],
    ("transcoder", 0, 1, 17, 2.5, 0.05, 'html "feature"'),
    ("transcoder", 0, 2, 5, 1.7, 0.09, "quote \\ backslash"),
    ("transcoder", 0, 5, 17, 3.1, 0.21, "copula"),
    ("transcoder", 1, 2, 5, 0.9, 0.07, "ampersand"),
    ("transcoder", 1, 4, 3, 1.2, 0.06, "science"),
    ("transcoder", 1, 5, 1034, 4.2, 0.33, "capital city"),
    ("transcoder", 1, 5, 8, 0.6, 0.04, "negated"),
    ("transcoder", 2, 5, 77, 5.0, 0.40, "say Paris"),
    ("mlp_error", 0, 5, None, 0.8, 0.03, ""),
    ("mlp_error", 1, 2, None, 0.5, 0.01, ""),
    ("mlp_error", 1, 5, None, 1.1, 0.08, ""),
    ("mlp_error", 2, 5, None, 1.3, 0.12, ""),
    ("head", 0, 5, 1, 0.7, 0.10, "L0H1 prev-token"),
    ("head", 1, 5, 3, 1.9, 0.18, "L1H3 mover"),
    ("attn_feature", 2, 5, 42, 2.2, 0.15, "attends to country"),
    ("attn_feature", 2, 4, 9, 0.4, 0.02, "<script>x</script>"),
    ("attn_error", 2, 5, None, 0.6, 0.05, ""),
    ("logit", N_LAYERS, 5, TARGET_ID, 3.2, 1.0, f"logit {TARGET_TOKEN}"),
]

# Transcoder -> transcoder edges: (source, target, source_factor, invariant, norm_factor).
_TC_EDGES: list[tuple[str, str, float, float, float]] = [
    ("T0_5_17", "T1_5_1034", 3.1, 0.42, 0.9),
    ("T0_5_17", "T1_5_8", 3.1, -0.25, 0.9),
    ("T0_2_5", "T1_2_5", 1.7, 0.30, 1.1),
    ("T1_5_1034", "T2_5_77", 4.2, 0.55, 0.8),
    ("T1_5_8", "T2_5_77", 0.6, -0.70, 0.8),
]
# Every other edge: (source, target, weight).
_OTHER_EDGES: list[tuple[str, str, float]] = [
    ("E_1", "T0_1_17", 1.4),
    ("E_2", "T0_2_5", 0.9),
    ("E_5", "T0_5_17", 1.6),
    ("E_5", "H0.1_5", 0.3),
    ("E_4", "H0.1_5", 0.5),
    ("E_1", "H0.1_5", -0.2),
    ("H0.1_5", "T0_5_17", 0.7),
    ("T0_1_17", "H1.3_5", 0.6),
    ("T0_2_5", "H1.3_5", -0.4),
    ("H1.3_5", "T1_5_1034", 1.2),
    ("M0_5", "T1_5_1034", 0.35),
    ("E_4", "T1_4_3", 0.8),
    ("T1_4_3", "A2_5_42", 0.9),
    ("T1_2_5", "A2_5_42", 0.45),
    ("M1_2", "A2_5_42", -0.15),
    ("E_3", "A2_4_9", 0.25),
    ("A2_5_42", "T2_5_77", 0.65),
    ("AE2_5", "T2_5_77", -0.1),
    ("T2_5_77", "L_651", 2.9),
    ("T1_5_1034", "L_651", 1.1),
    ("A2_5_42", "L_651", 0.8),
    ("H1.3_5", "L_651", 0.5),
    ("M2_5", "L_651", 0.6),
    ("M1_5", "L_651", -0.45),
    ("AE2_5", "L_651", 0.2),
    ("E_5", "L_651", -0.3),
]


def make_graph(extra_edges: int = 0, with_influence: bool = True, seed: int = 0) -> Graph:
    """The synthetic test graph.

    ``extra_edges`` adds that many random edges (random signs and magnitudes) and about sqrt(extra_edges) extra
    transcoder features for them to connect, for tests of drawing many edges; ``with_influence=False`` leaves
    influence NaN everywhere (as before pruning).
    """
    rng = random.Random(seed)
    specs = list(_NODES)
    if extra_edges:
        # Enough extra transcoder features that ``extra_edges`` distinct (source, target) pairs exist.
        n_extra = int(math.sqrt(extra_edges)) + 10
        specs += [("transcoder", rng.randrange(N_LAYERS), rng.randrange(1, len(TOKENS)), 10_000 + i,
                   rng.uniform(0.1, 3.0), rng.uniform(0.0, 0.05), f"extra {i}") for i in range(n_extra)]
    rows = []
    for kind, layer, pos, index, activation, influence, label in specs:
        nid = node_id(kind, layer, pos, index)
        rows.append({
            "node_id": nid, "kind": kind, "layer": layer, "pos": pos,
            "feature": index,  # None for error nodes (NULL in the store)
            "activation": activation,
            "value": activation * (1.1 if kind in ("transcoder", "attn_feature") else 1.0),
            "bias": 0.05 if kind in ("transcoder", "attn_feature") else 0.0,
            "attribution": (-0.5 if label == "negated" else 0.8) * influence,
            "influence": influence if with_influence else math.nan,
            "label": label,
            "dict_id": {"transcoder": f"tc-gpt-L{layer}", "attn_feature": f"attn-sae-L{layer}"}.get(kind),
            "is_target": kind == "logit",
        })
    nodes = pd.DataFrame(rows, columns=list(NODE_COLUMNS))
    nodes["feature"] = nodes["feature"].astype("Int64")  # nullable ints, as backend.circuits.build writes them

    edge_rows = [{"source": s, "target": t, "weight": sf * inv * nf, "source_factor": sf, "invariant": inv,
                  "norm_factor": nf} for s, t, sf, inv, nf in _TC_EDGES]
    edge_rows += [{"source": s, "target": t, "weight": w, "source_factor": math.nan, "invariant": math.nan,
                   "norm_factor": math.nan} for s, t, w in _OTHER_EDGES]
    if extra_edges:
        ids = list(nodes["node_id"])
        seen = {(r["source"], r["target"]) for r in edge_rows}
        while len(edge_rows) < len(_TC_EDGES) + len(_OTHER_EDGES) + extra_edges:
            s, t = rng.sample(ids, 2)
            if (s, t) in seen:
                continue
            seen.add((s, t))
            edge_rows.append({"source": s, "target": t, "weight": rng.choice((-1, 1)) * rng.expovariate(1.0),
                              "source_factor": math.nan, "invariant": math.nan, "norm_factor": math.nan})
    edges = pd.DataFrame(edge_rows, columns=list(EDGE_COLUMNS))

    metadata = {
        "model": "tiny-llama",
        "prompt": "".join(TOKENS[1:]),
        "tokens": list(TOKENS),
        "token_ids": list(TOKEN_IDS),
        "target": {"kind": "logit", "token_id": TARGET_ID, "token": TARGET_TOKEN, "wrong_id": None, "wrong": None,
                   "value": 3.2, "prob": 0.4213},
        "method": "transcoder",
        "dictionaries": {"transcoders": [f"tc-gpt-L{i}" for i in range(N_LAYERS)], "attn_saes": ["attn-sae-L2"],
                         "transcoder_layers": list(range(N_LAYERS)), "attn_sae_layers": [2]},
        "params": {"max_feature_nodes": 64, "batch_size": 4, "norm": "frozen"},
        "n_layers": N_LAYERS,
        "pruning": {"node_threshold": 0.8, "edge_threshold": 0.98},
    }
    return Graph(nodes=nodes, edges=edges, metadata=metadata)


def random_transcoders(model: Any, layers: dict[int, str] | list[int], seed: int = 0) -> dict[int, Any]:
    """Random sae-lens transcoders (``{layer: architecture}``, default plain ``transcoder``) whose features fire on
    real activations (a few per token); skip transcoders get a random ``W_skip``, JumpReLU ones a threshold."""
    import torch
    from sae_lens.registry import SAE_CLASS_REGISTRY

    arch = layers if isinstance(layers, dict) else {l: "transcoder" for l in layers}
    d = model.cfg.d_model
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for layer, name in arch.items():
        cls, cfg_cls = SAE_CLASS_REGISTRY[name]
        tc = cls(cfg_cls(d_in=d, d_sae=4 * d, d_out=d, apply_b_dec_to_input=False))
        with torch.no_grad():
            tc.W_enc.copy_(torch.randn(d, 4 * d, generator=gen) / d ** 0.5)
            tc.b_enc.fill_(-1.0)
            tc.W_dec.copy_(torch.randn(4 * d, d, generator=gen) * 0.05)
            tc.b_dec.copy_(torch.randn(d, generator=gen) * 0.01)
            if hasattr(tc, "W_skip"):
                tc.W_skip.copy_(torch.randn(d, d, generator=gen) * 0.3 / d ** 0.5)
            if hasattr(tc, "threshold"):
                tc.threshold.fill_(0.2)
        out[layer] = tc.eval()
    return out


def random_sae(model: Any, seed: int = 1) -> Any:
    """A random TopK hook_z SAE with nonzero biases (so b_dec is a real constant)."""
    import torch

    from backend.dictionaries.attention_sae import make_random_sae

    sae = make_random_sae(model.cfg.n_heads * model.cfg.d_head, 64, k=4, seed=seed)
    gen = torch.Generator().manual_seed(seed + 7)
    with torch.no_grad():
        sae.b_dec.copy_(torch.randn(sae.b_dec.shape, generator=gen) * 0.05)
        sae.b_enc.copy_(torch.randn(sae.b_enc.shape, generator=gen) * 0.05)
    return sae
