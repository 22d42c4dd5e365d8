"""A sub-agent that sells MCP tools: streamable HTTP at /mcp, settling on a devnet.

    python -m examples.paid_tools --devnet .agentpay/devnet.json --port 8403

Tools: `summarize(text)` costs $0.001 (TestUSDC, paid to devnet account 2 by default), `ping()` is free. An
unpaid `summarize` call is answered in both MCP payment bindings at once (x402's `isError` result with the
`PaymentRequired`, and MPP's challenges; a client announcing MPP gets JSON-RPC -32042), and a paid one
returns its receipt in `_meta`. The payments go through the same paywall as the HTTP sub-agent's
(`examples.subagent`): the chain's schemes (`exact`, and `escrow` for session keys), its settlers and
recovery.
"""

from __future__ import annotations

from typing import Any

from mcp.server.mcpserver import MCPServer

from escrow import Chain
from gateway import PaymentMiddleware
from gateway.mcp import PaidTools

from ._cli import devnet_chain_and_payee, devnet_server_args

__all__ = ["SUMMARIZE_PRICE", "build_app", "build_server", "main"]

SUMMARIZE_PRICE = "$0.001"


def build_server() -> tuple[MCPServer, PaidTools]:
    """The MCP server and its paid-tool extension (not yet bound to a paywall)."""
    paid = PaidTools({"summarize": SUMMARIZE_PRICE})
    # WARNING: MCPServer configures the process's root logger at this level, and the demo serves it
    # in-process (INFO would log every HTTP request the demo's clients make).
    server = MCPServer(
        "paid-tools",
        instructions="summarize costs $0.001; ping is free",
        extensions=[paid],
        log_level="WARNING",
    )

    @server.tool(description="Summarize a text (paid: $0.001)")
    def summarize(text: str) -> str:
        return text[:60] + ("..." if len(text) > 60 else "")

    @server.tool(description="Check the server is up (free)")
    def ping() -> str:
        return "pong"

    return server, paid


def build_app(chain: Chain, *, pay_to: str, **options: Any) -> PaymentMiddleware:
    """The ASGI app: the MCP server at /mcp behind a paywall on `chain` paying `pay_to`; `options` go to
    `PaymentMiddleware` (store, schemes, settle, ...)."""
    server, paid = build_server()
    return paid.http_app(server, chain=chain, pay_to=pay_to, **options)


def main(argv: list[str] | None = None) -> None:
    import uvicorn

    args = devnet_server_args(__doc__, 8403, argv)
    chain, payee = devnet_chain_and_payee(args)
    app = build_app(chain, pay_to=payee, store=args.store)
    print(f"paid tools: MCP on http://{args.host}:{args.port}/mcp (payee {payee})", flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
