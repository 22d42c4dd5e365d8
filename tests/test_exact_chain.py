"""The chain side of `exact` (escrow.payments._exact, escrow.chain._rpc) against a real devnet:
verification routed by code,
simulation reasons, settlement and the relayer's nonce handling under concurrency."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import pytest
from eth_abi.abi import encode as abi_encode
from eth_utils.address import to_checksum_address
from eth_utils.crypto import keccak

from escrow import DevnetState, load_artifact
from escrow.chain._rpc import ChainError, RevertError, Rpc, TxSender
from escrow.payments._exact import ExactEvm, ExactRejected
from x402 import Eip712Domain, ExactEvmPayload, LocalSigner, Reason, sign_transfer_authorization

pytestmark = [pytest.mark.chain, pytest.mark.anyio]

RELAYER = 8  # devnet account used only by this module


class World:
    def __init__(self, devnet: DevnetState, rpc: Rpc) -> None:
        self.rpc = rpc
        self.relayer = TxSender(rpc, devnet.accounts[RELAYER].private_key, chain_id=devnet.chain_id)
        self.exact = ExactEvm(rpc, self.relayer)
        self.usdc = to_checksum_address(devnet.contracts["usdc"])
        self.domain = Eip712Domain(devnet.usdc_name, devnet.usdc_version, devnet.chain_id, self.usdc)

    async def mint(self, to: str, amount: int) -> None:
        data = keccak(text="mint(address,uint256)")[:4] + abi_encode(["address", "uint256"], [to, amount])
        await self.relayer.transact(self.usdc, data, gas=120_000)

    async def balance(self, who: str) -> int:
        data = keccak(text="balanceOf(address)")[:4] + abi_encode(["address"], [who])
        return int.from_bytes(await self.rpc.call(self.usdc, data), "big")

    def sign(
        self, signer: LocalSigner, to: str, value: int = 1000, *, valid_before: int = 0, valid_after: int = 0
    ) -> ExactEvmPayload:
        deadline = valid_before or int(time.time()) + 60
        return sign_transfer_authorization(
            signer, self.domain, to=to, value=value, valid_before=deadline, valid_after=valid_after
        )


@pytest.fixture
async def world(devnet: DevnetState) -> AsyncIterator[World]:
    rpc = Rpc(devnet.rpc_url)
    try:
        yield World(devnet, rpc)
    finally:
        await rpc.aclose()


async def test_eoa_payment_verifies_and_settles_with_a_transfer_event(world: World) -> None:
    payer, payee = LocalSigner.random(), LocalSigner.random().address
    await world.mint(payer.address, 5000)
    payload = world.sign(payer, payee)
    await world.exact.verify(world.domain, payload)
    tx_hash = await world.exact.settle(world.domain, payload)
    receipt = await world.rpc.get_receipt(tx_hash)
    assert receipt is not None and receipt.ok
    assert await world.balance(payee) == 1000 and await world.balance(payer.address) == 4000
    with pytest.raises(ExactRejected) as info:  # the nonce is now used on chain
        await world.exact.verify(world.domain, payload)
    assert info.value.code == Reason.NONCE_ALREADY_USED


@pytest.mark.parametrize(
    ("case", "reason"),
    [
        ("unfunded", Reason.INSUFFICIENT_BALANCE),
        ("wrong-signer", Reason.SIGNATURE),
        ("wrong-domain", Reason.SIGNATURE),
    ],
)
async def test_verification_failures(world: World, case: str, reason: str) -> None:
    payer, payee = LocalSigner.random(), LocalSigner.random().address
    if case != "unfunded":
        await world.mint(payer.address, 5000)
    payload = world.sign(payer, payee)
    if case == "wrong-signer":
        forged = world.sign(LocalSigner.random(), payee)
        payload = ExactEvmPayload(signature=forged.signature, authorization=payload.authorization)
    if case == "wrong-domain":
        other = Eip712Domain("Another Coin", "2", world.domain.chain_id, world.usdc)
        payload = sign_transfer_authorization(
            payer, other, to=payee, value=1000, valid_before=int(time.time()) + 60
        )
    with pytest.raises(ExactRejected) as info:
        await world.exact.verify(world.domain, payload)
    assert info.value.code == reason


async def test_simulation_sees_the_chain_clock(world: World) -> None:
    payer, payee = LocalSigner.random(), LocalSigner.random().address
    await world.mint(payer.address, 5000)
    with pytest.raises(ExactRejected) as info:
        await world.exact.verify(world.domain, world.sign(payer, payee, valid_before=1))
    assert info.value.code == Reason.VALID_BEFORE
    with pytest.raises(ExactRejected) as info:
        await world.exact.verify(world.domain, world.sign(payer, payee, valid_after=2**40))
    assert info.value.code == Reason.VALID_AFTER


async def _wallet(world: World, owner: str) -> str:
    initcode = bytes.fromhex(load_artifact("ERC1271Wallet").bytecode[2:]) + abi_encode(["address"], [owner])
    receipt = await world.relayer.transact(None, initcode, gas=2_000_000)
    assert receipt.contract_address is not None
    return to_checksum_address(receipt.contract_address)


async def test_erc1271_payer_is_checked_strictly_through_the_wallet(world: World) -> None:
    owner, payee = LocalSigner.random(), LocalSigner.random().address
    wallet = await _wallet(world, owner.address)
    await world.mint(wallet, 5000)

    class AsWallet:
        address = wallet

        def __init__(self, key: LocalSigner) -> None:
            self.key = key

        def sign_hash(self, digest: bytes) -> bytes:
            return self.key.sign_hash(digest)

    good = world.sign(AsWallet(owner), payee)  # type: ignore[arg-type]
    await world.exact.verify(world.domain, good)
    bad = world.sign(AsWallet(LocalSigner.random()), payee)  # type: ignore[arg-type]
    with pytest.raises(ExactRejected) as info:
        await world.exact.verify(world.domain, bad)
    assert info.value.code == Reason.SIGNATURE
    # The owner's key alone is no payer: an EOA signature for `from = owner` recovers fine, but the
    # wallet (not the owner) holds the funds.
    await world.exact.settle(world.domain, good)
    assert await world.balance(payee) == 1000 and await world.balance(wallet) == 4000


async def test_concurrent_sends_never_share_a_nonce(world: World) -> None:
    payee = LocalSigner.random().address
    data = keccak(text="mint(address,uint256)")[:4] + abi_encode(["address", "uint256"], [payee, 1])
    receipts = await asyncio.gather(
        *(world.relayer.transact(world.usdc, data, gas=120_000) for _ in range(40))
    )
    assert all(r.ok for r in receipts)
    assert len({r.transaction_hash for r in receipts}) == 40
    assert await world.balance(payee) == 40


async def test_the_relayer_resyncs_its_nonce_after_an_error(world: World) -> None:
    data = keccak(text="mint(address,uint256)")[:4] + abi_encode(
        ["address", "uint256"], [world.relayer.address, 1]
    )
    await world.relayer.transact(world.usdc, data, gas=120_000)
    world.relayer._nonce = 0  # stale: the node refuses it ("nonce too low")
    with pytest.raises(ChainError):
        await world.relayer.send(world.usdc, data, gas=120_000)
    receipt = await world.relayer.transact(world.usdc, data, gas=120_000)
    assert receipt.ok


async def test_reverting_calls_carry_their_revert_data(world: World) -> None:
    data = keccak(text="transfer(address,uint256)")[:4] + abi_encode(
        ["address", "uint256"], [world.usdc, 10**30]
    )
    with pytest.raises(RevertError) as info:
        await world.rpc.call(world.usdc, data, sender=LocalSigner.random().address)
    assert info.value.data[:4] == keccak(text="ERC20InsufficientBalance(address,uint256,uint256)")[:4]
