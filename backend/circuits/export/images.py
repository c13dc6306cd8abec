"""SVG and PNG images of the graph figure: kaleido 1.x drives Debian's chromium (``make browser``).

Starting chromium takes seconds, so one kaleido browser is started on first use and reused for every later image
(:func:`close_renderer` stops it; it is also stopped at exit).
"""

from __future__ import annotations

import asyncio
import atexit
import os
import threading
from typing import TYPE_CHECKING, Any

from backend.circuits.figure import figure
from backend.circuits.graph import Graph
from backend.errors import CircuitscopeError

if TYPE_CHECKING:
    import plotly.graph_objects as go

CHROMIUM = "/usr/bin/chromium"  # Debian's package (``make browser``); kaleido would otherwise try to download one


START_TIMEOUT_S = 120.0  # chromium's cold start is ~5 s idle, much more on a loaded 2-core machine


RENDER_TIMEOUT_S = 120.0


BROWSER_MISSING = ("Static image export needs the chromium browser, which is not installed: run `make browser` "
                   "(or `apt-get install chromium`) and try again.")


class _Renderer:
    """One kaleido browser on its own event-loop thread, reused for every image.

    Not kaleido's own ``start_sync_server``: its worker thread dies silently when the browser fails to start and
    the next ``calc_fig_sync`` then waits forever on its queue; here every call has a timeout and a failure resets
    the renderer so the next call starts a fresh browser.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._kaleido: Any = None
        self._atexit = False

    def _start(self) -> None:
        import kaleido

        loop = asyncio.new_event_loop()
        thread = threading.Thread(target=loop.run_forever, name="circuitscope-kaleido", daemon=True)
        thread.start()

        async def open_browser() -> Any:
            # mathjax=False: the default loads MathJax from a CDN, which cannot work offline.
            k = kaleido.Kaleido(n=1, path=CHROMIUM, mathjax=False, timeout=RENDER_TIMEOUT_S)
            await k.open()
            return k

        self._loop, self._thread = loop, thread
        try:
            self._kaleido = asyncio.run_coroutine_threadsafe(open_browser(), loop).result(timeout=START_TIMEOUT_S)
        except BaseException:
            self._shutdown()
            raise
        if not self._atexit:
            atexit.register(self.close)
            self._atexit = True

    def render(self, fig: "go.Figure | dict[str, Any]", opts: dict[str, Any]) -> bytes:
        """The image bytes of ``fig`` (``opts``: kaleido's format / width / height / scale)."""
        _require_browser()
        from choreographer.errors import ChromeNotFoundError

        with self._lock:
            try:
                if self._kaleido is None:
                    self._start()
                assert self._loop is not None
                future = asyncio.run_coroutine_threadsafe(self._kaleido.calc_fig(fig, opts=opts), self._loop)
                return future.result(timeout=RENDER_TIMEOUT_S + 5)
            except ChromeNotFoundError as exc:
                self._shutdown()
                raise CircuitscopeError(BROWSER_MISSING) from exc
            except BaseException:
                self._shutdown()  # a broken browser is not reused
                raise

    def close(self) -> None:
        """Stop the browser (a later :meth:`render` starts a new one)."""
        with self._lock:
            self._shutdown()

    def _shutdown(self) -> None:
        loop, kaleido_, thread = self._loop, self._kaleido, self._thread
        self._loop, self._kaleido, self._thread = None, None, None
        if loop is None:
            return
        if kaleido_ is not None:
            try:
                asyncio.run_coroutine_threadsafe(kaleido_.close(), loop).result(timeout=30)
            except Exception:  # noqa: BLE001 - best effort: the process may already be gone
                pass
        loop.call_soon_threadsafe(loop.stop)
        if thread is not None:
            thread.join(timeout=10)
        if not loop.is_running():
            loop.close()


_RENDERER = _Renderer()


def _require_browser() -> None:
    if not (os.path.isfile(CHROMIUM) and os.access(CHROMIUM, os.X_OK)):
        raise CircuitscopeError(BROWSER_MISSING)


def render_figure(fig: "go.Figure", fmt: str = "svg", width: int | None = None, height: int | None = None,
                  scale: float = 1.0) -> bytes:
    """Any plotly figure as ``fmt`` ("svg", "png", "pdf", ...) bytes, through the shared kaleido browser.

    Width and height default to the figure's layout size. Raises :class:`CircuitscopeError` (one sentence: run
    ``make browser``) when chromium is missing.
    """
    opts: dict[str, Any] = {"format": fmt, "scale": scale}
    w = width or fig.layout.width
    h = height or fig.layout.height
    if w:
        opts["width"] = int(w)
    if h:
        opts["height"] = int(h)
    return _RENDERER.render(fig, opts)


def close_renderer() -> None:
    """Stop the shared chromium used for images (it restarts on the next image)."""
    _RENDERER.close()


def to_svg(graph: Graph, width: int | None = None, height: int | None = None, **figure_kwargs: Any) -> str:
    """The graph's figure (:func:`backend.circuits.figure.figure`; ``figure_kwargs`` go there) as SVG text."""
    return render_figure(figure(graph, **figure_kwargs), "svg", width, height).decode("utf-8")


def to_png(graph: Graph, width: int | None = None, height: int | None = None, scale: float = 2,
           **figure_kwargs: Any) -> bytes:
    """The graph's figure as PNG bytes; ``scale`` multiplies the pixel size (2 = sharp on high-DPI screens)."""
    return render_figure(figure(graph, **figure_kwargs), "png", width, height, scale)
