"""The x402 `upto` scheme on EVM (`specs/schemes/upto/scheme_upto_evm.md`): wire types, Permit2 typed data.

The payer signs a Permit2 `PermitWitnessTransferFrom` for a MAXIMUM, with `spender` = the upto proxy and the
witness `Witness(address to,address facilitator,uint256 validAfter)`; the resource server's facilitator
(`extra.facilitatorAddress`, the only address the proxy lets settle) later settles an actual amount at
most that maximum. Sans-I/O: digests, signing and recovery only.

Payload (x402 `payload`): `{"signature": "0x…", "permit2Authorization": {"from", "permitted": {"token",
"amount"}, "spender", "nonce", "deadline", "witness": {"to", "facilitator", "validAfter"}}}`; `nonce`,
`deadline`, `validAfter` and `amount` are decimal strings (nonce: a random uint256). EIP-712 domain:
`{name: "Permit2", chainId, verifyingContract: Permit2}`, no version.
"""

from __future__ import annotations

import os
from typing import Final

import msgspec

from ._errors import InvalidSignature, MalformedPayment
from ._keccak import keccak256 as keccak
from ._schemes import convert_payload, register_scheme_payload
from ._signer import Signer, recover_hash
from ._types import Address, HexBytes, Uint256Str

__all__ = [
    "PERMIT2_ADDRESS",
    "UPTO_PROXY_ADDRESS",
    "UPTO_SCHEME",
    "Permit2Authorization",
    "TokenPermissions",
    "UptoCode",
    "UptoPayload",
    "UptoWitness",
    "decode_upto_payload",
    "permit2_digest",
    "recover_upto",
    "sign_upto",
]

UPTO_SCHEME: Final = "upto"
PERMIT2_ADDRESS: Final = "0x000000000022D473030F116dDEE9F6B43aC78BA3"
UPTO_PROXY_ADDRESS: Final = "0x4020A4f3b7b90ccA423B9fabCc0CE57C6C240002"

_DOMAIN_TYPEHASH: Final = keccak(b"EIP712Domain(string name,uint256 chainId,address verifyingContract)")
_TOKEN_PERMISSIONS_TYPEHASH: Final = keccak(b"TokenPermissions(address token,uint256 amount)")
_WITNESS_TYPEHASH: Final = keccak(b"Witness(address to,address facilitator,uint256 validAfter)")
_PERMIT_TYPEHASH: Final = keccak(
    b"PermitWitnessTransferFrom(TokenPermissions permitted,address spender,uint256 nonce,uint256 deadline,"
    b"Witness witness)TokenPermissions(address token,uint256 amount)"
    b"Witness(address to,address facilitator,uint256 validAfter)"
)


class UptoCode:
    """The spec's error codes (the official SDK's constants), as `invalidReason`."""

    INVALID_SPENDER: Final = "invalid_permit2_spender"
    RECIPIENT_MISMATCH: Final = "invalid_permit2_recipient_mismatch"
    DEADLINE_EXPIRED: Final = "permit2_deadline_expired"
    NOT_YET_VALID: Final = "permit2_not_yet_valid"
    AMOUNT_MISMATCH: Final = "permit2_amount_mismatch"
    TOKEN_MISMATCH: Final = "permit2_token_mismatch"
    INVALID_SIGNATURE: Final = "invalid_permit2_signature"
    ALLOWANCE_REQUIRED: Final = "permit2_allowance_required"
    INSUFFICIENT_BALANCE: Final = "permit2_insufficient_balance"
    FACILITATOR_MISMATCH: Final = "upto_facilitator_mismatch"
    SETTLEMENT_EXCEEDS_AMOUNT: Final = "invalid_upto_evm_payload_settlement_exceeds_amount"
    NETWORK_MISMATCH: Final = "invalid_upto_evm_network_mismatch"
    TRANSACTION_FAILED: Final = "invalid_upto_evm_transaction_failed"
    NONCE_USED: Final = "permit2_nonce_used"  # ours: Permit2's bitmap already has the nonce


class _Wire(msgspec.Struct, frozen=True, kw_only=True, rename="camel"):
    pass


class TokenPermissions(_Wire, frozen=True, kw_only=True):
    token: Address
    amount: Uint256Str


class UptoWitness(_Wire, frozen=True, kw_only=True):
    to: Address
    facilitator: Address
    valid_after: Uint256Str


class Permit2Authorization(_Wire, frozen=True, kw_only=True):
    from_: Address = msgspec.field(name="from")
    permitted: TokenPermissions
    spender: Address
    nonce: Uint256Str
    deadline: Uint256Str
    witness: UptoWitness


class UptoPayload(_Wire, frozen=True, kw_only=True):
    """x402 `payload` of the `upto` scheme."""

    signature: HexBytes
    permit2_authorization: Permit2Authorization


register_scheme_payload(UPTO_SCHEME, UptoPayload, "eip155")


def decode_upto_payload(payload: object) -> UptoPayload:
    return convert_payload(payload, UptoPayload)


def _address(value: str) -> bytes:
    return bytes(12) + bytes.fromhex(value[2:])


def _uint(value: str | int) -> bytes:
    number = int(value)
    if not 0 <= number < 2**256:
        raise MalformedPayment("uint256 out of range")
    return number.to_bytes(32, "big")


def permit2_digest(chain_id: int, auth: Permit2Authorization, permit2: str = PERMIT2_ADDRESS) -> bytes:
    """The EIP-712 digest Permit2 checks for this authorization (`spender` = whoever calls Permit2)."""
    domain = keccak(_DOMAIN_TYPEHASH + keccak(b"Permit2") + _uint(chain_id) + _address(permit2))
    permitted = keccak(
        _TOKEN_PERMISSIONS_TYPEHASH + _address(auth.permitted.token) + _uint(auth.permitted.amount)
    )
    w = auth.witness
    witness = keccak(_WITNESS_TYPEHASH + _address(w.to) + _address(w.facilitator) + _uint(w.valid_after))
    struct_hash = keccak(
        _PERMIT_TYPEHASH
        + permitted
        + _address(auth.spender)
        + _uint(auth.nonce)
        + _uint(auth.deadline)
        + witness
    )
    return keccak(b"\x19\x01" + domain + struct_hash)


def sign_upto(
    signer: Signer,
    *,
    chain_id: int,
    token: str,
    maximum: int,
    pay_to: str,
    facilitator: str,
    deadline: int,
    valid_after: int,
    nonce: int | None = None,
) -> UptoPayload:
    """Sign a Permit2 witness transfer of at most `maximum` to `pay_to`, settleable only by `facilitator`."""
    auth = Permit2Authorization(
        from_=signer.address,
        permitted=TokenPermissions(token=token, amount=str(maximum)),
        spender=UPTO_PROXY_ADDRESS,
        nonce=str(int.from_bytes(os.urandom(32), "big") if nonce is None else nonce),
        deadline=str(deadline),
        witness=UptoWitness(to=pay_to, facilitator=facilitator, valid_after=str(valid_after)),
    )
    signature = signer.sign_hash(permit2_digest(chain_id, auth))
    return UptoPayload(signature="0x" + signature.hex(), permit2_authorization=auth)


def recover_upto(chain_id: int, payload: UptoPayload) -> str:
    """Who signed the authorization (ECDSA); `InvalidSignature` with the spec's code on any failure."""
    try:
        digest = permit2_digest(chain_id, payload.permit2_authorization)
        return recover_hash(digest, bytes.fromhex(payload.signature[2:]))
    except (InvalidSignature, MalformedPayment, ValueError) as exc:
        raise InvalidSignature(str(exc), code=UptoCode.INVALID_SIGNATURE) from None
