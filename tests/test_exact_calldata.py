"""The hand-encoded `transferWithAuthorization` call data (issue 15: no generic ABI encoding per request) is
byte for byte what the ABI encoder produces, for both overloads and any signature length."""

from __future__ import annotations

from eth_abi.abi import encode as abi_encode
from eth_utils.address import to_checksum_address
from eth_utils.crypto import keccak
from hypothesis import given, settings
from hypothesis import strategies as st

from escrow.payments._exact import ExactEvm
from x402 import Eip3009Authorization

addresses = st.binary(min_size=20, max_size=20).map(lambda b: to_checksum_address("0x" + b.hex()))
uints = st.integers(min_value=0, max_value=2**256 - 1)
nonces = st.binary(min_size=32, max_size=32).map(lambda b: "0x" + b.hex())
TYPES = ["address", "address", "uint256", "uint256", "uint256", "bytes32"]


def reference(auth: Eip3009Authorization, signature: bytes) -> bytes:
    head = [
        auth.from_,
        auth.to,
        int(auth.value),
        int(auth.valid_after),
        int(auth.valid_before),
        bytes.fromhex(auth.nonce[2:]),
    ]
    if len(signature) == 65:
        selector = keccak(
            text="transferWithAuthorization(address,address,uint256,uint256,uint256,bytes32,uint8,bytes32,bytes32)"
        )[:4]
        v = signature[64] if signature[64] >= 27 else signature[64] + 27
        vrs = [v, signature[:32], signature[32:64]]
        return selector + abi_encode([*TYPES, "uint8", "bytes32", "bytes32"], [*head, *vrs])
    selector = keccak(
        text="transferWithAuthorization(address,address,uint256,uint256,uint256,bytes32,bytes)"
    )[:4]
    return selector + abi_encode([*TYPES, "bytes"], [*head, signature])


@settings(max_examples=300, deadline=None)
@given(
    from_=addresses,
    to=addresses,
    value=uints,
    after=uints,
    before=uints,
    nonce=nonces,
    signature=st.one_of(st.binary(min_size=65, max_size=65), st.binary(max_size=300)),
)
def test_calldata_matches_the_abi_encoder(
    from_: str, to: str, value: int, after: int, before: int, nonce: str, signature: bytes
) -> None:
    auth = Eip3009Authorization(
        from_=from_, to=to, value=str(value), valid_after=str(after), valid_before=str(before), nonce=nonce
    )
    assert ExactEvm.calldata(auth, signature) == reference(auth, signature)
