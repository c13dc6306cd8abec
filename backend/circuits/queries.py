"""SQL the Circuit Graph page runs besides reading graphs (:mod:`backend.circuits.storage`)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Sequence

if TYPE_CHECKING:
    import duckdb
    import pandas as pd


def graph_feature_examples(con: "duckdb.DuckDBPyConnection", model: str,
                           features: Sequence[tuple[str, int]], k: int = 3, window: int = 6) -> "pd.DataFrame":
    """Top ``k`` stored activating examples of each (dict_id, feature): rank, activation, the token it fires on
    and the ``window`` tokens before it — one query for a whole graph's hover texts. Features without stored
    examples (e.g. dictionaries the feature precompute did not cover) have no rows."""
    import pandas as pd

    pairs = pd.DataFrame(list(features), columns=["dict_id", "feature"]).drop_duplicates()
    if pairs.empty:
        return pd.DataFrame(columns=["dict_id", "feature", "rank", "act", "token", "context"])
    pairs["feature"] = pairs["feature"].astype("int64")
    con.register("_graph_pairs", pairs)
    try:
        return con.execute(
            """
            WITH ex AS (
                SELECT e.* FROM feature_examples e JOIN _graph_pairs p USING (dict_id, feature) WHERE e.rank <= ?
            )
            SELECT ex.dict_id, ex.feature, ex.rank, ex.act,
                   max(CASE WHEN t.pos = ex.pos THEN v.token_str END) AS token,
                   string_agg(v.token_str, '' ORDER BY t.pos) AS context
            FROM ex
            JOIN tokens t ON t.corpus_id = ex.corpus_id AND t.context_id = ex.context_id
                         AND t.pos BETWEEN ex.pos - ? AND ex.pos
            JOIN vocab v ON v.model = ? AND v.token_id = t.token_id
            GROUP BY ex.dict_id, ex.feature, ex.rank, ex.act
            ORDER BY ex.dict_id, ex.feature, ex.rank
            """, [int(k), int(window), model]).df()
    finally:
        con.unregister("_graph_pairs")


def dictionaries_with_features(con: "duckdb.DuckDBPyConnection") -> list[str]:
    """Dictionary ids whose features have stored dashboards (the Feature Browser can open them)."""
    return [r[0] for r in con.execute("SELECT DISTINCT dict_id FROM features ORDER BY dict_id").fetchall()]


def replacement_quality(con: "duckdb.DuckDBPyConnection", model: str) -> dict[str, Any] | None:
    """The latest all-MLPs-replaced evaluation of ``model``'s transcoders (None if there is none)."""
    rows = con.execute("SELECT e.n_replaced, e.ce_clean, e.ce_replaced, e.ce_ablated, e.ce_loss_recovered, e.ce_tokens "
                       "FROM replacement_evals e LEFT JOIN runs r USING (run_id) WHERE e.model = ? "
                       "AND coalesce(e.replacement, 'transcoder') = 'transcoder' "
                       "ORDER BY r.started_at DESC NULLS LAST, e.eval_id LIMIT 1", [model]).fetchall()
    if not rows:
        return None
    keys = ("n_replaced", "ce_clean", "ce_replaced", "ce_ablated", "ce_loss_recovered", "ce_tokens")
    return dict(zip(keys, rows[0]))
