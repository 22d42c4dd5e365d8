"""A paid A2A agent (A2A 1.0, a2a-sdk): $0.002 per task, paid with the a2a-x402 extension, settling on a
devnet through the same paywall as the HTTP sub-agent (`examples.subagent`).

    python -m examples.a2a_agent --devnet .agentpay/devnet.json --port 8404

Its card is at `/.well-known/agent-card.json` (declaring both a2a-x402 URIs) and JSON-RPC at `/`. A new task
comes back `input-required` with `x402.payment.status: payment-required`; a `payment-submitted` message on
it is verified, the task runs, the payment settles, and the task completes with the receipt.
"""

from __future__ import annotations

import argparse
from typing import Any

from escrow import Chain
from gateway import PaymentMiddleware
from gateway.a2a import PaidAgent, agent_card

__all__ = ["TASK_PRICE", "build_app", "main", "word_count"]

TASK_PRICE = "$0.002"


def word_count(text: str) -> str:
    """The agent's work (deliberately small): count the words of the task's text."""
    return f"{len(text.split())} words"


def build_app(chain: Chain, url: str, *, pay_to: str, **options: Any) -> PaymentMiddleware:
    """The agent's ASGI app, advertised at `url`, charging `TASK_PRICE` per task on `chain` to `pay_to`;
    `options` go to `PaymentMiddleware` (store, schemes, settle, ...)."""
    agent = PaidAgent(word_count, price=TASK_PRICE, resource_url=url, description="Count words")
    card = agent_card("Word counter", url, description="Counts the words of a text; $0.002 per task")
    return agent.http_app(card, chain=chain, pay_to=pay_to, **options)


def main(argv: list[str] | None = None) -> None:
    import uvicorn

    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--devnet", required=True, help="devnet state file (agentpay devnet up writes one)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8404)
    parser.add_argument("--payee", default="2", help="devnet account index (or 0x address) that gets paid")
    parser.add_argument("--store", default=None, help="payment store URL (default: $AGENTPAY_STORE)")
    args = parser.parse_args(argv)
    chain = Chain.from_devnet(args.devnet)
    payee = args.payee if args.payee.startswith("0x") else chain.accounts[int(args.payee)].address
    url = f"http://{args.host}:{args.port}/"
    app = build_app(chain, url, pay_to=payee, store=args.store)
    print(f"paid A2A agent on {url} (payee {payee})", flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
