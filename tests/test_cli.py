"""`agentpay devnet up/down`, run as the installed console script in a subprocess, as a user would."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from escrow import DevnetState, stop_detached
from escrow.devnet._node import pid_alive
from gateway._store import PaymentStore

AGENTPAY = shutil.which("agentpay", path=str(Path(sys.executable).parent)) or "agentpay"


def agentpay(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([AGENTPAY, *args], capture_output=True, text=True, timeout=120)


def pgrep(pid: int, scratch: Path) -> bool:
    """Whether `pgrep` still finds `pid` (zombies included, which `pid_alive` would not count)."""
    pidfile = scratch / "pid"
    pidfile.write_text(f"{pid}\n")
    return subprocess.run(["pgrep", "-F", str(pidfile)], capture_output=True).returncode == 0


@pytest.fixture
def state_file(tmp_path: Path) -> Iterator[Path]:
    """A state path; whatever devnet a failing test left running there is stopped afterwards."""
    path = tmp_path / "devnet.json"
    yield path
    if path.is_file():
        stop_detached(DevnetState.load(path))


def assert_one_line_error(result: subprocess.CompletedProcess[str], *fragments: str) -> None:
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("agentpay: error: ")
    for fragment in fragments:
        assert fragment in lines[0]


def test_up_then_down_twice(state_file: Path) -> None:
    for _ in range(2):
        up = agentpay("devnet", "up", "--state", str(state_file))
        assert up.returncode == 0, up.stderr
        state = DevnetState.from_json(up.stdout)
        assert DevnetState.load(state_file) == state
        chain_id = httpx.post(state.rpc_url, json={"jsonrpc": "2.0", "id": 1, "method": "eth_chainId"}).json()
        assert int(chain_id["result"], 16) == state.chain_id
        assert state.supervisor_pid is not None and pid_alive(state.pid)

        down = agentpay("devnet", "down", "--state", str(state_file))
        assert down.returncode == 0, down.stderr
        assert not state_file.exists()
        assert not pid_alive(state.pid) and not pid_alive(state.supervisor_pid)
        assert not pgrep(state.pid, state_file.parent)


def test_up_down_with_the_pyevm_backend(state_file: Path) -> None:
    up = agentpay("devnet", "up", "--backend", "pyevm", "--accounts", "2", "--state", str(state_file))
    assert up.returncode == 0, up.stderr
    assert "py-evm" in up.stderr  # the one-line notice
    state = DevnetState.from_json(up.stdout)
    assert state.backend == "py-evm" and len(state.accounts) == 2
    assert agentpay("devnet", "down", "--state", str(state_file)).returncode == 0
    assert not pid_alive(state.pid) and not pgrep(state.pid, state_file.parent)


def test_second_up_fails_while_one_runs(state_file: Path) -> None:
    up = agentpay("devnet", "up", "--state", str(state_file))
    assert up.returncode == 0, up.stderr
    state = DevnetState.from_json(up.stdout)

    again = agentpay("devnet", "up", "--state", str(state_file))

    assert_one_line_error(again, "already running", state.rpc_url)
    assert DevnetState.load(state_file) == state  # the running devnet's state is left alone
    assert agentpay("devnet", "down", "--state", str(state_file)).returncode == 0


def test_python_dash_m_gateway_runs_the_same_cli() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "gateway", "devnet", "--help"], capture_output=True, text=True
    )
    assert result.returncode == 0
    assert "up" in result.stdout and "down" in result.stdout


def test_unknown_flag() -> None:
    assert_one_line_error(agentpay("devnet", "up", "--no-such-flag"), "--no-such-flag")


def test_unreadable_state_file(tmp_path: Path) -> None:
    for action in ("up", "down"):
        assert_one_line_error(agentpay("devnet", action, "--state", str(tmp_path)), "cannot read")


def test_corrupt_state_file(tmp_path: Path) -> None:
    path = tmp_path / "devnet.json"
    path.write_text("{ this is not json")
    for action in ("up", "down"):
        assert_one_line_error(agentpay("devnet", action, "--state", str(path)), str(path))


def test_down_without_a_devnet(tmp_path: Path) -> None:
    assert_one_line_error(
        agentpay("devnet", "down", "--state", str(tmp_path / "none.json")), "no devnet state"
    )


def test_port_in_use(state_file: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = agentpay("devnet", "up", "--state", str(state_file), "--port", str(port))
    assert_one_line_error(result, f"port {port}")
    assert not state_file.exists()


# -- agentpay settlements --purge


@pytest.fixture(params=["sqlite", "postgres", "postgres+redis"])
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    from tests.test_store import isolated_url

    with isolated_url(request.param, tmp_path) as url:
        yield url


def _fill(url: str) -> None:
    """Three served payments: one past its validity, one still valid, one dead letter; all settled or dead."""
    from tests.test_store import item, run

    async def body(store: PaymentStore) -> None:
        now = time.time()
        for key, until in (("old", now - 60), ("valid", now + 3600), ("lost", now - 60)):
            holder = await store.claim(key, ttl=30)
            settlement = item(key, expires_at=until)
            await store.complete(key, holder, receipt=b"r", settlement=settlement, keep_until=until)
        await store.lease("escrow", limit=10, lease_seconds=30)
        await store.mark_settled(["old", "valid"], tx_hash="0xt")
        await store.mark_failed("lost", error="escrow_nonce_reused: lost", retry_at=None)

    run(url, body)


def test_settlements_purge_reports_what_it_removed(store_url: str) -> None:
    _fill(store_url)
    kept = agentpay("settlements", "--store", store_url, "--purge")  # the default retention is a week
    assert kept.returncode == 0, kept.stderr
    assert json.loads(kept.stdout)["purged"] == {
        "claims": 0,
        "receipts": 0,
        "settlements": 0,
        "retention_seconds": 7 * 86400.0,
    }

    purge = agentpay("settlements", "--store", store_url, "--purge", "--retention", "0")
    assert purge.returncode == 0, purge.stderr
    report = json.loads(purge.stdout)
    # "old" and the dead letter's claims (with receipts) are past their validity; only "old" settled.
    assert report["purged"] == {"claims": 2, "receipts": 2, "settlements": 1, "retention_seconds": 0.0}
    assert report["stats"] == {"queued": 0, "leased": 0, "settled": 1, "failed": 0, "dead": 1}
    assert [d["key"] for d in report["dead_letters"]] == ["lost"]  # dead letters are never purged
    assert purge.stderr.strip() == (
        "purged 2 claim(s), 2 receipt(s) and 1 settled row(s) past 0 s of retention and their payments'"
        " validity"
    )

    again = agentpay("settlements", "--store", store_url, "--purge", "--retention", "0")
    assert json.loads(again.stdout)["purged"]["settlements"] == 0
    plain = agentpay("settlements", "--store", store_url)
    assert plain.returncode == 0 and "purged" not in json.loads(plain.stdout) and plain.stderr == ""


def test_settlements_purge_refuses_a_bad_retention(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'store.db'}"
    for bad in ("-1", "soon", "inf"):
        assert_one_line_error(agentpay("settlements", "--store", url, "--purge", "--retention", bad), bad)
