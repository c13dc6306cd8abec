"""One loaded model shared by every session of a server, used by one session at a time."""

from __future__ import annotations

import contextlib
import inspect
import threading
from typing import Any, Iterator


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
