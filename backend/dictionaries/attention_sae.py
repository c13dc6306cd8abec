"""Attention-output dictionaries (Kissane et al. 2024): sae-lens SAEs over one layer's concatenated ``hook_z``.

Conventions the rest of the code relies on:

* An SAE is a sae-lens inference ``SAE`` object (``TopKSAE``, ``StandardSAE``, ``JumpReLUSAE``, ...), CPU
  float32, eval mode. Its input is ``x = flatten_z(z)``: all heads concatenated **head-major**, so head ``h``
  is ``x[..., h*d_head:(h+1)*d_head]``.
* BOS (position 0) activations are attention-sink outliers (norms many times the others'): they are excluded
  from training, from evaluation denominators and from per-feature statistics. Pages show the BOS token but
  never score it.
* A dictionary is stored as one ``dictionaries`` row (metrics + the sae-lens config as JSON) and one
  ``dictionary_weights`` row (the state dict as a safetensors blob: a safe format, no pickle).

Training uses sae-lens' own training classes (chosen by architecture name from sae-lens' registry) and its
``SAETrainer``, fed from activations collected here (:mod:`backend.model.activations`); nothing of the trainer
needs the network when ``log_to_wandb=False``. The only hand-written pieces are the decoder-bias
initialisation to the data mean and the training -> inference conversion glue (see the functions).
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, Iterator

from backend.dictionaries.kinds import ATTN_SAE
from backend.errors import InputError
from backend.model.activations import flatten_heads

if TYPE_CHECKING:
    import torch
    from sae_lens import SAE

KIND = ATTN_SAE
DEFAULT_ARCHITECTURE = "topk"


# ------------------------------------------------------------------------------------------------------------
# Inputs, encoding and pre-activations


def flatten_z(z: "torch.Tensor") -> "torch.Tensor":
    """``hook_z`` ``[..., n_heads, d_head]`` -> SAE input ``[..., n_heads * d_head]`` (head-major)."""
    return flatten_heads(z)


def _as_input(sae: "SAE", z_or_x: "torch.Tensor") -> "torch.Tensor":
    """Accept either the flat SAE input or the unflattened ``hook_z``; return the flat float32 input."""
    d_in = sae.cfg.d_in
    if z_or_x.shape[-1] == d_in:
        return z_or_x.float()
    if z_or_x.dim() >= 2 and z_or_x.shape[-2] * z_or_x.shape[-1] == d_in:
        return flatten_z(z_or_x).float()
    raise ValueError(f"activations of shape {tuple(z_or_x.shape)} do not match this dictionary's input width {d_in}")


@contextmanager
def _flat_mode(sae: "SAE") -> Iterator[None]:
    """Run a hook_z SAE (``cfg.reshape_activations == 'hook_z'``) on already-flattened input.

    sae-lens' hook_z mode rearranges the last two dims of whatever it gets, which would scramble a flat input;
    we always pass flat input, so we switch the reshaping off for the call and back on afterwards.
    """
    was_on = bool(getattr(sae, "hook_z_reshaping_mode", False))
    if was_on:
        sae.turn_off_forward_pass_hook_z_reshaping()
    try:
        yield
    finally:
        if was_on:
            sae.turn_on_forward_pass_hook_z_reshaping()


def encode_z(sae: "SAE", z_or_x: "torch.Tensor") -> "torch.Tensor":
    """Feature activations ``[..., d_sae]`` of ``hook_z`` (unflattened ``[..., n_heads, d_head]`` or flat)."""
    import torch

    x = _as_input(sae, z_or_x)
    with torch.no_grad(), _flat_mode(sae):
        return sae.encode(x)


def reconstruct(sae: "SAE", z_or_x: "torch.Tensor") -> "torch.Tensor":
    """The SAE's reconstruction ``x̂`` of the flat input ``[..., d_in]`` (flat, whatever the input shape)."""
    import torch

    x = _as_input(sae, z_or_x)
    with torch.no_grad(), _flat_mode(sae):
        return sae.decode(sae.encode(x))


def preactivation(sae: "SAE", x: "torch.Tensor") -> "torch.Tensor":
    """Pre-activation ``W_enc·(x − b_dec) + b_enc`` ``[..., d_sae]`` (``b_dec`` only if
    ``cfg.apply_b_dec_to_input``), before the activation function: the quantity DFA decomposes by head.

    Valid for the linear-encoder architectures (standard, topk, jumprelu); any run-time input normalisation
    of the SAE is applied first, and a TopK SAE with ``rescale_acts_by_decoder_norm`` gets its decoder-norm
    factor, exactly as sae-lens' ``encode`` does, so this is what its ``hook_sae_acts_pre`` sees.
    """
    import torch

    x = _as_input(sae, x)
    with torch.no_grad():
        x = sae.run_time_activation_norm_fn_in(x)
        if sae.cfg.apply_b_dec_to_input:
            x = x - sae.b_dec
        pre = x @ sae.W_enc + sae.b_enc
        if getattr(sae.cfg, "rescale_acts_by_decoder_norm", False):
            pre = pre * sae.W_dec.norm(dim=-1)
    return pre


def dict_id_for(model: Any, layer: int, architecture: str, d_sae: int) -> str:
    """Stable dictionary id, e.g. ``"smollm2-135m/L8/attn_z/topk-2304"`` (``model``: registry name or spec)."""
    name = model if isinstance(model, str) else getattr(model, "name", None) or model.cfg.model_name
    return f"{name}/L{int(layer)}/attn_z/{architecture}-{int(d_sae)}"


# ------------------------------------------------------------------------------------------------------------
# Construction


def make_random_sae(d_in: int, d_sae: int, k: int = 8, seed: int = 0) -> "SAE":
    """A random ``TopKSAE`` for tests and development (no training).

    Decoder rows are random unit vectors and the encoder is their transpose with zero biases, so every token
    activates the ``k`` features whose directions it points along most (all positive for a generic input):
    features fire on real activations with varied strengths.
    """
    import torch
    from sae_lens import TopKSAE, TopKSAEConfig

    gen = torch.Generator().manual_seed(seed)
    w_dec = torch.randn(d_sae, d_in, generator=gen)
    w_dec = w_dec / w_dec.norm(dim=-1, keepdim=True)
    sae = TopKSAE(TopKSAEConfig(d_in=d_in, d_sae=d_sae, k=k))
    with torch.no_grad():
        sae.W_dec.copy_(w_dec)
        sae.W_enc.copy_(w_dec.T)
        sae.b_enc.zero_()
        sae.b_dec.zero_()
    return sae.eval()


def architectures() -> list[str]:
    """Architecture names sae-lens can train (its own registry)."""
    import sae_lens  # noqa: F401 - importing registers the classes
    from sae_lens.registry import SAE_TRAINING_CLASS_REGISTRY

    return sorted(SAE_TRAINING_CLASS_REGISTRY)


def to_inference(training_sae: Any) -> "SAE":
    """Convert a trained sae-lens ``TrainingSAE`` to its inference ``SAE`` class in memory.

    Same steps as sae-lens' ``save_inference_model`` + ``load_from_disk`` (fold the decoder norms where the
    architecture needs it, inference config dict), without the detour through files. A TopK SAE trained with
    ``rescale_acts_by_decoder_norm`` has unit decoder norms after folding, so the flag is switched off: the
    inference SAE then computes the plain ``W_enc·(x − b_dec) + b_enc`` that DFA decomposes.
    """
    import torch
    from sae_lens import SAE

    state = {k: v.detach().clone() for k, v in training_sae.state_dict().items()}
    training_sae.process_state_dict_for_saving_inference(state)
    cfg = training_sae.cfg.get_inference_sae_cfg_dict()
    if cfg.get("rescale_acts_by_decoder_norm") and "W_dec" in state:
        if torch.allclose(state["W_dec"].norm(dim=-1), torch.ones(state["W_dec"].shape[0]), atol=1e-4):
            cfg["rescale_acts_by_decoder_norm"] = False
    sae = SAE.from_dict(cfg)
    sae.load_state_dict(state)
    return sae.eval()


def init_training_sae(acts: "torch.Tensor", d_sae: int, architecture: str = DEFAULT_ARCHITECTURE, k: int = 32,
                      seed: int = 0, **arch_kwargs: Any) -> Any:
    """A fresh sae-lens ``TrainingSAE`` of ``architecture`` (looked up in sae-lens' training registry) for
    inputs like ``acts`` ``[n, d_in]``, with the decoder bias at the data mean. ``k`` only for TopK-style."""
    import torch
    from sae_lens.registry import get_sae_training_class

    known = architectures()
    if architecture not in known:
        raise InputError(f"Unknown SAE architecture {architecture!r}: use one of {', '.join(known)}.")
    sae_cls, cfg_cls = get_sae_training_class(architecture)
    kwargs = dict(arch_kwargs)
    if "k" in getattr(cfg_cls, "__dataclass_fields__", {}):
        kwargs.setdefault("k", min(int(k), d_sae))
    torch.manual_seed(seed)
    sae = sae_cls(cfg_cls(d_in=acts.shape[1], d_sae=d_sae, **kwargs))
    with torch.no_grad():
        # Written by hand (sae-lens v6's trainer has no b_dec initialisation): start the decoder bias at the
        # data mean, so the features start out explaining deviations from it instead of the mean itself.
        sae.b_dec.copy_(acts.mean(0))
    return sae


def train_attention_sae(
    acts: "torch.Tensor",
    d_sae: int,
    architecture: str = DEFAULT_ARCHITECTURE,
    k: int = 32,
    lr: float = 5e-3,
    batch_size: int = 1024,
    epochs: float = 3.0,
    seed: int = 0,
    metadata: dict[str, Any] | None = None,
    dead_feature_window: int | None = None,
    **arch_kwargs: Any,
) -> tuple["SAE", dict[str, Any]]:
    """Train an SAE of ``architecture`` (a sae-lens training-registry name) on ``acts`` ``[n, d_in]`` with
    sae-lens' ``SAETrainer``; return the inference SAE (eval mode) and training facts.

    ``epochs`` passes over the data (fractions allowed), Adam with a cosine decay from ``lr`` to ``lr/10``.
    ``k`` is passed only to TopK-style architectures; other architecture options go in ``arch_kwargs``
    (e.g. ``l1_coefficient`` for "standard"). Throughput/learning-rate measurements on 2 cores are in
    :mod:`backend.dictionaries.steps`: a higher learning rate than sae-lens' default matters most at these short
    budgets.
    """
    import torch
    from sae_lens.config import LoggingConfig, SAETrainerConfig
    from sae_lens.training.sae_trainer import SAETrainer

    from backend.model.activations import shuffled_batches
    from backend.progress import track

    n, d_in = acts.shape
    batch_size = max(1, min(batch_size, n))
    steps = max(1, int(round(epochs * n / batch_size)))
    sae = init_training_sae(acts, d_sae, architecture, k=k, seed=seed, **arch_kwargs)
    cfg = SAETrainerConfig(
        total_training_samples=steps * batch_size,
        train_batch_size_samples=batch_size,
        lr=lr,
        lr_end=lr / 10,
        lr_scheduler_name="cosineannealing",
        # steps without firing after which the TopK aux loss treats a feature as dead (default ~1 epoch)
        dead_feature_window=dead_feature_window or max(20, n // batch_size),
        feature_sampling_window=max(20, n // batch_size),
        logger=LoggingConfig(log_to_wandb=False),
    )
    # The data provider goes through backend.progress.track: the CLI and the app get a bar with ETA.
    batches = track(shuffled_batches(acts, batch_size, seed=seed), total=steps, desc="Training SAE", unit="step")
    trainer = SAETrainer(cfg, sae, data_provider=iter(batches))
    t0 = time.perf_counter()
    with quiet_sae_lens_bar():
        trainer.fit()
    seconds = time.perf_counter() - t0
    next(batches, None)  # the bar counts a step when the next batch is asked for: let it reach 100%
    batches.close()
    inference = to_inference(sae)
    info = {
        "architecture": architecture,
        "training_tokens": int(n),
        "training_samples": int(steps * batch_size),
        "epochs": float(steps * batch_size / n),
        "steps": int(steps),
        "batch_size": int(batch_size),
        "lr": float(lr),
        "seed": int(seed),
        "seconds": round(seconds, 2),
        "samples_per_second": round(steps * batch_size / max(seconds, 1e-9), 1),
        "torch_threads": torch.get_num_threads(),
    }
    meta = inference.cfg.metadata
    for key, value in (metadata or {}).items():
        meta[key] = value
    meta["training"] = info
    return inference, info


@contextmanager
def quiet_sae_lens_bar() -> Iterator[None]:
    """sae-lens' trainer draws its own tqdm bar; ours (via backend.progress) already shows the same progress."""
    import sae_lens.training.sae_trainer as trainer_module

    original = trainer_module.tqdm

    def silent(*args: Any, **kwargs: Any) -> Any:
        return original(*args, **{**kwargs, "disable": True})

    trainer_module.tqdm = silent
    try:
        yield
    finally:
        trainer_module.tqdm = original


# ------------------------------------------------------------------------------------------------------------
# Store round-trip


# ------------------------------------------------------------------------------------------------------------
# Pretrained dictionaries


def layer_of(sae: "SAE") -> int | None:
    """The layer a (pretrained) SAE reads from, from its metadata hook name, if it is a hook_z name."""
    from backend.model.hooks import parse_hook_name

    name = getattr(sae.cfg.metadata, "hook_name", None)
    try:
        kind, layer = parse_hook_name(name) if name else (None, None)
    except ValueError:
        return None
    return layer if kind == "z" else None


