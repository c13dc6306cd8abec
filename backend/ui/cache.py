"""What a server keeps between runs and sessions: store queries per store version, the shared model, dictionaries and
per-prompt analyses (Streamlit caches; heavy imports happen only inside the functions that need them)."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, TypeVar

import pandas as pd
import streamlit as st

from backend.model.shared import SharedModel
from backend.store import queries, readers
from backend.store.access import fingerprint, open_store, reading
from backend.store.names import resolve_store

log = logging.getLogger("circuitscope.ui")
T = TypeVar("T")


@dataclass(frozen=True)
class StoreRef:
    """One version of one store file: ``key`` (inode, mtime, size) changes when a precompute swaps a new file in,
    which is what makes every cached query below pick up new runs while the server keeps running."""

    name: str
    path: Path
    key: tuple[int, ...]  # the store file and its saves: what query results depend on

    @property
    def file_key(self) -> tuple[int, ...]:
        """The store file alone (saves never change dictionaries): the key of cached dictionaries."""
        return self.key[:3]

    def query(self, fn: Callable[..., T], *args: Any) -> T:
        """``fn(con, *args)`` on a read-only connection to this store, cached per store version: ``fn`` is a query
        function of a capability's queries module (e.g. ``backend.features.queries.feature_summary``)."""
        return _cached_query(str(self.path), self.key, f"{fn.__module__}.{fn.__qualname__}", args, fn)

    def summary(self) -> dict[str, Any]:
        """:func:`backend.store.queries.summary` of this store (cached per store version)."""
        return self.query(queries.summary)


def open_store_ref(name: str, directory: Path | None = None) -> StoreRef:
    """Resolve ``name`` and check the file is a readable store; StoreError (one sentence) otherwise."""
    path = resolve_store(name, directory)
    if not path.exists():
        open_store(path).close()  # raises the "No store at ...: build one with ..." message
    fp = fingerprint(path)
    ref = StoreRef(name=name, path=path, key=fp.key)
    ref.summary()  # validates (corrupt / newer schema raise StoreError; errors are not cached)
    return ref


@st.cache_data(show_spinner=False, max_entries=256)
def _cached_query(path: str, key: tuple[int, ...], name: str, args: tuple[Any, ...], _fn: Callable[..., Any]) -> Any:
    # `key` is part of the cache key, so a swapped-in store misses the cache; it also picks the store version's pool
    # of open connections (opening one costs more than a feature page's queries: backend/store/readers.py).
    # `_fn` is not hashed (leading underscore); `name`, its qualified name, stands for it in the cache key.
    del name
    with readers.pool(path, key).connection() as con:
        return _fn(con, *args)


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


@st.cache_data(show_spinner=False, max_entries=32)
def cached_predictions(model_name: str, ids: tuple[int, ...], k: int = 5) -> pd.DataFrame:
    """:func:`backend.model.predict.next_token_predictions` for the cached model, memoised per (model, token ids)."""
    from backend.model.predict import next_token_predictions

    return next_token_predictions(get_model(model_name), ids, k)


@st.cache_resource(show_spinner=False, max_entries=16)
def get_dictionary(store_path: str, store_key: tuple[int, ...], dict_id: str) -> Any:
    """Load one dictionary (a sae-lens SAE) from a store once per server and store version (``StoreRef.key``).

    The SAE is shared by all sessions: callers must not modify it.
    """
    from backend.dictionaries.storage import load_dictionary

    with reading(store_path) as con:
        return load_dictionary(con, dict_id)


@st.cache_resource(show_spinner=False, max_entries=4)
def cached_graph_dictionaries(store_path: str, store_key: tuple[int, ...], model: str,
                              attn_saes: bool) -> tuple[dict[int, Any], dict[int, Any]]:
    """The store's transcoders and (if ``attn_saes``) attention SAEs for ``model`` by layer
    (:func:`backend.dictionaries.storage.graph_dictionaries`), loaded once per server and store version; shared and
    read-only, like :func:`get_dictionary`."""
    from backend.dictionaries.storage import graph_dictionaries

    with reading(store_path) as con:
        return graph_dictionaries(con, model, attn_saes=attn_saes)


@st.cache_resource(show_spinner=False, max_entries=4)  # an entry holds attention patterns: ~30 MB at 512 tokens
def cached_prompt_features(model_name: str, ids: tuple[int, ...], store_path: str, store_key: tuple[int, ...],
                           layer_dicts: tuple[tuple[int, str], ...], top_n: int) -> Any:
    """:func:`backend.features.live.analyze_prompt` for the cached model and the store's SAEs, memoised per
    (model, token ids, store version, (layer, dict_id) pairs). Shared and read-only, like the SAEs."""
    from backend.features.live import analyze_prompt

    saes = {layer: get_dictionary(store_path, store_key, dict_id) for layer, dict_id in layer_dicts}
    return analyze_prompt(get_model(model_name), saes, ids, top_n=top_n)


@st.cache_resource(show_spinner=False, max_entries=4)
def cached_transcoder_features(model_name: str, ids: tuple[int, ...], store_path: str, store_key: tuple[int, ...],
                               top_n: int) -> Any:
    """:func:`backend.features.live.analyze_transcoders` for the cached model and the store's transcoders, memoised
    per (model, token ids, store version). Shared and read-only."""
    from backend.features.live import analyze_transcoders

    transcoders, _ = cached_graph_dictionaries(store_path, store_key, model_name, False)
    return analyze_transcoders(get_model(model_name), transcoders, ids, top_n=top_n)


@st.cache_data(show_spinner=False, max_entries=32)
def cached_intervention(model_name: str, store_path: str, store_key: tuple[int, ...], prompt: str | bytes, spec: str,
                        mode: str, answer: str | None, wrong: str | None, top_k: int, continue_tokens: int,
                        max_tokens: int) -> Any:
    """:func:`backend.interventions.run.intervene_on_prompt` on the cached model with the store's transcoders and
    attention SAEs, memoised per request (a link opened twice, or a rerun, does not run the model again)."""
    from backend.interventions.run import intervene_on_prompt

    transcoders, saes = cached_graph_dictionaries(store_path, store_key, model_name, True)
    return intervene_on_prompt(get_model(model_name), prompt, spec, transcoders, saes, mode=mode, answer=answer,
                               wrong=wrong, top_k=top_k, continue_tokens=continue_tokens, max_tokens=max_tokens)


@st.cache_resource(show_spinner=False, max_entries=8)
def cached_graph(model_name: str, store_path: str, store_key: tuple[int, ...], prompt: str,
                 answer: str | None = None) -> Any:
    """:func:`backend.circuits.build.build_graph` of ``prompt`` (unpruned) with the store's transcoders and attention
    SAEs, built once per server, store version and (prompt, answer). Shared and read-only."""
    from backend.circuits.build import build_graph
    from backend.features.labels import label_nodes

    transcoders, saes = cached_graph_dictionaries(store_path, store_key, model_name, True)
    graph = build_graph(get_model(model_name), prompt, transcoders, saes, answer=answer, model_name=model_name)
    with reading(store_path) as con:
        graph.nodes = label_nodes(con, graph.nodes)  # the features' labels (yours, else automatic)
    return graph
