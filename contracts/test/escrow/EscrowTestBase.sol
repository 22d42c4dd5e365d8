// SPDX-License-Identifier: MIT
pragma solidity ^0.8.26;

import {Test} from "../utils/Test.sol";
import {AgentEscrow} from "../../src/AgentEscrow.sol";
import {IAgentEscrow} from "../../src/escrow/IAgentEscrow.sol";
import {TestUSDC} from "../../src/TestUSDC.sol";

/**
 * @dev Shared fixture for the AgentEscrow suites: a TestUSDC, an escrow with a one-hour withdrawal delay, a payer
 * EOA with a funded deposit, a session key and two payees, and signing helpers. Type strings and the domain
 * separator are spelled out here rather than read from the contract, so a typo there fails the tests.
 */
abstract contract EscrowTestBase is Test {
    bytes32 internal constant PAYMENT_TYPEHASH = keccak256(
        "Payment(address payer,address payee,address token,uint256 amount,uint256 nonce,uint256 deadline,uint32 epoch)"
    );
    bytes32 internal constant GRANT_TYPEHASH = keccak256(
        "Grant(address payer,address signer,address token,uint96 maxPerCall,uint128 budget,uint32 validAfter,uint32 validUntil,address[] payees,uint32 epoch)"
    );
    bytes32 internal constant REVOKE_TYPEHASH = keccak256("Revoke(address payer,address signer,uint32 epoch)");

    uint256 internal constant DELAY = 1 hours;
    uint256 internal constant T0 = 1_700_000_000;
    uint256 internal constant DEPOSIT = 1_000e6;

    AgentEscrow internal escrow;
    TestUSDC internal usdc;
    bytes32 internal domainSeparator;

    address internal payer;
    uint256 internal payerKey;
    address internal sessionKey;
    uint256 internal sessionKeyPk;
    address internal payee;
    address internal payee2;
    address internal relayer;

    function setUp() public virtual {
        vm.warp(T0);
        usdc = new TestUSDC();
        escrow = new AgentEscrow(DELAY);
        (payer, payerKey) = makeAddrAndKey("payer");
        (sessionKey, sessionKeyPk) = makeAddrAndKey("session key");
        payee = makeAddr("payee");
        payee2 = makeAddr("payee2");
        relayer = makeAddr("relayer");
        domainSeparator = keccak256(
            abi.encode(
                keccak256("EIP712Domain(string name,string version,uint256 chainId,address verifyingContract)"),
                keccak256("AgentEscrow"),
                keccak256("1"),
                block.chainid,
                address(escrow)
            )
        );
        _fund(payer, DEPOSIT);
    }

    // ------------------------------------------------------------------ setup helpers

    function _fund(address who, uint256 amount) internal {
        usdc.mint(who, amount);
        vm.startPrank(who);
        usdc.approve(address(escrow), amount);
        escrow.deposit(address(usdc), amount);
        vm.stopPrank();
    }

    function _params(uint96 cap, uint128 budget) internal view returns (IAgentEscrow.GrantParams memory) {
        return IAgentEscrow.GrantParams({
            token: address(usdc),
            maxPerCall: cap,
            budget: budget,
            validAfter: uint32(block.timestamp),
            validUntil: uint32(block.timestamp + 1 days)
        });
    }

    /// @dev Grants the session key a 10 USDC cap and 100 USDC budget for a day, any payee.
    function _grantDefault() internal returns (uint32 epoch) {
        vm.prank(payer);
        epoch = escrow.grant(sessionKey, _params(10e6, 100e6), new address[](0));
    }

    function _payment(uint256 amount, uint256 nonce) internal view returns (IAgentEscrow.Payment memory) {
        return _payment(payer, payee, amount, nonce, 1);
    }

    function _payment(address from, address to, uint256 amount, uint256 nonce, uint32 epoch)
        internal
        view
        returns (IAgentEscrow.Payment memory)
    {
        return IAgentEscrow.Payment({
            payer: from,
            payee: to,
            token: address(usdc),
            amount: amount,
            nonce: nonce,
            deadline: block.timestamp + 5 minutes,
            epoch: epoch
        });
    }

    // ------------------------------------------------------------------ typed data

    function _digest(bytes32 structHash) internal view returns (bytes32) {
        return keccak256(abi.encodePacked("\x19\x01", domainSeparator, structHash));
    }

    function _paymentDigest(IAgentEscrow.Payment memory p) internal view returns (bytes32) {
        return _digest(
            keccak256(abi.encode(PAYMENT_TYPEHASH, p.payer, p.payee, p.token, p.amount, p.nonce, p.deadline, p.epoch))
        );
    }

    function _sign(uint256 key, IAgentEscrow.Payment memory p) internal view returns (bytes memory) {
        return signPacked(key, _paymentDigest(p));
    }

    function _grantDigest(
        address from,
        address signer,
        IAgentEscrow.GrantParams memory g,
        address[] memory payees,
        uint32 epoch
    ) internal view returns (bytes32) {
        return _digest(
            keccak256(
                abi.encode(
                    GRANT_TYPEHASH,
                    from,
                    signer,
                    g.token,
                    g.maxPerCall,
                    g.budget,
                    g.validAfter,
                    g.validUntil,
                    keccak256(abi.encodePacked(payees)),
                    epoch
                )
            )
        );
    }

    function _revokeDigest(address from, address signer, uint32 epoch) internal view returns (bytes32) {
        return _digest(keccak256(abi.encode(REVOKE_TYPEHASH, from, signer, epoch)));
    }

    // ------------------------------------------------------------------ settle helpers

    function _one(IAgentEscrow.Payment memory p) internal pure returns (IAgentEscrow.Payment[] memory ps) {
        ps = new IAgentEscrow.Payment[](1);
        ps[0] = p;
    }

    function _one(bytes memory sig) internal pure returns (bytes[] memory sigs) {
        sigs = new bytes[](1);
        sigs[0] = sig;
    }

    /// @dev Settles one payment through the batch path and returns its reason.
    function _settle(IAgentEscrow.Payment memory p, bytes memory sig) internal returns (IAgentEscrow.Reason) {
        vm.prank(relayer);
        return escrow.settle(_one(p), _one(sig))[0];
    }

    function _reason(IAgentEscrow.Reason r) internal pure returns (uint256) {
        return uint256(r);
    }
}
