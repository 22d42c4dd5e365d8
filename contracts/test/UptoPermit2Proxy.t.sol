// SPDX-License-Identifier: MIT
pragma solidity ^0.8.26;

import {Test} from "./utils/Test.sol";
import {Permit2} from "../src/upto/Permit2.sol";
import {X402UptoPermit2Proxy} from "../src/upto/X402UptoPermit2Proxy.sol";
import {TestUSDC} from "../src/TestUSDC.sol";

/// @dev The x402 `upto` proxy over our Permit2, both at their canonical addresses (as the devnet places them).
contract UptoPermit2ProxyTest is Test {
    address internal constant PERMIT2 = 0x000000000022D473030F116dDEE9F6B43aC78BA3;
    address internal constant PROXY = 0x4020A4f3b7b90ccA423B9fabCc0CE57C6C240002;
    bytes32 internal constant TYPEHASH = keccak256(
        "PermitWitnessTransferFrom(TokenPermissions permitted,address spender,uint256 nonce,uint256 deadline,Witness witness)TokenPermissions(address token,uint256 amount)Witness(address to,address facilitator,uint256 validAfter)"
    );

    TestUSDC internal usdc;
    X402UptoPermit2Proxy internal proxy = X402UptoPermit2Proxy(PROXY);
    address internal payer;
    uint256 internal payerKey;
    address internal payee = address(0xBEEF);
    address internal facilitator = address(0xFAC);

    function setUp() public {
        vm.warp(1_700_000_000);
        vm.etch(PERMIT2, address(new Permit2()).code);
        vm.etch(PROXY, address(new X402UptoPermit2Proxy()).code);
        usdc = new TestUSDC();
        (payer, payerKey) = makeAddrAndKey("payer");
        usdc.mint(payer, 1_000e6);
        vm.prank(payer);
        usdc.approve(PERMIT2, type(uint256).max);
    }

    function _permit(uint256 maximum, uint256 nonce) internal view returns (Permit2.PermitTransferFrom memory) {
        return Permit2.PermitTransferFrom(Permit2.TokenPermissions(address(usdc), maximum), nonce, block.timestamp + 60);
    }

    function _witness() internal view returns (X402UptoPermit2Proxy.Witness memory) {
        return X402UptoPermit2Proxy.Witness(payee, facilitator, block.timestamp - 600);
    }

    function _sign(Permit2.PermitTransferFrom memory p, X402UptoPermit2Proxy.Witness memory w, address spender)
        internal
        view
        returns (bytes memory)
    {
        bytes32 witness = keccak256(
            abi.encode(keccak256("Witness(address to,address facilitator,uint256 validAfter)"), w.to, w.facilitator, w.validAfter)
        );
        bytes32 permissions =
            keccak256(abi.encode(keccak256("TokenPermissions(address token,uint256 amount)"), p.permitted));
        bytes32 structHash = keccak256(abi.encode(TYPEHASH, permissions, spender, p.nonce, p.deadline, witness));
        bytes32 domain = keccak256(
            abi.encode(
                keccak256("EIP712Domain(string name,uint256 chainId,address verifyingContract)"),
                keccak256("Permit2"),
                block.chainid,
                PERMIT2
            )
        );
        return signPacked(payerKey, keccak256(abi.encodePacked("\x19\x01", domain, structHash)));
    }

    /// @dev Paid <= signed maximum, exactly the actual, once.
    function testFuzz_settlesTheActualAtMostTheMaximum(uint256 maximum, uint256 actual) public {
        maximum = bound(maximum, 0, 1_000e6);
        actual = bound(actual, 0, 2_000e6);
        Permit2.PermitTransferFrom memory p = _permit(maximum, 5);
        X402UptoPermit2Proxy.Witness memory w = _witness();
        bytes memory sig = _sign(p, w, PROXY);
        vm.prank(facilitator);
        if (actual > maximum) vm.expectRevert(X402UptoPermit2Proxy.AmountExceedsPermitted.selector);
        proxy.settle(p, actual, payer, w, sig);
        uint256 paid = actual > maximum ? 0 : actual;
        assertEq(usdc.balanceOf(payee), paid);
        assertLe(usdc.balanceOf(payee), maximum);
        if (actual <= maximum) {
            vm.expectRevert(Permit2.InvalidNonce.selector); // settled at most once, for any amount
            vm.prank(facilitator);
            proxy.settle(p, 0, payer, w, sig);
        }
    }

    function test_onlyTheWitnessFacilitatorSettles() public {
        Permit2.PermitTransferFrom memory p = _permit(10e6, 1);
        X402UptoPermit2Proxy.Witness memory w = _witness();
        bytes memory sig = _sign(p, w, PROXY);
        vm.expectRevert(X402UptoPermit2Proxy.UnauthorizedFacilitator.selector);
        proxy.settle(p, 1e6, payer, w, sig);
        // Naming yourself in the witness breaks the signature.
        w.facilitator = address(this);
        vm.expectRevert(Permit2.InvalidSigner.selector);
        proxy.settle(p, 1e6, payer, w, sig);
        assertEq(usdc.balanceOf(payee), 0);
    }

    function test_anotherRecipientOrSpenderBreaksTheSignature() public {
        Permit2.PermitTransferFrom memory p = _permit(10e6, 1);
        X402UptoPermit2Proxy.Witness memory w = _witness();
        bytes memory forOther = _sign(p, w, address(0x1234)); // signed for another spender
        vm.startPrank(facilitator);
        vm.expectRevert(Permit2.InvalidSigner.selector);
        proxy.settle(p, 1e6, payer, w, forOther);
        bytes memory sig = _sign(p, w, PROXY);
        w.to = address(0xBAD);
        vm.expectRevert(Permit2.InvalidSigner.selector);
        proxy.settle(p, 1e6, payer, w, sig);
        vm.stopPrank();
    }

    function test_deadlineAndValidAfter() public {
        Permit2.PermitTransferFrom memory p = _permit(10e6, 1);
        X402UptoPermit2Proxy.Witness memory w = _witness();
        w.validAfter = block.timestamp + 10;
        bytes memory sig = _sign(p, w, PROXY);
        vm.startPrank(facilitator);
        vm.expectRevert(abi.encodeWithSelector(X402UptoPermit2Proxy.PaymentTooEarly.selector, w.validAfter));
        proxy.settle(p, 1e6, payer, w, sig);
        vm.warp(p.deadline + 1);
        vm.expectRevert(abi.encodeWithSelector(Permit2.SignatureExpired.selector, p.deadline));
        proxy.settle(p, 1e6, payer, w, sig);
        vm.stopPrank();
    }
}
