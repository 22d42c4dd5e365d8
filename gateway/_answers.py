"""What the gateway answers on its own: 402 challenges (every offer in both protocols at once), failure
answers in the dialect the client spoke, and the receipt headers of a paid response. No I/O here.

One 402 carries:
- `PAYMENT-REQUIRED`: x402 v2, base64 JSON;
- a body that an x402 v1 client reads as `{x402Version: 1, error, accepts}` and that is at the same time an
  RFC 9457 problem (`type`, `title`, `status`, `detail`, `challengeId`), served as application/problem+json;
- `WWW-Authenticate: Payment ...`: one MPP challenge per offer with an MPP side, each with an HMAC id;
- `Cache-Control: no-store`.

A refused payment is answered in the dialect the client spoke, with the reason code from `x402.error_answer`:
x402 gets 400 for malformed input and 402 otherwise, with the reason in `PAYMENT-REQUIRED.error`, the body's
`error`/`invalidReason`, and every offer again; MPP gets 402 + problem+json + a fresh challenge. The one
exception is a replayed credential in MPP: 403 and no new challenge (as pympp answers), because a fresh
challenge would invite an agent to pay a second time for a request it already paid for.
"""

from __future__ import annotations

import secrets
from collections.abc import Sequence

import msgspec

from x402 import (
    PROBLEM_CONTENT_TYPE,
    V1_NETWORKS,
    ErrorAnswer,
    MppChallenge,
    MppReceipt,
    PaymentRequired,
    PaymentRequirementsV1,
    ProblemDetails,
    ResourceInfo,
    SettleResponse,
    challenge_id,
    encode_json_param,
    encode_payment_required,
    encode_payment_response,
    encode_problem,
    format_receipt,
    format_www_authenticate,
    rfc3339,
)

from ._pricing import Quote
from ._scheme import Dialect, Offer, Verified

__all__ = ["Answer", "Challenger", "receipt_headers", "settle_failure_headers", "v1_network"]

Headers = list[tuple[bytes, bytes]]

_TITLE_402 = "Payment Required"
_REQUIRED = "payment_required"
_V1_NAMES: dict[int, str] = {}
for _name, _chain in V1_NETWORKS.items():
    _V1_NAMES.setdefault(_chain, _name)


def v1_network(network: str) -> str:
    """The x402 v1 name of a CAIP-2 EVM network (`eip155:84532` -> `base-sepolia`), or the CAIP-2 name."""
    prefix, _, ref = network.partition(":")
    if prefix == "eip155" and ref.isdigit():
        return _V1_NAMES.get(int(ref), network)
    return network


class Answer(msgspec.Struct, frozen=True):
    """A complete HTTP response the middleware sends without calling the app."""

    status: int
    headers: Headers
    body: bytes


class Challenger:
    """Builds 402s. MPP challenge ids are HMACs under `secret` (the first of several while rotating)."""

    def __init__(self, secret: bytes, *, ttl: float) -> None:
        self.secret = secret
        self.ttl = ttl

    @staticmethod
    def scope(quote: Quote) -> dict[str, str]:
        """The route binding put inside every MPP `request` (the key the pympp/mppx SDKs use)."""
        route = quote.route.partition(" ")[2] if " " in quote.route else quote.route
        return {"http_method": quote.method, "resource": quote.path, "route": route}

    def mpp_challenges(
        self, quote: Quote, offers: Sequence[Offer], *, realm: str, now: float
    ) -> list[MppChallenge]:
        expires = rfc3339(now + self.ttl)
        out = []
        for offer in offers:
            if offer.mpp is None:
                continue
            request = encode_json_param({**offer.mpp.request, "_mppx_scope": self.scope(quote)})
            # A random opaque nonce makes every challenge unique: the EIP-3009 nonce is derived from the id,
            # so two concurrent calls by one payer must never be handed the same challenge.
            opaque = encode_json_param({"_mpp_nonce": secrets.token_hex(16)})
            cid = challenge_id(
                self.secret, realm, offer.mpp.method, offer.mpp.intent, request, expires, None, opaque
            )
            out.append(
                MppChallenge(
                    id=cid,
                    realm=realm,
                    method=offer.mpp.method,
                    intent=offer.mpp.intent,
                    request=request,
                    description=quote.description or None,
                    expires=expires,
                    opaque=opaque,
                )
            )
        return out

    def payment_required(
        self,
        quote: Quote,
        offers: Sequence[Offer],
        *,
        realm: str,
        now: float,
        failure: ErrorAnswer | None = None,
        detail: str | None = None,
        dialect: Dialect | None = None,
        extra_headers: Headers | None = None,
    ) -> Answer:
        """The 402 for `quote`; with `failure`, the answer to a rejected payment in the client's dialect."""
        if failure is None:
            status = 402
            code, v2_error, v1_error = (
                _REQUIRED,
                "PAYMENT-SIGNATURE header is required",
                "X-PAYMENT header is required",
            )
            problem_type, title = "https://paymentauth.org/problems/payment-required", _TITLE_402
            detail = detail or f"Payment is required for {quote.method} {quote.path}."
        else:
            status = failure.mpp_status if dialect == "mpp" else failure.status
            code = v2_error = v1_error = failure.invalid_reason
            problem_type, title = failure.problem_type, failure.title
            detail = detail or title
        # MPP answers a replay with 403 and no fresh challenge: the client must not be invited to pay again.
        challenges = [] if status == 403 else self.mpp_challenges(quote, offers, realm=realm, now=now)
        resource = ResourceInfo(
            url=quote.url, description=quote.description or None, mime_type=quote.mime_type
        )
        v2 = PaymentRequired(error=v2_error, resource=resource, accepts=[o.requirements for o in offers])
        problem = ProblemDetails(
            type=problem_type,
            title=title,
            status=status,
            detail=detail,
            challenge_id=challenges[0].id if challenges else None,
            invalid_reason=None if failure is None else code,
            x402_version=1,
            error=v1_error,
            accepts=[_v1(o, quote) for o in offers],
        )
        headers: Headers = [
            (b"content-type", PROBLEM_CONTENT_TYPE.encode()),
            (b"cache-control", b"no-store"),
            (b"payment-required", encode_payment_required(v2).encode()),
        ]
        headers.extend((b"www-authenticate", format_www_authenticate(ch).encode()) for ch in challenges)
        headers.extend(extra_headers or ())
        return Answer(status=status, headers=headers, body=encode_problem(problem))


def _v1(offer: Offer, quote: Quote) -> PaymentRequirementsV1:
    r = offer.requirements
    return PaymentRequirementsV1(
        scheme=r.scheme,
        network=v1_network(r.network),
        max_amount_required=r.amount,
        resource=quote.url,
        description=quote.description,
        mime_type=quote.mime_type,
        pay_to=r.pay_to,
        max_timeout_seconds=r.max_timeout_seconds,
        asset=r.asset,
        extra=r.extra or None,
    )


def receipt_headers(
    dialect: Dialect, verified: Verified, *, tx_hash: str, now: float, challenge: MppChallenge | None
) -> tuple[Headers, bytes]:
    """The headers of a paid response (and the receipt bytes to record), in the dialect the client spoke."""
    if dialect == "mpp":
        chain = verified.network.partition(":")[2]
        receipt = MppReceipt(
            method=challenge.method if challenge else "evm",
            timestamp=rfc3339(now),
            reference=tx_hash or verified.key,
            challenge_id=challenge.id if challenge else None,
            chain_id=int(chain) if chain.isdigit() else None,
        )
        value = format_receipt(receipt)
        name = b"payment-receipt"
    else:
        response = SettleResponse(
            success=True, payer=verified.payer, transaction=tx_hash, network=verified.network
        )
        value = encode_payment_response(response)
        name = b"payment-response" if dialect == "x402v2" else b"x-payment-response"
    raw = value.encode()
    return [(name, raw), (b"cache-control", b"private")], raw


def settle_failure_headers(dialect: Dialect, verified: Verified, code: str) -> Headers:
    """x402 reports a failed settlement in `PAYMENT-RESPONSE` (`success: false`); MPP sends no receipt."""
    if dialect == "mpp":
        return []
    response = SettleResponse(
        success=False, error_reason=code, payer=verified.payer, transaction="", network=verified.network
    )
    name = b"payment-response" if dialect == "x402v2" else b"x-payment-response"
    return [(name, encode_payment_response(response).encode())]
