"""MPP (draft-httpauth-payment): the ``Payment`` HTTP authentication scheme, its wire types and challenge ids.

The header grammar (formatting and parsing the headers below) is in `x402._mpp_header`.

- challenges: ``WWW-Authenticate: Payment id="…", realm="…", method="…", intent="…", request="…"``
  (RFC 9110 auth-params; several challenges per header value and several header lines);
- credentials: ``Authorization: Payment <base64url-nopad(JSON)>``;
- receipts: ``Payment-Receipt: <base64url-nopad(JSON)>``;
- challenge binding: ``id = base64url(HMAC-SHA256(secret, "realm|method|intent|request|expires|digest|
  opaque"))`` with ``request`` and ``opaque`` as base64url of JCS (RFC 8785) JSON; the slots are joined
  unescaped, so a field containing ``|`` could move the slot boundaries: such fields are never issued nor
  verified (:func:`check_bound_field`);
- problem details (RFC 9457) that one body can share with an x402 v1 client.

Parsers raise only :class:`~x402.MalformedPayment`. Formatters raise ``ValueError`` for values that cannot
be put on the wire (control characters, empty required fields): that is a programming error on our side.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import json
import re
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime, timedelta, timezone
from hashlib import sha256
from typing import Annotated, Any, Final

import msgspec
import rfc8785
from msgspec import Meta

from ._errors import MalformedPayment
from ._keccak import keccak256 as keccak
from ._types import PaymentRequirementsV1

__all__ = [
    "AUTHORIZATION_HEADER",
    "MAX_MPP_HEADER_BYTES",
    "MIN_SECRET_BYTES",
    "MppChallenge",
    "MppCredential",
    "MppReceipt",
    "PAYMENT_AUTHORIZATION_HEADER",
    "PAYMENT_RECEIPT_HEADER",
    "PROBLEM_CONTENT_TYPE",
    "ProblemDetails",
    "WWW_AUTHENTICATE_HEADER",
    "b64url_decode",
    "b64url_encode",
    "challenge_hash",
    "challenge_hash_pympp",
    "challenge_id",
    "check_bound_field",
    "decode_json_param",
    "encode_json_param",
    "encode_problem",
    "decode_problem",
    "jcs",
    "rfc3339",
    "parse_rfc3339",
    "verify_challenge",
]

WWW_AUTHENTICATE_HEADER: Final = "WWW-Authenticate"
AUTHORIZATION_HEADER: Final = "Authorization"
PAYMENT_AUTHORIZATION_HEADER: Final = "Payment-Authorization"
PAYMENT_RECEIPT_HEADER: Final = "Payment-Receipt"
PROBLEM_CONTENT_TYPE: Final = "application/problem+json"

#: Bound on one header value (the spec asks servers to stay under 8 KB and clients to handle 4 KB).
MAX_MPP_HEADER_BYTES: Final = 64 * 1024
#: HMAC secrets shorter than this are refused (the mpp-tools vectors require at least 32 bytes).
MIN_SECRET_BYTES: Final = 32

_SCHEME: Final = "payment"

# ------------------------------------------------------------------------------------------ wire types

_Id = Annotated[str, Meta(min_length=1, max_length=1024)]
_Tok = Annotated[str, Meta(min_length=1, max_length=256)]
_B64 = Annotated[str, Meta(pattern=r"^[A-Za-z0-9_-]*\Z", max_length=MAX_MPP_HEADER_BYTES)]  # \Z: no final \n
_Str = Annotated[str, Meta(max_length=8192)]


class _Wire(msgspec.Struct, frozen=True, kw_only=True, rename="camel", omit_defaults=True):
    pass


class MppChallenge(_Wire, frozen=True, kw_only=True):
    """One ``Payment`` challenge. ``request`` and ``opaque`` stay base64url strings exactly as on the wire,
    so that echoing them back (and recomputing the HMAC) never re-serialises JSON."""

    id: _Id
    realm: _Str
    method: _Tok
    intent: _Tok
    request: _B64
    description: _Str | None = None
    digest: _Str | None = None
    expires: _Str | None = None
    opaque: _B64 | None = None  # base64url of JCS JSON, as `request` (so it can never carry a "|")
    #: Non-default credential header (``Payment-Authorization``) when the server needs ``Authorization``.
    header: _Tok | None = None

    def request_json(self) -> dict[str, Any]:
        """The decoded ``request`` object (raises :class:`MalformedPayment`)."""
        return decode_json_param(self.request, what="request")

    def opaque_json(self) -> dict[str, Any] | None:
        return None if self.opaque is None else decode_json_param(self.opaque, what="opaque")

    def expires_at(self) -> datetime | None:
        """``expires`` as an aware datetime (raises :class:`MalformedPayment` when unparseable)."""
        return None if self.expires is None else parse_rfc3339(self.expires)


class MppCredential(_Wire, frozen=True, kw_only=True):
    """The JSON object inside ``Authorization: Payment <b64url>``."""

    challenge: MppChallenge
    payload: dict[str, Any]
    source: _Str | None = None


class MppReceipt(_Wire, frozen=True, kw_only=True, tag_field="status", tag="success"):
    """The JSON object inside ``Payment-Receipt``. ``status`` is always ``"success"`` (receipts are only
    issued for successful payments): it is the msgspec tag, so it is always encoded and any other value
    fails to decode. :func:`parse_receipt` also refuses a receipt without ``status`` (msgspec alone would
    accept a missing tag) and one whose ``timestamp`` is not RFC 3339."""

    method: _Tok
    timestamp: _Str
    reference: _Str
    challenge_id: _Str | None = None
    chain_id: int | None = None
    external_id: _Str | None = None
    intent: _Tok | None = None

    @property
    def status(self) -> str:
        return "success"


class ProblemDetails(_Wire, frozen=True, kw_only=True):
    """RFC 9457 problem details, plus the extension members this gateway uses.

    One 402 body serves an MPP client (``type``/``title``/``status``/``detail``/``challengeId``) and an
    x402 v1 client (``x402Version``/``error``/``accepts``) at once: each ignores the other's members.
    """

    type: _Str  # e.g. PROBLEM_BASE + "payment-required"; always explicit on the wire
    title: _Str
    status: int
    detail: _Str | None = None
    instance: _Str | None = None
    challenge_id: _Str | None = None
    hint: _Str | None = None
    invalid_reason: _Str | None = None
    x402_version: int | None = None
    error: _Str | None = None
    accepts: list[PaymentRequirementsV1] | None = None


_json_encoder: Final = msgspec.json.Encoder()
_credential_decoder: Final = msgspec.json.Decoder(MppCredential)
_receipt_decoder: Final = msgspec.json.Decoder(MppReceipt)
_problem_decoder: Final = msgspec.json.Decoder(ProblemDetails)
_object_decoder: Final = msgspec.json.Decoder(dict[str, Any])


def encode_problem(problem: ProblemDetails) -> bytes:
    """JSON body for ``Content-Type: application/problem+json``."""
    return _json_encoder.encode(problem)


def decode_problem(body: bytes | str) -> ProblemDetails:
    problem: ProblemDetails = _decode(_problem_decoder, body, "problem details")
    return problem


# --------------------------------------------------------------------------------- base64url and JCS


def b64url_encode(data: bytes) -> str:
    """base64url without padding (RFC 4648 §5)."""
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def b64url_decode(value: str | bytes, *, what: str = "value") -> bytes:
    """Decode base64url; padding is tolerated, any other alphabet is a :class:`MalformedPayment`."""
    if isinstance(value, str):
        try:
            raw = value.encode("ascii")
        except UnicodeEncodeError:
            raise MalformedPayment(f"{what}: not base64url") from None
    elif isinstance(value, bytes | bytearray | memoryview):
        raw = bytes(value)
    else:
        raise MalformedPayment(f"{what}: expected str or bytes")
    if len(raw) > MAX_MPP_HEADER_BYTES:
        raise MalformedPayment(f"{what}: exceeds the {MAX_MPP_HEADER_BYTES}-byte limit")
    raw = raw.rstrip(b"=")
    if len(raw) % 4 == 1:
        raise MalformedPayment(f"{what}: invalid base64url length")
    if raw.translate(None, _B64URL_ALPHABET):
        raise MalformedPayment(f"{what}: not base64url")
    try:
        return base64.urlsafe_b64decode(raw + b"=" * (-len(raw) % 4))
    except (binascii.Error, ValueError):
        raise MalformedPayment(f"{what}: not base64url") from None


_B64URL_ALPHABET: Final = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"


def jcs(obj: Any) -> bytes:
    """RFC 8785 JSON Canonicalization Scheme."""
    return rfc8785.dumps(obj)


def encode_json_param(obj: Mapping[str, Any]) -> str:
    """``request`` / ``opaque`` parameter value: base64url-nopad of JCS JSON."""
    return b64url_encode(jcs(dict(obj)))


def decode_json_param(value: str | bytes, *, what: str = "request") -> dict[str, Any]:
    """Decode a ``request`` / ``opaque`` parameter into a JSON object (or raise :class:`MalformedPayment`)."""
    obj: dict[str, Any] = _decode(_object_decoder, b64url_decode(value, what=what), what)
    return obj


def _decode(decoder: msgspec.json.Decoder[Any], data: bytes | str, what: str) -> Any:
    try:
        return decoder.decode(data)
    except msgspec.ValidationError as exc:
        raise MalformedPayment(f"{what}: {exc}") from None
    except (msgspec.DecodeError, UnicodeError, ValueError, RecursionError):
        raise MalformedPayment(f"{what}: invalid JSON") from None


# ------------------------------------------------------------------------------------ RFC 3339 times


def rfc3339(when: datetime | float) -> str:
    """``2025-01-15T12:05:00Z`` (UTC, whole seconds)."""
    dt = when if isinstance(when, datetime) else datetime.fromtimestamp(when, UTC)
    return dt.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


#: RFC 3339 §5.6 ``date-time``: full-date "T" partial-time time-offset ("T"/"Z" may be lower case).
_RFC3339: Final = re.compile(
    r"(\d{4})-(\d{2})-(\d{2})[Tt](\d{2}):(\d{2}):(\d{2})(?:\.(\d{1,32}))?(?:([Zz])|([+-])(\d{2}):(\d{2}))",
    re.ASCII,  # \d is [0-9], not every Unicode digit
)


def parse_rfc3339(value: str) -> datetime:
    """Parse an RFC 3339 ``date-time`` into an aware datetime; raise :class:`MalformedPayment` otherwise.

    Exactly the RFC's grammar: ``datetime.fromisoformat`` alone would also take ISO 8601 forms RFC 3339
    excludes (no seconds, no offset, basic format, week dates). A leap second (``:60``) is read as ``:59``.
    """
    match = _RFC3339.fullmatch(value) if isinstance(value, str) and len(value) <= 64 else None
    if match is None:
        raise MalformedPayment(f"not an RFC 3339 date-time: {str(value)[:64]!r}")
    year, month, day, hour, minute, second, frac, zulu, sign, off_h, off_m = match.groups()
    try:
        if zulu is None and (int(off_h) > 23 or int(off_m) > 59):
            raise ValueError("offset out of range")
        offset = (
            UTC
            if zulu is not None
            else timezone((-1 if sign == "-" else 1) * timedelta(hours=int(off_h), minutes=int(off_m)))
        )
        if int(second) > 60:
            raise ValueError("second out of range")
        return datetime(
            int(year),
            int(month),
            int(day),
            int(hour),
            int(minute),
            min(int(second), 59),
            int((frac or "0")[:6].ljust(6, "0")),
            tzinfo=offset,
        )
    except ValueError:
        raise MalformedPayment(f"not an RFC 3339 date-time: {value[:64]!r}") from None


# ------------------------------------------------------------------------------------ challenge binding


def _param(value: str | Mapping[str, Any] | None) -> str:
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    return encode_json_param(value)


def check_bound_field(name: str, value: str) -> None:
    """Refuse a value that cannot be an HMAC slot (``ValueError``).

    The slots are joined with an unescaped ``|``: a field holding one would shift the boundaries, so that
    ``realm="a|evm"`` issued with ``method="charge"`` hashes like ``realm="a"``, ``method="evm|charge"``…
    and whoever picks such a field (a ``Host`` header used as realm) re-cuts the id into a challenge
    with another realm or expiry. A lone surrogate has no UTF-8 form and is refused as well.
    """
    if "|" in value:
        raise ValueError(f"challenge {name}: '|' would shift the challenge-binding slots")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError(f"challenge {name}: not encodable as UTF-8") from None


def _slots(
    realm: str,
    method: str,
    intent: str,
    request: str,
    expires: str | None,
    digest: str | None,
    opaque: str | None,
    header: str | None,
) -> list[str]:
    named = [
        ("realm", realm),
        ("method", method),
        ("intent", intent),
        ("request", request),
        ("expires", expires or ""),
        ("digest", digest or ""),
    ]
    if header and header.lower() != AUTHORIZATION_HEADER.lower():
        named.append(("header", header))
    named.append(("opaque", opaque or ""))
    for name, value in named:
        check_bound_field(name, value)
    return [value for _, value in named]


def _mac(key: bytes, slots: list[str]) -> str:
    return b64url_encode(hmac.new(key, "|".join(slots).encode("utf-8"), sha256).digest())


def _key(secret: bytes | str) -> bytes:
    key = secret.encode() if isinstance(secret, str) else secret
    if len(key) < MIN_SECRET_BYTES:
        raise ValueError(f"challenge-binding secret must be at least {MIN_SECRET_BYTES} bytes")
    return key


def challenge_id(
    secret: bytes | str,
    realm: str,
    method: str,
    intent: str,
    request: str | Mapping[str, Any],
    expires: str | None = None,
    digest: str | None = None,
    opaque: str | Mapping[str, Any] | None = None,
    *,
    header: str | None = None,
) -> str:
    """The spec's HMAC-SHA256 challenge id.

    ``request`` / ``opaque`` are either the base64url strings as on the wire (used verbatim) or JSON
    objects (JCS-serialised and base64url-encoded here). A non-default credential ``header``
    (``Payment-Authorization``) is bound in a slot before ``opaque``, as the SDKs do; ``Authorization``
    is the implicit default and never bound. Raises ``ValueError`` for a weak secret or a field that
    :func:`check_bound_field` refuses (nothing is issued that could be re-cut).
    """
    key = _key(secret)
    slots = _slots(realm, method, intent, _param(request), expires, digest, _param(opaque) or None, header)
    return _mac(key, slots)


def verify_challenge(secrets: bytes | str | Sequence[bytes | str], challenge: MppChallenge) -> bool:
    """Whether ``challenge.id`` is the HMAC of its parameters under one of ``secrets`` (constant time per
    secret; pass several to keep accepting challenges issued before a rotation). A challenge with a field
    :func:`check_bound_field` refuses is never valid, whatever its id: its slots are ambiguous."""
    keys: Sequence[bytes | str] = [secrets] if isinstance(secrets, bytes | str) else secrets
    try:
        slots = _slots(
            challenge.realm,
            challenge.method,
            challenge.intent,
            challenge.request,
            challenge.expires,
            challenge.digest,
            challenge.opaque,
            challenge.header,
        )
    except ValueError:
        return False
    presented = challenge.id.encode("utf-8", "surrogatepass")
    ok = False
    for key in keys:
        ok |= hmac.compare_digest(_mac(_key(key), slots).encode("ascii"), presented)
    return ok


def challenge_hash(challenge_id: str, realm: str) -> bytes:
    """``keccak256(abi.encodePacked(id, realm))`` = keccak256 of the UTF-8 concatenation (evm/charge spec,
    mppx). The EIP-3009 nonce of an ``authorization`` credential must equal it."""
    return keccak((challenge_id + realm).encode("utf-8"))


def challenge_hash_pympp(challenge_id: str, realm: str) -> bytes:
    """pympp 0.16 compatibility: keccak256 of the compact JSON array ``["<id>","<realm>"]`` (UTF-8, no
    ASCII escaping), i.e. ``JSON.stringify([id, realm])``.

    This deviates from the spec and from mppx (see :func:`challenge_hash`); accept it only behind an
    explicit compatibility flag.
    """
    text = json.dumps([challenge_id, realm], separators=(",", ":"), ensure_ascii=False)
    return keccak(text.encode("utf-8"))
