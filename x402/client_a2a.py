"""The payer for A2A: an orchestrator pays an agent's a2a-x402 tasks with the same logic as the HTTP payer.

    auth = PaymentAuth(wallet, SpendPolicy(max_per_call="$0.01"))
    client = await create_client(agent_url, client_config=ClientConfig(streaming=False))
    paid = await A2aPayer(auth).send_text(client, "summarize this ...")
    paid.task, paid.receipt, paid.answer

`send_text` sends the message (asking for both a2a-x402 extension URIs in `A2A-Extensions`); when the task
comes back `input-required` with `x402.payment.status: payment-required`, it reads the offers of its
`x402.payment.required`, lets `PaymentAuth.choose` pick one (a policy refusal raises
:class:`~x402.SpendPolicyViolation` before anything is signed), reserves and signs through
`PaymentAuth.authorize`, and sends one `payment-submitted` message on the same task. A `completed` task
commits the reservation and exposes the last receipt; anything else releases it.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import msgspec
from a2a.client import Client, ClientCallContext
from a2a.helpers.proto_helpers import new_text_part
from a2a.types import Message, Role, SendMessageRequest, Task, TaskState
from google.protobuf.json_format import MessageToDict

from ._a2a import (
    A2A_X402_EXTENSIONS,
    A2A_X402_PAYLOAD,
    A2A_X402_RECEIPTS,
    A2A_X402_REQUIRED,
    A2A_X402_STATUS,
    integral,
)
from ._codec import json_decode, json_encode
from ._errors import MalformedPayment, X402Error
from ._types import PaymentPayload, PaymentRequired, SettleResponse
from .client import Offer, PaymentAuth, offers_from_payment_required

__all__ = ["A2aPayer", "PaidTask", "task_metadata"]

_EXTENSIONS_HEADER = "A2A-Extensions"


@dataclass(frozen=True, slots=True)
class PaidTask:
    """The outcome of :meth:`A2aPayer.send_text`: the final task, the offer paid (if any) and its receipt."""

    task: Task
    offer: Offer | None = None
    receipt: SettleResponse | None = None

    @property
    def completed(self) -> bool:
        return self.task.status.state == TaskState.TASK_STATE_COMPLETED

    @property
    def answer(self) -> str:
        return "\n".join(p.text for a in self.task.artifacts for p in a.parts if p.HasField("text"))


def task_metadata(task: Task) -> dict[str, Any]:
    """The a2a-x402 metadata of a task's status message, numbers repaired (see `x402.integral`)."""
    message = task.status.message
    if not task.status.HasField("message") or not message.HasField("metadata"):
        return {}
    out: dict[str, Any] = integral(MessageToDict(message.metadata))
    return out


def _required(metadata: Mapping[str, Any]) -> PaymentRequired | None:
    if metadata.get(A2A_X402_STATUS) != "payment-required" or A2A_X402_REQUIRED not in metadata:
        return None
    return json_decode(json_encode(metadata[A2A_X402_REQUIRED]), PaymentRequired, what=A2A_X402_REQUIRED)


def _receipt(metadata: Mapping[str, Any]) -> SettleResponse | None:
    receipts = metadata.get(A2A_X402_RECEIPTS)
    if not isinstance(receipts, list) or not receipts:
        return None
    try:
        return json_decode(json_encode(receipts[-1]), SettleResponse, what=A2A_X402_RECEIPTS)
    except X402Error:
        return None


class A2aPayer:
    """Pays a2a-x402 tasks with `auth`'s wallet, policy and preferences (one payment message per task)."""

    def __init__(self, auth: PaymentAuth) -> None:
        self.auth = auth

    @staticmethod
    def context() -> ClientCallContext:
        """A call context asking for both a2a-x402 extension URIs."""
        return ClientCallContext(service_parameters={_EXTENSIONS_HEADER: ", ".join(A2A_X402_EXTENSIONS)})

    async def _send(self, client: Client, message: Message) -> Task:
        task: Task | None = None
        async for response in client.send_message(
            SendMessageRequest(message=message), context=self.context()
        ):
            if response.HasField("task"):
                task = response.task
        if task is None:
            raise MalformedPayment("the agent answered without a task")
        return task

    async def send_text(self, client: Client, text: str) -> PaidTask:
        first = Message(message_id=str(uuid.uuid4()), role=Role.ROLE_USER, parts=[new_text_part(text)])
        task = await self._send(client, first)
        required = _required(task_metadata(task))
        if task.status.state != TaskState.TASK_STATE_INPUT_REQUIRED or required is None:
            return PaidTask(task)
        offer = self.auth.choose(offers_from_payment_required(required))  # nothing signed if refused
        reservation, credential = self.auth.authorize(offer)
        try:
            assert offer.requirements is not None  # x402 v2 offers carry them
            payment = PaymentPayload(
                payload=dict(credential.payload),
                accepted=offer.requirements,
                resource=offer.resource,
                extensions=dict(offer.extensions) if offer.extensions is not None else None,
            )
            metadata = {
                A2A_X402_STATUS: "payment-submitted",
                A2A_X402_PAYLOAD: msgspec.json.decode(json_encode(payment)),
            }
            paying = Message(
                message_id=str(uuid.uuid4()),
                role=Role.ROLE_USER,
                task_id=task.id,
                context_id=task.context_id,
                parts=[new_text_part("payment")],
                metadata=metadata,
            )
            final = await self._send(client, paying)
        except BaseException:
            reservation.release()
            raise
        if final.status.state != TaskState.TASK_STATE_COMPLETED:
            reservation.release()
            return PaidTask(final, offer)
        reservation.commit()
        return PaidTask(final, offer, _receipt(task_metadata(final)))
