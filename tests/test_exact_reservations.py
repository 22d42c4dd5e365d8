"""`exact` payments a payer cannot cover are never served (issue 9 items 1, 7 and 17), on a real anvil.

- Deferred settlement reserves every accepted-but-unsettled payment against the payer's balance: a payer
  holding 1 × price who sends ten payments at once is served once, and the payee ends with exactly what
  was served (item 1). An authorization that expires before the settler could land it, and payments past
  the per-payer credit limit, are settled before they are served; what canceled authorizations cost is at
  most that limit.
- A copier that front-runs the gateway's `transferWithAuthorization` does not cost the payer the content:
  the payee was paid (item 7).
- A settlement whose receipt comes later than the gateway waits is answered `settlement_pending`; the
  same credential presented again is served once the chain confirms it, charged once (item 17).
"""

from __future__ import annotations

import asyncio
import base64
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
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

from escrow import Devnet, DevnetState
from escrow.chain._rpc import Rpc, TxSender
from escrow.payments._exact import ExactEvm
from escrow.payments._exact_settler import ExactSettler, exact_reservation
from gateway import Asset, ExactScheme, MemoryStore, PaymentMiddleware, SettleMode
from gateway._recovery import Recovery
from tests._gateways import Chain, Gateways, key_hex, read_store, reason, sign_for, wait_settled
from x402 import (
    Eip712Domain,
    ExactEvmPayload,
    LocalSigner,
    PaymentPayload,
    PaymentRequirements,
    Reason,
    decode_exact_payload,
    decode_payment_response,
    encode_payment_signature,
    encode_scheme_payload,
    sign_transfer_authorization,
)
from x402._eip712 import _domain_separator
from x402.client import PaymentAuth, SpendPolicy

pytestmark = [pytest.mark.chain, pytest.mark.anyio]

PRICE = 1000
_CANCEL_TYPEHASH = keccak(text="CancelAuthorization(address authorizer,bytes32 nonce)")


class World:
    """A paid `/hello` behind `ExactScheme` on one devnet, with its own relayer and a fresh payee."""

    def __init__(
        self, devnet: DevnetState, rpc: Rpc, relayer: LocalSigner, settle: SettleMode, **scheme: Any
    ) -> None:
        self.devnet = devnet
        self.rpc = rpc
        self.relayer = TxSender(rpc, key_hex(relayer), chain_id=devnet.chain_id)
        self.evm = ExactEvm(rpc, self.relayer, receipt_timeout=scheme.pop("receipt_timeout", 30.0))
        claim_ttl = scheme.pop("claim_ttl", 300.0)
        self.usdc = to_checksum_address(devnet.contracts["usdc"])
        self.domain = Eip712Domain(devnet.usdc_name, devnet.usdc_version, devnet.chain_id, self.usdc)
        self.payee = LocalSigner.random().address
        self.store = MemoryStore()
        self.scheme = ExactScheme(self.evm, **scheme)
        self.settler = ExactSettler(self.store, self.evm, max_age=0)
        self.copier: TxSender | None = None
        asset = Asset(
            address=self.usdc,
            chain_id=devnet.chain_id,
            name=devnet.usdc_name,
            version=devnet.usdc_version,
            decimals=devnet.usdc_decimals,
        )
        self.app = PaymentMiddleware(
            Starlette(routes=[Route("/hello", _hello), Route("/copied", self._copied)]),
            routes={"GET /hello": PRICE, "GET /copied": PRICE},
            schemes=[self.scheme],
            pay_to=self.payee,
            asset=asset,
            store=self.store,
            secret=b"reservation-tests-secret-of-32-bytes-at-least",
            settle=settle,
            claim_ttl=claim_ttl,
        )
        self.client = httpx.AsyncClient(
            transport=httpx.ASGITransport(app=self.app), base_url="http://testserver", timeout=60
        )

    async def _copied(self, request: Request) -> Response:
        # A mempool copier submits the very authorization from its own account before the gateway does.
        assert self.copier is not None
        payment = msgspec.json.decode(
            base64.b64decode(request.headers["payment-signature"]), type=PaymentPayload
        )
        payload = decode_exact_payload(payment.payload)
        data, gas = self.evm.transfer(payload)
        await self.copier.transact(self.usdc, data, gas=gas)
        return JSONResponse({"hello": "copied"})

    def header(self, signer: LocalSigner, **sign: Any) -> str:
        args: dict[str, Any] = {"to": self.payee, "value": PRICE, "valid_before": int(time.time()) + 120}
        args.update(sign)
        payload = sign_transfer_authorization(signer, self.domain, **args)
        accepted = PaymentRequirements(
            scheme="exact",
            network=self.devnet.network,
            asset=self.usdc,
            amount=str(PRICE),
            pay_to=self.payee,
            max_timeout_seconds=60,
            extra={"name": self.devnet.usdc_name, "version": self.devnet.usdc_version},
        )
        return encode_payment_signature(
            PaymentPayload(payload=encode_scheme_payload(payload), accepted=accepted)
        )

    async def pending(self, payer: str) -> int:
        return await self.store.get_pending(exact_reservation(self.devnet.chain_id, self.usdc, payer))

    async def cancel(self, signer: LocalSigner, payload: ExactEvmPayload) -> None:
        """The payer burns an authorization it gave (ERC-3009 `cancelAuthorization`)."""
        nonce = bytes.fromhex(payload.authorization.nonce[2:])
        struct = keccak(
            abi_encode(["bytes32", "address", "bytes32"], [_CANCEL_TYPEHASH, signer.address, nonce])
        )
        digest = keccak(b"\x19\x01" + _domain_separator(self.domain) + struct)
        signature = signer.sign_hash(digest)
        data = keccak(text="cancelAuthorization(address,bytes32,bytes)")[:4] + abi_encode(
            ["address", "bytes32", "bytes"], [signer.address, nonce, signature]
        )
        receipt = await self.relayer.transact(self.usdc, data, gas=200_000)
        assert receipt.ok

    async def aclose(self) -> None:
        await self.client.aclose()


async def _hello(request: Request) -> Response:
    return JSONResponse({"hello": "world"})


def _payload_of(header: str) -> ExactEvmPayload:
    payment = msgspec.json.decode(base64.b64decode(header), type=PaymentPayload)
    return decode_exact_payload(payment.payload)


def _transaction(response: httpx.Response) -> str:
    return decode_payment_response(response.headers["payment-response"]).transaction


@pytest.fixture
async def chain(devnet: DevnetState) -> AsyncIterator[Chain]:
    value = Chain(devnet)
    try:
        yield value
    finally:
        await value.aclose()


async def _world(chain: Chain, settle: SettleMode, **scheme: Any) -> World:
    return World(chain.devnet, chain.rpc, await chain.key(), settle, **scheme)


# ------------------------------------------------------------------------------------------ item 1


@pytest.mark.parametrize("settle", ["deferred", "before-response"])
async def test_a_payer_with_one_price_sending_ten_payments_at_once_is_served_once(
    chain: Chain, settle: SettleMode
) -> None:
    world = await _world(chain, settle)
    try:
        payer = LocalSigner.random()
        await chain.mint(payer.address, PRICE)  # exactly one price
        headers = [world.header(payer) for _ in range(10)]
        responses = await asyncio.gather(
            *(world.client.get("/hello", headers={"PAYMENT-SIGNATURE": h}) for h in headers)
        )
        served = [r for r in responses if r.status_code == 200]
        refused = [r for r in responses if r.status_code != 200]
        assert len(served) == 1, [r.text for r in responses]
        assert all(r.status_code == 402 for r in refused)
        assert {reason(r) for r in refused} == {Reason.INSUFFICIENT_FUNDS_PENDING}
        await world.settler.drain()
        assert await chain.balance(world.payee) == len(served) * PRICE
        assert await chain.balance(payer.address) == 0
        assert await world.pending(payer.address) == 0  # the settled payment's reservation was given back
        stats = await world.store.stats()
        assert (stats.settled, stats.dead) == (1, 0)
    finally:
        await world.aclose()


async def test_a_settled_payment_gives_its_reservation_back(chain: Chain) -> None:
    world = await _world(chain, "deferred")
    try:
        payer = LocalSigner.random()
        await chain.mint(payer.address, PRICE)
        response = await world.client.get("/hello", headers={"PAYMENT-SIGNATURE": world.header(payer)})
        assert response.status_code == 200
        assert await world.pending(payer.address) == PRICE
        await world.settler.drain()
        assert await world.pending(payer.address) == 0
        await chain.mint(payer.address, PRICE)
        response = await world.client.get("/hello", headers={"PAYMENT-SIGNATURE": world.header(payer)})
        assert response.status_code == 200  # the balance is usable again once settled
    finally:
        await world.aclose()


async def test_an_authorization_expiring_before_the_settler_could_land_it_is_settled_first(
    chain: Chain,
) -> None:
    world = await _world(chain, "deferred", settle_delay=30.0)
    try:
        payer = LocalSigner.random()
        await chain.mint(payer.address, 10 * PRICE)
        soon = world.header(payer, valid_before=int(time.time()) + 20)  # < settle_delay + min_validity
        response = await world.client.get("/hello", headers={"PAYMENT-SIGNATURE": soon})
        assert response.status_code == 200
        tx_hash = _transaction(response)
        assert tx_hash  # settled before the response, not queued
        assert await chain.balance(world.payee) == PRICE
        assert (await world.store.stats()).queued == 0
        later = world.header(payer, valid_before=int(time.time()) + 120)
        response = await world.client.get("/hello", headers={"PAYMENT-SIGNATURE": later})
        assert response.status_code == 200 and _transaction(response) == ""  # deferred as usual
        await world.settler.drain()
        assert await chain.balance(world.payee) == 2 * PRICE
        assert await world.pending(payer.address) == 0
    finally:
        await world.aclose()


async def test_canceled_authorizations_cost_at_most_the_credit_limit(chain: Chain) -> None:
    limit = 2 * PRICE
    world = await _world(chain, "deferred", credit_limit=limit)
    try:
        payer = LocalSigner.random()
        await chain.mint(payer.address, 10 * PRICE)
        headers = [world.header(payer) for _ in range(5)]
        deferred: list[str] = []
        for header in headers:
            response = await world.client.get("/hello", headers={"PAYMENT-SIGNATURE": header})
            assert response.status_code == 200
            if _transaction(response) == "":
                deferred.append(header)
        # Only `limit` worth is served on credit; every later payment was settled before its response.
        assert len(deferred) * PRICE == limit
        assert await chain.balance(world.payee) == 3 * PRICE
        # The payer cancels what is still unsettled: the payee loses those, and nothing more.
        for header in deferred:
            await world.cancel(payer, _payload_of(header))
        outcomes = await world.settler.drain()
        errors = [(await world.store.get_settlement(o.key)) for o in outcomes]
        assert sorted(o.status for o in outcomes) == ["dead", "dead"], errors
        assert {o.code for o in outcomes} == {"exact_authorization_canceled"}
        served = 5 * PRICE
        assert served - await chain.balance(world.payee) == limit
        assert await world.pending(payer.address) == 0  # dead letters give their reservation back
    finally:
        await world.aclose()


# ------------------------------------------------------------------------------------------ item 7


async def test_a_copied_transfer_that_lands_first_is_served_and_charged_once(chain: Chain) -> None:
    world = await _world(chain, "before-response")
    try:
        world.copier = TxSender(chain.rpc, key_hex(await chain.key()), chain_id=chain.devnet.chain_id)
        payer = LocalSigner.random()
        await chain.mint(payer.address, 10 * PRICE)
        header = world.header(payer)
        response = await world.client.get("/copied", headers={"PAYMENT-SIGNATURE": header})
        assert response.status_code == 200 and response.json() == {"hello": "copied"}
        receipt = await chain.rpc.get_receipt(_transaction(response))
        assert receipt is not None and receipt.ok
        tx = await chain.rpc.request("eth_getTransactionByHash", [_transaction(response)])
        assert tx["from"].lower() == world.copier.address.lower()  # the copier's transaction paid
        assert await chain.balance(world.payee) == PRICE
        assert await chain.balance(payer.address) == 9 * PRICE
        assert await world.pending(payer.address) == 0
        again = await world.client.get("/hello", headers={"PAYMENT-SIGNATURE": header})
        assert again.status_code == 402 and reason(again) == Reason.NONCE_ALREADY_USED
    finally:
        await world.aclose()


# ------------------------------------------------------------------------------------------ item 17


@pytest.fixture
def slow_chain() -> Iterator[DevnetState]:
    """A devnet of this test's own: its mining is paused and resumed."""
    with Devnet() as state:
        yield state


async def test_a_settlement_slower_than_the_gateway_waits_is_served_once_on_retry(
    slow_chain: DevnetState,
) -> None:
    chain = Chain(slow_chain)
    world = await _world(chain, "before-response", receipt_timeout=1.0)
    try:
        payer = LocalSigner.random()
        await chain.mint(payer.address, 10 * PRICE)
        header = world.header(payer)
        await chain.rpc.request("evm_setAutomine", [False])
        first = await world.client.get("/hello", headers={"PAYMENT-SIGNATURE": header})
        assert first.status_code == 402 and reason(first) == Reason.SETTLEMENT_PENDING
        assert first.headers["retry-after"] == "2" and "world" not in first.text
        # Still not mined: come back later; nothing is sent a second time.
        again = await world.client.get("/hello", headers={"PAYMENT-SIGNATURE": header})
        assert again.status_code == 402 and reason(again) == Reason.SETTLEMENT_PENDING
        await chain.rpc.request("evm_mine", [])
        served = await world.client.get("/hello", headers={"PAYMENT-SIGNATURE": header})
        assert served.status_code == 200 and served.json() == {"hello": "world"}
        assert _transaction(served)
        replay = await world.client.get("/hello", headers={"PAYMENT-SIGNATURE": header})
        assert replay.status_code == 402 and reason(replay) == Reason.NONCE_ALREADY_USED
        assert await chain.balance(world.payee) == PRICE
        assert await chain.balance(payer.address) == 9 * PRICE
        assert await chain.sent(world.relayer.address) == 1
        assert await world.pending(payer.address) == 0
        record = await world.store.get_settlement(_key(world, header))
        assert record is not None and record.state == "settled"
    finally:
        await chain.rpc.request("evm_setAutomine", [True])
        await world.aclose()
        await chain.aclose()


async def test_recovery_between_retries_does_not_make_the_retry_send_again(slow_chain: DevnetState) -> None:
    chain = Chain(slow_chain)
    world = await _world(chain, "before-response", receipt_timeout=1.0, claim_ttl=0.5)
    try:
        payer = LocalSigner.random()
        await chain.mint(payer.address, 10 * PRICE)
        header = world.header(payer)
        await chain.rpc.request("evm_setAutomine", [False])
        first = await world.client.get("/hello", headers={"PAYMENT-SIGNATURE": header})
        assert first.status_code == 402 and reason(first) == Reason.SETTLEMENT_PENDING
        await asyncio.sleep(0.6)  # the first request's claim runs out: recovery looks at the chain
        recovery = Recovery(world.store, reconcilers={"exact": world.settler}, claim_ttl=0.5)
        assert [o.code for o in await recovery.recover()] == ["exact_unsettled"]  # not mined yet
        await chain.rpc.request("evm_mine", [])
        served = await world.client.get("/hello", headers={"PAYMENT-SIGNATURE": header})
        assert served.status_code == 200 and served.json() == {"hello": "world"}
        assert await chain.sent(world.relayer.address) == 1  # it waited for the first transaction
        assert await chain.balance(world.payee) == PRICE
        assert await chain.balance(payer.address) == 9 * PRICE
        assert await world.pending(payer.address) == 0
    finally:
        await chain.rpc.request("evm_setAutomine", [True])
        await world.aclose()
        await chain.aclose()


async def test_our_client_retries_a_pending_settlement_with_the_same_credential(
    slow_chain: DevnetState,
) -> None:
    chain = Chain(slow_chain)
    world = await _world(chain, "before-response", receipt_timeout=1.0)
    try:
        payer = LocalSigner.random()
        await chain.mint(payer.address, 10 * PRICE)
        policy = SpendPolicy(max_per_call=PRICE)
        auth = PaymentAuth(chain.wallet(payer), policy, prefer=("x402v2",), settlement_retries=5)
        await chain.rpc.request("evm_setAutomine", [False])
        await chain.rpc.request("evm_setIntervalMining", [4])  # mined after the gateway gave up waiting
        async with httpx.AsyncClient(
            transport=httpx.ASGITransport(app=world.app), base_url="http://testserver", auth=auth, timeout=60
        ) as client:
            response = await client.get("/hello")
        assert response.status_code == 200 and response.json() == {"hello": "world"}
        assert policy.spent == PRICE
        assert await chain.balance(world.payee) == PRICE
        assert await chain.balance(payer.address) == 9 * PRICE
        assert await chain.sent(world.relayer.address) == 1
    finally:
        await chain.rpc.request("evm_setIntervalMining", [0])
        await chain.rpc.request("evm_setAutomine", [True])
        await world.aclose()
        await chain.aclose()


def _key(world: World, header: str) -> str:
    auth = _payload_of(header).authorization
    return f"exact:{world.devnet.chain_id}:{world.usdc.lower()}:{auth.from_.lower()}:{auth.nonce.lower()}"


# --------------------------------------------------------------------------- item 1 over real HTTP


@pytest.fixture
def gateways(devnet: DevnetState, tmp_path: Path) -> Iterator[Gateways]:
    started = Gateways(devnet, tmp_path)
    try:
        yield started
    finally:
        started.close()


async def test_the_subagent_in_deferred_mode_serves_a_one_price_payer_once(
    chain: Chain, gateways: Gateways, tmp_path: Path
) -> None:
    store = f"sqlite:///{tmp_path / 'payments.db'}"
    payee = LocalSigner.random().address
    relayer = await chain.key()
    gateway = gateways.new(store=store, settle="deferred", payee=payee, relayer_key=key_hex(relayer))
    gateway.start()
    poor, rich = LocalSigner.random(), LocalSigner.random()
    await chain.mint(poor.address, PRICE)
    await chain.mint(rich.address, 10 * PRICE)
    async with httpx.AsyncClient(base_url=gateway.url, timeout=30) as client:
        poor_headers = [await sign_for(client, "/hello", chain.wallet(poor)) for _ in range(10)]
        rich_headers = [await sign_for(client, "/hello", chain.wallet(rich)) for _ in range(5)]
        # Both payers at once: the poor one's ten payments race each other and the rich one's five.
        responses = await asyncio.gather(
            *(client.get("/hello", headers=h) for h in [*poor_headers, *rich_headers])
        )
    poor_answers, rich_answers = responses[:10], responses[10:]
    served = sum(r.status_code == 200 for r in poor_answers)
    assert served == 1, [r.text for r in poor_answers]
    assert {reason(r) for r in poor_answers if r.status_code != 200} == {Reason.INSUFFICIENT_FUNDS_PENDING}
    assert all(r.status_code == 200 for r in rich_answers), [r.text for r in rich_answers]
    await wait_settled(store, served + 5)
    assert await chain.balance(payee) == (served + 5) * PRICE
    assert await chain.balance(poor.address) == 0
    stats, dead = await read_store(store)
    assert (stats.settled, stats.dead, dead) == (6, 0, 0)
