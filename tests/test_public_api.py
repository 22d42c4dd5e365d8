"""The public front door: network descriptions, "$0.002" amounts, `escrow.Chain`, `PaymentMiddleware(chain=)`
and the session wallet file. Bad input gets a typed error with a stable code; the middleware's lifespan
(or its first paid request, when the server sends no lifespan events) runs the chain's settlers.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable, MutableMapping
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import msgspec
import pytest
from starlette.applications import Starlette
from starlette.responses import JSONResponse
from starlette.routing import Route

from escrow import Chain, ChainConfigError, DevnetState, load_network, network_of_devnet
from gateway import ConfigurationError, MemoryStore, PaymentMiddleware, SettlementOptions
from x402 import (
    GrantMessage,
    InvalidAmount,
    InvalidNetwork,
    LocalSigner,
    Network,
    decode_payment_required,
    to_atomic_units,
)
from x402.client import Eip3009Wallet, PaymentAuth, SpendPolicy, receipt_of
from x402.client_escrow import EscrowWallet, InvalidWalletFile, SessionKeyWallet, SessionWalletFile

pytestmark = pytest.mark.anyio

TOKEN = "0x036CbD53842c5426634e7929541eC2318f3dCF7e"
ESCROW = "0x9fE46736679d2D9a65F0992F2272dE9f3c7fa6e0"
BASE = {
    "network": "eip155:84532",
    "chain_id": 84532,
    "token": TOKEN,
    "token_name": "USDC",
    "token_version": "2",
    "rpc_url": "http://127.0.0.1:1",
}


# -- amounts -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("amount", "atomic"),
    [("$0.002", 2_000), ("0.05", 50_000), (" $1_000 ", 1_000_000_000), (Decimal("0.000001"), 1), (7, 7)],
)
def test_amounts_accept_dollar_strings(amount: str | Decimal | int, atomic: int) -> None:
    assert to_atomic_units(amount, 6) == atomic


@pytest.mark.parametrize("amount", ["$0.0000001", "-$1", "-1", "abc", "NaN", "$inf", True, 1.5, -3])
def test_bad_amounts_raise_invalid_amount(amount: Any) -> None:
    with pytest.raises(InvalidAmount) as caught:
        to_atomic_units(amount, 6)
    assert caught.value.code == "invalid_amount" and caught.value.status_hint == 400


def test_spend_policy_takes_dollar_strings() -> None:
    policy = SpendPolicy(max_per_call="$0.002", total_budget="$0.05", per_payee_budget={"0xAb": "$0.01"})
    assert (policy.max_per_call, policy.total_budget, policy.per_payee_budget) == (
        2_000,
        50_000,
        {"0xab": 10_000},
    )
    assert SpendPolicy(max_per_call="0.5", decimals=2).max_per_call == 50
    with pytest.raises(InvalidAmount):
        SpendPolicy(total_budget="$0.0000001")
    wallet = EscrowWallet(
        LocalSigner.random(), payer=TOKEN, chain_id=1, escrow=ESCROW, token=TOKEN, max_per_call="$0.002"
    )
    assert wallet.max_per_call == 2_000


# -- network descriptions ------------------------------------------------------------------------------


def test_network_description_round_trips_json_and_toml() -> None:
    network = Network.from_mapping({**BASE, "escrow": ESCROW})
    assert Network.from_json(network.to_json()) == network
    toml = "\n".join(f"{k} = {json.dumps(v)}" for k, v in {**BASE, "escrow": ESCROW}.items())
    assert Network.from_toml(toml) == network
    assert network.token_domain.chain_id == 84532 and network.token_domain.name == "USDC"
    assert network.atomic("$0.001") == 1_000 and network.has_escrow


@pytest.mark.parametrize(
    ("change", "needle"),
    [
        ({"chain_id": 8453}, "does not match chain_id"),
        ({"network": "solana:mainnet"}, "CAIP-2"),
        ({"token": "0x1234"}, "token"),
        ({"escrow": "nope"}, "escrow"),
        ({"token_decimals": 99}, "token_decimals"),
        ({"chain_id": "84532"}, "invalid network description"),
    ],
)
def test_contradictory_network_descriptions_are_refused(change: dict[str, Any], needle: str) -> None:
    with pytest.raises(InvalidNetwork) as caught:
        Network.from_mapping({**BASE, **change})
    assert needle in caught.value.message and caught.value.code == "invalid_network"


def test_unparseable_network_files_are_refused(tmp_path: Path) -> None:
    with pytest.raises(InvalidNetwork):
        Network.from_json(b"{not json")
    with pytest.raises(InvalidNetwork):
        Network.from_toml("chain_id = = 1")
    bad = tmp_path / "net.toml"
    bad.write_text("network = [")
    with pytest.raises(InvalidNetwork):
        load_network(bad)
    with pytest.raises(ChainConfigError) as caught:
        load_network(tmp_path / "missing.json")
    assert caught.value.code == "network_file_unreadable"


def test_load_network_reads_json_toml_and_devnet_state(devnet: DevnetState, tmp_path: Path) -> None:
    as_json = tmp_path / "net.json"
    as_json.write_text(json.dumps({**BASE, "escrow": ESCROW}))
    as_toml = tmp_path / "net.toml"
    as_toml.write_text("\n".join(f"{k} = {json.dumps(v)}" for k, v in BASE.items()))
    assert load_network(as_json).escrow == ESCROW and load_network(as_toml).escrow == ""
    state = tmp_path / "devnet.json"
    devnet.dump(state)
    network = load_network(state)
    assert network == network_of_devnet(devnet)
    assert (network.token, network.escrow) == (devnet.contracts["usdc"], devnet.contracts["escrow"])
    assert (network.token_name, network.token_version) == (devnet.usdc_name, devnet.usdc_version)


# -- Chain -----------------------------------------------------------------------------------------------


async def test_chain_configuration_errors(devnet: DevnetState) -> None:
    with pytest.raises(ChainConfigError, match="no account 99"):
        Chain.from_devnet(devnet, relayer=99)
    with pytest.raises(ChainConfigError, match="no RPC URL"):
        Chain(Network.from_mapping({**BASE, "rpc_url": ""}))
    async with Chain.from_devnet(devnet, relayer=None) as chain:
        assert not chain.has_relayer
        with pytest.raises(ChainConfigError, match="no relayer key"):
            chain.exact()
    async with Chain(Network.from_mapping(BASE), relayer_key="0x" + "11" * 32) as chain:
        with pytest.raises(ChainConfigError, match="no escrow"):
            chain.escrow_verifier()


async def test_chain_connect_reads_the_token_domain_from_the_node(devnet: DevnetState) -> None:
    usdc, escrow = devnet.contracts["usdc"], devnet.contracts["escrow"]
    async with await Chain.connect(devnet.rpc_url, token=usdc, escrow=escrow) as chain:
        assert chain.network == msgspec.structs.replace(
            network_of_devnet(devnet), account_factory="", entrypoint="", channels="", paymaster=""
        )
    with pytest.raises(ChainConfigError, match="cannot describe"):
        await Chain.connect(devnet.rpc_url, token=devnet.accounts[5].address)  # no token there
    with pytest.raises(ChainConfigError, match="cannot describe"):
        await Chain.connect("http://127.0.0.1:1", token=usdc)  # no node there
    with pytest.raises(ChainConfigError, match="not a network description"):
        Chain(devnet.rpc_url, relayer_key="0x" + "11" * 32)


async def test_middleware_chain_configuration_errors(devnet: DevnetState) -> None:
    api = Starlette()
    with pytest.raises(ConfigurationError, match="pass chain="):
        PaymentMiddleware(api, routes={"/x": "$0.001"}, schemes=["exact"])
    with pytest.raises(ConfigurationError, match="pass chain="):
        PaymentMiddleware(api, routes={"/x": "$0.001"})
    async with Chain.from_devnet(devnet, relayer=None) as chain:
        with pytest.raises(ConfigurationError, match="relayer key"):
            PaymentMiddleware(api, routes={"/x": "$0.001"}, chain=chain, pay_to=devnet.accounts[2].address)
    async with Chain(Network.from_mapping(BASE), relayer_key="0x" + "11" * 32) as chain:
        with pytest.raises(ConfigurationError, match="no escrow"):
            PaymentMiddleware(api, routes={"/x": "$0.001"}, chain=chain, schemes=["escrow"], pay_to=TOKEN)
        with pytest.raises(ConfigurationError, match="among"):
            PaymentMiddleware(api, routes={"/x": "$0.001"}, chain=chain, schemes=["nonesuch"], pay_to=TOKEN)


# -- PaymentMiddleware(chain=) ---------------------------------------------------------------------------


def _paid_app(devnet: DevnetState, **options: Any) -> PaymentMiddleware:
    async def hello(request: Any) -> JSONResponse:
        return JSONResponse({"hello": True})

    chain = Chain.from_devnet(devnet, relayer=3)
    api = Starlette(routes=[Route("/hello", hello)])
    return PaymentMiddleware(
        api, routes={"GET /hello": "$0.001"}, chain=chain, pay_to=devnet.accounts[2].address, **options
    )


async def _balance(devnet: DevnetState, who: str) -> int:
    async with Chain.from_devnet(devnet, relayer=None) as chain:
        return await chain.token.balance_of(who)


async def _eventually(check: Callable[[], Awaitable[bool]], timeout: float = 20.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not await check():
        assert asyncio.get_running_loop().time() < deadline, "timed out"
        await asyncio.sleep(0.05)


async def test_chain_defaults_offer_exact_and_escrow_in_the_chain_token(devnet: DevnetState) -> None:
    app = _paid_app(devnet, store=MemoryStore())
    try:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://agent") as client:
            response = await client.get("/hello")
        assert response.status_code == 402
        accepts = decode_payment_required(response.headers["payment-required"]).accepts
        assert [a.scheme for a in accepts] == ["exact", "escrow"]
        assert {a.asset for a in accepts} == {devnet.contracts["usdc"]}
        assert {a.network for a in accepts} == {devnet.network}
        assert accepts[0].extra["name"] == devnet.usdc_name
        assert accepts[1].extra["escrow"] == devnet.contracts["escrow"]
    finally:
        await app.shutdown()


async def test_without_lifespan_the_first_paid_request_starts_the_settlers(devnet: DevnetState) -> None:
    """httpx.ASGITransport sends no lifespan events: a deferred payment must still get settled."""
    app = _paid_app(devnet, store=MemoryStore(), schemes=["exact"], settle="deferred")
    payee = devnet.accounts[2].address
    before = await _balance(devnet, payee)
    wallet = Eip3009Wallet.for_network(LocalSigner(devnet.accounts[1].private_key), network_of_devnet(devnet))
    try:
        transport = httpx.ASGITransport(app)
        async with httpx.AsyncClient(transport=transport, auth=PaymentAuth(wallet), base_url="http://a") as c:
            response = await c.get("/hello")
        assert response.status_code == 200 and receipt_of(response) is not None

        async def paid() -> bool:
            return await _balance(devnet, payee) - before == 1_000

        await _eventually(paid)
        assert set(app.settlers) == {"exact"}
    finally:
        await app.shutdown()


async def test_lifespan_shutdown_flushes_deferred_payments(devnet: DevnetState) -> None:
    """A deferred payment waiting for its batch (max_age one hour) is settled when the app stops."""
    options = SettlementOptions(max_age=3600, batch_size=64)
    app = _paid_app(devnet, store=MemoryStore(), schemes=["exact"], settle="deferred", settlement=options)
    payee = devnet.accounts[2].address
    before = await _balance(devnet, payee)
    wallet = Eip3009Wallet.for_network(LocalSigner(devnet.accounts[1].private_key), network_of_devnet(devnet))
    started = asyncio.Event()
    stop = asyncio.Event()
    answers: list[str] = []

    async def receive() -> dict[str, Any]:
        if not started.is_set():
            started.set()
            return {"type": "lifespan.startup"}
        await stop.wait()
        return {"type": "lifespan.shutdown"}

    async def send(message: MutableMapping[str, Any]) -> None:
        answers.append(message["type"])

    scope = {"type": "lifespan", "asgi": {"version": "3.0"}, "state": {}}
    running = asyncio.create_task(app(scope, receive, send))
    while answers != ["lifespan.startup.complete"]:
        assert not running.done(), answers
        await asyncio.sleep(0.01)
    transport = httpx.ASGITransport(app)
    async with httpx.AsyncClient(transport=transport, auth=PaymentAuth(wallet), base_url="http://a") as c:
        assert (await c.get("/hello")).status_code == 200
    await asyncio.sleep(0.3)
    assert await _balance(devnet, payee) == before  # queued, its batch not due for an hour
    stop.set()
    await asyncio.wait_for(running, 60)
    assert answers == ["lifespan.startup.complete", "lifespan.shutdown.complete"]
    assert await _balance(devnet, payee) - before == 1_000


# -- the session wallet file -----------------------------------------------------------------------------


async def test_open_session_writes_a_wallet_that_pays_escrow(devnet: DevnetState, tmp_path: Path) -> None:
    path = tmp_path / "o.session.json"
    async with Chain.from_devnet(devnet, relayer=5) as chain:
        owner = LocalSigner(devnet.accounts[6].private_key)
        file = await chain.open_session(owner, max_per_call="$0.002", budget="$0.05", deposit="$0.1")
        file.dump(path)
        info = await chain.escrow.grant_of(owner.address, file.grant.signer)
        assert (info.max_per_call, info.budget) == (2_000, 50_000)
    assert path.stat().st_mode & 0o777 == 0o600
    wallet = SessionKeyWallet.load(path)
    assert wallet.address == owner.address and wallet.escrow.max_per_call == 2_000
    assert wallet.escrow.escrow == devnet.contracts["escrow"] and wallet.fallback is None


def test_bad_wallet_files_are_refused(devnet: DevnetState, tmp_path: Path) -> None:
    with pytest.raises(InvalidWalletFile) as caught:
        SessionKeyWallet.load(tmp_path / "missing.json")
    assert caught.value.code == "invalid_wallet_file"
    garbage = tmp_path / "garbage.json"
    garbage.write_text("{")
    with pytest.raises(InvalidWalletFile):
        SessionKeyWallet.load(garbage)
    network = network_of_devnet(devnet)
    other = LocalSigner.random()
    grant = GrantMessage(
        payer=other.address,
        signer=other.address,  # a grant for another key
        token=network.token,
        max_per_call=1,
        budget=1,
        valid_after=0,
        valid_until=2**40,
    )
    key = "0x" + "22" * 32
    for bad in (
        SessionWalletFile(network=network, session_key=key, grant=grant),
        SessionWalletFile(network=network, session_key="0x12", grant=grant),
        SessionWalletFile(network=msgspec.structs.replace(network, escrow=""), session_key=key, grant=grant),
    ):
        path = tmp_path / "bad.json"
        bad.dump(path)
        with pytest.raises(InvalidWalletFile):
            SessionKeyWallet.load(path)
    contradictory = json.loads(SessionWalletFile(network=network, session_key=key, grant=grant).to_json())
    contradictory["network"]["chain_id"] = 1
    path.write_text(json.dumps(contradictory))
    with pytest.raises(InvalidWalletFile, match="does not match"):
        SessionKeyWallet.load(path)
