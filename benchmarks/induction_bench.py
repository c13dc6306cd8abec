"""Benchmark of the ``induction`` precompute step (backend/heads/induction.py) on the real model with a preset's sizes.

Times the whole step (probe batches, one cached forward per batch with every layer's pattern and hook_z, the direct
effects, classification and the DuckDB writes) into a scratch store, and a bare no-grad forward pass over token
batches of exactly the same shapes in the same run, so the ratio says what the step costs beyond the forward passes
it cannot avoid even when the machine is shared. ``python -m benchmarks.induction_bench [--preset demo]`` writes
``benchmarks/results/induction-latest.json``.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from dataclasses import asdict
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"


def run(model_name: str = "smollm2-135m", preset_name: str = "demo") -> dict[str, Any]:
    """Step seconds, bare-forward seconds over the same shapes, their ratio and the number of probe tokens."""
    import torch

    from backend.heads import induction as ind
    from backend.inputs.prompts import model_bos_id
    from backend.inputs.tasks import word_token_pool
    from backend.model.registry import get_spec, load_model
    from backend.pipeline.config import PRESETS
    from backend.pipeline.context import RunContext
    from backend.store.access import StoreWriter

    model, spec, preset = load_model(model_name), get_spec(model_name), PRESETS[preset_name]
    bos = model_bos_id(model)
    sizes = ind.probe_sizes(preset, int(model.cfg.n_ctx), bos)
    pool = word_token_pool(model.tokenizer)
    shapes = [tuple(ind.repeat_tokens(pool, sizes.n_sequences, sizes.repeat_len, bos).shape)]
    shapes += [tuple(b.tokens.shape) for b in ind.probe_batches(pool, sizes, bos)]
    with tempfile.TemporaryDirectory() as tmp:
        with StoreWriter(Path(tmp) / "bench.duckdb", kind="bench", model=spec.name) as w:
            ctx = RunContext(model=model, spec=spec, writer=w, preset=preset, layers=[], corpus_source="builtin")
            t0 = time.perf_counter()
            ind.step_induction(ctx)
            step_s = time.perf_counter() - t0
    gen = torch.Generator().manual_seed(0)
    t0 = time.perf_counter()
    with torch.no_grad():
        for n, length in shapes:
            tokens = torch.randint(1000, 20_000, (n, length), generator=gen)
            for start in range(0, n, preset.batch_size):
                model(tokens[start : start + preset.batch_size])
    bare_s = time.perf_counter() - t0
    n_tokens = sum(n * length for n, length in shapes)
    return {"preset": preset_name, "sizes": asdict(sizes),
            "probe_tokens": n_tokens, "step_s": round(step_s, 2), "bare_forward_s": round(bare_s, 2),
            "step_over_bare_forward": round(step_s / bare_s, 3), "bare_tokens_per_s": round(n_tokens / bare_s, 1),
            "torch_threads": torch.get_num_threads()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--preset", default="demo")
    parser.add_argument("--out", default=str(RESULTS / "induction-latest.json"))
    args = parser.parse_args(argv)
    result = {"when": datetime.now(timezone.utc).isoformat(timespec="seconds"), "model": args.model,
              "induction_step": run(args.model, args.preset)}
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
