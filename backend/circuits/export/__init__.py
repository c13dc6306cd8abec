"""Exports of an attribution graph: SVG / PNG images (:mod:`.images`), GraphML (:mod:`.graphml`), Graphviz DOT
(:mod:`.dot`) and Neuronpedia graph JSON (:mod:`.neuronpedia`).

:data:`FORMATS` maps a format name to an :class:`ExportFormat` (extension, MIME type, ``Graph -> bytes``);
:func:`export` and :func:`export_to_file` are what the page's download buttons and the CLI use.

**Images** are the plotly figure of :mod:`.figure` rendered by kaleido 1.x, which drives Debian's chromium
(``make browser``). Starting chromium takes seconds, so one kaleido browser is started on first use and reused for
every later image (:func:`close_renderer` stops it; it is also stopped at exit).

**Neuronpedia JSON** (:func:`to_neuronpedia_json`) follows circuit-tracer's ``circuit_tracer/frontend/
graph_models.py`` (the pydantic ``Metadata`` / ``QParams`` / ``Node`` / ``Link`` models) and
``circuit_tracer/utils/create_graph_files.py`` (how a pruned graph becomes that JSON), checked against Neuronpedia's
upload schema ``apps/webapp/app/api/graph/graph-schema.json`` and its ``formatCLTGraphData``; see the function's
docstring for how our node kinds map onto it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from backend.circuits.export.dot import to_dot
from backend.circuits.export.graphml import to_graphml
from backend.circuits.export.images import to_png, to_svg
from backend.circuits.export.neuronpedia import to_neuronpedia_json
from backend.circuits.graph import Graph
from backend.errors import InputError, literal


@dataclass(frozen=True)
class ExportFormat:
    """One export format: ``extension`` (with the dot), ``mime`` type and ``render`` (Graph -> bytes)."""

    name: str
    extension: str
    mime: str
    render: Callable[[Graph], bytes]
    description: str
    needs_browser: bool = False


def _json_bytes(graph: Graph) -> bytes:
    # allow_nan=False: NaN is not JSON and browsers' JSON.parse rejects it.
    return json.dumps(to_neuronpedia_json(graph), ensure_ascii=False, allow_nan=False, indent=1).encode("utf-8")


FORMATS: dict[str, ExportFormat] = {
    "svg": ExportFormat("svg", ".svg", "image/svg+xml", lambda g: to_svg(g).encode("utf-8"),
                        "SVG image of the graph figure", needs_browser=True),
    "png": ExportFormat("png", ".png", "image/png", lambda g: to_png(g), "PNG image of the graph figure",
                        needs_browser=True),
    "graphml": ExportFormat("graphml", ".graphml", "application/graphml+xml",
                            lambda g: to_graphml(g).encode("utf-8"), "GraphML (Gephi, yEd, Cytoscape, networkx)"),
    "dot": ExportFormat("dot", ".dot", "text/vnd.graphviz", lambda g: to_dot(g).encode("utf-8"),
                        "Graphviz DOT with pinned positions (neato -n2)"),
    "json": ExportFormat("json", ".json", "application/json", _json_bytes,
                         "Neuronpedia / circuit-tracer attribution-graph JSON"),
}
_SUFFIXES = {f.extension: f.name for f in FORMATS.values()} | {".gv": "dot", ".xml": "graphml"}


def export(graph: Graph, fmt: str) -> bytes:
    """The graph exported as ``fmt`` (a key of :data:`FORMATS`)."""
    key = str(fmt).lower().lstrip(".")
    if key not in FORMATS:
        raise InputError(f"Unknown export format {fmt!r}: use one of {', '.join(FORMATS)}.")
    return FORMATS[key].render(graph)


def format_for_path(path: str | Path) -> ExportFormat:
    """The export format named by a file's suffix (``.svg``, ``.png``, ``.graphml``, ``.dot`` / ``.gv``,
    ``.json``)."""
    suffix = Path(path).suffix.lower()
    if suffix not in _SUFFIXES:
        raise InputError(f"Cannot tell the export format from the file name {literal(path)}: end it with one of "
                         f"{', '.join(sorted(_SUFFIXES))}.")
    return FORMATS[_SUFFIXES[suffix]]


def check_export_path(path: str | Path) -> ExportFormat:
    """The format of an export target, checked before any work: its suffix names a format and its directory exists
    (a typo in a directory name must not silently create directories). InputError (one sentence) otherwise."""
    target = Path(path)
    fmt = format_for_path(target)
    directory = target.parent
    if not directory.is_dir():
        raise InputError(f"Cannot write {literal(target)}: the directory {literal(directory)} does not exist; create "
                         "it first or export elsewhere.")
    if target.is_dir():
        raise InputError(f"Cannot write {literal(target)}: it is a directory; give a file name.")
    return fmt


def export_to_file(graph: Graph, path: str | Path) -> Path:
    """Write the graph to ``path`` (whose directory must exist) in the format its suffix names; returns the path."""
    target = Path(path)
    data = check_export_path(target).render(graph)
    target.write_bytes(data)
    return target
