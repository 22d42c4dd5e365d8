"""Server-submitted opens and top-ups (`feePayer: true`) on anvil: the gateway relays the payer's signed
deposit and pays its gas, opens exactly the channel named, never sends a transaction that would revert,
and sends one transaction for two opens of one channel."""

from __future__ import annotations

import asyncio
import os
from typing import Any

import httpx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from escrow import AuthorizationChannelOpener, DevnetState, TxSender, sign_channel_open, sign_channel_top_up
from escrow.chain._abi import ContractAbi
from escrow.payments._escrow import escrow_artifact
from tests._sessions import UNIT, Session, session
from x402 import Eip712Domain, LocalSigner, MppCredential, format_credential
from x402._mpp import decode_json_param
from x402._session import (
    channel_id,
    deposit_payload,
    open_nonce,
    parse_session_payload,
    sign_voucher,
    top_up_nonce,
)

pytestmark = pytest.mark.anyio

FUNDS = 5_000_000
DEPOSIT = 1_000_000


def _domain(devnet: DevnetState) -> Eip712Domain:
    return Eip712Domain(devnet.usdc_name, devnet.usdc_version, devnet.chain_id, devnet.contracts["usdc"])


async def _gasless_payer(s: Session, devnet: DevnetState, usdc: int = FUNDS) -> LocalSigner:
    """A payer holding USDC and no ETH: it never sends a transaction."""
    payer = LocalSigner.random()
    if usdc:
        abi = ContractAbi(escrow_artifact("TestUSDC").abi)
        minter = TxSender(s.rpc, devnet.deployer.private_key, chain_id=devnet.chain_id)
        await minter.transact(s.usdc, abi.encode("mint", payer.address, usdc), gas=100_000)
    return payer


async def _nonce(s: Session, who: str) -> int:
    return int(await s.rpc.request("eth_getTransactionCount", [who, "pending"]), 16)


def _relaying_client(s: Session, devnet: DevnetState, payer: LocalSigner) -> None:
    """Switch the session's client to a payer that only signs (its opener never relays: the gateway does)."""
    reader = TxSender(s.rpc, "0x" + os.urandom(32).hex(), chain_id=devnet.chain_id)  # reads chain time only
    s.client.opener = AuthorizationChannelOpener(reader, payer, _domain(devnet))
    s.client.deposit = DEPOSIT


async def test_the_gateway_relays_the_open_and_the_top_up_and_pays_their_gas(devnet: DevnetState) -> None:
    async with session(devnet, fee_payer=True) as s:
        payer = await _gasless_payer(s, devnet)
        _relaying_client(s, devnet, payer)
        payee_eth, payee_usdc = await s.rpc.get_balance(s.payee), await s.balance(s.payee)
        charged = 0
        for units in (100, 3, 0, 100):
            r = await s.client.request("GET", f"/meter?units={units}")
            assert r.status_code == 200, r.text
            charged += units * UNIT
        challenge = decode_json_param(s.client._challenge["/meter"].request)["methodDetails"]
        assert challenge["feePayer"] is True and challenge["credentialTypes"] == ["authorization", "hash"]
        await s.client.top_up("/meter", 500_000)
        (ch,) = s.client.channels.values()
        assert (await s.paywall.chain.channel(ch.channel)).deposit == DEPOSIT + 500_000
        for units in (7, 100):
            assert (await s.client.request("GET", f"/meter?units={units}")).status_code == 200
            charged += units * UNIT
        closed = await s.client.close("/meter")
        assert closed is not None and closed.spent == str(charged)
        assert await s.balance(s.payee) - payee_usdc == charged
        assert await s.balance(payer.address) == FUNDS - charged
        assert await _nonce(s, payer.address) == 0 and await s.rpc.get_balance(payer.address) == 0
        assert len(s.paywall.relay_transactions) == 2 and s.paywall.relay_gas > 0
        assert await s.rpc.get_balance(s.payee) < payee_eth  # the gateway's key paid the relays


def _auth(s: Session, path: str, payload: dict[str, Any]) -> dict[str, str]:
    challenge = s.paywall.challenge(s.paywall.routes[path])
    return {
        "authorization": "Payment " + format_credential(MppCredential(challenge=challenge, payload=payload))
    }


def _open_payload(
    s: Session, devnet: DevnetState, payer: LocalSigner, key: LocalSigner, **kw: Any
) -> dict[str, Any]:
    now = kw.pop("now")
    terms: dict[str, Any] = {
        "channels": s.escrow,
        "payee": s.payee,
        "deposit": DEPOSIT,
        "salt": "0x" + os.urandom(32).hex(),
        "authorized_signer": key.address,
        "valid_before": now + 3600,
    }
    terms.update(kw)
    signed = sign_channel_open(payer, _domain(devnet), **terms)
    cid = channel_id(
        payer=payer.address,
        payee=s.payee,
        token=s.usdc,
        salt=signed.salt,
        authorized_signer=key.address,
        escrow=s.escrow,
        chain_id=devnet.chain_id,
    )
    voucher = sign_voucher(key, chain_id=devnet.chain_id, escrow=s.escrow, channel=cid, cumulative=0)
    return {
        "action": "open",
        "channelId": cid,
        **deposit_payload(signed.deposit()),
        "cumulativeAmount": "0",
        "voucherSignature": voucher,
    }


async def test_a_relayed_authorization_opens_only_its_channel_once_and_never_costs_a_revert(
    devnet: DevnetState,
) -> None:
    async with session(devnet, fee_payer=True) as s:
        payer, key = await _gasless_payer(s, devnet), LocalSigner.random()
        now = await s.rpc.block_timestamp()
        http = s.client.http
        sent = await _nonce(s, s.payee)

        async def refused(payload: dict[str, Any], status: int, kind: str) -> None:
            r = await http.post("/meter", headers=_auth(s, "/meter", payload))
            assert r.status_code == status and r.json()["type"].endswith(kind), r.text
            assert await _nonce(s, s.payee) == sent  # nothing was sent, no gas spent

        good = _open_payload(s, devnet, payer, key, now=now)
        # the channel id names another channel (another salt) than the authorization opens
        other = _open_payload(s, devnet, payer, key, now=now)
        await refused({**good, "channelId": other["channelId"]}, 402, "channel-mismatch")
        # signed for another payee, another escrow: the recomputed nonce does not match
        await refused(_open_payload(s, devnet, payer, key, now=now, payee=s.payer), 402, "invalid-signature")
        await refused(
            _open_payload(s, devnet, payer, key, now=now, channels=s.payer), 402, "invalid-signature"
        )
        # too small to pay for one request of the route (its maximum, 100 units of /meter): not worth the gas
        await refused(
            _open_payload(s, devnet, payer, key, now=now, deposit=100 * UNIT - 1), 402, "deposit-too-small"
        )
        # the opening voucher is not the session key's
        forged = sign_voucher(
            LocalSigner.random(),
            chain_id=devnet.chain_id,
            escrow=s.escrow,
            channel=good["channelId"],
            cumulative=0,
        )
        await refused({**good, "voucherSignature": forged}, 402, "signer-mismatch")
        # expired (or expiring before it could land): refused before any chain call
        await refused(
            _open_payload(s, devnet, payer, key, now=now, valid_before=now - 1), 402, "deposit-expiring"
        )
        # from a payer with no money: the simulation says so, nothing is sent
        poor = await _gasless_payer(s, devnet, usdc=0)
        await refused(_open_payload(s, devnet, poor, key, now=now), 409, "transaction-reverted")
        # two opens of one channel at once: one transaction; again later: none
        first, second = await asyncio.gather(
            http.post("/meter", headers=_auth(s, "/meter", good)),
            http.post("/meter", headers=_auth(s, "/meter", good)),
        )
        assert (first.status_code, second.status_code) == (204, 204), first.text + second.text
        assert await _nonce(s, s.payee) == sent + 1 and len(s.paywall.relay_transactions) == 1
        assert (await http.post("/meter", headers=_auth(s, "/meter", good))).status_code == 204
        assert await _nonce(s, s.payee) == sent + 1
        assert await s.balance(payer.address) == FUNDS - DEPOSIT

        # a voucher carrying a top-up: the deposit first, then the voucher, in one request
        cid = good["channelId"]
        top = sign_channel_top_up(
            payer, _domain(devnet), channels=s.escrow, channel=cid, amount=200_000, valid_before=now + 3600
        )
        deposit = {"action": "topUp", **deposit_payload(top.deposit())}

        def voucher(n: int, extra: dict[str, Any] | None = None) -> dict[str, Any]:
            signature = sign_voucher(
                key, chain_id=devnet.chain_id, escrow=s.escrow, channel=cid, cumulative=n
            )
            body = {"action": "voucher", "channelId": cid, "cumulativeAmount": str(n), "signature": signature}
            return body if extra is None else {**body, "deposit": extra}

        r = await http.get("/once", headers=_auth(s, "/once", voucher(DEPOSIT + 250, deposit)))
        assert r.status_code == 200, r.text
        assert (await s.paywall.chain.channel(cid)).deposit == DEPOSIT + 200_000
        sent += 2
        assert await _nonce(s, s.payee) == sent
        # the same top-up replayed to a gateway that never saw it: simulated, refused, the voucher with it too
        again = _fresh_paywall(s)
        async with httpx.AsyncClient(
            transport=httpx.ASGITransport(app=again), base_url="http://svc"
        ) as fresh:
            r = await fresh.get("/once", headers=_auth(s, "/once", voucher(DEPOSIT + 500, deposit)))
            assert r.status_code == 409 and r.json()["type"].endswith("transaction-reverted"), r.text
        assert await _nonce(s, s.payee) == sent
        assert await s.store.high_water(cid) == DEPOSIT + 250  # the voucher was not accepted
        # a top-up of somebody else's channel, by another payer: refused before any chain call
        stranger = sign_channel_top_up(
            poor, _domain(devnet), channels=s.escrow, channel=cid, amount=100 * UNIT, valid_before=now + 3600
        )
        payload = {
            "action": "topUp",
            "channelId": cid,
            "additionalDeposit": str(100 * UNIT),
            **deposit_payload(stranger.deposit()),
        }
        await refused(payload, 402, "signer-mismatch")


def _fresh_paywall(s: Session) -> Any:
    from gateway import MemoryStore, SessionPaywall
    from tests._sessions import ROUTES, app

    return SessionPaywall(
        app(),
        routes=ROUTES,
        chain=s.paywall.chain,
        asset=s.paywall.asset,
        pay_to=s.payee,
        store=MemoryStore(),
        secret=b"s" * 32,
        fee_payer=True,
    )


async def test_a_credential_type_the_gateway_did_not_list_is_refused(devnet: DevnetState) -> None:
    async with session(devnet) as s:  # no fee_payer: only `hash` is listed
        assert s.paywall.request_object(s.paywall.routes["/meter"])["methodDetails"]["credentialTypes"] == [
            "hash"
        ]
        payer, key = await _gasless_payer(s, devnet), LocalSigner.random()
        sent = await _nonce(s, s.payee)
        payload = _open_payload(s, devnet, payer, key, now=await s.rpc.block_timestamp())
        r = await s.client.http.post("/meter", headers=_auth(s, "/meter", payload))
        assert (
            r.status_code == 402
            and r.json()["type"] == "https://paymentauth.org/problems/malformed-credential"
        )
        for kind in ("permit2", "authorization"):
            r = await s.client.http.post("/meter", headers=_auth(s, "/meter", {**payload, "type": kind}))
            assert r.status_code == 402 and r.json()["type"].endswith("malformed-credential"), r.text
        assert await _nonce(s, s.payee) == sent and await s.balance(payer.address) == FUNDS


_addresses = st.binary(min_size=20, max_size=20).map(lambda b: "0x" + b.hex())
_words = st.binary(min_size=32, max_size=32).map(lambda b: "0x" + b.hex())


@settings(max_examples=60, deadline=None)
@given(
    payee=_addresses,
    other=_addresses,
    salt=_words,
    deposit=st.integers(1, 2**96),
    field=st.sampled_from(range(4)),
)
def test_the_relayed_nonce_binds_the_channel_terms(
    payee: str, other: str, salt: str, deposit: int, field: int
) -> None:
    payer, key = LocalSigner.random(), LocalSigner.random()
    domain = Eip712Domain("USD Coin", "2", 31337, "0x" + "11" * 20)
    escrow = "0x" + "22" * 20
    signed = sign_channel_open(
        payer,
        domain,
        channels=escrow,
        payee=payee,
        deposit=deposit,
        salt=salt,
        authorized_signer=key.address,
        valid_before=2**40,
    )
    terms = {
        "payer": payer.address,
        "payee": payee,
        "token": domain.verifying_contract,
        "salt": salt,
        "authorized_signer": key.address,
    }
    assert open_nonce(**terms) == signed.nonce
    # what the wire carries parses back to the same deposit, and its expected nonce is the signed one
    wire = {
        "action": "open",
        "channelId": signed.channel_id,
        **deposit_payload(signed.deposit()),
        "cumulativeAmount": "0",
        "voucherSignature": "0x" + "00" * 65,
    }
    parsed = parse_session_payload(wire).deposit
    assert parsed is not None and parsed.value == deposit
    assert (
        parsed.expected_nonce(payee=payee, token=domain.verifying_contract, channel=signed.channel_id)
        == signed.nonce
    )
    # any other payee, token, salt or signer makes another nonce: the contract (and the gateway) refuse it
    name = ["payee", "token", "salt", "authorized_signer"][field]
    changed = {**terms, name: other if name != "salt" else "0x" + other[2:] + "00" * 12}
    if changed[name].lower() != str(terms[name]).lower():
        assert open_nonce(**changed) != signed.nonce
    top = top_up_nonce(channel=signed.channel_id, amount=deposit, payer=payer.address, salt=salt)
    assert top != top_up_nonce(channel=signed.channel_id, amount=deposit + 1, payer=payer.address, salt=salt)


async def test_a_first_voucher_carrying_the_open_is_paid_in_one_round_trip(devnet: DevnetState) -> None:
    async with session(devnet, fee_payer=True) as s:
        payer, key = await _gasless_payer(s, devnet), LocalSigner.random()
        opening = _open_payload(s, devnet, payer, key, now=await s.rpc.block_timestamp())
        cid = opening["channelId"]
        deposit = {
            k: v for k, v in opening.items() if k not in ("channelId", "cumulativeAmount", "voucherSignature")
        }
        signature = sign_voucher(key, chain_id=devnet.chain_id, escrow=s.escrow, channel=cid, cumulative=250)
        body = {"action": "voucher", "channelId": cid, "cumulativeAmount": "250", "signature": signature}
        # signed by another key: refused before the gateway pays for anything
        forged = sign_voucher(
            LocalSigner.random(), chain_id=devnet.chain_id, escrow=s.escrow, channel=cid, cumulative=250
        )
        sent = await _nonce(s, s.payee)
        r = await s.client.http.get(
            "/once", headers=_auth(s, "/once", {**body, "signature": forged, "deposit": deposit})
        )
        assert r.status_code == 402 and r.json()["type"].endswith("signer-mismatch"), r.text
        assert await _nonce(s, s.payee) == sent and not (await s.paywall.chain.channel(cid)).exists
        r = await s.client.http.get("/once", headers=_auth(s, "/once", {**body, "deposit": deposit}))
        assert r.status_code == 200, r.text
        info = await s.paywall.chain.channel(cid)
        assert info.deposit == DEPOSIT and info.payer.lower() == payer.address.lower()
        assert info.authorized_signer.lower() == key.address.lower()
        assert await s.balance(payer.address) == FUNDS - DEPOSIT and await _nonce(s, s.payee) == sent + 1
