"""Helpers for the multi-process suites (replicas, crash recovery, RPC outage): real gateway processes
(`python -m examples.subagent` under uvicorn), real stores, the session's anvil, and a TCP proxy to cut.

Every gateway serves on a listening socket this process binds and hands over (`--fd`), so its port is known
before it starts and stays the same across a kill and a restart (connections wait in the backlog meanwhile).
Each runs in its own process group; `Gateways.close()` (called by the fixtures' teardown, failures included)
ends every group still running.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, NamedTuple

import httpx
from eth_abi.abi import encode as abi_encode
from eth_utils.crypto import keccak

from escrow import DevnetState
from escrow.chain._rpc import Rpc, TxSender
from escrow.payments._exact import AUTHORIZATION_USED_TOPIC, authorization_state_calldata
from gateway._store import PaymentStore, QueueStats
from gateway._stores import open_store
from tests.conftest import unavailable
from x402 import LocalSigner, decode_payment_required, decode_payment_signature
from x402.client import Eip3009Wallet, offers_from_response, payment_headers

ROOT = Path(__file__).resolve().parents[1]
PRICE = 1000  # GET /hello: $0.001 of a 6-decimal token
FAST = {  # settlement tuning for tests: short claims and leases, so recovery is quick to watch
    "claim-ttl": 3,
    "lease-seconds": 3,
    "max-age": 0.2,
    "retry-cap": 2,
    "recover-every": 0.5,
}


class StoreUnderTest(NamedTuple):
    backend: str  # sqlite, postgres, postgres+redis (as tests.test_store names them)
    url: str


@contextmanager
def store_under_test(backend: str, tmp_path: Path) -> Iterator[StoreUnderTest]:
    """A fresh store of `backend` for one test (own schema / key prefix / file), removed afterwards.

    Sync on purpose: `tests.test_store.isolated_url` runs its own event loop, so it belongs in a fixture.
    """
    from tests.test_store import isolated_url

    with isolated_url(backend, tmp_path) as url:
        yield StoreUnderTest(backend, url)


def key_hex(signer: LocalSigner) -> str:
    return "0x" + signer._key.secret.hex()


class Gateway:
    """One sub-agent process; `start()` again after it died restarts it on the same port."""

    def __init__(self, devnet_file: Path, args: Sequence[str]) -> None:
        self.devnet_file = devnet_file
        self.args = list(args)
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(512)
        self.sock.set_inheritable(True)
        self.port = self.sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = tempfile.TemporaryFile()

    def start(self, *, fault: str | None = None, timeout: float = 60.0) -> Gateway:
        assert self.proc is None or self.proc.poll() is not None, "already running"
        env = {k: v for k, v in os.environ.items() if k != "AGENTPAY_FAULT"}
        if fault:
            env["AGENTPAY_FAULT"] = fault
        fd = self.sock.fileno()
        command = [sys.executable, "-m", "examples.subagent", "--devnet", str(self.devnet_file)]
        self.proc = subprocess.Popen(
            [*command, "--fd", str(fd), *self.args],
            cwd=ROOT,
            env=env,
            pass_fds=(fd,),
            stdout=subprocess.DEVNULL,
            stderr=self.log,
            start_new_session=True,  # its own process group: stopped as a whole
        )
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise AssertionError(f"gateway exited {self.proc.returncode} at start:\n{self.output()}")
            try:
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise AssertionError(f"gateway did not answer /health:\n{self.output()}")
            time.sleep(0.05)

    def wait_exit(self, timeout: float = 30.0) -> int:
        assert self.proc is not None
        return self.proc.wait(timeout=timeout)

    def output(self) -> str:
        self.log.seek(0)
        return self.log.read().decode("utf-8", "replace")[-6000:]

    def stop(self) -> None:
        proc = self.proc
        if proc is None or proc.poll() is not None:
            return
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        except ProcessLookupError:
            proc.wait()

    def close(self) -> None:
        self.stop()
        self.sock.close()
        self.log.close()


class Gateways:
    """Everything a test started: stopped by `close()` whatever happened."""

    def __init__(self, devnet: DevnetState, workdir: Path) -> None:
        self.devnet = devnet
        self.devnet_file = workdir / "devnet.json"
        devnet.dump(self.devnet_file)
        self.started: list[Gateway] = []

    def new(
        self,
        *,
        store: str,
        settle: str,
        payee: str,
        relayer_key: str,
        tuning: Mapping[str, float] = FAST,
        extra: Sequence[str] = (),
    ) -> Gateway:
        args = ["--store", store, "--settle", settle, "--payee", payee, "--relayer", relayer_key]
        for name, value in tuning.items():
            args += [f"--{name}", str(value)]
        gateway = Gateway(self.devnet_file, [*args, *extra])
        self.started.append(gateway)
        return gateway

    def close(self) -> None:
        for n, gateway in enumerate(self.started):
            gateway.stop()
            print(f"--- gateway {n} ({gateway.url}) stderr:\n{gateway.output()}")  # shown if the test failed
            gateway.close()


class Chain:
    """Chain-side helpers on the session devnet (anvil): fresh funded keys, TestUSDC, EIP-3009 state."""

    def __init__(self, devnet: DevnetState) -> None:
        if devnet.backend != "anvil":
            unavailable("these suites fund fresh keys with anvil_setBalance")
        self.devnet = devnet
        self.rpc = Rpc(devnet.rpc_url)
        self.usdc = devnet.contracts["usdc"]
        self._funder: TxSender | None = None

    async def key(self) -> LocalSigner:
        """A fresh account holding 1000 ETH for gas."""
        signer = LocalSigner.random()
        await self.rpc.request("anvil_setBalance", [signer.address, hex(10**21)])
        return signer

    async def mint(self, to: str, amount: int) -> None:
        if self._funder is None:
            self._funder = TxSender(self.rpc, key_hex(await self.key()), chain_id=self.devnet.chain_id)
        data = keccak(text="mint(address,uint256)")[:4] + abi_encode(["address", "uint256"], [to, amount])
        await self._funder.transact(self.usdc, data, gas=120_000)

    async def balance(self, address: str) -> int:
        data = keccak(text="balanceOf(address)")[:4] + abi_encode(["address"], [address])
        return int.from_bytes(await self.rpc.call(self.usdc, data), "big")

    async def used(self, pairs: Sequence[tuple[str, str]]) -> list[bool]:
        """`authorizationState(authorizer, nonce)` for each pair, in one round trip."""
        calls = [
            (
                "eth_call",
                [{"to": self.usdc, "data": "0x" + authorization_state_calldata(a, n).hex()}, "latest"],
            )
            for a, n in pairs
        ]
        return [int(result, 16) != 0 for result in await self.rpc.batch(calls)]

    async def sent(self, address: str) -> int:
        """How many transactions `address` has sent (its account nonce): each costs gas, reverted or not."""
        return await self.rpc.get_transaction_count(address, "latest")

    async def block(self) -> int:
        return int(await self.rpc.request("eth_blockNumber", []), 16)

    async def authorizations_used(self, authorizers: Sequence[str], from_block: int) -> list[tuple[str, str]]:
        """Each `AuthorizationUsed(authorizer, nonce)` of these payers since `from_block`, repeats kept."""
        topics = ["0x" + "00" * 12 + a[2:].lower() for a in authorizers]
        logs = await self.rpc.request(
            "eth_getLogs",
            [
                {
                    "address": self.usdc,
                    "fromBlock": hex(from_block),
                    "topics": [AUTHORIZATION_USED_TOPIC, topics],
                }
            ],
        )
        return [("0x" + log["topics"][1][-40:], log["topics"][2]) for log in logs]

    def wallet(self, signer: LocalSigner) -> Eip3009Wallet:
        devnet = self.devnet
        return Eip3009Wallet(signer, devnet.chain_id, {self.usdc: (devnet.usdc_name, devnet.usdc_version)})

    async def aclose(self) -> None:
        await self.rpc.aclose()


async def sign_for(client: httpx.AsyncClient, url: str, wallet: Eip3009Wallet) -> dict[str, str]:
    """Ask `url` for its 402 and sign its x402 v2 offer: the headers of one paid request."""
    response = await client.get(url)
    assert response.status_code == 402, response.text
    (offer,) = [o for o in offers_from_response(response) if o.protocol == "x402v2"]
    return payment_headers(offer, wallet.pay(offer))


def authorization_of(headers: Mapping[str, str]) -> tuple[str, str]:
    """(payer, nonce) of the EIP-3009 authorization in a PAYMENT-SIGNATURE header."""
    payment = decode_payment_signature(headers["PAYMENT-SIGNATURE"])
    auth: dict[str, Any] = payment.payload["authorization"]
    return str(auth["from"]).lower(), str(auth["nonce"]).lower()


def reason(response: httpx.Response) -> str:
    """The x402 reason code of a refused payment."""
    return str(decode_payment_required(response.headers["payment-required"]).error)


async def read_store(url: str) -> tuple[QueueStats, int]:
    """The queue's counts and the number of dead letters, read as an operator would."""
    store: PaymentStore = await open_store(url)
    try:
        return await store.stats(), len(await store.dead_letters(limit=10_000))
    finally:
        await store.close()


async def wait_settled(url: str, count: int, *, timeout: float = 60.0) -> QueueStats:
    """Poll the store until `count` settlements are settled; fail with what it holds after `timeout`."""
    deadline = time.monotonic() + timeout
    while True:
        store: PaymentStore = await open_store(url)
        try:
            stats = await store.stats()
            if stats.settled >= count or time.monotonic() > deadline:
                dead = await store.dead_letters(limit=5)
                break
        finally:
            await store.close()
        await asyncio.sleep(0.2)
    assert stats.settled == count, f"{stats}, dead letters: {[(d.key, d.error) for d in dead]}"
    return stats


async def wait_for(check: Any, *, timeout: float = 60.0, every: float = 0.2) -> Any:
    """Poll the coroutine function `check` until it returns something truthy (or fail after `timeout`)."""
    deadline = time.monotonic() + timeout
    while True:
        value = await check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"still not done after {timeout}s: {value!r}")
        await asyncio.sleep(every)


class TcpProxy:
    """A TCP forwarder to `target` on its own thread; `down()` refuses and cuts everything, `up()` resumes.

    Stands for "the chain RPC went away": while down, nothing listens on the port (connection refused) and
    every connection that was open has been closed.
    """

    def __init__(self, target_host: str, target_port: int) -> None:
        self.target = (target_host, target_port)
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.port = probe.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._thread.start()
        self._server: asyncio.Server | None = None
        self._open: set[asyncio.StreamWriter] = set()

    def _run(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout=30)

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        except (OSError, asyncio.CancelledError):
            pass
        finally:
            writer.close()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.target)
        except OSError:
            writer.close()
            return
        self._open |= {writer, up_writer}
        try:
            await asyncio.gather(self._pipe(reader, up_writer), self._pipe(up_reader, writer))
        finally:
            self._open -= {writer, up_writer}

    async def _up(self) -> None:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", self.port, reuse_address=True)

    async def _down(self) -> None:
        if self._server is not None:
            self._server.close()
            for writer in list(self._open):
                writer.transport.abort()
            await self._server.wait_closed()
            self._server = None

    def up(self) -> None:
        self._run(self._up())

    def down(self) -> None:
        self._run(self._down())

    def close(self) -> None:
        self.down()
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)
        self._loop.close()
