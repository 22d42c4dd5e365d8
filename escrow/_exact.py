"""The chain side of the x402 `exact` scheme on EVM (EIP-3009 `transferWithAuthorization`).

Verification routes on `eth_getCode(payer)` as the x402 reference does: a payer without code must have signed
with its key (ecrecover); a payer with code (a contract wallet or an EIP-7702 delegated EOA) is asked through
ERC-1271 `isValidSignature`, strictly, with no ECDSA fallback. The code probe, the ERC-1271 call and the
`transferWithAuthorization` simulation go out in one JSON-RPC batch, so verification costs one round trip.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Final

from eth_abi.abi import decode as abi_decode
from eth_abi.abi import encode as abi_encode
from eth_utils.crypto import keccak

from x402 import (
    Eip712Domain,
    Eip3009Authorization,
    ExactEvmPayload,
    InvalidSignature,
    Reason,
    authorization_digest,
    recover_transfer_authorization,
)

from ._artifacts import EscrowError
from ._rpc import ChainError, Receipt, RevertError, Rpc, TransactionFailed, TxSender

__all__ = [
    "AUTHORIZATION_USED_TOPIC",
    "ExactEvm",
    "ExactRejected",
    "authorization_state_calldata",
    "has_transfer",
    "revert_reason",
]

_TWA_VRS: Final = keccak(
    text="transferWithAuthorization(address,address,uint256,uint256,uint256,bytes32,uint8,bytes32,bytes32)"
)[:4]
_TWA_BYTES: Final = keccak(
    text="transferWithAuthorization(address,address,uint256,uint256,uint256,bytes32,bytes)"
)[:4]
_IS_VALID_SIGNATURE: Final = keccak(text="isValidSignature(bytes32,bytes)")[:4]
_ERC1271_MAGIC: Final = _IS_VALID_SIGNATURE  # the magic value is the selector itself
_ERROR_STRING: Final = keccak(text="Error(string)")[:4]
# OpenZeppelin's ERC-3009 reports both sides of the validity window with one error; the arguments tell which.
_BAD_TIME: Final = keccak(text="ERC3009InvalidAuthorizationTime(uint256,uint256)")[:4]
_TRANSFER_TOPIC: Final = "0x" + keccak(text="Transfer(address,address,uint256)").hex()
_AUTHORIZATION_STATE: Final = keccak(text="authorizationState(address,bytes32)")[:4]
#: `AuthorizationUsed(address indexed authorizer, bytes32 indexed nonce)`: how a used authorization is found
AUTHORIZATION_USED_TOPIC: Final = "0x" + keccak(text="AuthorizationUsed(address,bytes32)").hex()
SIMULATION_FAILED: Final = "invalid_exact_evm_transaction_simulation_failed"
TRANSFER_EVENT_MISMATCH: Final = "invalid_exact_evm_transfer_event_mismatch"

# Custom errors a token may use instead of revert strings (OpenZeppelin 5 and common EIP-3009 tokens).
_KNOWN_ERRORS: Final[dict[bytes, str]] = {
    keccak(text=sig)[:4]: sig.split("(")[0]
    for sig in (
        "ERC20InsufficientBalance(address,uint256,uint256)",
        "AuthorizationAlreadyUsed(address,bytes32)",
        "AuthorizationUsedOrCanceled(address,bytes32)",
        "AuthorizationNotYetValid(uint256,uint256)",
        "AuthorizationExpired(uint256,uint256)",
        "AuthorizationNotYetValid()",
        "ERC3009InvalidSignature()",
        "ERC3009UsedAuthorization(address,bytes32)",
        "AuthorizationExpired()",
        "InvalidSignature()",
        "InvalidSigner(address,address)",
        "ECDSAInvalidSignature()",
        "ECDSAInvalidSignatureLength(uint256)",
        "ECDSAInvalidSignatureS(bytes32)",
    )
}

# Ordered: the first keyword found in the revert text (or custom error name) decides the x402 reason.
_KEYWORDS: Final = (
    ("notyetvalid", Reason.VALID_AFTER),
    ("expired", Reason.VALID_BEFORE),
    ("used", Reason.NONCE_ALREADY_USED),
    ("cancel", Reason.NONCE_ALREADY_USED),
    ("balance", Reason.INSUFFICIENT_BALANCE),
    ("signature", Reason.SIGNATURE),
    ("signer", Reason.SIGNATURE),
)


class ExactRejected(EscrowError):
    """The chain refuses an `exact` payment; `code` is the x402 reason, shared with MPP answers."""

    status_hint = 402


def revert_reason(data: bytes, errors: Mapping[bytes, str] | None = None, *, now: float | None = None) -> str:
    """Map a `transferWithAuthorization` revert payload to an x402 reason code."""
    text = ""
    if data[:4] == _BAD_TIME and len(data) == 68:
        valid_before = int.from_bytes(data[36:68], "big")
        return (
            Reason.VALID_BEFORE
            if valid_before <= (time.time() if now is None else now)
            else Reason.VALID_AFTER
        )
    if data[:4] == _ERROR_STRING:
        try:
            (text,) = abi_decode(["string"], data[4:])
        except Exception:  # a garbled payload is just an unexplained failure
            text = ""
    elif len(data) >= 4:
        text = (errors or {}).get(data[:4]) or _KNOWN_ERRORS.get(data[:4], "")
    key = text.lower().replace(" ", "").replace("_", "")
    for word, reason in _KEYWORDS:
        if word in key:
            return reason
    return SIMULATION_FAILED


class ExactEvm:
    """Verify and settle EIP-3009 authorizations on one chain through a relayer key."""

    def __init__(
        self,
        rpc: Rpc,
        relayer: TxSender,
        *,
        gas_limit: int = 150_000,
        gas_limit_contract: int = 400_000,
        receipt_timeout: float = 30.0,
        errors: Mapping[bytes, str] | None = None,
    ) -> None:
        self.rpc = rpc
        self.relayer = relayer
        self.gas_limit = gas_limit
        self.gas_limit_contract = gas_limit_contract
        self.receipt_timeout = receipt_timeout
        self._errors = dict(errors or {})

    @staticmethod
    def calldata(auth: Eip3009Authorization, signature: bytes) -> bytes:
        """`transferWithAuthorization` call data: the (v,r,s) overload for 65-byte signatures, else bytes."""
        head = [
            _address(auth.from_),
            _address(auth.to),
            int(auth.value),
            int(auth.valid_after),
            int(auth.valid_before),
            bytes.fromhex(auth.nonce[2:]),
        ]
        types = ["address", "address", "uint256", "uint256", "uint256", "bytes32"]
        if len(signature) == 65:
            v = signature[64] if signature[64] >= 27 else signature[64] + 27
            vrs = [v, signature[:32], signature[32:64]]
            return _TWA_VRS + abi_encode([*types, "uint8", "bytes32", "bytes32"], [*head, *vrs])
        return _TWA_BYTES + abi_encode([*types, "bytes"], [*head, signature])

    def gas_for(self, signature: bytes) -> int:
        """The gas limit of one `transferWithAuthorization`: more for ERC-1271 payers (a contract call)."""
        return self.gas_limit if len(signature) == 65 else self.gas_limit_contract

    def transfer(self, payload: ExactEvmPayload) -> tuple[bytes, int]:
        """Call data and gas limit that settle `payload` (for senders that batch: `ExactSettler`)."""
        signature = _signature_bytes(payload.signature)
        return self.calldata(payload.authorization, signature), self.gas_for(signature)

    async def verify(self, domain: Eip712Domain, payload: ExactEvmPayload) -> None:
        """Check the signature (EOA or strict ERC-1271) and simulate the transfer; raise `ExactRejected`.

        `domain.verifying_contract` is the token. Off-chain checks (amount, recipient, window) are the
        caller's; this is everything that needs the chain.
        """
        auth = payload.authorization
        signature = _signature_bytes(payload.signature)
        asset = domain.verifying_contract
        digest = authorization_digest(domain, auth)
        check_1271 = _IS_VALID_SIGNATURE + abi_encode(["bytes32", "bytes"], [digest, signature])
        simulate = {"from": self.relayer.address, "to": asset, "data": _hex(self.calldata(auth, signature))}
        code, magic, simulated = await self.rpc.batch(
            [
                ("eth_getCode", [auth.from_, "latest"]),
                ("eth_call", [{"to": auth.from_, "data": _hex(check_1271)}, "latest"]),
                ("eth_call", [simulate, "latest"]),
            ]
        )
        if isinstance(code, ChainError):
            raise code
        if code in ("0x", "", None):
            try:
                signer = recover_transfer_authorization(domain, payload)
            except InvalidSignature as exc:
                raise ExactRejected(exc.message, code=Reason.SIGNATURE) from None
            if signer.lower() != auth.from_.lower():
                raise ExactRejected("signature does not recover to the payer", code=Reason.SIGNATURE)
        elif not isinstance(magic, str) or magic[:10].lower() != _hex(_ERC1271_MAGIC):
            raise ExactRejected("the payer's ERC-1271 isValidSignature refused", code=Reason.SIGNATURE)
        if isinstance(simulated, RevertError):
            reason = revert_reason(simulated.data, self._errors)
            raise ExactRejected(f"simulation reverted ({reason})", code=reason)
        if isinstance(simulated, ChainError):
            raise simulated

    async def settle(self, domain: Eip712Domain, payload: ExactEvmPayload) -> str:
        """Broadcast `transferWithAuthorization`, wait for the receipt, check the Transfer event; tx hash."""
        auth = payload.authorization
        signature = _signature_bytes(payload.signature)
        asset = domain.verifying_contract
        try:
            receipt = await self.relayer.transact(
                asset,
                self.calldata(auth, signature),
                gas=self.gas_for(signature),
                timeout=self.receipt_timeout,
            )
        except TransactionFailed as exc:
            raise ExactRejected(str(exc), code=Reason.TRANSACTION_FAILED) from exc
        if not has_transfer(receipt, asset, auth):
            raise ExactRejected(
                f"no matching Transfer event in {receipt.transaction_hash}", code=TRANSFER_EVENT_MISMATCH
            )
        return receipt.transaction_hash


def _hex(data: bytes) -> str:
    return "0x" + data.hex()


def _address(value: str) -> bytes:
    return bytes.fromhex(value[2:])


def _signature_bytes(value: str) -> bytes:
    if value[:2] in ("0x", "0X"):
        try:
            return bytes.fromhex(value[2:])
        except ValueError:
            pass
    raise ExactRejected("signature is not 0x-prefixed hex", code=Reason.SIGNATURE)


def _topic_address(topic: str) -> str:
    return "0x" + topic[-40:]


def authorization_state_calldata(authorizer: str, nonce: str) -> bytes:
    """`authorizationState(authorizer, nonce)`: true once the authorization was used (or canceled)."""
    return _AUTHORIZATION_STATE + abi_encode(
        ["address", "bytes32"], [_address(authorizer), bytes.fromhex(nonce[2:])]
    )


def has_transfer(receipt: Receipt, asset: str, auth: Eip3009Authorization) -> bool:
    """Whether `receipt` holds the `Transfer` that `auth` authorizes (token, from, to, value)."""
    for log in receipt.logs:
        if (
            log.address.lower() == asset.lower()
            and len(log.topics) == 3
            and log.topics[0] == _TRANSFER_TOPIC
            and _topic_address(log.topics[1]).lower() == auth.from_.lower()
            and _topic_address(log.topics[2]).lower() == auth.to.lower()
            and int(log.data, 16) == int(auth.value)
        ):
            return True
    return False
