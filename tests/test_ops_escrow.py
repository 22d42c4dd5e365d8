"""Operator views of `escrow` payments: spend per grant on the dashboard, gas and latency in the metrics.

Two session keys of one owner (two grants, relayed on chain) pay one sub-agent through the real middleware;
its batching `EscrowSettler` reports outcomes through `Metrics.settler_hook`. The chain world (escrow
deployed, owner funded) is `tests.test_escrow_chain`'s.
"""

from __future__ import annotations

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from escrow.payments._escrow_verify import EscrowVerifier, GrantCache
from escrow.payments._settler import EscrowSettler
from gateway import MemoryStore, Metrics, PaymentMiddleware, dashboard_app
from gateway._escrow_scheme import EscrowScheme
from tests.test_escrow_chain import PRICE, Chain, chain, env, payee, wallet  # noqa: F401  (fixtures)
from x402.client_escrow import SessionKeyAuth

pytestmark = [pytest.mark.chain, pytest.mark.anyio]


async def test_escrow_spend_per_grant_and_settlement_gas(chain: Chain) -> None:  # noqa: F811
    store = MemoryStore()
    metrics = Metrics()
    settler = EscrowSettler(
        store,
        chain.sender(chain.env.settler_a),
        batch_size=32,
        max_age=3600,
        on_outcome=metrics.settler_hook(store),
    )
    verifier = EscrowVerifier(chain.escrow, chain_id=chain.env.chain_id, cache=GrantCache(chain.escrow))
    scheme = EscrowScheme(verifier, store, settler, credit_limit=10**12)
    address = payee()

    async def work(request: Request) -> JSONResponse:
        return JSONResponse({"ok": True})

    app = PaymentMiddleware(
        Starlette(routes=[Route("/work", work)]),
        routes={"GET /work": PRICE},
        schemes=[scheme],
        pay_to=address,
        asset=chain.env.asset,
        store=store,
        settle="deferred",
        metrics=metrics,
    )
    calls = {}
    for n in (3, 2):
        session, grant = await chain.new_grant(max_per_call=PRICE, budget=100 * PRICE, payees=[address])
        auth = SessionKeyAuth(wallet(chain, session, grant))
        client = httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://sub", auth=auth)
        async with client as c:
            for _ in range(n):
                assert (await c.get("/work")).status_code == 200
        calls[f"{grant.payer} → {session.address} (epoch {grant.epoch})"] = n
    outcomes = await settler.drain()
    assert [o.status for o in outcomes] == ["settled"] * 5
    assert settler.gas_used > 0

    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://sub") as client:
        text = (await client.get("/metrics")).text
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }
    # each payment reports its share of its batch's gasUsed, rounded down: at most one unit lost a payment
    gas = samples[("agentpay_settlement_gas_total", (("kind", "escrow"),))]
    assert settler.gas_used - 5 < gas <= settler.gas_used
    assert samples[("agentpay_settlements_total", (("kind", "escrow"), ("status", "settled")))] == 5
    assert samples[("agentpay_settlement_seconds_count", (("kind", "escrow"), ("mode", "deferred")))] == 5
    served = (("route", "GET /work"), ("scheme", "escrow"), ("settle", "deferred"))
    assert samples[("agentpay_payments_served_total", served)] == 5

    dashboard = dashboard_app(store, metrics=metrics)
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=dashboard), base_url="http://ops"
    ) as client:
        data = (await client.get("/api/summary")).json()
        html = (await client.get("/")).text
    grants = {name: totals for name, totals in data["grants"]}
    assert {name: t["calls"] for name, t in grants.items()} == calls
    assert {name: t["settled"] for name, t in grants.items()} == {
        name: n * PRICE for name, n in calls.items()
    }
    ((payee_name, payee_totals),) = data["payees"]
    assert (payee_name, payee_totals["settled"]) == (address, 5 * PRICE)
    for name in calls:
        assert f'<tr data-name="{name}">' in html.replace("&gt;", ">")
