"""x402 `upto` wire and typed data, sans chain: our Permit2 digest is eth-account's EIP-712 digest of the
spec's `PermitWitnessTransferFrom`, and any change to a signed field changes who the signature recovers to."""

from __future__ import annotations

import msgspec
import pytest
from eth_account.messages import encode_typed_data
from hypothesis import given, settings
from hypothesis import strategies as st

from x402 import LocalSigner
from x402._errors import MalformedPayment
from x402._keccak import keccak256
from x402._upto import (
    PERMIT2_ADDRESS,
    UPTO_PROXY_ADDRESS,
    UptoPayload,
    decode_upto_payload,
    permit2_digest,
    recover_upto,
    sign_upto,
)

SIGNER = LocalSigner.random()
addresses = st.binary(min_size=20, max_size=20).map(lambda b: "0x" + b.hex())
uints = st.integers(0, 2**256 - 1)


def _reference_digest(chain_id: int, payload: UptoPayload) -> bytes:
    a = payload.permit2_authorization
    typed = {
        "types": {
            "EIP712Domain": [
                {"name": "name", "type": "string"},
                {"name": "chainId", "type": "uint256"},
                {"name": "verifyingContract", "type": "address"},
            ],
            "PermitWitnessTransferFrom": [
                {"name": "permitted", "type": "TokenPermissions"},
                {"name": "spender", "type": "address"},
                {"name": "nonce", "type": "uint256"},
                {"name": "deadline", "type": "uint256"},
                {"name": "witness", "type": "Witness"},
            ],
            "TokenPermissions": [{"name": "token", "type": "address"}, {"name": "amount", "type": "uint256"}],
            "Witness": [
                {"name": "to", "type": "address"},
                {"name": "facilitator", "type": "address"},
                {"name": "validAfter", "type": "uint256"},
            ],
        },
        "primaryType": "PermitWitnessTransferFrom",
        "domain": {"name": "Permit2", "chainId": chain_id, "verifyingContract": PERMIT2_ADDRESS},
        "message": {
            "permitted": {"token": a.permitted.token, "amount": int(a.permitted.amount)},
            "spender": a.spender,
            "nonce": int(a.nonce),
            "deadline": int(a.deadline),
            "witness": {
                "to": a.witness.to,
                "facilitator": a.witness.facilitator,
                "validAfter": int(a.witness.valid_after),
            },
        },
    }
    m = encode_typed_data(full_message=typed)
    return keccak256(b"\x19" + m.version + m.header + m.body)


@settings(max_examples=40, deadline=None)
@given(
    chain_id=st.integers(1, 2**64),
    token=addresses,
    pay_to=addresses,
    facilitator=addresses,
    maximum=uints,
    nonce=uints,
    deadline=uints,
    valid_after=uints,
)
def test_digest_is_the_eip712_digest_and_the_signature_recovers(
    chain_id: int,
    token: str,
    pay_to: str,
    facilitator: str,
    maximum: int,
    nonce: int,
    deadline: int,
    valid_after: int,
) -> None:
    payload = sign_upto(
        SIGNER,
        chain_id=chain_id,
        token=token,
        maximum=maximum,
        pay_to=pay_to,
        facilitator=facilitator,
        deadline=deadline,
        valid_after=valid_after,
        nonce=nonce,
    )
    assert payload.permit2_authorization.spender == UPTO_PROXY_ADDRESS
    assert permit2_digest(chain_id, payload.permit2_authorization) == _reference_digest(chain_id, payload)
    assert recover_upto(chain_id, payload) == SIGNER.address
    # Round trip through the wire form (the x402 `payload` object).
    assert decode_upto_payload(msgspec.to_builtins(payload)) == payload


@settings(max_examples=30, deadline=None)
@given(field=st.sampled_from(["to", "facilitator", "spender", "amount", "token", "nonce"]), other=addresses)
def test_any_changed_field_breaks_the_signature(field: str, other: str) -> None:
    payload = sign_upto(
        SIGNER,
        chain_id=31337,
        token="0x" + "11" * 20,
        maximum=10_000,
        pay_to="0x" + "22" * 20,
        facilitator="0x" + "33" * 20,
        deadline=2**40,
        valid_after=0,
    )
    a = payload.permit2_authorization
    if field in ("to", "facilitator"):
        a = msgspec.structs.replace(a, witness=msgspec.structs.replace(a.witness, **{field: other}))
    elif field == "spender":
        a = msgspec.structs.replace(a, spender=other)
    elif field in ("amount", "token"):
        value = str(int(other, 16)) if field == "amount" else other
        a = msgspec.structs.replace(a, permitted=msgspec.structs.replace(a.permitted, **{field: value}))
    else:
        a = msgspec.structs.replace(a, nonce=str(int(other, 16)))
    tampered = msgspec.structs.replace(payload, permit2_authorization=a)
    if tampered == payload:
        return
    assert recover_upto(31337, tampered) != SIGNER.address


@pytest.mark.parametrize(
    "bad",
    [
        {},
        {"signature": "0x00", "permit2Authorization": {"from": "0x12"}},
        {"signature": "zz", "permit2Authorization": {}},
    ],
)
def test_malformed_payloads_are_refused(bad: dict[str, object]) -> None:
    with pytest.raises(MalformedPayment):
        decode_upto_payload(bad)
