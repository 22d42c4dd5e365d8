// SPDX-License-Identifier: MIT
pragma solidity ^0.8.26;

import {EscrowTestBase} from "./escrow/EscrowTestBase.sol";
import {IAgentEscrow} from "../src/escrow/IAgentEscrow.sol";
import {MultichainApproval} from "../src/multichain/MultichainApproval.sol";
import {MultichainTestLib as M} from "./multichain/MultichainTestLib.sol";

/**
 * @dev One payer signature over a Merkle root of per-chain grant (and revoke) leaves: each chain accepts its own
 * leaf only. "Chain B" is the same escrow address with another `block.chainid` (vm.chainId), the hardest case for
 * a leaf that forgot its chain.
 */
contract MultichainEscrowTest is EscrowTestBase {
    uint256 internal constant CHAIN_A = 8453;
    uint256 internal constant CHAIN_B = 42161;

    function setUp() public override {
        super.setUp();
        _onChain(CHAIN_A);
    }

    /// @dev Moves to `chainId`; payments are then signed under that chain's escrow domain.
    function _onChain(uint256 chainId) internal {
        vm.chainId(chainId);
        domainSeparator = keccak256(
            abi.encode(
                keccak256("EIP712Domain(string name,string version,uint256 chainId,address verifyingContract)"),
                keccak256("AgentEscrow"),
                keccak256("1"),
                chainId,
                address(escrow)
            )
        );
    }

    function _grantAction(uint32 epoch) internal view returns (bytes32) {
        IAgentEscrow.GrantParams memory g = _params(10e6, 100e6);
        address[] memory payees = new address[](0);
        return keccak256(
            abi.encode(
                GRANT_TYPEHASH,
                payer,
                sessionKey,
                g.token,
                g.maxPerCall,
                g.budget,
                g.validAfter,
                g.validUntil,
                keccak256(abi.encodePacked(payees)),
                epoch
            )
        );
    }

    function _revokeAction(uint32 epoch) internal view returns (bytes32) {
        return keccak256(abi.encode(REVOKE_TYPEHASH, payer, sessionKey, epoch));
    }

    /// @dev Leaves [chain A, chain B, another escrow on A, chain B's revoke]; the payer signs the root once.
    function _leaves(bytes32 action) internal view returns (bytes32[] memory leaves) {
        leaves = new bytes32[](3);
        leaves[0] = M.leaf(CHAIN_A, address(escrow), action);
        leaves[1] = M.leaf(CHAIN_B, address(escrow), action);
        leaves[2] = M.leaf(CHAIN_A, address(0xBEEF), action);
    }

    function _approval(bytes32[] memory leaves, uint256 index, uint256 key)
        internal
        pure
        returns (MultichainApproval.Proof memory p)
    {
        p.root = M.root(leaves);
        p.proof = M.proof(leaves, index);
        p.signature = signPacked(key, M.digest(p.root));
    }

    function _grantWithProof(uint32 epoch, MultichainApproval.Proof memory p) internal {
        vm.prank(relayer);
        escrow.grantWithProof(payer, sessionKey, _params(10e6, 100e6), new address[](0), epoch, p);
    }

    function _canPay(uint256 nonce, uint32 epoch) internal returns (bool) {
        IAgentEscrow.Payment memory p = _payment(payer, payee, 1e6, nonce, epoch);
        return _settle(p, _sign(sessionKeyPk, p)) == IAgentEscrow.Reason.None;
    }

    function test_OneSignatureGrantsOnEachChain() public {
        bytes32[] memory leaves = _leaves(_grantAction(1));
        uint256 snapshot = vm.snapshotState();

        vm.expectEmit(true, true, false, true, address(escrow));
        emit MultichainApproval.MultichainApprovalUsed(payer, M.root(leaves), leaves[0]);
        _grantWithProof(1, _approval(leaves, 0, payerKey));
        assertEq(escrow.grantOf(payer, sessionKey).epoch, 1);
        assertTrue(_canPay(1, 1));

        vm.revertToState(snapshot);
        _onChain(CHAIN_B);
        _grantWithProof(1, _approval(leaves, 1, payerKey));
        assertEq(escrow.grantOf(payer, sessionKey).epoch, 1);
        assertTrue(_canPay(1, 1));
    }

    function test_LeafOfChainAIsRefusedOnChainB() public {
        bytes32[] memory leaves = _leaves(_grantAction(1));
        MultichainApproval.Proof memory forA = _approval(leaves, 0, payerKey);
        _onChain(CHAIN_B);
        vm.expectRevert(
            abi.encodeWithSelector(
                MultichainApproval.MultichainProofInvalid.selector,
                forA.root,
                M.leaf(CHAIN_B, address(escrow), _grantAction(1))
            )
        );
        _grantWithProof(1, forA);
        assertEq(escrow.grantOf(payer, sessionKey).epoch, 0);
    }

    /// @dev A session-key payment signed under chain A's grant and domain does not settle on chain B.
    function test_PaymentOfChainAIsRefusedOnChainB() public {
        bytes32[] memory leaves = _leaves(_grantAction(1));
        _grantWithProof(1, _approval(leaves, 0, payerKey));
        IAgentEscrow.Payment memory p = _payment(payer, payee, 1e6, 7, 1);
        bytes memory sig = _sign(sessionKeyPk, p);
        vm.chainId(CHAIN_B);
        // On B the signature recovers to an unrelated address, which holds no grant of the payer.
        assertEq(_reason(_settle(p, sig)), _reason(IAgentEscrow.Reason.GrantNotFound));
        assertEq(usdc.balanceOf(payee), 0);
        vm.chainId(CHAIN_A);
        assertEq(_reason(_settle(p, sig)), _reason(IAgentEscrow.Reason.None));
        assertEq(usdc.balanceOf(payee), 1e6);
    }

    function test_LeafOfAnotherEscrowIsRefused() public {
        bytes32[] memory leaves = _leaves(_grantAction(1));
        vm.expectPartialRevert(MultichainApproval.MultichainProofInvalid.selector);
        _grantWithProof(1, _approval(leaves, 2, payerKey));
    }

    function test_SignatureOfAnotherKeyIsRefused() public {
        bytes32[] memory leaves = _leaves(_grantAction(1));
        vm.expectRevert(abi.encodeWithSelector(IAgentEscrow.EscrowInvalidSignature.selector, payer));
        _grantWithProof(1, _approval(leaves, 0, sessionKeyPk));
    }

    function test_LeafIsSingleUse() public {
        bytes32[] memory leaves = _leaves(_grantAction(1));
        MultichainApproval.Proof memory p = _approval(leaves, 0, payerKey);
        _grantWithProof(1, p);
        vm.expectRevert(abi.encodeWithSelector(IAgentEscrow.EscrowStaleEpoch.selector, payer, sessionKey, 1, 1));
        _grantWithProof(1, p);
    }

    function test_OtherTermsThanSignedAreRefused() public {
        bytes32[] memory leaves = _leaves(_grantAction(1));
        MultichainApproval.Proof memory p = _approval(leaves, 0, payerKey);
        vm.prank(relayer);
        vm.expectPartialRevert(MultichainApproval.MultichainProofInvalid.selector);
        escrow.grantWithProof(payer, sessionKey, _params(10e6, 1_000e6), new address[](0), 1, p);
    }

    /// @dev A grant leaf cannot pass as a revoke leaf (or the reverse): the action's typehash differs.
    function test_GrantLeafIsNoRevoke() public {
        bytes32[] memory leaves = _leaves(_grantAction(1));
        _grantWithProof(1, _approval(leaves, 0, payerKey));
        vm.expectPartialRevert(MultichainApproval.MultichainProofInvalid.selector);
        escrow.revokeWithProof(payer, sessionKey, 1, _approval(leaves, 0, payerKey));
    }

    function test_RevokeEverywhere() public {
        bytes32[] memory grants = _leaves(_grantAction(1));
        bytes32[] memory revokes = _leaves(_revokeAction(1));
        uint256 snapshot = vm.snapshotState();
        for (uint256 i; i < 2; ++i) {
            vm.revertToState(snapshot);
            _onChain(i == 0 ? CHAIN_A : CHAIN_B);
            _grantWithProof(1, _approval(grants, i, payerKey));
            assertTrue(_canPay(1, 1));
            vm.prank(relayer);
            escrow.revokeWithProof(payer, sessionKey, 1, _approval(revokes, i, payerKey));
            assertEq(escrow.grantOf(payer, sessionKey).token, address(0));
            assertFalse(_canPay(2, 1));
            // The grant leaf, relayed again after the revoke, stays dead.
            vm.expectPartialRevert(IAgentEscrow.EscrowStaleEpoch.selector);
            _grantWithProof(1, _approval(grants, i, payerKey));
        }
    }

    /// @dev A revoke leaf relayed before the grant leaf still wins (epochs), on each chain independently.
    function test_RevokeBeforeGrantWins() public {
        vm.prank(relayer);
        escrow.revokeWithProof(payer, sessionKey, 1, _approval(_leaves(_revokeAction(1)), 0, payerKey));
        vm.expectPartialRevert(IAgentEscrow.EscrowStaleEpoch.selector);
        _grantWithProof(1, _approval(_leaves(_grantAction(1)), 0, payerKey));
    }

    function testFuzz_LeafOfOneChainIsRefusedOnAnother(uint64 chainA, uint64 chainB, uint8 count, uint8 pick) public {
        vm.assume(chainA != chainB && chainA != 0 && chainB != 0);
        uint256 n = bound(count, 1, 16);
        uint256 index = bound(pick, 0, n - 1);
        bytes32 action = _grantAction(1);
        bytes32[] memory leaves = new bytes32[](n);
        for (uint256 i; i < n; ++i) {
            // Chain A's leaf at `index`; the others are other chains' leaves of the same grant.
            leaves[i] = M.leaf(i == index ? chainA : uint256(chainA) + 1000 + i, address(escrow), action);
            if (uint256(chainA) + 1000 + i == chainB) leaves[i] = M.leaf(chainA, address(0xBEEF), action);
        }
        MultichainApproval.Proof memory p = _approval(leaves, index, payerKey);
        _onChain(chainB);
        vm.expectPartialRevert(MultichainApproval.MultichainProofInvalid.selector);
        _grantWithProof(1, p);
        _onChain(chainA);
        _grantWithProof(1, p);
        assertEq(escrow.grantOf(payer, sessionKey).epoch, 1);
    }

    function testFuzz_TamperedProofIsRefused(uint8 count, uint8 pick, uint8 element, bytes32 noise) public {
        uint256 n = bound(count, 2, 16);
        uint256 index = bound(pick, 0, n - 1);
        bytes32[] memory leaves = new bytes32[](n);
        for (uint256 i; i < n; ++i) {
            leaves[i] = M.leaf(i == index ? CHAIN_A : CHAIN_A + 1 + i, address(escrow), _grantAction(1));
        }
        MultichainApproval.Proof memory p = _approval(leaves, index, payerKey);
        vm.assume(noise != bytes32(0));
        uint256 which = bound(element, 0, p.proof.length);
        if (which == p.proof.length) {
            p.root ^= noise; // another root, signed correctly: the proof does not lead there
            p.signature = signPacked(payerKey, M.digest(p.root));
        } else {
            p.proof[which] ^= noise;
        }
        vm.expectPartialRevert(MultichainApproval.MultichainProofInvalid.selector);
        _grantWithProof(1, p);
    }

    /// @dev An inner node of the tree presented as a leaf's proof target (second preimage) proves nothing.
    function test_InnerNodeIsNoLeaf() public {
        bytes32[] memory leaves = new bytes32[](4);
        for (uint256 i; i < 4; ++i) {
            leaves[i] = M.leaf(CHAIN_A + i, address(escrow), _grantAction(1));
        }
        bytes32 root = M.root(leaves);
        // The contract hashes the action it is given into a leaf; no action hashes to an inner node, and a proof
        // that starts one level up leads to the root only from the inner node itself.
        bytes32[] memory shortProof = new bytes32[](1);
        shortProof[0] = M.hashPair(leaves[2], leaves[3]);
        MultichainApproval.Proof memory p =
            MultichainApproval.Proof(root, shortProof, signPacked(payerKey, M.digest(root)));
        vm.expectPartialRevert(MultichainApproval.MultichainProofInvalid.selector);
        _grantWithProof(1, p);
    }
}
