"""A read-only deployment (``CIRCUITSCOPE_READ_ONLY=1``) in a real browser: every page that can save says instead that
nothing is saved, offers no save control, and after a person has worked through them the store's directory is
byte-for-byte what it was (no save file, no lock, no temporary copy)."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path
from typing import Any, Iterator

import pytest
from e2e_harness import StreamlitServer, Tab, graph_frame, tab_on
from tiny_stores import TEST_STORE_NAME

from backend.circuits.storage import list_graphs
from backend.store.access import READ_ONLY_MESSAGE, reading

pytestmark = pytest.mark.e2e

MAIN = '[data-testid="stMain"]'


def _snapshot(directory: Path) -> dict[str, str]:
    """Every file under ``directory`` (hidden ones too) with the hash of its bytes."""
    return {str(f.relative_to(directory)): hashlib.sha256(f.read_bytes()).hexdigest()
            for f in sorted(directory.rglob("*")) if f.is_file()}


@pytest.fixture(scope="module")
def read_only_server(tmp_path_factory: pytest.TempPathFactory, tiny_store: Path,
                     artifacts: Path) -> Iterator[StreamlitServer]:
    stores = tmp_path_factory.mktemp("read_only_stores")
    shutil.copy(tiny_store, stores / TEST_STORE_NAME)
    with StreamlitServer(stores, TEST_STORE_NAME, artifacts / "read-only-server.log",
                         env={"CIRCUITSCOPE_READ_ONLY": "1"}) as server:
        yield server


@pytest.fixture
def ro_tab(browser_context: Any, read_only_server: StreamlitServer, request: pytest.FixtureRequest) -> Iterator[Tab]:
    yield from tab_on(browser_context, read_only_server.url, request.node.name)


def _says_read_only(tab: Tab) -> None:
    tab.page.locator(MAIN, has_text=READ_ONLY_MESSAGE).first.wait_for(state="visible")


def test_no_page_saves_in_a_read_only_deployment(ro_tab: Tab, read_only_server: StreamlitServer) -> None:
    stores = read_only_server.stores_dir
    store = stores / TEST_STORE_NAME
    before = _snapshot(stores)
    with reading(store) as con:
        gid = str(list_graphs(con)["graph_id"].iloc[0])
        dict_id = con.execute("SELECT dict_id FROM dictionaries WHERE kind = 'attn_sae' ORDER BY dict_id"
                              ).fetchall()[0][0]
    buttons = ro_tab.page.get_by_role("button")

    # Circuit Graph: a stored graph, its view changed by hand, no save button and no import form
    ro_tab.open("circuit_graph", graph=gid)
    frame = graph_frame(ro_tab)
    frame.locator("#err").uncheck()
    ro_tab.page.wait_for_function("() => new URL(location.href).searchParams.get('err') !== null")
    ro_tab.wait_idle()
    _says_read_only(ro_tab)
    assert buttons.filter(has_text="Save this").count() == 0
    ro_tab.page.get_by_text("Import a graph JSON").click()
    assert ro_tab.page.locator(f'{MAIN} [data-testid="stFileUploader"]').count() == 0

    # Feature Browser: the label is shown, the form to write one is not
    ro_tab.open("feature_browser", dict=dict_id, feature="0")
    ro_tab.page.locator(MAIN, has_text="Label:").first.wait_for(state="visible")
    _says_read_only(ro_tab)
    assert ro_tab.page.get_by_role("textbox", name="Your label").count() == 0
    assert buttons.filter(has_text="Save label").count() == 0

    assert ro_tab.problems() == []
    assert _snapshot(stores) == before
