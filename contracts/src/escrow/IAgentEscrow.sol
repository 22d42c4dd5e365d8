// SPDX-License-Identifier: MIT
pragma solidity ^0.8.26;

/**
 * @dev Types, events and errors of {AgentEscrow}. See that contract (and `docs/schemes/escrow.md`) for the model.
 *
 * Vocabulary: the *payer* owns a deposit; a *signer* is a session key the payer granted; a *payment* is one
 * EIP-712 `Payment` signed by the payer itself or by one of its granted signers; a *payee* receives payments.
 */
interface IAgentEscrow {
    /**
     * @dev One signed payment. The EIP-712 type string is
     * `Payment(address payer,address payee,address token,uint256 amount,uint256 nonce,uint256 deadline,uint32 epoch)`.
     *
     * - `nonce` is unordered and scoped to the signer (word `nonce >> 8`, bit `nonce & 0xff`).
     * - `deadline` is the last second (inclusive) at which the payment may settle.
     * - `epoch` names the grant version the session key signed under; a payment signed by the payer itself
     *   ignores it (clients set 0).
     */
    struct Payment {
        address payer;
        address payee;
        address token;
        uint256 amount;
        uint256 nonce;
        uint256 deadline;
        uint32 epoch;
    }

    /**
     * @dev What a payer grants a session key. `maxPerCall` caps each payment, `budget` caps their sum over the
     * life of the grant, and the grant is live for `validAfter <= block.timestamp <= validUntil`.
     */
    struct GrantParams {
        address token;
        uint96 maxPerCall;
        uint128 budget;
        uint32 validAfter;
        uint32 validUntil;
    }

    /// @dev A grant as {IAgentEscrow-grantOf} reports it. A revoked (or never issued) grant has `token == 0`.
    struct GrantInfo {
        address token;
        uint32 epoch;
        uint32 validAfter;
        uint32 validUntil;
        uint96 maxPerCall;
        uint128 budget;
        uint128 spent;
        uint32 payeeCount;
    }

    /**
     * @dev Why a payment did not settle. The numeric values are part of the ABI (events, {check}); the wire
     * error codes of the `escrow` scheme map one to one (see `docs/schemes/escrow.md`). `None` means valid.
     */
    enum Reason {
        None, // 0  valid
        DeadlineExpired, // 1  escrow_deadline_expired
        InvalidPayee, // 2  escrow_invalid_payee (zero address or the escrow itself)
        InvalidSignature, // 3  invalid_escrow_signature
        NonceUsed, // 4  escrow_nonce_used
        GrantNotFound, // 5  escrow_grant_not_found
        GrantRevoked, // 6  escrow_grant_revoked (revoked, or superseded by a newer epoch)
        TokenMismatch, // 7  escrow_token_mismatch
        GrantNotYetValid, // 8  escrow_grant_not_yet_valid
        GrantExpired, // 9  escrow_grant_expired
        PayeeNotAllowed, // 10 escrow_payee_not_allowed
        AmountExceedsCap, // 11 escrow_amount_exceeds_cap
        BudgetExceeded, // 12 escrow_budget_exceeded
        InsufficientDeposit, // 13 escrow_insufficient_deposit
        ActualExceedsAmount, // 14 escrow_actual_exceeds_amount (metered: more than the signed maximum)
        NotPayeeSettler // 15 escrow_not_payee_settler (metered: a charge below the maximum by a stranger)
    }

    // ------------------------------------------------------------------ events

    /// @dev `from` moved `amount` of `token` into `payer`'s deposit.
    event Deposited(address indexed payer, address indexed token, address from, uint256 amount);

    /// @dev `payer` asked to withdraw `amount` of `token` at or after `readyAt` (`amount == 0`: request cancelled).
    event WithdrawalRequested(address indexed payer, address indexed token, uint256 amount, uint256 readyAt);

    /// @dev `payer` withdrew `amount` of `token` from its deposit.
    event Withdrawn(address indexed payer, address indexed token, uint256 amount);

    /// @dev `payer` granted `signer` (grant version `epoch`); an empty `payees` list means any payee.
    event GrantIssued(
        address indexed payer,
        address indexed signer,
        uint32 epoch,
        address token,
        uint96 maxPerCall,
        uint128 budget,
        uint32 validAfter,
        uint32 validUntil,
        address[] payees
    );

    /// @dev `payer` revoked `signer` through `epoch`: no grant numbered at or below it can be live again.
    event GrantRevoked(address indexed payer, address indexed signer, uint32 epoch);

    /**
     * @dev The payment whose EIP-712 digest ({hashPayment}) is `digest`, signed by `signer` (the payer itself or its
     * session key), settled for `amount` (the signed amount; a metered charge for {settleMetered}); its nonce is now
     * used. The digest stands for every field of the payment (payer, payee, token, maximum, nonce, deadline, epoch):
     * one topic and two words instead of the fields themselves keep the log, paid once per payment, small.
     */
    event PaymentSettled(bytes32 indexed digest, address signer, uint256 amount);

    /// @dev The payment at `index` of a {settle} batch did not settle, for `reason`. Nothing changed for it.
    event PaymentFailed(address indexed payer, uint256 nonce, uint256 index, Reason reason);

    /// @dev The transfer of `amount` of `token` to `payee` failed; it is owed and can be pulled with {withdrawOwed}.
    event PayoutDeferred(address indexed payee, address indexed token, uint256 amount);

    /// @dev `payee` pulled `amount` of `token` it was owed, to `to`.
    event OwedWithdrawn(address indexed payee, address indexed token, address to, uint256 amount);

    /// @dev `payee` allowed (or stopped allowing) `operator` to settle its metered payments below their maximum.
    event SettlerSet(address indexed payee, address indexed operator, bool allowed);

    // ------------------------------------------------------------------ errors

    /// @dev {settle} got `payments` payments but `signatures` signatures.
    error EscrowLengthMismatch(uint256 payments, uint256 signatures);

    /// @dev {settlePacked} got a batch it cannot decode; `offset` is the byte of `batch` where decoding stopped.
    error EscrowMalformedBatch(uint256 offset);

    /// @dev {settleMetered} got `actuals` of another length than its payments.
    error EscrowActualsLengthMismatch(uint256 payments, uint256 actuals);

    /// @dev A single-payment call ({settleOne}) was rejected for `reason`.
    error EscrowPaymentRejected(Reason reason);

    /// @dev `payer` cannot hold a deposit (the zero address, or the escrow itself).
    error EscrowInvalidPayer(address payer);

    /// @dev `signer` cannot be granted (zero address, or the payer itself, which needs no grant).
    error EscrowInvalidSigner(address signer);

    /// @dev A grant must name a token.
    error EscrowInvalidToken(address token);

    /// @dev A grant's window is empty: `validUntil` must be after `validAfter`.
    error EscrowInvalidWindow(uint32 validAfter, uint32 validUntil);

    /// @dev `payee` cannot be allow-listed (zero address, the escrow itself, or listed twice), or receive owed funds.
    error EscrowInvalidPayee(address payee);

    /**
     * @dev A grant change names epoch `given`, but the grant of (`payer`, `signer`) is at `current`: a grant must
     * be above it (else it was revoked, or superseded by a newer grant), a revoke at least at it and nonzero (else
     * the live grant was signed after the revoke).
     */
    error EscrowStaleEpoch(address payer, address signer, uint32 current, uint32 given);

    /// @dev The signature is not `payer`'s (ECDSA for an EOA, ERC-1271 for a contract).
    error EscrowInvalidSignature(address payer);

    /// @dev `payer`'s deposit of `token` is `balance`, less than `needed`.
    error EscrowInsufficientDeposit(address payer, address token, uint256 balance, uint256 needed);

    /// @dev `payer` has no pending withdrawal of `token`.
    error EscrowNoWithdrawalRequested(address payer, address token);

    /// @dev `payer`'s withdrawal of `token` is not ready before `readyAt`.
    error EscrowWithdrawalNotReady(address payer, address token, uint256 readyAt);

    /// @dev `payee` is owed nothing in `token`.
    error EscrowNothingOwed(address payee, address token);

    // ------------------------------------------------------------------ deposits and withdrawals

    /**
     * @notice Moves `amount` of `token` from the caller (who approved the escrow) into the caller's deposit.
     * @dev Emits {Deposited}. Fee-on-transfer and rebasing tokens are not supported.
     */
    function deposit(address token, uint256 amount) external;

    /**
     * @notice Moves `amount` of `token` from the caller into `payer`'s deposit (e.g. a funder topping up an agent).
     * @dev Emits {Deposited}.
     */
    function depositFor(address payer, address token, uint256 amount) external;

    /**
     * @notice Deposits for `payer` with its ERC-3009 `ReceiveWithAuthorization` (to = this escrow); anyone may
     * relay it. Uses the token's `bytes signature` overload, so ERC-1271 payers work.
     * @dev Emits {Deposited}.
     */
    function depositWithAuthorization(
        address payer,
        address token,
        uint256 amount,
        uint256 validAfter,
        uint256 validBefore,
        bytes32 nonce,
        bytes calldata signature
    ) external;

    /**
     * @notice Deposits for `payer` with its ERC-2612 permit (spender = this escrow, value = `amount`); anyone
     * may relay it.
     * @dev Emits {Deposited}. If someone front-runs the permit, this call reverts and no funds move.
     */
    function depositWithPermit(
        address payer,
        address token,
        uint256 amount,
        uint256 deadline,
        uint8 v,
        bytes32 r,
        bytes32 s
    ) external;

    /**
     * @notice Starts the withdrawal delay for `amount` of the caller's `token` deposit, replacing any pending
     * request (its delay restarts). `amount == 0` cancels. Payments keep settling against the deposit meanwhile.
     * @dev Emits {WithdrawalRequested}.
     */
    function requestWithdrawal(address token, uint256 amount) external;

    /**
     * @notice Pays the caller its requested withdrawal once the delay has passed: the requested amount, or the
     * whole deposit if settlements shrank it below that.
     * @dev Emits {Withdrawn}.
     */
    function withdraw(address token) external returns (uint256 amount);

    /**
     * @notice Sends the caller (a payee whose payout transfer failed) what it is owed in `token`, to `to`.
     * @dev Emits {OwedWithdrawn}.
     */
    function withdrawOwed(address token, address to) external returns (uint256 amount);

    // ------------------------------------------------------------------ grants

    /**
     * @notice Grants `signer` (a session key) the right to sign payments from the caller's deposit, within
     * `params`, to the listed `payees` only (empty: any payee). Replaces any grant `signer` already has: the
     * epoch advances by one, spend restarts at zero and payments signed under older epochs stop settling.
     * @dev Emits {GrantIssued}.
     */
    function grant(address signer, GrantParams calldata params, address[] calldata payees)
        external
        returns (uint32 epoch);

    /**
     * @notice Same as {grant}, for `payer`, authorised by `payer`'s EIP-712 `Grant` signature (ECDSA or ERC-1271);
     * anyone may relay it. `epoch` is the payer's version number for this grant and must be above the grant's
     * current epoch, which makes the signature single-use, lets a newer grant never be replaced by an older one,
     * and refuses it forever once a revoke through an epoch at or above it has landed.
     * @dev Emits {GrantIssued}. Reverts with {EscrowStaleEpoch} when `epoch` is not above the current one.
     */
    function grantWithSig(
        address payer,
        address signer,
        GrantParams calldata params,
        address[] calldata payees,
        uint32 epoch,
        bytes calldata signature
    ) external;

    /**
     * @notice Revokes the caller's grants to `signer` through `epoch`: the live grant ends (effective for every
     * payment not yet settled) and every grant numbered at or below `epoch`, signed but not yet relayed, is refused
     * forever. No other signer is touched. Pass the highest epoch you ever signed a grant for `signer` with (or any
     * higher number; `type(uint32).max` retires the key for good).
     * @dev Emits {GrantRevoked}. Reverts with {EscrowStaleEpoch} when `epoch` is zero or below the current epoch
     * (a grant signed after this revoke is live).
     */
    function revoke(address signer, uint32 epoch) external;

    /**
     * @notice Same as {revoke}, for `payer`, authorised by `payer`'s EIP-712 `Revoke` signature (ECDSA or
     * ERC-1271) naming the `epoch` to revoke through; anyone may relay it, in any order with the payer's signed
     * grants: it wins over every grant numbered at or below `epoch`. Relaying it again changes nothing.
     * @dev Emits {GrantRevoked}.
     */
    function revokeWithSig(address payer, address signer, uint32 epoch, bytes calldata signature) external;

    // ------------------------------------------------------------------ payments

    /**
     * @notice Settles a batch: each payment is checked on its own, the valid ones are applied and the others
     * reported, then each (payee, token) gets one transfer. Anyone may call it; funds only go to signed payees.
     * @dev Emits {PaymentSettled} or {PaymentFailed} per payment. Reverts only on malformed input.
     * @return reasons `Reason.None` for each settled payment, the failure reason otherwise.
     */
    function settle(Payment[] calldata payments, bytes[] calldata signatures)
        external
        returns (Reason[] memory reasons);

    /**
     * @notice {settle} with the batch packed: the same checks, events and payouts, about a third of the calldata.
     * @dev `batch` is `u16 count ++ u8 n ++ n x address(20 bytes)`, then `count` entries, each
     * `u8 payer ++ u8 payee ++ u8 token` (indexes into the address table) `++ u96 amount ++ u256 nonce ++
     * u32 deadline ++ u32 epoch ++ u16 signatureLength ++ signature`, all big-endian, nothing after the last entry.
     * An entry's amount, nonce, deadline and epoch are each XORed with the previous entry's values (the first
     * entry's with zero): sequential nonces and repeated values then cost zero bytes.
     * A payment whose amount or deadline does not fit is sent with {settle}. Reverts with {EscrowMalformedBatch}
     * on an encoding error (an index outside the table, a short or long batch); a bad payment is reported, never
     * reverted. Emits {PaymentSettled} or {PaymentFailed} per payment (`index` is its position in the batch).
     * @param batch the packed payments
     * @return reasons `Reason.None` for each settled payment, the failure reason otherwise
     */
    function settlePacked(bytes calldata batch) external returns (Reason[] memory reasons);

    /**
     * @notice Settles one payment or reverts with {EscrowPaymentRejected}: for a gateway that settles before
     * responding, or simulates with `eth_call`.
     * @dev Emits {PaymentSettled}.
     */
    function settleOne(Payment calldata payment, bytes calldata signature) external;

    /**
     * @notice Metered settlement: like {settle}, but entry `i` pays `actuals[i]`, at most the signed `amount`
     * (the maximum). The grant's `maxPerCall` caps the signed maximum; its budget and the deposit are debited
     * only the actual charge. A charge below the maximum may be chosen only by the payee or an operator it
     * allowed ({setSettler}); from anyone else such an entry fails with `NotPayeeSettler`, so neither the payer
     * nor a front-runner can burn a payment's nonce for less than the payee asked. Every entry uses its nonce:
     * the remainder of the maximum is never payable later.
     * @dev Entries fail independently with `PaymentFailed` (`ActualExceedsAmount` when `actuals[i] > amount`).
     * @param payments the signed payments (`amount` = the maximum each signer authorized)
     * @param actuals the charge of each entry, `actuals[i] <= payments[i].amount`
     * @param signatures one signature per payment
     * @return reasons per entry, `None` when it settled
     */
    function settleMetered(Payment[] calldata payments, uint256[] calldata actuals, bytes[] calldata signatures)
        external
        returns (Reason[] memory reasons);

    /**
     * @notice Allows (or stops allowing) `operator` to settle the caller's metered payments below their maximum.
     * @param operator the settler (e.g. a gateway's relayer key)
     * @param allowed true to allow, false to revoke
     */
    function setSettler(address operator, bool allowed) external;

    /// @notice Whether `operator` may settle `payee`'s metered payments below their maximum (the payee always may).
    function isSettler(address payee, address operator) external view returns (bool);

    /**
     * @notice What {settle} would decide for this payment now, and who signed it (zero if no one valid).
     * One `eth_call` gives a gateway the whole on-chain verification.
     */
    function check(Payment calldata payment, bytes calldata signature)
        external
        view
        returns (Reason reason, address signer);

    // ------------------------------------------------------------------ views

    /// @notice The EIP-712 digest a signer signs for `payment`.
    function hashPayment(Payment calldata payment) external view returns (bytes32);

    /// @notice `payer`'s deposit of `token`.
    function depositOf(address payer, address token) external view returns (uint256);

    /// @notice `payer`'s pending withdrawal of `token` (zeros if none).
    function withdrawalOf(address payer, address token) external view returns (uint256 amount, uint256 readyAt);

    /// @notice What `payee` is owed in `token` after failed payout transfers.
    function owedTo(address payee, address token) external view returns (uint256);

    /// @notice The grant of (`payer`, `signer`), with its running spend.
    function grantOf(address payer, address signer) external view returns (GrantInfo memory);

    /// @notice Whether `signer`'s current grant from `payer` lets it pay `payee` (true for an open list).
    function isPayeeAllowed(address payer, address signer, address payee) external view returns (bool);

    /// @notice Whether `signer` has used `nonce`.
    function nonceUsed(address signer, uint256 nonce) external view returns (bool);

    /// @notice The used-nonce bitmap of `signer` for nonces `[word << 8, (word << 8) + 255]`.
    function nonceBitmap(address signer, uint256 word) external view returns (uint256);
}
