"""Turning user text into model input: validation, BOS handling and truncation, in one place.

Every prompt the app or CLI runs goes through :func:`encode_prompt`, so empty, oversized and non-UTF-8 input
gets the same clear message everywhere and nothing is silently dropped: truncation comes with a warning.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from backend.errors import InputError

# A prompt is tokenized only up to this many characters: 10^5 characters of text is far beyond any context we
# run, and tokenizing megabytes just to truncate them would stall a page.
MAX_PROMPT_CHARS = 20_000


@dataclass
class EncodedPrompt:
    """Token ids (BOS first when the model uses one), their strings, and what was changed on the way."""

    ids: list[int]
    strings: list[str]
    warnings: list[str] = field(default_factory=list)

    @property
    def truncated(self) -> bool:
        return bool(self.warnings)


def decode_text(data: str | bytes, what: str = "The text") -> str:
    """Return ``data`` as str; bytes must be UTF-8 (a BOM is accepted), else one clear InputError."""
    if isinstance(data, str):
        return data
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise InputError(
            f"{what} is not valid UTF-8 (byte 0x{data[exc.start]:02x} at offset {exc.start}): "
            "save it as UTF-8 and try again."
        ) from None


def bos_id(tokenizer: Any, bos_token: str | None = None) -> int | None:
    """The BOS id a model's contexts start with (``bos_token`` overrides the tokenizer's own)."""
    if bos_token is not None:
        tid = tokenizer.convert_tokens_to_ids(bos_token)
        return int(tid) if tid is not None else None
    return None if tokenizer.bos_token_id is None else int(tokenizer.bos_token_id)


def model_bos_id(model: Any) -> int | None:
    """BOS id for a loaded HookedTransformer, from its registry spec."""
    from backend.model.registry import REGISTRY

    spec = REGISTRY.get(getattr(model.cfg, "model_name", ""), None)
    return bos_id(model.tokenizer, spec.bos_token if spec else None)


def token_strings(tokenizer: Any, ids: list[int]) -> list[str]:
    """Human-readable text of each token (decoded one by one, so byte-level pieces stay visible)."""
    return [tokenizer.decode([i]) for i in ids]


def encode_prompt(model: Any, text: str | bytes, max_tokens: int | None = None) -> EncodedPrompt:
    """Validate and tokenize a prompt for ``model``.

    Raises InputError for empty / whitespace-only / non-UTF-8 input. Text longer than the context
    (``max_tokens``, default the model's n_ctx) is truncated to its first tokens, with a warning saying so.
    """
    text = decode_text(text, "The prompt")
    if not text.strip():
        raise InputError("The prompt is empty: type some text to run through the model.")
    warnings: list[str] = []
    if len(text) > MAX_PROMPT_CHARS:
        warnings.append(f"The prompt has {len(text):,} characters; only the first {MAX_PROMPT_CHARS:,} were read — shorten the prompt to analyse all of it.")
        text = text[:MAX_PROMPT_CHARS]
    tokenizer = model.tokenizer
    ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
    bos = model_bos_id(model)
    prefix = [bos] if bos is not None else []
    limit = (max_tokens or model.cfg.n_ctx) - len(prefix)
    if len(ids) > limit:
        warnings.append(f"The prompt has {len(ids):,} tokens; only the first {limit:,} fit the context and were used — shorten the prompt to analyse all of it.")
        ids = ids[:limit]
    if not ids:
        raise InputError("The prompt produced no tokens: type some text to run through the model.")
    ids = prefix + ids
    return EncodedPrompt(ids=ids, strings=token_strings(tokenizer, ids), warnings=warnings)
