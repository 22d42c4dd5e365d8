"""The MCP and A2A payment wire (`x402._mcp`, `x402._a2a`) without a chain: MPP challenges survive the trip
through MCP's native JSON with their HMAC intact (and only then), any `_meta` credential either decodes or
is a `MalformedPayment`, -32042 is told apart from URL elicitation, and protobuf-`Struct` numbers come back
as the ints they were."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from x402 import (
    MPP_CREDENTIAL_META,
    MPP_PAYMENT_REQUIRED,
    X402_EXTENSION,
    X402_PAYMENT_META,
    MalformedPayment,
    MppChallenge,
    classify_mcp_error,
    encode_json_param,
    integral,
    mpp_challenge_from_json,
    mpp_challenge_to_json,
    mpp_credential_from_json,
    verify_challenge,
    x402_payment_in,
)
from x402 import challenge_id as make_id

SECRET = b"wire-agents-test-secret-32-bytes-long!!"

_text = st.text(alphabet=st.characters(min_codepoint=32, max_codepoint=0x2FF, exclude_characters='"\\|'))
_safe_int = st.integers(-(2**53) + 1, 2**53 - 1)  # what JCS (RFC 8785) can canonicalise
_json = st.recursive(
    st.one_of(_safe_int, st.booleans(), st.none(), _text),
    lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(_text, inner, max_size=4)),
    max_leaves=12,
)
#: Anything a client could put in `_meta`: huge ints and floats included.
_wild = st.recursive(
    st.one_of(st.integers(), st.floats(allow_nan=False), st.booleans(), st.none(), _text),
    lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(_text, inner, max_size=4)),
    max_leaves=12,
)
_fields = st.sampled_from(["id", "realm", "method", "intent", "request", "opaque", "expires"])
_requests = st.dictionaries(_text, _json, max_size=5).map(
    lambda d: {**d, "amount": "1000", "recipient": "0x" + "ab" * 20}
)


def _challenge(request: dict[str, Any], opaque: dict[str, Any] | None) -> MppChallenge:
    encoded = encode_json_param(request)
    opaque_b64 = encode_json_param(opaque) if opaque is not None else None
    expires = "2030-01-01T00:00:00Z"
    cid = make_id(SECRET, "localhost", "evm", "charge", encoded, expires, None, opaque_b64)
    return MppChallenge(
        id=cid,
        realm="localhost",
        method="evm",
        intent="charge",
        request=encoded,
        expires=expires,
        opaque=opaque_b64,
    )


@settings(max_examples=150, deadline=None)
@given(request=_requests, opaque=st.none() | st.dictionaries(_text, _text, max_size=3))
def test_mcp_json_round_trip_keeps_the_hmac(request: dict[str, Any], opaque: dict[str, Any] | None) -> None:
    challenge = _challenge(request, opaque)
    wire = json.loads(json.dumps(mpp_challenge_to_json(challenge)))  # what travels in MCP
    assert wire["request"] == request  # native JSON, not base64url
    back = mpp_challenge_from_json(wire)
    assert back == challenge
    assert verify_challenge(SECRET, back)


@settings(max_examples=100, deadline=None)
@given(request=_requests, amount=st.integers(0, 10**9).map(str))
def test_an_edited_request_breaks_the_hmac(request: dict[str, Any], amount: str) -> None:
    wire = mpp_challenge_to_json(_challenge(request, None))
    wire["request"] = {**wire["request"], "amount": amount}
    assert verify_challenge(SECRET, mpp_challenge_from_json(wire)) is (amount == "1000")


@settings(max_examples=300, deadline=None)
@given(credential=_wild)
def test_any_meta_credential_decodes_or_is_malformed(credential: Any) -> None:
    try:
        mpp_credential_from_json(credential)
    except MalformedPayment:
        pass


@settings(max_examples=200, deadline=None)
@given(
    challenge=st.dictionaries(
        st.sampled_from(["id", "realm", "method", "intent", "request", "opaque"]), _json
    )
)
def test_any_challenge_object_decodes_or_is_malformed(challenge: dict[str, Any]) -> None:
    try:
        mpp_credential_from_json({"challenge": challenge, "payload": {}})
    except MalformedPayment:
        pass


def test_minus_32042_is_told_apart() -> None:
    assert classify_mcp_error(MPP_PAYMENT_REQUIRED, {"challenges": []}) == "mpp"
    elicit = {"elicitations": [{"mode": "url", "url": "https://x", "elicitationId": "e"}]}
    assert classify_mcp_error(MPP_PAYMENT_REQUIRED, elicit) == "elicitation"
    assert classify_mcp_error(MPP_PAYMENT_REQUIRED, {"x402": {"accepts": []}}) == "x402"
    assert classify_mcp_error(MPP_PAYMENT_REQUIRED, {"x402Version": 2, "accepts": []}) == "x402"
    assert classify_mcp_error(MPP_PAYMENT_REQUIRED, {"other": 1}) is None
    assert classify_mcp_error(MPP_PAYMENT_REQUIRED, None) is None
    assert classify_mcp_error(-32043, {"challenges": []}) is None


def test_x402_payment_flat_or_nested_never_both() -> None:
    assert x402_payment_in({X402_PAYMENT_META: {"a": 1}}) == {"a": 1}
    assert x402_payment_in({X402_EXTENSION: {"paymentPayload": {"b": 2}}}) == {"b": 2}
    assert x402_payment_in({X402_EXTENSION: {"settlementResponse": {}}}) is None
    assert x402_payment_in({}) is None
    with pytest.raises(MalformedPayment):
        x402_payment_in({X402_PAYMENT_META: {"a": 1}, X402_EXTENSION: {"paymentPayload": {"b": 2}}})


@settings(max_examples=200, deadline=None)
@given(value=_json)
def test_integral_undoes_a_struct_round_trip(value: Any) -> None:
    def as_struct(v: Any) -> Any:  # google.protobuf.Struct keeps every number as a double
        if isinstance(v, bool) or v is None or isinstance(v, str):
            return v
        if isinstance(v, int):
            return float(v)
        if isinstance(v, list):
            return [as_struct(x) for x in v]
        return {k: as_struct(x) for k, x in v.items()}

    assert integral(as_struct(value)) == value


@settings(max_examples=300, deadline=None)
@given(
    meta=st.dictionaries(
        st.sampled_from([X402_PAYMENT_META, X402_EXTENSION, MPP_CREDENTIAL_META, "other"]),
        _wild | st.dictionaries(st.sampled_from(["paymentPayload", "challenge", "payload"]), _wild),
    )
)
def test_any_meta_is_a_credential_none_or_a_400(meta: dict[str, Any]) -> None:
    """What a paid tool reads from `_meta`: one credential, none, or a 400-class refusal; nothing else."""
    from gateway import PaymentFailed
    from gateway._mcp import _find_credential

    try:
        found = _find_credential(meta)
    except PaymentFailed as exc:
        assert exc.status_hint == 400
        return
    if found is not None:
        binding, dialect, raw = found
        assert (binding == "mpp") == (dialect == "mpp") and isinstance(raw, bytes)
