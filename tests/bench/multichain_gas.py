"""`python -m tests.bench.multichain_gas`: gas of one owner signature for many chains, per chain.

Two anvils with distinct chain ids (`escrow.Devnets(2)`) carry the same contracts. For an approval over 2,
4 and 8 chains (each chain: one `AgentEscrow` grant and one `AgentAccount` session-key install, so 4, 8 and
16 leaves), the owner signs once and each of the two running chains relays its two leaves (`grantWithProof`,
`installSessionKeyWithProof`); chains beyond the two running ones are other chain ids in the same tree (their
leaves weigh on the proof length exactly as real ones would). Beside them, the single-chain forms the owner
signs once per chain (`grantWithSig`, `installSessionKeyWithSig`), and the revokes (`revokeWithProof` over
all chains vs `revokeWithSig`), and a grant whose payer is the owner's `AgentAccount` (ERC-1271: the
multichain form vs ERC-7739 per chain). Figures are receipt `gasUsed` (21k intrinsic and calldata included),
fresh keys each time. The last line printed is one JSON object.
"""

from __future__ import annotations

import asyncio
import json
import secrets
from typing import Any

from escrow import (
    AgentAccount,
    AgentEscrow,
    ArgRule,
    CallPermission,
    Devnets,
    MultichainApproval,
    SessionPolicy,
    TxSender,
    relay_grant,
    relay_multichain,
    relay_revoke,
    sign_grant_offline,
    sign_revoke_offline,
    sign_session_key_install_offline,
)
from escrow.chain._rpc import Rpc
from escrow.devnet._devnet import DevnetChain
from x402 import LocalSigner

ETH = 10**18
DEADLINE = 2**40


def _gas(receipt: Any) -> int:
    return int(receipt.gas_used, 16)


class _Side:
    def __init__(self, chain: DevnetChain, rpc: Rpc, relayer: TxSender) -> None:
        self.chain, self.rpc, self.relayer = chain, rpc, relayer
        self.escrow = AgentEscrow(rpc, chain.contracts["escrow"])

    async def account(self, owner: str, salt: int) -> AgentAccount:
        account = await AgentAccount.counterfactual(
            self.rpc, factory=self.chain.contracts["account_factory"], owner=owner, salt=salt
        )
        await account.deploy(self.relayer)
        return account


def _policy(usdc: str) -> SessionPolicy:
    return SessionPolicy(
        permissions=(CallPermission.to(usdc, "transfer(address,uint256)", ArgRule.less_or_equal(1, 5_000)),),
        gas_budget=ETH,
    )


async def _multichain(sides: list[_Side], n: int) -> dict[str, Any]:
    owner, key = LocalSigner.random(), LocalSigner.random()
    salt = secrets.randbits(64)
    accounts = [await s.account(owner.address, salt) for s in sides]  # same address on both chains
    usdc = sides[0].chain.contracts["usdc"]
    escrow = sides[0].escrow.address
    running = [s.chain.chain_id for s in sides]
    ids = [*running, *(10_000_000 + k for k in range(n - len(running)))]
    approval = MultichainApproval()
    for chain_id in ids:
        approval.grant(
            chain_id=chain_id,
            escrow=escrow,
            payer=owner.address,
            signer=key.address,
            token=usdc,
            max_per_call=2_000,
            budget=50_000,
            valid_until=2**32 - 1,
            epoch=1,
        )
        approval.install_session_key(
            chain_id=chain_id,
            account=accounts[0].address,
            key=key.address,
            policy=_policy(usdc),
            deadline=DEADLINE,
        )
    signed = approval.sign(owner)
    revoke = MultichainApproval()
    for chain_id in ids:
        revoke.revoke_grant(
            chain_id=chain_id, escrow=escrow, payer=owner.address, signer=key.address, epoch=1
        )
    signed_revoke = revoke.sign(owner)
    out: dict[str, Any] = {"leaves": 2 * n, "proof_length": len(signed.entries[0].proof)}
    for side in sides:
        grant, install = await relay_multichain(side.relayer, signed)
        (revoked,) = await relay_multichain(side.relayer, signed_revoke)
        out[f"chain_{side.chain.chain_id}"] = {
            "grant_with_proof": _gas(grant),
            "install_with_proof": _gas(install),
            "revoke_with_proof": _gas(revoked),
        }
    return out


async def _single(side: _Side) -> dict[str, int]:
    owner, key = LocalSigner.random(), LocalSigner.random()
    usdc = side.chain.contracts["usdc"]
    account = await side.account(owner.address, secrets.randbits(64))
    grant = sign_grant_offline(
        owner,
        chain_id=side.chain.chain_id,
        escrow=side.escrow.address,
        signer=key.address,
        token=usdc,
        max_per_call=2_000,
        budget=50_000,
        valid_until=2**32 - 1,
        epoch=1,
    )
    install = sign_session_key_install_offline(
        owner,
        chain_id=side.chain.chain_id,
        account=account.address,
        key=key.address,
        policy=_policy(usdc),
        deadline=DEADLINE,
    )
    revoke = sign_revoke_offline(
        owner, chain_id=side.chain.chain_id, escrow=side.escrow.address, signer=key.address, epoch=1
    )
    return {
        "grant_with_sig": _gas(await relay_grant(side.escrow, side.relayer, grant)),
        "install_with_sig": _gas(await account.relay_install(install, side.relayer)),
        "revoke_with_sig": _gas(await relay_revoke(side.escrow, side.relayer, revoke)),
    }


async def _account_payer(sides: list[_Side]) -> dict[str, Any]:
    """The payer is the owner's `AgentAccount`: the single-chain grant is the owner's ERC-7739 signature (one
    per chain); the multichain one (2 chains, a grant leaf per chain) asks the account's ERC-1271 with
    `root ++ signature`."""
    owner, key = LocalSigner.random(), LocalSigner.random()
    usdc = sides[0].chain.contracts["usdc"]
    salt = secrets.randbits(64)
    accounts = [await s.account(owner.address, salt) for s in sides]
    terms: dict[str, Any] = {"max_per_call": 2_000, "budget": 50_000, "valid_until": 2**32 - 1}
    approval = MultichainApproval()
    for side in sides:
        approval.grant(
            chain_id=side.chain.chain_id,
            escrow=side.escrow.address,
            payer=accounts[0].address,
            signer=key.address,
            token=usdc,
            epoch=1,
            **terms,
        )
    signed = approval.sign(owner)
    out: dict[str, Any] = {}
    for side in sides:
        (grant,) = await relay_multichain(side.relayer, signed)
        out[f"chain_{side.chain.chain_id}_grant_with_proof"] = _gas(grant)
    first = sides[0]
    single = sign_grant_offline(
        owner,
        account=accounts[0].address,
        chain_id=first.chain.chain_id,
        escrow=first.escrow.address,
        signer=LocalSigner.random().address,  # a fresh key: same storage writes as the multichain grant
        token=usdc,
        epoch=1,
        **terms,
    )
    out["grant_with_sig_erc7739"] = _gas(await relay_grant(first.escrow, first.relayer, single))
    return out


async def _measure(chains: list[DevnetChain]) -> dict[str, Any]:
    rpcs = [Rpc(c.rpc_url) for c in chains]
    try:
        sides = []
        for chain, rpc in zip(chains, rpcs, strict=True):
            relayer_key = LocalSigner.random()
            await rpc.request("anvil_setBalance", [relayer_key.address, hex(1_000 * ETH)])
            relayer = TxSender(rpc, "0x" + relayer_key._key.secret.hex(), chain_id=chain.chain_id)
            sides.append(_Side(chain, rpc, relayer))
        out: dict[str, Any] = {"single_chain": await _single(sides[0])}
        for n in (2, 4, 8):
            out[f"multichain_{n}_chains"] = await _multichain(sides, n)
        out["account_payer_2_chains"] = await _account_payer(sides)
        single, first = out["single_chain"], chains[0].chain_id
        out["proof_overhead"] = {
            f"{n}_chains": {
                "grant": out[f"multichain_{n}_chains"][f"chain_{first}"]["grant_with_proof"]
                - single["grant_with_sig"],
                "install": out[f"multichain_{n}_chains"][f"chain_{first}"]["install_with_proof"]
                - single["install_with_sig"],
            }
            for n in (2, 4, 8)
        }
        out["owner_signatures"] = {
            "single_chain_per_n_chains": "2n (grant + install per chain)",
            "multichain": 1,
        }
        out["units"] = "receipt gasUsed per relayed transaction (per chain)"
        return out
    finally:
        for rpc in rpcs:
            await rpc.aclose()


def main() -> None:
    with Devnets(2) as state:  # chain ids 31337 and 31338, the same contracts at the same addresses
        if state.backend != "anvil":
            raise SystemExit("the multichain gas bench needs anvil")
        result = asyncio.run(_measure(list(state.chains)))
    for key, value in result.items():
        print(f"{key}: {value}")
    print(json.dumps(result, sort_keys=True))


if __name__ == "__main__":
    main()
