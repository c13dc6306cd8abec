"""The Python API (backend.api): the README's example runs as written (on the test store and model), and each call
gives what the backend function it wraps gives when called directly here."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def _readme_example() -> str:
    text = (ROOT / "README.md").read_text()
    section = text.split("## Python API", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


@pytest.fixture
def store(tmp_path: Path, tiny_store: Path) -> Path:
    path = tmp_path / "api.duckdb"
    shutil.copy(tiny_store, path)
    return path


def test_the_readme_example_runs(store: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    code = _readme_example()
    assert '"data/stores/demo.duckdb"' in code and 'model="smollm2-135m"' in code
    code = code.replace('"data/stores/demo.duckdb"', repr(str(store))).replace('model="smollm2-135m"',
                                                                               'model="tiny-llama"')
    monkeypatch.chdir(tmp_path)  # the example exports paris.json into the working directory
    scope: dict[str, Any] = {}
    exec(compile(code, "README.md", "exec"), scope)  # noqa: S102 - the README's own example, run as a user would
    graph, circuit = scope["graph"], scope["circuit"]
    assert len(circuit.nodes) < len(graph.nodes) and set(scope["scores"]) >= {"replacement", "completeness"}
    assert set(scope["kept"]) == {"frozen", "live"}
    assert json.loads((tmp_path / "paris.json").read_text())["nodes"]
    assert scope["steer"].metric_change is not None and len(scope["steer"].interventions) == 2
    assert set(scope["comparison"].runs) >= {"patching", "atp", "relp"}
    assert scope["dash"].summary is not None and len(scope["dash"].top_examples)
    after = scope["ws"].feature(scope["dicts"].dict_id.iloc[0], 7).label  # read after the example's set_label
    assert after["label"] == "my name for it" and not after["automatic"]
    assert (tmp_path / "paris-bundle.zip").is_file() and (tmp_path / "exported-sae" / "cfg.json").is_file()
    assert len(scope["acts"]) == len(scope["acts"]["token"]) and scope["acts"]["act"].iloc[1:].notna().all()
    assert isinstance(scope["found"], type(scope["acts"]))


def test_each_call_gives_what_the_function_it_wraps_gives(store: Path, tiny_model: Any) -> None:
    from backend.api import open_workspace
    from backend.circuits.build import build_graph
    from backend.dictionaries.storage import graph_dictionaries
    from backend.features.queries import feature_top_examples
    from backend.inputs.prompts import encode_prompt
    from backend.interventions.run import run_intervention
    from backend.interventions.spec import parse
    from backend.store.access import reading

    ws = open_workspace(store, model="tiny-llama")
    with reading(store) as con:
        transcoders, saes = graph_dictionaries(con, "tiny-llama")
        dict_id = con.execute("SELECT dict_id FROM dictionaries ORDER BY dict_id").fetchall()[0][0]
        examples = feature_top_examples(con, dict_id, 3)
    assert ws.feature(dict_id, 3).top_examples.equals(examples)
    prompt = "When Mary and John went to the store, John gave a drink to"
    direct = build_graph(tiny_model, prompt, transcoders, saes, answer=" Mary", wrong=" John", model_name="tiny-llama")
    via_api = ws.graph(prompt, answer=" Mary", wrong=" John")
    assert list(via_api.nodes["node_id"]) == list(direct.nodes["node_id"])
    torch.testing.assert_close(torch.tensor(via_api.edges["weight"].to_numpy()),
                               torch.tensor(direct.edges["weight"].to_numpy()))
    ids = encode_prompt(tiny_model, prompt).ids
    mary = tiny_model.tokenizer(" Mary", add_special_tokens=False)["input_ids"][0]
    direct_run = run_intervention(tiny_model, ids, parse("head:1:0=zero"), transcoders, saes, target=(mary, None))
    steer = ws.intervene(prompt, "head:1:0=zero", answer=" Mary")
    assert steer.intervened.metric == pytest.approx(direct_run.intervened.metric, abs=1e-5)
    assert steer.kl == pytest.approx(direct_run.kl, abs=1e-6)


def test_a_missing_store_is_one_sentence(tmp_path: Path) -> None:
    from backend.api import open_workspace
    from backend.errors import StoreError

    with pytest.raises(StoreError):
        open_workspace(tmp_path / "nope.duckdb", model="tiny-llama")
