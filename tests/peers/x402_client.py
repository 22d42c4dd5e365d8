"""Peer: the official `x402` httpx client pays a URL N times (runs under .venv-peers).

    python tests/peers/x402_client.py --url URL --asset TOKEN [--n 3] [--mode v2|v1] [--chain-id 31337]
        [--also-chain-id N ...] [--prefer-network eip155:N]
        (key from --private-key or $PEER_PRIVATE_KEY)

``--also-chain-id N[:TOKEN]`` registers the v2 ``exact`` client on more networks (TOKEN: that chain's token,
default ``--asset``);
``--prefer-network`` adds the official ``prefer_network`` policy, so the client itself picks the network
of a route priced on several.

``--mode v2`` (default): ``x402Client`` + ``ExactEvmScheme(Account)`` registered for
``eip155:<chain-id>``, spend controls allow-listing only the given asset with a per-payment cap,
wrapped in the official ``x402AsyncTransport``. The server is free to offer v1 and MPP too; the
client reads ``PAYMENT-REQUIRED`` and answers ``PAYMENT-SIGNATURE``.

``--asset default``: the SDK's own default asset for ``eip155:<chain-id>`` (``get_default_asset``, the
table of real networks' USDC the SDK prices ``"$0.10"`` in); a network the SDK has none for is refused
before any request (``{"refused": reason, "results": []}``).

``--mode v1``: a legacy client. The official client picks v2 whenever a ``PAYMENT-REQUIRED``
header is present, so the recording transport hides that header (and ``WWW-Authenticate``) from
it: the client then reads the v1 JSON body, builds a ``PaymentPayloadV1`` and sends ``X-PAYMENT``,
all through the official ``x402Client`` v1 path. The official ``ExactEvmSchemeV1`` resolves chain
ids from a fixed table of legacy names (``V1_NETWORK_CHAIN_IDS``: base, base-sepolia, ...), which
has no devnet entry; for a network outside that table the peer registers ``DevnetExactEvmSchemeV1``,
the same v1 signing recipe (validAfter=now-600, the official ``build_typed_data_for_signing``) with
the chain id taken from ``eip155:<id>`` or ``--chain-id``.

Output (last line, JSON): ``{"results": [{"status", "payment_response", "body", ...}], "exchanges":
[every request/response pair on the wire, payment headers decoded]}``.
"""

from __future__ import annotations

import argparse
import asyncio
import time
from typing import Any

import httpx
from _peer import b64json, body_of, emit, private_key
from eth_account import Account
from x402.http import decode_payment_response_header
from x402.http.clients.httpx import x402AsyncTransport
from x402.mechanisms.evm.constants import SCHEME_EXACT
from x402.mechanisms.evm.default_assets import get_default_asset
from x402.mechanisms.evm.eip712 import build_typed_data_for_signing
from x402.mechanisms.evm.exact import ExactEvmScheme
from x402.mechanisms.evm.exact.v1.client import ExactEvmSchemeV1
from x402.mechanisms.evm.signers import EthAccountSigner
from x402.mechanisms.evm.types import ExactEIP3009Authorization, ExactEIP3009Payload, TypedDataField
from x402.mechanisms.evm.upto import UptoEvmClientScheme
from x402.mechanisms.evm.utils import create_nonce
from x402.mechanisms.evm.v1.constants import V1_NETWORK_CHAIN_IDS
from x402.schemas.v1 import PaymentRequirementsV1

from x402 import prefer_network, x402Client

REQUEST_HEADERS = ("payment-signature", "x-payment", "authorization")
RESPONSE_HEADERS = ("payment-required", "payment-response", "x-payment-response", "www-authenticate")


class RecordingTransport(httpx.AsyncBaseTransport):
    """Keeps every exchange; in v1 mode hides the v2/MPP challenge headers from the client above."""

    def __init__(self, inner: httpx.AsyncBaseTransport, hide_v2: bool) -> None:
        self.inner = inner
        self.hide_v2 = hide_v2
        self.exchanges: list[dict[str, Any]] = []

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        response = await self.inner.handle_async_request(request)
        content = await response.aread()
        sent = {h: _decode(h, request.headers.get(h)) for h in REQUEST_HEADERS if h in request.headers}
        got = {h: _decode(h, response.headers.get(h)) for h in RESPONSE_HEADERS if h in response.headers}
        self.exchanges.append(
            {
                "method": request.method,
                "url": str(request.url),
                "sent": sent,
                "status": response.status_code,
                "received": got,
                "body": body_of(content),
            }
        )
        headers = [
            (k, v)
            for k, v in response.headers.multi_items()
            if not (self.hide_v2 and k.lower() in ("payment-required", "www-authenticate"))
        ]
        return httpx.Response(
            response.status_code, headers=headers, content=content, extensions=response.extensions
        )

    async def aclose(self) -> None:
        await self.inner.aclose()


def _decode(header: str, value: str | None) -> Any:
    if value is None or header in ("www-authenticate", "authorization"):
        return value
    try:
        return b64json(value)
    except ValueError:
        return {"undecodable": value}


class DevnetExactEvmSchemeV1:
    """The v1 `exact` client recipe for a chain outside the official legacy-name table."""

    scheme = SCHEME_EXACT

    def __init__(self, account: Any, chain_id: int) -> None:
        self._signer = EthAccountSigner(account)
        self._chain_id = chain_id

    @staticmethod
    def find_default_asset(asset: str, network: str) -> None:
        return None

    def create_payment_payload(self, requirements: PaymentRequirementsV1) -> dict[str, Any]:
        now = int(time.time())
        authorization = ExactEIP3009Authorization(
            from_address=self._signer.address,
            to=requirements.pay_to,
            value=requirements.max_amount_required,
            valid_after=str(now - 600),
            valid_before=str(now + (requirements.max_timeout_seconds or 600)),
            nonce=create_nonce(),
        )
        extra = requirements.extra or {}
        domain, types, primary, message = build_typed_data_for_signing(
            authorization, self._chain_id, requirements.asset, extra["name"], extra.get("version", "1")
        )
        fields = {k: [TypedDataField(name=f["name"], type=f["type"]) for f in v] for k, v in types.items()}
        signature = "0x" + self._signer.sign_typed_data(domain, fields, primary, message).hex()
        return ExactEIP3009Payload(authorization=authorization, signature=signature).to_dict()


def official_receipt(value: str | None) -> Any:
    """The receipt header decoded by the official SDK (``decode_payment_response_header`` into its
    pydantic ``SettleResponse``): proof that the official client understands it, not just base64 JSON."""
    if value is None:
        return None
    try:
        return decode_payment_response_header(value).model_dump(by_alias=True, exclude_none=True)
    except Exception as error:
        return {"official_decode_error": f"{type(error).__name__}: {error}", "raw": _decode("x", value)}


def chain_id_of(network: str, fallback: int) -> int:
    if network.startswith("eip155:"):
        return int(network.split(":", 1)[1])
    return V1_NETWORK_CHAIN_IDS.get(network, fallback)


async def discover_v1_networks(url: str, method: str) -> list[str]:
    """What a v1 user would look up by hand: the networks the server's v1 body names."""
    async with httpx.AsyncClient() as plain:
        response = await plain.request(method, url)
    try:
        body = response.json()
    except ValueError:
        return []
    if not isinstance(body, dict) or body.get("x402Version") != 1:
        return []
    return sorted({str(a.get("network")) for a in body.get("accepts", []) if isinstance(a, dict)})


async def run(args: argparse.Namespace) -> dict[str, Any]:
    account = Account.from_key(private_key(args.private_key))
    network = f"eip155:{args.chain_id}"
    if args.asset == "default":
        try:
            args.asset = get_default_asset(network)["asset"]
        except ValueError as error:
            return {"payer": account.address, "refused": str(error), "results": [], "exchanges": []}
    client = x402Client()
    allowed = [{"network": network, "asset": args.asset, "max_amount_per_payment": args.max_amount}]
    if args.mode == "v2":
        client.register(network, ExactEvmScheme(signer=account))
        for more in args.also_chain_id:  # N, or N:TOKEN when that chain's token has another address
            chain_id, _, asset = more.partition(":")
            client.register(f"eip155:{chain_id}", ExactEvmScheme(signer=account))
            allowed.append(
                {
                    "network": f"eip155:{chain_id}",
                    "asset": asset or args.asset,
                    "max_amount_per_payment": args.max_amount,
                }
            )
        if args.prefer_network:
            client.register_policy(prefer_network(args.prefer_network))
        if args.upto:  # the official `upto` client: Permit2 witness signatures (approve Permit2 first)
            client.register(network, UptoEvmClientScheme(account))
    else:
        for v1_network in await discover_v1_networks(args.url, args.method):
            if v1_network in V1_NETWORK_CHAIN_IDS:
                client.register_v1(v1_network, ExactEvmSchemeV1(account))
            else:
                client.register_v1(
                    v1_network, DevnetExactEvmSchemeV1(account, chain_id_of(v1_network, args.chain_id))
                )
            allowed.append(
                {"network": v1_network, "asset": args.asset, "max_amount_per_payment": args.max_amount}
            )
    client.set_spend_controls({"allowed_assets": allowed})  # type: ignore[typeddict-item]

    recorder = RecordingTransport(httpx.AsyncHTTPTransport(), hide_v2=args.mode == "v1")
    transport = x402AsyncTransport(client, transport=recorder)
    results: list[dict[str, Any]] = []
    async with httpx.AsyncClient(transport=transport, timeout=60) as http:
        for _ in range(args.n):
            entry: dict[str, Any] = {}
            try:
                content = args.body.encode() if args.body is not None else None
                response = await http.request(args.method, args.url, content=content)
                entry["status"] = response.status_code
                entry["body"] = body_of(response.content)
                entry["payment_response"] = official_receipt(response.headers.get("payment-response"))
                entry["x_payment_response"] = official_receipt(response.headers.get("x-payment-response"))
                entry["cache_control"] = response.headers.get("cache-control")
            except Exception as error:  # reported, not raised: the test decides
                entry["error"] = f"{type(error).__name__}: {error}"
            results.append(entry)
    return {"payer": account.address, "mode": args.mode, "results": results, "exchanges": recorder.exchanges}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--url", required=True)
    parser.add_argument("--n", type=int, default=1)
    parser.add_argument("--mode", choices=["v2", "v1"], default="v2")
    parser.add_argument(
        "--asset", required=True, help="token the spend controls allow-list, or `default` (the SDK's)"
    )
    parser.add_argument("--chain-id", type=int, default=31337)
    parser.add_argument("--max-amount", default="1000000", help="per-payment cap, atomic units")
    parser.add_argument("--private-key")
    parser.add_argument("--method", default="GET")
    parser.add_argument("--body")
    parser.add_argument("--also-chain-id", action="append", default=[], help="N or N:TOKEN (repeatable)")
    parser.add_argument("--prefer-network", help="the official prefer_network policy (CAIP-2)")
    parser.add_argument("--upto", action="store_true", help="also register the official upto client")
    emit(asyncio.run(run(parser.parse_args())))


if __name__ == "__main__":
    main()
