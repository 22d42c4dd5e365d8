"""`PaymentMiddleware`: a pure ASGI paywall in front of any Starlette (or other ASGI) app.

Unpriced requests pass straight through. A priced request without a credential gets one 402 with every offer
in both protocols. A paid request is verified and claimed before the app runs; the app's
`http.response.start` and body are held (as Starlette's GZip middleware holds the start) until the pipeline
has settled, so nothing reaches the client unpaid: a failed handler (status >= 400 or an exception) releases
the claim and is passed through uncharged; a failed settlement withholds the content behind a 402.

A priced request's body must arrive within `body_timeout` seconds of the request's start, or the request
ends with 408 (and its claim is released): a client trickling its body would otherwise hold a worker, and
before the claim was kept alive, stretch the handler past the claim's TTL.
"""

from __future__ import annotations

import asyncio
import os
import secrets as _secrets
import time
from collections.abc import Callable, Mapping, Sequence

from starlette.requests import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from x402 import MIN_SECRET_BYTES, X402Error, error_answer

from ._answers import Answer, Headers
from ._errors import ConfigurationError, GatewayError, PaymentFailed
from ._pipeline import Paywall, SettleMode
from ._pricing import Asset, PaidRoute, Price, Quote, RouteTable
from ._scheme import Dialect, Offer, Scheme
from ._store import MemoryStore, PaymentStore
from ._stores import open_store

__all__ = ["DEFAULT_STORE_URL", "PaymentMiddleware"]

# Durable by default: a served payment must survive a crash until it is settled. `AGENTPAY_STORE` overrides.
DEFAULT_STORE_URL = "sqlite:///.agentpay/payments.db"

_CREDENTIAL_HEADERS: dict[bytes, Dialect] = {b"payment-signature": "x402v2", b"x-payment": "x402v1"}
# Extensions that send a file straight to the socket would bypass the held body: paid routes never see them.
_UNBUFFERABLE = ("http.response.pathsend", "http.response.zerocopysend")


def _find_credential(headers: list[tuple[bytes, bytes]]) -> tuple[Dialect, bytes] | None:
    found: list[tuple[Dialect, bytes]] = []
    for name, value in headers:
        dialect = _CREDENTIAL_HEADERS.get(name)
        if dialect is not None:
            found.append((dialect, value))
        elif name == b"authorization" and value[:8].lower() == b"payment ":
            found.append(("mpp", value))
    if len(found) > 1:
        raise PaymentFailed("send exactly one payment credential", code="invalid_payload", status_hint=400)
    return found[0] if found else None


async def _send_answer(send: Send, answer: Answer) -> None:
    headers = [*answer.headers, (b"content-length", str(len(answer.body)).encode())]
    await send({"type": "http.response.start", "status": answer.status, "headers": headers})
    await send({"type": "http.response.body", "body": answer.body})


class _Held:
    """Holds the app's response until the payment is settled."""

    __slots__ = ("body", "start", "trailing")

    def __init__(self) -> None:
        self.start: Message | None = None
        self.body: list[bytes] = []
        self.trailing: list[Message] = []

    async def send(self, message: Message) -> None:
        kind = message["type"]
        if kind == "http.response.start":
            self.start = message
        elif kind == "http.response.body":
            self.body.append(message.get("body", b""))
        else:
            self.trailing.append(message)

    @property
    def status(self) -> int:
        return 500 if self.start is None else int(self.start["status"])

    async def flush(self, send: Send, extra: Headers | None = None) -> None:
        assert self.start is not None
        start = self.start
        if extra:
            replaced = {name for name, _ in extra}
            headers = [(k, v) for k, v in start.get("headers", []) if k.lower() not in replaced]
            start = {**start, "headers": [*headers, *extra]}
        await send(start)
        await send({"type": "http.response.body", "body": b"".join(self.body)})
        for message in self.trailing:
            await send(message)


class PaymentMiddleware:
    """Charge for routes. `routes` maps `"GET /path"` (or `"/path"`) to a price or a `PaidRoute`.

    `schemes` are the payment schemes offered (e.g. `[ExactScheme(exact_evm)]`); `pay_to` and `asset` are
    the defaults for routes that name none. `secret` keys the MPP challenge HMAC (several: the first signs,
    all verify, for rotation); a random one is made when absent, which is fine for a single process.
    `settle="before-response"` settles on-chain before the response leaves; `"deferred"` enqueues the
    payment in the store for a batching settler. `body_timeout` bounds how long a priced request's body
    may take to arrive (then 408).
    """

    def __init__(
        self,
        app: ASGIApp,
        *,
        routes: Mapping[str, PaidRoute | Price],
        schemes: Sequence[Scheme],
        pay_to: str | None = None,
        asset: Asset | None = None,
        store: PaymentStore | str | None = None,
        secret: bytes | str | Sequence[bytes | str] | None = None,
        realm: str | None = None,
        settle: SettleMode = "before-response",
        challenge_ttl: float = 300.0,
        claim_ttl: float = 300.0,
        accept_pympp_challenge_hash: bool = False,
        clock: Callable[[], float] = time.time,
        body_timeout: float = 30.0,
    ) -> None:
        self.app = app
        self.body_timeout = body_timeout
        self.routes = RouteTable(routes, pay_to=pay_to, asset=asset)
        # A URL is opened (connect, migrate) at lifespan startup, or on the first paid request when the
        # server sends no lifespan events; until then the paywall holds a placeholder nothing is written to.
        self._store_url = (
            (store or os.environ.get("AGENTPAY_STORE") or DEFAULT_STORE_URL)
            if store is None or isinstance(store, str)
            else None
        )
        self._opened: PaymentStore | None = None
        self._opening = asyncio.Lock()
        self.paywall = Paywall(
            schemes,
            store=MemoryStore() if store is None or isinstance(store, str) else store,
            secrets=_secret_list(secret),
            realm=realm,
            settle=settle,
            challenge_ttl=challenge_ttl,
            claim_ttl=claim_ttl,
            accept_pympp_challenge_hash=accept_pympp_challenge_hash,
            clock=clock,
        )

    async def open_store(self) -> PaymentStore:
        """Open the configured store once (idempotent); the paywall uses it from then on."""
        if self._store_url is None:
            return self.paywall.store
        async with self._opening:
            if self._opened is None:
                self._opened = await open_store(self._store_url)
                self.paywall.store = self._opened
        return self._opened

    async def close_store(self) -> None:
        """Close a store this middleware opened from a URL."""
        if self._opened is not None:
            await self._opened.close()
            self._opened = None

    def _lifespan_receive(self, receive: Receive) -> Receive:
        # The store opens before the app's own startup runs, so the app's lifespan can hand it to a settler.
        async def wrapped() -> Message:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await self.open_store()
            return message

        return wrapped

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            try:
                await self.app(scope, self._lifespan_receive(receive), send)
            finally:
                await self.close_store()  # after the app's shutdown, which may still settle
            return
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        entry = self.routes.match(scope)
        if entry is None:
            await self.app(scope, receive, send)
            return
        if self._store_url is not None and self._opened is None:
            try:
                await self.open_store()
            except GatewayError:  # e.g. the database is down: 503, never a 500, and nothing is charged
                await _send_answer(send, _STORE_UNAVAILABLE)
                return
        bounded = _BoundedBody(receive, self.body_timeout)
        request_receive: Receive = bounded
        receive = bounded
        if callable(entry.route.price):
            # A pricing function may read the body; each reader then gets its own replay of it.
            try:
                body = await _read_body(receive)
            except _BodyTimeout:
                await _send_answer(send, _request_timeout(self.body_timeout))
                return
            request_receive, receive = _replay(body, receive), _replay(body, receive)
        try:
            quote = await self.routes.quote(entry, Request(scope, request_receive))
        except GatewayError as exc:
            await _send_answer(send, _server_error(exc))
            return
        paywall = self.paywall
        offers = paywall.offers(quote)
        host = _host(scope)
        try:
            found = _find_credential(scope["headers"])
        except PaymentFailed as exc:
            await _send_answer(send, self._failure(quote, offers, host, exc, None))
            return
        if found is None:
            answer = paywall.challenger.payment_required(
                quote, offers, realm=paywall.realm_for(host), now=paywall.clock()
            )
            await _send_answer(send, answer)
            return
        dialect, raw = found
        try:
            attempt = await paywall.verify(quote, offers, dialect, raw, host=host)
        except PaymentFailed as exc:
            await _send_answer(send, self._failure(quote, offers, host, exc, dialect))
            return

        held = _Held()
        extensions = scope.get("extensions") or {}
        if any(name in extensions for name in _UNBUFFERABLE):
            scope = {**scope, "extensions": {k: v for k, v in extensions.items() if k not in _UNBUFFERABLE}}
        try:
            await self.app(scope, receive, held.send)
        except Exception:
            if not bounded.timed_out:
                await paywall.release(attempt)
                raise
        except BaseException:
            await paywall.release(attempt)
            raise
        if bounded.timed_out:  # whether the app let `_BodyTimeout` through or answered (held, never sent)
            await paywall.release(attempt)
            await _send_answer(send, _request_timeout(self.body_timeout))
            return
        if held.start is None or held.status >= 400:
            await paywall.release(attempt)
            if held.start is not None:
                await held.flush(send)
            return
        try:
            receipt = await paywall.settle(attempt)
        except PaymentFailed as exc:
            await _send_answer(send, self._failure(quote, offers, host, exc, dialect))
            return
        await held.flush(send, receipt)

    def _failure(
        self, quote: Quote, offers: list[Offer], host: str, exc: PaymentFailed, dialect: Dialect | None
    ) -> Answer:
        # Known codes map through the shared table; unknown ones (store outages, ...) by their status hint.
        answer = error_answer(X402Error(exc.message, code=exc.code, status_hint=exc.status_hint))
        paywall = self.paywall
        return paywall.challenger.payment_required(
            quote,
            offers,
            realm=paywall.realm_for(host),
            now=paywall.clock(),
            failure=answer,
            detail=exc.message,
            dialect=dialect,
            extra_headers=exc.headers,
        )


_STORE_UNAVAILABLE = Answer(
    status=503,
    headers=[(b"content-type", b"application/problem+json"), (b"retry-after", b"1")],
    body=b'{"type":"about:blank","title":"Service Unavailable","status":503,'
    b'"detail":"payment store unavailable"}',
)


def _request_timeout(seconds: float) -> Answer:
    detail = f"the request body did not arrive within {seconds:g} s"
    body = (
        b'{"type":"about:blank","title":"Request Timeout","status":408,"detail":"' + detail.encode() + b'"}'
    )
    return Answer(
        status=408,
        headers=[(b"content-type", b"application/problem+json"), (b"connection", b"close")],
        body=body,
    )


class _BodyTimeout(Exception):
    """The client did not deliver the request body in time (raised inside the app's `receive`)."""


class _BoundedBody:
    """A `receive` that lets the request body take at most `timeout` seconds from the request's start;
    after the last body chunk it passes through unbounded (an app may wait for the disconnect)."""

    def __init__(self, receive: Receive, timeout: float) -> None:
        self._receive = receive
        self._deadline = asyncio.get_running_loop().time() + timeout
        self._complete = False
        self.timed_out = False

    async def __call__(self) -> Message:
        if self._complete:
            return await self._receive()
        left = self._deadline - asyncio.get_running_loop().time()
        try:
            message = await asyncio.wait_for(self._receive(), max(left, 0.0))
        except TimeoutError:
            self.timed_out = True
            raise _BodyTimeout("the request body did not arrive in time") from None
        if message["type"] != "http.request" or not message.get("more_body", False):
            self._complete = True
        return message


def _server_error(exc: GatewayError) -> Answer:
    body = b'{"type":"about:blank","title":"Internal Server Error","status":500,"detail":"pricing failed"}'
    del exc  # the detail of a misconfiguration is for logs, not for the payer
    return Answer(status=500, headers=[(b"content-type", b"application/problem+json")], body=body)


def _host(scope: Scope) -> str:
    for name, value in scope["headers"]:
        if name == b"host":
            return str(value.decode("latin-1"))
    server = scope.get("server")
    return str(server[0]) if server else "localhost"


def _secret_list(secret: bytes | str | Sequence[bytes | str] | None) -> list[bytes]:
    if secret is None:
        return [_secrets.token_bytes(32)]
    items: Sequence[bytes | str] = [secret] if isinstance(secret, bytes | str) else secret
    keys = [s.encode() if isinstance(s, str) else bytes(s) for s in items]
    if not keys or any(len(k) < MIN_SECRET_BYTES for k in keys):
        raise ConfigurationError(f"MPP challenge secrets must be at least {MIN_SECRET_BYTES} bytes")
    return keys


async def _read_body(receive: Receive) -> bytes:
    chunks: list[bytes] = []
    while True:
        message = await receive()
        if message["type"] != "http.request":
            break
        chunks.append(message.get("body", b""))
        if not message.get("more_body", False):
            break
    return b"".join(chunks)


def _replay(body: bytes, receive: Receive) -> Receive:
    """A `receive` that yields `body` once, then whatever the server sends next (a disconnect)."""
    sent = False

    async def replay() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay
