// SPDX-License-Identifier: MIT
pragma solidity ^0.8.26;

import {EscrowTestBase} from "./escrow/EscrowTestBase.sol";
import {IAgentEscrow} from "../src/escrow/IAgentEscrow.sol";

/**
 * @dev A signed revoke wins over every grant the payer signed before it, whatever order a relayer chooses
 * (issue 9, item 8). The payer numbers its signed grant changes from one increasing counter, so "signed before
 * the revoke" is "numbered at or below the revoke's epoch".
 */
contract AgentEscrowRevokeOrderTest is EscrowTestBase {
    address[] internal noPayees;

    function setUp() public override {
        super.setUp();
        _fund(payer, 1_000e6);
    }

    function _signGrant(uint32 epoch) internal view returns (bytes memory) {
        return signPacked(payerKey, _grantDigest(payer, sessionKey, _params(10e6, 100e6), noPayees, epoch));
    }

    function _relayGrant(uint32 epoch, bytes memory sig) internal returns (bool ok) {
        vm.prank(relayer);
        try escrow.grantWithSig(payer, sessionKey, _params(10e6, 100e6), noPayees, epoch, sig) {
            ok = true;
        } catch {}
    }

    function _relayRevoke(uint32 epoch, bytes memory sig) internal returns (bool ok) {
        vm.prank(relayer);
        try escrow.revokeWithSig(payer, sessionKey, epoch, sig) {
            ok = true;
        } catch {}
    }

    /// @dev Whether the session key can still pay under any epoch up to `maxEpoch`.
    function _keyCanPay(uint32 maxEpoch) internal returns (bool) {
        for (uint32 e = 1; e <= maxEpoch; ++e) {
            IAgentEscrow.Payment memory p = _payment(payer, payee, 1e6, 1000 + e, e);
            (IAgentEscrow.Reason r,) = escrow.check(p, _sign(sessionKeyPk, p));
            if (r == IAgentEscrow.Reason.None) return true;
        }
        return false;
    }

    /// @dev The attack: the owner has a renewal (epoch 2) signed and pending, and signs a revoke after it. The
    /// revoke is relayed first; relaying the renewal afterwards must not bring the key back.
    function test_signedRevoke_beatsPendingRenewal_relayedAfterIt() public {
        assertTrue(_relayGrant(1, _signGrant(1)));
        bytes memory renewal = _signGrant(2); // pre-signed, held by whoever relays renewals
        bytes memory revokeSig = signPacked(payerKey, _revokeDigest(payer, sessionKey, 2));

        assertTrue(_relayRevoke(2, revokeSig), "the revoke lands while the renewal is pending");
        assertFalse(_relayGrant(2, renewal), "the renewal signed before the revoke is refused");
        assertEq(escrow.grantOf(payer, sessionKey).token, address(0));
        assertFalse(_keyCanPay(3));
    }

    /// @dev Same, with the renewal relayed first (front-running the revoke): the revoke still lands and ends it.
    function test_signedRevoke_beatsPendingRenewal_relayedBeforeIt() public {
        assertTrue(_relayGrant(1, _signGrant(1)));
        bytes memory renewal = _signGrant(2);
        bytes memory revokeSig = signPacked(payerKey, _revokeDigest(payer, sessionKey, 2));

        assertTrue(_relayGrant(2, renewal));
        assertTrue(_relayRevoke(2, revokeSig));
        assertEq(escrow.grantOf(payer, sessionKey).token, address(0));
        assertFalse(_keyCanPay(3));
        // Replaying either changes nothing.
        assertFalse(_relayGrant(2, renewal));
        _relayRevoke(2, revokeSig);
        assertFalse(_keyCanPay(3));
    }

    /// @dev A grant signed after the revoke (a higher epoch) is a new decision of the payer: it survives the older
    /// revoke, in either order, and the older revoke cannot end it.
    function test_grantSignedAfterRevoke_survivesIt() public {
        bytes memory revokeSig = signPacked(payerKey, _revokeDigest(payer, sessionKey, 3));
        bytes memory later = _signGrant(4);
        assertTrue(_relayGrant(4, later));
        assertFalse(_relayRevoke(3, revokeSig));
        assertEq(escrow.grantOf(payer, sessionKey).epoch, 4);
        assertTrue(_keyCanPay(4));
    }

    /**
     * @dev Fuzz over relay orders: the payer signs `grants` grants numbered 1..grants and one revoke through
     * `through`; a relayer submits all of them, some twice, in a random order. Whatever the order, no grant
     * numbered at or below `through` is live at the end, no payment under such an epoch settles, and when every
     * grant was signed before the revoke the key ends revoked.
     */
    function testFuzz_signedRevokeWinsInAnyRelayOrder(uint8 grants, uint8 through, uint256 seed) public {
        uint256 n = bound(grants, 1, 6);
        uint32 revokeEpoch = uint32(bound(through, 1, n + 1));
        uint256 total = n + 1 + 3; // every message once, plus three random replays
        uint256[] memory order = new uint256[](total);
        for (uint256 i; i < total; ++i) order[i] = i < n + 1 ? i : uint256(keccak256(abi.encode(seed, i))) % (n + 1);
        for (uint256 i = total - 1; i > 0; --i) {
            uint256 j = uint256(keccak256(abi.encode(seed, "shuffle", i))) % (i + 1);
            (order[i], order[j]) = (order[j], order[i]);
        }

        bytes memory revokeSig = signPacked(payerKey, _revokeDigest(payer, sessionKey, revokeEpoch));
        bool revokeLanded;
        for (uint256 i; i < total; ++i) {
            uint256 m = order[i];
            if (m == n) {
                revokeLanded = _relayRevoke(revokeEpoch, revokeSig) || revokeLanded;
            } else {
                _relayGrant(uint32(m + 1), _signGrant(uint32(m + 1)));
            }
        }

        IAgentEscrow.GrantInfo memory info = escrow.grantOf(payer, sessionKey);
        if (info.token != address(0)) assertGt(info.epoch, revokeEpoch, "a grant signed before the revoke is live");
        assertGe(info.epoch, revokeEpoch, "the revoke's floor was lowered or never set");
        assertFalse(_keyCanPay(revokeEpoch), "a payment under a revoked epoch settles");
        if (n <= revokeEpoch) {
            assertTrue(revokeLanded, "the revoke never landed");
            assertEq(info.token, address(0), "the key is live after a revoke that covers every grant");
        }
    }
}
