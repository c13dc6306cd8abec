"""The shape of ``backend/``: capability packages without import cycles, Streamlit only in the UI package, few loose
modules. Read from the source with ``ast`` (nothing is imported), so a lazy import inside a function counts too."""

from __future__ import annotations

import ast
from pathlib import Path

import networkx as nx

ROOT = Path(__file__).resolve().parent.parent
BACKEND = ROOT / "backend"
UI_PACKAGE = "backend.ui"
MAX_LOOSE_MODULES = 8


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in BACKEND.rglob("*.py")}


def _imports(path: Path, known: set[str]) -> set[str]:
    """Every backend module ``path`` imports anywhere in the file, resolved to a module of ``known``; importing
    ``a.b.c`` also runs the packages ``a.b`` and ``a``, which are edges too."""
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            # `from pkg import mod` imports the module pkg.mod when there is one, else a name of pkg
            names = [f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in known else node.module
                     for a in node.names]
        for name in names:
            parts = name.split(".")
            for i in range(1, len(parts) + 1):
                prefix = ".".join(parts[:i])
                if prefix in known and prefix != "backend":
                    out.add(prefix)
    return out


def import_graph() -> nx.DiGraph:
    """Directed graph module -> module it imports, over ``backend/``."""
    modules = _modules()
    graph = nx.DiGraph()
    graph.add_nodes_from(modules)
    for name, path in modules.items():
        for target in _imports(path, set(modules)):
            if target != name and not name.startswith(target + "."):  # a module importing its own package is fine
                graph.add_edge(name, target)
    return graph


def test_the_import_graph_is_read() -> None:
    graph = import_graph()
    assert graph.number_of_nodes() > 40
    assert graph.has_edge("backend.pipeline.run", "backend.dictionaries.steps")  # the walker sees real imports


def test_no_import_cycle_in_backend() -> None:
    cycles = list(nx.simple_cycles(import_graph()))
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c + c[:1]) for c in cycles[:5])


def test_a_cycle_would_be_found() -> None:
    """The check itself can fail: add one back edge and a cycle appears."""
    graph = import_graph()
    graph.add_edge("backend.dictionaries.steps", "backend.pipeline.run")
    assert list(nx.simple_cycles(graph))


def test_streamlit_is_imported_only_by_the_ui_package() -> None:
    offenders = []
    for name, path in _modules().items():
        if name == UI_PACKAGE or name.startswith(UI_PACKAGE + "."):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            mods = ([a.name for a in node.names] if isinstance(node, ast.Import)
                    else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            if any(m == "streamlit" or m.startswith("streamlit.") for m in mods):
                offenders.append(name)
    assert not offenders, f"Streamlit imported outside {UI_PACKAGE}: {sorted(set(offenders))}"


def test_backend_has_few_loose_modules() -> None:
    loose = sorted(p.name for p in BACKEND.glob("*.py"))
    assert len(loose) <= MAX_LOOSE_MODULES, f"{len(loose)} modules directly in backend/: {loose}"
    packages = sorted(p.name for p in BACKEND.iterdir() if (p / "__init__.py").exists())
    assert {"model", "inputs", "store", "pipeline", "dictionaries", "features", "heads", "attribution", "circuits",
            "ui"} <= set(packages)
