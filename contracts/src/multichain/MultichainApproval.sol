// SPDX-License-Identifier: MIT
pragma solidity ^0.8.26;

import {MerkleProof} from "@openzeppelin/contracts/utils/cryptography/MerkleProof.sol";
import {MessageHashUtils} from "@openzeppelin/contracts/utils/cryptography/MessageHashUtils.sol";

/**
 * @dev One owner signature for many chains. The owner signs ONE EIP-712 message, `MultichainApproval(bytes32 root)`,
 * under a domain that names no chain and no contract:
 *
 * ```
 * EIP712Domain(string name,string version)      name = "AgentPay Multichain", version = "1"
 * MultichainApproval(bytes32 root)
 * ```
 *
 * `root` is the root of a Merkle tree (OpenZeppelin {MerkleProof}: sorted pairs, `keccak256(a ++ b)` with `a <= b`)
 * whose leaves are the single-chain actions the owner approves, each bound to one chain and one contract:
 *
 * ```
 * MultichainLeaf(uint256 chainId,address verifyingContract,bytes32 action)
 * leaf = keccak256(keccak256(abi.encode(MULTICHAIN_LEAF_TYPEHASH, chainId, verifyingContract, action)))
 * ```
 *
 * where `action` is the EIP-712 struct hash of the message the contract would otherwise verify with a per-chain
 * signature (AgentEscrow `Grant` / `Revoke`, AgentAccount `InstallSessionKey` / `RevokeSessionKey`), so a leaf
 * carries exactly the same terms, and the same replay protection (epochs, nonces), as its single-chain form.
 *
 * Why it is safe across chains: the domain binds no chain, so the *signature* is valid everywhere, but a contract
 * only accepts a leaf it recomputes from `block.chainid` and `address(this)`: a leaf for chain A (or for another
 * escrow or account on the same chain) never proves an action on chain B. Leaves are hashed twice (the preimage of
 * a leaf is 32 bytes, that of an inner node 64), so an inner node can never pass as a leaf (second preimage).
 * The struct hash's own typehash tells a grant from a revoke from an install, so no action can pass as another.
 */
library MultichainApproval {
    /**
     * @dev What a relayer passes to a `...WithProof` function: the signed `root`, the Merkle `proof` of this chain's
     * leaf, and the owner's `signature` of `MultichainApproval(root)`.
     */
    struct Proof {
        bytes32 root;
        bytes32[] proof;
        bytes signature;
    }

    /// @dev `keccak256("EIP712Domain(string name,string version)")`: no chainId, no verifyingContract.
    bytes32 internal constant DOMAIN_TYPEHASH = keccak256("EIP712Domain(string name,string version)");

    /// @dev The chainless domain separator every chain computes identically.
    bytes32 internal constant DOMAIN_SEPARATOR =
        keccak256(abi.encode(DOMAIN_TYPEHASH, keccak256("AgentPay Multichain"), keccak256("1")));

    /// @dev `keccak256("MultichainApproval(bytes32 root)")`
    bytes32 internal constant APPROVAL_TYPEHASH = keccak256("MultichainApproval(bytes32 root)");

    /// @dev `keccak256("MultichainLeaf(uint256 chainId,address verifyingContract,bytes32 action)")`
    bytes32 internal constant LEAF_TYPEHASH =
        keccak256("MultichainLeaf(uint256 chainId,address verifyingContract,bytes32 action)");

    /// @dev `owner`'s multichain approval `root` was used on this chain for `leaf`.
    event MultichainApprovalUsed(address indexed owner, bytes32 indexed root, bytes32 leaf);

    /// @dev `proof` does not place `leaf` (this chain's and this contract's leaf of the action) under `root`.
    error MultichainProofInvalid(bytes32 root, bytes32 leaf);

    /// @dev The leaf of `action` (an EIP-712 struct hash) for this chain and the calling contract.
    function leaf(bytes32 action) internal view returns (bytes32) {
        return keccak256(bytes.concat(keccak256(abi.encode(LEAF_TYPEHASH, block.chainid, address(this), action))));
    }

    /// @dev The EIP-712 digest the owner signs for `root`.
    function digest(bytes32 root) internal pure returns (bytes32) {
        return MessageHashUtils.toTypedDataHash(DOMAIN_SEPARATOR, keccak256(abi.encode(APPROVAL_TYPEHASH, root)));
    }

    /**
     * @dev Reverts with {MultichainProofInvalid} unless `approval.proof` places the leaf of `action` under
     * `approval.root`; returns the digest whose signature the caller must then check, and the leaf.
     */
    function verify(Proof calldata approval, bytes32 action) internal view returns (bytes32 signed, bytes32 node) {
        node = leaf(action);
        if (!MerkleProof.verifyCalldata(approval.proof, approval.root, node)) {
            revert MultichainProofInvalid(approval.root, node);
        }
        signed = digest(approval.root);
    }
}
