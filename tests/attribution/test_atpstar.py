"""AtP* (backend/attribution/atpstar.py) against computations written here with plain TransformerLens hooks:

* with both repairs off it is attribution patching (a hand-written gradient × delta);
* the QK fix: the pattern recomputed by actually running the model with the corrupt queries (all positions) or the
  corrupt key of one position, times the hand-written gradient at the pattern, plus the value term;
* GradDrop: the hand-written estimate with block l's outputs detached, |·| summed over l, divided by L − 1, with the
  sign of the undropped estimate.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

from backend.attribution.atpstar import atp_star
from backend.inputs.tasks import build_task
from backend.model.hooks import hook_name
from backend.model.registry import load_model


@pytest.fixture(scope="module")
def llama() -> Any:
    model = load_model("tiny-llama")
    model.cfg.dtype = torch.float64
    return model.to(torch.float64)


@pytest.fixture(scope="module")
def batch(llama: Any) -> Any:
    return build_task("ioi", llama, n=3, seed=1)


def _grads(model: Any, batch: Any, names: list[str], extra: list[Any] | None = None) -> dict[str, torch.Tensor]:
    """Activations (clean) and gradients of the summed per-example metric at ``names``, plain hooks."""
    acts: dict[str, torch.Tensor] = {}

    def leaf(x: torch.Tensor, hook: Any) -> torch.Tensor:
        acts[hook.name] = x
        return x

    with torch.enable_grad():
        logits = model.run_with_hooks(batch.clean, fwd_hooks=[*((n, leaf) for n in names), *(extra or [])])
        total = batch.metric_per_example(logits).sum()
        grads = torch.autograd.grad(total, [acts[n] for n in names], allow_unused=True)
    return {n: (torch.zeros_like(acts[n]) if g is None else g) for n, g in zip(names, grads)} | \
        {f"act:{n}": acts[n].detach() for n in names}


def _corrupt(model: Any, batch: Any, names: list[str]) -> dict[str, torch.Tensor]:
    with torch.no_grad():
        _, cache = model.run_with_cache(batch.corrupt, names_filter=names)
    return {n: cache[n] for n in names}


def test_without_repairs_it_is_atp(llama: Any, batch: Any) -> None:
    names = [hook_name("resid_pre", 1), hook_name("mlp_out", 0), hook_name("z", 1)]
    g, c = _grads(llama, batch, names), _corrupt(llama, batch, names)
    got = atp_star(llama, batch, ["resid", "mlp", "head"], qk_fix=False, grad_drop=False)
    d = {n: g[n] * (c[n] - g[f"act:{n}"]) for n in names}
    torch.testing.assert_close(got.examples["resid"][:, 1], d[names[0]].sum(-1), rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(got.examples["mlp"][:, 0], d[names[1]].sum(-1), rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(got.examples["head"][:, 1], d[names[2]].sum((1, 3)), rtol=1e-9, atol=1e-12)


def test_qk_fix_recomputes_the_softmax(llama: Any, batch: Any) -> None:
    layer = 1
    pat, z, q, k, v = (f"blocks.{layer}.attn.{h}" for h in ("hook_pattern", "hook_z", "hook_rot_q", "hook_rot_k",
                                                            "hook_v"))
    g = _grads(llama, batch, [pat, z])
    c = _corrupt(llama, batch, [q, k, v])
    clean = _corrupt(llama, type(batch)(**{**batch.__dict__, "corrupt": batch.clean}), [q, k, v, pat])
    a = clean[pat]

    def pattern_with(name: str, value: torch.Tensor) -> torch.Tensor:
        out: dict[str, torch.Tensor] = {}

        def put(x: torch.Tensor, hook: Any) -> torch.Tensor:
            return value

        def keep(p: torch.Tensor, hook: Any) -> torch.Tensor:
            out["p"] = p
            return p

        with torch.no_grad():
            llama.run_with_hooks(batch.clean, fwd_hooks=[(name, put), (pat, keep)])
        return out["p"]

    q_part = (g[pat] * (pattern_with(q, c[q]) - a)).sum((2, 3))  # every query corrupted at once: rows independent
    k_part = torch.zeros_like(q_part)
    for s in range(batch.seq_len):  # one key position at a time
        key = clean[k].clone()
        key[:, s] = c[k][:, s]
        k_part += (g[pat] * (pattern_with(k, key) - a)).sum((2, 3))
    rep = llama.cfg.n_heads // c[v].shape[2]
    dv = torch.repeat_interleave(c[v] - clean[v], rep, dim=2)
    v_part = (g[z] * torch.einsum("bhts,bshd->bthd", a, dv)).sum((1, 3))
    expected = q_part + k_part + v_part
    assert float(k_part.abs().max()) > 1e-4 and float(q_part.abs().max()) > 1e-4
    got = atp_star(llama, batch, ["head"], grad_drop=False).examples["head"][:, layer]
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-9)


def test_graddrop_aggregation(llama: Any, batch: Any) -> None:
    names = [hook_name("resid_pre", 1), hook_name("mlp_out", 0)]
    c = _corrupt(llama, batch, names)
    n_layers = llama.cfg.n_layers

    def estimate(drop: int | None) -> dict[str, torch.Tensor]:
        # block ``drop``'s writes to the residual stream detached: no gradient flows into that block
        extra = [] if drop is None else [(hook_name(h, drop), lambda x, hook: x.detach())
                                        for h in ("attn_out", "mlp_out")]
        g = _grads(llama, batch, names, extra)
        return {n: (g[n] * (c[n] - g[f"act:{n}"])).sum(-1) for n in names}

    plain = estimate(None)
    dropped = [estimate(layer) for layer in range(n_layers)]
    got = atp_star(llama, batch, ["resid", "mlp"], qk_fix=False)
    for kind, name, layer in (("resid", names[0], 1), ("mlp", names[1], 0)):
        magnitude = sum(d[name].abs() for d in dropped) / (n_layers - 1)
        expected = torch.sign(plain[name]) * magnitude
        assert float(expected.abs().max()) > 1e-5
        torch.testing.assert_close(got.examples[kind][:, layer], expected, rtol=1e-9, atol=1e-12, msg=kind)
