// SPDX-License-Identifier: MIT
pragma solidity ^0.8.26;

import {IEntryPoint, PackedUserOperation} from "@openzeppelin/contracts/interfaces/IERC4337.sol";
import {ERC4337Utils} from "@openzeppelin/contracts/account/utils/ERC4337Utils.sol";
import {Paymaster} from "@openzeppelin/contracts/account/paymaster/Paymaster.sol";
import {PaymasterERC20} from "@openzeppelin/contracts/account/paymaster/extensions/PaymasterERC20.sol";
import {Ownable} from "@openzeppelin/contracts/access/Ownable.sol";
import {IERC20} from "@openzeppelin/contracts/token/ERC20/IERC20.sol";
import {ECDSA} from "@openzeppelin/contracts/utils/cryptography/ECDSA.sol";
import {EIP712} from "@openzeppelin/contracts/utils/cryptography/EIP712.sol";
import {Math} from "@openzeppelin/contracts/utils/math/Math.sol";

/**
 * @title AgentPaymaster
 * @dev An ERC-4337 (EntryPoint v0.7) paymaster for agent accounts, in two modes chosen per operation by the
 * sponsor's signature:
 *
 * - Verifying: the sponsor pays. A sponsor key signs each operation it will pay for, with a validity window and a
 *   cumulative spend limit for the account (`spendLimit`, in wei). The paymaster reserves the operation's
 *   worst-case cost against that limit during validation and releases what was not used in `postOp`, so no
 *   account can make the sponsor's deposit pay more than the latest limit the sponsor signed for it.
 * - Token: the account pays, in an ERC-20 (the payment token), at a price the sponsor key signs
 *   (`tokenPerNative`, token units per 1e18 wei). OpenZeppelin's {PaymasterERC20} pre-charges the worst case
 *   during validation (the account must have approved this paymaster) and refunds the difference in `postOp`, so
 *   an agent needs no ETH at all.
 *
 * Composed from OpenZeppelin 5.7's audited account-abstraction pieces ({Paymaster}, {PaymasterERC20}, {EIP712},
 * {ECDSA}, {Ownable}); what is ours is the terms layout, the signed typed data and the verifying-mode accounting.
 *
 * `paymasterData` (after the 52-byte `paymaster ++ verificationGasLimit ++ postOpGasLimit` header):
 * `mode (1) ++ validAfter (6) ++ validUntil (6) ++ spendLimit (16) ++ token (20) ++ tokenPerNative (32) ++
 * signature (65)`, 146 bytes. The signature is the sponsor key's over the EIP-712 {Sponsorship} (domain
 * `AgentPaymaster`/`1`), which binds the whole operation (sender, nonce, gas, fees, calldata, initCode) and the
 * terms: it is good for exactly one operation, on one chain, for this paymaster.
 */
contract AgentPaymaster is PaymasterERC20, EIP712, Ownable {
    using Math for uint256;
    /// @dev Who pays for the operation.
    enum Mode {
        Verifying,
        Token
    }

    /// @dev The sponsor's terms for one operation (decoded from `paymasterData`).
    struct Terms {
        Mode mode;
        uint48 validAfter;
        uint48 validUntil;
        uint128 spendLimit;
        address token;
        uint256 tokenPerNative;
    }

    /// @dev Length of the terms in `paymasterData`, before the signature.
    uint256 public constant TERMS_LENGTH = 81;
    /// @dev Length of the sponsor's ECDSA signature.
    uint256 public constant SIGNATURE_LENGTH = 65;

    bytes32 public constant OPERATION_TYPEHASH = keccak256(
        "Operation(address sender,uint256 nonce,bytes initCode,bytes callData,bytes32 accountGasLimits,"
        "uint256 preVerificationGas,bytes32 gasFees,uint256 paymasterVerificationGasLimit,"
        "uint256 paymasterPostOpGasLimit)"
    );
    bytes32 public constant SPONSORSHIP_TYPEHASH = keccak256(
        "Sponsorship(Operation operation,uint8 mode,uint48 validAfter,uint48 validUntil,uint128 spendLimit,"
        "address token,uint256 tokenPerNative)"
        "Operation(address sender,uint256 nonce,bytes initCode,bytes callData,bytes32 accountGasLimits,"
        "uint256 preVerificationGas,bytes32 gasFees,uint256 paymasterVerificationGasLimit,"
        "uint256 paymasterPostOpGasLimit)"
    );

    /// @dev Length of the verifying-mode `postOp` context: userOpHash ++ sender ++ reserved ++ executionLimit ++
    /// verificationLimit (a token-mode context is longer: 168 bytes from {PaymasterERC20}, plus our 64).
    uint256 private constant _VERIFYING_CONTEXT_LENGTH = 148;

    IEntryPoint private immutable _entryPoint;
    address private _sponsorSigner;
    mapping(address account => uint256) private _sponsoredSpent;

    /// @dev The sponsor key changed from `previous` to `current`.
    event SponsorSignerChanged(address indexed previous, address indexed current);

    /**
     * @dev Verifying mode: `account`'s operation `userOpHash` was charged `cost` wei (an upper bound of what the
     * EntryPoint takes from the deposit for it) against its limit; `spent` is its running total.
     */
    event SponsoredGasCharged(bytes32 indexed userOpHash, address indexed account, uint256 cost, uint256 spent);

    /// @dev `paymasterData` is not `TERMS_LENGTH + SIGNATURE_LENGTH` bytes long (it is `length`).
    error AgentPaymasterMalformedData(uint256 length);

    /// @dev The terms name no known mode (`mode` is the byte found).
    error AgentPaymasterUnknownMode(uint8 mode);

    /**
     * @dev Verifying mode: `account` has `spent` wei sponsored so far; this operation may cost up to `maxCost`,
     * which would exceed the `limit` the sponsor signed.
     */
    error AgentPaymasterSpendLimit(address account, uint256 spent, uint256 maxCost, uint256 limit);

    /// @dev The sponsor key cannot be the zero address.
    error AgentPaymasterInvalidSigner(address signer);

    /**
     * @dev `entryPoint_` must be an EntryPoint v0.7 (the canonical one is
     * `0x0000000071727De22E5E9d8BAf0edAc6f37da032`); `sponsorSigner_` signs sponsorships; `owner_` manages the
     * deposit, stake, collected tokens and the sponsor key.
     */
    constructor(IEntryPoint entryPoint_, address sponsorSigner_, address owner_)
        EIP712("AgentPaymaster", "1")
        Ownable(owner_)
    {
        _entryPoint = entryPoint_;
        _setSponsorSigner(sponsorSigner_);
    }

    // ------------------------------------------------------------------ views

    /// @inheritdoc Paymaster
    function entryPoint() public view virtual override returns (IEntryPoint) {
        return _entryPoint;
    }

    /// @notice The key whose signature makes this paymaster sponsor an operation.
    function sponsorSigner() public view virtual returns (address) {
        return _sponsorSigner;
    }

    /// @notice Wei charged so far against `account`'s verifying-mode spend limit (reservations included).
    function sponsoredSpent(address account) public view virtual returns (uint256) {
        return _sponsoredSpent[account];
    }

    /// @notice This paymaster's deposit at the EntryPoint: what sponsored operations are paid from.
    function deposit() public view virtual returns (uint256) {
        return entryPoint().balanceOf(address(this));
    }

    /**
     * @notice The EIP-712 digest the sponsor key signs for `userOp` under `terms` (`userOp.paymasterAndData`
     * supplies only its gas limits; its data, which will hold the signature, is not part of the digest).
     */
    function sponsorshipHash(PackedUserOperation calldata userOp, Terms calldata terms)
        public
        view
        virtual
        returns (bytes32)
    {
        return _sponsorshipHash(userOp, terms);
    }

    // ------------------------------------------------------------------ administration

    /// @notice Adds `msg.value` to this paymaster's EntryPoint deposit (anyone may fund the sponsor).
    function addDeposit() external payable virtual {
        _deposit(msg.value);
    }

    /// @notice Withdraws `amount` wei of the deposit to `to`. Owner only.
    function withdrawTo(address payable to, uint256 amount) external virtual onlyOwner {
        _withdraw(to, amount);
    }

    /// @notice Stakes `msg.value` at the EntryPoint with `unstakeDelaySec`. Owner only.
    function addStake(uint32 unstakeDelaySec) external payable virtual onlyOwner {
        _addStake(msg.value, unstakeDelaySec);
    }

    /// @notice Starts the unstake delay. Owner only.
    function unlockStake() external virtual onlyOwner {
        _unlockStake();
    }

    /// @notice Withdraws the unlocked stake to `to`. Owner only.
    function withdrawStake(address payable to) external virtual onlyOwner {
        _withdrawStake(to);
    }

    /// @notice Sends `amount` of `token` collected from token-mode operations to `to` (max uint: all). Owner only.
    function withdrawTokens(IERC20 token, address to, uint256 amount) external virtual onlyOwner {
        _withdrawTokens(token, to, amount);
    }

    /// @notice Replaces the sponsor key; signatures of the old key stop working at once. Owner only.
    /// @dev Emits {SponsorSignerChanged}.
    function setSponsorSigner(address signer) external virtual onlyOwner {
        _setSponsorSigner(signer);
    }

    // ------------------------------------------------------------------ validation

    /**
     * @dev Token mode goes to {PaymasterERC20} (which calls {_fetchDetails}); verifying mode checks the sponsor's
     * signature and reserves `maxCost` against the account's signed spend limit.
     */
    function _validatePaymasterUserOp(PackedUserOperation calldata userOp, bytes32 userOpHash, uint256 maxCost)
        internal
        virtual
        override
        returns (bytes memory context, uint256 validationData)
    {
        Terms memory terms = _decodeTerms(userOp);
        if (terms.mode == Mode.Token) return super._validatePaymasterUserOp(userOp, userOpHash, maxCost);

        if (!_signedBySponsor(userOp, terms)) return (bytes(""), ERC4337Utils.SIG_VALIDATION_FAILED);
        address account = userOp.sender;
        uint256 spent = _sponsoredSpent[account];
        if (spent + maxCost > terms.spendLimit) {
            revert AgentPaymasterSpendLimit(account, spent, maxCost, terms.spendLimit);
        }
        _sponsoredSpent[account] = spent + maxCost;
        (uint256 executionLimit, uint256 verificationLimit) = _gasLimits(userOp);
        context = abi.encodePacked(userOpHash, account, maxCost, executionLimit, verificationLimit);
        validationData = ERC4337Utils.packValidationData(true, terms.validAfter, terms.validUntil);
    }

    /// @dev Token mode: the token and price the sponsor signed, and the signature's verdict and time window.
    function _fetchDetails(PackedUserOperation calldata userOp, bytes32)
        internal
        view
        virtual
        override
        returns (uint256 validationData, IERC20 token, uint256 tokenPerNative)
    {
        Terms memory terms = _decodeTerms(userOp);
        bool valid = terms.tokenPerNative != 0 && _signedBySponsor(userOp, terms);
        return (
            ERC4337Utils.packValidationData(valid, terms.validAfter, terms.validUntil),
            IERC20(terms.token),
            terms.tokenPerNative
        );
    }

    /**
     * @dev Token mode: {PaymasterERC20}'s pre-charge, plus the worst case of the v0.7 unused-gas penalty (its own
     * penalty hook is zeroed, see {_postOpGasPenalty}); the gas limits travel to {_postOp} in `prefundContext`.
     */
    function _prefund(
        PackedUserOperation calldata userOp,
        bytes32 userOpHash,
        IERC20 token,
        uint256 tokenPerNative,
        address prefunder_,
        uint256 prefundAmount_
    ) internal virtual override returns (bool success, address prefunder, uint256 prefundAmount, bytes memory) {
        (uint256 executionLimit, uint256 verificationLimit) = _gasLimits(userOp);
        uint256 penalty =
            _erc20Cost((executionLimit / 10).saturatingMul(ERC4337Utils.maxFeePerGas(userOp)), tokenPerNative);
        (success, prefunder, prefundAmount,) = super._prefund(
            userOp, userOpHash, token, tokenPerNative, prefunder_, prefundAmount_.saturatingAdd(penalty)
        );
        return (success, prefunder, prefundAmount, abi.encodePacked(executionLimit, verificationLimit));
    }

    /**
     * @dev What the EntryPoint takes from the deposit for an operation is `actualGasCost` (which excludes `postOp`
     * itself), plus the `postOp` gas (allowance: {_postOpCost}), plus the v0.7 penalty of 10% of the unused
     * execution gas (call and `postOp`), which is only known after `postOp`. {_unusedGasPenalty} bounds it from
     * above using the fact that validation used at most its limits.
     *
     * Verifying mode: the account's running total keeps that bound (never more than the reservation). Token mode:
     * {PaymasterERC20} charges the account that bound at the signed price, rounded up, and refunds the rest of
     * its pre-charge: `ceil((actualGasCost + (30_000 + penalty) * actualUserOpFeePerGas) * tokenPerNative / 1e18)`.
     */
    function _postOp(PostOpMode mode, bytes calldata context, uint256 actualGasCost, uint256 actualUserOpFeePerGas)
        internal
        virtual
        override
    {
        if (context.length == _VERIFYING_CONTEXT_LENGTH) {
            _postOpVerifying(context, actualGasCost, actualUserOpFeePerGas);
            return;
        }
        uint256 penalty = _unusedGasPenalty(
            uint256(bytes32(context[0xA8:0xC8])),
            uint256(bytes32(context[0xC8:0xE8])),
            actualGasCost,
            actualUserOpFeePerGas
        );
        super._postOp(mode, context, actualGasCost + penalty * actualUserOpFeePerGas, actualUserOpFeePerGas);
    }

    /// @dev Verifying mode: keep the cost bound in the account's running total, release the rest of the reservation.
    function _postOpVerifying(bytes calldata context, uint256 actualGasCost, uint256 actualUserOpFeePerGas) private {
        address account = address(bytes20(context[32:52]));
        uint256 reserved = uint256(bytes32(context[52:84]));
        uint256 penalty = _unusedGasPenalty(
            uint256(bytes32(context[84:116])), uint256(bytes32(context[116:148])), actualGasCost, actualUserOpFeePerGas
        );
        uint256 cost = Math.min(reserved, actualGasCost + (_postOpCost() + penalty) * actualUserOpFeePerGas);
        uint256 spent = _sponsoredSpent[account] - (reserved - cost);
        _sponsoredSpent[account] = spent;
        emit SponsoredGasCharged(bytes32(context[0:32]), account, cost, spent);
    }

    /// @dev The penalty is accounted for by {_postOp} with a tighter bound than {PaymasterERC20}'s.
    function _postOpGasPenalty(uint256) internal view virtual override returns (uint256) {
        return 0;
    }

    /**
     * @dev An upper bound of the EntryPoint v0.7 unused-gas penalty: 10% of `executionLimit` (callGasLimit +
     * paymasterPostOpGasLimit) minus the execution gas used, where the gas used so far (`actualGasCost / fee`)
     * minus the validation limits (preVerificationGas + verificationGasLimit + paymasterVerificationGasLimit) is
     * a lower bound of the execution gas used.
     */
    function _unusedGasPenalty(uint256 executionLimit, uint256 verificationLimit, uint256 actualGasCost, uint256 fee)
        internal
        pure
        virtual
        returns (uint256)
    {
        if (fee == 0) return 0;
        uint256 gasSoFar = actualGasCost / fee;
        uint256 usedAtLeast = gasSoFar > verificationLimit ? gasSoFar - verificationLimit : 0;
        return executionLimit > usedAtLeast ? (executionLimit - usedAtLeast) / 10 : 0;
    }

    function _gasLimits(PackedUserOperation calldata userOp)
        internal
        pure
        virtual
        returns (uint256 executionLimit, uint256 verificationLimit)
    {
        executionLimit = ERC4337Utils.callGasLimit(userOp) + ERC4337Utils.paymasterPostOpGasLimit(userOp);
        verificationLimit = userOp.preVerificationGas + ERC4337Utils.verificationGasLimit(userOp)
            + ERC4337Utils.paymasterVerificationGasLimit(userOp);
    }

    // ------------------------------------------------------------------ internals

    function _decodeTerms(PackedUserOperation calldata userOp) internal pure virtual returns (Terms memory terms) {
        bytes calldata data = ERC4337Utils.paymasterData(userOp);
        if (data.length != TERMS_LENGTH + SIGNATURE_LENGTH) revert AgentPaymasterMalformedData(data.length);
        uint8 mode = uint8(data[0]);
        if (mode > uint8(Mode.Token)) revert AgentPaymasterUnknownMode(mode);
        terms.mode = Mode(mode);
        terms.validAfter = uint48(bytes6(data[1:7]));
        terms.validUntil = uint48(bytes6(data[7:13]));
        terms.spendLimit = uint128(bytes16(data[13:29]));
        terms.token = address(bytes20(data[29:49]));
        terms.tokenPerNative = uint256(bytes32(data[49:81]));
    }

    function _signedBySponsor(PackedUserOperation calldata userOp, Terms memory terms)
        internal
        view
        virtual
        returns (bool)
    {
        bytes calldata signature = ERC4337Utils.paymasterData(userOp)[TERMS_LENGTH:];
        (address recovered, ECDSA.RecoverError err,) =
            ECDSA.tryRecoverCalldata(_sponsorshipHash(userOp, terms), signature);
        return err == ECDSA.RecoverError.NoError && recovered == _sponsorSigner;
    }

    function _sponsorshipHash(PackedUserOperation calldata userOp, Terms memory terms)
        internal
        view
        virtual
        returns (bytes32)
    {
        return _hashTypedDataV4(
            keccak256(
                abi.encode(
                    SPONSORSHIP_TYPEHASH,
                    _operationHash(userOp),
                    terms.mode,
                    terms.validAfter,
                    terms.validUntil,
                    terms.spendLimit,
                    terms.token,
                    terms.tokenPerNative
                )
            )
        );
    }

    function _operationHash(PackedUserOperation calldata userOp) internal pure virtual returns (bytes32) {
        return keccak256(
            abi.encode(
                OPERATION_TYPEHASH,
                userOp.sender,
                userOp.nonce,
                keccak256(userOp.initCode),
                keccak256(userOp.callData),
                userOp.accountGasLimits,
                userOp.preVerificationGas,
                userOp.gasFees,
                ERC4337Utils.paymasterVerificationGasLimit(userOp),
                ERC4337Utils.paymasterPostOpGasLimit(userOp)
            )
        );
    }

    function _setSponsorSigner(address signer) internal virtual {
        if (signer == address(0)) revert AgentPaymasterInvalidSigner(signer);
        emit SponsorSignerChanged(_sponsorSigner, signer);
        _sponsorSigner = signer;
    }
}
