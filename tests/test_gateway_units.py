"""Gateway parts that need no chain: prices, routes, the state table, revert mapping, answers, config.

The middleware tests here run on a stub `ExactChain` that checks the signature locally (EOA only) and
"settles" without a transaction; the same flows on a real chain are in test_gateway_paid.py.
"""

from __future__ import annotations

import asyncio
import base64
import json
import time
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import pytest
from eth_abi.abi import decode as abi_decode
from eth_abi.abi import encode as abi_encode
from eth_utils.crypto import keccak
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import Message, Receive, Scope, Send

from escrow.payments._exact import SIMULATION_FAILED, ExactEvm, revert_reason
from gateway import (
    TERMINAL,
    TRANSITIONS,
    Asset,
    ConfigurationError,
    Event,
    ExactScheme,
    InvalidTransition,
    MemoryStore,
    PaidRoute,
    PaymentMiddleware,
    PaymentState,
    RouteTable,
    Tracker,
    to_atomic,
    v1_network,
)
from gateway._stores.sqlite import SQLiteStore
from x402 import (
    Eip712Domain,
    Eip3009Authorization,
    ExactEvmPayload,
    LocalSigner,
    PaymentPayload,
    PaymentRequirements,
    Reason,
    decode_payment_response,
    encode_payment_signature,
    encode_scheme_payload,
    recover_transfer_authorization,
    sign_transfer_authorization,
)

ASSET = "0x5FbDB2315678afecb367f032d93F642f64180aa3"
PAYEE = "0x3C44CdDdB6a900fa2b585dd299e03d12FA4293BC"
USDC = Asset(address=ASSET, chain_id=31337, name="USD Coin", version="2")
DOMAIN = Eip712Domain("USD Coin", "2", 31337, ASSET)
SECRET = b"unit-test-secret-of-at-least-32-bytes!!"


# ------------------------------------------------------------------------------------------ prices


@pytest.mark.parametrize(
    ("price", "atomic"),
    [
        (1000, 1000),
        ("$0.001", 1000),
        ("0.001", 1000),
        ("$1", 1_000_000),
        (Decimal("2.5"), 2_500_000),
        ("$0", 0),
    ],
)
def test_prices_convert_to_atomic_units(price: int | str | Decimal, atomic: int) -> None:
    assert to_atomic(price, 6) == atomic


@pytest.mark.parametrize("price", ["$0.0000001", "abc", "-1", "$NaN", "inf", -5, True])
def test_bad_prices_are_configuration_errors(price: object) -> None:
    with pytest.raises(ConfigurationError):
        to_atomic(price, 6)  # type: ignore[arg-type]


def test_route_table_matches_method_path_and_params() -> None:
    table = RouteTable(
        {"GET /items/{item_id}": 5, "/any": "$0.01", "POST /items": PaidRoute(price=7, pay_to=PAYEE.lower())},
        pay_to=PAYEE,
        asset=USDC,
    )

    def match(method: str, path: str) -> str | None:
        entry = table.match({"type": "http", "method": method, "path": path})
        return None if entry is None else entry.key

    assert match("GET", "/items/42") == "GET /items/{item_id}"
    assert match("POST", "/items/42") is None
    assert match("DELETE", "/any") == "/any"
    assert match("POST", "/items") == "POST /items"
    assert match("GET", "/nothing") is None


@pytest.mark.parametrize(
    ("kwargs", "fragment"),
    [
        ({"pay_to": None, "asset": USDC}, "pay_to"),
        ({"pay_to": "0x1234", "asset": USDC}, "pay_to"),
        ({"pay_to": PAYEE, "asset": None}, "asset"),
    ],
)
def test_route_table_refuses_incomplete_routes(kwargs: dict[str, object], fragment: str) -> None:
    with pytest.raises(ConfigurationError, match=fragment):
        RouteTable({"/x": 1}, **kwargs)  # type: ignore[arg-type]


# --------------------------------------------------------------------------------------- the table


def test_happy_paths_through_the_state_table() -> None:
    for last, final in ((Event.SETTLED, PaymentState.SETTLED), (Event.QUEUED, PaymentState.QUEUED)):
        tracker = Tracker()
        for event in (Event.VERIFIED, Event.CLAIMED, Event.SERVED, last):
            tracker.fire(event)
        assert tracker.state == final and tracker.terminal


@pytest.mark.parametrize(
    ("events", "final"),
    [
        ((Event.REJECTED,), PaymentState.REJECTED),
        ((Event.VERIFIED, Event.REPLAYED), PaymentState.REJECTED),
        ((Event.VERIFIED, Event.CLAIMED, Event.HANDLER_FAILED), PaymentState.RELEASED),
        ((Event.VERIFIED, Event.CLAIMED, Event.SERVED, Event.SETTLE_FAILED), PaymentState.FAILED),
    ],
)
def test_failure_paths_through_the_state_table(events: tuple[Event, ...], final: PaymentState) -> None:
    tracker = Tracker()
    for event in events:
        tracker.fire(event)
    assert tracker.state == final and tracker.terminal


def test_every_transition_not_in_the_table_is_refused() -> None:
    for state in PaymentState:
        for event in Event:
            tracker = Tracker()
            tracker.state = state
            if (state, event) in TRANSITIONS:
                assert tracker.fire(event) == TRANSITIONS[(state, event)]
            else:
                with pytest.raises(InvalidTransition):
                    tracker.fire(event)


def test_no_transition_leaves_a_terminal_state() -> None:
    assert not [state for state, _ in TRANSITIONS if state in TERMINAL]


# ----------------------------------------------------------------------------------- revert reasons


def _error_string(text: str) -> bytes:
    return keccak(text="Error(string)")[:4] + abi_encode(["string"], [text])


def _custom(signature: str, types: list[str], values: list[object]) -> bytes:
    return keccak(text=signature)[:4] + abi_encode(types, values)


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (_error_string("FiatTokenV2: authorization is used or canceled"), Reason.NONCE_ALREADY_USED),
        (_error_string("FiatTokenV2: authorization is not yet valid"), Reason.VALID_AFTER),
        (_error_string("FiatTokenV2: authorization is expired"), Reason.VALID_BEFORE),
        (_error_string("FiatTokenV2: invalid signature"), Reason.SIGNATURE),
        (_error_string("ERC20: transfer amount exceeds balance"), Reason.INSUFFICIENT_BALANCE),
        (_custom("ERC3009UsedAuthorization(address,bytes32)", ["address", "bytes32"], [PAYEE, b"\0" * 32]),
         Reason.NONCE_ALREADY_USED),
        (_custom("ERC3009InvalidSignature()", [], []), Reason.SIGNATURE),
        (_custom("ERC20InsufficientBalance(address,uint256,uint256)", ["address", "uint256", "uint256"],
                 [PAYEE, 1, 2]), Reason.INSUFFICIENT_BALANCE),
        (_custom("ERC3009InvalidAuthorizationTime(uint256,uint256)", ["uint256", "uint256"], [0, 100]),
         Reason.VALID_BEFORE),
        (_custom("ERC3009InvalidAuthorizationTime(uint256,uint256)", ["uint256", "uint256"], [2**40, 2**41]),
         Reason.VALID_AFTER),
        (b"", SIMULATION_FAILED),
        (b"\xde\xad\xbe\xef", SIMULATION_FAILED),
        (_error_string("something else"), SIMULATION_FAILED),
    ],
)  # fmt: skip
def test_revert_reasons_map_to_x402_codes(data: bytes, reason: str) -> None:
    assert revert_reason(data, now=1000) == reason


def test_calldata_picks_the_overload_by_signature_length() -> None:
    auth = Eip3009Authorization(
        from_=PAYEE, to=ASSET, value="5", valid_after="0", valid_before="9", nonce="0x" + "ab" * 32
    )
    vrs = ExactEvm.calldata(auth, b"\x11" * 32 + b"\x22" * 32 + b"\x1c")
    assert (
        vrs[:4]
        == keccak(
            text="transferWithAuthorization(address,address,uint256,uint256,uint256,bytes32,uint8,bytes32,bytes32)"
        )[:4]
    )
    *_, v, r, s = abi_decode(
        ["address", "address", "uint256", "uint256", "uint256", "bytes32", "uint8", "bytes32", "bytes32"],
        vrs[4:],
    )
    assert (v, r, s) == (28, b"\x11" * 32, b"\x22" * 32)
    blob = b"\x33" * 100
    other = ExactEvm.calldata(auth, blob)
    assert (
        other[:4]
        == keccak(text="transferWithAuthorization(address,address,uint256,uint256,uint256,bytes32,bytes)")[:4]
    )
    assert (
        abi_decode(["address", "address", "uint256", "uint256", "uint256", "bytes32", "bytes"], other[4:])[-1]
        == blob
    )


def test_v1_network_names() -> None:
    assert v1_network("eip155:84532") == "base-sepolia"
    assert v1_network("eip155:8453") == "base"
    assert v1_network("eip155:999999") == "eip155:999999"
    assert v1_network("solana:abc") == "solana:abc"


# ---------------------------------------------------------------------------- middleware, stub chain


class StubChain:
    """Local-only `ExactChain`: ECDSA check, no simulation; settlement returns a fixed hash."""

    def __init__(self, *, fail_settle: str | None = None) -> None:
        self.settled: list[ExactEvmPayload] = []
        self.fail_settle = fail_settle

    async def verify(self, domain: Eip712Domain, payload: ExactEvmPayload) -> None:
        from escrow.payments._exact import ExactRejected

        if recover_transfer_authorization(domain, payload) != payload.authorization.from_:
            raise ExactRejected("bad signature", code=Reason.SIGNATURE)

    async def settle(self, domain: Eip712Domain, payload: ExactEvmPayload) -> str:
        from escrow.payments._exact import ExactRejected

        if self.fail_settle:
            raise ExactRejected("settlement failed", code=self.fail_settle)
        self.settled.append(payload)
        return "0x" + "ab" * 32


def _app(chain: StubChain, **options: object) -> PaymentMiddleware:
    async def hello(request: Request) -> Response:
        return JSONResponse({"hello": "world"})

    async def boom_price(request: Request) -> int:
        raise ConfigurationError("no price today")

    inner = Starlette(routes=[Route("/hello", hello), Route("/broken", hello)])
    return PaymentMiddleware(
        inner,
        routes={"GET /hello": "$0.001", "GET /broken": PaidRoute(price=boom_price)},
        schemes=[ExactScheme(chain)],
        pay_to=PAYEE,
        asset=USDC,
        secret=SECRET,
        **options,  # type: ignore[arg-type]
    )


def _header(signer: LocalSigner, value: int = 1000) -> str:
    payload = sign_transfer_authorization(
        signer, DOMAIN, to=PAYEE, value=value, valid_before=int(time.time()) + 60
    )
    accepted = PaymentRequirements(
        scheme="exact",
        network="eip155:31337",
        asset=ASSET,
        amount="1000",
        pay_to=PAYEE,
        max_timeout_seconds=60,
        extra={"name": "USD Coin", "version": "2"},
    )
    return encode_payment_signature(PaymentPayload(payload=encode_scheme_payload(payload), accepted=accepted))


def _client(app: PaymentMiddleware) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://testserver")


@pytest.mark.anyio
async def test_stub_chain_payment_is_served_and_settled() -> None:
    chain = StubChain()
    async with _client(_app(chain)) as client:
        response = await client.get("/hello", headers={"PAYMENT-SIGNATURE": _header(LocalSigner.random())})
    assert response.status_code == 200
    assert decode_payment_response(response.headers["payment-response"]).transaction == "0x" + "ab" * 32
    assert len(chain.settled) == 1


@pytest.mark.anyio
async def test_definite_settle_failure_releases_the_claim() -> None:
    chain = StubChain(fail_settle=Reason.TRANSACTION_FAILED)
    app = _app(chain)
    header = _header(LocalSigner.random())
    async with _client(app) as client:
        response = await client.get("/hello", headers={"PAYMENT-SIGNATURE": header})
        assert response.status_code == 402 and "world" not in response.text
        chain.fail_settle = None
        response = await client.get("/hello", headers={"PAYMENT-SIGNATURE": header})
    assert response.status_code == 200


@pytest.mark.anyio
async def test_pending_settlement_is_resumed_by_the_same_credential() -> None:
    chain = StubChain(fail_settle=Reason.SETTLEMENT_PENDING)
    header = _header(LocalSigner.random())
    async with _client(_app(chain)) as client:
        response = await client.get("/hello", headers={"PAYMENT-SIGNATURE": header})
        assert response.status_code == 402 and response.json()["error"] == Reason.SETTLEMENT_PENDING
        assert response.headers["retry-after"] == "2"
        chain.fail_settle = None
        # The same credential again is not a replay: once the chain confirms it, it is served (once).
        response = await client.get("/hello", headers={"PAYMENT-SIGNATURE": header})
        assert response.status_code == 200 and response.json() == {"hello": "world"}
        response = await client.get("/hello", headers={"PAYMENT-SIGNATURE": header})
    assert response.status_code == 402 and response.json()["error"] == Reason.NONCE_ALREADY_USED
    assert len(chain.settled) == 1


@pytest.mark.anyio
async def test_failing_price_function_is_a_server_error_not_a_payment_error() -> None:
    async with _client(_app(StubChain())) as client:
        response = await client.get("/broken")
    assert response.status_code == 500 and "payment-required" not in response.headers


@pytest.mark.anyio
async def test_non_http_scopes_pass_through() -> None:
    seen: list[str] = []

    async def inner(scope: Scope, receive: Receive, send: Send) -> None:
        seen.append(str(scope["type"]))

    app = PaymentMiddleware(
        inner, routes={"/x": 1}, schemes=[ExactScheme(StubChain())], pay_to=PAYEE, asset=USDC, secret=SECRET
    )
    await app({"type": "lifespan"}, None, None)  # type: ignore[arg-type]
    assert seen == ["lifespan"]


def test_configuration_is_checked_up_front() -> None:
    async def inner(scope: object, receive: object, send: object) -> None: ...

    common = {"routes": {"/x": 1}, "pay_to": PAYEE, "asset": USDC}
    with pytest.raises(ConfigurationError):
        PaymentMiddleware(inner, schemes=[ExactScheme(StubChain())], secret=b"short", **common)  # type: ignore[arg-type]
    with pytest.raises(Exception, match="scheme"):
        PaymentMiddleware(inner, schemes=[], **common)  # type: ignore[arg-type]
    with pytest.raises(Exception, match="settle mode"):
        PaymentMiddleware(inner, schemes=[ExactScheme(StubChain())], settle="later", **common)  # type: ignore[arg-type]


@pytest.mark.anyio
async def test_a_durable_sqlite_file_is_the_default_store(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("AGENTPAY_STORE", raising=False)
    monkeypatch.chdir(tmp_path)
    app = _app(StubChain())
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as client:
        assert (await client.get("/hello")).status_code == 402  # no lifespan here: opened on first use
    assert isinstance(app.paywall.store, SQLiteStore)
    assert (tmp_path / ".agentpay" / "payments.db").exists()
    await app.close_store()


@pytest.mark.anyio
async def test_a_store_url_opens_at_lifespan_startup_and_closes_after_shutdown(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/gateway.db"
    app = _app(StubChain(), store=url)
    assert isinstance(app.paywall.store, MemoryStore)  # a placeholder until the store is opened
    messages = iter([{"type": "lifespan.startup"}, {"type": "lifespan.shutdown"}])
    sent: list[str] = []

    async def receive() -> Message:
        return next(messages)

    async def send(message: Message) -> None:
        sent.append(message["type"])

    await app({"type": "lifespan", "asgi": {"version": "3.0"}, "state": {}}, receive, send)
    assert sent == ["lifespan.startup.complete", "lifespan.shutdown.complete"]
    assert (tmp_path / "gateway.db").exists()
    assert app._opened is None  # closed after the app's shutdown


@pytest.mark.anyio
async def test_an_unreachable_store_answers_503_not_500(monkeypatch: pytest.MonkeyPatch) -> None:
    app = _app(StubChain(), store="postgresql://postgres@127.0.0.1:1/nowhere")
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as client:
        response = await client.get("/hello")
    assert response.status_code == 503
    assert response.headers["content-type"] == "application/problem+json"


# ------------------------------------------------------------------------------- no input yields a 500

_HEADERS = st.sampled_from(["PAYMENT-SIGNATURE", "X-PAYMENT", "Authorization"])


def _fuzz_value(raw: bytes, encoding: str, header: str) -> str:
    if encoding == "b64":
        text = base64.b64encode(raw).decode()
    elif encoding == "b64url":
        text = base64.urlsafe_b64encode(raw).decode().rstrip("=")
    else:
        text = raw.decode("latin-1")
    return f"Payment {text}" if header == "Authorization" else text


_JSONISH = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=5),
    max_leaves=12,
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    header=_HEADERS,
    body=st.one_of(st.binary(max_size=300), _JSONISH.map(lambda v: json.dumps(v).encode())),
    encoding=st.sampled_from(["b64", "b64url", "raw"]),
)
def test_no_credential_bytes_yield_a_server_error(header: str, body: bytes, encoding: str) -> None:
    value = _fuzz_value(body, encoding, header).encode("latin-1")  # raw bytes, control characters included

    async def call() -> int:
        async with _client(_app(StubChain())) as client:
            response = await client.get("/hello", headers=[(header.encode(), value)])
            return response.status_code

    assert asyncio.run(call()) in (400, 402, 403)


@pytest.mark.parametrize(
    "mutate",
    [
        lambda p: {**p, "x402Version": "2"},
        lambda p: {**p, "accepted": {**p["accepted"], "maxTimeoutSeconds": -1}},
        lambda p: {**p, "accepted": {**p["accepted"], "extra": None}},
        lambda p: {**p, "payload": {**p["payload"], "signature": "0x1234"}},
        lambda p: {**p, "payload": {**p["payload"], "signature": "zz"}},
        lambda p: {**p, "payload": {**p["payload"], "authorization": {**p["payload"]["authorization"],
                                                                       "validBefore": "9" * 78}}},
        lambda p: {**p, "payload": {**p["payload"], "authorization": {**p["payload"]["authorization"],
                                                                       "value": "9" * 78}}},
        lambda p: {**p, "payload": {**p["payload"], "authorization": {**p["payload"]["authorization"],
                                                                       "nonce": "0x12"}}},
        lambda p: {**p, "payload": []},
        lambda p: {**p, "accepted": {**p["accepted"], "network": "solana:mainnet"}},
    ],
)  # fmt: skip
@pytest.mark.anyio
async def test_structured_garbage_yields_a_payment_error(mutate: Any) -> None:
    genuine = json.loads(base64.b64decode(_header(LocalSigner.random())))
    value = base64.b64encode(json.dumps(mutate(genuine)).encode()).decode()
    async with _client(_app(StubChain())) as client:
        response = await client.get("/hello", headers={"PAYMENT-SIGNATURE": value})
    assert response.status_code in (400, 402), response.text
    assert "payment-required" in response.headers


@pytest.mark.anyio
async def test_sync_price_function_sees_the_request() -> None:
    async def hello(request: Request) -> Response:
        return JSONResponse({})

    def price(request: Request) -> int:
        return 10 * int(request.query_params.get("n", "1"))

    app = PaymentMiddleware(
        Starlette(routes=[Route("/n", hello)]),
        routes={"GET /n": PaidRoute(price=price)},
        schemes=[ExactScheme(StubChain())],
        pay_to=PAYEE,
        asset=USDC,
        secret=SECRET,
    )
    async with _client(app) as client:
        response = await client.get("/n", params={"n": "7"})
    assert response.status_code == 402
    assert response.json()["accepts"][0]["maxAmountRequired"] == "70"
