"""SQLite: the merged steps of the hot paths (issue 15), each one atomic step and one commit.

`complete_settled` closes a payment settled before its response (claim finalized, receipt, in-flight record
settled); `sub_pending_once` gives a reservation back once. Both must do all or nothing, as the calls they
replace did in their order, and be on disk when they return (checked from a second connection after the
store is closed, as a restarted gateway would read the file).
"""

from __future__ import annotations

import asyncio
import sqlite3
import time
from pathlib import Path

import pytest

from gateway._store import ClaimLost, Settlement
from gateway._stores.sqlite import SQLiteStore

TX = "0x" + "ab" * 32


def _in_flight(key: str) -> Settlement:
    now = time.time()
    return Settlement(
        key=key, kind="exact:now", payload=b"p", payer="0xabc", amount=7, created_at=now, expires_at=now + 60
    )


def test_complete_settled_finalizes_records_and_closes_the_in_flight_record(tmp_path: Path) -> None:
    path = str(tmp_path / "payments.db")

    async def scenario() -> None:
        store = await SQLiteStore.open(path)
        try:
            holder = await store.claim("k1", ttl=30)
            assert holder is not None
            await store.enqueue(_in_flight("k1"))
            await store.complete_settled("k1", holder, receipt=b"receipt", tx_hash=TX, keep_until=time.time())
            assert await store.is_finalized("k1")
            assert await store.get_receipt("k1") == b"receipt"
            record = await store.get_settlement("k1")
            assert record is not None and record.state == "settled" and record.tx_hash == TX
            assert await store.claim("k1", ttl=30) is None  # never served again
        finally:
            await store.close()

    asyncio.run(scenario())
    con = sqlite3.connect(path)  # on disk, as a restarted gateway reads it
    try:
        assert con.execute("SELECT finalized FROM claims WHERE key = 'k1'").fetchone() == (1,)
        assert con.execute("SELECT state, tx_hash FROM settlements WHERE key = 'k1'").fetchone() == (
            "settled",
            TX,
        )
        assert con.execute("SELECT receipt FROM receipts WHERE key = 'k1'").fetchone() == (b"receipt",)
    finally:
        con.close()


def test_complete_settled_by_a_request_that_lost_its_claim_writes_nothing(tmp_path: Path) -> None:
    async def scenario() -> None:
        store = await SQLiteStore.open(str(tmp_path / "payments.db"))
        try:
            first = await store.claim("k1", ttl=0.05)
            assert first is not None
            await store.enqueue(_in_flight("k1"))
            await asyncio.sleep(0.1)
            second = await store.claim("k1", ttl=30)  # the claim lapsed: another request took it
            assert second is not None
            with pytest.raises(ClaimLost):
                await store.complete_settled("k1", first, receipt=b"r", tx_hash=TX)
            assert not await store.is_finalized("k1")
            assert await store.get_receipt("k1") is None
            record = await store.get_settlement("k1")
            assert record is not None and record.state == "queued"  # left open, for recovery to judge
            await store.complete_settled("k1", second, receipt=b"r2", tx_hash=TX)
            assert await store.get_receipt("k1") == b"r2"
        finally:
            await store.close()

    asyncio.run(scenario())


def test_sub_pending_once_moves_the_counter_once(tmp_path: Path) -> None:
    async def scenario() -> None:
        store = await SQLiteStore.open(str(tmp_path / "payments.db"))
        try:
            assert await store.add_pending("acct", 10, limit=100)
            assert await store.add_pending("acct", 5, limit=100)
            assert await store.sub_pending_once("k1#unreserved", "acct", 10, ttl=3600)
            assert await store.get_pending("acct") == 5
            # a second report of the same payment (a settler, recovery) does not move it again
            assert not await store.sub_pending_once("k1#unreserved", "acct", 10, ttl=3600)
            assert await store.get_pending("acct") == 5
            # never below zero
            assert await store.sub_pending_once("k2#unreserved", "acct", 50, ttl=3600)
            assert await store.get_pending("acct") == 0
        finally:
            await store.close()

    asyncio.run(scenario())
