"""A route priced on two chains at once (issue 14): two anvils with distinct chain ids, one gateway
(`PaymentMiddleware(chain=[a, b])`), our client choosing and falling back between networks, per-network
spending caps, cross-chain replay refused, and the official x402 client paying on the network it chooses.

Everything is real: two anvil nodes, TestUSDC on each, `transferWithAuthorization` transactions, the
SQLite store. Payers and payees are fresh keys, so balances are asserted exactly on each chain.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import msgspec
import pytest
from eth_account import Account

from escrow import Chain, Devnets
from gateway import PaidRoute, SettlementOptions
from tests._two_chains import MultiGateway, Node, fresh_payer, store_url
from tests.peers._harness import peers_missing, run_peer
from x402 import LocalSigner, MppReceipt, SettleResponse, SpendPolicyViolation
from x402.client import (
    PaymentAuth,
    SpendPolicy,
    WalletSet,
    offers_from_response,
    payment_headers,
    receipt_of,
)
from x402.client_escrow import SessionKeyWallet

pytestmark = [pytest.mark.chain]

PRICE = 1000
CHAIN_A, CHAIN_B = 8453, 42161
A, B = f"eip155:{CHAIN_A}", f"eip155:{CHAIN_B}"
OWNER_RELAYER = 4  # sends owners' grants and deposits (the gateway's relayer is another account)


@pytest.fixture(scope="module")
def nodes() -> Iterator[list[Node]]:
    with Devnets([CHAIN_A, CHAIN_B], backend="anvil", usdc_each=1_000) as devnet:
        two = [Node(devnet, CHAIN_A), Node(devnet, CHAIN_B)]
        try:
            yield two
        finally:
            for node in two:
                node.close()


@pytest.fixture
def pay_to() -> str:
    return str(Account.create().address)


@pytest.fixture
def gateway(nodes: list[Node], pay_to: str, tmp_path: Path) -> Iterator[MultiGateway]:
    with MultiGateway(nodes, pay_to, store=store_url(tmp_path)) as gw:
        yield gw


def _b64json(value: str) -> Any:
    return json.loads(base64.b64decode(value + "=" * (-len(value) % 4)))


def _funded(nodes: list[Node], amounts: tuple[int, int]) -> LocalSigner:
    payer = fresh_payer()
    for node, amount in zip(nodes, amounts, strict=True):
        if amount:
            node.mint(payer.address, amount)
    return payer


def _auth(nodes: list[Node], payer: LocalSigner, **kw: Any) -> PaymentAuth:
    return PaymentAuth(WalletSet([node.wallet(payer) for node in nodes]), **kw)


def _reason(response: httpx.Response) -> str:
    body = response.json()
    return str(body.get("invalidReason") or body.get("error") or "")


def test_contracts_share_addresses_so_only_the_chain_id_tells_them_apart(nodes: list[Node]) -> None:
    a, b = nodes
    assert a.state.chain_id != b.state.chain_id
    assert a.usdc == b.usdc  # the same token address on both: a signature's domain is all that differs


def test_a_two_network_route_offers_every_scheme_on_both_networks(
    nodes: list[Node], gateway: MultiGateway
) -> None:
    response = httpx.get(f"{gateway.url}/paid")
    assert response.status_code == 402
    required = _b64json(response.headers["payment-required"])
    accepts = [(a["network"], a["scheme"]) for a in required["accepts"]]
    assert accepts == [(A, "exact"), (A, "escrow"), (B, "exact"), (B, "escrow")]
    for entry in required["accepts"]:
        assert entry["asset"].lower() == nodes[0].usdc.lower() and int(entry["amount"]) == PRICE
        assert entry["payTo"] == gateway.pay_to
    # v1 body: the same four, under v1 network names
    assert len(response.json()["accepts"]) == 4
    # MPP: challenges for both chains (one per network and credential type), each its own HMAC id
    mpp = [o for o in offers_from_response(response) if o.protocol == "mpp"]
    assert [o.network for o in mpp] == [A, A, B, B]
    assert len({o.challenge.id for o in mpp if o.challenge is not None}) == 4


def test_client_pays_its_preferred_network(nodes: list[Node], gateway: MultiGateway) -> None:
    a, b = nodes
    payer = _funded(nodes, (10 * PRICE, 10 * PRICE))
    for order, chosen in (([B, A], b), ([A, B], a)):
        with httpx.Client(auth=_auth(nodes, payer, networks=order, remember=False)) as client:
            response = client.get(f"{gateway.url}/paid")
        assert response.status_code == 200, response.text
        receipt = receipt_of(response)
        assert isinstance(receipt, SettleResponse) and receipt.network == chosen.network
        assert chosen.receipt_ok(receipt.transaction)
    assert a.balance(gateway.pay_to) == PRICE and b.balance(gateway.pay_to) == PRICE
    assert a.balance(payer.address) == 9 * PRICE and b.balance(payer.address) == 9 * PRICE


def test_client_falls_back_to_the_other_network_when_it_has_no_funds_there(
    nodes: list[Node], gateway: MultiGateway
) -> None:
    a, b = nodes
    payer = _funded(nodes, (0, 5 * PRICE))  # nothing on A, its preferred network
    policy = SpendPolicy()
    sent: list[str] = []

    def record(request: httpx.Request) -> None:
        if "payment-signature" in request.headers:
            sent.append(_b64json(request.headers["payment-signature"])["accepted"]["network"])

    auth = _auth(nodes, payer, networks=[A, B], policy=policy)
    with httpx.Client(auth=auth, event_hooks={"request": [record]}) as client:
        response = client.get(f"{gateway.url}/paid")
    assert response.status_code == 200, response.text
    receipt = receipt_of(response)
    assert isinstance(receipt, SettleResponse) and receipt.network == B
    assert sent == [A, B]  # tried A, was refused for lack of funds, paid B
    assert b.balance(gateway.pay_to) == PRICE and a.balance(gateway.pay_to) == 0
    assert b.balance(payer.address) == 4 * PRICE
    # the policy counts only what was paid, on the network it was paid on
    assert policy.spent == PRICE and policy.spent_by_network() == {B: PRICE} and policy.reserved == 0


def test_payment_signed_for_one_chain_is_refused_on_the_other(
    nodes: list[Node], gateway: MultiGateway
) -> None:
    a, b = nodes
    payer = _funded(nodes, (5 * PRICE, 5 * PRICE))
    offers = offers_from_response(httpx.get(f"{gateway.url}/paid"))
    offer_a, offer_b = (o for o in offers if o.protocol == "x402v2" and o.scheme == "exact")
    assert (offer_a.network, offer_b.network) == (A, B)
    # signed for chain A by our own wallet, then presented claiming chain B
    honest_headers = payment_headers(offer_a, a.wallet(payer).pay(offer_a))
    signed_for_a = _b64json(honest_headers["PAYMENT-SIGNATURE"])
    assert signed_for_a["accepted"]["network"] == A
    with httpx.Client() as plain:
        assert offer_b.requirements is not None
        forged = {**signed_for_a, "accepted": msgspec.to_builtins(offer_b.requirements)}
        header = base64.b64encode(json.dumps(forged).encode()).decode()
        refused = plain.get(f"{gateway.url}/paid", headers={"payment-signature": header})
        assert refused.status_code == 402
        assert _reason(refused) == "invalid_exact_evm_payload_signature"
        # v1: the same signature under B's network name
        v1 = {"x402Version": 1, "scheme": "exact", "network": B, "payload": signed_for_a["payload"]}
        refused_v1 = plain.get(
            f"{gateway.url}/paid", headers={"x-payment": base64.b64encode(json.dumps(v1).encode()).decode()}
        )
        assert refused_v1.status_code == 402
        assert a.balance(gateway.pay_to) == 0 and b.balance(gateway.pay_to) == 0
        assert a.balance(payer.address) == b.balance(payer.address) == 5 * PRICE
        # state intact: no claim, reservation or record was left by the refusals; on A it pays once
        honest = plain.get(f"{gateway.url}/paid", headers=honest_headers)
        assert honest.status_code == 200, honest.text
        replay = plain.get(f"{gateway.url}/paid", headers=honest_headers)
        assert replay.status_code == 402 and _reason(replay) == "invalid_exact_evm_nonce_already_used"
    assert a.balance(gateway.pay_to) == PRICE and b.balance(gateway.pay_to) == 0
    assert a.balance(payer.address) == 4 * PRICE and b.balance(payer.address) == 5 * PRICE


def test_per_network_caps_refuse_at_the_client_before_signing(
    nodes: list[Node], gateway: MultiGateway
) -> None:
    a, b = nodes
    payer = _funded(nodes, (10 * PRICE, 10 * PRICE))
    policy = SpendPolicy(per_network_budget={A: PRICE, B: 2 * PRICE}, total_budget=10 * PRICE)
    signed: list[str] = []

    def record(request: httpx.Request) -> None:
        for name in ("payment-signature", "x-payment"):
            if name in request.headers:
                signed.append(_b64json(request.headers[name])["accepted"]["network"])

    auth = _auth(nodes, payer, networks=[A, B], policy=policy)  # remembers the offer paid: A, then B
    with httpx.Client(auth=auth, event_hooks={"request": [record]}) as client:
        networks = []
        for _ in range(3):
            response = client.get(f"{gateway.url}/paid")
            assert response.status_code == 200, response.text
            receipt = receipt_of(response)
            assert isinstance(receipt, SettleResponse)
            networks.append(receipt.network)
        assert networks == [A, B, B]  # A's cap is used after one call, B takes the rest of its own
        with pytest.raises(SpendPolicyViolation, match="budget"):
            client.get(f"{gateway.url}/paid")
    assert signed == [A, B, B]  # the refused call signed nothing
    assert policy.spent_by_network() == {A: PRICE, B: 2 * PRICE} and policy.reserved == 0
    assert a.balance(gateway.pay_to) == PRICE and b.balance(gateway.pay_to) == 2 * PRICE


def test_deferred_payments_settle_exactly_per_chain_and_reservations_stay_per_chain(
    nodes: list[Node], pay_to: str, tmp_path: Path
) -> None:
    a, b = nodes
    payer = _funded(nodes, (2 * PRICE, 2 * PRICE))
    # Settlers wait long to fill a batch, so accepted payments stay reserved until the gateway stops.
    options = SettlementOptions(max_age=60.0, batch_size=64)
    route = PaidRoute(price=PRICE, max_timeout_seconds=600)  # far from expiry: nothing is settled early
    gw = MultiGateway(
        nodes,
        pay_to,
        store=store_url(tmp_path),
        settle="deferred",
        settlement=options,
        routes={"GET /paid": route},
    )
    with gw:
        auth = _auth(nodes, payer, networks=[A, B])
        with httpx.Client(auth=auth) as client:
            paid = []
            for _ in range(4):
                response = client.get(f"{gw.url}/paid")
                assert response.status_code == 200, response.text
                receipt = receipt_of(response)
                assert isinstance(receipt, SettleResponse)
                paid.append(receipt.network)
            # A's balance is committed by two unsettled payments: the third falls back to B, where the
            # payer's reservation on A does not count
            assert paid == [A, A, B, B]
            over = client.get(f"{gw.url}/paid")
            assert over.status_code == 402  # both chains' balances are committed now
        assert a.balance(pay_to) == 0 and b.balance(pay_to) == 0  # nothing settled yet
        settlers = gw.settlers
    # stopping flushes each chain's queue through that chain's own settler
    assert {net: s["exact"].paid for net, s in settlers.items()} == {A: 2, B: 2}
    assert settlers[A]["exact"].kind == "exact" and settlers[B]["exact"].kind == f"exact@{CHAIN_B}"
    assert a.balance(pay_to) == 2 * PRICE and b.balance(pay_to) == 2 * PRICE
    assert a.balance(payer.address) == 0 and b.balance(payer.address) == 0


@pytest.mark.peers
@pytest.mark.skipif(peers_missing() is not None, reason=str(peers_missing()))
@pytest.mark.parametrize(
    ("how", "args", "chosen"),
    [
        ("registered on B only", ["--chain-id", str(CHAIN_B)], B),
        (
            "on both, its prefer_network policy says B",
            ["--chain-id", str(CHAIN_A), "--also-chain-id", str(CHAIN_B), "--prefer-network", B],
            B,
        ),
        ("on both, its default selector", ["--chain-id", str(CHAIN_B), "--also-chain-id", str(CHAIN_A)], A),
    ],
)
def test_official_x402_client_pays_a_two_network_route_on_the_network_it_chooses(
    nodes: list[Node], gateway: MultiGateway, how: str, args: list[str], chosen: str
) -> None:
    payer = Account.create()
    for node in nodes:
        node.mint(payer.address, 10 * PRICE)
    url = f"{gateway.url}/paid"
    out = run_peer(
        "x402_client.py",
        "--url",
        url,
        "--asset",
        nodes[0].usdc,
        "--n",
        "2",
        *args,
        env={"PEER_PRIVATE_KEY": payer.key.hex()},
    )
    assert [r.get("status") for r in out["results"]] == [200, 200], out
    paid = [e for e in out["exchanges"] if "payment-signature" in e["sent"]]
    assert [e["sent"]["payment-signature"]["accepted"]["network"] for e in paid] == [chosen, chosen]
    node, other = nodes if chosen == A else nodes[::-1]
    for result in out["results"]:
        receipt = result["payment_response"]
        assert receipt["success"] is True and receipt["network"] == chosen, result
        assert node.receipt_ok(receipt["transaction"])
    # settled there exactly, and nothing moved on the other chain
    assert node.balance(gateway.pay_to) == 2 * PRICE and other.balance(gateway.pay_to) == 0
    assert node.balance(payer.address) == 8 * PRICE and other.balance(payer.address) == 10 * PRICE


def test_mpp_client_pays_the_challenge_of_its_network(nodes: list[Node], gateway: MultiGateway) -> None:
    a, b = nodes
    payer = _funded(nodes, (5 * PRICE, 5 * PRICE))
    auth = _auth(nodes, payer, networks=[B], prefer=("mpp",))
    with httpx.Client(auth=auth) as client:
        response = client.get(f"{gateway.url}/paid")
    assert response.status_code == 200, response.text
    receipt = receipt_of(response)
    assert isinstance(receipt, MppReceipt) and b.receipt_ok(receipt.reference)
    assert b.balance(gateway.pay_to) == PRICE and a.balance(gateway.pay_to) == 0
    assert b.balance(payer.address) == 4 * PRICE and a.balance(payer.address) == 5 * PRICE


async def _session(node: Node, owner: LocalSigner, deposit: int) -> SessionKeyWallet:
    """A session key granted by `owner` on `node`'s chain, paid from a deposit of `deposit`."""
    async with Chain.from_devnet(node.state, relayer=OWNER_RELAYER) as chain:
        file = await chain.open_session(owner, max_per_call=PRICE, budget=100 * PRICE, deposit=deposit)
    return SessionKeyWallet.from_file(file)


@pytest.mark.anyio
async def test_escrow_payments_use_each_chains_escrow_and_deposit(
    nodes: list[Node], pay_to: str, tmp_path: Path
) -> None:
    a, b = nodes
    owner = _funded(nodes, (2 * PRICE, 2 * PRICE))
    wallets = [await _session(node, owner, 2 * PRICE) for node in nodes]
    escrow_a = a.balance(a.state.contracts["escrow"])
    escrow_b = b.balance(b.state.contracts["escrow"])
    options = SettlementOptions(max_age=60.0, batch_size=64)  # held until stop: the deposits stay committed
    gw = MultiGateway(
        nodes, pay_to, store=store_url(tmp_path), settle="deferred", settlement=options, schemes=["escrow"]
    )
    with gw:
        auth = PaymentAuth(WalletSet(wallets, networks=[A, B]))
        async with httpx.AsyncClient(auth=auth) as client:
            paid = []
            for _ in range(4):
                response = await client.get(f"{gw.url}/paid")
                assert response.status_code == 200, response.text
                receipt = receipt_of(response)
                assert isinstance(receipt, SettleResponse)
                paid.append(receipt.network)
            # the deposit on A is committed by two unsettled payments; B's deposit is not touched by them
            assert paid == [A, A, B, B]
            assert (await client.get(f"{gw.url}/paid")).status_code == 402
        settlers = gw.settlers
    assert {net: s["escrow"].paid for net, s in settlers.items()} == {A: 2, B: 2}
    assert settlers[B]["escrow"].kind == f"escrow@{CHAIN_B}"
    assert a.balance(pay_to) == 2 * PRICE and b.balance(pay_to) == 2 * PRICE
    assert a.balance(a.state.contracts["escrow"]) == escrow_a - 2 * PRICE
    assert b.balance(b.state.contracts["escrow"]) == escrow_b - 2 * PRICE


@pytest.mark.peers
@pytest.mark.skipif(peers_missing() is not None, reason=str(peers_missing()))
def test_look_alike_base_and_arbitrum_each_paid_in_its_own_usdc(tmp_path: Path) -> None:
    """`Devnets(["base", "arbitrum"])`: each chain's token at that network's canonical USDC address, so the
    two offers name different tokens. The official client prefers Arbitrum and pays there; ours prefers
    Base and pays there; each is settled in that chain's USDC exactly."""
    with Devnets(["base", "arbitrum"], backend="anvil", usdc_each=1_000) as devnet:
        base, arb = Node(devnet, 8453), Node(devnet, 42161)
        try:
            assert base.usdc != arb.usdc
            payee = str(Account.create().address)
            with MultiGateway([base, arb], payee, store=store_url(tmp_path), schemes=["exact"]) as gw:
                offers = _b64json(httpx.get(f"{gw.url}/paid").headers["payment-required"])["accepts"]
                assert [(o["network"], o["asset"]) for o in offers] == [(A, base.usdc), (B, arb.usdc)]
                payer = Account.create()
                for node in (base, arb):
                    node.mint(payer.address, 10 * PRICE)
                args = ["--chain-id", "8453", "--also-chain-id", f"42161:{arb.usdc}", "--prefer-network", B]
                out = run_peer(
                    "x402_client.py",
                    *("--url", f"{gw.url}/paid", "--asset", base.usdc, *args),
                    env={"PEER_PRIVATE_KEY": payer.key.hex()},
                )
                (result,) = out["results"]
                assert result.get("status") == 200, out
                assert result["payment_response"]["network"] == B
                ours = PaymentAuth(
                    WalletSet([base.wallet(LocalSigner(payer.key)), arb.wallet(LocalSigner(payer.key))])
                )
                with httpx.Client(auth=ours) as client:
                    response = client.get(f"{gw.url}/paid")
                assert response.status_code == 200, response.text
                receipt = receipt_of(response)
                assert isinstance(receipt, SettleResponse) and receipt.network == A
            assert arb.balance(payee) == PRICE and base.balance(payee) == PRICE
            assert arb.balance(payer.address) == 9 * PRICE and base.balance(payer.address) == 9 * PRICE
        finally:
            base.close()
            arb.close()


def test_discovery_lists_both_networks(nodes: list[Node], tmp_path: Path) -> None:
    gw = MultiGateway(nodes, str(Account.create().address), store=store_url(tmp_path), schemes=["exact"])
    gw.discovery = True
    with gw:
        resources = httpx.get(f"{gw.url}/discovery/resources").json()
    (item,) = resources["items"]
    assert [a["network"] for a in item["accepts"]] == [A, B]
