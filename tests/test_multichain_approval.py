"""One owner signature for many chains, on two anvils with distinct chain ids (real contracts).

The owner signs one `MultichainApproval` offline: an escrow grant and a session-key install for the same key
on each chain. Relayed per chain, it makes the key live on both; the key's payments settle on each chain; what
is signed for one chain (payment, grant, install, user operation, leaf) is refused on the other; a revoke on
one chain leaves the other live; one more signature revokes everywhere.
"""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass

import pytest

from escrow import (
    AgentAccount,
    AgentEscrow,
    ArgRule,
    Bundler,
    Call,
    CallPermission,
    Erc20,
    MultichainApproval,
    MultichainError,
    SessionKey,
    SessionPolicy,
    SignedMultichainApproval,
    TxSender,
    UserOpRejected,
    relay_grant,
    relay_multichain,
    relay_revoke,
    sign_grant_offline,
    sign_revoke_offline,
)
from escrow._multichain import _calldata
from escrow.chain._rpc import RevertError, Rpc
from escrow.devnet._devnet import DevnetChain
from tests._multichain_sides import ChainSide, two_chains
from x402 import LocalSigner
from x402._escrow import EscrowPayload, escrow_domain, sign_payment

pytestmark = [pytest.mark.chain, pytest.mark.anyio]

ETH = 10**18
DEPOSIT = 10**6
PRICE = 1_000
KEY_CAP = 5_000  # what one session-key user operation may transfer from the account


@pytest.fixture(scope="module")
def chains() -> Iterator[list[DevnetChain]]:
    yield from two_chains()


class Side(ChainSide):
    def pay(self, key: LocalSigner, payer: str, payee: str, *, nonce: int, epoch: int = 1) -> EscrowPayload:
        return sign_payment(
            key,
            escrow_domain(self.chain_id, self.escrow.address),
            payer=payer,
            payee=payee,
            token=self.usdc.address,
            amount=PRICE,
            nonce=nonce,
            deadline=2**40,
            epoch=epoch,
        )


@dataclass
class World:
    owner: LocalSigner
    key: LocalSigner
    payee: str
    sides: list[Side]
    policy: SessionPolicy


async def _side(chain: DevnetChain, owner: str, salt: int) -> Side:
    rpc = Rpc(chain.rpc_url)
    relayer_key = LocalSigner.random()
    await rpc.request("anvil_setBalance", [relayer_key.address, hex(1_000 * ETH)])
    relayer = TxSender(rpc, "0x" + relayer_key._key.secret.hex(), chain_id=chain.chain_id)
    escrow = AgentEscrow(rpc, chain.contracts["escrow"])
    usdc = Erc20(rpc, chain.contracts["usdc"])
    account = await AgentAccount.counterfactual(
        rpc, factory=chain.contracts["account_factory"], owner=owner, salt=salt
    )
    side = Side(chain, rpc, relayer, escrow, usdc, Bundler(rpc, relayer, chain_id=chain.chain_id), account)
    # The owner's escrow deposit, funded by someone else (the owner key stays offline throughout).
    await side.send(usdc.address, _mint(relayer.address, 2 * DEPOSIT))
    await side.send(usdc.address, usdc.approve_calldata(escrow.address, DEPOSIT))
    await side.send(escrow.address, escrow.abi.encode("depositFor", owner, usdc.address, DEPOSIT))
    await account.deploy(relayer)
    await rpc.request("anvil_setBalance", [account.address, hex(10 * ETH)])
    await side.send(usdc.address, usdc.transfer_calldata(account.address, DEPOSIT // 2))
    return side


def _mint(to: str, amount: int) -> bytes:
    from eth_abi.abi import encode
    from eth_utils.crypto import keccak

    return keccak(text="mint(address,uint256)")[:4] + encode(["address", "uint256"], [to, amount])


@pytest.fixture
async def world(chains: list[DevnetChain]) -> AsyncIterator[World]:
    owner, key = LocalSigner.random(), LocalSigner.random()
    payee = LocalSigner.random().address
    salt = secrets.randbits(64)
    sides = [await _side(c, owner.address, salt) for c in chains]
    usdc = sides[0].usdc.address  # the same address on both chains (CREATE2)
    policy = SessionPolicy(
        permissions=(
            CallPermission.to(usdc, "transfer(address,uint256)", ArgRule.less_or_equal(1, KEY_CAP)),
        ),
        gas_budget=ETH,
    )
    try:
        yield World(owner, key, payee, sides, policy)
    finally:
        for side in sides:
            await side.rpc.aclose()


async def _now(side: Side) -> int:
    return await side.rpc.block_timestamp()


async def _approve_everywhere(w: World) -> SignedMultichainApproval:
    approval = MultichainApproval()
    deadline = await _now(w.sides[0]) + 3600
    for side in w.sides:
        approval.grant(
            chain_id=side.chain_id,
            escrow=side.escrow.address,
            payer=w.owner.address,
            signer=w.key.address,
            token=side.usdc.address,
            max_per_call=2 * PRICE,
            budget=50 * PRICE,
            valid_until=deadline,
            epoch=1,
        )
        approval.install_session_key(
            chain_id=side.chain_id,
            account=side.account.address,
            key=w.key.address,
            policy=w.policy,
            deadline=deadline,
        )
    signed = approval.sign(w.owner)  # the one signature
    signed.verify()
    return signed


async def _live(w: World, side: Side) -> bool:
    return (await side.escrow.grant_of(w.owner.address, w.key.address)).live


async def test_one_signature_makes_the_key_live_on_both_chains_and_payments_settle(world: World) -> None:
    w = world
    signed = await _approve_everywhere(w)
    ids = [side.chain_id for side in w.sides]
    assert len(set(ids)) == 2 and signed.chain_ids == sorted(ids) and len(signed.for_chain(ids[0])) == 2
    for side in w.sides:
        assert not await _live(w, side)
        receipts = await relay_multichain(side.relayer, signed)
        assert len(receipts) == 2
    for i, side in enumerate(w.sides):
        grant = await side.escrow.grant_of(w.owner.address, w.key.address)
        assert (grant.epoch, grant.budget, grant.max_per_call) == (1, 50 * PRICE, 2 * PRICE)
        assert (await side.account.session_key(w.key.address)).installed
        assert await side.account.session_policy(w.key.address) == w.policy

        # A session-key payment settles on this chain, exactly.
        before = await side.usdc.balance_of(w.payee)
        await side.settle(side.pay(w.key, w.owner.address, w.payee, nonce=i))
        assert await side.usdc.balance_of(w.payee) - before == PRICE
        assert await side.escrow.deposit_of(w.owner.address, side.usdc.address) == DEPOSIT - PRICE

        # And a session-key user operation runs on this chain's account.
        result = await side.account.execute(
            [Call(side.usdc.address, 0, side.usdc.transfer_calldata(w.payee, PRICE))],
            signer=SessionKey(w.key),
            bundler=side.bundler,
        )
        assert result.success
        assert await side.usdc.balance_of(w.payee) - before == 2 * PRICE


async def test_what_is_signed_for_one_chain_is_refused_on_the_other(world: World) -> None:
    w = world
    a, b = w.sides
    signed = await _approve_everywhere(w)
    await relay_multichain(a.relayer, signed)

    # The leaves of chain A, sent to chain B's contracts (same addresses), prove nothing there.
    assert signed.for_chain(b.chain_id) and not await _live(w, b)
    with pytest.raises(MultichainError, match="relayed on chain") as wrong:
        await relay_multichain(b.relayer, signed, entries=signed.for_chain(a.chain_id))
    assert wrong.value.code == "multichain_wrong_chain"
    for entry in signed.for_chain(a.chain_id):
        data, abi = _calldata(signed, entry)
        tx = {"from": b.relayer.address, "to": entry.action.contract, "data": "0x" + data.hex()}
        with pytest.raises(RevertError) as refused:
            await b.rpc.request("eth_estimateGas", [tx])
        decoded = abi.decode_error(refused.value.data)
        assert decoded is not None and decoded[0] == "MultichainProofInvalid"
    assert not await _live(w, b)
    assert not (await b.account.session_key(w.key.address)).installed

    # An install leaf for an account not deployed yet is not sent (a call to no code would "succeed").
    late = MultichainApproval().install_session_key(
        chain_id=b.chain_id,
        account=LocalSigner.random().address,
        key=w.key.address,
        policy=w.policy,
        deadline=2**40,
    )
    with pytest.raises(MultichainError) as missing:
        await relay_multichain(b.relayer, late.sign(w.owner))
    assert missing.value.code == "multichain_no_contract"

    # A single-chain grant signed for chain A does not verify on chain B either.
    grant_a = sign_grant_offline(
        w.owner,
        chain_id=a.chain_id,
        escrow=a.escrow.address,
        signer=w.key.address,
        token=a.usdc.address,
        max_per_call=PRICE,
        budget=PRICE,
        valid_until=2**32 - 1,
        epoch=2,
    )
    forged = type(grant_a)(
        chain_id=b.chain_id, escrow=grant_a.escrow, grant=grant_a.grant, signature=grant_a.signature
    )
    with pytest.raises(RevertError):
        await relay_grant(b.escrow, b.relayer, forged)

    # Now chain B gets its own leaves; a payment the key signed for chain A does not settle on chain B.
    await relay_multichain(b.relayer, signed)
    payment_a = a.pay(w.key, w.owner.address, w.payee, nonce=7)
    reason, _ = await b.escrow.check(payment_a)
    assert reason != 0
    before = await b.usdc.balance_of(w.payee)
    await b.settle(payment_a)
    assert await b.usdc.balance_of(w.payee) == before
    assert not await b.escrow.nonce_used(w.key.address, 7)
    reason, signer = await a.escrow.check(payment_a)
    assert (reason, signer) == (0, w.key.address)

    # A user operation the key signed for chain A's account is refused by chain B's (same address).
    lane = await a.account.lanes.next_nonce(a.account.lanes.key(0))
    op = await a.account.prepare(
        [Call(a.usdc.address, 0, a.usdc.transfer_calldata(w.payee, PRICE))],
        signer=SessionKey(w.key),
        nonce=lane,
    )
    with pytest.raises(UserOpRejected) as rejected:
        await b.bundler.send(op)
    assert rejected.value.reason.startswith("AA24")
    assert (await a.bundler.send(op)).success


async def test_revoke_on_one_chain_leaves_the_other_live_and_revoke_everywhere_ends_both(
    world: World,
) -> None:
    w = world
    a, b = w.sides
    signed = await _approve_everywhere(w)
    for side in w.sides:
        await relay_multichain(side.relayer, signed)

    # Per chain: the existing single-chain revoke, on chain A only.
    revoke_a = sign_revoke_offline(
        w.owner, chain_id=a.chain_id, escrow=a.escrow.address, signer=w.key.address, epoch=1
    )
    await relay_revoke(a.escrow, a.relayer, revoke_a)
    assert not await _live(w, a) and await _live(w, b)
    before = await b.usdc.balance_of(w.payee)
    await b.settle(b.pay(w.key, w.owner.address, w.payee, nonce=1))
    assert await b.usdc.balance_of(w.payee) - before == PRICE
    reason, _ = await a.escrow.check(a.pay(w.key, w.owner.address, w.payee, nonce=1))
    assert reason != 0

    # Everywhere: one more signature, revoke leaves for both escrows and both accounts.
    everywhere = MultichainApproval()
    deadline = await _now(a) + 600
    for side in w.sides:
        everywhere.revoke_grant(
            chain_id=side.chain_id,
            escrow=side.escrow.address,
            payer=w.owner.address,
            signer=w.key.address,
            epoch=1,
        )
        everywhere.revoke_session_key(
            chain_id=side.chain_id, account=side.account.address, key=w.key.address, deadline=deadline
        )
    signed_revoke = everywhere.sign(w.owner)
    for side in w.sides:
        await relay_multichain(side.relayer, signed_revoke)
    for side in w.sides:
        assert not await _live(w, side)
        assert not (await side.account.session_key(w.key.address)).installed
        reason, _ = await side.escrow.check(side.pay(w.key, w.owner.address, w.payee, nonce=99))
        assert reason != 0
        with pytest.raises(UserOpRejected):
            await side.account.execute(
                [Call(side.usdc.address, 0, side.usdc.transfer_calldata(w.payee, PRICE))],
                signer=SessionKey(w.key),
                bundler=side.bundler,
            )
    # The original grant leaves, relayed again after the revoke, stay dead (epochs).
    with pytest.raises(MultichainError) as stale:
        await relay_multichain(b.relayer, signed, entries=signed.for_chain(b.chain_id)[:1])
    assert stale.value.code == "multichain_refused" and "EscrowStaleEpoch" in str(stale.value)


async def test_revoke_everywhere_also_stops_leaves_not_yet_relayed(world: World) -> None:
    w = world
    a, b = w.sides
    signed = await _approve_everywhere(w)
    await relay_multichain(a.relayer, signed)  # chain B's leaves are still in someone's hands

    revoke = MultichainApproval.revoking(signed, deadline=await _now(a) + 600).sign(w.owner)
    assert {type(e.action).__name__ for e in revoke.entries} == {
        "EscrowRevokeLeaf",
        "SessionKeyRevokeLeaf",
        "SessionKeyCancelLeaf",
    }
    sent = {side.chain_id: await relay_multichain(side.relayer, revoke) for side in w.sides}
    # A: the grant revoked, the key removed (its install nonce is used: no cancel). B: the grant's epoch
    # burnt, the install nonce cancelled (no key to remove).
    assert (len(sent[a.chain_id]), len(sent[b.chain_id])) == (2, 2)
    for side in w.sides:
        assert not await _live(w, side)
        assert not (await side.account.session_key(w.key.address)).installed
    # Chain B's original leaves, relayed late, are refused.
    for entry in signed.for_chain(b.chain_id):
        with pytest.raises(MultichainError) as late:
            await relay_multichain(b.relayer, signed, entries=[entry])
        assert late.value.code == "multichain_refused"
        assert "EscrowStaleEpoch" in str(late.value) or "OwnerApprovalNonceAlreadyUsed" in str(late.value)
    assert not await _live(w, b)
    assert not (await b.account.session_key(w.key.address)).installed
