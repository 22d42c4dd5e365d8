// SPDX-License-Identifier: MIT
pragma solidity ^0.8.26;

import {PackedUserOperation} from "@openzeppelin/contracts/interfaces/IERC4337.sol";

import {AccountTestBase, Recorder} from "./account/AccountTestBase.sol";
import {ArgCondition, ArgRule, CallPermission, SessionPolicy} from "../src/account/SessionKeyTypes.sol";

/**
 * @dev Gas of one UserOperation through the EntryPoint v0.7, owner-signed against session-key-signed, in the shape
 * of `python -m tests.bench.account_gas` (one call, a OneOf rule on the first argument and a LessOrEqual cap on the
 * second, warm counters). Run `forge test --match-path test/AgentAccountGas.t.sol --isolate -vv`: with `--isolate`
 * the figures are those of separate transactions, like the bench's receipts minus intrinsic and calldata gas.
 */
contract AgentAccountGasTest is AccountTestBase {
    event log_named_uint(string key, uint256 val);

    address internal key;
    uint256 internal keyPk;
    address internal full;
    uint256 internal fullPk;

    function setUp() public override {
        super.setUp();
        (key, keyPk) = makeAddrAndKey("session");
        (full, fullPk) = makeAddrAndKey("full");
        bytes32[] memory payees = new bytes32[](3);
        for (uint256 i; i < 3; ++i) payees[i] = bytes32(uint256(i + 1));
        ArgRule[] memory rules = new ArgRule[](2);
        rules[0] = _oneOf(0, payees);
        rules[1] = _rule(ArgCondition.LessOrEqual, 1, bytes32(uint256(1e6)));
        CallPermission[] memory permissions = new CallPermission[](1);
        permissions[0] = _permission(address(recorder), Recorder.record.selector, 0, rules);
        SessionPolicy memory policy = _policy(permissions);
        policy.gasBudget = 1 ether;
        _install(key, policy);
        policy.validAfter = uint48(block.timestamp - 60);
        policy.validUntil = uint48(block.timestamp + 86_400);
        policy.maxUses = 1000;
        policy.interval = 3600;
        policy.maxUsesPerInterval = 500;
        _install(full, policy);
        // warm-up: counters, nonce lane and recorder slots are non-zero from here on
        _handle(_signOwner(_op(_recordCall(1, 5))));
        _handle(_signSession(_op(_recordCall(1, 5)), key, keyPk));
        _handle(_signSession(_op(_recordCall(1, 5)), full, fullPk, _window()));
    }

    function _window() internal view returns (uint48) {
        return uint48(block.timestamp / 3600);
    }

    function _measure(string memory label, PackedUserOperation memory op) internal {
        uint256 before = gasleft();
        _handle(op);
        emit log_named_uint(label, before - gasleft());
    }

    function test_gas_owner() public {
        _measure("owner single call", _signOwner(_op(_recordCall(2, 7))));
    }

    function test_gas_session() public {
        _measure("session single call", _signSession(_op(_recordCall(2, 7)), key, keyPk));
    }

    function test_gas_sessionAllPolicies() public {
        _measure("session (all policies) single call", _signSession(_op(_recordCall(2, 7)), full, fullPk, _window()));
    }
}
