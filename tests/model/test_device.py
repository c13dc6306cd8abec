"""One place decides the torch device (backend.model.device): ``--device`` / ``CIRCUITSCOPE_DEVICE`` / auto, checked
against what torch sees, and the model and the dictionaries are placed on it. These machines have no GPU: placement is
checked with PyTorch's ``meta`` device standing in for an accelerator, and ``benchmarks/gpu_smoke.sh`` runs the real
thing where there is one."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from backend.cli import main
from backend.errors import InputError
from backend.model import device as dev


def test_auto_takes_cuda_when_torch_sees_it_and_the_cpu_otherwise(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(dev.DEVICE_ENV, raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(dev, "_mps_available", lambda: False)
    assert dev.resolve_device() == torch.device("cpu")
    assert dev.resolve_device("auto") == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert dev.resolve_device() == torch.device("cuda")
    assert dev.resolve_device("cuda:1") == torch.device("cuda:1")
    with pytest.raises(InputError, match="has 2 CUDA device"):
        dev.resolve_device("cuda:2")


def test_a_device_this_machine_lacks_or_a_bad_name_is_one_sentence(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(dev, "_mps_available", lambda: False)
    with pytest.raises(InputError, match="no CUDA GPU"):
        dev.resolve_device("cuda")
    with pytest.raises(InputError, match="no Apple GPU"):
        dev.resolve_device("mps")
    with pytest.raises(InputError, match=r"--device is one of .*`tpu`"):
        dev.resolve_device("tpu")
    monkeypatch.setenv(dev.DEVICE_ENV, "gpu please")
    with pytest.raises(InputError, match="CIRCUITSCOPE_DEVICE is one of"):
        dev.resolve_device()
    monkeypatch.setenv(dev.DEVICE_ENV, " CPU ")
    assert dev.resolve_device() == torch.device("cpu")


def test_cli_refuses_a_missing_gpu_before_loading_anything(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.delenv(dev.DEVICE_ENV, raising=False)
    store = tmp_path / "s.duckdb"
    assert main(["graph", "--device", "cuda", "--model", "tiny-llama", "--prompt", "hi", "--store", str(store)]) == 2
    assert "no CUDA GPU" in capsys.readouterr().err
    assert not store.exists()
    monkeypatch.setenv(dev.DEVICE_ENV, "cpu")  # --device also sets the default of every process the CLI starts
    assert dev.use_device("auto") == torch.device("cpu")
    import os

    assert os.environ[dev.DEVICE_ENV] == "cpu"


@pytest.mark.filterwarnings("ignore:for .*copying from a non-meta parameter")
def test_model_and_dictionaries_are_placed_on_the_chosen_device(monkeypatch: pytest.MonkeyPatch,
                                                                tiny_store: Path) -> None:
    from backend.dictionaries import storage
    from backend.model.registry import load_model
    from backend.store.access import reading

    meta = torch.device("meta")  # stands in for an accelerator: nothing of the model may stay on the CPU
    monkeypatch.setattr(dev, "resolve_device", lambda spec=None: meta)
    model = load_model("tiny-llama")
    assert {p.device for p in model.parameters()} == {meta}
    assert str(model.cfg.device) == "meta"
    monkeypatch.setattr(storage, "resolve_device", lambda spec=None: meta)
    monkeypatch.setattr(storage, "WEIGHTS_CACHE", tiny_store.parent / "weights-cache")
    with reading(tiny_store) as con:
        ids = [r[0] for r in con.execute("SELECT dict_id FROM dictionaries").fetchall()]
        saes = storage.load_dictionaries(con, ids)
    assert saes and all({p.device for p in s.parameters()} == {meta} and s.cfg.device == "meta"
                        for s in saes.values())
