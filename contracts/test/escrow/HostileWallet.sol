// SPDX-License-Identifier: MIT
pragma solidity ^0.8.26;

/// @dev An ERC-1271 payer that tries to grief a settlement batch: it burns all the gas it is given, or answers with
/// 64 KiB of return data.
contract HostileWallet {
    bool public immutable bloat;

    constructor(bool bloat_) {
        bloat = bloat_;
    }

    function isValidSignature(bytes32, bytes calldata) external view returns (bytes4) {
        if (bloat) {
            assembly {
                mstore(0x00, 0x1626ba7e00000000000000000000000000000000000000000000000000000000)
                return(0x00, 0x10000)
            }
        }
        uint256 x;
        while (gasleft() > 1_000) x = uint256(keccak256(abi.encode(x)));
        return bytes4(uint32(x));
    }
}
