"""Interop: the official `x402` 2.25 client (its `UptoEvmScheme`, run from .venv-peers) pays our gateway's
x402 `upto` route on anvil, through our Permit2 and upto proxy at their canonical addresses.

On a fixed-price route the charge is the signed maximum. On `examples.subagent`'s usage-priced
`/metered?units=N` (at most $0.01, offered as `upto` and metered `escrow` beside an MPP session challenge in
one 402), the official client signs the maximum and is charged exactly N units, which it reads from the
`PAYMENT-RESPONSE` its SDK decodes (`SettleResponse.amount`).
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import pytest
from eth_account import Account
from web3 import Web3
from web3.contract import Contract

from escrow import Chain, DevnetState
from escrow.chain._rpc import Rpc, TxSender
from escrow.payments._escrow import Erc20
from examples.subagent import build_app, with_sessions
from tests._serving import serving
from tests.conftest import Transact
from tests.peers._harness import peers_missing, run_peer
from tests.peers._ours import Funds, GatewayServer
from x402._upto import PERMIT2_ADDRESS, UPTO_PROXY_ADDRESS

pytestmark = [
    pytest.mark.peers,
    pytest.mark.chain,
    pytest.mark.skipif(peers_missing() is not None, reason=str(peers_missing())),
]

MAXIMUM = 10_000  # also /metered's maximum, $0.01
UNIT = 100  # /metered's $0.0001 per unit
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


@pytest.mark.anyio
async def test_official_upto_client_is_charged_the_units_used_on_the_example_metered_route(
    devnet: DevnetState, funds: Funds
) -> None:
    payer, payee, relayer = funds.payer(), Account.create(), Account.create()
    payer_key = "0x" + payer.key.hex().removeprefix("0x")
    await asyncio.to_thread(_approve_permit2, devnet, payer_key)
    rpc = Rpc(devnet.rpc_url)
    for who in (payee, relayer):  # the relayer settles (it is the facilitator); the payee settles channels
        await rpc.request("anvil_setBalance", [who.address, hex(10**18)])
    await rpc.aclose()
    chain = Chain.from_devnet(devnet, relayer=relayer.key.hex())
    app = with_sessions(
        build_app(chain, pay_to=payee.address, schemes=["exact", "upto"], store="memory://"),
        chain,
        channels=devnet.contracts["channels"],
        payee_key=payee.key.hex(),
        secret="s" * 64,
    )
    before = funds.balance(payer.address)
    async with serving(lambda _url: app) as url:
        out = await asyncio.to_thread(
            run_peer,
            "x402_client.py",
            "--url",
            f"{url}/metered?units=3",
            "--asset",
            devnet.contracts["usdc"],
            "--chain-id",
            str(devnet.chain_id),
            "--upto",
            env={"PEER_PRIVATE_KEY": payer_key},
        )
    await chain.aclose()
    [result] = out["results"]
    assert result.get("status") == 200 and result["body"]["units"] == 3, out
    challenge = next(e for e in out["exchanges"] if e["status"] == 402)
    assert 'intent="session"' in challenge["received"].get("www-authenticate", ""), challenge
    [paid] = [e["sent"]["payment-signature"] for e in out["exchanges"] if "payment-signature" in e["sent"]]
    assert paid["accepted"]["scheme"] == "upto"
    assert int(paid["payload"]["permit2Authorization"]["permitted"]["amount"]) == MAXIMUM  # signed
    receipt = result["payment_response"]  # decoded by the official SDK
    assert receipt["success"] is True and receipt["amount"] == str(3 * UNIT), receipt
    assert funds.tx_ok(receipt["transaction"])
    assert funds.balance(payee.address) == 3 * UNIT  # charged the units used, not the maximum
    assert before - funds.balance(payer.address) == 3 * UNIT
