// SPDX-License-Identifier: MIT
pragma solidity ^0.8.26;

/**
 * @dev The `bytes signature` overload of ERC-3009 `receiveWithAuthorization` that USDC v2.2 (and our TestUSDC)
 * expose next to the `v, r, s` one. OpenZeppelin's {IERC3009} declares only the latter; this overload is the one
 * that lets an ERC-1271 smart account authorise a deposit.
 */
interface IERC3009Receive {
    /// @notice Moves `value` from `from` to the caller (`to` must be the caller), authorised by `from`'s signature.
    function receiveWithAuthorization(
        address from,
        address to,
        uint256 value,
        uint256 validAfter,
        uint256 validBefore,
        bytes32 nonce,
        bytes calldata signature
    ) external;
}
