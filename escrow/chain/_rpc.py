"""A small async JSON-RPC client for the settlement hot path, and a relayer that signs locally.

web3.py runs every call through a middleware stack and its sync provider blocks the event loop; a paid request
needs only a handful of calls (`eth_getCode`, `eth_call`, `eth_sendRawTransaction`, receipts), so this module
speaks JSON-RPC directly over one pooled `httpx.AsyncClient` and encodes with msgspec.

Receipts are polled by one background task per `Rpc` that asks for every outstanding hash in a single batch
request per tick, so 16 concurrent settlements cost one round trip per tick instead of sixteen.
"""

from __future__ import annotations

import asyncio
import itertools
import urllib.parse
import urllib.request
from typing import Any

import httpx
import msgspec

from ._artifacts import EscrowError
from ._http import HttpError, JsonPoster

__all__ = [
    "BUMP_PERCENT",
    "ChainError",
    "Log",
    "Receipt",
    "ReceiptTimeout",
    "RevertError",
    "Rpc",
    "TransactionFailed",
    "TxSender",
]


class ChainError(EscrowError):
    """The node refused a request or could not be reached. `status_hint` is what a gateway should answer."""

    code = "chain_error"
    status_hint = 502

    def __init__(self, message: str, *, code: str | None = None, rpc_code: int | None = None) -> None:
        super().__init__(message, code=code)
        self.rpc_code = rpc_code


class RevertError(ChainError):
    """An `eth_call` (or gas estimate) reverted; `data` is the raw revert payload (may be empty)."""

    code = "execution_reverted"
    status_hint = 402

    def __init__(self, message: str, *, data: bytes) -> None:
        super().__init__(message, rpc_code=3)
        self.data = data


class TransactionFailed(ChainError):
    """A transaction was mined with status 0."""

    code = "transaction_failed"
    status_hint = 402

    def __init__(self, message: str, *, tx_hash: str) -> None:
        super().__init__(message)
        self.tx_hash = tx_hash


class ReceiptTimeout(ChainError):
    """No receipt arrived in time; the transaction may still land (the caller must not assume failure).

    `tx_hashes` is every hash sent for that nonce (the original and its fee-bumped replacements): whichever
    lands is the outcome, and at most one can."""

    code = "settlement_pending"
    status_hint = 402

    def __init__(self, message: str, *, tx_hash: str, tx_hashes: tuple[str, ...] = ()) -> None:
        super().__init__(message)
        self.tx_hash = tx_hash
        self.tx_hashes = tx_hashes or (tx_hash,)


class Log(msgspec.Struct, frozen=True):
    address: str
    topics: list[str]
    data: str


class Receipt(msgspec.Struct, frozen=True, rename="camel"):
    transaction_hash: str
    status: str
    block_number: str
    gas_used: str
    logs: list[Log]
    contract_address: str | None = None

    @property
    def ok(self) -> bool:
        return int(self.status, 16) == 1


class _RpcError(msgspec.Struct):
    code: int
    message: str
    data: Any = None


class _Response(msgspec.Struct):
    id: int | None = None
    result: Any = None
    error: _RpcError | None = None


_encode = msgspec.json.encode
_decode_one = msgspec.json.Decoder(_Response).decode
_decode_batch = msgspec.json.Decoder(list[_Response]).decode
_decode_receipt = msgspec.convert


def _hex(data: bytes) -> str:
    return "0x" + data.hex()


def _unhex(value: str) -> bytes:
    return bytes.fromhex(value[2:] if value.startswith("0x") else value)


_JSON_HEADERS = {"content-type": "application/json"}
#: What httpx's client would have added (some hosted nodes refuse a request without a User-Agent).
_JSON_HEADER_LIST = [
    (b"content-type", b"application/json"),
    (b"accept", b"application/json"),
    (b"accept-encoding", b"gzip, deflate"),
    (b"user-agent", b"agentpay"),
]


def _env_proxy(url: str) -> str | None:
    """The proxy the environment names for `url` (`<scheme>_proxy`, `all_proxy`, minus `no_proxy`), as
    `httpx.AsyncClient(trust_env=True)` would use it."""
    parts = urllib.parse.urlsplit(url)
    proxies = urllib.request.getproxies()
    proxy = proxies.get(parts.scheme) or proxies.get("all")
    if not proxy or urllib.request.proxy_bypass(parts.hostname or ""):
        return None
    return proxy


def _error(err: _RpcError) -> ChainError:
    data = err.data
    if isinstance(data, dict):  # some nodes nest the revert payload
        data = data.get("data")
    if err.code == 3 or "revert" in err.message.lower():
        raw = _unhex(data) if isinstance(data, str) and data.startswith("0x") else b""
        return RevertError(err.message, data=raw)
    return ChainError(f"{err.message} (rpc code {err.code})", rpc_code=err.code)


class Rpc:
    """JSON-RPC over HTTP with compact msgspec JSON and call coalescing.

    Every call joins an outbox; at most `max_inflight` HTTP requests are on the wire at once, each carrying
    everything queued since the previous one left, as one JSON-RPC batch. Under load, the verification calls,
    broadcasts and receipt polls of all concurrent payments therefore share a few round trips, which is what
    keeps the per-payment CPU cost low (each HTTP exchange costs far more Python time than a JSON entry).
    """

    def __init__(
        self,
        url: str,
        *,
        client: httpx.AsyncClient | None = None,
        timeout: float = 10.0,
        poll_interval: float = 0.003,
        max_inflight: int = 2,
    ) -> None:
        self.url = url
        self._client = client
        # Without a client passed in: a plain-http node with no proxy is spoken to over our own keep-alive
        # connections (`_http.JsonPoster`: httpx's stack cost more CPU per exchange than the rest of a
        # settlement); any other URL goes through httpx's transport directly, to a URL parsed once (its
        # client layer, request building, URL merging, auth and redirect flows, hooks and the cookie jar,
        # cost as much again). A client passed in keeps its whole behaviour (its hooks, auth, headers).
        proxy = _env_proxy(url)
        parts = urllib.parse.urlsplit(url)
        plain = client is None and proxy is None and parts.scheme == "http" and bool(parts.hostname)
        try:
            self._poster = JsonPoster(url, timeout=timeout) if plain else None
        except ValueError:  # a malformed URL (a bad port) fails on first use, as through httpx
            plain, self._poster = False, None
        self._url: httpx.URL | None = None  # parsed on first use: a malformed URL fails there, as before
        self._timeout = {"connect": timeout, "read": timeout, "write": timeout, "pool": timeout}
        limits = httpx.Limits(max_connections=8, max_keepalive_connections=8)
        self._transport = (
            httpx.AsyncHTTPTransport(limits=limits, proxy=proxy) if client is None and not plain else None
        )
        self._ids = itertools.count(1)
        self.poll_interval = poll_interval
        self._max_inflight = max_inflight
        self._inflight = 0
        self._outbox: list[tuple[list[tuple[str, list[Any]]], asyncio.Future[list[Any]]]] = []
        self._flushers: set[asyncio.Task[None]] = set()
        self._waiters: dict[str, list[asyncio.Future[Receipt]]] = {}
        self._poller: asyncio.Task[None] | None = None
        self._chain_id: int | None = None

    async def _post(self, body: bytes) -> bytes:
        try:
            if self._poster is not None:
                status, content = await self._poster.post(body)
            elif self._client is not None:
                resp = await self._client.post(self.url, content=body, headers=_JSON_HEADERS)
                status, content = resp.status_code, resp.content
            elif self._transport is not None:
                if self._url is None:
                    self._url = httpx.URL(self.url)
                request = httpx.Request(
                    "POST",
                    self._url,
                    headers=_JSON_HEADER_LIST,
                    content=body,
                    extensions={"timeout": self._timeout},
                )
                resp = await self._transport.handle_async_request(request)
                try:
                    status, content = resp.status_code, await resp.aread()
                finally:
                    await resp.aclose()
            else:
                raise ChainError("rpc client closed", code="chain_unreachable")
        except (httpx.HTTPError, HttpError) as exc:
            raise ChainError(f"rpc transport error: {exc!r}", code="chain_unreachable") from exc
        if status != 200:
            raise ChainError(f"rpc http status {status}", code="chain_unreachable")
        return content

    async def request(self, method: str, params: list[Any]) -> Any:
        (result,) = await self.batch([(method, params)])
        if isinstance(result, ChainError):
            raise result
        return result

    async def batch(self, calls: list[tuple[str, list[Any]]]) -> list[Any]:
        """Run several calls in one round trip; each slot holds the result or the `ChainError` it raised."""
        future: asyncio.Future[list[Any]] = asyncio.get_running_loop().create_future()
        self._outbox.append((calls, future))
        if self._inflight < self._max_inflight:
            self._inflight += 1
            task = asyncio.get_running_loop().create_task(self._flush())
            self._flushers.add(task)
            task.add_done_callback(self._flushers.discard)
        return await future

    async def _flush(self) -> None:
        try:
            while self._outbox:
                jobs, self._outbox = self._outbox, []
                calls = [call for job_calls, _ in jobs for call in job_calls]
                try:
                    results = await self._send(calls)
                except Exception as exc:  # any failure reaches every caller: none may wait forever
                    error = exc if isinstance(exc, ChainError) else ChainError(f"bad rpc reply: {exc!r}")
                    for _, future in jobs:
                        if not future.done():
                            future.set_exception(error)
                    continue
                start = 0
                for job_calls, future in jobs:
                    if not future.done():
                        future.set_result(results[start : start + len(job_calls)])
                    start += len(job_calls)
        finally:
            self._inflight -= 1

    async def _send(self, calls: list[tuple[str, list[Any]]]) -> list[Any]:
        first = next(self._ids)
        for _ in range(len(calls) - 1):
            next(self._ids)
        body = _encode(
            [{"jsonrpc": "2.0", "id": first + i, "method": m, "params": p} for i, (m, p) in enumerate(calls)]
        )
        raw = await self._post(body)
        try:
            replies = _decode_batch(raw)
        except msgspec.DecodeError:
            # A node answers a batch it cannot parse at all with one error object.
            reply = _decode_one(raw)
            raise _error(reply.error) if reply.error else ChainError("malformed batch reply") from None
        out: list[Any] = [ChainError("no reply for this call")] * len(calls)
        for reply in replies:
            slot = -1 if reply.id is None else reply.id - first
            if 0 <= slot < len(calls):
                out[slot] = _error(reply.error) if reply.error is not None else reply.result
        return out

    # -- reads ---------------------------------------------------------------------------------------------

    async def chain_id(self) -> int:
        if self._chain_id is None:
            self._chain_id = int(await self.request("eth_chainId", []), 16)
        return self._chain_id

    async def call(self, to: str, data: bytes, *, sender: str | None = None, block: str = "latest") -> bytes:
        tx: dict[str, str] = {"to": to, "data": _hex(data)}
        if sender is not None:
            tx["from"] = sender
        return _unhex(await self.request("eth_call", [tx, block]))

    async def get_code(self, address: str, block: str = "latest") -> bytes:
        return _unhex(await self.request("eth_getCode", [address, block]))

    async def get_balance(self, address: str, block: str = "latest") -> int:
        return int(await self.request("eth_getBalance", [address, block]), 16)

    async def get_transaction_count(self, address: str, block: str = "pending") -> int:
        return int(await self.request("eth_getTransactionCount", [address, block]), 16)

    async def gas_price(self) -> int:
        return int(await self.request("eth_gasPrice", []), 16)

    async def block_timestamp(self, block: str = "latest") -> int:
        head = await self.request("eth_getBlockByNumber", [block, False])
        return int(head["timestamp"], 16)

    # -- writes --------------------------------------------------------------------------------------------

    async def send_raw_transaction(self, raw: bytes) -> str:
        return str(await self.request("eth_sendRawTransaction", [_hex(raw)]))

    async def get_receipt(self, tx_hash: str) -> Receipt | None:
        raw = await self.request("eth_getTransactionReceipt", [tx_hash])
        return None if raw is None else _decode_receipt(raw, Receipt)

    async def wait_for_receipt(self, tx_hash: str, *, timeout: float = 30.0) -> Receipt:
        """Wait for `tx_hash` to be mined. Many waiters share one batched poll per `poll_interval`."""
        fut: asyncio.Future[Receipt] = asyncio.get_running_loop().create_future()
        self._waiters.setdefault(tx_hash, []).append(fut)
        if self._poller is None or self._poller.done():
            self._poller = asyncio.get_running_loop().create_task(self._poll())
        try:
            return await asyncio.wait_for(fut, timeout)
        except TimeoutError:
            raise ReceiptTimeout(f"no receipt for {tx_hash} after {timeout}s", tx_hash=tx_hash) from None
        finally:
            waiting = self._waiters.get(tx_hash)
            if waiting is not None and fut in waiting:
                waiting.remove(fut)
                if not waiting:
                    del self._waiters[tx_hash]

    async def _poll(self) -> None:
        while self._waiters:
            hashes = list(self._waiters)
            try:
                results = await self.batch([("eth_getTransactionReceipt", [h]) for h in hashes])
            except ChainError:
                results = [None] * len(hashes)  # transient; the waiters' own timeouts bound the damage
            for tx_hash, raw in zip(hashes, results, strict=True):
                if raw is None or isinstance(raw, ChainError):
                    continue
                try:
                    outcome: Receipt | ChainError = _decode_receipt(raw, Receipt)
                except (msgspec.ValidationError, TypeError) as exc:
                    outcome = ChainError(f"malformed receipt for {tx_hash}: {exc}")
                for fut in self._waiters.pop(tx_hash, []):
                    if fut.done():
                        continue
                    if isinstance(outcome, ChainError):
                        fut.set_exception(outcome)
                    else:
                        fut.set_result(outcome)
            if self._waiters:
                await asyncio.sleep(self.poll_interval)

    async def aclose(self) -> None:
        for task in [self._poller, *self._flushers]:
            if task is not None and not task.done():
                task.cancel()
        if self._transport is not None:
            await self._transport.aclose()
        if self._poster is not None:
            await self._poster.aclose()


# The relayer lives in its own module (it grew stuck-transaction replacement); it is still named from here.
from ._sender import BUMP_PERCENT, TxSender  # noqa: E402
