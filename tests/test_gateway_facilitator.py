"""The facilitator HTTP API (`/verify`, `/settle`, `/supported`) on a real devnet."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator

import httpx
import pytest
from eth_abi.abi import encode as abi_encode
from eth_utils.address import to_checksum_address
from eth_utils.crypto import keccak

from escrow import DevnetState
from escrow._exact import ExactEvm
from escrow._rpc import Rpc, TxSender
from gateway import ExactScheme, facilitator_app
from x402 import (
    Eip712Domain,
    FacilitatorRequest,
    FacilitatorRequestV1,
    LocalSigner,
    PaymentPayload,
    PaymentPayloadV1,
    PaymentRequirements,
    PaymentRequirementsV1,
    encode_scheme_payload,
    json_encode,
    sign_transfer_authorization,
)

pytestmark = [pytest.mark.chain, pytest.mark.anyio]

RELAYER = 7


class Fac:
    def __init__(self, devnet: DevnetState, rpc: Rpc) -> None:
        self.devnet = devnet
        self.rpc = rpc
        self.relayer = TxSender(rpc, devnet.accounts[RELAYER].private_key, chain_id=devnet.chain_id)
        self.usdc = to_checksum_address(devnet.contracts["usdc"])
        self.domain = Eip712Domain(devnet.usdc_name, devnet.usdc_version, devnet.chain_id, self.usdc)
        self.payee = LocalSigner.random().address
        app = facilitator_app(
            ExactScheme(ExactEvm(rpc, self.relayer)), network=devnet.network, signers=[self.relayer.address]
        )
        self.client = httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://facilitator")
        self.requirements = PaymentRequirements(
            scheme="exact",
            network=devnet.network,
            asset=self.usdc,
            amount="2500",
            pay_to=self.payee,
            max_timeout_seconds=60,
            extra={"name": devnet.usdc_name, "version": devnet.usdc_version},
        )

    async def payer(self) -> LocalSigner:
        signer = LocalSigner.random()
        data = keccak(text="mint(address,uint256)")[:4] + abi_encode(
            ["address", "uint256"], [signer.address, 10**6]
        )
        await self.relayer.transact(self.usdc, data, gas=120_000)
        return signer

    def body(self, signer: LocalSigner, value: int = 2500) -> bytes:
        signed = sign_transfer_authorization(
            signer, self.domain, to=self.payee, value=value, valid_before=int(time.time()) + 60
        )
        payload = PaymentPayload(payload=encode_scheme_payload(signed), accepted=self.requirements)
        return json_encode(
            FacilitatorRequest(payment_payload=payload, payment_requirements=self.requirements)
        )

    async def balance(self, who: str) -> int:
        data = keccak(text="balanceOf(address)")[:4] + abi_encode(["address"], [who])
        return int.from_bytes(await self.rpc.call(self.usdc, data), "big")


@pytest.fixture
async def fac(devnet: DevnetState) -> AsyncIterator[Fac]:
    rpc = Rpc(devnet.rpc_url)
    f = Fac(devnet, rpc)
    try:
        yield f
    finally:
        await f.client.aclose()
        await rpc.aclose()


async def test_supported_lists_the_scheme_in_both_versions(fac: Fac) -> None:
    body = (await fac.client.get("/supported")).json()
    assert {"x402Version": 2, "scheme": "exact", "network": fac.devnet.network} in body["kinds"]
    assert any(kind["x402Version"] == 1 for kind in body["kinds"])
    assert body["signers"] == {"eip155:*": [fac.relayer.address]}


async def test_verify_then_settle_then_replay(fac: Fac) -> None:
    payer = await fac.payer()
    body = fac.body(payer)
    verdict = (await fac.client.post("/verify", content=body)).json()
    assert verdict == {"isValid": True, "payer": payer.address}
    settled = (await fac.client.post("/settle", content=body)).json()
    assert (
        settled["success"] is True and settled["transaction"].startswith("0x") and settled["amount"] == "2500"
    )
    assert await fac.balance(fac.payee) == 2500
    again = (await fac.client.post("/settle", content=body)).json()
    assert again["success"] is False and again["errorReason"] == "invalid_exact_evm_nonce_already_used"
    assert again["transaction"] == ""


async def test_invalid_payments_are_answered_200_with_the_reason(fac: Fac) -> None:
    payer = await fac.payer()
    response = await fac.client.post("/verify", content=fac.body(payer, value=1))
    assert response.status_code == 200
    assert response.json()["invalidReason"] == "invalid_exact_evm_payload_authorization_value_mismatch"
    response = await fac.client.post("/settle", content=fac.body(LocalSigner.random()))
    assert (
        response.status_code == 200
        and response.json()["errorReason"] == "invalid_exact_evm_insufficient_balance"
    )


async def test_undecodable_bodies_are_bad_requests(fac: Fac) -> None:
    for content in (b"{", b"[]", b'{"x402Version": 2}'):
        response = await fac.client.post("/verify", content=content)
        assert response.status_code == 400 and response.json()["isValid"] is False


async def test_v1_requests(fac: Fac) -> None:
    payer = await fac.payer()
    signed = sign_transfer_authorization(
        payer, fac.domain, to=fac.payee, value=2500, valid_before=int(time.time()) + 60
    )
    requirements = PaymentRequirementsV1(
        scheme="exact",
        network="localhost",
        max_amount_required="2500",
        resource="http://x/y",
        description="",
        mime_type="application/json",
        pay_to=fac.payee,
        max_timeout_seconds=60,
        asset=fac.usdc,
        extra={"name": fac.devnet.usdc_name, "version": fac.devnet.usdc_version},
    )
    payload = PaymentPayloadV1(scheme="exact", network="localhost", payload=encode_scheme_payload(signed))
    body = json_encode(FacilitatorRequestV1(payment_payload=payload, payment_requirements=requirements))
    settled = (await fac.client.post("/settle", content=body)).json()
    assert settled["success"] is True, settled
    assert await fac.balance(fac.payee) == 2500
