// SPDX-License-Identifier: MIT
pragma solidity ^0.8.26;

import {Permit2} from "./Permit2.sol";

/**
 * @title X402UptoPermit2Proxy
 * @dev Our own implementation of the x402 `upto` scheme's EVM settlement proxy (`specs/schemes/upto/scheme_upto_evm.md`),
 * placed by the devnet at the canonical address `0x4020A4f3b7b90ccA423B9fabCc0CE57C6C240002`. The payer signs a Permit2
 * `PermitWitnessTransferFrom` for a MAXIMUM with this contract as `spender` and the witness
 * `Witness(address to,address facilitator,uint256 validAfter)`; {settle} moves the actual amount, at most that maximum,
 * to `witness.to`, and only `witness.facilitator` may call it.
 */
contract X402UptoPermit2Proxy {
    struct Witness {
        address to;
        address facilitator;
        uint256 validAfter;
    }

    /// @notice The canonical Permit2.
    Permit2 public constant PERMIT2 = Permit2(0x000000000022D473030F116dDEE9F6B43aC78BA3);

    bytes32 public constant WITNESS_TYPEHASH = keccak256("Witness(address to,address facilitator,uint256 validAfter)");
    string public constant WITNESS_TYPE_STRING =
        "Witness witness)TokenPermissions(address token,uint256 amount)Witness(address to,address facilitator,uint256 validAfter)";

    /// @dev `owner` paid `amount` of `token` to `to` (at most the signed maximum) under Permit2 `nonce`, settled by
    /// `facilitator`. The nonce lets a facilitator that lost track find its own settlement again.
    event Settled(
        address indexed owner,
        address indexed to,
        address indexed facilitator,
        address token,
        uint256 amount,
        uint256 nonce
    );

    /// @dev The settled amount is above the permitted maximum.
    error AmountExceedsPermitted();
    /// @dev The caller is not the facilitator the payer named in the witness.
    error UnauthorizedFacilitator();
    /// @dev The witness's `validAfter` is still in the future.
    error PaymentTooEarly(uint256 validAfter);
    /// @dev The witness names no recipient.
    error InvalidDestination();

    /**
     * @notice Settles `amount` (<= `permit.permitted.amount`) from `owner` to `witness.to` through Permit2.
     * @param permit the signed token, maximum, nonce and deadline
     * @param amount the actual charge
     * @param owner the payer (the Permit2 signer)
     * @param witness recipient, facilitator and start of validity the payer signed
     * @param signature the payer's Permit2 signature
     */
    function settle(
        Permit2.PermitTransferFrom calldata permit,
        uint256 amount,
        address owner,
        Witness calldata witness,
        bytes calldata signature
    ) external {
        require(msg.sender == witness.facilitator, UnauthorizedFacilitator());
        require(amount <= permit.permitted.amount, AmountExceedsPermitted());
        require(witness.to != address(0), InvalidDestination());
        require(block.timestamp >= witness.validAfter, PaymentTooEarly(witness.validAfter));
        bytes32 witnessHash = keccak256(abi.encode(WITNESS_TYPEHASH, witness.to, witness.facilitator, witness.validAfter));
        PERMIT2.permitWitnessTransferFrom(
            permit,
            Permit2.SignatureTransferDetails({to: witness.to, requestedAmount: amount}),
            owner,
            witnessHash,
            WITNESS_TYPE_STRING,
            signature
        );
        emit Settled(owner, witness.to, msg.sender, permit.permitted.token, amount, permit.nonce);
    }
}
