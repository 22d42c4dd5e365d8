# ruff: noqa: E501  (conformance vectors are kept verbatim, one per line)
"""MPP (the ``Payment`` HTTP auth scheme): challenge ids, WWW-Authenticate, credentials, receipts, problems.

Vectors marked "mpp-tools" are transcribed from tempoxyz/mpp-tools ``conformance/vectors/*.json``.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import time
from typing import Any

import msgspec
import pytest
from eth_hash.auto import keccak
from hypothesis import given, settings
from hypothesis import strategies as st

from x402 import (
    PROBLEM_BASE,
    MalformedPayment,
    MppChallenge,
    MppCredential,
    MppReceipt,
    PaymentRequiredV1,
    PaymentRequirementsV1,
    ProblemDetails,
    b64url_decode,
    b64url_encode,
    challenge_hash,
    challenge_hash_pympp,
    challenge_id,
    check_bound_field,
    decode_json_param,
    decode_problem,
    encode_json_param,
    encode_problem,
    format_credential,
    format_receipt,
    format_www_authenticate,
    jcs,
    json_decode,
    parse_credential,
    parse_receipt,
    parse_rfc3339,
    parse_www_authenticate,
    rfc3339,
    verify_challenge,
)
from x402._errors import _TABLE, Reason, X402Error, error_answer

SECRET = "test-vector-secret-minimum-32-byte-secret"

# ----------------------------------------------------------------------------- challenge ids (mpp-tools)

# (name, secret, realm, method, intent, request, extra params, expected id)
CHALLENGE_ID_VECTORS: list[tuple[str, str, str, str, str, dict[str, Any], dict[str, str], str]] = [
    ("required_fields_only", SECRET, "api.example.com", "tempo", "charge", {"amount": "1000000"}, {},
     "6QDs0BmhrI_v67iWeCMvGqQJEFQ6ErWKlk7zi5xL6t0"),
    ("with_expires", SECRET, "api.example.com", "tempo", "charge", {"amount": "1000000"},
     {"expires": "2025-01-06T12:00:00Z"}, "ZcHgfEi5_Qyda9NQwUzamsCgCcWXw6N6EH2NLyaSTlg"),
    ("with_digest", SECRET, "api.example.com", "tempo", "charge", {"amount": "1000000"},
     {"digest": "sha-256=X48E9qOokqqrvdts8nOJRJN3OWDUoyWxBf7kbu9DBPE"}, "vwnOtW2kwdujK9_uC_taI2e6Jwq86Jwogvq9m--i8eQ"),
    ("with_expires_and_digest", SECRET, "api.example.com", "tempo", "charge", {"amount": "1000000"},
     {"expires": "2025-01-06T12:00:00Z", "digest": "sha-256=X48E9qOokqqrvdts8nOJRJN3OWDUoyWxBf7kbu9DBPE"},
     "HSUJV7QH1E135PSDPlrZ5cLoozV3bv5T4vfVdS3Xyzk"),
    ("with_opaque", SECRET, "api.example.com", "tempo", "charge", {"amount": "1000000"}, {"opaque": "trace-123"},
     "1XJ-Ti0DACNe3E1zHvwH6OdnKlhUx6xKxDbhJyexng4"),
    ("with_payment_authorization_header", SECRET, "api.example.com", "tempo", "charge", {"amount": "1000000"},
     {"header": "Payment-Authorization"}, "re8MIMJYpIJ0r_aiizscg6ghtipQM8IpOa_NtpwIU8E"),
    ("authorization_header_is_implicit_default", SECRET, "api.example.com", "tempo", "charge",
     {"amount": "1000000"}, {"header": "Authorization"}, "6QDs0BmhrI_v67iWeCMvGqQJEFQ6ErWKlk7zi5xL6t0"),
    ("opaque_route_scope_binding", SECRET, "api.example.com", "tempo", "charge", {"amount": "1000"},
     {"opaque": "eyJyb3V0ZSI6Ii9hcGkvcHJlbWl1bSJ9"}, "qKB3Cm8efoWftvkRf43R5GxatYiXuZPxhs2kA3CvxGM"),
    ("multi_field_request", SECRET, "api.example.com", "tempo", "charge",
     {"amount": "1000000", "currency": "0x1234", "recipient": "0xabcd"}, {},
     "I8ZLhCXrskUbWuwYSSM0My-wk3mnL9_w8cDlEcs2UFo"),
    ("nested_method_details", SECRET, "api.example.com", "tempo", "charge",
     {"amount": "1000000", "currency": "0x1234", "methodDetails": {"chainId": 42431}}, {},
     "W8sYOWDDrcuRcku27vjJoqLX0uAnBmql7qAOuQwdmPo"),
    ("html_sensitive_request_canonicalization", SECRET, "api.example.com", "tempo", "charge",
     {"amount": "1500", "currency": "USD", "description": "Access <premium> & analytics", "recipient": "merchant"},
     {}, "iU2QdYw_u-prmGZWxm58jeBakeYE-ib_u77f9vcW76E"),
    ("resource_path_query_binding", SECRET, "api.example.com", "tempo", "charge",
     {"amount": "1000", "currency": "USD", "recipient": "merchant", "resource": "/charge/query-replay?tier=basic"},
     {}, "ge6Ckot8ZHZB_S-6OOlzuKOnUhndJIUarP-zPCtzleE"),
    ("external_id_request_binding", SECRET, "api.example.com", "tempo", "charge",
     {"amount": "2500", "currency": "USD", "externalId": "server-order-123", "recipient": "merchant"}, {},
     "PyzaHuf-58VJxeH7oErmMTlnKZZ5yYzRVueWW0MK1hI"),
    ("fee_payer_policy_binding", SECRET, "api.example.com", "tempo", "charge",
     {"amount": "5000", "currency": "USD", "recipient": "merchant",
      "methodDetails": {"chainId": 42431, "feePayer": True, "maxFeePerGas": "1000000"}}, {},
     "Z-51rg0Ds7Xd9FnWiXT3aOs4vyuScuZkxnk-BNRy8QE"),
    ("empty_request", SECRET, "api.example.com", "tempo", "charge", {}, {},
     "SMpxo_gPWGquX9vAZ-b_OIPsHO3kfdY2s73946Mnwc0"),
    ("different_realm", SECRET, "payments.other.com", "tempo", "charge", {"amount": "1000000"}, {},
     "NiwWsOUeZDNPegltJVbOHVKR4hHbZR5tnoQ80DVrqyY"),
    ("different_method", SECRET, "api.example.com", "stripe", "charge", {"amount": "1000000"}, {},
     "IPY59YD2ZWmf3yXnZxbQgYoYejrVB9Nh_rpSkrOeSG0"),
    ("different_intent", SECRET, "api.example.com", "tempo", "session", {"amount": "1000000"}, {},
     "3bUB3LSxOG-lexqNCMGiV-p_j1UeibqWlA-saIiwo5A"),
    ("basic_charge", "test-secret-key-12345-minimum-32-byte-secret", "api.example.com", "tempo", "charge",
     {"amount": "1000000", "currency": "0x20c0000000000000000000000000000000000001",
      "recipient": "0x1234567890abcdef1234567890abcdef12345678"}, {},
     "Go8tV1muorsPUY3eQxjQ2oBMBDRPuK-jdO_E2sbtti8"),
    ("with_expires_alt_secret", "test-secret-key-12345-minimum-32-byte-secret", "api.example.com", "tempo",
     "charge", {"amount": "5000000", "currency": "0x20c0000000000000000000000000000000000001",
                "recipient": "0xabcdef1234567890abcdef1234567890abcdef12"},
     {"expires": "2026-01-29T12:00:00Z"}, "DAgfntQtAmV_y2J9YWUh-UKvwRTxXhMCvX0uOFzvfOE"),
    ("with_digest_alt_secret", "my-server-secret-minimum-32-byte-secret", "payments.example.org", "tempo", "charge",
     {"amount": "250000", "currency": "USD", "recipient": "0x9999999999999999999999999999999999999999"},
     {"digest": "sha-256=X48E9qOokqqrvdts8nOJRJN3OWDUoyWxBf7kbu9DBPE="}, "Wck1EzUjlCJIEPEyaYpuZ_8GxC-0TWZPJYcBTH6fwdU"),
    ("full_challenge_alt_secret", "test-secret-abc123-minimum-32-byte-secret", "api.tempo.xyz", "tempo", "charge",
     {"amount": "10000000", "currency": "0x20c0000000000000000000000000000000000001",
      "recipient": "0x742d35Cc6634C0532925a3b844Bc9e7595f1B0F2", "description": "API access fee",
      "externalId": "order-12345"},
     {"expires": "2026-02-01T00:00:00Z", "digest": "sha-256=abc123def456"},
     "_pLIgk1zfLjIqa1aXziYSyyHZLQZQ1WXCBSa3-DK6_E"),
    ("different_secret_different_id", "different-secret-key-minimum-32-byte-secret", "api.example.com", "tempo",
     "charge", {"amount": "1000000", "currency": "0x20c0000000000000000000000000000000000001",
                "recipient": "0x1234567890abcdef1234567890abcdef12345678"}, {},
     "iox5xpRvWhpAMaIlMZIKRJHGOIiCNDJrE28AljJJzyE"),
    ("empty_request_alt_secret", "test-key-minimum-32-byte-secret-key", "test.example.com", "tempo", "authorize",
     {}, {}, "XOelcFKZ14F8K1KtmsQsN-PKrpBg2_pwnLg0HJUOd1g"),
    ("unicode_in_description", "unicode-test-key-minimum-32-byte-secret", "api.example.com", "tempo", "charge",
     {"amount": "100", "currency": "EUR", "recipient": "0x1111111111111111111111111111111111111111",
      "description": "Payment for café ☕"}, {}, "-UB9jxfPEvTmFw7qvLmqJhDZ-lJ-noCp15ROxPHC4BE"),
    ("nested_method_details_alt_secret", "nested-test-key-minimum-32-byte-secret", "api.tempo.xyz", "tempo",
     "charge", {"amount": "5000000", "currency": "0x20c0000000000000000000000000000000000001",
                "recipient": "0x2222222222222222222222222222222222222222",
                "methodDetails": {"chainId": 42431, "feePayer": True}}, {},
     "rWfhir6e_bnIQdbh6tHUosPEHnxLIaWRDWs-zNHeYug"),
    ("mixed_case_key_ordering", "case-sensitive-key-minimum-32-bytes", "api.example.com", "tempo", "charge",
     {"amount": "1000000", "Currency": "USD", "ZONE": "eu-1", "network": {"chainId": 42431, "Layer": "L2"}}, {},
     "oUJHedaukLx579-B6Apbsw_r17uJOqERHjQRjCVhP0M"),
]  # fmt: skip


@pytest.mark.parametrize(
    "secret,realm,method,intent,request_obj,extra,expected",
    [v[1:] for v in CHALLENGE_ID_VECTORS],
    ids=[v[0] for v in CHALLENGE_ID_VECTORS],
)
def test_challenge_id_vectors(
    secret: str,
    realm: str,
    method: str,
    intent: str,
    request_obj: dict[str, Any],
    extra: dict[str, str],
    expected: str,
) -> None:
    header = extra.get("header")
    got = challenge_id(
        secret,
        realm,
        method,
        intent,
        request_obj,
        extra.get("expires"),
        extra.get("digest"),
        extra.get("opaque"),
        header=header,
    )
    assert got == expected
    # The same id from the wire form of the request, and the challenge verifies (constant-time compare).
    wire = encode_json_param(request_obj)
    assert challenge_id(secret, realm, method, intent, wire, extra.get("expires"), extra.get("digest"),
                        extra.get("opaque"), header=header) == expected  # fmt: skip
    challenge = MppChallenge(
        id=got, realm=realm, method=method, intent=intent, request=wire, description="not bound",
        expires=extra.get("expires"), digest=extra.get("digest"), opaque=extra.get("opaque"),
        header=header,
    )  # fmt: skip
    assert verify_challenge(secret, challenge)


def test_description_is_not_bound() -> None:
    a = challenge_id(SECRET, "api.example.com", "tempo", "charge", {"amount": "1000000"})
    assert a == "6QDs0BmhrI_v67iWeCMvGqQJEFQ6ErWKlk7zi5xL6t0"  # the "description_not_in_hmac" vector


def test_weak_secret_is_refused() -> None:
    with pytest.raises(ValueError):
        challenge_id("short", "api.example.com", "tempo", "charge", {"amount": "1000000"})


def test_verify_challenge_detects_tampering_and_supports_rotation() -> None:
    request = encode_json_param({"amount": "1000", "currency": "0x" + "11" * 20})
    expires = rfc3339(time.time() + 300)
    cid = challenge_id(SECRET, "r", "evm", "charge", request, expires)
    good = MppChallenge(id=cid, realm="r", method="evm", intent="charge", request=request, expires=expires)
    assert verify_challenge(SECRET, good)
    new_secret = "a-brand-new-secret-of-at-least-32-bytes!"
    assert verify_challenge([new_secret, SECRET], good)
    assert not verify_challenge(new_secret, good)
    for change in (
        {"realm": "other"},
        {"method": "tempo"},
        {"intent": "session"},
        {"request": encode_json_param({"amount": "1", "currency": "0x" + "11" * 20})},
        {"expires": rfc3339(time.time() + 10_000)},
        {"digest": "sha-256=:AAAA:"},
        {"opaque": encode_json_param({"n": "1"})},
        {"id": cid[:-1] + ("A" if cid[-1] != "A" else "B")},
        {"id": "x"},
    ):
        assert not verify_challenge(SECRET, msgspec.structs.replace(good, **change))


# ------------------------------------------------------------------- challenge ids cannot be re-cut (#9.6)

_SLOTS = ("realm", "method", "intent", "request", "expires", "digest", "opaque")


def _unescaped_id(secret: str, slots: list[str]) -> str:
    """What a server joining the slots without looking at them issues (the pre-fix gateway did)."""
    return b64url_encode(hmac.new(secret.encode(), "|".join(slots).encode(), hashlib.sha256).digest())


def test_a_host_chosen_realm_cannot_be_recut_into_another_challenge() -> None:
    """The attack of issue 9 item 6 at the wire: the server binds realm = the Host header; a client sends
    ``Host: victim|evm|charge|<request>|2099-01-01T00:00:00Z``, so the HMAC input of the challenge it gets
    reads, cut at other pipes, as realm ``victim`` expiring in 2099 with the rest of the slots moved into
    ``digest``. That id must not verify as such a challenge, and no id is issued for such a realm."""
    request = encode_json_param({"amount": "1000", "currency": "0x" + "11" * 20})
    expires = "2026-01-01T00:00:00Z"
    opaque = encode_json_param({"_mpp_nonce": "00" * 16})
    host = f"victim|evm|charge|{request}|2099-01-01T00:00:00Z"
    issued = _unescaped_id(SECRET, [host, "evm", "charge", request, expires, "", opaque])
    recut = MppChallenge(
        id=issued, realm="victim", method="evm", intent="charge", request=request,
        expires="2099-01-01T00:00:00Z", digest=f"evm|charge|{request}|{expires}|", opaque=opaque,
    )  # fmt: skip
    assert "|".join(getattr(recut, name) for name in _SLOTS) == "|".join(
        [host, "evm", "charge", request, expires, "", opaque]
    )  # the same HMAC input, cut elsewhere
    assert not verify_challenge(SECRET, recut)
    with pytest.raises(ValueError, match="slots"):
        challenge_id(SECRET, host, "evm", "charge", request, expires, None, opaque)


@pytest.mark.parametrize("field", [*_SLOTS, "header"])
def test_no_bound_field_may_carry_a_pipe(field: str) -> None:
    values = {"realm": "api.example.com", "method": "evm", "intent": "charge", "request": "e30",
              "expires": "2030-01-01T00:00:00Z", "digest": "sha-256=:AAAA:", "opaque": "e30",
              "header": "Payment-Authorization"}  # fmt: skip
    values[field] = "a|b"
    with pytest.raises(ValueError, match="slots"):
        challenge_id(SECRET, values["realm"], values["method"], values["intent"], values["request"],
                     values["expires"], values["digest"], values["opaque"], header=values["header"])  # fmt: skip
    with pytest.raises(ValueError):
        check_bound_field(field, "a|b")
    check_bound_field(field, "a-b")  # no error


@settings(max_examples=500)
@given(
    fields=st.lists(st.text(alphabet="ab|", min_size=1, max_size=5), min_size=7, max_size=7),
    data=st.data(),
)
def test_only_the_issued_cut_of_an_hmac_input_verifies(fields: list[str], data: st.DataObject) -> None:
    """Property: an unescaping server was made to bind ``fields``; of every way to cut the same HMAC
    input back into seven slots, the only one that verifies is the issued one, and only when no field
    holds a pipe (then it is the only cut there is)."""
    joined = "|".join(fields)
    pipes = [i for i, c in enumerate(joined) if c == "|"]
    chosen = sorted(data.draw(st.lists(st.sampled_from(pipes), min_size=6, max_size=6, unique=True)))
    bounds = [-1, *chosen, len(joined)]
    cut = [joined[a + 1 : b] for a, b in zip(bounds, bounds[1:], strict=False)]
    challenge = MppChallenge(
        id=_unescaped_id(SECRET, fields), realm=cut[0], method=cut[1], intent=cut[2], request=cut[3],
        expires=cut[4], digest=cut[5], opaque=cut[6],
    )  # fmt: skip
    clean = not any("|" in f for f in fields)
    assert verify_challenge(SECRET, challenge) == (clean and cut == fields)
    if clean:
        assert cut == fields  # six pipes, six cuts: the issued one


def test_opaque_must_be_base64url_like_request() -> None:
    wire = 'Payment id="x", realm="r", method="evm", intent="charge", request="e30", opaque="e30|x"'
    with pytest.raises(MalformedPayment):
        parse_www_authenticate(wire)
    assert parse_www_authenticate(wire.replace("e30|x", "e30"))[0].opaque == "e30"


# ------------------------------------------------------------------------------------------ base64url


@pytest.mark.parametrize(
    "decoded,encoded",
    [
        ("", ""),
        ("Hello, World!", "SGVsbG8sIFdvcmxkIQ"),
        ('{"key":"value"}', "eyJrZXkiOiJ2YWx1ZSJ9"),
        ("https://example.com?foo=bar&baz=qux", "aHR0cHM6Ly9leGFtcGxlLmNvbT9mb289YmFyJmJhej1xdXg"),
        ("a", "YQ"),
        ("ab", "YWI"),
        ("abc", "YWJj"),
        (">>>???", "Pj4-Pz8_"),
        ("!@#$%^&*()[]{}|;:,.<>?", "IUAjJCVeJiooKVtde318OzosLjw-Pw"),
        ("tabs\tand\nnewlines", "dGFicwlhbmQKbmV3bGluZXM"),
    ],
)
def test_base64url_vectors(decoded: str, encoded: str) -> None:  # mpp-tools base64url.json
    assert b64url_encode(decoded.encode()) == encoded
    assert b64url_decode(encoded) == decoded.encode()


def test_base64url_errors() -> None:
    with pytest.raises(MalformedPayment):
        b64url_decode("not-valid!!!")
    with pytest.raises(MalformedPayment):
        b64url_decode("abc+/")  # the standard alphabet is not base64url
    with pytest.raises(MalformedPayment):
        b64url_decode("a")  # impossible length
    with pytest.raises(UnicodeDecodeError):
        b64url_decode("_w").decode("utf-8")  # bytes 0xFF: text decoders must refuse it


@given(st.binary(max_size=200))
def test_base64url_round_trip(data: bytes) -> None:
    encoded = b64url_encode(data)
    assert "=" not in encoded and b64url_decode(encoded) == data


def test_jcs_param_is_canonical() -> None:
    value = encode_json_param({"b": 1, "a": "<&>", "Z": {"y": 2, "X": 1}})
    assert b64url_decode(value) == b'{"Z":{"X":1,"y":2},"a":"<&>","b":1}'
    assert decode_json_param(value) == {"b": 1, "a": "<&>", "Z": {"y": 2, "X": 1}}
    assert jcs({"amount": "1000000"}) == b'{"amount":"1000000"}'
    with pytest.raises(MalformedPayment):
        decode_json_param(b64url_encode(b"[1,2]"))


# --------------------------------------------------------------------------- WWW-Authenticate (mpp-tools)

R1 = "eyJhbW91bnQiOiIxMDAwMDAwIiwiY3VycmVuY3kiOiIweDIwYzAwMDAwMDAwMDAwMDAwMDAwMDAwMDAwMDAwMDAwMDAwMDAwMDEiLCJyZWNpcGllbnQiOiIweDEyMzQ1Njc4OTBhYmNkZWYxMjM0NTY3ODkwYWJjZGVmMTIzNDU2NzgifQ"
R2 = "eyJhbW91bnQiOiI1MDAwMDAwIiwiY3VycmVuY3kiOiIweDIwYzAwMDAwMDAwMDAwMDAwMDAwMDAwMDAwMDAwMDAwMDAwMDAwMDIiLCJkZXNjcmlwdGlvbiI6IlByZW1pdW0gQVBJIGFjY2VzcyIsImV4cGlyZXMiOiIyMDI2LTAxLTI5VDEzOjAwOjAwWiIsImV4dGVybmFsSWQiOiJvcmRlcl8xMjM0NSIsInJlY2lwaWVudCI6IjB4YWJjZGVmMTIzNDU2Nzg5MGFiY2RlZjEyMzQ1Njc4OTBhYmNkZWYxMiJ9"

# (name, wire, expected fields, request object, formats back to the same wire)
WWW_AUTH_OK: list[tuple[str, str, dict[str, str], dict[str, Any], bool]] = [
    ("basic_challenge",
     f'Payment id="ch_abc123", realm="api.example.com", method="tempo", intent="charge", request="{R1}"',
     {"id": "ch_abc123", "realm": "api.example.com", "method": "tempo", "intent": "charge"},
     {"amount": "1000000", "currency": "0x20c0000000000000000000000000000000000001",
      "recipient": "0x1234567890abcdef1234567890abcdef12345678"}, True),
    ("full_challenge",
     f'Payment id="ch_full123", realm="api.example.com", method="tempo", intent="charge", request="{R2}", '
     'description="API access payment required", digest="sha-256=X48E9qOokqqrvdts8nOJRJN3OWDUoyWxBf7kbu9DBPE=", '
     'expires="2026-01-29T12:05:00Z"',
     {"id": "ch_full123", "description": "API access payment required",
      "digest": "sha-256=X48E9qOokqqrvdts8nOJRJN3OWDUoyWxBf7kbu9DBPE=", "expires": "2026-01-29T12:05:00Z"},
     {"amount": "5000000", "currency": "0x20c0000000000000000000000000000000000002",
      "description": "Premium API access", "expires": "2026-01-29T13:00:00Z", "externalId": "order_12345",
      "recipient": "0xabcdef1234567890abcdef1234567890abcdef12"}, True),
    ("empty_request",
     'Payment id="ch_empty", realm="test.example.com", method="tempo", intent="authorize", request="e30"',
     {"id": "ch_empty", "intent": "authorize"}, {}, True),
    ("unescaped_quotes_in_description",
     'Payment id="ch_special", realm="api.example.com", method="tempo", intent="charge", '
     'request="eyJhbW91bnQiOiIxMDAifQ", description="Payment for "Premium" service — 50% off!"',
     {"id": "ch_special", "description": "Payment for "}, {"amount": "100"}, False),
    ("escaped_quotes_in_description",
     'Payment id="ch_escaped", realm="api.example.com", method="tempo", intent="charge", request="e30", '
     'description="Pay \\"premium\\" API"',
     {"description": 'Pay "premium" API'}, {}, True),
    ("escaped_backslashes_in_description",
     'Payment id="ch_backslash", realm="api.example.com", method="tempo", intent="charge", request="e30", '
     'description="Path C:\\\\tempo\\\\api"',
     {"description": "Path C:\\tempo\\api"}, {}, True),
    ("payment_keyword_in_quoted_realm",
     'Payment id="ch_qp_realm", realm="contact Payment support", method="tempo", intent="charge", request="e30"',
     {"realm": "contact Payment support"}, {}, True),
    ("payment_keyword_in_quoted_description",
     'Payment id="ch_qp_desc", realm="api.example.com", method="tempo", intent="charge", request="e30", '
     'description="Pay with the Payment scheme"',
     {"description": "Pay with the Payment scheme"}, {}, True),
    ("adversarial_unclosed_quoted_extension",
     'Payment id="ch_redos", realm="api.example.com", method="tempo", intent="charge", request="e30", fuzz="'
     + "\\" * 12000,
     {"id": "ch_redos"}, {}, False),
    ("whitespace_tolerance",
     'Payment  id="ch_ws" ,  realm="api.example.com" ,  method="tempo" ,  intent="charge" ,  request="e30"',
     {"id": "ch_ws", "realm": "api.example.com"}, {}, False),
    ("parameter_order_independence",
     'Payment request="e30", realm="api.example.com", intent="charge", id="ch_order", method="tempo"',
     {"id": "ch_order", "method": "tempo"}, {}, False),
    ("unknown_extension_parameter",
     'Payment id="ch_ext", realm="api.example.com", method="tempo", intent="charge", request="e30", '
     'foo="bar", baz="qux"',
     {"id": "ch_ext"}, {}, False),
    ("case_insensitive_scheme",
     'payment id="ch_case", realm="api.example.com", method="tempo", intent="charge", request="e30"',
     {"id": "ch_case"}, {}, False),
]  # fmt: skip


@pytest.mark.parametrize(
    "wire,fields,request_obj,formats", [v[1:] for v in WWW_AUTH_OK], ids=[v[0] for v in WWW_AUTH_OK]
)
def test_www_authenticate_vectors(
    wire: str, fields: dict[str, str], request_obj: dict[str, Any], formats: bool
) -> None:
    started = time.perf_counter()
    (challenge,) = parse_www_authenticate(wire)
    assert time.perf_counter() - started < 1.0  # linear-time scanner, even on adversarial input
    for name, value in fields.items():
        assert getattr(challenge, name) == value
    assert challenge.request_json() == request_obj
    if formats:
        assert format_www_authenticate(challenge) == wire


WWW_AUTH_ERRORS = {
    "error_missing_payment_prefix": "Bearer token123",
    "error_missing_id": 'Payment realm="api", method="tempo", intent="charge", request="e30"',
    "error_missing_realm": 'Payment id="abc", method="tempo", intent="charge", request="e30"',
    "error_missing_method": 'Payment id="abc", realm="api", intent="charge", request="e30"',
    "error_missing_intent": 'Payment id="abc", realm="api", method="tempo", request="e30"',
    "error_missing_request": 'Payment id="abc", realm="api", method="tempo", intent="charge"',
    "error_invalid_base64url": 'Payment id="abc", realm="api", method="tempo", intent="charge", request="not-valid!!!"',
    "error_invalid_json": 'Payment id="abc", realm="api", method="tempo", intent="charge", request="bm90IGpzb24"',
    "error_empty_id": 'Payment id="", realm="api", method="tempo", intent="charge", request="e30"',
    "error_duplicate_parameters": 'Payment id="a", realm="api", method="tempo", intent="charge", request="e30", id="b"',
    "error_empty_header": "",
    "error_scheme_only": "Payment",
}


@pytest.mark.parametrize("wire", WWW_AUTH_ERRORS.values(), ids=WWW_AUTH_ERRORS.keys())
def test_www_authenticate_error_vectors(wire: str) -> None:
    with pytest.raises(MalformedPayment):
        parse_www_authenticate(wire)
    # A client scanning a 402 skips what it cannot use instead of failing.
    assert parse_www_authenticate(wire, strict=False) == []


def test_format_refuses_header_injection() -> None:  # mpp-tools error_crlf_in_description_format
    challenge = MppChallenge(
        id="ch_crlf", realm="api.example.com", method="tempo", intent="charge", request="e30",
        description="Line one\r\nLine two", opaque="trace-123",
    )  # fmt: skip
    with pytest.raises(ValueError):
        format_www_authenticate(challenge)


def _ch(cid: str, method: str = "evm") -> MppChallenge:
    return MppChallenge(id=cid, realm="api", method=method, intent="charge", request="e30")


def test_many_challenges_in_one_value_and_across_headers() -> None:
    one_line = format_www_authenticate([_ch("a"), _ch("b", "tempo")])
    assert one_line.count("Payment ") == 2
    assert [c.id for c in parse_www_authenticate(one_line)] == ["a", "b"]
    mixed = [
        'Bearer realm="x", error="invalid_token", ' + format_www_authenticate(_ch("c")),
        'Basic realm="Payment area", Payment id=d, realm=api, method=evm, intent=charge, request=e30',
        "Negotiate abc123==, " + format_www_authenticate(_ch("e")),
        format_www_authenticate(_ch("f")) + ", Bearer",
    ]
    assert [c.id for c in parse_www_authenticate(mixed)] == ["c", "d", "e", "f"]


def test_non_strict_keeps_the_good_challenges() -> None:
    value = (
        'Payment id="", realm="api", method="evm", intent="charge", request="e30", '
        + format_www_authenticate(_ch("ok"))
        + ', Payment id="x", realm="api", method="evm", intent="charge", request="!!"'
    )
    assert [c.id for c in parse_www_authenticate(value, strict=False)] == ["ok"]
    with pytest.raises(MalformedPayment):
        parse_www_authenticate(value)


_param_text = st.text(
    alphabet=st.characters(blacklist_categories=["Cs", "Cc"], blacklist_characters="\x7f"), max_size=40
)


@given(
    cid=st.text(
        alphabet="ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_", min_size=1, max_size=43
    ),
    realm=_param_text,
    method=st.sampled_from(["evm", "tempo", "stripe"]),
    intent=st.sampled_from(["charge", "session"]),
    request=st.dictionaries(st.text(max_size=10), st.text(max_size=10), max_size=3),
    description=st.none() | _param_text,
    expires=st.none() | st.just("2026-01-29T12:05:00Z"),
    opaque=st.none() | st.dictionaries(st.text(max_size=5), st.text(max_size=5), max_size=2),
)
def test_www_authenticate_round_trip(
    cid: str,
    realm: str,
    method: str,
    intent: str,
    request: dict[str, str],
    description: str | None,
    expires: str | None,
    opaque: dict[str, str] | None,
) -> None:
    challenge = MppChallenge(
        id=cid, realm=realm, method=method, intent=intent, request=encode_json_param(request),
        description=description, expires=expires, opaque=None if opaque is None else encode_json_param(opaque),
    )  # fmt: skip
    parsed = parse_www_authenticate([format_www_authenticate([challenge, challenge])])
    assert parsed == [challenge, challenge]


@given(st.text(max_size=300) | st.binary(max_size=300))
@settings(max_examples=400)
def test_www_authenticate_any_input_gives_only_the_typed_error(data: str | bytes) -> None:
    try:
        parse_www_authenticate(data)
    except MalformedPayment:
        pass
    parse_www_authenticate(data, strict=False)  # never raises


@given(
    st.lists(
        st.sampled_from(
            ["Payment", " ", ",", "=", '"', "\\", "id", "realm", "request", "e30", "x", "Bearer"]
        ),
        max_size=40,
    )
)
def test_www_authenticate_token_soup(parts: list[str]) -> None:
    """Grammar-shaped noise reaches deeper scanner states than random text does."""
    value = "".join(parts)
    try:
        parse_www_authenticate(value)
    except MalformedPayment:
        pass


# ------------------------------------------------------------------------------- credentials (mpp-tools)

BASIC_CREDENTIAL = "Payment eyJjaGFsbGVuZ2UiOnsiaWQiOiJjaF9hYmMxMjMiLCJyZWFsbSI6ImFwaS5leGFtcGxlLmNvbSIsIm1ldGhvZCI6InRlbXBvIiwiaW50ZW50IjoiY2hhcmdlIiwicmVxdWVzdCI6ImV5SmhiVzkxYm5RaU9pSXhNREF3TURBd0lpd2lZM1Z5Y21WdVkza2lPaUl3ZURJd1l6QXdNREF3TURBd01EQXdNREF3TURBd01EQXdNREF3TURBd01EQXdNREF3TURBd01ERWlMQ0psZUhCcGNtVnpJam9pTWpBeU5pMHdNUzB5T1ZReE1qb3dNRG93TUZvaUxDSnlaV05wY0dsbGJuUWlPaUl3ZURFeU16UTFOamM0T1RCaFltTmtaV1l4TWpNME5UWTNPRGt3WVdKalpHVm1NVEl6TkRVMk56Z2lmUSJ9LCJwYXlsb2FkIjp7InR5cGUiOiJ0cmFuc2FjdGlvbiIsInNpZ25hdHVyZSI6IjB4YWJjZGVmMTIzNDU2Nzg5MGFiY2RlZjEyMzQ1Njc4OTBhYmNkZWYxMjM0NTY3ODkwYWJjZGVmMTIzNDU2Nzg5MGFiY2RlZjEyMzQ1Njc4OTBhYmNkZWYxMjM0NTY3ODkwYWJjZGVmMTIzNDU2Nzg5MGFiY2RlZjEyMzQ1Njc4OTBhYiJ9fQ"
HEADER_CREDENTIAL = "Payment eyJjaGFsbGVuZ2UiOnsiaWQiOiJjaF9oZWFkZXIiLCJyZWFsbSI6ImFwaS5leGFtcGxlLmNvbSIsIm1ldGhvZCI6InRlbXBvIiwiaW50ZW50IjoiY2hhcmdlIiwicmVxdWVzdCI6ImUzMCIsImhlYWRlciI6IlBheW1lbnQtQXV0aG9yaXphdGlvbiJ9LCJwYXlsb2FkIjp7fX0"
SOURCE_CREDENTIAL = "Payment eyJjaGFsbGVuZ2UiOnsiaWQiOiJjaF9zb3VyY2UxMjMiLCJyZWFsbSI6ImFwaS5leGFtcGxlLmNvbSIsIm1ldGhvZCI6InRlbXBvIiwiaW50ZW50IjoiY2hhcmdlIiwicmVxdWVzdCI6ImV5SmhiVzkxYm5RaU9pSXlNREF3TURBd0lpd2lZM1Z5Y21WdVkza2lPaUpWVTBRaUxDSmxlSEJwY21Weklqb2lNakF5Tmkwd01TMHlPVlF4TkRvd01Eb3dNRm9pTENKeVpXTnBjR2xsYm5RaU9pSXdlR0ZpWTJSbFpqRXlNelExTmpjNE9UQmhZbU5rWldZeE1qTTBOVFkzT0Rrd1lXSmpaR1ZtTVRJaWZRIn0sInBheWxvYWQiOnsidHlwZSI6Imhhc2giLCJoYXNoIjoiMHgxMjM0NTY3ODkwYWJjZGVmMTIzNDU2Nzg5MGFiY2RlZjEyMzQ1Njc4OTBhYmNkZWYxMjM0NTY3ODkwYWJjZGVmMTIzNDU2Nzg5MGFiY2RlZjEyMzQ1Njc4OTBhYmNkZWYxMjM0NTY3ODkwYWJjZGVmMTIzNDU2Nzg5MGFiY2RlZjEyIn0sInNvdXJjZSI6ImRpZDpwa2g6ZWlwMTU1OjQyNDMxOjB4MTIzNDU2Nzg5MGFiY2RlZjEyMzQ1Njc4OTBhYmNkZWYxMjM0NTY3OCJ9"


def test_credential_vectors() -> None:
    basic = parse_credential(BASIC_CREDENTIAL)
    assert basic.challenge.id == "ch_abc123" and basic.challenge.method == "tempo"
    assert basic.challenge.request_json()["expires"] == "2026-01-29T12:00:00Z"
    assert basic.payload["type"] == "transaction" and basic.source is None
    assert format_credential(basic) == BASIC_CREDENTIAL

    with_header = parse_credential(HEADER_CREDENTIAL)
    assert with_header.challenge.header == "Payment-Authorization" and with_header.payload == {}
    assert format_credential(with_header) == HEADER_CREDENTIAL

    with_source = parse_credential(SOURCE_CREDENTIAL)
    assert with_source.source == "did:pkh:eip155:42431:0x1234567890abcdef1234567890abcdef12345678"
    assert format_credential(with_source) == SOURCE_CREDENTIAL
    assert parse_credential("payment  " + SOURCE_CREDENTIAL[8:] + " ") == with_source


@pytest.mark.parametrize(
    "wire",
    [
        "Bearer eyJjaGFsbGVuZ2UiOnt9fQ",
        "Payment not-valid!!!",
        "Payment eyJwYXlsb2FkIjp7InR5cGUiOiJ0cmFuc2FjdGlvbiIsInNpZ25hdHVyZSI6IjB4MTIzNCJ9fQ",
        "Payment eyJjaGFsbGVuZ2UiOnsicmVhbG0iOiJhcGkiLCJtZXRob2QiOiJ0ZW1wbyIsImludGVudCI6ImNoYXJnZSIsInJlcXVlc3QiOiJlMzAifSwicGF5bG9hZCI6eyJ0eXBlIjoidHJhbnNhY3Rpb24iLCJzaWduYXR1cmUiOiIweDEyMzQifX0",
        "Payment W10",
        "Payment",
        "Payment a b",
    ],
)
def test_credential_error_vectors(wire: str) -> None:
    with pytest.raises(MalformedPayment):
        parse_credential(wire)


@given(st.text(max_size=300) | st.binary(max_size=300))
def test_credential_any_input_gives_only_the_typed_error(data: str | bytes) -> None:
    try:
        parse_credential(data)
    except MalformedPayment:
        pass
    try:
        parse_credential(
            b"Payment " + b64url_encode(data if isinstance(data, bytes) else data.encode()).encode()
        )
    except MalformedPayment:
        pass


@given(
    payload=st.dictionaries(st.text(max_size=8), st.text(max_size=8) | st.integers(), max_size=4),
    source=st.none() | st.text(max_size=30),
)
def test_credential_round_trip(payload: dict[str, Any], source: str | None) -> None:
    credential = MppCredential(challenge=_ch("id1"), payload=payload, source=source)
    assert parse_credential(format_credential(credential)) == credential


# --------------------------------------------------------------------------------------------- receipts


def test_receipt_round_trip_and_shape() -> None:
    receipt = MppReceipt(
        method="evm",
        timestamp="2026-01-29T12:00:00Z",
        reference="0x" + "ab" * 32,
        challenge_id="ch",
        chain_id=31337,
    )
    value = format_receipt(receipt)
    assert json.loads(b64url_decode(value)) == {
        "status": "success",
        "method": "evm",
        "timestamp": "2026-01-29T12:00:00Z",
        "reference": "0x" + "ab" * 32,
        "challengeId": "ch",
        "chainId": 31337,
    }
    assert parse_receipt(value) == receipt
    # pympp's receipt (sorted keys, no challengeId) parses too
    pympp = b64url_encode(
        b'{"method":"evm","reference":"0x01","status":"success","timestamp":"2026-01-01T00:00:00Z"}'
    )
    assert parse_receipt(pympp).reference == "0x01"
    with pytest.raises(MalformedPayment):
        parse_receipt(b64url_encode(b'{"method":"evm","reference":"0x01","status":"failed","timestamp":"t"}'))


def _receipt(**fields: Any) -> str:
    base = {"method": "evm", "reference": "0x01", "status": "success", "timestamp": "2026-01-01T00:00:00Z"}
    return b64url_encode(json.dumps({k: v for k, v in {**base, **fields}.items() if v is not None}).encode())


def test_receipt_without_status_is_a_typed_error_not_a_success() -> None:
    """Issue 9 item 16: core spec "Payment-Receipt": ``status`` MUST be "success"; a receipt that does not
    say so is not a proof of success, whatever else it carries."""
    with pytest.raises(MalformedPayment, match="status") as info:
        parse_receipt(_receipt(status=None))
    assert info.value.code == "invalid_payload" and info.value.status_hint == 400
    for status in ("failed", "", "SUCCESS", 1):
        with pytest.raises(MalformedPayment):
            parse_receipt(_receipt(status=status))
    assert parse_receipt(_receipt()).status == "success"


@pytest.mark.parametrize(
    "timestamp",
    ["t", "", "2026-01-01", "2026-01-01T00:00:00", "2026-01-01 00:00:00Z", "20260101T000000Z",
     "2026-01-01T00:00Z", "2026-13-01T00:00:00Z", "2026-02-30T00:00:00Z", "2026-01-01T24:00:00Z",
     "2026-01-01T00:00:61Z", "2026-01-01T00:00:00+2400", "2026-01-01T00:00:00+24:00", "2026-W01-1T00:00:00Z",
     "２０２６-01-01T00:00:00Z", " 2026-01-01T00:00:00Z", "2026-01-01T00:00:00.Z"],
)  # fmt: skip
def test_receipt_timestamp_must_be_rfc3339(timestamp: str) -> None:
    with pytest.raises(MalformedPayment, match="RFC 3339"):
        parse_receipt(_receipt(timestamp=timestamp))
    with pytest.raises(ValueError, match="RFC 3339"):  # and we never send one
        format_receipt(MppReceipt(method="evm", timestamp=timestamp, reference="0x01"))


@pytest.mark.parametrize(
    "timestamp,epoch",
    [("2026-01-01T00:00:00Z", 1767225600), ("2026-01-01t00:00:00.123456789z", 1767225600.123456),
     ("2026-01-01T05:30:00+05:30", 1767225600), ("2025-12-31T19:00:00-05:00", 1767225600),
     ("2016-12-31T23:59:60Z", 1483228799)],
)  # fmt: skip
def test_rfc3339_receipt_timestamps_parse(timestamp: str, epoch: float) -> None:
    assert parse_receipt(_receipt(timestamp=timestamp)).timestamp == timestamp
    assert parse_rfc3339(timestamp).timestamp() == pytest.approx(epoch)


@given(st.text(max_size=200) | st.binary(max_size=200))
def test_receipt_any_input_gives_only_the_typed_error(data: str | bytes) -> None:
    try:
        parse_receipt(data)
    except MalformedPayment:
        pass


# -------------------------------------------------------------------------------------- challenge hash


@pytest.mark.parametrize("cid,realm", [("AgN5", "localhost"), ("x", "bücher.example"), ("", "")])
def test_challenge_hash_follows_the_spec_and_pympp_differs(cid: str, realm: str) -> None:
    """evm/charge: nonce = keccak256(abi.encodePacked(id, realm)), as the spec and mppx compute it.
    pympp 0.16 hashes JSON.stringify([id, realm]) instead; our compat function reproduces that (checked
    against pympp itself in tests/test_interop_mpp.py) and is never the default."""
    assert challenge_hash(cid, realm) == keccak((cid + realm).encode())
    assert challenge_hash_pympp(cid, realm) == keccak(json.dumps([cid, realm], separators=(",", ":"),
                                                                 ensure_ascii=False).encode())  # fmt: skip
    assert challenge_hash(cid, realm) != challenge_hash_pympp(cid, realm)
    assert len(challenge_hash(cid, realm)) == 32


# ---------------------------------------------------------------------------------------- problems


def test_one_problem_body_serves_mpp_and_x402_v1_clients() -> None:
    accepts = [
        PaymentRequirementsV1(
            scheme="exact", network="base-sepolia", max_amount_required="10", resource="https://x/y",
            description="d", mime_type="application/json", pay_to="0x" + "11" * 20, max_timeout_seconds=60,
            asset="0x" + "22" * 20, extra={"name": "USDC", "version": "2"},
        )
    ]  # fmt: skip
    problem = ProblemDetails(
        type="https://paymentauth.org/problems/payment-required",
        title="Payment Required",
        status=402,
        detail="Payment is required.",
        challenge_id="abc",
        x402_version=1,
        error="X-PAYMENT header is required",
        accepts=accepts,
    )
    body = encode_problem(problem)
    doc = json.loads(body)
    assert (
        doc["type"].endswith("/payment-required") and doc["challengeId"] == "abc" and doc["x402Version"] == 1
    )
    assert decode_problem(body) == problem
    v1 = json_decode(body, PaymentRequiredV1)  # what a v1 client reads from the same bytes
    assert v1.accepts == accepts and v1.error == "X-PAYMENT header is required"
    minimal = json.loads(
        encode_problem(ProblemDetails(type="about:blank", title="Verification Failed", status=402))
    )
    assert minimal == {"type": "about:blank", "title": "Verification Failed", "status": 402}


#: draft-httpauth-payment "Error Codes" (paymentauth.org/problems/…): every type and its HTTP status.
SPEC_PROBLEMS = {
    "payment-required": 402, "payment-insufficient": 402, "payment-expired": 402, "verification-failed": 402,
    "method-unsupported": 400, "malformed-credential": 402, "invalid-challenge": 402,
}  # fmt: skip


def test_every_problem_type_we_send_is_the_core_specs_with_its_status() -> None:
    """Issue 9 item 16: each code the gateway can answer an MPP client with maps to one of the core spec's
    problem types, at the status the spec gives that type; a server-side failure (5xx) borrows none."""
    for code in _TABLE:
        answer = error_answer(code)
        if answer.mpp_status >= 500:
            assert answer.problem_type == "about:blank", code
            continue
        name = answer.problem_type.removeprefix(PROBLEM_BASE)
        assert SPEC_PROBLEMS.get(name) == answer.mpp_status, (code, name, answer.mpp_status)
    assert (
        error_answer(X402Error("db down", code="store_unavailable", status_hint=503)).problem_type
        == "about:blank"
    )
    # The status-code table: an already-used challenge id is 402 + invalid-challenge + a fresh challenge.
    for code in (Reason.NONCE_ALREADY_USED, "escrow_nonce_used", "escrow_nonce_reused"):
        answer = error_answer(code)
        assert (answer.mpp_status, answer.problem_type, answer.replayed) == (
            402, PROBLEM_BASE + "invalid-challenge", True,
        )  # fmt: skip
    assert not any(error_answer(code).replayed for code in _TABLE if code not in _REPLAY_CODES)


_REPLAY_CODES = {Reason.NONCE_ALREADY_USED, "escrow_nonce_used", "escrow_nonce_reused"}


@pytest.mark.parametrize(
    "case,code,error_type",
    [  # mpp-tools conformance/server-verification/cases.json: errorType per case, and the code we raise
        (
            "missing_credential_expires_rejected_with_route_expiry",
            Reason.INVALID_CHALLENGE,
            "invalid-challenge",
        ),
        ("expired_credential_rejected", Reason.CHALLENGE_EXPIRED, "payment-expired"),
        ("tampered_challenge_id_rejected", Reason.INVALID_CHALLENGE, "invalid-challenge"),
        ("realm_mismatch_rejected", Reason.INVALID_CHALLENGE, "invalid-challenge"),
        ("request_mismatch_rejected", Reason.CHALLENGE_BINDING_MISMATCH, "invalid-challenge"),
        ("intent_verification_error_reported", Reason.SIGNATURE, "verification-failed"),
    ],
)
def test_server_verification_vectors_problem_types(case: str, code: str, error_type: str) -> None:
    answer = error_answer(code)
    assert (answer.problem_type, answer.mpp_status) == (PROBLEM_BASE + error_type, 402), case


def test_rfc3339() -> None:
    assert rfc3339(0) == "1970-01-01T00:00:00Z"
    assert parse_rfc3339("2025-01-15T12:05:00Z").timestamp() == 1736942700
    assert parse_rfc3339("2025-01-15T13:05:00+01:00").timestamp() == 1736942700
    for bad in ("2025-01-15", "yesterday", "2025-01-15T12:05:00"):
        with pytest.raises(MalformedPayment):
            parse_rfc3339(bad)


@given(st.text(max_size=200) | st.binary(max_size=200))
def test_other_mpp_decoders_give_only_the_typed_error(data: str | bytes) -> None:
    for decoder in (b64url_decode, decode_json_param, decode_problem):
        try:
            decoder(data)
        except MalformedPayment:
            pass
