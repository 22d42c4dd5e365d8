"""The ``escrow`` scheme on the wire: payload types, EIP-712 typed data (``Payment``, ``Grant``, ``Revoke``
of ``AgentEscrow``), signing and offline recovery. Sans-I/O: grant state and nonces live on the chain and
are the gateway's business (``escrow.payments._escrow_verify``).

A session key signs one ``Payment`` per call (``PAYMENT_TYPEHASH`` below names its fields)
under the domain ``EIP712Domain("AgentEscrow", "1", chainId, escrow)``. Nonces are unordered bitmap nonces
scoped to the signer; a signer counting up from a random word fills one storage word per 256 payments,
which is what keeps a batched payment near 12k gas (a random nonce per payment would cost a fresh 22k SSTORE).

Signing is on the hot path, so the domain separator is cached per domain and the static struct is packed by
hand; the tests check with hypothesis that :func:`payment_digest` equals eth-account's ``encode_typed_data``.
"""

from __future__ import annotations

import os
import threading
from functools import lru_cache
from typing import Annotated, Any, Final, Literal

import msgspec
from eth_account.messages import encode_typed_data
from msgspec import Meta

from ._eip712 import EIP712_DOMAIN_FIELDS, Eip712Domain
from ._errors import InvalidSignature, MalformedPayment, PaymentRejected
from ._keccak import keccak256 as keccak
from ._schemes import convert_payload, register_scheme_payload
from ._signer import Signer, recover_hash
from ._types import Address, HexBytes, Uint256Str

__all__ = [
    "ESCROW_DOMAIN_NAME",
    "ESCROW_DOMAIN_VERSION",
    "ESCROW_SCHEME",
    "REASON_CODES",
    "EscrowCode",
    "EscrowExtra",
    "EscrowMppPayload",
    "EscrowPayload",
    "EscrowPayment",
    "GrantMessage",
    "NonceCounter",
    "decode_escrow_payload",
    "escrow_domain",
    "grant_digest",
    "grant_typed_data",
    "payment_digest",
    "payment_typed_data",
    "reason_code",
    "recover_grant",
    "recover_payment",
    "revoke_digest",
    "sign_grant",
    "sign_payment",
    "sign_revoke",
]

ESCROW_SCHEME: Final = "escrow"
ESCROW_DOMAIN_NAME: Final = "AgentEscrow"
ESCROW_DOMAIN_VERSION: Final = "1"

_PAYMENT_TYPE: Final = (
    "Payment(address payer,address payee,address token,uint256 amount,uint256 nonce,uint256 deadline,"
    "uint32 epoch)"
)
_GRANT_TYPE: Final = (
    "Grant(address payer,address signer,address token,uint96 maxPerCall,uint128 budget,uint32 validAfter,"
    "uint32 validUntil,address[] payees,uint32 epoch)"
)
_REVOKE_TYPE: Final = "Revoke(address payer,address signer,uint32 epoch)"
PAYMENT_TYPEHASH: Final = keccak(_PAYMENT_TYPE.encode())
GRANT_TYPEHASH: Final = keccak(_GRANT_TYPE.encode())
REVOKE_TYPEHASH: Final = keccak(_REVOKE_TYPE.encode())

PAYMENT_FIELDS: Final = (
    {"name": "payer", "type": "address"},
    {"name": "payee", "type": "address"},
    {"name": "token", "type": "address"},
    {"name": "amount", "type": "uint256"},
    {"name": "nonce", "type": "uint256"},
    {"name": "deadline", "type": "uint256"},
    {"name": "epoch", "type": "uint32"},
)
GRANT_FIELDS: Final = (
    {"name": "payer", "type": "address"},
    {"name": "signer", "type": "address"},
    {"name": "token", "type": "address"},
    {"name": "maxPerCall", "type": "uint96"},
    {"name": "budget", "type": "uint128"},
    {"name": "validAfter", "type": "uint32"},
    {"name": "validUntil", "type": "uint32"},
    {"name": "payees", "type": "address[]"},
    {"name": "epoch", "type": "uint32"},
)
REVOKE_FIELDS: Final = (
    {"name": "payer", "type": "address"},
    {"name": "signer", "type": "address"},
    {"name": "epoch", "type": "uint32"},
)

_UINT256_MAX: Final = 2**256 - 1
_Epoch = Annotated[int, Meta(ge=0, le=2**32 - 1)]


class EscrowCode:
    """Stable error codes of the scheme. The first fourteen are ``IAgentEscrow.Reason`` one to one."""

    DEADLINE_EXPIRED: Final = "escrow_deadline_expired"
    INVALID_PAYEE: Final = "escrow_invalid_payee"
    INVALID_SIGNATURE: Final = "invalid_escrow_signature"
    NONCE_USED: Final = "escrow_nonce_used"
    GRANT_NOT_FOUND: Final = "escrow_grant_not_found"
    GRANT_REVOKED: Final = "escrow_grant_revoked"
    TOKEN_MISMATCH: Final = "escrow_token_mismatch"
    GRANT_NOT_YET_VALID: Final = "escrow_grant_not_yet_valid"
    GRANT_EXPIRED: Final = "escrow_grant_expired"
    PAYEE_NOT_ALLOWED: Final = "escrow_payee_not_allowed"
    AMOUNT_EXCEEDS_CAP: Final = "escrow_amount_exceeds_cap"
    BUDGET_EXCEEDED: Final = "escrow_budget_exceeded"
    INSUFFICIENT_DEPOSIT: Final = "escrow_insufficient_deposit"
    # Off-chain only.
    RECIPIENT_MISMATCH: Final = "escrow_recipient_mismatch"  # the payment pays someone else than payTo
    AMOUNT_MISMATCH: Final = "escrow_amount_mismatch"  # the payment is not the price
    WRONG_ESCROW: Final = "escrow_contract_mismatch"  # the offer names another escrow / chain
    DEADLINE_TOO_SOON: Final = "escrow_deadline_too_soon"  # valid now, but not long enough to batch it
    NONCE_REUSED: Final = "escrow_nonce_reused"  # settler: the nonce paid a *different* payment (a loss)


#: ``IAgentEscrow.Reason`` value -> code (index 0 is ``None``, a valid payment).
REASON_CODES: Final[tuple[str, ...]] = (
    "",
    EscrowCode.DEADLINE_EXPIRED,
    EscrowCode.INVALID_PAYEE,
    EscrowCode.INVALID_SIGNATURE,
    EscrowCode.NONCE_USED,
    EscrowCode.GRANT_NOT_FOUND,
    EscrowCode.GRANT_REVOKED,
    EscrowCode.TOKEN_MISMATCH,
    EscrowCode.GRANT_NOT_YET_VALID,
    EscrowCode.GRANT_EXPIRED,
    EscrowCode.PAYEE_NOT_ALLOWED,
    EscrowCode.AMOUNT_EXCEEDS_CAP,
    EscrowCode.BUDGET_EXCEEDED,
    EscrowCode.INSUFFICIENT_DEPOSIT,
)


def reason_code(reason: int) -> str:
    """The code of an on-chain ``Reason`` (``""`` for ``None``); unknown values are ``escrow_reason_<n>``."""
    return REASON_CODES[reason] if 0 <= reason < len(REASON_CODES) else f"escrow_reason_{reason}"


# --------------------------------------------------------------------------------------------- wire types


class _Wire(msgspec.Struct, frozen=True, kw_only=True, rename="camel", omit_defaults=True):
    pass


class _Explicit(msgspec.Struct, frozen=True, kw_only=True, rename="camel"):
    """Every field always encoded: for objects whose defaulted fields are still required on the wire (or
    signed), where ``omit_defaults`` would drop them and a reader with other defaults would misread them."""


class EscrowPayment(_Wire, frozen=True, kw_only=True):
    """The signed ``Payment``; uint256 fields are decimal strings, ``epoch`` is a number."""

    payer: Address
    payee: Address
    token: Address
    amount: Uint256Str
    nonce: Uint256Str
    deadline: Uint256Str
    epoch: _Epoch


class EscrowPayload(_Wire, frozen=True, kw_only=True):
    """x402 ``payload`` of the ``escrow`` scheme."""

    signature: HexBytes
    payment: EscrowPayment


class EscrowMppPayload(msgspec.Struct, frozen=True, kw_only=True, rename="camel"):
    """MPP credential ``payload`` answering an ``evm``/``charge`` challenge whose ``credentialTypes`` lists
    ``escrow`` (``type`` is always encoded: it is how the server tells credential kinds apart)."""

    type: Literal["escrow"] = "escrow"
    signature: HexBytes
    payment: EscrowPayment

    def to_x402(self) -> EscrowPayload:
        return EscrowPayload(signature=self.signature, payment=self.payment)


class EscrowExtra(_Explicit, frozen=True, kw_only=True):
    """``extra`` of an ``escrow`` offer (x402 ``accepts[]``; MPP ``methodDetails`` carries the same keys).

    ``escrow`` is the verifying contract; ``name``/``version`` its EIP-712 domain; the client signs a
    ``deadline`` at least ``deadlineSeconds`` ahead, so a batching settler has time to land it. The
    defaults apply on decode only: the scheme spec makes ``name``/``version`` required, so every field is
    encoded even when it has its default value.
    """

    escrow: Address
    name: str = ESCROW_DOMAIN_NAME
    version: str = ESCROW_DOMAIN_VERSION
    deadline_seconds: Annotated[int, Meta(ge=0, le=2**32)] = 3600


register_scheme_payload(ESCROW_SCHEME, EscrowPayload, "eip155")


# ------------------------------------------------------------------------------------------- typed data


def escrow_domain(chain_id: int, escrow: str) -> Eip712Domain:
    return Eip712Domain(
        name=ESCROW_DOMAIN_NAME, version=ESCROW_DOMAIN_VERSION, chain_id=chain_id, verifying_contract=escrow
    )


def payment_typed_data(domain: Eip712Domain, payment: EscrowPayment) -> dict[str, Any]:
    """The ``full_message`` dict for ``eth_account.messages.encode_typed_data``."""
    return {
        "types": {"EIP712Domain": list(EIP712_DOMAIN_FIELDS), "Payment": list(PAYMENT_FIELDS)},
        "primaryType": "Payment",
        "domain": domain.as_dict(),
        "message": {
            "payer": payment.payer,
            "payee": payment.payee,
            "token": payment.token,
            "amount": int(payment.amount),
            "nonce": int(payment.nonce),
            "deadline": int(payment.deadline),
            "epoch": payment.epoch,
        },
    }


class GrantMessage(_Explicit, frozen=True, kw_only=True):
    """What an owner signs to grant ``signer`` (``AgentEscrow.grantWithSig``); also the signed-grant file.

    ``payees`` and ``epoch`` are signed: they are always written out, so a file is readable without
    knowing this class's defaults. ``epoch`` is the owner's version number for this key's grant: it must be
    above the key's current epoch on chain, and a revoke through it or higher refuses it forever."""

    payer: Address
    signer: Address
    token: Address
    max_per_call: int
    budget: int
    valid_after: int
    valid_until: int
    payees: list[Address] = msgspec.field(default_factory=list)
    epoch: int = 1


def grant_typed_data(domain: Eip712Domain, grant: GrantMessage) -> dict[str, Any]:
    return {
        "types": {"EIP712Domain": list(EIP712_DOMAIN_FIELDS), "Grant": list(GRANT_FIELDS)},
        "primaryType": "Grant",
        "domain": domain.as_dict(),
        "message": {
            "payer": grant.payer,
            "signer": grant.signer,
            "token": grant.token,
            "maxPerCall": grant.max_per_call,
            "budget": grant.budget,
            "validAfter": grant.valid_after,
            "validUntil": grant.valid_until,
            "payees": list(grant.payees),
            "epoch": grant.epoch,
        },
    }


@lru_cache(maxsize=256)
def _domain_separator(domain: Eip712Domain) -> bytes:
    # eth-account computes it once per domain; only the result is cached.
    zero = "0x" + "00" * 20
    dummy = EscrowPayment(payer=zero, payee=zero, token=zero, amount="0", nonce="0", deadline="0", epoch=0)
    return bytes(encode_typed_data(full_message=payment_typed_data(domain, dummy)).header)


def _address(value: str) -> bytes:
    if len(value) != 42 or value[:2] not in ("0x", "0X"):
        raise MalformedPayment(f"not an address: {value[:50]!r}")
    try:
        return bytes(12) + bytes.fromhex(value[2:])
    except ValueError:
        raise MalformedPayment(f"not an address: {value[:50]!r}") from None


def _uint(value: int | str, bits: int = 256) -> bytes:
    number = int(value, 10) if isinstance(value, str) else value
    if not 0 <= number < 2**bits:
        raise MalformedPayment(f"uint{bits} out of range")
    return number.to_bytes(32, "big")


def payment_digest(domain: Eip712Domain, payment: EscrowPayment) -> bytes:
    """``keccak256(0x1901 || domainSeparator || hashStruct(Payment))``; ``AgentEscrow.hashPayment``."""
    struct_hash = keccak(
        PAYMENT_TYPEHASH
        + _address(payment.payer)
        + _address(payment.payee)
        + _address(payment.token)
        + _uint(payment.amount)
        + _uint(payment.nonce)
        + _uint(payment.deadline)
        + _uint(payment.epoch, 32)
    )
    return keccak(b"\x19\x01" + _domain_separator(domain) + struct_hash)


def grant_digest(domain: Eip712Domain, grant: GrantMessage) -> bytes:
    payees = b"".join(_address(p) for p in grant.payees)
    struct_hash = keccak(
        GRANT_TYPEHASH
        + _address(grant.payer)
        + _address(grant.signer)
        + _address(grant.token)
        + _uint(grant.max_per_call, 96)
        + _uint(grant.budget, 128)
        + _uint(grant.valid_after, 32)
        + _uint(grant.valid_until, 32)
        + keccak(payees)
        + _uint(grant.epoch, 32)
    )
    return keccak(b"\x19\x01" + _domain_separator(domain) + struct_hash)


def revoke_digest(domain: Eip712Domain, payer: str, signer: str, epoch: int) -> bytes:
    struct_hash = keccak(REVOKE_TYPEHASH + _address(payer) + _address(signer) + _uint(epoch, 32))
    return keccak(b"\x19\x01" + _domain_separator(domain) + struct_hash)


# ---------------------------------------------------------------------------------------- sign / recover


class NonceCounter:
    """Sequential unordered nonces for one session key, thread-safe.

    It starts at a random 256-nonce word so that two processes holding the same key (or one restarted)
    never hand out the same nonce, while consecutive payments share one bitmap word on chain.
    """

    __slots__ = ("_lock", "_next")

    def __init__(self, start: int | None = None) -> None:
        self._next = (int.from_bytes(os.urandom(30), "big") << 8) if start is None else start
        self._lock = threading.Lock()

    def take(self) -> int:
        with self._lock:
            nonce = self._next
            self._next += 1
            return nonce


def sign_payment(
    signer: Signer,
    domain: Eip712Domain,
    *,
    payer: str,
    payee: str,
    token: str,
    amount: int,
    nonce: int,
    deadline: int,
    epoch: int,
) -> EscrowPayload:
    """Sign one ``Payment`` with ``signer`` (the session key, or the payer itself with ``epoch`` 0)."""
    if not 0 <= nonce <= _UINT256_MAX or not 0 <= amount <= _UINT256_MAX:
        raise ValueError("nonce and amount must fit uint256")
    payment = EscrowPayment(
        payer=payer,
        payee=payee,
        token=token,
        amount=str(amount),
        nonce=str(nonce),
        deadline=str(deadline),
        epoch=epoch,
    )
    signature = signer.sign_hash(payment_digest(domain, payment))
    return EscrowPayload(signature="0x" + signature.hex(), payment=payment)


def _signature_bytes(value: str) -> bytes:
    try:
        return bytes.fromhex(value[2:])
    except ValueError:
        raise InvalidSignature("signature is not hex") from None


def recover_payment(domain: Eip712Domain, payload: EscrowPayload) -> str:
    """The checksummed address of the key that signed the payment (ECDSA only; an ERC-1271 payer signing
    for itself is checked on chain). :class:`InvalidSignature` with the scheme's code on any failure."""
    try:
        digest = payment_digest(domain, payload.payment)
        return recover_hash(digest, _signature_bytes(payload.signature))
    except (InvalidSignature, MalformedPayment) as exc:
        raise InvalidSignature(exc.message, code=EscrowCode.INVALID_SIGNATURE) from None


def sign_grant(owner: Signer, domain: Eip712Domain, grant: GrantMessage) -> bytes:
    """The payer's (owner's) signature for ``grantWithSig``; needs no chain, so it can be made offline."""
    return owner.sign_hash(grant_digest(domain, grant))


def recover_grant(domain: Eip712Domain, grant: GrantMessage, signature: bytes) -> str:
    return recover_hash(grant_digest(domain, grant), signature)


def sign_revoke(owner: Signer, domain: Eip712Domain, *, payer: str, signer: str, epoch: int) -> bytes:
    """The payer's signature for ``revokeWithSig`` of ``signer`` through ``epoch``: every grant numbered
    ``epoch`` or below is refused, whichever is relayed first."""
    return owner.sign_hash(revoke_digest(domain, payer, signer, epoch))


def decode_escrow_payload(payload: Any, *, mpp: bool = False) -> EscrowPayload:
    """Type a raw x402 ``payload`` (or an MPP credential ``payload`` when ``mpp``)."""
    if mpp:
        if not isinstance(payload, dict) or payload.get("type") != "escrow":
            raise PaymentRejected("unsupported_scheme", "credential type is not 'escrow'")
        return convert_payload(payload, EscrowMppPayload).to_x402()
    return convert_payload(payload, EscrowPayload)
