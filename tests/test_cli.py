"""The precompute / info command line, run as a user would run it (subprocesses), on the tiny test model."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from backend.store import queries
from backend.store.access import reading

ROOT = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "PYTHONPATH": str(ROOT)}


def _cli(*args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "backend", *args], capture_output=True, text=True, cwd=ROOT,
                          env=ENV, timeout=timeout)


@pytest.fixture(scope="module")
def built_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    store = tmp_path_factory.mktemp("cli") / "tiny.duckdb"
    out = _cli("precompute", "--model", "tiny-llama", "--store", str(store), "--contexts", "6")
    assert out.returncode == 0, out.stderr[-2000:]
    return store


def test_precompute_builds_a_readable_store(built_store: Path) -> None:
    with reading(built_store) as con:
        s = queries.summary(con)
    assert list(s["models"]["model"]) == ["tiny-llama"]
    corpora = s["corpora"]
    assert corpora["n_contexts"].tolist() == [6] and corpora["n_tokens"].tolist() == [6 * corpora["n_ctx"].iloc[0]]
    assert s["counts"]["tokens"] == int(corpora["n_tokens"].iloc[0])
    assert s["counts"]["vocab"] == 49152
    assert set(s["task_baselines"]["task"]) >= {"ioi"}
    assert s["runs"]["status"].tolist() == ["complete"]


def test_info_prints_what_the_store_holds(built_store: Path) -> None:
    out = _cli("info", str(built_store))
    assert out.returncode == 0, out.stderr
    assert "tiny-llama" in out.stdout and "corpora (1)" in out.stdout and "complete" in out.stdout


def test_progress_bars_are_shown(built_store: Path) -> None:
    out = _cli("precompute", "--model", "tiny-llama", "--store", str(built_store), "--contexts", "3")
    assert out.returncode == 0, out.stderr[-2000:]
    assert "Scoring corpus" in out.stderr and "<" in out.stderr  # tqdm's "elapsed<remaining" ETA
    with reading(built_store) as con:
        s = queries.summary(con)
    assert s["runs"]["status"].tolist() == ["complete", "complete"]
    assert s["corpora"]["n_contexts"].tolist() == [3]  # the re-run replaced the corpus, not duplicated it


@pytest.mark.parametrize(
    "args, needle",
    [
        (("precompute", "--model", "no-such-model", "--store", "{tmp}/x.duckdb"), "Unknown model 'no-such-model'"),
        (("precompute", "--model", "tiny-llama", "--store", "{tmp}/x.duckdb", "--preset", "huge"), "Unknown preset"),
        (("precompute", "--model", "tiny-llama", "--store", "{tmp}/x.duckdb", "--layers", "0,7"), "layer(s) [7]"),
        (("precompute", "--model", "tiny-llama", "--store", "{tmp}/x.duckdb", "--corpus", "{tmp}/missing.txt"), "missing.txt"),
        (("info", "{tmp}/missing.duckdb"), "No store at"),
        (("info", "{tmp}/corrupt.duckdb"), "not a readable circuitscope store"),
    ],
)
def test_user_errors_are_one_line_without_traceback(tmp_path: Path, args: tuple[str, ...], needle: str) -> None:
    (tmp_path / "corrupt.duckdb").write_bytes(b"garbage" * 100)
    out = _cli(*(a.format(tmp=tmp_path) for a in args))
    assert out.returncode == 2
    assert "Traceback" not in out.stderr
    error_lines = [line for line in out.stderr.splitlines() if line.startswith("error:")]
    assert len(error_lines) == 1 and needle in error_lines[0], out.stderr[-2000:]
    assert not (tmp_path / "x.duckdb").exists()


def test_kill_9_during_precompute_keeps_earlier_runs(built_store: Path, tmp_path: Path) -> None:
    store = tmp_path / "k.duckdb"
    store.write_bytes(built_store.read_bytes())
    before = store.read_bytes()
    with reading(store) as con:
        n_runs = len(queries.runs(con))
    proc = subprocess.Popen([sys.executable, "-m", "backend", "precompute", "--model", "tiny-llama", "--store",
                             str(store), "--contexts", "400"], cwd=ROOT, env=ENV, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and not any(p.name.endswith(".tmp") for p in tmp_path.iterdir()):
        time.sleep(0.05)
    time.sleep(1.0)  # well inside the run: copying done, corpus being scored
    assert proc.poll() is None, "precompute finished before it could be killed; raise --contexts"
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert store.read_bytes() == before
    with reading(store) as con:
        assert len(queries.runs(con)) == n_runs
    out = _cli("precompute", "--model", "tiny-llama", "--store", str(store), "--contexts", "2")
    assert out.returncode == 0, out.stderr[-2000:]
    with reading(store) as con:
        assert len(queries.runs(con)) == n_runs + 1
    assert not any(p.name.endswith(".tmp") for p in tmp_path.iterdir())


def test_precompute_imports_a_local_sae_directory(tmp_path: Path) -> None:
    # A sae-lens-format directory instead of training: the dictionary is evaluated, stored and gets features.
    from backend.dictionaries.attention_sae import make_random_sae
    from backend.model.hooks import hook_name

    sae = make_random_sae(d_in=64, d_sae=128, k=8, seed=3)  # tiny-llama: 4 heads x 16 = 64
    sae.cfg.metadata.hook_name = hook_name("z", 1)
    sae.save_model(tmp_path / "my_sae")
    store = tmp_path / "imported.duckdb"
    out = _cli("precompute", "--model", "tiny-llama", "--store", str(store), "--contexts", "12",
               "--saes", str(tmp_path / "my_sae"))
    assert out.returncode == 0, out.stderr[-2000:]
    with reading(store) as con:
        dicts = queries.dictionaries(con).query("kind == 'attn_sae'")
        n_features = con.execute("SELECT count(*) FROM features").fetchall()[0][0]
        source = con.execute("SELECT source FROM dictionaries WHERE kind = 'attn_sae'").fetchall()[0][0]
    assert dicts["layer"].tolist() == [1] and dicts["d_sae"].tolist() == [128]
    assert source.startswith("local:") and n_features > 0
    # Quality is measured on the held-out contexts (whatever a random SAE scores, it must be a real number).
    assert np.isfinite(dicts[["fve", "l0", "ce_loss_recovered", "ce_clean"]].to_numpy(dtype=float)).all()
    assert dicts["l0"].iloc[0] == pytest.approx(8.0)  # TopK k=8 fires exactly 8 features per token


def test_offline_sae_release_is_one_sentence(tmp_path: Path) -> None:
    from backend.model.registry import hub_reachable

    if hub_reachable():
        pytest.skip("the hub is reachable here, so the release may really load")
    out = _cli("precompute", "--model", "tiny-llama", "--store", str(tmp_path / "r.duckdb"), "--contexts", "4",
               "--saes", "gpt2-small-hook-z-kk")
    assert out.returncode == 2 and "Traceback" not in out.stderr
    error_lines = [line for line in out.stderr.splitlines() if line.startswith("error:")]
    assert len(error_lines) == 1 and "gpt2-small-hook-z-kk" in error_lines[0], out.stderr[-2000:]
    assert not (tmp_path / "r.duckdb").exists()


# ---------------------------------------------------------------------------------------------------------------
# Every option is checked before any work, within bounds, with one `error:` line and status 2


def _one_error_line(out: subprocess.CompletedProcess[str]) -> str:
    assert out.returncode == 2, (out.returncode, out.stderr[-2000:])
    assert "Traceback" not in out.stderr and "usage:" not in out.stderr
    lines = [line for line in out.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), out.stderr[-2000:]
    return lines[0]


LONG_NAME = "s" * 300 + ".duckdb"


@pytest.mark.parametrize("args, needle", [
    # --layers: bounded by the model's layers before a range is expanded (this one used to take 21.6 GB)
    (("precompute", "--model", "tiny-llama", "--store", "{tmp}/x.duckdb", "--layers", "0-99999999999"),
     "names layer(s) up to 99999999999 but the model has layers 0-1"),
    (("precompute", "--model", "tiny-llama", "--store", "{tmp}/x.duckdb", "--layers", "1-0"), "backwards"),
    (("precompute", "--model", "tiny-llama", "--store", "{tmp}/x.duckdb", "--layers", " "), "names no layer"),
    (("precompute", "--model", "tiny-llama", "--store", "{tmp}/x.duckdb", "--layers", ","), "names no layer"),
    (("precompute", "--model", "tiny-llama", "--store", "{tmp}/x.duckdb", "--layers", "spread:-5"), "spread:K"),
    (("precompute", "--model", "tiny-llama", "--store", "{tmp}/x.duckdb", "--layers", "²"), "not understood"),
    (("precompute", "--model", "tiny-llama", "--store", "{tmp}/x.duckdb", "--transcoder-layers", "0-9"),
     "names layer(s) up to 9"),
    # numbers: argparse's own errors are one line too (no usage block)
    (("precompute", "--model", "tiny-llama", "--store", "{tmp}/x.duckdb", "--contexts", "abc"),
     "argument --contexts: expected a whole number"),
    (("precompute", "--model", "tiny-llama", "--store", "{tmp}/x.duckdb", "--contexts", "0"), "from 1 to"),
    (("precompute", "--model", "tiny-llama", "--store", "{tmp}/x.duckdb", "--contexts", "99999999999"), "from 1 to"),
    (("graph", "--store", "{tmp}/x.duckdb", "--prompt", "x", "--max-nodes", "-1"), "argument --max-nodes"),
    (("graph", "--store", "{tmp}/x.duckdb", "--prompt", "x", "--edge-threshold", "nan"), "between 0 and 1"),
    (("attribute", "--store", "{tmp}/x.duckdb", "--task", "ioi", "--examples", "-3"), "argument --examples"),
    (("attribute", "--store", "{tmp}/x.duckdb", "--task", "ioi", "--ig-steps", "0"), "argument --ig-steps"),
    (("attribute", "--store", "{tmp}/x.duckdb", "--task", "ioi", "--kinds", ","), "names no component kind"),
    (("precompute", "--model", "tiny-llama"), "required: --store"),
    (("nonsense",), "invalid choice"),
    # --export: the suffix and the directory are checked first; a missing directory is never created
    (("graph", "--store", "{tmp}/x.duckdb", "--prompt", "x", "--export", "{tmp}/missing/dir/g.svg"),
     "does not exist"),
    (("graph", "--store", "{tmp}/x.duckdb", "--prompt", "x", "--export", "{tmp}/g.xlsx"), "export format"),
    # store paths the file system refuses: a read-only (/sys refuses even root) or special directory, a long name
    (("precompute", "--model", "tiny-llama", "--store", "/sys/x.duckdb"), "Cannot write a store at `/sys/x.duckdb`"),
    (("precompute", "--model", "tiny-llama", "--store", "/proc/x.duckdb"), "Cannot write a store at `/proc/"),
    (("precompute", "--model", "tiny-llama", "--store", "{tmp}/" + LONG_NAME), "choose a shorter name"),
    (("info", "{tmp}/" + LONG_NAME), "file name too long"),
    (("attribute", "--store", "/proc/x.duckdb", "--task", "ioi"), "Cannot write a store"),
    (("graph", "--store", "{tmp}/" + LONG_NAME, "--prompt", "x"), "file name too long"),
])
def test_bad_options_are_one_line_before_any_work(tmp_path: Path, args: tuple[str, ...], needle: str) -> None:
    out = _cli(*(a.format(tmp=tmp_path) for a in args))
    line = _one_error_line(out)
    assert needle in line, line
    assert "Loading" not in out.stderr  # refused before the model loads
    assert not (tmp_path / "x.duckdb").exists() and not (tmp_path / "missing").exists()


def test_a_read_only_directory_is_one_line(tmp_path: Path) -> None:
    """A directory the user cannot write to (root writes anywhere, so this runs the check as it would for a user:
    where chmod does not stop us, /sys above stands in for it)."""
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    try:
        if os.access(locked, os.W_OK):
            pytest.skip("running as root: permissions do not stop writes (the /sys case covers this)")
        line = _one_error_line(_cli("precompute", "--model", "tiny-llama", "--store", str(locked / "x.duckdb")))
        assert "permission denied" in line
    finally:
        locked.chmod(0o755)


@pytest.mark.parametrize("statements, needle", [
    (["CREATE TABLE meta (key VARCHAR, value VARCHAR)"], "no schema version"),
    (["CREATE TABLE meta (key VARCHAR, value VARCHAR)", "INSERT INTO meta VALUES ('schema_version', 'v3')"],
     "not a whole number"),
])
@pytest.mark.parametrize("command", ["info", "precompute"])
def test_meta_only_and_bad_version_stores_are_one_line(tmp_path: Path, statements: list[str], needle: str,
                                                       command: str) -> None:
    import duckdb

    store = tmp_path / "odd.duckdb"
    con = duckdb.connect(str(store))
    for s in statements:
        con.execute(s)
    con.close()
    before = store.read_bytes()
    args = ("info", str(store)) if command == "info" else ("precompute", "--model", "tiny-llama", "--store", str(store))
    line = _one_error_line(_cli(*args))
    assert needle in line and "delete it" in line
    assert store.read_bytes() == before


def test_a_full_disk_while_saving_is_one_line_and_the_store_stays_intact(
        tiny_store: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """ENOSPC while the run is made durable (simulated in-process: no tmpfs without privileges): one error line,
    status 2, the live store byte for byte as before."""
    import errno

    from backend.cli import main
    from backend.store import access

    store = tmp_path / "s.duckdb"
    store.write_bytes(tiny_store.read_bytes())
    before = store.read_bytes()

    def full(fd: int) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(access.os, "fsync", full)
    rc = main(["graph", "--store", str(store), "--model", "tiny-llama", "--prompt", "Mary and John went to",
               "--faithfulness", "none", "--save"])
    monkeypatch.undo()
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert rc == 2 and len(lines) == 1 and "free some disk space" in lines[0] and "Traceback" not in err
    assert store.read_bytes() == before
    assert not any(p.name.endswith(".tmp") for p in tmp_path.iterdir())


# ---------------------------------------------------------------------------------------------------------------
# Fuzzing: whatever the option strings, the CLI answers with one `error:` line and status 2 (here every valid value
# still ends at a store that cannot be written, so no run starts), never a traceback


def _in_process(argv: list[str]) -> tuple[int, str]:
    import contextlib
    import io

    from backend.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main(argv)
    return rc, err.getvalue()


def test_cli_options_fuzzed() -> None:
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as hs

    layer_specs = hs.one_of(
        hs.text(max_size=20),
        hs.from_regex(r"\A(spread:-?[0-9]{0,20}|[0-9 ,²٣-]{0,20}|all)\Z"),
    )
    numbers = hs.one_of(hs.text(max_size=12), hs.integers(-10**20, 10**20).map(str),
                        hs.sampled_from(["nan", "inf", "-0", "1e3", "0x10", "1_0", "²", " 7 "]))

    @settings(max_examples=150, deadline=None, derandomize=True, database=None,
              suppress_health_check=[HealthCheck.too_slow])
    @given(layers=layer_specs, contexts=numbers, threshold=numbers)
    def check(layers: str, contexts: str, threshold: str) -> None:
        for argv in (["precompute", "--model", "tiny-llama", "--store", "/sys/x.duckdb", "--layers", layers,
                      "--contexts", contexts],
                     ["graph", "--store", "/proc/none/x.duckdb", "--prompt", "x", "--max-nodes", contexts,
                      "--node-threshold", threshold]):
            if any("\x00" in a for a in argv):
                continue  # a NUL byte cannot reach a real process's argv
            rc, err = _in_process(argv)
            lines = err.strip().splitlines()
            assert rc == 2 and len(lines) == 1 and lines[0].startswith("error: "), (argv, err)

    check()
