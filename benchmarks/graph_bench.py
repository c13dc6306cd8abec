"""Benchmark of attribution-graph building (backend/circuits) for a 20-token prompt on the real model.

Uses the transcoders and attention SAEs of a store (``--store``, default the demo store if it exists); without
transcoders in the store every MLP is an error node, which builds fewer nodes, so the result records how many
transcoder layers took part. Times, in one run: graph building (median of ``repeats``), pruning, the zero-ablation
faithfulness check, a GraphML + JSON export, and a bare no-grad forward pass of the same 20 tokens, so the ratios
say what a graph costs beyond the forward pass it cannot avoid; then the fraction of the IOI logit difference kept
under zero and mean ablation at node thresholds 0.8 / 0.9 / 0.95 / 1.0. ``python -m benchmarks.graph_bench`` writes
``benchmarks/results/graph-latest.json``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"
DEMO_STORE = Path(__file__).resolve().parent.parent / "data" / "stores" / "demo.duckdb"
# 20 tokens with BOS on SmolLM2's tokenizer (checked by the run: the result records the count).
PROMPT = "When Mary and John went to the store after work on Friday, John gave a cold drink to"


def run(model_name: str = "smollm2-135m", store: Path | None = None, repeats: int = 3) -> dict[str, Any]:
    """Seconds per stage and their ratios to a bare forward pass of the same prompt."""
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
    result = faith.check(model, pruned, transcoders, saes)
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
    # Faithfulness of the IOI logit difference (' Mary' − ' John') under zero vs mean ablation, at several node
    # thresholds (1.0 keeps every selected node: what is left ablated is the candidates max_nodes did not select).
    ioi = build_graph(model, PROMPT, transcoders, saes, answer=" Mary", wrong=" John", params=BuildParams(),
                      model_name=spec.name)
    means = None
    if store is not None:
        with reading(store) as con:
            means = faith.reference_means(model, transcoders, saes, faith.reference_tokens(con, spec.name))
    ablation = []
    for node_t in (0.8, 0.9, 0.95, 1.0):
        view = prune(ioi, node_t, 0.98 if node_t < 1 else 1.0)
        row = {"node_threshold": node_t, "nodes": len(view.nodes),
               "zero": round(faith.check(model, view, transcoders, saes).fraction, 4)}
        if means is not None:
            row["mean"] = round(faith.check(model, view, transcoders, saes, mode="mean", means=means).fraction, 4)
        ablation.append(row)
    return {
        "store": str(store) if store else None, "prompt_tokens": len(graph.metadata["token_ids"]),
        "transcoder_layers": sorted(transcoders), "attn_sae_layers": sorted(saes),
        "candidates": graph.metadata["n_candidates"], "nodes": len(graph.nodes), "edges": len(graph.edges),
        "pruned_nodes": len(pruned.nodes), "pruned_edges": len(pruned.edges),
        "faithfulness_zero": round(result.fraction, 4),
        "build_s": round(build_s, 3), "prune_s": round(prune_s, 3), "faithfulness_s": round(faith_s, 3),
        "export_graphml_json_s": round(export_s, 3), "bare_forward_s": round(forward_s, 4),
        "build_over_forward": round(build_s / forward_s, 1), "torch_threads": torch.get_num_threads(),
        "ioi_logit_diff_faithfulness": ablation,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--store", default=None, help="store whose transcoders / attention SAEs to use")
    parser.add_argument("--out", default=str(RESULTS / "graph-latest.json"))
    args = parser.parse_args(argv)
    result = {"when": datetime.now(timezone.utc).isoformat(timespec="seconds"), "model": args.model,
              "graph": run(args.model, Path(args.store) if args.store else None)}
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
