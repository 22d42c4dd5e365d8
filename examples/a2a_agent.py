"""A paid A2A agent (A2A 1.0, a2a-sdk): $0.002 per task, paid with the a2a-x402 extension, settling on a
devnet through the same paywall as the HTTP sub-agent (`examples.subagent`).

    python -m examples.a2a_agent --devnet .agentpay/devnet.json --port 8404

Its card is at `/.well-known/agent-card.json` (declaring both a2a-x402 URIs) and JSON-RPC at `/`. A new task
comes back `input-required` with `x402.payment.status: payment-required`; a `payment-submitted` message on
it is verified, the task runs, the payment settles, and the task completes with the receipt.
"""

from __future__ import annotations

from typing import Any

from escrow import Chain
from gateway import PaymentMiddleware
from gateway.a2a import PaidAgent, agent_card

from ._cli import devnet_chain_and_payee, devnet_server_args

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

    args = devnet_server_args(__doc__, 8404, argv)
    chain, payee = devnet_chain_and_payee(args)
    url = f"http://{args.host}:{args.port}/"
    app = build_app(chain, url, pay_to=payee, store=args.store)
    print(f"paid A2A agent on {url} (payee {payee})", flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
