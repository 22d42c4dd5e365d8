"""Starting and stopping the devnet's node process: anvil when it is installed, else the py-evm node.

The node always runs as a separate process answering JSON-RPC on a loopback port, so everything downstream
talks to an `rpc_url` the same way whichever backend runs.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO, Literal

import httpx

from ..chain._artifacts import EscrowError

__all__ = [
    "Backend",
    "DevnetError",
    "NodeProcess",
    "find_anvil",
    "pid_alive",
    "resolve_backend",
    "start_node",
]

Backend = Literal["anvil", "py-evm"]

ANVIL_MNEMONIC = "test test test test test test test test test test test junk"
CHAIN_ID = 31337
_POLL = 0.005  # the node answers within ~0.2 s (anvil) or ~1 s (py-evm); a tight poll keeps start-up short


class DevnetError(EscrowError):
    code = "devnet_error"


def find_anvil() -> str | None:
    """$AGENTPAY_ANVIL, else node_modules/@foundry-rs/anvil-<platform>/bin/anvil above the package or the
    working directory, else `anvil` on PATH. Never the npm wrapper: killing it leaves anvil running."""
    explicit = os.environ.get("AGENTPAY_ANVIL")
    if explicit:
        if not os.access(explicit, os.X_OK):
            raise DevnetError(f"AGENTPAY_ANVIL={explicit} is not an executable", code="devnet_no_anvil")
        return explicit
    roots = [Path(__file__).resolve().parent, Path.cwd().resolve()]
    for root in roots:
        for folder in (root, *root.parents):
            found = sorted((folder / "node_modules" / "@foundry-rs").glob("anvil-*/bin/anvil"))
            if found:
                return str(found[0])
    return shutil.which("anvil")


def resolve_backend(requested: str | None = None, *, announce: bool = True) -> tuple[Backend, str | None]:
    """Pick the backend: `requested`, else $AGENTPAY_DEVNET_BACKEND, else anvil if found, else py-evm.
    Returns the backend and, for anvil, its binary. Announces the py-evm fallback on stderr."""
    env = os.environ.get("AGENTPAY_DEVNET_BACKEND")
    choice = (requested or env or "auto").lower().replace("-", "")
    if choice not in ("auto", "anvil", "pyevm"):
        raise DevnetError(
            f"unknown devnet backend {choice!r} (use anvil, pyevm or auto)", code="devnet_backend"
        )
    anvil = find_anvil() if choice != "pyevm" else None
    if anvil is not None:
        return "anvil", anvil
    if choice == "anvil":
        raise DevnetError("anvil not found: run `npm ci` or set AGENTPAY_ANVIL", code="devnet_no_anvil")
    if announce:
        why = "requested" if requested else f"AGENTPAY_DEVNET_BACKEND={env}" if env else "anvil not found"
        print(f"agentpay: using the py-evm devnet (slower than anvil): {why}", file=sys.stderr)
    return "py-evm", None


def port_free(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def pid_alive(pid: int) -> bool:
    """Whether `pid` runs. A zombie counts as gone: nothing reaps orphans where PID 1 is no real init."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True  # no procfs (macOS): signal 0 is all we have
    return stat.rsplit(")", 1)[1].split()[0] not in ("Z", "X")


def _die_with_parent() -> Callable[[], None] | None:
    """On Linux, a child started from the main thread gets SIGTERM if its parent dies, so a crashed test run
    leaves no node behind. (Only from the main thread: the signal fires when the forking *thread* exits.)"""
    if not sys.platform.startswith("linux") or threading.current_thread() is not threading.main_thread():
        return None
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    pr_set_pdeathsig = 1

    def preexec() -> None:
        prctl(pr_set_pdeathsig, signal.SIGTERM)

    return preexec


class NodeProcess:
    """A running node: its process, port and URL. `stop()` terminates it and reaps it."""

    def __init__(self, backend: Backend, proc: subprocess.Popen[bytes], port: int) -> None:
        self.backend, self.proc, self.port = backend, proc, port
        self.rpc_url = f"http://127.0.0.1:{port}"

    @property
    def pid(self) -> int:
        return self.proc.pid

    def stop(self, timeout: float = 10.0) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def _command(
    backend: Backend, anvil: str | None, port: int, accounts: int, balance_eth: int, chain_id: int
) -> list[str]:
    common = ["--host", "127.0.0.1", "--port", str(port), "--accounts", str(accounts)]
    common += ["--balance", str(balance_eth), "--chain-id", str(chain_id), "--mnemonic", ANVIL_MNEMONIC]
    if backend == "anvil":
        assert anvil is not None
        return [anvil, *common]
    return [sys.executable, "-m", "escrow.devnet._pyevm_node", *common]


def _wait_ready(node: NodeProcess, errors: IO[bytes], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    body = {"jsonrpc": "2.0", "id": 1, "method": "eth_chainId", "params": []}
    with httpx.Client(timeout=1.0) as client:
        while True:
            if node.proc.poll() is not None:
                errors.flush()
                errors.seek(0)
                lines = errors.read().decode(errors="replace").strip().splitlines()
                detail = lines[-1] if lines else f"exit status {node.proc.returncode}"
                raise DevnetError(
                    f"the {node.backend} node exited at start: {detail}", code="devnet_node_exited"
                )
            with contextlib.suppress(httpx.TransportError):
                if client.post(node.rpc_url, json=body).status_code == 200:
                    return
            if time.monotonic() > deadline:
                raise DevnetError(
                    f"the {node.backend} node did not answer in {timeout:.0f} s", code="devnet_timeout"
                )
            time.sleep(_POLL)


def start_node(
    backend: Backend,
    anvil: str | None,
    *,
    port: int | None = None,
    accounts: int = 10,
    balance_eth: int = 10_000,
    log: IO[bytes] | None = None,
    chain_id: int = CHAIN_ID,
) -> NodeProcess:
    """Start the node and wait until it answers `eth_chainId`. With no `port`, pick a free one (retrying if
    another process grabs it first); with a `port`, fail at once if it is taken. `log` (opened "w+b")
    receives the node's output; without it the output is dropped."""
    if port is not None and not port_free(port):
        raise DevnetError(f"port {port} is already in use", code="devnet_port_in_use")
    attempts = 1 if port is not None else 3
    for attempt in range(attempts):
        chosen = port if port is not None else _free_port()
        # Start-up errors are read back from the log (or a scratch file): anvil reports them on stderr.
        errors = log if log is not None else tempfile.TemporaryFile()
        try:
            try:
                proc = subprocess.Popen(
                    _command(backend, anvil, chosen, accounts, balance_eth, chain_id),
                    stdin=subprocess.DEVNULL,
                    stdout=log or subprocess.DEVNULL,
                    stderr=errors,
                    preexec_fn=_die_with_parent(),
                )
            except OSError as exc:
                raise DevnetError(
                    f"cannot start the {backend} node: {exc}", code="devnet_start_failed"
                ) from None
            node = NodeProcess(backend, proc, chosen)
            try:
                _wait_ready(node, errors, timeout=15.0 if backend == "anvil" else 60.0)
            except BaseException:
                node.stop()
                raise
        except DevnetError as exc:
            if exc.code != "devnet_node_exited" or attempt == attempts - 1 or port_free(chosen):
                raise
            continue  # lost a race for the port: try another one
        finally:
            if errors is not log:
                errors.close()
        return node
    raise AssertionError("unreachable")
