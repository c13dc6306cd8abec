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
