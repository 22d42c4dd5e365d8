"""SQLite: reads and idle settler polls never wait for the write lock (issue 15).

Another process (here: a second connection) holding the database's write lock, as a replica committing does,
must not stall what only reads: receipts, settlement records, queue statistics, and a settler polling an
empty queue every few tens of milliseconds. Writes still wait for the lock (and report `StoreUnavailable`
past `busy_timeout`), so the lock is really held while the reads succeed.
"""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path

import pytest

from gateway._store import Settlement, StoreUnavailable
from gateway._stores.sqlite import SQLiteStore


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.mark.anyio
async def test_reads_and_empty_polls_do_not_wait_for_another_writer(tmp_path: Path) -> None:
    path = str(tmp_path / "payments.db")
    store = await SQLiteStore.open(path, busy_timeout_ms=300)
    try:
        now = time.time()
        await store.enqueue(
            Settlement(key="k1", kind="exact", payload=b"p", payer="0xabc", amount=5, created_at=now)
        )
        await store.put_receipt("k1", b"receipt")
        assert [item.key for item in await store.lease("exact", limit=8, lease_seconds=60)] == ["k1"]

        other = sqlite3.connect(path, isolation_level=None)
        other.execute("BEGIN IMMEDIATE")  # another writer holds the lock
        try:
            began = time.monotonic()
            assert await store.get_receipt("k1") == b"receipt"
            record = await store.get_settlement("k1")
            assert record is not None and record.state == "leased"
            assert (await store.stats()).leased == 1
            assert await store.is_finalized("k1") is False
            # nothing due (k1 is leased for a minute; no other kind has rows): no write is attempted
            assert await store.lease("exact", limit=8, lease_seconds=60) == []
            assert await store.lease("escrow", limit=8, lease_seconds=60) == []
            assert time.monotonic() - began < 0.3  # none of them waited out the busy timeout

            with pytest.raises(StoreUnavailable):  # a write does wait, and gives up
                await store.claim("k2", ttl=30)
        finally:
            other.execute("ROLLBACK")
            other.close()
        assert await store.claim("k2", ttl=30) is not None
    finally:
        await store.close()
