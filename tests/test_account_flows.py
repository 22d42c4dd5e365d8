"""Smart-account flows on the devnet: counterfactual deployment, parallel nonce lanes, atomic batches,
the owner signing offline into a file, and the gaming example (use case 7)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from escrow import DevnetState
from escrow.accounts._account import (
    AgentAccount,
    AgentAccountFactory,
    ArgRule,
    CallPermission,
    SessionPolicy,
    SignedSessionKeyInstall,
    SignedSessionKeyRevoke,
    sign_install_offline,
    sign_revoke_offline,
)
from escrow.accounts._signers import OwnerKey, SessionKey
from escrow.accounts._userop import AccountError, Call, SessionPolicyKind, UserOpRejected
from tests.test_account_env import ETH, account_env, calldata
from x402 import LocalSigner

pytestmark = [pytest.mark.chain, pytest.mark.anyio]


async def test_counterfactual_account_deploys_on_first_operation(devnet: DevnetState) -> None:
    async with account_env(devnet) as env:
        owner = OwnerKey(LocalSigner.random())
        factory = AgentAccountFactory(env.rpc, env.factory)
        address = await factory.get_address(owner.address, 42)
        account = await AgentAccount.counterfactual(
            env.rpc, factory=env.factory, owner=owner.address, salt=42
        )
        assert account.address == address
        assert not await account.is_deployed()

        payee = LocalSigner.random().address
        await env.fund(address, ETH)  # funds sent before the account exists
        result = await account.execute([Call(payee, ETH // 10)], signer=owner, bundler=env.bundler)
        assert result.success and result.deployed
        assert await account.is_deployed()
        assert await account.owner() == owner.address
        assert await env.rpc.get_balance(payee) == ETH // 10
        # the next operation carries no initCode
        again = await account.execute([Call(payee, 1)], signer=owner, bundler=env.bundler)
        assert again.success and not again.deployed


async def test_sixteen_concurrent_operations_on_sixteen_lanes(devnet: DevnetState) -> None:
    async with account_env(devnet) as env:
        account, owner = await env.new_account()
        key = SessionKey(LocalSigner.random())
        payees = [LocalSigner.random().address for _ in range(16)]
        policy = SessionPolicy(
            permissions=tuple(CallPermission.plain_transfer(p, value_limit=ETH) for p in payees),
            max_uses=16,
            gas_budget=ETH,
        )
        await account.install_session_key(key.address, policy, owner=owner, bundler=env.bundler)

        results = await asyncio.gather(
            *(
                account.execute([Call(p, 1000 + i)], signer=key, bundler=env.bundler)
                for i, p in enumerate(payees)
            )
        )
        assert all(r.success for r in results)
        assert len({r.nonce >> 64 for r in results}) == 16, "every operation had a lane of its own"
        for i, p in enumerate(payees):
            assert await env.rpc.get_balance(p) == 1000 + i
        assert (await account.session_key(key.address)).uses == 16
        # they were group-committed: fewer handleOps transactions than operations
        assert len({r.tx_hash for r in results}) < 16

        # the lanes are reused, with their sequence tracked locally
        more = await asyncio.gather(
            *(account.execute([Call(p, 1)], signer=owner, bundler=env.bundler) for p in payees)
        )
        assert all(r.success for r in more)
        assert {r.nonce >> 64 for r in more} <= {r.nonce >> 64 for r in results}


async def test_batch_of_three_is_atomic(devnet: DevnetState) -> None:
    async with account_env(devnet) as env:
        account, owner = await env.new_account()
        usdc = env.devnet.contracts["usdc"]
        await env.transact(usdc, "mint(address,uint256)", account.address, 100)
        a, b, c = (LocalSigner.random().address for _ in range(3))

        def transfer(to: str, amount: int) -> Call:
            return Call(usdc, 0, calldata("transfer(address,uint256)", to, amount))

        failing = await account.execute(
            [transfer(a, 10), transfer(b, 20), transfer(c, 1_000)],  # the third exceeds the balance
            signer=owner,
            bundler=env.bundler,
            call_gas_limit=300_000,
        )
        assert not failing.success and failing.revert_reason  # landed, reverted as a whole
        for who in (a, b, c):
            assert await env.call(usdc, "balanceOf(address)", who) == 0
        with pytest.raises(AccountError):
            failing.raise_for_status()

        ok = await account.execute(
            [transfer(a, 10), transfer(b, 20), transfer(c, 30)], signer=owner, bundler=env.bundler
        )
        assert ok.success
        assert [await env.call(usdc, "balanceOf(address)", w) for w in (a, b, c)] == [10, 20, 30]


async def test_owner_signs_offline_into_a_file(devnet: DevnetState, tmp_path: Path) -> None:
    async with account_env(devnet) as env:
        account, owner = await env.new_account()
        key = SessionKey(LocalSigner.random())
        payee = LocalSigner.random().address
        policy = SessionPolicy(
            permissions=(CallPermission.plain_transfer(payee, value_limit=ETH),),
            valid_until=await env.now() + 3600,
            gas_budget=ETH,
        )
        deadline = await env.now() + 600

        # On the offline machine: no node, only the owner key and known facts.
        signed = sign_install_offline(
            owner.signer,
            chain_id=env.chain_id,
            account=account.address,
            key=key.address,
            policy=policy,
            deadline=deadline,
        )
        signed.dump(tmp_path / "install.json")
        revoke = sign_revoke_offline(
            owner.signer, chain_id=env.chain_id, account=account.address, key=key.address, deadline=deadline
        )
        revoke.dump(tmp_path / "revoke.json")

        # Anywhere else: anyone relays the files.
        loaded = SignedSessionKeyInstall.load(tmp_path / "install.json")
        assert loaded == signed
        await account.relay_install(loaded, env.relayer)
        assert await account.session_keys() == [key.address]
        assert await account.session_policy(key.address) == policy
        assert (await account.execute([Call(payee, 5)], signer=key, bundler=env.bundler)).success

        with pytest.raises(AccountError) as replay:
            await account.relay_install(loaded, env.relayer)
        assert replay.value.code == "approval_refused"

        await account.relay_revoke(SignedSessionKeyRevoke.load(tmp_path / "revoke.json"), env.relayer)
        with pytest.raises(UserOpRejected) as info:
            await account.execute([Call(payee, 5)], signer=key, bundler=env.bundler)
        assert info.value.violation is not None and info.value.violation.policy == SessionPolicyKind.KEY

        # A tampered file (widened policy) does not verify.
        wider = SessionPolicy(
            permissions=(CallPermission.plain_transfer(payee, value_limit=10 * ETH),), gas_budget=ETH
        )
        forged = sign_install_offline(
            LocalSigner.random(),
            chain_id=env.chain_id,
            account=account.address,
            key=key.address,
            policy=wider,
            deadline=deadline,
        )
        with pytest.raises(AccountError):
            await account.relay_install(forged, env.relayer)


async def test_gaming_bot_trades_materials_but_never_legendary(devnet: DevnetState) -> None:
    async with account_env(devnet) as env:
        account, owner = await env.new_account()
        studio = env.relayer.address  # the relayer key deploys, so it is the studio
        gold = await env.deploy("GameGold", studio)
        items = await env.deploy("GameItems", studio)
        market = await env.deploy("GameMarketplace", gold, items)
        max_material: int = await env.call(items, "MAX_MATERIAL_ID()")
        wood = await env.call(items, "itemId(uint8,uint248)", 0, 1)
        iron = await env.call(items, "itemId(uint8,uint248)", 0, 2)
        sword = await env.call(items, "itemId(uint8,uint248)", 2, 1)  # Legendary

        npc_key = LocalSigner.random()
        npc = npc_key.address
        await env.transact(gold, "mint(address,uint256)", account.address, 1_000 * ETH)
        await env.transact(items, "mint(address,uint256,uint256)", account.address, wood, 10)
        await env.transact(items, "mint(address,uint256,uint256)", account.address, sword, 1)
        # the NPC's listing, made through its own account (owner-signed)
        npc_account, npc_owner = await env.new_account()
        await env.transact(items, "mint(address,uint256,uint256)", npc_account.address, iron, 3)
        listed = await npc_account.execute(
            [
                Call(items, 0, calldata("setApprovalForAll(address,bool)", market, True)),
                Call(market, 0, calldata("list(uint256,uint256,uint256)", iron, 3, 150 * ETH)),
            ],
            signer=npc_owner,
            bundler=env.bundler,
        )
        assert listed.success and npc

        bot = SessionKey(LocalSigner.random(), interval=3600)
        policy = SessionPolicy(
            valid_until=await env.now() + 7 * 24 * 3600,
            interval=3600,
            max_uses_per_interval=20,
            gas_budget=ETH // 20,
            permissions=(
                CallPermission.to(
                    gold,
                    "approve(address,uint256)",
                    ArgRule.equal(0, market),
                    ArgRule.less_or_equal(1, 500 * ETH),
                ),
                CallPermission.to(
                    items, "setApprovalForAll(address,bool)", ArgRule.equal(0, market), ArgRule.equal(1, True)
                ),
                CallPermission.to(
                    items,
                    "safeTransferFrom(address,address,uint256,uint256,bytes)",
                    ArgRule.equal(0, account.address),
                    ArgRule.less_or_equal(2, max_material),
                ),
                CallPermission.to(
                    market, "list(uint256,uint256,uint256)", ArgRule.less_or_equal(0, max_material)
                ),
                CallPermission.to(market, "buy(uint256,uint256)", ArgRule.less_or_equal(1, 200 * ETH)),
            ),
        )
        await account.install_session_key(bot.address, policy, owner=owner, bundler=env.bundler)

        # approve → buy → list, one atomic operation
        trade = await account.execute(
            [
                Call(gold, 0, calldata("approve(address,uint256)", market, 150 * ETH)),
                Call(market, 0, calldata("buy(uint256,uint256)", 1, 150 * ETH)),
                Call(items, 0, calldata("setApprovalForAll(address,bool)", market, True)),
                Call(market, 0, calldata("list(uint256,uint256,uint256)", wood, 5, 80 * ETH)),
            ],
            signer=bot,
            bundler=env.bundler,
        )
        assert trade.success
        assert await env.call(items, "balanceOf(address,uint256)", account.address, iron) == 3
        assert await env.call(gold, "balanceOf(address)", npc_account.address) == 150 * ETH

        thief = LocalSigner.random().address
        steal = Call(
            items,
            0,
            calldata(
                "safeTransferFrom(address,address,uint256,uint256,bytes)",
                account.address,
                thief,
                sword,
                1,
                b"",
            ),
        )
        with pytest.raises(UserOpRejected) as info:
            await account.execute([steal], signer=bot, bundler=env.bundler, call_gas_limit=300_000)
        v = info.value.violation
        assert v is not None and (v.policy, v.call_index, v.rule_index) == (SessionPolicyKind.ARGUMENT, 0, 1)
        with pytest.raises(UserOpRejected) as info:
            await account.execute(
                [Call(market, 0, calldata("list(uint256,uint256,uint256)", sword, 1, 1))],
                signer=bot,
                bundler=env.bundler,
                call_gas_limit=300_000,
            )
        assert info.value.code == "session_argument_rule"
        assert await env.call(items, "balanceOf(address,uint256)", account.address, sword) == 1

        # the owner still can
        moved = await account.execute([steal], signer=owner, bundler=env.bundler)
        assert moved.success and await env.call(items, "balanceOf(address,uint256)", thief, sword) == 1
