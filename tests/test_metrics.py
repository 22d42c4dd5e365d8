"""Prometheus metrics at `/metrics` and the `payment_id` that follows a payment through the logs.

Real payments on the session devnet through the real middleware (see `tests/_ops_world.py`); `/metrics`
is read the way Prometheus reads it (text format, parsed by prometheus_client's own parser).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from starlette.applications import Starlette
from starlette.routing import Route

from escrow import Chain, DevnetState
from escrow.chain._rpc import Rpc
from escrow.payments._exact_settler import ExactSettler
from gateway import (
    ExactScheme,
    MemoryStore,
    Metrics,
    PaymentMiddleware,
    PaymentStore,
    SettlementOptions,
    open_store,
    payment_id,
)
from tests._ops_world import HELLO, RELAYER, REPORT, Shop, _hello
from tests.test_store import BACKENDS, isolated_url, item, run
from x402 import LocalSigner

pytestmark = [pytest.mark.anyio]


async def _shop(devnet: DevnetState, settle: str) -> AsyncIterator[Shop]:
    rpc = Rpc(devnet.rpc_url)
    shop = Shop(devnet, rpc, MemoryStore(), settle=settle, metrics=Metrics())  # type: ignore[arg-type]
    try:
        yield shop
    finally:
        await shop.aclose()
        await rpc.aclose()


@pytest.fixture
async def shop(devnet: DevnetState) -> AsyncIterator[Shop]:
    async for s in _shop(devnet, "before-response"):
        yield s


@pytest.fixture
async def deferred(devnet: DevnetState) -> AsyncIterator[Shop]:
    async for s in _shop(devnet, "deferred"):
        yield s


async def scrape(shop: Shop) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of `/metrics`, keyed by (name, sorted labels)."""
    response = await shop.client.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain; version=")
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(response.text)
        for sample in family.samples
    }


def value(samples: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


async def test_metrics_count_challenges_payments_refusals_and_releases(shop: Shop) -> None:
    assert (await shop.client.get("/hello")).status_code == 402
    payer = await shop.payer()
    async with shop.paying(payer) as client:
        paid = [await client.get("/hello"), await client.get("/hello"), await client.get("/report")]
        assert [r.status_code for r in paid] == [200, 200, 200]
        assert (await client.get("/fail")).status_code == 500  # handler failed: released, not charged
    replay = await shop.client.get(
        "/hello", headers={"payment-signature": paid[0].request.headers["payment-signature"]}
    )
    assert replay.status_code == 402
    garbage = await shop.client.get("/report", headers={"payment-signature": "bm90IGpzb24"})
    assert garbage.status_code == 400

    m = await scrape(shop)
    # 1 unpaid call, then the payer's first /hello got a 402 too; its second paid up front (the client
    # remembers a route's requirements by default)
    assert value(m, "agentpay_challenges_total", route="GET /hello") == 2
    assert value(m, "agentpay_challenges_total", route="GET /report") == 1
    assert value(m, "agentpay_payments_verified_total", scheme="exact", route="GET /hello") == 2
    assert value(m, "agentpay_payments_verified_total", scheme="exact", route="GET /fail") == 1
    served = {"scheme": "exact", "settle": "before-response"}
    assert value(m, "agentpay_payments_served_total", route="GET /hello", **served) == 2
    assert value(m, "agentpay_payments_served_total", route="GET /report", **served) == 1
    amount = {"scheme": "exact", "asset": shop.usdc}
    assert value(m, "agentpay_payments_amount_total", route="GET /hello", **amount) == 2 * HELLO
    assert value(m, "agentpay_payments_amount_total", route="GET /report", **amount) == REPORT
    assert value(m, "agentpay_payments_released_total", scheme="exact", route="GET /fail") == 1
    refused = {(labels, v) for (name, labels), v in m.items() if name == "agentpay_payments_refused_total"}
    assert refused == {
        # the x402 reason codes the payer was told
        (
            (
                ("reason", "invalid_exact_evm_nonce_already_used"),
                ("route", "GET /hello"),
                ("scheme", "exact"),
            ),
            1.0,
        ),
        ((("reason", "invalid_payload"), ("route", "GET /report"), ("scheme", "exact")), 1.0),
    }
    latency = {"kind": "exact", "mode": "before-response"}
    assert value(m, "agentpay_settlement_seconds_count", **latency) == 3
    assert 0 < value(m, "agentpay_settlement_seconds_sum", **latency) < 30
    # the store's view: three payments recorded and settled, nothing waiting, nothing dead
    assert value(m, "agentpay_settlement_queue", state="settled") == 3
    assert value(m, "agentpay_settlement_queue", state="queued") == 0
    assert value(m, "agentpay_settlement_queue_oldest_seconds") == 0
    assert value(m, "agentpay_dead_letters") == 0


async def test_queue_gauges_and_settler_outcomes_in_deferred_mode(deferred: Shop) -> None:
    shop = deferred
    payer = await shop.payer()
    async with shop.paying(payer) as client:
        for path in ("/hello", "/report", "/hello"):
            assert (await client.get(path)).status_code == 200
    await asyncio.sleep(0.3)
    m = await scrape(shop)
    served = {"scheme": "exact", "settle": "deferred"}
    assert value(m, "agentpay_payments_served_total", route="GET /hello", **served) == 2
    assert value(m, "agentpay_settlement_queue", state="queued") == 3
    assert 0.3 <= value(m, "agentpay_settlement_queue_oldest_seconds") < 30

    queued = await shop.store.list_settlements(states=["queued"])
    dead_key = queued[0].key  # an operator gives up on one: a dead letter
    await shop.store.mark_failed(dead_key, error="test: given up", retry_at=None)
    settler = ExactSettler(shop.store, shop.exact, max_age=0)
    outcomes = await settler.drain()
    hook = shop.metrics.settler_hook(shop.store)
    for outcome in outcomes:
        await hook(outcome)
    assert sorted(o.status for o in outcomes) == ["settled", "settled"]

    m = await scrape(shop)
    assert value(m, "agentpay_settlements_total", kind="exact", status="settled") == 2
    assert value(m, "agentpay_settlement_seconds_count", kind="exact", mode="deferred") == 2
    assert value(m, "agentpay_settlement_queue", state="settled") == 2
    assert value(m, "agentpay_settlement_queue", state="queued") == 0
    assert value(m, "agentpay_settlement_queue", state="dead") == 1
    assert value(m, "agentpay_dead_letters") == 1
    assert value(m, "agentpay_settlement_queue_oldest_seconds") == 0  # a dead letter is not waiting


async def test_payment_id_follows_an_mpp_payment_from_its_402_to_its_settlement(
    deferred: Shop, caplog: pytest.LogCaptureFixture
) -> None:
    shop = deferred
    payer = await shop.payer()
    caplog.set_level(logging.INFO, logger="agentpay.payments")
    async with shop.paying(payer, prefer=("mpp",)) as client:
        response = await client.get("/report")
    assert response.status_code == 200
    (item,) = await shop.store.list_settlements()
    pid = payment_id(item.key)
    assert pid.startswith("pay_") and len(pid) == 20
    settler = ExactSettler(shop.store, shop.exact, max_age=0)
    hook = shop.metrics.settler_hook(shop.store)
    for outcome in await settler.drain():
        await hook(outcome)

    records = [r for r in caplog.records if r.name == "agentpay.payments"]
    (challenge,) = [r for r in records if getattr(r, "event", None) == "challenge"]
    assert challenge.route == "GET /report" and challenge.amount == REPORT  # type: ignore[attr-defined]
    ours = [r for r in records if getattr(r, "payment_id", None) == pid]
    assert [r.event for r in ours] == [  # type: ignore[attr-defined]
        "verified",
        "claimed",
        "served",
        "queued",
        "settlement_settled",
    ]
    # the 402 and the payment are linked by the MPP challenge the credential echoed
    assert ours[0].challenge_id in challenge.challenge_ids  # type: ignore[attr-defined]
    assert {r.payer for r in ours} == {payer.address}  # type: ignore[attr-defined]
    assert ours[-1].tx_hash.startswith("0x")  # type: ignore[attr-defined]


async def test_metrics_endpoint_is_off_unless_asked_for(devnet: DevnetState) -> None:
    rpc = Rpc(devnet.rpc_url)
    shop = Shop(devnet, rpc, MemoryStore(), settle="before-response", metrics=Metrics())
    app = PaymentMiddleware(
        Starlette(),
        routes={"GET /hello": 1},
        schemes=[ExactScheme(shop.exact)],
        pay_to=shop.payee,
        asset=shop.asset,
        store=MemoryStore(),
    )
    try:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://x") as client:
            assert (await client.get("/metrics")).status_code == 404  # the app's own answer
    finally:
        await shop.aclose()
        await rpc.aclose()


@pytest.fixture
def pg_url(tmp_path: Path) -> Iterator[str]:
    with isolated_url("postgres", tmp_path) as value:
        yield value


async def test_a_scrape_answers_even_when_the_store_is_down(shop: Shop, pg_url: str) -> None:
    """A PostgreSQL store whose pool is gone: the scrape still answers, counting the failed read."""
    store = await open_store(pg_url)
    await store.close()
    shop.app.paywall.store = store
    m = await scrape(shop)
    assert value(m, "agentpay_metrics_store_errors_total") == 1
    assert (
        value(
            m, "agentpay_payments_served_total", route="GET /hello", scheme="exact", settle="before-response"
        )
        == 0
    )


@pytest.fixture(params=BACKENDS)
def url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    with isolated_url(request.param, tmp_path) as value:
        yield value


def test_gauges_read_every_store_backend(url: str) -> None:
    """The queue age comes from `list_settlements`, which every backend implements the same way."""

    async def body(store: PaymentStore) -> None:
        metrics = Metrics()
        now = time.time()
        await store.enqueue(item("old", created_at=now - 100))
        await store.enqueue(item("new", created_at=now - 10))
        await store.enqueue(item("gone", created_at=now - 500))
        await store.mark_failed("gone", error="x", retry_at=None)
        await metrics.collect_store(store)
        assert 99 <= metrics.queue_age._value.get() < 130  # type: ignore[attr-defined]
        assert metrics.dead_letters._value.get() == 1  # type: ignore[attr-defined]

    run(url, body)


async def test_chain_middleware_reports_its_own_settlers_outcomes(devnet: DevnetState) -> None:
    """`PaymentMiddleware(chain=..., metrics=True, settle="deferred")`: the settler the middleware runs
    reports each settlement's latency and gas, and the queue drains to `settled`."""
    chain = Chain.from_devnet(devnet, relayer=RELAYER)
    app = PaymentMiddleware(
        Starlette(routes=[Route("/hello", _hello)]),
        routes={"GET /hello": "$0.001"},
        chain=chain,
        pay_to=LocalSigner.random().address,
        store=MemoryStore(),
        settle="deferred",
        settlement=SettlementOptions(max_age=0.05),
        metrics=True,
    )
    rpc = Rpc(devnet.rpc_url)
    shop = Shop(devnet, rpc, MemoryStore(), settle="deferred", metrics=Metrics())  # its payer and wallet
    await shop.client.aclose()
    shop.app = app
    shop.client = httpx.AsyncClient(transport=shop.transport(), base_url="http://shop.test")
    try:
        payer = await shop.payer()
        async with shop.paying(payer) as client:
            for _ in range(3):
                assert (await client.get("/hello")).status_code == 200
            deadline = time.monotonic() + 30
            while True:
                m = await scrape(shop)
                if value(m, "agentpay_settlements_total", kind="exact", status="settled") == 3:
                    break
                assert time.monotonic() < deadline, m
                await asyncio.sleep(0.1)
        assert value(m, "agentpay_settlement_seconds_count", kind="exact", mode="deferred") == 3
        assert value(m, "agentpay_settlement_gas_total", kind="exact") > 3 * 21_000  # real transfers' gas
        assert value(m, "agentpay_settlement_queue", state="settled") == 3
        assert value(m, "agentpay_settlement_queue_oldest_seconds") == 0
    finally:
        await app.shutdown()
        await shop.aclose()
        await rpc.aclose()


async def test_a_scrape_answers_when_the_store_cannot_even_be_opened(devnet: DevnetState) -> None:
    """A store URL whose database is down: paid requests get 503, `/metrics` still answers 200."""
    rpc = Rpc(devnet.rpc_url)
    shop = Shop(devnet, rpc, MemoryStore(), settle="before-response", metrics=Metrics())
    app = PaymentMiddleware(
        Starlette(routes=[Route("/hello", _hello)]),
        routes={"GET /hello": 1},
        schemes=[ExactScheme(shop.exact)],
        pay_to=shop.payee,
        asset=shop.asset,
        store="postgresql://agentpay@127.0.0.1:1/nothing-listens-here",
        metrics=True,
    )
    try:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://x") as client:
            assert (await client.get("/hello")).status_code == 503
            response = await client.get("/metrics")
        assert response.status_code == 200
        assert "agentpay_metrics_store_errors_total 1.0" in response.text
    finally:
        await shop.aclose()
        await rpc.aclose()
