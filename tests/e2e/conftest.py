"""Fixtures of the real-browser tests: one Streamlit server and one headless chromium for the whole session.

* ``e2e_stores`` — a stores directory with ``test.duckdb`` (a copy of the session's ``tiny_store``) and the bad stores
  the hostile-input tests open (``corrupt.duckdb``: not a DuckDB file; ``elsewhere.duckdb``: a symlink leaving the
  directory).
* ``server`` — ``streamlit run app.py`` on a free 127.0.0.1 port serving ``e2e_stores``; its log goes to
  ``test-artifacts/e2e/server.log`` and it is stopped at the end, also when tests fail.
* ``browser_context`` — Playwright (sync API) driving Debian's ``/usr/bin/chromium`` with a fresh user-data-dir.
* ``tab`` — a new page per test on the server (a new Streamlit session), screenshot saved to the artifacts
  directory when the test ends; a test fails if any JavaScript dialog opened.

Without chromium every test here fails with one sentence saying to run ``make browser`` (never a silent skip).
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any, Iterator

import pytest
from e2e_harness import (
    ARTIFACTS,
    CHROMIUM,
    CHROMIUM_ARGS,
    CORRUPT_STORE,
    ESCAPING_LINK,
    PAGE_TIMEOUT_MS,
    VIEWPORT,
    StreamlitServer,
    Tab,
    chromium_problem,
    tab_on,
)
from tiny_stores import TEST_STORE_NAME


@pytest.fixture(scope="session")
def artifacts() -> Path:
    """test-artifacts/e2e (git-ignored), emptied of the previous run's screenshots."""
    for old in ARTIFACTS.glob("**/*.png"):
        old.unlink()
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    return ARTIFACTS


@pytest.fixture(scope="session")
def e2e_stores(tmp_path_factory: pytest.TempPathFactory, tiny_store: Path) -> Path:
    """The stores directory the server lists: the tiny store, a corrupt one, and a symlink to a store outside."""
    directory = tmp_path_factory.mktemp("e2e_stores")
    shutil.copy(tiny_store, directory / TEST_STORE_NAME)
    (directory / CORRUPT_STORE).write_bytes(b"\x00not a duckdb file\xff" * 512)
    (directory / ESCAPING_LINK).symlink_to(tiny_store)
    return directory


@pytest.fixture(scope="session")
def server(e2e_stores: Path, artifacts: Path) -> Iterator[StreamlitServer]:
    """One Streamlit server for the session (the model and SAEs it loads are shared by every test's session)."""
    with StreamlitServer(e2e_stores, TEST_STORE_NAME, artifacts / "server.log") as srv:
        yield srv


@pytest.fixture(scope="session")
def browser_context(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """A headless chromium (Debian's, not a Playwright download) with a fresh profile directory."""
    problem = chromium_problem()
    if problem:
        pytest.fail(problem, pytrace=False)
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        context = pw.chromium.launch_persistent_context(
            str(tmp_path_factory.mktemp("chromium-profile")), executable_path=str(CHROMIUM), args=CHROMIUM_ARGS,
            headless=True, viewport=VIEWPORT)
        context.set_default_timeout(PAGE_TIMEOUT_MS)
        try:
            yield context
        finally:
            context.close()


@pytest.fixture
def tab(browser_context: Any, server: StreamlitServer, request: pytest.FixtureRequest) -> Iterator[Tab]:
    """A fresh browser tab (a fresh Streamlit session) on the test server."""
    yield from tab_on(browser_context, server.url, request.node.name)
