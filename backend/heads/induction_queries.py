"""Read queries for the Induction Heads page (DuckDB SQL over the tables written by :mod:`backend.heads.induction`).

Pages call them through the store cache: ``ctx.store.query(induction_queries.head_scores, model)``. Heads are
named ``"L.H"`` strings in arguments (hashable, so cached queries can take a tuple of them).
"""

from __future__ import annotations

import json
from typing import Any, Sequence

import duckdb
import pandas as pd

from backend.store.access import frame

# Numbers of the classification rule kept in induction_classes.stats (backend.heads.induction.classify_heads).
_CLASS_STATS = {
    "induction": "DOUBLE", "control_attention": "DOUBLE", "attention_k1": "DOUBLE", "attention_kmax": "DOUBLE",
    "excess_k1": "DOUBLE", "plateau": "DOUBLE", "ratio": "DOUBLE", "k_half": "INTEGER", "long_share": "DOUBLE",
    "competition_long_attention": "DOUBLE", "competition_short_attention": "DOUBLE",
    "direct_effect_k1": "DOUBLE", "direct_effect_kmax": "DOUBLE", "rank": "INTEGER",
}



def _parse_heads(heads: Sequence[str]) -> list[tuple[int, int]]:
    out = []
    for h in heads:
        layer, head = str(h).split(".")
        out.append((int(layer), int(head)))
    return out


def induction_counts(con: duckdb.DuckDBPyConnection, model: str) -> dict[str, int]:
    """Rows of the three induction tables for ``model`` (all zero in a store built before the induction step)."""
    return {table: int(con.execute(f"SELECT count(*) FROM {table} WHERE model = ?", [model]).fetchall()[0][0])
            for table in ("head_scores", "induction_prefix", "induction_classes")}


def head_scores(con: duckdb.DuckDBPyConnection, model: str) -> pd.DataFrame:
    """Per-head scores on repeated random tokens: layer, head, induction, prev_token, duplicate_token, n_sequences,
    seq_len (tokens per repeat sequence, BOS included), ordered by layer and head."""
    return frame(con, "SELECT layer, head, induction, prev_token, duplicate_token, n_sequences, seq_len "
                    "FROM head_scores WHERE model = ? ORDER BY layer, head", [model])


def induction_classes(con: duckdb.DuckDBPyConnection, model: str) -> pd.DataFrame:
    """The classified candidate heads, best induction score first: layer, head, head_class and the rule's numbers
    (one column per entry of :data:`_CLASS_STATS`)."""
    cols = ", ".join(f"TRY_CAST(stats->>'{key}' AS {kind}) AS {key}" for key, kind in _CLASS_STATS.items())
    return frame(con, f"SELECT layer, head, head_class, {cols} FROM induction_classes WHERE model = ? "
                    f"ORDER BY rank, layer, head", [model])


def induction_rule(con: duckdb.DuckDBPyConnection, model: str) -> dict[str, Any]:
    """``{"rule": text, "params": {...}, "thresholds": {...}}`` stored with the classification (empty if none)."""
    rows = con.execute("SELECT stats->>'rule', stats->'params', stats->'thresholds' FROM induction_classes "
                       "WHERE model = ? LIMIT 1", [model]).fetchall()
    if not rows:
        return {}
    rule, params, thresholds = rows[0]
    return {"rule": rule, "params": json.loads(params) if params else {},
            "thresholds": json.loads(thresholds) if thresholds else {}}


def induction_prefix_curves(con: duckdb.DuckDBPyConnection, model: str, heads: Sequence[str]) -> pd.DataFrame:
    """Attention to the induction target and direct effect vs matching-prefix length for ``heads`` ("L.H"):
    head ("L.H"), layer, head_index, condition, prefix_len, attention, direct_effect, n_sequences, seq_len."""
    pairs = _parse_heads(heads)
    if not pairs:
        return pd.DataFrame(columns=["head", "layer", "head_index", "condition", "prefix_len", "attention",
                                     "direct_effect", "n_sequences", "seq_len"])
    con.register("_wanted", pd.DataFrame(pairs, columns=["layer", "head"]))
    try:
        return frame(con, """
            SELECT p.layer || '.' || p.head AS head, p.layer, p.head AS head_index, p.condition, p.prefix_len,
                   p.attention, p.direct_effect, p.n_sequences, p.seq_len
            FROM induction_prefix p JOIN _wanted w ON w.layer = p.layer AND w.head = p.head
            WHERE p.model = ? ORDER BY p.layer, p.head, p.condition, p.prefix_len""", [model])
    finally:
        con.unregister("_wanted")
