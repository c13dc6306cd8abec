"""Components that attribution methods score, where they live in the model, and the scores' container.

**Sign convention (every method, one place):** the score of component ``c`` estimates

    score(c) = m(clean run with c ← its corrupt value) − m(clean run),

averaged over the batch's examples ("noising": the corrupt activation is patched into the clean run). Activation
patching computes it exactly; AtP = ∂m/∂c|clean · (c_corrupt − c_clean); IG averages ∂m/∂c along the straight
path from c_clean to c_corrupt, times (c_corrupt − c_clean). docs/methods.md §3 orients the path the other way
(corrupt → clean, "denoising"): our scores are the negative of that orientation's. With the built-in tasks the
clean metric is the larger one, so a component the behaviour needs gets a *negative* score.

Kinds (hook points only via :func:`backend.model.hooks.hook_name`):

* ``"resid"``: ``blocks.l.hook_resid_pre`` for l = 0..n_layers-1 (resid_pre 0 is the embedding), per (layer, pos);
* ``"mlp"``: ``blocks.l.hook_mlp_out``, per (layer, pos);
* ``"head"``: ``blocks.l.attn.hook_z``, per (layer, head) — all positions of the head together — or, with
  ``per_position_heads``, per (layer, head, pos). Patching z_h is patching head h's output (W_O is linear, and
  TransformerLens' hook_z is per *query* head, so grouped-query attention needs nothing special);
* ``"feature"`` (the extension point for dictionaries): the latents ``f = encode(z)`` of an attention-output SAE on
  ``blocks.l.attn.hook_z`` (backend.dictionaries), per (layer, feature), all positions together. They are spliced
  in with the SAE's error held at its clean value: the hook returns ``z + decode(f') − decode(f)``, which is ``z``
  itself when ``f' = f`` (so the forward pass is unchanged) and moves ``z`` by the decoder directions of whatever
  latents a method changes. Another dictionary type plugs in by giving a :class:`Site` its own ``extract`` /
  ``insert`` pair.

A :class:`Site` is one (kind, layer) hook point with three operations every method uses: ``extract`` the scored
tensor from the hook's activation, ``insert`` a changed scored tensor back, and ``reduce`` an element-wise
tensor (e.g. grad × delta) to one number per component.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Iterable, Mapping, Sequence

from backend.errors import InputError
from backend.model.hooks import hook_name

if TYPE_CHECKING:
    import pandas as pd
    import torch

KINDS: dict[str, str] = {
    "resid": "residual stream before each layer (per layer × position)",
    "mlp": "MLP output (per layer × position)",
    "head": "attention head output, hook_z (per layer × head, optionally × position)",
    "feature": "attention-output SAE latents on hook_z (per layer × feature)",
}
DEFAULT_KINDS: tuple[str, ...] = ("resid", "mlp", "head")
_HOOK_KIND = {"resid": "resid_pre", "mlp": "mlp_out", "head": "z", "feature": "z"}


def check_kinds(kinds: Iterable[str], dictionaries: Mapping[int, Any] | None = None) -> list[str]:
    """Validate a list of component kinds (order kept, duplicates dropped); InputError names the known ones."""
    out: list[str] = []
    for kind in kinds:
        if kind not in KINDS:
            raise InputError(f"Unknown component kind {kind!r}: choose from {', '.join(KINDS)}.")
        if kind == "feature" and not dictionaries:
            raise InputError("The 'feature' kind needs attention SAEs: pass dictionaries (layer -> SAE) or drop it.")
        if kind not in out:
            out.append(kind)
    if not out:
        raise InputError("No component kinds were chosen: pick at least one of " + ", ".join(KINDS) + ".")
    return out


@dataclass
class Site:
    """One (kind, layer) hook point and how a method reads, changes and reduces the scored tensor there.

    ``extract(act)`` -> the scored tensor ``a`` (batch first); ``insert(act, a, a_new)`` -> the activation to
    return from the hook when ``a`` is replaced by ``a_new``; ``reduce(x)`` maps an element-wise tensor shaped
    like ``a`` to per-component values ``[batch, *component_shape]``.
    """

    kind: str
    layer: int
    hook: str
    per_position: bool = False  # heads only: score (head, pos) instead of head
    sae: Any = None  # feature sites: the sae-lens SAE

    # -- the scored tensor -----------------------------------------------------------------------------------
    def extract(self, act: "torch.Tensor") -> "torch.Tensor":
        """The scored tensor of a hook activation (``act`` itself, or the SAE latents for features)."""
        if self.kind != "feature":
            return act
        import torch

        from backend.dictionaries.attention_sae import encode_z

        with torch.no_grad():
            return encode_z(self.sae, act).to(act.dtype)

    def insert(self, act: "torch.Tensor", a: "torch.Tensor", a_new: "torch.Tensor") -> "torch.Tensor":
        """The hook's return value when the scored tensor ``a`` (from :meth:`extract`) becomes ``a_new``."""
        if self.kind != "feature":
            return a_new
        # Error term held at its value: z + decode(f') − decode(f). Only a difference of two decodes, so the
        # decoder bias cancels and the splice is exact (z unchanged) when f' = f.
        from backend.dictionaries.attention_sae import _flat_mode

        with _flat_mode(self.sae):
            delta = self.sae.decode(a_new.float()) - self.sae.decode(a.float())
        return act + delta.to(act.dtype).reshape(act.shape)

    def reduce(self, x: "torch.Tensor") -> "torch.Tensor":
        """Element-wise values shaped like the scored tensor -> one value per component, ``[batch, *shape]``."""
        if self.kind in ("resid", "mlp"):
            return x.sum(-1)  # [b, pos, d] -> [b, pos]
        if self.kind == "head":
            per = x.sum(-1).transpose(1, 2)  # [b, pos, head, d_head] -> [b, head, pos]
            return per if self.per_position else per.sum(-1)
        return x.sum(1)  # feature: [b, pos, d_sae] -> [b, d_sae]

    def masks(self, shape: Sequence[int], components: "torch.Tensor") -> "torch.Tensor":
        """Boolean masks ``[k, *shape]`` over the scored tensor (without batch) selecting each component.

        ``components`` is ``[k, ndim]``: indices into the component shape (pos; head; (head, pos); feature).
        """
        import torch

        k = len(components)
        m = torch.zeros((k, *shape), dtype=torch.bool)
        rows = torch.arange(k)
        c = components
        if self.kind in ("resid", "mlp"):
            m[rows, c[:, 0]] = True
        elif self.kind == "head" and self.per_position:
            m[rows, c[:, 1], c[:, 0]] = True  # scored tensor is [pos, head, d_head]
        elif self.kind == "head":
            m[rows, :, c[:, 0]] = True
        else:
            m[rows, :, c[:, 0]] = True  # feature f at every position
        return m

    @property
    def label(self) -> str:
        return f"{self.kind}@L{self.layer}"


def build_sites(model: Any, kinds: Sequence[str], per_position_heads: bool = False,
                dictionaries: Mapping[int, Any] | None = None) -> list[Site]:
    """The sites of ``kinds`` in forward order (layer, then resid < head/feature < mlp within a layer).

    ``dictionaries`` maps a layer to its attention SAE (feature sites exist only at those layers).
    """
    kinds = check_kinds(kinds, dictionaries)
    n_layers = int(model.cfg.n_layers)
    order = {"resid": 0, "head": 1, "feature": 2, "mlp": 3}
    sites: list[Site] = []
    for kind in sorted(kinds, key=order.__getitem__):
        if kind == "feature":
            assert dictionaries is not None
            for layer, sae in sorted(dictionaries.items()):
                if not 0 <= int(layer) < n_layers:
                    raise InputError(f"A dictionary is for layer {layer}, but the model has layers 0-{n_layers - 1}.")
                sites.append(Site("feature", int(layer), hook_name("z", int(layer)), sae=sae))
        else:
            sites.extend(Site(kind, layer, hook_name(_HOOK_KIND[kind], layer), per_position=per_position_heads)
                         for layer in range(n_layers))
    return sorted(sites, key=lambda s: (s.layer, order[s.kind]))


# ----------------------------------------------------------------------------------------------------------------
# Scores


@dataclass
class Scores:
    """Scores per kind, averaged over the batch's examples (sign convention: see the module docstring).

    ``values[kind]``: resid / mlp ``[layer, pos]``; head ``[layer, head]`` or ``[layer, head, pos]``; feature
    ``[len(feature_layers), d_sae]`` with row i belonging to layer ``feature_layers[i]``.
    """

    values: dict[str, "torch.Tensor"] = field(default_factory=dict)
    per_position_heads: bool = False
    feature_layers: tuple[int, ...] = ()
    # The same scores per example, kind -> [n_examples, *values[kind].shape] (values is their mean over examples):
    # the evaluation protocol (backend/attribution/evaluation.py) bootstraps over prompt pairs with them.
    examples: dict[str, "torch.Tensor"] = field(default_factory=dict)

    @classmethod
    def from_sites(cls, sites: Sequence[Site], per_site: Mapping[str, "torch.Tensor"],
                   per_position_heads: bool = False) -> "Scores":
        """Stack per-site, per-example score tensors (keyed by ``Site.label``, shape ``[n_examples, *component
        shape]``) into a Scores: ``examples`` keeps them, ``values`` is their mean over examples."""
        import torch

        by_kind: dict[str, list[tuple[int, torch.Tensor]]] = {}
        for site in sites:
            by_kind.setdefault(site.kind, []).append((site.layer, per_site[site.label]))
        examples, feature_layers = {}, ()
        for kind, rows in by_kind.items():
            rows.sort(key=lambda r: r[0])
            if kind == "feature":
                feature_layers = tuple(layer for layer, _ in rows)
                width = max(int(t.shape[-1]) for _, t in rows)  # SAEs of different widths: pad with NaN
                examples[kind] = torch.stack([torch.nn.functional.pad(t.double(), (0, width - t.shape[-1]),
                                                                      value=float("nan")) for _, t in rows], 1)
            else:
                examples[kind] = torch.stack([t.double() for _, t in rows], 1)  # [n, layer, ...]
        values = {kind: t.mean(0) for kind, t in examples.items()}
        return cls(values=values, per_position_heads=per_position_heads, feature_layers=feature_layers,
                   examples=examples)

    def to_frame(self) -> "pd.DataFrame":
        """Rows ``(component, layer, head, pos, feature, score)`` as in the ``attributions`` table (NULL = n/a)."""
        import numpy as np
        import pandas as pd

        frames = []
        for kind, t in self.values.items():
            v = t.detach().cpu().double().cpu().numpy()
            idx = np.indices(v.shape).reshape(v.ndim, -1)
            flat = v.reshape(-1)
            cols: dict[str, Any] = {"component": kind, "layer": idx[0], "head": None, "pos": None, "feature": None}
            if kind in ("resid", "mlp"):
                cols["pos"] = idx[1]
            elif kind == "head":
                cols["head"] = idx[1]
                if v.ndim == 3:
                    cols["pos"] = idx[2]
            else:
                cols["layer"] = np.asarray(self.feature_layers)[idx[0]]
                cols["feature"] = idx[1]
            df = pd.DataFrame({**cols, "score": flat})
            frames.append(df[np.isfinite(flat)])  # padding of narrower SAEs
        if not frames:
            return pd.DataFrame(columns=["component", "layer", "head", "pos", "feature", "score"])
        out = pd.concat(frames, ignore_index=True)
        for col in ("layer", "head", "pos", "feature"):
            out[col] = out[col].astype("Int64")
        return out


MethodFn = Callable[..., Scores]
