// SPDX-License-Identifier: MIT
pragma solidity ^0.8.26;

import {SessionKeyTypedData} from "../../src/account/SessionKeyTypedData.sol";
import {SessionPolicy} from "../../src/account/SessionKeyTypes.sol";

/**
 * @dev The multichain approval as a signer builds it, spelled out independently of the contracts' library (type
 * strings, domain, double-hashed leaves, a sorted-pair tree), so a drift on either side fails the tests.
 */
library MultichainTestLib {
    bytes32 internal constant LEAF_TYPEHASH =
        keccak256("MultichainLeaf(uint256 chainId,address verifyingContract,bytes32 action)");

    function leaf(uint256 chainId, address verifyingContract, bytes32 action) internal pure returns (bytes32) {
        return keccak256(bytes.concat(keccak256(abi.encode(LEAF_TYPEHASH, chainId, verifyingContract, action))));
    }

    function digest(bytes32 root) internal pure returns (bytes32) {
        bytes32 domain = keccak256(
            abi.encode(
                keccak256("EIP712Domain(string name,string version)"), keccak256("AgentPay Multichain"), keccak256("1")
            )
        );
        bytes32 structHash = keccak256(abi.encode(keccak256("MultichainApproval(bytes32 root)"), root));
        return keccak256(abi.encodePacked("\x19\x01", domain, structHash));
    }

    function hashPair(bytes32 a, bytes32 b) internal pure returns (bytes32) {
        return a < b ? keccak256(abi.encode(a, b)) : keccak256(abi.encode(b, a));
    }

    /// @dev Layer by layer, pairing neighbours; an odd last node moves up unchanged.
    function root(bytes32[] memory leaves) internal pure returns (bytes32) {
        bytes32[] memory layer = leaves;
        while (layer.length > 1) {
            layer = _up(layer);
        }
        return layer[0];
    }

    function proof(bytes32[] memory leaves, uint256 index) internal pure returns (bytes32[] memory out) {
        bytes32[] memory buffer = new bytes32[](256);
        uint256 n;
        bytes32[] memory layer = leaves;
        while (layer.length > 1) {
            uint256 sibling = index ^ 1;
            if (sibling < layer.length) buffer[n++] = layer[sibling];
            layer = _up(layer);
            index /= 2;
        }
        out = new bytes32[](n);
        for (uint256 i; i < n; ++i) {
            out[i] = buffer[i];
        }
    }

    function _up(bytes32[] memory layer) private pure returns (bytes32[] memory next) {
        next = new bytes32[]((layer.length + 1) / 2);
        for (uint256 i; i < next.length; ++i) {
            next[i] = 2 * i + 1 < layer.length ? hashPair(layer[2 * i], layer[2 * i + 1]) : layer[2 * i];
        }
    }
}

/// @dev Exposes the account's `InstallSessionKey` / `RevokeSessionKey` struct hashes (they take calldata policies).
contract SessionKeyHasher {
    function hashInstall(address key, SessionPolicy calldata policy, uint256 nonce, uint48 deadline)
        external
        pure
        returns (bytes32)
    {
        return SessionKeyTypedData.hashInstall(key, policy, nonce, deadline);
    }

    function hashRevoke(address key, uint256 nonce, uint48 deadline) external pure returns (bytes32) {
        return SessionKeyTypedData.hashRevoke(key, nonce, deadline);
    }

    /// @dev Spelled out (not the library's) so the type string is checked.
    function hashCancel(uint256 nonce) external pure returns (bytes32) {
        return keccak256(abi.encode(keccak256("CancelOwnerApproval(uint256 nonce)"), nonce));
    }
}
