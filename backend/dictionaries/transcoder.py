"""Sparse transcoders per MLP layer (Dunefsky et al. 2024; ``docs/methods.md`` §2): the model-side operations.

Conventions the rest of the code relies on:

* A transcoder is a sae-lens inference transcoder — ``JumpReLUSkipTranscoder`` (what circuitscope trains, see
  :mod:`backend.dictionaries.transcoder_training`), ``JumpReLUTranscoder``, ``Transcoder`` / ``SkipTranscoder`` (ReLU;
  imports) — CPU float32, eval mode, ``apply_b_dec_to_input=False``. It reads the MLP's normalised input
  ``x = blocks.L.ln2.hook_normalized`` (``hook_name("mlp_in", L)``: resid_mid divided by its RMS scale, *without* the
  norm weight ``ln2.w``; for LayerNorm models also mean-centred) and predicts the MLP's output
  ``y = blocks.L.hook_mlp_out``: ``f = act(x·W_enc + b_enc)``, ``ŷ = f·W_dec + b_dec`` (+ ``x·W_skipᵀ`` for a skip
  transcoder: a dense linear path, not a feature). :func:`transcode` returns ŷ whatever the class.
* Decoder rows have unit norm, so a feature's activation is the size of what it writes into the residual stream.
* **Sink positions and massive activations.** BOS (position 0) and every document separator token are attention
  sinks (:func:`sink_positions`), and at some layers a few other positions (a context's first token) join them: their
  MLP outputs are hundreds of times larger than any other token's (SmolLM2 layers 11 and 28: ~20 of 8128 tokens held
  91–99.6% of the output variance; "massive activations"). Sinks, and rows whose output norm exceeds
  ``massive_ratio`` × the layer's median training norm (:func:`massive_norm`, stored with each transcoder), are never
  trained on or scored, and :func:`splice_hooks` leaves the real MLP output there, as it does at BOS.
* Stored in the ``dictionaries`` table with ``kind = 'transcoder'``, ``hook_name`` = the input hook, weights as a
  safetensors blob (:mod:`backend.dictionaries.storage`; sae-lens' ``SAE.from_dict`` rebuilds the class from its
  config's ``architecture``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, Iterable, Mapping, Sequence

from backend.dictionaries.kinds import TRANSCODER
from backend.errors import InputError
from backend.model.activations import ResidualCarry, collect
from backend.model.hooks import hook_name, parse_hook_name

if TYPE_CHECKING:
    import torch
    from sae_lens import Transcoder

KIND = TRANSCODER
DEFAULT_ARCHITECTURE = "transcoder"  # the sae-lens ReLU class :func:`new_transcoder` builds for tests

# ------------------------------------------------------------------------------------------------------------
# Names, construction, encoding


def transcoder_dict_id(model_name: str, layer: int, architecture: str, d_sae: int) -> str:
    """Stable dictionary id, e.g. ``"smollm2-135m/L3/mlp/transcoder-2304"``."""
    return f"{model_name}/L{int(layer)}/mlp/{architecture}-{int(d_sae)}"


def new_transcoder(d_in: int, d_sae: int, d_out: int, architecture: str = DEFAULT_ARCHITECTURE,
                   metadata: Mapping[str, Any] | None = None) -> "Transcoder":
    """An untrained sae-lens transcoder of ``architecture`` ("transcoder", "skip_transcoder", or any sae-lens
    transcoder inference architecture), CPU float32, eval mode, metadata filled from ``metadata``."""
    import sae_lens  # noqa: F401 - importing registers the classes
    from sae_lens.registry import SAE_CLASS_REGISTRY

    if architecture not in SAE_CLASS_REGISTRY or "transcoder" not in architecture:
        known = sorted(a for a in SAE_CLASS_REGISTRY if "transcoder" in a)
        raise InputError(f"Unknown transcoder architecture {architecture!r}: use one of {', '.join(known)}.")
    cls, cfg_cls = SAE_CLASS_REGISTRY[architecture]
    cfg = cfg_cls(d_in=int(d_in), d_sae=int(d_sae), d_out=int(d_out), apply_b_dec_to_input=False)
    for key, value in (metadata or {}).items():
        setattr(cfg.metadata, key, value)
    return cls(cfg).eval()


def make_random_transcoder(d_in: int, d_sae: int, d_out: int, seed: int = 0, l0: float = 8.0,
                           out_scale: float = 1.0, architecture: str = DEFAULT_ARCHITECTURE) -> "Transcoder":
    """A random transcoder for tests and development (no training).

    Encoder columns are random unit vectors and every encoder bias is ``−t`` with ``P(N(0,1) > t) = l0/d_sae``.
    For an RMS-normalised input (``‖x‖² = d_in``, what ``ln2.hook_normalized`` gives) the pre-activation of a
    random unit direction is N(0, 1) across directions whatever ``x`` is, so about ``l0`` features fire on every
    real token, with varied strengths. Decoder rows are random unit vectors times ``out_scale``; ``b_dec`` is 0.
    """
    import torch

    gen = torch.Generator().manual_seed(seed)
    w_enc = torch.randn(d_in, d_sae, generator=gen)
    w_enc = w_enc / w_enc.norm(dim=0, keepdim=True)
    w_dec = torch.randn(d_sae, d_out, generator=gen)
    w_dec = out_scale * w_dec / w_dec.norm(dim=1, keepdim=True)
    p = min(max(float(l0) / d_sae, 1e-6), 0.5)
    threshold = float(torch.distributions.Normal(0.0, 1.0).icdf(torch.tensor(1.0 - p)))
    tc = new_transcoder(d_in, d_sae, d_out, architecture)
    with torch.no_grad():
        tc.W_enc.copy_(w_enc)
        tc.W_dec.copy_(w_dec)
        tc.b_enc.fill_(-threshold)
        tc.b_dec.zero_()
    return tc.eval()


def encode(tc: "Transcoder", x: "torch.Tensor") -> "torch.Tensor":
    """Feature activations ``[..., d_sae]`` of MLP inputs ``x`` ``[..., d_in]`` (no grad)."""
    import torch

    with torch.no_grad():
        return tc.encode(x.float())


def transcode(tc: "Transcoder", x: "torch.Tensor") -> "torch.Tensor":
    """The transcoder's prediction ``ŷ`` ``[..., d_out]`` of the MLP output for inputs ``x`` (skip term
    included for skip transcoders; no grad)."""
    import torch

    with torch.no_grad():
        return tc.forward(x.float())


def layer_of(tc: "Transcoder") -> int | None:
    """The layer whose MLP a transcoder replaces, from its metadata ``hook_name`` (must be the ``mlp_in`` hook,
    ``blocks.L.ln2.hook_normalized``, and its ``hook_name_out``, if set, ``blocks.L.hook_mlp_out``)."""
    name = getattr(tc.cfg.metadata, "hook_name", None)
    try:
        kind, layer = parse_hook_name(name) if name else (None, None)
    except ValueError:
        return None
    out = getattr(tc.cfg.metadata, "hook_name_out", None)
    if kind != "mlp_in" or (out and out != hook_name("mlp_out", layer)):
        return None
    return layer


# ------------------------------------------------------------------------------------------------------------
# Splicing into the model


def sink_positions(tokens: "torch.Tensor", separator_id: int | None) -> "torch.Tensor":
    """Bool ``[..., pos]``: the sink positions of ``tokens`` ``[..., pos]`` — position 0 (BOS) and every token equal
    to ``separator_id`` (the corpus' document separator, :func:`backend.inputs.corpus.document_separator_id`)."""
    import torch

    sink = torch.zeros(tokens.shape, dtype=torch.bool)
    sink[..., 0] = True
    if separator_id is not None:
        sink |= tokens == int(separator_id)
    return sink


def massive_norm(replacement: Any) -> float | None:
    """The MLP-output norm above which a position is a massive activation for this transcoder's layer (stored with it
    at training: :data:`backend.dictionaries.config.TranscoderConfig.massive_ratio` × the median training norm), or
    None (imported transcoders, plain maps)."""
    meta = getattr(getattr(replacement, "cfg", None), "metadata", None)
    value = meta.get("massive_norm") if meta is not None else None
    return float(value) if value is not None else None


def splice_hooks(replacements: Mapping[int, Callable[["torch.Tensor"], "torch.Tensor"]],
                 exact: "torch.Tensor | None" = None,
                 massive: Mapping[int, float | None] | None = None) -> list[tuple[str, Any]]:
    """TransformerLens ``fwd_hooks`` that replace ``hook_mlp_out`` of every layer in ``replacements`` (``{layer:
    transcoder}`` or any ``x -> ŷ`` map, e.g. a dense linear baseline) by its prediction from that run's own
    ``ln2.hook_normalized``, except where the real output must stay: positions where the bool ``exact``
    ``[batch, pos]`` is True (default: BOS only; pass :func:`sink_positions` to keep every sink exact) and massive
    activations, whose real output norm exceeds ``massive[layer]`` (default: :func:`massive_norm` of the
    replacement). That is the replacement model with the error terms dropped. With several layers replaced the later
    ones see the earlier replacements' effects. Differentiable: with grad enabled, gradients flow through the
    replacements to their inputs (and weights).

    Use as ``model.run_with_hooks(tokens, fwd_hooks=splice_hooks({3: tc3, 4: tc4}, sink_positions(tokens, sep)))``.
    """
    import torch

    hooks: list[tuple[str, Any]] = []
    for layer, replace in sorted(replacements.items()):
        stash: dict[str, Any] = {}
        limit = massive.get(layer) if massive is not None else massive_norm(replace)

        def keep_input(x: Any, hook: Any, stash: dict[str, Any] = stash) -> None:
            stash["x"] = x

        def replace_output(y: Any, hook: Any, stash: dict[str, Any] = stash, replace: Any = replace,
                           limit: float | None = limit) -> Any:
            x = stash.pop("x")
            new = replace(x.float()).to(y.dtype)  # the module itself, not transcode(): keeps grad
            return torch.where(_exact_mask(exact, y, limit), y, new)

        hooks += [(hook_name("mlp_in", layer), keep_input), (hook_name("mlp_out", layer), replace_output)]
    return hooks


def ablate_hooks(layers: Iterable[int], exact: "torch.Tensor | None" = None,
                 massive: Mapping[int, float | None] | None = None) -> list[tuple[str, Any]]:
    """``fwd_hooks`` zeroing ``hook_mlp_out`` of ``layers`` except where :func:`splice_hooks` keeps the real output
    (``exact`` positions, massive activations above ``massive[layer]``): the baseline of CE-loss recovered."""
    import torch

    def make(limit: float | None) -> Any:
        def zero(y: Any, hook: Any) -> Any:
            return torch.where(_exact_mask(exact, y, limit), y, torch.zeros_like(y))
        return zero

    return [(hook_name("mlp_out", int(layer)), make((massive or {}).get(int(layer)))) for layer in sorted(set(layers))]


def _exact_mask(exact: "torch.Tensor | None", y: "torch.Tensor", limit: float | None = None) -> "torch.Tensor":
    """``[batch, pos, 1]`` bool: where a spliced or ablated MLP output keeps its real value — the ``exact`` positions
    (BOS by default) and, with ``limit``, every position whose real output norm exceeds it."""
    import torch

    if exact is None:
        exact = torch.zeros(y.shape[:2], dtype=torch.bool)
        exact[:, 0] = True
    mask = exact.to(y.device)
    if limit is not None:
        mask = mask | (y.norm(dim=-1) > limit)
    return mask[..., None]


# ------------------------------------------------------------------------------------------------------------
# Activations


def collect_mlp_io(
    model: Any,
    tokens: "torch.Tensor",
    layers: Sequence[int],
    batch_size: int = 16,
    desc: str = "Collecting MLP inputs/outputs",
    carry: ResidualCarry | None = None,
) -> dict[int, tuple["torch.Tensor", "torch.Tensor"]]:
    """Run ``tokens`` ([n, n_ctx], BOS at 0) through ``model`` once (in batches) and return, per layer, the MLP's
    normalised input and its output at every non-BOS token: ``{layer: (x [n·(n_ctx−1), d_model], y [same])}``,
    float32, rows context-major (:func:`backend.model.activations.collect`, which also explains ``carry``)."""
    got = collect(model, tokens, [(kind, int(l)) for l in layers for kind in ("mlp_in", "mlp_out")], batch_size, desc,
                  carry)
    return {layer: (got.pop(("mlp_in", layer)), got.pop(("mlp_out", layer))) for layer in sorted({int(l) for l in layers})}


# ------------------------------------------------------------------------------------------------------------
# Store


# ------------------------------------------------------------------------------------------------------------
# Imports (sae-lens format directories and releases)


# ------------------------------------------------------------------------------------------------------------
# Precompute step


