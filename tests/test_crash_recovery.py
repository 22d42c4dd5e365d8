"""A gateway SIGKILLed at each stage of a payment, then restarted: nothing lost, nothing charged twice.

The crash is real: the gateway process (`python -m examples.subagent`, uvicorn) runs with
`AGENTPAY_FAULT=<stage>` and SIGKILLs itself there (no `finally`, no flush). Stages:

- `after_verify`: the replay claim is taken, the handler has not run;
- `after_handler`: the handler ran; the settlement is recorded (deferred: queued; before-response: in
  flight) but nothing was sent;
- `after_send`: the transfer is on chain, its outcome not recorded (deferred: the settler's batch;
  before-response: the request's own settlement).

It is restarted without the fault on the same port and store. A payer whose request died retries with the
same signed payment. What must hold: a payment that was served (the handler ran under deferred settlement,
or the transfer went out) is settled exactly once; a payment whose handler never ran, or whose response
never left before anything was sent, is not charged and can still be used; no authorization is ever used
twice and the store ends with one settled record, nothing pending and no dead letters. SQLite (one process)
and PostgreSQL (the replicas' store) both.
"""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from escrow import DevnetState
from escrow.chain._rpc import TxSender
from escrow.payments._exact import ExactEvm
from escrow.payments._exact_settler import ExactPayment, ExactSettler, encode_payment
from gateway import MemoryStore, Settlement
from tests._gateways import (
    PRICE,
    Chain,
    Gateways,
    StoreUnderTest,
    authorization_of,
    key_hex,
    read_store,
    reason,
    sign_for,
    store_under_test,
    wait_settled,
)
from x402 import Eip712Domain, ExactEvmPayload, LocalSigner, Reason, sign_transfer_authorization

pytestmark = [pytest.mark.chain, pytest.mark.anyio]

# (mode, stage) whose payment recovery itself settles: served under deferred settlement, or already sent.
# In every other case the payer's retry of the same payment is what gets served and settled.
SETTLED_BY_RECOVERY = {
    ("deferred", "after_handler"),
    ("deferred", "after_send"),
    ("before-response", "after_send"),
}
# Of those, the ones whose response never left: the paid but unserved payment, presented again, is served
# once (issue 9 item 17), from the settlement recovery found, without sending anything.
SERVED_ON_RETRY = {("before-response", "after_send")}


@pytest.fixture
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[StoreUnderTest]:
    with store_under_test(request.param, tmp_path) as value:
        yield value


@pytest.fixture
def gateways(devnet: DevnetState, tmp_path: Path) -> Iterator[Gateways]:
    started = Gateways(devnet, tmp_path)
    try:
        yield started
    finally:
        started.close()


@pytest.mark.parametrize("stage", ["after_verify", "after_handler", "after_send"])
@pytest.mark.parametrize("mode", ["deferred", "before-response"])
@pytest.mark.parametrize("store", ["sqlite", "postgres"], indirect=True)
async def test_a_killed_gateway_loses_nothing_and_charges_once(
    devnet: DevnetState, gateways: Gateways, store: StoreUnderTest, mode: str, stage: str
) -> None:
    chain = Chain(devnet)
    try:
        payer, payee = LocalSigner.random(), LocalSigner.random().address
        await chain.mint(payer.address, 10 * PRICE)
        relayer = await chain.key()
        gateway = gateways.new(store=store.url, settle=mode, payee=payee, relayer_key=key_hex(relayer))
        gateway.start(fault=stage)
        start = await chain.block()
        async with httpx.AsyncClient(base_url=gateway.url, timeout=30) as client:
            headers = await sign_for(client, "/hello", chain.wallet(payer))
            try:
                first: httpx.Response | None = await client.get("/hello", headers=headers)
            except httpx.TransportError:  # the process died under the request
                first = None
            assert gateway.wait_exit() == -signal.SIGKILL, gateway.output()
            # Only a deferred settler dies after the response left; every other stage kills the request.
            if first is not None:
                assert (mode, stage, first.status_code) == ("deferred", "after_send", 200)

            gateway.start()
            if (mode, stage) in SETTLED_BY_RECOVERY:
                await wait_settled(store.url, 1)
                again = await client.get("/hello", headers=headers)
                if (mode, stage) in SERVED_ON_RETRY:
                    assert again.status_code == 200, again.text
                    again = await client.get("/hello", headers=headers)
                assert again.status_code == 402 and reason(again) == Reason.NONCE_ALREADY_USED
            else:
                # Not charged: once the dead process's claim has expired the same payment is served.
                # Meanwhile an in-flight record says "come back" (settlement_pending), a live claim "replay".
                for _ in range(300):
                    again = await client.get("/hello", headers=headers)
                    if again.status_code == 200:
                        break
                    assert again.status_code == 402, again.text
                    assert reason(again) in (Reason.NONCE_ALREADY_USED, Reason.SETTLEMENT_PENDING)
                    await asyncio.sleep(0.1)
                assert again.status_code == 200, again.text
                await wait_settled(store.url, 1)

        assert await chain.authorizations_used([payer.address], start) == [authorization_of(headers)]
        assert await chain.sent(relayer.address) == 1  # one transaction ever: nothing was sent twice
        assert await chain.balance(payee) == PRICE
        assert await chain.balance(payer.address) == 9 * PRICE
        stats, dead = await read_store(store.url)
        assert (stats.settled, stats.queued, stats.leased, stats.failed, stats.dead, dead) == (
            1,
            0,
            0,
            0,
            0,
            0,
        )
    finally:
        await chain.aclose()


# ------------------------------------------------------------------ the settler's own decisions, in process


class Settling:
    """An `ExactSettler` over a memory store with a fresh relayer, and payments to queue by hand."""

    def __init__(self, chain: Chain, relayer: LocalSigner) -> None:
        devnet = chain.devnet
        self.chain = chain
        self.relayer = relayer
        self.store = MemoryStore()
        sender = TxSender(chain.rpc, key_hex(relayer), chain_id=devnet.chain_id)
        self.evm = ExactEvm(chain.rpc, sender)
        self.settler = ExactSettler(self.store, self.evm, max_age=0)
        self.domain = Eip712Domain(devnet.usdc_name, devnet.usdc_version, devnet.chain_id, chain.usdc)
        self.payee = LocalSigner.random().address

    def payment(self, payer: LocalSigner, *, valid_for: int = 120, **sign: Any) -> ExactEvmPayload:
        args: dict[str, Any] = {
            "to": self.payee,
            "value": PRICE,
            "valid_before": int(time.time()) + valid_for,
        }
        return sign_transfer_authorization(payer, self.domain, **{**args, **sign})

    async def queue(self, payload: ExactEvmPayload, *, kind: str = "exact", raw: bytes | None = None) -> str:
        d = self.domain
        body = ExactPayment(
            name=d.name, version=d.version, chain_id=d.chain_id, asset=d.verifying_contract, payload=payload
        )
        key = f"exact:{payload.authorization.from_}:{payload.authorization.nonce}"
        item = Settlement(
            key=key,
            kind=kind,
            payload=encode_payment(body) if raw is None else raw,
            payer=payload.authorization.from_,
            amount=PRICE,
            created_at=time.time(),
        )
        await self.store.enqueue(item)
        return key

    async def lease(self, kind: str) -> list[Settlement]:
        return await self.store.lease(kind, limit=10, lease_seconds=60)


@pytest.fixture
async def settling(devnet: DevnetState) -> AsyncIterator[Settling]:
    chain = Chain(devnet)
    try:
        yield Settling(chain, await chain.key())
    finally:
        await chain.aclose()


async def test_a_payment_already_on_chain_is_recorded_never_sent_again(settling: Settling) -> None:
    chain, payer = settling.chain, LocalSigner.random()
    await chain.mint(payer.address, PRICE)
    payload = settling.payment(payer)
    key = await settling.queue(payload)
    # Someone else (here: the payer's own relayer) submits the very authorization first.
    other = TxSender(chain.rpc, key_hex(await chain.key()), chain_id=chain.devnet.chain_id)
    tx_hash = await ExactEvm(chain.rpc, other).settle(settling.domain, payload)

    (outcome,) = await settling.settler.drain()

    assert (outcome.status, outcome.tx_hash) == ("settled_elsewhere", tx_hash)
    record = await settling.store.get_settlement(key)
    assert record is not None and (record.state, record.tx_hash) == ("settled", tx_hash)
    assert await chain.sent(settling.relayer.address) == 0
    assert await chain.balance(settling.payee) == PRICE


async def test_a_nonce_that_paid_another_transfer_is_a_dead_letter(settling: Settling) -> None:
    chain, payer = settling.chain, LocalSigner.random()
    await chain.mint(payer.address, 2 * PRICE)
    ours = settling.payment(payer)
    other = settling.payment(payer, nonce=ours.authorization.nonce, value=2 * PRICE)  # same nonce, other sum
    key = await settling.queue(ours)
    sender = TxSender(chain.rpc, key_hex(await chain.key()), chain_id=chain.devnet.chain_id)
    await ExactEvm(chain.rpc, sender).settle(settling.domain, other)

    (outcome,) = await settling.settler.drain()

    assert (outcome.status, outcome.code) == ("dead", "exact_nonce_reused")
    (dead,) = await settling.store.dead_letters()
    error = dead.error or ""
    assert dead.key == key and error.startswith("exact_nonce_reused") and "lost 1000" in error
    assert await chain.sent(settling.relayer.address) == 0


async def test_expired_and_malformed_payments_are_dead_letters_and_nothing_is_sent(
    settling: Settling,
) -> None:
    payer = LocalSigner.random()
    expired = await settling.queue(settling.payment(payer, valid_for=2))  # inside the settler's margin
    garbled = await settling.queue(settling.payment(payer), raw=b'{"not": "a payment"}')

    outcomes = {o.key: (o.status, o.code) for o in await settling.settler.drain()}

    assert outcomes == {
        expired: ("dead", Reason.VALID_BEFORE),
        garbled: ("dead", "exact_payment_malformed"),
    }
    assert await settling.chain.sent(settling.relayer.address) == 0


async def test_reconciling_never_sends(settling: Settling) -> None:
    payer = LocalSigner.random()
    await settling.chain.mint(payer.address, PRICE)
    open_one = await settling.queue(settling.payment(payer), kind="exact:now")
    expired = await settling.queue(settling.payment(payer, valid_for=-1), kind="exact:now")

    outcomes = {
        o.key: (o.status, o.code)
        for o in await settling.settler.reconcile_items(await settling.lease("exact:now"))
    }

    # Not on chain and still valid: looked at again when it can no longer land; expired: never charged.
    assert outcomes == {open_one: ("retry", "exact_unsettled"), expired: ("dead", "exact_never_settled")}
    waiting = await settling.store.get_settlement(open_one)
    assert waiting is not None and waiting.state == "failed" and (waiting.retry_at or 0) > time.time() + 60
    (dead,) = await settling.store.dead_letters()
    assert "nothing was charged" in (dead.error or "")
    assert await settling.chain.sent(settling.relayer.address) == 0
    assert await settling.chain.balance(payer.address) == PRICE
