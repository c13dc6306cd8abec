"""Crafted links and foreign hosts in a real browser and against the real server.

* Markdown injection: every page parameter the app echoes into a message is loaded with a markdown image (a tracking
  pixel), a link, an autolink and HTML pointing at another host; no request may leave for that host and no <img> or
  <a> to it may be drawn — the value shows as literal text.
* DNS rebinding: the server's WebSocket (which carries every click, widget change and "Save into the store") refuses a
  foreign Host and a foreign Origin, and accepts localhost; with the allow-list switched off the same handshake is
  accepted, which is what the default configuration prevents.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from e2e_harness import StreamlitServer, Tab, websocket_handshake
from tiny_stores import TEST_STORE_NAME

from backend.features import queries as feature_queries
from backend.store.access import reading

pytestmark = pytest.mark.e2e

EVIL = "evil.example"
PAYLOAD = (f"![x](http://{EVIL}/p.png) [click](http://{EVIL}/link) <http://{EVIL}/auto> "
           f"<img src=http://{EVIL}/i.png> http://{EVIL}/bare")


def _dict_id(store: Path) -> str:
    with reading(store) as con:
        dicts = feature_queries.feature_dictionaries(con, kind="attn_sae")
    return str(dicts[dicts["n_features"] > 0]["dict_id"].iloc[0])


def _evil_elements(tab: Tab) -> list[str]:
    return tab.page.evaluate(f"""() => [...document.querySelectorAll(
        'img[src*="{EVIL}"], a[href*="{EVIL}"], [srcset*="{EVIL}"], source[src*="{EVIL}"]')].map(e => e.outerHTML)""")


# (page path, link parameters, kind of message, text in it); "{dict}" is replaced by a real dictionary id.
SINKS = [
    ("", {"store": PAYLOAD + ".duckdb"}, "Error", "No store at"),
    ("feature_browser", {"dict": PAYLOAD, "feature": "3"}, "Error", "which this store does not have"),
    ("feature_browser", {"dict": "{dict}", "feature": PAYLOAD}, "Error", "is not a whole number"),
    ("prompt_explorer", {"prompt": "Mary and John", "dict": PAYLOAD}, "Warning", "has no attention SAE"),
    ("prompt_explorer", {"prompt": "Mary and John", "pos": "2", "feature": PAYLOAD}, "Warning", "is not a feature"),
    ("prompt_explorer", {"prompt": "Mary and John", "pos": PAYLOAD}, "Warning", "is not a position"),
    ("head_polysemanticity", {"head": PAYLOAD}, "Error", "is not of the form"),
    ("induction_heads", {"head": PAYLOAD}, "Warning", "which this model does not have"),
    ("attribution_faithfulness", {"comparison": PAYLOAD}, "Warning", "has no comparison"),
    ("circuit_graph", {"graph": PAYLOAD}, "Error", "has no graph"),
]


@pytest.mark.parametrize("path, params, kind, text", SINKS, ids=[f"{s[0] or 'home'}-{next(iter(s[1]))}" if len(s[1]) == 1
                                                                 else f"{s[0]}-{list(s[1])[-1]}" for s in SINKS])
def test_a_crafted_link_shows_its_value_as_text_and_loads_nothing_from_another_host(
        tab: Tab, tiny_store: Path, path: str, params: dict[str, str], kind: str, text: str) -> None:
    params = {k: v.replace("{dict}", _dict_id(tiny_store)) for k, v in params.items()}
    tab.open(path, **params)
    message = tab.wait_for_alert(kind, text)
    assert "![x](http:" in message and f"{EVIL}/p.png" in message  # shown as the characters it is (a path
    # collapses the "//")
    assert _evil_elements(tab) == []
    assert [u for u in tab.external if EVIL in u] == []  # no tracking pixel was requested
    assert tab.problems() == []


def test_typed_search_text_is_literal(tab: Tab, tiny_store: Path) -> None:
    tab.open("feature_browser", dict=_dict_id(tiny_store), feature="0")
    tab.page.get_by_text("By token text").click()
    box = tab.page.get_by_role("textbox", name="Token text contains")
    box.fill(PAYLOAD)
    box.press("Enter")
    message = tab.wait_for_alert("Info", "No feature's top examples fire")
    assert f"http://{EVIL}/p.png" in message
    assert _evil_elements(tab) == [] and [u for u in tab.external if EVIL in u] == []


# --------------------------------------------------------------------------------------------------------------
# DNS rebinding: the WebSocket's Host and Origin


def test_the_websocket_refuses_foreign_hosts_and_origins_and_accepts_localhost(server: StreamlitServer) -> None:
    port = server.port
    accepted = "101"
    for host in (f"127.0.0.1:{port}", f"localhost:{port}", f"[::1]:{port}"):
        origin = f"http://{host}"
        assert accepted in websocket_handshake(port, host, origin), host
    # A DNS-rebinding page: its host name now points at 127.0.0.1, so Host and Origin are both the attacker's.
    assert accepted not in websocket_handshake(port, f"{EVIL}:{port}", f"http://{EVIL}:{port}")
    assert accepted not in websocket_handshake(port, f"{EVIL}:{port}", None)
    # A page on another site opening ws://127.0.0.1: the Host is ours, the Origin is not.
    assert accepted not in websocket_handshake(port, f"127.0.0.1:{port}", f"http://{EVIL}")


def test_without_the_allow_list_the_rebinding_handshake_would_be_accepted(tmp_path: Path, tiny_store: Path,
                                                                         artifacts: Path) -> None:
    """The check above can fail: served with `--server.allowedHosts '*'` (how one serves deliberately on any name),
    the same rebinding handshake is accepted."""
    stores = tmp_path / "stores"
    stores.mkdir()
    shutil.copy(tiny_store, stores / TEST_STORE_NAME)
    with StreamlitServer(stores, TEST_STORE_NAME, artifacts / "any-host-server.log",
                         extra_args=["--server.allowedHosts", "*"]) as open_server:
        port = open_server.port
        assert "101" in websocket_handshake(port, f"{EVIL}:{port}", f"http://{EVIL}:{port}")
