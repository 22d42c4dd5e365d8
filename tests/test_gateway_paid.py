"""Paid endpoints end to end: our client pays our gateway on a real devnet (anvil + TestUSDC).

Every test gets a fresh payee (so balances start at 0) and fresh, freshly minted payers; the relayer is a
devnet account no other suite sends from. Nothing is mocked: signatures, simulations, transfers and
receipts are real.
"""

from __future__ import annotations

import asyncio
import base64
import json
import time
from collections.abc import AsyncIterator
from typing import Any

import httpx
import msgspec
import pytest
from eth_abi.abi import encode as abi_encode
from eth_utils.address import to_checksum_address
from eth_utils.crypto import keccak
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from escrow import DevnetState, load_artifact
from escrow.chain._rpc import Rpc, TxSender
from escrow.payments._exact import ExactEvm
from gateway import Asset, ExactScheme, MemoryStore, PaidRoute, PaymentMiddleware, SettleMode
from x402 import (
    Eip712Domain,
    LocalSigner,
    MppAuthorizationPayload,
    MppChallenge,
    MppCredential,
    PaymentPayload,
    PaymentPayloadV1,
    PaymentRequirements,
    challenge_hash,
    challenge_id,
    decode_json_param,
    decode_payment_required,
    decode_payment_response,
    encode_json_param,
    encode_payment_signature,
    encode_scheme_payload,
    encode_x_payment,
    format_credential,
    parse_receipt,
    parse_www_authenticate,
    rfc3339,
    sign_transfer_authorization,
)
from x402.client import Eip3009Wallet, PaymentAuth, SpendPolicy, receipt_of

pytestmark = [pytest.mark.chain, pytest.mark.anyio]

PRICE = 1000  # "$0.001" of a 6-decimal token
SECRET = b"gateway-tests-secret-of-at-least-32-bytes!"
RELAYER = 9  # devnet account index used only by these tests


class Env:
    """One test's world: chain handles, a fresh payee, the paid app and helpers to pay it."""

    def __init__(self, devnet: DevnetState, rpc: Rpc, store: MemoryStore, settle: SettleMode) -> None:
        self.devnet = devnet
        self.rpc = rpc
        self.relayer = TxSender(rpc, devnet.accounts[RELAYER].private_key, chain_id=devnet.chain_id)
        self.chain = ExactEvm(rpc, self.relayer)
        self.usdc = to_checksum_address(devnet.contracts["usdc"])
        self.asset = Asset(
            address=self.usdc,
            chain_id=devnet.chain_id,
            name=devnet.usdc_name,
            version=devnet.usdc_version,
            decimals=devnet.usdc_decimals,
        )
        self.domain = Eip712Domain(devnet.usdc_name, devnet.usdc_version, devnet.chain_id, self.usdc)
        self.payee = LocalSigner.random().address
        self.store = store
        self.app = PaymentMiddleware(
            _app(self),
            routes={
                "GET /hello": "$0.001",
                "GET /other": PRICE,
                "GET /fail": PRICE,
                "GET /boom": PRICE,
                "GET /race": PRICE,
                "GET /metered": PaidRoute(price=_metered_price, description="metered"),
                "POST /echo": PaidRoute(price=_body_price),
            },
            schemes=[ExactScheme(self.chain)],
            pay_to=self.payee,
            asset=self.asset,
            store=store,
            secret=SECRET,
            settle=settle,
        )
        transport = httpx.ASGITransport(app=self.app, raise_app_exceptions=False)
        self.client = httpx.AsyncClient(transport=transport, base_url="http://testserver")

    def paying(self, signer: LocalSigner, *, prefer: tuple[str, ...] = ("x402v2",)) -> httpx.AsyncClient:
        wallet = Eip3009Wallet(
            signer, self.devnet.chain_id, {self.usdc: (self.asset.name, self.asset.version)}
        )
        auth = PaymentAuth(wallet, SpendPolicy(max_per_call=10 * PRICE), prefer=prefer)  # type: ignore[arg-type]
        transport = httpx.ASGITransport(app=self.app, raise_app_exceptions=False)
        return httpx.AsyncClient(transport=transport, base_url="http://testserver", auth=auth)

    async def balance(self, address: str) -> int:
        data = keccak(text="balanceOf(address)")[:4] + abi_encode(["address"], [address])
        return int.from_bytes(await self.rpc.call(self.usdc, data), "big")

    async def payer(self, amount: int = 100 * PRICE) -> LocalSigner:
        """A fresh key holding `amount` TestUSDC (minting is open on the test token) and no ETH."""
        signer = LocalSigner.random()
        if amount:
            data = keccak(text="mint(address,uint256)")[:4] + abi_encode(
                ["address", "uint256"], [signer.address, amount]
            )
            await self.relayer.transact(self.usdc, data, gas=120_000)
        return signer

    def requirements(self, **changes: Any) -> PaymentRequirements:
        req = PaymentRequirements(
            scheme="exact",
            network=self.devnet.network,
            asset=self.usdc,
            amount=str(PRICE),
            pay_to=self.payee,
            max_timeout_seconds=60,
            extra={"name": self.asset.name, "version": self.asset.version},
        )
        return msgspec.structs.replace(req, **changes)

    def v2_header(
        self, signer: LocalSigner, *, accepted: PaymentRequirements | None = None, **sign: Any
    ) -> str:
        """A PAYMENT-SIGNATURE value; `sign` overrides the authorization fields (to, value, valid_*)."""
        args: dict[str, Any] = {"to": self.payee, "value": PRICE, "valid_before": int(time.time()) + 60}
        args.update(sign)
        payload = sign_transfer_authorization(signer, self.domain, **args)
        accepted = accepted or self.requirements()
        return encode_payment_signature(
            PaymentPayload(payload=encode_scheme_payload(payload), accepted=accepted)
        )

    async def challenge(self, path: str = "/hello") -> MppChallenge:
        response = await self.client.get(path)
        assert response.status_code == 402
        (challenge,) = parse_www_authenticate(response.headers.get_list("www-authenticate"))
        return challenge

    def mpp_header(self, signer: LocalSigner, challenge: MppChallenge, **sign: Any) -> str:
        request = challenge.request_json()
        args: dict[str, Any] = {
            "to": request["recipient"],
            "value": int(request["amount"]),
            "valid_before": int(time.time()) + 120,
            "nonce": challenge_hash(challenge.id, challenge.realm),
        }
        args.update(sign)
        payload = MppAuthorizationPayload.from_exact(sign_transfer_authorization(signer, self.domain, **args))
        credential = MppCredential(challenge=challenge, payload=encode_scheme_payload(payload))
        return format_credential(credential)


async def _metered_price(request: Request) -> int:
    return int(request.query_params.get("units", "1")) * 100


async def _body_price(request: Request) -> str:
    body = await request.json()
    return f"${body['dollars']}"


def _app(env: Env) -> Starlette:
    async def hello(request: Request) -> Response:
        return JSONResponse({"hello": "world"})

    async def fail(request: Request) -> Response:
        return JSONResponse({"error": "handler failed"}, status_code=500)

    async def boom(request: Request) -> Response:
        raise RuntimeError("handler crashed")

    async def race(request: Request) -> Response:
        # Someone else submits the same authorization first: our settlement must then fail.
        payment = msgspec.json.decode(
            base64.b64decode(request.headers["payment-signature"]), type=PaymentPayload
        )
        from x402 import decode_exact_payload

        await env.chain.settle(env.domain, decode_exact_payload(payment.payload))
        return JSONResponse({"secret": "content"})

    async def metered(request: Request) -> Response:
        return JSONResponse({"units": request.query_params.get("units")})

    async def echo(request: Request) -> Response:
        return JSONResponse(await request.json())

    routes = [
        Route("/hello", hello),
        Route("/other", hello),
        Route("/free", hello),
        Route("/fail", fail),
        Route("/boom", boom),
        Route("/race", race),
        Route("/metered", metered),
        Route("/echo", echo, methods=["POST"]),
    ]
    return Starlette(routes=routes)


async def _env(devnet: DevnetState, settle: SettleMode) -> AsyncIterator[Env]:
    rpc = Rpc(devnet.rpc_url)
    env = Env(devnet, rpc, MemoryStore(), settle)
    try:
        yield env
    finally:
        await env.client.aclose()
        await rpc.aclose()


@pytest.fixture
async def env(devnet: DevnetState) -> AsyncIterator[Env]:
    async for e in _env(devnet, "before-response"):
        yield e


@pytest.fixture
async def deferred_env(devnet: DevnetState) -> AsyncIterator[Env]:
    async for e in _env(devnet, "deferred"):
        yield e


def _reason(response: httpx.Response) -> str:
    """The reason code a refusal carries, checked to agree between the body and PAYMENT-REQUIRED."""
    body = response.json()
    v2 = decode_payment_required(response.headers["payment-required"])
    assert body["error"] == v2.error
    return str(body["error"])


def _fresh_challenge(response: httpx.Response) -> bool:
    return bool(parse_www_authenticate(response.headers.get_list("www-authenticate"), strict=False))


# ------------------------------------------------------------------------------------------ the 402


async def test_unpaid_request_gets_one_402_offering_every_protocol(env: Env) -> None:
    response = await env.client.get("/hello")
    assert response.status_code == 402
    assert response.headers["cache-control"] == "no-store"
    assert response.headers["content-type"] == "application/problem+json"

    v2 = decode_payment_required(response.headers["payment-required"])
    assert v2.x402_version == 2 and v2.resource is not None and v2.resource.url == "http://testserver/hello"
    assert v2.accepts == [env.requirements()]

    body = response.json()
    assert body["type"] == "https://paymentauth.org/problems/payment-required"
    assert body["status"] == 402 and body["title"] == "Payment Required" and body["detail"]
    assert body["x402Version"] == 1 and body["error"] == "X-PAYMENT header is required"
    (v1,) = body["accepts"]
    assert v1["maxAmountRequired"] == str(PRICE) and v1["payTo"] == env.payee and v1["asset"] == env.usdc
    assert v1["resource"] == "http://testserver/hello" and v1["extra"] == {"name": "USD Coin", "version": "2"}

    (challenge,) = parse_www_authenticate(response.headers.get_list("www-authenticate"))
    assert body["challengeId"] == challenge.id
    # No realm configured: the fixed default, never the Host header (see tests/test_gateway_mpp.py).
    assert (challenge.method, challenge.intent, challenge.realm) == ("evm", "charge", "localhost")
    assert challenge.expires is not None and challenge.opaque is not None
    request = decode_json_param(challenge.request)
    assert request == {
        "amount": str(PRICE),
        "currency": env.usdc,
        "recipient": env.payee,
        "methodDetails": {
            "chainId": env.devnet.chain_id,
            "credentialTypes": ["authorization"],
            "decimals": 6,
        },
        "_mppx_scope": {"http_method": "GET", "resource": "/hello", "route": "/hello"},
    }
    # The id is the spec's HMAC over the challenge's own parameters.
    expected = challenge_id(
        SECRET, "localhost", "evm", "charge", challenge.request, challenge.expires, None, challenge.opaque
    )
    assert challenge.id == expected


async def test_every_402_carries_a_distinct_challenge(env: Env) -> None:
    ids = {(await env.challenge()).id for _ in range(5)}
    assert len(ids) == 5


async def test_unpriced_routes_pass_through(env: Env) -> None:
    response = await env.client.get("/free")
    assert response.status_code == 200 and "payment-required" not in response.headers


# ------------------------------------------------------------------------------------ paying, 3 ways


async def test_x402_v2_payments_move_exactly_the_price(env: Env) -> None:
    payer = await env.payer()
    before = await env.balance(payer.address)
    async with env.paying(payer, prefer=("x402v2",)) as client:
        responses = [await client.get("/hello") for _ in range(3)]
    hashes = set()
    for response in responses:
        assert response.status_code == 200 and response.json() == {"hello": "world"}
        assert response.headers["cache-control"] == "private"
        receipt = decode_payment_response(response.headers["payment-response"])
        assert receipt.success and receipt.payer == payer.address and receipt.network == env.devnet.network
        mined = await env.rpc.get_receipt(receipt.transaction)
        assert mined is not None and mined.ok
        hashes.add(receipt.transaction)
    assert len(hashes) == 3
    assert await env.balance(env.payee) == 3 * PRICE
    assert await env.balance(payer.address) == before - 3 * PRICE


async def test_x402_v1_x_payment_flow(env: Env) -> None:
    payer = await env.payer()
    async with env.paying(payer, prefer=("x402v1",)) as client:
        response = await client.get("/hello")
    assert response.status_code == 200
    assert "payment-response" not in response.headers
    receipt = decode_payment_response(response.headers["x-payment-response"])
    assert receipt.success and receipt.transaction.startswith("0x")
    assert await env.balance(env.payee) == PRICE


async def test_x402_v1_payment_built_by_hand(env: Env) -> None:
    payer = await env.payer()
    signed = sign_transfer_authorization(
        payer, env.domain, to=env.payee, value=PRICE, valid_before=int(time.time()) + 60
    )
    header = encode_x_payment(
        PaymentPayloadV1(scheme="exact", network="localhost", payload=encode_scheme_payload(signed))
    )
    response = await env.client.get("/hello", headers={"X-PAYMENT": header})
    assert response.status_code == 200, response.text
    assert decode_payment_response(response.headers["x-payment-response"]).success


async def test_mpp_authorization_flow(env: Env) -> None:
    payer = await env.payer()
    challenge = await env.challenge()
    response = await env.client.get("/hello", headers={"Authorization": env.mpp_header(payer, challenge)})
    assert response.status_code == 200, response.text
    assert response.headers["cache-control"] == "private"
    receipt = parse_receipt(response.headers["payment-receipt"])
    assert receipt.status == "success" and receipt.method == "evm"
    assert receipt.challenge_id == challenge.id and receipt.chain_id == env.devnet.chain_id
    mined = await env.rpc.get_receipt(receipt.reference)
    assert mined is not None and mined.ok
    assert await env.balance(env.payee) == PRICE


async def test_mpp_flow_with_our_client(env: Env) -> None:
    payer = await env.payer()
    async with env.paying(payer, prefer=("mpp",)) as client:
        response = await client.get("/hello")
    assert response.status_code == 200, response.text
    assert isinstance(receipt_of(response), type(parse_receipt(response.headers["payment-receipt"])))
    assert await env.balance(env.payee) == PRICE


async def test_erc1271_wallet_payer(env: Env) -> None:
    owner = LocalSigner.random()
    wallet = await _deploy_wallet(env, owner.address)
    mint = keccak(text="mint(address,uint256)")[:4] + abi_encode(["address", "uint256"], [wallet, 10 * PRICE])
    await env.relayer.transact(env.usdc, mint, gas=120_000)

    class WalletSigner:
        """Signs as the wallet: `from` is the contract, the signature is its owner's (ERC-1271)."""

        address = wallet

        def sign_hash(self, digest: bytes) -> bytes:
            return owner.sign_hash(digest)

    async with env.paying(WalletSigner(), prefer=("x402v2",)) as client:  # type: ignore[arg-type]
        response = await client.get("/hello")
    assert response.status_code == 200, response.text
    assert decode_payment_response(response.headers["payment-response"]).payer == wallet
    assert await env.balance(env.payee) == PRICE
    assert await env.balance(wallet) == 9 * PRICE

    # A signature by anyone but the owner is refused by the wallet: strict ERC-1271, no ECDSA fallback.
    stranger = LocalSigner.random()

    class Impostor:
        address = wallet

        def sign_hash(self, digest: bytes) -> bytes:
            return stranger.sign_hash(digest)

    response = await env.client.get("/hello", headers={"PAYMENT-SIGNATURE": env.v2_header(Impostor())})  # type: ignore[arg-type]
    assert response.status_code == 402 and _reason(response) == "invalid_exact_evm_payload_signature"


async def _deploy_wallet(env: Env, owner: str) -> str:
    initcode = bytes.fromhex(load_artifact("ERC1271Wallet").bytecode[2:]) + abi_encode(["address"], [owner])
    receipt = await env.relayer.transact(None, initcode, gas=2_000_000)
    assert receipt.contract_address is not None
    return to_checksum_address(receipt.contract_address)


async def test_dynamic_async_price(env: Env) -> None:
    payer = await env.payer()
    async with env.paying(payer) as client:
        response = await client.get("/metered", params={"units": "7"})
    assert response.status_code == 200 and response.json() == {"units": "7"}
    assert await env.balance(env.payee) == 700


async def test_price_function_may_read_the_body_the_app_reads_too(env: Env) -> None:
    payer = await env.payer()
    async with env.paying(payer) as client:
        response = await client.post("/echo", json={"dollars": "0.002"})
    assert response.status_code == 200 and response.json() == {"dollars": "0.002"}
    assert await env.balance(env.payee) == 2000


# -------------------------------------------------------------------------------------- concurrency


async def test_fifty_concurrent_paid_calls_all_settle_once(env: Env) -> None:
    payers = [await env.payer() for _ in range(5)]
    clients = [env.paying(p) for p in payers]
    try:
        responses = await asyncio.gather(*(clients[i % 5].get("/hello") for i in range(50)))
    finally:
        for client in clients:
            await client.aclose()
    assert [r.status_code for r in responses] == [200] * 50
    hashes = {decode_payment_response(r.headers["payment-response"]).transaction for r in responses}
    assert len(hashes) == 50
    assert await env.balance(env.payee) == 50 * PRICE
    for payer in payers:
        assert await env.balance(payer.address) == 100 * PRICE - 10 * PRICE


async def test_twenty_concurrent_copies_of_one_payment_are_served_once(env: Env) -> None:
    payer = await env.payer()
    header = env.v2_header(payer)
    responses = await asyncio.gather(
        *(env.client.get("/hello", headers={"PAYMENT-SIGNATURE": header}) for _ in range(20))
    )
    served = [r for r in responses if r.status_code == 200]
    refused = [r for r in responses if r.status_code != 200]
    assert len(served) == 1 and len(refused) == 19
    assert {r.status_code for r in refused} == {402}
    assert {_reason(r) for r in refused} == {"invalid_exact_evm_nonce_already_used"}
    assert await env.balance(env.payee) == PRICE


async def test_twenty_concurrent_copies_of_one_mpp_credential_are_served_once(env: Env) -> None:
    payer = await env.payer()
    header = env.mpp_header(payer, await env.challenge())
    responses = await asyncio.gather(
        *(env.client.get("/hello", headers={"Authorization": header}) for _ in range(20))
    )
    assert sorted(r.status_code for r in responses) == [200] + [402] * 19
    refused = [r for r in responses if r.status_code == 402]
    assert {_problem(r) for r in refused} == {
        (402, "invalid-challenge", "invalid_exact_evm_nonce_already_used")
    }
    assert await env.balance(env.payee) == PRICE


# -------------------------------------------------------------------------- handler and settle failures


async def test_failed_handler_charges_nothing_and_frees_the_payment(env: Env) -> None:
    payer = await env.payer()
    header = env.v2_header(payer)
    response = await env.client.get("/fail", headers={"PAYMENT-SIGNATURE": header})
    assert response.status_code == 500 and response.json() == {"error": "handler failed"}
    assert "payment-response" not in response.headers
    assert await env.balance(env.payee) == 0
    # The claim was released: the very same payment buys the next call.
    response = await env.client.get("/hello", headers={"PAYMENT-SIGNATURE": header})
    assert response.status_code == 200
    assert await env.balance(env.payee) == PRICE


async def test_crashing_handler_charges_nothing_and_frees_the_payment(env: Env) -> None:
    payer = await env.payer()
    header = env.v2_header(payer)
    response = await env.client.get("/boom", headers={"PAYMENT-SIGNATURE": header})
    assert response.status_code == 500
    assert await env.balance(env.payee) == 0
    response = await env.client.get("/hello", headers={"PAYMENT-SIGNATURE": header})
    assert response.status_code == 200
    assert await env.balance(env.payee) == PRICE


async def test_settlement_front_run_with_the_same_authorization_is_served(env: Env) -> None:
    # Issue 9 item 7: the payee was paid (by the copy), so the content is served, and charged once.
    payer = await env.payer()
    response = await env.client.get("/race", headers={"PAYMENT-SIGNATURE": env.v2_header(payer)})
    assert response.status_code == 200 and response.json() == {"secret": "content"}
    settle = decode_payment_response(response.headers["payment-response"])
    assert settle.success and settle.payer == payer.address
    receipt = await env.rpc.get_receipt(settle.transaction)  # the front-runner's transaction
    assert receipt is not None and receipt.ok
    assert await env.balance(env.payee) == PRICE  # paid once, by the front-runner's transaction
    assert await env.balance(payer.address) == 99 * PRICE


async def test_deferred_mode_serves_and_queues_the_settlement(deferred_env: Env) -> None:
    env = deferred_env
    payer = await env.payer()
    response = await env.client.get("/hello", headers={"PAYMENT-SIGNATURE": env.v2_header(payer)})
    assert response.status_code == 200
    receipt = decode_payment_response(response.headers["payment-response"])
    assert receipt.success and receipt.transaction == ""
    stats = await env.store.stats()
    assert stats.queued == 1
    assert await env.balance(env.payee) == 0  # nothing moved yet: the batching settler owns it now


# -------------------------------------------------------------------------- bad input, x402 (v2 / v1)


def _b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode()


@pytest.mark.parametrize(
    ("header", "status", "reason"),
    [
        ("%%%not-base64%%%", 400, "invalid_payload"),
        (_b64(b"{not json"), 400, "invalid_payload"),
        (_b64(json.dumps({"x402Version": 2, "payload": {}}).encode()), 400, "invalid_payload"),
        (
            _b64(json.dumps({"x402Version": 3, "payload": {}, "accepted": {}}).encode()),
            400,
            "invalid_x402_version",
        ),
        (_b64(b"[]"), 400, "invalid_payload"),
    ],
    ids=["malformed-base64", "malformed-json", "missing-fields", "wrong-version", "not-an-object"],
)
async def test_malformed_payment_signature(env: Env, header: str, status: int, reason: str) -> None:
    response = await env.client.get("/hello", headers={"PAYMENT-SIGNATURE": header})
    assert response.status_code == status
    assert _reason(response) == reason
    assert response.json()["status"] == status
    assert _fresh_challenge(response)


async def test_missing_authorization_fields_in_payload(env: Env) -> None:
    accepted = env.requirements()
    payment = PaymentPayload(payload={"signature": "0x00"}, accepted=accepted)
    response = await env.client.get(
        "/hello", headers={"PAYMENT-SIGNATURE": encode_payment_signature(payment)}
    )
    assert response.status_code == 400 and _reason(response) == "invalid_payload"


@pytest.mark.parametrize(
    ("case", "reason"),
    [
        ("wrong-amount", "invalid_exact_evm_payload_authorization_value_mismatch"),
        ("wrong-recipient", "invalid_exact_evm_payload_recipient_mismatch"),
        ("expired", "invalid_exact_evm_payload_authorization_valid_before"),
        ("not-yet-valid", "invalid_exact_evm_payload_authorization_valid_after"),
        ("bad-signature", "invalid_exact_evm_payload_signature"),
        ("wrong-chain", "network_mismatch"),
        ("tampered-accepted-amount", "invalid_exact_evm_payload_authorization_value_mismatch"),
        ("insufficient-balance", "invalid_exact_evm_insufficient_balance"),
    ],
)
async def test_rejected_payment(env: Env, case: str, reason: str) -> None:
    payer = await env.payer()
    now = int(time.time())
    if case == "wrong-amount":
        header = env.v2_header(payer, value=PRICE - 1)
    elif case == "wrong-recipient":
        header = env.v2_header(payer, to=LocalSigner.random().address)
    elif case == "expired":
        header = env.v2_header(payer, valid_before=now - 1)
    elif case == "not-yet-valid":
        header = env.v2_header(payer, valid_after=now + 3600)
    elif case == "bad-signature":
        forged = sign_transfer_authorization(
            LocalSigner.random(), env.domain, to=env.payee, value=PRICE, valid_before=now + 60
        )
        genuine = sign_transfer_authorization(
            payer, env.domain, to=env.payee, value=PRICE, valid_before=now + 60
        )
        payload = msgspec.structs.replace(genuine, signature=forged.signature)
        header = encode_payment_signature(
            PaymentPayload(payload=encode_scheme_payload(payload), accepted=env.requirements())
        )
    elif case == "wrong-chain":
        header = env.v2_header(payer, accepted=env.requirements(network="eip155:1"))
    elif case == "tampered-accepted-amount":
        header = env.v2_header(payer, value=1, accepted=env.requirements(amount="1"))
    else:
        header = env.v2_header(await env.payer(0))
    response = await env.client.get("/hello", headers={"PAYMENT-SIGNATURE": header})
    assert response.status_code == 402, response.text
    assert _reason(response) == reason
    assert response.json()["invalidReason"] == reason
    assert _fresh_challenge(response)
    assert await env.balance(env.payee) == 0


async def test_unsupported_scheme_is_a_bad_request(env: Env) -> None:
    payer = await env.payer()
    response = await env.client.get(
        "/hello",
        headers={"PAYMENT-SIGNATURE": env.v2_header(payer, accepted=env.requirements(scheme="upto"))},
    )
    assert response.status_code == 400 and _reason(response) == "unsupported_scheme"


async def test_replay_of_a_settled_payment(env: Env) -> None:
    payer = await env.payer()
    header = env.v2_header(payer)
    assert (await env.client.get("/hello", headers={"PAYMENT-SIGNATURE": header})).status_code == 200
    response = await env.client.get("/hello", headers={"PAYMENT-SIGNATURE": header})
    assert response.status_code == 402 and _reason(response) == "invalid_exact_evm_nonce_already_used"
    # Even with a fresh store (another replica, a restart) the chain refuses the used nonce.
    env.app.paywall.store = MemoryStore()
    response = await env.client.get("/hello", headers={"PAYMENT-SIGNATURE": header})
    assert response.status_code == 402 and _reason(response) == "invalid_exact_evm_nonce_already_used"
    assert await env.balance(env.payee) == PRICE


async def test_two_credentials_at_once_are_a_bad_request(env: Env) -> None:
    payer = await env.payer()
    headers = {"PAYMENT-SIGNATURE": env.v2_header(payer), "X-PAYMENT": env.v2_header(payer)}
    response = await env.client.get("/hello", headers=headers)
    assert response.status_code == 400 and _reason(response) == "invalid_payload"


async def test_v1_payment_on_another_network(env: Env) -> None:
    payer = await env.payer()
    signed = sign_transfer_authorization(
        payer, env.domain, to=env.payee, value=PRICE, valid_before=int(time.time()) + 60
    )
    header = encode_x_payment(
        PaymentPayloadV1(scheme="exact", network="base", payload=encode_scheme_payload(signed))
    )
    response = await env.client.get("/hello", headers={"X-PAYMENT": header})
    assert response.status_code == 402 and _reason(response) == "network_mismatch"


# ----------------------------------------------------------------------------------- bad input, MPP


def _problem(response: httpx.Response) -> tuple[int, str, str]:
    body = response.json()
    assert response.headers["content-type"] == "application/problem+json"
    assert body["status"] == response.status_code
    return response.status_code, body["type"].rsplit("/", 1)[1], body["invalidReason"]


async def test_mpp_malformed_credential(env: Env) -> None:
    response = await env.client.get("/hello", headers={"Authorization": "Payment !!!not-base64url!!!"})
    assert _problem(response) == (402, "malformed-credential", "invalid_payload")
    assert _fresh_challenge(response)


async def test_mpp_non_payment_authorization_is_not_a_credential(env: Env) -> None:
    response = await env.client.get("/hello", headers={"Authorization": "Bearer abc"})
    assert response.status_code == 402 and response.json()["type"].endswith("/payment-required")


async def test_mpp_tampered_challenge(env: Env) -> None:
    payer = await env.payer()
    challenge = await env.challenge()
    request = decode_json_param(challenge.request)
    request["amount"] = "1"
    tampered = msgspec.structs.replace(challenge, request=encode_json_param(request))
    response = await env.client.get(
        "/hello", headers={"Authorization": env.mpp_header(payer, tampered, value=1)}
    )
    assert _problem(response) == (402, "invalid-challenge", "invalid_challenge")
    assert _fresh_challenge(response)


async def test_mpp_expired_challenge(env: Env) -> None:
    payer = await env.payer()
    live = await env.challenge()
    expires = rfc3339(time.time() - 5)
    stale = msgspec.structs.replace(
        live,
        expires=expires,
        id=challenge_id(
            SECRET, live.realm, live.method, live.intent, live.request, expires, None, live.opaque
        ),
    )
    response = await env.client.get("/hello", headers={"Authorization": env.mpp_header(payer, stale)})
    assert _problem(response) == (402, "payment-expired", "challenge_expired")
    assert _fresh_challenge(response)


async def test_mpp_nonce_must_be_the_challenge_hash(env: Env) -> None:
    payer = await env.payer()
    challenge = await env.challenge()
    response = await env.client.get(
        "/hello", headers={"Authorization": env.mpp_header(payer, challenge, nonce=b"\x01" * 32)}
    )
    assert _problem(response) == (402, "invalid-challenge", "challenge_binding_mismatch")


async def test_mpp_challenge_is_bound_to_its_route(env: Env) -> None:
    payer = await env.payer()
    challenge = await env.challenge("/hello")
    response = await env.client.get("/other", headers={"Authorization": env.mpp_header(payer, challenge)})
    assert _problem(response) == (402, "invalid-challenge", "challenge_binding_mismatch")
    assert await env.balance(env.payee) == 0


async def test_mpp_wrong_amount(env: Env) -> None:
    payer = await env.payer()
    challenge = await env.challenge()
    response = await env.client.get(
        "/hello", headers={"Authorization": env.mpp_header(payer, challenge, value=PRICE - 1)}
    )
    assert _problem(response) == (
        402,
        "payment-insufficient",
        "invalid_exact_evm_payload_authorization_value_mismatch",
    )


async def test_mpp_replay_is_an_already_used_challenge(env: Env) -> None:
    """The core spec's status-code table (pympp's 403 is an option: tests/test_gateway_mpp.py)."""
    payer = await env.payer()
    header = env.mpp_header(payer, await env.challenge())
    assert (await env.client.get("/hello", headers={"Authorization": header})).status_code == 200
    response = await env.client.get("/hello", headers={"Authorization": header})
    assert _problem(response) == (402, "invalid-challenge", "invalid_exact_evm_nonce_already_used")
    assert _fresh_challenge(response)
    assert await env.balance(env.payee) == PRICE


async def test_mpp_unknown_secret(env: Env) -> None:
    payer = await env.payer()
    live = await env.challenge()
    other = b"another-secret-that-is-32-bytes-long!!"
    forged = msgspec.structs.replace(
        live,
        id=challenge_id(
            other, live.realm, live.method, live.intent, live.request, live.expires, None, live.opaque
        ),
    )
    response = await env.client.get("/hello", headers={"Authorization": env.mpp_header(payer, forged)})
    assert _problem(response) == (402, "invalid-challenge", "invalid_challenge")
