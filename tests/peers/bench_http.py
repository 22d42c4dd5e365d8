"""Peer half of `python -m tests.bench.http` (.venv-peers): the official server, and the official client.

* ``serve``: the official ``PaymentMiddlewareASGI`` app of ``x402_server.build_app`` under uvicorn with
  uvloop + httptools on an inherited socket (``--fd``); ``--settle stub`` uses the verifying stub
  facilitator of ``bench_official`` (signer recovered, nothing sent), ``--settle chain`` the official
  ``x402Facilitator`` + ``FacilitatorWeb3Signer`` on the devnet.
* ``drive``: the official client against any paid URL over loopback, ``concurrency`` tasks sharing ``n``
  requests, after ``warmup`` untimed ones. ``--mode presigned``: it answers one real 402 with ``n`` payments
  signed before the clock starts (``x402Client.create_payment_payload``), so the timed requests measure the
  server; ``--mode e2e``: ``x402AsyncTransport`` pays each request itself (402, sign, paid retry).
  ``--server-pid``: the server's CPU time (``/proc/<pid>/stat``, all threads) is read right before and
  after the timed requests; in ``e2e`` mode the client's own CPU time per paid call too (``client_cpu_ms``).

Output (last line, JSON): ``{"req_per_s", "p50_ms", "p99_ms", "server_cpu_ms", "statuses", ...}``.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import time
from typing import Any

import httpx
from _peer import add_server_args, emit, token_domain
from bench_official import VerifyingStubFacilitator
from eth_account import Account
from x402.http.clients.httpx import x402AsyncTransport
from x402.http.utils import decode_payment_required_header, encode_payment_signature_header
from x402.mechanisms.evm.exact import ExactEvmScheme
from x402_server import build_app, make_facilitator

from x402 import x402Client


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of process ``pid`` so far, all its threads."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def serve(args: argparse.Namespace) -> None:
    import uvicorn

    network = f"eip155:{args.chain_id}"
    name, version = token_domain(args.rpc_url, args.asset)
    facilitator = (
        VerifyingStubFacilitator(network, args.chain_id)
        if args.settle == "stub"
        else make_facilitator("chain", network, args.rpc_url, args.facilitator_key)
    )
    app, _ = build_app(
        facilitator=facilitator,
        network=network,
        asset=args.asset,
        pay_to=args.pay_to,
        amount=args.amount,
        name=name,
        version=version,
        record=False,
    )
    config = uvicorn.Config(
        app,
        loop="uvloop",
        http="httptools",
        log_level="warning",
        access_log=False,
        lifespan="off",
    )
    # the inherited socket as itself (uvicorn's `fd=` assumes UNIX: on TCP, Nagle stays on)
    uvicorn.Server(config).run(sockets=[socket.socket(fileno=args.fd)])


async def drive(args: argparse.Namespace) -> dict[str, Any]:
    payer = Account.from_key(args.payer_key)
    latencies: list[float] = []
    statuses: dict[int, int] = {}
    limits = httpx.Limits(max_connections=args.concurrency, max_keepalive_connections=args.concurrency)
    async with httpx.AsyncClient(timeout=120, limits=limits) as plain:
        required = decode_payment_required_header((await plain.get(args.url)).headers["PAYMENT-REQUIRED"])
    network = required.accepts[0].network
    client = x402Client()
    client.register(network, ExactEvmScheme(signer=payer))
    assets = [{"network": r.network, "asset": r.asset} for r in required.accepts]
    client.set_spend_controls({"allowed_assets": assets})  # type: ignore[typeddict-item]

    if args.mode == "presigned":
        headers = []
        for _ in range(args.n + args.warmup):
            payment = await client.create_payment_payload(required)
            headers.append({"PAYMENT-SIGNATURE": encode_payment_signature_header(payment)})
        http = httpx.AsyncClient(timeout=120, limits=limits)
    else:
        headers = [{} for _ in range(args.n + args.warmup)]
        transport = x402AsyncTransport(client, transport=httpx.AsyncHTTPTransport(limits=limits))
        http = httpx.AsyncClient(transport=transport, timeout=120)

    async with http:
        for i in range(args.warmup):
            await http.get(args.url, headers=headers[args.n + i])
        queue: asyncio.Queue[int] = asyncio.Queue()
        for i in range(args.n):
            queue.put_nowait(i)

        async def worker() -> None:
            while not queue.empty():
                i = queue.get_nowait()
                began = time.perf_counter()
                response = await http.get(args.url, headers=headers[i])
                latencies.append(time.perf_counter() - began)
                statuses[response.status_code] = statuses.get(response.status_code, 0) + 1

        cpu_before = cpu_seconds(args.server_pid) if args.server_pid else None
        client_before = time.process_time()
        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(args.concurrency)))
        seconds = time.perf_counter() - start
        client_cpu = time.process_time() - client_before
        cpu_after = cpu_seconds(args.server_pid) if args.server_pid else None

    latencies.sort()
    paid = statuses.get(200, 0)
    result: dict[str, Any] = {
        "client": "x402-official-2.25.0",
        "mode": args.mode,
        "n": args.n,
        "concurrency": args.concurrency,
        "seconds": round(seconds, 4),
        "req_per_s": round(paid / seconds, 2),
        "p50_ms": round(latencies[len(latencies) // 2] * 1000, 3),
        "p99_ms": round(latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))] * 1000, 3),
        "statuses": {str(k): v for k, v in sorted(statuses.items())},
    }
    if args.mode == "e2e":  # this process's CPU per paid call: the client's own cost
        result["client_cpu_ms"] = round(client_cpu * 1000 / max(paid, 1), 3)
    if cpu_before is not None and cpu_after is not None:
        result["server_cpu_ms"] = round((cpu_after - cpu_before) * 1000 / max(paid, 1), 3)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    server = commands.add_parser("serve")
    add_server_args(server)
    server.add_argument("--settle", choices=["stub", "chain"], default="stub")
    server.add_argument("--rpc-url", required=True)
    server.add_argument("--chain-id", type=int, default=31337)
    server.add_argument("--asset", required=True)
    server.add_argument("--pay-to", required=True)
    server.add_argument("--amount", default="1000")
    server.add_argument("--facilitator-key", default=os.environ.get("PEER_FACILITATOR_KEY"))
    driver = commands.add_parser("drive")
    driver.add_argument("--url", required=True)
    driver.add_argument("--mode", choices=["presigned", "e2e"], default="presigned")
    driver.add_argument("--n", type=int, default=1000)
    driver.add_argument("--concurrency", type=int, default=16)
    driver.add_argument("--warmup", type=int, default=20)
    driver.add_argument("--server-pid", type=int, default=0)
    driver.add_argument("--payer-key", default=os.environ.get("PEER_PRIVATE_KEY"))
    args = parser.parse_args()
    if args.command == "serve":
        serve(args)
    else:
        emit(asyncio.run(drive(args)))


if __name__ == "__main__":
    main()
