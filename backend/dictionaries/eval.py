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

from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Iterator, Mapping

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
            fired = fired | train_fired[layer].to(fired.device)
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
    """What the ``replacement_evals`` table stores about several MLPs replaced at once (by their transcoders, or by
    their dense linear baselines): CE clean / replaced / those MLPs zeroed, KL(clean ‖ replaced) of the next-token
    distribution, the share of tokens whose top prediction is unchanged, and 95% bootstrap intervals over the
    held-out contexts (``intervals``: name -> (low, high))."""

    n_replaced: int
    ce_clean: float
    ce_replaced: float
    ce_ablated: float
    ce_loss_recovered: float
    ce_tokens: int
    kl: float = float("nan")
    top1: float = float("nan")
    replacement: str = "transcoder"
    intervals: dict[str, tuple[float, float]] = field(default_factory=dict)

    @property
    def delta_ce(self) -> float:
        """Replaced − clean CE in nats."""
        return self.ce_replaced - self.ce_clean

    def as_row(self) -> dict[str, Any]:
        """Columns of ``replacement_evals`` (without ids, stats and run id)."""
        row = asdict(self)
        row.pop("intervals")
        return row


@dataclass
class TranscoderEvaluation:
    """:func:`evaluate_transcoders`' result: per-layer metrics of the transcoders and of their dense linear baselines
    (FVE, and CE with that one MLP replaced, in ``DictionaryMetrics`` fields; ``baselines`` is empty without them),
    and the all-replaced metrics of both."""

    layers: dict[int, DictionaryMetrics]
    baselines: dict[int, DictionaryMetrics]
    replaced: ReplacementMetrics | None
    baseline_replaced: ReplacementMetrics | None
    massive_rows: dict[int, int] = field(default_factory=dict)  # held-out rows kept exact as massive activations


def final_logprobs(model: Any, resid_final: "torch.Tensor", chunk: int = 1024) -> Iterator["torch.Tensor"]:
    """Next-token log-probabilities ``[≤chunk, d_vocab]`` of the positions before the last one, from the residual
    stream after the last block (final norm, unembedding, log-softmax), ``chunk`` tokens at a time in row-major order
    (the full ``[tokens, d_vocab]`` matrix of a batch would not fit comfortably in memory)."""
    b, n_ctx, d = resid_final.shape
    r = model.ln_final(resid_final)[:, :-1].reshape(-1, d)
    for s in range(0, r.shape[0], chunk):
        yield model.unembed(r[s : s + chunk]).float().log_softmax(-1)


def next_token_ce(model: Any, resid_final: "torch.Tensor", tokens: "torch.Tensor", chunk: int = 1024) -> "torch.Tensor":
    """Per-token next-token loss ``[b, n_ctx − 1]`` from the residual stream after the last block."""
    import torch

    b, n_ctx, _ = resid_final.shape
    target = tokens[:, 1:].reshape(-1)
    parts = []
    for s, lp in zip(range(0, target.shape[0], chunk), final_logprobs(model, resid_final, chunk)):
        parts.append(-lp.gather(-1, target[s : s + chunk, None].to(lp.device))[:, 0])
    return torch.cat(parts).reshape(b, n_ctx - 1)


def compare_with_clean(model: Any, clean_final: "torch.Tensor", other_final: "torch.Tensor", tokens: "torch.Tensor",
                       chunk: int = 1024) -> dict[str, "torch.Tensor"]:
    """Per predicted token ``[b, n_ctx − 1]``: the other run's CE, KL(clean ‖ other) of the next-token distribution
    and whether its top prediction equals the clean run's (1.0 / 0.0)."""
    import torch

    b, n_ctx, _ = clean_final.shape
    target = tokens[:, 1:].reshape(-1)
    ce, kl, same = [], [], []
    for s, (lp_c, lp_o) in zip(range(0, target.shape[0], chunk), zip(final_logprobs(model, clean_final, chunk),
                                                                     final_logprobs(model, other_final, chunk))):
        ce.append(-lp_o.gather(-1, target[s : s + chunk, None].to(lp_o.device))[:, 0])
        kl.append((lp_c.exp() * (lp_c - lp_o)).sum(-1))
        same.append((lp_c.argmax(-1) == lp_o.argmax(-1)).float())
    return {k: torch.cat(v).reshape(b, n_ctx - 1) for k, v in (("ce", ce), ("kl", kl), ("top1", same))}


def _final_resid(model: Any, inp: "torch.Tensor", tokens: "torch.Tensor", hooks: list[tuple[str, Any]],
                 start_at_layer: int | None = None) -> "torch.Tensor":
    """The residual stream after the last block of one hooked run from tokens, or from ``resid_pre`` at
    ``start_at_layer``."""
    import torch

    kwargs: dict[str, Any] = {"stop_at_layer": model.cfg.n_layers, "fwd_hooks": hooks}
    if start_at_layer is not None:
        kwargs.update(start_at_layer=start_at_layer, tokens=tokens)
    with torch.no_grad():
        return model.run_with_hooks(inp, **kwargs)


def _single_layer_ce(model: Any, replacements: list[Callable[["torch.Tensor"], "torch.Tensor"]], layer: int,
                     resid_pre: "torch.Tensor", tokens: "torch.Tensor", exact: "torch.Tensor",
                     limit: float | None) -> list[float]:
    """Summed CE with ``layer``'s MLP output replaced by each of ``replacements`` and, last, zeroed (except at the
    ``exact`` positions), as ONE run of the stacked batch restarting at ``layer``: the same result as separate runs,
    and measured faster for the small batches per-layer CE uses."""
    import torch

    b = tokens.shape[0]
    copies = len(replacements) + 1
    stash: dict[str, torch.Tensor] = {}

    def keep_input(x: torch.Tensor, hook: Any) -> None:
        stash["x"] = x

    def replace(y: torch.Tensor, hook: Any) -> torch.Tensor:
        x = stash.pop("x")
        parts = [fn(x[i * b : (i + 1) * b].float()).to(y.dtype) for i, fn in enumerate(replacements)]
        new = torch.cat([*parts, torch.zeros_like(y[:b])])
        keep = exact.repeat(copies, 1)
        if limit is not None:
            keep = keep | (y.norm(dim=-1) > limit)
        return torch.where(keep[..., None], y, new)

    hooks = [(hook_name("mlp_in", layer), keep_input), (hook_name("mlp_out", layer), replace)]
    stacked = tokens.repeat(copies, 1)
    with torch.no_grad():
        resid = model.run_with_hooks(resid_pre.repeat(copies, 1, 1), start_at_layer=layer, tokens=stacked,
                                     stop_at_layer=model.cfg.n_layers, fwd_hooks=hooks)
    loss = next_token_ce(model, resid, stacked)
    return [float(loss[i * b : (i + 1) * b].sum(dtype=torch.float64)) for i in range(copies)]


class _ReconstructionStats:
    """Streaming L0 / FVE / fired-mask accumulator for one transcoder or linear map over the non-sink rows (float64
    sums, no stored activations). ``encode`` None: a map without features (L0 and the fired mask stay empty)."""

    def __init__(self, d_sae: int, d_out: int) -> None:
        import torch

        self.n = 0
        self.active = 0
        self.err = 0.0
        self.sum_y = torch.zeros(d_out, dtype=torch.float64)
        self.sum_y2 = 0.0
        self.fired = torch.zeros(d_sae, dtype=torch.bool)

    def add(self, predict: Callable[["torch.Tensor"], "torch.Tensor"], encode_fn: Callable[["torch.Tensor"], "torch.Tensor"] | None,
            x: "torch.Tensor", y: "torch.Tensor") -> None:
        import torch

        x, y = x.reshape(-1, x.shape[-1]).float(), y.reshape(-1, y.shape[-1]).float()
        with torch.no_grad():
            y_hat = predict(x)
            if encode_fn is not None:
                nz = encode_fn(x) != 0
                self.active += int(nz.sum())
                self.fired |= nz.any(0)
        self.n += x.shape[0]
        self.err += float(((y - y_hat) ** 2).sum(dtype=torch.float64))
        self.sum_y += y.sum(0, dtype=torch.float64)
        self.sum_y2 += float((y.double() ** 2).sum())

    def result(self) -> dict[str, Any]:
        total = self.sum_y2 - float((self.sum_y**2).sum()) / max(self.n, 1)  # Σ‖y − ȳ‖²
        return {"l0": self.active / max(self.n, 1), "fve": 1.0 - self.err / total if total > 0 else float("nan"),
                "fired": self.fired, "tokens": self.n}


def transcoder_reconstruction_stats(tc: "Transcoder", x: "torch.Tensor", y: "torch.Tensor",
                                    batch_size: int = 4096) -> dict[str, Any]:
    """L0, FVE of ``y`` and the per-feature fired mask of ``tc`` on rows ``x`` ``[n, d_in]`` / ``y`` ``[n, d_out]``."""
    stats = _ReconstructionStats(tc.cfg.d_sae, y.shape[-1])
    for start in range(0, x.shape[0], batch_size):
        stats.add(lambda v: transcode(tc, v), lambda v: encode(tc, v), x[start : start + batch_size],
                  y[start : start + batch_size])
    return stats.result()


def evaluate_transcoders(
    model: Any,
    transcoders: Mapping[int, "Transcoder"],
    tokens: "torch.Tensor",
    batch_size: int = 16,
    ce_contexts: int | None = None,
    train_fired: Mapping[int, "torch.Tensor"] | None = None,
    baselines: Mapping[int, Callable[["torch.Tensor"], "torch.Tensor"]] | None = None,
    per_layer_ce: bool = True,
    replacement: bool = True,
    massive: Mapping[int, float | None] | None = None,
) -> TranscoderEvaluation:
    """Evaluate one transcoder per layer (``{layer: tc}``), and optionally a dense linear baseline per layer
    (``baselines``: ``{layer: x -> ŷ}``), on held-out ``tokens`` ``[n, n_ctx]`` (BOS at 0).

    Per layer: L0 / FVE / dead over the non-sink positions of all ``tokens``, CE with that one MLP replaced (and the
    baseline's, and the MLP zeroed) over the first ``ce_contexts`` contexts (None = all). If ``replacement``: every
    layer replaced at once, by the transcoders and by the baselines: CE, KL to the clean model, top-1 agreement, with
    95% bootstrap intervals over contexts. Sink positions (:func:`~backend.dictionaries.transcoder.sink_positions`)
    keep the real MLP output everywhere, and so do massive activations (real output norm above ``massive[layer]``,
    default: the limit stored with each transcoder, :func:`~backend.dictionaries.transcoder.massive_norm`), which are
    not scored either. ``train_fired``: per layer, the features that fired on the training tokens (for the dead
    fraction).
    """
    import numpy as np
    import torch

    from backend.dictionaries.transcoder import massive_norm, sink_positions
    from backend.inputs.corpus import document_separator_id
    from backend.stats import bootstrap_interval

    layers = sorted(transcoders)
    if not layers:
        return TranscoderEvaluation({}, {}, None, None)
    baselines = dict(baselines or {})
    limits = {l: (massive or {}).get(l, massive_norm(transcoders[l])) for l in layers}
    n_massive = {l: 0 for l in layers}
    separator = document_separator_id(model.tokenizer) if model.tokenizer is not None else None
    n, n_ctx = tokens.shape
    n_ce = n if ce_contexts is None else max(1, min(int(ce_contexts), n))
    d_out = int(model.cfg.d_model)
    stats = {l: _ReconstructionStats(transcoders[l].cfg.d_sae, d_out) for l in layers}
    base_stats = {l: _ReconstructionStats(0, d_out) for l in layers if l in baselines}
    ce = {l: np.zeros(3) for l in layers}  # clean, transcoder spliced, zeroed (per-layer CE contexts)
    base_ce = {l: 0.0 for l in layers if l in baselines}
    per_ctx: dict[str, list[np.ndarray]] = {k: [] for k in ("clean", "tc_ce", "tc_kl", "tc_top1", "lin_ce", "lin_kl",
                                                            "lin_top1", "ablated")}
    n_pred_ce = 0
    # Batches never straddle the per-layer-CE subset's boundary, so each batch either does per-layer CE or not.
    bounds = [(s, min(s + batch_size, n_ce)) for s in range(0, n_ce, batch_size)]
    bounds += [(s, min(s + batch_size, n)) for s in range(n_ce, n, batch_size)]
    with torch.no_grad():
        for start, stop in track(bounds, total=len(bounds), desc="Evaluating transcoders (CE)", unit="batch"):
            batch = tokens[start:stop]
            exact = sink_positions(batch, separator)
            in_ce = per_layer_ce and start < n_ce
            cache: dict[str, torch.Tensor] = {}

            def keep(act: torch.Tensor, hook: Any) -> None:
                cache[hook.name] = act

            names = [hook_name(k, layer) for layer in layers for k in ("mlp_in", "mlp_out")]
            if in_ce:
                names += [hook_name("resid_pre", layer) for layer in layers]
            clean = _final_resid(model, batch, batch, [(name, keep) for name in names])
            clean_ce = next_token_ce(model, clean, batch)
            per_ctx["clean"].append(clean_ce.double().mean(-1).cpu().numpy())
            rows = ~exact[:, 1:].reshape(-1)  # scored rows: non-sink positions after BOS
            for layer in layers:
                x = cache[hook_name("mlp_in", layer)][:, 1:].reshape(-1, d_out)[rows]
                y = cache[hook_name("mlp_out", layer)][:, 1:].reshape(-1, d_out)[rows]
                if limits[layer] is not None:
                    ordinary = y.norm(dim=-1) <= limits[layer]
                    n_massive[layer] += int((~ordinary).sum())
                    x, y = x[ordinary], y[ordinary]
                tc = transcoders[layer]
                stats[layer].add(lambda v, tc=tc: transcode(tc, v), lambda v, tc=tc: encode(tc, v), x, y)
                if layer in baselines:
                    base_stats[layer].add(baselines[layer], None, x, y)
            if replacement:
                for key, reps in (("tc", dict(transcoders)), ("lin", baselines)):
                    if len(reps) != len(layers):
                        continue
                    other = _final_resid(model, batch, batch, splice_hooks(reps, exact, limits))
                    got = compare_with_clean(model, clean, other, batch)
                    for name in ("ce", "kl", "top1"):
                        per_ctx[f"{key}_{name}"].append(got[name].double().mean(-1).cpu().numpy())
                ablated = _final_resid(model, batch, batch, ablate_hooks(layers, exact, limits))
                per_ctx["ablated"].append(next_token_ce(model, ablated, batch).double().mean(-1).cpu().numpy())
            if in_ce:
                n_pred_ce += clean_ce.numel()
                for layer in layers:
                    reps = [transcoders[layer]] + ([baselines[layer]] if layer in baselines else [])
                    sums = _single_layer_ce(model, reps, layer, cache[hook_name("resid_pre", layer)], batch, exact,
                                            limits[layer])
                    ce[layer] += [float(clean_ce.sum(dtype=torch.float64)), sums[0], sums[-1]]
                    if layer in baselines:
                        base_ce[layer] += sums[1]
    nan = float("nan")
    out: dict[int, DictionaryMetrics] = {}
    base_out: dict[int, DictionaryMetrics] = {}
    for layer in layers:
        s = stats[layer].result()
        fired = s["fired"]
        if train_fired is not None and layer in train_fired:
            fired = fired | train_fired[layer].to(fired.device)
        c_clean, c_spl, c_abl = (ce[layer] / n_pred_ce) if n_pred_ce else (nan, nan, nan)
        out[layer] = _metrics(float(s["l0"]), float(s["fve"]), c_clean, c_spl, c_abl,
                              float(1.0 - fired.float().mean()), int(s["tokens"]), n_pred_ce)
        if layer in baselines:
            b = base_stats[layer].result()
            c_base = base_ce[layer] / n_pred_ce if n_pred_ce else nan
            base_out[layer] = _metrics(0.0, float(b["fve"]), c_clean, c_base, c_abl, 0.0, int(b["tokens"]), n_pred_ce)
    replaced = baseline_replaced = None
    if replacement:
        clean_c = np.concatenate(per_ctx["clean"])
        ablated_c = np.concatenate(per_ctx["ablated"])
        n_tokens = int(n * (n_ctx - 1))

        def summary(key: str) -> ReplacementMetrics:
            ce_c, kl_c, top_c = (np.concatenate(per_ctx[f"{key}_{k}"]) for k in ("ce", "kl", "top1"))
            r_clean, r_rep, r_abl = float(clean_c.mean()), float(ce_c.mean()), float(ablated_c.mean())
            denom = r_abl - r_clean
            return ReplacementMetrics(
                n_replaced=len(layers), ce_clean=r_clean, ce_replaced=r_rep, ce_ablated=r_abl,
                ce_loss_recovered=(r_abl - r_rep) / denom if denom != 0 else nan, ce_tokens=n_tokens,
                kl=float(kl_c.mean()), top1=float(top_c.mean()),
                replacement="transcoder" if key == "tc" else "linear",
                intervals={"delta_ce": bootstrap_interval(ce_c - clean_c), "kl": bootstrap_interval(kl_c),
                           "top1": bootstrap_interval(top_c)})

        replaced = summary("tc")
        if per_ctx["lin_ce"]:
            baseline_replaced = summary("lin")
    return TranscoderEvaluation(out, base_out, replaced, baseline_replaced, n_massive)


def _metrics(l0: float, fve: float, ce_clean: float, ce_spliced: float, ce_ablated: float, dead: float,
             eval_tokens: int, ce_tokens: int) -> DictionaryMetrics:
    denom = ce_ablated - ce_clean
    recovered = (ce_ablated - ce_spliced) / denom if ce_tokens and denom != 0 else float("nan")
    return DictionaryMetrics(l0=l0, fve=fve, ce_clean=ce_clean, ce_spliced=ce_spliced, ce_ablated=ce_ablated,
                             ce_loss_recovered=recovered, dead_fraction=dead, eval_tokens=eval_tokens,
                             ce_tokens=ce_tokens)


def transcoder_fired_features(tc: "Transcoder", x: "torch.Tensor", batch_size: int = 4096) -> "torch.Tensor":
    """Boolean ``[d_sae]``: which features are nonzero on at least one row of ``x``."""
    import torch

    fired = torch.zeros(tc.cfg.d_sae, dtype=torch.bool)
    for start in range(0, x.shape[0], batch_size):
        fired |= (encode(tc, x[start : start + batch_size]) != 0).any(0)
    return fired
