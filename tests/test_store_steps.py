"""The merged steps of the hot paths (issue 15), on every backend: each one atomic step.

`complete_settled` closes a payment settled before its response (claim finalized, receipt, in-flight record
settled); `sub_pending_once` gives a reservation back once per marker. Both must do all or nothing, as the
calls they replace did in their order, and a durable backend must still show them after a reopen (as a
restarted gateway reads the store).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from gateway._store import ClaimLost, PaymentStore, Settlement
from tests.test_store import BACKENDS, isolated_url, run

TX = "0x" + "ab" * 32
FOREVER = 100 * 365 * 86400.0


@pytest.fixture(params=BACKENDS)
def url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    with isolated_url(request.param, tmp_path) as value:
        yield value


def _in_flight(key: str) -> Settlement:
    now = time.time()
    return Settlement(
        key=key, kind="exact:now", payload=b"p", payer="0xabc", amount=7, created_at=now, expires_at=now + 60
    )


async def _closed(store: PaymentStore, key: str, receipt: bytes) -> None:
    assert await store.is_finalized(key)
    assert await store.get_receipt(key) == receipt
    record = await store.get_settlement(key)
    assert record is not None and (record.state, record.tx_hash) == ("settled", TX)
    assert record.lease_token is None and record.settled_at is not None
    assert await store.claim(key, ttl=30) is None  # never served again


def test_complete_settled_finalizes_records_and_closes_the_in_flight_record(url: str) -> None:
    async def body(store: PaymentStore) -> None:
        holder = await store.claim("k1", ttl=30)
        assert holder is not None
        await store.enqueue(_in_flight("k1"))
        await store.complete_settled("k1", holder, receipt=b"receipt", tx_hash=TX, keep_until=time.time())
        await _closed(store, "k1", b"receipt")
        # a second close by the same (now finalized) holder is refused and changes nothing
        with pytest.raises(ClaimLost):
            await store.complete_settled("k1", holder, receipt=b"other", tx_hash="0xother")
        await _closed(store, "k1", b"receipt")

    run(url, body)
    if not url.startswith("memory"):
        run(url, lambda store: _closed(store, "k1", b"receipt"))  # durable: seen after a reopen


def test_complete_settled_without_an_in_flight_record_still_closes_the_claim(url: str) -> None:
    async def body(store: PaymentStore) -> None:
        holder = await store.claim("k1", ttl=30)
        assert holder is not None
        await store.complete_settled("k1", holder, receipt=b"r", tx_hash=TX)
        assert await store.is_finalized("k1") and await store.get_receipt("k1") == b"r"
        assert await store.get_settlement("k1") is None  # nothing invented

    run(url, body)


def test_complete_settled_by_a_request_that_lost_its_claim_writes_nothing(url: str) -> None:
    async def body(store: PaymentStore) -> None:
        first = await store.claim("k1", ttl=0.2)
        assert first is not None
        await store.enqueue(_in_flight("k1"))
        await asyncio.sleep(0.3)
        second = await store.claim("k1", ttl=30)  # the claim lapsed: another request took it
        assert second is not None
        with pytest.raises(ClaimLost):
            await store.complete_settled("k1", first, receipt=b"r", tx_hash=TX)
        with pytest.raises(ClaimLost):
            await store.complete_settled("k1", "forged", receipt=b"r", tx_hash=TX)
        assert not await store.is_finalized("k1")
        assert await store.get_receipt("k1") is None
        record = await store.get_settlement("k1")
        assert record is not None and record.state == "queued"  # left open, for recovery to judge
        await store.renew("k1", second, ttl=30)  # the new holder still holds it
        await store.complete_settled("k1", second, receipt=b"r2", tx_hash=TX)
        await _closed(store, "k1", b"r2")

    run(url, body)


def test_complete_settled_of_an_unclaimed_key_writes_nothing(url: str) -> None:
    async def body(store: PaymentStore) -> None:
        await store.enqueue(_in_flight("k1"))
        with pytest.raises(ClaimLost):
            await store.complete_settled("k1", "never-claimed", receipt=b"r", tx_hash=TX)
        assert not await store.is_finalized("k1") and await store.get_receipt("k1") is None
        record = await store.get_settlement("k1")
        assert record is not None and record.state == "queued"

    run(url, body)


def test_complete_settled_with_no_holder_closes_it_whoever_holds_the_claim(url: str) -> None:
    # As `complete(key, None, ...)`: the Redis cache (which checks its own claims first) closes a payment
    # whatever the durable store's claim row says: held by another token, lapsed, or absent.
    async def body(store: PaymentStore) -> None:
        assert await store.claim("held", ttl=30) is not None
        for key in ("held", "absent"):
            await store.enqueue(_in_flight(key))
            await store.complete_settled(key, None, receipt=b"r-" + key.encode(), tx_hash=TX)
            await _closed(store, key, b"r-" + key.encode())
        # closing a closed one again moves nothing but the receipt it is given, as `complete` does
        await store.complete_settled("held", None, receipt=b"again", tx_hash=TX)
        record = await store.get_settlement("held")
        assert record is not None and (record.state, record.tx_hash) == ("settled", TX)

    run(url, body)
    if not url.startswith("memory"):
        run(url, lambda store: _closed(store, "absent", b"r-absent"))


def test_sub_pending_once_moves_the_counter_once(url: str) -> None:
    async def body(store: PaymentStore) -> None:
        assert await store.add_pending("acct", 10, limit=100)
        assert await store.add_pending("acct", 5, limit=100)
        assert await store.sub_pending_once("k1#unreserved", "acct", 10, ttl=FOREVER)
        assert await store.get_pending("acct") == 5
        # a second report of the same payment (a settler, recovery) does not move it again
        assert not await store.sub_pending_once("k1#unreserved", "acct", 10, ttl=FOREVER)
        assert await store.get_pending("acct") == 5
        # never below zero
        assert await store.sub_pending_once("k2#unreserved", "acct", 50, ttl=FOREVER)
        assert await store.get_pending("acct") == 0

    run(url, body)
    if not url.startswith("memory"):

        async def reopened(store: PaymentStore) -> None:  # the markers are durable
            assert await store.add_pending("acct", 10, limit=100)
            assert not await store.sub_pending_once("k1#unreserved", "acct", 10, ttl=FOREVER)
            assert await store.get_pending("acct") == 10

        run(url, reopened)


def test_sub_pending_once_respects_a_marker_taken_or_finalized_as_a_claim(url: str) -> None:
    async def body(store: PaymentStore) -> None:
        assert await store.add_pending("acct", 100, limit=1000)
        assert await store.claim("held#unreserved", ttl=FOREVER) is not None
        await store.finalize("final#unreserved")
        assert not await store.sub_pending_once("held#unreserved", "acct", 10, ttl=FOREVER)
        assert not await store.sub_pending_once("final#unreserved", "acct", 10, ttl=FOREVER)
        assert await store.get_pending("acct") == 100
        assert await store.sub_pending_once("new#unreserved", "acct", 10, ttl=FOREVER)
        assert await store.claim("new#unreserved", ttl=30) is None  # and it holds like a claim
        assert await store.get_pending("acct") == 90

    run(url, body)


def test_sub_pending_once_moves_it_once_under_50_concurrent_reports(url: str) -> None:
    async def body(store: PaymentStore) -> None:
        assert await store.add_pending("acct", 1000, limit=10_000)
        moved = await asyncio.gather(
            *(store.sub_pending_once("k1#unreserved", "acct", 7, ttl=FOREVER) for _ in range(50))
        )
        assert moved.count(True) == 1
        assert await store.get_pending("acct") == 993

    run(url, body)


def test_sub_pending_once_with_different_markers_moves_it_for_each(url: str) -> None:
    async def body(store: PaymentStore) -> None:
        assert await store.add_pending("acct", 2**130, limit=2**131)  # uint256-sized amounts
        moved = await asyncio.gather(
            *(store.sub_pending_once(f"k{i}#unreserved", "acct", 2**64 + i, ttl=FOREVER) for i in range(40))
        )
        assert all(moved)
        assert await store.get_pending("acct") == 2**130 - sum(2**64 + i for i in range(40))
        again = await asyncio.gather(
            *(store.sub_pending_once(f"k{i}#unreserved", "acct", 1, ttl=FOREVER) for i in range(40))
        )
        assert not any(again)
        assert await store.get_pending("acct") == 2**130 - sum(2**64 + i for i in range(40))

    run(url, body)


def test_sub_pending_once_of_an_account_never_reserved_stays_at_zero(url: str) -> None:
    async def body(store: PaymentStore) -> None:
        assert await store.sub_pending_once("k1#unreserved", "nobody", 5, ttl=FOREVER)
        assert await store.get_pending("nobody") == 0
        assert not await store.sub_pending_once("k1#unreserved", "nobody", 5, ttl=FOREVER)

    run(url, body)
