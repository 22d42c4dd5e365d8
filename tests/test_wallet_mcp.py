"""`agentpay mcp --wallet FILE` driven by the `mcp` package's own client over stdio, on anvil: `fetch_paid`
pays `examples.subagent`'s `/hello` (200 + receipt, the payee richer by exactly the price), `list_offers`
and `spend_status` report, and a call over a cap is refused with its reason before anything is signed."""

from __future__ import annotations

import json
import os
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from mcp import Client, StdioServerParameters
from mcp_types import CallToolResult, TextContent

from escrow import Chain as EscrowChain
from escrow import DevnetState
from examples.subagent import build_app
from gateway import MemoryStore
from tests._gateways import PRICE, Chain, key_hex
from tests._serving import serving
from x402 import LocalSigner

pytestmark = [pytest.mark.chain, pytest.mark.anyio]

ROOT = Path(__file__).resolve().parents[1]
CAP = 1500  # the grant's per-call cap: /hello ($0.001) fits, /weather ($0.002) does not
BUDGET = 10_000
DEPOSIT = 100_000


def data(result: CallToolResult) -> Any:
    assert not result.is_error, result.content
    if result.structured_content is not None:
        return result.structured_content.get("result", result.structured_content)
    text = result.content[0]
    assert isinstance(text, TextContent)
    return json.loads(text.text)


def error_text(result: CallToolResult) -> str:
    assert result.is_error
    text = result.content[0]
    assert isinstance(text, TextContent)
    return text.text


@dataclass
class Env:
    chain: Chain
    base: str
    payee: str
    hot: LocalSigner
    owner: str
    session: Client


@pytest.fixture
async def env(devnet: DevnetState, tmp_path: Path) -> AsyncIterator[Env]:
    chain = Chain(devnet)
    payee, relayer, hot, owner = [await chain.key() for _ in range(4)]
    await chain.mint(hot.address, 1_000_000)
    await chain.mint(owner.address, 1_000_000)
    wallet = tmp_path / "orchestrator.session.json"
    async with EscrowChain.from_devnet(devnet, relayer=key_hex(relayer)) as owner_side:
        # The owner grants a fresh session key offline and deposits $0.1 into the escrow; the relayer sends
        # both. The file also carries a small hot key for sub-agents that take `exact` only.
        session_file = await owner_side.open_session(
            owner, max_per_call=CAP, budget=BUDGET, deposit=DEPOSIT, fallback_key=key_hex(hot)
        )
        session_file.dump(wallet)
    network = EscrowChain.from_devnet(devnet, relayer=key_hex(relayer))
    app = build_app(network, pay_to=payee.address, schemes=["exact", "escrow"], store=MemoryStore())
    params = StdioServerParameters(
        command=sys.executable,
        args=["-m", "gateway", "mcp", "--wallet", str(wallet)],
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        cwd=str(ROOT),
    )
    try:
        async with serving(lambda _: app) as base, Client(params) as session:
            yield Env(chain, base, payee.address, hot, owner.address, session)
    finally:
        await chain.aclose()


async def test_fetch_paid_pays_hello_and_reports_the_receipt(env: Env) -> None:
    tools = {t.name for t in (await env.session.list_tools()).tools}
    assert tools == {"fetch_paid", "list_offers", "spend_status"}
    before = await env.chain.balance(env.payee)
    out = data(await env.session.call_tool("fetch_paid", {"url": env.base + "/hello"}))
    assert out["status"] == 200 and json.loads(out["body"])["paid"] is True
    assert out["receipt"]["success"] is True and out["receipt"]["transaction"].startswith("0x")
    # The session key pays through the escrow (the owner's deposit) whenever the sub-agent takes it.
    assert out["paid"]["amount"] == str(PRICE) and out["paid"]["scheme"] == "escrow"
    assert await env.chain.balance(env.payee) - before == PRICE

    status = data(await env.session.call_tool("spend_status", {}))
    assert status["spent"] == PRICE and status["left"] == BUDGET - PRICE
    assert status["perPayee"] == {env.payee.lower(): PRICE}
    grant = status["grant"]
    assert grant["payer"] == env.owner and grant["windowOpen"] is True and grant["maxPerCall"] == CAP
    assert grant["deposit"] == DEPOSIT - PRICE
    assert grant["onChain"]["live"] is True and grant["onChain"]["spent"] == PRICE
    assert grant["onChain"]["budget"] == BUDGET


async def test_list_offers_says_what_it_costs(env: Env) -> None:
    out = data(await env.session.call_tool("list_offers", {"url": env.base + "/weather"}))
    assert out["status"] == 402
    exact = [o for o in out["offers"] if o["protocol"] == "x402v2"]
    assert exact and exact[0]["amount"] == "2000" and exact[0]["price"] == "$0.002"
    assert exact[0]["payable"] is True and "max_per_call" in exact[0]["refusal"]
    free = data(await env.session.call_tool("list_offers", {"url": env.base + "/health"}))
    assert free == {"status": 200, "paid": False, "offers": []}


async def test_over_the_caps_is_refused_before_signing(env: Env) -> None:
    before = await env.chain.balance(env.hot.address)
    over_grant = await env.session.call_tool("fetch_paid", {"url": env.base + "/weather?city=Oslo"})
    assert "refused before signing" in error_text(over_grant) and "max_per_call 1500" in error_text(
        over_grant
    )
    over_price = await env.session.call_tool(
        "fetch_paid", {"url": env.base + "/hello", "max_price": "$0.0005"}
    )
    assert "refused before signing" in error_text(over_price) and "max_price 500" in error_text(over_price)
    status = data(await env.session.call_tool("spend_status", {}))
    assert status["spent"] == status["reserved"] == 0
    assert await env.chain.balance(env.hot.address) == before


async def test_bad_wallet_file_is_one_error_line(tmp_path: Path) -> None:
    import subprocess

    bad = tmp_path / "wallet.json"
    bad.write_text('{"network": 1}')
    for path in (bad, tmp_path / "missing.json"):
        done = subprocess.run(
            [sys.executable, "-m", "gateway", "mcp", "--wallet", str(path)],
            cwd=ROOT,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert done.returncode == 1 and done.stderr.startswith("agentpay: error: "), done.stderr
        assert "Traceback" not in done.stderr
