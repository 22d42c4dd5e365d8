"""`make demo`: agent-to-agent commerce, start to finish, on a local devnet.

    python -m examples.demo

The story (use case 3 of the brief): an orchestrator agent hires sub-agents and pays each call.

1. The orchestrator's money lives in its smart account (`AgentAccount`); the owner key stays offline. The
   owner signs three files (a session key for the account, an escrow deposit, an escrow grant); a relayer,
   who can change nothing, sends them.
2. The hot session key can pay through the escrow only: each payment at most the per-call cap, within a
   budget and a window, to the listed sub-agents only. On the account it can only top up the escrow deposit.
3. Three sub-agents serve on local ports, each paid into its own counterfactual smart-account address: two
   take `escrow` payments and settle them in batches; one takes `exact` (EIP-3009), settled per call. The
   same key also pays one paid MCP tool call (`examples.paid_tools`) and one paid A2A task
   (`examples.a2a_agent`), each settled before its answer.
4. Over-cap payments and top-ups are refused, with the reason; balances move by exactly what was served;
   everything is stopped at the end (no node left behind).
5. Two chains (`examples._multichain_demo`): the devnet runs Base and Arbitrum look-alikes; the account
   has the same address on both (a relayer deploys it on Arbitrum); the owner signs ONE approval offline (a
   Merkle root over the key's install on the Arbitrum account and an escrow grant per chain, the account
   paying) for the same session key, which tops up the account's escrow deposit on each chain and pays one
   escrow sub-agent on each, each settled in one batch on its own chain; Base's grant leaf and a payment
   signed for Base are both refused on Arbitrum.
6. Paid per use (`examples._metered_demo`): the hot wallet pays `examples.subagent`'s `/metered?units=7`
   through x402 `upto` (signs the $0.01 maximum, is charged 7 units) and streams `/stream?tokens=1000` over
   an MPP session channel (closing it settles exactly 1000 tokens).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import httpx

from escrow import (
    AgentAccount,
    AgentAccountFactory,
    AgentEscrow,
    Bundler,
    BundlerRpc,
    DevnetError,
    Devnets,
    DevnetState,
    Erc20,
    KeepAliveTransport,
    Rpc,
    SessionKey,
    SponsorService,
    TxSender,
    UserOpRejected,
)
from x402 import (
    PAYMENT_REQUIRED_HEADER,
    Eip712Domain,
    GrantMessage,
    LocalSigner,
    NoPayableOffer,
    SettleResponse,
    Signer,
    SpendPolicyViolation,
    decode_payment_required,
)
from x402.client import Eip3009Wallet, PaymentAuth, SpendPolicy, receipt_of
from x402.client_escrow import EscrowWallet, SessionKeyAuth

from ._escrow_setup import GrantTerms, relay, sign_offline, top_up_calls, top_up_policy
from ._escrow_subagents import SubAgent, serving
from ._metered_demo import pay_per_use
from ._multichain_demo import pay_on_two_chains
from ._protocol_agents import ProtocolAgent, pay_tool_and_task

__all__ = ["main"]

USDC = 10**6
ETH = 10**18
ACCOUNT_FUNDS = 100 * USDC  # what the orchestrator's account holds before it even exists
DEPOSIT = 20 * USDC  # moved into the escrow by the owner's offline-signed deposit
TOP_UP = 5 * USDC  # moved in later by the session key itself
TOP_UP_CAP = 10 * USDC  # the most one top-up may move (the account's argument rule)
MAX_PER_CALL = 2_000  # $0.002: the escrow grant's per-call cap
BUDGET = 50_000  # $0.05 over the grant's lifetime
WINDOW = 3600  # the grant and the key are valid for one hour


def usd(atomic: int) -> str:
    """`0.002`, `20`: USDC without trailing zeros, for prose."""
    return f"{atomic / USDC:.6f}".rstrip("0").rstrip(".")


def short(address: str) -> str:
    return f"{address[:6]}…{address[-4:]}"


def say(label: str, text: str = "") -> None:
    print(f"{label:<12}{text}", flush=True)


@dataclass
class Ledger:
    """The balances the demo checks: USDC held by each party, and the account's escrow deposit."""

    usdc: Erc20
    escrow: AgentEscrow
    account: str
    parties: dict[str, str]

    async def read(self) -> dict[str, int]:
        out = {name: await self.usdc.balance_of(address) for name, address in self.parties.items()}
        out["escrow deposit"] = await self.escrow.deposit_of(self.account, self.usdc.address)
        return out


async def story(state: DevnetState, workdir: Path) -> bool:
    rpc = Rpc(state.rpc_url)
    alto = BundlerRpc(state.bundler_url, chain_id=state.chain_id, node=rpc) if state.bundler_url else None
    owner = LocalSigner.random()  # stays offline: it only ever signs files
    session = LocalSigner.random()  # the orchestrator's hot key
    try:
        ok = await _story(state, rpc, workdir, alto, owner=owner, session=session)
        print(flush=True)
        ok = await pay_on_two_chains(state, workdir, say, owner=owner, session=session) and ok
        print(flush=True)
        return await pay_per_use(state, rpc, say) and ok
    finally:
        if alto is not None:
            await alto.aclose()
        await rpc.aclose()


async def _story(
    state: DevnetState,
    rpc: Rpc,
    workdir: Path,
    alto: BundlerRpc | None,
    *,
    owner: Signer,
    session: Signer,
) -> bool:
    chain_id = state.chain_id
    usdc, escrow = Erc20(rpc, state.contracts["usdc"]), AgentEscrow(rpc, state.contracts["escrow"])
    bank = TxSender(rpc, state.accounts[0].private_key, chain_id=chain_id)  # the devnet's faucet
    relayer = TxSender(rpc, state.accounts[3].private_key, chain_id=chain_id)
    # UserOperations go through the devnet's Alto bundler (standard ERC-4337 JSON-RPC) when it runs, else
    # through our own handleOps relayer; either way AgentPaymaster pays their gas: the account holds no ETH.
    bundler: Bundler | BundlerRpc = alto or Bundler(rpc, relayer, chain_id=chain_id)
    sponsor = SponsorService(
        paymaster=state.contracts["paymaster"],
        signer=LocalSigner(state.accounts[0].private_key),
        chain_id=chain_id,
    )
    factory = state.contracts["account_factory"]

    # -- the parties ---------------------------------------------------------------------------------------
    account = await AgentAccount.counterfactual(rpc, factory=factory, owner=owner.address)
    hot_wallet = LocalSigner(state.accounts[1].private_key)  # a small EOA wallet, for `exact`-only sellers
    sub_accounts = [
        await AgentAccountFactory(rpc, factory).get_address(LocalSigner.random().address, 0) for _ in range(5)
    ]
    summarizer = SubAgent.escrow(
        state,
        name="summarizer",
        pay_to=sub_accounts[0],
        settler_key=state.accounts[4].private_key,
        routes={"/summarize": 1_000, "/deep-research": 5_000},
    )
    translator = SubAgent.escrow(
        state,
        name="translator",
        pay_to=sub_accounts[1],
        settler_key=state.accounts[5].private_key,
        routes={"/translate": 2_000},
    )
    weather = SubAgent.exact(
        state,
        name="weather",
        pay_to=sub_accounts[2],
        settler_key=state.accounts[6].private_key,
        routes={"/forecast": 1_500},
    )
    agents = (summarizer, translator, weather)
    # Two more sellers, reached over the agent protocols rather than plain HTTP: an MCP tool and an A2A agent.
    tools = ProtocolAgent.tools(state, pay_to=sub_accounts[3], settler_key=state.accounts[7].private_key)
    counter = ProtocolAgent.a2a(state, pay_to=sub_accounts[4], settler_key=state.accounts[8].private_key)

    await bank.transact(usdc.address, usdc.abi.encode("mint", account.address, ACCOUNT_FUNDS), gas=100_000)
    say(
        "owner",
        f"{short(owner.address)} (key offline) owns account {short(account.address)}:"
        f" {usd(ACCOUNT_FUNDS)} USDC and no ETH, not deployed yet",
    )

    # -- 1. the owner signs offline; a relayer sends ------------------------------------------------------
    now = await rpc.block_timestamp()
    terms = GrantTerms(
        max_per_call=MAX_PER_CALL,
        budget=BUDGET,
        valid_after=now - 60,
        valid_until=now + WINDOW,
        payees=(summarizer.pay_to, translator.pay_to, tools.pay_to, counter.pay_to),
    )
    policy = top_up_policy(
        usdc=usdc.address, escrow=escrow.address, cap=TOP_UP_CAP, valid_until=now + WINDOW, max_uses=5
    )
    files = sign_offline(
        owner,
        workdir / "offline",
        chain_id=chain_id,
        account=account.address,
        key=session.address,
        policy=policy,
        usdc_domain=Eip712Domain(state.usdc_name, state.usdc_version, chain_id, usdc.address),
        escrow=escrow.address,
        deposit=DEPOSIT,
        grant=terms,
        now=now,
    )
    say(
        "offline", f"the owner signed 3 files: {files.install.name}, {files.deposit.name}, {files.grant.name}"
    )
    signed = await relay(files, account=account, escrow=escrow, relayer=relayer)
    grant = signed.grant
    say(
        "relayed",
        f"by {short(relayer.address)}, who can change nothing: account deployed,"
        f" {usd(DEPOSIT)} USDC deposited into the escrow,",
    )
    say(
        "",
        f"session key {short(session.address)} granted {usd(MAX_PER_CALL)} USDC per call, budget"
        f" {usd(BUDGET)}, {WINDOW // 60} min,",
    )
    say(
        "",
        "payees: summarizer, translator, mcp tools, a2a agent;",
    )
    say(
        "",
        f"the same key installed on the account: escrow top-ups only, {usd(TOP_UP_CAP)} USDC at most a call",
    )

    ledger = Ledger(
        usdc,
        escrow,
        account.address,
        {
            "account": account.address,
            "hot wallet": hot_wallet.address,
            **{agent.name: agent.pay_to for agent in (*agents, tools, counter)},
        },
    )
    before = await ledger.read()

    async with serving(*agents):
        for agent in agents:
            prices = ", ".join(f"{path} {usd(price)}" for path, price in agent.prices.items())
            say(
                "sub-agent",
                f"{agent.name:<11}{agent.kind:<7}{prices:<37} {agent.url}  pays {short(agent.pay_to)}",
            )
        say("", "each is paid into its own AgentAccount address: counterfactual, nothing deployed there yet")

        # -- 2. the orchestrator pays -------------------------------------------------------------------
        print(flush=True)
        auth = session_key_auth(state, session, grant, hot_wallet=hot_wallet)
        exact_txs: list[str] = []
        async with httpx.AsyncClient(auth=auth, transport=KeepAliveTransport(), timeout=30.0) as client:
            for agent, path, count in (
                (summarizer, "/summarize", 10),
                (translator, "/translate", 6),
                (weather, "/forecast", 1),
            ):
                responses = await call_many(client, agent.url + path, count)
                exact_txs += _report(agent, path, responses)
                if any(r.status_code != 200 for r in responses):
                    return False
            # The same session key pays over the agent protocols: one MCP tool call, one A2A task.
            if not await pay_tool_and_task(auth, tools, counter):
                return False

            # -- 3. refusals -------------------------------------------------------------------------------
            deep = summarizer.url + "/deep-research"
            try:
                await client.get(deep)
                say("refused?", "the over-cap call was paid: the spend policy failed")
                return False
            except (SpendPolicyViolation, NoPayableOffer) as exc:
                price = usd(summarizer.prices["/deep-research"])
                say("refused", f"summarizer GET /deep-research costs {price} USDC, over the per-call cap:")
                say("", f"  the orchestrator's spend policy, before signing: {exc}")
        # A compromised orchestrator could sign it anyway: the sub-agent's gateway refuses it with the
        # escrow's reason, and the escrow would never settle it (no cap in this wallet, no client policy).
        rogue = EscrowWallet(
            session, payer=grant.payer, chain_id=chain_id, escrow=escrow.address, token=usdc.address
        )
        async with httpx.AsyncClient(auth=PaymentAuth(rogue), timeout=30.0) as client:
            answer = await client.get(deep)
        reason = _refusal_code(answer)
        say("", f"  signed anyway: the sub-agent answers {answer.status_code} {reason}")
        if answer.status_code != 402:
            return False

        # -- 4. the hot key tops up the escrow from the account, within its cap only ------------------------
        key = SessionKey(session)
        topped = await account.execute(
            top_up_calls(usdc, escrow, TOP_UP), signer=key, bundler=bundler, paymaster=sponsor
        )
        if not topped.success:
            say("top-up?", f"the session key's top-up reverted: 0x{topped.revert_reason.hex()}")
            return False
        say(
            "top-up",
            f"the session key moved {usd(TOP_UP)} USDC from the account into the escrow (one UserOperation)",
        )
        via = "the Alto bundler (eth_sendUserOperation)" if state.bundler_url else "our handleOps relayer"
        say("", f"  through {via}; AgentPaymaster paid its gas, {topped.actual_gas_cost // 10**9:,} gwei")
        try:
            await account.execute(
                top_up_calls(usdc, escrow, 5 * TOP_UP_CAP), signer=key, bundler=bundler, paymaster=sponsor
            )
            say("refused?", "the over-cap top-up went through: the account's policy failed")
            return False
        except UserOpRejected as rejected:
            v = rejected.violation
            where = rejected.reason
            if v is not None:
                call = ("usdc.approve", "escrow.deposit")[v.call_index]
                where = (
                    f"call {v.call_index} {call}, argument rule {v.rule_index}: amount <= {usd(TOP_UP_CAP)}"
                )
            say("refused", f"a top-up of {usd(5 * TOP_UP_CAP)} USDC, by the account: {rejected.code}")
            say("", f"  ({where}); the operation never ran")

        # -- 5. each escrow sub-agent's settler batches what it served ----------------------------------
        print(flush=True)
        for agent in (summarizer, translator):
            stats = await agent.settled()
            for count, gas in agent.batches:
                say(
                    "settled",
                    f"{agent.name:<11}{count} payments, one settle(): {gas:,} gas, {gas // count:,} each",
                )
            if stats.dead:
                say("LOST", f"{agent.name}: {stats.dead} payments could not be settled")
                return False
        exact_gas = await _gas_of(rpc, exact_txs)
        say(
            "settled",
            f"{'weather':<11}{len(exact_txs)} payment, its own transferWithAuthorization: {exact_gas:,} gas",
        )

    # -- 6. balances ---------------------------------------------------------------------------------------
    after = await ledger.read()
    info = await escrow.grant_of(account.address, session.address)
    escrow_paid = summarizer.earned + translator.earned + tools.earned + counter.earned
    expected = {
        "summarizer": (summarizer.earned, _served(summarizer)),
        "translator": (translator.earned, _served(translator)),
        "weather": (weather.earned, _served(weather)),
        tools.name: (tools.earned, f"what it served: 1 x {usd(tools.price)}"),
        counter.name: (counter.earned, f"what it served: 1 x {usd(counter.price)}"),
        "hot wallet": (-weather.earned, "paid weather's exact call"),
        "account": (-TOP_UP, "the session key's top-up"),
        "escrow deposit": (
            TOP_UP - escrow_paid,
            f"+{usd(TOP_UP)} top-up - {usd(escrow_paid)} escrow payments",
        ),
    }
    print(flush=True)
    say("balances", f"{'USDC':<15}{'before':>15}{'after':>15}{'change':>11}")
    ok = True
    for name, (want, why) in expected.items():
        change = after[name] - before[name]
        ok &= change == want
        verdict = "exactly" if change == want else f"MISMATCH (expected {want / USDC:+.6f}):"
        say(
            "",
            f"{name:<15}{before[name] / USDC:>15.6f}{after[name] / USDC:>15.6f}{change / USDC:>+11.6f}"
            f"  {verdict} {why}",
        )
    spent_ok = info.spent == escrow_paid
    verdict = (
        "the escrow payments, exactly"
        if spent_ok
        else f"MISMATCH: the escrow payments are {usd(escrow_paid)}"
    )
    say("grant", f"spent {usd(info.spent)} of its {usd(info.budget)} USDC budget: {verdict}")
    return ok and spent_ok


def session_key_auth(
    state: DevnetState, session: Signer, grant: GrantMessage, *, hot_wallet: Signer
) -> SessionKeyAuth:
    """The orchestrator's payer: `session` pays `escrow` offers for the grant's payer (its smart account);
    `hot_wallet` pays `exact` offers (EIP-3009) where the escrow is not accepted.

    One spend policy covers both, and carries the grant's limits: a call over the per-call cap, or past the
    budget, is refused by the client before anything is signed (the escrow would refuse it anyway).
    """
    token = state.contracts["usdc"]
    wallet = EscrowWallet.from_grant(
        session, grant, chain_id=state.chain_id, escrow=state.contracts["escrow"]
    )
    wallet.max_per_call = None  # the spend policy below refuses over-cap calls, with its reason
    policy = SpendPolicy(max_per_call=grant.max_per_call, total_budget=grant.budget, allowed_assets=[token])
    fallback = Eip3009Wallet(hot_wallet, state.chain_id, {token: (state.usdc_name, state.usdc_version)})
    return SessionKeyAuth(wallet, policy, fallback=fallback)


async def call_many(client: httpx.AsyncClient, url: str, count: int) -> list[httpx.Response]:
    """`count` paid calls to `url` at once: concurrent payments by one key never share a nonce."""
    return list(await asyncio.gather(*(client.get(url) for _ in range(count))))


def _report(agent: SubAgent, path: str, responses: Sequence[httpx.Response]) -> list[str]:
    """Print one line for `responses`; the settlement transactions their receipts name (none if deferred)."""
    codes = [r.status_code for r in responses]
    statuses = ", ".join(f"{codes.count(c)} x {c}" for c in sorted(set(codes)))
    receipts = [receipt_of(r) for r in responses]
    txs = [r.transaction for r in receipts if isinstance(r, SettleResponse) and r.transaction]
    if txs:
        how = f"exact, settled before the response: tx {txs[0][:12]}…"
    elif all(isinstance(r, SettleResponse) for r in receipts):
        how = "escrow, deferred: queued for the sub-agent's settler"
    else:
        how = "no receipt"
    say("paid", f"{agent.name:<11}GET {path:<11} {statuses:<9} {how}")
    return txs


def _refusal_code(response: httpx.Response) -> str:
    """The reason a 402 gives for refusing a payment: the x402 v2 `PAYMENT-REQUIRED` challenge's `error`."""
    header = response.headers.get(PAYMENT_REQUIRED_HEADER)
    if header is None:
        return "(no reason given)"
    return decode_payment_required(header).error or "(no reason given)"


def _served(agent: SubAgent) -> str:
    calls = " + ".join(f"{n} x {usd(agent.prices[p])}" for p, n in agent.served.items() if n)
    return f"what it served: {calls}"


async def _gas_of(rpc: Rpc, tx_hashes: Sequence[str]) -> int:
    total = 0
    for tx_hash in tx_hashes:
        receipt = await rpc.get_receipt(tx_hash)
        total += 0 if receipt is None else int(receipt.gas_used, 16)
    return total


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.parse_args(argv)
    started = time.monotonic()
    print(
        "agentpay demo: an orchestrator pays sub-agents from its smart account, with a scoped session key\n"
    )
    with tempfile.TemporaryDirectory(prefix="agentpay-demo-") as tmp:
        # Two chains that look like Base and Arbitrum; the first one also runs the single-chain story.
        devnet = Devnets(["base", "arbitrum"], bundler=True)
        try:
            state = devnet.start()
        except DevnetError as exc:  # the py-evm backend, or an install without Alto: plain chain ids then
            say("devnet", f"no look-alike chains or ERC-4337 bundler ({exc})")
            devnet = Devnets(2)
            state = devnet.start()
        try:
            contracts = state.contracts
            for i, chain in enumerate(state.chains):
                say(
                    "devnet" if i == 0 else "",
                    f"{state.backend} (pid {chain.pid}) at {chain.rpc_url}, chain {chain.chain_id}"
                    f" ({chain.label})",
                )
            if state.bundler_url:
                say("", f"Alto ERC-4337 bundler (pid {state.bundler_pid}) at {state.bundler_url}")
            say(
                "",
                f"TestUSDC {short(contracts['usdc'])}, AgentEscrow {short(contracts['escrow'])},"
                f" AgentAccountFactory {short(contracts['account_factory'])}, EntryPoint v0.7",
            )
            ok = asyncio.run(story(state, Path(tmp)))
        finally:
            devnet.stop()
    pids = [chain.pid for chain in state.chains]
    gone = not any(map(_alive, pids)) and not (state.bundler_pid and _alive(state.bundler_pid))
    print()
    nodes = ", ".join(f"{state.backend} pid {pid} {'RUNNING' if _alive(pid) else 'exited'}" for pid in pids)
    say("stopped", f"sub-agents, and the devnet: {nodes}")
    if not (ok and gone):
        raise SystemExit("demo: FAILED")
    print(f"demo: OK in {time.monotonic() - started:.1f}s, every sub-agent got exactly what it served")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


if __name__ == "__main__":
    main()
