"""Benchmark of transcoder training (backend/dictionaries/transcoder_training.py): quality vs training tokens, one layer.

For one MLP layer of the real model (default 15 of SmolLM2's 30), trains the demo recipe (BatchTopK + skip, 1 epoch)
on the first 32 / 64 / 128 / 256 corpus contexts and reports, on held-out contexts never trained on: the FVE of the
transcoder and of its dense linear baseline fitted on the same tokens, the transcoder's L0, and the training time as a
ratio to a bare forward pass over the same training tokens (what a precompute already pays to collect them). Sink
positions (BOS, document separators) and outlier rows are dropped as the precompute drops them.
``python -m benchmarks.transcoder_bench`` writes ``benchmarks/results/transcoder-latest.json``.
"""

from __future__ import annotations

import argparse
import json
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"


def run(model_name: str = "smollm2-135m", layer: int = 15, sizes: tuple[int, ...] = (32, 64, 128, 256),
        held_out: int = 32) -> dict[str, Any]:
    """Quality and cost of one layer's transcoder at each training size (contexts of 128 tokens)."""
    import torch

    from backend.dictionaries.config import TranscoderConfig
    from backend.dictionaries.steps import training_rows
    from backend.dictionaries.transcoder import collect_mlp_io, sink_positions
    from backend.dictionaries.transcoder_training import data_statistics, explained_variance, train_transcoder
    from backend.inputs import corpus
    from backend.inputs.prompts import model_bos_id
    from backend.model.registry import load_model

    model = load_model(model_name)
    cfg = TranscoderConfig()
    n_train_max = max(sizes)
    contexts = corpus.tokenize_contexts(corpus.load_documents(corpus.BUILTIN), model.tokenizer, n_ctx=128,
                                        bos=model_bos_id(model), max_contexts=n_train_max + held_out)
    tokens = contexts.tokens
    separator = corpus.document_separator_id(model.tokenizer)
    t0 = time.perf_counter()
    x_all, y_all = collect_mlp_io(model, tokens, [layer], batch_size=16)[layer]
    forward_s_per_context = (time.perf_counter() - t0) / len(tokens)
    rows_per = tokens.shape[1] - 1
    held = slice(n_train_max * rows_per, None)
    keep_held = ~sink_positions(tokens[n_train_max:], separator)[:, 1:].reshape(-1)
    hx, hy = x_all[held][keep_held], y_all[held][keep_held]
    _, limit_all = training_rows(tokens[:n_train_max], y_all[: n_train_max * rows_per], separator, cfg.massive_ratio)
    ordinary = hy.norm(dim=-1) <= limit_all  # massive activations are not scored (as in the precompute)
    hx, hy = hx[ordinary], hy[ordinary]
    points = []
    for n in sizes:
        x, y = x_all[: n * rows_per], y_all[: n * rows_per]
        rows, limit = training_rows(tokens[:n], y, separator, cfg.massive_ratio)
        x, y = x[rows], y[rows]
        t1 = time.perf_counter()
        linear = data_statistics((x, y), ridge=cfg.ridge)
        tc, info = train_transcoder((x, y), int(cfg.expansion * model.cfg.d_model), k=cfg.k, skip=cfg.skip,
                                    architecture=cfg.architecture, epochs=cfg.epochs, lr=cfg.lr,
                                    batch_size=cfg.batch_size, ridge=cfg.ridge, seed=layer, linear=linear)
        seconds = time.perf_counter() - t1
        with torch.no_grad():
            l0 = float((tc.encode(hx) != 0).float().sum(-1).mean())
        point = {"train_contexts": n, "train_tokens": int(x.shape[0]),
                 "fve": round(explained_variance(tc, (hx, hy)), 4),
                 "linear_fve": round(explained_variance(linear.predict, (hx, hy)), 4), "l0": round(l0, 1),
                 "train_s": round(seconds, 2),
                 "train_over_forward": round(seconds / (forward_s_per_context * n), 2)}
        point["fve_gain"] = round(point["fve"] - point["linear_fve"], 4)
        print(f"  transcoder L{layer}: {point}", flush=True)
        points.append(point)
    return {"model": model_name, "layer": layer, "held_out_contexts": held_out, "held_out_tokens": int(hx.shape[0]),
            "recipe": {k: getattr(cfg, k) for k in ("architecture", "skip", "k", "epochs", "lr", "batch_size")},
            "torch_threads": torch.get_num_threads(), "points": points}


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark and write its JSON."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--layer", type=int, default=15)
    parser.add_argument("--out", default=str(RESULTS / "transcoder-latest.json"))
    args = parser.parse_args(argv)
    result = {"when": datetime.now(timezone.utc).isoformat(timespec="seconds"), **run(args.model, args.layer)}
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
