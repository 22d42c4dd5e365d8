"""The bundler client and paymaster encodings without a chain: the ERC-7769 JSON form of an operation,
the bundler's validation errors (as Alto words them) decoded to the failing policy, the sponsor digest."""

from __future__ import annotations

import socket

import httpx
import pytest
from eth_abi.abi import encode as abi_encode
from eth_utils.crypto import keccak
from hypothesis import given
from hypothesis import strategies as st

from escrow.accounts._bundler_rpc import _rejection, user_op_from_json, user_op_to_json
from escrow.accounts._paymaster import PaymasterMode, SponsorService, SponsorTerms, decode_paymaster_and_data
from escrow.accounts._signers import SessionKey
from escrow.accounts._userop import PackedUserOperation, SessionPolicyKind
from escrow.accounts._userop_fill import placeholder_signature
from x402 import LocalSigner, recover_hash, typed_data_digest

ADDRESS = "0x" + "ab" * 20
_u128 = st.integers(0, 2**128 - 1)


@given(
    nonce=st.integers(0, 2**256 - 1),
    init_code=st.one_of(st.just(b""), st.binary(min_size=20, max_size=80)),
    call_data=st.binary(max_size=200),
    gas=st.tuples(_u128, _u128, st.integers(0, 2**256 - 1), _u128, _u128),
    paymaster=st.one_of(st.just(b""), st.binary(min_size=52, max_size=150)),
    signature=st.binary(max_size=100),
)
def test_json_form_round_trips(
    nonce: int,
    init_code: bytes,
    call_data: bytes,
    gas: tuple[int, int, int, int, int],
    paymaster: bytes,
    signature: bytes,
) -> None:
    op = PackedUserOperation(
        sender=ADDRESS,
        nonce=nonce,
        init_code=init_code,
        call_data=call_data,
        verification_gas_limit=gas[0],
        call_gas_limit=gas[1],
        pre_verification_gas=gas[2],
        max_priority_fee_per_gas=gas[3],
        max_fee_per_gas=gas[4],
        paymaster_and_data=paymaster,
        signature=signature,
    )
    wire = user_op_to_json(op)
    assert ("factory" in wire) == bool(init_code) and ("paymaster" in wire) == bool(paymaster)
    assert user_op_from_json(wire) == PackedUserOperation(
        **{**{f: getattr(op, f) for f in op.__struct_fields__}, "sender": wire["sender"]}
    )


@pytest.mark.parametrize(
    ("wire", "field"),
    [
        ([], "object"),
        ({"nonce": "0x0", "callData": "0x"}, "sender"),
        ({"sender": "0x12", "nonce": "0x0", "callData": "0x"}, "sender"),
        ({"sender": ADDRESS, "nonce": "zero", "callData": "0x"}, "nonce"),
        ({"sender": ADDRESS, "nonce": "0x0", "callData": "0xzz"}, "callData"),
    ],
)
def test_malformed_json_names_the_field(wire: object, field: str) -> None:
    with pytest.raises(ValueError, match=field):
        user_op_from_json(wire)


_VIOLATION = keccak(text="SessionKeyPolicyViolation(address,uint8,uint256,uint256)")[:4]


def test_alto_validation_errors_name_the_policy() -> None:
    inner = _VIOLATION + abi_encode(["address", "uint8", "uint256", "uint256"], [ADDRESS, 3, 2, 1])
    # what Alto 0.0.20 answers to eth_sendUserOperation and eth_estimateUserOperationGas
    for message in (
        f"UserOperation reverted with reason: AA23 reverted 0x{inner.hex()}",
        f"UserOperation reverted during simulation with reason: AA23 reverted 0x{inner.hex()}",
    ):
        rejected = _rejection({"message": message, "code": -32500}, None, "0x01")
        assert rejected is not None and rejected.reason == "AA23 reverted"
        assert rejected.violation is not None
        assert rejected.violation.policy == SessionPolicyKind.ARGUMENT
        assert (rejected.violation.call_index, rejected.violation.rule_index) == (2, 1)
        assert rejected.code == "session_argument_rule" and rejected.user_op_hash == "0x01"
    sig = _rejection(
        {"message": "UserOperation reverted with reason: AA24 signature error", "code": -32507}, None, ""
    )
    assert sig is not None and sig.code == "userop_signature_invalid" and sig.violation is None
    # a FailedOpWithRevert payload nested in `data`, as other bundlers do
    failed = keccak(text="FailedOpWithRevert(uint256,string,bytes)")[:4] + abi_encode(
        ["uint256", "string", "bytes"], [0, "AA23 reverted", inner]
    )
    nested = _rejection(
        {"message": "validation", "code": -32500, "data": {"revertData": "0x" + failed.hex()}}, None, ""
    )
    assert nested is not None and nested.code == "session_argument_rule"
    # not a validation verdict: a transport-level failure is not a rejection
    assert _rejection({"message": "internal error", "code": -32603}, None, "") is None


def test_placeholder_signature_keeps_key_window_and_length() -> None:
    key = SessionKey(LocalSigner.random(), interval=60)
    placeholder = placeholder_signature(key, 6000)
    assert len(placeholder) == 91 and placeholder[:20].hex() == key.address[2:].lower()
    assert int.from_bytes(placeholder[20:26], "big") == 100
    assert len(placeholder_signature(object(), 0)) == 65


def test_sponsor_signs_the_operation_and_terms() -> None:
    sponsor_key = LocalSigner.random()
    paymaster = "0x" + "cd" * 20
    sponsor = SponsorService(paymaster=paymaster, signer=sponsor_key, chain_id=31337, clock=lambda: 1000.0)
    op = PackedUserOperation(sender=ADDRESS, nonce=5, call_data=b"\x01", max_fee_per_gas=7)
    stub = sponsor.stub(op)
    final = sponsor.sign(op)
    assert len(stub) == len(final) == 52 + 81 + 65
    pm, verification, post_op, terms, signature = decode_paymaster_and_data(final)
    assert (pm.lower(), terms.mode, terms.valid_until, terms.spend_limit) == (
        paymaster,
        PaymasterMode.VERIFYING,
        1600,
        10**17,
    )
    signed_op = PackedUserOperation(
        **{**{f: getattr(op, f) for f in op.__struct_fields__}, "paymaster_and_data": final[:52]}
    )
    from escrow.accounts._paymaster import sponsorship_typed_data

    digest = typed_data_digest(sponsorship_typed_data(signed_op, terms, chain_id=31337, paymaster=paymaster))
    assert recover_hash(digest, signature) == sponsor_key.address
    token = sponsor.token("0x" + "ee" * 20, 3000 * 10**6).sign(op)
    token_terms = SponsorTerms.decode(token[52:133])
    assert (token_terms.mode, token_terms.token_per_native) == (PaymasterMode.TOKEN, 3000 * 10**6)
    with pytest.raises(ValueError):
        SponsorService(paymaster=paymaster, signer=sponsor_key, chain_id=1, mode=PaymasterMode.TOKEN)
    limited = SponsorService(
        paymaster=paymaster, signer=sponsor_key, chain_id=31337, allowed=["0x" + "01" * 20]
    )
    with pytest.raises(Exception, match="does not sponsor"):
        limited.sign(op)


@pytest.mark.anyio
async def test_bundler_failures_are_typed_errors() -> None:
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import PlainTextResponse, Response
    from starlette.routing import Route

    from escrow.accounts._bundler_rpc import BundlerError, BundlerRpc

    op = PackedUserOperation(sender=ADDRESS, nonce=0, call_data=b"\x01")
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    async with BundlerRpc(f"http://127.0.0.1:{port}", chain_id=31337) as gone:
        with pytest.raises(BundlerError) as info:
            await gone.send(op)
        assert info.value.code == "bundler_unreachable"

    async def answer(request: Request) -> Response:
        body = await request.json()
        if body["method"] == "eth_supportedEntryPoints":
            return PlainTextResponse("<html>oops</html>", status_code=502)
        if body["method"] == "eth_sendUserOperation":
            return Response(b'{"jsonrpc":"2.0","id":1,"result":42}', media_type="application/json")
        return Response(
            b'{"jsonrpc":"2.0","id":1,"error":{"code":-32603,"message":"internal"}}',
            media_type="application/json",
        )

    app = Starlette(routes=[Route("/", answer, methods=["POST"])])
    client = httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://bundler")
    async with BundlerRpc("http://bundler/", chain_id=31337, client=client) as odd:
        with pytest.raises(BundlerError, match="HTTP 502"):
            await odd.supported_entry_points()
        with pytest.raises(BundlerError, match="answered 42"):
            await odd.send(op)
        with pytest.raises(BundlerError, match="internal") as info:
            await odd.estimate(op)
        assert info.value.rpc_code == -32603
        with pytest.raises(BundlerError, match="no node"):
            await odd.suggest_fees()  # the bundler offers none, and no node was given
    await client.aclose()
