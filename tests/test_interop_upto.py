"""Interop: the official `x402` 2.25 client (its `UptoEvmScheme`, run from .venv-peers) pays our gateway's
x402 `upto` route on anvil, through our Permit2 and upto proxy at their canonical addresses.

The route is fixed-price here (the charge is the signed maximum); usage pricing (`Settlement-Overrides`)
is the pipeline's part and settles through the same `UptoScheme.settle(verified, actual=...)`, whose exact
charges `tests/test_upto_chain.py` checks.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import pytest
from eth_account import Account
from web3 import Web3
from web3.contract import Contract

from escrow import DevnetState
from escrow.chain._rpc import Rpc, TxSender
from escrow.payments._escrow import Erc20
from tests.conftest import Transact
from tests.peers._harness import peers_missing, run_peer
from tests.peers._ours import Funds, GatewayServer
from x402._upto import PERMIT2_ADDRESS, UPTO_PROXY_ADDRESS

pytestmark = [
    pytest.mark.peers,
    pytest.mark.chain,
    pytest.mark.skipif(peers_missing() is not None, reason=str(peers_missing())),
]

MAXIMUM = 10_000
FACILITATOR = 9  # our gateway's settler key: the `facilitatorAddress` it advertises


@pytest.fixture
def funds(devnet: DevnetState, usdc: Contract, transact: Transact) -> Funds:
    return Funds(devnet, usdc, transact, default=100 * MAXIMUM)


@pytest.fixture
def gateway(devnet: DevnetState) -> Iterator[GatewayServer]:
    key = devnet.accounts[FACILITATOR].private_key
    with GatewayServer(devnet, key, Account.create().address, routes={"GET /paid": MAXIMUM}, upto=True) as gw:
        yield gw


def _approve_permit2(devnet: DevnetState, key: str) -> None:
    """The payer's one-time `approve(Permit2, max)` (it needs gas for that one transaction)."""

    async def go() -> None:
        rpc = Rpc(devnet.rpc_url)
        try:
            sender = TxSender(rpc, key, chain_id=devnet.chain_id)
            await rpc.request("anvil_setBalance", [sender.address, hex(10**18)])
            usdc = Erc20(rpc, devnet.contracts["usdc"])
            await sender.transact(
                usdc.address, usdc.approve_calldata(PERMIT2_ADDRESS, 2**256 - 1), gas=100_000
            )
        finally:
            await rpc.aclose()

    asyncio.run(go())


def test_official_upto_client_pays_our_upto_route(
    devnet: DevnetState, funds: Funds, gateway: GatewayServer
) -> None:
    payer = funds.payer()
    _approve_permit2(devnet, "0x" + payer.key.hex().removeprefix("0x"))
    before = funds.balance(payer.address)
    out = run_peer(
        "x402_client.py",
        "--url",
        f"{gateway.url}/paid",
        "--asset",
        devnet.contracts["usdc"],
        "--chain-id",
        str(devnet.chain_id),
        "--upto",
        "--n",
        "2",
        env={"PEER_PRIVATE_KEY": payer.key.hex()},
    )
    assert [r.get("status") for r in out["results"]] == [200, 200], out
    sent = [e["sent"]["payment-signature"] for e in out["exchanges"] if "payment-signature" in e["sent"]]
    assert len(sent) == 2
    auth = sent[0]["payload"]["permit2Authorization"]
    assert sent[0]["accepted"]["scheme"] == "upto"
    assert Web3.to_checksum_address(auth["spender"]) == UPTO_PROXY_ADDRESS
    assert Web3.to_checksum_address(auth["witness"]["facilitator"]) == devnet.accounts[FACILITATOR].address
    assert Web3.to_checksum_address(auth["witness"]["to"]) == gateway.pay_to
    for result in out["results"]:
        receipt = result["payment_response"]  # decoded by the official SDK
        assert receipt["success"] is True and funds.tx_ok(receipt["transaction"]), result
    assert funds.balance(gateway.pay_to) == 2 * MAXIMUM
    assert before - funds.balance(payer.address) == 2 * MAXIMUM
