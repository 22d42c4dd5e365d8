"""`channel_session_policy` on the real AgentAccount: a property test of exactly what it lets a key do.

An installed key signs a user operation `[approve(spender, a), open(payee, token, d, salt, signer, splits)]`
with every part drawn at random around the policy's edges; the EntryPoint's own validation (a `handleOps`
simulation, nothing lands) must accept it exactly when every part is what the owner allowed: spender = the
channels contract, `a` and `d` at most the cap, an allowed payee, the USDC token, the key itself as the
voucher signer, and no splits.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import anyio
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from escrow import (
    AgentAccount,
    Bundler,
    Call,
    Chain,
    DevnetState,
    SessionKey,
    TxSender,
    UserOpRejected,
    channel_session_policy,
    sign_session_key_install_offline,
)
from escrow.chain._abi import ContractAbi
from escrow.payments._escrow import escrow_artifact
from x402 import LocalSigner

pytestmark = [pytest.mark.chain]

CAP = 5_000
PAYEES = [LocalSigner.random().address for _ in range(2)]
OTHER = LocalSigner.random().address
KEY = LocalSigner.random()


@dataclass(frozen=True)
class Installed:
    account: str
    relayer_key: str


async def _install(devnet: DevnetState) -> Installed:
    async with Chain.from_devnet(devnet) as chain:
        relayer_key = "0x" + os.urandom(32).hex()
        relayer = TxSender(chain.rpc, relayer_key, chain_id=devnet.chain_id)
        await chain.rpc.request("anvil_setBalance", [relayer.address, hex(10**20)])
        owner = LocalSigner.random()
        account = await AgentAccount.counterfactual(
            chain.rpc, factory=devnet.contracts["account_factory"], owner=owner.address, salt=7
        )
        await chain.rpc.request("anvil_setBalance", [account.address, hex(10**18)])
        token = chain.token
        await relayer.transact(
            token.address, token.abi.encode("mint", account.address, 10 * CAP), gas=100_000
        )
        await account.deploy(relayer)
        policy = channel_session_policy(
            channels=devnet.contracts["channels"],
            token=token.address,
            payees=PAYEES,
            max_deposit=CAP,
            key=KEY.address,
        )
        signed = sign_session_key_install_offline(
            owner,
            chain_id=devnet.chain_id,
            account=account.address,
            key=KEY.address,
            policy=policy,
            deadline=await chain.rpc.block_timestamp() + 600,
        )
        await account.relay_install(signed, relayer)
        return Installed(account.address, relayer_key)


@pytest.fixture(scope="module")
def installed(devnet: DevnetState) -> Installed:
    return anyio.run(_install, devnet)


async def _accepted(devnet: DevnetState, installed: Installed, calls: list[Call]) -> bool:
    async with Chain.from_devnet(devnet) as chain:
        relayer = TxSender(chain.rpc, installed.relayer_key, chain_id=devnet.chain_id)
        bundler = Bundler(chain.rpc, relayer, chain_id=devnet.chain_id)
        account = AgentAccount(chain.rpc, installed.account, chain_id=devnet.chain_id)
        nonce = await account.lanes.next_nonce(0)
        op = await account.prepare(calls, signer=SessionKey(KEY), nonce=nonce, call_gas_limit=400_000)
        try:
            await bundler.simulate([op])
        except UserOpRejected as rejected:
            assert rejected.violation is not None, rejected  # a policy said no, not anything else
            return False
        return True


amounts = st.one_of(st.sampled_from([0, 1, CAP - 1, CAP, CAP + 1, 2**96]), st.integers(0, 2 * CAP))


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    spender_ok=st.booleans(),
    approved=amounts,
    payee=st.sampled_from([*PAYEES, OTHER]),
    token_ok=st.booleans(),
    deposit=amounts,
    signer_ok=st.booleans(),
    splits=st.lists(st.integers(1, 9_999), max_size=2),
)
def test_the_key_may_open_exactly_what_the_owner_allowed(
    devnet: DevnetState,
    installed: Installed,
    spender_ok: bool,
    approved: int,
    payee: str,
    token_ok: bool,
    deposit: int,
    signer_ok: bool,
    splits: list[int],
) -> None:
    channels, usdc = devnet.contracts["channels"], devnet.contracts["usdc"]
    abi, erc20 = (
        ContractAbi(escrow_artifact("AgentChannels").abi),
        ContractAbi(escrow_artifact("TestUSDC").abi),
    )
    args: list[Any] = [
        payee,
        usdc if token_ok else OTHER,
        deposit,
        os.urandom(32),
        KEY.address if signer_ok else OTHER,
        [OTHER] * len(splits),
        [bps // max(1, len(splits)) or 1 for bps in splits],
    ]
    calls = [
        Call(usdc, 0, erc20.encode("approve", channels if spender_ok else OTHER, approved)),
        Call(channels, 0, abi.encode("open", *args)),
    ]
    allowed = (
        spender_ok
        and approved <= CAP
        and payee in PAYEES
        and token_ok
        and deposit <= CAP
        and signer_ok
        and not splits
    )
    assert anyio.run(_accepted, devnet, installed, calls) == allowed
