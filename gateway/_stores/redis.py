"""Redis in front of a durable store: live claims in Redis, everything else in the durable store.

A live claim exists only in Redis (`SET NX PX` of `c:<holder token>`: atomic, and it expires by itself
when a replica dies mid-request), which takes one write per paid request, and every claim/release of a
failed handler, off the durable store. That store stays the source of truth for finalized claims and
everything else: `finalize`/`complete` write there (`complete` first checks the holder in Redis and
stretches the claim over the durable write, so it cannot expire and be re-taken meanwhile), and a claim that
wins in Redis is still refused when the durable store says the key was finalized (the refusal leaves a
"final" marker in Redis, so further replays of that key stop at Redis). `sub_pending_once` takes its marker
as a claim in Redis too, then again in the durable store in the same step as the counter, so a marker
survives a Redis restart. Redis down means claims fail with `StoreUnavailable` (closed, never open): falling
back to another claim path on some replicas would let two replicas take the same key.

Trade-offs, documented: a fresh claim costs a Redis round trip plus a durable read (instead of one
durable write), so on one host the cache is slower; it pays when the durable store's write capacity is
what many replicas contend for. If Redis loses a *live* claim (restart without persistence), a duplicate
of that payment arriving within its TTL could be served twice; it is still settled and charged once (the
queue is idempotent per key). All replicas sharing a database must use the same cache. A "final" marker
may outlive the durable row that `purge` removed (up to `cache_ttl`): it then refuses a payment whose
validity ended anyway, which is harmless.
"""

from __future__ import annotations

import math
from collections.abc import Awaitable, Sequence
from typing import Any, TypeVar

import redis.asyncio as aioredis
import redis.exceptions

from gateway._store import (
    ClaimLost,
    PaymentStore,
    Purged,
    QueueStats,
    Settlement,
    StoreUnavailable,
    new_token,
)

__all__ = ["RedisCachedStore"]

T = TypeVar("T")

_DOWN = (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError, OSError)
_FINAL = b"f"
# Only the holder's own live claim is touched: a release must never wipe the "final" marker or another
# request's claim. ARGV[1] is "c:<holder token>"; `_RENEW`'s ARGV[2] the new TTL in milliseconds.
_RELEASE = "if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end return 0"
_RENEW = (
    "if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('PEXPIRE', KEYS[1], ARGV[2])"
    " end return 0"
)
# How long `complete` holds the claim while it writes to the durable store (after which the key is final).
_COMPLETE_GRACE = 60.0


def _value(holder: str) -> bytes:
    return b"c:" + holder.encode()


def _ms(seconds: float) -> int:
    return max(1, math.ceil(seconds * 1000))


def _client_options() -> dict[str, Any]:
    """redis-py >= 7 watches for cluster maintenance notices on every call; on a plain server that halves
    throughput (measured: 9k -> 19k SET/s), so turn it off where the option exists."""
    try:
        from redis.maint_notifications import MaintNotificationsConfig
    except ImportError:
        return {}
    return {"maint_notifications_config": MaintNotificationsConfig(enabled=False)}


class RedisCachedStore:
    """`PaymentStore` = Redis claim cache + a durable `inner` store (PostgreSQL in production)."""

    def __init__(self, inner: PaymentStore, client: aioredis.Redis, *, prefix: str, final_ttl: float) -> None:
        self._inner = inner
        self._redis = client
        self._prefix = prefix
        self._final_ms = max(1, math.ceil(final_ttl * 1000))
        self._release = client.register_script(_RELEASE)
        self._renew = client.register_script(_RENEW)

    @classmethod
    async def open(cls, inner: PaymentStore, url: str, *, prefix: str, final_ttl: float) -> RedisCachedStore:
        client = aioredis.Redis.from_url(url, **_client_options())
        try:
            await client.ping()
        except _DOWN as exc:
            await client.aclose()
            await inner.close()
            raise StoreUnavailable(f"redis: {exc}") from exc
        return cls(inner, client, prefix=prefix, final_ttl=final_ttl)

    async def _r(self, call: Awaitable[T]) -> T:
        try:
            return await call
        except _DOWN as exc:
            raise StoreUnavailable(f"redis: {exc}") from exc

    def _ck(self, key: str) -> str:
        return f"{self._prefix}c:{key}"

    # claims: the cached part

    async def claim(self, key: str, *, ttl: float) -> str | None:
        ck, holder = self._ck(key), new_token()
        if not await self._r(self._redis.set(ck, _value(holder), nx=True, px=_ms(ttl))):
            return None
        try:
            finalized = await self._inner.is_finalized(key)
        except BaseException:
            await self._r(self._release(keys=[ck], args=[_value(holder)]))  # do not block it for a whole TTL
            raise
        if finalized:
            await self._r(self._redis.set(ck, _FINAL, px=self._final_ms))  # repair the cache
            return None
        return holder

    async def _held(self, script: Any, key: str, holder: str, *more: object) -> None:
        if not await self._r(script(keys=[self._ck(key)], args=[_value(holder), *more])):
            raise ClaimLost(f"the claim on {key} is no longer held by this request")

    async def renew(self, key: str, holder: str, *, ttl: float) -> None:
        await self._held(self._renew, key, holder, _ms(ttl))

    async def release(self, key: str, holder: str) -> None:
        await self._held(self._release, key, holder)

    # everything else: the durable store

    async def finalize(self, key: str, *, keep_until: float | None = None) -> None:
        await self._inner.finalize(key, keep_until=keep_until)
        await self._mark_final(key)

    async def _mark_final(self, key: str) -> None:
        """Replace a live claim by the "final" marker: replays stop at Redis, and no holder remains."""
        try:
            await self._r(self._redis.set(self._ck(key), _FINAL, px=self._final_ms))
        except StoreUnavailable:  # the durable store is the truth; `claim` asks it when the marker is gone
            pass

    async def is_finalized(self, key: str) -> bool:
        return await self._inner.is_finalized(key)

    async def complete(
        self,
        key: str,
        holder: str | None,
        *,
        receipt: bytes,
        settlement: Settlement | None = None,
        keep_until: float | None = None,
    ) -> None:
        if holder is not None:  # still ours, and kept so through the durable write below
            await self._held(self._renew, key, holder, _ms(_COMPLETE_GRACE))
        await self._inner.complete(key, None, receipt=receipt, settlement=settlement, keep_until=keep_until)
        await self._mark_final(key)

    async def complete_settled(
        self, key: str, holder: str | None, *, receipt: bytes, tx_hash: str, keep_until: float | None = None
    ) -> None:
        # The live claim is in Redis, so the durable store cannot check it: checked and stretched here, as
        # `complete` does, then the durable part closed in one step, finalized there unconditionally.
        if holder is not None:
            await self._held(self._renew, key, holder, _ms(_COMPLETE_GRACE))
        await self._inner.complete_settled(key, None, receipt=receipt, tx_hash=tx_hash, keep_until=keep_until)
        await self._mark_final(key)

    async def purge_expired_claims(self) -> int:
        return await self._inner.purge_expired_claims()  # Redis expires its own claims

    async def purge(self, *, retention: float) -> Purged:
        return await self._inner.purge(retention=retention)

    async def put_receipt(self, key: str, receipt: bytes) -> None:
        await self._inner.put_receipt(key, receipt)

    async def get_receipt(self, key: str) -> bytes | None:
        return await self._inner.get_receipt(key)

    async def enqueue(self, item: Settlement) -> None:
        await self._inner.enqueue(item)

    async def lease(self, kind: str, *, limit: int, lease_seconds: float) -> list[Settlement]:
        return await self._inner.lease(kind, limit=limit, lease_seconds=lease_seconds)

    async def renew_lease(self, keys: list[str], *, lease: str, lease_seconds: float) -> list[str]:
        return await self._inner.renew_lease(keys, lease=lease, lease_seconds=lease_seconds)

    async def mark_settled(self, keys: list[str], *, tx_hash: str, lease: str | None = None) -> list[str]:
        return await self._inner.mark_settled(keys, tx_hash=tx_hash, lease=lease)

    async def mark_failed(
        self, key: str, *, error: str, retry_at: float | None, lease: str | None = None
    ) -> bool:
        return await self._inner.mark_failed(key, error=error, retry_at=retry_at, lease=lease)

    async def get_settlement(self, key: str) -> Settlement | None:
        return await self._inner.get_settlement(key)

    async def dead_letters(self, *, kind: str | None = None, limit: int = 100) -> list[Settlement]:
        return await self._inner.dead_letters(kind=kind, limit=limit)

    async def requeue(self, key: str) -> bool:
        return await self._inner.requeue(key)

    async def stats(self) -> QueueStats:
        return await self._inner.stats()

    async def add_pending(self, account: str, amount: int, *, limit: int) -> bool:
        return await self._inner.add_pending(account, amount, limit=limit)

    async def sub_pending(self, account: str, amount: int) -> None:
        await self._inner.sub_pending(account, amount)

    async def sub_pending_once(self, marker: str, account: str, amount: int, *, ttl: float) -> bool:
        # The marker is a claim, so it is taken in Redis first, as `claim` takes one (a marker held there,
        # by this or by `claim`, refuses at once); then the durable store takes its own copy of the marker
        # and moves the counter in one atomic step, so a marker lost with a Redis restart cannot let a
        # second report give the amount back again.
        ck, value = self._ck(marker), _value(new_token())
        if not await self._r(self._redis.set(ck, value, nx=True, px=_ms(ttl))):
            return False
        try:
            return await self._inner.sub_pending_once(marker, account, amount, ttl=ttl)
        except BaseException:
            # whether or not that step committed, the durable marker decides a retry: do not let a
            # Redis-only marker keep the reservation from ever being given back
            await self._r(self._release(keys=[ck], args=[value]))
            raise

    async def get_pending(self, account: str) -> int:
        return await self._inner.get_pending(account)

    async def raise_high_water(
        self, channel_id: str, cumulative: int, *, voucher: bytes | None = None
    ) -> bool:
        return await self._inner.raise_high_water(channel_id, cumulative, voucher=voucher)

    async def high_water(self, channel_id: str) -> int:
        return await self._inner.high_water(channel_id)

    async def channel_voucher(self, channel_id: str) -> tuple[int, bytes | None]:
        return await self._inner.channel_voucher(channel_id)

    async def list_channel_vouchers(
        self, *, after: str = "", limit: int = 500
    ) -> list[tuple[str, int, bytes]]:
        return await self._inner.list_channel_vouchers(after=after, limit=limit)

    async def close(self) -> None:
        try:
            await self._redis.aclose()
        finally:
            await self._inner.close()

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
        return await self._inner.list_settlements(
            states=states,
            kind=kind,
            payer=payer,
            since=since,
            limit=limit,
            offset=offset,
            oldest_first=oldest_first,
        )
