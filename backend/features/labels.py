"""Feature labels: an automatic short label per feature, computed offline from its stored statistics, and labels
users write, which are preferred wherever a label is shown.

* **Automatic** (:func:`automatic_labels`, one DuckDB query over ``feature_examples``, ``tokens``, ``vocab`` and
  ``feature_logits``): of the feature's top examples, one per passage (:func:`backend.features.queries.
  distinct_neighbourhoods`), the one or two tokens it fires on most often, the token before them when most examples
  share it, and the output token it promotes most, e.g. ``"Paris" / "London" after "of" → "France"``. It says what
  the feature's statistics show, not what it means: pages mark it as automatic. Written by the precompute's
  ``labels`` step, or added to an existing store by a small run of its own (:func:`label_store`, ``python -m backend
  label``): not a save, because a precompute folds saves in after its own steps, so labels saved earlier would
  replace the ones it just computed for retrained dictionaries.
* **User labels** (:func:`save_user_label`) are saves beside the store (``user_labels``, one row per feature, a newer
  save replacing an older one); an empty label removes the user's label.
* :func:`feature_label`, :func:`search_labels` and :func:`label_nodes` read the label a feature shows: the user's,
  else the automatic one.
"""

from __future__ import annotations

import unicodedata
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import pandas as pd

from backend.errors import InputError, literal
from backend.features.queries import WINDOW_AFTER, WINDOW_BEFORE, distinct_neighbourhoods
from backend.store.access import frame, saving

if TYPE_CHECKING:
    import duckdb

    from backend.pipeline.context import RunContext

MAX_LABEL_CHARS = 200  # a user label is a short name, not a note
CONTEXT_SHARE = 0.5  # "after X" when at least this share of the distinct top examples follow the same token
MAX_RESULTS = 500


def _shown(column: str) -> str:
    """SQL: a token's text for a label (trimmed; a whitespace-only token made visible)."""
    blank = "' ' || chr(9) || chr(10) || chr(13)"
    return (f"CASE WHEN trim({column}, {blank}) = '' THEN replace(replace(replace(replace({column}, chr(10), '⏎'), "
            f"chr(13), '↵'), chr(9), '→'), ' ', '␣') ELSE trim({column}, {blank}) END")


def automatic_labels(con: "duckdb.DuckDBPyConnection", dict_ids: Sequence[str] | None = None) -> pd.DataFrame:
    """The automatic label of every feature with stored top examples (of ``dict_ids``, default every dictionary):
    dict_id, feature, label, stats (JSON: the examples counted, the top tokens with their counts, the shared preceding
    token, the top promoted token)."""
    ids = None if dict_ids is None else [str(d) for d in dict_ids]
    candidates = """
        SELECT e.dict_id, e.feature, e.rank, e.corpus_id, e.context_id, e.pos, e.act FROM feature_examples e
        WHERE $ids IS NULL OR list_contains($ids, e.dict_id)"""
    distinct = distinct_neighbourhoods(candidates, WINDOW_BEFORE + WINDOW_AFTER, group="dict_id, feature")
    return frame(con, f"""
        WITH ex AS (
            SELECT x.dict_id, x.feature, x.act, {_shown('v.token_str')} AS tok, {_shown('pv.token_str')} AS prev
            FROM ({distinct}) x
            JOIN corpora c ON c.corpus_id = x.corpus_id
            JOIN tokens t ON t.corpus_id = x.corpus_id AND t.context_id = x.context_id AND t.pos = x.pos
            LEFT JOIN vocab v ON v.model = c.model AND v.token_id = t.token_id
            LEFT JOIN tokens pt ON pt.corpus_id = x.corpus_id AND pt.context_id = x.context_id AND pt.pos = x.pos - 1
            LEFT JOIN vocab pv ON pv.model = c.model AND pv.token_id = pt.token_id),
        n AS (SELECT dict_id, feature, count(*) AS n FROM ex GROUP BY ALL),
        toks AS (
            SELECT dict_id, feature, tok, count(*) AS k, max(act) AS m FROM ex
            WHERE tok IS NOT NULL GROUP BY dict_id, feature, tok
            QUALIFY row_number() OVER (PARTITION BY dict_id, feature ORDER BY k DESC, m DESC, tok) <= 2),
        top2 AS (
            SELECT dict_id, feature, list(tok ORDER BY k DESC, m DESC, tok) AS toks,
                   list(k ORDER BY k DESC, m DESC, tok) AS counts FROM toks GROUP BY ALL),
        prev AS (
            SELECT dict_id, feature, prev, count(*) AS k FROM ex WHERE prev IS NOT NULL
            GROUP BY dict_id, feature, prev
            QUALIFY row_number() OVER (PARTITION BY dict_id, feature ORDER BY k DESC, prev) = 1),
        promoted AS (
            SELECT l.dict_id, l.feature, {_shown('v.token_str')} AS promoted
            FROM feature_logits l JOIN dictionaries d USING (dict_id)
            JOIN vocab v ON v.model = d.model AND v.token_id = l.token_id
            WHERE l.kind = 'promoted' AND l.rank = 1 AND ($ids IS NULL OR list_contains($ids, l.dict_id)))
        SELECT n.dict_id, n.feature,
               '"' || t.toks[1] || '"'
               || CASE WHEN len(t.toks) > 1 AND t.counts[2] > 1 THEN ' / "' || t.toks[2] || '"' ELSE '' END
               || CASE WHEN p.k >= greatest(2, {CONTEXT_SHARE} * n.n) THEN ' after "' || p.prev || '"' ELSE '' END
               || coalesce(' → "' || g.promoted || '"', '') AS label,
               json_object('examples', n.n, 'tokens', t.toks, 'counts', t.counts,
                           'after', CASE WHEN p.k >= greatest(2, {CONTEXT_SHARE} * n.n) THEN p.prev END,
                           'after_count', p.k, 'promoted', g.promoted)::VARCHAR AS stats
        FROM n JOIN top2 t USING (dict_id, feature)
        LEFT JOIN prev p USING (dict_id, feature)
        LEFT JOIN promoted g USING (dict_id, feature)
        ORDER BY n.dict_id, n.feature""", {"ids": ids})


def write_automatic_labels(writer: Any, con: "duckdb.DuckDBPyConnection", dict_ids: Sequence[str] | None = None
                           ) -> int:
    """Compute the automatic labels over ``con`` and insert them through ``writer`` (a run or a save); returns how
    many features got one."""
    labels = automatic_labels(con, dict_ids)
    if not labels.empty:
        writer.insert_df("feature_labels", labels.assign(run_id=writer.run_id))
    return len(labels)


def step_labels(ctx: "RunContext") -> None:
    """Precompute step: the automatic label of every feature of the store (replacing earlier ones)."""
    ctx.con.execute("DELETE FROM feature_labels")
    ctx.summary["labels"] = {"features": write_automatic_labels(ctx.writer, ctx.con)}


def label_store(store_path: str | Path) -> int:
    """Add (or refresh) the automatic labels of every dictionary of an existing store without rebuilding it: one run of
    kind ``label`` through the store's writer (the file is copied, labelled and swapped in atomically, as any run;
    readers keep serving meanwhile). Returns how many features were labelled."""
    from backend.store.access import StoreWriter, reading

    with reading(store_path) as con:
        if not con.execute("SELECT count(*) FROM feature_examples").fetchall()[0][0]:
            raise InputError(f"{literal(store_path)} has no feature examples to label: run the precompute first.")
        model = str(con.execute("SELECT coalesce(any_value(model), '') FROM models").fetchall()[0][0])
    with StoreWriter(store_path, kind="label", model=model) as writer:
        assert writer.con is not None
        writer.con.execute("DELETE FROM feature_labels")
        n = write_automatic_labels(writer, writer.con)
        writer.summary = {"labels": {"features": n}}
    return n


def clean_label(text: str) -> str:
    """A user's label as stored: control characters removed, whitespace collapsed; InputError when too long."""
    if not isinstance(text, str):
        raise InputError("A label must be text.")
    kept = "".join(" " if unicodedata.category(ch).startswith("C") else ch for ch in text)
    label = " ".join(kept.split())
    if len(label) > MAX_LABEL_CHARS:
        raise InputError(f"The label has {len(label)} characters; keep it to {MAX_LABEL_CHARS} (a short name).")
    return label


def save_user_label(store_path: str | Path, dict_id: str, feature: int, text: str) -> str:
    """Save a user's label of one feature beside the store (an empty label removes it); returns the label stored.
    An unknown dictionary or feature is refused in one sentence."""
    from backend.store.access import reading

    label = clean_label(text)
    with reading(store_path) as con:
        row = con.execute("SELECT d.model FROM features f JOIN dictionaries d USING (dict_id) "
                          "WHERE f.dict_id = ? AND f.feature = ?", [dict_id, int(feature)]).fetchall()
    if not row:
        raise InputError(f"This store has no feature {int(feature)} in dictionary {literal(dict_id)}: pick one it has.")
    with saving(store_path, kind="user_label", model=str(row[0][0]),
                params={"dict_id": dict_id, "feature": int(feature)}) as writer:
        writer.insert_df("user_labels", pd.DataFrame([{
            "label_key": f"{dict_id}#{int(feature)}", "dict_id": dict_id, "feature": int(feature), "label": label,
            "created_at": datetime.now(timezone.utc).replace(tzinfo=None), "run_id": writer.run_id}]))
    return label


# Per (dict_id, feature): the automatic label, the user's (NULL when none or removed) and the one shown.
_LABELS = """
    SELECT dict_id, feature, any_value(auto_label) AS auto_label, any_value(user_label) AS user_label,
           coalesce(any_value(user_label), any_value(auto_label)) AS label
    FROM (SELECT dict_id, feature, label AS auto_label, NULL AS user_label FROM feature_labels
          UNION ALL
          SELECT dict_id, feature, NULL, nullif(label, '') FROM user_labels
          QUALIFY row_number() OVER (PARTITION BY label_key ORDER BY created_at DESC) = 1)
    GROUP BY dict_id, feature"""


def feature_label(con: "duckdb.DuckDBPyConnection", dict_id: str, feature: int) -> dict[str, Any]:
    """``{"label", "automatic", "auto_label", "user_label"}`` of one feature (label None when it has none;
    automatic True when the label shown is the automatic one)."""
    rows = con.execute(f"SELECT auto_label, user_label, label FROM ({_LABELS}) WHERE dict_id = ? AND feature = ?",
                       [dict_id, int(feature)]).fetchall()
    auto, user, label = rows[0] if rows else (None, None, None)
    return {"label": label, "automatic": user is None and label is not None, "auto_label": auto, "user_label": user}


def search_labels(con: "duckdb.DuckDBPyConnection", text: str, kind: str | None = None,
                  limit: int = MAX_RESULTS) -> pd.DataFrame:
    """Features of every dictionary whose label (the user's, else the automatic one) contains ``text`` (any case;
    ``%`` and ``_`` match themselves): dict_id, layer, kind, feature, label, automatic, density, max_act; user labels
    first, then by layer and feature."""
    needle = str(text).strip()
    if not needle:
        return pd.DataFrame(columns=["dict_id", "layer", "kind", "feature", "label", "automatic", "density", "max_act"])
    pattern = "%" + needle.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"
    return frame(con, f"""
        SELECT l.dict_id, d.layer, d.kind, l.feature, l.label, l.user_label IS NULL AS automatic, f.density, f.max_act
        FROM ({_LABELS}) l JOIN dictionaries d USING (dict_id)
        LEFT JOIN features f ON f.dict_id = l.dict_id AND f.feature = l.feature
        WHERE l.label ILIKE ? ESCAPE '\\' AND (? IS NULL OR d.kind = ?)
        ORDER BY automatic, d.kind = 'transcoder', d.layer, l.dict_id, l.feature LIMIT ?""",
                 [pattern, kind, kind, int(limit)])


def label_nodes(con: "duckdb.DuckDBPyConnection", nodes: pd.DataFrame) -> pd.DataFrame:
    """``nodes`` (a graph's node table) with each feature node's ``label`` replaced by the feature's label where the
    store has one (the user's, else the automatic one); other nodes keep theirs."""
    if nodes.empty or "dict_id" not in nodes or "feature" not in nodes:
        return nodes
    keys = nodes[["dict_id", "feature"]].dropna().drop_duplicates()
    if keys.empty:
        return nodes
    found = con.execute(
        f"SELECT l.dict_id, l.feature, l.label FROM ({_LABELS}) l "
        "JOIN (SELECT unnest($d) AS dict_id, unnest($f) AS feature) k ON k.dict_id = l.dict_id AND k.feature = l.feature",
        {"d": [str(d) for d in keys["dict_id"]], "f": [int(f) for f in keys["feature"]]}).fetchall()
    by_key = {(d, int(f)): lab for d, f, lab in found if lab}
    if not by_key:
        return nodes
    out = nodes.copy()
    out["label"] = [by_key.get((d, int(f)), old) if isinstance(d, str) and pd.notna(f) else old
                    for d, f, old in zip(out["dict_id"], out["feature"], out["label"])]
    return out
