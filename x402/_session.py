"""MPP `session` intent on EVM (draft-evm-session-00), sans-I/O: vouchers, channel ids, wire payloads.

A voucher is the EIP-712 message `Voucher(bytes32 channelId,uint128 cumulativeAmount)` under the domain
`{name: "EVM Payment Channel", version: "1", chainId, verifyingContract: escrow}` (the AgentChannels
contract). It authorizes the payee to take `cumulativeAmount` in total from the channel's deposit; each
new voucher replaces the last, so only the highest one matters.

The digest is computed here with a cached domain separator (no eth-account on the hot path): a server
verifies one voucher per request, and the spec asks for no chain call per request.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any, Final

import msgspec

from ._errors import InvalidSignature, MalformedPayment
from ._keccak import keccak256 as keccak
from ._signer import Signer, recover_hash, recover_hash_raw

__all__ = [
    "SESSION_DOMAIN_NAME",
    "SESSION_DOMAIN_VERSION",
    "VOUCHER_TYPEHASH",
    "ZERO_ADDRESS",
    "DepositAuthorization",
    "SessionAction",
    "SessionReceipt",
    "VoucherVerifier",
    "channel_id",
    "deposit_payload",
    "open_nonce",
    "parse_session_payload",
    "recover_voucher",
    "sign_voucher",
    "top_up_nonce",
    "voucher_digest",
    "voucher_signed_by",
]

SESSION_DOMAIN_NAME: Final = "EVM Payment Channel"
SESSION_DOMAIN_VERSION: Final = "1"
VOUCHER_TYPEHASH: Final = keccak(b"Voucher(bytes32 channelId,uint128 cumulativeAmount)")
_DOMAIN_TYPEHASH: Final = keccak(
    b"EIP712Domain(string name,string version,uint256 chainId,address verifyingContract)"
)
_UINT128_MAX: Final = 2**128 - 1
ZERO_ADDRESS: Final = "0x" + "00" * 20
_CREDENTIAL_TYPES: Final = frozenset({"hash", "authorization", "permit2"})


def _address_bytes(value: str) -> bytes:
    if not isinstance(value, str) or len(value) != 42 or value[:2] not in ("0x", "0X"):
        raise MalformedPayment(f"not an address: {str(value)[:50]!r}")
    try:
        return bytes.fromhex(value[2:])
    except ValueError:
        raise MalformedPayment(f"not an address: {value[:50]!r}") from None


def _bytes32(value: str, what: str) -> bytes:
    try:
        raw = bytes.fromhex(value[2:]) if isinstance(value, str) and value[:2] in ("0x", "0X") else b""
    except ValueError:
        raw = b""
    if len(raw) != 32:
        raise MalformedPayment(f"{what} is not a bytes32: {str(value)[:80]!r}")
    return raw


@lru_cache(maxsize=256)
def _domain_separator(chain_id: int, escrow: str) -> bytes:
    return keccak(
        _DOMAIN_TYPEHASH
        + keccak(SESSION_DOMAIN_NAME.encode())
        + keccak(SESSION_DOMAIN_VERSION.encode())
        + chain_id.to_bytes(32, "big")
        + bytes(12)
        + _address_bytes(escrow)
    )


def voucher_digest(chain_id: int, escrow: str, channel: str, cumulative: int) -> bytes:
    """The EIP-712 digest a voucher signs (what `AgentChannels.hashVoucher` returns)."""
    if not 0 <= cumulative <= _UINT128_MAX:
        raise MalformedPayment("cumulativeAmount out of uint128 range")
    struct_hash = keccak(VOUCHER_TYPEHASH + _bytes32(channel, "channelId") + cumulative.to_bytes(32, "big"))
    return keccak(b"\x19\x01" + _domain_separator(chain_id, escrow) + struct_hash)


def sign_voucher(signer: Signer, *, chain_id: int, escrow: str, channel: str, cumulative: int) -> str:
    """A voucher signature as lowercase 0x-hex (65 bytes, r || s || v, low-s)."""
    return "0x" + signer.sign_hash(voucher_digest(chain_id, escrow, channel, cumulative)).hex()


def recover_voucher(*, chain_id: int, escrow: str, channel: str, cumulative: int, signature: str) -> str:
    """The checksummed address that signed the voucher; InvalidSignature if none did (high-s refused)."""
    return recover_hash(voucher_digest(chain_id, escrow, channel, cumulative), _signature_bytes(signature))


def voucher_signed_by(
    *, chain_id: int, escrow: str, channel: str, cumulative: int, signature: str, signer: bytes
) -> bool:
    """Whether the voucher is signed by `signer` (20 address bytes): the verification hot path, which skips
    the EIP-55 checksum `recover_voucher` computes. Raises InvalidSignature for a malformed signature."""
    digest = voucher_digest(chain_id, escrow, channel, cumulative)
    return recover_hash_raw(digest, _signature_bytes(signature)) == signer


class VoucherVerifier:
    """Checks one channel's vouchers against its signer, the server's hot path: the domain separator and the
    channel's part of the typed data are hashed once, so a voucher costs two keccaks and one recovery.

    `signed_by(cumulative, signature)` makes exactly the checks of `voucher_signed_by` (65 bytes of hex,
    v 27/28, r and low s in range, recovered signer equal to `signer`); InvalidSignature when malformed.
    """

    __slots__ = ("_head", "_prefix", "signer")

    def __init__(self, *, chain_id: int, escrow: str, channel: str, signer: bytes) -> None:
        self._prefix = b"\x19\x01" + _domain_separator(chain_id, escrow)
        self._head = VOUCHER_TYPEHASH + _bytes32(channel, "channelId")
        self.signer = signer

    def digest(self, cumulative: int) -> bytes:
        if not 0 <= cumulative <= _UINT128_MAX:
            raise MalformedPayment("cumulativeAmount out of uint128 range")
        return keccak(self._prefix + keccak(self._head + cumulative.to_bytes(32, "big")))

    def signed_by(self, cumulative: int, signature: str) -> bool:
        return recover_hash_raw(self.digest(cumulative), _signature_bytes(signature)) == self.signer


def _signature_bytes(signature: str) -> bytes:
    try:
        raw = bytes.fromhex(signature[2:]) if signature[:2] in ("0x", "0X") else b""
    except (ValueError, TypeError):
        raw = b""
    if len(raw) != 65:
        raise InvalidSignature("a voucher signature is 65 bytes of 0x-hex (r || s || v)")
    return raw


def channel_id(
    *, payer: str, payee: str, token: str, salt: str, authorized_signer: str, escrow: str, chain_id: int
) -> str:
    """`keccak256(abi.encode(payer, payee, token, salt, authorizedSigner, escrow, chainid))`, 0x-hex."""
    words = b"".join(bytes(12) + _address_bytes(a) for a in (payer, payee, token))
    words += _bytes32(salt, "salt") + bytes(12) + _address_bytes(authorized_signer)
    words += bytes(12) + _address_bytes(escrow) + chain_id.to_bytes(32, "big")
    return "0x" + keccak(words).hex()


def open_nonce(*, payer: str, payee: str, token: str, salt: str, authorized_signer: str) -> str:
    """The EIP-3009 nonce of a relayed open: `keccak256(abi.encode(from, payee, token, salt, signer))`."""
    words = b"".join(bytes(12) + _address_bytes(a) for a in (payer, payee, token))
    words += _bytes32(salt, "salt") + bytes(12) + _address_bytes(authorized_signer)
    return "0x" + keccak(words).hex()


def top_up_nonce(*, channel: str, amount: int, payer: str, salt: str) -> str:
    """The EIP-3009 nonce of a relayed top-up: `keccak256(abi.encode(channelId, amount, from, topUpSalt))`."""
    words = _bytes32(channel, "channelId") + amount.to_bytes(32, "big") + bytes(12) + _address_bytes(payer)
    return "0x" + keccak(words + _bytes32(salt, "topUpSalt")).hex()


class DepositAuthorization(msgspec.Struct, frozen=True, kw_only=True):
    """A server-submitted deposit (`type: "authorization"`): the payer's EIP-3009 `ReceiveWithAuthorization`
    of `value` to the escrow (`to`), which the server relays as `openWithAuthorization` (`kind` "open",
    `salt` the channel's) or `topUpWithAuthorization` (`kind` "topUp", `salt` the top-up salt).

    `signature` is 65 bytes for an EOA payer, longer for a smart account (ERC-1271, checked by the token).
    """

    kind: str
    payer: str  # EIP-3009 `from`
    to: str
    value: int
    valid_after: int
    valid_before: int
    nonce: str
    signature: str
    salt: str
    authorized_signer: str = ZERO_ADDRESS  # an open's; the zero address when omitted (the draft)

    def expected_nonce(self, *, payee: str, token: str, channel: str) -> str:
        """The nonce the contract recomputes for this deposit (a mismatch reverts there: refuse it here)."""
        if self.kind == "open":
            return open_nonce(
                payer=self.payer,
                payee=payee,
                token=token,
                salt=self.salt,
                authorized_signer=self.authorized_signer,
            )
        return top_up_nonce(channel=channel, amount=self.value, payer=self.payer, salt=self.salt)


def deposit_payload(deposit: DepositAuthorization) -> dict[str, Any]:
    """The wire fields of a deposit: `authorization`, `signature`, `salt` (and `authorizedSigner`)."""
    fields: dict[str, Any] = {
        "type": "authorization",
        "authorization": {
            "from": deposit.payer,
            "to": deposit.to,
            "value": str(deposit.value),
            "validAfter": str(deposit.valid_after),
            "validBefore": str(deposit.valid_before),
            "nonce": deposit.nonce,
        },
        "signature": deposit.signature,
        "salt": deposit.salt,
    }
    if deposit.kind == "open":
        fields["authorizedSigner"] = deposit.authorized_signer
    return fields


class SessionAction(msgspec.Struct, frozen=True, kw_only=True):
    """One session credential payload (`open`, `voucher`, `topUp` or `close`), validated.

    `cumulative`/`signature` are the voucher (absent for `topUp`); `hash` the payer's transaction for a
    client-broadcast open or top-up (informational here: the server reads the channel itself). `type` is the
    credential type of an open or top-up; `deposit` the server-submitted deposit of an `authorization` open
    or top-up, or of a voucher's `deposit` object (processed before the voucher).
    """

    action: str
    channel: str
    cumulative: int | None = None
    signature: str | None = None
    hash: str | None = None
    additional_deposit: int | None = None
    type: str = "hash"
    deposit: DepositAuthorization | None = None


_ACTIONS: Final = frozenset({"open", "voucher", "topUp", "close"})
_MAX_SIGNATURE_HEX: Final = (
    2 + 2 * 4096
)  # a smart account's nested ERC-1271 signature is longer than 65 bytes


def _amount(payload: dict[str, Any], name: str) -> int:
    value = payload.get(name)
    # ASCII only: "²".isdigit() is true, and int() refuses it
    if not isinstance(value, str) or not (value.isascii() and value.isdigit()) or len(value) > 40:
        raise MalformedPayment(f"session {name} must be a decimal string, got {str(value)[:40]!r}")
    number = int(value)
    if number > _UINT128_MAX:
        raise MalformedPayment(f"session {name} out of uint128 range")
    return number


def _voucher_signature(value: Any) -> str:
    if not isinstance(value, str) or len(value) != 132:
        raise MalformedPayment("session voucher signature must be 65 bytes of 0x-hex")
    return value.lower()


def _hex_signature(value: Any) -> str:
    if not isinstance(value, str) or not 132 <= len(value) <= _MAX_SIGNATURE_HEX or value[:2] != "0x":
        raise MalformedPayment("a deposit signature must be 0x-hex of at least 65 bytes")
    try:
        bytes.fromhex(value[2:])
    except ValueError:
        raise MalformedPayment("a deposit signature must be 0x-hex") from None
    return value.lower()


def _deposit(body: dict[str, Any], kind: str, *, channel: str) -> DepositAuthorization:
    """The `authorization` deposit of an open or top-up (a credential payload or a voucher's `deposit`)."""
    if body.get("type") != "authorization":
        raise MalformedPayment(f"a deposit of type {str(body.get('type'))[:20]!r} is not supported here")
    auth = body.get("authorization")
    if not isinstance(auth, dict):
        raise MalformedPayment("an authorization deposit needs its `authorization` object")
    salt = body.get("salt")
    if not isinstance(salt, str):
        raise MalformedPayment("an authorization deposit needs its `salt`")
    signer = body.get("authorizedSigner", ZERO_ADDRESS) if kind == "open" else ZERO_ADDRESS
    if not isinstance(signer, str):
        raise MalformedPayment("authorizedSigner must be an address")
    payer, to = str(auth.get("from")), str(auth.get("to"))
    _address_bytes(payer)
    _address_bytes(to)
    value = _amount(auth, "value")
    if value == 0:
        raise MalformedPayment("a deposit must be positive")
    _address_bytes(signer)
    return DepositAuthorization(
        kind=kind,
        payer=payer.lower(),
        to=to.lower(),
        value=value,
        valid_after=_amount(auth, "validAfter"),
        valid_before=_amount(auth, "validBefore"),
        nonce="0x" + _bytes32(str(auth.get("nonce")), "nonce").hex(),
        signature=_hex_signature(body.get("signature")),
        salt="0x" + _bytes32(salt, "salt").hex(),
        authorized_signer=signer.lower(),
    )


def _credential_type(payload: dict[str, Any]) -> str:
    kind = payload.get("type", "hash")
    if kind not in _CREDENTIAL_TYPES:
        raise MalformedPayment(f"unknown credential type {str(kind)[:20]!r}")
    return str(kind)


def parse_session_payload(payload: Any) -> SessionAction:
    """Validate an MPP session credential `payload`; MalformedPayment says what is wrong.

    A `permit2` open or top-up parses (its `type` is kept) but carries no deposit: the server refuses a type
    it did not list before looking further.
    """
    if not isinstance(payload, dict):
        raise MalformedPayment("session payload must be an object")
    action = payload.get("action")
    if action not in _ACTIONS:
        raise MalformedPayment(f"unknown session action {str(action)[:20]!r}")
    channel = payload.get("channelId")
    if not isinstance(channel, str):
        raise MalformedPayment("session payload needs a channelId")
    channel = "0x" + _bytes32(channel, "channelId").hex()
    hash_ = payload.get("hash") if isinstance(payload.get("hash"), str) else None
    if action == "topUp":
        kind = _credential_type(payload)
        additional = _amount(payload, "additionalDeposit") if "additionalDeposit" in payload else None
        deposit = None
        if kind == "authorization":
            deposit = _deposit(payload, "topUp", channel=channel)
            if additional != deposit.value:
                raise MalformedPayment("additionalDeposit must equal the authorization's value")
        return SessionAction(
            action=action,
            channel=channel,
            hash=hash_,
            additional_deposit=additional,
            type=kind,
            deposit=deposit,
        )
    kind, deposit = "hash", None
    if action == "open":
        kind = _credential_type(payload)
        if kind == "authorization":
            deposit = _deposit(payload, "open", channel=channel)
            signature = _voucher_signature(payload.get("voucherSignature"))
        else:
            signature = _voucher_signature(payload.get("signature" if kind == "hash" else "voucherSignature"))
    else:
        signature = _voucher_signature(payload.get("signature"))
        extra = payload.get("deposit")
        if action == "voucher" and extra is not None:
            if not isinstance(extra, dict) or extra.get("action") not in ("open", "topUp"):
                raise MalformedPayment("a voucher's deposit must be an open or a topUp")
            kind = _credential_type(extra)
            if kind == "authorization":
                deposit = _deposit(extra, str(extra["action"]), channel=channel)
    return SessionAction(
        action=action,
        channel=channel,
        cumulative=_amount(payload, "cumulativeAmount"),
        signature=signature,
        hash=hash_,
        type=kind,
        deposit=deposit,
    )


class SessionReceipt(msgspec.Struct, frozen=True, kw_only=True, rename="camel", omit_defaults=True):
    """The session `Payment-Receipt` (draft-evm-session-00 §receipt); `reference` is the channel id."""

    method: str
    intent: str
    status: str
    timestamp: str
    reference: str
    challenge_id: str
    channel_id: str
    chain_id: int
    # Absent only from a top-up's receipt: a `hash` top-up is signed by no one, so it learns no amounts.
    accepted_cumulative: str | None = None
    spent: str | None = None
    units: int | None = None
    tx_hash: str | None = None
