"""Learned transcoders for MLP layers: BatchTopK / TopK training on sae-lens' own training classes and trainer.

A transcoder replaces one MLP: it reads the MLP's input ``x`` ``[n, d_in]`` and predicts the MLP's output ``y``
``[n, d_out]`` through sparse features ``f = act(x·W_enc + b_enc)``: ``ŷ = f·W_dec + b_dec (+ x·W_skipᵀ)``.

Why this module exists
----------------------
sae-lens (6.54.x) ships transcoder *inference* classes (``Transcoder``, ``SkipTranscoder``, ``JumpReLUTranscoder``,
``JumpReLUSkipTranscoder``) but no transcoder *training* class, and its ``SAETrainer`` feeds one tensor per batch
that the training SAE both encodes and reconstructs. We keep sae-lens' trainer (Adam, LR schedule, gradient
clipping, dead-feature bookkeeping) and its TopK / BatchTopK training SAEs (activation function, aux-k loss against
dead features, decoder-norm handling, BatchTopK's threshold) and change only what a transcoder needs:

* the data provider yields ``cat([x, y], -1)`` and :class:`TranscoderTrainingMixin` splits it: encode ``x``, compare
  the output with ``y`` (MSE and the aux-k residual are both against ``y``);
* weights of transcoder shapes (``W_dec [d_sae, d_out]``, ``b_dec [d_out]``) and an optional linear skip
  ``W_skip [d_out, d_in]`` (sae-lens' ``SkipTranscoder`` layout) trained jointly;
* a data-driven initialisation (see :func:`init_from_data`): with the few hundred Adam steps a 2-core demo can
  afford it is worth as much as most of the training (``docs/presets.md``);
* the conversion to an inference class that ``SAE.from_dict`` rebuilds (:func:`to_inference`): BatchTopK and TopK
  both become ``JumpReLUTranscoder`` / ``JumpReLUSkipTranscoder`` with one threshold for every feature (BatchTopK:
  the threshold it learned; TopK: calibrated so the mean L0 on training tokens is ``k``). sae-lens has no TopK
  transcoder inference class, and a threshold is also what attribution graphs want (a feature's activation does not
  depend on the other features, unlike a per-token TopK).

Conventions of the result (those of :mod:`backend.dictionaries.transcoder`): CPU float32, eval mode,
``apply_b_dec_to_input=False``, decoder rows of unit norm (a feature's activation is the size of what it writes), the
data scales folded back in, training facts in ``cfg.metadata["training"]``.
:func:`backend.dictionaries.storage.save_dictionary` / ``load_dictionary`` round-trip it (cfg JSON + safetensors,
``SAE.from_dict``).

Recipe (measurements in ``docs/presets.md``): inputs and targets scaled to unit mean square (E‖x‖² = d_in, E‖y‖² = d_out, as
sae-lens' own ``expected_average_only_in``; folded back afterwards) so one learning rate suits every layer whatever
its output norm; skip and bias initialised at the closed-form ridge regression of y on x (which is also the dense
linear baseline, :func:`fit_linear`), so the features only have to explain its residual and the transcoder starts
at the baseline's quality; decoder rows initialised to the normalised residual targets of random training tokens
and encoder columns to those tokens' (centred) inputs; Adam with a cosine decay; BatchTopK.

Data: ``data`` is either a pair of in-memory tensors ``(x, y)`` or a *re-iterable* source of ``(x, y)`` batches (a
callable returning a fresh iterator, or an object that ``iter()`` restarts, e.g. a list of file-backed chunks): the
statistics pass and every epoch read it once; nothing holds all tokens in memory at once (a shuffle buffer of
``shuffle_buffer`` rows mixes tokens of different contexts).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator, Literal, Mapping, Union

import torch
from sae_lens import JumpReLUTranscoder
from sae_lens.saes.batchtopk_sae import BatchTopKTrainingSAE, BatchTopKTrainingSAEConfig
from sae_lens.saes.sae import SAEConfig, TrainStepInput, TrainStepOutput
from sae_lens.saes.topk_sae import TopKTrainingSAE, TopKTrainingSAEConfig, act_times_W_dec
from sae_lens.saes.transcoder import JumpReLUSkipTranscoderConfig, JumpReLUTranscoderConfig
from torch import nn

from backend.dictionaries.attention_sae import quiet_sae_lens_bar
from backend.model.device import resolve_device
from backend.progress import track

Batch = tuple[torch.Tensor, torch.Tensor]
DataSource = Union[Batch, Callable[[], Iterable[Batch]], Iterable[Batch]]
Architecture = Literal["batchtopk", "topk"]

# ------------------------------------------------------------------------------------------------------------
# Data sources


def iterate_batches(data: DataSource, batch_size: int = 8192) -> Iterator[Batch]:
    """One pass over ``data`` as ``(x, y)`` float32 batches (in-memory pairs are cut in ``batch_size`` rows, in order)."""
    if isinstance(data, tuple) and len(data) == 2 and isinstance(data[0], torch.Tensor):
        x, y = data
        if x.shape[0] != y.shape[0]:
            raise ValueError(f"x has {x.shape[0]} rows but y has {y.shape[0]}")
        for s in range(0, x.shape[0], batch_size):
            yield x[s : s + batch_size].float(), y[s : s + batch_size].float()
        return
    source = data() if callable(data) else data
    for x, y in source:
        yield x.reshape(-1, x.shape[-1]).float(), y.reshape(-1, y.shape[-1]).float()


def _shuffled_training_batches(data: DataSource, batch_size: int, epochs_tokens: int, scale_x: float, scale_y: float,
                               shuffle_buffer: int, seed: int) -> Iterator[torch.Tensor]:
    """Batches ``cat([x / scale_x, y / scale_y], -1)`` of exactly ``batch_size`` rows, ``epochs_tokens`` rows in all
    (passes over ``data`` repeat as needed), shuffled. In-memory data: a fresh permutation per pass. Streamed data:
    rows go through a buffer of ``shuffle_buffer`` rows that is permuted whenever it is full (the stream comes
    context-major, and neighbouring tokens of one context are strongly correlated)."""
    gen = torch.Generator().manual_seed(seed)
    produced = 0
    in_memory = isinstance(data, tuple) and len(data) == 2 and isinstance(data[0], torch.Tensor)
    while produced < epochs_tokens:
        if in_memory:
            x, y = data  # type: ignore[misc]
            perm = torch.randperm(x.shape[0], generator=gen)
            for s in range(0, x.shape[0] - batch_size + 1, batch_size):
                idx = perm[s : s + batch_size]
                yield torch.cat([x[idx].float() / scale_x, y[idx].float() / scale_y], -1)
                produced += batch_size
                if produced >= epochs_tokens:
                    return
            continue
        buf: list[torch.Tensor] = []
        rows = 0
        for x, y in iterate_batches(data):
            buf.append(torch.cat([x / scale_x, y / scale_y], -1))
            rows += x.shape[0]
            if rows < shuffle_buffer:
                continue
            block = torch.cat(buf)
            block = block[torch.randperm(block.shape[0], generator=gen)]
            n_full = block.shape[0] // batch_size * batch_size
            for s in range(0, n_full, batch_size):
                yield block[s : s + batch_size]
                produced += batch_size
                if produced >= epochs_tokens:
                    return
            buf, rows = [block[n_full:]], block.shape[0] - n_full
        if rows >= batch_size:  # the pass's tail (a partial batch is carried into the next pass)
            block = torch.cat(buf)
            block = block[torch.randperm(block.shape[0], generator=gen)]
            for s in range(0, block.shape[0] - batch_size + 1, batch_size):
                yield block[s : s + batch_size]
                produced += batch_size
                if produced >= epochs_tokens:
                    return


# ------------------------------------------------------------------------------------------------------------
# Data statistics and the dense linear baseline


@dataclass
class LinearFit:
    """Closed-form ridge regression ``y ≈ x·Wᵀ + b`` (``W [d_out, d_in]``: sae-lens' ``W_skip`` layout) plus the
    statistics gathered in the same pass."""

    W: torch.Tensor
    b: torch.Tensor
    n: int
    scale_x: float  # sqrt(E‖x‖² / d_in)
    scale_y: float  # sqrt(E‖y‖² / d_out)
    train_fve: float  # FVE of the fit on the data it was fitted on

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        """``x·Wᵀ + b``."""
        return x.float() @ self.W.T + self.b


def data_statistics(data: DataSource, ridge: float = 1e-4, chunk: int = 8192) -> LinearFit:
    """One pass over ``data``: the ridge regression of y on x (float64 normal equations, streamed: memory
    O((d_in+1)²+(d_in+1)·d_out) whatever the number of tokens) and the unit-mean-square scales of x and y.

    ``ridge`` is relative: λ = ridge × mean diagonal of the (uncentred) Gram matrix of x, applied to W only (not b).
    With x centred inside the solve, so the ridge never shrinks the intercept.
    """
    n = 0
    sx = sy = sxx = sxy = None
    sum_x2 = sum_y2 = 0.0
    for x, y in iterate_batches(data, chunk):
        # float32 products per chunk (4x faster than float64 on CPU), accumulated in float64 across chunks
        xd, yd = x.double(), y.double()
        if sx is None:
            sx, sy = torch.zeros(x.shape[1], dtype=torch.float64), torch.zeros(y.shape[1], dtype=torch.float64)
            sxx = torch.zeros(x.shape[1], x.shape[1], dtype=torch.float64)
            sxy = torch.zeros(x.shape[1], y.shape[1], dtype=torch.float64)
        n += x.shape[0]
        sx += xd.sum(0)
        sy += yd.sum(0)
        sxx += (x.T @ x).double()
        sxy += (x.T @ y).double()
        sum_x2 += float((xd**2).sum())
        sum_y2 += float((yd**2).sum())
    if not n:
        raise ValueError("no training rows")
    mx, my = sx / n, sy / n
    cxx = sxx / n - torch.outer(mx, mx)
    cxy = sxy / n - torch.outer(mx, my)
    lam = ridge * float(torch.diagonal(sxx).mean() / n)
    a = cxx + lam * torch.eye(cxx.shape[0], dtype=torch.float64)
    w = torch.linalg.solve(a, cxy)  # [d_in, d_out]
    b = my - mx @ w
    # train FVE from the sufficient statistics: SSE = Σ‖y‖² − 2·tr(WᵀSxy') + tr(WᵀSxx'W) on centred quantities
    cyy_trace = sum_y2 / n - float(my @ my)
    resid = cyy_trace - 2 * float((w * cxy).sum()) + float((w * (cxx @ w)).sum())
    d_in, d_out = sxx.shape[0], sxy.shape[1]
    return LinearFit(W=w.T.float().contiguous(), b=b.float(), n=n, scale_x=math.sqrt(sum_x2 / n / d_in),
                     scale_y=math.sqrt(sum_y2 / n / d_out), train_fve=1.0 - resid / cyy_trace)


def fit_linear(data: DataSource, ridge: float = 1e-4) -> LinearFit:
    """The dense linear baseline: ridge regression of the MLP output on its input (see :func:`data_statistics`)."""
    return data_statistics(data, ridge=ridge)


def explained_variance(predict: Callable[[torch.Tensor], torch.Tensor], data: DataSource,
                       chunk: int = 4096) -> float:
    """FVE ``1 − Σ‖y − ŷ‖² / Σ‖y − ȳ‖²`` of ``predict(x)`` over ``data`` (float64 sums; ȳ is this data's mean)."""
    n, err, s2 = 0, 0.0, 0.0
    s1 = None
    with torch.no_grad():
        for x, y in iterate_batches(data, chunk):
            err += float(((y - predict(x)).double() ** 2).sum())
            s1 = y.double().sum(0) if s1 is None else s1 + y.double().sum(0)
            s2 += float((y.double() ** 2).sum())
            n += x.shape[0]
    total = s2 - float((s1**2).sum()) / n
    return 1.0 - err / total


# ------------------------------------------------------------------------------------------------------------
# Training classes


class TranscoderTrainingMixin:
    """Turns a sae-lens TopK-family training SAE into a transcoder training SAE (put it first in the bases).

    The trainer's batches are ``cat([x, y], -1)`` (``d_in + d_out`` columns): :meth:`training_forward_pass` splits
    them, encodes ``x`` with the base class' encoder (its activation function and decoder-norm rescaling) and
    scores the output against ``y``; the base class' aux-k loss is called with ``y`` as its target, so dead features
    learn to predict the live features' residual *of y*. ``W_skip`` (optional) is an ordinary parameter that Adam
    trains with the rest.
    """

    cfg: Any
    W_enc: nn.Parameter
    b_enc: nn.Parameter
    W_dec: nn.Parameter
    b_dec: nn.Parameter

    def initialize_weights(self) -> None:
        """Transcoder shapes. Random unit decoder rows, encoder = decoder transpose where d_in == d_out (sae-lens'
        default init; :func:`init_from_data` usually overwrites all of it), zero biases, zero skip."""
        d_in, d_sae, d_out = self.cfg.d_in, self.cfg.d_sae, self.cfg.d_out
        kw = {"dtype": self.dtype, "device": self.device}  # type: ignore[attr-defined]
        w_dec = torch.randn(d_sae, d_out, **kw)
        w_dec /= w_dec.norm(dim=1, keepdim=True)
        self.W_dec = nn.Parameter(w_dec)
        w_enc = w_dec.T.clone() if d_in == d_out else torch.randn(d_in, d_sae, **kw) / math.sqrt(d_in)
        self.W_enc = nn.Parameter(w_enc.contiguous())
        self.b_enc = nn.Parameter(torch.zeros(d_sae, **kw))
        self.b_dec = nn.Parameter(torch.zeros(d_out, **kw))
        if self.cfg.skip:
            self.W_skip = nn.Parameter(torch.zeros(d_out, d_in, **kw))

    def process_sae_in(self, sae_in: torch.Tensor) -> torch.Tensor:
        # As sae-lens' Transcoder: never subtract b_dec (it lives in the output space).
        sae_in = sae_in.to(self.dtype)  # type: ignore[attr-defined]
        return self.hook_sae_input(sae_in)  # type: ignore[attr-defined]

    def decode(self, feature_acts: torch.Tensor) -> torch.Tensor:
        """``f·W_dec (rows rescaled to unit norm when cfg.rescale_acts_by_decoder_norm) + b_dec`` (no skip)."""
        out = act_times_W_dec(feature_acts, self.W_dec, self.cfg.rescale_acts_by_decoder_norm) + self.b_dec
        return self.hook_sae_recons(out)  # type: ignore[attr-defined]

    def skip_out(self, x: torch.Tensor) -> torch.Tensor | float:
        """The linear skip path ``x·W_skipᵀ`` (0 without skip)."""
        return x @ self.W_skip.T if self.cfg.skip else 0.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Prediction of y from x (in the training SAE's normalised units), skip included."""
        feature_acts, _ = self.encode_with_hidden_pre(x)  # type: ignore[attr-defined]
        return self.decode(feature_acts) + self.skip_out(x)

    def split(self, batch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``cat([x, y], -1)`` -> ``(x, y)``."""
        return batch[..., : self.cfg.d_in], batch[..., self.cfg.d_in :]

    def training_forward_pass(self, step_input: TrainStepInput) -> TrainStepOutput:
        x, y = self.split(step_input.sae_in)
        feature_acts, hidden_pre = self.encode_with_hidden_pre(x)  # type: ignore[attr-defined]
        y_hat = self.decode(feature_acts) + self.skip_out(x)
        mse_loss = (y_hat - y).pow(2).sum(-1).mean()
        # sae-lens' aux-k: dead features' top pre-activations reconstruct (y − ŷ), detached (sae_in -> y).
        aux = self.calculate_topk_aux_loss(sae_in=y, sae_out=y_hat, hidden_pre=hidden_pre,  # type: ignore[attr-defined]
                                           dead_neuron_mask=step_input.dead_neuron_mask)
        out = TrainStepOutput(sae_in=y, sae_out=y_hat, feature_acts=feature_acts, hidden_pre=hidden_pre,
                              loss=mse_loss + aux, losses={"mse_loss": mse_loss, "auxiliary_reconstruction_loss": aux})
        self.after_training_step(out)
        return out

    def after_training_step(self, output: TrainStepOutput) -> None:
        """Hook for subclasses (BatchTopK updates its threshold here)."""


@dataclass
class TranscoderConfigFields:
    """What a transcoder's training config adds to sae-lens' SAE training configs: the output width (default: the
    input's) and the skip switch. ``apply_b_dec_to_input`` is forced off: b_dec lives in the output space."""

    d_out: int = 0
    skip: bool = False

    def __post_init__(self) -> None:
        if not self.d_out:
            self.d_out = self.d_in  # type: ignore[attr-defined]
        self.apply_b_dec_to_input = False
        super().__post_init__()  # type: ignore[misc]

    def get_inference_config_class(self) -> type[SAEConfig]:
        return JumpReLUSkipTranscoderConfig if self.skip else JumpReLUTranscoderConfig


@dataclass
class TopKTranscoderTrainingSAEConfig(TranscoderConfigFields, TopKTrainingSAEConfig):
    """sae-lens' TopK training config plus the transcoder fields. ``rescale_acts_by_decoder_norm`` (the default) makes
    the decoder rows effectively unit norm: TopK ranks ``hidden_pre·‖W_dec,i‖`` and decodes with
    ``W_dec,i/‖W_dec,i‖``."""

    @classmethod
    def architecture(cls) -> str:
        return "topk_transcoder"


class TopKTranscoderTrainingSAE(TranscoderTrainingMixin, TopKTrainingSAE):
    """TopK transcoder training SAE (k features per token). Converted to a JumpReLU transcoder with a calibrated
    threshold for inference (:func:`to_inference`)."""

    cfg: TopKTranscoderTrainingSAEConfig  # type: ignore[assignment]

    def __init__(self, cfg: TopKTranscoderTrainingSAEConfig, use_error_term: bool = False) -> None:
        super().__init__(cfg, use_error_term)  # type: ignore[arg-type]


@dataclass
class BatchTopKTranscoderTrainingSAEConfig(TranscoderConfigFields, BatchTopKTrainingSAEConfig):
    """sae-lens' BatchTopK training config (k = mean active features per token over a batch) plus the transcoder
    fields. Saved as a JumpReLU transcoder whose threshold is the one BatchTopK learned."""

    @classmethod
    def architecture(cls) -> str:
        return "batchtopk_transcoder"


class BatchTopKTranscoderTrainingSAE(TranscoderTrainingMixin, BatchTopKTrainingSAE):
    """BatchTopK transcoder training SAE: sae-lens' BatchTopK activation and threshold estimate."""

    cfg: BatchTopKTranscoderTrainingSAEConfig  # type: ignore[assignment]

    def __init__(self, cfg: BatchTopKTranscoderTrainingSAEConfig, use_error_term: bool = False) -> None:
        super().__init__(cfg, use_error_term)  # type: ignore[arg-type]

    def after_training_step(self, output: TrainStepOutput) -> None:
        # What BatchTopKTrainingSAE.training_forward_pass does after its forward pass (the mixin replaces that pass).
        self.update_topk_threshold(output.feature_acts)


TRAINING_CLASSES: dict[str, tuple[type, type]] = {
    "topk": (TopKTranscoderTrainingSAE, TopKTranscoderTrainingSAEConfig),
    "batchtopk": (BatchTopKTranscoderTrainingSAE, BatchTopKTranscoderTrainingSAEConfig),
}


# ------------------------------------------------------------------------------------------------------------
# Initialisation


@torch.no_grad()
def init_from_data(sae: TranscoderTrainingMixin, x: torch.Tensor, y: torch.Tensor, linear: LinearFit | None,
                   scale_x: float, scale_y: float, seed: int = 0, mode: str = "data") -> dict[str, Any]:
    """Initialise a training transcoder (in its normalised units) from a sample ``x``, ``y`` (raw units).

    * bias / skip: ``b_dec`` = the linear fit's intercept (with skip) or the mean of y (without), ``W_skip`` = the
      linear fit's weights: the transcoder starts at the dense linear baseline and the features learn its residual.
    * ``mode="data"``: feature i copies a random sample token t: decoder row = t's normalised residual target
      (``y_t − b_dec − skip(x_t)``), encoder column = t's centred, normalised input; the encoder scale is then set by
      least squares on the sample (one scalar) and ``b_enc`` centres the pre-activations. So each feature starts as
      "inputs like x_t write what t needed".
    * ``mode="transpose"``: keep the random unit decoder rows, encoder = their transpose (sae-lens' default).
    Returns facts for the info dict.
    """
    gen = torch.Generator().manual_seed(seed)
    xs, ys = x.float() / scale_x, y.float() / scale_y
    cfg = sae.cfg
    if cfg.skip and linear is not None:
        sae.W_skip.copy_(linear.W * (scale_x / scale_y))
        sae.b_dec.copy_(linear.b / scale_y)
    else:
        sae.b_dec.copy_(ys.mean(0))
    resid = ys - sae.b_dec - (sae.skip_out(xs) if cfg.skip else 0.0)
    if mode == "data":
        n = xs.shape[0]
        idx = torch.randperm(n, generator=gen)[: cfg.d_sae] if n >= cfg.d_sae else torch.randint(n, (cfg.d_sae,), generator=gen)
        dec = resid[idx]
        sae.W_dec.copy_(dec / dec.norm(dim=1, keepdim=True).clamp_min(1e-8))
        enc = xs[idx] - xs.mean(0)
        sae.W_enc.copy_((enc / enc.norm(dim=1, keepdim=True).clamp_min(1e-8)).T)
        sae.b_enc.zero_()
        # encoder bias: centre the pre-activations (inputs are not centred, their mean would dominate every feature)
        sae.b_enc.copy_(-(xs.mean(0) @ sae.W_enc))
    elif mode != "transpose":
        raise ValueError(f"unknown init mode {mode!r}")
    # One scalar a for the encoder: minimise ‖a·dec(f) − resid‖² on the sample (f is positively homogeneous in
    # (W_enc, b_enc) for TopK, so scaling both by a scales every activation by a). BatchTopK uses TopK-per-row here.
    sample = slice(0, min(xs.shape[0], 4096))
    hidden = (xs[sample] @ sae.W_enc + sae.b_enc) * sae.W_dec.norm(dim=1)
    k = max(1, int(round(float(cfg.k))))
    top = hidden.topk(k, dim=-1)
    f = torch.zeros_like(hidden).scatter_(-1, top.indices, top.values.relu())
    pred = f @ (sae.W_dec / sae.W_dec.norm(dim=1, keepdim=True))
    a = float((pred * resid[sample]).sum() / (pred * pred).sum().clamp_min(1e-12))
    if a > 0:
        sae.W_enc.mul_(a)
        sae.b_enc.mul_(a)
    info: dict[str, Any] = {"init": mode, "init_encoder_scale": a}
    if isinstance(sae, BatchTopKTrainingSAE) and a > 0:  # start BatchTopK's running threshold at the sample's cutoff
        hidden = (xs[sample] @ sae.W_enc + sae.b_enc) * sae.W_dec.norm(dim=1)
        n_keep = max(1, int(float(cfg.k) * hidden.shape[0]))
        sae.topk_threshold.fill_(float(hidden.relu().flatten().topk(n_keep).values[-1]))
    return info


# ------------------------------------------------------------------------------------------------------------
# Conversion to a sae-lens inference transcoder


def inference_architecture(skip: bool) -> str:
    """The sae-lens architecture name a trained transcoder is stored as (``jumprelu_skip_transcoder`` /
    ``jumprelu_transcoder``): it names the class ``SAE.from_dict`` rebuilds, and it is part of the dict_id."""
    return (JumpReLUSkipTranscoderConfig if skip else JumpReLUTranscoderConfig).architecture()


@torch.no_grad()
def calibrate_threshold(sae: TranscoderTrainingMixin, data: DataSource, scale_x: float, k: float,
                        max_rows: int = 8192) -> float:
    """The global JumpReLU threshold (normalised units, on the ranked pre-activation ``hidden_pre·‖W_dec,i‖``) under
    which ``k`` features per token fire on average over the first ``max_rows`` rows of ``data``: the (k·n)-th largest
    value, i.e. BatchTopK's cutoff over one batch of n rows. Used for both architectures: BatchTopK's running
    estimate (an EMA of per-batch minima, rate 0.01) lags far behind after the few hundred steps of a short budget."""
    kept = []
    rows = 0
    for x, _ in iterate_batches(data, 4096):
        x = x[: max_rows - rows] / scale_x
        _, hidden = sae.encode_with_hidden_pre(x)  # type: ignore[attr-defined]
        flat = hidden.relu().flatten()
        # keep 4x this chunk's share: the global top-(k·n) takes more than k·n_chunk from a chunk only rarely
        kept.append(flat.topk(min(flat.numel(), int(4 * k * x.shape[0]))).values)
        rows += x.shape[0]
        if rows >= max_rows:
            break
    return float(torch.cat(kept).topk(max(1, int(k * rows))).values[-1])


@torch.no_grad()
def to_inference(sae: TranscoderTrainingMixin, scale_x: float, scale_y: float, threshold: float | None = None,
                 metadata: Mapping[str, Any] | None = None) -> JumpReLUTranscoder:
    """The sae-lens inference transcoder equal to ``sae`` on raw (un-normalised) inputs.

    Training computes, in normalised units, ``h = (x/sx)·W_enc + b_enc``, ``h' = h·n`` (n = decoder row norms when
    ``rescale_acts_by_decoder_norm``), ``f = act(h')``, ``y/sy = f·(W_dec/n) + b_dec + (x/sx)·W_skipᵀ``. The inference
    JumpReLU transcoder gets ``W_enc·n·sy/sx``, ``b_enc·n·sy``, ``threshold·sy``, unit decoder rows ``W_dec/n``,
    ``b_dec·sy`` and ``W_skip·sy/sx``: its features are ``sy·f`` (the size of what each writes, in raw units) and its
    output is ``sy`` times the training output. ``threshold``: BatchTopK's learned one if None.
    Class: ``JumpReLUSkipTranscoder`` with skip, else ``JumpReLUTranscoder`` (``SAE.from_dict`` rebuilds either).
    """
    cfg = sae.cfg
    if threshold is None:
        if not isinstance(sae, BatchTopKTrainingSAE):
            raise ValueError("a TopK transcoder needs a calibrated threshold (calibrate_threshold)")
        threshold = float(sae.topk_threshold)
    n = sae.W_dec.norm(dim=1).clamp_min(1e-8) if cfg.rescale_acts_by_decoder_norm else torch.ones(cfg.d_sae)
    state = {
        "W_enc": sae.W_enc * n[None, :] * (scale_y / scale_x),
        "b_enc": sae.b_enc * n * scale_y,
        "W_dec": sae.W_dec / n[:, None] if cfg.rescale_acts_by_decoder_norm else sae.W_dec.clone(),
        "b_dec": sae.b_dec * scale_y,
        "threshold": torch.full((cfg.d_sae,), float(threshold) * scale_y),
    }
    if cfg.skip:
        state["W_skip"] = sae.W_skip * (scale_y / scale_x)
    inf_cfg_cls = JumpReLUSkipTranscoderConfig if cfg.skip else JumpReLUTranscoderConfig
    meta = {k: v for k, v in cfg.metadata.to_dict().items() if not k.startswith("training_architecture")}
    meta.update(metadata or {})
    cfg_dict = {"architecture": inf_cfg_cls.architecture(), "d_in": cfg.d_in, "d_sae": cfg.d_sae, "d_out": cfg.d_out,
                "dtype": "float32", "device": str(resolve_device()), "apply_b_dec_to_input": False, "normalize_activations": "none",
                "metadata": meta}
    from sae_lens import SAE

    tc = SAE.from_dict(cfg_dict)
    tc.load_state_dict({k: v.detach().float().contiguous() for k, v in state.items()})
    return tc.eval()


# ------------------------------------------------------------------------------------------------------------
# Training


def _track(it: Iterator[Any], total: int, desc: str, progress: bool) -> Iterator[Any]:
    """``it`` through :func:`backend.progress.track` (the CLI's and the app's progress bar) when ``progress``."""
    return iter(track(it, total=total, desc=desc, unit="step")) if progress else it


def train_transcoder(
    data: DataSource,
    d_sae: int,
    k: float = 32,
    skip: bool = True,
    architecture: Architecture = "batchtopk",
    epochs: float = 1.0,
    max_tokens: int | None = None,
    lr: float = 2e-3,
    lr_end_ratio: float = 0.1,
    batch_size: int = 256,
    seed: int = 0,
    init: str = "data",
    init_rows: int = 16384,
    ridge: float = 1e-4,
    aux_loss_coefficient: float = 1.0,
    dead_window_tokens: int = 50_000,
    shuffle_buffer: int = 65_536,
    linear: LinearFit | None = None,
    metadata: Mapping[str, Any] | None = None,
    progress: bool = False,
    desc: str = "Training transcoder",
) -> tuple[JumpReLUTranscoder, dict[str, Any]]:
    """Train a transcoder ``x -> y`` and return ``(sae-lens inference transcoder, info)``.

    ``data``: ``(x, y)`` tensors ``[n, d_in]`` / ``[n, d_out]`` or a re-iterable stream of such batches (see the module
    docstring). ``d_sae`` features, ``k`` active per token (BatchTopK: on average over a batch; TopK: exactly),
    ``skip``: add the linear skip W_skip (initialised with ``bias``  at the ridge regression). ``epochs`` passes
    over the data, capped at ``max_tokens`` training rows; Adam (sae-lens' SAETrainer: betas 0.9/0.999, gradient norm
    clipped at 1) with a cosine decay from ``lr`` to ``lr·lr_end_ratio``. ``init``: "data" (see
    :func:`init_from_data`) or "transpose"; the init sample is the first ``init_rows`` rows of the stream.
    ``dead_window_tokens``: a feature that has not fired for this many training tokens counts as dead for the aux-k
    loss (coefficient ``aux_loss_coefficient``). ``linear``: a precomputed :func:`data_statistics` of the same data
    (saves the statistics pass). Returns the JumpReLU(Skip)Transcoder (eval, float32, unit decoder rows) and an info
    dict (the same facts are stored in ``cfg.metadata["training"]``).
    """
    from sae_lens.config import LoggingConfig, SAETrainerConfig
    from sae_lens.training.sae_trainer import SAETrainer

    t0 = time.perf_counter()
    torch.manual_seed(seed)
    stats = linear if linear is not None else data_statistics(data, ridge=ridge)
    t_stats = time.perf_counter() - t0
    n = stats.n
    total = int(min(epochs * n, max_tokens or float("inf")))
    steps = total // batch_size  # 0: initialisation only (no Adam step)
    first_x, first_y = [], []
    rows = 0
    for x, y in iterate_batches(data, 8192):
        first_x.append(x)
        first_y.append(y)
        rows += x.shape[0]
        if rows >= init_rows:
            break
    x0, y0 = torch.cat(first_x)[:init_rows], torch.cat(first_y)[:init_rows]
    d_in, d_out = x0.shape[1], y0.shape[1]
    sae_cls, cfg_cls = TRAINING_CLASSES[architecture]
    cfg = cfg_cls(d_in=d_in, d_sae=int(d_sae), d_out=d_out, k=float(k) if architecture == "batchtopk" else int(k),
                  skip=bool(skip), aux_loss_coefficient=aux_loss_coefficient, decoder_init_norm=None)
    sae = sae_cls(cfg)
    init_info = init_from_data(sae, x0, y0, stats, stats.scale_x, stats.scale_y, seed=seed, mode=init)
    del first_x, first_y
    trainer_cfg = SAETrainerConfig(
        total_training_samples=max(steps, 1) * batch_size,
        train_batch_size_samples=batch_size,
        lr=lr,
        lr_end=lr * lr_end_ratio,
        lr_scheduler_name="cosineannealing",
        dead_feature_window=max(1, dead_window_tokens // batch_size),
        feature_sampling_window=max(1, steps),
        logger=LoggingConfig(log_to_wandb=False),
    )
    batches = _shuffled_training_batches(data, batch_size, steps * batch_size, stats.scale_x, stats.scale_y,
                                         shuffle_buffer, seed)
    trainer = SAETrainer(trainer_cfg, sae, data_provider=_track(batches, steps, desc, progress))
    t1 = time.perf_counter()
    if steps:
        with quiet_sae_lens_bar():
            trainer.fit()
    t_train = time.perf_counter() - t1
    sae.eval()
    t2 = time.perf_counter()
    threshold = calibrate_threshold(sae, data, stats.scale_x, float(k))
    ema = float(sae.topk_threshold) if isinstance(sae, BatchTopKTrainingSAE) else None
    dead = int(trainer.dead_neurons.sum())
    info = {
        "architecture": f"{architecture}_transcoder" + ("_skip" if skip else ""),
        "training_tokens": int(n),
        "training_samples": int(steps * batch_size),
        "epochs": round(steps * batch_size / n, 3),  # passes over the training rows actually made
        "steps": int(steps),
        "batch_size": int(batch_size),
        "k": float(k),
        "lr": float(lr),
        "lr_end": float(lr * lr_end_ratio),
        "seed": int(seed),
        "ridge": float(ridge),
        "scale_x": stats.scale_x,
        "scale_y": stats.scale_y,
        "linear_train_fve": round(stats.train_fve, 4),
        "dead_at_end": dead,
        "threshold": threshold,
        "ema_threshold": ema,
        "seconds_calibration": round(time.perf_counter() - t2, 2),
        "train_l0_last_window": float(trainer.feature_sparsity.sum()) if trainer.n_frac_active_samples else None,
        "seconds": round(time.perf_counter() - t0, 2),
        "seconds_statistics": round(t_stats, 2),
        "seconds_training": round(t_train, 2),
        "samples_per_second": round(steps * batch_size / max(t_train, 1e-9), 1),
        "torch_threads": torch.get_num_threads(),
        **init_info,
    }
    tc = to_inference(sae, stats.scale_x, stats.scale_y, threshold=threshold, metadata=metadata)
    tc.cfg.metadata["training"] = info
    return tc, info
