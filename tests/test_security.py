"""Weights, dictionaries and stores load through safe formats only: no pickle-based loader anywhere in the code
that serves or builds stores (safetensors, JSON, DuckDB; ``torch.load`` only with ``weights_only=True``)."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CODE = [ROOT / "app.py", *sorted((ROOT / "pages").glob("*.py")), *sorted((ROOT / "backend").rglob("*.py")),
        *sorted((ROOT / "benchmarks").glob("*.py"))]
# Each of these can run code hidden in a file: pickle and friends, numpy's pickle fallback, PyYAML's full loader.
UNSAFE = [
    (re.compile(r"\bpickle\.loads?\("), "pickle.load"),
    (re.compile(r"\b(cloudpickle|dill|joblib|marshal|shelve)\.(loads?|open)\("), "pickle-like loader"),
    (re.compile(r"allow_pickle\s*=\s*True"), "numpy allow_pickle=True"),
    (re.compile(r"\byaml\.(load|unsafe_load|full_load)\((?![^)]*SafeLoader)"), "yaml loader other than safe_load"),
    (re.compile(r"(?<![\w.])(eval|exec)\("), "eval/exec"),  # not model.eval()
]
TORCH_LOAD = re.compile(r"\btorch\.load\(([^)]*)\)")


def test_code_is_found() -> None:
    assert len(CODE) > 10 and all(p.exists() for p in CODE)


def test_no_pickle_based_loaders() -> None:
    found = []
    for path in CODE:
        text = path.read_text()
        for pattern, what in UNSAFE:
            found += [f"{path.relative_to(ROOT)}: {what}: {m.group(0)}" for m in pattern.finditer(text)]
        found += [f"{path.relative_to(ROOT)}: {m.group(0)}" for m in TORCH_LOAD.finditer(text)
                  if "weights_only=True" not in m.group(1)]
    assert found == []
