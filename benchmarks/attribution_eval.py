"""The attribution evaluation protocol on the default model (``backend/attribution/evaluation.py``), in stages.

    python -m benchmarks.attribution_eval truth [--families ioi,sva] [--splits dev,eval]
    python -m benchmarks.attribution_eval dev        # RelP rule grid, IG steps, AtP, AtP* on the dev pairs
    python -m benchmarks.attribution_eval select     # choose RelP's rules and IG's steps on dev -> dev-selection.json
    python -m benchmarks.attribution_eval eval       # the chosen settings + AtP + AtP* on the evaluation pairs
    python -m benchmarks.attribution_eval summary    # benchmarks/results/attribution-eval.json (the page reads it)

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
from itertools import product
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
RECORDS = ROOT / "data" / "bench" / "attribution-eval"
SELECTION = ROOT / "benchmarks" / "results" / "attribution-dev-selection.json"
MODEL = "smollm2-135m"
IG_STEPS_GRID = (1, 2)


def rule_label(rules: Any) -> str:
    """A short, stable label of a rule set: relp[norm/attention/activation/gate/ε]."""
    return f"relp[{rules.norm}/{rules.attention}/{rules.activation}/{rules.gate}/{rules.epsilon:g}]"


def rule_grid() -> list[Any]:
    """The RelP rules searched on dev (ε = 0): with identity norms, every attention rule × every SiLU / gate
    combination that differs (the SiLU rule is moot when the gate is detached); with norms by their gradient, every
    attention rule with the identity SiLU and half gate; plus the paper's, LXT's and main's rule sets. ε is searched
    afterwards on the best few (:func:`epsilon_grid`). (On 2 shared cores a RelP run of 8 pairs takes ~20 s wall, so
    the grid is kept to ~30 sets × 5 families.)"""
    from backend.attribution.relp import DEFAULT_RULES, RULE_SETS, RelPRules

    attentions = ("detach", "half", "attnlrp", "gradient")
    mlp_rules = (("identity", "half"), ("identity", "value"), ("identity", "gradient"), ("gradient", "half"),
                 ("gradient", "gradient"))
    grid = [RelPRules(norm="identity", attention=a, activation=act, gate=g, epsilon=0.0)
            for a in attentions for act, g in mlp_rules]
    grid += [RelPRules(norm="gradient", attention=a, activation="identity", gate="half", epsilon=0.0)
             for a in attentions]
    for rules in [*RULE_SETS.values(), DEFAULT_RULES]:  # DEFAULT_RULES: main's default, for reference
        if rules not in grid:
            grid.append(rules)
    return grid


def epsilon_grid(best: list[Any]) -> list[Any]:
    """ε ∈ {1e-6, 0.01, 0.1, 1} on the best rule sets of the first search."""
    from dataclasses import replace

    return [replace(r, epsilon=e) for r in best for e in (1e-6, 0.01, 0.1, 1.0)]


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


def _run(settings: list[Any], families: list[str], splits: list[str]) -> None:
    import torch

    from backend.attribution.evaluation import run_protocol
    from backend.model.registry import load_model
    from backend.progress import using_sink

    torch.set_num_threads(int(os.environ.get("ATTRIBUTION_EVAL_THREADS", "1")))
    model = load_model(MODEL)
    with using_sink(lambda *a, **k: None):
        for split in splits:
            run_protocol(model, MODEL, settings, RECORDS, families=families, splits=[split],
                         log=lambda s: print(s, flush=True))


def select(write: bool = True) -> dict[str, Any]:
    """Choose RelP's rules (highest mean Pearson r over every family × kind on dev) and IG's steps (the fewest whose
    mean r is within 0.01 of the best tried), from the dev records only."""
    from backend.attribution.evaluation import faithfulness_table, load_records

    records = [r for r in load_records(RECORDS) if r["split"] == "dev" and r["model"] == MODEL]
    table = faithfulness_table(records, "dev", resamples=200)
    relp_labels = sorted({lab for lab in table["label"] if lab.startswith("relp[")})
    from backend.attribution.evaluation import select_setting

    best, ranking = select_setting(table, relp_labels)
    ig = table[table["label"].str.startswith("ig")].groupby("label")["r"].mean()
    ig_steps = None
    if len(ig):
        good = [lab for lab in ig.index if ig[lab] >= ig.max() - 0.01]
        ig_steps = min(int(lab[2:]) for lab in good)
    baseline = table[table["label"].isin(["atp", "atpstar"])].pivot_table(index=["family", "kind"], columns="label",
                                                                         values="r")
    out = {"when": datetime.now(timezone.utc).isoformat(timespec="seconds"), "model": MODEL, "set": "dev",
           "relp_rules": best, "ig_steps": ig_steps, "n_rule_sets": len(relp_labels),
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
    parser.add_argument("stage", choices=["truth", "dev", "epsilon", "select", "eval", "summary"])
    parser.add_argument("--families", default=",".join(FAMILIES))
    parser.add_argument("--splits", default="dev,eval")
    parser.add_argument("--methods", default="", help="dev / eval: restrict to these (atp, atpstar, relp, ig1, ...)")
    args = parser.parse_args(argv)
    families = [f for f in args.families.split(",") if f]
    only = {m for m in args.methods.split(",") if m}
    if args.stage == "truth":
        _run(_settings(["patching"]), families, args.splits.split(","))
    elif args.stage == "dev":
        settings = []
        if not only or "relp" in only:
            settings += [Setting(rule_label(r), "relp", {"rules": r}) for r in rule_grid()]
        settings += _settings([m for m in ["atp", "atpstar", *(f"ig{s}" for s in IG_STEPS_GRID)]
                               if not only or m in only])
        _run(settings, families, ["dev"])
    elif args.stage == "epsilon":
        chosen = select(write=False)
        best = [parse_rules(row["label"]) for row in chosen["relp_ranking"][:3]]
        _run([Setting(rule_label(r), "relp", {"rules": r}) for r in epsilon_grid(best)], families, ["dev"])
    elif args.stage == "select":
        print(json.dumps(select(), indent=2)[:3000])
    elif args.stage == "eval":
        chosen = json.loads(SELECTION.read_text())
        rules = parse_rules(chosen["relp_rules"])
        settings = [Setting("relp", "relp", {"rules": rules})]
        settings += _settings(["atp", "atpstar", f"ig{chosen['ig_steps'] or 2}"])
        settings = [s for s in settings if not only or s.label in only or s.method in only]
        _run(settings, families, ["eval"])
    elif args.stage == "summary":
        from benchmarks.attribution_bench import write_eval_summary

        print(json.dumps(write_eval_summary(), indent=2)[:4000])
    return 0


if __name__ == "__main__":
    sys.exit(main())
