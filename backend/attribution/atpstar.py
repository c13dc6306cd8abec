"""AtP* (*AtP\\*: An efficient and scalable method for localizing LLM behaviour to components*, Kramár, Lieberum,
Shah, Nanda, 2024): attribution patching with its two repairs, the QK fix and GradDrop.

Sign convention and shapes: those of every method (:mod:`backend.attribution.components`).

**QK fix (attention heads).** AtP linearises a head's effect through its own softmax, which fails where attention
is saturated. The paper splits an attention node into its query, key and value inputs and, for queries and keys,
computes the change of the attention pattern *exactly* — the softmax recomputed with the corrupt input — and only
then multiplies by the gradient of the metric with respect to the pattern, ``G = ∂m/∂A``:

* query at position t (eq. 7 of the paper): ``Σ_s G_ts · (softmax(q_t^corr · K)_s − A_ts)``;
* key at position s (eqs. 9–10), summed over the queries t that see it:
  ``Σ_t Σ_s' G_ts' · (A'^(s)_ts' − A_ts')`` where ``A'^(s)`` is the pattern with only key s corrupted. Changing one
  logit of a softmax row has a closed form (``u = A_ts (e^δ − 1)``, ``δ`` the logit change): the row's change
  contributes ``u (G_ts − Σ_s' G_ts' A_ts') / (1 + u)``, so every key of every row costs O(1) (the paper's
  algorithm 4, O(T²) per head);
* values: plain AtP with the pattern fixed, ``Σ_t ∂m/∂z_t · Σ_s A_ts Δv_s``.

A head's score is the sum of its query, key and value contributions over positions; with per-position heads the
node (head, t) is the head's output at query position t, i.e. row t's query, keys and values. Residual-stream and
MLP components have no softmax of their own and keep the AtP estimate. The QK fix does not reach the softmaxes of
*later* heads that a component feeds; those stay linearised (as in the paper).

**GradDrop.** Effects that cancel along different paths (e.g. a direct path and a compensating head) make AtP
report ≈ 0. GradDrop repeats the backward pass L times, pass l with the gradient through block l's writes to the
residual stream (``hook_attn_out`` and ``hook_mlp_out``) set to zero, and (eq. 11) takes
``ĉ_GD(n) = Σ_l |I_l(n)| / (L − 1)`` where ``I_l`` is the (QK-fixed) estimate with block l dropped — the node's own
block contributes ≈ 0 for heads and MLP outputs, hence L − 1. The gradient gate sits downstream of the scored hook
points, so an MLP output or head's gradient is dropped with its own block, as for the paper's neurons.

**What we return (our aggregation, stated exactly).** The paper ranks nodes by the unsigned ``ĉ_GD`` averaged over
prompt pairs. Our scores are signed estimates of the noising effect, per pair, so AtP* here is, per pair,
``sign(I(n)) · ĉ_GD(n)`` — the magnitude from GradDrop, the sign from the undropped, QK-fixed estimate I(n) — and
the mean over pairs of that (``Scores.values``). ``qk_fix=False, grad_drop=False`` is AtP exactly.

Cost: one corrupt forward pass, one clean forward pass kept for L + 1 backward passes (activation gradients only).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Mapping, Sequence

import torch

from backend.attribution.components import Scores, Site, build_sites
from backend.attribution.passes import Hook
from backend.model.hooks import hook_name

if TYPE_CHECKING:
    from backend.inputs.tasks import TaskBatch


class _GradGate(torch.autograd.Function):
    """Identity forward; backward multiplies the gradient by ``state["keep"][layer]`` (read when backward runs)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, state: dict[str, Any], layer: int) -> torch.Tensor:  # type: ignore[override]
        ctx.state, ctx.layer = state, layer
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, None, None]:  # type: ignore[override]
        return (None if ctx.state["drop"] == ctx.layer else grad), None, None


def _qk_names(model: Any, layer: int) -> tuple[str, str]:
    rotary = model.cfg.positional_embedding_type == "rotary"
    return (f"blocks.{layer}.attn.hook_rot_q" if rotary else hook_name("q", layer),
            f"blocks.{layer}.attn.hook_rot_k" if rotary else hook_name("k", layer))


def _scores(attn: Any, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """Masked attention logits ``[b, head, t, s]`` of ``attn`` (TransformerLens' own score and mask functions)."""
    return attn.apply_causal_mask(attn.calculate_attention_scores(q, k))


def _expand_kv(x: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Grouped-query K/V ``[b, pos, kv_head, d]`` repeated to one per query head, as TransformerLens does."""
    return x if x.shape[2] == n_heads else torch.repeat_interleave(x, n_heads // x.shape[2], dim=2)


def qk_fixed_head_rows(attn: Any, clean: Mapping[str, torch.Tensor], corrupt: Mapping[str, torch.Tensor],
                       g_pattern: torch.Tensor, g_z: torch.Tensor) -> torch.Tensor:
    """AtP* estimate per (example, query head, query position) ``[b, head, t]`` of one attention layer: query and
    key contributions with the softmax recomputed exactly, value contribution linear (module docstring).

    ``clean`` / ``corrupt`` hold ``q``, ``k`` (after rotary, if any), ``v`` and (clean) ``pattern``; ``g_pattern``
    and ``g_z`` are the metric's gradients at the pattern ``[b, head, t, s]`` and at z ``[b, t, head, d]``.
    """
    f64 = torch.float64
    pattern = clean["pattern"].to(f64)
    g = g_pattern.to(f64)
    n_heads = pattern.shape[1]
    s_clean = _scores(attn, clean["q"], clean["k"]).to(f64)
    valid = torch.isfinite(s_clean)
    # queries: each row t recomputed with its own corrupt query (rows are independent softmaxes)
    a_q = torch.softmax(_scores(attn, corrupt["q"], clean["k"]).to(f64), dim=-1)
    q_part = (g * (a_q - pattern)).sum(-1)
    # keys: one key s at a time, closed form of a one-logit change of row t
    s_key = _scores(attn, clean["q"], corrupt["k"]).to(f64)
    delta = torch.where(valid, s_key - s_clean, torch.zeros_like(s_clean)).clamp(max=600.0)
    u = pattern * torch.expm1(delta)
    ga = (g * pattern).sum(-1, keepdim=True)
    k_part = torch.where(valid, u * (g - ga) / (1.0 + u), torch.zeros_like(u)).sum(-1)
    # values: linear, pattern fixed
    dv = (_expand_kv(corrupt["v"], n_heads) - _expand_kv(clean["v"], n_heads)).to(f64)  # [b, s, head, d]
    dz = torch.einsum("bhts,bshd->bthd", pattern, dv)
    v_part = (g_z.to(f64) * dz).sum(-1).transpose(1, 2)  # [b, head, t]
    return q_part + k_part + v_part


def atp_star(model: Any, batch: "TaskBatch", kinds: Sequence[str], per_position_heads: bool = False,
             dictionaries: Mapping[int, Any] | None = None, qk_fix: bool = True, grad_drop: bool = True) -> Scores:
    """AtP* scores (module docstring): AtP with the QK fix on heads and GradDrop magnitudes, per example."""
    sites = build_sites(model, kinds, per_position_heads, dictionaries)
    head_layers = sorted({s.layer for s in sites if s.kind == "head"}) if qk_fix else []
    qk_hooks = {layer: (*_qk_names(model, layer), hook_name("v", layer)) for layer in head_layers}
    extra = [name for names in qk_hooks.values() for name in names]

    with torch.no_grad():
        _, cache = model.run_with_cache(batch.corrupt, names_filter=sorted({s.hook for s in sites} | set(extra)))
    corrupt = {s.label: s.extract(cache[s.hook]) for s in sites}
    corrupt_qkv = {layer: dict(zip(("q", "k", "v"), (cache[n] for n in names))) for layer, names in qk_hooks.items()}
    del cache

    captured: dict[str, torch.Tensor] = {}
    clean: dict[str, torch.Tensor] = {}
    clean_qkv: dict[int, dict[str, torch.Tensor]] = {layer: {} for layer in head_layers}
    patterns: dict[int, torch.Tensor] = {}
    state: dict[str, Any] = {"drop": None}

    def capture_hook(site: Site) -> Hook:
        def hook(act: torch.Tensor, hook: Any) -> torch.Tensor:
            if site.kind == "feature":
                f = site.extract(act)
                f_var = f.detach().clone().requires_grad_(True)
                captured[site.label], clean[site.label] = f_var, f.detach()
                return site.insert(act, f, f_var)
            if not act.requires_grad:
                act = act.detach().requires_grad_(True)
            captured[site.label], clean[site.label] = act, act.detach()
            return act

        return site.hook, hook

    def keep(layer: int, key: str) -> Hook:
        def hook(act: torch.Tensor, hook: Any) -> torch.Tensor:
            clean_qkv[layer][key] = act.detach()
            return act

        return hook

    def keep_pattern(layer: int) -> Any:
        def hook(p: torch.Tensor, hook: Any) -> torch.Tensor:
            patterns[layer] = p
            return p

        return hook

    def gate(layer: int) -> Any:
        def hook(x: torch.Tensor, hook: Any) -> torch.Tensor:
            return _GradGate.apply(x, state, layer)

        return hook

    hooks: list[Hook] = [capture_hook(s) for s in sites]
    for layer, (qn, kn, vn) in qk_hooks.items():
        hooks += [(qn, keep(layer, "q")), (kn, keep(layer, "k")), (vn, keep(layer, "v")),
                  (hook_name("pattern", layer), keep_pattern(layer))]
    n_layers = int(model.cfg.n_layers)
    if grad_drop:  # after the capture hooks: the scored value lies upstream of its block's gate
        for layer in range(n_layers):
            hooks.append((hook_name("attn_out", layer), gate(layer)))
            if not model.cfg.attn_only:
                hooks.append((hook_name("mlp_out", layer), gate(layer)))

    n = len(batch)
    head_sites = {s.layer: s for s in sites if s.kind == "head"}
    with torch.enable_grad(), model.hooks(fwd_hooks=hooks):
        metric = batch.metric(model(batch.clean, return_type="logits")) * n  # sum over examples: per-example grads
        inputs = [captured[s.label] for s in sites] + [patterns[layer] for layer in head_layers]
        drops: list[int | None] = [None] + (list(range(n_layers)) if grad_drop else [])
        estimates: list[dict[str, torch.Tensor]] = []
        for j, drop in enumerate(drops):
            state["drop"] = drop
            grads = torch.autograd.grad(metric, inputs, allow_unused=True, retain_graph=j < len(drops) - 1)
            g_site = dict(zip([s.label for s in sites], grads[: len(sites)]))
            g_pat = dict(zip(head_layers, grads[len(sites):]))
            per_site: dict[str, torch.Tensor] = {}
            for site in sites:
                delta = corrupt[site.label] - clean[site.label]
                g = g_site[site.label]
                g = torch.zeros_like(delta) if g is None else g.detach()
                if site.kind == "head" and site.layer in g_pat:
                    gp = g_pat[site.layer]
                    gp = torch.zeros_like(patterns[site.layer]) if gp is None else gp.detach()
                    attn = model.blocks[site.layer].attn
                    with torch.no_grad():
                        clean_qkv[site.layer]["pattern"] = patterns[site.layer].detach()
                        rows = qk_fixed_head_rows(attn, clean_qkv[site.layer], corrupt_qkv[site.layer], gp, g)
                    per_site[site.label] = rows if per_position_heads else rows.sum(-1)
                else:
                    per_site[site.label] = site.reduce(g * delta).double()
            estimates.append(per_site)
    del head_sites
    if not grad_drop:
        return Scores.from_sites(sites, estimates[0], per_position_heads)
    denom = max(n_layers - 1, 1)
    combined = {}
    for site in sites:
        magnitude = sum(est[site.label].abs() for est in estimates[1:]) / denom
        combined[site.label] = torch.sign(estimates[0][site.label]) * magnitude
    return Scores.from_sites(sites, combined, per_position_heads)
