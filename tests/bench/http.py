"""Paid requests over real HTTP: our example sub-agent beside the official x402 middleware, same HTTP stack.

    python -m tests.bench.http [--calls 1000] [--e2e-calls 600] [--chain-calls 200] [--concurrency 16]
                               [--repeat 3]

Both servers run under uvicorn, one worker, uvloop + httptools, on loopback sockets this process bound:
ours is `examples.subagent.build_app` (`tests/bench/_http_server.py`), theirs the official
`PaymentMiddlewareASGI` of x402 2.25 (`tests/peers/bench_http.py serve`, in .venv-peers). One anvil devnet
serves both. Figures:

- server side (``*_sqlite``, ``*_memory``, ``*_official``): the same official client process
  (`tests/peers/bench_http.py drive --mode presigned`) sends payments it signed before the clock started, so
  the server's cost is what is measured. Ours with the default SQLite store (a fresh file,
  `synchronous=full`) and with `memory://`; both sides with a stub settler that recovers and checks the
  EIP-3009 signature and sends nothing. ``server_cpu_ms_*`` is the server process's CPU time (user + system,
  every thread, from /proc/<pid>/stat) over the timed requests, per paid request: the client can saturate a
  core, so req/s alone says little. ``cpu_ratio_sqlite`` = ours (SQLite) / official.
- end to end (``e2e_*``): each side's own client pays its own server (ours `PaymentAuth`, default settings,
  over `escrow.KeepAliveTransport`, in this process; theirs `x402AsyncTransport` over httpx's transport),
  stub settlers; ``e2e_ratio`` = ours / official req/s.
  ``client_cpu_ms_e2e*`` is each client process's CPU per paid call, ``e2e_cpu_ms_*`` client + server, and
  ``e2e_cpu_ratio`` = ours / official of that (the less load-sensitive end-to-end figure). Both clients
  share one pool of ``concurrency`` keep-alive connections, after the same 20 untimed warm-up calls.
- real settlement (``chain_*``): payments signed beforehand, each settled on anvil before its response
  (ours: `ExactEvm`, simulation + `transferWithAuthorization` + receipt; theirs: `x402Facilitator` +
  `FacilitatorWeb3Signer`); ``chain_rps_ratio`` = ours / official req/s, ``chain_cpu_ratio`` = ours /
  official server CPU per settled request.

The stub runs (server side and end to end) take ``--repeat`` rounds, each round in another order, against
the same servers, and report each figure's median: one server's CPU per request swings by half between
runs on a shared machine. Request counts are bounded by the flags; the last line of output is one JSON
object.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx

from escrow import Devnet, DevnetState, KeepAliveTransport
from tests.peers._harness import REPO, PeerServer, run_peer
from x402 import LocalSigner
from x402.client import Eip3009Wallet, PaymentAuth

OFFICIAL_PAYER, OFFICIAL_FACILITATOR, OUR_PAYER = 4, 5, 6


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of process `pid` so far, all its threads."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def ours(state_file: Path, store: str, settle: str) -> PeerServer:
    return PeerServer(
        "tests/bench/_http_server.py",
        "--devnet",
        str(state_file),
        "--store",
        store,
        "--settle",
        settle,
        python=sys.executable,
        module="tests.bench._http_server",
        cwd=REPO,
        env={"PYTHONPATH": str(REPO)},
    )


def official(state: DevnetState, settle: str) -> PeerServer:
    return PeerServer(
        "bench_http.py",
        "serve",
        "--settle",
        settle,
        "--rpc-url",
        state.rpc_url,
        "--chain-id",
        str(state.chain_id),
        "--asset",
        state.contracts["usdc"],
        "--pay-to",
        state.accounts[2].address,
        "--amount",
        "1000",
        env={"PEER_FACILITATOR_KEY": state.accounts[OFFICIAL_FACILITATOR].private_key},
    )


def official_client(state: DevnetState, server: PeerServer, url: str, n: int, mode: str, c: int) -> Any:
    assert server.proc is not None
    return run_peer(
        "bench_http.py",
        "drive",
        "--url",
        url,
        "--mode",
        mode,
        "--n",
        str(n),
        "--concurrency",
        str(c),
        "--server-pid",
        str(server.proc.pid),
        env={"PEER_PRIVATE_KEY": state.accounts[OFFICIAL_PAYER].private_key},
        timeout=900,
    )


async def our_client(state: DevnetState, server: PeerServer, n: int, c: int) -> dict[str, Any]:
    """Our `PaymentAuth` (defaults: it pays up front once it has seen the route priced) over our transport."""
    assert server.proc is not None
    usdc = state.contracts["usdc"]
    wallet = Eip3009Wallet(
        LocalSigner(state.accounts[OUR_PAYER].private_key),
        state.chain_id,
        {usdc: (state.usdc_name, state.usdc_version)},
    )
    transport = KeepAliveTransport(max_connections=c, max_idle=c)
    latencies: list[float] = []
    statuses: dict[int, int] = {}
    async with httpx.AsyncClient(auth=PaymentAuth(wallet), transport=transport, timeout=120) as http:
        url = f"{server.url}/hello"
        for _ in range(20):
            await http.get(url)
        remaining = list(range(n))

        async def worker() -> None:
            while remaining:
                remaining.pop()
                began = time.perf_counter()
                response = await http.get(url)
                latencies.append(time.perf_counter() - began)
                statuses[response.status_code] = statuses.get(response.status_code, 0) + 1

        cpu_before = cpu_seconds(server.proc.pid)
        client_before = time.process_time()  # this process runs nothing else meanwhile: the client's cost
        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(c)))
        seconds = time.perf_counter() - start
        client_cpu = time.process_time() - client_before
        cpu_after = cpu_seconds(server.proc.pid)
    latencies.sort()
    paid = statuses.get(200, 0)
    return {
        "req_per_s": round(paid / seconds, 2),
        "p50_ms": round(latencies[len(latencies) // 2] * 1000, 3),
        "p99_ms": round(latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))] * 1000, 3),
        "server_cpu_ms": round((cpu_after - cpu_before) * 1000 / max(paid, 1), 3),
        "client_cpu_ms": round(client_cpu * 1000 / max(paid, 1), 3),
        "statuses": {str(k): v for k, v in sorted(statuses.items())},
    }


def median_of(samples: list[dict[str, Any]]) -> dict[str, Any]:
    """One side's figures over the rounds: the median of each, every round's statuses added up."""
    out = dict(samples[-1])
    for key in ("req_per_s", "p50_ms", "p99_ms", "server_cpu_ms", "client_cpu_ms"):
        if key in out:
            out[key] = round(statistics.median(float(sample[key]) for sample in samples), 3)
    statuses: dict[str, int] = {}
    for sample in samples:
        for status, count in sample["statuses"].items():
            statuses[status] = statuses.get(status, 0) + count
    out["statuses"], out["rounds"] = statuses, len(samples)
    return out


def run(args: argparse.Namespace) -> dict[str, Any]:
    runs: dict[str, Any] = {}
    c = args.concurrency
    with Devnet() as state, tempfile.TemporaryDirectory() as tmp:
        state_file = Path(tmp) / "devnet.json"
        state.dump(state_file)

        def sqlite(name: str) -> str:
            return f"sqlite:///{tmp}/{name}.db"

        def drive(label: str, server: PeerServer, path: str, n: int, mode: str = "presigned") -> None:
            runs[label] = official_client(state, server, f"{server.url}{path}", n, mode, c)

        with contextlib.ExitStack() as servers:
            ours_sqlite = servers.enter_context(ours(state_file, sqlite("stub"), "stub"))
            ours_memory = servers.enter_context(ours(state_file, "memory://", "stub"))
            theirs = servers.enter_context(official(state, "stub"))
            ours_e2e = servers.enter_context(ours(state_file, sqlite("e2e"), "stub"))

            def presigned(server: PeerServer, path: str) -> Callable[[], Any]:
                return lambda: official_client(
                    state, server, f"{server.url}{path}", args.calls, "presigned", c
                )

            jobs: list[tuple[str, Callable[[], Any]]] = [
                ("sqlite", presigned(ours_sqlite, "/hello")),
                ("memory", presigned(ours_memory, "/hello")),
                ("official", presigned(theirs, "/paid")),
                (
                    "official_e2e",
                    lambda: official_client(state, theirs, f"{theirs.url}/paid", args.e2e_calls, "e2e", c),
                ),
                ("e2e", lambda: asyncio.run(our_client(state, ours_e2e, args.e2e_calls, c))),
            ]
            samples: dict[str, list[dict[str, Any]]] = {label: [] for label, _ in jobs}
            for round_ in range(args.repeat):  # each round in another order: no side always runs first
                start = round_ % len(jobs)
                for label, job in jobs[start:] + jobs[:start]:
                    samples[label].append(job())
            runs.update({label: median_of(taken) for label, taken in samples.items()})
        if args.chain_calls:
            with ours(state_file, sqlite("chain"), "chain") as server:
                drive("chain", server, "/hello", args.chain_calls)
            with official(state, "chain") as server:
                drive("official_chain", server, "/paid", args.chain_calls)
    for label, figures in runs.items():
        print(f"{label:>15}: {json.dumps(figures)}", file=sys.stderr)
    names = {
        "req_per_s": "rps",
        "p50_ms": "p50_ms",
        "p99_ms": "p99_ms",
        "server_cpu_ms": "server_cpu_ms",
        "client_cpu_ms": "client_cpu_ms",
    }
    summary: dict[str, Any] = {
        f"{name}_{label}": figures[key]
        for label, figures in runs.items()
        for key, name in names.items()
        if key in figures
    }

    def ratio(ours: str, theirs: str, key: str) -> float:
        return round(float(runs[ours][key]) / float(runs[theirs][key]), 3)

    summary["cpu_ratio_sqlite"] = ratio("sqlite", "official", "server_cpu_ms")
    summary["cpu_ratio_memory"] = ratio("memory", "official", "server_cpu_ms")
    summary["e2e_ratio"] = ratio("e2e", "official_e2e", "req_per_s")
    # CPU per paid call, client + server: the end-to-end figure the machine's load barely moves.
    for label, side in (("e2e", "ours"), ("official_e2e", "official")):
        summary[f"e2e_cpu_ms_{side}"] = round(runs[label]["client_cpu_ms"] + runs[label]["server_cpu_ms"], 3)
    summary["e2e_cpu_ratio"] = round(summary["e2e_cpu_ms_ours"] / summary["e2e_cpu_ms_official"], 3)
    if "chain" in runs:
        summary["chain_rps_ratio"] = ratio("chain", "official_chain", "req_per_s")
        # Server CPU per settled request, ours / official: steadier than req/s on a loaded machine.
        summary["chain_cpu_ratio"] = ratio("chain", "official_chain", "server_cpu_ms")
    summary["statuses"] = {label: figures["statuses"] for label, figures in runs.items()}
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--calls", type=int, default=1000, help="server-side runs (presigned), per server")
    parser.add_argument("--e2e-calls", type=int, default=600, help="end-to-end runs, per side")
    parser.add_argument("--chain-calls", type=int, default=200, help="real settlement, per side; 0: skip")
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--repeat", type=int, default=3, help="rounds of the stub runs; medians reported")
    print(json.dumps(run(parser.parse_args())))


if __name__ == "__main__":
    main()
