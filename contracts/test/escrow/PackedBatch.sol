// SPDX-License-Identifier: MIT
pragma solidity ^0.8.26;

import {IAgentEscrow} from "../../src/escrow/IAgentEscrow.sol";

/// @dev The test-side encoder of {AgentEscrow-settlePacked}'s batch (see {IAgentEscrow-settlePacked} for the layout).
library PackedBatch {
    function pack(IAgentEscrow.Payment[] memory ps, bytes[] memory sigs) internal pure returns (bytes memory batch) {
        address[] memory table = new address[](3 * ps.length);
        uint256 n;
        bytes memory entries;
        // The previous entry's values: each entry sends its own XOR these (see {IAgentEscrow-settlePacked}).
        IAgentEscrow.Payment memory prev;
        for (uint256 i; i < ps.length; ++i) {
            IAgentEscrow.Payment memory p = ps[i];
            uint8 a;
            uint8 b;
            uint8 c;
            (a, n) = _index(table, n, p.payer);
            (b, n) = _index(table, n, p.payee);
            (c, n) = _index(table, n, p.token);
            entries = abi.encodePacked(
                entries,
                a,
                b,
                c,
                uint96(p.amount ^ prev.amount),
                p.nonce ^ prev.nonce,
                uint32(p.deadline ^ prev.deadline),
                p.epoch ^ prev.epoch,
                uint16(sigs[i].length),
                sigs[i]
            );
            prev = p;
        }
        batch = abi.encodePacked(uint16(ps.length), uint8(n));
        for (uint256 j; j < n; ++j) batch = abi.encodePacked(batch, table[j]);
        batch = abi.encodePacked(batch, entries);
    }

    function _index(address[] memory table, uint256 n, address who) private pure returns (uint8, uint256) {
        for (uint256 j; j < n; ++j) if (table[j] == who) return (uint8(j), n);
        table[n] = who;
        return (uint8(n), n + 1);
    }
}
