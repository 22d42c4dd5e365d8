"""Peer: the `pympp` client pays a URL with a native ``evm/charge`` credential (runs under .venv-peers).

    python tests/peers/mpp_client.py --url URL --currency TOKEN [--n 1] [--chain-id 31337] \
        [--name N --version V | --rpc-url URL]      (key from --private-key or $PEER_PRIVATE_KEY)

``mpp.client.PaymentTransport`` (what ``mpp.client.Mpp`` wraps) with
``mpp.methods.evm.client.charge`` (EIP-3009 ``authorization`` credentials) for the devnet token,
around a recording transport. For every credential it sent, the output lists the challenge
``id``/``realm`` it answered and three hashes: the nonce it signed, pympp's own
``challenge_hash(id, realm)`` and the spec's (draft-evm-charge-00, mppx)
``keccak256(utf8(id || realm))``. pympp 0.16 signs ``keccak256(json.dumps([id, realm]))``, so the
first two agree and the third differs.

Output (last line, JSON): ``{"results": [...], "credentials": [...], "exchanges": [...]}``.
"""

from __future__ import annotations

import argparse
import asyncio
from typing import Any

import httpx
from _peer import b64json, body_of, emit, private_key, token_domain
from eth_account import Account
from eth_utils.crypto import keccak
from mpp import Challenge, Receipt
from mpp.client import PaymentTransport
from mpp.methods.evm import client as evm_client
from mpp.methods.evm._eip3009 import challenge_hash


def spec_challenge_hash(challenge_id: str, realm: str) -> str:
    """draft-evm-charge-00: keccak256(abi.encodePacked(id, realm)) of the two UTF-8 strings."""
    return "0x" + keccak((challenge_id + realm).encode("utf-8")).hex()


class RecordingTransport(httpx.AsyncBaseTransport):
    def __init__(self, inner: httpx.AsyncBaseTransport) -> None:
        self.inner = inner
        self.exchanges: list[dict[str, Any]] = []
        self.credentials: list[dict[str, Any]] = []
        self._last_challenges: list[Challenge] = []

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        auth = request.headers.get("authorization", "")
        sent: dict[str, Any] = {}
        if auth.lower().startswith("payment "):
            credential = b64json(auth.split(" ", 1)[1])
            sent["authorization"] = credential
            self.credentials.append(self._describe(credential))
        if "accept-payment" in request.headers:
            sent["accept-payment"] = request.headers["accept-payment"]
        response = await self.inner.handle_async_request(request)
        content = await response.aread()
        challenges = response.headers.get_list("www-authenticate")
        self._last_challenges = []
        for header in challenges:
            try:
                self._last_challenges.append(Challenge.from_www_authenticate(header))
            except Exception:  # several challenges on one line: pympp splits them itself
                pass
        self.exchanges.append(
            {
                "method": request.method,
                "url": str(request.url),
                "sent": sent,
                "status": response.status_code,
                "www_authenticate": challenges,
                "payment_receipt": _maybe_b64(response.headers.get("payment-receipt")),
                "payment_response": _maybe_b64(response.headers.get("payment-response")),
                "body": body_of(content),
            }
        )
        return httpx.Response(
            response.status_code,
            headers=response.headers.multi_items(),
            content=content,
            extensions=response.extensions,
        )

    @staticmethod
    def _describe(credential: Any) -> dict[str, Any]:
        challenge = credential.get("challenge", {}) if isinstance(credential, dict) else {}
        payload = credential.get("payload", {}) if isinstance(credential, dict) else {}
        cid, realm = str(challenge.get("id", "")), str(challenge.get("realm", ""))
        return {
            "challenge_id": cid,
            "realm": realm,
            "method": challenge.get("method"),
            "intent": challenge.get("intent"),
            "source": credential.get("source") if isinstance(credential, dict) else None,
            "payload": payload,
            "nonce": payload.get("nonce") if isinstance(payload, dict) else None,
            "pympp_challenge_hash": challenge_hash(cid, realm),
            "spec_challenge_hash": spec_challenge_hash(cid, realm),
        }

    async def aclose(self) -> None:
        await self.inner.aclose()


def pympp_receipt(value: str | None) -> Any:
    """``Payment-Receipt`` parsed by pympp (``Receipt.from_payment_receipt``), or why it could not be."""
    if value is None:
        return None
    try:
        receipt = Receipt.from_payment_receipt(value)
    except Exception as error:
        return {"pympp_parse_error": f"{type(error).__name__}: {error}", "raw": _maybe_b64(value)}
    return {
        "status": receipt.status,
        "method": receipt.method,
        "reference": receipt.reference,
        "timestamp": str(receipt.timestamp),
        "raw": _maybe_b64(value),
    }


def _maybe_b64(value: str | None) -> Any:
    try:
        return b64json(value)
    except ValueError:
        return {"undecodable": value}


async def run(args: argparse.Namespace) -> dict[str, Any]:
    account = Account.from_key(private_key(args.private_key))
    name, version = args.name, args.version
    if name is None or version is None:
        if not args.rpc_url:
            raise SystemExit("--name/--version or --rpc-url are required")
        name, version = token_domain(args.rpc_url, args.currency)
    method = evm_client.charge(
        currency=args.currency,
        account=account,
        chain_id=args.chain_id,
        decimals=args.decimals,
        authorization={"name": name, "version": version},
        max_amount=args.max_amount,
    )
    recorder = RecordingTransport(httpx.AsyncHTTPTransport())
    transport = PaymentTransport(methods=[method], inner=recorder, max_payment_retries=args.retries)
    results: list[dict[str, Any]] = []
    async with httpx.AsyncClient(transport=transport, timeout=60) as http:
        for _ in range(args.n):
            entry: dict[str, Any] = {}
            try:
                response = await http.request(args.method, args.url)
                entry["status"] = response.status_code
                entry["body"] = body_of(response.content)
                entry["payment_receipt"] = pympp_receipt(response.headers.get("payment-receipt"))
                entry["cache_control"] = response.headers.get("cache-control")
            except Exception as error:
                entry["error"] = f"{type(error).__name__}: {error}"
            results.append(entry)
    return {
        "payer": account.address,
        "results": results,
        "credentials": recorder.credentials,
        "exchanges": recorder.exchanges,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--url", required=True)
    parser.add_argument("--n", type=int, default=1)
    parser.add_argument("--currency", required=True)
    parser.add_argument("--chain-id", type=int, default=31337)
    parser.add_argument("--decimals", type=int, default=6)
    parser.add_argument("--name")
    parser.add_argument("--version")
    parser.add_argument("--rpc-url")
    parser.add_argument("--max-amount", default="1", help="display units (1 = one whole token)")
    parser.add_argument("--retries", type=int, default=1, help="pympp max_payment_retries")
    parser.add_argument("--private-key")
    parser.add_argument("--method", default="GET")
    emit(asyncio.run(run(parser.parse_args())))


if __name__ == "__main__":
    main()
