"""`python -m tests.bench.account_gas`: gas of `AgentAccount` operations on a fresh anvil devnet.

Every figure is the `gasUsed` of the `handleOps` transaction carrying one operation (a bundle of one, so it
includes the 21k intrinsic cost and the calldata, like the EOA baselines it sits beside). The call is a USDC
`transfer` to an existing holder (or three of them, batched), made:

- by the owner (65-byte ECDSA signature),
- by a session key whose policy allows it: one-of payee + amount cap (`session`), or with every policy enabled
  (timestamp, lifetime count, per-window rate limit, gas budget: `session_all_policies`),
- on a nonce lane already used (`single_call`, `batch_of_3`) or never used before (`new_lane`),

beside the same transfer sent by an EOA (`plain_transfer`), and the session key's single call sponsored by
`AgentPaymaster` (`sponsored_session_single_call`: verifying mode, where the sponsor's deposit pays, and token
mode, where the account pays in USDC at a signed price). `deploy` is the first operation of a
counterfactual account (initCode through the factory), `install_session_key` an owner operation installing
one key. The last line printed is one JSON object.
"""

from __future__ import annotations

import asyncio
import json
import secrets
from typing import Any

from escrow import Devnet, DevnetState
from escrow.accounts._account import AgentAccount, ArgRule, CallPermission, SessionPolicy
from escrow.accounts._paymaster import SponsorService
from escrow.accounts._self_bundler import Bundler, UserOpResult
from escrow.accounts._signers import OwnerKey, SessionKey
from escrow.accounts._userop import Call
from escrow.chain._rpc import Rpc, TxSender
from tests.test_account_env import calldata
from x402 import LocalSigner

ETH = 10**18


def _hex(signer: LocalSigner) -> str:
    return "0x" + signer._key.secret.hex()


async def _measure(state: DevnetState) -> dict[str, Any]:
    rpc = Rpc(state.rpc_url)
    try:
        relayer_key, eoa = LocalSigner.random(), LocalSigner.random()
        for who in (relayer_key, eoa):
            await rpc.request("anvil_setBalance", [who.address, hex(1_000 * ETH)])
        relayer = TxSender(rpc, _hex(relayer_key), chain_id=state.chain_id)
        bundler = Bundler(rpc, relayer, chain_id=state.chain_id)
        usdc = state.contracts["usdc"]
        payees = [LocalSigner.random().address for _ in range(3)]

        async def mint(to: str, amount: int) -> None:
            await relayer.transact(usdc, calldata("mint(address,uint256)", to, amount), gas=200_000)

        for payee in payees:  # existing holders, so every transfer is the same warm-ish SSTORE shape
            await mint(payee, 1)

        owner = OwnerKey(LocalSigner.random())
        account = await AgentAccount.counterfactual(
            rpc, factory=state.contracts["account_factory"], owner=owner.address, salt=secrets.randbits(64)
        )
        await rpc.request("anvil_setBalance", [account.address, hex(100 * ETH)])
        await mint(account.address, 10**12)
        await mint(eoa.address, 10**12)

        def transfer(i: int) -> Call:
            return Call(usdc, 0, calldata("transfer(address,uint256)", payees[i % 3], 1))

        out: dict[str, Any] = {}

        async def run(signer: OwnerKey | SessionKey, calls: list[Call]) -> UserOpResult:
            result = await account.execute(calls, signer=signer, bundler=bundler)
            assert result.success, result
            return result

        deploy = await run(owner, [transfer(0)])
        assert deploy.deployed
        out["deploy"] = deploy.bundle_gas_used

        cap = ArgRule.less_or_equal(1, 10**6)
        payee_rule = ArgRule.one_of(0, payees)
        plain = SessionKey(LocalSigner.random())
        install = await account.install_session_key(
            plain.address,
            SessionPolicy(
                permissions=(CallPermission.to(usdc, "transfer(address,uint256)", payee_rule, cap),),
                gas_budget=ETH,
            ),
            owner=owner,
            bundler=bundler,
        )
        out["install_session_key"] = install.bundle_gas_used
        now = await rpc.block_timestamp()
        full = SessionKey(LocalSigner.random(), interval=3600)
        await account.install_session_key(
            full.address,
            SessionPolicy(
                permissions=(CallPermission.to(usdc, "transfer(address,uint256)", payee_rule, cap),),
                valid_after=now - 60,
                valid_until=now + 86_400,
                max_uses=1_000,
                interval=3600,
                max_uses_per_interval=500,
                gas_budget=ETH,
            ),
            owner=owner,
            bundler=bundler,
        )

        signers: dict[str, OwnerKey | SessionKey] = {
            "owner": owner,
            "session": plain,
            "session_all_policies": full,
        }
        for name, signer in signers.items():
            await run(signer, [transfer(0)])  # warm-up: counters and lane 0 are non-zero from here on
            single = await run(signer, [transfer(1)])
            batch = await run(signer, [transfer(0), transfer(1), transfer(2)])
            # a brand-new lane: a NonceLanes prefix never used before
            lanes, account.lanes = (
                account.lanes,
                type(account.lanes)(rpc, account.address, prefix=secrets.randbits(64)),
            )
            fresh = await run(signer, [transfer(2)])
            account.lanes = lanes
            out.setdefault("single_call", {})[name] = single.bundle_gas_used
            out.setdefault("batch_of_3", {})[name] = batch.bundle_gas_used
            out.setdefault("new_lane", {})[name] = fresh.bundle_gas_used

        # the same session-key transfer, sponsored by AgentPaymaster: verifying (the sponsor's deposit pays)
        # and token (the account pays in USDC at a signed price), beside the unsponsored one
        paymaster = state.contracts["paymaster"]
        sponsor = SponsorService(
            paymaster=paymaster,
            signer=LocalSigner(state.deployer.private_key),
            chain_id=state.chain_id,
            spend_limit=ETH,
        )
        await run(owner, [Call(usdc, 0, calldata("approve(address,uint256)", paymaster, 2**256 - 1))])
        modes: dict[str, SponsorService | None] = {
            "unsponsored": None,
            "verifying": sponsor,
            "token": sponsor.token(usdc, 3_000 * 10**6),
        }
        for name, paid_by in modes.items():
            for _ in range(2):  # the first one warms the paymaster's per-account slots
                result = await account.execute(
                    [transfer(1)], signer=plain, bundler=bundler, paymaster=paid_by
                )
                assert result.success, result
            out.setdefault("sponsored_session_single_call", {})[name] = result.bundle_gas_used
        out["sponsorship_overhead"] = {
            k: out["sponsored_session_single_call"][k] - out["sponsored_session_single_call"]["unsponsored"]
            for k in ("verifying", "token")
        }

        # the EOA baseline: the same transfer, sent directly
        eoa_tx = TxSender(rpc, _hex(eoa), chain_id=state.chain_id)
        receipt = await eoa_tx.transact(
            usdc, calldata("transfer(address,uint256)", payees[1], 1), gas=100_000
        )
        out["plain_transfer"] = {"eoa_erc20": int(receipt.gas_used, 16)}
        receipt = await eoa_tx.transact(payees[1], b"", gas=21_000, value=1)
        out["plain_transfer"]["eoa_eth"] = int(receipt.gas_used, 16)
        out["session_overhead_vs_owner"] = {
            k: out["single_call"][k] - out["single_call"]["owner"]
            for k in ("session", "session_all_policies")
        }
        out["units"] = "gasUsed of the handleOps transaction (bundle of one) or of the EOA transaction"
        return out
    finally:
        await rpc.aclose()


def main() -> None:
    with Devnet() as state:
        if state.backend != "anvil":
            raise SystemExit("the account gas bench needs anvil")
        result = asyncio.run(_measure(state))
    for key, value in result.items():
        print(f"{key}: {value}")
    print(json.dumps(result, sort_keys=True))


if __name__ == "__main__":
    main()
