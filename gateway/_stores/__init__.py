"""Store backends and `open_store(url)`, which picks one by URL.

    memory://                        in-process, forgotten on exit (tests, demos)
    sqlite:///relative/path.db       one file; SQLAlchemy's convention, four slashes for an absolute path
    sqlite:////absolute/path.db      ?prefix=, ?synchronous=full|normal, ?busy_timeout_ms=10000
    postgresql://user@host:5432/db   many replicas; ?schema=agentpay, ?pool_min=1, ?pool_max=10; other
                                     query parameters go to asyncpg (e.g. sslmode)
    ...?cache=redis://host:6379/0    Redis in front, for live claims (?cache_prefix=agentpay:<schema>:,
                                     ?cache_ttl=86400 seconds for "final" markers); percent-encode a
                                     cache URL that has its own query string

Drivers (asyncpg, redis) are imported only when their scheme is used.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from gateway._store import PaymentStore, Settlement, StoreConfigError
from gateway._stores.memory import MemoryStore

__all__ = ["COLUMNS", "check_identifier", "open_store", "settlement_from_row"]

COLUMNS = (
    "key, kind, payload, payer, amount, created_at, attempts, state, tx_hash, error, retry_at, lease_until,"
    " lease_token, settled_at, expires_at"
)

_IDENTIFIER = re.compile(r"[a-z_][a-z0-9_]{0,47}")


def check_identifier(name: str, what: str) -> str:
    """Schema names and table prefixes are spliced into SQL, so only plain lower-case names pass."""
    if not _IDENTIFIER.fullmatch(name):
        raise StoreConfigError(f"{what} must match [a-z_][a-z0-9_]* (at most 48 chars), not {name!r}")
    return name


def settlement_from_row(row: Sequence[Any]) -> Settlement:
    """A row selected as `COLUMNS` (any backend) as a `Settlement`."""
    return Settlement(
        key=row[0],
        kind=row[1],
        payload=bytes(row[2]),
        payer=row[3],
        amount=int(row[4]),
        created_at=row[5],
        attempts=row[6],
        state=row[7],
        tx_hash=row[8],
        error=row[9],
        retry_at=row[10],
        lease_until=row[11],
        lease_token=row[12],
        settled_at=row[13],
        expires_at=row[14],
    )


def _int(params: dict[str, str], name: str, default: int) -> int:
    raw = params.pop(name, None)
    if raw is None:
        return default
    try:
        return int(raw)
    except ValueError:
        raise StoreConfigError(f"store URL parameter {name} must be an integer, not {raw!r}") from None


def _no_more(params: dict[str, str]) -> None:
    if params:
        raise StoreConfigError(f"unknown store URL parameters: {sorted(params)}")


async def open_store(url: str) -> PaymentStore:
    """Open (creating and migrating as needed) the store that `url` names; see the module doc."""
    parts = urlsplit(url)
    params = dict(parse_qsl(parts.query, keep_blank_values=True))
    cache_url = params.pop("cache", None)
    cache_prefix = params.pop("cache_prefix", None)
    cache_ttl = _int(params, "cache_ttl", 86_400)
    scope = ""
    store: PaymentStore
    if parts.scheme == "memory":
        _no_more(params)
        store = MemoryStore()
    elif parts.scheme == "sqlite":
        from gateway._stores.sqlite import SQLiteStore

        path = parts.path[1:] if parts.path.startswith("/") else parts.path
        if not path or parts.netloc:
            raise StoreConfigError("a sqlite URL needs a path: sqlite:///relative.db or sqlite:////abs.db")
        scope = params.pop("prefix", "")
        busy = _int(params, "busy_timeout_ms", 10_000)
        synchronous = params.pop("synchronous", "full")
        _no_more(params)
        store = await SQLiteStore.open(path, prefix=scope, synchronous=synchronous, busy_timeout_ms=busy)
    elif parts.scheme in ("postgresql", "postgres"):
        from gateway._stores.postgres import PostgresStore

        scope = params.pop("schema", "agentpay")
        pool_min, pool_max = _int(params, "pool_min", 1), _int(params, "pool_max", 10)
        dsn = urlunsplit(parts._replace(query=urlencode(params)))  # the rest is asyncpg's (sslmode, ...)
        store = await PostgresStore.open(dsn, schema=scope, pool_min=pool_min, pool_max=pool_max)
    elif parts.scheme in ("redis", "rediss"):
        raise StoreConfigError("Redis is a cache in front of a store: use postgresql://...?cache=redis://...")
    else:  # the URL itself is not echoed: it may carry a password
        raise StoreConfigError(f"unknown store URL scheme {parts.scheme!r}")
    if cache_url is None:
        return store
    from gateway._stores.redis import RedisCachedStore

    prefix = cache_prefix if cache_prefix is not None else f"agentpay:{scope}:"
    return await RedisCachedStore.open(store, cache_url, prefix=prefix, final_ttl=cache_ttl)
