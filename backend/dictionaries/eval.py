"""Evaluating attention-output SAEs on held-out contexts (METHODS.md §1).

Definitions (all over **non-BOS** tokens of held-out contexts that were not trained on):

* **L0**: mean number of nonzero features per token.
* **FVE** (fraction of variance explained): ``1 − Σ‖x − x̂‖² / Σ‖x − mean(x)‖²``, the mean taken over the
  same evaluation tokens.
* **dead fraction**: the fraction of features that fire on none of the training tokens and none of the
  evaluation tokens, with the final weights (so "dead" means never active on any token this run has seen).
* **CE-loss recovered** = ``(CE_ablated − CE_spliced) / (CE_ablated − CE_clean)``:
  - clean: the model as is;
  - spliced: ``hook_z`` at positions ≥ 1 replaced by the SAE reconstruction (reshaped back to
    ``[.., n_heads, d_head]``); BOS keeps its own z (it is never given to the SAE);
  - ablated: ``hook_z`` at positions ≥ 1 zeroed, i.e. the layer's attention output there becomes ``b_O``.
    For the Llama-family models (SmolLM2, tiny-llama) ``b_O`` is zero, so this *is* zeroing the layer's
    attention output as METHODS.md says; for GPT-2-family models it leaves ``b_O``. Ablation covers the same
    positions as splicing, so BOS is treated alike in all three runs and the ratio scores only what the
    SAE replaces.
  CE is the usual next-token loss averaged over every predicted token of the context (the prediction made
  at BOS included: it is the same in clean/spliced/ablated runs up to the later positions' influence, which
  cannot reach it causally). ΔCE = spliced − clean (nats) and the denominator are stored beside the ratio.

The clean pass is shared: it records each evaluated layer's ``resid_pre`` and ``hook_z``, and the spliced and
ablated passes restart from that layer (``start_at_layer``), which is exact because earlier blocks do not
depend on the spliced layer.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any, Sequence

from backend.model.activations import flatten_heads
from backend.model.hooks import hook_name
from backend.progress import track

if TYPE_CHECKING:
    import torch
    from sae_lens import SAE


@dataclass
class DictionaryMetrics:
    """What the ``dictionaries`` table stores about one SAE's quality."""

    l0: float
    fve: float
    ce_clean: float
    ce_spliced: float
    ce_ablated: float
    ce_loss_recovered: float
    dead_fraction: float
    eval_tokens: int  # non-BOS tokens the SAE was evaluated on (L0 / FVE)
    ce_tokens: int  # predicted tokens the CE losses average over

    @property
    def delta_ce(self) -> float:
        """Spliced − clean CE in nats: the cost of replacing the layer by the SAE."""
        return self.ce_spliced - self.ce_clean

    def as_row(self) -> dict[str, Any]:
        """Columns of the ``dictionaries`` table (ce_tokens goes into the cfg metadata instead)."""
        row = asdict(self)
        row.pop("ce_tokens")
        return row


def reconstruction_stats(sae: "SAE", acts: "torch.Tensor", batch_size: int = 4096) -> dict[str, Any]:
    """L0, FVE and the per-feature fired mask of ``sae`` on flat activations ``acts`` ``[n, d_in]``."""
    import torch

    from backend.dictionaries.attention_sae import encode_z

    n = acts.shape[0]
    mean = acts.mean(0)
    err = total = 0.0
    active = 0
    fired = torch.zeros(sae.cfg.d_sae, dtype=torch.bool)
    with torch.no_grad():
        for start in range(0, n, batch_size):
            x = acts[start : start + batch_size]
            f = encode_z(sae, x)
            x_hat = sae.decode(f)
            nz = f != 0
            active += int(nz.sum())
            fired |= nz.any(0)
            err += float(((x - x_hat) ** 2).sum(dtype=torch.float64))
            total += float(((x - mean) ** 2).sum(dtype=torch.float64))
    return {"l0": active / max(n, 1), "fve": 1.0 - err / total if total > 0 else float("nan"), "fired": fired,
            "tokens": n}


def fired_features(sae: "SAE", acts: "torch.Tensor", batch_size: int = 4096) -> "torch.Tensor":
    """Boolean ``[d_sae]``: which features are nonzero on at least one row of ``acts``."""
    return reconstruction_stats(sae, acts, batch_size)["fired"]


def _splice_hook(sae: "SAE") -> Any:
    import torch

    from backend.dictionaries.attention_sae import reconstruct

    def hook(z: torch.Tensor, hook: Any) -> torch.Tensor:
        z = z.clone()
        rest = z[:, 1:]  # positions >= 1; BOS keeps its own z
        z[:, 1:] = reconstruct(sae, rest).reshape(rest.shape).to(z.dtype)
        return z

    return hook


def _ablate_hook(z: "torch.Tensor", hook: Any) -> "torch.Tensor":
    z = z.clone()
    z[:, 1:] = 0.0  # same positions as splicing: attn_out there becomes b_O (zero in Llama models)
    return z


def evaluate_dictionaries(
    model: Any,
    saes: dict[int, "SAE"],
    tokens: "torch.Tensor",
    batch_size: int = 16,
    train_fired: dict[int, "torch.Tensor"] | None = None,
) -> dict[int, DictionaryMetrics]:
    """Evaluate one SAE per layer (``{layer: sae}``) on held-out ``tokens`` ``[n, n_ctx]`` (BOS at position 0).

    ``train_fired``: per layer, the features that fired on the training tokens (for the dead fraction);
    without it the dead fraction counts the evaluation tokens only.
    """
    import torch

    layers = sorted(saes)
    if not layers:
        return {}
    n, n_ctx = tokens.shape
    z_names = {hook_name("z", layer): layer for layer in layers}
    resid_names = {hook_name("resid_pre", layer): layer for layer in layers}
    ce = {layer: {"clean": 0.0, "spliced": 0.0, "ablated": 0.0} for layer in layers}
    z_rows: dict[int, list[torch.Tensor]] = {layer: [] for layer in layers}
    n_pred = 0
    starts = range(0, n, batch_size)
    with torch.no_grad():
        for start in track(starts, total=len(starts), desc="Evaluating SAEs (CE)", unit="batch"):
            batch = tokens[start : start + batch_size]
            cache: dict[str, torch.Tensor] = {}

            def keep(act: torch.Tensor, hook: Any) -> None:
                cache[hook.name] = act

            hooks = [(name, keep) for name in (*z_names, *resid_names)]
            clean = model.run_with_hooks(batch, return_type="loss", loss_per_token=True, fwd_hooks=hooks)
            count = clean.numel()
            n_pred += count
            for layer in layers:
                ce[layer]["clean"] += float(clean.sum(dtype=torch.float64))
                z = cache[hook_name("z", layer)]
                z_rows[layer].append(flatten_heads(z[:, 1:]).reshape(-1, z.shape[-2] * z.shape[-1]).float())
                resid = cache[hook_name("resid_pre", layer)]
                for kind, fn in (("spliced", _splice_hook(saes[layer])), ("ablated", _ablate_hook)):
                    loss = model.run_with_hooks(
                        resid, start_at_layer=layer, tokens=batch, return_type="loss", loss_per_token=True,
                        fwd_hooks=[(hook_name("z", layer), fn)],
                    )
                    ce[layer][kind] += float(loss.sum(dtype=torch.float64))
    out: dict[int, DictionaryMetrics] = {}
    for layer in layers:
        acts = torch.cat(z_rows[layer])
        stats = reconstruction_stats(saes[layer], acts)
        fired = stats["fired"]
        if train_fired is not None and layer in train_fired:
            fired = fired | train_fired[layer]
        c_clean, c_spl, c_abl = (ce[layer][k] / n_pred for k in ("clean", "spliced", "ablated"))
        denom = c_abl - c_clean
        out[layer] = DictionaryMetrics(
            l0=float(stats["l0"]), fve=float(stats["fve"]), ce_clean=c_clean, ce_spliced=c_spl, ce_ablated=c_abl,
            ce_loss_recovered=(c_abl - c_spl) / denom if denom != 0 else float("nan"),
            dead_fraction=float(1.0 - fired.float().mean()), eval_tokens=int(acts.shape[0]), ce_tokens=int(n_pred),
        )
    return out


def evaluate_dictionary(model: Any, sae: "SAE", layer: int, tokens: "torch.Tensor", batch_size: int = 16,
                        train_fired: "torch.Tensor | None" = None) -> DictionaryMetrics:
    """Evaluate a single SAE on ``layer`` (see :func:`evaluate_dictionaries`)."""
    fired = {layer: train_fired} if train_fired is not None else None
    return evaluate_dictionaries(model, {layer: sae}, tokens, batch_size, fired)[layer]


def split_contexts(n: int, n_eval: int) -> tuple[range, range]:
    """Split ``n`` contexts into (train, held-out) index ranges: the held-out part is the **last** ``n_eval``
    contexts, capped at a quarter of the corpus (at least one) so small corpora still train on most of it."""
    n_eval = min(int(n_eval), max(1, n // 4)) if n > 1 else 0
    return range(0, n - n_eval), range(n - n_eval, n)
