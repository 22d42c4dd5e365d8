"""`Bundler`: our own ERC-4337 bundler.

    result = await bundler.send(op)         # UserOpResult, or UserOpRejected saying which policy failed

Operations submitted concurrently are group-committed into one `handleOps` transaction sent by a relayer
key; `eth_estimateGas` of the bundle is the simulation, and an operation that fails validation is dropped
from the bundle and reported with the EntryPoint's reason and, for a session key, the policy that failed.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import msgspec
from eth_abi.abi import decode as abi_decode
from eth_utils.address import to_checksum_address

from ..chain._artifacts import EscrowError
from ..chain._rpc import ChainError, Receipt, RevertError, Rpc, TxSender
from ._userop import (
    _ACCOUNT_DEPLOYED,
    _USER_OPERATION_EVENT,
    _USER_OPERATION_REVERT_REASON,
    ENTRYPOINT_V07,
    AccountError,
    BundleFailed,
    PackedUserOperation,
    UserOpRejected,
    _decode_violation,
    decode_handle_ops_error,
    encode_handle_ops,
)

__all__ = [
    "Bundler",
    "UserOpResult",
]

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
