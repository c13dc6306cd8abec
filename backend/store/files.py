"""What a database file is, checked before anything of it is read: the DuckDB magic bytes, and the user-defined views
and macros in its catalog (circuitscope never writes either; a file holding some is not one of its stores)."""

from __future__ import annotations

from pathlib import Path

import duckdb


def is_duckdb_file(path: Path) -> bool:
    """True when ``path`` starts like a DuckDB database file."""
    # DuckDB files carry the magic "DUCK" at byte 8; checking it first turns "not a store" into a clear message
    # without asking DuckDB to parse arbitrary bytes.
    try:
        with open(path, "rb") as fh:
            head = fh.read(16)
    except OSError:
        return False
    return len(head) >= 12 and head[8:12] == b"DUCK"


def views_and_macros(con: duckdb.DuckDBPyConnection) -> tuple[int, int]:
    """How many user-defined views and macros the connection's current database (the store) holds. Reads only
    DuckDB's catalog, never the objects themselves."""
    db = con.execute("SELECT current_database()").fetchall()[0][0]
    n_views = con.execute("SELECT count(*) FROM duckdb_views() WHERE NOT internal AND database_name = ?",
                          [db]).fetchall()[0][0]
    n_macros = con.execute("SELECT count(*) FROM duckdb_functions() WHERE NOT internal AND database_name = ?",
                           [db]).fetchall()[0][0]
    return int(n_views), int(n_macros)
