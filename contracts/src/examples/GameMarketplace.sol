// SPDX-License-Identifier: MIT
pragma solidity ^0.8.26;

import {IERC20} from "@openzeppelin/contracts/token/ERC20/IERC20.sol";
import {SafeERC20} from "@openzeppelin/contracts/token/ERC20/utils/SafeERC20.sol";
import {IERC1155} from "@openzeppelin/contracts/token/ERC1155/IERC1155.sol";
import {ERC1155Holder} from "@openzeppelin/contracts/token/ERC1155/utils/ERC1155Holder.sol";
import {ReentrancyGuard} from "@openzeppelin/contracts/utils/ReentrancyGuard.sol";

/**
 * @title GameMarketplace
 * @dev The item market of the gaming example (use case 7): sellers escrow {GameItems} here and buyers pay in
 * {GameGold}.
 *
 * Call-policy friendly by design: every argument a session key could abuse is a static ABI word. `list(id, amount,
 * price)` puts the item id at offset 0 (so `id <= MAX_MATERIAL_ID` keeps Legendary items out), and
 * `buy(listingId, maxPrice)` carries the most the buyer agrees to pay (so `maxPrice <= cap` caps each purchase).
 */
contract GameMarketplace is ERC1155Holder, ReentrancyGuard {
    using SafeERC20 for IERC20;

    struct Listing {
        address seller;
        uint256 id;
        uint256 amount;
        uint256 price;
    }

    /// @notice The currency.
    IERC20 public immutable gold;

    /// @notice The items traded.
    IERC1155 public immutable items;

    uint256 private _nextListingId;
    mapping(uint256 listingId => Listing) private _listings;

    /// @dev `seller` listed `amount` of item `id` for `price` Gold in total.
    event Listed(uint256 indexed listingId, address indexed seller, uint256 indexed id, uint256 amount, uint256 price);

    /// @dev `buyer` bought listing `listingId` from `seller` for `price` Gold.
    event Bought(uint256 indexed listingId, address indexed buyer, address indexed seller, uint256 price);

    /// @dev The seller withdrew listing `listingId`.
    event Cancelled(uint256 indexed listingId);

    /// @dev Listing `listingId` does not exist (never listed, bought or cancelled).
    error GameMarketplaceUnknownListing(uint256 listingId);

    /// @dev The listing costs `price`, more than the buyer's `maxPrice`.
    error GameMarketplacePriceTooHigh(uint256 listingId, uint256 price, uint256 maxPrice);

    /// @dev Only the seller may cancel listing `listingId`.
    error GameMarketplaceNotSeller(uint256 listingId, address caller);

    /// @dev A listing needs a positive amount.
    error GameMarketplaceZeroAmount();

    constructor(IERC20 gold_, IERC1155 items_) {
        gold = gold_;
        items = items_;
    }

    /**
     * @notice Lists `amount` of item `id` for `price` Gold; the items move into the marketplace.
     * @dev Needs `items.setApprovalForAll(marketplace, true)` from the seller. Emits {Listed}.
     */
    function list(uint256 id, uint256 amount, uint256 price) external nonReentrant returns (uint256 listingId) {
        if (amount == 0) revert GameMarketplaceZeroAmount();
        listingId = ++_nextListingId;
        _listings[listingId] = Listing(msg.sender, id, amount, price);
        emit Listed(listingId, msg.sender, id, amount, price);
        items.safeTransferFrom(msg.sender, address(this), id, amount, "");
    }

    /**
     * @notice Buys listing `listingId`, paying at most `maxPrice` Gold.
     * @dev Needs a Gold allowance for the marketplace. Emits {Bought}.
     */
    function buy(uint256 listingId, uint256 maxPrice) external nonReentrant {
        Listing memory entry = _listings[listingId];
        if (entry.seller == address(0)) revert GameMarketplaceUnknownListing(listingId);
        if (entry.price > maxPrice) revert GameMarketplacePriceTooHigh(listingId, entry.price, maxPrice);
        delete _listings[listingId];
        emit Bought(listingId, msg.sender, entry.seller, entry.price);
        gold.safeTransferFrom(msg.sender, entry.seller, entry.price);
        items.safeTransferFrom(address(this), msg.sender, entry.id, entry.amount, "");
    }

    /**
     * @notice Withdraws listing `listingId` and returns the items. Only its seller.
     * @dev Emits {Cancelled}.
     */
    function cancel(uint256 listingId) external nonReentrant {
        Listing memory entry = _listings[listingId];
        if (entry.seller == address(0)) revert GameMarketplaceUnknownListing(listingId);
        if (entry.seller != msg.sender) revert GameMarketplaceNotSeller(listingId, msg.sender);
        delete _listings[listingId];
        emit Cancelled(listingId);
        items.safeTransferFrom(address(this), msg.sender, entry.id, entry.amount, "");
    }

    /// @notice Listing `listingId` (all zero when it does not exist).
    function listing(uint256 listingId) external view returns (Listing memory) {
        return _listings[listingId];
    }
}
