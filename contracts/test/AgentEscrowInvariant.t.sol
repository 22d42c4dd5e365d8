// SPDX-License-Identifier: MIT
pragma solidity ^0.8.26;

import {Test} from "./utils/Test.sol";
import {EscrowHandler} from "./escrow/EscrowHandler.sol";
import {AgentEscrow} from "../src/AgentEscrow.sol";
import {TestUSDC} from "../src/TestUSDC.sol";

/**
 * @dev Invariants of {AgentEscrow} under random sequences of {EscrowHandler} actions (deposits, withdrawals, grants,
 * revocations, time jumps, batches of good and bad payments, replays).
 */
contract AgentEscrowInvariantTest is Test {
    AgentEscrow internal escrow;
    TestUSDC internal usdc;
    EscrowHandler internal handler;

    function setUp() public {
        vm.warp(1_700_000_000);
        usdc = new TestUSDC();
        escrow = new AgentEscrow(30 minutes);
        handler = new EscrowHandler(escrow, usdc);
        targetContract(address(handler));
    }

    /// @dev The escrow holds exactly the deposits plus what it owes payees: deposits in, minus withdrawals and payouts.
    function invariant_balanceMatchesBooks() public view {
        uint256 balance = usdc.balanceOf(address(escrow));
        assertEq(balance, handler.sumDeposits() + handler.sumOwed(), "balance != deposits + owed");
        assertEq(
            balance, handler.ghostDeposited() - handler.ghostWithdrawn() - handler.ghostPaid(), "balance != flows"
        );
        assertEq(handler.sumPayeeBalances() + handler.sumOwed(), handler.ghostPaid(), "payees != paid");
    }

    /// @dev No grant ever spends past its budget, and the on-chain spend equals the model's.
    function invariant_spendWithinBudget() public view {
        assertTrue(handler.grantSpentWithinBudget(), "spent > budget on-chain");
        assertFalse(handler.violationBudget(), "model: spent > budget");
        assertFalse(handler.violationSpendMismatch(), "on-chain spend != model");
        assertFalse(handler.violationCap(), "a payment above the per-call cap settled");
        assertFalse(handler.violationMetered(), "a metered entry paid past its maximum, or below it for a stranger");
    }

    /// @dev A payment (signer, nonce) settles at most once, and replays of settled payments always fail.
    function invariant_noDoubleSettlement() public view {
        assertFalse(handler.violationDoubleSettle(), "a (signer, nonce) settled twice");
        assertFalse(handler.violationReplayAccepted(), "a replayed payment settled");
    }

    /// @dev A revoked, expired, not-yet-valid or superseded session key never pays, nor pays an unlisted payee.
    function invariant_deadSignerNeverPays() public view {
        assertFalse(handler.violationDeadSigner(), "a dead session key paid");
        assertFalse(handler.violationPayee(), "a payee outside the allow-list was paid");
    }

    /// @dev Withdrawals pay min(requested, deposit) and grant epochs advance by one per change.
    function invariant_bookkeeping() public view {
        assertFalse(handler.violationWithdrawAmount(), "withdrawal amount");
        assertFalse(handler.violationEpoch(), "epoch");
    }

    /// @dev The handler reaches both outcomes (otherwise the invariants above would hold vacuously).
    function test_handlerReachesSettledFailedAndReplays() public {
        for (uint256 i; i < 3; ++i) handler.deposit(i, 1_000e6);
        for (uint256 i; i < 4; ++i) handler.grant(i, i, 50e6, 300e6, 0, 2 hours, uint8(i));
        for (uint256 i; i < 20; ++i) {
            handler.settle(uint256(keccak256(abi.encode(i))), 4);
            handler.settleMetered(uint256(keccak256(abi.encode("metered", i))), 4, i);
            if (i % 5 == 4) handler.replay(i);
            if (i == 10) handler.revoke(0, 0);
            handler.warp(5 minutes);
        }
        assertGt(handler.settledCount(), 10, "too few settled");
        assertGt(handler.failedCount(), 10, "too few failed");
        assertGt(handler.replayAttempts(), 0, "no replays");
        assertGt(handler.meteredSettledCount(), 5, "too few metered settlements");
        invariant_balanceMatchesBooks();
        invariant_spendWithinBudget();
        invariant_noDoubleSettlement();
        invariant_deadSignerNeverPays();
        invariant_bookkeeping();
    }
}
