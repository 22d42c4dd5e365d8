"""PostgreSQL: the store shared by many gateway replicas.

Every operation is one statement, so one round trip and one commit, and its atomicity is the database's:
claims and pending spend are `INSERT ... ON CONFLICT DO UPDATE ... WHERE` (the conflicting row is locked and
the condition re-checked on its newest version), the queue leases with `FOR UPDATE SKIP LOCKED` (concurrent
leasers skip each other's rows instead of waiting or double-leasing), high-water marks move only upwards.
Each store lives in its own schema, so tests and several gateways can share one database.
"""

from __future__ import annotations

import asyncio
import hashlib
import math
import time
from collections.abc import Sequence
from typing import Any

import asyncpg

from gateway._store import (
    ClaimLost,
    Purged,
    QueueStats,
    Settlement,
    StoreSchemaError,
    StoreUnavailable,
    new_token,
)
from gateway._stores import COLUMNS, check_identifier, settlement_from_row
from gateway._stores._queries import list_query

__all__ = ["MIGRATIONS", "PostgresStore"]

# Ordered; entry n (1-based) is schema version n. Never edit a released entry: append a new one.
MIGRATIONS: tuple[str, ...] = (
    """
    CREATE TABLE {s}.claims (key text PRIMARY KEY, expires_at double precision NOT NULL,
        finalized boolean NOT NULL DEFAULT false);
    CREATE TABLE {s}.receipts (key text PRIMARY KEY, receipt bytea NOT NULL);
    CREATE TABLE {s}.settlements (key text PRIMARY KEY, kind text NOT NULL, payload bytea NOT NULL,
        payer text NOT NULL, amount numeric(78, 0) NOT NULL, created_at double precision NOT NULL,
        attempts integer NOT NULL DEFAULT 0,
        state text NOT NULL CHECK (state IN ('queued', 'leased', 'settled', 'failed', 'dead')),
        tx_hash text, error text, retry_at double precision, lease_until double precision);
    CREATE INDEX settlements_due ON {s}.settlements (kind, created_at)
        WHERE state IN ('queued', 'failed', 'leased');
    CREATE INDEX settlements_state ON {s}.settlements (state, created_at);
    CREATE TABLE {s}.pending (account text PRIMARY KEY, amount numeric(78, 0) NOT NULL);
    CREATE TABLE {s}.high_water (channel_id text PRIMARY KEY, cumulative numeric(78, 0) NOT NULL);
    """,
    # 2: holder tokens for claims and leases; validity and settlement times for `purge` (older rows keep
    # NULL finalized_at / settled_at / expires_at and are never purged)
    """
    ALTER TABLE {s}.claims ADD COLUMN holder text, ADD COLUMN finalized_at double precision;
    ALTER TABLE {s}.settlements ADD COLUMN lease_token text, ADD COLUMN settled_at double precision,
        ADD COLUMN expires_at double precision;
    CREATE INDEX claims_expiry ON {s}.claims (finalized, expires_at);
    """,
    # 3: the latest voucher stored with a channel's high-water mark (NULL on older rows: none stored)
    """
    ALTER TABLE {s}.high_water ADD COLUMN voucher bytea;
    """,
)

_HELD = " WHERE key = $1 AND holder = $2 AND NOT finalized AND expires_at > $3 RETURNING 1"
_FINAL_DUE = "finalized AND expires_at <= $1 AND finalized_at + $2 <= $1"
# Unsettled, and (with a lease token) still leased under it: see `PaymentStore.mark_settled`.
_OURS = " AND state <> 'settled' AND ($3::text IS NULL OR (state = 'leased' AND lease_token = $3))"
_QUEUE_IT = (  # the settlement half of `complete`; $8 NULL: none
    " INSERT INTO {s}.settlements (key, kind, payload, payer, amount, created_at, expires_at, state)"
    " SELECT $8::text, $3::text, $4::bytea, $5::text, $6::numeric, $7::float8, $11::float8, 'queued'"
)


def _finalize_any(until: str, now: str) -> str:
    """Finalize claim $1 whatever holds it (inserted if absent), valid until `until`; `now` its time."""
    return (
        "INSERT INTO {s}.claims AS t (key, expires_at, finalized, finalized_at)"
        f" VALUES ($1, {until}, true, {now}) ON CONFLICT (key) DO UPDATE SET finalized = true,"
        " expires_at = excluded.expires_at, holder = NULL, finalized_at = excluded.finalized_at"
        " WHERE NOT t.finalized"
    )


def _settled(tx_hash: str, now: str) -> str:
    """Mark settlement records settled in `tx_hash` at `now` (the WHERE clause follows)."""
    return (
        f"UPDATE {{s}}.settlements SET state = 'settled', tx_hash = {tx_hash}, error = NULL, retry_at = NULL,"
        f" lease_until = NULL, lease_token = NULL, settled_at = {now}"
    )


_SQL = {
    "claim": "INSERT INTO {s}.claims AS t (key, expires_at, holder) VALUES ($1, $2, $4) ON CONFLICT (key)"
    " DO UPDATE SET expires_at = excluded.expires_at, holder = excluded.holder"
    " WHERE NOT t.finalized AND t.expires_at <= $3 RETURNING 1",
    "renew": "UPDATE {s}.claims SET expires_at = $4" + _HELD,
    "release": "DELETE FROM {s}.claims" + _HELD,
    "finalize": _finalize_any("$2", "$3"),
    "is_finalized": "SELECT finalized FROM {s}.claims WHERE key = $1",
    # finalize + receipt + optional enqueue as one statement: one round trip, one commit. Checked: only
    # through the live claim of holder $12 (an UPDATE re-checks its condition on the row's newest version).
    "complete": "WITH f AS (UPDATE {s}.claims SET finalized = true, expires_at = $10, holder = NULL,"
    " finalized_at = $9 WHERE key = $1 AND holder = $12 AND NOT finalized AND expires_at > $9 RETURNING key),"
    " r AS (INSERT INTO {s}.receipts (key, receipt) SELECT key, $2::bytea FROM f"
    " ON CONFLICT (key) DO UPDATE SET receipt = excluded.receipt),"
    " q AS (" + _QUEUE_IT + " FROM f WHERE $8 IS NOT NULL ON CONFLICT (key) DO NOTHING)"
    " SELECT count(*) FROM f",
    "complete_any": "WITH f AS (" + _finalize_any("$10", "$9") + "),"
    " r AS (INSERT INTO {s}.receipts (key, receipt) VALUES ($1, $2)"
    " ON CONFLICT (key) DO UPDATE SET receipt = excluded.receipt)"
    + _QUEUE_IT
    + " WHERE $8 IS NOT NULL ON CONFLICT (key) DO NOTHING",
    # `complete` (no new settlement) + `mark_settled` of the in-flight record, one statement. The record is
    # touched only through the claim's row that f returns: a lost claim writes nothing.
    "complete_settled": "WITH f AS (UPDATE {s}.claims SET finalized = true, expires_at = $4, holder = NULL,"
    " finalized_at = $3 WHERE key = $1 AND holder = $2 AND NOT finalized AND expires_at > $3 RETURNING key),"
    " r AS (INSERT INTO {s}.receipts (key, receipt) SELECT key, $5::bytea FROM f"
    " ON CONFLICT (key) DO UPDATE SET receipt = excluded.receipt),"
    " q AS (" + _settled("$6", "$3") + " WHERE key IN (SELECT key FROM f) AND state <> 'settled')"
    " SELECT count(*) FROM f",
    # The same with no holder to check (the Redis cache checked its own claim): finalized unconditionally.
    "complete_settled_any": "WITH f AS (" + _finalize_any("$3", "$2") + "),"
    " r AS (INSERT INTO {s}.receipts (key, receipt) VALUES ($1, $4)"
    " ON CONFLICT (key) DO UPDATE SET receipt = excluded.receipt) "
    + _settled("$5", "$2")
    + " WHERE key = $1 AND state <> 'settled'",
    # `claim` of the marker + `sub_pending`, one statement: the counter moves only if the marker was taken
    # (a concurrent taker of the same marker waits on its row, then sees it held and takes nothing).
    "sub_pending_once": "WITH c AS (INSERT INTO {s}.claims AS t (key, expires_at, holder) VALUES ($1, $2, $4)"
    " ON CONFLICT (key) DO UPDATE SET expires_at = excluded.expires_at, holder = excluded.holder"
    " WHERE NOT t.finalized AND t.expires_at <= $3 RETURNING 1),"
    " p AS (UPDATE {s}.pending SET amount = greatest(amount - $6::numeric, 0)"
    " WHERE account = $5 AND EXISTS (SELECT 1 FROM c))"
    " SELECT count(*) FROM c",
    "purge": "DELETE FROM {s}.claims WHERE NOT finalized AND expires_at <= $1",
    "purge_all": "WITH rc AS (DELETE FROM {s}.receipts WHERE key IN (SELECT key FROM {s}.claims WHERE "
    + _FINAL_DUE
    + ") RETURNING 1), c AS (DELETE FROM {s}.claims WHERE (NOT finalized AND expires_at <= $1) OR ("
    + _FINAL_DUE
    + ") RETURNING 1), q AS (DELETE FROM {s}.settlements WHERE state = 'settled' AND expires_at <= $1"
    " AND settled_at + $2 <= $1 RETURNING 1)"
    " SELECT (SELECT count(*) FROM c), (SELECT count(*) FROM rc), (SELECT count(*) FROM q)",
    "put_receipt": "INSERT INTO {s}.receipts (key, receipt) VALUES ($1, $2)"
    " ON CONFLICT (key) DO UPDATE SET receipt = excluded.receipt",
    "get_receipt": "SELECT receipt FROM {s}.receipts WHERE key = $1",
    "enqueue": "INSERT INTO {s}.settlements (key, kind, payload, payer, amount, created_at, expires_at,"
    " state) VALUES ($1, $2, $3, $4, $5, $6, $7, 'queued') ON CONFLICT (key) DO NOTHING",
    "lease": "UPDATE {s}.settlements SET state = 'leased', attempts = attempts + 1, lease_until = $4,"
    " lease_token = $5, retry_at = NULL WHERE key IN (SELECT key FROM {s}.settlements WHERE kind = $1 AND"
    " (state = 'queued' OR (state = 'failed' AND retry_at <= $2) OR (state = 'leased' AND lease_until <= $2))"
    " ORDER BY created_at, key LIMIT $3 FOR UPDATE SKIP LOCKED) RETURNING " + COLUMNS,
    "mark_settled": _settled("$2", "$4") + " WHERE key = ANY($1::text[])" + _OURS + " RETURNING key",
    "mark_failed": "UPDATE {s}.settlements SET state = $4, error = $2, retry_at = $5, lease_until = NULL,"
    " lease_token = NULL WHERE key = $1" + _OURS + " RETURNING 1",
    "get_settlement": "SELECT " + COLUMNS + " FROM {s}.settlements WHERE key = $1",
    "dead_letters": "SELECT " + COLUMNS + " FROM {s}.settlements WHERE state = 'dead'"
    " AND ($1::text IS NULL OR kind = $1) ORDER BY created_at, key LIMIT $2",
    "requeue": "UPDATE {s}.settlements SET state = 'queued', attempts = 0, retry_at = NULL"
    " WHERE key = $1 AND state IN ('dead', 'failed') RETURNING 1",
    "stats": "SELECT state, count(*) FROM {s}.settlements GROUP BY state",
    "add_pending": "INSERT INTO {s}.pending AS t (account, amount)"
    " SELECT $1::text, $2::numeric WHERE $2 <= $3::numeric"
    " ON CONFLICT (account) DO UPDATE SET amount = t.amount + excluded.amount"
    " WHERE t.amount + excluded.amount <= $3::numeric RETURNING 1",
    "sub_pending": "UPDATE {s}.pending SET amount = greatest(amount - $2::numeric, 0) WHERE account = $1",
    "get_pending": "SELECT amount FROM {s}.pending WHERE account = $1",
    "raise_high_water": "INSERT INTO {s}.high_water AS t (channel_id, cumulative, voucher)"
    " VALUES ($1, $2, $3) ON CONFLICT (channel_id) DO UPDATE SET cumulative = excluded.cumulative,"
    " voucher = coalesce(excluded.voucher, t.voucher) WHERE t.cumulative < excluded.cumulative RETURNING 1",
    "high_water": "SELECT cumulative FROM {s}.high_water WHERE channel_id = $1",
    "channel_voucher": "SELECT cumulative, voucher FROM {s}.high_water WHERE channel_id = $1",
    "list_channel_vouchers": "SELECT channel_id, cumulative, voucher FROM {s}.high_water"
    " WHERE voucher IS NOT NULL AND channel_id > $1 ORDER BY channel_id LIMIT $2",
    "renew_lease": "UPDATE {s}.settlements SET lease_until = $3 WHERE key = ANY($1::text[])"
    " AND state = 'leased' AND lease_token = $2 RETURNING key",
}

# Failures that mean "the database is not there right now" (as opposed to a bug in a statement).
_DOWN: tuple[type[BaseException], ...] = (
    OSError,
    TimeoutError,
    asyncpg.PostgresConnectionError,
    asyncpg.InterfaceError,
    asyncpg.exceptions.OperatorInterventionError,
    asyncpg.exceptions.InsufficientResourcesError,
)


def _lock_id(schema: str) -> int:
    """The advisory lock that serialises migrations of one schema (other schemas are not blocked)."""
    digest = hashlib.blake2b(b"agentpay-migrate:" + schema.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big", signed=True)


async def _migrate(con: Any, schema: str) -> None:
    async with con.transaction():
        await con.execute("SELECT pg_advisory_xact_lock($1)", _lock_id(schema))
        await con.execute(f"CREATE SCHEMA IF NOT EXISTS {schema}")
        await con.execute(
            f"CREATE TABLE IF NOT EXISTS {schema}.schema_version"
            " (version integer PRIMARY KEY, applied_at double precision NOT NULL)"
        )
        current = await con.fetchval(f"SELECT coalesce(max(version), 0) FROM {schema}.schema_version")
        if current > len(MIGRATIONS):
            raise StoreSchemaError(
                f"schema {schema} is at version {current}, this code knows {len(MIGRATIONS)}"
            )
        for version in range(current + 1, len(MIGRATIONS) + 1):
            await con.execute(MIGRATIONS[version - 1].format(s=schema))
            await con.execute(f"INSERT INTO {schema}.schema_version VALUES ($1, $2)", version, time.time())


class PostgresStore:
    """`PaymentStore` on PostgreSQL through an asyncpg pool. Open with `await PostgresStore.open(dsn)`."""

    def __init__(self, pool: Any, schema: str) -> None:
        self._pool = pool
        self._sql = {name: sql.format(s=schema) for name, sql in _SQL.items()}

    @classmethod
    async def open(
        cls, dsn: str, *, schema: str = "agentpay", pool_min: int = 1, pool_max: int = 10
    ) -> PostgresStore:
        check_identifier(schema, "schema")
        try:
            pool = await asyncpg.create_pool(dsn, min_size=pool_min, max_size=pool_max)
        except _DOWN as exc:
            raise StoreUnavailable(f"postgresql: {exc}") from exc
        try:
            async with pool.acquire() as con:
                await _migrate(con, schema)
        except BaseException:
            await pool.close()
            raise
        return cls(pool, schema)

    async def _call(self, method: str, name: str, *args: Any) -> Any:
        try:
            return await getattr(self._pool, method)(self._sql[name], *args)
        except _DOWN as exc:
            raise StoreUnavailable(f"postgresql: {exc}") from exc

    # claims

    async def claim(self, key: str, *, ttl: float) -> str | None:
        now, token = time.time(), new_token()
        return token if await self._call("fetchval", "claim", key, now + ttl, now, token) else None

    async def _held(self, name: str, key: str, holder: str, *more: Any) -> None:
        if await self._call("fetchval", name, key, holder, time.time(), *more) is None:
            raise ClaimLost(f"the claim on {key} is no longer held by this request")

    async def renew(self, key: str, holder: str, *, ttl: float) -> None:
        await self._held("renew", key, holder, time.time() + ttl)

    async def release(self, key: str, holder: str) -> None:
        await self._held("release", key, holder)

    async def finalize(self, key: str, *, keep_until: float | None = None) -> None:
        until = math.inf if keep_until is None else keep_until
        await self._call("execute", "finalize", key, until, time.time())

    async def is_finalized(self, key: str) -> bool:
        return bool(await self._call("fetchval", "is_finalized", key))

    async def complete(
        self,
        key: str,
        holder: str | None,
        *,
        receipt: bytes,
        settlement: Settlement | None = None,
        keep_until: float | None = None,
    ) -> None:
        s = settlement
        queued = (None,) * 6 if s is None else (s.kind, s.payload, s.payer, s.amount, s.created_at, s.key)
        until = math.inf if keep_until is None else keep_until
        args = (key, receipt, *queued, time.time(), until, None if s is None else s.expires_at)
        if holder is None:
            await self._call("execute", "complete_any", *args)
        elif not await self._call("fetchval", "complete", *args, holder):
            raise ClaimLost(f"the claim on {key} is no longer held by this request")

    async def complete_settled(
        self, key: str, holder: str | None, *, receipt: bytes, tx_hash: str, keep_until: float | None = None
    ) -> None:
        until = math.inf if keep_until is None else keep_until
        now = time.time()
        if holder is None:
            await self._call("execute", "complete_settled_any", key, now, until, receipt, tx_hash)
        elif not await self._call("fetchval", "complete_settled", key, holder, now, until, receipt, tx_hash):
            raise ClaimLost(f"the claim on {key} is no longer held by this request")

    async def purge_expired_claims(self) -> int:
        status: str = await self._call("execute", "purge", time.time())
        return int(status.rsplit(" ", 1)[-1])

    async def purge(self, *, retention: float) -> Purged:
        row = await self._call("fetchrow", "purge_all", time.time(), float(retention))
        return Purged(claims=row[0], receipts=row[1], settlements=row[2])

    # receipts

    async def put_receipt(self, key: str, receipt: bytes) -> None:
        await self._call("execute", "put_receipt", key, receipt)

    async def get_receipt(self, key: str) -> bytes | None:
        value = await self._call("fetchval", "get_receipt", key)
        return None if value is None else bytes(value)

    # settlement queue

    async def enqueue(self, item: Settlement) -> None:
        i = item
        await self._call(
            "execute", "enqueue", i.key, i.kind, i.payload, i.payer, i.amount, i.created_at, i.expires_at
        )

    async def lease(self, kind: str, *, limit: int, lease_seconds: float) -> list[Settlement]:
        now = time.time()
        rows = await self._call("fetch", "lease", kind, now, max(limit, 0), now + lease_seconds, new_token())
        return sorted(map(settlement_from_row, rows), key=lambda item: (item.created_at, item.key))

    async def renew_lease(self, keys: list[str], *, lease: str, lease_seconds: float) -> list[str]:
        rows = await self._call("fetch", "renew_lease", keys, lease, time.time() + lease_seconds)
        done = {row[0] for row in rows}
        return [key for key in dict.fromkeys(keys) if key in done]

    async def mark_settled(self, keys: list[str], *, tx_hash: str, lease: str | None = None) -> list[str]:
        rows = await self._call("fetch", "mark_settled", keys, tx_hash, lease, time.time())
        done = {row[0] for row in rows}
        return [key for key in dict.fromkeys(keys) if key in done]

    async def mark_failed(
        self, key: str, *, error: str, retry_at: float | None, lease: str | None = None
    ) -> bool:
        state = "dead" if retry_at is None else "failed"
        return await self._call("fetchval", "mark_failed", key, error, lease, state, retry_at) is not None

    async def get_settlement(self, key: str) -> Settlement | None:
        row = await self._call("fetchrow", "get_settlement", key)
        return None if row is None else settlement_from_row(row)

    async def dead_letters(self, *, kind: str | None = None, limit: int = 100) -> list[Settlement]:
        return [
            settlement_from_row(row) for row in await self._call("fetch", "dead_letters", kind, max(limit, 0))
        ]

    async def requeue(self, key: str) -> bool:
        return await self._call("fetchval", "requeue", key) is not None

    async def stats(self) -> QueueStats:
        counts = {"queued": 0, "leased": 0, "settled": 0, "failed": 0, "dead": 0}
        counts.update({row[0]: row[1] for row in await self._call("fetch", "stats")})
        return QueueStats(**counts)

    # pending spend and channel high-water marks

    async def add_pending(self, account: str, amount: int, *, limit: int) -> bool:
        return await self._call("fetchval", "add_pending", account, amount, limit) is not None

    async def sub_pending(self, account: str, amount: int) -> None:
        await self._call("execute", "sub_pending", account, amount)

    async def sub_pending_once(self, marker: str, account: str, amount: int, *, ttl: float) -> bool:
        now = time.time()
        args = (marker, now + ttl, now, new_token(), account, amount)
        return bool(await self._call("fetchval", "sub_pending_once", *args))

    async def get_pending(self, account: str) -> int:
        return int(await self._call("fetchval", "get_pending", account) or 0)

    async def raise_high_water(
        self, channel_id: str, cumulative: int, *, voucher: bytes | None = None
    ) -> bool:
        if cumulative <= 0:  # not higher than the implicit 0 of an unseen channel
            return False
        return await self._call("fetchval", "raise_high_water", channel_id, cumulative, voucher) is not None

    async def high_water(self, channel_id: str) -> int:
        return int(await self._call("fetchval", "high_water", channel_id) or 0)

    async def channel_voucher(self, channel_id: str) -> tuple[int, bytes | None]:
        row = await self._call("fetchrow", "channel_voucher", channel_id)
        if row is None:
            return 0, None
        return int(row[0]), None if row[1] is None else bytes(row[1])

    async def list_channel_vouchers(
        self, *, after: str = "", limit: int = 500
    ) -> list[tuple[str, int, bytes]]:
        rows = await self._call("fetch", "list_channel_vouchers", after, max(limit, 0))
        return [(str(r[0]), int(r[1]), bytes(r[2])) for r in rows]

    async def close(self) -> None:
        await asyncio.wait_for(self._pool.close(), timeout=10)

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
        # the schema-qualified table, as the statements formatted at open name it
        table = self._sql["get_settlement"].partition(" FROM ")[2].partition(" ")[0]
        sql, args = list_query(table, "$", states, kind, payer, since, oldest_first)
        n = len(args)
        sql += f" LIMIT ${n + 1} OFFSET ${n + 2}"
        try:
            rows = await self._pool.fetch(sql, *args, max(limit, 0), max(offset, 0))
        except _DOWN as exc:
            raise StoreUnavailable(f"postgresql: {exc}") from exc
        return [settlement_from_row(row) for row in rows]
