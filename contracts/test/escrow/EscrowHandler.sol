// SPDX-License-Identifier: MIT
pragma solidity ^0.8.26;

import {Test} from "../utils/Test.sol";
import {AgentEscrow} from "../../src/AgentEscrow.sol";
import {IAgentEscrow} from "../../src/escrow/IAgentEscrow.sol";
import {TestUSDC} from "../../src/TestUSDC.sol";
import {PackedBatch} from "./PackedBatch.sol";

/**
 * @dev Drives an {AgentEscrow} through random deposits, withdrawals, grants, revocations, time jumps and batches of
 * payments (good, bad, replayed, stale), while keeping an independent model ("ghost" state) of what must hold.
 * Model violations are latched into flags that the invariant suite asserts stay false (an assertion inside a
 * handler call would only revert that call, which the fuzzer ignores); balances are compared directly.
 *
 * Actors: 3 payers (EOAs), 4 session keys (each may be granted by any payer), 3 payees.
 */
contract EscrowHandler is Test {
    struct GhostGrant {
        uint32 epoch;
        bool live;
        uint32 validAfter;
        uint32 validUntil;
        uint96 cap;
        uint128 budget;
        uint256 spent;
        bool restricted;
        bool[3] allowed;
    }

    AgentEscrow public immutable escrow;
    TestUSDC public immutable usdc;
    bytes32 internal immutable domainSeparator;

    address[3] public payers;
    uint256[3] internal payerKeys;
    address[4] public keys;
    uint256[4] internal keyPks;
    address[3] public payees;

    mapping(uint256 payer => mapping(uint256 key => GhostGrant)) internal ghostGrants;
    mapping(bytes32 id => bool) internal settledIds; // keccak(signer, nonce)

    IAgentEscrow.Payment[] internal settledPayments;
    bytes[] internal settledSigs;

    uint256 public ghostDeposited;
    uint256 public ghostWithdrawn;
    uint256 public ghostPaid;
    uint256 public settledCount;
    uint256 public failedCount;
    uint256 public replayAttempts;

    bool public violationDoubleSettle;
    bool public violationDeadSigner; // a revoked, expired, not-yet-valid or stale-epoch key paid
    bool public violationBudget;
    bool public violationCap;
    bool public violationPayee;
    bool public violationSpendMismatch;
    bool public violationReplayAccepted;
    bool public violationWithdrawAmount;
    bool public violationEpoch;
    bool public violationMetered; // a metered entry paid past its signed maximum, or below it for a stranger
    uint256 public meteredSettledCount;

    constructor(AgentEscrow escrow_, TestUSDC usdc_) {
        escrow = escrow_;
        usdc = usdc_;
        domainSeparator = keccak256(
            abi.encode(
                keccak256("EIP712Domain(string name,string version,uint256 chainId,address verifyingContract)"),
                keccak256("AgentEscrow"),
                keccak256("1"),
                block.chainid,
                address(escrow_)
            )
        );
        for (uint256 i; i < 3; ++i) {
            payerKeys[i] = uint256(keccak256(abi.encode("inv payer", i)));
            payers[i] = vm.addr(payerKeys[i]);
            payees[i] = address(uint160(0xBEE0 + i));
        }
        // Payees 0 and 1 let this handler settle their metered payments below the maximum; payee 2 does not.
        for (uint256 i; i < 2; ++i) {
            vm.prank(payees[i]);
            escrow_.setSettler(address(this), true);
        }
        for (uint256 i; i < 4; ++i) {
            keyPks[i] = uint256(keccak256(abi.encode("inv key", i)));
            keys[i] = vm.addr(keyPks[i]);
        }
    }

    // ------------------------------------------------------------------ actions

    function deposit(uint256 payerSeed, uint256 amount) external {
        address payer = payers[payerSeed % 3];
        amount = bound(amount, 0, 1_000e6);
        usdc.mint(payer, amount);
        vm.startPrank(payer);
        usdc.approve(address(escrow), amount);
        escrow.deposit(address(usdc), amount);
        vm.stopPrank();
        ghostDeposited += amount;
    }

    function requestWithdrawal(uint256 payerSeed, uint256 amount) external {
        address payer = payers[payerSeed % 3];
        // Mostly most of the deposit, so that payments settling during the delay often shrink it below the request.
        uint256 balance = escrow.depositOf(payer, address(usdc));
        amount = balance - bound(amount, 0, balance / 4);
        vm.prank(payer);
        escrow.requestWithdrawal(address(usdc), amount);
    }

    function withdraw(uint256 payerSeed) external {
        address payer = payers[payerSeed % 3];
        (uint256 requested, uint256 readyAt) = escrow.withdrawalOf(payer, address(usdc));
        if (requested == 0 || block.timestamp < readyAt) return;
        uint256 balanceBefore = escrow.depositOf(payer, address(usdc));
        vm.prank(payer);
        try escrow.withdraw(address(usdc)) returns (uint256 amount) {
            if (amount != (requested < balanceBefore ? requested : balanceBefore)) violationWithdrawAmount = true;
            ghostWithdrawn += amount;
        } catch {
            violationWithdrawAmount = true; // a ready withdrawal must go through
        }
    }

    function grant(
        uint256 payerSeed,
        uint256 keySeed,
        uint96 cap,
        uint128 budget,
        uint32 startOffset,
        uint32 duration,
        uint8 payeeMask
    ) external {
        // Usually live at once; sometimes starting later.
        uint32 validAfter = uint32(block.timestamp + (startOffset % 4 == 0 ? bound(startOffset, 0, 1 hours) : 0));
        IAgentEscrow.GrantParams memory params = IAgentEscrow.GrantParams({
            token: address(usdc),
            maxPerCall: uint96(bound(cap, 0, 100e6)),
            budget: uint128(bound(budget, 0, 400e6)),
            validAfter: validAfter,
            validUntil: validAfter + uint32(bound(duration, 1, 2 hours))
        });
        _grant(payerSeed % 3, keySeed % 4, params, uint8(payeeMask % 8)); // mask 0: any payee
    }

    function _grant(uint256 pi, uint256 ki, IAgentEscrow.GrantParams memory params, uint8 payeeMask) internal {
        uint256 count;
        for (uint256 j; j < 3; ++j) if (payeeMask & (1 << j) != 0) ++count;
        address[] memory list = new address[](count);
        count = 0;
        for (uint256 j; j < 3; ++j) if (payeeMask & (1 << j) != 0) list[count++] = payees[j];

        vm.prank(payers[pi]);
        uint32 epoch = escrow.grant(keys[ki], params, list);

        GhostGrant storage g = ghostGrants[pi][ki];
        g.epoch += 1;
        if (epoch != g.epoch) violationEpoch = true;
        g.live = true;
        g.validAfter = params.validAfter;
        g.validUntil = params.validUntil;
        g.cap = params.maxPerCall;
        g.budget = params.budget;
        g.spent = 0;
        g.restricted = payeeMask != 0;
        for (uint256 j; j < 3; ++j) g.allowed[j] = payeeMask & (1 << j) != 0;
    }

    function revoke(uint256 payerSeed, uint256 keySeed) external {
        uint256 pi = payerSeed % 3;
        uint256 ki = keySeed % 4;
        GhostGrant storage g = ghostGrants[pi][ki];
        vm.prank(payers[pi]);
        escrow.revoke(keys[ki], g.epoch + 1); // through the next epoch: also burns a grant not yet relayed
        g.epoch += 1;
        g.live = false;
    }

    function warp(uint256 seconds_) external {
        vm.warp(block.timestamp + bound(seconds_, 0, 40 minutes));
    }

    struct Batch {
        IAgentEscrow.Payment[] ps;
        bytes[] sigs;
        uint256[] pis;
        uint256[] kis; // 4 = the payer itself
    }

    /**
     * @dev Settles a batch of 1..4 random payments. Each picks a payer, a signer (a session key, or the payer
     * itself), a payee, an amount, a nonce from a small range (so collisions happen), and an epoch that is usually
     * current but sometimes stale or ahead; some have already hit their deadline.
     */
    function settle(uint256 seed, uint8 count) external {
        Batch memory b = _build(seed, uint8(bound(count, 1, 4)));
        IAgentEscrow.Reason[] memory reasons = escrow.settle(b.ps, b.sigs);
        for (uint256 i; i < reasons.length; ++i) {
            if (reasons[i] == IAgentEscrow.Reason.None) _recordSettled(b, i, b.ps[i].amount);
            else ++failedCount;
        }
        _checkSpend();
    }

    /// @dev {settle}'s batch sent packed through {AgentEscrow-settlePacked}: the same ghosts must hold.
    function settlePacked(uint256 seed, uint8 count) external {
        Batch memory b = _build(seed, uint8(bound(count, 1, 4)));
        IAgentEscrow.Reason[] memory reasons = escrow.settlePacked(PackedBatch.pack(b.ps, b.sigs));
        for (uint256 i; i < reasons.length; ++i) {
            if (reasons[i] == IAgentEscrow.Reason.None) _recordSettled(b, i, b.ps[i].amount);
            else ++failedCount;
        }
        _checkSpend();
    }

    function _checkSpend() internal {
        for (uint256 pi; pi < 3; ++pi) {
            for (uint256 ki; ki < 4; ++ki) {
                GhostGrant storage g = ghostGrants[pi][ki];
                if (!g.live) continue;
                // try: a broken budget would make the view's `budget - remaining` underflow and revert, and a
                // reverting handler call would roll back the very flags that record it.
                try escrow.grantOf(payers[pi], keys[ki]) returns (IAgentEscrow.GrantInfo memory info) {
                    if (info.spent != g.spent) violationSpendMismatch = true;
                } catch {
                    violationSpendMismatch = true;
                }
            }
        }
    }

    /**
     * @dev Settles a batch through {AgentEscrow-settleMetered}: each entry charged a random actual, mostly at or below
     * its signed amount (sometimes above it). Budget and spend are modelled on what was paid.
     */
    function settleMetered(uint256 seed, uint8 count, uint256 actualSeed) external {
        Batch memory b = _build(seed, uint8(bound(count, 1, 4)));
        uint256[] memory actuals = new uint256[](b.ps.length);
        for (uint256 i; i < actuals.length; ++i) {
            uint256 r = uint256(keccak256(abi.encode(actualSeed, i)));
            uint256 amount = b.ps[i].amount;
            actuals[i] = r % 8 == 0 ? amount + 1 + r % 5 : bound(r >> 8, 0, amount);
        }
        IAgentEscrow.Reason[] memory reasons = escrow.settleMetered(b.ps, actuals, b.sigs);
        for (uint256 i; i < reasons.length; ++i) {
            if (reasons[i] != IAgentEscrow.Reason.None) {
                ++failedCount;
                continue;
            }
            ++meteredSettledCount;
            if (actuals[i] > b.ps[i].amount || (actuals[i] < b.ps[i].amount && b.ps[i].payee == payees[2])) {
                violationMetered = true;
            }
            _recordSettled(b, i, actuals[i]);
        }
        _checkSpend();
    }

    function _build(uint256 seed, uint256 count) internal view returns (Batch memory b) {
        b.ps = new IAgentEscrow.Payment[](count);
        b.sigs = new bytes[](count);
        b.pis = new uint256[](count);
        b.kis = new uint256[](count);
        for (uint256 i; i < count; ++i) {
            uint256 s = uint256(keccak256(abi.encode(seed, i)));
            uint256 pi = s % 3;
            uint256 ki = (s >> 8) % 5;
            // Steer most session-key payments to a key this payer did grant, so live grants get spent down.
            if (ki < 4 && ghostGrants[pi][ki].epoch == 0 && (s >> 200) % 4 != 0) {
                for (uint256 k; k < 4; ++k) {
                    if (ghostGrants[pi][k].epoch != 0) ki = k;
                }
            }
            uint32 epoch = ki < 4 ? ghostGrants[pi][ki].epoch : 0;
            uint256 epochRoll = (s >> 16) % 10;
            if (epochRoll == 0 && epoch > 0) epoch -= 1;
            else if (epochRoll == 1) epoch += 1;
            // Amounts mostly around the key's cap, so both sides of the cap and of the budget are hit.
            uint256 cap = ki < 4 ? ghostGrants[pi][ki].cap : 50e6;
            b.ps[i] = IAgentEscrow.Payment({
                payer: payers[pi],
                payee: payees[(s >> 24) % 3],
                token: address(usdc),
                amount: bound(s >> 32, 0, cap + cap / 8 + 1),
                nonce: (s >> 96) % 64,
                deadline: (s >> 128) % 10 == 0 ? block.timestamp - 1 : block.timestamp + 10 minutes,
                epoch: epoch
            });
            b.sigs[i] = signPacked(ki < 4 ? keyPks[ki] : payerKeys[pi], _digest(b.ps[i]));
            b.pis[i] = pi;
            b.kis[i] = ki;
        }
    }

    /// @dev Records entry `i` of `b` settled for `charged` (its signed amount, or a metered actual).
    function _recordSettled(Batch memory b, uint256 i, uint256 charged) internal {
        ++settledCount;
        IAgentEscrow.Payment memory p = b.ps[i];
        address signer = b.kis[i] < 4 ? keys[b.kis[i]] : p.payer;
        bytes32 id = keccak256(abi.encode(signer, p.nonce));
        if (settledIds[id]) violationDoubleSettle = true;
        settledIds[id] = true;
        ghostPaid += charged;
        settledPayments.push(p);
        settledSigs.push(b.sigs[i]);
        if (b.kis[i] == 4) return;

        GhostGrant storage g = ghostGrants[b.pis[i]][b.kis[i]];
        if (!g.live || p.epoch != g.epoch || block.timestamp < g.validAfter || block.timestamp > g.validUntil) {
            violationDeadSigner = true;
        }
        if (p.amount > g.cap) violationCap = true; // the cap holds the signed maximum
        if (g.restricted && !g.allowed[uint160(p.payee) - 0xBEE0]) violationPayee = true;
        g.spent += charged; // the budget counts what was paid
        if (g.spent > g.budget) violationBudget = true;
    }

    /// @dev Re-submits a payment that already settled (alone or next to a fresh copy of itself): it must fail.
    function replay(uint256 index) external {
        if (settledPayments.length == 0) return;
        index = index % settledPayments.length;
        ++replayAttempts;
        IAgentEscrow.Payment[] memory ps = new IAgentEscrow.Payment[](2);
        bytes[] memory sigs = new bytes[](2);
        ps[0] = settledPayments[index];
        ps[1] = settledPayments[index];
        sigs[0] = settledSigs[index];
        sigs[1] = settledSigs[index];
        IAgentEscrow.Reason[] memory reasons = escrow.settle(ps, sigs);
        if (reasons[0] == IAgentEscrow.Reason.None || reasons[1] == IAgentEscrow.Reason.None) {
            violationReplayAccepted = true;
        }
    }

    // ------------------------------------------------------------------ views for the invariants

    function sumDeposits() external view returns (uint256 total) {
        for (uint256 i; i < 3; ++i) total += escrow.depositOf(payers[i], address(usdc));
    }

    function sumOwed() external view returns (uint256 total) {
        for (uint256 i; i < 3; ++i) total += escrow.owedTo(payees[i], address(usdc));
    }

    function sumPayeeBalances() external view returns (uint256 total) {
        for (uint256 i; i < 3; ++i) total += usdc.balanceOf(payees[i]);
    }

    function grantSpentWithinBudget() external view returns (bool) {
        for (uint256 pi; pi < 3; ++pi) {
            for (uint256 ki; ki < 4; ++ki) {
                IAgentEscrow.GrantInfo memory info = escrow.grantOf(payers[pi], keys[ki]);
                if (info.spent > info.budget) return false;
            }
        }
        return true;
    }

    function _digest(IAgentEscrow.Payment memory p) internal view returns (bytes32) {
        bytes32 structHash = keccak256(
            abi.encode(
                keccak256(
                    "Payment(address payer,address payee,address token,uint256 amount,uint256 nonce,uint256 deadline,uint32 epoch)"
                ),
                p.payer,
                p.payee,
                p.token,
                p.amount,
                p.nonce,
                p.deadline,
                p.epoch
            )
        );
        return keccak256(abi.encodePacked("\x19\x01", domainSeparator, structHash));
    }
}
