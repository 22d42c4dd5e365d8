"""`make demo`: a devnet, a paid sub-agent and an orchestrator paying it, start to finish.

    python -m examples.demo [--calls 3]

1. brings a devnet up (anvil with TestUSDC, or the py-evm node when anvil is absent);
2. starts the sub-agent (`python -m examples.subagent`) on a free port, in its own process;
3. runs the orchestrator for a few paid calls, once per protocol (x402 v2, MPP, x402 v1);
4. checks that the balances moved by exactly price x calls, then stops everything (no node left behind).
"""

from __future__ import annotations

import argparse
import asyncio
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from escrow import Devnet
from x402.client import ProtocolName

from .orchestrator import run

__all__ = ["main"]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _wait_until_up(url: str, proc: subprocess.Popen[bytes], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the sub-agent exited early with status {proc.returncode}")
        try:
            if httpx.get(url + "/health", timeout=1.0).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.05)
    raise SystemExit("the sub-agent did not come up")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--calls", type=int, default=3, help="paid calls per protocol")
    args = parser.parse_args(argv)

    print("demo: starting the devnet ...", flush=True)
    with Devnet() as state, tempfile.TemporaryDirectory(prefix="agentpay-demo-") as tmp:
        state_file = Path(tmp) / "devnet.json"
        state.dump(state_file)
        print(f"demo: {state.backend} at {state.rpc_url}, TestUSDC {state.contracts['usdc']}", flush=True)
        port = _free_port()
        url = f"http://127.0.0.1:{port}"
        command = [sys.executable, "-m", "examples.subagent", "--devnet", str(state_file)]
        sub = subprocess.Popen([*command, "--port", str(port)])
        try:
            _wait_until_up(url, sub)
            total = 0
            protocols: tuple[ProtocolName, ...] = ("x402v2", "mpp", "x402v1")
            for protocol in protocols:
                print(f"\ndemo: paying with {protocol}", flush=True)
                outcome = asyncio.run(run(state, url, args.calls, prefer=(protocol,)))
                moved = outcome.payee_after - outcome.payee_before
                expected = outcome.price * outcome.calls
                if moved != expected or outcome.payer_before - outcome.payer_after != moved:
                    raise SystemExit(f"demo: FAILED, balances moved by {moved}, not {expected}")
                total += moved
            calls = 3 * args.calls
            print(f"\ndemo: OK, {calls} paid calls moved {total} atomic units ({total / 1e6:.6f} USDC)")
        finally:
            sub.terminate()
            try:
                sub.wait(10)
            except subprocess.TimeoutExpired:
                sub.kill()
                sub.wait()
    print("demo: sub-agent and devnet stopped", flush=True)


if __name__ == "__main__":
    main()
