"""Telemetry: Prometheus metrics and structured payment logs, fed by the pipeline's state transitions.

`PaymentObserver` listens on each attempt's `Tracker` (one call per transition, no I/O) and on the
middleware's 402s and refusals. It always writes log records to the `agentpay.payments` logger (only when
that logger is enabled for INFO, so a silent logger costs one level check); with a `Metrics` it also counts.

Every record about a payment carries `payment_id` (see `payment_id`): a short hash of the payment's replay
key, so the same id is computed by the gateway that verified it, by any replica, and by the settler that
settles it later from the queue (`Settlement.key`). A 402 answer carries `challenge_ids` (the MPP challenge
ids it issued); the record of an MPP credential verified later carries the same `challenge_id`, which links
the 402 to the payment. Other fields: `event`, `state`, `route`, `scheme`, `payer`, `amount`, `reason`.

`Metrics` owns a Prometheus registry. Counters and the latency histogram are updated in process; the queue
gauges (depth per state, age of the oldest due item, dead letters) are read from the store's `stats()` and
`list_settlements` when `/metrics` is scraped, so they are the same on every replica sharing the store.
Settlers report their outcomes (gas, latency of deferred settlements) through `Metrics.settler_hook(store)`,
their `on_outcome` callback; `PaymentMiddleware(chain=..., metrics=...)` installs it on the settlers it runs.
"""

from __future__ import annotations

import hashlib
import logging
import re
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, Any

from starlette.types import Scope, Send

from ._state import Event, PaymentState

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry

    from escrow.payments._settler import SettleOutcome

    from ._pipeline import Attempt
    from ._pricing import Quote
    from ._store import PaymentStore

__all__ = ["Metrics", "PaymentObserver", "payment_id"]

log = logging.getLogger("agentpay.payments")

#: Settlement latency buckets (seconds): a devnet settles in milliseconds, a batch waits up to its max age,
#: a congested chain takes minutes.
_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0)
_DUE_STATES = ("queued", "failed", "leased")
_CHALLENGE_ID = re.compile(rb'(?:^|[\s,])id="([^"]+)"')


def payment_id(key: str) -> str:
    """The log id of the payment with replay key `key`: `pay_` + 16 hex digits of its SHA-256."""
    return "pay_" + hashlib.sha256(key.encode()).hexdigest()[:16]


class Metrics:
    """Prometheus metrics of one gateway process (`PaymentMiddleware(metrics=Metrics())` or `metrics=True`).

    Served at `path` (default `/metrics`) by the middleware, in the Prometheus text format. Pass your own
    `registry` to serve them from an existing exporter instead.
    """

    def __init__(self, registry: CollectorRegistry | None = None, *, path: str = "/metrics") -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.path = path
        r = self.registry = registry if registry is not None else CollectorRegistry()
        self.challenges = Counter(
            "agentpay_challenges", "402 answers sent to requests without a credential", ["route"], registry=r
        )
        self.verified = Counter(
            "agentpay_payments_verified", "payments verified and claimed", ["scheme", "route"], registry=r
        )
        self.served = Counter(
            "agentpay_payments_served",
            "paid responses delivered (settled before the response, or queued)",
            ["scheme", "route", "settle"],
            registry=r,
        )
        self.earned = Counter(
            "agentpay_payments_amount",
            "atomic token units of the payments served",
            ["scheme", "route", "asset"],
            registry=r,
        )
        self.refused = Counter(
            "agentpay_payments_refused",
            "payments refused, by x402/MPP reason code",
            ["scheme", "reason", "route"],
            registry=r,
        )
        self.released = Counter(
            "agentpay_payments_released",
            "verified payments not charged because the handler failed",
            ["scheme", "route"],
            registry=r,
        )
        self.settle_seconds = Histogram(
            "agentpay_settlement_seconds",
            "time from a payment being served to its settlement on chain",
            ["kind", "mode"],
            buckets=_BUCKETS,
            registry=r,
        )
        self.outcomes = Counter(
            "agentpay_settlements",
            "settler outcomes (settled, retry, dead, ...)",
            ["kind", "status"],
            registry=r,
        )
        self.gas = Counter(
            "agentpay_settlement_gas", "gas used by settlement transactions", ["kind"], registry=r
        )
        self.queue = Gauge(
            "agentpay_settlement_queue", "settlements in the store, by state", ["state"], registry=r
        )
        self.queue_age = Gauge(
            "agentpay_settlement_queue_oldest_seconds",
            "age of the oldest settlement not yet settled (queued, leased or waiting for a retry)",
            registry=r,
        )
        self.dead_letters = Gauge("agentpay_dead_letters", "settlements given up on", registry=r)
        self.scrape_errors = Counter(
            "agentpay_metrics_store_errors", "scrapes whose store read failed", registry=r
        )

    async def settle_outcome(
        self, outcome: SettleOutcome, *, kind: str = "", created_at: float | None = None
    ) -> None:
        """Count one settler outcome; `created_at` (its queued item's) gives its settlement latency."""
        kind = kind or outcome.key.partition(":")[0]
        self.outcomes.labels(kind, outcome.status).inc()
        if outcome.gas:
            self.gas.labels(kind).inc(outcome.gas)
        if created_at is not None and outcome.status in ("settled", "settled_elsewhere"):
            self.settle_seconds.labels(kind, "deferred").observe(max(0.0, time.time() - created_at))
        if outcome.status in ("settled", "settled_elsewhere", "dead"):
            log.info(
                "settlement %s",
                outcome.status,
                extra={
                    "payment_id": payment_id(outcome.key),
                    "event": "settlement_" + outcome.status,
                    "tx_hash": outcome.tx_hash,
                    "reason": outcome.code,
                    "payer": outcome.payer,
                    "amount": outcome.amount,
                },
            )

    def settler_hook(
        self, store: PaymentStore | Callable[[], PaymentStore]
    ) -> Callable[[SettleOutcome], Awaitable[None]]:
        """A settler's `on_outcome` (`ExactSettler`, `EscrowSettler`): counts the outcome and its gas, and
        observes its latency from the queued item's age. `store` may be a function returning the store in
        use (the middleware's, once opened). `PaymentMiddleware(chain=..., metrics=...)` installs it."""

        async def hook(outcome: SettleOutcome) -> None:
            try:
                active = store() if callable(store) else store
                item = await active.get_settlement(outcome.key)
            except Exception:  # metrics never fail a settlement
                item = None
            await self.settle_outcome(outcome, created_at=None if item is None else item.created_at)

        return hook

    async def collect_store(self, store: PaymentStore) -> None:
        """Refresh the queue gauges from the store (at scrape time)."""
        try:
            stats = await store.stats()
            oldest = await store.list_settlements(states=_DUE_STATES, limit=1, oldest_first=True)
        except Exception as exc:  # a scrape must answer even when the store is down
            self.scrape_errors.inc()
            log.warning("metrics: store read failed: %s", type(exc).__name__)
            return
        for state in ("queued", "leased", "settled", "failed", "dead"):
            self.queue.labels(state).set(getattr(stats, state))
        self.dead_letters.set(stats.dead)
        self.queue_age.set(max(0.0, time.time() - oldest[0].created_at) if oldest else 0.0)

    async def handle(self, scope: Scope, send: Send, store: PaymentStore | None) -> None:
        """Answer a scrape; `store` None: it could not be opened (counted, the queue gauges keep their
        last values)."""
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        if store is None:
            self.scrape_errors.inc()
        else:
            await self.collect_store(store)
        body = generate_latest(self.registry)
        headers = [
            (b"content-type", CONTENT_TYPE_LATEST.encode()),
            (b"content-length", str(len(body)).encode()),
        ]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": b"" if scope["method"] == "HEAD" else body})


class PaymentObserver:
    """Turns pipeline transitions into log records and (with `metrics`) counter updates."""

    def __init__(self, metrics: Metrics | None = None) -> None:
        self.metrics = metrics

    def watch(self, attempt: Attempt, quote: Quote) -> Callable[[PaymentState, Event], None]:
        """The listener for one attempt's tracker."""
        metrics = self.metrics
        started = [0.0]

        def on_fire(state: PaymentState, event: Event) -> None:
            verified = attempt.verified
            scheme = attempt.scheme.name
            if metrics is not None:
                if event is Event.CLAIMED:
                    metrics.verified.labels(scheme, quote.route).inc()
                elif event is Event.SERVED or event is Event.RECORDED:
                    started[0] = time.perf_counter()
                elif event is Event.SETTLED or event is Event.QUEUED:
                    settle = "deferred" if event is Event.QUEUED else "before-response"
                    metrics.served.labels(scheme, quote.route, settle).inc()
                    amount = verified.amount if verified is not None else 0
                    # the asset of the offer paid: on a route priced on several chains, that chain's token
                    asset = attempt.offer.requirements.asset
                    metrics.earned.labels(scheme, quote.route, asset).inc(amount)
                    if event is Event.SETTLED:
                        metrics.settle_seconds.labels(scheme, "before-response").observe(
                            time.perf_counter() - started[0]
                        )
                elif event is Event.HANDLER_FAILED:
                    metrics.released.labels(scheme, quote.route).inc()
                # refusals (a replay, a failed settlement) are counted once, by `refused`
            if log.isEnabledFor(logging.INFO):
                extra: dict[str, Any] = {"event": str(event), "state": str(state), "route": quote.route}
                extra["scheme"] = scheme
                extra["dialect"] = attempt.dialect
                if verified is not None:
                    extra.update(
                        payment_id=payment_id(verified.key), payer=verified.payer, amount=verified.amount
                    )
                challenge = attempt.presented.challenge
                if challenge is not None:
                    extra["challenge_id"] = challenge.id
                log.info("payment %s -> %s", event, state, extra=extra)

        return on_fire

    def challenged(self, quote: Quote, headers: Sequence[tuple[bytes, bytes]]) -> None:
        if self.metrics is not None:
            self.metrics.challenges.labels(quote.route).inc()
        if log.isEnabledFor(logging.INFO):
            ids = [
                match.decode()
                for name, value in headers
                if name.lower() == b"www-authenticate"
                for match in _CHALLENGE_ID.findall(value)
            ]
            extra = {"event": "challenge", "route": quote.route, "amount": quote.amount, "challenge_ids": ids}
            log.info("402 for %s", quote.route, extra=extra)

    def refused(self, quote: Quote, scheme: str, reason: str, dialect: str | None) -> None:
        if self.metrics is not None:
            self.metrics.refused.labels(scheme, reason, quote.route).inc()
        if log.isEnabledFor(logging.INFO):
            extra = {
                "event": "refused",
                "route": quote.route,
                "scheme": scheme,
                "reason": reason,
                "dialect": dialect,
            }
            log.info("payment refused: %s", reason, extra=extra)
