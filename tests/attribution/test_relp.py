"""RelP's LRP rules (backend/attribution/relp.py) checked against independent computations.

* the rule hooks never change the forward pass;
* with every rule set to "gradient" RelP is AtP exactly;
* on a model with no non-linearities (constant norm scales, a fixed attention pattern, identity MLP activation)
  RelP = AtP = exact activation patching;
* relevance is conserved layer to layer (Σ resid_pre · coefficient = metric at every layer) where the rules
  promise it (bias-free model, identity / detach / half rules, ε = 0), and is not with plain gradients.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

from backend.attribution.atp import atp
from backend.attribution.patching import activation_patching
from backend.attribution.relp import DEFAULT_RULES, GRADIENT_RULES, RelPRules, relp, rule_hooks
from backend.inputs.tasks import build_task
from backend.model.hooks import hook_name
from backend.model.registry import load_model

KINDS = ("resid", "mlp", "head")


@pytest.fixture(scope="module")
def llama() -> Any:
    model = load_model("tiny-llama")
    model.cfg.dtype = torch.float64
    return model.to(torch.float64)


def _batch(model: Any, n: int = 3) -> Any:
    return build_task("ioi", model, n=n, seed=1)


def _close(a: Any, b: Any, rtol: float = 1e-7, atol: float = 1e-9) -> None:
    for kind in KINDS:
        torch.testing.assert_close(a.values[kind], b.values[kind], rtol=rtol, atol=atol, msg=kind)


def test_rule_hooks_keep_the_forward_pass(llama: Any) -> None:
    tokens = _batch(llama).clean
    with torch.no_grad():
        plain = llama(tokens)
        for rules in (RelPRules(), DEFAULT_RULES, RelPRules(attention="attnlrp", gate="value"), RelPRules(epsilon=0.1),
                      RelPRules(attention="cp-lrp"), RelPRules(norm="gradient", gate="gradient")):
            with llama.hooks(fwd_hooks=rule_hooks(llama, rules)):
                torch.testing.assert_close(llama(tokens), plain, rtol=0, atol=1e-12)


def test_gradient_rules_are_atp(llama: Any) -> None:
    batch = _batch(llama)
    _close(relp(llama, batch, KINDS, rules=GRADIENT_RULES), atp(llama, batch, KINDS))


def test_rules_change_the_estimate(llama: Any) -> None:
    # The non-linear tiny model: the default rules must give different coefficients from plain gradients.
    batch = _batch(llama)
    a, r = atp(llama, batch, KINDS), relp(llama, batch, KINDS)
    assert not torch.allclose(a.values["mlp"], r.values["mlp"], atol=1e-6)


def _linearised_gpt2() -> Any:
    """tiny-gpt2 with every non-linearity removed by permanent hooks: constant norm scales, a fixed causal
    attention pattern and the identity instead of GELU. Logit difference is then linear in every activation."""
    model = load_model("tiny-gpt2").to(torch.float64)
    model.cfg.dtype = torch.float64
    gen = torch.Generator().manual_seed(0)

    def const_scale(x: torch.Tensor, hook: Any) -> torch.Tensor:
        return torch.full_like(x, 1.7)

    def fixed_pattern(p: torch.Tensor, hook: Any) -> torch.Tensor:
        q = p.shape[-1]
        w = torch.rand(p.shape[1], q, q, generator=gen, dtype=p.dtype).tril() + torch.eye(q, dtype=p.dtype)
        w = w / w.sum(-1, keepdim=True)
        return w.expand_as(p).clone()

    def identity_act(post: torch.Tensor, hook: Any) -> torch.Tensor:
        return model.hook_dict[hook.name.replace("hook_post", "hook_pre")].ctx["pre"]

    def keep_pre(pre: torch.Tensor, hook: Any) -> torch.Tensor:
        hook.ctx["pre"] = pre
        return pre

    fixed: dict[str, torch.Tensor] = {}

    def pattern_hook(p: torch.Tensor, hook: Any) -> torch.Tensor:
        key = f"{hook.name}:{p.shape[-1]}"
        if key not in fixed:
            fixed[key] = fixed_pattern(p[:1], hook)[0]
        return fixed[key].expand_as(p)

    for name in model.hook_dict:
        if name.endswith("hook_scale"):
            model.add_hook(name, const_scale, is_permanent=True)
        elif name.endswith("attn.hook_pattern"):
            model.add_hook(name, pattern_hook, is_permanent=True)
        elif name.endswith("mlp.hook_pre"):
            model.add_hook(name, keep_pre, is_permanent=True)
        elif name.endswith("mlp.hook_post"):
            model.add_hook(name, identity_act, is_permanent=True)
    return model


def test_relp_equals_atp_equals_patching_on_a_linear_model() -> None:
    model = _linearised_gpt2()
    batch = _batch(model)
    truth = activation_patching(model, batch, KINDS)
    _close(atp(model, batch, KINDS), truth, rtol=1e-6, atol=1e-8)
    # ("half"/"attnlrp" attention is not exact here by design: it sends half the relevance to a constant pattern.)
    for rules in (RelPRules(epsilon=0.0), RelPRules(attention="gradient", epsilon=0.0)):
        _close(relp(model, batch, KINDS, rules=rules), truth, rtol=1e-6, atol=1e-8)
    assert max(float(truth.values[k].abs().max()) for k in KINDS) > 1e-3  # the check is not vacuous


def _layer_relevance(model: Any, batch: Any, rules: RelPRules) -> tuple[list[float], float]:
    """Σ_pos resid_pre[l] · coefficient[l] per layer, and the clean metric, computed with plain TransformerLens hooks
    independently of backend.attribution.atp. The metric is the batch mean, so the sum runs over examples too."""
    names = [hook_name("resid_pre", layer) for layer in range(model.cfg.n_layers)]
    acts: dict[str, torch.Tensor] = {}

    def keep(x: torch.Tensor, hook: Any) -> torch.Tensor:
        x = x if x.requires_grad else x.detach().requires_grad_(True)
        acts[hook.name] = x
        return x

    with torch.enable_grad(), model.hooks(fwd_hooks=[*rule_hooks(model, rules), *((n, keep) for n in names)]):
        metric = batch.metric(model(batch.clean))
        grads = torch.autograd.grad(metric, [acts[n] for n in names])
    return [float((acts[n].detach() * g).sum()) for n, g in zip(names, grads)], float(metric.detach())


@pytest.mark.parametrize("rules", [RelPRules(epsilon=0.0), RelPRules(gate="value", epsilon=0.0)])
def test_relevance_is_conserved_layer_to_layer(llama: Any, rules: RelPRules) -> None:
    for name, param in llama.named_parameters():  # tiny-llama is bias-free like SmolLM2; make sure
        if name.split(".")[-1].startswith("b_"):
            assert float(param.detach().abs().max()) == 0.0, name
    relevance, metric = _layer_relevance(llama, _batch(llama), rules)
    assert abs(metric) > 1e-4
    for value in relevance:
        assert value == pytest.approx(metric, rel=1e-6, abs=1e-9)


def test_plain_gradients_do_not_conserve_relevance(llama: Any) -> None:
    relevance, metric = _layer_relevance(llama, _batch(llama), GRADIENT_RULES)
    assert max(abs(v - metric) for v in relevance) > 1e-3 * max(1.0, abs(metric))


def test_cp_lrp_is_the_detached_pattern(llama: Any) -> None:
    """Detaching q and k (CP-LRP, as LXT does it) and detaching the pattern are the same propagation."""
    batch = _batch(llama)
    _close(relp(llama, batch, KINDS, rules=RelPRules(attention="cp-lrp")),
           relp(llama, batch, KINDS, rules=RelPRules(attention="detach")), rtol=1e-9, atol=1e-12)


def test_rules_per_kind(llama: Any) -> None:
    """A kind -> rules mapping: each kind gets its own rule set (gradient rules on resid: AtP's resid scores)."""
    batch = _batch(llama)
    mixed = relp(llama, batch, ["resid", "mlp"], rules={"resid": GRADIENT_RULES, "mlp": RelPRules()})
    torch.testing.assert_close(mixed.values["resid"], atp(llama, batch, ["resid"]).values["resid"], rtol=1e-9,
                               atol=1e-12)
    torch.testing.assert_close(mixed.values["mlp"], relp(llama, batch, ["mlp"], rules=RelPRules()).values["mlp"],
                               rtol=1e-9, atol=1e-12)
    assert list(mixed.values) == ["resid", "mlp"] and mixed.examples["resid"].shape[0] == len(batch)
