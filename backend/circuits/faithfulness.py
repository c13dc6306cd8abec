"""Faithfulness of a pruned circuit: run the model with everything outside it ablated.

The run is the real (nonlinear) replacement model — live attention patterns and norms, every transcoder's
features recomputed from its live input — built from TransformerLens hooks:

* each MLP with a transcoder outputs ``Σ_{i in circuit} f_i W_dec[i] + b_dec`` plus its skip term ``x W_skipᵀ``
  (skip transcoders: a path, never ablated) plus its error node if that error node is in the circuit; features
  outside the circuit are ablated;
* attention-SAE layers likewise (features recomputed from the live ``hook_z``, plus the attention-error node);
* attention of every other layer runs live and is always kept: it is a pass-through of the graph, not a node
  (graphs stored with ``head`` nodes, before that change, still ablate their heads as they were built to);
* layers without a transcoder: the MLP error node is the whole MLP output (kept or ablated);
* token embeddings and everything at BOS (position 0) are always kept: they are the input.

**Error nodes** (``errors``): ``"frozen"`` keeps a kept error node at its clean value (the graph's own
assumption); ``"live"`` recomputes it on the current input, ``MLP(x') − transcoder(x')`` (and
``z' − SAE(z')``), so a kept error also carries the part of the MLP the transcoder misses on the ablated run.
Both are reported side by side: a circuit that is only faithful with frozen errors leans on the errors' clean
values.

**Ablation** (``mode``): ``"zero"`` sets an ablated node to 0; ``"mean"`` sets it to its mean over reference
tokens (non-BOS positions of corpus contexts: a feature's mean activation, an error node's mean vector), which
keeps activations on-distribution — the usual choice when a circuit is judged (Wang et al. 2022). Reported: the
metric with the circuit, with everything kept (the clean metric: error nodes make the replacement exact, so it is
read from the clean run), with every node ablated, and ``fraction = (circuit − none) / (full − none)`` — unless that ratio means nothing
(:attr:`Faithfulness.caveat`): when everything-ablated is on the wrong side of the full model, or the two differ
by less than :data:`SMALL_DENOMINATOR` of the metric, one sentence says so instead.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

from backend.circuits.graph import Graph, has_head_nodes
from backend.model.hooks import hook_name

if TYPE_CHECKING:
    from pathlib import Path

    import torch

MODES: tuple[str, ...] = ("zero", "mean")
ERROR_MODES: tuple[str, ...] = ("frozen", "live")
SMALL_DENOMINATOR = 0.1  # |full − none| below this share of max(|full|, |none|): no fraction is reported


@dataclass
class Faithfulness:
    """Metric values of one check (see the module docstring)."""

    mode: str
    metric_full: float
    metric_circuit: float
    metric_empty: float
    n_nodes: int
    errors: str = "frozen"

    @property
    def fraction(self) -> float:
        """(circuit − empty) / (full − empty): the share of the metric the circuit keeps (read it only when
        :attr:`caveat` is None)."""
        denom = self.metric_full - self.metric_empty
        return (self.metric_circuit - self.metric_empty) / denom if denom != 0 else float("nan")

    @property
    def caveat(self) -> str | None:
        """One sentence when the fraction kept means nothing — everything-ablated on the wrong side of the full
        model, or a denominator that is small next to the metric — else None."""
        full, empty, circuit = self.metric_full, self.metric_empty, self.metric_circuit
        denom = full - empty
        if denom * full <= 0 and full != 0:
            return (f"With everything ablated the metric is {empty:.3f}, at or beyond the full model's {full:.3f}: "
                    f"ablation does not remove the behaviour, so no fraction kept is given (circuit alone "
                    f"{circuit:.3f}).")
        if abs(denom) < SMALL_DENOMINATOR * max(abs(full), abs(empty), 1e-9):
            return (f"The full model ({full:.3f}) and everything ablated ({empty:.3f}) differ by only "
                    f"{abs(denom):.3f}, too little for a fraction kept to mean anything (circuit alone "
                    f"{circuit:.3f}).")
        return None

    def summary(self) -> str:
        """One line: the three metrics and the fraction kept, or the caveat in its place."""
        head = (f"{self.errors} errors, {self.mode} ablation: circuit {self.metric_circuit:.3f}, full "
                f"{self.metric_full:.3f}, nothing {self.metric_empty:.3f}")
        return f"{head} -> {self.caveat}" if self.caveat else f"{head} -> fraction kept {self.fraction:.3f}"

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "fraction": self.fraction, "caveat": self.caveat}


@dataclass
class Means:
    """Reference means for mean ablation, per layer: transcoder activations [d_sae], z [H, d_head] (for graphs
    with head nodes), MLP error [d_model], attention-SAE activations [d_sae] and attention error (in z space)
    [H, d_head]."""

    tc_acts: dict[int, "torch.Tensor"]
    z: dict[int, "torch.Tensor"]
    mlp_error: dict[int, "torch.Tensor"]
    sae_acts: dict[int, "torch.Tensor"]
    z_error: dict[int, "torch.Tensor"]


def _skip(tc: Any, x: "torch.Tensor") -> "torch.Tensor | float":
    from backend.circuits.replacement import skip_weight

    W = skip_weight(tc)
    return 0.0 if W is None else x @ W.T


def reference_means(model: Any, transcoders: dict[int, Any], attn_saes: dict[int, Any] | None,
                    tokens: "torch.Tensor") -> Means:
    """Means over the non-BOS positions of ``tokens`` ``[n, ctx]`` (BOS first) for mean ablation."""
    import torch

    from backend.dictionaries.attention_sae import encode_z

    attn_saes = attn_saes or {}
    names = [hook_name(k, l) for l in range(model.cfg.n_layers) for k in ("z", "mlp_in", "mlp_out")]
    with torch.no_grad():
        _, cache = model.run_with_cache(tokens, names_filter=names)
    m = Means({}, {}, {}, {}, {})
    for layer in range(model.cfg.n_layers):
        z = cache[hook_name("z", layer)][:, 1:].float()
        m.z[layer] = z.mean((0, 1))
        y = cache[hook_name("mlp_out", layer)][:, 1:].float()
        tc = transcoders.get(layer)
        with torch.no_grad():
            if tc is not None:
                x = cache[hook_name("mlp_in", layer)][:, 1:].float()
                m.tc_acts[layer] = tc.encode(x).mean((0, 1))
                m.mlp_error[layer] = (y - tc.forward(x)).mean((0, 1))
            else:
                m.mlp_error[layer] = y.mean((0, 1))
            if layer in attn_saes:
                sae = attn_saes[layer]
                flat = z.reshape(*z.shape[:2], -1)
                f = encode_z(sae, flat)
                m.sae_acts[layer] = f.mean((0, 1))
                m.z_error[layer] = (flat - _decode(sae, f)).mean((0, 1)).reshape(z.shape[-2], -1)
    return m


def _masks(graph: Graph, n_layers: int, n_heads: int, n_pos: int, transcoders: dict[int, Any],
           attn_saes: dict[int, Any]) -> dict[str, Any]:
    """Which nodes are in the circuit, as boolean tensors per layer."""
    import torch

    keep: dict[str, Any] = {
        "tc": {l: torch.zeros(n_pos, tc.cfg.d_sae, dtype=torch.bool) for l, tc in transcoders.items()},
        "sae": {l: torch.zeros(n_pos, s.cfg.d_sae, dtype=torch.bool) for l, s in attn_saes.items()},
        "head": torch.zeros(n_layers, n_pos, n_heads, dtype=torch.bool),
        "mlp_error": torch.zeros(n_layers, n_pos, dtype=torch.bool),
        "attn_error": torch.zeros(n_layers, n_pos, dtype=torch.bool),
    }
    for row in graph.nodes.itertuples():
        k, l, p = row.kind, int(row.layer), int(row.pos)
        if k == "transcoder":
            keep["tc"][l][p, int(row.feature)] = True
        elif k == "attn_feature":
            keep["sae"][l][p, int(row.feature)] = True
        elif k == "head":
            keep["head"][l, p, int(row.feature)] = True
        elif k == "mlp_error":
            keep["mlp_error"][l, p] = True
        elif k == "attn_error":
            keep["attn_error"][l, p] = True
    return keep


def check(model: Any, graph: Graph, transcoders: dict[int, Any], attn_saes: dict[int, Any] | None = None,
          mode: str = "zero", means: Means | None = None, errors: str = "frozen") -> Faithfulness:
    """Run the faithfulness check of the (pruned) ``graph`` with error nodes ``errors`` ("frozen" or "live"):
    see the module docstring."""
    return _checks(model, graph, transcoders, attn_saes, mode, means, (errors,))[errors]


def check_both(model: Any, graph: Graph, transcoders: dict[int, Any], attn_saes: dict[int, Any] | None = None,
               mode: str = "zero", means: Means | None = None, recording: Any = None) -> dict[str, Faithfulness]:
    """:func:`check` with frozen and with live error nodes, ``{"frozen": ..., "live": ...}`` (one batched run).
    ``recording``: the clean run of the graph's prompt if the caller has it (the build's
    :class:`backend.circuits.replacement.Recording`), which saves a forward pass."""
    return _checks(model, graph, transcoders, attn_saes, mode, means, ERROR_MODES, recording)


def _checks(model: Any, graph: Graph, transcoders: dict[int, Any], attn_saes: dict[int, Any] | None, mode: str,
            means: Means | None, error_modes: tuple[str, ...], recording: Any = None) -> dict[str, Faithfulness]:
    if mode not in MODES:
        raise ValueError(f"unknown ablation mode {mode!r}; use one of {', '.join(MODES)}")
    for errors in error_modes:
        if errors not in ERROR_MODES:
            raise ValueError(f"unknown error-node mode {errors!r}; use one of {', '.join(ERROR_MODES)}")
    if mode == "mean" and means is None:
        raise ValueError("mean ablation needs reference means (reference_means)")
    attn_saes = attn_saes or {}
    clean = _clean_state(model, graph, transcoders, attn_saes, recording)
    # With every node kept the replacement is exact (error nodes hold the rest), so "full" is the clean run's metric.
    # The circuit with each error mode and the empty circuit (the same for both modes: no error node is kept) are
    # the rows of one batched forward pass.
    configs = [("circuit", errors) for errors in error_modes] + [("none", error_modes[0])]
    values = _metrics(model, graph, transcoders, attn_saes, mode, means, configs, clean)
    out = {}
    for errors in error_modes:
        out[errors] = Faithfulness(mode=mode, metric_full=clean["metric"], metric_circuit=values[configs.index(
            ("circuit", errors))], metric_empty=values[-1], n_nodes=len(graph.nodes), errors=errors)
    return out


def _clean_state(model: Any, graph: Graph, transcoders: dict[int, Any], attn_saes: dict[int, Any],
                 recording: Any = None) -> dict[str, Any]:
    """The clean run's MLP outputs, each dictionary's error on it (the frozen error nodes' values) and the metric,
    from ``recording`` (the same prompt's clean run, batch dim dropped) or a new run."""
    import torch

    from backend.dictionaries.attention_sae import encode_z

    tokens = torch.tensor(graph.metadata["token_ids"])
    n_layers, P = model.cfg.n_layers, len(tokens)
    names = [hook_name(k, l) for l in range(n_layers) for k in ("mlp_in", "mlp_out", "z")]
    with torch.no_grad():
        if recording is not None and torch.equal(recording.tokens, tokens):
            logits, cache = recording.logits[None], {n: recording.acts[n][None] for n in names}
        else:
            logits, cache = model.run_with_cache(tokens[None], names_filter=names)
        mlp_out = {l: cache[hook_name("mlp_out", l)][0] for l in range(n_layers)}
        mlp_err = {l: mlp_out[l] - tc.forward(cache[hook_name("mlp_in", l)][0]) for l, tc in transcoders.items()}
        z_err = {}
        for l, sae in attn_saes.items():
            zc = cache[hook_name("z", l)][0].reshape(P, -1)
            z_err[l] = zc - _decode(sae, encode_z(sae, zc))
    return {"mlp_out": mlp_out, "mlp_error": mlp_err, "z_error": z_err,
            "metric": _metric_of(logits[:, -1], graph.metadata["target"])[0]}


def _decode(sae: Any, f: "torch.Tensor") -> "torch.Tensor":
    """An attention SAE's reconstruction, flat (sae-lens' hook_z mode would return it as [..., heads, d_head])."""
    return sae.decode(f).reshape(*f.shape[:-1], -1)


def _metrics(model: Any, graph: Graph, transcoders: dict[int, Any], attn_saes: dict[int, Any], mode: str,
             means: Means | None, configs: list[tuple[str, str]], clean: dict[str, Any]) -> list[float]:
    """The metric for each ``(which, errors)`` config — which nodes are kept ("all", "circuit", "none") and how
    kept error nodes are valued ("frozen", "live") — as the rows of one batched forward pass."""
    import torch

    from backend.dictionaries.attention_sae import encode_z

    tokens = torch.tensor(graph.metadata["token_ids"])
    target = graph.metadata["target"]
    cfg = model.cfg
    P, H, B = len(tokens), cfg.n_heads, len(configs)
    heads_are_nodes = has_head_nodes(graph)
    live_errors = torch.tensor([errors == "live" for _, errors in configs])
    circuit = _masks(graph, cfg.n_layers, H, P, transcoders, attn_saes)

    def rows(kind: str, layer: int | None = None) -> torch.Tensor:
        """The keep mask of ``kind`` (at ``layer``) for every row: the circuit's, everything or nothing; BOS kept."""
        base = circuit[kind] if layer is None else circuit[kind][layer]
        out = torch.stack([base if which == "circuit" else torch.full_like(base, which == "all")
                           for which, _ in configs])
        out[(slice(None), 0) if layer is not None else (slice(None), slice(None), 0)] = True
        return out

    keep_tc = {l: rows("tc", l) for l in transcoders}
    keep_sae = {l: rows("sae", l) for l in attn_saes}
    keep_head, keep_mlp_err, keep_attn_err = rows("head"), rows("mlp_error"), rows("attn_error")  # [B, L, P(, H)]
    live: dict[str, torch.Tensor] = {}

    def save_in(act: torch.Tensor, hook: Any) -> None:
        live[hook.name] = act

    def fill(kind: str, layer: int, like: torch.Tensor) -> torch.Tensor:
        if mode == "zero":
            return torch.zeros_like(like)
        return getattr(means, kind)[layer].reshape(-1).expand_as(like)

    def choose_error(err_live: torch.Tensor, err_frozen: torch.Tensor) -> torch.Tensor:
        return torch.where(live_errors[:, None, None], err_live, err_frozen[None].expand_as(err_live))

    def mlp_hook(layer: int) -> Any:
        def hook(y_live: torch.Tensor, hook: Any) -> torch.Tensor:
            tc = transcoders.get(layer)
            keep_err = keep_mlp_err[:, layer][..., None]
            if tc is None:
                err = choose_error(y_live, clean["mlp_out"][layer])
                y = torch.where(keep_err, err, fill("mlp_error", layer, err))
            else:
                x = live[hook_name("mlp_in", layer)]
                f_live = tc.encode(x)
                skip = _skip(tc, x)  # the skip term is a path: always live
                err = choose_error(y_live - (tc.decode(f_live) + skip), clean["mlp_error"][layer])
                err = torch.where(keep_err, err, fill("mlp_error", layer, err))
                f = torch.where(keep_tc[layer], f_live, fill("tc_acts", layer, f_live))
                y = tc.decode(f) + skip + err
            y[:, 0] = y_live[:, 0]  # BOS: untouched
            return y
        return hook

    def z_hook(layer: int) -> Any:
        def hook(z: torch.Tensor, hook: Any) -> torch.Tensor:
            if layer in attn_saes:
                sae = attn_saes[layer]
                flat = z.reshape(B, P, -1)
                f_live = encode_z(sae, flat)
                f = torch.where(keep_sae[layer], f_live, fill("sae_acts", layer, f_live))
                err = choose_error(flat - _decode(sae, f_live), clean["z_error"][layer])
                err = torch.where(keep_attn_err[:, layer][..., None], err, fill("z_error", layer, err))
                new = _decode(sae, f) + err
                new[:, 0] = flat[:, 0]
                return new.reshape(z.shape)
            if not heads_are_nodes:
                return z  # attention is a pass-through: live and always kept
            ablated = torch.zeros_like(z) if mode == "zero" else means.z[layer].expand_as(z)  # type: ignore[union-attr]
            return torch.where(keep_head[:, layer][..., None], z, ablated)
        return hook

    hooks = []
    for layer in range(cfg.n_layers):
        hooks.append((hook_name("mlp_in", layer), save_in))
        hooks.append((hook_name("mlp_out", layer), mlp_hook(layer)))
        hooks.append((hook_name("z", layer), z_hook(layer)))
    with torch.no_grad():
        logits = model.run_with_hooks(tokens[None].expand(B, -1), fwd_hooks=hooks)[:, -1]
    return _metric_of(logits, target)


def _metric_of(logits: "torch.Tensor", target: dict[str, Any]) -> list[float]:
    """The target's metric for each row of last-position logits ``[B, vocab]``."""
    value = logits[:, int(target["token_id"])]
    if target.get("wrong_id") is not None:
        value = value - logits[:, int(target["wrong_id"])]
    elif target.get("demeaned"):
        value = value - logits.mean(-1)
    return [float(v) for v in value]


def reference_tokens(con: Any, model_name: str, n_contexts: int = 16) -> "torch.Tensor":
    """The first ``n_contexts`` corpus contexts the store holds for ``model_name`` ``[n, ctx]`` (BOS first), the
    reference distribution for mean ablation. StoreError if the store has no corpus for the model."""
    import torch

    from backend.errors import StoreError

    rows = con.execute(
        "SELECT t.context_id, t.pos, t.token_id FROM tokens t JOIN corpora c USING (corpus_id) "
        "WHERE c.model = ? AND t.context_id < ? ORDER BY t.context_id, t.pos",
        [model_name, int(n_contexts)]).fetchall()
    if not rows:
        raise StoreError(f"This store has no corpus for {model_name}, which mean ablation needs: use zero ablation, "
                         "or build the store with `python -m backend precompute`.")
    by_ctx: dict[int, list[int]] = {}
    for ctx, _, tok in rows:
        by_ctx.setdefault(int(ctx), []).append(int(tok))
    length = min(len(v) for v in by_ctx.values())
    return torch.tensor([v[:length] for v in by_ctx.values()])


def check_in_store(model: Any, graph: Graph, transcoders: dict[int, Any], attn_saes: dict[int, Any] | None,
                   mode: str, store_path: "str | Path", model_name: str, recording: Any = None
                   ) -> dict[str, Faithfulness]:
    """:func:`check_both` (frozen and live error nodes) with the means of ``mean`` ablation taken over the store's
    corpus contexts (the CLI's ``--faithfulness`` and the Circuit Graph page's button)."""
    from backend.store.access import reading

    means = None
    if mode == "mean":
        with reading(store_path) as con:
            tokens = reference_tokens(con, model_name)
        means = reference_means(model, transcoders, attn_saes, tokens)
    return check_both(model, graph, transcoders, attn_saes, mode=mode, means=means, recording=recording)
