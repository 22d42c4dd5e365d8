// SPDX-License-Identifier: MIT
pragma solidity ^0.8.26;

import {PackedUserOperation} from "@openzeppelin/contracts/interfaces/IERC4337.sol";
import {Execution} from "@openzeppelin/contracts/interfaces/draft-IERC7579.sol";
import {MessageHashUtils} from "@openzeppelin/contracts/utils/cryptography/MessageHashUtils.sol";

import {AccountTestBase, Recorder} from "./account/AccountTestBase.sol";
import {ArgRules} from "../src/account/ArgRules.sol";
import {IAgentAccountSessionKeys} from "../src/account/IAgentAccountSessionKeys.sol";
import {
    ArgCondition,
    ArgRule,
    CallPermission,
    SessionPolicyKind,
    StoredArgRule
} from "../src/account/SessionKeyTypes.sol";

/// @dev Exposes the {ArgRules} library on calldata.
contract ArgRulesHarness {
    function wordAt(bytes calldata data, uint256 offset) external pure returns (bool, bytes32) {
        return ArgRules.wordAt(data, offset);
    }

    function matches(ArgCondition condition, uint256 offset, bytes32[] memory values, bytes calldata data)
        external
        pure
        returns (bool)
    {
        return ArgRules.matches(condition, offset, values, data);
    }
}

/**
 * @dev Fuzz tests of the argument-rule matcher (`==`, `<=`, one-of) against a byte-by-byte reference, both on the
 * library and through the account's validation, plus "every call of a batch is checked".
 */
contract AgentAccountArgRulesTest is AccountTestBase {
    ArgRulesHarness internal harness;
    address internal key;
    uint256 internal keyPk;

    function setUp() public override {
        super.setUp();
        harness = new ArgRulesHarness();
        (key, keyPk) = makeAddrAndKey("session");
    }

    // ------------------------------------------------------------------ reference

    /// @dev The word `offset` bytes after the selector, read one byte at a time.
    function _refWord(bytes memory data, uint256 offset) internal pure returns (bool found, bytes32 word) {
        if (offset > type(uint64).max || data.length < 4 + offset + 32) return (false, 0);
        uint256 acc;
        for (uint256 i = 0; i < 32; ++i) {
            acc = (acc << 8) | uint8(data[4 + offset + i]);
        }
        return (true, bytes32(acc));
    }

    function _refMatches(ArgCondition condition, uint256 offset, bytes32[] memory values, bytes memory data)
        internal
        pure
        returns (bool)
    {
        (bool found, bytes32 word) = _refWord(data, offset);
        if (!found || values.length == 0) return false;
        if (condition == ArgCondition.OneOf) {
            for (uint256 i = 0; i < values.length; ++i) {
                if (values[i] == word) return true;
            }
            return false;
        }
        if (values.length != 1) return false;
        return condition == ArgCondition.Equal ? word == values[0] : uint256(word) <= uint256(values[0]);
    }

    // ------------------------------------------------------------------ library

    function testFuzz_WordAtMatchesReference(bytes memory data, uint256 offset) public view {
        if (offset % 4 != 0) offset = bound(offset, 0, data.length + 8); // mostly near the end of the data
        (bool found, bytes32 word) = harness.wordAt(data, offset);
        (bool refFound, bytes32 refWord) = _refWord(data, offset);
        assertEq(found, refFound);
        assertEq(word, refWord);
    }

    function testFuzz_MatchesReference(uint8 conditionSeed, uint256 offset, bytes32[] memory values, bytes memory data)
        public
        view
    {
        ArgCondition condition = ArgCondition(conditionSeed % 3);
        offset = bound(offset, 0, data.length + 8);
        // Make a hit likely: put the word that is there into the values half of the time.
        (bool found, bytes32 word) = _refWord(data, offset);
        if (found && values.length > 0 && conditionSeed & 0x80 != 0) values[conditionSeed % values.length] = word;
        assertEq(harness.matches(condition, offset, values, data), _refMatches(condition, offset, values, data));
    }

    // ------------------------------------------------------------------ through the account

    function _installRule(ArgRule memory rule) internal {
        ArgRule[] memory rules = new ArgRule[](1);
        rules[0] = rule;
        CallPermission[] memory permissions = new CallPermission[](1);
        permissions[0] = _permission(address(recorder), Recorder.record.selector, 0, rules);
        _install(key, _policy(permissions));
    }

    /// @dev Runs the account's validation for a session op calling `recorder` with `data`; true iff it passed.
    function _validates(bytes memory data) internal returns (bool) {
        return _validatesBatch(_execute1(address(recorder), 0, data));
    }

    function _validatesBatch(bytes memory callData) internal returns (bool) {
        PackedUserOperation memory op = _op(callData);
        bytes32 hash = keccak256(abi.encode(callData));
        op.signature =
            abi.encodePacked(key, uint48(0), signPacked(keyPk, MessageHashUtils.toEthSignedMessageHash(hash)));
        vm.prank(address(ENTRYPOINT));
        try account.validateUserOp(op, hash, 0) returns (uint256 validationData) {
            assertEq(validationData, 0, "signature valid, no time bounds");
            return true;
        } catch (bytes memory reason) {
            assertEq(bytes4(reason), IAgentAccountSessionKeys.SessionKeyPolicyViolation.selector);
            return false;
        }
    }

    function _expectArgumentViolation(bytes memory callData, uint256 callIndex) internal {
        PackedUserOperation memory op = _op(callData);
        bytes32 hash = keccak256(abi.encode(callData));
        op.signature =
            abi.encodePacked(key, uint48(0), signPacked(keyPk, MessageHashUtils.toEthSignedMessageHash(hash)));
        vm.prank(address(ENTRYPOINT));
        vm.expectRevert(
            abi.encodeWithSelector(
                IAgentAccountSessionKeys.SessionKeyPolicyViolation.selector,
                key,
                SessionPolicyKind.Argument,
                callIndex,
                0
            )
        );
        account.validateUserOp(op, hash, 0);
    }

    function testFuzz_Account_Equal(bytes32[3] memory words, uint256 index, bytes32 value, bool hit) public {
        index = bound(index, 0, 2);
        if (hit) value = words[index];
        _installRule(_rule(ArgCondition.Equal, uint32(index * 32), value));
        bytes memory data = abi.encodePacked(Recorder.record.selector, words[0], words[1], words[2]);
        assertEq(_validates(data), words[index] == value);
    }

    function testFuzz_Account_LessOrEqual(uint256[3] memory words, uint256 index, uint256 cap) public {
        index = bound(index, 0, 2);
        _installRule(_rule(ArgCondition.LessOrEqual, uint32(index * 32), bytes32(cap)));
        bytes memory data = abi.encodePacked(Recorder.record.selector, words[0], words[1], words[2]);
        assertEq(_validates(data), words[index] <= cap);
    }

    function testFuzz_Account_OneOf(bytes32[] memory set, bytes32 word, uint256 pick, bool hit) public {
        vm.assume(set.length > 0 && set.length <= 16);
        if (hit) word = set[pick % set.length];
        _installRule(_oneOf(32, set));
        bytes memory data = abi.encodePacked(Recorder.record.selector, bytes32(0), word);
        bool member;
        for (uint256 i = 0; i < set.length; ++i) {
            if (set[i] == word) member = true;
        }
        assertEq(_validates(data), member);
    }

    /// @dev Arbitrary (unaligned) offsets over arbitrary calldata, including words past the end.
    function testFuzz_Account_AnyOffset(bytes memory tail, uint256 offset, uint8 conditionSeed, bytes32 value) public {
        offset = bound(offset, 0, tail.length + 8);
        ArgCondition condition = ArgCondition(conditionSeed % 3);
        bytes memory data = abi.encodePacked(Recorder.record.selector, tail);
        (bool found, bytes32 word) = _refWord(data, offset);
        if (found && conditionSeed & 0x80 != 0) value = word;
        bytes32[] memory values = new bytes32[](1);
        values[0] = value;
        _installRule(ArgRule({condition: condition, offset: uint32(offset), values: values}));
        assertEq(_validates(data), _refMatches(condition, offset, values, data));
    }

    function testFuzz_Account_BatchEveryCallChecked(uint256 n, uint256 bad, uint256 overBy) public {
        n = bound(n, 1, 8);
        bad = bound(bad, 0, n - 1);
        overBy = bound(overBy, 1, type(uint256).max - 100);
        _installRule(_rule(ArgCondition.LessOrEqual, 32, bytes32(uint256(100))));
        Execution[] memory calls = new Execution[](n);
        for (uint256 i = 0; i < n; ++i) {
            calls[i] = _call(address(recorder), 0, abi.encodeCall(Recorder.record, (i, 100)));
        }
        assertTrue(_validatesBatch(_execute(calls)));
        calls[bad] = _call(address(recorder), 0, abi.encodeCall(Recorder.record, (bad, 100 + overBy)));
        _expectArgumentViolation(_execute(calls), bad);
    }

    /// @dev Up to six rules on one permission, mixed conditions: the first two are read from the permission's
    /// slot, the rest from their own; every one is checked, and the view returns them all as installed.
    function testFuzz_Account_SeveralRulesAllChecked(bytes32[6] memory words, bytes32[6] memory values, uint8 seed)
        public
    {
        uint256 n = 1 + seed % 6;
        ArgRule[] memory rules = new ArgRule[](n);
        bytes memory data = abi.encodePacked(Recorder.record.selector, words[0], words[1], words[2], words[3]);
        data = abi.encodePacked(data, words[4], words[5]);
        bool expected = true;
        for (uint256 r = 0; r < n; ++r) {
            ArgCondition condition = ArgCondition((uint256(keccak256(abi.encode(seed, r)))) % 3);
            if (uint256(values[r]) % 4 == 0) values[r] = words[r]; // often a hit, so all-pass cases occur
            bytes32[] memory one = new bytes32[](1);
            one[0] = values[r];
            rules[r] = ArgRule({condition: condition, offset: uint32(r * 32), values: one});
            expected = expected && _refMatches(condition, r * 32, one, data);
        }
        CallPermission[] memory permissions = new CallPermission[](1);
        permissions[0] = _permission(address(recorder), Recorder.record.selector, 0, rules);
        _install(key, _policy(permissions));

        assertEq(_validates(data), expected);
        (bool allowed,, StoredArgRule[] memory stored) =
            account.callPermission(key, address(recorder), Recorder.record.selector);
        assertTrue(allowed);
        assertEq(stored.length, n);
        for (uint256 r = 0; r < n; ++r) {
            assertEq(uint8(stored[r].condition), uint8(rules[r].condition));
            assertEq(stored[r].offset, rules[r].offset);
            bool oneOf = rules[r].condition == ArgCondition.OneOf; // stores its value count, the set elsewhere
            assertEq(stored[r].value, oneOf ? bytes32(uint256(1)) : rules[r].values[0]);
        }
    }

    /// @dev A single value that fits in 152 bits (a per-call cap, an address) rides in the permission's slot, for
    /// the first such rule of rules 0-1: the comparison is the same at and around the value, whether rule 0 is a
    /// OneOf, an inline rule (so rule 1 is read from its own slot) or a rule whose value is too wide to inline.
    function testFuzz_Account_InlineValue(uint152 cap0, uint152 cap1, uint256 w0, uint256 w1, uint8 seed) public {
        w0 = bound(w0, cap0 > 2 ? uint256(cap0) - 2 : 0, uint256(cap0) + 2);
        w1 = bound(w1, cap1 > 2 ? uint256(cap1) - 2 : 0, uint256(cap1) + 2);
        ArgRule[] memory rules = new ArgRule[](2);
        bytes32[] memory set = new bytes32[](1);
        set[0] = bytes32(uint256(cap0));
        bool expected0;
        if (seed % 3 == 0) {
            rules[0] = _oneOf(0, set);
            expected0 = w0 == cap0;
        } else if (seed % 3 == 1) {
            rules[0] = _rule(ArgCondition.LessOrEqual, 0, bytes32(uint256(cap0)));
            expected0 = w0 <= cap0;
        } else {
            uint256 wide = uint256(cap0) | (1 << 200); // beyond 152 bits: stays in its own slot
            w0 |= 1 << 200;
            rules[0] = _rule(ArgCondition.LessOrEqual, 0, bytes32(wide));
            expected0 = w0 <= wide;
        }
        bool equal1 = seed & 0x80 != 0;
        rules[1] = _rule(equal1 ? ArgCondition.Equal : ArgCondition.LessOrEqual, 32, bytes32(uint256(cap1)));
        bool expected1 = equal1 ? w1 == cap1 : w1 <= cap1;
        CallPermission[] memory permissions = new CallPermission[](1);
        permissions[0] = _permission(address(recorder), Recorder.record.selector, 0, rules);
        _install(key, _policy(permissions));
        bytes memory data = abi.encodePacked(Recorder.record.selector, w0, w1);
        assertEq(_validates(data), expected0 && expected1);
    }
}
