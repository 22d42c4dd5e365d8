"""`list_settlements`, the read-only query behind the dashboard and the queue-age gauge, on every backend."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from gateway import PaymentStore, Settlement
from tests.test_store import BACKENDS, isolated_url, run


@pytest.fixture(params=BACKENDS)
def url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    with isolated_url(request.param, tmp_path) as value:
        yield value


def _item(key: str, created_at: float, *, payer: str = "0xAbC", kind: str = "exact") -> Settlement:
    return Settlement(key=key, kind=kind, payload=b"p", payer=payer, amount=2**130 + 1, created_at=created_at)


def test_list_settlements_filters_orders_and_pages(url: str) -> None:
    async def body(store: PaymentStore) -> None:
        await store.enqueue(_item("a", 100.0))
        await store.enqueue(_item("b", 200.0, payer="0xdef"))
        await store.enqueue(_item("c", 300.0, kind="exact:now"))
        await store.enqueue(_item("d", 400.0))
        await store.mark_settled(["b"], tx_hash="0x" + "ab" * 32)
        await store.mark_failed("c", error="boom", retry_at=None)

        async def keys(**filters: object) -> list[str]:
            return [s.key for s in await store.list_settlements(**filters)]  # type: ignore[arg-type]

        assert await keys() == ["d", "c", "b", "a"]  # newest first
        assert await keys(oldest_first=True) == ["a", "b", "c", "d"]
        assert await keys(states=["queued"]) == ["d", "a"]
        assert await keys(states=["settled", "dead"]) == ["c", "b"]
        assert await keys(states=[]) == []
        assert await keys(kind="exact:now") == ["c"]
        assert await keys(payer="0xabc") == ["d", "c", "a"]  # any case
        assert await keys(since=250.0) == ["d", "c"]
        assert await keys(limit=2) == ["d", "c"]
        assert await keys(limit=2, offset=2) == ["b", "a"]
        assert await keys(limit=0) == []
        assert await keys(states=["queued"], payer="0xABC", since=50.0, limit=1) == ["d"]
        (settled,) = await store.list_settlements(states=["settled"])
        assert (settled.tx_hash, settled.amount, settled.payer) == ("0x" + "ab" * 32, 2**130 + 1, "0xdef")
        (dead,) = await store.list_settlements(states=["dead"])
        assert dead.error == "boom"

    run(url, body)
