"""Properties of the multichain approval's tree and leaves (no chain): every leaf verifies with its proof
under its root; no leaf verifies at another position, under another root, or re-bound to another chain or
contract; the signed file survives JSON and `verify()` refuses any tampering. The on-chain side of the same
properties is `contracts/test/MultichainEscrow.t.sol` / `MultichainAccount.t.sol`."""

from __future__ import annotations

import msgspec
import pytest
from eth_utils.crypto import keccak
from hypothesis import given, settings
from hypothesis import strategies as st

from escrow import (
    CallPermission,
    EscrowGrantLeaf,
    MultichainApproval,
    MultichainError,
    SessionPolicy,
    SignedMultichainApproval,
)
from escrow.chain._merkle import MerkleTree, approval_digest, leaf_hash, verify_proof
from x402 import LocalSigner

hashes = st.binary(min_size=32, max_size=32)
chain_ids = st.integers(1, 2**64)
addresses = st.binary(min_size=20, max_size=20).map(lambda b: "0x" + b.hex())


@settings(max_examples=200, deadline=None)
@given(leaves=st.lists(hashes, min_size=1, max_size=40, unique=True), data=st.data())
def test_every_leaf_verifies_with_its_proof_and_no_other(leaves: list[bytes], data: st.DataObject) -> None:
    tree = MerkleTree(leaves)
    for i, leaf in enumerate(leaves):
        assert verify_proof(tree.proof(i), tree.root, leaf)
        assert len(tree.proof(i)) <= max(1, len(leaves) - 1).bit_length()
    i = data.draw(st.integers(0, len(leaves) - 1))
    proof = tree.proof(i)
    # Another leaf with this proof, this leaf under another root, or a proof with one sibling changed: no.
    for j, other in enumerate(leaves):
        if j != i and len(leaves) > 1:
            assert not verify_proof(proof, tree.root, other) or tree.proof(j) == proof
    assert not verify_proof(proof, keccak(tree.root), leaves[i])
    if proof:
        k = data.draw(st.integers(0, len(proof) - 1))
        tampered = [*proof]
        tampered[k] = keccak(tampered[k])
        assert not verify_proof(tampered, tree.root, leaves[i])


@settings(max_examples=200, deadline=None)
@given(action=hashes, chain_a=chain_ids, chain_b=chain_ids, contract=addresses, other=addresses)
def test_a_leaf_binds_its_chain_and_contract(
    action: bytes, chain_a: int, chain_b: int, contract: str, other: str
) -> None:
    leaf = leaf_hash(chain_a, contract, action)
    tree = MerkleTree([leaf, leaf_hash(chain_a, other, keccak(action))])
    assert verify_proof(tree.proof(0), tree.root, leaf)
    if chain_b != chain_a:
        assert not verify_proof(tree.proof(0), tree.root, leaf_hash(chain_b, contract, action))
    if other.lower() != contract.lower():
        assert not verify_proof(tree.proof(0), tree.root, leaf_hash(chain_a, other, action))


OWNER = LocalSigner.random()
KEY = "0x" + "ab" * 20
POLICY = SessionPolicy(
    permissions=(CallPermission.to("0x" + "cd" * 20, "transfer(address,uint256)"),), gas_budget=10**18
)


def _approval(chains: list[int]) -> MultichainApproval:
    approval = MultichainApproval()
    for chain in chains:
        approval.grant(
            chain_id=chain,
            escrow="0x" + "11" * 20,
            payer=OWNER.address,
            signer=KEY,
            token="0x" + "22" * 20,
            max_per_call=10,
            budget=100,
            valid_until=2**32 - 1,
            epoch=3,
        )
        approval.install_session_key(
            chain_id=chain, account="0x" + "33" * 20, key=KEY, policy=POLICY, deadline=2**40, nonce=chain
        )
    return approval


@settings(max_examples=25, deadline=None)
@given(chains=st.lists(chain_ids, min_size=1, max_size=8, unique=True), data=st.data())
def test_the_signed_file_verifies_and_refuses_tampering(chains: list[int], data: st.DataObject) -> None:
    signed = _approval(chains).sign(OWNER)
    again = msgspec.json.decode(signed.to_json(), type=SignedMultichainApproval)
    assert again == signed
    again.verify()
    assert sorted(signed.chain_ids) == sorted(chains)

    # Move one chain's grant to another chain id: its proof no longer places it under the root.
    i = data.draw(st.integers(0, len(signed.entries) - 1))
    entry = signed.entries[i]
    moved = msgspec.structs.replace(entry.action, chain_id=entry.action.chain_id + 1)
    forged = msgspec.structs.replace(
        signed,
        entries=(*signed.entries[:i], msgspec.structs.replace(entry, action=moved), *signed.entries[i + 1 :]),
    )
    if moved.leaf() not in {e.action.leaf() for e in signed.entries}:
        with pytest.raises(MultichainError) as bad:
            forged.verify()
        assert bad.value.code == "multichain_proof_invalid"

    # Another key's signature of the same root is not the owner's.
    other = msgspec.structs.replace(
        signed,
        signature="0x"
        + LocalSigner.random().sign_hash(approval_digest(bytes.fromhex(signed.root[2:]))).hex(),
    )
    with pytest.raises(MultichainError) as wrong:
        other.verify()
    assert wrong.value.code == "multichain_signature_invalid"


def test_one_signature_whatever_the_number_of_chains_and_no_duplicates() -> None:
    signed = _approval([1, 10, 8453, 42161]).sign(OWNER)
    assert len({e.proof for e in signed.entries}) == 8 and len(signed.signature) == 2 + 130
    assert isinstance(signed.entries[0].action, EscrowGrantLeaf)
    with pytest.raises(MultichainError) as dup:
        _approval([1, 1])
    assert dup.value.code == "multichain_duplicate"
    with pytest.raises(MultichainError):
        MultichainApproval().sign(OWNER)
