"""`python -m tests.bench.store`: paid-request-shaped store throughput per backend.

A "request" is what the gateway asks of its store for one paid call. Two shapes are measured:
`paid` = claim + finalize + put_receipt + enqueue (four calls), and `complete` = claim + complete (the
same work in two calls, one of them one transaction; the gateway pipeline uses this one), reported as
`<backend>_ops_per_s` and `<backend>_complete_ops_per_s`. Each runs with an in-process concurrency of 16
for a few seconds per backend (`sqlite` is the default synchronous=full, `sqlite_normal` the opt-in).
`<backend>_cost_us` is the extra wall time per request relative to the memory store
(1e6/ops - 1e6/memory_ops). The last line printed is one JSON object. Numbers from a shared, loaded
machine swing a lot (fsync-bound ones most): compare runs taken back to back.

To add a scenario (e.g. the full gateway over ASGI), add an entry to SCENARIOS: an async factory that gets
the opened store and returns the per-request coroutine function.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

from gateway._store import PaymentStore, Settlement, open_store
from tests.test_store import isolated_url

Request = Callable[[int], Awaitable[None]]
Scenario = Callable[[PaymentStore], Awaitable[Request]]

RECEIPT = b'{"success":true,"transaction":"","network":"eip155:84532","payer":"0x' + b"ab" * 20 + b'"}'
PAYLOAD = bytes(range(256)) * 2  # about the size of a signed escrow payment


def _settlement(key: str) -> Settlement:
    return Settlement(
        key=key, kind="escrow", payload=PAYLOAD, payer="0x" + "cd" * 20, amount=10_000, created_at=time.time()
    )


async def paid(store: PaymentStore) -> Request:
    async def request(n: int) -> None:
        key = f"pay-{n}"
        assert await store.claim(key, ttl=60)
        await store.finalize(key)
        await store.put_receipt(key, RECEIPT)
        await store.enqueue(_settlement(key))

    return request


async def complete(store: PaymentStore) -> Request:
    async def request(n: int) -> None:
        key = f"pay-{n}"
        assert await store.claim(key, ttl=60)
        await store.complete(key, receipt=RECEIPT, settlement=_settlement(key))

    return request


SCENARIOS: dict[str, Scenario] = {"paid": paid, "complete": complete}
# backend name in the JSON -> (test backend, extra URL query)
BACKENDS: dict[str, tuple[str, str]] = {
    "memory": ("memory", ""),
    "sqlite": ("sqlite", ""),
    "sqlite_normal": ("sqlite", "synchronous=normal"),
    "postgres": ("postgres", ""),
    "postgres_redis": ("postgres+redis", ""),
}


async def measure(url: str, scenario: Scenario, *, concurrency: int, seconds: float) -> float:
    """Requests per second of `scenario` against a fresh store at `url`."""
    store = await open_store(url)
    try:
        request = await scenario(store)
        counter = iter(range(10**9))
        for _ in range(50):  # warm up pools, prepared statements, page cache
            await request(next(counter))
        done = 0
        deadline = time.perf_counter() + seconds
        start = time.perf_counter()

        async def worker() -> None:
            nonlocal done
            while time.perf_counter() < deadline:
                await request(next(counter))
                done += 1

        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return done / (time.perf_counter() - start)
    finally:
        await store.close()


def _with_query(url: str, extra: str) -> str:
    if not extra:
        return url
    return url + ("&" if "?" in url else "?") + extra


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=2.0)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--backends", default=",".join(BACKENDS))
    args = parser.parse_args()
    out: dict[str, float | int | None] = {"concurrency": args.concurrency, "seconds": args.seconds}
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.backends.split(","):
            backend, extra = BACKENDS[name]
            for scenario_name, scenario in SCENARIOS.items():
                label = name if scenario_name == "paid" else f"{name}_{scenario_name}"
                try:
                    with isolated_url(backend, Path(tmp)) as url:
                        ops = asyncio.run(
                            measure(
                                _with_query(url, extra),
                                scenario,
                                concurrency=args.concurrency,
                                seconds=args.seconds,
                            )
                        )
                except BaseException as exc:  # pytest.skip outside pytest, server down: report, go on
                    if isinstance(exc, KeyboardInterrupt):
                        raise
                    print(f"{label:>24}: skipped ({type(exc).__name__}: {exc})")
                    out[f"{label}_ops_per_s"] = None
                    continue
                out[f"{label}_ops_per_s"] = round(ops, 1)
                print(f"{label:>24}: {ops:10.1f} requests/s")
    for key, rate in list(out.items()):
        if not key.endswith("_ops_per_s") or key.startswith("memory"):
            continue
        memory = out.get("memory_complete_ops_per_s" if "_complete_" in key else "memory_ops_per_s")
        if isinstance(rate, float) and isinstance(memory, float):
            out[key.replace("_ops_per_s", "_cost_us")] = round(1e6 / rate - 1e6 / memory, 1)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
