// SPDX-License-Identifier: MIT
pragma solidity ^0.8.26;

import {ERC20} from "@openzeppelin/contracts/token/ERC20/ERC20.sol";
import {ERC3009} from "@openzeppelin/contracts/token/ERC20/extensions/draft-ERC3009.sol";
import {IERC20Permit} from "@openzeppelin/contracts/token/ERC20/extensions/IERC20Permit.sol";
import {EIP712} from "@openzeppelin/contracts/utils/cryptography/EIP712.sol";
import {SignatureChecker} from "@openzeppelin/contracts/utils/cryptography/SignatureChecker.sol";
import {Nonces} from "@openzeppelin/contracts/utils/Nonces.sol";

/**
 * @title TestUSDC
 * @dev A USDC look-alike for devnets and tests: 6 decimals, ERC-2612 `permit` and ERC-3009 transfer
 * authorizations under the same EIP-712 domain as USDC on Ethereum and Base mainnet (`"USD Coin"`, version
 * `"2"`), so x402 `exact` payloads built for real USDC verify against it unchanged.
 *
 * WARNING: This is a test token. {mint} is open to anyone. Never deploy it where its balance could mean money.
 *
 * The ERC-3009 logic (typehashes, random `bytes32` nonces, validity window, events) is OpenZeppelin's
 * {ERC3009}. What it lacks, and what this contract adds to match USDC v2.2:
 *
 * - the `bytes signature` overloads of {transferWithAuthorization}, {receiveWithAuthorization} and
 *   {cancelAuthorization}, checked with {SignatureChecker} so smart-wallet payers sign through ERC-1271;
 * - ERC-1271 support in the `v, r, s` overloads too: x402 facilitators pick the overload by signature length
 *   (65 bytes goes to `v, r, s`), not by whether the payer is a contract, so a wallet whose owner signs a
 *   plain 65-byte ECDSA signature must pass there as well;
 * - ERC-2612 {permit} under version `"2"` (OZ's {ERC20Permit} hard-codes version `"1"` in its constructor),
 *   with the same ERC-1271 support and a `bytes signature` overload.
 *
 * OpenZeppelin's {ERC20TransferAuthorization} is deliberately not used: it turns the `bytes32` nonce into a
 * keyed sequence (192-bit key, 64-bit counter), while x402 clients and USDC use 32 random bytes.
 */
contract TestUSDC is ERC20, EIP712, ERC3009, Nonces, IERC20Permit {
    bytes32 private constant PERMIT_TYPEHASH =
        keccak256("Permit(address owner,address spender,uint256 value,uint256 nonce,uint256 deadline)");

    /// @dev The permit's `deadline` has passed.
    error ERC2612ExpiredSignature(uint256 deadline);

    /// @dev The permit signature is not a valid ECDSA or ERC-1271 signature of `owner`.
    error ERC2612InvalidSignature(address owner);

    constructor() ERC20("USD Coin", "USDC") EIP712("USD Coin", "2") {}

    /// @inheritdoc ERC20
    function decimals() public pure override returns (uint8) {
        return 6;
    }

    /**
     * @notice The EIP-712 domain version (`"2"`), as USDC exposes it; x402 facilitators read it to diagnose
     * a mismatched `extra.version`.
     */
    function version() external view returns (string memory) {
        return _EIP712Version();
    }

    /**
     * @notice Creates `amount` tokens for `to`. Open to every caller: this is a test token.
     * @dev Emits a {Transfer} event from the zero address.
     */
    function mint(address to, uint256 amount) external {
        _mint(to, amount);
    }

    // ------------------------------------------------------------------ ERC-2612

    /**
     * @notice Approves `spender` for `value` of `owner`'s tokens with `owner`'s signature (ERC-2612).
     * @dev Accepts ERC-1271 owners as well, like USDC v2.2. Emits an {Approval} event.
     */
    function permit(address owner, address spender, uint256 value, uint256 deadline, uint8 v, bytes32 r, bytes32 s)
        public
        virtual
    {
        permit(owner, spender, value, deadline, abi.encodePacked(r, s, v));
    }

    /**
     * @notice Same as the `v, r, s` {permit}, with a signature of any length (for ERC-1271 owners).
     * @dev Emits an {Approval} event.
     */
    function permit(address owner, address spender, uint256 value, uint256 deadline, bytes memory signature)
        public
        virtual
    {
        require(block.timestamp <= deadline, ERC2612ExpiredSignature(deadline));
        bytes32 hash =
            _hashTypedDataV4(keccak256(abi.encode(PERMIT_TYPEHASH, owner, spender, value, _useNonce(owner), deadline)));
        require(SignatureChecker.isValidSignatureNow(owner, hash, signature), ERC2612InvalidSignature(owner));
        _approve(owner, spender, value);
    }

    /// @inheritdoc IERC20Permit
    function nonces(address owner) public view virtual override(IERC20Permit, Nonces) returns (uint256) {
        return super.nonces(owner);
    }

    /// @inheritdoc IERC20Permit
    // solhint-disable-next-line func-name-mixedcase
    function DOMAIN_SEPARATOR() external view returns (bytes32) {
        return _domainSeparatorV4();
    }

    // ------------------------------------------------------------------ ERC-3009

    /**
     * @notice Executes a transfer signed by `from` (ERC-3009); anyone may submit it.
     * @dev Routed through the `bytes` overload so ERC-1271 payers work here too. Emits {AuthorizationUsed}
     * and {Transfer}.
     */
    function transferWithAuthorization(
        address from,
        address to,
        uint256 value,
        uint256 validAfter,
        uint256 validBefore,
        bytes32 nonce,
        uint8 v,
        bytes32 r,
        bytes32 s
    ) public virtual override {
        transferWithAuthorization(from, to, value, validAfter, validBefore, nonce, abi.encodePacked(r, s, v));
    }

    /**
     * @notice Same as the `v, r, s` {transferWithAuthorization}, with an ECDSA or ERC-1271 signature of `from`.
     * @dev Emits {AuthorizationUsed} and {Transfer}.
     */
    function transferWithAuthorization(
        address from,
        address to,
        uint256 value,
        uint256 validAfter,
        uint256 validBefore,
        bytes32 nonce,
        bytes memory signature
    ) public virtual {
        bytes32 hash = _hashTypedDataV4(
            keccak256(abi.encode(TRANSFER_WITH_AUTHORIZATION_TYPEHASH, from, to, value, validAfter, validBefore, nonce))
        );
        require(SignatureChecker.isValidSignatureNow(from, hash, signature), ERC3009InvalidSignature());
        _transferWithAuthorization(from, to, value, validAfter, validBefore, nonce);
    }

    /**
     * @notice Executes a transfer signed by `from`; only the payee `to` may submit it, which stops a watcher
     * of the mempool from front-running a contract's deposit with the same authorization (ERC-3009).
     * @dev Routed through the `bytes` overload so ERC-1271 payers work here too. Emits {AuthorizationUsed}
     * and {Transfer}.
     */
    function receiveWithAuthorization(
        address from,
        address to,
        uint256 value,
        uint256 validAfter,
        uint256 validBefore,
        bytes32 nonce,
        uint8 v,
        bytes32 r,
        bytes32 s
    ) public virtual override {
        receiveWithAuthorization(from, to, value, validAfter, validBefore, nonce, abi.encodePacked(r, s, v));
    }

    /**
     * @notice Same as the `v, r, s` {receiveWithAuthorization}, with an ECDSA or ERC-1271 signature of `from`.
     * @dev Emits {AuthorizationUsed} and {Transfer}.
     */
    function receiveWithAuthorization(
        address from,
        address to,
        uint256 value,
        uint256 validAfter,
        uint256 validBefore,
        bytes32 nonce,
        bytes memory signature
    ) public virtual {
        bytes32 hash = _hashTypedDataV4(
            keccak256(abi.encode(RECEIVE_WITH_AUTHORIZATION_TYPEHASH, from, to, value, validAfter, validBefore, nonce))
        );
        require(SignatureChecker.isValidSignatureNow(from, hash, signature), ERC3009InvalidSignature());
        require(to == _msgSender(), ERC20InvalidReceiver(to));
        _transferWithAuthorization(from, to, value, validAfter, validBefore, nonce);
    }

    /**
     * @notice Burns an unused authorization nonce of `authorizer` with its signature (ERC-3009).
     * @dev Routed through the `bytes` overload so ERC-1271 authorizers work here too. Emits
     * {AuthorizationCanceled}.
     */
    function cancelAuthorization(address authorizer, bytes32 nonce, uint8 v, bytes32 r, bytes32 s)
        public
        virtual
        override
    {
        cancelAuthorization(authorizer, nonce, abi.encodePacked(r, s, v));
    }

    /**
     * @notice Same as the `v, r, s` {cancelAuthorization}, with an ECDSA or ERC-1271 signature of `authorizer`.
     * @dev Emits {AuthorizationCanceled}.
     */
    function cancelAuthorization(address authorizer, bytes32 nonce, bytes memory signature) public virtual {
        bytes32 hash = _hashTypedDataV4(keccak256(abi.encode(CANCEL_AUTHORIZATION_TYPEHASH, authorizer, nonce)));
        require(SignatureChecker.isValidSignatureNow(authorizer, hash, signature), ERC3009InvalidSignature());
        _cancelAuthorization(authorizer, nonce);
    }
}
