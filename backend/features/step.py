"""Per-feature data of the store's dictionaries: the ``features`` and ``transcoder_features`` precompute steps.

Two kinds of dictionary are covered (:data:`KINDS`): attention-output SAEs on ``hook_z`` (Kissane et al. 2024) and
MLP transcoders on ``ln2.hook_normalized`` (Dunefsky et al. 2024). For every such dictionary of a run, one pass over
the run's corpus contexts writes (sparse, into DuckDB):

* ``feature_activations``: every nonzero activation (dict_id, feature, corpus_id, context_id, pos, act), inserted
  sorted by (dict_id, feature, act DESC) so a feature's rows sit together (DuckDB zone maps skip the rest);
* ``features``: density (fraction of scored tokens where the feature fires), max activation, mean activation
  *over the tokens where it fires*, the dominant head by DFA and its share;
* ``feature_examples``: the top :data:`TOP_N` activations of each feature (context, position, activation);
* ``feature_head_dfa``: direct feature attribution by head (docs/methods.md §1), averaged over the feature's top
  :data:`TOP_N` activations (attention SAEs only: a transcoder reads the MLP input, not heads);
* ``feature_histograms``: a histogram of the feature's nonzero activations in :data:`HIST_BINS` log-spaced bins;
* ``feature_logits``: the :data:`N_LOGITS` output tokens the feature's direct path promotes most and suppresses most.

**Cost.** One forward pass per batch (to the highest dictionary layer) captures every dictionary's input; or none,
when an earlier step left those inputs on the run context as ``ctx.precollected`` (:func:`backend.model.activations.collect`
layout, keyed by (hook kind, layer)): on the demo the corpus step's scoring pass gathers hook_z of every context, and
the transcoder step leaves the MLP inputs of the leading contexts it trained on. Transcoder features score only the
first ``preset.features.transcoder_contexts`` contexts: every MLP layer at L0 ~30 is ~10x the SAEs' rows per token.
Nonzeros go batch by batch to a TEMP staging table (bounded Python memory) and are copied sorted once per dictionary;
everything else is derived from them in DuckDB SQL. Top-N activations (with their per-head contributions) are kept
by a streaming per-feature merge, so DFA needs no second pass; per-head contributions are computed only
for the activations that enter a feature's top-N, and the forward pass stops at the last hook it captures.

**BOS is not scored.** Position 0 of every context is the BOS token, an attention-sink outlier whose z is far
from the rest: it is excluded from every statistic, example, histogram and denominator here (pages still show it).

**DFA by head.** The encoder is linear in the concatenated ``z``: the pre-activation of feature i is
``Σ_h W_enc[slice_h, i]·(x_h − b_dec[slice_h]) + b_enc[i]`` (the b_dec term only if ``cfg.apply_b_dec_to_input``),
and head h's contribution is its term of that sum (the b_dec share of head h's slice included). We store each
head's *mean signed contribution* over the feature's top activations, and its **share** =
``|mean contribution_h| / Σ_h' |mean contribution_h'|`` (absolute, so shares are in [0, 1] and sum to 1; the sign
stays visible in the contribution). ``top_head`` is the head with the largest share.

Logit effects: :mod:`backend.features.logits`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Mapping, Sequence

import numpy as np
import pandas as pd
import torch

from backend.dictionaries.kinds import KINDS
from backend.errors import InputError
from backend.features import dfa
from backend.features.live import encode_input
from backend.features.logits import top_logits
from backend.model.activations import Act, capture_batch, flatten_heads
from backend.pipeline.executor import LocalExecutor
from backend.progress import say, track

if TYPE_CHECKING:
    from backend.pipeline.context import RunContext

TOP_N = 20  # top activations kept per feature: materialised examples and the DFA average
HIST_BINS = 24  # log-spaced activation-histogram bins per feature
_STAGE = "_feature_acts_stage"  # TEMP table: one run's nonzeros before the sorted copy


@dataclass
class DictEntry:
    """One dictionary to process: its id, the layer whose input it reads, the loaded sae-lens SAE / Transcoder,
    and its kind (a key of :data:`KINDS`)."""

    dict_id: str
    layer: int
    sae: Any
    kind: str = "attn_sae"

    @property
    def act(self) -> Act:
        """The activation site (hook kind, layer) the dictionary encodes."""
        return KINDS[self.kind].hook, self.layer

    @property
    def per_head(self) -> bool:
        """Whether the dictionary reads hook_z (so DFA by head applies)."""
        return KINDS[self.kind].per_head


# ------------------------------------------------------------------------------------------------------------------
# Math (pure functions of tensors; tested against sae-lens / TransformerLens computations)


def head_contributions(sae: Any, x: torch.Tensor, feats: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Per-head contribution (b_dec share included) to feature ``feats[j]``'s pre-activation at ``x[j]``
    -> ``[m, n_heads]``; see :func:`backend.features.dfa.head_terms`."""
    return dfa.head_terms(sae, x, feats, n_heads)[0]


# ------------------------------------------------------------------------------------------------------------------
# Streaming top-N per feature (written by hand: a grouped top-N merge over numpy arrays)


class _TopN:
    """Keeps the ``n`` largest activations of every feature seen so far, with their per-head contributions."""

    def __init__(self, d_sae: int, n_heads: int, n: int = TOP_N):
        self.n, self.d_sae = n, d_sae
        self.feat = np.empty(0, np.int32)
        self.act = np.empty(0, np.float32)
        self.ctx = np.empty(0, np.int32)
        self.pos = np.empty(0, np.int16)
        self.contrib = np.empty((0, n_heads), np.float32)
        self.threshold = np.full(d_sae, -np.inf, np.float32)  # a new activation must beat this to enter

    def candidates(self, feat: np.ndarray, act: np.ndarray) -> np.ndarray:
        """Mask of new activations that could enter their feature's top-n."""
        return act > self.threshold[feat]

    def merge(self, feat: np.ndarray, act: np.ndarray, ctx: np.ndarray, pos: np.ndarray,
              contrib: np.ndarray) -> None:
        """Add candidates and keep the top-n per feature. ``contrib``: the candidates' per-head contributions."""
        n_old = len(self.feat)
        f = np.concatenate([self.feat, feat])
        a = np.concatenate([self.act, act])
        order = np.lexsort((-a, f))
        f = f[order]
        starts = np.flatnonzero(np.r_[True, f[1:] != f[:-1]])
        sizes = np.diff(np.r_[starts, len(f)])
        rank = np.arange(len(f)) - np.repeat(starts, sizes)
        keep = order[rank < self.n]
        new = keep >= n_old
        kept = np.empty((len(keep), self.contrib.shape[1]), np.float32)
        kept[~new] = self.contrib[keep[~new]]
        kept[new] = contrib[keep[new] - n_old]
        self.feat = np.concatenate([self.feat, feat])[keep]
        self.act = a[keep]
        self.ctx = np.concatenate([self.ctx, ctx])[keep]
        self.pos = np.concatenate([self.pos, pos])[keep]
        self.contrib = kept
        full = sizes >= self.n
        last = starts + np.minimum(sizes, self.n) - 1  # index (in the sorted arrays) of each group's n-th best
        self.threshold[f[starts[full]]] = a[order][last[full]]


# ------------------------------------------------------------------------------------------------------------------
# The pass over the corpus


def create_stage(con: Any) -> None:
    """(Re)create the TEMP staging table for nonzero activations (it lives only in this connection)."""
    con.execute(f"CREATE OR REPLACE TEMP TABLE {_STAGE} (d SMALLINT, feature INTEGER, context_id INTEGER, "
                "pos SMALLINT, act REAL)")


def stage(writer: Any, stage_index: int, feat: np.ndarray, act: np.ndarray, ctx_ids: np.ndarray,
          pos: np.ndarray) -> None:
    """Append one batch of nonzeros of dictionary number ``stage_index`` to the staging table (one bulk insert)."""
    writer.insert_df(_STAGE, pd.DataFrame({"d": np.int16(stage_index), "feature": feat.astype(np.int32),
                                           "context_id": ctx_ids.astype(np.int32), "pos": pos.astype(np.int16),
                                           "act": act.astype(np.float32)}))


def _encode(d: DictEntry, x: torch.Tensor) -> torch.Tensor:
    """Feature activations ``[b, p, d_sae]`` of one batch of the dictionary's inputs (sae-lens' own encode)."""
    return encode_input(d.sae, d.kind, x)


@torch.no_grad()
def build_features(writer: Any, model: Any, dicts: Sequence[DictEntry], tokens: torch.Tensor, corpus_id: str,
                   batch_size: int = 16, precollected: Mapping[Act, torch.Tensor] | None = None,
                   logits: bool = True, desc: str = "Feature activations",
                   written: Callable[[DictEntry, int], None] | None = None, executor: Any = None,
                   model_name: str | None = None) -> dict[str, Any]:
    """Compute and write all per-feature tables for ``dicts`` over ``tokens`` ``[n, n_ctx]`` (BOS at position 0).

    One forward pass per batch captures every dictionary's input at once (``stop_at_layer`` skips the layers above
    the highest one). If ``precollected`` already holds those inputs for *these* tokens, in
    :func:`backend.model.activations.collect`'s layout (``{(kind, layer): [n * (n_ctx - 1), d_in]}``, context-major, BOS
    dropped), no forward pass runs at all. ``logits=False`` skips ``feature_logits`` (its cost is one
    ``[d_sae, d_model] @ [d_model, d_vocab]`` product per dictionary). ``written(d, nonzeros)`` is called once each
    dictionary's tables are complete. ``executor`` (:mod:`backend.pipeline.executor`, default local) scores the
    batches (:func:`score_batch`; a Ray worker loads ``model_name``); this process writes every row. Returns timings
    and row counts.
    """
    n, n_ctx = tokens.shape
    n_heads = model.cfg.n_heads
    rows_total = n * (n_ctx - 1)
    if precollected is not None:
        for d in dicts:
            got = precollected.get(d.act)
            if got is None or got.shape[0] != rows_total:
                raise ValueError(f"precollected activations lack {d.act} for these {n} x {n_ctx} tokens")
    con = writer.con
    tops = {d.dict_id: _TopN(d.sae.W_enc.shape[1], n_heads if d.per_head else 0) for d in dicts}
    # Nonzeros are appended batch by batch to a TEMP staging table (Python memory stays bounded; DuckDB sorts
    # out of core) and copied into feature_activations sorted by (feature, act DESC) once per dictionary.
    create_stage(con)
    for d in dicts:
        d.sae.eval()
        for table in ("feature_activations", "features", "feature_examples", "feature_head_dfa",
                      "feature_histograms", "feature_logits"):
            con.execute(f"DELETE FROM {table} WHERE dict_id = ?", [d.dict_id])
    timings = {"forward_s": 0.0, "encode_s": 0.0, "stage_s": 0.0, "write_s": 0.0, "logits_s": 0.0}
    index = {d.dict_id: i for i, d in enumerate(dicts)}
    run = executor if executor is not None else LocalExecutor()

    def shards() -> Any:  # one batch of contexts per unit of work, with its precollected inputs if any
        for start in range(0, n, batch_size):
            rows = slice(start * (n_ctx - 1), min(start + batch_size, n) * (n_ctx - 1))
            yield (start, tokens[start : start + batch_size],
                   None if precollected is None else {d.act: precollected[d.act][rows] for d in dicts})

    n_batches = len(range(0, n, batch_size))
    scored = run.imap(score_batch, shards(), dicts=dicts, model=run.model(model, model_name))
    for start, per_dict, seconds in track(scored, total=n_batches, desc=desc, unit="batch"):
        timings["forward_s"] += seconds["forward_s"]
        timings["encode_s"] += seconds["encode_s"]
        t_w = time.perf_counter()
        for d, (feat, vals, ctx_ids, pos, best, contrib) in zip(dicts, per_dict):
            stage(writer, index[d.dict_id], feat, vals, ctx_ids, pos)
            top = tops[d.dict_id]
            cand = top.candidates(feat[best], vals[best])
            if cand.any():
                pick = best[cand]
                top.merge(feat[pick], vals[pick], ctx_ids[pick], pos[pick], contrib[cand])
        timings["stage_s"] += time.perf_counter() - t_w
    counts: dict[str, int] = {}
    for d in track(dicts, total=len(dicts), desc="Feature tables", unit="dict"):
        t0 = time.perf_counter()
        counts[d.dict_id] = _write_dictionary(writer, d, index[d.dict_id], tops[d.dict_id], corpus_id, rows_total)
        t1 = time.perf_counter()
        if logits:
            writer.insert_df("feature_logits", top_logits(model, d.sae, d.layer, kind=d.kind).assign(dict_id=d.dict_id))
        timings["logits_s"] += time.perf_counter() - t1
        timings["write_s"] += t1 - t0
        if written is not None:
            written(d, counts[d.dict_id])
    con.execute(f"DROP TABLE IF EXISTS {_STAGE}")
    return {"tokens": int(n * n_ctx), "scored_tokens": int(rows_total), "nonzeros": counts,
            **{k: round(v, 2) for k, v in timings.items()}}


def _best_rows(feat: np.ndarray, act: np.ndarray, n: int) -> np.ndarray:
    """Indices (ascending) of the ``n`` largest activations of each feature among the rows (ties: the earlier row):
    only these can enter a feature's running top-n, merged in the same order."""
    order = np.lexsort((-act, feat))  # stable: equal activations keep their row order
    f = feat[order]
    starts = np.flatnonzero(np.r_[True, f[1:] != f[:-1]]) if len(f) else np.empty(0, np.int64)
    rank = np.arange(len(f)) - np.repeat(starts, np.diff(np.r_[starts, len(f)]))
    return np.sort(order[rank < n])


def score_batch(item: tuple[int, torch.Tensor, Mapping[Act, torch.Tensor] | None], dicts: Sequence[DictEntry],
                model: Any) -> tuple[int, list[tuple[np.ndarray, ...]], dict[str, float]]:
    """One unit of work of feature scoring (run by the executor): for the batch of contexts ``item`` = (first context
    id, tokens ``[b, n_ctx]``, their precollected inputs or None), each dictionary's nonzero activations (feature,
    value, context id, position) plus, for the batch's top :data:`TOP_N` rows of each feature (indices into those
    arrays), their per-head contributions. ``model`` is the model, or its name in a Ray worker."""
    from backend.pipeline.executor import worker_model

    model = worker_model(model)
    start, batch, pre = item
    b, n_ctx = batch.shape
    n_heads, d_head = model.cfg.n_heads, model.cfg.d_head
    sites = sorted({d.act for d in dicts}, key=lambda a: (a[1], a[0]))
    t0 = time.perf_counter()
    if pre is None:
        inputs = capture_batch(model, batch, sites)  # BOS dropped: [b, n_ctx-1, ...]
    else:
        inputs = {a: pre[a].reshape(b, n_ctx - 1, -1) for a in sites}
    t1 = time.perf_counter()
    out = []
    with torch.no_grad():
        for d in dicts:
            x = inputs[d.act]
            if d.per_head and x.dim() == 3:  # precollected hook_z is flattened: back to [b, p, heads, d_head]
                x = x.reshape(*x.shape[:2], n_heads, d_head)
            acts = _encode(d, x)  # [b, n_ctx-1, d_sae]
            b_idx, p_idx, f_idx = torch.nonzero(acts > 0, as_tuple=True)
            vals = acts[b_idx, p_idx, f_idx].cpu().numpy().astype(np.float32)
            feat = f_idx.cpu().numpy().astype(np.int32)
            ctx_ids = (b_idx.cpu().numpy() + start).astype(np.int32)
            pos = (p_idx.cpu().numpy() + 1).astype(np.int16)  # real position in the context (BOS was 0)
            best = _best_rows(feat, vals, TOP_N)
            if d.per_head and len(best):
                pick = torch.from_numpy(best)
                flat = flatten_heads(x).reshape(-1, n_heads * d_head)
                tok = (b_idx * x.shape[1] + p_idx)[pick]
                contrib = head_contributions(d.sae, flat[tok], f_idx[pick], n_heads).cpu().numpy()
            else:
                contrib = np.zeros((len(best), n_heads if d.per_head else 0), np.float32)
            out.append((feat, vals, ctx_ids, pos, best, contrib))
    return start, out, {"forward_s": t1 - t0, "encode_s": time.perf_counter() - t1}


def _write_dictionary(writer: Any, d: DictEntry, stage_index: int, top: _TopN, corpus_id: str,
                      n_scored: int) -> int:
    """Copy one dictionary's staged activations sorted into feature_activations, then derive its per-feature
    tables (features, examples, DFA, histograms) in DuckDB SQL."""
    con = writer.con
    # feature-major, strongest first: a feature's rows are contiguous, so its zone maps skip the rest
    con.execute(f"""
        INSERT INTO feature_activations (dict_id, feature, corpus_id, context_id, pos, act)
        SELECT ?, feature, ?, context_id, pos, act FROM {_STAGE} WHERE d = ? ORDER BY feature, act DESC""",
        [d.dict_id, corpus_id, stage_index])
    n_rows = con.execute(f"SELECT count(*) FROM {_STAGE} WHERE d = ?", [stage_index]).fetchall()[0][0]
    con.execute(f"DELETE FROM {_STAGE} WHERE d = ?", [stage_index])
    d_sae = d.sae.W_enc.shape[1]
    n_heads = top.contrib.shape[1]
    top_df = pd.DataFrame({"feature": top.feat, "context_id": top.ctx, "pos": top.pos, "act": top.act})
    con.register("_top", top_df)
    con.execute("""
        INSERT INTO feature_examples (dict_id, feature, rank, corpus_id, context_id, pos, act)
        SELECT ?, feature, row_number() OVER (PARTITION BY feature ORDER BY act DESC, context_id, pos), ?,
               context_id, pos, act
        FROM _top ORDER BY feature, act DESC""", [d.dict_id, corpus_id])
    con.unregister("_top")
    # DFA by head: mean signed contribution over the top activations; share = |mean| / Σ|mean| (module docstring).
    if n_heads:
        _write_head_dfa(writer, d.dict_id, top)
    con.execute("""
        INSERT INTO features (dict_id, feature, n_active, density, max_act, mean_act, top_head, top_head_share, stats)
        SELECT ?, r.feature, coalesce(a.n, 0), coalesce(a.n, 0) / ?::DOUBLE, a.mx, a.mean, h.head, h.share,
               json_object('scored_tokens', ?, 'corpus_id', ?)
        FROM range(?) r(feature)
        LEFT JOIN (SELECT feature, count(*) n, max(act) mx, avg(act) mean FROM feature_activations
                   WHERE dict_id = ? GROUP BY feature) a USING (feature)
        LEFT JOIN (SELECT feature, arg_max(head, share) AS head, max(share) AS share FROM feature_head_dfa
                   WHERE dict_id = ? GROUP BY feature) h USING (feature)
        ORDER BY r.feature""",
        [d.dict_id, n_scored, n_scored, corpus_id, d_sae, d.dict_id, d.dict_id])
    # Log-spaced histogram of each feature's nonzero activations between its own min and max.
    con.execute(f"""
        INSERT INTO feature_histograms (dict_id, feature, bin, lo, hi, count)
        WITH s AS (SELECT feature, ln(min(act)) AS l0, greatest(ln(max(act)) - ln(min(act)), 1e-6) AS w
                   FROM feature_activations WHERE dict_id = ? GROUP BY feature),
        b AS (SELECT a.feature, least(floor((ln(a.act) - s.l0) / s.w * {HIST_BINS}), {HIST_BINS - 1})::SMALLINT AS bin,
                     s.l0, s.w
              FROM feature_activations a JOIN s USING (feature) WHERE a.dict_id = ?)
        SELECT ?, feature, bin, exp(l0 + bin * w / {HIST_BINS}), exp(l0 + (bin + 1) * w / {HIST_BINS}), count(*)
        FROM b GROUP BY feature, bin, l0, w ORDER BY feature, bin""", [d.dict_id, d.dict_id, d.dict_id])
    return int(n_rows)


def _write_head_dfa(writer: Any, dict_id: str, top: _TopN) -> None:
    """feature_head_dfa rows of one attention SAE from its top activations' per-head contributions."""
    dfa = pd.DataFrame(top.contrib, columns=list(range(top.contrib.shape[1])))
    dfa["feature"] = top.feat
    mean = dfa.groupby("feature").mean()
    n_ex = dfa.groupby("feature").size()
    long = mean.stack().rename("contribution").reset_index().rename(columns={"level_1": "head"})
    writer.insert_df("feature_head_dfa", long.assign(dict_id=dict_id, n_examples=long["feature"].map(n_ex)))
    writer.con.execute("""
        UPDATE feature_head_dfa SET share = CASE WHEN s.total > 0 THEN abs(contribution) / s.total ELSE 0 END
        FROM (SELECT feature AS f, sum(abs(contribution)) AS total FROM feature_head_dfa WHERE dict_id = ?
              GROUP BY feature) s
        WHERE dict_id = ? AND feature = s.f""", [dict_id, dict_id])


def _run_dictionaries(ctx: "RunContext", kind: str) -> list[DictEntry]:
    """This run's dictionaries of ``kind``, loaded (layer order)."""
    from backend.dictionaries.storage import load_dictionary

    rows = ctx.con.execute("SELECT dict_id, layer FROM dictionaries WHERE run_id = ? AND kind = ? "
                           "ORDER BY layer, dict_id", [ctx.run_id, kind]).fetchall()
    return [DictEntry(dict_id, int(layer), load_dictionary(ctx.con, dict_id), kind) for dict_id, layer in rows]


def _usable(precollected: Mapping[Act, torch.Tensor] | None, dicts: Sequence[DictEntry],
            rows: int) -> dict[Act, torch.Tensor] | None:
    """The first ``rows`` rows of every dictionary's input in ``precollected`` (context-major, so the leading
    contexts), or None if some input is missing or shorter."""
    if precollected is None or not all(d.act in precollected and precollected[d.act].shape[0] >= rows for d in dicts):
        return None
    return {d.act: precollected[d.act][:rows] for d in dicts}


def _release(ctx: "RunContext", dicts: Sequence[DictEntry]) -> None:
    """Drop the dictionaries' inputs from ``ctx.precollected``: no later step reads them (hundreds of MB on the demo)."""
    if ctx.precollected:
        used = {d.act for d in dicts}
        ctx.precollected = {a: v for a, v in ctx.precollected.items() if a not in used} or None


def _step(ctx: "RunContext", step: str, kind: str, what: str, n_contexts: int | None,
          logits: bool = True) -> dict[str, Any] | None:
    """Per-feature tables for this run's dictionaries of ``kind`` over the first ``n_contexts`` corpus contexts
    (None: all), reusing and then freeing ``ctx.precollected``; None if the run has no such dictionary. Each
    dictionary (one per layer) is a unit of work of ``step``: a resumed run scores only those not finished."""
    dicts = _run_dictionaries(ctx, kind)
    if not dicts:
        say(f"No {what}s in this run: skipping their feature step.")
        return None
    if ctx.contexts is None:
        raise InputError(f"The {what} feature step needs the corpus step to run first.")
    todo = [d for d in dicts if not ctx.done(step, d.layer)]
    if len(todo) < len(dicts):
        say(f"Skipping the {what} features of layer(s) {', '.join(str(d.layer) for d in dicts if d not in todo)}: "
            "the unfinished run had finished them")
    tokens = ctx.contexts.tokens[: n_contexts or None]
    n, n_ctx = tokens.shape
    pre = _usable(ctx.precollected, todo, n * (n_ctx - 1))

    def written(d: DictEntry, nonzeros: int) -> None:
        ctx.finish(step, d.layer, info={"dict_id": d.dict_id, "nonzeros": nonzeros})

    info = build_features(ctx.writer, ctx.model, todo, tokens, ctx.corpus_id, ctx.preset.batch_size,
                          precollected=pre, logits=logits, desc=f"{what[0].upper()}{what[1:]} feature activations",
                          written=written, executor=ctx.executor, model_name=ctx.spec.name) if todo else {"tokens": int(n * n_ctx), "scored_tokens": int(n * (n_ctx - 1))}
    info["nonzeros"] = {d.dict_id: ctx.unit_info(step, d.layer)["nonzeros"] for d in dicts}
    info["reused_activations"] = pre is not None
    _release(ctx, dicts)
    return info


def step_features(ctx: "RunContext") -> None:
    """Precompute step: per-feature data for every attention-SAE dictionary this run wrote, over every corpus context
    (see module docstring)."""
    info = _step(ctx, "features", "attn_sae", "attention SAE", None)
    if info is not None:
        ctx.summary["features"] = info


def step_transcoder_features(ctx: "RunContext") -> None:
    """Precompute step: per-feature data (examples, statistics, histograms, logit effects if the preset stores them)
    for every transcoder this run wrote, over the first ``preset.features.transcoder_contexts`` corpus contexts (30
    layers x L0 ~30 nonzeros per token add up: the demo scores fewer tokens than for the attention SAEs)."""
    info = _step(ctx, "transcoder_features", "transcoder", "transcoder", ctx.preset.features.transcoder_contexts,
                 logits=ctx.preset.features.transcoder_logits)
    if info is not None:
        ctx.summary["transcoder_features"] = info
