"""The served app is reachable from this machine only: with no address given, ``streamlit run app.py`` (the
project's .streamlit/config.toml) listens on 127.0.0.1, and so does ``make run``."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import e2e_harness
import pytest
from e2e_harness import ROOT, StreamlitServer, chromium_problem
from tiny_stores import TEST_STORE_NAME

pytestmark = pytest.mark.e2e


def _listening_addresses(port: int) -> set[str]:
    """Local addresses of the TCP sockets LISTENing on ``port`` (from /proc/net/tcp and tcp6, hex as the kernel
    writes them: 0100007F is 127.0.0.1, 00000000 is 0.0.0.0)."""
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            local, state = line.split()[1], line.split()[3]
            addr, hex_port = local.split(":")
            if state == "0A" and int(hex_port, 16) == port:  # 0A = LISTEN
                found.add(addr)
    return found


def test_the_server_binds_to_loopback_by_default(tmp_path: Path, tiny_store: Path, artifacts: Path) -> None:
    stores = tmp_path / "stores"
    stores.mkdir()
    shutil.copy(tiny_store, stores / TEST_STORE_NAME)
    with StreamlitServer(stores, TEST_STORE_NAME, artifacts / "default-bind-server.log", bind_flag=False) as server:
        addresses = _listening_addresses(server.port)
    loopback = {"0100007F", "0000000000000000FFFF00000100007F", "00000000000000000000000001000000"}
    assert addresses and addresses <= loopback, addresses


def test_make_run_serves_on_loopback() -> None:
    out = subprocess.run(["make", "-n", "run"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    line = next(line for line in out.splitlines() if "streamlit run app.py" in line)
    assert "--server.address 127.0.0.1" in line


def test_without_chromium_the_tests_say_to_run_make_browser(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(e2e_harness, "CHROMIUM", tmp_path / "no-chromium")
    assert "run `make browser`" in (chromium_problem() or "")
