"""Command line: ``python -m backend precompute | improve | attribute | graph | compare-graphs | intervene | label |
search | bundle | export-sae | import-graph | info | compact``.

User errors (unknown model, bad store, bad options, a full disk) print one line starting with ``error:`` and exit
with status 2 — never a traceback wall or argparse's usage block. Every option is checked, within bounds, before any
work (loading a model, copying a store). Long steps show tqdm bars with ETA.
"""

from __future__ import annotations

import argparse
import math
import sys
from typing import Callable, NoReturn, Sequence

from backend.errors import CircuitscopeError, literal

# Bounds of the numeric options: generous for real runs, small enough that a typo cannot ask for days of work or
# exhaust memory before anything is checked.
MAX_CONTEXTS = 1_000_000
MAX_EXAMPLES = 10_000
MAX_IG_STEPS = 1_024
MAX_NODES = 100_000
MAX_SEED = 2**32 - 1


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors: ``error: argument --contexts: ...`` and exit status 2, no usage block (``-h``
    still prints the full help). Subparsers inherit the class."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"error: {message} (see `{self.prog} --help`)\n")


def _whole(lo: int, hi: int) -> Callable[[str], int]:
    """argparse type: a whole number (ASCII digits, optional sign) from ``lo`` to ``hi``."""

    def parse(text: str) -> int:
        t = text.strip()
        body = t[1:] if t[:1] in "+-" else t
        if not (body.isascii() and body.isdigit()) or len(body) > 18 or not lo <= int(t) <= hi:
            raise argparse.ArgumentTypeError(f"expected a whole number from {lo:,} to {hi:,}, not {literal(text, 40)}")
        return int(t)

    return parse


def _fraction() -> Callable[[str], float]:
    """argparse type: a number from 0 to 1."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            value = math.nan
        if not 0.0 <= value <= 1.0:  # also refuses nan and inf
            raise argparse.ArgumentTypeError(f"expected a fraction between 0 and 1, not {literal(text, 40)}")
        return value

    return parse


def _build_parser() -> argparse.ArgumentParser:
    from backend.interventions.run import MAX_CONTINUATION, MAX_TOP_K
    from backend.model.registry import DEFAULT_MODEL

    parser = _Parser(prog="python -m backend", description="circuitscope backend")
    sub = parser.add_subparsers(dest="command", required=True)
    on_device = argparse.ArgumentParser(add_help=False)
    on_device.add_argument("--device", default=None,
                           help="auto (default: a CUDA GPU when torch sees one, else mps, else the CPU), cpu, cuda, "
                                "cuda:N or mps; the CIRCUITSCOPE_DEVICE environment variable sets the default")

    pre = sub.add_parser("precompute", help="build a store (or add a run to one) from a model and a corpus",
                         parents=[on_device])
    pre.add_argument("--model", default=DEFAULT_MODEL, help=f"registry or TransformerLens model name (default {DEFAULT_MODEL})")
    pre.add_argument("--store", required=True, help="path of the .duckdb store to create or extend")
    pre.add_argument("--preset", default="demo", help="demo (<= 10 min on 2 cores) or full")
    pre.add_argument("--layers", default=None, help="'all', 'spread:K' or a list like '0,5,10-12' (default: preset's)")
    pre.add_argument("--corpus", default="builtin",
                     help="'builtin', a .txt/.jsonl/.parquet file, or hf:DATASET[:SPLIT[:COLUMN]]")
    pre.add_argument("--contexts", type=_whole(1, MAX_CONTEXTS), default=None, help="override the preset's number of corpus contexts")
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
    pre.add_argument("--resume", action="store_true",
                     help="continue the unfinished run that a crash or kill left for this store (same options), from "
                          "its last finished step or layer")
    pre.add_argument("--executor", choices=("local", "ray"), default="local",
                     help="where per-layer training / evaluation and feature-scoring shards run: this process "
                          "(default) or Ray tasks")
    pre.add_argument("--ray-address", default=None,
                     help="with --executor ray: the Ray cluster to join (e.g. HEAD_IP:6379, or 'auto'); default: start "
                          "a local Ray with 2 CPUs")

    imp = sub.add_parser("improve", help="retrain a store's dictionaries with a stronger preset (default full) and "
                                         "recompute what depends on them, continuing an interrupted improvement; the "
                                         "store is swapped when done (make run starts this in the background)",
                         parents=[on_device])
    imp.add_argument("--store", required=True, help="path of the .duckdb store to improve")
    imp.add_argument("--preset", default="full", help="the preset whose dictionaries to train (default full)")
    imp.add_argument("--background", action="store_true",
                     help="start it as a detached, niced process logging to STORE.improve.log beside the store and "
                          "return at once; does nothing when it is running or finished, or CIRCUITSCOPE_IMPROVE=0")

    att = sub.add_parser("attribute", help="compare attribution methods (patching, AtP, AtP*, RelP, IG) on a task or a "
                                           "clean/corrupt pair and store the comparison",
                         parents=[on_device])
    att.add_argument("--store", required=True, help="path of the .duckdb store to write into (created if missing)")
    att.add_argument("--model", default=DEFAULT_MODEL, help=f"registry or TransformerLens model name (default {DEFAULT_MODEL})")
    att.add_argument("--task", default=None, help="a built-in task: ioi, greater-than, induction, induction-text, "
                                                  "factual, sva")
    att.add_argument("--examples", type=_whole(1, MAX_EXAMPLES), default=4, help="prompt pairs of the task (default 4)")
    att.add_argument("--seed", type=_whole(0, MAX_SEED), default=0, help="task prompt seed")
    att.add_argument("--clean", default=None, help="instead of --task: the clean prompt")
    att.add_argument("--corrupt", default=None, help="the corrupted prompt (same token count as --clean)")
    att.add_argument("--answer", default=None, help="the clean answer token, e.g. ' Mary'")
    att.add_argument("--wrong", default=None, help="the wrong answer token, e.g. ' John'")
    att.add_argument("--methods", default=None, help="comma-separated methods (default: every available one of "
                                                     "patching, atp, atpstar, relp, ig)")
    att.add_argument("--kinds", default="resid,mlp,head", help="comma-separated component kinds: resid, mlp, head, "
                                                               "feature (the store's attention SAEs)")
    att.add_argument("--ig-steps", type=_whole(1, MAX_IG_STEPS), default=8, help="integrated-gradient steps (default 8)")
    att.add_argument("--per-position-heads", action="store_true", help="score heads per position too")

    pruning = argparse.ArgumentParser(add_help=False)
    pruning.add_argument("--node-threshold", type=_fraction(), default=0.8,
                         help="cumulative node influence kept (default 0.8)")
    pruning.add_argument("--edge-threshold", type=_fraction(), default=0.98,
                         help="cumulative edge influence kept (default 0.98)")
    gr = sub.add_parser("graph", help="build (or load) an attribution graph for a prompt, prune it, check its "
                                      "faithfulness, store it and export it",
                        parents=[on_device, pruning])
    gr.add_argument("--store", required=True, help="path of the .duckdb store (its transcoders and attention SAEs "
                                                  "are used; the graph is saved into it with --save)")
    gr.add_argument("--model", default=DEFAULT_MODEL, help=f"registry or TransformerLens model name (default {DEFAULT_MODEL})")
    gr.add_argument("--prompt", default=None, help="the prompt text")
    gr.add_argument("--graph-id", default=None, help="instead of --prompt: a graph stored in --store")
    gr.add_argument("--answer", default=None, help="target token (default: the model's top prediction), e.g. ' Paris'")
    gr.add_argument("--wrong", default=None, help="explain the logit difference answer - wrong instead")
    gr.add_argument("--max-nodes", type=_whole(1, MAX_NODES), default=400,
                    help="feature nodes kept when building (default 400; embeddings and error nodes are always kept)")
    gr.add_argument("--no-attn-saes", action="store_true", help="use heads even where the store has attention SAEs")
    gr.add_argument("--faithfulness", choices=["zero", "mean", "none"], default="zero",
                    help="ablate everything outside the pruned circuit this way and report the metric kept")
    gr.add_argument("--heads", action="append", default=None, metavar="NODE_ID",
                    help="print NODE_ID's strongest incoming edges split by the attention heads that carry them; "
                         "repeatable")
    gr.add_argument("--timings", action="store_true", help="print the seconds spent in each phase (one JSON line)")
    gr.add_argument("--save", action="store_true", help="store the (unpruned) graph in --store")
    gr.add_argument("--export", action="append", default=None, metavar="FILE",
                    help="write the pruned graph to FILE; the format follows the suffix: .svg .png .graphml .dot "
                         ".json (Neuronpedia / circuit-tracer schema); repeatable")

    iv = sub.add_parser("intervene", help="set, scale or zero features or heads on a prompt and compare the next-token "
                                          "prediction (and a greedy continuation) with the unchanged model's",
                        parents=[on_device])
    iv.add_argument("--store", required=True, help="path of the .duckdb store whose transcoders and attention SAEs "
                                                   "are intervened on")
    iv.add_argument("--model", default=DEFAULT_MODEL, help=f"registry or TransformerLens model name (default {DEFAULT_MODEL})")
    iv.add_argument("--prompt", required=True, help="the prompt text")
    iv.add_argument("--set", required=True, dest="interventions", metavar="SPEC",
                    help="interventions KIND:LAYER:INDEX[@POSITIONS]=MODE[:VALUE] joined by ';' (KIND transcoder, attn "
                         "or head; MODE zero, scale or set), e.g. 'transcoder:12:1034@3,4=scale:2;head:18:6=zero'")
    iv.add_argument("--on", choices=["live", "frozen"], default="live",
                    help="the live model, or the frozen-attention replacement model an attribution graph explains")
    iv.add_argument("--answer", default=None, help="report the metric logit(answer) − mean logit, e.g. ' Paris'")
    iv.add_argument("--wrong", default=None, help="with --answer: report logit(answer) − logit(wrong) instead")
    iv.add_argument("--continue", type=_whole(0, MAX_CONTINUATION), default=0, dest="continue_tokens", metavar="N",
                    help="greedy continuation of N tokens with and without the interventions (live model only)")
    iv.add_argument("--top-k", type=_whole(1, MAX_TOP_K), default=5, help="next tokens listed (default 5)")

    lb = sub.add_parser("label", help="add the automatic feature labels to an existing store (a small run, no "
                                      "rebuild), or write your own label of one feature (a save beside the store)")
    lb.add_argument("--store", required=True, help="path of the .duckdb store")
    lb.add_argument("--dict", default=None, dest="dict_id", help="with --feature and --set: the feature's dictionary")
    lb.add_argument("--feature", type=_whole(0, 10**9), default=None, help="the feature index")
    lb.add_argument("--set", default=None, dest="user_label", metavar="TEXT",
                    help="your label of that feature (preferred over the automatic one; '' removes it)")

    se = sub.add_parser("search", help="find features of every dictionary by label text")
    se.add_argument("--store", required=True, help="path of the .duckdb store")
    se.add_argument("text", help="text the label contains (any case)")
    se.add_argument("--kind", choices=["attn_sae", "transcoder"], default=None, help="only this kind of dictionary")
    se.add_argument("--limit", type=_whole(1, 10_000), default=50, help="rows printed (default 50)")

    bu = sub.add_parser("bundle", help="export a stored graph with one dashboard JSON per feature (circuit-tracer / "
                                       "Neuronpedia feature format), pruned first", parents=[pruning])
    bu.add_argument("--store", required=True, help="path of the .duckdb store")
    bu.add_argument("--graph-id", required=True, help="a graph stored in --store (see the Circuit Graph page)")
    bu.add_argument("--out", required=True, help="a new or empty directory, or a .zip file")

    ex = sub.add_parser("export-sae", help="write a stored dictionary as a sae-lens directory (cfg.json + "
                                           "sae_weights.safetensors; sae_lens.SAE.load_from_disk reads it)")
    ex.add_argument("--store", required=True, help="path of the .duckdb store")
    ex.add_argument("--dict", required=True, dest="dict_id", help="the dictionary's id (python -m backend info)")
    ex.add_argument("--out", required=True, help="a new or empty directory")

    cg = sub.add_parser("compare-graphs", help="the attribution graphs of two prompts side by side: shared and "
                                               "unique nodes, and the nodes whose influence changed most",
                        parents=[on_device, pruning])
    cg.add_argument("--store", required=True, help="path of the .duckdb store whose transcoders and attention SAEs "
                                                   "are used (or whose stored graphs are compared)")
    cg.add_argument("--model", default=DEFAULT_MODEL, help=f"registry or TransformerLens model name (default {DEFAULT_MODEL})")
    for side, which in (("a", "first"), ("b", "second")):
        cg.add_argument(f"--prompt-{side}", default=None, help=f"the {which} prompt (or --graph-{side})")
        cg.add_argument(f"--graph-{side}", default=None, help=f"instead of --prompt-{side}: a graph stored in --store")
        cg.add_argument(f"--answer-{side}", default=None, help=f"target token of the {which} graph (default: top "
                                                               "prediction)")
    cg.add_argument("--top", type=_whole(1, MAX_NODES), default=20, help="nodes listed by influence change (default 20)")

    info = sub.add_parser("info", help="print what a store holds")
    info.add_argument("store", help="path of the .duckdb store")

    ig = sub.add_parser("import-graph", help="import a Neuronpedia / circuit-tracer graph JSON (with its pins, "
                                             "supernodes and labels) into a store")
    ig.add_argument("file", help="the graph .json (circuitscope's export, circuit-tracer's or Neuronpedia's)")
    ig.add_argument("--store", required=True, help="path of the .duckdb store to save it beside")
    ig.add_argument("--model", default=None, help="model name to record (default: the JSON's metadata.scan)")

    cp = sub.add_parser("compact", help="fold the graphs and comparisons saved beside a store into the store itself")
    cp.add_argument("store", help="path of the .duckdb store")
    return parser


def _cmd_precompute(args: argparse.Namespace) -> int:
    from backend.pipeline.run import precompute

    precompute(args.model, args.store, preset=args.preset, layers=args.layers, corpus_source=args.corpus,
               n_contexts=args.contexts, saes=args.saes, transcoders=args.transcoders,
               transcoder_layers=args.transcoder_layers, resume=args.resume, executor=args.executor,
               ray_address=args.ray_address)
    return 0


def _cmd_improve(args: argparse.Namespace) -> int:
    from backend.pipeline.improve import improve, start_background

    if args.background:
        print(start_background(args.store, args.preset,
                               extra_args=("--device", args.device) if args.device is not None else ()))
    else:
        improve(args.store, args.preset)
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
    from backend.store.access import check_writable, reading

    pair = [args.clean, args.corrupt, args.answer, args.wrong]
    if (args.task is None) == all(v is None for v in pair):
        raise InputError("Give either --task NAME or --clean/--corrupt/--answer/--wrong, not both and not neither.")
    if args.task is None and any(v is None for v in pair):
        raise InputError("A custom pair needs all four of --clean, --corrupt, --answer and --wrong.")
    methods = check_methods(_split(args.methods))
    kinds = _split(args.kinds) or []
    if not kinds:
        raise InputError(f"--kinds {literal(args.kinds)} names no component kind: use e.g. 'resid,mlp,head'.")
    dictionaries = dict_ids = None
    if "feature" in kinds:
        with reading(args.store) as con:
            dictionaries, dict_ids = feature_dictionaries(con, args.model)
    kinds = check_kinds(kinds, dictionaries)
    spec = get_spec(args.model)
    check_writable(args.store)  # before the model loads: the comparison is saved into the store at the end
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
    import json
    import time
    from pathlib import Path

    clock = {"start": time.perf_counter()}
    timings: dict[str, float] = {}

    def lap(name: str) -> None:
        now = time.perf_counter()
        timings[name] = round(now - clock.pop("last", clock["start"]), 3)
        clock["last"] = now

    from backend.circuits import faithfulness as faith
    from backend.circuits.build import BuildParams, build
    from backend.circuits.export import check_export_path
    from backend.circuits.prune import graph_scores, prune
    from backend.circuits.quality import describe
    from backend.circuits.storage import read_graph, save_graph
    from backend.dictionaries.storage import graph_dictionaries
    from backend.errors import InputError
    from backend.features.labels import label_nodes
    from backend.model.registry import get_spec, load_model
    from backend.progress import say
    from backend.store.access import check_writable, reading

    if (args.prompt is None) == (args.graph_id is None):
        raise InputError("Give either --prompt TEXT or --graph-id ID, not both and not neither.")
    for path in args.export or []:
        check_export_path(path)  # a bad suffix or a missing directory is refused now, not after building the graph
    spec = get_spec(args.model)
    if args.save:
        check_writable(args.store)
    need_model = args.prompt is not None or args.faithfulness != "none" or bool(args.heads)
    if need_model and args.timings:
        import torch  # noqa: F401 - imported here only so that --timings reports the heavy imports on their own
        import transformer_lens  # noqa: F401
    lap("imports")
    with reading(args.store) as con:
        transcoders, saes = graph_dictionaries(con, spec.name, attn_saes=not args.no_attn_saes)
        graph = read_graph(con, args.graph_id) if args.graph_id else None
    if graph is not None:
        saes = saes if graph.metadata.get("dictionaries", {}).get("attn_sae_layers") else {}
    system = None  # the prompt's frozen system, when built here (reused by the faithfulness check and --heads)
    lap("dictionaries")
    model = load_model(args.model, progress=say) if need_model else None
    lap("model")
    if graph is None:
        if not transcoders:
            say("This store has no transcoders: every MLP is one error node (build them with the precompute).")
        graph, system = build(model, args.prompt, transcoders, saes, answer=args.answer, wrong=args.wrong,
                              params=BuildParams(max_nodes=args.max_nodes), model_name=spec.name)
        with reading(args.store) as con:
            graph.nodes = label_nodes(con, graph.nodes)
        for warning in graph.metadata.get("warnings", []):
            say(warning)
    lap("build")
    t = graph.metadata["target"]
    metric = "logit − mean logit" if t.get("demeaned") else "logit difference" if t.get("wrong") is not None else "logit"
    print(f"graph of {graph.metadata['prompt']!r} -> {t['token']!r}"
          + (f" - {t['wrong']!r}" if t.get("wrong") is not None else "")
          + f" ({metric} {t['value']:.3f}): {len(graph.nodes)} nodes, {len(graph.edges)} edges")
    for line in describe(graph.metadata.get("conservation"), graph.metadata.get("scores") or graph_scores(graph)):
        print("  " + line)
    pruned = prune(graph, args.node_threshold, args.edge_threshold)
    print(f"pruned (node {args.node_threshold}, edge {args.edge_threshold}): {len(pruned.nodes)} nodes, "
          f"{len(pruned.edges)} edges")
    for line in describe(None, pruned.metadata["pruning"]["scores"]):
        print("  " + line)
    lap("prune")
    if args.faithfulness != "none":
        results = faith.check_in_store(model, pruned, transcoders, saes, args.faithfulness, args.store, spec.name,
                                       recording=system.rec if system is not None else None)
        pruned.metadata["faithfulness"] = {k: r.as_dict() for k, r in results.items()}
        for result in results.values():
            print(f"faithfulness ({result.summary()})")
        lap("faithfulness")
    for node in args.heads or []:
        from backend.circuits.split import incoming_heads, summarise

        split = incoming_heads(model, graph, transcoders, saes, node, fz=system)
        labels = dict(zip(graph.nodes["node_id"], graph.nodes["label"]))
        print(f"strongest inputs of {labels.get(node, node)} ({node}) and the heads that carry them:")
        print(summarise(split, labels).drop(columns=["source_id"]).to_string(index=False))
    if args.save:
        gid = save_graph(args.store, graph, source="cli")
        print(f"saved as {gid} in {args.store}")
    for path in args.export or []:
        from backend.circuits.export import export_to_file

        export_to_file(pruned, Path(path))
        print(f"wrote {path}")
    if args.timings:
        lap("rest")
        timings["total"] = round(time.perf_counter() - clock["start"], 3)
        print("timings " + json.dumps(timings))
    return 0


def _cmd_intervene(args: argparse.Namespace) -> int:
    from backend.dictionaries.storage import graph_dictionaries
    from backend.errors import InputError
    from backend.interventions.run import intervene_on_prompt
    from backend.interventions.spec import parse
    from backend.model.registry import get_spec, load_model
    from backend.progress import say
    from backend.store.access import reading

    if args.wrong is not None and args.answer is None:
        raise InputError("--wrong needs --answer: the metric is logit(answer) − logit(wrong).")
    interventions = parse(args.interventions)  # a bad spec is refused before the model loads
    spec = get_spec(args.model)
    with reading(args.store) as con:
        transcoders, saes = graph_dictionaries(con, spec.name)
    model = load_model(args.model, progress=say)
    result = intervene_on_prompt(model, args.prompt, interventions, transcoders, saes, mode=args.on,
                                 answer=args.answer, wrong=args.wrong, top_k=args.top_k,
                                 continue_tokens=args.continue_tokens)
    decode = lambda ids: [model.tokenizer.decode([i]) for i in ids]  # noqa: E731
    print(f"{len(interventions)} intervention(s) on the {args.on} model: "
          + "; ".join(i.describe() for i in interventions))
    for name, out in (("unchanged", result.baseline), ("intervened", result.intervened)):
        tops = ", ".join(f"{t!r} {p:.3f}" for t, p in zip(decode(out.top_ids), out.top_probs))
        print(f"{name:>10}: {tops}")
        if out.continuation:
            print(f"{'':>10}  continues: {''.join(decode(out.continuation))!r}")
    print(f"KL(unchanged ‖ intervened) {result.kl:.4f} nats; p(unchanged top token) "
          f"{result.baseline.reference_prob:.3f} -> {result.intervened.reference_prob:.3f}")
    if result.metric_change is not None:
        print(f"{result.metric_name}: {result.baseline.metric:.3f} -> {result.intervened.metric:.3f} "
              f"(change {result.metric_change:+.3f})")
    return 0


def _cmd_compare_graphs(args: argparse.Namespace) -> int:
    from backend.circuits.compare import compare_graphs
    from backend.circuits.prune import prune
    from backend.circuits.storage import read_graph
    from backend.errors import InputError
    from backend.store.access import reading

    for side in ("a", "b"):
        if (getattr(args, f"prompt_{side}") is None) == (getattr(args, f"graph_{side}") is None):
            raise InputError(f"Give either --prompt-{side} TEXT or --graph-{side} ID, not both and not neither.")
    graphs = {}
    for side in ("a", "b"):
        gid = getattr(args, f"graph_{side}")
        if gid is not None:
            with reading(args.store) as con:
                graphs[side] = read_graph(con, gid)
    if len(graphs) < 2:
        from backend.api import open_workspace

        ws = open_workspace(args.store, model=args.model)  # on the device main() chose
        for side in ("a", "b"):
            if side not in graphs:
                graphs[side] = ws.graph(getattr(args, f"prompt_{side}"), answer=getattr(args, f"answer_{side}"))
    result = compare_graphs(*(prune(graphs[s], args.node_threshold, args.edge_threshold) for s in ("a", "b")))
    counts = result.counts()
    print(f"A: {result.prompt_a!r}\nB: {result.prompt_b!r}")
    print(f"nodes matched by (kind, layer, feature) / token / (error kind, layer): {counts['shared']} shared, "
          f"{counts['only_a']} only in A, {counts['only_b']} only in B")
    top = result.changed(args.top)
    view = top.assign(node=top["text"], where=["both" if a and b else "A" if a else "B"
                                               for a, b in zip(top["in_a"], top["in_b"])])
    print("largest influence changes (B − A, influence on each graph's target, summed over positions):")
    print(view[["node", "where", "influence_a", "influence_b", "change"]].to_string(
        index=False, float_format=lambda v: f"{v:+.4f}"))
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


def _cmd_label(args: argparse.Namespace) -> int:
    from backend.errors import InputError
    from backend.features.labels import label_store, save_user_label

    if args.user_label is None:
        if args.dict_id is not None or args.feature is not None:
            raise InputError("--dict and --feature go with --set TEXT (your label of that feature).")
        n = label_store(args.store)
        print(f"{args.store}: automatic labels of {n:,} features written (a run of kind 'label')")
        return 0
    if args.dict_id is None or args.feature is None:
        raise InputError("--set needs --dict DICT_ID and --feature INDEX: the feature to label.")
    label = save_user_label(args.store, args.dict_id, args.feature, args.user_label)
    print(f"{args.dict_id} #{args.feature}: " + (f"labelled {label!r}" if label else "your label removed"))
    return 0


def _cmd_search(args: argparse.Namespace) -> int:
    import pandas as pd

    from backend.features.labels import search_labels
    from backend.store.access import reading

    with reading(args.store) as con:
        found = search_labels(con, args.text, kind=args.kind, limit=args.limit)
    if found.empty:
        print(f"no feature label contains {args.text!r}")
        return 0
    found["source"] = found["automatic"].map({True: "automatic", False: "user"})
    with pd.option_context("display.width", 200, "display.max_colwidth", 80):
        print(found[["dict_id", "feature", "label", "source", "density", "max_act"]].to_string(index=False))
    return 0


def _cmd_bundle(args: argparse.Namespace) -> int:
    from backend.circuits.prune import prune
    from backend.circuits.storage import read_graph
    from backend.features.bundle import write_bundle
    from backend.store.access import reading

    with reading(args.store) as con:
        graph = prune(read_graph(con, args.graph_id), args.node_threshold, args.edge_threshold)
        out = write_bundle(con, graph, args.out)
    print(f"wrote {out} ({len(graph.nodes)} nodes)")
    return 0


def _cmd_export_sae(args: argparse.Namespace) -> int:
    from backend.dictionaries.storage import export_sae_lens
    from backend.store.access import reading

    with reading(args.store) as con:
        out = export_sae_lens(con, args.dict_id, args.out)
    print(f"wrote {out} (cfg.json, sae_weights.safetensors)")
    return 0


def _cmd_import_graph(args: argparse.Namespace) -> int:
    from pathlib import Path

    from backend.circuits.export.neuronpedia_read import MAX_BYTES, import_graph
    from backend.errors import InputError

    path = Path(args.file)
    if not path.is_file():
        raise InputError(f"No file at {literal(path)}: give the path of a graph .json.")
    if path.stat().st_size > MAX_BYTES:
        raise InputError(f"{literal(path)} is {path.stat().st_size / 1e6:.0f} MB: graph JSONs above "
                         f"{MAX_BYTES // 2**20} MB are not imported.")
    gid, problems = import_graph(args.store, path.read_bytes(), args.model)
    for problem in problems:
        print(f"warning: {problem}", file=sys.stderr)
    print(f"imported {path} into {args.store} as graph {gid}")
    return 0


def _cmd_compact(args: argparse.Namespace) -> int:
    from backend.store.access import compact

    n = compact(args.store)
    print(f"{args.store}: {n} save file{'s' if n != 1 else ''} folded into the store")
    return 0


_COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {
    "label": _cmd_label, "search": _cmd_search, "bundle": _cmd_bundle, "export-sae": _cmd_export_sae,
    "improve": _cmd_improve}


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the process exit status."""
    try:
        args = _build_parser().parse_args(argv)  # one `error:` line on a bad option (see _Parser.error)
    except SystemExit as stop:  # returned, not raised, so in-process callers get the status like any other error
        return stop.code if isinstance(stop.code, int) else 2
    try:
        if getattr(args, "device", None) is not None:
            from backend.model.device import use_device

            use_device(args.device)  # before anything is loaded: the model, dictionaries and training follow it
        if args.command == "precompute":
            return _cmd_precompute(args)
        if args.command == "attribute":
            return _cmd_attribute(args)
        if args.command == "intervene":
            return _cmd_intervene(args)
        if args.command == "graph":
            return _cmd_graph(args)
        if args.command == "compact":
            return _cmd_compact(args)
        if args.command in _COMMANDS:
            return _COMMANDS[args.command](args)
        if args.command == "compare-graphs":
            return _cmd_compare_graphs(args)
        if args.command == "import-graph":
            return _cmd_import_graph(args)
        return _cmd_info(args)
    except CircuitscopeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        # The file system refused something the checks above could not foresee (a disk filling up while an export is
        # written, a directory removed meanwhile): the environment's fault, so one sentence, not a traceback.
        where = f" ({literal(exc.filename)})" if exc.filename else ""
        print(f"error: the file system refused an operation{where}: {(exc.strerror or str(exc)).lower()}; check the "
              "path and the free space and run it again.", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: the store is unchanged (the partial run was discarded)", file=sys.stderr)
        return 130
