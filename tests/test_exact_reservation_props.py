"""Property: `ExactScheme` never promises more of a payer's balance than it holds (issue 9 item 1).

Random programs of payments, settlements and releases run against the scheme with a real `MemoryStore`
and a ledger standing in for the token (its balance drops when a payment settles, as the chain's would).
After every step: the store's reservation equals what is accepted and neither settled nor released; that
never exceeds the payer's balance; a payment is refused exactly when the balance minus what is reserved
cannot cover it; and a payment is deferred only while the payer's reserved total stays within the credit
limit. The same properties on a real chain, concurrently and over HTTP: tests/test_exact_reservations.py.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from escrow.payments._exact import ExactRejected
from escrow.payments._exact_settler import exact_reservation
from gateway import ExactScheme, MemoryStore, PaymentFailed
from gateway._scheme import Offer, Presented, Verified
from x402 import (
    Eip712Domain,
    ExactEvmPayload,
    LocalSigner,
    PaymentRejected,
    PaymentRequirements,
    Reason,
    encode_scheme_payload,
    sign_transfer_authorization,
)

CHAIN = 31337
TOKEN = "0x" + "11" * 20
PAYEE = "0x" + "22" * 20
DOMAIN = Eip712Domain("USD Coin", "2", CHAIN, TOKEN)
PAYER = LocalSigner(bytes.fromhex("33" * 32))


class Ledger:
    """The token's view of one payer: `verify` reads the balance, `settle` moves the amount."""

    def __init__(self, balance: int) -> None:
        self.balance = balance

    async def verify(self, domain: Eip712Domain, payload: ExactEvmPayload) -> int:
        return self.balance

    async def settle(self, domain: Eip712Domain, payload: ExactEvmPayload) -> str:
        value = int(payload.authorization.value)
        if value > self.balance:
            raise ExactRejected("transfer amount exceeds balance", code=Reason.INSUFFICIENT_BALANCE)
        self.balance -= value
        return "0x" + "ab" * 32


def _offer(amount: int) -> Offer:
    requirements = PaymentRequirements(
        scheme="exact",
        network=f"eip155:{CHAIN}",
        asset=TOKEN,
        amount=str(amount),
        pay_to=PAYEE,
        max_timeout_seconds=60,
        extra={"name": "USD Coin", "version": "2"},
    )
    return Offer(scheme="exact", requirements=requirements)


def _presented(amount: int) -> Presented:
    payload = sign_transfer_authorization(
        PAYER, DOMAIN, to=PAYEE, value=amount, valid_before=int(time.time()) + 600
    )
    return Presented(dialect="x402v2", payload=encode_scheme_payload(payload))


step = st.one_of(
    st.tuples(st.just("pay"), st.integers(1, 4)),
    st.tuples(st.just("settle"), st.integers(0, 20)),
    st.tuples(st.just("release"), st.integers(0, 20)),
    st.tuples(st.just("fund"), st.integers(1, 5)),
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(balance=st.integers(0, 10), credit=st.integers(0, 10), program=st.lists(step, max_size=25))
def test_reservations_never_exceed_the_balance(balance: int, credit: int, program: list[Any]) -> None:
    asyncio.run(_run(balance, credit, program))


async def _run(balance: int, credit: int, program: list[tuple[str, int]]) -> None:
    ledger = Ledger(balance)
    store = MemoryStore()
    scheme = ExactScheme(ledger, store=store, credit_limit=credit)
    account = exact_reservation(CHAIN, TOKEN, PAYER.address)
    open_: list[Verified] = []  # accepted, neither settled nor released
    for op, n in program:
        outstanding = sum(v.amount for v in open_)
        if op == "pay":
            try:
                verified = await scheme.verify(_offer(n), _presented(n), now=time.time())
                await scheme.reserve(verified)  # the pipeline's next step, once the claim is taken
            except PaymentRejected as exc:
                assert exc.code == Reason.INSUFFICIENT_FUNDS_PENDING
                assert outstanding + n > ledger.balance  # refused only when it cannot be covered
            else:
                assert outstanding + n <= ledger.balance
                # Deferred (not settled before serving) only within the credit limit.
                assert scheme.settle_now(verified) or outstanding + n <= credit
                open_.append(verified)
        elif op == "settle" and open_:
            verified = open_.pop(n % len(open_))
            try:
                await scheme.settle(verified)
            except ExactRejected as exc:  # never: what is reserved is always there to settle
                raise AssertionError(f"a reserved payment failed to settle: {exc}") from exc
            except PaymentFailed as exc:
                raise AssertionError(f"a reserved payment failed to settle: {exc}") from exc
        elif op == "release" and open_:
            await scheme.release(open_.pop(n % len(open_)))
        elif op == "fund":
            ledger.balance += n
        assert await store.get_pending(account) == sum(v.amount for v in open_)
        assert sum(v.amount for v in open_) <= ledger.balance
