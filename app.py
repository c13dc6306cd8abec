"""circuitscope — Streamlit entry point: page navigation and the home page (what the open store holds).

Run with ``streamlit run app.py``. Deep links: ``/?store=demo.duckdb&model=smollm2-135m`` opens the home page on that
store; every page accepts ``store`` and ``model`` plus its own parameters (see backend/ui/shell.py).
"""

from __future__ import annotations

import pandas as pd
import streamlit as st

from backend.pipeline import improve
from backend.store import queries as store_queries
from backend.ui import shell

IMPROVE_REFRESH_S = 30  # how often the Home page rereads an improvement's progress


def _fmt_int(value: object) -> str:
    return "–" if value is None or pd.isna(value) else f"{int(value):,}"  # type: ignore[arg-type]


def _model_section(ctx: shell.PageContext) -> None:
    info = ctx.model_info
    st.subheader(f"Model · {shell.literal(ctx.model)}")
    cols = st.columns(5)
    cols[0].metric("Layers", _fmt_int(info.get("n_layers")))
    cols[1].metric("d_model", _fmt_int(info.get("d_model")))
    heads = _fmt_int(info.get("n_heads"))
    kv = info.get("n_kv_heads")
    cols[2].metric("Heads", heads if kv is None or pd.isna(kv) or kv == info.get("n_heads") else f"{heads} ({int(kv)} KV)")
    cols[3].metric("Vocabulary", _fmt_int(info.get("d_vocab")))
    cols[4].metric("Context (store)", _fmt_int(info.get("n_ctx")))
    if info.get("description"):
        st.caption(shell.prose(info["description"]))


def _corpus_section(ctx: shell.PageContext) -> None:
    st.subheader("Corpus")
    corpora: pd.DataFrame = ctx.summary["corpora"]
    corpora = corpora[corpora["model"] == ctx.model]
    if corpora.empty:
        st.info(f"This store has no tokenized corpus for {shell.literal(ctx.model)}: run {shell.build_hint(ctx)}.")
        return
    for _, row in corpora.iterrows():
        cols = st.columns(4)
        cols[0].metric("Tokens", _fmt_int(row["n_tokens"]))
        cols[1].metric("Contexts", f"{_fmt_int(row['n_contexts'])} × {_fmt_int(row['n_ctx'])}")
        cols[2].metric("Documents", _fmt_int(row["n_documents"]))
        cols[3].metric("Mean next-token loss", "–" if pd.isna(row["mean_loss"]) else f"{row['mean_loss']:.3f} nats")
        st.caption(f"{shell.literal(row['corpus_id'])} — {shell.prose(row['description'] or row['source'])} "
                   f"(licence: {shell.prose(row['licence'] or 'unknown')})")


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    minutes = seconds / 60
    return f"{minutes:.0f} min" if minutes < 90 else f"{minutes / 60:.1f} h"


def _improvement_text(p: improve.Progress, store: str) -> str:
    """What the Home page says of an improvement (every value from a file beside the store is a code span)."""
    L = shell.literal
    served = (f"The dictionaries below are the {L(p.base_preset)} preset's." if p.base_preset
              else "The dictionaries below are the store's current ones.")
    where = f"Log: {L(p.log)}."
    if p.state == "failed":
        return (f"{served} Training the {L(p.preset)} preset's in the background failed ({L(p.error, 300)}). {where} "
                f"Run {L(f'python -m backend improve --store {store}', 400)} (or `make run`) to try again.")
    done = f"{p.units_done} of {p.units_total} units of work (steps and layers) done"
    if p.step is not None and p.units_total:
        done += f"; step {p.step_number} of {p.n_steps}, {L(p.step)}"
        if p.layers_total:
            done += f": {p.layers_done} of {p.layers_total} layers"
            if p.eta_seconds is not None:
                done += (f", about {_duration(p.eta_seconds)} left in this step (its finished layers' mean time "
                         "here)")
    elif p.units_total:
        done += "; swapping it in"
    if p.state == "interrupted":
        return (f"{served} Training the {L(p.preset)} preset's in the background was interrupted ({done}). `make run` "
                f"continues it, or run {L(f'python -m backend improve --store {store}', 400)}. {where}")
    started = "starting (loading the model, copying the store)" if p.state == "starting" else done
    pid = (f" Process {p.pid}: stop it with `kill {p.pid}`; it continues later from its last finished unit."
           if p.pid else "")
    return (f"{served} Better ones, the {L(p.preset)} preset's, are training in the background: {started}. This page "
            f"shows them once they are swapped in. {where}{pid}")


def _improvement_notice(ctx: shell.PageContext) -> None:
    """The progress of a background improvement of the store served (``make run``), when there is one: only then is
    the page reread on a timer (no timer otherwise, so an idle page never reruns by itself)."""
    if improve.progress(ctx.store.path) is not None:
        _improvement_progress(ctx)


@st.fragment(run_every=IMPROVE_REFRESH_S)
def _improvement_progress(ctx: shell.PageContext) -> None:
    """Reread every :data:`IMPROVE_REFRESH_S` seconds; once the improvement has been swapped in, the whole page runs
    again with the new figures."""
    p = improve.progress(ctx.store.path)
    if p is None:
        st.rerun()
    text = _improvement_text(p, str(ctx.store.path))
    if p.state in ("running", "starting"):
        st.info(text)
        if p.units_total:
            st.progress(p.units_done / p.units_total)
    else:
        st.warning(text)


def _dictionary_section(ctx: shell.PageContext) -> None:
    st.subheader("Dictionaries")
    _improvement_notice(ctx)
    dicts: pd.DataFrame = ctx.store.query(store_queries.dictionary_quality, ctx.model)
    if dicts.empty:
        st.info(
            f"This store has no SAEs or transcoders for {shell.literal(ctx.model)} yet: they arrive with the dictionary-training "
            f"precompute steps; once those land, run {shell.build_hint(ctx)} to add them."
        )
        return
    others = dicts[dicts["kind"] != "transcoder"]
    if not others.empty:
        st.dataframe(
            others.drop(columns=["model"]),
            hide_index=True,
            column_config={
                "l0": st.column_config.NumberColumn("L0", format="%.1f", help="mean active features per token"),
                "fve": st.column_config.NumberColumn("FVE", format="%.3f", help="fraction of variance explained"),
                "ce_loss_recovered": st.column_config.NumberColumn("CE recovered", format="%.3f",
                                                                   help="share of the CE-loss gap (ablated → clean) recovered by splicing the dictionary in"),
                "delta_ce": st.column_config.NumberColumn("ΔCE (nats)", format="%.4f", help="spliced CE loss − clean CE loss"),
                "ablation_gap": st.column_config.NumberColumn(
                    "ablated − clean (nats)", format="%.4f",
                    help="denominator of CE recovered: zero-ablating one attention layer moves CE very little, "
                         "so the ratio is noisy; read it with ΔCE and FVE"),
                "dead_fraction": st.column_config.NumberColumn("Dead", format="percent", help="share of features that never fired"),
            },
        )
    if (dicts["kind"] == "transcoder").any():
        _transcoder_section(ctx)


def _interval(row: pd.Series, key: str, fmt: str) -> str:
    lo, hi = row.get(f"{key}_lo"), row.get(f"{key}_hi")
    if lo is None or hi is None or pd.isna(lo) or pd.isna(hi):
        return ""
    return f"95% interval over held-out contexts: {format(lo, fmt)} … {format(hi, fmt)}"


def _transcoder_section(ctx: shell.PageContext) -> None:
    st.markdown("**MLP transcoders** — each replaces one MLP: sparse features read the MLP's normalised input and "
                "predict its output (with a linear skip path where the transcoder has one). Beside each one, a dense "
                "linear regression of the MLP output on its input, fitted on the same tokens: a transcoder below it "
                "would not be explaining the MLP.")
    reps: pd.DataFrame = ctx.store.query(store_queries.mlp_replacement_evals, ctx.model)
    if not reps.empty:
        latest = reps[reps["run_id"] == reps["run_id"].iloc[0]]
        for _, r in latest.iterrows():
            what = "transcoders" if r["replacement"] == "transcoder" else "dense linear baselines"
            st.caption(f"All {_fmt_int(r['n_replaced'])} MLPs replaced at once by their {what}")
            cols = st.columns(4)
            cols[0].metric("ΔCE (nats)", "–" if pd.isna(r["delta_ce"]) else f"{r['delta_ce']:+.3f}",
                           help="CE with all replaced − clean CE. " + _interval(r, "delta_ce", "+.3f"))
            cols[1].metric("KL to the clean model", "–" if pd.isna(r["kl"]) else f"{r['kl']:.3f}",
                           help="mean KL(clean ‖ replaced) of the next-token distribution, nats. "
                                + _interval(r, "kl", ".3f"))
            cols[2].metric("Top-1 agreement", "–" if pd.isna(r["top1"]) else f"{r['top1']:.1%}",
                           help="share of tokens whose top prediction is the clean model's. " + _interval(r, "top1", ".1%"))
            cols[3].metric("CE recovered", "–" if pd.isna(r["ce_loss_recovered"]) else f"{r['ce_loss_recovered']:.3f}",
                           help="(CE with those MLPs zeroed − CE replaced) / (zeroed − clean)")
        r = latest.iloc[0]
        st.caption(f"Clean CE {r['ce_clean']:.3f} nats over {_fmt_int(r['ce_tokens'])} held-out tokens "
                   f"({_fmt_int(r['eval_contexts'])} contexts; intervals: percentile bootstrap over contexts). BOS and "
                   "document-separator positions keep the real MLP output: they are attention sinks with outsized MLP "
                   "outputs, never trained on or scored.")
    tcs: pd.DataFrame = ctx.store.query(store_queries.transcoder_quality, ctx.model)
    st.dataframe(
        tcs.drop(columns=["model"]),
        hide_index=True,
        column_config={
            "l0": st.column_config.NumberColumn("L0", format="%.1f", help="mean active features per token"),
            "fve": st.column_config.NumberColumn("FVE", format="%.3f", help="fraction of the MLP output's variance explained"),
            "baseline_fve": st.column_config.NumberColumn(
                "linear FVE", format="%.3f", help="FVE of a dense linear regression of the MLP output on its input"),
            "fve_gain": st.column_config.NumberColumn("FVE − linear", format="%+.3f"),
            "delta_ce": st.column_config.NumberColumn("ΔCE (nats)", format="%.4f",
                                                      help="this one MLP replaced by the transcoder: CE − clean CE"),
            "baseline_delta_ce": st.column_config.NumberColumn(
                "linear ΔCE", format="%.4f", help="this one MLP replaced by its dense linear baseline: CE − clean CE"),
            "ablation_gap": st.column_config.NumberColumn("zeroed − clean (nats)", format="%.4f",
                                                          help="denominator of CE recovered: this MLP's output zeroed"),
            "ce_loss_recovered": st.column_config.NumberColumn(
                "CE recovered", format="%.3f",
                help="this one MLP replaced by its transcoder: (zeroed − replaced) / (zeroed − clean) CE"),
            "dead_fraction": st.column_config.NumberColumn("Dead", format="percent", help="share of features that never fired"),
            "ce_tokens": st.column_config.NumberColumn("CE tokens", help="held-out tokens the per-layer CE averages over"),
        },
    )


def _tasks_section(ctx: shell.PageContext) -> None:
    st.subheader("Task baselines")
    tasks: pd.DataFrame = ctx.summary["task_baselines"]
    tasks = tasks[tasks["model"] == ctx.model]
    if tasks.empty:
        st.info(f"This store has no task baselines for {shell.literal(ctx.model)}: run {shell.build_hint(ctx)}.")
        return
    st.dataframe(
        tasks.drop(columns=["model"]),
        hide_index=True,
        column_config={
            "clean_metric": st.column_config.NumberColumn("clean", format="%.3f"),
            "corrupt_metric": st.column_config.NumberColumn("corrupted", format="%.3f"),
        },
    )


def _runs_section(ctx: shell.PageContext) -> None:
    st.subheader("Runs")
    runs: pd.DataFrame = ctx.summary["runs"]
    st.dataframe(runs[["run_id", "kind", "model", "preset", "status", "started_at", "seconds"]], hide_index=True,
                 column_config={"seconds": st.column_config.NumberColumn("seconds", format="%.1f")})
    with st.expander("Rows per table"):
        counts = ctx.summary["counts"]
        st.dataframe(pd.DataFrame({"table": list(counts), "rows": list(counts.values())}), hide_index=True)


def _views_section(ctx: shell.PageContext) -> None:
    st.subheader("Views")
    params = {shell.STORE_PARAM: ctx.store.name, **({shell.MODEL_PARAM: ctx.model} if ctx.model else {})}
    cols = st.columns(3)
    for i, (path, title, icon) in enumerate(VIEWS):
        cols[i % 3].page_link(path, label=title, icon=icon, query_params=params)


def _home_body(ctx: shell.PageContext) -> None:
    if ctx.model is None:
        st.warning(f"This store records no model yet (an empty or interrupted store): run {shell.build_hint(ctx)}.")
    else:
        _model_section(ctx)
        _corpus_section(ctx)
        _dictionary_section(ctx)
        _tasks_section(ctx)
    _runs_section(ctx)
    _views_section(ctx)


def home() -> None:
    """The home page: what the chosen store holds."""
    shell.run_page("circuitscope", _home_body,
                caption="Explore mechanistic-interpretability artifacts precomputed into a DuckDB store.")


VIEWS: list[tuple[str, str, str]] = [
    ("pages/feature_browser.py", "Feature Browser", ":material/manage_search:"),
    ("pages/prompt_explorer.py", "Prompt Explorer", ":material/edit_note:"),
    ("pages/head_polysemanticity.py", "Head Polysemanticity", ":material/hub:"),
    ("pages/induction_heads.py", "Induction Heads", ":material/repeat:"),
    ("pages/attribution_faithfulness.py", "Attribution Faithfulness", ":material/balance:"),
    ("pages/circuit_graph.py", "Circuit Graph", ":material/account_tree:"),
    ("pages/compare_graphs.py", "Compare Graphs", ":material/compare:"),
]

# An emoji icon is drawn locally; a ":material:" icon makes the browser fetch it from Google (offline here).
st.set_page_config(page_title="circuitscope", page_icon="🔬", layout="wide")
navigation = st.navigation({
    "": [st.Page(home, title="Home", icon=":material/home:", default=True)],
    "Views": [st.Page(path, title=title, icon=icon) for path, title, icon in VIEWS],
})
navigation.run()
