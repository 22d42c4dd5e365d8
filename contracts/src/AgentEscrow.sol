// SPDX-License-Identifier: MIT
pragma solidity ^0.8.26;

import {IERC1271} from "@openzeppelin/contracts/interfaces/IERC1271.sol";
import {IERC20} from "@openzeppelin/contracts/token/ERC20/IERC20.sol";
import {IERC20Permit} from "@openzeppelin/contracts/token/ERC20/extensions/IERC20Permit.sol";
import {SafeERC20} from "@openzeppelin/contracts/token/ERC20/utils/SafeERC20.sol";
import {EIP712} from "@openzeppelin/contracts/utils/cryptography/EIP712.sol";
import {SignatureChecker} from "@openzeppelin/contracts/utils/cryptography/SignatureChecker.sol";
import {SafeCast} from "@openzeppelin/contracts/utils/math/SafeCast.sol";
import {Multicall} from "@openzeppelin/contracts/utils/Multicall.sol";
import {ReentrancyGuardTransient} from "@openzeppelin/contracts/utils/ReentrancyGuardTransient.sol";
import {IAgentEscrow} from "./escrow/IAgentEscrow.sol";
import {IERC3009Receive} from "./escrow/IERC3009Receive.sol";
import {MultichainApproval} from "./multichain/MultichainApproval.sol";

/**
 * @title AgentEscrow
 * @dev Holds payers' ERC-20 deposits and pays them out to payees on payments signed off-chain, one batch at a
 * time. Built for agents: a payer (an EOA or a smart account whose owner key stays offline) grants a hot
 * *session key* the right to sign payments from its deposit, and nothing else:
 *
 * - each payment at most `maxPerCall`, all of them together at most `budget`, only inside
 *   `[validAfter, validUntil]`, only in the grant's token and, optionally, only to listed payees;
 * - the payer revokes one key without touching any other; a key can never change its own grant, since every
 *   grant change needs the payer (as `msg.sender` or by EIP-712 signature).
 *
 * Payments (`Payment` in {IAgentEscrow}) use unordered, Permit2-style nonces scoped to the signer, so concurrent
 * calls never wait on each other, and a signer counting up fills one storage word per 256 payments. {settle}
 * checks each payment of a batch independently, reports the bad ones in events instead of reverting, and pays
 * each (payee, token) with one transfer. Withdrawals are timed ({WITHDRAWAL_DELAY}) so that payees can settle
 * what they hold before a payer's deposit leaves. The deposit is one pool per (payer, token), not reserved per
 * payee: the payer can still *spend* it (or revoke a key) before a deferred payment settles, so deferred
 * settlement is credit the payee extends; channels ({AgentChannels}) reserve funds per payee.
 *
 * Grant versions: each (payer, signer) grant carries an `epoch`, a version number the payer chooses and only ever
 * raises (a counter, or the signing time in seconds). A grant change must name an epoch above the current one,
 * so a signed grant is single-use and an older grant can never replace a newer one. A revoke names the epoch it
 * revokes *through*: it ends the live grant and raises the epoch to that number, so every grant signed with an
 * epoch at or below it is refused forever, whether it was relayed before the revoke or is relayed after it. A
 * revoke therefore wins over every grant the payer signed before it, in any relay order, as long as the payer
 * numbers a revoke at least as high as the grants it means to end. Payments name the epoch they were signed
 * under, so a re-grant starts a fresh budget and neither it nor a revoke can be undone by replaying payments
 * signed under an older version.
 *
 * WARNING: Fee-on-transfer and rebasing tokens are not supported: deposits are credited at face value.
 *
 * IMPORTANT: A smart-account payer signs its own payments through ERC-1271, uncapped by any grant. Such an account
 * must not let its session keys pass `isValidSignature` for arbitrary hashes, or they could sign as the payer.
 */
contract AgentEscrow is IAgentEscrow, EIP712, ReentrancyGuardTransient, Multicall {
    using SafeERC20 for IERC20;

    /**
     * @dev A (payer, signer) grant, one struct per storage slot so that a payment reads each hot slot with a single
     * SLOAD (copying a one-slot struct to memory is one SLOAD; reading its fields one by one is one each).
     */
    struct Grant {
        GrantTerms terms; // slot 0: written only by grant changes
        GrantLimits limits; // slot 1: `remaining` written by every payment
        uint128 budget; // slot 2: read only by views
    }

    struct GrantTerms {
        address token; // zero: revoked (epoch > 0) or never granted (epoch == 0)
        uint32 epoch;
        uint32 validAfter;
        uint32 validUntil;
    }

    struct GrantLimits {
        uint128 remaining; // the budget minus what was spent
        uint96 maxPerCall;
        uint32 payeeCount; // 0: any payee
    }

    /// @dev The payouts of one batch: one total per distinct (payee, token), `groups` of them in use. `lastPayee`,
    /// `lastToken` and `last` (a 1-based group) remember the latest payment's group: a run of payments to the same
    /// payee, the common batch, finds its group without hashing.
    struct Payouts {
        address[] payees;
        address[] tokens;
        uint256[] totals;
        uint256 groups;
        address lastPayee;
        address lastToken;
        uint256 last;
    }

    /**
     * @dev What {_check} read for one payment, handed to {_apply} so that it neither hashes a storage key nor reads a
     * slot again: the payment's digest, the signer's nonce word (slot and value with the payment's bit set), the payer's deposit (slot and
     * value) and, for a session key, its grant (base slot, the terms slot's value, and the limits slot's value).
     *
     * The `held*` pairs are writes of applied payments not yet stored (slot 0: none): a run of payments from one
     * signer's nonce word, one deposit and one grant writes each slot once, when the run ends or at {_flush}, and
     * {_check} reads a held slot from here. {_flush} must run before any call out of the escrow that is not static
     * (the payouts) and before the settling function returns.
     */
    struct Scratch {
        bytes32 digest;
        uint256 nonceSlot;
        uint256 nonceBits;
        uint256 depositSlot;
        uint256 depositValue;
        uint256 grantSlot;
        uint256 terms;
        uint256 limits;
        uint256 heldNonceSlot;
        uint256 heldNonce;
        uint256 heldDepositSlot;
        uint256 heldDeposit;
        uint256 heldLimitsSlot;
        uint256 heldLimits;
    }

    /// @dev A pending withdrawal; `amount == 0` means none.
    struct Withdrawal {
        uint208 amount;
        uint48 readyAt;
    }

    bytes32 public constant PAYMENT_TYPEHASH = keccak256(
        "Payment(address payer,address payee,address token,uint256 amount,uint256 nonce,uint256 deadline,uint32 epoch)"
    );
    bytes32 public constant GRANT_TYPEHASH = keccak256(
        "Grant(address payer,address signer,address token,uint96 maxPerCall,uint128 budget,uint32 validAfter,uint32 validUntil,address[] payees,uint32 epoch)"
    );
    bytes32 public constant REVOKE_TYPEHASH = keccak256("Revoke(address payer,address signer,uint32 epoch)");

    /**
     * @notice Gas an ERC-1271 payer gets to validate a payment signature in {settle}, {settleOne} and {check}.
     * @dev Without a cap, a payer contract could burn the gas of a whole batch and revert everyone's settlement;
     * with it, such a payment just fails as `InvalidSignature`. Generous for real accounts (a P-256/WebAuthn check
     * without the precompile is ~200-350k).
     */
    uint256 public constant ERC1271_GAS_LIMIT = 500_000;

    /// @notice Seconds between {requestWithdrawal} and {withdraw}: the window payees have to settle what they hold.
    uint256 public immutable WITHDRAWAL_DELAY;

    mapping(address payer => mapping(address token => uint256)) private _deposits;
    mapping(address payer => mapping(address token => Withdrawal)) private _withdrawals;
    mapping(address payer => mapping(address signer => Grant)) private _grants;
    /// @dev keccak256(abi.encode(payer, signer, epoch, payee)) => allowed; keyed by epoch so a re-grant starts clean.
    mapping(bytes32 key => bool) private _payeeAllowed;
    mapping(address signer => mapping(uint256 word => uint256 bits)) private _nonceBitmap;
    mapping(address payee => mapping(address token => uint256)) private _owed;
    mapping(address payee => mapping(address operator => bool)) private _settlers;

    /// @param withdrawalDelay seconds a payer waits to withdraw (deployments: 15 minutes or more).
    constructor(uint256 withdrawalDelay) EIP712("AgentEscrow", "1") {
        WITHDRAWAL_DELAY = withdrawalDelay;
    }

    // ------------------------------------------------------------------ deposits and withdrawals

    /// @inheritdoc IAgentEscrow
    function deposit(address token, uint256 amount) external nonReentrant {
        IERC20(token).safeTransferFrom(msg.sender, address(this), amount);
        _credit(msg.sender, token, msg.sender, amount);
    }

    /// @inheritdoc IAgentEscrow
    function depositFor(address payer, address token, uint256 amount) external nonReentrant {
        // A deposit nobody can ever withdraw or grant from would be lost.
        require(payer != address(0) && payer != address(this), EscrowInvalidPayer(payer));
        IERC20(token).safeTransferFrom(msg.sender, address(this), amount);
        _credit(payer, token, msg.sender, amount);
    }

    /// @inheritdoc IAgentEscrow
    function depositWithAuthorization(
        address payer,
        address token,
        uint256 amount,
        uint256 validAfter,
        uint256 validBefore,
        bytes32 nonce,
        bytes calldata signature
    ) external nonReentrant {
        // `receive` (not `transfer`) WithAuthorization: the token checks that we are the recipient and the caller,
        // so a copy of the authorization seen in the mempool cannot be spent anywhere else.
        IERC3009Receive(token).receiveWithAuthorization(
            payer, address(this), amount, validAfter, validBefore, nonce, signature
        );
        _credit(payer, token, payer, amount);
    }

    /// @inheritdoc IAgentEscrow
    function depositWithPermit(
        address payer,
        address token,
        uint256 amount,
        uint256 deadline,
        uint8 v,
        bytes32 r,
        bytes32 s
    ) external nonReentrant {
        // No try/catch around the permit: tolerating a failed permit would let anyone sweep an allowance the payer
        // gave for other reasons into its deposit (and lock it for the withdrawal delay).
        IERC20Permit(token).permit(payer, address(this), amount, deadline, v, r, s);
        IERC20(token).safeTransferFrom(payer, address(this), amount);
        _credit(payer, token, payer, amount);
    }

    /// @inheritdoc IAgentEscrow
    function requestWithdrawal(address token, uint256 amount) external {
        uint256 readyAt;
        if (amount == 0) {
            delete _withdrawals[msg.sender][token];
        } else {
            uint256 balance = _deposits[msg.sender][token];
            require(amount <= balance, EscrowInsufficientDeposit(msg.sender, token, balance, amount));
            readyAt = block.timestamp + WITHDRAWAL_DELAY;
            _withdrawals[msg.sender][token] = Withdrawal(SafeCast.toUint208(amount), SafeCast.toUint48(readyAt));
        }
        emit WithdrawalRequested(msg.sender, token, amount, readyAt);
    }

    /// @inheritdoc IAgentEscrow
    function withdraw(address token) external nonReentrant returns (uint256 amount) {
        Withdrawal memory request = _withdrawals[msg.sender][token];
        require(request.amount != 0, EscrowNoWithdrawalRequested(msg.sender, token));
        require(block.timestamp >= request.readyAt, EscrowWithdrawalNotReady(msg.sender, token, request.readyAt));

        // Payments kept settling during the delay; they win over the request.
        uint256 balance = _deposits[msg.sender][token];
        amount = request.amount < balance ? request.amount : balance;
        delete _withdrawals[msg.sender][token];
        _deposits[msg.sender][token] = balance - amount;
        emit Withdrawn(msg.sender, token, amount);

        IERC20(token).safeTransfer(msg.sender, amount);
    }

    /// @inheritdoc IAgentEscrow
    function withdrawOwed(address token, address to) external nonReentrant returns (uint256 amount) {
        // Sending to the escrow itself would strand the tokens outside every ledger.
        require(to != address(this), EscrowInvalidPayee(to));
        amount = _owed[msg.sender][token];
        require(amount != 0, EscrowNothingOwed(msg.sender, token));
        delete _owed[msg.sender][token];
        emit OwedWithdrawn(msg.sender, token, to, amount);

        IERC20(token).safeTransfer(to, amount);
    }

    // ------------------------------------------------------------------ grants

    /// @inheritdoc IAgentEscrow
    function grant(address signer, GrantParams calldata params, address[] calldata payees)
        external
        returns (uint32 epoch)
    {
        uint32 current = _grants[msg.sender][signer].terms.epoch;
        // A key revoked through the last epoch is retired for good.
        require(current != type(uint32).max, EscrowStaleEpoch(msg.sender, signer, current, current));
        epoch = current + 1;
        _grant(msg.sender, signer, params, payees, epoch);
    }

    /// @inheritdoc IAgentEscrow
    function grantWithSig(
        address payer,
        address signer,
        GrantParams calldata params,
        address[] calldata payees,
        uint32 epoch,
        bytes calldata signature
    ) external {
        // Strictly above the current epoch: a grant at or below a revoke's epoch, or below a newer grant, is dead.
        uint32 current = _grants[payer][signer].terms.epoch;
        require(epoch > current, EscrowStaleEpoch(payer, signer, current, epoch));
        bytes32 digest = _hashTypedDataV4(_hashGrant(payer, signer, params, payees, epoch));
        require(SignatureChecker.isValidSignatureNowCalldata(payer, digest, signature), EscrowInvalidSignature(payer));
        _grant(payer, signer, params, payees, epoch);
    }

    /**
     * @notice Same as {grantWithSig}, authorised by the payer's ONE signature over many chains: `approval` carries
     * the signed Merkle root, the proof of this chain's leaf and the payer's signature of `MultichainApproval(root)`
     * (see {MultichainApproval}). The leaf is the `Grant` struct hash bound to `block.chainid` and this escrow, so a
     * leaf made for another chain or escrow is refused. Epochs work exactly as in {grantWithSig}: the leaf is
     * single-use, and a revoke through an epoch at or above it (on this chain) refuses it forever.
     * @dev Emits {GrantIssued} and {MultichainApproval-MultichainApprovalUsed}. Reverts with
     * {MultichainApproval-MultichainProofInvalid}, {EscrowInvalidSignature} or {EscrowStaleEpoch}.
     */
    function grantWithProof(
        address payer,
        address signer,
        GrantParams calldata params,
        address[] calldata payees,
        uint32 epoch,
        MultichainApproval.Proof calldata approval
    ) external {
        uint32 current = _grants[payer][signer].terms.epoch;
        require(epoch > current, EscrowStaleEpoch(payer, signer, current, epoch));
        _useMultichainApproval(payer, _hashGrant(payer, signer, params, payees, epoch), approval);
        _grant(payer, signer, params, payees, epoch);
    }

    /// @inheritdoc IAgentEscrow
    function revoke(address signer, uint32 epoch) external {
        _revoke(msg.sender, signer, epoch);
    }

    /// @inheritdoc IAgentEscrow
    function revokeWithSig(address payer, address signer, uint32 epoch, bytes calldata signature) external {
        bytes32 digest = _hashTypedDataV4(keccak256(abi.encode(REVOKE_TYPEHASH, payer, signer, epoch)));
        require(SignatureChecker.isValidSignatureNowCalldata(payer, digest, signature), EscrowInvalidSignature(payer));
        _revoke(payer, signer, epoch);
    }

    /**
     * @notice Same as {revokeWithSig}, authorised by the payer's one multichain signature (see {grantWithProof}):
     * one signed root whose leaves revoke the key on every chain listed ("revoke everywhere"), relayed per chain.
     * @dev Emits {GrantRevoked} and {MultichainApproval-MultichainApprovalUsed}. Reverts with
     * {MultichainApproval-MultichainProofInvalid}, {EscrowInvalidSignature} or {EscrowStaleEpoch}.
     */
    function revokeWithProof(address payer, address signer, uint32 epoch, MultichainApproval.Proof calldata approval)
        external
    {
        _useMultichainApproval(payer, keccak256(abi.encode(REVOKE_TYPEHASH, payer, signer, epoch)), approval);
        _revoke(payer, signer, epoch);
    }

    // ------------------------------------------------------------------ payments

    /// @inheritdoc IAgentEscrow
    function settle(Payment[] calldata payments, bytes[] calldata signatures)
        external
        nonReentrant
        returns (Reason[] memory reasons)
    {
        uint256 n = payments.length;
        require(n == signatures.length, EscrowLengthMismatch(n, signatures.length));
        reasons = new Reason[](n);
        Payouts memory payouts = _newPayouts(n);
        Scratch memory scratch;
        for (uint256 i; i < n; ++i) {
            Payment memory payment = payments[i];
            (Reason reason, address signer) = _check(payment, payment.amount, signatures[i], scratch);
            if (reason != Reason.None) {
                reasons[i] = reason;
                emit PaymentFailed(payment.payer, payment.nonce, i, reason);
                continue;
            }
            _apply(payment, payment.amount, signer, scratch);
            _addToGroup(payouts, payment.payee, payment.token, payment.amount);
        }
        _flush(scratch);
        _payAll(payouts);
    }

    /// @inheritdoc IAgentEscrow
    function settlePacked(bytes calldata batch) external nonReentrant returns (Reason[] memory reasons) {
        uint256 n;
        uint256 addresses;
        uint256 base; // calldata position of the batch's first byte
        assembly ("memory-safe") {
            base := batch.offset
            let head := calldataload(base)
            n := shr(240, head)
            addresses := byte(2, head)
        }
        uint256 table = base + 3;
        uint256 end = base + batch.length;
        uint256 p = table + addresses * 20;
        require(batch.length >= 3 && p <= end, EscrowMalformedBatch(0));
        reasons = new Reason[](n);
        Payouts memory payouts = _newPayouts(n);
        Scratch memory scratch;
        // One struct for the whole batch, rewritten per entry: {_check} and {_apply} keep nothing of it. An entry's
        // amount, nonce, deadline and epoch are XORed onto the previous entry's (zero before the first): a run of
        // sequential nonces, equal prices and one deadline sends mostly zero bytes (4 gas each, not 16).
        Payment memory payment;
        for (uint256 i; i < n; ++i) {
            // The fixed 57 bytes of an entry, then its signature.
            require(p + 57 <= end, EscrowMalformedBatch(p - base));
            uint256 indexes;
            uint256 signatureLength;
            assembly ("memory-safe") {
                indexes := shr(232, calldataload(p))
                let field := add(payment, 0x60)
                mstore(field, xor(mload(field), shr(160, calldataload(add(p, 3)))))
                field := add(payment, 0x80)
                mstore(field, xor(mload(field), calldataload(add(p, 15))))
                field := add(payment, 0xa0)
                mstore(field, xor(mload(field), shr(224, calldataload(add(p, 47)))))
                field := add(payment, 0xc0)
                mstore(field, xor(mload(field), shr(224, calldataload(add(p, 51)))))
                signatureLength := shr(240, calldataload(add(p, 55)))
            }
            uint256 start = p + 57 - base;
            require(p + 57 + signatureLength <= end, EscrowMalformedBatch(start));
            {
                (uint256 a, uint256 b, uint256 c) = (indexes >> 16, (indexes >> 8) & 0xff, indexes & 0xff);
                // An index outside the table would read bytes of the entries as an address.
                require(a < addresses && b < addresses && c < addresses, EscrowMalformedBatch(start - 57));
                assembly ("memory-safe") {
                    mstore(payment, shr(96, calldataload(add(table, mul(a, 20)))))
                    mstore(add(payment, 0x20), shr(96, calldataload(add(table, mul(b, 20)))))
                    mstore(add(payment, 0x40), shr(96, calldataload(add(table, mul(c, 20)))))
                }
            }
            p += 57 + signatureLength;
            (Reason reason, address signer) =
                _check(payment, payment.amount, batch[start:start + signatureLength], scratch);
            if (reason != Reason.None) {
                reasons[i] = reason;
                emit PaymentFailed(payment.payer, payment.nonce, i, reason);
                continue;
            }
            _apply(payment, payment.amount, signer, scratch);
            _addToGroup(payouts, payment.payee, payment.token, payment.amount);
        }
        require(p == end, EscrowMalformedBatch(p - base));
        _flush(scratch);
        _payAll(payouts);
    }

    /// @inheritdoc IAgentEscrow
    function settleMetered(Payment[] calldata payments, uint256[] calldata actuals, bytes[] calldata signatures)
        external
        nonReentrant
        returns (Reason[] memory reasons)
    {
        uint256 n = payments.length;
        require(n == signatures.length, EscrowLengthMismatch(n, signatures.length));
        require(n == actuals.length, EscrowActualsLengthMismatch(n, actuals.length));
        return _settleMetered(payments, actuals, signatures);
    }

    /// @inheritdoc IAgentEscrow
    function setSettler(address operator, bool allowed) external {
        _settlers[msg.sender][operator] = allowed;
        emit SettlerSet(msg.sender, operator, allowed);
    }

    /// @inheritdoc IAgentEscrow
    function isSettler(address payee, address operator) external view returns (bool) {
        return operator == payee || _settlers[payee][operator];
    }

    /// @inheritdoc IAgentEscrow
    function settleOne(Payment calldata payment, bytes calldata signature) external nonReentrant {
        uint256 amount = payment.amount;
        Scratch memory scratch;
        (Reason reason, address signer) = _check(payment, amount, signature, scratch);
        require(reason == Reason.None, EscrowPaymentRejected(reason));
        _apply(payment, amount, signer, scratch);
        _flush(scratch);
        _payout(payment.payee, payment.token, amount);
    }

    /// @inheritdoc IAgentEscrow
    function check(Payment calldata payment, bytes calldata signature)
        external
        view
        returns (Reason reason, address signer)
    {
        Scratch memory scratch;
        return _check(payment, payment.amount, signature, scratch);
    }

    // ------------------------------------------------------------------ views

    /// @inheritdoc IAgentEscrow
    function hashPayment(Payment calldata payment) external view returns (bytes32) {
        return _hashPayment(payment);
    }

    /// @inheritdoc IAgentEscrow
    function depositOf(address payer, address token) external view returns (uint256) {
        return _deposits[payer][token];
    }

    /// @inheritdoc IAgentEscrow
    function withdrawalOf(address payer, address token) external view returns (uint256 amount, uint256 readyAt) {
        Withdrawal memory request = _withdrawals[payer][token];
        return (request.amount, request.readyAt);
    }

    /// @inheritdoc IAgentEscrow
    function owedTo(address payee, address token) external view returns (uint256) {
        return _owed[payee][token];
    }

    /// @inheritdoc IAgentEscrow
    function grantOf(address payer, address signer) external view returns (GrantInfo memory info) {
        Grant memory g = _grants[payer][signer];
        info = GrantInfo({
            token: g.terms.token,
            epoch: g.terms.epoch,
            validAfter: g.terms.validAfter,
            validUntil: g.terms.validUntil,
            maxPerCall: g.limits.maxPerCall,
            budget: g.budget,
            spent: g.budget - g.limits.remaining,
            payeeCount: g.limits.payeeCount
        });
    }

    /// @inheritdoc IAgentEscrow
    function isPayeeAllowed(address payer, address signer, address payee) external view returns (bool) {
        Grant storage g = _grants[payer][signer];
        if (g.terms.token == address(0)) return false;
        return g.limits.payeeCount == 0 || _payeeAllowed[_payeeKey(payer, signer, g.terms.epoch, payee)];
    }

    /// @inheritdoc IAgentEscrow
    function nonceUsed(address signer, uint256 nonce) external view returns (bool) {
        return _nonceBitmap[signer][nonce >> 8] & (1 << (nonce & 0xff)) != 0;
    }

    /// @inheritdoc IAgentEscrow
    function nonceBitmap(address signer, uint256 word) external view returns (uint256) {
        return _nonceBitmap[signer][word];
    }

    // ------------------------------------------------------------------ internals

    /**
     * @dev The batch of {settleMetered}: {settle}'s loop with a charge per entry (kept apart so that the plain batch,
     * the hot path, pays none of the metered bookkeeping). One payout per distinct (payee, token).
     */
    function _settleMetered(Payment[] calldata payments, uint256[] calldata actuals, bytes[] calldata signatures)
        private
        returns (Reason[] memory reasons)
    {
        uint256 n = payments.length;
        reasons = new Reason[](n);
        Payouts memory payouts = _newPayouts(n);
        Scratch memory scratch;
        for (uint256 i; i < n; ++i) {
            Payment memory payment = payments[i];
            uint256 amount = actuals[i];
            (Reason reason, address signer) = _checkEntry(payment, amount, signatures[i], scratch);
            if (reason != Reason.None) {
                reasons[i] = reason;
                emit PaymentFailed(payment.payer, payment.nonce, i, reason);
                continue;
            }
            _apply(payment, amount, signer, scratch);
            _addToGroup(payouts, payment.payee, payment.token, amount);
        }
        _flush(scratch);
        _payAll(payouts);
    }

    function _newPayouts(uint256 n) private pure returns (Payouts memory) {
        return Payouts(new address[](n), new address[](n), new uint256[](n), 0, address(0), address(0), 0);
    }

    /// @dev One transfer per (payee, token) group of a batch, clearing the transient index on the way.
    function _payAll(Payouts memory payouts) private {
        for (uint256 j; j < payouts.groups; ++j) {
            address payee = payouts.payees[j];
            address token = payouts.tokens[j];
            uint256 slot = _payoutSlot(payee, token);
            // Cleared so that a second settle in the same transaction (multicall) starts from an empty index.
            assembly ("memory-safe") {
                tstore(slot, 0)
            }
            _payout(payee, token, payouts.totals[j]);
        }
    }

    function _credit(address payer, address token, address from, uint256 amount) private {
        _deposits[payer][token] += amount;
        emit Deposited(payer, token, from, amount);
    }

    function _grant(
        address payer,
        address signer,
        GrantParams calldata params,
        address[] calldata payees,
        uint32 epoch
    ) private {
        // The payer's own signature needs no grant, and must not be capped by one.
        require(signer != address(0) && signer != payer, EscrowInvalidSigner(signer));
        require(params.token != address(0), EscrowInvalidToken(params.token));
        require(params.validAfter < params.validUntil, EscrowInvalidWindow(params.validAfter, params.validUntil));

        _grants[payer][signer] = Grant({
            terms: GrantTerms(params.token, epoch, params.validAfter, params.validUntil),
            limits: GrantLimits(params.budget, params.maxPerCall, SafeCast.toUint32(payees.length)),
            budget: params.budget
        });
        for (uint256 i; i < payees.length; ++i) {
            address payee = payees[i];
            bytes32 key = _payeeKey(payer, signer, epoch, payee);
            require(payee != address(0) && payee != address(this) && !_payeeAllowed[key], EscrowInvalidPayee(payee));
            _payeeAllowed[key] = true;
        }
        emit GrantIssued(
            payer,
            signer,
            epoch,
            params.token,
            params.maxPerCall,
            params.budget,
            params.validAfter,
            params.validUntil,
            payees
        );
    }

    /**
     * @dev Ends every grant of (`payer`, `signer`) up to `epoch`. A revoke below the current epoch is refused: the
     * grant now live was signed with a higher number, i.e. after this revoke. Replaying a revoke changes nothing.
     */
    function _revoke(address payer, address signer, uint32 epoch) private {
        Grant storage g = _grants[payer][signer];
        uint32 current = g.terms.epoch;
        require(epoch != 0 && epoch >= current, EscrowStaleEpoch(payer, signer, current, epoch));
        // Only the epoch survives: it is what tells "revoked" from "never granted", voids older payments and
        // refuses every signed grant numbered at or below it.
        g.terms = GrantTerms(address(0), epoch, 0, 0);
        delete g.limits;
        delete g.budget;
        emit GrantRevoked(payer, signer, epoch);
    }

    /**
     * @dev An entry of a metered batch charged `amount`: its checks. A metered charge above the maximum, or below it from someone the payee did not allow, fails
     * before the signature is even looked at: neither can ever pass, whoever signed.
     */
    function _checkEntry(Payment memory payment, uint256 amount, bytes calldata signature, Scratch memory scratch)
        private
        view
        returns (Reason reason, address signer)
    {
        uint256 maximum = payment.amount;
        if (amount > maximum) return (Reason.ActualExceedsAmount, address(0));
        if (amount != maximum && msg.sender != payment.payee && !_settlers[payment.payee][msg.sender]) {
            return (Reason.NotPayeeSettler, address(0));
        }
        (reason, signer) = _check(payment, amount, signature, scratch);
    }

    /// @dev Adds `amount` to the (payee, token) payout group of a batch, opening the group if it is new.
    function _addToGroup(Payouts memory payouts, address payee, address token, uint256 amount) private {
        uint256 group = payouts.last;
        if (group == 0 || payee != payouts.lastPayee || token != payouts.lastToken) {
            uint256 slot = _payoutSlot(payee, token);
            assembly ("memory-safe") {
                group := tload(slot)
            }
            if (group == 0) {
                group = ++payouts.groups;
                payouts.payees[group - 1] = payee;
                payouts.tokens[group - 1] = token;
                assembly ("memory-safe") {
                    tstore(slot, group)
                }
            }
            payouts.lastPayee = payee;
            payouts.lastToken = token;
            payouts.last = group;
        }
        payouts.totals[group - 1] += amount;
    }

    /**
     * @dev The checks of one payment charged `amount` (its signed amount, or a metered charge at most that), in
     * the order the scheme documents, without side effects. The per-call cap holds the signed maximum; the budget
     * and the deposit hold `amount`. `signer` is who signed (the payer, or a session key of the payer), or zero
     * when nobody valid did. Fills `scratch` for {_apply} (meaningful only when the payment passed).
     *
     * The hot path of every batch: storage keys are hashed once and each slot is read once, as a whole word (the
     * layouts are those of {GrantTerms} and {GrantLimits}; see {_checkGrant}).
     */
    function _check(Payment memory payment, uint256 amount, bytes calldata signature, Scratch memory scratch)
        private
        view
        returns (Reason reason, address signer)
    {
        if (block.timestamp > payment.deadline) return (Reason.DeadlineExpired, address(0));
        {
            address payee = payment.payee;
            if (payee == address(0) || payee == address(this)) return (Reason.InvalidPayee, address(0));
        }
        address payer = payment.payer;
        bytes32 digest = _hashPayment(payment);
        scratch.digest = digest;
        signer = _resolveSigner(payer, digest, signature, scratch);
        if (signer == address(0)) return (Reason.InvalidSignature, address(0));

        {
            uint256 nonce = payment.nonce;
            uint256 nonceSlot = _mappingSlot(_mappingSlot(_nonceBitmapSlot(), uint160(signer)), nonce >> 8);
            uint256 bits = scratch.heldNonce;
            if (nonceSlot != scratch.heldNonceSlot) {
                assembly ("memory-safe") {
                    bits := sload(nonceSlot)
                }
            }
            uint256 bit = 1 << (nonce & 0xff);
            if (bits & bit != 0) return (Reason.NonceUsed, signer);
            scratch.nonceSlot = nonceSlot;
            scratch.nonceBits = bits | bit;
        }

        // {_resolveSigner} left the (payer, signer) grant slot in `scratch` for any signer but the payer.
        if (signer != payer) {
            reason = _checkGrant(payment, signer, amount, scratch);
            if (reason != Reason.None) return (reason, signer);
        }
        uint256 depositSlot = _mappingSlot(_mappingSlot(_depositsSlot(), uint160(payer)), uint160(payment.token));
        uint256 deposited = scratch.heldDeposit;
        if (depositSlot != scratch.heldDepositSlot) {
            assembly ("memory-safe") {
                deposited := sload(depositSlot)
            }
        }
        if (amount > deposited) return (Reason.InsufficientDeposit, signer);
        scratch.depositSlot = depositSlot;
        scratch.depositValue = deposited;
    }

    /**
     * @dev The grant checks of {_check}, reading the grant at `scratch.grantSlot` as raw words ({_resolveSigner} left
     * slot 0's in `scratch.terms`): slot 0 is {GrantTerms}
     * (token in bits 0-159, epoch 160-191, validAfter 192-223, validUntil 224-255), slot 1 is {GrantLimits} (remaining
     * 0-127, maxPerCall 128-223, payeeCount 224-255). Leaves the limits word in `scratch` for {_apply}.
     */
    function _checkGrant(Payment memory payment, address signer, uint256 amount, Scratch memory scratch)
        private
        view
        returns (Reason)
    {
        uint256 slot = scratch.grantSlot;
        uint256 terms = scratch.terms;
        uint256 epoch = uint32(terms >> 160);
        {
            uint256 signed = payment.epoch;
            if (epoch == 0 || signed > epoch) return Reason.GrantNotFound;
            address token = address(uint160(terms));
            if (signed < epoch || token == address(0)) return Reason.GrantRevoked;
            if (token != payment.token) return Reason.TokenMismatch;
        }
        if (block.timestamp < uint32(terms >> 192)) return Reason.GrantNotYetValid;
        if (block.timestamp > terms >> 224) return Reason.GrantExpired;

        uint256 limits = scratch.heldLimits;
        if (slot + 1 != scratch.heldLimitsSlot) {
            assembly ("memory-safe") {
                limits := sload(add(slot, 1))
            }
        }
        if (
            limits >> 224 != 0
                && !_payeeAllowed[_payeeKey(payment.payer, signer, uint32(epoch), payment.payee)]
        ) return Reason.PayeeNotAllowed;
        // The cap bounds what the key signed for (the maximum), not just what this settlement charges.
        if (payment.amount > uint96(limits >> 128)) return Reason.AmountExceedsCap;
        if (amount > uint128(limits)) return Reason.BudgetExceeded;
        scratch.limits = limits;
        return Reason.None;
    }

    /**
     * @dev Applies a payment that {_check} accepted for `amount`, with what it read (`scratch`, filled by that very
     * check, with nothing written in between): uses its nonce and debits the deposit and grant. The writes are held
     * in `scratch` (see {Scratch}); a held write of another slot is stored first.
     */
    function _apply(Payment memory payment, uint256 amount, address signer, Scratch memory scratch) private {
        {
            uint256 nonceSlot = scratch.nonceSlot;
            uint256 held = scratch.heldNonceSlot;
            if (nonceSlot != held) {
                _store(held, scratch.heldNonce);
                scratch.heldNonceSlot = nonceSlot;
            }
            scratch.heldNonce = scratch.nonceBits;
        }
        {
            uint256 depositSlot = scratch.depositSlot;
            uint256 held = scratch.heldDepositSlot;
            if (depositSlot != held) {
                _store(held, scratch.heldDeposit);
                scratch.heldDepositSlot = depositSlot;
            }
            // {_check} checked amount <= the deposit.
            scratch.heldDeposit = scratch.depositValue - amount;
        }
        if (signer != payment.payer) {
            uint256 limitsSlot = scratch.grantSlot + 1;
            uint256 held = scratch.heldLimitsSlot;
            if (limitsSlot != held) {
                _store(held, scratch.heldLimits);
                scratch.heldLimitsSlot = limitsSlot;
            }
            // {_check} checked amount <= remaining (the low 128 bits), so the subtraction stays inside that field.
            scratch.heldLimits = scratch.limits - amount;
        }
        _emitSettled(scratch.digest, signer, amount);
    }

    /// @dev Stores the writes {_apply} held in `scratch` and forgets them.
    function _flush(Scratch memory scratch) private {
        _store(scratch.heldNonceSlot, scratch.heldNonce);
        _store(scratch.heldDepositSlot, scratch.heldDeposit);
        _store(scratch.heldLimitsSlot, scratch.heldLimits);
        (scratch.heldNonceSlot, scratch.heldDepositSlot, scratch.heldLimitsSlot) = (0, 0, 0);
    }

    /// @dev `sstore(slot, value)` unless `slot` is 0 (no held write: no mapping entry ever hashes to slot 0).
    function _store(uint256 slot, uint256 value) private {
        if (slot != 0) {
            assembly ("memory-safe") {
                sstore(slot, value)
            }
        }
    }

    /// @dev {PaymentSettled}, encoded by hand: it is the largest cost of a payment after its signature check.
    function _emitSettled(bytes32 digest, address signer, uint256 amount) private {
        bytes32 topic = PaymentSettled.selector;
        assembly ("memory-safe") {
            mstore(0x00, signer)
            mstore(0x20, amount)
            log2(0x00, 0x40, topic, digest)
        }
    }

    function _nonceBitmapSlot() private pure returns (uint256 slot) {
        assembly ("memory-safe") {
            slot := _nonceBitmap.slot
        }
    }

    function _depositsSlot() private pure returns (uint256 slot) {
        assembly ("memory-safe") {
            slot := _deposits.slot
        }
    }

    function _grantsSlot() private pure returns (uint256 slot) {
        assembly ("memory-safe") {
            slot := _grants.slot
        }
    }

    /// @dev The slot of `map[key]` for a mapping at slot `map` whose key is a value type (Solidity's layout).
    function _mappingSlot(uint256 map, uint256 key) private pure returns (uint256 slot) {
        assembly ("memory-safe") {
            mstore(0x00, key)
            mstore(0x20, map)
            slot := keccak256(0x00, 0x40)
        }
    }

    /// @dev Transfers `amount` to `payee`; if the token refuses (e.g. a blocklisted payee), the amount is owed instead.
    function _payout(address payee, address token, uint256 amount) private {
        if (amount == 0) return;
        if (!IERC20(token).trySafeTransfer(payee, amount)) {
            _owed[payee][token] += amount;
            emit PayoutDeferred(payee, token, amount);
        }
    }

    /**
     * @dev Who signed `digest` for `payer`: the payer (ECDSA, or ERC-1271 when it is a contract), else the ECDSA
     * signer, which {_checkGrant} then holds to the payer's grant. Zero when no signature is valid. For an ECDSA
     * signer other than the payer, leaves the (payer, signer) grant slot in `scratch.grantSlot`.
     */
    function _resolveSigner(address payer, bytes32 digest, bytes calldata signature, Scratch memory scratch)
        private
        view
        returns (address signer)
    {
        if (signature.length == 65) {
            address recovered = _recover(digest, signature);
            if (recovered != address(0)) {
                if (recovered == payer) return recovered;
                uint256 slot = _mappingSlot(_mappingSlot(_grantsSlot(), uint160(payer)), uint160(recovered));
                scratch.grantSlot = slot;
                uint256 terms;
                assembly ("memory-safe") {
                    terms := sload(slot)
                }
                // Every signer other than the payer comes from here, so {_checkGrant} reads the terms from scratch.
                scratch.terms = terms;
                // A key the payer granted (or once granted: revocation is reported as such) needs no more.
                if (uint32(terms >> 160) != 0) return recovered;
                signer = recovered;
            }
        }
        // A smart-account payer signs through ERC-1271, whatever the signature's length.
        if (payer.code.length != 0 && _isValidERC1271(payer, digest, signature)) return payer;
    }

    /**
     * @dev ECDSA recovery of a 65-byte `r ++ s ++ v` signature, accepting exactly what OpenZeppelin's
     * `ECDSA.tryRecover` accepts (s in the lower half of the curve order; v that the precompile takes, 27 or 28).
     * Zero when it is not valid. Inline because it runs once per payment of every batch.
     */
    function _recover(bytes32 digest, bytes calldata signature) private view returns (address recovered) {
        assembly ("memory-safe") {
            let s := calldataload(add(signature.offset, 0x20))
            if iszero(gt(s, 0x7FFFFFFFFFFFFFFFFFFFFFFFFFFFFFFF5D576E7357A4501DDFE92F46681B20A0)) {
                let ptr := mload(0x40)
                mstore(ptr, digest)
                mstore(add(ptr, 0x20), byte(0, calldataload(add(signature.offset, 0x40))))
                mstore(add(ptr, 0x40), calldataload(signature.offset))
                mstore(add(ptr, 0x60), s)
                mstore(0x00, 0)
                // The precompile returns no data for an invalid signature, leaving the zero in place.
                if staticcall(gas(), 0x01, ptr, 0x80, 0x00, 0x20) { recovered := mload(0x00) }
            }
        }
    }

    /**
     * @dev ERC-1271 `isValidSignature` with {ERC1271_GAS_LIMIT} gas and at most 32 bytes of return data read, so a
     * hostile payer contract can neither burn a batch's gas nor bloat its memory. (OpenZeppelin's {SignatureChecker}
     * forwards all gas, which is right for a single call but not inside a batch.)
     */
    function _isValidERC1271(address payer, bytes32 digest, bytes calldata signature) private view returns (bool) {
        bytes memory data = abi.encodeCall(IERC1271.isValidSignature, (digest, signature));
        uint256 gasLimit = ERC1271_GAS_LIMIT;
        bool success;
        bytes32 magic;
        assembly ("memory-safe") {
            success := staticcall(gasLimit, payer, add(data, 0x20), mload(data), 0x00, 0x20)
            success := and(success, gt(returndatasize(), 0x1f))
            magic := mload(0x00)
        }
        return success && bytes4(magic) == IERC1271.isValidSignature.selector;
    }

    function _hashPayment(Payment memory payment) private view returns (bytes32) {
        bytes32 typehash = PAYMENT_TYPEHASH;
        bytes32 structHash;
        // `Payment` is a static struct of value types: its 7 words sit contiguously in memory, already ABI-encoded.
        assembly ("memory-safe") {
            let ptr := mload(0x40)
            mstore(ptr, typehash)
            mcopy(add(ptr, 0x20), payment, 0xe0)
            structHash := keccak256(ptr, 0x100)
        }
        return _hashTypedDataV4(structHash);
    }

    /// @dev The EIP-712 struct hash of a `Grant` (what {grantWithSig} signs, and a {grantWithProof} leaf's action).
    function _hashGrant(
        address payer,
        address signer,
        GrantParams calldata params,
        address[] calldata payees,
        uint32 epoch
    ) private pure returns (bytes32) {
        return keccak256(
            abi.encode(
                GRANT_TYPEHASH,
                payer,
                signer,
                params.token,
                params.maxPerCall,
                params.budget,
                params.validAfter,
                params.validUntil,
                keccak256(abi.encodePacked(payees)),
                epoch
            )
        );
    }

    /// @dev Checks a multichain approval of `action` by `payer` (proof of this chain's leaf, then the signature).
    function _useMultichainApproval(address payer, bytes32 action, MultichainApproval.Proof calldata approval) private {
        (bytes32 digest, bytes32 node) = MultichainApproval.verify(approval, action);
        require(
            SignatureChecker.isValidSignatureNowCalldata(payer, digest, approval.signature),
            EscrowInvalidSignature(payer)
        );
        emit MultichainApproval.MultichainApprovalUsed(payer, approval.root, node);
    }

    /// @dev `keccak256(abi.encode(payer, signer, epoch, payee))`, hashed in place: a batch computes it per payment
    /// under an allow-list, and `abi.encode` would leave a fresh 160 bytes of memory behind each time.
    function _payeeKey(address payer, address signer, uint32 epoch, address payee) private pure returns (bytes32 key) {
        assembly ("memory-safe") {
            let ptr := mload(0x40)
            mstore(ptr, and(payer, 0xffffffffffffffffffffffffffffffffffffffff))
            mstore(add(ptr, 0x20), and(signer, 0xffffffffffffffffffffffffffffffffffffffff))
            mstore(add(ptr, 0x40), and(epoch, 0xffffffff))
            mstore(add(ptr, 0x60), and(payee, 0xffffffffffffffffffffffffffffffffffffffff))
            key := keccak256(ptr, 0x80)
        }
    }

    /// @dev Transient-storage index of the (payee, token) payout group within a {settle} call.
    function _payoutSlot(address payee, address token) private pure returns (uint256 slot) {
        assembly ("memory-safe") {
            mstore(0x00, payee)
            mstore(0x20, token)
            slot := keccak256(0x00, 0x40)
        }
    }
}
