"""The chain RPC goes away for 30 seconds while payments wait to be settled: the queue waits, retries with
backoff, shows the operator what is pending, and settles everything exactly once when the RPC is back.

The gateway (a real uvicorn process, PostgreSQL store, `settle="deferred"`) verifies on the node directly
and settles through a TCP proxy in front of the same anvil (`--settle-rpc`); the test takes the proxy down,
so the settler's node is unreachable (connection refused) for the whole outage while payments keep being
served. The operator looks with `agentpay settlements --store URL`, as from a shell.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest

from escrow import DevnetState
from gateway._store import Settlement
from gateway._stores import open_store
from tests._gateways import (
    PRICE,
    Chain,
    Gateways,
    StoreUnderTest,
    TcpProxy,
    authorization_of,
    key_hex,
    store_under_test,
    wait_settled,
)
from x402 import LocalSigner
from x402.client import PaymentAuth, SpendPolicy

pytestmark = [pytest.mark.chain, pytest.mark.anyio]

OUTAGE = 30.0  # seconds, the number
PAYMENTS = 20
AGENTPAY = shutil.which("agentpay", path=str(Path(sys.executable).parent)) or "agentpay"


@pytest.fixture
def store(tmp_path: Path) -> Iterator[StoreUnderTest]:
    with store_under_test("postgres", tmp_path) as value:
        yield value


@pytest.fixture
def gateways(devnet: DevnetState, tmp_path: Path) -> Iterator[Gateways]:
    started = Gateways(devnet, tmp_path)
    try:
        yield started
    finally:
        started.close()


@pytest.fixture
def proxy(devnet: DevnetState) -> Iterator[TcpProxy]:
    node = urlsplit(devnet.rpc_url)
    forwarder = TcpProxy(node.hostname or "127.0.0.1", node.port or 8545)
    forwarder.up()
    try:
        yield forwarder
    finally:
        forwarder.close()


def operator_view(url: str) -> dict[str, Any]:
    """What `agentpay settlements --store URL` prints."""
    result = subprocess.run(
        [AGENTPAY, "settlements", "--store", url], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    view: dict[str, Any] = json.loads(result.stdout)
    return view


async def test_settlement_waits_out_a_30_second_rpc_outage(
    devnet: DevnetState, gateways: Gateways, store: StoreUnderTest, proxy: TcpProxy
) -> None:
    chain = Chain(devnet)
    try:
        payer, payee, relayer = LocalSigner.random(), LocalSigner.random().address, await chain.key()
        await chain.mint(payer.address, PAYMENTS * PRICE)
        gateway = gateways.new(
            store=store.url,
            settle="deferred",
            payee=payee,
            relayer_key=key_hex(relayer),
            extra=["--settle-rpc", proxy.url],
        )
        await asyncio.to_thread(gateway.start)
        start = await chain.block()

        proxy.down()
        down_at = time.monotonic()
        auth = PaymentAuth(chain.wallet(payer), SpendPolicy(max_per_call=PRICE), remember=True)
        async with httpx.AsyncClient(base_url=gateway.url, auth=auth, timeout=30) as client:
            responses = await asyncio.gather(*(client.get("/hello") for _ in range(PAYMENTS)))
        assert [r.status_code for r in responses] == [200] * PAYMENTS  # served: the queue owns them now
        paid = sorted(authorization_of(r.request.headers) for r in responses)

        # During the outage the operator sees every payment pending, none settled, none given up on ...
        view = await asyncio.to_thread(operator_view, store.url)
        assert view["pending"] == PAYMENTS and view["stats"]["settled"] == 0 and view["dead_letters"] == []
        # ... and the queue keeps trying, with backoff: the same items come back for more attempts.
        opened = await open_store(store.url)
        try:
            key = f"exact:{devnet.chain_id}:{chain.usdc.lower()}:{paid[0][0]}:{paid[0][1]}"
            while (item := await opened.get_settlement(key)) is None or item.attempts < 3:
                assert time.monotonic() - down_at < OUTAGE, f"no retries during the outage: {item}"
                await asyncio.sleep(0.5)
            assert item.state in ("failed", "leased") and item.tx_hash is None
        finally:
            await opened.close()
        await asyncio.sleep(max(0.0, OUTAGE - (time.monotonic() - down_at)))
        view = await asyncio.to_thread(operator_view, store.url)
        assert view["pending"] == PAYMENTS and view["stats"]["settled"] == 0 and view["dead_letters"] == []
        assert await chain.balance(payee) == 0
        assert await chain.sent(relayer.address) == 0  # nothing reached the chain

        proxy.up()
        await wait_settled(store.url, PAYMENTS, timeout=60)
        view = await asyncio.to_thread(operator_view, store.url)
        assert view["pending"] == 0 and view["stats"]["dead"] == 0 and view["dead_letters"] == []
        assert sorted(await chain.authorizations_used([payer.address], start)) == paid  # once each
        assert await chain.sent(relayer.address) == PAYMENTS  # one transaction per payment, no resends
        assert await chain.balance(payee) == PAYMENTS * PRICE
    finally:
        await chain.aclose()


def test_the_operator_cli_lists_dead_letters_requeues_and_refuses_bad_input(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'payments.db'}"

    async def setup() -> None:
        opened = await open_store(url)
        try:
            for key in ("lost", "waiting"):
                item = Settlement(
                    key=key, kind="exact", payload=b"{}", payer="0xpayer", amount=7, created_at=1.0
                )
                await opened.enqueue(item)
            await opened.mark_failed("lost", error="exact_nonce_reused: lost 7", retry_at=None)
        finally:
            await opened.close()

    asyncio.run(setup())
    view = operator_view(url)
    assert view["stats"] == {"queued": 1, "leased": 0, "settled": 0, "failed": 0, "dead": 1}
    assert view["pending"] == 1
    (dead,) = view["dead_letters"]
    assert (dead["key"], dead["amount"], dead["error"]) == ("lost", 7, "exact_nonce_reused: lost 7")

    again = subprocess.run(
        [AGENTPAY, "settlements", "--store", url, "--requeue", "lost", "--requeue", "nope"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert again.returncode == 1
    assert json.loads(again.stdout)["requeued"] == {"lost": True, "nope": False}
    assert again.stderr.strip() == (
        "agentpay: error: nothing to requeue under nope (only dead or retry-waiting items can be)"
    )
    assert operator_view(url)["stats"]["queued"] == 2

    for bad in ("bogus://x", "postgresql://postgres@127.0.0.1:5432/no_such_database_here?schema=x"):
        result = subprocess.run([AGENTPAY, "settlements", "--store", bad], capture_output=True, text=True)
        assert result.returncode == 1 and "Traceback" not in result.stderr
        assert len(result.stderr.strip().splitlines()) == 1 and result.stderr.startswith("agentpay: error: ")
