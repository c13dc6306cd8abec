"""Links are things people click: every value a link (or typed text) puts into a message is literal text, every odd link
parameter or store gets a sentence saying what is wrong and what to do, never "Something unexpected".

AppTest (streamlit.testing.v1) on the tiny test store; the real-browser versions of the markdown checks (no request
leaves for another host) are in tests/e2e/test_e2e_links.py.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import duckdb
import pytest
from markdown_it import MarkdownIt
from streamlit.testing.v1 import AppTest

from backend.errors import StoreError, literal
from backend.store import names
from backend.store.access import reading
from backend.ui import shell

ROOT = Path(__file__).resolve().parents[2]
TIMEOUT = 120
EVIL = "evil.example"
# Markdown image (a tracking pixel), link, autolink, raw HTML and a backtick run that tries to close a code span.
PAYLOAD = (f"![x](http://{EVIL}/p.png) [click](http://{EVIL}/) <http://{EVIL}/a> <img src=http://{EVIL}/i.png> "
           f"http://{EVIL}/bare `` ` ``")
UNEXPECTED = "Something unexpected"


def _app(script: str = "app.py", **params: str) -> AppTest:
    at = AppTest.from_file(str(ROOT / script), default_timeout=TIMEOUT)
    at.query_params.update(params)
    return at


def _messages(at: AppTest) -> list[str]:
    """Markdown bodies of every message, caption and markdown element the run drew."""
    out = []
    for kind in ("error", "warning", "info", "success", "caption", "markdown", "subheader"):
        out += [str(e.value) for e in at.get(kind)]
    return out


_CODE = re.compile(r"<code>.*?</code>", re.S)


def _outside_code(markdown: str) -> str:
    """The HTML CommonMark makes of ``markdown``, with every code span removed: what would be live markup."""
    return _CODE.sub("", MarkdownIt("commonmark").render(markdown))


def _assert_inert(at: AppTest) -> None:
    """No exception, no "Something unexpected", and the hostile host only ever inside a code span."""
    assert not at.exception, [e.value for e in at.exception]
    bodies = _messages(at)
    assert not any(UNEXPECTED in b for b in bodies), bodies
    for body in bodies:
        html = _outside_code(body)
        assert EVIL not in html and "<img" not in html, body  # the pages draw links of their own


def _shown(at: AppTest, needle: str) -> str:
    found = [b for b in _messages(at) if needle in b]
    assert found, _messages(at)
    return found[0]


# --------------------------------------------------------------------------------------------------------------
# literal(): the helper every sink uses


@pytest.mark.parametrize("value", [PAYLOAD, "`", "``x``", " padded ", "", "a\nb\r\n![i](http://evil.example/p)",
                                   "x" * 500, "<script>alert(1)</script>", "**bold** _it_ :red[colour] $x$"])
def test_literal_is_one_code_span_holding_the_value(value: str) -> None:
    out = literal(value)
    tokens = MarkdownIt("commonmark").parseInline(out)[0].children
    assert [t.type for t in tokens] == ["code_inline"], out
    flat = re.sub(r"[\r\n]+", " ", value)
    shown = tokens[0].content
    assert "\n" not in out and len(shown) <= 120
    assert shown == (flat if len(flat) <= 120 else flat[:119] + "…") or (not flat.strip())


def test_literal_fuzzed() -> None:
    from hypothesis import given, settings
    from hypothesis import strategies as hs

    @settings(max_examples=300, deadline=None, derandomize=True, database=None)
    @given(hs.text(alphabet=hs.characters(codec="utf-8"), max_size=60))
    def check(value: str) -> None:
        out = literal(value)
        assert "\n" not in out and "\r" not in out
        html = _outside_code(out)
        assert "<img" not in html and "<a " not in html and "<code>" in MarkdownIt("commonmark").render(out)

    check()


@pytest.mark.parametrize("raw, want", [("3", 3), ("-1", -1), (" 4 ", 4), ("--1", None), ("²", None), ("٣", None),
                                        ("1_0", None), ("1e3", None), ("9" * 16, None), ("", None), (None, None)])
def test_link_int_takes_ascii_whole_numbers_only(raw: str | None, want: int | None) -> None:
    assert shell.link_int(raw) == want


def test_prose_turns_markup_into_text() -> None:
    html = MarkdownIt("commonmark").render(shell.prose(PAYLOAD))
    assert "<img" not in html and "<a " not in html


# --------------------------------------------------------------------------------------------------------------
# The sinks the issue lists, each echoing PAYLOAD


def _feature_dict(store: Path) -> str:
    from backend.features import queries as feature_queries

    with reading(store) as con:
        dicts = feature_queries.feature_dictionaries(con, kind="attn_sae")
    return str(dicts[dicts["n_features"] > 0]["dict_id"].iloc[0])


def test_store_link(app_stores_dir: Path) -> None:
    at = _app(store=PAYLOAD + ".duckdb").run()
    _assert_inert(at)
    assert "No store at" in _shown(at, "No store at")


@pytest.mark.parametrize("params, needle", [
    ({"dict": PAYLOAD, "feature": "3"}, "which this store does not have"),
    ({"feature": PAYLOAD}, "is not a whole number"),
    ({"feature": "²"}, "is not a whole number"),
])
def test_feature_browser_links(app_stores_dir: Path, params: dict[str, str], needle: str) -> None:
    if "dict" not in params:
        params = {"dict": _feature_dict(app_stores_dir / "test.duckdb"), **params}
    at = _app("pages/feature_browser.py", **params).run()
    _assert_inert(at)
    _shown(at, needle)


def test_feature_browser_token_search(app_stores_dir: Path) -> None:
    at = _app("pages/feature_browser.py", dict=_feature_dict(app_stores_dir / "test.duckdb"), feature="0").run()
    at.radio(key="fb_mode").set_value("By token text").run()
    at.text_input(key="fb_text").set_value(PAYLOAD).run()
    _assert_inert(at)
    _shown(at, "No feature's top examples fire")


@pytest.mark.parametrize("params, needle", [
    ({"dict": PAYLOAD}, "has no attention SAE"),
    ({"feature": PAYLOAD}, "is not a feature of"),
    ({"feature": "²"}, "is not a feature of"),
    ({"pos": "--1"}, "is not a position of this prompt"),
    ({"pos": "²"}, "is not a position of this prompt"),
    ({"pos": "99999"}, "is not a position of this prompt"),
    ({"pos": PAYLOAD}, "is not a position of this prompt"),
])
def test_prompt_explorer_links(app_stores_dir: Path, params: dict[str, str], needle: str) -> None:
    at = _app("pages/prompt_explorer.py", **{"prompt": "When Mary and John went", "pos": "3", **params}).run()
    _assert_inert(at)
    message = _shown(at, needle)
    assert "choose" in message or "showing" in message  # says what happens and what to do


@pytest.mark.parametrize("script", ["pages/head_polysemanticity.py", "pages/induction_heads.py"])
def test_head_links(app_stores_dir: Path, script: str) -> None:
    at = _app(script, head=PAYLOAD).run()
    _assert_inert(at)
    _shown(at, "head")
    assert any(PAYLOAD[:20] in b for b in _messages(at)), "the link's value is echoed (as literal text)"


def test_comparison_link(app_stores_dir: Path) -> None:
    at = _app("pages/attribution_faithfulness.py", comparison=PAYLOAD).run()
    _assert_inert(at)
    _shown(at, "has no comparison")


def test_graph_link(app_stores_dir: Path) -> None:
    at = _app("pages/circuit_graph.py", graph=PAYLOAD).run()
    _assert_inert(at)
    _shown(at, "has no graph")


def test_typed_answer_token_is_literal(app_stores_dir: Path) -> None:
    """The attribution page's typed answer token is echoed by the 'single token' error."""
    at = _app("pages/attribution_faithfulness.py").run()
    at.text_input(key="af_answer").set_value(PAYLOAD)
    submit = next(b for b in at.get("form_submit_button") if "Run the methods" in str(b.proto.label))
    submit.click().run()
    _assert_inert(at)
    _shown(at, "single token")


# --------------------------------------------------------------------------------------------------------------
# Store names and stores that are not what they claim: a sentence, never "Something unexpected"


@pytest.mark.parametrize("name, needle", [
    ("loop.duckdb", "symlink loop"),
    ("bad\x00name.duckdb", "control characters"),
    ("s" * 300 + ".duckdb", "longer than any file name"),
    ("a/" * 120 + "x.duckdb", "No store at"),
])
def test_odd_store_names(app_stores_dir: Path, name: str, needle: str) -> None:
    (app_stores_dir / "loop.duckdb").symlink_to(app_stores_dir / "loop2.duckdb")
    (app_stores_dir / "loop2.duckdb").symlink_to(app_stores_dir / "loop.duckdb")
    for script in ("app.py", "pages/feature_browser.py"):
        at = _app(script, store=name).run()
        _assert_inert(at)
        assert len(at.error) == 1 and needle in at.error[0].value, at.error
        assert "choose" in at.error[0].value or "build one" in at.error[0].value


def _rotted(path: Path) -> None:
    """Damage the blocks holding the first core tables' data (headers intact): the store opens, then a read fails."""
    data = bytearray(path.read_bytes())
    for i in range(3 * 4096 + 100, len(data), 4001):
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("kind, needle", [
    ("meta only", "no schema version"),
    ("bad version", "not a whole number"),
    ("rotted", "could not be"),
    ("view", "views or macros"),
])
def test_odd_stores_get_a_sentence(app_stores_dir: Path, tiny_store: Path, kind: str, needle: str) -> None:
    path = app_stores_dir / "odd.duckdb"
    if kind == "rotted":
        shutil.copy(tiny_store, path)
        _rotted(path)
    else:
        con = duckdb.connect(str(path))
        con.execute("CREATE TABLE meta (key VARCHAR, value VARCHAR)")
        if kind == "bad version":
            con.execute("INSERT INTO meta VALUES ('schema_version', 'three')")
        if kind == "view":
            con.execute("INSERT INTO meta VALUES ('schema_version', '3')")
            con.execute("CREATE VIEW runs AS SELECT content AS run_id FROM read_text('/etc/hostname')")
        con.close()
    for script in ("app.py", "pages/feature_browser.py", "pages/prompt_explorer.py"):
        at = _app(script, store="odd.duckdb").run()
        _assert_inert(at)
        assert len(at.error) == 1 and needle in at.error[0].value, (script, at.error)
        assert "delete it" in at.error[0].value or "open only stores" in at.error[0].value


def test_resolve_store_never_raises_anything_but_a_sentence(tmp_path: Path) -> None:
    from hypothesis import given, settings
    from hypothesis import strategies as hs

    (tmp_path / "loop.duckdb").symlink_to(tmp_path / "loop.duckdb")

    @settings(max_examples=300, deadline=None, derandomize=True, database=None)
    @given(hs.one_of(hs.text(max_size=300), hs.sampled_from(["loop.duckdb", "../x.duckdb", "a\x00.duckdb"])))
    def check(name: str) -> None:
        try:
            path = names.resolve_store(name, tmp_path)
        except StoreError as exc:
            assert "\n" not in str(exc)
        else:
            assert path.is_relative_to(tmp_path.resolve()) and path.suffix == ".duckdb"

    check()


def test_feature_browser_links_fuzzed(app_stores_dir: Path) -> None:
    """A few random link parameters on a whole page run (each run takes a second or two, hence few examples)."""
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as hs

    dict_id = _feature_dict(app_stores_dir / "test.duckdb")

    @settings(max_examples=12, deadline=None, derandomize=True, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
    @given(feature=hs.one_of(hs.text(max_size=30), hs.integers(-10**30, 10**30).map(str)),
           store=hs.sampled_from(["test.duckdb", PAYLOAD, "x\x00", "../test.duckdb", "%00", "test.duckdb "]))
    def check(feature: str, store: str) -> None:
        at = _app("pages/feature_browser.py", store=store, dict=dict_id, feature=feature).run()
        _assert_inert(at)

    check()
