"""`MemoryStore`: the in-process `PaymentStore` for unit tests and single-process demos (`memory://`)."""

from __future__ import annotations

import math
import time
from collections.abc import Sequence

import msgspec

from gateway._store import ClaimLost, Purged, QueueStats, Settlement, SettlementState, new_token

__all__ = ["MemoryStore"]


def _due(item: Settlement, now: float) -> bool:
    if item.state == "queued":
        return True
    if item.state == "failed":
        return (item.retry_at or 0.0) <= now
    return item.state == "leased" and (item.lease_until or 0.0) <= now


def _ours(item: Settlement | None, lease: str | None) -> bool:
    """May this caller record `item`'s outcome: unsettled, and still its lease when it names one."""
    if item is None or item.state == "settled":
        return False
    return lease is None or (item.state == "leased" and item.lease_token == lease)


def _purgeable(until: float | None, done_at: float | None, retention: float, now: float) -> bool:
    """Past both its validity (`until`; None: unknown, kept) and its retention since `done_at`."""
    return until is not None and done_at is not None and until <= now and done_at + retention <= now


class _Claim(msgspec.Struct):
    expires_at: float  # a live claim's end; once finalized, the payment's validity end (inf: unknown)
    holder: str | None
    finalized_at: float | None = None  # None: not finalized


class MemoryStore:
    """In-process store for unit tests and single-process demos; forgets everything on exit.

    No method awaits, so each runs to completion on the event loop: that is its atomicity.
    """

    def __init__(self) -> None:
        self._claims: dict[str, _Claim] = {}
        self._receipts: dict[str, bytes] = {}
        self._queue: dict[str, Settlement] = {}
        # Keys of the records a settler may still lease (queued, leased, failed): a poll looks at these only,
        # not at every settled record kept until the purge.
        self._open: set[str] = set()
        self._pending: dict[str, int] = {}
        self._high_water: dict[str, int] = {}
        self._vouchers: dict[str, bytes] = {}

    def _held(self, key: str, holder: str, now: float) -> _Claim:
        claim = self._claims.get(key)
        if (
            claim is None
            or claim.finalized_at is not None
            or claim.holder != holder
            or claim.expires_at <= now
        ):
            raise ClaimLost(f"the claim on {key} is no longer held by this request")
        return claim

    async def claim(self, key: str, *, ttl: float) -> str | None:
        now = time.time()
        claim = self._claims.get(key)
        if claim is not None and (claim.finalized_at is not None or claim.expires_at > now):
            return None
        token = new_token()
        self._claims[key] = _Claim(expires_at=now + ttl, holder=token)
        return token

    async def renew(self, key: str, holder: str, *, ttl: float) -> None:
        now = time.time()
        self._held(key, holder, now).expires_at = now + ttl

    async def release(self, key: str, holder: str) -> None:
        self._held(key, holder, time.time())
        del self._claims[key]

    def _finalize(self, key: str, keep_until: float | None) -> None:
        until = math.inf if keep_until is None else keep_until
        self._claims[key] = _Claim(expires_at=until, holder=None, finalized_at=time.time())

    async def finalize(self, key: str, *, keep_until: float | None = None) -> None:
        claim = self._claims.get(key)
        if claim is None or claim.finalized_at is None:
            self._finalize(key, keep_until)

    async def is_finalized(self, key: str) -> bool:
        claim = self._claims.get(key)
        return claim is not None and claim.finalized_at is not None

    async def complete(
        self,
        key: str,
        holder: str | None,
        *,
        receipt: bytes,
        settlement: Settlement | None = None,
        keep_until: float | None = None,
    ) -> None:
        if holder is not None:
            self._held(key, holder, time.time())
        await self.finalize(key, keep_until=keep_until)
        self._receipts[key] = receipt
        if settlement is not None:
            self._enqueue(settlement)

    async def complete_settled(
        self, key: str, holder: str | None, *, receipt: bytes, tx_hash: str, keep_until: float | None = None
    ) -> None:
        if holder is not None:
            self._held(key, holder, time.time())
        await self.complete(key, None, receipt=receipt, keep_until=keep_until)
        await self.mark_settled([key], tx_hash=tx_hash)

    async def purge_expired_claims(self) -> int:
        now = time.time()
        expired = [k for k, c in self._claims.items() if c.finalized_at is None and c.expires_at <= now]
        for key in expired:
            del self._claims[key]
        return len(expired)

    async def purge(self, *, retention: float) -> Purged:
        expired = await self.purge_expired_claims()
        now = time.time()
        final = [
            k for k, c in self._claims.items() if _purgeable(c.expires_at, c.finalized_at, retention, now)
        ]
        for key in final:
            del self._claims[key]
        receipts = [key for key in final if self._receipts.pop(key, None) is not None]
        settled = [
            k
            for k, item in self._queue.items()
            if item.state == "settled" and _purgeable(item.expires_at, item.settled_at, retention, now)
        ]
        for key in settled:
            del self._queue[key]
            self._open.discard(key)
        return Purged(claims=expired + len(final), receipts=len(receipts), settlements=len(settled))

    async def put_receipt(self, key: str, receipt: bytes) -> None:
        self._receipts[key] = receipt

    async def get_receipt(self, key: str) -> bytes | None:
        return self._receipts.get(key)

    async def enqueue(self, item: Settlement) -> None:
        self._enqueue(item)

    def _enqueue(self, item: Settlement) -> None:
        fresh = msgspec.structs.replace(
            item,
            state="queued",
            attempts=0,
            tx_hash=None,
            error=None,
            retry_at=None,
            lease_until=None,
            lease_token=None,
            settled_at=None,
        )
        if item.key not in self._queue:
            self._put(fresh)

    def _put(self, item: Settlement) -> None:
        self._queue[item.key] = item
        if item.state in ("queued", "leased", "failed"):
            self._open.add(item.key)
        else:
            self._open.discard(item.key)

    async def lease(self, kind: str, *, limit: int, lease_seconds: float) -> list[Settlement]:
        now, token = time.time(), new_token()
        due = sorted(
            (item for key in self._open if (item := self._queue[key]).kind == kind and _due(item, now)),
            key=lambda item: (item.created_at, item.key),
        )
        out: list[Settlement] = []
        for item in due[: max(limit, 0)]:
            leased = msgspec.structs.replace(
                item,
                state="leased",
                attempts=item.attempts + 1,
                lease_until=now + lease_seconds,
                lease_token=token,
                retry_at=None,
            )
            self._put(leased)
            out.append(leased)
        return out

    async def renew_lease(self, keys: list[str], *, lease: str, lease_seconds: float) -> list[str]:
        until, done = time.time() + lease_seconds, []
        for key in dict.fromkeys(keys):
            item = self._queue.get(key)
            if item is not None and item.state == "leased" and item.lease_token == lease:
                self._put(msgspec.structs.replace(item, lease_until=until))
                done.append(key)
        return done

    async def mark_settled(self, keys: list[str], *, tx_hash: str, lease: str | None = None) -> list[str]:
        now, done = time.time(), []
        for key in dict.fromkeys(keys):
            item = self._queue.get(key)
            if item is not None and _ours(item, lease):
                self._put(
                    msgspec.structs.replace(
                        item,
                        state="settled",
                        tx_hash=tx_hash,
                        error=None,
                        retry_at=None,
                        lease_until=None,
                        lease_token=None,
                        settled_at=now,
                    )
                )
                done.append(key)
        return done

    async def mark_failed(
        self, key: str, *, error: str, retry_at: float | None, lease: str | None = None
    ) -> bool:
        item = self._queue.get(key)
        if item is None or not _ours(item, lease):
            return False
        state: SettlementState = "dead" if retry_at is None else "failed"
        self._put(
            msgspec.structs.replace(
                item, state=state, error=error, retry_at=retry_at, lease_until=None, lease_token=None
            )
        )
        return True

    async def get_settlement(self, key: str) -> Settlement | None:
        return self._queue.get(key)

    async def dead_letters(self, *, kind: str | None = None, limit: int = 100) -> list[Settlement]:
        dead = [i for i in self._queue.values() if i.state == "dead" and (kind is None or i.kind == kind)]
        return sorted(dead, key=lambda item: (item.created_at, item.key))[: max(limit, 0)]

    async def requeue(self, key: str) -> bool:
        item = self._queue.get(key)
        if item is None or item.state not in ("dead", "failed"):
            return False
        self._put(msgspec.structs.replace(item, state="queued", attempts=0, retry_at=None))
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

    async def sub_pending_once(self, marker: str, account: str, amount: int, *, ttl: float) -> bool:
        if await self.claim(marker, ttl=ttl) is None:
            return False
        await self.sub_pending(account, amount)
        return True

    async def get_pending(self, account: str) -> int:
        return self._pending.get(account, 0)

    async def raise_high_water(
        self, channel_id: str, cumulative: int, *, voucher: bytes | None = None
    ) -> bool:
        if cumulative <= self._high_water.get(channel_id, 0):
            return False
        self._high_water[channel_id] = cumulative
        if voucher is not None:
            self._vouchers[channel_id] = voucher
        return True

    async def high_water(self, channel_id: str) -> int:
        return self._high_water.get(channel_id, 0)

    async def channel_voucher(self, channel_id: str) -> tuple[int, bytes | None]:
        return self._high_water.get(channel_id, 0), self._vouchers.get(channel_id)

    async def list_channel_vouchers(
        self, *, after: str = "", limit: int = 500
    ) -> list[tuple[str, int, bytes]]:
        keys = sorted(k for k in self._vouchers if k > after)[: max(limit, 0)]
        return [(k, self._high_water.get(k, 0), self._vouchers[k]) for k in keys]

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
