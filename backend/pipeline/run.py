"""The precompute pipeline: model + corpus -> one atomic run in a DuckDB store.

A run is a list of **steps** (functions of a :class:`RunContext`), each writing its own tables through the
run's :class:`~backend.store.StoreWriter`. Later capabilities (attention SAEs, attributions, transcoders) add
steps to :data:`STEPS`; presets say how much work each step does. The whole run is swapped into the store
only when every step succeeded (see :mod:`backend.store`), so an interrupted run loses nothing and a re-run
simply starts again.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

from backend.model.activations import Precollector
from backend.dictionaries.steps import precollect_wants as attention_saes_precollect
from backend.dictionaries.steps import step_attention_saes
from backend.attribution.compare import step_attributions
from backend.circuits.step import step_graphs
from backend.features.step import step_features, step_transcoder_features
from backend.heads.induction import step_induction
from backend.heads.polysemanticity import step_head_polysemanticity
from backend.dictionaries.transcoder import precollect_wants as transcoders_precollect
from backend.dictionaries.transcoder import step_transcoders
from backend.errors import InputError
from backend.progress import say, track


@dataclass(frozen=True)
class Preset:
    """How much work a precompute does. ``demo`` must finish in <= 10 minutes on 2 CPU cores from nothing."""

    name: str
    n_contexts: int  # corpus contexts tokenized, scored and stored
    n_ctx: int  # tokens per context (BOS included)
    task_examples: int  # prompts per built-in task for the baselines
    batch_size: int
    layers: str  # default layer selection for per-layer steps: "spread:K" or "all"
    # Attention-output SAEs (backend.attention_saes). Tuning measurements: see backend/attention_saes.py.
    sae_train: bool = True  # train one SAE per selected layer
    sae_architecture: str = "topk"  # a sae-lens training architecture name
    sae_expansion: float = 4.0  # d_sae = expansion x (n_heads x d_head): 576 -> 2304 on SmolLM2
    sae_k: int = 32  # active features per token (TopK architectures)
    sae_epochs: float = 3.0  # passes over the training tokens
    sae_lr: float = 5e-3
    sae_batch_size: int = 1024
    sae_eval_contexts: int = 32  # last contexts of the corpus, held out for evaluation (x (n_ctx-1) tokens)
    sae_train_contexts: int | None = None  # cap on training contexts (None: all the others)
    sae_threads: int | None = None  # torch threads while training (None: leave as is)
    # Attribution comparisons (backend.attribution): (task, examples) pairs, the methods (those present run), the
    # component kinds ("feature" adds the store's attention SAEs), IG's α steps, the induction task's copy length.
    # Activation patching runs one pass per (layer, position) / (layer, head): ~1,000 components for IOI on SmolLM2,
    # ~1,400 for induction with 20-token copies; IG runs `steps` forward+backward passes per (kind, layer). So the demo
    # uses 2 IOI prompts, 1 induction prompt of 10+10 tokens and 2 IG steps, no greater-than (costs measured on
    # SmolLM2: README, Attribution section).
    attribution_tasks: tuple[tuple[str, int], ...] = (("ioi", 2), ("greater-than", 1), ("induction", 1))
    attribution_methods: tuple[str, ...] = ("patching", "atp", "relp", "ig")
    attribution_kinds: tuple[str, ...] = ("resid", "mlp", "head")
    attribution_ig_steps: int = 2
    attribution_induction_length: int = 10
    # Induction heads (backend.induction): sequences per probe condition, copy length of the repeated random tokens,
    # longest matching prefix K, tokens per prefix/competition sequence, heads classified (top by induction score).
    induction_sequences: int = 32
    induction_repeat_len: int = 24
    induction_max_prefix: int = 6
    induction_seq_len: int = 40
    induction_candidates: int = 16
    # Transcoders per MLP layer (backend.transcoders; measurements and the fitting recipe in its docstring). Layers are
    # chosen by transcoder_layers (NOT by --layers: attribution graphs want every MLP replaced; a layer without a
    # transcoder is one big error node). d_sae = expansion x d_model. epochs 0 = prototype encoder + least-squares
    # decoder only; > 0 adds Adam passes with the adaptive L1 and a final refit. Held out: the last
    # transcoder_eval_contexts contexts (L0 / FVE / dead / all-replaced CE); per-layer CE on the first
    # transcoder_ce_contexts of them (it costs ~n_layers forward passes per token).
    transcoder_train: bool = True
    transcoder_layers: str = "all"
    transcoder_architecture: str = "transcoder"  # or "skip_transcoder" (adds a linear skip W_skip)
    transcoder_expansion: float = 4.0  # 576 -> 2304 on SmolLM2
    transcoder_l0: float = 32.0  # target active features per token (each becomes a graph node)
    transcoder_epochs: float = 0.0
    transcoder_lr: float = 3e-4
    transcoder_batch_size: int = 512
    transcoder_ridge: float = 1e-3
    transcoder_train_contexts: int | None = None  # cap on training contexts (None: all but the held-out ones)
    transcoder_eval_contexts: int = 32
    transcoder_ce_contexts: int | None = 4  # None: all held-out contexts
    transcoder_threads: int | None = None
    # Transcoder feature dashboards (backend.features, step transcoder_features): the first N corpus contexts are
    # scored (None: all). Every MLP layer x L0 ~30 nonzeros per token is ~10x the attention SAEs' rows per token, so the
    # demo scores fewer tokens; N <= the transcoder training contexts lets the step reuse their MLP inputs (no forward
    # pass). feature_logits costs one [d_sae, d_model] @ [d_model, d_vocab] product per layer.
    transcoder_feature_contexts: int | None = 64
    transcoder_feature_logits: bool = True
    # Attribution graphs stored for the Circuit Graph page (backend.circuits): (prompt, answer, wrong answer or
    # None); answer None = the model's top prediction. Candidate nodes kept per graph.
    graph_prompts: tuple[tuple[str, str | None, str | None], ...] = (
        ("The capital of France is", None, None),
        ("When Mary and John went to the store, John gave a drink to", " Mary", " John"),
    )
    graph_max_nodes: int = 400


PRESETS: dict[str, Preset] = {
    # demo transcoders (all 30 MLPs; measurements in backend/transcoders.py): 128 training contexts (16k tokens), no
    # Adam pass (prototype encoder + least-squares decoder), 8 held-out contexts (1016 tokens) for L0 / FVE / the
    # all-replaced row, per-layer CE on 2 of them (254 tokens; 4 measured below). Measured on SmolLM2, quiet 2-core machine: the step takes
    # 142 s (collect 29, fit 37 = 1.2 s/layer, evaluate 76), peak RSS 4.1 GB; L0 25-34, 0% dead, FVE 0.27-0.48 on most
    # middle layers, 0.55/0.63/0.93 at L0-2, 0.95/0.70 at L28-29; per-layer CE recovered median 0.69 (0.03 at L11 whose
    # FVE is 0.98: the small residual matters there), ΔCE 0.004-1.5 nats against denominators 0.06-6.8. All 30 MLPs
    # replaced at once: CE recovered 0.68 but ΔCE +8.1 nats (clean 4.6, all MLPs zeroed 29.7): a rough replacement
    # model whose error nodes carry a lot. Trade-off measured: 28k instead of 16k tokens +0.03 FVE for +40 s; an Adam
    # pass +0.01 at this size (+0.03 at 114k tokens) for +2.5x fit time. Per-layer CE recovered on 508 tokens is noisy:
    # two runs with different held-out (and training) contexts gave e.g. L5 0.83 vs 0.28: read ΔCE and FVE beside it.
    # The demo's 10-minute budget (measured 574 s on an idle machine with 4 per-layer CE contexts and these steps,
    # before the GGUF conversion a fresh machine adds; 476 s with 2 in a later run, `time make demo` 8.1 min; runs here
    # vary by ±15%) is why per-layer CE uses 2 contexts (~30 s less) and the demo
    # attributions are IOI (2 prompts) and induction (1): greater-than (~35 s of patching + IG) is left to the page
    # and the CLI. Transcoder features: 64 contexts, no stored logit effects
    # (30 x [2304, 576] @ [576, 49152] products measured 51 s; the Feature Browser computes one feature's live).
    "demo": Preset("demo", n_contexts=256, n_ctx=128, task_examples=16, batch_size=16, layers="spread:3",
                   sae_epochs=3.0, sae_eval_contexts=32, transcoder_train_contexts=128, transcoder_eval_contexts=8,
                   transcoder_ce_contexts=2, attribution_tasks=(("ioi", 2), ("induction", 1)),
                   transcoder_feature_logits=False),
    # full: 2048 training contexts (260k tokens) x 2 passes per layer; measured on L8 with 130k tokens:
    # 1 pass FVE 0.83, 2 passes 0.85, CE-loss recovered 1.07-1.10 (see backend/attention_saes.py).
    "full": Preset("full", n_contexts=4096, n_ctx=128, task_examples=64, batch_size=16, layers="all",
                   sae_epochs=2.0, sae_eval_contexts=64, sae_train_contexts=2048,
                   induction_sequences=64, induction_max_prefix=8, induction_seq_len=48,
                   attribution_tasks=(("ioi", 8), ("greater-than", 8), ("induction", 2)), attribution_ig_steps=8,
                   attribution_induction_length=20,
                   # transcoders: 260k tokens + 1 Adam pass (at 114k tokens L8 FVE 0.53 -> 0.56 with the pass, ~40 s per
                   # layer), 64 held-out contexts, per-layer CE on 16 of them (~4.5 min for 30 layers). Not run end to end.
                   transcoder_train_contexts=2048, transcoder_epochs=1.0, transcoder_eval_contexts=64,
                   transcoder_ce_contexts=16,
                   # transcoder dashboards on 256 contexts (~29M nonzeros over 30 layers), logit effects stored (~50 s)
                   transcoder_feature_contexts=256),
}


def parse_layers(spec: str | None, n_layers: int, default: str) -> list[int]:
    """Parse ``--layers``: "all", "spread:K" (K layers evenly over depth), or a list like "0,5,10-12"."""
    spec = (spec or default).strip()
    if spec == "all":
        return list(range(n_layers))
    if spec.startswith("spread:"):
        try:
            k = max(1, min(int(spec.split(":", 1)[1]), n_layers))
        except ValueError:
            raise InputError(f"--layers {spec!r} is not understood: use 'spread:K' with a whole number K.") from None
        # K interior points of an even split of the depth: 30 layers, K=3 -> 8, 15, 22.
        return sorted({min(n_layers - 1, round((i + 1) * n_layers / (k + 1))) for i in range(k)})
    layers: set[int] = set()
    try:
        for part in spec.split(","):
            if "-" in part:
                a, b = part.split("-", 1)
                layers.update(range(int(a), int(b) + 1))
            elif part.strip():
                layers.add(int(part))
    except ValueError:
        raise InputError(f"--layers {spec!r} is not understood: use 'all', 'spread:3' or a list like '0,5,10-12'.") from None
    bad = sorted(x for x in layers if not 0 <= x < n_layers)
    if bad:
        raise InputError(f"--layers {spec!r} names layer(s) {bad} but the model has layers 0-{n_layers - 1}.")
    return sorted(layers)


@dataclass
class RunContext:
    """What every step gets: the loaded model, the writer, the preset and the parsed options."""

    model: Any
    spec: Any
    writer: Any
    preset: Preset
    layers: list[int]
    corpus_source: str
    corpus_id: str = ""
    contexts: Any = None  # backend.corpus.Contexts once the corpus step ran
    sae_sources: list[str] = field(default_factory=list)  # --saes: import these instead of training
    transcoder_layers: list[int] = field(default_factory=list)  # from preset.transcoder_layers / --transcoder-layers
    transcoder_sources: list[str] = field(default_factory=list)  # --transcoders: import these instead of training
    summary: dict[str, Any] = field(default_factory=dict)
    # Activations an earlier step collected that a later one may reuse instead of a forward pass:
    # {(hook kind, layer): [n * (n_ctx - 1), d]} over the first n corpus contexts (backend.activations.collect layout).
    precollected: dict[tuple[str, int], Any] | None = None

    @property
    def con(self) -> Any:
        return self.writer.con

    @property
    def run_id(self) -> str:
        return self.writer.run_id


Step = Callable[[RunContext], None]


def step_model(ctx: RunContext) -> None:
    """Record the model's spec and its vocabulary (pages decode token ids without loading a tokenizer)."""
    import pandas as pd

    from backend.inputs.prompts import token_strings

    spec, cfg = ctx.spec, ctx.model.cfg
    ctx.con.execute("DELETE FROM models WHERE model = ?", [spec.name])
    ctx.con.execute(
        "INSERT INTO models VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        [spec.name, spec.family, spec.description, cfg.n_layers, cfg.d_model, cfg.n_heads,
         cfg.n_key_value_heads, cfg.d_head, cfg.d_mlp, cfg.d_vocab, ctx.preset.n_ctx, spec.to_json(), ctx.run_id],
    )
    has_vocab = ctx.con.execute("SELECT count(*) FROM vocab WHERE model = ?", [spec.name]).fetchall()[0][0]
    if has_vocab != cfg.d_vocab:
        ctx.con.execute("DELETE FROM vocab WHERE model = ?", [spec.name])
        ids = list(range(cfg.d_vocab))
        strings = token_strings(ctx.model.tokenizer, ids)
        ctx.writer.insert_df("vocab", pd.DataFrame({"model": spec.name, "token_id": ids, "token_str": strings}))


def step_corpus(ctx: RunContext) -> None:
    """Tokenize the corpus into fixed-length contexts and store tokens with the model's next-token loss."""
    import numpy as np
    import pandas as pd
    import torch

    from backend.inputs import corpus
    from backend.inputs.prompts import model_bos_id

    preset = ctx.preset
    say(f"Reading corpus {ctx.corpus_source!r}")
    docs = corpus.load_documents(ctx.corpus_source)
    contexts = corpus.tokenize_contexts(
        docs, ctx.model.tokenizer, n_ctx=preset.n_ctx, bos=model_bos_id(ctx.model), max_contexts=preset.n_contexts
    )
    if len(contexts.tokens) == 0:
        raise InputError(f"The corpus {ctx.corpus_source!r} is too short for one context of {preset.n_ctx} tokens.")
    ctx.contexts = contexts
    source_name = "builtin" if ctx.corpus_source == corpus.BUILTIN else Path(ctx.corpus_source).name
    ctx.corpus_id = f"{source_name}:{ctx.spec.name}:{preset.n_ctx}"
    for table in ("tokens", "contexts", "corpora"):
        ctx.con.execute(f"DELETE FROM {table} WHERE corpus_id = ?", [ctx.corpus_id])

    tokens = contexts.tokens
    n, n_ctx = tokens.shape
    losses = np.full((n, n_ctx), np.nan, dtype=np.float32)
    batches = range(0, n, preset.batch_size)
    # This pass runs the whole model over every context anyway: gather on the way what later steps would otherwise
    # run it again for (each step's precollect_wants; they reuse ctx.precollected and free it).
    wants: dict[tuple[str, int], int] = {}
    for want in PRECOLLECT:
        for act, count in want(ctx).items():
            wants[act] = max(wants.get(act, 0), count)
    gather = Precollector(wants, n_ctx)
    with torch.no_grad():
        for start in track(batches, total=len(batches), desc="Scoring corpus", unit="batch"):
            batch = tokens[start : start + preset.batch_size]
            # loss at position p is the loss of predicting token p+1; the last position has none (NaN).
            losses[start : start + len(batch), :-1] = ctx.model.run_with_hooks(
                batch, return_type="loss", loss_per_token=True, fwd_hooks=gather.hooks(start, len(batch))
            ).float().numpy()
    ctx.precollected = gather.result() or None
    ctx_ids = np.repeat(np.arange(n), n_ctx)
    ctx.writer.insert_df(
        "tokens",
        pd.DataFrame({
            "corpus_id": ctx.corpus_id, "context_id": ctx_ids.astype(np.int32),
            "pos": np.tile(np.arange(n_ctx), n).astype(np.int16),
            "token_id": tokens.reshape(-1).numpy().astype(np.int32), "loss": losses.reshape(-1),
        }),
    )
    ctx.writer.insert_df(
        "contexts",
        pd.DataFrame({"corpus_id": ctx.corpus_id, "context_id": np.arange(n, dtype=np.int32),
                      "doc_id": contexts.doc_ids, "run_id": ctx.run_id}),
    )
    info = corpus.builtin_info() if ctx.corpus_source == corpus.BUILTIN else {
        "description": f"user corpus {ctx.corpus_source}", "licence": "user-supplied"}
    mean_loss = float(np.nanmean(losses))
    ctx.con.execute(
        "INSERT INTO corpora VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        [ctx.corpus_id, ctx.spec.name, ctx.corpus_source, info.get("description", ""), info.get("licence", ""),
         len({d for d in contexts.doc_ids}), n, n_ctx, n * n_ctx, mean_loss, ctx.run_id],
    )
    ctx.summary["corpus"] = {"corpus_id": ctx.corpus_id, "contexts": n, "tokens": n * n_ctx, "mean_loss": mean_loss}


def step_tasks(ctx: RunContext) -> None:
    """Run every built-in task on clean and corrupted prompts and store the metric of each."""
    import torch

    from backend.inputs import tasks
    from backend.inputs.prompts import model_bos_id

    ctx.con.execute("DELETE FROM task_baselines WHERE model = ?", [ctx.spec.name])
    names = list(tasks.TASKS)
    for name in track(names, total=len(names), desc="Task baselines", unit="task"):
        batch = tasks.build_task(name, ctx.model, n=ctx.preset.task_examples, seed=0, bos=model_bos_id(ctx.model))
        with torch.no_grad():
            clean = float(batch.metric(ctx.model(batch.clean)))
            corrupt = float(batch.metric(ctx.model(batch.corrupt)))
        ctx.con.execute(
            "INSERT INTO task_baselines VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            [name, ctx.spec.name, int(batch.clean.shape[0]), batch.metric_name, clean, corrupt,
             batch.prompts[0] if batch.prompts else "", ctx.run_id],
        )
        ctx.summary.setdefault("tasks", {})[name] = {"clean": clean, "corrupt": corrupt}


# Later capabilities append their steps here (in order). Each step must be safe to re-run on a store that
# already holds its earlier output: it deletes what it replaces first.
# What the corpus step's scoring pass should also gather for later steps: each returns {(hook kind, layer): number of
# leading contexts} (empty when its step would not use them, or they would not fit in its memory budget).
PRECOLLECT: list[Callable[[RunContext], dict[tuple[str, int], int]]] = [
    attention_saes_precollect,
    transcoders_precollect,
]

STEPS: list[tuple[str, Step]] = [
    ("model", step_model),
    ("corpus", step_corpus),
    ("tasks", step_tasks),
    ("induction", step_induction),
    ("attention_saes", step_attention_saes),
    ("features", step_features),
    ("transcoders", step_transcoders),
    ("transcoder_features", step_transcoder_features),
    ("attributions", step_attributions),
    ("head_polysemanticity", step_head_polysemanticity),
    ("graphs", step_graphs),
]


def precompute(
    model_name: str,
    store_path: str | Path,
    preset: str = "demo",
    layers: str | None = None,
    corpus_source: str = "builtin",
    n_contexts: int | None = None,
    model: Any = None,
    saes: list[str] | None = None,
    transcoders: list[str] | None = None,
    transcoder_layers: str | None = None,
) -> str:
    """Build (or add a run to) the store at ``store_path``; returns the run id.

    ``n_contexts`` overrides the preset's corpus size. ``model`` may pass an already-loaded model. ``saes`` lists
    attention SAEs to import instead of training: sae-lens release names (one SAE per selected layer, id
    ``blocks.L.hook_z``) or sae-lens-format directories. ``transcoders`` likewise imports transcoders instead of
    training them (sae-lens releases, ``RELEASE:SAE_ID``, or directories); ``transcoder_layers`` overrides the preset's
    transcoder layer selection (same syntax as ``layers``, which does not affect transcoders).
    """
    from backend.model.registry import get_spec, load_model
    from backend.store.access import StoreWriter

    if preset not in PRESETS:
        raise InputError(f"Unknown preset {preset!r}: use one of {', '.join(PRESETS)}.")
    chosen = PRESETS[preset]
    if n_contexts is not None:
        chosen = Preset(**{**asdict(chosen), "n_contexts": int(n_contexts)})
    spec = get_spec(model_name)
    layer_list = parse_layers(layers, spec.n_layers, chosen.layers)
    tc_layers = parse_layers(transcoder_layers, spec.n_layers, chosen.transcoder_layers)
    if transcoders:
        from backend.dictionaries.transcoder import check_transcoder_sources

        check_transcoder_sources(transcoders, tc_layers)  # an unknown release fails now, not after minutes
    t0 = time.perf_counter()
    if model is None:
        model = load_model(model_name, progress=say)
    params = {"preset": asdict(chosen), "layers": layer_list, "corpus": corpus_source, "saes": list(saes or []),
              "transcoder_layers": tc_layers, "transcoders": list(transcoders or [])}
    with StoreWriter(store_path, kind="precompute", model=spec.name, preset=chosen.name, params=params) as writer:
        ctx = RunContext(model=model, spec=spec, writer=writer, preset=chosen, layers=layer_list,
                         corpus_source=corpus_source, sae_sources=list(saes or []), transcoder_layers=tc_layers,
                         transcoder_sources=list(transcoders or []))
        for name, step in STEPS:
            t = time.perf_counter()
            step(ctx)
            ctx.summary.setdefault("step_seconds", {})[name] = round(time.perf_counter() - t, 2)
        ctx.summary["seconds"] = round(time.perf_counter() - t0, 2)
        writer.summary = ctx.summary
    say(f"Run {writer.run_id} written to {store_path} in {time.perf_counter() - t0:.0f} s")
    return writer.run_id
