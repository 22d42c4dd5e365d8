"""One error tree for the whole wire package.

    X402Error                      code, status_hint, message
    ├── MalformedPayment           400  bytes that do not decode into a wire type
    ├── InvalidSignature           402  a malformed or high-s signature, or one by the wrong key
    ├── PaymentRejected            402  a well-formed payment that fails a check (code = x402 invalidReason)
    ├── InvalidChallenge           402  MPP challenge id unknown, tampered with, or expired
    ├── UnsupportedScheme          400  scheme / method / network this side does not speak
    ├── NoPayableOffer             402  (client) no offer in a 402 that the wallet can pay
    └── SpendPolicyViolation       402  (client) the spend policy refused, raised before anything is signed

Every error carries a stable ``code``. Where an x402 reason string exists it *is* the code
(``invalid_exact_evm_payload_signature``, ``invalid_payload``, ...). :func:`error_answer` maps any code to
the HTTP status, the x402 ``invalidReason`` and the MPP problem type a server should answer with, so the
gateway answers the same failure the same way in both protocols.
"""

from __future__ import annotations

from dataclasses import dataclass
from http import HTTPStatus
from typing import Final

__all__ = [
    "ErrorAnswer",
    "InvalidChallenge",
    "InvalidSignature",
    "MalformedPayment",
    "NoPayableOffer",
    "PROBLEM_BASE",
    "PaymentRejected",
    "Reason",
    "SpendPolicyViolation",
    "UnsupportedScheme",
    "X402Error",
    "error_answer",
]

PROBLEM_BASE: Final = "https://paymentauth.org/problems/"


class Reason:
    """x402 ``invalidReason`` / ``errorReason`` strings (x402 spec §9 and the exact/EVM mechanism)."""

    INVALID_PAYLOAD: Final = "invalid_payload"
    INVALID_X402_VERSION: Final = "invalid_x402_version"
    INVALID_NETWORK: Final = "invalid_network"
    INVALID_SCHEME: Final = "invalid_scheme"
    UNSUPPORTED_SCHEME: Final = "unsupported_scheme"
    NETWORK_MISMATCH: Final = "network_mismatch"
    INVALID_PAYMENT_REQUIREMENTS: Final = "invalid_payment_requirements"
    INSUFFICIENT_FUNDS: Final = "insufficient_funds"
    # Ours: the balance covers the payment, but not on top of the payer's accepted, unsettled payments.
    INSUFFICIENT_FUNDS_PENDING: Final = "insufficient_funds_pending"
    INVALID_TRANSACTION_STATE: Final = "invalid_transaction_state"
    UNEXPECTED_VERIFY_ERROR: Final = "unexpected_verify_error"
    UNEXPECTED_SETTLE_ERROR: Final = "unexpected_settle_error"
    MISSING_EIP712_DOMAIN: Final = "missing_eip712_domain"
    SIGNATURE: Final = "invalid_exact_evm_payload_signature"
    RECIPIENT_MISMATCH: Final = "invalid_exact_evm_payload_recipient_mismatch"
    VALUE_MISMATCH: Final = "invalid_exact_evm_payload_authorization_value_mismatch"
    VALID_BEFORE: Final = "invalid_exact_evm_payload_authorization_valid_before"
    VALID_AFTER: Final = "invalid_exact_evm_payload_authorization_valid_after"
    NONCE_ALREADY_USED: Final = "invalid_exact_evm_nonce_already_used"
    INSUFFICIENT_BALANCE: Final = "invalid_exact_evm_insufficient_balance"
    TRANSACTION_FAILED: Final = "transaction_failed"
    SETTLEMENT_PENDING: Final = "settlement_pending"
    # Ours (MPP-only failure kinds that x402 has no string for).
    INVALID_CHALLENGE: Final = "invalid_challenge"
    CHALLENGE_EXPIRED: Final = "challenge_expired"
    CHALLENGE_BINDING_MISMATCH: Final = "challenge_binding_mismatch"
    # Client side.
    NO_PAYABLE_OFFER: Final = "no_payable_offer"
    SPEND_POLICY_VIOLATION: Final = "spend_policy_violation"


class X402Error(Exception):
    """Root of every error raised by :mod:`x402`.

    ``code`` is a stable machine-readable string; ``status_hint`` is the HTTP status a server should answer
    with (as h11's ``error_status_hint``).
    """

    default_code: str = "x402_error"
    default_status: int = 400

    def __init__(self, message: str = "", *, code: str | None = None, status_hint: int | None = None) -> None:
        self.message = message or self.__class__.__doc__ or self.__class__.__name__
        self.code: str = code if code is not None else self.default_code
        self.status_hint: int = status_hint if status_hint is not None else self.default_status
        super().__init__(self.message)

    def __repr__(self) -> str:
        name = type(self).__name__
        return f"{name}(code={self.code!r}, status_hint={self.status_hint}, message={self.message!r})"


class MalformedPayment(X402Error):
    """The header or body does not decode into the expected wire type."""

    default_code = Reason.INVALID_PAYLOAD
    default_status = 400


class InvalidSignature(X402Error):
    """The signature is malformed, non-canonical (high s) or does not recover to the claimed signer."""

    default_code = Reason.SIGNATURE
    default_status = 402


class PaymentRejected(X402Error):
    """A well-formed payment that fails a check; ``code`` is the x402 ``invalidReason``."""

    default_code = Reason.INVALID_PAYLOAD
    default_status = 402

    def __init__(self, reason: str, message: str = "", *, status_hint: int | None = None) -> None:
        super().__init__(message or reason, code=reason, status_hint=status_hint)

    @property
    def invalid_reason(self) -> str:
        return self.code


class InvalidChallenge(X402Error):
    """An MPP challenge that is unknown, tampered with, or expired."""

    default_code = Reason.INVALID_CHALLENGE
    default_status = 402


class UnsupportedScheme(X402Error):
    """A scheme, MPP method/intent or network this side does not support."""

    default_code = Reason.UNSUPPORTED_SCHEME
    default_status = 400


class NoPayableOffer(X402Error):
    """Client side: no offer in the 402 is payable by the wallet under the spend policy."""

    default_code = Reason.NO_PAYABLE_OFFER
    default_status = 402


class SpendPolicyViolation(X402Error):
    """Client side: the spend policy refused the payment; raised before anything is signed."""

    default_code = Reason.SPEND_POLICY_VIOLATION
    default_status = 402


@dataclass(frozen=True, slots=True)
class ErrorAnswer:
    """How a server answers one failure kind in both protocols."""

    status: int  # HTTP status for an x402 client
    invalid_reason: str  # x402 invalidReason / errorReason
    problem_type: str  # RFC 9457 type URI for an MPP client
    title: str  # RFC 9457 title
    mpp_status: int  # HTTP status for an MPP client (the MPP core spec answers 402 for nearly everything)
    #: The payment was already presented (a replay). The MPP core spec answers 402 `invalid-challenge`
    #: with a fresh challenge ("already-used challenge id"); a server may instead answer as pympp does
    #: (403, no challenge) so that an auto-paying client is not invited to pay again.
    replayed: bool = False


def _p(name: str) -> str:
    return PROBLEM_BASE + name


_PAYMENT_REQUIRED = ("payment-required", "Payment Required")
_INSUFFICIENT = ("payment-insufficient", "Payment Insufficient")
_EXPIRED = ("payment-expired", "Payment Expired")
_VERIFICATION = ("verification-failed", "Verification Failed")
_MALFORMED = ("malformed-credential", "Malformed Credential")
_CHALLENGE = ("invalid-challenge", "Invalid Challenge")
_METHOD = ("method-unsupported", "Method Unsupported")
# A failure on the server's side is no payment problem: every paymentauth.org type is a 402 (or 400), so a
# 5xx answer says "about:blank" (RFC 9457 §4.2.1) instead of borrowing one of them.
_SERVER = ("", "Internal Server Error")

# code -> (x402 status, MPP problem, MPP status)
_TABLE: Final[dict[str, tuple[int, tuple[str, str], int]]] = {
    "payment_required": (402, _PAYMENT_REQUIRED, 402),
    Reason.INVALID_PAYLOAD: (400, _MALFORMED, 402),
    Reason.INVALID_X402_VERSION: (400, _MALFORMED, 402),
    Reason.INVALID_PAYMENT_REQUIREMENTS: (402, _VERIFICATION, 402),
    Reason.INVALID_NETWORK: (400, _METHOD, 400),
    Reason.INVALID_SCHEME: (400, _METHOD, 400),
    Reason.UNSUPPORTED_SCHEME: (400, _METHOD, 400),
    Reason.NETWORK_MISMATCH: (402, _VERIFICATION, 402),
    Reason.MISSING_EIP712_DOMAIN: (402, _VERIFICATION, 402),
    Reason.SIGNATURE: (402, _VERIFICATION, 402),
    Reason.RECIPIENT_MISMATCH: (402, _VERIFICATION, 402),
    Reason.VALUE_MISMATCH: (402, _INSUFFICIENT, 402),
    Reason.VALID_BEFORE: (402, _EXPIRED, 402),
    Reason.VALID_AFTER: (402, _VERIFICATION, 402),
    # A replay: the core spec's status-code table answers an already-used challenge with 402
    # `invalid-challenge` and a fresh challenge (`_REPLAYS`; the gateway can answer 403 as pympp does).
    Reason.NONCE_ALREADY_USED: (402, _CHALLENGE, 402),
    Reason.INSUFFICIENT_BALANCE: (402, _VERIFICATION, 402),
    Reason.INSUFFICIENT_FUNDS: (402, _VERIFICATION, 402),
    Reason.INSUFFICIENT_FUNDS_PENDING: (402, _VERIFICATION, 402),
    Reason.INVALID_TRANSACTION_STATE: (402, _VERIFICATION, 402),
    Reason.TRANSACTION_FAILED: (402, _VERIFICATION, 402),
    Reason.SETTLEMENT_PENDING: (402, _VERIFICATION, 402),
    Reason.UNEXPECTED_VERIFY_ERROR: (500, _SERVER, 500),
    Reason.UNEXPECTED_SETTLE_ERROR: (500, _SERVER, 500),
    Reason.INVALID_CHALLENGE: (402, _CHALLENGE, 402),
    Reason.CHALLENGE_BINDING_MISMATCH: (402, _CHALLENGE, 402),
    Reason.CHALLENGE_EXPIRED: (402, _EXPIRED, 402),
    Reason.NO_PAYABLE_OFFER: (402, _PAYMENT_REQUIRED, 402),
    Reason.SPEND_POLICY_VIOLATION: (402, _PAYMENT_REQUIRED, 402),
    # The `escrow` scheme (``x402._escrow.EscrowCode``; spelled out here because that module imports this
    # one). Each row answers like its `exact` counterpart, so a client reacts to both schemes alike.
    "escrow_deadline_expired": (402, _EXPIRED, 402),  # as VALID_BEFORE: sign a fresh payment
    "escrow_deadline_too_soon": (402, _VERIFICATION, 402),
    "escrow_invalid_payee": (402, _VERIFICATION, 402),
    "invalid_escrow_signature": (402, _VERIFICATION, 402),
    # A replay (store claim or on-chain bitmap), or a nonce that paid another payment: as for `exact`.
    "escrow_nonce_used": (402, _CHALLENGE, 402),
    "escrow_nonce_reused": (402, _CHALLENGE, 402),
    "escrow_grant_not_found": (402, _VERIFICATION, 402),
    "escrow_grant_revoked": (402, _VERIFICATION, 402),
    "escrow_token_mismatch": (402, _VERIFICATION, 402),
    "escrow_grant_not_yet_valid": (402, _VERIFICATION, 402),
    "escrow_grant_expired": (402, _VERIFICATION, 402),
    "escrow_payee_not_allowed": (402, _VERIFICATION, 402),
    "escrow_amount_exceeds_cap": (402, _VERIFICATION, 402),
    "escrow_budget_exceeded": (402, _VERIFICATION, 402),  # as INSUFFICIENT_FUNDS
    "escrow_insufficient_deposit": (402, _VERIFICATION, 402),  # as INSUFFICIENT_BALANCE
    "escrow_actual_exceeds_amount": (402, _VERIFICATION, 402),  # metered: settler asked past the maximum
    "escrow_not_payee_settler": (402, _VERIFICATION, 402),  # metered: settler not allowed by the payee
    # x402 `upto` (the official SDK's codes)
    "invalid_permit2_spender": (402, _VERIFICATION, 402),
    "invalid_permit2_recipient_mismatch": (402, _VERIFICATION, 402),
    "upto_facilitator_mismatch": (402, _VERIFICATION, 402),
    "permit2_deadline_expired": (402, _VERIFICATION, 402),
    "permit2_not_yet_valid": (402, _VERIFICATION, 402),
    "permit2_amount_mismatch": (402, _VERIFICATION, 402),
    "permit2_token_mismatch": (402, _VERIFICATION, 402),
    "invalid_permit2_signature": (402, _VERIFICATION, 402),
    "permit2_allowance_required": (412, _VERIFICATION, 402),  # the spec's status: approve Permit2 first
    "permit2_insufficient_balance": (402, _VERIFICATION, 402),
    "permit2_nonce_used": (402, _CHALLENGE, 402),
    "invalid_upto_evm_network_mismatch": (402, _VERIFICATION, 402),
    "invalid_upto_evm_transaction_failed": (402, _VERIFICATION, 402),
    "invalid_upto_evm_payload_settlement_exceeds_amount": (402, _VERIFICATION, 402),
    "escrow_recipient_mismatch": (402, _VERIFICATION, 402),  # as RECIPIENT_MISMATCH
    "escrow_amount_mismatch": (402, _INSUFFICIENT, 402),  # as VALUE_MISMATCH
    "escrow_contract_mismatch": (402, _VERIFICATION, 402),  # as NETWORK_MISMATCH
}


def _phrase(status: int) -> str:
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return _SERVER[1]


#: Codes meaning "this payment was already presented" (see `ErrorAnswer.replayed`).
_REPLAYS: Final = frozenset({Reason.NONCE_ALREADY_USED, "escrow_nonce_used", "escrow_nonce_reused"})


def error_answer(error: X402Error | str) -> ErrorAnswer:
    """Map an error (or a bare code) to the answer a server gives an x402 and an MPP client.

    Unknown codes (the x402 reason set is open) are verification failures: 402 ``verification-failed``
    when the error's status hint is 402, ``malformed-credential`` (x402: 400) when it is 400; a 5xx hint
    is answered as itself with ``about:blank``.
    """
    code = error if isinstance(error, str) else error.code
    row = _TABLE.get(code)
    if row is None:
        hint = 402 if isinstance(error, str) else error.status_hint
        if hint == 400:
            row = (400, _MALFORMED, 402)
        elif hint >= 500:
            row = (hint, ("", _phrase(hint)), hint)
        else:
            row = (hint, _VERIFICATION, 402)
    status, (name, title), mpp_status = row
    return ErrorAnswer(
        status=status,
        invalid_reason=code,
        problem_type=_p(name) if name else "about:blank",
        title=title,
        mpp_status=mpp_status,
        replayed=code in _REPLAYS,
    )
