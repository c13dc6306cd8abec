"""Apply interventions with TransformerLens hooks and compare the intervened run with the unchanged one.

**Features are changed with their dictionary's error held fixed.** An MLP transcoder feature ``i`` of layer ``L``
moves the MLP's output by ``(f'_i − f_i)·W_dec[i]`` at the chosen positions, where ``f_i`` is the feature's activation
on that run's own MLP input and ``f'_i`` the new one (0, ``c·f_i`` or a set value); an attention-SAE feature moves
``hook_z`` by ``(f'_i − f_i)·W_dec[i]`` reshaped per head. Everything the dictionary does not explain stays as the
model computes it, so an intervention on a feature that is not firing with mode "scale" or "zero" changes nothing.
A head intervention multiplies that head's ``hook_z`` (its output before ``W_O``) by 0 or the factor.

Two models (``mode``):

* ``"live"`` — the model itself: attention patterns, norms and every MLP recomputed on the intervened stream.
* ``"frozen"`` — the local replacement model an attribution graph explains: attention patterns and every norm's scale
  held at the prompt's clean values, each MLP replaced by its transcoder (features recomputed from the intervened
  input) plus its clean error, attention-SAE layers by their features plus their clean error, MLPs without a
  transcoder held at their clean output. With no intervention it reproduces the clean run exactly; it is defined for
  the prompt's own positions only, so it has no continuation.

Written by hand: neither TransformerLens nor sae-lens ships feature steering with the error held fixed or a frozen
replacement model.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Mapping, Sequence

from backend.errors import InputError, literal
from backend.interventions.spec import Intervention
from backend.model.hooks import FINAL_SCALE, hook_name

if TYPE_CHECKING:
    import torch

MODES: tuple[str, ...] = ("live", "frozen")
MAX_CONTINUATION = 64  # greedy tokens generated at most (one forward pass each)
MAX_TOP_K = 100  # next tokens listed at most
FROZEN_NO_CONTINUATION = ("The frozen replacement model is defined on the prompt's positions only: it has no "
                          "continuation (use the live model for one).")


@dataclass
class Outcome:
    """One run's next-token prediction at the last prompt position: the top tokens and probabilities, the metric
    (when a target was given), the probability of the unchanged run's top token, and a greedy continuation."""

    top_ids: list[int]
    top_probs: list[float]
    metric: float | None
    reference_prob: float
    continuation: list[int] = field(default_factory=list)


@dataclass
class InterventionResult:
    """An intervened run beside the unchanged one, with KL(unchanged ‖ intervened) of the next-token distribution."""

    mode: str
    interventions: list[Intervention]
    baseline: Outcome
    intervened: Outcome
    kl: float
    metric_name: str | None

    @property
    def metric_change(self) -> float | None:
        """Intervened − unchanged metric (None without a target)."""
        if self.baseline.metric is None or self.intervened.metric is None:
            return None
        return self.intervened.metric - self.baseline.metric


def _positions_mask(n_pos: int, positions: Sequence[int] | None) -> "torch.Tensor":
    """Bool [n_pos]: where an intervention applies (None: every position after BOS)."""
    import torch

    mask = torch.zeros(n_pos, dtype=torch.bool)
    if positions is None:
        mask[1:] = True
    else:
        idx = [p for p in positions if 0 < p < n_pos]
        mask[idx] = True
    return mask


def intervention_hooks(interventions: Sequence[Intervention], transcoders: Mapping[int, Any],
                       attn_saes: Mapping[int, Any]) -> list[tuple[str, Any]]:
    """TransformerLens ``fwd_hooks`` applying ``interventions`` to any run (live, or after the frozen replacement
    hooks on the same hook points): see the module docstring. Batch 1, any number of positions."""
    import torch

    from backend.dictionaries.attention_sae import encode_z

    hooks: list[tuple[str, Any]] = []
    by_site: dict[tuple[str, int], list[Intervention]] = {}
    for i in interventions:
        by_site.setdefault(("z" if i.kind in ("attn", "head") else "mlp", i.layer), []).append(i)
    for (site, layer), items in sorted(by_site.items()):
        if site == "mlp":
            tc = transcoders[layer]
            stash: dict[str, torch.Tensor] = {}

            def keep_input(x: torch.Tensor, hook: Any, stash: dict[str, torch.Tensor] = stash) -> None:
                stash["x"] = x

            def change_mlp(y: torch.Tensor, hook: Any, items: list[Intervention] = items, tc: Any = tc,
                           stash: dict[str, torch.Tensor] = stash) -> torch.Tensor:
                f = tc.encode(stash.pop("x")[0].float())  # [pos, d_sae]
                delta = torch.zeros_like(y[0])
                for i in items:
                    where = _positions_mask(y.shape[1], i.positions)
                    old = f[:, i.index]
                    change = (i.new_value(old) - old) * where
                    delta = delta + change[:, None] * tc.W_dec[i.index].to(y.dtype)
                return y + delta[None]

            hooks += [(hook_name("mlp_in", layer), keep_input), (hook_name("mlp_out", layer), change_mlp)]
        else:
            sae = attn_saes.get(layer)

            def change_z(z: torch.Tensor, hook: Any, items: list[Intervention] = items, sae: Any = sae) -> torch.Tensor:
                z = z.clone()
                n_pos, n_heads, d_head = z.shape[1], z.shape[2], z.shape[3]
                feats = [i for i in items if i.kind == "attn"]
                if feats:
                    f = encode_z(sae, z[0].reshape(n_pos, -1))  # [pos, d_sae]
                    delta = torch.zeros(n_pos, n_heads * d_head, dtype=z.dtype)
                    for i in feats:
                        where = _positions_mask(n_pos, i.positions)
                        old = f[:, i.index]
                        delta = delta + ((i.new_value(old) - old) * where)[:, None] * sae.W_dec[i.index].to(z.dtype)
                    z = z + delta.reshape(1, n_pos, n_heads, d_head)
                for i in items:
                    if i.kind == "head":
                        where = _positions_mask(n_pos, i.positions)
                        z[0, where, i.index] = i.new_value(z[0, where, i.index])  # type: ignore[assignment]
                return z

            hooks.append((hook_name("z", layer), change_z))
    return hooks


@dataclass
class FrozenState:
    """What the frozen replacement model holds at the prompt's clean values: attention patterns, norm scales, each
    MLP's error (output − transcoder) or whole output (no transcoder), each attention-SAE layer's error in z."""

    patterns: dict[int, "torch.Tensor"]
    scales: dict[str, "torch.Tensor"]
    mlp_error: dict[int, "torch.Tensor"]
    mlp_out: dict[int, "torch.Tensor"]
    z_error: dict[int, "torch.Tensor"]


def frozen_state(model: Any, tokens: "torch.Tensor", transcoders: Mapping[int, Any],
                 attn_saes: Mapping[int, Any]) -> FrozenState:
    """Record the clean run of ``tokens`` ``[1, pos]`` that the frozen replacement model holds fixed."""
    import torch

    from backend.dictionaries.attention_sae import reconstruct

    L = model.cfg.n_layers
    names = [FINAL_SCALE] + [hook_name(k, l) for l in range(L)
                             for k in ("pattern", "attn_scale", "mlp_scale", "mlp_in", "mlp_out", "z")]
    with torch.no_grad():
        _, cache = model.run_with_cache(tokens, names_filter=names)
        mlp_error, mlp_out, z_error = {}, {}, {}
        for l in range(L):
            y = cache[hook_name("mlp_out", l)]
            if l in transcoders:
                mlp_error[l] = y - transcoders[l](cache[hook_name("mlp_in", l)][0].float())[None].to(y.dtype)
            else:
                mlp_out[l] = y
            if l in attn_saes:
                z = cache[hook_name("z", l)]
                z_error[l] = z - reconstruct(attn_saes[l], z[0]).reshape(z.shape).to(z.dtype)
    scales = {name: cache[name] for name in names if name.endswith("hook_scale")}
    return FrozenState(patterns={l: cache[hook_name("pattern", l)] for l in range(L)}, scales=scales,
                       mlp_error=mlp_error, mlp_out=mlp_out, z_error=z_error)


def frozen_hooks(state: FrozenState, transcoders: Mapping[int, Any], attn_saes: Mapping[int, Any]) -> list[tuple[str, Any]]:
    """``fwd_hooks`` turning the model into the frozen replacement model of the recorded prompt (module docstring).
    They come before :func:`intervention_hooks` on shared hook points, so interventions see replacement values."""
    from backend.dictionaries.attention_sae import reconstruct

    hooks: list[tuple[str, Any]] = []
    for name, value in state.scales.items():
        hooks.append((name, lambda act, hook, value=value: value))
    for layer, pattern in state.patterns.items():
        hooks.append((hook_name("pattern", layer), lambda act, hook, pattern=pattern: pattern))
    for layer, sae in attn_saes.items():
        err = state.z_error[layer]

        def replace_z(z: Any, hook: Any, sae: Any = sae, err: Any = err) -> Any:
            return reconstruct(sae, z[0]).reshape(z.shape).to(z.dtype) + err

        hooks.append((hook_name("z", layer), replace_z))
    for layer, tc in transcoders.items():
        stash: dict[str, Any] = {}
        err = state.mlp_error[layer]

        def keep_input(x: Any, hook: Any, stash: dict[str, Any] = stash) -> None:
            stash["x"] = x

        def replace_mlp(y: Any, hook: Any, tc: Any = tc, err: Any = err, stash: dict[str, Any] = stash) -> Any:
            return tc(stash.pop("x")[0].float())[None].to(y.dtype) + err

        hooks += [(hook_name("mlp_in", layer), keep_input), (hook_name("mlp_out", layer), replace_mlp)]
    for layer, y in state.mlp_out.items():
        hooks.append((hook_name("mlp_out", layer), lambda act, hook, y=y: y))
    return hooks


def _metric(logits: "torch.Tensor", target: tuple[int, int | None] | None) -> float | None:
    """The graphs' metric at the last position: logit(answer) − logit(wrong), or logit(answer) − mean logit."""
    if target is None:
        return None
    answer, wrong = target
    last = logits[-1].double()
    return float(last[answer] - (last[wrong] if wrong is not None else last.mean()))


def run_intervention(model: Any, token_ids: Sequence[int], interventions: Sequence[Intervention],
                     transcoders: Mapping[int, Any], attn_saes: Mapping[int, Any], mode: str = "live",
                     target: tuple[int, int | None] | None = None, top_k: int = 10,
                     continue_tokens: int = 0) -> InterventionResult:
    """Run ``token_ids`` (BOS first) unchanged and with ``interventions``, in the ``mode`` model ("live" or
    "frozen"), and compare: top-``top_k`` next tokens, the metric for ``target`` ``(answer, wrong or None)``, the
    probability of the unchanged run's top token, KL, and (live only) ``continue_tokens`` greedy tokens each."""
    import torch

    if mode not in MODES:
        raise InputError(f"Unknown intervention model {literal(mode)}: use one of {', '.join(MODES)}.")
    if mode == "frozen" and continue_tokens:
        raise InputError(FROZEN_NO_CONTINUATION)
    if not 0 <= int(continue_tokens) <= MAX_CONTINUATION:
        raise InputError(f"A continuation has 0-{MAX_CONTINUATION} tokens, not {continue_tokens}.")
    missing = sorted({(i.kind, i.layer) for i in interventions if (i.kind == "transcoder" and i.layer not in transcoders)
                      or (i.kind == "attn" and i.layer not in attn_saes)})
    if missing:
        raise InputError(f"No dictionary for {missing[0][0]} at layer {missing[0][1]}: pick a layer that has one.")
    tokens = torch.tensor([list(token_ids)], dtype=torch.long)
    base_hooks: list[tuple[str, Any]] = []
    if mode == "frozen":
        state = frozen_state(model, tokens, transcoders, attn_saes)
        base_hooks = frozen_hooks(state, transcoders, attn_saes)
    changed = base_hooks + intervention_hooks(interventions, transcoders, attn_saes)

    def outcome(hooks: list[tuple[str, Any]], reference: int | None) -> tuple[Outcome, "torch.Tensor"]:
        with torch.no_grad():
            logits = model.run_with_hooks(tokens, fwd_hooks=hooks)[0].float()
        logprobs = logits[-1].log_softmax(-1)
        top = logprobs.topk(top_k)
        ref = int(top.indices[0]) if reference is None else reference
        out = Outcome(top_ids=top.indices.tolist(), top_probs=top.values.exp().tolist(),
                      metric=_metric(logits, target), reference_prob=float(logprobs[ref].exp()))
        if continue_tokens:
            out.continuation = _greedy(model, tokens, hooks, int(continue_tokens))
        return out, logprobs

    baseline, lp_base = outcome(base_hooks, None)
    intervened, lp_new = outcome(changed, baseline.top_ids[0])
    kl = float((lp_base.exp() * (lp_base - lp_new)).sum())
    metric_name = None
    if target is not None:
        metric_name = "logit difference" if target[1] is not None else "logit − mean logit"
    return InterventionResult(mode=mode, interventions=list(interventions), baseline=baseline, intervened=intervened,
                              kl=kl, metric_name=metric_name)


def _greedy(model: Any, tokens: "torch.Tensor", hooks: list[tuple[str, Any]], n: int) -> list[int]:
    """``n`` greedy tokens after ``tokens`` with ``hooks`` on every step (position-wise hooks see the longer
    sequence; interventions without explicit positions apply to the new tokens too)."""
    import torch

    seq = tokens
    out = []
    with torch.no_grad():
        for _ in range(n):
            nxt = int(model.run_with_hooks(seq, fwd_hooks=hooks)[0, -1].argmax())
            out.append(nxt)
            seq = torch.cat([seq, torch.tensor([[nxt]])], dim=1)
    return out


def intervene_on_prompt(model: Any, prompt: str | bytes, interventions: str | Sequence[Intervention],
                        transcoders: Mapping[int, Any], attn_saes: Mapping[int, Any], mode: str = "live",
                        answer: str | None = None, wrong: str | None = None, top_k: int = 10,
                        continue_tokens: int = 0, max_tokens: int | None = None) -> InterventionResult:
    """:func:`run_intervention` on a prompt given as text: the interventions (a spec string such as
    ``"tc:5:123=0@3; head:2.1*0"``, or parsed ones) are checked against the model and the dictionaries, and the metric
    is logit(answer) − mean logit (or − logit(wrong)) when ``answer`` is given; the prompt is cut to ``max_tokens``
    tokens as :func:`backend.inputs.prompts.encode_prompt` does. What the CLI, the Python API and the Prompt Explorer
    run."""
    from backend.circuits.build import resolve_target
    from backend.inputs.prompts import encode_prompt
    from backend.interventions.spec import check, parse

    if not 1 <= top_k <= MAX_TOP_K:
        raise InputError(f"top_k is a whole number from 1 to {MAX_TOP_K}, not {top_k}.")
    if wrong is not None and answer is None:
        raise InputError("A wrong answer needs an answer: the metric is logit(answer) − logit(wrong).")
    parsed = parse(interventions) if isinstance(interventions, str) else list(interventions)
    widths = {("transcoder", l): int(t.cfg.d_sae) for l, t in transcoders.items()}
    widths.update({("attn", l): int(s.cfg.d_sae) for l, s in attn_saes.items()})
    enc = encode_prompt(model, prompt, max_tokens=max_tokens)
    for i in parsed:
        check(i, model.cfg.n_layers, model.cfg.n_heads, widths, n_positions=len(enc.ids))
    target = None
    if answer is not None:
        t = resolve_target(model, enc.ids, answer, wrong)
        target = (t.token_id, t.wrong_id)
    return run_intervention(model, enc.ids, parsed, transcoders, attn_saes, mode=mode, target=target, top_k=top_k,
                            continue_tokens=continue_tokens)
