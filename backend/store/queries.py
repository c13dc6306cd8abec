"""Read queries about a store as a whole (DuckDB SQL): what the home page and ``python -m backend info`` show.

Every function takes an open read-only connection (:func:`backend.store.access.open_store`) and returns plain Python /
pandas values. Each capability keeps its own queries beside it (``backend.features.queries``,
``backend.attribution.queries``, ``backend.heads.*_queries``, ``backend.circuits.queries``); pages call them through
:meth:`backend.ui.cache.StoreRef.query`.
"""

from __future__ import annotations

from typing import Any

import duckdb
import pandas as pd

from backend.store.access import frame, scalar


def schema_version(con: duckdb.DuckDBPyConnection) -> int:
    """The schema version recorded in the store."""
    return int(scalar(con, "SELECT value FROM meta WHERE key = 'schema_version'") or 0)


def runs(con: duckdb.DuckDBPyConnection) -> pd.DataFrame:
    """All precompute runs, newest first."""
    return frame(con, "SELECT run_id, kind, model, preset, status, started_at, seconds, params, summary "
                    "FROM runs ORDER BY started_at DESC")


def models(con: duckdb.DuckDBPyConnection) -> pd.DataFrame:
    """Models recorded in the store with their shapes."""
    return frame(con, "SELECT model, family, description, n_layers, d_model, n_heads, n_kv_heads, d_head, d_mlp, "
                    "d_vocab, n_ctx FROM models ORDER BY model")


def corpora(con: duckdb.DuckDBPyConnection) -> pd.DataFrame:
    """Tokenized corpora: size, context length and mean next-token loss."""
    return frame(con, "SELECT corpus_id, model, source, description, licence, n_documents, n_contexts, n_ctx, "
                    "n_tokens, mean_loss FROM corpora ORDER BY corpus_id")


def dictionaries(con: duckdb.DuckDBPyConnection, model: str | None = None) -> pd.DataFrame:
    """SAEs / transcoders with their quality metrics."""
    where, params = ("WHERE model = ?", [model]) if model else ("", [])
    return frame(con, f"SELECT dict_id, model, kind, architecture, hook_name, layer, d_in, d_sae, training_tokens, "
                    f"l0, fve, ce_loss_recovered, ce_clean, ce_spliced, ce_ablated, dead_fraction, eval_tokens "
                    f"FROM dictionaries {where} ORDER BY kind, layer", params)


def task_baselines(con: duckdb.DuckDBPyConnection, model: str | None = None) -> pd.DataFrame:
    """Built-in task metrics on clean vs corrupted prompts."""
    where, params = ("WHERE model = ?", [model]) if model else ("", [])
    return frame(con, f"SELECT task, model, n_examples, metric_name, clean_metric, corrupt_metric, example_prompt "
                    f"FROM task_baselines {where} ORDER BY task", params)


def table_counts(con: duckdb.DuckDBPyConnection) -> dict[str, int]:
    """Row count of every table in the store."""
    names = [r[0] for r in con.execute(
        "SELECT table_name FROM information_schema.tables WHERE table_catalog = current_database() "
        "ORDER BY table_name").fetchall()]
    return {n: int(scalar(con, f'SELECT count(*) FROM "{n}"')) for n in names}


def context_tokens(con: duckdb.DuckDBPyConnection, corpus_id: str, context_id: int) -> pd.DataFrame:
    """Tokens of one context with their text and next-token loss."""
    return frame(con, "SELECT t.pos, t.token_id, v.token_str, t.loss FROM tokens t "
                    "JOIN corpora c USING (corpus_id) LEFT JOIN vocab v ON v.model = c.model AND v.token_id = t.token_id "
                    "WHERE t.corpus_id = ? AND t.context_id = ? ORDER BY t.pos", [corpus_id, context_id])


def summary(con: duckdb.DuckDBPyConnection) -> dict[str, Any]:
    """Everything the home page and ``python -m backend info`` show, as one dict."""
    return {
        "schema_version": schema_version(con),
        "models": models(con),
        "corpora": corpora(con),
        "dictionaries": dictionaries(con),
        "task_baselines": task_baselines(con),
        "runs": runs(con),
        "counts": table_counts(con),
    }


def dictionary_quality(con: duckdb.DuckDBPyConnection, model: str | None = None) -> pd.DataFrame:
    """Dictionary quality for the home page: L0, FVE, CE-loss recovered with ΔCE in nats (spliced − clean) and its
    denominator (ablated − clean; tiny for one attention layer, so the ratio is noisy), dead share."""
    where, params = ("WHERE model = ?", [model]) if model else ("", [])
    return frame(con, f"SELECT dict_id, model, kind, architecture, hook_name, layer, d_sae, l0, fve, ce_loss_recovered, "
                    f"ce_spliced - ce_clean AS delta_ce, ce_ablated - ce_clean AS ablation_gap, dead_fraction, training_tokens, eval_tokens "
                    f"FROM dictionaries {where} ORDER BY kind, layer, dict_id", params)


def transcoder_quality(con: duckdb.DuckDBPyConnection, model: str | None = None) -> pd.DataFrame:
    """MLP transcoders (kind 'transcoder') for the home page: L0, FVE of the MLP output and the FVE of the dense linear
    baseline fitted on the same tokens, ΔCE (spliced − clean, nats) with that one MLP replaced by the transcoder and by
    the baseline, its denominator (MLP zeroed − clean), CE-loss recovered, dead share, and the token counts (per-layer
    CE runs on fewer held-out tokens than FVE: ``ce_tokens`` vs ``eval_tokens``)."""
    where, params = ("AND model = ?", [model]) if model else ("", [])
    return frame(con, f"""
        SELECT dict_id, model, architecture, layer, d_sae, l0, fve, baseline_fve, fve - baseline_fve AS fve_gain,
               ce_spliced - ce_clean AS delta_ce, baseline_ce_spliced - ce_clean AS baseline_delta_ce,
               ce_ablated - ce_clean AS ablation_gap, ce_loss_recovered, dead_fraction, training_tokens, eval_tokens,
               TRY_CAST(json_extract(cfg, '$.metadata.evaluation.ce_tokens') AS BIGINT) AS ce_tokens, source
        FROM dictionaries WHERE kind = 'transcoder' {where} ORDER BY layer, dict_id""", params)


def mlp_replacement_evals(con: duckdb.DuckDBPyConnection, model: str | None = None) -> pd.DataFrame:
    """All-MLPs-replaced evaluations (``replacement_evals``), newest run first, transcoders before their linear
    baselines: how many MLPs were replaced at once and by what, CE clean / replaced / all those MLPs zeroed, ΔCE and
    its 95% interval over held-out contexts, KL to the clean model and top-1 agreement (with intervals), the share of
    CE recovered and its denominator."""
    where, params = ("WHERE e.model = ?", [model]) if model else ("", [])
    return frame(con, f"""
        SELECT e.eval_id, e.model, coalesce(e.replacement, 'transcoder') AS replacement, e.n_replaced,
               e.ce_replaced - e.ce_clean AS delta_ce,
               TRY_CAST(json_extract(e.stats, '$.intervals.delta_ce[0]') AS DOUBLE) AS delta_ce_lo,
               TRY_CAST(json_extract(e.stats, '$.intervals.delta_ce[1]') AS DOUBLE) AS delta_ce_hi,
               e.kl, TRY_CAST(json_extract(e.stats, '$.intervals.kl[0]') AS DOUBLE) AS kl_lo,
               TRY_CAST(json_extract(e.stats, '$.intervals.kl[1]') AS DOUBLE) AS kl_hi,
               e.top1, TRY_CAST(json_extract(e.stats, '$.intervals.top1[0]') AS DOUBLE) AS top1_lo,
               TRY_CAST(json_extract(e.stats, '$.intervals.top1[1]') AS DOUBLE) AS top1_hi,
               e.ce_loss_recovered, e.ce_ablated - e.ce_clean AS ablation_gap, e.ce_clean, e.ce_replaced,
               e.ce_ablated, e.ce_tokens,
               TRY_CAST(json_extract(e.stats, '$.eval_contexts') AS INTEGER) AS eval_contexts, e.run_id
        FROM replacement_evals e LEFT JOIN runs r USING (run_id) {where}
        ORDER BY r.started_at DESC NULLS LAST, coalesce(e.replacement, 'transcoder') = 'linear', e.eval_id""", params)