"""Read queries for the Head Polysemanticity page (DuckDB SQL over the tables written by :mod:`backend.heads.polysemanticity`).

Pages call them through the store cache: ``ctx.store.query(polysemanticity_queries.head_polysemanticity_heads, model)``.
:func:`token_profiles` is also what the precompute step clusters on, so the page shows exactly the token pairs
the families were built from. Every query returns empty results (never an error) on a store that predates these
tables, so pages can say what is missing instead of failing.
"""

from __future__ import annotations

import json
from typing import Any, Sequence

import duckdb
import pandas as pd

from backend.store.access import frame

_TABLES = ("head_polysemanticity", "head_features")



def has_head_tables(con: duckdb.DuckDBPyConnection) -> bool:
    """True if the store's schema has the head-polysemanticity tables (schema v2+; v1 stores lack them)."""
    names = {r[0] for r in con.execute(
        "SELECT table_name FROM information_schema.tables WHERE table_catalog = current_database()").fetchall()}
    return all(t in names for t in _TABLES)


# A feature's token profile: the (previous token, activating token) pairs of its stored top activations, counted.
_PROFILE_SQL = """
    SELECT e.dict_id, e.feature, p.token_id AS prev_id, t.token_id, count(*)::INTEGER AS n
    FROM feature_examples e
    JOIN tokens t ON t.corpus_id = e.corpus_id AND t.context_id = e.context_id AND t.pos = e.pos
    JOIN tokens p ON p.corpus_id = e.corpus_id AND p.context_id = e.context_id AND p.pos = e.pos - 1
    WHERE e.dict_id = ? AND list_contains(?::INTEGER[], e.feature)
    GROUP BY e.dict_id, e.feature, p.token_id, t.token_id"""


def token_profiles(con: duckdb.DuckDBPyConnection, dict_id: str, features: Sequence[int]) -> pd.DataFrame:
    """The (previous token, activating token) pairs of each feature's stored top activations, with counts:
    feature, prev_id, token_id, n (most frequent pair first). BOS is never an activating position, so the
    previous position always exists."""
    return frame(con, f"SELECT feature, prev_id, token_id, n FROM ({_PROFILE_SQL}) "
                    "ORDER BY feature, n DESC, prev_id, token_id", [dict_id, [int(f) for f in features]])


def head_polysemanticity_heads(con: duckdb.DuckDBPyConnection, model: str | None = None) -> pd.DataFrame:
    """One row per (dictionary, head) that was analysed: dict_id, model, layer, head, n_dominant, n_judged,
    n_families, n_singletons, polysemantic (NULL: not judged) and stats (dict, parsed from JSON)."""
    if not has_head_tables(con):
        return pd.DataFrame(columns=["dict_id", "model", "layer", "head", "n_dominant", "n_judged", "n_families",
                                     "n_singletons", "polysemantic", "stats"])
    where, params = ("WHERE d.model = ?", [model]) if model else ("", [])
    df = frame(con, f"""
        SELECT p.dict_id, d.model, p.layer, p.head, p.n_dominant, p.n_judged, p.n_families, p.n_singletons,
               p.polysemantic, p.stats
        FROM head_polysemanticity p JOIN dictionaries d USING (dict_id) {where}
        ORDER BY d.model, p.layer, p.dict_id, p.head""", params)
    df["stats"] = [json.loads(s) if isinstance(s, str) else (s or {}) for s in df["stats"]]
    return df


def polysemanticity_headline(con: duckdb.DuckDBPyConnection, model: str | None = None) -> dict[str, Any]:
    """The headline: heads analysed, heads judged (enough dominant features), polysemantic heads among them and
    their fraction (None when no head could be judged)."""
    if not has_head_tables(con):
        return {"heads": 0, "judged": 0, "polysemantic": 0, "fraction": None}
    where, params = ("WHERE d.model = ?", [model]) if model else ("", [])
    heads, judged, poly = con.execute(f"""
        SELECT count(*), count(p.polysemantic), coalesce(sum(p.polysemantic::INTEGER), 0)
        FROM head_polysemanticity p JOIN dictionaries d USING (dict_id) {where}""", params).fetchall()[0]
    return {"heads": int(heads), "judged": int(judged), "polysemantic": int(poly),
            "fraction": (int(poly) / int(judged)) if judged else None}


def head_features(con: duckdb.DuckDBPyConnection, dict_id: str, head: int) -> pd.DataFrame:
    """The features ``head`` dominates, by share (rank 1 first): feature, share, family (NULL beyond the judged
    top features), rank, n_active, density, max_act."""
    if not has_head_tables(con):
        return pd.DataFrame(columns=["feature", "share", "family", "rank", "n_active", "density", "max_act"])
    return frame(con, """
        SELECT h.feature, h.share, h.family, h.rank, f.n_active, f.density, f.max_act
        FROM head_features h LEFT JOIN features f ON f.dict_id = h.dict_id AND f.feature = h.feature
        WHERE h.dict_id = ? AND h.head = ?
        ORDER BY h.rank""", [dict_id, int(head)])


def head_feature_tokens(con: duckdb.DuckDBPyConnection, dict_id: str, head: int, k: int = 3) -> pd.DataFrame:
    """Token profiles of the head's judged features (those with a family), as text: one row per feature with its k
    most frequent activating tokens, previous tokens and (previous, activating) pairs among its top activations:
    feature, tokens, token_n, prevs, prev_n, pair_prevs, pair_tokens, pair_n (lists, most frequent first)."""
    cols = ["feature", "tokens", "token_n", "prevs", "prev_n", "pair_prevs", "pair_tokens", "pair_n"]
    if not has_head_tables(con):
        return pd.DataFrame(columns=cols)
    feats = [int(f) for f, in con.execute(
        "SELECT feature FROM head_features WHERE dict_id = ? AND head = ? AND family IS NOT NULL",
        [dict_id, int(head)]).fetchall()]
    k = int(k)
    return frame(con, f"""
        WITH p AS (
            SELECT p.feature, p.n, coalesce(vp.token_str, '') AS prev_str, coalesce(vt.token_str, '') AS token_str,
                   p.prev_id, p.token_id
            FROM ({_PROFILE_SQL}) p
            JOIN dictionaries d ON d.dict_id = p.dict_id
            LEFT JOIN vocab vp ON vp.model = d.model AND vp.token_id = p.prev_id
            LEFT JOIN vocab vt ON vt.model = d.model AND vt.token_id = p.token_id),
        tok AS (SELECT feature, token_id, any_value(token_str) AS s, sum(n)::INTEGER AS n FROM p GROUP BY ALL),
        prv AS (SELECT feature, prev_id, any_value(prev_str) AS s, sum(n)::INTEGER AS n FROM p GROUP BY ALL),
        t AS (SELECT feature, list(s ORDER BY n DESC, token_id)[1:{k}] AS tokens,
                     list(n ORDER BY n DESC, token_id)[1:{k}] AS token_n FROM tok GROUP BY feature),
        v AS (SELECT feature, list(s ORDER BY n DESC, prev_id)[1:{k}] AS prevs,
                     list(n ORDER BY n DESC, prev_id)[1:{k}] AS prev_n FROM prv GROUP BY feature),
        b AS (SELECT feature, list(prev_str ORDER BY n DESC, prev_id, token_id)[1:{k}] AS pair_prevs,
                     list(token_str ORDER BY n DESC, prev_id, token_id)[1:{k}] AS pair_tokens,
                     list(n ORDER BY n DESC, prev_id, token_id)[1:{k}] AS pair_n FROM p GROUP BY feature)
        SELECT t.feature, tokens, token_n, prevs, prev_n, pair_prevs, pair_tokens, pair_n
        FROM t JOIN v USING (feature) JOIN b USING (feature) ORDER BY t.feature""",
        [dict_id, feats])
