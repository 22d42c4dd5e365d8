"""Paid MCP tools (needs the `mcp` package): `PaidTools` charges for `tools/call` through the gateway's
paywall, in the x402 and MPP bindings at once. See `gateway._mcp` for the wire behaviour."""

from ._mcp import PaidTools, ToolPrice, ToolPriceFunction

__all__ = ["PaidTools", "ToolPrice", "ToolPriceFunction"]
