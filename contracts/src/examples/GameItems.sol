// SPDX-License-Identifier: MIT
pragma solidity ^0.8.26;

import {ERC1155} from "@openzeppelin/contracts/token/ERC1155/ERC1155.sol";
import {Ownable} from "@openzeppelin/contracts/access/Ownable.sol";

/**
 * @title GameItems
 * @dev The items of the gaming example (use case 7): an ERC-1155 whose token id carries its rarity in its top
 * byte, `id = uint256(rarity) << 248 | serial`.
 *
 * Because the rarity is part of the id, a session-key call policy can tell items apart with one argument rule and
 * no storage read: `id <= MAX_MATERIAL_ID` admits every Materials item, present and future, and no Rare or
 * Legendary one. A player's bot may then trade Materials freely while every transfer of a Legendary item it signs
 * fails validation on-chain. (An ERC-721 with rarity in storage could not be policed by calldata rules.)
 *
 * {mint} refuses ids whose top byte is not a known rarity, so the encoding cannot be forged.
 */
contract GameItems is ERC1155, Ownable {
    /// @dev Item rarities; the value is the top byte of the token id.
    enum Rarity {
        Material,
        Rare,
        Legendary
    }

    /// @dev Bit position of the rarity byte in a token id.
    uint256 public constant RARITY_SHIFT = 248;

    /// @dev The largest Materials token id: `id <= MAX_MATERIAL_ID` iff the item is a Material.
    uint256 public constant MAX_MATERIAL_ID = (1 << RARITY_SHIFT) - 1;

    /// @dev `id` does not encode a known rarity.
    error GameItemsInvalidId(uint256 id);

    constructor(address studio) ERC1155("") Ownable(studio) {}

    /// @notice The rarity encoded in `id`. Reverts for an id with an unknown rarity byte.
    function rarityOf(uint256 id) public pure returns (Rarity) {
        uint256 rarity = id >> RARITY_SHIFT;
        if (rarity > uint256(type(Rarity).max)) revert GameItemsInvalidId(id);
        return Rarity(rarity);
    }

    /// @notice The token id of item `serial` of `rarity`.
    function itemId(Rarity rarity, uint248 serial) public pure returns (uint256) {
        return (uint256(rarity) << RARITY_SHIFT) | serial;
    }

    /**
     * @notice Mints `amount` of item `id` to `to`. Only the studio; `id` must encode a known rarity.
     * @dev Emits a {TransferSingle} event from the zero address.
     */
    function mint(address to, uint256 id, uint256 amount) external onlyOwner {
        rarityOf(id);
        _mint(to, id, amount, "");
    }
}
