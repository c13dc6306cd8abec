"""The ``full`` preset end to end: run (or resume) it, then record its time and quality.

``python -m benchmarks.full_preset [--store data/stores/full.duckdb] [--resume | --report-only]`` runs
``python -m backend precompute --preset full`` on the embedded model (``--resume``: continue the unfinished run an
interruption left for that store), then writes ``benchmarks/results/full-preset.json``: wall time per step, the
corpus size, every dictionary's held-out quality (attention SAEs; transcoders beside their dense linear baselines),
the all-MLPs-replaced evaluations with their 95% intervals, the example graphs' quality scores and conservation
split, the features step's forward-pass share, and Feature Browser query latencies on the resulting store. It takes
hours on 2 CPU cores, so it is not part of ``make bench``; run it in the background (it can be interrupted and run
again).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results" / "full-preset.json"
MODEL = "smollm2-135m"


def _records(frame: Any) -> list[dict[str, Any]]:
    """A DataFrame as JSON-ready rows (NaN -> None)."""
    return json.loads(frame.to_json(orient="records"))


def report(store: Path, preset: str = "full") -> dict[str, Any]:
    """Time and quality of the newest finished run of ``preset`` in ``store`` (read through the store's own queries)."""
    from backend.store.access import reading
    from backend.store.queries import dictionary_quality, mlp_replacement_evals, transcoder_quality

    from benchmarks.features_bench import real_store_queries

    with reading(store) as con:
        runs = con.execute("SELECT run_id, seconds, summary FROM runs WHERE kind = 'precompute' AND preset = ? "
                           "ORDER BY finished_at DESC LIMIT 1", [preset]).fetchall()
        if not runs:
            raise SystemExit(f"{store} holds no finished {preset}-preset run yet.")
        run_id, seconds, summary = runs[0]
        summary = json.loads(summary) if isinstance(summary, str) else summary
        quality = dictionary_quality(con, MODEL)
        transcoders = transcoder_quality(con, MODEL)
        replaced = mlp_replacement_evals(con, MODEL)
        graphs = con.execute("SELECT title, metadata FROM graphs WHERE run_id = ? ORDER BY title", [run_id]).fetchall()
    saes = quality[quality["kind"] != "transcoder"]
    features = summary.get("features") or {}
    step_s = (summary.get("step_seconds") or {}).get("features")
    return {
        "store": str(store),
        "run_id": run_id,
        "seconds": seconds,
        "step_seconds": summary.get("step_seconds"),
        "corpus": summary.get("corpus"),
        "attention_saes": _records(saes[["layer", "d_sae", "l0", "fve", "delta_ce", "ablation_gap", "dead_fraction",
                                         "training_tokens", "eval_tokens"]]),
        "transcoders": _records(transcoders[["layer", "l0", "fve", "baseline_fve", "fve_gain", "delta_ce",
                                             "baseline_delta_ce", "dead_fraction", "training_tokens", "eval_tokens"]]),
        "transcoders_beating_baseline": int((transcoders["fve_gain"] > 0).sum()),
        "all_replaced": _records(replaced[replaced["run_id"] == run_id]),
        # The attention-SAE features step over the whole corpus: its forward pass against the whole step's time.
        "features_step": {**{k: features.get(k) for k in ("scored_tokens", "forward_s", "encode_s", "stage_s",
                                                          "write_s", "logits_s")},
                          "step_s": step_s, "forward_share": round(features["forward_s"] / step_s, 3)
                          if step_s and features.get("forward_s") else None},
        "graphs": [{"title": title, **{k: (json.loads(meta) if isinstance(meta, str) else meta).get(k)
                                       for k in ("scores", "conservation", "n_candidates", "seconds")}}
                   for title, meta in graphs],
        "feature_page_queries": real_store_queries(store),
    }


def main(argv: list[str] | None = None) -> None:
    """Run or resume the full preset, then write its report."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--store", type=Path, default=ROOT / "data" / "stores" / "full.duckdb")
    parser.add_argument("--resume", action="store_true", help="continue the unfinished run of this store")
    parser.add_argument("--report-only", action="store_true", help="only read the finished run and write the report")
    args = parser.parse_args(argv)
    if not args.report_only:
        cmd = [sys.executable, "-m", "backend", "precompute", "--model", MODEL, "--store", str(args.store),
               "--preset", "full"]
        subprocess.run([*cmd, "--resume"] if args.resume else cmd, cwd=ROOT, check=True)
    result = report(args.store)
    RESULTS.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
