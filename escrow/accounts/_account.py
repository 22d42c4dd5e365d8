"""`AgentAccount` smart accounts from Python: counterfactual creation, session keys, operations.

    account = await AgentAccount.counterfactual(rpc, factory=factory_address, owner=owner.address)
    # ...fund account.address; the first operation deploys it through its initCode
    policy = SessionPolicy(valid_until=now + 86400, gas_budget=10**16, permissions=(
        CallPermission.to(escrow, "pay(address,uint256,bytes32)", ArgRule.less_or_equal(1, cap)),
    ))
    await account.install_session_key(session.address, policy, owner=OwnerKey(owner), bundler=bundler)
    result = await account.execute([Call(escrow, 0, data)], signer=SessionKey(session), bundler=bundler)

The owner key may stay offline: `sign_install_offline` / `sign_revoke_offline` produce a JSON file (EIP-712
`InstallSessionKey` / `RevokeSessionKey` under the account's domain) that anyone relays with
`AgentAccount.relay_install` / `relay_revoke`.

Every policy of a session key must pass for each operation it signs (`AccountSessionKeys.sol` has the exact
semantics); a refused operation raises `UserOpRejected` whose `violation` names the policy that failed.

The account signs for itself (ERC-1271: an escrow grant, an EIP-3009 deposit authorization) with its owner
key through ERC-7739: `sign_typed_data_as_account` nests the app's EIP-712 message in a `TypedDataSign`
struct bound to the account, offline too. Session keys never pass the account's `isValidSignature`.
"""

from __future__ import annotations

import asyncio
import enum
import secrets
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Final, TypeVar

import msgspec
from eth_abi.abi import decode as abi_decode
from eth_abi.abi import encode as abi_encode
from eth_account.messages import encode_typed_data
from eth_utils.address import is_address, to_checksum_address
from eth_utils.crypto import keccak

from x402 import Signer, typed_data_digest

from ..chain._abi import ContractAbi
from ..chain._artifacts import load_artifact
from ..chain._rpc import Receipt, RevertError, Rpc, TransactionFailed, TxSender
from ._bundler_rpc import UserOpSubmitter
from ._userop import (
    ENTRYPOINT_V07,
    SESSION_SIGNATURE_LENGTH,
    AccountError,
    Call,
    NonceLanes,
    OwnerKey,
    PackedUserOperation,
    PolicyViolation,
    SessionKey,
    SessionPolicyKind,
    UserOpRejected,
    UserOpResult,
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

_MAX_UINT: Final = 2**256 - 1
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

Word = int | str | bytes | bool


def abi_word(value: Word) -> str:
    """A value as the 32-byte ABI word a rule compares: ints (and bools) big-endian, addresses left-padded,
    `bytesN` right-padded; a 0x-hex string of 32 bytes is taken as is."""
    if isinstance(value, bool):
        value = int(value)
    if isinstance(value, int):
        if not 0 <= value <= _MAX_UINT:
            raise ValueError(f"{value} does not fit in a uint256 word")
        return "0x" + value.to_bytes(32, "big").hex()
    if isinstance(value, str):
        if is_address(value) and len(value) == 42:
            return "0x" + bytes(12).hex() + value[2:].lower()
        raw = bytes.fromhex(value[2:] if value.startswith("0x") else value)
        if len(raw) != 32:
            raise ValueError("a hex word must be an address or exactly 32 bytes")
        return "0x" + raw.hex()
    if len(value) > 32:
        raise ValueError("bytes longer than a word")
    return "0x" + (value + bytes(32 - len(value))).hex()


def _word_bytes(word: str) -> bytes:
    return bytes.fromhex(word[2:])


# ---------------------------------------------------------------------------------------------- policy types


class ArgCondition(enum.IntEnum):
    """`ArgCondition` in `SessionKeyTypes.sol`: how a rule compares its word (as uint256)."""

    EQUAL = 0
    LESS_OR_EQUAL = 1
    ONE_OF = 2


class ArgRule(msgspec.Struct, frozen=True, kw_only=True, rename="camel"):
    """A rule on the 32-byte word `offset` bytes after a call's selector (argument `i` of a static signature:
    `offset = 32 * i`). `values` are 0x-hex words; exactly one for EQUAL / LESS_OR_EQUAL."""

    condition: ArgCondition
    offset: int
    values: tuple[str, ...]

    def __post_init__(self) -> None:
        if not 0 <= self.offset < 2**32:
            raise ValueError("offset must fit in 32 bits")
        if self.condition == ArgCondition.ONE_OF:
            if not self.values:
                raise ValueError("ONE_OF needs at least one value")
        elif len(self.values) != 1:
            raise ValueError(f"{self.condition.name} takes exactly one value")
        for word in self.values:
            if len(_word_bytes(word)) != 32:
                raise ValueError("rule values must be 32-byte words")

    @classmethod
    def equal(cls, arg: int, value: Word) -> ArgRule:
        """Argument `arg` (0-based, static head slot) equals `value`."""
        return cls(condition=ArgCondition.EQUAL, offset=32 * arg, values=(abi_word(value),))

    @classmethod
    def less_or_equal(cls, arg: int, value: Word) -> ArgRule:
        """Argument `arg` is at most `value` (a per-call cap)."""
        return cls(condition=ArgCondition.LESS_OR_EQUAL, offset=32 * arg, values=(abi_word(value),))

    @classmethod
    def one_of(cls, arg: int, values: Iterable[Word]) -> ArgRule:
        """Argument `arg` is one of `values` (an allow-list)."""
        return cls(condition=ArgCondition.ONE_OF, offset=32 * arg, values=tuple(abi_word(v) for v in values))

    def abi(self) -> tuple[Any, ...]:
        return (int(self.condition), self.offset, [_word_bytes(v) for v in self.values])

    def typed(self) -> dict[str, Any]:
        return {
            "condition": int(self.condition),
            "offset": self.offset,
            "values": [_word_bytes(v) for v in self.values],
        }


def _selector_of(signature_or_selector: str) -> str:
    if signature_or_selector.startswith("0x") and len(signature_or_selector) == 10:
        return signature_or_selector.lower()
    return "0x" + keccak(text=signature_or_selector)[:4].hex()


class CallPermission(msgspec.Struct, frozen=True, kw_only=True, rename="camel"):
    """An allowed `(target, selector)`, with a per-call native value limit and argument rules.
    `selector` `0x00000000` allows calls with empty calldata (plain transfers)."""

    target: str
    selector: str
    value_limit: int = 0
    rules: tuple[ArgRule, ...] = ()

    def __post_init__(self) -> None:
        if not is_address(self.target):
            raise ValueError(f"not an address: {self.target!r}")
        if len(bytes.fromhex(self.selector[2:])) != 4:
            raise ValueError("selector must be 4 bytes of 0x-hex")
        if not 0 <= self.value_limit < 2**128:
            raise ValueError("value_limit must fit in 128 bits")

    @classmethod
    def to(cls, target: str, function: str, *rules: ArgRule, value_limit: int = 0) -> CallPermission:
        """Allow `function` on `target`: a signature (`"transfer(address,uint256)"`) or a 0x selector."""
        return cls(
            target=to_checksum_address(target),
            selector=_selector_of(function),
            value_limit=value_limit,
            rules=rules,
        )

    @classmethod
    def plain_transfer(cls, target: str, *, value_limit: int) -> CallPermission:
        """Native transfers to `target` with empty calldata only (any calldata at all is refused)."""
        return cls(target=to_checksum_address(target), selector="0x00000000", value_limit=value_limit)

    def abi(self) -> tuple[Any, ...]:
        return (
            to_checksum_address(self.target),
            bytes.fromhex(self.selector[2:]),
            self.value_limit,
            [r.abi() for r in self.rules],
        )

    def typed(self) -> dict[str, Any]:
        return {
            "target": to_checksum_address(self.target),
            "selector": bytes.fromhex(self.selector[2:]),
            "valueLimit": self.value_limit,
            "rules": [r.typed() for r in self.rules],
        }


UNLIMITED_GAS_BUDGET: Final = 2**128 - 1
"""The largest `gas_budget`: no cap on what the key's operations may spend on gas, said explicitly."""


class SessionPolicy(msgspec.Struct, frozen=True, kw_only=True, rename="camel"):
    """Everything a session key may do (`SessionPolicy` in `SessionKeyTypes.sol`); 0 means "no limit" for
    `valid_until`, `max_uses` and `interval` (with `max_uses_per_interval`).

    `gas_budget` (wei of worst-case UserOperation cost over the key's life) is required and nonzero, as the
    account requires it at install: a key that bundles its own operations picks their fee rate and collects
    the fees, so a key without a budget could turn the account's ETH into fees paid to itself. Pass
    `UNLIMITED_GAS_BUDGET` only for a key you would trust with the account's whole ETH balance."""

    permissions: tuple[CallPermission, ...]
    gas_budget: int
    valid_after: int = 0
    valid_until: int = 0
    max_uses: int = 0
    interval: int = 0
    max_uses_per_interval: int = 0

    def __post_init__(self) -> None:
        if not self.permissions:
            raise ValueError("a session policy needs at least one permission")
        if self.valid_until and self.valid_until < self.valid_after:
            raise ValueError("valid_until is before valid_after")
        if (self.interval == 0) != (self.max_uses_per_interval == 0):
            raise ValueError("interval and max_uses_per_interval go together")
        if not 1 <= self.gas_budget <= UNLIMITED_GAS_BUDGET:
            raise ValueError(
                f"gas_budget must be in [1, 2**128 - 1] wei, not {self.gas_budget}: a session key"
                " without a gas budget could spend the account's ETH on fees"
            )

    def abi(self) -> tuple[Any, ...]:
        return (
            self.valid_after,
            self.valid_until,
            self.max_uses,
            self.interval,
            self.max_uses_per_interval,
            self.gas_budget,
            [p.abi() for p in self.permissions],
        )

    def typed(self) -> dict[str, Any]:
        return {
            "validAfter": self.valid_after,
            "validUntil": self.valid_until,
            "maxUses": self.max_uses,
            "interval": self.interval,
            "maxUsesPerInterval": self.max_uses_per_interval,
            "gasBudget": self.gas_budget,
            "permissions": [p.typed() for p in self.permissions],
        }

    @classmethod
    def from_abi(cls, value: Sequence[Any]) -> SessionPolicy:
        va, vu, max_uses, interval, per, budget, permissions = value
        return cls(
            valid_after=int(va),
            valid_until=int(vu),
            max_uses=int(max_uses),
            interval=int(interval),
            max_uses_per_interval=int(per),
            gas_budget=int(budget),
            permissions=tuple(
                CallPermission(
                    target=to_checksum_address(target),
                    selector="0x" + bytes(selector).hex(),
                    value_limit=int(limit),
                    rules=tuple(
                        ArgRule(
                            condition=ArgCondition(int(cond)),
                            offset=int(offset),
                            values=tuple("0x" + bytes(v).hex() for v in values),
                        )
                        for cond, offset, values in rules
                    ),
                )
                for target, selector, limit, rules in permissions
            ),
        )


class SessionKeyState(msgspec.Struct, frozen=True, kw_only=True):
    """A key's on-chain state (`sessionKey(key)`); `id == 0` when not installed."""

    id: int
    valid_after: int
    valid_until: int
    max_uses: int
    uses: int
    interval: int
    max_uses_per_interval: int
    window: int
    window_uses: int
    gas_budget: int
    gas_spent: int

    @property
    def installed(self) -> bool:
        return self.id != 0

    def in_validity(self, timestamp: int) -> bool:
        return self.valid_after <= timestamp and (self.valid_until == 0 or timestamp <= self.valid_until)


class StoredArgRule(msgspec.Struct, frozen=True):
    """A rule as stored (`callPermission`): for ONE_OF, `value` is the number of allowed values."""

    condition: ArgCondition
    offset: int
    value: str


# ------------------------------------------------------------------------------------------ owner approvals


def _domain(chain_id: int, account: str) -> dict[str, Any]:
    return {"name": "AgentAccount", "version": "1", "chainId": chain_id, "verifyingContract": account}


_DOMAIN_TYPE: Final = [
    {"name": "name", "type": "string"},
    {"name": "version", "type": "string"},
    {"name": "chainId", "type": "uint256"},
    {"name": "verifyingContract", "type": "address"},
]
_POLICY_TYPES: Final = {
    "SessionPolicy": [
        {"name": "validAfter", "type": "uint48"},
        {"name": "validUntil", "type": "uint48"},
        {"name": "maxUses", "type": "uint32"},
        {"name": "interval", "type": "uint48"},
        {"name": "maxUsesPerInterval", "type": "uint32"},
        {"name": "gasBudget", "type": "uint128"},
        {"name": "permissions", "type": "CallPermission[]"},
    ],
    "CallPermission": [
        {"name": "target", "type": "address"},
        {"name": "selector", "type": "bytes4"},
        {"name": "valueLimit", "type": "uint128"},
        {"name": "rules", "type": "ArgRule[]"},
    ],
    "ArgRule": [
        {"name": "condition", "type": "uint8"},
        {"name": "offset", "type": "uint32"},
        {"name": "values", "type": "bytes32[]"},
    ],
}


def install_typed_data(
    *, chain_id: int, account: str, key: str, policy: SessionPolicy, nonce: int, deadline: int
) -> dict[str, Any]:
    """EIP-712 `InstallSessionKey(address key,SessionPolicy policy,uint256 nonce,uint48 deadline)`."""
    return {
        "types": {
            "EIP712Domain": _DOMAIN_TYPE,
            "InstallSessionKey": [
                {"name": "key", "type": "address"},
                {"name": "policy", "type": "SessionPolicy"},
                {"name": "nonce", "type": "uint256"},
                {"name": "deadline", "type": "uint48"},
            ],
            **_POLICY_TYPES,
        },
        "primaryType": "InstallSessionKey",
        "domain": _domain(chain_id, to_checksum_address(account)),
        "message": {
            "key": to_checksum_address(key),
            "policy": policy.typed(),
            "nonce": nonce,
            "deadline": deadline,
        },
    }


def revoke_typed_data(*, chain_id: int, account: str, key: str, nonce: int, deadline: int) -> dict[str, Any]:
    """EIP-712 `RevokeSessionKey(address key,uint256 nonce,uint48 deadline)`."""
    return {
        "types": {
            "EIP712Domain": _DOMAIN_TYPE,
            "RevokeSessionKey": [
                {"name": "key", "type": "address"},
                {"name": "nonce", "type": "uint256"},
                {"name": "deadline", "type": "uint48"},
            ],
        },
        "primaryType": "RevokeSessionKey",
        "domain": _domain(chain_id, to_checksum_address(account)),
        "message": {"key": to_checksum_address(key), "nonce": nonce, "deadline": deadline},
    }


class _SignedFile(msgspec.Struct, frozen=True, kw_only=True, rename="camel"):
    chain_id: int
    account: str
    key: str
    nonce: int
    deadline: int
    signature: str

    def to_json(self) -> bytes:
        return msgspec.json.format(msgspec.json.encode(self), indent=2)

    def dump(self, path: str | Path) -> None:
        target = Path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        partial = target.with_name(target.name + ".tmp")
        partial.write_bytes(self.to_json() + b"\n")
        partial.replace(target)


class SignedSessionKeyInstall(_SignedFile, frozen=True, kw_only=True, tag="installSessionKey"):
    """An owner's offline approval to install `key` with `policy` on `account`, ready to relay."""

    policy: SessionPolicy

    @classmethod
    def load(cls, path: str | Path) -> SignedSessionKeyInstall:
        return _load(path, cls)


class SignedSessionKeyRevoke(_SignedFile, frozen=True, kw_only=True, tag="revokeSessionKey"):
    """An owner's offline approval to revoke `key` on `account`, ready to relay."""

    @classmethod
    def load(cls, path: str | Path) -> SignedSessionKeyRevoke:
        return _load(path, cls)


_F = TypeVar("_F", bound=_SignedFile)


def _load(path: str | Path, kind: type[_F]) -> _F:
    try:
        return msgspec.json.decode(Path(path).read_bytes(), type=kind)
    except OSError as exc:
        raise AccountError(f"cannot read {path}: {exc.strerror}", code="approval_file_unreadable") from None
    except (msgspec.DecodeError, ValueError) as exc:
        raise AccountError(f"{path}: invalid approval file: {exc}", code="approval_file_invalid") from None


def sign_install_offline(
    owner: Signer,
    *,
    chain_id: int,
    account: str,
    key: str,
    policy: SessionPolicy,
    deadline: int,
    nonce: int | None = None,
) -> SignedSessionKeyInstall:
    """Sign an `InstallSessionKey` approval with no node: the owner key never needs to be online.
    `nonce` (random by default) is single-use; `deadline` (Unix time) bounds when it may be relayed."""
    nonce = secrets.randbits(128) if nonce is None else nonce
    digest = typed_data_digest(
        install_typed_data(
            chain_id=chain_id, account=account, key=key, policy=policy, nonce=nonce, deadline=deadline
        )
    )
    return SignedSessionKeyInstall(
        chain_id=chain_id,
        account=to_checksum_address(account),
        key=to_checksum_address(key),
        policy=policy,
        nonce=nonce,
        deadline=deadline,
        signature="0x" + owner.sign_hash(digest).hex(),
    )


def sign_revoke_offline(
    owner: Signer, *, chain_id: int, account: str, key: str, deadline: int, nonce: int | None = None
) -> SignedSessionKeyRevoke:
    """Sign a `RevokeSessionKey` approval with no node."""
    nonce = secrets.randbits(128) if nonce is None else nonce
    digest = typed_data_digest(
        revoke_typed_data(chain_id=chain_id, account=account, key=key, nonce=nonce, deadline=deadline)
    )
    return SignedSessionKeyRevoke(
        chain_id=chain_id,
        account=to_checksum_address(account),
        key=to_checksum_address(key),
        nonce=nonce,
        deadline=deadline,
        signature="0x" + owner.sign_hash(digest).hex(),
    )


# ------------------------------------------------------------------------------- ERC-1271 through ERC-7739

_ERC1271_MAGIC: Final = keccak(text="isValidSignature(bytes32,bytes)")[:4]
_TYPED_DATA_SIGN_FIELDS: Final = (
    {"name": "name", "type": "string"},
    {"name": "version", "type": "string"},
    {"name": "chainId", "type": "uint256"},
    {"name": "verifyingContract", "type": "address"},
    {"name": "salt", "type": "bytes32"},
)


def _base_type(type_name: str) -> str:
    return type_name.split("[", 1)[0]


def _contents_type(types: Mapping[str, Sequence[Mapping[str, str]]], primary: str) -> str:
    """Every struct type `primary` reaches (itself included), encoded as EIP-712 `encodeType` lists them after
    `TypedDataSign(...)`: sorted by name. This is the `contentsType` the account hashes."""
    seen: set[str] = set()
    todo = [primary]
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        todo.extend(_base_type(f["type"]) for f in types[name] if _base_type(f["type"]) in types)
    return "".join(
        f"{name}({','.join(f['type'] + ' ' + f['name'] for f in types[name])})" for name in sorted(seen)
    )


def account_typed_data(typed_data: Mapping[str, Any], *, chain_id: int, account: str) -> dict[str, Any]:
    """The ERC-7739 `TypedDataSign` typed data that `account`'s owner signs so that the account accepts, by
    ERC-1271, a signature of `typed_data` (an app's EIP-712 message, e.g. an escrow `Grant`).

    It is what an offline wallet displays: the app's domain, the app's message as `contents`, and the
    account it is signed for (name, version, chain and address of the account's own domain), so one owner
    signature can neither be replayed on another of the owner's accounts nor mistaken for another app's
    message.
    """
    types = {k: v for k, v in typed_data["types"].items() if k != "EIP712Domain"}
    primary = str(typed_data["primaryType"])
    return {
        "types": {
            "EIP712Domain": list(typed_data["types"]["EIP712Domain"]),
            "TypedDataSign": [{"name": "contents", "type": primary}, *_TYPED_DATA_SIGN_FIELDS],
            **types,
        },
        "primaryType": "TypedDataSign",
        "domain": dict(typed_data["domain"]),
        "message": {
            "contents": typed_data["message"],
            "name": "AgentAccount",
            "version": "1",
            "chainId": chain_id,
            "verifyingContract": to_checksum_address(account),
            "salt": bytes(32),
        },
    }


def sign_typed_data_as_account(
    owner: Signer, typed_data: Mapping[str, Any], *, chain_id: int, account: str
) -> bytes:
    """`account`'s ERC-1271 signature of `typed_data`, made with its owner key and no node.

    ERC-7739 nested typed-data form, as OpenZeppelin's `ERC7739` decodes it: `ownerSignature (65) ++
    appDomainSeparator ++ contentsHash ++ contentsDescr ++ uint16(len(contentsDescr))`, with `contentsDescr`
    in the explicit form (`contentsType ++ contentsName`), which holds for any nesting of struct types. The
    contract that asks `isValidSignature(digest, signature)` passes the app's own digest of `typed_data`; the
    account rebuilds it from the appended separator and contents hash.
    """
    signable = encode_typed_data(full_message=dict(typed_data))
    separator, contents_hash = bytes(signable.header), bytes(signable.body)
    primary = str(typed_data["primaryType"])
    types = {k: v for k, v in typed_data["types"].items() if k != "EIP712Domain"}
    descr = (_contents_type(types, primary) + primary).encode()
    if len(descr) >= 2**16:
        raise ValueError("the contents type description is too long for ERC-7739")
    digest = typed_data_digest(account_typed_data(typed_data, chain_id=chain_id, account=account))
    return owner.sign_hash(digest) + separator + contents_hash + descr + len(descr).to_bytes(2, "big")


# ---------------------------------------------------------------------------------------------- contracts


def _account_abi() -> ContractAbi:
    return ContractAbi(load_artifact("AgentAccount").abi)


def _factory_abi() -> ContractAbi:
    return ContractAbi(load_artifact("AgentAccountFactory").abi)


def _clone_code(implementation: str) -> str:
    """Runtime code of an ERC-1167 minimal proxy to `implementation` (what the factory deploys)."""
    return "0x363d3d373d3d3d363d73" + implementation[2:].lower() + "5af43d82803e903d91602b57fd5bf3"


class AgentAccountFactory:
    """The `AgentAccountFactory` contract: CREATE2 addresses per (owner, salt)."""

    def __init__(self, rpc: Rpc, address: str) -> None:
        self.rpc, self.address, self._abi = rpc, to_checksum_address(address), _factory_abi()

    async def get_address(self, owner: str, salt: int = 0) -> str:
        data = self._abi.encode("getAddress", to_checksum_address(owner), salt)
        (address,) = self._abi.decode("getAddress", await self.rpc.call(self.address, data))
        return to_checksum_address(address)

    def init_code(self, owner: str, salt: int = 0) -> bytes:
        """`factory ++ createAccount(owner, salt)`: the initCode of the account's first operation."""
        return bytes.fromhex(self.address[2:]) + self._abi.encode(
            "createAccount", to_checksum_address(owner), salt
        )

    async def implementation(self) -> str:
        data = self._abi.encode("accountImplementation")
        (address,) = self._abi.decode("accountImplementation", await self.rpc.call(self.address, data))
        return to_checksum_address(address)


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
            params.append({self.address: {"code": _clone_code(self._implementation)}})
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
