"""The relayer: a local key that signs EIP-1559 transactions, numbers them, and unsticks them.

Split from `escrow.chain._rpc` (which still exports `TxSender`); see the class doc for the replacement rules.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from typing import Any, Final

from x402 import LocalSigner
from x402._keccak import keccak256

from ._rpc import ChainError, Receipt, ReceiptTimeout, Rpc, TransactionFailed, _hex

__all__ = ["BUMP_PERCENT", "TxSender", "sign_eip1559"]

log = logging.getLogger("agentpay.relayer")

#: how much a replacement raises both fee fields: geth's and anvil's pools refuse less than +10 %
BUMP_PERCENT: Final = 12
_KEEP_SENT: Final = 4096  # transactions whose hashes a sender remembers (oldest forgotten first)


class _Pending:
    __slots__ = ("data", "future", "gas", "to", "value")

    def __init__(
        self, to: str | None, data: bytes, gas: int, value: int, future: asyncio.Future[str]
    ) -> None:
        self.to, self.data, self.gas, self.value, self.future = to, data, gas, value, future


class _Sent:
    """One nonce's transaction as signed, and every hash broadcast for it (the last one carries the fees)."""

    __slots__ = ("fields", "hashes")

    def __init__(self, fields: dict[str, Any], tx_hash: str) -> None:
        self.fields, self.hashes = fields, [tx_hash]


def _rlp_length(length: int, short: int) -> bytes:
    if length <= 55:
        return bytes((short + length,))
    size = length.to_bytes((length.bit_length() + 7) // 8, "big")
    return bytes((short + 55 + len(size),)) + size


def _rlp_int(value: int) -> bytes:
    """RLP (the yellow paper's appendix B) of an unsigned int: big-endian, no leading zeros."""
    if value < 0x80:
        return bytes((value,)) if value else b"\x80"
    raw = value.to_bytes((value.bit_length() + 7) // 8, "big")
    return bytes((0x80 + len(raw),)) + raw  # at most 32 bytes here: always the short form


def _rlp_bytes(item: bytes) -> bytes:
    if len(item) == 1 and item[0] < 0x80:
        return item
    return _rlp_length(len(item), 0x80) + item


def _rlp_list(payload: bytes) -> bytes:
    return _rlp_length(len(payload), 0xC0) + payload


def sign_eip1559(signer: LocalSigner, tx: dict[str, Any]) -> bytes:
    """The raw EIP-1559 (type 2) transaction `tx` signed by `signer`, with an empty access list.

    `tx` holds the fields `TxSender` builds (`chainId`, `nonce`, `maxPriorityFeePerGas`, `maxFeePerGas`,
    `gas`, `to` (absent: contract creation), `value`, `data`). Encoded directly (RLP, keccak,
    libsecp256k1): the generic account library validates and reformats every field on each call, which
    cost more CPU than the rest of a settlement. The fields are encoded once, for the signed digest and
    the raw transaction both.
    """
    to = tx.get("to")
    fields = b"".join(
        (
            _rlp_int(tx["chainId"]),
            _rlp_int(tx["nonce"]),
            _rlp_int(tx["maxPriorityFeePerGas"]),
            _rlp_int(tx["maxFeePerGas"]),
            _rlp_int(tx["gas"]),
            _rlp_bytes(bytes.fromhex(to[2:])) if to else b"\x80",
            _rlp_int(tx["value"]),
            _rlp_bytes(tx["data"]),
            b"\xc0",  # the empty access list
        )
    )
    signature = signer.sign_hash(keccak256(b"\x02" + _rlp_list(fields)))
    r, s, y_parity = signature[:32], signature[32:64], signature[64] - 27
    signed = (
        fields + _rlp_int(y_parity) + _rlp_int(int.from_bytes(r, "big")) + _rlp_int(int.from_bytes(s, "big"))
    )
    return b"\x02" + _rlp_list(signed)


def _address(to: str) -> str:
    """`to` as lower-case 0x hex after checking it is 20 bytes of hex; raises ValueError otherwise.

    The signed transaction carries the 20 bytes only, so no checksum is computed (that keccak cost more per
    settlement than the RLP and the hash of the transaction together)."""
    digits = to[2:] if to[:2] in ("0x", "0X") else to
    if len(digits) != 40 or not digits.isascii():
        raise ValueError(f"not a 20-byte address: {to!r}")
    bytes.fromhex(digits)  # raises ValueError on a non-hex digit
    return "0x" + digits.lower()


def _bump(fee: int) -> int:
    return fee + max(1, -(-fee * BUMP_PERCENT // 100))  # rounded up: the pool compares exactly


class TxSender:
    """A relayer key that signs EIP-1559 transactions locally, with a local nonce counter.

    Sends are group-committed: callers queue their transaction, and one flusher at a time takes everything
    queued, numbers it with consecutive nonces, signs it and broadcasts it as one JSON-RPC batch (in nonce
    order). Concurrent settlements therefore never share a nonce, and a node that mines on arrival (anvil's
    automine) packs many of them into each block. The nonce is read from the chain once and then counted
    locally; any send error drops the counter and the next batch reads it again from the node's pending count.

    Stuck transactions: `wait_for_receipt` (and `transact`) re-sign a transaction that is not mined within
    `replace_after` seconds at the same nonce with both fee fields raised by `BUMP_PERCENT` (EIP-1559 pool
    replacement needs +10 % on each), at least to what the node asks now, never above `fee_cap` wei per
    gas; then again after each further `replace_after`. Every hash is kept (`hashes`) and awaited: they share
    a nonce, so exactly one can land, and whichever does is the outcome. `replace_after=None` never replaces.
    """

    def __init__(
        self,
        rpc: Rpc,
        private_key: str | bytes,
        *,
        chain_id: int,
        priority_fee: int = 1_000_000_000,
        fee_ttl: float = 5.0,
        max_batch: int = 64,
        replace_after: float | None = 12.0,
        fee_cap: int = 500 * 10**9,
    ) -> None:
        self.rpc = rpc
        self._signer = LocalSigner(private_key)
        self.address: str = self._signer.address
        self.chain_id = chain_id
        self._priority_fee = priority_fee
        self._fee_ttl = fee_ttl
        self._max_batch = max_batch
        self.replace_after = replace_after
        self.fee_cap = fee_cap
        self.replaced = 0  # replacement transactions broadcast
        self._max_fee: int | None = None
        self._fee_at = 0.0
        self._nonce: int | None = None
        self._queue: list[_Pending] = []
        self._flusher: asyncio.Task[None] | None = None
        self._sent: OrderedDict[str, _Sent] = OrderedDict()  # every hash -> its nonce's record

    async def _fees(self) -> int:
        now = time.monotonic()
        if self._max_fee is None or now - self._fee_at > self._fee_ttl:
            # Twice the current price absorbs base-fee growth between refreshes; the excess is never charged.
            self._max_fee = min(2 * await self.rpc.gas_price() + self._priority_fee, self.fee_cap)
            self._fee_at = now
        return self._max_fee

    async def send(self, to: str | None, data: bytes, *, gas: int, value: int = 0) -> str:
        """Sign and broadcast one transaction (`to=None` creates a contract); returns its hash as soon as
        the node accepted it."""
        future: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        target = None if to is None else _address(to)
        self._queue.append(_Pending(target, data, gas, value, future))
        if self._flusher is None or self._flusher.done():
            self._flusher = asyncio.get_running_loop().create_task(self._flush())
        return await future

    async def _flush(self) -> None:
        while self._queue:
            batch, self._queue = self._queue[: self._max_batch], self._queue[self._max_batch :]
            try:
                await self._send_batch(batch)
            except ChainError as exc:
                self._nonce = None
                self._max_fee = None
                for item in batch:
                    if not item.future.done():
                        item.future.set_exception(exc)
            except BaseException as exc:  # never leave a caller waiting forever
                self._nonce = None
                for item in batch:
                    if not item.future.done():
                        item.future.set_exception(ChainError(f"relayer failed: {exc!r}"))
                if not isinstance(exc, Exception):
                    raise

    async def _send_batch(self, batch: list[_Pending]) -> None:
        max_fee = await self._fees()
        if self._nonce is None:
            self._nonce = await self.rpc.get_transaction_count(self.address, "pending")
        raws: list[tuple[dict[str, Any], bytes]] = []
        for offset, item in enumerate(batch):
            tx: dict[str, Any] = {
                "type": 2,
                "chainId": self.chain_id,
                "nonce": self._nonce + offset,
                "value": item.value,
                "data": item.data,
                "gas": item.gas,
                "maxFeePerGas": max_fee,
                "maxPriorityFeePerGas": min(self._priority_fee, max_fee),
            }
            if item.to is not None:
                tx["to"] = item.to
            raws.append((tx, sign_eip1559(self._signer, tx)))
        results = await self.rpc.batch([("eth_sendRawTransaction", [_hex(raw)]) for _, raw in raws])
        self._nonce += len(batch)
        failed = False
        for item, (tx, _), result in zip(batch, raws, results, strict=True):
            if isinstance(result, ChainError):
                failed = True
                item.future.set_exception(result)
            else:
                self._remember(str(result), _Sent(tx, str(result)))
                item.future.set_result(str(result))
        if failed:
            # A refused transaction leaves a gap (or the counter was stale): ask the node again next time.
            self._nonce = None
            self._max_fee = None

    def _remember(self, tx_hash: str, sent: _Sent) -> None:
        self._sent[tx_hash] = sent
        while len(self._sent) > _KEEP_SENT:
            self._sent.popitem(last=False)

    def hashes(self, tx_hash: str) -> tuple[str, ...]:
        """Every hash broadcast for `tx_hash`'s nonce, oldest first (just `tx_hash` if unknown)."""
        sent = self._sent.get(tx_hash)
        return tuple(sent.hashes) if sent is not None else (tx_hash,)

    async def wait_for_receipt(self, tx_hash: str, *, timeout: float = 30.0) -> Receipt:
        """The receipt of whichever of `tx_hash`'s versions is mined, replacing it while it is stuck.

        The receipt's `transaction_hash` is the version that landed (see `hashes` for all of them). On
        timeout, `ReceiptTimeout.tx_hashes` lists every version: any of them may still land.
        """
        sent = self._sent.get(tx_hash)
        if sent is None or self.replace_after is None:
            return await self.rpc.wait_for_receipt(tx_hash, timeout=timeout)
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            try:
                return await self._first_receipt(sent.hashes, min(left, self.replace_after))
            except ReceiptTimeout:
                if time.monotonic() >= deadline - 1e-3:
                    hashes = tuple(sent.hashes)
                    raise ReceiptTimeout(
                        f"no receipt for {', '.join(hashes)} after {timeout}s",
                        tx_hash=hashes[-1],
                        tx_hashes=hashes,
                    ) from None
            await self._replace(sent)

    async def _first_receipt(self, hashes: list[str], timeout: float) -> Receipt:
        if len(hashes) == 1:
            return await self.rpc.wait_for_receipt(hashes[0], timeout=timeout)
        waits = [asyncio.ensure_future(self.rpc.wait_for_receipt(h, timeout=timeout)) for h in hashes]
        try:
            pending = set(waits)
            while pending:
                done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                for task in done:
                    if not isinstance(task.exception(), ReceiptTimeout):
                        return task.result()  # a receipt, or a ChainError about one of them
            return waits[-1].result()  # all timed out: raises the ReceiptTimeout
        finally:
            for task in waits:
                task.cancel()

    async def _replace(self, sent: _Sent) -> None:
        """Broadcast `sent` again at its nonce with both fees bumped; a refusal only means keep waiting."""
        old = sent.fields
        try:
            fresh = min(2 * await self.rpc.gas_price() + self._priority_fee, self.fee_cap)
        except ChainError:
            fresh = 0
        max_fee = min(max(_bump(old["maxFeePerGas"]), fresh), self.fee_cap)
        priority = max(_bump(old["maxPriorityFeePerGas"]), self._priority_fee)
        if max_fee < _bump(old["maxFeePerGas"]) or priority > max_fee:  # the pool would refuse it
            log.warning(
                "transaction %s is stuck at the fee cap (%d wei/gas); not replacing",
                sent.hashes[-1],
                self.fee_cap,
            )
            return
        tx = {**old, "maxFeePerGas": max_fee, "maxPriorityFeePerGas": priority}
        raw = sign_eip1559(self._signer, tx)
        try:
            new_hash = await self.rpc.send_raw_transaction(raw)
        except ChainError as exc:  # mined meanwhile ("nonce too low"), or the pool wants more: wait on
            log.warning("replacing %s (nonce %d) refused: %s", sent.hashes[-1], tx["nonce"], exc)
            return
        log.warning(
            "transaction %s not mined in %ss: replaced by %s (nonce %d, maxFeePerGas %d, priority %d)",
            sent.hashes[-1],
            self.replace_after,
            new_hash,
            tx["nonce"],
            max_fee,
            priority,
        )
        sent.fields = tx
        sent.hashes.append(new_hash)
        self.replaced += 1
        self._remember(new_hash, sent)

    async def transact(
        self, to: str | None, data: bytes, *, gas: int, value: int = 0, timeout: float = 30.0
    ) -> Receipt:
        """Send and wait for the receipt (unsticking it); a reverted one raises `TransactionFailed`."""
        tx_hash = await self.send(to, data, gas=gas, value=value)
        receipt = await self.wait_for_receipt(tx_hash, timeout=timeout)
        if not receipt.ok:
            raise TransactionFailed(
                f"transaction {receipt.transaction_hash} reverted", tx_hash=receipt.transaction_hash
            )
        return receipt
