"""Read-only store connections kept open between queries, one small pool per store version, for a long-lived server.

Opening a store (:func:`backend.store.access.open_store`: attach, refuse views and macros, check the schema, attach the
saves, lock the connection down) costs tens of milliseconds, several times what a feature page's queries take once the
store is open (``make bench``, ``features.queries``). A server therefore keeps a few opened connections per store
*version* and lends one to each query:

* A version is what :func:`backend.store.access.fingerprint` keys (the file's inode, mtime and size, and the saves'
  manifest). A new precompute swaps in a new file and a save rewrites the manifest, so either gives a new key and a
  fresh pool; the previous version's pool is retired (idle connections closed now, lent ones when they come back), so
  an old file is not kept open after its readers finish.
* A connection is lent to one caller at a time (a DuckDB connection is not for concurrent use); callers that find no
  idle connection open another, and at most :data:`IDLE` stay open afterwards.
* A connection whose query raised is closed, never lent again: its temporary state is unknown.

Every connection comes from ``open_store``, so each is as locked down as a fresh one and shows the saves the same way.
"""

from __future__ import annotations

import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import duckdb

from backend.store.access import open_store, read_errors

IDLE = 2  # idle connections kept per store version: a page runs its queries one after another, and each open
# connection keeps the blocks it has read cached (DuckDB frees them on close)


class ReaderPool:
    """Open read-only connections to one version of one store."""

    def __init__(self, path: str | Path, key: tuple[int, ...]):
        self.path, self.key = Path(path), key
        self._idle: list[duckdb.DuckDBPyConnection] = []
        self._lock = threading.Lock()
        self._retired = False

    @contextmanager
    def connection(self) -> Iterator[duckdb.DuckDBPyConnection]:
        """``with pool.connection() as con:`` — an open read-only connection for this caller alone; a DuckDB error in
        the block becomes one StoreError sentence, as with :func:`backend.store.access.reading`."""
        with self._lock:
            con = self._idle.pop() if self._idle else None
        if con is None:
            con = open_store(self.path)
        try:
            with read_errors(self.path):
                yield con
        except BaseException:
            con.close()
            raise
        with self._lock:
            if not self._retired and len(self._idle) < IDLE:
                self._idle.append(con)
                return
        con.close()

    def retire(self) -> None:
        """Close the idle connections; connections still lent are closed when they come back."""
        with self._lock:
            self._retired = True
            idle, self._idle = self._idle, []
        for con in idle:
            con.close()


_pools: dict[str, ReaderPool] = {}
_pools_lock = threading.Lock()


def pool(path: str | Path, key: tuple[int, ...]) -> ReaderPool:
    """The pool of the store at ``path`` in the version ``key`` (``fingerprint(path).key``); a pool of another version
    of the same path is retired."""
    name = str(path)
    with _pools_lock:
        current = _pools.get(name)
        if current is not None and current.key == key:
            return current
        _pools[name] = fresh = ReaderPool(path, key)
    if current is not None:
        current.retire()
    return fresh


def close_all() -> None:
    """Retire every pool (tests; a server closing down)."""
    with _pools_lock:
        pools = list(_pools.values())
        _pools.clear()
    for p in pools:
        p.retire()
