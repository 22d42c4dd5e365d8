"""Deferred `escrow` settlement serves only what the payer's deposit can pay (issue 9, item 2).

On-chain `check` sees one payment at a time, so a gateway must count the payments it accepted and has not
settled against the payer's deposit, net of a requested withdrawal (`escrow.payments._exposure`). Two
attacks that
served unpaid work before:

- a payer deposits 1 x price, grants 100 x price of budget and sends 10 calls at once;
- a payer requests a full withdrawal, lets it mature, keeps paying, then withdraws.

Both run through the real pipeline (`PaymentMiddleware` over ASGI, `EscrowScheme`, `EscrowSettler`, a
`MemoryStore`) against anvil with the real AgentEscrow and TestUSDC; the withdrawal one moves the chain's
clock, so it starts its own `Devnet()`. The reservation arithmetic itself gets a hypothesis property test.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field

import httpx
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from escrow import Devnet, DevnetState
from escrow.chain._rpc import Rpc, TxSender
from escrow.payments._escrow import AgentEscrow, Erc20
from escrow.payments._escrow_verify import EscrowRejected, EscrowVerifier, GrantCache
from escrow.payments._exposure import budget_limit, deposit_accounts, deposit_limit
from escrow.payments._grants import deposit
from escrow.payments._settler import EscrowSettler
from gateway import Asset, MemoryStore, PaymentMiddleware
from gateway._escrow_scheme import EscrowScheme
from x402 import LocalSigner
from x402._escrow import EscrowCode, EscrowPayload, escrow_domain, sign_payment
from x402.client_escrow import EscrowWallet, SessionKeyAuth

pytestmark = pytest.mark.anyio

PRICE = 1_000
CREDIT = 100 * PRICE  # this gateway would serve 100 calls on credit: the deposit has to be what stops them


def _key(signer: LocalSigner) -> str:
    return "0x" + signer._key.secret.hex()


class Payer:
    """A fresh payer with its own deposit and one session key (nothing shared with other tests)."""

    def __init__(self, state: DevnetState, rpc: Rpc) -> None:
        self.state = state
        self.rpc = rpc
        self.owner = LocalSigner.random()
        self.session = LocalSigner.random()
        self.tx = TxSender(rpc, _key(self.owner), chain_id=state.chain_id)
        self.escrow = AgentEscrow(rpc, state.contracts["escrow"])
        self.usdc = Erc20(rpc, state.contracts["usdc"])

    async def fund(self, *, bank: str, deposit_amount: int, budget: int) -> None:
        banker = TxSender(self.rpc, bank, chain_id=self.state.chain_id)
        await banker.transact(self.owner.address, b"", gas=21_000, value=10**18)
        mint = self.usdc.abi.encode("mint", self.owner.address, deposit_amount)
        await self.tx.transact(self.usdc.address, mint, gas=100_000)
        await deposit(self.escrow, self.tx, self.usdc.address, deposit_amount)
        terms = (self.usdc.address, PRICE, budget, 0, int(time.time()) + 86_400)
        await self.tx.transact(
            self.escrow.address, self.escrow.abi.encode("grant", self.session.address, terms, []), gas=300_000
        )

    def auth(self) -> SessionKeyAuth:
        wallet = EscrowWallet(
            self.session,
            payer=self.owner.address,
            chain_id=self.state.chain_id,
            escrow=self.escrow.address,
            token=self.usdc.address,
        )
        return SessionKeyAuth(wallet)


class Gateway:
    """A sub-agent's deferred `escrow` gateway; its settler only runs when the test drains it."""

    def __init__(self, state: DevnetState, rpc: Rpc, *, settler_key: str) -> None:
        self.pay_to = LocalSigner.random().address
        self.store = MemoryStore()
        self.served = 0
        escrow = AgentEscrow(rpc, state.contracts["escrow"])
        self.settler = EscrowSettler(
            self.store, TxSender(rpc, settler_key, chain_id=state.chain_id), max_age=3600
        )
        verifier = EscrowVerifier(escrow, chain_id=state.chain_id, cache=GrantCache(escrow, poll_interval=0))
        scheme = EscrowScheme(verifier, self.store, self.settler, credit_limit=CREDIT)

        async def work(request: Request) -> JSONResponse:
            self.served += 1
            return JSONResponse({"ok": True})

        self.app = PaymentMiddleware(
            Starlette(routes=[Route("/work", work)]),
            routes={"GET /work": PRICE},
            schemes=[scheme],
            pay_to=self.pay_to,
            asset=Asset(
                address=state.contracts["usdc"],
                chain_id=state.chain_id,
                name=state.usdc_name,
                version=state.usdc_version,
                decimals=state.usdc_decimals,
            ),
            store=self.store,
            settle="deferred",
        )

    async def calls(self, auth: httpx.Auth, count: int) -> list[httpx.Response]:
        transport = httpx.ASGITransport(app=self.app)
        async with httpx.AsyncClient(transport=transport, base_url="http://sub", auth=auth) as client:
            return list(await asyncio.gather(*(client.get("/work") for _ in range(count))))


def _refused_for(response: httpx.Response, code: str) -> bool:
    return response.status_code == 402 and code in response.text + str(response.headers)


async def test_ten_concurrent_calls_on_one_price_of_deposit_serve_only_what_settles(
    devnet: DevnetState,
) -> None:
    rpc = Rpc(devnet.rpc_url)
    try:
        payer = Payer(devnet, rpc)
        await payer.fund(bank=devnet.accounts[8].private_key, deposit_amount=PRICE, budget=100 * PRICE)
        gateway = Gateway(devnet, rpc, settler_key=devnet.accounts[8].private_key)
        responses = await gateway.calls(payer.auth(), 10)
        served = [r for r in responses if r.status_code == 200]
        assert len(served) == gateway.served == 1  # the deposit pays one call, and one is served
        assert all(
            _refused_for(r, EscrowCode.INSUFFICIENT_DEPOSIT) for r in responses if r.status_code != 200
        )
        outcomes = await gateway.settler.drain()
        assert [o.status for o in outcomes] == ["settled"] * gateway.served
        assert await payer.usdc.balance_of(gateway.pay_to) == gateway.served * PRICE
        assert await payer.escrow.deposit_of(payer.owner.address, payer.usdc.address) == 0
        # Settled: the deposit pool holds nothing pending (reserved == settled).
        pool = deposit_accounts(
            devnet.chain_id, payer.escrow.address, payer.owner.address, payer.usdc.address
        )
        assert await gateway.store.get_pending(pool.reserved) == await gateway.store.get_pending(pool.settled)
    finally:
        await rpc.aclose()


async def test_a_matured_full_withdrawal_leaves_nothing_to_serve_on() -> None:
    with Devnet() as state:  # its own node: this test moves the chain's clock
        rpc = Rpc(state.rpc_url)
        try:
            payer = Payer(state, rpc)
            await payer.fund(
                bank=state.accounts[1].private_key, deposit_amount=10 * PRICE, budget=100 * PRICE
            )
            gateway = Gateway(state, rpc, settler_key=state.accounts[2].private_key)
            # Served while the deposit is whole: these settle.
            before = await gateway.calls(payer.auth(), 3)
            assert [r.status_code for r in before] == [200] * 3
            assert {o.status for o in await gateway.settler.drain()} == {"settled"}
            # The payer asks for everything back and waits out the delay.
            usdc = payer.usdc.address
            left = await payer.escrow.deposit_of(payer.owner.address, usdc)
            request = payer.escrow.abi.encode("requestWithdrawal", usdc, left)
            await payer.tx.transact(payer.escrow.address, request, gas=100_000)
            delay = await payer.escrow.withdrawal_delay()
            await rpc.request("evm_increaseTime", [delay + 1])
            await rpc.request("evm_mine", [])
            # It keeps paying: nothing it sends can settle any more, so nothing is served.
            after = await gateway.calls(payer.auth(), 5)
            assert all(_refused_for(r, EscrowCode.INSUFFICIENT_DEPOSIT) for r in after)
            await payer.tx.transact(
                payer.escrow.address, payer.escrow.abi.encode("withdraw", usdc), gas=100_000
            )
            assert await payer.escrow.deposit_of(payer.owner.address, usdc) == 0
            outcomes = await gateway.settler.drain()
            assert all(o.status == "settled" for o in outcomes)
            stats = await gateway.store.stats()
            assert stats.dead == 0 and stats.settled == gateway.served == 3
            assert await payer.usdc.balance_of(gateway.pay_to) == gateway.served * PRICE
        finally:
            await rpc.aclose()


async def test_a_revocation_the_grant_cache_has_not_polled_yet_is_refused(devnet: DevnetState) -> None:
    rpc = Rpc(devnet.rpc_url)
    try:
        payer = Payer(devnet, rpc)
        await payer.fund(bank=devnet.accounts[8].private_key, deposit_amount=10 * PRICE, budget=100 * PRICE)
        # A cache that polls once and then never again (its clock is frozen); no `check` simulation either.
        cache = GrantCache(payer.escrow, poll_interval=60.0, clock=lambda: 0.0)
        verifier = EscrowVerifier(payer.escrow, chain_id=devnet.chain_id, cache=cache, simulate=False)
        pay_to = LocalSigner.random().address

        def signed(nonce: int) -> EscrowPayload:
            return sign_payment(
                payer.session,
                escrow_domain(devnet.chain_id, payer.escrow.address),
                payer=payer.owner.address,
                payee=pay_to,
                token=payer.usdc.address,
                amount=PRICE,
                nonce=nonce,
                deadline=int(time.time()) + 3600,
                epoch=1,
            )

        kw = {"pay_to": pay_to, "amount": PRICE, "token": payer.usdc.address}
        await verifier.verify(signed(1), now=time.time(), **kw)
        revoke = payer.escrow.abi.encode("revoke", payer.session.address, 1)  # through epoch 1
        await payer.tx.transact(payer.escrow.address, revoke, gas=200_000)
        with pytest.raises(EscrowRejected) as refused:
            await verifier.verify(signed(2), now=time.time(), **kw)
        assert refused.value.code == EscrowCode.GRANT_REVOKED
    finally:
        await rpc.aclose()


# ------------------------------------------------------------------------- the reservation arithmetic


@dataclass
class _Chain:
    """The escrow's view of one payer: deposit, requested withdrawal, and one grant's budget and spend."""

    deposit: int
    budget: int
    withdrawal: int = 0
    spent: int = 0


@dataclass
class _Verification:
    """One verification in progress: the store's `settled` counters, then the chain, then it reserves."""

    amount: int
    phase: int = 0
    settled: tuple[int, int] = (0, 0)
    chain: tuple[int, int, int, int] = (0, 0, 0, 0)
    requests: int = 0  # withdrawal requests made before its chain read


@dataclass
class _Model:
    chain: _Chain
    store: MemoryStore = field(default_factory=MemoryStore)
    running: list[_Verification] = field(default_factory=list)
    accepted: list[int] = field(default_factory=list)  # reserved, not yet landed
    landed: list[int] = field(default_factory=list)  # on chain, `settled` not yet raised
    reserved_total: int = 0  # what verifications reserved, over the run
    released_total: int = 0  # what was given back (refused at settlement, dead-lettered)
    counted_total: int = 0  # what settled and was counted
    requests: int = 0  # withdrawal requests so far
    raced: bool = False  # a withdrawal was requested while payments were accepted or being verified

    POOL = ("pool:reserved", "pool:settled")
    GRANT = ("grant:reserved", "grant:settled")

    def unsettled(self) -> int:
        return sum(self.accepted)

    async def advance(self, v: _Verification) -> None:
        store = self.store
        if v.phase == 0:  # the `settled` counters first ...
            v.settled = (await store.get_pending(self.POOL[1]), await store.get_pending(self.GRANT[1]))
        elif v.phase == 1:  # ... then one chain read ...
            c = self.chain
            v.chain = (c.deposit, c.withdrawal, c.budget, c.spent)
            v.requests = self.requests
        else:  # ... then the atomic reservations, as `EscrowScheme.verify` takes them
            self.running.remove(v)
            deposit_, withdrawal, budget, spent = v.chain
            pool = deposit_limit(deposit=deposit_, withdrawal=withdrawal, settled=v.settled[0])
            if not await store.add_pending(self.POOL[0], v.amount, limit=pool):
                return
            grant = budget_limit(budget=budget, spent=spent, settled=v.settled[1])
            if not await store.add_pending(self.GRANT[0], v.amount, limit=grant):
                await store.sub_pending(self.POOL[0], v.amount)
                return
            self.accepted.append(v.amount)
            self.reserved_total += v.amount
            # Never beyond what the chain allows *now*, although settlements landed since the read. (A
            # withdrawal requested since then is the documented exposure: the delay lets payments land.)
            c = self.chain
            if v.requests == self.requests:
                assert self.unsettled() <= max(0, c.deposit - c.withdrawal)
            assert self.unsettled() <= c.budget - c.spent
        v.phase += 1

    async def land(self, index: int) -> None:
        """The settler's transaction lands: the escrow pays it if it can, else it is dead-lettered."""
        amount = self.accepted.pop(index % len(self.accepted))
        c = self.chain
        if amount <= c.deposit and amount <= c.budget - c.spent:
            c.deposit -= amount
            c.spent += amount
            self.landed.append(amount)
        else:  # a loss: only a withdrawal requested after acceptance can cause it in this model
            assert self.raced
            for account in (self.POOL[0], self.GRANT[0]):
                await self.store.sub_pending(account, amount)
            self.released_total += amount

    async def count(self, index: int) -> None:
        """The settler records a landed payment: its `settled` counters rise (after it landed)."""
        amount = self.landed.pop(index % len(self.landed))
        for account in (self.POOL[1], self.GRANT[1]):
            await self.store.add_pending(account, amount, limit=2**256 - 1)
        self.counted_total += amount

    async def release(self, index: int) -> None:
        """Not charged (the handler failed, settle-before-serve refused): the reservation goes back."""
        amount = self.accepted.pop(index % len(self.accepted))
        for account in (self.POOL[0], self.GRANT[0]):
            await self.store.sub_pending(account, amount)
        self.released_total += amount


_OPS = st.lists(
    st.tuples(
        st.sampled_from(["verify", "advance", "land", "count", "release", "top_up", "request", "withdraw"]),
        st.integers(min_value=0, max_value=50),
        st.integers(min_value=1, max_value=5),
    ),
    max_size=80,
)


# A settlement lands and is counted between a verification's reads: the case the read order is for.
_RACE = [("verify", 0, 1)] + [("advance", 0, 1)] * 3 + [("verify", 0, 1), ("advance", 0, 1)]
_RACE += [("land", 0, 1), ("count", 0, 1), ("advance", 0, 1), ("advance", 0, 1)]


@settings(max_examples=400, deadline=None)
@example(deposit_=1, budget=10, ops=_RACE)
@given(deposit_=st.integers(0, 20), budget=st.integers(0, 30), ops=_OPS)
def test_reservations_never_exceed_the_chain_and_release_exactly_what_was_reserved(
    deposit_: int, budget: int, ops: list[tuple[str, int, int]]
) -> None:
    async def run() -> None:
        m = _Model(_Chain(deposit=deposit_, budget=budget))
        for op, index, amount in ops:
            c = m.chain
            if op == "verify":
                m.running.append(_Verification(amount))
            elif op == "advance" and m.running:
                await m.advance(m.running[index % len(m.running)])
            elif op == "land" and m.accepted:
                await m.land(index)
            elif op == "count" and m.landed:
                await m.count(index)
            elif op == "release" and m.accepted:
                await m.release(index)
            elif op == "top_up":
                c.deposit += amount
            elif op == "request" and amount <= c.deposit:
                c.withdrawal = amount  # a new request replaces the old one
                m.requests += 1
                m.raced |= bool(m.accepted or m.running)
            elif op == "withdraw" and c.withdrawal:
                c.deposit -= min(c.withdrawal, c.deposit)
                c.withdrawal = 0
            if not m.raced:  # no request raced a payment: the deposit covers every accepted one
                assert m.unsettled() <= max(0, c.deposit - c.withdrawal)
        # Drain: finish verifications, land or release everything, count every landing.
        while m.running:
            await m.advance(m.running[0])
        while m.accepted:
            await m.land(0)
        while m.landed:
            await m.count(0)
        store = m.store
        reserved, settled = [await store.get_pending(a) for a in m.POOL]
        assert reserved == m.reserved_total - m.released_total == settled == m.counted_total
        assert [await store.get_pending(a) for a in m.GRANT] == [reserved, settled]
        assert m.chain.spent == m.counted_total <= budget

    asyncio.run(run())
