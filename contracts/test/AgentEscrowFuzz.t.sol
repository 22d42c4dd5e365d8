// SPDX-License-Identifier: MIT
pragma solidity ^0.8.26;

import {EscrowTestBase} from "./escrow/EscrowTestBase.sol";
import {IAgentEscrow} from "../src/escrow/IAgentEscrow.sol";

contract AgentEscrowFuzzTest is EscrowTestBase {
    /// @dev Amount, cap, budget and deposit against each other: exactly one reason wins, in the documented order.
    function testFuzz_amountCapBudgetDeposit(uint256 amount, uint96 cap, uint128 budget, uint256 deposit) public {
        deposit = bound(deposit, 0, 1e30);
        amount = bound(amount, 0, 2e30);
        address who = makeAddr("fuzz payer");
        if (deposit > 0) _fund(who, deposit);
        vm.prank(who);
        escrow.grant(sessionKey, _params(cap, budget), new address[](0));

        IAgentEscrow.Payment memory p = _payment(who, payee, amount, 0, 1);
        IAgentEscrow.Reason want = amount > cap
            ? IAgentEscrow.Reason.AmountExceedsCap
            : amount > budget
                ? IAgentEscrow.Reason.BudgetExceeded
                : amount > deposit ? IAgentEscrow.Reason.InsufficientDeposit : IAgentEscrow.Reason.None;
        assertEq(_reason(_settle(p, _sign(sessionKeyPk, p))), _reason(want));

        bool ok = want == IAgentEscrow.Reason.None;
        assertEq(usdc.balanceOf(payee), ok ? amount : 0);
        assertEq(escrow.depositOf(who, address(usdc)), ok ? deposit - amount : deposit);
        assertEq(escrow.grantOf(who, sessionKey).spent, ok ? amount : 0);
        assertEq(escrow.nonceUsed(sessionKey, 0), ok);
    }

    /// @dev A run of payments under one grant: the spend never passes the budget and equals what settled.
    function testFuzz_budgetSequence(uint128 budget, uint96 cap, uint256[8] memory amounts) public {
        budget = uint128(bound(budget, 0, 500e6));
        cap = uint96(bound(cap, 0, 200e6));
        vm.prank(payer);
        escrow.grant(sessionKey, _params(cap, budget), new address[](0));

        uint256 spent;
        for (uint256 i; i < amounts.length; ++i) {
            uint256 amount = bound(amounts[i], 0, 250e6);
            IAgentEscrow.Payment memory p = _payment(amount, i);
            IAgentEscrow.Reason r = _settle(p, _sign(sessionKeyPk, p));
            IAgentEscrow.Reason want = amount > cap
                ? IAgentEscrow.Reason.AmountExceedsCap
                : spent + amount > budget ? IAgentEscrow.Reason.BudgetExceeded : IAgentEscrow.Reason.None;
            assertEq(_reason(r), _reason(want));
            if (r == IAgentEscrow.Reason.None) spent += amount;
            assertLe(spent, budget);
        }
        assertEq(escrow.grantOf(payer, sessionKey).spent, spent);
        assertEq(usdc.balanceOf(payee), spent);
    }

    /// @dev Any two nonces are independent, and each settles once.
    function testFuzz_unorderedNonces(uint256 n1, uint256 n2) public {
        vm.assume(n1 != n2);
        _grantDefault();
        IAgentEscrow.Payment memory p1 = _payment(1e6, n1);
        IAgentEscrow.Payment memory p2 = _payment(1e6, n2);
        bytes memory s1 = _sign(sessionKeyPk, p1);
        bytes memory s2 = _sign(sessionKeyPk, p2);

        assertEq(_reason(_settle(p2, s2)), 0); // out of order is fine
        assertTrue(escrow.nonceUsed(sessionKey, n2));
        assertFalse(escrow.nonceUsed(sessionKey, n1));
        assertEq(escrow.nonceBitmap(sessionKey, n2 >> 8) & (1 << (n2 & 0xff)), 1 << (n2 & 0xff));
        assertEq(_reason(_settle(p1, s1)), 0);
        assertEq(_reason(_settle(p1, s1)), _reason(IAgentEscrow.Reason.NonceUsed));
        assertEq(_reason(_settle(p2, s2)), _reason(IAgentEscrow.Reason.NonceUsed));
        assertEq(usdc.balanceOf(payee), 2e6);
    }

    /// @dev The grant window is inclusive at both ends; outside it the right reason is reported.
    function testFuzz_grantWindow(uint32 validAfter, uint32 validUntil, uint32 at) public {
        vm.assume(validAfter < validUntil);
        IAgentEscrow.GrantParams memory g = _params(10e6, 100e6);
        g.validAfter = validAfter;
        g.validUntil = validUntil;
        vm.prank(payer);
        escrow.grant(sessionKey, g, new address[](0));

        vm.warp(at);
        IAgentEscrow.Payment memory p = _payment(1e6, 0);
        p.deadline = type(uint256).max;
        IAgentEscrow.Reason want = at < validAfter
            ? IAgentEscrow.Reason.GrantNotYetValid
            : at > validUntil ? IAgentEscrow.Reason.GrantExpired : IAgentEscrow.Reason.None;
        (IAgentEscrow.Reason r,) = escrow.check(p, _sign(sessionKeyPk, p));
        assertEq(_reason(r), _reason(want));
    }

    function testFuzz_deadline(uint256 deadline, uint256 at) public {
        at = bound(at, 0, type(uint64).max);
        _grantDefault();
        IAgentEscrow.GrantParams memory g = _params(10e6, 100e6);
        g.validAfter = 0;
        g.validUntil = type(uint32).max;
        vm.prank(payer);
        escrow.grant(sessionKey, g, new address[](0));
        vm.warp(at);
        IAgentEscrow.Payment memory p = _payment(payer, payee, 1e6, 0, 2);
        p.deadline = deadline;
        (IAgentEscrow.Reason r,) = escrow.check(p, _sign(sessionKeyPk, p));
        bool expired = at > deadline;
        bool pastGrant = at > type(uint32).max;
        assertEq(
            _reason(r),
            expired
                ? _reason(IAgentEscrow.Reason.DeadlineExpired)
                : pastGrant ? _reason(IAgentEscrow.Reason.GrantExpired) : 0
        );
    }

    /// @dev Only the current epoch's payments settle, however many grant changes happened.
    function testFuzz_epochs(uint8 changes, uint32 signedEpoch, bool endWithRevoke) public {
        changes = uint8(bound(changes, 1, 20));
        vm.startPrank(payer);
        for (uint256 i; i < changes; ++i) {
            if (i % 3 == 2) escrow.revoke(sessionKey, escrow.grantOf(payer, sessionKey).epoch + 1);
            else escrow.grant(sessionKey, _params(10e6, 100e6), new address[](0));
        }
        if (endWithRevoke) escrow.revoke(sessionKey, escrow.grantOf(payer, sessionKey).epoch + 1);
        else escrow.grant(sessionKey, _params(10e6, 100e6), new address[](0));
        vm.stopPrank();

        uint32 current = escrow.grantOf(payer, sessionKey).epoch;
        assertEq(current, changes + 1);
        signedEpoch = uint32(bound(signedEpoch, 0, current + 3));
        IAgentEscrow.Payment memory p = _payment(payer, payee, 1e6, 0, signedEpoch);
        IAgentEscrow.Reason r = _settle(p, _sign(sessionKeyPk, p));
        if (signedEpoch > current) assertEq(_reason(r), _reason(IAgentEscrow.Reason.GrantNotFound));
        else if (signedEpoch < current || endWithRevoke) assertEq(_reason(r), _reason(IAgentEscrow.Reason.GrantRevoked));
        else assertEq(_reason(r), 0);
    }

    /// @dev A key the payer never granted cannot pay, whatever it signs.
    function testFuzz_ungrantedKeyNeverPays(uint256 key, uint256 amount, uint256 nonce) public {
        key = bound(key, 1, 0xFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFEBAAEDCE6AF48A03BBFD25E8CD0364140);
        vm.assume(key != payerKey && key != sessionKeyPk);
        _grantDefault();
        IAgentEscrow.Payment memory p = _payment(bound(amount, 0, 10e6), nonce);
        assertEq(_reason(_settle(p, signPacked(key, _paymentDigest(p)))), _reason(IAgentEscrow.Reason.GrantNotFound));
        assertEq(usdc.balanceOf(payee), 0);
    }

    /// @dev Random bytes are never a valid signature.
    function testFuzz_garbageSignature(bytes memory sig) public {
        _grantDefault();
        IAgentEscrow.Payment memory p = _payment(1e6, 0);
        IAgentEscrow.Reason r = _settle(p, sig);
        assertTrue(r == IAgentEscrow.Reason.InvalidSignature || r == IAgentEscrow.Reason.GrantNotFound);
        assertEq(usdc.balanceOf(payee), 0);
    }

    /// @dev Withdrawal pays min(requested, deposit after settlements), never before the delay.
    function testFuzz_withdrawal(uint256 requested, uint256 settled, uint256 waited) public {
        requested = bound(requested, 1, DEPOSIT);
        settled = bound(settled, 0, DEPOSIT);
        waited = bound(waited, 0, 2 * DELAY);
        vm.prank(payer);
        escrow.requestWithdrawal(address(usdc), requested);

        IAgentEscrow.Payment memory p = _payment(payer, payee, settled, 0, 0);
        assertEq(_reason(_settle(p, _sign(payerKey, p))), 0);

        vm.warp(block.timestamp + waited);
        vm.prank(payer);
        if (waited < DELAY) {
            vm.expectRevert(
                abi.encodeWithSelector(
                    IAgentEscrow.EscrowWithdrawalNotReady.selector, payer, address(usdc), T0 + DELAY
                )
            );
            escrow.withdraw(address(usdc));
            return;
        }
        uint256 left = DEPOSIT - settled;
        uint256 want = requested < left ? requested : left;
        assertEq(escrow.withdraw(address(usdc)), want);
        assertEq(usdc.balanceOf(payer), want);
        assertEq(escrow.depositOf(payer, address(usdc)), left - want);
        assertEq(usdc.balanceOf(address(escrow)), left - want);
    }

    /// @dev The allow-list admits exactly the listed payees.
    function testFuzz_payeeAllowList(address to, uint8 listed) public {
        vm.assume(to != address(0) && to != address(escrow));
        listed = uint8(bound(listed, 1, 5));
        address[] memory payees = new address[](listed);
        for (uint256 i; i < listed; ++i) payees[i] = address(uint160(0xA000 + i));
        vm.prank(payer);
        escrow.grant(sessionKey, _params(10e6, 100e6), payees);
        bool allowed = uint160(to) >= 0xA000 && uint160(to) < 0xA000 + listed;
        IAgentEscrow.Payment memory p = _payment(payer, to, 1e6, 0, 1);
        (IAgentEscrow.Reason r,) = escrow.check(p, _sign(sessionKeyPk, p));
        assertEq(_reason(r), allowed ? 0 : _reason(IAgentEscrow.Reason.PayeeNotAllowed));
        assertEq(escrow.isPayeeAllowed(payer, sessionKey, to), allowed);
    }
}
