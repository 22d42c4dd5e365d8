"""The escrow's deposit reservation over real HTTP (issue 9, item 2, "Must show").

`python -m examples.subagent --schemes escrow --settle deferred` runs under uvicorn on a SQLite store; an
owner opens a session key with `escrow.Chain.open_session` (deposit 1 x price, budget 100 x price), and the
orchestrator pays with `PaymentAuth` as the README shows. `tests/test_escrow_exposure.py` runs the same
attacks in process; here they cross the process boundary: the subagent's own settler, its own store.

- Ten concurrent calls on one price of deposit, racing a well-funded payer: one is served, the rest are
  refused `escrow_insufficient_deposit`, the other payer is served every time, and what settles is exactly
  what was served.
- A payer that asked for its whole deposit back (and let the request mature) is served nothing more.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx
import pytest

import escrow
from escrow import Devnet, DevnetState
from escrow.chain._rpc import TxSender
from escrow.payments._escrow import AgentEscrow
from tests._gateways import Chain, Gateway, Gateways, key_hex, read_store, reason, wait_settled
from x402 import LocalSigner
from x402.client import PaymentAuth, SpendPolicy
from x402.client_escrow import SessionKeyWallet

pytestmark = [pytest.mark.chain, pytest.mark.anyio]

PRICE = 1000  # GET /hello: $0.001 of the 6-decimal TestUSDC
INSUFFICIENT_DEPOSIT = "escrow_insufficient_deposit"


@pytest.fixture
async def chain(devnet: DevnetState) -> AsyncIterator[Chain]:
    value = Chain(devnet)
    try:
        yield value
    finally:
        await value.aclose()


@pytest.fixture
def gateways(devnet: DevnetState, tmp_path: Path) -> Iterator[Gateways]:
    started = Gateways(devnet, tmp_path)
    try:
        yield started
    finally:
        started.close()


async def _session(chain: Chain, *, deposit: int, budget: int) -> tuple[LocalSigner, SessionKeyWallet]:
    """A fresh owner holding `deposit` tokens, all deposited into the escrow, and its session key's wallet
    (per-call cap 1 x price, `budget`), opened through the public API with a relayer of this test's own."""
    owner = LocalSigner.random()
    await chain.mint(owner.address, deposit)
    relayer = key_hex(await chain.key())
    async with escrow.Chain.from_devnet(chain.devnet, relayer=relayer) as public:
        file = await public.open_session(owner, max_per_call=PRICE, budget=budget, deposit=deposit)
    return owner, SessionKeyWallet.from_file(file)


async def _deposit_of(chain: Chain, owner: LocalSigner) -> int:
    async with escrow.Chain.from_devnet(chain.devnet, relayer=None) as public:
        return await public.escrow.deposit_of(owner.address, public.token.address)


def _payer(wallet: SessionKeyWallet, gateway: Gateway, *, budget: int) -> httpx.AsyncClient:
    auth = PaymentAuth(wallet, SpendPolicy(max_per_call=PRICE, total_budget=budget))
    return httpx.AsyncClient(base_url=gateway.url, auth=auth, timeout=60)


async def test_the_escrow_subagent_serves_a_one_price_deposit_once_over_http(
    chain: Chain, gateways: Gateways, tmp_path: Path
) -> None:
    store = f"sqlite:///{tmp_path / 'payments.db'}"
    payee = LocalSigner.random().address
    relayer = await chain.key()
    gateway = gateways.new(
        store=store,
        settle="deferred",
        payee=payee,
        relayer_key=key_hex(relayer),
        extra=["--schemes", "escrow"],
    )
    gateway.start()
    poor_owner, poor = await _session(chain, deposit=PRICE, budget=100 * PRICE)
    rich_owner, rich = await _session(chain, deposit=20 * PRICE, budget=100 * PRICE)
    async with (
        _payer(poor, gateway, budget=100 * PRICE) as poor_client,
        _payer(rich, gateway, budget=100 * PRICE) as rich_client,
    ):
        # Both payers at once: the poor one's ten calls race each other and the rich one's five.
        responses = await asyncio.gather(
            *(poor_client.get("/hello") for _ in range(10)), *(rich_client.get("/hello") for _ in range(5))
        )
    poor_answers, rich_answers = responses[:10], responses[10:]
    served = sum(r.status_code == 200 for r in poor_answers)
    assert served <= 1, [r.status_code for r in poor_answers]
    refused = [r for r in poor_answers if r.status_code != 200]
    assert [r.status_code for r in refused] == [402] * (10 - served), [r.text for r in refused]
    assert {reason(r) for r in refused} == {INSUFFICIENT_DEPOSIT}
    assert all(r.status_code == 200 for r in rich_answers), [r.text for r in rich_answers]
    # The subagent's own settler drains its queue; the payee gets exactly what was served.
    await wait_settled(store, served + 5)
    assert await chain.balance(payee) == (served + 5) * PRICE
    stats, dead = await read_store(store)
    assert (stats.settled, stats.dead, dead) == (served + 5, 0, 0)
    # What was served came out of the deposits, and nothing else did.
    assert await _deposit_of(chain, poor_owner) == (1 - served) * PRICE
    assert await _deposit_of(chain, rich_owner) == 15 * PRICE


@pytest.fixture
def own_devnet() -> Iterator[DevnetState]:
    """A devnet of this test's own: it moves the chain's clock past the withdrawal delay."""
    with Devnet() as state:
        yield state


async def test_the_escrow_subagent_serves_nothing_on_a_withdrawn_deposit_over_http(
    own_devnet: DevnetState, tmp_path: Path
) -> None:
    store = f"sqlite:///{tmp_path / 'payments.db'}"
    chain = Chain(own_devnet)
    gateways = Gateways(own_devnet, tmp_path)
    try:
        payee = LocalSigner.random().address
        gateway = gateways.new(
            store=store,
            settle="deferred",
            payee=payee,
            relayer_key=key_hex(await chain.key()),
            extra=["--schemes", "escrow"],
        )
        gateway.start()
        owner, wallet = await _session(chain, deposit=10 * PRICE, budget=100 * PRICE)
        async with _payer(wallet, gateway, budget=100 * PRICE) as client:
            # Served while the deposit is whole: these settle.
            before = await asyncio.gather(*(client.get("/hello") for _ in range(3)))
            assert [r.status_code for r in before] == [200] * 3, [r.text for r in before]
            await wait_settled(store, 3)
            # The owner asks for everything left back and waits out the delay.
            await chain.rpc.request("anvil_setBalance", [owner.address, hex(10**18)])
            sender = TxSender(chain.rpc, key_hex(owner), chain_id=own_devnet.chain_id)
            contract = AgentEscrow(chain.rpc, own_devnet.contracts["escrow"])
            left = await _deposit_of(chain, owner)
            assert left == 7 * PRICE
            request = contract.abi.encode("requestWithdrawal", chain.usdc, left)
            await sender.transact(contract.address, request, gas=100_000)
            await chain.rpc.request("evm_increaseTime", [await contract.withdrawal_delay() + 1])
            await chain.rpc.request("evm_mine", [])
            # It keeps paying: nothing it sends could settle any more, so nothing is served.
            after = await asyncio.gather(*(client.get("/hello") for _ in range(5)))
        assert [r.status_code for r in after] == [402] * 5, [r.text for r in after]
        assert {reason(r) for r in after} == {INSUFFICIENT_DEPOSIT}
        await sender.transact(contract.address, contract.abi.encode("withdraw", chain.usdc), gas=100_000)
        assert await _deposit_of(chain, owner) == 0
        assert await chain.balance(owner.address) == 7 * PRICE
        # Give the settler time to try anything it had accepted: only the three served calls ever settle.
        await asyncio.sleep(2)
        stats, dead = await read_store(store)
        assert (stats.settled, stats.dead, dead) == (3, 0, 0)
        assert await chain.balance(payee) == 3 * PRICE
    finally:
        gateways.close()
        await chain.aclose()
