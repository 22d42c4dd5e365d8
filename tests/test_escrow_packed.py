"""The packed batch of `AgentEscrow.settlePacked` (`escrow.payments._packed`): the encoder round-trips
through a decoder written from the layout, refuses what does not fit, and the contract decides a packed batch
exactly as the ABI `settle` of the same payments."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import msgspec
import pytest
from eth_utils.address import to_checksum_address
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from escrow import DevnetState
from escrow.chain._rpc import Rpc, TxSender
from escrow.payments._escrow import AgentEscrow, Erc20
from escrow.payments._grants import deposit, relay_grant, sign_grant_offline
from escrow.payments._packed import pack_batch, unpack_batch
from x402 import LocalSigner
from x402._escrow import EscrowPayload, EscrowPayment, escrow_domain, sign_payment

POOL = [to_checksum_address(bytes([i]) * 20) for i in range(1, 6)]
addresses = st.one_of(
    st.sampled_from(POOL), st.binary(min_size=20, max_size=20).map(lambda b: to_checksum_address(b))
)


@st.composite
def payloads(draw: st.DrawFn) -> EscrowPayload:
    payment = EscrowPayment(
        payer=draw(addresses),
        payee=draw(addresses),
        token=draw(addresses),
        amount=str(draw(st.integers(0, 2**96 - 1))),
        nonce=str(draw(st.integers(0, 2**256 - 1))),
        deadline=str(draw(st.integers(0, 2**32 - 1))),
        epoch=draw(st.integers(0, 2**32 - 1)),
    )
    signature = draw(st.one_of(st.binary(min_size=65, max_size=65), st.binary(max_size=300)))
    return EscrowPayload(signature="0x" + signature.hex(), payment=payment)


@settings(max_examples=300, deadline=None)
@given(batch=st.lists(payloads(), max_size=40))
def test_packed_batch_round_trips(batch: list[EscrowPayload]) -> None:
    packed = pack_batch(batch)
    assert packed is not None
    assert unpack_batch(packed) == batch
    # Each address is named once per batch: the table is the distinct addresses, 20 bytes each.
    distinct = {a for p in batch for a in (p.payment.payer, p.payment.payee, p.payment.token)}
    sigs = sum(len(p.signature) // 2 - 1 for p in batch)
    assert len(packed) == 3 + 20 * len(distinct) + 57 * len(batch) + sigs


@settings(max_examples=100, deadline=None)
@given(batch=st.lists(payloads(), min_size=1, max_size=10), cut=st.integers(1, 200))
def test_a_cut_batch_does_not_decode(batch: list[EscrowPayload], cut: int) -> None:
    packed = pack_batch(batch)
    assert packed is not None
    with pytest.raises(ValueError):
        unpack_batch(packed[: max(0, len(packed) - cut)])
    with pytest.raises(ValueError):
        unpack_batch(packed + b"\x00")


@pytest.mark.parametrize(
    "field",
    [
        {"amount": str(2**96)},
        {"deadline": str(2**32)},
        {"amount": str(2**256 - 1)},
        {"nonce": str(2**256)},
        {"epoch": 2**32},
    ],
)
def test_values_that_do_not_fit_have_no_packed_form(field: dict[str, Any]) -> None:
    base = EscrowPayment(
        payer=POOL[0], payee=POOL[1], token=POOL[2], amount="1", nonce="1", deadline="1", epoch=1
    )
    payment = msgspec_replace(base, **field)
    assert pack_batch([EscrowPayload(signature="0x" + "11" * 65, payment=payment)]) is None


def test_more_than_255_addresses_have_no_packed_form() -> None:
    def one(i: int) -> EscrowPayload:
        payer = to_checksum_address(i.to_bytes(20, "big"))
        payment = EscrowPayment(
            payer=payer, payee=POOL[0], token=POOL[1], amount="1", nonce="1", deadline="1", epoch=0
        )
        return EscrowPayload(signature="0x" + "11" * 65, payment=payment)

    assert pack_batch([one(i) for i in range(1, 254)]) is not None  # 253 payers + payee + token = 255
    assert pack_batch([one(i) for i in range(1, 255)]) is None


def msgspec_replace(payment: EscrowPayment, **changes: Any) -> EscrowPayment:
    return msgspec.structs.replace(payment, **changes)


# -- against the contract -------------------------------------------------------------------------------


@dataclass
class Chain:
    rpc_url: str
    chain_id: int
    escrow: str
    token: str
    payer: LocalSigner
    session: LocalSigner
    payees: list[str]


async def _setup(net: DevnetState) -> Chain:
    rpc = Rpc(net.rpc_url)
    try:
        owner, relayer, session = LocalSigner.random(), LocalSigner.random(), LocalSigner.random()
        for who in (owner, relayer):
            await rpc.request("anvil_setBalance", [who.address, hex(10**21)])
        escrow = await AgentEscrow.deploy(rpc, "0x" + relayer._key.secret.hex())
        usdc = Erc20(rpc, net.contracts["usdc"])
        owner_tx = TxSender(rpc, "0x" + owner._key.secret.hex(), chain_id=net.chain_id)
        relay_tx = TxSender(rpc, "0x" + relayer._key.secret.hex(), chain_id=net.chain_id)
        await owner_tx.transact(usdc.address, usdc.abi.encode("mint", owner.address, 10**9), gas=100_000)
        await deposit(escrow, owner_tx, usdc.address, 50_000)
        payees = [LocalSigner.random().address for _ in range(3)]
        signed = sign_grant_offline(
            owner,
            chain_id=net.chain_id,
            escrow=escrow.address,
            signer=session.address,
            token=usdc.address,
            max_per_call=5_000,
            budget=20_000,
            valid_until=int(time.time()) + 86_400,
            payees=payees[:2],
        )
        await relay_grant(escrow, relay_tx, signed)
        return Chain(net.rpc_url, net.chain_id, escrow.address, usdc.address, owner, session, payees)
    finally:
        await rpc.aclose()


@pytest.fixture(scope="module")
def chain(devnet: DevnetState) -> Iterator[Chain]:
    yield asyncio.run(_setup(devnet))


entries = st.tuples(
    st.sampled_from(["session", "payer", "garbage"]),
    st.integers(0, 2),  # payee: the third is not on the grant's list
    st.integers(0, 7_000),  # amount: some above the cap, the budget or the deposit
    st.integers(0, 5),  # nonce: collisions inside the batch
    st.sampled_from([0, 1, 2]),  # epoch
    st.booleans(),  # expired
)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(batch=st.lists(entries, min_size=1, max_size=12))
def test_the_contract_decides_a_packed_batch_as_settle(
    chain: Chain, batch: list[tuple[str, int, int, int, int, bool]]
) -> None:
    domain = escrow_domain(chain.chain_id, chain.escrow)
    now = int(time.time())
    payloads = []
    for who, payee, amount, nonce, epoch, expired in batch:
        signer = chain.payer if who == "payer" else chain.session
        payload = sign_payment(
            signer,
            domain,
            payer=chain.payer.address,
            payee=chain.payees[payee],
            token=chain.token,
            amount=amount,
            nonce=nonce,
            deadline=now - 3_600 if expired else now + 3_600,
            epoch=epoch,
        )
        if who == "garbage":
            payload = EscrowPayload(signature="0x" + "00" * 65, payment=payload.payment)
        payloads.append(payload)

    async def reasons() -> tuple[list[int], list[int]]:
        rpc = Rpc(chain.rpc_url)
        try:
            escrow = AgentEscrow(rpc, chain.escrow)
            assert escrow.settle_calldata(payloads) == escrow.abi.encode("settlePacked", pack_batch(payloads))
            packed = await rpc.call(chain.escrow, escrow.settle_calldata(payloads))
            plain = await rpc.call(chain.escrow, escrow.abi_settle_calldata(payloads))
            return list(escrow.abi.decode("settlePacked", packed)[0]), list(
                escrow.abi.decode("settle", plain)[0]
            )
        finally:
            await rpc.aclose()

    packed, plain = asyncio.run(reasons())
    assert packed == plain
    assert len(packed) == len(batch)
