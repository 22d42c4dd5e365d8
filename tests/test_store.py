"""One suite for every `PaymentStore` backend: memory, SQLite file, PostgreSQL, PostgreSQL + Redis cache.

PostgreSQL and Redis are real servers (127.0.0.1 by default; AGENTPAY_TEST_POSTGRES_URL /
AGENTPAY_TEST_REDIS_URL override). Each test gets its own schema and Redis key prefix, removed afterwards
(only those keys: never FLUSHALL). Tests are plain functions around `asyncio.run`, so they need no async
pytest plugin.
"""

from __future__ import annotations

import asyncio
import os
import random
import secrets
import sqlite3
import time
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import asyncpg
import pytest
import redis.asyncio as aioredis

from gateway._store import (
    ClaimLost,
    PaymentStore,
    Purged,
    Settlement,
    StoreConfigError,
    StoreSchemaError,
    StoreUnavailable,
    backoff,
)
from gateway._stores import open_store

PG_URL = os.environ.get("AGENTPAY_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/test")
REDIS_URL = os.environ.get("AGENTPAY_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
BACKENDS = ["memory", "sqlite", "postgres", "postgres+redis"]
DURABLE = ["sqlite", "postgres", "postgres+redis"]


async def _drop_schema(schema: str) -> None:
    con = await asyncpg.connect(PG_URL)
    try:
        await con.execute(f"DROP SCHEMA IF EXISTS {schema} CASCADE")
    finally:
        await con.close()


async def delete_prefix(prefix: str) -> None:
    client = aioredis.Redis.from_url(REDIS_URL)
    try:
        keys = [key async for key in client.scan_iter(match=prefix + "*", count=500)]
        if keys:
            await client.delete(*keys)
    finally:
        await client.aclose()


def _require_servers(backend: str) -> None:
    """Skip when a developer has no server running; CI (CI=true) always has them, so there it fails."""

    async def probe() -> None:
        await (await asyncpg.connect(PG_URL, timeout=3)).close()
        if "redis" in backend:
            client = aioredis.Redis.from_url(REDIS_URL)
            try:
                await client.ping()
            finally:
                await client.aclose()

    try:
        asyncio.run(probe())
    except (OSError, asyncpg.PostgresError, aioredis.ConnectionError) as exc:
        if os.environ.get("CI"):
            raise
        pytest.skip(f"{backend} server not reachable: {exc}")


@contextmanager
def isolated_url(backend: str, tmp_path: Path) -> Iterator[str]:
    """A store URL that no other test (or gateway) shares, cleaned up on exit."""
    tag = "agentpay_test_" + secrets.token_hex(6)
    if backend == "memory":
        yield "memory://"
        return
    if backend == "sqlite":
        yield f"sqlite:///{tmp_path / (tag + '.db')}"
        return
    _require_servers(backend)
    url = f"{PG_URL}?schema={tag}"
    if backend == "postgres+redis":
        url += f"&cache={REDIS_URL}&cache_prefix={tag}:"
    try:
        yield url
    finally:
        asyncio.run(_drop_schema(tag))
        if backend == "postgres+redis":
            asyncio.run(delete_prefix(tag + ":"))


@pytest.fixture(params=BACKENDS)
def url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    with isolated_url(request.param, tmp_path) as value:
        yield value


@pytest.fixture(params=DURABLE)
def durable_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    with isolated_url(request.param, tmp_path) as value:
        yield value


def run(url: str, body: Callable[[PaymentStore], Awaitable[None]]) -> None:
    """Open the store at `url`, run `body` against it, close it."""

    async def main() -> None:
        store = await open_store(url)
        try:
            await body(store)
        finally:
            await store.close()

    asyncio.run(main())


def item(
    key: str,
    *,
    kind: str = "escrow",
    payload: bytes = b"signed",
    created_at: float | None = None,
    expires_at: float | None = None,
) -> Settlement:
    return Settlement(
        key=key,
        kind=kind,
        payload=payload,
        payer="0xpayer",
        amount=2**130 + 7,  # past int64 and uint128: the column must hold uint256
        created_at=time.time() if created_at is None else created_at,
        expires_at=expires_at,
    )


# claims


def test_claim_is_exclusive_under_100_concurrent_claims(url: str) -> None:
    async def body(store: PaymentStore) -> None:
        results = await asyncio.gather(*(store.claim("k", ttl=30) for _ in range(100)))
        assert len([token for token in results if token is not None]) == 1

    run(url, body)


def test_expired_claim_is_claimable_again(url: str) -> None:
    async def body(store: PaymentStore) -> None:
        assert await store.claim("k", ttl=0.3)
        assert not await store.claim("k", ttl=0.3)
        await asyncio.sleep(0.6)
        assert await store.claim("k", ttl=30)
        assert not await store.claim("k", ttl=30)

    run(url, body)


def test_finalized_claim_is_permanent_and_release_cannot_undo_it(url: str) -> None:
    async def body(store: PaymentStore) -> None:
        holder = await store.claim("k", ttl=0.2)
        assert holder
        await store.finalize("k")
        with pytest.raises(ClaimLost):
            await store.release("k", holder)
        await asyncio.sleep(0.4)
        assert not await store.claim("k", ttl=30)
        assert await store.is_finalized("k")
        assert not await store.is_finalized("other")

    run(url, body)


def test_release_frees_an_unfinalized_claim(url: str) -> None:
    async def body(store: PaymentStore) -> None:
        holder = await store.claim("k", ttl=30)
        assert holder
        await store.release("k", holder)
        assert await store.claim("k", ttl=30)
        with pytest.raises(ClaimLost) as err:
            await store.release("never-claimed", holder)
        assert err.value.code == "claim_lost"

    run(url, body)


def test_only_the_claims_holder_may_release_renew_or_complete_it(url: str) -> None:
    async def body(store: PaymentStore) -> None:
        first = await store.claim("k", ttl=0.3)
        assert first
        await asyncio.sleep(0.5)  # the first request outlived its claim ...
        second = await store.claim("k", ttl=30)  # ... and a copy of the credential took it
        assert second and second != first
        for stale in (
            store.complete("k", first, receipt=b"stale", settlement=item("k")),
            store.release("k", first),
            store.renew("k", first, ttl=30),
            store.complete("k", "forged", receipt=b"forged"),
        ):
            with pytest.raises(ClaimLost) as err:
                await stale
            assert err.value.code == "claim_lost" and err.value.status_hint == 409
        # Refused means nothing written: not finalized, no receipt, nothing queued, the claim still held.
        assert not await store.is_finalized("k") and await store.get_receipt("k") is None
        assert await store.get_settlement("k") is None
        assert await store.claim("k", ttl=30) is None
        await store.complete("k", second, receipt=b"r", settlement=item("k"))
        assert await store.is_finalized("k") and await store.get_receipt("k") == b"r"
        with pytest.raises(ClaimLost):  # finalized: nobody holds a claim on it any more
            await store.complete("k", second, receipt=b"again")
        assert await store.get_receipt("k") == b"r"

    run(url, body)


def test_renewing_keeps_a_claim_alive_past_its_ttl(url: str) -> None:
    async def body(store: PaymentStore) -> None:
        holder = await store.claim("k", ttl=0.4)
        assert holder
        for _ in range(5):  # a second in all: more than twice the TTL
            await asyncio.sleep(0.2)
            await store.renew("k", holder, ttl=0.4)
            assert await store.claim("k", ttl=30) is None
        await store.complete("k", holder, receipt=b"r")
        assert await store.is_finalized("k")
        other = await store.claim("other", ttl=0.2)
        assert other
        await asyncio.sleep(0.4)
        with pytest.raises(ClaimLost):  # too late: it lapsed
            await store.renew("other", other, ttl=30)

    run(url, body)


def test_purge_expired_claims_keeps_live_and_finalized(url: str) -> None:
    async def body(store: PaymentStore) -> None:
        assert await store.claim("short", ttl=0.1)
        assert await store.claim("long", ttl=30)
        assert await store.claim("final", ttl=0.1)
        await store.finalize("final", keep_until=time.time() - 1)
        await asyncio.sleep(0.3)
        expected = 0 if "cache=" in url else 1  # the Redis cache expires its claims itself
        assert await store.purge_expired_claims() == expected
        assert not await store.claim("long", ttl=30)
        assert not await store.claim("final", ttl=30)
        assert await store.claim("short", ttl=30)

    run(url, body)


# receipts and complete


def test_receipts_round_trip(url: str) -> None:
    async def body(store: PaymentStore) -> None:
        assert await store.get_receipt("k") is None
        await store.put_receipt("k", b"\x00receipt\xff")
        assert await store.get_receipt("k") == b"\x00receipt\xff"
        await store.put_receipt("k", b"second")
        assert await store.get_receipt("k") == b"second"

    run(url, body)


def test_complete_finalizes_records_and_enqueues_once(url: str) -> None:
    async def body(store: PaymentStore) -> None:
        holder = await store.claim("k", ttl=30)
        await store.complete("k", holder, receipt=b"r1", settlement=item("k"))
        await store.complete("k", None, receipt=b"r2", settlement=item("k", payload=b"other"))
        await store.complete("no-settlement", None, receipt=b"r3")
        assert await store.is_finalized("k") and await store.is_finalized("no-settlement")
        assert not await store.claim("k", ttl=30)
        assert await store.get_receipt("k") == b"r2"
        queued = await store.get_settlement("k")
        assert queued is not None and queued.payload == b"signed" and queued.state == "queued"
        assert await store.get_settlement("no-settlement") is None
        assert (await store.stats()).queued == 1

    run(url, body)


# settlement queue


def test_enqueue_is_idempotent_per_key(url: str) -> None:
    async def body(store: PaymentStore) -> None:
        await store.enqueue(item("a"))
        [leased] = await store.lease("escrow", limit=10, lease_seconds=30)
        await store.enqueue(item("a", payload=b"different"))
        again = await store.get_settlement("a")
        assert again is not None and again.state == "leased" and again.payload == b"signed"
        assert again.amount == 2**130 + 7 and leased.attempts == 1
        stats = await store.stats()
        assert (stats.queued, stats.leased) == (0, 1)

    run(url, body)


def test_lease_filters_by_kind_and_orders_oldest_first(url: str) -> None:
    async def body(store: PaymentStore) -> None:
        now = time.time()
        for n in range(5):
            await store.enqueue(item(f"e{n}", created_at=now - n))
        await store.enqueue(item("x", kind="exact"))
        batch = await store.lease("escrow", limit=3, lease_seconds=30)
        assert [s.key for s in batch] == ["e4", "e3", "e2"]
        assert all(s.state == "leased" and s.lease_until is not None for s in batch)
        assert [s.key for s in await store.lease("exact", limit=10, lease_seconds=30)] == ["x"]
        assert await store.lease("escrow", limit=0, lease_seconds=30) == []

    run(url, body)


def test_concurrent_leasers_never_share_an_item(url: str) -> None:
    async def body(store: PaymentStore) -> None:
        keys = {f"s{n}" for n in range(60)}
        for key in sorted(keys):
            await store.enqueue(item(key))

        async def leaser() -> list[str]:
            got: list[str] = []
            while batch := await store.lease("escrow", limit=7, lease_seconds=60):
                got += [s.key for s in batch]
            return got

        results = await asyncio.gather(*(leaser() for _ in range(6)))
        everything = [key for got in results for key in got]
        assert len(everything) == len(set(everything)) == 60 and set(everything) == keys

    run(url, body)


def test_expired_lease_is_leased_again_with_attempts_incremented(url: str) -> None:
    async def body(store: PaymentStore) -> None:
        await store.enqueue(item("a"))
        [first] = await store.lease("escrow", limit=10, lease_seconds=0.3)
        assert first.attempts == 1
        assert await store.lease("escrow", limit=10, lease_seconds=0.3) == []  # the settler is working
        await asyncio.sleep(0.6)  # ... and crashed: its lease runs out
        [second] = await store.lease("escrow", limit=10, lease_seconds=30)
        assert second.key == "a" and second.attempts == 2

    run(url, body)


def test_failed_item_is_retried_after_its_backoff_and_settles(url: str) -> None:
    async def body(store: PaymentStore) -> None:
        await store.enqueue(item("a"))
        [leased] = await store.lease("escrow", limit=10, lease_seconds=30)
        await store.mark_failed(
            "a", error="nonce too low", retry_at=time.time() + backoff(leased.attempts, base=0.4)
        )
        failed = await store.get_settlement("a")
        assert failed is not None and failed.state == "failed" and failed.error == "nonce too low"
        assert (await store.stats()).failed == 1
        assert await store.lease("escrow", limit=10, lease_seconds=30) == []
        await asyncio.sleep(0.7)
        [retry] = await store.lease("escrow", limit=10, lease_seconds=30)
        assert retry.attempts == 2
        await store.mark_settled(["a"], tx_hash="0xabc")
        await store.mark_failed("a", error="late report", retry_at=None)  # must not undo the settlement
        settled = await store.get_settlement("a")
        assert settled is not None and settled.state == "settled" and settled.tx_hash == "0xabc"
        assert (await store.stats()).settled == 1
        assert await store.lease("escrow", limit=10, lease_seconds=30) == []

    run(url, body)


def test_a_late_settler_cannot_finish_a_lease_another_settler_now_holds(url: str) -> None:
    async def body(store: PaymentStore) -> None:
        await store.enqueue(item("a"))
        [mine] = await store.lease("escrow", limit=10, lease_seconds=0.3)
        assert mine.lease_token
        await asyncio.sleep(0.5)  # this settler stalls; its lease runs out and another settler takes it
        [theirs] = await store.lease("escrow", limit=10, lease_seconds=30)
        assert theirs.lease_token and theirs.lease_token != mine.lease_token and theirs.attempts == 2
        assert await store.mark_settled(["a"], tx_hash="0xlate", lease=mine.lease_token) == []
        assert not await store.mark_failed("a", error="late", retry_at=None, lease=mine.lease_token)
        held = await store.get_settlement("a")
        assert held is not None and held.state == "leased" and held.lease_token == theirs.lease_token
        assert held.tx_hash is None and held.error is None
        assert await store.mark_failed(
            "a", error="rpc down", retry_at=time.time() + 0.2, lease=theirs.lease_token
        )
        # Waiting for its retry: leased by nobody, so no lease token finishes it, and the next lease can.
        assert await store.mark_settled(["a"], tx_hash="0xlate", lease=theirs.lease_token) == []
        await asyncio.sleep(0.4)
        [again] = await store.lease("escrow", limit=10, lease_seconds=30)
        assert await store.mark_settled(["a", "a", "missing"], tx_hash="0xok", lease=again.lease_token) == [
            "a"
        ]
        settled = await store.get_settlement("a")
        assert settled is not None and settled.state == "settled" and settled.tx_hash == "0xok"
        assert settled.lease_token is None and settled.settled_at is not None
        assert await store.mark_settled(["a"], tx_hash="0xother") == []  # final: never rewritten

    run(url, body)


def test_purge_waits_for_retention_and_the_payments_validity(url: str) -> None:
    async def body(store: PaymentStore) -> None:
        now = time.time()
        soon = now + 1.0
        # (key, the payment's validity end): past, still valid for a second, unknown
        for key, until in (("old", now - 10), ("valid", soon), ("unknown", None)):
            holder = await store.claim(key, ttl=30)
            settlement = item(key, expires_at=until)
            await store.complete(key, holder, receipt=b"r", settlement=settlement, keep_until=until)
        await store.enqueue(item("unsettled", expires_at=now - 10))
        await store.enqueue(item("dead", expires_at=now - 10))
        leased = await store.lease("escrow", limit=10, lease_seconds=30)
        assert len(leased) == 5
        assert await store.mark_settled(["old", "valid", "unknown"], tx_hash="0xt") == [
            "old",
            "valid",
            "unknown",
        ]
        await store.mark_failed("unsettled", error="retry", retry_at=now + 3600)
        await store.mark_failed("dead", error="lost", retry_at=None)
        assert await store.claim("live", ttl=30)
        assert await store.claim("lapsed", ttl=0.1)
        await asyncio.sleep(0.3)
        lapsed = 0 if "cache=" in url else 1  # the Redis cache expires its live claims itself

        # A long retention keeps every finalized claim and settled row.
        assert await store.purge(retention=3600) == Purged(claims=lapsed, receipts=0, settlements=0)
        # A short one: only "old" is past both its retention and its validity.
        assert await store.purge(retention=0.2) == Purged(claims=1, receipts=1, settlements=1)
        assert await store.get_settlement("old") is None and await store.get_receipt("old") is None
        assert await store.is_finalized("valid") and await store.claim("valid", ttl=30) is None
        assert await store.get_receipt("valid") == b"r"

        await asyncio.sleep(max(0.0, soon - time.time()) + 0.1)  # now "valid" expired too
        assert await store.purge(retention=0.2) == Purged(claims=1, receipts=1, settlements=1)
        assert not await store.is_finalized("valid") and await store.get_settlement("valid") is None
        # Unknown validity, unsettled and dead rows, and live claims stay.
        assert await store.purge(retention=0) == Purged(claims=0, receipts=0, settlements=0)
        assert await store.is_finalized("unknown") and await store.get_receipt("unknown") == b"r"
        remaining = {key: await store.get_settlement(key) for key in ("unknown", "unsettled", "dead")}
        assert {key: s.state for key, s in remaining.items() if s is not None} == {
            "unknown": "settled",
            "unsettled": "failed",
            "dead": "dead",
        }
        assert await store.claim("live", ttl=30) is None

    run(url, body)


def test_recovery_purges_the_store_while_the_gateway_runs(url: str) -> None:
    from gateway._recovery import Recovery

    async def body(store: PaymentStore) -> None:
        past, future = time.time() - 60, time.time() + 3600
        for key, until in (("old", past), ("valid", future)):
            holder = await store.claim(key, ttl=30)
            await store.complete(
                key, holder, receipt=b"r", settlement=item(key, expires_at=until), keep_until=until
            )
        await store.lease("escrow", limit=10, lease_seconds=30)
        await store.mark_settled(["old", "valid"], tx_hash="0xt")
        recovery = Recovery(store, retention=0.0, purge_every=0.1)
        await recovery.start()
        try:
            for _ in range(50):
                if await store.get_settlement("old") is None:
                    break
                await asyncio.sleep(0.1)
        finally:
            await recovery.stop()
        assert await store.get_settlement("old") is None and await store.get_receipt("old") is None
        assert await store.is_finalized("valid") and await store.get_settlement("valid") is not None

    run(url, body)


def test_dead_letters_are_listed_and_can_be_requeued(url: str) -> None:
    async def body(store: PaymentStore) -> None:
        await store.enqueue(item("a"))
        await store.enqueue(item("b", kind="exact"))
        await store.lease("escrow", limit=10, lease_seconds=30)
        await store.mark_failed("a", error="grant revoked", retry_at=None)
        assert (await store.stats()).dead == 1
        [dead] = await store.dead_letters()
        assert (dead.key, dead.state, dead.error) == ("a", "dead", "grant revoked")
        assert await store.dead_letters(kind="exact") == []
        assert [d.key for d in await store.dead_letters(kind="escrow")] == ["a"]
        assert await store.lease("escrow", limit=10, lease_seconds=30) == []
        assert not await store.requeue("b")  # queued, not dead
        assert not await store.requeue("missing")
        assert await store.requeue("a")
        assert not await store.requeue("a")
        [again] = await store.lease("escrow", limit=10, lease_seconds=30)
        assert again.key == "a" and again.attempts == 1
        assert await store.dead_letters() == []

    run(url, body)


def test_backoff_doubles_up_to_the_cap() -> None:
    assert [backoff(n) for n in (0, 1, 2, 3, 4)] == [1.0, 1.0, 2.0, 4.0, 8.0]
    assert backoff(10_000) == 300.0
    assert backoff(3, base=0.5, cap=1.5) == 1.5
    assert all(1.0 <= backoff(2, jitter=0.5) <= 2.0 for _ in range(100))


# pending spend and high-water marks


def test_pending_spend_never_passes_its_limit_under_100_concurrent_adds(url: str) -> None:
    async def body(store: PaymentStore) -> None:
        results = await asyncio.gather(*(store.add_pending("0xabc", 7, limit=500) for _ in range(100)))
        assert results.count(True) == 71
        assert await store.get_pending("0xabc") == 497
        assert not await store.add_pending("fresh", 501, limit=500)
        assert await store.get_pending("fresh") == 0
        await store.sub_pending("0xabc", 400)
        assert await store.get_pending("0xabc") == 97
        await store.sub_pending("0xabc", 1000)
        assert await store.get_pending("0xabc") == 0
        assert await store.add_pending("big", 2**200, limit=2**201)
        assert await store.get_pending("big") == 2**200

    run(url, body)


def test_high_water_only_rises(url: str) -> None:
    async def body(store: PaymentStore) -> None:
        assert await store.high_water("ch") == 0
        assert not await store.raise_high_water("ch", 0)
        assert await store.raise_high_water("ch", 10)
        assert not await store.raise_high_water("ch", 10)
        assert not await store.raise_high_water("ch", 5)
        assert await store.high_water("ch") == 10
        values = list(range(11, 111))
        random.shuffle(values)
        results = await asyncio.gather(*(store.raise_high_water("ch", v) for v in values))
        assert results.count(True) >= 1 and await store.high_water("ch") == 110
        assert await store.raise_high_water("ch", 2**128 - 1)
        assert await store.high_water("ch") == 2**128 - 1

    run(url, body)


def test_the_latest_voucher_is_stored_with_its_high_water_mark_in_one_step(url: str) -> None:
    async def body(store: PaymentStore) -> None:
        assert await store.channel_voucher("ch") == (0, None)
        assert await store.raise_high_water("ch", 10, voucher=b"v10")
        assert await store.channel_voucher("ch") == (10, b"v10")
        # a refused raise stores nothing, not even its voucher
        assert not await store.raise_high_water("ch", 10, voucher=b"other")
        assert not await store.raise_high_water("ch", 5, voucher=b"v5")
        assert await store.channel_voucher("ch") == (10, b"v10")
        # a raise without a voucher keeps the stored one
        assert await store.raise_high_water("ch", 12)
        assert await store.channel_voucher("ch") == (12, b"v10")
        # concurrent raises: the voucher stored is always the one of the highest mark
        values = list(range(13, 113))
        random.shuffle(values)
        await asyncio.gather(*(store.raise_high_water("ch", v, voucher=b"v%d" % v) for v in values))
        assert await store.channel_voucher("ch") == (112, b"v112")
        assert await store.high_water("ch") == 112
        big = 2**128 - 1
        assert await store.raise_high_water("ch", big, voucher=bytes(range(256)))
        assert await store.channel_voucher("ch") == (big, bytes(range(256)))

    run(url, body)


def test_stored_vouchers_are_listed_in_pages_for_a_restarted_gateway(url: str) -> None:
    async def body(store: PaymentStore) -> None:
        assert await store.list_channel_vouchers() == []
        keys = [f"0x{i:04x}#spent" for i in range(7)]
        for i, key in enumerate(keys):
            assert await store.raise_high_water(key, 100 + i, voucher=b"v%d" % i)
        assert await store.raise_high_water("0xmark-only", 5)  # a mark with no voucher is not listed
        assert await store.raise_high_water(keys[0], 2**128 - 1)  # a raise without a voucher keeps it
        seen: list[tuple[str, int, bytes]] = []
        after = ""
        while page := await store.list_channel_vouchers(after=after, limit=3):
            assert len(page) <= 3
            seen += page
            after = page[-1][0]
        assert [k for k, _, _ in seen] == keys
        assert seen[0] == (keys[0], 2**128 - 1, b"v0") and seen[6] == (keys[6], 106, b"v6")

    run(url, body)


def test_renewing_a_lease_keeps_it_past_its_first_end_and_only_for_its_holder(url: str) -> None:
    async def body(store: PaymentStore) -> None:
        for key in ("a", "b"):
            await store.enqueue(item(key))
        leased = await store.lease("escrow", limit=10, lease_seconds=0.4)
        token = leased[0].lease_token
        assert token is not None
        assert await store.renew_lease(["a", "b", "missing"], lease="not-ours", lease_seconds=30) == []
        assert await store.renew_lease(["a", "a", "missing"], lease=token, lease_seconds=30) == ["a"]
        await asyncio.sleep(0.6)  # "b" was not renewed: another settler takes it; "a" is still ours
        [taken] = await store.lease("escrow", limit=10, lease_seconds=30)
        assert taken.key == "b" and taken.lease_token != token
        assert await store.renew_lease(["b"], lease=token, lease_seconds=30) == []  # theirs now
        assert await store.mark_settled(["a"], tx_hash="0xa", lease=token) == ["a"]
        assert await store.renew_lease(["a"], lease=token, lease_seconds=30) == []  # settled: nothing held

    run(url, body)


class _SlowSend:
    """A scheme part whose every send takes `seconds` (a slow chain); counts what each key was sent."""

    name = "slow"
    malformed = "slow_malformed"

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.sent: dict[str, int] = {}

    def decode(self, raw: bytes) -> bytes:
        return raw

    async def submit(self, engine: Any, jobs: list[Any]) -> list[Any]:
        for item, _ in jobs:
            self.sent[item.key] = self.sent.get(item.key, 0) + 1
        await asyncio.sleep(self.seconds)
        return list(await engine.settled(jobs, "0xslow", "settled"))

    async def reconcile(self, engine: Any, jobs: list[Any]) -> list[Any]:
        raise AssertionError("not in this test")

    def parties(self, payment: bytes) -> Any:
        from escrow.payments._engine import Parties

        return Parties(1, "0xpayer", "0xpayee")

    def retry_at(self, engine: Any, payment: bytes, *, delay: float) -> float:
        return time.time() + delay

    def gives_up(self, payment: bytes, now: float) -> bool:
        return False

    async def on_settled(self, engine: Any, job: Any) -> None:
        return None

    async def on_dead(self, engine: Any, job: Any, *, recorded: bool) -> None:
        return None


def test_a_batch_slower_than_its_lease_stays_leased_and_is_sent_once(url: str) -> None:
    from escrow.payments._engine import SettlementEngine

    async def body(store: PaymentStore) -> None:
        for key in ("a", "b", "c"):
            await store.enqueue(item(key, kind="slow"))
        part = _SlowSend(seconds=1.5)  # five times the lease
        first = SettlementEngine(store, part, kind="slow", max_age=0, lease_seconds=0.3)
        second = SettlementEngine(store, part, kind="slow", max_age=0, lease_seconds=0.3)
        sending = asyncio.ensure_future(first.step(force=True))
        await asyncio.sleep(0.8)  # past the first lease's end: renewed, so the other settler finds nothing
        assert await second.step(force=True) == []
        outcomes = await sending
        assert sorted((o.key, o.status) for o in outcomes) == [(k, "settled") for k in "abc"]
        assert part.sent == {"a": 1, "b": 1, "c": 1}
        assert (await store.stats()).settled == 3

    run(url, body)


# durability, migrations, configuration


def test_data_survives_closing_and_reopening(durable_url: str) -> None:
    async def write(store: PaymentStore) -> None:
        holder = await store.claim("served", ttl=30)
        await store.complete("served", holder, receipt=b"receipt", settlement=item("served"))
        assert await store.claim("in-flight", ttl=30)
        await store.enqueue(item("dead"))
        await store.lease("escrow", limit=1, lease_seconds=30)
        await store.mark_failed("dead", error="boom", retry_at=None)
        assert await store.add_pending("acct", 42, limit=100)
        assert await store.raise_high_water("ch", 99, voucher=b"signed voucher")

    async def read(store: PaymentStore) -> None:
        assert await store.is_finalized("served") and not await store.claim("served", ttl=30)
        assert await store.get_receipt("served") == b"receipt"
        served = await store.get_settlement("served")
        assert served is not None and served.amount == 2**130 + 7
        assert [d.key for d in await store.dead_letters()] == ["dead"]
        assert await store.get_pending("acct") == 42
        assert await store.high_water("ch") == 99
        assert await store.channel_voucher("ch") == (99, b"signed voucher")

    run(durable_url, write)
    run(durable_url, read)


def versions_of(url: str) -> list[int]:
    if url.startswith("sqlite:"):
        con = sqlite3.connect(url.removeprefix("sqlite:///"))
        try:
            return [row[0] for row in con.execute("SELECT version FROM schema_version ORDER BY version")]
        finally:
            con.close()
    schema = url.split("schema=")[1].split("&")[0]

    async def fetch() -> list[int]:
        con = await asyncpg.connect(PG_URL)
        try:
            return [r[0] for r in await con.fetch(f"SELECT version FROM {schema}.schema_version ORDER BY 1")]
        finally:
            await con.close()

    return asyncio.run(fetch())


def bump_version(url: str) -> None:
    if url.startswith("sqlite:"):
        con = sqlite3.connect(url.removeprefix("sqlite:///"))
        con.execute("INSERT INTO schema_version VALUES (999, 0)")
        con.commit()
        con.close()
        return
    schema = url.split("schema=")[1].split("&")[0]

    async def bump() -> None:
        con = await asyncpg.connect(PG_URL)
        await con.execute(f"INSERT INTO {schema}.schema_version VALUES (999, 0)")
        await con.close()

    asyncio.run(bump())


def test_migrations_apply_once_and_refuse_a_newer_schema(durable_url: str) -> None:
    async def noop(store: PaymentStore) -> None:
        return None

    run(durable_url, noop)
    first = versions_of(durable_url)
    run(durable_url, noop)
    assert versions_of(durable_url) == first == list(range(1, len(first) + 1)) and first
    bump_version(durable_url)
    with pytest.raises(StoreSchemaError) as err:
        run(durable_url, noop)
    assert err.value.code == "store_schema_too_new"


def _create_version_1(url: str) -> None:
    """A store as the first schema version left it: one finalized claim, its receipt, one settled row."""
    from gateway._stores import postgres, sqlite

    rows = (
        "INSERT INTO {p}claims (key, expires_at, finalized) VALUES ('legacy', 0, {true})",
        "INSERT INTO {p}receipts (key, receipt) VALUES ('legacy', {blob})",
        "INSERT INTO {p}settlements (key, kind, payload, payer, amount, created_at, attempts, state, tx_hash)"
        " VALUES ('legacy', 'exact', {blob}, '0xp', 7, 1, 1, 'settled', '0xt')",
    )
    if url.startswith("sqlite:"):
        con = sqlite3.connect(url.removeprefix("sqlite:///"))
        con.execute("CREATE TABLE schema_version (version INTEGER PRIMARY KEY, applied_at REAL)")
        for statement in sqlite.MIGRATIONS[0]:
            con.execute(statement.format(p=""))
        for row in rows:
            con.execute(row.format(p="", true=1, blob="x'00'"))
        con.execute("INSERT INTO schema_version VALUES (1, 0)")
        con.commit()
        con.close()
        return
    schema = url.split("schema=")[1].split("&")[0]

    async def create() -> None:
        con = await asyncpg.connect(PG_URL)
        try:
            await con.execute(f"CREATE SCHEMA {schema}")
            await con.execute(
                f"CREATE TABLE {schema}.schema_version"
                " (version integer PRIMARY KEY, applied_at float8 NOT NULL)"
            )
            await con.execute(postgres.MIGRATIONS[0].format(s=schema))
            for row in rows:
                await con.execute(row.format(p=schema + ".", true="true", blob="'\\x00'::bytea"))
            await con.execute(f"INSERT INTO {schema}.schema_version VALUES (1, 0)")
        finally:
            await con.close()

    asyncio.run(create())


def test_migrating_from_version_1_keeps_old_rows_and_never_purges_them(durable_url: str) -> None:
    _create_version_1(durable_url)

    async def body(store: PaymentStore) -> None:
        legacy = await store.get_settlement("legacy")
        assert legacy is not None and legacy.state == "settled" and legacy.lease_token is None
        assert legacy.expires_at is None and legacy.settled_at is None
        # Their payments' validity is unknown: kept, and still refusing a replay, whatever the retention.
        assert await store.purge(retention=0) == Purged(claims=0, receipts=0, settlements=0)
        assert await store.is_finalized("legacy") and await store.claim("legacy", ttl=30) is None
        assert await store.get_receipt("legacy") == b"\x00"
        holder = await store.claim("new", ttl=30)  # the new columns work on the migrated tables
        await store.complete("new", holder, receipt=b"r", keep_until=time.time() - 1)
        assert await store.purge(retention=0) == Purged(claims=1, receipts=1, settlements=0)
        # version 3: a high-water mark carries its voucher
        assert await store.raise_high_water("ch", 7, voucher=b"v7")
        assert await store.channel_voucher("ch") == (7, b"v7")

    run(durable_url, body)
    assert versions_of(durable_url) == [1, 2, 3]


def test_close_twice_is_harmless(url: str) -> None:
    async def main() -> None:
        store = await open_store(url)
        await store.close()
        await store.close()

    asyncio.run(main())


def test_sqlite_creates_missing_directories(tmp_path: Path) -> None:
    async def main() -> None:
        store = await open_store(f"sqlite:///{tmp_path}/a/b/store.db")
        await store.close()

    asyncio.run(main())
    assert (tmp_path / "a" / "b" / "store.db").exists()


def test_sqlite_table_prefix_isolates_two_stores_in_one_file(tmp_path: Path) -> None:
    base = f"sqlite:///{tmp_path / 'shared.db'}"

    async def main() -> None:
        one, two = await open_store(base + "?prefix=one_"), await open_store(base + "?prefix=two_")
        try:
            assert await one.claim("k", ttl=30) and await two.claim("k", ttl=30)
        finally:
            await one.close()
            await two.close()

    asyncio.run(main())


@pytest.mark.parametrize(
    "bad",
    [
        "ftp://nowhere",
        "redis://127.0.0.1:6379/0",
        "sqlite://",
        "sqlite:///{tmp}/x.db?bogus=1",
        "sqlite:///{tmp}/x.db?synchronous=sometimes",
        "sqlite:///{tmp}/x.db?prefix=Robert');DROP",
        "postgresql://postgres@127.0.0.1:5432/test?schema=Bad-Name",
        "postgresql://postgres@127.0.0.1:5432/test?pool_max=many",
    ],
)
def test_bad_urls_raise_a_config_error(bad: str, tmp_path: Path) -> None:
    with pytest.raises(StoreConfigError) as err:
        asyncio.run(open_store(bad.format(tmp=tmp_path)))
    assert err.value.code == "store_config_invalid" and err.value.status_hint == 500
    assert not (tmp_path / "x.db").exists()  # refused before anything was created


@pytest.mark.parametrize(
    "down",
    ["postgresql://postgres@127.0.0.1:1/test", "memory://?cache=redis://127.0.0.1:1/0"],
)
def test_unreachable_servers_raise_unavailable(down: str) -> None:
    with pytest.raises(StoreUnavailable) as err:
        asyncio.run(open_store(down))
    assert err.value.code == "store_unavailable" and err.value.status_hint == 503


def test_redis_cache_falls_back_on_postgres_when_redis_forgets(tmp_path: Path) -> None:
    with isolated_url("postgres+redis", tmp_path) as url:
        prefix = url.split("cache_prefix=")[1]

        async def body(store: PaymentStore) -> None:
            holder = await store.claim("k", ttl=30)
            await store.complete("k", holder, receipt=b"r", settlement=item("k"))
            await delete_prefix(prefix)  # Redis restarted empty
            assert await store.is_finalized("k")
            assert not await store.claim("k", ttl=30)  # PostgreSQL still knows, and repairs the marker
            assert not await store.claim("k", ttl=30)
            assert await store.get_receipt("k") == b"r"
            live = await store.claim("live", ttl=30)
            assert live
            await store.release("live", live)
            assert await store.claim("live", ttl=30)

        run(url, body)
