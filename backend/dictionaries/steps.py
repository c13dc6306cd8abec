"""Precompute step: train (or import) one attention-output SAE per selected layer, evaluate it, store it.

The corpus contexts are split once: the **last** ``preset.sae_eval_contexts`` contexts are held out for
evaluation (never trained on), the rest are training data. Activations are collected for several layers in
one forward pass, in groups small enough to keep them in memory (:data:`ACT_MEMORY_BYTES`).

Training throughput, measured on this 2-core machine (576 -> 2304 TopK, k 32, sae-lens 6.54 SAETrainer,
SmolLM2 layer-8 hook_z, 28k training tokens; other processes were running, so +-30%):

* batch 1024: 5.4-7.8k samples/s (the best); 4096: 4.3k; 16384: 6.6k; 512: slower per sample.
* torch threads 2 vs 1 at batch 4096: 4.3k vs 4.2k samples/s (no gain from the second core).
* ``use_sparse_activations=True``: crashes in backward on torch 2.13 CPU (``aten::view`` has no SparseCPU
  kernel), so dense activations are used.
* ``normalize_activations="expected_average_only_in"``: same FVE, half the speed; not used.
* learning rate at 41k samples: 4e-4 (sae-lens default) FVE 0.28; 2e-3 0.64; 5e-3 0.72; 1e-2 0.73. Starting
  ``b_dec`` at the data mean: FVE 0.23 -> 0.28 at 4e-4. Chosen: lr 5e-3, batch 1024, 3 passes.
* demo (3 layers of SmolLM2, 224 training contexts = 28.4k tokens, 32 held-out = 4064 tokens), measured on
  a heavily loaded machine: collection 145 s (~50 s unloaded), training 14-16 s per layer (5.4-6.1k
  samples/s), evaluation 44 s. Held-out results L8/L15/L22: FVE 0.76/0.66/0.61, L0 32, CE-loss recovered
  1.02/1.11/1.13 with ΔCE −0.001/−0.010/−0.003 nats against ablation denominators of 0.049/0.090/0.021
  nats. Splicing the SAE *lowers* CE a little on this text (checked with independent full forward passes),
  so the ratio exceeds 1; the denominator is tiny, as METHODS.md warns.
* more tokens (L8, 1024 training contexts = 130k tokens, 64 held-out contexts = 8128 tokens): 1 pass 37 s
  (3.6k samples/s, loaded machine) FVE 0.825, CE-loss recovered 1.10 (ΔCE −0.008 of 0.079 nats); 2 passes
  86 s FVE 0.852, CE-loss recovered 1.07. Dead fraction there is 32-33% (13.6% in the demo): lr 5e-3 kills
  features on longer runs; not tuned further yet. The full preset trains 2048 contexts x 2 passes.
"""

from __future__ import annotations

import time
from typing import Any, Sequence

from backend.model.activations import collect_z
from backend.dictionaries.attention_sae import (
    KIND, dict_id_for, layer_of, load_local, load_pretrained, save_dictionary, train_attention_sae,
)
from backend.dictionaries.eval import DictionaryMetrics, evaluate_dictionaries, fired_features, split_contexts
from backend.errors import InputError
from backend.model.hooks import hook_name
from backend.progress import say

# Activation matrices of one collection group must fit in this many bytes (float32): the full preset's
# ~500k training tokens x 576 dims is ~1.2 GB per layer, so a group holds two layers.
ACT_MEMORY_BYTES = 3 * 1024**3


def _layer_groups(layers: Sequence[int], bytes_per_layer: int) -> list[list[int]]:
    per_group = max(1, ACT_MEMORY_BYTES // max(bytes_per_layer, 1))
    layers = sorted(layers)
    return [layers[i : i + per_group] for i in range(0, len(layers), per_group)]


def _row(ctx: Any, dict_id: str, layer: int, architecture: str, metrics: DictionaryMetrics,
         training_tokens: int | None, source: str) -> dict[str, Any]:
    return {
        "dict_id": dict_id, "model": ctx.spec.name, "kind": KIND, "architecture": architecture,
        "hook_name": hook_name("z", layer), "layer": int(layer), "training_tokens": training_tokens,
        "source": source, **metrics.as_row(),
    }


def precollect_wants(ctx: Any) -> dict[tuple[str, int], int]:
    """What the corpus step should gather for this step during its scoring pass: hook_z at every SAE layer for ALL
    contexts (site -> number of leading contexts), when this step will train, its training contexts come first, and
    it all fits in ACT_MEMORY_BYTES. Training then reads the leading rows and the features step (which scores every
    context) needs no forward pass either; measured on the demo that saves ~40 s + ~45 s of forward passes."""
    preset = ctx.preset
    if getattr(ctx, "sae_sources", None) or not preset.sae_train or not ctx.layers:
        return {}
    n, n_ctx = ctx.contexts.tokens.shape
    train_idx, eval_idx = split_contexts(n, preset.sae_eval_contexts)
    train_idx = list(train_idx)[: preset.sae_train_contexts or None]
    d_in = ctx.model.cfg.n_heads * ctx.model.cfg.d_head
    if not eval_idx or train_idx != list(range(len(train_idx))) or n * (n_ctx - 1) * d_in * 4 * len(ctx.layers) > ACT_MEMORY_BYTES:
        return {}
    return {("z", int(layer)): n for layer in ctx.layers}


def step_attention_saes(ctx: Any) -> None:
    """Train, evaluate and store an attention SAE for each layer in ``ctx.layers`` (per the preset).

    Re-running replaces the dictionaries with the same dict_id. Skipped when the preset trains no SAEs.
    """
    import torch

    preset = ctx.preset
    if getattr(ctx, "sae_sources", None):
        ctx.summary["attention_saes"] = {"imported": import_sources(ctx, ctx.sae_sources)}
        return
    if not getattr(preset, "sae_train", False) or not ctx.layers:
        return
    if ctx.contexts is None:
        raise InputError("The attention-SAE step needs the corpus step to run first.")
    tokens = ctx.contexts.tokens
    n, n_ctx = tokens.shape
    train_idx, eval_idx = split_contexts(n, preset.sae_eval_contexts)
    train_idx = list(train_idx)[: preset.sae_train_contexts or None]
    if not train_idx or not eval_idx:
        raise InputError(f"The corpus has {n} context(s): the attention-SAE step needs at least 2 (train + held out).")
    model, spec = ctx.model, ctx.spec
    d_in = model.cfg.n_heads * model.cfg.d_head
    d_sae = int(preset.sae_expansion * d_in)
    arch = preset.sae_architecture
    threads = torch.get_num_threads()
    if preset.sae_threads:
        torch.set_num_threads(preset.sae_threads)
    summary: dict[str, Any] = {"layers": {}, "train_contexts": len(train_idx), "eval_contexts": len(eval_idx)}
    try:
        bytes_per_layer = len(train_idx) * (n_ctx - 1) * d_in * 4
        saes: dict[int, Any] = {}
        infos: dict[int, dict[str, Any]] = {}
        train_fired: dict[int, torch.Tensor] = {}
        # hook_z the corpus step gathered (precollect_wants): the leading rows are the training contexts'.
        pre = ctx.precollected or {}
        n_train_rows = len(train_idx) * (n_ctx - 1)
        reuse = all(("z", l) in pre and pre[("z", l)].shape[0] >= n_train_rows for l in ctx.layers)
        summary["reused_activations"] = reuse
        for group in [sorted(ctx.layers)] if reuse else _layer_groups(ctx.layers, bytes_per_layer):
            t = time.perf_counter()
            if reuse:
                acts = {l: pre[("z", l)][:n_train_rows] for l in group}
            else:
                acts = collect_z(model, tokens[train_idx], group, batch_size=preset.batch_size,
                                 desc=f"Collecting hook_z L{','.join(map(str, group))}")
                say(f"Collected {n_train_rows} tokens x {len(group)} layer(s) in {time.perf_counter() - t:.0f} s")
            for layer in group:
                dict_id = dict_id_for(spec.name, layer, arch, d_sae)
                say(f"Training {dict_id}")
                sae, info = train_attention_sae(
                    acts[layer], d_sae, architecture=arch, k=preset.sae_k, lr=preset.sae_lr,
                    batch_size=preset.sae_batch_size, epochs=preset.sae_epochs, seed=layer,
                    metadata={"model_name": spec.name, "hook_name": hook_name("z", layer), "hook_layer": layer,
                              "context_size": n_ctx, "prepend_bos": True, "dict_id": dict_id,
                              "corpus_id": ctx.corpus_id, "bos_excluded": True},
                )
                train_fired[layer] = fired_features(sae, acts[layer])
                saes[layer], infos[layer] = sae, info
                del acts[layer]  # free the layer's activations before training the next one
        t = time.perf_counter()
        metrics = evaluate_dictionaries(model, saes, tokens[eval_idx[0] : eval_idx[-1] + 1],
                                        batch_size=preset.batch_size, train_fired=train_fired)
        eval_seconds = time.perf_counter() - t
    finally:
        torch.set_num_threads(threads)
    for layer in sorted(saes):
        dict_id = dict_id_for(spec.name, layer, arch, d_sae)
        m = metrics[layer]
        saes[layer].cfg.metadata["evaluation"] = {
            "eval_contexts": len(eval_idx), "first_eval_context": int(eval_idx[0]), "ce_tokens": m.ce_tokens,
            "delta_ce": m.delta_ce, "ablation": "hook_z zeroed at positions >= 1 (attn_out = b_O)",
        }
        save_dictionary(ctx.writer, saes[layer],
                        _row(ctx, dict_id, layer, arch, m, infos[layer]["training_tokens"], "trained"))
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


def import_sources(ctx: Any, sources: Sequence[str]) -> list[str]:
    """``--saes``: each source is a sae-lens-format directory on disk, or a sae-lens release name whose SAEs for
    the selected layers (ids ``blocks.L.hook_z``, the naming of hook_z releases such as gpt2-small-hook-z-kk)
    are imported. Returns the dict_ids written."""
    from pathlib import Path

    from backend.model.hooks import hook_name

    ids: list[str] = []
    for source in sources:
        if Path(source).is_dir():
            ids += import_local(ctx, [source])
        else:
            ids += import_pretrained(ctx, source, [hook_name("z", layer) for layer in ctx.layers])
    return ids


def import_pretrained(ctx: Any, release: str, sae_ids: Sequence[str]) -> list[str]:
    """Load sae-lens release SAEs (e.g. ``"gpt2-small-hook-z-kk"``, ``["blocks.5.hook_z"]``) into the store,
    evaluated on the last ``preset.sae_eval_contexts`` corpus contexts; returns their dict_ids.

    Offline with nothing cached: one ModelUnavailableError sentence (see :func:`load_pretrained`).
    """
    if ctx.contexts is None:
        raise InputError("Importing pretrained SAEs needs the corpus step to run first.")
    return import_saes(ctx, {f"sae-lens:{release}/{sae_id}": load_pretrained(release, sae_id) for sae_id in sae_ids})


def import_local(ctx: Any, paths: Sequence[str]) -> list[str]:
    """Like :func:`import_pretrained` for sae-lens-format directories on disk."""
    if ctx.contexts is None:
        raise InputError("Importing SAEs needs the corpus step to run first.")
    return import_saes(ctx, {f"local:{p}": load_local(p) for p in paths})


def import_saes(ctx: Any, saes: dict[str, Any]) -> list[str]:
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
    _, eval_idx = split_contexts(n, ctx.preset.sae_eval_contexts)
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
