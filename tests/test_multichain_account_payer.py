"""One offline owner signature, two chains, and the money in the owner's smart account (real contracts, two
anvils with distinct chain ids).

The orchestrator's funds live in its `AgentAccount` (same address on both chains), the owner key is offline.
One `MultichainApproval` signature installs the session key on each chain's account AND grants it an escrow
budget whose payer is the account. The key then moves money from the account into the escrow (a user
operation its policy allows) and signs payments from that deposit, which settle exactly on both chains.
What is signed for one account or one chain is refused for another.
"""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass

import msgspec
import pytest
from eth_abi.abi import encode
from eth_utils.crypto import keccak

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
    relay_multichain,
)
from escrow._multichain import EscrowGrantLeaf, MultichainEntry, _calldata
from escrow.chain._merkle import approval_digest
from escrow.chain._rpc import RevertError, Rpc
from escrow.devnet._devnet import DevnetChain
from tests._multichain_sides import ChainSide, two_chains
from x402 import LocalSigner
from x402._escrow import EscrowPayload, escrow_domain, sign_payment

pytestmark = [pytest.mark.chain, pytest.mark.anyio]

ETH = 10**18
FUNDS = 10**6  # what the account holds on each chain
TOP_UP = 200_000  # what the session key moves into the escrow
PRICE = 1_234
CAP = 2 * PRICE
BUDGET = 50 * PRICE


@pytest.fixture(scope="module")
def chains() -> Iterator[list[DevnetChain]]:
    yield from two_chains()


class Side(ChainSide):
    def pay(self, key: LocalSigner, payee: str, *, nonce: int, amount: int = PRICE) -> EscrowPayload:
        return sign_payment(
            key,
            escrow_domain(self.chain_id, self.escrow.address),
            payer=self.account.address,
            payee=payee,
            token=self.usdc.address,
            amount=amount,
            nonce=nonce,
            deadline=2**40,
            epoch=1,
        )


@dataclass
class World:
    owner: LocalSigner
    key: LocalSigner
    payee: str
    sides: list[Side]


def _mint(to: str, amount: int) -> bytes:
    return keccak(text="mint(address,uint256)")[:4] + encode(["address", "uint256"], [to, amount])


async def _side(chain: DevnetChain, owner: str, salt: int) -> Side:
    rpc = Rpc(chain.rpc_url)
    relayer_key = LocalSigner.random()
    await rpc.request("anvil_setBalance", [relayer_key.address, hex(1_000 * ETH)])
    relayer = TxSender(rpc, "0x" + relayer_key._key.secret.hex(), chain_id=chain.chain_id)
    account = await AgentAccount.counterfactual(
        rpc, factory=chain.contracts["account_factory"], owner=owner, salt=salt
    )
    side = Side(
        chain,
        rpc,
        relayer,
        AgentEscrow(rpc, chain.contracts["escrow"]),
        Erc20(rpc, chain.contracts["usdc"]),
        Bundler(rpc, relayer, chain_id=chain.chain_id),
        account,
    )
    await account.deploy(relayer)  # anyone deploys it; the owner never sends a transaction
    await rpc.request("anvil_setBalance", [account.address, hex(ETH)])  # gas for its user operations
    await side.send(side.usdc.address, _mint(account.address, FUNDS))
    return side


@pytest.fixture
async def world(chains: list[DevnetChain]) -> AsyncIterator[World]:
    owner, key = LocalSigner.random(), LocalSigner.random()
    salt = secrets.randbits(64)
    sides = [await _side(c, owner.address, salt) for c in chains]
    try:
        yield World(owner, key, LocalSigner.random().address, sides)
    finally:
        for side in sides:
            await side.rpc.aclose()


def _top_up_policy(side: Side) -> SessionPolicy:
    """The key may only move the account's money into the escrow (approve + deposit, capped): from there it
    leaves only as the escrow grant allows."""
    usdc, escrow = side.usdc.address, side.escrow.address
    return SessionPolicy(
        permissions=(
            CallPermission.to(
                usdc, "approve(address,uint256)", ArgRule.equal(0, escrow), ArgRule.less_or_equal(1, TOP_UP)
            ),
            CallPermission.to(
                escrow, "deposit(address,uint256)", ArgRule.equal(0, usdc), ArgRule.less_or_equal(1, TOP_UP)
            ),
        ),
        gas_budget=ETH // 10,
    )


async def _approve(w: World, *, payer: str | None = None) -> SignedMultichainApproval:
    """On each chain: install the key on the account, grant it a budget with the account as payer. Signed
    once, offline."""
    approval = MultichainApproval()
    deadline = await w.sides[0].rpc.block_timestamp() + 3600
    for side in w.sides:
        approval.install_session_key(
            chain_id=side.chain_id,
            account=side.account.address,
            key=w.key.address,
            policy=_top_up_policy(side),
            deadline=deadline,
        )
        approval.grant(
            chain_id=side.chain_id,
            escrow=side.escrow.address,
            payer=payer or side.account.address,
            signer=w.key.address,
            token=side.usdc.address,
            max_per_call=CAP,
            budget=BUDGET,
            valid_until=deadline,
        )
    signed = approval.sign(w.owner)
    signed.verify()
    return signed


async def _top_up(w: World, side: Side) -> None:
    """The session key moves `TOP_UP` from the account into the account's escrow deposit."""
    usdc, escrow = side.usdc, side.escrow
    result = await side.account.execute(
        [
            Call(usdc.address, 0, usdc.approve_calldata(escrow.address, TOP_UP)),
            Call(escrow.address, 0, escrow.abi.encode("deposit", usdc.address, TOP_UP)),
        ],
        signer=SessionKey(w.key),
        bundler=side.bundler,
    )
    assert result.success


async def test_one_owner_signature_installs_grants_and_payments_settle_on_both_chains(world: World) -> None:
    w = world
    a, b = w.sides
    assert a.account.address == b.account.address and a.chain_id != b.chain_id
    signed = await _approve(w)
    for side in w.sides:
        assert len(await relay_multichain(side.relayer, signed)) == 2  # install + grant, relayed by anyone

    for i, side in enumerate(w.sides):
        grant = await side.escrow.grant_of(side.account.address, w.key.address)
        assert (grant.live, grant.epoch, grant.budget, grant.max_per_call) == (True, 1, BUDGET, CAP)
        assert (await side.account.session_key(w.key.address)).installed

        await _top_up(w, side)
        assert await side.escrow.deposit_of(side.account.address, side.usdc.address) == TOP_UP
        assert await side.usdc.balance_of(side.account.address) == FUNDS - TOP_UP

        # Session-key payments from the account's deposit settle exactly.
        for n in range(3):
            await side.settle(side.pay(w.key, w.payee, nonce=100 * i + n))
        assert await side.usdc.balance_of(w.payee) == 3 * PRICE
        assert await side.escrow.deposit_of(side.account.address, side.usdc.address) == TOP_UP - 3 * PRICE
        assert (await side.escrow.grant_of(side.account.address, w.key.address)).spent == 3 * PRICE

        # The grant's terms hold: over the per-call cap is refused and moves nothing.
        over = side.pay(w.key, w.payee, nonce=100 * i + 50, amount=CAP + 1)
        reason, _ = await side.escrow.check(over)
        assert reason != 0
        await side.settle(over)
        assert await side.usdc.balance_of(w.payee) == 3 * PRICE

        # And the key cannot take the account's money any other way than into the escrow.
        with pytest.raises(UserOpRejected, match="AA23"):
            await side.account.execute(
                [Call(side.usdc.address, 0, side.usdc.transfer_calldata(w.payee, PRICE))],
                signer=SessionKey(w.key),
                bundler=side.bundler,
            )

    # A payment signed for chain A's escrow does not settle on chain B (same escrow and account addresses).
    payment_a = a.pay(w.key, w.payee, nonce=777)
    reason, _ = await b.escrow.check(payment_a)
    assert reason != 0
    before = await b.usdc.balance_of(w.payee)
    await b.settle(payment_a)
    assert await b.usdc.balance_of(w.payee) == before
    assert await a.escrow.check(payment_a) == (0, w.key.address)


async def test_an_account_approval_is_refused_for_another_chain_account_or_owner(world: World) -> None:
    w = world
    a, b = w.sides
    signed = await _approve(w)
    grant_a = next(e for e in signed.for_chain(a.chain_id) if isinstance(e.action, EscrowGrantLeaf))
    assert isinstance(grant_a.action, EscrowGrantLeaf)

    async def refusal(side: Side, entry: MultichainEntry, file: SignedMultichainApproval = signed) -> str:
        data, abi = _calldata(file, entry)
        tx = {"from": side.relayer.address, "to": side.escrow.address, "data": "0x" + data.hex()}
        with pytest.raises(RevertError) as refused:
            await side.rpc.request("eth_estimateGas", [tx])
        decoded = abi.decode_error(refused.value.data)
        assert decoded is not None
        return str(decoded[0])

    # Chain A's grant leaf, sent to chain B's escrow: not a leaf there.
    assert await refusal(b, grant_a) == "MultichainProofInvalid"

    # The same owner's second account (a different salt): the root is the owner's, but the leaf names the
    # first account as payer, so the escrow's recomputed leaf (payer = the second account) is not under it.
    other = await AgentAccount.counterfactual(
        a.rpc, factory=a.chain.contracts["account_factory"], owner=w.owner.address, salt=secrets.randbits(64)
    )
    await other.deploy(a.relayer)
    digest = approval_digest(bytes.fromhex(signed.root[2:]))
    form = bytes.fromhex(signed.root[2:]) + bytes.fromhex(signed.signature[2:])
    assert await other.is_valid_signature(digest, form)  # the owner did sign this root ...
    moved = EscrowGrantLeaf(
        chain_id=a.chain_id,
        escrow=a.escrow.address,
        grant=msgspec.structs.replace(grant_a.action.grant, payer=other.address),  # ... not from this account
    )
    assert await refusal(a, MultichainEntry(action=moved, proof=grant_a.proof)) == "MultichainProofInvalid"
    assert not (await a.escrow.grant_of(other.address, w.key.address)).live

    # Another owner's account named as payer, in a root this owner signed: its ERC-1271 says no.
    stranger = await AgentAccount.counterfactual(
        a.rpc, factory=a.chain.contracts["account_factory"], owner=LocalSigner.random().address, salt=1
    )
    await stranger.deploy(a.relayer)
    theft = await _approve(w, payer=stranger.address)
    with pytest.raises(MultichainError, match="EscrowInvalidSignature") as refused:
        await relay_multichain(a.relayer, theft, entries=[theft.for_chain(a.chain_id)[1]])
    assert refused.value.code == "multichain_refused"
    assert not (await a.escrow.grant_of(stranger.address, w.key.address)).live

    # The owner's signature of the root, in any form, is no ERC-1271 signature of another hash.
    other_digest = keccak(b"a Permit2 or USDC permit digest")
    assert not await a.account.is_valid_signature(other_digest, form)
    assert not await a.account.is_valid_signature(other_digest, bytes.fromhex(signed.signature[2:]))
    assert not await a.account.is_valid_signature(digest, bytes.fromhex(signed.signature[2:]))
    assert await a.account.is_valid_signature(digest, form)

    # Nothing was granted anywhere by all this; the real file still works on both chains.
    for side in w.sides:
        assert not (await side.escrow.grant_of(side.account.address, w.key.address)).live
        await relay_multichain(side.relayer, signed)
        assert (await side.escrow.grant_of(side.account.address, w.key.address)).live


async def test_revoke_everywhere_ends_the_account_grants(world: World) -> None:
    w = world
    signed = await _approve(w)
    await relay_multichain(w.sides[0].relayer, signed)  # chain B's leaves are not relayed yet
    revoke = MultichainApproval.revoking(signed, deadline=await w.sides[0].rpc.block_timestamp() + 600)
    signed_revoke = revoke.sign(w.owner)
    for side in w.sides:
        await relay_multichain(side.relayer, signed_revoke)
    for side in w.sides:
        assert not (await side.escrow.grant_of(side.account.address, w.key.address)).live
        assert not (await side.account.session_key(w.key.address)).installed
    with pytest.raises(MultichainError, match="EscrowStaleEpoch|OwnerApprovalNonceAlreadyUsed"):
        await relay_multichain(w.sides[1].relayer, signed)
