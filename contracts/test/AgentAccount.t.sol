// SPDX-License-Identifier: MIT
pragma solidity ^0.8.26;

import {IEntryPoint, PackedUserOperation} from "@openzeppelin/contracts/interfaces/IERC4337.sol";
import {Execution} from "@openzeppelin/contracts/interfaces/draft-IERC7579.sol";
import {Account} from "@openzeppelin/contracts/account/Account.sol";
import {Initializable} from "@openzeppelin/contracts/proxy/utils/Initializable.sol";
import {MessageHashUtils} from "@openzeppelin/contracts/utils/cryptography/MessageHashUtils.sol";
import {ERC7739Utils} from "@openzeppelin/contracts/utils/cryptography/draft-ERC7739Utils.sol";

import {AccountTestBase, Recorder} from "./account/AccountTestBase.sol";
import {AgentAccount} from "../src/account/AgentAccount.sol";
import {IAgentAccountSessionKeys} from "../src/account/IAgentAccountSessionKeys.sol";
import {
    ArgCondition,
    ArgRule,
    CallPermission,
    SessionKeyState,
    SessionPolicy,
    StoredArgRule
} from "../src/account/SessionKeyTypes.sol";

/// @dev The owner path, the factory, ERC-1271, key management and owner approvals signed offline.
contract AgentAccountTest is AccountTestBase {
    address internal sessionKey;
    uint256 internal sessionPk;

    function setUp() public override {
        super.setUp();
        (sessionKey, sessionPk) = makeAddrAndKey("session");
    }

    // ------------------------------------------------------------------ factory and deployment

    function test_FactoryAddressIsCounterfactual() public {
        address alice = makeAddr("alice");
        address predicted = factory.getAddress(alice, 42);
        assertEq(predicted.code.length, 0);
        address deployed = factory.createAccount(alice, 42);
        assertEq(deployed, predicted);
        assertGt(deployed.code.length, 0);
        assertEq(AgentAccount(payable(deployed)).signer(), alice);
        // Idempotent: a second call returns the same account without redeploying.
        assertEq(factory.createAccount(alice, 42), predicted);
        // Owner and salt both select the address.
        assertNotEq(factory.getAddress(alice, 43), predicted);
        assertNotEq(factory.getAddress(makeAddr("bob"), 42), predicted);
    }

    function testFuzz_FactoryAddressIsCounterfactual(address who, uint256 salt) public {
        vm.assume(who != address(0));
        address predicted = factory.getAddress(who, salt);
        assertEq(factory.createAccount(who, salt), predicted);
        assertEq(AgentAccount(payable(predicted)).signer(), who);
    }

    function test_DeployOnFirstUserOperation() public {
        (address alice, uint256 aliceKey) = makeAddrAndKey("alice");
        address predicted = factory.getAddress(alice, 7);
        vm.deal(predicted, 1 ether);

        PackedUserOperation memory op = _op(predicted, 0, _recordCall(1, 2));
        op.initCode = abi.encodePacked(address(factory), abi.encodeCall(factory.createAccount, (alice, 7)));
        op.signature = signPacked(aliceKey, MessageHashUtils.toEthSignedMessageHash(_hash(op)));

        vm.expectEmit(true, true, false, true, address(ENTRYPOINT));
        emit AccountDeployed(_hash(op), predicted, address(factory), address(0));
        _handle(op);

        assertGt(predicted.code.length, 0);
        assertEq(recorder.calls(), 1);
        assertEq(ENTRYPOINT.getNonce(predicted, 0), 1);
    }

    function test_DeployOnFirstUserOperationRequiresOwnerSignature() public {
        (address alice,) = makeAddrAndKey("alice");
        address predicted = factory.getAddress(alice, 7);
        vm.deal(predicted, 1 ether);
        PackedUserOperation memory op = _op(predicted, 0, _recordCall(1, 2));
        op.initCode = abi.encodePacked(address(factory), abi.encodeCall(factory.createAccount, (alice, 7)));
        op.signature = signPacked(ownerKey, MessageHashUtils.toEthSignedMessageHash(_hash(op)));
        _expectFailedOp("AA24 signature error");
        _handle(op);
    }

    function test_ImplementationAndCloneCannotBeInitializedAgain() public {
        AgentAccount implementation = factory.accountImplementation();
        vm.expectRevert(Initializable.InvalidInitialization.selector);
        implementation.initialize(owner);
        vm.expectRevert(Initializable.InvalidInitialization.selector);
        account.initialize(makeAddr("mallory"));
    }

    function test_ZeroOwnerRejected() public {
        vm.expectRevert(abi.encodeWithSelector(AgentAccount.AgentAccountInvalidOwner.selector, address(0)));
        factory.createAccount(address(0), 1);
    }

    function test_EntryPointIsV07() public view {
        assertEq(address(account.entryPoint()), address(ENTRYPOINT));
    }

    // ------------------------------------------------------------------ owner operations

    function test_OwnerSingleCall() public {
        _handle(_signOwner(_op(_execute1(address(recorder), 1 ether, abi.encodeCall(Recorder.record, (3, 4))))));
        assertEq(recorder.calls(), 1);
        assertEq(recorder.lastA(), 3);
        assertEq(recorder.received(), 1 ether);
    }

    function test_OwnerBatchIsAtomic() public {
        Execution[] memory calls = new Execution[](3);
        calls[0] = _call(address(recorder), 0, abi.encodeCall(Recorder.record, (1, 1)));
        calls[1] = _call(address(recorder), 0, abi.encodeCall(Recorder.record, (2, 2)));
        calls[2] = _call(address(recorder), 0, abi.encodeCall(Recorder.refuse, (3)));
        PackedUserOperation memory op = _signOwner(_op(_execute(calls)));

        vm.expectEmit(true, true, false, true, address(ENTRYPOINT));
        emit UserOperationRevertReason(
            _hash(op), address(account), op.nonce, abi.encodeWithSelector(Recorder.RecorderRefused.selector, 3)
        );
        _handle(op);
        assertEq(recorder.calls(), 0, "no call of a reverted batch persists");

        calls[2] = _call(address(recorder), 0, abi.encodeCall(Recorder.record, (3, 3)));
        _handle(_signOwner(_op(_execute(calls))));
        assertEq(recorder.calls(), 3);
    }

    function test_OwnerWrongSignatureFails() public {
        PackedUserOperation memory op = _op(_recordCall(1, 1));
        op.signature = signPacked(sessionPk, MessageHashUtils.toEthSignedMessageHash(_hash(op)));
        _expectFailedOp("AA24 signature error");
        _handle(op);
        // A raw (non EIP-191) signature of the hash is not accepted either.
        op.signature = signPacked(ownerKey, _hash(op));
        _expectFailedOp("AA24 signature error");
        _handle(op);
    }

    function test_ExecuteOnlyFromEntryPointOrSelf() public {
        vm.prank(owner);
        vm.expectRevert(abi.encodeWithSelector(Account.AccountUnauthorized.selector, owner));
        (bool ok,) = address(account).call(_recordCall(1, 1));
        ok;
    }

    function test_NonceLanesDoNotCollide() public {
        PackedUserOperation[] memory ops = new PackedUserOperation[](16);
        for (uint256 i = 0; i < 16; ++i) {
            // Lane keys as an agent would pick them: unrelated 192-bit numbers.
            uint192 lane = uint192(uint256(keccak256(abi.encode("lane", i))));
            ops[i] = _signOwner(_opOnLane(lane, _recordCall(i, i)));
        }
        _handleAll(ops);
        assertEq(recorder.calls(), 16);
        for (uint256 i = 0; i < 16; ++i) {
            uint192 lane = uint192(uint256(keccak256(abi.encode("lane", i))));
            assertEq(ENTRYPOINT.getNonce(address(account), lane), (uint256(lane) << 64) | 1);
        }
        // The same lane twice in one bundle needs consecutive sequence numbers.
        PackedUserOperation[] memory twice = new PackedUserOperation[](2);
        twice[0] = _signOwner(_opOnLane(5, _recordCall(1, 1)));
        twice[1] = _signOwner(_opOnLane(5, _recordCall(1, 1)));
        vm.expectRevert(abi.encodeWithSelector(IEntryPoint.FailedOp.selector, 1, "AA25 invalid account nonce"));
        _handleAll(twice);
    }

    // ------------------------------------------------------------------ ERC-1271 (ERC-7739)

    function test_ERC1271NestedPersonalSign() public view {
        bytes32 contents = keccak256("hello agent");
        (, string memory name, string memory version, uint256 chainId, address verifyingContract,,) =
            account.eip712Domain();
        bytes32 domainSeparator = keccak256(
            abi.encode(
                keccak256("EIP712Domain(string name,string version,uint256 chainId,address verifyingContract)"),
                keccak256(bytes(name)),
                keccak256(bytes(version)),
                chainId,
                verifyingContract
            )
        );
        assertEq(name, "AgentAccount");
        assertEq(verifyingContract, address(account));
        bytes32 digest =
            MessageHashUtils.toTypedDataHash(domainSeparator, ERC7739Utils.personalSignStructHash(contents));
        assertEq(account.isValidSignature(contents, signPacked(ownerKey, digest)), bytes4(0x1626ba7e));
        assertEq(account.isValidSignature(contents, signPacked(sessionPk, digest)), bytes4(0xffffffff));
        // The bare hash is not accepted (no cross-account replay).
        assertEq(account.isValidSignature(contents, signPacked(ownerKey, contents)), bytes4(0xffffffff));
    }

    // ------------------------------------------------------------------ key management

    function test_InstallByOwnerDirectly() public {
        vm.expectEmit(true, true, false, false, address(account));
        emit IAgentAccountSessionKeys.SessionKeyInstalled(sessionKey, 1, _recordPolicy());
        _install(sessionKey, _recordPolicy());
        SessionKeyState memory state = account.sessionKey(sessionKey);
        assertEq(state.id, 1);
        address[] memory keys = account.sessionKeys();
        assertEq(keys.length, 1);
        assertEq(keys[0], sessionKey);
        (bool allowed, uint128 valueLimit,) =
            account.callPermission(sessionKey, address(recorder), Recorder.record.selector);
        assertTrue(allowed);
        assertEq(valueLimit, 0);
    }

    function test_InstallThroughOwnerUserOperation() public {
        // As the EntryPoint's direct callee ...
        _handle(_signOwner(_op(abi.encodeCall(account.installSessionKey, (sessionKey, _recordPolicy())))));
        assertEq(account.sessionKey(sessionKey).id, 1);
        // ... or as a self-call inside an execute batch.
        (address other,) = makeAddrAndKey("other");
        _handle(
            _signOwner(
                _op(_execute1(address(account), 0, abi.encodeCall(account.installSessionKey, (other, _recordPolicy()))))
            )
        );
        assertEq(account.sessionKey(other).id, 2);
    }

    function test_InstallAndRevokeRequireOwner() public {
        address mallory = makeAddr("mallory");
        vm.startPrank(mallory);
        vm.expectRevert(abi.encodeWithSelector(Account.AccountUnauthorized.selector, mallory));
        account.installSessionKey(sessionKey, _recordPolicy());
        vm.expectRevert(abi.encodeWithSelector(Account.AccountUnauthorized.selector, mallory));
        account.revokeSessionKey(sessionKey);
        vm.expectRevert(abi.encodeWithSelector(Account.AccountUnauthorized.selector, mallory));
        account.cancelOwnerApproval(1);
        vm.stopPrank();
    }

    function test_RevokeUnknownKeyReverts() public {
        vm.prank(owner);
        vm.expectRevert(abi.encodeWithSelector(IAgentAccountSessionKeys.SessionKeyNotInstalled.selector, sessionKey));
        account.revokeSessionKey(sessionKey);
    }

    function test_ReinstallGetsFreshGrant() public {
        _install(sessionKey, _recordPolicy());
        vm.expectEmit(true, true, false, true, address(account));
        emit IAgentAccountSessionKeys.SessionKeyRevoked(sessionKey, 1);
        _install(sessionKey, _recordPolicy());
        assertEq(account.sessionKey(sessionKey).id, 2);
        assertEq(account.sessionKeys().length, 1);
    }

    function test_InvalidPolicies() public {
        SessionPolicy memory policy = _recordPolicy();

        _expectInvalid(address(0), 1, 0);
        account.installSessionKey(address(0), policy);
        _expectInvalid(address(account), 1, 0);
        account.installSessionKey(address(account), policy);

        policy.validAfter = 100;
        policy.validUntil = 99;
        _expectInvalid(sessionKey, 2, 0);
        account.installSessionKey(sessionKey, policy);
        policy.validAfter = 0;
        policy.validUntil = 0;

        policy.interval = 60;
        _expectInvalid(sessionKey, 3, 0);
        account.installSessionKey(sessionKey, policy);
        policy.interval = 0;
        policy.maxUsesPerInterval = 1;
        _expectInvalid(sessionKey, 3, 0);
        account.installSessionKey(sessionKey, policy);
        policy.maxUsesPerInterval = 0;

        SessionPolicy memory empty;
        _expectInvalid(sessionKey, 4, 0);
        account.installSessionKey(sessionKey, empty);

        CallPermission[] memory permissions = new CallPermission[](2);
        permissions[0] = _permission(address(recorder), Recorder.record.selector, 0, new ArgRule[](0));
        permissions[1] = _permission(address(account), Recorder.record.selector, 0, new ArgRule[](0));
        _expectInvalid(sessionKey, 5, 1);
        account.installSessionKey(sessionKey, _policy(permissions));
        permissions[1] = _permission(address(0), Recorder.record.selector, 0, new ArgRule[](0));
        _expectInvalid(sessionKey, 5, 1);
        account.installSessionKey(sessionKey, _policy(permissions));

        permissions[1] = permissions[0];
        _expectInvalid(sessionKey, 6, 1);
        account.installSessionKey(sessionKey, _policy(permissions));

        CallPermission[] memory one = new CallPermission[](1);
        one[0] = _permission(address(recorder), Recorder.record.selector, 0, new ArgRule[](33));
        _expectInvalid(sessionKey, 7, 0);
        account.installSessionKey(sessionKey, _policy(one));

        ArgRule[] memory rules = new ArgRule[](1);
        rules[0] = ArgRule({condition: ArgCondition.OneOf, offset: 0, values: new bytes32[](0)});
        one[0] = _permission(address(recorder), Recorder.record.selector, 0, rules);
        _expectInvalid(sessionKey, 8, 0);
        account.installSessionKey(sessionKey, _policy(one));
        rules[0] = ArgRule({condition: ArgCondition.LessOrEqual, offset: 0, values: new bytes32[](2)});
        _expectInvalid(sessionKey, 8, 0);
        account.installSessionKey(sessionKey, _policy(one));
    }

    function _expectInvalid(address key, uint256 reason, uint256 index) internal {
        vm.prank(owner);
        vm.expectRevert(
            abi.encodeWithSelector(IAgentAccountSessionKeys.SessionKeyInvalidPolicy.selector, key, reason, index)
        );
    }

    function test_StoredRulesAreReadable() public {
        ArgRule[] memory rules = new ArgRule[](2);
        rules[0] = _rule(ArgCondition.LessOrEqual, 32, bytes32(uint256(500)));
        bytes32[] memory values = new bytes32[](3);
        values[0] = bytes32(uint256(1));
        values[1] = bytes32(uint256(2));
        values[2] = bytes32(uint256(3));
        rules[1] = _oneOf(0, values);
        CallPermission[] memory permissions = new CallPermission[](1);
        permissions[0] = _permission(address(recorder), Recorder.record.selector, 7, rules);
        _install(sessionKey, _policy(permissions));

        (bool allowed, uint128 valueLimit, StoredArgRule[] memory stored) =
            account.callPermission(sessionKey, address(recorder), Recorder.record.selector);
        assertTrue(allowed);
        assertEq(valueLimit, 7);
        assertEq(stored.length, 2);
        assertEq(uint8(stored[0].condition), uint8(ArgCondition.LessOrEqual));
        assertEq(stored[0].offset, 32);
        assertEq(stored[0].value, bytes32(uint256(500)));
        assertEq(uint8(stored[1].condition), uint8(ArgCondition.OneOf));
        assertEq(stored[1].value, bytes32(uint256(3)));
        assertTrue(account.isOneOfValue(sessionKey, address(recorder), Recorder.record.selector, 1, values[1]));
        assertFalse(
            account.isOneOfValue(sessionKey, address(recorder), Recorder.record.selector, 1, bytes32(uint256(4)))
        );
    }

    // ------------------------------------------------------------------ owner approvals signed offline

    function test_InstallWithOwnerSignatureRelayedByAnyone() public {
        SessionPolicy memory policy = _recordPolicy();
        uint48 deadline = uint48(block.timestamp + 1 hours);
        bytes memory signature = signPacked(ownerKey, account.hashInstallSessionKey(sessionKey, policy, 9, deadline));

        vm.prank(makeAddr("relayer"));
        account.installSessionKeyWithSig(sessionKey, policy, 9, deadline, signature);
        assertEq(account.sessionKey(sessionKey).id, 1);
        assertTrue(account.ownerApprovalNonceUsed(9));

        // Not replayable, e.g. after a revocation.
        vm.prank(owner);
        account.revokeSessionKey(sessionKey);
        vm.expectRevert(abi.encodeWithSelector(IAgentAccountSessionKeys.OwnerApprovalNonceAlreadyUsed.selector, 9));
        account.installSessionKeyWithSig(sessionKey, policy, 9, deadline, signature);
    }

    function test_InstallWithSigChecks() public {
        SessionPolicy memory policy = _recordPolicy();
        uint48 deadline = uint48(block.timestamp + 1 hours);
        bytes32 digest = account.hashInstallSessionKey(sessionKey, policy, 1, deadline);

        vm.expectRevert(IAgentAccountSessionKeys.OwnerApprovalInvalidSignature.selector);
        account.installSessionKeyWithSig(sessionKey, policy, 1, deadline, signPacked(sessionPk, digest));

        // The signature binds the policy: a widened policy does not verify.
        SessionPolicy memory wider = _recordPolicy();
        wider.permissions[0].valueLimit = 1 ether;
        vm.expectRevert(IAgentAccountSessionKeys.OwnerApprovalInvalidSignature.selector);
        account.installSessionKeyWithSig(sessionKey, wider, 1, deadline, signPacked(ownerKey, digest));

        vm.warp(uint256(deadline) + 1);
        vm.expectRevert(abi.encodeWithSelector(IAgentAccountSessionKeys.OwnerApprovalExpired.selector, deadline));
        account.installSessionKeyWithSig(sessionKey, policy, 1, deadline, signPacked(ownerKey, digest));
    }

    function test_CancelledApprovalCannotBeRelayed() public {
        SessionPolicy memory policy = _recordPolicy();
        uint48 deadline = uint48(block.timestamp + 1 hours);
        bytes memory signature = signPacked(ownerKey, account.hashInstallSessionKey(sessionKey, policy, 3, deadline));
        vm.expectEmit(true, false, false, false, address(account));
        emit IAgentAccountSessionKeys.OwnerApprovalNonceUsed(3);
        vm.prank(owner);
        account.cancelOwnerApproval(3);
        vm.expectRevert(abi.encodeWithSelector(IAgentAccountSessionKeys.OwnerApprovalNonceAlreadyUsed.selector, 3));
        account.installSessionKeyWithSig(sessionKey, policy, 3, deadline, signature);
    }

    function test_RevokeWithOwnerSignature() public {
        _install(sessionKey, _recordPolicy());
        uint48 deadline = uint48(block.timestamp + 1 hours);
        bytes memory signature = signPacked(ownerKey, account.hashRevokeSessionKey(sessionKey, 4, deadline));
        vm.prank(makeAddr("relayer"));
        account.revokeSessionKeyWithSig(sessionKey, 4, deadline, signature);
        assertEq(account.sessionKey(sessionKey).id, 0);
        assertEq(account.sessionKeys().length, 0);
    }

    /// @dev The digest is plain EIP-712 over the documented types, as any wallet computes it.
    function test_InstallDigestIsStandardEIP712() public view {
        ArgRule[] memory rules = new ArgRule[](2);
        rules[0] = _rule(ArgCondition.LessOrEqual, 32, bytes32(uint256(500)));
        bytes32[] memory values = new bytes32[](2);
        values[0] = bytes32(uint256(11));
        values[1] = bytes32(uint256(12));
        rules[1] = _oneOf(0, values);
        CallPermission[] memory permissions = new CallPermission[](2);
        permissions[0] = _permission(address(recorder), Recorder.record.selector, 5, rules);
        permissions[1] = _permission(address(0xBEEF), bytes4(0), 1 ether, new ArgRule[](0));
        SessionPolicy memory policy = SessionPolicy({
            validAfter: 10,
            validUntil: 20,
            maxUses: 3,
            interval: 60,
            maxUsesPerInterval: 2,
            gasBudget: 1 ether,
            permissions: permissions
        });

        string memory argRuleType = "ArgRule(uint8 condition,uint32 offset,bytes32[] values)";
        string memory permissionType =
            "CallPermission(address target,bytes4 selector,uint128 valueLimit,ArgRule[] rules)";
        string memory policyType =
            "SessionPolicy(uint48 validAfter,uint48 validUntil,uint32 maxUses,uint48 interval,uint32 maxUsesPerInterval,uint128 gasBudget,CallPermission[] permissions)";

        bytes32[] memory permissionHashes = new bytes32[](2);
        for (uint256 p = 0; p < 2; ++p) {
            bytes32[] memory ruleHashes = new bytes32[](permissions[p].rules.length);
            for (uint256 r = 0; r < ruleHashes.length; ++r) {
                ArgRule memory rule = permissions[p].rules[r];
                ruleHashes[r] = keccak256(
                    abi.encode(
                        keccak256(bytes(argRuleType)),
                        uint256(rule.condition),
                        uint256(rule.offset),
                        keccak256(abi.encodePacked(rule.values))
                    )
                );
            }
            permissionHashes[p] = keccak256(
                abi.encode(
                    keccak256(abi.encodePacked(permissionType, argRuleType)),
                    permissions[p].target,
                    bytes32(permissions[p].selector),
                    uint256(permissions[p].valueLimit),
                    keccak256(abi.encodePacked(ruleHashes))
                )
            );
        }
        bytes32 policyHash = keccak256(
            abi.encode(
                keccak256(abi.encodePacked(policyType, argRuleType, permissionType)),
                uint256(10),
                uint256(20),
                uint256(3),
                uint256(60),
                uint256(2),
                uint256(1 ether),
                keccak256(abi.encodePacked(permissionHashes))
            )
        );
        bytes32 structHash = keccak256(
            abi.encode(
                keccak256(
                    abi.encodePacked(
                        "InstallSessionKey(address key,SessionPolicy policy,uint256 nonce,uint48 deadline)",
                        argRuleType,
                        permissionType,
                        policyType
                    )
                ),
                sessionKey,
                policyHash,
                uint256(77),
                uint256(1234)
            )
        );
        bytes32 domainSeparator = keccak256(
            abi.encode(
                keccak256("EIP712Domain(string name,string version,uint256 chainId,address verifyingContract)"),
                keccak256("AgentAccount"),
                keccak256("1"),
                block.chainid,
                address(account)
            )
        );
        assertEq(
            account.hashInstallSessionKey(sessionKey, policy, 77, 1234),
            MessageHashUtils.toTypedDataHash(domainSeparator, structHash)
        );
        assertEq(
            account.hashRevokeSessionKey(sessionKey, 77, 1234),
            MessageHashUtils.toTypedDataHash(
                domainSeparator,
                keccak256(
                    abi.encode(
                        keccak256("RevokeSessionKey(address key,uint256 nonce,uint48 deadline)"),
                        sessionKey,
                        uint256(77),
                        uint256(1234)
                    )
                )
            )
        );
    }
}
