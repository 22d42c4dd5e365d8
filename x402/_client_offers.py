"""The payer's view of a 402: every offer it carries (x402 v2, x402 v1, MPP) and the headers that pay one.

`offers_from_response` reads a 402's offers as `Offer`s; `payment_headers` turns the `Credential` a wallet
made for one of them into the retry's headers. The constants name the `response.extensions` keys and the
protocols a `PaymentAuth` prefers.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Final, Literal

import httpx

from ._codec import (
    PAYMENT_REQUIRED_HEADER,
    PAYMENT_SIGNATURE_HEADER,
    X_PAYMENT_HEADER,
    decode_payment_required,
    decode_payment_required_v1,
    encode_payment_signature,
    encode_x_payment,
)
from ._errors import X402Error
from ._evm_charge import decode_evm_charge_request
from ._mpp import AUTHORIZATION_HEADER, MppChallenge, MppCredential, MppReceipt
from ._mpp_header import format_credential, parse_www_authenticate
from ._schemes import V1_NETWORKS
from ._types import (
    PaymentPayload,
    PaymentPayloadV1,
    PaymentRequired,
    PaymentRequirements,
    PaymentRequirementsV1,
    ResourceInfo,
    SettleResponse,
)

__all__ = [
    "ACCEPT_PAYMENT_HEADER",
    "DEFAULT_PREFERENCE",
    "EVM_CHARGE",
    "OFFER_EXTENSION",
    "PAYMENT_ERROR_EXTENSION",
    "RECEIPT_EXTENSION",
    "Credential",
    "Offer",
    "ProtocolName",
    "Receipt",
    "offers_from_payment_required",
    "offers_from_response",
    "payment_headers",
]

ProtocolName = Literal["x402v2", "mpp", "x402v1"]
Receipt = SettleResponse | MppReceipt

#: Default order in which protocols are preferred when a server offers several.
DEFAULT_PREFERENCE: Final[tuple[ProtocolName, ...]] = ("x402v2", "mpp", "x402v1")
#: ``response.extensions`` key of the parsed receipt of a paid response.
RECEIPT_EXTENSION: Final = "x402_receipt"
#: ``response.extensions`` key of the server's refusal (a problem detail or x402 error) after a paid retry.
PAYMENT_ERROR_EXTENSION: Final = "x402_payment_error"
#: ``response.extensions`` key of the :class:`Offer` that was paid.
OFFER_EXTENSION: Final = "x402_offer"

_PAYMENT_HEADERS: Final = (PAYMENT_SIGNATURE_HEADER, X_PAYMENT_HEADER)
#: Request header listing the MPP ``method/intent`` pairs the client can pay (mpp.md §1; servers SHOULD
#: filter and order their challenges by it).
ACCEPT_PAYMENT_HEADER: Final = "Accept-Payment"
#: The MPP method/intent that :class:`Eip3009Wallet` and the escrow session-key wallet answer.
EVM_CHARGE: Final = "evm/charge"
_REMEMBER_MAX: Final = 1024
#: ``request.extensions`` key through which the flow asks its driver to wait before sending (seconds).
_WAIT: Final = "x402_wait"
_SETTLEMENT_PENDING: Final = "settlement_pending"


# ---------------------------------------------------------------------------------------------- offers


@dataclass(frozen=True, slots=True)
class Offer:
    """One way to pay, normalised across x402 v2, x402 v1 and MPP.

    ``scheme`` is the x402 scheme (``exact``, ``escrow``, ...) or, for MPP, ``"<method>/<intent>"``
    (``evm/charge``). ``network`` is CAIP-2 (``eip155:8453``) whenever the chain is known. The original
    wire object stays attached (``requirements`` / ``requirements_v1`` / ``challenge``) so that the payment
    echoes exactly what the server sent.
    """

    protocol: ProtocolName
    scheme: str
    network: str
    asset: str
    amount: int
    pay_to: str
    max_timeout_seconds: int = 0
    extra: Mapping[str, Any] = field(default_factory=dict)
    requirements: PaymentRequirements | None = None
    requirements_v1: PaymentRequirementsV1 | None = None
    resource: ResourceInfo | None = None
    extensions: Mapping[str, Any] | None = None
    challenge: MppChallenge | None = None
    request: Mapping[str, Any] | None = None  # the decoded MPP request object

    @property
    def chain_id(self) -> int | None:
        digits = self.network[7:]
        # ASCII only: str.isdigit() also takes "²" (int() refuses it) and "١٢٣" (int() reads 123).
        if self.network.startswith("eip155:") and digits.isascii() and digits.isdigit():
            return int(digits)
        return None


def _v2_offers(value: str) -> list[Offer]:
    return offers_from_payment_required(decode_payment_required(value))


def offers_from_payment_required(required: PaymentRequired) -> list[Offer]:
    """The offers of an x402 v2 ``PaymentRequired`` (however it arrived: header, MCP result, A2A task)."""
    return [
        Offer(
            protocol="x402v2",
            scheme=req.scheme,
            network=req.network,
            asset=req.asset,
            amount=int(req.amount),
            pay_to=req.pay_to,
            max_timeout_seconds=req.max_timeout_seconds,
            extra=req.extra,
            requirements=req,
            resource=required.resource,
            extensions=required.extensions,
        )
        for req in required.accepts
    ]


def _v1_offers(body: bytes) -> list[Offer]:
    required = decode_payment_required_v1(body)
    offers = []
    for req in required.accepts:
        chain = V1_NETWORKS.get(req.network)
        offers.append(
            Offer(
                protocol="x402v1",
                scheme=req.scheme,
                network=f"eip155:{chain}" if chain is not None else req.network,
                asset=req.asset,
                amount=int(req.max_amount_required),
                pay_to=req.pay_to,
                max_timeout_seconds=req.max_timeout_seconds,
                extra=req.extra or {},
                requirements_v1=req,
            )
        )
    return offers


def _mpp_offer(challenge: MppChallenge) -> Offer | None:
    request = challenge.request_json()
    amount, currency, recipient = request.get("amount"), request.get("currency"), request.get("recipient")
    if not (isinstance(amount, str) and amount.isdigit() and amount.isascii() and len(amount) <= 78):
        return None
    details = request.get("methodDetails")
    chain = details.get("chainId") if isinstance(details, dict) else None
    if challenge.method == "evm" and challenge.intent == "charge":
        decode_evm_charge_request(request)  # validate the shape the wallet will rely on
    network = f"eip155:{chain}" if isinstance(chain, int) and not isinstance(chain, bool) else ""
    return Offer(
        protocol="mpp",
        scheme=f"{challenge.method}/{challenge.intent}",
        network=network,
        asset=currency if isinstance(currency, str) else "",
        amount=int(amount),
        pay_to=recipient if isinstance(recipient, str) else "",
        extra=details if isinstance(details, dict) else {},
        challenge=challenge,
        request=request,
    )


def offers_from_response(response: httpx.Response) -> list[Offer]:
    """Every offer in a 402 response, in server order per protocol (v2, then MPP, then v1).

    Malformed parts are skipped: one broken header must not hide a payable offer elsewhere. The response
    body must have been read (the auth flow does this for 402s).
    """
    offers: list[Offer] = []
    value = response.headers.get(PAYMENT_REQUIRED_HEADER)
    if value is not None:
        try:
            offers.extend(_v2_offers(value))
        except X402Error:
            pass
    challenges = parse_www_authenticate(response.headers.get_list("www-authenticate"), strict=False)
    for challenge in challenges:
        try:
            offer = _mpp_offer(challenge)
        except (X402Error, ValueError):
            continue
        if offer is not None:
            offers.append(offer)
    body = response.content
    if body and b"x402Version" in body:
        try:
            offers.extend(_v1_offers(body))
        except X402Error:
            pass
    return offers


# ------------------------------------------------------------------------------------------ credentials


@dataclass(frozen=True, slots=True)
class Credential:
    """What a wallet produces for an offer: the scheme payload (a JSON object in the shape of the offer's
    protocol: the x402 ``payload`` or the MPP credential ``payload``), and the MPP ``source``."""

    payload: Mapping[str, Any]
    source: str | None = None


def payment_headers(offer: Offer, credential: Credential) -> dict[str, str]:
    """The request header(s) that carry ``credential`` for ``offer``."""
    payload = dict(credential.payload)
    if offer.protocol == "x402v2":
        if offer.requirements is None:
            raise ValueError("an x402 v2 offer carries its requirements")
        message = PaymentPayload(
            payload=payload,
            accepted=offer.requirements,  # echoed as received
            resource=offer.resource,
            extensions=dict(offer.extensions) if offer.extensions is not None else None,
        )
        return {PAYMENT_SIGNATURE_HEADER: encode_payment_signature(message)}
    if offer.protocol == "x402v1":
        if offer.requirements_v1 is None:
            raise ValueError("an x402 v1 offer carries its requirements")
        v1 = PaymentPayloadV1(
            scheme=offer.requirements_v1.scheme, network=offer.requirements_v1.network, payload=payload
        )
        return {X_PAYMENT_HEADER: encode_x_payment(v1)}
    if offer.challenge is None:
        raise ValueError("an MPP offer carries its challenge")
    name = offer.challenge.header or AUTHORIZATION_HEADER
    mpp = MppCredential(challenge=offer.challenge, payload=payload, source=credential.source)
    return {name: format_credential(mpp)}
