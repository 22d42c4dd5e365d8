"""Attacks on the session paywall's server-submitted deposits and channel state (anvil, real stores).

What an attacker tries: make the gateway pay gas for a transaction that reverts (two opens racing for money
that funds only one), and make it keep state per request forever (channel ids that do not exist, many
relayed opens)."""

from __future__ import annotations

import asyncio
import os
from typing import Any

import httpx
import pytest

from escrow import DevnetState, sign_channel_top_up
from escrow.chain._abi import ContractAbi
from escrow.payments._escrow import escrow_artifact
from tests._sessions import TOKEN, UNIT, session
from tests.test_session_relay import DEPOSIT, _auth, _domain, _gasless_payer, _nonce, _open_payload
from x402 import LocalSigner
from x402._session import deposit_payload, sign_voucher

pytestmark = pytest.mark.anyio


async def test_two_opens_racing_for_money_that_funds_one_send_one_transaction(devnet: DevnetState) -> None:
    """A payer holding one deposit signs two opens (two channels) and sends them at once: each alone passes
    the simulation, so without serializing a payer's relays the gateway sends both and pays for a revert."""
    async with session(devnet, fee_payer=True) as s:
        payer = await _gasless_payer(s, devnet, usdc=DEPOSIT)
        now = await s.rpc.block_timestamp()
        sent, eth = await _nonce(s, s.payee), await s.rpc.get_balance(s.payee)
        opens = [_open_payload(s, devnet, payer, LocalSigner.random(), now=now) for _ in range(2)]
        answers = await asyncio.gather(
            *(s.client.http.post("/meter", headers=_auth(s, "/meter", p)) for p in opens)
        )
        assert sorted(r.status_code for r in answers) == [204, 409], [r.text for r in answers]
        refused = next(r for r in answers if r.status_code == 409)
        assert refused.json()["type"].endswith("transaction-reverted")
        assert await _nonce(s, s.payee) == sent + 1  # one transaction: the refused one was never sent
        assert len(s.paywall.relay_transactions) == 1
        assert await s.balance(payer.address) == 0
        spent = eth - await s.rpc.get_balance(s.payee)
        assert 0 < spent and s.paywall.relay_gas > 0


def _voucher(channel: str, devnet: DevnetState, escrow: str) -> dict[str, Any]:
    key = LocalSigner.random()
    signature = sign_voucher(key, chain_id=devnet.chain_id, escrow=escrow, channel=channel, cumulative=1)
    return {"action": "voucher", "channelId": channel, "cumulativeAmount": "1", "signature": signature}


async def test_channels_that_do_not_exist_leave_nothing_behind(devnet: DevnetState) -> None:
    """Every request naming a fresh random channel id is one free chain read for the attacker: it must be
    answered 410 and leave no per-channel state (a lock per id would grow without bound)."""
    async with session(devnet) as s:
        for _ in range(40):
            cid = "0x" + os.urandom(32).hex()
            r = await s.client.http.get("/once", headers=_auth(s, "/once", _voucher(cid, devnet, s.escrow)))
            assert r.status_code == 410 and r.json()["type"].endswith("channel-not-found"), r.text
        assert not s.paywall._loading and not s.paywall._channels


async def test_relayed_opens_keep_bounded_memory(devnet: DevnetState, monkeypatch: Any) -> None:
    """Many valid relayed opens: what the gateway remembers of them (transactions, used nonces, locks) stays
    bounded, and an open it no longer remembers is still never sent twice (the channel exists)."""
    from gateway._session_deposit import SessionDeposits

    monkeypatch.setattr(SessionDeposits, "RELAY_MEMORY", 2)
    async with session(devnet, fee_payer=True) as s:
        payer = await _gasless_payer(s, devnet, usdc=4 * DEPOSIT)
        now = await s.rpc.block_timestamp()
        opens = [_open_payload(s, devnet, payer, LocalSigner.random(), now=now) for _ in range(4)]
        for p in opens:
            r = await s.client.http.post("/meter", headers=_auth(s, "/meter", p))
            assert r.status_code == 204, r.text
        assert len(s.paywall.relay_transactions) == 2 and len(s.paywall._relayed) == 2
        assert not s.paywall._relaying
        sent = await _nonce(s, s.payee)
        r = await s.client.http.post("/meter", headers=_auth(s, "/meter", opens[0]))  # forgotten, replayed
        assert r.status_code == 204, r.text
        assert await _nonce(s, s.payee) == sent and await s.balance(payer.address) == 0


async def test_amounts_in_other_scripts_digits_are_a_400_not_a_500(devnet: DevnetState) -> None:
    """`"²".isdigit()` is true but `int("²")` raises: an amount written with such a digit (the credential is
    JSON, `\\u00b2` decodes to it) must be refused as malformed, never crash the paywall or the handler."""
    async with session(devnet, fee_payer=True) as s:
        cid = "0x" + os.urandom(32).hex()
        for amount in ("\u00b2", "1\u00b9", "\u2460"):
            body = {**_voucher(cid, devnet, s.escrow), "cumulativeAmount": amount}
            r = await s.client.http.get("/once", headers=_auth(s, "/once", body))
            assert r.status_code == 400, r.text
            assert r.headers["content-type"] == "application/problem+json"
            assert r.json()["type"].endswith("invalid-credential")
        payer = await _gasless_payer(s, devnet)
        opening = _open_payload(s, devnet, payer, LocalSigner.random(), now=await s.rpc.block_timestamp())
        sent = await _nonce(s, s.payee)
        for field in ("value", "validBefore"):
            bad = {**opening, "authorization": {**opening["authorization"], field: "9\u00b2"}}
            r = await s.client.http.post("/meter", headers=_auth(s, "/meter", bad))
            assert r.status_code == 400, r.text
        assert await _nonce(s, s.payee) == sent


async def test_many_tiny_vouchers_keep_bounded_memory_and_settle_exactly(devnet: DevnetState) -> None:
    """A payer may send a voucher per atomic unit of its deposit without being charged (voucher-only posts):
    the paywall must not keep each one in memory, and what it keeps still settles exactly what was charged."""
    async with session(devnet) as s:
        assert (await s.client.request("GET", "/once")).status_code == 200
        (opened,) = s.client.channels.values()
        cid, key = opened.channel, s.client.signer
        accepted = await s.store.high_water(cid)

        def signed(action: str, n: int) -> dict[str, Any]:
            signature = sign_voucher(
                key, chain_id=devnet.chain_id, escrow=s.escrow, channel=cid, cumulative=n
            )
            return {"action": action, "channelId": cid, "cumulativeAmount": str(n), "signature": signature}

        for n in range(accepted + 10, accepted + 10 * 201, 10):
            headers = {**_auth(s, "/once", signed("voucher", n)), "x-payment-voucher-only": "1"}
            assert (await s.client.http.get("/once", headers=headers)).status_code == 204
        ch = s.paywall._channels[cid]
        assert len(ch.vouchers) <= 64
        top = accepted + 10 * 200
        for _ in range(6):  # charged from the credit the vouchers gave
            r = await s.client.http.get("/once", headers=_auth(s, "/once", signed("voucher", top)))
            assert r.status_code == 200, r.text
        spent = 7 * 250
        assert ch.spent == spent and ch.settleable is not None and ch.settleable[0] <= spent
        before = await s.balance(s.payee)
        r = await s.client.http.post("/once", headers=_auth(s, "/once", signed("close", spent)))
        assert r.status_code == 204, r.text
        assert await s.balance(s.payee) - before == spent


async def test_the_gateway_pays_no_gas_for_a_dust_open_or_top_up(devnet: DevnetState) -> None:
    """The gateway pays ~190k gas per relayed open and ~60k per top-up; the payer's deposit stays its own
    (refunded at close). An open presented at the cheapest route (/stream: one token's price) or a top-up
    of one atomic unit would let a payer burn the gateway's gas for nothing: each must hold at least one
    request's maximum on the dearest route (/meter: 100 units)."""
    async with session(devnet, fee_payer=True) as s:
        payer, key = await _gasless_payer(s, devnet), LocalSigner.random()
        now = await s.rpc.block_timestamp()
        sent = await _nonce(s, s.payee)
        for path in ("/stream", "/once"):
            dust = _open_payload(s, devnet, payer, key, now=now, deposit=TOKEN)
            r = await s.client.http.post(path, headers=_auth(s, path, dust))
            assert r.status_code == 402 and r.json()["type"].endswith("deposit-too-small"), r.text
        assert await _nonce(s, s.payee) == sent
        good = _open_payload(s, devnet, payer, key, now=now)
        assert (await s.client.http.post("/stream", headers=_auth(s, "/stream", good))).status_code == 204
        sent += 1
        cid = good["channelId"]
        for amount in (1, 100 * UNIT - 1):
            top = sign_channel_top_up(
                payer, _domain(devnet), channels=s.escrow, channel=cid, amount=amount, valid_before=now + 3600
            )
            payload = {
                "action": "topUp",
                "channelId": cid,
                "additionalDeposit": str(amount),
                **deposit_payload(top.deposit()),
            }
            r = await s.client.http.post("/stream", headers=_auth(s, "/stream", payload))
            assert r.status_code == 402 and r.json()["type"].endswith("deposit-too-small"), r.text
        assert await _nonce(s, s.payee) == sent
        assert await s.balance(payer.address) == 5_000_000 - DEPOSIT


async def test_a_payer_asking_the_chain_to_close_cannot_walk_away_with_what_it_was_served(
    devnet: DevnetState,
) -> None:
    """AgentChannels lets the payer `requestClose()` and, 15 minutes later, `withdraw()` all not settled.
    The paywall reads a channel once and settles on its own schedule (here: only at a close or shutdown), so
    unless it watches its channels, a payer is served, asks the chain to close, and takes the charges back."""
    async with session(devnet, watch_interval=0.2) as s:
        await s.paywall.start()
        try:
            for _ in range(4):
                assert (await s.client.request("GET", "/once")).status_code == 200
            (opened,) = s.client.channels.values()
            cid = opened.channel
            ch = s.paywall._channels[cid]
            assert ch.spent == 1000 and ch.settleable is not None
            owed = ch.settleable[0]
            assert owed >= ch.spent - 250  # every request but perhaps the last is covered by a voucher
            abi = ContractAbi(escrow_artifact("AgentChannels").abi)
            payer = s.opener.sender
            await payer.transact(s.escrow, abi.encode("requestClose", bytes.fromhex(cid[2:])), gas=100_000)
            for _ in range(100):  # the paywall notices within its watch interval and settles
                if await s.balance(s.payee) == owed:
                    break
                await asyncio.sleep(0.1)
            assert await s.balance(s.payee) == owed
            r = await s.client.request("GET", "/once")  # and serves nothing more on that channel
            assert r.status_code == 410, r.text
            # settled on chain: the payer's withdraw 15 minutes later takes back only the rest (the chain's
            # clock is not moved here: the devnet is shared with tests that sign wall-clock deadlines)
            assert (await s.paywall.chain.channel(cid)).settled == owed
        finally:
            await s.paywall.stop()


async def test_a_session_credential_pays_only_the_session_routes_of_a_shared_app(devnet: DevnetState) -> None:
    """The example shares `/metered` between the session paywall and the `PaymentMiddleware` it wraps, which
    lets through a request the session charged. A valid session credential must not open any other priced
    route (`/hello`, `/weather`: the middleware's alone), nor charge a request the app refuses; what it pays
    is charged at the session's price, and `Settlement-Overrides` never leaves."""
    from tests.test_session_example import _balance, _subagent
    from x402 import MppCredential, format_credential

    async with _subagent(devnet, served=False) as (client, payee, rpc):
        assert (await client.request("GET", "/metered?units=1")).status_code == 200
        spent = int(client.receipts[-1].spent)
        (opened,) = client.channels.values()
        top = int(client.receipts[-1].accepted_cumulative) + 10_000  # credit for one more /metered call

        def credential(action: str, cumulative: int) -> dict[str, str]:
            signature = sign_voucher(
                client.signer,
                chain_id=devnet.chain_id,
                escrow=devnet.contracts["channels"],
                channel=opened.channel,
                cumulative=cumulative,
            )
            payload = {
                "action": action,
                "channelId": opened.channel,
                "cumulativeAmount": str(cumulative),
                "signature": signature,
            }
            paid = MppCredential(challenge=client._challenge["/metered"], payload=payload)
            return {"authorization": "Payment " + format_credential(paid)}

        headers = credential("voucher", top)
        for method, path in (("GET", "/hello"), ("GET", "/weather"), ("HEAD", "/hello")):
            r = await client.http.request(method, path, headers=headers)
            assert r.status_code == 402, (path, r.status_code, r.text)
        r = await client.http.post("/metered?units=1", headers=headers)  # the app serves GET only
        assert r.status_code == 405
        r = await client.http.get("/metered?units=2", headers=headers)
        assert r.status_code == 200 and r.json()["units"] == 2, r.text
        assert "payment-receipt" in r.headers and "settlement-overrides" not in r.headers
        before = await _balance(rpc, devnet.contracts["usdc"], payee)
        r = await client.http.post("/metered", headers=credential("close", spent + 200))
        assert r.status_code == 204, r.text  # the close covers exactly what was served: 1 + 2 units
        assert await _balance(rpc, devnet.contracts["usdc"], payee) - before == spent + 200


async def test_an_authorization_about_to_expire_is_not_relayed(devnet: DevnetState) -> None:
    """An open whose `validBefore` is seconds away passes the simulation and, on a chain whose next block
    comes later (or a congested one), reverts once mined: a gasless payer could make the gateway pay for
    reverts at will, a fresh salt each time. A relayed deposit must stay valid well past the time it takes
    to land (`RELAY_MIN_VALIDITY`)."""
    async with session(devnet, fee_payer=True) as s:
        payer = await _gasless_payer(s, devnet)
        sent = await _nonce(s, s.payee)
        now = await s.rpc.block_timestamp()
        for ahead in (5, 30, 59):
            dying = _open_payload(s, devnet, payer, LocalSigner.random(), now=now, valid_before=now + ahead)
            r = await s.client.http.post("/meter", headers=_auth(s, "/meter", dying))
            assert r.status_code == 402 and r.json()["type"].endswith("deposit-expiring"), r.text
        assert await _nonce(s, s.payee) == sent  # nothing sent, no gas paid
        assert await s.balance(payer.address) == 5_000_000
        fine = _open_payload(s, devnet, payer, LocalSigner.random(), now=now, valid_before=now + 120)
        assert (await s.client.http.post("/meter", headers=_auth(s, "/meter", fine))).status_code == 204


async def test_a_store_that_cannot_be_reached_is_a_503_not_a_500(devnet: DevnetState) -> None:
    """The session paywall opens a URL store on first use: with the database down, a payer gets a 503
    problem (retry later), never a 500, and nothing is charged or relayed."""
    from gateway import SessionPaywall
    from tests._sessions import ROUTES, app

    async with session(devnet) as s:
        down = SessionPaywall(
            app(),
            routes=ROUTES,
            chain=s.paywall.chain,
            asset=s.paywall.asset,
            pay_to=s.payee,
            store="postgresql://postgres@127.0.0.1:1/agentpay",
            secret=b"s" * 32,
        )
        transport = httpx.ASGITransport(app=down)
        async with httpx.AsyncClient(transport=transport, base_url="http://svc") as http:
            cid = "0x" + os.urandom(32).hex()
            r = await http.get("/once", headers=_auth(s, "/once", _voucher(cid, devnet, s.escrow)))
            assert r.status_code == 503, r.text
            assert r.headers["content-type"] == "application/problem+json"


async def test_two_replicas_sharing_a_store_never_serve_more_than_the_voucher(devnet: DevnetState) -> None:
    """Two gateway processes behind one load balancer share the store. A payer sends the same voucher (worth
    one request) to both at once: each process's own channel lock and credit would serve it, twice the
    voucher's worth. The store must count what every process charged against the voucher, and a close
    must cover what all of them served."""
    from gateway import SessionPaywall
    from tests._sessions import ROUTES, app

    async with session(devnet) as s:
        assert (await s.client.request("GET", "/once")).status_code == 200  # opens the channel, 250 spent
        (opened,) = s.client.channels.values()
        cid, key = opened.channel, s.client.signer
        replica = SessionPaywall(
            app(),
            routes=ROUTES,
            chain=s.paywall.chain,
            asset=s.paywall.asset,
            pay_to=s.payee,
            store=s.store,
            secret=b"s" * 32,
        )

        def signed(action: str, n: int) -> dict[str, str]:
            signature = sign_voucher(
                key, chain_id=devnet.chain_id, escrow=s.escrow, channel=cid, cumulative=n
            )
            body = {"action": action, "channelId": cid, "cumulativeAmount": str(n), "signature": signature}
            return _auth(s, "/once", body)

        transport = httpx.ASGITransport(app=replica)
        async with httpx.AsyncClient(transport=transport, base_url="http://svc") as other:
            accepted = int(s.client.receipts[-1].accepted_cumulative)
            assert accepted == 250
            # both processes know the channel already (a voucher-only post of the current voucher)
            for http in (s.client.http, other):
                r = await http.get("/once", headers={**signed("voucher", 250), "x-payment-voucher-only": "1"})
                assert r.status_code == 204, r.text
            voucher = signed("voucher", 500)  # one more request's worth
            first, second = await asyncio.gather(
                s.client.http.get("/once", headers=voucher), other.get("/once", headers=voucher)
            )
            assert sorted([first.status_code, second.status_code]) == [200, 402], first.text + second.text
            # a close below what both served is refused, at either process
            for http in (s.client.http, other):
                r = await http.post("/once", headers=signed("close", 250))
                assert r.status_code == 402 and r.json()["type"].endswith("close-mismatch"), r.text
            before = await s.balance(s.payee)
            r = await s.client.http.post("/once", headers=signed("close", 500))
            assert r.status_code == 204, r.text
            assert await s.balance(s.payee) - before == 500
            # the other process never heard of the close: it must serve nothing more on the channel
            r = await other.get("/once", headers=signed("voucher", 750))
            assert r.status_code in (402, 410), r.text
            r = await other.post("/once", headers=signed("close", 750))
            assert r.status_code == 410 and r.json()["type"].endswith("channel-finalized"), r.text


async def test_two_replicas_relay_one_open_once(devnet: DevnetState) -> None:
    """The same relayed open sent to two processes sharing the store at once: each alone finds the channel
    not open yet and the simulation passing, so both would send, and the second pay for a revert. A payer's
    relays are serialized through the store too: one transaction, the other process answers 503 (retry)
    and, asked again, finds the channel open."""
    from gateway import SessionPaywall
    from tests._sessions import ROUTES, app

    async with session(devnet, fee_payer=True) as s:
        replica = SessionPaywall(
            app(),
            routes=ROUTES,
            chain=s.paywall.chain,
            asset=s.paywall.asset,
            pay_to=s.payee,
            store=s.store,
            secret=b"s" * 32,
            fee_payer=True,
        )
        payer = await _gasless_payer(s, devnet)
        good = _open_payload(s, devnet, payer, LocalSigner.random(), now=await s.rpc.block_timestamp())
        sent = await _nonce(s, s.payee)
        transport = httpx.ASGITransport(app=replica)
        async with httpx.AsyncClient(transport=transport, base_url="http://svc") as other:
            answers = await asyncio.gather(
                s.client.http.post("/meter", headers=_auth(s, "/meter", good)),
                other.post("/meter", headers=_auth(s, "/meter", good)),
            )
            assert {r.status_code for r in answers} <= {204, 503}, [r.text for r in answers]
            assert await _nonce(s, s.payee) == sent + 1  # one transaction
            for http in (s.client.http, other):  # asked again: the channel is open, nothing more is sent
                assert (await http.post("/meter", headers=_auth(s, "/meter", good))).status_code == 204
            assert await _nonce(s, s.payee) == sent + 1
            assert await s.balance(payer.address) == 5_000_000 - DEPOSIT
