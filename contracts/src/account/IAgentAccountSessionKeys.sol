// SPDX-License-Identifier: MIT
pragma solidity ^0.8.26;

import {SessionPolicy, SessionPolicyKind, SessionKeyState, StoredArgRule} from "./SessionKeyTypes.sol";

/**
 * @dev Session keys of an {AgentAccount}: hot keys the owner authorises for a scoped set of calls, each under a
 * {SessionPolicy}. See {AccountSessionKeys} for the signature format and the exact policy semantics.
 */
interface IAgentAccountSessionKeys {
    /**
     * @dev `key` was installed under grant `id` with `policy` (the full policy, so indexers can rebuild it).
     */
    event SessionKeyInstalled(address indexed key, uint64 indexed id, SessionPolicy policy);

    /// @dev Grant `id` of `key` was revoked: no UserOperation validated afterwards may use it.
    event SessionKeyRevoked(address indexed key, uint64 indexed id);

    /**
     * @dev A UserOperation signed by `key` passed the policies and updated its counters; the grant is the one
     * {SessionKeyInstalled} last named for `key`. Anonymous, so the log's one topic is `key` itself (filter the
     * account's logs on it): validation emits this for every session-key operation, and a second topic would cost
     * each of them 375 gas.
     */
    event SessionKeyUsed(address indexed key) anonymous;

    /// @dev The owner-approval `nonce` was consumed by a relayed approval or cancelled by the owner.
    event OwnerApprovalNonceUsed(uint256 indexed nonce);

    /**
     * @dev A UserOperation signed by `key` failed `policy`. `callIndex` is the index of the offending call in the
     * ERC-7821 batch (0 when the policy is not about a call); `ruleIndex` the offending {ArgRule} (0 otherwise).
     * The EntryPoint v0.7 surfaces it as `FailedOpWithRevert(opIndex, "AA23 reverted", <this error>)`.
     */
    error SessionKeyPolicyViolation(address key, SessionPolicyKind policy, uint256 callIndex, uint256 ruleIndex);

    /**
     * @dev The policy given for `key` is malformed. `reason`: 1 key is zero, the account or its owner; 2
     * `validUntil < validAfter`; 3 `interval` and `maxUsesPerInterval` not both zero or both set; 4 no permission;
     * 5 a permission targets zero or the account; 6 duplicate `(target, selector)`; 7 too many rules; 8 a rule has
     * the wrong number of values; 9 no gas budget (`gasBudget == 0`; use `type(uint128).max` for no cap); 10 the
     * account's grant ids are exhausted (2^24 installs); `index` is the offending permission (0 otherwise).
     */
    error SessionKeyInvalidPolicy(address key, uint256 reason, uint256 index);

    /// @dev `key` is not installed.
    error SessionKeyNotInstalled(address key);

    /// @dev The owner approval expired at `deadline`.
    error OwnerApprovalExpired(uint48 deadline);

    /// @dev The owner-approval `nonce` was already used or cancelled.
    error OwnerApprovalNonceAlreadyUsed(uint256 nonce);

    /// @dev The owner-approval signature is not the owner's.
    error OwnerApprovalInvalidSignature();

    /**
     * @notice Installs `key` with `policy`, replacing (and revoking) any grant the key already had.
     * @dev Only the owner (directly), the EntryPoint (a UserOperation the owner signed) or the account itself.
     * Emits {SessionKeyInstalled}, and {SessionKeyRevoked} first when a grant is replaced.
     */
    function installSessionKey(address key, SessionPolicy calldata policy) external;

    /**
     * @notice Installs `key` with an owner approval signed offline; anyone may relay it.
     * @dev `signature` is the owner's ECDSA signature of the EIP-712 `InstallSessionKey(key, policy, nonce,
     * deadline)` under this account's domain. Each `nonce` is usable once. Emits {OwnerApprovalNonceUsed}.
     */
    function installSessionKeyWithSig(
        address key,
        SessionPolicy calldata policy,
        uint256 nonce,
        uint48 deadline,
        bytes calldata signature
    ) external;

    /**
     * @notice Revokes `key`. Other keys are untouched.
     * @dev Same callers as {installSessionKey}. Emits {SessionKeyRevoked}.
     */
    function revokeSessionKey(address key) external;

    /**
     * @notice Revokes `key` with an owner approval signed offline (EIP-712 `RevokeSessionKey(key, nonce,
     * deadline)`); anyone may relay it. Emits {OwnerApprovalNonceUsed} and {SessionKeyRevoked}.
     */
    function revokeSessionKeyWithSig(address key, uint256 nonce, uint48 deadline, bytes calldata signature) external;

    /**
     * @notice Cancels the unused owner-approval `nonce`, so a signed approval carrying it can no longer be relayed.
     * @dev Same callers as {installSessionKey}. Emits {OwnerApprovalNonceUsed}.
     */
    function cancelOwnerApproval(uint256 nonce) external;

    /// @notice The installed session keys, in no particular order.
    function sessionKeys() external view returns (address[] memory);

    /// @notice The state of `key` (all zero when it is not installed).
    function sessionKey(address key) external view returns (SessionKeyState memory);

    /**
     * @notice The permission of `key` for `(target, selector)`: whether it exists, its value limit and its rules.
     */
    function callPermission(address key, address target, bytes4 selector)
        external
        view
        returns (bool allowed, uint128 valueLimit, StoredArgRule[] memory rules);

    /// @notice Whether `value` is in the `OneOf` set of rule `ruleIndex` of `key`'s `(target, selector)` permission.
    function isOneOfValue(address key, address target, bytes4 selector, uint256 ruleIndex, bytes32 value)
        external
        view
        returns (bool);

    /// @notice Whether the owner-approval `nonce` was used or cancelled.
    function ownerApprovalNonceUsed(uint256 nonce) external view returns (bool);

    /// @notice The EIP-712 digest the owner signs to approve installing `key` with `policy`.
    function hashInstallSessionKey(address key, SessionPolicy calldata policy, uint256 nonce, uint48 deadline)
        external
        view
        returns (bytes32);

    /// @notice The EIP-712 digest the owner signs to approve revoking `key`.
    function hashRevokeSessionKey(address key, uint256 nonce, uint48 deadline) external view returns (bytes32);
}
