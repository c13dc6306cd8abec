"""GPU smoke test, for whoever has a CUDA GPU (these development machines have none): the demo precompute, one
attribution graph and one attribution comparison on ``--device cuda`` (or any other device), each checked against
the same computation on the CPU.

    bash benchmarks/gpu_smoke.sh                       # cuda vs cpu, 64 contexts
    python -m benchmarks.gpu_smoke --device cuda:1 --contexts 256

What must agree: things computed from fixed weights agree to float32 round-off (corpus loss, task metrics, induction
scores, the graph's target value and node attributions, attribution scores); what is trained (dictionaries) is only
close, since GPU kernels add in another order and training amplifies that, so their quality must be within a margin.
Writes ``data/bench/gpu-smoke/result.json`` and exits non-zero when a check fails.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "data" / "bench" / "gpu-smoke"
MODEL = "smollm2-135m"
PROMPT = "When Mary and John went to the store, John gave a drink to"
EXACT_RTOL = 2e-3  # float32 round-off through 30 layers, summed in another order
TRAINED_MARGIN = 0.05  # FVE of a dictionary trained on the other device


def _one(device: str, model_name: str, store: Path, out: Path) -> None:
    """In a process of its own (so ``--device`` holds for everything it loads): one graph and one comparison."""
    import torch

    from backend.attribution.compare import run_comparison
    from backend.circuits.build import build
    from backend.dictionaries.storage import graph_dictionaries
    from backend.inputs.tasks import build_task
    from backend.model.device import use_device
    from backend.model.registry import load_model
    from backend.store.access import reading

    use_device(device)
    model = load_model(model_name)
    with reading(store) as con:
        transcoders, saes = graph_dictionaries(con, model_name)
    graph, _ = build(model, PROMPT, transcoders, saes, model_name=model_name)
    batch = build_task("ioi", model, 2, seed=0)
    comparison = run_comparison(model, batch, model_name, methods=["atp", "relp", "patching"], kinds=["resid", "mlp", "head"])
    torch.save({
        "target": float(graph.metadata["target"]["value"]),
        "attribution": dict(zip(graph.nodes["node_id"], graph.nodes["attribution"].astype(float))),
        "n_edges": len(graph.edges),
        "scores": {m: {k: v.detach().cpu() for k, v in r.scores.values.items()} for m, r in comparison.runs.items()},
    }, out)


def _close(a: float, b: float, rtol: float = EXACT_RTOL) -> bool:
    return abs(a - b) <= rtol * max(1.0, abs(a), abs(b))


def _store_checks(cpu: Path, other: Path) -> list[dict[str, Any]]:
    import duckdb

    checks = []
    queries = {
        "corpus mean loss": "SELECT corpus_id, mean_loss FROM corpora ORDER BY 1",
        "task metrics": "SELECT task, clean_metric FROM task_baselines UNION ALL "
                        "SELECT task || ' corrupt', corrupt_metric FROM task_baselines ORDER BY 1",
        "induction scores": "SELECT layer * 1000 + head, induction FROM head_scores ORDER BY 1",
    }
    with duckdb.connect(str(cpu), read_only=True) as a, duckdb.connect(str(other), read_only=True) as b:
        for name, sql in queries.items():
            ra, rb = dict(a.execute(sql).fetchall()), dict(b.execute(sql).fetchall())
            worst = max((abs(ra[k] - rb.get(k, np.inf)) for k in ra), default=0.0)
            checks.append({"check": name, "ok": ra.keys() == rb.keys() and all(_close(ra[k], rb[k]) for k in ra),
                           "max_abs_diff": worst})
        sql = "SELECT dict_id, fve FROM dictionaries ORDER BY 1"
        fa, fb = dict(a.execute(sql).fetchall()), dict(b.execute(sql).fetchall())
        gap = max((fa[k] - fb.get(k, -np.inf) for k in fa), default=0.0)
        checks.append({"check": "trained dictionaries' FVE (other device at most the margin below)",
                       "ok": fa.keys() == fb.keys() and gap <= TRAINED_MARGIN, "max_fve_gap": gap})
    return checks


def _live_checks(cpu: dict[str, Any], other: dict[str, Any]) -> list[dict[str, Any]]:
    checks = [{"check": "graph target value", "ok": _close(cpu["target"], other["target"]),
               "cpu": cpu["target"], "other": other["target"]}]
    shared = sorted(set(cpu["attribution"]) & set(other["attribution"]))
    a = np.array([cpu["attribution"][k] for k in shared])
    b = np.array([other["attribution"][k] for k in shared])
    overlap = len(shared) / max(len(cpu["attribution"]), 1)
    r = float(np.corrcoef(a, b)[0, 1]) if len(shared) > 2 else float("nan")
    checks.append({"check": "graph nodes and their attribution to the target", "ok": overlap >= 0.95 and r >= 0.999,
                   "node_overlap": overlap, "attribution_r": r})
    for method, kinds in cpu["scores"].items():
        for kind, value in kinds.items():
            x, y = value.double().numpy().ravel(), other["scores"][method][kind].double().numpy().ravel()
            scale = max(float(np.abs(x).max()), 1e-6)
            checks.append({"check": f"{method} scores ({kind})", "ok": float(np.abs(x - y).max()) <= 1e-2 * scale,
                           "max_abs_diff_over_max": float(np.abs(x - y).max()) / scale})
    return checks


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--contexts", type=int, default=64)
    parser.add_argument("--model", default=MODEL, help="registry model (tiny-llama checks the script itself quickly)")
    parser.add_argument("--one", nargs=4, metavar=("DEVICE", "MODEL", "STORE", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.one:
        _one(args.one[0], args.one[1], Path(args.one[2]), Path(args.one[3]))
        return 0
    import torch

    OUT.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    stores = {}
    for device in ("cpu", args.device):
        store = OUT / f"{args.model}-{device.replace(':', '-')}.duckdb"
        if not store.exists():  # a finished precompute is kept: rerunning the script resumes at the checks
            subprocess.run([sys.executable, "-m", "backend", "precompute", "--device", device, "--model", args.model,
                            "--store", str(store), "--preset", "demo", "--contexts", str(args.contexts)],
                           check=True, env=env, cwd=ROOT)
        stores[device] = store
    live = {}
    for device in ("cpu", args.device):
        out = OUT / f"live-{args.model}-{device.replace(':', '-')}.pt"
        subprocess.run([sys.executable, "-m", "benchmarks.gpu_smoke", "--one", device, args.model, str(stores["cpu"]),
                        str(out)], check=True, env=env, cwd=ROOT)
        live[device] = torch.load(out, weights_only=True)
    checks = _store_checks(stores["cpu"], stores[args.device]) + _live_checks(live["cpu"], live[args.device])
    result = {"device": args.device, "model": args.model, "contexts": args.contexts, "ok": all(c["ok"] for c in checks), "checks": checks}
    (OUT / "result.json").write_text(json.dumps(result, indent=2))
    for c in checks:
        print(("ok   " if c["ok"] else "FAIL ") + c["check"])
    print(f"{'all checks passed' if result['ok'] else 'some checks failed'}: {OUT / 'result.json'}")
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
