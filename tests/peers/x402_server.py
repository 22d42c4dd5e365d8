"""Peer: a resource server built only from the official `x402` package (runs under .venv-peers).

The app is a plain Starlette app with the official ``PaymentMiddlewareASGI`` and an
``x402ResourceServer``. Its facilitator is in-process, one of:

* ``chain``: the official ``x402Facilitator`` with ``register_exact_evm_facilitator`` and a
  ``FacilitatorWeb3Signer`` on the devnet, which verifies (ecrecover + eth_call simulation) and
  broadcasts ``transferWithAuthorization``;
* ``stub``: verify ok / settle ok without a chain (throughput baseline only).

Either way the facilitator is wrapped in a recorder, so ``GET /_peer/log`` returns every
payload and requirements object the middleware handed to the facilitator, with the result: when
a payment from our client is refused, that log shows exactly what the official side received.

    python tests/peers/x402_server.py --fd 3 --rpc-url URL --asset TOKEN --pay-to ADDR \
        --amount 1000 --facilitator-key 0x...            # name/version read from eip712Domain()
"""

from __future__ import annotations

import argparse
import os
from typing import Any

from _peer import add_server_args, emit, serve, token_domain
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route
from x402.http.middleware.fastapi import PaymentMiddlewareASGI
from x402.http.types import PaymentOption, RouteConfig
from x402.mechanisms.evm.exact import ExactEvmServerScheme, register_exact_evm_facilitator
from x402.mechanisms.evm.signers import FacilitatorWeb3Signer
from x402.schemas import (
    PaymentPayload,
    PaymentRequirements,
    SettleResponse,
    SupportedKind,
    SupportedResponse,
    VerifyResponse,
)

from x402 import x402Facilitator, x402ResourceServer

STUB_TX = "0x" + "ab" * 32


class StubFacilitator:
    """Says yes to everything, touches no chain: measures the middleware alone."""

    def __init__(self, network: str) -> None:
        self.network = network

    async def verify(self, payload: PaymentPayload, requirements: PaymentRequirements) -> VerifyResponse:
        return VerifyResponse(is_valid=True, payer=_payer(payload))

    async def settle(self, payload: PaymentPayload, requirements: PaymentRequirements) -> SettleResponse:
        return SettleResponse(success=True, transaction=STUB_TX, network=self.network, payer=_payer(payload))

    def get_supported(self) -> SupportedResponse:
        return SupportedResponse(kinds=[SupportedKind(x402_version=2, scheme="exact", network=self.network)])


class RecordingFacilitator:
    """Forwards to a facilitator and keeps what went in and came out (for /_peer/log)."""

    def __init__(self, inner: Any, keep: bool = True) -> None:
        self.inner = inner
        self.keep = keep
        self.log: list[dict[str, Any]] = []

    def _record(self, op: str, payload: Any, requirements: Any, result: Any) -> None:
        if self.keep:
            self.log.append(
                {
                    "op": op,
                    "payload": payload.model_dump(by_alias=True, exclude_none=True),
                    "requirements": requirements.model_dump(by_alias=True, exclude_none=True),
                    "result": result.model_dump(by_alias=True, exclude_none=True),
                }
            )

    async def verify(self, payload: Any, requirements: Any) -> Any:
        result = await self.inner.verify(payload, requirements)
        self._record("verify", payload, requirements, result)
        return result

    async def settle(self, payload: Any, requirements: Any) -> Any:
        result = await self.inner.settle(payload, requirements)
        self._record("settle", payload, requirements, result)
        return result

    def get_supported(self) -> Any:
        return self.inner.get_supported()


def _payer(payload: Any) -> str | None:
    inner = getattr(payload, "payload", None) or {}
    authorization = inner.get("authorization") if isinstance(inner, dict) else None
    return authorization.get("from") if isinstance(authorization, dict) else None


def make_facilitator(mode: str, network: str, rpc_url: str | None, facilitator_key: str | None) -> Any:
    if mode == "stub":
        return StubFacilitator(network)
    if not rpc_url or not facilitator_key:
        raise SystemExit("--settle chain needs --rpc-url and --facilitator-key")
    facilitator = x402Facilitator()
    register_exact_evm_facilitator(
        facilitator, FacilitatorWeb3Signer(facilitator_key, rpc_url), networks=network
    )
    return facilitator


def build_app(
    *,
    facilitator: Any,
    network: str,
    asset: str,
    pay_to: str,
    amount: str,
    name: str,
    version: str,
    max_timeout_seconds: int = 60,
    record: bool = True,
) -> tuple[Starlette, RecordingFacilitator]:
    recorder = RecordingFacilitator(facilitator, keep=record)
    server = x402ResourceServer(recorder)
    server.register(network, ExactEvmServerScheme())
    option = PaymentOption(
        scheme="exact",
        pay_to=pay_to,
        price={"amount": amount, "asset": asset, "extra": {"name": name, "version": version}},
        network=network,
        max_timeout_seconds=max_timeout_seconds,
    )
    routes = {
        "GET /paid": RouteConfig(
            accepts=option, description="paid peer resource", mime_type="application/json"
        ),
        "POST /paid": RouteConfig(
            accepts=option, description="paid peer resource", mime_type="application/json"
        ),
    }

    async def paid(request: Request) -> JSONResponse:
        body = (await request.body()).decode("utf-8", "replace") if request.method == "POST" else None
        return JSONResponse({"ok": True, "peer": "x402-official", "echo": body})

    async def health(request: Request) -> JSONResponse:
        return JSONResponse({"ok": True})

    async def peer_log(request: Request) -> JSONResponse:
        return JSONResponse(recorder.log)

    app = Starlette(
        routes=[
            Route("/paid", paid, methods=["GET", "POST"]),
            Route("/health", health),
            Route("/_peer/log", peer_log),
        ]
    )
    app.add_middleware(PaymentMiddlewareASGI, routes=routes, server=server)
    return app, recorder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_server_args(parser)
    parser.add_argument("--settle", choices=["chain", "stub"], default="chain")
    parser.add_argument("--rpc-url")
    parser.add_argument("--chain-id", type=int, default=31337)
    parser.add_argument("--asset", required=True)
    parser.add_argument("--pay-to", required=True)
    parser.add_argument("--amount", default="1000", help="atomic units")
    parser.add_argument("--name", help="EIP-712 domain name (default: read from eip712Domain())")
    parser.add_argument("--version", help="EIP-712 domain version (default: read from eip712Domain())")
    parser.add_argument("--facilitator-key", default=os.environ.get("PEER_FACILITATOR_KEY"))
    parser.add_argument("--max-timeout", type=int, default=60)
    args = parser.parse_args()

    network = f"eip155:{args.chain_id}"
    name, version = args.name, args.version
    if name is None or version is None:
        if not args.rpc_url:
            raise SystemExit("--name/--version or --rpc-url are required")
        name, version = token_domain(args.rpc_url, args.asset)
    facilitator = make_facilitator(args.settle, network, args.rpc_url, args.facilitator_key)
    app, _ = build_app(
        facilitator=facilitator,
        network=network,
        asset=args.asset,
        pay_to=args.pay_to,
        amount=args.amount,
        name=name,
        version=version,
        max_timeout_seconds=args.max_timeout,
    )
    serve(app, args)
    emit({"stopped": True})


if __name__ == "__main__":
    main()
