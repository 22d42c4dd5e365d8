"""MPP ``evm`` method, ``charge`` intent (draft-evm-charge-00): the request object inside a challenge and
the ``authorization`` (EIP-3009) credential payload."""

from __future__ import annotations

from typing import Annotated, Any, Final, Literal

import msgspec
from msgspec import Meta

from ._errors import MalformedPayment
from ._types import Address, Bytes32Hex, Eip3009Authorization, ExactEvmPayload, HexBytes, Uint256Str

__all__ = [
    "PERMIT2_ADDRESS",
    "EvmChargeRequest",
    "EvmChargeSplit",
    "EvmMethodDetails",
    "MppAuthorizationPayload",
    "decode_evm_charge_request",
    "did_pkh",
]

PERMIT2_ADDRESS: Final = "0x000000000022D473030F116dDEE9F6B43aC78BA3"

_Str = Annotated[str, Meta(max_length=4096)]


class _Wire(msgspec.Struct, frozen=True, kw_only=True, rename="camel", omit_defaults=True):
    pass


class EvmChargeSplit(_Wire, frozen=True, kw_only=True):
    recipient: Address
    amount: Uint256Str
    memo: _Str | None = None


class EvmMethodDetails(_Wire, frozen=True, kw_only=True):
    chain_id: Annotated[int, Meta(ge=0, le=2**63 - 1)]
    permit2_address: Address | None = None
    credential_types: list[str] | None = None
    decimals: Annotated[int, Meta(ge=0, le=255)] | None = None
    splits: list[EvmChargeSplit] | None = None


class EvmChargeRequest(_Wire, frozen=True, kw_only=True):
    """The decoded ``request`` of an ``evm``/``charge`` challenge (unknown members, such as the SDKs'
    ``_mppx_scope`` route binding, are ignored on decode; the HMAC covers the raw wire string anyway)."""

    amount: Uint256Str
    currency: Address
    recipient: Address
    description: _Str | None = None
    external_id: _Str | None = None
    method_details: EvmMethodDetails

    def accepts_credential(self, kind: str) -> bool:
        """Whether the server takes credential ``kind``; omitted ``credentialTypes`` means
        ``transaction`` (and ``hash``) only, per the spec."""
        types = self.method_details.credential_types
        if types is None:
            return kind in ("transaction", "hash")
        return kind in types


class MppAuthorizationPayload(_Wire, frozen=True, kw_only=True, tag_field="type", tag="authorization"):
    """``payload`` of an ``authorization`` credential; the nonce must be ``challenge_hash(id, realm)``.

    ``type`` is the msgspec tag: always encoded, checked on decode, and ready for a ``type``-tagged union
    with the other evm/charge payloads (``permit2``, ``transaction``, ``hash``).
    """

    from_: Address = msgspec.field(name="from")
    to: Address
    value: Uint256Str
    valid_after: Uint256Str
    valid_before: Uint256Str
    nonce: Bytes32Hex
    signature: HexBytes

    def to_exact(self) -> ExactEvmPayload:
        """The same EIP-3009 authorization in x402 ``exact`` shape (one verifier serves both)."""
        return ExactEvmPayload(
            signature=self.signature,
            authorization=Eip3009Authorization(
                from_=self.from_,
                to=self.to,
                value=self.value,
                valid_after=self.valid_after,
                valid_before=self.valid_before,
                nonce=self.nonce,
            ),
        )

    @property
    def type(self) -> Literal["authorization"]:
        return "authorization"

    @classmethod
    def from_exact(cls, payload: ExactEvmPayload) -> MppAuthorizationPayload:
        a = payload.authorization
        return cls(
            from_=a.from_,
            to=a.to,
            value=a.value,
            valid_after=a.valid_after,
            valid_before=a.valid_before,
            nonce=a.nonce,
            signature=payload.signature,
        )


def decode_evm_charge_request(request: dict[str, Any]) -> EvmChargeRequest:
    """Type the decoded ``request`` JSON of an ``evm``/``charge`` challenge."""
    try:
        return msgspec.convert(request, EvmChargeRequest)
    except msgspec.ValidationError as exc:
        raise MalformedPayment(f"evm charge request: {exc}") from None


def did_pkh(chain_id: int, address: str) -> str:
    """``did:pkh:eip155:<chainId>:<address>``: the recommended credential ``source``."""
    return f"did:pkh:eip155:{chain_id}:{address}"
