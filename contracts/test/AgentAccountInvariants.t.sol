// SPDX-License-Identifier: MIT
pragma solidity ^0.8.26;

import {IEntryPoint, PackedUserOperation} from "@openzeppelin/contracts/interfaces/IERC4337.sol";
import {IEntryPointExtra} from "@openzeppelin/contracts/account/utils/ERC4337Utils.sol";
import {Execution} from "@openzeppelin/contracts/interfaces/draft-IERC7579.sol";
import {IERC7821} from "@openzeppelin/contracts/interfaces/draft-IERC7821.sol";
import {MessageHashUtils} from "@openzeppelin/contracts/utils/cryptography/MessageHashUtils.sol";

import {Test} from "./utils/Test.sol";
import {AccountTestBase} from "./account/AccountTestBase.sol";
import {AgentAccount} from "../src/account/AgentAccount.sol";
import {ArgRule, CallPermission, SessionPolicy} from "../src/account/SessionKeyTypes.sol";

/// @dev Counts executions per rate-limit window, by the block time at which they ran.
contract WindowCounter {
    uint256 public immutable interval;
    uint256 public total;
    uint256 public maxInAnyWindow;
    mapping(uint256 window => uint256) public inWindow;

    constructor(uint256 interval_) {
        interval = interval_;
    }

    function ping() external {
        uint256 n = ++inWindow[block.timestamp / interval];
        if (n > maxInAnyWindow) maxInAnyWindow = n;
        total += 1;
    }
}

/// @dev Drives a session key through the EntryPoint with random time jumps, window claims and gas prices.
contract SessionKeyHandler is Test {
    IEntryPoint internal constant ENTRYPOINT = IEntryPoint(0x0000000071727De22E5E9d8BAf0edAc6f37da032);

    AgentAccount public immutable account;
    WindowCounter public immutable counter;
    address public immutable key;
    uint256 internal immutable keyPk;
    uint256 public attempts;
    uint256 public landed;

    constructor(AgentAccount account_, WindowCounter counter_, address key_, uint256 keyPk_) {
        account = account_;
        counter = counter_;
        key = key_;
        keyPk = keyPk_;
    }

    function submit(uint256 warpBy, uint256 windowChoice, uint256 fee, uint256 lane) external {
        vm.warp(block.timestamp + bound(warpBy, 0, 3 * counter.interval()));
        uint256 current = block.timestamp / counter.interval();
        // Claim the current window most of the time, else the previous or the next one.
        uint256 choice = windowChoice % 8;
        uint48 window = uint48(choice == 6 ? current - 1 : choice == 7 ? current + 1 : current);

        Execution[] memory calls = new Execution[](1);
        calls[0] = Execution(address(counter), 0, abi.encodeCall(WindowCounter.ping, ()));
        PackedUserOperation memory op;
        op.sender = address(account);
        op.nonce = ENTRYPOINT.getNonce(address(account), uint192(lane % 4));
        op.callData = abi.encodeCall(IERC7821.execute, (bytes32(uint256(0x01) << 248), abi.encode(calls)));
        op.accountGasLimits = bytes32((uint256(300_000) << 128) | 100_000);
        op.preVerificationGas = 50_000;
        op.gasFees = bytes32((uint256(1) << 128) | bound(fee, 1, 3 gwei));
        bytes32 hash = IEntryPointExtra(address(ENTRYPOINT)).getUserOpHash(op);
        op.signature = abi.encodePacked(key, window, signPacked(keyPk, MessageHashUtils.toEthSignedMessageHash(hash)));

        PackedUserOperation[] memory ops = new PackedUserOperation[](1);
        ops[0] = op;
        attempts += 1;
        try ENTRYPOINT.handleOps(ops, payable(address(this))) {
            landed += 1;
        } catch {}
    }

    receive() external payable {}
}

/**
 * @dev Whatever sequence of operations, claims and clock jumps: no window ever sees more than
 * `maxUsesPerInterval` executions, the lifetime count and the gas budget hold, and every landed operation ran.
 */
contract AgentAccountInvariantsTest is AccountTestBase {
    uint256 internal constant INTERVAL = 600;
    uint32 internal constant PER_WINDOW = 3;
    uint32 internal constant MAX_USES = 40;
    uint128 internal constant BUDGET = 0.02 ether; // ~15-45 operations, depending on their fee

    WindowCounter internal counter;
    SessionKeyHandler internal handler;

    function setUp() public override {
        super.setUp();
        (address key, uint256 keyPk) = makeAddrAndKey("session");
        counter = new WindowCounter(INTERVAL);
        CallPermission[] memory permissions = new CallPermission[](1);
        permissions[0] = _permission(address(counter), WindowCounter.ping.selector, 0, new ArgRule[](0));
        SessionPolicy memory policy = _policy(permissions);
        policy.interval = uint48(INTERVAL);
        policy.maxUsesPerInterval = PER_WINDOW;
        policy.maxUses = MAX_USES;
        policy.gasBudget = BUDGET;
        _install(key, policy);

        handler = new SessionKeyHandler(account, counter, key, keyPk);
        targetContract(address(handler));
    }

    /// @dev The handler is not vacuous: operations land, and the limits bite.
    function test_HandlerLandsAndIsLimited() public {
        for (uint256 i = 0; i < 12; ++i) {
            handler.submit(0, 0, 1 gwei, i);
        }
        assertEq(handler.landed(), PER_WINDOW);
        handler.submit(INTERVAL, 0, 1 gwei, 0);
        assertEq(handler.landed(), PER_WINDOW + 1);
    }

    function invariant_AtMostNPerWindow() public view {
        assertLe(counter.maxInAnyWindow(), PER_WINDOW);
    }

    function invariant_LifetimeUsesAndGasBudget() public view {
        assertLe(counter.total(), MAX_USES);
        assertEq(account.sessionKey(handler.key()).uses, counter.total());
        assertLe(account.sessionKey(handler.key()).gasSpent, BUDGET);
    }

    function invariant_EveryLandedOperationRan() public view {
        assertEq(handler.landed(), counter.total());
    }
}
