"""`AgentAccount` smart accounts from Python: counterfactual creation, session keys, operations.

    account = await AgentAccount.counterfactual(rpc, factory=factory_address, owner=owner.address)
    # ...fund account.address; the first operation deploys it through its initCode
    policy = SessionPolicy(valid_until=now + 86400, gas_budget=10**16, permissions=(
        CallPermission.to(escrow, "pay(address,uint256,bytes32)", ArgRule.less_or_equal(1, cap)),
    ))
    await account.install_session_key(session.address, policy, owner=OwnerKey(owner), bundler=bundler)
    result = await account.execute([Call(escrow, 0, data)], signer=SessionKey(session), bundler=bundler)

Policies and the owner's offline approval files are in `_policy`, the account's own ERC-1271 signatures
(ERC-7739) in `_erc7739`; both are re-exported here. A refused operation raises `UserOpRejected` whose
`violation` names the policy that failed.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any, Final

import msgspec
from eth_abi.abi import decode as abi_decode
from eth_abi.abi import encode as abi_encode
from eth_utils.address import to_checksum_address
from eth_utils.crypto import keccak

from ..chain._abi import ContractAbi
from ..chain._artifacts import load_artifact
from ..chain._rpc import Receipt, RevertError, Rpc, TransactionFailed, TxSender
from ._bundler_rpc import UserOpSubmitter
from ._erc7739 import account_typed_data, sign_typed_data_as_account
from ._factory import AgentAccountFactory, clone_code
from ._policy import (
    UNLIMITED_GAS_BUDGET,
    ArgCondition,
    ArgRule,
    CallPermission,
    SessionKeyState,
    SessionPolicy,
    SignedSessionKeyInstall,
    SignedSessionKeyRevoke,
    StoredArgRule,
    _SignedFile,
    abi_word,
    install_typed_data,
    revoke_typed_data,
    sign_install_offline,
    sign_revoke_offline,
)
from ._self_bundler import UserOpResult
from ._signers import NonceLanes, OwnerKey, SessionKey
from ._userop import (
    ENTRYPOINT_V07,
    SESSION_SIGNATURE_LENGTH,
    AccountError,
    Call,
    PackedUserOperation,
    PolicyViolation,
    SessionPolicyKind,
    UserOpRejected,
    UserOpSigner,
    encode_execute,
)
from ._userop_fill import Sponsor, fill_user_op

__all__ = [
    "AgentAccount",
    "AgentAccountFactory",
    "ArgCondition",
    "ArgRule",
    "CallPermission",
    "SessionKeyState",
    "SessionPolicy",
    "SignedSessionKeyInstall",
    "SignedSessionKeyRevoke",
    "StoredArgRule",
    "UNLIMITED_GAS_BUDGET",
    "abi_word",
    "account_typed_data",
    "install_typed_data",
    "revoke_typed_data",
    "sign_install_offline",
    "sign_revoke_offline",
    "sign_typed_data_as_account",
]


#: Verification gas limits. Measured minimums (tests/bench, anvil): owner 27k; session key with every policy
#: 64k for one call, +6k per further call on a warm permission (a cold one with rules costs up to ~25k more);
#: deployment through the factory adds 142k.
OWNER_VERIFICATION_GAS: Final = 60_000
SESSION_VERIFICATION_GAS: Final = 100_000
SESSION_VERIFICATION_GAS_PER_CALL: Final = 25_000
DEPLOY_VERIFICATION_GAS: Final = 200_000
_PRIORITY_FEE: Final = 10**9
_POLICY_TYPE: Final = (
    "(uint48,uint48,uint32,uint48,uint32,uint128,(address,bytes4,uint128,(uint8,uint32,bytes32[])[])[])"
)
_INSTALLED_TOPIC: Final = "0x" + keccak(text=f"SessionKeyInstalled(address,uint64,{_POLICY_TYPE})").hex()
_ERC1271_MAGIC: Final = keccak(text="isValidSignature(bytes32,bytes)")[:4]


# ---------------------------------------------------------------------------------------------- contracts


def _account_abi() -> ContractAbi:
    return ContractAbi(load_artifact("AgentAccount").abi)


class AgentAccount:
    """Client of one `AgentAccount`: reads its keys, builds, signs and submits its operations.

    Concurrent `execute` calls each take their own nonce lane (`NonceLanes`), so they never collide; while the
    account is not deployed yet, the first operation carries the initCode and the others wait for it to land.
    """

    def __init__(
        self,
        rpc: Rpc,
        address: str,
        *,
        chain_id: int,
        entry_point: str = ENTRYPOINT_V07,
        init_code: bytes = b"",
        implementation: str | None = None,
        lanes: NonceLanes | None = None,
    ) -> None:
        self.rpc, self.chain_id = rpc, chain_id
        self.address = to_checksum_address(address)
        self.entry_point = to_checksum_address(entry_point)
        self.init_code = init_code
        self._implementation = implementation
        self.lanes = lanes or NonceLanes(rpc, self.address, entry_point=self.entry_point)
        self._abi = _account_abi()
        self._deployed = not init_code
        self._deploying = asyncio.Lock()

    @classmethod
    async def counterfactual(
        cls, rpc: Rpc, *, factory: str, owner: str, salt: int = 0, entry_point: str = ENTRYPOINT_V07
    ) -> AgentAccount:
        """The account `factory` deploys for `owner` and `salt`, deployed or not."""
        f = AgentAccountFactory(rpc, factory)
        address = await f.get_address(owner, salt)
        return cls(
            rpc,
            address,
            chain_id=await rpc.chain_id(),
            entry_point=entry_point,
            init_code=f.init_code(owner, salt),
            implementation=await f.implementation(),
        )

    # -- reads ---------------------------------------------------------------------------------------------

    async def _view(self, name: str, *args: Any) -> tuple[Any, ...]:
        return self._abi.decode(name, await self.rpc.call(self.address, self._abi.encode(name, *args)))

    async def is_deployed(self) -> bool:
        if not self._deployed:
            self._deployed = len(await self.rpc.get_code(self.address)) > 0
        return self._deployed

    async def owner(self) -> str:
        (owner,) = await self._view("signer")
        return to_checksum_address(owner)

    async def session_keys(self) -> list[str]:
        (keys,) = await self._view("sessionKeys")
        return [to_checksum_address(k) for k in keys]

    async def session_key(self, key: str) -> SessionKeyState:
        ((state),) = await self._view("sessionKey", to_checksum_address(key))
        names = SessionKeyState.__struct_fields__
        return SessionKeyState(**{name: int(v) for name, v in zip(names, state, strict=True)})

    async def call_permission(
        self, key: str, target: str, selector: str
    ) -> tuple[bool, int, tuple[StoredArgRule, ...]]:
        allowed, limit, rules = await self._view(
            "callPermission",
            to_checksum_address(key),
            to_checksum_address(target),
            bytes.fromhex(selector[2:]),
        )
        return (
            bool(allowed),
            int(limit),
            tuple(StoredArgRule(ArgCondition(int(c)), int(o), "0x" + bytes(v).hex()) for c, o, v in rules),
        )

    async def session_policy(self, key: str) -> SessionPolicy | None:
        """The policy `key` is installed with (from its `SessionKeyInstalled` event); None if absent."""
        state = await self.session_key(key)
        if not state.installed:
            return None
        logs = await self.rpc.request(
            "eth_getLogs",
            [
                {
                    "address": self.address,
                    "fromBlock": "0x0",
                    "toBlock": "latest",
                    "topics": [
                        _INSTALLED_TOPIC,
                        "0x" + abi_encode(["address"], [to_checksum_address(key)]).hex(),
                        "0x" + state.id.to_bytes(32, "big").hex(),
                    ],
                }
            ],
        )
        if not logs:
            return None
        (policy,) = abi_decode([_POLICY_TYPE], bytes.fromhex(logs[-1]["data"][2:]))
        return SessionPolicy.from_abi(policy)

    async def is_valid_signature(self, digest: bytes, signature: bytes) -> bool:
        """Whether the account's ERC-1271 `isValidSignature` accepts `signature` for `digest`."""
        try:
            (magic,) = await self._view("isValidSignature", digest, signature)
        except RevertError:
            return False
        return bytes(magic) == _ERC1271_MAGIC

    async def approval_nonce_used(self, nonce: int) -> bool:
        (used,) = await self._view("ownerApprovalNonceUsed", nonce)
        return bool(used)

    async def hash_install_session_key(
        self, key: str, policy: SessionPolicy, nonce: int, deadline: int
    ) -> bytes:
        """The on-chain digest of an install approval: `typed_data_digest(install_typed_data(...))`."""
        (digest,) = await self._view(
            "hashInstallSessionKey", to_checksum_address(key), policy.abi(), nonce, deadline
        )
        return bytes(digest)

    async def deploy(self, relayer: TxSender) -> Receipt | None:
        """Deploy a counterfactual account from any relayer, through its factory; None if already deployed.

        Anyone may: the owner is part of the CREATE2 salt, so the address can only ever hold this owner's
        account. Needed before the account signs anything by ERC-1271 (an escrow grant, a relayed
        `installSessionKeyWithSig`), which a first UserOperation's initCode would otherwise do.
        """
        if await self.is_deployed():
            return None
        if len(self.init_code) < 20:
            raise AccountError(
                "the account is not deployed and its initCode is unknown", code="account_unknown"
            )
        factory, data = to_checksum_address("0x" + self.init_code[:20].hex()), self.init_code[20:]
        gas = int(
            await self.rpc.request(
                "eth_estimateGas", [{"from": relayer.address, "to": factory, "data": "0x" + data.hex()}]
            ),
            16,
        )
        receipt = await relayer.transact(factory, data, gas=gas + gas // 5)
        self._deployed = True
        return receipt

    # -- operations ----------------------------------------------------------------------------------------

    async def _estimate_call_gas(self, call_data: bytes) -> int:
        """Gas of `execute(...)` run as a self-call (the account may call itself), from `eth_estimateGas`.
        An undeployed account is given its clone code through a state override."""
        tx = {"from": self.address, "to": self.address, "data": "0x" + call_data.hex()}
        params: list[Any] = [tx, "latest"]
        if not await self.is_deployed():
            if self._implementation is None:
                raise AccountError("the account is not deployed and its implementation is unknown")
            params.append({self.address: {"code": clone_code(self._implementation)}})
        try:
            gas = int(await self.rpc.request("eth_estimateGas", params), 16)
        except RevertError as exc:
            raise AccountError(
                f"the calls revert in simulation (0x{exc.data.hex()}); pass call_gas_limit to send anyway",
                code="userop_calls_revert",
            ) from None
        # The estimate includes the 21k intrinsic cost a nested call does not pay; keep a margin for the
        # 63/64 rule and warm/cold differences.
        return max(gas - 21_000, 0) * 6 // 5 + 10_000

    async def prepare(
        self,
        calls: Sequence[Call],
        *,
        signer: UserOpSigner,
        nonce: int,
        call_gas_limit: int | None = None,
        verification_gas_limit: int | None = None,
        max_fee_per_gas: int | None = None,
        max_priority_fee_per_gas: int = _PRIORITY_FEE,
        with_init_code: bool | None = None,
        bundler: UserOpSubmitter | None = None,
        paymaster: Sponsor | None = None,
    ) -> PackedUserOperation:
        """A signed operation running `calls` as one atomic ERC-7821 batch, with gas limits and fees set.

        With a standard bundler (`BundlerRpc`), its `eth_estimateUserOperationGas` and fee suggestions replace
        the local estimates; with a `paymaster` (ERC-7677), the operation carries its sponsorship."""
        fees_given, call_gas_given = max_fee_per_gas is not None, call_gas_limit is not None
        verification_gas_given = verification_gas_limit is not None
        call_data = encode_execute(calls)
        if with_init_code is None:
            with_init_code = not await self.is_deployed()
        if call_gas_limit is None:
            # A standard bundler estimates it in its own simulation (`fill_user_op`).
            bundler_estimates = hasattr(bundler, "estimate")
            call_gas_limit = 0 if bundler_estimates else await self._estimate_call_gas(call_data)
        if verification_gas_limit is None:
            session = isinstance(signer, SessionKey)
            verification_gas_limit = (
                SESSION_VERIFICATION_GAS + SESSION_VERIFICATION_GAS_PER_CALL * len(calls)
                if session
                else OWNER_VERIFICATION_GAS
            )
            if with_init_code:
                verification_gas_limit += DEPLOY_VERIFICATION_GAS
        head = await self.rpc.request("eth_getBlockByNumber", ["latest", False])
        timestamp = int(head["timestamp"], 16)
        if max_fee_per_gas is None:
            max_fee_per_gas = 2 * int(head.get("baseFeePerGas", "0x0"), 16) + max_priority_fee_per_gas
        op = PackedUserOperation(
            sender=self.address,
            nonce=nonce,
            init_code=self.init_code if with_init_code else b"",
            call_data=call_data,
            verification_gas_limit=verification_gas_limit,
            call_gas_limit=call_gas_limit,
            max_priority_fee_per_gas=min(max_priority_fee_per_gas, max_fee_per_gas),
            max_fee_per_gas=max_fee_per_gas,
        )
        # preVerificationGas reimburses the relayer for what the EntryPoint cannot meter: its share of the
        # transaction's intrinsic cost and the operation's calldata (priced with a dummy signature).
        placeholder = op.with_signature(
            b"\x01" * (SESSION_SIGNATURE_LENGTH if isinstance(signer, SessionKey) else 65)
        )
        encoded = abi_encode(
            ["(address,uint256,bytes,bytes,bytes32,uint256,bytes32,bytes,bytes)"], [placeholder.packed()]
        )
        calldata_gas = sum(16 if b else 4 for b in encoded)
        op = msgspec.structs.replace(op, pre_verification_gas=21_000 + calldata_gas + 5_000)
        if paymaster is not None or hasattr(bundler, "estimate"):
            op = await fill_user_op(
                op,
                signer=signer,
                timestamp=timestamp,
                bundler=bundler,
                paymaster=paymaster,
                fees_given=fees_given,
                estimate_call_gas=not call_gas_given,
                estimate_verification_gas=not verification_gas_given,
            )
        return op.signed(signer, chain_id=self.chain_id, timestamp=timestamp, entry_point=self.entry_point)

    async def execute(
        self,
        calls: Sequence[Call],
        *,
        signer: UserOpSigner,
        bundler: UserOpSubmitter,
        call_gas_limit: int | None = None,
        verification_gas_limit: int | None = None,
        max_fee_per_gas: int | None = None,
        paymaster: Sponsor | None = None,
    ) -> UserOpResult:
        """Run `calls` atomically as one operation signed by `signer` (owner or session key).

        `bundler` is our own `Bundler` or a standard one (`BundlerRpc`); `paymaster` (ERC-7677) sponsors the
        gas. Returns once it landed; `result.success` is false if a call reverted (then none took effect).
        Raises `UserOpRejected` if validation refused it (it never ran): for a session key, `violation` says
        which policy failed.
        """
        limits = (call_gas_limit, verification_gas_limit, max_fee_per_gas)
        if not await self.is_deployed():
            async with self._deploying:
                if not await self.is_deployed():
                    result = await self._execute(calls, signer, bundler, limits, paymaster, True)
                    self._deployed = True
                    return result
        return await self._execute(calls, signer, bundler, limits, paymaster, False)

    async def _execute(
        self,
        calls: Sequence[Call],
        signer: UserOpSigner,
        bundler: UserOpSubmitter,
        limits: tuple[int | None, int | None, int | None],
        paymaster: Sponsor | None,
        with_init_code: bool,
    ) -> UserOpResult:
        call_gas_limit, verification_gas_limit, max_fee_per_gas = limits
        async with self.lanes.lane() as lane:
            try:
                op = await self.prepare(
                    calls,
                    signer=signer,
                    nonce=lane.nonce,
                    call_gas_limit=call_gas_limit,
                    verification_gas_limit=verification_gas_limit,
                    max_fee_per_gas=max_fee_per_gas,
                    with_init_code=with_init_code,
                    bundler=bundler,
                    paymaster=paymaster,
                )
                result = await bundler.send(op)
            except UserOpRejected as rejected:
                lane.unused()
                if (
                    isinstance(signer, SessionKey)
                    and rejected.violation is None
                    and rejected.reason.startswith("AA22")
                ):
                    raise await self._explain_time(rejected, signer) from None
                raise
            lane.used()
            return result

    async def _explain_time(self, rejected: UserOpRejected, signer: SessionKey) -> UserOpRejected:
        """`AA22` for a session key: its validity period, or the rate window it claimed."""
        state = await self.session_key(signer.address)
        now = await self.rpc.block_timestamp()
        policy = SessionPolicyKind.RATE_LIMIT if state.in_validity(now) else SessionPolicyKind.TIMESTAMP
        return UserOpRejected(
            rejected.reason,
            op_index=rejected.op_index,
            inner=rejected.inner,
            violation=PolicyViolation(key=signer.address, policy=policy),
            user_op_hash=rejected.user_op_hash,
        )

    # -- session keys (owner online) -----------------------------------------------------------------------

    def install_call(self, key: str, policy: SessionPolicy) -> Call:
        """The self-call installing `key`: put it in an owner-signed batch (alone or with other calls)."""
        return Call(
            self.address, 0, self._abi.encode("installSessionKey", to_checksum_address(key), policy.abi())
        )

    def revoke_call(self, key: str) -> Call:
        return Call(self.address, 0, self._abi.encode("revokeSessionKey", to_checksum_address(key)))

    async def install_session_key(
        self, key: str, policy: SessionPolicy, *, owner: OwnerKey, bundler: UserOpSubmitter
    ) -> UserOpResult:
        """Install (or replace) `key` with an operation the owner signs."""
        return (
            await self.execute([self.install_call(key, policy)], signer=owner, bundler=bundler)
        ).raise_for_status()

    async def revoke_session_key(
        self, key: str, *, owner: OwnerKey, bundler: UserOpSubmitter
    ) -> UserOpResult:
        """Revoke `key` with an operation the owner signs; effective for the next operation."""
        return (await self.execute([self.revoke_call(key)], signer=owner, bundler=bundler)).raise_for_status()

    # -- session keys (owner offline) ----------------------------------------------------------------------

    async def relay_install(self, signed: SignedSessionKeyInstall, relayer: TxSender) -> Receipt:
        """Send an offline-signed install approval from any relayer (the account must be deployed)."""
        self._check_file(signed)
        data = self._abi.encode(
            "installSessionKeyWithSig",
            signed.key,
            signed.policy.abi(),
            signed.nonce,
            signed.deadline,
            bytes.fromhex(signed.signature[2:]),
        )
        return await self._relay(relayer, data)

    async def relay_revoke(self, signed: SignedSessionKeyRevoke, relayer: TxSender) -> Receipt:
        """Send an offline-signed revoke approval from any relayer."""
        self._check_file(signed)
        data = self._abi.encode(
            "revokeSessionKeyWithSig",
            signed.key,
            signed.nonce,
            signed.deadline,
            bytes.fromhex(signed.signature[2:]),
        )
        return await self._relay(relayer, data)

    def _check_file(self, signed: _SignedFile) -> None:
        if to_checksum_address(signed.account) != self.address or signed.chain_id != self.chain_id:
            raise AccountError(
                f"approval is for {signed.account} on chain {signed.chain_id}, not this account",
                code="approval_wrong_account",
            )

    async def _relay(self, relayer: TxSender, data: bytes) -> Receipt:
        tx = {"from": relayer.address, "to": self.address, "data": "0x" + data.hex()}
        try:
            gas = int(await self.rpc.request("eth_estimateGas", [tx]), 16)
        except RevertError as exc:
            decoded = self._abi.decode_error(exc.data)
            name = decoded[0] if decoded else f"0x{exc.data.hex()}"
            raise AccountError(
                f"relaying the approval would revert: {name}", code="approval_refused"
            ) from None
        tx_hash = await relayer.send(self.address, data, gas=gas + gas // 5)
        receipt = await self.rpc.wait_for_receipt(tx_hash)
        if not receipt.ok:
            raise TransactionFailed(f"approval transaction {tx_hash} reverted", tx_hash=tx_hash)
        return receipt
