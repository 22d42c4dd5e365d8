"""Peer: the official x402 MCP client (`x402.mcp`, `mcp` 1.x) pays a paid tool (runs under .venv-mcp-peers).

    python tests/peers/x402_mcp_client.py --url http://127.0.0.1:PORT/mcp --tool summarize \
        --args '{"text": "..."}' --network eip155:31337 --asset TOKEN
        (key from --private-key or $PEER_PRIVATE_KEY)

`create_x402_mcp_client_from_config` with the official `ExactEvmClientScheme` registered for the network
and spend controls allowing only `--asset` up to `--max-amount` per payment,
over an `mcp` 1.x `ClientSession` on streamable HTTP (the legacy initialize handshake). x402's client calls
`call_tool(params, **options)` with the JSON-RPC params; mcp 1.x's session takes them as name, arguments and
meta, which the small adapter below passes through unchanged (the result's `_meta` under the attribute name
x402's converter reads, see `SessionAdapter`).

Output (last line, JSON): `{"payment_made", "is_error", "text", "payment_response"}`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
from datetime import timedelta
from types import SimpleNamespace
from typing import Any

from _peer import emit, private_key
from eth_account import Account
from mcp import ClientSession
from mcp.client.streamable_http import streamablehttp_client
from x402.mcp import create_x402_mcp_client_from_config
from x402.mechanisms.evm.exact import ExactEvmClientScheme


class SessionAdapter:
    """What x402's MCP client calls, on an mcp 1.x `ClientSession`."""

    def __init__(self, session: ClientSession) -> None:
        self.session = session

    async def call_tool(self, params: dict[str, Any], **options: Any) -> Any:
        timeout = options.get("read_timeout_seconds")  # x402 hands over a timedelta already
        if isinstance(timeout, int | float):
            timeout = timedelta(seconds=timeout)
        result = await self.session.call_tool(
            params["name"], params.get("arguments"), read_timeout_seconds=timeout, meta=params.get("_meta")
        )
        # x402's `convert_mcp_result` reads `result._meta`, which an mcp 1.x (pydantic) result exposes as
        # `meta`: the view below hands it over under the name x402 reads, everything else as received.
        return SimpleNamespace(
            content=result.content,
            isError=result.isError,
            structuredContent=result.structuredContent,
            _meta=result.meta or {},
        )


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--url", required=True)
    parser.add_argument("--tool", required=True)
    parser.add_argument("--args", default="{}")
    parser.add_argument("--network", required=True)
    parser.add_argument("--asset", required=True, help="the token the spend controls allow")
    parser.add_argument("--max-amount", default="10000", help="largest single payment (atomic units)")
    parser.add_argument("--private-key")
    args = parser.parse_args()
    account = Account.from_key(private_key(args.private_key))
    async with streamablehttp_client(args.url) as (read, write, _), ClientSession(read, write) as session:
        await session.initialize()
        client = create_x402_mcp_client_from_config(
            SessionAdapter(session),
            {
                "schemes": [{"network": args.network, "client": ExactEvmClientScheme(account)}],
                "auto_payment": True,
                "spend_controls": {
                    "allowed_assets": [
                        {
                            "network": args.network,
                            "asset": args.asset,
                            "max_amount_per_payment": args.max_amount,
                        }
                    ]
                },
            },
        )
        result = await client.call_tool(args.tool, json.loads(args.args))
    first = result.content[0] if result.content else None
    response = result.payment_response
    emit(
        {
            "payment_made": result.payment_made,
            "is_error": result.is_error,
            "text": getattr(first, "text", None),
            "payment_response": response.model_dump(by_alias=True) if response is not None else None,
        }
    )


if __name__ == "__main__":
    asyncio.run(main())
