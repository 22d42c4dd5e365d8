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
from typing import Final

__all__ = ["HttpError", "JsonPoster"]

_MAX_IDLE: Final = 8
_MAX_HEAD: Final = 64 * 1024


class HttpError(Exception):
    """The exchange failed (connect, write, read, framing, timeout); the connection was closed."""


_Conn = tuple[asyncio.StreamReader, asyncio.StreamWriter]


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
        self._idle: list[_Conn] = []
        self._loop: asyncio.AbstractEventLoop | None = None

    def _take(self) -> _Conn | None:
        loop = asyncio.get_running_loop()
        if loop is not self._loop:  # connections belong to the loop that opened them
            stale, self._idle, self._loop = self._idle, [], loop
            for _, writer in stale:
                try:
                    writer.close()
                except RuntimeError:  # that loop is closed already
                    pass
        while self._idle:
            reader, writer = self._idle.pop()
            # The server closed it while it sat idle (its keep-alive timeout).
            if reader.at_eof() or writer.is_closing():
                writer.close()
                continue
            return reader, writer
        return None

    async def post(self, body: bytes) -> tuple[int, bytes]:
        """(status, body) of one POST; raises `HttpError`."""
        conn = self._take()
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
        if keep and len(self._idle) < _MAX_IDLE:
            self._idle.append(conn)
        else:
            conn[1].close()
        return status, content

    async def _exchange(self, conn: _Conn, body: bytes) -> tuple[int, bytes, bool]:
        reader, writer = conn
        writer.write(b"%s%d\r\n\r\n%s" % (self._head, len(body), body))
        await writer.drain()
        head = await reader.readuntil(b"\r\n\r\n")  # IncompleteReadError (an EOFError) if closed
        lines = head[:-4].split(b"\r\n")
        version, _, rest = lines[0].partition(b" ")
        status = int(rest[:3])
        if not version.startswith(b"HTTP/1."):
            raise ValueError(f"not an HTTP/1.x answer: {lines[0][:80]!r}")
        headers: dict[bytes, bytes] = {}
        for line in lines[1:]:
            name, sep, value = line.partition(b":")
            if not sep:
                raise ValueError(f"malformed header line {line[:80]!r}")
            key = name.strip().lower()
            headers[key] = headers[key] + b"," + value.strip() if key in headers else value.strip()
        keep = version == b"HTTP/1.1" and b"close" not in headers.get(b"connection", b"").lower()
        if b"chunked" in headers.get(b"transfer-encoding", b"").lower():
            parts: list[bytes] = []
            while True:
                line = await reader.readuntil(b"\r\n")
                size = int(line.split(b";", 1)[0].strip(), 16)  # chunk extensions ignored
                if size == 0:
                    while await reader.readuntil(b"\r\n") != b"\r\n":  # trailers
                        pass
                    return status, b"".join(parts), keep
                parts.append((await reader.readexactly(size + 2))[:-2])
        length = headers.get(b"content-length")
        if length is not None:
            return status, await reader.readexactly(int(length)), keep
        if status in (204, 304) or 100 <= status < 200:
            return status, b"", keep
        return status, await reader.read(), False  # framed by the end of the connection

    async def aclose(self) -> None:
        idle, self._idle = self._idle, []
        for _, writer in idle:
            writer.close()
