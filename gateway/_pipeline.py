"""verify -> claim -> (the app runs) -> settle or release: the payment pipeline, free of ASGI details.

A credential arrives in one of three dialects (`PAYMENT-SIGNATURE` x402 v2, `X-PAYMENT` x402 v1,
`Authorization: Payment` MPP). The pipeline decodes it, finds the offer it pays (v2: `accepted` must equal an
advertised requirement; v1: scheme + network; MPP: an HMAC-valid, unexpired challenge whose request and route
scope equal what this request would be offered now), lets the scheme verify it, and takes the atomic replay
claim. After the app answered, it settles (or enqueues) a success and releases the claim of a failure.
Settling before the response records the payment as in flight first (`<kind>:now`), so a crash while its
transaction is out is recoverable (`gateway._recovery`); `settle="deferred"` queues it atomically with the
receipt for a batching settler, unless the scheme's `settle_now` asks for this payment to settle first.
Every failure leaves as `PaymentFailed` carrying the x402 reason code; `x402.error_answer` turns that into
the status and problem type of the dialect.

The replay claim is bound to this request (the store's holder token) and kept alive while the handler and
the settlement run: a task renews it every third of `claim_ttl`. A slow handler is legitimate work, so it
is not failed when it outlives one TTL; what must never happen is that its claim lapses and a copy of the
credential is claimed and served meanwhile. Should renewing fail anyway (store outage, a stalled loop),
`complete` refuses a claim this request no longer holds (`claim_lost`), so at most one request serves it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from typing import Final, Literal

import msgspec

from escrow.chain._artifacts import EscrowError
from escrow.payments._exact_settler import fault_point
from x402 import Reason, X402Error

from ._answers import Challenger, Headers, ReplayStatus, receipt_headers, settle_failure_headers
from ._decode import check_realm, decode_mpp, decode_x402v1, decode_x402v2, host_name, log_binding
from ._errors import GatewayError, PaymentFailed
from ._metering import can_meter
from ._metrics import PaymentObserver
from ._pricing import Quote
from ._scheme import Dialect, Offer, Presented, Scheme, Verified, check_actual, in_flight_kind
from ._state import Event, PaymentState, Tracker
from ._store import ClaimLost, PaymentStore, Settlement, StoreError

__all__ = ["DEFAULT_REALM", "Attempt", "Paywall", "SettleMode", "as_payment_failed"]

SettleMode = Literal["before-response", "deferred"]

log = logging.getLogger("agentpay.gateway")

_PENDING = {Reason.SETTLEMENT_PENDING}

#: The MPP realm when none is configured (pympp's default too). Never the request's `Host`: the realm is
#: bound into the challenge id, and a client-chosen one could re-cut it (see `x402.check_bound_field`).
DEFAULT_REALM: Final = "localhost"


class Attempt:
    """One presented payment on its way through the pipeline."""

    __slots__ = (
        "actual",
        "dialect",
        "holder",
        "keeper",
        "offer",
        "presented",
        "scheme",
        "tracker",
        "verified",
    )

    def __init__(self, dialect: Dialect, offer: Offer, presented: Presented, scheme: Scheme) -> None:
        self.dialect = dialect
        self.offer = offer
        self.presented = presented
        self.scheme = scheme
        self.verified: Verified | None = None
        self.tracker = Tracker()
        self.holder = ""  # our token on the replay claim
        self.keeper: _ClaimKeeper | None = None  # renews the claim while the request runs
        self.actual: int | None = None  # a metered route's charge (None: the whole amount)

    @property
    def state(self) -> PaymentState:
        return self.tracker.state


#: What a payer is told when the gateway's own machinery fails. The store's or the node's own text (hosts,
#: ports, file paths, URLs, exception names) is for the operator's log, never for the `detail` of an answer.
_INFRASTRUCTURE_DETAILS = {
    "store_unavailable": "the payment store is unavailable; retry later",
    "chain_unreachable": "the chain node is unreachable; retry later",
}


def _infrastructure_failure(exc: Exception, code: str, status: int, *, during: str) -> PaymentFailed:
    log.warning("%s during %s: %s: %s", code, during, type(exc).__name__, exc)
    detail = _INFRASTRUCTURE_DETAILS.get(code) or f"the payment could not be processed ({code})"
    return PaymentFailed(detail, code=code, status_hint=status)


def as_payment_failed(exc: Exception, *, during: str) -> PaymentFailed:
    """Bring x402, escrow and store errors under the gateway's root, keeping their stable codes.

    A verdict on the payment (an x402 error, a 402 from the chain side) keeps its message, which speaks of
    the payer's own credential. A failure of the store, the node or the code itself gets a fixed message per
    code, which is what the payer sees in `detail`; its own text is logged.
    """
    if isinstance(exc, PaymentFailed):
        return exc
    if isinstance(exc, X402Error):
        return PaymentFailed(exc.message, code=exc.code, status_hint=exc.status_hint)
    if isinstance(exc, EscrowError):
        status = getattr(exc, "status_hint", 502)
        if status == 402:
            return PaymentFailed(str(exc), code=exc.code, status_hint=status)
        if exc.code == "chain_unreachable":  # the node is down, not the payment wrong: retry later
            return _infrastructure_failure(exc, exc.code, 503, during=during)
        return _infrastructure_failure(exc, f"unexpected_{during}_error", status, during=during)
    if isinstance(exc, StoreError):
        return _infrastructure_failure(exc, exc.code, exc.status_hint, during=during)
    return _infrastructure_failure(exc, f"unexpected_{during}_error", 500, during=during)


class _ClaimKeeper:
    """Renews a claim every third of its TTL until the request is done (see the module doc).

    A timer, not a task per request: nearly every request is done long before its first renewal is due,
    and a timer costs one heap entry to set and cancel, where a task costs a coroutine, a sleep and a
    cancellation. The renewal itself runs as a task, which `stop` cancels and waits for.
    """

    __slots__ = ("holder", "interval", "key", "store", "task", "timer", "ttl")

    def __init__(self, store: PaymentStore, key: str, holder: str, ttl: float) -> None:
        self.store, self.key, self.holder, self.ttl = store, key, holder, ttl
        self.interval = max(ttl / 3, 0.05)
        self.task: asyncio.Task[None] | None = None
        self.timer: asyncio.TimerHandle | None = asyncio.get_running_loop().call_later(
            self.interval, self._due
        )

    def _due(self) -> None:
        self.timer = None
        self.task = asyncio.get_running_loop().create_task(self._renew())

    async def _renew(self) -> None:
        try:
            await self.store.renew(self.key, self.holder, ttl=self.ttl)
        except ClaimLost:
            log.error("the claim on %s lapsed while its request ran; it will not be served", self.key)
            return
        except Exception as exc:  # an outage: try again; `complete` judges at the end
            log.warning("renewing the claim on %s failed: %r", self.key, exc)
        self.timer = asyncio.get_running_loop().call_later(self.interval, self._due)

    async def stop(self) -> None:
        timer, self.timer = self.timer, None
        if timer is not None:
            timer.cancel()
        task, self.task = self.task, None
        if task is not None and not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self.timer is not None:  # set by a renewal that finished as it was cancelled
            self.timer.cancel()
            self.timer = None


class Paywall:
    """The payment pipeline shared by every paid route of one middleware."""

    def __init__(
        self,
        schemes: Sequence[Scheme],
        *,
        store: PaymentStore,
        secrets: Sequence[bytes],
        realm: str | None = None,
        realm_hosts: Iterable[str] = (),
        settle: SettleMode = "before-response",
        challenge_ttl: float = 300.0,
        claim_ttl: float = 300.0,
        mpp_strict: bool = False,
        mpp_replay_status: ReplayStatus = 402,
        clock: Callable[[], float] = time.time,
        networks: Mapping[str, Sequence[Scheme]] | None = None,
    ) -> None:
        """`networks` (a gateway on several chains): each network's own schemes, by CAIP-2 id; an offer on
        one of them is verified and settled by that network's scheme, never another chain's."""
        if not schemes:
            raise GatewayError("at least one payment scheme is required", code="configuration_error")
        if settle not in ("before-response", "deferred"):
            raise GatewayError(f"unknown settle mode {settle!r}", code="configuration_error")
        if mpp_replay_status not in (402, 403):
            raise GatewayError(
                f"mpp_replay_status must be 402 or 403, not {mpp_replay_status!r}", code="configuration_error"
            )
        self.schemes = {scheme.name: scheme for scheme in schemes}
        self.networks = {net: {s.name: s for s in group} for net, group in (networks or {}).items()}
        self._store = store
        self.store = store
        self.secrets = list(secrets)
        self.realm = check_realm(realm if realm is not None else DEFAULT_REALM, "realm")
        self.realm_hosts = frozenset(check_realm(h, "realm_hosts entry").lower() for h in realm_hosts)
        self.settle_mode: SettleMode = settle
        self.claim_ttl = claim_ttl
        self.mpp_strict = mpp_strict
        self.clock = clock
        self.challenger = Challenger(self.secrets[0], ttl=challenge_ttl, replay_status=mpp_replay_status)
        self.observer: PaymentObserver | None = None  # telemetry; the middleware sets it

    @property
    def store(self) -> PaymentStore:
        return self._store

    @store.setter
    def store(self, store: PaymentStore) -> None:
        # Schemes that keep state in the store (`ExactScheme` reservations) follow the middleware's store,
        # which a URL-configured middleware swaps in at startup.
        self._store = store
        for group in (self.schemes, *self.networks.values()):
            for scheme in group.values():
                use_store = getattr(scheme, "use_store", None)
                if use_store is not None:
                    use_store(store)

    def realm_for(self, host: str) -> str:
        """The MPP realm of a request to `host` (its `Host` header): the host's own name when it is one of
        `realm_hosts`, else the configured `realm`. An unlisted `Host` never becomes the realm."""
        if self.realm_hosts:
            name = host_name(host)
            if name in self.realm_hosts:
                return name
        return self.realm

    def offers(self, quote: Quote) -> list[Offer]:
        if quote.assets:  # priced on several networks: each network's schemes, in the networks' order
            return [o for asset in quote.assets for o in self._offers(quote.on(asset), asset.network)]
        return self._offers(quote, None)

    def _offers(self, quote: Quote, network: str | None) -> list[Offer]:
        schemes = self.schemes if network is None else self.networks.get(network, self.schemes)
        names = quote.schemes or tuple(schemes)
        # A metered route (a maximum) is offered only in schemes that can settle for less: never `exact`.
        return [
            schemes[name].offer(quote)
            for name in names
            if name in schemes and (not quote.metered or can_meter(schemes[name]))
        ]

    def scheme_of(self, offer: Offer) -> Scheme:
        """The scheme that verifies and settles `offer`: its network's, when the gateway has several."""
        group = self.networks.get(offer.requirements.network) if self.networks else None
        return (group or self.schemes)[offer.scheme]

    # -- verify --------------------------------------------------------------------------------------------

    async def verify(
        self, quote: Quote, offers: Sequence[Offer], dialect: Dialect, raw: bytes, *, host: str
    ) -> Attempt:
        """Decode and verify a credential, then take its replay claim. Raises `PaymentFailed`."""
        now = self.clock()
        try:
            if dialect == "x402v2":
                offer, presented = decode_x402v2(raw, offers)
            elif dialect == "x402v1":
                offer, presented = decode_x402v1(raw, offers)
            else:
                realm = self.realm_for(host)
                offer, presented = decode_mpp(
                    raw, quote, offers, secrets=self.secrets, realm=realm, strict=self.mpp_strict, now=now
                )
            attempt = Attempt(dialect, offer, presented, self.scheme_of(offer))
            if self.observer is not None:
                attempt.tracker.listener = self.observer.watch(attempt, quote)
            attempt.verified = await attempt.scheme.verify(offer, presented, now=now)
        except Exception as exc:
            raise _retry_later(as_payment_failed(exc, during="verify")) from exc
        attempt.tracker.fire(Event.VERIFIED)
        if attempt.presented.bindings:
            log_binding(attempt.presented)
        verified = attempt.verified
        try:
            holder = await self.store.claim(_claim_key(verified), ttl=self.claim_ttl)
            # A resumed payment is served once: a receipt means another retry served it meanwhile.
            if (
                holder is not None
                and verified.resume
                and await self.store.get_receipt(verified.key) is not None
            ):
                await self.store.release(_claim_key(verified), holder)
                holder = None
        except StoreError as exc:
            await self._release_scheme(attempt.scheme, verified)
            raise as_payment_failed(exc, during="verify") from exc
        if holder is None:
            await self._release_scheme(attempt.scheme, verified)
            attempt.tracker.fire(Event.REPLAYED)
            if verified.resume and await self.store.get_receipt(verified.key) is None:
                raise _retry_later(
                    PaymentFailed(
                        "another request is confirming this payment", code=Reason.SETTLEMENT_PENDING
                    )
                )
            raise PaymentFailed("this payment was already presented", code=Reason.NONCE_ALREADY_USED)
        attempt.holder = holder
        attempt.keeper = _ClaimKeeper(self.store, _claim_key(verified), holder, self.claim_ttl)
        attempt.tracker.fire(Event.CLAIMED)
        reserve = getattr(attempt.scheme, "reserve", None)  # optional: see `gateway._scheme.Reserves`
        if reserve is not None:
            try:
                await reserve(verified)
            except Exception as exc:
                await self._stop_keeping(attempt)
                await self._free(attempt, verified)
                raise _retry_later(as_payment_failed(exc, during="verify")) from exc
        fault_point("after_verify")
        return attempt

    # -- after the app -------------------------------------------------------------------------------------

    @staticmethod
    async def _stop_keeping(attempt: Attempt) -> None:
        keeper, attempt.keeper = attempt.keeper, None
        if keeper is not None:
            await keeper.stop()

    async def release(self, attempt: Attempt) -> None:
        """The app failed: drop the claim, charge nothing; the same payment may be presented again."""
        attempt.tracker.fire(Event.HANDLER_FAILED)
        assert attempt.verified is not None
        await self._stop_keeping(attempt)
        await self._free(attempt, attempt.verified)

    async def settle(self, attempt: Attempt, *, actual: int | None = None) -> Headers:
        """The app succeeded: settle now (or enqueue), record the receipt; the receipt headers to add.

        `actual`: a metered route's charge (at most the signed maximum, see gateway._metering); 0 settles
        nothing and sends no transaction."""
        verified = attempt.verified
        assert verified is not None
        attempt.tracker.fire(Event.SERVED)
        now = self.clock()
        settle_now = getattr(attempt.scheme, "settle_now", None)
        if actual is not None:
            attempt.actual = check_actual(verified, actual)
        try:
            if attempt.actual == 0:
                return await self._settle_nothing(attempt, verified, now)
            if self.settle_mode == "deferred" and not (settle_now is not None and settle_now(verified)):
                return await self._enqueue(attempt, verified, now)
            return await self._settle_now(attempt, verified, now)
        finally:
            await self._stop_keeping(attempt)

    async def _settle_nothing(self, attempt: Attempt, verified: Verified, now: float) -> Headers:
        """A metered charge of 0: no transaction; the payment is complete and its holds are given back."""
        headers, receipt = receipt_headers(
            attempt.dialect, verified, tx_hash="", now=now, challenge=attempt.presented.challenge, amount=0
        )
        try:
            await attempt.scheme.settle(verified, actual=0)  # type: ignore[call-arg]  # Meters: sends nothing
            await self.store.complete(
                verified.key, attempt.holder, receipt=receipt, keep_until=verified.expires_at
            )
        except Exception as exc:
            attempt.tracker.fire(Event.SETTLE_FAILED)
            await self._free(attempt, verified)
            raise as_payment_failed(exc, during="settle") from exc
        attempt.tracker.fire(Event.SETTLED)
        return headers

    async def _settle_now(self, attempt: Attempt, verified: Verified, now: float) -> Headers:
        scheme, key = attempt.scheme, verified.key
        try:
            # Recorded before the transaction leaves: if this process dies from here on, recovery finds the
            # record and asks the chain what became of it (see gateway._recovery). A resumed payment's
            # record is the earlier attempt's (a second enqueue is a no-op).
            settlement = _settlement(scheme, verified, now, attempt.actual)
            kind = in_flight_kind(settlement.kind)
            await self.store.enqueue(msgspec.structs.replace(settlement, kind=kind))
        except Exception as exc:
            attempt.tracker.fire(Event.SETTLE_FAILED)
            await self._free(attempt, verified)  # nothing was sent
            raise as_payment_failed(exc, during="settle") from exc
        attempt.tracker.fire(Event.RECORDED)
        fault_point("after_handler")
        try:
            tx_hash = await (
                scheme.settle(verified)
                if attempt.actual is None
                else scheme.settle(verified, actual=attempt.actual)  # type: ignore[call-arg]  # Meters
            )
        except Exception as exc:
            failure = as_payment_failed(exc, during="settle")
            attempt.tracker.fire(Event.SETTLE_FAILED)
            log.warning("settlement of %s failed: %s (%s)", key, failure.code, failure.message)
            # A definite failure frees the payment and closes its record; an unknown outcome keeps the claim
            # until its TTL runs out and leaves the record to recovery, for the chain (the nonce is used or
            # not) to judge.
            if failure.status_hint == 402 and failure.code not in _PENDING:
                await self._free(attempt, verified)
                await self._quietly(
                    self.store.mark_failed(
                        key, error=f"{failure.code}: refused before serving: {failure.message}", retry_at=None
                    )
                )
            elif failure.code in _PENDING:
                # The transaction may still land. Its hash goes on the record, so the same credential
                # presented again waits for it (`Verified.resume`) instead of being refused as a replay.
                sent = getattr(exc, "tx_hash", "")
                error = f"{failure.code}: sent in {sent}" if sent else f"{failure.code}: {failure.message}"
                await self._quietly(self.store.mark_failed(key, error=error, retry_at=now))
                if verified.resume:
                    await self._quietly(self.store.release(_claim_key(verified), attempt.holder))
            failure.headers = settle_failure_headers(attempt.dialect, verified, failure.code)
            raise _retry_later(failure) from exc
        fault_point("after_send")
        headers, receipt = receipt_headers(
            attempt.dialect,
            verified,
            tx_hash=tx_hash,
            now=now,
            challenge=attempt.presented.challenge,
            amount=attempt.actual,
        )
        try:
            # Finalize first: a crash between the two leaves a finalized key with an open record, which
            # recovery settles from the chain; the other order could leave a paid key claimable.
            if verified.resume:  # the key's own claim may still be the first attempt's (or recovery's)
                await self.store.finalize(key, keep_until=verified.expires_at)
                await self.store.put_receipt(key, receipt)
                await self.store.complete(
                    _claim_key(verified), attempt.holder, receipt=receipt, keep_until=verified.expires_at
                )
                await self.store.mark_settled([key], tx_hash=tx_hash)
            else:  # claim finalized, receipt, in-flight record settled: one atomic step
                await self.store.complete_settled(
                    key, attempt.holder, receipt=receipt, tx_hash=tx_hash, keep_until=verified.expires_at
                )
        except Exception as exc:
            # The money has moved and the chain now refuses the nonce: serve the content; recovery closes
            # the record from the chain.
            log.error("settled %s in %s but could not record it: %s", key, tx_hash, exc)
        attempt.tracker.fire(Event.SETTLED)
        return headers

    async def _enqueue(self, attempt: Attempt, verified: Verified, now: float) -> Headers:
        headers, receipt = receipt_headers(
            attempt.dialect,
            verified,
            tx_hash="",
            now=now,
            challenge=attempt.presented.challenge,
            amount=attempt.actual,
        )
        try:
            settlement = _settlement(attempt.scheme, verified, now, attempt.actual)
            await self.store.complete(
                verified.key,
                attempt.holder,
                receipt=receipt,
                settlement=settlement,
                keep_until=verified.expires_at,
            )
        except Exception as exc:
            # Not queued means never settled: withhold the content and free the payment (unless the claim
            # lapsed: then it may be another request's now, and release refuses to touch it).
            failure = as_payment_failed(exc, during="settle")
            attempt.tracker.fire(Event.SETTLE_FAILED)
            await self._free(attempt, verified)
            raise failure from exc
        attempt.tracker.fire(Event.QUEUED)
        fault_point("after_handler")
        return headers

    async def _free(self, attempt: Attempt, verified: Verified) -> None:
        """Nothing will be charged: drop the claim and let the scheme give back what `verify` reserved."""
        await self._quietly(self.store.release(_claim_key(verified), attempt.holder))
        await self._release_scheme(attempt.scheme, verified)

    async def _release_scheme(self, scheme: Scheme, verified: Verified) -> None:
        release = getattr(scheme, "release", None)  # optional: see `gateway._scheme.Releases`
        if release is not None:
            await self._quietly(release(verified))

    @staticmethod
    async def _quietly(step: Awaitable[object]) -> None:
        # Clean-up after a failure must not mask the failure: a claim left behind expires with its TTL.
        try:
            await step
        except Exception as exc:
            log.error("clean-up after a refused payment failed: %r", exc)


def _settlement(scheme: Scheme, verified: Verified, now: float, actual: int | None) -> Settlement:
    if actual is None:
        return scheme.settlement(verified, now=now)
    return scheme.settlement(verified, now=now, actual=actual)  # type: ignore[call-arg]  # Meters


def _claim_key(verified: Verified) -> str:
    """The replay claim an attempt holds: the payment's key, or `<key>#resume` for a resumed payment."""
    return verified.key + "#resume" if verified.resume else verified.key


#: Seconds a client is asked to wait before presenting a payment whose settlement is pending again.
RETRY_AFTER_SECONDS = 2


def _retry_later(failure: PaymentFailed) -> PaymentFailed:
    if failure.code in _PENDING:
        failure.headers.append((b"retry-after", str(RETRY_AFTER_SECONDS).encode()))
    return failure
