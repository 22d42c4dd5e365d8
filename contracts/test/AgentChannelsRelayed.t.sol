// SPDX-License-Identifier: MIT
pragma solidity ^0.8.26;

import {ChannelsSigning} from "./channels/ChannelsSigning.sol";
import {AgentChannels} from "../src/AgentChannels.sol";
import {IAgentChannels} from "../src/escrow/IAgentChannels.sol";
import {TestUSDC} from "../src/TestUSDC.sol";

/// @dev Relayed open and top-up (EIP-3009 `receiveWithAuthorization`), and the close-voucher equality rule.
contract AgentChannelsRelayedTest is ChannelsSigning {
    AgentChannels internal channels;
    TestUSDC internal usdc;
    address internal payer;
    uint256 internal payerKey;
    address internal sessionKey;
    uint256 internal sessionKeyPk;
    address internal payee;
    address internal relayer;
    bytes32 internal constant SALT = bytes32(uint256(7));

    function setUp() public {
        vm.warp(1_700_000_000);
        channels = new AgentChannels();
        usdc = new TestUSDC();
        (payer, payerKey) = makeAddrAndKey("payer");
        (sessionKey, sessionKeyPk) = makeAddrAndKey("session key");
        payee = makeAddr("payee");
        relayer = makeAddr("relayer");
        usdc.mint(payer, 1_000e6); // no approval: the payer never sends a transaction
    }

    function _openRelayed(uint128 deposit) internal returns (bytes32 id) {
        IAgentChannels.OpenAuthorization memory auth = _openAuth(payer, payee, address(usdc), deposit, SALT, sessionKey);
        bytes memory sig =
            _receiveSig(usdc, payerKey, address(channels), deposit, auth.validAfter, auth.validBefore, auth.nonce);
        vm.prank(relayer);
        id = channels.openWithAuthorization(auth, sig);
    }

    function test_openWithAuthorization_opensTheChannelOpenWouldOpen() public {
        bytes32 want = channels.computeChannelId(payer, payee, address(usdc), SALT, sessionKey);
        vm.expectEmit(address(channels));
        emit IAgentChannels.ChannelOpened(want, payer, payee, address(usdc), sessionKey, 100e6, SALT);
        bytes32 id = _openRelayed(100e6);
        assertEq(id, want);
        IAgentChannels.Channel memory c = channels.getChannel(id);
        assertEq(c.payer, payer);
        assertEq(c.deposit, 100e6);
        assertEq(usdc.balanceOf(address(channels)), 100e6);
        assertEq(usdc.balanceOf(payer), 900e6);
        assertEq(usdc.balanceOf(relayer), 0);
        // The session key's vouchers pay the payee as with a direct open.
        vm.prank(payee);
        channels.settle(id, 30e6, _voucherSig(channels, sessionKeyPk, id, 30e6));
        assertEq(usdc.balanceOf(payee), 30e6);
    }

    /// @dev A relayer cannot redirect the payer's authorization to another payee, signer, token or salt.
    function testFuzz_openWithAuthorization_nonceBindsTheTerms(address otherPayee, bytes32 otherSalt) public {
        vm.assume(otherPayee != address(0) && otherPayee != payee && otherSalt != SALT);
        IAgentChannels.OpenAuthorization memory auth = _openAuth(payer, payee, address(usdc), 5e6, SALT, sessionKey);
        bytes memory sig =
            _receiveSig(usdc, payerKey, address(channels), 5e6, auth.validAfter, auth.validBefore, auth.nonce);
        bytes32 signed = auth.nonce;
        auth.payee = otherPayee;
        bytes32 expected = keccak256(abi.encode(payer, otherPayee, address(usdc), SALT, sessionKey));
        vm.expectRevert(abi.encodeWithSelector(IAgentChannels.ChannelNonceMismatch.selector, expected, signed));
        channels.openWithAuthorization(auth, sig);
        auth.payee = payee;
        auth.salt = otherSalt;
        expected = keccak256(abi.encode(payer, payee, address(usdc), otherSalt, sessionKey));
        vm.expectRevert(abi.encodeWithSelector(IAgentChannels.ChannelNonceMismatch.selector, expected, signed));
        channels.openWithAuthorization(auth, sig);
        assertEq(usdc.balanceOf(payer), 1_000e6);
    }

    function test_openWithAuthorization_refusesZeroAndBadSignature() public {
        IAgentChannels.OpenAuthorization memory auth = _openAuth(payer, payee, address(usdc), 0, SALT, sessionKey);
        vm.expectRevert(IAgentChannels.ChannelZeroDeposit.selector);
        channels.openWithAuthorization(auth, "");
        auth = _openAuth(payer, payee, address(usdc), 5e6, SALT, sessionKey);
        bytes memory wrong =
            _receiveSig(usdc, sessionKeyPk, address(channels), 5e6, auth.validAfter, auth.validBefore, auth.nonce);
        vm.expectRevert(); // the token refuses the authorization: no channel, no funds moved
        channels.openWithAuthorization(auth, wrong);
        assertEq(channels.getChannel(channels.computeChannelId(payer, payee, address(usdc), SALT, sessionKey)).payer, address(0));
    }

    function test_topUpWithAuthorization_addsAndCancelsAPendingClose() public {
        bytes32 id = _openRelayed(10e6);
        vm.prank(payer);
        channels.requestClose(id);
        IAgentChannels.TopUpAuthorization memory auth = _topUpAuth(id, 5e6, payer, bytes32(uint256(1)));
        bytes memory sig =
            _receiveSig(usdc, payerKey, address(channels), 5e6, auth.validAfter, auth.validBefore, auth.nonce);
        vm.expectEmit(address(channels));
        emit IAgentChannels.ChannelToppedUp(id, 5e6, 15e6);
        vm.prank(relayer);
        channels.topUpWithAuthorization(auth, sig);
        IAgentChannels.Channel memory c = channels.getChannel(id);
        assertEq(c.deposit, 15e6);
        assertEq(c.closeRequestedAt, 0);
        assertEq(usdc.balanceOf(address(channels)), 15e6);
        // Replaying the same authorization fails at the token (its nonce is used).
        vm.expectRevert();
        channels.topUpWithAuthorization(auth, sig);
        assertEq(channels.getChannel(id).deposit, 15e6);
    }

    function test_topUpWithAuthorization_onlyFromThePayerWithTheDerivedNonce() public {
        bytes32 id = _openRelayed(10e6);
        (address stranger, uint256 strangerKey) = makeAddrAndKey("stranger");
        usdc.mint(stranger, 5e6);
        IAgentChannels.TopUpAuthorization memory auth = _topUpAuth(id, 5e6, stranger, bytes32(0));
        bytes memory sig =
            _receiveSig(usdc, strangerKey, address(channels), 5e6, auth.validAfter, auth.validBefore, auth.nonce);
        vm.expectRevert(abi.encodeWithSelector(IAgentChannels.ChannelUnauthorized.selector, id, stranger));
        channels.topUpWithAuthorization(auth, sig);

        auth = _topUpAuth(id, 5e6, payer, bytes32(0));
        bytes32 signed = auth.nonce;
        auth.additionalDeposit = 6e6; // more than the payer signed for
        bytes32 expected = keccak256(abi.encode(id, uint128(6e6), payer, bytes32(0)));
        vm.expectRevert(abi.encodeWithSelector(IAgentChannels.ChannelNonceMismatch.selector, expected, signed));
        channels.topUpWithAuthorization(auth, "");
        assertEq(channels.getChannel(id).deposit, 10e6);
    }

    /// @dev Close equality (cf. mppx GHSA-mv9j-8jvg-j8mr): a close voucher equal to what is settled pays nothing more,
    /// whatever its signature, and the refund is exactly the rest of the deposit.
    function testFuzz_closeAtSettledPaysNothingMore(uint128 deposit, uint128 settled, bytes memory junk) public {
        deposit = uint128(bound(deposit, 1, 500e6));
        settled = uint128(bound(settled, 1, deposit));
        bytes32 id = _openRelayed(deposit);
        vm.prank(payee);
        channels.settle(id, settled, _voucherSig(channels, sessionKeyPk, id, settled));
        uint256 payerBefore = usdc.balanceOf(payer);
        vm.prank(payee);
        channels.close(id, settled, junk);
        assertEq(usdc.balanceOf(payee), settled);
        assertEq(usdc.balanceOf(payer) - payerBefore, deposit - settled);
        assertEq(usdc.balanceOf(address(channels)), 0);
        assertTrue(channels.getChannel(id).finalized);
    }

    /// @dev Above what is settled, a close needs the signer's voucher: junk reverts and moves nothing.
    function testFuzz_closeAboveSettledNeedsTheVoucher(uint128 amount, bytes memory junk) public {
        bytes32 id = _openRelayed(100e6);
        amount = uint128(bound(amount, 1, 100e6));
        vm.expectRevert(abi.encodeWithSelector(IAgentChannels.ChannelInvalidSignature.selector, id));
        vm.prank(payee);
        channels.close(id, amount, junk);
        assertEq(usdc.balanceOf(payee), 0);
        assertFalse(channels.getChannel(id).finalized);
    }
}
