"""Differential test: random sequences of store calls give the same answers on every backend as on the
in-memory store, which is small enough to read as the specification.

TTLs and retry times are far in the future (validity ends far in the past or future) so the outcome depends
on the call order only. Holder and lease tokens are random, so each trace remembers the last ones it was
handed and presents those (or a stale/forged one); answers compare whether a token was given, not its value.
"""

from __future__ import annotations

import asyncio
import random
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway._store import ClaimLost, PaymentStore, Settlement
from gateway._stores import open_store
from gateway._stores.memory import MemoryStore
from tests.test_store import PG_URL, delete_prefix, isolated_url

TABLES = ("claims", "receipts", "settlements", "pending", "high_water")


def _program(rng: random.Random) -> list[tuple[Any, ...]]:
    """A random call sequence. Drawn uniformly (Hypothesis' own list strategies favour short, simple
    lists, which almost never reach chains like enqueue -> lease -> fail -> requeue) from one family or
    from all of them."""

    def key() -> str:
        return rng.choice("abd")

    def account() -> str:
        return rng.choice(["0x1", "0x2"])

    def amount() -> int:
        return rng.choice([0, 1, 5, 10, 2**64, 2**130, rng.randrange(2**130)])

    def holder() -> str:
        return rng.choice(["ours", "ours", "forged"])

    def keep_until() -> str | None:
        return rng.choice([None, "past", "future"])

    claims: list[Callable[[], tuple[Any, ...]]] = [
        lambda: ("claim", key()),
        lambda: ("release", key(), holder()),
        lambda: ("renew", key(), holder()),
        lambda: ("finalize", key(), keep_until()),
        lambda: ("is_finalized", key()),
        lambda: ("complete", key(), rng.random() < 0.5, rng.choice(["ours", "forged", None]), keep_until()),
        lambda: ("complete_settled", key(), holder(), keep_until()),
        lambda: ("sub_pending_once", key(), account(), amount()),
        lambda: ("purge", rng.choice([0, 3600 * 24])),
        lambda: ("put_receipt", key(), rng.randbytes(rng.randrange(4))),
        lambda: ("get_receipt", key()),
    ]
    queue: list[Callable[[], tuple[Any, ...]]] = [
        lambda: ("enqueue", key()),
        lambda: ("complete", key(), True, None, keep_until()),
        lambda: ("claim", key()),
        lambda: ("complete_settled", key(), holder(), keep_until()),
        lambda: ("lease", rng.choice(["escrow", "exact"]), rng.randrange(4)),
        lambda: (
            "mark_settled",
            [key() for _ in range(rng.randrange(3))],
            rng.choice([None, "ours", "forged"]),
        ),
        lambda: ("mark_failed", key(), rng.random() < 0.5, rng.choice([None, "ours", "forged"])),
        lambda: ("purge", 0),
        lambda: ("requeue", key()),
        lambda: ("dead_letters", rng.choice([None, "escrow"])),
    ]
    balances: list[Callable[[], tuple[Any, ...]]] = [
        lambda: ("add_pending", account(), amount(), amount()),
        lambda: ("sub_pending", account(), amount()),
        lambda: ("sub_pending_once", rng.choice("xy"), account(), amount()),
        lambda: ("raise_high_water", account(), amount()),
    ]
    family = rng.choice([claims, queue, balances, claims + queue + balances])
    return [rng.choice(family)() for _ in range(rng.randrange(5, 40))]


def _until(which: str | None) -> float | None:
    return None if which is None else time.time() + (-3600 if which == "past" else 3600)


def _item(key: str, expires: str | None = "past") -> Settlement:
    kind = "exact" if key == "d" else "escrow"
    return Settlement(
        key=key,
        kind=kind,
        payload=key.encode(),
        payer="0xp",
        amount=7,
        created_at=ord(key),
        expires_at=_until(expires),
    )


def _view(item: Settlement | None) -> Any:
    if item is None:
        return None
    return (item.key, item.state, item.attempts, item.error, item.tx_hash, item.lease_token is not None)


class _Tokens:
    """The holder and lease tokens one trace was handed, by key."""

    def __init__(self) -> None:
        self.holders: dict[str, str] = {}
        self.leases: dict[str, str] = {}

    def holder(self, key: str, which: str | None) -> str | None:
        return None if which is None else self.holders.get(key, "never") if which == "ours" else "forged"

    def lease(self, key: str, which: str | None) -> str | None:
        return None if which is None else self.leases.get(key, "never") if which == "ours" else "forged"


async def _lost(step: Any) -> Any:
    try:
        return await step
    except ClaimLost as exc:
        return exc.code


async def _apply(store: PaymentStore, op: tuple[Any, ...], tokens: _Tokens) -> Any:
    name, *args = op
    far = time.time() + 3600
    if name == "claim":
        token = await store.claim(args[0], ttl=3600)
        if token is not None:
            tokens.holders[args[0]] = token
        return token is not None
    if name == "release":
        return await _lost(store.release(args[0], tokens.holder(args[0], args[1]) or ""))
    if name == "renew":
        return await _lost(store.renew(args[0], tokens.holder(args[0], args[1]) or "", ttl=3600))
    if name == "finalize":
        return await store.finalize(args[0], keep_until=_until(args[1]))
    if name in ("is_finalized", "get_receipt", "requeue"):
        return await getattr(store, name)(args[0])
    if name == "complete":
        key, queued, holder, until = args
        step = store.complete(
            key,
            tokens.holder(key, holder),
            receipt=b"r",
            settlement=_item(key, until) if queued else None,
            keep_until=_until(until),
        )
        return await _lost(step)
    if name == "complete_settled":
        key, holder, until = args
        step = store.complete_settled(
            key, tokens.holder(key, holder) or "", receipt=b"s", tx_hash="0xs", keep_until=_until(until)
        )
        return await _lost(step)
    if name == "sub_pending_once":
        return await store.sub_pending_once(args[0], args[1], args[2], ttl=3600)
    if name == "purge":
        return await store.purge(retention=args[0])
    if name == "put_receipt":
        return await store.put_receipt(args[0], args[1])
    if name == "enqueue":
        return await store.enqueue(_item(args[0]))
    if name == "lease":
        leased = await store.lease(args[0], limit=args[1], lease_seconds=3600)
        tokens.leases.update({s.key: s.lease_token or "" for s in leased})
        return [_view(s) for s in leased]
    if name == "mark_settled":
        keys, which = args
        lease = tokens.lease(keys[0], which) if keys else None
        return await store.mark_settled(keys, tx_hash="0xt", lease=lease)
    if name == "mark_failed":
        key, dead, which = args
        lease = tokens.lease(key, which)
        return await store.mark_failed(key, error="e", retry_at=None if dead else far, lease=lease)
    if name == "dead_letters":
        return [_view(s) for s in await store.dead_letters(kind=args[0])]
    if name == "add_pending":
        return await store.add_pending(args[0], args[1], limit=args[2])
    if name == "sub_pending":
        return await store.sub_pending(args[0], args[1])
    assert name == "raise_high_water"
    return await store.raise_high_water(args[0], args[1])


async def _trace(store: PaymentStore, ops: list[tuple[Any, ...]]) -> list[Any]:
    tokens = _Tokens()
    answers = [await _apply(store, op, tokens) for op in ops]
    answers.append([_view(await store.get_settlement(k)) for k in "abcd"])
    answers.append([(await store.is_finalized(k), await store.get_receipt(k)) for k in "abdxy"])
    answers.append([await store.get_pending(a) for a in ("0x1", "0x2")])
    answers.append([await store.high_water(a) for a in ("0x1", "0x2")])
    answers.append(await store.stats())
    return answers


@pytest.mark.parametrize("backend", ["sqlite", "postgres", "postgres+redis"])
def test_every_backend_answers_like_the_memory_store(backend: str) -> None:
    with tempfile.TemporaryDirectory() as tmp, isolated_url(backend, Path(tmp)) as base:
        examples = iter(range(10**6))

        @settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
        @given(st.randoms(use_true_random=False))
        def check(rng: random.Random) -> None:
            ops = _program(rng)
            if (
                "redis" in backend
            ):  # its "final" markers outlive a purge (by design: see gateway._stores.redis)
                ops = [op for op in ops if op[0] != "purge"]
            # a fresh namespace per example: its own SQLite table prefix / PostgreSQL schema
            n = next(examples)
            url = base + f"?prefix=ex{n}_" if backend == "sqlite" else base

            async def both() -> tuple[list[Any], list[Any]]:
                expected = await _trace(MemoryStore(), ops)
                if backend != "sqlite":
                    await _truncate(base)
                store = await open_store(url)
                try:
                    return expected, await _trace(store, ops)
                finally:
                    await store.close()

            expected, actual = asyncio.run(both())
            assert actual == expected

        if backend != "sqlite":
            asyncio.run(_create(base))
        check()


async def _create(url: str) -> None:
    await (await open_store(url)).close()


async def _truncate(url: str) -> None:
    """PostgreSQL examples share the fixture's schema: empty it (and its Redis keys) between examples."""
    schema = url.split("schema=")[1].split("&")[0]
    con = await asyncpg.connect(PG_URL)
    try:
        await con.execute(f"TRUNCATE {', '.join(f'{schema}.{t}' for t in TABLES)}")
    finally:
        await con.close()
    if "cache_prefix=" in url:
        await delete_prefix(url.split("cache_prefix=")[1])
