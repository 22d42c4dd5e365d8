"""The devnet's ERC-4337 bundler: Pimlico's Alto (`@pimlico/alto`, pinned in package.json) run by Node.js.

    bundler = start_alto(rpc_url, executor_key=key, log=log)   # answers ERC-7769 JSON-RPC on bundler.url
    bundler.stop()

Alto runs against the devnet's EntryPoint v0.7 with the settings a local chain needs: no ERC-7562 tracing
(`--safe-mode false`: anvil has no `debug_traceCall` JS tracer), fast bundling (10-50 ms), up to 64 parallel
operations per sender (nonce lanes), several senders per bundle, no wallet refilling. It deploys its own
simulation contracts through the CREATE2 deployer on start-up, so it needs nothing from the network.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import time
from pathlib import Path
from typing import IO

import httpx

from ._node import DevnetError, _die_with_parent, _free_port, port_free

__all__ = ["BundlerProcess", "find_alto", "start_alto"]

ENTRYPOINT_V07 = "0x0000000071727De22E5E9d8BAf0edAc6f37da032"
_START_TIMEOUT = 90.0  # Alto loads ~400 MB of JavaScript; on 2 busy cores that can take a while


def find_alto() -> tuple[str, str]:
    """`(node, alto.js)`: $AGENTPAY_ALTO (the CLI script), else node_modules/@pimlico/alto above the package
    or the working directory; Node.js from $AGENTPAY_NODE or PATH."""
    node = os.environ.get("AGENTPAY_NODE") or shutil.which("node")
    if node is None:
        raise DevnetError("Node.js not found: the bundler needs `node` on PATH", code="devnet_no_node")
    explicit = os.environ.get("AGENTPAY_ALTO")
    if explicit:
        if not Path(explicit).is_file():
            raise DevnetError(f"AGENTPAY_ALTO={explicit} is not a file", code="devnet_no_bundler")
        return node, explicit
    for root in (Path(__file__).resolve().parent, Path.cwd().resolve()):
        for folder in (root, *root.parents):
            script = folder / "node_modules" / "@pimlico" / "alto" / "esm" / "cli" / "alto.js"
            if script.is_file():
                return node, str(script)
    raise DevnetError(
        "the Alto bundler is not installed: run `npm ci` (package.json pins @pimlico/alto)",
        code="devnet_no_bundler",
    )


class BundlerProcess:
    """A running Alto: its process and URL. `stop()` terminates it and reaps it."""

    def __init__(self, proc: subprocess.Popen[bytes], port: int) -> None:
        self.proc, self.port = proc, port
        self.url = f"http://127.0.0.1:{port}"

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


def _command(node: str, alto: str, rpc_url: str, port: int, executor_key: str) -> list[str]:
    return [
        node,
        alto,
        "--entrypoints",
        ENTRYPOINT_V07,
        "--rpc-url",
        rpc_url,
        "--port",
        str(port),
        "--executor-private-keys",
        executor_key,
        "--utility-private-key",
        executor_key,
        "--safe-mode",
        "false",
        "--deploy-simulations-contract",
        "true",
        "--utility-wallet-monitor",
        "false",
        "--refilling-wallets",
        "false",
        "--min-bundle-interval",
        "10",
        "--max-bundle-interval",
        "50",
        "--mempool-max-parallel-ops",
        "64",
        "--enforce-unique-senders-per-bundle",
        "false",
        "--log-level",
        "warn",
    ]


def _ready(url: str) -> bool:
    body = {"jsonrpc": "2.0", "id": 1, "method": "eth_supportedEntryPoints", "params": []}
    with contextlib.suppress(httpx.HTTPError, ValueError):
        reply = httpx.post(url, json=body, timeout=1.0).json()
        return isinstance(reply, dict) and ENTRYPOINT_V07 in (reply.get("result") or [])
    return False


def start_alto(
    rpc_url: str, *, executor_key: str, port: int | None = None, log: IO[bytes] | None = None
) -> BundlerProcess:
    """Start Alto against the node at `rpc_url` and wait until it serves the EntryPoint. `executor_key` signs
    and pays for the bundles (fund it first); `log` gets Alto's output."""
    node, alto = find_alto()
    if port is not None and not port_free(port):
        raise DevnetError(f"bundler port {port} is already in use", code="devnet_port_in_use")
    chosen = port if port is not None else _free_port()
    try:
        proc = subprocess.Popen(
            _command(node, alto, rpc_url, chosen, executor_key),
            stdin=subprocess.DEVNULL,
            stdout=log or subprocess.DEVNULL,
            stderr=log or subprocess.DEVNULL,
            preexec_fn=_die_with_parent(),
        )
    except OSError as exc:
        raise DevnetError(f"cannot start the Alto bundler: {exc}", code="devnet_start_failed") from None
    bundler = BundlerProcess(proc, chosen)
    deadline = time.monotonic() + _START_TIMEOUT
    try:
        while not _ready(bundler.url):
            if proc.poll() is not None:
                raise DevnetError(
                    f"the Alto bundler exited at start (status {proc.returncode}); see the devnet log",
                    code="devnet_bundler_exited",
                )
            if time.monotonic() > deadline:
                raise DevnetError(
                    f"the Alto bundler did not answer in {_START_TIMEOUT:.0f} s", code="devnet_timeout"
                )
            time.sleep(0.1)
    except BaseException:
        bundler.stop()
        raise
    return bundler
