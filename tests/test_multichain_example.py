"""`examples.multichain`: one orchestrator, one wallet set, sub-agents on Base, on Arbitrum and on both (a
two-chain devnet that looks like the real networks); every payee paid exactly, on the right chain."""

from __future__ import annotations

import pytest

from escrow import Devnets
from examples.multichain import ATOMIC, run

pytestmark = [pytest.mark.chain, pytest.mark.anyio]


async def test_orchestrator_pays_agents_on_each_chain_within_its_caps() -> None:
    with Devnets(["base", "arbitrum"], backend="anvil", usdc_each=1_000) as devnet:
        summary = await run(devnet, calls=2)
    base, arb = "eip155:8453", "eip155:42161"
    where = [(p["agent"], p.get("network", "refused")) for p in summary["payments"]]
    assert where == [
        ("arbitrum-only", arb),
        ("arbitrum-only", arb),
        ("base-only", base),
        ("base-only", base),
        ("both", arb),  # its preferred network...
        ("both", base),  # ...until the Arbitrum cap is reached
        ("both", "refused"),  # past the total: refused before signing
    ]
    assert "total budget" in summary["payments"][-1]["refused"]
    assert summary["spent_by_network"] == {arb: 3 * ATOMIC, base: 3 * ATOMIC}
    assert summary["exact"] is True
