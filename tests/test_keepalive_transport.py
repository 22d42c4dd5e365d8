"""`escrow.KeepAliveTransport`: the lean httpx transport a payer uses for many small calls (issue 15).

Real servers on loopback: the in-test paywall of ``tests.test_client_unit`` and Starlette apps under uvicorn
for what users do (pay, stream, upload), and a raw asyncio server that answers byte for byte for what HTTP
edge cases look like on the wire (a server closing an idle connection, broken framing, TLS, timeouts).
"""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import ssl
import subprocess
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from escrow import KeepAliveTransport
from tests._serving import serving
from tests.test_client_unit import Paywall, wallet
from x402.client import PaymentAuth, SpendPolicy, receipt_of

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@contextlib.asynccontextmanager
async def raw_server(handler: Handler, ssl_context: ssl.SSLContext | None = None) -> AsyncIterator[Any]:
    """A TCP server running `handler` per connection; yields (base URL, list of connection numbers seen)."""
    connections: list[int] = []

    async def on_connect(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        connections.append(len(connections))
        try:
            await handler(reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(on_connect, "127.0.0.1", 0, ssl=ssl_context)
    port = server.sockets[0].getsockname()[1]
    scheme = "https" if ssl_context else "http"
    try:
        yield f"{scheme}://127.0.0.1:{port}", connections
    finally:
        server.close()


async def read_request(reader: asyncio.StreamReader) -> tuple[bytes, dict[bytes, bytes], bytes]:
    """(request line, headers, body) of one request with a Content-Length (or no) body."""
    head = await reader.readuntil(b"\r\n\r\n")
    line, *lines = head[:-4].split(b"\r\n")
    headers = {k.strip().lower(): v.strip(b" \t") for k, _, v in (x.partition(b":") for x in lines)}
    body = await reader.readexactly(int(headers.get(b"content-length", b"0")))
    return line, headers, body


def ok(body: bytes, *extra: bytes) -> bytes:
    return b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n%s\r\n%s" % (len(body), b"".join(extra), body)


# ------------------------------------------------------------------------------------------ as users use it


@pytest.mark.anyio
async def test_paid_calls_reuse_one_connection_and_carry_receipts() -> None:
    paywall = Paywall()
    peers: list[Any] = []
    app = paywall.app()

    async def recording(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            peers.append(scope["client"])
        await app(scope, receive, send)

    policy = SpendPolicy()
    async with serving(lambda _: recording) as base:
        transport = KeepAliveTransport()
        async with httpx.AsyncClient(transport=transport, auth=PaymentAuth(wallet(), policy)) as http:
            responses = [await http.get(f"{base}/paid") for _ in range(5)]
            post = await http.post(f"{base}/paid", json={"task": "summarise"})
    assert [r.status_code for r in responses] == [200] * 5 and post.status_code == 200
    assert all(receipt_of(r) is not None for r in responses)
    assert paywall.paid == ["x402v2"] * 6 and policy.spent == 6 * paywall.price
    assert paywall.bodies[-1] == b'{"task":"summarise"}'
    assert len(set(peers)) == 1  # the 402, five paid GETs and the POST: one kept-alive connection


@pytest.mark.anyio
async def test_streamed_answers_arrive_piece_by_piece_and_uploads_stream_out() -> None:
    gate = asyncio.Event()

    async def events(request: Request) -> Response:
        async def body() -> AsyncIterator[bytes]:
            yield b"data: first\n\n"
            await gate.wait()  # the client must have the first event before the second exists
            yield b"data: second\n\n"

        return StreamingResponse(body(), media_type="text/event-stream")

    async def echo(request: Request) -> Response:
        data = await request.body()
        return Response(gzip.compress(data), headers={"content-encoding": "gzip"})

    async def size(request: Request) -> Response:
        return JSONResponse({"size": len(await request.body())})

    app = Starlette(
        routes=[
            Route("/events", events),
            Route("/echo", echo, methods=["POST"]),
            Route("/size", size, methods=["GET", "POST"]),
        ]
    )
    big = bytes(range(256)) * 4096  # 1 MiB

    async def upload() -> AsyncIterator[bytes]:
        for i in range(0, len(big), 100_000):
            yield big[i : i + 100_000]

    async with serving(lambda _: app) as base, httpx.AsyncClient(transport=KeepAliveTransport()) as http:
        async with http.stream("GET", f"{base}/events") as response:
            lines = response.aiter_lines()
            assert await anext(lines) == "data: first"
            gate.set()
            assert [line async for line in lines if line] == ["data: second"]
        echoed = await http.post(f"{base}/echo", content=big)
        assert echoed.content == big  # chunked, gzip-encoded: httpx decodes what the transport read
        assert (await http.post(f"{base}/size", content=upload())).json() == {"size": len(big)}
        head = await http.head(f"{base}/size")
        assert head.status_code == 200 and int(head.headers["content-length"]) > 0 and head.content == b""


@pytest.mark.anyio
async def test_an_idle_connection_the_server_closed_is_retried_for_idempotent_requests_only() -> None:
    requests: list[bytes] = []

    async def answer_once(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        # Answer one request, then take the next one and close without a word (its keep-alive timed out).
        line, _, _ = await read_request(reader)
        requests.append(line)
        writer.write(ok(b"hello"))
        await writer.drain()
        line, _, _ = await read_request(reader)
        requests.append(line)

    async with raw_server(answer_once) as (base, connections):
        async with httpx.AsyncClient(transport=KeepAliveTransport()) as http:
            assert (await http.get(f"{base}/a")).text == "hello"
            assert (await http.get(f"{base}/b")).text == "hello"  # lost on the stale one, resent on a new one
            assert requests == [b"GET /a HTTP/1.1", b"GET /b HTTP/1.1", b"GET /b HTTP/1.1"]
            assert len(connections) == 2
            with pytest.raises(httpx.RemoteProtocolError):  # a POST is not resent: it may have been acted on
                await http.post(f"{base}/c", content=b"x")
            assert requests[-1] == b"POST /c HTTP/1.1" and requests.count(b"POST /c HTTP/1.1") == 1


@pytest.mark.anyio
async def test_connection_close_head_and_no_content_frame_correctly() -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            line, _, _ = await read_request(reader)
            if line.startswith(b"HEAD"):  # a length, and no body follows
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n")
            elif line.startswith(b"DELETE"):
                writer.write(b"HTTP/1.1 204 No Content\r\n\r\n")
            elif line.startswith(b"GET /early"):  # an interim 103, then the answer
                writer.write(b"HTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\n" + ok(b"after hints"))
            elif line.startswith(b"GET /eof"):  # framed by the end of the connection
                writer.write(b"HTTP/1.1 200 OK\r\n\r\nuntil the end")
                await writer.drain()
                return
            else:
                writer.write(ok(b"bye", b"Connection: close\r\n"))
                await writer.drain()
                return
            await writer.drain()

    async with raw_server(handler) as (base, connections):
        async with httpx.AsyncClient(transport=KeepAliveTransport()) as http:
            head = await http.head(base)
            assert head.status_code == 200 and head.headers["content-length"] == "5" and head.content == b""
            assert (await http.delete(base)).status_code == 204
            early = await http.get(f"{base}/early")
            assert early.status_code == 200 and early.text == "after hints"
            assert len(connections) == 1  # all four on one connection
            assert (await http.get(f"{base}/close")).text == "bye"
            assert (await http.get(f"{base}/eof")).text == "until the end"
            assert (await http.get(f"{base}/close")).text == "bye"
            assert len(connections) == 3  # `Connection: close` and end-of-connection framing are not reused


@pytest.mark.anyio
async def test_failures_are_httpx_errors_and_the_pool_recovers() -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        line, _, _ = await read_request(reader)
        if line.startswith(b"GET /silent"):
            await asyncio.sleep(5)
        elif line.startswith(b"GET /garbage"):
            writer.write(b"SMTP ready\r\n\r\n")
        elif line.startswith(b"GET /short"):
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nonly this")
        elif line.startswith(b"GET /two-lengths"):
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\nabcd")
        else:
            writer.write(ok(b"fine"))
        await writer.drain()

    unused = socket_port()
    async with raw_server(handler) as (base, _):
        async with httpx.AsyncClient(transport=KeepAliveTransport(), timeout=0.3) as http:
            with pytest.raises(httpx.ConnectError):
                await http.get(f"http://127.0.0.1:{unused}/")
            with pytest.raises(httpx.ReadTimeout):
                await http.get(f"{base}/silent")
            with pytest.raises(httpx.RemoteProtocolError):
                await http.get(f"{base}/garbage")
            with pytest.raises(httpx.RemoteProtocolError):
                await http.get(f"{base}/short")
            with pytest.raises(httpx.RemoteProtocolError):
                await http.get(f"{base}/two-lengths")
            assert (await http.get(f"{base}/")).text == "fine"


@pytest.mark.anyio
async def test_max_connections_bounds_an_origin_and_waits_up_to_the_pool_timeout() -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            await read_request(reader)
            writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n")
            await writer.drain()

    transport = KeepAliveTransport(max_connections=1)
    async with raw_server(handler) as (base, connections):
        async with httpx.AsyncClient(transport=transport, timeout=httpx.Timeout(5, pool=0.2)) as http:
            async with http.stream("GET", base) as held:  # holds the one connection until read and closed
                with pytest.raises(httpx.PoolTimeout):
                    await http.get(base)
                assert await held.aread() == b"abc"
            assert (await http.get(base)).text == "abc"
            assert len(connections) == 1


@pytest.mark.anyio
async def test_a_cancelled_call_closes_its_connection_and_gives_its_slot_back() -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            line, _, _ = await read_request(reader)
            if line.startswith(b"GET /slow"):
                await asyncio.sleep(5)
                return
            writer.write(ok(b"quick"))
            await writer.drain()

    transport = KeepAliveTransport(max_connections=1)
    async with raw_server(handler) as (base, connections):
        async with httpx.AsyncClient(transport=transport, timeout=httpx.Timeout(5, pool=0.5)) as http:
            with pytest.raises(TimeoutError):
                async with asyncio.timeout(0.2):  # the caller gives up; the transport's own timeouts did not
                    await http.get(f"{base}/slow")
            assert (await http.get(f"{base}/quick")).text == "quick"  # no PoolTimeout: the slot came back
            assert len(connections) == 2  # and the abandoned connection was not reused mid-answer


@pytest.mark.anyio
async def test_https_with_the_servers_certificate_trusted(tmp_path: Path) -> None:
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=127.0.0.1"]
        + ["-addext", "subjectAltName=IP:127.0.0.1", "-keyout", str(key), "-out", str(cert)],
        check=True,
        capture_output=True,
    )
    server_tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_tls.load_cert_chain(cert, key)

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            await read_request(reader)
            writer.write(ok(b"secret"))
            await writer.drain()

    async with raw_server(handler, server_tls) as (base, connections):
        trusting = ssl.create_default_context(cafile=str(cert))
        async with httpx.AsyncClient(transport=KeepAliveTransport(verify=trusting)) as http:
            assert [(await http.get(base)).text for _ in range(3)] == ["secret"] * 3
            assert len(connections) == 1
        async with httpx.AsyncClient(transport=KeepAliveTransport()) as http:  # system trust: refused
            with pytest.raises(httpx.ConnectError):
                await http.get(base)


def socket_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# ------------------------------------------------------------------------- no request splitting, by property

_header_values = st.binary(max_size=24).filter(lambda v: v == v.strip(b" \t"))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(value=_header_values, path=st.text(st.characters(blacklist_categories=("Cc", "Cs")), max_size=12))
def test_header_values_arrive_exactly_or_are_refused_before_anything_is_sent(value: bytes, path: str) -> None:
    async def scenario() -> None:
        seen: list[tuple[bytes, dict[bytes, bytes]]] = []

        async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            line, headers, _ = await read_request(reader)
            seen.append((line, headers))
            writer.write(ok(b"ok"))
            await writer.drain()

        async with raw_server(handler) as (base, connections):
            async with httpx.AsyncClient(transport=KeepAliveTransport()) as http:
                request = http.build_request("GET", f"{base}/{path}", headers={"X-Note": value})
                if any(c in value for c in b"\r\n\0"):
                    with pytest.raises(httpx.LocalProtocolError):
                        await http.send(request)
                    assert connections == []  # refused before connecting, nothing on the wire
                    return
                assert (await http.send(request)).text == "ok"
        (line, headers), *more = seen
        assert not more and headers[b"x-note"] == value
        assert line == b"GET " + request.url.raw_path + b" HTTP/1.1"

    asyncio.run(scenario())
