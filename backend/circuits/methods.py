"""Edge weights by plain gradient or integrated gradients, with attention patterns and norms live.

The default edge weights (method ``"relp"``, :func:`backend.circuits.replacement.edges`) are direct effects with
every norm scale and attention pattern frozen — exactly what RelP's rules give on this replacement model (norm:
identity rule; attention: pattern held constant; the transcoders' ReLUs: identity rule; linear maps exact), and
what circuit-tracer computes. The two alternatives from the attribution issue keep the model's own
nonlinearities in attention and norms:

* ``"gradient"``: ``w_tu = a_u · ∂value_t/∂a_u`` at the clean run, with every other node's output held fixed
  (AtP-style: the first-order estimate of removing ``u``, including how ``u`` moves the norms and patterns);
* ``"ig"``: integrated gradients along ``a(α) = α·a_clean`` for every kept node together, ``α`` at the midpoints
  of ``steps`` intervals: ``w_tu = a_u · mean_α ∂value_t/∂a_u(a(α))``; for each target, the weights of its
  inputs add up to ``value_t(a_clean) − value_t(0)`` as ``steps`` grows (completeness).

How: the prompt runs as a batch of copies, one per target. Each sublayer made of nodes (``hook_embed``, every
``hook_mlp_out``, ``hook_attn_out`` of layers with an attention SAE) is replaced by its clean value plus
``Σ_u (a_u − a_u,clean) · dir_u`` over the kept nodes written there, where the activations ``a`` are leaves of the
autograd graph; attention of the other layers runs live (it is a path, not a node), and so does a skip
transcoder's linear term (``(x − x_clean) W_skipᵀ`` is added to the MLP output). So the stream depends on the
leaves only through the nodes' own writes and those paths (direct effects). Copy ``b`` reads target ``b``'s value
from the live stream (its norm input, ``hook_z`` or logits), and one backward pass gives every edge into every
target of the batch. Written by hand: no library computes direct-effect graphs through a TransformerLens model.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from backend.circuits.replacement import Candidates, Recording, Target, skip_weight
from backend.model.hooks import EMBED, hook_name

if TYPE_CHECKING:
    import torch

METHODS: tuple[str, ...] = ("relp", "gradient", "ig")


def _write_hook(kind: str, layer: int) -> str:
    if kind == "embedding":
        return EMBED
    if kind in ("attn_feature", "attn_error"):
        return hook_name("attn_out", layer)
    if kind in ("transcoder", "mlp_error"):
        return hook_name("mlp_out", layer)
    raise ValueError(f"node kind {kind!r} writes nothing")


def edges_autograd(model: Any, c: Candidates, rec: Recording, keep: "torch.Tensor", target: Target,
                   transcoders: dict[int, Any], attn_saes: dict[int, Any], method: str = "gradient",
                   steps: int = 4, batch_size: int = 32) -> "torch.Tensor":
    """Dense ``W[t, u]`` among ``keep`` (as :func:`backend.circuits.replacement.edges`) by ``method``
    ``"gradient"`` or ``"ig"``."""
    import torch

    from backend.progress import track

    if method not in ("gradient", "ig"):
        raise ValueError(f"edges_autograd computes 'gradient' or 'ig' edges, not {method!r}")
    n = len(keep)
    kinds = [c.kind[i] for i in keep.tolist()]
    writers = [j for j, k in enumerate(kinds) if k != "logit"]
    a_clean = c.activation[keep].clone()
    dirs = c.direction[keep]
    by_hook: dict[str, list[int]] = {}
    for j in writers:
        by_hook.setdefault(_write_hook(kinds[j], int(c.layer[keep[j]])), []).append(j)
    pos = c.pos[keep]
    readers = [j for j, k in enumerate(kinds) if k in ("transcoder", "attn_feature", "logit")]
    W = torch.zeros(n, n)
    alphas = [1.0] if method == "gradient" else [(s + 0.5) / steps for s in range(steps)]
    chunks = [readers[i : i + batch_size] for i in range(0, len(readers), batch_size)]
    tokens = rec.tokens
    for chunk in track(chunks, total=len(chunks), desc=f"Graph edges ({method})", unit="batch"):
        B = len(chunk)
        total = torch.zeros(B, n)
        for alpha in alphas:
            a = (alpha * a_clean).repeat(B, 1).requires_grad_(True)  # [B, n] leaves
            delta = (a - a_clean)[..., None] * dirs  # [B, n, d]
            live: dict[str, torch.Tensor] = {}

            def write(name: str, idx: list[int]) -> Any:
                ii = torch.tensor(idx)

                def hook(act: torch.Tensor, hook: Any) -> torch.Tensor:
                    base = rec.acts[name].expand(B, -1, -1)
                    add = torch.zeros(B, *base.shape[1:])
                    if len(idx):
                        add = add.index_add(1, pos[ii], delta[:, ii])
                    layer = int(name.split(".")[1]) if name.startswith("blocks.") else -1
                    W_skip = skip_weight(transcoders[layer]) if name.endswith("hook_mlp_out") and \
                        layer in transcoders else None
                    if W_skip is not None:  # the skip term is a live path: what changed at the MLP's input
                        x = live[hook_name("mlp_in", layer)]
                        dx = x - rec.acts[hook_name("mlp_in", layer)][None]
                        add[:, 1:] = add[:, 1:] + dx[:, 1:] @ W_skip.T
                    return base + add
                return hook

            def grab(act: torch.Tensor, hook: Any) -> None:
                live[hook.name] = act

            hooks = []
            for layer in range(c.n_layers):
                hooks.append((hook_name("mlp_in", layer), grab))
                hooks.append((hook_name("z", layer), grab))
            # sublayers made of nodes write their clean output plus the kept nodes' changes (no indirect paths
            # through nodes); attention without an SAE stays live: it is a pass-through
            names = [EMBED] + [hook_name("mlp_out", l) for l in range(c.n_layers)] + [
                hook_name("attn_out", l) for l in attn_saes]
            for name in names:
                hooks.append((name, write(name, by_hook.get(name, []))))
            logits = model.run_with_hooks(tokens.expand(B, -1), fwd_hooks=hooks)
            values = []
            for b, j in enumerate(chunk):
                node = int(keep[j])
                k, layer, p, i = kinds[j], int(c.layer[node]), int(c.pos[node]), int(c.index[node])
                if k == "logit":
                    v = logits[b, -1, target.token_id]
                    v = v - (logits[b, -1].mean() if target.wrong_id is None else logits[b, -1, target.wrong_id])
                elif k == "transcoder":
                    tc = transcoders[layer]
                    v = live[hook_name("mlp_in", layer)][b, p] @ tc.W_enc[:, i] + tc.b_enc[i]
                else:
                    z = live[hook_name("z", layer)][b, p]
                    v = _sae_pre(attn_saes[layer], z.reshape(-1), i)
                values.append(v)
            (grad,) = torch.autograd.grad(torch.stack(values).sum(), a)
            total += grad.detach()
        rows = torch.tensor(chunk)
        W[rows] = (total / len(alphas)) * a_clean[None]
    W.fill_diagonal_(0.0)
    return W


def _sae_pre(sae: Any, x: "torch.Tensor", i: int) -> "torch.Tensor":
    """Feature ``i``'s pre-activation, differentiable (sae-lens' encode runs under no_grad in our helpers)."""
    if sae.cfg.apply_b_dec_to_input:
        x = x - sae.b_dec
    return x @ sae.W_enc[:, i] + sae.b_enc[i]
