// SPDX-License-Identifier: MIT
pragma solidity ^0.8.26;

import {AccountTestBase} from "./account/AccountTestBase.sol";
import {AgentAccount} from "../src/account/AgentAccount.sol";
import {CallPermission, SessionPolicy} from "../src/account/SessionKeyTypes.sol";
import {AgentEscrow} from "../src/AgentEscrow.sol";
import {IAgentEscrow} from "../src/escrow/IAgentEscrow.sol";
import {MultichainApproval} from "../src/multichain/MultichainApproval.sol";
import {TestUSDC} from "../src/TestUSDC.sol";
import {MultichainTestLib as M, SessionKeyHasher} from "./multichain/MultichainTestLib.sol";

/**
 * @dev The payer is the owner's {AgentAccount} (the money and the escrow deposit live in the account, the owner key
 * is offline): ONE owner signature over a multichain root grants (and installs) on every chain. The escrow asks the
 * account's ERC-1271 about `MultichainApproval.digest(root)` with the signature `root ++ ownerSignature`.
 * "Chain B" is the same escrow and account addresses under another `block.chainid`.
 */
contract MultichainAccountPayerTest is AccountTestBase {
    bytes32 internal constant GRANT_TYPEHASH = keccak256(
        "Grant(address payer,address signer,address token,uint96 maxPerCall,uint128 budget,uint32 validAfter,uint32 validUntil,address[] payees,uint32 epoch)"
    );
    bytes32 internal constant REVOKE_TYPEHASH = keccak256("Revoke(address payer,address signer,uint32 epoch)");
    bytes32 internal constant PAYMENT_TYPEHASH = keccak256(
        "Payment(address payer,address payee,address token,uint256 amount,uint256 nonce,uint256 deadline,uint32 epoch)"
    );
    bytes4 internal constant MAGIC = 0x1626ba7e;
    bytes4 internal constant INVALID = 0xffffffff;
    uint256 internal constant CHAIN_A = 8453;
    uint256 internal constant CHAIN_B = 42161;
    uint256 internal constant NONCE = 5;
    uint256 internal constant DEPOSIT = 100e6;

    AgentEscrow internal escrow;
    TestUSDC internal usdc;
    SessionKeyHasher internal hasher;
    address internal key;
    uint256 internal keyPk;
    address internal payee;

    function setUp() public override {
        super.setUp();
        vm.chainId(CHAIN_A);
        escrow = new AgentEscrow(1 hours);
        usdc = new TestUSDC();
        hasher = new SessionKeyHasher();
        (key, keyPk) = makeAddrAndKey("session");
        payee = makeAddr("payee");
        // The account's escrow deposit, made by the account itself (here: its owner's call; in the Python
        // suite, a user operation of the session key).
        usdc.mint(address(account), DEPOSIT);
        vm.startPrank(address(account));
        usdc.approve(address(escrow), DEPOSIT);
        escrow.deposit(address(usdc), DEPOSIT);
        vm.stopPrank();
    }

    // ------------------------------------------------------------------ helpers

    function _params() internal view returns (IAgentEscrow.GrantParams memory) {
        return IAgentEscrow.GrantParams({
            token: address(usdc),
            maxPerCall: 2e6,
            budget: 10e6,
            validAfter: 0,
            validUntil: uint32(block.timestamp + 1 days)
        });
    }

    function _grantAction(address payer, uint32 epoch) internal view returns (bytes32) {
        IAgentEscrow.GrantParams memory g = _params();
        return keccak256(
            abi.encode(
                GRANT_TYPEHASH,
                payer,
                key,
                g.token,
                g.maxPerCall,
                g.budget,
                g.validAfter,
                g.validUntil,
                keccak256(abi.encodePacked(new address[](0))),
                epoch
            )
        );
    }

    function _keyPolicy() internal view returns (SessionPolicy memory policy) {
        policy.permissions = new CallPermission[](1);
        policy.permissions[0].target = address(recorder);
        policy.permissions[0].selector = recorder.record.selector;
        policy.gasBudget = 1 ether;
    }

    /// @dev The owner's approval for the demo: on chains A and B, the escrow grant (payer = the account) and the
    /// session-key install on the account. Leaves 0, 1: grants on A, B; 2, 3: installs on A, B.
    function _leaves() internal view returns (bytes32[] memory leaves) {
        bytes32 install = hasher.hashInstall(key, _keyPolicy(), NONCE, uint48(block.timestamp + 1 hours));
        leaves = new bytes32[](4);
        leaves[0] = M.leaf(CHAIN_A, address(escrow), _grantAction(address(account), 1));
        leaves[1] = M.leaf(CHAIN_B, address(escrow), _grantAction(address(account), 1));
        leaves[2] = M.leaf(CHAIN_A, address(account), install);
        leaves[3] = M.leaf(CHAIN_B, address(account), install);
    }

    /// @dev The escrow's form for an account payer: the signature is `root ++ ownerSignature`.
    function _accountProof(bytes32[] memory leaves, uint256 index, uint256 signingKey)
        internal
        pure
        returns (MultichainApproval.Proof memory p)
    {
        p.root = M.root(leaves);
        p.proof = M.proof(leaves, index);
        p.signature = bytes.concat(p.root, signPacked(signingKey, M.digest(p.root)));
    }

    function _grantWithProof(address payer, MultichainApproval.Proof memory p) internal {
        vm.prank(beneficiary); // anyone relays
        escrow.grantWithProof(payer, key, _params(), new address[](0), 1, p);
    }

    function _escrowDigest(bytes32 structHash) internal view returns (bytes32) {
        bytes32 domain = keccak256(
            abi.encode(
                keccak256("EIP712Domain(string name,string version,uint256 chainId,address verifyingContract)"),
                keccak256("AgentEscrow"),
                keccak256("1"),
                block.chainid,
                address(escrow)
            )
        );
        return keccak256(abi.encodePacked("\x19\x01", domain, structHash));
    }

    /// @dev A session-key payment from the account's deposit, settled; true when it paid.
    function _keyPays(uint256 nonce, uint256 amount) internal returns (bool) {
        IAgentEscrow.Payment memory p = IAgentEscrow.Payment({
            payer: address(account),
            payee: payee,
            token: address(usdc),
            amount: amount,
            nonce: nonce,
            deadline: block.timestamp + 5 minutes,
            epoch: 1
        });
        bytes memory sig = signPacked(
            keyPk,
            _escrowDigest(
                keccak256(
                    abi.encode(PAYMENT_TYPEHASH, p.payer, p.payee, p.token, p.amount, p.nonce, p.deadline, p.epoch)
                )
            )
        );
        IAgentEscrow.Payment[] memory ps = new IAgentEscrow.Payment[](1);
        ps[0] = p;
        bytes[] memory sigs = new bytes[](1);
        sigs[0] = sig;
        return escrow.settle(ps, sigs)[0] == IAgentEscrow.Reason.None;
    }

    // ------------------------------------------------------------------ one signature, two chains

    function test_OneOwnerSignatureGrantsAndInstallsOnBothChains() public {
        bytes32[] memory leaves = _leaves();
        bytes32 root = M.root(leaves);
        bytes memory ownerSig = signPacked(ownerKey, M.digest(root)); // the ONE signature
        uint48 deadline = uint48(block.timestamp + 1 hours);
        uint256 snapshot = vm.snapshotState();
        for (uint256 i; i < 2; ++i) {
            vm.revertToState(snapshot);
            vm.chainId(i == 0 ? CHAIN_A : CHAIN_B);

            MultichainApproval.Proof memory grantProof = _accountProof(leaves, i, ownerKey);
            assertEq(grantProof.signature, bytes.concat(root, ownerSig));
            vm.expectEmit(true, true, false, true, address(escrow));
            emit MultichainApproval.MultichainApprovalUsed(address(account), root, leaves[i]);
            _grantWithProof(address(account), grantProof);
            IAgentEscrow.GrantInfo memory info = escrow.grantOf(address(account), key);
            assertEq(info.epoch, 1);
            assertEq(info.budget, 10e6);

            // The same root and signature install the key on this chain's account (the raw 65-byte form).
            MultichainApproval.Proof memory installProof =
                MultichainApproval.Proof({root: root, proof: M.proof(leaves, 2 + i), signature: ownerSig});
            account.installSessionKeyWithProof(key, _keyPolicy(), NONCE, deadline, installProof);
            assertEq(account.sessionKey(key).id, 1);

            // The key pays from the account's escrow deposit, exactly.
            assertTrue(_keyPays(1, 2e6));
            assertEq(usdc.balanceOf(payee), 2e6);
            assertEq(escrow.depositOf(address(account), address(usdc)), DEPOSIT - 2e6);
            assertFalse(_keyPays(2, 2e6 + 1)); // over the per-call cap
        }
    }

    function test_AccountPayerRevokesWithProof() public {
        bytes32[] memory leaves = _leaves();
        _grantWithProof(address(account), _accountProof(leaves, 0, ownerKey));
        bytes32 revokeAction = keccak256(abi.encode(REVOKE_TYPEHASH, address(account), key, uint32(1)));
        bytes32[] memory revokes = new bytes32[](2);
        revokes[0] = M.leaf(CHAIN_A, address(escrow), revokeAction);
        revokes[1] = M.leaf(CHAIN_B, address(escrow), revokeAction);
        escrow.revokeWithProof(address(account), key, 1, _accountProof(revokes, 0, ownerKey));
        assertFalse(_keyPays(1, 1e6));
        // The grant leaf is dead after the revoke through its epoch.
        vm.expectPartialRevert(IAgentEscrow.EscrowStaleEpoch.selector);
        _grantWithProof(address(account), _accountProof(leaves, 0, ownerKey));
    }

    // ------------------------------------------------------------------ replay

    function test_LeafOfChainAIsRefusedOnChainB() public {
        MultichainApproval.Proof memory forA = _accountProof(_leaves(), 0, ownerKey);
        vm.chainId(CHAIN_B);
        vm.expectRevert(
            abi.encodeWithSelector(
                MultichainApproval.MultichainProofInvalid.selector,
                forA.root,
                M.leaf(CHAIN_B, address(escrow), _grantAction(address(account), 1))
            )
        );
        _grantWithProof(address(account), forA);
        assertEq(escrow.grantOf(address(account), key).epoch, 0);
    }

    /// @dev The owner's second account validates the same root (the domain names no account), yet its grant is
    /// not a leaf: the escrow recomputes the leaf with `payer = Y`.
    function test_ApprovalForAccountXIsRefusedForAccountYOfTheSameOwner() public {
        AgentAccount other = AgentAccount(payable(factory.createAccount(owner, 1)));
        MultichainApproval.Proof memory forX = _accountProof(_leaves(), 0, ownerKey);
        assertEq(other.isValidSignature(M.digest(forX.root), forX.signature), MAGIC);
        vm.expectRevert(
            abi.encodeWithSelector(
                MultichainApproval.MultichainProofInvalid.selector,
                forX.root,
                M.leaf(CHAIN_A, address(escrow), _grantAction(address(other), 1))
            )
        );
        _grantWithProof(address(other), forX);
        assertEq(escrow.grantOf(address(other), key).epoch, 0);
    }

    /// @dev A root naming account Z's grant, signed by X's owner, does not pass Z's ERC-1271 (another owner).
    function test_ApprovalSignedByAnotherOwnerIsRefused() public {
        (address otherOwner,) = makeAddrAndKey("other owner");
        AgentAccount z = AgentAccount(payable(factory.createAccount(otherOwner, 0)));
        bytes32[] memory leaves = new bytes32[](2);
        leaves[0] = M.leaf(CHAIN_A, address(escrow), _grantAction(address(z), 1));
        leaves[1] = M.leaf(CHAIN_B, address(escrow), _grantAction(address(z), 1));
        vm.expectRevert(abi.encodeWithSelector(IAgentEscrow.EscrowInvalidSignature.selector, address(z)));
        _grantWithProof(address(z), _accountProof(leaves, 0, ownerKey));
        // Nor does a session key's signature pass the account's, even for its own grant.
        MultichainApproval.Proof memory byKey = _accountProof(_leaves(), 0, keyPk);
        vm.expectRevert(abi.encodeWithSelector(IAgentEscrow.EscrowInvalidSignature.selector, address(account)));
        _grantWithProof(address(account), byKey);
    }

    /// @dev The bare 65-byte owner signature (the form the account's own `...WithProof` functions take) is not an
    /// ERC-1271 signature of the root's digest: an EOA-style multichain file cannot grant from the account.
    function test_BareOwnerSignatureIsNotTheAccountsSignature() public {
        MultichainApproval.Proof memory p = _accountProof(_leaves(), 0, ownerKey);
        p.signature = signPacked(ownerKey, M.digest(p.root));
        vm.expectRevert(abi.encodeWithSelector(IAgentEscrow.EscrowInvalidSignature.selector, address(account)));
        _grantWithProof(address(account), p);
    }

    // ------------------------------------------------------------------ no other protocol is fooled

    /// @dev The multichain form validates its own digest and nothing else; and the owner's signature of a
    /// multichain digest, in any of the account's other forms, validates no hash at all.
    function testFuzz_MultichainFormValidatesOnlyItsDigest(bytes32 root, bytes32 other, bytes32 otherRoot) public view {
        bytes32 digest = M.digest(root);
        vm.assume(other != digest && otherRoot != root);
        bytes memory ownerSig = signPacked(ownerKey, digest);
        bytes memory form = bytes.concat(root, ownerSig);

        assertEq(account.isValidSignature(digest, form), MAGIC);
        assertEq(account.isValidSignature(other, form), INVALID);
        // Another root in front of the same signature: the digest no longer matches, or the signature doesn't.
        assertEq(account.isValidSignature(digest, bytes.concat(otherRoot, ownerSig)), INVALID);
        assertEq(account.isValidSignature(M.digest(otherRoot), bytes.concat(otherRoot, ownerSig)), INVALID);
        // The bare signature: not for the digest itself, nor for any other hash (ERC-7739 nests every hash).
        assertEq(account.isValidSignature(digest, ownerSig), INVALID);
        assertEq(account.isValidSignature(other, ownerSig), INVALID);
        // The root in the hash position, or the form with trailing bytes: refused.
        assertEq(account.isValidSignature(root, form), INVALID);
        assertEq(account.isValidSignature(digest, bytes.concat(form, bytes1(0))), INVALID);
        // Not the owner: refused.
        assertEq(account.isValidSignature(digest, bytes.concat(root, signPacked(keyPk, digest))), INVALID);
    }

    /// @dev The escrow's own single-chain `grantWithSig`, a USDC permit and an EIP-3009 transfer from the account,
    /// all ERC-1271 askers, refuse the owner's multichain signature whatever root it carries.
    function testFuzz_OtherProtocolsRefuseTheMultichainForm(bytes32 root) public {
        bytes memory form = bytes.concat(root, signPacked(ownerKey, M.digest(root)));
        address thief = makeAddr("thief");

        vm.expectRevert(abi.encodeWithSelector(IAgentEscrow.EscrowInvalidSignature.selector, address(account)));
        escrow.grantWithSig(address(account), key, _params(), new address[](0), 1, form);

        vm.expectPartialRevert(bytes4(keccak256("ERC2612InvalidSignature(address)")));
        usdc.permit(address(account), thief, 1e6, block.timestamp + 1, form);

        usdc.mint(address(account), 1e6);
        vm.expectRevert(bytes4(keccak256("ERC3009InvalidSignature()")));
        usdc.transferWithAuthorization(address(account), thief, 1e6, 0, block.timestamp + 1, root, form);
        assertEq(usdc.balanceOf(thief), 0);
        assertEq(usdc.allowance(address(account), thief), 0);
    }

    /// @dev Any chain but the leaf's refuses it.
    function testFuzz_GrantLeafOnlyOnItsChain(uint64 chainId) public {
        vm.assume(chainId != CHAIN_A && chainId != CHAIN_B && chainId != 0);
        MultichainApproval.Proof memory forA = _accountProof(_leaves(), 0, ownerKey);
        vm.chainId(chainId);
        vm.expectPartialRevert(MultichainApproval.MultichainProofInvalid.selector);
        _grantWithProof(address(account), forA);
    }
}
