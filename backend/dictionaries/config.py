"""Typed settings of the dictionary steps: attention-output SAEs and MLP transcoders.

Presets (``backend.pipeline.config``) hold one of each; why the demo and full presets use the values they do is
written down, with the measurements, in ``docs/presets.md`` and in the docstrings of
:mod:`backend.dictionaries.attention_sae` and :mod:`backend.dictionaries.transcoder`.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class SaeConfig:
    """Attention-output SAEs (one per selected layer, on hook_z with all heads concatenated)."""

    train: bool = True  # train one SAE per selected layer (False: the step does nothing unless SAEs are imported)
    architecture: str = "topk"  # a sae-lens training architecture name
    expansion: float = 4.0  # d_sae = expansion x (n_heads x d_head): 576 -> 2304 on SmolLM2
    k: int = 32  # active features per token (TopK architectures)
    epochs: float = 3.0  # passes over the training tokens
    lr: float = 5e-3
    batch_size: int = 1024
    eval_contexts: int = 32  # last corpus contexts, held out for evaluation (x (n_ctx - 1) tokens)
    train_contexts: int | None = None  # cap on training contexts (None: all the others)
    threads: int | None = None  # torch threads while training (None: leave as is)


@dataclass(frozen=True)
class TranscoderConfig:
    """MLP transcoders (one per selected MLP layer), learned with sae-lens' trainer
    (:mod:`backend.dictionaries.transcoder_training`): BatchTopK features plus a linear skip path, Adam on streamed
    activations, initialised from data and from the dense linear baseline.

    Layers come from ``layers`` (not from ``--layers``: attribution graphs want every MLP replaced; a layer without a
    transcoder is one big error node). The last ``eval_contexts`` corpus contexts are held out (L0 / FVE / dead / the
    all-replaced rows with their intervals); per-layer CE uses the first ``ce_contexts`` of them (it costs ~n_layers
    forward passes per token).
    """

    train: bool = True
    layers: str = "all"
    architecture: str = "batchtopk"  # "batchtopk" or "topk" (both stored as sae-lens JumpReLU transcoders)
    skip: bool = True  # the linear skip path W_skip (a dense path in graphs, not a feature)
    expansion: float = 4.0  # d_sae = expansion x d_model: 576 -> 2304 on SmolLM2
    k: float = 32.0  # mean active features per token (each active feature becomes a graph node)
    epochs: float = 1.0  # passes over the training tokens
    lr: float = 3e-3
    batch_size: int = 256
    ridge: float = 1e-4  # relative ridge of the dense linear baseline (and the skip path's initialisation)
    # Rows whose MLP output norm exceeds this multiple of the layer's median are massive activations (attention-sink
    # positions: separators, some first tokens; SmolLM2 L11 / L28 reach 500x): not trained on, not scored, kept exact
    # when spliced. Frequent large outputs (e.g. " the" at SmolLM2 L2, 10-40x) stay the transcoder's job.
    massive_ratio: float = 50.0
    train_contexts: int | None = None  # cap on training contexts (None: all but the held-out ones)
    eval_contexts: int = 32
    ce_contexts: int | None = 4  # None: all held-out contexts
    threads: int | None = None
