"""Presets: how much work a precompute does, as one typed config per capability.

``demo`` must finish in <= 10 minutes on 2 CPU cores from nothing (``make run``); ``full`` is for a longer run. The
measurements behind each number are in ``docs/presets.md``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, replace

from backend.attribution.config import AttributionConfig
from backend.circuits.config import GraphConfig
from backend.dictionaries.config import SaeConfig, TranscoderConfig
from backend.errors import InputError, literal
from backend.features.config import FeatureConfig
from backend.heads.config import InductionConfig


@dataclass(frozen=True)
class Preset:
    """How much work a precompute does: the corpus and forward-pass sizes the pipeline owns, plus each capability's
    own typed config."""

    name: str
    n_contexts: int  # corpus contexts tokenized, scored and stored
    n_ctx: int = 128  # tokens per context (BOS included)
    batch_size: int = 16  # contexts per forward pass, for every step that runs the model over the corpus
    task_examples: int = 16  # prompts per built-in task for the baselines
    layers: str = "spread:3"  # attention-SAE layers: "spread:K", "all" or a list (``--layers`` overrides it)
    sae: SaeConfig = field(default_factory=SaeConfig)
    transcoder: TranscoderConfig = field(default_factory=TranscoderConfig)
    features: FeatureConfig = field(default_factory=FeatureConfig)
    attribution: AttributionConfig = field(default_factory=AttributionConfig)
    induction: InductionConfig = field(default_factory=InductionConfig)
    graphs: GraphConfig = field(default_factory=GraphConfig)

    def with_contexts(self, n_contexts: int) -> "Preset":
        """This preset over ``n_contexts`` corpus contexts (``--contexts``)."""
        return replace(self, n_contexts=int(n_contexts))


PRESETS: dict[str, Preset] = {
    "demo": Preset(
        "demo", n_contexts=256, task_examples=16, layers="spread:3",
        sae=SaeConfig(epochs=3.0, eval_contexts=32),
        transcoder=TranscoderConfig(train_contexts=128, eval_contexts=16, ce_contexts=2),
        features=FeatureConfig(transcoder_contexts=64, transcoder_logits=False),
        # AtP* is left to the page and the CLI (12 s here); the held-out evaluation table covers it.
        attribution=AttributionConfig(tasks=(("ioi", 2), ("induction", 1)), methods=("patching", "atp", "relp", "ig")),
    ),
    "full": Preset(
        "full", n_contexts=4096, task_examples=64, layers="all",
        sae=SaeConfig(epochs=2.0, eval_contexts=64, train_contexts=2048),
        transcoder=TranscoderConfig(train_contexts=2048, eval_contexts=64, ce_contexts=16),
        features=FeatureConfig(transcoder_contexts=256, transcoder_logits=True),
        attribution=AttributionConfig(tasks=(("ioi", 8), ("greater-than", 8), ("induction", 2)), ig_steps=8,
                                      induction_length=20),
        induction=InductionConfig(sequences=64, max_prefix=8, seq_len=48),
    ),
}


def get_preset(name: str, n_contexts: int | None = None) -> Preset:
    """The preset ``name`` (InputError naming the known ones otherwise), over ``n_contexts`` contexts if given."""
    if name not in PRESETS:
        raise InputError(f"Unknown preset {name!r}: use one of {', '.join(PRESETS)}.")
    preset = PRESETS[name]
    return preset if n_contexts is None else preset.with_contexts(n_contexts)


_LAYERS_USAGE = "use 'all', 'spread:3' or a list like '0,5,10-12'"
_WHOLE = re.compile(r"[0-9]{1,18}")  # ASCII digits only: str.isdigit() and int() also accept '²' or '٣'


def _layer_number(text: str, spec: str) -> int:
    text = text.strip()
    if not _WHOLE.fullmatch(text):
        raise InputError(f"--layers {literal(spec, 60)} is not understood ({literal(text, 20)} is not a layer "
                         f"number): {_LAYERS_USAGE}.")
    return int(text)


def parse_layers(spec: str | None, n_layers: int, default: str) -> list[int]:
    """Parse ``--layers``: "all", "spread:K" (K layers evenly over depth), or a list like "0,5,10-12".

    Every number is checked against the model's ``n_layers`` *before* a range is expanded (``0-99999999999`` must not
    build a list of 10^11 layers), and a spec naming no layer at all is refused: one InputError sentence each.
    """
    spec = default if spec is None else spec
    text = spec.strip()
    if not text:
        raise InputError(f"--layers {literal(spec)} names no layer: {_LAYERS_USAGE}.")
    if text == "all":
        return list(range(n_layers))
    if text.startswith("spread:"):
        raw = text.split(":", 1)[1].strip()
        if not _WHOLE.fullmatch(raw) or int(raw) < 1:
            raise InputError(f"--layers {literal(spec, 60)} is not understood: use 'spread:K' with a whole number K "
                             f"from 1 to {n_layers} (the model's layers).")
        k = min(int(raw), n_layers)  # more than every layer is every layer (presets say spread:3 for 2-layer models)
        # K interior points of an even split of the depth: 30 layers, K=3 -> 8, 15, 22.
        return sorted({min(n_layers - 1, round((i + 1) * n_layers / (k + 1))) for i in range(k)})
    layers: set[int] = set()
    for part in text.split(","):
        if not part.strip():
            continue
        if "-" in part:
            a_text, b_text = part.split("-", 1)
            a, b = _layer_number(a_text, spec), _layer_number(b_text, spec)
            if a > b:
                raise InputError(f"--layers {literal(spec, 60)} has the range {literal(part.strip(), 20)}, which is "
                                 f"backwards: write the lower layer first, e.g. '{b}-{a}'.")
            if b >= n_layers:
                raise InputError(f"--layers {literal(spec, 60)} names layer(s) up to {b} but the model has layers "
                                 f"0-{n_layers - 1}.")
            layers.update(range(a, b + 1))  # bounded by n_layers now
        else:
            layers.add(_layer_number(part, spec))
    if not layers:
        raise InputError(f"--layers {literal(spec)} names no layer: {_LAYERS_USAGE}.")
    bad = sorted(x for x in layers if not 0 <= x < n_layers)
    if bad:
        raise InputError(f"--layers {literal(spec, 60)} names layer(s) {bad} but the model has layers "
                         f"0-{n_layers - 1}.")
    return sorted(layers)
