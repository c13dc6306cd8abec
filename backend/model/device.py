"""The torch device everything runs on: the one place that decides it.

``--device auto|cpu|cuda|cuda:N|mps`` on the CLI, or the ``CIRCUITSCOPE_DEVICE`` environment variable for the app
(and for every process the CLI starts). ``auto`` (the default) takes CUDA when torch sees a GPU, then Apple's MPS,
else the CPU. The model and the dictionaries are placed on this device when loaded; the code that runs them creates
its tensors on the device of the model or dictionary it works with, and moves results to the CPU only where they
are stored or drawn.
"""

from __future__ import annotations

import os
import re
from typing import TYPE_CHECKING

from backend.errors import InputError, literal

if TYPE_CHECKING:
    import torch

DEVICE_ENV = "CIRCUITSCOPE_DEVICE"
CHOICES = "auto, cpu, cuda, cuda:N or mps"
_PATTERN = re.compile(r"^(auto|cpu|mps|cuda(:\d{1,2})?)$")


def resolve_device(spec: str | None = None) -> "torch.device":
    """The device named by ``spec`` (default: ``CIRCUITSCOPE_DEVICE``, else ``auto``), checked against what torch
    sees here; InputError with one sentence for a name torch does not know or a device this machine lacks."""
    import torch

    raw = spec if spec is not None else os.environ.get(DEVICE_ENV, "auto")
    name = raw.strip().lower()
    if not _PATTERN.match(name):
        source = "--device" if spec is not None else DEVICE_ENV
        raise InputError(f"{source} is one of {CHOICES}, not {literal(raw[:40])}.")
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if _mps_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise InputError(f"{literal(name)} was asked for but torch sees no CUDA GPU here: use --device cpu (or "
                             "auto), or install a CUDA build of torch.")
        index = int(name.split(":")[1]) if ":" in name else 0
        if index >= torch.cuda.device_count():
            raise InputError(f"{literal(name)} was asked for but this machine has {torch.cuda.device_count()} CUDA "
                             f"device(s): use cuda:0 to cuda:{torch.cuda.device_count() - 1}.")
    if name == "mps" and not _mps_available():
        raise InputError("mps was asked for but torch sees no Apple GPU here: use --device cpu (or auto).")
    return torch.device(name)


def use_device(spec: str) -> "torch.device":
    """Check ``spec`` and make it this process's device (and its children's): what the CLI's ``--device`` does."""
    device = resolve_device(spec)
    os.environ[DEVICE_ENV] = str(device)
    return device


def _mps_available() -> bool:
    import torch

    backend = getattr(torch.backends, "mps", None)
    return bool(backend is not None and backend.is_available())
