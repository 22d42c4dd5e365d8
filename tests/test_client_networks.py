"""Paying on several networks, without a chain: `SpendPolicy(per_network_budget=)` (a property test: a
network's cap is never exceeded however reservations are committed, released or charged less),
`WalletSet` and `PaymentAuth(networks=)` choosing, and the gateway's configuration checks."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from starlette.applications import Starlette

from escrow import Chain
from gateway import Asset, ConfigurationError, PaidRoute, PaymentMiddleware, RouteTable
from x402 import LocalSigner, Network, SpendPolicyViolation
from x402.client import Eip3009Wallet, Offer, PaymentAuth, SpendPolicy, WalletSet

A, B, C = "eip155:8453", "eip155:42161", "eip155:10"
TOKEN = "0x" + "11" * 20
PAYEE = "0x" + "22" * 20


def _offer(network: str, amount: int = 100, protocol: str = "x402v2") -> Offer:
    return Offer(
        protocol=protocol,  # type: ignore[arg-type]
        scheme="exact",
        network=network,
        asset=TOKEN,
        amount=amount,
        pay_to=PAYEE,
        max_timeout_seconds=60,
        extra={"name": "USD Coin", "version": "2"},
    )


def _wallet(signer: LocalSigner, network: str) -> Eip3009Wallet:
    return Eip3009Wallet(signer, int(network.split(":")[1]), {TOKEN: ("USD Coin", "2")})


_STEP = st.tuples(
    st.sampled_from([A, B, C]),
    st.integers(min_value=0, max_value=400),
    st.sampled_from(["commit", "release", "charge-less", "hold"]),
)


@settings(max_examples=200, deadline=None)
@given(steps=st.lists(_STEP, max_size=40), cap_a=st.integers(0, 1000), cap_b=st.integers(0, 1000))
def test_a_network_cap_is_never_exceeded(steps: list[tuple[str, int, str]], cap_a: int, cap_b: int) -> None:
    policy = SpendPolicy(per_network_budget={A: cap_a, B: cap_b})
    held = []
    spent = {A: 0, B: 0, C: 0}
    for network, amount, outcome in steps:
        try:
            reservation = policy.reserve(_offer(network, amount))
        except SpendPolicyViolation:
            assert network != C  # C has no cap
            continue
        if outcome == "commit":
            reservation.commit()
            spent[network] += amount
        elif outcome == "charge-less":
            reservation.commit(amount // 2)
            spent[network] += amount // 2
        elif outcome == "release":
            reservation.release()
        else:
            held.append((network, amount))
        for net, cap in ((A, cap_a), (B, cap_b)):
            holding = sum(x for n, x in held if n == net)
            assert policy.spent_on(net) + holding <= cap
    assert {n: policy.spent_on(n) for n in spent} == spent
    assert policy.spent == sum(spent.values())
    assert policy.reserved == sum(x for _, x in held)


def test_one_cap_for_every_network_and_refusal_says_which() -> None:
    policy = SpendPolicy(per_network_budget=150)
    policy.reserve(_offer(A)).commit()
    assert policy.network_refusal(_offer(A)) is not None
    assert policy.network_refusal(_offer(B)) is None
    with pytest.raises(SpendPolicyViolation, match=A):
        policy.reserve(_offer(A))
    policy.reserve(_offer(B)).commit()
    assert policy.spent_by_network() == {A: 100, B: 100}


def test_wallet_set_pays_with_the_member_of_the_offers_network() -> None:
    signer = LocalSigner.random()
    wallets = WalletSet([_wallet(signer, A), _wallet(signer, B)])
    assert wallets.can_pay(_offer(A)) and wallets.can_pay(_offer(B)) and not wallets.can_pay(_offer(C))
    assert wallets.rank(_offer(A)) < wallets.rank(_offer(B))  # the members' order
    preferring_b = WalletSet(wallets.wallets, networks=[B, A])
    assert preferring_b.rank(_offer(B)) < preferring_b.rank(_offer(A))
    assert preferring_b.mpp_methods == ("evm/charge",)
    credential = wallets.pay(_offer(B))
    assert credential.payload["authorization"]["to"].lower() == PAYEE


def test_payment_auth_orders_and_limits_networks() -> None:
    signer = LocalSigner.random()
    wallets = WalletSet([_wallet(signer, A), _wallet(signer, B), _wallet(signer, C)])
    offers = [_offer(A), _offer(B), _offer(C)]
    assert PaymentAuth(wallets).choose(offers).network == A
    assert PaymentAuth(wallets, networks=[B, A]).choose(offers).network == B
    assert PaymentAuth(wallets, networks=[C]).choose(offers).network == C
    # the network order comes before the protocol preference
    mixed = [_offer(A, protocol="x402v1"), _offer(B)]
    assert PaymentAuth(wallets, networks=[A, B]).choose(mixed).network == A
    # a network whose budget is used up is skipped; when all are, the policy refuses
    policy = SpendPolicy(per_network_budget={B: 50})
    assert PaymentAuth(wallets, networks=[B, A], policy=policy).choose(offers).network == A
    with pytest.raises(SpendPolicyViolation):
        PaymentAuth(wallets, networks=[B], policy=policy).choose(offers)


def _network(chain_id: int, decimals: int = 6) -> Network:
    return Network(
        network=f"eip155:{chain_id}",
        chain_id=chain_id,
        token=TOKEN,
        token_name="USD Coin",
        token_version="2",
        token_decimals=decimals,
        rpc_url="http://127.0.0.1:9",
    )


def test_gateway_refuses_a_network_given_twice_and_mixed_decimals() -> None:
    key = "0x" + "33" * 32
    app = Starlette()
    with pytest.raises(ConfigurationError, match="twice"):
        PaymentMiddleware(
            app,
            routes={"/x": 1},
            chain=[Chain(_network(8453), relayer_key=key), Chain(_network(8453), relayer_key=key)],
            pay_to=PAYEE,
        )
    with pytest.raises(ConfigurationError, match="decimals"):
        PaymentMiddleware(
            app,
            routes={"/x": 1},
            chain=[Chain(_network(8453), relayer_key=key), Chain(_network(10, decimals=18), relayer_key=key)],
            pay_to=PAYEE,
        )
    with pytest.raises(ConfigurationError, match="not both"):
        PaymentMiddleware(app, routes={"/x": 1}, chain=Chain(_network(8453)), chains=[], pay_to=PAYEE)


def test_route_table_prices_default_routes_on_every_network_and_named_assets_on_one() -> None:
    base = Asset(address=TOKEN, chain_id=8453, name="USD Coin", version="2")
    arb = Asset(address=TOKEN, chain_id=42161, name="USD Coin", version="2")
    own = Asset(address="0x" + "44" * 20, chain_id=10, name="Other", version="1")

    table = RouteTable(
        {"/both": "$0.01", "/own": PaidRoute(price=5, asset=own)},
        pay_to=PAYEE,
        asset=base,
        assets=[base, arb],
    )
    both, only = table.entries
    assert [a.network for a in both.assets] == [A, B]
    assert only.assets == ()
