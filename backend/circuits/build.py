"""Build the attribution graph of a prompt and a target (a demeaned logit or a logit difference).

1. Record one clean forward pass and build the frozen linear system of the prompt: its candidate nodes and its
   pass-throughs (attention in layers without an attention SAE, skip transcoders' linear terms;
   :mod:`.replacement`).
2. Score each candidate by its **total attribution** to the target in that system (all paths, through nodes and
   pass-throughs; one reverse sweep) and keep the ``max_nodes`` features with the largest |total attribution|,
   plus every token embedding, every error node and the target (circuit-tracer also keeps every error node: a
   graph that dropped some would hide where the replacement fails, and its scores would flatter it).
3. Edges among the kept nodes (default): the direct effect of each source on each target's value with norms and
   attention patterns frozen, every path through the pass-throughs included (edge method ``"relp"``: these are
   exactly the LRP rules for this model — norms by the identity rule, attention with its pattern held constant,
   the transcoders' ReLUs by the identity rule, linear maps exact — so RelP's relevance equals the frozen direct
   effect). Methods ``"gradient"`` and ``"ig"`` keep attention patterns and norms live instead (:mod:`.methods`);
   node selection is the same.
4. Facts a user needs to judge the graph, in ``metadata``: ``conservation`` (the target as the sum of its direct
   edges from every candidate plus a constant, by node kind, and two cancellation ratios) and ``scores``
   (circuit-tracer's replacement and completeness scores, :mod:`.quality`).

Pruning by influence is a separate pure function (:mod:`.prune`): a graph is stored as built.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any, Sequence

from backend.circuits.graph import NODE_COLUMNS, Graph
from backend.circuits.methods import METHODS, edges_autograd
from backend.circuits.prune import graph_scores
from backend.circuits.quality import conservation
from backend.circuits.replacement import (
    FEATURE_KINDS,
    Candidates,
    Frozen,
    Target,
    edges,
    freeze,
    node_ids,
    node_labels,
    record,
    total_attribution,
)
from backend.errors import InputError, literal

if TYPE_CHECKING:
    import pandas as pd
    import torch

EDGE_METHODS: tuple[str, ...] = METHODS


@dataclass
class BuildParams:
    """How a graph is built (stored with it). ``max_nodes``: feature nodes kept (embeddings, error nodes and the
    target are always kept)."""

    max_nodes: int = 400
    method: str = "relp"  # edge weights: "relp" (frozen norms and patterns), "gradient" or "ig" (backend.circuits.methods)
    ig_steps: int = 4
    max_tokens: int = 64  # longer prompts are truncated with a warning: edges grow with positions squared


def resolve_target(model: Any, token_ids: Sequence[int], answer: str | int | None = None,
                   wrong: str | int | None = None, last_logits: "torch.Tensor | None" = None) -> Target:
    """The target: ``answer`` (a single-token string or id; default: the model's top prediction at the last
    position, from ``last_logits`` when given, else one forward pass), minus ``wrong``'s logit if given.
    Multi-token answers get one clear sentence."""
    import torch

    def one(tok: str | int, what: str) -> int:
        if isinstance(tok, int):
            if not 0 <= tok < model.cfg.d_vocab:
                raise InputError(f"The {what} token id {tok} is outside the vocabulary (0..{model.cfg.d_vocab - 1}).")
            return tok
        ids = model.tokenizer(tok, add_special_tokens=False)["input_ids"]
        if len(ids) != 1:
            raise InputError(f"The {what} {literal(repr(tok))} is {len(ids)} tokens for this model: give a single token "
                             "(often with a leading space, e.g. ' Paris').")
        return int(ids[0])

    if answer is None or answer == "":
        if last_logits is None:
            with torch.no_grad():
                last_logits = model(torch.tensor([list(token_ids)]))[0, -1]
        token = int(last_logits.argmax())
    else:
        token = one(answer, "answer")
    wrong_id = None if wrong in (None, "") else one(wrong, "wrong answer")  # type: ignore[arg-type]
    if wrong_id == token:
        raise InputError("The answer and the wrong answer are the same token: pick two different ones.")
    return Target(token, wrong_id)


def select_nodes(c: Candidates, attribution: "torch.Tensor", max_nodes: int) -> "torch.Tensor":
    """Indices kept: every embedding, every error node, the target, and the ``max_nodes`` features with the
    largest |total attribution| (ties broken by index, so the choice is deterministic)."""
    import torch

    always = [i for i, k in enumerate(c.kind) if k not in FEATURE_KINDS]
    features = torch.tensor([i for i, k in enumerate(c.kind) if k in FEATURE_KINDS], dtype=torch.long)
    if len(features):
        order = torch.argsort(-attribution[features].abs(), stable=True)
        features = features[order[: max(0, int(max_nodes))]]
    return torch.sort(torch.cat([torch.tensor(always, dtype=torch.long), features])).values


def build_graph(
    model: Any,
    prompt: str | bytes | Sequence[int],
    transcoders: dict[int, Any],
    attn_saes: dict[int, Any] | None = None,
    answer: str | int | None = None,
    wrong: str | int | None = None,
    params: BuildParams | None = None,
    model_name: str | None = None,
) -> Graph:
    """The attribution graph of ``prompt`` (text, or token ids with BOS first) for its target (see
    :func:`resolve_target`), with ``transcoders`` ``{layer: sae-lens Transcoder}`` replacing MLPs (layers without
    one become error nodes) and ``attn_saes`` ``{layer: hook_z SAE}`` replacing those layers' attention."""
    return build(model, prompt, transcoders, attn_saes, answer, wrong, params, model_name)[0]


def build(
    model: Any,
    prompt: str | bytes | Sequence[int],
    transcoders: dict[int, Any],
    attn_saes: dict[int, Any] | None = None,
    answer: str | int | None = None,
    wrong: str | int | None = None,
    params: BuildParams | None = None,
    model_name: str | None = None,
) -> tuple[Graph, Frozen]:
    """:func:`build_graph`, also returning the prompt's frozen system (its clean recording included), for callers
    that go on to split edges by head or check faithfulness on the same prompt without running it again."""
    import torch

    from backend.inputs.prompts import encode_prompt, token_strings

    params = params or BuildParams()
    if params.method not in EDGE_METHODS:
        raise InputError(f"Unknown edge method {params.method!r}: use one of {', '.join(EDGE_METHODS)}.")
    t0 = time.perf_counter()
    warnings: list[str] = []
    if isinstance(prompt, (str, bytes)):
        enc = encode_prompt(model, prompt, max_tokens=params.max_tokens)
        ids, strings, warnings = enc.ids, enc.strings, list(enc.warnings)
    else:
        ids = [int(i) for i in prompt]
        strings = token_strings(model.tokenizer, ids) if model.tokenizer is not None else [str(i) for i in ids]
    if len(ids) < 2:
        raise InputError("The prompt needs at least one token after BOS to build a graph: type more text.")
    tokens = torch.tensor(ids)
    with torch.no_grad():
        rec = record(model, tokens)  # the clean run also names the default target: no second forward pass
        target = resolve_target(model, ids, answer, wrong, last_logits=rec.logits[-1])
        fz = freeze(model, tokens, target, transcoders, attn_saes, rec=rec)
        cand = fz.cand
        attribution = total_attribution(fz)
        keep = select_nodes(cand, attribution, params.max_nodes)
        direct = edges(fz, keep)  # the biases and the target's edges from every candidate come with it
    W = direct.W
    if params.method != "relp":
        W = edges_autograd(model, cand, fz.rec, keep, target, transcoders, attn_saes or {}, params.method,
                           steps=params.ig_steps)
    nodes = _node_frame(cand, keep, attribution, direct.bias, strings)
    edge_rows = _edge_frame(model, cand, keep, W, nodes["node_id"].tolist(), transcoders, fz.rec,
                            factorised=params.method == "relp")
    tok = model.tokenizer
    decode = (lambda i: tok.decode([i])) if tok is not None else str  # noqa: E731
    is_feature = torch.tensor([k in FEATURE_KINDS for k in cand.kind])
    metadata = {
        "model": model_name or model.cfg.model_name,
        "prompt": "".join(strings[1:]) if not isinstance(prompt, (str, bytes)) else prompt if isinstance(prompt, str)
        else prompt.decode("utf-8-sig"),
        "tokens": strings,
        "token_ids": ids,
        "target": {"kind": target.kind, "token_id": target.token_id, "token": decode(target.token_id),
                   "wrong_id": target.wrong_id, "wrong": None if target.wrong_id is None else decode(target.wrong_id),
                   "value": float(cand.value[cand.target]),
                   # a single logit is demeaned (logit − mean logit), as circuit-tracer does
                   "demeaned": target.wrong_id is None,
                   "prob": float(torch.softmax(fz.rec.logits[-1], -1)[target.token_id])},
        "method": params.method,
        "attention": "pass-through",  # no head nodes: attention in non-SAE layers is part of the edges
        "params": asdict(params),
        "n_layers": int(model.cfg.n_layers),
        "dictionaries": {
            "transcoders": sorted({d for d, k in zip(cand.dict_id, cand.kind) if k == "transcoder" and d}),
            "attn_saes": sorted({d for d, k in zip(cand.dict_id, cand.kind) if k == "attn_feature" and d}),
            "transcoder_layers": sorted(int(l) for l in transcoders),
            "attn_sae_layers": sorted(int(l) for l in (attn_saes or {})),
            "skip_layers": sorted(int(l) for l in fz.skip),
        },
        "n_candidates": len(cand),
        # share of all features' |total attribution| that the kept features carry
        "candidate_attribution_kept": float(attribution[keep[is_feature[keep]]].abs().sum() / attribution[
            is_feature].abs().sum().clamp_min(1e-12)) if bool(is_feature.any()) else 1.0,
        "conservation": conservation(cand, attribution, direct.to_target),
        "warnings": warnings,
    }
    graph = Graph(nodes=nodes, edges=edge_rows, metadata=metadata)
    graph.metadata["scores"] = graph_scores(graph)
    graph.metadata["seconds"] = round(time.perf_counter() - t0, 3)
    return graph, fz


def _node_frame(c: Candidates, keep: "torch.Tensor", attribution: "torch.Tensor", bias: "torch.Tensor",
                strings: Sequence[str]) -> "pd.DataFrame":
    import pandas as pd

    labels = node_labels(c, strings)
    ids = node_ids(c)
    rows = []
    for j, i in enumerate(keep.tolist()):
        k = c.kind[i]
        index = int(c.index[i])
        rows.append({
            "node_id": ids[i], "kind": k, "layer": int(c.layer[i]), "pos": int(c.pos[i]),
            "feature": None if index < 0 else index,
            "activation": float(c.activation[i]), "value": float(c.value[i]), "bias": float(bias[j]),
            "attribution": float(attribution[i]), "influence": float("nan"), "label": labels[i],
            "dict_id": c.dict_id[i], "is_target": i == c.target,
        })
    frame = pd.DataFrame(rows, columns=list(NODE_COLUMNS))
    frame["feature"] = frame["feature"].astype("Int64")
    return frame


def _edge_frame(model: Any, c: Candidates, keep: "torch.Tensor", W: "torch.Tensor", ids: list[str],
                transcoders: dict[int, Any], rec: Any, factorised: bool = True) -> "pd.DataFrame":
    """Nonzero entries of ``W`` as rows. Same-position transcoder -> transcoder edges get the factors of their
    residual-stream part, ``source activation × W_dec[j]·W_enc[:, i] (input-invariant) × 1/ln2 scale``: the
    input-invariant factor always, the other two when ``factorised`` (frozen-norm edges). The edge's weight is that
    product plus the paths through attention and skip terms; other edges have no residual part (NaN factors)."""
    import pandas as pd
    import torch

    from backend.circuits.replacement import center
    from backend.model.hooks import hook_name

    t_idx, s_idx = torch.nonzero(W, as_tuple=True)
    weight = W[t_idx, s_idx]
    n = len(weight)
    source_factor = torch.full((n,), float("nan"))
    invariant = torch.full((n,), float("nan"))
    norm_factor = torch.full((n,), float("nan"))
    is_tc = torch.tensor([c.kind[i] == "transcoder" for i in keep.tolist()])
    same_pos = c.pos[keep[t_idx]] == c.pos[keep[s_idx]]
    both = torch.nonzero(is_tc[t_idx] & is_tc[s_idx] & same_pos, as_tuple=True)[0]
    if len(both):
        g_t, g_s = keep[t_idx[both]], keep[s_idx[both]]
        d = c.out.shape[1]
        dec, enc = torch.empty(len(both), d), torch.empty(len(both), d)
        for layer, tc in transcoders.items():
            m = c.layer[g_s] == layer
            dec[m] = tc.W_dec.detach()[c.index[g_s[m]]]
            m = c.layer[g_t] == layer
            enc[m] = center(model, tc.W_enc.detach()[:, c.index[g_t[m]]].T)
        scale = torch.stack([rec.acts[hook_name("mlp_scale", l)][:, 0] for l in range(model.cfg.n_layers)])
        # Input-invariant: the source's decoder row . the target's encoder column (Dunefsky et al. 2024).
        invariant[both] = (dec * enc).sum(-1)
        if factorised:
            source_factor[both] = c.activation[g_s]
            norm_factor[both] = 1.0 / scale[c.layer[g_t], c.pos[g_t]]
    return pd.DataFrame({
        "source": [ids[i] for i in s_idx.tolist()], "target": [ids[i] for i in t_idx.tolist()],
        "weight": weight.double().cpu().numpy(), "source_factor": source_factor.double().cpu().numpy(),
        "invariant": invariant.double().cpu().numpy(), "norm_factor": norm_factor.double().cpu().numpy(),
    })
