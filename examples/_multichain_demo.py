"""The demo's two-chain part: one owner signature, and the session key pays a sub-agent on each chain.

The devnet runs two chains that look like Base and Arbitrum (their chain ids, USDC at their canonical
addresses). The orchestrator's money lives in its `AgentAccount`, at the same address on both chains (same
factory, owner and salt): deployed on Base by the first part of the demo, funded but not yet deployed on
Arbitrum. The owner signs ONE `MultichainApproval` offline: an EIP-712 signature over a Merkle root whose
leaves are the session key's install on the Arbitrum account and an escrow grant per chain whose payer is
the account, each leaf bound to its chain id and contract. A relayer deploys the account on Arbitrum and
sends each chain its leaves with their proofs (`relay_multichain`); the Base grant leaf, sent to Arbitrum,
is refused there. On each chain the session key moves money from the account into its escrow deposit (one
sponsored UserOperation its account policy allows: `[approve, deposit]`, capped). One sub-agent prices its
work on Base, one on Arbitrum; the orchestrator holds one `WalletSet` (a session-key wallet per chain, a
spend cap per network) and pays both; each sub-agent settles its payments in one batch on its own chain. A
payment the key signs under Base's EIP-712 domain, presented on Arbitrum, is refused. Every balance is
checked to the unit, on each chain.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import httpx
import msgspec

from escrow import (
    AgentAccount,
    AgentEscrow,
    Bundler,
    DevnetChain,
    DevnetState,
    Erc20,
    EscrowGrantLeaf,
    MultichainApproval,
    MultichainError,
    Rpc,
    SessionKey,
    SignedMultichainApproval,
    SponsorService,
    TxSender,
    relay_multichain,
)
from x402 import (
    PAYMENT_REQUIRED_HEADER,
    GrantMessage,
    LocalSigner,
    SettleResponse,
    Signer,
    decode_payment_required,
)
from x402.client import PaymentAuth, SpendPolicy, WalletSet, receipt_of
from x402.client_escrow import EscrowWallet

from ._escrow_setup import top_up_calls, top_up_policy
from ._escrow_subagents import SubAgent, serving

__all__ = ["pay_on_two_chains"]

USDC = 10**6
FUNDS = 10 * USDC  # what the account holds on the second chain before it even exists there
DEPOSIT = 1 * USDC  # what the session key moves from the account into the escrow, on each chain
TOP_UP_CAP = 10 * USDC  # the most one top-up may move (the second chain's account policy)
MAX_PER_CALL = 5_000  # each chain's grant: $0.005 per call...
BUDGET = 50_000  # ...$0.05 in all, on that chain
PER_NETWORK = 30_000  # the orchestrator's own cap on each network (its spend policy)
WINDOW = 3600  # the grants, the install and the key's account policy are valid for one hour
TREASURY, RELAYER, SETTLER = 0, 3, 5  # devnet accounts (the same index on each chain)
# (sub-agent, path, price, calls) per chain, in the devnet's chain order.
PLAN = (("researcher", "/research", 3_000, 4), ("analyst", "/analyze", 2_000, 3))

Say = Callable[..., None]


def usd(atomic: int) -> str:
    return f"{atomic / USDC:.6f}".rstrip("0").rstrip(".")


def short(address: str) -> str:
    return f"{address[:6]}…{address[-4:]}"


@dataclass
class Side:
    """One chain as the demo sees it: its node, escrow and token, the orchestrator's account there, a relayer
    (who also bundles the account's UserOperations, sponsored by the chain's paymaster), and the sub-agent
    paid there."""

    chain: DevnetChain
    rpc: Rpc
    escrow: AgentEscrow
    usdc: Erc20
    account: AgentAccount
    relayer: TxSender
    sponsor: SponsorService
    agent: SubAgent
    path: str
    calls: int

    @property
    def label(self) -> str:
        return self.chain.label


async def pay_on_two_chains(
    state: DevnetState, workdir: Path, say: Say, *, owner: Signer, session: Signer
) -> bool:
    """The two-chain step on `state`'s first two chains: `owner` (offline) authorises `session` on its
    account on both, `session` pays a sub-agent on each from the account's escrow deposit there. Prints every
    step; True when every balance moved exactly."""
    if len(state.chains) < 2:
        say("two chains", "skipped: this devnet runs one chain")
        return True
    sides: list[Side] = []
    try:
        for chain, (name, path, price, calls) in zip(state.chains[:2], PLAN, strict=True):
            rpc = Rpc(chain.rpc_url)
            agent = SubAgent.escrow(
                state,
                name=name,
                pay_to=LocalSigner.random().address,
                settler_key=state.accounts[SETTLER].private_key,
                routes={path: price},
                chain=chain.label,
            )
            # The same factory, owner and salt on every chain: the same account address on every chain.
            account = await AgentAccount.counterfactual(
                rpc, factory=chain.contracts["account_factory"], owner=owner.address
            )
            sponsor = SponsorService(
                paymaster=chain.contracts["paymaster"],
                signer=LocalSigner(state.accounts[TREASURY].private_key),
                chain_id=chain.chain_id,
            )
            sides.append(
                Side(
                    chain,
                    rpc,
                    AgentEscrow(rpc, chain.contracts["escrow"]),
                    Erc20(rpc, chain.contracts["usdc"]),
                    account,
                    TxSender(rpc, state.accounts[RELAYER].private_key, chain_id=chain.chain_id),
                    sponsor,
                    agent,
                    path,
                    calls,
                )
            )
        return await _two_chains(state, sides, workdir, say, owner=owner, session=session)
    finally:
        for side in sides:
            await side.rpc.aclose()


async def _two_chains(
    state: DevnetState, sides: list[Side], workdir: Path, say: Say, *, owner: Signer, session: Signer
) -> bool:
    a, b = sides
    say(
        "two chains",
        f"{a.label} (chain {a.chain.chain_id}) and {b.label} (chain {b.chain.chain_id}): the same contracts,"
        " each chain's own USDC",
    )
    account = a.account.address
    if b.account.address != account:
        say(
            "account?",
            f"the account is {short(account)} on {a.label}, {short(b.account.address)} on {b.label}",
        )
        return False
    # The account's money on the second chain arrives before the account exists there.
    bank = TxSender(b.rpc, state.accounts[TREASURY].private_key, chain_id=b.chain.chain_id)
    await bank.transact(b.usdc.address, b.usdc.abi.encode("mint", account, FUNDS), gas=100_000)
    say(
        "account",
        f"the owner's account {short(account)}, the same address on both chains (same factory, owner, salt):",
    )
    say("", f"deployed on {a.label}; on {b.label} it holds {usd(FUNDS)} USDC and no ETH, not deployed yet")

    grants = await _authorise(sides, workdir, say, owner=owner, session=session)
    if grants is None:
        return False
    before = await _read(sides, account)
    if not await _top_up(sides, session, say):
        return False

    async with serving(*(side.agent for side in sides)):
        for side in sides:
            agent = side.agent
            say(
                "sub-agent",
                f"{agent.name:<11}escrow {side.path} {usd(agent.prices[side.path])} on {side.label:<9}"
                f" {agent.url}  pays {short(agent.pay_to)}",
            )
        # One payer for both chains: a session-key wallet per chain, and a cap per network.
        wallets = WalletSet(
            [
                EscrowWallet.from_grant(
                    session, grant, chain_id=side.chain.chain_id, escrow=side.escrow.address
                )
                for side, grant in zip(sides, grants, strict=True)
            ]
        )
        policy = SpendPolicy(
            max_per_call=MAX_PER_CALL,
            per_network_budget={side.chain.network: PER_NETWORK for side in sides},
        )
        auth = PaymentAuth(wallets, policy, networks=[side.chain.network for side in sides])
        async with httpx.AsyncClient(auth=auth, timeout=30.0) as client:
            for side in sides:
                url = side.agent.url + side.path
                responses = await asyncio.gather(*(client.get(url) for _ in range(side.calls)))
                networks = {r.network for r in map(receipt_of, responses) if isinstance(r, SettleResponse)}
                codes = [r.status_code for r in responses]
                say(
                    "paid",
                    f"{side.agent.name:<11}GET {side.path:<10} {codes.count(200)} x 200  escrow on"
                    f" {', '.join(sorted(networks)) or '?'} ({side.label}), deferred",
                )
                if codes.count(200) != side.calls or networks != {side.chain.network}:
                    return False
        if not await _cross_chain_refused(a, b, grants[0], session, say):
            return False
        for side in sides:
            stats = await side.agent.settled()
            for count, gas in side.agent.batches:
                say(
                    "settled",
                    f"{side.agent.name:<11}on {side.label:<9} {count} payments, one settle(): {gas:,} gas",
                )
            if stats.dead:
                say("LOST", f"{side.agent.name}: {stats.dead} payments could not be settled")
                return False

    after = await _read(sides, account)
    return await _check(sides, before, after, account, session.address, say)


async def _authorise(
    sides: list[Side], workdir: Path, say: Say, *, owner: Signer, session: Signer
) -> list[GrantMessage] | None:
    """The owner's ONE offline signature: the session key installed on the second chain's account (the first
    chain's account installed it from the demo's first file), and an escrow grant per chain whose payer is
    the account. A relayer deploys the second chain's account and sends each chain its leaves; the grants
    (None: something was not refused).

    Before the second chain gets its own leaves, the first chain's grant leaf is sent there: refused."""
    a, b = sides
    account = a.account.address
    now = await a.rpc.block_timestamp()
    # A grant names an epoch above the current one on its chain (the account granted this key at epoch 1 on
    # the first chain): one epoch above every chain's, so the grant reads the same everywhere.
    epoch = 1 + max([(await side.escrow.grant_of(account, session.address)).epoch for side in sides])
    approval = MultichainApproval()
    approval.install_session_key(
        chain_id=b.chain.chain_id,
        account=account,
        key=session.address,
        policy=top_up_policy(
            usdc=b.usdc.address,
            escrow=b.escrow.address,
            cap=TOP_UP_CAP,
            valid_until=now + WINDOW,
            max_uses=5,
        ),
        deadline=now + WINDOW,
    )
    for side in sides:
        approval.grant(
            chain_id=side.chain.chain_id,
            escrow=side.escrow.address,
            payer=account,
            signer=session.address,
            token=side.usdc.address,
            max_per_call=MAX_PER_CALL,
            budget=BUDGET,
            valid_after=now - 60,
            valid_until=now + WINDOW,
            payees=[side.agent.pay_to],
            epoch=epoch,
        )
    file = workdir / "multichain-approval.json"
    approval.sign(owner).dump(file)  # the one signature; the owner key goes back offline
    signed = SignedMultichainApproval.load(file)  # what a relayer reads
    signed.verify()
    say(
        "offline",
        f"the owner signed 1 approval for {len(signed.chain_ids)} chains: {file.name}, one EIP-712 signature",
    )
    say(
        "",
        f"over Merkle root {signed.root[:10]}… of {len(signed.entries)} leaves, each naming its chain id: the"
        f" key's install on {b.label},",
    )
    say("", f"and a grant per chain whose payer is the account (epoch {epoch})")
    # Anyone deploys the account on the second chain: the owner is part of its CREATE2 salt.
    await b.account.deploy(b.relayer)
    await relay_multichain(a.relayer, signed)
    # Chain A's grant leaf, relabelled for chain B and sent to B's escrow (at the same address, for the same
    # account, deployed there now): B recomputes the leaf from its own chain id, and A's proof does not prove
    # it.
    replayed = msgspec.structs.replace(
        signed,
        entries=tuple(
            msgspec.structs.replace(e, action=msgspec.structs.replace(e.action, chain_id=b.chain.chain_id))
            for e in signed.for_chain(a.chain.chain_id)
        ),
    )
    try:
        await relay_multichain(b.relayer, replayed)
    except MultichainError as refused:
        why = str(refused).rsplit(": ", 1)[-1]
        say("refused", f"{a.label}'s grant leaf, sent to {b.label}'s escrow: {refused.code} ({why})")
    else:
        say("refused?", f"{a.label}'s grant leaf was accepted on {b.label}: the chain binding failed")
        return None
    await relay_multichain(b.relayer, signed)
    if not (await b.account.session_key(session.address)).installed:
        say("install?", f"the session key is not installed on {b.label}'s account")
        return None
    say(
        "relayed",
        f"by {short(b.relayer.address)}: the account deployed on {b.label}, the key installed there",
    )
    say("", "(escrow top-ups only); each chain's grant with its proof: session key")
    say(
        "",
        f"{short(session.address)} granted {usd(MAX_PER_CALL)} USDC per call, budget {usd(BUDGET)}, on each"
        " chain, payer the account",
    )
    grants = [
        entry.action.grant
        for side in sides
        for entry in signed.for_chain(side.chain.chain_id)
        if isinstance(entry.action, EscrowGrantLeaf)
    ]
    return grants


async def _top_up(sides: list[Side], session: Signer, say: Say) -> bool:
    """On each chain, the session key moves `DEPOSIT` from the account into its escrow deposit: one
    UserOperation `[approve, deposit]` its account policy allows, sponsored by the chain's paymaster."""
    for side in sides:
        bundler = Bundler(side.rpc, side.relayer, chain_id=side.chain.chain_id)
        result = await side.account.execute(
            top_up_calls(side.usdc, side.escrow, DEPOSIT),
            signer=SessionKey(session),
            bundler=bundler,
            paymaster=side.sponsor,
        )
        if not result.success:
            say("top-up?", f"on {side.label}: 0x{result.revert_reason.hex()}")
            return False
    say(
        "top-up", f"the session key moved {usd(DEPOSIT)} USDC from the account into the escrow on each chain:"
    )
    say(
        "",
        "one UserOperation each, [approve, deposit] within its account policy; AgentPaymaster paid the gas",
    )
    return True


async def _cross_chain_refused(a: Side, b: Side, grant: GrantMessage, session: Signer, say: Say) -> bool:
    """The key signs a payment to `b`'s sub-agent under `a`'s EIP-712 domain (chain id and escrow): `b`'s
    gateway checks it against its own chain's domain and refuses it."""
    rogue = EscrowWallet.from_grant(session, grant, chain_id=a.chain.chain_id, escrow=a.escrow.address)
    # The wallet signs for chain A, but is made to accept chain B's offers (a confused or compromised
    # client): what reaches B is a payment signed for A.
    rogue.network, rogue.token, rogue.payees = b.chain.network, b.usdc.address, frozenset()
    async with httpx.AsyncClient(auth=PaymentAuth(rogue), timeout=30.0) as client:
        answer = await client.get(b.agent.url + b.path)
    header = answer.headers.get(PAYMENT_REQUIRED_HEADER)
    reason = (decode_payment_required(header).error if header else None) or "(no reason given)"
    say(
        "refused",
        f"a payment the key signed for {a.label} (chain {a.chain.chain_id}), presented on {b.label}:",
    )
    say("", f"  {b.agent.name} answers {answer.status_code} {reason}")
    return answer.status_code == 402


async def _read(sides: list[Side], account: str) -> dict[tuple[str, str], int]:
    out: dict[tuple[str, str], int] = {}
    for side in sides:
        out[(side.agent.name, side.label)] = await side.usdc.balance_of(side.agent.pay_to)
        out[("account", side.label)] = await side.usdc.balance_of(account)
        out[("account deposit", side.label)] = await side.escrow.deposit_of(account, side.usdc.address)
    return out


async def _check(
    sides: list[Side],
    before: dict[tuple[str, str], int],
    after: dict[tuple[str, str], int],
    account: str,
    session: str,
    say: Say,
) -> bool:
    """Print and check each chain's balances and grant: the sub-agent and the account's escrow deposit moved
    by exactly what was served there, the account by exactly its top-up."""
    expected: dict[tuple[str, str], tuple[int, str]] = {}
    for side in sides:
        agent = side.agent
        served = f"{agent.served[side.path]} x {usd(agent.prices[side.path])}"
        expected[(agent.name, side.label)] = (agent.earned, f"what it served: {served}")
        expected[("account", side.label)] = (-DEPOSIT, f"its top-up into the escrow: {usd(DEPOSIT)}")
        expected[("account deposit", side.label)] = (
            DEPOSIT - agent.earned,
            f"the top-up {usd(DEPOSIT)} - what was paid on {side.label}: {served}",
        )
    print(flush=True)
    say("balances", f"{'USDC':<17}{'chain':<10}{'before':>12}{'after':>12}{'change':>11}")
    ok = True
    for (name, label), (want, why) in expected.items():
        change = after[(name, label)] - before[(name, label)]
        ok &= change == want
        verdict = "exactly" if change == want else f"MISMATCH (expected {want / USDC:+.6f}):"
        say(
            "",
            f"{name:<17}{label:<10}{before[(name, label)] / USDC:>12.6f}{after[(name, label)] / USDC:>12.6f}"
            f"{change / USDC:>+11.6f}  {verdict} {why}",
        )
    for side in sides:
        info = await side.escrow.grant_of(account, session)
        exact = info.spent == side.agent.earned
        ok &= exact
        verdict = "what was paid there, exactly" if exact else f"MISMATCH: paid {usd(side.agent.earned)}"
        say(
            "grant",
            f"on {side.label:<9} spent {usd(info.spent)} of its {usd(info.budget)} USDC budget: {verdict}",
        )
    return ok
