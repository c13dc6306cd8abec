"""Comparing two stores table by table, leaving out what differs between equal runs by nature: run ids, wall-clock
timestamps and timings (columns and JSON keys)."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

import duckdb

SKIPPED_COLUMNS = {"run_id", "created_at", "started_at", "finished_at", "seconds"}
# JSON keys that hold wall-clock measurements or the run id (anywhere in a nested value), and whether a step reused
# activations an earlier step gathered in memory (a resumed run gathers them again: same values, another path).
_TIMING_KEY = re.compile(r"(^|_)(seconds|second|s|time|timings|run_id|created_at)$|_s$|per_second|^seconds_")


def _strip(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _strip(v) for k, v in value.items()
                if not _TIMING_KEY.search(str(k)) and k != "reused_activations"}
    if isinstance(value, list):
        return [_strip(v) for v in value]
    return value


def _cell(value: Any) -> Any:
    if isinstance(value, str) and value[:1] in "{[":
        try:
            return _strip(json.loads(value))
        except ValueError:
            return value
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value)
    return value


def store_tables(path: Path) -> dict[str, list[tuple[Any, ...]]]:
    """Every table of the store at ``path`` as sorted rows, without :data:`SKIPPED_COLUMNS` and timing JSON keys."""
    con = duckdb.connect(str(path), read_only=True)
    try:
        out: dict[str, list[tuple[Any, ...]]] = {}
        for (table,) in con.execute("SELECT table_name FROM duckdb_tables() ORDER BY 1").fetchall():
            cols = [r[0] for r in con.execute(
                "SELECT column_name FROM information_schema.columns WHERE table_name = ? ORDER BY ordinal_position",
                [table]).fetchall() if r[0] not in SKIPPED_COLUMNS]
            rows = con.execute(f'SELECT {", ".join(chr(34) + c + chr(34) for c in cols)} FROM "{table}"').fetchall()
            if table == "meta":
                rows = [r for r in rows if r[0] != "created_at"]
            out[table] = sorted((tuple(_cell(v) for v in r) for r in rows), key=repr)
        return out
    finally:
        con.close()


def differences(a: Any, b: Any, rel: float = 0.0, where: str = "", abs_tol: float = 0.0) -> list[str]:
    """Where ``a`` and ``b`` differ (floats within ``rel`` relative or ``abs_tol`` absolute tolerance count as
    equal)."""
    if isinstance(a, float) and isinstance(b, float):
        if (math.isnan(a) and math.isnan(b)) or a == b or math.isclose(a, b, rel_tol=rel, abs_tol=abs_tol):
            return []
        return [f"{where}: {a!r} != {b!r}"]
    if isinstance(a, dict) and isinstance(b, dict):
        if set(a) != set(b):
            return [f"{where}: keys {sorted(set(a) ^ set(b))} differ"]
        return [d for k in a for d in differences(a[k], b[k], rel, f"{where}.{k}", abs_tol)]
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        if len(a) != len(b):
            return [f"{where}: {len(a)} != {len(b)} items"]
        out: list[str] = []
        for i, (x, y) in enumerate(zip(a, b)):
            out += differences(x, y, rel, f"{where}[{i}]", abs_tol)
            if len(out) > 5:
                break
        return out
    return [] if a == b else [f"{where}: {str(a)[:80]!r} != {str(b)[:80]!r}"]


def assert_same_tables(got: Path, want: Path) -> None:
    """Every table of the two stores equal: exactly, except attribution-graph float32 values within float32 rounding
    between processes (1e-6 absolute or 1e-5 relative)."""
    a, b = store_tables(got), store_tables(want)
    assert set(a) == set(b)
    problems = [d for table in a
                for d in differences(a[table], b[table], *((1e-5, table, 1e-6) if table.startswith("graph") else
                                                           (0.0, table)))]
    assert not problems, problems[:10]
