"""A client of any ERC-4337 bundler through the standard user-operation JSON-RPC (ERC-7769, EntryPoint v0.7).

    bundler = BundlerRpc("http://127.0.0.1:4337", chain_id=31337, node=rpc)
    await bundler.supported_entry_points()           # ["0x0000000071727De22E5E9d8BAf0edAc6f37da032"]
    result = await account.execute(calls, signer=session_key, bundler=bundler)   # same API as `Bundler`

`BundlerRpc` and our self-bundler (`Bundler`, which calls `handleOps` from a relayer) are interchangeable
`UserOpSubmitter`s: `send(op)` returns the same `UserOpResult` once the operation landed, and raises the same
`UserOpRejected` (with the session-key policy that failed, decoded from the revert data the bundler's
simulation returns) when validation refuses it. A bundler also fills gas: `AgentAccount.prepare` asks it
(`fill`) for `eth_estimateUserOperationGas` and fee suggestions (`pimlico_getUserOperationGasPrice` when the
bundler offers it, else the node's base fee and `eth_maxPriorityFeePerGas`).
"""

from __future__ import annotations

import asyncio
import itertools
import re
import time
from typing import Any, Final, Protocol, runtime_checkable

import httpx
import msgspec
from eth_utils.address import to_checksum_address
from eth_utils.crypto import keccak

from ..chain._rpc import ChainError, Receipt, Rpc
from ._self_bundler import UserOpResult, _parse_receipt
from ._userop import (
    ENTRYPOINT_V07,
    AccountError,
    BundleFailed,
    PackedUserOperation,
    UserOpRejected,
    _decode_violation,
    decode_handle_ops_error,
)

__all__ = [
    "BundlerError",
    "BundlerRpc",
    "GasEstimate",
    "UserOpSubmitter",
    "user_op_from_json",
    "user_op_to_json",
]

_ACCOUNT_DEPLOYED: Final = "0x" + keccak(text="AccountDeployed(bytes32,address,address,address)").hex()
_USER_OPERATION_EVENT: Final = (
    "0x" + keccak(text="UserOperationEvent(bytes32,address,address,uint256,bool,uint256,uint256)").hex()
)
_AA_REASON: Final = re.compile(r"AA\d\d [a-zA-Z][\w ]*?(?=[^\w ]|$| 0x| with)")
_HEX_BLOB: Final = re.compile(r"0x[0-9a-fA-F]{8,}")
_EXECUTION_REVERTED: Final = -32521  # ERC-7769: the operation's execution reverted in simulation


class BundlerError(AccountError):
    """The bundler could not be reached, or answered something other than a validation verdict."""

    code = "bundler_error"
    status_hint = 502

    def __init__(self, message: str, *, code: str | None = None, rpc_code: int | None = None) -> None:
        super().__init__(message, code=code)
        self.rpc_code = rpc_code


class GasEstimate(msgspec.Struct, frozen=True, kw_only=True):
    """`eth_estimateUserOperationGas`: the gas fields a bundler expects (paymaster ones when sponsored)."""

    pre_verification_gas: int
    verification_gas_limit: int
    call_gas_limit: int
    paymaster_verification_gas_limit: int = 0
    paymaster_post_op_gas_limit: int = 0


@runtime_checkable
class UserOpSubmitter(Protocol):
    """What `AgentAccount` needs of a bundler: our own `Bundler`, or `BundlerRpc` for a standard one."""

    @property
    def chain_id(self) -> int: ...

    @property
    def entry_point(self) -> str: ...

    async def send(self, op: PackedUserOperation) -> UserOpResult: ...


# ---------------------------------------------------------------------------------------------- wire form


def _q(value: int) -> str:
    return hex(value)


def user_op_to_json(op: PackedUserOperation) -> dict[str, Any]:
    """The ERC-7769 JSON of a v0.7 operation: unpacked fields, quantities as 0x-hex."""
    out: dict[str, Any] = {
        "sender": to_checksum_address(op.sender),
        "nonce": _q(op.nonce),
        "callData": "0x" + op.call_data.hex(),
        "callGasLimit": _q(op.call_gas_limit),
        "verificationGasLimit": _q(op.verification_gas_limit),
        "preVerificationGas": _q(op.pre_verification_gas),
        "maxFeePerGas": _q(op.max_fee_per_gas),
        "maxPriorityFeePerGas": _q(op.max_priority_fee_per_gas),
        "signature": "0x" + op.signature.hex(),
    }
    if op.init_code:
        out["factory"] = to_checksum_address("0x" + op.init_code[:20].hex())
        out["factoryData"] = "0x" + op.init_code[20:].hex()
    if op.paymaster_and_data:
        pnd = op.paymaster_and_data
        out["paymaster"] = to_checksum_address("0x" + pnd[:20].hex())
        out["paymasterVerificationGasLimit"] = _q(int.from_bytes(pnd[20:36], "big"))
        out["paymasterPostOpGasLimit"] = _q(int.from_bytes(pnd[36:52], "big"))
        out["paymasterData"] = "0x" + pnd[52:].hex()
    return out


def _int(value: Any, name: str) -> int:
    if isinstance(value, int):
        return value
    if isinstance(value, str):
        try:
            return int(value, 16) if value.startswith("0x") else int(value)
        except ValueError:
            pass
    raise ValueError(f"{name}: not a quantity: {value!r}")


def _bytes(value: Any, name: str) -> bytes:
    if value in (None, "", "0x"):
        return b""
    if not isinstance(value, str) or not value.startswith("0x"):
        raise ValueError(f"{name}: not 0x-hex: {value!r}")
    try:
        return bytes.fromhex(value[2:])
    except ValueError:
        raise ValueError(f"{name}: not 0x-hex: {value!r}") from None


def user_op_from_json(data: Any) -> PackedUserOperation:
    """Parse ERC-7769 JSON into a `PackedUserOperation`; `ValueError` names the first bad field."""
    if not isinstance(data, dict):
        raise ValueError("a user operation is a JSON object")
    for name in ("sender", "nonce", "callData"):
        if name not in data:
            raise ValueError(f"{name}: missing")
    factory = data.get("factory")
    init_code = b""
    if factory not in (None, "", "0x"):
        init_code = _bytes(factory, "factory") + _bytes(data.get("factoryData"), "factoryData")
    pnd = b""
    paymaster = data.get("paymaster")
    if paymaster not in (None, "", "0x"):
        pnd = (
            _bytes(paymaster, "paymaster")
            + _int(data.get("paymasterVerificationGasLimit", 0), "paymasterVerificationGasLimit").to_bytes(
                16, "big"
            )
            + _int(data.get("paymasterPostOpGasLimit", 0), "paymasterPostOpGasLimit").to_bytes(16, "big")
            + _bytes(data.get("paymasterData"), "paymasterData")
        )
    sender = data["sender"]
    if not isinstance(sender, str) or len(_bytes(sender, "sender")) != 20:
        raise ValueError("sender: not an address")
    return PackedUserOperation(
        sender=to_checksum_address(sender),
        nonce=_int(data["nonce"], "nonce"),
        init_code=init_code,
        call_data=_bytes(data["callData"], "callData"),
        verification_gas_limit=_int(data.get("verificationGasLimit", 0), "verificationGasLimit"),
        call_gas_limit=_int(data.get("callGasLimit", 0), "callGasLimit"),
        pre_verification_gas=_int(data.get("preVerificationGas", 0), "preVerificationGas"),
        max_priority_fee_per_gas=_int(data.get("maxPriorityFeePerGas", 0), "maxPriorityFeePerGas"),
        max_fee_per_gas=_int(data.get("maxFeePerGas", 0), "maxFeePerGas"),
        paymaster_and_data=pnd,
        signature=_bytes(data.get("signature"), "signature"),
    )


# ---------------------------------------------------------------------------------------------- errors


def _find_revert_data(value: Any) -> bytes:
    """The longest 0x-hex blob anywhere in an error's `data` (bundlers nest it differently)."""
    blobs: list[str] = []

    def walk(item: Any) -> None:
        if isinstance(item, str):
            blobs.extend(_HEX_BLOB.findall(item))
        elif isinstance(item, dict):
            for v in item.values():
                walk(v)
        elif isinstance(item, list):
            for v in item:
                walk(v)

    walk(value)
    good = [b for b in blobs if len(b) % 2 == 0]
    return bytes.fromhex(max(good, key=len)[2:]) if good else b""


def _rejection(error: dict[str, Any], op: PackedUserOperation | None, digest: str) -> UserOpRejected | None:
    """A JSON-RPC error as `UserOpRejected` when it is a validation verdict (an `AAxx` reason, or the
    ERC-7769 validation codes -32500..-32507), else None."""
    message = str(error.get("message", ""))
    code = error.get("code")
    data = error.get("data")
    blob = _find_revert_data(data) or _find_revert_data(message)
    decoded = decode_handle_ops_error(blob) if blob else None
    if decoded is not None:
        _index, reason, inner = decoded
    else:
        match = _AA_REASON.search(message)
        if match is None and not (isinstance(code, int) and -32507 <= code <= -32500):
            return None
        reason = match.group(0).strip() if match else message
        inner = blob
    return UserOpRejected(reason, inner=inner, violation=_decode_violation(inner), user_op_hash=digest)


# ---------------------------------------------------------------------------------------------- client


class BundlerRpc:
    """A standard ERC-4337 bundler over JSON-RPC (Alto, or any ERC-7769 endpoint).

    `node` (the chain's JSON-RPC) is used for fee suggestions when the bundler offers none. `send` submits
    with `eth_sendUserOperation` and polls `eth_getUserOperationReceipt` until the operation landed.
    """

    def __init__(
        self,
        url: str,
        *,
        chain_id: int,
        node: Rpc | None = None,
        entry_point: str = ENTRYPOINT_V07,
        timeout: float = 30.0,
        poll_interval: float = 0.05,
        receipt_timeout: float = 60.0,
        client: httpx.AsyncClient | None = None,
    ) -> None:
        self.url, self.chain_id, self.node = url, chain_id, node
        self.entry_point = to_checksum_address(entry_point)
        self.poll_interval, self.receipt_timeout = poll_interval, receipt_timeout
        self._own_client = client is None
        self._client = client or httpx.AsyncClient(timeout=timeout)
        self._ids = itertools.count(1)
        self._vendor_fees: bool | None = None  # whether pimlico_getUserOperationGasPrice answers

    async def aclose(self) -> None:
        if self._own_client:
            await self._client.aclose()

    async def __aenter__(self) -> BundlerRpc:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def _call(self, method: str, params: list[Any]) -> Any:
        body = {"jsonrpc": "2.0", "id": next(self._ids), "method": method, "params": params}
        try:
            resp = await self._client.post(self.url, json=body)
        except httpx.HTTPError as exc:
            raise BundlerError(f"bundler unreachable: {exc!r}", code="bundler_unreachable") from None
        try:
            reply = resp.json()
        except ValueError:
            raise BundlerError(f"bundler answered HTTP {resp.status_code} with no JSON") from None
        if not isinstance(reply, dict):
            raise BundlerError("bundler answered a non-object")
        if reply.get("error") is not None:
            raise _RpcFailure(reply["error"] if isinstance(reply["error"], dict) else {"message": str(reply)})
        return reply.get("result")

    async def _op_call(self, method: str, op: PackedUserOperation, *extra: Any) -> Any:
        try:
            return await self._call(method, [user_op_to_json(op), self.entry_point, *extra])
        except _RpcFailure as failure:
            digest = "0x" + op.hash(chain_id=self.chain_id, entry_point=self.entry_point).hex()
            rejected = _rejection(failure.error, op, digest)
            if rejected is not None:
                raise rejected from None
            if failure.error.get("code") == _EXECUTION_REVERTED:
                # Validation passed but the calls revert: a bundler will not take such an operation (our
                # own Bundler lands it, reverted, given a call gas limit). Same code as a local estimate.
                raise AccountError(
                    f"the calls revert in the bundler's simulation: {failure.error.get('message')}",
                    code="userop_calls_revert",
                ) from None
            raise failure.as_error(method) from None

    # -- the standard methods ------------------------------------------------------------------------------

    async def supported_entry_points(self) -> list[str]:
        try:
            result = await self._call("eth_supportedEntryPoints", [])
        except _RpcFailure as failure:
            raise failure.as_error("eth_supportedEntryPoints") from None
        return [to_checksum_address(a) for a in result]

    async def chain_id_of_bundler(self) -> int:
        try:
            return int(await self._call("eth_chainId", []), 16)
        except _RpcFailure as failure:
            raise failure.as_error("eth_chainId") from None

    async def estimate(self, op: PackedUserOperation) -> GasEstimate:
        """`eth_estimateUserOperationGas`; the bundler simulates the operation (with a dummy signature)."""
        result = await self._op_call("eth_estimateUserOperationGas", op)
        try:
            return GasEstimate(
                pre_verification_gas=_int(result["preVerificationGas"], "preVerificationGas"),
                verification_gas_limit=_int(result["verificationGasLimit"], "verificationGasLimit"),
                call_gas_limit=_int(result["callGasLimit"], "callGasLimit"),
                paymaster_verification_gas_limit=_int(
                    result.get("paymasterVerificationGasLimit") or 0, "paymasterVerificationGasLimit"
                ),
                paymaster_post_op_gas_limit=_int(
                    result.get("paymasterPostOpGasLimit") or 0, "paymasterPostOpGasLimit"
                ),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise BundlerError(f"eth_estimateUserOperationGas: malformed answer: {exc}") from None

    async def send_user_operation(self, op: PackedUserOperation) -> str:
        """`eth_sendUserOperation`: the operation's hash once the bundler accepted it into its mempool."""
        result = await self._op_call("eth_sendUserOperation", op)
        if not isinstance(result, str):
            raise BundlerError(f"eth_sendUserOperation answered {result!r}")
        return result

    async def get_user_operation_receipt(self, user_op_hash: str) -> dict[str, Any] | None:
        try:
            result = await self._call("eth_getUserOperationReceipt", [user_op_hash])
        except _RpcFailure as failure:
            raise failure.as_error("eth_getUserOperationReceipt") from None
        return result if isinstance(result, dict) else None

    async def get_user_operation_by_hash(self, user_op_hash: str) -> dict[str, Any] | None:
        try:
            result = await self._call("eth_getUserOperationByHash", [user_op_hash])
        except _RpcFailure as failure:
            raise failure.as_error("eth_getUserOperationByHash") from None
        return result if isinstance(result, dict) else None

    async def suggest_fees(self) -> tuple[int, int]:
        """`(maxFeePerGas, maxPriorityFeePerGas)`: the bundler's own suggestion when it offers one (Alto's and
        Pimlico's `pimlico_getUserOperationGasPrice`, "fast"), else twice the node's base fee plus its tip."""
        if self._vendor_fees is not False:
            try:
                result = await self._call("pimlico_getUserOperationGasPrice", [])
                fast = result["fast"]
                self._vendor_fees = True
                return _int(fast["maxFeePerGas"], "maxFeePerGas"), _int(
                    fast["maxPriorityFeePerGas"], "maxPriorityFeePerGas"
                )
            except (_RpcFailure, KeyError, TypeError, ValueError):
                self._vendor_fees = False
        if self.node is None:
            raise BundlerError("the bundler suggests no fees and no node was given", code="bundler_no_fees")
        head = await self.node.request("eth_getBlockByNumber", ["latest", False])
        base = int(head.get("baseFeePerGas", "0x0"), 16)
        try:
            tip = int(await self.node.request("eth_maxPriorityFeePerGas", []), 16)
        except ChainError:  # a node without eth_maxPriorityFeePerGas
            tip = 10**9
        return 2 * base + tip, tip

    # -- the submitter interface ---------------------------------------------------------------------------

    async def send(self, op: PackedUserOperation) -> UserOpResult:
        """Submit and wait until the operation landed; `UserOpRejected` if the bundler's simulation refused
        it (with the failed session-key policy), `BundleFailed` if it never landed in time."""
        digest = await self.send_user_operation(op)
        deadline = time.monotonic() + self.receipt_timeout
        while True:
            receipt = await self.get_user_operation_receipt(digest)
            if receipt is not None:
                return _result(receipt, digest)
            if time.monotonic() > deadline:
                raise BundleFailed(f"user operation {digest} did not land in {self.receipt_timeout:.0f} s")
            await asyncio.sleep(self.poll_interval)


class _RpcFailure(Exception):
    def __init__(self, error: dict[str, Any]) -> None:
        super().__init__(str(error.get("message")))
        self.error = error

    def as_error(self, method: str) -> BundlerError:
        code = self.error.get("code")
        return BundlerError(
            f"{method}: {self.error.get('message')} (rpc code {code})",
            rpc_code=code if isinstance(code, int) else None,
        )


def _result(receipt: dict[str, Any], digest: str) -> UserOpResult:
    """A `UserOpResult` from an `eth_getUserOperationReceipt` answer (the bundle's receipt inside it)."""
    tx = receipt.get("receipt") or {}
    try:
        parsed = msgspec.convert(tx, Receipt)
        results = _parse_receipt(parsed, size=0)
    except (msgspec.ValidationError, ValueError, TypeError):
        results = {}
    size = sum(1 for log in tx.get("logs", []) if log.get("topics", [None])[0] == _USER_OPERATION_EVENT)
    found = results.get(digest.lower()) or results.get(digest)
    if found is not None:
        return msgspec.structs.replace(found, bundle_size=size)
    reason = receipt.get("reason") or "0x"
    return UserOpResult(
        user_op_hash=digest,
        sender=to_checksum_address(receipt["sender"]),
        nonce=_int(receipt["nonce"], "nonce"),
        success=bool(receipt["success"]),
        actual_gas_cost=_int(receipt["actualGasCost"], "actualGasCost"),
        actual_gas_used=_int(receipt["actualGasUsed"], "actualGasUsed"),
        revert_reason=_bytes(reason, "reason") if isinstance(reason, str) else b"",
        deployed=any(log.get("topics", [None])[0] == _ACCOUNT_DEPLOYED for log in tx.get("logs", [])),
        tx_hash=str(tx.get("transactionHash", "")),
        bundle_gas_used=_int(tx.get("gasUsed", "0x0"), "gasUsed"),
        bundle_size=size or 1,
    )
