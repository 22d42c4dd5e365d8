"""The `escrow` scheme's wire side, without a chain: typed data, signing, recovery, payload codecs."""

from __future__ import annotations

import subprocess
import sys
from dataclasses import replace

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import x402
from x402 import (
    PROBLEM_BASE,
    Eip712Domain,
    InvalidSignature,
    LocalSigner,
    MalformedPayment,
    PaymentRejected,
    Reason,
    X402Error,
    encode_scheme_payload,
    error_answer,
    typed_data_digest,
)
from x402._errors import _TABLE
from x402._escrow import (
    EscrowCode,
    EscrowExtra,
    EscrowMppPayload,
    EscrowPayload,
    EscrowPayment,
    GrantMessage,
    NonceCounter,
    decode_escrow_payload,
    escrow_domain,
    grant_digest,
    grant_typed_data,
    payment_digest,
    payment_typed_data,
    reason_code,
    recover_grant,
    recover_payment,
    revoke_digest,
    sign_grant,
    sign_payment,
)

KEY = LocalSigner("0x" + "42" * 32)
addresses = st.binary(min_size=20, max_size=20).map(lambda b: "0x" + b.hex())
uint256 = st.integers(min_value=0, max_value=2**256 - 1)
uint32 = st.integers(min_value=0, max_value=2**32 - 1)
domains = st.builds(escrow_domain, st.integers(min_value=1, max_value=2**64), addresses)
payments = st.builds(
    EscrowPayment,
    payer=addresses,
    payee=addresses,
    token=addresses,
    amount=uint256.map(str),
    nonce=uint256.map(str),
    deadline=uint256.map(str),
    epoch=uint32,
)


@given(domains, payments)
@settings(max_examples=200, deadline=None)
def test_payment_digest_is_eip712(domain: Eip712Domain, payment: EscrowPayment) -> None:
    assert payment_digest(domain, payment) == typed_data_digest(payment_typed_data(domain, payment))


@given(
    domains,
    st.builds(
        GrantMessage,
        payer=addresses,
        signer=addresses,
        token=addresses,
        max_per_call=st.integers(0, 2**96 - 1),
        budget=st.integers(0, 2**128 - 1),
        valid_after=uint32,
        valid_until=uint32,
        payees=st.lists(addresses, max_size=5),
        epoch=uint32,
    ),
)
@settings(max_examples=100, deadline=None)
def test_grant_digest_is_eip712(domain: Eip712Domain, grant: GrantMessage) -> None:
    assert grant_digest(domain, grant) == typed_data_digest(grant_typed_data(domain, grant))
    assert recover_grant(domain, grant, sign_grant(KEY, domain, grant)) == KEY.address


@given(
    domains, payments, st.sampled_from(["payer", "payee", "token", "amount", "nonce", "deadline", "epoch"])
)
@settings(max_examples=200, deadline=None)
def test_any_tampered_field_changes_the_signer(
    domain: Eip712Domain, payment: EscrowPayment, field: str
) -> None:
    p = payment
    signed = sign_payment(
        KEY,
        domain,
        payer=p.payer,
        payee=p.payee,
        token=p.token,
        amount=int(p.amount),
        nonce=int(p.nonce),
        deadline=int(p.deadline),
        epoch=p.epoch,
    )
    assert recover_payment(domain, signed) == KEY.address
    value = getattr(p, field)
    if field == "epoch":
        changed: object = (value + 1) % 2**32
    elif field in ("payer", "payee", "token"):
        changed = "0x" + ("%040x" % ((int(value, 16) + 1) % 2**160))
    else:
        changed = str((int(value) + 1) % 2**256)
    forged = EscrowPayload(signature=signed.signature, payment=msgspec.structs.replace(p, **{field: changed}))
    try:
        assert recover_payment(domain, forged) != KEY.address
    except InvalidSignature:
        pass


def test_bad_signatures_have_the_scheme_code() -> None:
    domain = escrow_domain(31337, "0x" + "11" * 20)
    signed = sign_payment(
        KEY,
        domain,
        payer="0x" + "22" * 20,
        payee="0x" + "33" * 20,
        token="0x" + "44" * 20,
        amount=1,
        nonce=1,
        deadline=1,
        epoch=1,
    )
    for bad in ("0x" + "00" * 65, "0x1234", signed.signature[:-2] + "1d"):
        with pytest.raises(InvalidSignature) as info:
            recover_payment(domain, EscrowPayload(signature=bad, payment=signed.payment))
        assert info.value.code == EscrowCode.INVALID_SIGNATURE


def test_payload_codecs() -> None:
    domain = escrow_domain(31337, "0x" + "11" * 20)
    signed = sign_payment(
        KEY,
        domain,
        payer="0x" + "22" * 20,
        payee="0x" + "33" * 20,
        token="0x" + "44" * 20,
        amount=10,
        nonce=2**200,
        deadline=99,
        epoch=3,
    )
    raw = msgspec.to_builtins(signed)
    assert raw["payment"]["nonce"] == str(2**200) and raw["payment"]["epoch"] == 3
    assert decode_escrow_payload(raw) == signed
    assert decode_escrow_payload({"type": "escrow", **raw}, mpp=True) == signed
    with pytest.raises(MalformedPayment):
        decode_escrow_payload({**raw, "payment": {**raw["payment"], "amount": "-1"}})
    with pytest.raises(MalformedPayment):
        decode_escrow_payload({**raw, "payment": {**raw["payment"], "epoch": 2**32}})


def test_reason_codes_and_revoke_digest() -> None:
    assert reason_code(0) == "" and reason_code(4) == EscrowCode.NONCE_USED
    assert reason_code(12) == EscrowCode.BUDGET_EXCEEDED and reason_code(99) == "escrow_reason_99"
    domain = escrow_domain(1, "0x" + "11" * 20)
    assert revoke_digest(domain, KEY.address, KEY.address, 1) != revoke_digest(
        domain, KEY.address, KEY.address, 2
    )


def test_nonce_counter_is_sequential_and_unique_across_instances() -> None:
    a, b = NonceCounter(), NonceCounter()
    first = a.take()
    assert a.take() == first + 1
    assert first >> 8 != b.take() >> 8  # different random words


# -------------------------------------------------------------------- exports, defaults on the wire, errors


def test_escrow_names_are_exported_and_registered_by_import_x402() -> None:
    """A fresh interpreter: ``import x402`` alone registers the ``escrow`` payload and pulls in no httpx."""
    code = (
        "import sys, x402\n"
        "assert ('escrow', 'eip155') in x402.registered_schemes()\n"
        "assert 'httpx' not in sys.modules, 'import x402 must stay free of httpx'\n"
        "missing = [n for n in x402._escrow.__all__ if n not in x402.__all__ or not hasattr(x402, n)]\n"
        "assert not missing, missing\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr
    assert x402.EscrowPayload is EscrowPayload and x402.sign_payment is sign_payment


def test_escrow_extra_encodes_every_field() -> None:
    """``name``/``version`` are required by the scheme spec: defaults must not be omitted on encode."""
    extra = EscrowExtra(escrow="0x" + "11" * 20)
    raw = msgspec.to_builtins(extra)
    assert raw == {"escrow": "0x" + "11" * 20, "name": "AgentEscrow", "version": "1", "deadlineSeconds": 3600}
    assert msgspec.json.decode(msgspec.json.encode(extra), type=EscrowExtra) == extra
    # the defaults still apply on decode (an offer that leaves deadlineSeconds out)
    assert msgspec.convert({"escrow": "0x" + "11" * 20}, EscrowExtra) == extra


def test_grant_message_encodes_its_signed_defaults() -> None:
    grant = GrantMessage(
        payer=KEY.address, signer=KEY.address, token=KEY.address, max_per_call=1, budget=2,
        valid_after=0, valid_until=10,
    )  # fmt: skip
    raw = msgspec.to_builtins(grant)
    assert raw["payees"] == [] and raw["epoch"] == 1 and raw["validAfter"] == 0


def test_escrow_mpp_payload_always_names_its_type() -> None:
    domain = escrow_domain(31337, "0x" + "11" * 20)
    signed = sign_payment(
        KEY, domain, payer="0x" + "22" * 20, payee="0x" + "33" * 20, token="0x" + "44" * 20,
        amount=1, nonce=1, deadline=1, epoch=1,
    )  # fmt: skip
    mpp = EscrowMppPayload(signature=signed.signature, payment=signed.payment)
    for raw in (encode_scheme_payload(mpp), msgspec.json.decode(msgspec.json.encode(mpp))):
        assert raw["type"] == "escrow" and set(raw) == {"type", "signature", "payment"}
        assert decode_escrow_payload(raw, mpp=True) == signed
    with pytest.raises(PaymentRejected):
        decode_escrow_payload({k: v for k, v in encode_scheme_payload(mpp).items() if k != "type"}, mpp=True)


def test_every_escrow_code_has_its_own_error_answer() -> None:
    codes = [v for k, v in vars(EscrowCode).items() if k.isupper()]
    assert len(codes) == 20
    assert all(code in _TABLE for code in codes)
    # a replayed payment is answered as for `exact` (MPP: 402 invalid-challenge, or 403 behind an option)
    for code in (EscrowCode.NONCE_USED, EscrowCode.NONCE_REUSED):
        assert error_answer(code).replayed and error_answer(code).mpp_status == 402
        assert error_answer(code) == replace(error_answer(Reason.NONCE_ALREADY_USED), invalid_reason=code)
    for code, like in (
        (EscrowCode.DEADLINE_EXPIRED, Reason.VALID_BEFORE),  # payment-expired
        (EscrowCode.AMOUNT_MISMATCH, Reason.VALUE_MISMATCH),  # payment-insufficient
        (EscrowCode.RECIPIENT_MISMATCH, Reason.RECIPIENT_MISMATCH),
    ):
        assert error_answer(code) == replace(error_answer(like), invalid_reason=code)
    assert error_answer(EscrowCode.DEADLINE_EXPIRED).problem_type == PROBLEM_BASE + "payment-expired"
    # whatever status hint the raising side gave, the answer is the table's
    rejected = X402Error("x", code=EscrowCode.GRANT_REVOKED, status_hint=400)
    assert error_answer(rejected).status == 402 and error_answer(rejected).mpp_status == 402
