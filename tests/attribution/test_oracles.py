"""Independent oracles for RelP and IG: LXT (LRP-eXplains-Transformers) on a Hugging Face Llama, captum's
LayerIntegratedGradients on the same TransformerLens hook points.

**LXT.** A tiny random ``LlamaForCausalLM`` (float64, grouped-query attention) is converted to TransformerLens with
the project's own converter (``convert_llama_weights`` + ``llama_tl_config``, as ``backend/model/registry.py`` does
for SmolLM2). LXT's Llama patches are applied to the HF model; the relevance ``x · ∂m/∂x`` (LXT's Gradient × Input
form) of the metric at the residual stream entering each layer and at each MLP output, per position, must equal the
relevance RelP's rule hooks give at ``hook_resid_pre`` / ``hook_mlp_out`` — for AttnLRP and for CP-LRP, and for the
plain gradient (no patches) as a control.

LXT 2.1 and transformers 5.x (stated precisely, since it shapes this test): ``import lxt.efficient`` fails, because
``lxt/efficient/models/bert.py`` imports ``find_pruneable_heads_and_indices`` from ``transformers.pytorch_utils``,
which transformers 5 removed; and LXT's AttnLRP attention patch replaces ``modeling_llama.ALL_ATTENTION_FUNCTIONS``
with a plain dict, which transformers 5's ``LlamaAttention.forward`` cannot use (it calls ``.get_interface``). So the
test loads LXT's own rule and patch modules (``lxt.efficient.rules``, ``lxt.efficient.patches``: they import only
torch) without the package's ``__init__``, applies the entries of LXT's Llama patch maps (``lxt/efficient/models/
llama.py``: ``gated_mlp_forward`` / ``cp_gated_mlp_forward`` on ``LlamaMLP``, ``rms_norm_forward`` on
``LlamaRMSNorm``) with LXT's ``patch_method``, and wraps ``eager_attention_forward`` with LXT's
``wrap_attention_forward`` / ``cp_wrap_attention_forward`` — the first half of LXT's ``patch_attention``, the half
that works with transformers 5. Every rule that runs is LXT's code.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import types
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest
import torch

from backend.attribution.ig import integrated_gradients
from backend.attribution.relp import ATTNLRP_RULES, CP_LRP_RULES, GRADIENT_RULES, RelPRules, rule_hooks
from backend.inputs.tasks import TaskBatch
from backend.model.hooks import hook_name

VOCAB, SEQ, N = 97, 9, 3


def _lxt_modules() -> tuple[Any, Any]:
    """``lxt.efficient.rules`` and ``lxt.efficient.patches`` without ``lxt/efficient/__init__.py`` (see the module
    docstring)."""
    spec = importlib.util.find_spec("lxt")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("lxt is not installed (make setup installs requirements-nodeps.txt)")
    if "lxt.efficient" not in sys.modules:
        stub = types.ModuleType("lxt.efficient")
        stub.__path__ = [str(Path(list(spec.submodule_search_locations)[0]) / "efficient")]
        sys.modules["lxt.efficient"] = stub
    return importlib.import_module("lxt.efficient.rules"), importlib.import_module("lxt.efficient.patches")


@pytest.fixture(scope="module")
def twins() -> tuple[Any, Any]:
    """A tiny random HF Llama (eager attention, float64) and its TransformerLens conversion."""
    from transformer_lens import HookedTransformer
    from transformer_lens.pretrained.weight_conversions import convert_llama_weights
    from transformers import LlamaConfig, LlamaForCausalLM

    from backend.model.registry import llama_tl_config

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=48, intermediate_size=80, num_hidden_layers=3,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         rms_norm_eps=1e-5, tie_word_embeddings=False, attn_implementation="eager")
    hf = LlamaForCausalLM(config).to(torch.float64).eval()
    with torch.no_grad():  # HF's init (std 0.02) leaves every activation tiny; larger weights exercise the rules
        for p in hf.parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.25)
    cfg = llama_tl_config(hf.config, n_ctx=64)
    cfg.dtype = torch.float64
    tl = HookedTransformer(cfg, move_to_device=False)
    state = convert_llama_weights(hf, cfg)
    tl.load_state_dict({k: v.to(torch.float64) for k, v in state.items()}, strict=False)
    return hf, tl.to(torch.float64).eval()


def _tokens() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, VOCAB, (N, SEQ), generator=gen)
    answer, wrong = torch.randint(0, VOCAB, (2, N), generator=gen)
    return tokens, answer, wrong


def _logit_diff(logits: torch.Tensor, answer: torch.Tensor, wrong: torch.Tensor) -> torch.Tensor:
    last = logits[:, -1]
    return (last.gather(1, answer[:, None]) - last.gather(1, wrong[:, None])).sum()


def _hf_relevance(hf: Any, tokens: torch.Tensor, answer: torch.Tensor, wrong: torch.Tensor
                  ) -> dict[str, torch.Tensor]:
    """x · ∂m/∂x summed over features, per (layer, example, position), at each decoder layer's input and MLP output."""
    acts: dict[str, torch.Tensor] = {}
    handles = []
    for i, layer in enumerate(hf.model.layers):
        def pre(module: Any, args: Any, kwargs: Any, i: int = i) -> Any:
            x = args[0] if args else kwargs["hidden_states"]
            x.retain_grad()
            acts[f"resid{i}"] = x
        def post(module: Any, args: Any, out: torch.Tensor, i: int = i) -> None:
            out.retain_grad()
            acts[f"mlp{i}"] = out
        handles += [layer.register_forward_pre_hook(pre, with_kwargs=True), layer.mlp.register_forward_hook(post)]
    try:
        emb = hf.model.embed_tokens(tokens).detach().requires_grad_(True)  # a leaf, so layer 0's input has a grad
        metric = _logit_diff(hf(inputs_embeds=emb).logits, answer, wrong)
        metric.backward()
    finally:
        for h in handles:
            h.remove()
    n_layers = len(hf.model.layers)
    return {kind: torch.stack([(acts[f"{kind}{i}"] * acts[f"{kind}{i}"].grad).sum(-1) for i in range(n_layers)])
            for kind in ("resid", "mlp")}


def _relp_relevance(tl: Any, rules: RelPRules, tokens: torch.Tensor, answer: torch.Tensor, wrong: torch.Tensor
                    ) -> dict[str, torch.Tensor]:
    """The same relevance from RelP's rule hooks on the TransformerLens twin (plain hooks read it out)."""
    names = {"resid": "resid_pre", "mlp": "mlp_out"}
    acts: dict[str, torch.Tensor] = {}

    def keep(x: torch.Tensor, hook: Any) -> torch.Tensor:
        acts[hook.name] = x
        return x

    n_layers = tl.cfg.n_layers
    hooks = [(hook_name(names[k], i), keep) for k in names for i in range(n_layers)]
    with torch.enable_grad(), tl.hooks(fwd_hooks=[*rule_hooks(tl, rules), *hooks]):
        metric = _logit_diff(tl(tokens), answer, wrong)
        keys = [hook_name(names[k], i) for k in names for i in range(n_layers)]
        grads = dict(zip(keys, torch.autograd.grad(metric, [acts[k] for k in keys])))
    return {k: torch.stack([(acts[hook_name(names[k], i)] * grads[hook_name(names[k], i)]).sum(-1)
                            for i in range(n_layers)]) for k in names}


@pytest.fixture
def lxt_patches(twins: Any) -> Iterator[Callable[[str], None]]:
    """``apply(rule_set)`` applies LXT's Llama patches for "attnlrp" or "cp-lrp"; everything is restored after."""
    from transformers.models.llama import modeling_llama

    rules, patches = _lxt_modules()
    saved = (modeling_llama.LlamaMLP.forward, modeling_llama.LlamaRMSNorm.forward,
             modeling_llama.eager_attention_forward)

    def apply(rule_set: str) -> None:
        attn_lrp = rule_set == "attnlrp"
        patches.patch_method(patches.gated_mlp_forward if attn_lrp else patches.cp_gated_mlp_forward,
                             modeling_llama.LlamaMLP)
        patches.patch_method(patches.rms_norm_forward, modeling_llama.LlamaRMSNorm)
        wrap = patches.wrap_attention_forward if attn_lrp else patches.cp_wrap_attention_forward
        modeling_llama.eager_attention_forward = wrap(saved[2])

    yield apply
    modeling_llama.LlamaMLP.forward, modeling_llama.LlamaRMSNorm.forward = saved[0], saved[1]
    modeling_llama.eager_attention_forward = saved[2]


def test_the_twins_agree(twins: Any) -> None:
    hf, tl = twins
    tokens, _, _ = _tokens()
    with torch.no_grad():
        expected = hf(tokens).logits
        # HF's Llama runs RMSNorm and the softmax in float32 even in a float64 model: float32 agreement.
        torch.testing.assert_close(tl(tokens), expected, rtol=1e-4, atol=1e-5 * float(expected.abs().max()))


@pytest.mark.parametrize("rule_set, rules", [("attnlrp", ATTNLRP_RULES), ("cp-lrp", CP_LRP_RULES),
                                             (None, GRADIENT_RULES)])
def test_relp_relevance_matches_lxt(twins: Any, lxt_patches: Callable[[str], None], rule_set: str | None,
                                    rules: RelPRules) -> None:
    hf, tl = twins
    tokens, answer, wrong = _tokens()
    if rule_set is not None:
        lxt_patches(rule_set)
    expected = _hf_relevance(hf, tokens, answer, wrong)
    got = _relp_relevance(tl, rules, tokens, answer, wrong)
    for kind in ("resid", "mlp"):
        scale = float(expected[kind].detach().abs().max())
        assert scale > 1e-3  # not a vacuous comparison
        # LXT (like HF's Llama) runs RMSNorm and the softmax in float32: agreement is to float32 precision.
        torch.testing.assert_close(got[kind], expected[kind].detach(), rtol=1e-4, atol=1e-5 * scale, msg=kind)


def test_the_rule_sets_differ(twins: Any) -> None:
    """The three comparisons above test three different propagations, not one."""
    _, tl = twins
    tokens, answer, wrong = _tokens()
    rel = {name: _relp_relevance(tl, r, tokens, answer, wrong)["resid"]
           for name, r in (("a", ATTNLRP_RULES), ("c", CP_LRP_RULES), ("g", GRADIENT_RULES))}
    assert not torch.allclose(rel["a"], rel["c"], atol=1e-6) and not torch.allclose(rel["a"], rel["g"], atol=1e-6)


# ----------------------------------------------------------------------------------------------------------------
# captum: per-layer IG on the same hook points


@pytest.mark.parametrize("kind, hook_kind, steps", [("resid", "resid_pre", 3), ("mlp", "mlp_out", 2),
                                                    ("head", "z", 3)])
def test_ig_matches_captum_layer_integrated_gradients(twins: Any, kind: str, hook_kind: str, steps: int) -> None:
    from captum.attr import LayerIntegratedGradients

    _, tl = twins
    tokens, answer, wrong = _tokens()
    corrupt = tokens.clone()
    corrupt[:, 2:5] = torch.randint(0, VOCAB, (N, 3), generator=torch.Generator().manual_seed(7))
    batch = TaskBatch(name="t", clean=tokens, corrupt=corrupt, answer=answer, wrong=wrong, metric_name="logit_diff",
                      description="", prompts=[""] * N)
    ours = integrated_gradients(tl, batch, [kind], steps=steps).examples[kind]  # [n, layer, ...]

    def forward(toks: torch.Tensor) -> torch.Tensor:  # per-example logit difference (captum repeats the batch)
        reps = toks.shape[0] // N
        last = tl(toks)[:, -1]
        return last.gather(1, answer.repeat(reps)[:, None])[:, 0] - last.gather(1, wrong.repeat(reps)[:, None])[:, 0]

    for layer in range(tl.cfg.n_layers):
        module = tl.get_submodule(hook_name(hook_kind, layer))  # the TransformerLens HookPoint itself
        lig = LayerIntegratedGradients(forward, module)
        # captum integrates from the baseline to the input: baseline = corrupt, input = clean gives the negative of
        # our clean -> corrupt (noising) scores, on the same Gauss-Legendre nodes.
        attr = lig.attribute(tokens, baselines=corrupt, n_steps=steps, method="gausslegendre").detach()
        expected = -(attr.sum(-1) if kind != "head" else attr.sum((1, 3)))
        assert float(expected.abs().max()) > 1e-4
        torch.testing.assert_close(ours[:, layer], expected.double(), rtol=1e-6, atol=1e-9,
                                   msg=f"{kind} layer {layer}")
