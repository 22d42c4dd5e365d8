"""The sponsor's EIP-712 digest in Python equals `AgentPaymaster.sponsorshipHash` on chain, for any operation
and terms: what the sponsor key signs off-chain is exactly what the paymaster verifies."""

from __future__ import annotations

import secrets

import anyio
import pytest
from eth_abi.abi import decode as abi_decode
from eth_abi.abi import encode as abi_encode
from eth_utils.crypto import keccak
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from escrow import DevnetState
from escrow.accounts._paymaster import PaymasterMode, SponsorTerms, sponsorship_typed_data
from escrow.accounts._userop import PackedUserOperation
from escrow.chain._rpc import Rpc
from x402 import typed_data_digest

pytestmark = [pytest.mark.chain]

_SPONSORSHIP_HASH = keccak(
    text="sponsorshipHash((address,uint256,bytes,bytes,bytes32,uint256,bytes32,bytes,bytes),"
    "(uint8,uint48,uint48,uint128,address,uint256))"
)[:4]
_u128 = st.integers(0, 2**128 - 1)


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    nonce=st.integers(0, 2**256 - 1),
    init_code=st.binary(max_size=60),
    call_data=st.binary(max_size=120),
    gas=st.tuples(_u128, _u128, st.integers(0, 2**256 - 1), _u128, _u128, _u128, _u128),
    mode=st.sampled_from(list(PaymasterMode)),
    window=st.tuples(st.integers(0, 2**48 - 1), st.integers(0, 2**48 - 1)),
    limit=_u128,
    price=st.integers(0, 2**256 - 1),
)
def test_python_digest_equals_the_paymasters(
    devnet: DevnetState,
    nonce: int,
    init_code: bytes,
    call_data: bytes,
    gas: tuple[int, int, int, int, int, int, int],
    mode: PaymasterMode,
    window: tuple[int, int],
    limit: int,
    price: int,
) -> None:
    paymaster = devnet.contracts["paymaster"]
    op = PackedUserOperation(
        sender="0x" + secrets.token_hex(20),
        nonce=nonce,
        init_code=init_code,
        call_data=call_data,
        verification_gas_limit=gas[0],
        call_gas_limit=gas[1],
        pre_verification_gas=gas[2],
        max_priority_fee_per_gas=gas[3],
        max_fee_per_gas=gas[4],
        paymaster_and_data=bytes.fromhex(paymaster[2:])
        + gas[5].to_bytes(16, "big")
        + gas[6].to_bytes(16, "big"),
    )
    terms = SponsorTerms(
        mode=mode,
        valid_after=window[0],
        valid_until=window[1],
        spend_limit=limit,
        token="0x" + secrets.token_hex(20),
        token_per_native=price,
    )

    async def onchain() -> bytes:
        rpc = Rpc(devnet.rpc_url)
        try:
            data = _SPONSORSHIP_HASH + abi_encode(
                [
                    "(address,uint256,bytes,bytes,bytes32,uint256,bytes32,bytes,bytes)",
                    "(uint8,uint48,uint48,uint128,address,uint256)",
                ],
                [
                    op.packed(),
                    (
                        int(terms.mode),
                        terms.valid_after,
                        terms.valid_until,
                        terms.spend_limit,
                        terms.token,
                        terms.token_per_native,
                    ),
                ],
            )
            (digest,) = abi_decode(["bytes32"], await rpc.call(paymaster, data))
            return bytes(digest)
        finally:
            await rpc.aclose()

    local = typed_data_digest(
        sponsorship_typed_data(op, terms, chain_id=devnet.chain_id, paymaster=paymaster)
    )
    assert anyio.run(onchain) == local
