// SPDX-License-Identifier: MIT
pragma solidity ^0.8.26;

import {PackedUserOperation} from "@openzeppelin/contracts/interfaces/IERC4337.sol";
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

/**
 * @dev The storage layout session-key validation reads as raw words (slot 0 of a key, the packed permission), the
 * folded permissions of a key whose every permission starts with an Equal or OneOf rule on the same argument
 * (issue #15), and the calldata walk that replaced the ABI decoder in validation.
 */
contract AgentAccountFoldedTest is AccountTestBase {
    /// @dev ERC-7201 root of AccountSessionKeys' storage; `sessions` is field 3 (after lastId and the 2-slot set).
    bytes32 internal constant SESSION_KEYS_STORAGE_LOCATION =
        0x017365a9919982b1c601068788427ac83d6add28318ec194b54a03edd5d58100;

    address internal key;
    uint256 internal keyPk;
    address internal unfolded;
    uint256 internal unfoldedPk;

    function setUp() public override {
        super.setUp();
        (key, keyPk) = makeAddrAndKey("folded");
        (unfolded, unfoldedPk) = makeAddrAndKey("unfolded");
    }

    // ------------------------------------------------------------------ helpers

    function _words(uint256 a, uint256 b, uint256 c) internal pure returns (bytes32[] memory values) {
        values = new bytes32[](3);
        (values[0], values[1], values[2]) = (bytes32(a), bytes32(b), bytes32(c));
    }

    /// @dev `record(a ∈ {7, 8, 9}, b <= 100)` with `valueLimit` wei.
    function _payeePermission(uint128 valueLimit) internal view returns (CallPermission memory) {
        ArgRule[] memory rules = new ArgRule[](2);
        rules[0] = _oneOf(0, _words(7, 8, 9));
        rules[1] = _rule(ArgCondition.LessOrEqual, 32, bytes32(uint256(100)));
        return _permission(address(recorder), Recorder.record.selector, valueLimit, rules);
    }

    function _one(CallPermission memory permission) internal pure returns (CallPermission[] memory permissions) {
        permissions = new CallPermission[](1);
        permissions[0] = permission;
    }

    function _two(CallPermission memory a, CallPermission memory b)
        internal
        pure
        returns (CallPermission[] memory permissions)
    {
        permissions = new CallPermission[](2);
        (permissions[0], permissions[1]) = (a, b);
    }

    /// @dev Any permission without rules makes a key unfolded; this one allows a call nobody makes here.
    function _noRules() internal returns (CallPermission memory) {
        return _permission(address(new Recorder()), Recorder.record.selector, 0, new ArgRule[](0));
    }

    function _coreWord(address who) internal view returns (uint256) {
        bytes32 sessions = bytes32(uint256(SESSION_KEYS_STORAGE_LOCATION) + 3);
        return uint256(vm.load(address(account), keccak256(abi.encode(who, sessions))));
    }

    function _run(address who, uint256 pk, bytes memory callData) internal {
        _handle(_signSession(_op(callData), who, pk));
    }

    function _runViolation(
        address who,
        uint256 pk,
        bytes memory callData,
        SessionPolicyKind kind,
        uint256 callIndex,
        uint256 ruleIndex
    ) internal {
        _handleViolation(_signSession(_op(callData), who, pk), who, kind, callIndex, ruleIndex);
    }

    // ------------------------------------------------------------------ layout

    /// @dev Slot 0 of a key, as validation unpacks it: gasLeft (128) | validAfter (48) | validUntil (48) | id (24) |
    /// flags (8: counted 1, windowed 2, folded 4, fold argument index << 3).
    function test_Layout_Slot0() public {
        SessionPolicy memory policy = _policy(_one(_payeePermission(0)));
        policy.permissions[0].rules[0].offset = 64; // argument 2: fold index 2
        policy.validAfter = 1000;
        policy.validUntil = 2000;
        policy.maxUses = 5;
        policy.interval = 60;
        policy.maxUsesPerInterval = 2;
        policy.gasBudget = 123_456;
        _install(key, policy);
        uint256 word = _coreWord(key);
        assertEq(uint128(word), 123_456, "gasLeft");
        assertEq(uint48(word >> 128), 1000, "validAfter");
        assertEq(uint48(word >> 176), 2000, "validUntil");
        assertEq(uint24(word >> 224), 1, "id");
        assertEq(uint8(word >> 248), 1 | 2 | 4 | (2 << 3), "flags");

        _install(unfolded, _policy(_two(_payeePermission(0), _noRules())));
        word = _coreWord(unfolded);
        assertEq(uint24(word >> 224), 2, "id");
        assertEq(uint8(word >> 248), 0, "no rate limit, not folded");
    }

    /// @dev The gas budget is charged in slot 0 and read back by the view.
    function test_Layout_GasLeftWrittenBackAlone() public {
        SessionPolicy memory policy = _policy(_one(_payeePermission(0)));
        policy.gasBudget = 1 ether;
        policy.validUntil = 4_000_000_000;
        _install(key, policy);
        uint256 before = _coreWord(key);
        _run(key, keyPk, _recordCall(7, 1));
        uint256 afterwards = _coreWord(key);
        assertEq(afterwards >> 128, before >> 128, "fields other than gasLeft unchanged");
        SessionKeyState memory state = account.sessionKey(key);
        assertEq(uint128(afterwards), 1 ether - state.gasSpent);
        assertGt(state.gasSpent, 0);
    }

    // ------------------------------------------------------------------ folded keys

    function test_Folded_MemberPassesAndRule1Checked() public {
        _install(key, _policy(_one(_payeePermission(0))));
        _run(key, keyPk, _recordCall(8, 100));
        assertEq(recorder.lastA(), 8);
        _runViolation(key, keyPk, _recordCall(8, 101), SessionPolicyKind.Argument, 0, 1);
    }

    function test_Folded_NonMemberIsRule0() public {
        _install(key, _policy(_one(_payeePermission(0))));
        _runViolation(key, keyPk, _recordCall(10, 1), SessionPolicyKind.Argument, 0, 0);
        // An argument that lies beyond the call data fails rule 0 too.
        bytes memory shortCall = _execute1(address(recorder), 0, abi.encodePacked(Recorder.record.selector, uint128(8)));
        _runViolation(key, keyPk, shortCall, SessionPolicyKind.Argument, 0, 0);
    }

    function test_Folded_UnknownCallIsCall() public {
        _install(key, _policy(_one(_payeePermission(0))));
        Recorder other = new Recorder();
        _runViolation(
            key, keyPk, _execute1(address(other), 0, abi.encodeCall(Recorder.record, (8, 1))), SessionPolicyKind.Call, 0, 0
        );
        _runViolation(
            key,
            keyPk,
            _execute1(address(recorder), 0, abi.encodeCall(Recorder.recordAddress, (address(8), 1))),
            SessionPolicyKind.Call,
            0,
            0
        );
    }

    /// @dev A folded miss reports what the unfolded path would: the value limit before rule 0.
    function test_Folded_ValueCheckedBeforeRule0() public {
        _install(key, _policy(_one(_payeePermission(1 ether))));
        _runViolation(
            key,
            keyPk,
            _execute1(address(recorder), 2 ether, abi.encodeCall(Recorder.record, (10, 1))),
            SessionPolicyKind.Value,
            0,
            0
        );
        _runViolation(
            key,
            keyPk,
            _execute1(address(recorder), 2 ether, abi.encodeCall(Recorder.record, (8, 1))),
            SessionPolicyKind.Value,
            0,
            0
        );
        _run(key, keyPk, _execute1(address(recorder), 1 ether, abi.encodeCall(Recorder.record, (8, 1))));
        assertEq(recorder.received(), 1 ether);
    }

    /// @dev Equal and OneOf rules on the same argument fold together; rules past rule 1, and a OneOf rule 1, still
    /// hold (they need the permission id, which a folded lookup computes only then).
    function test_Folded_MixedConditionsAndMoreRules() public {
        ArgRule[] memory equalRules = new ArgRule[](3);
        equalRules[0] = _rule(ArgCondition.Equal, 0, bytes32(uint256(uint160(address(this)))));
        equalRules[1] = _oneOf(32, _words(1, 2, 3));
        equalRules[2] = _rule(ArgCondition.LessOrEqual, 32, bytes32(uint256(2)));
        CallPermission memory byAddress =
            _permission(address(recorder), Recorder.recordAddress.selector, 0, equalRules);
        _install(key, _policy(_two(_payeePermission(0), byAddress)));
        assertEq(uint8(_coreWord(key) >> 248), 4, "folded on argument 0");

        bytes memory call = _execute1(address(recorder), 0, abi.encodeCall(Recorder.recordAddress, (address(this), 2)));
        _run(key, keyPk, call);
        assertEq(recorder.lastB(), 2);
        call = _execute1(address(recorder), 0, abi.encodeCall(Recorder.recordAddress, (address(this), 3)));
        _runViolation(key, keyPk, call, SessionPolicyKind.Argument, 0, 2);
        call = _execute1(address(recorder), 0, abi.encodeCall(Recorder.recordAddress, (address(this), 4)));
        _runViolation(key, keyPk, call, SessionPolicyKind.Argument, 0, 1);
        call = _execute1(address(recorder), 0, abi.encodeCall(Recorder.recordAddress, (address(7), 1)));
        _runViolation(key, keyPk, call, SessionPolicyKind.Argument, 0, 0);
        _run(key, keyPk, _recordCall(9, 0));
    }

    /// @dev Rule 0 on different arguments, or a LessOrEqual rule 0, or a permission without rules: not folded.
    function test_Folded_OnlyWhenEveryPermissionQualifies() public {
        CallPermission memory onArg1 = _payeePermission(0);
        onArg1.target = address(new Recorder());
        onArg1.rules[0].offset = 32;
        _install(key, _policy(_two(_payeePermission(0), onArg1)));
        assertEq(uint8(_coreWord(key) >> 248) & 4, 0);

        CallPermission memory capFirst = _payeePermission(0);
        capFirst.target = address(new Recorder());
        (capFirst.rules[0], capFirst.rules[1]) = (capFirst.rules[1], capFirst.rules[0]);
        _install(key, _policy(_two(_payeePermission(0), capFirst)));
        assertEq(uint8(_coreWord(key) >> 248) & 4, 0);

        CallPermission memory unaligned = _payeePermission(0);
        unaligned.rules[0].offset = 4;
        _install(key, _policy(_one(unaligned)));
        assertEq(uint8(_coreWord(key) >> 248) & 4, 0);

        CallPermission memory far = _payeePermission(0);
        far.rules[0].offset = 32 * 32;
        _install(key, _policy(_one(far)));
        assertEq(uint8(_coreWord(key) >> 248) & 4, 0);

        far.rules[0].offset = 31 * 32;
        _install(key, _policy(_one(far)));
        assertEq(uint8(_coreWord(key) >> 248), 4 | (31 << 3));
    }

    function test_Folded_IsOneOfValueView() public {
        _install(key, _policy(_one(_payeePermission(0))));
        assertTrue(account.isOneOfValue(key, address(recorder), Recorder.record.selector, 0, bytes32(uint256(7))));
        assertFalse(account.isOneOfValue(key, address(recorder), Recorder.record.selector, 0, bytes32(uint256(10))));
        assertFalse(account.isOneOfValue(key, address(recorder), Recorder.recordAddress.selector, 0, bytes32(uint256(7))));

        // An Equal rule 0 is folded too, but it is no OneOf set.
        ArgRule[] memory rules = new ArgRule[](1);
        rules[0] = _rule(ArgCondition.Equal, 0, bytes32(uint256(7)));
        _install(key, _policy(_one(_permission(address(recorder), Recorder.record.selector, 0, rules))));
        assertFalse(account.isOneOfValue(key, address(recorder), Recorder.record.selector, 0, bytes32(uint256(7))));
        _run(key, keyPk, _recordCall(7, 0));

        _install(unfolded, _policy(_two(_payeePermission(0), _noRules())));
        assertTrue(account.isOneOfValue(unfolded, address(recorder), Recorder.record.selector, 0, bytes32(uint256(9))));
    }

    /// @dev The folded copies belong to a grant: after a revoke and reinstall, the old set is gone.
    function test_Folded_ReinstallForgetsOldSet() public {
        _install(key, _policy(_one(_payeePermission(0))));
        _run(key, keyPk, _recordCall(7, 1));
        vm.prank(owner);
        account.revokeSessionKey(key);
        _runViolation(key, keyPk, _recordCall(7, 1), SessionPolicyKind.Key, 0, 0);

        CallPermission memory other = _payeePermission(0);
        other.rules[0].values = _words(1, 2, 3);
        _install(key, _policy(_one(other)));
        _runViolation(key, keyPk, _recordCall(7, 1), SessionPolicyKind.Argument, 0, 0);
        _run(key, keyPk, _recordCall(3, 1));
        assertFalse(account.isOneOfValue(key, address(recorder), Recorder.record.selector, 0, bytes32(uint256(7))));
    }

    /// @dev A folded key and an unfolded one with the same permission agree on every call.
    function testFuzz_FoldedAgreesWithUnfolded(uint256 a, uint256 b, uint256 value, bool shortData) public {
        a = bound(a, 6, 10);
        b = bound(b, 99, 101);
        value = bound(value, 0, 2);
        _install(key, _policy(_one(_payeePermission(1))));
        _install(unfolded, _policy(_two(_payeePermission(1), _noRules())));
        vm.deal(address(account), 100 ether);
        bytes memory data = shortData
            ? abi.encodePacked(Recorder.record.selector, a)
            : abi.encodeCall(Recorder.record, (a, b));
        bytes memory call = _execute1(address(recorder), value, data);
        PackedUserOperation memory opFolded = _signSession(_op(call), key, keyPk);
        bytes32 hashFolded = _hash(opFolded);
        vm.prank(address(ENTRYPOINT));
        (bool okFolded, bytes memory errFolded) =
            address(account).call(abi.encodeCall(account.validateUserOp, (opFolded, hashFolded, 0)));
        PackedUserOperation memory opUnfolded = _signSession(_op(call), unfolded, unfoldedPk);
        bytes32 hashUnfolded = _hash(opUnfolded);
        vm.prank(address(ENTRYPOINT));
        (bool okUnfolded, bytes memory errUnfolded) =
            address(account).call(abi.encodeCall(account.validateUserOp, (opUnfolded, hashUnfolded, 0)));
        assertEq(okFolded, okUnfolded, "same verdict");
        if (!okFolded) {
            // the same violation, but for the key named
            assertEq(errFolded.length, errUnfolded.length);
            assertEq(_withoutKey(errFolded), _withoutKey(errUnfolded));
        }
        bool expected = !shortData && a >= 7 && a <= 9 && b <= 100 && value <= 1;
        assertEq(okFolded, expected);
    }

    /// @dev `err` with the `key` word of a {SessionKeyPolicyViolation} zeroed.
    function _withoutKey(bytes memory err) internal pure returns (bytes memory out) {
        out = bytes.concat(err);
        for (uint256 i = 4; i < 36 && i < out.length; ++i) {
            out[i] = 0;
        }
    }

    // ------------------------------------------------------------------ calldata walk

    /// @dev A batch whose tuple offset points past the calldata is a call violation, not a decoder panic.
    function test_Calls_MalformedTupleIsCallViolation() public {
        _install(key, _policy(_one(_payeePermission(0))));
        bytes memory callData = _recordCall(7, 1);
        // execute(mode, bytes): after the selector, the words mode, offset (0x40), length, then executionData:
        // array offset (0x20), array length (1), the tuple's offset (word 5), the tuple (target: word 6)
        assembly ("memory-safe") {
            mstore(add(add(callData, 0x20), add(4, mul(0x20, 5))), 0xffff)
        }
        _runViolation(key, keyPk, callData, SessionPolicyKind.Call, 0, 0);
    }

    /// @dev A target with dirty high bits would make the execution revert: validation refuses it first.
    function test_Calls_DirtyTargetIsCallViolation() public {
        _install(key, _policy(_one(_payeePermission(0))));
        bytes memory callData = _recordCall(7, 1);
        // word 6 after the selector: the tuple's target (see above)
        assembly ("memory-safe") {
            let at := add(add(callData, 0x20), add(4, mul(0x20, 6)))
            mstore(at, or(mload(at), shl(200, 1)))
        }
        _runViolation(key, keyPk, callData, SessionPolicyKind.Call, 0, 0);
    }

    /// @dev Any mode but the default batch one is refused, whatever its free bytes say.
    function test_Calls_ModeBytes() public {
        _install(key, _policy(_one(_payeePermission(0))));
        bytes memory good = _recordCall(7, 1);
        // free bytes (unused 2-5, payload 10-31) may be anything
        bytes32 freeBits = bytes32(uint256(0xffffffff) << 208) | bytes32(uint256(type(uint176).max));
        bytes memory callData = bytes.concat(bytes4(good), BATCH_MODE | freeBits, _slice(good, 36));
        _run(key, keyPk, callData);
        // a nonzero mode selector (bytes 6-9)
        callData = bytes.concat(bytes4(good), BATCH_MODE | bytes32(uint256(1) << 176), _slice(good, 36));
        _runViolation(key, keyPk, callData, SessionPolicyKind.Call, 0, 0);
    }

    function _slice(bytes memory data, uint256 from) internal pure returns (bytes memory out) {
        out = new bytes(data.length - from);
        for (uint256 i = 0; i < out.length; ++i) {
            out[i] = data[from + i];
        }
    }

    // ------------------------------------------------------------------ gas policy

    /// @dev Gas values the EntryPoint v0.7 refuses (`AA94`, above 120 bits) are refused by the account too, so the
    /// cost it charges never overflows.
    function test_Gas_ValuesAbove120BitsRefused() public {
        SessionPolicy memory policy = _policy(_one(_payeePermission(0)));
        _install(key, policy);
        PackedUserOperation memory op = _op(_recordCall(7, 1));
        op.preVerificationGas = uint256(1) << 120;
        op.gasFees = bytes32(uint256(1));
        op = _signSession(op, key, keyPk);
        bytes32 hash = _hash(op);
        vm.prank(address(ENTRYPOINT));
        vm.expectRevert(
            abi.encodeWithSelector(
                IAgentAccountSessionKeys.SessionKeyPolicyViolation.selector, key, SessionPolicyKind.Gas, 0, 0
            )
        );
        account.validateUserOp(op, hash, 0);

        op = _op(_recordCall(7, 1));
        op.gasFees = bytes32((uint256(1) << 120) | (uint256(1) << 120 << 128));
        op = _signSession(op, key, keyPk);
        hash = _hash(op);
        vm.prank(address(ENTRYPOINT));
        vm.expectRevert(
            abi.encodeWithSelector(
                IAgentAccountSessionKeys.SessionKeyPolicyViolation.selector, key, SessionPolicyKind.Gas, 0, 0
            )
        );
        account.validateUserOp(op, hash, 0);
    }

    /// @dev The charge counts the paymaster's two gas limits (bytes 20-51 of paymasterAndData).
    function test_Gas_PaymasterLimitsCharged() public {
        SessionPolicy memory policy = _policy(_one(_payeePermission(0)));
        policy.gasBudget = 10 ether;
        _install(key, policy);
        PackedUserOperation memory op = _op(_recordCall(7, 1));
        op.paymasterAndData = abi.encodePacked(address(0xbeef), uint128(1000), uint128(2000), hex"aa");
        op = _signSession(op, key, keyPk);
        bytes32 hash = _hash(op);
        vm.prank(address(ENTRYPOINT));
        account.validateUserOp(op, hash, 0);
        uint256 expected =
            (PRE_VERIFICATION_GAS + VERIFICATION_GAS + callGasLimit + 1000 + 2000) * MAX_FEE;
        assertEq(account.sessionKey(key).gasSpent, expected);
    }

    /// @dev The validation data of an unbounded key is plain 0 (valid, no time bounds), and the event names the key.
    function test_ValidationDataAndEvent() public {
        _install(key, _policy(_one(_payeePermission(0))));
        PackedUserOperation memory op = _signSession(_op(_recordCall(7, 1)), key, keyPk);
        bytes32 hash = _hash(op);
        vm.expectEmitAnonymous(true, false, false, false, true, address(account));
        emit IAgentAccountSessionKeys.SessionKeyUsed(key);
        vm.prank(address(ENTRYPOINT));
        assertEq(account.validateUserOp(op, hash, 0), 0);
        // a signature by another key: SIG_VALIDATION_FAILED (1), counters still charged
        (, uint256 otherPk) = makeAddrAndKey("other");
        op = _op(_recordCall(7, 1));
        op.signature = abi.encodePacked(
            key, uint48(0), signPacked(otherPk, MessageHashUtils.toEthSignedMessageHash(_hash(op)))
        );
        hash = _hash(op);
        vm.prank(address(ENTRYPOINT));
        assertEq(account.validateUserOp(op, hash, 0), 1);
    }
}
