// SPDX-License-Identifier: MIT
pragma solidity ^0.8.26;

import {EscrowTestBase} from "./escrow/EscrowTestBase.sol";
import {PackedBatch} from "./escrow/PackedBatch.sol";
import {IAgentEscrow} from "../src/escrow/IAgentEscrow.sol";
import {ERC1271Wallet} from "../src/mocks/ERC1271Wallet.sol";

/// @dev {AgentEscrow-settlePacked}: the same decisions and state as {AgentEscrow-settle} for any batch, and a
/// malformed encoding reverts as a whole.
contract AgentEscrowPackedTest is EscrowTestBase {
    ERC1271Wallet internal wallet;
    uint256 internal walletOwnerKey;
    address internal payer2;
    uint256 internal payer2Key;

    struct State {
        uint256[4] deposits;
        uint256 spent;
        uint256[2] balances;
        bool[8] nonces;
    }

    function setUp() public override {
        super.setUp();
        address owner;
        (owner, walletOwnerKey) = makeAddrAndKey("wallet owner");
        wallet = new ERC1271Wallet(owner);
        _fund(address(wallet), 40e6);
        (payer2, payer2Key) = makeAddrAndKey("payer2");
        _fund(payer2, 25e6);
        // A small budget and cap so that batches hit BudgetExceeded and AmountExceedsCap.
        vm.prank(payer);
        escrow.grant(sessionKey, _params(10e6, 30e6), new address[](0));
    }

    /// @dev A random entry: who signs (session key, payer, second payer, smart-account payer, garbage), to whom,
    /// how much, which nonce (from a small range: collisions within and across batches), expired or not.
    function _entry(uint256 s) internal view returns (IAgentEscrow.Payment memory p, bytes memory sig) {
        uint256 who = s % 5;
        address to = (s >> 8) % 2 == 0 ? payee : payee2;
        uint256 amount = (s >> 16) % 13e6;
        uint256 nonce = (s >> 40) % 8;
        if (who == 0) {
            p = _payment(payer, to, amount, nonce, (s >> 48) % 7 == 0 ? 2 : 1);
            sig = _sign(sessionKeyPk, p);
        } else if (who == 1) {
            p = _payment(payer, to, amount, nonce, 0);
            sig = _sign(payerKey, p);
        } else if (who == 2) {
            p = _payment(payer2, to, amount, nonce, 0);
            sig = _sign(payer2Key, p);
        } else if (who == 3) {
            p = _payment(address(wallet), to, amount, nonce, 0);
            sig = _sign(walletOwnerKey, p);
        } else {
            p = _payment(payer, to, amount, nonce, 1);
            sig = (s >> 56) % 2 == 0 ? new bytes(65) : bytes(hex"c0ffee");
        }
        if ((s >> 64) % 9 == 0) p.deadline = block.timestamp - 1;
    }

    function _state() internal view returns (State memory st) {
        st.deposits[0] = escrow.depositOf(payer, address(usdc));
        st.deposits[1] = escrow.depositOf(payer2, address(usdc));
        st.deposits[2] = escrow.depositOf(address(wallet), address(usdc));
        st.deposits[3] = usdc.balanceOf(address(escrow));
        st.spent = escrow.grantOf(payer, sessionKey).spent;
        st.balances[0] = usdc.balanceOf(payee);
        st.balances[1] = usdc.balanceOf(payee2);
        for (uint256 i; i < 8; ++i) {
            address signer = i < 2 ? sessionKey : i < 4 ? payer : i < 6 ? payer2 : address(wallet);
            st.nonces[i] = escrow.nonceUsed(signer, i);
        }
    }

    function _assertSame(State memory a, State memory b) internal pure {
        for (uint256 i; i < 4; ++i) assertEq(a.deposits[i], b.deposits[i], "deposit");
        assertEq(a.spent, b.spent, "spent");
        assertEq(a.balances[0], b.balances[0], "payee balance");
        assertEq(a.balances[1], b.balances[1], "payee2 balance");
        for (uint256 i; i < 8; ++i) assertEq(a.nonces[i], b.nonces[i], "nonce");
    }

    /// forge-config: default.fuzz.runs = 512
    function testFuzz_settlePacked_decidesAndWritesExactlyAsSettle(uint256 seed, uint8 count, uint8 rounds) public {
        count = uint8(bound(count, 1, 12));
        rounds = uint8(bound(rounds, 1, 3));
        for (uint256 r; r < rounds; ++r) {
            IAgentEscrow.Payment[] memory ps = new IAgentEscrow.Payment[](count);
            bytes[] memory sigs = new bytes[](count);
            for (uint256 i; i < count; ++i) {
                (ps[i], sigs[i]) = _entry(uint256(keccak256(abi.encode(seed, r, i))));
            }
            uint256 snap = vm.snapshotState();
            vm.prank(relayer);
            IAgentEscrow.Reason[] memory expected = escrow.settle(ps, sigs);
            State memory viaSettle = _state();
            vm.revertToState(snap);

            vm.prank(relayer);
            IAgentEscrow.Reason[] memory got = escrow.settlePacked(PackedBatch.pack(ps, sigs));
            assertEq(got.length, expected.length);
            for (uint256 i; i < count; ++i) assertEq(_reason(got[i]), _reason(expected[i]), "reason");
            _assertSame(_state(), viaSettle);
        }
    }

    function test_settlePacked_heldWritesLandBeforePayouts() public {
        // Five payments in a run from one key, one deposit, one grant: all stored, spent and paid exactly once.
        IAgentEscrow.Payment[] memory ps = new IAgentEscrow.Payment[](5);
        bytes[] memory sigs = new bytes[](5);
        for (uint256 i; i < 5; ++i) {
            ps[i] = _payment(payer, payee, 3e6, 100 + i, 1);
            sigs[i] = _sign(sessionKeyPk, ps[i]);
        }
        vm.prank(relayer);
        IAgentEscrow.Reason[] memory reasons = escrow.settlePacked(PackedBatch.pack(ps, sigs));
        for (uint256 i; i < 5; ++i) {
            assertEq(_reason(reasons[i]), 0);
            assertTrue(escrow.nonceUsed(sessionKey, 100 + i));
        }
        assertEq(escrow.depositOf(payer, address(usdc)), DEPOSIT - 15e6);
        assertEq(escrow.grantOf(payer, sessionKey).spent, 15e6);
        assertEq(usdc.balanceOf(payee), 15e6);
        // Replayed: every nonce is used, nothing moves.
        vm.prank(relayer);
        reasons = escrow.settlePacked(PackedBatch.pack(ps, sigs));
        for (uint256 i; i < 5; ++i) assertEq(_reason(reasons[i]), _reason(IAgentEscrow.Reason.NonceUsed));
        assertEq(usdc.balanceOf(payee), 15e6);
    }

    function test_settlePacked_smartAccountLongSignature() public {
        IAgentEscrow.Payment[] memory ps = new IAgentEscrow.Payment[](1);
        bytes[] memory sigs = new bytes[](1);
        ps[0] = _payment(address(wallet), payee, 5e6, 7, 0);
        // Not 65 bytes: only the ERC-1271 path can accept it, and it reads its length from the entry.
        sigs[0] = abi.encodePacked(_sign(walletOwnerKey, ps[0]), bytes7(0));
        vm.prank(relayer);
        IAgentEscrow.Reason[] memory reasons = escrow.settlePacked(PackedBatch.pack(ps, sigs));
        assertEq(_reason(reasons[0]), _reason(IAgentEscrow.Reason.InvalidSignature));
        sigs[0] = _sign(walletOwnerKey, ps[0]);
        reasons = escrow.settlePacked(PackedBatch.pack(ps, sigs));
        assertEq(_reason(reasons[0]), 0);
        assertEq(usdc.balanceOf(payee), 5e6);
    }

    function test_settlePacked_emptyBatch() public {
        assertEq(escrow.settlePacked(hex"000000").length, 0);
    }

    function test_settlePacked_revertsOnMalformedBatch() public {
        IAgentEscrow.Payment[] memory ps = new IAgentEscrow.Payment[](1);
        bytes[] memory sigs = new bytes[](1);
        ps[0] = _payment(payer, payee, 1e6, 1, 1);
        sigs[0] = _sign(sessionKeyPk, ps[0]);
        bytes memory good = PackedBatch.pack(ps, sigs); // 3 + 3 x 20 + 57 + 65 bytes
        assertEq(good.length, 185);

        vm.expectRevert(abi.encodeWithSelector(IAgentEscrow.EscrowMalformedBatch.selector, 0));
        escrow.settlePacked(hex"0000");
        // A table longer than the batch.
        vm.expectRevert(abi.encodeWithSelector(IAgentEscrow.EscrowMalformedBatch.selector, 0));
        escrow.settlePacked(hex"000105");
        // One byte short of the signature.
        vm.expectRevert(abi.encodeWithSelector(IAgentEscrow.EscrowMalformedBatch.selector, 120));
        escrow.settlePacked(_cut(good, good.length - 1));
        // An entry cut inside its fixed part.
        vm.expectRevert(abi.encodeWithSelector(IAgentEscrow.EscrowMalformedBatch.selector, 63));
        escrow.settlePacked(_cut(good, 100));
        // A byte after the last entry.
        vm.expectRevert(abi.encodeWithSelector(IAgentEscrow.EscrowMalformedBatch.selector, 185));
        escrow.settlePacked(abi.encodePacked(good, bytes1(0)));
        // An index outside the 3-address table.
        bytes memory bad = bytes.concat(good);
        bad[64] = 0x03;
        vm.expectRevert(abi.encodeWithSelector(IAgentEscrow.EscrowMalformedBatch.selector, 63));
        escrow.settlePacked(bad);
        // The count says two entries, the batch holds one.
        bad = bytes.concat(good);
        bad[1] = 0x02;
        vm.expectRevert(abi.encodeWithSelector(IAgentEscrow.EscrowMalformedBatch.selector, 185));
        escrow.settlePacked(bad);

        assertFalse(escrow.nonceUsed(sessionKey, 1));
        escrow.settlePacked(good);
        assertTrue(escrow.nonceUsed(sessionKey, 1));
    }

    function _cut(bytes memory b, uint256 length) internal pure returns (bytes memory out) {
        out = new bytes(length);
        for (uint256 i; i < length; ++i) out[i] = b[i];
    }
}
