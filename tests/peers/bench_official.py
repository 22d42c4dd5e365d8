"""Peer benchmark: the official x402 middleware's paid requests per second, in-process (.venv-peers).

The app is ``x402_server.build_app`` (official ``PaymentMiddlewareASGI`` + ``x402ResourceServer``)
served through ``httpx.ASGITransport``, so no socket is involved; ``concurrency`` tasks share ``n``
paid requests.

* ``--settle stub``: a facilitator that answers verify ok / settle ok without a chain; with
  ``--verify`` it first recovers the EIP-3009 signer the way the official facilitator does
  (eth-account ``encode_typed_data`` + ``recover_message``), which is what our benchmark's stub
  settler does too, so the two servers do the same work;
* ``--settle chain``: the official ``x402Facilitator`` + ``FacilitatorWeb3Signer`` on the devnet,
  one ``transferWithAuthorization`` per request (needs --rpc-url, --asset, payer and facilitator keys).

Two ways to pay:

* default (end to end): the official ``x402AsyncTransport`` pays, so each request is
  402 -> sign -> paid retry;
* ``--presigned``: the official client (``x402Client.create_payment_payload`` +
  ``encode_payment_signature_header``) signs every payment before the clock starts, answering the
  offer of one real 402, and the timed requests carry ``PAYMENT-SIGNATURE`` up front: the server's
  cost alone. ``sign_us`` is then the client's mean time to sign and encode one payment.

``--unpaid N`` also times N requests without payment (402 answers per second).
It also times the official mechanism's signing alone (``ExactEvmScheme.create_payment_payload``).
Output (last line, JSON): ``{"req_per_s", "seconds", "n", "concurrency", "statuses", "sign_ms", ...}``.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import os
import time
from collections.abc import Awaitable, Callable
from typing import Any

import httpx
from _peer import ERC20_ABI, emit, token_domain
from eth_account import Account
from eth_account.messages import encode_typed_data
from eth_keys.backends import get_backend
from x402.http.clients.httpx import x402AsyncTransport
from x402.http.utils import decode_payment_required_header, encode_payment_signature_header
from x402.mechanisms.evm.exact import ExactEvmScheme
from x402.schemas import PaymentPayload, PaymentRequirements, VerifyResponse
from x402_server import StubFacilitator, build_app, make_facilitator

from x402 import x402Client

STUB_ASSET = "0x5FbDB2315678afecb367f032d93F642f64180aa3"
STUB_PAY_TO = "0x3C44CdDdB6a900fa2b585dd299e03d12FA4293BC"

_AUTHORIZATION_TYPES = [
    {"name": "from", "type": "address"},
    {"name": "to", "type": "address"},
    {"name": "value", "type": "uint256"},
    {"name": "validAfter", "type": "uint256"},
    {"name": "validBefore", "type": "uint256"},
    {"name": "nonce", "type": "bytes32"},
]
_DOMAIN_TYPES = [
    {"name": "name", "type": "string"},
    {"name": "version", "type": "string"},
    {"name": "chainId", "type": "uint256"},
    {"name": "verifyingContract", "type": "address"},
]


class VerifyingStubFacilitator(StubFacilitator):
    """The stub, but verify recovers the EIP-3009 signer and compares it with ``from`` first (an EOA
    check as the official ``FacilitatorWeb3Signer.verify_typed_data`` makes it); no chain either way."""

    def __init__(self, network: str, chain_id: int) -> None:
        super().__init__(network)
        self.chain_id = chain_id

    async def verify(self, payload: PaymentPayload, requirements: PaymentRequirements) -> VerifyResponse:
        inner = payload.payload
        auth = inner["authorization"]
        typed = {
            "types": {"EIP712Domain": _DOMAIN_TYPES, "TransferWithAuthorization": _AUTHORIZATION_TYPES},
            "primaryType": "TransferWithAuthorization",
            "domain": {
                "name": requirements.extra["name"],
                "version": requirements.extra["version"],
                "chainId": self.chain_id,
                "verifyingContract": requirements.asset,
            },
            "message": {
                "from": auth["from"],
                "to": auth["to"],
                "value": int(auth["value"]),
                "validAfter": int(auth["validAfter"]),
                "validBefore": int(auth["validBefore"]),
                "nonce": auth["nonce"],
            },
        }
        signer = Account.recover_message(encode_typed_data(full_message=typed), signature=inner["signature"])
        if signer.lower() != str(auth["from"]).lower():
            return VerifyResponse(is_valid=False, invalid_reason="invalid_exact_evm_payload_signature")
        return VerifyResponse(is_valid=True, payer=signer)


def time_signing(account: Any, network: str, asset: str, name: str, version: str, rounds: int) -> float:
    """Mean milliseconds per official ``create_payment_payload`` (EIP-3009 typed data + ECDSA)."""
    scheme = ExactEvmScheme(signer=account)
    requirements = PaymentRequirements(
        scheme="exact",
        network=network,
        asset=asset,
        amount="1000",
        pay_to=STUB_PAY_TO,
        max_timeout_seconds=60,
        extra={"name": name, "version": version},
    )
    for _ in range(10):
        scheme.create_payment_payload(requirements)
    start = time.perf_counter()
    for _ in range(rounds):
        scheme.create_payment_payload(requirements)
    return (time.perf_counter() - start) * 1000 / rounds


async def _drive(
    concurrency: int, n: int, request: Callable[[int], Awaitable[httpx.Response]]
) -> tuple[float, collections.Counter[int]]:
    """Seconds for ``n`` calls of ``request(i)`` shared by ``concurrency`` tasks, and their statuses."""
    statuses: collections.Counter[int] = collections.Counter()
    queue: asyncio.Queue[int] = asyncio.Queue()
    for i in range(n):
        queue.put_nowait(i)

    async def worker() -> None:
        while True:
            try:
                i = queue.get_nowait()
            except asyncio.QueueEmpty:
                return
            statuses[(await request(i)).status_code] += 1

    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return time.perf_counter() - start, statuses


async def run(args: argparse.Namespace) -> dict[str, Any]:
    network = f"eip155:{args.chain_id}"
    if args.settle == "chain":
        if not (args.rpc_url and args.asset and args.payer_key and args.facilitator_key):
            raise SystemExit("--settle chain needs --rpc-url, --asset, --payer-key, --facilitator-key")
        asset, pay_to = args.asset, args.pay_to or Account.create().address
        name, version = token_domain(args.rpc_url, asset)
        payer = Account.from_key(args.payer_key)
        facilitator = make_facilitator(args.settle, network, args.rpc_url, args.facilitator_key)
    else:
        asset, pay_to = args.asset or STUB_ASSET, args.pay_to or STUB_PAY_TO
        name, version = "USD Coin", "2"
        payer = Account.from_key(args.payer_key) if args.payer_key else Account.create()
        facilitator = (
            VerifyingStubFacilitator(network, args.chain_id)
            if args.verify
            else make_facilitator("stub", network, None, None)
        )

    app, _ = build_app(
        facilitator=facilitator,
        network=network,
        asset=asset,
        pay_to=pay_to,
        amount=args.amount,
        name=name,
        version=version,
        record=False,
    )
    client = x402Client()
    client.register(network, ExactEvmScheme(signer=payer))
    client.set_spend_controls({"allowed_assets": [{"network": network, "asset": asset}]})  # type: ignore[typeddict-item]
    result: dict[str, Any] = {"mode": "presigned" if args.presigned else "e2e", "verify": args.verify}
    before = _balance(args.rpc_url, asset, pay_to) if args.settle == "chain" else None
    asgi = httpx.ASGITransport(app=app)

    if args.presigned:
        async with httpx.AsyncClient(transport=asgi, base_url="http://bench.local", timeout=120) as http:
            challenge = await http.get("/paid")
            required = decode_payment_required_header(challenge.headers["PAYMENT-REQUIRED"])
            count = args.n + args.warmup
            start = time.perf_counter()
            headers = []
            for _ in range(count):
                payment = await client.create_payment_payload(required)
                headers.append({"PAYMENT-SIGNATURE": encode_payment_signature_header(payment)})
            result["sign_us"] = round((time.perf_counter() - start) / count * 1e6, 1)
            for i in range(args.warmup):
                await http.get("/paid", headers=headers[args.n + i])  # first-request initialisation

            async def paid(i: int) -> httpx.Response:
                return await http.get("/paid", headers=headers[i])

            seconds, statuses = await _drive(args.concurrency, args.n, paid)
            unpaid_seconds = None
            if args.unpaid:

                async def unpaid(i: int) -> httpx.Response:
                    return await http.get("/paid")

                unpaid_seconds, unpaid_statuses = await _drive(args.concurrency, args.unpaid, unpaid)
                result["unpaid_statuses"] = {str(k): v for k, v in sorted(unpaid_statuses.items())}
    else:
        transport = x402AsyncTransport(client, transport=asgi)
        async with httpx.AsyncClient(transport=transport, base_url="http://bench.local", timeout=120) as http:
            for _ in range(args.warmup):
                await http.get("/paid")  # first-request initialisation and caches, not counted

            async def paid_e2e(i: int) -> httpx.Response:
                return await http.get("/paid")

            seconds, statuses = await _drive(args.concurrency, args.n, paid_e2e)
        unpaid_seconds = None
        if args.unpaid:
            async with httpx.AsyncClient(transport=asgi, base_url="http://bench.local") as plain:

                async def unpaid_plain(i: int) -> httpx.Response:
                    return await plain.get("/paid")

                unpaid_seconds, unpaid_statuses = await _drive(args.concurrency, args.unpaid, unpaid_plain)
                result["unpaid_statuses"] = {str(k): v for k, v in sorted(unpaid_statuses.items())}

    paid_count = statuses.get(200, 0)
    result.update(
        {
            "impl": "x402-official-2.25.0",
            "settle": args.settle,
            "n": args.n,
            "concurrency": args.concurrency,
            "warmup": args.warmup,
            "seconds": round(seconds, 4),
            "req_per_s": round(paid_count / seconds, 2) if seconds > 0 else None,
            "statuses": {str(k): v for k, v in sorted(statuses.items()) if v},
            "ecc_backend": type(get_backend()).__name__,
        }
    )
    if before is not None:
        # What really reached the payee on chain, warm-up included: a 200 alone does not prove settlement.
        result["settled_amount"] = _balance(args.rpc_url, asset, pay_to) - before
    if unpaid_seconds:
        result["unpaid_per_s"] = round(args.unpaid / unpaid_seconds, 2)
    if args.sign_rounds:
        result["sign_ms"] = round(time_signing(payer, network, asset, name, version, args.sign_rounds), 4)
    return result


def _balance(rpc_url: str, token: str, who: str) -> int:
    from web3 import Web3

    w3 = Web3(Web3.HTTPProvider(rpc_url))
    contract = w3.eth.contract(address=Web3.to_checksum_address(token), abi=ERC20_ABI)
    return int(contract.functions.balanceOf(Web3.to_checksum_address(who)).call())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--settle", choices=["stub", "chain"], default="stub")
    parser.add_argument("--verify", action="store_true", help="stub: recover the signer in verify")
    parser.add_argument("--presigned", action="store_true", help="sign every payment before timing")
    parser.add_argument("--unpaid", type=int, default=0, help="also time this many unpaid requests")
    parser.add_argument("--n", type=int, default=400)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--sign-rounds", type=int, default=300)
    parser.add_argument("--chain-id", type=int, default=31337)
    parser.add_argument("--rpc-url")
    parser.add_argument("--asset")
    parser.add_argument("--pay-to")
    parser.add_argument("--amount", default="1000")
    parser.add_argument("--payer-key", default=os.environ.get("PEER_PRIVATE_KEY"))
    parser.add_argument("--facilitator-key", default=os.environ.get("PEER_FACILITATOR_KEY"))
    emit(asyncio.run(run(parser.parse_args())))


if __name__ == "__main__":
    main()
