// SPDX-License-Identifier: MIT
pragma solidity ^0.8.26;

import {ChannelsSigning} from "./ChannelsSigning.sol";
import {AgentChannels} from "../../src/AgentChannels.sol";
import {IAgentChannels} from "../../src/escrow/IAgentChannels.sol";
import {TestUSDC} from "../../src/TestUSDC.sol";

/**
 * @dev Drives {AgentChannels} through opens (direct and relayed), top-ups (direct and relayed), vouchers, settlements
 * (honest, stale and forged), closes (with the latest voucher, at the settled amount with junk, forged), close
 * requests, withdrawals and time, while keeping a ghost model: the highest voucher each signer signed, and what each
 * channel paid out and refunded. Breaches of the model are latched into flags the invariant suite asserts stay false.
 */
contract ChannelsHandler is ChannelsSigning {
    AgentChannels public immutable channels;
    TestUSDC public immutable usdc;

    uint256[3] internal payerKeys;
    uint256[3] internal signerKeys;
    address[2] internal payees;

    bytes32[] public ids;
    mapping(bytes32 id => uint256) internal signerOf; // private key of the authorized signer
    mapping(bytes32 id => uint128) public ghostVoucher; // the highest cumulative amount signed
    mapping(bytes32 id => uint256) public ghostPaidOut; // to the payee
    mapping(bytes32 id => uint256) public ghostRefund; // to the payer at close / withdraw
    mapping(bytes32 id => uint256) public ghostDeposited;

    uint256 internal salt;
    bool public paidPastVoucher; // a settlement paid more than the latest voucher
    bool public forgedAccepted; // a forged or stale voucher moved funds
    bool public closeUnequal; // at close, payout + refund != deposit, or payout != settled
    uint256 public calls;

    constructor(AgentChannels channels_, TestUSDC usdc_) {
        channels = channels_;
        usdc = usdc_;
        for (uint256 i; i < 3; ++i) {
            payerKeys[i] = uint256(keccak256(abi.encode("payer", i))) % 1e70 + 1;
            signerKeys[i] = uint256(keccak256(abi.encode("signer", i))) % 1e70 + 1;
            address p = vm.addr(payerKeys[i]);
            usdc.mint(p, 1e15);
            vm.prank(p);
            usdc.approve(address(channels), type(uint256).max);
        }
        payees[0] = address(0xBEE1);
        payees[1] = address(0xBEE2);
    }

    function idCount() external view returns (uint256) {
        return ids.length;
    }

    function _pick(uint256 seed) internal view returns (bytes32 id, bool ok) {
        if (ids.length == 0) return (bytes32(0), false);
        id = ids[seed % ids.length];
        ok = !channels.getChannel(id).finalized;
    }

    function _paid(IAgentChannels.Channel memory c, uint256 payeeBefore, uint256 payerBefore, bytes32 id) internal {
        ghostPaidOut[id] += usdc.balanceOf(c.payee) - payeeBefore;
        ghostRefund[id] += usdc.balanceOf(c.payer) - payerBefore;
    }

    // ------------------------------------------------------------------ opens and top-ups

    function open(uint256 payerSeed, uint256 payeeSeed, uint128 deposit, bool relayed) external {
        ++calls;
        uint256 pi = payerSeed % 3;
        deposit = uint128(bound(deposit, 1, 1e9));
        address payer = vm.addr(payerKeys[pi]);
        address payee = payees[payeeSeed % 2];
        address signer = vm.addr(signerKeys[pi]);
        bytes32 s = bytes32(++salt);
        bytes32 id;
        if (relayed) {
            IAgentChannels.OpenAuthorization memory auth = _openAuth(payer, payee, address(usdc), deposit, s, signer);
            bytes memory sig = _receiveSig(
                usdc, payerKeys[pi], address(channels), deposit, auth.validAfter, auth.validBefore, auth.nonce
            );
            id = channels.openWithAuthorization(auth, sig);
        } else {
            vm.prank(payer);
            id = channels.open(payee, address(usdc), deposit, s, signer, new address[](0), new uint16[](0));
        }
        ids.push(id);
        signerOf[id] = signerKeys[pi];
        ghostDeposited[id] = deposit;
    }

    function topUp(uint256 seed, uint128 amount, bool relayed) external {
        ++calls;
        (bytes32 id, bool ok) = _pick(seed);
        if (!ok) return;
        amount = uint128(bound(amount, 1, 1e9));
        IAgentChannels.Channel memory c = channels.getChannel(id);
        uint256 pk;
        for (uint256 i; i < 3; ++i) {
            if (vm.addr(payerKeys[i]) == c.payer) pk = payerKeys[i];
        }
        if (relayed) {
            IAgentChannels.TopUpAuthorization memory auth = _topUpAuth(id, amount, c.payer, bytes32(++salt));
            bytes memory sig =
                _receiveSig(usdc, pk, address(channels), amount, auth.validAfter, auth.validBefore, auth.nonce);
            channels.topUpWithAuthorization(auth, sig);
        } else {
            vm.prank(c.payer);
            channels.topUp(id, amount);
        }
        ghostDeposited[id] += amount;
    }

    // ------------------------------------------------------------------ vouchers and settlement

    /// @dev The signer signs a new voucher (the latest one) and the payee settles it when it fits the deposit.
    function settle(uint256 seed, uint128 delta) external {
        ++calls;
        (bytes32 id, bool ok) = _pick(seed);
        if (!ok) return;
        IAgentChannels.Channel memory c = channels.getChannel(id);
        uint128 cumulative = uint128(c.settled) + uint128(bound(delta, 1, 1e9));
        if (cumulative > ghostVoucher[id]) ghostVoucher[id] = cumulative;
        bytes memory sig = _voucherSig(channels, signerOf[id], id, cumulative);
        uint256 payeeBefore = usdc.balanceOf(c.payee);
        uint256 payerBefore = usdc.balanceOf(c.payer);
        vm.prank(c.payee);
        try channels.settle(id, cumulative, sig) {} catch {}
        _paid(c, payeeBefore, payerBefore, id);
        if (channels.getChannel(id).settled > ghostVoucher[id]) paidPastVoucher = true;
    }

    /// @dev A stale voucher (at or below what is settled) or one signed by the wrong key never moves funds.
    function settleBad(uint256 seed, uint128 amount, bool forged) external {
        ++calls;
        (bytes32 id, bool ok) = _pick(seed);
        if (!ok) return;
        IAgentChannels.Channel memory c = channels.getChannel(id);
        uint128 cumulative = forged ? uint128(bound(amount, 1, c.deposit)) : uint128(bound(amount, 0, c.settled));
        uint256 key = forged ? payerKeys[(seed >> 8) % 3] + 7 : signerOf[id];
        bytes memory sig = _voucherSig(channels, key, id, cumulative);
        uint256 before = usdc.balanceOf(address(channels));
        vm.prank(c.payee);
        try channels.settle(id, cumulative, sig) {} catch {}
        if (usdc.balanceOf(address(channels)) != before) forgedAccepted = true;
    }

    // ------------------------------------------------------------------ closing

    /// @dev mode 0: close with the latest voucher; 1: close at the settled amount with junk; 2: forged above settled.
    function close(uint256 seed, uint8 mode) external {
        ++calls;
        (bytes32 id, bool ok) = _pick(seed);
        if (!ok) return;
        IAgentChannels.Channel memory c = channels.getChannel(id);
        uint256 payeeBefore = usdc.balanceOf(c.payee);
        uint256 payerBefore = usdc.balanceOf(c.payer);
        uint128 cumulative;
        bytes memory sig;
        mode %= 3;
        if (mode == 0) {
            cumulative = ghostVoucher[id] > c.deposit ? c.settled : ghostVoucher[id];
            if (cumulative < c.settled) cumulative = c.settled;
            sig = _voucherSig(channels, signerOf[id], id, cumulative);
        } else if (mode == 1) {
            cumulative = c.settled;
            sig = hex"deadbeef";
        } else {
            cumulative = c.settled + 1;
            sig = _voucherSig(channels, signerOf[id] + 1, id, cumulative);
        }
        vm.prank(c.payee);
        try channels.close(id, cumulative, sig) {} catch {}
        _paid(c, payeeBefore, payerBefore, id);
        if (mode == 2 && channels.getChannel(id).finalized) forgedAccepted = true;
        _checkClosed(id);
    }

    function requestClose(uint256 seed) external {
        ++calls;
        (bytes32 id, bool ok) = _pick(seed);
        if (!ok) return;
        IAgentChannels.Channel memory c = channels.getChannel(id);
        if (c.closeRequestedAt != 0) return;
        vm.prank(c.payer);
        channels.requestClose(id);
    }

    function withdraw(uint256 seed) external {
        ++calls;
        (bytes32 id, bool ok) = _pick(seed);
        if (!ok) return;
        IAgentChannels.Channel memory c = channels.getChannel(id);
        uint256 payeeBefore = usdc.balanceOf(c.payee);
        uint256 payerBefore = usdc.balanceOf(c.payer);
        vm.prank(c.payer);
        try channels.withdraw(id) {} catch {}
        _paid(c, payeeBefore, payerBefore, id);
        _checkClosed(id);
    }

    function warp(uint256 secs) external {
        ++calls;
        vm.warp(block.timestamp + bound(secs, 1, 20 minutes));
    }

    function _checkClosed(bytes32 id) internal {
        IAgentChannels.Channel memory c = channels.getChannel(id);
        if (!c.finalized) return;
        if (ghostPaidOut[id] + ghostRefund[id] != ghostDeposited[id] || ghostPaidOut[id] != c.settled) {
            closeUnequal = true;
        }
    }
}
