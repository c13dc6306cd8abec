"""Resumable precompute runs (``precompute --resume``): a run killed with ``kill -9`` in the middle of a per-layer step,
or stopped by an exception after some steps, is continued from what it recorded and writes exactly the tables an
uninterrupted run writes; readers meanwhile see only the complete runs; resuming refuses in one sentence when there is
nothing to resume or the options differ.

Equality is exact (every column but run ids, timestamps and timings, and the summary's note of whether activations
were reused): a resumed run re-collects on its own forward pass the activations the interrupted one had gathered
during the corpus step, in the same batches, which gives the same bits on the CPU; and every dictionary is evaluated
as read back from the store in both runs. The one exception is the attribution graphs' float32 node values (bias
sums over many terms), which differ between processes by float32 rounding (seen: 2e-8 absolute on values ~1e-3; the
float32 spacing near 0.07 is 7e-9): they are compared within 1e-6 absolute or 1e-5 relative.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import duckdb
import pytest
from store_tables import assert_same_tables
from tiny_stores import TEST_MODEL

from backend.errors import StoreError
from backend.store.access import open_store
from backend.store.schema import SCHEMA_VERSION

ROOT = Path(__file__).resolve().parents[2]

# A preset slow enough in its per-layer attention-SAE step (two layers, many epochs) that the test can see layer 0
# finish and kill the run while layer 1 trains.
RUNNER = """
import sys
from dataclasses import replace

from backend.pipeline import config
from backend.pipeline.run import precompute

demo = config.PRESETS["demo"]
# Attribution comparisons and graphs are left out: they are whole-step units like the others, and slow here.
config.PRESETS["resume-test"] = replace(demo, name="resume-test", sae=replace(demo.sae, epochs=float(sys.argv[3])),
                                        attribution=replace(demo.attribution, tasks=()),
                                        graphs=replace(demo.graphs, prompts=()))
precompute("tiny-llama", sys.argv[1], preset="resume-test", n_contexts=8, layers="0,1", resume=sys.argv[2] == "resume")
"""
EPOCHS = 40


def _run(tmp: Path, store: Path, resume: bool, log: Path) -> subprocess.Popen[bytes]:
    script = tmp / "runner.py"
    script.write_text(RUNNER)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    with open(log, "wb") as out:
        return subprocess.Popen([sys.executable, str(script), str(store), "resume" if resume else "new", str(EPOCHS)],
                                stdout=out, stderr=subprocess.STDOUT, cwd=ROOT, env=env)


def _finish(proc: subprocess.Popen[bytes], log: Path) -> str:
    assert proc.wait(timeout=900) == 0, log.read_text()[-3000:]
    return log.read_text()


def _complete_runs(store: Path) -> list[tuple[str, str]]:
    con = open_store(store)
    try:
        return sorted(con.execute("SELECT run_id, status FROM runs").fetchall())
    finally:
        con.close()


def _staging(store: Path) -> list[Path]:
    return sorted(store.parent.glob(f".{store.name}.*.tmp"))


@pytest.mark.slow
@pytest.mark.timeout(1800)  # three tiny precomputes in subprocesses: ~5 min alone, 15 on a busy 2-core machine
def test_a_run_killed_mid_layer_resumes_to_the_uninterrupted_result(tmp_path: Path, tiny_store: Path) -> None:
    killed, reference = tmp_path / "killed.duckdb", tmp_path / "reference.duckdb"
    shutil.copy(tiny_store, killed)
    shutil.copy(tiny_store, reference)
    before = _complete_runs(killed)

    proc = _run(tmp_path, killed, False, tmp_path / "killed.log")
    marker = "(layer 0 of the attention_saes step finished)"
    deadline = time.monotonic() + 600
    while marker not in (tmp_path / "killed.log").read_text():
        assert proc.poll() is None, (tmp_path / "killed.log").read_text()[-3000:]
        assert time.monotonic() < deadline, "layer 0 never finished"
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()

    # Readers see the complete runs only; the staging copy holds the finished layer, not the finished step.
    assert _complete_runs(killed) == before
    (staging,) = _staging(killed)
    con = duckdb.connect(str(staging), read_only=True)
    try:
        units = set(con.execute("SELECT step, layer FROM run_progress").fetchall())
    finally:
        con.close()
    assert ("attention_saes", 0) in units and ("attention_saes", None) not in units
    assert ("corpus", None) in units

    out = _finish(_run(tmp_path, killed, True, tmp_path / "resume.log"), tmp_path / "resume.log")
    assert "Skipping the attention-SAE training of layer(s) 0" in out
    assert "Skipping the corpus step" in out
    _finish(_run(tmp_path, reference, False, tmp_path / "reference.log"), tmp_path / "reference.log")

    after = _complete_runs(killed)
    assert len(after) == len(before) + 1 and all(status == "complete" for _, status in after)
    assert not _staging(killed) and not list(tmp_path.glob(".killed.duckdb.*.tmp*"))
    assert_same_tables(killed, reference)


def test_resume_refuses_nothing_to_resume_and_other_options_then_continues(
        tmp_path: Path, tiny_model: Any, tiny_store: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from backend.pipeline import run

    store = tmp_path / "s.duckdb"
    with pytest.raises(StoreError, match="no unfinished run"):
        run.precompute(TEST_MODEL, store, preset="demo", n_contexts=8, model=tiny_model, resume=True)

    # A run that fails after its model and corpus steps keeps its staging copy; readers see no run.
    steps = list(run.STEPS)

    def broken(ctx: Any) -> None:
        raise RuntimeError("stopped")

    monkeypatch.setattr(run, "STEPS", [(n, broken if n == "tasks" else s) for n, s in steps])
    with pytest.raises(RuntimeError, match="stopped"):
        run.precompute(TEST_MODEL, store, preset="demo", n_contexts=8, model=tiny_model)
    assert not store.exists() and len(_staging(store)) == 1
    monkeypatch.setattr(run, "STEPS", steps)

    with pytest.raises(StoreError, match=r"other options \(preset.n_contexts differ\)"):
        run.precompute(TEST_MODEL, store, preset="demo", n_contexts=9, model=tiny_model, resume=True)
    assert len(_staging(store)) == 1  # still there to be resumed with the right options

    # As an older circuitscope (schema 4, before labels and saved views) would have left it: the code was updated
    # between the interruption and the resume.
    con = duckdb.connect(str(_staging(store)[0]))
    try:
        for table in ("feature_labels", "user_labels", "graph_views"):
            con.execute(f"DROP TABLE {table}")
        con.execute("UPDATE meta SET value = '4' WHERE key = 'schema_version'")
    finally:
        con.close()
    run.precompute(TEST_MODEL, store, preset="demo", n_contexts=8, model=tiny_model, resume=True)
    assert not _staging(store)
    # tiny_store is the same run, uninterrupted, into an empty store.
    assert_same_tables(store, tiny_store)
    con = open_store(store)
    try:
        assert con.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchall()[0][0] == str(SCHEMA_VERSION)
    finally:
        con.close()

    with pytest.raises(StoreError, match="no unfinished run"):  # the run finished: nothing left to resume
        run.precompute(TEST_MODEL, store, preset="demo", n_contexts=8, model=tiny_model, resume=True)


def test_a_run_without_resume_starts_afresh_and_says_so(tmp_path: Path, tiny_model: Any,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    from backend.store.access import StoreWriter

    store = tmp_path / "s.duckdb"
    with pytest.raises(RuntimeError):
        with StoreWriter(store, kind="precompute", model=TEST_MODEL) as w:
            w.finish_unit("model")
            raise RuntimeError("stopped")
    (left,) = _staging(store)
    with StoreWriter(store, kind="precompute", model=TEST_MODEL) as w:
        assert w.discarded == [left.name.split(".")[-2]]
    assert not _staging(store) and _complete_runs(store)[0][1] == "complete"
    con = open_store(store)
    try:  # the progress table lives only in staging copies
        assert not con.execute("SELECT count(*) FROM duckdb_tables() WHERE table_name = 'run_progress'").fetchall()[0][0]
    finally:
        con.close()
