"""The one interface behind which the gateway keeps every piece of shared state.

Replay claims, receipts, the settlement queue, pending spend and channel high-water marks all live behind
`PaymentStore`, so one gateway process (SQLite), many replicas (PostgreSQL, optionally with a Redis claim
cache in front) and unit tests (memory) run the same pipeline. Every method is atomic on its own; `complete`
is the one multi-step operation, atomic as a whole, so a served payment can never be finalized without its
settlement being queued. Backends are picked by URL with `open_store` (see `gateway/_stores`).

Times are Unix seconds from the caller's clock (`time.time()`); replicas need clocks in sync to well
under a claim's TTL. Amounts are non-negative integers of any size (uint256 fits).
"""

from __future__ import annotations

import random
import time
from collections.abc import Sequence
from typing import Literal, Protocol

import msgspec

from gateway._errors import GatewayError

__all__ = [
    "MemoryStore",
    "PaymentStore",
    "QueueStats",
    "Settlement",
    "SettlementState",
    "StoreConfigError",
    "StoreError",
    "StoreSchemaError",
    "StoreUnavailable",
    "backoff",
    "open_store",
]

SettlementState = Literal["queued", "leased", "settled", "failed", "dead"]


class StoreError(GatewayError):
    """Root of the store's errors (a `GatewayError`: stable `code`, HTTP `status_hint`)."""

    default_code = "store_error"


class StoreConfigError(StoreError):
    """A store URL or option that cannot be used (unknown scheme, bad schema name, ...)."""

    default_code = "store_config_invalid"


class StoreUnavailable(StoreError):
    """The backing database or cache cannot be reached or is locked; retrying later may succeed."""

    default_code = "store_unavailable"
    default_status = 503


class StoreSchemaError(StoreError):
    """The database carries migrations newer than this code knows: refuse rather than corrupt it."""

    default_code = "store_schema_too_new"


class Settlement(msgspec.Struct, frozen=True, kw_only=True):
    """One served payment waiting to reach the chain.

    `key` is the replay key of the payment (unique); `kind` names the settler that handles it (`exact`,
    `escrow`, ...); `payload` is the settler's own encoding of the signed payment. `attempts` counts leases
    handed out; `retry_at` / `lease_until` are set by the queue and shown to operators.
    """

    key: str
    kind: str
    payload: bytes
    payer: str
    amount: int
    created_at: float
    attempts: int = 0
    state: SettlementState = "queued"
    tx_hash: str | None = None
    error: str | None = None
    retry_at: float | None = None
    lease_until: float | None = None


class QueueStats(msgspec.Struct, frozen=True, kw_only=True):
    """What an operator sees: how many settlements sit in each state (`failed` = waiting for a retry)."""

    queued: int
    leased: int
    settled: int
    failed: int
    dead: int


class PaymentStore(Protocol):
    """Shared gateway state. Implementations: memory (tests), SQLite (default), PostgreSQL, Redis in front."""

    async def claim(self, key: str, *, ttl: float) -> bool:
        """Atomically claim `key` unless a live or finalized claim holds it. An expired claim may be taken."""
        ...

    async def release(self, key: str) -> None:
        """Drop a claim that was never finalized (the handler failed: nothing is charged)."""
        ...

    async def finalize(self, key: str) -> None:
        """Make a claim permanent: the payment was served, the key can never be claimed again."""
        ...

    async def is_finalized(self, key: str) -> bool:
        """True once `finalize` (or `complete`) ran for `key`."""
        ...

    async def complete(self, key: str, *, receipt: bytes, settlement: Settlement | None = None) -> None:
        """`finalize` + `put_receipt` + `enqueue` (when given) as one atomic step, in one round trip.

        Prefer it to the three calls: a crash between them could leave a served payment finalized but
        never queued for settlement.
        """
        ...

    async def purge_expired_claims(self) -> int:
        """Delete claims that expired unfinalized (housekeeping); returns how many went."""
        ...

    async def put_receipt(self, key: str, receipt: bytes) -> None:
        """Record the receipt sent for the payment `key` (a second put replaces it)."""
        ...

    async def get_receipt(self, key: str) -> bytes | None:
        """The receipt recorded for `key`, if any."""
        ...

    async def enqueue(self, item: Settlement) -> None:
        """Durably queue a settlement (as `queued`, 0 attempts); a second enqueue of the key is a no-op."""
        ...

    async def lease(self, kind: str, *, limit: int, lease_seconds: float) -> list[Settlement]:
        """Lease up to `limit` due settlements of `kind` (queued, retry due, or lease expired), oldest first.

        Each leased item has `attempts` incremented. No item is handed to two leasers at once; an item
        whose lease ran out (its settler crashed) is due again.
        """
        ...

    async def mark_settled(self, keys: list[str], *, tx_hash: str) -> None:
        """Record that `keys` settled in transaction `tx_hash` (final, whatever state they were in)."""
        ...

    async def mark_failed(self, key: str, *, error: str, retry_at: float | None) -> None:
        """Record a failure: retry at `retry_at` (see `backoff`), or a dead letter when None.

        Ignored for a settled item: a late failure report never undoes a settlement.
        """
        ...

    async def get_settlement(self, key: str) -> Settlement | None:
        """The settlement queued under `key`, in its current state."""
        ...

    async def dead_letters(self, *, kind: str | None = None, limit: int = 100) -> list[Settlement]:
        """Settlements given up on (oldest first), for an operator to inspect and `requeue`."""
        ...

    async def requeue(self, key: str) -> bool:
        """Operator action: put a dead (or retry-waiting) item back as due now with 0 attempts."""
        ...

    async def stats(self) -> QueueStats:
        """Counts per state, for operators and metrics."""
        ...

    async def add_pending(self, account: str, amount: int, *, limit: int) -> bool:
        """Atomically add `amount` to `account`'s pending spend unless the total would pass `limit`."""
        ...

    async def sub_pending(self, account: str, amount: int) -> None:
        """Remove settled (or released) spend from `account`'s pending total (never below 0)."""
        ...

    async def get_pending(self, account: str) -> int:
        """The unsettled amount currently counted against `account`."""
        ...

    async def raise_high_water(self, channel_id: str, cumulative: int) -> bool:
        """Atomically move a channel's high-water mark up to `cumulative`; False if it is not higher."""
        ...

    async def high_water(self, channel_id: str) -> int:
        """The highest cumulative voucher amount accepted on a channel (0 if none)."""
        ...

    async def close(self) -> None:
        """Release connections and files."""
        ...

    async def list_settlements(
        self,
        *,
        states: Sequence[str] | None = None,
        kind: str | None = None,
        payer: str | None = None,
        since: float | None = None,
        limit: int = 100,
        offset: int = 0,
        oldest_first: bool = False,
    ) -> list[Settlement]:
        """Read-only: settlements matching every filter given, newest first (or `oldest_first`), paged.

        `states`: any of these states; `kind`: exactly this kind (`exact`, `exact:now`, ...); `payer`: this
        payer address (any case); `since`: created at or after this time. For dashboards and metrics.
        """
        ...


def backoff(attempts: int, *, base: float = 1.0, cap: float = 300.0, jitter: float = 0.0) -> float:
    """Seconds to wait before retry number `attempts` (1 after the first failure): base·2^(n-1), capped.

    `jitter` in [0, 1] shaves up to that fraction off at random so replicas do not retry in lockstep.
    Use: `retry_at = time.time() + backoff(item.attempts)`.
    """
    delay = min(cap, base * 2.0 ** min(max(attempts - 1, 0), 62))
    return delay * (1.0 - jitter * random.random()) if jitter else delay


async def open_store(url: str) -> PaymentStore:
    """Open the store named by `url` (memory://, sqlite:///, postgresql://, ...?cache=redis://)."""
    from gateway._stores import open_store as _open  # backends import drivers lazily

    return await _open(url)


def _due(item: Settlement, now: float) -> bool:
    if item.state == "queued":
        return True
    if item.state == "failed":
        return (item.retry_at or 0.0) <= now
    return item.state == "leased" and (item.lease_until or 0.0) <= now


class MemoryStore:
    """In-process store for unit tests and single-process demos; forgets everything on exit.

    No method awaits, so each runs to completion on the event loop: that is its atomicity.
    """

    def __init__(self) -> None:
        self._claims: dict[str, float] = {}  # key -> expiry (inf once finalized)
        self._receipts: dict[str, bytes] = {}
        self._queue: dict[str, Settlement] = {}
        self._pending: dict[str, int] = {}
        self._high_water: dict[str, int] = {}

    async def claim(self, key: str, *, ttl: float) -> bool:
        now = time.time()
        expiry = self._claims.get(key)
        if expiry is not None and expiry > now:
            return False
        self._claims[key] = now + ttl
        return True

    async def release(self, key: str) -> None:
        if self._claims.get(key) != float("inf"):
            self._claims.pop(key, None)

    async def finalize(self, key: str) -> None:
        self._claims[key] = float("inf")

    async def is_finalized(self, key: str) -> bool:
        return self._claims.get(key) == float("inf")

    async def complete(self, key: str, *, receipt: bytes, settlement: Settlement | None = None) -> None:
        self._claims[key] = float("inf")
        self._receipts[key] = receipt
        if settlement is not None:
            self._enqueue(settlement)

    async def purge_expired_claims(self) -> int:
        now = time.time()
        expired = [key for key, expiry in self._claims.items() if expiry <= now]
        for key in expired:
            del self._claims[key]
        return len(expired)

    async def put_receipt(self, key: str, receipt: bytes) -> None:
        self._receipts[key] = receipt

    async def get_receipt(self, key: str) -> bytes | None:
        return self._receipts.get(key)

    async def enqueue(self, item: Settlement) -> None:
        self._enqueue(item)

    def _enqueue(self, item: Settlement) -> None:
        fresh = msgspec.structs.replace(
            item, state="queued", attempts=0, tx_hash=None, error=None, retry_at=None, lease_until=None
        )
        self._queue.setdefault(item.key, fresh)

    async def lease(self, kind: str, *, limit: int, lease_seconds: float) -> list[Settlement]:
        now = time.time()
        due = sorted(
            (item for item in self._queue.values() if item.kind == kind and _due(item, now)),
            key=lambda item: (item.created_at, item.key),
        )
        out: list[Settlement] = []
        for item in due[: max(limit, 0)]:
            leased = msgspec.structs.replace(
                item,
                state="leased",
                attempts=item.attempts + 1,
                lease_until=now + lease_seconds,
                retry_at=None,
            )
            self._queue[item.key] = leased
            out.append(leased)
        return out

    async def mark_settled(self, keys: list[str], *, tx_hash: str) -> None:
        for key in keys:
            item = self._queue.get(key)
            if item is not None:
                self._queue[key] = msgspec.structs.replace(
                    item, state="settled", tx_hash=tx_hash, error=None, retry_at=None, lease_until=None
                )

    async def mark_failed(self, key: str, *, error: str, retry_at: float | None) -> None:
        item = self._queue.get(key)
        if item is None or item.state == "settled":
            return
        state: SettlementState = "dead" if retry_at is None else "failed"
        self._queue[key] = msgspec.structs.replace(
            item, state=state, error=error, retry_at=retry_at, lease_until=None
        )

    async def get_settlement(self, key: str) -> Settlement | None:
        return self._queue.get(key)

    async def dead_letters(self, *, kind: str | None = None, limit: int = 100) -> list[Settlement]:
        dead = [i for i in self._queue.values() if i.state == "dead" and (kind is None or i.kind == kind)]
        return sorted(dead, key=lambda item: (item.created_at, item.key))[: max(limit, 0)]

    async def requeue(self, key: str) -> bool:
        item = self._queue.get(key)
        if item is None or item.state not in ("dead", "failed"):
            return False
        self._queue[key] = msgspec.structs.replace(item, state="queued", attempts=0, retry_at=None)
        return True

    async def stats(self) -> QueueStats:
        counts = {"queued": 0, "leased": 0, "settled": 0, "failed": 0, "dead": 0}
        for item in self._queue.values():
            counts[item.state] += 1
        return QueueStats(**counts)

    async def add_pending(self, account: str, amount: int, *, limit: int) -> bool:
        current = self._pending.get(account, 0)
        if current + amount > limit:
            return False
        self._pending[account] = current + amount
        return True

    async def sub_pending(self, account: str, amount: int) -> None:
        self._pending[account] = max(0, self._pending.get(account, 0) - amount)

    async def get_pending(self, account: str) -> int:
        return self._pending.get(account, 0)

    async def raise_high_water(self, channel_id: str, cumulative: int) -> bool:
        if cumulative <= self._high_water.get(channel_id, 0):
            return False
        self._high_water[channel_id] = cumulative
        return True

    async def high_water(self, channel_id: str) -> int:
        return self._high_water.get(channel_id, 0)

    async def close(self) -> None:
        return None

    async def list_settlements(
        self,
        *,
        states: Sequence[str] | None = None,
        kind: str | None = None,
        payer: str | None = None,
        since: float | None = None,
        limit: int = 100,
        offset: int = 0,
        oldest_first: bool = False,
    ) -> list[Settlement]:
        wanted = None if states is None else set(states)
        who = None if payer is None else payer.lower()
        rows = [
            item
            for item in self._queue.values()
            if (wanted is None or item.state in wanted)
            and (kind is None or item.kind == kind)
            and (who is None or item.payer.lower() == who)
            and (since is None or item.created_at >= since)
        ]
        rows.sort(key=lambda item: (item.created_at, item.key), reverse=not oldest_first)
        start = max(offset, 0)
        return rows[start : start + max(limit, 0)]
