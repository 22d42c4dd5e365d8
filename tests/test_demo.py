"""`make demo` end to end: `python -m examples.demo` in its own process, as a user runs it.

It starts its own devnet and sub-agents, so this test shares nothing with the session devnet. The checks are
what a user reads in the output: the refusals and their reasons, each sub-agent's balance rising by exactly
what it served (recomputed here from the printed calls and prices), and the node gone afterwards.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from decimal import Decimal
from pathlib import Path

import pytest

pytestmark = pytest.mark.chain  # it brings up its own devnet

ROOT = Path(__file__).resolve().parent.parent

# `summarizer  0.000000  0.010000  +0.010000  exactly what it served: 10 x 0.001`
_ROW = re.compile(
    r"^\s+(?P<name>summarizer|translator|weather|mcp tools|a2a agent)\s+"
    r"(?P<before>[\d.]+)\s+(?P<after>[\d.]+)\s+"
    r"(?P<change>[+-][\d.]+)\s+exactly what it served: (?P<served>.+)$",
    re.MULTILINE,
)
# `            sub-agent        +0.010700  exactly 7 x 0.0001 + 1000 x 0.00001`
_PER_USE = re.compile(
    r"^\s+(?P<name>sub-agent|hot wallet|upto charge|channel paid)\s+(?P<change>[+-][\d.]+)"
    r"\s+exactly (?P<served>\d+ x [\d.]+(?: \+ \d+ x [\d.]+)*)$",
    re.MULTILINE,
)
_NODE = re.compile(r"^devnet\s+(?P<backend>anvil|py-evm) \(pid (?P<pid>\d+)\)", re.MULTILINE)
# `devnet      anvil (pid 1234) at http://127.0.0.1:41234, chain 8453 (base)`, then one line per other chain
_CHAIN = re.compile(
    r"^(?:devnet)?\s+(?:anvil|py-evm) \(pid (?P<pid>\d+)\) at \S+, chain (?P<id>\d+) \((?P<label>[\w-]+)\)$",
    re.MULTILINE,
)
# The two-chain rows (name, chain, before, after, change, why), e.g. on base:
#   `researcher       base   0.000000   0.012000  +0.012000  exactly what it served: 4 x 0.003`
#   `account          base  75.000000  74.000000  -1.000000  exactly its top-up into the escrow: 1`
#   `account deposit  base  24.975000  25.963000  +0.988000  exactly the top-up 1 - what was paid on base:
#    4 x 0.003` (one line)
_CHAIN_ROW = re.compile(
    r"^\s+(?P<name>researcher|analyst|account|account deposit)\s+(?P<chain>base|arbitrum)\s+"
    r"(?P<before>[\d.]+)\s+(?P<after>[\d.]+)\s+(?P<change>[+-][\d.]+)\s+exactly "
    r"(?:what it served: (?P<served>\d+ x [\d.]+)"
    r"|its top-up into the escrow: (?P<top_up>[\d.]+)"
    r"|the top-up (?P<deposited>[\d.]+) - what was paid on (?P=chain): (?P<paid>\d+ x [\d.]+))$",
    re.MULTILINE,
)


def _running(pid: int, backend: str) -> bool:
    """Whether `pid` is still the devnet node (not merely a recycled pid)."""
    proc = Path(f"/proc/{pid}/cmdline")
    if proc.parent.parent.is_dir():  # Linux: look at what the pid runs now
        try:
            cmdline = proc.read_bytes().decode(errors="replace")
        except OSError:
            return False
        return ("anvil" if backend == "anvil" else "_pyevm_node") in cmdline
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _served_total(served: str) -> Decimal:
    """`10 x 0.001 + 1 x 0.005` -> 0.015."""
    total = Decimal(0)
    for term in served.split(" + "):
        count, price = term.split(" x ")
        total += int(count) * Decimal(price)
    return total


def test_demo_pays_subagents_exactly_and_leaves_nothing_running() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "examples.demo"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,  # a guard against a hang, not a speed check
    )
    out = proc.stdout
    node = _NODE.search(out)
    chains = list(_CHAIN.finditer(out))
    if node is not None:
        for pid in {int(node["pid"])} | {int(c["pid"]) for c in chains}:
            if _running(pid, node["backend"]):
                os.kill(pid, signal.SIGKILL)  # never leave it behind, even when failing
                pytest.fail(f"the demo left its {node['backend']} node (pid {pid}) running\n{out}")
    assert proc.returncode == 0, f"demo failed ({proc.returncode})\n{out}\n{proc.stderr}"
    assert node is not None, out
    # Two chains that look like Base and Arbitrum (their chain ids), one node each, both stopped.
    assert [(c["label"], int(c["id"])) for c in chains] == [("base", 8453), ("arbitrum", 42161)], out
    assert chains[0]["pid"] == node["pid"]
    for chain in chains:
        assert f"{node['backend']} pid {chain['pid']} exited" in out

    # The owner's offline files, relayed by someone else.
    for name in ("install-session-key.json", "escrow-deposit.json", "escrow-grant.json"):
        assert name in out
    assert "who can change nothing" in out

    # Paid: two escrow sub-agents (deferred), one exact call settled before its response.
    assert re.search(r"^paid\s+summarizer .* x 200\s+escrow, deferred", out, re.MULTILINE), out
    assert re.search(r"^paid\s+translator .* x 200\s+escrow, deferred", out, re.MULTILINE), out
    assert re.search(
        r"^paid\s+weather .*1 x 200\s+exact, settled before the response: tx 0x", out, re.MULTILINE
    )

    # The same session key pays one MCP tool call and one A2A task, each settled with its own transaction.
    assert re.search(
        r"^paid\s+mcp tools\s+MCP summarize\s+escrow, settled before the answer: tx 0x", out, re.MULTILINE
    ), out
    assert re.search(
        r"^paid\s+a2a agent\s+A2A task\s+escrow, settled before the answer \(6 words\): tx 0x",
        out,
        re.MULTILINE,
    ), out

    # Refused over the caps, each with its reason.
    assert "spend policy, before signing: amount 5000 exceeds max_per_call 2000" in out
    assert "the sub-agent answers 402 escrow_amount_exceeds_cap" in out
    assert re.search(r"by the account: session_argument_rule\n.*usdc.approve, argument rule 1", out), out
    # The top-up went through Alto, sponsored: the account never held ETH.
    assert "100 USDC and no ETH" in out
    assert re.search(r"through the Alto bundler \(eth_sendUserOperation\); AgentPaymaster paid", out), out

    # Settled in batches, with the gas per payment.
    batches = re.findall(
        r"^settled\s+(summarizer|translator)\s+(\d+) payments, one settle\(\): [\d,]+ gas, ([\d,]+) each",
        out,
        re.MULTILINE,
    )
    assert {name for name, _, _ in batches} == {"summarizer", "translator"}
    assert all(int(each.replace(",", "")) > 0 for _, _, each in batches)

    # Each sub-agent's balance rose by exactly what it served, as printed.
    rows = {m["name"]: m for m in _ROW.finditer(out)}
    assert set(rows) == {"summarizer", "translator", "weather", "mcp tools", "a2a agent"}, out
    for name, row in rows.items():
        before, after, change = Decimal(row["before"]), Decimal(row["after"]), Decimal(row["change"])
        assert after - before == change == _served_total(row["served"]) > 0, name

    # Paid per use: /metered through x402 upto (charged 7 units of the $0.01 signed), /stream over an MPP
    # session; the payee, the payer and the closed channel each moved by exactly the units used.
    assert re.search(
        r"^paid\s+metered\s+GET /metered\?units=7\s+upto: signed at most 0.01, charged 0.0007"
        r" \(PAYMENT-RESPONSE amount 700\), tx 0x",
        out,
        re.MULTILINE,
    ), out
    assert re.search(
        r"^paid\s+metered\s+GET /stream\?tokens=1000\s+1000 tokens over one MPP session", out, re.M
    )
    per_use = {m["name"]: m for m in _PER_USE.finditer(out)}
    assert set(per_use) == {"sub-agent", "hot wallet", "upto charge", "channel paid"}, out
    for name, row in per_use.items():
        assert abs(Decimal(row["change"])) == _served_total(row["served"]) > 0, name
    assert Decimal(per_use["hot wallet"]["change"]) == -Decimal(per_use["sub-agent"]["change"])
    assert _served_total(per_use["channel paid"]["served"]) == 1000 * Decimal("0.00001")
    _check_two_chains(out)
    assert "MISMATCH" not in out
    assert "demo: OK" in out


def _check_two_chains(out: str) -> None:
    """The orchestrator's smart account pays on both chains: one offline owner signature installs the key on
    the second chain's account and grants it on both, with the account as payer; the key tops up the
    account's escrow deposit on each chain and pays one sub-agent on each. A grant leaf and a payment signed
    for Base are refused on Arbitrum. Each chain's payee, the account, its deposit and the grant there moved
    by exactly what was topped up and served on that chain."""
    # The same account address on both chains; deployed on the second one by a relayer, not by the owner.
    account = re.search(
        r"^account\s+the owner's account (0x\w+…\w+), the same address on both chains", out, re.M
    )
    assert account is not None, out
    assert re.search(
        r"^\s+deployed on base; on arbitrum it holds [\d.]+ USDC and no ETH, not deployed", out, re.M
    )
    # One offline owner signature for both chains: the key's install on arbitrum and a grant per chain.
    assert "the owner signed 1 approval for 2 chains: multichain-approval.json" in out
    assert re.search(
        r"of 3 leaves, each naming its chain id: the key's install on arbitrum,\n.*payer is the account", out
    )
    assert "base's grant leaf, sent to arbitrum's escrow: multichain_refused (MultichainProofInvalid)" in out
    assert re.search(
        r"^relayed\s+by 0x\w+…\w+: the account deployed on arbitrum, the key installed there", out, re.M
    )
    # The money reaches each chain's escrow from the account, moved by the session key (sponsored UserOps).
    assert re.search(
        r"^top-up\s+the session key moved [\d.]+ USDC from the account into the escrow on each chain",
        out,
        re.M,
    ), out
    assert re.search(
        r"^paid\s+researcher\s+GET /research\s+4 x 200\s+escrow on eip155:8453 \(base\)", out, re.M
    )
    assert re.search(
        r"^paid\s+analyst\s+GET /analyze\s+3 x 200\s+escrow on eip155:42161 \(arbitrum\)", out, re.M
    )
    assert re.search(
        r"^refused\s+a payment the key signed for base \(chain 8453\), presented on arbitrum:\n"
        r"\s+analyst answers 402 escrow_\w+$",
        out,
        re.MULTILINE,
    ), out
    settled = re.findall(r"^settled\s+(researcher|analyst)\s+on (base|arbitrum)\s+(\d+) payments", out, re.M)
    assert sorted(settled) == [("analyst", "arbitrum", "3"), ("researcher", "base", "4")], out
    rows = {(m["name"], m["chain"]): m for m in _CHAIN_ROW.finditer(out)}
    names = ("account", "account deposit")
    assert set(rows) == {
        ("researcher", "base"),
        *((name, "base") for name in names),
        ("analyst", "arbitrum"),
        *((name, "arbitrum") for name in names),
    }, out
    for (name, chain), row in rows.items():
        before, after, change = Decimal(row["before"]), Decimal(row["after"]), Decimal(row["change"])
        if name == "account":
            want = -Decimal(row["top_up"])
        elif name == "account deposit":
            want = Decimal(row["deposited"]) - _served_total(row["paid"])
        else:
            want = _served_total(row["served"])
        assert after - before == change == want, (name, chain)
    for agent, chain in (("researcher", "base"), ("analyst", "arbitrum")):
        paid = Decimal(rows[(agent, chain)]["change"])
        top_up = -Decimal(rows[("account", chain)]["change"])
        assert paid > 0 and top_up > 0
        assert Decimal(rows[("account deposit", chain)]["change"]) == top_up - paid
        grant = re.search(rf"^grant\s+on {chain}\s+spent ([\d.]+) of its [\d.]+ USDC budget", out, re.M)
        assert grant is not None and Decimal(grant[1]) == paid, out
