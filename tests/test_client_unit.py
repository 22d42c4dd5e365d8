"""The payer (``x402.client``) against a tiny in-test paywall app that issues real 402s.

The app is a plain Starlette endpoint that speaks all three protocols through the wire functions of
``x402`` (no gateway): it answers 402 with x402 v2 (``PAYMENT-REQUIRED``), MPP (``WWW-Authenticate``) and
the x402 v1 body at once, and checks payments with ``verify_exact_payment`` / ``verify_mpp_authorization``.
The async client is ``httpx.AsyncClient`` over ``httpx.ASGITransport``; the sync one is ``httpx.Client`` over
a ten-line sync bridge to the same ASGI app: the same ``PaymentAuth`` object drives both.
"""

from __future__ import annotations

import asyncio
import json
import os
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from typing import Any

import httpx
import msgspec
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from x402 import (
    PROBLEM_BASE,
    LocalSigner,
    MalformedPayment,
    MppAuthorizationPayload,
    MppChallenge,
    MppReceipt,
    NoPayableOffer,
    PaymentRequired,
    PaymentRequirements,
    PaymentRequirementsV1,
    ProblemDetails,
    Reason,
    ResourceInfo,
    SettleResponse,
    SpendPolicyViolation,
    X402Error,
    b64url_encode,
    challenge_hash,
    challenge_id,
    convert_payload,
    decode_exact_payload,
    decode_payment_signature,
    decode_x_payment,
    encode_json_param,
    encode_payment_required,
    encode_payment_response,
    encode_problem,
    error_answer,
    find_matching_requirements,
    format_receipt,
    format_www_authenticate,
    parse_credential,
    requirements_from_v1,
    rfc3339,
    verify_challenge,
    verify_exact_payment,
    verify_mpp_authorization,
)
from x402.client import (
    ACCEPT_PAYMENT_HEADER,
    OFFER_EXTENSION,
    PAYMENT_ERROR_EXTENSION,
    RECEIPT_EXTENSION,
    Credential,
    Eip3009Wallet,
    Offer,
    PaymentAuth,
    SpendPolicy,
    offers_from_response,
    payment_headers,
    receipt_of,
)

CHAIN = 31337
TOKEN = "0x5FbDB2315678afecb367f032d93F642f64180aa3"
OTHER_TOKEN = "0xe7f1725E7734CE288F8367e1Bb143E90bb3F0512"
PAY_TO = "0x3C44CdDdB6a900fa2b585dd299e03d12FA4293BC"
DOMAIN_NAME, DOMAIN_VERSION = "USD Coin", "2"
SECRET = "client-test-secret-at-least-32-bytes-long"
REALM = "paywall.test"
KEY = "0x" + "ac" * 32


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


# ------------------------------------------------------------------------------------------ the paywall


@dataclass
class Paywall:
    """A paid endpoint, checking payments with the sans-I/O verifiers."""

    price: int = 1000
    offer_v2: bool = True
    offer_mpp: bool = True
    offer_v1: bool = True
    verify_domain_name: str = DOMAIN_NAME  # what the server believes the token's domain is
    strict: bool = False  # MPP: take the spec's challengeHash only (not pympp 0.16's too)
    hits: int = 0
    paid: list[str] = field(default_factory=list)  # protocol of each accepted payment
    nonces: list[str] = field(default_factory=list)
    accepted_seen: list[PaymentRequirements] = field(default_factory=list)
    bodies: list[bytes] = field(default_factory=list)
    mpp_payloads: list[dict[str, Any]] = field(default_factory=list)  # raw credential payloads, as sent
    accept_payment: list[str | None] = field(default_factory=list)  # Accept-Payment of every request
    lock: threading.Lock = field(default_factory=threading.Lock)
    pending: int = 0  # answer this many paid requests `settlement_pending` before accepting one
    retry_after: str = "0"
    pending_nonces: list[str] = field(default_factory=list)  # nonces answered `settlement_pending`

    def requirements(self, url: str) -> PaymentRequirements:
        return PaymentRequirements(
            scheme="exact",
            network=f"eip155:{CHAIN}",
            asset=TOKEN,
            amount=str(self.price),
            pay_to=PAY_TO,
            max_timeout_seconds=60,
            extra={"name": self.verify_domain_name, "version": DOMAIN_VERSION},
        )

    def requirements_v1(self, url: str) -> PaymentRequirementsV1:
        r = self.requirements(url)
        return PaymentRequirementsV1(
            scheme="exact",
            network="localhost",
            max_amount_required=r.amount,
            resource=url,
            description="paid test resource",
            mime_type="application/json",
            pay_to=r.pay_to,
            max_timeout_seconds=r.max_timeout_seconds,
            asset=r.asset,
            extra=r.extra,
        )

    def challenge(self) -> MppChallenge:
        request = encode_json_param(
            {
                "amount": str(self.price),
                "currency": TOKEN,
                "recipient": PAY_TO,
                "methodDetails": {"chainId": CHAIN, "credentialTypes": ["authorization"], "decimals": 6},
            }
        )
        expires = rfc3339(time.time() + 300)
        # A random opaque makes every challenge unique; without it two challenges issued in the same second
        # would share an id, hence an EIP-3009 nonce, and the second payment would be a replay.
        opaque = encode_json_param({"nonce": os.urandom(8).hex()})
        cid = challenge_id(SECRET, REALM, "evm", "charge", request, expires, None, opaque)
        return MppChallenge(
            id=cid,
            realm=REALM,
            method="evm",
            intent="charge",
            request=request,
            expires=expires,
            opaque=opaque,
        )

    def payment_required(self, url: str, error: X402Error | None = None) -> Response:
        headers: dict[str, str] = {"Cache-Control": "no-store"}
        if self.offer_v2:
            headers["PAYMENT-REQUIRED"] = encode_payment_required(
                PaymentRequired(
                    error=error.message if error else "PAYMENT-SIGNATURE header is required",
                    resource=ResourceInfo(url=url),
                    accepts=[self.requirements(url)],
                )
            )
        if self.offer_mpp:
            headers["WWW-Authenticate"] = format_www_authenticate(self.challenge())
        answer = error_answer(error) if error else None
        problem = ProblemDetails(
            type=answer.problem_type if answer else PROBLEM_BASE + "payment-required",
            title=answer.title if answer else "Payment Required",
            status=402,
            detail=error.message if error else "Payment is required.",
            invalid_reason=error.code if error else None,
            x402_version=1 if self.offer_v1 else None,
            error="X-PAYMENT header is required" if self.offer_v1 else None,
            accepts=[self.requirements_v1(url)] if self.offer_v1 else None,
        )
        return Response(
            encode_problem(problem), status_code=402, headers=headers, media_type="application/problem+json"
        )

    def _claim(self, nonce: str) -> None:
        with self.lock:
            if nonce in self.nonces:
                raise X402Error("replay", code=Reason.NONCE_ALREADY_USED, status_hint=402)
            self.nonces.append(nonce)

    async def endpoint(self, request: Request) -> Response:
        self.hits += 1
        url = str(request.url)
        body = await request.body()
        h = request.headers
        self.accept_payment.append(h.get("accept-payment"))
        try:
            if "payment-signature" in h:
                payment = decode_payment_signature(h["payment-signature"])
                offered = find_matching_requirements(payment.accepted, [self.requirements(url)])
                if offered is None:
                    raise X402Error(
                        "no such offer", code=Reason.INVALID_PAYMENT_REQUIREMENTS, status_hint=402
                    )
                exact = decode_exact_payload(payment.payload)
                payer = verify_exact_payment(offered, exact, accepted=payment.accepted)
                if self.pending > 0:  # the settlement outlasted the server's wait: come back later
                    self.pending -= 1
                    self.pending_nonces.append(exact.authorization.nonce)
                    answer = self.payment_required(
                        url, X402Error("still settling", code=Reason.SETTLEMENT_PENDING, status_hint=402)
                    )
                    answer.headers["Retry-After"] = self.retry_after
                    return answer
                self._claim(exact.authorization.nonce)
                self.accepted_seen.append(payment.accepted)
                receipt = {"PAYMENT-RESPONSE": self._settle(payer)}
                protocol = "x402v2"
            elif "x-payment" in h:
                payment_v1 = decode_x_payment(h["x-payment"])
                exact = decode_exact_payload(payment_v1.payload)
                payer = verify_exact_payment(requirements_from_v1(self.requirements_v1(url)), exact)
                self._claim(exact.authorization.nonce)
                receipt = {"X-PAYMENT-RESPONSE": self._settle(payer)}
                protocol = "x402v1"
            elif h.get("authorization", "").lower().startswith("payment "):
                credential = parse_credential(h["authorization"])
                self.mpp_payloads.append(credential.payload)
                if not verify_challenge(SECRET, credential.challenge):
                    raise X402Error(
                        "challenge not issued here", code=Reason.INVALID_CHALLENGE, status_hint=402
                    )
                payload = convert_payload(credential.payload, MppAuthorizationPayload)
                verify_mpp_authorization(
                    credential.challenge,
                    payload,
                    token_name=self.verify_domain_name,
                    token_version=DOMAIN_VERSION,
                    strict=self.strict,
                )
                self._claim(payload.nonce)
                mpp = MppReceipt(
                    method="evm",
                    timestamp=rfc3339(time.time()),
                    reference="0x" + "ee" * 32,
                    challenge_id=credential.challenge.id,
                    chain_id=CHAIN,
                )
                receipt = {"Payment-Receipt": format_receipt(mpp)}
                protocol = "mpp"
            else:
                return self.payment_required(url)
        except X402Error as exc:
            return self.payment_required(url, exc)
        self.paid.append(protocol)
        self.bodies.append(body)
        return JSONResponse(
            {"ok": True, "body": body.decode()}, headers={**receipt, "Cache-Control": "private"}
        )

    def _settle(self, payer: str) -> str:
        return encode_payment_response(
            SettleResponse(success=True, payer=payer, transaction="0x" + "aa" * 32, network=f"eip155:{CHAIN}")
        )

    def app(self) -> Starlette:
        async def free(request: Request) -> Response:
            return JSONResponse({"free": True})

        async def bare_402(request: Request) -> Response:
            return Response(b"pay me somehow", status_code=402)

        return Starlette(
            routes=[
                Route("/paid", self.endpoint, methods=["GET", "POST"]),
                Route("/free", free),
                Route("/bare", bare_402),
            ]
        )


def wallet(**kwargs: Any) -> Eip3009Wallet:
    return Eip3009Wallet(LocalSigner(KEY), CHAIN, {TOKEN: (DOMAIN_NAME, DOMAIN_VERSION)}, **kwargs)


class CountingWallet:
    """Wraps a wallet and counts signatures (to prove refusals happen before signing)."""

    def __init__(self, inner: Eip3009Wallet) -> None:
        self.inner = inner
        self.signed = 0

    def can_pay(self, offer: Offer) -> bool:
        return self.inner.can_pay(offer)

    def pay(self, offer: Offer) -> Credential:
        self.signed += 1
        return self.inner.pay(offer)


@pytest.fixture
def paywall() -> Paywall:
    return Paywall()


class SyncASGITransport(httpx.BaseTransport):
    """Runs each request through ``httpx.ASGITransport`` on a private event loop (sync bridge for tests)."""

    def __init__(self, app: Starlette) -> None:
        self._inner = httpx.ASGITransport(app=app)

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        async def send() -> httpx.Response:
            response = await self._inner.handle_async_request(request)
            body = await response.aread()
            return httpx.Response(response.status_code, headers=response.headers, content=body)

        request.read()
        return asyncio.run(send())


def sync_client_for(paywall: Paywall) -> httpx.Client:
    return httpx.Client(transport=SyncASGITransport(paywall.app()), base_url="http://paywall.test")


@pytest.fixture
def sync_client(paywall: Paywall) -> Iterator[httpx.Client]:
    with sync_client_for(paywall) as client:
        yield client


def async_client(paywall: Paywall, auth: PaymentAuth) -> httpx.AsyncClient:
    return httpx.AsyncClient(
        transport=httpx.ASGITransport(app=paywall.app()), base_url="http://paywall.test", auth=auth
    )


# ------------------------------------------------------------------------------------------- happy paths


def test_sync_client_pays_x402_v2_by_default(paywall: Paywall, sync_client: httpx.Client) -> None:
    policy = SpendPolicy(max_per_call=5000, total_budget=10_000)
    auth = PaymentAuth(wallet(), policy=policy)
    response = sync_client.get("/paid", auth=auth)
    assert response.status_code == 200 and response.json()["ok"]
    assert paywall.paid == ["x402v2"] and paywall.hits == 2
    receipt = receipt_of(response)
    assert isinstance(receipt, SettleResponse) and receipt.success
    assert receipt.payer == LocalSigner(KEY).address
    assert response.extensions[RECEIPT_EXTENSION] == receipt
    assert response.extensions[OFFER_EXTENSION].protocol == "x402v2"
    # `accepted` is echoed as offered
    assert paywall.accepted_seen == [paywall.requirements("http://paywall.test/paid")]
    assert policy.spent == 1000 and policy.reserved == 0 and policy.spent_with(PAY_TO) == 1000


@pytest.mark.anyio
async def test_async_client_uses_the_same_auth(paywall: Paywall) -> None:
    auth = PaymentAuth(wallet(), policy=SpendPolicy(total_budget=10_000))
    async with async_client(paywall, auth) as client:
        response = await client.get("/paid")
        assert response.status_code == 200
        assert isinstance(receipt_of(response), SettleResponse)
        free = await client.get("/free")
        assert free.status_code == 200 and RECEIPT_EXTENSION not in free.extensions
    assert paywall.paid == ["x402v2"]


@pytest.mark.parametrize(
    "prefer,offers,expected",
    [
        (("mpp", "x402v2", "x402v1"), {}, "mpp"),
        (("x402v1",), {}, "x402v1"),
        (("x402v2", "mpp", "x402v1"), {"offer_v2": False}, "mpp"),
        (("x402v2", "mpp", "x402v1"), {"offer_v2": False, "offer_mpp": False}, "x402v1"),
        (("x402v1", "mpp"), {"offer_v1": False}, "mpp"),
    ],
)
def test_protocol_preference(prefer: tuple[Any, ...], offers: dict[str, bool], expected: str) -> None:
    paywall = Paywall(**offers)  # type: ignore[arg-type]
    with sync_client_for(paywall) as client:
        response = client.get("/paid", auth=PaymentAuth(wallet(), prefer=prefer))
    assert response.status_code == 200, response.text
    assert paywall.paid == [expected]
    receipt = receipt_of(response)
    assert isinstance(receipt, MppReceipt if expected == "mpp" else SettleResponse)


def test_mpp_credential_binds_the_challenge(paywall: Paywall, sync_client: httpx.Client) -> None:
    response = sync_client.get("/paid", auth=PaymentAuth(wallet(), prefer=("mpp",)))
    assert response.status_code == 200
    receipt = receipt_of(response)
    assert isinstance(receipt, MppReceipt) and receipt.status == "success" and receipt.chain_id == CHAIN
    (nonce,) = paywall.nonces
    assert receipt.challenge_id is not None
    assert nonce == "0x" + challenge_hash(receipt.challenge_id, REALM).hex()


def test_post_body_is_replayed_on_the_paid_retry(paywall: Paywall, sync_client: httpx.Client) -> None:
    response = sync_client.post("/paid", content=b'{"q":"weather"}', auth=PaymentAuth(wallet()))
    assert response.status_code == 200 and response.json()["body"] == '{"q":"weather"}'
    assert paywall.bodies == [b'{"q":"weather"}']


def test_free_and_unrecognised_402_pass_through(sync_client: httpx.Client) -> None:
    auth = PaymentAuth(wallet())
    assert sync_client.get("/free", auth=auth).json() == {"free": True}
    bare = sync_client.get("/bare", auth=auth)
    assert bare.status_code == 402 and bare.content == b"pay me somehow"
    assert auth.policy.spent == 0


# ------------------------------------------------------------------------------------------ refusals


@pytest.mark.parametrize(
    "policy",
    [
        SpendPolicy(max_per_call=999),
        SpendPolicy(total_budget=999),
        SpendPolicy(per_payee_budget=999),
        SpendPolicy(per_payee_budget={PAY_TO.lower(): 999}),
        SpendPolicy(allowed_assets=[OTHER_TOKEN]),
        SpendPolicy(allowed_payees=["0x" + "11" * 20]),
        SpendPolicy(allowed_networks=["eip155:1"]),
    ],
)
def test_policy_refuses_before_anything_is_signed(
    paywall: Paywall, sync_client: httpx.Client, policy: SpendPolicy
) -> None:
    counting = CountingWallet(wallet())
    with pytest.raises(SpendPolicyViolation) as info:
        sync_client.get("/paid", auth=PaymentAuth(counting, policy=policy))
    assert info.value.code == "spend_policy_violation"
    assert counting.signed == 0 and paywall.hits == 1 and paywall.paid == []
    assert policy.spent == 0 and policy.reserved == 0


def test_budget_runs_out_after_some_calls(paywall: Paywall, sync_client: httpx.Client) -> None:
    policy = SpendPolicy(total_budget=2500)
    auth = PaymentAuth(wallet(), policy=policy)
    assert sync_client.get("/paid", auth=auth).status_code == 200
    assert sync_client.get("/paid", auth=auth).status_code == 200
    with pytest.raises(SpendPolicyViolation, match="total budget"):
        sync_client.get("/paid", auth=auth)
    assert policy.spent == 2000 and paywall.paid == ["x402v2", "x402v2"]


def test_per_payee_mapping_leaves_other_payees_alone() -> None:
    policy = SpendPolicy(per_payee_budget={"0x" + "11" * 20: 1})
    offer = Offer(
        protocol="x402v2", scheme="exact", network="eip155:1", asset=TOKEN, amount=10**9, pay_to=PAY_TO
    )
    policy.reserve(offer).commit()
    assert policy.spent == 10**9


def test_no_payable_offer(paywall: Paywall, sync_client: httpx.Client) -> None:
    other_chain = Eip3009Wallet(LocalSigner(KEY), 1, {TOKEN: (DOMAIN_NAME, DOMAIN_VERSION)})
    with pytest.raises(NoPayableOffer):
        sync_client.get("/paid", auth=PaymentAuth(other_chain))
    other_token = Eip3009Wallet(LocalSigner(KEY), CHAIN, {OTHER_TOKEN: (DOMAIN_NAME, DOMAIN_VERSION)})
    with pytest.raises(NoPayableOffer):
        sync_client.get("/paid", auth=PaymentAuth(other_token))
    # the offer names another EIP-712 domain than the token's: do not sign for it
    wrong_domain = Eip3009Wallet(LocalSigner(KEY), CHAIN, {TOKEN: ("Tether", "1")})
    with pytest.raises(NoPayableOffer):
        sync_client.get("/paid", auth=PaymentAuth(wrong_domain, prefer=("x402v2", "x402v1")))
    assert paywall.paid == []


def test_refused_payment_releases_the_budget_and_returns_the_402(
    paywall: Paywall, sync_client: httpx.Client
) -> None:
    """The paid retry gets a 402 again: no exception, the server's answer is returned, the reservation is
    released, and the refusal is attached to the response."""
    # The wallet believes the token's EIP-712 version is "999": the server cannot verify its signature.
    lying = Eip3009Wallet(LocalSigner(KEY), CHAIN, {TOKEN: (DOMAIN_NAME, "999")})
    policy = SpendPolicy(total_budget=10_000)
    counting = CountingWallet(lying)
    refused = sync_client.get("/paid", auth=PaymentAuth(counting, policy=policy))
    assert refused.status_code == 402 and counting.signed == 1 and paywall.hits == 2  # retried once only
    assert policy.spent == 0 and policy.reserved == 0
    problem = refused.extensions[PAYMENT_ERROR_EXTENSION]
    assert isinstance(problem, ProblemDetails)
    assert problem.type == PROBLEM_BASE + "verification-failed"
    assert problem.invalid_reason == Reason.SIGNATURE
    assert receipt_of(refused) is None and paywall.paid == []
    assert refused.headers["WWW-Authenticate"].startswith("Payment ")  # a fresh challenge came back


def test_pympp_compat_wallet_pays_a_default_server_and_not_a_strict_one(
    paywall: Paywall, sync_client: httpx.Client
) -> None:
    policy = SpendPolicy()
    auth = PaymentAuth(wallet(pympp_compat=True), policy=policy, prefer=("mpp",))
    assert sync_client.get("/paid", auth=auth).status_code == 200
    assert paywall.paid == ["mpp"] and policy.spent == 1000
    paywall.strict = True
    response = sync_client.get("/paid", auth=auth)
    assert response.status_code == 402
    problem = response.extensions[PAYMENT_ERROR_EXTENSION]
    assert problem.type == PROBLEM_BASE + "invalid-challenge"
    assert problem.invalid_reason == Reason.CHALLENGE_BINDING_MISMATCH
    assert policy.spent == 1000 and policy.reserved == 0


@pytest.mark.parametrize(
    "receipt",
    [
        {"method": "evm", "reference": "0x01", "timestamp": "2026-01-01T00:00:00Z"},  # no status
        {"method": "evm", "reference": "0x01", "status": "success", "timestamp": "yesterday"},
        {"method": "evm", "reference": "0x01", "status": "success", "timestamp": "2026-01-01T00:00:00"},
    ],
)
def test_a_receipt_that_is_not_to_the_letter_is_a_typed_error(receipt: dict[str, Any]) -> None:
    """Issue 9 item 16: such a Payment-Receipt used to read as a success."""
    value = b64url_encode(json.dumps(receipt).encode())
    response = httpx.Response(200, headers={"Payment-Receipt": value, "Cache-Control": "private"})
    with pytest.raises(MalformedPayment) as info:
        receipt_of(response)
    assert info.value.code == Reason.INVALID_PAYLOAD


# ------------------------------------------------------------------------------------------- remember


def test_remember_pays_up_front(paywall: Paywall, sync_client: httpx.Client) -> None:
    policy = SpendPolicy()
    auth = PaymentAuth(wallet(), policy=policy, remember=True)
    assert sync_client.get("/paid", auth=auth).status_code == 200
    assert paywall.hits == 2
    assert sync_client.get("/paid", auth=auth).status_code == 200
    assert paywall.hits == 3  # no 402 round trip the second time
    assert sync_client.get("/paid?x=1", auth=auth).status_code == 200
    assert paywall.hits == 5  # another URL is another entry
    assert policy.spent == 3000 and len(set(paywall.nonces)) == 3

    # The price changed: the remembered payment is refused, the fresh 402 is paid, the memory updated.
    paywall.price = 2000
    response = sync_client.get("/paid", auth=auth)
    assert response.status_code == 200 and paywall.hits == 7
    assert policy.spent == 5000 and policy.reserved == 0
    assert sync_client.get("/paid", auth=auth).status_code == 200 and paywall.hits == 8


def test_remember_does_not_reuse_mpp_challenges(paywall: Paywall, sync_client: httpx.Client) -> None:
    auth = PaymentAuth(wallet(), prefer=("mpp",), remember=True)
    assert sync_client.get("/paid", auth=auth).status_code == 200
    assert sync_client.get("/paid", auth=auth).status_code == 200
    assert paywall.hits == 4 and paywall.paid == ["mpp", "mpp"]


# ---------------------------------------------------------------------------------------- concurrency


@pytest.mark.anyio
async def test_fifty_concurrent_calls_use_fifty_nonces(paywall: Paywall) -> None:
    policy = SpendPolicy(total_budget=50 * paywall.price)
    auth = PaymentAuth(wallet(), policy=policy)
    async with async_client(paywall, auth) as client:
        responses = await asyncio.gather(*(client.get("/paid") for _ in range(50)))
    assert [r.status_code for r in responses] == [200] * 50
    assert len(paywall.nonces) == 50 and len(set(paywall.nonces)) == 50
    assert policy.spent == 50 * paywall.price and policy.reserved == 0


@pytest.mark.anyio
async def test_concurrent_calls_never_exceed_the_budget(paywall: Paywall) -> None:
    policy = SpendPolicy(total_budget=20 * paywall.price)
    auth = PaymentAuth(wallet(), policy=policy)
    async with async_client(paywall, auth) as client:
        results = await asyncio.gather(*(client.get("/paid") for _ in range(50)), return_exceptions=True)
    ok = [r for r in results if isinstance(r, httpx.Response) and r.status_code == 200]
    refused = [r for r in results if isinstance(r, SpendPolicyViolation)]
    assert len(ok) == 20 and len(refused) == 30
    assert policy.spent == 20 * paywall.price and policy.reserved == 0
    assert len(set(paywall.nonces)) == 20


def test_threads_never_exceed_the_budget() -> None:
    policy = SpendPolicy(total_budget=10_000, per_payee_budget=7_000)
    offer = Offer(
        protocol="x402v2", scheme="exact", network="eip155:1", asset=TOKEN, amount=100, pay_to=PAY_TO
    )
    granted: list[int] = []
    barrier = threading.Barrier(50)

    def worker() -> None:
        barrier.wait()
        for _ in range(10):
            try:
                reservation = policy.reserve(offer)
            except SpendPolicyViolation:
                continue
            granted.append(1)
            reservation.commit()

    threads = [threading.Thread(target=worker) for _ in range(50)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sum(granted) == 70 and policy.spent == 7_000


def test_reservation_commit_and_release_are_idempotent() -> None:
    policy = SpendPolicy(total_budget=100)
    offer = Offer(
        protocol="mpp", scheme="evm/charge", network="eip155:1", asset=TOKEN, amount=60, pay_to=PAY_TO
    )
    first = policy.reserve(offer)
    with pytest.raises(SpendPolicyViolation):
        policy.reserve(offer)
    first.release()
    first.release()
    first.commit()  # too late: already released
    assert policy.reserved == 0 and policy.spent == 0
    second = policy.reserve(offer)
    second.commit()
    second.release()
    assert policy.spent == 60 and policy.reserved == 0


# ------------------------------------------------------------------------------------------ the offers


def test_offers_from_a_402_response(paywall: Paywall, sync_client: httpx.Client) -> None:
    response = sync_client.get("/paid")
    assert response.status_code == 402
    offers = offers_from_response(response)
    assert [o.protocol for o in offers] == ["x402v2", "mpp", "x402v1"]
    for offer in offers:
        assert (offer.network, offer.asset, offer.amount, offer.pay_to) == (
            f"eip155:{CHAIN}",
            TOKEN,
            1000,
            PAY_TO,
        )
        assert offer.chain_id == CHAIN
    assert offers[1].scheme == "evm/charge" and offers[1].challenge is not None
    assert offers[2].requirements_v1 is not None and offers[2].requirements_v1.network == "localhost"
    assert all(wallet().can_pay(o) for o in offers)


def test_broken_parts_of_a_402_do_not_hide_the_rest() -> None:
    good = Paywall().challenge()
    headers = [
        ("PAYMENT-REQUIRED", "%%%not base64%%%"),
        ("WWW-Authenticate", 'Payment id="", realm="x", method="evm", intent="charge", request="e30"'),
        ("WWW-Authenticate", "Bearer realm=api, " + format_www_authenticate(good)),
    ]
    response = httpx.Response(402, headers=headers, content=b'{"x402Version": 3}')
    offers = offers_from_response(response)
    assert [o.protocol for o in offers] == ["mpp"]


def test_payment_auth_drives_by_hand() -> None:
    """The generator alone, as httpx's own auth tests do: no transport at all."""
    paywall = Paywall(offer_mpp=False, offer_v1=False)
    auth = PaymentAuth(wallet())
    request = httpx.Request("GET", "http://paywall.test/paid")
    flow = auth.sync_auth_flow(request)
    first = next(flow)
    assert "PAYMENT-SIGNATURE" not in first.headers
    challenge = httpx.Response(
        402,
        headers={"PAYMENT-REQUIRED": encode_payment_required(
            PaymentRequired(accepts=[paywall.requirements("http://paywall.test/paid")]))},
        request=first,
    )  # fmt: skip
    retry = flow.send(challenge)
    payment = decode_payment_signature(retry.headers["PAYMENT-SIGNATURE"])
    assert payment.accepted == paywall.requirements("http://paywall.test/paid")
    exact = decode_exact_payload(payment.payload)
    assert verify_exact_payment(payment.accepted, exact) == LocalSigner(KEY).address
    ok = httpx.Response(
        200, headers={"PAYMENT-RESPONSE": paywall._settle(exact.authorization.from_)}, request=retry
    )
    with pytest.raises(StopIteration):
        flow.send(ok)
    assert isinstance(ok.extensions[RECEIPT_EXTENSION], SettleResponse)


def test_receipt_of_reads_headers_and_reports_garbage() -> None:
    assert receipt_of(httpx.Response(200)) is None
    with pytest.raises(MalformedPayment):
        receipt_of(httpx.Response(200, headers={"PAYMENT-RESPONSE": "!!"}))
    mpp = MppReceipt(method="evm", timestamp="2026-01-01T00:00:00Z", reference="0x01")
    assert receipt_of(httpx.Response(200, headers={"Payment-Receipt": format_receipt(mpp)})) == mpp


def test_wallet_payload_shapes() -> None:
    paywall = Paywall()
    answer = paywall.payment_required("http://paywall.test/paid")
    offers = offers_from_response(
        httpx.Response(402, headers=list(answer.headers.items()), content=bytes(answer.body))
    )
    w = wallet()
    x402_payload = w.pay(offers[0])
    assert set(x402_payload.payload) == {"signature", "authorization"} and x402_payload.source is None
    mpp_payload = w.pay(offers[1])
    assert mpp_payload.payload["type"] == "authorization"
    assert mpp_payload.source == f"did:pkh:eip155:{CHAIN}:{LocalSigner(KEY).address}"
    flat = msgspec.convert(dict(mpp_payload.payload), MppAuthorizationPayload)
    assert offers[1].challenge is not None
    expires = offers[1].challenge.expires_at()
    assert expires is not None and int(flat.valid_before) == int(expires.timestamp())


def test_wallet_declines_other_transfer_methods_and_schemes() -> None:
    paywall = Paywall(offer_mpp=False, offer_v1=False)
    req = paywall.requirements("http://x/paid")
    base = Offer(
        protocol="x402v2", scheme="exact", network=f"eip155:{CHAIN}", asset=TOKEN, amount=1, pay_to=PAY_TO,
        extra=req.extra, requirements=req,
    )  # fmt: skip
    w = wallet()
    assert w.can_pay(base)
    assert not w.can_pay(replace(base, extra={**req.extra, "assetTransferMethod": "permit2"}))
    assert w.can_pay(replace(base, extra={**req.extra, "assetTransferMethod": "eip3009"}))
    assert not w.can_pay(replace(base, scheme="upto"))
    assert not w.can_pay(replace(base, asset=OTHER_TOKEN))
    assert not w.can_pay(replace(base, network="eip155:1"))


def test_mpp_credential_goes_in_the_header_the_challenge_names() -> None:
    challenge = msgspec.structs.replace(Paywall().challenge(), header="Payment-Authorization")
    offer = Offer(
        protocol="mpp", scheme="evm/charge", network=f"eip155:{CHAIN}", asset=TOKEN, amount=1000,
        pay_to=PAY_TO, challenge=challenge, request=challenge.request_json(),
    )  # fmt: skip
    headers = payment_headers(offer, wallet().pay(offer))
    assert list(headers) == ["Payment-Authorization"]
    credential = parse_credential(headers["Payment-Authorization"])
    assert credential.challenge == challenge  # echoed unchanged, header included


# ------------------------------------------------------------------------ what goes on the wire, exactly


def test_mpp_credential_on_the_wire_names_its_type(paywall: Paywall, sync_client: httpx.Client) -> None:
    """The ``payload`` the server decodes out of ``Authorization: Payment`` carries ``"type":
    "authorization"`` (draft-evm-charge-00 tells credential kinds apart by it), with every other member."""
    for compat in (False, True):
        sync_client.get("/paid", auth=PaymentAuth(wallet(pympp_compat=compat), prefer=("mpp",)))
    assert len(paywall.mpp_payloads) == 2  # both read (and, by default, both paid)
    for raw in paywall.mpp_payloads:
        assert raw["type"] == "authorization"
        assert set(raw) == {"type", "from", "to", "value", "validAfter", "validBefore", "nonce", "signature"}
    # and the type survives the typed decode and re-encode
    typed = convert_payload(paywall.mpp_payloads[0], MppAuthorizationPayload)
    assert msgspec.to_builtins(typed)["type"] == "authorization"


def test_accept_payment_names_what_the_wallet_pays(paywall: Paywall, sync_client: httpx.Client) -> None:
    assert Eip3009Wallet.mpp_methods == ("evm/charge",)
    sync_client.get("/paid", auth=PaymentAuth(wallet()))
    assert paywall.accept_payment == ["evm/charge", "evm/charge"]  # the first request and the paid retry


def test_accept_payment_is_left_alone_or_off_when_it_should_be(
    paywall: Paywall, sync_client: httpx.Client
) -> None:
    # the caller's own value wins
    sync_client.get("/paid", auth=PaymentAuth(wallet()), headers={ACCEPT_PAYMENT_HEADER: "tempo/charge"})
    assert paywall.accept_payment == ["tempo/charge"] * 2
    # MPP not wanted, switched off, or a wallet that does not say what it pays: no header
    for auth in (
        PaymentAuth(wallet(), prefer=("x402v2", "x402v1")),
        PaymentAuth(wallet(), accept_payment=False),
        PaymentAuth(CountingWallet(wallet())),
    ):
        paywall.accept_payment.clear()
        assert sync_client.get("/paid", auth=auth).status_code == 200
        assert paywall.accept_payment == [None, None]


class RankedWallet(CountingWallet):
    """Prefers x402 v1 over everything: the wallet's rank comes before the protocol preference."""

    def rank(self, offer: Offer) -> int:
        return 0 if offer.protocol == "x402v1" else 1


def test_wallet_rank_comes_before_protocol_preference(paywall: Paywall, sync_client: httpx.Client) -> None:
    response = sync_client.get("/paid", auth=PaymentAuth(RankedWallet(wallet())))
    assert response.status_code == 200 and paywall.paid == ["x402v1"]
    # ties keep the protocol preference; protocols outside `prefer` stay out whatever the rank
    auth = PaymentAuth(RankedWallet(wallet()), prefer=("mpp", "x402v2"))
    response = sync_client.get("/paid", auth=auth)
    assert response.status_code == 200 and paywall.paid == ["x402v1", "mpp"]


# ------------------------------------------------------------------------- settlement pending (issue 9/17)


def test_a_pending_settlement_is_retried_with_the_same_credential(paywall: Paywall) -> None:
    paywall.pending = 2
    policy = SpendPolicy(max_per_call=1000)
    with httpx.Client(
        transport=SyncASGITransport(paywall.app()),
        base_url="http://paywall.test",
        auth=PaymentAuth(wallet(), policy, prefer=("x402v2",)),
    ) as client:
        response = client.get("/paid")
    assert response.status_code == 200 and receipt_of(response) is not None
    # One 402 challenge, then the one signed payment three times: never signed (or paid) twice.
    assert paywall.hits == 4 and len(paywall.nonces) == 1
    assert paywall.pending_nonces == paywall.nonces * 2
    assert policy.spent == 1000 and policy.reserved == 0


@pytest.mark.anyio
async def test_pending_retries_are_bounded_and_honour_retry_after(paywall: Paywall) -> None:
    paywall.pending, paywall.retry_after = 10, "0.2"
    policy = SpendPolicy(max_per_call=1000)
    auth = PaymentAuth(wallet(), policy, prefer=("x402v2",), settlement_retries=2)
    started = time.monotonic()
    async with async_client(paywall, auth) as client:
        response = await client.get("/paid")
    assert time.monotonic() - started >= 0.4  # two waits of Retry-After
    assert response.status_code == 402
    error = response.extensions[PAYMENT_ERROR_EXTENSION]
    assert error.invalid_reason == Reason.SETTLEMENT_PENDING
    assert paywall.hits == 4 and len(set(paywall.pending_nonces)) == 1 and paywall.nonces == []
    assert policy.spent == 0 and policy.reserved == 0  # not served: the reservation is released
