"""x402 `upto` against anvil: Permit2 and the upto proxy at their canonical addresses, a plain-EOA payer.

The payee receives exactly the actual charge (at most the signed maximum, 0 sends nothing); only the
facilitator the payer named can settle; a bad spender, recipient or facilitator is a 402 with the spec's
code; a maximum above the client's per-call cap is refused before signing and, above the route's
maximum, at the gateway.
"""

from __future__ import annotations

import time
from typing import Any

import httpx
import msgspec
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from escrow import DevnetState
from escrow.chain._rpc import Rpc, TxSender
from escrow.payments._escrow import Erc20
from escrow.payments._upto import UptoChain
from gateway import Asset, MemoryStore, PaymentMiddleware
from gateway._pricing import Quote
from gateway._scheme import Presented, Verified, in_flight_kind
from gateway._upto import UptoScheme
from tests.conftest import unavailable
from x402 import LocalSigner, PaymentRejected, decode_payment_required
from x402._errors import NoPayableOffer
from x402._upto import PERMIT2_ADDRESS, UPTO_PROXY_ADDRESS, UptoCode, UptoPayload, sign_upto
from x402.client import PaymentAuth, SpendPolicy, offers_from_payment_required, receipt_of
from x402.client_upto import UptoWallet

pytestmark = [pytest.mark.chain, pytest.mark.anyio]

MAXIMUM = 10_000  # $0.01


def _key(signer: LocalSigner) -> str:
    return "0x" + signer._key.secret.hex()


class Env:
    def __init__(self, devnet: DevnetState) -> None:
        if devnet.backend != "anvil":
            unavailable("upto needs anvil_setCode (Permit2 at its canonical address)")
        self.devnet = devnet
        self.rpc = Rpc(devnet.rpc_url)
        self.usdc = Erc20(self.rpc, devnet.contracts["usdc"])
        self.asset = Asset(
            address=devnet.contracts["usdc"],
            chain_id=devnet.chain_id,
            name=devnet.usdc_name,
            version=devnet.usdc_version,
            decimals=devnet.usdc_decimals,
        )
        self.payer = LocalSigner.random()
        self.facilitator = LocalSigner.random()
        self.pay_to = LocalSigner.random().address
        self.chain = UptoChain(self.rpc, self.sender(self.facilitator))
        self.scheme = UptoScheme(self.chain)

    def sender(self, who: LocalSigner) -> TxSender:
        return TxSender(self.rpc, _key(who), chain_id=self.devnet.chain_id)

    async def setup(self, *, approve: bool = True) -> Env:
        for who in (self.payer, self.facilitator):
            await self.rpc.request("anvil_setBalance", [who.address, hex(10**20)])
        minter = self.sender(self.payer)
        await minter.transact(
            self.usdc.address, self.usdc.abi.encode("mint", self.payer.address, 100 * MAXIMUM), gas=100_000
        )
        if approve:
            await minter.transact(
                self.usdc.address, self.usdc.approve_calldata(PERMIT2_ADDRESS, 2**256 - 1), gas=100_000
            )
        return self

    def quote(self, amount: int = MAXIMUM) -> Quote:
        return Quote(
            route="GET /metered",
            method="GET",
            path="/metered",
            url="http://sub/metered",
            amount=amount,
            asset=self.asset,
            pay_to=self.pay_to,
            description="",
            mime_type="application/json",
            max_timeout_seconds=60,
            schemes=None,
        )

    def sign(self, maximum: int = MAXIMUM, **kw: Any) -> UptoPayload:
        now = int(time.time())
        args: dict[str, Any] = {
            "chain_id": self.devnet.chain_id,
            "token": self.asset.address,
            "maximum": maximum,
            "pay_to": self.pay_to,
            "facilitator": self.facilitator.address,
            "deadline": now + 60,
            "valid_after": now - 600,
        }
        args.update(kw)
        return sign_upto(self.payer, **args)

    async def verify(self, payload: UptoPayload, amount: int = MAXIMUM) -> Verified:
        offer = self.scheme.offer(self.quote(amount))
        presented = Presented(dialect="x402v2", payload=msgspec.to_builtins(payload))
        return await self.scheme.verify(offer, presented, now=time.time())


@pytest.fixture
async def env(devnet: DevnetState) -> Any:
    e = await Env(devnet).setup()
    yield e
    await e.rpc.aclose()


async def test_permit2_and_the_proxy_stand_at_their_canonical_addresses(env: Env) -> None:
    for address in (PERMIT2_ADDRESS, UPTO_PROXY_ADDRESS):
        assert await env.rpc.request("eth_getCode", [address, "latest"]) not in ("0x", None)
    assert env.devnet.contracts["permit2"] == PERMIT2_ADDRESS
    assert env.devnet.contracts["upto_proxy"] == UPTO_PROXY_ADDRESS


async def test_the_payee_receives_exactly_the_actual_charge(env: Env) -> None:
    payer_before = await env.usdc.balance_of(env.payer.address)
    charged = 0
    for actual in (3_000, MAXIMUM, 1, 0):
        verified = await env.verify(env.sign())
        assert verified.amount == MAXIMUM
        tx = await env.scheme.settle(verified, actual=actual)
        assert (tx == "") == (actual == 0)  # zero: no transaction
        charged += actual
        assert await env.usdc.balance_of(env.pay_to) == charged
    assert payer_before - await env.usdc.balance_of(env.payer.address) == charged


async def test_nothing_exceeds_the_signed_maximum(env: Env) -> None:
    verified = await env.verify(env.sign())
    with pytest.raises(ValueError, match="signed maximum"):
        await env.scheme.settle(verified, actual=MAXIMUM + 1)
    # Even sent straight to the proxy, past the maximum reverts.
    with pytest.raises(Exception):  # noqa: B017  (TransactionFailed or an estimate error)
        await env.chain.settle(verified.state, MAXIMUM + 1)
    assert await env.usdc.balance_of(env.pay_to) == 0
    # The same authorization settles once, for any amount: the second attempt is refused before the chain.
    await env.scheme.settle(verified, actual=5)
    with pytest.raises(PaymentRejected) as again:
        await env.verify(verified.state)
    assert again.value.code == UptoCode.NONCE_USED
    assert await env.usdc.balance_of(env.pay_to) == 5


async def test_only_the_named_facilitator_can_settle(env: Env) -> None:
    verified = await env.verify(env.sign())
    other = LocalSigner.random()
    await env.rpc.request("anvil_setBalance", [other.address, hex(10**20)])
    stranger = UptoChain(env.rpc, env.sender(other))
    with pytest.raises(Exception):  # noqa: B017  (UnauthorizedFacilitator revert)
        await stranger.settle(verified.state, 1)
    assert await env.usdc.balance_of(env.pay_to) == 0


@pytest.mark.parametrize(
    ("change", "code"),
    [
        ({"facilitator": "0x" + "11" * 20}, UptoCode.FACILITATOR_MISMATCH),
        ({"pay_to": "0x" + "22" * 20}, UptoCode.RECIPIENT_MISMATCH),
        ({"maximum": MAXIMUM + 1}, UptoCode.AMOUNT_MISMATCH),
        ({"deadline": 1}, UptoCode.DEADLINE_EXPIRED),
        ({"valid_after": 2**40}, UptoCode.NOT_YET_VALID),
    ],
)
async def test_bad_authorizations_are_refused_with_the_spec_code(
    env: Env, change: dict[str, Any], code: str
) -> None:
    with pytest.raises(PaymentRejected) as refused:
        await env.verify(env.sign(**change))
    assert refused.value.code == code


async def test_another_spender_is_refused(env: Env) -> None:
    payload = env.sign()
    auth = msgspec.structs.replace(payload.permit2_authorization, spender="0x" + "33" * 20)
    with pytest.raises(PaymentRejected) as refused:
        await env.verify(msgspec.structs.replace(payload, permit2_authorization=auth))
    assert refused.value.code == UptoCode.INVALID_SPENDER


async def test_no_permit2_allowance_is_412(devnet: DevnetState) -> None:
    e = await Env(devnet).setup(approve=False)
    try:
        with pytest.raises(PaymentRejected) as refused:
            await e.verify(e.sign())
        assert refused.value.code == UptoCode.ALLOWANCE_REQUIRED and refused.value.status_hint == 412
    finally:
        await e.rpc.aclose()


async def test_our_client_pays_an_upto_route_and_is_capped_before_signing(env: Env) -> None:
    async def work(request: Request) -> JSONResponse:
        return JSONResponse({"ok": True})

    app = PaymentMiddleware(
        Starlette(routes=[Route("/metered", work)]),
        routes={"GET /metered": MAXIMUM},
        schemes=[env.scheme],
        pay_to=env.pay_to,
        asset=env.asset,
        store=MemoryStore(),
        settle="before-response",
    )
    transport = httpx.ASGITransport(app=app)
    auth = PaymentAuth(UptoWallet(env.payer), SpendPolicy(max_per_call=MAXIMUM))
    async with httpx.AsyncClient(transport=transport, base_url="http://sub", auth=auth) as client:
        response = await client.get("/metered")
    assert response.status_code == 200, response.text
    receipt = receipt_of(response)
    assert receipt is not None and receipt.success and receipt.transaction
    assert await env.usdc.balance_of(env.pay_to) == MAXIMUM  # fixed-price route: the maximum
    # A wallet capped below the route's maximum refuses to sign at all.
    async with httpx.AsyncClient(transport=transport, base_url="http://sub") as plain:
        required = decode_payment_required((await plain.get("/metered")).headers["payment-required"])
    (offer,) = offers_from_payment_required(required)
    assert offer.extra["facilitatorAddress"] == env.facilitator.address
    capped = UptoWallet(env.payer, max_per_call=MAXIMUM - 1)
    assert not capped.can_pay(offer)
    with pytest.raises(NoPayableOffer):
        capped.pay(offer)


async def _lease_now(store: MemoryStore) -> list[Any]:
    return await store.lease(in_flight_kind("upto"), limit=10, lease_seconds=60)


async def test_recovery_closes_in_flight_records_from_the_chain(env: Env) -> None:
    store = MemoryStore()
    env.scheme.use_store(store)
    now = time.time()
    # 1. Settled, then the gateway died before recording it: recovery finds the proxy's log.
    paid = await env.verify(env.sign())
    record = env.scheme.settlement(paid, now=now, actual=3_000)
    await store.enqueue(msgspec.structs.replace(record, kind=in_flight_kind("upto")))
    tx = await env.scheme.settle(paid, actual=3_000)
    # 2. Never settled, and past its deadline: final, nothing charged.
    expired = env.sign(deadline=int(now) - 1)
    gone = Verified(
        scheme="upto",
        key="upto:expired",
        payer=env.payer.address,
        amount=MAXIMUM,
        network=env.asset.network,
        state=expired,
        expires_at=now - 1,
    )
    await store.enqueue(
        msgspec.structs.replace(env.scheme.settlement(gone, now=now), kind=in_flight_kind("upto"))
    )
    # 3. Not settled, still valid: looked at again at its deadline.
    pending = await env.verify(env.sign())
    await store.enqueue(
        msgspec.structs.replace(env.scheme.settlement(pending, now=now), kind=in_flight_kind("upto"))
    )
    outcomes = {o.key: o for o in await env.scheme.reconcile_items(await _lease_now(store))}
    assert (outcomes[paid.key].status, outcomes[paid.key].tx_hash, outcomes[paid.key].amount) == (
        "settled",
        tx,
        3_000,
    )
    assert (outcomes["upto:expired"].status, outcomes["upto:expired"].code) == ("dead", "upto_never_settled")
    assert (outcomes[pending.key].status, outcomes[pending.key].code) == ("retry", "upto_unsettled")
    item = await store.get_settlement(paid.key)
    assert item is not None and item.state == "settled" and item.tx_hash == tx
    assert await env.usdc.balance_of(env.pay_to) == 3_000
