"""x402 wire types and header codecs: shapes, round trips, and "any input gives the typed error"."""

from __future__ import annotations

import base64
import json
from typing import Any

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from x402 import (
    MAX_HEADER_BYTES,
    ExactEvmPayload,
    FacilitatorRequest,
    FacilitatorRequestV1,
    InvalidSignature,
    MalformedPayment,
    PaymentPayload,
    PaymentPayloadV1,
    PaymentRejected,
    PaymentRequired,
    PaymentRequiredV1,
    PaymentRequirements,
    PaymentRequirementsV1,
    Reason,
    ResourceInfo,
    SettleResponse,
    SpendPolicyViolation,
    SupportedKind,
    SupportedResponse,
    UnsupportedScheme,
    VerifyResponse,
    X402Error,
    decode_exact_payload,
    decode_payment_required,
    decode_payment_required_v1,
    decode_payment_response,
    decode_payment_signature,
    decode_scheme_payload,
    decode_x_payment,
    encode_payment_required,
    encode_payment_required_v1,
    encode_payment_response,
    encode_payment_signature,
    encode_scheme_payload,
    encode_x_payment,
    error_answer,
    evm_chain_id,
    find_matching_requirements,
    json_decode,
    json_encode,
    register_scheme_payload,
    requirements_from_v1,
    requirements_match,
)

ASSET = "0x036CbD53842c5426634e7929541eC2318f3dCF7e"
PAY_TO = "0x209693Bc6afc0C5328bA36FaF03C514EF312287C"
PAYER = "0x857b06519E91e3A54538791bDbb0E22373e36b66"


def b64(obj: Any) -> str:
    return base64.b64encode(json.dumps(obj).encode()).decode()


def unb64(value: str) -> Any:
    return json.loads(base64.b64decode(value))


REQUIREMENTS_JSON = {
    "scheme": "exact",
    "network": "eip155:84532",
    "amount": "10000",
    "asset": ASSET,
    "payTo": PAY_TO,
    "maxTimeoutSeconds": 60,
    "extra": {"name": "USDC", "version": "2"},
}

# The spec's example shapes (transports-v2/http.md, x402-specification-v2.md §5), key order as in the spec.
PAYMENT_REQUIRED_JSON = {
    "x402Version": 2,
    "error": "PAYMENT-SIGNATURE header is required",
    "resource": {
        "url": "https://api.example.com/premium-data",
        "description": "Premium",
        "mimeType": "application/json",
    },
    "accepts": [REQUIREMENTS_JSON],
    "extensions": {},
}
EXACT_PAYLOAD_JSON = {
    "signature": "0x" + "2d" * 65,
    "authorization": {
        "from": PAYER,
        "to": PAY_TO,
        "value": "10000",
        "validAfter": "1740672089",
        "validBefore": "1740672154",
        "nonce": "0xf3746613c2d920b5fdabc0856f2aeb2d4f88ee6037b8cc5d04a71a4462f13480",
    },
}
PAYMENT_PAYLOAD_JSON = {
    "x402Version": 2,
    "resource": {"url": "https://api.example.com/premium-data"},
    "accepted": REQUIREMENTS_JSON,
    "payload": EXACT_PAYLOAD_JSON,
    "extensions": {},
}
REQUIREMENTS_V1_JSON = {
    "scheme": "exact",
    "network": "base-sepolia",
    "maxAmountRequired": "10000",
    "resource": "https://api.example.com/premium-data",
    "description": "Access to premium market data",
    "mimeType": "application/json",
    "payTo": PAY_TO,
    "maxTimeoutSeconds": 60,
    "asset": ASSET,
    "outputSchema": None,
    "extra": {"name": "USDC", "version": "2"},
}


class TestSpecShapes:
    def test_payment_required_decodes(self) -> None:
        required = decode_payment_required(b64(PAYMENT_REQUIRED_JSON))
        assert required.x402_version == 2
        assert required.resource == ResourceInfo(
            url="https://api.example.com/premium-data", description="Premium", mime_type="application/json"
        )
        (req,) = required.accepts
        assert req.pay_to == PAY_TO and req.amount == "10000" and req.max_timeout_seconds == 60
        assert req.extra == {"name": "USDC", "version": "2"}

    def test_payment_payload_decodes_in_two_steps(self) -> None:
        payment = decode_payment_signature(b64(PAYMENT_PAYLOAD_JSON))
        assert payment.accepted == decode_payment_required(b64(PAYMENT_REQUIRED_JSON)).accepts[0]
        exact = decode_exact_payload(payment.payload)
        assert exact.authorization.from_ == PAYER
        assert exact.authorization.valid_before == "1740672154"
        assert decode_scheme_payload("exact", payment.payload, "eip155:84532") == exact

    def test_encoding_is_compact_camel_case_and_always_carries_the_version(self) -> None:
        required = PaymentRequired(accepts=[msgspec.convert(REQUIREMENTS_JSON, PaymentRequirements)])
        raw = base64.b64decode(encode_payment_required(required))
        assert b" " not in raw
        assert json.loads(raw) == {"x402Version": 2, "accepts": [REQUIREMENTS_JSON]}
        assert raw.startswith(b'{"x402Version":2,')

    def test_optional_fields_are_omitted_not_null(self) -> None:
        settle = SettleResponse(success=True, transaction="0xabc", network="eip155:84532", payer=PAYER)
        assert unb64(encode_payment_response(settle)) == {
            "success": True,
            "payer": PAYER,
            "transaction": "0xabc",
            "network": "eip155:84532",
        }
        failed = SettleResponse(
            success=False, error_reason="transaction_failed", transaction="", network="eip155:1"
        )
        assert unb64(encode_payment_response(failed)) == {
            "success": False,
            "errorReason": "transaction_failed",
            "transaction": "",
            "network": "eip155:1",
        }

    def test_python_sdk_spacing_in_payment_response_is_accepted(self) -> None:
        # The official Python server emits json.dumps() with spaces: parse, never compare bytes.
        text = '{"success": true, "payer": "' + PAYER + '", "transaction": "0x01", "network": "eip155:31337"}'
        value = base64.b64encode(text.encode()).decode()
        assert decode_payment_response(value).transaction == "0x01"

    def test_v1_body_and_x_payment(self) -> None:
        body = json.dumps(
            {"x402Version": 1, "error": "X-PAYMENT header is required", "accepts": [REQUIREMENTS_V1_JSON]}
        )
        required = decode_payment_required_v1(body.encode())
        (req,) = required.accepts
        assert req.max_amount_required == "10000" and req.network == "base-sepolia"
        assert required.x402_version == 1
        # outputSchema null is accepted on decode and left out on encode
        assert "outputSchema" not in json.loads(encode_payment_required_v1(required))["accepts"][0]
        v2 = requirements_from_v1(req)
        assert v2.amount == "10000" and v2.network == "base-sepolia" and evm_chain_id(v2.network) == 84532
        payload = PaymentPayloadV1(scheme="exact", network="base-sepolia", payload=EXACT_PAYLOAD_JSON)
        header = encode_x_payment(payload)
        assert unb64(header) == {
            "x402Version": 1,
            "scheme": "exact",
            "network": "base-sepolia",
            "payload": EXACT_PAYLOAD_JSON,
        }
        assert decode_x_payment(header) == payload

    def test_unknown_fields_are_ignored(self) -> None:
        doc: dict[str, Any] = dict(PAYMENT_REQUIRED_JSON, futureField={"x": 1})
        doc["resource"] = {**doc["resource"], "serviceName": "weather", "tags": ["a"]}  # bazaar additions
        assert decode_payment_required(b64(doc)).accepts[0].scheme == "exact"

    def test_facilitator_bodies_decode_by_version(self) -> None:
        v2 = {
            "x402Version": 2,
            "paymentPayload": PAYMENT_PAYLOAD_JSON,
            "paymentRequirements": REQUIREMENTS_JSON,
        }
        v1 = {
            "x402Version": 1,
            "paymentPayload": {"x402Version": 1, "scheme": "exact", "network": "base-sepolia", "payload": {}},
            "paymentRequirements": REQUIREMENTS_V1_JSON,
        }
        either = FacilitatorRequest | FacilitatorRequestV1
        assert isinstance(json_decode(json.dumps(v2), either), FacilitatorRequest)  # type: ignore[arg-type]
        assert isinstance(json_decode(json.dumps(v1), either), FacilitatorRequestV1)  # type: ignore[arg-type]
        verify = json_decode(
            b'{"isValid":false,"invalidReason":"invalid_payload","payer":"0x1"}', VerifyResponse
        )
        assert verify.invalid_reason == "invalid_payload"
        supported = json_decode(
            b'{"kinds":[{"x402Version":2,"scheme":"exact","network":"eip155:84532"}],"extensions":["bazaar"],'
            b'"signers":{"eip155:*":["0xF"]}}',
            SupportedResponse,
        )
        assert supported.kinds == [SupportedKind(x402_version=2, scheme="exact", network="eip155:84532")]


class TestVersionAndLimits:
    def test_wrong_version_has_its_own_reason(self) -> None:
        with pytest.raises(MalformedPayment) as info:
            decode_payment_signature(b64(dict(PAYMENT_PAYLOAD_JSON, x402Version=1)))
        assert info.value.code == Reason.INVALID_X402_VERSION
        with pytest.raises(MalformedPayment) as info:
            decode_x_payment(b64({"x402Version": 2, "scheme": "exact", "network": "base", "payload": {}}))
        assert info.value.code == Reason.INVALID_X402_VERSION

    def test_oversized_header_is_refused_before_decoding(self) -> None:
        with pytest.raises(MalformedPayment, match="limit"):
            decode_payment_signature("A" * (MAX_HEADER_BYTES + 4))

    def test_padding_may_be_dropped_but_not_the_alphabet(self) -> None:
        value = b64(PAYMENT_PAYLOAD_JSON)
        assert decode_payment_signature(value.rstrip("=")) == decode_payment_signature(value)
        urlsafe = base64.urlsafe_b64encode(json.dumps(PAYMENT_PAYLOAD_JSON).encode()).decode()
        if urlsafe != value:
            with pytest.raises(MalformedPayment):
                decode_payment_signature(urlsafe)

    @pytest.mark.parametrize(
        "field,value",
        [
            ("amount", "-1"),
            ("amount", "1.5"),
            ("amount", 10000),
            ("maxTimeoutSeconds", "60"),
            ("scheme", "x" * 300),
        ],
    )
    def test_constraints_are_checked(self, field: str, value: Any) -> None:
        doc = dict(PAYMENT_REQUIRED_JSON, accepts=[dict(REQUIREMENTS_JSON, **{field: value})])
        with pytest.raises(MalformedPayment):
            decode_payment_required(b64(doc))

    @pytest.mark.parametrize(
        "field,value",
        [("from", "0x1234"), ("nonce", "0x12"), ("value", "ten"), ("validBefore", 5)],
    )
    def test_exact_payload_constraints(self, field: str, value: Any) -> None:
        bad = {**EXACT_PAYLOAD_JSON, "authorization": {**EXACT_PAYLOAD_JSON["authorization"], field: value}}  # type: ignore[dict-item]
        with pytest.raises(MalformedPayment):
            decode_exact_payload(bad)
        with pytest.raises(MalformedPayment):
            decode_exact_payload({"signature": "0xzz", "authorization": EXACT_PAYLOAD_JSON["authorization"]})


# ----------------------------------------------------------------------------------- property tests

_text = st.text(max_size=40)
_uint = st.integers(min_value=0, max_value=2**256 - 1).map(str)
_addr = st.binary(min_size=20, max_size=20).map(lambda b: "0x" + b.hex())
_json_scalar = st.none() | st.booleans() | st.integers(-(2**63), 2**63 - 1) | _text
_json = st.recursive(
    _json_scalar,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(_text, inner, max_size=3),
    max_leaves=8,
)
_extra = st.dictionaries(_text, _json, max_size=4)

requirements_st = st.builds(
    PaymentRequirements,
    scheme=st.sampled_from(["exact", "escrow", "upto"]),
    network=st.sampled_from(["eip155:8453", "eip155:31337", "solana:5eykt4UsFv8P8NJdTREpY1vzqKqZKvdp"]),
    asset=_addr,
    amount=_uint,
    pay_to=_addr,
    max_timeout_seconds=st.integers(0, 2**32),
    extra=_extra,
)
resource_st = st.builds(
    ResourceInfo, url=_text, description=st.none() | _text, mime_type=st.none() | st.text(max_size=20)
)
authorization_payload_st = st.fixed_dictionaries(
    {
        "signature": st.binary(min_size=65, max_size=65).map(lambda b: "0x" + b.hex()),
        "authorization": st.fixed_dictionaries(
            {
                "from": _addr,
                "to": _addr,
                "value": _uint,
                "validAfter": _uint,
                "validBefore": _uint,
                "nonce": st.binary(min_size=32, max_size=32).map(lambda b: "0x" + b.hex()),
            }
        ),
    }
)


@given(
    accepts=st.lists(requirements_st, max_size=3),
    error=st.none() | _text,
    resource=st.none() | resource_st,
    extensions=st.none() | _extra,
)
def test_payment_required_round_trip(
    accepts: list[PaymentRequirements], error: str | None, resource: ResourceInfo | None, extensions: Any
) -> None:
    value = PaymentRequired(accepts=accepts, error=error, resource=resource, extensions=extensions)
    header = encode_payment_required(value)
    assert header.isascii() and len(header) % 4 == 0
    assert decode_payment_required(header) == value


@given(accepted=requirements_st, payload=authorization_payload_st, resource=st.none() | resource_st)
def test_payment_payload_round_trip(
    accepted: PaymentRequirements, payload: dict[str, Any], resource: Any
) -> None:
    value = PaymentPayload(payload=payload, accepted=accepted, resource=resource)
    decoded = decode_payment_signature(encode_payment_signature(value))
    assert decoded == value
    exact = decode_exact_payload(decoded.payload)
    assert encode_scheme_payload(exact) == payload


@given(
    reqs=st.lists(
        st.builds(
            PaymentRequirementsV1,
            scheme=st.just("exact"),
            network=st.sampled_from(["base", "base-sepolia"]),
            max_amount_required=_uint,
            resource=_text,
            description=_text,
            mime_type=st.text(max_size=20),
            output_schema=st.none() | st.dictionaries(_text, _json, max_size=2),
            pay_to=_addr,
            max_timeout_seconds=st.integers(0, 3600),
            asset=_addr,
            extra=st.none() | _extra,
        ),
        max_size=3,
    ),
    payload=authorization_payload_st,
)
def test_v1_round_trip(reqs: list[PaymentRequirementsV1], payload: dict[str, Any]) -> None:
    body = PaymentRequiredV1(accepts=reqs, error="X-PAYMENT header is required")
    assert decode_payment_required_v1(encode_payment_required_v1(body)) == body
    x = PaymentPayloadV1(scheme="exact", network="base", payload=payload)
    assert decode_x_payment(encode_x_payment(x)) == x


@given(
    st.builds(
        SettleResponse,
        success=st.booleans(),
        error_reason=st.none() | st.text(max_size=30),
        payer=st.none() | _addr,
        transaction=st.text(max_size=70),
        network=st.text(max_size=30),
        amount=st.none() | _uint,
    )
)
def test_settle_response_round_trip(value: SettleResponse) -> None:
    assert decode_payment_response(encode_payment_response(value)) == value


DECODERS = [
    decode_payment_required,
    decode_payment_signature,
    decode_x_payment,
    decode_payment_response,
    decode_payment_required_v1,
]


@pytest.mark.parametrize("decoder", DECODERS)
@given(data=st.binary(max_size=600) | st.text(max_size=300))
@settings(max_examples=300)
def test_any_input_gives_only_the_typed_error(decoder: Any, data: bytes | str) -> None:
    try:
        decoder(data)
    except MalformedPayment as exc:
        assert exc.status_hint == 400 and exc.code in (Reason.INVALID_PAYLOAD, Reason.INVALID_X402_VERSION)


@pytest.mark.parametrize("decoder", DECODERS[:4])
@given(doc=_json)
@settings(max_examples=200)
def test_any_base64_json_gives_only_the_typed_error(decoder: Any, doc: Any) -> None:
    """Valid base64 of arbitrary JSON exercises the typed layer rather than the base64 layer."""
    try:
        decoder(base64.b64encode(json_encode(doc)))
    except MalformedPayment:
        pass


@given(doc=_json)
def test_scheme_payload_decoder_gives_only_the_typed_error(doc: Any) -> None:
    try:
        decode_exact_payload(doc)
    except MalformedPayment:
        pass


# ----------------------------------------------------------------------------------------- schemes


class EscrowLikePayload(msgspec.Struct, frozen=True, kw_only=True, rename="camel"):
    payer: str
    amount: str


def test_registering_a_scheme_payload() -> None:
    register_scheme_payload("test-escrow", EscrowLikePayload)
    got = decode_scheme_payload("test-escrow", {"payer": "0x1", "amount": "5"}, "eip155:1")
    assert got == EscrowLikePayload(payer="0x1", amount="5")
    with pytest.raises(MalformedPayment):
        decode_scheme_payload("test-escrow", {"payer": 1})
    with pytest.raises(UnsupportedScheme):
        decode_scheme_payload("nope", {})
    # "exact" is registered for EVM only
    with pytest.raises(UnsupportedScheme):
        decode_scheme_payload("exact", EXACT_PAYLOAD_JSON, "solana:mainnet")


def test_networks() -> None:
    assert evm_chain_id("eip155:31337") == 31337
    assert evm_chain_id("base") == 8453
    for bad in ("eip155:", "eip155:0x1", "solana:abc", "eip155:1:2", "eip155:١"):
        with pytest.raises(UnsupportedScheme) as info:
            evm_chain_id(bad)
        assert info.value.code == Reason.INVALID_NETWORK


def test_requirements_matching_rule() -> None:
    offered = msgspec.convert(REQUIREMENTS_JSON, PaymentRequirements)
    more_extra = msgspec.structs.replace(offered, extra={**offered.extra, "assetTransferMethod": "eip3009"})
    assert requirements_match(more_extra, offered)  # server extra is a subset of the echoed one
    assert not requirements_match(offered, more_extra)
    lower = msgspec.structs.replace(offered, pay_to=offered.pay_to.lower())
    assert not requirements_match(lower, offered)  # payTo is compared as a raw string
    assert find_matching_requirements(offered, [lower, offered]) is offered
    assert find_matching_requirements(msgspec.structs.replace(offered, amount="1"), [offered]) is None


# ------------------------------------------------------------------------------------------ errors


def test_error_tree_and_answers() -> None:
    for cls in (MalformedPayment, InvalidSignature, PaymentRejected, SpendPolicyViolation, UnsupportedScheme):
        assert issubclass(cls, X402Error)
    assert MalformedPayment("x").status_hint == 400
    assert InvalidSignature().code == "invalid_exact_evm_payload_signature"
    rejected = PaymentRejected(Reason.RECIPIENT_MISMATCH)
    assert (
        rejected.invalid_reason == "invalid_exact_evm_payload_recipient_mismatch"
        and rejected.status_hint == 402
    )

    answer = error_answer(MalformedPayment("bad"))
    assert (answer.status, answer.invalid_reason, answer.mpp_status) == (400, "invalid_payload", 402)
    assert answer.problem_type == "https://paymentauth.org/problems/malformed-credential"
    assert error_answer(Reason.VALID_BEFORE).problem_type.endswith("/payment-expired")
    assert error_answer(Reason.VALUE_MISMATCH).problem_type.endswith("/payment-insufficient")
    assert error_answer(Reason.UNSUPPORTED_SCHEME).problem_type.endswith("/method-unsupported")
    assert error_answer(Reason.UNSUPPORTED_SCHEME).mpp_status == 400
    assert error_answer(Reason.CHALLENGE_BINDING_MISMATCH).problem_type.endswith("/invalid-challenge")
    assert error_answer(Reason.NONCE_ALREADY_USED).mpp_status == 402  # MPP core spec: invalid-challenge
    assert error_answer(Reason.NONCE_ALREADY_USED).replayed
    # unknown reasons (the x402 set is open) are verification failures
    assert error_answer("invalid_exact_evm_token_name_mismatch").problem_type.endswith("/verification-failed")
    for code in (
        Reason.SIGNATURE,
        Reason.RECIPIENT_MISMATCH,
        Reason.VALID_AFTER,
        Reason.NONCE_ALREADY_USED,
        Reason.INSUFFICIENT_BALANCE,
        Reason.NETWORK_MISMATCH,
        Reason.INVALID_X402_VERSION,
    ):
        assert error_answer(code).invalid_reason == code


def test_exact_payload_type_is_exported() -> None:
    payload = decode_exact_payload(EXACT_PAYLOAD_JSON)
    assert isinstance(payload, ExactEvmPayload)
    assert json.loads(json_encode(payload)) == EXACT_PAYLOAD_JSON


def test_exported_members() -> None:
    """``x402.__all__`` is exactly the public names of the package (as httpx checks its own)."""
    import types

    import x402

    public = {
        name
        for name, value in vars(x402).items()
        if not name.startswith("_") and not isinstance(value, types.ModuleType)  # e.g. x402.client
    }
    assert set(x402.__all__) == public
    assert len(x402.__all__) == len(set(x402.__all__))
