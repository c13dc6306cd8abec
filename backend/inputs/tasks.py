"""Built-in tasks: clean/corrupted prompt pairs with a metric, the input of activation and attribution patching.

Every task gives token tensors ``clean`` and ``corrupt`` of identical shape ``[n, seq]`` (BOS first when the model
uses one) and a metric computed from a model's logits. The metric always scores the *clean* targets, whichever
input produced the logits: patching measures how much of the clean behaviour an intervention restores.

Metrics (``TaskBatch.metric_name``):

* ``logit_diff`` (IOI, factual recall, subject–verb agreement, custom pairs):
  ``logits[i, -1, answer[i]] - logits[i, -1, wrong[i]]``.
* ``prob_diff`` (greater-than): with ``p = softmax(logits[i, -1])`` over the whole vocabulary,
  ``sum(p[digit k] for k > d) - sum(p[digit k] for k < d)`` where ``d`` is the clean start year's decade digit;
  the digit ``d`` itself counts on neither side (the answer is ambiguous there).
* ``mean_logprob`` (induction): the mean, over the positions of the repeated half that can be predicted by
  copying (each token of the second copy except its last), of ``log_softmax(logits[i, pos])[target]`` where the
  target is the clean next token. Log-probabilities rather than logits, so the value does not depend on a
  per-position logit offset and reads directly as nats (0 is a perfect prediction).

The metric returns the mean over the batch; ``metric_per_example`` returns one value per prompt pair.
"""

from __future__ import annotations

import functools
import random
import re
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, Callable, Sequence

from backend.errors import InputError, literal
from backend.inputs.prompts import bos_id as tokenizer_bos_id
from backend.inputs.prompts import decode_text, model_bos_id

if TYPE_CHECKING:
    import torch

METRICS = ("logit_diff", "prob_diff", "mean_logprob")


@dataclass
class TaskBatch:
    """A batch of clean/corrupted prompt pairs and the metric that scores a model's logits on them.

    ``answer``/``wrong`` are the token pair of the logit difference (``logit_diff``); for the other metrics they
    are a representative pair (for display and quick checks) and the full target is in ``candidates``/``sign``
    (``prob_diff``) or ``targets`` (``mean_logprob``).
    """

    name: str
    clean: "torch.Tensor"  # LongTensor [n, seq]
    corrupt: "torch.Tensor"  # LongTensor [n, seq]
    answer: "torch.Tensor"  # LongTensor [n]
    wrong: "torch.Tensor"  # LongTensor [n]
    metric_name: str
    description: str
    prompts: list[str]
    corrupt_prompts: list[str] = field(default_factory=list)
    candidates: "torch.Tensor | None" = None  # prob_diff: LongTensor [k], token ids the sign refers to
    sign: "torch.Tensor | None" = None  # prob_diff: FloatTensor [n, k] of +1 (answer), -1 (wrong), 0 (neither)
    targets: "torch.Tensor | None" = None  # mean_logprob: LongTensor [n, seq], next token to score, -1 = not scored

    def __len__(self) -> int:
        return int(self.clean.shape[0])

    @property
    def seq_len(self) -> int:
        return int(self.clean.shape[1])

    def metric_per_example(self, logits: "torch.Tensor") -> "torch.Tensor":
        """Metric for each prompt pair, shape ``[n]``, from ``logits`` ``[n, seq, vocab]``.

        ``logit_diff`` and ``prob_diff`` only read the last position, so ``[n, vocab]`` logits are accepted too.
        Differentiable (attribution patching takes its gradient).
        """
        import torch

        if logits.shape[0] != len(self):
            raise ValueError(f"logits have batch size {logits.shape[0]}, the task has {len(self)} prompts")
        if self.metric_name == "logit_diff":
            last = logits[:, -1] if logits.dim() == 3 else logits
            return last.gather(1, self.answer[:, None]).squeeze(1) - last.gather(1, self.wrong[:, None]).squeeze(1)
        if self.metric_name == "prob_diff":
            assert self.candidates is not None and self.sign is not None
            last = logits[:, -1] if logits.dim() == 3 else logits
            probs = torch.softmax(last.float(), dim=-1)[:, self.candidates]
            return (probs * self.sign).sum(-1)
        if self.metric_name == "mean_logprob":
            assert self.targets is not None
            if logits.dim() != 3:
                raise ValueError("mean_logprob needs logits for every position, shape [n, seq, vocab]")
            cols = (self.targets >= 0).any(0).nonzero().squeeze(1)  # only scored positions: saves memory
            logp = torch.log_softmax(logits[:, cols].float(), dim=-1)
            tgt = self.targets[:, cols]
            mask = (tgt >= 0).float()
            picked = logp.gather(-1, tgt.clamp(min=0)[..., None]).squeeze(-1)
            return (picked * mask).sum(1) / mask.sum(1)
        raise ValueError(f"unknown metric {self.metric_name!r}")

    def metric(self, logits: "torch.Tensor") -> "torch.Tensor":
        """Scalar metric: the mean of :meth:`metric_per_example` over the batch."""
        return self.metric_per_example(logits).mean()

    def select(self, index: "Sequence[int] | torch.Tensor | slice") -> "TaskBatch":
        """A sub-batch (e.g. a few examples to patch), with every per-example field sliced consistently."""
        import torch

        idx = torch.arange(len(self))[index] if isinstance(index, slice) else torch.as_tensor(index, dtype=torch.long)
        rows = idx.tolist()
        return replace(
            self,
            clean=self.clean[idx], corrupt=self.corrupt[idx], answer=self.answer[idx], wrong=self.wrong[idx],
            prompts=[self.prompts[i] for i in rows],
            corrupt_prompts=[self.corrupt_prompts[i] for i in rows] if self.corrupt_prompts else [],
            sign=None if self.sign is None else self.sign[idx],
            targets=None if self.targets is None else self.targets[idx],
        )


# --------------------------------------------------------------------------------------------------------------
# helpers


def _encode(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def _single_token(tokenizer: Any, text: str) -> int | None:
    ids = _encode(tokenizer, text)
    return ids[0] if len(ids) == 1 else None


def _prefix(bos: int | None) -> list[int]:
    return [] if bos is None else [int(bos)]


def _check_n(n: int) -> None:
    if not isinstance(n, int) or n < 1:
        raise InputError(f"The number of prompts must be a positive whole number, not {n!r}.")


def _decode(tokenizer: Any, ids: Sequence[int]) -> str:
    return tokenizer.decode(list(ids))


# --------------------------------------------------------------------------------------------------------------
# IOI

IOI_NAMES = (
    "Mary John Alice Bob Carol David Sarah Michael James Emma Tom Anna Paul Laura Mark Kate Peter Lisa George Rachel "
    "Daniel Jessica Andrew Emily Robert Linda Steven Helen Kevin Amy Brian Susan Jack Jane Eric Rose Adam Grace Ben "
    "Sam Max Lucy Chris Kelly Frank Nancy Henry Alex Ryan Martin Joe Anne Victoria Patrick Richard Thomas Charles "
    "Joseph Edward William Elizabeth Margaret Jennifer Karen Nicole Olivia Sophia Matthew Jason Justin Tim Jim Greg "
    "Dan Jeff Scott Eva Julia Rebecca Sara Maria Clara Leo Oscar Hugo Ivan Carl Ruth Dave"
).split()
# {A} and {B} are the two names introduced first; {S} is the subject, who repeats; the answer is the other one.
# All templates have the same token count (with single-token names, places and objects), so a batch mixing
# them needs no padding; build_ioi keeps the largest group of equal length for other tokenizers.
IOI_TEMPLATES = (
    "When {A} and {B} went to the {PLACE}, {S} gave a {OBJECT} to",
    "After {A} and {B} arrived at the {PLACE}, {S} handed a {OBJECT} to",
    "While {A} and {B} were at the {PLACE}, {S} passed a {OBJECT} to",
    "Once {A} and {B} got to the {PLACE}, {S} threw a {OBJECT} to",
    "As {A} and {B} were leaving the {PLACE}, {S} tossed a {OBJECT} to",
    "The day {A} and {B} visited the {PLACE}, {S} gave a {OBJECT} to",
    "After {A} and {B} met at the {PLACE}, {S} sent a {OBJECT} to",
)
IOI_PLACES = (
    "store park office school garden station restaurant hospital beach library museum market church hotel"
).split()
# consonant-initial, so "a {OBJECT}" is always grammatical
IOI_OBJECTS = (
    "drink ball book gift letter snack ring flower pen bag cake key card hat toy cup basket bottle coin map"
).split()


@functools.lru_cache(maxsize=8)
def _single_tokens(tokenizer: Any, words: tuple[str, ...]) -> tuple[str, ...]:
    """The words that are one token with a leading space (as they appear mid-sentence)."""
    return tuple(w for w in words if _single_token(tokenizer, " " + w) is not None)


def build_ioi(tokenizer: Any, n: int, seed: int = 0, bos: int | None = None) -> TaskBatch:
    """Indirect object identification (Wang et al. 2022), clean vs. "ABC" corruption.

    Clean: "When Mary and John went to the store, John gave a drink to" -> " Mary" (half the prompts put the
    answer first, "ABBA", half second, "BABA"). Corrupt: the same template, place and object with three other
    distinct names ("When Alice and Bob went to the store, Carol gave a drink to"), so no name is repeated and
    the answer is undetermined. Metric: logit difference IO - S at the last position.
    """
    _check_n(n)
    names = _single_tokens(tokenizer, tuple(IOI_NAMES))
    places = _single_tokens(tokenizer, tuple(IOI_PLACES))
    objects = _single_tokens(tokenizer, tuple(IOI_OBJECTS))
    if len(names) < 5 or not places or not objects:
        raise InputError(
            "The IOI task needs at least five names that are single tokens; "
            "this tokenizer splits most names, so use another task."
        )

    def draw(rng: random.Random, i: int) -> tuple[dict[str, str], dict[str, str], str, str]:
        io, s, c1, c2, c3 = rng.sample(names, 5)
        place, obj = rng.choice(places), rng.choice(objects)
        a, b = (io, s) if i % 2 == 0 else (s, io)  # ABBA on even, BABA on odd examples
        return ({"A": a, "B": b, "S": s, "PLACE": place, "OBJECT": obj},
                {"A": c1, "B": c2, "S": c3, "PLACE": place, "OBJECT": obj}, " " + io, " " + s)

    probe = {"A": names[0], "B": names[1], "S": names[1], "PLACE": places[0], "OBJECT": objects[0]}
    return _logit_diff_batch("ioi", _equal_length_pairs(tokenizer, n, seed, bos, IOI_TEMPLATES, draw, "IOI",
                                                        probe=probe), (
        "Indirect object identification: 'When Mary and John went to the store, John gave a drink to' -> ' Mary'. "
        "Corrupted prompts use three different names (ABC). Metric: logit(indirect object) - logit(subject) "
        "at the last position."))


# --------------------------------------------------------------------------------------------------------------
# greater-than (years), adapted to a digit-per-token tokenizer

GT_NOUNS = (
    "war expedition drought famine reign siege voyage rebellion dynasty construction pilgrimage occupation plague "
    "exile journey alliance strike trial conflict crisis campaign"
).split()
GT_TEMPLATE = "The {NOUN} lasted from the year {START} to the year {CENTURY}"


def _digit_ids(tokenizer: Any) -> list[int]:
    ids = [_single_token(tokenizer, str(d)) for d in range(10)]
    ok = all(i is not None for i in ids) and len(_encode(tokenizer, " 1732")) == len(_encode(tokenizer, " 1")) + 3
    if not ok:
        raise InputError(
            "The greater-than task needs a tokenizer that writes every digit as its own token, "
            "and this model's tokenizer does not: use the IOI or induction task."
        )
    return [int(i) for i in ids]  # type: ignore[arg-type]


def build_greater_than(tokenizer: Any, n: int, seed: int = 0, bos: int | None = None) -> TaskBatch:
    """Years-span "greater-than" (Hanna et al. 2023) for tokenizers with one token per digit.

    Clean: "The war lasted from the year 1732 to the year 17": the next token is the end year's decade digit,
    which should be >= 3. The start decade digit d is drawn from 2..7 (so there are digits on both sides).
    Corrupt: the start year's last two digits become "01" (1701), as in the paper, so the threshold is gone.
    Metric ``prob_diff``: P(digit > d) - P(digit < d) at the last position, probabilities over the full vocabulary.
    """
    import torch

    _check_n(n)
    digits = _digit_ids(tokenizer)
    nouns = _single_tokens(tokenizer, tuple(GT_NOUNS)) or ("war",)
    rng = random.Random(seed)
    prefix = _prefix(bos)
    clean, corrupt, signs, answers, wrongs, prompts, cprompts = [], [], [], [], [], [], []
    length = None
    for _ in range(n):
        noun, century = rng.choice(nouns), rng.randint(12, 18)
        d, y = rng.randint(2, 7), rng.randint(0, 9)
        text = GT_TEMPLATE.format(NOUN=noun, START=f"{century}{d}{y}", CENTURY=century)
        ctext = GT_TEMPLATE.format(NOUN=noun, START=f"{century}01", CENTURY=century)
        ids, cids = prefix + _encode(tokenizer, text), prefix + _encode(tokenizer, ctext)
        length = length or len(ids)
        if len(ids) != length or len(cids) != length:  # cannot happen with one token per digit; guard anyway
            raise InputError(
                "The greater-than prompts do not tokenize to equal lengths with this tokenizer: use another task."
            )
        clean.append(ids)
        corrupt.append(cids)
        signs.append([1.0 if k > d else -1.0 if k < d else 0.0 for k in range(10)])
        answers.append(digits[d + 1])
        wrongs.append(digits[d - 1])
        prompts.append(text)
        cprompts.append(ctext)
    return TaskBatch(
        name="greater-than",
        clean=torch.tensor(clean, dtype=torch.long),
        corrupt=torch.tensor(corrupt, dtype=torch.long),
        answer=torch.tensor(answers, dtype=torch.long),
        wrong=torch.tensor(wrongs, dtype=torch.long),
        metric_name="prob_diff",
        description=(
            "Greater-than: 'The war lasted from the year 1732 to the year 17' -> a decade digit greater than 3. "
            "Corrupted prompts start in year XX01. Metric: P(digit > d) - P(digit < d) for the next token, "
            "d the clean start decade digit (d itself counts on neither side)."
        ),
        prompts=prompts,
        corrupt_prompts=cprompts,
        candidates=torch.tensor(digits, dtype=torch.long),
        sign=torch.tensor(signs, dtype=torch.float32),
    )


# --------------------------------------------------------------------------------------------------------------
# induction

INDUCTION_LEN = 20  # tokens in each copy: long enough to show induction, short enough for fast patching


@functools.lru_cache(maxsize=4)
def word_token_pool(tokenizer: Any) -> tuple[int, ...]:
    """Ordinary word tokens (" house", " river": a space and 3+ lowercase letters) among the first 20k ids."""
    pool = []
    for tid in range(min(len(tokenizer), 20_000)):
        if re.fullmatch(r" [a-z]{3,}", tokenizer.decode([tid])):
            pool.append(tid)
    return tuple(pool)




def _induction_batch(
    name: str, tokenizer: Any, firsts: list[list[int]], seconds: list[list[int]], bos: int | None, description: str
) -> TaskBatch:
    """Clean [BOS, x, x], corrupt [BOS, x, y]; scored: positions of the second copy predicting x's next token."""
    import torch

    prefix = _prefix(bos)
    L, o = len(firsts[0]), len(prefix)
    clean = torch.tensor([prefix + x + x for x in firsts], dtype=torch.long)
    corrupt = torch.tensor([prefix + x + y for x, y in zip(firsts, seconds)], dtype=torch.long)
    targets = torch.full_like(clean, -1)
    # position o+L+j holds x_j (second copy); its next token x_{j+1} is predictable by copying, for j < L-1
    scored = torch.arange(o + L, o + 2 * L - 1)
    targets[:, scored] = clean[:, scored + 1]
    return TaskBatch(
        name=name,
        clean=clean,
        corrupt=corrupt,
        answer=clean[:, -1].clone(),
        wrong=corrupt[:, -1].clone(),
        metric_name="mean_logprob",
        description=description,
        prompts=[_decode(tokenizer, r) for r in clean[:, o:].tolist()],
        corrupt_prompts=[_decode(tokenizer, r) for r in corrupt[:, o:].tolist()],
        targets=targets,
    )


def build_induction(
    tokenizer: Any, n: int, seed: int = 0, bos: int | None = None, length: int = INDUCTION_LEN
) -> TaskBatch:
    """Repeated random tokens [BOS, r_1..r_L, r_1..r_L]; corrupt replaces the second copy with other random tokens.

    Tokens are drawn without replacement (within a row) from ordinary word tokens, with a fixed seed. Metric:
    mean log-probability of the correct next token over the second copy (see the module docstring).
    """
    _check_n(n)
    if length < 2:
        raise InputError(f"The repeated sequence must be at least 2 tokens long, not {length}.")
    pool = list(word_token_pool(tokenizer))
    rng = random.Random(seed)
    firsts, seconds = [], []
    for _ in range(n):
        drawn = rng.sample(pool, 2 * length)  # disjoint: the corrupt copy shares no token with the clean one
        firsts.append(drawn[:length])
        seconds.append(drawn[length:])
    return _induction_batch(
        "induction", tokenizer, firsts, seconds, bos,
        f"Induction on repeated random word tokens (two copies of {length}); corrupted prompts replace the second "
        "copy with different random tokens. Metric: mean log-probability of the correct next token over the "
        "second copy.",
    )


@functools.lru_cache(maxsize=1)
def _corpus_sentences() -> tuple[str, ...]:
    from backend.inputs.corpus import load_documents

    sentences = []
    for doc in load_documents("builtin"):
        for s in re.split(r"(?<=[.!?])\s+", doc.text):
            if "\n" not in s and s[:1].isupper() and s.isascii() and 12 <= len(s.split()) <= 60:
                sentences.append(s)
    return tuple(dict.fromkeys(sentences))  # dedupe, keep corpus order


def build_induction_text(
    tokenizer: Any, n: int, seed: int = 0, bos: int | None = None, length: int = INDUCTION_LEN
) -> TaskBatch:
    """Repeated natural text: the first ``length`` tokens of a built-in-corpus sentence, twice.

    Corrupt: the second copy is the start of a different sentence (same length, different last token). Same
    metric as :func:`build_induction`.
    """
    _check_n(n)
    sentences = list(_corpus_sentences())
    rng = random.Random(seed)
    rng.shuffle(sentences)
    spans = [ids[:length] for ids in (_encode(tokenizer, s) for s in sentences[: 4 * n + 50]) if len(ids) >= length]
    if len(spans) < n + 1:
        raise InputError(
            f"The built-in corpus has too few sentences of {length} tokens for {n} prompts: ask for fewer."
        )
    firsts, seconds = spans[:n], []
    for i, x in enumerate(firsts):
        others = [y for y in spans[n:] + spans[:n] if y[-1] != x[-1] and y != x]
        seconds.append(others[(i * 7) % len(others)])
    return _induction_batch(
        "induction-text", tokenizer, firsts, seconds, bos,
        f"Induction on repeated natural text (the first {length} tokens of a corpus sentence, twice); corrupted "
        "prompts continue with a different sentence. Metric: mean log-probability of the correct next token over "
        "the second copy.",
    )


# --------------------------------------------------------------------------------------------------------------
# factual recall (capital cities)

# Countries whose name and capital are both single tokens with a leading space in SmolLM2's tokenizer (the builder
# drops the ones another tokenizer splits). A capital equal to the country's name (Mexico) is left out.
FACT_CAPITALS = {
    "France": "Paris", "Germany": "Berlin", "Italy": "Rome", "Spain": "Madrid", "Japan": "Tokyo", "China": "Beijing",
    "Russia": "Moscow", "Egypt": "Cairo", "Greece": "Athens", "Canada": "Ottawa", "India": "Delhi",
    "Kenya": "Nairobi", "Peru": "Lima", "Chile": "Santiago", "Cuba": "Havana", "Norway": "Oslo",
    "Sweden": "Stockholm", "Poland": "Warsaw", "Iran": "Tehran", "Iraq": "Baghdad", "Ireland": "Dublin",
    "Austria": "Vienna", "Portugal": "Lisbon", "Australia": "Canberra", "Belgium": "Brussels", "Finland": "Helsinki",
    "Denmark": "Copenhagen", "Hungary": "Budapest", "Korea": "Seoul",
}
FACT_TEMPLATES = (
    "The capital of {C} is the city of",
    "The capital city of {C} is the city of",
    "Everyone knows that the capital of {C} is",
    "The government of {C} sits in the city of",
)


def _equal_length_pairs(tokenizer: Any, n: int, seed: int, bos: int | None, templates: Sequence[str],
                        draw: Callable[[random.Random, int], tuple[dict[str, str], dict[str, str], str, str]],
                        task: str, probe: dict[str, str] | None = None
                        ) -> tuple[list[list[int]], list[list[int]], list[int], list[int], list[str], list[str]]:
    """Pairs (clean, corrupt) of one template each, all of the templates' most common token length (measured with
    the slot filling ``probe``, default: the first draw's clean one).

    ``draw(rng, i)`` returns the clean and corrupt slot fillings and the answer / wrong words (single tokens with a
    leading space); a draw whose prompts do not tokenize to that length is redrawn.
    """
    rng = random.Random(seed)
    probe = probe if probe is not None else draw(random.Random(seed), 0)[0]
    lengths = {t: len(_encode(tokenizer, t.format(**probe))) for t in templates}
    common = max(set(lengths.values()), key=lambda L: (sum(v == L for v in lengths.values()), -L))
    usable = [t for t in templates if lengths[t] == common]
    prefix = _prefix(bos)
    clean, corrupt, answers, wrongs, prompts, cprompts = [], [], [], [], [], []
    attempts = 0
    while len(clean) < n:
        attempts += 1
        if attempts > 50 * n + 100:
            raise InputError(f"Could not build {task} prompts of equal length with this tokenizer: use another task.")
        i = len(clean)
        template = usable[i % len(usable)]
        fill, cfill, answer, wrong = draw(rng, i)
        text, ctext = template.format(**fill), template.format(**cfill)
        ids, cids = _encode(tokenizer, text), _encode(tokenizer, ctext)
        a, w = _single_token(tokenizer, answer), _single_token(tokenizer, wrong)
        if len(ids) != common or len(cids) != common or a is None or w is None or a == w:
            continue
        clean.append(prefix + ids)
        corrupt.append(prefix + cids)
        answers.append(a)
        wrongs.append(w)
        prompts.append(text)
        cprompts.append(ctext)
    return clean, corrupt, answers, wrongs, prompts, cprompts


def _logit_diff_batch(name: str, parts: tuple[list[list[int]], list[list[int]], list[int], list[int], list[str],
                                              list[str]], description: str) -> TaskBatch:
    import torch

    clean, corrupt, answers, wrongs, prompts, cprompts = parts
    return TaskBatch(
        name=name, clean=torch.tensor(clean, dtype=torch.long), corrupt=torch.tensor(corrupt, dtype=torch.long),
        answer=torch.tensor(answers, dtype=torch.long), wrong=torch.tensor(wrongs, dtype=torch.long),
        metric_name="logit_diff", description=description, prompts=prompts, corrupt_prompts=cprompts,
    )


def build_factual(tokenizer: Any, n: int, seed: int = 0, bos: int | None = None) -> TaskBatch:
    """Factual recall: "The capital of France is the city of" -> " Paris"; corrupt: another country ("... of Japan
    is the city of"). Metric: logit(clean capital) − logit(corrupt country's capital) at the last position.
    Several templates of one token length (the most common one with this tokenizer)."""
    _check_n(n)
    countries = [c for c in _single_tokens(tokenizer, tuple(FACT_CAPITALS))
                 if _single_token(tokenizer, " " + FACT_CAPITALS[c]) is not None]
    if len(countries) < 4:
        raise InputError("The factual-recall task needs countries and capitals that are single tokens; this "
                         "tokenizer splits them, so use another task.")

    def draw(rng: random.Random, i: int) -> tuple[dict[str, str], dict[str, str], str, str]:
        c, d = rng.sample(countries, 2)
        return {"C": c}, {"C": d}, " " + FACT_CAPITALS[c], " " + FACT_CAPITALS[d]

    parts = _equal_length_pairs(tokenizer, n, seed, bos, FACT_TEMPLATES, draw, "factual-recall")
    return _logit_diff_batch("factual", parts, (
        "Factual recall: 'The capital of France is the city of' -> ' Paris'. Corrupted prompts name another country. "
        "Metric: logit(clean capital) - logit(the corrupt country's capital) at the last position."))


# --------------------------------------------------------------------------------------------------------------
# subject-verb agreement

SVA_NOUNS = (
    "key:keys dog:dogs book:books teacher:teachers girl:girls boy:boys car:cars house:houses student:students "
    "doctor:doctors friend:friends cat:cats tree:trees door:doors letter:letters window:windows player:players "
    "bird:birds farmer:farmers officer:officers painting:paintings picture:pictures song:songs table:tables"
).split()
SVA_TEMPLATES = (
    "The {N} near the {A}",
    "The {N} behind the {A}",
    "The {N} beside the {A}",
    "The {N} with the {A}",
)


def build_sva(tokenizer: Any, n: int, seed: int = 0, bos: int | None = None) -> TaskBatch:
    """Subject–verb agreement: "The key near the cabinets" -> " is" (not " are"); corrupt: the subject's number
    flipped ("The keys near the cabinets"). Half the clean subjects are singular, half plural; the attractor noun's
    number is random. Metric: logit(verb agreeing with the clean subject) − logit(the other), " is" vs " are"."""
    _check_n(n)
    pairs = [tuple(p.split(":")) for p in SVA_NOUNS]
    pairs = [p for p in pairs if _single_token(tokenizer, " " + p[0]) and _single_token(tokenizer, " " + p[1])]
    if len(pairs) < 4 or _single_token(tokenizer, " is") is None or _single_token(tokenizer, " are") is None:
        raise InputError("The subject-verb agreement task needs single-token nouns and verbs; use another task.")

    def draw(rng: random.Random, i: int) -> tuple[dict[str, str], dict[str, str], str, str]:
        (s_sing, s_plur), (a_sing, a_plur) = rng.sample(pairs, 2)
        attractor = a_sing if rng.random() < 0.5 else a_plur
        singular = i % 2 == 0
        clean_n, corrupt_n = (s_sing, s_plur) if singular else (s_plur, s_sing)
        answer, wrong = (" is", " are") if singular else (" are", " is")
        return {"N": clean_n, "A": attractor}, {"N": corrupt_n, "A": attractor}, answer, wrong

    parts = _equal_length_pairs(tokenizer, n, seed, bos, SVA_TEMPLATES, draw, "subject-verb agreement")
    return _logit_diff_batch("sva", parts, (
        "Subject-verb agreement: 'The key near the cabinets' -> ' is' (not ' are'). Corrupted prompts flip the "
        "subject's number. Metric: logit(agreeing verb) - logit(the other) at the last position."))


# --------------------------------------------------------------------------------------------------------------
# registry

TaskBuilder = Callable[..., TaskBatch]
TASKS: dict[str, TaskBuilder] = {
    "ioi": build_ioi,
    "greater-than": build_greater_than,
    "induction": build_induction,
    "induction-text": build_induction_text,
    "factual": build_factual,
    "sva": build_sva,
}


def _tokenizer_and_bos(model_or_tokenizer: Any, bos: int | None | str) -> tuple[Any, int | None]:
    is_model = hasattr(model_or_tokenizer, "cfg") and hasattr(model_or_tokenizer, "tokenizer")
    tokenizer = model_or_tokenizer.tokenizer if is_model else model_or_tokenizer
    if bos == "auto":
        bos = model_bos_id(model_or_tokenizer) if is_model else tokenizer_bos_id(tokenizer)
    return tokenizer, bos  # type: ignore[return-value]


def build_task(
    name: str, model_or_tokenizer: Any, n: int, seed: int = 0, bos: int | None | str = "auto", **options: Any
) -> TaskBatch:
    """Build ``n`` prompt pairs of the built-in task ``name`` (a key of :data:`TASKS`), deterministically per seed.

    ``bos``: "auto" uses the model's BOS (``model_bos_id``) when a model is passed, the tokenizer's own BOS when
    a tokenizer is passed; an int forces that id, None means no BOS. ``options`` go to the builder (e.g.
    ``length`` for the induction tasks). Unknown names raise InputError listing the known ones.
    """
    if name not in TASKS:
        raise InputError(f"Unknown task {name!r}: choose one of {', '.join(TASKS)}.")
    tokenizer, bos_id = _tokenizer_and_bos(model_or_tokenizer, bos)
    return TASKS[name](tokenizer, n, seed=seed, bos=bos_id, **options)


def custom_pair(model: Any, clean_text: str | bytes, corrupt_text: str | bytes, answer: str, wrong: str) -> TaskBatch:
    """A single user-entered clean/corrupted pair scored by logit(answer) - logit(wrong) at the last position.

    ``answer`` and ``wrong`` must each be one token (usually a word with a leading space, e.g. " Mary"). Both
    prompts get the model's BOS and must tokenize to the same length, or an InputError says both lengths.
    """
    import torch

    tokenizer = model.tokenizer
    clean_text = decode_text(clean_text, "The clean prompt")
    corrupt_text = decode_text(corrupt_text, "The corrupted prompt")
    for label, text in (("clean", clean_text), ("corrupted", corrupt_text)):
        if not text.strip():
            raise InputError(f"The {label} prompt is empty: type the text the model should continue.")
    ids: dict[str, int] = {}
    for label, word in (("answer", answer), ("wrong answer", wrong)):
        if not word:
            raise InputError(f"The {label} is empty: type the token you expect, e.g. ' Mary' with a leading space.")
        toks = _encode(tokenizer, word)
        if len(toks) != 1:
            # Typed text is echoed as literal() code spans: pages show these messages as markdown.
            pieces = " + ".join(literal(repr(tokenizer.decode([t])), 30) for t in toks[:8]) + (" + …" if len(toks) > 8
                                                                                               else "")
            hint = f" (try {literal(repr(' ' + word.strip()))} with a leading space)" if not word.startswith(" ") else ""
            raise InputError(
                f"The {label} {literal(repr(word))} is {len(toks)} tokens ({pieces}), but it must be a single "
                f"token{hint}."
            )
        ids[label] = toks[0]
    if ids["answer"] == ids["wrong answer"]:
        raise InputError(
            f"The answer and the wrong answer are the same token ({literal(repr(answer))}): choose two different tokens."
        )
    prefix = _prefix(model_bos_id(model))
    clean_ids = prefix + _encode(tokenizer, clean_text)
    corrupt_ids = prefix + _encode(tokenizer, corrupt_text)
    if len(clean_ids) != len(corrupt_ids):
        raise InputError(
            f"The clean and corrupted prompts must tokenize to the same length, but the clean one has "
            f"{len(clean_ids)} tokens and the corrupted one {len(corrupt_ids)}: "
            "change words so both have the same count."
        )
    n_ctx = int(model.cfg.n_ctx)
    if len(clean_ids) > n_ctx:
        raise InputError(
            f"The prompts have {len(clean_ids)} tokens, more than the model's context of {n_ctx}: shorten them."
        )
    return TaskBatch(
        name="custom",
        clean=torch.tensor([clean_ids], dtype=torch.long),
        corrupt=torch.tensor([corrupt_ids], dtype=torch.long),
        answer=torch.tensor([ids["answer"]], dtype=torch.long),
        wrong=torch.tensor([ids["wrong answer"]], dtype=torch.long),
        metric_name="logit_diff",
        description=f"Custom pair: logit({answer!r}) - logit({wrong!r}) at the last position.",
        prompts=[clean_text],
        corrupt_prompts=[corrupt_text],
    )
