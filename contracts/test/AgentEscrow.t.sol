// SPDX-License-Identifier: MIT
pragma solidity ^0.8.26;

import {Vm} from "./utils/Test.sol";
import {EscrowTestBase} from "./escrow/EscrowTestBase.sol";
import {MockERC20} from "./escrow/MockERC20.sol";
import {ReentrantERC20} from "./escrow/ReentrantERC20.sol";
import {HostileWallet} from "./escrow/HostileWallet.sol";
import {AgentEscrow} from "../src/AgentEscrow.sol";
import {IAgentEscrow} from "../src/escrow/IAgentEscrow.sol";
import {ERC1271Wallet} from "../src/mocks/ERC1271Wallet.sol";
import {TestUSDC} from "../src/TestUSDC.sol";

contract AgentEscrowTest is EscrowTestBase {
    bytes32 internal constant RECEIVE_TYPEHASH = keccak256(
        "ReceiveWithAuthorization(address from,address to,uint256 value,uint256 validAfter,uint256 validBefore,bytes32 nonce)"
    );
    bytes32 internal constant PERMIT_TYPEHASH =
        keccak256("Permit(address owner,address spender,uint256 value,uint256 nonce,uint256 deadline)");
    bytes32 internal constant TRANSFER_TOPIC = keccak256("Transfer(address,address,uint256)");

    // ================================================================== metadata

    function test_eip712Domain() public view {
        (, string memory name, string memory version, uint256 chainId, address verifyingContract,,) =
            escrow.eip712Domain();
        assertEq(name, "AgentEscrow");
        assertEq(version, "1");
        assertEq(chainId, block.chainid);
        assertEq(verifyingContract, address(escrow));
        assertEq(escrow.PAYMENT_TYPEHASH(), PAYMENT_TYPEHASH);
        assertEq(escrow.GRANT_TYPEHASH(), GRANT_TYPEHASH);
        assertEq(escrow.REVOKE_TYPEHASH(), REVOKE_TYPEHASH);
        assertEq(escrow.WITHDRAWAL_DELAY(), DELAY);
    }

    function test_hashPayment_matchesTypedData() public view {
        IAgentEscrow.Payment memory p = _payment(payer, payee2, 123, 456, 7);
        assertEq(escrow.hashPayment(p), _paymentDigest(p));
    }

    // ================================================================== deposits

    function test_deposit_creditsCallerAndEmits() public {
        address alice = makeAddr("alice");
        usdc.mint(alice, 50e6);
        vm.startPrank(alice);
        usdc.approve(address(escrow), 50e6);
        vm.expectEmit(address(escrow));
        emit IAgentEscrow.Deposited(alice, address(usdc), alice, 50e6);
        escrow.deposit(address(usdc), 50e6);
        vm.stopPrank();
        assertEq(escrow.depositOf(alice, address(usdc)), 50e6);
        assertEq(usdc.balanceOf(address(escrow)), DEPOSIT + 50e6);
    }

    function test_depositFor_creditsPayer() public {
        address funder = makeAddr("funder");
        usdc.mint(funder, 7e6);
        vm.startPrank(funder);
        usdc.approve(address(escrow), 7e6);
        vm.expectEmit(address(escrow));
        emit IAgentEscrow.Deposited(payer, address(usdc), funder, 7e6);
        escrow.depositFor(payer, address(usdc), 7e6);
        vm.stopPrank();
        assertEq(escrow.depositOf(payer, address(usdc)), DEPOSIT + 7e6);
        assertEq(escrow.depositOf(funder, address(usdc)), 0);
    }

    function test_depositFor_revertsForUnusablePayer() public {
        vm.expectRevert(abi.encodeWithSelector(IAgentEscrow.EscrowInvalidPayer.selector, address(0)));
        escrow.depositFor(address(0), address(usdc), 1);
        vm.expectRevert(abi.encodeWithSelector(IAgentEscrow.EscrowInvalidPayer.selector, address(escrow)));
        escrow.depositFor(address(escrow), address(usdc), 1);
    }

    function test_deposit_revertsWithoutAllowance() public {
        usdc.mint(relayer, 1e6);
        vm.prank(relayer);
        vm.expectRevert();
        escrow.deposit(address(usdc), 1e6);
    }

    function _receiveSig(uint256 key, address from, uint256 value, bytes32 nonce) internal view returns (bytes memory) {
        bytes32 usdcDomain = keccak256(
            abi.encode(
                keccak256("EIP712Domain(string name,string version,uint256 chainId,address verifyingContract)"),
                keccak256("USD Coin"),
                keccak256("2"),
                block.chainid,
                address(usdc)
            )
        );
        bytes32 structHash =
            keccak256(abi.encode(RECEIVE_TYPEHASH, from, address(escrow), value, 0, block.timestamp + 1 hours, nonce));
        return signPacked(key, keccak256(abi.encodePacked("\x19\x01", usdcDomain, structHash)));
    }

    function test_depositWithAuthorization_eoa() public {
        (address alice, uint256 aliceKey) = makeAddrAndKey("alice");
        usdc.mint(alice, 20e6);
        bytes memory sig = _receiveSig(aliceKey, alice, 20e6, bytes32(uint256(1)));
        vm.expectEmit(address(escrow));
        emit IAgentEscrow.Deposited(alice, address(usdc), alice, 20e6);
        vm.prank(relayer);
        escrow.depositWithAuthorization(
            alice, address(usdc), 20e6, 0, block.timestamp + 1 hours, bytes32(uint256(1)), sig
        );
        assertEq(escrow.depositOf(alice, address(usdc)), 20e6);
        assertEq(usdc.balanceOf(alice), 0);

        // The authorization is single-use.
        vm.prank(relayer);
        vm.expectRevert();
        escrow.depositWithAuthorization(
            alice, address(usdc), 20e6, 0, block.timestamp + 1 hours, bytes32(uint256(1)), sig
        );
    }

    function test_depositWithAuthorization_smartAccount() public {
        (address owner, uint256 ownerKey) = makeAddrAndKey("wallet owner");
        ERC1271Wallet wallet = new ERC1271Wallet(owner);
        usdc.mint(address(wallet), 30e6);
        bytes memory sig = _receiveSig(ownerKey, address(wallet), 30e6, bytes32(uint256(9)));
        vm.prank(relayer);
        escrow.depositWithAuthorization(
            address(wallet), address(usdc), 30e6, 0, block.timestamp + 1 hours, bytes32(uint256(9)), sig
        );
        assertEq(escrow.depositOf(address(wallet), address(usdc)), 30e6);
    }

    function test_depositWithAuthorization_revertsOnWrongSigner() public {
        (address alice,) = makeAddrAndKey("alice");
        usdc.mint(alice, 20e6);
        bytes memory sig = _receiveSig(sessionKeyPk, alice, 20e6, bytes32(uint256(1)));
        vm.expectRevert();
        escrow.depositWithAuthorization(
            alice, address(usdc), 20e6, 0, block.timestamp + 1 hours, bytes32(uint256(1)), sig
        );
    }

    function _permitSig(uint256 key, address owner, uint256 value, uint256 deadline)
        internal
        view
        returns (uint8 v, bytes32 r, bytes32 s)
    {
        bytes32 structHash =
            keccak256(abi.encode(PERMIT_TYPEHASH, owner, address(escrow), value, usdc.nonces(owner), deadline));
        return vm.sign(key, keccak256(abi.encodePacked("\x19\x01", usdc.DOMAIN_SEPARATOR(), structHash)));
    }

    function test_depositWithPermit() public {
        (address alice, uint256 aliceKey) = makeAddrAndKey("alice");
        usdc.mint(alice, 40e6);
        uint256 deadline = block.timestamp + 1 hours;
        (uint8 v, bytes32 r, bytes32 s) = _permitSig(aliceKey, alice, 40e6, deadline);
        vm.expectEmit(address(escrow));
        emit IAgentEscrow.Deposited(alice, address(usdc), alice, 40e6);
        vm.prank(relayer);
        escrow.depositWithPermit(alice, address(usdc), 40e6, deadline, v, r, s);
        assertEq(escrow.depositOf(alice, address(usdc)), 40e6);
    }

    function test_depositWithPermit_frontRunRevertsAndMovesNothing() public {
        (address alice, uint256 aliceKey) = makeAddrAndKey("alice");
        usdc.mint(alice, 40e6);
        uint256 deadline = block.timestamp + 1 hours;
        (uint8 v, bytes32 r, bytes32 s) = _permitSig(aliceKey, alice, 40e6, deadline);
        usdc.permit(alice, address(escrow), 40e6, deadline, v, r, s); // a watcher uses the permit first
        vm.expectRevert();
        escrow.depositWithPermit(alice, address(usdc), 40e6, deadline, v, r, s);
        assertEq(usdc.balanceOf(alice), 40e6);
        assertEq(escrow.depositOf(alice, address(usdc)), 0);
    }

    // ================================================================== withdrawals

    function test_requestWithdrawal_setsPendingAndEmits() public {
        vm.expectEmit(address(escrow));
        emit IAgentEscrow.WithdrawalRequested(payer, address(usdc), 300e6, block.timestamp + DELAY);
        vm.prank(payer);
        escrow.requestWithdrawal(address(usdc), 300e6);
        (uint256 amount, uint256 readyAt) = escrow.withdrawalOf(payer, address(usdc));
        assertEq(amount, 300e6);
        assertEq(readyAt, block.timestamp + DELAY);
    }

    function test_requestWithdrawal_revertsAboveDeposit() public {
        vm.expectRevert(
            abi.encodeWithSelector(
                IAgentEscrow.EscrowInsufficientDeposit.selector, payer, address(usdc), DEPOSIT, DEPOSIT + 1
            )
        );
        vm.prank(payer);
        escrow.requestWithdrawal(address(usdc), DEPOSIT + 1);
    }

    function test_requestWithdrawal_zeroCancels() public {
        vm.startPrank(payer);
        escrow.requestWithdrawal(address(usdc), 300e6);
        vm.expectEmit(address(escrow));
        emit IAgentEscrow.WithdrawalRequested(payer, address(usdc), 0, 0);
        escrow.requestWithdrawal(address(usdc), 0);
        vm.warp(block.timestamp + DELAY);
        vm.expectRevert(
            abi.encodeWithSelector(IAgentEscrow.EscrowNoWithdrawalRequested.selector, payer, address(usdc))
        );
        escrow.withdraw(address(usdc));
        vm.stopPrank();
    }

    function test_requestWithdrawal_replacingRestartsDelay() public {
        // Times are constants, not `block.timestamp`: this file compiles through the IR pipeline (it imports
        // AgentEscrow), which treats the timestamp as fixed within a call and may read it before or after a `vm.warp`.
        uint256 start = 1_800_000_000;
        vm.warp(start);
        vm.startPrank(payer);
        escrow.requestWithdrawal(address(usdc), 300e6);
        vm.warp(start + DELAY - 1);
        escrow.requestWithdrawal(address(usdc), 200e6); // ready at start + DELAY - 1 + DELAY
        vm.warp(start + DELAY);
        vm.expectRevert(
            abi.encodeWithSelector(
                IAgentEscrow.EscrowWithdrawalNotReady.selector, payer, address(usdc), start + 2 * DELAY - 1
            )
        );
        escrow.withdraw(address(usdc));
        vm.stopPrank();
    }

    function test_withdraw_revertsWithoutRequest() public {
        vm.expectRevert(
            abi.encodeWithSelector(IAgentEscrow.EscrowNoWithdrawalRequested.selector, payer, address(usdc))
        );
        vm.prank(payer);
        escrow.withdraw(address(usdc));
    }

    function test_withdraw_revertsBeforeDelay() public {
        vm.startPrank(payer);
        escrow.requestWithdrawal(address(usdc), 300e6);
        vm.warp(block.timestamp + DELAY - 1);
        vm.expectRevert(
            abi.encodeWithSelector(IAgentEscrow.EscrowWithdrawalNotReady.selector, payer, address(usdc), T0 + DELAY)
        );
        escrow.withdraw(address(usdc));
        vm.stopPrank();
    }

    function test_withdraw_afterDelay() public {
        vm.startPrank(payer);
        escrow.requestWithdrawal(address(usdc), 300e6);
        vm.warp(block.timestamp + DELAY);
        vm.expectEmit(address(escrow));
        emit IAgentEscrow.Withdrawn(payer, address(usdc), 300e6);
        assertEq(escrow.withdraw(address(usdc)), 300e6);
        vm.stopPrank();
        assertEq(usdc.balanceOf(payer), 300e6);
        assertEq(escrow.depositOf(payer, address(usdc)), DEPOSIT - 300e6);
        (uint256 amount, uint256 readyAt) = escrow.withdrawalOf(payer, address(usdc));
        assertEq(amount + readyAt, 0);
    }

    function test_withdraw_paymentsDuringDelayWin() public {
        _grantDefault();
        vm.prank(payer);
        escrow.requestWithdrawal(address(usdc), DEPOSIT);

        // The payee settles what it holds while the request is pending: the requested amount is still there.
        IAgentEscrow.Payment memory p = _payment(10e6, 0);
        assertEq(_reason(_settle(p, _sign(sessionKeyPk, p))), 0);

        vm.warp(block.timestamp + DELAY);
        vm.prank(payer);
        assertEq(escrow.withdraw(address(usdc)), DEPOSIT - 10e6);
        assertEq(usdc.balanceOf(payee), 10e6);
        assertEq(usdc.balanceOf(address(escrow)), 0);
    }

    // ================================================================== grants

    function test_grant_storesAndEmits() public {
        address[] memory payees = new address[](2);
        payees[0] = payee;
        payees[1] = payee2;
        IAgentEscrow.GrantParams memory g = _params(10e6, 100e6);
        vm.expectEmit(address(escrow));
        emit IAgentEscrow.GrantIssued(
            payer, sessionKey, 1, address(usdc), 10e6, 100e6, g.validAfter, g.validUntil, payees
        );
        vm.prank(payer);
        assertEq(escrow.grant(sessionKey, g, payees), 1);

        IAgentEscrow.GrantInfo memory info = escrow.grantOf(payer, sessionKey);
        assertEq(info.token, address(usdc));
        assertEq(info.epoch, 1);
        assertEq(info.validAfter, g.validAfter);
        assertEq(info.validUntil, g.validUntil);
        assertEq(info.maxPerCall, 10e6);
        assertEq(info.budget, 100e6);
        assertEq(info.spent, 0);
        assertEq(info.payeeCount, 2);
        assertTrue(escrow.isPayeeAllowed(payer, sessionKey, payee));
        assertTrue(escrow.isPayeeAllowed(payer, sessionKey, payee2));
        assertFalse(escrow.isPayeeAllowed(payer, sessionKey, relayer));
    }

    function test_grant_openListAllowsAnyPayee() public {
        _grantDefault();
        assertTrue(escrow.isPayeeAllowed(payer, sessionKey, relayer));
        assertFalse(escrow.isPayeeAllowed(payer, relayer, payee)); // no grant
    }

    function test_grant_revertsOnInvalidSigner() public {
        vm.startPrank(payer);
        vm.expectRevert(abi.encodeWithSelector(IAgentEscrow.EscrowInvalidSigner.selector, address(0)));
        escrow.grant(address(0), _params(1, 1), new address[](0));
        vm.expectRevert(abi.encodeWithSelector(IAgentEscrow.EscrowInvalidSigner.selector, payer));
        escrow.grant(payer, _params(1, 1), new address[](0));
        vm.stopPrank();
    }

    function test_grant_revertsOnZeroToken() public {
        IAgentEscrow.GrantParams memory g = _params(1, 1);
        g.token = address(0);
        vm.expectRevert(abi.encodeWithSelector(IAgentEscrow.EscrowInvalidToken.selector, address(0)));
        vm.prank(payer);
        escrow.grant(sessionKey, g, new address[](0));
    }

    function test_grant_revertsOnEmptyWindow() public {
        IAgentEscrow.GrantParams memory g = _params(1, 1);
        g.validUntil = g.validAfter;
        vm.expectRevert(
            abi.encodeWithSelector(IAgentEscrow.EscrowInvalidWindow.selector, g.validAfter, g.validUntil)
        );
        vm.prank(payer);
        escrow.grant(sessionKey, g, new address[](0));
    }

    function test_grant_revertsOnInvalidPayees() public {
        address[] memory payees = new address[](1);
        vm.startPrank(payer);
        vm.expectRevert(abi.encodeWithSelector(IAgentEscrow.EscrowInvalidPayee.selector, address(0)));
        escrow.grant(sessionKey, _params(1, 1), payees);

        payees[0] = address(escrow);
        vm.expectRevert(abi.encodeWithSelector(IAgentEscrow.EscrowInvalidPayee.selector, address(escrow)));
        escrow.grant(sessionKey, _params(1, 1), payees);

        payees = new address[](2);
        payees[0] = payee;
        payees[1] = payee;
        vm.expectRevert(abi.encodeWithSelector(IAgentEscrow.EscrowInvalidPayee.selector, payee));
        escrow.grant(sessionKey, _params(1, 1), payees);
        vm.stopPrank();
    }

    function test_regrant_newEpochFreshBudgetOldPaymentsDead() public {
        _grantDefault();
        IAgentEscrow.Payment memory p0 = _payment(10e6, 0);
        assertEq(_reason(_settle(p0, _sign(sessionKeyPk, p0))), 0);
        IAgentEscrow.Payment memory pending = _payment(10e6, 1); // signed under epoch 1, not yet settled
        bytes memory pendingSig = _sign(sessionKeyPk, pending);

        vm.prank(payer);
        assertEq(escrow.grant(sessionKey, _params(5e6, 20e6), new address[](0)), 2);
        IAgentEscrow.GrantInfo memory info = escrow.grantOf(payer, sessionKey);
        assertEq(info.epoch, 2);
        assertEq(info.spent, 0);
        assertEq(info.budget, 20e6);

        assertEq(_reason(_settle(pending, pendingSig)), _reason(IAgentEscrow.Reason.GrantRevoked));
        IAgentEscrow.Payment memory p2 = _payment(payer, payee, 5e6, 2, 2);
        assertEq(_reason(_settle(p2, _sign(sessionKeyPk, p2))), 0);
        assertEq(escrow.grantOf(payer, sessionKey).spent, 5e6);
    }

    function test_regrant_doesNotInheritPayeeList() public {
        address[] memory payees = new address[](1);
        payees[0] = payee;
        vm.startPrank(payer);
        escrow.grant(sessionKey, _params(10e6, 100e6), payees);
        payees[0] = payee2;
        escrow.grant(sessionKey, _params(10e6, 100e6), payees);
        vm.stopPrank();
        assertFalse(escrow.isPayeeAllowed(payer, sessionKey, payee));
        assertTrue(escrow.isPayeeAllowed(payer, sessionKey, payee2));
    }

    function test_grantWithSig_eoaPayer() public {
        IAgentEscrow.GrantParams memory g = _params(10e6, 100e6);
        address[] memory payees = new address[](1);
        payees[0] = payee;
        bytes memory sig = signPacked(payerKey, _grantDigest(payer, sessionKey, g, payees, 1));
        vm.expectEmit(address(escrow));
        emit IAgentEscrow.GrantIssued(
            payer, sessionKey, 1, address(usdc), 10e6, 100e6, g.validAfter, g.validUntil, payees
        );
        vm.prank(relayer);
        escrow.grantWithSig(payer, sessionKey, g, payees, 1, sig);
        assertEq(escrow.grantOf(payer, sessionKey).epoch, 1);
        assertTrue(escrow.isPayeeAllowed(payer, sessionKey, payee));

        // Single use: the epoch has moved on.
        vm.expectRevert(abi.encodeWithSelector(IAgentEscrow.EscrowStaleEpoch.selector, payer, sessionKey, 1, 1));
        escrow.grantWithSig(payer, sessionKey, g, payees, 1, sig);
    }

    function test_grantWithSig_smartAccountPayer() public {
        (address owner, uint256 ownerKey) = makeAddrAndKey("wallet owner");
        ERC1271Wallet wallet = new ERC1271Wallet(owner);
        IAgentEscrow.GrantParams memory g = _params(10e6, 100e6);
        bytes memory sig = signPacked(ownerKey, _grantDigest(address(wallet), sessionKey, g, new address[](0), 1));
        escrow.grantWithSig(address(wallet), sessionKey, g, new address[](0), 1, sig);
        assertEq(escrow.grantOf(address(wallet), sessionKey).epoch, 1);
    }

    function test_grantWithSig_takesAnyHigherEpoch_neverALowerOne() public {
        IAgentEscrow.GrantParams memory g = _params(10e6, 100e6);
        bytes memory sig5 = signPacked(payerKey, _grantDigest(payer, sessionKey, g, new address[](0), 5));
        bytes memory sig3 = signPacked(payerKey, _grantDigest(payer, sessionKey, g, new address[](0), 3));
        escrow.grantWithSig(payer, sessionKey, g, new address[](0), 5, sig5);
        assertEq(escrow.grantOf(payer, sessionKey).epoch, 5);
        // An older grant relayed late cannot replace the newer one.
        vm.expectRevert(abi.encodeWithSelector(IAgentEscrow.EscrowStaleEpoch.selector, payer, sessionKey, 5, 3));
        escrow.grantWithSig(payer, sessionKey, g, new address[](0), 3, sig3);
    }

    function test_grantWithSig_revertsOnTamperedParams() public {
        IAgentEscrow.GrantParams memory g = _params(10e6, 100e6);
        bytes memory sig = signPacked(payerKey, _grantDigest(payer, sessionKey, g, new address[](0), 1));
        g.budget = 1_000e6;
        vm.expectRevert(abi.encodeWithSelector(IAgentEscrow.EscrowInvalidSignature.selector, payer));
        escrow.grantWithSig(payer, sessionKey, g, new address[](0), 1, sig);
    }

    function test_sessionKeyCannotWidenItsOwnGrant() public {
        _grantDefault();
        // Signed by the session key rather than the payer: rejected.
        IAgentEscrow.GrantParams memory g = _params(1_000e6, 1_000e6);
        bytes memory sig = signPacked(sessionKeyPk, _grantDigest(payer, sessionKey, g, new address[](0), 2));
        vm.expectRevert(abi.encodeWithSelector(IAgentEscrow.EscrowInvalidSignature.selector, payer));
        escrow.grantWithSig(payer, sessionKey, g, new address[](0), 2, sig);
        // Calling grant/revoke itself only touches grants *of* the session key's own (empty) account.
        address other = makeAddr("other key");
        vm.prank(sessionKey);
        escrow.grant(other, g, new address[](0));
        vm.prank(sessionKey);
        escrow.revoke(sessionKey, 7);
        IAgentEscrow.GrantInfo memory info = escrow.grantOf(payer, sessionKey);
        assertEq(info.epoch, 1);
        assertEq(info.budget, 100e6);
        assertEq(info.maxPerCall, 10e6);
    }

    function test_revoke_endsGrantAndEmits() public {
        _grantDefault();
        vm.expectEmit(address(escrow));
        emit IAgentEscrow.GrantRevoked(payer, sessionKey, 1);
        vm.prank(payer);
        escrow.revoke(sessionKey, 1);
        IAgentEscrow.GrantInfo memory info = escrow.grantOf(payer, sessionKey);
        assertEq(info.token, address(0));
        assertEq(info.epoch, 1);
        assertEq(info.budget, 0);
        assertFalse(escrow.isPayeeAllowed(payer, sessionKey, payee));

        IAgentEscrow.Payment memory p = _payment(1e6, 0);
        assertEq(_reason(_settle(p, _sign(sessionKeyPk, p))), _reason(IAgentEscrow.Reason.GrantRevoked));
        // Signing with a later epoch does not help: no grant was ever issued under it.
        p = _payment(payer, payee, 1e6, 0, 2);
        assertEq(_reason(_settle(p, _sign(sessionKeyPk, p))), _reason(IAgentEscrow.Reason.GrantNotFound));
    }

    function test_revoke_touchesNoOtherSigner() public {
        (address key2, uint256 key2Pk) = makeAddrAndKey("session key 2");
        _grantDefault();
        vm.startPrank(payer);
        escrow.grant(key2, _params(10e6, 100e6), new address[](0));
        escrow.revoke(sessionKey, 1);
        vm.stopPrank();
        IAgentEscrow.Payment memory p = _payment(1e6, 0);
        assertEq(_reason(_settle(p, _sign(key2Pk, p))), 0);
        assertEq(escrow.grantOf(payer, key2).epoch, 1);
    }

    function test_revoke_burnsUnrelayedSignedGrant() public {
        IAgentEscrow.GrantParams memory g = _params(10e6, 100e6);
        bytes memory sig = signPacked(payerKey, _grantDigest(payer, sessionKey, g, new address[](0), 1));
        vm.prank(payer);
        escrow.revoke(sessionKey, 1); // nothing granted yet: epoch 0 -> 1
        vm.expectRevert(abi.encodeWithSelector(IAgentEscrow.EscrowStaleEpoch.selector, payer, sessionKey, 1, 1));
        escrow.grantWithSig(payer, sessionKey, g, new address[](0), 1, sig);
    }

    function test_revokeWithSig() public {
        _grantDefault();
        bytes memory sig = signPacked(payerKey, _revokeDigest(payer, sessionKey, 1));
        vm.expectEmit(address(escrow));
        emit IAgentEscrow.GrantRevoked(payer, sessionKey, 1);
        vm.prank(relayer);
        escrow.revokeWithSig(payer, sessionKey, 1, sig);
        assertEq(escrow.grantOf(payer, sessionKey).token, address(0));

        // A replay cannot revoke a later grant.
        vm.prank(payer);
        escrow.grant(sessionKey, _params(10e6, 100e6), new address[](0));
        vm.expectRevert(abi.encodeWithSelector(IAgentEscrow.EscrowStaleEpoch.selector, payer, sessionKey, 2, 1));
        escrow.revokeWithSig(payer, sessionKey, 1, sig);
    }

    function test_revokeWithSig_revertsOnWrongSigner() public {
        _grantDefault();
        bytes memory sig = signPacked(sessionKeyPk, _revokeDigest(payer, sessionKey, 1));
        vm.expectRevert(abi.encodeWithSelector(IAgentEscrow.EscrowInvalidSignature.selector, payer));
        escrow.revokeWithSig(payer, sessionKey, 1, sig);
    }

    // ================================================================== payments: happy paths

    function test_settle_sessionKeyPayment() public {
        _grantDefault();
        IAgentEscrow.Payment memory p = _payment(3e6, 42);
        bytes memory sig = _sign(sessionKeyPk, p);
        (IAgentEscrow.Reason r, address signer) = escrow.check(p, sig);
        assertEq(_reason(r), 0);
        assertEq(signer, sessionKey);

        bytes32 digest = escrow.hashPayment(p);
        vm.expectEmit(address(escrow));
        emit IAgentEscrow.PaymentSettled(digest, sessionKey, 3e6);
        assertEq(_reason(_settle(p, sig)), 0);

        assertEq(usdc.balanceOf(payee), 3e6);
        assertEq(escrow.depositOf(payer, address(usdc)), DEPOSIT - 3e6);
        assertEq(escrow.grantOf(payer, sessionKey).spent, 3e6);
        assertTrue(escrow.nonceUsed(sessionKey, 42));
        assertFalse(escrow.nonceUsed(sessionKey, 43));
        assertFalse(escrow.nonceUsed(payer, 42)); // nonces are per signer
        assertEq(escrow.nonceBitmap(sessionKey, 0), 1 << 42);
    }

    function test_settle_payerSignedEoa() public {
        IAgentEscrow.Payment memory p = _payment(payer, payee, 500e6, 7, 0);
        bytes32 digest = escrow.hashPayment(p);
        vm.expectEmit(address(escrow));
        emit IAgentEscrow.PaymentSettled(digest, payer, 500e6);
        assertEq(_reason(_settle(p, _sign(payerKey, p))), 0);
        assertEq(usdc.balanceOf(payee), 500e6);
        assertTrue(escrow.nonceUsed(payer, 7));
    }

    function test_settle_payerSignedSmartAccount() public {
        (address owner, uint256 ownerKey) = makeAddrAndKey("wallet owner");
        ERC1271Wallet wallet = new ERC1271Wallet(owner);
        _fund(address(wallet), 50e6);
        IAgentEscrow.Payment memory p = _payment(address(wallet), payee, 20e6, 1, 0);
        bytes memory sig = _sign(ownerKey, p);
        (IAgentEscrow.Reason r, address signer) = escrow.check(p, sig);
        assertEq(_reason(r), 0);
        assertEq(signer, address(wallet));
        assertEq(_reason(_settle(p, sig)), 0);
        assertEq(usdc.balanceOf(payee), 20e6);
        assertTrue(escrow.nonceUsed(address(wallet), 1));
    }

    function test_settle_smartAccountPayerWithSessionKey() public {
        (address owner, uint256 ownerKey) = makeAddrAndKey("wallet owner");
        ERC1271Wallet wallet = new ERC1271Wallet(owner);
        _fund(address(wallet), 50e6);
        IAgentEscrow.GrantParams memory g = _params(10e6, 100e6);
        bytes memory gsig = signPacked(ownerKey, _grantDigest(address(wallet), sessionKey, g, new address[](0), 1));
        escrow.grantWithSig(address(wallet), sessionKey, g, new address[](0), 1, gsig);

        IAgentEscrow.Payment memory p = _payment(address(wallet), payee, 10e6, 0, 1);
        assertEq(_reason(_settle(p, _sign(sessionKeyPk, p))), 0);
        assertEq(usdc.balanceOf(payee), 10e6);
        // A non-signature of the wallet (garbage) is rejected after the ERC-1271 fallback.
        p.nonce = 1;
        assertEq(_reason(_settle(p, new bytes(65))), _reason(IAgentEscrow.Reason.InvalidSignature));
        assertEq(_reason(_settle(p, hex"1234")), _reason(IAgentEscrow.Reason.InvalidSignature));
    }

    function test_settle_anyoneMaySettleFundsGoToSignedPayee() public {
        _grantDefault();
        IAgentEscrow.Payment memory p = _payment(1e6, 0);
        bytes memory sig = _sign(sessionKeyPk, p);
        address stranger = makeAddr("stranger");
        vm.prank(stranger);
        escrow.settle(_one(p), _one(sig));
        assertEq(usdc.balanceOf(payee), 1e6);
        assertEq(usdc.balanceOf(stranger), 0);
    }

    function test_settle_batchOneTransferPerPayeeAndToken() public {
        _grantDefault();
        MockERC20 dai = new MockERC20("Dai", "DAI");
        dai.mint(payer, 100e18);
        vm.startPrank(payer);
        dai.approve(address(escrow), 100e18);
        escrow.deposit(address(dai), 100e18);
        vm.stopPrank();

        IAgentEscrow.Payment[] memory ps = new IAgentEscrow.Payment[](6);
        bytes[] memory sigs = new bytes[](6);
        ps[0] = _payment(payer, payee, 1e6, 0, 1);
        ps[1] = _payment(payer, payee2, 2e6, 1, 1);
        ps[2] = _payment(payer, payee, 3e6, 2, 1);
        ps[3] = _payment(payer, payee, 1e18, 3, 0); // payer-signed, other token
        ps[3].token = address(dai);
        ps[4] = _payment(payer, payee2, 4e6, 4, 1);
        ps[5] = _payment(payer, payee, 99e6, 5, 1); // over the cap: fails, moves nothing
        for (uint256 i; i < 6; ++i) {
            sigs[i] = _sign(i == 3 ? payerKey : sessionKeyPk, ps[i]);
        }

        vm.recordLogs();
        IAgentEscrow.Reason[] memory reasons = escrow.settle(ps, sigs);
        Vm.Log[] memory logs = vm.getRecordedLogs();

        for (uint256 i; i < 5; ++i) assertEq(_reason(reasons[i]), 0);
        assertEq(_reason(reasons[5]), _reason(IAgentEscrow.Reason.AmountExceedsCap));
        assertEq(usdc.balanceOf(payee), 4e6);
        assertEq(usdc.balanceOf(payee2), 6e6);
        assertEq(dai.balanceOf(payee), 1e18);
        assertEq(escrow.grantOf(payer, sessionKey).spent, 10e6);

        uint256 transfers;
        uint256 settled;
        uint256 failed;
        for (uint256 i; i < logs.length; ++i) {
            bytes32 topic = logs[i].topics[0];
            if (topic == TRANSFER_TOPIC) ++transfers;
            if (topic == IAgentEscrow.PaymentSettled.selector) ++settled;
            if (topic == IAgentEscrow.PaymentFailed.selector) {
                ++failed;
                (uint256 nonce, uint256 index, IAgentEscrow.Reason reason) =
                    abi.decode(logs[i].data, (uint256, uint256, IAgentEscrow.Reason));
                assertEq(nonce, 5);
                assertEq(index, 5);
                assertEq(_reason(reason), _reason(IAgentEscrow.Reason.AmountExceedsCap));
            }
        }
        assertEq(transfers, 3); // (payee, usdc), (payee2, usdc), (payee, dai)
        assertEq(settled, 5);
        assertEq(failed, 1);
    }

    function test_settle_emptyBatch() public {
        assertEq(escrow.settle(new IAgentEscrow.Payment[](0), new bytes[](0)).length, 0);
    }

    function test_settle_revertsOnLengthMismatch() public {
        vm.expectRevert(abi.encodeWithSelector(IAgentEscrow.EscrowLengthMismatch.selector, 1, 0));
        escrow.settle(_one(_payment(1, 0)), new bytes[](0));
    }

    function test_settle_twiceInOneTransaction() public {
        _grantDefault();
        IAgentEscrow.Payment memory p0 = _payment(1e6, 0);
        IAgentEscrow.Payment memory p1 = _payment(2e6, 1);
        bytes[] memory calls = new bytes[](2);
        calls[0] = abi.encodeCall(IAgentEscrow.settle, (_one(p0), _one(_sign(sessionKeyPk, p0))));
        calls[1] = abi.encodeCall(IAgentEscrow.settle, (_one(p1), _one(_sign(sessionKeyPk, p1))));
        escrow.multicall(calls);
        assertEq(usdc.balanceOf(payee), 3e6);
        assertEq(usdc.balanceOf(address(escrow)), DEPOSIT - 3e6);
    }

    function test_settleOne() public {
        _grantDefault();
        IAgentEscrow.Payment memory p = _payment(2e6, 0);
        bytes memory sig = _sign(sessionKeyPk, p);
        bytes32 digest = escrow.hashPayment(p);
        vm.expectEmit(address(escrow));
        emit IAgentEscrow.PaymentSettled(digest, sessionKey, 2e6);
        escrow.settleOne(p, sig);
        assertEq(usdc.balanceOf(payee), 2e6);

        vm.expectRevert(
            abi.encodeWithSelector(IAgentEscrow.EscrowPaymentRejected.selector, IAgentEscrow.Reason.NonceUsed)
        );
        escrow.settleOne(p, sig);
    }

    function test_settle_zeroAmountUsesNonceMovesNothing() public {
        _grantDefault();
        IAgentEscrow.Payment memory p = _payment(0, 0);
        vm.recordLogs();
        assertEq(_reason(_settle(p, _sign(sessionKeyPk, p))), 0);
        Vm.Log[] memory logs = vm.getRecordedLogs();
        for (uint256 i; i < logs.length; ++i) assertNotEq(logs[i].topics[0], TRANSFER_TOPIC);
        assertTrue(escrow.nonceUsed(sessionKey, 0));
    }

    // ================================================================== payments: every failure reason

    function _expectFailure(IAgentEscrow.Payment memory p, bytes memory sig, IAgentEscrow.Reason want) internal {
        (IAgentEscrow.Reason r,) = escrow.check(p, sig);
        assertEq(_reason(r), _reason(want), "check");
        uint256 depositBefore = escrow.depositOf(p.payer, p.token);
        uint256 payeeBefore = usdc.balanceOf(p.payee);
        vm.expectEmit(address(escrow));
        emit IAgentEscrow.PaymentFailed(p.payer, p.nonce, 0, want);
        assertEq(_reason(_settle(p, sig)), _reason(want), "settle");
        assertEq(escrow.depositOf(p.payer, p.token), depositBefore);
        assertEq(usdc.balanceOf(p.payee), payeeBefore);
        vm.expectRevert(abi.encodeWithSelector(IAgentEscrow.EscrowPaymentRejected.selector, want));
        escrow.settleOne(p, sig);
    }

    function test_fail_deadlineExpired() public {
        _grantDefault();
        IAgentEscrow.Payment memory p = _payment(1e6, 0);
        bytes memory sig = _sign(sessionKeyPk, p);
        vm.warp(p.deadline + 1);
        _expectFailure(p, sig, IAgentEscrow.Reason.DeadlineExpired);
    }

    function test_deadline_isInclusive() public {
        _grantDefault();
        IAgentEscrow.Payment memory p = _payment(1e6, 0);
        bytes memory sig = _sign(sessionKeyPk, p);
        vm.warp(p.deadline);
        assertEq(_reason(_settle(p, sig)), 0);
    }

    function test_fail_invalidPayee() public {
        _grantDefault();
        IAgentEscrow.Payment memory p = _payment(payer, address(0), 1e6, 0, 1);
        _expectFailure(p, _sign(sessionKeyPk, p), IAgentEscrow.Reason.InvalidPayee);
        p = _payment(payer, address(escrow), 1e6, 0, 1);
        _expectFailure(p, _sign(sessionKeyPk, p), IAgentEscrow.Reason.InvalidPayee);
    }

    function test_fail_invalidSignature() public {
        _grantDefault();
        IAgentEscrow.Payment memory p = _payment(1e6, 0);
        _expectFailure(p, new bytes(65), IAgentEscrow.Reason.InvalidSignature);
        _expectFailure(p, hex"deadbeef", IAgentEscrow.Reason.InvalidSignature);
        // A high-s (malleable) copy of a valid signature is rejected too.
        (uint8 v, bytes32 r, bytes32 s) = vm.sign(sessionKeyPk, _paymentDigest(p));
        bytes32 highS = bytes32(0xFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFEBAAEDCE6AF48A03BBFD25E8CD0364141 - uint256(s));
        _expectFailure(p, abi.encodePacked(r, highS, v == 27 ? uint8(28) : uint8(27)), IAgentEscrow.Reason.InvalidSignature);
    }

    function test_fail_tamperedPaymentIsNotTheSigners() public {
        _grantDefault();
        IAgentEscrow.Payment memory p = _payment(1e6, 0);
        bytes memory sig = _sign(sessionKeyPk, p);
        p.payee = relayer; // redirect: the signature now recovers to an unrelated key
        _expectFailure(p, sig, IAgentEscrow.Reason.GrantNotFound);
    }

    function test_fail_nonceUsed() public {
        _grantDefault();
        IAgentEscrow.Payment memory p = _payment(1e6, 5);
        bytes memory sig = _sign(sessionKeyPk, p);
        assertEq(_reason(_settle(p, sig)), 0);
        _expectFailure(p, sig, IAgentEscrow.Reason.NonceUsed);
        // Same nonce, different payment: still used (nonces are per signer, not per payment).
        IAgentEscrow.Payment memory q = _payment(payer, payee2, 2e6, 5, 1);
        _expectFailure(q, _sign(sessionKeyPk, q), IAgentEscrow.Reason.NonceUsed);
    }

    function test_fail_nonceUsedWithinBatch() public {
        _grantDefault();
        IAgentEscrow.Payment[] memory ps = new IAgentEscrow.Payment[](2);
        bytes[] memory sigs = new bytes[](2);
        ps[0] = _payment(1e6, 9);
        ps[1] = ps[0];
        sigs[0] = _sign(sessionKeyPk, ps[0]);
        sigs[1] = sigs[0];
        IAgentEscrow.Reason[] memory reasons = escrow.settle(ps, sigs);
        assertEq(_reason(reasons[0]), 0);
        assertEq(_reason(reasons[1]), _reason(IAgentEscrow.Reason.NonceUsed));
        assertEq(usdc.balanceOf(payee), 1e6);
    }

    function test_fail_grantNotFound() public {
        IAgentEscrow.Payment memory p = _payment(1e6, 0);
        _expectFailure(p, _sign(sessionKeyPk, p), IAgentEscrow.Reason.GrantNotFound);
        // A payment naming a future epoch is not found either.
        _grantDefault();
        p = _payment(payer, payee, 1e6, 0, 2);
        _expectFailure(p, _sign(sessionKeyPk, p), IAgentEscrow.Reason.GrantNotFound);
    }

    function test_fail_grantRevoked() public {
        _grantDefault();
        IAgentEscrow.Payment memory p = _payment(1e6, 0);
        bytes memory sig = _sign(sessionKeyPk, p);
        vm.prank(payer);
        escrow.revoke(sessionKey, 1);
        _expectFailure(p, sig, IAgentEscrow.Reason.GrantRevoked);
    }

    function test_fail_tokenMismatch() public {
        _grantDefault();
        MockERC20 dai = new MockERC20("Dai", "DAI");
        IAgentEscrow.Payment memory p = _payment(1e6, 0);
        p.token = address(dai);
        bytes memory sig = _sign(sessionKeyPk, p);
        (IAgentEscrow.Reason r,) = escrow.check(p, sig);
        assertEq(_reason(r), _reason(IAgentEscrow.Reason.TokenMismatch));
        assertEq(_reason(_settle(p, sig)), _reason(IAgentEscrow.Reason.TokenMismatch));
    }

    function test_fail_grantNotYetValid() public {
        IAgentEscrow.GrantParams memory g = _params(10e6, 100e6);
        g.validAfter = uint32(block.timestamp + 60);
        vm.prank(payer);
        escrow.grant(sessionKey, g, new address[](0));
        IAgentEscrow.Payment memory p = _payment(1e6, 0);
        bytes memory sig = _sign(sessionKeyPk, p);
        _expectFailure(p, sig, IAgentEscrow.Reason.GrantNotYetValid);
        vm.warp(g.validAfter); // inclusive
        assertEq(_reason(_settle(p, sig)), 0);
    }

    function test_fail_grantExpired() public {
        IAgentEscrow.GrantParams memory g = _params(10e6, 100e6);
        g.validUntil = uint32(block.timestamp + 60);
        vm.prank(payer);
        escrow.grant(sessionKey, g, new address[](0));
        IAgentEscrow.Payment memory p = _payment(1e6, 0);
        bytes memory sig = _sign(sessionKeyPk, p);
        vm.warp(g.validUntil + 1);
        _expectFailure(p, sig, IAgentEscrow.Reason.GrantExpired);
        vm.warp(g.validUntil); // inclusive
        assertEq(_reason(_settle(p, sig)), 0);
    }

    function test_fail_payeeNotAllowed() public {
        address[] memory payees = new address[](1);
        payees[0] = payee2;
        vm.prank(payer);
        escrow.grant(sessionKey, _params(10e6, 100e6), payees);
        IAgentEscrow.Payment memory p = _payment(1e6, 0);
        _expectFailure(p, _sign(sessionKeyPk, p), IAgentEscrow.Reason.PayeeNotAllowed);
        p.payee = payee2;
        assertEq(_reason(_settle(p, _sign(sessionKeyPk, p))), 0);
    }

    function test_fail_amountExceedsCap() public {
        _grantDefault();
        IAgentEscrow.Payment memory p = _payment(10e6 + 1, 0);
        _expectFailure(p, _sign(sessionKeyPk, p), IAgentEscrow.Reason.AmountExceedsCap);
        p.amount = 10e6;
        assertEq(_reason(_settle(p, _sign(sessionKeyPk, p))), 0);
    }

    function test_fail_budgetExceeded() public {
        vm.prank(payer);
        escrow.grant(sessionKey, _params(10e6, 25e6), new address[](0));
        IAgentEscrow.Payment[] memory ps = new IAgentEscrow.Payment[](3);
        bytes[] memory sigs = new bytes[](3);
        for (uint256 i; i < 3; ++i) {
            ps[i] = _payment(10e6, i);
            sigs[i] = _sign(sessionKeyPk, ps[i]);
        }
        IAgentEscrow.Reason[] memory reasons = escrow.settle(ps, sigs);
        assertEq(_reason(reasons[0]), 0);
        assertEq(_reason(reasons[1]), 0);
        assertEq(_reason(reasons[2]), _reason(IAgentEscrow.Reason.BudgetExceeded));
        IAgentEscrow.Payment memory p = _payment(5e6 + 1, 3);
        _expectFailure(p, _sign(sessionKeyPk, p), IAgentEscrow.Reason.BudgetExceeded);
        p.amount = 5e6;
        assertEq(_reason(_settle(p, _sign(sessionKeyPk, p))), 0);
        assertEq(escrow.grantOf(payer, sessionKey).spent, 25e6);
    }

    function test_fail_insufficientDeposit() public {
        address poor = makeAddr("poor");
        uint256 poorKey = uint256(keccak256(abi.encodePacked("poor")));
        _fund(poor, 15e6);
        IAgentEscrow.Payment[] memory ps = new IAgentEscrow.Payment[](2);
        bytes[] memory sigs = new bytes[](2);
        ps[0] = _payment(poor, payee, 10e6, 0, 0);
        ps[1] = _payment(poor, payee, 10e6, 1, 0);
        sigs[0] = _sign(poorKey, ps[0]);
        sigs[1] = _sign(poorKey, ps[1]);
        IAgentEscrow.Reason[] memory reasons = escrow.settle(ps, sigs);
        assertEq(_reason(reasons[0]), 0);
        assertEq(_reason(reasons[1]), _reason(IAgentEscrow.Reason.InsufficientDeposit));
        _expectFailure(ps[1], sigs[1], IAgentEscrow.Reason.InsufficientDeposit);
    }

    function test_check_reportsSignerOnLaterFailures() public {
        _grantDefault();
        IAgentEscrow.Payment memory p = _payment(11e6, 0);
        (IAgentEscrow.Reason r, address signer) = escrow.check(p, _sign(sessionKeyPk, p));
        assertEq(_reason(r), _reason(IAgentEscrow.Reason.AmountExceedsCap));
        assertEq(signer, sessionKey);
        (r, signer) = escrow.check(p, new bytes(65));
        assertEq(_reason(r), _reason(IAgentEscrow.Reason.InvalidSignature));
        assertEq(signer, address(0));
    }

    // ================================================================== payouts a token refuses

    function test_payout_deferredWhenTransferFails() public {
        MockERC20 token = new MockERC20("Blocky", "BLK");
        token.mint(payer, 10e6);
        vm.startPrank(payer);
        token.approve(address(escrow), 10e6);
        escrow.deposit(address(token), 10e6);
        vm.stopPrank();
        token.setBlocked(payee, true);

        IAgentEscrow.Payment[] memory ps = new IAgentEscrow.Payment[](2);
        bytes[] memory sigs = new bytes[](2);
        ps[0] = _payment(payer, payee, 4e6, 0, 0);
        ps[0].token = address(token);
        ps[1] = _payment(payer, payee2, 1e6, 1, 0);
        ps[1].token = address(token);
        sigs[0] = _sign(payerKey, ps[0]);
        sigs[1] = _sign(payerKey, ps[1]);

        vm.expectEmit(address(escrow));
        emit IAgentEscrow.PayoutDeferred(payee, address(token), 4e6);
        escrow.settle(ps, sigs);
        assertEq(token.balanceOf(payee2), 1e6); // the other payee is not held up
        assertEq(escrow.owedTo(payee, address(token)), 4e6);
        assertEq(escrow.depositOf(payer, address(token)), 5e6);

        address cold = makeAddr("payee cold wallet");
        vm.expectEmit(address(escrow));
        emit IAgentEscrow.OwedWithdrawn(payee, address(token), cold, 4e6);
        vm.prank(payee);
        assertEq(escrow.withdrawOwed(address(token), cold), 4e6);
        assertEq(token.balanceOf(cold), 4e6);
        assertEq(escrow.owedTo(payee, address(token)), 0);
    }

    function test_withdrawOwed_revertsToEscrow() public {
        vm.expectRevert(abi.encodeWithSelector(IAgentEscrow.EscrowInvalidPayee.selector, address(escrow)));
        vm.prank(payee);
        escrow.withdrawOwed(address(usdc), address(escrow));
    }

    function test_withdrawOwed_revertsWhenNothingOwed() public {
        vm.expectRevert(abi.encodeWithSelector(IAgentEscrow.EscrowNothingOwed.selector, payee, address(usdc)));
        vm.prank(payee);
        escrow.withdrawOwed(address(usdc), payee);
    }

    function test_settleOne_deferredPayout() public {
        MockERC20 token = new MockERC20("Blocky", "BLK");
        token.mint(payer, 10e6);
        vm.startPrank(payer);
        token.approve(address(escrow), 10e6);
        escrow.deposit(address(token), 10e6);
        vm.stopPrank();
        token.setBlocked(payee, true);
        IAgentEscrow.Payment memory p = _payment(payer, payee, 4e6, 0, 0);
        p.token = address(token);
        escrow.settleOne(p, _sign(payerKey, p));
        assertEq(escrow.owedTo(payee, address(token)), 4e6);
    }

    function test_reentrancyDuringPayoutIsBlocked() public {
        ReentrantERC20 token = new ReentrantERC20();
        token.mint(payer, 10e6);
        vm.startPrank(payer);
        token.approve(address(escrow), 10e6);
        escrow.deposit(address(token), 10e6);
        vm.stopPrank();

        IAgentEscrow.Payment memory p = _payment(payer, payee, 4e6, 0, 0);
        p.token = address(token);
        bytes memory sig = _sign(payerKey, p);
        // On transfer, the token tries to settle the same payment again.
        token.arm(address(escrow), abi.encodeCall(IAgentEscrow.settle, (_one(p), _one(sig))));
        vm.expectEmit(address(escrow));
        emit IAgentEscrow.PayoutDeferred(payee, address(token), 4e6);
        escrow.settle(_one(p), _one(sig));
        // The reentrant call reverted, so the transfer failed and the payee is owed instead; paid once.
        assertEq(escrow.owedTo(payee, address(token)), 4e6);
        assertEq(token.balanceOf(payee), 0);
        assertEq(escrow.depositOf(payer, address(token)), 6e6);
    }

    // ================================================================== hostile ERC-1271 payers

    function _hostileBatch(bool bloat) internal returns (IAgentEscrow.Reason[] memory reasons, uint256 used) {
        HostileWallet hostile = new HostileWallet(bloat);
        usdc.mint(relayer, 5e6);
        vm.startPrank(relayer);
        usdc.approve(address(escrow), 5e6);
        escrow.depositFor(address(hostile), address(usdc), 5e6);
        vm.stopPrank();
        _grantDefault();

        IAgentEscrow.Payment[] memory ps = new IAgentEscrow.Payment[](2);
        bytes[] memory sigs = new bytes[](2);
        ps[0] = _payment(address(hostile), payee, 5e6, 0, 0);
        sigs[0] = new bytes(65);
        ps[1] = _payment(1e6, 0);
        sigs[1] = _sign(sessionKeyPk, ps[1]);
        uint256 before = gasleft();
        reasons = escrow.settle{gas: 2_000_000}(ps, sigs);
        used = before - gasleft();
    }

    function test_hostileSmartAccountCannotBurnTheBatch() public {
        assertEq(escrow.ERC1271_GAS_LIMIT(), 500_000);
        (IAgentEscrow.Reason[] memory reasons, uint256 used) = _hostileBatch(false);
        assertEq(_reason(reasons[0]), _reason(IAgentEscrow.Reason.InvalidSignature));
        assertEq(_reason(reasons[1]), 0); // the honest payment in the same batch still settles
        assertEq(usdc.balanceOf(payee), 1e6);
        assertLt(used, 700_000);
    }

    function test_hostileSmartAccountCannotBloatMemory() public {
        (IAgentEscrow.Reason[] memory reasons, uint256 used) = _hostileBatch(true);
        // It returned the magic value, but padded to 64 KiB: only 32 bytes are read, and the payment is valid
        // as the wallet said; what matters is that the batch did not pay for copying the rest.
        assertEq(_reason(reasons[0]), 0);
        assertEq(_reason(reasons[1]), 0);
        assertLt(used, 700_000);
    }

    // ================================================================== cross-implementation test vector

    /**
     * @dev Signatures made off-chain by eth-account 0.14 (`encode_typed_data` + `Account.sign_message`) with anvil's
     * well-known keys, for an escrow at 0x5FbDB2315678afecb367f032d93F642f64180aa3 on chain 31337. The same values
     * appear in docs/schemes/escrow.md; the Python side can assert the identical digests.
     */
    function test_vector_ethAccountSignaturesVerify() public {
        vm.chainId(31337);
        vm.warp(1_740_000_000);
        AgentEscrow at = AgentEscrow(0x5FbDB2315678afecb367f032d93F642f64180aa3);
        vm.etch(address(at), address(escrow).code);
        address token = 0xe7f1725E7734CE288F8367e1Bb143E90bb3F0512;
        vm.etch(token, address(usdc).code);
        address vPayer = 0x70997970C51812dc3A010C7d01b50e0d17dc79C8;
        address vSigner = 0xf39Fd6e51aad88F6F4ce6aB8827279cffFb92266;
        address vPayee = 0x3C44CdDdB6a900fa2b585dd299e03d12FA4293BC;

        TestUSDC(token).mint(vPayer, 1e6);
        vm.startPrank(vPayer);
        TestUSDC(token).approve(address(at), 1e6);
        at.deposit(token, 1e6);
        vm.stopPrank();

        address[] memory payees = new address[](1);
        payees[0] = vPayee;
        at.grantWithSig(
            vPayer,
            vSigner,
            IAgentEscrow.GrantParams(token, 100000, 5000000, 1700000000, 1800000000),
            payees,
            1,
            hex"f58a0c6604b0529370b46cca9f10ce2fb11dea41f685d11c27ca886a35f783a9563dda9de940ff576ac0c767d826dfc7d3a5aaf985a8731af395000fb6d65e801b"
        );

        IAgentEscrow.Payment memory p = IAgentEscrow.Payment(vPayer, vPayee, token, 10000, 1, 1750000000, 1);
        assertEq(at.hashPayment(p), 0x05b34585d64046d4bf18208718470efb0f2b10a91abeb93f05bd2b3b4c840cb2);
        bytes memory sig =
            hex"2c6a8d42c4fc428afca3abf7c47e4cdbe51b01abf3592d90c5a39132ad6ceb733068051006c89821f19cabb24fe692d7bc63775aa56738a0abf19fe3217d554c1b";
        (IAgentEscrow.Reason r, address signer) = at.check(p, sig);
        assertEq(_reason(r), 0);
        assertEq(signer, vSigner);
        at.settleOne(p, sig);
        assertEq(TestUSDC(token).balanceOf(vPayee), 10000);

        at.revokeWithSig(
            vPayer,
            vSigner,
            1,
            hex"a57b4cd676cd198482302f7af7932969f614a8ff106de43a2c304fff86070bba2944a28fd8b1b0884e925b914c30c5b0d4d912af342075864ca2c634262cc7ed1b"
        );
        assertEq(at.grantOf(vPayer, vSigner).epoch, 1);
        assertEq(at.grantOf(vPayer, vSigner).token, address(0));
    }
}

