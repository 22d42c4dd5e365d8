"""Fuzzing the edge (issue 9 item 15): every credential header through the real ASGI paywall, and the client's
reading of 402 answers.

The paywall is `PaymentMiddleware` with a real `exact` scheme over the session devnet and a memory store. Each
dialect starts from a credential our own client produced for the route (x402 v2 `PAYMENT-SIGNATURE`, v1
`X-PAYMENT`, MPP `Authorization: Payment`), signed by a payer holding nothing, and hypothesis mutates it: JSON
fields replaced, dropped or added (MPP challenges re-signed with the server's secret, so the mutation reaches
past the HMAC), encodings bent (URL-safe alphabet, padding, truncation), or raw bytes. Whatever arrives:
never a 500, never an error outside the package's root, never the app running unpaid, no claim left in
the store. The client side feeds mutated `PAYMENT-REQUIRED` headers, v1 bodies and `WWW-Authenticate:
Payment` challenges to `offers_from_response` (which must never raise) and to a paying `httpx` client (which
may only raise `X402Error`).

The examples are driven on one event loop of this module, straight into the ASGI callable (no HTTP client in
between), so a few thousand per dialect fit in CI's time.
"""

from __future__ import annotations

import asyncio
import base64
import copy
import json
import os
import re
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from eth_abi.abi import encode as abi_encode
from eth_utils.address import to_checksum_address
from eth_utils.crypto import keccak
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from escrow import DevnetState
from escrow.chain._rpc import Rpc, TxSender
from escrow.payments._exact import ExactEvm
from gateway import Asset, ExactScheme, MemoryStore, PaymentMiddleware
from x402 import (
    ExactEvmPayload,
    LocalSigner,
    MppAuthorizationPayload,
    X402Error,
    challenge_id,
    convert_payload,
    decode_exact_payload,
    decode_payment_signature,
    decode_x_payment,
    parse_credential,
    verify_challenge,
)
from x402.client import Eip3009Wallet, Offer, PaymentAuth, SpendPolicy, offers_from_response, payment_headers

pytestmark = [pytest.mark.chain]

PRICE = 1000
SECRET = b"fuzz-the-edge-secret-of-at-least-32-bytes"
REALM = "fuzz.test"
RELAYER = 7  # only mints for the named double-serve test: no fuzzed credential is a valid, funded payment
# EXAMPLES per dialect through the middleware, then the decoders alone and the client's 402 reading: about
# 2000 per dialect in all, some 40 s of one busy core (generating structured examples is most of it).
EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "800"))
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    derandomize=not os.environ.get("FUZZ_RANDOM"),  # CI-stable; FUZZ_RANDOM=1 explores new ground
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
    database=None,
)

# ------------------------------------------------------------------------------------------- the world


class Edge:
    """The paywall under test, driven on `loop`, and the client's credentials for its three dialects."""

    def __init__(self, devnet: DevnetState, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.rpc = Rpc(devnet.rpc_url)
        self.relayer = relayer = TxSender(
            self.rpc, devnet.accounts[RELAYER].private_key, chain_id=devnet.chain_id
        )
        usdc = to_checksum_address(devnet.contracts["usdc"])
        self.asset = Asset(
            address=usdc,
            chain_id=devnet.chain_id,
            name=devnet.usdc_name,
            version=devnet.usdc_version,
            decimals=devnet.usdc_decimals,
        )
        self.store = MemoryStore()
        self.served = 0
        self.middleware = PaymentMiddleware(
            self._app,
            routes={"GET /paid": PRICE},
            schemes=[ExactScheme(ExactEvm(self.rpc, relayer))],
            pay_to=LocalSigner.random().address,
            asset=self.asset,
            store=self.store,
            secret=SECRET,
            realm=REALM,
        )
        self.wallet = Eip3009Wallet(
            LocalSigner.random(), devnet.chain_id, {usdc: (self.asset.name, self.asset.version)}
        )
        status, headers, body = self.run(self.call([]))
        assert status == 402
        challenge = httpx.Response(402, headers=headers, content=body)
        self.challenge_headers, self.challenge_body = headers, body
        self.credentials: dict[str, tuple[str, str]] = {}  # dialect -> (header name, value)
        for offer in offers_from_response(challenge):
            ((name, value),) = payment_headers(offer, self.wallet.pay(offer)).items()
            self.credentials[offer.protocol] = (name, value)
        assert set(self.credentials) == {"x402v2", "x402v1", "mpp"}

    def run(self, coro: Any) -> Any:
        return self.loop.run_until_complete(coro)

    async def _app(self, scope: Any, receive: Any, send: Any) -> None:
        self.served += 1
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"paid content"})

    async def call(self, headers: list[tuple[bytes, bytes]]) -> tuple[int, list[tuple[str, str]], bytes]:
        scope = {
            "type": "http",
            "asgi": {"version": "3.0"},
            "http_version": "1.1",
            "method": "GET",
            "scheme": "http",
            "path": "/paid",
            "raw_path": b"/paid",
            "root_path": "",
            "query_string": b"",
            "headers": [(b"host", b"testserver"), *headers],
            "client": ("127.0.0.1", 1234),
            "server": ("testserver", 80),
        }
        sent: list[dict[str, Any]] = []

        async def receive() -> dict[str, Any]:
            return {"type": "http.request", "body": b"", "more_body": False}

        async def send(message: dict[str, Any]) -> None:
            sent.append(message)

        await self.middleware(scope, receive, send)
        start = sent[0]
        body = b"".join(m.get("body", b"") for m in sent[1:])
        return (
            int(start["status"]),
            [(k.decode("latin-1"), v.decode("latin-1")) for k, v in start["headers"]],
            body,
        )

    def check(self, header: bytes, value: bytes) -> None:
        """Present one credential; the answer must be a typed refusal and leave nothing behind."""
        served = self.served
        status, _headers, body = self.run(self.call([(header, value)]))
        assert status in (400, 402), (status, body[:400])
        assert b"unexpected_" not in body, body[:400]  # an untyped exception is reported under this code
        assert self.served == served, "the app ran for a payment that cannot be valid"
        assert not self.store._claims, f"claims left behind: {self.store._claims}"


@pytest.fixture(scope="module")
def edge(devnet: DevnetState) -> Iterator[Edge]:
    loop = asyncio.new_event_loop()
    try:
        world = Edge(devnet, loop)
        yield world
        loop.run_until_complete(world.rpc.aclose())
    finally:
        loop.close()


# ----------------------------------------------------------------------------------------- strategies

_SPECIAL_TEXT = st.sampled_from(
    [
        "",
        "0",
        "-1",
        "1e3",
        "²",
        "١٢٣",
        "0x",
        "0X" + "ab" * 20,
        "0x" + "00" * 20,
        "0x" + "ff" * 32,
        "0x" + "g" * 64,
        "9" * 79,
        "9" * 78,
        str(2**256),
        "NaN",
        "eip155:",
        "eip155:²",
        "eip155:99999999999999999999999",
        "exact",
        "evm",
        "charge",
        "authorization",
        "transaction",
        "\x00",
        "\ud800",
        "a|b",
        "9999-12-31T23:59:59Z",
        "0001-01-01T00:00:00+01:00",
        "2099-01-01T00:00:00+14:00",
        "2020-01-01T00:00:00Z",
        "2099-01-01T00:00:00",
        "x" * 300,
    ]
)
_SCALARS = (
    _SPECIAL_TEXT
    | st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**300)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=24)
    | _SPECIAL_TEXT
)
JSON = st.recursive(
    _SCALARS,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=6,
)


@st.composite
def tweaked(draw: st.DrawFn, value: str) -> str:
    """A near miss of a valid string: a character added at either end, one dropped, the case changed."""
    edge = st.sampled_from(["\n", " ", "\t", "\x00", "\r\n", "0", "f", "٣", "é"])
    how = draw(st.sampled_from(["append", "append", "prepend", "chop", "upper", "lower"]))
    if how == "append":
        return value + draw(edge)
    if how == "prepend":
        return draw(edge) + value
    if how == "chop":
        return value[:-1]
    return value.upper() if how == "upper" else value.lower()


def _paths(value: Any, prefix: tuple[Any, ...] = ()) -> Iterator[tuple[Any, ...]]:
    yield prefix
    if isinstance(value, dict):
        for key, item in value.items():
            yield from _paths(item, (*prefix, key))
    elif isinstance(value, list):
        for index, item in enumerate(value):
            yield from _paths(item, (*prefix, index))


@st.composite
def mutated(draw: st.DrawFn, value: Any) -> Any:
    """`value` with one to three of its fields (at any depth) bent, replaced, dropped or joined by a new
    one; every field is as likely to be picked as any other, so deep ones (a nonce) are reached as often
    as the top, and the rest stays valid enough to get far into the pipeline."""
    out = copy.deepcopy(value)
    paths = list(_paths(value))
    for _ in range(draw(st.integers(1, 3))):
        path = draw(st.sampled_from(paths))
        parent: Any = None
        node: Any = out
        try:
            for key in path:
                if not isinstance(node, dict | list):
                    raise KeyError(key)  # a string is indexable too, but not a container
                parent, node = node, node[key]
        except (KeyError, IndexError, TypeError):
            continue  # an earlier mutation removed or replaced it
        action = draw(st.sampled_from(["tweak", "tweak", "replace", "drop", "add"]))
        if action == "tweak" and isinstance(node, str):
            fresh: Any = draw(tweaked(node))
        elif action == "add" and isinstance(node, dict):
            node[draw(st.text(max_size=12))] = draw(JSON)
            continue
        elif action == "drop" and isinstance(parent, dict):
            del parent[path[-1]]
            continue
        else:
            fresh = draw(JSON)
        if not path:
            out = fresh
        else:
            parent[path[-1]] = fresh
    return out


def _json_bytes(draw: st.DrawFn, obj: Any) -> bytes:
    text = json.dumps(obj, ensure_ascii=draw(st.booleans()), allow_nan=False)
    return text.encode("utf-8", "surrogatepass")


def _bend(draw: st.DrawFn, encoded: bytes) -> bytes:
    """An encoding a careless sender might produce: trimmed padding, cut short, padded with spaces."""
    how = draw(st.sampled_from(["as-is", "as-is", "as-is", "unpadded", "truncated", "spaces", "junk"]))
    if how == "unpadded":
        return encoded.rstrip(b"=")
    if how == "truncated":
        return encoded[: draw(st.integers(0, max(len(encoded) - 1, 0)))]
    if how == "spaces":
        return b" \t" + encoded + b"\t "
    if how == "junk":
        at = draw(st.integers(0, len(encoded)))
        return encoded[:at] + draw(st.binary(min_size=1, max_size=4)) + encoded[at:]
    return encoded


def _x402_value(draw: st.DrawFn, base: str) -> bytes:
    if draw(st.integers(0, 9)) == 0:
        return draw(st.binary(max_size=200))
    obj = draw(mutated(json.loads(base64.b64decode(base))))
    raw = _json_bytes(draw, obj)
    alphabet = draw(st.sampled_from([base64.b64encode, base64.b64encode, base64.urlsafe_b64encode]))
    return _bend(draw, alphabet(raw))


def _b64url(raw: bytes) -> bytes:
    return base64.urlsafe_b64encode(raw).rstrip(b"=")


def _resign(challenge: dict[str, Any]) -> dict[str, Any]:
    """Give a mutated challenge the id the server would have minted for it (when its fields allow)."""
    fields = {k: challenge.get(k) for k in ("realm", "method", "intent", "request")}
    if not all(isinstance(v, str) for v in fields.values()):
        return challenge
    extra = {k: challenge.get(k) for k in ("expires", "digest", "opaque", "header")}
    if not all(v is None or isinstance(v, str) for v in extra.values()):
        return challenge
    try:
        ident = challenge_id(
            SECRET,
            fields["realm"],
            fields["method"],
            fields["intent"],
            fields["request"],
            extra["expires"],
            extra["digest"],
            extra["opaque"],
            header=extra["header"],
        )
    except (ValueError, UnicodeError):
        return challenge
    return {**challenge, "id": ident}


def _mpp_value(draw: st.DrawFn, base: str) -> bytes:
    if draw(st.integers(0, 9)) == 0:
        return b"Payment " + draw(st.binary(max_size=200))
    credential = json.loads(base64.urlsafe_b64decode(base.split(" ", 1)[1] + "=="))
    challenge = credential["challenge"]
    request = json.loads(base64.urlsafe_b64decode(challenge["request"] + "=="))
    if draw(st.booleans()):  # the request is where the price and route binding live
        challenge = {**challenge, "request": _b64url(_json_bytes(draw, draw(mutated(request)))).decode()}
    credential = draw(mutated({**credential, "challenge": challenge}))
    if isinstance(credential, dict) and isinstance(credential.get("challenge"), dict) and draw(st.booleans()):
        credential = {**credential, "challenge": _resign(credential["challenge"])}
    scheme = draw(st.sampled_from([b"Payment ", b"Payment ", b"payment  ", b"PAYMENT "]))
    return scheme + _bend(draw, _b64url(_json_bytes(draw, credential)))


@st.composite
def x402_values(draw: st.DrawFn, base: str) -> bytes:
    return _x402_value(draw, base)


@st.composite
def mpp_values(draw: st.DrawFn, base: str) -> bytes:
    return _mpp_value(draw, base)


# ------------------------------------------------------------------------------------- the middleware


@FUZZ
@given(data=st.data())
def test_fuzzed_x402_v2_payment_signature(edge: Edge, data: st.DataObject) -> None:
    name, base = edge.credentials["x402v2"]
    edge.check(name.lower().encode(), data.draw(x402_values(base)))


@FUZZ
@given(data=st.data())
def test_fuzzed_x402_v1_x_payment(edge: Edge, data: st.DataObject) -> None:
    name, base = edge.credentials["x402v1"]
    edge.check(name.lower().encode(), data.draw(x402_values(base)))


@FUZZ
@given(data=st.data())
def test_fuzzed_mpp_authorization(edge: Edge, data: st.DataObject) -> None:
    _, base = edge.credentials["mpp"]
    edge.check(b"authorization", data.draw(mpp_values(base)))


# ------------------------------------------------------------------------------------- the client side


def _quote_param(value: Any) -> str:
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return json.dumps(value, allow_nan=False)  # a non-string as a bare token: a server bug to survive


@st.composite
def www_authenticate(draw: st.DrawFn, base: str) -> str:
    """A `WWW-Authenticate` value: the server's challenge with mutated parameters (and a mutated request
    object), re-quoted; or its text with characters cut and inserted."""
    if draw(st.integers(0, 3)) == 0:
        text = base
        for _ in range(draw(st.integers(1, 4))):
            at = draw(st.integers(0, len(text)))
            cut = draw(st.integers(0, 8))
            text = (
                text[:at]
                + draw(st.text(max_size=4) | st.sampled_from(['"', "\\", ",", "=", " "]))
                + text[at + cut :]
            )
        return text
    params = dict(re.findall(r'(\w+)="([^"]*)"', base))
    if draw(st.booleans()):
        request = json.loads(base64.urlsafe_b64decode(params["request"] + "=="))
        params["request"] = _b64url(_json_bytes(draw, draw(mutated(request)))).decode()
    params = draw(mutated(params))
    if not isinstance(params, dict):
        return f"Payment {_quote_param(params)}"
    if draw(st.booleans()):
        params = _resign(params)
    return "Payment " + ", ".join(f"{k}={_quote_param(v)}" for k, v in params.items() if k.isidentifier())


@st.composite
def responses_402(draw: st.DrawFn, edge: Edge) -> httpx.Response:
    """A 402 carrying any mix of a mutated `PAYMENT-REQUIRED`, mutated `WWW-Authenticate` challenges and a
    mutated v1 JSON body."""
    base = dict(edge.challenge_headers)
    headers: list[tuple[bytes, bytes]] = []  # bytes: a server may send any octets
    if draw(st.booleans()):
        headers.append((b"payment-required", _x402_value(draw, base["payment-required"])))
    for _ in range(draw(st.integers(0, 2))):
        value = draw(www_authenticate(base["www-authenticate"]))
        headers.append((b"www-authenticate", value.encode("utf-8", "surrogatepass")))
    body = b""
    if draw(st.booleans()):
        body = _json_bytes(draw, draw(mutated(json.loads(edge.challenge_body))))
    return httpx.Response(402, headers=headers, content=body)


@settings(FUZZ, max_examples=3 * EXAMPLES // 2)
@given(data=st.data())
def test_fuzzed_402_answers_parse_to_offers_or_nothing(edge: Edge, data: st.DataObject) -> None:
    response = data.draw(responses_402(edge))
    offers = offers_from_response(response)  # must never raise: a broken part is skipped
    for offer in offers:
        assert offer.protocol in ("x402v2", "x402v1", "mpp")
        offer.chain_id  # noqa: B018 - the wallet reads it; it must not raise


@settings(FUZZ, max_examples=EXAMPLES // 4)
@given(data=st.data())
def test_a_paying_client_meets_fuzzed_402s_with_typed_errors_only(edge: Edge, data: st.DataObject) -> None:
    response = data.draw(responses_402(edge))

    async def app(scope: Any, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 402, "headers": response.headers.raw})
        await send({"type": "http.response.body", "body": response.content})

    async def pay() -> None:
        auth = PaymentAuth(edge.wallet, SpendPolicy(max_per_call=10**30))
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://fuzz.test", auth=auth) as client:
            try:
                answer = await client.get("/paid")
            except X402Error:
                return
            assert answer.status_code == 402

    edge.run(pay())


# ------------------------------------------------------------------------------ the decoders, faster


def _decode_like_the_paywall(dialect: str, value: bytes) -> None:
    """Every decoding step the paywall takes before the chain, in its order; only `X402Error` may leave."""
    if dialect == "x402v2":
        _canonical(decode_exact_payload(decode_payment_signature(value).payload))
    elif dialect == "x402v1":
        _canonical(decode_exact_payload(decode_x_payment(value).payload))
    else:
        credential = parse_credential(value)
        challenge = credential.challenge
        verify_challenge([SECRET], challenge)
        challenge.request_json()
        challenge.opaque_json()
        expires = challenge.expires_at()
        if expires is not None:
            expires.timestamp()
        _canonical(convert_payload(credential.payload, MppAuthorizationPayload).to_exact())


def _canonical(payload: ExactEvmPayload) -> None:
    """What decodes is exactly what the token will see: the replay key is built from this text, so two
    spellings of one authorization (a stray character the hex or int parser skips) must not both decode."""
    auth = payload.authorization
    for address in (auth.from_, auth.to):
        assert re.fullmatch(r"0x[0-9a-fA-F]{40}", address), address
    assert re.fullmatch(r"0x[0-9a-fA-F]{64}", auth.nonce), auth.nonce
    for number in (auth.value, auth.valid_after, auth.valid_before):
        assert re.fullmatch(r"[0-9]{1,78}", number), number
    assert re.fullmatch(r"0x(?:[0-9a-fA-F]{2})*", payload.signature), payload.signature


@settings(FUZZ, max_examples=3 * EXAMPLES // 2)
@given(data=st.data(), dialect=st.sampled_from(["x402v2", "x402v1", "mpp"]))
def test_fuzzed_credentials_decode_or_raise_the_package_error(
    edge: Edge, data: st.DataObject, dialect: str
) -> None:
    base = edge.credentials[dialect][1]
    value = data.draw(mpp_values(base) if dialect == "mpp" else x402_values(base))
    try:
        _decode_like_the_paywall(dialect, value)
    except X402Error:
        pass


# ------------------------------------------------------------------------- what the fuzzer found (named)


def _edit(value: str, change: Any) -> bytes:
    """The x402 header `value` with `change(obj)` applied to its decoded JSON."""
    obj = json.loads(base64.b64decode(value))
    change(obj)
    return base64.b64encode(json.dumps(obj).encode())


def _newline_after(*path: str) -> Any:
    def change(obj: Any) -> None:
        for key in path[:-1]:
            obj = obj[key]
        obj[path[-1]] += "\n"

    return change


@pytest.mark.parametrize(
    "field", ["from", "to", "nonce", "value", "validBefore"], ids=lambda f: f"{f}-with-newline"
)
def test_a_number_or_hex_field_ending_in_a_newline_is_a_typed_refusal(edge: Edge, field: str) -> None:
    # msgspec's `pattern` is `re.search`, and `$` matched before a final "\n": "0x<40 hex>\n" passed as an
    # address, "1000\n" as a uint256, and a nonce so bent named another replay key (see the next test).
    name, base = edge.credentials["x402v2"]
    edge.check(name.lower().encode(), _edit(base, _newline_after("payload", "authorization", field)))
    with pytest.raises(X402Error):
        decode_exact_payload(
            decode_payment_signature(_edit(base, _newline_after("payload", "authorization", field))).payload
        )


def test_one_authorization_is_not_served_twice_by_a_newline_in_its_nonce(edge: Edge) -> None:
    # The same signed authorization with "\n" after its nonce had another replay key (the nonce text) while
    # the token sees the same nonce: with deferred settlement both were served, one settled.
    middleware = PaymentMiddleware(
        edge._app,
        routes={"GET /paid": PRICE},
        schemes=[ExactScheme(ExactEvm(edge.rpc, edge.relayer))],
        pay_to=LocalSigner.random().address,
        asset=edge.asset,
        store=MemoryStore(),
        secret=SECRET,
        realm=REALM,
        settle="deferred",
    )
    payer = Eip3009Wallet(LocalSigner.random(), edge.wallet.chain_id, {edge.asset.address: ("", "")})
    mint = keccak(text="mint(address,uint256)")[:4] + abi_encode(
        ["address", "uint256"], [payer.address, 10 * PRICE]
    )
    edge.run(edge.relayer.transact(edge.asset.address, mint, gas=120_000))
    deferred = Edge.__new__(Edge)  # the same driver over the deferred paywall
    deferred.__dict__.update(edge.__dict__, middleware=middleware)
    served = edge.served  # `edge._app` counts what the deferred paywall let through, too
    status, headers, body = edge.run(deferred.call([]))
    offer = next(
        o
        for o in offers_from_response(httpx.Response(status, headers=headers, content=body))
        if o.protocol == "x402v2"
    )
    payer._assets = {edge.asset.address.lower(): (edge.asset.name, edge.asset.version)}
    ((name, value),) = payment_headers(offer, payer.pay(offer)).items()
    first, _, _ = edge.run(deferred.call([(name.lower().encode(), value.encode())]))
    again = _edit(value, _newline_after("payload", "authorization", "nonce"))
    second, _, body = edge.run(deferred.call([(name.lower().encode(), again)]))
    assert (first, edge.served - served) == (200, 1)
    assert second != 200 and edge.served - served == 1, body[:300]


@pytest.mark.parametrize("network", ["eip155:²", "eip155:١٢٣", "eip155:"])
def test_an_offer_with_a_non_ascii_chain_number_has_no_chain_id(network: str) -> None:
    # `str.isdigit()` takes "²" (then `int()` raised ValueError out of `Offer.chain_id`) and "١٢٣" (which
    # `int()` reads as chain 123): a server's network string is only a chain id in ASCII digits.
    offer = Offer(protocol="x402v2", scheme="exact", network=network, asset="", amount=1, pay_to="")
    assert offer.chain_id is None


def test_an_mpp_request_parameter_ending_in_a_newline_is_malformed() -> None:
    # The base64url `request` pattern ended in `$`, which let "e30\n" through as a challenge parameter.
    challenge = {"id": "x", "realm": REALM, "method": "evm", "intent": "charge", "request": "e30\n"}
    token = base64.urlsafe_b64encode(json.dumps({"challenge": challenge, "payload": {}}).encode())
    with pytest.raises(X402Error):
        parse_credential(b"Payment " + token.rstrip(b"="))
