"""Run several attribution methods on one TaskBatch, time them, and store the comparison.

A comparison is one ``attribution_comparisons`` row (the prompts, their token ids, the metric on clean and corrupt
prompts, the shared parameters), one ``attribution_runs`` row per method (its own parameters as JSON, wall time in
seconds) and the scores of every component in ``attributions`` — all of them, zeros included, so that a page can
correlate any two methods with SQL ``corr()`` (:mod:`backend.attribution.queries`). Pearson r is never computed
here: pages and the CLI read it from DuckDB, stored or in memory (:func:`comparison_db`), through the same query.

Wall time is measured around each method call alone, after the clean and corrupt forward passes that measure the
metric (they double as a warm-up); patching is run last.
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any, Callable, Mapping, Sequence

from backend.attribution import GROUND_TRUTH, METHODS, available_methods
from backend.attribution.components import DEFAULT_KINDS, Scores, check_kinds
from backend.errors import InputError
from backend.progress import say

if TYPE_CHECKING:
    from pathlib import Path

    import duckdb

    from backend.inputs.tasks import TaskBatch
    from backend.model.registry import ModelSpec


@dataclass
class MethodRun:
    """One method's scores, wall time and parameters within a comparison."""

    method: str
    scores: Scores
    seconds: float
    params: dict[str, Any]


@dataclass
class Comparison:
    """Several methods run on the same prompts; write it with :func:`write_comparison`."""

    comparison_id: str
    task: str
    model: str
    batch: "TaskBatch"
    kinds: list[str]
    runs: dict[str, MethodRun]
    clean_metric: float
    corrupt_metric: float
    params: dict[str, Any] = field(default_factory=dict)
    source: str = "precompute"


def check_methods(methods: Sequence[str] | None) -> list[str]:
    """Validate method names (None: every available method); InputError for unknown or absent ones."""
    if methods is None:
        return available_methods()
    out = []
    for name in methods:
        if name not in METHODS:
            raise InputError(f"Unknown attribution method {name!r}: choose from {', '.join(METHODS)}.")
        if not METHODS[name].available:
            raise InputError(f"The attribution method {name!r} is not available in this installation.")
        if name not in out:
            out.append(name)
    if not out:
        raise InputError("No attribution method was chosen: pick at least one of " + ", ".join(METHODS) + ".")
    return out


def _method_params(name: str, ig_steps: int, rules: Any) -> dict[str, Any]:
    if name == "ig":
        return {"steps": int(ig_steps)}
    if name == "relp":
        from backend.attribution import relp as relp_module

        return {"rules": rules if rules is not None else relp_module.DEFAULT_RULES_BY_KIND}
    return {}


def _params_json(params: Mapping[str, Any]) -> dict[str, Any]:
    def plain(v: Any) -> Any:  # rule sets (and kind -> rule set mappings) as JSON
        if hasattr(v, "to_dict"):
            return v.to_dict()
        return {k: plain(x) for k, x in v.items()} if isinstance(v, Mapping) else v

    return {k: plain(v) for k, v in params.items()}


def run_comparison(model: Any, batch: "TaskBatch", model_name: str, methods: Sequence[str] | None = None,
                   kinds: Sequence[str] = DEFAULT_KINDS, ig_steps: int = 8, per_position_heads: bool = False,
                   dictionaries: Mapping[int, Any] | None = None, dictionary_ids: Mapping[int, str] | None = None,
                   rules: Any = None, source: str = "precompute", comparison_id: str | None = None,
                   on_method: "Callable[[str, float | None], None] | None" = None) -> Comparison:
    """Run ``methods`` (patching last) on ``batch`` and return their scores and wall times.

    ``dictionaries`` (layer -> attention SAE) is needed for the ``feature`` kind (``dictionary_ids``, layer -> store
    dict_id, only recorded in the parameters); ``rules`` are RelP's rules
    (default: the RelP module's defaults); ``ig_steps`` the number of α values of IG. ``on_method(name, None)`` is
    called as each method starts and ``on_method(name, seconds)`` as it ends (the app's per-method progress).
    """
    import torch

    methods = check_methods(methods)
    kinds = check_kinds(kinds, dictionaries)
    ordered = [m for m in methods if m != GROUND_TRUTH] + [m for m in methods if m == GROUND_TRUTH]
    with torch.no_grad():  # these two passes double as the warm-up before the timed methods
        clean_metric = float(batch.metric(model(batch.clean, return_type="logits")))
        corrupt_metric = float(batch.metric(model(batch.corrupt, return_type="logits")))
    shared = {"kinds": list(kinds), "per_position_heads": bool(per_position_heads)}
    if dictionaries:
        ids = dictionary_ids or {}
        shared["dictionaries"] = {str(layer): ids.get(layer) for layer in sorted(dictionaries)}
    runs: dict[str, MethodRun] = {}
    for name in ordered:
        spec = METHODS[name]
        params = _method_params(name, ig_steps, rules)
        say(f"{batch.name}: {name} ({spec.cost})")
        if on_method is not None:
            on_method(name, None)
        fn = spec.load()
        t0, c0 = time.perf_counter(), time.process_time()
        scores = fn(model, batch, kinds, per_position_heads=per_position_heads, dictionaries=dictionaries, **params)
        seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
        # CPU seconds (all threads of this process) beside wall time: on a shared machine they vary far less.
        runs[name] = MethodRun(name, scores, seconds, {**shared, **_params_json(params), "cpu_seconds": round(cpu, 3)})
        if on_method is not None:
            on_method(name, seconds)
    cid = comparison_id or f"{model_name}/{batch.name}-{uuid.uuid4().hex[:8]}"
    return Comparison(
        comparison_id=cid, task=batch.name, model=model_name, batch=batch, kinds=list(kinds), runs=runs,
        clean_metric=clean_metric, corrupt_metric=corrupt_metric, source=source,
        params={**shared, "ig_steps": int(ig_steps), "methods": ordered, "n_examples": len(batch),
                "seq_len": batch.seq_len, "description": batch.description},
    )


# Cost of each method in forward passes of the whole batch, for the ETA shown before a run. AtP is 2 forward + 1
# backward (a backward pass ≈ 2 forward); the other factors were measured once against it (2026-12-07, SmolLM2-135M,
# a 15-token IOI pair, 4 IG steps, resid + mlp + head): RelP's rule hooks cost 2.3× AtP; AtP* about 0.8 forward per
# layer beyond its 2; IG 0.3 and patching 0.075 forward passes per (step, kind, layer) and per component, because
# both batch many copies into partial passes from a component's layer. During a run the page replaces these with
# the measured rates (backend.progress.MethodClock).
ATP_UNITS = 4.0
RELP_UNITS = 9.0
ATPSTAR_PER_LAYER = 0.8
IG_PER_STEP_LAYER = 0.3
PATCHING_PER_COMPONENT = 0.075


def method_units(model: Any, batch: "TaskBatch", methods: Sequence[str], kinds: Sequence[str],
                 ig_steps: int) -> dict[str, float]:
    """Each method's estimated cost on ``batch`` in forward passes of the whole model (see the constants above)."""
    n_layers, n_heads, seq = int(model.cfg.n_layers), int(model.cfg.n_heads), int(batch.seq_len)
    components = {"resid": n_layers * seq, "mlp": n_layers * seq, "head": n_layers * n_heads}
    n_components = sum(components.get(k, n_layers * seq) for k in kinds)
    units = {
        "patching": PATCHING_PER_COMPONENT * n_components,
        "atp": ATP_UNITS, "relp": RELP_UNITS,
        "atpstar": 2 + ATPSTAR_PER_LAYER * (n_layers + 1),
        "ig": IG_PER_STEP_LAYER * int(ig_steps) * len(kinds) * n_layers,
    }
    return {m: float(units.get(m, ATP_UNITS)) for m in methods}


def forward_seconds(model: Any, batch: "TaskBatch", repeats: int = 2) -> float:
    """Measured wall time of one forward pass of the batch's clean prompts (the fastest of ``repeats``)."""
    import torch

    best = float("inf")
    with torch.no_grad():
        for _ in range(repeats):
            t0 = time.perf_counter()
            model(batch.clean, return_type="logits")
            best = min(best, time.perf_counter() - t0)
    return best


def estimate_seconds(model: Any, batch: "TaskBatch", methods: Sequence[str], kinds: Sequence[str],
                     ig_steps: int) -> dict[str, float]:
    """Estimated wall time of each method: :func:`method_units` × a forward pass measured now on this machine."""
    t = forward_seconds(model, batch)
    return {m: u * t for m, u in method_units(model, batch, methods, kinds, ig_steps).items()}


def delete_comparison(con: "duckdb.DuckDBPyConnection", comparison_id: str) -> None:
    """Remove one comparison (its runs and scores) from a writable connection."""
    con.execute("DELETE FROM attributions WHERE attr_id IN "
                "(SELECT attr_id FROM attribution_runs WHERE comparison_id = ?)", [comparison_id])
    con.execute("DELETE FROM attribution_runs WHERE comparison_id = ?", [comparison_id])
    con.execute("DELETE FROM attribution_comparisons WHERE comparison_id = ?", [comparison_id])


def write_comparison(con: "duckdb.DuckDBPyConnection", comparison: Comparison, run_id: str) -> str:
    """Write ``comparison`` (replacing one with the same id) into a writable store connection; returns its id."""
    import pandas as pd

    c = comparison
    delete_comparison(con, c.comparison_id)
    b = c.batch
    con.execute(
        "INSERT INTO attribution_comparisons (comparison_id, task, model, metric_name, n_examples, clean_prompts, "
        "corrupt_prompts, clean_metric, corrupt_metric, params, created_at, run_id, source, clean_tokens, "
        "corrupt_tokens) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        [c.comparison_id, c.task, c.model, b.metric_name, len(b), json.dumps(list(b.prompts)),
         json.dumps(list(b.corrupt_prompts)), c.clean_metric, c.corrupt_metric, json.dumps(c.params),
         datetime.now(timezone.utc), run_id, c.source, json.dumps(b.clean.tolist()), json.dumps(b.corrupt.tolist())],
    )
    for name, run in c.runs.items():
        attr_id = f"{c.comparison_id}/{name}"
        con.execute(
            "INSERT INTO attribution_runs (attr_id, task, method, model, params, seconds, clean_metric, "
            "corrupt_metric, run_id, comparison_id) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            [attr_id, c.task, name, c.model, json.dumps(run.params), run.seconds, c.clean_metric, c.corrupt_metric,
             run_id, c.comparison_id],
        )
        frame = run.scores.to_frame()
        frame.insert(0, "attr_id", attr_id)
        con.register("_attr_df", pd.DataFrame(frame))
        con.execute("INSERT INTO attributions (attr_id, component, layer, head, pos, feature, score) "
                    "SELECT attr_id, component, layer, head, pos, feature, score FROM _attr_df")
        con.unregister("_attr_df")
    return c.comparison_id


def comparison_db(comparison: Comparison, tokenizer: Any = None) -> "duckdb.DuckDBPyConnection":
    """An in-memory DuckDB with the store schema holding ``comparison`` (and, given a tokenizer, the vocab rows of
    its tokens), so a live comparison is read through the same queries as a stored one."""
    import duckdb
    import pandas as pd

    from backend.store import schema

    con = duckdb.connect(":memory:")
    for stmt in schema.DDL:
        con.execute(stmt)
    con.execute("INSERT INTO meta VALUES ('schema_version', ?)", [str(schema.SCHEMA_VERSION)])
    write_comparison(con, comparison, run_id="live")
    if tokenizer is not None:
        from backend.inputs.prompts import token_strings

        ids = sorted({int(t) for t in comparison.batch.clean.flatten().tolist()}
                     | {int(t) for t in comparison.batch.corrupt.flatten().tolist()})
        con.register("_vocab", pd.DataFrame({"model": comparison.model, "token_id": ids,
                                             "token_str": token_strings(tokenizer, ids)}))
        con.execute("INSERT INTO vocab SELECT model, token_id, token_str FROM _vocab")
        con.unregister("_vocab")
    return con


def save_comparison(store_path: "str | Path", comparison: Comparison, model: Any, spec: "ModelSpec",
                    source: str | None = None) -> str:
    """Save ``comparison`` into the store at ``store_path`` (the CLI's ``attribute`` and the Attribution Faithfulness
    page's save button), recording the model and its vocabulary too when the store lacks them; returns its id. An
    existing store gets a small save file beside it (:mod:`backend.store.saves`: no copy of the store); a missing one
    is created by a run of its own."""
    from pathlib import Path

    from backend.model.record import record_model
    from backend.store.access import StoreWriter, reading, real_path
    from backend.store.access import saving

    params = {"comparison_id": comparison.comparison_id, "task": comparison.task,
              "methods": list(comparison.runs), "kinds": comparison.kinds, "source": source or comparison.source}
    if not Path(real_path(store_path)).exists():
        with StoreWriter(store_path, kind="attribution", model=spec.name, params=params) as writer:
            record_model(writer, model, spec)
            write_comparison(writer.con, comparison, writer.run_id)
        return comparison.comparison_id
    with reading(store_path) as con:
        have_vocab = con.execute("SELECT count(*) FROM vocab WHERE model = ?", [spec.name]).fetchall()[0][0]
    with saving(store_path, kind="attribution", model=spec.name, params=params) as writer:
        if have_vocab != int(model.cfg.d_vocab):
            record_model(writer, model, spec)
        write_comparison(writer.con, comparison, writer.run_id)
    return comparison.comparison_id


def feature_dictionaries(con: "duckdb.DuckDBPyConnection", model_name: str) -> tuple[dict[int, Any], dict[int, str]]:
    """The store's attention SAEs for ``model_name`` and their dict_ids, by layer, for the ``feature`` kind;
    InputError when the store has none."""
    from backend.dictionaries.storage import load_attention_saes

    saes = load_attention_saes(con, model_name)
    if not saes:
        raise InputError(f"This store has no attention SAEs for {model_name}, so the 'feature' kind cannot be scored: "
                         "drop it, or build SAEs with `python -m backend precompute`.")
    return saes, {layer: str(sae.cfg.metadata.dict_id) for layer, sae in saes.items()}
