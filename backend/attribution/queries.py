"""Store queries of the Attribution Faithfulness page and the ``attribute`` CLI (DuckDB SQL; no torch imported).

Every function takes a connection — a read-only store, or the in-memory database of a live comparison
(:func:`backend.attribution.compare.comparison_db`) — and returns plain pandas / Python values.

**Pearson r** of a method with activation patching is SQL ``corr()`` over the components of one kind, leaving out
the pairs where both scores are exactly 0: the components whose clean and corrupt activations are identical (every
method gives them exactly 0 by construction, so they would only flatter every estimate alike).
"""

from __future__ import annotations

import json
from typing import Any

import duckdb
import pandas as pd

_RUNS = "SELECT attr_id, method FROM attribution_runs WHERE comparison_id = ?"


def attribution_comparisons(con: duckdb.DuckDBPyConnection, model: str | None = None) -> pd.DataFrame:
    """The store's comparisons (built-in tasks first, then saved pairs, newest first) with their methods."""
    where, params = ("WHERE c.model = ?", [model]) if model else ("", [])
    return con.execute(
        f"SELECT c.comparison_id, c.task, c.model, c.metric_name, c.n_examples, c.clean_metric, c.corrupt_metric, "
        f"c.source, c.created_at, (SELECT string_agg(r.method, ', ' ORDER BY r.method) FROM attribution_runs r "
        f"WHERE r.comparison_id = c.comparison_id) AS methods "
        f"FROM attribution_comparisons c {where} "
        f"ORDER BY c.source <> 'precompute', c.created_at DESC, c.task", params).df()


def attribution_comparison(con: duckdb.DuckDBPyConnection, comparison_id: str) -> dict[str, Any] | None:
    """One comparison's row with its JSON columns decoded (prompts, token ids, params), or None."""
    df = con.execute("SELECT * FROM attribution_comparisons WHERE comparison_id = ?", [comparison_id]).df()
    if df.empty:
        return None
    row = df.iloc[0].to_dict()
    for col in ("clean_prompts", "corrupt_prompts", "params", "clean_tokens", "corrupt_tokens"):
        if isinstance(row.get(col), str):
            row[col] = json.loads(row[col])
    return row


def attribution_methods(con: duckdb.DuckDBPyConnection, comparison_id: str) -> pd.DataFrame:
    """Per method: wall time, patching's time divided by it (how many times faster), score count, parameters."""
    return con.execute(
        "SELECT r.method, r.seconds, "
        "  (SELECT p.seconds FROM attribution_runs p WHERE p.comparison_id = r.comparison_id "
        "   AND p.method = 'patching') / nullif(r.seconds, 0) AS speedup_vs_patching, "
        "  (SELECT count(*) FROM attributions a WHERE a.attr_id = r.attr_id) AS n_scores, r.params "
        "FROM attribution_runs r WHERE r.comparison_id = ? ORDER BY r.method = 'patching' DESC, r.method",
        [comparison_id]).df()


def attribution_scores(con: duckdb.DuckDBPyConnection, comparison_id: str, component: str | None = None
                       ) -> pd.DataFrame:
    """Scores of every method (long format: method, component, layer, head, pos, feature, score)."""
    extra, params = ("AND a.component = ?", [comparison_id, component]) if component else ("", [comparison_id])
    return con.execute(
        f"SELECT r.method, a.component, a.layer, a.head, a.pos, a.feature, a.score "
        f"FROM ({_RUNS}) r JOIN attributions a USING (attr_id) WHERE TRUE {extra} "
        f"ORDER BY r.method, a.component, a.layer, a.head, a.pos, a.feature", params).df()


def _pairs_sql() -> str:
    # Each estimate next to patching's score of the same component (NULL-safe join: head/pos/feature may be NULL).
    return (
        "WITH s AS (SELECT r.method, a.* FROM (" + _RUNS + ") r JOIN attributions a USING (attr_id)) "
        "SELECT e.method, e.component, e.layer, e.head, e.pos, e.feature, e.score AS estimate, p.score AS patching "
        "FROM s e JOIN s p ON p.method = 'patching' AND e.method <> 'patching' AND p.component = e.component "
        "AND p.layer = e.layer AND p.head IS NOT DISTINCT FROM e.head AND p.pos IS NOT DISTINCT FROM e.pos "
        "AND p.feature IS NOT DISTINCT FROM e.feature"
    )


def attribution_pairs(con: duckdb.DuckDBPyConnection, comparison_id: str, component: str | None = None
                      ) -> pd.DataFrame:
    """Every estimate beside activation patching's score of the same component (for scatter plots)."""
    extra, params = ("WHERE component = ?", [comparison_id, component]) if component else ("", [comparison_id])
    return con.execute(f"SELECT * FROM ({_pairs_sql()}) {extra} ORDER BY method, component, layer, head, pos, "
                       f"feature", params).df()


def attribution_pearson(con: duckdb.DuckDBPyConnection, comparison_id: str) -> pd.DataFrame:
    """Pearson r (SQL corr) of each method with activation patching, per component kind (see the module doc)."""
    return con.execute(
        f"SELECT method, component, corr(estimate, patching) AS pearson_r, count(*) AS n_components "
        f"FROM ({_pairs_sql()}) WHERE NOT (estimate = 0 AND patching = 0) "
        f"GROUP BY method, component ORDER BY component, method", [comparison_id]).df()


def attribution_tokens(con: duckdb.DuckDBPyConnection, comparison_id: str, example: int = 0) -> pd.DataFrame:
    """The clean and corrupt tokens of one example of a comparison: pos, clean / corrupt id and text."""
    row = attribution_comparison(con, comparison_id)
    if row is None or not row.get("clean_tokens"):
        return pd.DataFrame(columns=["pos", "clean_id", "clean", "corrupt_id", "corrupt"])
    clean = row["clean_tokens"][example]
    corrupt = row["corrupt_tokens"][example]
    frame = pd.DataFrame({"pos": range(len(clean)), "clean_id": clean, "corrupt_id": corrupt})
    con.register("_toks", frame)
    try:
        return con.execute(
            "SELECT t.pos, t.clean_id, coalesce(v1.token_str, '#' || t.clean_id) AS clean, t.corrupt_id, "
            "coalesce(v2.token_str, '#' || t.corrupt_id) AS corrupt FROM _toks t "
            "LEFT JOIN vocab v1 ON v1.model = ? AND v1.token_id = t.clean_id "
            "LEFT JOIN vocab v2 ON v2.model = ? AND v2.token_id = t.corrupt_id ORDER BY t.pos",
            [row["model"], row["model"]]).df()
    finally:
        con.unregister("_toks")
