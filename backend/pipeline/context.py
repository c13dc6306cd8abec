"""What every precompute step receives: :class:`RunContext`."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from backend.pipeline.config import Preset
from backend.pipeline.executor import Executor, LocalExecutor

if TYPE_CHECKING:
    import duckdb
    import torch
    from transformer_lens import HookedTransformer

    from backend.inputs.corpus import Contexts
    from backend.model.registry import ModelSpec
    from backend.store.access import StoreWriter

Site = tuple[str, int]  # (hook kind of backend.model.hooks, layer)
Unit = tuple[str, "int | None"]  # a unit of work: (step, layer), layer None for a whole step


class RunObserver(Protocol):
    """Told what a run will do and each unit of work it finishes (the background improvement mirrors them into a
    status file the app reads: the staging copy itself is locked by the run's writer)."""

    def started(self, run_id: str, plan: list[Unit], done: list[Unit]) -> None:
        """The run ``run_id`` opened its staging copy; ``plan`` lists its units in order, ``done`` those an
        interrupted run had already finished."""

    def finished(self, step: str, layer: int | None) -> None:
        """``step`` (its ``layer``, or all of it when None) finished and is durable."""


@dataclass
class RunContext:
    """The loaded model, the run's writer, the preset and the parsed options; steps add what later steps read."""

    model: "HookedTransformer"
    spec: "ModelSpec"
    writer: "StoreWriter"
    preset: Preset
    layers: list[int]  # attention-SAE layers (``--layers`` or the preset's)
    corpus_source: str
    corpus_id: str = ""
    contexts: "Contexts | None" = None  # set by the corpus step
    sae_sources: list[str] = field(default_factory=list)  # --saes: import these instead of training
    transcoder_layers: list[int] = field(default_factory=list)  # --transcoder-layers or the preset's
    transcoder_sources: list[str] = field(default_factory=list)  # --transcoders: import these instead of training
    summary: dict[str, Any] = field(default_factory=dict)
    # Activations an earlier step collected that a later one may reuse instead of a forward pass:
    # {(hook kind, layer): [n * (n_ctx - 1), d]} over the first n corpus contexts (backend.model.activations layout).
    precollected: "dict[Site, torch.Tensor] | None" = None
    # Units of work this run already finished ((step, layer or None) -> (info, safetensors state or None)): a resumed
    # run skips them and rebuilds what they left in memory from this and from the tables they wrote.
    units: "dict[tuple[str, int | None], tuple[dict[str, Any], bytes | None]]" = field(default_factory=dict)
    # Where independent units of work (a layer's training or evaluation, a shard of feature scoring) run.
    executor: Executor = field(default_factory=LocalExecutor)
    observer: RunObserver | None = None  # told of each finished unit

    @property
    def con(self) -> "duckdb.DuckDBPyConnection":
        """The run's writable connection."""
        assert self.writer.con is not None
        return self.writer.con

    def done(self, step: str, layer: int | None = None) -> bool:
        """Whether this run already finished ``step`` (its ``layer`` when given), before an interruption."""
        return (step, layer) in self.units

    def unit_info(self, step: str, layer: int | None = None) -> dict[str, Any]:
        """The JSON facts a finished unit recorded (:meth:`finish`)."""
        return self.units[(step, layer)][0]

    def unit_tensors(self, step: str, layer: int | None = None) -> "dict[str, torch.Tensor]":
        """The tensors a finished unit recorded (:meth:`finish`), on the CPU."""
        from safetensors.torch import load

        state = self.units[(step, layer)][1]
        return {} if state is None else load(state)

    def finish(self, step: str, layer: int | None = None, info: dict[str, Any] | None = None,
               tensors: "dict[str, torch.Tensor] | None" = None) -> None:
        """Record that ``step`` (its ``layer``, or all of it) finished, with the facts (JSON) and tensors a resumed run
        needs from it, and make the run's writes so far durable."""
        from safetensors.torch import save

        import json

        info = json.loads(json.dumps(info or {}, default=str))  # as a resumed run reads it back
        state = save({k: v.detach().cpu().contiguous() for k, v in tensors.items()}) if tensors else None
        self.writer.finish_unit(step, layer, info, state)
        self.units[(step, layer)] = (info, state)
        if self.observer is not None:
            self.observer.finished(step, layer)

    @property
    def run_id(self) -> str:
        """The id of the run being written."""
        return self.writer.run_id
