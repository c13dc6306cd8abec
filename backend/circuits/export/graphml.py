"""GraphML export through networkx (Gephi, yEd, Cytoscape): attributes cleaned to what GraphML can hold.
"""

from __future__ import annotations

import json
import math
import re
from typing import Any

from backend.circuits.graph import Graph, to_networkx
from backend.circuits.layout import layout

_XML_INVALID = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\ud800-\udfff\ufffe\uffff]")


def xml_safe(text: str) -> str:
    """``text`` without characters XML 1.0 cannot hold (control characters other than tab/newline/CR): each
    becomes its Python escape (``\\x1b``) so nothing is lost silently."""
    return _XML_INVALID.sub(lambda m: m.group(0).encode("unicode_escape", "backslashreplace").decode("ascii"), text)


def to_graphml(graph: Graph) -> str:
    """GraphML of :func:`backend.circuits.graph.to_networkx` plus layout positions ``x`` / ``y`` per node (and the
    prompt's tokens as a JSON string graph attribute ``tokens_json``). Readable by ``networkx.read_graphml``,
    Gephi, yEd and Cytoscape."""
    import networkx as nx

    g = to_networkx(graph)
    for nid, (x, y) in layout(graph).items():
        g.nodes[nid]["x"], g.nodes[nid]["y"] = float(x), float(y)
    g.graph["tokens_json"] = json.dumps(graph.tokens, ensure_ascii=False)
    _clean_attributes(g)
    return "\n".join(nx.generate_graphml(g, encoding="utf-8", prettyprint=True)) + "\n"


def _clean_attributes(g: Any) -> None:
    """Only GraphML-writable values (str / int / float / bool), strings XML-safe; others (e.g. pandas NA) dropped."""

    def clean(attrs: dict[str, Any]) -> None:
        for key in list(attrs):
            value = attrs[key]
            if isinstance(value, str):
                attrs[key] = xml_safe(value)
            elif isinstance(value, bool) or (isinstance(value, (int, float)) and not isinstance(value, bool)):
                if isinstance(value, float) and not math.isfinite(value):
                    del attrs[key]
            else:
                item = getattr(value, "item", None)
                try:
                    plain = item() if callable(item) else None
                except (TypeError, ValueError):
                    plain = None
                if isinstance(plain, (str, int, float, bool)):
                    attrs[key] = plain
                else:
                    del attrs[key]

    clean(g.graph)
    for _, attrs in g.nodes(data=True):
        clean(attrs)
    for _, _, attrs in g.edges(data=True):
        clean(attrs)
