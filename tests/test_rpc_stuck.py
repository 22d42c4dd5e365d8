"""Stuck transactions (issue 9 item 13): a settlement the node does not mine is replaced at the same nonce
with EIP-1559-bumped fees, every version is kept and awaited, and the payment lands exactly once.

Each test runs its own anvil (`Devnet()`): it pauses mining and moves the base fee, which would disturb the
shared session devnet.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest
from eth_abi.abi import encode as abi_encode
from eth_utils.address import to_checksum_address
from eth_utils.crypto import keccak

from escrow import Devnet, DevnetState
from escrow.chain._rpc import ReceiptTimeout, Rpc, TxSender
from escrow.payments._exact import ExactEvm
from escrow.payments._exact_settler import ExactPayment, ExactSettler, encode_payment
from gateway import MemoryStore
from gateway._store import Settlement
from x402 import Eip712Domain, ExactEvmPayload, LocalSigner, sign_transfer_authorization

pytestmark = [pytest.mark.chain, pytest.mark.anyio]

PRICE = 1000
RELAYER = 5
TRANSFER = "0x" + keccak(text="Transfer(address,address,uint256)").hex()


@pytest.fixture
def chain() -> Iterator[DevnetState]:
    with Devnet(backend="anvil") as state:
        yield state


class Node:
    def __init__(self, devnet: DevnetState, rpc: Rpc, **sender: Any) -> None:
        self.rpc = rpc
        self.relayer = TxSender(rpc, devnet.accounts[RELAYER].private_key, chain_id=devnet.chain_id, **sender)
        self.usdc = to_checksum_address(devnet.contracts["usdc"])
        self.domain = Eip712Domain(devnet.usdc_name, devnet.usdc_version, devnet.chain_id, self.usdc)

    async def mint(self, to: str, amount: int) -> None:
        data = keccak(text="mint(address,uint256)")[:4] + abi_encode(["address", "uint256"], [to, amount])
        await self.relayer.transact(self.usdc, data, gas=120_000)

    async def balance(self, who: str) -> int:
        data = keccak(text="balanceOf(address)")[:4] + abi_encode(["address"], [who])
        return int.from_bytes(await self.rpc.call(self.usdc, data), "big")

    async def payer(self) -> LocalSigner:
        payer = LocalSigner.random()
        await self.mint(payer.address, 10 * PRICE)
        return payer

    def sign(self, payer: LocalSigner, payee: str) -> ExactEvmPayload:
        deadline = int(time.time()) + 300
        return sign_transfer_authorization(payer, self.domain, to=payee, value=PRICE, valid_before=deadline)

    async def pause_and_underprice(self) -> None:
        """Stop mining; the next block's base fee is set far above the relayer's offer once it has sent."""
        await self.rpc.request("evm_setAutomine", [False])
        self._before = set(self.relayer._sent)

    async def first_sent(self) -> str:
        for _ in range(500):
            new = [h for h in self.relayer._sent if h not in self._before]
            if new:
                return new[0]
            await asyncio.sleep(0.01)
        raise AssertionError("the relayer never sent")

    async def mine_underpriced_block(self) -> None:
        """Mine one block whose base fee the first version cannot pay: it stays out of the block."""
        offered = 2 * await self.rpc.gas_price() + 10**9  # what the relayer's first version pays at most
        await self.rpc.request("anvil_setNextBlockBaseFeePerGas", [hex(10 * offered)])
        await self.rpc.request("evm_mine", [])

    async def resume(self) -> None:
        await self.rpc.request("evm_setAutomine", [True])
        await self.rpc.request("evm_mine", [])

    async def transfers_to(self, payee: str) -> int:
        logs = await self.rpc.request(
            "eth_getLogs",
            [{"address": self.usdc, "fromBlock": "0x0", "toBlock": "latest", "topics": [TRANSFER]}],
        )
        return sum(1 for log in logs if log["topics"][2][-40:].lower() == payee[2:].lower())


@pytest.fixture
async def node(chain: DevnetState) -> AsyncIterator[Node]:
    rpc = Rpc(chain.rpc_url)
    try:
        yield Node(chain, rpc, replace_after=0.5)
    finally:
        await rpc.request("evm_setAutomine", [True])
        await rpc.aclose()


async def _until(predicate: Any, what: str) -> None:
    for _ in range(1000):
        if predicate():
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"timed out waiting until {what}")


async def test_an_underpriced_settlement_is_replaced_and_lands_once(node: Node) -> None:
    payer, payee = await node.payer(), LocalSigner.random().address
    exact = ExactEvm(node.rpc, node.relayer, receipt_timeout=30.0)
    await node.pause_and_underprice()
    settling = asyncio.create_task(exact.settle(node.domain, node.sign(payer, payee)))
    first = await node.first_sent()
    await node.mine_underpriced_block()
    assert await node.rpc.get_receipt(first) is None  # underpriced: left out of the block
    await _until(lambda: node.relayer.replaced >= 1, "the relayer replaced the stuck transaction")
    await node.resume()
    landed = await asyncio.wait_for(settling, 30)

    assert landed != first
    hashes = node.relayer.hashes(landed)
    assert hashes[0] == first and hashes[-1] == landed  # the replaced hash is reported with the landed one
    assert await node.rpc.get_receipt(first) is None  # the same nonce cannot land twice
    assert await node.balance(payee) == PRICE  # paid exactly once
    assert await node.balance(payer.address) == 9 * PRICE
    assert await node.transfers_to(payee) == 1


async def test_the_settler_settles_by_the_replacement_and_reports_the_replaced_hash(node: Node) -> None:
    payer, payee = await node.payer(), LocalSigner.random().address
    store = MemoryStore()
    settler = ExactSettler(store, ExactEvm(node.rpc, node.relayer), max_age=0, receipt_timeout=30.0)
    payload = node.sign(payer, payee)
    d = node.domain
    body = ExactPayment(
        name=d.name, version=d.version, chain_id=d.chain_id, asset=d.verifying_contract, payload=payload
    )
    key = f"exact:{payer.address}:{payload.authorization.nonce}"
    await store.enqueue(
        Settlement(
            key=key,
            kind="exact",
            payload=encode_payment(body),
            payer=payer.address,
            amount=PRICE,
            created_at=time.time(),
        )
    )
    await node.pause_and_underprice()
    settling = asyncio.create_task(settler.drain())
    first = await node.first_sent()
    await node.mine_underpriced_block()
    await _until(lambda: node.relayer.replaced >= 1, "the relayer replaced the stuck transaction")
    await node.resume()
    (outcome,) = await asyncio.wait_for(settling, 30)

    assert outcome.status == "settled"
    assert outcome.replaced == (first,) and outcome.tx_hash not in (first, "")
    stored = await store.get_settlement(key)
    assert stored is not None and stored.state == "settled" and stored.tx_hash == outcome.tx_hash
    assert await node.balance(payee) == PRICE
    assert await node.transfers_to(payee) == 1
    assert await settler.drain() == []  # nothing left to send: it is not paid a second time
    assert await node.balance(payee) == PRICE


async def test_no_replacement_past_the_fee_cap_and_the_timeout_names_every_hash(chain: DevnetState) -> None:
    rpc = Rpc(chain.rpc_url)
    try:
        # The cap is what the first version offers: a +12 % bump would exceed it, so nothing is replaced.
        price = await rpc.gas_price()
        node = Node(chain, rpc, replace_after=0.3, fee_cap=2 * price + 10**9)
        node.relayer = TxSender(
            rpc,
            chain.accounts[RELAYER + 1].private_key,
            chain_id=chain.chain_id,
            replace_after=0.3,
            fee_cap=2 * price + 10**9,
        )  # its stuck nonce stays here
        payer, payee = await node.payer(), LocalSigner.random().address
        await node.pause_and_underprice()
        data, gas = ExactEvm(rpc, node.relayer).transfer(node.sign(payer, payee))
        sent = await node.relayer.send(node.usdc, data, gas=gas)
        await node.mine_underpriced_block()
        with pytest.raises(ReceiptTimeout) as info:
            await node.relayer.wait_for_receipt(sent, timeout=1.5)
        assert info.value.tx_hashes == (sent,) and node.relayer.replaced == 0
    finally:
        await rpc.request("evm_setAutomine", [True])
        await rpc.request("evm_mine", [])
        await rpc.aclose()
