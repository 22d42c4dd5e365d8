"""Attacks on one owner signature for many chains (two anvils): a leaf proves exactly one action, on one
chain, at one contract.

What an attacker holding a relayed approval (root, proofs, the owner's signature: all public once relayed)
tries: the grant leaf sent to another AgentEscrow on the same chain (a fork keeping the chain id, or a
look-alike deployment), and one kind of leaf's proof presented as another kind (a grant's proof to revoke,
an install's proof to grant)."""

from __future__ import annotations

import pytest

from escrow import AgentEscrow, EscrowGrantLeaf, SessionKeyInstallLeaf
from escrow._multichain import _calldata, _raw, _signature
from escrow.chain._abi import ContractAbi
from escrow.chain._rpc import RevertError, Rpc
from escrow.payments._escrow import deploy_contract, escrow_artifact
from tests.test_multichain_approval import World, _approve_everywhere, _live, chains, world
from x402 import LocalSigner

__all__ = ["chains", "world"]  # the fixtures, imported

pytestmark = pytest.mark.anyio


async def _refused(rpc: Rpc, sender: str, to: str, data: bytes, abi: ContractAbi) -> str:
    """The custom error a call reverts with (estimated, never sent)."""
    tx = {"from": sender, "to": to, "data": "0x" + data.hex()}
    with pytest.raises(RevertError) as refused:
        await rpc.request("eth_estimateGas", [tx])
    decoded = abi.decode_error(refused.value.data)
    assert decoded is not None
    return str(decoded[0])


async def test_a_leaf_proves_one_action_at_one_contract(world: World) -> None:
    w = world
    a = w.sides[0]
    signed = await _approve_everywhere(w)
    entries = signed.for_chain(a.chain_id)
    grant = next(e for e in entries if isinstance(e.action, EscrowGrantLeaf))
    install = next(e for e in entries if isinstance(e.action, SessionKeyInstallLeaf))

    # Another AgentEscrow on the same chain (same chain id: a fork, a second deployment): the leaf names
    # chain A's escrow, so its proof proves nothing there.
    deployer = LocalSigner.random()
    await a.rpc.request("anvil_setBalance", [deployer.address, hex(10**20)])
    other = await deploy_contract(
        a.rpc, "0x" + deployer._key.secret.hex(), escrow_artifact("AgentEscrow"), [3600]
    )
    data, abi = _calldata(signed, grant)
    assert await _refused(a.rpc, a.relayer.address, other, data, abi) == "MultichainProofInvalid"
    assert not (await AgentEscrow(a.rpc, other).grant_of(w.owner.address, w.key.address)).live

    # The grant leaf's proof presented to revoke the very grant it names: another typehash, another leaf.
    g = grant.action.grant
    proof = (_raw(signed.root), [_raw(p) for p in grant.proof], _signature(signed, grant.action))
    revoke = abi.encode("revokeWithProof", g.payer, g.signer, g.epoch, proof)
    assert await _refused(a.rpc, a.relayer.address, a.escrow.address, revoke, abi) == "MultichainProofInvalid"
    # The install leaf's proof presented as a grant (the grant's own terms): refused too.
    wrong = (_raw(signed.root), [_raw(p) for p in install.proof], _signature(signed, grant.action))
    params = (g.token, g.max_per_call, g.budget, g.valid_after, g.valid_until)
    as_grant = abi.encode("grantWithProof", g.payer, g.signer, params, list(g.payees), g.epoch, wrong)
    assert (
        await _refused(a.rpc, a.relayer.address, a.escrow.address, as_grant, abi) == "MultichainProofInvalid"
    )
    # An inner node of the tree as the root, with the rest of the proof: the owner never signed it.
    if len(grant.proof) > 1:
        inner = (_raw(grant.proof[-1]), [_raw(p) for p in grant.proof[:-1]], _signature(signed, grant.action))
        data = abi.encode("grantWithProof", g.payer, g.signer, params, list(g.payees), g.epoch, inner)
        assert await _refused(a.rpc, a.relayer.address, a.escrow.address, data, abi) in (
            "MultichainProofInvalid",
            "EscrowInvalidSignature",
        )
    assert not await _live(w, a)

    # The genuine leaf, at its own escrow: live.
    data, _ = _calldata(signed, grant)
    await a.relayer.transact(a.escrow.address, data, gas=500_000)
    assert await _live(w, a)


async def test_the_97_byte_form_is_accepted_for_the_approval_digest_only(world: World) -> None:
    """The owner's AgentAccount accepts `root ++ signature` (97 bytes) in ERC-1271 for the multichain digest
    of that root: any other digest with it (a single-chain grant's, a token permit's, a root the owner
    never signed) must be refused, or one multichain signature would pass as a signature of anything."""
    from escrow.chain._merkle import approval_digest

    w = world
    a = w.sides[0]
    signed = await _approve_everywhere(w)
    root, signature = _raw(signed.root), _raw(signed.signature)
    form = root + signature
    assert len(form) == 97
    assert await a.account.is_valid_signature(approval_digest(root), form)
    other_root = bytes(31) + b"\x01"
    for digest in (root, bytes(32), approval_digest(other_root), b"\x19" * 32):
        assert not await a.account.is_valid_signature(digest, form)
    # the owner's signature of one root presented with another root and its digest: refused
    assert not await a.account.is_valid_signature(approval_digest(other_root), other_root + signature)
