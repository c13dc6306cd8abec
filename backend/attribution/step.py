"""The ``attributions`` precompute step: the preset's attribution comparisons on the built-in tasks."""

from __future__ import annotations

from typing import TYPE_CHECKING

from backend.attribution import METHODS
from backend.attribution.compare import delete_comparison, feature_dictionaries, run_comparison, write_comparison

if TYPE_CHECKING:
    from backend.pipeline.context import RunContext


def step_attributions(ctx: "RunContext") -> None:
    """Precompute step: compare the preset's attribution methods on the built-in tasks and store each comparison
    (replacing this model's earlier precomputed comparisons; saved custom pairs stay)."""
    from backend.inputs.prompts import model_bos_id
    from backend.inputs.tasks import build_task
    from backend.progress import track

    preset = ctx.preset
    tasks = list(preset.attribution.tasks)
    if not tasks:
        return
    methods = [m for m in preset.attribution.methods if METHODS[m].available]
    kinds = list(preset.attribution.kinds)
    dictionaries, dict_ids = (feature_dictionaries(ctx.con, ctx.spec.name) if "feature" in kinds else (None, None))
    old = ctx.con.execute("SELECT comparison_id FROM attribution_comparisons WHERE model = ? AND source = 'precompute'",
                          [ctx.spec.name]).fetchall()
    for (cid,) in old:
        delete_comparison(ctx.con, cid)
    for task, n in track(tasks, total=len(tasks), desc="Attribution comparisons", unit="task"):
        options = {"length": preset.attribution.induction_length} if task.startswith("induction") else {}
        batch = build_task(task, ctx.model, n=int(n), seed=0, bos=model_bos_id(ctx.model), **options)
        c = run_comparison(ctx.model, batch, ctx.spec.name, methods, kinds, ig_steps=preset.attribution.ig_steps,
                           dictionaries=dictionaries, dictionary_ids=dict_ids, source="precompute",
                           comparison_id=f"{ctx.spec.name}/{task}")
        write_comparison(ctx.con, c, ctx.run_id)
        ctx.summary.setdefault("attributions", {})[task] = {
            "examples": len(batch), "seq_len": batch.seq_len,
            "seconds": {name: round(run.seconds, 2) for name, run in c.runs.items()}}
