"""EIP-712 / EIP-3009: the fast digest equals eth-account's, signatures recover, verification reasons."""

from __future__ import annotations

import statistics
import time

import msgspec
import pytest
from eth_account import Account
from eth_account.messages import encode_typed_data
from eth_hash.auto import keccak as eth_hash_keccak
from eth_utils.address import to_checksum_address
from hypothesis import given, settings
from hypothesis import strategies as st

from x402 import (
    Eip712Domain,
    Eip3009Authorization,
    ExactEvmPayload,
    InvalidChallenge,
    InvalidSignature,
    LocalSigner,
    MalformedPayment,
    MppAuthorizationPayload,
    MppChallenge,
    PaymentRejected,
    PaymentRequirements,
    Reason,
    Signer,
    authorization_digest,
    authorization_typed_data,
    challenge_hash,
    challenge_hash_pympp,
    challenge_id,
    encode_json_param,
    exact_domain,
    random_nonce,
    recover_hash,
    recover_transfer_authorization,
    rfc3339,
    sign_transfer_authorization,
    typed_data_digest,
    verify_exact_payment,
    verify_mpp_authorization,
)
from x402._keccak import checksum_address, keccak256

N = 0xFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFEBAAEDCE6AF48A03BBFD25E8CD0364141
KEY = "0x" + "4c" * 32
TOKEN = "0x5FbDB2315678afecb367f032d93F642f64180aa3"
PAY_TO = "0x3C44CdDdB6a900fa2b585dd299e03d12FA4293BC"
DOMAIN = Eip712Domain(name="USD Coin", version="2", chain_id=31337, verifying_contract=TOKEN)

_addr = st.binary(min_size=20, max_size=20).map(lambda b: "0x" + b.hex())
_uint = st.integers(0, 2**256 - 1)
domains = st.builds(
    Eip712Domain,
    name=st.text(max_size=30),
    version=st.text(max_size=5),
    chain_id=st.integers(0, 2**64),
    verifying_contract=_addr,
)
authorizations = st.builds(
    Eip3009Authorization,
    from_=_addr,
    to=_addr,
    value=_uint.map(str),
    valid_after=_uint.map(str),
    valid_before=_uint.map(str),
    nonce=st.binary(min_size=32, max_size=32).map(lambda b: "0x" + b.hex()),
)
private_keys = st.integers(1, N - 1).map(lambda k: k.to_bytes(32, "big"))
kinds = st.sampled_from(["TransferWithAuthorization", "ReceiveWithAuthorization"])


@given(domain=domains, authorization=authorizations, kind=kinds)
@settings(max_examples=300)
def test_fast_digest_is_byte_identical_to_encode_typed_data(
    domain: Eip712Domain, authorization: Eip3009Authorization, kind: str
) -> None:
    full = authorization_typed_data(domain, authorization, kind)  # type: ignore[arg-type]
    reference = typed_data_digest(full)
    assert authorization_digest(domain, authorization, kind) == reference  # type: ignore[arg-type]
    # and typed_data_digest is what eth-account signs
    signable = encode_typed_data(full_message=full)
    assert Account.sign_message(signable, KEY).message_hash == reference


@given(key=private_keys, domain=domains, authorization=authorizations)
@settings(max_examples=100)
def test_signature_recovers_and_matches_eth_account(
    key: bytes, domain: Eip712Domain, authorization: Eip3009Authorization
) -> None:
    signer = LocalSigner(key)
    assert signer.address == Account.from_key(key).address
    payload = sign_transfer_authorization(
        signer,
        domain,
        to=authorization.to,
        value=authorization.value,
        valid_after=authorization.valid_after,
        valid_before=authorization.valid_before,
        nonce=authorization.nonce,
    )
    assert payload.authorization == msgspec.structs.replace(authorization, from_=signer.address)
    assert recover_transfer_authorization(domain, payload) == signer.address
    # RFC 6979 deterministic signatures: identical to eth-account's, byte for byte
    reference = Account.sign_message(
        encode_typed_data(full_message=authorization_typed_data(domain, payload.authorization)), key
    )
    assert payload.signature == "0x" + bytes(reference.signature).hex()
    assert (
        Account.recover_message(
            encode_typed_data(full_message=authorization_typed_data(domain, payload.authorization)),
            signature=bytes.fromhex(payload.signature[2:]),
        )
        == signer.address
    )


def test_local_signer_satisfies_the_protocol() -> None:
    signer = LocalSigner(KEY)
    assert isinstance(signer, Signer)
    assert KEY[2:] not in repr(signer)
    sig = signer.sign_hash(b"\x01" * 32)
    assert len(sig) == 65 and sig[64] in (27, 28) and int.from_bytes(sig[32:64], "big") <= N // 2
    with pytest.raises(ValueError):
        LocalSigner("0x1234")
    with pytest.raises(ValueError):
        signer.sign_hash(b"short")


def test_fresh_random_nonce_each_time() -> None:
    signer = LocalSigner(KEY)
    nonces = {
        sign_transfer_authorization(signer, DOMAIN, to=PAY_TO, value=1, valid_before=10).authorization.nonce
        for _ in range(200)
    }
    assert len(nonces) == 200
    assert len(random_nonce()) == 66


def _flip_to_high_s(signature: str) -> str:
    raw = bytes.fromhex(signature[2:])
    s = int.from_bytes(raw[32:64], "big")
    v = 55 - raw[64]  # 27 <-> 28
    return "0x" + (raw[:32] + (N - s).to_bytes(32, "big") + bytes((v,))).hex()


def test_high_s_and_malformed_signatures_are_refused() -> None:
    signer = LocalSigner(KEY)
    payload = sign_transfer_authorization(signer, DOMAIN, to=PAY_TO, value=1000, valid_before=2**40)
    high_s = msgspec.structs.replace(payload, signature=_flip_to_high_s(payload.signature))
    # The malleable twin recovers to the same key under plain ecrecover, but we refuse it.
    assert (
        Account._recover_hash(
            authorization_digest(DOMAIN, payload.authorization), signature=bytes.fromhex(high_s.signature[2:])
        )
        == signer.address
    )
    with pytest.raises(InvalidSignature, match="high-s"):
        recover_transfer_authorization(DOMAIN, high_s)
    raw = payload.signature
    for bad in (
        raw[:-2] + "00",  # v = 0
        raw[:-2] + "1d",  # v = 29
        raw[:-2],  # 64 bytes
        raw + "00",  # 66 bytes
        "0x" + "00" * 64 + "1b",  # r = s = 0
        "0x" + "ff" * 32 + raw[66:],  # r >= n
        "0xzz",
        "",
    ):
        with pytest.raises(InvalidSignature) as info:
            recover_transfer_authorization(DOMAIN, msgspec.structs.replace(payload, signature=bad))
        assert info.value.code == Reason.SIGNATURE and info.value.status_hint == 402


@given(st.binary(min_size=65, max_size=65), st.binary(min_size=32, max_size=32))
def test_recover_any_bytes_gives_an_address_or_the_typed_error(signature: bytes, digest: bytes) -> None:
    try:
        address = recover_hash(digest, signature)
    except InvalidSignature:
        return
    assert address.startswith("0x") and len(address) == 42


@given(st.binary(max_size=300), st.binary(min_size=20, max_size=20))
def test_fast_keccak_and_checksum_equal_eth_hash_and_eth_utils(data: bytes, raw: bytes) -> None:
    # x402._keccak picks the fastest keccak installed; it must be the same function as eth-hash's, and its
    # EIP-55 shortcut the same as eth-utils'.
    assert keccak256(data) == eth_hash_keccak(data)
    assert checksum_address(raw) == to_checksum_address(raw)


def test_uint256_overflow_is_malformed() -> None:
    auth = Eip3009Authorization(
        from_=PAY_TO, to=PAY_TO, value=str(2**256), valid_after="0", valid_before="1", nonce=random_nonce()
    )
    with pytest.raises(MalformedPayment):
        authorization_digest(DOMAIN, auth)
    with pytest.raises(InvalidSignature):
        recover_transfer_authorization(
            DOMAIN, ExactEvmPayload(signature="0x" + "11" * 65, authorization=auth)
        )


def test_signing_one_payment_is_fast() -> None:
    """Benchmark goal: typed-data hash + sign under 0.3 ms (median, warm cache)."""
    signer = LocalSigner(KEY)
    sign_transfer_authorization(signer, DOMAIN, to=PAY_TO, value=1, valid_before=10)
    samples = []
    for _ in range(300):
        started = time.perf_counter()
        sign_transfer_authorization(signer, DOMAIN, to=PAY_TO, value=1000, valid_before=1_900_000_000)
        samples.append(time.perf_counter() - started)
    assert statistics.median(samples) < 0.3e-3


# ----------------------------------------------------------------------------------- offline verification

NOW = 1_800_000_000


def _requirements(**changes: object) -> PaymentRequirements:
    base = PaymentRequirements(
        scheme="exact",
        network="eip155:31337",
        asset=TOKEN,
        amount="1000",
        pay_to=PAY_TO,
        max_timeout_seconds=60,
        extra={"name": "USD Coin", "version": "2"},
    )
    return msgspec.structs.replace(base, **changes)


def _pay(**changes: object) -> ExactEvmPayload:
    args: dict[str, object] = {"to": PAY_TO, "value": 1000, "valid_before": NOW + 60, "valid_after": 0}
    args.update(changes)
    return sign_transfer_authorization(LocalSigner(KEY), DOMAIN, **args)  # type: ignore[arg-type]


def test_verify_exact_payment_accepts_a_good_payment() -> None:
    req = _requirements()
    assert exact_domain(req) == DOMAIN
    payer = verify_exact_payment(req, _pay(), accepted=req, now=NOW)
    assert payer == LocalSigner(KEY).address


@pytest.mark.parametrize(
    "payload_changes,req_changes,accepted_changes,reason",
    [
        ({"to": "0x" + "99" * 20}, {}, {}, Reason.RECIPIENT_MISMATCH),
        ({"value": 999}, {}, {}, Reason.VALUE_MISMATCH),
        ({"value": 1001}, {}, {}, Reason.VALUE_MISMATCH),  # exact equality, not "at least"
        ({"valid_before": NOW + 5}, {}, {}, Reason.VALID_BEFORE),
        ({"valid_after": NOW + 1}, {}, {}, Reason.VALID_AFTER),
        ({}, {"extra": {}}, {}, Reason.MISSING_EIP712_DOMAIN),
        ({}, {"extra": {"name": "Other", "version": "2"}}, {}, Reason.SIGNATURE),  # signed for another domain
        ({}, {}, {"network": "eip155:1"}, Reason.NETWORK_MISMATCH),
        ({}, {}, {"scheme": "upto"}, Reason.UNSUPPORTED_SCHEME),
    ],
)
def test_verify_exact_payment_reasons(
    payload_changes: dict[str, object],
    req_changes: dict[str, object],
    accepted_changes: dict[str, object],
    reason: str,
) -> None:
    req = _requirements(**req_changes)
    accepted = msgspec.structs.replace(req, **accepted_changes)
    with pytest.raises((PaymentRejected, InvalidSignature)) as info:
        verify_exact_payment(req, _pay(**payload_changes), accepted=accepted, now=NOW)
    assert info.value.code == reason


def test_verify_exact_payment_rejects_a_forged_from() -> None:
    payload = _pay()
    forged = msgspec.structs.replace(
        payload, authorization=msgspec.structs.replace(payload.authorization, from_=PAY_TO)
    )
    with pytest.raises((PaymentRejected, InvalidSignature)) as info:
        verify_exact_payment(_requirements(), forged, now=NOW)
    assert info.value.code == Reason.SIGNATURE


SECRET = "gateway-test-secret-at-least-32-bytes-long"


def _mpp_challenge(credential_types: list[str] | None = None, expires_in: int = 300) -> MppChallenge:
    details: dict[str, object] = {"chainId": 31337, "decimals": 6}
    if credential_types is not None:
        details["credentialTypes"] = credential_types
    request = encode_json_param(
        {"amount": "1000", "currency": TOKEN, "recipient": PAY_TO, "methodDetails": details}
    )
    expires = rfc3339(NOW + expires_in)
    cid = challenge_id(SECRET, "api.test", "evm", "charge", request, expires)
    return MppChallenge(
        id=cid, realm="api.test", method="evm", intent="charge", request=request, expires=expires
    )


def _mpp_payload(challenge: MppChallenge, nonce: bytes | None = None) -> MppAuthorizationPayload:
    signed = _pay(valid_before=NOW + 300, nonce=nonce or challenge_hash(challenge.id, challenge.realm))
    return MppAuthorizationPayload.from_exact(signed)


def test_verify_mpp_authorization() -> None:
    challenge = _mpp_challenge(["authorization"])
    payload = _mpp_payload(challenge)
    assert payload.to_exact().authorization.nonce == "0x" + challenge_hash(challenge.id, "api.test").hex()
    payer = verify_mpp_authorization(challenge, payload, token_name="USD Coin", token_version="2", now=NOW)
    assert payer == LocalSigner(KEY).address

    # A pympp 0.16 client binds with its own formula: accepted by default (it commits to the same id and
    # realm), refused in strict mode.
    pympp = _mpp_payload(challenge, nonce=challenge_hash_pympp(challenge.id, challenge.realm))
    assert (
        verify_mpp_authorization(challenge, pympp, token_name="USD Coin", token_version="2", now=NOW)
        == LocalSigner(KEY).address
    )
    with pytest.raises(InvalidChallenge) as info:
        verify_mpp_authorization(
            challenge, pympp, token_name="USD Coin", token_version="2", now=NOW, strict=True
        )
    assert info.value.code == Reason.CHALLENGE_BINDING_MISMATCH
    assert (
        verify_mpp_authorization(
            challenge, payload, token_name="USD Coin", token_version="2", now=NOW, strict=True
        )
        == LocalSigner(KEY).address
    )

    # random nonce: no binding
    with pytest.raises(InvalidChallenge):
        verify_mpp_authorization(
            challenge,
            _mpp_payload(challenge, nonce=b"\x01" * 32),
            token_name="USD Coin",
            token_version="2",
            now=NOW,
        )
    # expired challenge
    with pytest.raises(InvalidChallenge) as info:
        verify_mpp_authorization(challenge, payload, token_name="USD Coin", token_version="2", now=NOW + 301)
    assert info.value.code == Reason.CHALLENGE_EXPIRED
    # server does not take "authorization" credentials (omitted credentialTypes means transaction/hash)
    for types in (None, ["permit2"]):
        other = _mpp_challenge(types)
        with pytest.raises(PaymentRejected) as rej:
            verify_mpp_authorization(
                other, _mpp_payload(other), token_name="USD Coin", token_version="2", now=NOW
            )
        assert rej.value.code == Reason.UNSUPPORTED_SCHEME
