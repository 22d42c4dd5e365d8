"""The a2a-x402 extension wire (v0.1 and v0.2, standalone flow), sans-I/O: URIs, metadata keys, statuses,
error codes, and the number repair that A2A 1.0's protobuf `Struct` metadata needs.

The server answers a new task with state `input-required` and, in its status message's metadata,
`x402.payment.status: payment-required` and `x402.payment.required` (a v2 `PaymentRequired`). The client
sends a message on the same `taskId` whose metadata holds `x402.payment.status: payment-submitted` and
`x402.payment.payload` (a v2 `PaymentPayload`). The task then ends `completed` with `payment-completed` and
`x402.payment.receipts` (every settle response so far), or `failed` with `payment-failed`,
`x402.payment.error` (one of the extension's codes) and a failed receipt.

A `Struct` holds every number as a double, so `x402Version: 2` comes back as `2.0` and
`maxTimeoutSeconds: 60` as `60.0`; `integral` turns such values back into ints before validation.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Final

from ._errors import Reason

__all__ = [
    "A2A_X402_ERROR",
    "A2A_X402_EXTENSIONS",
    "A2A_X402_PAYLOAD",
    "A2A_X402_RECEIPTS",
    "A2A_X402_REQUIRED",
    "A2A_X402_STATUS",
    "A2A_X402_V01",
    "A2A_X402_V02",
    "a2a_error_code",
    "integral",
]

A2A_X402_V01: Final = "https://github.com/google-a2a/a2a-x402/v0.1"
A2A_X402_V02: Final = "https://github.com/google-agentic-commerce/a2a-x402/blob/main/spec/v0.2"
#: Both URIs: declared in the agent card and requested by the client (the keys are the same in both).
A2A_X402_EXTENSIONS: Final = (A2A_X402_V02, A2A_X402_V01)

A2A_X402_STATUS: Final = "x402.payment.status"
A2A_X402_REQUIRED: Final = "x402.payment.required"
A2A_X402_PAYLOAD: Final = "x402.payment.payload"
A2A_X402_RECEIPTS: Final = "x402.payment.receipts"
A2A_X402_ERROR: Final = "x402.payment.error"

_CODES: Final[Mapping[str, str]] = {
    Reason.NONCE_ALREADY_USED: "DUPLICATE_NONCE",
    Reason.SIGNATURE: "INVALID_SIGNATURE",
    Reason.VALID_BEFORE: "EXPIRED_PAYMENT",
    Reason.VALID_AFTER: "EXPIRED_PAYMENT",
    Reason.INSUFFICIENT_FUNDS: "INSUFFICIENT_FUNDS",
    Reason.INSUFFICIENT_BALANCE: "INSUFFICIENT_FUNDS",
    Reason.NETWORK_MISMATCH: "NETWORK_MISMATCH",
    Reason.INVALID_NETWORK: "NETWORK_MISMATCH",
    Reason.VALUE_MISMATCH: "INVALID_AMOUNT",
    Reason.TRANSACTION_FAILED: "SETTLEMENT_FAILED",
    Reason.SETTLEMENT_PENDING: "SETTLEMENT_FAILED",
    Reason.UNEXPECTED_SETTLE_ERROR: "SETTLEMENT_FAILED",
}


def a2a_error_code(reason: str, *, settling: bool = False) -> str:
    """The extension's `x402.payment.error` code for an x402 reason (the spec's set is closed: anything else
    is `INVALID_SIGNATURE` when verifying, `SETTLEMENT_FAILED` when settling)."""
    return _CODES.get(reason) or ("SETTLEMENT_FAILED" if settling else "INVALID_SIGNATURE")


def integral(value: Any) -> Any:
    """`value` with every integral float made an int again, recursively (a `Struct` round trip)."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, Mapping):
        return {k: integral(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [integral(v) for v in value]
    return value
