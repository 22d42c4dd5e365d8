// SPDX-License-Identifier: MIT
pragma solidity ^0.8.26;

import {Test} from "../utils/Test.sol";
import {IEntryPoint, PackedUserOperation} from "@openzeppelin/contracts/interfaces/IERC4337.sol";
import {IEntryPointExtra} from "@openzeppelin/contracts/account/utils/ERC4337Utils.sol";
import {Execution} from "@openzeppelin/contracts/interfaces/draft-IERC7579.sol";
import {IERC7821} from "@openzeppelin/contracts/interfaces/draft-IERC7821.sol";
import {MessageHashUtils} from "@openzeppelin/contracts/utils/cryptography/MessageHashUtils.sol";

import {AgentAccount} from "../../src/account/AgentAccount.sol";
import {AgentAccountFactory} from "../../src/account/AgentAccountFactory.sol";
import {IAgentAccountSessionKeys} from "../../src/account/IAgentAccountSessionKeys.sol";
import {
    ArgCondition,
    ArgRule,
    CallPermission,
    SessionPolicy,
    SessionPolicyKind
} from "../../src/account/SessionKeyTypes.sol";

/// @dev Cheatcodes this suite needs beyond `test/utils/Test.sol` (file access is limited by `fs_permissions`).
interface VmFiles {
    function readFile(string calldata path) external view returns (string memory data);
    function parseJsonBytes(string calldata json, string calldata key) external pure returns (bytes memory);
}

/// @dev EntryPoint v0.7 events the tests read (declared here: the npm interfaces are GPL and stay out of our code).
interface IEntryPointEvents {
    event UserOperationEvent(
        bytes32 indexed userOpHash,
        address indexed sender,
        address indexed paymaster,
        uint256 nonce,
        bool success,
        uint256 actualGasCost,
        uint256 actualGasUsed
    );
    event UserOperationRevertReason(
        bytes32 indexed userOpHash, address indexed sender, uint256 nonce, bytes revertReason
    );
    event AccountDeployed(bytes32 indexed userOpHash, address indexed sender, address factory, address paymaster);
}

/// @dev A plain call target that records what it received.
contract Recorder {
    uint256 public calls;
    uint256 public lastA;
    uint256 public lastB;
    uint256 public received;

    error RecorderRefused(uint256 a);

    function record(uint256 a, uint256 b) external payable {
        calls += 1;
        lastA = a;
        lastB = b;
        received += msg.value;
    }

    function recordAddress(address who, uint256 amount) external {
        calls += 1;
        lastA = uint256(uint160(who));
        lastB = amount;
    }

    function refuse(uint256 a) external pure {
        revert RecorderRefused(a);
    }

    receive() external payable {
        received += msg.value;
    }
}

/**
 * @dev Shared fixture: the real EntryPoint v0.7 (npm artifact) at its canonical address, an {AgentAccountFactory},
 * one account owned by `owner`, helpers to build, sign and submit UserOperations.
 */
abstract contract AccountTestBase is Test, IEntryPointEvents {
    IEntryPoint internal constant ENTRYPOINT = IEntryPoint(0x0000000071727De22E5E9d8BAf0edAc6f37da032);
    string internal constant ENTRYPOINT_ARTIFACT =
        "../node_modules/@account-abstraction/contracts/artifacts/EntryPoint.json";

    /// @dev ERC-7821 batch mode, default exec type.
    bytes32 internal constant BATCH_MODE = bytes32(uint256(0x01) << 248);

    uint256 internal constant VERIFICATION_GAS = 400_000;
    uint256 internal constant CALL_GAS = 300_000;
    uint256 internal constant PRE_VERIFICATION_GAS = 50_000;
    uint256 internal constant MAX_FEE = 2 gwei;
    uint256 internal constant PRIORITY_FEE = 1 gwei;

    AgentAccountFactory internal factory;
    AgentAccount internal account;
    Recorder internal recorder;
    address internal owner;
    uint256 internal ownerKey;
    address payable internal beneficiary;
    /// @dev The callGasLimit of the next UserOperations built with {_op}.
    uint256 internal callGasLimit = CALL_GAS;

    function setUp() public virtual {
        _deployEntryPoint();
        vm.warp(1_750_000_000);
        (owner, ownerKey) = makeAddrAndKey("owner");
        beneficiary = payable(makeAddr("beneficiary"));
        factory = new AgentAccountFactory(ENTRYPOINT);
        account = AgentAccount(payable(factory.createAccount(owner, 0)));
        vm.deal(address(account), 100 ether);
        recorder = new Recorder();
    }

    /**
     * @dev Deploys the npm EntryPoint v0.7 from its creation code and moves its runtime code to the canonical
     * address. Its only immutable, the SenderCreator, keeps pointing at the helper the constructor deployed (any
     * caller may use it), and the one storage word it initialises (the reentrancy status) is copied over.
     */
    function _deployEntryPoint() internal {
        VmFiles files = VmFiles(address(vm));
        string memory artifact;
        try files.readFile(ENTRYPOINT_ARTIFACT) returns (string memory json) {
            artifact = json;
        } catch {
            revert(
                "AccountTestBase: cannot read the EntryPoint artifact; contracts/foundry.toml needs "
                'fs_permissions = [{ access = "read", path = "../node_modules/@account-abstraction/contracts/artifacts" }]'
            );
        }
        bytes memory initCode = files.parseJsonBytes(artifact, ".bytecode");
        address deployed;
        assembly ("memory-safe") {
            deployed := create(0, add(initCode, 0x20), mload(initCode))
        }
        require(deployed != address(0), "EntryPoint deployment failed");
        vm.etch(address(ENTRYPOINT), deployed.code);
        for (uint256 slot = 0; slot < 4; ++slot) {
            vm.store(address(ENTRYPOINT), bytes32(slot), vm.load(deployed, bytes32(slot)));
        }
    }

    // ------------------------------------------------------------------ calldata builders

    function _call(address target, uint256 value, bytes memory data) internal pure returns (Execution memory) {
        return Execution({target: target, value: value, callData: data});
    }

    function _execute(Execution[] memory calls) internal pure returns (bytes memory) {
        return abi.encodeCall(IERC7821.execute, (BATCH_MODE, abi.encode(calls)));
    }

    function _execute1(address target, uint256 value, bytes memory data) internal pure returns (bytes memory) {
        Execution[] memory calls = new Execution[](1);
        calls[0] = _call(target, value, data);
        return _execute(calls);
    }

    function _recordCall(uint256 a, uint256 b) internal view returns (bytes memory) {
        return _execute1(address(recorder), 0, abi.encodeCall(Recorder.record, (a, b)));
    }

    // ------------------------------------------------------------------ user operations

    function _op(address sender, uint256 nonce, bytes memory callData)
        internal
        view
        returns (PackedUserOperation memory op)
    {
        op.sender = sender;
        op.nonce = nonce;
        op.callData = callData;
        op.accountGasLimits = bytes32((VERIFICATION_GAS << 128) | callGasLimit);
        op.preVerificationGas = PRE_VERIFICATION_GAS;
        op.gasFees = bytes32((PRIORITY_FEE << 128) | MAX_FEE);
    }

    function _op(bytes memory callData) internal view returns (PackedUserOperation memory) {
        return _op(address(account), ENTRYPOINT.getNonce(address(account), 0), callData);
    }

    function _opOnLane(uint192 lane, bytes memory callData) internal view returns (PackedUserOperation memory) {
        return _op(address(account), ENTRYPOINT.getNonce(address(account), lane), callData);
    }

    function _hash(PackedUserOperation memory op) internal view returns (bytes32) {
        return IEntryPointExtra(address(ENTRYPOINT)).getUserOpHash(op);
    }

    function _signOwner(PackedUserOperation memory op) internal view returns (PackedUserOperation memory) {
        op.signature = signPacked(ownerKey, MessageHashUtils.toEthSignedMessageHash(_hash(op)));
        return op;
    }

    function _signSession(PackedUserOperation memory op, address key, uint256 signingKey, uint48 window)
        internal
        view
        returns (PackedUserOperation memory)
    {
        op.signature = abi.encodePacked(
            key, window, signPacked(signingKey, MessageHashUtils.toEthSignedMessageHash(_hash(op)))
        );
        return op;
    }

    function _signSession(PackedUserOperation memory op, address key, uint256 signingKey)
        internal
        view
        returns (PackedUserOperation memory)
    {
        return _signSession(op, key, signingKey, 0);
    }

    function _handle(PackedUserOperation memory op) internal {
        PackedUserOperation[] memory ops = new PackedUserOperation[](1);
        ops[0] = op;
        ENTRYPOINT.handleOps(ops, beneficiary);
    }

    function _handleAll(PackedUserOperation[] memory ops) internal {
        ENTRYPOINT.handleOps(ops, beneficiary);
    }

    /// @dev Expects the next `handleOps` to fail validation of op 0 with a session-key policy violation.
    function _expectViolation(address key, SessionPolicyKind policy, uint256 callIndex, uint256 ruleIndex) internal {
        _expectViolationAt(0, key, policy, callIndex, ruleIndex);
    }

    function _expectViolationAt(
        uint256 opIndex,
        address key,
        SessionPolicyKind policy,
        uint256 callIndex,
        uint256 ruleIndex
    ) internal {
        vm.expectRevert(
            abi.encodeWithSelector(
                IEntryPoint.FailedOpWithRevert.selector,
                opIndex,
                "AA23 reverted",
                abi.encodeWithSelector(
                    IAgentAccountSessionKeys.SessionKeyPolicyViolation.selector, key, policy, callIndex, ruleIndex
                )
            )
        );
    }

    function _expectFailedOp(string memory reason) internal {
        vm.expectRevert(abi.encodeWithSelector(IEntryPoint.FailedOp.selector, 0, reason));
    }

    /// @dev Submits `op` (built before the expectation is armed) and expects a session-key policy violation.
    function _handleViolation(
        PackedUserOperation memory op,
        address key,
        SessionPolicyKind policy,
        uint256 callIndex,
        uint256 ruleIndex
    ) internal {
        _expectViolation(key, policy, callIndex, ruleIndex);
        _handle(op);
    }

    /// @dev Submits `op` and expects the EntryPoint to reject it with `FailedOp(0, reason)`.
    function _handleFailedOp(PackedUserOperation memory op, string memory reason) internal {
        _expectFailedOp(reason);
        _handle(op);
    }

    // ------------------------------------------------------------------ policies

    function _rule(ArgCondition condition, uint32 offset, bytes32 value) internal pure returns (ArgRule memory rule) {
        bytes32[] memory values = new bytes32[](1);
        values[0] = value;
        rule = ArgRule({condition: condition, offset: offset, values: values});
    }

    function _oneOf(uint32 offset, bytes32[] memory values) internal pure returns (ArgRule memory) {
        return ArgRule({condition: ArgCondition.OneOf, offset: offset, values: values});
    }

    function _permission(address target, bytes4 selector, uint128 valueLimit, ArgRule[] memory rules)
        internal
        pure
        returns (CallPermission memory)
    {
        return CallPermission({target: target, selector: selector, valueLimit: valueLimit, rules: rules});
    }

    /// @dev A policy with `permissions` only: no time bounds, no rate limit, and a gas budget no test reaches.
    function _policy(CallPermission[] memory permissions) internal pure returns (SessionPolicy memory policy) {
        policy.permissions = permissions;
        policy.gasBudget = type(uint128).max;
    }

    /// @dev Allows `Recorder.record(a, b)` with no rules and no value.
    function _recordPolicy() internal view returns (SessionPolicy memory) {
        CallPermission[] memory permissions = new CallPermission[](1);
        permissions[0] = _permission(address(recorder), Recorder.record.selector, 0, new ArgRule[](0));
        return _policy(permissions);
    }

    function _install(address key, SessionPolicy memory policy) internal {
        vm.prank(owner);
        account.installSessionKey(key, policy);
    }
}
