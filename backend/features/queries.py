"""Read queries for the Feature Browser (DuckDB SQL over the tables written by :mod:`backend.features.step`).

Pages call them through the store cache: ``ctx.store.query(feature_queries.feature_summary, dict_id, i)``.
A feature page reads only rows of one (dict_id, feature): every such table is indexed on that pair, and
``feature_activations`` is stored sorted by (dict_id, feature, act DESC), so its zone maps skip other features.
BOS (position 0) is never scored: example windows show it with a NaN activation.
"""

from __future__ import annotations

from typing import Any

import duckdb
import pandas as pd

from backend.store.access import frame

WINDOW_BEFORE = 24  # tokens shown before the max-activating token of an example
WINDOW_AFTER = 8  # ... and after it
TOP_CANDIDATES = 200  # largest activations of a feature considered for its distinct top examples
# A feature firing on more than this share of scored tokens is flagged dense: at one token in ten it fires on most
# sentences, so its top examples say little about what it detects (docs/methods.md, "Dense and outlier features").
DENSE_ABOVE = 0.10
# Flagged as an outlier when its max activation exceeds this multiple of its second-largest one (and it fired at least
# OUTLIER_MIN_ACTIVE times): the colour scale of its examples is then set by one token far above every other, and that
# token may be a glitch (docs/methods.md).
OUTLIER_RATIO = 2.0
OUTLIER_MIN_ACTIVE = 20


def distinct_neighbourhoods(candidates: str, span: int, group: str = "") -> str:
    """SQL keeping, of ``candidates`` (SQL yielding ``rank`` (1 = largest), corpus_id, context_id, pos, ... and the
    ``group`` columns, e.g. ``"dict_id, feature, "``), only rows with no better-ranked candidate of the same group in
    the same context within ``span`` positions: token windows of ``span + 1`` tokens around the kept rows never
    overlap, so one passage yields one example (as SAEDashboard keeps one example per neighbourhood).

    A row is dropped when any better-ranked candidate is near, kept or not: the result may hold fewer rows than a
    greedy pass would keep, never two overlapping ones."""
    on = " AND ".join([f"b.{c.strip()} = a.{c.strip()}" for c in group.split(",") if c.strip()]
                      + ["b.corpus_id = a.corpus_id", "b.context_id = a.context_id"])
    return f"""
        SELECT a.* FROM ({candidates}) a
        WHERE NOT EXISTS (SELECT 1 FROM ({candidates}) b
                          WHERE {on} AND b.rank < a.rank AND abs(b.pos - a.pos) <= {int(span)})"""



def feature_dictionaries(con: duckdb.DuckDBPyConnection, kind: str | None = None) -> pd.DataFrame:
    """Dictionaries with feature tables (attention SAEs first, then transcoders; by layer), or only those of
    ``kind`` ('attn_sae' / 'transcoder'): dict_id, model, kind, layer, d_sae, n_heads, n_features, n_alive, ... ."""
    # One pass over `features` grouped by dictionary (not three correlated subqueries per dictionary), and the JSON
    # parsed once per dictionary: every feature row of a dictionary carries the same stats.
    return frame(con, """
        SELECT d.dict_id, d.model, d.kind, d.layer, d.architecture, d.d_in, d.d_sae, d.l0, d.fve, m.n_heads,
               coalesce(f.n_features, 0) AS n_features, coalesce(f.n_alive, 0) AS n_alive, f.scored_tokens
        FROM dictionaries d LEFT JOIN models m ON m.model = d.model
        LEFT JOIN (SELECT dict_id, count(*) AS n_features, count(*) FILTER (WHERE n_active > 0) AS n_alive,
                          json_extract(any_value(stats), '$.scored_tokens')::BIGINT AS scored_tokens
                   FROM features GROUP BY dict_id) f ON f.dict_id = d.dict_id
        WHERE d.kind IN ('attn_sae', 'transcoder') AND (? IS NULL OR d.kind = ?)
        ORDER BY d.model, d.kind = 'transcoder', d.layer, d.dict_id""", [kind, kind])


def feature_summary(con: duckdb.DuckDBPyConnection, dict_id: str, feature: int) -> dict[str, Any] | None:
    """One feature's statistics (density over non-BOS tokens, max / mean-when-active activation, dominant head),
    or None if the dictionary has no such feature."""
    df = frame(con, """
        SELECT f.dict_id, f.feature, f.n_active, f.density, f.max_act, f.mean_act, f.top_head, f.top_head_share,
               d.layer, d.model, d.d_sae, d.architecture, d.kind,
               json_extract(f.stats, '$.scored_tokens')::BIGINT AS scored_tokens
        FROM features f JOIN dictionaries d USING (dict_id) WHERE f.dict_id = ? AND f.feature = ?""",
        [dict_id, int(feature)])
    return None if df.empty else df.iloc[0].to_dict()


def _windows(con: duckdb.DuckDBPyConnection, dict_id: str, feature: int, centres: str, before: int,
             after: int) -> pd.DataFrame:
    """Token windows around example positions (``centres``: SQL yielding ex, corpus_id, context_id, pos, act, its
    parameters named ``$dict`` / ``$feature``), each with the token texts and this feature's activation at every token
    (0 where it does not fire, NaN at BOS: not scored)."""
    return con.execute(f"""
        WITH ex AS ({centres}),
        win AS (
            SELECT ex.ex, ex.act AS max_act, ex.context_id, ex.pos AS max_pos, t.pos, v.token_str,
                   CASE WHEN t.pos = 0 THEN 'NaN'::REAL ELSE coalesce(a.act, 0) END AS act
            FROM ex
            JOIN tokens t ON t.corpus_id = ex.corpus_id AND t.context_id = ex.context_id
                         AND t.pos BETWEEN ex.pos - {int(before)} AND ex.pos + {int(after)}
            JOIN corpora c ON c.corpus_id = ex.corpus_id
            LEFT JOIN vocab v ON v.model = c.model AND v.token_id = t.token_id
            LEFT JOIN (SELECT corpus_id, context_id, pos, act FROM feature_activations
                       WHERE dict_id = $dict AND feature = $feature) a
                   ON a.corpus_id = ex.corpus_id AND a.context_id = ex.context_id AND a.pos = t.pos)
        SELECT ex, any_value(max_act) AS act, any_value(context_id) AS context_id, any_value(max_pos) AS pos,
               list(coalesce(token_str, '') ORDER BY pos) AS tokens, list(act ORDER BY pos) AS acts,
               list(pos ORDER BY pos) AS positions
        FROM win GROUP BY ex ORDER BY ex""", {"dict": dict_id, "feature": int(feature)}).df()


def feature_top_examples(con: duckdb.DuckDBPyConnection, dict_id: str, feature: int, k: int = 10,
                         before: int = WINDOW_BEFORE, after: int = WINDOW_AFTER) -> pd.DataFrame:
    """The feature's k largest activations in distinct passages (rank 1 first): of its :data:`TOP_CANDIDATES`
    largest activations, one per neighbourhood (:func:`distinct_neighbourhoods`: no two shown windows overlap),
    with act, context_id, pos and the token window around it (columns tokens, acts, positions are lists)."""
    candidates = ("SELECT row_number() OVER (ORDER BY act DESC, context_id, pos) AS rank, corpus_id, context_id, "
                  "pos, act FROM (SELECT corpus_id, context_id, pos, act FROM feature_activations "
                  f"WHERE dict_id = $dict AND feature = $feature ORDER BY act DESC LIMIT {TOP_CANDIDATES})")
    kept = distinct_neighbourhoods(candidates, int(before) + int(after))
    centres = (f"SELECT row_number() OVER (ORDER BY rank) AS ex, corpus_id, context_id, pos, act FROM ({kept}) "
               f"QUALIFY ex <= {int(k)}")
    return _windows(con, dict_id, feature, centres, before, after)


def feature_quantile_examples(con: duckdb.DuckDBPyConnection, dict_id: str, feature: int, n_intervals: int = 5,
                              per_interval: int = 3, before: int = WINDOW_BEFORE,
                              after: int = WINDOW_AFTER) -> pd.DataFrame:
    """Examples from equal-width activation intervals (0, max] split into ``n_intervals`` (as in Anthropic's and
    Neuronpedia's dashboards): up to ``per_interval`` per interval, picked by a fixed hash (reproducible, spread
    over the corpus). Column ``interval`` (0 = lowest) plus the window columns of :func:`feature_top_examples`."""
    centres = f"""
        SELECT (interval * 1000 + row_number() OVER (PARTITION BY interval ORDER BY h)) AS ex,
               corpus_id, context_id, pos, act
        FROM (SELECT corpus_id, context_id, pos, act, hash(context_id, pos) AS h,
                     least(floor(act / max(act) OVER () * {int(n_intervals)}), {int(n_intervals) - 1})::INTEGER
                         AS interval
              FROM feature_activations WHERE dict_id = $dict AND feature = $feature)
        QUALIFY row_number() OVER (PARTITION BY interval ORDER BY h) <= {int(per_interval)}"""
    df = _windows(con, dict_id, feature, centres, before, after)
    df.insert(0, "interval", (df["ex"] // 1000).astype(int))
    return df.sort_values(["interval", "act"], ascending=[False, False]).reset_index(drop=True)


def feature_histogram(con: duckdb.DuckDBPyConnection, dict_id: str, feature: int) -> pd.DataFrame:
    """Log-binned histogram of the feature's nonzero activations: bin, lo, hi, count."""
    return frame(con, "SELECT bin, lo, hi, count FROM feature_histograms WHERE dict_id = ? AND feature = ? ORDER BY bin",
               [dict_id, int(feature)])


def feature_logits(con: duckdb.DuckDBPyConnection, dict_id: str, feature: int) -> pd.DataFrame:
    """Top promoted and suppressed output tokens: kind, rank, token_id, token_str, value (logits per unit act)."""
    return frame(con, """
        SELECT l.kind, l.rank, l.token_id, coalesce(v.token_str, '') AS token_str, l.value
        FROM feature_logits l JOIN dictionaries d USING (dict_id)
        LEFT JOIN vocab v ON v.model = d.model AND v.token_id = l.token_id
        WHERE l.dict_id = ? AND l.feature = ? ORDER BY l.kind, l.rank""", [dict_id, int(feature)])


def feature_head_dfa(con: duckdb.DuckDBPyConnection, dict_id: str, feature: int) -> pd.DataFrame:
    """DFA by head over the feature's top activations: head, contribution (mean, signed), share, n_examples."""
    return frame(con, "SELECT head, contribution, share, n_examples FROM feature_head_dfa "
                    "WHERE dict_id = ? AND feature = ? ORDER BY head", [dict_id, int(feature)])


_LIST_COLS = "feature, n_active, density, max_act, mean_act, top_head, top_head_share"


def features_by_layer(con: duckdb.DuckDBPyConnection, dict_id: str, order: str = "max_act",
                      limit: int = 200) -> pd.DataFrame:
    """The dictionary's live features, sorted by ``order`` (max_act, density or top_head_share), largest first."""
    if order not in ("max_act", "density", "top_head_share", "mean_act"):
        order = "max_act"
    return frame(con, f"SELECT {_LIST_COLS} FROM features WHERE dict_id = ? AND n_active > 0 "
                    f"ORDER BY {order} DESC NULLS LAST, feature LIMIT ?", [dict_id, int(limit)])


def features_by_head(con: duckdb.DuckDBPyConnection, dict_id: str, head: int, limit: int = 200) -> pd.DataFrame:
    """Features whose dominant head (largest DFA share) is ``head``, most head-specific first."""
    return frame(con, f"SELECT {_LIST_COLS} FROM features WHERE dict_id = ? AND top_head = ? AND n_active > 0 "
                    f"ORDER BY top_head_share DESC, max_act DESC LIMIT ?", [dict_id, int(head), int(limit)])


def feature_flags(con: duckdb.DuckDBPyConnection, dict_id: str, feature: int) -> dict[str, Any]:
    """Warnings for a feature's dashboard: ``dense`` (density above :data:`DENSE_ABOVE`), ``outlier`` (max activation
    above :data:`OUTLIER_RATIO` times ``second``, its second-largest activation, when it fired at least
    :data:`OUTLIER_MIN_ACTIVE` times), with the figures."""
    rows = con.execute("""
        SELECT f.density, f.max_act, f.n_active, (SELECT max(e.act) FROM feature_examples e
                                                  WHERE e.dict_id = f.dict_id AND e.feature = f.feature
                                                    AND e.rank = 2) AS second
        FROM features f WHERE f.dict_id = ? AND f.feature = ?""", [dict_id, int(feature)]).fetchall()
    density, max_act, n_active, second = rows[0] if rows else (None, None, 0, None)
    return {"dense": bool(density is not None and density > DENSE_ABOVE),
            "outlier": bool(second and (n_active or 0) >= OUTLIER_MIN_ACTIVE and max_act > OUTLIER_RATIO * second),
            "density": density, "max_act": max_act, "second": second}


def features_by_token(con: duckdb.DuckDBPyConnection, dict_id: str, text: str, limit: int = 200,
                      whole: bool = False) -> pd.DataFrame:
    """Features whose top examples fire ON a token whose text contains ``text`` (case-insensitive) — or, with
    ``whole``, IS ``text`` (case and surrounding whitespace ignored: " thou" finds "thou", not "though") — with how
    many of their top examples do (``hits``) and one such token (``token``)."""
    return frame(con, """
        SELECT f.feature, f.n_active, f.density, f.max_act, f.mean_act, f.top_head, f.top_head_share,
               h.hits, h.token
        FROM (SELECT e.feature, count(*) AS hits, any_value(v.token_str) AS token
              FROM feature_examples e
              JOIN dictionaries d ON d.dict_id = e.dict_id
              JOIN tokens t ON t.corpus_id = e.corpus_id AND t.context_id = e.context_id AND t.pos = e.pos
              JOIN vocab v ON v.model = d.model AND v.token_id = t.token_id
              WHERE e.dict_id = ? AND CASE WHEN ? THEN lower(trim(v.token_str, $blank)) = lower(trim(?, $blank))
                                           ELSE contains(lower(v.token_str), lower(?)) END
              GROUP BY e.feature) h
        JOIN features f ON f.dict_id = ? AND f.feature = h.feature
        ORDER BY h.hits DESC, f.max_act DESC LIMIT ?""".replace("$blank", "' ' || chr(9) || chr(10) || chr(13)"),
                 [dict_id, bool(whole), text, text, dict_id, int(limit)])
