"""SQLite: the default store for one gateway process, one file, no server.

One thread per store owns the connection, so the event loop never blocks on disk. It runs every call
inside `BEGIN IMMEDIATE`, which takes the file's write lock up front (waiting up to `busy_timeout` for
other processes): a read-compare-write inside it is atomic across processes too, and WAL's "snapshot is
stale" error cannot happen. Calls that queue up while a transaction commits run together in the next one,
a failing call undoing only itself, and share its fsync: group commit. A call returns
only after the COMMIT that made it durable.

Not every call needs its own fsync. Reads write nothing. A point read (one row by key: a receipt, a
settlement record, a high-water mark, a pending total, the settler's "anything due?" probe) runs on the
calling thread, on a read-only connection of that thread's own: a WAL reader never waits for the writer, and
the lookup costs a few microseconds where the hand-over to the committer and back costs tens. Other reads
run on the committer, batched in a plain read transaction (no write lock, nothing to sync). Claims (`claim`,
`renew`) and reservations (`add_pending`) only guard work still in flight: a batch of those commits under
`synchronous=normal`, which survives a process crash (WAL) and may be lost only with a power loss, together
with the request that took them. Everything that records
money (a finalized claim, a receipt, a queued settlement, an outcome, a high-water mark, a released
reservation) commits under the configured mode, `full` by default; the WAL is one append-only file, so that
fsync also makes every earlier light commit durable. A served payment is therefore on disk, with the claim
that led to it, before its response leaves.

Amounts are stored as decimal text because SQLite integers stop at 2^63 and vouchers are uint128.
`synchronous=full` by default: with `normal` a WAL commit survives a process crash but may roll back after
a power loss, which for a finalized payment or a queued settlement is money; `normal` is an opt-in.
"""

from __future__ import annotations

import asyncio
import math
import sqlite3
import time
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from gateway._store import (
    ClaimLost,
    Purged,
    QueueStats,
    Settlement,
    StoreConfigError,
    StoreUnavailable,
    new_token,
)
from gateway._stores import COLUMNS, check_identifier, settlement_from_row
from gateway._stores._queries import list_query
from gateway._stores._sqlite_committer import DURABLE, LIGHT, READ, Committer
from gateway._stores._sqlite_readers import Readers
from gateway._stores._sqlite_schema import MIGRATIONS, SYNC_MODES, open_writer

__all__ = ["MIGRATIONS", "SQLiteStore"]

T = TypeVar("T")


class SQLiteStore:
    """`PaymentStore` on one SQLite file (WAL). Open with `await SQLiteStore.open(path)`."""

    def __init__(
        self,
        con: sqlite3.Connection,
        prefix: str,
        synchronous: str = "full",
        *,
        path: str = ":memory:",
    ) -> None:
        self._committer = Committer(con, synchronous)
        self._p = prefix
        self._closed = False
        self._readers = Readers(path)  # point reads on the caller's thread (see `_lookup`)

    @classmethod
    async def open(
        cls, path: str, *, prefix: str = "", synchronous: str = "full", busy_timeout_ms: int = 10_000
    ) -> SQLiteStore:
        if prefix:
            check_identifier(prefix, "prefix")
        if synchronous not in SYNC_MODES:
            raise StoreConfigError(f"synchronous must be one of {SYNC_MODES}, not {synchronous!r}")
        try:
            con = await asyncio.to_thread(
                open_writer, path, prefix=prefix, synchronous=synchronous, busy_timeout_ms=busy_timeout_ms
            )
        except (sqlite3.OperationalError, OSError) as exc:
            raise StoreUnavailable(f"sqlite {path}: {exc}") from exc
        return cls(con, prefix, synchronous, path=path)

    async def _run(self, call: Callable[[sqlite3.Connection], T], need: int = DURABLE) -> T:
        try:
            result: T = await self._committer.submit(call, need)
        except sqlite3.OperationalError as exc:  # "database is locked" after busy_timeout, disk I/O, ...
            raise StoreUnavailable(f"sqlite: {exc}") from exc
        return result

    async def _lookup(self, call: Callable[[sqlite3.Connection], T]) -> T:
        """A point read (one row by key): on this thread's reader when there is one, else the committer."""
        try:
            con = self._readers.here()
            if con is not None:
                return call(con)
        except sqlite3.OperationalError:  # busy (a WAL being recovered) or unreadable: the committer decides
            pass
        return await self._run(call, READ)

    # claims

    async def claim(self, key: str, *, ttl: float) -> str | None:
        now, p, token = time.time(), self._p, new_token()
        sql = (
            f"INSERT INTO {p}claims (key, expires_at, finalized, holder) VALUES (?, ?, 0, ?)"
            " ON CONFLICT (key) DO UPDATE SET expires_at = excluded.expires_at, holder = excluded.holder"
            f" WHERE {p}claims.finalized = 0 AND {p}claims.expires_at <= ? RETURNING 1"
        )
        rows = await self._run(lambda con: con.execute(sql, (key, now + ttl, token, now)).fetchall(), LIGHT)
        return token if rows else None

    def _held(self, con: sqlite3.Connection, sql: str, key: str, holder: str, *first: Any) -> None:
        """Run `sql` (ending in the "still held" condition) on a live claim of `holder`, or ClaimLost."""
        held = " WHERE key = ? AND holder = ? AND finalized = 0 AND expires_at > ?"
        if not con.execute(sql + held, (*first, key, holder, time.time())).rowcount:
            raise ClaimLost(f"the claim on {key} is no longer held by this request")

    async def renew(self, key: str, holder: str, *, ttl: float) -> None:
        sql = f"UPDATE {self._p}claims SET expires_at = ?"
        await self._run(lambda con: self._held(con, sql, key, holder, time.time() + ttl), LIGHT)

    async def release(self, key: str, holder: str) -> None:
        sql = f"DELETE FROM {self._p}claims"
        await self._run(lambda con: self._held(con, sql, key, holder))

    def _finalize(self, con: sqlite3.Connection, key: str, keep_until: float | None) -> None:
        p = self._p
        until = math.inf if keep_until is None else keep_until
        con.execute(
            f"INSERT INTO {p}claims (key, expires_at, finalized, holder, finalized_at)"
            " VALUES (?, ?, 1, NULL, ?) ON CONFLICT (key) DO UPDATE SET finalized = 1,"
            " expires_at = excluded.expires_at, holder = NULL, finalized_at = excluded.finalized_at"
            f" WHERE {p}claims.finalized = 0",
            (key, until, time.time()),
        )

    async def finalize(self, key: str, *, keep_until: float | None = None) -> None:
        await self._run(lambda con: self._finalize(con, key, keep_until))

    async def is_finalized(self, key: str) -> bool:
        sql = f"SELECT 1 FROM {self._p}claims WHERE key = ? AND finalized = 1"
        return bool(await self._lookup(lambda con: con.execute(sql, (key,)).fetchall()))

    async def complete(
        self,
        key: str,
        holder: str | None,
        *,
        receipt: bytes,
        settlement: Settlement | None = None,
        keep_until: float | None = None,
    ) -> None:
        until = math.inf if keep_until is None else keep_until
        finalize = (
            f"UPDATE {self._p}claims SET finalized = 1, expires_at = ?, holder = NULL, finalized_at = ?"
        )

        def body(con: sqlite3.Connection) -> None:
            if holder is None:
                self._finalize(con, key, keep_until)
            else:  # finalized only if still held (the check and the write in one statement), else ClaimLost
                self._held(con, finalize, key, holder, until, time.time())
            self._put_receipt(con, key, receipt)
            if settlement is not None:
                self._enqueue(con, settlement)

        await self._run(body)

    async def complete_settled(
        self, key: str, holder: str | None, *, receipt: bytes, tx_hash: str, keep_until: float | None = None
    ) -> None:
        """`complete` (no new settlement) + `mark_settled([key], tx_hash=...)`, as one atomic step.

        For a payment settled before its response: its in-flight record (`<kind>:now`, enqueued before the
        transaction left) is closed with the claim, in one transaction and one commit instead of two.
        Refused with `ClaimLost` (writing nothing, the record stays open) unless `holder` still holds `key`;
        a None `holder` finalizes unconditionally, as in `complete`.
        """
        until = math.inf if keep_until is None else keep_until
        finalize = (
            f"UPDATE {self._p}claims SET finalized = 1, expires_at = ?, holder = NULL, finalized_at = ?"
        )
        settled = (
            f"UPDATE {self._p}settlements SET state = 'settled', tx_hash = ?, error = NULL, retry_at = NULL,"
            " lease_until = NULL, lease_token = NULL, settled_at = ? WHERE key = ? AND state <> 'settled'"
        )

        def body(con: sqlite3.Connection) -> None:
            now = time.time()
            if holder is None:
                self._finalize(con, key, keep_until)
            else:
                self._held(con, finalize, key, holder, until, now)
            self._put_receipt(con, key, receipt)
            con.execute(settled, (tx_hash, now, key))

        await self._run(body)

    async def purge_expired_claims(self) -> int:
        sql = f"DELETE FROM {self._p}claims WHERE finalized = 0 AND expires_at <= ?"
        now = time.time()
        return await self._run(lambda con: con.execute(sql, (now,)).rowcount)

    async def purge(self, *, retention: float) -> Purged:
        p, now = self._p, time.time()
        final = "finalized = 1 AND expires_at <= :now AND finalized_at + :keep <= :now"
        args = {"now": now, "keep": retention}

        def body(con: sqlite3.Connection) -> Purged:
            receipts = con.execute(
                f"DELETE FROM {p}receipts WHERE key IN (SELECT key FROM {p}claims WHERE {final})", args
            ).rowcount
            claims = con.execute(
                f"DELETE FROM {p}claims WHERE (finalized = 0 AND expires_at <= :now) OR ({final})", args
            ).rowcount
            settlements = con.execute(
                f"DELETE FROM {p}settlements WHERE state = 'settled' AND expires_at <= :now"
                " AND settled_at + :keep <= :now",
                args,
            ).rowcount
            return Purged(claims=claims, receipts=receipts, settlements=settlements)

        return await self._run(body)

    # receipts

    def _put_receipt(self, con: sqlite3.Connection, key: str, receipt: bytes) -> None:
        con.execute(
            f"INSERT INTO {self._p}receipts (key, receipt) VALUES (?, ?)"
            " ON CONFLICT (key) DO UPDATE SET receipt = excluded.receipt",
            (key, receipt),
        )

    async def put_receipt(self, key: str, receipt: bytes) -> None:
        await self._run(lambda con: self._put_receipt(con, key, receipt))

    async def get_receipt(self, key: str) -> bytes | None:
        sql = f"SELECT receipt FROM {self._p}receipts WHERE key = ?"
        row = await self._lookup(lambda con: con.execute(sql, (key,)).fetchone())
        return None if row is None else bytes(row[0])

    # settlement queue

    def _enqueue(self, con: sqlite3.Connection, item: Settlement) -> None:
        con.execute(
            f"INSERT INTO {self._p}settlements (key, kind, payload, payer, amount, created_at, expires_at,"
            " state) VALUES (?, ?, ?, ?, ?, ?, ?, 'queued') ON CONFLICT (key) DO NOTHING",
            (
                item.key,
                item.kind,
                item.payload,
                item.payer,
                str(item.amount),
                item.created_at,
                item.expires_at,
            ),
        )

    async def enqueue(self, item: Settlement) -> None:
        await self._run(lambda con: self._enqueue(con, item))

    async def lease(self, kind: str, *, limit: int, lease_seconds: float) -> list[Settlement]:
        now, p = time.time(), self._p
        # Settlers poll every few tens of milliseconds, mostly finding nothing: a read first (no write lock,
        # no commit to sync) and the leasing write only when something is due. What falls due in between
        # is taken by the next poll.
        due = (  # `state IN (...)` lets SQLite use the partial index of what may be due
            "kind = ? AND state IN ('queued', 'failed', 'leased') AND (state = 'queued'"
            " OR (state = 'failed' AND retry_at <= ?) OR (state = 'leased' AND lease_until <= ?))"
        )
        probe = f"SELECT 1 FROM {p}settlements WHERE {due} LIMIT 1"
        if limit <= 0 or not await self._lookup(lambda con: con.execute(probe, (kind, now, now)).fetchall()):
            return []
        sql = (
            f"UPDATE {p}settlements SET state = 'leased', attempts = attempts + 1, lease_until = ?,"
            f" lease_token = ?, retry_at = NULL WHERE key IN (SELECT key FROM {p}settlements WHERE {due}"
            f" ORDER BY created_at, key LIMIT ?) RETURNING {COLUMNS}"
        )
        args = (now + lease_seconds, new_token(), kind, now, now, max(limit, 0))
        rows = await self._run(lambda con: con.execute(sql, args).fetchall())
        return sorted(map(settlement_from_row, rows), key=lambda item: (item.created_at, item.key))

    async def renew_lease(self, keys: list[str], *, lease: str, lease_seconds: float) -> list[str]:
        sql = (
            f"UPDATE {self._p}settlements SET lease_until = ?"
            " WHERE key = ? AND state = 'leased' AND lease_token = ?"
        )
        until = time.time() + lease_seconds

        def body(con: sqlite3.Connection) -> list[str]:
            return [key for key in dict.fromkeys(keys) if con.execute(sql, (until, key, lease)).rowcount]

        # a lease, like a claim, only guards work in flight: it need not survive a power loss
        return await self._run(body, LIGHT)

    # Unsettled, and (with a lease token) still leased under it: see `PaymentStore.mark_settled`.
    _OURS = " WHERE key = ? AND state <> 'settled' AND (? IS NULL OR (state = 'leased' AND lease_token = ?))"

    async def mark_settled(self, keys: list[str], *, tx_hash: str, lease: str | None = None) -> list[str]:
        sql = (
            f"UPDATE {self._p}settlements SET state = 'settled', tx_hash = ?, error = NULL, retry_at = NULL,"
            " lease_until = NULL, lease_token = NULL, settled_at = ?" + self._OURS
        )
        now = time.time()

        def body(con: sqlite3.Connection) -> list[str]:
            # rowcount, not a cursor: a cursor dropped on the event loop's thread while this thread runs
            # the next statement makes SQLite fail with "API misuse".
            return [
                key
                for key in dict.fromkeys(keys)
                if con.execute(sql, (tx_hash, now, key, lease, lease)).rowcount
            ]

        return await self._run(body)

    async def mark_failed(
        self, key: str, *, error: str, retry_at: float | None, lease: str | None = None
    ) -> bool:
        sql = (
            f"UPDATE {self._p}settlements SET state = ?, error = ?, retry_at = ?, lease_until = NULL,"
            " lease_token = NULL" + self._OURS
        )
        args = ("dead" if retry_at is None else "failed", error, retry_at, key, lease, lease)
        return bool(await self._run(lambda con: con.execute(sql, args).rowcount))

    async def get_settlement(self, key: str) -> Settlement | None:
        sql = f"SELECT {COLUMNS} FROM {self._p}settlements WHERE key = ?"
        row = await self._lookup(lambda con: con.execute(sql, (key,)).fetchone())
        return None if row is None else settlement_from_row(row)

    async def dead_letters(self, *, kind: str | None = None, limit: int = 100) -> list[Settlement]:
        sql = (
            f"SELECT {COLUMNS} FROM {self._p}settlements WHERE state = 'dead' AND (? IS NULL OR kind = ?)"
            " ORDER BY created_at, key LIMIT ?"
        )
        rows = await self._run(lambda con: con.execute(sql, (kind, kind, max(limit, 0))).fetchall(), READ)
        return [settlement_from_row(row) for row in rows]

    async def requeue(self, key: str) -> bool:
        sql = (
            f"UPDATE {self._p}settlements SET state = 'queued', attempts = 0, retry_at = NULL"
            " WHERE key = ? AND state IN ('dead', 'failed')"
        )
        return bool(await self._run(lambda con: con.execute(sql, (key,)).rowcount))

    async def stats(self) -> QueueStats:
        sql = f"SELECT state, count(*) FROM {self._p}settlements GROUP BY state"
        rows: list[Any] = await self._run(lambda con: con.execute(sql).fetchall(), READ)
        counts = {"queued": 0, "leased": 0, "settled": 0, "failed": 0, "dead": 0}
        counts.update({state: n for state, n in rows})
        return QueueStats(**counts)

    # pending spend and channel high-water marks (read-compare-write under the write lock)

    def _get_int(self, con: sqlite3.Connection, table: str, column: str, id_col: str, ident: str) -> int:
        row = con.execute(f"SELECT {column} FROM {self._p}{table} WHERE {id_col} = ?", (ident,)).fetchone()
        return 0 if row is None else int(row[0])

    def _set_int(
        self, con: sqlite3.Connection, table: str, column: str, id_col: str, ident: str, v: int
    ) -> None:
        con.execute(
            f"INSERT OR REPLACE INTO {self._p}{table} ({id_col}, {column}) VALUES (?, ?)", (ident, str(v))
        )

    async def add_pending(self, account: str, amount: int, *, limit: int) -> bool:
        def body(con: sqlite3.Connection) -> bool:
            total = self._get_int(con, "pending", "amount", "account", account) + amount
            if total > limit:
                return False
            self._set_int(con, "pending", "amount", "account", account, total)
            return True

        return await self._run(body, LIGHT)

    async def sub_pending(self, account: str, amount: int) -> None:
        def body(con: sqlite3.Connection) -> None:
            current = self._get_int(con, "pending", "amount", "account", account)
            self._set_int(con, "pending", "amount", "account", account, max(0, current - amount))

        await self._run(body)

    async def sub_pending_once(self, marker: str, account: str, amount: int, *, ttl: float) -> bool:
        """`claim(marker, ttl=ttl)` and, when that claim was taken, `sub_pending(account, amount)`, as one
        atomic step and one commit; True when the counter moved.

        The count-once release of a reservation (`escrow.payments._exact_settler.unreserve_once`): the
        marker's claim keeps a second report from moving the counter again.
        """
        now, p, token = time.time(), self._p, new_token()
        claim = (
            f"INSERT INTO {p}claims (key, expires_at, finalized, holder) VALUES (?, ?, 0, ?)"
            " ON CONFLICT (key) DO UPDATE SET expires_at = excluded.expires_at, holder = excluded.holder"
            f" WHERE {p}claims.finalized = 0 AND {p}claims.expires_at <= ? RETURNING 1"
        )

        def body(con: sqlite3.Connection) -> bool:
            if not con.execute(claim, (marker, now + ttl, token, now)).fetchall():
                return False
            current = self._get_int(con, "pending", "amount", "account", account)
            self._set_int(con, "pending", "amount", "account", account, max(0, current - amount))
            return True

        return await self._run(body)

    async def get_pending(self, account: str) -> int:
        return await self._lookup(lambda con: self._get_int(con, "pending", "amount", "account", account))

    async def raise_high_water(
        self, channel_id: str, cumulative: int, *, voucher: bytes | None = None
    ) -> bool:
        # An upsert, not INSERT OR REPLACE: a raise without a voucher keeps the one stored.
        sql = (
            f"INSERT INTO {self._p}high_water (channel_id, cumulative, voucher) VALUES (?, ?, ?)"
            " ON CONFLICT (channel_id) DO UPDATE SET cumulative = excluded.cumulative,"
            " voucher = coalesce(excluded.voucher, voucher)"
        )

        def body(con: sqlite3.Connection) -> bool:
            if cumulative <= self._get_int(con, "high_water", "cumulative", "channel_id", channel_id):
                return False
            con.execute(sql, (channel_id, str(cumulative), voucher))
            return True

        return await self._run(body)

    async def high_water(self, channel_id: str) -> int:
        return await self._lookup(
            lambda con: self._get_int(con, "high_water", "cumulative", "channel_id", channel_id)
        )

    async def channel_voucher(self, channel_id: str) -> tuple[int, bytes | None]:
        sql = f"SELECT cumulative, voucher FROM {self._p}high_water WHERE channel_id = ?"
        row = await self._lookup(lambda con: con.execute(sql, (channel_id,)).fetchone())
        if row is None:
            return 0, None
        return int(row[0]), None if row[1] is None else bytes(row[1])

    async def list_channel_vouchers(
        self, *, after: str = "", limit: int = 500
    ) -> list[tuple[str, int, bytes]]:
        sql = (
            f"SELECT channel_id, cumulative, voucher FROM {self._p}high_water"
            " WHERE voucher IS NOT NULL AND channel_id > ? ORDER BY channel_id LIMIT ?"
        )
        rows = await self._run(lambda con: con.execute(sql, (after, max(limit, 0))).fetchall(), READ)
        return [(str(r[0]), int(r[1]), bytes(r[2])) for r in rows]

    async def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._readers.close()
            await self._committer.stop()

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
        sql, args = list_query(f"{self._p}settlements", "?", states, kind, payer, since, oldest_first)
        args += [max(limit, 0), max(offset, 0)]
        rows = await self._run(lambda con: con.execute(sql + " LIMIT ? OFFSET ?", args).fetchall(), READ)
        return [settlement_from_row(row) for row in rows]
