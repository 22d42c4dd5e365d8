"""The payer pays up front by default once it has seen a route priced (issue 15).

Real ASGI apps over ``httpx.ASGITransport``: the in-test paywall of ``tests.test_client_unit`` (real 402s,
real signature checks), wrapped to record which requests arrived carrying a payment.
"""

from __future__ import annotations

from typing import Any

import httpx
import pytest

from tests.test_client_unit import CountingWallet, Paywall, wallet
from x402.client import PaymentAuth, SpendPolicy

_PAYMENT_HEADERS = (b"payment-signature", b"x-payment", b"authorization")


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


class Recorder:
    """ASGI wrapper: (method, path?query, paid) of every request the paywall receives, in order."""

    def __init__(self, paywall: Paywall) -> None:
        self.paywall = paywall
        self.app = paywall.app()
        self.seen: list[tuple[str, str, bool]] = []

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            target = scope["path"] + (f"?{scope['query_string'].decode()}" if scope["query_string"] else "")
            paid = any(name in _PAYMENT_HEADERS for name, _ in scope["headers"])
            self.seen.append((scope["method"], target, paid))
        await self.app(scope, receive, send)

    def client(self, auth: PaymentAuth) -> httpx.AsyncClient:
        return httpx.AsyncClient(
            transport=httpx.ASGITransport(app=self), base_url="http://paywall.test", auth=auth
        )


@pytest.mark.anyio
async def test_a_route_seen_priced_is_paid_on_the_first_request_by_default() -> None:
    recorder = Recorder(Paywall())
    policy = SpendPolicy()
    auth = PaymentAuth(wallet(), policy=policy)  # no `remember=` argument: the default
    async with recorder.client(auth) as client:
        for _ in range(3):
            assert (await client.get("/paid")).status_code == 200
    # one 402 round trip, then every call is a single paid request
    assert recorder.seen == [
        ("GET", "/paid", False),
        ("GET", "/paid", True),
        ("GET", "/paid", True),
        ("GET", "/paid", True),
    ]
    assert recorder.paywall.paid == ["x402v2"] * 3
    assert policy.spent == 3 * recorder.paywall.price and policy.reserved == 0


@pytest.mark.anyio
async def test_changed_requirements_fall_back_to_the_402_round_trip() -> None:
    paywall = Paywall()
    recorder = Recorder(paywall)
    policy = SpendPolicy()
    auth = PaymentAuth(wallet(), policy=policy)
    async with recorder.client(auth) as client:
        assert (await client.get("/paid")).status_code == 200
        paywall.price = 2500  # the server's requirements changed
        response = await client.get("/paid")
        assert response.status_code == 200
        # the stale payment was refused with a 402 carrying the new price, which was then paid
        assert recorder.seen[2:] == [("GET", "/paid", True), ("GET", "/paid", True)]
        assert len(paywall.paid) == 2
        assert policy.spent == 1000 + 2500 and policy.reserved == 0  # the refused one cost nothing
        # and the new requirements are what is remembered now
        assert (await client.get("/paid")).status_code == 200
    assert recorder.seen[4:] == [("GET", "/paid", True)]
    assert policy.spent == 1000 + 2 * 2500


@pytest.mark.anyio
async def test_a_route_never_seen_priced_is_never_paid_up_front() -> None:
    recorder = Recorder(Paywall())
    counting = CountingWallet(wallet())
    auth = PaymentAuth(counting)
    async with recorder.client(auth) as client:
        assert (await client.get("/paid")).status_code == 200
        assert counting.signed == 1
        # other method, other query, other path: each is unseen, so each goes out unpaid
        assert (await client.get("/free")).status_code == 200
        assert (await client.post("/paid", content=b"x")).status_code == 200
        assert (await client.get("/paid?page=2")).status_code == 200
    assert [entry for entry in recorder.seen[2:] if entry[2] is False] == [
        ("GET", "/free", False),
        ("POST", "/paid", False),
        ("GET", "/paid?page=2", False),
    ]
    assert counting.signed == 3  # the free route was never signed for
