"""Command line: ``python -m backend precompute ...``, ``python -m backend attribute ...`` and
``python -m backend info STORE``.

User errors (unknown model, bad store, bad options) print one sentence and exit with status 2 — never a
traceback wall. Long steps show tqdm bars with ETA.
"""

from __future__ import annotations

import argparse
import sys
from typing import Sequence

from backend.errors import CircuitscopeError


def _build_parser() -> argparse.ArgumentParser:
    from backend.model.registry import DEFAULT_MODEL

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
    pre.add_argument("--transcoders", nargs="+", action="extend", default=None, metavar="SRC",
                     help="import MLP transcoders instead of training them: sae-lens-format transcoder directories "
                          "and/or sae-lens releases (one transcoder per --transcoder-layers layer; RELEASE:SAE_ID "
                          "for one)")
    pre.add_argument("--transcoder-layers", default=None,
                     help="layers that get transcoders, same syntax as --layers (default: the preset's, 'all'); "
                          "--layers does not change them")

    att = sub.add_parser("attribute", help="compare attribution methods (patching, AtP, AtP*, RelP, IG) on a task or a "
                                           "clean/corrupt pair and store the comparison")
    att.add_argument("--store", required=True, help="path of the .duckdb store to write into (created if missing)")
    att.add_argument("--model", default=DEFAULT_MODEL, help=f"registry or TransformerLens model name (default {DEFAULT_MODEL})")
    att.add_argument("--task", default=None, help="a built-in task: ioi, greater-than, induction, induction-text, "
                                                  "factual, sva")
    att.add_argument("--examples", type=int, default=4, help="prompt pairs of the task (default 4)")
    att.add_argument("--seed", type=int, default=0, help="task prompt seed")
    att.add_argument("--clean", default=None, help="instead of --task: the clean prompt")
    att.add_argument("--corrupt", default=None, help="the corrupted prompt (same token count as --clean)")
    att.add_argument("--answer", default=None, help="the clean answer token, e.g. ' Mary'")
    att.add_argument("--wrong", default=None, help="the wrong answer token, e.g. ' John'")
    att.add_argument("--methods", default=None, help="comma-separated methods (default: every available one of "
                                                     "patching, atp, atpstar, relp, ig)")
    att.add_argument("--kinds", default="resid,mlp,head", help="comma-separated component kinds: resid, mlp, head, "
                                                               "feature (the store's attention SAEs)")
    att.add_argument("--ig-steps", type=int, default=8, help="integrated-gradient steps (default 8)")
    att.add_argument("--per-position-heads", action="store_true", help="score heads per position too")

    gr = sub.add_parser("graph", help="build (or load) an attribution graph for a prompt, prune it, check its "
                                      "faithfulness, store it and export it")
    gr.add_argument("--store", required=True, help="path of the .duckdb store (its transcoders and attention SAEs "
                                                  "are used; the graph is saved into it with --save)")
    gr.add_argument("--model", default=DEFAULT_MODEL, help=f"registry or TransformerLens model name (default {DEFAULT_MODEL})")
    gr.add_argument("--prompt", default=None, help="the prompt text")
    gr.add_argument("--graph-id", default=None, help="instead of --prompt: a graph stored in --store")
    gr.add_argument("--answer", default=None, help="target token (default: the model's top prediction), e.g. ' Paris'")
    gr.add_argument("--wrong", default=None, help="explain the logit difference answer - wrong instead")
    gr.add_argument("--max-nodes", type=int, default=400, help="candidate nodes kept when building (default 400)")
    gr.add_argument("--no-attn-saes", action="store_true", help="use heads even where the store has attention SAEs")
    gr.add_argument("--node-threshold", type=float, default=0.8, help="cumulative node influence kept (default 0.8)")
    gr.add_argument("--edge-threshold", type=float, default=0.98, help="cumulative edge influence kept (default 0.98)")
    gr.add_argument("--faithfulness", choices=["zero", "mean", "none"], default="zero",
                    help="ablate everything outside the pruned circuit this way and report the metric kept")
    gr.add_argument("--save", action="store_true", help="store the (unpruned) graph in --store")
    gr.add_argument("--export", action="append", default=None, metavar="FILE",
                    help="write the pruned graph to FILE; the format follows the suffix: .svg .png .graphml .dot "
                         ".json (Neuronpedia / circuit-tracer schema); repeatable")

    info = sub.add_parser("info", help="print what a store holds")
    info.add_argument("store", help="path of the .duckdb store")
    return parser


def _cmd_precompute(args: argparse.Namespace) -> int:
    from backend.pipeline.run import precompute

    precompute(args.model, args.store, preset=args.preset, layers=args.layers, corpus_source=args.corpus,
               n_contexts=args.contexts, saes=args.saes, transcoders=args.transcoders,
               transcoder_layers=args.transcoder_layers)
    return 0


def _split(value: str | None) -> list[str] | None:
    return None if value is None else [v.strip() for v in value.split(",") if v.strip()]


def _cmd_attribute(args: argparse.Namespace) -> int:
    from pathlib import Path

    from backend.attribution import queries as aq
    from backend.attribution.compare import check_methods, feature_dictionaries, run_comparison, save_comparison
    from backend.attribution.components import check_kinds
    from backend.errors import InputError
    from backend.inputs.tasks import build_task, custom_pair
    from backend.model.registry import get_spec, load_model
    from backend.progress import say
    from backend.store.access import reading

    pair = [args.clean, args.corrupt, args.answer, args.wrong]
    if (args.task is None) == all(v is None for v in pair):
        raise InputError("Give either --task NAME or --clean/--corrupt/--answer/--wrong, not both and not neither.")
    if args.task is None and any(v is None for v in pair):
        raise InputError("A custom pair needs all four of --clean, --corrupt, --answer and --wrong.")
    if args.ig_steps < 1:
        raise InputError(f"--ig-steps must be a positive whole number, not {args.ig_steps}.")
    methods = check_methods(_split(args.methods))
    kinds = _split(args.kinds) or []
    dictionaries = dict_ids = None
    if "feature" in kinds:
        with reading(args.store) as con:
            dictionaries, dict_ids = feature_dictionaries(con, args.model)
    kinds = check_kinds(kinds, dictionaries)
    spec = get_spec(args.model)
    model = load_model(args.model, progress=say)
    batch = (build_task(args.task, model, n=args.examples, seed=args.seed) if args.task is not None
             else custom_pair(model, args.clean, args.corrupt, args.answer, args.wrong))
    comparison = run_comparison(model, batch, spec.name, methods, kinds, ig_steps=args.ig_steps,
                                per_position_heads=args.per_position_heads, dictionaries=dictionaries,
                                dictionary_ids=dict_ids, source="cli")
    save_comparison(args.store, comparison, model, spec)
    with reading(Path(args.store)) as con:
        timing = aq.attribution_methods(con, comparison.comparison_id)
        pearson = aq.attribution_pearson(con, comparison.comparison_id)
    print(f"comparison {comparison.comparison_id} ({batch.name}, {len(batch)} example(s)) written to {args.store}")
    print(timing[["method", "seconds", "speedup_vs_patching"]].to_string(index=False))
    if len(pearson):
        print("Pearson r with activation patching:")
        print(pearson.pivot(index="method", columns="component", values="pearson_r").round(3).to_string())
    return 0


def _cmd_graph(args: argparse.Namespace) -> int:
    from pathlib import Path

    from backend.circuits import faithfulness as faith
    from backend.circuits.build import BuildParams, build_graph
    from backend.circuits.prune import prune
    from backend.circuits.storage import read_graph, save_graph
    from backend.dictionaries.storage import graph_dictionaries
    from backend.errors import InputError
    from backend.model.registry import get_spec, load_model
    from backend.progress import say
    from backend.store.access import reading

    if (args.prompt is None) == (args.graph_id is None):
        raise InputError("Give either --prompt TEXT or --graph-id ID, not both and not neither.")
    for name in ("node_threshold", "edge_threshold"):
        if not 0.0 <= getattr(args, name) <= 1.0:
            raise InputError(f"--{name.replace('_', '-')} is a fraction between 0 and 1, not {getattr(args, name)}.")
    spec = get_spec(args.model)
    need_model = args.prompt is not None or args.faithfulness != "none"
    with reading(args.store) as con:
        transcoders, saes = graph_dictionaries(con, spec.name, attn_saes=not args.no_attn_saes)
        graph = read_graph(con, args.graph_id) if args.graph_id else None
    if graph is not None:
        saes = saes if graph.metadata.get("dictionaries", {}).get("attn_sae_layers") else {}
    model = load_model(args.model, progress=say) if need_model else None
    if graph is None:
        if not transcoders:
            say("This store has no transcoders: every MLP is one error node (build them with the precompute).")
        graph = build_graph(model, args.prompt, transcoders, saes, answer=args.answer, wrong=args.wrong,
                            params=BuildParams(max_nodes=args.max_nodes), model_name=spec.name)
        for warning in graph.metadata.get("warnings", []):
            say(warning)
    t = graph.metadata["target"]
    print(f"graph of {graph.metadata['prompt']!r} -> {t['token']!r}"
          + (f" - {t['wrong']!r}" if t.get("wrong") is not None else "")
          + f" (metric {t['value']:.3f}): {len(graph.nodes)} nodes, {len(graph.edges)} edges")
    pruned = prune(graph, args.node_threshold, args.edge_threshold)
    print(f"pruned (node {args.node_threshold}, edge {args.edge_threshold}): {len(pruned.nodes)} nodes, "
          f"{len(pruned.edges)} edges")
    if args.faithfulness != "none":
        result = faith.check_in_store(model, pruned, transcoders, saes, args.faithfulness, args.store, spec.name)
        pruned.metadata["faithfulness"] = result.as_dict()
        print(f"faithfulness ({args.faithfulness} ablation): circuit {result.metric_circuit:.3f}, full "
              f"{result.metric_full:.3f}, nothing {result.metric_empty:.3f} -> fraction kept {result.fraction:.3f}")
    if args.save:
        gid = save_graph(args.store, graph, source="cli")
        print(f"saved as {gid} in {args.store}")
    for path in args.export or []:
        from backend.circuits.export import export_to_file

        export_to_file(pruned, Path(path))
        print(f"wrote {path}")
    return 0


def _cmd_info(args: argparse.Namespace) -> int:
    import pandas as pd

    from backend.store import queries
    from backend.store.access import reading

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
        if args.command == "attribute":
            return _cmd_attribute(args)
        if args.command == "graph":
            return _cmd_graph(args)
        return _cmd_info(args)
    except CircuitscopeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: the store is unchanged (the partial run was discarded)", file=sys.stderr)
        return 130
