"""Exports of the feature side: graph bundles (backend/features/bundle.py: the graph JSON plus one circuit-tracer /
Anthropic-format feature file per feature node) and sae-lens directories (backend/dictionaries/storage.py), through
the functions, the CLI and the API. Numbers in the files are checked against DuckDB queries written here; exported
dictionaries against the stored ones on random inputs after ``sae_lens.SAE.load_from_disk``."""

from __future__ import annotations

import json
import shutil
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from bundle_check import check_bundle

from backend.cli import main
from backend.errors import InputError
from backend.store.access import reading


@pytest.fixture
def store(tmp_path: Path, tiny_store: Path) -> Path:
    path = tmp_path / "x.duckdb"
    shutil.copy(tiny_store, path)
    return path


def _graph_id(path: Path) -> str:
    with reading(path) as con:
        return con.execute("SELECT graph_id FROM graphs ORDER BY graph_id LIMIT 1").fetchall()[0][0]


def _read_zip(path: Path) -> dict[str, Any]:
    with zipfile.ZipFile(path) as zf:
        return {name: json.loads(zf.read(name)) for name in zf.namelist()}


def _read_dir(path: Path) -> dict[str, Any]:
    return {str(p.relative_to(path)): json.loads(p.read_text()) for p in path.rglob("*.json")}


def test_bundle_files_hold_the_stores_numbers(store: Path, tmp_path: Path) -> None:
    from backend.circuits.prune import prune
    from backend.circuits.storage import read_graph
    from backend.features.bundle import write_bundle

    gid = _graph_id(store)
    with reading(store) as con:
        graph = prune(read_graph(con, gid), 0.8, 0.98)
        write_bundle(con, graph, tmp_path / "b.zip")
        write_bundle(con, graph, tmp_path / "dir")
        with pytest.raises(InputError, match="empty directory"):
            write_bundle(con, graph, tmp_path / "dir")
    zipped, unzipped = _read_zip(tmp_path / "b.zip"), _read_dir(tmp_path / "dir")
    assert zipped == unzipped
    check_bundle(zipped, store, gid)


def test_sae_lens_export_reads_back_as_the_same_dictionary(store: Path, tmp_path: Path) -> None:
    from sae_lens import SAE

    from backend.dictionaries.storage import export_sae_lens, load_dictionary

    torch.manual_seed(0)
    with reading(store) as con:
        rows = con.execute("SELECT dict_id, kind FROM dictionaries ORDER BY dict_id").fetchall()
        assert {k for _, k in rows} == {"attn_sae", "transcoder"}  # both kinds are exported
        for i, (dict_id, _) in enumerate(rows):
            out = export_sae_lens(con, dict_id, tmp_path / f"sae{i}")
            assert sorted(p.name for p in out.iterdir()) == ["cfg.json", "sae_weights.safetensors"]
            ours, theirs = load_dictionary(con, dict_id), SAE.load_from_disk(out)
            assert type(theirs) is type(ours)
            x = torch.randn(64, ours.cfg.d_in) * 3
            with torch.no_grad():
                acts = ours.encode(x)
                assert (acts > 0).any()
                torch.testing.assert_close(theirs.encode(x), acts)
                torch.testing.assert_close(theirs.decode(acts), ours.decode(acts))
                torch.testing.assert_close(theirs(x), ours(x))
        with pytest.raises(InputError, match="empty directory"):
            export_sae_lens(con, rows[0][0], tmp_path / "sae0")


def test_cli_label_search_bundle_and_export(store: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import duckdb

    con = duckdb.connect(str(store))
    con.execute("DELETE FROM feature_labels")
    con.close()
    assert main(["label", "--store", str(store)]) == 0
    assert "automatic labels of" in capsys.readouterr().out
    with reading(store) as con:
        dict_id, f, auto = con.execute("SELECT dict_id, feature, label FROM feature_labels ORDER BY dict_id, feature "
                                       "LIMIT 1").fetchall()[0]
    assert main(["label", "--store", str(store), "--dict", dict_id, "--feature", str(f), "--set", "zebra crossing"]) == 0
    capsys.readouterr()
    assert main(["search", "--store", str(store), "ZEBRA"]) == 0
    out = capsys.readouterr().out
    assert "zebra crossing" in out and "user" in out and dict_id in out
    assert main(["search", "--store", str(store), "no label has this ☃"]) == 0
    assert "no feature label contains" in capsys.readouterr().out
    assert main(["label", "--store", str(store), "--set", "x"]) == 2
    assert "--set needs --dict" in capsys.readouterr().err
    gid = _graph_id(store)
    assert main(["bundle", "--store", str(store), "--graph-id", gid, "--out", str(tmp_path / "b.zip")]) == 0
    files = _read_zip(tmp_path / "b.zip")
    check_bundle(files, store, gid)
    mine = [d for p, d in files.items() if p.startswith("features/") and (d["dict_id"], d["feature"]) == (dict_id, f)]
    assert all(d["label"] == "zebra crossing" for d in mine)
    assert main(["export-sae", "--store", str(store), "--dict", dict_id, "--out", str(tmp_path / "sae")]) == 0
    assert (tmp_path / "sae" / "cfg.json").is_file()
    assert main(["export-sae", "--store", str(store), "--dict", "nope", "--out", str(tmp_path / "sae2")]) == 2
    assert main(["bundle", "--store", str(store), "--graph-id", "g-nope", "--out", str(tmp_path / "c.zip")]) == 2


def test_api_labels_exports_and_own_text(store: Path, tmp_path: Path, tiny_model: Any) -> None:
    from sae_lens import SAE

    from backend.api import open_workspace
    from backend.features.labels import search_labels
    from backend.features.live import feature_on_tokens
    from backend.inputs.prompts import encode_prompt

    ws = open_workspace(store, model="tiny-llama")
    ws._model = tiny_model
    with reading(store) as con:
        dict_id, f, layer, kind = con.execute(
            "SELECT l.dict_id, l.feature, d.layer, d.kind FROM feature_labels l JOIN dictionaries d USING (dict_id) "
            "WHERE d.kind = 'attn_sae' ORDER BY l.feature LIMIT 1").fetchall()[0]
        assert ws.search_labels('"').equals(search_labels(con, '"'))
    assert ws.set_label(dict_id, f, "api label") == "api label"
    assert ws.feature(dict_id, f).label["label"] == "api label"
    found = ws.search_labels("API LABEL")
    assert list(found.feature) == [f]
    graph = ws.prune(ws.stored_graph(_graph_id(store)))
    out = ws.export_bundle(graph, tmp_path / "b.zip")
    check_bundle(_read_zip(out), store, _graph_id(store))
    sae = SAE.load_from_disk(ws.export_sae(dict_id, tmp_path / "sae"))
    text = ws.feature_on_text(dict_id, f, "When Mary and John went to the store")
    ids = encode_prompt(tiny_model, "When Mary and John went to the store").ids
    np.testing.assert_allclose(text["act"].to_numpy(), feature_on_tokens(tiny_model, sae, kind, layer, f, ids),
                               rtol=1e-5, atol=1e-6)
    assert list(text["token"]) == encode_prompt(tiny_model, "When Mary and John went to the store").strings
