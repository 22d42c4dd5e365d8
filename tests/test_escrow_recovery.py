"""Recovery of `escrow` payments, the counterpart of the exact scheme's tests in `tests.test_crash_recovery`:
what a stopped gateway left half done is finished from the chain, never paid twice, never lost silently.

- a deferred claim whose settlement reached the chain but was never recorded (its settler died holding the
  lease) is recognised from the chain and recorded as settled: the payee is paid once;
- a settle-before-serve payment (`escrow:now` record) whose transaction never left is released while it can
  still be presented, then closed as "nothing was charged" once its deadline passed, and the budget
  reservation is given back;
- a nonce that paid a *different* payment makes the served one a dead letter `escrow_nonce_reused`, with the
  payee's loss in its error.

Everything runs in process: the real pipeline (`PaymentMiddleware` over ASGI), `EscrowScheme`,
`EscrowSettler` and `Recovery` over a `MemoryStore`, against anvil with the real AgentEscrow and TestUSDC.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from escrow import DevnetState
from escrow.chain._rpc import Rpc, TxSender
from escrow.payments._escrow import AgentEscrow, Erc20, EscrowEvent
from escrow.payments._escrow_verify import EscrowVerifier, GrantCache, accounts_for
from escrow.payments._grants import deposit, relay_grant, sign_grant_offline
from escrow.payments._settler import EscrowSettler, SettleOutcome
from gateway import Asset, MemoryStore, PaymentMiddleware
from gateway._escrow_scheme import EscrowScheme
from gateway._recovery import Recovery
from tests.conftest import unavailable
from x402 import LocalSigner, decode_payment_signature
from x402._escrow import (
    EscrowCode,
    EscrowPayload,
    GrantMessage,
    decode_escrow_payload,
    escrow_domain,
    payment_digest,
    sign_payment,
)
from x402.client_escrow import EscrowWallet, SessionKeyAuth

pytestmark = [pytest.mark.chain, pytest.mark.anyio]

PRICE = 1_000
DEPOSIT = 1_000 * 10**6
NONCE_USED = 4  # AgentEscrow.Reason.NonceUsed


def _key(signer: LocalSigner) -> str:
    return "0x" + signer._key.secret.hex()


@dataclass
class Env:
    rpc_url: str
    chain_id: int
    escrow: str
    asset: Asset
    owner: LocalSigner  # the payer, whose deposit the session keys spend


@pytest.fixture(scope="module")
def env(devnet: DevnetState) -> Iterator[Env]:
    if devnet.backend != "anvil":
        unavailable("funds fresh accounts with anvil_setBalance")

    async def setup() -> tuple[str, LocalSigner]:
        rpc = Rpc(devnet.rpc_url)
        try:
            deployer, owner = LocalSigner.random(), LocalSigner.random()
            for account in (deployer, owner):
                await rpc.request("anvil_setBalance", [account.address, hex(10**21)])
            escrow = await AgentEscrow.deploy(rpc, _key(deployer), withdrawal_delay=900)
            owner_tx = TxSender(rpc, _key(owner), chain_id=devnet.chain_id)
            usdc = Erc20(rpc, devnet.contracts["usdc"])
            await owner_tx.transact(
                usdc.address, usdc.abi.encode("mint", owner.address, DEPOSIT), gas=100_000
            )
            await deposit(escrow, owner_tx, usdc.address, DEPOSIT)
            return escrow.address, owner
        finally:
            await rpc.aclose()

    address, owner = asyncio.run(setup())
    asset = Asset(
        address=devnet.contracts["usdc"],
        chain_id=devnet.chain_id,
        name=devnet.usdc_name,
        version=devnet.usdc_version,
        decimals=devnet.usdc_decimals,
    )
    yield Env(rpc_url=devnet.rpc_url, chain_id=devnet.chain_id, escrow=address, asset=asset, owner=owner)


class Chain:
    """Per-test chain handles (an `Rpc` is bound to the test's event loop)."""

    def __init__(self, env: Env) -> None:
        self.env = env
        self.rpc = Rpc(env.rpc_url)
        self.escrow = AgentEscrow(self.rpc, env.escrow)
        self.usdc = Erc20(self.rpc, env.asset.address)

    async def sender(self) -> TxSender:
        """A fresh account with gas: a relayer, a settler, or "someone else"."""
        signer = LocalSigner.random()
        await self.rpc.request("anvil_setBalance", [signer.address, hex(10**21)])
        return TxSender(self.rpc, _key(signer), chain_id=self.env.chain_id)

    async def grant(self) -> tuple[LocalSigner, GrantMessage]:
        """A fresh session key spending the owner's deposit, granted offline and relayed."""
        session = LocalSigner.random()
        signed = sign_grant_offline(
            self.env.owner,
            chain_id=self.env.chain_id,
            escrow=self.env.escrow,
            signer=session.address,
            token=self.env.asset.address,
            max_per_call=10 * PRICE,
            budget=100 * PRICE,
            valid_until=int(time.time()) + 86_400,
            payees=[],
        )
        await relay_grant(self.escrow, await self.sender(), signed)
        return session, signed.grant

    async def settle_directly(self, payload: EscrowPayload) -> str:
        """Someone else (another settler, a receipt the gateway never saw) settles `payload`."""
        other = await self.sender()
        receipt = await other.transact(
            self.escrow.address, self.escrow.settle_calldata([payload]), gas=300_000
        )
        assert [e.name for e in self.escrow.decode_logs(receipt)] == ["PaymentSettled"]
        return receipt.transaction_hash

    async def events(self, name: str, payer: str, nonce: int, from_block: int) -> list[EscrowEvent]:
        """`name` logs of the escrow for `payer`'s payments with `nonce` since `from_block`."""
        found = await self.escrow.logs([name], from_block=from_block)
        return [
            e
            for e in found
            if str(e.args["payer"]).lower() == payer.lower() and int(e.args["nonce"]) == nonce
        ]

    async def settled_events(self, payload: EscrowPayload, from_block: int) -> list[EscrowEvent]:
        """`PaymentSettled` logs of exactly this payment (they are indexed by its EIP-712 digest)."""
        digest = payment_digest(escrow_domain(self.env.chain_id, self.env.escrow), payload.payment)
        return await self.escrow.logs(["PaymentSettled"], from_block=from_block, topics=["0x" + digest.hex()])

    async def block(self) -> int:
        return int(await self.rpc.request("eth_blockNumber", []), 16)

    async def sent(self, sender: TxSender) -> int:
        return await self.rpc.get_transaction_count(sender.address, "latest")

    async def aclose(self) -> None:
        await self.rpc.aclose()


@pytest.fixture
async def chain(env: Env) -> AsyncIterator[Chain]:
    c = Chain(env)
    try:
        yield c
    finally:
        await c.aclose()


class Gateway:
    """One sub-agent gateway in process: `EscrowScheme` behind `PaymentMiddleware`, deferred settlement.

    `settler` both batches the queue and sends settle-before-serve transactions; give it a sender on an
    unreachable node to stand for a gateway that dies before its transaction leaves.
    """

    def __init__(
        self,
        chain: Chain,
        store: MemoryStore,
        settler: EscrowSettler,
        *,
        pay_to: str,
        credit_limit: int = 10**12,
        deadline_seconds: int = 3600,
        claim_ttl: float = 300.0,
    ) -> None:
        env = chain.env
        self.store = store
        self.settler = settler
        self.served = 0
        verifier = EscrowVerifier(
            chain.escrow, chain_id=env.chain_id, cache=GrantCache(chain.escrow), min_validity=1
        )
        self.scheme = EscrowScheme(
            verifier,
            store,
            settler,
            credit_limit=credit_limit,
            deadline_seconds=deadline_seconds,
            claim_ttl=claim_ttl,
        )

        async def work(request: Request) -> JSONResponse:
            self.served += 1
            return JSONResponse({"ok": True})

        self.app = PaymentMiddleware(
            Starlette(routes=[Route("/work", work)]),
            routes={"GET /work": PRICE},
            schemes=[self.scheme],
            pay_to=pay_to,
            asset=env.asset,
            store=store,
            settle="deferred",
            claim_ttl=claim_ttl,
        )

    async def pay(self, session: LocalSigner, g: GrantMessage) -> tuple[httpx.Response, EscrowPayload]:
        """One paid call by `session`: the response and the signed payment it presented."""
        env = self.scheme
        wallet = EscrowWallet.from_grant(session, g, chain_id=env.chain_id, escrow=env.escrow)
        transport = httpx.ASGITransport(app=self.app)
        async with httpx.AsyncClient(
            transport=transport, base_url="http://sub", auth=SessionKeyAuth(wallet)
        ) as client:
            response = await client.get("/work")
        raw = decode_payment_signature(response.request.headers["PAYMENT-SIGNATURE"])
        return response, decode_escrow_payload(raw.payload)

    def key_of(self, session: LocalSigner, payload: EscrowPayload) -> str:
        """The store key the scheme gives this payment (its replay claim and settlement record)."""
        s = self.scheme
        return (
            f"escrow:{s.chain_id}:{s.escrow.lower()}:{session.address.lower()}:{int(payload.payment.nonce)}"
        )


async def pending(store: MemoryStore, env: Env, g: GrantMessage, session: LocalSigner) -> list[int]:
    """The store's [credit, reserved, settled] counters of this session key's payments."""
    accounts = accounts_for(env.chain_id, env.escrow, g.payer, session.address, g.epoch)
    return [await store.get_pending(a) for a in accounts]


def payee() -> str:
    return LocalSigner.random().address


# ------------------------------------------------------------------------------ deferred: the settler's queue


async def test_a_deferred_claim_already_on_chain_is_recorded_once_never_lost(chain: Chain) -> None:
    env, store, sub = chain.env, MemoryStore(), payee()
    relayer = await chain.sender()
    outcomes: list[SettleOutcome] = []
    settler = EscrowSettler(store, relayer, on_outcome=outcomes.append)
    gateway = Gateway(chain, store, settler, pay_to=sub)
    session, g = await chain.grant()
    start = await chain.block()

    response, payload = await gateway.pay(session, g)
    assert response.status_code == 200 and gateway.served == 1
    key = gateway.key_of(session, payload)
    assert await pending(store, env, g, session) == [PRICE, PRICE, 0]  # served on credit
    # A settler leased the claim, got its transaction on chain and died before recording it: the lease ran
    # out (leased already expired) and the payment is on chain, settled by a sender this store never saw.
    (leased,) = await store.lease("escrow", limit=10, lease_seconds=-1)
    assert leased.key == key
    tx_hash = await chain.settle_directly(payload)
    assert await chain.usdc.balance_of(sub) == PRICE

    recovery = Recovery(store, settlers=[settler], reconcilers={"escrow": gateway.scheme})
    await recovery.start()
    await recovery.stop()  # the settler's last forced step takes the expired lease

    assert [(o.key, o.status, o.tx_hash) for o in outcomes] == [(key, "settled_elsewhere", tx_hash)]
    assert await chain.usdc.balance_of(sub) == PRICE  # paid once
    nonce = int(payload.payment.nonce)
    assert len(await chain.settled_events(payload, start)) == 1
    # The relayer did submit it once more: the escrow refused the used nonce, nothing moved.
    assert await chain.sent(relayer) == 1
    (refused,) = await chain.events("PaymentFailed", g.payer, nonce, start)
    assert int(refused.args["reason"]) == NONCE_USED
    record = await store.get_settlement(key)
    assert record is not None and (record.state, record.tx_hash) == ("settled", tx_hash)
    stats = await store.stats()
    assert (stats.settled, stats.queued, stats.leased, stats.failed, stats.dead) == (1, 0, 0, 0, 0)
    # Counted as settled once: off the payer's credit, onto the gateway's settled share of the budget.
    assert await pending(store, env, g, session) == [0, PRICE, PRICE]
    # A later pass finds nothing to do and sends nothing.
    await recovery.start()
    await recovery.stop()
    assert len(outcomes) == 1 and await chain.sent(relayer) == 1
    assert await pending(store, env, g, session) == [0, PRICE, PRICE]


async def test_a_deferred_claim_whose_nonce_paid_another_payment_is_a_visible_loss(chain: Chain) -> None:
    env, store, sub = chain.env, MemoryStore(), payee()
    relayer = await chain.sender()
    outcomes: list[SettleOutcome] = []
    settler = EscrowSettler(store, relayer, on_outcome=outcomes.append)
    gateway = Gateway(chain, store, settler, pay_to=sub)
    session, g = await chain.grant()

    response, payload = await gateway.pay(session, g)
    assert response.status_code == 200
    key, p = gateway.key_of(session, payload), payload.payment
    # The same session key spends the same nonce on a different payment, which lands first.
    elsewhere = payee()
    other = sign_payment(
        session,
        escrow_domain(env.chain_id, env.escrow),
        payer=p.payer,
        payee=elsewhere,
        token=p.token,
        amount=int(p.amount),
        nonce=int(p.nonce),
        deadline=int(p.deadline),
        epoch=int(p.epoch),
    )
    await chain.settle_directly(other)

    recovery = Recovery(store, settlers=[settler], reconcilers={"escrow": gateway.scheme})
    await recovery.start()
    await recovery.stop()

    assert [(o.key, o.status, o.code) for o in outcomes] == [(key, "dead", EscrowCode.NONCE_REUSED)]
    assert await chain.usdc.balance_of(sub) == 0  # served, never paid ...
    assert await chain.usdc.balance_of(elsewhere) == PRICE
    (dead,) = await store.dead_letters(kind="escrow")  # ... and the store says so
    error = dead.error or ""
    assert dead.key == key and dead.amount == PRICE
    assert (
        error.startswith(EscrowCode.NONCE_REUSED) and f"lost {PRICE}" in error and f"nonce {p.nonce}" in error
    )
    stats = await store.stats()
    assert (stats.settled, stats.queued, stats.leased, stats.failed, stats.dead) == (0, 0, 0, 0, 1)
    # Nothing of it is pending any more: the payer's credit and the budget share are given back.
    assert await pending(store, env, g, session) == [0, 0, 0]


# ------------------------------------------------------------------- settle before serving: `escrow:now`


async def crash_before_sending(
    chain: Chain, store: MemoryStore, *, deadline_seconds: int = 3600, claim_ttl: float = 0.3
) -> tuple[Gateway, LocalSigner, GrantMessage, EscrowPayload]:
    """A payer past its credit limit calls a gateway whose settle-before-serve transaction never leaves
    (its node is unreachable: the outcome is unknown to the pipeline, as after a crash): the `escrow:now`
    record stays open, the replay claim and the budget reservation stay taken."""
    dead_node = Rpc("http://127.0.0.1:9/")  # nothing listens there
    sender = TxSender(dead_node, _key(LocalSigner.random()), chain_id=chain.env.chain_id)
    gateway = Gateway(
        chain,
        store,
        EscrowSettler(store, sender),
        pay_to=payee(),
        credit_limit=0,
        deadline_seconds=deadline_seconds,
        claim_ttl=claim_ttl,
    )
    session, g = await chain.grant()
    try:
        response, payload = await gateway.pay(session, g)
    finally:
        await dead_node.aclose()
    assert response.status_code >= 500 and gateway.served == 1  # the handler ran; nothing was answered
    record = await store.get_settlement(gateway.key_of(session, payload))
    assert record is not None and (record.kind, record.state) == ("escrow:now", "queued")
    return gateway, session, g, payload


def restarted(chain: Chain, store: MemoryStore, crashed: Gateway, relayer: TxSender) -> Recovery:
    """The gateway started again on the same store, with a working node: its recovery pass."""
    settler = EscrowSettler(store, relayer)
    scheme = Gateway(chain, store, settler, pay_to=payee()).scheme
    return Recovery(store, settlers=[settler], reconcilers={"escrow": scheme}, claim_ttl=0.3)


async def test_an_unsent_settle_before_serve_is_released_then_closed_with_nothing_charged(
    chain: Chain,
) -> None:
    env, store = chain.env, MemoryStore()
    gateway, session, g, payload = await crash_before_sending(chain, store, deadline_seconds=3)
    key, deadline = gateway.key_of(session, payload), int(payload.payment.deadline)
    assert await pending(store, env, g, session) == [0, PRICE, 0]  # past the credit limit: budget only
    balance = await chain.escrow.deposit_of(g.payer, env.asset.address)
    relayer = await chain.sender()
    recovery = restarted(chain, store, gateway, relayer)

    # The request's replay claim is still live: recovery leaves the payment to it.
    assert await recovery.recover() == []
    await asyncio.sleep(0.4)  # the claim (and the lease recovery took) run out

    # Not on chain and still payable: released, so the payer may present it again; looked at again later.
    (outcome,) = await recovery.recover()
    assert (outcome.key, outcome.status, outcome.code) == (key, "retry", "escrow_unsettled")
    record = await store.get_settlement(key)
    assert record is not None and record.state == "failed" and record.retry_at == deadline + 1.0
    assert not await store.is_finalized(key)
    assert await pending(store, env, g, session) == [0, PRICE, 0]  # still held until it can no longer land

    await asyncio.sleep(max(0.0, deadline + 1.1 - time.time()))  # past its deadline: it can never land now
    (outcome,) = await recovery.recover()
    assert (outcome.key, outcome.status, outcome.code) == (key, "dead", "escrow_never_settled")
    (dead,) = await store.dead_letters(kind="escrow:now")
    assert dead.key == key and "nothing was charged" in (dead.error or "")
    assert await pending(store, env, g, session) == [0, 0, 0]  # the reservation is given back
    assert await store.claim(key, ttl=1)  # never finalized: not counted as served and paid
    # Nothing was sent, nothing moved.
    assert await chain.sent(relayer) == 0
    assert await chain.escrow.deposit_of(g.payer, env.asset.address) == balance
    assert not await chain.escrow.nonce_used(session.address, int(payload.payment.nonce))
    assert await recovery.recover() == []


async def test_an_in_flight_record_already_on_chain_is_settled_and_finalized(chain: Chain) -> None:
    env, store = chain.env, MemoryStore()
    gateway, session, g, payload = await crash_before_sending(chain, store)
    key = gateway.key_of(session, payload)
    # The transaction did leave after all (the node took it, the gateway never saw the receipt).
    tx_hash = await chain.settle_directly(payload)
    relayer = await chain.sender()
    recovery = restarted(chain, store, gateway, relayer)
    await asyncio.sleep(0.4)  # the dead request's claim runs out

    (outcome,) = await recovery.recover()

    assert (outcome.key, outcome.status, outcome.tx_hash) == (key, "settled_elsewhere", tx_hash)
    record = await store.get_settlement(key)
    assert record is not None and (record.state, record.tx_hash) == ("settled", tx_hash)
    assert await store.is_finalized(key)  # paid: it can never be served again
    assert await pending(store, env, g, session) == [0, PRICE, PRICE]
    assert await chain.usdc.balance_of(payload.payment.payee) == PRICE
    assert await chain.sent(relayer) == 0  # reconciling never sends
    assert await store.dead_letters() == []


async def test_an_in_flight_record_whose_nonce_paid_another_payment_is_a_dead_letter(chain: Chain) -> None:
    env, store = chain.env, MemoryStore()
    gateway, session, g, payload = await crash_before_sending(chain, store)
    key, p = gateway.key_of(session, payload), payload.payment
    elsewhere = payee()
    other = sign_payment(
        session,
        escrow_domain(env.chain_id, env.escrow),
        payer=p.payer,
        payee=elsewhere,
        token=p.token,
        amount=int(p.amount),
        nonce=int(p.nonce),
        deadline=int(p.deadline),
        epoch=int(p.epoch),
    )
    await chain.settle_directly(other)
    relayer = await chain.sender()
    recovery = restarted(chain, store, gateway, relayer)
    await asyncio.sleep(0.4)

    (outcome,) = await recovery.recover()

    assert (outcome.key, outcome.status, outcome.code) == (key, "dead", EscrowCode.NONCE_REUSED)
    (dead,) = await store.dead_letters(kind="escrow:now")
    assert dead.key == key and (dead.error or "").startswith(EscrowCode.NONCE_REUSED)
    assert await chain.usdc.balance_of(p.payee) == 0 and await chain.usdc.balance_of(elsewhere) == PRICE
    assert await pending(store, env, g, session) == [0, 0, 0]
    assert not await store.is_finalized(key)
    assert await chain.sent(relayer) == 0


class _StoreThatCannotRecord(MemoryStore):
    """Takes claims and queues records, but fails to record a completed settlement (a store outage, or a
    crash, between the transaction and its bookkeeping)."""

    broken = True

    async def complete(self, key: str, holder: str | None, **kwargs: Any) -> None:
        if self.broken:
            raise RuntimeError("store unavailable")
        await super().complete(key, holder, **kwargs)

    async def complete_settled(self, key: str, holder: str | None, **kwargs: Any) -> None:
        if self.broken:
            raise RuntimeError("store unavailable")
        await super().complete_settled(key, holder, **kwargs)

    async def mark_settled(self, keys: list[str], *, tx_hash: str, lease: str | None = None) -> list[str]:
        if self.broken:
            raise RuntimeError("store unavailable")
        return await super().mark_settled(keys, tx_hash=tx_hash, lease=lease)


async def test_a_settlement_recovery_reports_again_is_counted_once(chain: Chain) -> None:
    env, store = chain.env, _StoreThatCannotRecord()
    relayer = await chain.sender()
    gateway = Gateway(
        chain, store, EscrowSettler(store, relayer), pay_to=payee(), credit_limit=0, claim_ttl=0.3
    )
    session, g = await chain.grant()
    response, payload = await gateway.pay(session, g)
    assert response.status_code == 200  # settled before serving; only the bookkeeping failed
    assert await pending(store, env, g, session) == [0, PRICE, PRICE]
    store.broken = False
    recovery = restarted(chain, store, gateway, await chain.sender())
    await asyncio.sleep(0.4)

    (outcome,) = await recovery.recover()  # the open record: the chain says this payment was paid

    assert outcome.status == "settled_elsewhere"
    # Still counted once: a second count would overstate this gateway's settled spend and let it serve
    # past the grant's budget.
    assert await pending(store, env, g, session) == [0, PRICE, PRICE]
    assert await chain.usdc.balance_of(payload.payment.payee) == PRICE
