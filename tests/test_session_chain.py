"""MPP sessions on AgentChannels (real anvil): many calls over one channel settle in a handful of
transactions, the payee receives exactly the actual charges, streams are billed per token."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import httpx
import msgspec
import pytest

from escrow import DevnetState
from gateway import Settlement, open_store
from gateway._channels import ChannelSettler, ChannelVoucher, encode_voucher
from tests._sessions import TOKEN, UNIT, Session, restarted, session
from x402 import LocalSigner, MppCredential, SpendPolicyViolation, format_credential
from x402._session import SessionReceipt, sign_voucher
from x402.client import SpendPolicy

pytestmark = pytest.mark.anyio


async def test_thousand_calls_settle_in_a_handful_of_transactions(devnet: DevnetState) -> None:
    async with session(devnet, settle_every=40_000) as s:
        before = await s.balance(s.payee)
        expected = 0
        for i in range(1000):
            units = i % 7  # 0..6 units; 0 is a valid charge
            r = await s.client.request("GET", f"/meter?units={units}" + ("&via=header" if i % 2 else ""))
            assert r.status_code == 200, r.text
            assert "settlement-overrides" not in r.headers
            expected += units * UNIT
        await s.settler.drain()
        receipt = await s.client.close("/meter")
        assert receipt is not None and receipt.tx_hash and receipt.spent == str(expected)
        assert await s.balance(s.payee) - before == expected
        # one open, a few settles, one close
        assert 1 <= len(s.settler.transactions) <= 8, s.settler.transactions
        assert s.client.receipts[-1].reference == s.client.receipts[-1].channel_id


async def test_stream_charges_exactly_n_tokens(devnet: DevnetState) -> None:
    async with session(devnet, served=True) as s:
        before = await s.balance(s.payee)
        events = [e async for e in s.client.stream("/stream?tokens=450")]
        messages = [d for e, d in events if e == "message"]
        assert messages == [f"t{i}" for i in range(450)]
        assert events[-1][0] == "payment-receipt"
        receipt = await s.client.close("/stream")
        assert receipt is not None and receipt.spent == str(450 * TOKEN)
        assert await s.balance(s.payee) - before == 450 * TOKEN


def _auth(s: Session, path: str, payload: dict[str, Any]) -> dict[str, str]:
    challenge = s.client._challenge[path]
    return {
        "authorization": "Payment " + format_credential(MppCredential(challenge=challenge, payload=payload))
    }


def _voucher(
    s: Session,
    cumulative: int,
    *,
    signer: LocalSigner | None = None,
    channel: str | None = None,
    chain_id: int | None = None,
    action: str = "voucher",
) -> dict[str, Any]:
    (ch,) = s.client.channels.values()
    signature = sign_voucher(
        signer or s.client.signer,
        chain_id=chain_id or ch.chain_id,
        escrow=ch.escrow,
        channel=channel or ch.channel,
        cumulative=cumulative,
    )
    return {
        "action": action,
        "channelId": channel or ch.channel,
        "cumulativeAmount": str(cumulative),
        "signature": signature,
    }


async def test_bad_vouchers_are_refused_with_the_channel_state(devnet: DevnetState) -> None:
    async with session(devnet, deposit=5_000) as s:
        assert (await s.client.request("GET", "/once")).status_code == 200  # opens the channel, 250 spent
        (ch,) = s.client.channels.values()
        accepted = ch.signed
        # a duplicate voucher is a no-op after its signature check: it pays from the credit it holds
        r = await s.client.http.get("/once", headers=_auth(s, "/once", _voucher(s, accepted)))
        # (here the credit is used up, so it is refused for the balance, not as a stale voucher)
        assert r.status_code == 402 and r.json()["type"].endswith("insufficient-balance"), r.text
        before = await s.store.high_water(ch.channel)
        # below the high-water mark: 402 with the current state
        r = await s.client.http.get("/once", headers=_auth(s, "/once", _voucher(s, accepted - 1)))
        assert r.status_code == 402 and r.json()["acceptedCumulative"] == str(before)
        assert "www-authenticate" in r.headers
        # above the deposit: 402 insufficient deposit
        r = await s.client.http.get("/once", headers=_auth(s, "/once", _voucher(s, 5_001)))
        assert r.status_code == 402 and r.json()["title"] == "insufficient deposit", r.text
        # signed by someone else, for another chain, for another channel: 402
        for payload in (
            _voucher(s, accepted + 250, signer=LocalSigner.random()),
            _voucher(s, accepted + 250, chain_id=1),
        ):
            r = await s.client.http.get("/once", headers=_auth(s, "/once", payload))
            assert r.status_code == 402 and r.json()["type"].endswith("signer-mismatch"), r.text
        other = {**_voucher(s, accepted + 250), "channelId": "0x" + "11" * 32}
        r = await s.client.http.get("/once", headers=_auth(s, "/once", other))
        assert r.status_code == 410 and r.json()["type"].endswith("channel-not-found")
        swapped = {**_voucher(s, accepted + 250, channel="0x" + "11" * 32), "channelId": ch.channel}
        r = await s.client.http.get("/once", headers=_auth(s, "/once", swapped))
        assert r.status_code == 402
        # malformed: 400, never 500
        r = await s.client.http.get(
            "/once", headers=_auth(s, "/once", {"action": "voucher", "channelId": "x"})
        )
        assert r.status_code == 400
        # state intact: nothing above was accepted or charged
        assert await s.store.high_water(ch.channel) == before
        assert (await s.client.request("GET", "/once")).status_code == 200


async def test_top_up_and_close_answer_204_without_the_handler(devnet: DevnetState) -> None:
    async with session(devnet, deposit=1_000) as s:
        calls = 0
        for _ in range(4):
            assert (await s.client.request("GET", "/once")).status_code == 200
            calls += 1
        # the deposit (1,000) is used up: the next voucher would exceed it
        with pytest.raises(SpendPolicyViolation):
            await s.client.request("GET", "/once")
        (ch,) = s.client.channels.values()
        await s.opener.top_up(escrow=s.escrow, channel=ch.channel, amount=1_000)
        r = await s.client.http.post(
            "/once", headers=_auth(s, "/once", {"action": "topUp", "channelId": ch.channel})
        )
        assert r.status_code == 204 and r.content == b""
        ch.deposit += 1_000
        assert (await s.client.request("GET", "/once")).status_code == 200
        before = await s.balance(s.payee)
        late = _voucher(s, 1_500)
        receipt = await s.client.close("/once")
        assert receipt is not None and receipt.reference == ch.channel and receipt.spent == "1250"
        assert await s.balance(s.payee) - before == 1250
        # the channel is finalized: further vouchers are refused
        r = await s.client.http.get("/once", headers=_auth(s, "/once", late))
        assert r.status_code == 410


async def test_concurrent_requests_on_one_channel_never_overspend(devnet: DevnetState) -> None:
    async with session(devnet) as s:
        assert (await s.client.request("GET", "/meter?units=1")).status_code == 200
        (ch,) = s.client.channels.values()
        # Twenty requests at once presenting one voucher that covers a single maximum: one is served.
        payload = _voucher(s, ch.spent + 100 * UNIT)
        rs = await asyncio.gather(
            *(s.client.http.get("/meter?units=100", headers=_auth(s, "/meter", payload)) for _ in range(20))
        )
        assert sorted(r.status_code for r in rs).count(200) == 1
        assert await s.store.high_water(ch.channel + "#spent") == UNIT + 100 * UNIT


async def test_voucher_posted_during_a_stream_is_not_charged(devnet: DevnetState) -> None:
    async with session(devnet, served=True) as s:
        events = [e async for e in s.client.stream("/stream?tokens=250")]
        assert sum(1 for e, _ in events if e == "message") == 250
        receipt = msgspec.json.decode(events[-1][1], type=SessionReceipt)
        assert receipt.spent == str(250 * TOKEN) and receipt.units == 250


async def test_a_restarted_gateway_keeps_the_high_water_mark_and_the_spend(
    devnet: DevnetState, tmp_path: Path
) -> None:
    store = await open_store(f"sqlite:///{tmp_path / 'payments.db'}")
    try:
        async with session(devnet, store=store) as s:
            before = await s.balance(s.payee)
            for _ in range(3):
                assert (await s.client.request("GET", "/once")).status_code == 200
            (ch,) = s.client.channels.values()
            old = _voucher(s, 250)  # the first voucher, already used
            current = _voucher(s, ch.signed)
            # the process restarts: a new paywall over the same store and chain, nothing in memory
            again = restarted(s, second := await open_store(f"sqlite:///{tmp_path / 'payments.db'}"))
            async with httpx.AsyncClient(
                transport=httpx.ASGITransport(app=again), base_url="http://svc"
            ) as http:
                r = await http.get("/once", headers=_auth(s, "/once", old))
                assert r.status_code == 402 and r.json()["acceptedCumulative"] == "750", r.text
                # the last voucher again: its credit was spent before the restart, nothing is served twice
                r = await http.get("/once", headers=_auth(s, "/once", current))
                assert r.status_code == 402 and r.json()["spent"] == "750", r.text
            # what the first process charged is settled by the second (it may never have been)
            await again.settler.drain()
            assert await s.balance(s.payee) - before == 750
            await second.close()
    finally:
        await store.close()


async def test_the_spend_policy_holds_what_vouchers_authorize_and_spends_what_was_charged(
    devnet: DevnetState,
) -> None:
    policy = SpendPolicy(max_per_call=10_000, total_budget=50_000)
    async with session(devnet, policy=policy) as s:
        for units in (3, 0, 5):
            assert (await s.client.request("GET", f"/meter?units={units}")).status_code == 200
        assert policy.spent == 8 * UNIT
        assert policy.spent + policy.reserved <= 8 * UNIT + 10_000  # one maximum ahead, never more
        await s.client.close("/meter")
        assert (policy.spent, policy.reserved) == (8 * UNIT, 0)
    # a route whose maximum is above the per-call cap is refused before any voucher is signed
    strict = SpendPolicy(max_per_call=5_000)
    async with session(devnet, policy=strict, max_step=10**9) as s:
        with pytest.raises(SpendPolicyViolation):
            await s.client.request("GET", "/meter?units=1")
        (ch,) = s.client.channels.values()
        # only the first, probing voucher (one unit) was signed; the $0.01 one never was
        assert ch.signed == UNIT and (strict.spent, strict.reserved) == (0, UNIT)


async def test_a_gateway_restarted_after_serving_settles_exactly_what_it_served(
    devnet: DevnetState, tmp_path: Path
) -> None:
    url = f"sqlite:///{tmp_path / 'payments.db'}"
    store = await open_store(url)
    async with session(devnet, store=store) as s:  # settle_every=0: this gateway never settles by itself
        before = await s.balance(s.payee)
        for _ in range(7):
            assert (await s.client.request("GET", "/once")).status_code == 200
        (ch,) = s.client.channels.values()
        assert s.settler.transactions == [] and await s.balance(s.payee) == before
        await store.close()  # the gateway dies: nothing it held in memory survives, the file does
        second = await open_store(url)
        try:
            again = restarted(s, second)
            await again.settle(ch.channel)  # from the store alone: the payer never comes back
            await again.settler.drain()
            assert await s.balance(s.payee) - before == 7 * 250
            assert len(again.settler.transactions) == 1
            # asked again (another restart, an operator): the chain already paid it, nothing is sent
            third = restarted(s, second)
            await third.settle(ch.channel)
            await third.settler.drain()
            assert third.settler.transactions == [] and await s.balance(s.payee) - before == 7 * 250
        finally:
            await second.close()


def _queued(s: Session, n: int, signature: str) -> Settlement:
    """The settlement queue's item for the session's channel up to `n` (as the paywall queues it)."""
    (ch,) = s.client.channels.values()
    v = ChannelVoucher(
        chain_id=ch.chain_id, escrow=ch.escrow, channel=ch.channel, cumulative=n, signature=signature
    )
    return Settlement(
        key=v.key(), kind="channel", payload=encode_voucher(v), payer=s.payer, amount=n, created_at=n
    )


async def test_the_channel_settler_never_pays_a_voucher_the_chain_already_paid(devnet: DevnetState) -> None:
    async with session(devnet) as s:
        for _ in range(3):
            assert (await s.client.request("GET", "/once")).status_code == 200
        (ch,) = s.client.channels.values()
        before = await s.balance(s.payee)
        vouchers = {n: _voucher(s, n)["signature"] for n in (250, 500, 750)}
        # a settle of 500 landed whose outcome this settler never recorded (a crash, a lost receipt)
        await s.paywall.chain.settle(ch.channel, 500, vouchers[500])

        def queued(n: int) -> Settlement:
            return _queued(s, n, vouchers[n])

        for n in (250, 500, 750):
            await s.store.enqueue(queued(n))
        # recovery records what the chain shows and sends nothing
        leased = await s.store.lease("channel", limit=10, lease_seconds=30)
        recovered = {o.amount: o.status for o in await s.settler.reconcile_items(leased)}
        assert recovered == {250: "settled_elsewhere", 500: "settled_elsewhere", 750: "retry"}
        assert s.settler.transactions == []
        await s.store.requeue(queued(750).key)
        outcomes = {o.amount: (o.status, o.tx_hash) for o in await s.settler.drain()}
        assert outcomes[750][0] == "settled" and s.settler.transactions == [outcomes[750][1]]
        assert await s.balance(s.payee) - before == 750  # 500 + the 250 above it: never 500 twice
        settled = await s.store.get_settlement(queued(750).key)
        assert settled is not None and settled.state == "settled"


async def test_a_settle_whose_receipt_is_late_is_waited_for_never_sent_again(devnet: DevnetState) -> None:
    async with session(devnet) as s:
        for _ in range(2):
            assert (await s.client.request("GET", "/once")).status_code == 200
        (ch,) = s.client.channels.values()
        before, sent = await s.balance(s.payee), await _sent(s)
        settler = ChannelSettler(s.store, s.paywall.chain, receipt_timeout=1.0, retry_base=0.1)
        await s.store.enqueue(_queued(s, 500, _voucher(s, 500)["signature"]))
        await s.rpc.request("evm_setAutomine", [False])  # a slow chain: nothing is mined until we say so
        try:
            (first,) = await settler.drain()
            assert (first.status, first.code) == ("retry", "settlement_pending")
            await asyncio.sleep(0.3)  # its retry is due: the transaction is still in the pool
            (second,) = await settler.drain()
            assert (second.status, second.code) == ("retry", "settlement_pending")
            assert await _sent(s) == sent + 1  # one send, however often the settler looks
        finally:
            await s.rpc.request("evm_setAutomine", [True])
        await s.rpc.request("evm_mine", [])
        await asyncio.sleep(0.3)
        (third,) = await settler.drain()
        assert third.status == "settled_elsewhere" and third.tx_hash.startswith("0x")
        assert await s.balance(s.payee) - before == 500 and await _sent(s) == sent + 1


async def _sent(s: Session) -> int:
    return int(await s.rpc.request("eth_getTransactionCount", [s.payee, "pending"]), 16)
