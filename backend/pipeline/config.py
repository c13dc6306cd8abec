"""Presets: how much work a precompute does, as one typed config per capability.

``demo`` must finish in <= 10 minutes on 2 CPU cores from nothing (``make run``); ``full`` is for a longer run. The
measurements behind each number are in ``docs/presets.md``.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from backend.attribution.config import AttributionConfig
from backend.circuits.config import GraphConfig
from backend.dictionaries.config import SaeConfig, TranscoderConfig
from backend.errors import InputError
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
        attribution=AttributionConfig(tasks=(("ioi", 2), ("induction", 1))),
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
