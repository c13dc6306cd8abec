"""Tests for backend.corpus: the built-in corpus, user files, Hugging Face references and context chunking."""

from __future__ import annotations

import gzip
import json
import os
import re
from pathlib import Path

import pytest
import torch

from backend.errors import InputError
from backend.inputs.corpus import (
    BUILTIN,
    Contexts,
    Document,
    builtin_info,
    document_separator_id,
    load_contexts,
    load_documents,
    tokenize_contexts,
)
from backend.inputs.prompts import bos_id
from backend.model.registry import hub_reachable, load_tokenizer


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer()


@pytest.fixture(scope="module")
def builtin_docs() -> list[Document]:
    return load_documents(BUILTIN)


# --------------------------------------------------------------------------------------------------------------
# built-in corpus


def test_builtin_loads_and_is_varied(builtin_docs: list[Document]) -> None:
    assert len(builtin_docs) > 500
    assert len({d.doc_id for d in builtin_docs}) == len(builtin_docs)
    assert len({d.text for d in builtin_docs}) == len(builtin_docs)
    assert {d.source for d in builtin_docs} == {"shakespeare", "milton", "python-docs"}
    # shuffled: even a short prefix mixes the sources and many different works
    assert {d.source for d in builtin_docs[:40]} == {"shakespeare", "milton", "python-docs"}
    assert len({d.doc_id.split("#")[0].rsplit("/", 1)[0] for d in builtin_docs[:40]}) >= 10
    for doc in builtin_docs:
        assert doc.text == doc.text.strip() and len(doc.text.split()) >= 20


def test_builtin_is_mostly_ascii_english_words(builtin_docs: list[Document]) -> None:
    words = " ".join(d.text for d in builtin_docs[:200]).split()
    plain = sum(bool(re.fullmatch(r"[\"'(]*[A-Za-z][a-z']*[.,;:!?\"')-]*", w)) for w in words)
    assert plain / len(words) > 0.85
    common = {"the", "and", "of", "to", "is", "that", "a"}
    assert sum(w.lower() in common for w in words) / len(words) > 0.08
    assert all(not re.search(r"project gutenberg|\[exit|\[enter|>>>", d.text, re.I) for d in builtin_docs)


def test_builtin_info_matches_the_file(builtin_docs: list[Document]) -> None:
    info = builtin_info()
    for key in ("description", "licence", "n_documents", "provenance"):
        assert info[key]
    assert info["n_documents"] == len(builtin_docs)
    assert "public domain" in info["licence"].lower() and "PSF" in info["licence"]
    assert set(info["sources"]) == {"shakespeare", "milton", "python-docs"}


def test_committed_corpus_is_small() -> None:
    size = sum(p.stat().st_size for p in Path("data/corpus").iterdir() if p.is_file())
    assert size < 4_000_000


def test_limit(builtin_docs: list[Document]) -> None:
    assert load_documents(BUILTIN, limit=7) == builtin_docs[:7]
    with pytest.raises(InputError):
        load_documents(BUILTIN, limit=0)


# --------------------------------------------------------------------------------------------------------------
# contexts


def test_contexts_shape_bos_and_determinism(tokenizer, builtin_docs: list[Document]) -> None:
    bos = bos_id(tokenizer)
    assert bos is not None
    ctx = tokenize_contexts(builtin_docs, tokenizer, n_ctx=64, bos=bos, max_contexts=50)
    assert isinstance(ctx, Contexts)
    assert ctx.tokens.shape == (50, 64) and ctx.tokens.dtype == torch.long
    assert len(ctx) == 50 and ctx.n_ctx == 64 and ctx.corpus == BUILTIN
    assert (ctx.tokens[:, 0] == bos).all()
    assert (ctx.tokens[:, 1:] != bos).all()  # BOS only at position 0
    assert len(ctx.doc_ids) == 50 and ctx.doc_ids[0] == builtin_docs[0].doc_id
    again = tokenize_contexts(builtin_docs, tokenizer, n_ctx=64, bos=bos, max_contexts=50)
    assert torch.equal(ctx.tokens, again.tokens) and ctx.doc_ids == again.doc_ids
    no_bos = tokenize_contexts(builtin_docs, tokenizer, n_ctx=64, bos=None, max_contexts=10)
    assert no_bos.tokens.shape == (10, 64)
    # without BOS the stream is the same, just cut every 64 tokens instead of every 63
    assert torch.equal(no_bos.tokens.flatten()[:63], ctx.tokens[0, 1:])


def test_contexts_concatenate_documents_with_separator(tokenizer) -> None:
    docs = [
        Document("a", "t", "One two three four five six seven."),
        Document("b", "t", "Eight nine ten eleven twelve."),
    ]
    sep = document_separator_id(tokenizer)
    assert sep == tokenizer.convert_tokens_to_ids("<|endoftext|>")
    ids_a = tokenizer(docs[0].text, add_special_tokens=False)["input_ids"]
    ids_b = tokenizer(docs[1].text, add_special_tokens=False)["input_ids"]
    stream = ids_a + [sep] + ids_b
    body = 3  # small, so contexts start in "a", on the separator (belongs to "a") and in "b"
    ctx = tokenize_contexts(docs, tokenizer, n_ctx=body + 1, bos=1)
    n = len(stream) // body
    assert ctx.tokens.shape == (n, body + 1)
    assert ctx.tokens[:, 1:].flatten().tolist() == stream[: n * body]  # the incomplete tail is dropped
    assert ctx.doc_ids == ["a" if i * body <= len(ids_a) else "b" for i in range(n)]
    assert ctx.corpus == "t"
    assert tokenize_contexts(docs, tokenizer, n_ctx=body + 1, bos=1, max_contexts=2).tokens.shape == (2, body + 1)
    plain = tokenize_contexts(docs, tokenizer, n_ctx=body, bos=None, separator=None)
    assert plain.tokens.flatten().tolist() == (ids_a + ids_b)[: len(plain) * body]


def test_builtin_contexts_mix_every_source(tokenizer, builtin_docs: list[Document]) -> None:
    ctx = tokenize_contexts(builtin_docs, tokenizer, n_ctx=128, bos=bos_id(tokenizer), max_contexts=2000)
    assert ctx.tokens.shape == (2000, 128)
    # the prefix is varied: contexts come from many documents of all sources
    assert len(set(ctx.doc_ids)) > 200
    assert {d.split("/")[0] for d in ctx.doc_ids} == {"shakespeare", "milton", "python"}


def test_contexts_errors(tokenizer) -> None:
    short = [Document("x", "t", "Too short.")]
    with pytest.raises(InputError, match="fewer than one context"):
        tokenize_contexts(short, tokenizer, n_ctx=64, bos=1)
    with pytest.raises(InputError):
        tokenize_contexts(short, tokenizer, n_ctx=1, bos=1)


def test_load_contexts_names_the_corpus(tokenizer, tmp_path: Path) -> None:
    path = tmp_path / "notes.txt"
    path.write_text("A sentence about rivers and hills. " * 40)
    ctx = load_contexts(str(path), tokenizer, n_ctx=32, bos=1, max_contexts=3)
    assert ctx.corpus == str(path) and ctx.tokens.shape == (3, 32)


# --------------------------------------------------------------------------------------------------------------
# user files


def test_txt_documents_split_on_two_blank_lines(tmp_path: Path) -> None:
    path = tmp_path / "my texts.txt"
    path.write_text(
        "First document, paragraph one.\n\nStill the first document.\n\n\nSecond document.\r\n\r\n\r\nThird.\n"
    )
    docs = load_documents(str(path))
    assert [d.text for d in docs] == [
        "First document, paragraph one.\n\nStill the first document.",
        "Second document.",
        "Third.",
    ]
    assert docs[0].source == "my texts.txt" and len({d.doc_id for d in docs}) == 3
    assert len(load_documents(str(path), limit=2)) == 2


def test_jsonl_and_gzip(tmp_path: Path) -> None:
    rows = [{"text": "Alpha beta.", "id": "d1"}, {"text": "   "}, {"text": "Gamma delta.", "meta": 3}]
    lines = "\n".join(json.dumps(r) for r in rows) + "\n\n"
    (tmp_path / "c.jsonl").write_text(lines)
    (tmp_path / "c.jsonl.gz").write_bytes(gzip.compress(lines.encode()))
    for name in ("c.jsonl", "c.jsonl.gz"):
        docs = load_documents(str(tmp_path / name))
        assert [d.text for d in docs] == ["Alpha beta.", "Gamma delta."]
        assert docs[0].doc_id == "d1"


def test_parquet(tmp_path: Path) -> None:
    import duckdb

    path = tmp_path / "c.parquet"
    duckdb.sql(
        "SELECT * FROM (VALUES ('First text.', 1), ('Second text.', 2), (NULL, 3)) t(text, id)"
    ).write_parquet(str(path))
    docs = load_documents(str(path))
    assert [d.text for d in docs] == ["First text.", "Second text."]
    assert docs[0].doc_id == "1" and docs[0].source == "c.parquet"
    assert len(load_documents(str(path), limit=1)) == 1
    bad = tmp_path / "nocol.parquet"
    duckdb.sql("SELECT 'x' AS body").write_parquet(str(bad))
    with pytest.raises(InputError, match="no 'text' column.*body"):
        load_documents(str(bad))
    garbage = tmp_path / "garbage.parquet"
    garbage.write_bytes(b"not a parquet file at all")
    with pytest.raises(InputError, match="garbage.parquet"):
        load_documents(str(garbage))


@pytest.mark.parametrize(
    ("name", "content", "pattern"),
    [
        ("latin1.txt", "caf\xe9 au lait".encode("latin-1"), r"'latin1.txt' is not valid UTF-8"),
        ("empty.txt", b"", "empty"),
        ("blank.txt", b"\n\n   \n", "contains no text"),
        ("data.csv", b"text\nhello\n", "unsupported type"),
        ("notext.jsonl", b'{"body": "hello"}\n', 'Line 1 .* no "text" field'),
        ("broken.jsonl", b'{"text": "ok"}\n{"text": \n', "Line 2 .* not valid JSON"),
        ("number.jsonl", b'{"text": 5}\n', "not a string"),
        ("latin1.jsonl", '{"text": "caf\xe9"}\n'.encode("latin-1"), "not valid UTF-8"),
    ],
)
def test_bad_files_give_one_clear_sentence(tmp_path: Path, name: str, content: bytes, pattern: str) -> None:
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(InputError, match=pattern) as info:
        load_documents(str(path))
    assert "\n" not in str(info.value)


def test_missing_file_and_folder(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="does not exist"):
        load_documents(str(tmp_path / "nope.txt"))
    with pytest.raises(InputError, match="is a folder"):
        load_documents(str(tmp_path))
    with pytest.raises(InputError):
        load_documents("")


# --------------------------------------------------------------------------------------------------------------
# Hugging Face datasets


def test_hf_offline_fails_with_one_sentence_without_retries(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    if hub_reachable():
        pytest.skip("the Hugging Face hub is reachable here; this test covers the offline case")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "unset-me")
    monkeypatch.delenv("HF_HUB_OFFLINE")  # restored to absent after the test
    with pytest.raises(InputError, match="not reachable") as info:
        load_documents("hf:wikitext:train:text:wikitext-2-raw-v1")
    assert os.environ.get("HF_HUB_OFFLINE") == "1"  # switched offline after one probe: nothing retries
    assert "\n" not in str(info.value) and "'wikitext'" in str(info.value)


def test_hf_reference_syntax() -> None:
    with pytest.raises(InputError, match="hf:NAME"):
        load_documents("hf:")
