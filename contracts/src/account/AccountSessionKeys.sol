// SPDX-License-Identifier: MIT
pragma solidity ^0.8.26;

import {PackedUserOperation} from "@openzeppelin/contracts/interfaces/IERC4337.sol";
import {IERC7821} from "@openzeppelin/contracts/interfaces/draft-IERC7821.sol";
import {Execution} from "@openzeppelin/contracts/interfaces/draft-IERC7579.sol";
import {Account} from "@openzeppelin/contracts/account/Account.sol";
import {ERC7821} from "@openzeppelin/contracts/account/extensions/draft-ERC7821.sol";
import {ERC4337Utils} from "@openzeppelin/contracts/account/utils/ERC4337Utils.sol";
import {ERC7579Utils} from "@openzeppelin/contracts/account/utils/draft-ERC7579Utils.sol";
import {ECDSA} from "@openzeppelin/contracts/utils/cryptography/ECDSA.sol";
import {EIP712} from "@openzeppelin/contracts/utils/cryptography/EIP712.sol";
import {EnumerableSet} from "@openzeppelin/contracts/utils/structs/EnumerableSet.sol";

import {ArgRules} from "./ArgRules.sol";
import {IAgentAccountSessionKeys} from "./IAgentAccountSessionKeys.sol";
import {
    ArgCondition,
    ArgRule,
    CallPermission,
    SessionKeyState,
    SessionPolicy,
    SessionPolicyKind,
    StoredArgRule
} from "./SessionKeyTypes.sol";
import {SessionKeyTypedData} from "./SessionKeyTypedData.sol";
import {MultichainApproval} from "../multichain/MultichainApproval.sol";

/**
 * @dev ERC-4337 session keys with composable policies for an {Account} that executes through {ERC7821} batches.
 *
 * A UserOperation is signed either by the owner (the account's {AbstractSigner}: a plain 65-byte ECDSA
 * signature, handled by `super`) or by a session key, with a signature of exactly 91 bytes:
 *
 * ```
 * abi.encodePacked(address key, uint48 window, bytes sig)    // 20 + 6 + 65 bytes
 * ```
 *
 * where `sig` is the key's 65-byte ECDSA signature of {Account-_signableUserOpHash} and `window` is the rate-limit
 * window the operation claims (`floor(now / interval)`; any value when the key has no per-window limit). The
 * window is not signed: a wrong one can only make the operation invalid (see the rate-limit policy below).
 *
 * Every policy of the key must pass. A policy violation reverts with {SessionKeyPolicyViolation}, which the
 * EntryPoint v0.7 reports as `FailedOpWithRevert(opIndex, "AA23 reverted", inner)` so the submitter learns which
 * policy failed and for which call. A signature by another key returns `SIG_VALIDATION_FAILED` (`AA24`), as
 * ERC-4337 requires for signature mismatches. Time bounds are returned in the validation data (`AA22`).
 *
 * Policies:
 *
 * - Call policy: `callData` must be `execute(mode, executionData)` in ERC-7821 batch mode; every call of the batch
 *   must match an allowed `(target, selector)` ({CallPermission}), send at most its `valueLimit`, and satisfy all
 *   its {ArgRule}s. A call's selector is the first four bytes of its calldata; empty calldata (a plain native
 *   transfer) matches only the selector `0x00000000`, and calldata of 1 to 3 bytes, or of 4 or more starting with
 *   `0x00000000`, matches nothing (so a plain-transfer permission never lets arbitrary calldata through, and no
 *   function whose selector is `0x00000000` can be allowed). Calls to the account itself (or to `address(0)`, which ERC-7821 maps to the account) are never
 *   allowed, so a session key can neither install keys nor reach any other owner function.
 * - Timestamp policy: `validAfter` / `validUntil`, returned in the validation data.
 * - Rate-limit policy, counted in UserOperations (a batch counts once):
 *   - `maxUses`: a lifetime count;
 *   - `maxUsesPerInterval` per `interval`: windows are fixed, `[w * interval, (w + 1) * interval - 1]` in Unix
 *     seconds. The signature names `w`. Validation requires `w` to be nonzero and no older than the last window
 *     used, counts the use in `w` (resetting the count when `w` is newer), and returns the window's bounds intersected with the
 *     timestamp policy as `validAfter` / `validUntil`. The EntryPoint then rejects the operation unless it runs
 *     inside `w`, and a rejected operation reverts its counters with it. So at most `maxUsesPerInterval`
 *     operations execute per window, exactly, without reading the clock during validation (ERC-7562).
 * - Gas policy: `gasBudget` wei; each operation is charged its worst case, `(preVerificationGas +
 *   verificationGasLimit + callGasLimit + paymasterVerificationGasLimit + paymasterPostOpGasLimit) * maxFeePerGas`,
 *   at validation (nothing is refunded afterwards, as the EntryPoint's actual cost is not known yet). Every key
 *   has one: installing a policy with `gasBudget == 0` reverts. A key that submits its own operations (it is its
 *   own bundler, so it collects their fees) chooses `maxFeePerGas`; without a budget it could turn the account's
 *   whole native balance into fees paid to itself. An owner who truly wants no cap says so with
 *   `type(uint128).max`. The budget counts operations sponsored by a paymaster too (an ERC-20 paymaster still
 *   charges the account).
 *
 * Limits are per call (`valueLimit`, argument rules) or per UserOperation (rate limit, gas): a batch of `n` calls
 * may move `n` times a per-call cap in one operation. Bound the batch's total where it matters (e.g. a budget in the
 * escrow the key pays through).
 *
 * Installing a key gives it a fresh grant id; its permissions and counters live under that id, so revoking and
 * reinstalling never resurrects old state. Revocation applies to UserOperations validated after it executed: in a
 * bundle, every validation runs before any execution, so do not bundle a revocation with the revoked key's ops.
 *
 * Storage is ERC-7201 namespaced and only the account's own storage is read during validation (ERC-7562).
 */
abstract contract AccountSessionKeys is Account, EIP712, ERC7821, IAgentAccountSessionKeys {
    using EnumerableSet for EnumerableSet.AddressSet;

    /// @dev Length of a session-key UserOperation signature: `key (20) ++ window (6) ++ ECDSA signature (65)`.
    uint256 internal constant SESSION_SIGNATURE_LENGTH = 91;

    /// @dev Maximum number of argument rules per {CallPermission}.
    uint256 internal constant MAX_RULES_PER_PERMISSION = 32;

    /// @dev One slot. The first two rules' condition and offset ride along (they are also in `rules`,
    /// for the view), so validating them costs no read beyond their `value` (and none for a OneOf rule). The value
    /// of one of them rides along too when it fits in 152 bits (`inlineRule` is its index + 1, `0` for none): a
    /// per-call cap then costs no read at all. The native `valueLimit` lives in `valueLimits`, read only for a call
    /// that sends value.
    struct StoredPermission {
        bool allowed;
        uint8 ruleCount;
        ArgCondition condition0;
        uint32 offset0;
        ArgCondition condition1;
        uint32 offset1;
        uint8 inlineRule;
        uint152 inlineValue;
    }

    /// @dev Flags of {SessionCore}: which policies beyond the gas budget and time bounds apply, i.e. whether a
    /// validation must read (and write) slot 1 of the key at all.
    uint8 private constant COUNTED = 1; // `maxUses != 0`: a lifetime count
    uint8 private constant WINDOWED = 2; // `interval != 0`: a per-window limit

    /**
     * @dev Slot 0 of a key: everything a key with only a gas budget and time bounds needs, so that such a validation
     * reads one slot and writes it back once. `gasLeft` is the budget minus what was charged (the budget itself
     * sits in slot 2, for the view). `id` is the grant id (at most 2^24 installs per account: see
     * {_installSessionKey}).
     */
    struct SessionCore {
        uint128 gasLeft;
        uint48 validAfter;
        uint48 validUntil;
        uint24 id;
        uint8 flags;
    }

    /// @dev Slot 1 of a key: the rate limits, read and written only when {SessionCore} flags them.
    struct SessionLimits {
        uint32 maxUses;
        uint32 uses;
        uint48 interval;
        uint32 maxUsesPerInterval;
        uint48 window;
        uint32 windowUses;
    }

    /// @dev Slots 0-2 of a key; slot 2 is the gas budget as installed, read only by {sessionKey}.
    struct StoredSession {
        SessionCore core;
        SessionLimits limits;
        uint128 gasBudget;
    }

    /// @custom:storage-location erc7201:agentpay.storage.AgentAccountSessionKeys
    struct SessionKeysStorage {
        uint64 lastId;
        EnumerableSet.AddressSet keys;
        mapping(address key => StoredSession) sessions;
        mapping(bytes32 permissionId => StoredPermission) permissions;
        mapping(bytes32 permissionId => mapping(uint256 ruleIndex => StoredArgRule)) rules;
        mapping(bytes32 oneOfId => bool) oneOf;
        mapping(uint256 nonce => bool) usedApprovalNonces;
        mapping(bytes32 permissionId => uint128) valueLimits;
    }

    // keccak256(abi.encode(uint256(keccak256("agentpay.storage.AgentAccountSessionKeys")) - 1)) & ~bytes32(uint256(0xff))
    bytes32 private constant SESSION_KEYS_STORAGE_LOCATION =
        0x017365a9919982b1c601068788427ac83d6add28318ec194b54a03edd5d58100;

    function _getSessionKeysStorage() private pure returns (SessionKeysStorage storage $) {
        assembly ("memory-safe") {
            $.slot := SESSION_KEYS_STORAGE_LOCATION
        }
    }

    /// @dev Reverts unless the caller may install and revoke session keys. Defaults to the EntryPoint or self.
    modifier onlySessionKeyAdmin() {
        _checkSessionKeyAdmin();
        _;
    }

    // ------------------------------------------------------------------ owner functions

    /// @inheritdoc IAgentAccountSessionKeys
    function installSessionKey(address key, SessionPolicy calldata policy) public virtual onlySessionKeyAdmin {
        _installSessionKey(key, policy);
    }

    /// @inheritdoc IAgentAccountSessionKeys
    function installSessionKeyWithSig(
        address key,
        SessionPolicy calldata policy,
        uint256 nonce,
        uint48 deadline,
        bytes calldata signature
    ) public virtual {
        _useOwnerApproval(SessionKeyTypedData.hashInstall(key, policy, nonce, deadline), nonce, deadline, signature);
        _installSessionKey(key, policy);
    }

    /// @inheritdoc IAgentAccountSessionKeys
    function revokeSessionKey(address key) public virtual onlySessionKeyAdmin {
        _revokeSessionKey(key);
    }

    /// @inheritdoc IAgentAccountSessionKeys
    function revokeSessionKeyWithSig(address key, uint256 nonce, uint48 deadline, bytes calldata signature)
        public
        virtual
    {
        _useOwnerApproval(SessionKeyTypedData.hashRevoke(key, nonce, deadline), nonce, deadline, signature);
        _revokeSessionKey(key);
    }

    /**
     * @notice Installs `key` with the owner's ONE signature over many chains: `approval` carries the signed Merkle
     * root, the proof of this chain's leaf and the owner's signature of `MultichainApproval(root)` (see
     * {MultichainApproval}). The leaf is the `InstallSessionKey(key, policy, nonce, deadline)` struct hash bound to
     * `block.chainid` and this account, so a leaf for another chain or account is refused; `nonce` and `deadline`
     * work as in {installSessionKeyWithSig} (single use per account, relayable until `deadline`). Anyone may relay.
     * @dev Emits {SessionKeyInstalled}, {OwnerApprovalNonceUsed} and {MultichainApproval-MultichainApprovalUsed}.
     */
    function installSessionKeyWithProof(
        address key,
        SessionPolicy calldata policy,
        uint256 nonce,
        uint48 deadline,
        MultichainApproval.Proof calldata approval
    ) public virtual {
        _useMultichainOwnerApproval(
            SessionKeyTypedData.hashInstall(key, policy, nonce, deadline), nonce, deadline, approval
        );
        _installSessionKey(key, policy);
    }

    /**
     * @notice Revokes `key` with the owner's one multichain signature (leaf: `RevokeSessionKey(key, nonce,
     * deadline)` for this chain and account): one signed root revokes the key on every account listed.
     * @dev Emits {SessionKeyRevoked}, {OwnerApprovalNonceUsed} and {MultichainApproval-MultichainApprovalUsed}.
     */
    function revokeSessionKeyWithProof(
        address key,
        uint256 nonce,
        uint48 deadline,
        MultichainApproval.Proof calldata approval
    ) public virtual {
        _useMultichainOwnerApproval(SessionKeyTypedData.hashRevoke(key, nonce, deadline), nonce, deadline, approval);
        _revokeSessionKey(key);
    }

    /**
     * @notice Burns the owner-approval `nonce` with the owner's one multichain signature (leaf:
     * `CancelOwnerApproval(nonce)` for this chain and account), so that an install leaf (or signed install) with
     * that nonce, not yet relayed here, never can be: with {revokeSessionKeyWithProof} for accounts where the key
     * is installed, this is what "revoke everywhere" needs where it is not.
     * @dev Emits {OwnerApprovalNonceUsed} and {MultichainApproval-MultichainApprovalUsed}. Reverts with
     * {OwnerApprovalNonceAlreadyUsed} when the nonce is already used (the install landed: revoke the key instead).
     */
    function cancelOwnerApprovalWithProof(uint256 nonce, MultichainApproval.Proof calldata approval) public virtual {
        _useMultichainOwnerApproval(SessionKeyTypedData.hashCancel(nonce), nonce, type(uint48).max, approval);
    }

    /// @inheritdoc IAgentAccountSessionKeys
    function cancelOwnerApproval(uint256 nonce) public virtual onlySessionKeyAdmin {
        SessionKeysStorage storage $ = _getSessionKeysStorage();
        if ($.usedApprovalNonces[nonce]) revert OwnerApprovalNonceAlreadyUsed(nonce);
        $.usedApprovalNonces[nonce] = true;
        emit OwnerApprovalNonceUsed(nonce);
    }

    // ------------------------------------------------------------------ views

    /// @inheritdoc IAgentAccountSessionKeys
    function sessionKeys() public view virtual returns (address[] memory) {
        return _getSessionKeysStorage().keys.values();
    }

    /// @inheritdoc IAgentAccountSessionKeys
    function sessionKey(address key) public view virtual returns (SessionKeyState memory) {
        StoredSession storage session = _getSessionKeysStorage().sessions[key];
        SessionKeyState memory state;
        SessionCore memory core = session.core;
        (state.id, state.validAfter, state.validUntil) = (core.id, core.validAfter, core.validUntil);
        SessionLimits memory limits = session.limits;
        (state.maxUses, state.uses) = (limits.maxUses, limits.uses);
        (state.interval, state.maxUsesPerInterval, state.window, state.windowUses) =
        (limits.interval, limits.maxUsesPerInterval, limits.window, limits.windowUses);
        state.gasBudget = session.gasBudget;
        state.gasSpent = state.gasBudget - core.gasLeft;
        return state;
    }

    /// @inheritdoc IAgentAccountSessionKeys
    function callPermission(address key, address target, bytes4 selector)
        public
        view
        virtual
        returns (bool allowed, uint128 valueLimit, StoredArgRule[] memory rules)
    {
        SessionKeysStorage storage $ = _getSessionKeysStorage();
        uint64 id = $.sessions[key].core.id;
        if (id == 0) return (false, 0, rules);
        bytes32 pid = _permissionId(id, target, selector);
        StoredPermission memory permission = $.permissions[pid];
        rules = new StoredArgRule[](permission.ruleCount);
        for (uint256 i = 0; i < rules.length; ++i) {
            rules[i] = $.rules[pid][i];
        }
        return (permission.allowed, $.valueLimits[pid], rules);
    }

    /// @inheritdoc IAgentAccountSessionKeys
    function isOneOfValue(address key, address target, bytes4 selector, uint256 ruleIndex, bytes32 value)
        public
        view
        virtual
        returns (bool)
    {
        SessionKeysStorage storage $ = _getSessionKeysStorage();
        uint64 id = $.sessions[key].core.id;
        return id != 0 && $.oneOf[_oneOfId(_permissionId(id, target, selector), ruleIndex, value)];
    }

    /// @inheritdoc IAgentAccountSessionKeys
    function ownerApprovalNonceUsed(uint256 nonce) public view virtual returns (bool) {
        return _getSessionKeysStorage().usedApprovalNonces[nonce];
    }

    /// @inheritdoc IAgentAccountSessionKeys
    function hashInstallSessionKey(address key, SessionPolicy calldata policy, uint256 nonce, uint48 deadline)
        public
        view
        virtual
        returns (bytes32)
    {
        return _hashTypedDataV4(SessionKeyTypedData.hashInstall(key, policy, nonce, deadline));
    }

    /// @inheritdoc IAgentAccountSessionKeys
    function hashRevokeSessionKey(address key, uint256 nonce, uint48 deadline) public view virtual returns (bytes32) {
        return _hashTypedDataV4(SessionKeyTypedData.hashRevoke(key, nonce, deadline));
    }

    // ------------------------------------------------------------------ validation

    /**
     * @dev Routes {SESSION_SIGNATURE_LENGTH}-byte signatures to {_validateSessionUserOp}, anything else to the
     * owner's validation (`super`).
     */
    function _validateUserOp(PackedUserOperation calldata userOp, bytes32 userOpHash, bytes calldata signature)
        internal
        virtual
        override
        returns (uint256)
    {
        if (signature.length == SESSION_SIGNATURE_LENGTH) {
            return _validateSessionUserOp(userOp, userOpHash, signature);
        }
        return super._validateUserOp(userOp, userOpHash, signature);
    }

    /**
     * @dev Checks every policy of the key named in `signature` and updates its counters. Reverts with
     * {SessionKeyPolicyViolation} on a policy failure; returns the validation data (signature result and the
     * intersected time bounds) otherwise.
     */
    function _validateSessionUserOp(PackedUserOperation calldata userOp, bytes32 userOpHash, bytes calldata signature)
        internal
        virtual
        returns (uint256)
    {
        address key = address(bytes20(signature[0:20]));
        uint48 window = uint48(bytes6(signature[20:26]));

        SessionKeysStorage storage $ = _getSessionKeysStorage();
        StoredSession storage session = $.sessions[key];
        SessionCore memory core = session.core; // the one read every validation makes of the key's slots
        if (core.id == 0) revert SessionKeyPolicyViolation(key, SessionPolicyKind.Key, 0, 0);

        _checkSessionCalls($, key, core.id, userOp.callData);
        uint48 validAfter = core.validAfter;
        uint48 validUntil = core.validUntil == 0 ? type(uint48).max : core.validUntil;
        if (core.flags != 0) {
            (validAfter, validUntil) = _useSessionRateLimit(session, core.flags, key, window, validAfter, validUntil);
        }
        // The gas policy (every key has a budget: see {_installSessionKey}), written back with the same slot.
        session.core.gasLeft = _chargeSessionGas(core.gasLeft, key, userOp);
        emit SessionKeyUsed(key, core.id);

        (address recovered, ECDSA.RecoverError err,) =
            ECDSA.tryRecoverCalldata(_signableUserOpHash(userOp, userOpHash), signature[26:]);
        bool valid = err == ECDSA.RecoverError.NoError && recovered == key;
        // EntryPoint v0.7 layout (core/Helpers.sol): validAfter (48) ++ validUntil (48) ++ aggregator (160), where
        // validUntil 0 means "no expiry" (so an unbounded, valid operation returns plain 0).
        if (validUntil == type(uint48).max) validUntil = 0;
        return (uint256(validAfter) << 208) | (uint256(validUntil) << 160)
            | (valid ? ERC4337Utils.SIG_VALIDATION_SUCCESS : ERC4337Utils.SIG_VALIDATION_FAILED);
    }

    /// @dev The call policy: `callData` is an ERC-7821 batch whose every call is allowed.
    function _checkSessionCalls(SessionKeysStorage storage $, address key, uint64 id, bytes calldata callData)
        private
        view
    {
        (bool decoded, bytes32 mode, bytes calldata executionData) = _decodeExecuteCall(callData);
        if (!decoded || !supportsExecutionMode(mode)) {
            revert SessionKeyPolicyViolation(key, SessionPolicyKind.Call, 0, 0);
        }
        // The same decoder {ERC7821-execute} runs, so validation and execution see the same calls.
        Execution[] calldata calls = ERC7579Utils.decodeBatch(executionData);
        if (calls.length == 0) revert SessionKeyPolicyViolation(key, SessionPolicyKind.Call, 0, 0);
        for (uint256 i = 0; i < calls.length; ++i) {
            _checkSessionCall($, key, id, i, calls[i]);
        }
    }

    function _checkSessionCall(
        SessionKeysStorage storage $,
        address key,
        uint64 id,
        uint256 index,
        Execution calldata call
    ) private view {
        address target = call.target;
        bytes calldata data = call.callData;
        // ERC-7821 executes a call to address(0) as a call to the account itself.
        if (target == address(0) || target == address(this)) {
            revert SessionKeyPolicyViolation(key, SessionPolicyKind.Call, index, 0);
        }
        // Empty calldata is a plain transfer, selector 0x00000000. Calldata that merely *starts* with four zero bytes
        // is not: it would reach the target's fallback (or a function with that selector) under a permission granted
        // for plain transfers. Calldata of 1-3 bytes has no selector at all. Both match no permission.
        bytes4 selector;
        if (data.length >= 4) {
            selector = bytes4(data[0:4]);
            if (selector == bytes4(0)) revert SessionKeyPolicyViolation(key, SessionPolicyKind.Call, index, 0);
        } else if (data.length != 0) {
            revert SessionKeyPolicyViolation(key, SessionPolicyKind.Call, index, 0);
        }

        bytes32 pid = _permissionId(id, target, selector);
        StoredPermission memory permission = $.permissions[pid];
        if (!permission.allowed) revert SessionKeyPolicyViolation(key, SessionPolicyKind.Call, index, 0);
        uint256 value = call.value;
        if (value != 0 && value > $.valueLimits[pid]) {
            revert SessionKeyPolicyViolation(key, SessionPolicyKind.Value, index, 0);
        }
        for (uint256 r = 0; r < permission.ruleCount; ++r) {
            if (!_ruleHolds($, pid, r, data, permission)) {
                revert SessionKeyPolicyViolation(key, SessionPolicyKind.Argument, index, r);
            }
        }
    }

    /// @dev Whether rule `r` of permission `pid` holds for `data`. A OneOf rule never reads its `value` slot, and
    /// an inline rule (see {StoredPermission}) not its condition slot either.
    function _ruleHolds(
        SessionKeysStorage storage $,
        bytes32 pid,
        uint256 r,
        bytes calldata data,
        StoredPermission memory permission
    ) private view returns (bool) {
        ArgCondition condition;
        uint32 offset;
        if (r == 0) {
            (condition, offset) = (permission.condition0, permission.offset0);
        } else if (r == 1) {
            (condition, offset) = (permission.condition1, permission.offset1);
        } else {
            StoredArgRule storage stored = $.rules[pid][r];
            (condition, offset) = (stored.condition, stored.offset);
        }
        (bool found, bytes32 word) = ArgRules.wordAt(data, offset);
        if (!found) return false;
        if (condition == ArgCondition.OneOf) return $.oneOf[_oneOfId(pid, r, word)];
        bytes32 value =
            permission.inlineRule == r + 1 ? bytes32(uint256(permission.inlineValue)) : $.rules[pid][r].value;
        return ArgRules.compare(condition, word, value);
    }

    /**
     * @dev The rate-limit policy (see the contract documentation), for a key whose `flags` name one; also intersects
     * the timestamp policy's `validAfter` / `validUntil` with the window. Returns the operation's bounds.
     */
    function _useSessionRateLimit(
        StoredSession storage session,
        uint8 flags,
        address key,
        uint48 window,
        uint48 validAfter,
        uint48 validUntil
    ) private returns (uint48, uint48) {
        SessionLimits memory limits = session.limits;
        if (flags & COUNTED != 0) {
            if (limits.uses >= limits.maxUses) {
                revert SessionKeyPolicyViolation(key, SessionPolicyKind.RateLimit, 0, 0);
            }
            limits.uses += 1;
        }

        if (flags & WINDOWED != 0) {
            if (window == 0 || window < limits.window) {
                revert SessionKeyPolicyViolation(key, SessionPolicyKind.RateLimit, 0, 0);
            }
            uint32 used = window == limits.window ? limits.windowUses : 0;
            if (used >= limits.maxUsesPerInterval) {
                revert SessionKeyPolicyViolation(key, SessionPolicyKind.RateLimit, 0, 0);
            }
            uint256 start = uint256(window) * limits.interval;
            uint256 end = start + limits.interval - 1;
            if (start > validUntil || end < validAfter) {
                revert SessionKeyPolicyViolation(key, SessionPolicyKind.Timestamp, 0, 0);
            }
            // Both fit in 48 bits: start <= validUntil and end < validUntil when it replaces it.
            if (start > validAfter) validAfter = uint48(start);
            if (end < validUntil) validUntil = uint48(end);
            limits.window = window;
            limits.windowUses = used + 1;
        }
        session.limits = limits; // one write of the slot, whichever counters moved
        return (validAfter, validUntil);
    }

    /// @dev The gas policy: charges the operation's worst-case cost to what is left of the budget; returns the rest.
    function _chargeSessionGas(uint128 gasLeft, address key, PackedUserOperation calldata userOp)
        private
        pure
        returns (uint128)
    {
        uint256 cost =
            (userOp.preVerificationGas
                    + ERC4337Utils.verificationGasLimit(userOp)
                    + ERC4337Utils.callGasLimit(userOp)
                    + ERC4337Utils.paymasterVerificationGasLimit(userOp)
                    + ERC4337Utils.paymasterPostOpGasLimit(userOp)) * ERC4337Utils.maxFeePerGas(userOp);
        if (cost > gasLeft) revert SessionKeyPolicyViolation(key, SessionPolicyKind.Gas, 0, 0);
        unchecked {
            return uint128(gasLeft - cost); // cost <= gasLeft
        }
    }

    /**
     * @dev Splits `callData` as Solidity's ABI decoder does for `execute(bytes32 mode, bytes executionData)`,
     * following the offset of `executionData`. Returns `decoded == false` for any other selector or shape.
     */
    function _decodeExecuteCall(bytes calldata callData)
        private
        pure
        returns (bool decoded, bytes32 mode, bytes calldata executionData)
    {
        executionData = callData[0:0];
        if (callData.length < 68 || bytes4(callData[0:4]) != IERC7821.execute.selector) {
            return (false, 0, executionData);
        }
        mode = bytes32(callData[4:36]);
        uint256 offset = uint256(bytes32(callData[36:68]));
        // callData.length is far below 2**64 and offset is bounded by it before any addition: no overflow.
        unchecked {
            if (offset > callData.length) return (false, 0, executionData);
            uint256 lengthAt = 4 + offset;
            if (lengthAt + 32 > callData.length) return (false, 0, executionData);
            uint256 length = uint256(bytes32(callData[lengthAt:lengthAt + 32]));
            if (length > callData.length - lengthAt - 32) return (false, 0, executionData);
            executionData = callData[lengthAt + 32:lengthAt + 32 + length];
        }
        return (true, mode, executionData);
    }

    // ------------------------------------------------------------------ install / revoke

    /// @dev Checks `policy` and stores it under a fresh grant id. Emits {SessionKeyInstalled}.
    function _installSessionKey(address key, SessionPolicy calldata policy) internal virtual {
        if (key == address(0) || key == address(this)) revert SessionKeyInvalidPolicy(key, 1, 0);
        if (policy.validUntil != 0 && policy.validUntil < policy.validAfter) revert SessionKeyInvalidPolicy(key, 2, 0);
        if ((policy.interval == 0) != (policy.maxUsesPerInterval == 0)) revert SessionKeyInvalidPolicy(key, 3, 0);
        if (policy.permissions.length == 0) revert SessionKeyInvalidPolicy(key, 4, 0);
        // No implicit "unlimited": a key that bundles its own operations sets their fee rate and collects the fees.
        if (policy.gasBudget == 0) revert SessionKeyInvalidPolicy(key, 9, 0);

        SessionKeysStorage storage $ = _getSessionKeysStorage();
        uint64 previous = $.sessions[key].core.id;
        if (previous != 0) emit SessionKeyRevoked(key, previous);

        uint64 id = ++$.lastId;
        // The id shares slot 0 with what every validation reads (see {SessionCore}); 2^24 installs would take
        // trillions of gas, so this never binds in practice, but it must not wrap into an earlier grant's id.
        if (id > type(uint24).max) revert SessionKeyInvalidPolicy(key, 10, 0);
        StoredSession storage session = $.sessions[key];
        session.core = SessionCore({
            gasLeft: policy.gasBudget,
            validAfter: policy.validAfter,
            validUntil: policy.validUntil,
            id: uint24(id),
            flags: (policy.maxUses != 0 ? COUNTED : 0) | (policy.interval != 0 ? WINDOWED : 0)
        });
        session.limits = SessionLimits({
            maxUses: policy.maxUses,
            uses: 0,
            interval: policy.interval,
            maxUsesPerInterval: policy.maxUsesPerInterval,
            window: 0,
            windowUses: 0
        });
        session.gasBudget = policy.gasBudget;
        for (uint256 i = 0; i < policy.permissions.length; ++i) {
            _storePermission($, key, id, i, policy.permissions[i]);
        }
        $.keys.add(key);
        emit SessionKeyInstalled(key, id, policy);
    }

    function _storePermission(
        SessionKeysStorage storage $,
        address key,
        uint64 id,
        uint256 index,
        CallPermission calldata permission
    ) private {
        address target = permission.target;
        if (target == address(0) || target == address(this)) revert SessionKeyInvalidPolicy(key, 5, index);
        bytes32 pid = _permissionId(id, target, permission.selector);
        if ($.permissions[pid].allowed) revert SessionKeyInvalidPolicy(key, 6, index);
        uint256 ruleCount = permission.rules.length;
        if (ruleCount > MAX_RULES_PER_PERMISSION) revert SessionKeyInvalidPolicy(key, 7, index);
        StoredPermission memory stored;
        (stored.allowed, stored.ruleCount) = (true, uint8(ruleCount));
        if (ruleCount > 0) {
            (stored.condition0, stored.offset0) = (permission.rules[0].condition, permission.rules[0].offset);
        }
        if (ruleCount > 1) {
            (stored.condition1, stored.offset1) = (permission.rules[1].condition, permission.rules[1].offset);
        }
        // The first of rules 0-1 with one value that fits in 152 bits carries it inline (see {StoredPermission}).
        for (uint256 r = 0; r < ruleCount && r < 2; ++r) {
            ArgRule calldata rule = permission.rules[r];
            if (
                rule.condition != ArgCondition.OneOf && rule.values.length == 1
                    && uint256(rule.values[0]) <= type(uint152).max
            ) {
                (stored.inlineRule, stored.inlineValue) = (uint8(r + 1), uint152(uint256(rule.values[0])));
                break;
            }
        }
        $.permissions[pid] = stored;
        if (permission.valueLimit != 0) $.valueLimits[pid] = permission.valueLimit;
        for (uint256 r = 0; r < ruleCount; ++r) {
            ArgRule calldata rule = permission.rules[r];
            uint256 count = rule.values.length;
            if (rule.condition == ArgCondition.OneOf) {
                if (count == 0) revert SessionKeyInvalidPolicy(key, 8, index);
                for (uint256 v = 0; v < count; ++v) {
                    $.oneOf[_oneOfId(pid, r, rule.values[v])] = true;
                }
                $.rules[pid][r] = StoredArgRule(rule.condition, rule.offset, bytes32(count));
            } else {
                if (count != 1) revert SessionKeyInvalidPolicy(key, 8, index);
                $.rules[pid][r] = StoredArgRule(rule.condition, rule.offset, rule.values[0]);
            }
        }
    }

    /// @dev Deletes the grant of `key`. Emits {SessionKeyRevoked}.
    function _revokeSessionKey(address key) internal virtual {
        SessionKeysStorage storage $ = _getSessionKeysStorage();
        uint64 id = $.sessions[key].core.id;
        if (id == 0) revert SessionKeyNotInstalled(key);
        delete $.sessions[key];
        $.keys.remove(key);
        emit SessionKeyRevoked(key, id);
    }

    /**
     * @dev Checks an owner approval (EIP-712 `structHash` under this account's domain, signed by the owner) and
     * consumes its nonce. Emits {OwnerApprovalNonceUsed}.
     */
    function _useOwnerApproval(bytes32 structHash, uint256 nonce, uint48 deadline, bytes calldata signature)
        internal
        virtual
    {
        if (block.timestamp > deadline) revert OwnerApprovalExpired(deadline);
        SessionKeysStorage storage $ = _getSessionKeysStorage();
        if ($.usedApprovalNonces[nonce]) revert OwnerApprovalNonceAlreadyUsed(nonce);
        if (!_rawSignatureValidation(_hashTypedDataV4(structHash), signature)) {
            revert OwnerApprovalInvalidSignature();
        }
        $.usedApprovalNonces[nonce] = true;
        emit OwnerApprovalNonceUsed(nonce);
    }

    /**
     * @dev {_useOwnerApproval} for a multichain approval: the proof must place this chain's leaf of `structHash`
     * under the root, and the owner must have signed the root (chainless domain, see {MultichainApproval}).
     */
    function _useMultichainOwnerApproval(
        bytes32 structHash,
        uint256 nonce,
        uint48 deadline,
        MultichainApproval.Proof calldata approval
    ) internal virtual {
        (bytes32 digest, bytes32 node) = MultichainApproval.verify(approval, structHash);
        if (block.timestamp > deadline) revert OwnerApprovalExpired(deadline);
        SessionKeysStorage storage $ = _getSessionKeysStorage();
        if ($.usedApprovalNonces[nonce]) revert OwnerApprovalNonceAlreadyUsed(nonce);
        if (!_rawSignatureValidation(digest, approval.signature)) revert OwnerApprovalInvalidSignature();
        $.usedApprovalNonces[nonce] = true;
        emit OwnerApprovalNonceUsed(nonce);
        emit MultichainApproval.MultichainApprovalUsed(address(this), approval.root, node);
    }

    /// @dev Reverts unless the caller may manage session keys. Override to add the owner's own address.
    function _checkSessionKeyAdmin() internal view virtual {
        _checkEntryPointOrSelf();
    }

    /// @dev `keccak256(abi.encode(id, target, selector))`, hashed in place: validation computes it for every call.
    function _permissionId(uint64 id, address target, bytes4 selector) private pure returns (bytes32 pid) {
        assembly ("memory-safe") {
            let ptr := mload(0x40)
            mstore(ptr, and(id, 0xffffffffffffffff))
            mstore(add(ptr, 0x20), and(target, 0xffffffffffffffffffffffffffffffffffffffff))
            mstore(add(ptr, 0x40), and(selector, shl(224, 0xffffffff)))
            pid := keccak256(ptr, 0x60)
        }
    }

    /// @dev `keccak256(abi.encode(pid, ruleIndex, value))`, hashed in place like {_permissionId}.
    function _oneOfId(bytes32 pid, uint256 ruleIndex, bytes32 value) private pure returns (bytes32 oneOfId) {
        assembly ("memory-safe") {
            let ptr := mload(0x40)
            mstore(ptr, pid)
            mstore(add(ptr, 0x20), ruleIndex)
            mstore(add(ptr, 0x40), value)
            oneOfId := keccak256(ptr, 0x60)
        }
    }
}
