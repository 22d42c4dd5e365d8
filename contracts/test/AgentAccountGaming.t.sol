// SPDX-License-Identifier: MIT
pragma solidity ^0.8.26;

import {PackedUserOperation} from "@openzeppelin/contracts/interfaces/IERC4337.sol";
import {Execution} from "@openzeppelin/contracts/interfaces/draft-IERC7579.sol";
import {IERC20} from "@openzeppelin/contracts/token/ERC20/IERC20.sol";
import {IERC1155} from "@openzeppelin/contracts/token/ERC1155/IERC1155.sol";
import {MessageHashUtils} from "@openzeppelin/contracts/utils/cryptography/MessageHashUtils.sol";

import {AccountTestBase} from "./account/AccountTestBase.sol";
import {IAgentAccountSessionKeys} from "../src/account/IAgentAccountSessionKeys.sol";
import {
    ArgCondition,
    ArgRule,
    CallPermission,
    SessionPolicy,
    SessionPolicyKind
} from "../src/account/SessionKeyTypes.sol";
import {GameGold} from "../src/examples/GameGold.sol";
import {GameItems} from "../src/examples/GameItems.sol";
import {GameMarketplace} from "../src/examples/GameMarketplace.sol";

/**
 * @dev Use case 7: a player's bot trades Gold and Materials through a session key, and can never move a Legendary
 * item, whatever it signs.
 */
contract AgentAccountGamingTest is AccountTestBase {
    GameGold internal gold;
    GameItems internal items;
    GameMarketplace internal market;

    address internal bot;
    uint256 internal botPk;
    address internal npc;
    address internal guild;
    address internal thief;

    uint256 internal wood;
    uint256 internal iron;
    uint256 internal sword; // Legendary
    uint256 internal shield; // Rare

    uint256 internal constant APPROVE_CAP = 500 ether;
    uint256 internal constant TIP_CAP = 100 ether;
    uint256 internal constant PRICE_CAP = 200 ether;

    function setUp() public override {
        super.setUp();
        callGasLimit = 1_000_000;
        (bot, botPk) = makeAddrAndKey("bot");
        npc = makeAddr("npc");
        guild = makeAddr("guild");
        thief = makeAddr("thief");

        gold = new GameGold(address(this));
        items = new GameItems(address(this));
        market = new GameMarketplace(IERC20(address(gold)), IERC1155(address(items)));

        wood = items.itemId(GameItems.Rarity.Material, 1);
        iron = items.itemId(GameItems.Rarity.Material, 2);
        sword = items.itemId(GameItems.Rarity.Legendary, 1);
        shield = items.itemId(GameItems.Rarity.Rare, 1);

        gold.mint(address(account), 1000 ether);
        items.mint(address(account), wood, 10);
        items.mint(address(account), sword, 1);
        items.mint(address(account), shield, 1);
        items.mint(npc, iron, 3);

        vm.startPrank(npc);
        items.setApprovalForAll(address(market), true);
        market.list(iron, 3, 150 ether); // listing 1
        vm.stopPrank();

        _install(bot, _botPolicy());
    }

    /// @dev The bot's grant: Gold, Materials and the marketplace, a 7-day session, 20 ops per hour, 0.05 ETH of gas.
    function _botPolicy() internal view returns (SessionPolicy memory policy) {
        bytes32 maxMaterial = bytes32(items.MAX_MATERIAL_ID());
        CallPermission[] memory permissions = new CallPermission[](7);

        ArgRule[] memory approve = new ArgRule[](2);
        approve[0] = _rule(ArgCondition.Equal, 0, bytes32(uint256(uint160(address(market)))));
        approve[1] = _rule(ArgCondition.LessOrEqual, 32, bytes32(APPROVE_CAP));
        permissions[0] = _permission(address(gold), IERC20.approve.selector, 0, approve);

        bytes32[] memory payees = new bytes32[](2);
        payees[0] = bytes32(uint256(uint160(guild)));
        payees[1] = bytes32(uint256(uint160(npc)));
        ArgRule[] memory tip = new ArgRule[](2);
        tip[0] = _oneOf(0, payees);
        tip[1] = _rule(ArgCondition.LessOrEqual, 32, bytes32(TIP_CAP));
        permissions[1] = _permission(address(gold), IERC20.transfer.selector, 0, tip);

        ArgRule[] memory operator = new ArgRule[](2);
        operator[0] = _rule(ArgCondition.Equal, 0, bytes32(uint256(uint160(address(market)))));
        operator[1] = _rule(ArgCondition.Equal, 32, bytes32(uint256(1)));
        permissions[2] = _permission(address(items), IERC1155.setApprovalForAll.selector, 0, operator);

        // safeTransferFrom(from, to, id, value, data): from == account, id <= MAX_MATERIAL_ID.
        ArgRule[] memory transfer = new ArgRule[](2);
        transfer[0] = _rule(ArgCondition.Equal, 0, bytes32(uint256(uint160(address(account)))));
        transfer[1] = _rule(ArgCondition.LessOrEqual, 64, maxMaterial);
        permissions[3] = _permission(address(items), IERC1155.safeTransferFrom.selector, 0, transfer);

        ArgRule[] memory listRules = new ArgRule[](1);
        listRules[0] = _rule(ArgCondition.LessOrEqual, 0, maxMaterial);
        permissions[4] = _permission(address(market), GameMarketplace.list.selector, 0, listRules);

        ArgRule[] memory buyRules = new ArgRule[](1);
        buyRules[0] = _rule(ArgCondition.LessOrEqual, 32, bytes32(PRICE_CAP));
        permissions[5] = _permission(address(market), GameMarketplace.buy.selector, 0, buyRules);

        permissions[6] = _permission(address(market), GameMarketplace.cancel.selector, 0, new ArgRule[](0));

        policy = SessionPolicy({
            validAfter: 0,
            validUntil: uint48(block.timestamp + 7 days),
            maxUses: 0,
            interval: 1 hours,
            maxUsesPerInterval: 20,
            gasBudget: 0.05 ether,
            permissions: permissions
        });
    }

    function _botOp(bytes memory callData) internal view returns (PackedUserOperation memory) {
        return _signSession(_op(callData), bot, botPk, uint48(block.timestamp / 1 hours));
    }

    function _transfer(uint256 id, address to) internal view returns (Execution memory) {
        return _call(address(items), 0, abi.encodeCall(IERC1155.safeTransferFrom, (address(account), to, id, 1, "")));
    }

    // ------------------------------------------------------------------ what the bot may do

    function test_BotTradesInOneBatch() public {
        // harvest → buy → list, as one UserOperation
        Execution[] memory calls = new Execution[](4);
        calls[0] = _call(address(gold), 0, abi.encodeCall(IERC20.approve, (address(market), 150 ether)));
        calls[1] = _call(address(market), 0, abi.encodeCall(GameMarketplace.buy, (1, 150 ether)));
        calls[2] = _call(address(items), 0, abi.encodeCall(IERC1155.setApprovalForAll, (address(market), true)));
        calls[3] = _call(address(market), 0, abi.encodeCall(GameMarketplace.list, (wood, 5, 80 ether)));
        _handle(_botOp(_execute(calls)));

        assertEq(items.balanceOf(address(account), iron), 3);
        assertEq(items.balanceOf(address(account), wood), 5);
        assertEq(gold.balanceOf(address(account)), 850 ether);
        assertEq(gold.balanceOf(npc), 150 ether);
        assertEq(market.listing(2).id, wood);
    }

    function test_BotMovesMaterialsAndTipsGold() public {
        Execution[] memory calls = new Execution[](2);
        calls[0] = _transfer(wood, guild);
        calls[1] = _call(address(gold), 0, abi.encodeCall(IERC20.transfer, (guild, 100 ether)));
        _handle(_botOp(_execute(calls)));
        assertEq(items.balanceOf(guild, wood), 1);
        assertEq(gold.balanceOf(guild), 100 ether);
    }

    // ------------------------------------------------------------------ what it may not

    function test_BotCannotTransferLegendary() public {
        Execution[] memory calls = new Execution[](1);
        calls[0] = _transfer(sword, thief);
        _handleViolation(_botOp(_execute(calls)), bot, SessionPolicyKind.Argument, 0, 1);
        calls[0] = _transfer(shield, thief);
        _handleViolation(_botOp(_execute(calls)), bot, SessionPolicyKind.Argument, 0, 1);
        assertEq(items.balanceOf(address(account), sword), 1);
    }

    function test_LegendaryHiddenInABatchStopsTheWholeOperation() public {
        Execution[] memory calls = new Execution[](3);
        calls[0] = _transfer(wood, guild);
        calls[1] = _call(address(gold), 0, abi.encodeCall(IERC20.transfer, (guild, 1 ether)));
        calls[2] = _transfer(sword, guild);
        _handleViolation(_botOp(_execute(calls)), bot, SessionPolicyKind.Argument, 2, 1);
        assertEq(items.balanceOf(guild, wood), 0);
        assertEq(gold.balanceOf(guild), 0);
    }

    function test_BotCannotListLegendary() public {
        Execution[] memory calls = new Execution[](2);
        calls[0] = _call(address(items), 0, abi.encodeCall(IERC1155.setApprovalForAll, (address(market), true)));
        calls[1] = _call(address(market), 0, abi.encodeCall(GameMarketplace.list, (sword, 1, 1)));
        _handleViolation(_botOp(_execute(calls)), bot, SessionPolicyKind.Argument, 1, 0);
    }

    function test_BotCannotUseBatchTransfer() public {
        uint256[] memory ids = new uint256[](2);
        ids[0] = wood;
        ids[1] = sword;
        uint256[] memory amounts = new uint256[](2);
        amounts[0] = 1;
        amounts[1] = 1;
        bytes memory data = abi.encodeCall(IERC1155.safeBatchTransferFrom, (address(account), thief, ids, amounts, ""));
        _handleViolation(_botOp(_execute1(address(items), 0, data)), bot, SessionPolicyKind.Call, 0, 0);
    }

    function test_BotCannotApproveAnotherOperator() public {
        bytes memory data = abi.encodeCall(IERC1155.setApprovalForAll, (thief, true));
        _handleViolation(_botOp(_execute1(address(items), 0, data)), bot, SessionPolicyKind.Argument, 0, 0);
    }

    function test_BotCannotTransferFromAnotherAccount() public {
        // `from` is pinned to the account, so an operator approval elsewhere cannot be abused either.
        bytes memory data = abi.encodeCall(IERC1155.safeTransferFrom, (npc, thief, iron, 1, ""));
        _handleViolation(_botOp(_execute1(address(items), 0, data)), bot, SessionPolicyKind.Argument, 0, 0);
    }

    function test_BotCannotOverpayOrTipOutsiders() public {
        Execution[] memory calls = new Execution[](2);
        calls[0] = _call(address(gold), 0, abi.encodeCall(IERC20.approve, (address(market), 500 ether)));
        calls[1] = _call(address(market), 0, abi.encodeCall(GameMarketplace.buy, (1, PRICE_CAP + 1)));
        _handleViolation(_botOp(_execute(calls)), bot, SessionPolicyKind.Argument, 1, 0);

        bytes memory tip = abi.encodeCall(IERC20.transfer, (thief, 1 ether));
        _handleViolation(_botOp(_execute1(address(gold), 0, tip)), bot, SessionPolicyKind.Argument, 0, 0);
        tip = abi.encodeCall(IERC20.transfer, (guild, TIP_CAP + 1));
        _handleViolation(_botOp(_execute1(address(gold), 0, tip)), bot, SessionPolicyKind.Argument, 0, 1);
    }

    function test_SessionExpiresAfterSevenDays() public {
        Execution[] memory calls = new Execution[](1);
        calls[0] = _transfer(wood, guild);
        uint256 validUntil = block.timestamp + 7 days;
        // Just after expiry, in the hour window that contains validUntil: the EntryPoint rejects it (AA22).
        vm.warp(validUntil + 1);
        if (validUntil / 1 hours == block.timestamp / 1 hours) {
            _handleFailedOp(_botOp(_execute(calls)), "AA22 expired or not due");
        }
        // A window wholly after validUntil can never execute: the account says so (Timestamp).
        vm.warp(validUntil + 1 hours);
        _handleViolation(_botOp(_execute(calls)), bot, SessionPolicyKind.Timestamp, 0, 0);
    }

    function test_OwnerStillMovesLegendary() public {
        Execution[] memory calls = new Execution[](1);
        calls[0] = _transfer(sword, owner);
        _handle(_signOwner(_op(_execute(calls))));
        assertEq(items.balanceOf(owner, sword), 1);
    }

    // ------------------------------------------------------------------ fuzz: the rule is exactly "Materials only"

    function testFuzz_OnlyMaterialsPass(uint8 rarity, uint248 serial) public {
        rarity = uint8(bound(rarity, 0, 2));
        uint256 id = items.itemId(GameItems.Rarity(rarity), serial);
        bytes memory callData = _execute1(
            address(items), 0, abi.encodeCall(IERC1155.safeTransferFrom, (address(account), thief, id, 1, ""))
        );
        PackedUserOperation memory op = _op(callData);
        bytes32 hash = keccak256(callData);
        op.signature = abi.encodePacked(
            bot, uint48(block.timestamp / 1 hours), signPacked(botPk, MessageHashUtils.toEthSignedMessageHash(hash))
        );
        vm.prank(address(ENTRYPOINT));
        try account.validateUserOp(op, hash, 0) {
            assertEq(uint8(items.rarityOf(id)), uint8(GameItems.Rarity.Material));
        } catch (bytes memory reason) {
            assertTrue(items.rarityOf(id) != GameItems.Rarity.Material);
            assertEq(
                reason,
                abi.encodeWithSelector(
                    IAgentAccountSessionKeys.SessionKeyPolicyViolation.selector, bot, SessionPolicyKind.Argument, 0, 1
                )
            );
        }
    }

    function test_ItemsRejectUnknownRarity() public {
        uint256 bogus = uint256(3) << 248;
        vm.expectRevert(abi.encodeWithSelector(GameItems.GameItemsInvalidId.selector, bogus));
        items.mint(address(account), bogus, 1);
    }
}
