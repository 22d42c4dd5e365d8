"""Session-key policies on the devnet: whatever a key tries outside its policy fails validation (the operation
never executes, nothing moves, the nonce is not consumed) and Python says which policy refused it."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

import pytest

from escrow import DevnetState
from escrow.accounts._account import AgentAccount, ArgRule, CallPermission, SessionPolicy
from escrow.accounts._signers import OwnerKey, SessionKey
from escrow.accounts._userop import Call, SessionPolicyKind, UserOpRejected
from tests.test_account_env import ETH, AccountEnv, account_env, calldata
from x402 import LocalSigner

pytestmark = [pytest.mark.chain, pytest.mark.anyio]

CAP = 5 * 10**6  # 5 USDC per call


@dataclass
class Setup:
    env: AccountEnv
    account: AgentAccount
    owner: OwnerKey
    usdc: str
    payee: str
    other: str


@asynccontextmanager
async def setup(devnet: DevnetState) -> AsyncIterator[Setup]:
    async with account_env(devnet) as env:
        account, owner = await env.new_account()
        usdc = devnet.contracts["usdc"]
        await env.transact(usdc, "mint(address,uint256)", account.address, 1_000 * 10**6)
        yield Setup(env, account, owner, usdc, LocalSigner.random().address, LocalSigner.random().address)


def usdc_policy(s: Setup, **limits: int) -> SessionPolicy:
    """USDC transfers to `payee` only, at most CAP each, plus `limits` (timestamp, rate, gas)."""
    return SessionPolicy(
        permissions=(
            CallPermission.to(
                s.usdc,
                "transfer(address,uint256)",
                ArgRule.one_of(0, [s.payee]),
                ArgRule.less_or_equal(1, CAP),
            ),
        ),
        **{"gas_budget": ETH, **limits},
    )


def pay(s: Setup, to: str, amount: int) -> Call:
    return Call(s.usdc, 0, calldata("transfer(address,uint256)", to, amount))


async def balance(s: Setup, who: str) -> int:
    value: int = await s.env.call(s.usdc, "balanceOf(address)", who)
    return value


async def new_key(s: Setup, policy: SessionPolicy, *, interval: int = 0) -> SessionKey:
    key = SessionKey(LocalSigner.random(), interval=interval)
    await s.account.install_session_key(key.address, policy, owner=s.owner, bundler=s.env.bundler)
    return key


async def rejected(
    s: Setup, calls: list[Call], key: SessionKey, call_gas_limit: int = 300_000
) -> UserOpRejected:
    """Submit (a fixed call gas: some of these calls would revert, so they cannot be estimated) and expect a
    refusal that consumed nothing."""
    before = await s.account.lanes.next_nonce(0)
    with pytest.raises(UserOpRejected) as info:
        await s.account.execute(calls, signer=key, bundler=s.env.bundler, call_gas_limit=call_gas_limit)
    assert await s.account.lanes.next_nonce(0) == before, "a refused operation consumes no nonce"
    return info.value


async def test_key_within_its_policy_pays(devnet: DevnetState) -> None:
    async with setup(devnet) as s:
        key = await new_key(s, usdc_policy(s))
        result = await s.account.execute([pay(s, s.payee, CAP)], signer=key, bundler=s.env.bundler)
        assert result.success
        assert await balance(s, s.payee) == CAP
        assert await s.account.session_policy(key.address) == usdc_policy(s)


async def test_call_outside_policy_is_refused(devnet: DevnetState) -> None:
    async with setup(devnet) as s:
        key = await new_key(s, usdc_policy(s))
        # another function of the allowed target
        approve = Call(s.usdc, 0, calldata("approve(address,uint256)", s.other, 2**255))
        err = await rejected(s, [approve], key)
        assert err.violation is not None and err.violation.policy == SessionPolicyKind.CALL
        assert err.code == "session_call_not_allowed" and err.reason == "AA23 reverted"
        # another target
        escrow = s.env.devnet.contracts["escrow"]
        err = await rejected(s, [Call(escrow, 0, calldata("transfer(address,uint256)", s.payee, 1))], key)
        assert err.violation is not None and err.violation.policy == SessionPolicyKind.CALL
        # the account itself: a session key cannot grant itself more
        grant = s.account.install_call(LocalSigner.random().address, usdc_policy(s))
        err = await rejected(s, [grant], key, call_gas_limit=500_000)
        assert err.violation is not None and err.violation.policy == SessionPolicyKind.CALL
        assert await s.account.session_keys() == [key.address]


async def test_argument_rules_are_enforced(devnet: DevnetState) -> None:
    async with setup(devnet) as s:
        key = await new_key(s, usdc_policy(s))
        err = await rejected(s, [pay(s, s.payee, CAP + 1)], key)
        assert err.violation is not None
        assert (err.violation.policy, err.violation.call_index, err.violation.rule_index) == (
            SessionPolicyKind.ARGUMENT,
            0,
            1,
        )
        assert err.code == "session_argument_rule"
        err = await rejected(s, [pay(s, s.other, 1)], key)
        assert err.violation is not None and err.violation.rule_index == 0
        # every call of a batch is checked: the bad one is the third
        err = await rejected(s, [pay(s, s.payee, 1), pay(s, s.payee, 2), pay(s, s.other, 3)], key)
        assert err.violation is not None and err.violation.call_index == 2
        assert await balance(s, s.payee) == 0


async def test_plain_transfer_permission_allows_empty_calldata_only(devnet: DevnetState) -> None:
    """Issue 9 item 11: `(target, 0x00000000)` means plain transfers; calldata that merely starts with four
    zero bytes (it would reach the target's fallback) or has 1-3 bytes is refused at validation."""
    async with setup(devnet) as s:
        policy = SessionPolicy(
            permissions=(CallPermission.plain_transfer(s.usdc, value_limit=0),), gas_budget=ETH
        )
        key = await new_key(s, policy)
        for data in (b"\x00" * 4 + bytes(64), b"\x00" * 4, b"\x00"):
            err = await rejected(s, [Call(s.usdc, 0, data)], key)
            assert err.violation is not None and err.violation.policy == SessionPolicyKind.CALL, data
            assert err.code == "session_call_not_allowed"


async def test_value_limit(devnet: DevnetState) -> None:
    async with setup(devnet) as s:
        policy = SessionPolicy(
            permissions=(CallPermission.plain_transfer(s.payee, value_limit=ETH),), gas_budget=ETH
        )
        key = await new_key(s, policy)
        assert (await s.account.execute([Call(s.payee, ETH)], signer=key, bundler=s.env.bundler)).success
        err = await rejected(s, [Call(s.payee, ETH + 1)], key)
        assert err.violation is not None and err.violation.policy == SessionPolicyKind.VALUE
        assert err.code == "session_value_limit"


async def test_outside_validity_window(devnet: DevnetState) -> None:
    async with setup(devnet) as s:
        now = await s.env.now()
        early = await new_key(s, usdc_policy(s, valid_after=now + 3600))
        err = await rejected(s, [pay(s, s.payee, 1)], early)
        assert err.reason == "AA22 expired or not due"
        assert err.violation is not None and err.violation.policy == SessionPolicyKind.TIMESTAMP
        assert err.code == "session_outside_validity"

        late = await new_key(s, usdc_policy(s, valid_until=now - 1))
        err = await rejected(s, [pay(s, s.payee, 1)], late)
        assert err.violation is not None and err.violation.policy == SessionPolicyKind.TIMESTAMP


async def test_rate_limits(devnet: DevnetState) -> None:
    async with setup(devnet) as s:
        # lifetime count
        key = await new_key(s, usdc_policy(s, max_uses=2))
        for _ in range(2):
            await s.account.execute([pay(s, s.payee, 1)], signer=key, bundler=s.env.bundler)
        err = await rejected(s, [pay(s, s.payee, 1)], key)
        assert err.violation is not None and err.violation.policy == SessionPolicyKind.RATE_LIMIT
        assert err.code == "session_rate_limit"
        assert (await s.account.session_key(key.address)).uses == 2

        # per window: 2 per week-long window (epoch-aligned, so the test is not racing a boundary)
        week = 7 * 24 * 3600
        windowed = await new_key(s, usdc_policy(s, interval=week, max_uses_per_interval=2), interval=week)
        for _ in range(2):
            await s.account.execute([pay(s, s.payee, 1)], signer=windowed, bundler=s.env.bundler)
        err = await rejected(s, [pay(s, s.payee, 1)], windowed)
        assert err.violation is not None and err.violation.policy == SessionPolicyKind.RATE_LIMIT
        state = await s.account.session_key(windowed.address)
        assert (state.window, state.window_uses) == (await s.env.now() // week, 2)

        # claiming the next window early is refused by the EntryPoint (AA22) and explained as the rate limit
        ahead = SessionKey(windowed.signer, interval=week)
        later = await s.env.now() + week
        op = await s.account.prepare(
            [pay(s, s.payee, 1)], signer=ahead, nonce=await s.account.lanes.next_nonce(9)
        )
        op = op.signed(ahead, chain_id=s.env.chain_id, timestamp=later)
        with pytest.raises(UserOpRejected) as info:
            await s.env.bundler.send(op)
        assert info.value.reason == "AA22 expired or not due"


async def test_gas_budget(devnet: DevnetState) -> None:
    async with setup(devnet) as s:
        broke = await new_key(s, usdc_policy(s, gas_budget=1))
        err = await rejected(s, [pay(s, s.payee, 1)], broke)
        assert err.violation is not None and err.violation.policy == SessionPolicyKind.GAS
        assert err.code == "session_gas_budget"

        # a budget for one operation and a half: the first passes and is charged its worst case
        probe = SessionKey(LocalSigner.random())
        sample = await s.account.prepare([pay(s, s.payee, 1)], signer=probe, nonce=0)
        key = await new_key(s, usdc_policy(s, gas_budget=sample.max_cost * 3 // 2))
        result = await s.account.execute([pay(s, s.payee, 1)], signer=key, bundler=s.env.bundler)
        spent = (await s.account.session_key(key.address)).gas_spent
        assert spent >= result.actual_gas_cost and spent > 0
        err = await rejected(s, [pay(s, s.payee, 1)], key)
        assert err.violation is not None and err.violation.policy == SessionPolicyKind.GAS


async def test_revocation_is_per_key_and_immediate(devnet: DevnetState) -> None:
    async with setup(devnet) as s:
        first = await new_key(s, usdc_policy(s))
        second = await new_key(s, usdc_policy(s))
        await s.account.execute([pay(s, s.payee, 1)], signer=first, bundler=s.env.bundler)
        await s.account.revoke_session_key(first.address, owner=s.owner, bundler=s.env.bundler)

        err = await rejected(s, [pay(s, s.payee, 1)], first)
        assert err.violation is not None and err.violation.policy == SessionPolicyKind.KEY
        assert err.code == "session_key_not_installed"
        assert (await s.account.execute([pay(s, s.payee, 2)], signer=second, bundler=s.env.bundler)).success
        assert await s.account.session_keys() == [second.address]

        # reinstalled: a fresh grant, no stale counters
        await s.account.install_session_key(
            first.address, usdc_policy(s, max_uses=1), owner=s.owner, bundler=s.env.bundler
        )
        state = await s.account.session_key(first.address)
        assert state.uses == 0 and state.id > 2
        assert (await s.account.execute([pay(s, s.payee, 1)], signer=first, bundler=s.env.bundler)).success


async def test_wrong_signature_is_a_signature_error(devnet: DevnetState) -> None:
    async with setup(devnet) as s:
        key = await new_key(s, usdc_policy(s))
        impostor = SessionKey(LocalSigner.random())
        op = await s.account.prepare(
            [pay(s, s.payee, 1)], signer=key, nonce=await s.account.lanes.next_nonce(0)
        )
        forged = op.signed(impostor, chain_id=s.env.chain_id, timestamp=0)
        forged = forged.with_signature(bytes.fromhex(key.address[2:]) + forged.signature[20:])
        with pytest.raises(UserOpRejected) as info:
            await s.env.bundler.send(forged)
        assert info.value.reason == "AA24 signature error" and info.value.code == "userop_signature_invalid"
