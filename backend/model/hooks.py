"""TransformerLens hook names: the single place where activation names are spelled.

Everything that reads or patches an activation goes through these names (TransformerLens hook points are
the project's one extension mechanism), so a component is identified by ``(kind, layer)`` everywhere else.
"""

from __future__ import annotations

from typing import Literal

ComponentKind = Literal["resid_pre", "resid_post", "attn_out", "mlp_out", "z", "pattern", "mlp_in", "v"]

_TEMPLATES: dict[str, str] = {
    "resid_pre": "blocks.{layer}.hook_resid_pre",
    "resid_mid": "blocks.{layer}.hook_resid_mid",
    "resid_post": "blocks.{layer}.hook_resid_post",
    "attn_out": "blocks.{layer}.hook_attn_out",
    "mlp_out": "blocks.{layer}.hook_mlp_out",
    "mlp_in": "blocks.{layer}.ln2.hook_normalized",  # the MLP's normalised input (transcoder input)
    "z": "blocks.{layer}.attn.hook_z",  # [batch, pos, head, d_head]; attention-SAE input
    "q": "blocks.{layer}.attn.hook_q",
    "k": "blocks.{layer}.attn.hook_k",
    "v": "blocks.{layer}.attn.hook_v",
    "pattern": "blocks.{layer}.attn.hook_pattern",  # [batch, head, dest, src]
    "mlp_pre": "blocks.{layer}.mlp.hook_pre",  # W_gate x (gated) or W_in x + b_in: the activation's input
    "mlp_pre_linear": "blocks.{layer}.mlp.hook_pre_linear",  # gated MLPs only: W_in x, the gate's partner
    "mlp_post": "blocks.{layer}.mlp.hook_post",  # after the activation (and the gate product)
    "attn_scale": "blocks.{layer}.ln1.hook_scale",
    "mlp_scale": "blocks.{layer}.ln2.hook_scale",
}
FINAL_SCALE = "ln_final.hook_scale"
EMBED = "hook_embed"


def hook_name(kind: str, layer: int) -> str:
    """Return the TransformerLens hook name of activation ``kind`` at ``layer``."""
    try:
        return _TEMPLATES[kind].format(layer=layer)
    except KeyError as exc:
        raise ValueError(f"unknown activation kind {kind!r}; known: {sorted(_TEMPLATES)}") from exc


def parse_hook_name(name: str) -> tuple[str, int]:
    """Inverse of :func:`hook_name`: ``'blocks.3.attn.hook_z'`` -> ``('z', 3)``."""
    for kind, tmpl in _TEMPLATES.items():
        prefix, suffix = tmpl.split("{layer}")
        if name.startswith(prefix) and name.endswith(suffix):
            middle = name[len(prefix) : len(name) - len(suffix)]
            if middle.isdigit():
                return kind, int(middle)
    raise ValueError(f"{name!r} is not a per-layer hook name known to circuitscope")
