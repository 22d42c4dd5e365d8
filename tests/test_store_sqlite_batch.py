"""SQLite group commit: calls that queue up together share one transaction, and a failing call undoes only
itself (the batch runs without savepoints first and is rerun with one per call when a call raises).

Checked from a second connection after the store is closed, as a restarted gateway would read the file.
"""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path
from typing import Any

from gateway._store import ClaimLost
from gateway._stores._sqlite_committer import DURABLE, LIGHT, READ
from gateway._stores.sqlite import SQLiteStore


def _rows(path: Path) -> list[tuple[str, str]]:
    with sqlite3.connect(path) as con:
        return sorted(con.execute("SELECT account, amount FROM pending").fetchall())


def test_a_failing_call_in_a_batch_undoes_only_itself(tmp_path: Path) -> None:
    path = tmp_path / "s.db"

    def write(account: str, fail: bool = False) -> Any:
        def call(con: sqlite3.Connection) -> str:
            con.execute("INSERT INTO pending (account, amount) VALUES (?, '1')", (account,))
            if fail:
                raise ValueError(f"{account} fails after writing")
            return account

        return call

    async def main() -> list[Any]:
        store = await SQLiteStore.open(str(path))
        try:
            submit = store._committer.submit
            # submitted in one event-loop iteration: they cross to the committer thread together
            futures = [
                submit(write("a"), LIGHT),
                submit(write("b", fail=True), DURABLE),
                submit(lambda con: con.execute("SELECT count(*) FROM pending").fetchone()[0], READ),
                submit(write("c"), DURABLE),
            ]
            return await asyncio.gather(*futures, return_exceptions=True)
        finally:
            await store.close()

    a, b, seen, c = asyncio.run(main())
    assert (a, c) == ("a", "c")
    assert isinstance(b, ValueError)
    assert seen == 1  # the read sees "a" (earlier in the batch) and not the undone "b"
    assert _rows(path) == [("a", "1"), ("c", "1")]


def test_concurrent_completes_with_one_lost_claim(tmp_path: Path) -> None:
    path = tmp_path / "s.db"

    async def main() -> list[Any]:
        store = await SQLiteStore.open(str(path))
        try:
            holders = [await store.claim(f"k{i}", ttl=60) for i in range(4)]
            assert all(holders)
            calls = [
                store.complete(f"k{i}", "not-the-holder" if i == 2 else holders[i], receipt=b"r%d" % i)
                for i in range(4)
            ]
            return await asyncio.gather(*calls, return_exceptions=True)
        finally:
            await store.close()

    results = asyncio.run(main())
    assert isinstance(results[2], ClaimLost)
    assert [r for i, r in enumerate(results) if i != 2] == [None, None, None]
    with sqlite3.connect(path) as con:
        receipts = sorted(k for (k,) in con.execute("SELECT key FROM receipts"))
        finalized = sorted(k for (k,) in con.execute("SELECT key FROM claims WHERE finalized = 1"))
    assert receipts == finalized == ["k0", "k1", "k3"]
