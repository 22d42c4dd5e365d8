"""x402 wire types (v2 and v1), as frozen msgspec Structs with camelCase names on the wire.

Field order follows the official Python SDK (pydantic field order), although receivers must never depend
on it: JSON is parsed, never compared as bytes. Unknown fields are ignored on decode (the protocol grows
by adding optional fields). The scheme-specific ``payload`` stays an untyped JSON object here and is decoded
in a second, typed step (:mod:`x402._schemes`).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

import msgspec
from msgspec import Meta

__all__ = [
    "Address",
    "Bytes32Hex",
    "Eip3009Authorization",
    "ExactEvmPayload",
    "FacilitatorRequest",
    "FacilitatorRequestV1",
    "HexBytes",
    "PaymentPayload",
    "PaymentPayloadV1",
    "PaymentRequired",
    "PaymentRequiredV1",
    "PaymentRequirements",
    "PaymentRequirementsV1",
    "ResourceInfo",
    "SettleResponse",
    "SupportedKind",
    "SupportedResponse",
    "Uint256Str",
    "VerifyResponse",
]

# Constrained scalar types, checked while decoding. msgspec matches with `re.search`, where `$` also matches
# before a final "\n": `\Z` is the true end, so "0x…\n" (a different replay key, a node error) is refused.
Address = Annotated[str, Meta(pattern=r"^0x[0-9a-fA-F]{40}\Z")]
Bytes32Hex = Annotated[str, Meta(pattern=r"^0x[0-9a-fA-F]{64}\Z")]
Uint256Str = Annotated[str, Meta(pattern=r"^[0-9]{1,78}\Z")]
#: 0x-prefixed hex; 65 bytes for an EOA, longer for ERC-1271 / ERC-6492 smart-wallet signatures.
HexBytes = Annotated[str, Meta(pattern=r"^0x([0-9a-fA-F]{2})*\Z", max_length=32770)]
_Short = Annotated[str, Meta(max_length=256)]
_Text = Annotated[str, Meta(max_length=4096)]
_Url = Annotated[str, Meta(max_length=4096)]
_Timeout = Annotated[int, Meta(ge=0, le=2**32)]
_JsonObject = dict[str, Any]


class _Wire(msgspec.Struct, frozen=True, kw_only=True, rename="camel", omit_defaults=True):
    """Base for wire types: frozen, keyword-only, camelCase, optional fields left out when unset."""


class _V2(_Wire, frozen=True, kw_only=True, tag_field="x402Version", tag=2):
    """A v2 message. ``x402Version`` is the msgspec tag: always encoded, checked on decode (another
    version is a validation error), and it lets ``V1 | V2`` unions decode by version."""

    @property
    def x402_version(self) -> Literal[2]:
        return 2


class _V1(_Wire, frozen=True, kw_only=True, tag_field="x402Version", tag=1):
    """A v1 message (``x402Version: 1``, see :class:`_V2`)."""

    @property
    def x402_version(self) -> Literal[1]:
        return 1


# --------------------------------------------------------------------------------------------------- v2


class ResourceInfo(_Wire, frozen=True, kw_only=True):
    url: _Url
    description: _Text | None = None
    mime_type: _Short | None = None


class PaymentRequirements(_Wire, frozen=True, kw_only=True):
    """One accepted way to pay (v2 ``accepts[]`` entry; echoed verbatim as ``accepted``)."""

    scheme: _Short
    network: _Short
    asset: _Short
    amount: Uint256Str
    pay_to: _Short
    max_timeout_seconds: _Timeout
    extra: _JsonObject = msgspec.field(default_factory=dict)


class PaymentRequired(_V2, frozen=True, kw_only=True):
    """The v2 challenge carried base64-encoded in the ``PAYMENT-REQUIRED`` header."""

    error: _Text | None = None
    resource: ResourceInfo | None = None
    accepts: list[PaymentRequirements]
    extensions: _JsonObject | None = None


class PaymentPayload(_V2, frozen=True, kw_only=True):
    """The v2 payment carried in ``PAYMENT-SIGNATURE``; ``payload`` is scheme-specific."""

    payload: _JsonObject
    accepted: PaymentRequirements
    resource: ResourceInfo | None = None
    extensions: _JsonObject | None = None


# --------------------------------------------------------------------------------------------------- v1


class PaymentRequirementsV1(_Wire, frozen=True, kw_only=True):
    """One v1 ``accepts[]`` entry (JSON body of the 402)."""

    scheme: _Short
    network: _Short
    max_amount_required: Uint256Str
    resource: _Url
    description: _Text
    mime_type: _Short
    output_schema: _JsonObject | None = None
    pay_to: _Short
    max_timeout_seconds: _Timeout
    asset: _Short
    extra: _JsonObject | None = None


class PaymentRequiredV1(_V1, frozen=True, kw_only=True):
    """The v1 challenge: the JSON body of the 402."""

    error: _Text | None = None
    accepts: list[PaymentRequirementsV1]


class PaymentPayloadV1(_V1, frozen=True, kw_only=True):
    """The v1 payment carried in ``X-PAYMENT``."""

    scheme: _Short
    network: _Short
    payload: _JsonObject


# ---------------------------------------------------------------------------------- exact / EVM payload


class Eip3009Authorization(_Wire, frozen=True, kw_only=True):
    """EIP-3009 ``TransferWithAuthorization`` message; every number is a decimal string on the wire."""

    from_: Address = msgspec.field(name="from")
    to: Address
    value: Uint256Str
    valid_after: Uint256Str
    valid_before: Uint256Str
    nonce: Bytes32Hex


class ExactEvmPayload(_Wire, frozen=True, kw_only=True):
    """``payload`` of the ``exact`` scheme on EVM with the EIP-3009 transfer method."""

    signature: HexBytes
    authorization: Eip3009Authorization


# ----------------------------------------------------------------------------------------- facilitator


class VerifyResponse(_Wire, frozen=True, kw_only=True):
    is_valid: bool
    invalid_reason: _Short | None = None
    invalid_message: _Text | None = None
    payer: _Short | None = None


class SettleResponse(_Wire, frozen=True, kw_only=True):
    """Settlement result; carried base64-encoded in ``PAYMENT-RESPONSE`` / ``X-PAYMENT-RESPONSE``."""

    success: bool
    error_reason: _Short | None = None
    error_message: _Text | None = None
    payer: _Short | None = None
    transaction: _Short  # "" when settlement failed; always on the wire
    network: _Short
    amount: Uint256Str | None = None
    extensions: _JsonObject | None = None


class SupportedKind(_Wire, frozen=True, kw_only=True):
    x402_version: int
    scheme: _Short
    network: _Short
    extra: _JsonObject | None = None


class SupportedResponse(_Wire, frozen=True, kw_only=True, omit_defaults=False):
    """``GET /supported``; ``extensions`` and ``signers`` are always on the wire, even when empty."""

    kinds: list[SupportedKind]
    extensions: list[str] = msgspec.field(default_factory=list)
    signers: dict[str, list[str]] = msgspec.field(default_factory=dict)


class FacilitatorRequest(_V2, frozen=True, kw_only=True):
    """Body of ``POST /verify`` and ``POST /settle`` (v2)."""

    payment_payload: PaymentPayload
    payment_requirements: PaymentRequirements


class FacilitatorRequestV1(_V1, frozen=True, kw_only=True):
    """Body of ``POST /verify`` and ``POST /settle`` (v1)."""

    payment_payload: PaymentPayloadV1
    payment_requirements: PaymentRequirementsV1
