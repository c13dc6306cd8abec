"""Streamlit-side helpers shared by ``app.py`` and ``pages/*.py``: store and model pickers, cached store queries,
error handling, the live model, safe token HTML and a progress bar sink.

State model (deep links): the URL's query parameters are the source of truth when a session starts —
``?store=demo.duckdb&model=smollm2-135m`` plus page-specific keys (e.g. ``prompt``, ``pos``). Every run writes the
current choices back into ``st.query_params`` so the address bar is always a link to what is on screen. Plain
``st.session_state`` keys (``_cs_store``, ``_cs_model``) carry the choices across page switches, which clear the
query parameters.

Only the Prompt Explorer needs a model: torch / transformer_lens are imported lazily inside :func:`get_model` and
:func:`next_token_predictions`, so pages that only read the store start fast.
"""

from __future__ import annotations

import contextlib
import html
import inspect
import logging
import math
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import pandas as pd
import streamlit as st

from backend.store import queries
from backend.errors import CircuitscopeError, StoreError
from backend.paths import stores_dir
from backend.progress import ProgressSink
from backend.store.access import fingerprint, open_store, reading

log = logging.getLogger("circuitscope.ui")
if not logging.getLogger("circuitscope").handlers:
    # Streamlit configures only its own loggers: without a handler of our own, INFO lines (model loads) would never
    # reach the server log.
    _handler = logging.StreamHandler()
    _handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.getLogger("circuitscope").addHandler(_handler)
    logging.getLogger("circuitscope").setLevel(logging.INFO)

# Environment overrides, read at call time (not import time) so tests and servers can point the app elsewhere.
STORE_ENV = "CIRCUITSCOPE_STORE"  # store file name opened when the URL names none (default: demo.duckdb)
DEFAULT_STORE_NAME = "demo.duckdb"

# Prompts longer than this are not written into the page link (unwieldy links; browsers cap URL length).
MAX_LINK_CHARS = 2_000
STORE_PARAM = "store"
MODEL_PARAM = "model"
_STORE_WIDGET = "cs_store_picker"
_MODEL_WIDGET = "cs_model_picker"
_KEEP_STORE = "_cs_store"  # plain session keys survive page switches (widget state does not)
_KEEP_MODEL = "_cs_model"
_REFUSED = "_cs_store_refused"

# --------------------------------------------------------------------------------------------------------------
# Stores: where they live, which name means which file


def default_store_name() -> str:
    """Store opened when the URL names none: ``$CIRCUITSCOPE_STORE`` or the demo store."""
    return os.environ.get(STORE_ENV) or DEFAULT_STORE_NAME


def list_stores(directory: Path | None = None) -> list[str]:
    """Names (relative to the stores directory) of every ``*.duckdb`` store there, the default one first."""
    directory = directory or stores_dir()
    if not directory.is_dir():
        return []
    # Hidden files are a writer's temporaries (backend.store.StoreWriter): never offer them.
    names = sorted(p.name for p in directory.glob("*.duckdb") if p.is_file() and not p.name.startswith("."))
    default = default_store_name()
    return sorted(names, key=lambda n: n != default)


def resolve_store(name: str, directory: Path | None = None) -> Path:
    """Map a store name from the URL or the picker to a file INSIDE the stores directory, or raise StoreError.

    The name is untrusted (anyone can edit a link): absolute paths, ``..`` and symlinks that leave the directory
    are refused, so a link can never make the server open an arbitrary file.
    """
    directory = (directory or stores_dir()).resolve()
    name = name.strip()
    if not name:
        raise StoreError("No store was named: choose one in the sidebar.")
    candidate = Path(name)
    if not candidate.is_absolute():
        candidate = directory / candidate
    resolved = candidate.resolve()
    if not resolved.is_relative_to(directory) or resolved == directory:
        raise StoreError(
            f"The store {name!r} is outside the stores directory {directory}: "
            "only stores in that directory can be opened; choose one in the sidebar."
        )
    if resolved.suffix != ".duckdb":
        raise StoreError(f"The store {name!r} is not a .duckdb file: choose a store in the sidebar.")
    return resolved


@dataclass(frozen=True)
class StoreRef:
    """One version of one store file: ``key`` (inode, mtime, size) changes when a precompute swaps a new file in,
    which is what makes every cached query below pick up new runs while the server keeps running."""

    name: str
    path: Path
    key: tuple[int, int, int]

    def query(self, fn: str, *args: Any) -> Any:
        """``backend.queries.<fn>(con, *args)`` on this store, cached per store version."""
        return _cached_query(str(self.path), self.key, fn, args)

    def summary(self) -> dict[str, Any]:
        """:func:`backend.queries.summary` of this store (cached per store version)."""
        return self.query("summary")


def open_store_ref(name: str, directory: Path | None = None) -> StoreRef:
    """Resolve ``name`` and check the file is a readable store; StoreError (one sentence) otherwise."""
    path = resolve_store(name, directory)
    if not path.exists():
        open_store(path).close()  # raises the "No store at ...: build one with ..." message
    fp = fingerprint(path)
    ref = StoreRef(name=name, path=path, key=(fp.inode, fp.mtime_ns, fp.size))
    ref.summary()  # validates (corrupt / newer schema raise StoreError; errors are not cached)
    return ref


@st.cache_data(show_spinner=False, max_entries=256)
def _cached_query(path: str, key: tuple[int, int, int], fn: str, args: tuple[Any, ...]) -> Any:
    # `key` is unused in the body on purpose: it is part of the cache key, so a swapped-in store misses the cache.
    del key
    with reading(path) as con:
        return getattr(queries, fn)(con, *args)


# --------------------------------------------------------------------------------------------------------------
# Sidebar pickers and the page wrapper


@dataclass
class PageContext:
    """What a page body gets: the chosen store, its summary and the chosen model (None if the store has none)."""

    store: StoreRef
    summary: dict[str, Any]
    model: str | None
    model_info: dict[str, Any] = field(default_factory=dict)


def set_param(name: str, value: str | None) -> None:
    """Set (or, for None, remove) one query parameter of the page's link; writes only on change."""
    if value is None:
        if name in st.query_params:
            del st.query_params[name]
    elif st.query_params.get(name) != value:
        st.query_params[name] = value


def _on_store_change() -> None:
    choice = st.session_state.get(_STORE_WIDGET)
    st.session_state[_KEEP_STORE] = choice
    st.session_state.pop(_REFUSED, None)
    set_param(STORE_PARAM, choice)


def _on_model_change() -> None:
    choice = st.session_state.get(_MODEL_WIDGET)
    st.session_state[_KEEP_MODEL] = choice
    set_param(MODEL_PARAM, choice)


def store_picker() -> StoreRef | None:
    """Sidebar store picker. Shows a clear st.error and returns None when the chosen store cannot be used."""
    ss = st.session_state
    if _STORE_WIDGET not in ss:
        # First run on this page: URL, then the choice carried from another page, then the default store.
        initial = st.query_params.get(STORE_PARAM) or ss.get(_KEEP_STORE) or default_store_name()
        try:
            resolve_store(initial)
        except StoreError as exc:
            ss[_REFUSED] = str(exc)
            initial = None
        ss[_STORE_WIDGET] = initial
    choice: str | None = ss[_STORE_WIDGET]
    options = list_stores()
    if choice is not None and choice not in options:
        options = [choice, *options]  # a missing store stays selected, so its error message makes sense
    st.sidebar.selectbox(
        "Store", options, key=_STORE_WIDGET, on_change=_on_store_change, placeholder="Choose a store",
        help=f"Stores are the *.duckdb files in {stores_dir()}.",
    )
    if choice is None:
        st.error(ss.get(_REFUSED) or "No store is chosen: choose one in the sidebar.")
        return None
    ss[_KEEP_STORE] = choice
    set_param(STORE_PARAM, choice)
    return open_store_ref(choice)


def _pickable_models(models_df: pd.DataFrame) -> list[str]:
    from backend.model.registry import REGISTRY  # cheap: backend.models imports torch lazily

    names = [str(m) for m in models_df["model"]] if len(models_df) else []
    real = [n for n in names if not (n in REGISTRY and REGISTRY[n].testing)]
    # Test models are hidden when the store has a real one; a store with only test models still shows them.
    return real or names


def model_picker(models_df: pd.DataFrame) -> str | None:
    """Sidebar picker over the models recorded in the store; None when the store has none."""
    options = _pickable_models(models_df)
    if not options:
        return None
    ss = st.session_state
    wanted = ss.get(_MODEL_WIDGET) if _MODEL_WIDGET in ss else (st.query_params.get(MODEL_PARAM) or ss.get(_KEEP_MODEL))
    ss[_MODEL_WIDGET] = wanted if wanted in options else options[0]  # e.g. the store changed under a choice
    st.sidebar.selectbox("Model", options, key=_MODEL_WIDGET, on_change=_on_model_change)
    choice = ss[_MODEL_WIDGET]
    ss[_KEEP_MODEL] = choice
    set_param(MODEL_PARAM, choice)
    return choice


def page_context() -> PageContext | None:
    """Render the sidebar pickers and return the page's context, or None after showing why there is none."""
    store = store_picker()
    if store is None:
        return None
    summary = store.summary()
    models_df: pd.DataFrame = summary["models"]
    model = model_picker(models_df)
    info: dict[str, Any] = {}
    if model is not None:
        row = models_df[models_df["model"] == model]
        info = row.iloc[0].to_dict() if len(row) else {}
    st.sidebar.caption(f"`{store.path}`")
    return PageContext(store=store, summary=summary, model=model, model_info=info)


UNEXPECTED = "Something unexpected went wrong while drawing this page ({kind}); the server log has the details."


def show_exception(exc: BaseException) -> None:
    """Show an exception as one sentence: CircuitscopeError verbatim, anything else as a short notice (and log it)."""
    if isinstance(exc, CircuitscopeError):
        st.error(str(exc))
    else:
        log.error("page failed", exc_info=exc)
        st.error(UNEXPECTED.format(kind=type(exc).__name__))


def _route_through_app() -> None:
    """Make a deep link that is a fresh server's *first* request go through ``app.py``'s ``st.navigation``.

    Streamlit keeps a process-wide "uses the pages/ directory" flag (v1 multipage compatibility) that is cleared
    only once ``st.navigation`` has run; until then it runs a deep-linked page file on its own, with the raw
    pages/ listing as sidebar and without app.py. Clearing the flag (private API, checked on Streamlit 1.67) and
    rerunning sends this run through app.py, which routes to the same URL path.
    """
    from streamlit.runtime.pages_manager import PagesManager
    from streamlit.runtime.scriptrunner import get_script_run_ctx

    run_ctx = get_script_run_ctx()
    main = Path(run_ctx.pages_manager.main_script_path) if run_ctx is not None else None
    if PagesManager.uses_pages_directory and main is not None and main.name == "app.py":
        PagesManager.uses_pages_directory = False
        st.rerun()


def run_page(title: str, body: Callable[[PageContext], None], caption: str | None = None) -> None:
    """Draw a page: title, sidebar pickers, then ``body(ctx)`` — never a traceback in the UI.

    User errors (CircuitscopeError) are shown verbatim with st.error; st.stop / st.rerun pass through untouched
    (they are BaseException, not Exception).
    """
    _route_through_app()
    st.title(title)
    if caption:
        st.caption(caption)
    try:
        ctx = page_context()
        if ctx is None:
            return
        body(ctx)
    except Exception as exc:  # noqa: BLE001 - the UI must show one sentence, whatever failed
        show_exception(exc)


def build_hint(ctx: PageContext) -> str:
    """The precompute command that (re)builds the current store for the current model."""
    model = ctx.model or "smollm2-135m"
    return f"python -m backend precompute --model {model} --store {ctx.store.path}"


# --------------------------------------------------------------------------------------------------------------
# Untrusted token text -> HTML


def visible_token(text: str) -> str:
    """Token text with newlines and tabs made visible (for tables and the token strip)."""
    return text.replace("\r", "\\r").replace("\n", "↵").replace("\t", "⇥")


def token_strip_html(strings: Sequence[str], values: Sequence[float] | None = None, vmax: float | None = None,
                     label: str = "value") -> str:
    """HTML of tokens side by side, each shaded by its value (e.g. next-token loss); NaN values stay unshaded.

    Token text is untrusted (it comes from user prompts and corpora): every token and tooltip is escaped with
    html.escape, so ``<script>`` shows as text and never runs.
    """
    vals = list(values) if values is not None else [math.nan] * len(strings)
    finite = [v for v in vals if v is not None and math.isfinite(v)]
    top = vmax if vmax is not None else (max(finite) if finite else 1.0)
    top = top if top > 0 else 1.0
    spans = []
    for i, (s, v) in enumerate(zip(strings, vals)):
        ok = v is not None and math.isfinite(v)
        alpha = min(1.0, max(0.0, v / top)) if ok else 0.0
        tip = f"pos {i}" + (f" · {label} {v:.3f}" if ok else "")
        spans.append(
            f'<span title="{html.escape(tip, quote=True)}" style="background: rgba(230, 85, 13, {alpha:.2f}); '
            f'border: 1px solid rgba(128,128,128,.35); border-radius: 3px; padding: 1px 2px; margin: 1px; '
            f'white-space: pre; display: inline-block; font-family: monospace;">{html.escape(visible_token(s), quote=True)}</span>'
        )
    return '<div style="line-height: 1.9; word-wrap: break-word;">' + "".join(spans) + "</div>"


# --------------------------------------------------------------------------------------------------------------
# The live model (Prompt Explorer)


# Longest prompt (in tokens, BOS included) the Prompt Explorer runs. Measured on 2 loaded cores with SmolLM2-135M:
# 256 tokens ~1.1 s, 512 ~2.2 s, 2048 (its full context) ~67 s — far too slow for an interactive page.
EXPLORER_MAX_TOKENS = 512


class SharedModel:
    """A model shared by every session of the server, used by one session at a time.

    TransformerLens hooks live on the model's modules, so two sessions running it at once see each other's hooks:
    activations cached from the other session's prompt, outputs patched by another page's experiment, crashes when
    one session's cleanup removes the other's hooks (all seen with ten concurrent Prompt Explorer sessions). Every
    method call through this wrapper — a forward pass, ``run_with_cache``, ``run_with_hooks``, and the whole body of
    ``with model.hooks(...)`` — holds one re-entrant lock; attributes (cfg, tokenizer, weights, blocks) pass through.
    """

    def __init__(self, model: Any) -> None:
        object.__setattr__(self, "_model", model)
        object.__setattr__(self, "_lock", threading.RLock())

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._model, name)
        if name == "hooks":
            return self._hooks
        if inspect.ismethod(attr):
            def locked(*args: Any, **kwargs: Any) -> Any:
                with self._lock:
                    return attr(*args, **kwargs)
            return locked
        return attr

    def __setattr__(self, name: str, value: Any) -> None:
        setattr(self._model, name, value)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        with self._lock:
            return self._model(*args, **kwargs)

    @contextlib.contextmanager
    def _hooks(self, *args: Any, **kwargs: Any) -> Iterator["SharedModel"]:
        with self._lock, self._model.hooks(*args, **kwargs):
            yield self

    def __repr__(self) -> str:
        return f"SharedModel({self._model.cfg.model_name!r})"


@st.cache_resource(show_spinner=False, max_entries=2)
def get_model(name: str) -> SharedModel:
    """Load a model once per server process, shared by all sessions (see :class:`SharedModel`); heavy imports
    happen only here."""
    from backend.model.registry import load_model

    t0 = time.perf_counter()
    model = load_model(name)
    # One line per load: the server log shows that sessions share one model (tests/e2e counts these lines).
    log.info("loaded model %s in %.1f s", name, time.perf_counter() - t0)
    return SharedModel(model)


def next_token_predictions(model: Any, ids: Sequence[int], k: int = 5) -> pd.DataFrame:
    """One forward pass: per position, the token, the loss of the actual next token and the top-k predictions.

    Columns: pos, token, token_id, next_token, loss (NaN at the last position: nothing follows it), top_tokens,
    top_probs (lists of length k, best first).
    """
    import torch

    tokenizer = model.tokenizer
    with torch.inference_mode():
        logits = model(torch.tensor([list(ids)], dtype=torch.long), return_type="logits")[0].float()
    logprobs = logits.log_softmax(dim=-1)
    n = len(ids)
    loss = [math.nan] * n
    if n > 1:
        nxt = torch.tensor(list(ids[1:]), dtype=torch.long)
        loss[:-1] = (-logprobs[:-1].gather(-1, nxt[:, None])[:, 0]).tolist()
    top = logprobs.topk(k, dim=-1)
    top_ids = top.indices.tolist()
    top_probs = top.values.exp().tolist()
    decoded: dict[int, str] = {}

    def dec(i: int) -> str:
        if i not in decoded:
            decoded[i] = tokenizer.decode([i])
        return decoded[i]

    return pd.DataFrame({
        "pos": list(range(n)),
        "token": [dec(i) for i in ids],
        "token_id": list(ids),
        "next_token": [dec(i) for i in ids[1:]] + [""],
        "loss": loss,
        "top_tokens": [[dec(i) for i in row] for row in top_ids],
        "top_probs": top_probs,
    })


@st.cache_data(show_spinner=False, max_entries=32)
def cached_predictions(model_name: str, ids: tuple[int, ...], k: int = 5) -> pd.DataFrame:
    """:func:`next_token_predictions` for the cached model, memoised per (model, token ids)."""
    return next_token_predictions(get_model(model_name), ids, k)


# --------------------------------------------------------------------------------------------------------------
# Progress


def format_eta(seconds: float | None) -> str:
    """Short human ETA: '<1 s', '42 s', '3 min 05 s', '1 h 02 min'."""
    if seconds is None or not math.isfinite(seconds):
        return "?"
    s = int(round(seconds))
    if s < 1:
        return "<1 s"
    if s < 60:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60} min {s % 60:02d} s"
    return f"{s // 3600} h {(s % 3600) // 60:02d} min"


def st_progress_sink(container: Any = None) -> ProgressSink:
    """A sink for :func:`backend.progress.using_sink` that drives one st.progress bar (text with count and ETA).

    ``with using_sink(st_progress_sink()): precompute(...)`` shows the backend's progress in the page.
    """
    bar = (container if container is not None else st).progress(0.0, text="Starting…")
    state = {"frac": 0.0}

    def sink(desc: str, done: int, total: int, eta: float | None) -> None:
        if total > 0:
            state["frac"] = min(1.0, max(0.0, done / total))
            text = f"{desc}: {done:,}/{total:,}"
            if done < total:
                text += f" · ETA {format_eta(eta)}"
        else:  # a status message from backend.progress.say: keep the bar where it is
            text = desc
        bar.progress(state["frac"], text=text)

    return sink


# --------------------------------------------------------------------------------------------------------------
# Attention SAEs, live (Prompt Explorer; engineer C)


@st.cache_resource(show_spinner=False, max_entries=16)
def get_dictionary(store_path: str, store_key: tuple[int, int, int], dict_id: str) -> Any:
    """Load one dictionary (a sae-lens SAE) from a store once per server and store version (``StoreRef.key``).

    The SAE is shared by all sessions: callers must not modify it.
    """
    from backend.dictionaries.attention_sae import load_dictionary  # imports sae_lens: only pages that need an SAE pay for it

    with reading(store_path) as con:
        return load_dictionary(con, dict_id)


@st.cache_resource(show_spinner=False, max_entries=4)
def store_dictionaries(store_path: str, store_key: tuple[int, int, int], model: str,
                       attn_saes: bool) -> tuple[dict[int, Any], dict[int, Any]]:
    """The store's transcoders and (if ``attn_saes``) attention SAEs for ``model`` by layer
    (:func:`backend.circuits.storage.store_dictionaries`), loaded once per server and store version; shared and
    read-only, like :func:`get_dictionary`."""
    from backend.circuits.storage import store_dictionaries as load

    with reading(store_path) as con:
        return load(con, model, attn_saes=attn_saes)


@st.cache_resource(show_spinner=False, max_entries=4)  # an entry holds attention patterns: ~30 MB at 512 tokens
def cached_prompt_features(model_name: str, ids: tuple[int, ...], store_path: str, store_key: tuple[int, int, int],
                           layer_dicts: tuple[tuple[int, str], ...], top_n: int) -> Any:
    """:func:`backend.feature_analysis.analyze_prompt` for the cached model and the store's SAEs, memoised per
    (model, token ids, store version, (layer, dict_id) pairs). Shared and read-only, like the SAEs."""
    from backend.features.live import analyze_prompt

    saes = {layer: get_dictionary(store_path, store_key, dict_id) for layer, dict_id in layer_dicts}
    return analyze_prompt(get_model(model_name), saes, ids, top_n=top_n)


def signed_token_strip_html(strings: Sequence[str], values: Sequence[float], label: str = "value",
                            vmax: float | None = None) -> str:
    """Like :func:`token_strip_html` for signed values: positive shades red, negative blue (NaN unshaded).

    Token text and tooltips are escaped with html.escape (token text is untrusted).
    """
    vals = [float(v) if v is not None else math.nan for v in values]
    finite = [abs(v) for v in vals if math.isfinite(v)]
    top = vmax if vmax is not None else (max(finite) if finite else 1.0)
    top = top if top > 0 else 1.0
    spans = []
    for i, (s, v) in enumerate(zip(strings, vals)):
        ok = math.isfinite(v)
        alpha = min(1.0, abs(v) / top) if ok else 0.0
        rgb = "214, 39, 40" if ok and v >= 0 else "31, 119, 180"
        tip = f"pos {i}" + (f" · {label} {v:+.3f}" if ok else "")
        spans.append(
            f'<span title="{html.escape(tip, quote=True)}" style="background: rgba({rgb}, {alpha:.2f}); '
            f'border: 1px solid rgba(128,128,128,.35); border-radius: 3px; padding: 1px 2px; margin: 1px; '
            f'white-space: pre; display: inline-block; font-family: monospace;">'
            f'{html.escape(visible_token(s), quote=True)}</span>'
        )
    return '<div style="line-height: 1.9; word-wrap: break-word;">' + "".join(spans) + "</div>"
