"""The facilitator HTTP API (`/verify`, `/settle`, `/supported`) on a real devnet."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator

import httpx
import msgspec
import pytest
from eth_abi.abi import encode as abi_encode
from eth_utils.address import to_checksum_address
from eth_utils.crypto import keccak

from escrow import DevnetState, load_artifact
from escrow.chain._rpc import Rpc, TxSender
from escrow.payments._exact import ExactEvm
from gateway import Asset, ConfigurationError, ExactScheme, facilitator_app
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
        self.asset = Asset(
            address=self.usdc, chain_id=devnet.chain_id, name=devnet.usdc_name, version=devnet.usdc_version
        )
        app = facilitator_app(
            ExactScheme(ExactEvm(rpc, self.relayer)),
            network=devnet.network,
            signers=[self.relayer.address],
            assets=[self.asset],
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

    async def payer(self, token: str | None = None, sender: TxSender | None = None) -> LocalSigner:
        signer = LocalSigner.random()
        data = keccak(text="mint(address,uint256)")[:4] + abi_encode(
            ["address", "uint256"], [signer.address, 10**6]
        )
        await (sender or self.relayer).transact(token or self.usdc, data, gas=120_000)
        return signer

    def body(
        self,
        signer: LocalSigner,
        value: int = 2500,
        *,
        domain: Eip712Domain | None = None,
        requirements: PaymentRequirements | None = None,
    ) -> bytes:
        """A v2 request signed over `domain`, which the requirements name unless `requirements` is given."""
        domain = domain or self.domain
        if requirements is None:
            requirements = msgspec.structs.replace(
                self.requirements,
                asset=domain.verifying_contract,
                extra={"name": domain.name, "version": domain.version},
            )
        signed = sign_transfer_authorization(
            signer, domain, to=self.payee, value=value, valid_before=int(time.time()) + 60
        )
        payload = PaymentPayload(payload=encode_scheme_payload(signed), accepted=requirements)
        return json_encode(FacilitatorRequest(payment_payload=payload, payment_requirements=requirements))

    async def balance(self, who: str, token: str | None = None) -> int:
        data = keccak(text="balanceOf(address)")[:4] + abi_encode(["address"], [who])
        return int.from_bytes(await self.rpc.call(token or self.usdc, data), "big")


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


async def test_a_content_length_int_cannot_read_is_not_a_500(fac: Fac) -> None:
    # "\xb2" (latin-1 "²") passes str.isdigit() and fails int(); so do more than 4300 digits
    for declared in (b"\xb2", b"9" * 5000):
        response = await fac.client.post("/verify", content=b"{", headers={"content-length": declared})
        assert response.status_code in (400, 413), response.text
        assert response.headers["content-type"].endswith("json")


async def test_request_bodies_are_bounded(fac: Fac) -> None:
    async def chunks() -> AsyncIterator[bytes]:  # no Content-Length: the streamed bytes count
        for _ in range(3):
            yield b" " * (30 << 10)

    before = await _relayer_state(fac)
    for declared in (True, False):
        for path in ("/verify", "/settle"):
            content = b" " * ((64 << 10) + 1) if declared else chunks()
            response = await fac.client.post(path, content=content)
            assert response.status_code == 413, response.text
            assert response.headers["content-type"] == "application/problem+json"
            assert response.json()["status"] == 413
    assert await _relayer_state(fac) == before


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


# ------------------------------------------------------------------- only allow-listed assets are settled


async def _relayer_state(fac: Fac) -> tuple[int, int, int]:
    address = fac.relayer.address
    return (
        await fac.rpc.get_transaction_count(address, "latest"),
        await fac.rpc.get_transaction_count(address, "pending"),
        await fac.rpc.get_balance(address),
    )


async def test_a_token_that_is_not_allow_listed_is_refused_before_any_chain_call(fac: Fac) -> None:
    # A second, genuine EIP-3009 token with the very same domain name and version, at another address: the
    # facilitator would settle it if it trusted the request's asset (its gas, someone else's token).
    deployer = TxSender(fac.rpc, fac.devnet.accounts[0].private_key, chain_id=fac.devnet.chain_id)
    created = await deployer.transact(
        None, bytes.fromhex(load_artifact("TestUSDC").bytecode[2:]), gas=5_000_000
    )
    assert created.contract_address is not None
    other = to_checksum_address(created.contract_address)
    payer = await fac.payer(other, deployer)
    foreign = Eip712Domain(fac.devnet.usdc_name, fac.devnet.usdc_version, fac.devnet.chain_id, other)
    wrong_name = Eip712Domain("Not USD Coin", fac.devnet.usdc_version, fac.devnet.chain_id, fac.usdc)
    wrong_version = Eip712Domain(fac.devnet.usdc_name, "1", fac.devnet.chain_id, fac.usdc)
    before = await _relayer_state(fac)
    for domain in (foreign, wrong_name, wrong_version):
        body = fac.body(payer, domain=domain)
        for path in ("/verify", "/settle"):
            response = await fac.client.post(path, content=body)
            assert response.status_code == 400, (path, domain, response.text)
            assert response.headers["content-type"] == "application/problem+json"
            problem = response.json()
            assert problem["status"] == 400 and problem["title"] == "Bad Request" and problem["detail"]
            reason = problem["invalidReason"] if path == "/verify" else problem["errorReason"]
            assert reason == "invalid_payment_requirements"
            assert problem.get("isValid", problem.get("success")) is False
    assert await _relayer_state(fac) == before  # no transaction sent, no gas spent
    assert await fac.balance(payer.address, other) == 10**6
    assert await fac.balance(fac.payee, other) == 0


async def test_another_network_is_a_bad_request(fac: Fac) -> None:
    payer = await fac.payer()
    requirements = msgspec.structs.replace(fac.requirements, network="eip155:1")
    before = await _relayer_state(fac)
    response = await fac.client.post("/settle", content=fac.body(payer, requirements=requirements))
    assert response.status_code == 400 and response.json()["errorReason"] == "invalid_network"
    assert await _relayer_state(fac) == before


async def test_v1_requests_for_a_token_that_is_not_allow_listed_are_refused(fac: Fac) -> None:
    payer = await fac.payer()
    other = LocalSigner.random().address  # no contract at all: still never called
    signed = sign_transfer_authorization(
        payer,
        Eip712Domain(fac.devnet.usdc_name, fac.devnet.usdc_version, fac.devnet.chain_id, other),
        to=fac.payee,
        value=2500,
        valid_before=int(time.time()) + 60,
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
        asset=other,
        extra={"name": fac.devnet.usdc_name, "version": fac.devnet.usdc_version},
    )
    payload = PaymentPayloadV1(scheme="exact", network="localhost", payload=encode_scheme_payload(signed))
    body = json_encode(FacilitatorRequestV1(payment_payload=payload, payment_requirements=requirements))
    before = await _relayer_state(fac)
    response = await fac.client.post("/settle", content=body)
    assert response.status_code == 400 and response.json()["success"] is False
    assert await _relayer_state(fac) == before


def test_a_facilitator_needs_allowed_assets_on_its_network(devnet: DevnetState) -> None:
    rpc = Rpc(devnet.rpc_url)
    relayer = TxSender(rpc, devnet.accounts[RELAYER].private_key, chain_id=devnet.chain_id)
    scheme = ExactScheme(ExactEvm(rpc, relayer))
    asset = Asset(address=devnet.contracts["usdc"], chain_id=1, name="USD Coin", version="2")
    with pytest.raises(ConfigurationError, match="allowed asset"):
        facilitator_app(scheme, network=devnet.network, signers=[], assets=[])
    with pytest.raises(ConfigurationError, match="eip155:1"):
        facilitator_app(scheme, network=devnet.network, signers=[], assets=[asset])
