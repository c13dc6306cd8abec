"""Real-browser harness shared by the end-to-end tests (tests/e2e) and the concurrency benchmark
(benchmarks/e2e_bench.py): start and stop ``streamlit run app.py`` on a free 127.0.0.1 port, drive Debian's chromium
through Playwright, and wait on Streamlit pages by what they show rather than by sleeping.

Streamlit marks its root element ``[data-testid="stApp"]`` with ``data-test-script-state`` ("running",
"notRunning", ...): a page is ready when that says "notRunning" and the expected content is on screen.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import socket
import statistics
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator
from urllib.parse import parse_qs, urlencode, urlparse

ROOT = Path(__file__).resolve().parents[2]
ARTIFACTS = ROOT / "test-artifacts" / "e2e"  # git-ignored: screenshots and server logs
CHROMIUM = Path("/usr/bin/chromium")
# Offline machine: no QUIC, no background fetches (updates, sync, component downloads); no GPU; root needs
# --no-sandbox.
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]
NO_CHROMIUM = (f"Chromium is not installed at {CHROMIUM}: run `make browser` (installs Debian's chromium and "
               "chromium-driver; `make test` runs it for you). Never `playwright install`: it downloads a browser.")
VIEWPORT = {"width": 1400, "height": 2000}  # tall: Streamlit scrolls inside its own container, not the document
PAGE_TIMEOUT_MS = 120_000  # a page's first render on a loaded 2-core machine imports torch / transformer_lens
SERVER_TIMEOUT_S = 120.0
BOS = "<|im_start|>"  # tiny-llama uses SmolLM2's tokenizer and BOS
READY = '[data-testid="stApp"][data-test-script-state="notRunning"]'
UNEXPECTED = "Something unexpected went wrong"  # backend.ui.UNEXPECTED: an exception the page caught
CORRUPT_STORE = "corrupt.duckdb"  # bad stores the e2e stores directory holds (tests/e2e/conftest.py)
ESCAPING_LINK = "elsewhere.duckdb"  # a symlink to a store outside the stores directory
MODEL_LOADED = re.compile(r"circuitscope\.ui: loaded model (\S+)")  # backend.ui.get_model's log line


def chromium_problem() -> str | None:
    """None when the browser and Playwright are usable, else one sentence saying what to run."""
    if not os.access(CHROMIUM, os.X_OK):
        return NO_CHROMIUM
    try:
        import playwright  # noqa: F401
    except ImportError:
        return "Playwright for Python is missing: run `make setup` (it installs requirements.txt)."
    return None


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now (the server binds it a moment later)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# --------------------------------------------------------------------------------------------------------------
# The server


@dataclass
class StreamlitServer:
    """``streamlit run app.py`` serving ``stores_dir`` (opening ``store`` by default), its output in ``log_path``.

    ``bind_flag=False`` leaves ``--server.address`` out, to check what the project's config binds to by default;
    ``extra_args`` are appended to the command (e.g. ``["--server.allowedHosts", "*"]``), ``env`` added to its
    environment (e.g. ``{"CIRCUITSCOPE_READ_ONLY": "1"}``). Use as a context manager: the
    server is stopped on exit, also when a test fails.
    """

    stores_dir: Path
    store: str
    log_path: Path
    port: int = field(default_factory=free_port)
    bind_flag: bool = True
    extra_args: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)
    proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = SERVER_TIMEOUT_S) -> "StreamlitServer":
        """Start the server and wait until its health endpoint answers; RuntimeError (with the log) otherwise."""
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, "-m", "streamlit", "run", "app.py", "--server.port", str(self.port),
               "--server.headless", "true"]
        if self.bind_flag:
            cmd[4:4] = ["--server.address", "127.0.0.1"]
        cmd += self.extra_args
        env = {**os.environ, "CIRCUITSCOPE_STORES_DIR": str(self.stores_dir), "CIRCUITSCOPE_STORE": self.store,
               "PYTHONUNBUFFERED": "1", **self.env}
        with open(self.log_path, "wb") as log:
            # Own process group: stop() ends the server and anything it started, and nothing else.
            self.proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                                         start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"streamlit exited with status {self.proc.returncode}:\n{self.log_tail()}")
            try:
                with urllib.request.urlopen(f"{self.url}/_stcore/health", timeout=5) as resp:
                    if resp.read().strip() == b"ok":
                        return self
            except OSError:
                pass
            time.sleep(0.25)
        self.stop()
        raise RuntimeError(f"streamlit did not answer on {self.url} within {timeout:.0f} s:\n{self.log_tail()}")

    def stop(self) -> None:
        """Terminate the server's process group (SIGTERM, then SIGKILL after 15 s)."""
        if self.proc is None or self.proc.poll() is not None:
            return
        try:
            os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=15)
        except ProcessLookupError:
            pass

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def log_tail(self, n: int = 40) -> str:
        return "\n".join(self.log().splitlines()[-n:])

    def model_loads(self) -> list[str]:
        """Model names in the order the server loaded them (one entry per load, from backend.ui's log line)."""
        return MODEL_LOADED.findall(self.log())

    def __enter__(self) -> "StreamlitServer":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()


def websocket_handshake(port: int, host: str, origin: str | None) -> str:
    """Open Streamlit's WebSocket (``/_stcore/stream``) on 127.0.0.1:``port`` with these ``Host`` and ``Origin``
    headers, as a browser on a DNS-rebinding page would send them; returns the status line of the server's answer
    ("HTTP/1.1 101 Switching Protocols" when the connection is accepted) or "" when it closed without one."""
    import base64

    key = base64.b64encode(os.urandom(16)).decode()
    lines = ["GET /_stcore/stream HTTP/1.1", f"Host: {host}", "Upgrade: websocket", "Connection: Upgrade",
             f"Sec-WebSocket-Key: {key}", "Sec-WebSocket-Version: 13", "Sec-WebSocket-Protocol: streamlit"]
    if origin is not None:
        lines.append(f"Origin: {origin}")
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode())
        answer = b""
        while b"\r\n" not in answer:
            chunk = sock.recv(4096)
            if not chunk:
                break
            answer += chunk
    return answer.split(b"\r\n", 1)[0].decode(errors="replace") if answer else ""


def page_url(base: str, path: str = "", **params: str) -> str:
    """``base/path?params`` (path is a page's URL path such as ``prompt_explorer``; "" is Home)."""
    return f"{base}/{path}" + (f"?{urlencode(params)}" if params else "")


def query_param(url: str, name: str) -> str | None:
    """One query parameter of a URL (None when absent)."""
    values = parse_qs(urlparse(url).query).get(name)
    return values[0] if values else None


# --------------------------------------------------------------------------------------------------------------
# One browser tab (sync API, the tests)


@dataclass
class Tab:
    """A Playwright page on the test server, recording every JavaScript dialog (there must be none) and every request
    that leaves 127.0.0.1 (the app must work offline)."""

    page: Any  # playwright.sync_api.Page
    base_url: str
    dialogs: list[str] = field(default_factory=list)
    external: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        def on_dialog(dialog: Any) -> None:
            self.dialogs.append(f"{dialog.type}: {dialog.message}")
            dialog.dismiss()

        def on_request(request: Any) -> None:
            host = urlparse(request.url).hostname
            if request.url.startswith("http") and host not in ("127.0.0.1", "localhost"):
                self.external.append(request.url)

        self.page.on("dialog", on_dialog)
        self.page.on("request", on_request)

    def open(self, path: str = "", **params: str) -> None:
        """Navigate to a page of the app and wait until its first run has finished."""
        self.page.goto(page_url(self.base_url, path, **params))
        self.wait_ready()

    def wait_ready(self) -> None:
        """Wait until a title is drawn and no script run is in progress."""
        self.page.wait_for_selector(f'{READY} [data-testid="stMain"] h1', state="visible")

    def title(self) -> str:
        return self.page.locator('[data-testid="stMain"] h1').first.inner_text().strip()

    def problems(self) -> list[str]:
        """What must never be on screen: Streamlit exception boxes and the app's 'something unexpected' notice."""
        out = [f"exception box: {t}" for t in self.page.locator('[data-testid="stException"]').all_inner_texts()]
        out += [f"unexpected error: {t}" for t in self.alerts("Error") if UNEXPECTED in t]
        return out

    def alerts(self, kind: str) -> list[str]:
        """Texts of the st.error / st.warning / st.info boxes in the main area (kind: Error, Warning, Info)."""
        sel = f'[data-testid="stMain"] [data-testid="stAlertContent{kind}"]'
        return [t.strip() for t in self.page.locator(sel).all_inner_texts()]

    def wait_for_alert(self, kind: str, text: str) -> str:
        """Wait for a st.error / st.warning / st.info box containing ``text``; returns its whole text."""
        box = self.page.locator(f'[data-testid="stMain"] [data-testid="stAlertContent{kind}"]', has_text=text)
        box.first.wait_for(state="visible")
        self.wait_idle()
        return box.first.inner_text().strip()

    def wait_idle(self) -> None:
        self.page.wait_for_selector(READY, state="attached")

    def metric(self, label: str) -> str:
        """The value shown by the st.metric with this label."""
        m = self.page.locator('[data-testid="stMetric"]', has=self.page.locator('[data-testid="stMetricLabel"]',
                                                                                has_text=label))
        return m.first.locator('[data-testid="stMetricValue"]').inner_text().strip()

    def screenshot(self, name: str) -> Path:
        """Save a PNG of the viewport under the artifacts directory."""
        path = ARTIFACTS / f"{re.sub(r'[^A-Za-z0-9_.-]+', '_', name)[:120]}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        self.page.screenshot(path=str(path))
        return path


# --------------------------------------------------------------------------------------------------------------
# Prompt Explorer, as a user drives it (JS snippets shared by the sync tests and the async benchmark driver)

# Text of the first token strip (st.html): the prompt's tokens, one span each.
STRIP_JS = """() => { const h = document.querySelector('[data-testid="stMain"] [data-testid="stHtml"]');
                      return h ? h.innerText : null; }"""
# Cells of the n-th st.dataframe as rows of texts. glide-data-grid keeps an accessible copy of the cells it draws,
# which are only the rows and columns in view: use it for what a user sees first, not for whole tables.
GRID_JS = """(n) => { const g = document.querySelectorAll('[data-testid="stMain"] [data-testid="stDataFrame"]')[n];
  if (!g) return null;
  const rows = {};
  for (const c of g.querySelectorAll('[data-testid^="glide-cell-"]')) {
    const [, col, row] = c.dataset.testid.match(/glide-cell-(\\d+)-(\\d+)/);
    (rows[row] = rows[row] || [])[+col] = c.innerText; }
  return Object.keys(rows).sort((a, b) => a - b).map(r => rows[r]); }"""
# The feature heatmap (layers x tokens) as plotly holds it: its hover texts list every token's top features per
# layer (what a user sees on hover), its x labels the tokens ("pos: token", HTML-escaped for plotly).
HEATMAP_JS = """() => {
  for (const el of document.querySelectorAll('[data-testid="stMain"] .js-plotly-plot')) {
    const d = el.data && el.data[0], title = ((el.layout || {}).title || {}).text || '';
    if (d && d.type === 'heatmap' && title.includes('Strongest attention-SAE feature')) {
      const plain = s => { const t = document.createElement('textarea'); t.innerHTML = s; return t.value; };
      return {layers: d.y, hover: d.text,
              tokens: el.layout.xaxis.ticktext.map(s => plain(s.slice(s.indexOf(': ') + 2)))}; } }
  return null; }"""
PROMPT_BOX = '[data-testid="stMain"] [data-testid="stTextArea"] textarea'
# An exception box or an error message: the run is over, whatever else we wait for will not come.
FAILED_JS = """() => !!document.querySelector(
    '[data-testid="stException"], [data-testid="stMain"] [data-testid="stAlertContentError"]')"""
# The run for prompt `want` is on screen: the token strip and the heatmap's tokens both spell it (or the run failed).
RESULT_JS = f"""(want) => ({FAILED_JS})() || (({STRIP_JS})() === want &&
    ((h) => !!h && h.tokens.join('') === want)(({HEATMAP_JS})()))"""
FEATURE = re.compile(r"#(\d+): (-?\d+\.\d+)")


def expected_strip(prompt: str) -> str:
    """What the token strip shows for an ASCII prompt without newlines: BOS, then the text (tokens decode back)."""
    return BOS + prompt


def submit_prompt(tab: Tab, prompt: str) -> None:
    """Type a prompt into the Prompt Explorer's text area and run it (Ctrl+Enter, as a user would)."""
    box = tab.page.locator(PROMPT_BOX)
    box.fill(prompt)
    box.press("Control+Enter")


def wait_for_strip(tab: Tab, text: str) -> None:
    """Wait until the token strip shows exactly ``text`` and the run has finished; fail at once with what is on
    screen if the page shows an error instead."""
    tab.page.wait_for_function(f"(want) => ({FAILED_JS})() || ({STRIP_JS})() === want", arg=text)
    tab.wait_idle()
    assert tab.problems() == [] and tab.alerts("Error") == []
    assert tab.page.evaluate(STRIP_JS) == text


Features = dict[str, list[list[tuple[int, float]]]]  # layer label ("L1") -> per position -> (feature, activation)


def parse_heatmap(heatmap: dict[str, Any] | None) -> Features | None:
    """Per layer and position, the top features listed in the heatmap's hover text (BOS: none)."""
    if not heatmap:
        return None
    return {str(layer): [[(int(f), float(a)) for f, a in FEATURE.findall(cell)] for cell in row]
            for layer, row in zip(heatmap["layers"], heatmap["hover"])}


def prompt_features(tab: Tab, text: str) -> Features:
    """The per-token features of the prompt on screen, once the heatmap shows that prompt (``text``: BOS + prompt)."""
    tab.page.wait_for_function(RESULT_JS, arg=text)
    tab.wait_idle()
    assert tab.problems() == [] and tab.alerts("Error") == []
    features = parse_heatmap(tab.page.evaluate(HEATMAP_JS))
    assert features is not None
    return features


def feature_rows(tab: Tab, tokens: list[str]) -> list[list[str]]:
    """The visible rows of the Prompt Explorer's per-token feature table (the second dataframe: pos, token, then
    one column per SAE layer), once its token column spells ``tokens``: the grid redraws its cells a frame or more
    after the run ends, so until then it can still show the previous prompt's rows."""
    tab.page.wait_for_function(
        f"""(want) => {{ const r = ({GRID_JS})(1);
            return !!r && r.length > 1 && r.every((row, i) => i < want.length && row[1] === want[i]); }}""",
        arg=tokens)
    return tab.page.evaluate(GRID_JS, 1)


# --------------------------------------------------------------------------------------------------------------
# Many sessions at once (async API: one browser, one context per simulated user)


@dataclass
class SessionResult:
    """What one simulated user typed and saw."""

    prompt: str
    seconds: float  # from pressing Ctrl+Enter to the prompt's tokens and features on screen
    strip: str | None
    tokens_shown: str | None  # the Tokens metric
    features: Features | None
    problems: list[str]
    dialogs: list[str]

    @property
    def correct(self) -> bool:
        """The session shows its own prompt's tokens, features at every token after BOS, and nothing went wrong."""
        feats = self.features or {}
        return (self.strip == expected_strip(self.prompt) and not self.problems and not self.dialogs
                and bool(feats) and all(len(row) == int(self.tokens_shown or 0) and all(row[1:])
                                        for row in feats.values()))


async def _prompt_session(browser: Any, base_url: str, prompt: str, screenshot: Path | None) -> SessionResult:
    context = await browser.new_context(viewport=VIEWPORT)
    context.set_default_timeout(PAGE_TIMEOUT_MS * 3)  # ten sessions share two cores
    page = await context.new_page()
    dialogs: list[str] = []

    async def on_dialog(dialog: Any) -> None:
        dialogs.append(dialog.message)
        await dialog.dismiss()

    page.on("dialog", on_dialog)
    try:
        await page.goto(page_url(base_url, "prompt_explorer"))
        await page.wait_for_selector(f'{READY} {PROMPT_BOX}', state="visible")
        box = page.locator(PROMPT_BOX)
        await box.fill(prompt)
        t0 = time.perf_counter()
        await box.press("Control+Enter")
        await page.wait_for_function(RESULT_JS, arg=expected_strip(prompt))
        await page.wait_for_selector(READY, state="attached")
        seconds = time.perf_counter() - t0
        problems = [f"exception box: {t}" for t in
                    await page.locator('[data-testid="stException"]').all_inner_texts()]
        problems += [t for t in await page.locator('[data-testid="stAlertContentError"]').all_inner_texts()]
        tokens = page.locator('[data-testid="stMetric"]', has=page.locator('[data-testid="stMetricLabel"]',
                                                                           has_text="Tokens"))
        result = SessionResult(prompt, seconds, await page.evaluate(STRIP_JS),
                               (await tokens.first.locator('[data-testid="stMetricValue"]').inner_text()).strip(),
                               parse_heatmap(await page.evaluate(HEATMAP_JS)), problems, dialogs)
        if screenshot is not None:
            await page.screenshot(path=str(screenshot))
        return result
    finally:
        await context.close()


async def _sessions(base_url: str, prompts: list[str], shots: Path | None) -> list[SessionResult]:
    from playwright.async_api import async_playwright

    async with async_playwright() as pw:
        # launch() gives the browser a fresh temporary user-data-dir; each new_context is a separate profile.
        browser = await pw.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True)
        try:
            return list(await asyncio.gather(*[
                _prompt_session(browser, base_url, p, shots / f"concurrent-{i:02d}.png" if shots else None)
                for i, p in enumerate(prompts)]))
        finally:
            await browser.close()


def run_prompt_sessions(base_url: str, prompts: list[str], screenshots: Path | None = None) -> list[SessionResult]:
    """One browser context per prompt, all at once: each opens the Prompt Explorer, types its prompt and waits for
    its tokens and features. Runs in its own thread, so it works beside a sync Playwright session."""
    from concurrent.futures import ThreadPoolExecutor

    if screenshots is not None:
        screenshots.mkdir(parents=True, exist_ok=True)
    with ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, _sessions(base_url, prompts, screenshots)).result()


def distinct_prompts(n: int) -> list[str]:
    """``n`` different ASCII prompts (each one's tokens show which session an answer belongs to)."""
    animals = ["fox", "heron", "badger", "otter", "lynx", "wren", "hare", "stoat", "newt", "crane", "moth", "vole"]
    places = ["river", "meadow", "old bridge", "orchard", "harbour", "quarry", "chapel", "mill", "forest", "market"]
    return [f"Session {i}: the {animals[i % len(animals)]} crossed the {places[i % len(places)]} at {i + 3} o'clock"
            for i in range(n)]


def percentiles(values: list[float]) -> dict[str, float]:
    """p50 / p95 / max of a list of seconds (linear interpolation, like numpy's default)."""
    xs = sorted(values)
    if len(xs) == 1:
        return {"p50_s": round(xs[0], 2), "p95_s": round(xs[0], 2), "max_s": round(xs[0], 2)}
    q = statistics.quantiles(xs, n=100, method="inclusive")
    return {"p50_s": round(q[49], 2), "p95_s": round(q[94], 2), "max_s": round(xs[-1], 2)}


# --------------------------------------------------------------------------------------------------------------
# The Circuit Graph's browser component (backend/ui/components/circuit_graph): its iframe, what it draws, and timing
# a control inside it.

DRAWN_JS = "() => (window.circuitGraph && window.circuitGraph()) || null"


def graph_frame(tab: Tab, timeout_s: float = PAGE_TIMEOUT_MS / 1000) -> Any:
    """The Circuit Graph component's frame once it has drawn (Streamlit serves components under /component/)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        for frame in tab.page.frames:
            if "/component/" in frame.url and "circuit_graph" in frame.url:
                try:
                    if frame.evaluate(DRAWN_JS):
                        return frame
                except Exception:  # noqa: BLE001 - the frame is still loading
                    pass
        tab.page.wait_for_timeout(100)  # not time.sleep: Playwright's sync API learns of new frames only while waiting
    raise AssertionError("the circuit graph component never drew")


def drawn(frame: Any) -> dict[str, Any]:
    """What the component draws right now: node / edge counts, node ids, supernode names, the labels written on the
    graph, search matches, the draw time (ms) and its view state."""
    return frame.evaluate(DRAWN_JS)


def move_and_time(frame: Any, control: str, value: str) -> dict[str, Any]:
    """Set a control of the component (``nt``, ``et``: the sliders; ``q``: the search) as a user's input event does,
    and return what is drawn right after, synchronously, with ``wall_ms``: from the event to the redrawn graph
    (nothing in between can have reached the server)."""
    return frame.evaluate("""([id, value]) => {
        const el = document.getElementById(id); const t0 = performance.now();
        el.value = value; el.dispatchEvent(new Event('input'));
        return Object.assign({}, window.circuitGraph(), {wall_ms: performance.now() - t0}); }""", [control, value])


def click_and_time(frame: Any, button: str) -> dict[str, Any]:
    """Click a button of the component (``pin``, ``hide``, ``unhide``, ...) and time its redraw (as move_and_time)."""
    return frame.evaluate("""(id) => { const t0 = performance.now(); document.getElementById(id).click();
        return Object.assign({}, window.circuitGraph(), {wall_ms: performance.now() - t0}); }""", button)


def emit(frame: Any, event: str, ids: list[str]) -> None:
    """Fire plotly's click (one id) or box/lasso selection (several) event on the graph, as a user's gesture does."""
    frame.evaluate("""([event, ids]) => document.getElementById('plot').emit(event,
        {points: ids.map((id) => ({customdata: id}))})""", [event, ids])

# The n-th heatmap with clickable cells (backend.ui.heatmap_clicks): each cell's page position, its id and row label.
CELLS_JS = """(n) => {
  const plots = [...document.querySelectorAll('[data-testid="stMain"] .js-plotly-plot')]
    .filter(el => el.data && el.data.some(t => t.name === 'heads') && el.getBoundingClientRect().width > 0);
  const el = plots[n]; if (!el) return null;
  const t = el.data.find(t => t.name === 'heads'), fl = el._fullLayout, r = el.getBoundingClientRect();
  return t.x.map((x, i) => ({x: r.left + fl.xaxis._offset + fl.xaxis.d2p(x),
                             y: r.top + fl.yaxis._offset + fl.yaxis.d2p(t.y[i]), id: t.customdata[i],
                             row: String(t.y[i])})); }"""


def tab_on(browser_context: Any, url: str, name: str) -> Iterator[Tab]:
    """A fresh browser tab (a fresh Streamlit session) on the server at ``url``; its screenshot is saved as ``name``
    when the test ends, and the test fails if any JavaScript dialog opened."""
    page = browser_context.new_page()
    t = Tab(page, url)
    try:
        yield t
    finally:
        try:
            t.screenshot(name)
        finally:
            page.close()
    if t.dialogs:  # checked after every test: no input may ever make the page run script
        import pytest

        pytest.fail(f"a JavaScript dialog opened: {t.dialogs}", pytrace=False)
