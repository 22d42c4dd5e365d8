"""Metered `escrow`: a session key signs a payment for a maximum, the gateway settles the actual charge.

Against anvil with the real AgentEscrow: the payee receives exactly the actual charge, the grant's budget
counts what was paid (not the maxima), the per-call cap holds the maximum, and nothing is ever paid past
what was signed. Only the payee, or an operator it allowed, may settle below the maximum.
"""

from __future__ import annotations

import time

import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from escrow.chain._rpc import TxSender
from escrow.payments._escrow_verify import (
    EscrowClaim,
    EscrowRejected,
    EscrowVerifier,
    GrantCache,
    accounts_for,
)
from escrow.payments._exposure import deposit_accounts
from escrow.payments._settler import EscrowSettler
from gateway import MemoryStore
from gateway._escrow_scheme import EscrowScheme
from gateway._pricing import Quote
from gateway._scheme import Presented, Verified
from x402 import LocalSigner, PaymentRequired, ResourceInfo
from x402._errors import NoPayableOffer
from x402._escrow import EscrowCode, EscrowPayload
from x402.client import offers_from_payment_required
from x402.client_escrow import EscrowWallet

from .test_escrow_chain import PRICE, Chain, _fund, _item, _key
from .test_escrow_chain import chain as chain
from .test_escrow_chain import env as env

pytestmark = [pytest.mark.chain, pytest.mark.anyio]

MAXIMUM = 10 * PRICE


class Payee:
    """A payee with a key (it must allow the gateway's settler), its gateway scheme and settler."""

    def __init__(self, chain: Chain, *, allow_settler: bool = True) -> None:
        self.chain = chain
        self.key = LocalSigner.random()
        self.address = self.key.address
        self.allow_settler = allow_settler
        self.store = MemoryStore()
        self.settler_sender = chain.sender(chain.env.settler_a)
        self.settler = EscrowSettler(self.store, self.settler_sender, batch_size=64, max_age=3600)
        verifier = EscrowVerifier(
            chain.escrow, chain_id=chain.env.chain_id, cache=GrantCache(chain.escrow, poll_interval=0.5)
        )
        self.scheme = EscrowScheme(verifier, self.store, self.settler, credit_limit=10**12)

    async def setup(self) -> Payee:
        await _fund(self.chain.rpc, self.address)
        if self.allow_settler:
            tx = TxSender(self.chain.rpc, _key(self.key), chain_id=self.chain.env.chain_id)
            data = self.chain.escrow.set_settler_calldata(self.settler_sender.address, True)
            await tx.transact(self.chain.escrow.address, data, gas=100_000)
            assert await self.chain.escrow.is_settler(self.address, self.settler_sender.address)
        return self

    def quote(self, amount: int = MAXIMUM) -> Quote:
        env = self.chain.env
        return Quote(
            route="GET /metered",
            method="GET",
            path="/metered",
            url="http://sub/metered",
            amount=amount,
            asset=env.asset,
            pay_to=self.address,
            description="",
            mime_type="application/json",
            max_timeout_seconds=60,
            schemes=None,
        )

    async def verify(self, payload: EscrowPayload) -> Verified:
        offer = self.scheme.offer(self.quote(int(payload.payment.amount)))
        presented = Presented(dialect="x402v2", payload=msgspec.to_builtins(payload))
        return await self.scheme.verify(offer, presented, now=time.time())


async def _spent(chain: Chain, payer: str, session: LocalSigner) -> int:
    return (await chain.escrow.grant_of(payer, session.address)).spent


async def test_deferred_metered_payments_pay_exactly_the_actual_charges(chain: Chain) -> None:
    sub = await Payee(chain).setup()
    session, g = await chain.new_grant(max_per_call=MAXIMUM, budget=1_000 * PRICE)
    actuals = [3 * PRICE, MAXIMUM, 1, 0, 7 * PRICE]
    before = await chain.usdc.balance_of(sub.address)
    deposit_before = await chain.escrow.deposit_of(g.payer, chain.env.usdc)
    for i, actual in enumerate(actuals):
        verified = await sub.verify(chain.sign(session, g, sub.address, MAXIMUM, nonce=50 + i))
        assert verified.amount == MAXIMUM  # the signed maximum, whatever is charged
        settlement = sub.scheme.settlement(verified, now=time.time(), actual=actual)
        assert settlement.amount == actual
        await sub.store.enqueue(settlement)
    out = await sub.settler.drain()
    assert sorted(o.amount for o in out) == sorted(actuals)
    assert all(o.status == "settled" for o in out)
    assert [o.tx_hash for o in out if o.amount == 0] == [""]  # zero: no transaction
    assert len({o.tx_hash for o in out if o.amount}) == 1  # the rest: one batch
    paid = sum(actuals)
    assert await chain.usdc.balance_of(sub.address) - before == paid
    assert await _spent(chain, g.payer, session) == paid  # the budget counts the actual charges
    assert deposit_before - await chain.escrow.deposit_of(g.payer, chain.env.usdc) == paid
    assert not await chain.escrow.nonce_used(session.address, 53)  # the zero charge used no nonce
    # Every reservation is back: nothing stays pending against the payer.
    credit, reserved, settled = accounts_for(
        chain.env.chain_id, chain.env.escrow, g.payer, session.address, g.epoch
    )
    pool = deposit_accounts(chain.env.chain_id, chain.env.escrow, g.payer, chain.env.usdc)
    assert await sub.store.get_pending(credit) == 0
    assert await sub.store.get_pending(reserved) - await sub.store.get_pending(settled) == 0
    assert await sub.store.get_pending(pool.reserved) - await sub.store.get_pending(pool.settled) == 0


async def test_settle_before_response_pays_the_actual_and_zero_sends_nothing(chain: Chain) -> None:
    sub = await Payee(chain).setup()
    session, g = await chain.new_grant(max_per_call=MAXIMUM, budget=1_000 * PRICE)
    before = await chain.usdc.balance_of(sub.address)
    v1 = await sub.verify(chain.sign(session, g, sub.address, MAXIMUM, nonce=1))
    tx = await sub.scheme.settle(v1, actual=4 * PRICE)
    assert tx.startswith("0x")
    v2 = await sub.verify(chain.sign(session, g, sub.address, MAXIMUM, nonce=2))
    assert await sub.scheme.settle(v2, actual=0) == ""
    assert await chain.usdc.balance_of(sub.address) - before == 4 * PRICE
    assert await _spent(chain, g.payer, session) == 4 * PRICE
    _, reserved, settled = accounts_for(chain.env.chain_id, chain.env.escrow, g.payer, session.address, 1)
    assert await sub.store.get_pending(reserved) - await sub.store.get_pending(settled) == 0


async def test_an_actual_above_the_maximum_is_refused_before_anything_moves(chain: Chain) -> None:
    sub = await Payee(chain).setup()
    session, g = await chain.new_grant(max_per_call=MAXIMUM)
    verified = await sub.verify(chain.sign(session, g, sub.address, MAXIMUM, nonce=1))
    with pytest.raises(ValueError, match="signed maximum"):
        sub.scheme.settlement(verified, now=time.time(), actual=MAXIMUM + 1)
    with pytest.raises(ValueError, match="signed maximum"):
        await sub.scheme.settle(verified, actual=MAXIMUM + 1)
    with pytest.raises(ValueError, match="signed maximum"):
        await sub.scheme.settle(verified, actual=-1)
    assert not await chain.escrow.nonce_used(session.address, 1)
    # Even a hand-made claim past the maximum is refused by the contract, not paid.
    claim = msgspec.structs.replace(verified.state.claim, actual=MAXIMUM + 1)
    await sub.store.enqueue(_item("past-max", claim))
    (outcome,) = await sub.settler.drain()
    assert (outcome.status, outcome.code) == ("dead", EscrowCode.ACTUAL_EXCEEDS_AMOUNT)
    assert await chain.usdc.balance_of(sub.address) == 0


async def test_a_settler_the_payee_did_not_allow_cannot_charge_less(chain: Chain) -> None:
    sub = await Payee(chain, allow_settler=False).setup()
    session, g = await chain.new_grant(max_per_call=MAXIMUM)
    payload = chain.sign(session, g, sub.address, MAXIMUM, nonce=1)
    claim = EscrowClaim(
        chain_id=chain.env.chain_id,
        escrow=chain.env.escrow,
        signer=session.address,
        payload=payload,
        actual=PRICE,
    )
    await sub.store.enqueue(_item("stranger", claim))
    (outcome,) = await sub.settler.drain()
    assert (outcome.status, outcome.code) == ("dead", EscrowCode.NOT_PAYEE_SETTLER)
    assert not await chain.escrow.nonce_used(session.address, 1)  # the payment is still good in full


async def test_the_cap_holds_the_maximum_at_the_client_and_the_gateway(chain: Chain) -> None:
    sub = await Payee(chain).setup()
    session, g = await chain.new_grant(max_per_call=MAXIMUM)
    wallet = EscrowWallet.from_grant(session, g, chain_id=chain.env.chain_id, escrow=chain.env.escrow)
    req = sub.scheme.offer(sub.quote(MAXIMUM + 1)).requirements
    (offer,) = offers_from_payment_required(
        PaymentRequired(resource=ResourceInfo(url="http://sub/metered"), accepts=[req])
    )
    assert not wallet.can_pay(offer)
    with pytest.raises(NoPayableOffer):  # refused before signing
        wallet.pay(offer)
    with pytest.raises(EscrowRejected) as at_gateway:
        await sub.verify(chain.sign(session, g, sub.address, MAXIMUM + 1, nonce=1))
    assert at_gateway.value.code == EscrowCode.AMOUNT_EXCEEDS_CAP


@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    pairs=st.lists(st.tuples(st.integers(1, MAXIMUM), st.integers(0, MAXIMUM)), min_size=1, max_size=6),
)
async def test_property_paid_never_exceeds_signed_and_budget_counts_paid(
    chain: Chain, pairs: list[tuple[int, int]]
) -> None:
    sub = await Payee(chain).setup()
    maxima = [m for m, _ in pairs]
    actuals = [min(m, a) for m, a in pairs]
    session, g = await chain.new_grant(max_per_call=MAXIMUM, budget=sum(maxima))
    for i, (m, a) in enumerate(zip(maxima, actuals, strict=True)):
        verified = await sub.verify(chain.sign(session, g, sub.address, m, nonce=i))
        await sub.store.enqueue(sub.scheme.settlement(verified, now=time.time(), actual=a))
    out = await sub.settler.drain()
    assert all(o.status == "settled" for o in out)
    received = await chain.usdc.balance_of(sub.address)
    assert received == sum(actuals) <= sum(maxima)
    assert await _spent(chain, g.payer, session) == received
