"""Receipts are awaited by block (issue 15): a transaction pending in the mempool costs the poller nothing
per tick beyond one head-block query shared by all waiters, and every waiter gets its receipt once a block
holds it.

Real anvil of its own (`Devnet()`): mining is paused to keep transactions pending. The RPC traffic is counted
by a thin `Rpc` subclass that records the method of every call it puts on the wire.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Iterator
from typing import Any

import pytest
from eth_abi.abi import encode as abi_encode
from eth_utils.address import to_checksum_address
from eth_utils.crypto import keccak

from escrow import Devnet, DevnetState
from escrow.chain._rpc import Rpc, TxSender

pytestmark = [pytest.mark.chain, pytest.mark.anyio]


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
def chain() -> Iterator[DevnetState]:
    with Devnet(backend="anvil") as state:
        yield state


class CountingRpc(Rpc):
    """An `Rpc` that counts, per JSON-RPC method, the calls it sends."""

    def __init__(self, url: str) -> None:
        super().__init__(url)
        self.sent: Counter[str] = Counter()

    async def _send(self, calls: list[tuple[str, list[Any]]]) -> list[Any]:
        self.sent.update(method for method, _ in calls)
        return await super()._send(calls)


async def test_pending_transactions_are_not_polled_one_by_one_every_tick(chain: DevnetState) -> None:
    rpc = CountingRpc(chain.rpc_url)
    try:
        sender = TxSender(rpc, chain.accounts[7].private_key, chain_id=chain.chain_id)
        usdc = to_checksum_address(chain.contracts["usdc"])
        data = keccak(text="balanceOf(address)")[:4] + abi_encode(["address"], [sender.address])
        await rpc.request("evm_setAutomine", [False])
        hashes = [await sender.send(usdc, data, gas=60_000) for _ in range(8)]
        waits = [asyncio.create_task(rpc.wait_for_receipt(h, timeout=20)) for h in hashes]
        await asyncio.sleep(0.6)  # ~200 poll ticks at the default 3 ms while nothing is mined
        assert not any(w.done() for w in waits)
        pending_calls = rpc.sent["eth_getTransactionReceipt"]
        # each hash asked about when it started waiting, once more the tick after (the node may order a
        # batch's head and receipt either way), and in a sweep every 30 ticks; the other ticks of the ~200
        # only ask for the head (polling each hash every tick made ~1,600 receipt calls here)
        assert pending_calls <= 10 * len(hashes), pending_calls
        assert rpc.sent["eth_blockNumber"] >= 10

        await rpc.request("evm_mine", [])  # one block holds all eight
        receipts = await asyncio.wait_for(asyncio.gather(*waits), 10)
        assert [r.transaction_hash for r in receipts] == hashes and all(r.ok for r in receipts)
        assert len({r.block_number for r in receipts}) == 1
    finally:
        await rpc.request("evm_setAutomine", [True])
        await rpc.aclose()


async def test_a_transaction_mined_at_once_is_found_on_the_first_poll(chain: DevnetState) -> None:
    rpc = CountingRpc(chain.rpc_url)
    try:
        sender = TxSender(rpc, chain.accounts[8].private_key, chain_id=chain.chain_id)
        usdc = to_checksum_address(chain.contracts["usdc"])
        data = keccak(text="balanceOf(address)")[:4] + abi_encode(["address"], [sender.address])
        receipt = await sender.transact(usdc, data, gas=60_000, timeout=10)  # automine: in a block at once
        assert receipt.ok
        assert rpc.sent["eth_getTransactionReceipt"] == 1
    finally:
        await rpc.aclose()
