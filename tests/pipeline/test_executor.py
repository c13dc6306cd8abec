"""The Ray executor (``precompute --executor ray``): the tiny-model precompute with per-layer training and evaluation
and feature-scoring shards as Ray tasks on a local Ray (2 CPUs) writes the same tables as the local executor.

Compared exactly (every column but run ids, timestamps and timings), except the attribution graphs' float32 values,
which differ between processes by float32 rounding (see tests/pipeline/test_resume.py): a Ray worker is another
process with its own copy of the model, loaded by name.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator

import pytest
from store_tables import differences, store_tables
from tiny_stores import TEST_MODEL

from backend.errors import InputError
from backend.pipeline.executor import LocalExecutor, check_executor


@pytest.fixture
def no_ray_left() -> Iterator[None]:
    """Shut down any Ray this test started, whatever happens in it."""
    yield
    import ray

    if ray.is_initialized():
        ray.shutdown()


@pytest.mark.timeout(1800)  # a local Ray, worker processes loading the model: minutes on a busy 2-core machine
def test_the_ray_executor_writes_what_the_local_one_writes(tmp_path: Path, tiny_store: Path, no_ray_left: None) -> None:
    import ray

    from backend.pipeline.run import precompute

    store = tmp_path / "ray.duckdb"
    precompute(TEST_MODEL, store, preset="demo", n_contexts=8, executor="ray")
    assert not ray.is_initialized()  # the local Ray it started is shut down
    a, b = store_tables(store), store_tables(tiny_store)  # tiny_store: the same run with the local executor
    assert set(a) == set(b)
    problems = [d for table in a
                for d in differences(a[table], b[table], *((1e-5, table, 1e-6) if table.startswith("graph") else
                                                           (0.0, table)))]
    assert not problems, problems[:10]


def test_executors_map_in_order_and_options_are_checked(no_ray_left: None) -> None:
    from backend.pipeline.executor import RayExecutor

    # json.dumps as the unit of work: a function Ray workers import by reference (tests are not on their path)
    items = [{"b": i, "a": -i} for i in range(4)]
    want = [json.dumps(item, sort_keys=True) for item in items]
    assert list(LocalExecutor().imap(json.dumps, items, sort_keys=True)) == want
    ray_ex = RayExecutor(num_cpus=2)
    try:
        assert list(ray_ex.imap(json.dumps, items, sort_keys=True)) == want
        assert ray_ex.split([3, 4]) == [[3], [4]] and LocalExecutor().split([3, 4]) == [[3, 4]]
    finally:
        ray_ex.close()
    with pytest.raises(InputError, match="Unknown executor"):
        check_executor("dask")
    with pytest.raises(InputError, match="--ray-address is for --executor ray"):
        check_executor("local", "127.0.0.1:6379")
    with pytest.raises(InputError, match="No Ray cluster answers at --ray-address '127.0.0.1:1'"):
        check_executor("ray", "127.0.0.1:1")  # nothing listens on port 1: refused at once, before any work


def test_the_local_executor_does_not_import_ray() -> None:
    import subprocess
    import sys

    code = ("import sys; from backend.pipeline import run; from backend.pipeline.executor import make_executor; "
            "make_executor('local'); print('ray' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parents[2])
    assert out.stdout.strip() == "False"
