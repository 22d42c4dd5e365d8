// SPDX-License-Identifier: MIT
pragma solidity ^0.8.26;

import {IERC20} from "@openzeppelin/contracts/token/ERC20/IERC20.sol";
import {SafeERC20} from "@openzeppelin/contracts/token/ERC20/utils/SafeERC20.sol";
import {SignatureChecker} from "@openzeppelin/contracts/utils/cryptography/SignatureChecker.sol";

/**
 * @title Permit2 (SignatureTransfer subset)
 * @dev Our own implementation of the part of Uniswap's Permit2 that the x402 `upto` scheme uses, written from its
 * documented interface: `permitWitnessTransferFrom` with unordered nonces, `nonceBitmap`, `invalidateUnorderedNonces`
 * and `DOMAIN_SEPARATOR`. The devnet places its runtime code at the canonical Permit2 address
 * (`0x000000000022D473030F116dDEE9F6B43aC78BA3`) with `anvil_setCode`, because clients hard-code that address. No
 * registry package ships Permit2's deployed bytecode (only TypeScript SDKs), hence this.
 *
 * The EIP-712 domain is `{name: "Permit2", chainId, verifyingContract}` (no version), computed on every call so that
 * code copied to another address signs for that address. Not implemented: AllowanceTransfer and batch transfers.
 */
contract Permit2 {
    using SafeERC20 for IERC20;

    struct TokenPermissions {
        address token;
        uint256 amount;
    }

    struct PermitTransferFrom {
        TokenPermissions permitted;
        uint256 nonce;
        uint256 deadline;
    }

    struct SignatureTransferDetails {
        address to;
        uint256 requestedAmount;
    }

    bytes32 public constant TOKEN_PERMISSIONS_TYPEHASH = keccak256("TokenPermissions(address token,uint256 amount)");
    string public constant PERMIT_WITNESS_TRANSFER_FROM_TYPEHASH_STUB =
        "PermitWitnessTransferFrom(TokenPermissions permitted,address spender,uint256 nonce,uint256 deadline,";
    bytes32 private constant _DOMAIN_TYPEHASH =
        keccak256("EIP712Domain(string name,uint256 chainId,address verifyingContract)");

    mapping(address owner => mapping(uint256 word => uint256 bits)) public nonceBitmap;

    /// @dev `owner` used or invalidated nonces `mask` of word `word`.
    event UnorderedNonceInvalidation(address indexed owner, uint256 word, uint256 mask);

    /// @dev The permit's deadline passed.
    error SignatureExpired(uint256 signatureDeadline);
    /// @dev More was requested than the permit allows.
    error InvalidAmount(uint256 maxAmount);
    /// @dev The nonce was used or invalidated.
    error InvalidNonce();
    /// @dev The signature is not the owner's.
    error InvalidSigner();

    /// @notice The EIP-712 domain separator for this chain and address.
    function DOMAIN_SEPARATOR() public view returns (bytes32) {
        return keccak256(abi.encode(_DOMAIN_TYPEHASH, keccak256("Permit2"), block.chainid, address(this)));
    }

    /**
     * @notice Transfers `transferDetails.requestedAmount` (at most the permitted amount) of the permitted token from
     * `owner` to `transferDetails.to`, on `owner`'s signature of a `PermitWitnessTransferFrom` naming the caller as
     * `spender` and carrying `witness` (a struct hash of type `witnessTypeString`).
     * @dev Uses the nonce; the owner must have approved this contract on the token.
     * @param permit the signed token, maximum amount, nonce and deadline
     * @param transferDetails recipient and amount of this transfer
     * @param owner the signer and source of the funds
     * @param witness the EIP-712 hash of the witness struct
     * @param witnessTypeString the witness's type string tail, e.g. "Witness witness)TokenPermissions(...)Witness(...)"
     * @param signature the owner's signature (ECDSA, or ERC-1271 when the owner is a contract)
     */
    function permitWitnessTransferFrom(
        PermitTransferFrom calldata permit,
        SignatureTransferDetails calldata transferDetails,
        address owner,
        bytes32 witness,
        string calldata witnessTypeString,
        bytes calldata signature
    ) external {
        require(block.timestamp <= permit.deadline, SignatureExpired(permit.deadline));
        require(transferDetails.requestedAmount <= permit.permitted.amount, InvalidAmount(permit.permitted.amount));
        _useNonce(owner, permit.nonce);
        bytes32 typeHash = keccak256(abi.encodePacked(PERMIT_WITNESS_TRANSFER_FROM_TYPEHASH_STUB, witnessTypeString));
        bytes32 permissions = keccak256(abi.encode(TOKEN_PERMISSIONS_TYPEHASH, permit.permitted));
        bytes32 structHash =
            keccak256(abi.encode(typeHash, permissions, msg.sender, permit.nonce, permit.deadline, witness));
        bytes32 digest = keccak256(abi.encodePacked("\x19\x01", DOMAIN_SEPARATOR(), structHash));
        require(SignatureChecker.isValidSignatureNowCalldata(owner, digest, signature), InvalidSigner());

        IERC20(permit.permitted.token).safeTransferFrom(owner, transferDetails.to, transferDetails.requestedAmount);
    }

    /// @notice Invalidates the caller's nonces `mask` in word `wordPos`.
    function invalidateUnorderedNonces(uint256 wordPos, uint256 mask) external {
        nonceBitmap[msg.sender][wordPos] |= mask;
        emit UnorderedNonceInvalidation(msg.sender, wordPos, mask);
    }

    function _useNonce(address owner, uint256 nonce) private {
        uint256 bit = 1 << (nonce & 0xff);
        uint256 flipped = nonceBitmap[owner][nonce >> 8] ^= bit;
        require(flipped & bit != 0, InvalidNonce());
    }
}
