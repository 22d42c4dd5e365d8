// SPDX-License-Identifier: MIT
pragma solidity ^0.8.26;

import {Test} from "./utils/Test.sol";
import {AgentChannels} from "../src/AgentChannels.sol";
import {IAgentChannels} from "../src/escrow/IAgentChannels.sol";
import {TestUSDC} from "../src/TestUSDC.sol";
import {ERC1271Wallet} from "../src/mocks/ERC1271Wallet.sol";
import {SafeCast} from "@openzeppelin/contracts/utils/math/SafeCast.sol";

/// @dev Unit and fuzz tests of {AgentChannels} (MPP `evm`/`session` channels), plus its gas.
contract AgentChannelsTest is Test {
    bytes32 internal constant VOUCHER_TYPEHASH = keccak256("Voucher(bytes32 channelId,uint128 cumulativeAmount)");
    uint256 internal constant GRACE = 15 minutes;

    event log_named_uint(string key, uint256 val);

    AgentChannels internal channels;
    TestUSDC internal usdc;
    address internal payer;
    uint256 internal payerKey;
    address internal sessionKey;
    uint256 internal sessionKeyPk;
    address internal payee;
    bytes32 internal constant SALT = bytes32(uint256(42));

    function setUp() public {
        vm.warp(1_700_000_000);
        channels = new AgentChannels();
        usdc = new TestUSDC();
        (payer, payerKey) = makeAddrAndKey("payer");
        (sessionKey, sessionKeyPk) = makeAddrAndKey("session key");
        payee = makeAddr("payee");
        usdc.mint(payer, 1_000e6);
        vm.prank(payer);
        usdc.approve(address(channels), type(uint256).max);
    }

    // ------------------------------------------------------------------ helpers

    function _open(uint128 deposit) internal returns (bytes32 id) {
        vm.prank(payer);
        id = channels.open(payee, address(usdc), deposit, SALT, sessionKey, new address[](0), new uint16[](0));
    }

    function _voucher(uint256 key, bytes32 id, uint128 cumulative) internal view returns (bytes memory) {
        bytes32 domainSeparator = keccak256(
            abi.encode(
                keccak256("EIP712Domain(string name,string version,uint256 chainId,address verifyingContract)"),
                keccak256("EVM Payment Channel"),
                keccak256("1"),
                block.chainid,
                address(channels)
            )
        );
        bytes32 structHash = keccak256(abi.encode(VOUCHER_TYPEHASH, id, cumulative));
        return signPacked(key, keccak256(abi.encodePacked("\x19\x01", domainSeparator, structHash)));
    }

    function _settle(bytes32 id, uint128 cumulative) internal {
        bytes memory sig = _voucher(sessionKeyPk, id, cumulative);
        vm.prank(payee);
        channels.settle(id, cumulative, sig);
    }

    // ------------------------------------------------------------------ open

    function test_open_storesPullsAndEmits() public {
        bytes32 id = keccak256(
            abi.encode(payer, payee, address(usdc), SALT, sessionKey, address(channels), block.chainid)
        );
        assertEq(channels.computeChannelId(payer, payee, address(usdc), SALT, sessionKey), id);
        vm.expectEmit(address(channels));
        emit IAgentChannels.ChannelOpened(id, payer, payee, address(usdc), sessionKey, 100e6, SALT);
        assertEq(_open(100e6), id);

        IAgentChannels.Channel memory c = channels.getChannel(id);
        assertEq(c.payer, payer);
        assertEq(c.payee, payee);
        assertEq(c.token, address(usdc));
        assertEq(c.authorizedSigner, sessionKey);
        assertEq(c.deposit, 100e6);
        assertEq(c.settled, 0);
        assertEq(c.closeRequestedAt, 0);
        assertFalse(c.finalized);
        assertEq(usdc.balanceOf(address(channels)), 100e6);
        (, string memory name, string memory version,,,,) = channels.eip712Domain();
        assertEq(name, "EVM Payment Channel");
        assertEq(version, "1");
        assertEq(channels.VOUCHER_TYPEHASH(), VOUCHER_TYPEHASH);
        assertEq(channels.CLOSE_GRACE_PERIOD(), GRACE);
    }

    function test_open_revertsOnDuplicateId() public {
        bytes32 id = _open(1e6);
        vm.expectRevert(abi.encodeWithSelector(IAgentChannels.ChannelAlreadyExists.selector, id));
        _open(1e6);
    }

    function test_open_revertsOnMissingParty() public {
        vm.startPrank(payer);
        vm.expectRevert(abi.encodeWithSelector(IAgentChannels.ChannelInvalidParty.selector, address(0), address(usdc)));
        channels.open(address(0), address(usdc), 1, SALT, sessionKey, new address[](0), new uint16[](0));
        vm.expectRevert(abi.encodeWithSelector(IAgentChannels.ChannelInvalidParty.selector, payee, address(0)));
        channels.open(payee, address(0), 1, SALT, sessionKey, new address[](0), new uint16[](0));
        vm.stopPrank();
    }

    function test_open_revertsAbove96Bits() public {
        vm.expectRevert(
            abi.encodeWithSelector(SafeCast.SafeCastOverflowedUintDowncast.selector, 96, uint256(type(uint96).max) + 1)
        );
        vm.prank(payer);
        channels.open(
            payee, address(usdc), uint128(type(uint96).max) + 1, SALT, sessionKey, new address[](0), new uint16[](0)
        );
    }

    function test_open_revertsOnBadSplits() public {
        address[] memory r = new address[](1);
        uint16[] memory b = new uint16[](2);
        vm.startPrank(payer);
        vm.expectRevert(IAgentChannels.ChannelInvalidSplits.selector); // lengths differ
        channels.open(payee, address(usdc), 1, SALT, sessionKey, r, b);

        b = new uint16[](1);
        b[0] = 100;
        vm.expectRevert(IAgentChannels.ChannelInvalidSplits.selector); // zero recipient
        channels.open(payee, address(usdc), 1, SALT, sessionKey, r, b);

        r[0] = makeAddr("fee");
        b[0] = 0;
        vm.expectRevert(IAgentChannels.ChannelInvalidSplits.selector); // zero bps
        channels.open(payee, address(usdc), 1, SALT, sessionKey, r, b);

        b[0] = 10_000;
        vm.expectRevert(IAgentChannels.ChannelInvalidSplits.selector); // the payee must keep a remainder
        channels.open(payee, address(usdc), 1, SALT, sessionKey, r, b);

        r = new address[](9);
        b = new uint16[](9);
        for (uint256 i; i < 9; ++i) (r[i], b[i]) = (address(uint160(0x100 + i)), 1);
        vm.expectRevert(abi.encodeWithSelector(IAgentChannels.ChannelTooManySplits.selector, 9, 8));
        channels.open(payee, address(usdc), 1, SALT, sessionKey, r, b);
        vm.stopPrank();
    }

    // ------------------------------------------------------------------ settle

    function test_settle_cumulativeVouchers() public {
        bytes32 id = _open(100e6);
        vm.expectEmit(address(channels));
        emit IAgentChannels.ChannelSettled(id, 3e6, 3e6);
        _settle(id, 3e6);
        _settle(id, 10e6);
        assertEq(usdc.balanceOf(payee), 10e6);
        assertEq(channels.getChannel(id).settled, 10e6);
        assertEq(usdc.balanceOf(address(channels)), 90e6);
    }

    function test_settle_payerSignsWhenNoAuthorizedSigner() public {
        vm.prank(payer);
        bytes32 id = channels.open(payee, address(usdc), 5e6, SALT, address(0), new address[](0), new uint16[](0));
        bytes memory sig = _voucher(payerKey, id, 2e6);
        vm.prank(payee);
        channels.settle(id, 2e6, sig);
        assertEq(usdc.balanceOf(payee), 2e6);
        // The payer's key is the signer here; a session key's voucher is not.
        sig = _voucher(sessionKeyPk, id, 3e6);
        vm.expectRevert(abi.encodeWithSelector(IAgentChannels.ChannelInvalidSignature.selector, id));
        vm.prank(payee);
        channels.settle(id, 3e6, sig);
    }

    function test_settle_smartAccountSigner() public {
        (address owner, uint256 ownerKey) = makeAddrAndKey("wallet owner");
        ERC1271Wallet wallet = new ERC1271Wallet(owner);
        vm.prank(payer);
        bytes32 id = channels.open(payee, address(usdc), 5e6, SALT, address(wallet), new address[](0), new uint16[](0));
        bytes memory sig = _voucher(ownerKey, id, 1e6);
        vm.prank(payee);
        channels.settle(id, 1e6, sig);
        assertEq(usdc.balanceOf(payee), 1e6);
    }

    function test_settle_onlyPayee() public {
        bytes32 id = _open(10e6);
        bytes memory sig = _voucher(sessionKeyPk, id, 1e6);
        vm.expectRevert(abi.encodeWithSelector(IAgentChannels.ChannelUnauthorized.selector, id, payer));
        vm.prank(payer);
        channels.settle(id, 1e6, sig);
    }

    function test_settle_revertsWhenNotIncreasing() public {
        bytes32 id = _open(10e6);
        _settle(id, 4e6);
        bytes memory sig = _voucher(sessionKeyPk, id, 4e6);
        vm.expectRevert(abi.encodeWithSelector(IAgentChannels.ChannelAmountNotIncreasing.selector, 4e6, 4e6));
        vm.prank(payee);
        channels.settle(id, 4e6, sig);
    }

    function test_settle_revertsAboveDeposit() public {
        bytes32 id = _open(10e6);
        bytes memory sig = _voucher(sessionKeyPk, id, 10e6 + 1);
        vm.expectRevert(
            abi.encodeWithSelector(IAgentChannels.ChannelAmountExceedsDeposit.selector, 10e6 + 1, 10e6)
        );
        vm.prank(payee);
        channels.settle(id, 10e6 + 1, sig);
    }

    function test_settle_revertsOnBadSignatures() public {
        bytes32 id = _open(10e6);
        vm.startPrank(payee);
        vm.expectRevert(abi.encodeWithSelector(IAgentChannels.ChannelInvalidSignature.selector, id));
        channels.settle(id, 1e6, _voucher(sessionKeyPk, id, 2e6)); // signed another amount
        vm.expectRevert(abi.encodeWithSelector(IAgentChannels.ChannelInvalidSignature.selector, id));
        channels.settle(id, 1e6, new bytes(65));
        // High-s twin of a valid signature (the draft requires canonical signatures).
        bytes memory good = _voucher(sessionKeyPk, id, 1e6);
        bytes32 r;
        bytes32 s;
        uint8 v;
        assembly {
            r := mload(add(good, 0x20))
            s := mload(add(good, 0x40))
            v := byte(0, mload(add(good, 0x60)))
        }
        bytes32 highS = bytes32(0xFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFEBAAEDCE6AF48A03BBFD25E8CD0364141 - uint256(s));
        vm.expectRevert(abi.encodeWithSelector(IAgentChannels.ChannelInvalidSignature.selector, id));
        channels.settle(id, 1e6, abi.encodePacked(r, highS, v == 27 ? uint8(28) : uint8(27)));
        // Compact (ERC-2098) signatures are not accepted either.
        (bytes32 cr, bytes32 vs) = vm.signCompact(sessionKeyPk, channels.hashVoucher(id, 1e6));
        vm.expectRevert(abi.encodeWithSelector(IAgentChannels.ChannelInvalidSignature.selector, id));
        channels.settle(id, 1e6, abi.encodePacked(cr, vs));
        channels.settle(id, 1e6, good);
        vm.stopPrank();
    }

    function test_settle_revertsOnUnknownChannel() public {
        vm.expectRevert(abi.encodeWithSelector(IAgentChannels.ChannelNotFound.selector, bytes32(uint256(1))));
        channels.settle(bytes32(uint256(1)), 1, "");
    }

    function test_settle_splits() public {
        address fee = makeAddr("platform fee");
        address ref = makeAddr("referrer");
        address[] memory r = new address[](2);
        uint16[] memory b = new uint16[](2);
        (r[0], b[0]) = (fee, 500); // 5%
        (r[1], b[1]) = (ref, 125); // 1.25%
        vm.prank(payer);
        bytes32 id = channels.open(payee, address(usdc), 10e6, SALT, sessionKey, r, b);
        IAgentChannels.Split[] memory splits = channels.getSplits(id);
        assertEq(splits.length, 2);
        assertEq(splits[1].recipient, ref);
        assertEq(splits[1].bps, 125);

        _settle(id, 3_750_000);
        assertEq(usdc.balanceOf(fee), 187_500);
        assertEq(usdc.balanceOf(ref), 46_875);
        assertEq(usdc.balanceOf(payee), 3_750_000 - 187_500 - 46_875);
    }

    // ------------------------------------------------------------------ top-up, close, withdraw

    function test_topUp_addsAndCancelsPendingClose() public {
        bytes32 id = _open(10e6);
        vm.startPrank(payer);
        channels.requestClose(id);
        vm.expectEmit(address(channels));
        emit IAgentChannels.ChannelToppedUp(id, 5e6, 15e6);
        vm.expectEmit(address(channels));
        emit IAgentChannels.ChannelCloseCancelled(id);
        channels.topUp(id, 5e6);
        vm.stopPrank();
        IAgentChannels.Channel memory c = channels.getChannel(id);
        assertEq(c.deposit, 15e6);
        assertEq(c.closeRequestedAt, 0);
        assertEq(usdc.balanceOf(address(channels)), 15e6);
    }

    function test_topUp_onlyPayer() public {
        bytes32 id = _open(10e6);
        vm.expectRevert(abi.encodeWithSelector(IAgentChannels.ChannelUnauthorized.selector, id, payee));
        vm.prank(payee);
        channels.topUp(id, 1);
    }

    function test_close_settlesAndRefunds() public {
        bytes32 id = _open(5e6);
        _settle(id, 1e6);
        bytes memory sig = _voucher(sessionKeyPk, id, 3_750_100);
        vm.expectEmit(address(channels));
        emit IAgentChannels.ChannelSettled(id, 3_750_100, 2_750_100);
        vm.expectEmit(address(channels));
        emit IAgentChannels.ChannelClosed(id, 3_750_100, 1_249_900);
        vm.prank(payee);
        channels.close(id, 3_750_100, sig);
        assertEq(usdc.balanceOf(payee), 3_750_100);
        assertEq(usdc.balanceOf(payer), 1_000e6 - 5e6 + 1_249_900);
        assertTrue(channels.getChannel(id).finalized);
        assertEq(usdc.balanceOf(address(channels)), 0);

        // Finalized is sticky: no more settling, and the id cannot be opened again.
        vm.expectRevert(abi.encodeWithSelector(IAgentChannels.ChannelFinalized.selector, id));
        vm.prank(payee);
        channels.settle(id, 4e6, _voucher(sessionKeyPk, id, 4e6));
        vm.expectRevert(abi.encodeWithSelector(IAgentChannels.ChannelAlreadyExists.selector, id));
        _open(1e6);
    }

    function test_close_withoutNewVoucherNeedsNoSignature() public {
        bytes32 id = _open(5e6);
        _settle(id, 2e6);
        vm.prank(payee);
        channels.close(id, 0, "");
        assertEq(usdc.balanceOf(payer), 1_000e6 - 2e6);
    }

    function test_close_onlyPayee() public {
        bytes32 id = _open(5e6);
        vm.expectRevert(abi.encodeWithSelector(IAgentChannels.ChannelUnauthorized.selector, id, payer));
        vm.prank(payer);
        channels.close(id, 0, "");
    }

    function test_forcedClose() public {
        bytes32 id = _open(10e6);
        _settle(id, 1e6);
        vm.prank(payer);
        vm.expectRevert(abi.encodeWithSelector(IAgentChannels.ChannelCloseNotRequested.selector, id));
        channels.withdraw(id);

        vm.expectEmit(address(channels));
        emit IAgentChannels.ChannelCloseRequested(id, block.timestamp + GRACE);
        vm.prank(payer);
        channels.requestClose(id);
        vm.prank(payer);
        vm.expectRevert(abi.encodeWithSelector(IAgentChannels.ChannelCloseAlreadyRequested.selector, id));
        channels.requestClose(id);

        // The payee can still settle during the grace period.
        vm.warp(block.timestamp + GRACE - 1);
        _settle(id, 4e6);
        vm.prank(payer);
        vm.expectRevert(
            abi.encodeWithSelector(IAgentChannels.ChannelCloseNotReady.selector, id, block.timestamp + 1)
        );
        channels.withdraw(id);

        vm.warp(block.timestamp + 1);
        vm.expectEmit(address(channels));
        emit IAgentChannels.ChannelClosed(id, 4e6, 6e6);
        vm.prank(payer);
        channels.withdraw(id);
        assertEq(usdc.balanceOf(payer), 1_000e6 - 4e6);
        assertEq(usdc.balanceOf(payee), 4e6);
    }

    function test_requestCloseAndWithdraw_onlyPayer() public {
        bytes32 id = _open(10e6);
        vm.startPrank(payee);
        vm.expectRevert(abi.encodeWithSelector(IAgentChannels.ChannelUnauthorized.selector, id, payee));
        channels.requestClose(id);
        vm.expectRevert(abi.encodeWithSelector(IAgentChannels.ChannelUnauthorized.selector, id, payee));
        channels.withdraw(id);
        vm.stopPrank();
    }

    // ------------------------------------------------------------------ cross-implementation vector

    /// @dev A voucher signed by eth-account 0.14 (anvil key #0) for a channel on an escrow at
    /// 0x5FbDB2315678afecb367f032d93F642f64180aa3, chain 31337.
    function test_vector_ethAccountVoucher() public {
        vm.chainId(31337);
        AgentChannels at = AgentChannels(0x5FbDB2315678afecb367f032d93F642f64180aa3);
        vm.etch(address(at), address(channels).code);
        bytes32 id = at.computeChannelId(
            0x70997970C51812dc3A010C7d01b50e0d17dc79C8,
            0x3C44CdDdB6a900fa2b585dd299e03d12FA4293BC,
            0xe7f1725E7734CE288F8367e1Bb143E90bb3F0512,
            bytes32(0x1111111111111111111111111111111111111111111111111111111111111111),
            0xf39Fd6e51aad88F6F4ce6aB8827279cffFb92266
        );
        assertEq(id, 0xbb9a9abfb0b5bd25a619a0040fe50bd9fdbb58d682b152f33f01a95e788a1eb8);
        assertEq(at.hashVoucher(id, 250000), 0x4a828155e4d711e02086bd1d306c9946bddebe2aa6e83e362a2965f4bb9bcb88);
        (uint8 v, bytes32 r, bytes32 s) =
            vm.sign(0xac0974bec39a17e36ba4a6b4d238ff944bacb478cbed5efcae784d7bf4f2ff80, at.hashVoucher(id, 250000));
        assertEq(
            abi.encodePacked(r, s, v),
            hex"7d293422efe685f15462bbfc3e4db448b7a4c984dacfc25e66f38775e5d9ec9d1503ee56d85bbc1852fa526b419b61938913039fde1b11c80795448df148b2b01c"
        );
    }

    // ------------------------------------------------------------------ fuzz

    /// @dev Any increasing run of vouchers pays the payee exactly the last one, and the rest goes back to the payer.
    function testFuzz_vouchersThenClose(uint128 deposit, uint128[5] memory steps) public {
        deposit = uint128(bound(deposit, 1, 1_000e6));
        bytes32 id = _open(deposit);
        uint128 cumulative;
        for (uint256 i; i < steps.length; ++i) {
            uint128 next = uint128(bound(steps[i], 0, deposit));
            if (next <= cumulative) continue;
            cumulative = next;
            _settle(id, cumulative);
        }
        vm.prank(payee);
        channels.close(id, 0, "");
        assertEq(usdc.balanceOf(payee), cumulative);
        assertEq(usdc.balanceOf(payer), 1_000e6 - cumulative);
        assertEq(usdc.balanceOf(address(channels)), 0);
    }

    /// @dev Splits never pay out more than the delta, and the payee always keeps the remainder.
    function testFuzz_splitsConserve(uint128 amount, uint16 bps1, uint16 bps2) public {
        amount = uint128(bound(amount, 1, 1_000e6));
        bps1 = uint16(bound(bps1, 1, 9_000));
        bps2 = uint16(bound(bps2, 1, 9_999 - bps1));
        address[] memory r = new address[](2);
        uint16[] memory b = new uint16[](2);
        (r[0], b[0], r[1], b[1]) = (makeAddr("s1"), bps1, makeAddr("s2"), bps2);
        vm.prank(payer);
        bytes32 id = channels.open(payee, address(usdc), amount, SALT, sessionKey, r, b);
        _settle(id, amount);
        assertEq(usdc.balanceOf(r[0]) + usdc.balanceOf(r[1]) + usdc.balanceOf(payee), amount);
        assertEq(usdc.balanceOf(r[0]), uint256(amount) * bps1 / 10_000);
        assertGe(usdc.balanceOf(payee), amount - uint256(amount) * (uint256(bps1) + bps2) / 10_000);
    }

    // ------------------------------------------------------------------ gas

    function test_gas_channelLifecycle() public {
        uint256 g = gasleft();
        bytes32 id = _open(100e6);
        emit log_named_uint("channel open (exec)", g - gasleft());
        bytes memory sig = _voucher(sessionKeyPk, id, 1e6);
        vm.prank(payee);
        g = gasleft();
        channels.settle(id, 1e6, sig);
        emit log_named_uint("channel first settle (exec, payee had no tokens)", g - gasleft());
        sig = _voucher(sessionKeyPk, id, 2e6);
        vm.prank(payee);
        g = gasleft();
        channels.settle(id, 2e6, sig);
        emit log_named_uint("channel settle (exec)", g - gasleft());
        sig = _voucher(sessionKeyPk, id, 3e6);
        vm.prank(payee);
        g = gasleft();
        channels.close(id, 3e6, sig);
        emit log_named_uint("channel close with final voucher (exec)", g - gasleft());
    }
}
