"""A session gateway's recovery on anvil: a restarted gateway settles at startup what a crashed one served
(no payer request), and a close whose receipt is late stays queued and is answered with its outcome."""

from __future__ import annotations

import asyncio
from pathlib import Path

import httpx
import pytest

from escrow import DevnetState
from gateway import open_store
from tests._sessions import Session, restarted, session
from x402 import LocalSigner, MppCredential, X402Error, format_credential
from x402._session import SessionReceipt, sign_voucher
from x402.client_session import SessionClient

pytestmark = pytest.mark.anyio


async def test_a_restarted_gateway_settles_at_startup_what_a_crashed_one_served(
    devnet: DevnetState, tmp_path: Path
) -> None:
    url = f"sqlite:///{tmp_path / 'payments.db'}"
    store = await open_store(url)
    async with session(devnet, store=store) as s:  # settle_every=0: this gateway never settles by itself
        before = await s.balance(s.payee)
        # two payers' channels (two session keys of one payer) and a third one closed properly
        other = SessionClient(
            s.client.http,
            signer=LocalSigner.random(),
            opener=s.opener,
            deposit=100_000,
            max_voucher_step=10_000,
        )
        closed = SessionClient(
            s.client.http,
            signer=LocalSigner.random(),
            opener=s.opener,
            deposit=100_000,
            max_voucher_step=10_000,
        )
        for _ in range(7):
            assert (await s.client.request("GET", "/once")).status_code == 200
        for _ in range(3):
            assert (await other.request("GET", "/once")).status_code == 200
            assert (await closed.request("GET", "/once")).status_code == 200
        assert (await closed.close("/once")) is not None
        paid_by_close = 3 * 250
        assert await s.balance(s.payee) - before == paid_by_close
        sent = len(s.settler.transactions)
        await store.close()  # the gateway dies: nothing it held in memory survives, the file does

        second = await open_store(url)
        try:
            again = restarted(s, second)
            reads = 0
            chain_channel = again.chain.channel

            async def counted(channel_id: str) -> object:
                nonlocal reads
                reads += 1
                return await chain_channel(channel_id)

            again.chain.channel = counted  # type: ignore[method-assign]
            await again.start()  # lifespan startup: no payer ever comes back
            await again.stop()
            assert await s.balance(s.payee) - before == paid_by_close + 7 * 250 + 3 * 250
            assert len(again.settler.transactions) == 2  # one settle per served, unsettled channel
            assert (
                reads == 2 + 2
            )  # the two unsettled channels, each read again before its settle; not the closed one
            # restarted once more: everything is queued or settled already, nothing is read or sent
            third = restarted(s, second)
            third.chain = again.chain
            reads = 0
            assert await third.discover() == [] and reads == 0
            await third.settler.drain()
            assert third.settler.transactions == []
            assert await s.balance(s.payee) - before == paid_by_close + 10 * 250
            assert sent == 1  # the first gateway only closed
        finally:
            again.chain.channel = chain_channel  # type: ignore[method-assign]
            await second.close()


def _close_auth(s: Session, cumulative: int) -> dict[str, str]:
    (ch,) = s.client.channels.values()
    payload = {
        "action": "close",
        "channelId": ch.channel,
        "cumulativeAmount": str(cumulative),
        "signature": sign_voucher(
            s.client.signer, chain_id=ch.chain_id, escrow=ch.escrow, channel=ch.channel, cumulative=cumulative
        ),
    }
    challenge = s.client._challenge["/once"]
    return {
        "authorization": "Payment " + format_credential(MppCredential(challenge=challenge, payload=payload))
    }


async def _sent(s: Session) -> int:
    return int(await s.rpc.request("eth_getTransactionCount", [s.payee, "pending"]), 16)


async def test_a_close_whose_receipt_is_late_is_retried_by_the_engine_and_its_outcome_given(
    devnet: DevnetState,
) -> None:
    async with session(devnet) as s:
        s.settler.receipt_timeout, s.settler.retry_base = 1.0, 0.1
        for _ in range(2):
            assert (await s.client.request("GET", "/once")).status_code == 200
        (ch,) = s.client.channels.values()
        again = _close_auth(s, 500)  # the payer's close, as it may send it again
        payee, payer, sent = await s.balance(s.payee), await s.balance(s.payer), await _sent(s)
        await s.rpc.request("evm_setAutomine", [False])  # a slow chain: nothing is mined until we say so
        try:
            with pytest.raises(X402Error) as pending:
                await s.client.close("/once")
            assert pending.value.code == "close_pending"
            assert await _sent(s) == sent + 1
            item = await s.store.list_settlements(kind="channel")
            (close,) = [i for i in item if ":close:" in i.key]
            assert close.state == "failed" and close.retry_at is not None  # to be tried again, not dead
            assert "settlement_pending: sent in 0x" in (close.error or "")
            # the channel serves nothing more meanwhile, and asking again sends nothing again
            r = await s.client.http.get("/once", headers=again)
            assert r.status_code == 503 and r.json()["type"].endswith("close-pending"), r.text
            tx_hash = r.json()["txHash"]
            assert await _sent(s) == sent + 1
            r = await s.client.request("GET", "/once")
            assert r.status_code == 410, r.text
        finally:
            await s.rpc.request("evm_setAutomine", [True])
        await s.rpc.request("evm_mine", [])
        await asyncio.sleep(0.3)
        receipt = await s.client.close("/once")  # the payer asks again: the outcome of that same close
        assert isinstance(receipt, SessionReceipt) and receipt.tx_hash == tx_hash and receipt.spent == "500"
        assert await s.balance(s.payee) - payee == 500
        assert await s.balance(s.payer) - payer == 1_000_000 - 500  # the rest of the deposit back
        assert await _sent(s) == sent + 1
        settled = await s.store.get_settlement(close.key)
        assert settled is not None and settled.state == "settled"
        # and once more: the channel is finalized
        async with httpx.AsyncClient(
            transport=httpx.ASGITransport(app=s.paywall), base_url="http://svc"
        ) as h:
            r = await h.post("/once", headers=again)
            assert r.status_code == 410, r.text
        assert ch.channel not in s.paywall._channels
