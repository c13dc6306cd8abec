"""The evaluation protocol of the attribution methods: task families, one dev / evaluation split, faithfulness to
activation patching with bootstrap intervals over prompt pairs, and wall / CPU time per method.

**Families** (:data:`FAMILIES`): IOI, greater-than, factual recall, induction and subject–verb agreement
(``backend.inputs.tasks``), :data:`N_PAIRS` clean/corrupt pairs each, built once per family with
``build_task(family, model, n=N_PAIRS, seed=BUILD_SEED)``.

**Split, fixed once.** Pair ``i`` of a family has the seed :func:`pair_seed` (a hash of the family, the build seed
and ``i``); within a family the half of the pairs with the smallest seeds is the **dev** set, the rest the
**evaluation** set (:func:`split_indices`). Rules and settings (RelP's rules, IG's steps) are chosen on dev only
(:func:`select_setting`); the evaluation set is only ever reported. The split never depends on a result.

**Statistics** (:func:`faithfulness_table`), per family, component kind and method, on one set of pairs: each
method's per-pair scores (``Scores.examples``) are averaged over the set's pairs — the scores a comparison of those
pairs shows — and compared with activation patching's over the components of that kind, leaving out components both
score exactly 0 (as ``queries.attribution_pearson`` does): Pearson r, Spearman ρ and the top-10 overlap (the share
of patching's 10 largest |effects| among the method's 10 largest |scores|). The 95% intervals come from the
percentile bootstrap over pairs (``backend.stats``): resample the set's pairs with replacement, average, recompute.

**Runs are resumable**: :func:`run_protocol` appends one JSON line per (family, split, setting) — the per-pair
scores, wall and CPU seconds — to a JSONL file and skips the lines already there, so a long patching job can stop
and go on. ``benchmarks/attribution_eval.py`` drives it and writes the summary the Attribution Faithfulness page
shows (:func:`load_summary`).
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable, Mapping, Sequence

import numpy as np

from backend import stats

if TYPE_CHECKING:
    import pandas as pd

    from backend.inputs.tasks import TaskBatch

FAMILIES: dict[str, dict[str, Any]] = {
    "ioi": {},
    "greater-than": {},
    "factual": {},
    "induction": {"length": 6},  # two copies of 6 random word tokens (13 tokens with BOS; patching cost grows ~ seq²)
    "sva": {},
}
FAMILY_TITLES = {"ioi": "IOI", "greater-than": "greater-than", "factual": "factual recall",
                 "induction": "induction", "sva": "subject–verb agreement"}
N_PAIRS = 16
BUILD_SEED = 0
SPLIT_SALT = "circuitscope/attribution-eval/v1"
SPLITS = ("dev", "eval")
KINDS = ("resid", "mlp", "head")
TOP_K = 10
SUMMARY_PATH = Path(__file__).resolve().parents[2] / "benchmarks" / "results" / "attribution-eval.json"


def pair_seed(family: str, index: int, build_seed: int = BUILD_SEED) -> int:
    """The seed that identifies pair ``index`` of ``family`` (a 32-bit hash; fixes its split)."""
    digest = hashlib.sha256(f"{SPLIT_SALT}:{family}:{build_seed}:{index}".encode()).hexdigest()
    return int(digest[:8], 16)


def split_indices(family: str, n_pairs: int = N_PAIRS, build_seed: int = BUILD_SEED) -> dict[str, list[int]]:
    """``{"dev": [...], "eval": [...]}``: the half of the pairs with the smallest :func:`pair_seed` is dev."""
    order = sorted(range(n_pairs), key=lambda i: pair_seed(family, i, build_seed))
    half = n_pairs // 2
    return {"dev": sorted(order[:half]), "eval": sorted(order[half:])}


def family_batch(model: Any, family: str, n_pairs: int = N_PAIRS, build_seed: int = BUILD_SEED) -> "TaskBatch":
    """All ``n_pairs`` pairs of ``family`` (the split selects from them)."""
    from backend.inputs.tasks import build_task

    return build_task(family, model, n=n_pairs, seed=build_seed, **FAMILIES[family])


@dataclass(frozen=True)
class Setting:
    """One method with fixed options, under a label (e.g. ``relp`` with one rule set)."""

    label: str
    method: str  # a key of backend.attribution.METHODS
    options: Mapping[str, Any] = field(default_factory=dict)

    def options_json(self) -> dict[str, Any]:
        """The options as JSON values (rule sets as dicts)."""
        def plain(v: Any) -> Any:
            if hasattr(v, "to_dict"):
                return v.to_dict()
            return {k: plain(x) for k, x in v.items()} if isinstance(v, Mapping) else v

        return {k: plain(v) for k, v in self.options.items()}


def _compact(t: Any) -> dict[str, Any]:
    arr = t.detach().cpu().double().cpu().numpy()
    return {"shape": list(arr.shape), "values": [float(f"{v:.7g}") for v in arr.ravel().tolist()]}


def _expand(d: Mapping[str, Any]) -> np.ndarray:
    return np.asarray(d["values"], dtype=float).reshape(d["shape"])


def run_setting(model: Any, batch: "TaskBatch", setting: Setting, kinds: Sequence[str] = KINDS) -> dict[str, Any]:
    """Run one setting on ``batch``; its per-pair scores per kind and its wall and CPU seconds (one call)."""
    from backend.attribution import METHODS

    fn = METHODS[setting.method].load()
    t0, c0 = time.perf_counter(), time.process_time()
    scores = fn(model, batch, list(kinds), **dict(setting.options))
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    return {"wall_s": round(wall, 4), "cpu_s": round(cpu, 4),
            "scores": {kind: _compact(scores.examples[kind]) for kind in kinds}}


def load_records(path: Path | str) -> list[dict[str, Any]]:
    """The JSON lines of a protocol run: one JSONL file, or every ``*.jsonl`` in a directory (one per worker), in
    name order; an absent path has none, a torn last line is skipped. Chunk records (:func:`run_chunk`) are merged
    into one record per (family, split, label) once every chunk is there, and left out before."""
    path = Path(path)
    files = sorted(path.glob("*.jsonl")) if path.is_dir() else [path] if path.exists() else []
    out = []
    for file in files:
        for line in file.read_text().splitlines():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return _merge_chunks(out)


def _merge_chunks(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    whole = [r for r in records if "chunk" not in r]
    have = {_key(r["model"], r["family"], r["split"], r["label"]) for r in whole}
    groups: dict[tuple[str, str, str, str], dict[int, dict[str, Any]]] = {}
    for r in records:
        if "chunk" in r:
            groups.setdefault(_key(r["model"], r["family"], r["split"], r["label"]), {})[r["chunk"][0]] = r
    for key, parts in groups.items():
        n_chunks = next(iter(parts.values()))["chunk"][1]
        if key in have or len(parts) < n_chunks:
            continue
        ordered = [parts[i] for i in range(n_chunks)]
        merged = {k: v for k, v in ordered[0].items() if k != "chunk"}
        for field_ in ("indices", "pair_seeds", "clean_metric", "corrupt_metric"):
            merged[field_] = [x for p in ordered for x in p[field_]]
        # CPU seconds add up; the chunks ran side by side, so the wall time is the longest chunk's
        merged["cpu_s"] = round(sum(p["cpu_s"] for p in ordered), 4)
        merged["wall_s"] = round(max(p["wall_s"] for p in ordered), 4)
        merged["chunks"] = n_chunks
        merged["scores"] = {}
        for kind in ordered[0]["scores"]:
            arrays = [_expand(p["scores"][kind]) for p in ordered]
            cat = np.concatenate(arrays, 0)
            merged["scores"][kind] = {"shape": list(cat.shape), "values": cat.ravel().tolist()}
        whole.append(merged)
    return whole


def run_chunk(model: Any, model_name: str, setting: Setting, family: str, split: str, chunk: int, n_chunks: int,
              out: Path | str, kinds: Sequence[str] = KINDS) -> None:
    """Run ``setting`` on chunk ``chunk`` of ``n_chunks`` of a split's pairs (a contiguous slice, in index order) and
    append it as a chunk record; :func:`load_records` merges the chunks. Lets one expensive (family, split) — the
    patching of 8 pairs — run in several processes at once."""
    import torch

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    key = _key(model_name, family, split, setting.label)
    existing = [r for r in _raw_records(out) if _key(r["model"], r["family"], r["split"], r["label"]) == key]
    if any("chunk" not in r or r["chunk"][0] == chunk for r in existing):
        return
    batch = family_batch(model, family)
    indices = split_indices(family, len(batch))[split]
    size = -(-len(indices) // n_chunks)
    mine = indices[chunk * size:(chunk + 1) * size]
    sub = batch.select(mine)
    with torch.no_grad():
        clean = sub.metric_per_example(model(sub.clean)).double()
        corrupt = sub.metric_per_example(model(sub.corrupt)).double()
    record = {"model": model_name, "family": family, "split": split, "label": setting.label, "method": setting.method,
              "options": setting.options_json(), "indices": mine, "pair_seeds": [pair_seed(family, i) for i in mine],
              "seq_len": sub.seq_len, "clean_metric": clean.tolist(), "corrupt_metric": corrupt.tolist(),
              "torch_threads": torch.get_num_threads(), "chunk": [chunk, n_chunks],
              **run_setting(model, sub, setting, kinds)}
    with (out / f"{family}-{split}-{setting.method}-chunk{chunk}.jsonl").open("a") as fh:
        fh.write(json.dumps(record) + "\n")


def _raw_records(out: Path) -> list[dict[str, Any]]:
    recs = []
    for file in sorted(out.glob("*.jsonl")):
        for line in file.read_text().splitlines():
            try:
                recs.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return recs


def _key(model: str, family: str, split: str, label: str) -> tuple[str, str, str, str]:
    return model, family, split, label


def run_protocol(model: Any, model_name: str, settings: Sequence[Setting], out: Path | str,
                 families: Iterable[str] = FAMILIES, splits: Iterable[str] = SPLITS, kinds: Sequence[str] = KINDS,
                 log: Callable[[str], None] = print) -> list[dict[str, Any]]:
    """Run every (family, split, setting) not yet recorded in the directory ``out`` and append it to
    ``out/<family>-<split>-<method>.jsonl`` (so parallel workers on different families or methods never append to one
    file); all records."""
    import torch

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    done = {_key(r["model"], r["family"], r["split"], r["label"]) for r in load_records(out)}
    for family in families:
        batch = family_batch(model, family)
        parts = split_indices(family, len(batch))
        for split in splits:
            sub = batch.select(parts[split])
            for setting in settings:
                if _key(model_name, family, split, setting.label) in done:
                    continue
                with torch.no_grad():
                    clean = sub.metric_per_example(model(sub.clean)).double()
                    corrupt = sub.metric_per_example(model(sub.corrupt)).double()
                record = {"model": model_name, "family": family, "split": split, "label": setting.label,
                          "method": setting.method, "options": setting.options_json(), "indices": parts[split],
                          "pair_seeds": [pair_seed(family, i) for i in parts[split]], "seq_len": sub.seq_len,
                          "clean_metric": clean.tolist(), "corrupt_metric": corrupt.tolist(),
                          "torch_threads": torch.get_num_threads(), **run_setting(model, sub, setting, kinds)}
                with (out / f"{family}-{split}-{setting.method}.jsonl").open("a") as fh:
                    fh.write(json.dumps(record) + "\n")
                log(f"{family}/{split}/{setting.label}: {record['wall_s']:.1f} s wall, {record['cpu_s']:.1f} s CPU")
    return load_records(out)


# ----------------------------------------------------------------------------------------------------------------
# Statistics


def _flat(scores: np.ndarray) -> np.ndarray:
    return scores.reshape(scores.shape[0], -1)  # [pairs, components]


def cell_statistics(estimate: np.ndarray, truth: np.ndarray, resamples: int = stats.DEFAULT_RESAMPLES,
                    top_k: int = TOP_K, seed: int = 0) -> dict[str, float]:
    """Pearson r, Spearman ρ and top-k overlap of pair-averaged ``estimate`` vs ``truth`` (both ``[pairs, ...]``),
    each with its percentile-bootstrap 95% interval over pairs (see the module docstring)."""
    e_all, t_all = _flat(estimate), _flat(truth)

    def make(fn: Callable[[np.ndarray, np.ndarray], float]) -> Callable[[np.ndarray], float]:
        def statistic(idx: np.ndarray) -> float:
            e, t = e_all[idx].mean(0), t_all[idx].mean(0)
            keep = ~((e == 0) & (t == 0))  # components every method scores exactly 0 (identical activations)
            return fn(e[keep], t[keep])
        return statistic

    out: dict[str, float] = {}
    for name, fn in (("r", stats.pearson), ("rho", stats.spearman),
                     ("top10", lambda e, t: stats.top_k_overlap(e, t, top_k))):
        point, low, high = stats.percentile_bootstrap(make(fn), len(e_all), resamples, seed=seed)
        out.update({name: point, f"{name}_lo": low, f"{name}_hi": high})
    return out


def faithfulness_table(records: Sequence[Mapping[str, Any]], split: str, labels: Sequence[str] | None = None,
                       kinds: Sequence[str] = KINDS, resamples: int = stats.DEFAULT_RESAMPLES,
                       truth: str = "patching") -> "pd.DataFrame":
    """One row per (family, kind, setting label) on ``split``: r, ρ, top-10 and their intervals, wall / CPU s."""
    import pandas as pd

    by = {(r["family"], r["label"]): r for r in records if r["split"] == split}
    rows = []
    for family in [f for f in FAMILIES if (f, truth) in by]:
        ref = by[(family, truth)]
        for label in labels or sorted({lab for fam, lab in by if fam == family and lab != truth}):
            rec = by.get((family, label))
            if rec is None:
                continue
            for kind in kinds:
                cell = cell_statistics(_expand(rec["scores"][kind]), _expand(ref["scores"][kind]), resamples)
                rows.append({"family": family, "kind": kind, "label": label, "method": rec["method"],
                             "n_pairs": len(rec["indices"]), **cell, "wall_s": rec["wall_s"], "cpu_s": rec["cpu_s"],
                             "truth_wall_s": ref["wall_s"], "truth_cpu_s": ref["cpu_s"]})
    return pd.DataFrame(rows)


def select_setting(table: "pd.DataFrame", candidates: Sequence[str]) -> tuple[str, "pd.DataFrame"]:
    """The candidate label with the highest mean Pearson r over every (family, kind) cell of a *dev* table, and the
    ranking (mean r, mean ρ, mean top-10, worst cell's r) of all candidates."""
    sub = table[table["label"].isin(candidates)]
    ranking = sub.groupby("label").agg(mean_r=("r", "mean"), mean_rho=("rho", "mean"), mean_top10=("top10", "mean"),
                                       worst_r=("r", "min")).sort_values("mean_r", ascending=False)
    return str(ranking.index[0]), ranking


# ----------------------------------------------------------------------------------------------------------------
# The summary the page reads


def load_summary(path: Path | str | None = None) -> dict[str, Any] | None:
    """The committed evaluation summary (``benchmarks/results/attribution-eval.json``; the environment variable
    ``CIRCUITSCOPE_ATTRIBUTION_EVAL`` names another file), or None when absent or unreadable."""
    import os

    path = Path(path or os.environ.get("CIRCUITSCOPE_ATTRIBUTION_EVAL") or SUMMARY_PATH)
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def _interval(lo: float, hi: float) -> str:
    return f"[{lo:.2f}, {hi:.2f}]" if np.isfinite(lo) and np.isfinite(hi) else "—"


def rules_text(rules: Mapping[str, Any] | None) -> str:
    """RelP's rules as a summary records them — one rule set (piece -> rule) or one per component kind — in words."""
    if not rules:
        return "not recorded"

    def one(r: Mapping[str, Any]) -> str:
        return ", ".join(f"{k} {v}" for k, v in r.items())

    if all(isinstance(v, Mapping) for v in rules.values()):
        return "; ".join(f"{kind}: {one(r)}" for kind, r in rules.items())
    return one(rules)


def summary_view(summary: Mapping[str, Any]) -> tuple["pd.DataFrame", "pd.DataFrame"]:
    """Display frames of a summary: (faithfulness per family × kind × method with 95% intervals as text, cost per
    method over all families with its ratio to activation patching)."""
    import pandas as pd

    table = pd.DataFrame(summary.get("table", []))
    if table.empty:
        return table, pd.DataFrame()
    view = pd.DataFrame({
        "family": [FAMILY_TITLES.get(f, f) for f in table["family"]], "kind": table["kind"], "method": table["label"],
        "pairs": table["n_pairs"], "Pearson r": table["r"],
        "r 95% CI": [_interval(a, b) for a, b in zip(table["r_lo"], table["r_hi"])],
        "Spearman ρ": table["rho"], "ρ 95% CI": [_interval(a, b) for a, b in zip(table["rho_lo"], table["rho_hi"])],
        "top-10 overlap": table["top10"],
        "top-10 95% CI": [_interval(a, b) for a, b in zip(table["top10_lo"], table["top10_hi"])],
    })
    timing = summary.get("timing_eval_records", {})
    patch = timing.get("patching", {})
    cost = pd.DataFrame([{"method": label, "wall s": t["wall_s"], "CPU s": t["cpu_s"],
                          "× cheaper than patching (CPU)": (patch.get("cpu_s", float("nan")) / t["cpu_s"])
                          if t["cpu_s"] else float("nan")} for label, t in timing.items()])
    return view, cost


def summary_frame(summary: Mapping[str, Any], model: str | None = None) -> "pd.DataFrame":
    """The summary's evaluation-set table as a DataFrame (empty when the summary is for another model)."""
    import pandas as pd

    if model is not None and summary.get("model") != model:
        return pd.DataFrame()
    return pd.DataFrame(summary.get("table", []))
