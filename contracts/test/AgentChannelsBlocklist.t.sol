// SPDX-License-Identifier: MIT
pragma solidity ^0.8.26;

import {Test} from "./utils/Test.sol";
import {MockERC20} from "./escrow/MockERC20.sol";
import {AgentChannels} from "../src/AgentChannels.sol";
import {IAgentChannels} from "../src/escrow/IAgentChannels.sol";

/**
 * @dev A payer-chosen split recipient (or the payer itself) that the token blocklists must not block the payee's
 * settlement or close (issue 9, item 9): the refused share is owed to its recipient instead.
 */
contract AgentChannelsBlocklistTest is Test {
    bytes32 internal constant SALT = bytes32(uint256(7));

    AgentChannels internal channels;
    MockERC20 internal token; // USDC-style: transfers to or from a blocked address revert
    address internal payer;
    address internal sessionKey;
    uint256 internal sessionKeyPk;
    address internal payee;
    address internal fee;
    address internal blocked;

    function setUp() public {
        channels = new AgentChannels();
        token = new MockERC20("Blocklist USD", "BUSD");
        payer = makeAddr("payer");
        (sessionKey, sessionKeyPk) = makeAddrAndKey("session key");
        payee = makeAddr("payee");
        fee = makeAddr("platform fee");
        blocked = makeAddr("blocked split");
        token.mint(payer, 1_000e6);
        vm.prank(payer);
        token.approve(address(channels), type(uint256).max);
    }

    function _open(uint128 deposit) internal returns (bytes32 id) {
        address[] memory r = new address[](2);
        uint16[] memory b = new uint16[](2);
        (r[0], b[0]) = (fee, 500); // 5%
        (r[1], b[1]) = (blocked, 1_000); // 10%, chosen by the payer
        vm.prank(payer);
        id = channels.open(payee, address(token), deposit, SALT, sessionKey, r, b);
    }

    function _voucher(bytes32 id, uint128 cumulative) internal view returns (bytes memory) {
        return signPacked(sessionKeyPk, channels.hashVoucher(id, cumulative));
    }

    function test_blocklistedSplit_doesNotBlockSettle_shareIsOwed() public {
        bytes32 id = _open(100e6);
        token.setBlocked(blocked, true);

        vm.expectEmit(address(channels));
        emit IAgentChannels.PayoutDeferred(id, blocked, address(token), 4e6);
        bytes memory sig40 = _voucher(id, 40e6);
        vm.prank(payee);
        channels.settle(id, 40e6, sig40);
        assertEq(token.balanceOf(payee), 34e6);
        assertEq(token.balanceOf(fee), 2e6);
        assertEq(token.balanceOf(blocked), 0);
        assertEq(channels.owedTo(blocked, address(token)), 4e6);

        // A second settlement and the close go through as well, and the owed share accumulates.
        bytes memory sig60 = _voucher(id, 60e6);
        vm.prank(payee);
        channels.close(id, 60e6, sig60);
        assertEq(token.balanceOf(payee), 51e6);
        assertEq(token.balanceOf(payer), 900e6 + 40e6);
        assertEq(channels.owedTo(blocked, address(token)), 6e6);
        // Nothing is lost: the contract holds exactly what it owes.
        assertEq(token.balanceOf(address(channels)), 6e6);

        // The recipient pulls its share to an address the token accepts.
        address elsewhere = makeAddr("elsewhere");
        vm.expectEmit(address(channels));
        emit IAgentChannels.OwedWithdrawn(blocked, address(token), elsewhere, 6e6);
        vm.prank(blocked);
        assertEq(channels.withdrawOwed(address(token), elsewhere), 6e6);
        assertEq(token.balanceOf(elsewhere), 6e6);
        assertEq(channels.owedTo(blocked, address(token)), 0);
        vm.prank(blocked);
        vm.expectRevert(abi.encodeWithSelector(IAgentChannels.ChannelNothingOwed.selector, blocked, address(token)));
        channels.withdrawOwed(address(token), elsewhere);
    }

    function test_blocklistedPayer_doesNotBlockClose_refundIsOwed() public {
        bytes32 id = _open(100e6);
        token.setBlocked(payer, true);
        bytes memory sig10 = _voucher(id, 10e6);
        vm.prank(payee);
        channels.close(id, 10e6, sig10);
        assertTrue(channels.getChannel(id).finalized);
        assertEq(token.balanceOf(payee), 8.5e6);
        assertEq(channels.owedTo(payer, address(token)), 90e6);
    }

    function test_withdrawOwed_refusesTheContractItself() public {
        vm.expectRevert(abi.encodeWithSelector(IAgentChannels.ChannelInvalidRecipient.selector, address(channels)));
        channels.withdrawOwed(address(token), address(channels));
    }

    function test_open_boundsTheNumberOfSplits() public {
        uint256 max = channels.MAX_SPLITS();
        address[] memory r = new address[](max + 1);
        uint16[] memory b = new uint16[](max + 1);
        for (uint256 i; i <= max; ++i) (r[i], b[i]) = (address(uint160(0x100 + i)), 1);
        vm.prank(payer);
        vm.expectRevert(abi.encodeWithSelector(IAgentChannels.ChannelTooManySplits.selector, max + 1, max));
        channels.open(payee, address(token), 1, SALT, sessionKey, r, b);
    }

    /// @dev Whoever is blocked, the payee's settlement lands and every unit is paid or owed, never lost.
    function testFuzz_blocklistNeverBlocksPayee(uint128 amount, bool blockFee, bool blockSplit, bool blockPayer)
        public
    {
        amount = uint128(bound(amount, 1, 100e6));
        bytes32 id = _open(100e6);
        token.setBlocked(fee, blockFee);
        token.setBlocked(blocked, blockSplit);
        token.setBlocked(payer, blockPayer);
        bytes memory sigA = _voucher(id, amount);
        vm.prank(payee);
        channels.close(id, amount, sigA);

        uint256 owed = channels.owedTo(fee, address(token)) + channels.owedTo(blocked, address(token))
            + channels.owedTo(payer, address(token));
        assertEq(token.balanceOf(address(channels)), owed);
        assertEq(
            token.balanceOf(payee) + token.balanceOf(fee) + token.balanceOf(blocked) + owed
                + (token.balanceOf(payer) - 900e6),
            100e6
        );
    }
}
