"""Completing an operation the standard way before it is signed: a paymaster's sponsorship (ERC-7677 stub,
then final data) and a bundler's gas estimate and fee suggestion (ERC-7769), in that order.

`AgentAccount.prepare` calls `fill_user_op` when it has a standard bundler (`BundlerRpc`) or a paymaster; with
our own `Bundler` and no paymaster, its local estimates stand.
"""

from __future__ import annotations

from typing import Final, Protocol, runtime_checkable

import msgspec
from eth_utils.address import to_checksum_address

from ._bundler_rpc import BundlerRpc
from ._signers import SessionKey
from ._userop import ENTRYPOINT_V07, AccountError, PackedUserOperation

__all__ = ["DUMMY_ECDSA", "Sponsor", "fill_user_op", "placeholder_signature"]


@runtime_checkable
class Sponsor(Protocol):
    """An ERC-7677 paymaster service (`PaymasterRpc`, or an in-process one): `paymasterAndData` for an
    operation, first a stub to estimate gas with, then the final, signed one."""

    async def stub_data(self, op: PackedUserOperation, *, entry_point: str, chain_id: int) -> bytes: ...

    async def final_data(self, op: PackedUserOperation, *, entry_point: str, chain_id: int) -> bytes: ...


#: A well-formed 65-byte ECDSA signature that recovers to nobody's key: estimation runs the whole validation
#: (every session-key policy, then `ecrecover`) and the account returns "signature failed" without reverting.
DUMMY_ECDSA: Final = bytes.fromhex(
    "fffffffffffffffffffffffffffffff0000000000000000000000000000000007"
    "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa1c"
)


def placeholder_signature(signer: object, timestamp: int) -> bytes:
    """What `signer`'s signature looks like, minus the ECDSA part: same length, same key and window."""
    if isinstance(signer, SessionKey):
        return bytes.fromhex(signer.address[2:]) + signer.window(timestamp).to_bytes(6, "big") + DUMMY_ECDSA
    return DUMMY_ECDSA


def _with_paymaster_gas(pnd: bytes, verification: int, post_op: int) -> bytes:
    return pnd[:20] + verification.to_bytes(16, "big") + post_op.to_bytes(16, "big") + pnd[52:]


async def fill_user_op(
    op: PackedUserOperation,
    *,
    signer: object,
    timestamp: int,
    bundler: object | None,
    paymaster: Sponsor | None,
    fees_given: bool,
    estimate_call_gas: bool = True,
    estimate_verification_gas: bool = True,
) -> PackedUserOperation:
    """Complete an unsigned operation the standard way: paymaster stub data (ERC-7677
    `pm_getPaymasterStubData`), the bundler's fees and gas estimate, then the final paymaster data
    (`pm_getPaymasterData`), which commits to those gas values. Fields the caller fixed are kept."""
    chain_id = int(getattr(bundler, "chain_id", 0)) or None
    entry_point = to_checksum_address(getattr(bundler, "entry_point", ENTRYPOINT_V07))
    op = op.with_signature(placeholder_signature(signer, timestamp))
    if isinstance(bundler, BundlerRpc) and not fees_given:
        max_fee, tip = await bundler.suggest_fees()
        op = msgspec.structs.replace(op, max_fee_per_gas=max_fee, max_priority_fee_per_gas=min(tip, max_fee))
    if paymaster is not None:
        if chain_id is None:
            raise AccountError(
                "a sponsored operation needs the bundler's chain id", code="paymaster_no_chain"
            )
        stub = await paymaster.stub_data(op, entry_point=entry_point, chain_id=chain_id)
        op = msgspec.structs.replace(op, paymaster_and_data=stub)
    if isinstance(bundler, BundlerRpc):
        estimate = await bundler.estimate(op)
        changes: dict[str, int] = {"pre_verification_gas": estimate.pre_verification_gas}
        if estimate_call_gas:
            changes["call_gas_limit"] = estimate.call_gas_limit
        if estimate_verification_gas:
            changes["verification_gas_limit"] = estimate.verification_gas_limit
        op = msgspec.structs.replace(op, **changes)
        if paymaster is not None:
            # The bundler simulates the stub, whose dummy signature fails early in the paymaster (before it
            # moves tokens or counts the spend): keep the paymaster's own limits when they are higher, as
            # ERC-7677 stub data intends.
            pnd = op.paymaster_and_data
            verification = max(estimate.paymaster_verification_gas_limit, int.from_bytes(pnd[20:36], "big"))
            post_op = max(estimate.paymaster_post_op_gas_limit, int.from_bytes(pnd[36:52], "big"))
            op = msgspec.structs.replace(
                op, paymaster_and_data=_with_paymaster_gas(pnd, verification, post_op)
            )
    if paymaster is not None and chain_id is not None:
        final = await paymaster.final_data(op, entry_point=entry_point, chain_id=chain_id)
        op = msgspec.structs.replace(op, paymaster_and_data=final)
    return op.with_signature(b"")
