// SPDX-License-Identifier: MIT
pragma solidity ^0.8.26;

import {ERC20} from "@openzeppelin/contracts/token/ERC20/ERC20.sol";
import {Ownable} from "@openzeppelin/contracts/access/Ownable.sol";

/**
 * @title GameGold
 * @dev The in-game currency of the gaming example (use case 7): a plain ERC-20 the game studio mints.
 */
contract GameGold is ERC20, Ownable {
    constructor(address studio) ERC20("Game Gold", "GOLD") Ownable(studio) {}

    /**
     * @notice Mints `amount` Gold to `to`. Only the studio.
     * @dev Emits a {Transfer} event from the zero address.
     */
    function mint(address to, uint256 amount) external onlyOwner {
        _mint(to, amount);
    }
}
