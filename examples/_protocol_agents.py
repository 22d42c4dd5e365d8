"""The demo's other two sellers: a paid MCP tool (`examples.paid_tools`) and a paid A2A agent
(`examples.a2a_agent`), served in-process and paid from the orchestrator's session key, like its HTTP
sub-agents.

    tools, counter = ProtocolAgent.tools(state, ...), ProtocolAgent.a2a(state, ...)
    ok = await pay_tool_and_task(auth, tools, counter)   # serves both, pays one call each, stops them

Both settle each payment before they answer, so the receipt names its transaction.
"""

from __future__ import annotations

from dataclasses import dataclass
from decimal import Decimal

import httpx
from a2a.client import ClientConfig, create_client
from mcp import Client

from escrow import Chain, DevnetState
from gateway import MemoryStore, PaymentMiddleware
from x402 import SettleResponse
from x402.client import Offer, PaymentAuth
from x402.client_a2a import A2aPayer
from x402.client_mcp import McpPayer

from . import a2a_agent, paid_tools
from ._escrow_subagents import serving_app

__all__ = ["ProtocolAgent", "pay_tool_and_task"]


def _atomic(price: str) -> int:
    """`$0.001` -> 1000 (6-decimal USDC)."""
    return int(Decimal(price.removeprefix("$")) * 10**6)


@dataclass
class ProtocolAgent:
    """A seller paid over MCP or A2A: where its money goes, its price, and what it earned (once paid)."""

    name: str
    state: DevnetState
    pay_to: str
    settler_key: str
    price: int
    what: str
    earned: int = 0

    def chain(self) -> Chain:
        return Chain.from_devnet(self.state, relayer=self.settler_key)  # the seller pays its settlement gas

    @classmethod
    def tools(cls, state: DevnetState, *, pay_to: str, settler_key: str) -> ProtocolAgent:
        price = _atomic(paid_tools.SUMMARIZE_PRICE)
        return cls("mcp tools", state, pay_to, settler_key, price, "MCP summarize")

    @classmethod
    def a2a(cls, state: DevnetState, *, pay_to: str, settler_key: str) -> ProtocolAgent:
        return cls("a2a agent", state, pay_to, settler_key, _atomic(a2a_agent.TASK_PRICE), "A2A task")


async def pay_tool_and_task(auth: PaymentAuth, tools: ProtocolAgent, agent: ProtocolAgent) -> bool:
    """Serve both sellers, pay one `summarize` call and one A2A task with `auth`, print a line for each."""
    tools_app = paid_tools.build_app(tools.chain(), pay_to=tools.pay_to, store=MemoryStore())

    def agent_app(url: str) -> PaymentMiddleware:
        return a2a_agent.build_app(agent.chain(), url + "/", pay_to=agent.pay_to, store=MemoryStore())

    async with (
        serving_app(lambda _: tools_app, tools.name) as tools_url,
        serving_app(agent_app, agent.name) as agent_url,
        httpx.AsyncClient(timeout=30.0) as http,
    ):
        async with Client(tools_url + "/mcp") as session:
            call = await McpPayer(auth).call_tool(session, "summarize", {"text": "the sub-agents' answers"})
        ok = _paid(tools, call.receipt, call.offer, ok=not call.result.is_error)
        a2a = await create_client(agent_url, client_config=ClientConfig(streaming=False, httpx_client=http))
        task = await A2aPayer(auth).send_text(a2a, "count the words of this task")
        ok &= _paid(agent, task.receipt, task.offer, ok=task.completed, answer=task.answer)
    return ok


def _paid(seller: ProtocolAgent, receipt: object, offer: Offer | None, *, ok: bool, answer: str = "") -> bool:
    """Print the payment's line: its scheme and settlement transaction; whether it was paid and settled."""
    settled = ok and isinstance(receipt, SettleResponse) and receipt.success and bool(receipt.transaction)
    if isinstance(receipt, SettleResponse) and settled:
        seller.earned = seller.price
        said = f" ({answer})" if answer else ""
        scheme = offer.scheme if offer is not None else "?"
        how = f"{scheme}, settled before the answer{said}: tx {receipt.transaction[:12]}…"
    else:
        how = f"NOT PAID: {receipt!r}"
    print(f"{'paid':<12}{seller.name:<11}{seller.what:<15}{how}", flush=True)
    return settled
