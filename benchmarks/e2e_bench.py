"""Time to result in a real browser: ten Prompt Explorer sessions at once against one ``streamlit run`` server.

Each session (its own chromium context) opens the Prompt Explorer, types its own prompt and waits until that
prompt's tokens and per-token features are on screen; the time runs from Ctrl+Enter to then. Reported: p50 / p95 /
max over the ten, beside one session alone on the same warm server (so the slowdown is a ratio measured in the
same run), the first result on the cold server (model and SAE loading included), whether every session showed its
own prompt, and how many times the server loaded the model (should be 1).

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

from e2e_harness import StreamlitServer, chromium_problem, distinct_prompts, percentiles, run_prompt_sessions  # noqa: E402

N_SESSIONS = 10


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
    }
    print(f"  {result}", flush=True)
    return result


def main(argv: list[str] | None = None) -> int:
    """Run alone: ``python -m benchmarks.e2e_bench [--store PATH] [--sessions N]``; prints the JSON."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--store", type=Path, default=None, help="store to serve (default: build the tiny test store)")
    parser.add_argument("--sessions", type=int, default=N_SESSIONS)
    args = parser.parse_args(argv)
    if args.store is not None and not args.store.is_file():
        raise SystemExit(f"error: no store at {args.store}: build one with `make demo` or pass another --store.")
    print(json.dumps(run(args.store, args.sessions), indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
