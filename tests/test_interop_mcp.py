"""Interop on MCP, one client not written here per binding, each paying `examples.paid_tools`' `summarize`
on anvil through our paywall (the payee's balance rises by exactly the price):

- x402: the official x402 MCP client (`x402.mcp` 2.25.0 on `mcp` 1.30, from .venv-mcp-peers);
- MPP: mppx's MCP client (`mppx/mcp/client` 0.11.0 on `@modelcontextprotocol/sdk` 1.32.2, from
  tests/peers/node), which reads the challenges from the result's `_meta` and pays `evm/charge`.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
from pathlib import Path
from typing import Any

import pytest

from escrow import Chain as EscrowChain
from escrow import DevnetState
from examples.paid_tools import build_app
from gateway import MemoryStore
from tests._gateways import Chain, key_hex
from tests._serving import serving
from tests.peers._harness import last_json

pytestmark = [pytest.mark.chain, pytest.mark.peers, pytest.mark.anyio]

ROOT = Path(__file__).resolve().parents[1]
MCP_PEERS_PYTHON = ROOT / ".venv-mcp-peers" / "bin" / "python"
NODE_PEERS = ROOT / "tests" / "peers" / "node"
PRICE = 1000


def run_mcp_peer(script: str, *args: str, key: str) -> Any:
    """A one-shot peer under .venv-mcp-peers (`make setup` builds it), isolated from our tree (`-E`)."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    done = subprocess.run(
        [str(MCP_PEERS_PYTHON), "-E", str(ROOT / "tests" / "peers" / script), *args],
        cwd=ROOT / "tests" / "peers",
        env={**env, "PEER_PRIVATE_KEY": key},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-6000:]
    return last_json(done.stdout)


async def test_official_x402_mcp_client_pays_summarize(devnet: DevnetState) -> None:
    assert MCP_PEERS_PYTHON.exists(), f"{MCP_PEERS_PYTHON} is missing: run `make setup`"
    chain = Chain(devnet)
    try:
        payer, payee, relayer = await chain.key(), await chain.key(), await chain.key()
        await chain.mint(payer.address, 1_000_000)
        store = MemoryStore()
        network = EscrowChain.from_devnet(devnet, relayer=key_hex(relayer))
        app = build_app(network, pay_to=payee.address, store=store)
        before = await chain.balance(payee.address)
        async with serving(lambda _: app) as base:
            out = await asyncio.to_thread(
                run_mcp_peer,
                "x402_mcp_client.py",
                "--url", base + "/mcp",
                "--tool", "summarize",
                "--args", json.dumps({"text": "interop with the official x402 MCP client"}),
                "--network", f"eip155:{devnet.chain_id}",
                "--asset", devnet.contracts["usdc"],
                key=key_hex(payer),
            )  # fmt: skip
        assert out["payment_made"] is True and out["is_error"] is False, out
        assert out["text"].startswith("interop with")
        assert out["payment_response"]["success"] is True and out["payment_response"]["transaction"]
        assert await chain.balance(payee.address) - before == PRICE
        assert (await store.stats()).settled == 1
    finally:
        await chain.aclose()


def run_node_peer(script: str, *args: str, key: str) -> Any:
    done = subprocess.run(
        ["node", str(NODE_PEERS / script), *args],
        cwd=NODE_PEERS,
        env={**os.environ, "PEER_PRIVATE_KEY": key},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-6000:]
    return last_json(done.stdout)


async def test_mppx_mcp_client_pays_summarize_by_mpp(devnet: DevnetState) -> None:
    assert (NODE_PEERS / "node_modules" / "mppx").exists(), "tests/peers/node is not installed: `make setup`"
    chain = Chain(devnet)
    try:
        payer, payee, relayer = await chain.key(), await chain.key(), await chain.key()
        await chain.mint(payer.address, 1_000_000)
        store = MemoryStore()
        network = EscrowChain.from_devnet(devnet, relayer=key_hex(relayer))
        app = build_app(network, pay_to=payee.address, store=store)
        before = await chain.balance(payee.address)
        async with serving(lambda _: app) as base:
            out = await asyncio.to_thread(
                run_node_peer,
                "mppx_mcp_client.mjs",
                base + "/mcp",
                "summarize",
                json.dumps({"text": "interop with mppx's MCP client"}),
                str(devnet.chain_id),
                devnet.usdc_name,
                devnet.usdc_version,
                key=key_hex(payer),
            )
        assert out["isError"] is False and out["text"].startswith("interop with"), out
        receipt = out["receipt"]
        assert receipt["status"] == "success" and receipt["method"] == "evm" and receipt["challengeId"]
        assert receipt["reference"].startswith("0x")
        assert await chain.balance(payee.address) - before == PRICE
        assert (await store.stats()).settled == 1
    finally:
        await chain.aclose()
