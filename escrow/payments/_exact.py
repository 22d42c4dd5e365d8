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

from ..chain._artifacts import EscrowError
from ..chain._rpc import ChainError, Receipt, RevertError, Rpc, TransactionFailed, TxSender

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
_BALANCE_OF: Final = keccak(text="balanceOf(address)")[:4]
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
        lookback_blocks: int = 500_000,
    ) -> None:
        self.rpc = rpc
        self.relayer = relayer
        self.gas_limit = gas_limit
        self.gas_limit_contract = gas_limit_contract
        self.receipt_timeout = receipt_timeout
        self.lookback_blocks = lookback_blocks  # how far back `settled_by` looks for the transfer
        self._errors = dict(errors or {})

    @staticmethod
    def calldata(auth: Eip3009Authorization, signature: bytes) -> bytes:
        """`transferWithAuthorization` call data: the (v,r,s) overload for 65-byte signatures, else bytes.

        Encoded by hand, word by word (every argument but the signature bytes is static): a paid request
        builds it twice (simulation, then settlement), and the generic ABI encoder costs far more.
        """
        head = b"".join(
            (
                _address_word(auth.from_),
                _address_word(auth.to),
                _uint_word(int(auth.value)),
                _uint_word(int(auth.valid_after)),
                _uint_word(int(auth.valid_before)),
                _bytes32_word(auth.nonce),
            )
        )
        if len(signature) == 65:
            v = signature[64] if signature[64] >= 27 else signature[64] + 27
            return _TWA_VRS + head + _uint_word(v) + signature[:32] + signature[32:64]
        return _TWA_BYTES + head + _uint_word(7 * 32) + _dynamic_bytes(signature)

    def gas_for(self, signature: bytes) -> int:
        """The gas limit of one `transferWithAuthorization`: more for ERC-1271 payers (a contract call)."""
        return self.gas_limit if len(signature) == 65 else self.gas_limit_contract

    def transfer(self, payload: ExactEvmPayload) -> tuple[bytes, int]:
        """Call data and gas limit that settle `payload` (for senders that batch: `ExactSettler`)."""
        signature = _signature_bytes(payload.signature)
        return self.calldata(payload.authorization, signature), self.gas_for(signature)

    async def verify(self, domain: Eip712Domain, payload: ExactEvmPayload) -> int:
        """Check the signature (EOA or strict ERC-1271) and simulate the transfer; raise `ExactRejected`.

        `domain.verifying_contract` is the token. Off-chain checks (amount, recipient, window) are the
        caller's; this is everything that needs the chain. Returns the payer's token balance at the same
        block, so the caller can hold it against what is already accepted but not yet settled.
        """
        auth = payload.authorization
        signature = _signature_bytes(payload.signature)
        asset = domain.verifying_contract
        digest = authorization_digest(domain, auth)
        check_1271 = _IS_VALID_SIGNATURE + digest + _uint_word(2 * 32) + _dynamic_bytes(signature)
        simulate = {"from": self.relayer.address, "to": asset, "data": _hex(self.calldata(auth, signature))}
        balance_of = _BALANCE_OF + _address_word(auth.from_)
        code, magic, simulated, balance = await self.rpc.batch(
            [
                ("eth_getCode", [auth.from_, "latest"]),
                ("eth_call", [{"to": auth.from_, "data": _hex(check_1271)}, "latest"]),
                ("eth_call", [simulate, "latest"]),
                ("eth_call", [{"to": asset, "data": _hex(balance_of)}, "latest"]),
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
        if isinstance(balance, ChainError):
            raise balance
        return int(balance, 16) if isinstance(balance, str) and balance not in ("0x", "") else 0

    async def settle(self, domain: Eip712Domain, payload: ExactEvmPayload, *, pending: str = "") -> str:
        """Land `transferWithAuthorization` and return the hash of the transaction whose `Transfer` paid it.

        `pending` is a transaction an earlier attempt sent for this very authorization: while the node
        still knows it, it is waited for rather than sent again. A transaction that reverts because the
        authorization was already used (a mempool copier front-ran us, or our own earlier send landed) is
        not a failure when the transaction that used it carries this payment's `Transfer`: the payee was
        paid, once, and that transaction's hash is returned. `ReceiptTimeout` (code `settlement_pending`)
        means the outcome is not known yet.
        """
        auth = payload.authorization
        signature = _signature_bytes(payload.signature)
        asset = domain.verifying_contract
        if pending and await self.rpc.request("eth_getTransactionByHash", [pending]) is not None:
            receipt = await self.rpc.wait_for_receipt(pending, timeout=self.receipt_timeout)
            if receipt.ok and has_transfer(receipt, asset, auth):
                return receipt.transaction_hash
        if pending:  # dropped, reverted or paid by another transaction: the chain says which
            landed = await self.settled_by(asset, auth)
            if landed:
                return landed
        try:
            receipt = await self.relayer.transact(
                asset,
                self.calldata(auth, signature),
                gas=self.gas_for(signature),
                timeout=self.receipt_timeout,
            )
        except TransactionFailed as exc:
            landed = await self.settled_by(asset, auth)
            if landed:
                return landed
            raise ExactRejected(str(exc), code=Reason.TRANSACTION_FAILED) from exc
        if not has_transfer(receipt, asset, auth):
            raise ExactRejected(
                f"no matching Transfer event in {receipt.transaction_hash}", code=TRANSFER_EVENT_MISMATCH
            )
        return receipt.transaction_hash

    async def settled_by(self, asset: str, auth: Eip3009Authorization) -> str:
        """The transaction that used `auth` with its very `Transfer` (token, from, to, value), or "".

        "" when the authorization is unused, or was used without this transfer (canceled, or the nonce
        paid something else). Found through `authorizationState` and the `AuthorizationUsed` log.
        """
        # one round trip for both: the head is needed only when the authorization turns out used
        query = {"to": asset, "data": _hex(authorization_state_calldata(auth.from_, auth.nonce))}
        state, block = await self.rpc.batch([("eth_call", [query, "latest"]), ("eth_blockNumber", [])])
        for answer in (state, block):
            if isinstance(answer, ChainError):
                raise answer
        if not isinstance(state, str) or not any(bytes.fromhex(state[2:])):
            return ""
        head = int(block, 16)
        logs = await self.rpc.request(
            "eth_getLogs",
            [
                {
                    "address": asset,
                    "fromBlock": hex(max(0, head - self.lookback_blocks)),
                    "toBlock": "latest",
                    "topics": [
                        AUTHORIZATION_USED_TOPIC,
                        "0x" + "00" * 12 + auth.from_[2:].lower(),
                        auth.nonce.lower(),
                    ],
                }
            ],
        )
        if not isinstance(logs, list) or not logs:
            return ""
        tx_hash = str(logs[-1]["transactionHash"])
        receipt = await self.rpc.get_receipt(tx_hash)
        return tx_hash if receipt is not None and has_transfer(receipt, asset, auth) else ""


def _hex(data: bytes) -> str:
    return "0x" + data.hex()


def _address(value: str) -> bytes:
    return bytes.fromhex(value[2:])


def _address_word(value: str) -> bytes:
    raw = bytes.fromhex(value[2:])
    if len(raw) != 20:
        raise ExactRejected(f"not a 20-byte address: {value!r}", code=Reason.INVALID_PAYLOAD)
    return bytes(12) + raw


def _uint_word(value: int) -> bytes:
    if not 0 <= value < 1 << 256:
        raise ExactRejected(f"not a uint256: {value}", code=Reason.INVALID_PAYLOAD)
    return value.to_bytes(32, "big")


def _bytes32_word(value: str) -> bytes:
    raw = bytes.fromhex(value[2:])
    if len(raw) > 32:
        raise ExactRejected(f"not a bytes32: {value!r}", code=Reason.INVALID_PAYLOAD)
    return raw.ljust(32, b"\0")


def _dynamic_bytes(value: bytes) -> bytes:
    """ABI tail of a `bytes` argument: its length, then the bytes right-padded to whole words."""
    return _uint_word(len(value)) + value + bytes(-len(value) % 32)


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
