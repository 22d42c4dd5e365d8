"""`examples.subagent`'s `GET /metered?units=N` (at most $0.01, charged $0.0001 x N) paid per call.

One 402 offers it three ways: x402 `upto` (Permit2) and metered `escrow` in `accepts`, and the MPP
`evm/session` challenge in `WWW-Authenticate` (paid in `tests/test_session_example.py`). Our own client
pays it through `upto` from a plain EOA and through metered `escrow` with a session-key wallet: the payer
signs the maximum, the payee receives exactly the units used, and the receipt names that charge.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

import httpx
import pytest

import escrow
from escrow import DevnetState, Erc20, TxSender
from examples.subagent import allow_metered_settler, build_app, with_sessions
from tests._gateways import Chain, key_hex
from tests.conftest import unavailable
from x402 import (
    LocalSigner,
    SettleResponse,
    SpendPolicyViolation,
    decode_payment_required,
    parse_www_authenticate,
)
from x402._upto import PERMIT2_ADDRESS
from x402.client import PaymentAuth, SpendPolicy, receipt_of
from x402.client_escrow import SessionKeyWallet
from x402.client_upto import UptoWallet

pytestmark = [pytest.mark.chain, pytest.mark.anyio]

MAXIMUM = 10_000  # $0.01
UNIT = 100  # $0.0001


@pytest.fixture
async def chain(devnet: DevnetState) -> AsyncIterator[Chain]:
    if "permit2" not in devnet.contracts:
        unavailable("this devnet has no Permit2 (py-evm): no upto")
    value = Chain(devnet)
    try:
        yield value
    finally:
        await value.aclose()


@contextlib.asynccontextmanager
async def _subagent(chain: Chain) -> AsyncIterator[tuple[httpx.AsyncClient, str, escrow.Chain]]:
    """The example sub-agent (exact, escrow, upto and the MPP session) on a fresh relayer and payee; yields
    an unpaid client, the payee's address and the public chain."""
    devnet = chain.devnet
    payee = await chain.key()
    public = escrow.Chain.from_devnet(devnet, relayer=key_hex(await chain.key()))
    await allow_metered_settler(public, key_hex(payee))
    app = with_sessions(
        build_app(public, pay_to=payee.address, schemes=["exact", "escrow", "upto"], store="memory://"),
        public,
        channels=devnet.contracts["channels"],
        payee_key=key_hex(payee),
        secret="s" * 64,
    )
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://sub") as http:
        yield http, payee.address, public
    await public.aclose()


async def test_one_402_offers_upto_escrow_and_the_session(chain: Chain) -> None:
    async with _subagent(chain) as (http, payee, _):
        r = await http.get("/metered?units=3")
        assert r.status_code == 402
        accepts = decode_payment_required(r.headers["payment-required"]).accepts
        assert [(a.scheme, a.amount, a.pay_to) for a in accepts] == [
            ("upto", str(MAXIMUM), payee),
            ("escrow", str(MAXIMUM), payee),
        ]
        challenges = [c for v in r.headers.get_list("www-authenticate") for c in parse_www_authenticate(v)]
        assert ("evm", "session") in {(c.method, c.intent) for c in challenges}
        # A fixed-price route is not offered as upto: it would be charged its maximum anyway.
        hello = decode_payment_required((await http.get("/hello")).headers["payment-required"])
        assert {a.scheme for a in hello.accepts} == {"exact", "escrow"}


async def test_upto_pays_exactly_the_units_used(chain: Chain) -> None:
    payer = await chain.key()
    await chain.mint(payer.address, 50 * MAXIMUM)
    sender = TxSender(chain.rpc, key_hex(payer), chain_id=chain.devnet.chain_id)
    usdc = Erc20(chain.rpc, chain.usdc)
    await sender.transact(usdc.address, usdc.approve_calldata(PERMIT2_ADDRESS, 2**256 - 1), gas=100_000)
    async with _subagent(chain) as (http, payee, _):
        policy = SpendPolicy(max_per_call="$0.01", total_budget="$1")
        auth = PaymentAuth(UptoWallet(payer, max_per_call=MAXIMUM), policy)
        before = await chain.balance(payer.address)
        r = await http.get("/metered?units=3", auth=auth)
        assert r.status_code == 200 and r.json()["units"] == 3
        receipt = receipt_of(r)
        assert isinstance(receipt, SettleResponse) and receipt.amount == str(3 * UNIT)
        assert "settlement-overrides" not in r.headers
        assert await chain.balance(payee) == 3 * UNIT
        assert before - await chain.balance(payer.address) == 3 * UNIT
        assert (policy.spent, policy.reserved) == (3 * UNIT, 0)  # reserved the maximum, committed the actual
        # Zero units: nothing is sent, nothing is charged.
        r = await http.get("/metered?units=0", auth=auth)
        assert r.status_code == 200 and receipt_of(r).amount == "0"  # type: ignore[union-attr]
        assert before - await chain.balance(payer.address) == 3 * UNIT
        # A failed call (units out of range) is not charged either.
        assert (await http.get("/metered?units=101", auth=auth)).status_code == 400
        # "²" passes str.isdigit() but not int(): a 400 too, never the handler's 500
        assert (await http.get("/metered?units=%C2%B2", auth=auth)).status_code == 400
        assert await chain.balance(payee) == 3 * UNIT


async def test_metered_escrow_pays_exactly_the_units_used(chain: Chain) -> None:
    owner = LocalSigner.random()
    await chain.mint(owner.address, 20 * MAXIMUM)
    async with _subagent(chain) as (http, payee, public):
        file = await public.open_session(
            owner, max_per_call=MAXIMUM, budget=10 * MAXIMUM, deposit=20 * MAXIMUM
        )
        policy = SpendPolicy(max_per_call="$0.01", total_budget="$1")
        auth = PaymentAuth(SessionKeyWallet.from_file(file), policy)
        r = await http.get("/metered?units=7", auth=auth)
        assert r.status_code == 200 and r.json()["units"] == 7
        receipt = receipt_of(r)
        assert isinstance(receipt, SettleResponse)
        assert receipt.amount == str(7 * UNIT)
        assert await chain.balance(payee) == 7 * UNIT
        assert await public.escrow.deposit_of(owner.address, chain.usdc) == 20 * MAXIMUM - 7 * UNIT
        grant = await public.escrow.grant_of(owner.address, file.grant.signer)
        assert grant.spent == 7 * UNIT  # the budget counts what was paid, not the maximum
        assert policy.spent == 7 * UNIT
        # A maximum above the payer's own per-call limit is refused before anything is signed.
        small = SpendPolicy(max_per_call="$0.005")
        with pytest.raises(SpendPolicyViolation):
            await http.get("/metered?units=1", auth=PaymentAuth(SessionKeyWallet.from_file(file), small))
