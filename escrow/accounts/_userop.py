"""ERC-4337 v0.7 user operations: their types, hash, encoding and errors.

- `PackedUserOperation` holds the unpacked fields; `user_op_hash` is the EntryPoint v0.7 hash (not EIP-712),
  which `OwnerKey` and `SessionKey` (`_signers`) sign with the EIP-191 prefix, as `AgentAccount` verifies.
- `encode_execute` builds the ERC-7821 batch call (`execute(bytes32 mode, bytes executionData)`) every
  `AgentAccount` operation uses, one call or many: the batch is atomic.
- `UserOpRejected` says why an operation failed validation: the EntryPoint's reason (`AA23 reverted`, `AA24
  signature error`, ...) and, for a session key, the policy that failed (`PolicyViolation`).
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from typing import Final, Protocol, runtime_checkable

import msgspec
from eth_abi.abi import decode as abi_decode
from eth_abi.abi import encode as abi_encode
from eth_abi.exceptions import DecodingError
from eth_utils.address import to_checksum_address
from eth_utils.crypto import keccak

from ..chain._artifacts import EscrowError

__all__ = [
    "BATCH_MODE",
    "ENTRYPOINT_V07",
    "AccountError",
    "BundleFailed",
    "Call",
    "PackedUserOperation",
    "SESSION_SIGNATURE_LENGTH",
    "PolicyViolation",
    "SessionPolicyKind",
    "UserOpRejected",
    "decode_handle_ops_error",
    "encode_execute",
    "encode_handle_ops",
    "personal_digest",
    "user_op_hash",
    "UserOpSigner",
]

ENTRYPOINT_V07: Final = to_checksum_address("0x0000000071727De22E5E9d8BAf0edAc6f37da032")
#: ERC-7821 / ERC-7579 execution mode: call type batch (0x01), exec type default (revert on failure).
BATCH_MODE: Final = b"\x01" + bytes(31)
#: Length of a session-key signature: key (20) ++ window (6) ++ ECDSA signature (65).
SESSION_SIGNATURE_LENGTH: Final = 91

_EXECUTE: Final = keccak(text="execute(bytes32,bytes)")[:4]
_HANDLE_OPS: Final = keccak(
    text="handleOps((address,uint256,bytes,bytes,bytes32,uint256,bytes32,bytes,bytes)[],address)"
)[:4]
_GET_NONCE: Final = keccak(text="getNonce(address,uint192)")[:4]
_FAILED_OP: Final = keccak(text="FailedOp(uint256,string)")[:4]
_FAILED_OP_WITH_REVERT: Final = keccak(text="FailedOpWithRevert(uint256,string,bytes)")[:4]
_POLICY_VIOLATION: Final = keccak(text="SessionKeyPolicyViolation(address,uint8,uint256,uint256)")[:4]
_PAYMASTER_SPEND_LIMIT: Final = keccak(text="AgentPaymasterSpendLimit(address,uint256,uint256,uint256)")[:4]
_USER_OPERATION_EVENT: Final = (
    "0x" + keccak(text="UserOperationEvent(bytes32,address,address,uint256,bool,uint256,uint256)").hex()
)
_USER_OPERATION_REVERT_REASON: Final = (
    "0x" + keccak(text="UserOperationRevertReason(bytes32,address,uint256,bytes)").hex()
)
_ACCOUNT_DEPLOYED: Final = "0x" + keccak(text="AccountDeployed(bytes32,address,address,address)").hex()
_UINT128: Final = 2**128 - 1
_PACKED_OP_TYPE: Final = "(address,uint256,bytes,bytes,bytes32,uint256,bytes32,bytes,bytes)"


# ---------------------------------------------------------------------------------------------- errors


class AccountError(EscrowError):
    """Root of smart-account and user-operation errors."""

    code = "account_error"


class SessionPolicyKind(enum.IntEnum):
    """The policy a session-key operation failed: `SessionPolicyKind` of `SessionKeyTypes.sol`."""

    KEY = 0  # not installed, or revoked
    CALL = 1  # (target, selector) not allowed, self-call, or not an ERC-7821 batch
    VALUE = 2  # native value above the call's limit
    ARGUMENT = 3  # an argument rule does not hold
    TIMESTAMP = 4  # outside validAfter / validUntil
    RATE_LIMIT = 5  # lifetime or per-window use count exhausted, or a stale window
    GAS = 6  # worst-case gas cost above the remaining budget

    @property
    def code(self) -> str:
        return _POLICY_CODES[self]


_POLICY_CODES: Final = {
    SessionPolicyKind.KEY: "session_key_not_installed",
    SessionPolicyKind.CALL: "session_call_not_allowed",
    SessionPolicyKind.VALUE: "session_value_limit",
    SessionPolicyKind.ARGUMENT: "session_argument_rule",
    SessionPolicyKind.TIMESTAMP: "session_outside_validity",
    SessionPolicyKind.RATE_LIMIT: "session_rate_limit",
    SessionPolicyKind.GAS: "session_gas_budget",
}


class PolicyViolation(msgspec.Struct, frozen=True, kw_only=True):
    """Which policy of which session key an operation failed, and where (batch call, argument rule)."""

    key: str
    policy: SessionPolicyKind
    call_index: int = 0
    rule_index: int = 0

    def describe(self) -> str:
        where = {
            SessionPolicyKind.KEY: "the key is not installed (never, or revoked)",
            SessionPolicyKind.CALL: f"call {self.call_index} is not allowed by the call policy",
            SessionPolicyKind.VALUE: f"call {self.call_index} sends more native value than allowed",
            SessionPolicyKind.ARGUMENT: f"call {self.call_index} breaks argument rule {self.rule_index}",
            SessionPolicyKind.TIMESTAMP: "the operation falls outside the key's validity period",
            SessionPolicyKind.RATE_LIMIT: "the key's rate limit is exhausted, or the window is stale",
            SessionPolicyKind.GAS: "the operation's worst-case gas cost exceeds the key's remaining budget",
        }[self.policy]
        return f"session key {self.key}: {where}"


class UserOpRejected(AccountError):
    """The EntryPoint refused the operation during validation: it never executed and cost nothing.

    `reason` is the EntryPoint's (`"AA23 reverted"`, `"AA24 signature error"`, `"AA22 expired or not due"`,
    `"AA25 invalid account nonce"`, ...); `inner` the account's revert data for `AA23`; `violation` the
    session-key policy that failed, when known. `code` names the policy (`session_argument_rule`, ...), the
    EntryPoint check (`userop_signature_invalid`, `userop_nonce_invalid`, ...) or a paymaster's
    refusal (`paymaster_spend_limit`, `paymaster_signature_invalid`, `paymaster_outside_validity`, ...).
    """

    code = "userop_rejected"

    def __init__(
        self,
        reason: str,
        *,
        op_index: int = 0,
        inner: bytes = b"",
        violation: PolicyViolation | None = None,
        user_op_hash: str = "",
    ) -> None:
        self.reason = reason
        self.op_index = op_index
        self.inner = inner
        self.violation = violation
        self.user_op_hash = user_op_hash
        message = f"user operation rejected: {reason}"
        if violation is not None:
            message += f" ({violation.describe()})"
        super().__init__(message, code=_rejection_code(reason, violation, inner))


def _rejection_code(reason: str, violation: PolicyViolation | None, inner: bytes = b"") -> str:
    if violation is not None:
        return violation.policy.code
    if reason.startswith("AA33") and inner[:4] == _PAYMASTER_SPEND_LIMIT:
        return "paymaster_spend_limit"
    for prefix, code in (
        ("AA34", "paymaster_signature_invalid"),
        ("AA32", "paymaster_outside_validity"),
        ("AA31", "paymaster_deposit_low"),
        ("AA3", "paymaster_refused"),
        ("AA24", "userop_signature_invalid"),
        ("AA25", "userop_nonce_invalid"),
        ("AA22", "userop_outside_validity"),
        ("AA21", "userop_prefund_missing"),
        ("AA1", "userop_init_code_failed"),
        ("AA26", "userop_verification_gas"),
    ):
        if reason.startswith(prefix):
            return code
    return "userop_rejected"


class BundleFailed(AccountError):
    """The `handleOps` transaction itself failed (mined with status 0, or refused by the node)."""

    code = "bundle_failed"


def decode_handle_ops_error(data: bytes) -> tuple[int, str, bytes] | None:
    """`(op_index, reason, inner)` from a `FailedOp` / `FailedOpWithRevert` revert, else None."""
    try:
        if data[:4] == _FAILED_OP:
            index, reason = abi_decode(["uint256", "string"], data[4:])
            return int(index), str(reason), b""
        if data[:4] == _FAILED_OP_WITH_REVERT:
            index, reason, inner = abi_decode(["uint256", "string", "bytes"], data[4:])
            return int(index), str(reason), bytes(inner)
    except (DecodingError, ValueError, OverflowError):
        return None
    return None


def _decode_violation(inner: bytes) -> PolicyViolation | None:
    if inner[:4] != _POLICY_VIOLATION:
        return None
    try:
        key, policy, call_index, rule_index = abi_decode(
            ["address", "uint8", "uint256", "uint256"], inner[4:]
        )
        kind = SessionPolicyKind(policy)
    except (DecodingError, ValueError):
        return None
    return PolicyViolation(
        key=to_checksum_address(key), policy=kind, call_index=int(call_index), rule_index=int(rule_index)
    )


# ---------------------------------------------------------------------------------------------- operations


@runtime_checkable
class UserOpSigner(Protocol):
    """Produces the `signature` field of a user operation from its hash."""

    @property
    def address(self) -> str: ...

    def sign_user_op(self, user_op_hash: bytes, *, timestamp: int) -> bytes: ...


class Call(msgspec.Struct, frozen=True):
    """One call of an ERC-7821 batch."""

    target: str
    value: int = 0
    data: bytes = b""


def encode_execute(calls: Sequence[Call]) -> bytes:
    """`execute(BATCH_MODE, abi.encode(Execution[]))`: the callData of every `AgentAccount` operation."""
    if not calls:
        raise ValueError("a batch needs at least one call")
    batch = abi_encode(["(address,uint256,bytes)[]"], [[(c.target, c.value, c.data) for c in calls]])
    return _EXECUTE + abi_encode(["bytes32", "bytes"], [BATCH_MODE, batch])


class PackedUserOperation(msgspec.Struct, frozen=True, kw_only=True):
    """An EntryPoint v0.7 user operation, with the packed gas fields kept apart (packed by `packed()`)."""

    sender: str
    nonce: int
    init_code: bytes = b""
    call_data: bytes = b""
    verification_gas_limit: int = 0
    call_gas_limit: int = 0
    pre_verification_gas: int = 0
    max_priority_fee_per_gas: int = 0
    max_fee_per_gas: int = 0
    paymaster_and_data: bytes = b""
    signature: bytes = b""

    @property
    def account_gas_limits(self) -> bytes:
        return _pack128(self.verification_gas_limit, self.call_gas_limit)

    @property
    def gas_fees(self) -> bytes:
        return _pack128(self.max_priority_fee_per_gas, self.max_fee_per_gas)

    @property
    def nonce_key(self) -> int:
        return self.nonce >> 64

    @property
    def max_cost(self) -> int:
        """Worst-case wei: the prefund the EntryPoint requires, and what a session key's gas policy counts."""
        gas = self.verification_gas_limit + self.call_gas_limit + self.pre_verification_gas
        if len(self.paymaster_and_data) >= 52:
            gas += int.from_bytes(self.paymaster_and_data[20:36], "big")
            gas += int.from_bytes(self.paymaster_and_data[36:52], "big")
        return gas * self.max_fee_per_gas

    def packed(self) -> tuple[object, ...]:
        """The ABI tuple of the Solidity `PackedUserOperation`."""
        return (
            to_checksum_address(self.sender),
            self.nonce,
            self.init_code,
            self.call_data,
            self.account_gas_limits,
            self.pre_verification_gas,
            self.gas_fees,
            self.paymaster_and_data,
            self.signature,
        )

    def hash(self, *, chain_id: int, entry_point: str = ENTRYPOINT_V07) -> bytes:
        return user_op_hash(self, chain_id=chain_id, entry_point=entry_point)

    def with_signature(self, signature: bytes) -> PackedUserOperation:
        return msgspec.structs.replace(self, signature=signature)

    def signed(
        self, signer: UserOpSigner, *, chain_id: int, timestamp: int, entry_point: str = ENTRYPOINT_V07
    ) -> PackedUserOperation:
        """This operation signed by `signer`; `timestamp` (chain time) picks a session key's rate window."""
        digest = self.hash(chain_id=chain_id, entry_point=entry_point)
        return self.with_signature(signer.sign_user_op(digest, timestamp=timestamp))


def _pack128(high: int, low: int) -> bytes:
    if not (0 <= high <= _UINT128 and 0 <= low <= _UINT128):
        raise ValueError("gas values must fit in 128 bits")
    return high.to_bytes(16, "big") + low.to_bytes(16, "big")


def user_op_hash(op: PackedUserOperation, *, chain_id: int, entry_point: str = ENTRYPOINT_V07) -> bytes:
    """`EntryPoint.getUserOpHash(op)` for v0.7:
    `keccak(abi.encode(keccak(abi.encode(sender, nonce, keccak(initCode), keccak(callData), accountGasLimits,
    preVerificationGas, gasFees, keccak(paymasterAndData))), entryPoint, chainId))`."""
    inner = keccak(
        abi_encode(
            ["address", "uint256", "bytes32", "bytes32", "bytes32", "uint256", "bytes32", "bytes32"],
            [
                to_checksum_address(op.sender),
                op.nonce,
                keccak(op.init_code),
                keccak(op.call_data),
                op.account_gas_limits,
                op.pre_verification_gas,
                op.gas_fees,
                keccak(op.paymaster_and_data),
            ],
        )
    )
    return keccak(
        abi_encode(["bytes32", "address", "uint256"], [inner, to_checksum_address(entry_point), chain_id])
    )


def personal_digest(digest: bytes) -> bytes:
    """EIP-191 `personal_sign` digest of a 32-byte hash (what `AgentAccount` keys sign)."""
    return keccak(b"\x19Ethereum Signed Message:\n32" + digest)


def encode_handle_ops(ops: Sequence[PackedUserOperation], beneficiary: str) -> bytes:
    return _HANDLE_OPS + abi_encode(
        [f"{_PACKED_OP_TYPE}[]", "address"], [[op.packed() for op in ops], beneficiary]
    )
