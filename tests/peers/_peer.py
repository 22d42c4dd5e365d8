"""Shared bits of the peer scripts. Runs under .venv-peers only; never imports agentpay.

Every peer script prints one JSON object as its last stdout line (``emit``). Servers are served by
uvicorn either on ``--port`` or on an already-listening socket handed over as ``--fd``: the test binds
the socket first, so the port is known before the server starts and no other process can take it.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import socket
import sys
from typing import Any

ERC20_ABI: list[dict[str, Any]] = [
    {
        "name": "balanceOf",
        "type": "function",
        "stateMutability": "view",
        "inputs": [{"name": "a", "type": "address"}],
        "outputs": [{"name": "", "type": "uint256"}],
    },
    {
        "name": "eip712Domain",
        "type": "function",
        "stateMutability": "view",
        "inputs": [],
        "outputs": [
            {"name": "fields", "type": "bytes1"},
            {"name": "name", "type": "string"},
            {"name": "version", "type": "string"},
            {"name": "chainId", "type": "uint256"},
            {"name": "verifyingContract", "type": "address"},
            {"name": "salt", "type": "bytes32"},
            {"name": "extensions", "type": "uint256[]"},
        ],
    },
    {
        "name": "transferWithAuthorization",
        "type": "function",
        "stateMutability": "nonpayable",
        "inputs": [
            {"name": "from", "type": "address"},
            {"name": "to", "type": "address"},
            {"name": "value", "type": "uint256"},
            {"name": "validAfter", "type": "uint256"},
            {"name": "validBefore", "type": "uint256"},
            {"name": "nonce", "type": "bytes32"},
            {"name": "v", "type": "uint8"},
            {"name": "r", "type": "bytes32"},
            {"name": "s", "type": "bytes32"},
        ],
        "outputs": [],
    },
]


def emit(result: dict[str, Any]) -> None:
    """Print the result as the last stdout line (the tests parse only that line)."""
    sys.stdout.write("\n" + json.dumps(result, sort_keys=True, default=str) + "\n")
    sys.stdout.flush()


def b64json(value: str | None) -> Any:
    """Decode base64 (standard or url-safe, padded or not) JSON; None stays None."""
    if not value:
        return None
    raw = value.strip()
    raw += "=" * (-len(raw) % 4)
    decoded = base64.urlsafe_b64decode(raw.replace("+", "-").replace("/", "_"))
    return json.loads(decoded)


def body_of(content: bytes) -> Any:
    try:
        return json.loads(content)
    except ValueError:
        return content[:500].decode("utf-8", "replace")


def private_key(arg: str | None, env: str = "PEER_PRIVATE_KEY") -> str:
    key = arg or os.environ.get(env)
    if not key:
        raise SystemExit(f"a private key is required (--private-key or ${env})")
    return key


def token_domain(rpc_url: str, token: str) -> tuple[str, str]:
    """The token's EIP-712 (name, version), read from its ERC-5267 eip712Domain()."""
    from web3 import Web3

    w3 = Web3(Web3.HTTPProvider(rpc_url))
    contract = w3.eth.contract(address=Web3.to_checksum_address(token), abi=ERC20_ABI)
    domain = contract.functions.eip712Domain().call()
    return str(domain[1]), str(domain[2])


def add_server_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--fd", type=int, default=None, help="an inherited, bound and listening socket")


def serve(app: Any, args: argparse.Namespace) -> None:
    import uvicorn

    if args.fd is not None:
        # A socket object of the inherited fd's own family: uvicorn's `fd=` assumes a UNIX socket, which on
        # TCP leaves Nagle on (each keep-alive response then waits ~40 ms for the client's delayed ACK).
        config = uvicorn.Config(app, log_level="warning", lifespan="off")
        uvicorn.Server(config).run(sockets=[socket.socket(fileno=args.fd)])
    else:
        config = uvicorn.Config(app, host=args.host, port=args.port, log_level="warning", lifespan="off")
        uvicorn.Server(config).run()


def listening_socket(host: str = "127.0.0.1") -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, 0))
    sock.listen(128)
    return sock
