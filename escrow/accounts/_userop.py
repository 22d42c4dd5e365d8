"""ERC-4337 v0.7 user operations: build, hash, sign, bundle and submit them ourselves.

    op = PackedUserOperation(sender=account, nonce=lane.nonce, call_data=encode_execute(calls), ...)
    op = op.signed(SessionKey(key_signer, interval=3600), chain_id=chain_id, timestamp=now)
    result = await bundler.send(op)         # UserOpResult, or UserOpRejected saying which policy failed

- `PackedUserOperation` holds the unpacked fields; `user_op_hash` is the EntryPoint v0.7 hash (not EIP-712),
  which `OwnerKey` and `SessionKey` sign with the EIP-191 prefix, as `AgentAccount` verifies.
- `encode_execute` builds the ERC-7821 batch call (`execute(bytes32 mode, bytes executionData)`) every
  `AgentAccount` operation uses, one call or many: the batch is atomic.
- `NonceLanes` hands out ERC-4337 2D nonce keys so concurrent operations of one account never collide.
- `Bundler` is our own bundler: operations submitted concurrently are group-committed into one `handleOps`
  transaction sent by a relayer key; `eth_estimateGas` of the bundle is the simulation, and an operation that
  fails validation is dropped from the bundle and reported with the EntryPoint's reason (`AA23 reverted`,
  `AA24 signature error`, ...) and, for a session key, the policy that failed (`PolicyViolation`).
"""

from __future__ import annotations

import asyncio
import enum
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import Final, Protocol, runtime_checkable

import msgspec
from eth_abi.abi import decode as abi_decode
from eth_abi.abi import encode as abi_encode
from eth_abi.exceptions import DecodingError
from eth_utils.address import to_checksum_address
from eth_utils.crypto import keccak

from x402 import Signer

from ..chain._artifacts import EscrowError
from ..chain._rpc import ChainError, Receipt, RevertError, Rpc, TxSender

__all__ = [
    "BATCH_MODE",
    "ENTRYPOINT_V07",
    "AccountError",
    "BundleFailed",
    "Bundler",
    "Call",
    "Lane",
    "NonceLanes",
    "OwnerKey",
    "PackedUserOperation",
    "SESSION_SIGNATURE_LENGTH",
    "PolicyViolation",
    "SessionKey",
    "SessionPolicyKind",
    "UserOpRejected",
    "UserOpResult",
    "UserOpSigner",
    "decode_handle_ops_error",
    "encode_execute",
    "encode_handle_ops",
    "personal_digest",
    "user_op_hash",
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


# ---------------------------------------------------------------------------------------------- signers


@runtime_checkable
class UserOpSigner(Protocol):
    """Produces the `signature` field of a user operation from its hash."""

    @property
    def address(self) -> str: ...

    def sign_user_op(self, user_op_hash: bytes, *, timestamp: int) -> bytes: ...


class OwnerKey:
    """The account owner: a plain 65-byte ECDSA signature of the EIP-191 digest of the hash."""

    __slots__ = ("signer",)

    def __init__(self, signer: Signer) -> None:
        self.signer = signer

    @property
    def address(self) -> str:
        return self.signer.address

    def sign_user_op(self, user_op_hash: bytes, *, timestamp: int) -> bytes:
        return self.signer.sign_hash(personal_digest(user_op_hash))

    def __repr__(self) -> str:
        return f"OwnerKey({self.address})"


class SessionKey:
    """A session key: `key (20) ++ window (6) ++ ECDSA signature (65)`.

    `interval` is the key's rate-limit interval (0 when it has none); the window claimed is the one holding
    `timestamp`, which should be the chain's current time. An operation that lands in another window than the
    one it claims is rejected by the EntryPoint (`AA22`), so near a window's end, allow for block time.
    """

    __slots__ = ("interval", "signer")

    def __init__(self, signer: Signer, *, interval: int = 0) -> None:
        self.signer = signer
        self.interval = interval

    @property
    def address(self) -> str:
        return self.signer.address

    def window(self, timestamp: int) -> int:
        return timestamp // self.interval if self.interval else 0

    def sign_user_op(self, user_op_hash: bytes, *, timestamp: int) -> bytes:
        return (
            bytes.fromhex(self.address[2:])
            + self.window(timestamp).to_bytes(6, "big")
            + self.signer.sign_hash(personal_digest(user_op_hash))
        )

    def __repr__(self) -> str:
        return f"SessionKey({self.address}, interval={self.interval})"


# ---------------------------------------------------------------------------------------------- nonce lanes


class Lane:
    """One 2D nonce lane held by one in-flight operation: `nonce` is the next one to use on it."""

    __slots__ = ("_lanes", "index", "key", "nonce", "state")

    def __init__(self, lanes: NonceLanes, index: int, key: int, nonce: int) -> None:
        self._lanes, self.index, self.key, self.nonce = lanes, index, key, nonce
        self.state = "unknown"  # "used" (nonce consumed), "unused" (not consumed), or "unknown"

    def used(self) -> None:
        """The operation landed (executed or not): its nonce is consumed."""
        self.state = "used"

    def unused(self) -> None:
        """The operation was rejected before it could consume its nonce."""
        self.state = "unused"


class NonceLanes:
    """Allocates ERC-4337 nonce keys ("lanes") so concurrent operations of one account never collide.

    Each in-flight operation holds a lane of its own; the lowest free lane is handed out first, so a steady
    load keeps reusing the same few lanes (the first use of a lane costs about 17k gas more: the EntryPoint's
    sequence slot goes from zero to one). The key of lane `i` is `prefix << 32 | i`: processes that submit for
    the same account must use distinct prefixes. Sequence numbers are read from the EntryPoint on first use
    and then tracked locally; a lane whose fate is unknown (timeout, transport error) is read again next time.
    """

    def __init__(
        self,
        rpc: Rpc,
        sender: str,
        *,
        entry_point: str = ENTRYPOINT_V07,
        prefix: int = 0,
        max_lanes: int = 1024,
    ) -> None:
        if not 0 <= prefix < 2**160:
            raise ValueError("prefix must fit in 160 bits")
        self.rpc, self.sender, self.entry_point = rpc, to_checksum_address(sender), entry_point
        self.prefix, self.max_lanes = prefix, max_lanes
        self._free: list[int] = []
        self._next_index = 0
        self._sequence: dict[int, int] = {}
        self._available = asyncio.Condition()

    def key(self, index: int) -> int:
        return (self.prefix << 32) | index

    async def next_nonce(self, key: int) -> int:
        """`EntryPoint.getNonce(sender, key)`: `key << 64 | sequence`."""
        data = _GET_NONCE + abi_encode(["address", "uint192"], [self.sender, key])
        return int.from_bytes(await self.rpc.call(self.entry_point, data), "big")

    @asynccontextmanager
    async def lane(self) -> AsyncIterator[Lane]:
        """Hold a lane for one operation; mark it `used()` once the operation landed."""
        async with self._available:
            while not self._free and self._next_index >= self.max_lanes:
                await self._available.wait()
            if self._free:
                index = min(self._free)
                self._free.remove(index)
            else:
                index, self._next_index = self._next_index, self._next_index + 1
        key = self.key(index)
        try:
            if index in self._sequence:
                nonce = (key << 64) | self._sequence[index]
            else:
                nonce = await self.next_nonce(key)
        except BaseException:
            await self._release(index)
            raise
        lane = Lane(self, index, key, nonce)
        try:
            yield lane
        finally:
            if lane.state == "used":
                self._sequence[index] = (nonce & (2**64 - 1)) + 1
            elif lane.state == "unused":
                self._sequence[index] = nonce & (2**64 - 1)
            else:
                self._sequence.pop(index, None)
            await self._release(index)

    async def _release(self, index: int) -> None:
        async with self._available:
            self._free.append(index)
            self._available.notify()


# ---------------------------------------------------------------------------------------------- bundler


class UserOpResult(msgspec.Struct, frozen=True, kw_only=True):
    """The outcome of a landed operation (from its `UserOperationEvent`). `success` is false when its calls
    reverted (the batch is atomic: none of them took effect); `revert_reason` is then the revert data."""

    user_op_hash: str
    sender: str
    nonce: int
    success: bool
    actual_gas_cost: int
    actual_gas_used: int
    revert_reason: bytes = b""
    deployed: bool = False
    tx_hash: str = ""
    bundle_gas_used: int = 0  # gasUsed of the whole handleOps transaction
    bundle_size: int = 1

    def raise_for_status(self) -> UserOpResult:
        if not self.success:
            raise AccountError(
                f"user operation {self.user_op_hash} reverted: 0x{self.revert_reason.hex()}",
                code="userop_execution_reverted",
            )
        return self


class _Queued:
    __slots__ = ("future", "op")

    def __init__(self, op: PackedUserOperation, future: asyncio.Future[UserOpResult]) -> None:
        self.op, self.future = op, future


class Bundler:
    """Submits user operations through `handleOps`, signed and paid by a relayer key (`TxSender`).

    `send` group-commits: operations that arrive while a bundle is in flight go together into the next one
    (at most `max_bundle`). Before sending, the bundle is simulated with `eth_estimateGas`; an operation that
    fails validation is removed and its caller gets `UserOpRejected`, and the rest is simulated again. The
    relayer is reimbursed by the EntryPoint (`beneficiary`, the relayer by default).
    """

    def __init__(
        self,
        rpc: Rpc,
        relayer: TxSender,
        *,
        chain_id: int,
        entry_point: str = ENTRYPOINT_V07,
        beneficiary: str | None = None,
        max_bundle: int = 32,
        receipt_timeout: float = 60.0,
    ) -> None:
        self.rpc, self.relayer, self.chain_id = rpc, relayer, chain_id
        self.entry_point = to_checksum_address(entry_point)
        self.beneficiary = to_checksum_address(beneficiary or relayer.address)
        self.max_bundle = max_bundle
        self.receipt_timeout = receipt_timeout
        self._queue: list[_Queued] = []
        self._flusher: asyncio.Task[None] | None = None

    async def send(self, op: PackedUserOperation) -> UserOpResult:
        """Submit one signed operation and wait until it landed; `UserOpRejected` if validation refused it."""
        future: asyncio.Future[UserOpResult] = asyncio.get_running_loop().create_future()
        self._queue.append(_Queued(op, future))
        if self._flusher is None or self._flusher.done():
            self._flusher = asyncio.get_running_loop().create_task(self._flush())
        return await future

    async def simulate(self, ops: Sequence[PackedUserOperation]) -> int:
        """Gas of `handleOps(ops)` by `eth_estimateGas`; `UserOpRejected` for the first op that fails."""
        data = encode_handle_ops(ops, self.beneficiary)
        tx = {"from": self.relayer.address, "to": self.entry_point, "data": "0x" + data.hex()}
        try:
            return int(await self.rpc.request("eth_estimateGas", [tx]), 16)
        except RevertError as exc:
            decoded = decode_handle_ops_error(exc.data)
            if decoded is None:
                raise BundleFailed(f"handleOps simulation reverted: {exc} 0x{exc.data.hex()}") from None
            index, reason, inner = decoded
            op = ops[index] if 0 <= index < len(ops) else None
            digest = (
                ""
                if op is None
                else "0x" + op.hash(chain_id=self.chain_id, entry_point=self.entry_point).hex()
            )
            raise UserOpRejected(
                reason, op_index=index, inner=inner, violation=_decode_violation(inner), user_op_hash=digest
            ) from None

    async def _flush(self) -> None:
        while self._queue:
            batch, self._queue = self._queue[: self.max_bundle], self._queue[self.max_bundle :]
            try:
                await self._bundle(batch)
            except BaseException as exc:  # never leave a caller waiting forever
                error = exc if isinstance(exc, EscrowError) else BundleFailed(f"bundler failed: {exc!r}")
                for item in batch:
                    if not item.future.done():
                        item.future.set_exception(error)
                if not isinstance(exc, Exception):
                    raise

    async def _bundle(self, batch: list[_Queued]) -> None:
        live = list(batch)
        while live:
            try:
                gas = await self.simulate([item.op for item in live])
                break
            except UserOpRejected as rejected:
                if not 0 <= rejected.op_index < len(live):
                    raise
                item = live.pop(rejected.op_index)
                item.future.set_exception(rejected)
        else:
            return
        data = encode_handle_ops([item.op for item in live], self.beneficiary)
        try:
            tx_hash = await self.relayer.send(self.entry_point, data, gas=gas + gas // 4 + 20_000)
            receipt = await self.rpc.wait_for_receipt(tx_hash, timeout=self.receipt_timeout)
        except ChainError as exc:
            raise BundleFailed(f"handleOps transaction failed: {exc}") from exc
        if not receipt.ok:
            raise BundleFailed(f"handleOps transaction {receipt.transaction_hash} reverted")
        results = _parse_receipt(receipt, size=len(live))
        for item in live:
            digest = "0x" + item.op.hash(chain_id=self.chain_id, entry_point=self.entry_point).hex()
            result = results.get(digest)
            if result is None:
                item.future.set_exception(BundleFailed(f"no UserOperationEvent for {digest}"))
            else:
                item.future.set_result(result)


def _parse_receipt(receipt: Receipt, *, size: int) -> dict[str, UserOpResult]:
    reasons: dict[str, bytes] = {}
    deployed: set[str] = set()
    events = []
    for log in receipt.logs:
        if not log.topics:
            continue
        topic = log.topics[0]
        if topic == _USER_OPERATION_REVERT_REASON:
            _nonce, reason = abi_decode(["uint256", "bytes"], bytes.fromhex(log.data[2:]))
            reasons[log.topics[1]] = bytes(reason)
        elif topic == _ACCOUNT_DEPLOYED:
            deployed.add(log.topics[1])
        elif topic == _USER_OPERATION_EVENT:
            events.append(log)
    out: dict[str, UserOpResult] = {}
    for log in events:
        nonce, success, cost, used = abi_decode(
            ["uint256", "bool", "uint256", "uint256"], bytes.fromhex(log.data[2:])
        )
        digest = log.topics[1]
        out[digest] = UserOpResult(
            user_op_hash=digest,
            sender=to_checksum_address("0x" + log.topics[2][-40:]),
            nonce=int(nonce),
            success=bool(success),
            actual_gas_cost=int(cost),
            actual_gas_used=int(used),
            revert_reason=reasons.get(digest, b""),
            deployed=digest in deployed,
            tx_hash=receipt.transaction_hash,
            bundle_gas_used=int(receipt.gas_used, 16),
            bundle_size=size,
        )
    return out
