"""Improving a served store in the background: a stronger preset's dictionaries, trained while the app serves the
store it has.

``make run`` builds the demo store (<= 10 minutes on 2 cores), then calls :func:`start_background` and serves the
app at once. That starts ``python -m backend improve`` detached and niced: :func:`improve`, a precompute run with the
``full`` preset over the store's own model and corpus. Being a precompute run, it retrains every dictionary and
recomputes with the same steps everything that depends on them (their features, labels, attributions, graphs and
quality scores), and it keeps every guarantee of one (:mod:`backend.store.access`): it is written into a staging copy
beside the store, resumes from its last finished unit after a crash or ``kill -9``, folds the saves listed meanwhile
into the copy and swaps it in atomically; readers serve the old store until the swap.

Files beside the store ``NAME.duckdb``:

* ``NAME.duckdb.improve.log`` — what the run prints;
* ``.NAME.duckdb.improve.lock`` — ``flock``-ed by the improving process for its whole life: never two at once, and
  the app can tell whether one is running;
* ``.NAME.duckdb.improve.json`` — the run's plan and its finished units with their measured seconds, mirrored from
  the run (:class:`StatusFile`), because the app cannot open the staging copy while the run's writer holds it;
  removed once the run is swapped in.

The improvement is finished when the store's latest complete precompute run has the target preset: that fact in the
store is the marker (:func:`improved`), nothing beside it.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from backend.errors import StoreError, literal
from backend.progress import say
from backend.store.access import (
    holding_flock,
    lock_held,
    read_only,
    reading,
    real_path,
    staging_file,
    staging_files,
    writer_busy,
)

DEFAULT_PRESET = "full"
# `make run IMPROVE=0` sets this to 0: no background improvement.
ENABLED_ENV = "CIRCUITSCOPE_IMPROVE"
_OFF = ("0", "false", "no", "off")
NICENESS = 10
_ROOT = Path(__file__).resolve().parents[2]  # the project: the background process runs `-m backend` from it


@dataclass(frozen=True)
class ImprovePaths:
    """The files an improvement keeps beside its store (see the module docstring)."""

    log: Path
    lock: Path
    status: Path


def paths(store: str | Path) -> ImprovePaths:
    """The improvement files of the store at ``store`` (beside its real file, like the writer's own)."""
    real = real_path(store)
    return ImprovePaths(log=real.parent / f"{real.name}.improve.log", lock=real.parent / f".{real.name}.improve.lock",
                        status=real.parent / f".{real.name}.improve.json")


def latest_precompute(store: str | Path) -> dict[str, Any] | None:
    """The store's latest complete precompute run as ``{"model", "preset", "params"}`` (None when it has none)."""
    with reading(store) as con:
        rows = con.execute("SELECT model, preset, params FROM runs WHERE kind = 'precompute' AND status = 'complete' "
                           "ORDER BY finished_at DESC NULLS LAST, started_at DESC LIMIT 1").fetchall()
    if not rows:
        return None
    model, preset, params = rows[0]
    return {"model": model, "preset": preset, "params": json.loads(params or "{}")}


def improved(store: str | Path, preset: str = DEFAULT_PRESET) -> bool:
    """Whether the store's dictionaries already come from ``preset`` (its latest complete precompute run's)."""
    return _has_preset(latest_precompute(store), preset)


def _has_preset(base: dict[str, Any] | None, preset: str) -> bool:
    return base is not None and base["preset"] == preset


def _imported(base: dict[str, Any]) -> bool:
    """Whether that run imported its dictionaries (``--saes`` / ``--transcoders``): training would replace them with
    home-made ones, which is not an improvement to make unasked."""
    return bool(base["params"].get("saes") or base["params"].get("transcoders"))


# -- the run's status, for the app ------------------------------------------------------------------------------


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


class StatusFile:
    """A :class:`~backend.pipeline.context.RunObserver` that mirrors the run's plan and finished units, each with the
    seconds it took in this process, into the status file (replaced atomically at each write)."""

    def __init__(self, path: Path, **facts: Any) -> None:
        self.path = path
        self._previous = _read_json(path)  # an interrupted run's measured seconds, kept if this run resumes it
        self.data: dict[str, Any] = {**facts, "state": "starting", "units": []}
        self._last = time.monotonic()
        self._write()

    def started(self, run_id: str, plan: list[tuple[str, int | None]], done: list[tuple[str, int | None]]) -> None:
        """The run opened (``done``: units an interrupted run finished; their seconds come from its status file)."""
        old = self._previous if self._previous.get("run_id") == run_id else {}
        measured = {(u.get("step"), u.get("layer")): u for u in old.get("units", []) if isinstance(u, dict)}
        self.data.update(run_id=run_id, state="running", plan=[list(u) for u in plan],
                         units=[measured.get(u, {"step": u[0], "layer": u[1], "seconds": None}) for u in done])
        self._last = time.monotonic()
        self._write()

    def finished(self, step: str, layer: int | None) -> None:
        """One unit finished: record it with the seconds since the previous one (or since the run opened)."""
        now = time.monotonic()
        units = [u for u in self.data["units"] if (u["step"], u["layer"]) != (step, layer)]
        units.append({"step": step, "layer": layer, "seconds": round(now - self._last, 2),
                      "at": datetime.now(timezone.utc).isoformat(timespec="seconds")})
        self.data["units"] = units
        self._last = now
        self._write()

    def failed(self, message: str) -> None:
        """The run stopped with an error (``message``)."""
        self.data.update(state="failed", error=message[:500])
        self._write()

    def _write(self) -> None:
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text(json.dumps(self.data))
        os.replace(tmp, self.path)


@dataclass(frozen=True)
class Progress:
    """What the Home page says about an improvement of the store it serves."""

    state: str  # "starting" (no run opened yet), "running", "interrupted" or "failed"
    preset: str  # the preset being trained
    base_preset: str  # the preset of the dictionaries served meanwhile
    log: Path
    pid: int | None
    units_done: int
    units_total: int  # 0 until the run has opened
    step: str | None  # the step under way (None when every unit is done: the swap is next)
    step_number: int  # 1-based, of n_steps
    n_steps: int
    layers_done: int  # of the step under way, when it works layer by layer
    layers_total: int
    eta_seconds: float | None  # the step's remaining layers x the mean measured seconds of its finished layers
    error: str = ""


def summarize(data: dict[str, Any], running: bool, staging_exists: bool, log: Path) -> Progress | None:
    """The :class:`Progress` of the status ``data``, given whether its process is ``running`` (holds the lock) and its
    run's staging copy exists; None when there is nothing to say (no improvement, or one that was swapped in, whether
    or not its process has exited yet)."""
    if running and not data.get("run_id"):
        state = "starting"  # loading the model, copying the store: no staging run yet
    elif running and staging_exists:
        state = "running"
    elif staging_exists:
        state = "interrupted"
    elif data.get("state") == "failed":
        state = "failed"
    else:
        return None
    plan = [(str(s), None if layer is None else int(layer)) for s, layer in data.get("plan", [])]
    units = {(str(u.get("step")), u.get("layer")): u.get("seconds") for u in data.get("units", [])
             if isinstance(u, dict)}
    steps = [s for s, layer in plan if layer is None]
    step = next((s for s in steps if (s, None) not in units), None)
    layers = [u for u in plan if u[0] == step and u[1] is not None]
    finished = [units[u] for u in layers if u in units]
    measured = [float(x) for x in finished if isinstance(x, (int, float))]
    eta = (len(layers) - len(finished)) * sum(measured) / len(measured) if measured and len(layers) else None
    pid = data.get("pid")
    return Progress(state=state, preset=str(data.get("preset", "")), base_preset=str(data.get("base_preset", "")),
                    log=log, pid=pid if isinstance(pid, int) else None,
                    units_done=sum(1 for u in plan if u in units), units_total=len(plan), step=step,
                    step_number=steps.index(step) + 1 if step in steps else len(steps), n_steps=len(steps),
                    layers_done=len(finished), layers_total=len(layers), eta_seconds=eta,
                    error=str(data.get("error", "")))


def progress(store: str | Path) -> Progress | None:
    """What an improvement of the store at ``store`` is doing now, from its status file, its lock and its staging
    copy; None when none is under way, interrupted or failed."""
    try:
        p = paths(store)
        data = _read_json(p.status)
        running = lock_held(p.lock) if p.lock.exists() else False
    except (StoreError, OSError):
        return None
    if not data and not running:
        return None
    run_id = data.get("run_id")
    staging = isinstance(run_id, str) and "/" not in run_id and staging_file(real_path(store), run_id).exists()
    return summarize(data, running, staging, p.log)


# -- running it --------------------------------------------------------------------------------------------------


def improve(store: str | Path, preset: str = DEFAULT_PRESET, model: Any = None) -> str | None:
    """Retrain the dictionaries of the store at ``store`` with ``preset`` and recompute what depends on them: a
    precompute run over the store's own model and corpus, continuing the unfinished one an interruption left if there
    is one, swapped in when done. Returns the run id, or None when the store's dictionaries already come from
    ``preset`` or were imported. ``model`` may pass the store's model, already loaded. One StoreError sentence when
    another improvement or another writer is at work on the store."""
    from backend.pipeline.config import get_preset
    from backend.pipeline.run import precompute

    get_preset(preset)  # an unknown preset is one sentence, before anything else
    p = paths(store)
    base = latest_precompute(store)  # also one sentence for a missing, corrupt or hostile store
    if base is None:
        raise StoreError(f"{literal(store)} holds no complete precompute run to improve: build it first (`make demo`).")
    with holding_flock(p.lock) as mine:
        if not mine:
            raise StoreError(f"An improvement of {literal(store)} is already running (its log: {literal(p.log)}).")
        if _has_preset(base, preset) or _imported(base):
            why = "imports its dictionaries" if _imported(base) else f"already holds the {preset} preset's dictionaries"
            say(f"{store} {why}: nothing to improve")
            p.status.unlink(missing_ok=True)
            return None
        if writer_busy(store):
            raise StoreError(f"Another precompute is writing {literal(store)}: improve it once that one has finished.")
        status = StatusFile(p.status, preset=preset, base_preset=base["preset"], model=base["model"], pid=os.getpid())
        resume = bool(staging_files(store))
        options = {"preset": preset, "corpus_source": base["params"].get("corpus", "builtin"), "observer": status}
        try:
            if model is None:
                from backend.model.registry import load_model

                model = load_model(base["model"], progress=say)
            try:
                run_id = precompute(base["model"], store, model=model, resume=resume, **options)
            except StoreError as exc:
                if not resume or writer_busy(store):
                    raise
                # The unfinished run beside the store is not this improvement's, or the store changed since it
                # started: a fresh run deletes it, as a precompute without --resume does.
                say(f"Cannot continue the unfinished run ({exc}); starting the improvement afresh")
                run_id = precompute(base["model"], store, model=model, resume=False, **options)
        except BaseException as exc:
            status.failed(str(exc) or type(exc).__name__)
            raise
        p.status.unlink(missing_ok=True)
        say(f"{store} now holds the {preset} preset's dictionaries (run {run_id})")
        return run_id


def start_background(store: str | Path, preset: str = DEFAULT_PRESET, enabled: str | None = None,
                     extra_args: tuple[str, ...] = ()) -> str:
    """Start :func:`improve` of the store at ``store`` as a detached, niced process writing to the log beside the
    store, unless switched off (``enabled``, default the ``CIRCUITSCOPE_IMPROVE`` environment variable, is 0 / false
    / no / off), read-only, already improved, already running, or another writer is at work. Returns at once with the
    one line that says which (``make run`` prints it); the process takes the lock itself, so two started at once
    leave one running. A store whose dictionaries were imported is left as it is."""
    from backend.pipeline.config import get_preset

    get_preset(preset)
    flag = os.environ.get(ENABLED_ENV, "1") if enabled is None else enabled
    if flag.strip().lower() in _OFF:
        return f"Background improvement off ({ENABLED_ENV}={flag}): the store keeps its dictionaries."
    if read_only():
        return "Background improvement off: this deployment is read-only."
    p = paths(store)
    if not real_path(store).exists():
        return f"No store at {store} to improve in the background."
    base = latest_precompute(store)
    if base is None:
        return f"{store} holds no complete precompute run to improve."
    if _has_preset(base, preset):
        return f"{store} already holds the {preset} preset's dictionaries: no background improvement needed."
    if _imported(base):
        return f"{store} imports its dictionaries: no background improvement."
    if p.lock.exists() and lock_held(p.lock):
        return f"The background improvement of {store} is already running (log: {p.log})."
    if writer_busy(store):
        return f"Another precompute is writing {store}: no background improvement now."
    nice = shutil.which("nice")
    command = [*([nice, "-n", str(NICENESS)] if nice else []), sys.executable, "-m", "backend", "improve",
               "--store", str(real_path(store)), "--preset", preset, *extra_args]
    resumed = bool(staging_files(store))
    with open(p.log, "ab") as log:
        log.write(f"=== {datetime.now(timezone.utc).isoformat(timespec='seconds')} {' '.join(command)}\n".encode())
        log.flush()
        subprocess.Popen(command, cwd=_ROOT, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                         start_new_session=True)  # its own session: stopping `make run` (Ctrl-C) leaves it running
    return (f"{'Resuming' if resumed else 'Started'} the background improvement of {store} to the {preset} preset's "
            f"dictionaries (niced; log: {p.log}; the app serves the current ones meanwhile; opt out with "
            "`make run IMPROVE=0`).")
