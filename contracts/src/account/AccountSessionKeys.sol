// SPDX-License-Identifier: MIT
pragma solidity ^0.8.26;

import {PackedUserOperation} from "@openzeppelin/contracts/interfaces/IERC4337.sol";
import {IERC7821} from "@openzeppelin/contracts/interfaces/draft-IERC7821.sol";
import {Account} from "@openzeppelin/contracts/account/Account.sol";
import {ERC7821} from "@openzeppelin/contracts/account/extensions/draft-ERC7821.sol";
import {ERC4337Utils} from "@openzeppelin/contracts/account/utils/ERC4337Utils.sol";
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
 *   charges the account). Gas values above 120 bits revert (the EntryPoint v0.7 refuses them before asking the
 *   account, `AA94`), so the charge never overflows.
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
 *
 * Gas: every session-key operation runs this validation, so it reads two storage slots per single call and writes
 * one. The key's slot 0 ({SessionCore}: gas left, time bounds, grant id, flags) is read once as a word and written
 * back once. A key whose every permission starts with an `Equal` or `OneOf` rule on the same argument is "folded"
 * (see {FOLDED}): each permission is stored once more per value of that rule, keyed by the value, so one read
 * finds a call's permission and proves its first rule (a payee allow-list plus an amount cap costs one slot, not
 * two). Other keys read the permission by `(target, selector)` and, for a `OneOf` rule, its set. The call data is
 * walked in place (see {_decodeExecuteBatch}), and {SessionKeyUsed} is anonymous, its one topic the key.
 */
abstract contract AccountSessionKeys is Account, EIP712, ERC7821, IAgentAccountSessionKeys {
    using EnumerableSet for EnumerableSet.AddressSet;

    /// @dev Length of a session-key UserOperation signature: `key (20) ++ window (6) ++ ECDSA signature (65)`.
    uint256 internal constant SESSION_SIGNATURE_LENGTH = 91;

    /// @dev The bytes of an ERC-7579 execution mode {ERC7821-supportsExecutionMode} looks at (call type, exec type,
    /// mode selector), and their one supported value: a batch that reverts on failure, selector 0.
    uint256 private constant EXECUTION_MODE_MASK = 0xffff00000000ffffffff << 176;
    uint256 private constant BATCH_EXECUTION_MODE = 0x01 << 248;

    /// @dev Head positions of the dynamic fields of an ABI-encoded {PackedUserOperation} read by {_userOpBytes}.
    uint256 private constant USEROP_CALLDATA = 0x60;
    uint256 private constant USEROP_PAYMASTER_AND_DATA = 0xe0;

    /// @dev Maximum number of argument rules per {CallPermission}.
    uint256 internal constant MAX_RULES_PER_PERMISSION = 32;

    /// @dev One slot. The first two rules' condition and offset ride along (they are also in `rules`,
    /// for the view), so validating them costs no read beyond their `value` (and none for a OneOf rule). The value
    /// of one of them rides along too when it fits in 152 bits (`inlineRule` is its index + 1, `0` for none): a
    /// per-call cap then costs no read at all. The native `valueLimit` lives in `valueLimits`, read only for a call
    /// that sends value. Validation reads the slot as one word: the `PERM_*_SHIFT` constants below are the bit
    /// positions of these fields (Solidity packs the first one in the lowest bits). A stored permission is never
    /// the zero word, as `allowed` is set.
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

    uint256 private constant PERM_RULE_COUNT_SHIFT = 8;
    /// @dev Rule `r` (0 or 1) packs its condition at bit `PERM_RULE0_SHIFT + PERM_RULE_STRIDE * r` and its offset
    /// 8 bits above it.
    uint256 private constant PERM_RULE0_SHIFT = 16;
    uint256 private constant PERM_RULE_STRIDE = 40;
    uint256 private constant PERM_INLINE_RULE_SHIFT = 96;
    uint256 private constant PERM_INLINE_VALUE_SHIFT = 104;

    /// @dev Flags of {SessionCore}: which policies beyond the gas budget and time bounds apply, i.e. whether a
    /// validation must read (and write) slot 1 of the key at all, and whether its permissions are folded.
    uint8 private constant COUNTED = 1; // `maxUses != 0`: a lifetime count
    uint8 private constant WINDOWED = 2; // `interval != 0`: a per-window limit
    /// @dev Every permission of the key starts with an `Equal` or `OneOf` rule on the same argument, whose index
    /// (`offset / 32`, below 32) is in the flags' top five bits: each permission is also stored once per value of
    /// that rule, under `folded[_foldedId(id, target, selector, value)]`, so that one read finds a call's
    /// permission and proves its rule 0 (instead of a permission read and a `OneOf` set read).
    uint8 private constant FOLDED = 4;
    uint256 private constant FOLD_INDEX_SHIFT = 3;
    uint256 private constant MAX_FOLD_INDEX = 31;

    /**
     * @dev Slot 0 of a key: everything a key with only a gas budget and time bounds needs, so that such a validation
     * reads one slot and writes it back once. `gasLeft` is the budget minus what was charged (the budget itself
     * sits in slot 2, for the view). `id` is the grant id (at most 2^24 installs per account: see
     * {_installSessionKey}). Validation reads the slot as one word: the `CORE_*_SHIFT` constants are the bit
     * positions of the fields (`gasLeft` is the low 128 bits).
     */
    struct SessionCore {
        uint128 gasLeft;
        uint48 validAfter;
        uint48 validUntil;
        uint24 id;
        uint8 flags;
    }

    uint256 private constant CORE_VALID_AFTER_SHIFT = 128;
    uint256 private constant CORE_VALID_UNTIL_SHIFT = 176;
    uint256 private constant CORE_ID_SHIFT = 224;
    uint256 private constant CORE_FLAGS_SHIFT = 248;

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
        mapping(bytes32 foldedId => StoredPermission) folded;
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
        SessionCore storage core = $.sessions[key].core;
        uint64 id = core.id;
        if (id == 0) return false;
        bytes32 pid = _permissionId(id, target, selector);
        if (ruleIndex == 0 && core.flags & FOLDED != 0) {
            // A folded key keeps its rule 0 set as folded copies of the permission (see {FOLDED}).
            StoredPermission storage permission = $.permissions[pid];
            return permission.ruleCount != 0 && permission.condition0 == ArgCondition.OneOf
                && $.folded[_foldedId(id, target, selector, value)].allowed;
        }
        return $.oneOf[_oneOfId(pid, ruleIndex, value)];
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
     *
     * Every session-key operation pays for this path, so it reads the key's slot 0 ({SessionCore}) once as a word
     * and writes it back once, and walks `callData` without copying anything to memory.
     */
    function _validateSessionUserOp(PackedUserOperation calldata userOp, bytes32 userOpHash, bytes calldata signature)
        internal
        virtual
        returns (uint256)
    {
        // The router checked the length: key (20 bytes) ++ window (6) ++ the key's 65-byte ECDSA signature.
        address key;
        uint48 window;
        bytes calldata keySignature;
        assembly ("memory-safe") {
            let head := calldataload(signature.offset)
            key := shr(96, head)
            window := and(shr(48, head), 0xffffffffffff)
            keySignature.offset := add(signature.offset, 26)
            keySignature.length := 65
        }
        uint256 validity = _useSessionKey(userOp, key, window);
        (address recovered, ECDSA.RecoverError err,) =
            ECDSA.tryRecoverCalldata(_signableUserOpHash(userOp, userOpHash), keySignature);
        bool valid = err == ECDSA.RecoverError.NoError && recovered == key;
        return validity | (valid ? ERC4337Utils.SIG_VALIDATION_SUCCESS : ERC4337Utils.SIG_VALIDATION_FAILED);
    }

    /**
     * @dev The policies of {_validateSessionUserOp}: checks them for `key`, updates its counters and returns the
     * operation's time bounds as the validation data lays them out (EntryPoint v0.7, core/Helpers.sol: validAfter
     * (48 bits) ++ validUntil (48) ++ aggregator (160), validUntil 0 meaning "no expiry"). Emits {SessionKeyUsed}.
     *
     * Every session-key operation pays for this path, so it reads the key's slot 0 ({SessionCore}) once as a word
     * and writes it back once, and walks the call data without copying any of it to memory.
     */
    function _useSessionKey(PackedUserOperation calldata userOp, address key, uint48 window)
        private
        returns (uint256 validity)
    {
        SessionKeysStorage storage $ = _getSessionKeysStorage();
        StoredSession storage session = $.sessions[key];
        uint256 core;
        assembly ("memory-safe") {
            core := sload(session.slot) // slot 0 of the key: its {SessionCore}
        }
        uint8 flags = uint8(core >> CORE_FLAGS_SHIFT);
        {
            uint64 id = uint24(core >> CORE_ID_SHIFT);
            if (id == 0) revert SessionKeyPolicyViolation(key, SessionPolicyKind.Key, 0, 0);
            _checkSessionCalls($, key, id, flags, _userOpBytes(userOp, USEROP_CALLDATA));
        }
        uint48 validAfter = uint48(core >> CORE_VALID_AFTER_SHIFT);
        uint48 validUntil = uint48(core >> CORE_VALID_UNTIL_SHIFT);
        if (flags & (COUNTED | WINDOWED) != 0) {
            // The window intersects the timestamp policy, with "no expiry" as the latest time for the comparison.
            if (validUntil == 0) validUntil = type(uint48).max;
            (validAfter, validUntil) = _useSessionRateLimit(session, flags, key, window, validAfter, validUntil);
            if (validUntil == type(uint48).max) validUntil = 0;
        }
        validity = (uint256(validAfter) << 208) | (uint256(validUntil) << 160);
        // The gas policy (every key has a budget: see {_installSessionKey}): slot 0 written back with the new
        // `gasLeft`, its other fields as read.
        uint256 gasLeft = _chargeSessionGas(uint128(core), key, userOp);
        assembly ("memory-safe") {
            sstore(session.slot, or(shl(128, shr(128, core)), gasLeft))
        }
        emit SessionKeyUsed(key);
    }

    /// @dev The call policy: `callData` is an ERC-7821 batch whose every call is allowed.
    function _checkSessionCalls(
        SessionKeysStorage storage $,
        address key,
        uint64 id,
        uint8 flags,
        bytes calldata callData
    ) private view {
        (bool decoded, uint256 calls, uint256 count, uint256 end) = _decodeExecuteBatch(callData);
        if (!decoded || count == 0) revert SessionKeyPolicyViolation(key, SessionPolicyKind.Call, 0, 0);
        mapping(bytes32 => StoredPermission) storage folded = $.folded;
        for (uint256 i = 0; i < count; ++i) {
            bool callable;
            address target;
            uint256 value;
            bytes calldata data;
            bytes4 selector;
            uint256 permission;
            assembly ("memory-safe") {
                // Call `i` as {ERC7579Utils-execBatch} reads it (see {_decodeExecuteBatch}). Branch-free like it:
                // positions first, then the conjunction of the checks, in order.
                let tupleAt := calldataload(add(calls, shl(5, i))) // from `calls`
                let tuple := add(calls, tupleAt)
                let word := calldataload(tuple)
                let dataAt := calldataload(add(tuple, 64)) // of the call data, from the tuple
                let lengthAt := add(tuple, dataAt)
                let length := calldataload(lengthAt)
                let found := and(
                    // the tuple's three head words inside the calldata, the address clean
                    and(and(lt(tupleAt, end), iszero(gt(add(tuple, 96), end))), iszero(shr(160, word))),
                    // the call data's length word and bytes inside the calldata
                    and(
                        and(lt(dataAt, end), iszero(gt(add(lengthAt, 32), end))),
                        iszero(gt(length, sub(end, add(lengthAt, 32))))
                    )
                )
                target := word
                value := calldataload(add(tuple, 32))
                data.offset := add(lengthAt, 32)
                data.length := length
                selector := mul(and(calldataload(data.offset), shl(224, 0xffffffff)), gt(length, 3))
                // No permission may match a call to the account itself, or to address(0) (which ERC-7821 executes
                // as a call to the account), nor call data of 1 to 3 bytes (no selector), nor call data of 4 or
                // more starting with 0x00000000: only empty call data is a plain transfer, selector 0x00000000.
                // Zero-prefixed call data would reach the target's fallback (or a function with that selector)
                // under a permission granted for plain transfers.
                callable := and(
                    and(found, and(iszero(iszero(word)), iszero(eq(word, address())))),
                    or(iszero(length), and(gt(length, 3), iszero(iszero(selector))))
                )
                // A folded key (see {FOLDED}): one read of folded[_foldedId(id, target, selector, word)] finds the
                // permission and proves rule 0, or finds nothing (0).
                let at := add(shl(5, shr(FOLD_INDEX_SHIFT, flags)), 4) // the word's position in the call data
                if and(and(callable, iszero(iszero(and(flags, FOLDED)))), iszero(lt(length, add(at, 32)))) {
                    mstore(0x00, or(or(selector, shl(64, target)), id)) // as {_foldedId}, in scratch space
                    mstore(0x20, calldataload(add(data.offset, at)))
                    mstore(0x00, keccak256(0x00, 0x40))
                    mstore(0x20, folded.slot)
                    permission := sload(keccak256(0x00, 0x40))
                }
            }
            if (!callable) revert SessionKeyPolicyViolation(key, SessionPolicyKind.Call, i, 0);
            if (permission != 0) {
                _checkSessionCallRules($, key, id, i, target, selector, value, data, permission, 1, 0);
            } else {
                _checkSessionCallUnfolded($, key, id, flags, i, target, selector, value, data);
            }
        }
    }

    /**
     * @dev A call of a key that is not folded (its permission is read by `pid`), or of a folded key whose folded
     * lookup found nothing: then rule 0 fails, or no permission allows the call; this says which, in the order the
     * unfolded path checks them (permission, value limit, rules).
     */
    function _checkSessionCallUnfolded(
        SessionKeysStorage storage $,
        address key,
        uint64 id,
        uint8 flags,
        uint256 index,
        address target,
        bytes4 selector,
        uint256 value,
        bytes calldata data
    ) private view {
        bytes32 pid = _permissionId(id, target, selector);
        uint256 permission = _loadWord($.permissions[pid]);
        if (permission == 0) revert SessionKeyPolicyViolation(key, SessionPolicyKind.Call, index, 0);
        if (flags & FOLDED != 0) {
            if (value != 0 && value > $.valueLimits[pid]) {
                revert SessionKeyPolicyViolation(key, SessionPolicyKind.Value, index, 0);
            }
            revert SessionKeyPolicyViolation(key, SessionPolicyKind.Argument, index, 0);
        }
        _checkSessionCallRules($, key, id, index, target, selector, value, data, permission, 0, pid);
    }

    /**
     * @dev The value limit and the rules from `firstRule` on of the call's `permission` (packed). `pid` may be 0
     * when the permission came from a folded lookup: only the value limit, a rule past rule 1, or rule 1 without
     * its value inline (a OneOf rule, or a value wider than 152 bits) need it, and it is computed then.
     */
    function _checkSessionCallRules(
        SessionKeysStorage storage $,
        address key,
        uint64 id,
        uint256 index,
        address target,
        bytes4 selector,
        uint256 value,
        bytes calldata data,
        uint256 permission,
        uint256 firstRule,
        bytes32 pid
    ) private view {
        uint256 ruleCount = uint8(permission >> PERM_RULE_COUNT_SHIFT);
        bool needed;
        assembly ("memory-safe") {
            let inlineRule := and(shr(PERM_INLINE_RULE_SHIFT, permission), 0xff)
            needed := and(iszero(pid), or(iszero(iszero(value)), gt(ruleCount, add(1, eq(inlineRule, 2)))))
        }
        if (needed) pid = _permissionId(id, target, selector);
        if (value != 0 && value > $.valueLimits[pid]) {
            revert SessionKeyPolicyViolation(key, SessionPolicyKind.Value, index, 0);
        }
        for (uint256 r = firstRule; r < ruleCount; ++r) {
            if (!_ruleHolds($, pid, r, data, permission)) {
                revert SessionKeyPolicyViolation(key, SessionPolicyKind.Argument, index, r);
            }
        }
    }

    /// @dev Whether rule `r` of permission `pid` (packed `permission`) holds for `data`. A OneOf rule never reads
    /// its `value` slot, and a packed rule (0 or 1, see {StoredPermission}) not its condition slot either, nor its
    /// `value` slot when the value is inline.
    function _ruleHolds(
        SessionKeysStorage storage $,
        bytes32 pid,
        uint256 r,
        bytes calldata data,
        uint256 permission
    ) private view returns (bool) {
        uint256 condition;
        uint256 offset;
        uint256 value;
        bool inlined;
        assembly ("memory-safe") {
            let rule := shr(add(PERM_RULE0_SHIFT, mul(r, PERM_RULE_STRIDE)), permission) // meaningful for r < 2
            condition := and(rule, 0xff)
            offset := and(shr(8, rule), 0xffffffff)
            inlined := eq(and(shr(PERM_INLINE_RULE_SHIFT, permission), 0xff), add(r, 1)) // r < 32: no overflow
            value := shr(PERM_INLINE_VALUE_SHIFT, permission)
        }
        if (r > 1) {
            StoredArgRule storage stored = $.rules[pid][r];
            (condition, offset) = (uint8(stored.condition), stored.offset);
        }
        (bool found, bytes32 word) = ArgRules.wordAt(data, offset);
        if (!found) return false;
        if (condition == uint8(ArgCondition.OneOf)) return $.oneOf[_oneOfId(pid, r, word)];
        if (!inlined) value = uint256($.rules[pid][r].value);
        // Equal or LessOrEqual (see {ArgRules-compare}).
        return condition == uint8(ArgCondition.Equal) ? uint256(word) == value : uint256(word) <= value;
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

    /**
     * @dev The gas policy: charges the operation's worst-case cost to what is left of the budget; returns the rest.
     * Reverts unless every gas value and `maxFeePerGas` fits in 120 bits, as the EntryPoint v0.7 itself requires
     * (`AA94 gas values overflow`) before it asks the account: the cost then cannot overflow.
     */
    function _chargeSessionGas(uint256 gasLeft, address key, PackedUserOperation calldata userOp)
        private
        pure
        returns (uint256)
    {
        uint256 accountGasLimits = uint256(userOp.accountGasLimits); // verificationGasLimit ++ callGasLimit
        uint256 preVerificationGas = userOp.preVerificationGas;
        uint256 maxFeePerGas = uint128(uint256(userOp.gasFees)); // the low half of gasFees
        // paymaster (20) ++ paymasterVerificationGasLimit (16) ++ paymasterPostOpGasLimit (16) ++ data, as
        // {ERC4337Utils} reads it (shorter: no paymaster gas).
        bytes calldata paymasterAndData = _userOpBytes(userOp, USEROP_PAYMASTER_AND_DATA);
        uint256 paymasterGasLimits;
        if (paymasterAndData.length >= 52) {
            assembly ("memory-safe") {
                paymasterGasLimits := calldataload(add(paymasterAndData.offset, 20))
            }
        }
        uint256 highest = preVerificationGas | (accountGasLimits >> 128) | uint128(accountGasLimits) | maxFeePerGas
            | (paymasterGasLimits >> 128) | uint128(paymasterGasLimits);
        if (highest > type(uint120).max) revert SessionKeyPolicyViolation(key, SessionPolicyKind.Gas, 0, 0);
        uint256 cost;
        unchecked {
            // five values below 2**120: the sum is below 2**123, the product below 2**243
            cost = (preVerificationGas + (accountGasLimits >> 128) + uint128(accountGasLimits)
                        + (paymasterGasLimits >> 128) + uint128(paymasterGasLimits)) * maxFeePerGas;
        }
        if (cost > gasLeft) revert SessionKeyPolicyViolation(key, SessionPolicyKind.Gas, 0, 0);
        unchecked {
            return gasLeft - cost;
        }
    }

    /**
     * @dev Walks `callData` as `execute(bytes32 mode, bytes executionData)` in the one mode {ERC7821} supports
     * (batch, default exec type, selector 0: see {ERC7821-supportsExecutionMode}; the other bytes of the mode are
     * free) with `executionData` an ERC-7821 batch, `abi.encode(Execution[])`, and returns where the batch's offset
     * table starts (`calls`, an absolute calldata position), its length, and `end`, the end of `callData`.
     * `decoded` is false for any other selector, mode or shape.
     *
     * The checks are those of {ERC7821-execute}'s ABI decoder and {ERC7579Utils-decodeBatch}, with every position
     * bounded by the end of `callData`, which is the whole calldata of the `execute` call the EntryPoint makes: an
     * encoding this accepts decodes to the same calls there. (It is stricter only where an offset is absurd.)
     */
    function _decodeExecuteBatch(bytes calldata callData)
        private
        pure
        returns (bool decoded, uint256 calls, uint256 count, uint256 end)
    {
        bytes4 selector = IERC7821.execute.selector;
        assembly ("memory-safe") {
            // Branch-free: every position is computed, then every check is ANDed. A check may see garbage (a wrapped
            // sum, a word read past the end, which calldataload returns as zero) only when one before it failed, so
            // `decoded` is exactly the conjunction of the checks made in order, each on values the earlier ones
            // bounded.
            let start := callData.offset
            let length := callData.length
            end := add(start, length)
            let offset := calldataload(add(start, 36)) // of executionData, from after the selector
            let data := add(add(start, 36), offset) // executionData, after its length word
            let dataLength := calldataload(sub(data, 32))
            // executionData = abi.encode(Execution[]): the array's offset, then its length and the tuples' offsets
            let arrayAt := calldataload(data)
            count := calldataload(add(data, arrayAt))
            calls := add(add(data, arrayAt), 32)
            decoded := and(
                and(
                    and(gt(length, 67), eq(shr(224, calldataload(start)), shr(224, selector))),
                    // callType (byte 0) batch, execType (byte 1) default, mode selector (bytes 6-9) zero
                    eq(and(calldataload(add(start, 4)), EXECUTION_MODE_MASK), BATCH_EXECUTION_MODE)
                ),
                and(
                    // the length word and the bytes inside callData
                    and(lt(offset, length), and(iszero(gt(data, end)), iszero(gt(dataLength, sub(end, data))))),
                    // the array's length word, and its offsets, inside executionData ({ERC7579Utils-decodeBatch})
                    and(
                        and(gt(dataLength, 31), iszero(gt(arrayAt, sub(dataLength, 32)))),
                        iszero(gt(count, shr(5, sub(sub(dataLength, arrayAt), 32))))
                    )
                )
            )
        }
    }

    /**
     * @dev The `bytes` field of `userOp` whose head sits at `head`, like `userOp.callData` but without the bounds
     * checks of the ABI decoder: only the EntryPoint calls {validateUserOp}, and it encodes the operation itself
     * (a malformed encoding from anywhere else is refused by `onlyEntryPoint` first).
     */
    function _userOpBytes(PackedUserOperation calldata userOp, uint256 head)
        private
        pure
        returns (bytes calldata field)
    {
        assembly ("memory-safe") {
            let lengthAt := add(userOp, calldataload(add(userOp, head)))
            field.offset := add(lengthAt, 32)
            field.length := calldataload(lengthAt)
        }
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
        uint8 fold = _foldFlags(policy.permissions);
        session.core = SessionCore({
            gasLeft: policy.gasBudget,
            validAfter: policy.validAfter,
            validUntil: policy.validUntil,
            id: uint24(id),
            flags: (policy.maxUses != 0 ? COUNTED : 0) | (policy.interval != 0 ? WINDOWED : 0) | fold
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
            _storePermission($, key, id, fold != 0, i, policy.permissions[i]);
        }
        $.keys.add(key);
        emit SessionKeyInstalled(key, id, policy);
    }

    /**
     * @dev The {FOLDED} flag and fold index for `permissions`, or 0 when they cannot be folded: every permission
     * must start with an `Equal` or `OneOf` rule on the same word-aligned argument, of index at most
     * {MAX_FOLD_INDEX}.
     */
    function _foldFlags(CallPermission[] calldata permissions) private pure returns (uint8) {
        uint256 offset;
        for (uint256 i = 0; i < permissions.length; ++i) {
            ArgRule[] calldata rules = permissions[i].rules;
            if (rules.length == 0 || rules[0].condition == ArgCondition.LessOrEqual) return 0;
            if (i == 0) offset = rules[0].offset;
            else if (rules[0].offset != offset) return 0;
        }
        if (offset % 32 != 0 || offset / 32 > MAX_FOLD_INDEX) return 0;
        return FOLDED | uint8((offset / 32) << FOLD_INDEX_SHIFT);
    }

    function _storePermission(
        SessionKeysStorage storage $,
        address key,
        uint64 id,
        bool folded,
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
        // The first of rules 0-1 with one value that fits in 152 bits carries it inline (see {StoredPermission}),
        // rule 1 only when the key is folded (its lookup proves rule 0).
        for (uint256 r = folded ? 1 : 0; r < ruleCount && r < 2; ++r) {
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
                // A folded key's rule 0 set is the set of its folded copies (written below).
                if (!folded || r != 0) {
                    for (uint256 v = 0; v < count; ++v) {
                        $.oneOf[_oneOfId(pid, r, rule.values[v])] = true;
                    }
                }
                $.rules[pid][r] = StoredArgRule(rule.condition, rule.offset, bytes32(count));
            } else {
                if (count != 1) revert SessionKeyInvalidPolicy(key, 8, index);
                $.rules[pid][r] = StoredArgRule(rule.condition, rule.offset, rule.values[0]);
            }
        }
        if (folded) {
            uint256 word = _loadWord($.permissions[pid]);
            bytes32[] calldata values = permission.rules[0].values;
            for (uint256 v = 0; v < values.length; ++v) {
                StoredPermission storage copy = $.folded[_foldedId(id, target, permission.selector, values[v])];
                assembly ("memory-safe") {
                    sstore(copy.slot, word)
                }
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

    /**
     * @dev `keccak256(abi.encodePacked(selector, target, id, value))`: the key of a folded copy (see {FOLDED}). The
     * first three fill one word (4 + 20 + 8 bytes), so validation hashes it in scratch space.
     */
    function _foldedId(uint64 id, address target, bytes4 selector, bytes32 value) private pure returns (bytes32 fid) {
        assembly ("memory-safe") {
            mstore(0x00, or(or(and(selector, shl(224, 0xffffffff)), shl(64, and(target, sub(shl(160, 1), 1)))), and(id, 0xffffffffffffffff)))
            mstore(0x20, value)
            fid := keccak256(0x00, 0x40)
        }
    }

    /// @dev The one-slot `permission` as the word validation unpacks (see {StoredPermission}).
    function _loadWord(StoredPermission storage permission) private view returns (uint256 word) {
        assembly ("memory-safe") {
            word := sload(permission.slot)
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
