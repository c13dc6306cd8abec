"""The precompute pipeline: model + corpus -> one atomic run in a DuckDB store.

A run is a list of **steps** (functions of a :class:`RunContext`), each writing its own tables through the
run's :class:`~backend.store.access.StoreWriter`. Later capabilities (attention SAEs, attributions, transcoders) add
steps to :data:`STEPS`; presets say how much work each step does. The whole run is swapped into the store
only when every step succeeded (see :mod:`backend.store.access`), so an interrupted run loses nothing and a re-run
simply starts again.

A run can also be **resumed** (``resume=True``, ``precompute --resume``) after a crash or ``kill -9``: the writer
records every finished step, and every finished layer of the steps that work layer by layer, in its staging copy
(:meth:`~backend.store.access.StoreWriter.finish_unit`); a resumed run skips them and rebuilds the in-memory state
later steps read (the corpus contexts, the summary) from what the unfinished run wrote. Each layer's randomness
depends only on its step and layer (seeds), so a resumed run writes what an uninterrupted one would
(``docs/design.md``, "Resumable runs").
"""

from __future__ import annotations

import copy
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable

from backend.attribution.step import step_attributions
from backend.circuits.step import step_graphs
from backend.dictionaries.steps import (
    sae_precollect_wants,
    step_attention_saes,
    step_transcoders,
    transcoder_precollect_wants,
)
from backend.errors import InputError
from backend.features.labels import step_labels
from backend.features.step import step_features, step_transcoder_features
from backend.heads.induction import step_induction
from backend.heads.polysemanticity import step_head_polysemanticity
from backend.model.activations import Precollector
from backend.model.record import record_model
from backend.pipeline.config import get_preset, parse_layers
from backend.pipeline.context import RunContext, RunObserver, Unit
from backend.pipeline.executor import check_executor, make_executor
from backend.progress import say, track

Step = Callable[[RunContext], None]


def step_model(ctx: RunContext) -> None:
    """Record the model's spec and its vocabulary (pages decode token ids without loading a tokenizer)."""
    record_model(ctx.writer, ctx.model, ctx.spec, n_ctx=ctx.preset.n_ctx)


def step_corpus(ctx: RunContext) -> None:
    """Tokenize the corpus into fixed-length contexts and store tokens with the model's next-token loss."""
    import numpy as np
    import pandas as pd
    import torch

    from backend.inputs import corpus
    from backend.inputs.prompts import model_bos_id

    preset = ctx.preset
    say(f"Reading corpus {ctx.corpus_source!r}")
    docs = corpus.load_documents(ctx.corpus_source)
    contexts = corpus.tokenize_contexts(
        docs, ctx.model.tokenizer, n_ctx=preset.n_ctx, bos=model_bos_id(ctx.model), max_contexts=preset.n_contexts
    )
    if len(contexts.tokens) == 0:
        raise InputError(f"The corpus {ctx.corpus_source!r} is too short for one context of {preset.n_ctx} tokens.")
    ctx.contexts = contexts
    source_name = "builtin" if ctx.corpus_source == corpus.BUILTIN else Path(ctx.corpus_source).name
    ctx.corpus_id = f"{source_name}:{ctx.spec.name}:{preset.n_ctx}"
    for table in ("tokens", "contexts", "corpora"):
        ctx.con.execute(f"DELETE FROM {table} WHERE corpus_id = ?", [ctx.corpus_id])

    tokens = contexts.tokens
    n, n_ctx = tokens.shape
    losses = np.full((n, n_ctx), np.nan, dtype=np.float32)
    batches = range(0, n, preset.batch_size)
    # This pass runs the whole model over every context anyway: gather on the way what later steps would otherwise
    # run it again for (each step's precollect_wants; they reuse ctx.precollected and free it).
    wants: dict[tuple[str, int], int] = {}
    for want in PRECOLLECT:
        for act, count in want(ctx).items():
            wants[act] = max(wants.get(act, 0), count)
    gather = Precollector(wants, n_ctx)
    with torch.no_grad():
        for start in track(batches, total=len(batches), desc="Scoring corpus", unit="batch"):
            batch = tokens[start : start + preset.batch_size]
            # loss at position p is the loss of predicting token p+1; the last position has none (NaN).
            losses[start : start + len(batch), :-1] = ctx.model.run_with_hooks(
                batch, return_type="loss", loss_per_token=True, fwd_hooks=gather.hooks(start, len(batch))
            ).float().cpu().numpy()
    ctx.precollected = gather.result() or None
    ctx_ids = np.repeat(np.arange(n), n_ctx)
    ctx.writer.insert_df(
        "tokens",
        pd.DataFrame({
            "corpus_id": ctx.corpus_id, "context_id": ctx_ids.astype(np.int32),
            "pos": np.tile(np.arange(n_ctx), n).astype(np.int16),
            "token_id": tokens.reshape(-1).cpu().numpy().astype(np.int32), "loss": losses.reshape(-1),
        }),
    )
    ctx.writer.insert_df(
        "contexts",
        pd.DataFrame({"corpus_id": ctx.corpus_id, "context_id": np.arange(n, dtype=np.int32),
                      "doc_id": contexts.doc_ids, "run_id": ctx.run_id}),
    )
    info = corpus.builtin_info() if ctx.corpus_source == corpus.BUILTIN else {
        "description": f"user corpus {ctx.corpus_source}", "licence": "user-supplied"}
    mean_loss = float(np.nanmean(losses))
    ctx.con.execute(
        "INSERT INTO corpora VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        [ctx.corpus_id, ctx.spec.name, ctx.corpus_source, info.get("description", ""), info.get("licence", ""),
         len({d for d in contexts.doc_ids}), n, n_ctx, n * n_ctx, mean_loss, ctx.run_id],
    )
    ctx.summary["corpus"] = {"corpus_id": ctx.corpus_id, "contexts": n, "tokens": n * n_ctx, "mean_loss": mean_loss}


def restore_corpus(ctx: RunContext) -> None:
    """Rebuild ``ctx.contexts`` and ``ctx.corpus_id`` of a resumed run from the corpus its corpus step stored."""
    import torch

    from backend.inputs.corpus import Contexts

    rows = ctx.con.execute("SELECT corpus_id, source, n_contexts, n_ctx FROM corpora WHERE run_id = ?",
                           [ctx.run_id]).fetchall()
    if not rows:
        raise InputError(f"The unfinished run {ctx.run_id} recorded its corpus step but holds no corpus: run the "
                         "precompute without --resume to start afresh.")
    corpus_id, source, n, n_ctx = rows[0]
    ids = ctx.con.execute("SELECT token_id FROM tokens WHERE corpus_id = ? ORDER BY context_id, pos",
                          [corpus_id]).fetchnumpy()["token_id"]
    doc_ids = [r[0] for r in ctx.con.execute("SELECT doc_id FROM contexts WHERE corpus_id = ? ORDER BY context_id",
                                             [corpus_id]).fetchall()]
    ctx.corpus_id = corpus_id
    ctx.contexts = Contexts(tokens=torch.from_numpy(ids.astype("int64")).reshape(n, n_ctx), doc_ids=doc_ids,
                            corpus=source)


def step_tasks(ctx: RunContext) -> None:
    """Run every built-in task on clean and corrupted prompts and store the metric of each."""
    import torch

    from backend.inputs import tasks
    from backend.inputs.prompts import model_bos_id

    ctx.con.execute("DELETE FROM task_baselines WHERE model = ?", [ctx.spec.name])
    names = list(tasks.TASKS)
    for name in track(names, total=len(names), desc="Task baselines", unit="task"):
        batch = tasks.build_task(name, ctx.model, n=ctx.preset.task_examples, seed=0, bos=model_bos_id(ctx.model))
        with torch.no_grad():
            clean = float(batch.metric(ctx.model(batch.clean)))
            corrupt = float(batch.metric(ctx.model(batch.corrupt)))
        ctx.con.execute(
            "INSERT INTO task_baselines VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            [name, ctx.spec.name, int(batch.clean.shape[0]), batch.metric_name, clean, corrupt,
             batch.prompts[0] if batch.prompts else "", ctx.run_id],
        )
        ctx.summary.setdefault("tasks", {})[name] = {"clean": clean, "corrupt": corrupt}


# Later capabilities append their steps here (in order). Each step must be safe to re-run on a store that
# already holds its earlier output: it deletes what it replaces first.
# What the corpus step's scoring pass should also gather for later steps: each returns {(hook kind, layer): number of
# leading contexts} (empty when its step would not use them, or they would not fit in its memory budget).
PRECOLLECT: list[Callable[[RunContext], dict[tuple[str, int], int]]] = [
    sae_precollect_wants,
    transcoder_precollect_wants,
]

STEPS: list[tuple[str, Step]] = [
    ("model", step_model),
    ("corpus", step_corpus),
    ("tasks", step_tasks),
    ("induction", step_induction),
    ("attention_saes", step_attention_saes),
    ("features", step_features),
    ("transcoders", step_transcoders),
    ("transcoder_features", step_transcoder_features),
    ("labels", step_labels),
    ("attributions", step_attributions),
    ("head_polysemanticity", step_head_polysemanticity),
    ("graphs", step_graphs),
]

# The steps that record one unit per layer before the step itself (RunContext.finish), and which of the run's layer
# lists they go through: attention-SAE layers or transcoder layers.
PER_LAYER_STEPS: dict[str, str] = {"attention_saes": "layers", "features": "layers",
                                   "transcoders": "transcoder_layers", "transcoder_features": "transcoder_layers"}


def run_plan(ctx: RunContext) -> list[Unit]:
    """The units of work a run records, in order: each per-layer step's layers, then each step as a whole."""
    plan: list[Unit] = []
    for name, _ in STEPS:
        if name in PER_LAYER_STEPS:
            plan += [(name, int(layer)) for layer in getattr(ctx, PER_LAYER_STEPS[name])]
        plan.append((name, None))
    return plan


def precompute(
    model_name: str,
    store_path: str | Path,
    preset: str = "demo",
    layers: str | None = None,
    corpus_source: str = "builtin",
    n_contexts: int | None = None,
    model: Any = None,
    saes: list[str] | None = None,
    transcoders: list[str] | None = None,
    transcoder_layers: str | None = None,
    resume: bool = False,
    executor: str = "local",
    ray_address: str | None = None,
    observer: RunObserver | None = None,
) -> str:
    """Build (or add a run to) the store at ``store_path``; returns the run id.

    ``n_contexts`` overrides the preset's corpus size. ``model`` may pass an already-loaded model. ``saes`` lists
    attention SAEs to import instead of training: sae-lens release names (one SAE per selected layer, id
    ``blocks.L.hook_z``) or sae-lens-format directories. ``transcoders`` likewise imports transcoders instead of
    training them (sae-lens releases, ``RELEASE:SAE_ID``, or directories); ``transcoder_layers`` overrides the preset's
    transcoder layer selection (same syntax as ``layers``, which does not affect transcoders). ``resume`` continues
    the unfinished run a crash left for this store, given the same options (one StoreError sentence otherwise).
    ``executor`` (``local`` or ``ray``; ``ray_address``: a Ray cluster, default a local Ray) runs the per-layer
    training and evaluation and the shards of feature scoring (:mod:`backend.pipeline.executor`); the results, and the
    store, are the same either way. ``observer`` is told the run's plan and each unit it finishes.
    """
    from backend.model.registry import get_spec, load_model
    from backend.store.access import StoreWriter, check_writable

    chosen = get_preset(preset, n_contexts)
    spec = get_spec(model_name)
    layer_list = parse_layers(layers, spec.n_layers, chosen.layers)
    tc_layers = parse_layers(transcoder_layers, spec.n_layers, chosen.transcoder.layers)
    if transcoders:
        from backend.dictionaries.steps import check_transcoder_sources

        check_transcoder_sources(transcoders, tc_layers)  # an unknown release fails now, not after minutes
    # Before the model loads: a store that cannot be written (read-only or special directory, a name too long, a
    # corrupt / hostile / newer file) fails now with one sentence, not after minutes of work.
    check_writable(store_path)
    check_executor(executor, ray_address)
    t0 = time.perf_counter()
    if model is None:
        model = load_model(model_name, progress=say)
    params = {"preset": asdict(chosen), "layers": layer_list, "corpus": corpus_source, "saes": list(saes or []),
              "transcoder_layers": tc_layers, "transcoders": list(transcoders or [])}
    writer = StoreWriter(store_path, kind="precompute", model=spec.name, preset=chosen.name, params=params,
                         resume=resume)
    runner = make_executor(executor, ray_address)
    try:
        with writer:
            ctx = RunContext(model=model, spec=spec, writer=writer, preset=chosen, layers=layer_list,
                             corpus_source=corpus_source, sae_sources=list(saes or []), transcoder_layers=tc_layers,
                             transcoder_sources=list(transcoders or []), executor=runner, observer=observer)
            if writer.discarded:
                say(f"Deleted the unfinished run(s) {', '.join(writer.discarded)} of this store (--resume would have "
                    "continued it)")
            _restore(ctx)
            if observer is not None:
                observer.started(ctx.run_id, run_plan(ctx), list(ctx.units))
            before = float(ctx.summary.get("seconds", 0.0))  # the unfinished run's own time, when resumed
            for name, step in STEPS:
                if writer.resumed_complete or ctx.done(name):
                    say(f"Skipping the {name} step: the unfinished run had finished it")
                    continue
                t = time.perf_counter()
                _seed(name)
                step(ctx)
                ctx.summary.setdefault("step_seconds", {})[name] = round(time.perf_counter() - t, 2)
                ctx.summary["seconds"] = round(before + time.perf_counter() - t0, 2)
                ctx.finish(name, info={"summary": ctx.summary})
            writer.summary = ctx.summary
    except BaseException:
        if writer.kept_unfinished:
            say(f"The unfinished run {writer.run_id} is kept beside the store: run the same command with --resume to "
                "continue it")
        raise
    finally:
        runner.close()
    say(f"Run {writer.run_id} written to {store_path} in {time.perf_counter() - t0:.0f} s")
    return writer.run_id


def _seed(step: str, layer: int | None = None) -> None:
    """Seed torch's global generator from (step, layer) alone, so that whatever draws from it in a unit of work draws
    the same numbers whether or not earlier units ran in this process (steps also seed their own generators)."""
    import zlib

    import torch

    torch.manual_seed(zlib.crc32(f"{step}:{layer}".encode()))


def _restore(ctx: RunContext) -> None:
    """For a resumed run: say what is skipped, and rebuild the summary and the corpus contexts from what the
    unfinished run recorded and wrote (activations it held in memory are not rebuilt: steps collect them again)."""
    if not ctx.writer.resumed:
        return
    ctx.units = {(step, layer): (info, state) for step, layer, info, state in ctx.writer.finished_units()}
    steps = [step for step, layer in ctx.units if layer is None]
    layers = sorted(f"{step} L{layer}" for step, layer in ctx.units if layer is not None and step not in steps)
    say(f"Resuming run {ctx.run_id}: finished steps {', '.join(steps) or 'none'}"
        + (f"; finished layers of the next step: {', '.join(layers)}" if layers else ""))
    if ctx.writer.resumed_complete:
        import json

        raw = ctx.con.execute("SELECT summary FROM runs WHERE run_id = ?", [ctx.run_id]).fetchall()[0][0]
        ctx.summary = json.loads(raw or "{}")
    elif steps:
        ctx.summary = copy.deepcopy(ctx.unit_info(steps[-1])["summary"])
    if ctx.done("corpus") or ctx.writer.resumed_complete:
        restore_corpus(ctx)
