"""The payer for MCP: pays paid tools for an `mcp` client session with the same logic as the HTTP payer.

    auth = PaymentAuth(wallet, SpendPolicy(max_per_call="$0.01"))     # the very object httpx uses
    async with Client("http://agent.example/mcp") as session:
        paid = await McpPayer(auth).call_tool(session, "summarize", {"text": "..."})
        paid.result, paid.receipt          # the CallToolResult; a SettleResponse or an MppReceipt

`call_tool` calls the tool; when the answer asks for payment (an x402 `isError` result with a
`PaymentRequired`, mppx's `_meta["org.paymentauth/payment-required"]`, or a JSON-RPC `-32042` carrying MPP
challenges or an x402 `PaymentRequired`) it reads every offer, lets `PaymentAuth.choose` pick one (wallet
rank, protocol preference, policy), reserves and signs through `PaymentAuth.authorize` (a refusal raises
:class:`~x402.SpendPolicyViolation` before anything is signed), and retries once with the credential in
`_meta`. An accepted retry commits the reservation and exposes the receipt; a refused one releases it and
returns (x402 result) or raises (MPP `MCPError`) the server's answer. A `-32042` that is a URL elicitation
(`data.elicitations`) is not a payment and is re-raised untouched.

To be answered in MPP's JSON-RPC binding, announce it: `Client(url, extensions=[advertise(MPP_EXTENSION)])`.
For x402's extension binding (`resultType: "payment_required"`, MCP 2026-07-28), construct the client with
`X402McpExtension()`: it advertises `org.x402/payment` and turns that result into the `isError` form the
payer reads.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal, cast

import msgspec
from mcp import Client
from mcp.client.extension import ClaimContext, ClientExtension, ResultClaim
from mcp.shared.exceptions import MCPError
from mcp_types import CallToolResult, RequestParamsMeta, Result, TextContent
from pydantic import Field

from ._client_offers import _mpp_offer
from ._codec import json_decode, json_encode
from ._errors import X402Error
from ._mcp import (
    MPP_CREDENTIAL_META,
    MPP_RECEIPT_META,
    MPP_REQUIRED_META,
    X402_EXTENSION,
    X402_PAYMENT_META,
    X402_RESPONSE_META,
    classify_mcp_error,
    mpp_challenge_from_json,
    mpp_credential_to_json,
)
from ._mpp import MppCredential, MppReceipt
from ._types import PaymentPayload, PaymentRequired, SettleResponse
from .client import Credential, Offer, PaymentAuth, Receipt, offers_from_payment_required

__all__ = [
    "McpPayer",
    "PaidToolCall",
    "PaymentRequiredResult",
    "X402McpExtension",
    "mcp_offers",
    "mcp_payment_meta",
    "mcp_receipt",
]


class PaymentRequiredResult(Result):
    """x402's MCP extension binding: `{"resultType": "payment_required", "paymentRequired": {...}}`, which
    a server may send only to a client that advertised `org.x402/payment`."""

    result_type: Literal["payment_required"] = "payment_required"
    payment_required: dict[str, Any] = Field(alias="paymentRequired")


async def _as_tool_error(result: PaymentRequiredResult, ctx: ClaimContext) -> CallToolResult:
    del ctx
    required = result.payment_required
    text = json_encode(required).decode()
    return CallToolResult(
        is_error=True,
        structured_content=required,
        content=[TextContent(type="text", text=text)],
        _meta=result.meta,
    )


class X402McpExtension(ClientExtension):
    """Advertises `org.x402/payment` and claims its `payment_required` results (as the `isError` form)."""

    identifier = X402_EXTENSION

    def claims(self) -> list[ResultClaim[Any]]:
        return [
            ResultClaim(result_type="payment_required", model=PaymentRequiredResult, resolve=_as_tool_error)
        ]


@dataclass(frozen=True, slots=True)
class PaidToolCall:
    """The outcome of :meth:`McpPayer.call_tool`: the tool's result, and when a payment was made, the offer
    paid and the receipt (None when the server sent none or the payment was refused)."""

    result: CallToolResult
    offer: Offer | None = None
    receipt: Receipt | None = None

    @property
    def paid(self) -> bool:
        return self.receipt is not None


def _payment_required(obj: Any) -> PaymentRequired | None:
    if not isinstance(obj, Mapping) or "accepts" not in obj or "x402Version" not in obj:
        return None
    try:
        return json_decode(json_encode(dict(obj)), PaymentRequired, what="PaymentRequired")
    except (X402Error, TypeError):
        return None


def _mpp_offers(data: Any) -> list[Offer]:
    challenges = data.get("challenges") if isinstance(data, Mapping) else None
    offers: list[Offer] = []
    for item in challenges if isinstance(challenges, list) else ():
        try:
            offer = _mpp_offer(mpp_challenge_from_json(item))
        except (X402Error, ValueError):
            continue  # one broken challenge must not hide a payable one
        if offer is not None:
            offers.append(offer)
    return offers


def mcp_offers(answer: CallToolResult | MCPError) -> list[Offer]:
    """Every offer in an MCP payment-required answer (x402 first, then MPP); [] when it asks for none."""
    required: PaymentRequired | None = None
    mpp: Any = None
    if isinstance(answer, MCPError):
        kind = classify_mcp_error(answer.code, answer.data)
        if kind not in ("mpp", "x402"):
            return []
        data = answer.data
        required = _payment_required(data.get("x402")) or _payment_required(data)
        mpp = data
    else:
        if not answer.is_error:
            return []
        required = _payment_required(answer.structured_content)
        first = answer.content[0] if answer.content else None
        if required is None and isinstance(first, TextContent):
            try:
                required = _payment_required(json.loads(first.text))
            except ValueError:
                required = None
        mpp = (answer.meta or {}).get(MPP_REQUIRED_META)
    offers = offers_from_payment_required(required) if required is not None else []
    return offers + _mpp_offers(mpp)


def mcp_payment_meta(offer: Offer, credential: Credential) -> dict[str, Any]:
    """The `_meta` entry that carries `credential` for `offer` (x402 v2 or MPP)."""
    if offer.protocol == "mpp":
        if offer.challenge is None:
            raise ValueError("an MPP offer carries its challenge")
        mpp = MppCredential(
            challenge=offer.challenge, payload=dict(credential.payload), source=credential.source
        )
        return {MPP_CREDENTIAL_META: mpp_credential_to_json(mpp)}
    if offer.protocol != "x402v2" or offer.requirements is None:
        raise ValueError(f"MCP carries x402 v2 and MPP payments, not {offer.protocol}")
    payment = PaymentPayload(
        payload=dict(credential.payload),
        accepted=offer.requirements,
        resource=offer.resource,
        extensions=dict(offer.extensions) if offer.extensions is not None else None,
    )
    return {X402_PAYMENT_META: msgspec.json.decode(json_encode(payment))}


def mcp_receipt(result: CallToolResult) -> Receipt | None:
    """The receipt in a paid result's `_meta`: x402 (flat or nested) or MPP; None when there is none.
    Raises :class:`~x402.MalformedPayment` for one that does not decode."""
    meta = result.meta or {}
    nested = meta.get(X402_EXTENSION)
    settled = meta.get(X402_RESPONSE_META) or (
        nested.get("settlementResponse") if isinstance(nested, Mapping) else None
    )
    if settled is not None:
        return json_decode(json_encode(settled), SettleResponse, what="x402/payment-response")
    receipt = meta.get(MPP_RECEIPT_META)
    if receipt is not None:
        return json_decode(json_encode(receipt), MppReceipt, what="org.paymentauth/receipt")
    return None


def _meta(values: Mapping[str, Any]) -> RequestParamsMeta:
    return cast(RequestParamsMeta, dict(values))


class McpPayer:
    """Pays MCP tools with `auth`'s wallet, policy and preferences (one retry per call)."""

    def __init__(self, auth: PaymentAuth) -> None:
        self.auth = auth

    async def call_tool(
        self,
        session: Client,
        name: str,
        arguments: Mapping[str, Any] | None = None,
        *,
        meta: Mapping[str, Any] | None = None,
    ) -> PaidToolCall:
        args = dict(arguments or {})
        answer: CallToolResult | MCPError
        try:
            answer = await session.call_tool(name, args, meta=_meta(meta) if meta else None)
        except MCPError as exc:
            if classify_mcp_error(exc.code, exc.data) not in ("mpp", "x402"):
                raise
            answer = exc
        offers = mcp_offers(answer)
        if not offers:
            if isinstance(answer, MCPError):
                raise answer
            return PaidToolCall(answer)
        offer = self.auth.choose(offers)  # NoPayableOffer / SpendPolicyViolation: nothing signed
        reservation, credential = self.auth.authorize(offer)
        try:
            paid_meta = {**(meta or {}), **mcp_payment_meta(offer, credential)}
            result = await session.call_tool(name, args, meta=_meta(paid_meta))
        except BaseException:
            reservation.release()
            raise
        if result.is_error:
            reservation.release()
            return PaidToolCall(result, offer)
        reservation.commit()
        try:
            receipt = mcp_receipt(result)
        except X402Error:
            receipt = None
        return PaidToolCall(result, offer, receipt)
