// SPDX-License-Identifier: MIT
pragma solidity ^0.8.26;

import {PackedUserOperation} from "@openzeppelin/contracts/interfaces/IERC4337.sol";
import {IERC7821} from "@openzeppelin/contracts/interfaces/draft-IERC7821.sol";
import {Execution} from "@openzeppelin/contracts/interfaces/draft-IERC7579.sol";
import {MessageHashUtils} from "@openzeppelin/contracts/utils/cryptography/MessageHashUtils.sol";

import {AccountTestBase, Recorder} from "./account/AccountTestBase.sol";
import {IAgentAccountSessionKeys} from "../src/account/IAgentAccountSessionKeys.sol";
import {
    ArgCondition,
    ArgRule,
    CallPermission,
    SessionKeyState,
    SessionPolicy,
    SessionPolicyKind
} from "../src/account/SessionKeyTypes.sol";

/// @dev Every session-key policy through the real EntryPoint v0.7: each passes, and each failure is reported.
contract AgentAccountSessionKeysTest is AccountTestBase {
    address internal key;
    uint256 internal keyPk;

    function setUp() public override {
        super.setUp();
        (key, keyPk) = makeAddrAndKey("session");
    }

    function _session(bytes memory callData) internal view returns (PackedUserOperation memory) {
        return _signSession(_op(callData), key, keyPk);
    }

    function _sessionInWindow(bytes memory callData, uint48 window) internal view returns (PackedUserOperation memory) {
        return _signSession(_op(callData), key, keyPk, window);
    }

    // ------------------------------------------------------------------ key

    function test_AllowedCallExecutes() public {
        _install(key, _recordPolicy());
        // anonymous: its one topic is the key
        vm.expectEmitAnonymous(true, false, false, false, true, address(account));
        emit IAgentAccountSessionKeys.SessionKeyUsed(key);
        _handle(_session(_recordCall(5, 6)));
        assertEq(recorder.calls(), 1);
        assertEq(recorder.lastB(), 6);
    }

    function test_UnknownKeyFails() public {
        _handleViolation(_session(_recordCall(1, 1)), key, SessionPolicyKind.Key, 0, 0);
    }

    function test_SignatureByAnotherKeyFails() public {
        _install(key, _recordPolicy());
        (, uint256 otherPk) = makeAddrAndKey("other");
        _handleFailedOp(_signSession(_op(_recordCall(1, 1)), key, otherPk), "AA24 signature error");
    }

    function test_SessionKeyCannotSignERC1271() public {
        _install(key, _recordPolicy());
        bytes32 hash = keccak256("anything");
        bytes memory sig = abi.encodePacked(key, uint48(0), signPacked(keyPk, hash));
        assertEq(account.isValidSignature(hash, sig), bytes4(0xffffffff));
    }

    // ------------------------------------------------------------------ call policy

    function test_Call_TargetNotAllowed() public {
        _install(key, _recordPolicy());
        Recorder other = new Recorder();
        _handleViolation(
            _session(_execute1(address(other), 0, abi.encodeCall(Recorder.record, (1, 1)))),
            key,
            SessionPolicyKind.Call,
            0,
            0
        );
    }

    function test_Call_SelectorNotAllowed() public {
        _install(key, _recordPolicy());
        _handleViolation(
            _session(_execute1(address(recorder), 0, abi.encodeCall(Recorder.recordAddress, (key, 1)))),
            key,
            SessionPolicyKind.Call,
            0,
            0
        );
    }

    function test_Call_SelfCallNeverAllowed() public {
        _install(key, _recordPolicy());
        (address other,) = makeAddrAndKey("other");
        bytes memory install = abi.encodeCall(account.installSessionKey, (other, _recordPolicy()));
        // Through execute, as a call to the account ...
        _handleViolation(_session(_execute1(address(account), 0, install)), key, SessionPolicyKind.Call, 0, 0);
        // ... through address(0), which ERC-7821 maps to the account ...
        _handleViolation(_session(_execute1(address(0), 0, install)), key, SessionPolicyKind.Call, 0, 0);
        // ... or as the UserOperation's own callData.
        _handleViolation(_session(install), key, SessionPolicyKind.Call, 0, 0);
    }

    function test_Call_OnlyBatchExecute() public {
        _install(key, _recordPolicy());
        bytes memory batch = abi.encode(_single(address(recorder), abi.encodeCall(Recorder.record, (1, 1))));
        // Single-call mode (not supported by the account either).
        _handleViolation(
            _session(abi.encodeCall(IERC7821.execute, (bytes32(0), batch))), key, SessionPolicyKind.Call, 0, 0
        );
        // Try mode.
        _handleViolation(
            _session(abi.encodeCall(IERC7821.execute, (bytes32(uint256(0x0101) << 240), batch))),
            key,
            SessionPolicyKind.Call,
            0,
            0
        );
        // Empty batch.
        _handleViolation(_session(_execute(new Execution[](0))), key, SessionPolicyKind.Call, 0, 0);
        // Empty callData.
        _handleViolation(_session(""), key, SessionPolicyKind.Call, 0, 0);
    }

    function test_Call_ShortCalldataFails() public {
        _install(key, _recordPolicy());
        _handleViolation(_session(_execute1(address(recorder), 0, hex"abcd")), key, SessionPolicyKind.Call, 0, 0);
    }

    function test_Call_PlainTransferNeedsSelectorZero() public {
        _install(key, _recordPolicy());
        _handleViolation(_session(_execute1(address(recorder), 0, "")), key, SessionPolicyKind.Call, 0, 0);

        CallPermission[] memory permissions = new CallPermission[](1);
        permissions[0] = _permission(address(recorder), bytes4(0), 1 ether, new ArgRule[](0));
        _install(key, _policy(permissions));
        _handle(_session(_execute1(address(recorder), 1 ether, "")));
        assertEq(recorder.received(), 1 ether);
    }

    /// @dev A plain-transfer permission `(target, 0x00000000)` matches empty calldata only (issue 9, item 11).
    function test_Call_PlainTransferPermissionRefusesZeroPrefixedCalldata() public {
        CallPermission[] memory permissions = new CallPermission[](1);
        permissions[0] = _permission(address(recorder), bytes4(0), 1 ether, new ArgRule[](0));
        _install(key, _policy(permissions));

        // Four zero bytes and then anything: reaches the target's fallback, not a plain transfer.
        _handleViolation(
            _session(_execute1(address(recorder), 0, abi.encodePacked(bytes4(0), uint256(1), uint256(2)))),
            key,
            SessionPolicyKind.Call,
            0,
            0
        );
        _handleViolation(_session(_execute1(address(recorder), 0, hex"00000000")), key, SessionPolicyKind.Call, 0, 0);
        // One to three bytes have no selector at all.
        _handleViolation(_session(_execute1(address(recorder), 0, hex"00")), key, SessionPolicyKind.Call, 0, 0);
        _handleViolation(_session(_execute1(address(recorder), 0, hex"000000")), key, SessionPolicyKind.Call, 0, 0);
        // Empty calldata is the plain transfer the permission was granted for.
        _handle(_session(_execute1(address(recorder), 1 ether, "")));
        assertEq(recorder.received(), 1 ether);
    }

    /// @dev Whatever calldata a plain-transfer key sends, only empty calldata passes validation.
    function testFuzz_Call_PlainTransferPermissionOnlyEmptyCalldata(bytes memory data) public {
        vm.assume(data.length != 0);
        CallPermission[] memory permissions = new CallPermission[](1);
        permissions[0] = _permission(address(recorder), bytes4(0), 1 ether, new ArgRule[](0));
        _install(key, _policy(permissions));
        _handleViolation(_session(_execute1(address(recorder), 0, data)), key, SessionPolicyKind.Call, 0, 0);
    }

    function test_Call_NonCanonicalEncodingSeesSameCalls() public {
        _install(key, _recordPolicy());
        Recorder other = new Recorder();
        // `execute` calldata whose bytes offset points past a decoy: the decoy would pass, the real batch would not.
        bytes memory decoy = abi.encode(_single(address(recorder), abi.encodeCall(Recorder.record, (1, 1))));
        bytes memory real = abi.encode(_single(address(other), abi.encodeCall(Recorder.record, (1, 1))));
        bytes memory callData = abi.encodePacked(
            IERC7821.execute.selector,
            BATCH_MODE,
            uint256(0x40 + 0x20 + decoy.length), // offset of the real bytes
            decoy.length,
            decoy,
            real.length,
            real
        );
        _handleViolation(_session(callData), key, SessionPolicyKind.Call, 0, 0);
    }

    function _single(address target, bytes memory data) internal pure returns (Execution[] memory calls) {
        calls = new Execution[](1);
        calls[0] = Execution(target, 0, data);
    }

    // ------------------------------------------------------------------ value limit

    function test_Value_WithinAndAboveLimit() public {
        CallPermission[] memory permissions = new CallPermission[](1);
        permissions[0] = _permission(address(recorder), Recorder.record.selector, 1 ether, new ArgRule[](0));
        _install(key, _policy(permissions));

        _handle(_session(_execute1(address(recorder), 1 ether, abi.encodeCall(Recorder.record, (1, 1)))));
        assertEq(recorder.received(), 1 ether);

        _handleViolation(
            _session(_execute1(address(recorder), 1 ether + 1, abi.encodeCall(Recorder.record, (1, 1)))),
            key,
            SessionPolicyKind.Value,
            0,
            0
        );
    }

    // ------------------------------------------------------------------ argument rules

    function _installRules(ArgRule[] memory rules) internal {
        CallPermission[] memory permissions = new CallPermission[](1);
        permissions[0] = _permission(address(recorder), Recorder.record.selector, 0, rules);
        _install(key, _policy(permissions));
    }

    function test_Argument_Equal() public {
        ArgRule[] memory rules = new ArgRule[](1);
        rules[0] = _rule(ArgCondition.Equal, 0, bytes32(uint256(42)));
        _installRules(rules);
        _handle(_session(_recordCall(42, 0)));
        _handleViolation(_session(_recordCall(43, 0)), key, SessionPolicyKind.Argument, 0, 0);
    }

    function test_Argument_LessOrEqual() public {
        ArgRule[] memory rules = new ArgRule[](1);
        rules[0] = _rule(ArgCondition.LessOrEqual, 32, bytes32(uint256(1000)));
        _installRules(rules);
        _handle(_session(_recordCall(0, 1000)));
        _handle(_session(_recordCall(0, 0)));
        _handleViolation(_session(_recordCall(0, 1001)), key, SessionPolicyKind.Argument, 0, 0);
        assertEq(recorder.calls(), 2);
    }

    function test_Argument_OneOf() public {
        bytes32[] memory values = new bytes32[](3);
        values[0] = bytes32(uint256(7));
        values[1] = bytes32(uint256(8));
        values[2] = bytes32(uint256(9));
        ArgRule[] memory rules = new ArgRule[](1);
        rules[0] = _oneOf(0, values);
        _installRules(rules);
        _handle(_session(_recordCall(7, 0)));
        _handle(_session(_recordCall(9, 0)));
        _handleViolation(_session(_recordCall(10, 0)), key, SessionPolicyKind.Argument, 0, 0);
    }

    function test_Argument_ReportsRuleIndex() public {
        ArgRule[] memory rules = new ArgRule[](2);
        rules[0] = _rule(ArgCondition.LessOrEqual, 0, bytes32(uint256(10)));
        rules[1] = _rule(ArgCondition.Equal, 32, bytes32(uint256(5)));
        _installRules(rules);
        _handleViolation(_session(_recordCall(10, 6)), key, SessionPolicyKind.Argument, 0, 1);
        _handleViolation(_session(_recordCall(11, 5)), key, SessionPolicyKind.Argument, 0, 0);
    }

    function test_Argument_WordBeyondCalldataFails() public {
        ArgRule[] memory rules = new ArgRule[](1);
        // record(a, b) has two words; a third (offset 64) does not exist. Even "<= max" fails.
        rules[0] = _rule(ArgCondition.LessOrEqual, 64, bytes32(type(uint256).max));
        _installRules(rules);
        _handleViolation(_session(_recordCall(1, 1)), key, SessionPolicyKind.Argument, 0, 0);
    }

    // ------------------------------------------------------------------ batches

    function test_Batch_EveryCallChecked() public {
        ArgRule[] memory rules = new ArgRule[](1);
        rules[0] = _rule(ArgCondition.LessOrEqual, 0, bytes32(uint256(100)));
        _installRules(rules);

        Execution[] memory calls = new Execution[](3);
        calls[0] = _call(address(recorder), 0, abi.encodeCall(Recorder.record, (1, 0)));
        calls[1] = _call(address(recorder), 0, abi.encodeCall(Recorder.record, (2, 0)));
        calls[2] = _call(address(recorder), 0, abi.encodeCall(Recorder.record, (101, 0)));
        _handleViolation(_session(_execute(calls)), key, SessionPolicyKind.Argument, 2, 0);

        calls[2] = _call(makeAddr("elsewhere"), 0, abi.encodeCall(Recorder.record, (3, 0)));
        _handleViolation(_session(_execute(calls)), key, SessionPolicyKind.Call, 2, 0);

        calls[2] = _call(address(recorder), 0, abi.encodeCall(Recorder.record, (3, 0)));
        _handle(_session(_execute(calls)));
        assertEq(recorder.calls(), 3);
    }

    function test_Batch_IsAtomicForSessionKeys() public {
        CallPermission[] memory permissions = new CallPermission[](2);
        permissions[0] = _permission(address(recorder), Recorder.record.selector, 0, new ArgRule[](0));
        permissions[1] = _permission(address(recorder), Recorder.refuse.selector, 0, new ArgRule[](0));
        _install(key, _policy(permissions));
        Execution[] memory calls = new Execution[](3);
        calls[0] = _call(address(recorder), 0, abi.encodeCall(Recorder.record, (1, 0)));
        calls[1] = _call(address(recorder), 0, abi.encodeCall(Recorder.refuse, (2)));
        calls[2] = _call(address(recorder), 0, abi.encodeCall(Recorder.record, (3, 0)));
        PackedUserOperation memory op = _session(_execute(calls));
        vm.expectEmit(true, true, false, true, address(ENTRYPOINT));
        emit UserOperationRevertReason(
            _hash(op), address(account), op.nonce, abi.encodeWithSelector(Recorder.RecorderRefused.selector, 2)
        );
        _handle(op);
        assertEq(recorder.calls(), 0);
    }

    // ------------------------------------------------------------------ timestamp policy

    function test_Timestamp_Window() public {
        SessionPolicy memory policy = _recordPolicy();
        policy.validAfter = uint48(block.timestamp + 100);
        policy.validUntil = uint48(block.timestamp + 200);
        _install(key, policy);
        // Absolute times: through the IR pipeline (this file imports the factory, which foundry.toml compiles via
        // IR) `block.timestamp` may be read once per function, so `warp(block.timestamp + d)` would not accumulate.
        uint256 start = block.timestamp;

        _handleFailedOp(_session(_recordCall(1, 1)), "AA22 expired or not due");

        vm.warp(start + 100);
        _handle(_session(_recordCall(1, 1)));
        vm.warp(start + 200);
        _handle(_session(_recordCall(1, 1)));

        vm.warp(start + 201);
        _handleFailedOp(_session(_recordCall(1, 1)), "AA22 expired or not due");
        assertEq(recorder.calls(), 2);
    }

    function test_Timestamp_ReturnedInValidationData() public {
        SessionPolicy memory policy = _recordPolicy();
        policy.validAfter = 1000;
        policy.validUntil = 2000;
        _install(key, policy);
        PackedUserOperation memory op = _op(_recordCall(1, 1));
        bytes32 hash = keccak256("any hash");
        op.signature =
            abi.encodePacked(key, uint48(0), signPacked(keyPk, MessageHashUtils.toEthSignedMessageHash(hash)));
        vm.prank(address(ENTRYPOINT));
        uint256 validationData = account.validateUserOp(op, hash, 0);
        assertEq(validationData, (uint256(1000) << 208) | (uint256(2000) << 160));
    }

    // ------------------------------------------------------------------ rate limit

    function test_RateLimit_LifetimeUses() public {
        SessionPolicy memory policy = _recordPolicy();
        policy.maxUses = 2;
        _install(key, policy);
        _handle(_session(_recordCall(1, 1)));
        _handle(_session(_recordCall(1, 1)));
        assertEq(account.sessionKey(key).uses, 2);
        _handleViolation(_session(_recordCall(1, 1)), key, SessionPolicyKind.RateLimit, 0, 0);
    }

    function test_RateLimit_PerWindow() public {
        SessionPolicy memory policy = _recordPolicy();
        policy.interval = 3600;
        policy.maxUsesPerInterval = 2;
        _install(key, policy);
        vm.warp(3600 * 500_000 + 10); // 10 s into window 500000
        uint48 w = uint48(block.timestamp / 3600);

        _handle(_sessionInWindow(_recordCall(1, 1), w));
        _handle(_sessionInWindow(_recordCall(1, 1), w));
        _handleViolation(_sessionInWindow(_recordCall(1, 1), w), key, SessionPolicyKind.RateLimit, 0, 0);

        // Claiming the next window early: the EntryPoint rejects it, and nothing is counted.
        _handleFailedOp(_sessionInWindow(_recordCall(1, 1), w + 1), "AA22 expired or not due");
        assertEq(account.sessionKey(key).window, w);

        // The last second of window w is still w; the next one is w + 1.
        vm.warp(uint256(w) * 3600 + 3599);
        _handleViolation(_sessionInWindow(_recordCall(1, 1), w), key, SessionPolicyKind.RateLimit, 0, 0);
        vm.warp(uint256(w + 1) * 3600);
        _handle(_sessionInWindow(_recordCall(1, 1), w + 1));
        _handle(_sessionInWindow(_recordCall(1, 1), w + 1));
        _handleViolation(_sessionInWindow(_recordCall(1, 1), w + 1), key, SessionPolicyKind.RateLimit, 0, 0);

        // Going back to an older window is refused.
        _handleViolation(_sessionInWindow(_recordCall(1, 1), w), key, SessionPolicyKind.RateLimit, 0, 0);
        // Window 0 is never valid.
        _handleViolation(_sessionInWindow(_recordCall(1, 1), 0), key, SessionPolicyKind.RateLimit, 0, 0);

        SessionKeyState memory state = account.sessionKey(key);
        assertEq(state.window, w + 1);
        assertEq(state.windowUses, 2);
        assertEq(recorder.calls(), 4);
    }

    function test_RateLimit_WindowOutsideValidityIsTimestampViolation() public {
        SessionPolicy memory policy = _recordPolicy();
        policy.interval = 60;
        policy.maxUsesPerInterval = 1;
        policy.validUntil = uint48(block.timestamp + 30);
        _install(key, policy);
        uint48 future = uint48(block.timestamp / 60 + 2);
        _handleViolation(_sessionInWindow(_recordCall(1, 1), future), key, SessionPolicyKind.Timestamp, 0, 0);
    }

    function test_RateLimit_WindowIntersectsTimestampPolicy() public {
        SessionPolicy memory policy = _recordPolicy();
        policy.interval = 100;
        policy.maxUsesPerInterval = 5;
        policy.validAfter = 1050;
        policy.validUntil = 1120;
        _install(key, policy);
        PackedUserOperation memory op = _op(_recordCall(1, 1));
        bytes32 hash = keccak256("h");
        op.signature =
            abi.encodePacked(key, uint48(10), signPacked(keyPk, MessageHashUtils.toEthSignedMessageHash(hash)));
        vm.prank(address(ENTRYPOINT));
        uint256 validationData = account.validateUserOp(op, hash, 0);
        // window 10 = [1000, 1099], intersected with [1050, 1120] = [1050, 1099]
        assertEq(validationData, (uint256(1050) << 208) | (uint256(1099) << 160));
    }

    // ------------------------------------------------------------------ gas budget

    function test_Gas_BudgetChargedAtWorstCase() public {
        uint256 cost = (PRE_VERIFICATION_GAS + VERIFICATION_GAS + CALL_GAS) * MAX_FEE;
        SessionPolicy memory policy = _recordPolicy();
        policy.gasBudget = uint128(2 * cost);
        _install(key, policy);

        _handle(_session(_recordCall(1, 1)));
        assertEq(account.sessionKey(key).gasSpent, cost);
        _handle(_session(_recordCall(1, 1)));
        assertEq(account.sessionKey(key).gasSpent, 2 * cost);
        _handleViolation(_session(_recordCall(1, 1)), key, SessionPolicyKind.Gas, 0, 0);
    }

    function test_Gas_CheaperOperationStillFits() public {
        uint256 cost = (PRE_VERIFICATION_GAS + VERIFICATION_GAS + CALL_GAS) * MAX_FEE;
        SessionPolicy memory policy = _recordPolicy();
        policy.gasBudget = uint128(cost + cost / 2);
        _install(key, policy);
        _handle(_session(_recordCall(1, 1)));
        // A full-price op no longer fits, one at half the fee does.
        _handleViolation(_session(_recordCall(1, 1)), key, SessionPolicyKind.Gas, 0, 0);
        PackedUserOperation memory op = _op(_recordCall(1, 1));
        op.gasFees = bytes32((PRIORITY_FEE << 128) | (MAX_FEE / 2));
        _handle(_signSession(op, key, keyPk));
        assertEq(recorder.calls(), 2);
    }

    /// @dev No implicit "unlimited" gas: a key with no budget, bundling its own operations, would set their fee
    /// rate and collect the fees from the account's balance. Installing one is refused (issue 9, item 11).
    function test_Gas_BudgetRequiredAtInstall() public {
        SessionPolicy memory policy = _recordPolicy();
        policy.gasBudget = 0;
        vm.prank(owner);
        vm.expectRevert(abi.encodeWithSelector(IAgentAccountSessionKeys.SessionKeyInvalidPolicy.selector, key, 9, 0));
        account.installSessionKey(key, policy);
        assertEq(account.sessionKey(key).id, 0);
    }

    /// @dev A key that is its own bundler and names a fee rate that would burn the account's balance is stopped at
    /// validation by its budget: the account pays nothing and the key collects nothing.
    function test_Gas_SelfBundlingKeyCannotTurnBalanceIntoFees() public {
        SessionPolicy memory policy = _recordPolicy();
        policy.gasBudget = 0.01 ether;
        _install(key, policy);
        uint256 balance = address(account).balance;
        PackedUserOperation memory op = _op(_recordCall(1, 1));
        uint256 gasTotal = PRE_VERIFICATION_GAS + VERIFICATION_GAS + CALL_GAS;
        uint256 greedyFee = balance / gasTotal; // the whole balance as fees
        op.gasFees = bytes32((greedyFee << 128) | greedyFee);
        _handleViolation(_signSession(op, key, keyPk), key, SessionPolicyKind.Gas, 0, 0);
        assertEq(address(account).balance, balance);
        assertEq(account.sessionKey(key).gasSpent, 0);
    }

    // ------------------------------------------------------------------ revocation

    function test_Revoke_IsolatesKeys() public {
        (address other, uint256 otherPk) = makeAddrAndKey("other");
        _install(key, _recordPolicy());
        _install(other, _recordPolicy());
        vm.prank(owner);
        account.revokeSessionKey(key);

        _handleViolation(_session(_recordCall(1, 1)), key, SessionPolicyKind.Key, 0, 0);
        _handle(_signSession(_op(_recordCall(2, 2)), other, otherPk));
        assertEq(recorder.calls(), 1);
        address[] memory keys = account.sessionKeys();
        assertEq(keys.length, 1);
        assertEq(keys[0], other);
    }

    function test_Revoke_EffectiveForNextOperation() public {
        _install(key, _recordPolicy());
        _handle(_session(_recordCall(1, 1)));
        // The owner revokes with a UserOperation of its own.
        _handle(_signOwner(_op(abi.encodeCall(account.revokeSessionKey, (key)))));
        _handleViolation(_session(_recordCall(1, 1)), key, SessionPolicyKind.Key, 0, 0);
    }

    function test_Revoke_ReinstallStartsFresh() public {
        SessionPolicy memory policy = _recordPolicy();
        policy.maxUses = 1;
        policy.gasBudget = 1 ether;
        _install(key, policy);
        _handle(_session(_recordCall(1, 1)));
        _handleViolation(_session(_recordCall(1, 1)), key, SessionPolicyKind.RateLimit, 0, 0);
        vm.prank(owner);
        account.revokeSessionKey(key);

        // Reinstall with a different permission: the old one is gone, counters restart.
        Recorder other = new Recorder();
        CallPermission[] memory permissions = new CallPermission[](1);
        permissions[0] = _permission(address(other), Recorder.record.selector, 0, new ArgRule[](0));
        SessionPolicy memory fresh = _policy(permissions);
        fresh.maxUses = 1;
        fresh.gasBudget = 1 ether;
        _install(key, fresh);
        SessionKeyState memory state = account.sessionKey(key);
        assertEq(state.id, 2);
        assertEq(state.uses, 0);
        assertEq(state.gasSpent, 0);
        (bool allowed,,) = account.callPermission(key, address(recorder), Recorder.record.selector);
        assertFalse(allowed);

        _handleViolation(_session(_recordCall(1, 1)), key, SessionPolicyKind.Call, 0, 0);
        _handle(_session(_execute1(address(other), 0, abi.encodeCall(Recorder.record, (1, 1)))));
        assertEq(other.calls(), 1);
    }

    // ------------------------------------------------------------------ nonce lanes

    function test_SessionKeyOnSixteenLanes() public {
        SessionPolicy memory policy = _recordPolicy();
        policy.maxUses = 16;
        _install(key, policy);
        PackedUserOperation[] memory ops = new PackedUserOperation[](16);
        for (uint256 i = 0; i < 16; ++i) {
            ops[i] = _signSession(_opOnLane(uint192(1000 + i), _recordCall(i, i)), key, keyPk);
        }
        _handleAll(ops);
        assertEq(recorder.calls(), 16);
        assertEq(account.sessionKey(key).uses, 16);
    }

    function test_AllPoliciesTogether() public {
        ArgRule[] memory rules = new ArgRule[](1);
        rules[0] = _rule(ArgCondition.LessOrEqual, 32, bytes32(uint256(100)));
        CallPermission[] memory permissions = new CallPermission[](1);
        permissions[0] = _permission(address(recorder), Recorder.record.selector, 0.1 ether, rules);
        SessionPolicy memory policy = SessionPolicy({
            validAfter: uint48(block.timestamp),
            validUntil: uint48(block.timestamp + 7 days),
            maxUses: 10,
            interval: 3600,
            maxUsesPerInterval: 3,
            gasBudget: 0.05 ether,
            permissions: permissions
        });
        _install(key, policy);
        uint48 w = uint48(block.timestamp / 3600);
        _handle(_sessionInWindow(_execute1(address(recorder), 0.1 ether, abi.encodeCall(Recorder.record, (1, 100))), w));
        SessionKeyState memory state = account.sessionKey(key);
        assertEq(state.uses, 1);
        assertEq(state.windowUses, 1);
        assertGt(state.gasSpent, 0);
        assertEq(recorder.received(), 0.1 ether);
    }
}
