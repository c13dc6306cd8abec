"""The background improvement of a served store (``python -m backend improve``, started by ``make run``): a run with a
stronger preset into a staging copy, resumable after ``kill -9`` to the store an uninterrupted improvement writes,
swapped in with the saves made meanwhile; the Home page tells what is training while a staging run exists; the
launcher ``make run`` calls starts it at most once, never when switched off or finished.

The improvement's preset here is the demo preset on two attention-SAE layers instead of one, with many SAE epochs
(slow enough to kill mid-step on the tiny model), registered in the subprocess that runs it.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Iterator

import duckdb
import pytest
from store_tables import assert_same_tables
from streamlit.testing.v1 import AppTest
from tiny_stores import TEST_STORE_NAME

from backend.errors import StoreError
from backend.pipeline import config, improve
from backend.store.access import open_store, staging_files

ROOT = Path(__file__).resolve().parents[2]
TIMEOUT = 120
PRESET = "better"
EPOCHS = 40
RUNNER = f"""
import sys
from dataclasses import replace

from backend.pipeline import config
from backend.pipeline.improve import improve

demo = config.PRESETS["demo"]
# Attribution comparisons are left out (slow here); graphs stay: the demo's must be replaced by this run's.
config.PRESETS["{PRESET}"] = replace(demo, name="{PRESET}", n_contexts=8, layers="0,1",
                                   sae=replace(demo.sae, epochs={EPOCHS}.0),
                                   attribution=replace(demo.attribution, tasks=()))
improve(sys.argv[1], preset="{PRESET}")
"""


def _start(tmp: Path, store: Path, log: Path) -> subprocess.Popen[bytes]:
    script = tmp / "improve_runner.py"
    script.write_text(RUNNER)
    with open(log, "ab") as out:
        return subprocess.Popen([sys.executable, str(script), str(store)], stdout=out, stderr=subprocess.STDOUT,
                                cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})


def _finish(proc: subprocess.Popen[bytes], log: Path) -> str:
    assert proc.wait(timeout=900) == 0, log.read_text()[-3000:]
    return log.read_text()


def _runs(store: Path) -> list[tuple[str, str, str]]:
    con = open_store(store)
    try:
        return sorted(con.execute("SELECT run_id, preset, status FROM runs WHERE kind = 'precompute'").fetchall())
    finally:
        con.close()


def _home(stores: Path, name: str) -> AppTest:
    at = AppTest.from_file(str(ROOT / "app.py"), default_timeout=TIMEOUT)
    at.query_params.update({"store": name})
    at.run()
    assert not at.exception, [e.value for e in at.exception]
    return at


def _notices(at: AppTest) -> list[str]:
    return [str(e.value) for e in [*at.info, *at.warning] if "preset" in str(e.value)]


def _label(store: Path) -> tuple[str, int]:
    """A save made beside the store: a user label of transcoder feature 0 of layer 0."""
    from backend.features.labels import save_user_label

    con = open_store(store)
    try:
        (dict_id,) = con.execute("SELECT dict_id FROM dictionaries WHERE kind = 'transcoder' AND layer = 0"
                                 ).fetchall()[0]
    finally:
        con.close()
    save_user_label(store, dict_id, 0, "my label, kept")
    return dict_id, 0


@pytest.mark.slow
@pytest.mark.timeout(1800)  # two tiny improvements in subprocesses: ~3 min alone, more on a busy 2-core machine
def test_an_improvement_killed_mid_step_resumes_to_the_uninterrupted_result(
        tmp_path: Path, tiny_store: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    stores = tmp_path / "stores"
    stores.mkdir()
    killed, reference = stores / TEST_STORE_NAME, stores / "reference.duckdb"
    shutil.copy(tiny_store, killed)
    shutil.copy(tiny_store, reference)
    monkeypatch.setenv("CIRCUITSCOPE_STORES_DIR", str(stores))
    monkeypatch.setenv("CIRCUITSCOPE_STORE", TEST_STORE_NAME)
    before = _runs(killed)
    assert [preset for _, preset, _ in before] == ["demo"]
    with duckdb.connect(str(tiny_store), read_only=True) as con:
        demo_graphs = {g for (g,) in con.execute("SELECT graph_id FROM graphs WHERE source = 'precompute'").fetchall()}
    assert demo_graphs  # the demo's example graphs, which the improvement must replace

    log = improve.paths(killed).log
    proc = _start(tmp_path, killed, log)
    marker = "(layer 0 of the attention_saes step finished)"
    deadline = time.monotonic() + 600
    while marker not in (log.read_text() if log.exists() else ""):
        assert proc.poll() is None, log.read_text()[-3000:]
        assert time.monotonic() < deadline, "layer 0 never finished"
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()

    # Readers still see the demo run only; the staging copy holds the finished layer.
    assert _runs(killed) == before and len(staging_files(killed)) == 1
    # The Home page says the dictionaries served are the demo's and where the interrupted run stands.
    (notice,) = _notices(_home(stores, TEST_STORE_NAME))
    assert "`demo` preset's" in notice and "interrupted" in notice and f"`{PRESET}`" in notice
    assert "step 5 of 12, `attention_saes`: 1 of 2 layers" in notice and str(log) in notice

    # A save made while the improvement is staged survives the swap (and is made in the reference too, before its run).
    label = _label(killed)
    assert _label(reference) == label

    out = _finish(_start(tmp_path, killed, log), log)
    assert "Skipping the attention-SAE training of layer(s) 0" in out and "Skipping the corpus step" in out
    _finish(_start(tmp_path, reference, tmp_path / "reference.log"), tmp_path / "reference.log")

    after = _runs(killed)
    assert [preset for _, preset, _ in after] == ["demo", PRESET] and all(s == "complete" for *_, s in after)
    assert not staging_files(killed) and not improve.paths(killed).status.exists()
    assert improve.improved(killed, PRESET) and improve.progress(killed) is None
    assert_same_tables(killed, reference)

    con = open_store(killed)
    try:
        assert con.execute("SELECT label FROM user_labels WHERE dict_id = ? AND feature = ?",
                           list(label)).fetchall() == [("my label, kept",)]
        layers = sorted(r[0] for r in con.execute("SELECT layer FROM dictionaries WHERE kind = 'attn_sae'").fetchall())
        graphs = {g for (g,) in con.execute("SELECT graph_id FROM graphs WHERE source = 'precompute'").fetchall()}
        graph_runs = {r for (r,) in con.execute("SELECT DISTINCT run_id FROM graphs WHERE source = 'precompute'")
                      .fetchall()}
    finally:
        con.close()
    assert layers == [0, 1]  # the demo preset trains layer 1 only on this 2-layer model
    assert graphs and not graphs & demo_graphs and graph_runs == {after[1][0]}

    # After the swap the Home page says nothing of an improvement and shows the new dictionaries' figures.
    at = _home(stores, TEST_STORE_NAME)
    assert not _notices(at)
    quality = next(df.value for df in at.dataframe if "fve" in df.value.columns and "kind" in df.value.columns)
    assert set(quality.loc[quality["kind"] != "transcoder", "layer"]) == {0, 1}


# --------------------------------------------------------------------------------------------------------------
# The Home page while an improvement runs, and its arithmetic


@pytest.fixture
def held() -> Iterator[Any]:
    """``held(lock)``: hold the flock on ``lock`` (as a running improvement does) until the test ends."""
    handles: list[Any] = []

    def hold(lock: Path) -> None:
        fh = open(lock, "a")
        fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        handles.append(fh)

    yield hold
    for fh in handles:
        fh.close()


def test_summary_counts_units_and_derives_the_eta_from_measured_layer_times(tmp_path: Path) -> None:
    plan = [["model", None], ["transcoders", 0], ["transcoders", 1], ["transcoders", 2], ["transcoders", 3],
            ["transcoders", None], ["graphs", None]]
    data = {"preset": "full", "base_preset": "demo", "pid": 7, "run_id": "r", "plan": plan,
            "units": [{"step": "model", "layer": None, "seconds": 1.0},
                      {"step": "transcoders", "layer": 0, "seconds": 100.0},
                      {"step": "transcoders", "layer": 1, "seconds": 300.0}]}
    p = improve.summarize(data, running=True, staging_exists=True, log=tmp_path / "x.log")
    assert p is not None and p.state == "running"
    assert (p.units_done, p.units_total, p.step, p.step_number, p.n_steps) == (3, 7, "transcoders", 2, 3)
    assert (p.layers_done, p.layers_total) == (2, 4)
    assert p.eta_seconds == pytest.approx(2 * (100.0 + 300.0) / 2)
    # Units whose time is unknown (finished by a run interrupted before its status recorded them) give no ETA.
    data["units"][1]["seconds"] = data["units"][2]["seconds"] = None
    assert improve.summarize(data, running=False, staging_exists=True, log=tmp_path / "x.log").eta_seconds is None
    # Neither running nor staged: swapped in (or never started) -> nothing to say; failed -> say so.
    assert improve.summarize(data, running=False, staging_exists=False, log=tmp_path / "x.log") is None
    failed = improve.summarize({**data, "state": "failed", "error": "boom"}, False, False, tmp_path / "x.log")
    assert failed is not None and failed.state == "failed" and failed.error == "boom"


def test_home_page_shows_a_running_improvement_while_its_staging_run_exists(
        app_stores_dir: Path, held: Any) -> None:
    store = app_stores_dir / TEST_STORE_NAME
    paths = improve.paths(store)
    status = improve.StatusFile(paths.status, preset="full", base_preset="demo", model="tiny-llama", pid=4321)
    run_id = "20260101T000000-abcdef"
    status.started(run_id, [("model", None), ("transcoders", 0), ("transcoders", 1), ("transcoders", None)], [])
    status.finished("model", None)
    status.finished("transcoders", 0)
    staging = store.parent / f".{store.name}.{run_id}.tmp"
    staging.write_bytes(b"")
    held(paths.lock)

    at = _home(app_stores_dir, TEST_STORE_NAME)
    (notice,) = _notices(at)
    assert "`demo` preset's" in notice and "Better ones, the `full` preset's, are training" in notice
    assert "2 of 4 units of work (steps and layers) done; step 2 of 2, `transcoders`: 1 of 2 layers, about" in notice
    assert str(paths.log) in notice and "kill 4321" in notice
    assert [p.proto.value for p in at.get("progress")] == [50]  # percent: 2 of 4 units

    staging.unlink()  # swapped in (its process has not exited yet): nothing more to say
    assert not _notices(_home(app_stores_dir, TEST_STORE_NAME))


def test_home_page_escapes_a_failed_improvements_message(app_stores_dir: Path) -> None:
    store = app_stores_dir / TEST_STORE_NAME
    status = improve.StatusFile(improve.paths(store).status, preset="full", base_preset="demo", model="m", pid=1)
    status.failed("![x](http://example.invalid/p.png) <img src=x>")
    at = _home(app_stores_dir, TEST_STORE_NAME)
    (notice,) = _notices(at)
    assert "failed (`![x](http://example.invalid/p.png) <img src=x>`)" in notice


# --------------------------------------------------------------------------------------------------------------
# The launcher `make run` calls: opt-out, finished, already running, started once


def test_launcher_does_nothing_when_off_finished_running_or_read_only(
        tmp_path: Path, tiny_store: Path, held: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    store = tmp_path / "s.duckdb"
    shutil.copy(tiny_store, store)
    paths = improve.paths(store)
    monkeypatch.setitem(config.PRESETS, PRESET, config.PRESETS["demo"])
    assert "off (CIRCUITSCOPE_IMPROVE=0)" in improve.start_background(store, PRESET, enabled="0")
    monkeypatch.setenv(improve.ENABLED_ENV, "no")
    assert "off (CIRCUITSCOPE_IMPROVE=no)" in improve.start_background(store, PRESET)
    monkeypatch.delenv(improve.ENABLED_ENV)
    assert "already holds the demo preset's" in improve.start_background(store, "demo", enabled="1")
    monkeypatch.setenv("CIRCUITSCOPE_READ_ONLY", "1")
    assert "read-only" in improve.start_background(store, PRESET, enabled="1")
    monkeypatch.delenv("CIRCUITSCOPE_READ_ONLY")
    imported = tmp_path / "imported.duckdb"  # a store whose dictionaries were imported is left as it is
    shutil.copy(tiny_store, imported)
    with duckdb.connect(str(imported)) as con:
        (params,) = con.execute("SELECT params FROM runs WHERE kind = 'precompute'").fetchall()[0]
        con.execute("UPDATE runs SET params = ? WHERE kind = 'precompute'",
                    [json.dumps({**json.loads(params), "saes": ["some-release"]})])
    assert "imports its dictionaries" in improve.start_background(imported, PRESET, enabled="1")
    assert improve.improve(imported, PRESET) is None and not staging_files(imported)
    held(paths.lock)
    assert "already running" in improve.start_background(store, PRESET, enabled="1")
    with pytest.raises(StoreError, match="already running"):
        improve.improve(store, PRESET)
    assert not paths.log.exists() and not paths.status.exists() and not staging_files(store)


def test_launcher_starts_a_detached_process_that_logs_beside_the_store(
        tmp_path: Path, tiny_store: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store = tmp_path / "s.duckdb"
    shutil.copy(tiny_store, store)
    # Known to this process only: the background process refuses it at once, which is all this test needs of it.
    monkeypatch.setitem(config.PRESETS, "only-here", config.PRESETS["demo"])
    t0 = time.monotonic()
    said = improve.start_background(store, "only-here", enabled="1")
    assert time.monotonic() - t0 < 10  # returns without waiting for the process
    log = improve.paths(store).log
    assert said.startswith("Started the background improvement") and str(log) in said
    deadline = time.monotonic() + 120
    while "Unknown preset 'only-here'" not in log.read_text():
        assert time.monotonic() < deadline, log.read_text()
        time.sleep(0.1)
    first = log.read_text().splitlines()[0]
    assert f"improve --store {store} --preset only-here" in first and "nice -n 10" in first


def test_make_run_starts_the_launcher_before_serving_and_passes_the_opt_out() -> None:
    out = subprocess.run(["make", "-n", "run", "IMPROVE=0", "STORE=x/y.duckdb"], cwd=ROOT, capture_output=True,
                         text=True, timeout=60).stdout
    lines = out.splitlines()
    launch = next(i for i, line in enumerate(lines) if "improve --store x/y.duckdb --background" in line)
    serve = next(i for i, line in enumerate(lines) if "streamlit run app.py" in line)
    assert launch < serve and "CIRCUITSCOPE_IMPROVE=0" in lines[launch]
    # A launcher failure never stops the app from being served: make ignores the line's exit status.
    makefile = (ROOT / "Makefile").read_text().splitlines()
    assert any(line.startswith("\t-") and "--background" in line for line in makefile)


def test_status_file_keeps_an_interrupted_runs_measured_times_when_resumed(tmp_path: Path) -> None:
    path = tmp_path / "status.json"
    first = improve.StatusFile(path, preset="full", base_preset="demo", model="m", pid=1)
    first.started("r1", [("a", 0), ("a", 1), ("a", None)], [])
    first.finished("a", 0)
    measured = json.loads(path.read_text())["units"][0]["seconds"]
    again = improve.StatusFile(path, preset="full", base_preset="demo", model="m", pid=2)
    again.started("r1", [("a", 0), ("a", 1), ("a", None)], [("a", 0)])
    assert json.loads(path.read_text())["units"] == [{**json.loads(json.dumps(first.data))["units"][0]}]
    assert json.loads(path.read_text())["units"][0]["seconds"] == measured
    other = improve.StatusFile(path, preset="full", base_preset="demo", model="m", pid=3)
    other.started("r2", [("a", 0), ("a", None)], [("a", 0)])  # another run's: its time is unknown
    assert json.loads(path.read_text())["units"] == [{"step": "a", "layer": 0, "seconds": None}]


@pytest.mark.parametrize("args, needle", [
    (("--preset", "huge"), "Unknown preset 'huge'"),
    ((), "No store at"),
])
def test_improve_cli_user_errors_are_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                              args: tuple[str, ...], needle: str) -> None:
    from backend.cli import main

    assert main(["improve", "--store", str(tmp_path / "none.duckdb"), *args]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0]
    assert not list(tmp_path.iterdir())  # nothing written beside a store that is not there
