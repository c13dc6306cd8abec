"""The Streamlit app, page by page, with ``streamlit.testing.v1.AppTest`` on the tiny-llama test store.

Fixtures (tests/conftest.py): ``app_stores_dir`` is a fresh stores directory holding ``test.duckdb`` that the app
opens by default (via CIRCUITSCOPE_STORES_DIR / CIRCUITSCOPE_STORE); ``tiny_model`` / ``tiny_store`` are per session.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import duckdb
import pytest
from streamlit.testing.v1 import AppTest

from backend.errors import InputError, StoreError
from backend.inputs.prompts import encode_prompt
from backend.model import predict
from backend.store import names, queries
from backend.store.access import reading
from backend.ui import progress_bar, token_html

ROOT = Path(__file__).resolve().parents[2]
TIMEOUT = 120  # the first Prompt Explorer run imports transformer_lens (~10 s cold on 2 cores)

PAGES = [
    "pages/feature_browser.py",
    "pages/prompt_explorer.py",
    "pages/head_polysemanticity.py",
    "pages/induction_heads.py",
    "pages/attribution_faithfulness.py",
    "pages/circuit_graph.py",
]


def _app(script: str = "app.py", **params: str) -> AppTest:
    at = AppTest.from_file(str(ROOT / script), default_timeout=TIMEOUT)
    at.query_params.update(params)
    return at


def _texts(at: AppTest, kind: str) -> list[str]:
    return [str(e.value) for e in at.get(kind)]


def _assert_clean(at: AppTest) -> None:
    assert not at.exception, [e.value for e in at.exception]


# --------------------------------------------------------------------------------------------------------------
# Every page renders


def test_home_shows_model_and_corpus_size(app_stores_dir: Path) -> None:
    at = _app().run()
    _assert_clean(at)
    with reading(app_stores_dir / "test.duckdb") as con:
        corpora = queries.corpora(con)
    n_tokens = int(corpora["n_tokens"].iloc[0])
    assert any("tiny-llama" in t for t in _texts(at, "subheader"))
    metrics = {m.label: m.value for m in at.metric}
    assert metrics["Tokens"] == f"{n_tokens:,}"
    assert metrics["Layers"] == "2"
    assert metrics["Contexts"] == f"{int(corpora['n_contexts'].iloc[0]):,} × {int(corpora['n_ctx'].iloc[0]):,}"
    assert not at.error
    assert at.query_params["store"] == "test.duckdb" and at.query_params["model"] == "tiny-llama"
    tasks = next(df.value for df in at.dataframe if "metric_name" in df.value.columns)
    assert "ioi" in set(tasks["task"])


def test_every_page_is_reachable_from_the_router(app_stores_dir: Path) -> None:
    at = _app().run()
    for page in PAGES:
        at.switch_page(page).run()
        _assert_clean(at)
        assert not at.error, _texts(at, "error")
        # The store choice survives the page switch (which clears query params) and is written back to the URL.
        assert at.query_params["store"] == "test.duckdb"


def test_home_shows_dictionary_quality(app_stores_dir: Path, tiny_store: Path) -> None:
    from backend.store.access import StoreWriter

    path = app_stores_dir / "dicts.duckdb"
    shutil.copy(tiny_store, path)
    with StoreWriter(path, kind="test", model="tiny-llama") as w:
        w.con.execute(
            "INSERT INTO dictionaries (dict_id, model, kind, architecture, hook_name, layer, d_in, d_sae, l0, fve, "
            "ce_clean, ce_spliced, ce_ablated, ce_loss_recovered, dead_fraction) VALUES "
            "('resid-L1', 'tiny-llama', 'sae', 'topk', 'blocks.1.hook_resid_post', 1, 64, 256, 12.5, 0.8, "
            "3.0, 3.25, 6.0, 0.9167, 0.02)")
    at = _app(store="dicts.duckdb").run()
    _assert_clean(at)
    frames = [df.value for df in at.dataframe]
    quality = next(f for f in frames if "delta_ce" in f.columns).set_index("dict_id")
    assert quality.loc["resid-L1", "delta_ce"] == pytest.approx(0.25)
    assert quality.loc["resid-L1", "l0"] == pytest.approx(12.5)


# --------------------------------------------------------------------------------------------------------------
# Stores: picker, missing, corrupt, outside the directory, swapped while serving


def test_missing_store_shows_how_to_build_it(app_stores_dir: Path) -> None:
    at = _app(store="nope.duckdb").run()
    _assert_clean(at)
    assert len(at.error) == 1
    msg = at.error[0].value
    assert "No store at" in msg and "nope.duckdb" in msg and "python -m backend precompute" in msg and "make demo" in msg
    assert not at.metric


def test_default_store_missing_shows_how_to_build_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CIRCUITSCOPE_STORES_DIR", str(tmp_path))
    monkeypatch.delenv(names.STORE_ENV, raising=False)
    at = _app().run()
    _assert_clean(at)
    assert "demo.duckdb" in at.error[0].value and "make demo" in at.error[0].value


@pytest.mark.parametrize("kind", ["garbage", "empty", "not_a_store"])
def test_corrupt_store_shows_clear_error(app_stores_dir: Path, kind: str) -> None:
    path = app_stores_dir / "bad.duckdb"
    if kind == "garbage":
        path.write_bytes(os.urandom(4096))
    elif kind == "empty":
        path.write_bytes(b"")
    else:  # a valid DuckDB file that is not a circuitscope store
        con = duckdb.connect(str(path))
        con.execute("CREATE TABLE t (x INTEGER)")
        con.close()
    for page in ("app.py", "pages/feature_browser.py", "pages/prompt_explorer.py"):
        at = _app(page, store="bad.duckdb").run()
        _assert_clean(at)
        assert len(at.error) == 1, page
        assert "bad.duckdb" in at.error[0].value
        assert "corrupt" in at.error[0].value or "not a circuitscope store" in at.error[0].value


@pytest.mark.parametrize("name", ["../test.duckdb", "../../etc/passwd", "/etc/passwd", "sub/../../x.duckdb"])
def test_store_outside_the_stores_dir_is_refused(app_stores_dir: Path, name: str) -> None:
    at = _app(store=name).run()
    _assert_clean(at)
    assert len(at.error) == 1
    assert "outside the stores directory" in at.error[0].value
    assert not at.metric and not at.dataframe


def test_absolute_path_to_a_real_store_elsewhere_is_refused(app_stores_dir: Path, tiny_store: Path) -> None:
    at = _app(store=str(tiny_store)).run()
    _assert_clean(at)
    assert "outside the stores directory" in at.error[0].value
    # The user recovers by picking a store in the sidebar.
    at.sidebar.selectbox(key="cs_store_picker").select("test.duckdb").run()
    _assert_clean(at)
    assert not at.error and at.query_params["store"] == "test.duckdb"


def test_resolve_store_rules(tmp_path: Path) -> None:
    (tmp_path / "a.duckdb").write_bytes(b"")
    assert names.resolve_store("a.duckdb", tmp_path) == (tmp_path / "a.duckdb").resolve()
    assert names.resolve_store(str(tmp_path / "a.duckdb"), tmp_path) == (tmp_path / "a.duckdb").resolve()
    outside = tmp_path.parent / "outside.duckdb"
    (tmp_path / "link.duckdb").symlink_to(outside)
    for bad in ("../outside.duckdb", str(outside), "link.duckdb", ".", "", "notes.txt"):
        with pytest.raises(StoreError):
            names.resolve_store(bad, tmp_path)


def test_store_picker_lists_and_switches_stores(app_stores_dir: Path, tiny_store: Path) -> None:
    shutil.copy(tiny_store, app_stores_dir / "other.duckdb")
    (app_stores_dir / ".other.duckdb.123.tmp").write_bytes(b"x")  # a writer's temporary: never listed
    assert names.list_stores(app_stores_dir) == ["test.duckdb", "other.duckdb"]
    at = _app().run()
    picker = at.sidebar.selectbox(key="cs_store_picker")
    assert list(picker.options) == ["test.duckdb", "other.duckdb"]
    picker.select("other.duckdb").run()
    _assert_clean(at)
    assert at.query_params["store"] == "other.duckdb"


def test_a_store_swapped_in_while_serving_is_picked_up(app_stores_dir: Path) -> None:
    from backend.store.access import StoreWriter

    at = _app().run()
    before = {m.label: m.value for m in at.metric}["Contexts"]
    # A writer builds the next version beside the live file and swaps it in atomically while the app is serving.
    with StoreWriter(app_stores_dir / "test.duckdb", kind="test", model="tiny-llama") as w:
        w.con.execute("UPDATE corpora SET n_contexts = 3")
    at.run()
    _assert_clean(at)
    after = {m.label: m.value for m in at.metric}["Contexts"]
    assert before.startswith("8 ×") and after.startswith("3 ×")


# --------------------------------------------------------------------------------------------------------------
# Prompt Explorer


def test_prompt_explorer_tokens_match_the_prompt(app_stores_dir: Path, tiny_model: Any) -> None:
    prompt = "The cat sat on the mat & <b>purred</b>"
    at = _app("pages/prompt_explorer.py").run()
    at.text_area(key="pe_prompt").input(prompt).run()
    _assert_clean(at)
    assert not at.error
    expected = encode_prompt(tiny_model, prompt)
    table = at.dataframe[0].value
    assert len(table) == len(expected.ids) == 1 + len(tiny_model.tokenizer(prompt, add_special_tokens=False)["input_ids"])
    assert table["id"].tolist() == expected.ids
    assert table["top-5 predictions"].str.count("%").tolist() == [5] * len(table)
    assert table["loss"].isna().tolist() == [False] * (len(table) - 1) + [True]
    assert at.query_params["prompt"] == prompt  # deep link
    assert at.query_params["pos"] == str(len(table) - 1)


def test_prompt_explorer_opens_a_deep_link(app_stores_dir: Path) -> None:
    at = _app("pages/prompt_explorer.py", store="test.duckdb", prompt="Hello world", pos="1").run()
    _assert_clean(at)
    assert at.text_area(key="pe_prompt").value == "Hello world"
    assert at.selectbox(key="pe_pos").value == 1
    assert len(at.dataframe[0].value) == 3  # BOS, "Hello", " world"


def test_prompt_survives_a_page_switch(app_stores_dir: Path) -> None:
    at = _app().run()
    at.switch_page("pages/prompt_explorer.py").run()
    at.text_area(key="pe_prompt").input("Round trip prompt").run()
    at.switch_page("pages/feature_browser.py").run()
    at.switch_page("pages/prompt_explorer.py").run()
    _assert_clean(at)
    assert at.text_area(key="pe_prompt").value == "Round trip prompt"
    assert at.query_params["prompt"] == "Round trip prompt" and at.query_params["store"] == "test.duckdb"


@pytest.mark.parametrize("prompt", ["", "   \n\t "])
def test_prompt_explorer_empty_prompt(app_stores_dir: Path, prompt: str) -> None:
    at = _app("pages/prompt_explorer.py").run()
    at.text_area(key="pe_prompt").input(prompt).run()
    _assert_clean(at)
    assert len(at.error) == 1 and "The prompt is empty" in at.error[0].value
    assert not at.dataframe
    assert "prompt" not in at.query_params


def test_prompt_explorer_long_prompt_is_truncated_with_a_warning(app_stores_dir: Path, tiny_model: Any) -> None:
    prompt = "lorem ipsum dolor sit amet " * 4000  # 10^5 characters
    prompt = prompt[:100_000]
    at = _app("pages/prompt_explorer.py").run()
    at.text_area(key="pe_prompt").input(prompt).run()
    _assert_clean(at)
    warnings = " ".join(_texts(at, "warning"))
    assert "only the first" in warnings and "fit the context" in warnings
    assert len(at.dataframe[0].value) == min(tiny_model.cfg.n_ctx, predict.EXPLORER_MAX_TOKENS)
    assert "prompt" not in at.query_params  # too long for a link


def test_prompt_explorer_rejects_non_utf8_file(app_stores_dir: Path) -> None:
    at = _app("pages/prompt_explorer.py").run()
    at.file_uploader(key="pe_file").set_value(("latin1.txt", "café noir".encode("latin-1"), "text/plain")).run()
    _assert_clean(at)
    assert len(at.error) == 1 and "not valid UTF-8" in at.error[0].value


def test_prompt_explorer_runs_an_uploaded_file(app_stores_dir: Path, tiny_model: Any) -> None:
    at = _app("pages/prompt_explorer.py").run()
    at.file_uploader(key="pe_file").set_value(("p.txt", "Paris is in France".encode(), "text/plain")).run()
    _assert_clean(at)
    assert len(at.dataframe[0].value) == len(encode_prompt(tiny_model, "Paris is in France").ids)


def test_next_token_predictions_agree_with_the_model(tiny_model: Any) -> None:
    import torch

    ids = encode_prompt(tiny_model, "one two three four").ids
    df = predict.next_token_predictions(tiny_model, ids, k=5)
    with torch.no_grad():
        per_token = tiny_model(torch.tensor([ids]), return_type="loss", loss_per_token=True)[0]
    assert df["loss"].iloc[:-1].tolist() == pytest.approx(per_token.tolist(), abs=1e-4)
    probs = df["top_probs"].tolist()
    assert all(len(p) == 5 and p == sorted(p, reverse=True) for p in probs)


# --------------------------------------------------------------------------------------------------------------
# Helpers: HTML escaping, progress


def test_token_strip_escapes_untrusted_text() -> None:
    out = token_html.token_strip_html(["<script>alert(1)</script>", "a & b", '" onmouseover="x'], [1.0, float("nan"), 0.5])
    assert "<script>" not in out and "&lt;script&gt;alert(1)&lt;/script&gt;" in out
    assert "a &amp; b" in out
    assert '" onmouseover' not in out and "&quot; onmouseover=&quot;x" in out
    assert out.count("<span") == 3


def test_token_strip_without_values() -> None:
    out = token_html.token_strip_html(["x\n", "y"])
    assert out.count("<span") == 2 and "x↵" in out


def test_progress_sink_shows_count_and_eta() -> None:
    def script() -> None:
        from backend.progress import say, track, using_sink
        from backend.ui.progress_bar import st_progress_sink

        with using_sink(st_progress_sink()):
            for _ in track(range(4), total=4, desc="Scoring"):
                pass
            say("Done scoring")

    at = AppTest.from_function(script, default_timeout=30).run()
    _assert_clean(at)
    bars = at.get("progress")
    assert len(bars) == 1
    assert bars[0].proto.value == 100 and "Done scoring" in bars[0].proto.text


def test_format_eta() -> None:
    assert [progress_bar.format_eta(s) for s in (None, 0.2, 42, 185, 3720)] == ["?", "<1 s", "42 s", "3 min 05 s", "1 h 02 min"]


def test_input_error_is_a_sentence(tiny_model: Any) -> None:
    with pytest.raises(InputError, match="UTF-8"):
        encode_prompt(tiny_model, b"\xff\xfe\x00bad")


# --------------------------------------------------------------------------------------------------------------
# Errors never become tracebacks; store-only pages never import the model stack


def test_unexpected_error_is_one_sentence(app_stores_dir: Path) -> None:
    def script() -> None:
        from backend.ui import shell  # AppTest runs this function's source on its own

        def body(ctx: object) -> None:
            raise RuntimeError("internal detail that must not reach the page")

        shell.run_page("Broken", body)

    at = AppTest.from_function(script, default_timeout=30).run()
    _assert_clean(at)
    assert len(at.error) == 1 and "Something unexpected went wrong" in at.error[0].value
    assert "RuntimeError" in at.error[0].value and "internal detail" not in at.error[0].value


def test_home_page_does_not_import_torch(app_stores_dir: Path) -> None:
    """The home page only reads the store: opening the app must not pay for importing torch and friends."""
    import subprocess
    import sys

    code = (
        "import sys, time\n"
        "from streamlit.testing.v1 import AppTest\n"
        "t = time.perf_counter()\n"
        "for page in ['app.py']:\n"
        f"    at = AppTest.from_file({str(ROOT)!r} + '/' + page, default_timeout=60).run()\n"
        "    assert not at.exception and not at.error, page\n"
        "heavy = sorted(m for m in ('torch', 'transformer_lens', 'transformers', 'sae_lens') if m in sys.modules)\n"
        "print(heavy, round(time.perf_counter() - t, 2))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120,
                         env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split("]")[0] == "[", out.stdout
