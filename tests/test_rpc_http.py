"""`Rpc` on a plain-http node speaks HTTP/1.1 itself (`escrow.chain._http`): every framing a node may answer
with reaches the caller intact, connections are reused only when the answer allows it, and a node that
closes, stalls or cuts an answer is a `ChainError` for that call only, never a wrong result."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

import pytest

from escrow import ChainError, Rpc

pytestmark = pytest.mark.anyio

Answer = Callable[[bytes], bytes | None]  # the request's JSON body -> raw HTTP answer (None: say nothing)


def batch_reply(body: bytes, result: str) -> bytes:
    return json.dumps(
        [{"jsonrpc": "2.0", "id": c["id"], "result": result} for c in json.loads(body)]
    ).encode()


class Node:
    """A real TCP server answering each POST with raw bytes; counts connections, keeps request heads."""

    def __init__(self, answer: Answer, *, close_after: bool = False) -> None:
        self.answer, self.close_after = answer, close_after
        self.connections = 0
        self.heads: list[bytes] = []

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                self.heads.append(head)
                length = next(
                    int(line.split(b":")[1])
                    for line in head.split(b"\r\n")
                    if line.lower().startswith(b"content-length")
                )
                raw = self.answer(await reader.readexactly(length))
                if raw is None:
                    await asyncio.sleep(30)
                    return
                writer.write(raw)
                await writer.drain()
                if self.close_after:
                    return
        except (asyncio.IncompleteReadError, ConnectionError):
            return
        finally:
            writer.close()


@asynccontextmanager
async def node(answer: Answer, **kwargs: bool) -> AsyncIterator[tuple[Node, str]]:
    server_node = Node(answer, **kwargs)
    server = await asyncio.start_server(server_node.handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        yield server_node, f"http://127.0.0.1:{port}"
    finally:
        server.close()


def length_framed(body: bytes) -> bytes:
    reply = batch_reply(body, "0x2a")
    return b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s" % (
        len(reply),
        reply,
    )


def chunked(body: bytes) -> bytes:
    reply = batch_reply(body, "0x2a")
    first, second = reply[:7], reply[7:]
    return (
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
        + b"%x;ext=1\r\n%s\r\n%x\r\n%s\r\n0\r\nX-Trailer: t\r\n\r\n"
        % (len(first), first, len(second), second)
    )


async def test_length_and_chunked_answers_are_read_whole_over_one_kept_connection() -> None:
    for answer in (length_framed, chunked):
        async with node(answer) as (server, url):
            rpc = Rpc(url, timeout=5)
            try:
                for _ in range(3):
                    assert await rpc.gas_price() == 42
            finally:
                await rpc.aclose()
            assert server.connections == 1, answer.__name__


async def test_connection_close_and_eof_framing_open_a_new_connection_each_time() -> None:
    def close_header(body: bytes) -> bytes:
        reply = batch_reply(body, "0x2a")
        return b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: %d\r\n\r\n%s" % (len(reply), reply)

    def http10(body: bytes) -> bytes:
        return length_framed(body).replace(b"HTTP/1.1", b"HTTP/1.0", 1)

    def eof_framed(body: bytes) -> bytes:
        return b"HTTP/1.1 200 OK\r\n\r\n" + batch_reply(body, "0x2a")

    # The first two leave their socket open: the answer alone says not to reuse it.
    cases = ((close_header, False), (http10, False), (eof_framed, True), (length_framed, True))
    for answer, close_after in cases:
        async with node(answer, close_after=close_after) as (server, url):
            rpc = Rpc(url, timeout=5)
            try:
                for _ in range(3):
                    assert await rpc.gas_price() == 42
                    await asyncio.sleep(0.01)  # the server's close reaches the idle connection
            finally:
                await rpc.aclose()
            assert server.connections == 3, answer.__name__


async def test_request_line_carries_path_query_and_url_credentials() -> None:
    async with node(length_framed) as (server, url):
        rpc = Rpc(url.replace("http://", "http://user:p%40ss@") + "/rpc/key?x=1", timeout=5)
        try:
            assert await rpc.gas_price() == 42
        finally:
            await rpc.aclose()
    head = server.heads[0]
    assert head.startswith(b"POST /rpc/key?x=1 HTTP/1.1\r\n")
    assert b"Authorization: Basic dXNlcjpwQHNz\r\n" in head  # user:p@ss


async def test_cut_stalled_and_refused_answers_are_chain_errors_and_the_next_call_recovers() -> None:
    calls = 0

    def flaky(body: bytes) -> bytes | None:
        nonlocal calls
        calls += 1
        if calls == 1:  # promises 500 bytes, sends a few, closes
            return b'HTTP/1.1 200 OK\r\nContent-Length: 500\r\n\r\n[{"jsonrpc"'
        if calls == 2:
            return None  # says nothing
        if calls == 3:
            return b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\n\r\n"
        return length_framed(body)

    async with node(flaky, close_after=True) as (_, url):
        rpc = Rpc(url, timeout=0.5)
        try:
            for _ in range(3):
                with pytest.raises(ChainError) as caught:
                    await rpc.gas_price()
                assert caught.value.code == "chain_unreachable"
            assert await rpc.gas_price() == 42
        finally:
            await rpc.aclose()
    rpc = Rpc(url, timeout=2)  # that server is gone: connection refused
    try:
        with pytest.raises(ChainError) as caught:
            await rpc.gas_price()
        assert caught.value.code == "chain_unreachable"
    finally:
        await rpc.aclose()


async def test_a_proxy_named_by_the_environment_is_used_as_httpx_would(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    async with node(length_framed) as (proxy, proxy_url):
        for name in ("no_proxy", "NO_PROXY", "all_proxy", "ALL_PROXY"):
            monkeypatch.delenv(name, raising=False)
        monkeypatch.setenv("http_proxy", proxy_url)
        rpc = Rpc("http://node.example:8545/rpc", timeout=5)  # resolvable only by the proxy
        try:
            for _ in range(2):
                assert await rpc.gas_price() == 42
        finally:
            await rpc.aclose()
    assert proxy.heads[0].startswith(b"POST http://node.example:8545/rpc HTTP/1.1\r\n")
    assert b"user-agent: agentpay" in proxy.heads[0].lower()
