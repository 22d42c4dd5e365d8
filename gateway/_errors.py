"""The gateway's error root.

    GatewayError               code, status_hint
    ├── ConfigurationError     500  a route, price or scheme set up wrongly (raised at start-up, or by a
    │                               per-request pricing function returning nonsense)
    ├── PaymentFailed          402  a payment that cannot be accepted; `code` is the x402 reason string, which
    │                               `x402.error_answer` maps to the status and MPP problem type per protocol
    └── InvalidTransition      500  the pipeline tried a payment-state transition the table does not allow

Errors from `x402` (`X402Error`) and `escrow` (`EscrowError`) are converted to `PaymentFailed` at the
pipeline boundary, keeping their codes, so the middleware answers every failure from one place.
"""

from __future__ import annotations

__all__ = ["ConfigurationError", "GatewayError", "InvalidTransition", "PaymentFailed"]


class GatewayError(Exception):
    """Root of every error raised by `gateway/`."""

    default_code = "gateway_error"
    default_status = 500

    def __init__(self, message: str = "", *, code: str | None = None, status_hint: int | None = None) -> None:
        self.message = message or type(self).__name__
        self.code: str = code if code is not None else self.default_code
        self.status_hint: int = status_hint if status_hint is not None else self.default_status
        super().__init__(self.message)

    def __repr__(self) -> str:
        name = type(self).__name__
        return f"{name}(code={self.code!r}, status_hint={self.status_hint}, message={self.message!r})"


class ConfigurationError(GatewayError):
    default_code = "configuration_error"


class PaymentFailed(GatewayError):
    """A refused payment; `headers` join the answer (`PAYMENT-RESPONSE` with `success: false`, ...)."""

    default_code = "invalid_payload"
    default_status = 402

    def __init__(self, message: str = "", *, code: str | None = None, status_hint: int | None = None) -> None:
        super().__init__(message, code=code, status_hint=status_hint)
        self.headers: list[tuple[bytes, bytes]] = []


class InvalidTransition(GatewayError):
    default_code = "invalid_transaction_state"
