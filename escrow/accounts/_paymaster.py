"""`AgentPaymaster` from Python: sponsorship terms, the sponsor's signature, and ERC-7677 clients.

    sponsor = SponsorService(paymaster=address, signer=sponsor_key, chain_id=31337, spend_limit=10**17)
    await account.execute(calls, signer=session_key, bundler=bundler, paymaster=sponsor)  # verifying
    await account.execute(calls, signer=session_key, bundler=bundler, paymaster=sponsor.token(usdc, price))

`SponsorService` decides and signs in process; `PaymasterRpc` asks a remote ERC-7677 paymaster service
(`pm_getPaymasterStubData`, then `pm_getPaymasterData`) such as `gateway._paymaster_app`. Both are `Sponsor`s:
`AgentAccount.prepare` puts the stub in the operation, lets the bundler estimate gas, then asks for the final,
signed `paymasterAndData`, which commits to those gas values.

`paymasterData` is `mode (1) ++ validAfter (6) ++ validUntil (6) ++ spendLimit (16) ++ token (20) ++
tokenPerNative (32) ++ signature (65)`; the signature is the sponsor key's over the EIP-712 `Sponsorship` of
`AgentPaymaster.sol` (domain `AgentPaymaster`/`1`, the paymaster's address and chain).
"""

from __future__ import annotations

import enum
import itertools
import time
from collections.abc import Callable, Collection, Mapping
from typing import Any, Final

import httpx
import msgspec
from eth_abi.abi import decode as abi_decode
from eth_utils.address import to_checksum_address
from eth_utils.crypto import keccak

from x402 import Signer, typed_data_digest

from ..chain._rpc import Rpc
from ._bundler_rpc import user_op_to_json
from ._userop import AccountError, PackedUserOperation
from ._userop_fill import DUMMY_ECDSA

__all__ = [
    "PAYMASTER_POST_OP_GAS",
    "PAYMASTER_VERIFICATION_GAS",
    "PaymasterMode",
    "PaymasterRefused",
    "PaymasterRpc",
    "SponsorService",
    "SponsorTerms",
    "decode_paymaster_and_data",
    "paymaster_deposit",
    "sponsored_spent",
    "sponsorship_typed_data",
]

#: Gas limits of the paymaster's own steps, generous for both modes: token mode's validation moves tokens (a
#: cold `transferFrom`), its postOp refunds them. A bundler's estimate replaces them.
PAYMASTER_VERIFICATION_GAS: Final = 150_000
PAYMASTER_POST_OP_GAS: Final = 80_000
TERMS_LENGTH: Final = 81


class PaymasterMode(enum.IntEnum):
    """`AgentPaymaster.Mode`: who pays the gas."""

    VERIFYING = 0  # the sponsor's deposit, within a spend limit per account
    TOKEN = 1  # the account, in the payment token, at a price the sponsor signs


class PaymasterRefused(AccountError):
    """The paymaster service will not sponsor this operation (policy, unknown account, bad request)."""

    code = "paymaster_refused"
    status_hint = 402


class SponsorTerms(msgspec.Struct, frozen=True, kw_only=True):
    """What the sponsor signs beside the operation (`AgentPaymaster.Terms`)."""

    mode: PaymasterMode
    valid_after: int = 0
    valid_until: int = 0
    spend_limit: int = 0  # verifying: the account's cumulative limit, wei
    token: str = "0x" + "00" * 20  # token mode: the payment token
    token_per_native: int = 0  # token mode: token units per 1e18 wei

    def encode(self) -> bytes:
        return (
            bytes([int(self.mode)])
            + self.valid_after.to_bytes(6, "big")
            + self.valid_until.to_bytes(6, "big")
            + self.spend_limit.to_bytes(16, "big")
            + bytes.fromhex(self.token[2:])
            + self.token_per_native.to_bytes(32, "big")
        )

    @classmethod
    def decode(cls, data: bytes) -> SponsorTerms:
        if len(data) < TERMS_LENGTH:
            raise ValueError(f"paymaster terms are {TERMS_LENGTH} bytes, got {len(data)}")
        return cls(
            mode=PaymasterMode(data[0]),
            valid_after=int.from_bytes(data[1:7], "big"),
            valid_until=int.from_bytes(data[7:13], "big"),
            spend_limit=int.from_bytes(data[13:29], "big"),
            token=to_checksum_address("0x" + data[29:49].hex()),
            token_per_native=int.from_bytes(data[49:81], "big"),
        )


def decode_paymaster_and_data(pnd: bytes) -> tuple[str, int, int, SponsorTerms, bytes]:
    """`(paymaster, verificationGasLimit, postOpGasLimit, terms, signature)` of an AgentPaymaster op."""
    if len(pnd) < 52 + TERMS_LENGTH:
        raise ValueError("not AgentPaymaster paymasterAndData")
    return (
        to_checksum_address("0x" + pnd[:20].hex()),
        int.from_bytes(pnd[20:36], "big"),
        int.from_bytes(pnd[36:52], "big"),
        SponsorTerms.decode(pnd[52 : 52 + TERMS_LENGTH]),
        pnd[52 + TERMS_LENGTH :],
    )


_OPERATION_FIELDS: Final = [
    {"name": "sender", "type": "address"},
    {"name": "nonce", "type": "uint256"},
    {"name": "initCode", "type": "bytes"},
    {"name": "callData", "type": "bytes"},
    {"name": "accountGasLimits", "type": "bytes32"},
    {"name": "preVerificationGas", "type": "uint256"},
    {"name": "gasFees", "type": "bytes32"},
    {"name": "paymasterVerificationGasLimit", "type": "uint256"},
    {"name": "paymasterPostOpGasLimit", "type": "uint256"},
]


def sponsorship_typed_data(
    op: PackedUserOperation, terms: SponsorTerms, *, chain_id: int, paymaster: str
) -> dict[str, Any]:
    """The EIP-712 `Sponsorship` the sponsor key signs (gas limits taken from `op.paymaster_and_data`)."""
    pnd = op.paymaster_and_data
    return {
        "types": {
            "EIP712Domain": [
                {"name": "name", "type": "string"},
                {"name": "version", "type": "string"},
                {"name": "chainId", "type": "uint256"},
                {"name": "verifyingContract", "type": "address"},
            ],
            "Sponsorship": [
                {"name": "operation", "type": "Operation"},
                {"name": "mode", "type": "uint8"},
                {"name": "validAfter", "type": "uint48"},
                {"name": "validUntil", "type": "uint48"},
                {"name": "spendLimit", "type": "uint128"},
                {"name": "token", "type": "address"},
                {"name": "tokenPerNative", "type": "uint256"},
            ],
            "Operation": _OPERATION_FIELDS,
        },
        "primaryType": "Sponsorship",
        "domain": {
            "name": "AgentPaymaster",
            "version": "1",
            "chainId": chain_id,
            "verifyingContract": to_checksum_address(paymaster),
        },
        "message": {
            "operation": {
                "sender": to_checksum_address(op.sender),
                "nonce": op.nonce,
                "initCode": op.init_code,
                "callData": op.call_data,
                "accountGasLimits": op.account_gas_limits,
                "preVerificationGas": op.pre_verification_gas,
                "gasFees": op.gas_fees,
                "paymasterVerificationGasLimit": int.from_bytes(pnd[20:36], "big"),
                "paymasterPostOpGasLimit": int.from_bytes(pnd[36:52], "big"),
            },
            "mode": int(terms.mode),
            "validAfter": terms.valid_after,
            "validUntil": terms.valid_until,
            "spendLimit": terms.spend_limit,
            "token": to_checksum_address(terms.token),
            "tokenPerNative": terms.token_per_native,
        },
    }


def _header(paymaster: str, verification_gas: int, post_op_gas: int) -> bytes:
    return (
        bytes.fromhex(paymaster[2:]) + verification_gas.to_bytes(16, "big") + post_op_gas.to_bytes(16, "big")
    )


class SponsorService:
    """The sponsor's decisions and signatures, in process: a `Sponsor` for `AgentAccount`, and the engine of
    the ERC-7677 app.

    Verifying mode signs `spend_limit` (or `limits[account]`) as the account's cumulative limit, valid for
    `validity` seconds. `token(token, price)` returns a sibling in token mode at `price` token units per ETH.
    `allowed` (if given) is the set of accounts it sponsors at all.
    """

    def __init__(
        self,
        *,
        paymaster: str,
        signer: Signer,
        chain_id: int,
        spend_limit: int = 10**17,
        limits: Mapping[str, int] | None = None,
        allowed: Collection[str] | None = None,
        validity: int = 600,
        mode: PaymasterMode = PaymasterMode.VERIFYING,
        token: str | None = None,
        token_per_native: int = 0,
        verification_gas: int = PAYMASTER_VERIFICATION_GAS,
        post_op_gas: int = PAYMASTER_POST_OP_GAS,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if mode == PaymasterMode.TOKEN and (token is None or token_per_native <= 0):
            raise ValueError("token mode needs a token and a positive price")
        self.paymaster = to_checksum_address(paymaster)
        self.signer, self.chain_id, self.spend_limit = signer, chain_id, spend_limit
        self.limits: dict[str, int] = {to_checksum_address(k): v for k, v in (limits or {}).items()}
        self.allowed = None if allowed is None else {to_checksum_address(a) for a in allowed}
        self.validity, self.mode = validity, mode
        self.token_address = to_checksum_address(token) if token else "0x" + "00" * 20
        self.token_per_native = token_per_native
        self.verification_gas, self.post_op_gas, self.clock = verification_gas, post_op_gas, clock

    def token(self, token: str, token_per_native: int) -> SponsorService:
        """The same sponsor in token mode: the account pays in `token` at `token_per_native` units per ETH."""
        return SponsorService(
            paymaster=self.paymaster,
            signer=self.signer,
            chain_id=self.chain_id,
            spend_limit=self.spend_limit,
            limits=self.limits,
            allowed=self.allowed,
            validity=self.validity,
            mode=PaymasterMode.TOKEN,
            token=token,
            token_per_native=token_per_native,
            verification_gas=self.verification_gas,
            post_op_gas=self.post_op_gas,
            clock=self.clock,
        )

    def terms_for(self, op: PackedUserOperation, *, mode: PaymasterMode | None = None) -> SponsorTerms:
        """The terms this sponsor grants `op`; `PaymasterRefused` when it sponsors no such account."""
        sender = to_checksum_address(op.sender)
        if self.allowed is not None and sender not in self.allowed:
            raise PaymasterRefused(
                f"this paymaster does not sponsor {sender}", code="paymaster_account_unknown"
            )
        mode = self.mode if mode is None else mode
        valid_until = int(self.clock()) + self.validity
        if mode == PaymasterMode.TOKEN:
            if self.token_per_native <= 0:
                raise PaymasterRefused("this paymaster has no token price", code="paymaster_no_token")
            return SponsorTerms(
                mode=mode,
                valid_until=valid_until,
                token=self.token_address,
                token_per_native=self.token_per_native,
            )
        return SponsorTerms(
            mode=mode, valid_until=valid_until, spend_limit=self.limits.get(sender, self.spend_limit)
        )

    def check_request(self, entry_point: str, chain_id: int) -> None:
        if chain_id != self.chain_id:
            raise PaymasterRefused(
                f"this paymaster serves chain {self.chain_id}, not {chain_id}", code="paymaster_wrong_chain"
            )
        if to_checksum_address(entry_point) != to_checksum_address(
            "0x0000000071727De22E5E9d8BAf0edAc6f37da032"
        ):
            raise PaymasterRefused(
                f"unsupported EntryPoint {entry_point}", code="paymaster_wrong_entry_point"
            )

    def stub(self, op: PackedUserOperation, *, mode: PaymasterMode | None = None) -> bytes:
        """`paymasterAndData` with the real terms and a dummy signature: same length and validation path."""
        terms = self.terms_for(op, mode=mode)
        return _header(self.paymaster, self.verification_gas, self.post_op_gas) + terms.encode() + DUMMY_ECDSA

    def sign(self, op: PackedUserOperation, *, mode: PaymasterMode | None = None) -> bytes:
        """The final `paymasterAndData`: the gas limits `op` carries (or ours), the terms, the signature."""
        pnd = op.paymaster_and_data
        if len(pnd) >= 52 and pnd[:20] == bytes.fromhex(self.paymaster[2:]):
            header = pnd[:52]
        else:
            header = _header(self.paymaster, self.verification_gas, self.post_op_gas)
        op = msgspec.structs.replace(op, paymaster_and_data=header)
        terms = self.terms_for(op, mode=mode)
        digest = typed_data_digest(
            sponsorship_typed_data(op, terms, chain_id=self.chain_id, paymaster=self.paymaster)
        )
        return header + terms.encode() + self.signer.sign_hash(digest)

    async def stub_data(self, op: PackedUserOperation, *, entry_point: str, chain_id: int) -> bytes:
        self.check_request(entry_point, chain_id)
        return self.stub(op)

    async def final_data(self, op: PackedUserOperation, *, entry_point: str, chain_id: int) -> bytes:
        self.check_request(entry_point, chain_id)
        return self.sign(op)


class PaymasterRpc:
    """A remote ERC-7677 paymaster web service. `context` is passed as is (for ours: `{"mode": "token"}`)."""

    def __init__(
        self,
        url: str,
        *,
        context: Mapping[str, Any] | None = None,
        client: httpx.AsyncClient | None = None,
        timeout: float = 10.0,
    ) -> None:
        self.url, self.context = url, dict(context or {})
        self._own_client = client is None
        self._client = client or httpx.AsyncClient(timeout=timeout)
        self._ids = itertools.count(1)

    async def aclose(self) -> None:
        if self._own_client:
            await self._client.aclose()

    async def _call(
        self, method: str, op: PackedUserOperation, entry_point: str, chain_id: int
    ) -> dict[str, Any]:
        params = [user_op_to_json(op), to_checksum_address(entry_point), hex(chain_id), self.context]
        body = {"jsonrpc": "2.0", "id": next(self._ids), "method": method, "params": params}
        try:
            resp = await self._client.post(self.url, json=body)
            reply = resp.json()
        except httpx.HTTPError as exc:
            raise PaymasterRefused(
                f"{method}: paymaster unreachable: {exc!r}", code="paymaster_unreachable"
            ) from None
        except ValueError:
            raise PaymasterRefused(
                f"{method}: HTTP {resp.status_code} without JSON", code="paymaster_bad_reply"
            ) from None
        if not isinstance(reply, dict):
            raise PaymasterRefused(f"{method}: malformed reply", code="paymaster_bad_reply")
        if reply.get("error") is not None:
            error = reply["error"] if isinstance(reply["error"], dict) else {"message": str(reply["error"])}
            raw = error.get("data")
            data: dict[str, Any] = raw if isinstance(raw, dict) else {}
            raise PaymasterRefused(
                f"{method}: {error.get('message')}", code=str(data.get("code") or "paymaster_refused")
            )
        result = reply.get("result")
        if not isinstance(result, dict) or "paymaster" not in result:
            raise PaymasterRefused(f"{method}: malformed result {result!r}", code="paymaster_bad_reply")
        return result

    async def stub_data(self, op: PackedUserOperation, *, entry_point: str, chain_id: int) -> bytes:
        result = await self._call("pm_getPaymasterStubData", op, entry_point, chain_id)
        try:
            return _header(
                to_checksum_address(result["paymaster"]),
                int(result.get("paymasterVerificationGasLimit", "0x0"), 16),
                int(result.get("paymasterPostOpGasLimit", "0x0"), 16),
            ) + bytes.fromhex(str(result.get("paymasterData", "0x"))[2:])
        except (TypeError, ValueError) as exc:
            raise PaymasterRefused(f"malformed stub data: {exc}", code="paymaster_bad_reply") from None

    async def final_data(self, op: PackedUserOperation, *, entry_point: str, chain_id: int) -> bytes:
        result = await self._call("pm_getPaymasterData", op, entry_point, chain_id)
        pnd = op.paymaster_and_data
        try:
            paymaster = to_checksum_address(result["paymaster"])
            data = bytes.fromhex(str(result.get("paymasterData", "0x"))[2:])
        except (TypeError, ValueError) as exc:
            raise PaymasterRefused(f"malformed paymaster data: {exc}", code="paymaster_bad_reply") from None
        return bytes.fromhex(paymaster[2:]) + pnd[20:52] + data


# ---------------------------------------------------------------------------------------------- reads

_BALANCE_OF: Final = keccak(text="balanceOf(address)")[:4]
_SPENT: Final = keccak(text="sponsoredSpent(address)")[:4]


async def paymaster_deposit(
    rpc: Rpc, paymaster: str, *, entry_point: str = "0x0000000071727De22E5E9d8BAf0edAc6f37da032"
) -> int:
    """The paymaster's deposit at the EntryPoint (wei): what it sponsors from."""
    data = _BALANCE_OF + bytes(12) + bytes.fromhex(to_checksum_address(paymaster)[2:])
    (value,) = abi_decode(["uint256"], await rpc.call(entry_point, data))
    return int(value)


async def sponsored_spent(rpc: Rpc, paymaster: str, account: str) -> int:
    """Wei counted against `account`'s verifying-mode spend limit."""
    data = _SPENT + bytes(12) + bytes.fromhex(to_checksum_address(account)[2:])
    (value,) = abi_decode(["uint256"], await rpc.call(paymaster, data))
    return int(value)
