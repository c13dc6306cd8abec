"""Induction heads (backend/induction.py, backend/induction_queries.py): hand-built attention patterns with known
scores, the exact matching prefix of every probe sequence, the model-driven measurements against independent
TransformerLens computations (full caches, ``stack_head_results`` / ``apply_ln_to_stack``), the precompute step's
tables in the tiny store and, marked slow, the real model.
"""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import torch

from backend.errors import InputError
from backend.heads import induction as ind
from backend.heads import induction_queries
from backend.inputs.prompts import model_bos_id
from backend.inputs.tasks import word_token_pool
from backend.store.access import StoreWriter, reading

POOL = list(range(1000, 1400))  # distinct stand-in token ids for the builder tests (no tokenizer needed)
BOS = 7


pytestmark = pytest.mark.usefixtures("one_thread")


# ------------------------------------------------------------------------------------------------------------------
# Scores of hand-built heads


def _hand_built_patterns(repeat_len: int, o: int) -> torch.Tensor:
    """[1, 4, T, T]: head 0 induction, 1 uniform (causal), 2 previous token, 3 duplicate token.

    Rows without a target of the head's kind attend to themselves, so each row sums to 1.
    """
    T = o + 2 * repeat_len
    pat = torch.zeros(1, 4, T, T)
    for i in range(T):
        pat[0, 1, i, : i + 1] = 1.0 / (i + 1)
        pat[0, 2, i, max(i - 1, 0)] = 1.0
        second = i >= o + repeat_len
        pat[0, 0, i, i - repeat_len + 1 if second else i] = 1.0
        pat[0, 3, i, i - repeat_len if second else i] = 1.0
    assert torch.allclose(pat.sum(-1), torch.ones(1, 4, T))
    return pat


@pytest.mark.parametrize("bos", [BOS, None])
def test_hand_built_heads_get_their_scores(bos: int | None) -> None:
    L = 40
    o = 0 if bos is None else 1
    pat = _hand_built_patterns(L, o)
    scores = ind.head_scores_from_patterns([pat], ind.repeat_pairs(L, bos))
    induction, prev, dup = (scores[k][0] for k in ("induction", "prev_token", "duplicate_token"))
    assert induction[0] == pytest.approx(1.0) and prev[2] == pytest.approx(1.0) and dup[3] == pytest.approx(1.0)
    # the induction head does nothing else, nor do the others do induction
    assert induction[[2, 3]].tolist() == [0.0, 0.0] and prev[[0, 3]].tolist() == [0.0, 0.0]
    assert dup[[0, 2]].tolist() == [0.0, 0.0]
    # uniform head: attention 1/(i+1) to every source, averaged over the second copy -> about 0
    expected = np.mean([1.0 / (i + 1) for i in range(o + L, o + 2 * L)])
    assert induction[1] == pytest.approx(expected) and expected < 0.02
    assert dup[1] == pytest.approx(expected)
    assert prev[1] == pytest.approx(np.mean([1.0 / (i + 1) for i in range(o + 1, o + 2 * L)]))


def test_token_pairs_reproduce_the_repeat_layout() -> None:
    L = 6
    tokens = ind.repeat_tokens(POOL, 1, L, BOS, seed=3)[0].tolist()
    from_tokens = ind.token_pairs(tokens, start=1)
    for name, (dest, src) in ind.repeat_pairs(L, BOS).items():
        assert from_tokens[name][0].tolist() == dest.tolist() and from_tokens[name][1].tolist() == src.tolist(), name


def test_pair_score_averages_over_pairs_and_batch() -> None:
    pat = torch.rand(3, 2, 5, 5)
    dest, src = torch.tensor([2, 4]), torch.tensor([1, 3])
    expected = torch.stack([(pat[:, h, 2, 1] + pat[:, h, 4, 3]).mean() / 2 for h in range(2)])
    assert torch.allclose(ind.pair_score(pat, dest, src), expected)


# ------------------------------------------------------------------------------------------------------------------
# Sequence builders: exactly the promised matching prefix, no accidental repeats


def _repeats(row: list[int], start: int) -> list[int]:
    """Positions (>= start) whose token occurred earlier (at or after start)."""
    seen: set[int] = set()
    out = []
    for i in range(start, len(row)):
        if row[i] in seen:
            out.append(i)
        seen.add(row[i])
    return out


@pytest.mark.parametrize("bos", [BOS, None])
def test_prefix_sequences_match_exactly_k_tokens(bos: int | None) -> None:
    K, T, n = 5, 30, 12
    o = 0 if bos is None else 1
    q, d = ind.prefix_layout(T, K, bos)
    for k in range(K + 1):
        b = ind.prefix_batch(POOL, n, k, K, T, bos, seed=1)
        assert b.tokens.shape == (n, T) and b.prefix_len == k and b.dest.tolist() == [d] * n
        pos, tok = b.targets["prefix"]
        assert pos.tolist() == [q + 1] * n
        for row, target in zip(b.tokens.tolist(), tok.tolist()):
            if bos is not None:
                assert row[0] == bos
            assert set(row[o:]) <= set(POOL)
            assert target == row[q + 1]
            # the only repeated positions are the k copied ones, ending at the destination
            assert _repeats(row, o) == list(range(d - k + 1, d + 1))
            if k == 0:
                assert row.count(row[d]) == 1
            else:
                assert row[d] == row[q] and row[d - k] != row[q - k]
                assert ind.matching_prefix_len(row, d, q, start=o) == k
    # different k draw different fillers; the same seed gives the same rows
    assert torch.equal(ind.prefix_batch(POOL, n, 2, K, T, bos, seed=1).tokens,
                       ind.prefix_batch(POOL, n, 2, K, T, bos, seed=1).tokens)


def test_competition_sequences_have_one_long_and_one_short_occurrence() -> None:
    K, T, n = 4, 30, 6
    q1, q2, d = ind.competition_layout(T, K, BOS)
    b = ind.competition_batch(POOL, n, K, T, BOS, seed=0)
    (lpos, ltok), (spos, stok) = b.targets["competition_long"], b.targets["competition_short"]
    for i, row in enumerate(b.tokens.tolist()):
        ql, qs = int(lpos[i]) - 1, int(spos[i]) - 1
        assert (ql, qs) == ((q1, q2) if i % 2 == 0 else (q2, q1))  # order alternates
        assert row[ql] == row[qs] == row[d]
        assert ind.matching_prefix_len(row, d, ql, start=1) == K
        assert ind.matching_prefix_len(row, d, qs, start=1) == 1
        assert ltok[i] == row[ql + 1] and stok[i] == row[qs + 1] and ltok[i] != stok[i]
        # repeats: the short occurrence's A, the destination block (K-1 predecessors and A)
        assert _repeats(row, 1) == sorted([max(ql, qs), *range(d - K + 1, d + 1)])


def test_repeat_tokens_structure() -> None:
    t = ind.repeat_tokens(POOL, 4, 10, BOS, seed=0)
    assert t.shape == (4, 21) and (t[:, 0] == BOS).all()
    assert torch.equal(t[:, 1:11], t[:, 11:])
    assert all(len(set(r[1:11])) == 10 for r in t.tolist())


def test_builders_refuse_impossible_sizes() -> None:
    with pytest.raises(InputError, match="too short"):
        ind.prefix_layout(12, 6, BOS)
    with pytest.raises(InputError, match="too short"):
        ind.competition_layout(20, 6, BOS)
    with pytest.raises(InputError, match="between 0 and"):
        ind.prefix_batch(POOL, 2, 7, 6, 40, BOS)
    with pytest.raises(InputError, match="too few"):
        ind.repeat_tokens(POOL[:5], 1, 6, BOS)


def test_matching_prefix_len_stops_at_the_start() -> None:
    row = [9, 1, 2, 3, 1, 2, 3]
    assert ind.matching_prefix_len(row, 6, 3, start=1) == 3
    assert ind.matching_prefix_len(row, 6, 3, start=2) == 2
    assert ind.matching_prefix_len([5, 1, 4, 2, 1], 4, 1) == 1


# ------------------------------------------------------------------------------------------------------------------
# Classification rule on hand-built curves


def _curve_rows(layer: int, head: int, attn: list[float]) -> list[dict[str, Any]]:
    return [{"layer": layer, "head": head, "condition": "prefix", "prefix_len": k, "attention": a,
             "direct_effect": a / 2} for k, a in enumerate(attn)]


def test_classification_rule() -> None:
    scores = pd.DataFrame({"layer": [0, 0, 0, 1], "head": [0, 1, 2, 0], "induction": [0.9, 0.5, 0.1, 0.6]})
    prefix = pd.DataFrame(
        _curve_rows(0, 0, [0.0, 0.6, 0.7, 0.8, 0.8]) +     # one token gives 0.6 of 0.8: short-prefix
        _curve_rows(0, 1, [0.02, 0.1, 0.3, 0.6, 0.62]) +   # needs a longer prefix: long-prefix
        _curve_rows(0, 2, [0.0, 0.5, 0.5, 0.5, 0.5]) +     # induction score below the threshold: weak
        _curve_rows(1, 0, [0.1, 0.12, 0.13, 0.15, 0.16])   # plateau (0.055 above control) too low: weak
        + [{"layer": 0, "head": 0, "condition": "competition_long", "prefix_len": 4, "attention": 0.6,
            "direct_effect": 0.1},
           {"layer": 0, "head": 0, "condition": "competition_short", "prefix_len": 1, "attention": 0.2,
            "direct_effect": 0.0}])
    out = ind.classify_heads(scores, prefix, top_n=3).set_index(["layer", "head"])
    assert list(out.index) == [(0, 0), (1, 0), (0, 1)]  # top 3 by induction score
    assert out.loc[(0, 0), "head_class"] == "short-prefix"
    assert out.loc[(0, 1), "head_class"] == "long-prefix"
    assert out.loc[(1, 0), "head_class"] == "weak"
    s = out.loc[(0, 0), "stats"]
    assert s["plateau"] == pytest.approx(0.8) and s["ratio"] == pytest.approx(0.75) and s["k_half"] == 1
    assert s["long_share"] == pytest.approx(0.75)
    assert out.loc[(0, 1), "stats"]["k_half"] == 3  # 0.58 >= 0.5 * 0.59 first at k = 3
    assert ind.classify_heads(scores, prefix, top_n=4).set_index(["layer", "head"]).loc[(0, 2), "head_class"] == "weak"


# ------------------------------------------------------------------------------------------------------------------
# Model-driven measurements vs independent TransformerLens computations


def _tl_direct_effects(model: Any, cache: Any, dest: int, tok: torch.Tensor) -> torch.Tensor:
    """Independent: TransformerLens' per-head results and its final-norm scaling (weights are not folded here, so
    the RMSNorm / LayerNorm weight is applied by hand), then the logit direction minus the vocab mean: [n, L, H]."""
    stack = cache.stack_head_results(layer=-1, pos_slice=dest)  # [L*H, n, d_model], layer-major
    normed = cache.apply_ln_to_stack(stack, layer=-1, pos_slice=dest) * model.ln_final.w
    dirs = model.W_U[:, tok] - model.W_U.mean(1, keepdim=True)
    return torch.einsum("cne,en->nc", normed, dirs).reshape(len(tok), model.cfg.n_layers, model.cfg.n_heads).detach()


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-gpt2"])
def test_probe_heads_agree_with_a_full_cache(name: str, tiny_model: Any) -> None:
    from backend.model.registry import load_model

    model = tiny_model if name == "tiny-llama" else load_model(name)  # tiny-llama has GQA (4 query / 2 kv heads)
    bos = model_bos_id(model)
    batch = ind.competition_batch(word_token_pool(model.tokenizer), 5, 4, 30, bos, seed=2)
    got = ind.probe_heads(model, batch, batch_size=2)  # two forward batches (2 + 2 + 1 rows)
    with torch.no_grad():
        _, cache = model.run_with_cache(batch.tokens)
    d, rows = int(batch.dest[0]), torch.arange(len(batch))
    for target, (pos, tok) in batch.targets.items():
        attn = torch.stack([cache["pattern", layer][rows, :, d, pos] for layer in range(model.cfg.n_layers)], 1)
        assert np.allclose(got[target]["attention"], attn.mean(0).numpy(), atol=1e-6)
        de = _tl_direct_effects(model, cache, d, tok).mean(0)
        assert np.allclose(got[target]["direct_effect"], de.numpy(), atol=1e-5)
        assert np.abs(got[target]["direct_effect"]).max() > 1e-3  # not trivially zero


def test_direct_effects_are_a_complete_decomposition(tiny_model: Any) -> None:
    """Summed with every other component's direct effect (embeddings, MLPs, biases) and b_U, the heads' direct
    effects give exactly the model's logit of the target minus the mean logit: the frozen-scale formula is right."""
    model = tiny_model
    batch = ind.prefix_batch(word_token_pool(model.tokenizer), 4, 2, 4, 24, model_bos_id(model))
    pos, tok = batch.targets["prefix"]
    d = int(batch.dest[0])
    with torch.no_grad():
        logits, cache = model.run_with_cache(batch.tokens)
    heads = ind.head_direct_effects(model, cache, torch.arange(4), batch.dest, tok).sum(dim=(1, 2))
    full, labels = cache.get_full_resid_decomposition(layer=-1, pos_slice=d, expand_neurons=False, return_labels=True)
    others = [i for i, label in enumerate(labels) if not (label.startswith("L") and "H" in label)]
    normed = cache.apply_ln_to_stack(full[others], layer=-1, pos_slice=d) * model.ln_final.w
    rest = torch.einsum("cne,en->n", normed, model.W_U[:, tok] - model.W_U.mean(1, keepdim=True)).detach()
    expected = logits[torch.arange(4), d, tok] - logits[:, d].mean(-1)
    assert torch.allclose(heads + rest + model.b_U[tok] - model.b_U.mean(), expected, atol=1e-4)


def test_prefix_curves_come_from_the_model(tiny_model: Any) -> None:
    pool = word_token_pool(tiny_model.tokenizer)
    batch = ind.prefix_batch(pool, 4, 3, 4, 24, model_bos_id(tiny_model))
    before = ind.probe_heads(tiny_model, batch)["prefix"]
    changed = copy.deepcopy(tiny_model)
    with torch.no_grad():
        changed.blocks[1].attn.W_Q.mul_(3.0)  # sharper layer-1 attention
        changed.blocks[1].attn.W_O.mul_(0.5)
    after = ind.probe_heads(changed, batch)["prefix"]
    assert np.allclose(before["attention"][0], after["attention"][0], atol=1e-6)  # layer 0 untouched
    assert not np.allclose(before["attention"][1], after["attention"][1], atol=1e-3)
    assert not np.allclose(before["direct_effect"][1], after["direct_effect"][1], atol=1e-4)


def test_prompt_head_view_on_a_repeated_phrase(tiny_model: Any) -> None:
    from backend.inputs.prompts import encode_prompt

    enc = encode_prompt(tiny_model, "red fox jumps. blue fox jumps.")
    view = ind.prompt_head_view(tiny_model, enc.ids, 1, 2)
    t = view.table
    ids = enc.ids
    assert len(t) == len(ids) and view.pattern.shape == (len(ids), len(ids))
    with torch.no_grad():
        _, cache = tiny_model.run_with_cache(torch.tensor([ids]))
    pattern = cache["pattern", 1][0, 2]
    for row in t.itertuples():
        earlier = [j for j in range(1, row.pos) if ids[j] == ids[row.pos]]
        assert row.prev_pos == (earlier[-1] if earlier else -1)
        if earlier:
            assert row.target_pos == earlier[-1] + 1
            assert row.attention == pytest.approx(float(pattern[row.pos, row.target_pos]), abs=1e-6)
            assert row.match_len == ind.matching_prefix_len(ids, row.pos, row.prev_pos, start=1)
        else:
            assert np.isnan(row.attention) and np.isnan(row.direct_effect)
    fox = t[t["token"] == " fox"]
    assert fox["match_len"].tolist() == [0, 1] and t[t["token"] == " jumps"]["match_len"].iloc[-1] == 2


# ------------------------------------------------------------------------------------------------------------------
# The precompute step


MODEL = "tiny-llama"


def _stored(path: Path) -> dict[str, Any]:
    with reading(path) as con:
        return {"scores": induction_queries.head_scores(con, MODEL), "rule": induction_queries.induction_rule(con, MODEL),
                "classes": induction_queries.induction_classes(con, MODEL), "counts": induction_queries.induction_counts(con, MODEL),
                "prefix": con.execute("SELECT * FROM induction_prefix WHERE model = ? ORDER BY layer, head, "
                                      "condition, prefix_len", [MODEL]).df()}


def test_step_writes_the_tables(tiny_store: Path, tiny_model: Any) -> None:
    from backend.pipeline.config import PRESETS

    s = _stored(tiny_store)
    cfg, preset = tiny_model.cfg, PRESETS["demo"]
    n_heads = cfg.n_layers * cfg.n_heads
    params = s["rule"]["params"]
    K = params["max_prefix"]
    assert s["counts"] == {"head_scores": n_heads, "induction_prefix": n_heads * (K + 3),
                           "induction_classes": min(n_heads, preset.induction.candidates)}
    assert set(s["classes"]["head_class"]) <= set(ind.CLASSES)
    assert set(s["prefix"]["condition"]) == set(ind.CONDITIONS)
    assert "short-prefix" in s["rule"]["rule"] and s["rule"]["thresholds"]["short_ratio"] == ind.SHORT_RATIO
    # stored head scores = brute force over the same repeat sequences from a full cache
    bos = model_bos_id(tiny_model)
    tokens = ind.repeat_tokens(word_token_pool(tiny_model.tokenizer), params["n_sequences"], params["repeat_len"],
                               bos, seed=params["seed"])
    L = params["repeat_len"]
    with torch.no_grad():
        _, cache = tiny_model.run_with_cache(tokens)
    scores = s["scores"].set_index(["layer", "head"])
    for layer in range(cfg.n_layers):
        pat = cache["pattern", layer]
        for head in range(cfg.n_heads):
            ind_vals, prev_vals = [], []
            for i in range(1 + L, 1 + 2 * L):
                ind_vals.append(pat[:, head, i, i - L + 1])
            for i in range(2, 1 + 2 * L):
                prev_vals.append(pat[:, head, i, i - 1])
            assert scores.loc[(layer, head), "induction"] == pytest.approx(float(torch.stack(ind_vals).mean()), abs=1e-5)
            assert scores.loc[(layer, head), "prev_token"] == pytest.approx(float(torch.stack(prev_vals).mean()),
                                                                            abs=1e-5)
    # stored prefix curves = an independent full-cache computation on the rebuilt k = 2 batch
    batch = ind.prefix_batch(word_token_pool(tiny_model.tokenizer), params["n_sequences"], 2, K, params["seq_len"],
                             bos, params["seed"])
    pos, _ = batch.targets["prefix"]
    with torch.no_grad():
        _, cache = tiny_model.run_with_cache(batch.tokens)
    d = int(batch.dest[0])
    stored = s["prefix"][(s["prefix"]["condition"] == "prefix") & (s["prefix"]["prefix_len"] == 2)]
    stored = stored.set_index(["layer", "head"])
    for layer in range(cfg.n_layers):
        attn = cache["pattern", layer][torch.arange(len(batch)), :, d, pos].mean(0)
        for head in range(cfg.n_heads):
            assert stored.loc[(layer, head), "attention"] == pytest.approx(float(attn[head]), abs=1e-5)
    assert (stored["seq_len"] == params["seq_len"]).all()


def test_step_is_rerunnable(tiny_store: Path, tiny_model: Any, tmp_path: Path) -> None:
    from backend.model.registry import get_spec
    from backend.pipeline.config import PRESETS
    from backend.pipeline.context import RunContext

    path = tmp_path / "rerun.duckdb"
    shutil.copy(tiny_store, path)
    before = _stored(path)["counts"]
    with StoreWriter(path, kind="test", model=MODEL) as w:
        ctx = RunContext(model=tiny_model, spec=get_spec(MODEL), writer=w, preset=PRESETS["demo"], layers=[],
                         corpus_source="builtin")
        ind.step_induction(ctx)  # the copy already holds the tiny store's rows: they must be replaced, not doubled
        run_id = w.run_id
        assert ctx.summary["induction"]["max_prefix"] == _stored(tiny_store)["rule"]["params"]["max_prefix"]
    after = _stored(path)
    assert after["counts"] == before
    with reading(path) as con:
        assert con.execute("SELECT DISTINCT run_id FROM induction_prefix").fetchall() == [(run_id,)]
        stats = json.loads(con.execute("SELECT stats FROM induction_classes LIMIT 1").fetchall()[0][0])
    assert stats["params"]["seq_len"] == after["rule"]["params"]["seq_len"]


def test_probe_sizes_fit_the_context() -> None:
    from backend.pipeline.config import PRESETS

    sizes = ind.probe_sizes(PRESETS["demo"], 24, BOS)
    assert sizes.repeat_len == 11 and sizes.seq_len == 24 and 3 * sizes.max_prefix + 8 <= 24
    ind.competition_layout(sizes.seq_len, sizes.max_prefix, BOS)  # does not raise
    with pytest.raises(InputError, match="too short"):
        ind.probe_sizes(PRESETS["demo"], 8, BOS)


# ------------------------------------------------------------------------------------------------------------------
# The real model


@pytest.mark.slow
def test_smollm2_top_induction_heads_stand_out(tmp_path: Path) -> None:
    from dataclasses import replace

    from backend.heads.config import InductionConfig
    from backend.model.registry import get_spec, load_model
    from backend.pipeline.config import PRESETS
    from backend.pipeline.context import RunContext

    name = "smollm2-135m"
    model = load_model(name)
    preset = replace(PRESETS["demo"], induction=InductionConfig(sequences=8, repeat_len=16, max_prefix=4, seq_len=24,
                                                                candidates=6))
    path = tmp_path / "smol.duckdb"
    with StoreWriter(path, kind="test", model=name) as w:
        ctx = RunContext(model=model, spec=get_spec(name), writer=w, preset=preset, layers=[],
                         corpus_source="builtin")
        ind.step_induction(ctx)
    with reading(path) as con:
        scores = induction_queries.head_scores(con, name)
        classes = induction_queries.induction_classes(con, name)
        curves = induction_queries.induction_prefix_curves(con, name, tuple(f"{r.layer}.{r.head}" for r in classes.itertuples()))
    median = float(scores["induction"].median())
    top3 = classes["induction"].head(3)
    assert len(scores) == 30 * 9 and median < 0.1
    assert (top3 > median + 0.3).all(), (top3.tolist(), median)
    assert (classes["head_class"] != "weak").sum() >= 3
    # the best head attends to the induction target far more with a matching prefix than in the control
    best = curves[(curves["head"] == f"{classes['layer'].iloc[0]}.{classes['head'].iloc[0]}")
                  & (curves["condition"] == "prefix")].set_index("prefix_len")["attention"]
    assert best.loc[4] > best.loc[0] + 0.3
