"""Attacks on a session's deposits (anvil, real stores): an unsigned `hash` top-up used as a probe or a lock
hog, and a payer front-running its own relayed deposit so that the gateway pays for reverts."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from escrow import DevnetState, TxSender
from escrow.chain._abi import ContractAbi
from escrow.payments._escrow import escrow_artifact
from gateway._session_state import SessionProblem
from gateway._session_topup import SessionTopUps
from gateway._stores import open_store
from tests._sessions import ROUTES, UNIT, app, session
from tests.conftest import unavailable
from tests.test_session_relay import DEPOSIT, _auth, _gasless_payer, _nonce, _open_payload
from tests.test_store import isolated_url
from x402 import LocalSigner, b64url_decode
from x402._session import sign_voucher

pytestmark = pytest.mark.anyio


def _top_up(channel: str, tx: str) -> dict[str, Any]:
    return {"action": "topUp", "type": "hash", "channelId": channel, "hash": tx, "additionalDeposit": "1"}


def _receipt(r: httpx.Response) -> dict[str, Any]:
    raw = msgspec.json.decode(b64url_decode(r.headers["payment-receipt"]))
    assert isinstance(raw, dict)
    return raw


async def test_an_unsigned_top_up_learns_nothing_and_costs_at_most_a_few_receipt_reads(
    devnet: DevnetState,
) -> None:
    async with session(devnet, deposit=20_000) as s:
        for units in (100, 7):
            assert (await s.client.request("GET", f"/meter?units={units}")).status_code == 200
        (ch,) = s.client.channels.values()
        paywall = s.paywall
        # A stranger names the channel with a made-up hash: refused, and told none of its amounts.
        r = await s.client.http.post(
            "/meter", headers=_auth(s, "/meter", _top_up(ch.channel, "0x" + "ab" * 32))
        )
        assert r.status_code == 402 and r.json()["type"].endswith("transaction-not-found"), r.text
        assert "acceptedCumulative" not in r.json() and "spent" not in r.json()
        assert "payment-receipt" not in r.headers
        # Nor a voucher it cannot sign (the channel's numbers go to its signer only).
        forged = sign_voucher(
            LocalSigner.random(),
            chain_id=devnet.chain_id,
            escrow=s.escrow,
            channel=ch.channel,
            cumulative=10**6,
        )
        voucher = {
            "action": "voucher",
            "channelId": ch.channel,
            "cumulativeAmount": str(10**6),
            "signature": forged,
        }
        r = await s.client.http.get("/meter?units=1", headers=_auth(s, "/meter", voucher))
        assert r.status_code == 402 and r.json()["type"].endswith("signer-mismatch"), r.text
        assert r.json()["channelId"] == ch.channel and "spent" not in r.json()
        assert "acceptedCumulative" not in r.json()

        # The payer's real top-up: accepted from its log (the 204 still tells no amounts: a hash is unsigned).
        tx = await s.opener.top_up(escrow=s.escrow, channel=ch.channel, amount=50_000)
        receipt = await s.client.top_up("/meter", 50_000, hash=tx)
        assert receipt is not None and receipt.channel_id == ch.channel
        assert receipt.spent is None and receipt.accepted_cumulative is None
        assert paywall._channels[ch.channel].info.deposit == 70_000  # taken from the top-up's log
        reads = paywall.top_up_receipt_reads
        # Anyone replaying it: 204 from memory, no chain read, no amounts.
        for _ in range(20):
            r = await s.client.http.post("/meter", headers=_auth(s, "/meter", _top_up(ch.channel, tx)))
            assert r.status_code == 204 and set(_receipt(r)) >= {"channelId"}
            assert "spent" not in _receipt(r) and "acceptedCumulative" not in _receipt(r)
        assert paywall.top_up_receipt_reads == reads
        # A real top-up of another channel names this one: refused (from memory too).
        r = await s.client.http.post(
            "/meter", headers=_auth(s, "/meter", _top_up("0x" + os.urandom(32).hex(), tx))
        )
        assert r.status_code == 402 and paywall.top_up_receipt_reads == reads

        # Made-up hashes: a few receipt reads per channel, then 429 with none.
        codes = []
        for _ in range(10):
            fake = _top_up(ch.channel, "0x" + os.urandom(32).hex())
            codes.append((await s.client.http.post("/meter", headers=_auth(s, "/meter", fake))).status_code)
        # two reads of this channel in the window already (the made-up hash above, the payer's top-up)
        allowed = paywall.TOP_UP_READS - 2
        assert codes == [402] * allowed + [429] * (10 - allowed)
        assert paywall.top_up_receipt_reads == reads + allowed

        # The payer spends the top-up with no further chain read of the channel.
        for _ in range(5):  # 50,700 of the 70,000: past the first deposit
            assert (await s.client.request("GET", "/meter?units=100")).status_code == 200
        closed = await s.client.close("/meter")
        assert closed is not None and closed.spent == str((107 + 500) * UNIT)


async def test_a_top_up_naming_no_hash_reads_and_tells_nothing(devnet: DevnetState) -> None:
    """A top-up naming no hash reads nothing and tells nothing (204, no receipt); the payer's next voucher
    above the deposit is what makes the gateway re-read the channel."""
    async with session(devnet, deposit=1_000) as s:
        assert (await s.client.request("GET", "/once")).status_code == 200
        (ch,) = s.client.channels.values()
        r = await s.client.http.post(
            "/once", headers=_auth(s, "/once", {"action": "topUp", "channelId": ch.channel})
        )
        assert r.status_code == 204 and "payment-receipt" not in r.headers
        assert s.paywall.top_up_receipt_reads == 0


async def _relay_in_pool(s: Any, sent: int) -> None:
    """Wait until the gateway's relay is in the pool (its pending nonce moved): simulated, sent, not mined."""
    for _ in range(200):
        if await _nonce(s, s.payee) > sent:
            return
        await asyncio.sleep(0.02)
    raise AssertionError("the gateway never sent its relay")


@pytest.fixture
def shared_url(tmp_path: Path) -> Iterator[str]:
    """One PostgreSQL (+ Redis) store the test's two replicas open each on its own."""
    with isolated_url("postgres+redis", tmp_path) as url:
        yield url


async def test_a_payer_front_running_its_relay_costs_one_revert_then_cools_down(
    devnet: DevnetState, shared_url: str
) -> None:
    """The payer signs an open, and moves its money away after the gateway's simulation and before its
    send lands (anvil mines both in one block, the payer's first): the relay reverts and the gateway pays.
    That payer's next relayed deposits, on this process and on a replica sharing the store, are refused
    with no transaction; the gas lost is counted."""
    from gateway import SessionPaywall

    if devnet.backend != "anvil":
        unavailable("ordering two transactions in one block needs anvil (automine off, impersonation)")
    store = await open_store(shared_url)
    replica: SessionPaywall | None = None
    try:
        async with session(devnet, fee_payer=True, store=store) as s:
            replica = SessionPaywall(
                app(),
                routes=ROUTES,
                chain=s.paywall.chain,
                asset=s.paywall.asset,
                pay_to=s.payee,
                store=shared_url,  # the same database, its own connections
                secret=b"s" * 32,
                fee_payer=True,
            )
            payer = await _gasless_payer(s, devnet, usdc=DEPOSIT)
            now = await s.rpc.block_timestamp()
            first = _open_payload(s, devnet, payer, LocalSigner.random(), now=now)
            usdc = ContractAbi(escrow_artifact("TestUSDC").abi)
            sent = await _nonce(s, s.payee)
            await s.rpc.request("anvil_setBalance", [payer.address, hex(10**18)])
            await s.rpc.request("anvil_impersonateAccount", [payer.address])
            await s.rpc.request("evm_setAutomine", [False])
            try:
                relay = asyncio.create_task(s.client.http.post("/meter", headers=_auth(s, "/meter", first)))
                await _relay_in_pool(s, sent)
                elsewhere = "0x" + os.urandom(20).hex()
                move = {
                    "from": payer.address,
                    "to": s.usdc,
                    "data": "0x" + usdc.encode("transfer", elsewhere, DEPOSIT).hex(),
                    "gas": hex(100_000),
                    "maxFeePerGas": hex(10**12),
                    "maxPriorityFeePerGas": hex(10**11),  # above the relay's tip: mined first
                }
                moved = await s.rpc.request("eth_sendTransaction", [move])
                await s.rpc.request("anvil_mine", ["0x1"])
                r = await asyncio.wait_for(relay, 30)
            finally:
                await s.rpc.request("evm_setAutomine", [True])
                await s.rpc.request("anvil_stopImpersonatingAccount", [payer.address])
            assert r.status_code == 409 and r.json()["type"].endswith("transaction-reverted"), r.text
            assert (await s.rpc.get_receipt(moved)) is not None
            assert await s.balance(elsewhere) == DEPOSIT
            assert await _nonce(s, s.payee) == sent + 1  # the one reverted relay

            # Funded again, the payer's next relayed opens are refused with nothing sent, on both replicas.
            minter = TxSender(s.rpc, devnet.deployer.private_key, chain_id=devnet.chain_id)
            await minter.transact(s.usdc, usdc.encode("mint", payer.address, DEPOSIT), gas=100_000)
            sent = await _nonce(s, s.payee)
            transport = httpx.ASGITransport(app=replica)
            async with httpx.AsyncClient(transport=transport, base_url="http://svc") as other:
                for http in (s.client.http, other):
                    again = _open_payload(s, devnet, payer, LocalSigner.random(), now=now)
                    r = await http.post("/meter", headers=_auth(s, "/meter", again))
                    assert r.status_code == 429 and r.json()["type"].endswith("deposit-cooldown"), r.text
            assert await _nonce(s, s.payee) == sent  # no transaction
            assert s.paywall.relay_reverts == 1 and s.paywall.relay_reverted_gas > 0  # counted
            assert not s.paywall.relay_transactions
            # Another payer is not affected.
            other_payer = await _gasless_payer(s, devnet)
            ok = _open_payload(s, devnet, other_payer, LocalSigner.random(), now=now)
            assert (await s.client.http.post("/meter", headers=_auth(s, "/meter", ok))).status_code == 204
            assert await _nonce(s, s.payee) == sent + 1
    finally:
        await store.close()
        if replica is not None and replica._opened is not None:
            await replica._opened.close()


class _Limiter(SessionTopUps):
    def __init__(self, memory: int) -> None:
        self.TOP_UP_MEMORY = memory
        self._top_up_reads = {}


@settings(max_examples=200, deadline=None)
@given(
    events=st.lists(st.tuples(st.integers(0, 5), st.floats(0, 4, allow_nan=False)), max_size=120),
    memory=st.integers(1, 8),
)
def test_top_up_receipt_reads_never_exceed_the_window_and_memory_stays_bounded(
    events: list[tuple[int, float]], memory: int
) -> None:
    """Per channel, at most TOP_UP_READS reads in any TOP_UP_WINDOW (while the channel is remembered), a
    read is refused only when that many were admitted within the window, and the limiter keeps at most
    `memory` channels."""
    limiter, now = _Limiter(memory), 0.0
    admitted: dict[int, list[float]] = {}
    for channel, step in events:
        now += step
        remembered = f"c{channel}" in limiter._top_up_reads
        if not remembered:  # new, or forgotten (least recently used): its count starts again
            admitted[channel] = []
        recent = [t for t in admitted.get(channel, []) if now - t < limiter.TOP_UP_WINDOW]
        try:
            limiter._admit_read(f"c{channel}", now)
        except SessionProblem as exc:
            assert exc.status_hint == 429 and exc.state == {"channelId": f"c{channel}"}
            assert remembered and len(recent) >= limiter.TOP_UP_READS
        else:
            admitted.setdefault(channel, []).append(now)
            if remembered:
                assert len(recent) < limiter.TOP_UP_READS
        assert len(limiter._top_up_reads) <= memory
        if memory >= 6:  # every channel remembered: no window ever holds more than TOP_UP_READS reads
            window = [t for t in admitted.get(channel, []) if now - t < limiter.TOP_UP_WINDOW]
            assert len(window) <= limiter.TOP_UP_READS
