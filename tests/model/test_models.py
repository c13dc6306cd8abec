"""Model registry and loading: the embedded model matches its HF original; unknown/offline models fail in one sentence."""

from __future__ import annotations

import pytest
import torch

from backend.errors import ModelUnavailableError
from backend.inputs.prompts import model_bos_id
from backend.model.registry import REGISTRY, get_spec, is_cached, load_hf_from_gguf, load_model


def test_unknown_model_is_one_clear_sentence() -> None:
    with pytest.raises(ModelUnavailableError) as info:
        get_spec("no-such-model-xyz")
    msg = str(info.value)
    assert "no-such-model-xyz" in msg and "\n" not in msg and "smollm2-135m" in msg


def test_offline_official_model_fails_fast_with_one_sentence(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    # An empty HF cache and no hub: gpt2 cannot load, and must say so in one line instead of a traceback.
    import backend.model.registry as models

    monkeypatch.setenv("HF_HOME", str(tmp_path))
    if models.hub_reachable():
        pytest.skip("the hub is reachable here, so gpt2 may really load")
    with pytest.raises(ModelUnavailableError) as info:
        load_model("gpt2")
    msg = str(info.value)
    assert "'gpt2'" in msg and "\n" not in msg and "internet" in msg


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-gpt2"])
def test_tiny_models_run_and_expose_hooks(name: str) -> None:
    model = load_model(name)
    spec = REGISTRY[name]
    _, cache = model.run_with_cache(torch.tensor([[1, 2, 3, 4]]))
    z = cache["blocks.0.attn.hook_z"]
    assert z.shape == (1, 4, spec.n_heads, spec.d_head)
    assert model.cfg.n_layers == spec.n_layers


@pytest.fixture(scope="module")
def smollm2():
    return load_model("smollm2-135m")


@pytest.mark.slow
def test_smollm2_matches_hf_logprobs(smollm2) -> None:
    hf_model, tokenizer = load_hf_from_gguf(REGISTRY["smollm2-135m"])
    bos = model_bos_id(smollm2)
    prompts = ["The capital of France is", "When Mary and John went to the store, John gave a drink to",
               "def fibonacci(n):\n    return"]
    for prompt in prompts:
        ids = torch.tensor([[bos] + tokenizer(prompt, add_special_tokens=False)["input_ids"]])
        with torch.no_grad():
            tl = smollm2(ids).log_softmax(-1)
            hf = hf_model(ids).logits.log_softmax(-1)
        assert (tl - hf).abs().max().item() < 1e-3, prompt
    assert is_cached("smollm2-135m")


@pytest.mark.slow
def test_smollm2_knows_paris(smollm2) -> None:
    tok = smollm2.tokenizer
    ids = torch.tensor([[model_bos_id(smollm2)] + tok("The capital of France is", add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        top = smollm2(ids)[0, -1].argmax().item()
    assert tok.decode([top]) == " Paris"


@pytest.mark.slow
def test_cached_reload_gives_identical_weights(smollm2) -> None:
    again = load_model("smollm2-135m")  # from the safetensors cache, not the GGUF
    for key in ("embed.W_E", "blocks.7.attn.W_Q", "blocks.29.mlp.W_gate", "ln_final.w"):
        assert torch.equal(again.state_dict()[key], smollm2.state_dict()[key])


@pytest.mark.slow
def test_corrupt_weight_cache_is_rebuilt(tmp_path, monkeypatch: pytest.MonkeyPatch, smollm2) -> None:
    # A truncated safetensors file (e.g. disk full during the first conversion) must not make the model unloadable.
    import shutil

    import backend.model.registry as models

    src = models._cache_paths(REGISTRY["smollm2-135m"])[0].parent
    copy = tmp_path / "models" / src.name
    shutil.copytree(src, copy)
    weights = copy / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    monkeypatch.setattr(models, "CACHE_DIR", tmp_path)
    messages: list[str] = []
    rebuilt = load_model("smollm2-135m", progress=messages.append)
    assert any("rebuilding" in m for m in messages)
    assert torch.equal(rebuilt.state_dict()["blocks.3.mlp.W_in"], smollm2.state_dict()["blocks.3.mlp.W_in"])
    assert models.is_cached("smollm2-135m") and weights.stat().st_size > 10**8
