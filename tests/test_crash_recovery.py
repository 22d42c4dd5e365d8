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
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from escrow import DevnetState
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
from x402 import LocalSigner, Reason

pytestmark = [pytest.mark.chain, pytest.mark.anyio]

# (mode, stage) whose payment recovery itself settles: served under deferred settlement, or already sent.
# In every other case the payer's retry of the same payment is what gets served and settled.
SETTLED_BY_RECOVERY = {
    ("deferred", "after_handler"),
    ("deferred", "after_send"),
    ("before-response", "after_send"),
}


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
                assert again.status_code == 402 and reason(again) == Reason.NONCE_ALREADY_USED
            else:
                # Not charged: once the dead process's claim has expired the same payment is served.
                for _ in range(300):
                    again = await client.get("/hello", headers=headers)
                    if again.status_code == 200:
                        break
                    assert again.status_code == 402 and reason(again) == Reason.NONCE_ALREADY_USED
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
