"""MPP header grammar: ``WWW-Authenticate: Payment`` challenges (RFC 9110 auth-params; several challenges
per header value and several header lines), ``Authorization: Payment <base64url-nopad(JSON)>`` credentials
and ``Payment-Receipt`` receipts, formatted and parsed.

Parsers raise only :class:`~x402.MalformedPayment`. Formatters raise ``ValueError`` for values that cannot
be put on the wire (control characters, empty required fields): that is a programming error on our side.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any, Final

import msgspec

from ._errors import MalformedPayment
from ._mpp import (
    _SCHEME,
    MAX_MPP_HEADER_BYTES,
    MppChallenge,
    MppCredential,
    MppReceipt,
    _credential_decoder,
    _decode,
    _json_encoder,
    _object_decoder,
    _receipt_decoder,
    b64url_decode,
    b64url_encode,
    decode_json_param,
    parse_rfc3339,
)

__all__ = [
    "format_credential",
    "format_receipt",
    "format_www_authenticate",
    "parse_credential",
    "parse_receipt",
    "parse_www_authenticate",
]

# --------------------------------------------------------------------- WWW-Authenticate: format / parse

_TCHAR: Final = frozenset("!#$%&'*+-.^_`|~0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz")
_TOKEN68: Final = _TCHAR | frozenset("/")  # token68 also allows "/" (and trailing "=")
# The scanner reads runs of characters with these instead of a Python loop per character (a 402's
# `request` parameter is hundreds of characters long).
_RUNS: Final[dict[frozenset[str], re.Pattern[str]]] = {
    chars: re.compile("[" + "".join(re.escape(c) for c in sorted(chars)) + "]*")
    for chars in (_TCHAR, _TOKEN68)
}
_UNQUOTED_RUN: Final = re.compile(r'[^"\\]*')  # inside a quoted-string, up to a quote or a backslash


def _run_end(run: re.Pattern[str], text: str, pos: int) -> int:
    match = run.match(text, pos)  # a `[...]*` pattern always matches, possibly empty
    return pos if match is None or pos >= len(text) else match.end()


_OWS: Final = " \t"
_FIELD_ORDER: Final = (
    "id",
    "realm",
    "method",
    "intent",
    "request",
    "description",
    "digest",
    "expires",
    "opaque",
)


# Control characters a quoted-string cannot carry (HTAB is allowed); one regex scan instead of a Python
# loop over every character, which was most of the cost of formatting a 402.
_CONTROL: Final = re.compile("[\x00-\x08\x0a-\x1f\x7f]")


def _quote(name: str, value: str) -> str:
    if _CONTROL.search(value) is not None:
        raise ValueError(f"{name}: control character not allowed in a quoted-string")
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _format_one(ch: MppChallenge) -> str:
    if not ch.id:
        raise ValueError("challenge id must be non-empty")
    parts = []
    for name in _FIELD_ORDER:
        value = getattr(ch, name)
        if value is not None:
            parts.append(f"{name}={_quote(name, value)}")
    if ch.header is not None:
        parts.append(f"header={_quote('header', ch.header)}")
    return "Payment " + ", ".join(parts)


def format_www_authenticate(challenges: MppChallenge | Iterable[MppChallenge]) -> str:
    """One ``WWW-Authenticate`` value; several challenges are comma-joined (servers may instead send one
    header line per challenge by calling this once per challenge)."""
    items = [challenges] if isinstance(challenges, MppChallenge) else list(challenges)
    if not items:
        raise ValueError("no challenge to format")
    return ", ".join(_format_one(ch) for ch in items)


class _Scanner:
    """A linear-time scanner for RFC 9110 ``#challenge`` lists."""

    __slots__ = ("n", "pos", "text")

    def __init__(self, text: str) -> None:
        self.text = text
        self.pos = 0
        self.n = len(text)

    def skip(self, chars: str) -> None:
        while self.pos < self.n and self.text[self.pos] in chars:
            self.pos += 1

    def token(self, allowed: frozenset[str] = _TCHAR) -> str:
        start = self.pos
        run = _RUNS.get(allowed)
        if run is not None:
            self.pos = _run_end(run, self.text, start)
        else:
            while self.pos < self.n and self.text[self.pos] in allowed:
                self.pos += 1
        return self.text[start : self.pos]

    def peek(self) -> str:
        return self.text[self.pos] if self.pos < self.n else ""

    def quoted(self) -> str | None:
        """Read a quoted-string (the opening quote is at pos); None when unterminated (pos at end)."""
        self.pos += 1
        out: list[str] = []
        text, n = self.text, self.n
        while True:
            end = _run_end(_UNQUOTED_RUN, text, self.pos)
            out.append(text[self.pos : end])
            if end >= n:
                self.pos = n
                return None
            if text[end] == '"':
                self.pos = end + 1
                return "".join(out)
            # A backslash: the next character is taken literally.
            if end + 1 >= n:
                self.pos = n
                return None
            out.append(text[end + 1])
            self.pos = end + 2

    def skip_junk(self) -> None:
        """Skip to the next top-level comma (quote-aware); used after malformed input, permissively."""
        text, n = self.text, self.n
        in_quote = False
        while self.pos < n:
            c = text[self.pos]
            if in_quote:
                if c == "\\":
                    self.pos += 1
                elif c == '"':
                    in_quote = False
            elif c == '"':
                in_quote = True
            elif c == ",":
                return
            self.pos += 1


_Params = dict[str, str]


def _next_is_challenge(sc: _Scanner) -> bool:
    """After a comma: does a new challenge (``scheme`` not followed by ``=``) start here?"""
    mark = sc.pos
    tok = sc.token()
    sc.skip(_OWS)
    new = bool(tok) and sc.peek() != "="
    sc.pos = mark
    return new


def _scan_challenges(text: str) -> list[tuple[str, _Params | None, str | None]]:
    """Split one header value into ``(scheme, params or None when malformed, error)`` tuples."""
    sc = _Scanner(text)
    out: list[tuple[str, _Params | None, str | None]] = []
    while True:
        sc.skip(_OWS + ",")
        if sc.pos >= sc.n:
            return out
        scheme = sc.token()
        if not scheme or sc.peek() not in (" ", "\t", ",", ""):
            sc.pos += 1 if not scheme else 0
            sc.skip_junk()
            continue
        params: _Params = {}
        error: str | None = None
        sc.skip(_OWS)
        while sc.pos < sc.n:
            if sc.peek() == ",":
                sc.skip(_OWS + ",")
                if _next_is_challenge(sc):
                    break
                continue
            name = sc.token(_TOKEN68)
            if not name:
                sc.skip_junk()  # permissive: ignore what cannot be a parameter
                continue
            sc.skip(_OWS)
            if sc.peek() != "=":
                error = error or "token68 credentials are not auth-params"
                sc.skip_junk()
                continue
            sc.pos += 1
            sc.skip(_OWS)
            if sc.peek() == "=":  # token68 padding ("abc==")
                error = error or "token68 credentials are not auth-params"
                sc.skip_junk()
                continue
            if sc.peek() == '"':
                value = sc.quoted()
                if value is None:
                    break  # unterminated quoted-string: drop the parameter and ignore the rest
            else:
                value = sc.token()
            key = name.lower()
            if key in params:
                error = error or f"duplicate parameter {key!r}"
            elif any(c not in _TCHAR for c in name):
                error = error or f"invalid parameter name {name!r}"
            else:
                params[key] = value
            sc.skip(_OWS)
            if sc.peek() not in ("", ","):
                sc.skip_junk()  # e.g. unescaped quotes inside a value: the rest is ignored
        out.append((scheme, None if error else params, error))


def _challenge_from_params(params: _Params) -> MppChallenge:
    for name in ("id", "realm", "method", "intent", "request"):
        if name not in params:
            raise MalformedPayment(f"Payment challenge: missing required parameter {name!r}")
    if not params["id"]:
        raise MalformedPayment("Payment challenge: empty id")
    if not params["method"] or not params["intent"]:
        raise MalformedPayment("Payment challenge: empty method or intent")
    decode_json_param(params["request"], what="request")  # must be base64url JSON (object)
    try:
        return msgspec.convert(
            {k: params[k] for k in (*_FIELD_ORDER, "header") if k in params},
            MppChallenge,
        )
    except msgspec.ValidationError as exc:
        raise MalformedPayment(f"Payment challenge: {exc}") from None


def parse_www_authenticate(
    values: str | bytes | Iterable[str | bytes], *, strict: bool = True
) -> list[MppChallenge]:
    """Every ``Payment`` challenge in one or more ``WWW-Authenticate`` values, in order.

    Other schemes (``Bearer``, ``Basic``…) are skipped. Unknown parameters are ignored. With ``strict``
    (the default) a malformed Payment challenge, or no Payment challenge at all, raises
    :class:`MalformedPayment`; with ``strict=False`` malformed challenges are skipped and the result may be
    empty (what a client wants when it scans a 402 for something it can pay).
    """
    items: Iterable[str | bytes] = [values] if isinstance(values, str | bytes) else values
    found: list[MppChallenge] = []
    for raw in items:
        if isinstance(raw, bytes):
            try:
                raw = raw.decode("latin-1")
            except UnicodeDecodeError:  # pragma: no cover - latin-1 decodes every byte
                raise MalformedPayment("WWW-Authenticate: undecodable") from None
        if not isinstance(raw, str):
            raise MalformedPayment("WWW-Authenticate: expected str or bytes")
        if len(raw) > MAX_MPP_HEADER_BYTES:
            if strict:
                raise MalformedPayment("WWW-Authenticate: header value too large")
            continue
        for scheme, params, error in _scan_challenges(raw):
            if scheme.lower() != _SCHEME:
                continue
            if params is None:
                if strict:
                    raise MalformedPayment(f"Payment challenge: {error}")
                continue
            try:
                found.append(_challenge_from_params(params))
            except MalformedPayment:
                if strict:
                    raise
    if strict and not found:
        raise MalformedPayment("WWW-Authenticate: no Payment challenge")
    return found


# ----------------------------------------------------------------------- Authorization / Payment-Receipt


def format_credential(credential: MppCredential) -> str:
    """``Authorization`` value: ``Payment <base64url-nopad(JSON)>``."""
    return "Payment " + b64url_encode(_json_encoder.encode(credential))


def parse_credential(value: str | bytes) -> MppCredential:
    """Parse an ``Authorization: Payment …`` value into a credential (or raise :class:`MalformedPayment`)."""
    if isinstance(value, bytes):
        value = value.decode("latin-1")
    if not isinstance(value, str):
        raise MalformedPayment("Authorization: expected str or bytes")
    if len(value) > MAX_MPP_HEADER_BYTES:
        raise MalformedPayment("Authorization: header value too large")
    text = value.strip(_OWS)
    scheme, sep, rest = text.partition(" ")
    if scheme.lower() != _SCHEME or not sep:
        raise MalformedPayment("Authorization: not a Payment credential")
    token = rest.strip(_OWS)
    if not token or any(c in token for c in " \t,"):
        raise MalformedPayment("Authorization: expected exactly one base64url token")
    credential: MppCredential = _decode(
        _credential_decoder, b64url_decode(token, what="credential"), "credential"
    )
    return credential


def format_receipt(receipt: MppReceipt) -> str:
    """``Payment-Receipt`` value: base64url-nopad of the JSON receipt (``ValueError`` when its
    ``timestamp`` is not RFC 3339: a receipt that :func:`parse_receipt` would refuse is never sent)."""
    try:
        parse_rfc3339(receipt.timestamp)
    except MalformedPayment as exc:
        raise ValueError(f"receipt timestamp: {exc.message}") from None
    return b64url_encode(_json_encoder.encode(receipt))


def parse_receipt(value: str | bytes) -> MppReceipt:
    """Parse a ``Payment-Receipt`` value, to the letter of the core spec: ``status`` must be present and
    ``"success"``, ``timestamp`` an RFC 3339 date-time; anything else raises :class:`MalformedPayment`
    (code ``invalid_payload``), never a receipt that reads as a success."""
    if isinstance(value, bytes):
        value = value.decode("latin-1")
    if not isinstance(value, str):
        raise MalformedPayment("Payment-Receipt: expected str or bytes")
    raw = b64url_decode(value.strip(_OWS), what="receipt")
    fields: dict[str, Any] = _decode(_object_decoder, raw, "Payment-Receipt")
    if "status" not in fields:
        raise MalformedPayment('Payment-Receipt: no status (a receipt must say "success")')
    receipt: MppReceipt = _decode(_receipt_decoder, raw, "Payment-Receipt")
    try:
        parse_rfc3339(receipt.timestamp)
    except MalformedPayment as exc:
        raise MalformedPayment(f"Payment-Receipt: timestamp: {exc.message}") from None
    return receipt
