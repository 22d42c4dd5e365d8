"""A devnet that outlives the command that started it (`agentpay devnet up` / `down`).

`start_detached` launches a small supervisor, `python -m escrow.devnet._daemon`, in its own session. The
supervisor starts the node as its child, deploys, prints the `DevnetState` as one JSON line, then waits.
SIGTERM makes it stop the node, reap it and exit. Why a supervisor instead of detaching the node itself: an
orphaned node, once killed, stays a zombie wherever PID 1 does not reap orphans (as in some containers), and
`pgrep anvil` keeps finding it; with the supervisor as its parent, the node always leaves cleanly. A devnet
of several chains (`chains=`) has one supervisor for all its nodes; if one node dies, it stops the others.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import FrameType

import httpx
import msgspec

from ..chain._artifacts import EscrowError
from ._devnet import DevnetState
from ._devnets import Devnets
from ._networks import parse_chains
from ._node import DevnetError, pid_alive, port_free, resolve_backend

__all__ = ["devnet_running", "start_detached", "stop_detached"]


def start_detached(
    *,
    log_path: str | Path,
    backend: str | None = None,
    port: int | None = None,
    accounts: int = 10,
    bundler: bool = False,
    chains: int | str = 1,
) -> DevnetState:
    """Start a devnet that keeps running after this process exits; its output goes to `log_path`.
    `chains` is what `parse_chains` takes (`2`, `"base,arbitrum"`); with `port`, chain i uses `port + i`."""
    specs = parse_chains(chains)  # bad input fails here, in the caller, not in the supervisor
    chosen, _ = resolve_backend(backend)
    for taken in [] if port is None else [p for p in range(port, port + len(specs)) if not port_free(p)]:
        raise DevnetError(f"port {taken} is already in use", code="devnet_port_in_use")
    log = Path(log_path)
    log.parent.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-m", "escrow.devnet._daemon", "--log", str(log), "--backend", chosen]
    command += ["--accounts", str(accounts)] + (["--port", str(port)] if port is not None else [])
    command += ["--bundler"] if bundler else []
    command += ["--chains", ",".join(s.like.name if s.like else f"eip155:{s.chain_id}" for s in specs)]
    with open(log, "wb") as stderr:  # truncated here; the supervisor and the node append to it
        supervisor = subprocess.Popen(
            command, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=stderr, start_new_session=True
        )
    assert supervisor.stdout is not None
    with supervisor.stdout:
        line = supervisor.stdout.readline()
    if not line:
        supervisor.wait()
        tail = log.read_text(errors="replace").strip().splitlines()
        raise DevnetError(
            f"the devnet supervisor exited: {tail[-1] if tail else supervisor.returncode} (log: {log})",
            code="devnet_node_exited",
        )
    reply = json.loads(line)
    if "error" in reply:
        supervisor.wait()
        raise DevnetError(reply["error"], code=reply.get("code"))
    # The supervisor is meant to outlive us: mark it handled so Popen does not warn about a live child.
    supervisor.returncode = 0
    return DevnetState.from_json(line)


def _cmdline(pid: int) -> str | None:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return None  # no procfs: trust the state file


def _ours(pid: int | None, marker: str) -> bool:
    """A live process that is still the one the state file names (PIDs get reused after a reboot)."""
    if not pid or not pid_alive(pid):
        return False
    cmdline = _cmdline(pid)
    return cmdline is None or marker in cmdline


def _node_markers(state: DevnetState) -> list[tuple[int, str]]:
    """Every chain's node and how to recognise it (the first chain's is the top-level `pid`)."""
    return [(chain.pid, _node_marker_of(chain.rpc_url)) for chain in state.chains]


def _node_marker_of(rpc_url: str) -> str:
    return "--port " + rpc_url.rsplit(":", 1)[1]


def devnet_running(state: DevnetState) -> bool:
    """Every node named by `state` (one per chain) is alive and answers JSON-RPC."""
    body = {"jsonrpc": "2.0", "id": 1, "method": "eth_chainId", "params": []}
    for chain in state.chains:
        if not _ours(chain.pid, _node_marker_of(chain.rpc_url)):
            return False
        try:
            if httpx.post(chain.rpc_url, json=body, timeout=2.0).status_code != 200:
                return False
        except httpx.HTTPError:
            return False
    return True


def stop_detached(state: DevnetState, timeout: float = 10.0) -> bool:
    """Stop the devnet named by `state` and wait until its processes are gone. False if none was running."""
    live = [
        pid
        for pid, marker in (
            (state.supervisor_pid, "escrow.devnet._daemon"),
            *_node_markers(state),
            (state.bundler_pid, "alto"),
        )
        if pid is not None and _ours(pid, marker)
    ]
    if not live:
        return False
    supervisor_alive = state.supervisor_pid is not None and live[0] == state.supervisor_pid
    for pid in live[:1] if supervisor_alive else live:  # the supervisor stops and reaps node and bundler
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while any(pid_alive(pid) for pid in live):
        if time.monotonic() > deadline:
            for pid in live:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            deadline = time.monotonic() + timeout
        time.sleep(0.01)
    return True


def _report(payload: bytes) -> None:
    os.write(1, payload + b"\n")
    # Nothing more goes to the launcher's pipe: it may be gone already.
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 1)
    os.close(devnull)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m escrow.devnet._daemon")
    parser.add_argument("--log", required=True)
    parser.add_argument("--backend")
    parser.add_argument("--port", type=int)
    parser.add_argument("--accounts", type=int, default=10)
    parser.add_argument("--bundler", action="store_true")
    parser.add_argument("--chains", default="1")
    args = parser.parse_args(argv)
    stopping = False
    with open(args.log, "a+b") as log:
        devnet = Devnets(
            args.chains,
            backend=args.backend,
            port=args.port,
            accounts=args.accounts,
            log=log,
            bundler=args.bundler,
        )

        def on_signal(signum: int, frame: FrameType | None) -> None:
            nonlocal stopping
            stopping = True
            if devnet.bundler is not None:
                devnet.bundler.proc.terminate()
            for node in devnet.nodes:
                node.proc.terminate()

        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(sig, on_signal)
        try:
            state = devnet.start()
            if stopping:
                raise DevnetError("stopped while starting", code="devnet_interrupted")
        except EscrowError as exc:
            devnet.stop()
            _report(json.dumps({"error": str(exc), "code": exc.code}).encode())
            return 1
        nodes = devnet.nodes
        state = msgspec.structs.replace(
            state, supervisor_pid=os.getpid(), log_file=str(Path(args.log).resolve())
        )
        _report(msgspec.json.encode(state))
        # Until on_signal terminates them, or one dies on its own (then the devnet is broken: stop it all).
        while not stopping and all(node.proc.poll() is None for node in nodes):
            time.sleep(0.1)
        devnet.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
