"""Per-feature data of attention-output SAEs (Kissane et al. 2024): the ``features`` precompute step and its math.

For every ``attn_sae`` dictionary of a run, one pass over the run's corpus contexts writes (sparse, into DuckDB):

* ``feature_activations``: every nonzero activation (dict_id, feature, corpus_id, context_id, pos, act), inserted
  sorted by (dict_id, feature, act DESC) so a feature's rows sit together (DuckDB zone maps skip the rest);
* ``features``: density (fraction of scored tokens where the feature fires), max activation, mean activation
  *over the tokens where it fires*, the dominant head by DFA and its share;
* ``feature_examples``: the top :data:`TOP_N` activations of each feature (context, position, activation);
* ``feature_head_dfa``: direct feature attribution by head (METHODS.md §1), averaged over the feature's top
  :data:`TOP_N` activations;
* ``feature_histograms``: a histogram of the feature's nonzero activations in :data:`HIST_BINS` log-spaced bins;
* ``feature_logits``: the :data:`N_LOGITS` output tokens the feature's direct path promotes most and suppresses most.

**Cost.** One forward pass per batch (to the highest dictionary layer) captures every dictionary's hook_z; or none,
when an earlier step leaves hook_z of all contexts on the run context as ``ctx.z_by_layer`` (collect_z layout).
Nonzeros go batch by batch to a TEMP staging table (bounded Python memory) and are copied sorted once per dictionary;
everything else is derived from them in DuckDB SQL. Top-N activations (with their per-head contributions) are kept
by a streaming per-feature merge, so DFA needs no second pass.

**BOS is not scored.** Position 0 of every context is the BOS token, an attention-sink outlier whose z is far
from the rest: it is excluded from every statistic, example, histogram and denominator here (pages still show it).

**DFA by head.** The encoder is linear in the concatenated ``z``: the pre-activation of feature i is
``Σ_h W_enc[slice_h, i]·(x_h − b_dec[slice_h]) + b_enc[i]`` (the b_dec term only if ``cfg.apply_b_dec_to_input``),
and head h's contribution is its term of that sum (the b_dec share of head h's slice included). We store each
head's *mean signed contribution* over the feature's top activations, and its **share** =
``|mean contribution_h| / Σ_h' |mean contribution_h'|`` (absolute, so shares are in [0, 1] and sum to 1; the sign
stays visible in the contribution). ``top_head`` is the head with the largest share.

**Logit effects.** The feature's residual direction is ``Σ_h W_dec[i, slice_h] @ W_O[h]`` (the block-diagonal W_O);
the final norm is treated as a constant scale — RMSNorm multiplies by ``ln_final.w``, LayerNorm centres the
vector and multiplies by its weight (the "Pre" variants, with weights folded into W_U, only centre / do nothing) —
and then ``W_U`` (no ``b_U``: it is the same for every feature). Values are in logits per unit of activation.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np
import pandas as pd
import torch

from backend import dfa
from backend.activations import z_batch
from backend.dictionaries import encode_z, flatten_z
from backend.errors import InputError
from backend.progress import say, track

TOP_N = 20  # top activations kept per feature: materialised examples and the DFA average
HIST_BINS = 24  # log-spaced activation-histogram bins per feature
N_LOGITS = 10  # promoted and suppressed output tokens stored per feature
_STAGE = "_feature_acts_stage"  # TEMP table: one run's nonzeros before the sorted copy


@dataclass
class DictEntry:
    """One dictionary to process: its id, the layer whose hook_z it reads, and the loaded sae-lens SAE."""

    dict_id: str
    layer: int
    sae: Any


# ------------------------------------------------------------------------------------------------------------------
# Math (pure functions of tensors; tested against sae-lens / TransformerLens computations)


def head_contributions(sae: Any, x: torch.Tensor, feats: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Per-head contribution (b_dec share included) to feature ``feats[j]``'s pre-activation at ``x[j]``
    -> ``[m, n_heads]``; see :func:`backend.dfa.head_terms`."""
    return dfa.head_terms(sae, x, feats, n_heads)[0]


@torch.no_grad()
def final_norm_as_scale(model: Any, v: torch.Tensor) -> torch.Tensor:
    """Apply the final norm to residual directions ``v`` [..., d_model] with its input scale treated as constant."""
    kind = model.cfg.normalization_type
    if kind in ("LN", "LNPre"):
        v = v - v.mean(-1, keepdim=True)
    if kind in ("LN", "RMS"):
        v = v * model.ln_final.w
    return v


@torch.no_grad()
def feature_logit_effects(model: Any, sae: Any, layer: int, features: torch.Tensor | None = None) -> torch.Tensor:
    """Direct logit effect ``[n_features, d_vocab]`` of one unit of each feature (all features by default)."""
    feats = torch.arange(sae.W_dec.shape[0]) if features is None else features
    n_heads, d_head = model.cfg.n_heads, model.cfg.d_head
    w_dec = sae.W_dec[feats].reshape(len(feats), n_heads, d_head)
    resid = torch.einsum("fhd,hdm->fm", w_dec, model.blocks[layer].attn.W_O)
    return final_norm_as_scale(model, resid) @ model.W_U


@torch.no_grad()
def top_logits(model: Any, sae: Any, layer: int, k: int = N_LOGITS, chunk: int = 256) -> pd.DataFrame:
    """Top-k promoted and suppressed tokens of every feature: columns feature, kind, rank (1 = strongest), token_id,
    value. Chunked over features: the full [d_sae, d_vocab] matrix would not fit comfortably in memory."""
    d_sae = sae.W_dec.shape[0]
    frames = []
    for s in range(0, d_sae, chunk):
        feats = torch.arange(s, min(d_sae, s + chunk))
        eff = feature_logit_effects(model, sae, layer, feats)
        for kind, largest in (("promoted", True), ("suppressed", False)):
            top = eff.topk(k, dim=-1, largest=largest)
            frames.append(pd.DataFrame({
                "feature": np.repeat(feats.numpy(), k).astype(np.int32),
                "kind": kind,
                "rank": np.tile(np.arange(1, k + 1), len(feats)).astype(np.int16),
                "token_id": top.indices.reshape(-1).numpy().astype(np.int32),
                "value": top.values.reshape(-1).numpy().astype(np.float32),
            }))
    return pd.concat(frames, ignore_index=True)


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

    def merge(self, feat: np.ndarray, act: np.ndarray, ctx: np.ndarray, pos: np.ndarray, contrib: np.ndarray) -> None:
        """Add candidates and keep the top-n per feature."""
        f = np.concatenate([self.feat, feat])
        a = np.concatenate([self.act, act])
        order = np.lexsort((-a, f))
        f = f[order]
        starts = np.flatnonzero(np.r_[True, f[1:] != f[:-1]])
        sizes = np.diff(np.r_[starts, len(f)])
        rank = np.arange(len(f)) - np.repeat(starts, sizes)
        keep = order[rank < self.n]
        self.feat = np.concatenate([self.feat, feat])[keep]
        self.act = a[keep]
        self.ctx = np.concatenate([self.ctx, ctx])[keep]
        self.pos = np.concatenate([self.pos, pos])[keep]
        self.contrib = np.concatenate([self.contrib, contrib])[keep]
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


@torch.no_grad()
def build_features(writer: Any, model: Any, dicts: Sequence[DictEntry], tokens: torch.Tensor, corpus_id: str,
                   batch_size: int = 16, z_by_layer: Mapping[int, torch.Tensor] | None = None) -> dict[str, Any]:
    """Compute and write all per-feature tables for ``dicts`` over ``tokens`` ``[n, n_ctx]`` (BOS at position 0).

    One forward pass per batch captures hook_z of every dictionary's layer at once (``stop_at_layer`` skips the
    layers above the highest one). If ``z_by_layer`` already holds those activations for *these* tokens, in
    :func:`backend.activations.collect_z`'s layout (``[n * (n_ctx - 1), d_in]``, context-major, BOS dropped), no
    forward pass runs at all. Returns timings and row counts.
    """
    con = writer.con
    n, n_ctx = tokens.shape
    n_heads, d_head = model.cfg.n_heads, model.cfg.d_head
    if z_by_layer is not None:
        for d in dicts:
            got = z_by_layer.get(d.layer)
            if got is None or tuple(got.shape) != (n * (n_ctx - 1), n_heads * d_head):
                raise ValueError(f"z_by_layer lacks layer {d.layer} for these {n} x {n_ctx} tokens")
    tops = {d.dict_id: _TopN(d.sae.W_enc.shape[1], n_heads) for d in dicts}
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
    batches = range(0, n, batch_size)
    for start in track(batches, total=len(batches), desc="Feature activations", unit="batch"):
        batch = tokens[start : start + batch_size]
        t0 = time.perf_counter()
        if z_by_layer is None:
            by_layer = z_batch(model, batch, [d.layer for d in dicts])  # BOS dropped: [b, n_ctx-1, heads, d_head]
            zs = {d.dict_id: by_layer[d.layer] for d in dicts}
        else:
            rows = slice(start * (n_ctx - 1), (start + len(batch)) * (n_ctx - 1))
            zs = {d.dict_id: z_by_layer[d.layer][rows].reshape(len(batch), n_ctx - 1, n_heads, d_head) for d in dicts}
        t1 = time.perf_counter()
        timings["forward_s"] += t1 - t0
        staged = 0.0
        for d in dicts:
            z = zs[d.dict_id]
            acts = encode_z(d.sae, z)  # [b, n_ctx-1, d_sae], sae-lens' own encode
            b_idx, p_idx, f_idx = torch.nonzero(acts > 0, as_tuple=True)
            vals = acts[b_idx, p_idx, f_idx].numpy().astype(np.float32)
            feat = f_idx.numpy().astype(np.int32)
            ctx_ids = (b_idx.numpy() + start).astype(np.int32)
            pos = (p_idx.numpy() + 1).astype(np.int16)  # real position in the context (BOS was 0)
            t_w = time.perf_counter()
            stage(writer, index[d.dict_id], feat, vals, ctx_ids, pos)
            staged += time.perf_counter() - t_w
            top = tops[d.dict_id]
            cand = top.candidates(feat, vals)
            if cand.any():
                x = flatten_z(z).reshape(-1, z.shape[-2] * z.shape[-1])
                tok = (b_idx * z.shape[1] + p_idx)[torch.from_numpy(cand)]
                contrib = head_contributions(d.sae, x[tok], f_idx[torch.from_numpy(cand)], n_heads).numpy()
                top.merge(feat[cand], vals[cand], ctx_ids[cand], pos[cand], contrib)
        timings["encode_s"] += time.perf_counter() - t1 - staged
        timings["stage_s"] += staged
    n_scored = n * (n_ctx - 1)
    counts: dict[str, int] = {}
    for d in track(dicts, total=len(dicts), desc="Feature tables", unit="dict"):
        t0 = time.perf_counter()
        counts[d.dict_id] = _write_dictionary(writer, d, index[d.dict_id], tops[d.dict_id], corpus_id, n_scored)
        t1 = time.perf_counter()
        writer.insert_df("feature_logits", top_logits(model, d.sae, d.layer).assign(dict_id=d.dict_id))
        timings["logits_s"] += time.perf_counter() - t1
        timings["write_s"] += t1 - t0
    con.execute(f"DROP TABLE IF EXISTS {_STAGE}")
    return {"tokens": int(n * n_ctx), "scored_tokens": int(n_scored), "nonzeros": counts,
            **{k: round(v, 2) for k, v in timings.items()}}


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
    dfa = pd.DataFrame(top.contrib, columns=list(range(n_heads)))
    dfa["feature"] = top.feat
    mean = dfa.groupby("feature").mean()
    n_ex = dfa.groupby("feature").size()
    long = mean.stack().rename("contribution").reset_index().rename(columns={"level_1": "head"})
    writer.insert_df("feature_head_dfa", long.assign(dict_id=d.dict_id, n_examples=long["feature"].map(n_ex)))
    con.execute("""
        UPDATE feature_head_dfa SET share = CASE WHEN s.total > 0 THEN abs(contribution) / s.total ELSE 0 END
        FROM (SELECT feature AS f, sum(abs(contribution)) AS total FROM feature_head_dfa WHERE dict_id = ?
              GROUP BY feature) s
        WHERE dict_id = ? AND feature = s.f""", [d.dict_id, d.dict_id])
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


def step_features(ctx: Any) -> None:
    """Precompute step: per-feature data for every attention-SAE dictionary this run wrote (see module docstring)."""
    from backend.dictionaries import load_dictionary

    rows = ctx.con.execute(
        "SELECT dict_id, layer FROM dictionaries WHERE run_id = ? AND kind = 'attn_sae' ORDER BY layer, dict_id",
        [ctx.run_id]).fetchall()
    if not rows:
        say("No attention SAEs in this run: skipping the feature step.")
        return
    if ctx.contexts is None:
        raise InputError("The features step needs the corpus step to run first.")
    dicts = [DictEntry(dict_id, int(layer), load_dictionary(ctx.con, dict_id)) for dict_id, layer in rows]
    # An earlier step may leave hook_z of ALL contexts on the context (collect_z layout) to spare a forward pass.
    z = getattr(ctx, "z_by_layer", None)
    n, n_ctx = ctx.contexts.tokens.shape
    if z is not None and not all(d.layer in z and z[d.layer].shape[0] == n * (n_ctx - 1) for d in dicts):
        z = None
    info = build_features(ctx.writer, ctx.model, dicts, ctx.contexts.tokens, ctx.corpus_id, ctx.preset.batch_size,
                          z_by_layer=z)
    info["reused_activations"] = z is not None
    ctx.summary["features"] = info
