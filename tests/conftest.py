"""Shared fixtures.

Chain tests take `devnet`: one devnet per test session (anvil, or the py-evm node when anvil is absent or
AGENTPAY_DEVNET_BACKEND=pyevm), stopped when the session ends. Tests that use it are marked `chain`.
Accounts are shared by the whole session: assert on balance *changes*, not absolute balances. Do not move
the session devnet's clock (`evm_increaseTime`): later tests sign against the wall clock. A test that
travels in time starts its own `Devnet()` (about 0.3 s with anvil).

`make pytest` runs the suite on parallel workers (pytest-xdist, `-n auto --dist loadfile`): each worker is
its own pytest session, so it has its own session devnet (on a free port), and a test file runs whole on
one worker, so module-scoped fixtures are built once. Anything a test shares beyond its process must be
unique to it: a free port (never a fixed one), `tmp_path` (never the working directory), its own
PostgreSQL schema and Redis key prefix (`tests.test_store.isolated_url`).
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


# The files that take longest (measured with `--durations=0`, summed per file), longest first. Under xdist
# a worker takes the next whole file as it finishes one, in collection order (`--no-loadscope-reorder`):
# starting the long files first keeps a worker from running one alone at the end while the other idles.
# A file missing here only runs later; refresh the list when a file grows slow.
LONGEST_FIRST = (
    "test_cli.py",
    "test_store_procs.py",
    "test_cli_keys.py",
    "test_crash_recovery.py",
    "test_devnet_chains.py",
    "test_replicas.py",
    "test_fuzz_edge.py",
    "test_rpc_outage.py",
    "test_store.py",
    "test_store_model.py",
    "test_multichain_gateway.py",
    "test_demo.py",
    "test_devnet_bundler.py",
    "test_wallet_mcp.py",
    "test_interop_x402.py",
    "test_interop_mpp.py",
    "test_wire_agents.py",
    "test_dashboard.py",
    "test_claim_holding.py",
    "test_exact_reservations.py",
)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if "devnet" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.chain)
    if os.environ.get("PYTEST_XDIST_WORKER"):  # only under xdist: a serial run keeps the file order
        rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
        items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: in-file order is kept


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
