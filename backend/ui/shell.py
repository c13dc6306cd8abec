"""The page shell shared by ``app.py`` and ``pages/*.py``: sidebar store and model pickers, URL state, the page wrapper
that turns any failure into one sentence.

State model (deep links): the URL's query parameters are the source of truth when a session starts —
``?store=demo.duckdb&model=smollm2-135m`` plus page-specific keys (e.g. ``prompt``, ``pos``). Every run writes the
current choices back into ``st.query_params`` so the address bar is always a link to what is on screen. Plain
``st.session_state`` keys (``_cs_store``, ``_cs_model``) carry the choices across page switches, which clear the
query parameters.

Only pages that run the model import torch / transformer_lens (lazily, through :mod:`backend.ui.cache`), so pages
that only read the store start fast.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import pandas as pd
import streamlit as st

from backend.errors import CircuitscopeError, StoreError, literal
from backend.paths import stores_dir
from backend.store.names import default_store_name, list_stores, resolve_store
from backend.ui.cache import StoreRef, open_store_ref

log = logging.getLogger("circuitscope.ui")
if not logging.getLogger("circuitscope").handlers:
    # Streamlit configures only its own loggers: without a handler of our own, INFO lines (model loads) would never
    # reach the server log.
    _handler = logging.StreamHandler()
    _handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.getLogger("circuitscope").addHandler(_handler)
    logging.getLogger("circuitscope").setLevel(logging.INFO)

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
# Untrusted values in messages and links
#
# Every st.error / st.warning / st.info / st.markdown / st.caption body is markdown. A value from the URL, from typed
# text or from a store is shown through literal() (a code span: nothing in it is markup, so no image is fetched and no
# link is drawn) or, for a store's longer prose, through prose(). Numbers from the URL go through link_int().

_LINK_INT = re.compile(r"-?[0-9]{1,15}")  # ASCII digits: str.isdigit() accepts '²' and int() accepts '٣' or '1_0'
# Inline markup, links, images, HTML, Streamlit's :directives[...] and $math$ (block markers such as "-" or "+" only
# matter at the start of a line, handled in prose()).
_MARKDOWN_PUNCTUATION = re.compile(r"([\\`*_{}\[\]()<>#!|~$:&])")


def link_int(raw: str | None) -> int | None:
    """A whole number from a link parameter (``?pos=3``), or None when it is absent or not one: optional minus sign
    and at most 15 ASCII digits (larger numbers are out of every range here, and float64 holds them exactly)."""
    if raw is None or not _LINK_INT.fullmatch(raw.strip()):
        return None
    return int(raw.strip())


def prose(text: object, limit: int = 2_000) -> str:
    """Longer untrusted text (a rule or description stored in a store) for a markdown body, readable but inert: every
    markdown / HTML punctuation character is backslash-escaped, so ``![x](http://...)`` cannot become an image and
    ``<img>`` no tag; a bare URL may still show as a link, but nothing is fetched until someone clicks it."""
    flat = re.sub(r"[\x00-\x1f\x7f\u2028\u2029]+", " ", str(text))[:limit]
    escaped = _MARKDOWN_PUNCTUATION.sub(r"\\\1", flat)
    # A list marker or an ordered-list number at the very start would turn the line into a list.
    return re.sub(r"^([-+=]|\d+(?=[.)]))", lambda m: "\\" + m.group(1) if not m.group(1).isdigit()
                  else m.group(1) + "\\", escaped)


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
    from backend.model.registry import REGISTRY  # cheap: the registry imports torch lazily

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
    st.sidebar.caption(literal(store.path, 400))
    return PageContext(store=store, summary=summary, model=model, model_info=info)


def saves_offered() -> bool:
    """Whether a page may offer to save; in a read-only deployment it says so in place of the save control."""
    from backend.store.access import READ_ONLY_MESSAGE, read_only

    if read_only():
        st.caption(READ_ONLY_MESSAGE)
        return False
    return True


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
    """The precompute command that (re)builds the current store for the current model, as a markdown code span (the
    model name and the path come from the store and the file system: literal text, whatever they hold)."""
    model = ctx.model or "smollm2-135m"
    return literal(f"python -m backend precompute --model {model} --store {ctx.store.path}", 400)


# --------------------------------------------------------------------------------------------------------------
# Untrusted token text -> HTML


# --------------------------------------------------------------------------------------------------------------
# The live model (Prompt Explorer)


# --------------------------------------------------------------------------------------------------------------
# Progress


# --------------------------------------------------------------------------------------------------------------
# Attention SAEs, live (Prompt Explorer)


