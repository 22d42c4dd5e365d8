"""`PaymentMiddleware`: a pure ASGI paywall in front of any Starlette (or other ASGI) app.

Unpriced requests pass straight through. A priced request without a credential gets one 402 with every offer
in both protocols. A paid request is verified and claimed before the app runs; the app's
`http.response.start` and body are held (as Starlette's GZip middleware holds the start) until the pipeline
has settled, so nothing reaches the client unpaid: a failed handler (status >= 400 or an exception) releases
the claim and is passed through uncharged; a failed settlement withholds the content behind a 402.

Memory is bounded on both sides of the app. A request body the paywall reads before any credential is checked
(a route priced by a function of the request) is limited to `max_body_bytes` (413 past it, by the declared
`Content-Length` or by the bytes actually streamed). A held response is limited to `max_held_bytes`: past it
the payment is released uncharged and the payer gets a 502 instead of the content, since content that cannot
be held cannot be withheld until the payment is settled, and a payment is never charged for content that is
not delivered.

A priced request's body must arrive within `body_timeout` seconds of the request's start, or the request
ends with 408 (and its claim is released): a client trickling its body would otherwise hold a worker, and
before the claim was kept alive, stretch the handler past the claim's TTL.
"""

from __future__ import annotations

import asyncio
import logging
import os
import secrets as _secrets
import time
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING

from starlette.requests import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from x402 import MIN_SECRET_BYTES, X402Error, error_answer

from ._answers import Answer, ReplayStatus
from ._bodies import (
    HELD_TOO_LARGE,
    BodyTimeout,
    BoundedBody,
    Held,
    read_body,
    replay_body,
    request_timeout_answer,
    too_large_answer,
)
from ._chain_payments import ChainPayments, SettlementOptions, chain_asset
from ._discovery import Discovery, DiscoveryDocuments
from ._errors import ConfigurationError, GatewayError, PaymentFailed
from ._metering import PAID_SCOPE_KEY, Meter, check_metered_routes
from ._metrics import Metrics, PaymentObserver
from ._pipeline import Paywall, SettleMode
from ._pricing import Asset, PaidRoute, Price, Quote, RouteTable, route_path
from ._scheme import Dialect, Offer, Scheme
from ._store import PaymentStore
from ._stores import open_store
from ._stores.memory import MemoryStore

if TYPE_CHECKING:
    from escrow import Chain, EscrowSettler, ExactSettler

__all__ = ["DEFAULT_MAX_BODY_BYTES", "DEFAULT_MAX_HELD_BYTES", "DEFAULT_STORE_URL", "PaymentMiddleware"]

log = logging.getLogger("agentpay.gateway")

# Durable by default: a served payment must survive a crash until it is settled. `AGENTPAY_STORE` overrides.
DEFAULT_STORE_URL = "sqlite:///.agentpay/payments.db"

_CREDENTIAL_HEADERS: dict[bytes, Dialect] = {b"payment-signature": "x402v2", b"x-payment": "x402v1"}
# Extensions that send a file straight to the socket would bypass the held body: paid routes never see them.
_UNBUFFERABLE = ("http.response.pathsend", "http.response.zerocopysend")

#: Default bound of a request body read before payment (function-priced routes): 1 MiB.
DEFAULT_MAX_BODY_BYTES = 1 << 20
#: Default bound of a paid response held until its payment is settled: 16 MiB.
DEFAULT_MAX_HELD_BYTES = 16 << 20


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


class PaymentMiddleware:
    """Charge for routes. `routes` maps `"GET /path"` (or `"/path"`) to a price or a `PaidRoute`.

    `schemes` are the payment schemes offered (e.g. `[ExactScheme(exact_evm)]`); `pay_to` and `asset` are
    the defaults for routes that name none. `secret` keys the MPP challenge HMAC (several: the first signs,
    all verify, for rotation); a random one is made when absent, which is fine for a single process.
    `settle="before-response"` settles on-chain before the response leaves; `"deferred"` enqueues the
    payment in the store for a batching settler. `body_timeout` bounds how long a priced request's body
    may take to arrive (then 408).

    `max_body_bytes` (default 1 MiB) bounds the request body the paywall reads before any credential is
    checked, which only a route priced by a function of the request needs: a larger `Content-Length`, or more
    bytes actually streamed, is answered 413 (problem+json) and the app is not called. `max_held_bytes`
    (default 16 MiB) bounds a paid response, which is held whole until its payment settles: a larger one
    (by its `Content-Length` or by the bytes the app sends) releases the payment uncharged and is answered
    502 (problem+json) without the content. Serve larger payloads from an unpriced URL the paid response
    names, or raise the limit.

    MPP: `realm` names the protection space bound into every challenge (default `"localhost"`); the
    request's `Host` is used instead only when it is one of `realm_hosts`, never otherwise (a client-chosen
    realm could re-cut challenge ids). Credentials binding the challenge by the spec's challengeHash or
    pympp 0.16's are both accepted; `mpp_strict=True` takes the spec's only. A replayed credential gets 402
    `invalid-challenge` with a fresh challenge (the core spec); `mpp_replay_status=403` answers as pympp.

    With `chain=` (an `escrow.Chain`), `schemes` may be left out (both `exact` and `escrow` when the chain
    has an escrow) or name them (`schemes=["escrow", "upto"]`; `upto` needs Permit2 and the x402 upto
    proxy at their canonical addresses and is settled by the chain's relayer key, its `facilitatorAddress`),
    `asset` defaults to the chain's token, and the middleware's lifespan runs what those schemes need: the
    settlers of deferred payments and recovery, tuned by `settlement` (`SettlementOptions`), stopped (queues
    flushed) and the chain's clients closed at shutdown. A server that sends no lifespan events gets them
    started on the first paid request; call `startup()` / `shutdown()` to drive them yourself.

    Several chains (`chain=[base, arbitrum]`, or `chains=`): every route that names no asset is priced on
    each chain's token at once (one x402 `accepts` entry per network and scheme, one MPP challenge per
    network, in the chains' order), and a payment is verified and settled by the chain of the network it
    pays on, with that chain's own settlers (`network_settlers`). Payments, reservations and queues are
    kept apart per chain in the one store. The tokens must share decimals.

    Operator endpoints, off by default: `discovery=True` (or a `Discovery`) serves `/openapi.json`,
    `/llms.txt` and `/discovery/resources` generated from `routes`; `metrics=True` (or a `Metrics`) serves
    Prometheus metrics at `/metrics`. Payment log records (logger `agentpay.payments`) carry a `payment_id`
    either way; see docs/operations.md.
    """

    def __init__(
        self,
        app: ASGIApp,
        *,
        routes: Mapping[str, PaidRoute | Price],
        schemes: Sequence[Scheme | str] | None = None,
        chain: Chain | Sequence[Chain] | None = None,
        chains: Sequence[Chain] | None = None,
        settlement: SettlementOptions | None = None,
        pay_to: str | None = None,
        asset: Asset | None = None,
        store: PaymentStore | str | None = None,
        secret: bytes | str | Sequence[bytes | str] | None = None,
        realm: str | None = None,
        realm_hosts: Sequence[str] = (),
        settle: SettleMode = "before-response",
        challenge_ttl: float = 300.0,
        claim_ttl: float = 300.0,
        max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
        max_held_bytes: int = DEFAULT_MAX_HELD_BYTES,
        mpp_strict: bool = False,
        mpp_replay_status: ReplayStatus = 402,
        clock: Callable[[], float] = time.time,
        body_timeout: float = 30.0,
        discovery: Discovery | bool = False,
        metrics: Metrics | bool = False,
    ) -> None:
        for name, limit in (("max_body_bytes", max_body_bytes), ("max_held_bytes", max_held_bytes)):
            if isinstance(limit, bool) or not isinstance(limit, int) or limit < 0:
                raise ConfigurationError(f"{name} must be a non-negative int, got {limit!r}")
        self.app = app
        self.max_body_bytes = max_body_bytes
        self.max_held_bytes = max_held_bytes
        chains = _chain_list(chain, chains)
        self.chain = chains[0] if chains else None
        self.chains = chains
        placeholder = MemoryStore() if store is None or isinstance(store, str) else store
        self._payments: ChainPayments | None = None
        self._all_payments: list[ChainPayments] = []
        assets: list[Asset] = []
        if chains:
            if schemes is not None and not all(isinstance(s, str) for s in schemes):
                raise ConfigurationError(
                    "with chain=, name the schemes (schemes=['escrow']) or leave them out"
                )
            if len(chains) > 1 and asset is not None:
                raise ConfigurationError("with several chains each prices in its own token: leave asset= out")
            names = None if schemes is None else [str(s) for s in schemes]
            self._all_payments = [
                ChainPayments(
                    c, names, store=placeholder, claim_ttl=claim_ttl, options=settlement, qualify=i > 0
                )
                for i, c in enumerate(chains)
            ]
            self._payments = self._all_payments[0]
            schemes = self._payments.schemes
            asset = asset or chain_asset(chains[0])
            if len(chains) > 1:
                assets = [chain_asset(c) for c in chains]
        elif schemes is None or any(isinstance(s, str) for s in schemes):
            raise ConfigurationError("pass chain= (an escrow.Chain), or scheme objects in schemes=")
        self.body_timeout = body_timeout
        self.routes = RouteTable(routes, pay_to=pay_to, asset=asset, assets=assets)
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
            [s for s in schemes if not isinstance(s, str)],
            store=placeholder,
            secrets=_secret_list(secret),
            realm=realm,
            realm_hosts=realm_hosts,
            settle=settle,
            challenge_ttl=challenge_ttl,
            claim_ttl=claim_ttl,
            mpp_strict=mpp_strict,
            mpp_replay_status=mpp_replay_status,
            clock=clock,
            networks={p.network: p.schemes for p in self._all_payments} if len(assets) > 1 else None,
        )
        check_metered_routes(self.routes, self.paywall.schemes)
        self._ops_endpoints(discovery, metrics)

    def _ops_endpoints(self, discovery: Discovery | bool, metrics: Metrics | bool) -> None:
        """Opt-in operator endpoints (`discovery`, `metrics`; see gateway._discovery, gateway._metrics)."""
        config = Discovery() if discovery is True else discovery or None
        self.discovery = None if config is None else DiscoveryDocuments(config, self.routes, self.paywall)
        self.metrics = Metrics() if metrics is True else metrics or None
        self.observer = PaymentObserver(self.metrics)
        self.paywall.observer = self.observer
        if self.metrics is not None and self._all_payments:  # the settlers `chain=` runs
            hook = self.metrics.settler_hook(lambda: self.paywall.store)
            for payments in self._all_payments:
                for settler in payments.settlers.values():
                    if settler.on_outcome is None:
                        settler.on_outcome = hook

    async def _serve_ops(self, scope: Scope, send: Send) -> bool:
        if self.discovery is not None and await self.discovery.handle(scope, send):
            return True
        if self.metrics is not None and scope["method"] in ("GET", "HEAD"):
            if route_path(scope) == self.metrics.path:
                try:
                    store: PaymentStore | None = await self.open_store()
                except GatewayError:  # the database is down: the counters are still worth a scrape
                    store = None
                await self.metrics.handle(scope, send, store)
                return True
        return False

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

    async def startup(self) -> None:
        """Open the store and start the chain's settlers and recovery (idempotent; lifespan startup)."""
        store = await self.open_store()
        for payments in self._all_payments:
            await payments.start(store)

    async def shutdown(self) -> None:
        """Stop the settlers (they flush what they hold) and close the chain's clients (idempotent)."""
        all_payments, self._all_payments, self._payments = self._all_payments, [], None
        for payments in all_payments:
            await payments.stop()
            await payments.chain.aclose()

    @property
    def settlers(self) -> dict[str, ExactSettler | EscrowSettler]:
        """The settlers `chain=` runs, by scheme name (empty without `chain=`); the first chain's when
        there are several (see `network_settlers`)."""
        return {} if self._payments is None else self._payments.settlers

    @property
    def network_settlers(self) -> dict[str, dict[str, ExactSettler | EscrowSettler]]:
        """The settlers of every chain: network (CAIP-2) -> scheme name -> settler."""
        return {p.network: p.settlers for p in self._all_payments}

    def prices(self, scope: Scope) -> bool:
        """Whether this middleware charges the request `scope`. A `SessionPaywall` wrapping it uses this to
        share a route: requests without a session credential are answered here (one 402 carrying both
        paywalls' offers), requests paid over the session pass through here to the app."""
        return scope["type"] == "http" and self.routes.match(scope) is not None

    def _lifespan_receive(self, receive: Receive) -> Receive:
        # The store opens before the app's own startup runs, so the app's lifespan can hand it to a settler;
        # the settlers stop before the app's shutdown runs, while the store is still open.
        async def wrapped() -> Message:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await self.startup()
            elif message["type"] == "lifespan.shutdown":
                await self.shutdown()
            return message

        return wrapped

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            try:
                await self.app(scope, self._lifespan_receive(receive), send)
            finally:
                await self.shutdown()
                await self.close_store()  # after the app's shutdown, which may still settle
            return
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if (self.discovery is not None or self.metrics is not None) and await self._serve_ops(scope, send):
            return
        entry = self.routes.match(scope)
        if entry is None or scope.get(PAID_SCOPE_KEY) is True:
            # Unpriced, or already charged by an outer paywall (an MPP session on a route priced here too).
            await self.app(scope, receive, send)
            return
        if (self._store_url is not None and self._opened is None) or (
            self._payments is not None and self._payments.recovery is None
        ):
            try:
                await self.startup()  # no lifespan events from this server: open and start on first use
            except GatewayError:  # e.g. the database is down: 503, never a 500, and nothing is charged
                await _send_answer(send, _STORE_UNAVAILABLE)
                return
        bounded = BoundedBody(receive, self.body_timeout)
        request_receive: Receive = bounded
        receive = bounded
        if callable(entry.route.price):
            # A pricing function may read the body; each reader then gets its own replay of it. It is read
            # before any credential is checked, so its size and its time are bounded.
            try:
                body = await read_body(receive, scope["headers"], self.max_body_bytes)
            except BodyTimeout:
                await _send_answer(send, request_timeout_answer(self.body_timeout))
                return
            if body is None:
                await _send_answer(send, too_large_answer(self.max_body_bytes))
                return
            request_receive, receive = replay_body(body, receive), replay_body(body, receive)
        try:
            quote = await self.routes.quote(entry, Request(scope, request_receive))
        except GatewayError as exc:
            await _send_answer(send, _server_error(exc))
            return
        except Exception as exc:  # a pricing function that cannot read this request (no JSON body, ...)
            log.info("pricing %s failed: %s: %s", entry.key, type(exc).__name__, exc)
            await _send_answer(send, _UNPRICEABLE)
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
            self.observer.challenged(quote, answer.headers)
            await _send_answer(send, answer)
            return
        dialect, raw = found
        try:
            attempt = await paywall.verify(quote, offers, dialect, raw, host=host)
        except PaymentFailed as exc:
            await _send_answer(send, self._failure(quote, offers, host, exc, dialect))
            return

        held = Held(self.max_held_bytes, head=scope["method"] == "HEAD")
        extensions = scope.get("extensions") or {}
        if any(name in extensions for name in _UNBUFFERABLE):
            scope = {**scope, "extensions": {k: v for k, v in extensions.items() if k not in _UNBUFFERABLE}}
        app_send: Send = held.send
        meter: Meter | None = None
        if quote.metered:  # the handler reports its charge; `Settlement-Overrides` never leaves
            scope = dict(scope)
            meter = Meter(quote.amount, quote.asset.decimals)
            meter.install(scope)
            app_send = meter.wrap_send(held.send)
        try:
            await self.app(scope, receive, app_send)
        except Exception:
            # `TooLarge` or `BodyTimeout` (perhaps wrapped by the app) are answered below
            if not held.overflowed and not bounded.timed_out:
                await paywall.release(attempt)
                raise
        except BaseException:
            await paywall.release(attempt)
            raise
        if held.overflowed:
            # Too large to hold until settled: nothing of it is sent, so nothing is charged.
            await paywall.release(attempt)
            await _send_answer(send, HELD_TOO_LARGE)
            return
        if bounded.timed_out:  # whether the app let `BodyTimeout` through or answered (held, never sent)
            await paywall.release(attempt)
            await _send_answer(send, request_timeout_answer(self.body_timeout))
            return
        if held.start is None or held.status >= 400:
            await paywall.release(attempt)
            if held.start is not None:
                await held.flush(send)
            return
        try:
            receipt = await paywall.settle(attempt, actual=None if meter is None else meter.actual)
        except PaymentFailed as exc:
            await _send_answer(send, self._failure(quote, offers, host, exc, dialect))
            return
        await held.flush(send, receipt)

    def _failure(
        self, quote: Quote, offers: list[Offer], host: str, exc: PaymentFailed, dialect: Dialect | None
    ) -> Answer:
        schemes = {offer.scheme for offer in offers}
        self.observer.refused(quote, schemes.pop() if len(schemes) == 1 else "unknown", exc.code, dialect)
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


_UNPRICEABLE = Answer(
    status=400,
    headers=[(b"content-type", b"application/problem+json")],
    body=b'{"type":"about:blank","title":"Bad Request","status":400,'
    b'"detail":"the request could not be priced: check its body and parameters"}',
)

_STORE_UNAVAILABLE = Answer(
    status=503,
    headers=[(b"content-type", b"application/problem+json"), (b"retry-after", b"1")],
    body=b'{"type":"about:blank","title":"Service Unavailable","status":503,'
    b'"detail":"payment store unavailable"}',
)


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


def _chain_list(chain: Chain | Sequence[Chain] | None, chains: Sequence[Chain] | None) -> list[Chain]:
    if chain is not None and chains is not None:
        raise ConfigurationError("pass chain= or chains=, not both")
    listed: list[Chain] = (
        list(chains)
        if chains is not None
        else []
        if chain is None
        else list(chain)
        if isinstance(chain, Sequence)
        else [chain]
    )
    seen: set[str] = set()
    for c in listed:
        if c.network.network in seen:
            raise ConfigurationError(f"network {c.network.network} is given twice")
        seen.add(c.network.network)
    if chains is not None and not listed:
        raise ConfigurationError("chains= is empty")
    return listed


def _secret_list(secret: bytes | str | Sequence[bytes | str] | None) -> list[bytes]:
    if secret is None:
        return [_secrets.token_bytes(32)]
    items: Sequence[bytes | str] = [secret] if isinstance(secret, bytes | str) else secret
    keys = [s.encode() if isinstance(s, str) else bytes(s) for s in items]
    if not keys or any(len(k) < MIN_SECRET_BYTES for k in keys):
        raise ConfigurationError(f"MPP challenge secrets must be at least {MIN_SECRET_BYTES} bytes")
    return keys
