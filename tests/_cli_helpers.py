"""Running the operator CLI in tests: as the installed console script (a subprocess with this checkout on
PYTHONPATH, as a user runs it) or in-process through `gateway.cli.main` (same code, no interpreter start-up),
and funding fresh keys on the devnet from a devnet account."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any, NamedTuple

import pytest
import uvicorn

from escrow import Chain, DevnetState

ROOT = Path(__file__).resolve().parents[1]
AGENTPAY = shutil.which("agentpay", path=str(Path(sys.executable).parent)) or "agentpay"
FUNDER = 9  # the devnet account that funds the tests' fresh keys (other suites use 1-4)


class Result(NamedTuple):
    code: int
    out: str
    err: str

    def json(self) -> Any:
        assert self.code == 0, self.err
        return json.loads(self.out)


def agentpay(*args: str, env: Mapping[str, str] | None = None, timeout: float = 120) -> Result:
    """The real `agentpay` console script, importing this checkout."""
    environ = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
    done = subprocess.run(
        [AGENTPAY, *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=environ,
        stdin=subprocess.DEVNULL,
    )
    return Result(done.returncode, done.stdout, done.stderr)


def cli(capsys: pytest.CaptureFixture[str], *args: str) -> Result:
    """`agentpay ARGS` in this process (argparse errors exit through SystemExit, as in the script)."""
    from gateway.cli import main

    capsys.readouterr()
    try:
        code = main(list(args))
    except SystemExit as exc:
        code = int(exc.code or 0)
    out, err = capsys.readouterr()
    return Result(code, out, err)


def assert_one_line_error(result: Result, *fragments: str) -> str:
    assert result.code != 0, result
    assert "Traceback" not in result.err
    lines = result.err.strip().splitlines()
    assert len(lines) == 1, result.err
    assert lines[0].startswith("agentpay: error: ")
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


def fund(devnet: DevnetState, address: str, *, eth: int = 0, usdc: int = 0) -> None:
    """Send `eth` wei and `usdc` atomic units to `address` from the funder account."""

    async def send() -> None:
        async with Chain.from_devnet(devnet, relayer=FUNDER) as chain:
            if eth:
                await chain.relayer.transact(address, b"", gas=21_000, value=eth)
            if usdc:
                data = chain.token.transfer_calldata(address, usdc)
                await chain.relayer.transact(chain.network.token, data, gas=100_000)

    asyncio.run(send())


def read_chain(devnet: DevnetState, reader: Any) -> Any:
    """`await reader(chain)` on a fresh, read-only Chain of the devnet."""

    async def read() -> Any:
        async with Chain.from_devnet(devnet, relayer=None) as chain:
            return await reader(chain)

    return asyncio.run(read())


class _Server(uvicorn.Server):
    def install_signal_handlers(self) -> None:  # a thread cannot take signals
        pass


@contextmanager
def serve_subagent(devnet: DevnetState) -> Iterator[str]:
    """examples.subagent taking escrow payments, settling each before it answers, under uvicorn in a
    thread; yields its base URL."""
    from examples.subagent import build_app

    chain = Chain.from_devnet(devnet, relayer=3)
    app = build_app(
        chain,
        pay_to=devnet.accounts[2].address,
        schemes=["escrow"],
        settle="before-response",
        store="memory://",
    )
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = _Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the sub-agent did not start"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        sock.close()
