"""The orchestrator's money lives in its `AgentAccount` (owner key offline), wired to the escrow: use case 3.

The owner signs, with no node, two files that a relayer sends: a session key for the account whose call policy
allows only escrow top-ups (`usdc.approve(escrow, <= cap)`, `escrow.deposit(usdc, <= cap)`), and the escrow
grant of the same key, made by the account as payer through ERC-1271 (the owner's ERC-7739 nested signature).
The key then tops up the escrow by UserOperation and signs payments to sub-agents' counterfactual accounts;
everything else it might try is refused by the account or by the escrow. Real contracts on anvil.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
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
    install_typed_data,
    sign_install_offline,
    sign_typed_data_as_account,
)
from escrow.accounts._signers import OwnerKey, SessionKey
from escrow.accounts._userop import Call, SessionPolicyKind, UserOpRejected
from escrow.chain._rpc import RevertError
from escrow.payments._escrow import AgentEscrow, Erc20
from escrow.payments._escrow_verify import EscrowClaim, EscrowRejected, EscrowVerifier, GrantCache
from escrow.payments._grants import (
    SignedDeposit,
    SignedGrant,
    SignedRevoke,
    relay_deposit,
    relay_grant,
    relay_revoke,
    sign_deposit_authorization,
    sign_grant_offline,
    sign_revoke_offline,
)
from escrow.payments._settler import EscrowSettler, encode_claim
from gateway import MemoryStore, Settlement
from tests.test_account_env import ETH, AccountEnv, account_env, calldata
from x402 import Eip712Domain, LocalSigner, typed_data_digest
from x402._escrow import (
    EscrowCode,
    EscrowPayload,
    GrantMessage,
    NonceCounter,
    escrow_domain,
    grant_digest,
    grant_typed_data,
    sign_payment,
)

pytestmark = [pytest.mark.chain, pytest.mark.anyio]

USDC = 10**6
TOP_UP_CAP = 50 * USDC  # the account-level cap: one top-up moves at most this into the escrow
MAX_PER_CALL = 2_000  # the escrow-level cap: $0.002 per paid call
BUDGET = 50_000
PRICE = 1_000


@dataclass
class Wired:
    """An owner's account with one hot key: a session key on the account (top-ups only) and, for the same
    key, the account's escrow grant (payments only, to two sub-agents' counterfactual accounts)."""

    env: AccountEnv
    escrow: AgentEscrow
    usdc: Erc20
    owner: LocalSigner
    account: AgentAccount
    key: SessionKey
    policy: SessionPolicy
    grant: GrantMessage
    grant_signature: bytes
    subagents: tuple[str, str]

    def approve(self, spender: str, amount: int) -> Call:
        return Call(self.usdc.address, 0, calldata("approve(address,uint256)", spender, amount))

    def deposit(self, amount: int, token: str | None = None) -> Call:
        return Call(
            self.escrow.address, 0, calldata("deposit(address,uint256)", token or self.usdc.address, amount)
        )

    def top_up(self, amount: int) -> list[Call]:
        return [self.approve(self.escrow.address, amount), self.deposit(amount)]

    async def balances(self) -> tuple[int, int]:
        """(the account's USDC, its escrow deposit)."""
        return (
            await self.usdc.balance_of(self.account.address),
            await self.escrow.deposit_of(self.account.address, self.usdc.address),
        )


async def _escrow_address(env: AccountEnv) -> str:
    address = env.devnet.contracts.get("escrow")
    if address is None:  # an older devnet without the escrow row
        deployer = LocalSigner.random()
        await env.fund(deployer.address, ETH)
        address = (await AgentEscrow.deploy(env.rpc, "0x" + deployer._key.secret.hex())).address
    return address


@asynccontextmanager
async def wired(devnet: DevnetState, tmp_path: Path) -> AsyncIterator[Wired]:
    async with account_env(devnet) as env:
        escrow = AgentEscrow(env.rpc, await _escrow_address(env))
        usdc = Erc20(env.rpc, devnet.contracts["usdc"])
        owner = LocalSigner.random()
        account = await AgentAccount.counterfactual(
            env.rpc, factory=env.factory, owner=owner.address, salt=secrets.randbits(64)
        )
        factory = AgentAccountFactory(env.rpc, env.factory)
        subagents = (
            await factory.get_address(LocalSigner.random().address, 0),
            await factory.get_address(LocalSigner.random().address, 0),
        )
        key = SessionKey(LocalSigner.random())
        now = await env.now()
        policy = SessionPolicy(
            valid_until=now + 3600,
            max_uses=10,
            gas_budget=ETH // 10,
            permissions=(
                CallPermission.to(
                    usdc.address,
                    "approve(address,uint256)",
                    ArgRule.equal(0, escrow.address),
                    ArgRule.less_or_equal(1, TOP_UP_CAP),
                ),
                CallPermission.to(
                    escrow.address,
                    "deposit(address,uint256)",
                    ArgRule.equal(0, usdc.address),
                    ArgRule.less_or_equal(1, TOP_UP_CAP),
                ),
            ),
        )

        # The offline machine: the owner key, the account's (counterfactual) address, and known facts only.
        sign_install_offline(
            owner,
            chain_id=env.chain_id,
            account=account.address,
            key=key.address,
            policy=policy,
            deadline=now + 600,
        ).dump(tmp_path / "install.json")
        signed_grant = sign_grant_offline(
            owner,
            account=account.address,
            chain_id=env.chain_id,
            escrow=escrow.address,
            signer=key.address,
            token=usdc.address,
            max_per_call=MAX_PER_CALL,
            budget=BUDGET,
            valid_until=now + 3600,
            payees=list(subagents),
        )
        signed_grant.dump(tmp_path / "grant.json")

        # Anywhere else: a relayer funds and deploys the account, then relays both files.
        await env.fund(account.address)  # ETH for the key's UserOperation prefunds
        await env.transact(usdc.address, "mint(address,uint256)", account.address, 200 * USDC)
        assert await account.deploy(env.relayer) is not None
        await account.relay_install(SignedSessionKeyInstall.load(tmp_path / "install.json"), env.relayer)
        loaded = SignedGrant.load(tmp_path / "grant.json")
        await relay_grant(escrow, env.relayer, loaded)
        yield Wired(
            env=env,
            escrow=escrow,
            usdc=usdc,
            owner=owner,
            account=account,
            key=key,
            policy=policy,
            grant=loaded.grant,
            grant_signature=bytes.fromhex(loaded.signature[2:]),
            subagents=subagents,
        )


async def test_owner_offline_files_wire_the_account_to_the_escrow(
    devnet: DevnetState, tmp_path: Path
) -> None:
    async with wired(devnet, tmp_path) as w:
        assert w.env.relayer.address != w.owner.address
        assert await w.account.owner() == w.owner.address
        assert await w.account.session_keys() == [w.key.address]
        assert await w.account.session_policy(w.key.address) == w.policy
        info = await w.escrow.grant_of(w.account.address, w.key.address)
        assert (info.epoch, info.max_per_call, info.budget, info.spent, info.payee_count) == (
            1,
            MAX_PER_CALL,
            BUDGET,
            0,
            2,
        )
        assert w.grant.payer == w.account.address  # the account pays, not the owner's EOA
        for sub in w.subagents:
            assert await w.escrow.is_payee_allowed(w.account.address, w.key.address, sub)
            assert await w.env.rpc.get_code(sub) == b""  # counterfactual: paid before it exists

        # The account's ERC-1271 takes the owner's nested signature, and nothing a hot key could make.
        digest = grant_digest(escrow_domain(w.env.chain_id, w.escrow.address), w.grant)
        assert await w.account.is_valid_signature(digest, w.grant_signature)
        assert not await w.account.is_valid_signature(digest, w.owner.sign_hash(digest))  # not nested
        typed = grant_typed_data(escrow_domain(w.env.chain_id, w.escrow.address), w.grant)
        by_key = sign_typed_data_as_account(
            w.key.signer, typed, chain_id=w.env.chain_id, account=w.account.address
        )
        assert not await w.account.is_valid_signature(digest, by_key)
        # ... so the hot key cannot grant itself more through the escrow's grantWithSig either.
        wider = sign_grant_offline(
            w.key.signer,
            account=w.account.address,
            chain_id=w.env.chain_id,
            escrow=w.escrow.address,
            signer=w.key.address,
            token=w.usdc.address,
            max_per_call=10**12,
            budget=10**12,
            valid_until=2**32 - 1,
            epoch=2,
        )
        with pytest.raises(RevertError):
            await relay_grant(w.escrow, w.env.relayer, wider)
        # A signed grant is single use.
        with pytest.raises(RevertError):
            await relay_grant(w.escrow, w.env.relayer, SignedGrant.load(tmp_path / "grant.json"))
        assert (await w.escrow.grant_of(w.account.address, w.key.address)).budget == BUDGET

        # The owner also funds the deposit offline: an EIP-3009 authorization from the account to the escrow.
        held, deposit = await w.balances()
        sign_deposit_authorization(
            w.owner,
            Eip712Domain(devnet.usdc_name, devnet.usdc_version, w.env.chain_id, w.usdc.address),
            escrow=w.escrow.address,
            amount=30 * USDC,
            valid_before=int(time.time()) + 600,
            account=w.account.address,
        ).dump(tmp_path / "deposit.json")
        await relay_deposit(w.escrow, w.env.relayer, SignedDeposit.load(tmp_path / "deposit.json"))
        assert await w.balances() == (held - 30 * USDC, deposit + 30 * USDC)


async def test_account_signs_nested_typed_data_by_erc7739(devnet: DevnetState, tmp_path: Path) -> None:
    """Types that reference others (sorted before and after the primary type) nest as wallets encode them."""
    async with wired(devnet, tmp_path) as w:
        typed = install_typed_data(
            chain_id=w.env.chain_id,
            account=w.escrow.address,  # any app domain: here, a stand-in verifying contract
            key=w.key.address,
            policy=w.policy,
            nonce=7,
            deadline=2**40,
        )
        digest = typed_data_digest(typed)
        signature = sign_typed_data_as_account(
            w.owner, typed, chain_id=w.env.chain_id, account=w.account.address
        )
        assert await w.account.is_valid_signature(digest, signature)
        # Bound to this account: the same signature is worthless for another account of the same owner.
        other = await AgentAccount.counterfactual(
            w.env.rpc, factory=w.env.factory, owner=w.owner.address, salt=secrets.randbits(64)
        )
        await other.deploy(w.env.relayer)
        assert not await other.is_valid_signature(digest, signature)


async def test_session_key_tops_up_the_deposit_within_the_cap_only(
    devnet: DevnetState, tmp_path: Path
) -> None:
    async with wired(devnet, tmp_path) as w:
        held, deposit = await w.balances()
        assert deposit == 0

        result = await w.account.execute(w.top_up(TOP_UP_CAP), signer=w.key, bundler=w.env.bundler)
        assert result.success
        assert await w.balances() == (held - TOP_UP_CAP, TOP_UP_CAP)
        assert (await w.account.session_key(w.key.address)).uses == 1

        # One unit over the cap on the deposit: validation refuses it, nothing runs, nothing is charged.
        with pytest.raises(UserOpRejected) as refused:
            await w.account.execute(
                [w.approve(w.escrow.address, TOP_UP_CAP), w.deposit(TOP_UP_CAP + 1)],
                signer=w.key,
                bundler=w.env.bundler,
                call_gas_limit=300_000,  # estimating it would stop at the allowance, before the policy
            )
        v = refused.value.violation
        assert v is not None and (v.policy, v.call_index, v.rule_index) == (SessionPolicyKind.ARGUMENT, 1, 1)
        assert refused.value.code == "session_argument_rule"
        assert "call 1 breaks argument rule 1" in str(refused.value)
        # Over the cap on the approval too (the first call of the batch).
        with pytest.raises(UserOpRejected) as refused:
            await w.account.execute(w.top_up(2 * TOP_UP_CAP), signer=w.key, bundler=w.env.bundler)
        v = refused.value.violation
        assert v is not None and (v.policy, v.call_index, v.rule_index) == (SessionPolicyKind.ARGUMENT, 0, 1)

        assert await w.balances() == (held - TOP_UP_CAP, TOP_UP_CAP)
        assert (await w.account.session_key(w.key.address)).uses == 1


async def test_session_key_cannot_reach_the_money_any_other_way(devnet: DevnetState, tmp_path: Path) -> None:
    async with wired(devnet, tmp_path) as w:
        await w.account.execute(w.top_up(10 * USDC), signer=w.key, bundler=w.env.bundler)
        before = await w.balances()
        grant_before = await w.escrow.grant_of(w.account.address, w.key.address)
        me = w.key.address
        usdc, escrow = w.usdc.address, w.escrow.address
        other_key = LocalSigner.random().address
        attempts: dict[str, tuple[list[Call], SessionPolicyKind, int]] = {
            "usdc.transfer to itself": (
                [Call(usdc, 0, calldata("transfer(address,uint256)", me, USDC))],
                SessionPolicyKind.CALL,
                0,
            ),
            "usdc.approve to itself": ([w.approve(me, USDC)], SessionPolicyKind.ARGUMENT, 0),
            "escrow.requestWithdrawal": (
                [Call(escrow, 0, calldata("requestWithdrawal(address,uint256)", usdc, USDC))],
                SessionPolicyKind.CALL,
                0,
            ),
            "escrow.withdraw": (
                [Call(escrow, 0, calldata("withdraw(address)", usdc))],
                SessionPolicyKind.CALL,
                0,
            ),
            "escrow.grant": (
                [
                    Call(
                        escrow,
                        0,
                        calldata(
                            "grant(address,(address,uint96,uint128,uint32,uint32),address[])",
                            other_key,
                            (usdc, 10**12, 10**12, 0, 2**32 - 1),
                            [],
                        ),
                    )
                ],
                SessionPolicyKind.CALL,
                0,
            ),
            "escrow.revoke": (
                [Call(escrow, 0, calldata("revoke(address,uint32)", me, 1))],
                SessionPolicyKind.CALL,
                0,
            ),
            "escrow.depositFor another payer": (
                [Call(escrow, 0, calldata("depositFor(address,address,uint256)", me, usdc, USDC))],
                SessionPolicyKind.CALL,
                0,
            ),
            "deposit of another token": ([w.deposit(USDC, token=me)], SessionPolicyKind.ARGUMENT, 0),
            "a transfer hidden after a valid top-up": (
                [*w.top_up(USDC), Call(usdc, 0, calldata("transfer(address,uint256)", me, USDC))],
                SessionPolicyKind.CALL,
                2,
            ),
            "installing itself a wider key": (
                [w.account.install_call(other_key, w.policy)],
                SessionPolicyKind.CALL,
                0,
            ),
        }
        for what, (calls, policy, index) in attempts.items():
            with pytest.raises(UserOpRejected) as refused:
                # A fixed call gas limit: estimating it would already fail on some of these.
                await w.account.execute(calls, signer=w.key, bundler=w.env.bundler, call_gas_limit=300_000)
            v = refused.value.violation
            assert v is not None and (v.policy, v.call_index) == (policy, index), what
        # The same request signed by the owner (offline in production) passes: only the key is fenced in.
        owned = await w.account.execute(
            [Call(escrow, 0, calldata("requestWithdrawal(address,uint256)", usdc, USDC))],
            signer=OwnerKey(w.owner),
            bundler=w.env.bundler,
        )
        assert owned.success
        requested = await w.env.call(
            escrow, "withdrawalOf(address,address)", w.account.address, usdc, returns=("uint256", "uint256")
        )
        assert requested[0] == USDC
        assert await w.balances() == before
        assert await w.escrow.grant_of(w.account.address, w.key.address) == grant_before


async def test_key_payments_for_the_account_settle_to_subagent_accounts(
    devnet: DevnetState, tmp_path: Path
) -> None:
    async with wired(devnet, tmp_path) as w:
        env = w.env
        await w.account.execute(w.top_up(TOP_UP_CAP), signer=w.key, bundler=env.bundler)
        domain = escrow_domain(env.chain_id, w.escrow.address)
        nonces = NonceCounter()
        deadline = int(time.time()) + 3600

        def pay(payee: str, amount: int = PRICE) -> EscrowPayload:
            return sign_payment(
                w.key.signer,
                domain,
                payer=w.account.address,
                payee=payee,
                token=w.usdc.address,
                amount=amount,
                nonce=nonces.take(),
                deadline=deadline,
                epoch=w.grant.epoch,
            )

        a, b = w.subagents
        plan = [(a, PRICE), (b, 2 * PRICE), (a, PRICE), (a, 2 * PRICE), (b, PRICE)]
        verifier = EscrowVerifier(
            w.escrow, chain_id=env.chain_id, cache=GrantCache(w.escrow, poll_interval=0)
        )
        store = MemoryStore()
        for i, (payee, amount) in enumerate(plan):
            payload = pay(payee, amount)
            # What each sub-agent's gateway checks before serving: the key's grant from the account.
            checked = await verifier.verify(
                payload, pay_to=payee, amount=amount, token=w.usdc.address, now=time.time()
            )
            assert checked.signer == w.key.address and checked.grant is not None
            claim = EscrowClaim(
                chain_id=env.chain_id, escrow=w.escrow.address, signer=w.key.address, payload=payload
            )
            await store.enqueue(
                Settlement(
                    key=f"p{i}",
                    kind="escrow",
                    payload=encode_claim(claim),
                    payer=w.account.address,
                    amount=amount,
                    created_at=time.time(),
                )
            )

        # Over the grant's per-call cap, or to anyone but the two sub-agents: refused with the escrow's codes.
        for payload, code in (
            (pay(a, MAX_PER_CALL + 1), EscrowCode.AMOUNT_EXCEEDS_CAP),
            (pay(w.key.address), EscrowCode.PAYEE_NOT_ALLOWED),
        ):
            p = payload.payment
            with pytest.raises(EscrowRejected) as refused:
                await verifier.verify(
                    payload, pay_to=p.payee, amount=int(p.amount), token=p.token, now=time.time()
                )
            assert refused.value.code == code

        before = [await w.usdc.balance_of(s) for s in w.subagents]
        held, deposit = await w.balances()
        outcomes = await EscrowSettler(store, env.relayer).drain()
        assert [o.status for o in outcomes] == ["settled"] * len(plan)
        assert len({o.tx_hash for o in outcomes}) == 1  # one batched settle

        expected = [sum(x for p, x in plan if p == s) for s in w.subagents]
        assert [
            await w.usdc.balance_of(s) - was for s, was in zip(w.subagents, before, strict=True)
        ] == expected
        assert await w.balances() == (held, deposit - sum(expected))
        assert (await w.escrow.grant_of(w.account.address, w.key.address)).spent == sum(expected)

        # The owner revokes the grant with another offline file; the key's next payment is refused.
        sign_revoke_offline(
            w.owner,
            account=w.account.address,
            chain_id=env.chain_id,
            escrow=w.escrow.address,
            signer=w.key.address,
            epoch=1,
        ).dump(tmp_path / "revoke.json")
        await relay_revoke(w.escrow, env.relayer, SignedRevoke.load(tmp_path / "revoke.json"))
        late = pay(a)
        with pytest.raises(EscrowRejected) as refused:
            await verifier.verify(late, pay_to=a, amount=PRICE, token=w.usdc.address, now=time.time())
        assert refused.value.code == EscrowCode.GRANT_REVOKED
