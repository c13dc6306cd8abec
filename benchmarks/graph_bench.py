"""Benchmark of attribution graphs (backend/circuits) on the real model: speed, and how far the graphs can be trusted.

Uses the transcoders and attention SAEs of a store (``--store``, default the demo store if it exists); without
transcoders in the store every MLP is an error node. In one run:

* **speed**: graph building for a 20-token prompt (median of ``repeats``), pruning, the faithfulness check (zero
  ablation, frozen and live error nodes in one batched run), a GraphML + JSON export and a bare no-grad forward pass
  of the same tokens, so the ratios say what a graph costs beyond the forward pass it cannot avoid; and the wall time
  of the CLI command ``python -m backend graph --store S --prompt <the same 20 tokens>`` in a fresh process, as a
  ratio to the in-process build (the CLI's ``--timings`` breakdown is kept beside it);
* **trust**, on :data:`EVAL_PROMPTS` — a fixed set of evaluation prompts over several tasks (IOI, capitals and
  factual recall, induction, subject–verb agreement), chosen once and never tuned on: circuit-tracer's replacement
  and completeness scores and the error nodes' share of influence (as built, and pruned at 0.8 / 0.98), the
  conservation split with its two cancellation ratios, and the fraction of the metric the pruned circuit keeps under
  zero and mean ablation with frozen and with live error nodes (or the sentence that replaces a meaningless ratio).

``python -m benchmarks.graph_bench`` writes ``benchmarks/results/graph-latest.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
RESULTS = Path(__file__).resolve().parent / "results"
DEMO_STORE = ROOT / "data" / "stores" / "demo.duckdb"
# 20 tokens with BOS on SmolLM2's tokenizer (checked by the run: the result records the count).
PROMPT = "When Mary and John went to the store after work on Friday, John gave a cold drink to"

# (task, prompt, answer, wrong answer or None). Fixed before any graph was looked at; never tuned on.
EVAL_PROMPTS: tuple[tuple[str, str, str, str | None], ...] = (
    ("ioi", PROMPT, " Mary", " John"),
    ("ioi", "After Lisa and Tom finished the long meeting at the office, Tom handed the final report to",
     " Lisa", " Tom"),
    ("capital", "The capital of France is", " Paris", None),
    ("capital", "The capital city of Japan is", " Tokyo", None),
    ("factual", "The Eiffel Tower is located in the city of", " Paris", None),
    ("induction", "The secret word is banana. I repeat, the secret word is", " banana", None),
    ("agreement", "The keys to the old wooden cabinet", " are", " is"),
    ("agreement", "The author of the famous books", " is", " are"),
)


def _cli(store: Path, model_name: str) -> dict[str, Any]:
    """Wall time of the CLI graph command on :data:`PROMPT` in a fresh process, and its own phase breakdown."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "backend", "graph", "--store", str(store), "--model", model_name, "--prompt", PROMPT,
           "--timings"]
    t0 = time.perf_counter()
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
    wall = time.perf_counter() - t0
    if out.returncode != 0:
        return {"error": out.stderr.strip().splitlines()[-1:] or ["failed"], "wall_s": round(wall, 3)}
    timings = next((json.loads(line.split("timings ", 1)[1]) for line in out.stdout.splitlines()
                    if line.startswith("timings ")), {})
    return {"wall_s": round(wall, 3), "phases_s": timings}


def _trust(model: Any, spec_name: str, transcoders: dict[int, Any], saes: dict[int, Any],
           means: Any) -> list[dict[str, Any]]:
    """Scores, cancellation and faithfulness of every evaluation prompt."""
    from backend.circuits import faithfulness as faith
    from backend.circuits.build import BuildParams, build_graph
    from backend.circuits.prune import prune
    from backend.errors import InputError

    rows = []
    for task, prompt, answer, wrong in EVAL_PROMPTS:
        try:
            graph = build_graph(model, prompt, transcoders, saes, answer=answer, wrong=wrong, params=BuildParams(),
                                model_name=spec_name)
        except InputError as exc:  # an answer that is several tokens for this tokenizer
            rows.append({"task": task, "prompt": prompt, "skipped": str(exc)})
            continue
        pruned = prune(graph, 0.8, 0.98)
        cons = graph.metadata["conservation"]
        row: dict[str, Any] = {
            "task": task, "prompt": prompt, "answer": answer, "wrong": wrong,
            "metric": graph.metadata["target"]["kind"], "value": round(graph.metadata["target"]["value"], 4),
            "prob": round(graph.metadata["target"]["prob"], 4), "nodes": len(graph.nodes), "edges": len(graph.edges),
            "pruned_nodes": len(pruned.nodes),
            "scores_built": {k: round(v, 4) for k, v in graph.metadata["scores"].items()},
            "scores_pruned": {k: round(v, 4) for k, v in pruned.metadata["pruning"]["scores"].items()},
            "direct": {k: round(v, 4) for k, v in cons["direct"].items()},
            "direct_cancellation": round(cons["direct_cancellation"], 3),
            "input_cancellation": round(cons["input_cancellation"], 3),
        }
        for mode in ("zero", "mean"):
            if mode == "mean" and means is None:
                continue
            for errors, result in faith.check_both(model, pruned, transcoders, saes, mode=mode, means=means).items():
                row[f"faithfulness_{mode}_{errors}"] = (round(result.fraction, 4) if result.caveat is None
                                                        else result.caveat)
        rows.append(row)
    return rows


def _summary(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Medians over the evaluation prompts (ratios that mean nothing are counted, not averaged)."""
    done = [r for r in rows if "skipped" not in r]
    out: dict[str, Any] = {"prompts": len(done), "skipped": len(rows) - len(done)}
    if not done:
        return out
    for key in ("replacement", "completeness", "error_share"):
        out[f"{key}_built_median"] = round(statistics.median(r["scores_built"][key] for r in done), 4)
        out[f"{key}_pruned_median"] = round(statistics.median(r["scores_pruned"][key] for r in done), 4)
    for key in ("direct_cancellation", "input_cancellation"):
        out[f"{key}_median"] = round(statistics.median(r[key] for r in done), 3)
    for key in sorted({k for r in done for k in r if k.startswith("faithfulness_")}):
        numbers = [r[key] for r in done if isinstance(r.get(key), float)]
        out[key] = {"median": round(statistics.median(numbers), 4) if numbers else None,
                    "meaningless": sum(1 for r in done if isinstance(r.get(key), str))}
    return out


def run(model_name: str = "smollm2-135m", store: Path | None = None, repeats: int = 3,
        trust: bool = True, cli: bool = True, cli_repeats: int = 3) -> dict[str, Any]:
    """Seconds per stage and their ratios to a bare forward pass, the CLI-vs-in-process ratio, and the trust
    numbers on the evaluation prompts."""
    import torch

    from backend.circuits import faithfulness as faith
    from backend.circuits.build import BuildParams, build_graph
    from backend.circuits.export import export
    from backend.circuits.prune import prune
    from backend.dictionaries.storage import graph_dictionaries
    from backend.model.registry import get_spec, load_model
    from backend.store.access import reading

    model, spec = load_model(model_name), get_spec(model_name)
    store = store or (DEMO_STORE if DEMO_STORE.exists() else None)
    transcoders: dict[int, Any] = {}
    saes: dict[int, Any] = {}
    if store is not None:
        with reading(store) as con:
            transcoders, saes = graph_dictionaries(con, spec.name)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        graph = build_graph(model, PROMPT, transcoders, saes, params=BuildParams(), model_name=spec.name)
        times.append(time.perf_counter() - t0)
    build_s = statistics.median(times)
    t0 = time.perf_counter()
    pruned = prune(graph, 0.8, 0.98)
    prune_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    faith.check_both(model, pruned, transcoders, saes)
    faith_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    for fmt in ("graphml", "json"):
        export(pruned, fmt)
    export_s = time.perf_counter() - t0
    tokens = torch.tensor([graph.metadata["token_ids"]])
    fwd = []
    with torch.no_grad():
        for _ in range(max(3, repeats)):
            t0 = time.perf_counter()
            model(tokens)
            fwd.append(time.perf_counter() - t0)
    forward_s = statistics.median(fwd)
    result: dict[str, Any] = {
        "store": str(store) if store else None, "prompt_tokens": len(graph.metadata["token_ids"]),
        "transcoder_layers": sorted(transcoders), "attn_sae_layers": sorted(saes),
        "skip_layers": graph.metadata["dictionaries"].get("skip_layers", []),
        "candidates": graph.metadata["n_candidates"], "nodes": len(graph.nodes), "edges": len(graph.edges),
        "pruned_nodes": len(pruned.nodes), "pruned_edges": len(pruned.edges),
        "build_s": round(build_s, 3), "prune_s": round(prune_s, 3), "faithfulness_both_s": round(faith_s, 3),
        "export_graphml_json_s": round(export_s, 3), "bare_forward_s": round(forward_s, 4),
        "build_over_forward": round(build_s / forward_s, 1), "torch_threads": torch.get_num_threads(),
    }
    if cli and store is not None:
        # in-process builds and CLI runs interleaved (medians of cli_repeats each), so a load change on the machine
        # hits both sides of the ratio alike
        builds, runs = [], []
        for _ in range(cli_repeats):
            t0 = time.perf_counter()
            build_graph(model, PROMPT, transcoders, saes, params=BuildParams(), model_name=spec.name)
            builds.append(time.perf_counter() - t0)
            runs.append(_cli(store, model_name))
        ok = [r for r in runs if "error" not in r]
        wall = statistics.median(r["wall_s"] for r in ok) if ok else None
        result["cli"] = {"command": "python -m backend graph --store STORE --prompt PROMPT", "runs": runs,
                         "wall_s": wall, "build_in_process_s": round(statistics.median(builds), 3),
                         "cli_over_build": round(wall / statistics.median(builds), 2) if wall else None}
    if trust:
        means = None
        if store is not None:
            with reading(store) as con:
                means = faith.reference_means(model, transcoders, saes, faith.reference_tokens(con, spec.name))
        rows = _trust(model, spec.name, transcoders, saes, means)
        result["evaluation"] = {"summary": _summary(rows), "prompts": rows}
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--store", default=None, help="store whose transcoders / attention SAEs to use")
    parser.add_argument("--out", default=str(RESULTS / "graph-latest.json"))
    parser.add_argument("--no-trust", action="store_true", help="skip the evaluation prompts")
    parser.add_argument("--no-cli", action="store_true", help="skip the CLI-vs-in-process ratio")
    args = parser.parse_args(argv)
    result = {"when": datetime.now(timezone.utc).isoformat(timespec="seconds"), "model": args.model,
              "graph": run(args.model, Path(args.store) if args.store else None, trust=not args.no_trust,
                           cli=not args.no_cli)}
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
