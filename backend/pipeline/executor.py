"""Where a precompute's independent units of work run: in this process (``local``) or as Ray tasks (``ray``).

Steps hand the executor a module-level function and a list of work items (one layer's training data, one shard of
corpus contexts) with :meth:`Executor.imap`; results come back in the items' order, as soon as each is ready, and the
driver (the precompute process) writes them to the store: workers never open the store. Work that needs the model
is handed ``executor.model(model, name)`` and calls :func:`worker_model` on it: in this process that is the driver's
own model; a Ray task gets the name and loads the model once per worker process.

Ray is imported only when the Ray executor is built, so nothing else pays for it. Without ``address`` a local Ray is
started (``num_cpus``, no dashboard) and shut down by :meth:`RayExecutor.close`; with ``address`` (``ray start --head``
on a cluster, ``auto`` for the local one) the executor joins it and leaves it running.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, TypeVar

from backend.errors import InputError

T = TypeVar("T")

EXECUTORS = ("local", "ray")
# Environment variables a Ray worker needs to find the model cache and follow the driver's device choice.
_FORWARDED_ENV = ("CIRCUITSCOPE_CACHE_DIR", "CIRCUITSCOPE_DEVICE", "HF_HOME", "HF_HUB_OFFLINE")
_models: dict[str, Any] = {}  # model name -> loaded model, per worker process


def worker_model(model: Any) -> Any:
    """The model a unit of work runs: ``model`` itself, or, given a model name (a Ray task), that model loaded once
    per worker process."""
    if not isinstance(model, str):
        return model
    if model not in _models:
        from backend.model.registry import load_model

        _models[model] = load_model(model)
    return _models[model]


class LocalExecutor:
    """Runs every unit of work in this process, one after another."""

    name = "local"

    def imap(self, fn: Callable[..., T], items: Iterable[Any], **shared: Any) -> Iterator[T]:
        """``fn(item, **shared)`` for each item, in order (items are drawn one at a time, so a generator of large
        items holds only one)."""
        for item in items:
            yield fn(item, **shared)

    def split(self, items: list[T]) -> list[list[T]]:
        """How to group ``items`` into units of work: all in one here (shared work, such as a forward pass, is done
        once)."""
        return [items] if items else []

    def model(self, model: Any, name: str | None) -> Any:
        """What to hand a unit of work that needs the model: the loaded model itself."""
        return model

    def close(self) -> None:
        """Nothing to release."""


def _with_threads(item: Any, fn: Callable[..., T], threads: int, **shared: Any) -> T:
    """Run one unit of work with ``threads`` torch threads (a Ray worker otherwise has one): a float32 product's bits
    depend on how many threads share its sums, so this keeps Ray's results identical to the driver's own."""
    import torch

    torch.set_num_threads(threads)
    return fn(item, **shared)


def _unreachable(address: str | None) -> str:
    return (f"No Ray cluster answers at --ray-address {address!r}: start one with `ray start --head` there, or leave "
            "--ray-address out for a local Ray.")


def _check_reachable(address: str) -> None:
    """One InputError sentence unless something accepts a TCP connection at ``address`` (``[ray://]HOST:PORT``)
    within 5 seconds (``ray.init`` would retry for minutes before failing)."""
    import socket

    host, _, port = address.removeprefix("ray://").rpartition(":")
    if not host or not port.isdigit():
        raise InputError(f"--ray-address {address!r} is not HOST:PORT (e.g. 10.0.0.5:6379) or 'auto'.")
    try:
        socket.create_connection((host, int(port)), timeout=5).close()
    except OSError:
        raise InputError(_unreachable(address)) from None


class RayExecutor:
    """Runs units of work as Ray tasks (one CPU each, as many torch threads as the driver uses) on a local Ray or on
    the cluster at ``address``."""

    name = "ray"

    def __init__(self, address: str | None = None, num_cpus: int | None = None) -> None:
        import ray
        import torch

        self.threads = torch.get_num_threads()
        root = str(Path(__file__).resolve().parents[2])  # the project: workers import backend from it
        env = {k: os.environ[k] for k in _FORWARDED_ENV if k in os.environ}
        env["PYTHONPATH"] = os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH", "")) if p)
        self._owned = False
        if not ray.is_initialized():
            options: dict[str, Any] = {"runtime_env": {"env_vars": env}, "log_to_driver": False}
            try:
                if address:
                    ray.init(address=address, **options)
                else:
                    ray.init(num_cpus=num_cpus or 2, include_dashboard=False, **options)
            except (ConnectionError, TimeoutError):
                raise InputError(_unreachable(address)) from None
            self._owned = True
        self._task: Any = None

    def split(self, items: list[T]) -> list[list[T]]:
        """How to group ``items`` into units of work: one task each."""
        return [[item] for item in items]

    def model(self, model: Any, name: str | None) -> Any:
        """What to hand a unit of work that needs the model: its name (each worker loads it once)."""
        if not name:
            raise InputError("The Ray executor needs a model name its workers can load.")
        return name

    def imap(self, fn: Callable[..., T], items: Iterable[Any], **shared: Any) -> Iterator[T]:
        """``fn(item, **shared)`` for each item as Ray tasks, all submitted at once; results in the items' order.
        ``shared`` values go to Ray's object store once, not once per task."""
        import ray

        if self._task is None:
            self._task = ray.remote(num_cpus=1)(_with_threads)
        refs_shared = {k: ray.put(v) for k, v in shared.items()}
        refs = [self._task.remote(item, fn, self.threads, **refs_shared) for item in items]
        for ref in refs:
            yield ray.get(ref)

    def close(self) -> None:
        """Shut down the local Ray this executor started (a cluster it joined keeps running)."""
        import ray

        if self._owned and ray.is_initialized():
            ray.shutdown()
        self._owned = False


Executor = LocalExecutor | RayExecutor


def check_executor(name: str, address: str | None = None) -> None:
    """One InputError sentence for an unknown executor name, for ``address`` given without the Ray executor, or for a
    cluster address nothing answers at."""
    if name not in EXECUTORS:
        raise InputError(f"Unknown executor {name!r}: use one of {', '.join(EXECUTORS)}.")
    if address and name != "ray":
        raise InputError("--ray-address is for --executor ray: add --executor ray, or leave --ray-address out.")
    if address and address != "auto":
        _check_reachable(address)


def make_executor(name: str = "local", address: str | None = None, num_cpus: int | None = None) -> Executor:
    """The executor called ``name`` (:data:`EXECUTORS`; checked by :func:`check_executor`)."""
    check_executor(name, address)
    return RayExecutor(address, num_cpus) if name == "ray" else LocalExecutor()
