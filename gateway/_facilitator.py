"""A small x402 facilitator HTTP API over one scheme on one network (x402 v2 spec §7):

    POST /verify     {x402Version, paymentPayload, paymentRequirements} -> VerifyResponse
    POST /settle     same body                                          -> SettleResponse
    GET  /supported                                                     -> {kinds, extensions, signers}

It reuses the gateway's scheme (`ExactScheme` over `escrow.ExactEvm`), so a resource server elsewhere (the
official SDK's, for instance) can delegate verification and settlement to it. Payment-level failures are
answered 200 with `isValid: false` / `success: false` and the x402 reason, as facilitators do; a body that
does not decode is a 400.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from typing import Any

import msgspec
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from x402 import (
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
from ._errors import PaymentFailed
from ._pipeline import as_payment_failed
from ._scheme import Offer, Presented, Scheme, Verified
from ._store import ClaimLost, MemoryStore, PaymentStore

__all__ = ["facilitator_app"]


def _json(obj: Any, status: int = 200) -> Response:
    return Response(json_encode(obj), status_code=status, media_type="application/json")


class _Facilitator:
    def __init__(self, scheme: Scheme, network: str, signers: list[str], store: PaymentStore) -> None:
        self.scheme, self.network, self.signers, self.store = scheme, network, signers, store
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

    async def _verified(self, body: bytes) -> Verified:
        requirements, payload = self._parse(body)
        if requirements.scheme != self.scheme.name:
            raise _refused(Reason.UNSUPPORTED_SCHEME, f"scheme {requirements.scheme[:32]!r} unsupported")
        if requirements.network != self.network:
            raise _refused(Reason.INVALID_NETWORK, f"network {requirements.network[:64]!r} unsupported")
        offer = Offer(scheme=self.scheme.name, requirements=requirements)
        return await self.scheme.verify(offer, Presented(dialect="x402v2", payload=payload), now=self.clock())

    async def verify(self, request: Request) -> Response:
        try:
            verified = await self._verified(await request.body())
        except Exception as exc:
            failure = as_payment_failed(exc, during="verify")
            answer = VerifyResponse(
                is_valid=False, invalid_reason=failure.code, invalid_message=failure.message
            )
            return _json(answer, 400 if failure.status_hint == 400 else 200)
        return _json(VerifyResponse(is_valid=True, payer=verified.payer))

    def _settle_failure(self, code: str, payer: str | None = None) -> SettleResponse:
        return SettleResponse(
            success=False, error_reason=code, payer=payer, transaction="", network=self.network
        )

    async def settle(self, request: Request) -> Response:
        try:
            verified = await self._verified(await request.body())
        except Exception as exc:
            failure = as_payment_failed(exc, during="verify")
            return _json(self._settle_failure(failure.code), 400 if failure.status_hint == 400 else 200)
        # Two concurrent /settle calls for one payment: one broadcasts, the other is told it was used.
        holder = await self.store.claim(verified.key, ttl=300.0)
        if holder is None:
            return _json(self._settle_failure(Reason.NONCE_ALREADY_USED, verified.payer))
        try:
            tx_hash = await self.scheme.settle(verified)
        except Exception as exc:
            failure = as_payment_failed(exc, during="settle")
            if failure.status_hint == 402 and failure.code != Reason.SETTLEMENT_PENDING:
                with contextlib.suppress(ClaimLost):  # lapsed: nothing of ours left to free
                    await self.store.release(verified.key, holder)
            return _json(self._settle_failure(failure.code, verified.payer))
        await self.store.finalize(verified.key, keep_until=verified.expires_at)
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


def _refused(code: str, message: str) -> PaymentFailed:
    return PaymentFailed(message, code=code)


def facilitator_app(
    scheme: Scheme,
    *,
    network: str,
    signers: list[str],
    store: PaymentStore | None = None,
    clock: Callable[[], float] = time.time,
) -> Starlette:
    """A Starlette app serving `/verify`, `/settle` and `/supported` for `scheme` on `network`.

    `signers` are the addresses that send settlement transactions (shown in `/supported`).
    """
    facilitator = _Facilitator(scheme, network, signers, store or MemoryStore())
    facilitator.clock = clock
    return Starlette(
        routes=[
            Route("/verify", facilitator.verify, methods=["POST"]),
            Route("/settle", facilitator.settle, methods=["POST"]),
            Route("/supported", facilitator.supported, methods=["GET"]),
        ]
    )
