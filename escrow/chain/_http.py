"""JSON-RPC POSTs over plain HTTP/1.1 keep-alive connections, on asyncio streams.

`Rpc` sends every call of a settlement through one of these when its node's URL is `http://` with no proxy
in the environment (a node beside the gateway, a devnet): per exchange, httpx's transport stack (httpcore's
pool, anyio's stream wrappers, h11's state machine) cost more CPU than everything else a settlement does
(JSON, RLP, signing, the store). `https://` URLs and proxied ones keep going through httpx.

What it speaks: one request at a time per connection, `Content-Length` request bodies, responses framed by
`Content-Length`, `Transfer-Encoding: chunked` or the end of the connection; a connection is kept for reuse
only when the answer allowed it (HTTP/1.1 without `Connection: close`) and is dropped when the server has
closed it meanwhile. Any failure closes that connection and raises `HttpError`; nothing is retried here (a
resent `eth_sendRawTransaction` would be answered "already known").
"""

from __future__ import annotations

import asyncio
import base64
import urllib.parse
from collections.abc import AsyncIterator
from typing import Final, NamedTuple

__all__ = ["HttpError", "JsonPoster"]

_MAX_IDLE: Final = 8
_MAX_HEAD: Final = 64 * 1024


class HttpError(Exception):
    """The exchange failed (connect, write, read, framing, timeout); the connection was closed."""


Conn = tuple[asyncio.StreamReader, asyncio.StreamWriter]


class IdleConnections:
    """Kept-alive connections to one origin, waiting for their next exchange (at most `limit`). They belong
    to the event loop that opened them: taken from another loop, the ones kept are closed instead."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._idle: list[Conn] = []
        self._loop: asyncio.AbstractEventLoop | None = None

    def take(self) -> Conn | None:
        """The most recently used connection the server has not closed meanwhile, or None."""
        loop = asyncio.get_running_loop()
        if loop is not self._loop:
            self.close()
            self._loop = loop
        while self._idle:
            reader, writer = self._idle.pop()
            if reader.at_eof() or writer.is_closing():  # the server closed it while it sat idle
                writer.close()
                continue
            return reader, writer
        return None

    def give(self, conn: Conn) -> None:
        """Keep `conn` for the next exchange, or close it (enough are kept, or it is another loop's)."""
        if len(self._idle) < self.limit and self._loop is _running_loop():
            self._idle.append(conn)
        else:
            conn[1].close()

    def close(self) -> None:
        idle, self._idle = self._idle, []
        for _, writer in idle:
            try:
                writer.close()
            except RuntimeError:  # its loop is closed already
                pass


def _running_loop() -> asyncio.AbstractEventLoop | None:
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None


class JsonPoster:
    """POSTs JSON bodies to one `http://` URL over a few kept-alive connections."""

    def __init__(self, url: str, *, timeout: float) -> None:
        parts = urllib.parse.urlsplit(url)
        if parts.scheme != "http" or not parts.hostname:
            raise ValueError(f"JsonPoster speaks plain http only, not {url!r}")
        self.host = parts.hostname
        self.port = parts.port or 80
        self.timeout = timeout
        target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        host = f"[{self.host}]" if ":" in self.host else self.host
        authority = host if parts.port is None else f"{host}:{self.port}"
        auth = ""
        if parts.username is not None or parts.password is not None:  # as httpx sends URL credentials
            user = urllib.parse.unquote(parts.username or "")
            secret = urllib.parse.unquote(parts.password or "")
            auth = "Authorization: Basic " + base64.b64encode(f"{user}:{secret}".encode()).decode() + "\r\n"
        self._head = (
            f"POST {target} HTTP/1.1\r\nHost: {authority}\r\nContent-Type: application/json\r\n"
            f"Accept: application/json\r\nUser-Agent: agentpay\r\n{auth}Content-Length: "
        ).encode("latin-1")
        self._idle = IdleConnections(_MAX_IDLE)

    async def post(self, body: bytes) -> tuple[int, bytes]:
        """(status, body) of one POST; raises `HttpError`."""
        conn = self._idle.take()
        try:
            async with asyncio.timeout(self.timeout):
                if conn is None:
                    conn = await asyncio.open_connection(self.host, self.port, limit=_MAX_HEAD)
                status, content, keep = await self._exchange(conn, body)
        except BaseException as exc:
            if conn is not None:
                conn[1].close()
            if isinstance(exc, OSError | EOFError | ValueError | TimeoutError | asyncio.LimitOverrunError):
                raise HttpError(f"{type(exc).__name__}: {exc}") from exc
            raise
        if keep:
            self._idle.give(conn)
        else:
            conn[1].close()
        return status, content

    async def _exchange(self, conn: Conn, body: bytes) -> tuple[int, bytes, bool]:
        reader, writer = conn
        writer.write(b"%s%d\r\n\r\n%s" % (self._head, len(body), body))
        await writer.drain()
        head = await read_head(reader)
        framing = body_framing(head, head_request=False)
        if framing is None:
            return head.status, b"", head.keep_alive
        if framing == CHUNKED:
            return head.status, b"".join([part async for part in read_chunks(reader)]), head.keep_alive
        if framing == UNTIL_EOF:
            return head.status, await reader.read(), False
        return head.status, await reader.readexactly(framing), head.keep_alive

    async def aclose(self) -> None:
        self._idle.close()


# ---------------------------------------------------------------- HTTP/1.1 framing, shared with the transport

CHUNKED: Final = -1
UNTIL_EOF: Final = -2


class ResponseHead(NamedTuple):
    """A parsed status line and header block."""

    status: int
    reason: bytes
    headers: list[tuple[bytes, bytes]]  # as sent, in order
    fields: dict[bytes, bytes]  # lower-cased names, repeated fields joined with ","
    keep_alive: bool


async def read_head(reader: asyncio.StreamReader) -> ResponseHead:
    """The next response head on `reader`; `ValueError` if it is not HTTP/1.x, `EOFError` if closed first."""
    raw = await reader.readuntil(b"\r\n\r\n")  # IncompleteReadError (an EOFError) if closed
    lines = raw[:-4].split(b"\r\n")
    version, _, rest = lines[0].partition(b" ")
    if not version.startswith(b"HTTP/1.") or not rest[:3].isdigit():
        raise ValueError(f"not an HTTP/1.x answer: {lines[0][:80]!r}")
    headers: list[tuple[bytes, bytes]] = []
    fields: dict[bytes, bytes] = {}
    for line in lines[1:]:
        name, sep, value = line.partition(b":")
        if not sep or not name or name != name.strip(b" \t"):
            raise ValueError(f"malformed header line {line[:80]!r}")
        value = value.strip(b" \t")  # optional whitespace is SP and HTAB only (RFC 9110 §5.6.3)
        headers.append((name, value))
        key = name.lower()
        fields[key] = fields[key] + b"," + value if key in fields else value
    keep = version == b"HTTP/1.1" and b"close" not in fields.get(b"connection", b"").lower()
    return ResponseHead(int(rest[:3]), rest[4:], headers, fields, keep)


def body_framing(head: ResponseHead, *, head_request: bool) -> int | None:
    """How the body after `head` is framed (RFC 9112 §6.3): None (no body), `CHUNKED`, `UNTIL_EOF`, or its
    length. `ValueError` for a length that is not one non-negative number."""
    if head_request or head.status in (204, 304) or 100 <= head.status < 200:
        return None
    if b"chunked" in head.fields.get(b"transfer-encoding", b"").lower():
        return CHUNKED
    length = head.fields.get(b"content-length")
    if length is None:
        return UNTIL_EOF
    values = {v.strip(b" \t") for v in length.split(b",")}  # a repeated but equal length is allowed
    if len(values) != 1 or not (value := values.pop()).isdigit():
        raise ValueError(f"bad Content-Length {length[:40]!r}")
    return int(value)


async def read_chunks(reader: asyncio.StreamReader) -> AsyncIterator[bytes]:
    """The data of a chunked body, chunk by chunk; the trailers are read and dropped."""
    while True:
        line = await reader.readuntil(b"\r\n")
        size = int(line.split(b";", 1)[0].strip(), 16)  # chunk extensions ignored
        if size == 0:
            while await reader.readuntil(b"\r\n") != b"\r\n":  # trailers
                pass
            return
        chunk = await reader.readexactly(size + 2)
        if chunk[-2:] != b"\r\n":
            raise ValueError("chunk not followed by CRLF")
        yield chunk[:-2]
