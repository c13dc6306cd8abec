"""The attribution evaluation protocol on the default model (``backend/attribution/evaluation.py``), in stages.

    python -m benchmarks.attribution_eval truth [--families ioi,sva] [--splits dev,eval]
    python -m benchmarks.attribution_eval dev        # RelP rule grid, IG steps, AtP, AtP* on the dev pairs
    python -m benchmarks.attribution_eval select     # choose RelP's rules and IG's steps on dev -> dev-selection.json
    python -m benchmarks.attribution_eval eval       # the chosen settings + AtP + AtP* on the evaluation pairs
    python -m benchmarks.attribution_eval summary    # benchmarks/results/attribution-eval.json (the page reads it)
    python -m benchmarks.attribution_eval all --workers 12   # every job not yet recorded, in forked workers

Every stage appends per-pair scores to ``data/bench/attribution-eval/<family>.jsonl`` and skips what is already
there, so stages can be stopped, resumed and run as parallel workers on different families. ``make bench`` runs
``summary`` on whatever has been recorded (it never starts the hour of patching on its own).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
RECORDS = ROOT / "data" / "bench" / "attribution-eval"
SELECTION = ROOT / "benchmarks" / "results" / "attribution-dev-selection.json"
MODEL = "smollm2-135m"
IG_STEPS_GRID = (1, 2)
PER_KIND_MARGIN = 0.02


def rule_label(rules: Any) -> str:
    """A short, stable label of a rule set: relp[norm/attention/activation/gate/ε]."""
    return f"relp[{rules.norm}/{rules.attention}/{rules.activation}/{rules.gate}/{rules.epsilon:g}]"


def rule_grid() -> list[Any]:
    """The RelP rules searched on dev (ε = 0): with identity norms, every attention rule × four SiLU / gate rules
    (identity SiLU with the half, value or product rule on the gate; both by their gradient); norms by their gradient
    with two attention rules; plus the paper's, LXT's and main's rule sets (AtP itself is run as its own method).
    ε is searched afterwards on the best few (:func:`epsilon_grid`). The grid is kept to ~20 sets: on the shared
    2-core machine a RelP run of 8 pairs took 1-3 CPU-s but 20-80 s of wall time."""
    from backend.attribution.relp import DEFAULT_RULES, RULE_SETS, RelPRules

    attentions = ("detach", "half", "attnlrp", "gradient")
    mlp_rules = (("identity", "half"), ("identity", "value"), ("identity", "gradient"), ("gradient", "gradient"))
    grid = [RelPRules(norm="identity", attention=a, activation=act, gate=g, epsilon=0.0)
            for a in attentions for act, g in mlp_rules]
    grid += [RelPRules(norm="gradient", attention=a, activation="identity", gate="gradient", epsilon=0.0)
             for a in ("detach", "gradient")]
    for rules in [*RULE_SETS.values(), DEFAULT_RULES]:  # DEFAULT_RULES: main's default, for reference
        if rules not in grid and rules.attention != "gradient" or rules == DEFAULT_RULES:
            grid.append(rules)
    return grid


def epsilon_grid(best: list[Any]) -> list[Any]:
    """ε ∈ {0.01, 0.1, 1} on the best rule sets of the first search (1e-6 is in the grid through main's rules)."""
    from dataclasses import replace

    return [replace(r, epsilon=e) for r in best for e in (0.01, 0.1, 1.0)]


def _settings(names: list[str]) -> list[Any]:
    from backend.attribution.evaluation import Setting

    out = []
    for name in names:
        if name == "patching":
            out.append(Setting("patching", "patching"))
        elif name == "atp":
            out.append(Setting("atp", "atp"))
        elif name == "atpstar":
            out.append(Setting("atpstar", "atpstar"))
        elif name.startswith("ig"):
            out.append(Setting(name, "ig", {"steps": int(name[2:])}))
    return out


_MODEL: Any = None


def _job(job: tuple[Any, ...]) -> str:
    """One job in a worker (the model is inherited from the parent by fork): ``(settings, family, split)`` runs
    every setting on the split; ``(setting, family, split, chunk, n_chunks)`` one chunk of its pairs."""
    from backend.attribution.evaluation import run_chunk, run_protocol
    from backend.progress import using_sink

    with using_sink(lambda *a, **k: None):
        if len(job) == 5:
            setting, family, split, chunk, n_chunks = job
            run_chunk(_MODEL, MODEL, setting, family, split, chunk, n_chunks, RECORDS)
            return f"{family}/{split}/{setting.label} chunk {chunk + 1}/{n_chunks}"
        settings, family, split = job
        run_protocol(_MODEL, MODEL, settings, RECORDS, families=[family], splits=[split],
                     log=lambda s: print(s, flush=True))
    return f"{family}/{split}"


def eval_settings() -> list[Any]:
    """The settings reported on the evaluation pairs: RelP with the rules chosen on dev (when chosen), AtP, AtP* and
    IG with the dev-chosen steps (2 when none were chosen)."""
    from backend.attribution.evaluation import Setting

    chosen = json.loads(SELECTION.read_text()) if SELECTION.exists() else {}
    settings = []
    if chosen.get("use_by_kind"):
        rules = {kind: parse_rules(label) for kind, label in chosen["relp_rules_by_kind"].items()}
        settings.append(Setting("relp", "relp", {"rules": rules}))
    elif chosen.get("relp_rules"):
        settings.append(Setting("relp", "relp", {"rules": parse_rules(chosen["relp_rules"])}))
    return settings + _settings(["atp", "atpstar", f"ig{chosen.get('ig_steps') or 2}"])


def _run_jobs(jobs: list[tuple[list[Any], str, str]], workers: int) -> None:
    import multiprocessing

    import torch

    from backend.model.registry import load_model

    global _MODEL
    torch.set_num_threads(int(os.environ.get("ATTRIBUTION_EVAL_THREADS", "1")))
    _MODEL = load_model(MODEL)
    if workers <= 1:
        for job in jobs:
            _job(job)
        return
    with multiprocessing.get_context("fork").Pool(min(workers, len(jobs)), maxtasksperchild=1) as pool:
        for done in pool.imap_unordered(_job, jobs):
            print(f"done {done}", flush=True)


def _run(settings: list[Any], families: list[str], splits: list[str], workers: int = 1) -> None:
    """Run ``settings`` on every (family, split) job, in ``workers`` forked processes that share the parent's model
    weights copy-on-write (one process per job at most; on a shared machine more single-thread workers get more of
    the CPU than one, and forking keeps their memory to the activations)."""
    _run_jobs([(settings, family, split) for split in splits for family in families], workers)


def select(write: bool = True) -> dict[str, Any]:
    """Choose RelP's rules (highest mean Pearson r over every family × kind on dev) and IG's steps (the fewest whose
    mean r is within 0.01 of the best tried), from the dev records only."""
    from backend.attribution.evaluation import faithfulness_table, load_records

    records = [r for r in load_records(RECORDS) if r["split"] == "dev" and r["model"] == MODEL]
    table = faithfulness_table(records, "dev", resamples=200)
    counts = table[table["label"].str.startswith("relp[")].groupby("label").size()
    relp_labels = sorted(counts[counts == counts.max()].index)  # only sets measured on every dev family
    from backend.attribution.evaluation import select_setting

    best, ranking = select_setting(table, relp_labels)
    # Per kind: the rule set with the highest mean r over families for that kind alone. RelP can run one rule set
    # per kind (one more clean forward + backward per extra set), so this is preferred when its mean r over every
    # dev cell beats the single best set's by at least PER_KIND_MARGIN.
    relp_cells = table[table["label"].isin(relp_labels)]
    per_kind_mean = relp_cells.groupby(["kind", "label"])["r"].mean()
    by_kind = {kind: str(per_kind_mean[kind].idxmax()) for kind in relp_cells["kind"].unique()}
    kinds = sorted(by_kind)
    single_mean = float(sum(per_kind_mean[(k, best)] for k in kinds) / len(kinds))  # kinds weighted equally
    by_kind_mean = float(sum(per_kind_mean[(k, by_kind[k])] for k in kinds) / len(kinds))
    use_by_kind = len(set(by_kind.values())) > 1 and by_kind_mean >= single_mean + PER_KIND_MARGIN
    ig = table[table["label"].str.startswith("ig")].groupby("label")["r"].mean()
    ig_steps = None
    if len(ig):
        good = [lab for lab in ig.index if ig[lab] >= ig.max() - 0.01]
        ig_steps = min(int(lab[2:]) for lab in good)
    baseline = table[table["label"].isin(["atp", "atpstar"])].pivot_table(index=["family", "kind"], columns="label",
                                                                         values="r")
    out = {"when": datetime.now(timezone.utc).isoformat(timespec="seconds"), "model": MODEL, "set": "dev",
           "relp_rules": best, "relp_rules_by_kind": by_kind, "use_by_kind": bool(use_by_kind),
           "mean_r_single": round(single_mean, 4), "mean_r_by_kind": round(by_kind_mean, 4),
           "dev_families": sorted(table["family"].unique()),
           "ig_steps": ig_steps, "n_rule_sets": len(relp_labels),
           "relp_ranking": ranking.reset_index().round(4).to_dict("records"),
           "ig_mean_r": {k: round(float(v), 4) for k, v in ig.items()},
           "best_relp_cells": table[table["label"] == best][["family", "kind", "r", "rho", "top10"]].round(4)
           .to_dict("records"),
           "baselines_r": {f"{f}/{k}": {m: round(float(v), 4) for m, v in row.items()}
                           for (f, k), row in baseline.iterrows()}}
    if write:
        SELECTION.write_text(json.dumps(out, indent=2))
    return out


def parse_rules(label: str) -> Any:
    """The RelPRules of a :func:`rule_label`."""
    from backend.attribution.relp import RelPRules

    norm, attention, activation, gate, eps = label[len("relp["):-1].split("/")
    return RelPRules(norm=norm, attention=attention, activation=activation, gate=gate, epsilon=float(eps))


def main(argv: list[str] | None = None) -> int:
    """Run one stage (see the module docstring)."""
    from backend.attribution.evaluation import FAMILIES, Setting

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("stage", choices=["truth", "dev", "epsilon", "select", "eval", "all", "chunked", "summary"])
    parser.add_argument("--families", default=",".join(FAMILIES))
    parser.add_argument("--splits", default="dev,eval")
    parser.add_argument("--methods", default="", help="dev / eval: restrict to these (atp, atpstar, relp, ig1, ...)")
    parser.add_argument("--workers", type=int, default=1, help="forked worker processes, one (family, split) each")
    parser.add_argument("--chunks", type=int, default=4, help="chunked: slices of a split's pairs, one job each")
    args = parser.parse_args(argv)
    families = [f for f in args.families.split(",") if f]
    only = {m for m in args.methods.split(",") if m}
    if args.stage == "truth":
        _run(_settings(["patching"]), families, args.splits.split(","), args.workers)
    elif args.stage == "dev":
        settings = []
        if not only or "relp" in only:
            settings += [Setting(rule_label(r), "relp", {"rules": r}) for r in rule_grid()]
        settings += _settings([m for m in ["atp", "atpstar", *(f"ig{s}" for s in IG_STEPS_GRID)]
                               if not only or m in only])
        _run(settings, families, ["dev"], args.workers)
    elif args.stage == "epsilon":
        chosen = select(write=False)
        best = [parse_rules(row["label"]) for row in chosen["relp_ranking"][:1]]
        _run([Setting(rule_label(r), "relp", {"rules": r}) for r in epsilon_grid(best)], families, ["dev"],
             args.workers)
    elif args.stage == "select":
        print(json.dumps(select(), indent=2)[:3000])
    elif args.stage == "eval":
        settings = [s for s in eval_settings() if not only or s.label in only or s.method in only]
        _run(settings, families, ["eval"], args.workers)
    elif args.stage == "chunked":
        # Patching (and IG) of each (family, split) in --chunks slices of its pairs, one process each: the
        # expensive jobs spread over many single-thread workers.
        from backend.attribution.evaluation import load_records

        done = {(r["family"], r["split"], r["label"]) for r in load_records(RECORDS)}
        names = [m for m in (only or {"patching"})]
        settings = [s for s in [*_settings(["patching"]), *eval_settings()] if s.label in names]
        jobs = [(s, f, sp, c, args.chunks) for sp in args.splits.split(",") for f in families for s in settings
                if (f, sp, s.label) not in done for c in range(args.chunks)]
        _run_jobs(jobs, args.workers)
    elif args.stage == "all":
        # Everything not yet recorded, in order of need: dev patching of the cheaper families (chunked), the dev
        # grid, evaluation patching (chunked), AtP / AtP* / IG (chunked) on the evaluation pairs, and last the dev
        # patching of the two most expensive families. RelP on the evaluation pairs waits for the dev selection.
        from backend.attribution.evaluation import load_records

        done = {(r["family"], r["split"], r["label"]) for r in load_records(RECORDS)}
        patching = _settings(["patching"])[0]
        ig = [s for s in eval_settings() if s.method == "ig"][0]
        cheap_dev = [f for f in families if f not in ("ioi", "greater-than")]
        dev = [Setting(rule_label(r), "relp", {"rules": r}) for r in rule_grid()] + _settings(["atp", "atpstar"])

        def chunks(setting: Any, fams: list[str], split: str) -> list[tuple[Any, ...]]:
            return [(setting, f, split, c, args.chunks) for f in fams if (f, split, setting.label) not in done
                    for c in range(args.chunks)]

        jobs: list[tuple[Any, ...]] = chunks(patching, cheap_dev, "dev")
        jobs += [(dev, f, "dev") for f in families]
        jobs += chunks(patching, families, "eval")
        jobs += [(_settings(["atp", "atpstar"]), f, "eval") for f in families]
        jobs += chunks(ig, families, "eval")
        jobs += chunks(patching, [f for f in families if f not in cheap_dev], "dev")
        _run_jobs(jobs, args.workers)
    elif args.stage == "summary":
        from benchmarks.attribution_bench import write_eval_summary

        print(json.dumps(write_eval_summary(), indent=2)[:4000])
    return 0


if __name__ == "__main__":
    sys.exit(main())
