"""The Merkle tree and typed data of a multichain owner approval (`MultichainApproval.sol`), with no I/O.

The owner signs one EIP-712 `MultichainApproval(bytes32 root)` under a domain that names neither a chain nor
a contract (`EIP712Domain(string name,string version)`, "AgentPay Multichain" / "1"). The root commits to
leaves, one per (chain, contract, action):

    leaf = keccak256(keccak256(abi.encode(LEAF_TYPEHASH, chainId, verifyingContract, action)))

`action` is the EIP-712 struct hash of the single-chain message (a `Grant`, an `InstallSessionKey`, ...).
The tree is OpenZeppelin `MerkleProof`'s: a node is `keccak256(min(a, b) ++ max(a, b))`, so a proof is just
the sibling hashes, bottom up. Leaves are hashed twice (32-byte preimage against an inner node's 64) so that
no inner node can pass as a leaf.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Final

from eth_abi.abi import encode as abi_encode
from eth_account.messages import encode_typed_data
from eth_utils.address import to_checksum_address
from eth_utils.crypto import keccak

__all__ = [
    "APPROVAL_DOMAIN",
    "LEAF_TYPEHASH",
    "MerkleTree",
    "approval_digest",
    "approval_typed_data",
    "leaf_hash",
    "struct_hash",
    "verify_proof",
]

LEAF_TYPEHASH: Final = keccak(text="MultichainLeaf(uint256 chainId,address verifyingContract,bytes32 action)")

APPROVAL_DOMAIN: Final = {"name": "AgentPay Multichain", "version": "1"}
"""The chainless domain: the same separator on every chain, so one signature serves them all."""


def struct_hash(typed: dict[str, Any]) -> bytes:
    """`hashStruct(message)` of an EIP-712 typed-data dict (what a leaf's `action` is)."""
    return bytes(encode_typed_data(full_message=typed).body)


def leaf_hash(chain_id: int, verifying_contract: str, action: bytes) -> bytes:
    """The leaf of `action` on `verifying_contract` at `chain_id` (`MultichainApproval.leaf`)."""
    inner = abi_encode(
        ["bytes32", "uint256", "address", "bytes32"],
        [LEAF_TYPEHASH, chain_id, to_checksum_address(verifying_contract), action],
    )
    return keccak(keccak(inner))


def approval_typed_data(root: bytes) -> dict[str, Any]:
    """What the owner signs: `MultichainApproval(bytes32 root)` under the chainless domain."""
    return {
        "types": {
            "EIP712Domain": [{"name": "name", "type": "string"}, {"name": "version", "type": "string"}],
            "MultichainApproval": [{"name": "root", "type": "bytes32"}],
        },
        "primaryType": "MultichainApproval",
        "domain": dict(APPROVAL_DOMAIN),
        "message": {"root": root},
    }


def approval_digest(root: bytes) -> bytes:
    signable = encode_typed_data(full_message=approval_typed_data(root))
    return keccak(b"\x19\x01" + bytes(signable.header) + bytes(signable.body))


def _pair(a: bytes, b: bytes) -> bytes:
    return keccak(a + b) if a <= b else keccak(b + a)


def verify_proof(proof: Sequence[bytes], root: bytes, leaf: bytes) -> bool:
    """`MerkleProof.verify`: fold the siblings into `leaf` and compare with `root`."""
    node = leaf
    for sibling in proof:
        node = _pair(node, sibling)
    return node == root


class MerkleTree:
    """A sorted-pair tree over `leaves` in their order: neighbours pair up layer by layer, an odd last node
    moves up unchanged. Any layout gives valid OpenZeppelin proofs; this one keeps proofs at ceil(log2 n)."""

    def __init__(self, leaves: Sequence[bytes]) -> None:
        if not leaves:
            raise ValueError("a Merkle tree needs at least one leaf")
        if any(len(leaf) != 32 for leaf in leaves):
            raise ValueError("leaves are 32-byte hashes")
        self.layers: list[list[bytes]] = [list(leaves)]
        while len(self.layers[-1]) > 1:
            layer = self.layers[-1]
            self.layers.append(
                [
                    _pair(layer[i], layer[i + 1]) if i + 1 < len(layer) else layer[i]
                    for i in range(0, len(layer), 2)
                ]
            )

    @property
    def root(self) -> bytes:
        return self.layers[-1][0]

    def proof(self, index: int) -> list[bytes]:
        if not 0 <= index < len(self.layers[0]):
            raise IndexError(f"no leaf {index}")
        siblings: list[bytes] = []
        for layer in self.layers[:-1]:
            sibling = index ^ 1
            if sibling < len(layer):
                siblings.append(layer[sibling])
            index //= 2
        return siblings
