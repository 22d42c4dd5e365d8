"""Shared setup of the smart-account suites (`AccountEnv`), and the checks that pin Python to the contracts:
the v0.7 userOpHash equals `EntryPoint.getUserOpHash`, the EIP-712 install digest equals the account's own.

Every account test works on fresh keys funded with `anvil_setBalance`, so it shares nothing with other suites.
"""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import pytest
from eth_abi.abi import decode as abi_decode
from eth_abi.abi import encode as abi_encode
from eth_utils.crypto import keccak
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from escrow import DevnetState, load_artifact
from escrow.accounts._account import (
    AgentAccount,
    ArgRule,
    CallPermission,
    SessionPolicy,
    install_typed_data,
    revoke_typed_data,
)
from escrow.accounts._self_bundler import Bundler
from escrow.accounts._signers import OwnerKey
from escrow.accounts._userop import ENTRYPOINT_V07, Call, PackedUserOperation, user_op_hash
from escrow.chain._rpc import Rpc, TxSender
from escrow.payments._escrow import deploy_contract
from tests.conftest import unavailable
from x402 import LocalSigner, typed_data_digest

pytestmark = [pytest.mark.chain, pytest.mark.anyio]

ETH = 10**18


def _key_hex(signer: LocalSigner) -> str:
    return "0x" + signer._key.secret.hex()


@dataclass
class AccountEnv:
    """One test's view of the devnet: a funded relayer bundling our own operations, and the factory."""

    devnet: DevnetState
    rpc: Rpc
    relayer_key: LocalSigner
    relayer: TxSender
    bundler: Bundler
    factory: str
    chain_id: int

    async def fund(self, address: str, wei: int = 100 * ETH) -> None:
        await self.rpc.request("anvil_setBalance", [address, hex(wei)])

    async def new_account(self, *, deploy: bool = True) -> tuple[AgentAccount, OwnerKey]:
        """A fresh owner's account, funded with ETH; deployed by a first (owner-signed, empty) operation."""
        owner = OwnerKey(LocalSigner.random())
        account = await AgentAccount.counterfactual(
            self.rpc, factory=self.factory, owner=owner.address, salt=secrets.randbits(64)
        )
        await self.fund(account.address)
        if deploy:
            result = await account.execute([Call(owner.address, 0, b"")], signer=owner, bundler=self.bundler)
            assert result.success and result.deployed
        return account, owner

    async def now(self) -> int:
        return await self.rpc.block_timestamp()

    async def deploy(self, name: str, *args: Any) -> str:
        """Deploy from a throwaway key (the relayer's nonce is counted locally by its `TxSender`)."""
        deployer = LocalSigner.random()
        await self.fund(deployer.address, ETH)
        return await deploy_contract(self.rpc, _key_hex(deployer), load_artifact(name), args)

    async def call(self, to: str, signature: str, *args: Any, returns: Sequence[str] = ("uint256",)) -> Any:
        types = signature[signature.index("(") + 1 : -1]
        data = keccak(text=signature)[:4] + abi_encode([t for t in _split(types)], list(args))
        out = abi_decode(list(returns), await self.rpc.call(to, data))
        return out[0] if len(out) == 1 else out

    async def transact(self, to: str, signature: str, *args: Any, gas: int = 300_000) -> None:
        types = signature[signature.index("(") + 1 : -1]
        data = keccak(text=signature)[:4] + abi_encode([t for t in _split(types)], list(args))
        await self.relayer.transact(to, data, gas=gas)


def _split(types: str) -> list[str]:
    out, depth, current = [], 0, ""
    for ch in types:
        if ch == "," and depth == 0:
            out.append(current)
            current = ""
            continue
        depth += ch == "("
        depth -= ch == ")"
        current += ch
    if current:
        out.append(current)
    return out


def calldata(signature: str, *args: Any) -> bytes:
    """`selector ++ abi.encode(args)` for a plain signature such as `"transfer(address,uint256)"`."""
    types = signature[signature.index("(") + 1 : -1]
    return keccak(text=signature)[:4] + abi_encode(_split(types), list(args))


@asynccontextmanager
async def account_env(devnet: DevnetState) -> AsyncIterator[AccountEnv]:
    if devnet.backend != "anvil":
        unavailable("the account suites fund fresh keys with anvil_setBalance")
    rpc = Rpc(devnet.rpc_url)
    try:
        relayer_key = LocalSigner.random()
        await rpc.request("anvil_setBalance", [relayer_key.address, hex(10_000 * ETH)])
        relayer = TxSender(rpc, _key_hex(relayer_key), chain_id=devnet.chain_id)
        factory: str | None = devnet.contracts.get("account_factory")
        if factory is None:  # an older devnet without the factory row
            factory = await deploy_contract(
                rpc, _key_hex(relayer_key), load_artifact("AgentAccountFactory"), [ENTRYPOINT_V07]
            )
        bundler = Bundler(rpc, relayer, chain_id=devnet.chain_id)
        yield AccountEnv(devnet, rpc, relayer_key, relayer, bundler, factory, devnet.chain_id)
    finally:
        await rpc.aclose()


# ---------------------------------------------------------------------------------------------- hash checks

_GET_USER_OP_HASH = keccak(
    text="getUserOpHash((address,uint256,bytes,bytes,bytes32,uint256,bytes32,bytes,bytes))"
)[:4]


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    nonce=st.integers(0, 2**256 - 1),
    init_code=st.binary(max_size=80),
    call_data=st.binary(max_size=200),
    gas=st.tuples(*[st.integers(0, 2**128 - 1)] * 5),
    paymaster=st.binary(max_size=90),
    signature=st.binary(max_size=100),
)
def test_user_op_hash_equals_entrypoint(
    devnet: DevnetState,
    nonce: int,
    init_code: bytes,
    call_data: bytes,
    gas: tuple[int, int, int, int, int],
    paymaster: bytes,
    signature: bytes,
) -> None:
    import anyio

    op = PackedUserOperation(
        sender="0x" + secrets.token_hex(20),
        nonce=nonce,
        init_code=init_code,
        call_data=call_data,
        verification_gas_limit=gas[0],
        call_gas_limit=gas[1],
        pre_verification_gas=gas[2],
        max_priority_fee_per_gas=gas[3],
        max_fee_per_gas=gas[4],
        paymaster_and_data=paymaster,
        signature=signature,  # not hashed
    )

    async def onchain() -> bytes:
        rpc = Rpc(devnet.rpc_url)
        try:
            data = _GET_USER_OP_HASH + abi_encode(
                ["(address,uint256,bytes,bytes,bytes32,uint256,bytes32,bytes,bytes)"], [op.packed()]
            )
            return await rpc.call(ENTRYPOINT_V07, data)
        finally:
            await rpc.aclose()

    assert anyio.run(onchain) == user_op_hash(op, chain_id=devnet.chain_id)


async def test_install_and_revoke_digests_equal_the_accounts(devnet: DevnetState) -> None:
    async with account_env(devnet) as env:
        account, owner = await env.new_account()
        policy = SessionPolicy(
            valid_after=10,
            valid_until=2**40,
            max_uses=7,
            interval=3600,
            max_uses_per_interval=2,
            gas_budget=10**17,
            permissions=(
                CallPermission.to(
                    env.devnet.contracts["usdc"],
                    "transfer(address,uint256)",
                    ArgRule.one_of(0, [owner.address, env.relayer.address]),
                    ArgRule.less_or_equal(1, 5 * 10**6),
                ),
                CallPermission.plain_transfer(owner.address, value_limit=ETH),
            ),
        )
        key, nonce, deadline = LocalSigner.random().address, 2**200 + 5, 2**47
        local = typed_data_digest(
            install_typed_data(
                chain_id=env.chain_id,
                account=account.address,
                key=key,
                policy=policy,
                nonce=nonce,
                deadline=deadline,
            )
        )
        assert local == await account.hash_install_session_key(key, policy, nonce, deadline)
        data = keccak(text="hashRevokeSessionKey(address,uint256,uint48)")[:4] + abi_encode(
            ["address", "uint256", "uint48"], [key, nonce, deadline]
        )
        onchain = await env.rpc.call(account.address, data)
        assert onchain == typed_data_digest(
            revoke_typed_data(
                chain_id=env.chain_id, account=account.address, key=key, nonce=nonce, deadline=deadline
            )
        )
