"""Sparse transcoders per MLP layer (Dunefsky et al. 2024; docs/methods.md §2).

Conventions the rest of the code relies on:

* A transcoder is a sae-lens inference ``Transcoder`` (ReLU) or ``SkipTranscoder`` (imports may also bring
  ``JumpReLUTranscoder``), CPU float32, eval mode, ``apply_b_dec_to_input=False``. It reads the MLP's normalised
  input ``x = blocks.L.ln2.hook_normalized`` (``hook_name("mlp_in", L)``: resid_mid divided by its RMS scale,
  *without* the norm weight ``ln2.w``; for LayerNorm models also mean-centred) and predicts the MLP's output
  ``y = blocks.L.hook_mlp_out``: ``f = ReLU(x·W_enc + b_enc)``, ``ŷ = f·W_dec + b_dec`` (+ ``x·W_skipᵀ`` for a
  skip transcoder). :func:`transcode` returns ŷ whatever the class.
* Trained decoder rows have unit norm (the norms are folded into the encoder), so a feature's activation is the
  size of what it writes into the residual stream.
* BOS (position 0) is excluded everywhere, as for the attention SAEs: never trained on, never scored, and
  :func:`splice_hooks` leaves the real MLP output at position 0.
* Stored in the ``dictionaries`` table with ``kind = 'transcoder'``, ``hook_name`` = the input hook, weights as
  a safetensors blob (backend.dictionaries.storage.save_dictionary / load_dictionary work unchanged: sae-lens'
  ``SAE.from_dict`` rebuilds the Transcoder class from its config's ``architecture``).

**Training is hand-written**: sae-lens 6.54.12 has inference classes for transcoders but no training class
(docs/methods.md §2), so :func:`train_transcoder` is written here, over activations collected in memory
(:func:`collect_mlp_io`: one no-grad forward pass per batch captures both hooks of every layer of a group — or
none: when they fit, the corpus step's scoring pass gathers them, see :func:`precollect_wants`).

Recipe (the why is in the measurements below): (1) inputs and targets are scaled to unit mean square (folded
back after), so one setting fits every layer whatever its output norm; (2) **prototype encoder**: feature i's
encoder column is the mean-centred, normalised input of a random training token, and its bias is set at its
k-th largest pre-activation on a sample so that ~``target_l0`` features fire per token from the start and none
is dead; (3) **least-squares decoder**: with the encoder fixed the decoder is a ridge regression, solved in closed
form (a sparse Gram matrix: about one encoder pass); (4) optionally (``epochs`` > 0) Adam passes over all weights
with the sparsity penalty below, then the decoder is refitted once more (removing the L1 shrinkage).
Sparsity: ReLU, as in sae-lens' ``Transcoder`` (no conversion needed; TopK has no sae-lens transcoder class), L0
set by the bias initialisation; in the Adam passes an L1 penalty on ``f_i·‖W_dec,i‖`` whose coefficient is adapted
every step toward the target L0 (λ ← λ·exp(0.05·(L0/target − 1))), so no per-layer tuning is needed. The
``skip_transcoder`` architecture adds a linear ``W_skip`` fitted jointly with the decoder.

Measurements on SmolLM2-135M (576 -> 2304, target L0 32, the builtin corpus, held-out FVE on 4064 tokens of 32
later contexts, 2 cores shared with other jobs: timings ±30%):

* Plain Adam from a random init (lr 4e-3, batch 512, 1 epoch = 56 steps on 28k tokens, ~1-2k samples/s on the
  loaded machine, ~10k on a quiet one): the MSE gradient switched features off (L0 fell to 1-6, 55-87% dead);
  at lr 1e-3 L0 held but FVE was 0.58/0.39/0.35/0.41/0.44 at L2/8/15/22/28.
* The least-squares decoder refit on the *same* encoder: 0.90/0.40/0.35/0.41/0.92 (layers 2 and 28 have
  outlier-dominated outputs that 56 gradient steps never fit); prototype encoder + refit: 0.95/0.50/0.39/0.48/0.95
  with **no gradient step**. Adding Adam passes to that (lr 3e-4; 1e-3 drifts L0 down to ~16): 1 epoch +0.008,
  3 epochs +0.02-0.03 at L8/15/22, for 2.5x / 8x the time.
* Tokens matter most: held-out FVE at L8/15/22 (prototype + refit) with 8k / 16k / 28k training tokens
  0.43/0.32/0.41, 0.46/0.37/0.45, 0.50/0.40/0.48 (train FVE 0.73 -> 0.64: it overfits less with more data).
  Width 4608 instead of 2304: +0.01-0.02 (+0.03-0.04 at L0/L1); 1152: −0.03-0.05. Ridge 0.1-1 instead of 1e-3: worse.
* A plain linear least-squares map x -> y reaches 0.81/0.46/0.60/0.55/0.84, *more* than the 2304-feature
  transcoder at L15/L22; the skip transcoder (same features + linear skip) 0.94/0.60/0.67/0.67/0.96. It is not the
  default because the linear skip is a path through every MLP that graph edges f_j·(W_dec[j]·W_enc[i]) do not
  include; choose it with ``transcoder_architecture = "skip_transcoder"`` where the graph code handles W_skip.
* Fit cost (prototype + refit, 28k tokens): 2.0 s per layer on a quiet machine (3.4 s before replacing
  torch.quantile by topk and LU by Cholesky).
* The demo step, all 30 layers, and the quality it gives: see the ``transcoder_*`` fields of the demo preset
  (docs/presets.md).
"""

from __future__ import annotations

import math
import time
from typing import TYPE_CHECKING, Any, Iterable, Mapping, Sequence

from backend.dictionaries.kinds import TRANSCODER
from backend.errors import InputError
from backend.model.activations import collect
from backend.model.hooks import hook_name, parse_hook_name
from backend.progress import track

if TYPE_CHECKING:
    import torch
    from sae_lens import Transcoder

KIND = TRANSCODER
DEFAULT_ARCHITECTURE = "transcoder"
TRAINABLE_ARCHITECTURES = ("transcoder", "skip_transcoder")

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


def splice_hooks(transcoders: Mapping[int, "Transcoder"], first_pos: int = 1) -> list[tuple[str, Any]]:
    """TransformerLens ``fwd_hooks`` that replace ``hook_mlp_out`` of every layer in ``transcoders`` by the
    transcoder's output at positions ``>= first_pos`` (BOS keeps the real MLP output), i.e. the replacement
    model with the error terms dropped. Each layer's transcoder reads that run's own ``ln2.hook_normalized``,
    so with several layers replaced the later ones see the earlier replacements' effects. Differentiable: with
    grad enabled, gradients flow through the transcoders to their inputs (and weights).

    Use as ``model.run_with_hooks(tokens, fwd_hooks=splice_hooks({3: tc3, 4: tc4}))``.
    """
    hooks: list[tuple[str, Any]] = []
    for layer, tc in sorted(transcoders.items()):
        stash: dict[str, Any] = {}

        def keep_input(x: Any, hook: Any, stash: dict[str, Any] = stash) -> None:
            stash["x"] = x

        def replace_output(y: Any, hook: Any, stash: dict[str, Any] = stash, tc: Any = tc) -> Any:
            x = stash.pop("x")
            y = y.clone()
            y[:, first_pos:] = tc.forward(x[:, first_pos:].float()).to(y.dtype)  # not transcode(): keeps grad
            return y

        hooks += [(hook_name("mlp_in", layer), keep_input), (hook_name("mlp_out", layer), replace_output)]
    return hooks


def ablate_hooks(layers: Iterable[int], first_pos: int = 1) -> list[tuple[str, Any]]:
    """``fwd_hooks`` zeroing ``hook_mlp_out`` of ``layers`` at positions ``>= first_pos`` (the same positions
    :func:`splice_hooks` replaces): the baseline of CE-loss recovered."""

    def zero(y: Any, hook: Any) -> Any:
        y = y.clone()
        y[:, first_pos:] = 0.0
        return y

    return [(hook_name("mlp_out", int(layer)), zero) for layer in sorted(set(layers))]


# ------------------------------------------------------------------------------------------------------------
# Activations


def collect_mlp_io(
    model: Any,
    tokens: "torch.Tensor",
    layers: Sequence[int],
    batch_size: int = 16,
    desc: str = "Collecting MLP inputs/outputs",
) -> dict[int, tuple["torch.Tensor", "torch.Tensor"]]:
    """Run ``tokens`` ([n, n_ctx], BOS at 0) through ``model`` once (in batches) and return, per layer, the MLP's
    normalised input and its output at every non-BOS token: ``{layer: (x [n·(n_ctx−1), d_model], y [same])}``,
    float32, rows context-major (:func:`backend.model.activations.collect`)."""
    got = collect(model, tokens, [(kind, int(l)) for l in layers for kind in ("mlp_in", "mlp_out")], batch_size, desc)
    return {layer: (got.pop(("mlp_in", layer)), got.pop(("mlp_out", layer))) for layer in sorted({int(l) for l in layers})}


# ------------------------------------------------------------------------------------------------------------
# Training (hand-written: sae-lens 6.54.12 has no transcoder training class)


def _prototype_encoder(x: "torch.Tensor", d_sae: int, target_l0: float, gen: "torch.Generator") -> tuple["torch.Tensor", "torch.Tensor"]:
    """Data-driven encoder init: column i is the (mean-centred, unit) input of a random training token, and its bias
    puts the firing threshold at that feature's (1 − target_l0/d_sae) pre-activation quantile, so about
    ``target_l0`` features fire per token from the start and every feature fires on some tokens."""
    import torch

    n = x.shape[0]
    idx = torch.randint(n, (d_sae,), generator=gen) if n < d_sae else torch.randperm(n, generator=gen)[:d_sae]
    proto = x[idx] - x.mean(0)
    w_enc = (proto / proto.norm(dim=1, keepdim=True).clamp_min(1e-8)).T.contiguous()
    sample = x[torch.randperm(n, generator=gen)[: min(n, 4096)]]
    # The k-th largest pre-activation of each feature on the sample, k = the share target_l0/d_sae of its rows
    # (topk: ~10x faster than torch.quantile here, the same threshold up to interpolation).
    k = max(1, min(len(sample), int(round(len(sample) * min(target_l0 / d_sae, 0.5)))))
    b_enc = -(sample @ w_enc).topk(k, dim=0).values[-1]
    return w_enc, b_enc


def _refit_decoder(x: "torch.Tensor", y: "torch.Tensor", w_enc: "torch.Tensor", b_enc: "torch.Tensor", ridge: float,
                   skip: bool, chunk: int = 8192) -> tuple["torch.Tensor", "torch.Tensor", "torch.Tensor | None", "torch.Tensor"]:
    """Least-squares decoder for the fixed encoder ``(w_enc, b_enc)``: minimise ‖[f, (x), 1]·[W_dec; (W_skipᵀ); b_dec]
    − y‖² with a ridge of ``ridge`` × (mean Gram diagonal) on the weights (not the bias), f = ReLU(x·w_enc + b_enc).

    Streams over ``chunk`` tokens at a time and multiplies with a sparse f (≈ L0 nonzeros per row), so it costs about
    one encoder pass over the data and never holds f for all tokens. Returns W_dec, b_dec, W_skip (or None) and the
    bool ``[d_sae]`` mask of features that fired on some row.
    """
    import warnings

    import torch

    n, d_in = x.shape
    m, d_out = w_enc.shape[1], y.shape[1]
    k = m + (d_in if skip else 0)
    gram = torch.zeros(k, k)
    rhs = torch.zeros(k, d_out)
    sums = torch.zeros(k)
    fired = torch.zeros(m, dtype=torch.bool)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch's "sparse CSR support is in beta" notice
        for start in range(0, n, chunk):
            xc, yc = x[start : start + chunk], y[start : start + chunk]
            f = torch.relu(xc @ w_enc + b_enc)
            fired |= (f > 0).any(0)
            fs = f.to_sparse_csr()
            gram[:m, :m] += fs.t() @ f
            rhs[:m] += fs.t() @ yc
            sums[:m] += f.sum(0)
            if skip:
                g_fx = fs.t() @ xc
                gram[:m, m:] += g_fx
                gram[m:, :m] += g_fx.T
                gram[m:, m:] += xc.T @ xc
                rhs[m:] += xc.T @ yc
                sums[m:] += xc.sum(0)
    a = torch.zeros(k + 1, k + 1, dtype=torch.float64)
    a[:k, :k] = gram.double()
    a[:k, k] = a[k, :k] = sums.double()
    a[k, k] = n
    scale = float(gram.diagonal().mean().clamp_min(1e-12))
    a[:k, :k] += ridge * scale * torch.eye(k, dtype=torch.float64)
    b = torch.cat([rhs, y.sum(0, keepdim=True)]).double()
    chol, info = torch.linalg.cholesky_ex(a)  # positive definite thanks to the ridge; LU if rounding says otherwise
    sol = (torch.cholesky_solve(b, chol) if int(info) == 0 else torch.linalg.solve(a, b)).float()
    w_skip = sol[m:k].T.contiguous() if skip else None
    return sol[:m], sol[k], w_skip, fired


def train_transcoder(
    x: "torch.Tensor",
    y: "torch.Tensor",
    d_sae: int,
    architecture: str = DEFAULT_ARCHITECTURE,
    target_l0: float = 32.0,
    epochs: float = 0.0,
    lr: float = 3e-4,
    batch_size: int = 512,
    ridge: float = 1e-3,
    seed: int = 0,
    l1_init: float = 1e-4,
    l1_adapt: float = 0.05,
    metadata: Mapping[str, Any] | None = None,
    desc: str = "Training transcoder",
) -> tuple["Transcoder", dict[str, Any]]:
    """Fit a transcoder predicting ``y`` ``[n, d_out]`` from ``x`` ``[n, d_in]``; return the inference transcoder
    (eval mode, unit-norm decoder rows) and training facts (also in ``tc.cfg.metadata["training"]``, except
    ``info["train_fired"]``: the bool ``[d_sae]`` mask of features that fire on some training token).

    1. Inputs and targets are scaled to unit mean square (folded back at the end).
    2. Encoder: :func:`_prototype_encoder` (data-driven, starts at ``target_l0``).
    3. Decoder: least squares for those features (:func:`_refit_decoder`, ridge ``ridge``).
    4. If ``epochs`` > 0: Adam over all weights on ‖ŷ − y‖² / E‖y − ȳ‖² + λ·Σ_i f_i‖W_dec,i‖, with
       ``λ ← λ·exp(l1_adapt·(L0/target_l0 − 1))`` after every step (exponent clipped to ±0.5) steering the batch
       L0 to ``target_l0``, cosine decay from ``lr`` to ``lr/10``; then the decoder is refitted by least squares
       once more (it removes the L1 shrinkage).

    ``architecture`` "skip_transcoder" adds the linear skip ``W_skip`` (fitted with the decoder, no L1 on it).
    Why this recipe: module docstring (measured: the least-squares decoder does most of the work at demo scale).
    """
    import torch

    from backend.model.activations import shuffled_batches

    if architecture not in TRAINABLE_ARCHITECTURES:
        raise InputError(f"Transcoder architecture {architecture!r} cannot be trained here: use one of "
                         f"{', '.join(TRAINABLE_ARCHITECTURES)}.")
    n, d_in = x.shape
    d_out = y.shape[1]
    if n < 2:
        raise InputError(f"Training a transcoder needs at least 2 tokens, got {n}.")
    skip = architecture == "skip_transcoder"
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    t0 = time.perf_counter()

    # Unit-scale copies: x to unit mean square per dimension, y to unit mean squared distance from its mean.
    x_scale = float(x.pow(2).mean().sqrt().clamp_min(1e-8))
    y_scale = float((y - y.mean(0)).pow(2).sum(-1).mean().sqrt().clamp_min(1e-8))
    xs, ys = x / x_scale, y / y_scale
    w_enc, b_enc = _prototype_encoder(xs, d_sae, target_l0, gen)
    w_dec, b_dec, w_skip, fired = _refit_decoder(xs, ys, w_enc, b_enc, ridge, skip)

    steps = 0
    log: list[tuple[int, float, float, float]] = []
    l1 = float(l1_init)
    if epochs > 0:
        batch_size = max(1, min(int(batch_size), n))
        steps = max(1, int(round(epochs * n / batch_size)))
        params = {"W_enc": w_enc, "b_enc": b_enc, "W_dec": w_dec, "b_dec": b_dec}
        if skip:
            params["W_skip"] = w_skip
        params = {k: v.clone().requires_grad_() for k, v in params.items()}
        opt = torch.optim.Adam(params.values(), lr=lr)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps, eta_min=lr / 10)
        # x and y travel together: shuffle row indices (exact in float32 below 2^24 rows) and gather both.
        index = torch.arange(n, dtype=torch.float32).unsqueeze(1)
        batches = track(shuffled_batches(index, batch_size, seed=seed), total=steps, desc=desc, unit="step")
        for step in range(steps):
            rows = next(batches).squeeze(1).long()
            xb, yb = xs[rows], ys[rows]
            f = torch.relu(xb @ params["W_enc"] + params["b_enc"])
            y_hat = f @ params["W_dec"] + params["b_dec"]
            if skip:
                y_hat = y_hat + xb @ params["W_skip"].T
            mse = (y_hat - yb).pow(2).sum(-1).mean()  # E‖ys − mean‖² = 1, so this is ≈ 1 − FVE
            sparsity = (f * params["W_dec"].norm(dim=1)).sum(-1).mean()
            loss = mse + l1 * sparsity
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            l0 = float((f.detach() > 0).float().sum(-1).mean())
            l1 *= math.exp(max(-0.5, min(0.5, l1_adapt * (l0 / target_l0 - 1.0))))
            if step % 10 == 0 or step == steps - 1:
                log.append((step, round(float(mse.detach()), 4), round(l0, 2), l1))
        next(batches, None)  # the bar counts a step when the next batch is asked for: let it reach 100%
        batches.close()
        w_enc, b_enc = params["W_enc"].detach(), params["b_enc"].detach()
        w_dec, b_dec, w_skip, fired = _refit_decoder(xs, ys, w_enc, b_enc, ridge, skip)
    seconds = time.perf_counter() - t0

    tc = _to_inference({"W_enc": w_enc, "b_enc": b_enc, "W_dec": w_dec, "b_dec": b_dec,
                        **({"W_skip": w_skip} if skip else {})}, architecture, x_scale, y_scale, metadata)
    info = {
        "architecture": architecture,
        "method": "prototype encoder + least-squares decoder" + (f" + {steps} Adam steps + refit" if steps else ""),
        "training_tokens": int(n),
        "training_samples": int(steps * batch_size),
        "epochs": float(steps * batch_size / n) if steps else 0.0,
        "steps": int(steps),
        "batch_size": int(batch_size) if steps else None,
        "lr": float(lr) if steps else None,
        "ridge": float(ridge),
        "target_l0": float(target_l0),
        "l1_final": float(l1) if steps else None,
        "log": log,
        "seed": int(seed),
        "seconds": round(seconds, 2),
        "tokens_per_second": round(n * max(1.0, steps * batch_size / n) / max(seconds, 1e-9), 1),
        "torch_threads": torch.get_num_threads(),
        "loop": "hand-written (sae-lens 6.54.12 has no transcoder training class)",
        "dead_on_training": int((~fired).sum()),
    }
    tc.cfg.metadata["training"] = dict(info)
    info["train_fired"] = fired  # bool [d_sae], not stored: which features fire on some training token
    return tc, info


def _to_inference(params: Mapping[str, "torch.Tensor"], architecture: str, x_scale: float, y_scale: float,
                  metadata: Mapping[str, Any] | None) -> "Transcoder":
    """Fold the training scales back in (encoder ÷ x_scale, decoder/skip × y_scale) and the decoder row norms
    into the encoder (exact for ReLU: f_i·w_i = (f_i‖w_i‖)·(w_i/‖w_i‖)); return the sae-lens inference class."""
    import torch

    with torch.no_grad():
        w_dec = params["W_dec"].detach() * y_scale
        norms = w_dec.norm(dim=1).clamp_min(1e-8)
        w_enc = params["W_enc"].detach() / x_scale * norms
        b_enc = params["b_enc"].detach() * norms
        tc = new_transcoder(w_enc.shape[0], w_enc.shape[1], w_dec.shape[1], architecture, metadata)
        tc.W_enc.copy_(w_enc)
        tc.b_enc.copy_(b_enc)
        tc.W_dec.copy_(w_dec / norms.unsqueeze(1))
        tc.b_dec.copy_(params["b_dec"].detach() * y_scale)
        if "W_skip" in params:
            tc.W_skip.copy_(params["W_skip"].detach() * (y_scale / x_scale))
    return tc.eval()


# ------------------------------------------------------------------------------------------------------------
# Store


# ------------------------------------------------------------------------------------------------------------
# Imports (sae-lens format directories and releases)


# ------------------------------------------------------------------------------------------------------------
# Precompute step


