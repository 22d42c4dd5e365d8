// SPDX-License-Identifier: MIT
pragma solidity ^0.8.26;

import {IEntryPoint, IPaymaster, PackedUserOperation} from "@openzeppelin/contracts/interfaces/IERC4337.sol";
import {Math} from "@openzeppelin/contracts/utils/math/Math.sol";

import {Vm} from "./utils/Test.sol";
import {AccountTestBase} from "./account/AccountTestBase.sol";
import {AgentPaymaster} from "../src/paymaster/AgentPaymaster.sol";
import {TestUSDC} from "../src/TestUSDC.sol";

/// @dev The token-mode charge event of OpenZeppelin's PaymasterERC20 (declared for log matching).
interface IPaymasterERC20Events {
    event UserOperationSponsored(
        bytes32 indexed userOpHash, address indexed token, uint256 tokenAmount, uint256 tokenPerNative
    );
}

/**
 * @dev AgentPaymaster on the real EntryPoint v0.7: it pays only for operations its sponsor key signed, a signature
 * serves one operation, an account cannot make it pay past the signed spend limit, and token mode charges the
 * account exactly the gas used at the signed price.
 */
contract AgentPaymasterTest is AccountTestBase, IPaymasterERC20Events {
    uint128 internal constant PM_VERIFICATION_GAS = 120_000;
    uint128 internal constant PM_POST_OP_GAS = 60_000;
    uint256 internal constant PRICE = 3_000e6; // USDC units per ETH
    uint256 internal constant DEPOSIT = 10 ether;

    AgentPaymaster internal paymaster;
    TestUSDC internal usdc;
    address internal sponsor;
    uint256 internal sponsorKey;
    address internal pmOwner;

    function setUp() public override {
        super.setUp();
        (sponsor, sponsorKey) = makeAddrAndKey("sponsor");
        pmOwner = makeAddr("paymaster owner");
        paymaster = new AgentPaymaster(ENTRYPOINT, sponsor, pmOwner);
        paymaster.addDeposit{value: DEPOSIT}();
        usdc = new TestUSDC();
        vm.deal(address(account), 0); // the agent holds no ETH at all
    }

    // ------------------------------------------------------------------ helpers

    function _terms(AgentPaymaster.Mode mode, uint128 spendLimit, uint256 price)
        internal
        view
        returns (AgentPaymaster.Terms memory terms)
    {
        terms.mode = mode;
        terms.validUntil = uint48(block.timestamp + 600);
        terms.spendLimit = spendLimit;
        if (mode == AgentPaymaster.Mode.Token) {
            terms.token = address(usdc);
            terms.tokenPerNative = price;
        }
    }

    function _encodeTerms(AgentPaymaster.Terms memory t) internal pure returns (bytes memory) {
        return abi.encodePacked(uint8(t.mode), t.validAfter, t.validUntil, t.spendLimit, t.token, t.tokenPerNative);
    }

    /// @dev `op` sponsored under `terms`, signed by `key` (then by the account's owner).
    function _sponsor(PackedUserOperation memory op, AgentPaymaster.Terms memory terms, uint256 key)
        internal
        view
        returns (PackedUserOperation memory)
    {
        // the header first: the sponsor signs the paymaster gas limits too
        op.paymasterAndData = abi.encodePacked(address(paymaster), PM_VERIFICATION_GAS, PM_POST_OP_GAS);
        bytes32 digest = paymaster.sponsorshipHash(op, terms);
        op.paymasterAndData = abi.encodePacked(op.paymasterAndData, _encodeTerms(terms), signPacked(key, digest));
        return _signOwner(op);
    }

    function _verifying(bytes memory callData, uint128 limit) internal view returns (PackedUserOperation memory) {
        return _sponsor(_op(callData), _terms(AgentPaymaster.Mode.Verifying, limit, 0), sponsorKey);
    }

    /// @dev Runs `op` and returns the `actualGasCost` its UserOperationEvent reports.
    function _run(PackedUserOperation memory op) internal returns (uint256 actualGasCost, bool success) {
        vm.recordLogs();
        _handle(op);
        Vm.Log[] memory logs = vm.getRecordedLogs();
        for (uint256 i = 0; i < logs.length; ++i) {
            if (logs[i].topics[0] == UserOperationEvent.selector) {
                (, success, actualGasCost,) = abi.decode(logs[i].data, (uint256, bool, uint256, uint256));
                return (actualGasCost, success);
            }
        }
        revert("no UserOperationEvent");
    }

    function _erc20Cost(uint256 nativeCost, uint256 price) internal pure returns (uint256) {
        return Math.mulDiv(nativeCost, price, 1e18, Math.Rounding.Ceil);
    }

    // ------------------------------------------------------------------ verifying mode

    function test_verifying_sponsorPaysExactlyTheReceiptsCost() public {
        uint256 depositBefore = paymaster.deposit();
        (uint256 cost, bool success) = _run(_verifying(_recordCall(1, 2), 1 ether));
        assertTrue(success, "the operation ran");
        assertEq(recorder.calls(), 1);
        assertEq(address(account).balance, 0, "the account never held ETH");
        assertEq(depositBefore - paymaster.deposit(), cost, "the deposit paid exactly the receipt's cost");
        assertGe(paymaster.sponsoredSpent(address(account)), cost, "the limit counts at least the real cost");
    }

    function test_verifying_neverPaysForAnUnapprovedOperation() public {
        uint256 depositBefore = paymaster.deposit();
        (, uint256 otherKey) = makeAddrAndKey("not the sponsor");
        // signed by another key
        PackedUserOperation memory op =
            _sponsor(_op(_recordCall(1, 2)), _terms(AgentPaymaster.Mode.Verifying, 1 ether, 0), otherKey);
        _handleFailedOp(op, "AA34 signature error");
        // signed by the sponsor, then altered: other calldata, higher fees, bigger limit
        op = _verifying(_recordCall(1, 2), 1 ether);
        op.callData = _recordCall(6, 6);
        _handleFailedOp(_signOwner(op), "AA34 signature error");
        op = _verifying(_recordCall(1, 2), 1 ether);
        op.gasFees = bytes32((PRIORITY_FEE << 128) | (MAX_FEE * 10));
        _handleFailedOp(_signOwner(op), "AA34 signature error");
        op = _verifying(_recordCall(1, 2), 1 ether);
        op.paymasterAndData[52 + 13] = 0xff; // spendLimit's high byte
        _handleFailedOp(_signOwner(op), "AA34 signature error");
        // no paymaster data at all
        op = _op(_recordCall(1, 2));
        op.paymasterAndData = abi.encodePacked(address(paymaster), PM_VERIFICATION_GAS, PM_POST_OP_GAS);
        op = _signOwner(op);
        vm.expectRevert(
            abi.encodeWithSelector(
                IEntryPoint.FailedOpWithRevert.selector,
                0,
                "AA33 reverted",
                abi.encodeWithSelector(AgentPaymaster.AgentPaymasterMalformedData.selector, 0)
            )
        );
        _handle(op);
        assertEq(paymaster.deposit(), depositBefore, "nothing was paid");
        assertEq(recorder.calls(), 0);
    }

    function test_verifying_signatureIsNotReusable() public {
        PackedUserOperation memory op = _verifying(_recordCall(1, 2), 1 ether);
        _handle(op);
        // the same sponsorship on the next nonce of the same account
        PackedUserOperation memory again = _op(_recordCall(1, 2));
        again.paymasterAndData = op.paymasterAndData;
        _handleFailedOp(_signOwner(again), "AA34 signature error");
        // the same operation replayed as is: the EntryPoint nonce is spent
        _handleFailedOp(op, "AA25 invalid account nonce");
        // on another account of the same owner, at the same nonce
        address other = factory.createAccount(owner, 1);
        PackedUserOperation memory elsewhere = _op(other, ENTRYPOINT.getNonce(other, 0), _recordCall(1, 2));
        elsewhere.paymasterAndData = op.paymasterAndData;
        _handleFailedOp(_signOwner(elsewhere), "AA34 signature error");
        assertEq(recorder.calls(), 1);
    }

    function test_verifying_expiredSponsorshipIsRefused() public {
        AgentPaymaster.Terms memory terms = _terms(AgentPaymaster.Mode.Verifying, 1 ether, 0);
        terms.validUntil = uint48(block.timestamp - 1);
        _handleFailedOp(_sponsor(_op(_recordCall(1, 2)), terms, sponsorKey), "AA32 paymaster expired or not due");
    }

    /// @dev However many operations an account sends, the sponsor's deposit pays at most the signed limit.
    function testFuzz_verifying_cannotDrainPastTheLimit(uint128 limit, uint8 attempts) public {
        limit = uint128(bound(limit, 0, 0.01 ether));
        attempts = uint8(bound(attempts, 1, 12));
        uint256 depositBefore = paymaster.deposit();
        uint256 paid;
        for (uint256 i = 0; i < attempts; ++i) {
            PackedUserOperation memory op = _verifying(_recordCall(i, i), limit);
            uint256 maxCost =
                (VERIFICATION_GAS + CALL_GAS + PRE_VERIFICATION_GAS + PM_VERIFICATION_GAS + PM_POST_OP_GAS) * MAX_FEE;
            uint256 spent = paymaster.sponsoredSpent(address(account));
            if (spent + maxCost > limit) {
                vm.expectRevert(
                    abi.encodeWithSelector(
                        IEntryPoint.FailedOpWithRevert.selector,
                        0,
                        "AA33 reverted",
                        abi.encodeWithSelector(
                            AgentPaymaster.AgentPaymasterSpendLimit.selector, address(account), spent, maxCost, limit
                        )
                    )
                );
                _handle(op);
            } else {
                (uint256 cost,) = _run(op);
                paid += cost;
            }
            assertLe(paymaster.sponsoredSpent(address(account)), limit, "the running total stays within the limit");
        }
        assertEq(depositBefore - paymaster.deposit(), paid, "the deposit paid the receipts' costs");
        assertLe(paid, limit, "never past the limit");
        assertLe(paid, paymaster.sponsoredSpent(address(account)), "the limit counted at least what was paid");
    }

    // ------------------------------------------------------------------ token mode

    function _tokenOp(bytes memory callData, uint256 price) internal view returns (PackedUserOperation memory) {
        return _sponsor(_op(callData), _terms(AgentPaymaster.Mode.Token, 0, price), sponsorKey);
    }

    function _fundTokens(uint256 amount) internal {
        usdc.mint(address(account), amount);
        vm.prank(address(account));
        usdc.approve(address(paymaster), type(uint256).max);
    }

    function test_token_accountWithNoEthPaysInTheToken() public {
        _fundTokens(100e6);
        uint256 depositBefore = paymaster.deposit();
        PackedUserOperation memory op = _tokenOp(_recordCall(3, 4), PRICE);
        bytes32 userOpHash = _hash(op);
        vm.recordLogs();
        _handle(op);
        Vm.Log[] memory logs = vm.getRecordedLogs();
        uint256 charged;
        uint256 gasCost;
        for (uint256 i = 0; i < logs.length; ++i) {
            if (logs[i].topics[0] == UserOperationSponsored.selector) {
                assertEq(logs[i].topics[1], userOpHash);
                (charged,) = abi.decode(logs[i].data, (uint256, uint256));
            } else if (logs[i].topics[0] == UserOperationEvent.selector) {
                (,, gasCost,) = abi.decode(logs[i].data, (uint256, bool, uint256, uint256));
            }
        }
        assertEq(recorder.calls(), 1);
        assertEq(address(account).balance, 0);
        assertEq(100e6 - usdc.balanceOf(address(account)), charged, "the account paid what the event says");
        assertEq(usdc.balanceOf(address(paymaster)), charged, "and the paymaster received it");
        assertEq(depositBefore - paymaster.deposit(), gasCost, "the deposit paid the receipt's gas");
        assertGe(charged, _erc20Cost(gasCost, PRICE), "the token charge covers the gas at the signed price");
    }

    function test_token_unsignedPriceIsRefused() public {
        _fundTokens(100e6);
        PackedUserOperation memory op = _tokenOp(_recordCall(3, 4), PRICE);
        op.paymasterAndData[52 + 80] = 0x01; // a lower price than signed
        _handleFailedOp(_signOwner(op), "AA34 signature error");
        assertEq(usdc.balanceOf(address(account)), 100e6);
    }

    function test_token_withoutAllowanceIsRefused() public {
        usdc.mint(address(account), 100e6);
        _handleFailedOp(_tokenOp(_recordCall(3, 4), PRICE), "AA34 signature error");
    }

    /**
     * @dev The charge, exactly: for whatever gas the EntryPoint reports to `postOp`, the account ends up paying
     * `ceil((actualGasCost + (30_000 + postOpGasLimit / 10) * feePerGas) * price / 1e18)` and gets the rest of its
     * pre-charge back.
     */
    function testFuzz_token_chargesExactlyTheGasUsedAtTheSignedPrice(uint256 price, uint256 gasUsed, uint256 fee)
        public
    {
        price = bound(price, 1e6, 1e12);
        fee = bound(fee, 1, MAX_FEE);
        _fundTokens(1e18);
        PackedUserOperation memory op = _tokenOp(_recordCall(3, 4), price);
        uint256 maxCost =
            (VERIFICATION_GAS + CALL_GAS + PRE_VERIFICATION_GAS + PM_VERIFICATION_GAS + PM_POST_OP_GAS) * MAX_FEE;
        gasUsed = bound(gasUsed, 0, maxCost / MAX_FEE);
        bytes32 userOpHash = _hash(op);

        vm.prank(address(ENTRYPOINT));
        (bytes memory context, uint256 validationData) = paymaster.validatePaymasterUserOp(op, userOpHash, maxCost);
        assertEq(uint160(validationData), 0, "the signature holds");
        uint256 afterPrefund = usdc.balanceOf(address(account));

        vm.prank(address(ENTRYPOINT));
        paymaster.postOp(IPaymaster.PostOpMode.opSucceeded, context, gasUsed * fee, fee);
        uint256 expected = _erc20Cost(gasUsed * fee + (30_000 + _penalty(gasUsed)) * fee, price);
        assertEq(1e18 - usdc.balanceOf(address(account)), expected, "charged exactly the gas at the price");
        assertEq(usdc.balanceOf(address(paymaster)), expected);
        assertLe(1e18 - afterPrefund, 1e18, "the prefund was taken during validation");
    }

    /// @dev The v0.7 unused-gas penalty bound the paymaster charges, from the operation's limits.
    function _penalty(uint256 gasSoFar) internal view returns (uint256) {
        uint256 executionLimit = callGasLimit + PM_POST_OP_GAS;
        uint256 verificationLimit = PRE_VERIFICATION_GAS + VERIFICATION_GAS + PM_VERIFICATION_GAS;
        uint256 usedAtLeast = gasSoFar > verificationLimit ? gasSoFar - verificationLimit : 0;
        return executionLimit > usedAtLeast ? (executionLimit - usedAtLeast) / 10 : 0;
    }

    // ------------------------------------------------------------------ administration

    function test_onlyOwnerMovesTheDepositAndTheKey() public {
        vm.expectRevert();
        paymaster.withdrawTo(payable(address(this)), 1);
        vm.expectRevert();
        paymaster.setSponsorSigner(address(1));
        vm.prank(pmOwner);
        paymaster.withdrawTo(payable(pmOwner), 1 ether);
        assertEq(paymaster.deposit(), DEPOSIT - 1 ether);
        vm.prank(pmOwner);
        paymaster.setSponsorSigner(address(1));
        // the old key's signatures stop working at once
        _handleFailedOp(_verifying(_recordCall(1, 2), 1 ether), "AA34 signature error");
        vm.prank(pmOwner);
        vm.expectRevert(abi.encodeWithSelector(AgentPaymaster.AgentPaymasterInvalidSigner.selector, address(0)));
        paymaster.setSponsorSigner(address(0));
    }
}
