"""`KeepAliveTransport`: an `httpx.AsyncBaseTransport` for payers that make many small calls.

An orchestrator paying sub-agents sends many small requests over a few kept-alive connections. Per call,
httpx's default stack (httpcore's pool scanning every connection for every request, anyio's stream
wrappers, h11's state machine) costs several times the CPU of everything the payer itself does (offer
matching, EIP-712 signing, encoding). This transport speaks HTTP/1.1 over asyncio streams instead, with the
framing code the chain client's RPC poster uses (`_http.py`): `http://` and `https://` (TLS from
`httpx.create_ssl_context()`, so it trusts what httpx trusts), any other scheme through `fallback`.

What it speaks: one request at a time per connection, request bodies as given (`Content-Length`, or chunked
when httpx framed them so), responses framed by `Content-Length`, `Transfer-Encoding: chunked` or the end of
the connection, streamed to the caller (a small `Content-Length` body is read at once, freeing its
connection sooner). A connection goes back to its origin's pool only when its answer allowed it and was read
to the end. No HTTP/2, no proxies (an `httpx.AsyncClient` given a transport ignores proxy environment
variables; mount httpx's transport for a proxied network), no `Expect: 100-continue`.

A kept-alive connection the server closed while it sat idle is the one failure retried, once, on a new
connection: an idempotent request (RFC 9110 §9.2.2) with a body in memory whose first attempt got no byte of
answer. Anything else fails with httpx's own exception types, as httpx's transport would.
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import AsyncIterator
from typing import Final

import httpx

from ._http import (
    CHUNKED,
    UNTIL_EOF,
    Conn,
    IdleConnections,
    ResponseHead,
    body_framing,
    read_chunks,
    read_head,
)

__all__ = ["KeepAliveTransport"]

_MAX_HEAD: Final = 64 * 1024
_EAGER_BODY: Final = 64 * 1024  # a Content-Length body up to this is read with its head
_READ_SIZE: Final = 64 * 1024
_IDEMPOTENT: Final = frozenset({"GET", "HEAD", "OPTIONS", "TRACE", "PUT", "DELETE"})

_OriginKey = tuple[str, str, int]


class _Origin:
    """One origin's idle connections and the slots bounding how many it has open at once."""

    __slots__ = ("idle", "slots")

    def __init__(self, limit: int, idle: int) -> None:
        self.idle = IdleConnections(idle)
        self.slots = asyncio.Semaphore(limit)


class _NoAnswer(Exception):
    """The connection ended before any byte of an answer (a server closing an idle keep-alive does that)."""

    def __init__(self, *, writing: bool) -> None:
        super().__init__("writing" if writing else "reading")
        self.writing = writing


class KeepAliveTransport(httpx.AsyncBaseTransport):
    """HTTP/1.1 over pooled keep-alive connections for `httpx.AsyncClient`: lean per call, same answers.

        async with httpx.AsyncClient(auth=PaymentAuth(wallet), transport=KeepAliveTransport()) as http:
            ...

    `max_connections` bounds the open connections per origin (a request waits for a free one up to the
    client's `pool` timeout, then raises `httpx.PoolTimeout`); `max_idle` the kept-alive ones per origin.
    `verify` as for httpx (an `ssl.SSLContext` for client certificates). Requests whose scheme is neither
    `http` nor `https` go to `fallback` (default: httpx's own transport).
    """

    def __init__(
        self,
        *,
        max_connections: int = 100,
        max_idle: int = 32,
        verify: ssl.SSLContext | bool = True,
        fallback: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        if max_connections < 1 or max_idle < 0:
            raise ValueError("max_connections must be >= 1 and max_idle >= 0")
        self.max_connections = max_connections
        self.max_idle = max_idle
        self._verify = verify
        self._ssl: ssl.SSLContext | None = None
        self._fallback = fallback
        self._origins: dict[_OriginKey, _Origin] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._closed = False

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        url = request.url
        if url.scheme not in ("http", "https"):
            if self._fallback is None:
                self._fallback = httpx.AsyncHTTPTransport(verify=self._verify)
            return await self._fallback.handle_async_request(request)
        if self._closed:
            raise RuntimeError("KeepAliveTransport is closed")
        timeouts: dict[str, float | None] = request.extensions.get("timeout", {})
        head = _request_head(request)
        body = _body_in_memory(request)
        key = (url.scheme, url.host, url.port or (443 if url.scheme == "https" else 80))
        origin = self._origin(key)
        try:
            async with asyncio.timeout(timeouts.get("pool")):
                await origin.slots.acquire()
        except TimeoutError as exc:
            raise httpx.PoolTimeout("no free connection to this origin in time", request=request) from exc
        conn: Conn | None = None
        try:
            conn, reused = origin.idle.take(), True
            if conn is None:
                conn, reused = await self._connect(key, request, timeouts.get("connect")), False
            try:
                response_head = await self._exchange(conn, request, head, body, timeouts)
            except _NoAnswer as exc:
                conn[1].close()
                if not (reused and body is not None and request.method in _IDEMPOTENT):
                    raise _disconnected(exc, request) from exc.__cause__
                conn = await self._connect(key, request, timeouts.get("connect"))
                try:
                    response_head = await self._exchange(conn, request, head, body, timeouts)
                except _NoAnswer as again:
                    raise _disconnected(again, request) from again.__cause__
            return await self._response(origin, conn, request, response_head, timeouts.get("read"))
        except BaseException:
            # Failed or cancelled before the answer was handed over: the connection is in an unknown state.
            if conn is not None:
                conn[1].close()
            origin.slots.release()
            raise

    async def aclose(self) -> None:
        self._closed = True
        origins, self._origins = self._origins, {}
        for origin in origins.values():
            origin.idle.close()
        if self._fallback is not None:
            await self._fallback.aclose()

    # connections

    def _origin(self, key: _OriginKey) -> _Origin:
        loop = asyncio.get_running_loop()
        if loop is not self._loop:  # connections and semaphores belong to the loop that made them
            stale, self._origins, self._loop = self._origins, {}, loop
            for old in stale.values():
                old.idle.close()
        origin = self._origins.get(key)
        if origin is None:
            origin = self._origins[key] = _Origin(self.max_connections, self.max_idle)
        return origin

    async def _connect(self, key: _OriginKey, request: httpx.Request, timeout: float | None) -> Conn:
        scheme, host, port = key
        context = None
        if scheme == "https":
            if self._ssl is None:
                verify = self._verify
                self._ssl = verify if isinstance(verify, ssl.SSLContext) else httpx.create_ssl_context(verify)
            context = self._ssl
        try:
            async with asyncio.timeout(timeout):
                return await asyncio.open_connection(
                    host, port, ssl=context, server_hostname=host if context else None, limit=_MAX_HEAD
                )
        except TimeoutError as exc:
            raise httpx.ConnectTimeout(f"connect to {host}:{port} timed out", request=request) from exc
        except OSError as exc:  # refused, unreachable, DNS (socket.gaierror), TLS (ssl.SSLError)
            raise httpx.ConnectError(f"{type(exc).__name__}: {exc}", request=request) from exc

    def _release(self, origin: _Origin, conn: Conn, *, reusable: bool) -> None:
        if reusable and not self._closed:  # a closed transport keeps nothing
            origin.idle.give(conn)
        else:
            conn[1].close()
        origin.slots.release()

    # one exchange

    async def _exchange(
        self,
        conn: Conn,
        request: httpx.Request,
        head: bytes,
        body: bytes | None,
        timeouts: dict[str, float | None],
    ) -> ResponseHead:
        """Send the request, read the answer's head. On any failure the caller closes the connection."""
        reader, writer = conn
        try:
            async with asyncio.timeout(timeouts.get("write")):
                if body is None:
                    writer.write(head)
                    await _write_stream(writer, request)
                elif len(body) <= _EAGER_BODY:  # one segment for a small request
                    writer.write(head + body)
                else:
                    writer.write(head)
                    writer.write(body)
                await writer.drain()
        except TimeoutError as exc:
            raise httpx.WriteTimeout("writing the request timed out", request=request) from exc
        except OSError as exc:
            raise _NoAnswer(writing=True) from exc  # reset while writing: closed by the server, maybe idle
        try:
            async with asyncio.timeout(timeouts.get("read")):
                response = await read_head(reader)
                while 100 <= response.status < 200 and response.status != 101:  # interim answers
                    response = await read_head(reader)
        except asyncio.IncompleteReadError as exc:
            if exc.partial:
                raise httpx.RemoteProtocolError("the answer's head was cut off", request=request) from exc
            raise _NoAnswer(writing=False) from exc
        except ConnectionResetError as exc:
            raise _NoAnswer(writing=False) from exc
        except TimeoutError as exc:
            raise httpx.ReadTimeout("waiting for the answer timed out", request=request) from exc
        except (ValueError, asyncio.LimitOverrunError) as exc:
            raise httpx.RemoteProtocolError(f"malformed answer: {exc}", request=request) from exc
        except OSError as exc:
            raise httpx.ReadError(f"{type(exc).__name__}: {exc}", request=request) from exc
        return response

    async def _response(
        self,
        origin: _Origin,
        conn: Conn,
        request: httpx.Request,
        head: ResponseHead,
        read_timeout: float | None,
    ) -> httpx.Response:
        try:
            framing = body_framing(head, head_request=request.method == "HEAD")
        except ValueError as exc:
            raise httpx.RemoteProtocolError(str(exc), request=request) from exc
        extensions = {"http_version": b"HTTP/1.1", "reason_phrase": head.reason}
        keep = head.keep_alive and head.status != 101
        if framing is None or 0 <= framing <= _EAGER_BODY:
            content = b""
            if framing:
                try:
                    async with asyncio.timeout(read_timeout):
                        content = await conn[0].readexactly(framing)
                except (OSError, EOFError, TimeoutError) as exc:
                    raise _read_error(exc, request) from exc
            response = httpx.Response(
                head.status, headers=head.headers, stream=httpx.ByteStream(content), extensions=extensions
            )
            self._release(origin, conn, reusable=keep)
            return response
        stream = _Body(self, origin, conn, request, framing, keep=keep, read_timeout=read_timeout)
        return httpx.Response(head.status, headers=head.headers, stream=stream, extensions=extensions)


class _Body(httpx.AsyncByteStream):
    """A response body read off its connection as the caller iterates; the connection is released on close."""

    def __init__(
        self,
        transport: KeepAliveTransport,
        origin: _Origin,
        conn: Conn,
        request: httpx.Request,
        framing: int,
        *,
        keep: bool,
        read_timeout: float | None,
    ) -> None:
        self._transport, self._origin, self._conn = transport, origin, conn
        self._request, self._framing, self._keep, self._timeout = request, framing, keep, read_timeout
        self._done = False
        self._released = False

    async def __aiter__(self) -> AsyncIterator[bytes]:
        reader = self._conn[0]
        try:
            if self._framing == CHUNKED:
                chunks = read_chunks(reader)
                while True:
                    async with asyncio.timeout(self._timeout):
                        chunk = await anext(chunks, None)
                    if chunk is None:
                        break
                    yield chunk
            elif self._framing == UNTIL_EOF:
                self._keep = False
                while True:
                    async with asyncio.timeout(self._timeout):
                        data = await reader.read(_READ_SIZE)
                    if not data:
                        break
                    yield data
            else:
                remaining = self._framing
                while remaining:
                    async with asyncio.timeout(self._timeout):
                        data = await reader.read(min(remaining, _READ_SIZE))
                    if not data:
                        raise asyncio.IncompleteReadError(b"", remaining)
                    remaining -= len(data)
                    yield data
        except (OSError, EOFError, ValueError, TimeoutError, asyncio.LimitOverrunError) as exc:
            self._keep = False
            raise _read_error(exc, self._request) from exc
        self._done = True

    async def aclose(self) -> None:
        if not self._released:
            self._released = True
            self._transport._release(self._origin, self._conn, reusable=self._done and self._keep)


def _disconnected(exc: _NoAnswer, request: httpx.Request) -> httpx.TransportError:
    if exc.writing:
        return httpx.WriteError(
            "the server closed the connection while the request was sent", request=request
        )
    return httpx.RemoteProtocolError("Server disconnected without sending a response.", request=request)


def _read_error(exc: BaseException, request: httpx.Request) -> BaseException:
    if isinstance(exc, TimeoutError):
        return httpx.ReadTimeout("reading the answer timed out", request=request)
    if isinstance(exc, EOFError | ValueError | asyncio.LimitOverrunError):
        return httpx.RemoteProtocolError(f"the answer's body broke off: {exc}", request=request)
    if isinstance(exc, OSError):
        return httpx.ReadError(f"{type(exc).__name__}: {exc}", request=request)
    return exc


def _request_head(request: httpx.Request) -> bytes:
    """The request line and headers. No CR, LF or NUL may come from the caller (no request splitting)."""
    target, raw = request.url.raw_path, request.headers.raw
    names = b"".join(name for name, _ in raw)
    text = target + names + b"".join(value for _, value in raw)
    if b"\r" in text or b"\n" in text or b"\0" in text or b":" in names or b" " in target:
        raise httpx.LocalProtocolError("CR, LF or NUL in the request line or a header", request=request)
    parts = [request.method.encode("ascii"), b" ", target, b" HTTP/1.1\r\n"]
    for name, value in raw:
        parts += (name, b": ", value, b"\r\n")
    parts.append(b"\r\n")
    return b"".join(parts)


def _body_in_memory(request: httpx.Request) -> bytes | None:
    """The body when it is already in memory (bytes, form, JSON, a read stream); None for a live stream."""
    try:
        return request.content
    except httpx.RequestNotRead:
        return None


async def _write_stream(writer: asyncio.StreamWriter, request: httpx.Request) -> None:
    chunked = b"chunked" in request.headers.get("transfer-encoding", "").encode().lower()
    stream = request.stream
    if not isinstance(stream, httpx.AsyncByteStream):
        raise RuntimeError("KeepAliveTransport sends async request bodies only")
    async for data in stream:
        if not data:
            continue
        writer.write(b"%x\r\n%s\r\n" % (len(data), data) if chunked else data)
        await writer.drain()
    if chunked:
        writer.write(b"0\r\n\r\n")
