// SPDX-License-Identifier: MIT
pragma solidity ^0.8.26;

import {IERC1271} from "@openzeppelin/contracts/interfaces/IERC1271.sol";
import {Address} from "@openzeppelin/contracts/utils/Address.sol";
import {ECDSA} from "@openzeppelin/contracts/utils/cryptography/ECDSA.sol";

/**
 * @title ERC1271Wallet
 * @dev A minimal smart-wallet payer for tests: it holds tokens, accepts as its own (ERC-1271) any signature
 * that its owner EOA made over the digest, and lets the owner make arbitrary calls.
 *
 * WARNING: Test mock. The digest is checked as-is, with no ERC-7739 rehashing, so one owner signature is
 * valid for every wallet sharing that owner. Real accounts (see AgentAccount) bind signatures to the account.
 */
contract ERC1271Wallet is IERC1271 {
    /// @notice The EOA whose signatures this wallet accepts and who may call {execute}.
    address public immutable owner;

    /// @dev `caller` is not the {owner}.
    error ERC1271WalletUnauthorized(address caller);

    /// @dev The {owner} made the wallet call `target` with `value` wei and `data`.
    event Executed(address indexed target, uint256 value, bytes data);

    constructor(address owner_) {
        owner = owner_;
    }

    /// @notice Accepts ETH, so tests can fund the wallet.
    receive() external payable {}

    /**
     * @notice ERC-1271: returns the magic value `0x1626ba7e` when `signature` is the owner's ECDSA signature
     * of `hash`, and `0xffffffff` otherwise (never reverts, as the standard recommends).
     */
    function isValidSignature(bytes32 hash, bytes calldata signature) external view returns (bytes4) {
        (address recovered, ECDSA.RecoverError err,) = ECDSA.tryRecoverCalldata(hash, signature);
        bool valid = err == ECDSA.RecoverError.NoError && recovered == owner;
        return valid ? this.isValidSignature.selector : bytes4(0xffffffff);
    }

    /**
     * @notice Calls `target` with `value` wei and `data` from the wallet; owner only. Bubbles up reverts.
     * @dev Emits {Executed}.
     */
    function execute(address target, uint256 value, bytes calldata data) external returns (bytes memory result) {
        require(msg.sender == owner, ERC1271WalletUnauthorized(msg.sender));
        result = Address.functionCallWithValue(target, data, value);
        emit Executed(target, value, data);
    }
}
