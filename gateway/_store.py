"""The one interface behind which the gateway keeps every piece of shared state.

Replay claims, receipts, the settlement queue, pending spend and channel high-water marks all live behind
`PaymentStore`, so one gateway process (SQLite), many replicas (PostgreSQL) and unit tests (memory) run the
same pipeline. Every method is atomic on its own; the pipeline never needs a multi-call transaction.
"""

from __future__ import annotations

import asyncio
import time
from typing import Literal, Protocol

import msgspec

__all__ = ["MemoryStore", "PaymentStore", "QueueStats", "Settlement", "SettlementState"]

SettlementState = Literal["queued", "leased", "settled", "failed", "dead"]


class Settlement(msgspec.Struct, frozen=True, kw_only=True):
    """One served payment waiting to reach the chain.

    `key` is the replay key of the payment (unique); `kind` names the settler that handles it (`exact`,
    `escrow`, ...); `payload` is the settler's own encoding of the signed payment.
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


class QueueStats(msgspec.Struct, frozen=True, kw_only=True):
    """What an operator sees: how many settlements sit in each state."""

    queued: int
    leased: int
    settled: int
    failed: int
    dead: int


class PaymentStore(Protocol):
    """Shared gateway state. Implementations: memory (tests), SQLite (default), PostgreSQL, Redis in front."""

    async def claim(self, key: str, *, ttl: float) -> bool:
        """Atomically claim `key` unless a live claim holds it. An expired claim may be taken again."""
        ...

    async def release(self, key: str) -> None:
        """Drop a claim that was never finalized (the handler failed: nothing is charged)."""
        ...

    async def finalize(self, key: str) -> None:
        """Make a claim permanent: the payment was served, the key can never be claimed again."""
        ...

    async def put_receipt(self, key: str, receipt: bytes) -> None:
        """Record the receipt sent for the payment `key`."""
        ...

    async def get_receipt(self, key: str) -> bytes | None:
        """The receipt recorded for `key`, if any."""
        ...

    async def enqueue(self, item: Settlement) -> None:
        """Durably queue a settlement; a second enqueue of the same key is a no-op."""
        ...

    async def lease(self, kind: str, *, limit: int, lease_seconds: float) -> list[Settlement]:
        """Lease up to `limit` due settlements of `kind` (queued, retry due, or lease expired)."""
        ...

    async def mark_settled(self, keys: list[str], *, tx_hash: str) -> None:
        """Record that `keys` settled in transaction `tx_hash`."""
        ...

    async def mark_failed(self, key: str, *, error: str, retry_at: float | None) -> None:
        """Record a failure: retry at `retry_at`, or move to the dead letters when it is None."""
        ...

    async def get_settlement(self, key: str) -> Settlement | None:
        """The settlement queued under `key`, in its current state."""
        ...

    async def stats(self) -> QueueStats:
        """Counts per state, for operators and metrics."""
        ...

    async def add_pending(self, account: str, amount: int, *, limit: int) -> bool:
        """Atomically add `amount` to `account`'s pending spend unless the total would pass `limit`."""
        ...

    async def sub_pending(self, account: str, amount: int) -> None:
        """Remove settled (or released) spend from `account`'s pending total."""
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


class MemoryStore:
    """In-process store for unit tests and single-process demos; forgets everything on exit."""

    def __init__(self) -> None:
        self._lock = asyncio.Lock()
        self._claims: dict[str, float] = {}  # key -> expiry (inf once finalized)
        self._receipts: dict[str, bytes] = {}
        self._queue: dict[str, Settlement] = {}
        self._retry_at: dict[str, float] = {}
        self._lease_until: dict[str, float] = {}
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

    async def put_receipt(self, key: str, receipt: bytes) -> None:
        self._receipts[key] = receipt

    async def get_receipt(self, key: str) -> bytes | None:
        return self._receipts.get(key)

    async def enqueue(self, item: Settlement) -> None:
        self._queue.setdefault(item.key, msgspec.structs.replace(item, state="queued"))

    async def lease(self, kind: str, *, limit: int, lease_seconds: float) -> list[Settlement]:
        now = time.time()
        out: list[Settlement] = []
        async with self._lock:
            for key, item in self._queue.items():
                if len(out) >= limit:
                    break
                if item.kind != kind:
                    continue
                due = (
                    item.state == "queued"
                    or (item.state == "failed" and self._retry_at.get(key, 0.0) <= now)
                    or (item.state == "leased" and self._lease_until.get(key, 0.0) <= now)
                )
                if not due:
                    continue
                leased = msgspec.structs.replace(item, state="leased", attempts=item.attempts + 1)
                self._queue[key] = leased
                self._lease_until[key] = now + lease_seconds
                out.append(leased)
        return out

    async def mark_settled(self, keys: list[str], *, tx_hash: str) -> None:
        for key in keys:
            item = self._queue.get(key)
            if item is not None:
                self._queue[key] = msgspec.structs.replace(item, state="settled", tx_hash=tx_hash, error=None)

    async def mark_failed(self, key: str, *, error: str, retry_at: float | None) -> None:
        item = self._queue.get(key)
        if item is None:
            return
        state: SettlementState = "dead" if retry_at is None else "failed"
        self._queue[key] = msgspec.structs.replace(item, state=state, error=error)
        if retry_at is not None:
            self._retry_at[key] = retry_at

    async def get_settlement(self, key: str) -> Settlement | None:
        return self._queue.get(key)

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
