"""Gateway replicas sharing one store: real uvicorn processes, real PostgreSQL (and Redis), real anvil.

PostgreSQL runs three replicas on three ports; SQLite is embedded and single-process, so its "replicas" are
one process that gets every copy. All settle with `settle="deferred"`: each replica's `ExactSettler` drains
the shared queue (`FOR UPDATE SKIP LOCKED` hands every item to one of them) and sends with its own relayer
key (a relayer counts its account nonce in process; three sharing one key would collide on it).
What a user checks: one payment sent to every replica at once is served once, the others refuse it with the
replay reason; 1,000 payments spread over the replicas are each settled exactly once, on chain.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from escrow import DevnetState
from tests._gateways import (
    FAST,
    PRICE,
    Chain,
    Gateway,
    Gateways,
    StoreUnderTest,
    authorization_of,
    key_hex,
    read_store,
    reason,
    sign_for,
    store_under_test,
    wait_settled,
)
from x402 import LocalSigner, Reason
from x402.client import PaymentAuth, SpendPolicy

pytestmark = [pytest.mark.chain, pytest.mark.anyio]

REPLICAS = {"sqlite": 1, "postgres": 3, "postgres+redis": 3}
PAYMENTS = 1000
PAYERS = 4
CONCURRENCY = 24
HEADROOM = 3 * 64 * PRICE  # three settlers' batches (see below)


@pytest.fixture
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[StoreUnderTest]:
    with store_under_test(request.param, tmp_path) as value:
        yield value


@pytest.fixture
def gateways(devnet: DevnetState, tmp_path: Path) -> Iterator[Gateways]:
    started = Gateways(devnet, tmp_path)
    try:
        yield started
    finally:
        started.close()


async def _replicas(
    chain: Chain, gateways: Gateways, url: str, backend: str, payee: str
) -> tuple[list[Gateway], list[str]]:
    relayers = [await chain.key() for _ in range(REPLICAS[backend])]
    # `FAST`'s short leases (3 s): a settler renews its lease while a batch is sent and its receipts
    # awaited, so a batch slower than a lease (a 64-payment batch on a loaded machine) is never taken
    # and sent again by another replica.
    replicas = [
        gateways.new(store=url, settle="deferred", payee=payee, relayer_key=key_hex(r), tuning=FAST)
        for r in relayers
    ]
    await asyncio.gather(*(asyncio.to_thread(r.start) for r in replicas))
    return replicas, [r.address for r in relayers]


async def _one_payment_to_every_replica(chain: Chain, replicas: list[Gateway], url: str, payee: str) -> None:
    payer = LocalSigner.random()
    await chain.mint(payer.address, PRICE)
    start = await chain.block()
    async with httpx.AsyncClient(timeout=30) as client:
        headers = await sign_for(client, f"{replicas[0].url}/hello", chain.wallet(payer))
        targets = [r.url for r in replicas] * (3 // len(replicas))  # three copies, whatever the count
        answers = await asyncio.gather(*(client.get(f"{u}/hello", headers=headers) for u in targets))
    assert sorted(a.status_code for a in answers) == [200, 402, 402]
    assert {reason(a) for a in answers if a.status_code == 402} == {Reason.NONCE_ALREADY_USED}

    await wait_settled(url, 1)
    assert await chain.authorizations_used([payer.address], start) == [authorization_of(headers)]
    assert await chain.balance(payee) == PRICE
    assert await chain.balance(payer.address) == 0


@pytest.mark.parametrize("store", ["sqlite", "postgres"], indirect=True)
async def test_replicas_serve_and_settle_each_payment_once(
    devnet: DevnetState, gateways: Gateways, store: StoreUnderTest
) -> None:
    chain = Chain(devnet)
    payee = LocalSigner.random().address
    url = store.url
    try:
        replicas, relayers = await _replicas(chain, gateways, url, store.backend, payee)
        await _one_payment_to_every_replica(chain, replicas, url, payee)

        payers = [LocalSigner.random() for _ in range(PAYERS)]
        # Payer n % PAYERS pays call n. Each holds a headroom above its share: a settlement that landed
        # counts against the payer twice until its settler records it (the `exact` reservation refuses
        # early, never late), and three settlers' batches may be landing at once.
        for payer in payers:
            await chain.mint(payer.address, PAYMENTS // PAYERS * PRICE + HEADROOM)
        start = await chain.block()
        # One client per (payer, replica); `remember=True`: after the first 402, each call is one
        # round trip that carries its payment.
        clients = [
            [
                httpx.AsyncClient(
                    base_url=replica.url,
                    timeout=60,
                    auth=PaymentAuth(chain.wallet(payer), SpendPolicy(max_per_call=PRICE), remember=True),
                )
                for replica in replicas
            ]
            for payer in payers
        ]
        try:
            jobs = iter(range(PAYMENTS))
            responses: list[httpx.Response] = []

            async def worker() -> None:
                for n in jobs:
                    client = clients[n % PAYERS][n // PAYERS % len(replicas)]
                    responses.append(await client.get("/hello"))

            await asyncio.gather(*(worker() for _ in range(CONCURRENCY)))
        finally:
            for client in itertools.chain.from_iterable(clients):
                await client.aclose()
        assert [r.status_code for r in responses] == [200] * PAYMENTS
        paid = {authorization_of(r.request.headers) for r in responses}
        assert len(paid) == PAYMENTS  # every call carried its own authorization

        await wait_settled(url, PAYMENTS + 1, timeout=120)
        stats, dead = await read_store(url)
        assert (stats.queued, stats.leased, stats.failed, stats.dead, dead) == (0, 0, 0, 0, 0)
        used = await chain.authorizations_used([p.address for p in payers], start)
        assert len(used) == PAYMENTS and set(used) == paid  # each authorization used exactly once
        assert all(await chain.used(sorted(paid)))
        # One transaction per payment, whichever replica sent it: nothing sent twice, nothing reverted.
        assert sum([await chain.sent(r) for r in relayers]) == PAYMENTS + 1
        assert await chain.balance(payee) == (PAYMENTS + 1) * PRICE
        for payer in payers:
            assert await chain.balance(payer.address) == HEADROOM  # each charged its share, once
    finally:
        await chain.aclose()


@pytest.mark.parametrize("store", ["postgres+redis"], indirect=True)
async def test_one_payment_to_three_replicas_with_the_redis_claim_cache(
    devnet: DevnetState, gateways: Gateways, store: StoreUnderTest
) -> None:
    chain = Chain(devnet)
    payee = LocalSigner.random().address
    try:
        replicas, relayers = await _replicas(chain, gateways, store.url, store.backend, payee)
        await _one_payment_to_every_replica(chain, replicas, store.url, payee)
        assert sum([await chain.sent(r) for r in relayers]) == 1
    finally:
        await chain.aclose()
