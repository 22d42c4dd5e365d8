// SPDX-License-Identifier: MIT
pragma solidity ^0.8.26;

import {ArgRule, CallPermission, SessionPolicy} from "./SessionKeyTypes.sol";

/**
 * @dev EIP-712 struct hashes of the owner approvals that install or revoke a session key. The owner signs them
 * offline (under the account's domain `AgentAccount` / `1`) and anyone may relay the signature, see
 * {AccountSessionKeys-installSessionKeyWithSig} and {AccountSessionKeys-revokeSessionKeyWithSig}.
 *
 * The types, in the form EIP-712 wallets display them:
 *
 * ```
 * InstallSessionKey(address key,SessionPolicy policy,uint256 nonce,uint48 deadline)
 * RevokeSessionKey(address key,uint256 nonce,uint48 deadline)
 * SessionPolicy(uint48 validAfter,uint48 validUntil,uint32 maxUses,uint48 interval,uint32 maxUsesPerInterval,
 *               uint128 gasBudget,CallPermission[] permissions)
 * CallPermission(address target,bytes4 selector,uint128 valueLimit,ArgRule[] rules)
 * ArgRule(uint8 condition,uint32 offset,bytes32[] values)
 * ```
 */
library SessionKeyTypedData {
    bytes internal constant ARG_RULE_TYPE = "ArgRule(uint8 condition,uint32 offset,bytes32[] values)";
    bytes internal constant CALL_PERMISSION_TYPE =
        "CallPermission(address target,bytes4 selector,uint128 valueLimit,ArgRule[] rules)";
    bytes internal constant SESSION_POLICY_TYPE =
        "SessionPolicy(uint48 validAfter,uint48 validUntil,uint32 maxUses,uint48 interval,uint32 maxUsesPerInterval,uint128 gasBudget,CallPermission[] permissions)";

    /// @dev `keccak256("ArgRule(uint8 condition,uint32 offset,bytes32[] values)")`
    bytes32 internal constant ARG_RULE_TYPEHASH = keccak256(ARG_RULE_TYPE);

    /// @dev `keccak256(CALL_PERMISSION_TYPE ++ ARG_RULE_TYPE)`
    bytes32 internal constant CALL_PERMISSION_TYPEHASH =
        keccak256(abi.encodePacked(CALL_PERMISSION_TYPE, ARG_RULE_TYPE));

    /// @dev `keccak256(SESSION_POLICY_TYPE ++ ARG_RULE_TYPE ++ CALL_PERMISSION_TYPE)`
    bytes32 internal constant SESSION_POLICY_TYPEHASH =
        keccak256(abi.encodePacked(SESSION_POLICY_TYPE, ARG_RULE_TYPE, CALL_PERMISSION_TYPE));

    /// @dev `keccak256("InstallSessionKey(address key,SessionPolicy policy,uint256 nonce,uint48 deadline)" ++ referenced types)`
    bytes32 internal constant INSTALL_SESSION_KEY_TYPEHASH = keccak256(
        abi.encodePacked(
            "InstallSessionKey(address key,SessionPolicy policy,uint256 nonce,uint48 deadline)",
            ARG_RULE_TYPE,
            CALL_PERMISSION_TYPE,
            SESSION_POLICY_TYPE
        )
    );

    /// @dev `keccak256("RevokeSessionKey(address key,uint256 nonce,uint48 deadline)")`
    bytes32 internal constant REVOKE_SESSION_KEY_TYPEHASH =
        keccak256("RevokeSessionKey(address key,uint256 nonce,uint48 deadline)");

    /// @dev `keccak256("CancelOwnerApproval(uint256 nonce)")`: a multichain leaf that burns an approval nonce.
    bytes32 internal constant CANCEL_OWNER_APPROVAL_TYPEHASH = keccak256("CancelOwnerApproval(uint256 nonce)");

    /// @dev The struct hash of an `InstallSessionKey` approval.
    function hashInstall(address key, SessionPolicy calldata policy, uint256 nonce, uint48 deadline)
        internal
        pure
        returns (bytes32)
    {
        return keccak256(abi.encode(INSTALL_SESSION_KEY_TYPEHASH, key, hashPolicy(policy), nonce, deadline));
    }

    /// @dev The struct hash of a `RevokeSessionKey` approval.
    function hashRevoke(address key, uint256 nonce, uint48 deadline) internal pure returns (bytes32) {
        return keccak256(abi.encode(REVOKE_SESSION_KEY_TYPEHASH, key, nonce, deadline));
    }

    /// @dev The struct hash of a `CancelOwnerApproval`.
    function hashCancel(uint256 nonce) internal pure returns (bytes32) {
        return keccak256(abi.encode(CANCEL_OWNER_APPROVAL_TYPEHASH, nonce));
    }

    /// @dev The struct hash of a `SessionPolicy`.
    function hashPolicy(SessionPolicy calldata policy) internal pure returns (bytes32) {
        uint256 n = policy.permissions.length;
        bytes32[] memory hashes = new bytes32[](n);
        for (uint256 i = 0; i < n; ++i) {
            hashes[i] = _hashPermission(policy.permissions[i]);
        }
        return keccak256(
            abi.encode(
                SESSION_POLICY_TYPEHASH,
                policy.validAfter,
                policy.validUntil,
                policy.maxUses,
                policy.interval,
                policy.maxUsesPerInterval,
                policy.gasBudget,
                keccak256(abi.encodePacked(hashes))
            )
        );
    }

    function _hashPermission(CallPermission calldata permission) private pure returns (bytes32) {
        uint256 n = permission.rules.length;
        bytes32[] memory hashes = new bytes32[](n);
        for (uint256 i = 0; i < n; ++i) {
            hashes[i] = _hashRule(permission.rules[i]);
        }
        return keccak256(
            abi.encode(
                CALL_PERMISSION_TYPEHASH,
                permission.target,
                permission.selector,
                permission.valueLimit,
                keccak256(abi.encodePacked(hashes))
            )
        );
    }

    function _hashRule(ArgRule calldata rule) private pure returns (bytes32) {
        return keccak256(
            abi.encode(ARG_RULE_TYPEHASH, uint8(rule.condition), rule.offset, keccak256(abi.encodePacked(rule.values)))
        );
    }
}
