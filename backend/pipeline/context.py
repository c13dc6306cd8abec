"""What every precompute step receives: :class:`RunContext`."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from backend.pipeline.config import Preset

if TYPE_CHECKING:
    import duckdb
    import torch
    from transformer_lens import HookedTransformer

    from backend.inputs.corpus import Contexts
    from backend.model.registry import ModelSpec
    from backend.store.access import StoreWriter

Site = tuple[str, int]  # (hook kind of backend.model.hooks, layer)


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

    @property
    def con(self) -> "duckdb.DuckDBPyConnection":
        """The run's writable connection."""
        assert self.writer.con is not None
        return self.writer.con

    @property
    def run_id(self) -> str:
        """The id of the run being written."""
        return self.writer.run_id
