"""Interop with the official `x402` 2.25.0 package (x402 Foundation), run as a peer from .venv-peers.

- the official httpx client (``x402Client`` + ``ExactEvmScheme``) pays our gateway over v2;
- a v1-only client (``X-PAYMENT`` answering the v1 JSON body, through the official client's v1 path) pays
  our gateway;
- our client (``x402.client.PaymentAuth``) pays a server built from the official Starlette middleware and
  the official facilitator (``x402Facilitator`` + ``FacilitatorWeb3Signer``) on the devnet.

Everything is real: anvil, TestUSDC, signatures, ``transferWithAuthorization`` transactions. Payers and
payees are fresh keys, so balances are asserted exactly.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from eth_account import Account
from web3 import Web3
from web3.contract import Contract

from escrow import DevnetState
from tests.bench._official import run_official
from tests.conftest import Transact
from tests.peers._harness import PeerServer, peers_missing, run_peer
from tests.peers._ours import Funds, GatewayServer, describe
from x402 import LocalSigner, SettleResponse
from x402.client import Eip3009Wallet, PaymentAuth, SpendPolicy, receipt_of

pytestmark = [
    pytest.mark.peers,
    pytest.mark.chain,
    pytest.mark.skipif(peers_missing() is not None, reason=str(peers_missing())),
]

PRICE = 1000
GATEWAY_RELAYER = 7  # our gateway's relayer key in these tests
PEER_FACILITATOR = 8  # the official facilitator's key in these tests


@pytest.fixture
def funds(devnet: DevnetState, usdc: Contract, transact: Transact) -> Funds:
    return Funds(devnet, usdc, transact, default=100 * PRICE)


@pytest.fixture
def gateway(devnet: DevnetState) -> Iterator[GatewayServer]:
    with GatewayServer(devnet, devnet.accounts[GATEWAY_RELAYER].private_key, Account.create().address) as gw:
        yield gw


def official_client(devnet: DevnetState, url: str, key: str, *args: str) -> dict[str, Any]:
    result: dict[str, Any] = run_peer(
        "x402_client.py",
        "--url",
        url,
        "--asset",
        devnet.contracts["usdc"],
        "--chain-id",
        str(devnet.chain_id),
        *args,
        env={"PEER_PRIVATE_KEY": key},
    )
    return result


# ------------------------------------------------------------------ the official client pays our gateway


def test_official_client_pays_our_gateway_v2(
    devnet: DevnetState, funds: Funds, gateway: GatewayServer
) -> None:
    payer = funds.payer()
    before = funds.balance(payer.address)
    out = official_client(devnet, f"{gateway.url}/paid", payer.key.hex(), "--n", "3")

    assert [r.get("status") for r in out["results"]] == [200, 200, 200], out
    txs = []
    for result in out["results"]:
        receipt = result["payment_response"]
        assert receipt["success"] is True, result
        assert receipt["network"] == devnet.network
        assert Web3.to_checksum_address(receipt["payer"]) == payer.address
        assert result["body"]["server"] == "agentpay"
        txs.append(receipt["transaction"])
    assert len(set(txs)) == 3 and all(funds.tx_ok(tx) for tx in txs)
    # what went over the wire: PAYMENT-REQUIRED read, PAYMENT-SIGNATURE sent
    paid = [e for e in out["exchanges"] if "payment-signature" in e["sent"]]
    assert len(paid) == 3 and all("x-payment" not in e["sent"] for e in paid)
    assert paid[0]["sent"]["payment-signature"]["x402Version"] == 2
    assert funds.balance(payer.address) == before - 3 * PRICE
    assert funds.balance(gateway.pay_to) == 3 * PRICE


def test_official_client_posts_a_body_to_our_gateway(
    devnet: DevnetState, funds: Funds, gateway: GatewayServer
) -> None:
    payer = funds.payer()
    out = official_client(
        devnet, f"{gateway.url}/paid", payer.key.hex(), "--method", "POST", "--body", '{"q": "büro"}'
    )
    (result,) = out["results"]
    assert result["status"] == 200, out
    assert result["body"]["echo"] == '{"q": "büro"}'
    assert funds.balance(gateway.pay_to) == PRICE


def test_v1_only_client_pays_our_gateway(devnet: DevnetState, funds: Funds, gateway: GatewayServer) -> None:
    """A v1 client never sees PAYMENT-REQUIRED: it reads ``{"x402Version": 1, "accepts": [...]}`` from the
    402 body and answers with ``X-PAYMENT`` (a PaymentPayloadV1: scheme + network, no ``accepted``)."""
    payer = funds.payer()
    out = official_client(devnet, f"{gateway.url}/paid", payer.key.hex(), "--mode", "v1", "--n", "2")

    assert [r.get("status") for r in out["results"]] == [200, 200], out
    challenge = out["exchanges"][0]
    assert challenge["status"] == 402 and challenge["body"]["x402Version"] == 1
    (requirement,) = challenge["body"]["accepts"]
    assert requirement["maxAmountRequired"] == str(PRICE)
    paid = [e for e in out["exchanges"] if "x-payment" in e["sent"]]
    assert len(paid) == 2 and all("payment-signature" not in e["sent"] for e in paid)
    sent = paid[0]["sent"]["x-payment"]
    assert sent["x402Version"] == 1 and sent["scheme"] == "exact" and "accepted" not in sent
    for result in out["results"]:
        receipt = result["x_payment_response"] or result["payment_response"]
        assert receipt is not None and receipt["success"] is True, result
        assert funds.tx_ok(receipt["transaction"])
    assert funds.balance(gateway.pay_to) == 2 * PRICE


def test_our_gateway_answers_v1_with_x_payment_response(
    devnet: DevnetState, funds: Funds, gateway: GatewayServer
) -> None:
    """x402 v1 (specs/transports-v1/http.md): the settlement receipt of an X-PAYMENT is X-PAYMENT-RESPONSE."""
    payer = funds.payer()
    out = official_client(devnet, f"{gateway.url}/paid", payer.key.hex(), "--mode", "v1")
    (result,) = out["results"]
    assert result["status"] == 200, out
    assert result["x_payment_response"] is not None and result["x_payment_response"]["success"] is True


def test_official_client_unfunded_payer_is_refused_and_nothing_moves(
    devnet: DevnetState, funds: Funds, gateway: GatewayServer
) -> None:
    payer = funds.payer(amount=0)
    out = official_client(devnet, f"{gateway.url}/paid", payer.key.hex())
    (result,) = out["results"]
    # The official transport retries once and hands the second 402 back to the caller.
    assert result["status"] == 402, out
    assert [e["status"] for e in out["exchanges"]] == [402, 402]
    assert funds.balance(gateway.pay_to) == 0


# --------------------------------------------------------- our client pays the official middleware


class Official:
    """The official x402 middleware + facilitator, running as a peer; ``pay_to`` is a fresh address."""

    def __init__(self, server: PeerServer, pay_to: str) -> None:
        self.server, self.pay_to, self.url = server, pay_to, server.url

    def log(self) -> Any:
        return self.server.log()


@pytest.fixture
def official_server(devnet: DevnetState) -> Iterator[Official]:
    pay_to = Account.create().address
    with PeerServer(
        "x402_server.py",
        "--rpc-url",
        devnet.rpc_url,
        "--chain-id",
        str(devnet.chain_id),
        "--asset",
        devnet.contracts["usdc"],
        "--pay-to",
        pay_to,
        "--amount",
        str(PRICE),
        env={"PEER_FACILITATOR_KEY": devnet.accounts[PEER_FACILITATOR].private_key},
    ) as server:
        yield Official(server, pay_to)


def our_client(devnet: DevnetState, key: bytes, **auth: Any) -> httpx.Client:
    """Our payer, as an orchestrator would hold it: an EOA wallet for the devnet token and a spend policy."""
    usdc = devnet.contracts["usdc"]
    wallet = Eip3009Wallet(LocalSigner(key), devnet.chain_id, {usdc: (devnet.usdc_name, devnet.usdc_version)})
    return httpx.Client(auth=PaymentAuth(wallet, SpendPolicy(max_per_call=10 * PRICE), **auth), timeout=60)


def test_our_client_pays_official_middleware(
    devnet: DevnetState, funds: Funds, official_server: Official
) -> None:
    payer = funds.payer()
    pay_to = official_server.pay_to
    with our_client(devnet, payer.key) as client:
        responses = [client.get(f"{official_server.url}/paid") for _ in range(2)]

    log = official_server.log()
    for response in responses:
        assert response.status_code == 200, (describe(response), log)
        assert response.json()["peer"] == "x402-official"
        receipt = receipt_of(response)
        assert isinstance(receipt, SettleResponse) and receipt.success, describe(response)
        assert Web3.to_checksum_address(receipt.payer or "") == payer.address
        assert funds.tx_ok(receipt.transaction)
    assert [(e["op"], e["result"].get("isValid", e["result"].get("success"))) for e in log] == [
        ("verify", True),
        ("settle", True),
    ] * 2
    # the official server matched our echoed `accepted` against its own requirements
    assert log[0]["payload"]["accepted"] == log[0]["requirements"]
    assert funds.balance(pay_to) == 2 * PRICE


def test_official_middleware_refuses_our_unfunded_payer(
    devnet: DevnetState, funds: Funds, official_server: Official
) -> None:
    payer = funds.payer(amount=0)
    with our_client(devnet, payer.key) as client:
        response = client.get(f"{official_server.url}/paid")
    assert response.status_code == 402
    (entry,) = official_server.log()
    assert entry["op"] == "verify" and entry["result"]["isValid"] is False
    # TestUSDC reverts with OpenZeppelin's custom error ERC20InsufficientBalance, which the official
    # facilitator does not map; it can only name the cause through its Multicall3 diagnosis, and the
    # devnet has no Multicall3 at 0xcA11...CA11, so it reports a failed simulation.
    assert entry["result"]["invalidReason"] in {
        "invalid_exact_evm_insufficient_balance",
        "invalid_exact_evm_transaction_simulation_failed",
    }
    assert funds.balance(official_server.pay_to) == 0


# ------------------------------------------------------------------------------ the benchmark's peer half


def test_official_bench_runs_in_the_peer_venv() -> None:
    """tests/bench/_official.py drives the official middleware in-process in .venv-peers (stub
    facilitator); only its plumbing is checked here, never its speed."""
    result = run_official(4, 12, "stub", warmup=1, sign_rounds=5)
    assert result["statuses"] == {"200": 12}, result
    assert result["impl"] == "x402-official-2.25.0" and result["req_per_s"] > 0 and result["sign_ms"] > 0
