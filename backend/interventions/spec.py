"""What an intervention is, and its one-line text form (links, the CLI, the Python API).

Text form: ``KIND:LAYER:INDEX[@POSITIONS]=MODE[:VALUE]``, several joined with ``;``. ``KIND`` is ``transcoder``
(an MLP transcoder feature), ``attn`` (an attention-output SAE feature) or ``head`` (an attention head's output);
``POSITIONS`` a comma list of token positions (absent: every position after BOS); ``MODE`` ``zero``, ``scale`` (VALUE =
the factor) or ``set`` (VALUE = the activation to hold the feature at). Examples: ``transcoder:12:1034=zero``,
``attn:8:77@5,6=scale:3``, ``head:18:6=zero``.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Sequence

from backend.errors import InputError, literal

KINDS: tuple[str, ...] = ("transcoder", "attn", "head")
MODES: tuple[str, ...] = ("zero", "scale", "set")
MAX_INTERVENTIONS = 64  # a link or a command line holding more is a mistake, not a circuit
MAX_VALUE = 1e4  # |value| beyond this only saturates the model; refused with a sentence
_PATTERN = re.compile(r"^(transcoder|attn|head):(\d{1,4}):(\d{1,7})(?:@([\d,]{1,400}))?=(zero|scale|set)(?::([^;]{1,32}))?$")


@dataclass(frozen=True)
class Intervention:
    """One change to one unit of the model at some positions.

    ``kind``: "transcoder" (feature ``index`` of layer ``layer``'s MLP transcoder), "attn" (feature ``index`` of the
    layer's attention SAE) or "head" (head ``index``'s output, ``hook_z``). ``positions``: token positions (None: every
    position after BOS). ``mode``: "zero", "scale" (multiply by ``value``) or "set" (hold at ``value``; features only).
    """

    kind: str
    layer: int
    index: int
    mode: str = "zero"
    value: float = 0.0
    positions: tuple[int, ...] | None = None

    def describe(self) -> str:
        """The intervention in its text form (see the module docstring)."""
        where = "" if self.positions is None else "@" + ",".join(str(p) for p in self.positions)
        tail = "" if self.mode == "zero" else f":{self.value:g}"
        return f"{self.kind}:{self.layer}:{self.index}{where}={self.mode}{tail}"

    def new_value(self, old: "float | object") -> object:
        """What the unit's activation becomes (works on floats and tensors alike)."""
        if self.mode == "zero":
            return old * 0.0  # type: ignore[operator]
        if self.mode == "scale":
            return old * self.value  # type: ignore[operator]
        return old * 0.0 + self.value  # type: ignore[operator]


def check(intervention: Intervention, n_layers: int, n_heads: int, widths: dict[tuple[str, int], int],
          n_positions: int | None = None) -> None:
    """InputError (one sentence) unless ``intervention`` names an existing unit: ``widths`` maps (kind, layer) to the
    dictionary's number of features for the dictionaries available."""
    i = intervention
    if i.kind not in KINDS:
        raise InputError(f"Unknown intervention kind {literal(i.kind)}: use one of {', '.join(KINDS)}.")
    if i.mode not in MODES:
        raise InputError(f"Unknown intervention mode {literal(i.mode)}: use one of {', '.join(MODES)}.")
    if not 0 <= i.layer < n_layers:
        raise InputError(f"Layer {i.layer} does not exist: the model has layers 0-{n_layers - 1}.")
    if i.kind == "head":
        if not 0 <= i.index < n_heads:
            raise InputError(f"Head {i.index} does not exist: layer {i.layer} has heads 0-{n_heads - 1}.")
        if i.mode == "set":
            raise InputError("A head's output is a vector, so it can be zeroed or scaled, not set to a number.")
    else:
        width = widths.get((i.kind, i.layer))
        if width is None:
            what = "MLP transcoder" if i.kind == "transcoder" else "attention SAE"
            raise InputError(f"This store has no {what} at layer {i.layer}: pick a layer that has one.")
        if not 0 <= i.index < width:
            raise InputError(f"Feature {i.index} does not exist: that dictionary has features 0-{width - 1}.")
    if not math.isfinite(i.value) or abs(i.value) > MAX_VALUE:
        raise InputError(f"The value {i.value} is not a usable number: give one between -{MAX_VALUE:g} and {MAX_VALUE:g}.")
    if i.positions is not None and n_positions is not None:
        bad = [p for p in i.positions if not 1 <= p < n_positions]
        if bad:
            raise InputError(f"Position(s) {bad} are outside the prompt: use positions 1-{n_positions - 1} "
                             "(position 0 is the BOS token, which is never intervened on).")


def parse(text: str) -> list[Intervention]:
    """Parse the text form (``;``-separated); InputError with one sentence on anything else."""
    parts = [p.strip() for p in str(text).split(";") if p.strip()]
    if not parts:
        raise InputError("No intervention was given: write one like 'transcoder:12:1034=zero'.")
    if len(parts) > MAX_INTERVENTIONS:
        raise InputError(f"{len(parts)} interventions were given; at most {MAX_INTERVENTIONS} are run at once.")
    out = []
    for part in parts:
        m = _PATTERN.match(part)
        if not m:
            raise InputError(f"{literal(part, 80)} is not an intervention: write KIND:LAYER:INDEX[@POSITIONS]=MODE[:VALUE], "
                             "e.g. 'transcoder:12:1034@3,4=scale:2' (KIND transcoder, attn or head).")
        kind, layer, index, positions, mode, value = m.groups()
        if mode != "zero" and value is None:
            raise InputError(f"{literal(part)} needs a value after '{mode}:', e.g. {literal(part + ':2')}.")
        if mode == "zero" and value is not None:
            raise InputError(f"{literal(part)}: 'zero' takes no value.")
        try:
            number = float(value) if value is not None else 0.0
        except ValueError:
            raise InputError(f"{literal(value)} in {literal(part)} is not a number.") from None
        pos = None
        if positions is not None:
            items = [p for p in positions.split(",") if p]
            if not items:
                raise InputError(f"{literal(part)} names no position after '@'.")
            pos = tuple(sorted({int(p) for p in items}))
        out.append(Intervention(kind=kind, layer=int(layer), index=int(index), mode=mode, value=number, positions=pos))
    return out


def render(interventions: Sequence[Intervention]) -> str:
    """The text form of several interventions (inverse of :func:`parse`)."""
    return ";".join(i.describe() for i in interventions)


_GRAPH_NODE = re.compile(r"^(T|A)(\d{1,4})_(\d{1,5})_(\d{1,7})$")


def from_graph_nodes(node_ids: Sequence[str]) -> tuple[list[Intervention], list[str]]:
    """Zero-ablations of attribution-graph feature nodes (``backend.circuits.graph`` ids): ``T{l}_{p}_{f}`` becomes
    ``transcoder:{l}:{f}@{p}=zero`` and ``A{l}_{p}_{f}`` ``attn:{l}:{f}@{p}=zero``. Returns them (duplicates once)
    and the ids that name no feature (embeddings, error nodes, the logit), which have no intervention."""
    out: dict[str, Intervention] = {}
    skipped: list[str] = []
    for nid in node_ids:
        m = _GRAPH_NODE.fullmatch(str(nid))
        if m is None:
            skipped.append(str(nid))
            continue
        kind = "transcoder" if m.group(1) == "T" else "attn"
        iv = Intervention(kind, int(m.group(2)), int(m.group(4)), "zero", 0.0, (int(m.group(3)),))
        out.setdefault(iv.describe(), iv)
    return list(out.values())[:MAX_INTERVENTIONS], skipped
