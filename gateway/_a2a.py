"""Paid A2A agents: an a2a-sdk (A2A 1.0) `AgentExecutor` that charges per task with the a2a-x402 extension,
through the gateway's `Paywall` (the same verify -> claim -> work -> settle or release as an HTTP route).

    agent = PaidAgent(answer, price="$0.002")               # answer(text) -> str, sync or async
    app = agent.http_app(agent_card("Summarizer", url), schemes=[...], pay_to=..., asset=..., store=...)

A new task is answered `input-required` with `x402.payment.status: payment-required` and the v2
`PaymentRequired` (every offer the paywall makes) in its status message's metadata. A message on that task
with `payment-submitted` and an `x402.payment.payload` is verified and claimed; the work runs (`working`,
`payment-verified`); a success is settled and the task `completed` with `payment-completed` and the receipts,
the answer as an artifact. A refused payment, a failed work (nothing charged) or a failed settlement ends the
task `failed` with `payment-failed`, the extension's error code and a failed receipt; the work's output is
never returned unpaid. A payment is claimed once: a replay on another task fails `DUPLICATE_NONCE`.

The agent card declares both extension URIs (v0.1 and v0.2, same keys), `required: true`.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Awaitable, Callable
from typing import Any, TypeAlias

import msgspec
from a2a.helpers.proto_helpers import new_task_from_user_message, new_text_part
from a2a.server.agent_execution import AgentExecutor, RequestContext
from a2a.server.events import EventQueue
from a2a.server.request_handlers import DefaultRequestHandler
from a2a.server.routes import create_agent_card_routes, create_jsonrpc_routes
from a2a.server.tasks import InMemoryTaskStore, TaskStore, TaskUpdater
from a2a.types import (
    AgentCapabilities,
    AgentCard,
    AgentExtension,
    AgentInterface,
    AgentSkill,
    Message,
    Role,
)
from google.protobuf.json_format import MessageToDict
from starlette.applications import Starlette
from starlette.types import ASGIApp, Receive, Scope, Send
from starlette.types import Message as Message_

from x402 import (
    A2A_X402_ERROR,
    A2A_X402_EXTENSIONS,
    A2A_X402_PAYLOAD,
    A2A_X402_RECEIPTS,
    A2A_X402_REQUIRED,
    A2A_X402_STATUS,
    PaymentRequired,
    ResourceInfo,
    SettleResponse,
    a2a_error_code,
    b64_json_encode,
    decode_payment_response,
    integral,
    json_encode,
)

from ._errors import PaymentFailed
from ._middleware import PaymentMiddleware
from ._priced import CallPrice, PaywallSource, PricedCalls
from ._pricing import Asset, PaidRoute, Quote

__all__ = ["PaidAgent", "agent_card"]

log = logging.getLogger("agentpay.gateway.a2a")

#: The agent's work: the task's text in, the answer out (sync or async).
Work: TypeAlias = Callable[[str], str | Awaitable[str]]

_SKILL = "task"


def agent_card(
    name: str,
    url: str,
    *,
    description: str = "",
    skills: list[AgentSkill] | None = None,
    version: str = "1.0.0",
) -> AgentCard:
    """An A2A 1.0 agent card served over JSON-RPC at `url`, requiring the a2a-x402 extension (both URIs)."""
    extensions = [
        AgentExtension(uri=uri, description="x402 payments for tasks (a2a-x402)", required=True)
        for uri in A2A_X402_EXTENSIONS
    ]
    return AgentCard(
        name=name,
        description=description or name,
        version=version,
        supported_interfaces=[AgentInterface(url=url, protocol_binding="JSONRPC", protocol_version="1.0")],
        capabilities=AgentCapabilities(streaming=False, extensions=extensions),
        default_input_modes=["text/plain"],
        default_output_modes=["text/plain"],
        skills=skills or [AgentSkill(id=_SKILL, name=name, description=description or name, tags=["paid"])],
    )


def _metadata(message: Message | None) -> dict[str, Any]:
    if message is None or not message.HasField("metadata"):
        return {}
    out: dict[str, Any] = integral(MessageToDict(message.metadata))
    return out


def _text(message: Message | None) -> str:
    return "\n".join(p.text for p in (message.parts if message is not None else ()) if p.HasField("text"))


class PaidAgent(AgentExecutor):
    """Charges `price` (an amount, or a function of the task's text: the metering hook) per task, then
    answers with `work(text)`. The paywall is given here, bound later (`bind`), or made by `http_app`."""

    def __init__(
        self,
        work: Work,
        *,
        price: PaidRoute | CallPrice,
        paywall: PaywallSource | None = None,
        pay_to: str | None = None,
        asset: Asset | None = None,
        resource_url: str = "a2a://agent",
        description: str = "A2A task",
    ) -> None:
        self.work = work
        self.calls = PricedCalls({_SKILL: price}, what="task", paywall=paywall, pay_to=pay_to, asset=asset)
        self.resource_url = resource_url
        self.description = description

    def bind(self, paywall: PaywallSource) -> None:
        self.calls.bind(paywall)

    def http_app(
        self, card: AgentCard, *, task_store: TaskStore | None = None, **middleware: Any
    ) -> PaymentMiddleware:
        """The agent's ASGI app (card at `/.well-known/agent-card.json`, JSON-RPC at `/`) behind a
        `PaymentMiddleware(**middleware)` these tasks are charged through."""
        handler = DefaultRequestHandler(
            agent_executor=self, task_store=task_store or InMemoryTaskStore(), agent_card=card
        )
        routes = [*create_agent_card_routes(card), *create_jsonrpc_routes(handler, rpc_url="/")]
        app = PaymentMiddleware(_echo_extensions(Starlette(routes=routes)), routes={}, **middleware)
        self.bind(app)
        return app

    async def quote(self, text: str) -> Quote:
        return await self.calls.quote(
            _SKILL, text, method="a2a/task", url=self.resource_url, description=self.description
        )

    async def cancel(self, context: RequestContext, event_queue: EventQueue) -> None:
        updater = TaskUpdater(event_queue, context.task_id or "", context.context_id or "")
        await updater.cancel()

    async def execute(self, context: RequestContext, event_queue: EventQueue) -> None:
        message = context.message
        if message is None:  # the framework always passes the message that started this execution
            return
        task = context.current_task
        if task is None:
            task = new_task_from_user_message(message)
            await event_queue.enqueue_event(task)
        updater = TaskUpdater(event_queue, task.id, task.context_id)
        # The task's input is its first user message; the price is recomputed from it, never from the
        # payment message, so a payer cannot re-price the task.
        first = next((m for m in task.history if m.role == Role.ROLE_USER), message)
        text = _text(first)
        quote = await self.quote(text)
        paywall = self.calls.paywall
        offers = paywall.offers(quote)
        meta = _metadata(message)
        if meta.get(A2A_X402_STATUS) != "payment-submitted" or A2A_X402_PAYLOAD not in meta:
            await self._require(updater, quote, [o.requirements for o in offers])
            return
        try:
            raw = b64_json_encode(meta[A2A_X402_PAYLOAD]).encode()
            attempt = await paywall.verify(quote, offers, "x402v2", raw, host="")
        except PaymentFailed as exc:
            await self._failed(updater, quote, exc, settling=False)
            return
        except (TypeError, ValueError) as exc:
            await self._failed(
                updater, quote, PaymentFailed(str(exc), code="invalid_payload"), settling=False
            )
            return
        verified = {A2A_X402_STATUS: "payment-verified"}
        await updater.start_work(updater.new_agent_message([new_text_part("working")], metadata=verified))
        try:
            out = self.work(text)
            answer = await out if inspect.isawaitable(out) else out
        except Exception as exc:
            await paywall.release(attempt)  # the work failed: nothing is charged
            log.warning("paid task %s failed: %r", task.id, exc)
            failure = PaymentFailed("the task failed; nothing was charged", code="task_failed")
            await self._failed(updater, quote, failure, settling=False, error="TASK_FAILED")
            return
        try:
            headers = await paywall.settle(attempt)
        except PaymentFailed as exc:
            await self._failed(updater, quote, exc, settling=True)
            return
        receipts = [
            msgspec.json.decode(json_encode(decode_payment_response(value)))
            for name, value in headers
            if name == b"payment-response"
        ]
        await updater.add_artifact([new_text_part(str(answer))], name="answer")
        done = {A2A_X402_STATUS: "payment-completed", A2A_X402_RECEIPTS: receipts}
        await updater.complete(updater.new_agent_message([new_text_part("paid and done")], metadata=done))

    async def _require(self, updater: TaskUpdater, quote: Quote, accepts: list[Any]) -> None:
        required = PaymentRequired(
            error="payment required",
            resource=ResourceInfo(url=quote.url, description=quote.description, mime_type=quote.mime_type),
            accepts=accepts,
        )
        metadata = {
            A2A_X402_STATUS: "payment-required",
            A2A_X402_REQUIRED: msgspec.json.decode(json_encode(required)),
        }
        message = updater.new_agent_message([new_text_part("Payment is required.")], metadata=metadata)
        await updater.requires_input(message)

    async def _failed(
        self,
        updater: TaskUpdater,
        quote: Quote,
        exc: PaymentFailed,
        *,
        settling: bool,
        error: str | None = None,
    ) -> None:
        receipt = SettleResponse(
            success=False, error_reason=exc.code, transaction="", network=quote.asset.network
        )
        metadata = {
            A2A_X402_STATUS: "payment-failed",
            A2A_X402_ERROR: error or a2a_error_code(exc.code, settling=settling),
            A2A_X402_RECEIPTS: [msgspec.json.decode(json_encode(receipt))],
        }
        text = f"payment failed: {exc.message}"
        await updater.failed(updater.new_agent_message([new_text_part(text)], metadata=metadata))


def _echo_extensions(app: ASGIApp) -> ASGIApp:
    """Confirm activation: the a2a-x402 URIs the client requested (`A2A-Extensions`, or v0.3's
    `X-A2A-Extensions`) are echoed in the response's `A2A-Extensions` (the v0.1 spec's MUST)."""

    async def echo(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await app(scope, receive, send)
            return
        asked = b",".join(v for k, v in scope["headers"] if k in (b"a2a-extensions", b"x-a2a-extensions"))
        requested = {uri.strip() for uri in asked.decode("latin-1").split(",")}
        ours = [uri for uri in A2A_X402_EXTENSIONS if uri in requested]

        async def send_echo(message: Message_) -> None:
            if ours and message["type"] == "http.response.start":
                headers = [*message.get("headers", []), (b"a2a-extensions", ", ".join(ours).encode())]
                message = {**message, "headers": headers}
            await send(message)

        await app(scope, receive, send_echo)

    return echo
