"""A network description: one chain's facts in one place, and human amounts (`"$0.002"`) in atomic units.

    network = Network.from_json(path.read_bytes())     # or from_toml(text), from_mapping(dict)
    network.token_domain                               # the EIP-712 domain EIP-3009 signatures use
    to_atomic_units("$0.002", network.token_decimals)  # 2000

Contract addresses and the token's EIP-712 domain are read from here by the gateway, the settlers and the
wallets, never typed at each call site. Pure data: reading the file and talking to the node live in
`escrow` (`escrow.Chain`, `escrow.load_network`).
"""

from __future__ import annotations

import re
import tomllib
from collections.abc import Mapping
from decimal import Decimal, InvalidOperation
from typing import Any, TypeAlias

import msgspec

from ._eip712 import Eip712Domain
from ._errors import X402Error

__all__ = ["Amount", "InvalidAmount", "InvalidNetwork", "Network", "to_atomic_units"]

#: What a user types for an amount: atomic units (`int`) or a human amount (`"$0.002"`, `"0.002"`, Decimal).
Amount: TypeAlias = int | str | Decimal

_ADDRESS = re.compile(r"^0x[0-9a-fA-F]{40}$")
_CAIP2_EVM = re.compile(r"^eip155:([0-9]+)$")
_KEY_REFERENCE = re.compile(r"^(env:[A-Za-z_][A-Za-z0-9_]*|devnet:[0-9]+)$")
_PRIVATE_KEY = re.compile(r"^(0x)?[0-9a-fA-F]{64}$")


class InvalidAmount(X402Error):
    """An amount that is not a finite, non-negative number representable in the token's decimals."""

    default_code = "invalid_amount"
    default_status = 400


class InvalidNetwork(X402Error):
    """A network description that is malformed or contradicts itself."""

    default_code = "invalid_network"
    default_status = 500


def to_atomic_units(amount: Amount, decimals: int) -> int:
    """Atomic units of `amount`: ints are atomic already; `"$0.002"`, `"0.002"` and Decimals are human."""
    if isinstance(amount, bool) or not isinstance(amount, int | str | Decimal):
        raise InvalidAmount(f"an amount must be a number, not {amount!r}")
    if isinstance(amount, int):
        atomic = amount
    else:
        text = amount.strip().removeprefix("$").replace("_", "") if isinstance(amount, str) else amount
        try:
            value = Decimal(text)
        except (InvalidOperation, ValueError):
            raise InvalidAmount(f"unparseable amount {amount!r}") from None
        if not value.is_finite():
            raise InvalidAmount(f"an amount must be finite, got {amount!r}")
        scaled = value.scaleb(decimals)
        if scaled != scaled.to_integral_value():
            raise InvalidAmount(f"amount {amount!r} is finer than the token's {decimals} decimals")
        atomic = int(scaled)
    if atomic < 0:
        raise InvalidAmount(f"an amount must not be negative, got {amount!r}")
    return atomic


class Network(msgspec.Struct, frozen=True, kw_only=True):
    """One EVM chain as agentpay uses it. JSON/TOML field names are the attribute names.

    `network` is the CAIP-2 id (`eip155:8453`) and must agree with `chain_id`. `token` is the EIP-3009 token
    payments are made in, with its EIP-712 domain (`token_name`, `token_version`) and `token_decimals`.
    `escrow`, `account_factory` and `entrypoint` are the AgentEscrow, AgentAccountFactory and ERC-4337
    EntryPoint addresses, `channels` and `paymaster` the AgentChannels (MPP sessions) and AgentPaymaster
    ones (each empty when the chain has none). `rpc_url` is the default node. `settlement_key` names the
    key that pays settlement gas, never the key itself: `env:NAME` (an environment variable) or `devnet:N`
    (devnet account N, a well-known test key); `escrow.Chain` resolves it when given no relayer key.
    """

    network: str
    chain_id: int
    token: str
    token_name: str
    token_version: str
    token_decimals: int = 6
    token_symbol: str = "USDC"
    rpc_url: str = ""
    escrow: str = ""
    account_factory: str = ""
    entrypoint: str = ""
    channels: str = ""
    paymaster: str = ""
    settlement_key: str = ""

    def __post_init__(self) -> None:
        match = _CAIP2_EVM.match(self.network)
        if match is None:
            raise InvalidNetwork(f"network {self.network!r} is not a CAIP-2 EVM id (eip155:<chain id>)")
        if int(match.group(1)) != self.chain_id:
            raise InvalidNetwork(f"network {self.network} does not match chain_id {self.chain_id}")
        if not 0 <= self.token_decimals <= 36:
            raise InvalidNetwork(f"token_decimals {self.token_decimals} is out of range")
        for name in ("token", "escrow", "account_factory", "entrypoint", "channels", "paymaster"):
            value = getattr(self, name)
            if (value or name == "token") and not _ADDRESS.match(value):
                raise InvalidNetwork(f"{name} {value!r} is not a 0x-prefixed 20-byte address")
        if self.settlement_key and not _KEY_REFERENCE.match(self.settlement_key):
            # A private key in a description file ends up in version control; only references belong there.
            raise InvalidNetwork(
                "settlement_key must name a key (env:NAME or devnet:N), not be one"
                if _PRIVATE_KEY.match(self.settlement_key)
                else f"settlement_key {self.settlement_key!r} is not env:NAME or devnet:N"
            )

    @property
    def token_domain(self) -> Eip712Domain:
        """The token's EIP-712 domain: what an EIP-3009 authorization is signed over."""
        return Eip712Domain(self.token_name, self.token_version, self.chain_id, self.token)

    @property
    def has_escrow(self) -> bool:
        return bool(self.escrow)

    def atomic(self, amount: Amount) -> int:
        """`amount` in the token's atomic units (`"$0.002"` -> 2000 for 6 decimals)."""
        return to_atomic_units(amount, self.token_decimals)

    # -- encodings -----------------------------------------------------------------------------------------

    def to_json(self) -> bytes:
        return msgspec.json.format(msgspec.json.encode(self), indent=2)

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any]) -> Network:
        try:
            return msgspec.convert(dict(data), type=cls)
        except msgspec.ValidationError as exc:
            raise InvalidNetwork(f"invalid network description: {exc}") from None

    @classmethod
    def from_json(cls, data: bytes | str) -> Network:
        try:
            return msgspec.json.decode(data, type=cls)
        except msgspec.DecodeError as exc:
            raise InvalidNetwork(f"invalid network description: {exc}") from None

    @classmethod
    def from_toml(cls, text: str) -> Network:
        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            raise InvalidNetwork(f"invalid network description: {exc}") from None
        return cls.from_mapping(data)
