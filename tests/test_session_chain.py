"""MPP sessions on AgentChannels (real anvil): many calls over one channel settle in a handful of
transactions, the payee receives exactly the actual charges, streams are billed per token."""

from __future__ import annotations

import pytest

from escrow import DevnetState
from tests._sessions import TOKEN, UNIT, session

pytestmark = pytest.mark.anyio


async def test_thousand_calls_settle_in_a_handful_of_transactions(devnet: DevnetState) -> None:
    async with session(devnet, settle_every=40_000) as s:
        before = await s.balance(s.payee)
        expected = 0
        for i in range(1000):
            units = i % 7  # 0..6 units; 0 is a valid charge
            r = await s.client.request("GET", f"/meter?units={units}" + ("&via=header" if i % 2 else ""))
            assert r.status_code == 200, r.text
            assert "settlement-overrides" not in r.headers
            expected += units * UNIT
        await s.settler.drain()
        receipt = await s.client.close("/meter")
        assert receipt is not None and receipt.tx_hash and receipt.spent == str(expected)
        assert await s.balance(s.payee) - before == expected
        # one open, a few settles, one close
        assert 1 <= len(s.settler.transactions) <= 8, s.settler.transactions
        assert s.client.receipts[-1].reference == s.client.receipts[-1].channel_id


async def test_stream_charges_exactly_n_tokens(devnet: DevnetState) -> None:
    async with session(devnet, served=True) as s:
        before = await s.balance(s.payee)
        events = [e async for e in s.client.stream("/stream?tokens=450")]
        messages = [d for e, d in events if e == "message"]
        assert messages == [f"t{i}" for i in range(450)]
        assert events[-1][0] == "payment-receipt"
        receipt = await s.client.close("/stream")
        assert receipt is not None and receipt.spent == str(450 * TOKEN)
        assert await s.balance(s.payee) - before == 450 * TOKEN
