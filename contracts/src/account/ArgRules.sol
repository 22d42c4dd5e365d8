// SPDX-License-Identifier: MIT
pragma solidity ^0.8.26;

import {ArgCondition} from "./SessionKeyTypes.sol";

/**
 * @dev Argument rules of the session-key call policy: read one 32-byte ABI word of a call and compare it.
 *
 * The word of a rule with offset `o` is `callData[4 + o : 4 + o + 32]` (the ABI head slot `o / 32` when `o` is a
 * multiple of 32). A rule whose word does not fit inside `callData` fails: a short calldata can never pass a rule
 * by omission.
 */
library ArgRules {
    /**
     * @dev Returns the 32-byte word `offset` bytes after the selector of `callData`, and whether it lies wholly
     * inside `callData`.
     */
    function wordAt(bytes calldata callData, uint256 offset) internal pure returns (bool found, bytes32 word) {
        assembly ("memory-safe") {
            // An offset below 2**64 keeps `offset + 36` from overflowing (calldata is far shorter than that).
            found := and(lt(offset, 0x10000000000000000), iszero(lt(callData.length, add(offset, 36))))
            if found { word := calldataload(add(callData.offset, add(offset, 4))) }
        }
    }

    /**
     * @dev Compares `word` with the single value of an `Equal` or `LessOrEqual` rule (as `uint256`). `OneOf` is
     * a set lookup done by the caller; this function returns false for it.
     */
    function compare(ArgCondition condition, bytes32 word, bytes32 value) internal pure returns (bool) {
        if (condition == ArgCondition.Equal) return word == value;
        if (condition == ArgCondition.LessOrEqual) return uint256(word) <= uint256(value);
        return false;
    }

    /**
     * @dev Whether the rule `(condition, offset, values)` holds for `callData`, with `OneOf` as a linear scan.
     * The account checks `OneOf` through a storage set instead; this is the reference form, used to validate
     * rules and by tests.
     */
    function matches(ArgCondition condition, uint256 offset, bytes32[] memory values, bytes calldata callData)
        internal
        pure
        returns (bool)
    {
        (bool found, bytes32 word) = wordAt(callData, offset);
        if (!found || values.length == 0) return false;
        if (condition == ArgCondition.OneOf) {
            for (uint256 i = 0; i < values.length; ++i) {
                if (values[i] == word) return true;
            }
            return false;
        }
        return values.length == 1 && compare(condition, word, values[0]);
    }
}
