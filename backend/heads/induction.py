"""Induction heads: per-head scores on repeated random tokens, the long- vs short-prefix test (Kissane et al. 2024)
and the ``induction`` precompute step.

Notation: ``o`` is 1 when the model prepends a BOS token (position 0) and 0 otherwise; positions below are absolute.
Every token is drawn from ordinary word tokens (:func:`backend.inputs.tasks.word_token_pool`) with a seeded
``random.Random``, **without replacement within a sequence**, so a token repeats only where a condition copies it
("fillers" are such distinct random tokens).

Sequences
---------
* **repeat** (head scores): ``[BOS, r_1..r_L, r_1..r_L]``. The second copy starts at ``o + L``.
* **prefix(k)**, ``k = 0..K``, length ``T`` (destination ``d = T − 1``, the last position): the first occurrence of
  a token ``A`` sits at ``q = o + K + 1`` and is followed by ``B`` at ``q + 1`` (the *induction target*).
  For ``k ≥ 1`` the destination holds ``A`` again and the ``k`` tokens ending at ``d`` equal the ``k`` tokens ending
  at ``q`` (``tokens[d − j] == tokens[q − j]`` for ``j = 0..k−1``): ``k = 1`` means only ``A`` itself matches its
  earlier occurrence, ``k = K`` means ``A`` and its ``K − 1`` predecessors do. The token before the matching block
  differs (``tokens[d − k] != tokens[q − k]``: two distinct fillers), so the matching prefix is *exactly* ``k``.
  ``k = 0`` is the control: the destination is a fresh filler that never occurred, so nothing matches; attention to
  ``q + 1`` and the direct effect on ``B`` are still read there (the base rate of a head that does no induction).
  Only ``k`` changes between conditions: the positions of ``A``, ``B`` and the destination are the same for every k.
* **competition** (the paper's other check, as a head-to-head choice): two earlier occurrences of ``A``, each
  followed by its own successor — a *long* one whose ``K`` tokens ending at ``A`` match the ``K`` tokens ending at the
  destination, and a *short* one where only ``A`` matches (the single previous token, i.e. the current token
  ``A``, matches but the longer prefix does not: the token before it is a filler). The destination ``d = T − 1``
  holds ``A``. The occurrences end at ``q1 = o + K + 1`` and ``q2 = (q1 + d) // 2``; even rows put the long one
  first, odd rows the short one, so recency favours neither on average. We read the attention to, and the direct
  effect on, each successor (``competition_long`` / ``competition_short``): a head that needs the long prefix
  prefers the long one's successor; a head that fires on a short prefix splits its attention between them.

Scores (pure functions of a pattern ``[batch, head, dest, src]`` and index pairs, averaged over batch and pairs)
----------------------------------------------------------------------------------------------------------------
On repeat sequences with copy length L, for the second-copy positions ``i = o + L + j`` (``j = 0..L−1``):

* **induction** = mean attention from ``i`` to ``o + j + 1``, the token after that token's previous occurrence;
* **duplicate-token** = mean attention from ``i`` to ``o + j``, the previous occurrence itself;
* **previous-token** = mean attention from ``i`` to ``i − 1`` over every position ``i = o + 1 .. o + 2L − 1``
  (BOS is never a destination, and the first real token is skipped because its predecessor is BOS).

A head that always attends to the induction target scores 1 and a uniform (causal) head about ``1 / i`` ≈ 0.

Direct effect
-------------
Head (l, h)'s output at the destination is ``z_h W_O^h`` (TransformerLens' ``hook_z`` already has one row per
*query* head under grouped-query attention, so no key/value mapping is needed). It goes through the final norm with
its scale frozen at the value of the actual run (``ln_final.hook_scale``; RMSNorm: ``x / scale · w``, LayerNorm also
centres) and ``W_U``, to the logit of the induction-predicted token (the token that followed the earlier occurrence),
**minus that contribution's mean over the vocabulary** so that a uniform logit offset does not count:
``DE = normed · (W_U[:, t] − mean_v W_U[:, v])``, in logits.

Classification
--------------
See :func:`classify_heads` (the rule is stored with every row's numbers in ``induction_classes.stats``).
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Mapping, Sequence

import numpy as np
import pandas as pd
import torch

from backend.errors import InputError
from backend.model.hooks import FINAL_SCALE, hook_name

if TYPE_CHECKING:
    from backend.pipeline.context import RunContext

SCORES = ("induction", "prev_token", "duplicate_token")
CONDITIONS = ("prefix", "competition_long", "competition_short")


# ------------------------------------------------------------------------------------------------------------------
# Sequence builders


@dataclass
class ProbeBatch:
    """Controlled sequences with one destination per row and one or more named targets to read there.

    ``targets[name] = (positions [n], token ids [n])``: where the head should attend (the induction target) and the
    token whose logit its direct effect is measured on.
    """

    condition: str  # "prefix" or "competition"
    prefix_len: int
    tokens: torch.Tensor  # LongTensor [n, T]
    dest: torch.Tensor  # LongTensor [n]
    targets: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)

    def __len__(self) -> int:
        return int(self.tokens.shape[0])


def _offset(bos: int | None) -> int:
    return 0 if bos is None else 1


def _draw(rng: random.Random, pool: Sequence[int], count: int) -> list[int]:
    if count > len(pool):
        raise InputError(f"The token pool has {len(pool)} tokens, too few for {count} distinct ones.")
    return rng.sample(list(pool), count)


def _fillers(rng: random.Random, pool: Sequence[int], length: int, bos: int | None) -> list[int]:
    """A row of ``length`` positions: BOS (if any) then distinct random tokens."""
    o = _offset(bos)
    return ([int(bos)] if bos is not None else []) + _draw(rng, pool, length - o)


def repeat_tokens(pool: Sequence[int], n: int, repeat_len: int, bos: int | None, seed: int = 0) -> torch.Tensor:
    """``n`` rows of ``[BOS, r_1..r_L, r_1..r_L]`` with L = ``repeat_len`` distinct random tokens per row."""
    if repeat_len < 2:
        raise InputError(f"The repeated sequence must be at least 2 tokens long, not {repeat_len}.")
    rng = random.Random(seed)
    prefix = [] if bos is None else [int(bos)]
    rows = []
    for _ in range(n):
        r = _draw(rng, pool, repeat_len)
        rows.append(prefix + r + r)
    return torch.tensor(rows, dtype=torch.long)


def prefix_layout(seq_len: int, max_prefix: int, bos: int | None) -> tuple[int, int]:
    """``(q, d)``: position of the first occurrence of A and of the destination in prefix(k) sequences."""
    o = _offset(bos)
    q, d = o + max_prefix + 1, seq_len - 1
    if max_prefix < 1 or d - max_prefix < q + 2:  # the destination's block must start after B (q + 1)
        raise InputError(f"Prefix sequences of {seq_len} tokens are too short for matching prefixes up to "
                         f"{max_prefix}: use at least {o + 2 * max_prefix + 4} tokens.")
    return q, d


def prefix_batch(pool: Sequence[int], n: int, k: int, max_prefix: int, seq_len: int, bos: int | None,
                 seed: int = 0) -> ProbeBatch:
    """``n`` prefix(k) sequences (module docstring): the destination's matching prefix is exactly ``k`` tokens."""
    if not 0 <= k <= max_prefix:
        raise InputError(f"The matching prefix length must be between 0 and {max_prefix}, not {k}.")
    q, d = prefix_layout(seq_len, max_prefix, bos)
    rng = random.Random(seed * 1_000 + k)
    rows = []
    for _ in range(n):
        row = _fillers(rng, pool, seq_len, bos)
        for j in range(k):  # copy the block ending at q onto the block ending at d; d - k keeps its own filler
            row[d - j] = row[q - j]
        rows.append(row)
    tokens = torch.tensor(rows, dtype=torch.long)
    return ProbeBatch("prefix", k, tokens, torch.full((n,), d, dtype=torch.long),
                      {"prefix": (torch.full((n,), q + 1, dtype=torch.long), tokens[:, q + 1].clone())})


def competition_layout(seq_len: int, max_prefix: int, bos: int | None) -> tuple[int, int, int]:
    """``(q1, q2, d)``: ends of the two earlier occurrences of A and the destination in competition sequences."""
    o, K = _offset(bos), max_prefix
    q1, d = o + K + 1, seq_len - 1
    q2 = (q1 + d) // 2
    if K < 2 or q2 - K < q1 + 2 or d - K < q2 + 2:
        raise InputError(f"Competition sequences of {seq_len} tokens are too short for a matching prefix of "
                         f"{max_prefix}: use at least {o + 3 * max_prefix + 7} tokens.")
    return q1, q2, d


def competition_batch(pool: Sequence[int], n: int, max_prefix: int, seq_len: int, bos: int | None,
                      seed: int = 0) -> ProbeBatch:
    """``n`` competition sequences (module docstring); targets ``competition_long`` and ``competition_short``."""
    q1, q2, d = competition_layout(seq_len, max_prefix, bos)
    rng = random.Random(seed * 1_000 + 999)
    rows, long_pos, short_pos = [], [], []
    for i in range(n):
        ql, qs = (q1, q2) if i % 2 == 0 else (q2, q1)
        row = _fillers(rng, pool, seq_len, bos)
        for j in range(max_prefix):  # the long occurrence: its K-token block is copied to the destination's
            row[d - j] = row[ql - j]
        row[qs] = row[ql]  # the short occurrence: only A itself; the token before it stays a distinct filler
        rows.append(row)
        long_pos.append(ql + 1)
        short_pos.append(qs + 1)
    tokens = torch.tensor(rows, dtype=torch.long)
    lp, sp = torch.tensor(long_pos), torch.tensor(short_pos)
    idx = torch.arange(n)
    return ProbeBatch("competition", max_prefix, tokens, torch.full((n,), d, dtype=torch.long), {
        "competition_long": (lp, tokens[idx, lp].clone()),
        "competition_short": (sp, tokens[idx, sp].clone()),
    })


def matching_prefix_len(tokens: Sequence[int], i: int, p: int, start: int = 0) -> int:
    """How many tokens ending at ``i`` equal the tokens ending at ``p`` (``p < i``), not looking before ``start``."""
    m = 0
    while p - m >= start and tokens[i - m] == tokens[p - m]:
        m += 1
    return m


# ------------------------------------------------------------------------------------------------------------------
# Scores: pure functions of attention patterns


def repeat_pairs(repeat_len: int, bos: int | None) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """``{score: (dest positions, src positions)}`` of the three scores on a repeat sequence (module docstring)."""
    o, L = _offset(bos), repeat_len
    second = torch.arange(o + L, o + 2 * L)
    prev_dest = torch.arange(o + 1, o + 2 * L)
    return {
        "induction": (second, second - L + 1),
        "duplicate_token": (second, second - L),
        "prev_token": (prev_dest, prev_dest - 1),
    }


def token_pairs(tokens: Sequence[int], start: int = 0) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """The same pairs read off any token sequence: for each position ``i >= start`` whose token occurred before
    (at or after ``start``), its most recent previous occurrence ``p`` gives (i, p + 1) for induction and (i, p) for
    duplicate-token; previous-token pairs are (i, i − 1) for ``i > start``. On a repeat sequence (``start = o``)
    this gives exactly :func:`repeat_pairs`."""
    last: dict[int, int] = {}
    ind_d, ind_s, dup_s = [], [], []
    for i in range(start, len(tokens)):
        t = int(tokens[i])
        if t in last:
            ind_d.append(i)
            ind_s.append(last[t] + 1)
            dup_s.append(last[t])
        last[t] = i
    prev = torch.arange(start + 1, len(tokens))
    d = torch.tensor(ind_d, dtype=torch.long)
    return {"induction": (d, torch.tensor(ind_s, dtype=torch.long)),
            "duplicate_token": (d, torch.tensor(dup_s, dtype=torch.long)),
            "prev_token": (prev, prev - 1)}


def pair_score(pattern: torch.Tensor, dest: torch.Tensor, src: torch.Tensor) -> torch.Tensor:
    """Mean attention ``pattern[b, h, dest[m], src[m]]`` over the batch and the pairs: one value per head ``[h]``."""
    if len(dest) == 0:
        return torch.full((pattern.shape[1],), math.nan)
    return pattern[:, :, dest, src].float().mean(dim=(0, 2))


def head_scores_from_patterns(patterns: Sequence[torch.Tensor],
                              pairs: Mapping[str, tuple[torch.Tensor, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """``{score: [n_layers, n_heads]}`` from one pattern ``[batch, head, dest, src]`` per layer."""
    return {name: torch.stack([pair_score(p, *pairs[name]) for p in patterns]) for name in SCORES}


# ------------------------------------------------------------------------------------------------------------------
# Model-driven measurements


def _pattern_names(model: Any) -> list[str]:
    return [hook_name("pattern", layer) for layer in range(model.cfg.n_layers)]


@torch.no_grad()
def patterns(model: Any, tokens: torch.Tensor) -> list[torch.Tensor]:
    """Attention patterns of every layer for ``tokens`` ``[n, T]`` in one forward pass: ``[n, head, dest, src]``."""
    names = _pattern_names(model)
    _, cache = model.run_with_cache(tokens, names_filter=names)
    return [cache[name] for name in names]


@torch.no_grad()
def repeat_head_scores(model: Any, tokens: torch.Tensor, repeat_len: int, bos: int | None,
                       batch_size: int = 16) -> dict[str, np.ndarray]:
    """Induction / previous-token / duplicate-token score of every head on repeat sequences ``tokens``:
    ``{score: [n_layers, n_heads]}`` (batch means weighted by batch size)."""
    pairs = repeat_pairs(repeat_len, bos)
    total = {name: torch.zeros(model.cfg.n_layers, model.cfg.n_heads) for name in SCORES}
    for start in range(0, len(tokens), batch_size):
        batch = tokens[start : start + batch_size]
        for name, value in head_scores_from_patterns(patterns(model, batch), pairs).items():
            total[name] += value * len(batch)
    return {name: (value / len(tokens)).cpu().numpy() for name, value in total.items()}


def logit_direction(model: Any, token_ids: torch.Tensor) -> torch.Tensor:
    """``W_U[:, t] − mean_v W_U[:, v]`` for each token id: ``[n, d_model]`` (logit of t minus the vocab mean)."""
    w_u = model.W_U
    return (w_u[:, token_ids] - w_u.mean(dim=1, keepdim=True)).T


@torch.no_grad()
def head_direct_effects(model: Any, cache: Any, rows: torch.Tensor, dest: torch.Tensor, token_ids: torch.Tensor,
                        layers: Sequence[int] | None = None) -> torch.Tensor:
    """Direct effect of every head of ``layers`` (default: all) at ``(rows[m], dest[m])`` on ``token_ids[m]``
    (module docstring): ``[m, len(layers), H]``. ``cache`` must hold those layers' ``hook_z`` and
    ``ln_final.hook_scale``.
    """
    from backend.features.logits import final_norm_as_scale

    layers = list(range(model.cfg.n_layers)) if layers is None else list(layers)
    z = torch.stack([cache[hook_name("z", layer)][rows, dest] for layer in layers], dim=1)
    w_o = torch.stack([model.blocks[layer].attn.W_O for layer in layers])  # [L, H, d_head, d_model]
    out = torch.einsum("mlhd,lhde->mlhe", z, w_o)
    scale = cache[FINAL_SCALE][rows, dest]  # [m, 1]: the frozen final-norm scale of the real run
    normed = final_norm_as_scale(model, out) / scale[:, None, None, :]
    return torch.einsum("mlhe,me->mlh", normed, logit_direction(model, token_ids))


@torch.no_grad()
def probe_heads(model: Any, batch: ProbeBatch, batch_size: int = 16) -> dict[str, dict[str, np.ndarray]]:
    """For each target of ``batch``: every head's mean attention from the destination to the target and its mean
    direct effect on the target token, ``{target: {"attention": [L, H], "direct_effect": [L, H]}}``."""
    n_layers = model.cfg.n_layers
    names = _pattern_names(model) + [hook_name("z", layer) for layer in range(n_layers)] + [FINAL_SCALE]
    sums = {t: {"attention": 0.0, "direct_effect": 0.0} for t in batch.targets}
    for start in range(0, len(batch), batch_size):
        sl = slice(start, start + batch_size)
        tokens, dest = batch.tokens[sl], batch.dest[sl]
        rows = torch.arange(len(tokens))
        _, cache = model.run_with_cache(tokens, names_filter=names)
        for target, (pos, tok) in batch.targets.items():
            attn = torch.stack([cache[hook_name("pattern", layer)][rows, :, dest, pos[sl]]
                                for layer in range(n_layers)], dim=1)  # [m, L, H]
            de = head_direct_effects(model, cache, rows, dest, tok[sl])
            sums[target]["attention"] = sums[target]["attention"] + attn.sum(0)
            sums[target]["direct_effect"] = sums[target]["direct_effect"] + de.sum(0)
    return {t: {k: (v / len(batch)).float().cpu().numpy() for k, v in s.items()} for t, s in sums.items()}


@dataclass
class PromptView:
    """One head on one token sequence: its attention pattern and its induction behaviour at every position."""

    layer: int
    head: int
    ids: list[int]
    tokens: list[str]
    pattern: np.ndarray  # [T, T] attention of the head (rows: destination, columns: source)
    table: pd.DataFrame  # one row per position, see prompt_head_view
    start: int = 0  # first position that is not BOS


@torch.no_grad()
def prompt_head_view(model: Any, ids: Sequence[int], layer: int, head: int) -> PromptView:
    """Run ``ids`` (BOS first if the model uses one) and describe head ``layer.head`` at every position.

    Table columns: pos, token, prev_pos (most recent earlier occurrence of the same token, BOS excluded; -1 if none),
    match_len (how many tokens ending here match the tokens ending at prev_pos, :func:`matching_prefix_len`),
    target_pos (prev_pos + 1: the induction target), target_token, attention (to the induction target) and
    direct_effect (on the target token's logit minus the vocabulary mean, module docstring); the last four are
    NaN / -1 / "" where the token has not occurred before. Also attention_prev (to position − 1) and top_src (the
    source the head attends to most).
    """
    from backend.inputs.prompts import model_bos_id, token_strings

    ids = [int(i) for i in ids]
    bos = model_bos_id(model)
    start = 1 if bos is not None and ids and ids[0] == bos else 0
    names = [hook_name("pattern", layer), hook_name("z", layer), FINAL_SCALE]
    _, cache = model.run_with_cache(torch.tensor([ids], dtype=torch.long), names_filter=names)
    pattern = cache[hook_name("pattern", layer)][0, head].float()  # [T, T]
    n = len(ids)
    last: dict[int, int] = {}
    prev = [-1] * n
    for i in range(start, n):
        prev[i] = last.get(ids[i], -1)
        last[ids[i]] = i
    has = [i for i in range(n) if prev[i] >= 0]
    target = [prev[i] + 1 if prev[i] >= 0 else -1 for i in range(n)]
    attention = np.full(n, np.nan)
    effect = np.full(n, np.nan)
    if has:
        dest = torch.tensor(has)
        tgt = torch.tensor([target[i] for i in has])
        attention[has] = pattern[dest, tgt].cpu().numpy()
        de = head_direct_effects(model, cache, torch.zeros(len(has), dtype=torch.long), dest,
                                 torch.tensor([ids[t] for t in tgt.tolist()]), layers=[layer])
        effect[has] = de[:, 0, head].cpu().numpy()
    strings = token_strings(model.tokenizer, ids)
    table = pd.DataFrame({
        "pos": np.arange(n),
        "token": strings,
        "prev_pos": prev,
        "match_len": [matching_prefix_len(ids, i, prev[i], start) if prev[i] >= 0 else 0 for i in range(n)],
        "target_pos": target,
        "target_token": [strings[t] if t >= 0 else "" for t in target],
        "attention": attention,
        "direct_effect": effect,
        "attention_prev": [float(pattern[i, i - 1]) if i >= 1 else np.nan for i in range(n)],
        "top_src": pattern.argmax(dim=1).cpu().numpy(),
    })
    return PromptView(int(layer), int(head), ids, strings, pattern.cpu().numpy(), table, start)


def example_ids(model: Any, kind: str, max_prefix: int, seq_len: int, repeat_len: int,
                seed: int = 0) -> tuple[list[int], int | None, dict[str, int]]:
    """First row of one probe kind (``"repeat"``, ``"prefix:k"`` or ``"competition"``) as the precompute builds it:
    ``(ids, destination, {target name: position})`` (destination None for repeats: every second-copy position)."""
    from backend.inputs.prompts import model_bos_id
    from backend.inputs.tasks import word_token_pool

    bos = model_bos_id(model)
    pool = word_token_pool(model.tokenizer)
    if kind == "repeat":
        return repeat_tokens(pool, 1, repeat_len, bos, seed)[0].tolist(), None, {}
    if kind.startswith("prefix:"):
        batch = prefix_batch(pool, 1, int(kind.split(":", 1)[1]), max_prefix, seq_len, bos, seed)
    elif kind == "competition":
        batch = competition_batch(pool, 1, max_prefix, seq_len, bos, seed)
    else:
        raise InputError(f"Unknown example kind {kind!r}: use 'repeat', 'prefix:k' or 'competition'.")
    return (batch.tokens[0].tolist(), int(batch.dest[0]),
            {name: int(pos[0]) for name, (pos, _) in batch.targets.items()})


# ------------------------------------------------------------------------------------------------------------------
# Classification of candidate induction heads

INDUCTION_THRESHOLD = 0.2  # a candidate's induction score on repeated random tokens must reach this
MIN_PLATEAU = 0.1  # ... and its attention to the target with a long prefix must exceed the k = 0 control by this
SHORT_RATIO = 0.5  # one matching token gets a short-prefix head at least this share of its long-prefix attention
CLASSES = ("short-prefix", "long-prefix", "weak")
RULE = (
    f"Candidates are the heads with the highest induction scores. With e(k) = attention from the destination to the "
    f"induction target at matching-prefix length k minus the k = 0 control, and plateau = mean of e(K−1) and e(K): "
    f"a candidate is **weak** if its induction score is below {INDUCTION_THRESHOLD} or its plateau below "
    f"{MIN_PLATEAU}; otherwise **short-prefix** if e(1) ≥ {SHORT_RATIO} × plateau (one matching token already gets "
    f"it at least half of its long-prefix attention), else **long-prefix** (it needs a longer matching prefix)."
)


def classify_heads(scores: pd.DataFrame, prefix: pd.DataFrame, top_n: int) -> pd.DataFrame:
    """Classify the ``top_n`` heads with the highest induction score by the rule in :data:`RULE`.

    ``scores``: columns layer, head, induction (+ prev_token, duplicate_token); ``prefix``: columns layer, head,
    condition, prefix_len, attention, direct_effect (condition "prefix" for k = 0..K, plus "competition_long" /
    "competition_short" if measured). Returns layer, head, head_class, stats (a dict with the numbers the rule used,
    the direct effects, the competition result and the thresholds), best induction score first.
    """
    top = scores.sort_values(["induction", "layer", "head"], ascending=[False, True, True]).head(int(top_n))
    curves = prefix[prefix["condition"] == "prefix"]
    big_k = int(curves["prefix_len"].max())
    rows = []
    for rank, r in enumerate(top.itertuples(index=False), start=1):
        c = curves[(curves["layer"] == r.layer) & (curves["head"] == r.head)].set_index("prefix_len").sort_index()
        attn, de = c["attention"], c["direct_effect"]
        excess = attn - attn.loc[0]
        plateau = float(excess.loc[[big_k - 1, big_k]].mean())
        e1 = float(excess.loc[1])
        ratio = e1 / plateau if plateau > 0 else math.nan
        reached = [int(k) for k in excess.index if k >= 1 and excess.loc[k] >= SHORT_RATIO * plateau]
        if r.induction < INDUCTION_THRESHOLD or plateau < MIN_PLATEAU:
            head_class = "weak"
        elif e1 >= SHORT_RATIO * plateau:
            head_class = "short-prefix"
        else:
            head_class = "long-prefix"
        stats: dict[str, Any] = {
            "rank": rank, "induction": float(r.induction), "control_attention": float(attn.loc[0]),
            "attention_k1": float(attn.loc[1]), "attention_kmax": float(attn.loc[big_k]), "excess_k1": e1,
            "plateau": plateau, "ratio": ratio, "k_half": reached[0] if reached and plateau > 0 else None,
            "direct_effect_k1": float(de.loc[1]), "direct_effect_kmax": float(de.loc[big_k]), "max_prefix": big_k,
            "thresholds": {"induction": INDUCTION_THRESHOLD, "plateau": MIN_PLATEAU, "short_ratio": SHORT_RATIO},
        }
        for cond in ("competition_long", "competition_short"):
            got = prefix[(prefix["condition"] == cond) & (prefix["layer"] == r.layer) & (prefix["head"] == r.head)]
            if len(got):
                stats[f"{cond}_attention"] = float(got["attention"].iloc[0])
                stats[f"{cond}_direct_effect"] = float(got["direct_effect"].iloc[0])
        if "competition_long_attention" in stats:
            both = stats["competition_long_attention"] + stats["competition_short_attention"]
            stats["long_share"] = stats["competition_long_attention"] / both if both > 0 else math.nan
        for key in ("prev_token", "duplicate_token"):
            if hasattr(r, key):
                stats[key] = float(getattr(r, key))
        rows.append({"layer": int(r.layer), "head": int(r.head), "head_class": head_class, "stats": stats})
    return pd.DataFrame(rows, columns=["layer", "head", "head_class", "stats"])


# ------------------------------------------------------------------------------------------------------------------
# The precompute step


@dataclass(frozen=True)
class ProbeSizes:
    """How many and how long the probe sequences are (from the preset, clamped to the model's context)."""

    n_sequences: int
    repeat_len: int
    max_prefix: int
    seq_len: int
    seed: int = 0


def probe_sizes(preset: Any, n_ctx: int, bos: int | None) -> ProbeSizes:
    """The preset's induction sizes, shrunk to fit ``n_ctx`` tokens; InputError if even the smallest do not fit."""
    o = _offset(bos)
    repeat_len = min(int(preset.induction.repeat_len), (n_ctx - o) // 2)
    seq_len = min(int(preset.induction.seq_len), n_ctx)
    max_prefix = min(int(preset.induction.max_prefix), (seq_len - o - 7) // 3)
    if repeat_len < 2 or max_prefix < 2:
        raise InputError(f"The model's context of {n_ctx} tokens is too short for the induction probes.")
    return ProbeSizes(int(preset.induction.sequences), repeat_len, max_prefix, seq_len)


def probe_batches(pool: Sequence[int], sizes: ProbeSizes, bos: int | None) -> list[ProbeBatch]:
    """Every controlled batch of the step: prefix(k) for k = 0..K, then the competition batch."""
    n, K, T, seed = sizes.n_sequences, sizes.max_prefix, sizes.seq_len, sizes.seed
    return [prefix_batch(pool, n, k, K, T, bos, seed) for k in range(K + 1)] + [
        competition_batch(pool, n, K, T, bos, seed)]


def _long(values: np.ndarray, **columns: Any) -> pd.DataFrame:
    """``[L, H]`` array -> rows (layer, head, value) plus constant columns."""
    n_layers, n_heads = values.shape
    return pd.DataFrame({"layer": np.repeat(np.arange(n_layers), n_heads).astype(np.int32),
                         "head": np.tile(np.arange(n_heads), n_layers).astype(np.int32),
                         "value": values.reshape(-1).astype(np.float32), **columns})


def step_induction(ctx: "RunContext") -> None:
    """Precompute step: head scores, prefix-length curves and competition of every head, and the classification of
    the top induction heads, into ``head_scores`` / ``induction_prefix`` / ``induction_classes`` (module docstring).
    Replaces the model's earlier rows, so it can be re-run."""
    import json

    from backend.inputs.prompts import model_bos_id
    from backend.inputs.tasks import word_token_pool
    from backend.progress import say, track

    model, name, preset = ctx.model, ctx.spec.name, ctx.preset
    bos = model_bos_id(model)
    sizes = probe_sizes(preset, int(model.cfg.n_ctx), bos)
    pool = word_token_pool(model.tokenizer)
    for table in ("head_scores", "induction_prefix", "induction_classes"):
        ctx.con.execute(f"DELETE FROM {table} WHERE model = ?", [name])

    say(f"Induction probes: {sizes.n_sequences} sequences per condition, prefixes up to {sizes.max_prefix}")
    repeat = repeat_tokens(pool, sizes.n_sequences, sizes.repeat_len, bos, seed=sizes.seed)
    batches = probe_batches(pool, sizes, bos)
    jobs: list[Any] = ["repeat", *batches]
    prefix_frames = []
    scores: dict[str, np.ndarray] = {}
    for job in track(jobs, total=len(jobs), desc="Induction probes", unit="batch"):
        if isinstance(job, str):
            scores = repeat_head_scores(model, repeat, sizes.repeat_len, bos, preset.batch_size)
            continue
        for target, got in probe_heads(model, job, preset.batch_size).items():
            df = _long(got["attention"], condition=target, prefix_len=job.prefix_len if target != "competition_short"
                       else 1).rename(columns={"value": "attention"})
            df["direct_effect"] = got["direct_effect"].reshape(-1).astype(np.float32)
            prefix_frames.append(df)
    prefix = pd.concat(prefix_frames, ignore_index=True)
    score_df = _long(scores["induction"]).rename(columns={"value": "induction"})
    for key in ("prev_token", "duplicate_token"):
        score_df[key] = scores[key].reshape(-1).astype(np.float32)
    classes = classify_heads(score_df, prefix, int(preset.induction.candidates))
    params = {"n_sequences": sizes.n_sequences, "repeat_len": sizes.repeat_len, "max_prefix": sizes.max_prefix,
              "seq_len": sizes.seq_len, "seed": sizes.seed, "bos": bos}

    ctx.writer.insert_df("head_scores", score_df.assign(model=name, n_sequences=sizes.n_sequences,
                                                        seq_len=int(repeat.shape[1]), run_id=ctx.run_id))
    ctx.writer.insert_df("induction_prefix", prefix.assign(model=name, n_sequences=sizes.n_sequences,
                                                           seq_len=sizes.seq_len, run_id=ctx.run_id))
    ctx.writer.insert_df("induction_classes", pd.DataFrame({
        "model": name, "layer": classes["layer"].astype(np.int32), "head": classes["head"].astype(np.int32),
        "head_class": classes["head_class"],
        "stats": [json.dumps(_finite({**s, "rule": RULE, "params": params}), allow_nan=False)
                  for s in classes["stats"]],
        "run_id": ctx.run_id}))
    counts = classes["head_class"].value_counts().to_dict()
    ctx.summary["induction"] = {**params, "classes": {c: int(counts.get(c, 0)) for c in CLASSES},
                                "top_heads": [f"{r.layer}.{r.head}:{r.head_class}" for r in classes.itertuples()]}


def _finite(value: Any) -> Any:
    """JSON has no NaN: non-finite floats become null (e.g. the ratio of a head with no plateau)."""
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value
