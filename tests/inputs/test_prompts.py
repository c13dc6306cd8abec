"""Prompt validation: empty, whitespace, huge and non-UTF-8 input get clear messages; truncation is announced."""

from __future__ import annotations

import pytest

from backend.errors import InputError
from backend.inputs.prompts import MAX_PROMPT_CHARS, decode_text, encode_prompt, model_bos_id
from backend.model.registry import load_model


@pytest.fixture(scope="module")
def model():
    return load_model("tiny-llama")


@pytest.mark.parametrize("text", ["", "   \n\t  "])
def test_empty_prompt_is_refused(model, text: str) -> None:
    with pytest.raises(InputError, match="empty"):
        encode_prompt(model, text)


def test_non_utf8_bytes_are_refused_with_offset(model) -> None:
    with pytest.raises(InputError, match=r"not valid UTF-8 \(byte 0xff at offset 3\)"):
        encode_prompt(model, b"abc\xff\xfe")


def test_utf8_bytes_with_bom_are_accepted() -> None:
    assert decode_text("\ufeffhello".encode("utf-8")) == "hello"


def test_bos_first_and_strings_align(model) -> None:
    enc = encode_prompt(model, "Hello world, this is a test.")
    assert enc.ids[0] == model_bos_id(model)
    assert len(enc.ids) == len(enc.strings)
    assert "".join(enc.strings[1:]) == "Hello world, this is a test."
    assert not enc.warnings


def test_long_prompt_is_truncated_with_warning(model) -> None:
    enc = encode_prompt(model, "word " * 100_000)
    assert len(enc.ids) == model.cfg.n_ctx
    assert any("only the first" in w for w in enc.warnings)
    assert any(f"{MAX_PROMPT_CHARS:,}" in w for w in enc.warnings)


def test_max_tokens_respected(model) -> None:
    enc = encode_prompt(model, "one two three four five six seven", max_tokens=4)
    assert len(enc.ids) == 4 and enc.truncated
