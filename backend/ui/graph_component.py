"""The Circuit Graph's browser component: ``backend/ui/components/circuit_graph`` (an HTML page and one script) plus
plotly.js from the installed ``plotly`` Python package, served by Streamlit from the same origin (no CDN, no network).

Streamlit serves a component only from files inside its directory, so the two repository files and the package's
``plotly.min.js`` are copied once into a directory under the cache (again whenever one of them changes).
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from typing import Any

from backend.paths import CACHE_DIR

SOURCE = Path(__file__).resolve().parent / "components" / "circuit_graph"
NAME = "circuit_graph"
_component: Any = None


def _plotly_js() -> Path:
    import plotly

    return Path(plotly.__file__).resolve().parent / "package_data" / "plotly.min.js"


def staged_dir() -> Path:
    """The served directory: the component's files and plotly.min.js, copied under the cache when they changed."""
    files = [SOURCE / "index.html", SOURCE / "graph.js", _plotly_js()]
    stamp = hashlib.sha1(json.dumps([[str(f), f.stat().st_mtime_ns, f.stat().st_size] for f in files]).encode()
                         ).hexdigest()[:12]
    target = CACHE_DIR / "components" / f"{NAME}-{stamp}"
    if not (target / "plotly.min.js").exists():
        tmp = target.with_name(target.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        for f in files:
            shutil.copy2(f, tmp / f.name)
        try:
            tmp.rename(target)
        except OSError:  # another session staged it at the same moment
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def circuit_graph(graph: dict[str, Any], state: dict[str, Any], graph_key: str, height: int, key: str) -> Any:
    """Draw ``graph`` (:func:`backend.circuits.view.payload`) in the browser at ``state``
    (:meth:`backend.circuits.view.ViewState.to_dict`); returns the component's last value: ``{"event", "nonce",
    "state", "selection", "supernode"}`` or None before the first interaction."""
    global _component
    import streamlit.components.v1 as components

    if _component is None:
        _component = components.declare_component(NAME, path=str(staged_dir()))
    rev = hashlib.sha1(json.dumps(state, sort_keys=True).encode()).hexdigest()[:16]
    return _component(graph=graph, state=state, rev=rev, height=height, graph_key=graph_key, key=key, default=None)
