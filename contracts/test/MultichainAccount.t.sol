// SPDX-License-Identifier: MIT
pragma solidity ^0.8.26;

import {PackedUserOperation} from "@openzeppelin/contracts/interfaces/IERC4337.sol";

import {AccountTestBase} from "./account/AccountTestBase.sol";
import {IAgentAccountSessionKeys} from "../src/account/IAgentAccountSessionKeys.sol";
import {SessionPolicy, SessionPolicyKind} from "../src/account/SessionKeyTypes.sol";
import {MultichainApproval} from "../src/multichain/MultichainApproval.sol";
import {MultichainTestLib as M, SessionKeyHasher} from "./multichain/MultichainTestLib.sol";

/// @dev Session-key installs (and revokes) on the account from one owner signature over many chains.
contract MultichainAccountTest is AccountTestBase {
    uint256 internal constant CHAIN_A = 8453;
    uint256 internal constant CHAIN_B = 42161;
    uint256 internal constant NONCE = 77;

    SessionKeyHasher internal hasher;
    address internal key;
    uint256 internal keyPk;
    uint48 internal deadline;

    function setUp() public override {
        super.setUp();
        hasher = new SessionKeyHasher();
        (key, keyPk) = makeAddrAndKey("session");
        deadline = uint48(block.timestamp + 1 hours);
        vm.chainId(CHAIN_A);
    }

    function _installLeaves(SessionPolicy memory policy) internal view returns (bytes32[] memory leaves) {
        bytes32 action = hasher.hashInstall(key, policy, NONCE, deadline);
        leaves = new bytes32[](3);
        leaves[0] = M.leaf(CHAIN_A, address(account), action);
        leaves[1] = M.leaf(CHAIN_B, address(account), action);
        leaves[2] = M.leaf(CHAIN_A, address(0xBEEF), action);
    }

    function _approval(bytes32[] memory leaves, uint256 index, uint256 signingKey)
        internal
        pure
        returns (MultichainApproval.Proof memory p)
    {
        p.root = M.root(leaves);
        p.proof = M.proof(leaves, index);
        p.signature = signPacked(signingKey, M.digest(p.root));
    }

    function test_OneSignatureInstallsOnEachChain() public {
        SessionPolicy memory policy = _recordPolicy();
        bytes32[] memory leaves = _installLeaves(policy);
        uint256 snapshot = vm.snapshotState();
        for (uint256 i; i < 2; ++i) {
            vm.revertToState(snapshot);
            vm.chainId(i == 0 ? CHAIN_A : CHAIN_B);
            vm.expectEmit(true, true, false, true, address(account));
            emit MultichainApproval.MultichainApprovalUsed(address(account), M.root(leaves), leaves[i]);
            vm.prank(beneficiary); // anyone relays
            account.installSessionKeyWithProof(key, policy, NONCE, deadline, _approval(leaves, i, ownerKey));
            assertEq(account.sessionKey(key).id, 1);
            assertTrue(account.ownerApprovalNonceUsed(NONCE));
            _handle(_signSession(_op(_recordCall(4, 2)), key, keyPk));
            assertEq(recorder.calls(), 1);
        }
    }

    function test_LeafOfChainAIsRefusedOnChainB() public {
        SessionPolicy memory policy = _recordPolicy();
        MultichainApproval.Proof memory forA = _approval(_installLeaves(policy), 0, ownerKey);
        vm.chainId(CHAIN_B);
        vm.expectPartialRevert(MultichainApproval.MultichainProofInvalid.selector);
        account.installSessionKeyWithProof(key, policy, NONCE, deadline, forA);
        assertEq(account.sessionKey(key).id, 0);
    }

    function test_LeafOfAnotherAccountIsRefused() public {
        SessionPolicy memory policy = _recordPolicy();
        MultichainApproval.Proof memory p = _approval(_installLeaves(policy), 2, ownerKey);
        vm.expectPartialRevert(MultichainApproval.MultichainProofInvalid.selector);
        account.installSessionKeyWithProof(key, policy, NONCE, deadline, p);
    }

    function test_SignatureOfAnotherKeyIsRefused() public {
        SessionPolicy memory policy = _recordPolicy();
        MultichainApproval.Proof memory p = _approval(_installLeaves(policy), 0, keyPk);
        vm.expectRevert(IAgentAccountSessionKeys.OwnerApprovalInvalidSignature.selector);
        account.installSessionKeyWithProof(key, policy, NONCE, deadline, p);
    }

    function test_LeafIsSingleUseAndExpires() public {
        SessionPolicy memory policy = _recordPolicy();
        MultichainApproval.Proof memory p = _approval(_installLeaves(policy), 0, ownerKey);
        uint256 snapshot = vm.snapshotState();
        account.installSessionKeyWithProof(key, policy, NONCE, deadline, p);
        vm.expectRevert(abi.encodeWithSelector(IAgentAccountSessionKeys.OwnerApprovalNonceAlreadyUsed.selector, NONCE));
        account.installSessionKeyWithProof(key, policy, NONCE, deadline, p);
        vm.revertToState(snapshot);
        vm.warp(uint256(deadline) + 1);
        vm.expectRevert(abi.encodeWithSelector(IAgentAccountSessionKeys.OwnerApprovalExpired.selector, deadline));
        account.installSessionKeyWithProof(key, policy, NONCE, deadline, p);
    }

    function test_OtherPolicyThanSignedIsRefused() public {
        SessionPolicy memory policy = _recordPolicy();
        MultichainApproval.Proof memory p = _approval(_installLeaves(policy), 0, ownerKey);
        policy.gasBudget = 1 ether;
        vm.expectPartialRevert(MultichainApproval.MultichainProofInvalid.selector);
        account.installSessionKeyWithProof(key, policy, NONCE, deadline, p);
    }

    /// @dev A UserOperation the key signed for chain A fails signature validation on chain B (AA24).
    function test_UserOpOfChainAIsRefusedOnChainB() public {
        SessionPolicy memory policy = _recordPolicy();
        bytes32[] memory leaves = _installLeaves(policy);
        account.installSessionKeyWithProof(key, policy, NONCE, deadline, _approval(leaves, 0, ownerKey));
        PackedUserOperation memory op = _signSession(_op(_recordCall(1, 1)), key, keyPk);
        // Same account state, other chain id: the key is installed, yet the operation's hash is chain A's.
        vm.chainId(CHAIN_B);
        _handleFailedOp(op, "AA24 signature error");
        assertEq(recorder.calls(), 0);
        vm.chainId(CHAIN_A);
        _handle(op);
        assertEq(recorder.calls(), 1);
    }

    function test_RevokeEverywhere() public {
        SessionPolicy memory policy = _recordPolicy();
        bytes32[] memory installs = _installLeaves(policy);
        bytes32 revokeAction = hasher.hashRevoke(key, NONCE + 1, deadline);
        bytes32[] memory revokes = new bytes32[](2);
        revokes[0] = M.leaf(CHAIN_A, address(account), revokeAction);
        revokes[1] = M.leaf(CHAIN_B, address(account), revokeAction);
        uint256 snapshot = vm.snapshotState();
        for (uint256 i; i < 2; ++i) {
            vm.revertToState(snapshot);
            vm.chainId(i == 0 ? CHAIN_A : CHAIN_B);
            account.installSessionKeyWithProof(key, policy, NONCE, deadline, _approval(installs, i, ownerKey));
            account.revokeSessionKeyWithProof(key, NONCE + 1, deadline, _approval(revokes, i, ownerKey));
            assertEq(account.sessionKey(key).id, 0);
            PackedUserOperation memory op = _signSession(_op(_recordCall(1, 1)), key, keyPk);
            _expectViolation(key, SessionPolicyKind.Key, 0, 0);
            _handle(op);
        }
    }

    /// @dev For any two distinct chain ids, a leaf for one (with a valid proof and signature) installs nothing on the other.
    function testFuzz_LeafOfOneChainIsRefusedOnAnother(uint64 chainA, uint64 chainB, bytes32 other) public {
        vm.assume(chainA != chainB && chainA != 0 && chainB != 0);
        SessionPolicy memory policy = _recordPolicy();
        bytes32 action = hasher.hashInstall(key, policy, NONCE, deadline);
        bytes32[] memory leaves = new bytes32[](2);
        leaves[0] = M.leaf(chainA, address(account), action);
        leaves[1] = other;
        MultichainApproval.Proof memory p = _approval(leaves, 0, ownerKey);
        vm.chainId(chainB);
        vm.expectPartialRevert(MultichainApproval.MultichainProofInvalid.selector);
        account.installSessionKeyWithProof(key, policy, NONCE, deadline, p);
        vm.chainId(chainA);
        account.installSessionKeyWithProof(key, policy, NONCE, deadline, p);
        assertEq(account.sessionKey(key).id, 1);
    }

    /// @dev Revoke everywhere where the install leaf was never relayed: the cancel leaf burns its nonce there.
    function test_RevokeEverywhereBurnsAnInstallNotYetRelayed() public {
        SessionPolicy memory policy = _recordPolicy();
        bytes32[] memory installs = _installLeaves(policy);
        bytes32 cancel = hasher.hashCancel(NONCE);
        bytes32[] memory revokes = new bytes32[](2);
        revokes[0] = M.leaf(CHAIN_A, address(account), cancel);
        revokes[1] = M.leaf(CHAIN_B, address(account), cancel);
        MultichainApproval.Proof memory installB = _approval(installs, 1, ownerKey);
        vm.chainId(CHAIN_B);
        vm.prank(beneficiary);
        account.cancelOwnerApprovalWithProof(NONCE, _approval(revokes, 1, ownerKey));
        assertTrue(account.ownerApprovalNonceUsed(NONCE));
        vm.expectRevert(abi.encodeWithSelector(IAgentAccountSessionKeys.OwnerApprovalNonceAlreadyUsed.selector, NONCE));
        account.installSessionKeyWithProof(key, policy, NONCE, deadline, installB);
        // Chain A's cancel leaf is no good on chain B.
        MultichainApproval.Proof memory cancelA = _approval(revokes, 0, ownerKey);
        vm.expectPartialRevert(MultichainApproval.MultichainProofInvalid.selector);
        account.cancelOwnerApprovalWithProof(NONCE, cancelA);
    }
}
