"""The devnet: what it deploys, what it funds, that it cleans up, and the py-evm fallback."""

from __future__ import annotations

from pathlib import Path

import pytest
from eth_account import Account
from web3 import Web3
from web3.contract import Contract
from web3.exceptions import ContractCustomError
from web3.types import RPCEndpoint

from escrow import ENTRYPOINT_ADDRESS, Devnet, DevnetError, DevnetState, load_artifact
from escrow.devnet._node import pid_alive

USDC_EACH = 1_000_000 * 10**6


def usdc_of(w3: Web3, state: DevnetState) -> Contract:
    return w3.eth.contract(
        address=w3.to_checksum_address(state.contracts["usdc"]), abi=load_artifact("TestUSDC").abi
    )


def test_entrypoint_at_canonical_address(devnet: DevnetState, w3: Web3) -> None:
    assert devnet.contracts["entrypoint"] == ENTRYPOINT_ADDRESS
    assert len(w3.eth.get_code(ENTRYPOINT_ADDRESS)) > 10_000
    entrypoint = w3.eth.contract(address=ENTRYPOINT_ADDRESS, abi=load_artifact("EntryPoint").abi)
    assert entrypoint.functions.getNonce(devnet.accounts[9].address, 7).call() == 7 << 64


def test_state_describes_the_chain(devnet: DevnetState, w3: Web3) -> None:
    assert w3.eth.chain_id == devnet.chain_id
    assert devnet.network == f"eip155:{devnet.chain_id}"
    assert len(devnet.accounts) >= 10
    for account in devnet.accounts:
        assert Account.from_key(account.private_key).address == account.address
    usdc = usdc_of(w3, devnet)
    domain = usdc.functions.eip712Domain().call()
    assert (domain[1], domain[2], domain[3]) == (devnet.usdc_name, devnet.usdc_version, devnet.chain_id)
    assert usdc.functions.decimals().call() == devnet.usdc_decimals == 6


def test_state_round_trips_through_json(devnet: DevnetState, tmp_path: Path) -> None:
    devnet.dump(tmp_path / "nested" / "devnet.json")
    assert DevnetState.load(tmp_path / "nested" / "devnet.json") == devnet


@pytest.mark.parametrize(
    ("content", "code"),
    [
        (None, "devnet_state_missing"),
        (b"{not json", "devnet_state_invalid"),
        (b'{"rpc_url": 1}', "devnet_state_invalid"),
    ],
)
def test_bad_state_files_raise_devnet_errors(tmp_path: Path, content: bytes | None, code: str) -> None:
    path = tmp_path / "devnet.json"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(DevnetError) as caught:
        DevnetState.load(path)
    assert caught.value.code == code


def test_fresh_devnet_funds_every_account_and_stops_its_node() -> None:
    with Devnet(accounts=12) as state:
        w3 = Web3(Web3.HTTPProvider(state.rpc_url))
        usdc = usdc_of(w3, state)
        assert len(state.accounts) == 12
        for account in state.accounts:
            assert usdc.functions.balanceOf(account.address).call() == USDC_EACH
            assert w3.eth.get_balance(account.address) > 1000 * 10**18
        assert pid_alive(state.pid)
    assert not pid_alive(state.pid)


def test_pyevm_fallback_deploys_and_answers(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("AGENTPAY_DEVNET_BACKEND", "pyevm")
    with Devnet(accounts=3) as state:
        assert "py-evm" in capsys.readouterr().err
        assert state.backend == "py-evm"
        w3 = Web3(Web3.HTTPProvider(state.rpc_url))
        assert w3.eth.chain_id == state.chain_id
        assert len(w3.eth.get_code(ENTRYPOINT_ADDRESS)) > 10_000
        usdc = usdc_of(w3, state)
        payer, payee = state.accounts[1], state.accounts[2]
        assert usdc.functions.balanceOf(payer.address).call() == USDC_EACH

        # A revert comes back with its data, so web3 decodes the token's custom error.
        with pytest.raises(ContractCustomError):
            usdc.functions.transfer(payee.address, USDC_EACH + 1).call({"from": payer.address})

        block = w3.eth.block_number
        tx = usdc.functions.transfer(payee.address, 5).build_transaction(
            {"from": payer.address, "nonce": w3.eth.get_transaction_count(payer.address)}
        )
        receipt = w3.eth.wait_for_transaction_receipt(
            w3.eth.send_raw_transaction(Account.sign_transaction(tx, payer.private_key).raw_transaction),
            poll_latency=0.005,
        )
        assert receipt["status"] == 1
        assert usdc.functions.balanceOf(payee.address).call() == USDC_EACH + 5
        logs = usdc.events.Transfer().get_logs(from_block=block + 1)
        assert [(log["args"]["from"], log["args"]["value"]) for log in logs] == [(payer.address, 5)]

        # Time travel, as anvil does it: escrow withdrawal delays are tested this way.
        before = w3.eth.get_block("latest")["timestamp"]
        w3.provider.make_request(RPCEndpoint("evm_increaseTime"), [3600])
        w3.provider.make_request(RPCEndpoint("evm_mine"), [])
        assert w3.eth.get_block("latest")["timestamp"] >= before + 3600
    assert not pid_alive(state.pid)
