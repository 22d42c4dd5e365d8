"""Devnets of several chains, and chains that look like real networks (issue 14).

`Devnets(2)` runs two anvils with distinct chain ids and the same contracts; `Devnets(["base-sepolia", ...])`
gives each anvil a real network's chain id and puts the test token at that network's USDC address, under
USDC's EIP-712 domain there. Everything is checked on the chain: the domain the token reports and signs
under, balances, EIP-3009 transfers and ERC-2612 permits. `agentpay devnet up --chains base,...` is run as a
user runs it, and mppx (a client not written here, which knows only real networks' USDC) refuses the
plain devnet's token and pays the `base` look-alike unchanged.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from eth_account import Account
from eth_account.messages import encode_typed_data
from eth_utils.crypto import keccak
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route
from web3 import Web3
from web3.contract import Contract

from escrow import (
    REAL_NETWORKS,
    Chain,
    DevnetAccount,
    DevnetChain,
    Devnets,
    DevnetState,
    load_artifact,
    load_network,
)
from gateway import MemoryStore, PaymentMiddleware
from tests._serving import serving
from tests.peers._harness import last_json, peers_missing, run_peer
from x402 import InvalidNetwork, Network

pytestmark = [pytest.mark.chain, pytest.mark.anyio]

ROOT = Path(__file__).resolve().parents[1]
NODE_PEERS = ROOT / "tests" / "peers" / "node"
README = ROOT / "README.md"
GAS = 200_000
PRICE = 1000  # "$0.001" of a 6-decimal token


# -- helpers -------------------------------------------------------------------------------------------------


def web3_of(chain: DevnetChain) -> Web3:
    return Web3(Web3.HTTPProvider(chain.rpc_url, request_kwargs={"timeout": 60}))


def token_of(w3: Web3, chain: DevnetChain) -> Contract:
    return w3.eth.contract(address=chain.contracts["usdc"], abi=load_artifact("TestUSDC").abi)


def send(w3: Web3, sender: DevnetAccount, call: Any) -> int:
    """Sign and send `call` with a fixed gas limit (a reverting call still lands); the receipt status."""
    tx = call.build_transaction(
        {
            "from": sender.address,
            "nonce": w3.eth.get_transaction_count(sender.address, "pending"),
            "gas": GAS,
            "chainId": w3.eth.chain_id,
        }
    )
    raw = Account.sign_transaction(tx, sender.private_key).raw_transaction
    return int(
        w3.eth.wait_for_transaction_receipt(w3.eth.send_raw_transaction(raw), poll_latency=0.005)["status"]
    )


DOMAIN_FIELDS = [
    {"name": "name", "type": "string"},
    {"name": "version", "type": "string"},
    {"name": "chainId", "type": "uint256"},
    {"name": "verifyingContract", "type": "address"},
]


def domain_of(chain: DevnetChain) -> dict[str, Any]:
    return {
        "name": chain.usdc_name,
        "version": chain.usdc_version,
        "chainId": chain.chain_id,
        "verifyingContract": chain.contracts["usdc"],
    }


def sign(
    key: str, domain: dict[str, Any], primary: str, fields: list[dict[str, str]], message: dict[str, Any]
) -> Any:
    typed = {"types": {"EIP712Domain": DOMAIN_FIELDS, primary: fields}, "primaryType": primary}
    return Account.sign_message(
        encode_typed_data(full_message={**typed, "domain": domain, "message": message}), key
    )


TWA_FIELDS = [
    {"name": "from", "type": "address"},
    {"name": "to", "type": "address"},
    {"name": "value", "type": "uint256"},
    {"name": "validAfter", "type": "uint256"},
    {"name": "validBefore", "type": "uint256"},
    {"name": "nonce", "type": "bytes32"},
]
TWA = "transferWithAuthorization(address,address,uint256,uint256,uint256,bytes32,uint8,bytes32,bytes32)"


def transfer_with_authorization(
    chain: DevnetChain, payer: DevnetAccount, payee: str, value: int, *, domain: dict[str, Any] | None = None
) -> tuple[dict[str, Any], Any]:
    """An EIP-3009 authorization signed by `payer` under `domain` (default: `chain`'s token)."""
    message = {
        "from": payer.address,
        "to": payee,
        "value": value,
        "validAfter": 0,
        "validBefore": int(time.time()) + 3600,
        "nonce": os.urandom(32),
    }
    signed = sign(
        payer.private_key, domain or domain_of(chain), "TransferWithAuthorization", TWA_FIELDS, message
    )
    return message, signed


def submit_authorization(
    w3: Web3, token: Contract, relayer: DevnetAccount, message: dict[str, Any], sig: Any
) -> int:
    m = message
    call = token.get_function_by_signature(TWA)(
        m["from"],
        m["to"],
        m["value"],
        m["validAfter"],
        m["validBefore"],
        m["nonce"],
        sig.v,
        sig.r.to_bytes(32, "big"),
        sig.s.to_bytes(32, "big"),
    )
    return send(w3, relayer, call)


# -- several chains ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def two_chains() -> Iterator[DevnetState]:
    with Devnets(2) as state:
        yield state


def test_two_chains_have_distinct_ids_the_same_contracts_and_the_first_chain_on_top(
    two_chains: DevnetState,
) -> None:
    first, second = two_chains.chains
    assert (first.chain_id, second.chain_id) == (31337, 31338)
    assert [web3_of(c).eth.chain_id for c in two_chains.chains] == [31337, 31338]  # the nodes agree
    assert first.rpc_url != second.rpc_url and first.pid != second.pid
    assert first.contracts == second.contracts and set(first.contracts) >= {"usdc", "escrow", "entrypoint"}
    for chain in two_chains.chains:
        w3 = web3_of(chain)
        assert all(w3.eth.get_code(address) for address in chain.contracts.values())
    # Code written for one chain reads the top level, which is the first chain.
    assert (two_chains.rpc_url, two_chains.chain_id, two_chains.network) == (
        first.rpc_url,
        31337,
        "eip155:31337",
    )
    assert two_chains.contracts == first.contracts and two_chains.pid == first.pid
    assert DevnetState.from_json(two_chains.to_json()) == two_chains
    assert two_chains.chain("eip155:31338") is two_chains.chains[1] and two_chains.chain(31337) is first


def test_a_payment_settles_on_each_chain_and_its_signature_is_refused_on_the_other(
    two_chains: DevnetState,
) -> None:
    payer, relayer = two_chains.accounts[6], two_chains.accounts[7]
    payees = [Account.create().address for _ in two_chains.chains]
    signed = []
    for chain, payee, value in zip(two_chains.chains, payees, (1_234, 5_678), strict=True):
        w3 = web3_of(chain)
        token = token_of(w3, chain)
        message, sig = transfer_with_authorization(chain, payer, payee, value)
        assert submit_authorization(w3, token, relayer, message, sig) == 1
        assert token.functions.balanceOf(payee).call() == value
        signed.append((message, sig))
    # The same token address on both chains: only the chain id in the domain tells the signatures apart.
    for (message, sig), chain in zip(signed, reversed(two_chains.chains), strict=True):
        w3 = web3_of(chain)
        token = token_of(w3, chain)
        before = token.functions.balanceOf(message["to"]).call()
        assert submit_authorization(w3, token, relayer, message, sig) == 0
        assert token.functions.balanceOf(message["to"]).call() == before


def test_an_old_state_file_without_chains_loads_as_one_chain(two_chains: DevnetState) -> None:
    old = json.loads(two_chains.to_json())
    del old["chains"]
    state = DevnetState.from_json(json.dumps(old))
    (only,) = state.chains
    assert (only.chain_id, only.rpc_url, only.contracts, only.pid) == (
        31337,
        two_chains.rpc_url,
        two_chains.contracts,
        two_chains.pid,
    )


# -- chains that look like real networks ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def lookalikes() -> Iterator[DevnetState]:
    with Devnets(["base-sepolia", "arbitrum"]) as state:
        yield state


@pytest.mark.parametrize("name", ["base-sepolia", "arbitrum"])
def test_the_token_sits_at_the_canonical_usdc_address_under_usdcs_domain(
    lookalikes: DevnetState, name: str
) -> None:
    real = REAL_NETWORKS[name]
    chain = lookalikes.chain(name)
    w3 = web3_of(chain)
    assert w3.eth.chain_id == real.chain_id == chain.chain_id
    assert chain.contracts["usdc"] == real.usdc and w3.eth.get_code(real.usdc)
    token = token_of(w3, chain)
    _, domain_name, version, chain_id, contract, _, _ = token.functions.eip712Domain().call()
    assert (domain_name, version, chain_id, contract) == (
        real.usdc_name,
        real.usdc_version,
        real.chain_id,
        real.usdc,
    )
    assert (chain.usdc_name, chain.usdc_version) == (real.usdc_name, real.usdc_version)
    expected_separator = keccak(
        keccak(text="EIP712Domain(string name,string version,uint256 chainId,address verifyingContract)")
        + keccak(text=real.usdc_name)
        + keccak(text=real.usdc_version)
        + real.chain_id.to_bytes(32, "big")
        + bytes(12)
        + bytes.fromhex(real.usdc[2:])
    )
    assert token.functions.DOMAIN_SEPARATOR().call() == expected_separator
    assert (
        token.functions.name().call(),
        token.functions.symbol().call(),
        token.functions.decimals().call(),
    ) == (
        real.usdc_name,
        "USDC",
        6,
    )
    assert token.functions.balanceOf(lookalikes.accounts[9].address).call() == 1_000_000 * 10**6
    # The other contracts are where they are on a plain devnet chain.
    assert chain.contracts["escrow"] == lookalikes.chains[0].contracts["escrow"]


def test_base_sepolia_lookalike_takes_eip3009_and_permit_under_its_domain(lookalikes: DevnetState) -> None:
    chain = lookalikes.chain("base-sepolia")
    w3 = web3_of(chain)
    token = token_of(w3, chain)
    payer, relayer, payee = lookalikes.accounts[4], lookalikes.accounts[5], Account.create().address
    # Signed under the Ethereum/Base mainnet name ("USD Coin"): not this token's domain, refused.
    wrong = {**domain_of(chain), "name": "USD Coin"}
    message, sig = transfer_with_authorization(chain, payer, payee, 700, domain=wrong)
    assert submit_authorization(w3, token, relayer, message, sig) == 0
    message, sig = transfer_with_authorization(chain, payer, payee, 700)
    assert submit_authorization(w3, token, relayer, message, sig) == 1
    assert token.functions.balanceOf(payee).call() == 700
    # ERC-2612 permit under the same domain.
    spender, deadline = Account.create().address, int(time.time()) + 3600
    permit = {
        "owner": payer.address,
        "spender": spender,
        "value": 4_321,
        "nonce": token.functions.nonces(payer.address).call(),
        "deadline": deadline,
    }
    fields = [{"name": k, "type": "address" if k in ("owner", "spender") else "uint256"} for k in permit]
    sig = sign(payer.private_key, domain_of(chain), "Permit", fields, permit)
    call = token.get_function_by_signature("permit(address,address,uint256,uint256,uint8,bytes32,bytes32)")(
        payer.address, spender, 4_321, deadline, sig.v, sig.r.to_bytes(32, "big"), sig.s.to_bytes(32, "big")
    )
    assert send(w3, relayer, call) == 1
    assert token.functions.allowance(payer.address, spender).call() == 4_321


# -- the command line and the network description files ------------------------------------------------------


def agentpay(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run(
        [sys.executable, "-m", "gateway", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.mark.parametrize("spec", ["dogecoin", "base,base", "base,8453", "0", "9"])
def test_bad_chains_fail_in_one_line(tmp_path: Path, spec: str) -> None:
    done = agentpay("devnet", "up", "--chains", spec, "--state", str(tmp_path / "d.json"), cwd=tmp_path)
    assert done.returncode != 0 and done.stdout == ""
    assert done.stderr.startswith("agentpay: error: argument --chains: ") and done.stderr.count("\n") == 1
    assert not (tmp_path / "d.json").exists()


def test_a_description_names_its_settlement_key_never_holds_it() -> None:
    fields = {"network": "eip155:8453", "chain_id": 8453, "token": REAL_NETWORKS["base"].usdc}
    fields |= {"token_name": "USD Coin", "token_version": "2"}
    assert (
        Network.from_mapping({**fields, "settlement_key": "env:RELAYER_KEY"}).settlement_key
        == "env:RELAYER_KEY"
    )
    with pytest.raises(InvalidNetwork, match="name a key"):
        Network.from_mapping({**fields, "settlement_key": "0x" + "ab" * 32})
    with pytest.raises(InvalidNetwork, match="not env:NAME or devnet:N"):
        Network.from_mapping({**fields, "settlement_key": "vault:relayer"})


def run_mppx(url: str, asset: str, key: str) -> dict[str, Any]:
    done = subprocess.run(
        ["node", str(NODE_PEERS / "mppx_charge_client.mjs"), url, asset],
        cwd=NODE_PEERS,
        env={**os.environ, "PEER_PRIVATE_KEY": key},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-6000:]
    out: dict[str, Any] = last_json(done.stdout)
    return out


def paid_app(chain: Chain, pay_to: str) -> PaymentMiddleware:
    async def hello(request: Request) -> JSONResponse:
        return JSONResponse({"hello": "world"})

    api = Starlette(routes=[Route("/hello", hello)])
    return PaymentMiddleware(
        api, routes={"GET /hello": "$0.001"}, chain=chain, pay_to=pay_to, store=MemoryStore()
    )


mppx_missing = pytest.mark.skipif(
    not (NODE_PEERS / "node_modules" / "mppx").exists() and not os.environ.get("CI"),
    reason="tests/peers/node is not installed: `make setup`",
)


@mppx_missing
async def test_mppx_refuses_the_plain_devnet_token(devnet: DevnetState) -> None:
    chain = Chain.from_devnet(devnet)
    payee = Account.create().address
    try:
        async with serving(lambda _: paid_app(chain, payee)) as base:
            out = await asyncio.to_thread(run_mppx, base + "/hello", "base", devnet.accounts[8].private_key)
    finally:
        await chain.aclose()
    assert "currency is not allowed" in out.get("error", ""), out


def pid_alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] not in ("Z", "X")


@mppx_missing
async def test_devnet_up_chains_base_is_paid_by_mppx_knowing_only_base_usdc(tmp_path: Path) -> None:
    state_file = tmp_path / "devnet.json"
    up = await asyncio.to_thread(
        agentpay,
        "devnet",
        "up",
        "--chains",
        "base,arbitrum-sepolia",
        "--state",
        str(state_file),
        cwd=tmp_path,
    )
    assert up.returncode == 0, up.stderr
    state = DevnetState.load(state_file)
    try:
        assert json.loads(up.stdout) == json.loads(state.to_json())
        base, arbitrum = state.chains
        assert (base.label, base.chain_id, arbitrum.label, arbitrum.chain_id) == (
            "base",
            8453,
            "arbitrum-sepolia",
            421614,
        )
        assert (state.chain_id, state.rpc_url, state.contracts) == (8453, base.rpc_url, base.contracts)
        status = await asyncio.to_thread(
            agentpay, "devnet", "status", "--state", str(state_file), cwd=tmp_path
        )
        assert status.returncode == 0 and [c["chain_id"] for c in json.loads(status.stdout)["chains"]] == [
            8453,
            421614,
        ]

        # One network description per chain, next to the state file; a deployment loads it by path.
        for chain in state.chains:
            assert chain.network_file == str(tmp_path / f"devnet.{chain.label}.network.json")
            described = load_network(chain.network_file)
            assert (described.network, described.rpc_url, described.token) == (
                chain.network,
                chain.rpc_url,
                chain.contracts["usdc"],
            )
            assert (described.token_name, described.token_version) == (chain.usdc_name, chain.usdc_version)
            assert (described.escrow, described.channels) == (
                chain.contracts["escrow"],
                chain.contracts["channels"],
            )
            assert described.settlement_key == "devnet:3"
        assert load_network(base.network_file).token == REAL_NETWORKS["base"].usdc

        # The gateway is configured from the file alone: its relayer is the key the file names.
        gateway_chain = Chain(base.network_file)
        assert gateway_chain.relayer.address == state.accounts[3].address
        payer, payee = state.accounts[8], Account.create().address
        token = token_of(web3_of(base), base)
        before = token.functions.balanceOf(payer.address).call()
        try:
            async with serving(lambda _: paid_app(gateway_chain, payee)) as url:
                out = await asyncio.to_thread(run_mppx, url + "/hello", "base", payer.private_key)
        finally:
            await gateway_chain.aclose()
        assert out.get("status") == 200 and json.loads(out["body"]) == {"hello": "world"}, out
        assert out["receipt"]
        assert token.functions.balanceOf(payee).call() == PRICE
        assert token.functions.balanceOf(payer.address).call() == before - PRICE
    finally:
        down = await asyncio.to_thread(agentpay, "devnet", "down", "--state", str(state_file), cwd=tmp_path)
    assert down.returncode == 0 and down.stdout.startswith("stopped the anvil devnet at base at "), down
    assert not any(pid_alive(pid) for pid in [state.supervisor_pid or 0, *(c.pid for c in state.chains)])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["devnet.log"]


def run_official_x402(url: str, chain_id: int, key: str) -> dict[str, Any]:
    """The official x402 client with the SDK's default asset for `eip155:<chain_id>` (no address given)."""
    args = ["--url", url, "--chain-id", str(chain_id), "--asset", "default"]
    out: dict[str, Any] = run_peer("x402_client.py", *args, env={"PEER_PRIVATE_KEY": key})
    return out


@pytest.mark.peers
@pytest.mark.skipif(peers_missing() is not None, reason=str(peers_missing()))
async def test_the_official_x402_client_has_no_asset_for_the_plain_devnet_and_pays_the_base_lookalike(
    devnet: DevnetState,
) -> None:
    payee = Account.create().address
    plain = Chain.from_devnet(devnet)
    try:
        async with serving(lambda _: paid_app(plain, payee)) as url:
            out = await asyncio.to_thread(
                run_official_x402, url + "/hello", devnet.chain_id, devnet.accounts[8].private_key
            )
    finally:
        await plain.aclose()
    assert (
        out["results"] == [] and "No default asset configured for network eip155:31337" in out["refused"]
    ), out

    with Devnets(["base"]) as state:
        (base,) = state.chains
        chain = Chain.from_devnet(state, chain="base")
        token = token_of(web3_of(base), base)
        try:
            async with serving(lambda _: paid_app(chain, payee)) as url:
                out = await asyncio.to_thread(
                    run_official_x402, url + "/hello", 8453, state.accounts[8].private_key
                )
        finally:
            await chain.aclose()
        (result,) = out["results"]
        assert result["status"] == 200 and result["payment_response"]["success"] is True, out
        assert result["payment_response"]["network"] == "eip155:8453"
        offered = out["exchanges"][0]["received"]["payment-required"]["accepts"]
        assert {a["asset"] for a in offered} == {REAL_NETWORKS["base"].usdc}
        assert token.functions.balanceOf(payee).call() == PRICE


def test_the_readmes_network_file_is_one() -> None:
    fenced = re.findall(r"^```(\w+)\n(.*?)^```", README.read_text(), re.M | re.S)
    (block,) = [body for lang, body in fenced if lang == "json" and '"settlement_key"' in body]
    described = Network.from_json(block)
    assert (described.token, described.token_name) == (
        REAL_NETWORKS["base"].usdc,
        REAL_NETWORKS["base"].usdc_name,
    )
    assert described.settlement_key == "devnet:3" and described.channels and described.paymaster


def test_when_one_chain_dies_the_supervisor_stops_the_others(tmp_path: Path) -> None:
    state_file = tmp_path / "devnet.json"
    up = agentpay("devnet", "up", "--chains", "2", "--state", str(state_file), cwd=tmp_path)
    assert up.returncode == 0, up.stderr
    state = DevnetState.load(state_file)
    try:
        assert [c.chain_id for c in state.chains] == [31337, 31338]
        assert [c.label for c in state.chains] == ["31337", "31338"]
        os.kill(state.chains[1].pid, signal.SIGKILL)
        deadline = time.monotonic() + 15
        while pid_alive(state.supervisor_pid or 0) or pid_alive(state.chains[0].pid):
            assert time.monotonic() < deadline, "the supervisor left the first chain running"
            time.sleep(0.05)
        status = agentpay("devnet", "status", "--state", str(state_file), cwd=tmp_path)
        assert status.returncode == 1 and "is not running" in status.stderr
    finally:
        down = agentpay("devnet", "down", "--state", str(state_file), cwd=tmp_path)
    assert down.returncode == 0 and not state_file.exists()
