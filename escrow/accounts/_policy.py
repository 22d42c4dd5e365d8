"""Session-key policies of an `AgentAccount`, their EIP-712 typed data, and the signed approval files.

`SessionPolicy` (validity window, gas budget, `CallPermission`s with `ArgRule`s on calldata words) is what the
owner installs for a session key; `install_typed_data` / `revoke_typed_data` are what the owner signs, and
`sign_install_offline` / `sign_revoke_offline` write those signatures as JSON files anyone can relay
(`AgentAccount.relay_install` / `relay_revoke`). `AccountSessionKeys.sol` has the exact semantics.
"""

from __future__ import annotations

import enum
import secrets
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, Final, TypeVar

import msgspec
from eth_utils.address import is_address, to_checksum_address
from eth_utils.crypto import keccak

from x402 import Signer, typed_data_digest

from ._userop import AccountError

__all__ = [
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
    "install_typed_data",
    "revoke_typed_data",
    "sign_install_offline",
    "sign_revoke_offline",
]

_MAX_UINT: Final = 2**256 - 1

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
