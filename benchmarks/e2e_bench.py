"""Time to result in a real browser: ten Prompt Explorer sessions at once against one ``streamlit run`` server.

Each session (its own chromium context) opens the Prompt Explorer, types its own prompt and waits until that
prompt's tokens and per-token features are on screen; the time runs from Ctrl+Enter to then. Reported: p50 / p95 /
max over the ten, beside one session alone on the same warm server (so the slowdown is a ratio measured in the
same run), the first result on the cold server (model and SAE loading included), whether every session showed its
own prompt, and how many times the server loaded the model (should be 1).

``graph``: the Circuit Graph's interaction latencies in the same browser (:func:`graph_interactions`): the median and
max over several slider moves, searches and pin / hide clicks of the time from the input event to the redrawn graph
(the browser filters the graph the page computed once; no server run is involved), the time from a node click to its
details on screen (one server run), and the first draw of a stored graph. ``--graph-only`` measures just these and
writes ``benchmarks/results/graph-view-latest.json``.

Default store: the tiny-llama test store, built here by the same code as the tests' (tests/tiny_stores.py), so the
numbers measure serving and the browser more than the model; ``--store PATH`` serves another store instead (e.g.
``data/stores/demo.duckdb`` for the real model). Needs Debian's chromium (``make browser``).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
# The browser harness and the test-store builder live with the tests (tests/e2e/e2e_harness.py, tests/tiny_stores.py).
for _p in (ROOT / "tests", ROOT / "tests" / "e2e"):
    if str(_p) not in sys.path:
        sys.path.insert(0, str(_p))

from e2e_harness import (  # noqa: E402
    CHROMIUM,
    CHROMIUM_ARGS,
    READY,
    StreamlitServer,
    Tab,
    chromium_problem,
    click_and_time,
    distinct_prompts,
    drawn,
    emit,
    graph_frame,
    move_and_time,
    page_url,
    percentiles,
    run_prompt_sessions,
)

N_SESSIONS = 10
N_MOVES = 12  # slider moves, searches and pin / hide clicks timed per kind
N_CLICKS = 5  # node clicks (each one server run)


def _stats(values: list[float]) -> dict[str, float]:
    import statistics

    return {"median_ms": round(statistics.median(values), 1), "max_ms": round(max(values), 1), "n": len(values)}


def graph_interactions(base_url: str, store: Path, headless_args: list[str] | None = None) -> dict[str, Any]:
    """Time the Circuit Graph's interactions on the first graph stored in ``store``, in headless chromium."""
    from playwright.sync_api import sync_playwright

    from backend.circuits.storage import list_graphs
    from backend.store.access import reading

    with reading(store) as con:
        graphs = list_graphs(con)
    if graphs.empty:
        return {"skipped": "the store has no graph"}
    gid, n_nodes, n_edges = graphs.iloc[0][["graph_id", "n_nodes", "n_edges"]]
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(CHROMIUM), args=headless_args or CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 900})
            page.set_default_timeout(120_000)
            tab = Tab(page, base_url)
            t0 = time.perf_counter()
            page.goto(page_url(base_url, "circuit_graph", graph=str(gid)))
            frame = graph_frame(tab, timeout_s=600)  # a cold server imports torch and ranks the graph first
            first_draw = time.perf_counter() - t0
            moves, edges, searches, pins = [], [], [], []
            for i in range(N_MOVES):
                moves.append(move_and_time(frame, "nt", f"{0.5 + 0.4 * (i % 2) + 0.01 * i:.2f}")["wall_ms"])
                edges.append(move_and_time(frame, "et", f"{0.9 + 0.08 * (i % 2):.2f}")["wall_ms"])
            for i in range(N_MOVES):
                searches.append(move_and_time(frame, "q", ["T", "emb", "L", "1", "error", ""][i % 6])["wall_ms"])
            ids = [n for n in drawn(frame)["ids"] if not n.startswith("L_")]
            for i in range(N_MOVES // 2):
                emit(frame, "plotly_selected", [ids[i % len(ids)]])
                pins.append(click_and_time(frame, "pin")["wall_ms"])
                pins.append(click_and_time(frame, "unpin")["wall_ms"])
            page.wait_for_selector(READY, state="attached")
            clicks = []
            for node in ids[:N_CLICKS]:
                page.wait_for_selector(READY, state="attached")
                t1 = time.perf_counter()
                emit(frame, "plotly_click", [node])
                page.locator('[data-testid="stMain"] h4', has_text=node).first.wait_for(state="visible")
                page.wait_for_selector(READY, state="attached")
                clicks.append((time.perf_counter() - t1) * 1000)
        finally:
            browser.close()
    return {
        "graph": str(gid), "graph_nodes": int(n_nodes), "graph_edges": int(n_edges),
        "first_draw_s": round(first_draw, 2),
        "node_slider_move": _stats(moves), "edge_slider_move": _stats(edges), "search": _stats(searches),
        "pin_or_unpin_click": _stats(pins), "node_click_to_details_on_screen": _stats(clicks),
        "how": "headless chromium, 1400x900; slider / search / pin: from the input event to the redrawn graph in the "
               "same JavaScript task (no server run); node click: from plotly's click event to the node's details "
               "visible and the page idle (one server run)",
    }


def run(store: Path | None = None, n_sessions: int = N_SESSIONS, log_dir: Path | None = None) -> dict[str, Any]:
    """Serve ``store`` (default: a fresh tiny-llama test store) and time ``n_sessions`` concurrent sessions."""
    problem = chromium_problem()
    if problem:
        raise SystemExit(f"error: {problem}")
    with tempfile.TemporaryDirectory() as tmp:
        if store is None:
            from tiny_stores import TEST_STORE_NAME, build_tiny_store

            print("benchmark e2e: building the tiny-llama test store ...", flush=True)
            stores, name, label = Path(tmp), TEST_STORE_NAME, "tiny-llama test store"
            build_tiny_store(stores / name)
        else:  # served from its own directory (the app opens stores read-only)
            stores, name, label = store.resolve().parent, store.name, str(store)
        log = (log_dir or Path(tmp)) / "e2e-bench-server.log"
        print(f"benchmark e2e: {n_sessions} concurrent browser sessions on {label} ...", flush=True)
        with StreamlitServer(stores, name, log) as server:
            t0 = time.perf_counter()
            cold = run_prompt_sessions(server.url, ["Cold start: the first visitor of the day"])[0]
            cold_total = time.perf_counter() - t0
            alone = run_prompt_sessions(server.url, ["One visitor alone on a warm server"])[0]
            many = run_prompt_sessions(server.url, distinct_prompts(n_sessions))
            loads = server.model_loads()
            graph = graph_interactions(server.url, stores / name)
    times = [r.seconds for r in many]
    stats = percentiles(times)
    result = {
        "store": label,
        "sessions": n_sessions,
        "time_to_result": stats,
        "single_session_warm_s": round(alone.seconds, 2),
        "p50_over_single": round(stats["p50_s"] / alone.seconds, 1),
        "p95_over_single": round(stats["p95_s"] / alone.seconds, 1),
        "cold_first_result_s": round(cold.seconds, 2),
        "cold_first_page_and_result_s": round(cold_total, 2),
        "all_correct": all(r.correct for r in [cold, alone, *many]),
        "model_loads": len(loads),
        "graph": graph,
    }
    print(f"  {result}", flush=True)
    return result


def main(argv: list[str] | None = None) -> int:
    """Run alone: ``python -m benchmarks.e2e_bench [--store PATH] [--sessions N]``; prints the JSON."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--store", type=Path, default=None, help="store to serve (default: build the tiny test store)")
    parser.add_argument("--sessions", type=int, default=N_SESSIONS)
    parser.add_argument("--graph-only", action="store_true",
                        help="time only the Circuit Graph's interactions; writes benchmarks/results/graph-view-latest.json")
    args = parser.parse_args(argv)
    if args.store is not None and not args.store.is_file():
        raise SystemExit(f"error: no store at {args.store}: build one with `make demo` or pass another --store.")
    if args.graph_only:
        result = run_graph_only(args.store)
        (ROOT / "benchmarks" / "results" / "graph-view-latest.json").write_text(json.dumps(result, indent=2) + "\n")
    else:
        result = run(args.store, args.sessions)
    print(json.dumps(result, indent=2))
    return 0


def run_graph_only(store: Path | None = None) -> dict[str, Any]:
    """Serve ``store`` (default: a fresh tiny-llama test store) and time the Circuit Graph's interactions."""
    problem = chromium_problem()
    if problem:
        raise SystemExit(f"error: {problem}")
    with tempfile.TemporaryDirectory() as tmp:
        if store is None:
            from tiny_stores import TEST_STORE_NAME, build_tiny_store

            stores, name, label = Path(tmp), TEST_STORE_NAME, "tiny-llama test store"
            build_tiny_store(stores / name)
        else:
            stores, name, label = store.resolve().parent, store.name, str(store)
        with StreamlitServer(stores, name, Path(tmp) / "graph-bench-server.log") as server:
            result = graph_interactions(server.url, stores / name)
    return {"store": label, **result}


if __name__ == "__main__":
    raise SystemExit(main())
