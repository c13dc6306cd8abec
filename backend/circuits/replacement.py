"""The local replacement model of one prompt, linearised: every candidate node and how it reads the stream.

Written by hand: neither sae-lens nor TransformerLens builds attribution graphs, and circuit-tracer (the
reference implementation) needs its own model wrappers and cross-layer transcoders; the algebra below follows
Dunefsky et al. 2024 and circuit-tracer (docs/methods.md §2, §4). Every activation comes from TransformerLens hooks.

**The replacement model.** One clean forward pass is recorded. Then, for this prompt:

* every norm's scale (``ln1``, ``ln2``, ``ln_final`` ``hook_scale``) is frozen, so norms are linear maps;
* every attention pattern is frozen, so a head's output at ``p`` is linear in the residual stream at the
  positions ``s <= p`` it attends to (through its value/output circuit);
* each MLP's output is replaced by its transcoder's features (``f_i · W_dec[i]``) plus an **error node**
  (MLP output − transcoder output, held constant) plus ``b_dec``; a layer without a transcoder is one error node;
* each head writes along its own clean output direction ``ô`` (a head writes a vector, not a scalar: as a node its
  value is ``ô·o`` = ``|o|``, and a perturbation of its input moves it along ``ô`` only);
* where an attention SAE exists for a layer, that layer's heads are replaced by its features plus an error node.

Then every node's value is a linear function of the nodes written before it — ``value_t = Σ_u w_tu + bias_t``
with ``w_tu = out_u · r_t`` (``out_u``: the vector ``u`` writes; ``r_t``: how ``t`` reads the stream) — and this
linear system *is* the graph. BOS (position 0) is an attention sink whose residual is the same for every prompt:
nothing at position 0 is a node; what it writes is part of the bias, like ``b_dec``, ``b_O`` and the norms' biases.

**Depths.** Nodes write into the residual stream at a depth: embeddings 0, attention of layer ``l`` ``2l+1``, MLP
of layer ``l`` ``2l+2``; the target logit sits at ``2L+1``. A node reads everything written at smaller depths:
a transcoder feature of layer ``l`` reads ``resid_mid`` (≤ ``2l+1``) at its position, a head or attention feature of
layer ``l`` reads ``resid_pre`` (≤ ``2l``) at every position it attends to.

**Total attribution** (:func:`total_attribution`): each node's ``activation × ∂metric/∂activation`` in this linear
system (the sum over all its paths to the target), by one reverse sweep over depths — the same numbers a backward
pass through the frozen replacement model gives (tests/circuits/test_circuits.py checks this against autograd).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Sequence

from backend.model.hooks import EMBED, FINAL_SCALE, hook_name

if TYPE_CHECKING:
    import torch


@dataclass
class Target:
    """What the graph explains: the logit of ``token_id`` at the last position, or ``token_id``'s logit minus
    ``wrong_id``'s (a logit difference) when ``wrong_id`` is set."""

    token_id: int
    wrong_id: int | None = None

    @property
    def kind(self) -> str:
        return "logit" if self.wrong_id is None else "logit_diff"


@dataclass
class Candidates:
    """Every candidate node of one prompt, vectorised (N nodes). Index ``i`` is the same in every field.

    ``out[i]``: the vector node ``i`` writes into the residual stream (``activation × direction``).
    ``value[i]``: the node's value (pre-activation / ``ô·o`` / metric); NaN for exogenous nodes (embeddings,
    errors), which have no inputs. ``readers``: how each non-exogenous node reads the stream (see
    :class:`PosReader`, :class:`AttnReader`).
    """

    kind: list[str]
    layer: "torch.Tensor"
    pos: "torch.Tensor"
    index: "torch.Tensor"  # feature / head / token id; -1 where none
    activation: "torch.Tensor"
    value: "torch.Tensor"
    out: "torch.Tensor"
    depth: "torch.Tensor"
    dict_id: list[str | None]
    readers: list[Any] = field(default_factory=list)
    target: int = -1  # index of the target (logit) node
    n_layers: int = 0
    n_pos: int = 0

    def __len__(self) -> int:
        return len(self.kind)


@dataclass
class PosReader:
    """Nodes ``nodes`` read the stream at their own position ``pos[k]`` through vector ``vec[k]``
    (``value = vec · stream[pos] + bias``), seeing sources written at depths < ``depth[k]``."""

    nodes: "torch.Tensor"
    pos: "torch.Tensor"
    depth: "torch.Tensor"
    vec: "torch.Tensor"  # [n, d_model]


@dataclass
class AttnReader:
    """Nodes of attention layer ``layer`` at destination ``dest[k]`` read ``resid_pre`` at every source ``s``
    through ``Σ_j weight[layer, heads[k, j], dest[k], s] · vec[k, j]``, where ``weight`` = frozen pattern / frozen
    ``ln1`` scale at ``s``; ``vec[k, j]`` already includes ``ln1``'s weight and centring."""

    layer: int
    nodes: "torch.Tensor"
    dest: "torch.Tensor"
    heads: "torch.Tensor"  # [n, k]
    vec: "torch.Tensor"  # [n, k, d_model]


@dataclass
class Recording:
    """What the clean forward pass recorded (batch dim dropped) and the frozen quantities derived from it."""

    tokens: "torch.Tensor"
    logits: "torch.Tensor"  # [pos, vocab]
    acts: dict[str, "torch.Tensor"]
    attn_weight: "torch.Tensor"  # [layer, head, dest, src]: pattern / ln1 scale at src


def _norm_type(model: Any) -> str:
    return str(model.cfg.normalization_type or "")


def center(model: Any, vec: "torch.Tensor") -> "torch.Tensor":
    """A reader ``vec`` of a (frozen) LayerNorm's centred input, moved onto the raw residual: reading
    ``x − mean(x)`` through ``vec`` equals reading ``x`` through ``vec − mean(vec)``. RMSNorm does not centre."""
    if _norm_type(model).startswith("LN"):
        return vec - vec.mean(-1, keepdim=True)
    return vec


def norm_weight(module: Any, d: int) -> "torch.Tensor":
    """A norm's elementwise weight (ones for the weight-less ``*Pre`` norms)."""
    import torch

    w = getattr(module, "w", None)
    return w.detach() if w is not None else torch.ones(d)


def record(model: Any, tokens: "torch.Tensor") -> Recording:
    """One clean no-grad forward pass of ``tokens`` ``[pos]`` recording every hook the graph needs."""
    import torch

    names = [EMBED, FINAL_SCALE]
    if "hook_pos_embed" in model.hook_dict:
        names.append("hook_pos_embed")
    for layer in range(model.cfg.n_layers):
        names += [hook_name(k, layer) for k in ("attn_scale", "pattern", "z", "attn_out", "mlp_scale", "mlp_in",
                                               "mlp_out", "resid_mid", "resid_post")]
    with torch.no_grad():
        logits, cache = model.run_with_cache(tokens[None], names_filter=names)
    acts = {n: cache[n][0].float() for n in names}
    pattern = torch.stack([acts[hook_name("pattern", l)] for l in range(model.cfg.n_layers)])  # [L, H, P, P]
    scale = torch.stack([acts[hook_name("attn_scale", l)][:, 0] for l in range(model.cfg.n_layers)])  # [L, P]
    return Recording(tokens=tokens, logits=logits[0].float(), acts=acts,
                     attn_weight=pattern / scale[:, None, None, :])


def metric_value(model: Any, rec: Recording, target: Target) -> float:
    """The target metric on the clean run (last position): a logit or a logit difference."""
    last = rec.logits[-1]
    value = last[target.token_id]
    if target.wrong_id is not None:
        value = value - last[target.wrong_id]
    return float(value)


def candidates(model: Any, rec: Recording, target: Target, transcoders: dict[int, Any],
               attn_saes: dict[int, Any] | None = None) -> Candidates:
    """Every candidate node of the recorded prompt (see the module docstring), with its readers."""
    import torch

    from backend.dictionaries.attention_sae import encode_z, preactivation

    attn_saes = attn_saes or {}
    cfg = model.cfg
    L, H, d = cfg.n_layers, cfg.n_heads, cfg.d_model
    P = int(rec.tokens.shape[0])
    a = rec.acts
    kind: list[str] = []
    dict_ids: list[str | None] = []
    cols: dict[str, list[Any]] = {k: [] for k in ("layer", "pos", "index", "activation", "value", "depth")}
    outs: list[torch.Tensor] = []
    readers: list[Any] = []

    def add(k: str, layer: int, pos: torch.Tensor, index: torch.Tensor, act: torch.Tensor, value: torch.Tensor,
            out: torch.Tensor, depth: int, dict_id: str | None = None) -> torch.Tensor:
        start = len(kind)
        n = int(out.shape[0])
        kind.extend([k] * n)
        dict_ids.extend([dict_id] * n)
        cols["layer"].append(torch.full((n,), layer, dtype=torch.long))
        cols["pos"].append(pos.long())
        cols["index"].append(index.long())
        cols["activation"].append(act.float())
        cols["value"].append(value.float())
        cols["depth"].append(torch.full((n,), depth, dtype=torch.long))
        outs.append(out.float())
        return torch.arange(start, start + n)

    positions = torch.arange(1, P)  # BOS is never a node
    nan = lambda n: torch.full((n,), float("nan"))  # noqa: E731 - exogenous nodes have no value
    emb = a[EMBED] + (a["hook_pos_embed"] if "hook_pos_embed" in a else 0)
    add("embedding", -1, positions, rec.tokens[1:], emb[1:].norm(dim=-1), nan(P - 1), emb[1:], 0)

    for layer in range(L):
        block = model.blocks[layer]
        w1 = norm_weight(block.ln1, d)
        W_V, W_O = block.attn.W_V.detach(), block.attn.W_O.detach()  # [H, d, dh], [H, dh, d] (GQA repeated)
        z = a[hook_name("z", layer)][1:]  # [P-1, H, dh]
        if layer in attn_saes:
            sae = attn_saes[layer]
            flat = z.reshape(P - 1, -1)
            pre = preactivation(sae, flat)
            f = encode_z(sae, flat)
            p_idx, i_idx = torch.nonzero(f > 0, as_tuple=True)
            W_dec = sae.W_dec.detach().reshape(sae.cfg.d_sae, H, -1)  # head-major slices
            d_res = torch.einsum("fhk,hkd->fd", W_dec, W_O)  # each feature's residual direction
            act = f[p_idx, i_idx]
            idx = add("attn_feature", layer, positions[p_idx], i_idx, act, pre[p_idx, i_idx],
                      act[:, None] * d_res[i_idx], 2 * layer + 1, _dict_id(sae))
            W_enc = sae.W_enc.detach().reshape(H, -1, sae.cfg.d_sae)  # [H, dh, d_sae]
            vec = torch.einsum("hdk,hkn->nhd", W_V, W_enc[:, :, i_idx])  # [n, H, d]
            readers.append(AttnReader(layer, idx, positions[p_idx], torch.arange(H).repeat(len(idx), 1),
                                      center(model, vec * w1)))
            recon = sae.decode(f).detach().reshape(P - 1, H, -1)  # includes b_dec (bias)
            err = torch.einsum("phk,hkd->pd", z - recon, W_O)  # b_dec·W_O is a constant (bias), not error
            add("attn_error", layer, positions, torch.full((P - 1,), -1), err.norm(dim=-1), nan(P - 1), err,
                2 * layer + 1, _dict_id(sae))
        else:
            o = torch.einsum("phk,hkd->phd", z, W_O)  # per-head output [P-1, H, d]
            norm = o.norm(dim=-1).clamp_min(1e-12)
            o_hat = o / norm[..., None]
            pp = positions.repeat_interleave(H)
            hh = torch.arange(H).repeat(P - 1)
            idx = add("head", layer, pp, hh, norm.reshape(-1), norm.reshape(-1), o.reshape(-1, d), 2 * layer + 1)
            # reading vector of head h at dest p: W_V[h] (W_O[h] ô), through ln1's weight (and centring)
            vec = torch.einsum("hdk,phk->phd", W_V, torch.einsum("hkd,phd->phk", W_O, o_hat))
            readers.append(AttnReader(layer, idx, pp, hh[:, None], center(model, vec * w1).reshape(-1, 1, d)))

        s2 = a[hook_name("mlp_scale", layer)][:, 0]
        y = a[hook_name("mlp_out", layer)][1:]
        tc = transcoders.get(layer)
        if tc is not None:
            x = a[hook_name("mlp_in", layer)][1:]
            with torch.no_grad():
                f = tc.encode(x)
            p_idx, i_idx = torch.nonzero(f > 0, as_tuple=True)
            W_dec, W_enc = tc.W_dec.detach(), tc.W_enc.detach()
            act = f[p_idx, i_idx]
            pre = (x @ W_enc + tc.b_enc.detach())[p_idx, i_idx]
            idx = add("transcoder", layer, positions[p_idx], i_idx, act, pre, act[:, None] * W_dec[i_idx],
                      2 * layer + 2, _dict_id(tc))
            pos_t = positions[p_idx]
            readers.append(PosReader(idx, pos_t, torch.full((len(idx),), 2 * layer + 2),
                                     center(model, W_enc[:, i_idx].T) / s2[pos_t, None]))
            with torch.no_grad():
                err = y - tc.decode(f).detach()
                # A SkipTranscoder's linear skip term (W_skip x) is not a feature: it stays in the error node.
        else:
            err = y
        add("mlp_error", layer, positions, torch.full((P - 1,), -1), err.norm(dim=-1), nan(P - 1), err,
            2 * layer + 2, _dict_id(tc) if tc is not None else None)

    # The target logit (or logit difference) at the last position.
    u = model.W_U.detach()[:, target.token_id].clone()
    if target.wrong_id is not None:
        u = u - model.W_U.detach()[:, target.wrong_id]
    wf = norm_weight(model.ln_final, d)
    sf = a[FINAL_SCALE][-1, 0]
    value = torch.tensor([metric_value(model, rec, target)])
    t_idx = add("logit", L, torch.tensor([P - 1]), torch.tensor([target.token_id]), value, value,
                torch.zeros(1, d), 2 * L + 1)
    readers.append(PosReader(t_idx, torch.tensor([P - 1]), torch.tensor([2 * L + 1]),
                             (center(model, u * wf) / sf)[None]))
    return Candidates(kind=kind, layer=torch.cat(cols["layer"]), pos=torch.cat(cols["pos"]),
                      index=torch.cat(cols["index"]), activation=torch.cat(cols["activation"]),
                      value=torch.cat(cols["value"]), out=torch.cat(outs), depth=torch.cat(cols["depth"]),
                      dict_id=dict_ids, readers=readers, target=int(t_idx[0]), n_layers=L, n_pos=P)


def _dict_id(dictionary: Any) -> str | None:
    meta = getattr(dictionary.cfg, "metadata", None)
    return getattr(meta, "dict_id", None) or (meta.get("dict_id") if isinstance(meta, dict) else None)


def total_attribution(c: Candidates, rec: Recording) -> "torch.Tensor":
    """``activation × ∂metric/∂activation`` of every candidate in the linear replacement system ([N]).

    A reverse sweep over write depths: ``G[p]`` accumulates ``Σ_t ∂m/∂value_t · r_t[p]`` over the readers seen so
    far (all deeper than the current depth), so a node written at depth D at position p has ``∂m/∂a = dir·G[p]``
    and total attribution ``out·G[p]``.
    """
    import torch

    G = torch.zeros(c.n_pos, c.out.shape[1])
    by_depth: dict[int, list[Any]] = {}
    for r in c.readers:
        by_depth.setdefault(int(c.depth[r.nodes[0]]), []).append(r)  # a reader's nodes share one depth
    ta = torch.zeros(len(c))
    grad = torch.zeros(len(c))  # ∂m/∂value of the readers (value = activation for active features and heads)
    for depth in range(int(c.depth.max()), -1, -1):
        here = torch.nonzero(c.depth == depth, as_tuple=True)[0]
        ta[here] = (c.out[here] * G[c.pos[here]]).sum(-1)  # G holds every reader deeper than `depth`
        grad[here] = ta[here] / c.activation[here].clamp_min(1e-12)
        for r in by_depth.get(depth, []):
            g = torch.ones(len(r.nodes)) if depth == int(c.depth[c.target]) else grad[r.nodes]
            if isinstance(r, PosReader):
                G.index_add_(0, r.pos, g[:, None] * r.vec)
            else:
                w = rec.attn_weight[r.layer][r.heads, r.dest[:, None]]  # [n, k, src]
                G += torch.einsum("n,nks,nkd->sd", g, w, r.vec)
    ta[c.target] = c.value[c.target]
    return ta


def edges_between(c: Candidates, rec: Recording, keep: "torch.Tensor") -> "torch.Tensor":
    """Dense direct-effect matrix ``W[t, u]`` among the candidates ``keep`` (indices, in order): ``out_u · r_t``
    summed over the positions t reads, for sources written shallower than t reads."""
    import torch

    n = len(keep)
    local = torch.full((len(c),), -1, dtype=torch.long)
    local[keep] = torch.arange(n)
    W = torch.zeros(n, n)
    src_pos, src_depth, src_out = c.pos[keep], c.depth[keep], c.out[keep]
    for r in c.readers:
        sel = local[r.nodes] >= 0
        if not bool(sel.any()):
            continue
        rows = local[r.nodes[sel]]
        t_depth = c.depth[r.nodes[sel]]
        if isinstance(r, PosReader):
            vals = r.vec[sel] @ src_out.T  # [n_t, n]
            mask = (r.pos[sel][:, None] == src_pos[None]) & (src_depth[None] < t_depth[:, None])
        else:
            w = rec.attn_weight[r.layer][r.heads[sel], r.dest[sel][:, None]]  # [n_t, k, P]
            dots = torch.einsum("tkd,ud->tku", r.vec[sel], src_out)  # [n_t, k, n]
            vals = (w[:, :, src_pos] * dots).sum(1)
            mask = (src_pos[None] <= r.dest[sel][:, None]) & (src_depth[None] < t_depth[:, None])
        W[rows] = vals * mask
    return W


def stream_node_sum(c: Candidates) -> "torch.Tensor":
    """``S[depth, pos]``: the sum of every candidate's output written at depths ≤ ``depth`` at ``pos``."""
    import torch

    D = int(c.depth.max()) + 1
    S = torch.zeros(D, c.n_pos, c.out.shape[1])
    S.index_put_((c.depth, c.pos), c.out, accumulate=True)
    return S.cumsum(0)


def biases(c: Candidates, rec: Recording) -> "torch.Tensor":
    """Per candidate reader: ``value − Σ over ALL candidates of its incoming edges`` (NaN for exogenous nodes):
    what the constants (BOS, biases, ``b_dec``) contribute."""
    import torch

    S = stream_node_sum(c)
    out = torch.full((len(c),), float("nan"))
    for r in c.readers:
        read_depth = c.depth[r.nodes] - 1
        if isinstance(r, PosReader):
            total = (r.vec * S[read_depth, r.pos]).sum(-1)
        else:
            w = rec.attn_weight[r.layer][r.heads, r.dest[:, None]]  # [n, k, P]
            total = torch.einsum("nks,nkd,nsd->n", w, r.vec, S[read_depth])
        out[r.nodes] = c.value[r.nodes] - total
    return out


def node_labels(c: Candidates, token_strings: Sequence[str]) -> list[str]:
    """Short human labels: ``emb "tok"``, ``T12#1034``, ``err L12``, ``H12.3``, ``A8#77``, ``logit "tok"``."""
    labels = []
    for k, layer, pos, index in zip(c.kind, c.layer.tolist(), c.pos.tolist(), c.index.tolist()):
        if k == "embedding":
            labels.append(f"emb {token_strings[pos]!r}")
        elif k == "transcoder":
            labels.append(f"T{layer}#{index}")
        elif k == "mlp_error":
            labels.append(f"MLP{layer} error")
        elif k == "head":
            labels.append(f"H{layer}.{index}")
        elif k == "attn_feature":
            labels.append(f"A{layer}#{index}")
        elif k == "attn_error":
            labels.append(f"attn{layer} error")
        else:
            labels.append("logit")
    return labels
