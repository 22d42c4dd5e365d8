// SPDX-License-Identifier: MIT
pragma solidity ^0.8.26;

import {Test} from "./utils/Test.sol";
import {ChannelsHandler} from "./channels/ChannelsHandler.sol";
import {AgentChannels} from "../src/AgentChannels.sol";
import {IAgentChannels} from "../src/escrow/IAgentChannels.sol";
import {TestUSDC} from "../src/TestUSDC.sol";

/// @dev Invariants of {AgentChannels} under random opens, top-ups (direct and relayed), settlements and closes.
contract AgentChannelsInvariantsTest is Test {
    AgentChannels internal channels;
    TestUSDC internal usdc;
    ChannelsHandler internal handler;

    function setUp() public {
        vm.warp(1_700_000_000);
        channels = new AgentChannels();
        usdc = new TestUSDC();
        handler = new ChannelsHandler(channels, usdc);
        targetContract(address(handler));
    }

    /// @dev Solvency: the contract holds exactly the unsettled part of every live channel (no payee here is refused).
    function invariant_solvent() public view {
        uint256 owed;
        uint256 n = handler.idCount();
        for (uint256 i; i < n; ++i) {
            IAgentChannels.Channel memory c = channels.getChannel(handler.ids(i));
            assertLe(c.settled, c.deposit, "settled > deposit");
            if (!c.finalized) owed += c.deposit - c.settled;
        }
        assertEq(usdc.balanceOf(address(channels)), owed, "balance != unsettled deposits");
    }

    /// @dev What is settled never passes the latest voucher the signer signed.
    function invariant_settledWithinLatestVoucher() public view {
        uint256 n = handler.idCount();
        for (uint256 i; i < n; ++i) {
            bytes32 id = handler.ids(i);
            assertLe(channels.getChannel(id).settled, handler.ghostVoucher(id), "settled > latest voucher");
            assertEq(handler.ghostPaidOut(id), channels.getChannel(id).settled, "paid out != settled");
        }
        assertFalse(handler.paidPastVoucher(), "a settlement paid past the latest voucher");
        assertFalse(handler.forgedAccepted(), "a forged or stale voucher moved funds");
    }

    /// @dev At close: payee payout + payer refund == deposit, and the payout is exactly what was settled.
    function invariant_closeEquality() public view {
        assertFalse(handler.closeUnequal(), "close: payout + refund != deposit");
        uint256 n = handler.idCount();
        for (uint256 i; i < n; ++i) {
            bytes32 id = handler.ids(i);
            IAgentChannels.Channel memory c = channels.getChannel(id);
            assertEq(c.deposit, handler.ghostDeposited(id), "deposit != opened + topped up");
            if (c.finalized) {
                assertEq(handler.ghostRefund(id), c.deposit - c.settled, "refund != deposit - settled");
            } else {
                assertEq(handler.ghostRefund(id), 0, "refund before close");
            }
        }
    }

    /// @dev The handler really reaches opens, settlements and closes (an invariant run that does nothing proves nothing).
    function test_handlerReachesEveryPath() public {
        handler.open(0, 0, 100e6, false);
        handler.open(1, 1, 50e6, true);
        handler.topUp(0, 10e6, true);
        handler.topUp(1, 10e6, false);
        handler.settle(0, 30e6);
        handler.settleBad(0, 5e6, true);
        handler.settleBad(0, 5e6, false);
        handler.close(0, 1);
        handler.settle(1, 20e6);
        handler.requestClose(1);
        handler.warp(20 minutes);
        handler.withdraw(1);
        assertTrue(channels.getChannel(handler.ids(0)).finalized);
        assertTrue(channels.getChannel(handler.ids(1)).finalized);
        assertEq(handler.ghostPaidOut(handler.ids(0)), 30e6);
        assertEq(handler.ghostRefund(handler.ids(0)), 80e6);
        assertEq(handler.ghostRefund(handler.ids(1)), 40e6);
        invariant_solvent();
        invariant_settledWithinLatestVoucher();
        invariant_closeEquality();
    }
}
