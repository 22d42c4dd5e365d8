"""x402 header codecs: standard base64 (with padding) of compact UTF-8 JSON.

Every decoder takes the header value as ``str`` or ``bytes`` and either returns a typed object or raises
:class:`~x402.MalformedPayment` (never any other exception). Inputs are bounded by :data:`MAX_HEADER_BYTES`
(and :data:`MAX_BODY_BYTES` for the v1 JSON body).
"""

from __future__ import annotations

import base64
import binascii
from typing import Any, Final, TypeVar

import msgspec

from ._errors import MalformedPayment, Reason
from ._types import (
    FacilitatorRequest,
    FacilitatorRequestV1,
    PaymentPayload,
    PaymentPayloadV1,
    PaymentRequired,
    PaymentRequiredV1,
    SettleResponse,
)

__all__ = [
    "MAX_BODY_BYTES",
    "MAX_HEADER_BYTES",
    "PAYMENT_REQUIRED_HEADER",
    "PAYMENT_RESPONSE_HEADER",
    "PAYMENT_SIGNATURE_HEADER",
    "X_PAYMENT_HEADER",
    "X_PAYMENT_RESPONSE_HEADER",
    "b64_json_decode",
    "b64_json_encode",
    "decode_payment_required",
    "decode_payment_required_v1",
    "decode_payment_response",
    "decode_payment_signature",
    "decode_x_payment",
    "encode_payment_required",
    "encode_payment_required_v1",
    "encode_payment_response",
    "encode_payment_signature",
    "encode_x_payment",
    "json_decode",
    "json_encode",
]

PAYMENT_REQUIRED_HEADER: Final = "PAYMENT-REQUIRED"
PAYMENT_SIGNATURE_HEADER: Final = "PAYMENT-SIGNATURE"
PAYMENT_RESPONSE_HEADER: Final = "PAYMENT-RESPONSE"
X_PAYMENT_HEADER: Final = "X-PAYMENT"
X_PAYMENT_RESPONSE_HEADER: Final = "X-PAYMENT-RESPONSE"

#: Upper bound for one header value (base64 text). Challenges with many offers and extension schemas stay
#: far below it; anything larger is refused before decoding.
MAX_HEADER_BYTES: Final = 64 * 1024
#: Upper bound for a JSON body decoded by this package (the v1 402 body, facilitator bodies).
MAX_BODY_BYTES: Final = 1024 * 1024

T = TypeVar("T")

_json_encoder: Final = msgspec.json.Encoder()


def json_encode(obj: Any) -> bytes:
    """Compact JSON of a wire object."""
    return _json_encoder.encode(obj)


class _Decoders:
    """Typed JSON decoders, built once per type and reused."""

    def __init__(self) -> None:
        self._cache: dict[Any, msgspec.json.Decoder[Any]] = {}

    def get(self, tp: type[T]) -> msgspec.json.Decoder[T]:
        dec = self._cache.get(tp)
        if dec is None:
            dec = self._cache[tp] = msgspec.json.Decoder(tp)
        return dec


_decoders: Final = _Decoders()
# Built eagerly for the hot types.
for _tp in (PaymentRequired, PaymentPayload, PaymentRequiredV1, PaymentPayloadV1, SettleResponse):
    _decoders.get(_tp)


#: Types that carry ``x402Version``: a decode failure caused by another version gets its own reason code.
_VERSIONED: Final[dict[Any, int]] = {
    PaymentRequired: 2,
    PaymentPayload: 2,
    FacilitatorRequest: 2,
    PaymentRequiredV1: 1,
    PaymentPayloadV1: 1,
    FacilitatorRequestV1: 1,
}


def _version_error(data: bytes | str, expected: int) -> MalformedPayment | None:
    """If the JSON object carries another ``x402Version``, say so with the specific reason code."""
    try:
        probe = msgspec.json.decode(data, type=dict[str, Any])
    except (msgspec.DecodeError, msgspec.ValidationError):
        return None
    version = probe.get("x402Version")
    if "x402Version" in probe and version != expected:
        return MalformedPayment(
            f"unsupported x402Version {version!r} (expected {expected})", code=Reason.INVALID_X402_VERSION
        )
    return None


def json_decode(data: bytes | str, tp: type[T], *, limit: int = MAX_BODY_BYTES, what: str = "body") -> T:
    """Decode JSON into ``tp``; any failure is a :class:`MalformedPayment`."""
    if not isinstance(data, bytes | str):
        raise MalformedPayment(f"{what}: expected bytes or str")
    if len(data) > limit:
        raise MalformedPayment(f"{what}: {len(data)} bytes exceeds the {limit}-byte limit")
    try:
        return _decoders.get(tp).decode(data)
    except msgspec.ValidationError as exc:
        expected = _VERSIONED.get(tp)
        version_error = None if expected is None else _version_error(data, expected)
        if version_error is not None:
            raise version_error from None
        raise MalformedPayment(f"{what}: {exc}") from None
    except (msgspec.DecodeError, UnicodeError, ValueError, RecursionError) as exc:
        raise MalformedPayment(f"{what}: invalid JSON ({exc})") from None


def b64_json_encode(obj: Any) -> str:
    """Standard base64 (with padding) of compact JSON: the x402 header encoding."""
    return base64.b64encode(_json_encoder.encode(obj)).decode("ascii")


def _b64decode(value: str | bytes, what: str) -> bytes:
    if isinstance(value, str):
        try:
            raw = value.encode("ascii")
        except UnicodeEncodeError:
            raise MalformedPayment(f"{what}: header is not ASCII base64") from None
    elif isinstance(value, bytes | bytearray | memoryview):
        raw = bytes(value)
    else:
        raise MalformedPayment(f"{what}: expected str or bytes")
    if len(raw) > MAX_HEADER_BYTES:
        raise MalformedPayment(
            f"{what}: header of {len(raw)} bytes exceeds the {MAX_HEADER_BYTES}-byte limit"
        )
    raw = raw.strip(b" \t")
    if not raw:
        raise MalformedPayment(f"{what}: empty header")
    # Tolerate a sender that drops the padding; never tolerate other alphabets or junk.
    if len(raw) % 4:
        raw += b"=" * (-len(raw) % 4)
    try:
        return base64.b64decode(raw, validate=True)
    except (binascii.Error, ValueError):
        raise MalformedPayment(f"{what}: invalid base64") from None


def b64_json_decode(value: str | bytes, tp: type[T], *, what: str = "header") -> T:
    """Decode a standard-base64 JSON header value into ``tp`` or raise :class:`MalformedPayment`."""
    return json_decode(_b64decode(value, what), tp, limit=MAX_HEADER_BYTES, what=what)


# ------------------------------------------------------------------------------------ per-header codecs


def encode_payment_required(value: PaymentRequired) -> str:
    """``PAYMENT-REQUIRED`` header value (v2 challenge)."""
    return b64_json_encode(value)


def decode_payment_required(value: str | bytes) -> PaymentRequired:
    return b64_json_decode(value, PaymentRequired, what=PAYMENT_REQUIRED_HEADER)


def encode_payment_signature(value: PaymentPayload) -> str:
    """``PAYMENT-SIGNATURE`` header value (v2 payment)."""
    return b64_json_encode(value)


def decode_payment_signature(value: str | bytes) -> PaymentPayload:
    return b64_json_decode(value, PaymentPayload, what=PAYMENT_SIGNATURE_HEADER)


def encode_x_payment(value: PaymentPayloadV1) -> str:
    """``X-PAYMENT`` header value (v1 payment)."""
    return b64_json_encode(value)


def decode_x_payment(value: str | bytes) -> PaymentPayloadV1:
    return b64_json_decode(value, PaymentPayloadV1, what=X_PAYMENT_HEADER)


def encode_payment_response(value: SettleResponse) -> str:
    """``PAYMENT-RESPONSE`` / ``X-PAYMENT-RESPONSE`` header value."""
    return b64_json_encode(value)


def decode_payment_response(value: str | bytes) -> SettleResponse:
    """Decode ``PAYMENT-RESPONSE`` or ``X-PAYMENT-RESPONSE`` (same encoding in v1 and v2)."""
    return b64_json_decode(value, SettleResponse, what=PAYMENT_RESPONSE_HEADER)


def encode_payment_required_v1(value: PaymentRequiredV1) -> bytes:
    """The v1 402 JSON body."""
    return _json_encoder.encode(value)


def decode_payment_required_v1(body: bytes | str) -> PaymentRequiredV1:
    """Decode a v1 402 JSON body (``{"x402Version":1,"accepts":[...]}``)."""
    return json_decode(body, PaymentRequiredV1, what="402 body")
