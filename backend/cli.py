"""Command line: ``python -m backend precompute ...`` and ``python -m backend info STORE``.

User errors (unknown model, bad store, bad options) print one sentence and exit with status 2 — never a
traceback wall. Long steps show tqdm bars with ETA.
"""

from __future__ import annotations

import argparse
import sys
from typing import Sequence

from backend.errors import CircuitscopeError


def _build_parser() -> argparse.ArgumentParser:
    from backend.models import DEFAULT_MODEL

    parser = argparse.ArgumentParser(prog="python -m backend", description="circuitscope backend")
    sub = parser.add_subparsers(dest="command", required=True)

    pre = sub.add_parser("precompute", help="build a store (or add a run to one) from a model and a corpus")
    pre.add_argument("--model", default=DEFAULT_MODEL, help=f"registry or TransformerLens model name (default {DEFAULT_MODEL})")
    pre.add_argument("--store", required=True, help="path of the .duckdb store to create or extend")
    pre.add_argument("--preset", default="demo", help="demo (<= 10 min on 2 cores) or full")
    pre.add_argument("--layers", default=None, help="'all', 'spread:K' or a list like '0,5,10-12' (default: preset's)")
    pre.add_argument("--corpus", default="builtin",
                     help="'builtin', a .txt/.jsonl/.parquet file, or hf:DATASET[:SPLIT[:COLUMN]]")
    pre.add_argument("--contexts", type=int, default=None, help="override the preset's number of corpus contexts")
    pre.add_argument("--saes", action="append", default=None, metavar="RELEASE_OR_DIR",
                     help="import attention SAEs instead of training: a sae-lens release (e.g. gpt2-small-hook-z-kk; "
                          "one SAE per --layers layer) or a sae-lens-format directory; repeatable")

    info = sub.add_parser("info", help="print what a store holds")
    info.add_argument("store", help="path of the .duckdb store")
    return parser


def _cmd_precompute(args: argparse.Namespace) -> int:
    from backend.precompute import precompute

    precompute(args.model, args.store, preset=args.preset, layers=args.layers, corpus_source=args.corpus,
               n_contexts=args.contexts, saes=args.saes)
    return 0


def _cmd_info(args: argparse.Namespace) -> int:
    import pandas as pd

    from backend import queries
    from backend.store import reading

    with reading(args.store) as con:
        s = queries.summary(con)
    with pd.option_context("display.width", 160, "display.max_columns", 20, "display.max_colwidth", 60):
        print(f"store {args.store} (schema v{s['schema_version']})")
        for key in ("models", "corpora", "dictionaries", "task_baselines"):
            frame = s[key]
            print(f"\n## {key} ({len(frame)})")
            print(frame.to_string(index=False) if len(frame) else "  (none)")
        print(f"\n## runs ({len(s['runs'])})")
        print(s["runs"][["run_id", "kind", "model", "preset", "status", "seconds"]].to_string(index=False))
        print("\n## rows per table")
        print("  " + ", ".join(f"{k}={v:,}" for k, v in s["counts"].items()))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the process exit status."""
    args = _build_parser().parse_args(argv)
    try:
        if args.command == "precompute":
            return _cmd_precompute(args)
        return _cmd_info(args)
    except CircuitscopeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: the store is unchanged (the partial run was discarded)", file=sys.stderr)
        return 130
