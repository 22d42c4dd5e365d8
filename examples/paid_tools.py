"""A sub-agent that sells MCP tools: streamable HTTP at /mcp, settling on a devnet.

    python -m examples.paid_tools --devnet .agentpay/devnet.json --port 8403

Tools: `summarize(text)` costs $0.001 (TestUSDC, paid to devnet account 2 by default), `ping()` is free. An
unpaid `summarize` call is answered in both MCP payment bindings at once (x402's `isError` result with the
`PaymentRequired`, and MPP's challenges; a client announcing MPP gets JSON-RPC -32042), and a paid one
returns its receipt in `_meta`. The payments go through the same paywall as the HTTP sub-agent's
(`examples.subagent`): EIP-3009 `exact`, settled before the result leaves.
"""

from __future__ import annotations

import argparse

from mcp.server.mcpserver import MCPServer

from escrow import DevnetState, ExactEvm, Rpc, TxSender
from gateway import Asset, ExactScheme, PaymentMiddleware, PaymentStore
from gateway.mcp import PaidTools

__all__ = ["SUMMARIZE_PRICE", "build_app", "build_server", "main"]

SUMMARIZE_PRICE = "$0.001"


def build_server() -> tuple[MCPServer, PaidTools]:
    """The MCP server and its paid-tool extension (not yet bound to a paywall)."""
    paid = PaidTools({"summarize": SUMMARIZE_PRICE})
    server = MCPServer("paid-tools", instructions="summarize costs $0.001; ping is free", extensions=[paid])

    @server.tool(description="Summarize a text (paid: $0.001)")
    def summarize(text: str) -> str:
        return text[:60] + ("..." if len(text) > 60 else "")

    @server.tool(description="Check the server is up (free)")
    def ping() -> str:
        return "pong"

    return server, paid


def build_app(
    state: DevnetState,
    *,
    payee: str | None = None,
    relayer_key: str | None = None,
    store: PaymentStore | str | None = None,
) -> PaymentMiddleware:
    """The ASGI app: the MCP server at /mcp behind a paywall that settles `exact` payments on `state`."""
    rpc = Rpc(state.rpc_url)
    relayer = TxSender(rpc, relayer_key or state.accounts[3].private_key, chain_id=state.chain_id)
    asset = Asset(
        address=state.contracts["usdc"],
        chain_id=state.chain_id,
        name=state.usdc_name,
        version=state.usdc_version,
        decimals=state.usdc_decimals,
    )
    server, paid = build_server()
    return paid.http_app(
        server,
        schemes=[ExactScheme(ExactEvm(rpc, relayer))],
        pay_to=payee or state.accounts[2].address,
        asset=asset,
        store=store,
    )


def main(argv: list[str] | None = None) -> None:
    import uvicorn

    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--devnet", required=True, help="devnet state file (agentpay devnet up writes one)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8403)
    parser.add_argument("--payee", default="2", help="devnet account index (or 0x address) that gets paid")
    parser.add_argument("--store", default=None, help="payment store URL (default: $AGENTPAY_STORE)")
    args = parser.parse_args(argv)
    state = DevnetState.load(args.devnet)
    payee = args.payee if args.payee.startswith("0x") else state.accounts[int(args.payee)].address
    app = build_app(state, payee=payee, store=args.store)
    print(f"paid tools: MCP on http://{args.host}:{args.port}/mcp (payee {payee})", flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
