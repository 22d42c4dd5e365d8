// SPDX-License-Identifier: MIT
pragma solidity ^0.8.26;

import {EscrowTestBase} from "./escrow/EscrowTestBase.sol";
import {IAgentEscrow} from "../src/escrow/IAgentEscrow.sol";

/// @dev Metered settlement: a payment signed for a maximum, settled for an actual charge at most that.
contract AgentEscrowMeteredTest is EscrowTestBase {
    function _metered(address from, IAgentEscrow.Payment memory p, uint256 actual, bytes memory sig)
        internal
        returns (IAgentEscrow.Reason)
    {
        uint256[] memory actuals = new uint256[](1);
        actuals[0] = actual;
        vm.prank(from);
        return escrow.settleMetered(_one(p), actuals, _one(sig))[0];
    }

    /// @dev Paid <= signed maximum; the cap holds the maximum, the budget and the deposit hold the actual charge.
    function testFuzz_paysActualWithinMaximum(
        uint256 maximum,
        uint256 actual,
        uint96 cap,
        uint128 budget,
        uint256 deposit
    ) public {
        deposit = bound(deposit, 0, 1e30);
        maximum = bound(maximum, 0, 2e30);
        actual = bound(actual, 0, 2e30);
        address who = makeAddr("fuzz payer");
        if (deposit > 0) _fund(who, deposit);
        vm.prank(who);
        escrow.grant(sessionKey, _params(cap, budget), new address[](0));

        IAgentEscrow.Payment memory p = _payment(who, payee, maximum, 7, 1);
        IAgentEscrow.Reason want = actual > maximum
            ? IAgentEscrow.Reason.ActualExceedsAmount
            : maximum > cap
                ? IAgentEscrow.Reason.AmountExceedsCap
                : actual > budget
                    ? IAgentEscrow.Reason.BudgetExceeded
                    : actual > deposit ? IAgentEscrow.Reason.InsufficientDeposit : IAgentEscrow.Reason.None;
        assertEq(_reason(_metered(payee, p, actual, _sign(sessionKeyPk, p))), _reason(want));

        bool ok = want == IAgentEscrow.Reason.None;
        assertLe(usdc.balanceOf(payee), maximum);
        assertEq(usdc.balanceOf(payee), ok ? actual : 0);
        assertEq(escrow.depositOf(who, address(usdc)), ok ? deposit - actual : deposit);
        assertEq(escrow.grantOf(who, sessionKey).spent, ok ? actual : 0);
        assertEq(escrow.nonceUsed(sessionKey, 7), ok);
    }

    /// @dev A run of metered payments under one grant: the budget counts what was paid, never the maxima.
    function testFuzz_budgetCountsActual(uint128 budget, uint256[8] memory actuals) public {
        budget = uint128(bound(budget, 0, 50e6));
        uint256 maximum = 10e6;
        vm.prank(payer);
        escrow.grant(sessionKey, _params(uint96(maximum), budget), new address[](0));

        uint256 spent;
        for (uint256 i; i < actuals.length; ++i) {
            uint256 actual = bound(actuals[i], 0, maximum);
            IAgentEscrow.Payment memory p = _payment(maximum, i);
            IAgentEscrow.Reason r = _metered(payee, p, actual, _sign(sessionKeyPk, p));
            IAgentEscrow.Reason want =
                spent + actual > budget ? IAgentEscrow.Reason.BudgetExceeded : IAgentEscrow.Reason.None;
            assertEq(_reason(r), _reason(want));
            if (r == IAgentEscrow.Reason.None) spent += actual;
            assertLe(spent, budget);
        }
        assertEq(escrow.grantOf(payer, sessionKey).spent, spent);
        assertEq(usdc.balanceOf(payee), spent);
    }

    /// @dev Neither the payer nor a stranger can burn a payment's nonce for less than its maximum.
    function testFuzz_onlyPayeeSettlesBelowMaximum(uint256 actual, address caller) public {
        vm.assume(caller != payee);
        _grantDefault();
        actual = bound(actual, 0, 5e6 - 1);
        IAgentEscrow.Payment memory p = _payment(5e6, 3);
        bytes memory sig = _sign(sessionKeyPk, p);

        assertEq(_reason(_metered(caller, p, actual, sig)), _reason(IAgentEscrow.Reason.NotPayeeSettler));
        assertFalse(escrow.nonceUsed(sessionKey, 3));
        assertEq(usdc.balanceOf(payee), 0);
        // The full maximum stays permissionless, as with `settle`.
        assertEq(_reason(_metered(caller, p, 5e6, sig)), 0);
        assertEq(usdc.balanceOf(payee), 5e6);
    }

    /// @dev An operator the payee allowed settles below the maximum; once disallowed it cannot.
    function test_allowedOperatorSettlesBelowMaximum() public {
        _grantDefault();
        IAgentEscrow.Payment memory p1 = _payment(5e6, 1);
        IAgentEscrow.Payment memory p2 = _payment(5e6, 2);
        assertFalse(escrow.isSettler(payee, relayer));
        assertTrue(escrow.isSettler(payee, payee));
        vm.expectEmit(address(escrow));
        emit IAgentEscrow.SettlerSet(payee, relayer, true);
        vm.prank(payee);
        escrow.setSettler(relayer, true);
        assertTrue(escrow.isSettler(payee, relayer));

        bytes32 digest = escrow.hashPayment(p1);
        vm.expectEmit(address(escrow));
        emit IAgentEscrow.PaymentSettled(digest, sessionKey, 1e6);
        assertEq(_reason(_metered(relayer, p1, 1e6, _sign(sessionKeyPk, p1))), 0);
        assertEq(usdc.balanceOf(payee), 1e6);

        vm.prank(payee);
        escrow.setSettler(relayer, false);
        assertEq(
            _reason(_metered(relayer, p2, 1e6, _sign(sessionKeyPk, p2))), _reason(IAgentEscrow.Reason.NotPayeeSettler)
        );
        // The remainder of the first maximum is gone with its nonce.
        assertEq(_reason(_metered(payee, p1, 4e6, _sign(sessionKeyPk, p1))), _reason(IAgentEscrow.Reason.NonceUsed));
        assertEq(usdc.balanceOf(payee), 1e6);
    }

    /// @dev Zero is a valid charge: the nonce is used, nothing moves.
    function test_zeroChargeUsesNonce() public {
        _grantDefault();
        IAgentEscrow.Payment memory p = _payment(5e6, 9);
        assertEq(_reason(_metered(payee, p, 0, _sign(sessionKeyPk, p))), 0);
        assertTrue(escrow.nonceUsed(sessionKey, 9));
        assertEq(usdc.balanceOf(payee), 0);
        assertEq(escrow.depositOf(payer, address(usdc)), DEPOSIT);
    }

    /// @dev A batch with mismatched arrays is malformed input and reverts with both lengths.
    function test_actualsLengthMismatchReverts() public {
        _grantDefault();
        IAgentEscrow.Payment memory p = _payment(5e6, 1);
        vm.expectRevert(abi.encodeWithSelector(IAgentEscrow.EscrowActualsLengthMismatch.selector, 1, 0));
        escrow.settleMetered(_one(p), new uint256[](0), _one(_sign(sessionKeyPk, p)));
    }

    /// @dev A batch mixes payees: each is paid the sum of its own actual charges, in one transfer each.
    function test_batchPaysEachPayeeItsActuals() public {
        _grantDefault();
        IAgentEscrow.Payment[] memory ps = new IAgentEscrow.Payment[](3);
        bytes[] memory sigs = new bytes[](3);
        uint256[] memory actuals = new uint256[](3);
        ps[0] = _payment(payer, payee, 4e6, 1, 1);
        ps[1] = _payment(payer, payee, 4e6, 2, 1);
        ps[2] = _payment(payer, payee2, 4e6, 3, 1);
        actuals[0] = 1e6;
        actuals[1] = 2e6;
        actuals[2] = 4e6; // the full maximum: anyone may
        for (uint256 i; i < 3; ++i) {
            sigs[i] = _sign(sessionKeyPk, ps[i]);
        }
        vm.prank(payee);
        IAgentEscrow.Reason[] memory reasons = escrow.settleMetered(ps, actuals, sigs);
        assertEq(_reason(reasons[0]) + _reason(reasons[1]) + _reason(reasons[2]), 0);
        assertEq(usdc.balanceOf(payee), 3e6);
        assertEq(usdc.balanceOf(payee2), 4e6);
        assertEq(escrow.grantOf(payer, sessionKey).spent, 7e6);
    }
}
