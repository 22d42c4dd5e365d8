"""The relayer's hand-rolled EIP-1559 signing (issue 15: no generic per-transaction re-encoding) produces the
very bytes the reference account library does, for any field values, with and without a recipient."""

from __future__ import annotations

from typing import Any

from eth_account import Account
from eth_utils.address import to_checksum_address
from hypothesis import given, settings
from hypothesis import strategies as st

from escrow.chain._sender import sign_eip1559
from x402 import LocalSigner

KEY = "0x" + "4c" * 32
uint64 = st.integers(min_value=0, max_value=2**64 - 1)
uint256 = st.integers(min_value=0, max_value=2**256 - 1)


@settings(max_examples=200, deadline=None)
@given(
    chain_id=st.integers(min_value=1, max_value=2**32),
    nonce=uint64,
    priority=uint256,
    extra=uint256,
    gas=uint64,
    to=st.one_of(st.none(), st.binary(min_size=20, max_size=20)),
    value=uint256,
    data=st.binary(max_size=200),
)
def test_signed_bytes_match_the_reference_library(
    chain_id: int,
    nonce: int,
    priority: int,
    extra: int,
    gas: int,
    to: bytes | None,
    value: int,
    data: bytes,
) -> None:
    tx: dict[str, Any] = {
        "type": 2,
        "chainId": chain_id,
        "nonce": nonce,
        "value": value,
        "data": data,
        "gas": gas,
        "maxFeePerGas": min(priority + extra, 2**256 - 1),
        "maxPriorityFeePerGas": priority,
    }
    if to is not None:
        tx["to"] = to_checksum_address(to)
    expected = Account.from_key(KEY).sign_transaction(tx).raw_transaction
    assert sign_eip1559(LocalSigner(KEY), tx) == bytes(expected)
