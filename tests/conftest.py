"""Shared fixtures.

Chain tests take `devnet`: one devnet per test session (anvil, or the py-evm node when anvil is absent or
AGENTPAY_DEVNET_BACKEND=pyevm), stopped when the session ends. Tests that use it are marked `chain`.
Accounts are shared by the whole session: assert on balance *changes*, not absolute balances. Do not move
the session devnet's clock (`evm_increaseTime`): later tests sign against the wall clock. A test that
travels in time starts its own `Devnet()` (about 0.3 s with anvil).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from typing import Any, NoReturn, Protocol, cast

import pytest
from eth_account import Account
from web3 import Web3
from web3.contract import Contract
from web3.types import TxParams, TxReceipt

from escrow import Devnet, DevnetAccount, DevnetState, load_artifact

# In-process gateways that name no store would share the default SQLite file in the working directory;
# tests give each gateway its own memory store instead, and test the durable default explicitly.
os.environ.setdefault("AGENTPAY_STORE", "memory://")


def unavailable(reason: str) -> NoReturn:
    """Skip a test whose tool is missing on a developer's machine; under CI (CI=true) `make test` installs
    every tool, so there a missing one fails the run instead of hiding tests."""
    if os.environ.get("CI"):
        pytest.fail(f"{reason} (CI requires it: run `make setup`)")
    pytest.skip(reason)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if "devnet" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.chain)


@pytest.fixture(scope="session")
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(scope="session")
def devnet() -> Iterator[DevnetState]:
    with Devnet() as state:
        yield state


@pytest.fixture(scope="session")
def w3(devnet: DevnetState) -> Web3:
    return Web3(Web3.HTTPProvider(devnet.rpc_url, request_kwargs={"timeout": 60}))


@pytest.fixture(scope="session")
def usdc(w3: Web3, devnet: DevnetState) -> Contract:
    return w3.eth.contract(
        address=w3.to_checksum_address(devnet.contracts["usdc"]), abi=load_artifact("TestUSDC").abi
    )


class Buildable(Protocol):
    """A web3 contract function or constructor: anything with `build_transaction`."""

    def build_transaction(self, transaction: TxParams | None = None) -> TxParams: ...


Transact = Callable[..., TxReceipt]


@pytest.fixture(scope="session")
def transact(w3: Web3) -> Transact:
    """`transact(sender, call, gas=None, value=0) -> receipt`: sign `call` (a contract function or
    constructor) with `sender`'s key, send it, and wait for the receipt, polling every 5 ms.

    Without `gas` web3 estimates it, so a reverting call raises before anything is sent; pass `gas` to put a
    reverting transaction on chain and inspect `receipt["status"]`.
    """

    def run(sender: DevnetAccount, call: Buildable, *, gas: int | None = None, value: int = 0) -> TxReceipt:
        base_fee = w3.eth.get_block("latest").get("baseFeePerGas", 0)
        params: dict[str, Any] = {
            "from": sender.address,
            "nonce": w3.eth.get_transaction_count(sender.address, "pending"),
            "value": value,
            "maxFeePerGas": 2 * base_fee + 10**9,
            "maxPriorityFeePerGas": 10**9,
            "chainId": w3.eth.chain_id,
        }
        if gas is not None:
            params["gas"] = gas
        tx = call.build_transaction(cast(TxParams, params))
        signed = Account.sign_transaction(tx, sender.private_key)
        tx_hash = w3.eth.send_raw_transaction(signed.raw_transaction)
        return w3.eth.wait_for_transaction_receipt(tx_hash, timeout=60, poll_latency=0.005)

    return run
