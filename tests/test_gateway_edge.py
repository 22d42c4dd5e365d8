"""The paywall's edges, on a real devnet: it prices exactly what the app routes (HEAD, `root_path`, mounts,
a real uvicorn with `--root-path`), it bounds the memory a request can take before and after payment, and
it tells payers nothing of its store's or node's internals.
"""

from __future__ import annotations

import asyncio
import base64
import secrets
import socket
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx
import msgspec
import pytest
import uvicorn
from eth_abi.abi import encode as abi_encode
from eth_utils.address import to_checksum_address
from eth_utils.crypto import keccak
from hypothesis import given, settings
from hypothesis import strategies as st
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Match, Mount, Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from escrow import DevnetState
from escrow.chain._rpc import Rpc, TxSender
from escrow.payments._exact import ExactEvm
from gateway import (
    Asset,
    ConfigurationError,
    ExactScheme,
    MemoryStore,
    PaidRoute,
    PaymentMiddleware,
    PaymentStore,
    RouteTable,
    facilitator_app,
)
from gateway._stores.postgres import PostgresStore
from tests._gateways import TcpProxy
from tests.test_store import PG_URL, _drop_schema
from x402 import (
    Eip712Domain,
    LocalSigner,
    PaymentPayload,
    PaymentRequirements,
    decode_payment_response,
    encode_payment_signature,
    encode_scheme_payload,
    sign_transfer_authorization,
)
from x402.client import Eip3009Wallet, PaymentAuth, SpendPolicy

pytestmark = [pytest.mark.anyio]

PRICE = 1000
SECRET = b"edge-tests-secret-of-at-least-32-bytes!!"
RELAYER = 9  # shared with test_gateway_paid (tests of one session run one after another)
PAYEE = "0x3C44CdDdB6a900fa2b585dd299e03d12FA4293BC"
USDC = Asset(
    address="0x5FbDB2315678afecb367f032d93F642f64180aa3", chain_id=31337, name="USD Coin", version="2"
)


class World:
    """The chain, a fresh payee, and helpers to build paywalls and pay them."""

    def __init__(self, devnet: DevnetState, rpc: Rpc) -> None:
        self.devnet = devnet
        self.rpc = rpc
        self.relayer = TxSender(rpc, devnet.accounts[RELAYER].private_key, chain_id=devnet.chain_id)
        self.chain = ExactEvm(rpc, self.relayer)
        self.usdc = to_checksum_address(devnet.contracts["usdc"])
        self.asset = Asset(
            address=self.usdc, chain_id=devnet.chain_id, name=devnet.usdc_name, version=devnet.usdc_version
        )
        self.domain = Eip712Domain(devnet.usdc_name, devnet.usdc_version, devnet.chain_id, self.usdc)
        self.payee = LocalSigner.random().address

    def paywall(
        self, app: ASGIApp, routes: dict[str, Any], *, store: PaymentStore | str | None = None, **options: Any
    ) -> PaymentMiddleware:
        return PaymentMiddleware(
            app,
            routes=routes,
            schemes=[ExactScheme(self.chain)],
            pay_to=self.payee,
            asset=self.asset,
            store=store or MemoryStore(),
            secret=SECRET,
            **options,
        )

    async def payer(self) -> LocalSigner:
        signer = LocalSigner.random()
        data = keccak(text="mint(address,uint256)")[:4] + abi_encode(
            ["address", "uint256"], [signer.address, 100 * PRICE]
        )
        await self.relayer.transact(self.usdc, data, gas=120_000)
        return signer

    def auth(self, signer: LocalSigner) -> PaymentAuth:
        wallet = Eip3009Wallet(
            signer, self.devnet.chain_id, {self.usdc: (self.asset.name, self.asset.version)}
        )
        return PaymentAuth(wallet, SpendPolicy(max_per_call=10 * PRICE), prefer=("x402v2",))

    def header(self, signer: LocalSigner) -> str:
        """A PAYMENT-SIGNATURE paying PRICE to the payee, accepting the offer every route here makes."""
        accepted = PaymentRequirements(
            scheme="exact",
            network=self.devnet.network,
            asset=self.usdc,
            amount=str(PRICE),
            pay_to=self.payee,
            max_timeout_seconds=60,
            extra={"name": self.asset.name, "version": self.asset.version},
        )
        signed = sign_transfer_authorization(
            signer, self.domain, to=self.payee, value=PRICE, valid_before=int(time.time()) + 60
        )
        return encode_payment_signature(
            PaymentPayload(payload=encode_scheme_payload(signed), accepted=accepted)
        )

    async def balance(self, address: str) -> int:
        data = keccak(text="balanceOf(address)")[:4] + abi_encode(["address"], [address])
        return int.from_bytes(await self.rpc.call(self.usdc, data), "big")


@pytest.fixture
async def world(devnet: DevnetState) -> AsyncIterator[World]:
    rpc = Rpc(devnet.rpc_url)
    try:
        yield World(devnet, rpc)
    finally:
        await rpc.aclose()


def _client(app: ASGIApp, auth: httpx.Auth | None = None, **transport: Any) -> httpx.AsyncClient:
    asgi = httpx.ASGITransport(app=app, raise_app_exceptions=False, **transport)
    return httpx.AsyncClient(transport=asgi, base_url="http://testserver", auth=auth)


async def _hello(request: Request) -> Response:
    return JSONResponse({"hello": "world"}, headers={"x-secret": "content"})


def _hello_app() -> Starlette:
    return Starlette(routes=[Route("/hello", _hello)])


# ------------------------------------------------------------------- item 4: price what the app routes


@pytest.mark.parametrize(
    ("method", "path", "root_path", "matched"),
    [
        ("GET", "/hello", "", "GET /hello"),
        ("HEAD", "/hello", "", "GET /hello"),  # Starlette runs the GET endpoint for HEAD
        ("HEAD", "/any", "", "/any"),
        ("HEAD", "/post", "", None),  # POST routes do not answer HEAD
        ("GET", "/svc/hello", "/svc", "GET /hello"),  # uvicorn --root-path, or a Mount("/svc")
        ("GET", "/hello", "/svc", "GET /hello"),  # a server that leaves the root path out of `path`
        ("GET", "/svcx/hello", "/svc", None),  # the prefix only counts on a segment boundary
        ("GET", "/svc", "/svc", None),  # the mount point itself routes as ""
        ("GET", "/svc/items/7", "/svc", "GET /items/{n:int}"),
    ],
)
def test_route_table_matches_as_the_starlette_router_does(
    method: str, path: str, root_path: str, matched: str | None
) -> None:
    table = RouteTable(
        {"GET /hello": 1, "/any": 1, "POST /post": 1, "GET /items/{n:int}": 1}, pay_to=PAYEE, asset=USDC
    )
    entry = table.match({"type": "http", "method": method, "path": path, "root_path": root_path})
    assert (None if entry is None else entry.key) == matched


_PRICED = {"GET /hello": 1, "/any": 1, "POST /post": 1, "GET /items/{n:int}": 1, "PUT /items/{name}": 1}


def _endpoint(request: Request) -> Response:
    return Response()


class _AnyMethod:
    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await Response()(scope, receive, send)


# The app the table above prices: one Starlette route per key, with the methods Starlette would give it.
_ROUTES = [
    Route("/hello", _endpoint, methods=["GET"], name="GET /hello"),
    Route("/any", _AnyMethod(), name="/any"),  # an ASGI endpoint: Starlette routes every method to it
    Route("/post", _endpoint, methods=["POST"], name="POST /post"),
    Route("/items/{n:int}", _endpoint, methods=["GET"], name="GET /items/{n:int}"),
    Route("/items/{name}", _endpoint, methods=["PUT"], name="PUT /items/{name}"),
]
_SEGMENTS = st.sampled_from(["hello", "any", "post", "items", "7", "x", "svc", "", "hello/"])


@settings(max_examples=400, deadline=None)
@given(
    method=st.sampled_from(["GET", "HEAD", "POST", "PUT", "DELETE"]),
    segments=st.lists(_SEGMENTS, min_size=0, max_size=3),
    root_path=st.sampled_from(["", "/svc", "/api/v1", "/hel"]),
    prefixed=st.booleans(),
)
def test_the_table_prices_exactly_the_endpoints_starlette_runs(
    method: str, segments: list[str], root_path: str, prefixed: bool
) -> None:
    table = RouteTable(_PRICED, pay_to=PAYEE, asset=USDC)
    path = (root_path if prefixed else "") + "/" + "/".join(segments)
    scope = {"type": "http", "method": method, "path": path, "root_path": root_path}
    # What Starlette's router runs: the first route that matches fully (path and method).
    runs = next((r.name for r in _ROUTES if r.matches(scope)[0] is Match.FULL), None)
    entry = table.match(scope)
    assert (None if entry is None else entry.key) == runs, (method, path, root_path)


async def test_head_of_a_priced_get_is_priced(world: World) -> None:
    app = world.paywall(_hello_app(), {"GET /hello": PRICE})
    async with _client(app) as client:
        response = await client.head("/hello")
    assert response.status_code == 402 and "x-secret" not in response.headers
    payer = await world.payer()
    async with _client(app, world.auth(payer)) as client:
        response = await client.head("/hello")
    assert response.status_code == 200 and response.headers["x-secret"] == "content"
    assert decode_payment_response(response.headers["payment-response"]).success
    assert await world.balance(world.payee) == PRICE


async def test_a_root_path_does_not_hide_a_priced_route(world: World) -> None:
    app = world.paywall(_hello_app(), {"GET /hello": PRICE})
    async with _client(app, root_path="/svc") as client:
        response = await client.get("/svc/hello")
    assert response.status_code == 402 and "world" not in response.text
    payer = await world.payer()
    async with _client(app, world.auth(payer), root_path="/svc") as client:
        response = await client.get("/svc/hello")
    assert response.status_code == 200 and response.json() == {"hello": "world"}
    assert await world.balance(world.payee) == PRICE


async def test_a_paywall_on_a_mounted_sub_app_prices_its_own_paths(world: World) -> None:
    outer = Starlette(routes=[Mount("/api", app=world.paywall(_hello_app(), {"GET /hello": PRICE}))])
    async with _client(outer) as client:
        response = await client.get("/api/hello")
        assert response.status_code == 402 and "world" not in response.text
        assert (await client.get("/hello")).status_code == 404
    payer = await world.payer()
    async with _client(outer, world.auth(payer)) as client:
        response = await client.get("/api/hello")
    assert response.status_code == 200 and response.json() == {"hello": "world"}
    assert await world.balance(world.payee) == PRICE


@pytest.fixture
def listening() -> Iterator[socket.socket]:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(64)
    try:
        yield sock
    finally:
        sock.close()


async def test_under_uvicorn_with_a_root_path(world: World, listening: socket.socket) -> None:
    # `uvicorn --root-path /svc` behind a proxy that strips /svc: the request line says /hello, the scope
    # says path="/svc/hello", root_path="/svc", and Starlette routes /hello.
    app = world.paywall(_hello_app(), {"GET /hello": PRICE})
    config = uvicorn.Config(app, root_path="/svc", lifespan="off", log_level="warning")
    server = uvicorn.Server(config)
    serving = asyncio.create_task(server.serve(sockets=[listening]))
    url = f"http://127.0.0.1:{listening.getsockname()[1]}"
    try:
        while not server.started:
            assert not serving.done(), serving.exception()
            await asyncio.sleep(0.01)
        async with httpx.AsyncClient(base_url=url) as client:
            response = await client.get("/hello")
        assert response.status_code == 402 and "world" not in response.text
        payer = await world.payer()
        async with httpx.AsyncClient(base_url=url, auth=world.auth(payer)) as client:
            response = await client.get("/hello")
        assert response.status_code == 200 and response.json() == {"hello": "world"}
        assert await world.balance(world.payee) == PRICE
    finally:
        server.should_exit = True
        await asyncio.wait_for(serving, 30)


# ----------------------------------------------------------------- item 10: bounded memory before payment


class _Counting:
    """A pricing function that reads the JSON body (as `PaidRoute(price=...)` may), counting its calls."""

    def __init__(self) -> None:
        self.calls = 0

    async def __call__(self, request: Request) -> int:
        self.calls += 1
        await request.body()
        return PRICE


async def _echo(request: Request) -> Response:
    return Response(await request.body(), media_type="application/octet-stream")


def _echo_app() -> Starlette:
    return Starlette(routes=[Route("/echo", _echo, methods=["POST"])])


def _assert_413(response: httpx.Response) -> None:
    assert response.status_code == 413, response.text
    assert response.headers["content-type"] == "application/problem+json"
    problem = response.json()
    assert (
        problem["status"] == 413 and problem["title"] == "Content Too Large" and "bytes" in problem["detail"]
    )


async def test_a_body_read_before_payment_is_limited_to_1_mib_by_default(world: World) -> None:
    price = _Counting()
    app = world.paywall(_echo_app(), {"POST /echo": PaidRoute(price=price)})
    async with _client(app) as client:
        _assert_413(await client.post("/echo", content=b"x" * ((1 << 20) + 1)))
        assert price.calls == 0

        async def chunks() -> AsyncIterator[bytes]:  # no Content-Length: only the streamed bytes count
            for _ in range(5):
                yield b"y" * (300 * 1024)

        _assert_413(await client.post("/echo", content=chunks()))
        assert price.calls == 0
        response = await client.post("/echo", content=b"x" * (1 << 20))  # exactly the limit: priced
    assert response.status_code == 402 and price.calls == 1


async def test_the_body_limit_is_configurable_and_a_paid_body_under_it_is_served(world: World) -> None:
    price = _Counting()
    app = world.paywall(_echo_app(), {"POST /echo": PaidRoute(price=price)}, max_body_bytes=100)
    async with _client(app) as client:
        _assert_413(await client.post("/echo", content=b"x" * 101))
    payer = await world.payer()
    async with _client(app, world.auth(payer)) as client:
        response = await client.post("/echo", content=b"z" * 100)
    assert response.status_code == 200 and response.content == b"z" * 100
    assert await world.balance(world.payee) == PRICE


async def test_a_content_length_that_understates_the_body_does_not_get_past_the_limit(world: World) -> None:
    price = _Counting()
    app = world.paywall(_echo_app(), {"POST /echo": PaidRoute(price=price)}, max_body_bytes=1024)
    incoming = [
        {"type": "http.request", "body": b"a" * 600, "more_body": True},
        {"type": "http.request", "body": b"a" * 600, "more_body": True},
        {"type": "http.request", "body": b"a" * 600, "more_body": False},
    ]
    sent: list[Message] = []

    async def receive() -> Message:
        return incoming.pop(0) if incoming else {"type": "http.disconnect"}

    async def send(message: Message) -> None:
        sent.append(message)

    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": "/echo",
        "raw_path": b"/echo",
        "root_path": "",
        "query_string": b"",
        "headers": [(b"host", b"testserver"), (b"content-length", b"5")],
        "server": ("testserver", 80),
    }
    await app(scope, receive, send)
    assert sent[0]["type"] == "http.response.start" and sent[0]["status"] == 413
    assert price.calls == 0 and len(incoming) == 1  # it stopped reading at the limit


# ---------------------------------------------------------------- item 10: bounded held (paid) responses


def _big_app() -> Starlette:
    async def big(request: Request) -> Response:
        return Response(b"S" * 4096, media_type="application/octet-stream")

    async def endless(request: Request) -> Response:
        async def forever() -> AsyncIterator[bytes]:
            while True:
                yield b"S" * 512
                await asyncio.sleep(0)

        return StreamingResponse(forever(), media_type="application/octet-stream")

    async def small(request: Request) -> Response:
        return Response(b"s" * 100, media_type="application/octet-stream")

    return Starlette(routes=[Route("/big", big), Route("/endless", endless), Route("/small", small)])


@pytest.mark.parametrize("settle", ["before-response", "deferred"])
async def test_a_response_too_large_to_hold_is_withheld_and_not_charged(world: World, settle: str) -> None:
    store = MemoryStore()
    routes = {"GET /big": PRICE, "GET /endless": PRICE, "GET /small": PRICE}
    app = world.paywall(_big_app(), routes, store=store, settle=settle, max_held_bytes=1024)
    payer = await world.payer()
    before = await world.balance(payer.address)
    header = world.header(payer)
    async with _client(app) as client:
        for path in ("/big", "/endless"):
            response = await client.get(path, headers={"PAYMENT-SIGNATURE": header})
            assert response.status_code == 502, response.text
            assert response.headers["content-type"] == "application/problem+json"
            assert b"S" not in response.content and "payment-response" not in response.headers
            assert "nothing was charged" in response.json()["detail"]
        # The payment was released, not used up: the same credential still pays for a response that fits.
        response = await client.get("/small", headers={"PAYMENT-SIGNATURE": header})
        assert response.status_code == 200 and response.content == b"s" * 100
        # A HEAD has no body to hold: the large resource's headers are served (and charged) normally.
        response = await client.head("/big", headers={"PAYMENT-SIGNATURE": world.header(payer)})
        assert response.status_code == 200 and response.headers["content-length"] == "4096"
    if settle == "deferred":
        stats = await store.stats()
        assert stats.queued == 2  # the two delivered responses, nothing for the withheld ones
    else:
        assert await world.balance(world.payee) == 2 * PRICE
        assert await world.balance(payer.address) == before - 2 * PRICE


async def test_limits_are_checked_up_front(world: World) -> None:
    for bad in ({"max_body_bytes": -1}, {"max_held_bytes": "big"}, {"max_body_bytes": True}):
        with pytest.raises(ConfigurationError, match="max_"):
            world.paywall(_hello_app(), {"/x": 1}, **bad)


# ------------------------------------------------- item 11: no store or node internals in what payers see


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _assert_no_internals(text: str, *secrets: str) -> None:
    for leak in (*secrets, "127.0.0.1", "Errno", "Error(", "Exception", "asyncpg", "httpx"):
        assert leak not in text, f"{leak!r} leaked into {text!r}"


async def test_a_node_that_is_down_is_a_503_with_a_fixed_detail(devnet: DevnetState) -> None:
    port = _free_port()  # nothing listens there
    rpc = Rpc(f"http://127.0.0.1:{port}")
    try:
        world = World(devnet, rpc)  # its relayer and chain talk to the dead node
        header = world.header(LocalSigner.random())
        app = world.paywall(_hello_app(), {"GET /hello": PRICE})
        async with _client(app) as client:
            response = await client.get("/hello", headers={"PAYMENT-SIGNATURE": header})
        assert response.status_code == 503, response.text
        assert response.json()["detail"] == "the chain node is unreachable; retry later"
        _assert_no_internals(response.text, str(port), "ConnectError", "ChainError")
        # The facilitator API says the same in `invalidMessage`.
        facilitator = facilitator_app(
            ExactScheme(world.chain), network=devnet.network, signers=[], assets=[world.asset]
        )
        payment = msgspec.json.decode(base64.b64decode(header))
        body = {"x402Version": 2, "paymentPayload": payment, "paymentRequirements": payment["accepted"]}
        async with _client(facilitator) as client:
            response = await client.post("/verify", json=body)
        assert response.status_code == 503 and response.json()["invalidReason"] == "chain_unreachable"
        assert response.headers["content-type"] == "application/problem+json"
        assert response.json()["invalidMessage"] == "the chain node is unreachable; retry later"
        _assert_no_internals(response.text, str(port), "ConnectError", "ChainError")
    finally:
        await rpc.aclose()


@pytest.fixture
def pg_proxy() -> Iterator[TcpProxy]:
    host, _, port = PG_URL.split("@", 1)[1].split("/", 1)[0].partition(":")
    proxy = TcpProxy(host, int(port or 5432))
    proxy.up()
    try:
        yield proxy
    finally:
        proxy.close()


async def test_a_store_that_goes_down_is_a_503_with_a_fixed_detail(world: World, pg_proxy: TcpProxy) -> None:
    schema = "agentpay_test_" + secrets.token_hex(6)
    dsn = PG_URL.replace(PG_URL.split("@", 1)[1].split("/", 1)[0], f"127.0.0.1:{pg_proxy.port}")
    store = await PostgresStore.open(dsn, schema=schema, pool_min=1, pool_max=2)
    try:
        app = world.paywall(_hello_app(), {"GET /hello": PRICE}, store=store)
        payer = await world.payer()
        pg_proxy.down()  # the database goes away after the gateway opened its store
        async with _client(app) as client:
            for _ in range(3):  # a broken pooled connection first, then failed reconnects (host and port)
                response = await client.get("/hello", headers={"PAYMENT-SIGNATURE": world.header(payer)})
                assert response.status_code == 503, response.text
                assert response.json()["detail"] == "the payment store is unavailable; retry later"
                _assert_no_internals(response.text, str(pg_proxy.port), "postgresql", "StoreUnavailable")
    finally:
        pg_proxy.up()
        await store.close()
        await _drop_schema(schema)
    assert await world.balance(world.payee) == 0


async def test_a_facilitator_whose_store_is_down_answers_503_and_sends_nothing(
    world: World, pg_proxy: TcpProxy
) -> None:
    schema = "agentpay_test_" + secrets.token_hex(6)
    dsn = PG_URL.replace(PG_URL.split("@", 1)[1].split("/", 1)[0], f"127.0.0.1:{pg_proxy.port}")
    store = await PostgresStore.open(dsn, schema=schema, pool_min=1, pool_max=2)
    try:
        app = facilitator_app(
            ExactScheme(world.chain),
            network=world.devnet.network,
            signers=[world.relayer.address],
            assets=[world.asset],
            store=store,
        )
        payer = await world.payer()
        payment = msgspec.json.decode(base64.b64decode(world.header(payer)))
        body = {"x402Version": 2, "paymentPayload": payment, "paymentRequirements": payment["accepted"]}
        nonce = await world.rpc.get_transaction_count(world.relayer.address, "pending")
        pg_proxy.down()
        async with _client(app) as client:
            response = await client.post("/settle", json=body)
        assert response.status_code == 503, response.text
        assert response.headers["content-type"] == "application/problem+json"
        answer = response.json()
        assert answer["success"] is False and answer["errorReason"] == "store_unavailable"
        _assert_no_internals(response.text, str(pg_proxy.port), "postgresql", "StoreUnavailable")
        assert await world.rpc.get_transaction_count(world.relayer.address, "pending") == nonce
    finally:
        pg_proxy.up()
        await store.close()
        await _drop_schema(schema)
    assert await world.balance(world.payee) == 0


async def test_a_store_url_that_cannot_be_reached_is_a_503_with_a_fixed_detail(world: World) -> None:
    port = _free_port()
    app = world.paywall(_hello_app(), {"GET /hello": PRICE}, store=f"postgresql://agent@127.0.0.1:{port}/db")
    async with _client(app) as client:
        response = await client.get("/hello")
    assert response.status_code == 503
    _assert_no_internals(response.text, str(port), "postgresql", "agent")
