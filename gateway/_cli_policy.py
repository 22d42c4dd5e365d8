"""The session-key policy file (TOML) of `agentpay session-key new --policy FILE`; see `docs/policies.md`.

It says what a new session key may do: the escrow grant it pays under (`[grant]`), and optionally what it
may call through the owner's `AgentAccount` (`[account]`: call, time window, rate limit and gas policies).
Unknown keys are errors, so a typo never silently widens or drops a limit.
"""

from __future__ import annotations

import tomllib
from collections.abc import Mapping
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any

import msgspec
from eth_utils.address import is_address

from escrow import ArgRule, CallPermission, SessionPolicy
from x402 import Network, X402Error

from ._cli_common import CliError, checked_address, parse_duration, unix_now

__all__ = ["GrantSpec", "PolicySpec", "load_policy"]


class GrantSpec(msgspec.Struct, frozen=True, kw_only=True):
    token: str
    max_per_call: int
    budget: int
    valid_after: int
    valid_until: int
    payees: tuple[str, ...]
    epoch: int


class PolicySpec(msgspec.Struct, frozen=True, kw_only=True):
    payer: str  # "owner" or "account"
    account: str | None  # the account's address when the file names it
    relay_within: int
    grant: GrantSpec
    account_policy: SessionPolicy | None


_TOP = {"payer", "account_address", "relay_within", "grant", "account"}
_GRANT = {"token", "max_per_call", "budget", "valid_for", "valid_after", "valid_until", "payees", "epoch"}
_ACCOUNT = {"valid_for", "valid_after", "valid_until", "max_uses", "rate_limit", "gas_budget", "calls"}
_CALL = {"target", "function", "value_limit", "rules"}
_RULE = {"arg", "equals", "max", "one_of"}
_WEI_UNITS = {"wei": 0, "gwei": 9, "ether": 18, "eth": 18}


class _Where:
    """Where in the file a value is, for error messages that point at it."""

    def __init__(self, path: str) -> None:
        self.path = path

    def fail(self, where: str, message: str) -> CliError:
        return CliError(f"invalid policy {self.path}: {where}: {message}")

    def table(self, value: Any, where: str, allowed: set[str]) -> Mapping[str, Any]:
        if not isinstance(value, dict):
            raise self.fail(where, "must be a table")
        unknown = sorted(set(value) - allowed)
        if unknown:
            raise self.fail(where, f"unknown key {unknown[0]!r} (allowed: {', '.join(sorted(allowed))})")
        return value

    def integer(self, value: Any, where: str) -> int:
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise self.fail(where, f"must be a non-negative integer, not {value!r}")
        return value


def _amount(w: _Where, network: Network, value: Any, where: str) -> int:
    if value is None:
        raise w.fail(where, "is required")
    try:
        return network.atomic(value)
    except X402Error as exc:
        raise w.fail(where, exc.message) from None


def _window(
    w: _Where, table: Mapping[str, Any], where: str, now: int, default: int | None
) -> tuple[int, int]:
    """(valid_after, valid_until) from `valid_for` (a duration from now) or absolute Unix times."""
    if "valid_for" in table and "valid_until" in table:
        raise w.fail(where, "give valid_for or valid_until, not both")
    valid_after = w.integer(table.get("valid_after", max(now - 60, 0)), f"{where}.valid_after")
    if "valid_until" in table:
        valid_until = w.integer(table["valid_until"], f"{where}.valid_until")
    elif "valid_for" in table or default is not None:
        try:
            valid_until = now + parse_duration(table.get("valid_for", default), f"{where}.valid_for")
        except CliError as exc:
            raise w.fail(where, exc.message) from None
    else:
        valid_until = 0
    if valid_until and valid_until <= valid_after:
        raise w.fail(where, "the window ends before it starts")
    return valid_after, valid_until


def _grant(w: _Where, network: Network, raw: Any, now: int) -> GrantSpec:
    table = w.table(raw, "[grant]", _GRANT)
    valid_after, valid_until = _window(w, table, "[grant]", now, 86400)
    payees = table.get("payees", [])
    if not isinstance(payees, list):
        raise w.fail("[grant].payees", "must be a list of addresses")
    try:
        return GrantSpec(
            token=checked_address(table.get("token", network.token), "token"),
            max_per_call=_amount(w, network, table.get("max_per_call"), "[grant].max_per_call"),
            budget=_amount(w, network, table.get("budget"), "[grant].budget"),
            valid_after=valid_after,
            valid_until=valid_until,
            payees=tuple(checked_address(str(p), "payee") for p in payees),
            epoch=w.integer(table.get("epoch", now), "[grant].epoch"),
        )
    except CliError as exc:
        raise w.fail("[grant]", exc.message) from None


def _wei(w: _Where, value: Any, where: str) -> int:
    if isinstance(value, int) and not isinstance(value, bool):
        return w.integer(value, where)
    number, _, unit = str(value).strip().partition(" ")
    try:
        scaled = Decimal(number).scaleb(_WEI_UNITS[unit.strip().lower() or "wei"])
    except (InvalidOperation, KeyError):
        raise w.fail(
            where, f"{value!r} is not an amount of wei (like 10000000000000000, '5 gwei', '0.01 ether')"
        ) from None
    if scaled != scaled.to_integral_value() or scaled < 0:
        raise w.fail(where, f"{value!r} is not a whole, non-negative number of wei")
    return int(scaled)


def _word(w: _Where, network: Network, value: Any, where: str) -> int | str:
    """A rule's value: an integer, an address, a 32-byte 0x word, or a token amount like "$0.01"."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, str) and (is_address(value) or (value.startswith("0x") and len(value) == 66)):
        return value
    return _amount(w, network, value, where)


def _rule(w: _Where, network: Network, raw: Any, where: str) -> ArgRule:
    table = w.table(raw, where, _RULE)
    arg = w.integer(table.get("arg"), f"{where}.arg")
    kinds = [k for k in ("equals", "max", "one_of") if k in table]
    if len(kinds) != 1:
        raise w.fail(where, "give exactly one of equals, max, one_of")
    try:
        if kinds[0] == "equals":
            return ArgRule.equal(arg, _word(w, network, table["equals"], f"{where}.equals"))
        if kinds[0] == "max":
            return ArgRule.less_or_equal(arg, _word(w, network, table["max"], f"{where}.max"))
        values = table["one_of"]
        if not isinstance(values, list) or not values:
            raise w.fail(f"{where}.one_of", "must be a non-empty list")
        return ArgRule.one_of(arg, [_word(w, network, v, f"{where}.one_of") for v in values])
    except ValueError as exc:
        raise w.fail(where, str(exc)) from None


def _call(w: _Where, network: Network, raw: Any, where: str) -> CallPermission:
    table = w.table(raw, where, _CALL)
    target = table.get("target")
    named = {"escrow": network.escrow, "token": network.token}
    address = named.get(str(target), target)
    if not isinstance(address, str) or not is_address(address):
        raise w.fail(f"{where}.target", f"{target!r} is not an address, 'escrow' or 'token'")
    function = table.get("function")
    if not isinstance(function, str):
        raise w.fail(f"{where}.function", "is required: a signature like 'transfer(address,uint256)' or ''")
    value_limit = _wei(w, table.get("value_limit", 0), f"{where}.value_limit")
    rules = table.get("rules", [])
    if not isinstance(rules, list):
        raise w.fail(f"{where}.rules", "must be a list of tables")
    try:
        if function == "":
            if rules:
                raise w.fail(where, "a plain transfer (function = '') takes no rules")
            return CallPermission.plain_transfer(address, value_limit=value_limit)
        parsed = [_rule(w, network, r, f"{where}.rules[{i}]") for i, r in enumerate(rules)]
        return CallPermission.to(address, function, *parsed, value_limit=value_limit)
    except ValueError as exc:
        raise w.fail(where, str(exc)) from None


def _account_policy(w: _Where, network: Network, raw: Any, now: int) -> SessionPolicy:
    table = w.table(raw, "[account]", _ACCOUNT)
    valid_after, valid_until = _window(w, table, "[account]", now, None)
    if "gas_budget" not in table:
        raise w.fail("[account].gas_budget", "is required: the most the key's operations may spend on gas")
    interval = uses_per_interval = 0
    if "rate_limit" in table:
        rate = w.table(table["rate_limit"], "[account].rate_limit", {"uses", "per"})
        uses_per_interval = w.integer(rate.get("uses"), "[account].rate_limit.uses")
        try:
            interval = parse_duration(rate.get("per"), "per")
        except CliError as exc:
            raise w.fail("[account].rate_limit.per", exc.message) from None
    calls = table.get("calls", [])
    if not isinstance(calls, list) or not calls:
        raise w.fail("[account].calls", "list at least one [[account.calls]] the key may make")
    try:
        return SessionPolicy(
            permissions=tuple(_call(w, network, c, f"[[account.calls]][{i}]") for i, c in enumerate(calls)),
            gas_budget=_wei(w, table["gas_budget"], "[account].gas_budget"),
            valid_after=valid_after,
            valid_until=valid_until,
            max_uses=w.integer(table.get("max_uses", 0), "[account].max_uses"),
            interval=interval,
            max_uses_per_interval=uses_per_interval,
        )
    except ValueError as exc:
        raise w.fail("[account]", str(exc)) from None


def load_policy(path: str, network: Network, *, now: int | None = None) -> PolicySpec:
    """The policy in `path`, amounts in `network`'s token; `CliError` saying where a file is wrong."""
    w = _Where(path)
    try:
        data = tomllib.loads(Path(path).read_text())
    except OSError as exc:
        raise CliError(f"cannot read the policy {path}: {exc.strerror}") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise CliError(f"invalid policy {path}: not TOML: {exc}") from None
    now = unix_now() if now is None else now
    top = w.table(data, "top level", _TOP)
    account_address = top.get("account_address")
    account_table = top.get("account")
    payer = top.get("payer", "owner")
    if payer not in ("owner", "account"):
        raise w.fail("payer", f"must be 'owner' or 'account', not {payer!r}")
    if "grant" not in top:
        raise w.fail("[grant]", "is required: the escrow grant the key pays under")
    try:
        relay_within = parse_duration(top.get("relay_within", "1h"), "relay_within")
    except CliError as exc:
        raise w.fail("relay_within", exc.message) from None
    return PolicySpec(
        payer=payer,
        account=None if account_address is None else checked_address(str(account_address), "account_address"),
        relay_within=relay_within,
        grant=_grant(w, network, top["grant"], now),
        account_policy=None if account_table is None else _account_policy(w, network, account_table, now),
    )
