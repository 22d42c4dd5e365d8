"""The JSON-RPC client never leaves a caller waiting: whatever a node answers, each call gets a result or
a typed `ChainError`."""

from __future__ import annotations

import asyncio
import socket
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, HTTPServer

import pytest

from escrow import ChainError, Rpc

pytestmark = pytest.mark.anyio

REPLIES = {
    "not json": b"<html>502 bad gateway</html>",
    "json of the wrong shape": b'{"jsonrpc": "2.0", "id": "x", "result": {"nested": [1, 2]}, "error": 7}',
    "a bare number": b"42",
    "an empty body": b"",
}


@pytest.fixture(params=sorted(REPLIES))
def bad_node(request: pytest.FixtureRequest) -> Iterator[str]:
    body = REPLIES[request.param]

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            self.rfile.read(int(self.headers.get("content-length", "0")))
            self.send_response(200)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    server = HTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


async def test_a_malformed_node_reply_is_a_chain_error_for_every_caller(bad_node: str) -> None:
    rpc = Rpc(bad_node)
    try:
        calls = [rpc.request("eth_chainId", []) for _ in range(5)]
        outcomes = await asyncio.wait_for(asyncio.gather(*calls, return_exceptions=True), 10)
    finally:
        await rpc.aclose()
    assert all(isinstance(outcome, ChainError) for outcome in outcomes), outcomes


async def test_an_unreachable_node_is_a_chain_error() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]  # closed again: nothing listens there
    rpc = Rpc(f"http://127.0.0.1:{port}")
    try:
        with pytest.raises(ChainError) as caught:
            await asyncio.wait_for(rpc.request("eth_chainId", []), 10)
    finally:
        await rpc.aclose()
    assert caught.value.code == "chain_unreachable"
