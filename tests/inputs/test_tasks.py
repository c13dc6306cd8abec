"""Tests for backend.tasks: prompt pairs, metrics (checked by hand on a tiny model) and, marked slow, the real model."""

from __future__ import annotations

import math
import re

import pytest
import torch

from backend.errors import InputError
from backend.inputs.prompts import model_bos_id
from backend.inputs.tasks import IOI_NAMES, IOI_TEMPLATES, TASKS, TaskBatch, build_task, custom_pair
from backend.model.registry import load_model, load_tokenizer

N = 12


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer()


@pytest.fixture(scope="module")
def tiny(tiny_model):
    return tiny_model  # the session-wide tiny-llama from conftest.py


@pytest.fixture(scope="module")
def batches(tokenizer) -> dict[str, TaskBatch]:
    return {name: build_task(name, tokenizer, N, seed=0) for name in TASKS}


def _single(tokenizer, text: str) -> int:
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert len(ids) == 1, (text, ids)
    return ids[0]


# --------------------------------------------------------------------------------------------------------------
# structure


@pytest.mark.parametrize("name", list(TASKS))
def test_clean_and_corrupt_have_the_same_shape(batches: dict[str, TaskBatch], tokenizer, name: str) -> None:
    b = batches[name]
    assert b.name == name and len(b) == N
    assert b.clean.shape == b.corrupt.shape and b.clean.dtype == b.corrupt.dtype == torch.long
    assert b.answer.shape == b.wrong.shape == (N,)
    assert (b.answer != b.wrong).all()
    assert (b.clean[:, 0] == tokenizer.bos_token_id).all() and (b.corrupt[:, 0] == tokenizer.bos_token_id).all()
    assert not torch.equal(b.clean, b.corrupt)
    assert len(b.prompts) == len(b.corrupt_prompts) == N
    assert b.description and b.metric_name in ("logit_diff", "prob_diff", "mean_logprob")


@pytest.mark.parametrize("name", list(TASKS))
def test_deterministic_per_seed(tokenizer, batches: dict[str, TaskBatch], name: str) -> None:
    again = build_task(name, tokenizer, N, seed=0)
    assert torch.equal(again.clean, batches[name].clean) and torch.equal(again.corrupt, batches[name].corrupt)
    other = build_task(name, tokenizer, N, seed=1)
    assert not torch.equal(other.clean, batches[name].clean)


def test_bos_option(tokenizer) -> None:
    without = build_task("ioi", tokenizer, 4, bos=None)
    with_bos = build_task("ioi", tokenizer, 4)
    assert torch.equal(with_bos.clean[:, 1:], without.clean)
    forced = build_task("induction", tokenizer, 4, bos=0)
    assert (forced.clean[:, 0] == 0).all()


def test_ioi_names_are_single_tokens(tokenizer) -> None:
    for name in IOI_NAMES:
        _single(tokenizer, " " + name)
    assert len(IOI_TEMPLATES) >= 5


def test_ioi_prompts(tokenizer, batches: dict[str, TaskBatch]) -> None:
    b = batches["ioi"]
    patterns = [re.compile(re.sub(r"\\{\w+\\}", r"\\w+", re.escape(t)) + "$") for t in IOI_TEMPLATES]
    used = {k for p in b.prompts for k, pat in enumerate(patterns) if pat.match(p)}
    assert len(used) >= 5
    orders = set()
    for i, (prompt, cprompt) in enumerate(zip(b.prompts, b.corrupt_prompts)):
        io, s = tokenizer.decode([int(b.answer[i])]).strip(), tokenizer.decode([int(b.wrong[i])]).strip()
        words = prompt.replace(",", " ").split()
        assert words.count(s) == 2 and words.count(io) == 1  # subject repeated, indirect object once
        orders.add(words.index(io) < words.index(s))
        assert io not in cprompt.split() and s not in cprompt.replace(",", " ").split()  # ABC corruption
        cnames = [w for w in cprompt.replace(",", " ").split() if w in IOI_NAMES]
        assert len(set(cnames)) == 3
        assert b.clean[i, -1] == b.corrupt[i, -1]  # same template: only the names differ
    assert orders == {True, False}  # both ABBA and BABA


def test_greater_than_prompts(tokenizer, batches: dict[str, TaskBatch]) -> None:
    b = batches["greater-than"]
    digits = [_single(tokenizer, str(d)) for d in range(10)]
    assert b.candidates is not None and b.sign is not None
    assert b.candidates.tolist() == digits
    for i, prompt in enumerate(b.prompts):
        year = prompt.split("from the year ")[1].split()[0]
        d = int(year[2])
        assert 2 <= d <= 7 and prompt.endswith(f"to the year {year[:2]}")
        assert b.sign[i].tolist() == [1.0 if k > d else -1.0 if k < d else 0.0 for k in range(10)]
        assert b.corrupt_prompts[i] == prompt.replace(f"year {year}", f"year {year[:2]}01")
        differing = (b.clean[i] != b.corrupt[i]).nonzero().flatten().tolist()
        assert 1 <= len(differing) <= 2  # only the last two digits of the start year change


@pytest.mark.parametrize("name", ["induction", "induction-text"])
def test_induction_prompts(batches: dict[str, TaskBatch], name: str) -> None:
    b = batches[name]
    assert b.targets is not None
    body = b.clean[:, 1:]
    L = body.shape[1] // 2
    assert torch.equal(body[:, :L], body[:, L:])  # clean: the sequence, twice
    assert torch.equal(b.corrupt[:, : 1 + L], b.clean[:, : 1 + L])
    assert (b.corrupt[:, 1 + L :] != b.clean[:, 1 + L :]).any(1).all()
    scored = (b.targets >= 0).nonzero()
    assert set(scored[:, 1].tolist()) == set(range(1 + L, 2 * L))  # second copy, except its last token
    for i, p in scored.tolist():
        assert b.targets[i, p] == b.clean[i, p + 1]
    if name == "induction":  # random tokens: corrupt copy shares no token with the clean one
        for row in range(len(b)):
            assert not set(b.corrupt[row, 1 + L :].tolist()) & set(b.clean[row, 1 : 1 + L].tolist())


def test_unknown_task(tokenizer) -> None:
    with pytest.raises(InputError, match="ioi.*greater-than.*induction"):
        build_task("nope", tokenizer, 3)
    with pytest.raises(InputError):
        build_task("ioi", tokenizer, 0)


def test_select(batches: dict[str, TaskBatch]) -> None:
    b = batches["greater-than"].select([3, 1])
    assert len(b) == 2 and b.prompts == [batches["greater-than"].prompts[i] for i in (3, 1)]
    assert torch.equal(b.sign, batches["greater-than"].sign[[3, 1]])
    assert len(batches["induction"].select(slice(0, 5))) == 5


# --------------------------------------------------------------------------------------------------------------
# metrics against a hand computation on a tiny model


def _hand_metric(b: TaskBatch, logits: torch.Tensor) -> list[float]:
    out = []
    for i in range(len(b)):
        if b.metric_name == "logit_diff":
            out.append(float(logits[i, -1, b.answer[i]] - logits[i, -1, b.wrong[i]]))
        elif b.metric_name == "prob_diff":
            z = logits[i, -1].double()
            p = torch.exp(z - z.max()) / torch.exp(z - z.max()).sum()
            total = 0.0
            for k, tok in enumerate(b.candidates.tolist()):
                total += float(b.sign[i, k]) * float(p[tok])
            out.append(total)
        else:
            values = []
            for pos in range(b.clean.shape[1]):
                t = int(b.targets[i, pos])
                if t >= 0:
                    z = logits[i, pos].double()
                    values.append(float(z[t] - (z.max() + torch.log(torch.exp(z - z.max()).sum()))))
            out.append(sum(values) / len(values))
    return out


@pytest.mark.parametrize("name", list(TASKS))
def test_metric_matches_hand_computation(tiny, batches: dict[str, TaskBatch], name: str) -> None:
    b = batches[name]
    with torch.no_grad():
        for tokens in (b.clean, b.corrupt):
            logits = tiny(tokens)
            per = b.metric_per_example(logits)
            assert per.shape == (N,)
            assert per.tolist() == pytest.approx(_hand_metric(b, logits), abs=1e-4)
            assert float(b.metric(logits)) == pytest.approx(sum(per.tolist()) / N, abs=1e-5)
            if b.metric_name != "mean_logprob":  # last-position metrics also take [n, vocab]
                assert torch.allclose(b.metric_per_example(logits[:, -1]), per)


def test_metric_is_differentiable(tiny, batches: dict[str, TaskBatch]) -> None:
    b = batches["greater-than"]
    logits = tiny(b.clean[:2]).detach().requires_grad_(True)
    b.select([0, 1]).metric(logits).backward()
    assert logits.grad is not None and logits.grad.abs().sum() > 0


def test_metric_checks_batch_size(tiny, batches: dict[str, TaskBatch]) -> None:
    with pytest.raises(ValueError):
        batches["ioi"].metric(torch.zeros(N + 1, 5, 10))


# --------------------------------------------------------------------------------------------------------------
# custom pairs


def test_custom_pair(tiny) -> None:
    clean, corrupt = "When Mary and John went out, John gave it to", "When Alice and Bob went out, Carol gave it to"
    b = custom_pair(tiny, clean, corrupt, " Mary", " John")
    assert b.clean.shape == b.corrupt.shape == (1, b.clean.shape[1])
    assert int(b.clean[0, 0]) == model_bos_id(tiny)
    assert b.answer.tolist() == [_single(tiny.tokenizer, " Mary")]
    assert b.wrong.tolist() == [_single(tiny.tokenizer, " John")]
    with torch.no_grad():
        logits = tiny(b.clean)
    assert float(b.metric(logits)) == pytest.approx(float(logits[0, -1, b.answer[0]] - logits[0, -1, b.wrong[0]]))


def test_custom_pair_errors(tiny) -> None:
    lengths = r"same length.*clean one has (\d+) tokens and the corrupted one (\d+)"
    with pytest.raises(InputError, match=lengths) as info:
        custom_pair(tiny, "The cat sat on the mat and", "A dog sat", " the", " a")
    assert "\n" not in str(info.value)
    with pytest.raises(InputError, match="single token"):
        custom_pair(tiny, "Hello there", "Hello where", " Zyxwvutsrq", " a")
    with pytest.raises(InputError, match="leading space"):
        custom_pair(tiny, "Hello there", "Hello where", "Jennifer", " a")
    with pytest.raises(InputError, match="empty"):
        custom_pair(tiny, "  ", "Hello where", " a", " b")
    with pytest.raises(InputError, match="same token"):
        custom_pair(tiny, "Hello there", "Hello where", " a", " a")
    with pytest.raises(InputError, match="UTF-8"):
        custom_pair(tiny, b"caf\xe9", "Hello where", " a", " b")


# --------------------------------------------------------------------------------------------------------------
# the real model (SmolLM2-135M): the tasks measure what they claim


@pytest.fixture(scope="module")
def smollm():
    return load_model("smollm2-135m")


def _clean_corrupt(model, b: TaskBatch) -> tuple[float, float]:
    with torch.no_grad():
        return float(b.metric(model(b.clean))), float(b.metric(model(b.corrupt)))


@pytest.mark.slow
def test_real_model_ioi(smollm) -> None:
    clean, corrupt = _clean_corrupt(smollm, build_task("ioi", smollm, 8, seed=0))
    assert clean > 2.0, clean
    assert abs(corrupt) < 1.0 and clean > corrupt + 2.0, (clean, corrupt)


@pytest.mark.slow
def test_real_model_greater_than(smollm) -> None:
    clean, corrupt = _clean_corrupt(smollm, build_task("greater-than", smollm, 8, seed=0))
    assert clean > 0.2, clean
    assert corrupt < clean - 0.5, (clean, corrupt)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["induction", "induction-text"])
def test_real_model_induction(smollm, name: str) -> None:
    clean, corrupt = _clean_corrupt(smollm, build_task(name, smollm, 4, seed=0))
    assert clean > corrupt + 4.0, (clean, corrupt)  # nats: the copy is far more likely after a repeat
    assert math.isfinite(clean) and clean < 0
