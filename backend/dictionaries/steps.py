"""The dictionary precompute steps: train (or import), evaluate and store one attention-output SAE per selected layer
(``attention_saes``) and one transcoder per selected MLP layer (``transcoders``).

Each step splits the corpus contexts once: the **last** ``eval_contexts`` are held out for evaluation (never trained
on), the rest are training data. Training activations come from the corpus step's scoring pass when they fit in the
step's memory budget (``*_precollect_wants``), or from a forward pass over groups of layers small enough to fit
(:data:`SAE_MEMORY_BYTES`, :data:`TRANSCODER_MEMORY_BYTES`). Training measurements: ``docs/presets.md``.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any, Mapping, Sequence

from backend.dictionaries.attention_sae import dict_id_for, layer_of, train_attention_sae
from backend.dictionaries.config import SaeConfig, TranscoderConfig
from backend.dictionaries.eval import (
    DictionaryMetrics,
    evaluate_dictionaries,
    evaluate_transcoders,
    fired_features,
    split_contexts,
    transcoder_fired_features,
)
from backend.dictionaries.kinds import ATTN_SAE, TRANSCODER
from backend.dictionaries.storage import (
    load_local,
    load_local_transcoder,
    load_pretrained,
    load_pretrained_transcoder,
    release_ids,
    save_dictionary,
    to_stored_precision,
)
from backend.dictionaries.transcoder import collect_mlp_io, transcoder_dict_id
from backend.dictionaries.transcoder import layer_of as transcoder_layer_of
from backend.errors import InputError
from backend.model.activations import ResidualCarry, collect_z, layer_groups
from backend.model.hooks import hook_name
from backend.progress import say, track

if TYPE_CHECKING:
    import torch

    from backend.pipeline.context import RunContext

# Activation matrices of one collection group must fit in this many bytes (float32): the full preset's
# ~260k training tokens x 576 dims is ~0.6 GB per layer (plus the residual stream carried from one group to the next,
# one layer's worth: ResidualCarry).
SAE_MEMORY_BYTES = 3 * 1024**3
# Transcoder training activations (x and y, float32) of one group: the demo's 16k tokens x 30 layers x 576 x 2 is
# 2.2 GB, one group; the full preset's 260k tokens need ~10 groups.
TRANSCODER_MEMORY_BYTES = 4 * 1024**3


def _row(ctx: "RunContext", dict_id: str, layer: int, architecture: str, metrics: DictionaryMetrics | None,
         training_tokens: int | None, source: str) -> dict[str, Any]:
    return {
        "dict_id": dict_id, "model": ctx.spec.name, "kind": ATTN_SAE, "architecture": architecture,
        "hook_name": hook_name("z", layer), "layer": int(layer), "training_tokens": training_tokens,
        "source": source, **(metrics.as_row() if metrics is not None else {}),
    }


def _trained(ctx: "RunContext", step: str, ids: Mapping[int, str]) -> tuple[dict[int, Any], dict[int, Any],
                                                                            dict[int, dict[str, Any]]]:
    """The dictionaries ``ids`` ({layer: dict_id}) this run trained and stored layer by layer, read back from the
    store, with each layer's recorded tensors and facts (:meth:`RunContext.finish`). An uninterrupted run and a
    resumed one evaluate exactly these objects (the stored weights), so they write the same metrics."""
    from backend.dictionaries.storage import load_dictionaries

    loaded = load_dictionaries(ctx.con, list(ids.values()), cache=False)
    return ({layer: loaded[i] for layer, i in ids.items()},
            {layer: ctx.unit_tensors(step, layer) for layer in ids},
            {layer: ctx.unit_info(step, layer) for layer in ids})


def _skipped(ctx: "RunContext", step: str, layers: Sequence[int], what: str) -> list[int]:
    """The layers of ``layers`` still to do in ``step`` (a resumed run finished the others; says which)."""
    done = [layer for layer in layers if ctx.done(step, layer)]
    if done:
        say(f"Skipping the {what} of layer(s) {', '.join(map(str, done))}: the unfinished run had finished them")
    return [layer for layer in layers if layer not in done]


def sae_precollect_wants(ctx: "RunContext") -> dict[tuple[str, int], int]:
    """What the corpus step should gather for this step during its scoring pass: hook_z at every SAE layer for ALL
    contexts (site -> number of leading contexts), when this step will train, its training contexts come first, and
    it all fits in SAE_MEMORY_BYTES. Training then reads the leading rows and the features step (which scores every
    context) needs no forward pass either; measured on the demo that saves ~40 s + ~45 s of forward passes."""
    preset = ctx.preset
    if ctx.sae_sources or not preset.sae.train or not ctx.layers:
        return {}
    n, n_ctx = ctx.contexts.tokens.shape
    train_idx, eval_idx = split_contexts(n, preset.sae.eval_contexts)
    train_idx = list(train_idx)[: preset.sae.train_contexts or None]
    d_in = ctx.model.cfg.n_heads * ctx.model.cfg.d_head
    if not eval_idx or train_idx != list(range(len(train_idx))) or n * (n_ctx - 1) * d_in * 4 * len(ctx.layers) > SAE_MEMORY_BYTES:
        return {}
    return {("z", int(layer)): n for layer in ctx.layers}


def step_attention_saes(ctx: "RunContext") -> None:
    """Train, evaluate and store an attention SAE for each layer in ``ctx.layers`` (per the preset).

    Re-running replaces the dictionaries with the same dict_id. Skipped when the preset trains no SAEs. Each layer
    is one unit of work: its SAE is stored (unevaluated) and recorded as it is trained, so a resumed run trains only
    the others; all of them are then evaluated as stored.
    """
    import torch

    preset = ctx.preset
    if ctx.sae_sources:
        ctx.summary["attention_saes"] = {"imported": import_sources(ctx, ctx.sae_sources)}
        return
    if not preset.sae.train or not ctx.layers:
        return
    if ctx.contexts is None:
        raise InputError("The attention-SAE step needs the corpus step to run first.")
    tokens = ctx.contexts.tokens
    n, n_ctx = tokens.shape
    train_idx, eval_idx = split_contexts(n, preset.sae.eval_contexts)
    train_idx = list(train_idx)[: preset.sae.train_contexts or None]
    if not train_idx or not eval_idx:
        raise InputError(f"The corpus has {n} context(s): the attention-SAE step needs at least 2 (train + held out).")
    model, spec = ctx.model, ctx.spec
    d_in = model.cfg.n_heads * model.cfg.d_head
    d_sae = int(preset.sae.expansion * d_in)
    arch = preset.sae.architecture
    threads = torch.get_num_threads()
    if preset.sae.threads:
        torch.set_num_threads(preset.sae.threads)
    summary: dict[str, Any] = {"layers": {}, "train_contexts": len(train_idx), "eval_contexts": len(eval_idx)}
    step = "attention_saes"
    todo = _skipped(ctx, step, sorted(ctx.layers), "attention-SAE training")
    ids = {layer: dict_id_for(spec.name, layer, arch, d_sae) for layer in sorted(ctx.layers)}
    try:
        bytes_per_layer = len(train_idx) * (n_ctx - 1) * d_in * 4
        # hook_z the corpus step gathered (sae_precollect_wants): the leading rows are the training contexts'.
        pre = ctx.precollected or {}
        n_train_rows = len(train_idx) * (n_ctx - 1)
        reuse = all(("z", l) in pre and pre[("z", l)].shape[0] >= n_train_rows for l in todo)
        summary["reused_activations"] = reuse
        groups = [todo] if reuse else layer_groups(todo, bytes_per_layer, SAE_MEMORY_BYTES)
        carry = ResidualCarry()  # each group's pass starts where the previous one stopped
        for group in groups if todo else []:
            t = time.perf_counter()
            carry.keep = group is not groups[-1]
            if reuse:
                acts = {l: pre[("z", l)][:n_train_rows] for l in group}
            else:
                acts = collect_z(model, tokens[train_idx], group, batch_size=preset.batch_size,
                                 desc=f"Collecting hook_z L{','.join(map(str, group))}", carry=carry)
                say(f"Collected {n_train_rows} tokens x {len(group)} layer(s) in {time.perf_counter() - t:.0f} s")
            # Each layer's activations leave `acts` as its unit of work is handed out (one at a time locally).
            items = ((layer, acts.pop(layer), {
                "model_name": spec.name, "hook_name": hook_name("z", layer), "hook_layer": layer,
                "context_size": n_ctx, "prepend_bos": True, "dict_id": ids[layer], "corpus_id": ctx.corpus_id,
                "bos_excluded": True}) for layer in group)
            for layer, (sae, info, fired) in zip(group, ctx.executor.imap(train_sae_layer, items, d_sae=d_sae,
                                                                         cfg=preset.sae)):
                dict_id = ids[layer]
                save_dictionary(ctx.writer, to_stored_precision(sae),
                                _row(ctx, dict_id, layer, arch, None, info["training_tokens"], "trained"))
                ctx.finish(step, layer, info={k: info[k] for k in ("training_tokens", "seconds", "samples_per_second")},
                           tensors={"train_fired": fired})
                say(f"Stored {dict_id} (layer {layer} of the {step} step finished)")
                del sae
        t = time.perf_counter()
        saes, states, infos = _trained(ctx, step, ids)
        # Each layer's metrics depend on its own SAE only: evaluated together here, or one layer per Ray task.
        metrics: dict[int, DictionaryMetrics] = {}
        units = [{l: (saes[l], states[l]["train_fired"]) for l in part} for part in ctx.executor.split(sorted(saes))]
        for part in ctx.executor.imap(evaluate_sae_layers, units, model=ctx.executor.model(model, spec.name),
                                      tokens=tokens[eval_idx[0] : eval_idx[-1] + 1], batch_size=preset.batch_size):
            metrics.update(part)
        eval_seconds = time.perf_counter() - t
    finally:
        torch.set_num_threads(threads)
    for layer in sorted(saes):
        dict_id = ids[layer]
        m = metrics[layer]
        saes[layer].cfg.metadata["evaluation"] = {
            "eval_contexts": len(eval_idx), "first_eval_context": int(eval_idx[0]), "ce_tokens": m.ce_tokens,
            "delta_ce": m.delta_ce, "ablation": "hook_z zeroed at positions >= 1 (attn_out = b_O)",
        }
        save_dictionary(ctx.writer, saes[layer],
                        _row(ctx, dict_id, layer, arch, m, infos[layer]["training_tokens"], "trained"), weights=False)
        summary["layers"][layer] = {
            "dict_id": dict_id, "l0": round(m.l0, 2), "fve": round(m.fve, 4),
            "ce_loss_recovered": round(m.ce_loss_recovered, 4), "delta_ce": round(m.delta_ce, 4),
            "ce_ablated_minus_clean": round(m.ce_ablated - m.ce_clean, 4), "dead_fraction": round(m.dead_fraction, 4),
            "train_seconds": infos[layer]["seconds"], "samples_per_second": infos[layer]["samples_per_second"],
        }
        say(f"{dict_id}: L0 {m.l0:.1f}, FVE {m.fve:.3f}, CE recovered {m.ce_loss_recovered:.3f} "
            f"(ΔCE {m.delta_ce:+.4f} nats of {m.ce_ablated - m.ce_clean:.4f}), dead {m.dead_fraction:.1%}")
    summary["eval_seconds"] = round(eval_seconds, 2)
    ctx.summary["attention_saes"] = summary


def train_sae_layer(item: tuple[int, "torch.Tensor", dict[str, Any]], d_sae: int,
                    cfg: SaeConfig) -> tuple[Any, dict[str, Any], "torch.Tensor"]:
    """One unit of work of the attention-SAE step (run by the executor): train layer ``item[0]``'s SAE on its hook_z
    rows ``item[1]`` (seeded by the layer alone) with metadata ``item[2]``; returns the SAE, its training facts and
    the features that fired on the training rows."""
    layer, acts, metadata = item
    say(f"Training {metadata['dict_id']}")
    sae, info = train_attention_sae(acts, d_sae, architecture=cfg.architecture, k=cfg.k, lr=cfg.lr,
                                    batch_size=cfg.batch_size, epochs=cfg.epochs, seed=layer, metadata=metadata)
    return sae, info, fired_features(sae, acts)


def evaluate_sae_layers(item: Mapping[int, tuple[Any, "torch.Tensor"]], model: Any, tokens: "torch.Tensor",
                        batch_size: int) -> dict[int, DictionaryMetrics]:
    """One unit of work of the attention-SAE step's evaluation: ``item`` maps layers to (SAE, features fired in
    training); metrics on the held-out ``tokens`` by layer. ``model``: the model, or its name in a Ray worker."""
    from backend.pipeline.executor import worker_model

    return evaluate_dictionaries(worker_model(model), {l: sae for l, (sae, _) in item.items()}, tokens,
                                 batch_size=batch_size, train_fired={l: fired for l, (_, fired) in item.items()})


def import_sources(ctx: "RunContext", sources: Sequence[str]) -> list[str]:
    """``--saes``: each source is a sae-lens-format directory on disk, or a sae-lens release name whose SAEs for
    the selected layers (ids ``blocks.L.hook_z``, the naming of hook_z releases such as gpt2-small-hook-z-kk)
    are imported. Returns the dict_ids written."""
    from pathlib import Path

    ids: list[str] = []
    for source in sources:
        if Path(source).is_dir():
            ids += import_local(ctx, [source])
        else:
            ids += import_pretrained(ctx, source, [hook_name("z", layer) for layer in ctx.layers])
    return ids


def import_pretrained(ctx: "RunContext", release: str, sae_ids: Sequence[str]) -> list[str]:
    """Load sae-lens release SAEs (e.g. ``"gpt2-small-hook-z-kk"``, ``["blocks.5.hook_z"]``) into the store,
    evaluated on the last ``preset.sae.eval_contexts`` corpus contexts; returns their dict_ids.

    Offline with nothing cached: one ModelUnavailableError sentence (see :func:`load_pretrained`).
    """
    if ctx.contexts is None:
        raise InputError("Importing pretrained SAEs needs the corpus step to run first.")
    return import_saes(ctx, {f"sae-lens:{release}/{sae_id}": load_pretrained(release, sae_id) for sae_id in sae_ids})


def import_local(ctx: "RunContext", paths: Sequence[str]) -> list[str]:
    """Like :func:`import_pretrained` for sae-lens-format directories on disk."""
    if ctx.contexts is None:
        raise InputError("Importing SAEs needs the corpus step to run first.")
    return import_saes(ctx, {f"local:{p}": load_local(p) for p in paths})


def import_saes(ctx: "RunContext", saes: dict[str, Any]) -> list[str]:
    """Evaluate and store already-loaded hook_z SAEs (``{source: sae}``); each must read ``hook_z`` of
    ``ctx.model`` (its metadata ``hook_name`` gives the layer, its ``d_in`` must match). Returns the dict_ids."""
    if ctx.contexts is None:
        raise InputError("Importing SAEs needs the corpus step to run first.")
    model, spec = ctx.model, ctx.spec
    d_in = model.cfg.n_heads * model.cfg.d_head
    by_layer: dict[int, tuple[str, Any]] = {}
    for source, sae in saes.items():
        layer = layer_of(sae)
        if layer is None or sae.cfg.d_in != d_in or layer >= model.cfg.n_layers:
            raise InputError(f"SAE {source} does not read hook_z of {spec.name} (its hook "
                             f"{getattr(sae.cfg.metadata, 'hook_name', None)!r}, d_in {sae.cfg.d_in} vs {d_in}): "
                             f"pick one trained on this model.")
        if layer in by_layer:
            raise InputError(f"Two SAEs read layer {layer} ({by_layer[layer][0]} and {source}): import one per layer at a time.")
        by_layer[layer] = (source, sae)
    n = ctx.contexts.tokens.shape[0]
    _, eval_idx = split_contexts(n, ctx.preset.sae.eval_contexts)
    for _, sae in by_layer.values():
        to_stored_precision(sae)
    metrics = evaluate_dictionaries(model, {l: s for l, (_, s) in by_layer.items()},
                                    ctx.contexts.tokens[eval_idx[0] : eval_idx[-1] + 1], batch_size=ctx.preset.batch_size)
    ids = []
    for layer, (source, sae) in sorted(by_layer.items()):
        arch = sae.cfg.architecture()
        dict_id = dict_id_for(spec.name, layer, arch, sae.cfg.d_sae)
        training = sae.cfg.metadata.get("training") or {}
        save_dictionary(ctx.writer, sae, _row(ctx, dict_id, layer, arch, metrics[layer],
                                              training.get("training_tokens"), source))
        ids.append(dict_id)
    return ids


def _metadata(ctx: "RunContext", layer: int, dict_id: str, n_ctx: int) -> dict[str, Any]:
    return {"model_name": ctx.spec.name, "hook_name": hook_name("mlp_in", layer),
            "hook_name_out": hook_name("mlp_out", layer), "hook_layer": int(layer), "context_size": int(n_ctx),
            "prepend_bos": True, "dict_id": dict_id, "corpus_id": ctx.corpus_id, "bos_excluded": True}


def _eval_split(ctx: "RunContext") -> tuple[list[int], list[int]]:
    n = ctx.contexts.tokens.shape[0]
    train_idx, eval_idx = split_contexts(n, ctx.preset.transcoder.eval_contexts)
    return list(train_idx)[: ctx.preset.transcoder.train_contexts or None], list(eval_idx)


def transcoder_precollect_wants(ctx: "RunContext") -> dict[tuple[str, int], int]:
    """What the corpus step should gather for this step during its scoring pass: the MLP input and output of every
    transcoder layer for the training contexts (site -> number of leading contexts), when this step will train,
    its training contexts come first and they fit in TRANSCODER_MEMORY_BYTES (saves the step's own collection pass)."""
    preset = ctx.preset
    layers = list(ctx.transcoder_layers or [])
    if ctx.transcoder_sources or not preset.transcoder.train or not layers:
        return {}
    train_idx, eval_idx = _eval_split(ctx)
    n_ctx = ctx.contexts.tokens.shape[1]
    if (not eval_idx or not train_idx or train_idx != list(range(len(train_idx)))
            or len(train_idx) * (n_ctx - 1) * ctx.model.cfg.d_model * 4 * 2 * len(layers) > TRANSCODER_MEMORY_BYTES):
        return {}
    return {(kind, int(layer)): len(train_idx) for layer in layers for kind in ("mlp_in", "mlp_out")}


def training_rows(tokens: "torch.Tensor", y: "torch.Tensor", separator_id: int | None,
                  massive_ratio: float) -> tuple["torch.Tensor", float]:
    """The rows a transcoder trains on, for rows laid out as :func:`backend.model.activations.collect` does
    (context-major, positions 1..n_ctx-1) over ``tokens`` ``[n, n_ctx]``: not a sink position (a document separator;
    BOS has no row) and not a massive activation — an MLP output norm above ``massive_ratio`` × the median of the
    other rows. Returns the bool mask and that norm limit (stored with the transcoder: splicing keeps such positions
    exact). Massive rows otherwise dominate the loss and ruin the fit on every ordinary token."""
    from backend.dictionaries.transcoder import sink_positions

    rows = ~sink_positions(tokens, separator_id)[:, 1:].reshape(-1)
    norm = y.norm(dim=-1)
    limit = float(massive_ratio * norm[rows].median().clamp_min(1e-12))
    return rows & (norm <= limit), limit


def step_transcoders(ctx: "RunContext") -> None:
    """Train (or, with ``ctx.transcoder_sources``, import) one transcoder per layer of ``ctx.transcoder_layers``,
    evaluate each — beside its dense linear baseline fitted on the same tokens — and all of them together on the
    held-out contexts, and store them (``dictionaries`` rows of kind 'transcoder' + ``replacement_evals`` rows for the
    transcoders and for the baselines). Re-running replaces rows with the same ids."""
    import torch

    from backend.dictionaries.transcoder_training import LinearFit, inference_architecture
    from backend.inputs.corpus import document_separator_id

    preset = ctx.preset
    cfg = preset.transcoder
    layers = list(ctx.transcoder_layers or [])
    sources = list(ctx.transcoder_sources or [])
    if not sources and (not cfg.train or not layers):
        return
    if ctx.contexts is None:
        raise InputError("The transcoder step needs the corpus step to run first.")
    if sources:
        ctx.summary["transcoders"] = {"imported": import_transcoder_sources(ctx, sources)}
        return
    tokens = ctx.contexts.tokens
    n_ctx = tokens.shape[1]
    train_idx, eval_idx = _eval_split(ctx)
    if not train_idx or not eval_idx:
        raise InputError(f"The corpus has {tokens.shape[0]} context(s): the transcoder step needs at least 2 (train + held out).")
    model, spec = ctx.model, ctx.spec
    d_model = int(model.cfg.d_model)
    d_sae = int(cfg.expansion * d_model)
    separator = document_separator_id(model.tokenizer)
    threads = torch.get_num_threads()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    t_start = time.perf_counter()
    timing = {"collect": 0.0, "fit": 0.0}
    step = "transcoders"
    todo = _skipped(ctx, step, sorted(layers), "transcoder training")
    ids = {layer: transcoder_dict_id(spec.name, layer, inference_architecture(cfg.skip), d_sae) for layer in layers}
    # The transcoder feature step scores the first transcoder_feature_contexts contexts: when those are training
    # contexts, keep their MLP inputs (the first rows of each layer's x) so that step needs no forward pass (only
    # when every layer is trained here: that step reads all layers' inputs or none).
    n_keep = min(preset.features.transcoder_contexts or len(tokens), len(tokens))
    keep = list(train_idx[:n_keep]) == list(range(n_keep)) and len(todo) == len(layers)
    kept: dict[tuple[str, int], Any] = {}
    n_train = len(train_idx) * (n_ctx - 1)
    # MLP inputs / outputs the corpus step gathered (transcoder_precollect_wants): their leading rows are the
    # training contexts'.
    pre = ctx.precollected or {}
    reuse = all((k, l) in pre and pre[(k, l)].shape[0] >= n_train for l in todo for k in ("mlp_in", "mlp_out"))
    train_tokens = tokens[train_idx]
    try:
        groups = [todo] if reuse else layer_groups(todo, n_train * d_model * 4 * 2, TRANSCODER_MEMORY_BYTES)
        carry = ResidualCarry()  # each group's pass starts where the previous one stopped
        for group in groups if todo else []:
            t = time.perf_counter()
            carry.keep = group is not groups[-1]
            if reuse:
                acts = {l: (pre.pop(("mlp_in", l))[:n_train], pre.pop(("mlp_out", l))[:n_train]) for l in group}
            else:
                acts = collect_mlp_io(model, train_tokens, group, batch_size=preset.batch_size,
                                      desc=f"Collecting MLP in/out L{group[0]}-{group[-1]}", carry=carry)
                say(f"Collected {n_train} tokens x {len(group)} MLP layer(s) in {time.perf_counter() - t:.0f} s")
            timing["collect"] += time.perf_counter() - t
            t = time.perf_counter()

            def handed_out(group: list[int] = group) -> Any:
                for layer in group:
                    x, y = acts.pop(layer)  # each layer's activations leave `acts` as its unit is handed out
                    if keep:
                        kept[("mlp_in", layer)] = x[: n_keep * (n_ctx - 1)].clone()
                    yield layer, x, y, _metadata(ctx, layer, ids[layer], n_ctx)

            trained = ctx.executor.imap(train_transcoder_layer, handed_out(), d_sae=d_sae, cfg=cfg,
                                        tokens=train_tokens, separator=separator)
            for layer, (tc, info, fired, linear, limit) in track(zip(group, trained), total=len(group),
                                                                 desc="Training transcoders", unit="layer"):
                dict_id = ids[layer]
                save_dictionary(ctx.writer, to_stored_precision(tc), {
                    "dict_id": dict_id, "model": spec.name, "kind": TRANSCODER, "architecture": tc.cfg.architecture(),
                    "hook_name": hook_name("mlp_in", layer), "layer": int(layer),
                    "training_tokens": info.get("training_tokens"), "source": "trained"})
                # The baseline is kept as its fitted W and b (with its statistics) for the evaluation below.
                ctx.finish(step, layer, info={"fit_seconds": info["seconds"], "dropped_rows": info["dropped_rows"],
                                              "massive": limit, "n": linear.n, "scale_x": linear.scale_x,
                                              "scale_y": linear.scale_y, "train_fve": linear.train_fve},
                           tensors={"train_fired": fired, "baseline_W": linear.W, "baseline_b": linear.b})
                say(f"Stored {dict_id} (layer {layer} of the {step} step finished)")
                del tc
            timing["fit"] += time.perf_counter() - t
        t = time.perf_counter()
        transcoders, states, infos = _trained(ctx, step, ids)
        baselines = {layer: LinearFit(W=states[layer]["baseline_W"].to(tc.W_enc.device),
                                      b=states[layer]["baseline_b"].to(tc.W_enc.device),
                                      **{k: infos[layer][k] for k in ("n", "scale_x", "scale_y", "train_fve")}).predict
                     for layer, tc in transcoders.items()}
        summary = _evaluate_and_save(ctx, transcoders, eval_idx, source="trained",
                                     train_fired={layer: state["train_fired"] for layer, state in states.items()},
                                     baselines=baselines, massive={layer: i["massive"] for layer, i in infos.items()},
                                     weights_stored=True)
        timing["evaluate"] = time.perf_counter() - t
    finally:
        torch.set_num_threads(threads)
    if keep:
        ctx.precollected = {**(ctx.precollected or {}), **kept}
    summary.update(reused_activations=reuse, train_contexts=len(train_idx), training_tokens=n_train,
                   seconds={k: round(v, 1) for k, v in {**timing, "total": time.perf_counter() - t_start}.items()})
    for layer, info in infos.items():
        summary["layers"][layer].update(fit_seconds=info["fit_seconds"], dropped_rows=info["dropped_rows"])
    ctx.summary["transcoders"] = summary


def train_transcoder_layer(item: tuple[int, "torch.Tensor", "torch.Tensor", dict[str, Any]], d_sae: int,
                           cfg: TranscoderConfig, tokens: "torch.Tensor", separator: int | None) -> tuple[Any, ...]:
    """One unit of work of the transcoder step (run by the executor): for layer ``item[0]`` with MLP inputs / outputs
    ``item[1]``, ``item[2]`` over the training ``tokens`` and metadata ``item[3]``, drop the sink and massive rows,
    fit the dense linear baseline and train the transcoder (seeded by the layer alone). Returns the transcoder, its
    training facts (with ``dropped_rows``), the features that fired, the baseline and the massive-row norm limit."""
    from backend.dictionaries.transcoder_training import data_statistics, train_transcoder

    layer, x, y, metadata = item
    rows, limit = training_rows(tokens, y, separator, cfg.massive_ratio)
    x, y = x[rows], y[rows]
    linear = data_statistics((x, y), ridge=cfg.ridge)  # the dense linear baseline, same tokens
    tc, info = train_transcoder(
        (x, y), d_sae, k=cfg.k, skip=cfg.skip, architecture=cfg.architecture, epochs=cfg.epochs,
        lr=cfg.lr, batch_size=cfg.batch_size, ridge=cfg.ridge, seed=layer, linear=linear,
        metadata={**metadata, "massive_norm": limit}, progress=True, desc=f"Training {metadata['dict_id']}")
    info["dropped_rows"] = int((~rows).sum())  # also in the transcoder's metadata (its training facts)
    return tc, info, transcoder_fired_features(tc, x), linear, limit


def _evaluate_and_save(ctx: "RunContext", transcoders: Mapping[int, Any], eval_idx: Sequence[int], source: Any,
                       train_fired: Mapping[int, Any] | None = None, baselines: Mapping[int, Any] | None = None,
                       massive: Mapping[int, float] | None = None, weights_stored: bool = False) -> dict[str, Any]:
    """Evaluate ``transcoders`` ({layer: tc}) and their ``baselines`` ({layer: x -> ŷ}, optional) on the held-out
    contexts ``eval_idx``, store one ``dictionaries`` row per layer and one ``replacement_evals`` row for the
    transcoders all at once (and one for the baselines); ``source``: a string or {layer: string}.
    ``weights_stored``: this run already stored their weights (only the rows are written)."""
    import hashlib
    import json

    import pandas as pd

    preset, spec = ctx.preset, ctx.spec
    tokens = ctx.contexts.tokens
    eval_tokens = tokens[eval_idx[0] : eval_idx[-1] + 1]
    for tc in transcoders.values():
        to_stored_precision(tc)
    t = time.perf_counter()
    ev = evaluate_transcoders(ctx.model, transcoders, eval_tokens, batch_size=preset.batch_size,
                              ce_contexts=preset.transcoder.ce_contexts, train_fired=train_fired, baselines=baselines,
                              massive=massive)
    eval_seconds = time.perf_counter() - t
    ablation = "hook_mlp_out zeroed except at sink positions (BOS, document separators keep their MLP output)"
    summary: dict[str, Any] = {"layers": {}, "eval_contexts": len(eval_idx), "eval_seconds": round(eval_seconds, 1)}
    dict_ids: list[str] = []
    for layer in sorted(transcoders):
        tc, m = transcoders[layer], ev.layers[layer]
        base = ev.baselines.get(layer)
        arch = tc.cfg.architecture()
        dict_id = transcoder_dict_id(spec.name, layer, arch, tc.cfg.d_sae)
        tc.cfg.metadata.dict_id = dict_id
        tc.cfg.metadata["evaluation"] = {
            "eval_contexts": len(eval_idx), "first_eval_context": int(eval_idx[0]), "ce_tokens": m.ce_tokens,
            "ce_contexts": min(len(eval_idx), preset.transcoder.ce_contexts or len(eval_idx)),
            "delta_ce": m.delta_ce, "ablation": ablation,
            "sink_positions": "BOS, document separators and massive activations: not scored, real MLP output kept "
                              "when spliced",
            "massive_rows": ev.massive_rows.get(layer, 0),
            **({"baseline": {"fve": base.fve, "delta_ce": base.delta_ce}} if base is not None else {}),
        }
        training = tc.cfg.metadata.get("training") or {}
        src = source.get(layer) if isinstance(source, Mapping) else source
        save_dictionary(ctx.writer, tc, {
            "dict_id": dict_id, "model": spec.name, "kind": TRANSCODER, "architecture": arch,
            "hook_name": hook_name("mlp_in", layer), "layer": int(layer),
            "training_tokens": training.get("training_tokens"), "source": src, **m.as_row(),
            **({"baseline_fve": base.fve, "baseline_ce_spliced": base.ce_spliced} if base is not None else {})},
            weights=not weights_stored)
        dict_ids.append(dict_id)
        summary["layers"][layer] = {
            "dict_id": dict_id, "l0": round(m.l0, 2), "fve": round(m.fve, 4), "ce_loss_recovered": round(m.ce_loss_recovered, 4),
            "delta_ce": round(m.delta_ce, 4), "ce_ablated_minus_clean": round(m.ce_ablated - m.ce_clean, 4),
            "dead_fraction": round(m.dead_fraction, 4),
            **({"baseline_fve": round(base.fve, 4), "baseline_delta_ce": round(base.delta_ce, 4)} if base else {})}
        vs = f" (linear baseline FVE {base.fve:.3f}, ΔCE {base.delta_ce:+.4f})" if base is not None else ""
        say(f"{dict_id}: L0 {m.l0:.1f}, FVE {m.fve:.3f}, ΔCE {m.delta_ce:+.4f} nats of {m.ce_ablated - m.ce_clean:.4f}, "
            f"dead {m.dead_fraction:.1%}{vs}")
    for rep in (ev.replaced, ev.baseline_replaced):
        if rep is None:
            continue
        eval_id = (f"{spec.name}/mlp-replacement/" + ("" if rep.replacement == "transcoder" else "linear-")
                   + hashlib.sha1(json.dumps(dict_ids).encode()).hexdigest()[:12])
        stats = {"delta_ce": rep.delta_ce, "eval_contexts": len(eval_idx), "first_eval_context": int(eval_idx[0]),
                 "layers": sorted(int(l) for l in transcoders), "corpus_id": ctx.corpus_id,
                 "intervals": {k: list(v) for k, v in rep.intervals.items()}, "interval_level": 0.95,
                 "interval_unit": "held-out context (percentile bootstrap)",
                 "ablation": f"every listed layer's {ablation}",
                 "replacement": (f"every listed layer's hook_mlp_out replaced by its {rep.replacement} "
                                 "{} all at once, except at sink positions (error terms dropped)").format(
                     "transcoder" if rep.replacement == "transcoder" else "dense linear baseline")}
        ctx.con.execute("DELETE FROM replacement_evals WHERE eval_id = ?", [eval_id])
        ctx.writer.insert_df("replacement_evals", pd.DataFrame([{
            "eval_id": eval_id, "model": spec.name, "dict_ids": json.dumps(dict_ids), **rep.as_row(),
            "stats": json.dumps(stats), "run_id": ctx.run_id}]))
        summary[f"replacement_{rep.replacement}"] = {
            "eval_id": eval_id, "n_replaced": rep.n_replaced, "delta_ce": round(rep.delta_ce, 4),
            "kl": round(rep.kl, 4), "top1": round(rep.top1, 4), "intervals": stats["intervals"],
            "ce_loss_recovered": round(rep.ce_loss_recovered, 4)}
        lo, hi = rep.intervals.get("delta_ce", (float("nan"), float("nan")))
        say(f"All {rep.n_replaced} MLPs replaced by their {rep.replacement}s: ΔCE {rep.delta_ce:+.3f} nats "
            f"[{lo:+.3f}, {hi:+.3f}], KL {rep.kl:.3f}, top-1 agreement {rep.top1:.1%} (clean CE {rep.ce_clean:.3f})")
    return summary


def check_transcoder_sources(sources: Sequence[str], layers: Sequence[int]) -> None:
    """Fail fast (one InputError sentence) on a ``--transcoders`` source that is neither a directory nor a known
    sae-lens release with transcoders for ``layers``, before a precompute spends minutes on its earlier steps."""
    from pathlib import Path

    for source in sources:
        if not Path(source).is_dir():
            release_ids(source, layers)


def import_transcoder_sources(ctx: "RunContext", sources: Sequence[str]) -> list[str]:
    """``--transcoders``: each source is a sae-lens-format transcoder directory, or a sae-lens release (its
    transcoders for ``ctx.transcoder_layers``, see :func:`release_ids`; ``RELEASE:SAE_ID`` for one). They are
    evaluated and stored like trained ones. Returns the dict_ids written."""
    from pathlib import Path

    if ctx.contexts is None:
        raise InputError("Importing transcoders needs the corpus step to run first.")
    loaded: dict[str, Any] = {}
    for source in sources:
        if Path(source).is_dir():
            loaded[f"local:{source}"] = load_local_transcoder(source)
        else:
            layers = list(ctx.transcoder_layers or [])
            release = source.partition(":")[0]
            for sae_id in release_ids(source, layers):
                loaded[f"sae-lens:{release}/{sae_id}"] = load_pretrained_transcoder(release, sae_id)
    model, spec = ctx.model, ctx.spec
    d_model, n_layers = int(model.cfg.d_model), int(model.cfg.n_layers)
    by_layer: dict[int, tuple[str, Any]] = {}
    for source, tc in loaded.items():
        layer = transcoder_layer_of(tc)
        if layer is None or layer >= n_layers or tc.cfg.d_in != d_model or tc.cfg.d_out != d_model:
            raise InputError(
                f"Transcoder {source} does not replace an MLP of {spec.name}: it must read "
                f"blocks.L.ln2.hook_normalized and write blocks.L.hook_mlp_out with width {d_model} (it reads "
                f"{getattr(tc.cfg.metadata, 'hook_name', None)!r}, d_in {tc.cfg.d_in}, d_out {tc.cfg.d_out}).")
        if layer in by_layer:
            raise InputError(f"Two transcoders replace MLP {layer} ({by_layer[layer][0]} and {source}): import one per layer at a time.")
        by_layer[layer] = (source, tc.eval())
    _, eval_idx = _eval_split(ctx)
    summary = _evaluate_and_save(ctx, {l: tc for l, (_, tc) in by_layer.items()}, eval_idx,
                                 source={l: src for l, (src, _) in by_layer.items()})
    return [summary["layers"][l]["dict_id"] for l in sorted(by_layer)]
