"""A small x402 facilitator HTTP API over one scheme on one network (x402 v2 spec §7):

    POST /verify     {x402Version, paymentPayload, paymentRequirements} -> VerifyResponse
    POST /settle     same body                                          -> SettleResponse
    GET  /supported                                                     -> {kinds, extensions, signers}

It reuses the gateway's scheme (`ExactScheme` over `escrow.ExactEvm`), so a resource server elsewhere (the
official SDK's, for instance) can delegate verification and settlement to it. Payment-level failures are
answered 200 with `isValid: false` / `success: false` and the x402 reason, as facilitators do; a body that
does not decode is a 400.

The relayer pays the gas of every settlement, and the token and its EIP-712 domain come from the request, so
only allow-listed assets are served: a request whose (network, asset, domain name, domain version) is not one
of `assets` is a 400 before any chain call. A 400 is an RFC 9457 problem (application/problem+json) that also
carries the `VerifyResponse` / `SettleResponse` fields, so x402 clients read it either way.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import msgspec
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from x402 import (
    PROBLEM_CONTENT_TYPE,
    FacilitatorRequest,
    FacilitatorRequestV1,
    PaymentRequirements,
    Reason,
    SettleResponse,
    SupportedKind,
    SupportedResponse,
    VerifyResponse,
    evm_chain_id,
    evm_network,
    json_decode,
    json_encode,
    requirements_from_v1,
    requirements_match,
)

from ._answers import v1_network
from ._errors import ConfigurationError, PaymentFailed
from ._pipeline import as_payment_failed
from ._pricing import Asset
from ._scheme import Offer, Presented, Scheme, Verified
from ._store import PaymentStore, StoreError
from ._stores.memory import MemoryStore

__all__ = ["facilitator_app"]

log = logging.getLogger("agentpay.gateway")

#: Default bound of a facilitator request body: a payment and its requirements take a few hundred bytes.
DEFAULT_MAX_BODY_BYTES = 64 << 10


def _json(obj: Any, status: int = 200) -> Response:
    return Response(json_encode(obj), status_code=status, media_type="application/json")


_TITLES = {400: "Bad Request", 413: "Content Too Large", 503: "Service Unavailable"}


def _answer(obj: Any, failure: PaymentFailed) -> Response:
    """The x402 answer `obj` (`isValid`/`success: false`, reason): 200 for a payment that is refused, or,
    for a request that is, a problem document (400, 413, 503) carrying the same fields."""
    status = failure.status_hint
    if status not in _TITLES:
        return _json(obj)
    body = json_decode(json_encode(obj), dict[str, Any])
    body.update(type="about:blank", title=_TITLES[status], status=status, detail=failure.message)
    return Response(json_encode(body), status_code=status, media_type=PROBLEM_CONTENT_TYPE)


async def _read(request: Request, limit: int) -> bytes:
    """The request body, refused (413) past `limit` bytes, declared or streamed."""
    declared = request.headers.get("content-length", "")
    too_large = PaymentFailed(f"the request body exceeds {limit} bytes", status_hint=413)
    # ASCII digits only ("²".isdigit() is true; int() refuses it, and more than 4300 digits)
    if declared.isascii() and declared.isdigit() and (len(declared) > 18 or int(declared) > limit):
        raise too_large
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise too_large
        chunks.append(chunk)
    return b"".join(chunks)


# (network, asset address lower-cased, EIP-712 domain name, version): what the relayer pays gas for.
_Allowed = tuple[str, str, str, str]


class _Facilitator:
    def __init__(
        self, scheme: Scheme, network: str, signers: list[str], store: PaymentStore, allowed: set[_Allowed]
    ) -> None:
        self.scheme, self.network, self.signers, self.store = scheme, network, signers, store
        self.allowed = allowed
        self.max_body_bytes = DEFAULT_MAX_BODY_BYTES
        self.clock: Callable[[], float] = time.time

    def _parse(self, body: bytes) -> tuple[PaymentRequirements, dict[str, Any]]:
        """The requirements to check against (v2 shape) and the scheme payload; raise X402Error."""
        if json_decode(body, dict[str, Any]).get("x402Version") == 1:
            v1 = json_decode(body, FacilitatorRequestV1)
            legacy = requirements_from_v1(v1.payment_requirements)
            network = evm_network(evm_chain_id(legacy.network))  # v1 names the chain ("base-sepolia")
            if v1.payment_payload.scheme != legacy.scheme:
                raise _refused(Reason.UNSUPPORTED_SCHEME, "payload and requirements name other schemes")
            return msgspec.structs.replace(legacy, network=network), v1.payment_payload.payload
        v2 = json_decode(body, FacilitatorRequest)
        if not requirements_match(v2.payment_payload.accepted, v2.payment_requirements):
            raise _refused(Reason.INVALID_PAYMENT_REQUIREMENTS, "accepted differs from the requirements")
        return v2.payment_requirements, v2.payment_payload.payload

    async def _verified(self, request: Request) -> Verified:
        requirements, payload = self._parse(await _read(request, self.max_body_bytes))
        if requirements.scheme != self.scheme.name:
            raise _refused(Reason.UNSUPPORTED_SCHEME, f"scheme {requirements.scheme[:32]!r} unsupported")
        if requirements.network != self.network:
            raise _refused(
                Reason.INVALID_NETWORK, f"network {requirements.network[:64]!r} unsupported", status=400
            )
        name, version = requirements.extra.get("name"), requirements.extra.get("version")
        domain = (name, version) if isinstance(name, str) and isinstance(version, str) else ("", "")
        if (requirements.network, requirements.asset.lower(), *domain) not in self.allowed:
            raise _refused(
                Reason.INVALID_PAYMENT_REQUIREMENTS,
                f"asset {requirements.asset[:64]!r} with this EIP-712 domain is not settled here",
                status=400,
            )
        offer = Offer(scheme=self.scheme.name, requirements=requirements)
        return await self.scheme.verify(offer, Presented(dialect="x402v2", payload=payload), now=self.clock())

    async def verify(self, request: Request) -> Response:
        try:
            verified = await self._verified(request)
        except Exception as exc:
            failure = as_payment_failed(exc, during="verify")
            answer = VerifyResponse(
                is_valid=False, invalid_reason=failure.code, invalid_message=failure.message
            )
            return _answer(answer, failure)
        return _json(VerifyResponse(is_valid=True, payer=verified.payer))

    def _settle_failure(self, code: str, payer: str | None = None) -> SettleResponse:
        return SettleResponse(
            success=False, error_reason=code, payer=payer, transaction="", network=self.network
        )

    async def settle(self, request: Request) -> Response:
        try:
            verified = await self._verified(request)
        except Exception as exc:
            failure = as_payment_failed(exc, during="verify")
            return _answer(self._settle_failure(failure.code), failure)
        # Two concurrent /settle calls for one payment: one broadcasts, the other is told it was used.
        try:
            holder = await self.store.claim(verified.key, ttl=300.0)
        except StoreError as exc:  # nothing was sent: the caller may try again
            failure = as_payment_failed(exc, during="settle")
            return _answer(self._settle_failure(failure.code, verified.payer), failure)
        if holder is None:
            return _json(self._settle_failure(Reason.NONCE_ALREADY_USED, verified.payer))
        try:
            tx_hash = await self.scheme.settle(verified)
        except Exception as exc:
            failure = as_payment_failed(exc, during="settle")
            if failure.status_hint == 402 and failure.code != Reason.SETTLEMENT_PENDING:
                await _quietly(self.store.release(verified.key, holder))
            return _json(self._settle_failure(failure.code, verified.payer))
        # The money has moved: the answer is a success even if the store cannot record it (the chain refuses
        # the nonce from now on, so the claim only saves a failing simulation).
        await _quietly(self.store.finalize(verified.key, keep_until=verified.expires_at))
        amount = str(verified.amount)
        return _json(
            SettleResponse(
                success=True, payer=verified.payer, transaction=tx_hash, network=self.network, amount=amount
            )
        )

    async def supported(self, request: Request) -> Response:
        kinds = [
            SupportedKind(x402_version=2, scheme=self.scheme.name, network=self.network),
            SupportedKind(x402_version=1, scheme=self.scheme.name, network=v1_network(self.network)),
        ]
        return _json(SupportedResponse(kinds=kinds, signers={"eip155:*": self.signers}))


def _refused(code: str, message: str, *, status: int = 402) -> PaymentFailed:
    return PaymentFailed(message, code=code, status_hint=status)


async def _quietly(step: Awaitable[None]) -> None:
    try:
        await step
    except StoreError as exc:
        log.error("facilitator store step failed: %s", exc.message)


def facilitator_app(
    scheme: Scheme,
    *,
    network: str,
    signers: list[str],
    assets: Sequence[Asset],
    store: PaymentStore | None = None,
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    clock: Callable[[], float] = time.time,
) -> Starlette:
    """A Starlette app serving `/verify`, `/settle` and `/supported` for `scheme` on `network`.

    `signers` are the addresses that send settlement transactions (shown in `/supported`). `assets` are the
    only tokens verified and settled: a request naming another asset, or an allowed asset with another
    EIP-712 domain name or version, is a 400 before any chain call, so nobody else's contract runs on the
    relayer's gas. A request body past `max_body_bytes` (default 64 KiB; a payment is a few hundred bytes)
    is a 413, and a store that cannot be reached a 503, both problem documents.
    """
    if not assets:
        raise ConfigurationError("a facilitator needs at least one allowed asset")
    for asset in assets:
        if asset.network != network:
            raise ConfigurationError(f"asset {asset.address} is on {asset.network}, not {network}")
    allowed = {(network, a.address.lower(), a.name, a.version) for a in assets}
    facilitator = _Facilitator(scheme, network, signers, store or MemoryStore(), allowed)
    facilitator.max_body_bytes = max_body_bytes
    facilitator.clock = clock
    return Starlette(
        routes=[
            Route("/verify", facilitator.verify, methods=["POST"]),
            Route("/settle", facilitator.settle, methods=["POST"]),
            Route("/supported", facilitator.supported, methods=["GET"]),
        ]
    )
