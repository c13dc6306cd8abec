"""``make bench``: measure, in one run, the numbers later benchmarks are compared against.

Writes ``benchmarks/results/latest.json`` (and a dated copy) with:
* model load time: cold (dequantize the GGUF + convert, in a fresh cache dir) vs cached safetensors reload,
  each in its own subprocess so imports and caches do not leak between them;
* forward throughput (tokens/s) of the embedded model at a few batch sizes, with 1 and 2 torch threads
  (on a loaded 2-core machine 1 thread is sometimes faster: measured, not assumed);
* ``features``: the attention-SAE feature precompute's throughput as a ratio to a bare forward pass (with where its time
  goes and what its store writes cost and take per corpus token), and the Feature Browser's query latency p50/p95 on a
  store with >= 10^7 nonzero activations, on fresh and on pooled read-only connections (benchmarks/features_bench.py).
* ``attribution``: Pearson r of AtP / RelP / IG with activation patching per component kind on IOI, and the wall-time
  ratio of activation patching to RelP over all heads and MLPs (benchmarks/attribution_bench.py).
* ``induction``: the induction precompute step's wall time as a ratio to a bare forward pass over the same probe
  tokens (benchmarks/induction_bench.py).
* ``transcoder``: one layer's transcoder quality (held-out FVE beside its dense linear baseline, L0) vs training tokens,
  and its training time as a ratio to the forward pass that collects those tokens (benchmarks/transcoder_bench.py).
* ``store``: saving a graph beside the store vs an empty precompute commit (a copy of the store), two saves at once,
  and the store's bytes per corpus token, per nonzero activation and largest tables (benchmarks/store_bench.py).
* ``e2e``: time to result in headless chromium, p50 / p95 over ten concurrent Prompt Explorer sessions on one server,
  as a ratio to one session alone; every session's answer checked, model loads counted (benchmarks/e2e_bench.py).

Claims in the README quote these files as ratios measured in the same run, never as timed test assertions.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"

_LOAD_SNIPPET = """
import json, sys, time
t0 = time.perf_counter()
import torch, transformer_lens, transformers  # heavy imports timed apart from the load itself
from backend.model.registry import load_model
t_import = time.perf_counter() - t0
t1 = time.perf_counter()
load_model(sys.argv[1])
print(json.dumps({"import_s": t_import, "load_s": time.perf_counter() - t1}))
"""


def _load_in_subprocess(model: str, cache_dir: str | None) -> dict[str, float]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    if cache_dir:
        env["CIRCUITSCOPE_CACHE_DIR"] = cache_dir
    out = subprocess.run([sys.executable, "-c", _LOAD_SNIPPET, model], capture_output=True, text=True, env=env,
                         cwd=ROOT, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def bench_load(model: str) -> dict[str, Any]:
    """Cold (fresh cache: GGUF dequantize + convert) vs cached reload, seconds inside the process."""
    with tempfile.TemporaryDirectory() as tmp:
        cold = _load_in_subprocess(model, tmp)
    _load_in_subprocess(model, None)  # make sure the project cache exists
    warm = _load_in_subprocess(model, None)
    return {"cold_gguf_s": round(cold["load_s"], 3), "cached_s": round(warm["load_s"], 3),
            "cold_over_cached": round(cold["load_s"] / warm["load_s"], 1), "import_s": round(warm["import_s"], 2)}


def bench_forward(model_name: str, batch_sizes: list[int], seq_len: int, repeats: int) -> list[dict[str, Any]]:
    """Tokens per second of a no-grad forward pass, per batch size and torch thread count."""
    import torch

    from backend.model.registry import load_model

    model = load_model(model_name)
    gen = torch.Generator().manual_seed(0)
    rows = []
    for threads in (1, 2):
        torch.set_num_threads(threads)
        for bs in batch_sizes:
            tokens = torch.randint(100, 20_000, (bs, seq_len), generator=gen)
            with torch.no_grad():
                model(tokens[:1, :8])  # warm-up
                times = []
                for _ in range(repeats):
                    t0 = time.perf_counter()
                    model(tokens)
                    times.append(time.perf_counter() - t0)
            best = min(times)
            rows.append({"threads": threads, "batch": bs, "seq_len": seq_len, "best_s": round(best, 4),
                         "tokens_per_s": round(bs * seq_len / best, 1)})
    torch.set_num_threads(2)
    return rows


def main(argv: list[str] | None = None) -> int:
    """Run the benchmarks and write the JSON result."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default=str(RESULTS / "latest.json"))
    parser.add_argument("--skip-features", action="store_true", help="skip the attention-SAE feature benchmarks")
    parser.add_argument("--skip-induction", action="store_true",
                        help="skip the induction-step benchmark (step time vs a bare forward pass)")
    parser.add_argument("--skip-attribution", action="store_true",
                        help="skip the attribution benchmark (patching vs AtP / RelP / IG on IOI, a few minutes)")
    parser.add_argument("--skip-graph", action="store_true",
                        help="skip the attribution-graph benchmark (20-token prompt: build / prune / check / export)")
    parser.add_argument("--skip-store", action="store_true", help="skip the store write / size benchmark")
    parser.add_argument("--skip-transcoder", action="store_true",
                        help="skip the transcoder quality-vs-training-tokens benchmark (one layer, a few minutes)")
    parser.add_argument("--skip-e2e", action="store_true",
                        help="skip the real-browser concurrency benchmark (needs chromium: `make browser`)")
    args = parser.parse_args(argv)

    result: dict[str, Any] = {
        "when": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform()},
        "model": args.model,
    }
    print("benchmark: model load (cold GGUF vs cached) ...", flush=True)
    result["load"] = bench_load(args.model)
    print(f"  {result['load']}", flush=True)
    print("benchmark: forward throughput ...", flush=True)
    result["forward"] = bench_forward(args.model, [1, 4, 16], args.seq_len, args.repeats)
    for row in result["forward"]:
        print(f"  {row}", flush=True)
    if not args.skip_features:
        from benchmarks import features_bench

        result["features"] = features_bench.run(args.model)  # precompute throughput + feature page query latency
    if not args.skip_induction:
        from benchmarks import induction_bench

        result["induction"] = induction_bench.run(args.model)  # induction step time as a ratio to a bare forward pass
    if not args.skip_attribution:
        from benchmarks import attribution_bench

        result["attribution"] = attribution_bench.run(args.model)  # Pearson r vs patching, RelP / patching speed
    if not args.skip_graph:
        from benchmarks import graph_bench

        result["graph"] = graph_bench.run(args.model)  # graph build time for a 20-token prompt, ratio to a forward
    if not args.skip_transcoder:
        from benchmarks import transcoder_bench

        result["transcoder"] = transcoder_bench.run(args.model)  # quality vs training tokens, one layer
    if not args.skip_store:
        from benchmarks import store_bench

        result["store"] = store_bench.run()  # save vs commit overhead, store size per corpus token
    if not args.skip_e2e:
        from benchmarks import e2e_bench

        result["e2e"] = e2e_bench.run()  # 10 concurrent browser sessions: p50 / p95 time to result

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(result, indent=2)
    out.write_text(text)
    (out.parent / f"bench-{result['when'][:10]}.json").write_text(text)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
