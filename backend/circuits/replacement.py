"""The local replacement model of one prompt, linearised: its nodes, its linear pass-throughs, and the sweeps that
turn them into edges and attributions.

Written by hand: neither sae-lens nor TransformerLens builds attribution graphs, and circuit-tracer (the
reference implementation) needs its own model wrappers and cross-layer transcoders; the algebra below follows
Dunefsky et al. 2024 and circuit-tracer (docs/methods.md §4). Every activation comes from TransformerLens hooks.

**The frozen system.** One clean forward pass is recorded. Then, for this prompt:

* every norm's scale (``ln1``, ``ln2``, ``ln_final`` ``hook_scale``) is frozen, so norms are linear maps;
* every attention pattern is frozen, so attention is a linear map from the residual stream at the source
  positions to its output at each destination: ``out[d] = Σ_h Σ_s A_h[d, s] · ln1(x_s) W_V^h W_O^h`` (+ biases);
* each MLP with a transcoder is replaced by its active features (``f_i · W_dec[i]``, the active set frozen), an
  **error node** (MLP output − the transcoder's prediction, held at its clean value), ``b_dec`` and, for skip
  transcoders, the linear skip term ``W_skip x``; an MLP without a transcoder is one error node per position;
* an attention layer with an attention SAE is replaced by its features (read from ``hook_z``) plus an
  attention-error node per position.

**Nodes and pass-throughs.** Nodes are the embeddings, the features, the error nodes and the target. Attention
in layers *without* an attention SAE and the skip terms of skip transcoders are not nodes: they are linear
**pass-throughs** (:class:`AttnMap`, :class:`SkipMap`) that carry a node's write onward, to other positions or
through the MLP, exactly as circuit-tracer's edges go through attention. An edge ``u → t`` is the derivative of
``t``'s value (pre-activation / metric) with respect to ``u``'s activation, times that activation, with every
other node held fixed: it sums every path from ``u`` to ``t`` through the pass-throughs (several attention hops
included) and through no other node. BOS (position 0) is an attention sink whose residual is the same for every
prompt: nothing at position 0 is a node; what it contributes is constant, like ``b_dec``, ``b_O`` and the
norms' biases.

**Levels.** Writes enter the residual stream at a depth: embeddings 0, attention of layer ``l`` ``2l+1``, MLP of
layer ``l`` ``2l+2``. "Level ``D``" is the stream after every write of depth ``≤ D``. A transcoder feature of
layer ``l`` reads level ``2l+1`` (``resid_mid``) at its position; an attention-SAE feature of layer ``l`` reads
level ``2l`` at every position it attends to; the target reads level ``2L`` at the last position.

**Sweeps.** ``G_t^D[p] = ∂value_t/∂(a write at depth D, position p)``. Going down one level through the sublayer
of depth ``D`` adds that sublayer's transposed pass-through: ``G^{D−1} = G^D + J_Dᵀ G^D`` (``J_D = 0`` for a
sublayer that is all nodes). :func:`edges` runs this sweep for every kept target at once (``G`` of shape
``[n_targets, positions, d_model]``), :func:`total_attribution` for the metric alone, weighting each reader by
``∂metric/∂value``. :func:`head_split` splits one edge by the last attention hop of its paths.

**Target.** A single logit is demeaned as in circuit-tracer: the target reads ``W_U[:, t] − mean_j W_U[:, j]``, so
its value is the logit minus the mean logit and a shift of every logit at once (e.g. the final norm's scale) is
not credited as evidence for the token. A logit difference ``t − w`` reads ``W_U[:, t] − W_U[:, w]``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Sequence

from backend.model.hooks import EMBED, FINAL_SCALE, hook_name

if TYPE_CHECKING:
    import torch

FEATURE_KINDS: tuple[str, ...] = ("transcoder", "attn_feature")
ERROR_KINDS: tuple[str, ...] = ("mlp_error", "attn_error")
READER_KINDS: tuple[str, ...] = ("transcoder", "attn_feature", "logit")


@dataclass
class Target:
    """What the graph explains: the demeaned logit of ``token_id`` at the last position (logit minus the mean
    logit), or ``token_id``'s logit minus ``wrong_id``'s (a logit difference) when ``wrong_id`` is set."""

    token_id: int
    wrong_id: int | None = None

    @property
    def kind(self) -> str:
        return "logit" if self.wrong_id is None else "logit_diff"


@dataclass
class PosReader:
    """Nodes ``nodes`` read level ``level`` of the stream at their own position ``pos[k]`` through ``vec[k]``
    (``value = vec · stream[pos] + bias``)."""

    nodes: "torch.Tensor"
    pos: "torch.Tensor"
    level: int
    vec: "torch.Tensor"  # [n, d_model]


@dataclass
class AttnReader:
    """Attention-SAE features of layer ``layer`` at destination ``dest[k]`` read level ``2·layer`` at every source
    ``s`` through ``Σ_j weight[layer, heads[k, j], dest[k], s] · vec[k, j]``, where ``weight`` = frozen pattern /
    frozen ``ln1`` scale at ``s``; ``vec[k, j]`` (head ``heads[k, j]``'s share) includes ``ln1``'s weight and
    centring."""

    layer: int
    nodes: "torch.Tensor"
    dest: "torch.Tensor"
    heads: "torch.Tensor"  # [n, k]
    vec: "torch.Tensor"  # [n, k, d_model]

    @property
    def level(self) -> int:
        return 2 * self.layer


@dataclass
class Recording:
    """What the clean forward pass recorded (batch dim dropped) and the frozen quantities derived from it."""

    tokens: "torch.Tensor"
    logits: "torch.Tensor"  # [pos, vocab]
    acts: dict[str, "torch.Tensor"]
    attn_weight: "torch.Tensor"  # [layer, head, dest, src]: pattern / ln1 scale at src


@dataclass
class AttnMap:
    """One attention layer as a frozen linear pass-through (a layer without an attention SAE).

    ``out[d] = Σ_h Σ_s weight[h, d, s] · (P x_s) W_V[group(h)] W_O[h]`` where ``P`` centres (LayerNorm models)
    and ``W_V`` already carries ``ln1``'s weight; heads ``h`` with equal ``h // rep`` share a key/value group."""

    layer: int
    weight: "torch.Tensor"  # [H, P, P]: pattern / ln1 scale at the source
    W_V: "torch.Tensor"  # [n_kv, d_model, d_head], ln1 weight folded in
    W_O: "torch.Tensor"  # [H, d_head, d_model]
    rep: int
    centre: bool

    @property
    def depth(self) -> int:
        return 2 * self.layer + 1


@dataclass
class SkipMap:
    """A skip transcoder's linear term as a pass-through: ``out[p] = (P x_p / σ2_p) W_skipᵀ``."""

    layer: int
    W_skip: "torch.Tensor"  # [d_out, d_in]
    inv_scale: "torch.Tensor"  # [P]: 1 / frozen ln2 scale
    centre: bool

    @property
    def depth(self) -> int:
        return 2 * self.layer + 2


@dataclass
class Candidates:
    """Every candidate node of one prompt, vectorised (N nodes). Index ``i`` is the same in every field.

    ``out[i]``: the vector node ``i`` writes into the residual stream (``activation × direction``).
    ``direction[i]``: what one unit of its activation writes (a feature's decoder row in the stream).
    ``value[i]``: the node's value (a feature's pre-activation, the target's metric); NaN for exogenous nodes
    (embeddings, errors), which have no inputs. ``readers``: how each non-exogenous node reads the stream.
    """

    kind: list[str]
    layer: "torch.Tensor"
    pos: "torch.Tensor"
    index: "torch.Tensor"  # feature / token id; -1 where none
    activation: "torch.Tensor"
    value: "torch.Tensor"
    out: "torch.Tensor"
    direction: "torch.Tensor"
    depth: "torch.Tensor"
    dict_id: list[str | None]
    readers: list[Any] = field(default_factory=list)
    target: int = -1  # index of the target (logit) node
    n_layers: int = 0
    n_pos: int = 0

    def __len__(self) -> int:
        return len(self.kind)


@dataclass
class Frozen:
    """The frozen linear system of one prompt: the recording, the candidate nodes and the pass-throughs."""

    rec: Recording
    cand: Candidates
    attn: dict[int, AttnMap]
    skip: dict[int, SkipMap]

    def pass_down(self, depth: int, G: "torch.Tensor") -> "torch.Tensor":
        """``G`` (gradients at level ``depth``, ``[B, P, d]``) carried one level down through the sublayer that
        writes at ``depth``: ``G + J_depthᵀ G`` for a pass-through, ``G`` for a sublayer made of nodes."""
        layer, kind = divmod(depth - 1, 2)
        if depth <= 0:
            return G
        if kind == 0 and layer in self.attn:
            return G + attn_backward(self.attn[layer], G)
        if kind == 1 and layer in self.skip:
            return G + skip_backward(self.skip[layer], G)
        return G


def _norm_type(model: Any) -> str:
    return str(model.cfg.normalization_type or "")


def _centres(model: Any) -> bool:
    return _norm_type(model).startswith("LN")


def center(model: Any, vec: "torch.Tensor") -> "torch.Tensor":
    """A reader ``vec`` of a (frozen) LayerNorm's centred input, moved onto the raw residual: reading
    ``x − mean(x)`` through ``vec`` equals reading ``x`` through ``vec − mean(vec)``. RMSNorm does not centre."""
    return _centre(vec, _centres(model))


def _centre(vec: "torch.Tensor", on: bool) -> "torch.Tensor":
    return vec - vec.mean(-1, keepdim=True) if on else vec


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
                                               "mlp_out")]
    with torch.no_grad():
        logits, cache = model.run_with_cache(tokens[None], names_filter=names)
    acts = {n: cache[n][0].float() for n in names}
    pattern = torch.stack([acts[hook_name("pattern", l)] for l in range(model.cfg.n_layers)])  # [L, H, P, P]
    scale = torch.stack([acts[hook_name("attn_scale", l)][:, 0] for l in range(model.cfg.n_layers)])  # [L, P]
    return Recording(tokens=tokens, logits=logits[0].float(), acts=acts,
                     attn_weight=pattern / scale[:, None, None, :])


def metric_value(model: Any, rec: Recording, target: Target) -> float:
    """The target metric on the clean run (last position): logit minus mean logit, or a logit difference."""
    last = rec.logits[-1]
    if target.wrong_id is None:
        return float(last[target.token_id] - last.mean())
    return float(last[target.token_id] - last[target.wrong_id])


def target_direction(model: Any, target: Target) -> "torch.Tensor":
    """The unembedding direction the target reads (before the final norm): ``W_U[:, t] − mean_j W_U[:, j]``
    for a single logit (demeaned), ``W_U[:, t] − W_U[:, w]`` for a logit difference."""
    W_U = model.W_U.detach()
    other = W_U.mean(1) if target.wrong_id is None else W_U[:, target.wrong_id]
    return W_U[:, target.token_id] - other


def skip_weight(transcoder: Any) -> "torch.Tensor | None":
    """The skip matrix ``W_skip`` ``[d_out, d_in]`` of a sae-lens ``SkipTranscoder`` /
    ``JumpReLUSkipTranscoder`` (None for transcoders without one)."""
    w = getattr(transcoder, "W_skip", None)
    return None if w is None else w.detach()


def pass_throughs(model: Any, rec: Recording, transcoders: dict[int, Any],
                  attn_saes: dict[int, Any]) -> tuple[dict[int, AttnMap], dict[int, SkipMap]]:
    """The frozen linear pass-throughs of the recorded prompt: attention of every layer without an attention SAE,
    and the skip term of every skip transcoder."""
    cfg = model.cfg
    d = cfg.d_model
    centre = _centres(model)
    attn: dict[int, AttnMap] = {}
    for layer in range(cfg.n_layers):
        if layer in attn_saes:
            continue
        block = model.blocks[layer]
        W_V = getattr(block.attn, "_W_V", None)  # GQA keeps one W_V per key/value group
        W_V = (W_V if W_V is not None else block.attn.W_V).detach()
        w1 = norm_weight(block.ln1, d)
        attn[layer] = AttnMap(layer=layer, weight=rec.attn_weight[layer], W_V=w1[None, :, None] * W_V,
                              W_O=block.attn.W_O.detach(), rep=cfg.n_heads // W_V.shape[0], centre=centre)
    skip: dict[int, SkipMap] = {}
    for layer, tc in transcoders.items():
        W = skip_weight(tc)
        if W is not None:
            scale = rec.acts[hook_name("mlp_scale", layer)][:, 0]
            skip[layer] = SkipMap(layer=layer, W_skip=W, inv_scale=1.0 / scale, centre=centre)
    return attn, skip


def attn_forward(a: AttnMap, F: "torch.Tensor", per_head: bool = False) -> "torch.Tensor":
    """What writes ``F`` ``[B, P, d]`` at the attention layer's input produce at its output: ``[B, P, d]``, or
    ``[B, P, H, d]`` per head when ``per_head``."""
    import torch

    V = torch.einsum("bsd,gdk->bsgk", _centre(F, a.centre), a.W_V)
    V = V.repeat_interleave(a.rep, dim=2)  # [B, P, H, dh]
    Z = torch.einsum("hts,bshk->bthk", a.weight, V)
    return torch.einsum("bthk,hkd->bthd" if per_head else "bthk,hkd->btd", Z, a.W_O)


def attn_backward(a: AttnMap, G: "torch.Tensor") -> "torch.Tensor":
    """The transpose of :func:`attn_forward`: gradients ``G`` ``[B, P, d]`` at the output -> at the input. Heads of
    one key/value group are summed before their shared ``W_V``."""
    import torch

    B, P, _ = G.shape
    Y = torch.einsum("btd,hkd->bthk", G, a.W_O)
    Zs = torch.einsum("hts,bthk->bshk", a.weight, Y)
    Zg = Zs.reshape(B, P, a.W_V.shape[0], a.rep, -1).sum(3)
    return _centre(torch.einsum("bsgk,gdk->bsd", Zg, a.W_V), a.centre)


def skip_forward(s: SkipMap, F: "torch.Tensor") -> "torch.Tensor":
    """The skip term's output for writes ``F`` ``[B, P, d]`` at the MLP's input (same position)."""
    return (_centre(F, s.centre) * s.inv_scale[None, :, None]) @ s.W_skip.T


def skip_backward(s: SkipMap, G: "torch.Tensor") -> "torch.Tensor":
    """The transpose of :func:`skip_forward`."""
    return _centre((G @ s.W_skip) * s.inv_scale[None, :, None], s.centre)


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
    dirs: list[torch.Tensor] = []
    readers: list[Any] = []

    def add(k: str, layer: int, pos: torch.Tensor, index: torch.Tensor, act: torch.Tensor, value: torch.Tensor,
            direction: torch.Tensor, depth: int, dict_id: str | None = None) -> torch.Tensor:
        start = len(kind)
        n = int(direction.shape[0])
        kind.extend([k] * n)
        dict_ids.extend([dict_id] * n)
        cols["layer"].append(torch.full((n,), layer, dtype=torch.long))
        cols["pos"].append(pos.long())
        cols["index"].append(index.long())
        cols["activation"].append(act.float())
        cols["value"].append(value.float())
        cols["depth"].append(torch.full((n,), depth, dtype=torch.long))
        dirs.append(direction.float())
        outs.append(act.float()[:, None] * direction.float())
        return torch.arange(start, start + n)

    def vector_node(k: str, layer: int, vec: torch.Tensor, depth: int, dict_id: str | None = None) -> None:
        # exogenous vector nodes (embeddings, errors): activation = |write|, direction = write / |write|
        norm = vec.norm(dim=-1)
        index = rec.tokens[1:] if k == "embedding" else torch.full((P - 1,), -1)
        add(k, layer, positions, index, norm, torch.full((P - 1,), float("nan")),
            vec / norm.clamp_min(1e-30)[:, None], depth, dict_id)

    positions = torch.arange(1, P)  # BOS is never a node
    emb = a[EMBED] + (a["hook_pos_embed"] if "hook_pos_embed" in a else 0)
    vector_node("embedding", -1, emb[1:], 0)

    for layer in range(L):
        if layer in attn_saes:
            block = model.blocks[layer]
            w1 = norm_weight(block.ln1, d)
            W_V, W_O = block.attn.W_V.detach(), block.attn.W_O.detach()  # [H, d, dh] (GQA repeated), [H, dh, d]
            z = a[hook_name("z", layer)][1:]  # [P-1, H, dh]
            sae = attn_saes[layer]
            flat = z.reshape(P - 1, -1)
            pre = preactivation(sae, flat)
            f = encode_z(sae, flat)
            p_idx, i_idx = torch.nonzero(f > 0, as_tuple=True)
            W_dec = sae.W_dec.detach().reshape(sae.cfg.d_sae, H, -1)  # head-major slices
            d_res = torch.einsum("fhk,hkd->fd", W_dec, W_O)  # each feature's residual direction
            idx = add("attn_feature", layer, positions[p_idx], i_idx, f[p_idx, i_idx], pre[p_idx, i_idx],
                      d_res[i_idx], 2 * layer + 1, _dict_id(sae))
            W_enc = sae.W_enc.detach().reshape(H, -1, sae.cfg.d_sae)  # [H, dh, d_sae]
            vec = torch.einsum("hdk,hkn->nhd", W_V, W_enc[:, :, i_idx])  # [n, H, d]
            readers.append(AttnReader(layer, idx, positions[p_idx], torch.arange(H).repeat(len(idx), 1),
                                      center(model, vec * w1)))
            with torch.no_grad():
                recon = sae.decode(f).detach().reshape(P - 1, H, -1)  # includes b_dec (a constant)
            err = torch.einsum("phk,hkd->pd", z - recon, W_O)
            vector_node("attn_error", layer, err, 2 * layer + 1, _dict_id(sae))
        # else: attention of this layer is a pass-through (pass_throughs), not a node

        s2 = a[hook_name("mlp_scale", layer)][:, 0]
        y = a[hook_name("mlp_out", layer)][1:]
        tc = transcoders.get(layer)
        if tc is not None:
            x = a[hook_name("mlp_in", layer)][1:]
            with torch.no_grad():
                f = tc.encode(x)
                # MLP − the transcoder's whole prediction (features + b_dec + the skip term, which is a path)
                err = y - tc.forward(x).detach()
            p_idx, i_idx = torch.nonzero(f > 0, as_tuple=True)
            W_dec, W_enc = tc.W_dec.detach(), tc.W_enc.detach()
            pre = (x @ W_enc + tc.b_enc.detach())[p_idx, i_idx]
            idx = add("transcoder", layer, positions[p_idx], i_idx, f[p_idx, i_idx], pre, W_dec[i_idx],
                      2 * layer + 2, _dict_id(tc))
            pos_t = positions[p_idx]
            readers.append(PosReader(idx, pos_t, 2 * layer + 1, center(model, W_enc[:, i_idx].T) / s2[pos_t, None]))
        else:
            err = y
        vector_node("mlp_error", layer, err, 2 * layer + 2, _dict_id(tc) if tc is not None else None)

    # The target at the last position: demeaned logit or logit difference.
    wf = norm_weight(model.ln_final, d)
    sf = a[FINAL_SCALE][-1, 0]
    value = torch.tensor([metric_value(model, rec, target)])
    t_idx = add("logit", L, torch.tensor([P - 1]), torch.tensor([target.token_id]), value, value,
                torch.zeros(1, d), 2 * L + 1)
    readers.append(PosReader(t_idx, torch.tensor([P - 1]), 2 * L,
                             (center(model, target_direction(model, target) * wf) / sf)[None]))
    return Candidates(kind=kind, layer=torch.cat(cols["layer"]), pos=torch.cat(cols["pos"]),
                      index=torch.cat(cols["index"]), activation=torch.cat(cols["activation"]),
                      value=torch.cat(cols["value"]), out=torch.cat(outs), direction=torch.cat(dirs),
                      depth=torch.cat(cols["depth"]), dict_id=dict_ids, readers=readers, target=int(t_idx[0]),
                      n_layers=L, n_pos=P)


def freeze(model: Any, tokens: "torch.Tensor", target: Target, transcoders: dict[int, Any],
           attn_saes: dict[int, Any] | None = None, rec: Recording | None = None) -> Frozen:
    """Record ``tokens`` (``[pos]``, BOS first; or take the recording ``rec`` of them) and build its frozen
    linear system."""
    import torch

    attn_saes = attn_saes or {}
    with torch.no_grad():
        rec = rec if rec is not None else record(model, tokens)
        cand = candidates(model, rec, target, transcoders, attn_saes)
        attn, skip = pass_throughs(model, rec, transcoders, attn_saes)
    return Frozen(rec=rec, cand=cand, attn=attn, skip=skip)


def _dict_id(dictionary: Any) -> str | None:
    meta = getattr(dictionary.cfg, "metadata", None)
    return getattr(meta, "dict_id", None) or (meta.get("dict_id") if isinstance(meta, dict) else None)


def _add_reader(G: "torch.Tensor", rec: Recording, r: Any, rows: "torch.Tensor", weights: "torch.Tensor",
                sel: "torch.Tensor | None" = None) -> None:
    """``G[rows] += weights · (how reader r's nodes read the stream)``, for the reader's nodes ``sel`` (default
    all of them)."""
    import torch

    sel = torch.arange(len(r.nodes)) if sel is None else sel
    if isinstance(r, PosReader):
        G.index_put_((rows, r.pos[sel]), weights[:, None] * r.vec[sel], accumulate=True)
    else:
        w = rec.attn_weight[r.layer][r.heads[sel], r.dest[sel][:, None]]  # [n, k, P]
        G.index_add_(0, rows, torch.einsum("n,nks,nkd->nsd", weights, w, r.vec[sel]))


def _readers_by_level(c: Candidates) -> dict[int, list[Any]]:
    out: dict[int, list[Any]] = {}
    for r in c.readers:
        out.setdefault(r.level, []).append(r)
    return out


def total_attribution(fz: Frozen) -> "torch.Tensor":
    """``activation × ∂metric/∂activation`` of every candidate in the frozen system ([N]): the sum over all its
    paths to the target, through other nodes and pass-throughs alike.

    One reverse sweep over levels with a single ``G`` ``[1, P, d]``: at level ``D`` the readers of that level are
    added with their ``∂metric/∂value`` (known: they write deeper), then nodes written at depth ``D`` are scored
    against ``G``, then ``G`` is carried down through the sublayer of depth ``D``.
    """
    import torch

    c, rec = fz.cand, fz.rec
    G = torch.zeros(1, c.n_pos, c.out.shape[1])
    ta = torch.zeros(len(c))
    grad = torch.zeros(len(c))  # ∂metric/∂activation
    by_level = _readers_by_level(c)
    target_level = 2 * c.n_layers
    for level in range(target_level, -1, -1):
        for r in by_level.get(level, []):
            g = torch.ones(len(r.nodes)) if level == target_level else grad[r.nodes]
            _add_reader(G, rec, r, torch.zeros(len(r.nodes), dtype=torch.long), g)
        here = torch.nonzero(c.depth == level, as_tuple=True)[0]
        g_here = G[0, c.pos[here]]
        ta[here] = (c.out[here] * g_here).sum(-1)
        grad[here] = (c.direction[here] * g_here).sum(-1)
        G = fz.pass_down(level, G)
    ta[c.target] = c.value[c.target]
    return ta


@dataclass
class Edges:
    """What :func:`edges` returns. ``W[t, u]``: the edge from kept node ``u`` to kept node ``t`` (local indices, in
    ``keep`` order); ``bias[t]``: the target's value minus its direct edges from *all* candidates (the constant
    term: BOS, biases, ``b_dec``, ...; NaN for exogenous nodes); ``to_target[u]``: the direct edge from every
    candidate ``u`` (global index) to the target."""

    W: "torch.Tensor"
    bias: "torch.Tensor"
    to_target: "torch.Tensor"


def edges(fz: Frozen, keep: "torch.Tensor") -> Edges:
    """Direct effects among the candidates ``keep`` (global indices, in order), with every path through the
    pass-throughs, by one batched reverse sweep over levels for every kept reader (see the module docstring).

    Readers are sorted by the level they read, deepest first, so the rows that are nonzero at a level are a prefix
    of ``G``: the sweep only touches that prefix.
    """
    import torch

    c, rec = fz.cand, fz.rec
    n, N, P, d = len(keep), len(c), c.n_pos, c.out.shape[1]
    local = torch.full((N,), -1, dtype=torch.long)
    local[keep] = torch.arange(n)
    # kept readers as (level, reader, which of its nodes are kept), deepest level first
    pieces = []
    for r in c.readers:
        sel = torch.nonzero(local[r.nodes] >= 0, as_tuple=True)[0]
        if len(sel):
            pieces.append((r.level, r, sel))
    pieces.sort(key=lambda p: -p[0])
    row_node: list[torch.Tensor] = []
    start = 0
    rows_of: list[tuple[int, Any, torch.Tensor, torch.Tensor]] = []
    for level, r, sel in pieces:
        rows = torch.arange(start, start + len(sel))
        rows_of.append((level, r, sel, rows))
        row_node.append(r.nodes[sel])
        start += len(sel)
    B = start
    nodes_of_row = torch.cat(row_node) if row_node else torch.zeros(0, dtype=torch.long)
    G = torch.zeros(B, P, d)
    W = torch.zeros(n, n)
    through = torch.zeros(B)  # Σ over all candidates of the direct edges into each row's node
    to_target = torch.zeros(N)
    t_row = int(torch.nonzero(nodes_of_row == c.target, as_tuple=True)[0][0]) if c.target in set(
        nodes_of_row.tolist()) else -1
    # every candidate's write summed per (depth, position): the direct edges from all candidates at once
    D = 2 * c.n_layers + 2
    S = torch.zeros(D, P, d)
    S.index_put_((c.depth, c.pos), c.out, accumulate=True)
    active = 0
    for level in range(2 * c.n_layers, -1, -1):
        for lv, r, sel, rows in rows_of:
            if lv == level:
                _add_reader(G, rec, r, rows, torch.ones(len(sel)), sel)
                active = max(active, int(rows[-1]) + 1)
        if active == 0:
            continue
        g = G[:active]
        src = torch.nonzero((c.depth[keep] == level), as_tuple=True)[0]  # local indices written at this depth
        target_rows = local[nodes_of_row[:active]][:, None]
        for p in torch.unique(c.pos[keep[src]]).tolist():  # one small matmul per source position
            at = src[c.pos[keep[src]] == p]
            W[target_rows, at[None]] = g[:, p] @ c.out[keep[at]].T
        through[:active] += torch.einsum("bpd,pd->b", g, S[level])
        if 0 <= t_row < active:
            here = torch.nonzero(c.depth == level, as_tuple=True)[0]
            to_target[here] = (c.out[here] * G[t_row, c.pos[here]]).sum(-1)
        G[:active] = fz.pass_down(level, g)
    bias = torch.full((n,), float("nan"))
    bias[local[nodes_of_row]] = c.value[nodes_of_row] - through
    return Edges(W=W, bias=bias, to_target=to_target)


def head_split(fz: Frozen, sources: Sequence[int], target: int) -> tuple["torch.Tensor", "torch.Tensor"]:
    """Which attention heads carry the edges from ``sources`` (global candidate indices) into ``target``.

    Every path from a source to the target either uses no attention at all (same position only) or has exactly
    one *last* attention hop ``(layer, head)`` before it reaches the target's position; grouping paths by that hop
    splits each edge exactly. Returns ``(heads [S, L, H], residual [S])`` whose sum over heads plus residual is the
    edge. For an attention-SAE feature the last hop is its own read of ``hook_z``: the split is over the heads of
    its own layer (the same as DFA by head).

    How: each source's write is propagated forward through every pass-through to each attention layer's input
    (all paths), and the target's reader backward through residual-only (and skip) paths at its position; the
    product at one head's output, at the target's position, is that head's share.
    """
    import torch

    c, rec = fz.cand, fz.rec
    src = torch.as_tensor(list(sources), dtype=torch.long)
    S, P, d = len(src), c.n_pos, c.out.shape[1]
    L, H = c.n_layers, rec.attn_weight.shape[1]
    reader, k = next((r, int(torch.nonzero(r.nodes == target, as_tuple=True)[0][0])) for r in c.readers
                     if bool((r.nodes == target).any()))
    level = reader.level
    heads = torch.zeros(S, L, H)
    residual = torch.zeros(S)
    back: dict[int, torch.Tensor] = {}
    if isinstance(reader, PosReader):
        dest = int(reader.pos[k])
        b = torch.zeros(1, P, d)
        b[0, dest] = reader.vec[k]
        for lv in range(level, -1, -1):  # residual-only (and skip) paths at the target's position
            back[lv] = b[0, dest].clone()
            if lv > 0 and lv % 2 == 0 and (lv - 2) // 2 in fz.skip:
                b = b + skip_backward(fz.skip[(lv - 2) // 2], b)
    else:
        dest = int(reader.dest[k])
    F = torch.zeros(S, P, d)
    for lv in range(0, level + 1):
        at = torch.nonzero(c.depth[src] == lv, as_tuple=True)[0]
        if len(at):
            F[at, c.pos[src[at]]] += c.out[src[at]]
            if isinstance(reader, PosReader):
                same = at[c.pos[src[at]] == dest]
                residual[same] = c.out[src[same]] @ back[lv]
        if lv == level:
            break
        layer, kind = divmod(lv, 2)  # the sublayer writing at depth lv + 1
        if kind == 0 and layer in fz.attn:
            out_h = attn_forward(fz.attn[layer], F, per_head=True)  # [S, P, H, d]
            if isinstance(reader, PosReader):
                heads[:, layer] = out_h[:, dest] @ back[lv + 1]
            F = F + out_h.sum(2)
        elif kind == 1 and layer in fz.skip:
            F = F + skip_forward(fz.skip[layer], F)
    if isinstance(reader, AttnReader):
        w = rec.attn_weight[reader.layer][reader.heads[k], dest]  # [k, P]
        heads[:, reader.layer, reader.heads[k]] = torch.einsum("js,jd,bsd->bj", w, reader.vec[k], F)
    return heads, residual


def node_ids(c: Candidates) -> list[str]:
    """Every candidate's graph node id (:func:`backend.circuits.graph.node_id`)."""
    from backend.circuits.graph import node_id

    return [node_id(k, int(l), int(p), int(i)) for k, l, p, i in
            zip(c.kind, c.layer.tolist(), c.pos.tolist(), c.index.tolist())]


def node_labels(c: Candidates, token_strings: Sequence[str]) -> list[str]:
    """Short human labels: ``emb "tok"``, ``T12#1034``, ``MLP12 error``, ``A8#77``, ``attn8 error``, ``logit``."""
    labels = []
    for k, layer, pos, index in zip(c.kind, c.layer.tolist(), c.pos.tolist(), c.index.tolist()):
        if k == "embedding":
            labels.append(f"emb {token_strings[pos]!r}")
        elif k == "transcoder":
            labels.append(f"T{layer}#{index}")
        elif k == "mlp_error":
            labels.append(f"MLP{layer} error")
        elif k == "attn_feature":
            labels.append(f"A{layer}#{index}")
        elif k == "attn_error":
            labels.append(f"attn{layer} error")
        else:
            labels.append("logit")
    return labels
