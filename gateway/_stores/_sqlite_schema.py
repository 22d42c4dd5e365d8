"""The SQLite store's file: its schema migrations and the writer connection that opens it.

`open_writer` opens (creating the directory) one database file in WAL mode with the given `synchronous`
mode and `busy_timeout`, and brings its tables under `prefix` to the newest schema version, once across
concurrent first starts. The connection it returns belongs to the store's committer thread from then on.
"""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path

from gateway._store import StoreSchemaError

__all__ = ["MIGRATIONS", "SYNC_MODES", "open_writer"]

# Ordered; entry n (1-based) is schema version n. Never edit a released entry: append a new one.
MIGRATIONS: tuple[tuple[str, ...], ...] = (
    (
        "CREATE TABLE {p}claims (key TEXT PRIMARY KEY, expires_at REAL NOT NULL,"
        " finalized INTEGER NOT NULL DEFAULT 0) WITHOUT ROWID",
        "CREATE TABLE {p}receipts (key TEXT PRIMARY KEY, receipt BLOB NOT NULL) WITHOUT ROWID",
        "CREATE TABLE {p}settlements (key TEXT PRIMARY KEY, kind TEXT NOT NULL, payload BLOB NOT NULL,"
        " payer TEXT NOT NULL, amount TEXT NOT NULL, created_at REAL NOT NULL,"
        " attempts INTEGER NOT NULL DEFAULT 0, state TEXT NOT NULL, tx_hash TEXT, error TEXT,"
        " retry_at REAL, lease_until REAL)",
        "CREATE INDEX {p}settlements_due ON {p}settlements (kind, created_at)"
        " WHERE state IN ('queued', 'failed', 'leased')",
        "CREATE INDEX {p}settlements_state ON {p}settlements (state, created_at)",
        "CREATE TABLE {p}pending (account TEXT PRIMARY KEY, amount TEXT NOT NULL) WITHOUT ROWID",
        "CREATE TABLE {p}high_water (channel_id TEXT PRIMARY KEY, cumulative TEXT NOT NULL) WITHOUT ROWID",
    ),
    (  # 2: holder tokens for claims and leases; validity and settlement times for `purge`
        "ALTER TABLE {p}claims ADD COLUMN holder TEXT",
        "ALTER TABLE {p}claims ADD COLUMN finalized_at REAL",  # NULL on older rows: never purged
        "ALTER TABLE {p}settlements ADD COLUMN lease_token TEXT",
        "ALTER TABLE {p}settlements ADD COLUMN settled_at REAL",
        "ALTER TABLE {p}settlements ADD COLUMN expires_at REAL",
        "CREATE INDEX {p}claims_expiry ON {p}claims (finalized, expires_at)",
    ),
    (  # 3: the latest voucher stored with a channel's high-water mark (NULL on older rows: none stored)
        "ALTER TABLE {p}high_water ADD COLUMN voucher BLOB",
    ),
)

SYNC_MODES = ("off", "normal", "full", "extra")


def _migrate(con: sqlite3.Connection, p: str) -> None:
    con.execute("BEGIN IMMEDIATE")  # concurrent first starts: one migrates, the others then see it done
    try:
        con.execute(
            f"CREATE TABLE IF NOT EXISTS {p}schema_version (version INTEGER PRIMARY KEY, applied_at REAL)"
        )
        (current,) = con.execute(f"SELECT coalesce(max(version), 0) FROM {p}schema_version").fetchone()
        if current > len(MIGRATIONS):
            raise StoreSchemaError(
                f"database is at schema version {current}, this code knows {len(MIGRATIONS)}"
            )
        for version in range(current + 1, len(MIGRATIONS) + 1):
            for statement in MIGRATIONS[version - 1]:
                con.execute(statement.format(p=p))
            con.execute(f"INSERT INTO {p}schema_version VALUES (?, ?)", (version, time.time()))
    except BaseException:
        con.execute("ROLLBACK")
        raise
    con.execute("COMMIT")


def open_writer(path: str, *, prefix: str, synchronous: str, busy_timeout_ms: int) -> sqlite3.Connection:
    """The migrated database at `path`, WAL mode, for the committer thread (blocking: run it off the loop)."""
    if path != ":memory:":
        Path(path).parent.mkdir(parents=True, exist_ok=True)
    # opened here, then used only by the committer thread: one thread at a time
    con = sqlite3.connect(path, timeout=busy_timeout_ms / 1000, isolation_level=None, check_same_thread=False)
    try:
        con.execute(f"PRAGMA busy_timeout = {int(busy_timeout_ms)}")
        con.execute("PRAGMA journal_mode = WAL")
        con.execute(f"PRAGMA synchronous = {synchronous}")
        _migrate(con, prefix)
    except BaseException:
        con.close()
        raise
    return con
