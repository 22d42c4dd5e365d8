"""The session-key wallet (``x402.client_escrow``) without a chain: what it sends, and which offer it picks.

The chain side (a real grant, settlement, revocation) is in ``test_escrow_chain.py``; here the offers are
built by hand so that every choice ``PaymentAuth`` makes for a :class:`SessionKeyWallet` is pinned down.
"""

from __future__ import annotations

import time

import httpx
import pytest

from x402 import (
    LocalSigner,
    MppChallenge,
    NoPayableOffer,
    PaymentRequirements,
    SpendPolicyViolation,
    challenge_id,
    decode_escrow_payload,
    decode_payment_signature,
    encode_json_param,
    escrow_domain,
    format_www_authenticate,
    parse_credential,
    recover_payment,
    rfc3339,
)
from x402.client import (
    ACCEPT_PAYMENT_HEADER,
    Eip3009Wallet,
    Offer,
    PaymentAuth,
    SpendPolicy,
    offers_from_response,
    payment_headers,
)
from x402.client_escrow import EscrowWallet, SessionKeyAuth, SessionKeyWallet

CHAIN = 31337
NETWORK = f"eip155:{CHAIN}"
TOKEN = "0x5FbDB2315678afecb367f032d93F642f64180aa3"
ESCROW = "0xe7f1725E7734CE288F8367e1Bb143E90bb3F0512"
PAY_TO = "0x3C44CdDdB6a900fa2b585dd299e03d12FA4293BC"
PAYER = "0x70997970C51812dc3A010C7d01b50e0d17dc79C8"
SESSION = LocalSigner("0x" + "51" * 32)
OWNER_EOA = LocalSigner("0x" + "ac" * 32)
SECRET = "client-escrow-test-secret-32-bytes-long!"


def escrow_wallet(**kwargs: object) -> EscrowWallet:
    return EscrowWallet(
        SESSION,
        payer=PAYER,
        chain_id=CHAIN,
        escrow=ESCROW,
        token=TOKEN,
        max_per_call=5000,
        **kwargs,  # type: ignore[arg-type]
    )


def exact_wallet() -> Eip3009Wallet:
    return Eip3009Wallet(OWNER_EOA, CHAIN, {TOKEN: ("USD Coin", "2")})


def x402_offer(scheme: str, amount: int = 1000) -> Offer:
    extra = (
        {"escrow": ESCROW, "name": "AgentEscrow", "version": "1", "deadlineSeconds": 600}
        if scheme == "escrow"
        else {"name": "USD Coin", "version": "2"}
    )
    req = PaymentRequirements(
        scheme=scheme, network=NETWORK, asset=TOKEN, amount=str(amount), pay_to=PAY_TO,
        max_timeout_seconds=60, extra=extra,
    )  # fmt: skip
    return Offer(
        protocol="x402v2", scheme=scheme, network=NETWORK, asset=TOKEN, amount=amount, pay_to=PAY_TO,
        max_timeout_seconds=60, extra=extra, requirements=req,
    )  # fmt: skip


def mpp_challenge(credential_type: str, amount: int = 1000) -> MppChallenge:
    details: dict[str, object] = {"chainId": CHAIN, "credentialTypes": [credential_type], "decimals": 6}
    if credential_type == "escrow":
        details |= {"escrowContract": ESCROW, "deadlineSeconds": 600}
    request = encode_json_param(
        {"amount": str(amount), "currency": TOKEN, "recipient": PAY_TO, "methodDetails": details}
    )
    expires = rfc3339(time.time() + 300)
    cid = challenge_id(SECRET, "api.test", "evm", "charge", request, expires, None, None)
    return MppChallenge(
        id=cid, realm="api.test", method="evm", intent="charge", request=request, expires=expires
    )


def mpp_offer(credential_type: str, amount: int = 1000) -> Offer:
    response = httpx.Response(
        402, headers={"WWW-Authenticate": format_www_authenticate(mpp_challenge(credential_type, amount))}
    )
    (offer,) = offers_from_response(response)
    return offer


def test_escrow_mpp_credential_on_the_wire() -> None:
    """What the server reads out of ``Authorization: Payment``: ``type: "escrow"``, and a payment signed
    by the session key for the payer."""
    offer = mpp_offer("escrow")
    wallet = escrow_wallet()
    assert wallet.can_pay(offer)
    headers = payment_headers(offer, wallet.pay(offer))
    credential = parse_credential(headers["Authorization"])
    assert credential.payload["type"] == "escrow"
    assert set(credential.payload) == {"type", "signature", "payment"}
    assert credential.source == f"did:pkh:eip155:{CHAIN}:{PAYER}"
    payload = decode_escrow_payload(credential.payload, mpp=True)
    assert recover_payment(escrow_domain(CHAIN, ESCROW), payload) == SESSION.address
    assert (payload.payment.payer, payload.payment.payee, payload.payment.amount) == (PAYER, PAY_TO, "1000")


def test_escrow_x402_payload_has_no_type() -> None:
    """The x402 ``payload`` is the bare ``{signature, payment}`` (the scheme is named by ``accepted``)."""
    offer = x402_offer("escrow")
    message = decode_payment_signature(
        payment_headers(offer, escrow_wallet().pay(offer))["PAYMENT-SIGNATURE"]
    )
    assert set(message.payload) == {"signature", "payment"}
    assert message.accepted.extra["escrow"] == ESCROW


def test_escrow_first_whatever_the_protocol() -> None:
    """The escrow offer wins even when the exact one comes in a preferred protocol (x402 v2 over MPP)."""
    auth = SessionKeyAuth(escrow_wallet(), fallback=exact_wallet())
    offers = [x402_offer("exact"), mpp_offer("authorization"), mpp_offer("escrow")]
    assert auth.choose(offers) is offers[2]
    # between two escrow offers the protocol preference decides
    both = [mpp_offer("escrow"), x402_offer("escrow")]
    assert auth.choose(both) is both[1]
    # without an escrow offer, the fallback pays by protocol preference
    assert auth.choose(offers[:2]) is offers[0]


def test_fallback_when_the_key_cannot_pay_through_the_escrow() -> None:
    # over the grant's per-call cap: the key cannot pay, the EOA can
    offers = [x402_offer("escrow", amount=6000), x402_offer("exact", amount=6000)]
    auth = PaymentAuth(SessionKeyWallet(escrow_wallet(), exact_wallet()))
    assert auth.choose(offers) is offers[1]
    assert auth.wallet.pay(offers[1]).payload.keys() == {"signature", "authorization"}
    # no fallback and nothing the key can pay
    with pytest.raises(NoPayableOffer):
        PaymentAuth(SessionKeyWallet(escrow_wallet())).choose(offers)
    # the policy refuses everything the wallets could pay: the first refusal is reported
    with pytest.raises(SpendPolicyViolation, match="max_per_call"):
        SessionKeyAuth(escrow_wallet(), SpendPolicy(max_per_call=10), fallback=exact_wallet()).choose(
            [x402_offer("escrow"), x402_offer("exact")]
        )


def test_policy_refusing_escrow_falls_back_to_exact() -> None:
    """The spend policy refuses the escrow offer (here: over its per-call limit) but allows the exact one:
    the fallback pays."""
    offers = [x402_offer("escrow", amount=3000), x402_offer("exact", amount=1000)]
    auth = SessionKeyAuth(escrow_wallet(), SpendPolicy(max_per_call=2000), fallback=exact_wallet())
    assert auth.choose(offers) is offers[1]
    # the same offers without the policy limit: escrow
    assert SessionKeyAuth(escrow_wallet(), fallback=exact_wallet()).choose(offers) is offers[0]


def test_session_key_wallet_announces_what_both_wallets_pay() -> None:
    assert SessionKeyWallet(escrow_wallet()).mpp_methods == ("evm/charge",)
    assert SessionKeyWallet(escrow_wallet(), exact_wallet()).mpp_methods == ("evm/charge",)
    auth = SessionKeyAuth(escrow_wallet(), fallback=exact_wallet())
    request = httpx.Request("GET", "http://api.test/paid")
    assert next(auth.sync_auth_flow(request)).headers[ACCEPT_PAYMENT_HEADER] == "evm/charge"
