"""Usage pricing and session vouchers, without a chain: what is charged never exceeds what was signed."""

from __future__ import annotations

import asyncio
from typing import Any

import httpx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from gateway import (
    Asset,
    ConfigurationError,
    ExactScheme,
    MemoryStore,
    PaidRoute,
    PaymentMiddleware,
    SessionProblem,
    Settlement,
    Verified,
    charge,
)
from gateway import Offer as Offer_
from gateway._channels import ChannelInfo
from gateway._metering import actual_charge, parse_override
from gateway._scheme import check_actual
from gateway._session import SessionPaywall
from gateway._session_state import Channel as _Channel
from tests.test_gateway_units import PAYEE, SECRET, USDC, StubChain
from x402 import (
    LocalSigner,
    PaymentPayload,
    PaymentRequirements,
    decode_payment_required,
    decode_payment_response,
    encode_payment_signature,
)
from x402._keccak import keccak256
from x402._session import SessionAction, channel_id, recover_voucher, sign_voucher, voucher_digest
from x402._signer import recover_hash
from x402.client import Credential, Offer, PaymentAuth, SpendPolicy

ESCROW = "0x" + "ab" * 20
CHANNEL = "0x" + "cd" * 32


def test_a_metered_route_is_never_offered_as_exact() -> None:
    with pytest.raises(ConfigurationError, match="exact"):
        PaymentMiddleware(
            Starlette(),
            routes={"GET /metered": PaidRoute(price="$0.01", metered=True)},
            schemes=[ExactScheme(StubChain())],
            pay_to=PAYEE,
            asset=USDC,
            secret=SECRET,
        )
    # a fixed-price route next to it is unaffected
    PaymentMiddleware(
        Starlette(),
        routes={"GET /fixed": PaidRoute(price="$0.01")},
        schemes=[ExactScheme(StubChain())],
        pay_to=PAYEE,
        asset=USDC,
        secret=SECRET,
    )


@given(maximum=st.integers(0, 10**30), reported=st.none() | st.integers(0, 10**31))
def test_the_charge_never_exceeds_the_maximum(maximum: int, reported: int | None) -> None:
    charged = actual_charge(maximum, reported)
    assert 0 <= charged <= maximum
    assert charged == (maximum if reported is None else min(reported, maximum))


def test_settlement_overrides_forms() -> None:
    assert parse_override('{"amount": "300"}', 10_000, 6) == 300
    assert parse_override('{"amount": "$0.0003"}', 10_000, 6) == 300
    assert parse_override('{"amount": "50%"}', 10_001, 6) == 5000  # floored
    for bad in (
        "nope",
        '{"amount": "-1"}',
        '{"amount": "1e3"}',
        '{"amount": "150%"}',
        "[]",
        '{"amount": true}',
    ):
        assert parse_override(bad, 10_000, 6) is None  # unreadable: the maximum is charged (and logged)


def test_spend_policy_reserves_the_maximum_and_commits_the_actual() -> None:
    policy = SpendPolicy(max_per_call=10_000, total_budget=20_000)
    offer = Offer(
        protocol="x402", scheme="upto", network="eip155:1", asset=ESCROW, amount=10_000, pay_to=PAYEE
    )
    held = policy.reserve(offer)
    assert policy.reserved == 10_000
    held.commit(300)
    assert (policy.spent, policy.reserved) == (300, 0)
    policy.reserve(offer).commit(10**9)  # a receipt claiming more than was held counts the maximum
    assert policy.spent == 10_300


def test_voucher_digest_and_channel_id_match_the_draft() -> None:
    # hashVoucher is checked against the contract by the chain tests; here the pieces are stable.
    signer = LocalSigner(b"\x01" * 32)
    signature = sign_voucher(signer, chain_id=1, escrow=ESCROW, channel=CHANNEL, cumulative=7)
    assert recover_voucher(chain_id=1, escrow=ESCROW, channel=CHANNEL, cumulative=7, signature=signature) == (
        signer.address
    )
    assert voucher_digest(1, ESCROW, CHANNEL, 7) != voucher_digest(2, ESCROW, CHANNEL, 7)
    cid = channel_id(
        payer=signer.address,
        payee=PAYEE,
        token=ESCROW,
        salt=CHANNEL,
        authorized_signer=PAYEE,
        escrow=ESCROW,
        chain_id=1,
    )
    assert cid.startswith("0x") and len(cid) == 66


class _NoChain:
    """The chain as the paywall sees it: read only for a voucher above the cached deposit (a top-up?)."""

    chain_id = 1
    escrow = ESCROW

    def __init__(self, info: ChannelInfo | None = None) -> None:
        self.info = info
        self.reads = 0

    async def channel(self, channel_id: str) -> ChannelInfo:
        if self.info is None:
            raise AssertionError("no chain call on the voucher path")
        self.reads += 1
        return self.info

    async def settle(
        self, channel_id: str, cumulative: int, signature: str, *, timeout: float = 30.0
    ) -> tuple[str, int]:
        raise AssertionError("not settled here")

    async def close(
        self, channel_id: str, cumulative: int, signature: str, *, timeout: float = 30.0
    ) -> tuple[str, int]:
        raise AssertionError("not settled here")


SESSION_KEY = LocalSigner(b"\x02" * 32)
STRANGER = LocalSigner(b"\x03" * 32)


@settings(max_examples=40, deadline=None)
@given(
    steps=st.lists(
        st.tuples(st.integers(0, 2_000), st.booleans(), st.sampled_from([1, 2])), min_size=1, max_size=12
    )
)
def test_vouchers_accepted_are_monotonic_signed_and_within_the_deposit(
    steps: list[tuple[int, bool, int]],
) -> None:
    deposit = 1_000

    async def run() -> None:
        store = MemoryStore()
        info = ChannelInfo(
            payer=PAYEE,
            payee=PAYEE,
            token=ESCROW,
            authorized_signer=SESSION_KEY.address,
            deposit=deposit,
            settled=0,
        )
        chain = _NoChain(info)
        paywall = SessionPaywall(
            Starlette(),
            routes={},
            chain=chain,
            asset=Asset(address=ESCROW, chain_id=1, name="USDC", version="2"),
            pay_to=PAYEE,
            store=store,
            secret=SECRET,
        )
        info = ChannelInfo(
            payer=PAYEE,
            payee=PAYEE,
            token=ESCROW,
            authorized_signer=SESSION_KEY.address,
            deposit=deposit,
            settled=0,
        )
        ch = _Channel(CHANNEL, info, 0, 0)
        for cumulative, honest, chain_id in steps:
            signer = SESSION_KEY if honest else STRANGER
            action = SessionAction(
                action="voucher",
                channel=CHANNEL,
                cumulative=cumulative,
                signature=sign_voucher(
                    signer, chain_id=chain_id, escrow=ESCROW, channel=CHANNEL, cumulative=cumulative
                ),
            )
            before = ch.accepted
            ok = honest and chain_id == 1 and (cumulative == before or before < cumulative <= deposit)
            async with ch.lock:
                if ok:
                    await paywall._accept(ch, action)
                else:
                    with pytest.raises(SessionProblem):
                        await paywall._accept(ch, action)
            assert ch.accepted == (max(before, cumulative) if ok else before)
            assert ch.accepted <= deposit
            assert await store.high_water(CHANNEL) == ch.accepted
        # the chain is read only to re-check the deposit for a signed voucher above it
        assert chain.reads <= sum(1 for c, honest, cid in steps if honest and cid == 1 and c > deposit)

    asyncio.run(run())


def test_an_unreachable_chain_answers_503_and_never_500() -> None:
    from escrow import Rpc
    from gateway import AgentChannelsChain, SessionRoute
    from x402 import MppCredential, format_credential

    async def run() -> None:
        rpc = Rpc("http://127.0.0.1:9", timeout=2.0)  # nothing listens on the discard port
        route = SessionRoute(unit_price=100)
        paywall = SessionPaywall(
            Starlette(),
            routes={"/x": route},
            chain=AgentChannelsChain(rpc, ESCROW, chain_id=1),
            asset=Asset(address=ESCROW, chain_id=1, name="USDC", version="2"),
            pay_to=PAYEE,
            store=MemoryStore(),
            secret=SECRET,
        )
        payload = {
            "action": "voucher",
            "channelId": CHANNEL,
            "cumulativeAmount": "100",
            "signature": sign_voucher(
                SESSION_KEY, chain_id=1, escrow=ESCROW, channel=CHANNEL, cumulative=100
            ),
        }
        credential = MppCredential(challenge=paywall.challenge(route), payload=payload)
        transport = httpx.ASGITransport(app=paywall)
        async with httpx.AsyncClient(transport=transport, base_url="http://svc") as http:
            r = await http.get("/x", headers={"authorization": "Payment " + format_credential(credential)})
            assert r.status_code == 503 and r.json()["type"].endswith("chain-unavailable"), r.text
            unpaid = await http.get("/x")
            assert unpaid.status_code == 402 and "www-authenticate" in unpaid.headers
        await rpc.aclose()

    asyncio.run(run())


class _SignedMaximum:
    """A minimal scheme that can settle for less (`Meters`): a payment is the payer's signature over
    (id, maximum); `settle(actual=)` records what it would pay. It stands in for `escrow`/`upto` here so
    that the pipeline's usage pricing is exercised without a chain; the chain paths have their own tests."""

    name = "signed-max"
    metered = True

    def __init__(self) -> None:
        self.settled: list[int] = []
        self.released = 0

    def offer(self, quote: Any) -> Offer_:
        requirements = PaymentRequirements(
            scheme=self.name,
            network=quote.asset.network,
            asset=quote.asset.address,
            amount=str(quote.amount),
            pay_to=quote.pay_to,
            max_timeout_seconds=quote.max_timeout_seconds,
        )
        return Offer_(scheme=self.name, requirements=requirements)

    async def verify(self, offer: Offer_, presented: Any, *, now: float) -> Verified:
        payload = presented.payload
        digest = keccak256(f"{payload['id']}:{offer.requirements.amount}".encode())
        payer = recover_hash(digest, bytes.fromhex(payload["signature"][2:]))
        return Verified(
            scheme=self.name,
            key=payload["id"],
            payer=payer,
            amount=int(offer.requirements.amount),
            network="eip155:1",
        )

    async def settle(self, verified: Verified, *, actual: int | None = None) -> str:
        amount = check_actual(verified, actual)
        if amount == 0:
            self.released += 1
            return ""
        self.settled.append(amount)
        return "0x" + "ab" * 32

    def settlement(self, verified: Verified, *, now: float, actual: int | None = None) -> Settlement:
        return Settlement(
            key=verified.key,
            kind=self.name,
            payload=b"",
            payer=verified.payer,
            amount=check_actual(verified, actual),
            created_at=now,
        )


@pytest.mark.parametrize(
    ("report", "charged"),
    [
        ("charge:300", 300),
        ("header:300", 300),
        ("header:$0.0004", 400),
        ("charge:0", 0),
        ("header:99999", 10_000),
    ],
)
def test_a_metered_route_settles_the_actual_charge(report: str, charged: int) -> None:
    scheme = _SignedMaximum()

    async def handler(request: Request) -> Response:
        how, _, amount = report.partition(":")
        if how == "charge":
            charge(request, int(amount))
            return JSONResponse({"ok": True})
        return JSONResponse({"ok": True}, headers={"Settlement-Overrides": f'{{"amount": "{amount}"}}'})

    app = PaymentMiddleware(
        Starlette(routes=[Route("/metered", handler)]),
        routes={"GET /metered": PaidRoute(price="$0.01", metered=True)},
        schemes=[ExactScheme(StubChain()), scheme],
        pay_to=PAYEE,
        asset=USDC,
        secret=SECRET,
        store=MemoryStore(),
    )
    payer = LocalSigner.random()

    async def run() -> None:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://svc") as http:
            challenge = await http.get("/metered")
            required = decode_payment_required(challenge.headers["payment-required"])
            assert [a.scheme for a in required.accepts] == ["signed-max"]  # never `exact`
            accepted = required.accepts[0]
            assert accepted.amount == "10000"
            signature = payer.sign_hash(keccak256(f"p1:{accepted.amount}".encode()))
            payment = PaymentPayload(
                accepted=accepted, payload={"id": "p1", "signature": "0x" + signature.hex()}
            )
            r = await http.get("/metered", headers={"payment-signature": encode_payment_signature(payment)})
            assert r.status_code == 200, r.text
            assert "settlement-overrides" not in r.headers
            receipt = decode_payment_response(r.headers["payment-response"])
            assert receipt.amount == str(charged)
            assert scheme.settled == ([charged] if charged else [])
            assert receipt.transaction == ("0x" + "ab" * 32 if charged else "")

    asyncio.run(run())


class _SignedMaxWallet:
    def __init__(self, signer: LocalSigner) -> None:
        self.signer = signer
        self.count = 0

    def can_pay(self, offer: Offer) -> bool:
        return offer.scheme == "signed-max"

    def pay(self, offer: Offer) -> Credential:
        self.count += 1
        key = f"p{self.count}-{self.signer.address}"
        signature = self.signer.sign_hash(keccak256(f"{key}:{offer.amount}".encode()))
        return Credential(payload={"id": key, "signature": "0x" + signature.hex()})


def test_the_client_policy_holds_the_maximum_and_spends_the_actual_charge() -> None:
    scheme = _SignedMaximum()

    async def handler(request: Request) -> Response:
        charge(request, "$0.0003")
        return JSONResponse({"ok": True})

    app = PaymentMiddleware(
        Starlette(routes=[Route("/metered", handler)]),
        routes={"GET /metered": PaidRoute(price="$0.01", metered=True)},
        schemes=[scheme],
        pay_to=PAYEE,
        asset=USDC,
        secret=SECRET,
        store=MemoryStore(),
    )
    policy = SpendPolicy(max_per_call="$0.01", total_budget="$0.02")

    async def run() -> None:
        auth = PaymentAuth(_SignedMaxWallet(LocalSigner.random()), policy)
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://svc", auth=auth) as http:
            for _ in range(3):  # three calls fit a $0.02 budget: each holds $0.01 but spends $0.0003
                assert (await http.get("/metered")).status_code == 200
        assert (policy.spent, policy.reserved) == (900, 0)
        assert scheme.settled == [300, 300, 300]

    asyncio.run(run())
