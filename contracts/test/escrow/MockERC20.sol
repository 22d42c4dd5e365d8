// SPDX-License-Identifier: MIT
pragma solidity ^0.8.26;

import {ERC20} from "@openzeppelin/contracts/token/ERC20/ERC20.sol";

/**
 * @dev Test token with open minting and a USDC-style blocklist: transfers to or from a blocked address revert,
 * which is how the escrow's deferred-payout path is exercised.
 */
contract MockERC20 is ERC20 {
    mapping(address account => bool) public blocked;

    error MockERC20Blocked(address account);

    constructor(string memory name, string memory symbol) ERC20(name, symbol) {}

    function mint(address to, uint256 amount) external {
        _mint(to, amount);
    }

    function setBlocked(address account, bool isBlocked) external {
        blocked[account] = isBlocked;
    }

    function _update(address from, address to, uint256 value) internal override {
        require(!blocked[from], MockERC20Blocked(from));
        require(!blocked[to], MockERC20Blocked(to));
        super._update(from, to, value);
    }
}
