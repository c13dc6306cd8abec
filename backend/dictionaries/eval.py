"""Evaluating dictionaries on held-out contexts: attention-output SAEs, and MLP transcoders per layer and all at once
(``docs/methods.md`` §1-2).

**Attention SAEs.** Definitions (all over **non-BOS** tokens of held-out contexts that were not trained on):

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
    attention output as docs/methods.md §1 says; for GPT-2-family models it leaves ``b_O``. Ablation covers the same
    positions as splicing, so BOS is treated alike in all three runs and the ratio scores only what the
    SAE replaces.
  CE is the usual next-token loss averaged over every predicted token of the context (the prediction made
  at BOS included: it is the same in clean/spliced/ablated runs up to the later positions' influence, which
  cannot reach it causally). ΔCE = spliced − clean (nats) and the denominator are stored beside the ratio.

The clean pass is shared: it records each evaluated layer's ``resid_pre`` and ``hook_z``, and the spliced and
ablated passes restart from that layer (``start_at_layer``), which is exact because earlier blocks do not
depend on the spliced layer.

**Transcoders.** Definitions, as above:
(non-BOS tokens of held-out contexts; the same structure as for the attention SAEs)

* **L0**: mean number of nonzero features per token.
* **FVE** of the MLP output: ``1 − Σ‖y − ŷ‖² / Σ‖y − mean(y)‖²`` with ``y = hook_mlp_out``, ``ŷ`` the transcoder's
  prediction from ``ln2.hook_normalized`` of the clean run.
* **dead fraction**: features firing on none of the training and none of the evaluation tokens.
* **CE-loss recovered, one layer** = ``(CE_ablated − CE_spliced) / (CE_ablated − CE_clean)``: spliced = that
  layer's ``hook_mlp_out`` replaced by the transcoder output at positions ≥ 1; ablated = ``hook_mlp_out`` zeroed at
  positions ≥ 1 (BOS keeps its real MLP output in both, so the ratio scores only what the transcoder replaces).
  ΔCE = spliced − clean (nats) and the denominator are stored beside it. The spliced and ablated runs restart from
  the layer's ``resid_pre`` of the clean run (``start_at_layer``), exact because earlier blocks do not depend on it.
* **All MLPs replaced** (one ``replacement_evals`` row): every evaluated layer's ``hook_mlp_out`` replaced by its
  transcoder at once (each transcoder reading the replaced run's own MLP input: the replacement model with the
  error terms dropped) vs all of them zeroed vs clean, the same ratio.

CE is the next-token loss averaged over every predicted token of the contexts. Cost: each layer's spliced and
ablated runs cost about one full forward pass between them, so per-layer CE over 30 layers costs ~30 forward passes
per token; it is therefore measured on the first ``ce_contexts`` held-out contexts only, while L0 / FVE / dead and
the all-replaced row use every held-out context (their cost is one and three passes). The unembedding is applied
in chunks of tokens with a fused cross-entropy, which measured ~40% cheaper than TransformerLens' full-vocabulary
log-softmax over a whole batch and gives the same losses.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any, Mapping

from backend.dictionaries.attention_sae import encode_z, reconstruct
from backend.dictionaries.transcoder import ablate_hooks, encode, splice_hooks, transcode
from backend.model.activations import flatten_heads
from backend.model.hooks import hook_name
from backend.progress import track

if TYPE_CHECKING:
    import torch
    from sae_lens import SAE, Transcoder


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


@dataclass
class ReplacementMetrics:
    """What the ``replacement_evals`` table stores about several MLPs replaced at once."""

    n_replaced: int
    ce_clean: float
    ce_replaced: float
    ce_ablated: float
    ce_loss_recovered: float
    ce_tokens: int

    @property
    def delta_ce(self) -> float:
        """Replaced − clean CE in nats."""
        return self.ce_replaced - self.ce_clean

    def as_row(self) -> dict[str, Any]:
        """Columns of ``replacement_evals`` (without ids, stats and run id)."""
        return asdict(self)


def next_token_ce(model: Any, resid_final: "torch.Tensor", tokens: "torch.Tensor", chunk: int = 1024) -> "torch.Tensor":
    """Per-token next-token loss ``[b, n_ctx − 1]`` from the residual stream after the last block (final norm,
    unembedding and cross-entropy applied ``chunk`` tokens at a time)."""
    import torch
    import torch.nn.functional as F

    b, n_ctx, d = resid_final.shape
    r = model.ln_final(resid_final)[:, :-1].reshape(-1, d)
    target = tokens[:, 1:].reshape(-1).to(r.device)
    out = torch.empty(r.shape[0], dtype=torch.float32)
    for s in range(0, r.shape[0], chunk):
        out[s : s + chunk] = F.cross_entropy(model.unembed(r[s : s + chunk]).float(), target[s : s + chunk], reduction="none")
    return out.reshape(b, n_ctx - 1)


def _run_ce(model: Any, inp: "torch.Tensor", tokens: "torch.Tensor", hooks: list[tuple[str, Any]],
            start_at_layer: int | None = None) -> float:
    """Summed next-token loss (float64) of one hooked run from tokens, or from ``resid_pre`` at ``start_at_layer``."""
    import torch

    kwargs: dict[str, Any] = {"stop_at_layer": model.cfg.n_layers, "fwd_hooks": hooks}
    if start_at_layer is not None:
        kwargs.update(start_at_layer=start_at_layer, tokens=tokens)
    with torch.no_grad():
        resid = model.run_with_hooks(inp, **kwargs)
    return float(next_token_ce(model, resid, tokens).sum(dtype=torch.float64))


def _spliced_and_ablated(model: Any, tc: "Transcoder", layer: int, resid_pre: "torch.Tensor",
                         tokens: "torch.Tensor") -> tuple[float, float]:
    """Summed CE with ``layer``'s MLP output replaced by ``tc`` / zeroed at positions ≥ 1, as ONE run of the doubled
    batch restarting at ``layer`` (first half spliced, second half ablated): the same result as two runs, and
    measured faster for the small batches per-layer CE uses."""
    import torch

    b = tokens.shape[0]
    stash: dict[str, torch.Tensor] = {}

    def keep_input(x: torch.Tensor, hook: Any) -> None:
        stash["x"] = x[:b, 1:]

    def replace(y: torch.Tensor, hook: Any) -> torch.Tensor:
        y = y.clone()
        y[:b, 1:] = transcode(tc, stash.pop("x")).to(y.dtype)
        y[b:, 1:] = 0.0
        return y

    hooks = [(hook_name("mlp_in", layer), keep_input), (hook_name("mlp_out", layer), replace)]
    both = torch.cat([tokens, tokens])
    with torch.no_grad():
        resid = model.run_with_hooks(torch.cat([resid_pre, resid_pre]), start_at_layer=layer, tokens=both,
                                     stop_at_layer=model.cfg.n_layers, fwd_hooks=hooks)
    loss = next_token_ce(model, resid, both)
    return float(loss[:b].sum(dtype=torch.float64)), float(loss[b:].sum(dtype=torch.float64))


class _ReconstructionStats:
    """Streaming L0 / FVE / fired-mask accumulator for one transcoder (float64 sums, no stored activations)."""

    def __init__(self, d_sae: int, d_out: int) -> None:
        import torch

        self.n = 0
        self.active = 0
        self.err = 0.0
        self.sum_y = torch.zeros(d_out, dtype=torch.float64)
        self.sum_y2 = 0.0
        self.fired = torch.zeros(d_sae, dtype=torch.bool)

    def add(self, tc: "Transcoder", x: "torch.Tensor", y: "torch.Tensor") -> None:
        import torch

        x, y = x.reshape(-1, x.shape[-1]).float(), y.reshape(-1, y.shape[-1]).float()
        f = encode(tc, x)
        y_hat = transcode(tc, x)
        nz = f != 0
        self.n += x.shape[0]
        self.active += int(nz.sum())
        self.fired |= nz.any(0)
        self.err += float(((y - y_hat) ** 2).sum(dtype=torch.float64))
        self.sum_y += y.sum(0, dtype=torch.float64)
        self.sum_y2 += float((y.double() ** 2).sum())

    def result(self) -> dict[str, Any]:
        total = self.sum_y2 - float((self.sum_y**2).sum()) / max(self.n, 1)  # Σ‖y − ȳ‖²
        return {"l0": self.active / max(self.n, 1), "fve": 1.0 - self.err / total if total > 0 else float("nan"),
                "fired": self.fired, "tokens": self.n}


def transcoder_reconstruction_stats(tc: "Transcoder", x: "torch.Tensor", y: "torch.Tensor", batch_size: int = 4096) -> dict[str, Any]:
    """L0, FVE of ``y`` and the per-feature fired mask of ``tc`` on rows ``x`` ``[n, d_in]`` / ``y`` ``[n, d_out]``."""
    stats = _ReconstructionStats(tc.cfg.d_sae, y.shape[-1])
    for start in range(0, x.shape[0], batch_size):
        stats.add(tc, x[start : start + batch_size], y[start : start + batch_size])
    return stats.result()


def evaluate_transcoders(
    model: Any,
    transcoders: Mapping[int, "Transcoder"],
    tokens: "torch.Tensor",
    batch_size: int = 16,
    ce_contexts: int | None = None,
    train_fired: Mapping[int, "torch.Tensor"] | None = None,
    per_layer_ce: bool = True,
    replacement: bool = True,
) -> tuple[dict[int, DictionaryMetrics], ReplacementMetrics | None]:
    """Evaluate one transcoder per layer (``{layer: tc}``) on held-out ``tokens`` ``[n, n_ctx]`` (BOS at 0).

    Returns per-layer metrics (L0 / FVE / dead over all ``tokens``, CE over the first ``ce_contexts`` of them,
    None = all) and, if ``replacement``, the all-layers-replaced metrics over all ``tokens``. ``train_fired``: per
    layer, the features that fired on the training tokens (for the dead fraction).
    """
    import torch

    layers = sorted(transcoders)
    if not layers:
        return {}, None
    n, n_ctx = tokens.shape
    n_ce = n if ce_contexts is None else max(1, min(int(ce_contexts), n))
    stats = {layer: _ReconstructionStats(transcoders[layer].cfg.d_sae, transcoders[layer].cfg.d_out) for layer in layers}
    ce = {layer: {"clean": 0.0, "spliced": 0.0, "ablated": 0.0} for layer in layers}
    rep = {"clean": 0.0, "replaced": 0.0, "ablated": 0.0}
    n_pred_ce = n_pred_all = 0
    all_splice, all_ablate = splice_hooks(transcoders), ablate_hooks(layers)
    # Batches never straddle the CE subset's boundary, so each batch either does per-layer CE or not.
    bounds = [(s, min(s + batch_size, n_ce)) for s in range(0, n_ce, batch_size)]
    bounds += [(s, min(s + batch_size, n)) for s in range(n_ce, n, batch_size)]
    with torch.no_grad():
        for start, stop in track(bounds, total=len(bounds), desc="Evaluating transcoders (CE)", unit="batch"):
            batch = tokens[start:stop]
            in_ce = per_layer_ce and start < n_ce
            cache: dict[str, torch.Tensor] = {}

            def keep(act: torch.Tensor, hook: Any) -> None:
                cache[hook.name] = act

            names = [hook_name(k, layer) for layer in layers for k in ("mlp_in", "mlp_out")]
            if in_ce:
                names += [hook_name("resid_pre", layer) for layer in layers]
            clean = _run_ce(model, batch, batch, [(name, keep) for name in names])
            count = batch.shape[0] * (n_ctx - 1)
            n_pred_all += count
            rep["clean"] += clean
            for layer in layers:
                stats[layer].add(transcoders[layer], cache[hook_name("mlp_in", layer)][:, 1:],
                                 cache[hook_name("mlp_out", layer)][:, 1:])
            if replacement:
                rep["replaced"] += _run_ce(model, batch, batch, all_splice)
                rep["ablated"] += _run_ce(model, batch, batch, all_ablate)
            if in_ce:
                n_pred_ce += count
                for layer in layers:
                    spliced, ablated = _spliced_and_ablated(model, transcoders[layer], layer,
                                                            cache[hook_name("resid_pre", layer)], batch)
                    ce[layer]["clean"] += clean
                    ce[layer]["spliced"] += spliced
                    ce[layer]["ablated"] += ablated
    out: dict[int, DictionaryMetrics] = {}
    for layer in layers:
        s = stats[layer].result()
        fired = s["fired"]
        if train_fired is not None and layer in train_fired:
            fired = fired | train_fired[layer]
        nan = float("nan")
        c_clean, c_spl, c_abl = ((ce[layer][k] / n_pred_ce) if n_pred_ce else nan for k in ("clean", "spliced", "ablated"))
        denom = c_abl - c_clean
        out[layer] = DictionaryMetrics(
            l0=float(s["l0"]), fve=float(s["fve"]), ce_clean=c_clean, ce_spliced=c_spl, ce_ablated=c_abl,
            ce_loss_recovered=(c_abl - c_spl) / denom if n_pred_ce and denom != 0 else nan,
            dead_fraction=float(1.0 - fired.float().mean()), eval_tokens=int(s["tokens"]), ce_tokens=int(n_pred_ce),
        )
    metrics = None
    if replacement:
        r_clean, r_rep, r_abl = (rep[k] / n_pred_all for k in ("clean", "replaced", "ablated"))
        denom = r_abl - r_clean
        metrics = ReplacementMetrics(
            n_replaced=len(layers), ce_clean=r_clean, ce_replaced=r_rep, ce_ablated=r_abl,
            ce_loss_recovered=(r_abl - r_rep) / denom if denom != 0 else float("nan"), ce_tokens=int(n_pred_all),
        )
    return out, metrics


def transcoder_fired_features(tc: "Transcoder", x: "torch.Tensor", batch_size: int = 4096) -> "torch.Tensor":
    """Boolean ``[d_sae]``: which features are nonzero on at least one row of ``x``."""
    import torch

    fired = torch.zeros(tc.cfg.d_sae, dtype=torch.bool)
    for start in range(0, x.shape[0], batch_size):
        fired |= (encode(tc, x[start : start + batch_size]) != 0).any(0)
    return fired
