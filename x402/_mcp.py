"""The MCP wire of both payment protocols, sans-I/O: `_meta` keys, JSON-RPC codes, and the JSON forms of MPP
challenges and credentials (which MCP carries as native JSON, where HTTP carries base64url).

x402 (`specs/transports-v2/mcp.md`): an unpaid `tools/call` gets a *successful* result with `isError: true`,
the `PaymentRequired` in `structuredContent` and again as JSON in `content[0].text`; the payment travels in
`params._meta["x402/payment"]` (a `PaymentPayload` object) and the receipt in
`result._meta["x402/payment-response"]`. A newer draft nests both under `"org.x402/payment"`
(`{"paymentPayload": ...}` / `{"settlementResponse": ...}`); servers accept both.

MPP (`draft-payment-transport-mcp-00`): a JSON-RPC error `-32042` whose `data.challenges` lists challenges
with a native-JSON `request` (`opaque` stays base64url); the credential is
`params._meta["org.paymentauth/credential"]` = `{"challenge": <echoed>, "payload": ..., "source"?}`, the
receipt `result._meta["org.paymentauth/receipt"]`.
mppx also reads the `-32042` data from `result._meta["org.paymentauth/payment-required"]` of a successful
result. `-32042` is also MCP 2025-11-25's `URLElicitationRequiredError`: the payload tells them apart
(`data.challenges` is MPP, `data.elicitations` is an elicitation, `data.x402` or a bare `PaymentRequired` is
x402).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Final, Literal

import msgspec

from ._errors import MalformedPayment
from ._mpp import MppChallenge, MppCredential, decode_json_param, encode_json_param

__all__ = [
    "MCP_INTERNAL_ERROR",
    "MCP_INVALID_PARAMS",
    "MPP_CREDENTIAL_META",
    "MPP_EXTENSION",
    "MPP_PAYMENT_REQUIRED",
    "MPP_RECEIPT_META",
    "MPP_REQUIRED_META",
    "MPP_VERIFICATION_FAILED",
    "X402_EXTENSION",
    "X402_PAYMENT_META",
    "X402_RESPONSE_META",
    "McpPaymentKind",
    "classify_mcp_error",
    "mpp_challenge_from_json",
    "mpp_challenge_to_json",
    "mpp_credential_from_json",
    "mpp_credential_to_json",
    "x402_payment_in",
]

X402_PAYMENT_META: Final = "x402/payment"
X402_RESPONSE_META: Final = "x402/payment-response"
#: The x402 MCP extension id; also the nested `_meta` key (`paymentPayload` / `settlementResponse`).
X402_EXTENSION: Final = "org.x402/payment"
MPP_CREDENTIAL_META: Final = "org.paymentauth/credential"
MPP_RECEIPT_META: Final = "org.paymentauth/receipt"
MPP_REQUIRED_META: Final = "org.paymentauth/payment-required"
#: What an MCP 2.x client advertises (`Client(extensions=[advertise(MPP_EXTENSION)])`) to be answered with
#: JSON-RPC `-32042`; the draft's own signal, `capabilities.experimental.payment`, works too.
MPP_EXTENSION: Final = "org.paymentauth/payment"

MPP_PAYMENT_REQUIRED: Final = -32042
MPP_VERIFICATION_FAILED: Final = -32043
MCP_INVALID_PARAMS: Final = -32602
MCP_INTERNAL_ERROR: Final = -32603

McpPaymentKind = Literal["mpp", "x402", "elicitation"]


def x402_payment_in(meta: Mapping[str, Any]) -> Any:
    """The x402 `PaymentPayload` object of a request's `_meta`, flat or nested; None when there is none.

    Raises :class:`MalformedPayment` when both forms are present (which one would be paid is ambiguous).
    """
    flat = meta.get(X402_PAYMENT_META)
    nested = meta.get(X402_EXTENSION)
    inner = nested.get("paymentPayload") if isinstance(nested, Mapping) else None
    if flat is not None and inner is not None:
        raise MalformedPayment("send the x402 payment once: x402/payment or org.x402/payment, not both")
    return flat if flat is not None else inner


def _native(value: Any, what: str) -> dict[str, Any]:
    """A `request`/`opaque` member: native JSON (MCP) or its base64url form (as HTTP carries it)."""
    if isinstance(value, str):
        return decode_json_param(value, what=what)
    if isinstance(value, Mapping):
        return dict(value)
    raise MalformedPayment(f"challenge.{what} must be a JSON object")


def mpp_challenge_to_json(challenge: MppChallenge) -> dict[str, Any]:
    """An MPP challenge as MCP carries it: `request` as a native JSON object, `opaque` as the base64url
    string the client must echo unmodified (as mppx reads it)."""
    out: dict[str, Any] = {
        "id": challenge.id,
        "realm": challenge.realm,
        "method": challenge.method,
        "intent": challenge.intent,
        "request": challenge.request_json(),
    }
    for name in ("description", "digest", "expires", "opaque"):
        value = getattr(challenge, name)
        if value is not None:
            out[name] = value
    return out


def mpp_challenge_from_json(obj: Any) -> MppChallenge:
    """The challenge of an MCP `data.challenges[]` entry or an echoed credential. The HMAC was computed over
    the JCS form of `request`/`opaque`, which re-encoding a native object reproduces exactly."""
    if not isinstance(obj, Mapping):
        raise MalformedPayment("an MPP challenge must be a JSON object")
    fields = dict(obj)
    try:
        fields["request"] = encode_json_param(_native(fields.get("request"), "request"))
        if fields.get("opaque") is not None:
            fields["opaque"] = encode_json_param(_native(fields["opaque"], "opaque"))
        return msgspec.convert(fields, type=MppChallenge)
    except (msgspec.ValidationError, TypeError, ValueError) as exc:
        raise MalformedPayment(f"invalid MPP challenge: {exc}") from None


def mpp_credential_to_json(credential: MppCredential) -> dict[str, Any]:
    out: dict[str, Any] = {
        "challenge": mpp_challenge_to_json(credential.challenge),
        "payload": dict(credential.payload),
    }
    if credential.source is not None:
        out["source"] = credential.source
    return out


def mpp_credential_from_json(obj: Any) -> MppCredential:
    """`_meta["org.paymentauth/credential"]` as a credential (raises :class:`MalformedPayment`)."""
    if not isinstance(obj, Mapping):
        raise MalformedPayment("the MPP credential must be a JSON object")
    payload, source = obj.get("payload"), obj.get("source")
    if not isinstance(payload, Mapping):
        raise MalformedPayment("the MPP credential needs a payload object")
    if source is not None and not isinstance(source, str):
        raise MalformedPayment("the MPP credential's source must be a string")
    challenge = mpp_challenge_from_json(obj.get("challenge"))
    return MppCredential(challenge=challenge, payload=dict(payload), source=source)


def classify_mcp_error(code: int, data: Any) -> McpPaymentKind | None:
    """What a JSON-RPC error asks for: an MPP payment, an x402 payment, a URL elicitation, or none of them.

    `-32042` is both MPP's payment-required and MCP 2025-11-25's URL elicitation: the data decides.
    """
    if code != MPP_PAYMENT_REQUIRED or not isinstance(data, Mapping):
        return None
    if isinstance(data.get("challenges"), list):
        return "mpp"
    if isinstance(data.get("elicitations"), list):
        return "elicitation"
    if isinstance(data.get("x402"), Mapping) or ("x402Version" in data and "accepts" in data):
        return "x402"
    return None
