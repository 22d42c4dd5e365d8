"""Interop with `pympp` 0.16.0 (the official Python MPP SDK), run as a peer from .venv-peers.

Codec level (no chain): pympp parses and HMAC-verifies our challenges, we parse and verify pympp's, and
the ``evm/charge`` challenge hash: pympp 0.16 signs ``keccak256(json.dumps([id, realm]))`` where the
spec (draft-evm-charge-00) and mppx use ``keccak256(id || realm)``. Both commit to the same HMAC-checked
id and realm, so our gateway takes both by default (``mpp_strict=True``: the spec's only).

End to end (devnet): the pympp client pays our gateway's MPP challenge in its default configuration, and
our client pays a pympp server (``Mpp`` + ``evm`` charge with a settle hook that broadcasts
``transferWithAuthorization``).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from eth_account import Account
from web3.contract import Contract

from escrow import DevnetState
from tests.conftest import Transact
from tests.peers._harness import PeerServer, peers_missing, run_peer
from tests.peers._ours import Funds, GatewayServer, describe
from x402 import (
    LocalSigner,
    MppChallenge,
    MppReceipt,
    challenge_hash,
    challenge_hash_pympp,
    challenge_id,
    encode_json_param,
    format_www_authenticate,
    parse_www_authenticate,
    verify_challenge,
)
from x402.client import Eip3009Wallet, PaymentAuth, SpendPolicy, receipt_of

pytestmark = [
    pytest.mark.peers,
    pytest.mark.skipif(peers_missing() is not None, reason=str(peers_missing())),
]

SECRET = "interop-secret-at-least-thirty-two-bytes-long"


def pympp(query: dict[str, Any]) -> dict[str, Any]:
    result: dict[str, Any] = run_peer("mpp_codec.py", stdin=json.dumps(query))
    return result


# ------------------------------------------------------------------------------------------ codec level


CHALLENGE_HASH_INPUTS = [
    ("boRHzsA8ixsHT3KS-8_-vjHGH-1PFHe7p5gybs9H9V8", "peer.localhost"),
    ("AgN5", "localhost"),
    ("6QDs0BmhrI_v67iWeCMvGqQJEFQ6ErWKlk7zi5xL6t0", "api.example.com"),
    ("x", 'realm "with" quotes'),
    ("x", "bücher.example"),  # non-ASCII: pympp dumps with ensure_ascii=False
]


def test_pympp_challenge_hash_is_not_the_spec_hash() -> None:
    """Documents the pympp 0.16 deviation: its EIP-3009 nonce for native evm/charge credentials is
    keccak256(JSON.stringify([id, realm])) (``mpp/methods/evm/_eip3009.py::challenge_hash``), not the
    spec's keccak256(abi.encodePacked(id, realm)) (which alone our gateway takes in strict mode)."""
    theirs = pympp({"challenge_hash": CHALLENGE_HASH_INPUTS})["challenge_hash"]
    for (cid, realm), their_hash in zip(CHALLENGE_HASH_INPUTS, theirs, strict=True):
        assert their_hash != "0x" + challenge_hash(cid, realm).hex()


def test_our_pympp_compat_hash_reproduces_pympp() -> None:
    """``x402.challenge_hash_pympp`` (the second nonce form the gateway takes) must equal what pympp
    signs, byte for byte, or the gateway accepts nothing pympp sends."""
    theirs = pympp({"challenge_hash": CHALLENGE_HASH_INPUTS})["challenge_hash"]
    ours = ["0x" + challenge_hash_pympp(cid, realm).hex() for cid, realm in CHALLENGE_HASH_INPUTS]
    assert ours == theirs


def test_pympp_verifies_our_challenge_ids() -> None:
    """Our HMAC challenge ids bind the same fields the same way: pympp's ``Challenge.verify`` accepts them."""
    realm = "gateway.example"
    request = {
        "amount": "1000",
        "currency": "0x5FbDB2315678afecb367f032d93F642f64180aa3",
        "recipient": "0x3C44CdDdB6a900fa2b585dd299e03d12FA4293BC",
        "methodDetails": {"chainId": 31337, "credentialTypes": ["authorization"], "decimals": 6},
    }
    variants: list[dict[str, Any]] = [
        {},
        {"expires": "2030-01-01T00:00:00Z"},
        {"expires": "2030-01-01T00:00:00Z", "opaque": {"_mpp_nonce": "ab" * 16}},
        {"digest": "sha-256=:X48E9qOokqqrvdts8nOJRJN3OWDUoyWxBf7kbu9DBPE=:"},
    ]
    headers = []
    for variant in variants:
        req_b64 = encode_json_param(request)
        opaque_b64 = encode_json_param(variant["opaque"]) if "opaque" in variant else None
        cid = challenge_id(
            SECRET,
            realm,
            "evm",
            "charge",
            req_b64,
            variant.get("expires"),
            variant.get("digest"),
            opaque_b64,
        )
        challenge = MppChallenge(
            id=cid,
            realm=realm,
            method="evm",
            intent="charge",
            request=req_b64,
            expires=variant.get("expires"),
            digest=variant.get("digest"),
            opaque=opaque_b64,
        )
        headers.append(format_www_authenticate(challenge))
    answer = pympp(
        {
            "verify_challenge": {"secret": SECRET, "realm": realm, "headers": headers},
            "parse_challenge": headers,
        }
    )
    assert answer["verify_challenge"] == [True] * len(headers)
    for parsed in answer["parse_challenge"]:
        assert parsed["request"] == request
        assert (parsed["method"], parsed["intent"], parsed["realm"]) == ("evm", "charge", realm)


def test_we_parse_and_verify_pympp_challenges() -> None:
    specs = [
        {
            "secret_key": SECRET,
            "realm": "api.example.com",
            "method": "tempo",
            "intent": "charge",
            "request": {"amount": "1000000"},
        },
        {
            "secret_key": SECRET,
            "realm": "peer.localhost",
            "method": "evm",
            "intent": "charge",
            "request": {"amount": "1000", "currency": "0x5FbDB2315678afecb367f032d93F642f64180aa3"},
            "expires": "2030-01-01T00:00:00.000Z",
            "meta": {"_mpp_nonce": "0011"},
        },
        {
            "secret_key": SECRET,
            "realm": "peer.localhost",
            "method": "evm",
            "intent": "charge",
            "request": {"amount": "1"},
            "header": "Payment-Authorization",
        },
    ]
    headers = pympp({"create_challenge": specs})["create_challenge"]
    for spec, header in zip(specs, headers, strict=True):
        (challenge,) = parse_www_authenticate(header)
        assert challenge.realm == spec["realm"]
        assert challenge.request_json() == spec["request"]
        assert verify_challenge(SECRET, challenge), header


def test_challenge_id_vector_through_both() -> None:
    """mpp-tools conformance/vectors/challenge-id.json, minimal case: pympp and we give the same id."""
    vector_secret = "test-vector-secret-minimum-32-byte-secret"
    expected = "6QDs0BmhrI_v67iWeCMvGqQJEFQ6ErWKlk7zi5xL6t0"
    spec = {
        "secret_key": vector_secret,
        "realm": "api.example.com",
        "method": "tempo",
        "intent": "charge",
        "request": {"amount": "1000000"},
    }
    (header,) = pympp({"create_challenge": [spec]})["create_challenge"]
    (theirs,) = parse_www_authenticate(header)
    assert theirs.id == expected
    assert (
        challenge_id(vector_secret, "api.example.com", "tempo", "charge", {"amount": "1000000"}) == expected
    )


# ------------------------------------------------------------------------------------------- end to end

PRICE = 1000
GATEWAY_RELAYER = 7  # our gateway's relayer key in these tests
PEER_SETTLER = 8  # the pympp server's settle-hook key in these tests


@pytest.fixture
def funds(devnet: DevnetState, usdc: Contract, transact: Transact) -> Funds:
    return Funds(devnet, usdc, transact, default=100 * PRICE)


def pympp_client(devnet: DevnetState, url: str, key: str, *args: str) -> dict[str, Any]:
    result: dict[str, Any] = run_peer(
        "mpp_client.py",
        "--url",
        url,
        "--currency",
        devnet.contracts["usdc"],
        "--chain-id",
        str(devnet.chain_id),
        "--decimals",
        str(devnet.usdc_decimals),
        "--name",
        devnet.usdc_name,
        "--version",
        devnet.usdc_version,
        *args,
        env={"PEER_PRIVATE_KEY": key},
    )
    return result


@pytest.mark.chain
def test_pympp_client_pays_our_gateway_in_its_default_configuration(
    devnet: DevnetState, funds: Funds
) -> None:
    """Issue 9 item 12: the official Python MPP client, unmodified, against ``PaymentMiddleware`` with no
    MPP option at all (no realm either): paid content, a spec receipt that pympp parses, money moved once
    per call."""
    payer = funds.payer()
    with GatewayServer(
        devnet, devnet.accounts[GATEWAY_RELAYER].private_key, Account.create().address, realm=None
    ) as gw:
        out = pympp_client(devnet, f"{gw.url}/paid", payer.key.hex(), "--n", "2")

    assert [r.get("status") for r in out["results"]] == [200, 200], out
    for credential in out["credentials"]:
        assert credential["realm"] == "localhost"  # the fixed default realm, not the Host "127.0.0.1:…"
        assert credential["nonce"] == credential["pympp_challenge_hash"] != credential["spec_challenge_hash"]
    for result in out["results"]:
        receipt = result["payment_receipt"]
        assert receipt["status"] == "success" and receipt["method"] == "evm", result
        assert funds.tx_ok(receipt["reference"])
        assert result["cache_control"] is not None and "private" in result["cache_control"]
        assert result["body"]["server"] == "agentpay"
    assert funds.balance(gw.pay_to) == 2 * PRICE
    assert funds.balance(payer.address) == 98 * PRICE


@pytest.mark.chain
def test_pympp_native_credential_refused_in_strict_mode(devnet: DevnetState, funds: Funds) -> None:
    """With ``mpp_strict=True`` the gateway holds to the spec's challengeHash: pympp 0.16's credential is
    refused with a 402 and a fresh challenge, nothing is settled and nothing moves."""
    payer = funds.payer()
    with GatewayServer(
        devnet, devnet.accounts[GATEWAY_RELAYER].private_key, Account.create().address, mpp_strict=True
    ) as gw:
        out = pympp_client(devnet, f"{gw.url}/paid", payer.key.hex())

    (credential,) = out["credentials"]
    assert credential["method"] == "evm" and credential["intent"] == "charge"
    spec = "0x" + challenge_hash(credential["challenge_id"], credential["realm"]).hex()
    assert credential["spec_challenge_hash"] == spec  # the peer's own spec formula agrees with ours
    assert credential["nonce"] == credential["pympp_challenge_hash"] != spec
    (result,) = out["results"]
    assert result["status"] == 402, out
    refusal = out["exchanges"][-1]
    assert refusal["status"] == 402 and refusal["www_authenticate"], "a refusal carries a fresh challenge"
    assert refusal["body"]["type"] == "https://paymentauth.org/problems/invalid-challenge", refusal
    assert refusal["body"]["invalidReason"] == "challenge_binding_mismatch", refusal
    assert funds.balance(gw.pay_to) == 0
    assert funds.balance(payer.address) == 100 * PRICE


# ----------------------------------------------------------------------------- our client pays pympp


class PymppServer:
    def __init__(self, server: PeerServer, pay_to: str) -> None:
        self.server, self.pay_to, self.url = server, pay_to, server.url

    def log(self) -> Any:
        return self.server.log()


@pytest.fixture
def pympp_server(devnet: DevnetState) -> Iterator[PymppServer]:
    pay_to = Account.create().address
    with PeerServer(
        "mpp_server.py",
        "--rpc-url",
        devnet.rpc_url,
        "--chain-id",
        str(devnet.chain_id),
        "--currency",
        devnet.contracts["usdc"],
        "--decimals",
        str(devnet.usdc_decimals),
        "--recipient",
        pay_to,
        "--amount",
        str(PRICE),
        env={"PEER_SETTLER_KEY": devnet.accounts[PEER_SETTLER].private_key},
    ) as server:
        yield PymppServer(server, pay_to)


def our_client(devnet: DevnetState, key: bytes, *, pympp_compat: bool = False, **auth: Any) -> httpx.Client:
    usdc = devnet.contracts["usdc"]
    wallet = Eip3009Wallet(
        LocalSigner(key),
        devnet.chain_id,
        {usdc: (devnet.usdc_name, devnet.usdc_version)},
        pympp_compat=pympp_compat,
    )
    return httpx.Client(auth=PaymentAuth(wallet, SpendPolicy(max_per_call=10 * PRICE), **auth), timeout=60)


@pytest.mark.chain
def test_our_client_pays_pympp_server_over_mpp_in_compat_mode(
    devnet: DevnetState, funds: Funds, pympp_server: PymppServer
) -> None:
    payer = funds.payer()
    with our_client(devnet, payer.key, pympp_compat=True, prefer=("mpp",)) as client:
        responses = [client.get(f"{pympp_server.url}/paid") for _ in range(2)]
    log = pympp_server.log()
    for response in responses:
        assert response.status_code == 200, (describe(response), log)
        receipt = receipt_of(response)
        assert isinstance(receipt, MppReceipt) and receipt.status == "success", describe(response)
        assert funds.tx_ok(receipt.reference)
        assert response.json()["payer"] == payer.address
    assert [e["status"] for e in log] == [402, 200, 402, 200]
    assert all("authorization" in e["sent"] for e in log if e["status"] == 200)
    assert funds.balance(pympp_server.pay_to) == 2 * PRICE


@pytest.mark.chain
def test_pympp_server_rejects_the_spec_challenge_hash(
    devnet: DevnetState, funds: Funds, pympp_server: PymppServer
) -> None:
    """The other side of the pympp deviation: a spec-conformant native credential (what mppx and our
    client send by default) is refused by pympp 0.16 ("EVM authorization challenge hash mismatch")."""
    payer = funds.payer()
    with our_client(devnet, payer.key, prefer=("mpp",)) as client:
        response = client.get(f"{pympp_server.url}/paid")
    assert response.status_code == 402, describe(response)
    paid = [e for e in pympp_server.log() if "authorization" in e["sent"]]
    assert len(paid) == 1 and paid[0]["status"] == 402
    credential = paid[0]["sent"]["authorization"]
    challenge = credential["challenge"]
    assert credential["payload"]["nonce"] == "0x" + challenge_hash(challenge["id"], challenge["realm"]).hex()
    assert "challenge hash" in json.dumps(paid[0]["body"]).lower(), paid[0]["body"]
    assert funds.balance(pympp_server.pay_to) == 0


@pytest.mark.chain
def test_our_client_pays_pympp_server_over_x402(
    devnet: DevnetState, funds: Funds, pympp_server: PymppServer
) -> None:
    """pympp's evm charge also emits PAYMENT-REQUIRED; with route_binding="resource" it takes a standard
    x402 v2 exact payment, which our client sends with a random nonce (no challenge-hash question)."""
    payer = funds.payer()
    with our_client(devnet, payer.key, prefer=("x402v2",)) as client:
        response = client.get(f"{pympp_server.url}/paid")
    assert response.status_code == 200, (describe(response), pympp_server.log())
    receipt = receipt_of(response)
    assert receipt is not None
    paid = [e for e in pympp_server.log() if e["status"] == 200]
    assert len(paid) == 1 and "payment-signature" in paid[0]["sent"]
    assert funds.balance(pympp_server.pay_to) == PRICE
