"""Store guarantees across separate OS processes (what several gateway replicas, or a gateway plus a
settler, do to one SQLite file or one PostgreSQL schema).

Each test spawns 3 workers (`python -m tests.test_store_procs WORKER ...`); each opens its own store,
waits for a shared start time so they really overlap, acts, and prints one JSON line.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from gateway._store import PaymentStore
from gateway._stores import open_store
from tests.test_store import isolated_url, item, run, versions_of

ROOT = Path(__file__).resolve().parent.parent
PROCS = 3


@pytest.fixture(params=["sqlite", "postgres", "postgres+redis"])
def shared_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    with isolated_url(request.param, tmp_path) as value:
        yield value


def _spawn(*args: str) -> list[Any]:
    start_at = str(time.time() + 2.5)  # interpreter start + imports, on a 2-core machine
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "tests.test_store_procs", *args, start_at],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(PROCS)
    ]
    results: list[Any] = []
    for proc in procs:
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err
        results.append(json.loads(out.strip().splitlines()[-1]))
    return results


def test_claim_is_exclusive_across_processes(shared_url: str) -> None:
    wins = _spawn("claim", shared_url, "the-key", "100")
    assert sum(wins) == 1


def test_leasers_in_different_processes_never_share_an_item(shared_url: str) -> None:
    keys = {f"s{n:03}" for n in range(150)}

    async def fill(store: PaymentStore) -> None:
        for key in sorted(keys):
            await store.enqueue(item(key))

    run(shared_url, fill)
    results = _spawn("lease", shared_url)
    everything = [key for got in results for key in got]
    assert len(everything) == len(set(everything)) == 150 and set(everything) == keys


def test_concurrent_first_starts_migrate_once(shared_url: str) -> None:
    assert _spawn("open", shared_url) == ["ok"] * PROCS
    versions = versions_of(shared_url)
    assert versions == list(range(1, len(versions) + 1)) and versions


def _popen(*args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "tests.test_store_procs", *args, "0"],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _kill_after(proc: subprocess.Popen[str], lines: int) -> list[str]:
    """Read `lines` lines, SIGKILL the worker mid-flight, and return everything it printed."""
    assert proc.stdout is not None
    seen = [proc.stdout.readline().strip() for _ in range(lines)]
    proc.kill()
    out, err = proc.communicate(timeout=30)
    assert all(seen), err
    return seen + out.split()


def test_served_payments_survive_a_killed_process(shared_url: str) -> None:
    served = _kill_after(_popen("serve", shared_url), 40)  # each key printed only after `complete` returned

    async def check(store: PaymentStore) -> None:
        for key in served:
            assert await store.is_finalized(key) and not await store.claim(key, ttl=30)
            queued = await store.get_settlement(key)
            assert queued is not None and queued.state == "queued"
            assert await store.get_receipt(key) == b"receipt"

    run(shared_url, check)


def test_leases_of_a_killed_settler_come_back(shared_url: str) -> None:
    async def fill(store: PaymentStore) -> None:
        for n in range(10):
            await store.enqueue(item(f"s{n}"))

    run(shared_url, fill)
    leased = _kill_after(_popen("lease-and-hang", shared_url), 10)
    assert sorted(leased) == [f"s{n}" for n in range(10)]

    async def recover(store: PaymentStore) -> None:
        assert await store.lease("escrow", limit=10, lease_seconds=60) == []
        held = await store.get_settlement("s0")
        assert held is not None and held.state == "leased" and held.lease_until is not None
        await asyncio.sleep(held.lease_until - time.time() + 0.2)  # the dead settler's lease runs out
        again = await store.lease("escrow", limit=10, lease_seconds=60)
        assert sorted(s.key for s in again) == leased and {s.attempts for s in again} == {2}

    run(shared_url, recover)


# the worker side


async def _worker(argv: list[str]) -> object:
    what, url, *rest, start_at = argv
    if what == "open":
        await asyncio.sleep(max(0.0, float(start_at) - time.time()))
        await (await open_store(url)).close()
        return "ok"
    store = await open_store(url)
    try:
        await asyncio.sleep(max(0.0, float(start_at) - time.time()))
        if what == "serve":  # until killed
            for n in range(100_000):
                holder = await store.claim(f"p{n}", ttl=60)
                assert holder
                await store.complete(f"p{n}", holder, receipt=b"receipt", settlement=item(f"p{n}"))
                print(f"p{n}", flush=True)
        if what == "lease-and-hang":
            for s in await store.lease("escrow", limit=10, lease_seconds=4.0):
                print(s.key, flush=True)
            await asyncio.sleep(120)
        if what == "claim":
            key, count = rest[0], int(rest[1])
            tokens = await asyncio.gather(*(store.claim(key, ttl=60) for _ in range(count)))
            return sum(token is not None for token in tokens)
        got: list[str] = []
        while batch := await store.lease("escrow", limit=5, lease_seconds=120):
            got += [s.key for s in batch]
            await asyncio.sleep(0)
        return got
    finally:
        await store.close()


if __name__ == "__main__":
    print(json.dumps(asyncio.run(_worker(sys.argv[1:]))))
