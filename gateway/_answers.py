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
`error`/`invalidReason`, and every offer again; MPP gets 402 + problem+json + a fresh challenge, a replayed
credential included (the core spec's status-code table: an already-used challenge is 402 `invalid-challenge`
with a fresh challenge). `replay_status=403` answers a replay as pympp does instead: 403, problem type
`verification-failed` and no new challenge, so that an auto-paying agent is not invited to pay twice.
"""

from __future__ import annotations

import secrets
from collections.abc import Sequence
from typing import Literal

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
    b64url_encode,
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

__all__ = ["Answer", "Challenger", "ReplayStatus", "receipt_headers", "settle_failure_headers", "v1_network"]

Headers = list[tuple[bytes, bytes]]
#: How an MPP replay is answered: 402 + fresh challenge (the core spec) or 403 without one (pympp).
ReplayStatus = Literal[402, 403]

_TITLE_402 = "Payment Required"
_PYMPP_REPLAY_TYPE = "https://paymentauth.org/problems/verification-failed"  # pympp's CredentialReplayedError
_PYMPP_REPLAY_TITLE = "Verification Failed"
_REQUIRED = "payment_required"
_V2_REQUIRED = "PAYMENT-SIGNATURE header is required"
_V1_REQUIRED = "X-PAYMENT header is required"
_PROBLEM_CONTENT_TYPE = PROBLEM_CONTENT_TYPE.encode()
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


class _Static:
    """The parts of a route's 402 that are the same for every request, encoded once: the JCS + base64url
    MPP `request` of each offer (RFC 8785 canonicalisation is slow, pure Python), the v1 `accepts`, and
    the `PAYMENT-REQUIRED` header of a plain 402. Only the MPP challenge (fresh nonce, expiry, HMAC id) and
    the body carrying its id are made per request."""

    __slots__ = ("accepts_v1", "offers", "payment_required", "requests")

    def __init__(self, quote: Quote, offers: Sequence[Offer]) -> None:
        self.offers = tuple(offers)
        scope = Challenger.scope(quote)
        self.requests = [
            (offer.mpp, encode_json_param({**offer.mpp.request, "_mppx_scope": scope}))
            for offer in offers
            if offer.mpp is not None
        ]
        self.accepts_v1 = [_v1(o, quote) for o in offers]
        v2 = PaymentRequired(
            error=_V2_REQUIRED, resource=_resource(quote), accepts=[o.requirements for o in offers]
        )
        self.payment_required = encode_payment_required(v2).encode()


#: Distinct quotes (routes x paths x hosts) whose 402 parts are kept; past it the cache starts over, so a
#: client making up query strings cannot grow it without bound.
_STATIC_LIMIT = 1024


class Challenger:
    """Builds 402s. MPP challenge ids are HMACs under `secret` (the first of several while rotating)."""

    def __init__(self, secret: bytes, *, ttl: float, replay_status: ReplayStatus = 402) -> None:
        if replay_status not in (402, 403):
            raise ValueError(f"an MPP replay is answered with 402 or 403, not {replay_status!r}")
        self.secret = secret
        self.ttl = ttl
        self.replay_status = replay_status
        self._static: dict[Quote, _Static] = {}
        self._expires: tuple[int, str] = (-1, "")

    def _prepared(self, quote: Quote, offers: Sequence[Offer]) -> _Static:
        static = self._static.get(quote)
        # Offers are compared by value, so a cached entry can never stand in for other offers.
        if static is None or static.offers != tuple(offers):
            if len(self._static) >= _STATIC_LIMIT:
                self._static.clear()
            static = self._static[quote] = _Static(quote, offers)
        return static

    def _expiry(self, now: float) -> str:
        # The expiry has whole-second resolution: format it once per second.
        second = int(now + self.ttl)
        if self._expires[0] != second:
            self._expires = (second, rfc3339(second))
        return self._expires[1]

    @staticmethod
    def scope(quote: Quote) -> dict[str, str]:
        """The route binding put inside every MPP `request` (the key the pympp/mppx SDKs use)."""
        route = quote.route.partition(" ")[2] if " " in quote.route else quote.route
        return {"http_method": quote.method, "resource": quote.path, "route": route}

    def mpp_challenges(
        self, quote: Quote, offers: Sequence[Offer], *, realm: str, now: float
    ) -> list[MppChallenge]:
        return self._challenges(self._prepared(quote, offers), quote, realm=realm, now=now)

    def _challenges(self, static: _Static, quote: Quote, *, realm: str, now: float) -> list[MppChallenge]:
        expires = self._expiry(now)
        out = []
        for mpp, request in static.requests:
            # A random opaque nonce makes every challenge unique: the EIP-3009 nonce is derived from the id,
            # so two concurrent calls by one payer must never be handed the same challenge. The JCS form of
            # {"_mpp_nonce": <hex>} is written out directly (one key, no characters to escape).
            opaque = b64url_encode(b'{"_mpp_nonce":"' + secrets.token_hex(16).encode() + b'"}')
            cid = challenge_id(self.secret, realm, mpp.method, mpp.intent, request, expires, None, opaque)
            out.append(
                MppChallenge(
                    id=cid,
                    realm=realm,
                    method=mpp.method,
                    intent=mpp.intent,
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
            code, v2_error, v1_error = _REQUIRED, _V2_REQUIRED, _V1_REQUIRED
            problem_type, title = "https://paymentauth.org/problems/payment-required", _TITLE_402
            detail = detail or f"Payment is required for {quote.method} {quote.path}."
        else:
            status = failure.mpp_status if dialect == "mpp" else failure.status
            code = v2_error = v1_error = failure.invalid_reason
            problem_type, title = failure.problem_type, failure.title
            if dialect == "mpp" and failure.replayed and self.replay_status == 403:
                status, problem_type, title = 403, _PYMPP_REPLAY_TYPE, _PYMPP_REPLAY_TITLE
            detail = detail or title
        static = self._prepared(quote, offers)
        # A 403 (pympp's replay answer) carries no fresh challenge: the client must not be invited to pay.
        challenges = [] if status == 403 else self._challenges(static, quote, realm=realm, now=now)
        if failure is None:
            payment_required = static.payment_required
        else:
            accepts = [o.requirements for o in offers]
            v2 = PaymentRequired(error=v2_error, resource=_resource(quote), accepts=accepts)
            payment_required = encode_payment_required(v2).encode()
        problem = ProblemDetails(
            type=problem_type,
            title=title,
            status=status,
            detail=detail,
            challenge_id=challenges[0].id if challenges else None,
            invalid_reason=None if failure is None else code,
            x402_version=1,
            error=v1_error,
            accepts=static.accepts_v1,
        )
        headers: Headers = [
            (b"content-type", _PROBLEM_CONTENT_TYPE),
            (b"cache-control", b"no-store"),
            (b"payment-required", payment_required),
        ]
        headers.extend((b"www-authenticate", format_www_authenticate(ch).encode()) for ch in challenges)
        headers.extend(extra_headers or ())
        return Answer(status=status, headers=headers, body=encode_problem(problem))


def _resource(quote: Quote) -> ResourceInfo:
    return ResourceInfo(url=quote.url, description=quote.description or None, mime_type=quote.mime_type)


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
    dialect: Dialect,
    verified: Verified,
    *,
    tx_hash: str,
    now: float,
    challenge: MppChallenge | None,
    amount: int | None = None,
) -> tuple[Headers, bytes]:
    """The headers of a paid response (and the receipt bytes to record), in the dialect the client spoke.

    `amount`: a metered payment's actual charge, carried as x402 `SettleResponse.amount`."""
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
            success=True,
            payer=verified.payer,
            transaction=tx_hash,
            network=verified.network,
            amount=None if amount is None else str(amount),
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
