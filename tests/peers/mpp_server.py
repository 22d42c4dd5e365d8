"""Peer: an MPP server built only from `pympp` (runs under .venv-peers).

``Mpp`` with the pympp ``evm`` server ``charge`` method on the devnet token, ``route_binding=
"resource"`` (so it also accepts standard x402 clients on the ``PAYMENT-REQUIRED`` it emits),
and a ``settle`` hook that broadcasts ``transferWithAuthorization`` with web3 and waits for a
successful receipt. ``GET /paid`` is wrapped with pympp's ``@pay`` decorator.

``GET /_peer/log`` returns what the server received on ``/paid`` (the decoded ``Authorization:
Payment`` credential or ``PAYMENT-SIGNATURE``) and how it answered (status, challenge, problem
body), so a refusal of our client can be reported with the exact JSON.

    python tests/peers/mpp_server.py --fd 3 --rpc-url URL --currency TOKEN --recipient ADDR \
        --amount 1000 --settler-key 0x...            # name/version read from eip712Domain()
"""

from __future__ import annotations

import argparse
import asyncio
import os
import secrets
from decimal import Decimal
from typing import Any

from _peer import ERC20_ABI, add_server_args, b64json, body_of, emit, serve, token_domain
from eth_account import Account
from mpp.methods.evm import server as evm_server
from mpp.methods.evm.intents import Authorization
from mpp.server import Mpp
from mpp.server.decorator import pay
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from web3 import Web3


class Settler:
    """The ``settle`` hook: one transferWithAuthorization per payment, paid for by the settler key."""

    def __init__(self, rpc_url: str, token: str, key: str) -> None:
        self.w3 = Web3(Web3.HTTPProvider(rpc_url))
        self.account = Account.from_key(key)
        self.token = self.w3.eth.contract(address=Web3.to_checksum_address(token), abi=ERC20_ABI)
        self.lock = asyncio.Lock()

    def _send(self, payload: dict[str, Any]) -> str:
        signature = bytes.fromhex(payload["signature"].removeprefix("0x"))
        v = signature[64] if signature[64] >= 27 else signature[64] + 27
        call = self.token.functions.transferWithAuthorization(
            Web3.to_checksum_address(payload["from"]),
            Web3.to_checksum_address(payload["to"]),
            int(payload["value"]),
            int(payload["validAfter"]),
            int(payload["validBefore"]),
            bytes.fromhex(payload["nonce"].removeprefix("0x")),
            v,
            signature[:32],
            signature[32:64],
        )
        tx = call.build_transaction(
            {
                "from": self.account.address,
                "nonce": self.w3.eth.get_transaction_count(self.account.address, "pending"),
                "chainId": self.w3.eth.chain_id,
            }
        )
        signed = self.account.sign_transaction(tx)
        tx_hash = self.w3.eth.send_raw_transaction(signed.raw_transaction)
        receipt = self.w3.eth.wait_for_transaction_receipt(tx_hash, timeout=60)
        if receipt["status"] != 1:
            raise RuntimeError(f"transferWithAuthorization reverted: {tx_hash.hex()}")
        return "0x" + bytes(tx_hash).hex().removeprefix("0x")

    async def __call__(self, authorization: Authorization) -> str:
        async with self.lock:  # one settler key: keep its nonces in order
            return await asyncio.to_thread(self._send, authorization.payload)


class Recorder:
    """Pure ASGI wrapper that logs what /paid received and answered."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self.log: list[dict[str, Any]] = []

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] != "/paid":
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        entry: dict[str, Any] = {"method": scope["method"], "sent": {}}
        auth = headers.get("authorization", "")
        if auth.lower().startswith("payment "):
            entry["sent"]["authorization"] = _safe(auth.split(" ", 1)[1])
        if "payment-signature" in headers:
            entry["sent"]["payment-signature"] = _safe(headers["payment-signature"])
        body = bytearray()

        async def capture(message: Message) -> None:
            if message["type"] == "http.response.start":
                entry["status"] = message["status"]
                entry["received"] = [
                    (k.decode("latin-1"), v.decode("latin-1")) for k, v in message.get("headers", [])
                ]
            elif message["type"] == "http.response.body":
                body.extend(message.get("body", b""))
                if not message.get("more_body"):
                    entry["body"] = body_of(bytes(body))
                    self.log.append(entry)
            await send(message)

        await self.app(scope, receive, capture)


def _safe(value: str) -> Any:
    try:
        return b64json(value)
    except ValueError:
        return {"undecodable": value}


def display_amount(atomic: str, decimals: int) -> str:
    return format(Decimal(int(atomic)) / (Decimal(10) ** decimals), "f")


def build_app(args: argparse.Namespace) -> Recorder:
    name, version = args.name, args.version
    if name is None or version is None:
        name, version = token_domain(args.rpc_url, args.currency)
    method = evm_server.charge(
        currency=args.currency,
        recipient=args.recipient,
        chain_id=args.chain_id,
        decimals=args.decimals,
        authorization={"name": name, "version": version},
        settle=Settler(args.rpc_url, args.currency, args.settler_key),
        route_binding="resource",
    )
    server = Mpp(methods=method, realm=args.realm, secret_key=args.secret or secrets.token_hex(32))
    amount = display_amount(args.amount, args.decimals)

    @pay(server.charge(amount=amount))
    async def paid(request: Request, credential: Any, receipt: Any) -> JSONResponse:
        return JSONResponse(
            {"ok": True, "peer": "pympp", "payer": receipt.payer, "reference": receipt.reference}
        )

    async def health(request: Request) -> JSONResponse:
        return JSONResponse({"ok": True})

    recorder: Recorder

    async def peer_log(request: Request) -> JSONResponse:
        return JSONResponse(recorder.log)

    app = Starlette(routes=[Route("/paid", paid), Route("/health", health), Route("/_peer/log", peer_log)])
    recorder = Recorder(app)
    return recorder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_server_args(parser)
    parser.add_argument("--rpc-url", required=True)
    parser.add_argument("--chain-id", type=int, default=31337)
    parser.add_argument("--currency", required=True)
    parser.add_argument("--decimals", type=int, default=6)
    parser.add_argument("--recipient", required=True)
    parser.add_argument("--amount", default="1000", help="atomic units")
    parser.add_argument("--name")
    parser.add_argument("--version")
    parser.add_argument("--realm", default="peer.localhost")
    parser.add_argument("--secret", default=os.environ.get("MPP_SECRET_KEY"))
    parser.add_argument("--settler-key", default=os.environ.get("PEER_SETTLER_KEY"), required=False)
    args = parser.parse_args()
    if not args.settler_key:
        raise SystemExit("--settler-key or $PEER_SETTLER_KEY is required")
    serve(build_app(args), args)
    emit({"stopped": True})


if __name__ == "__main__":
    main()
