"""`agentpay account` and a smart-account session key from a policy file, on the devnet: the counterfactual
address, deploying it through a relayer, a key installed with call / window / rate / gas policies and an
escrow grant whose payer is the account (signed by the owner through ERC-1271), paying a sub-agent, then
revoked and uninstalled."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from escrow import AgentAccountFactory, DevnetState
from tests._cli_helpers import assert_one_line_error, cli, fund, read_chain, serve_subagent

POLICY = """\
payer = "account"
relay_within = "30m"

[grant]
max_per_call = "$0.002"
budget = "$0.01"
valid_for = "2h"

[account]
valid_for = "1d"
max_uses = 50
rate_limit = { uses = 5, per = "1m" }
gas_budget = "0.01 ether"

[[account.calls]]
target = "token"
function = "transfer(address,uint256)"
rules = [{ arg = 1, max = "$0.5" }]
"""


@pytest.fixture
def subagent(devnet: DevnetState) -> Iterator[str]:
    with serve_subagent(devnet) as url:
        yield url


def test_account_session_key_from_a_policy_pays_then_is_revoked(
    devnet: DevnetState, tmp_path: Path, capsys: pytest.CaptureFixture[str], subagent: str
) -> None:
    state = tmp_path / "devnet.json"
    devnet.dump(state)
    phrase = tmp_path / "phrase"
    phrase.write_text("pw")
    common = ["--keystore", str(tmp_path / "keys"), "--passphrase-file", str(phrase)]
    chain = ["--devnet", str(state), *common]

    def run(*args: str) -> Any:
        """`agentpay ARGS --json` on the devnet; its JSON answer."""
        return cli(capsys, *args, "--json", *chain).json()

    def new_key(name: str) -> str:
        made = cli(capsys, "key", "new", "--name", name, "--light-kdf", "--json", *common).json()
        return str(made["address"])

    owner = cli(capsys, "key", "new", "--name", "owner", "--light-kdf", "--json", *common).json()["address"]
    relayer = cli(capsys, "key", "new", "--name", "relayer", "--light-kdf", "--json", *common).json()[
        "address"
    ]
    fund(devnet, relayer, eth=10**18)

    address = cli(capsys, "account", "address", "--owner", "owner", "--json", *chain).json()
    expected = read_chain(
        devnet, lambda c: AgentAccountFactory(c.rpc, c.network.account_factory).get_address(owner)
    )
    assert address == {"owner": owner, "account": expected, "deployed": False}
    account = address["account"]

    deployed = cli(
        capsys, "account", "deploy", "--owner", owner, "--relayer", "relayer", "--json", *chain
    ).json()
    assert deployed["deployed"] is True and deployed["tx"].startswith("0x")
    again = cli(
        capsys, "account", "deploy", "--owner", "owner", "--relayer", "relayer", "--json", *chain
    ).json()
    assert again["tx"] == "already deployed"

    fund(devnet, account, usdc=1_000_000)
    run(
        "escrow",
        "deposit",
        "--owner",
        "owner",
        "--account",
        "--amount",
        "$0.5",
        "--relayer",
        "relayer",
        "--json",
    )

    policy = tmp_path / "policy.toml"
    policy.write_text(POLICY)
    wallet, authorization = tmp_path / "agent.json", tmp_path / "authorization.json"
    made = cli(
        capsys, "session-key", "new", "--policy", str(policy), "--owner", "owner", "--wallet", str(wallet),
        "--offline", str(authorization), "--json", *chain,
    ).json()  # fmt: skip
    assert made["payer"] == account and made["account_policy"] is True
    relayed = cli(capsys, "relay", str(authorization), "--relayer", "relayer", "--json", *chain).json()
    assert [r["kind"] for r in relayed["relayed"]] == ["session key install", "escrow grant"]

    status = cli(capsys, "account", "status", "--owner", "owner", "--json", *chain).json()
    assert status["deployed"] is True and status["escrow_deposit"] == 500_000
    assert status["token"] == 500_000
    [key] = status["session_keys"]
    assert key["key"] == made["key"] and key["max_uses"] == 50 and key["gas_budget"] == 10**16
    assert key["valid_until"] > 0

    paid = cli(capsys, "pay", f"{subagent}/hello", "--wallet", str(wallet), "--json").json()
    assert paid["receipt"]["payer"] == account
    spent = cli(capsys, "escrow", "status", "--wallet", str(wallet), "--json", *chain).json()
    assert spent["payer"] == account and spent["grants"][0]["spent"] == 1000
    listed = run("escrow", "status", "--payer", "owner", "--account")  # every key it granted, from events
    assert [(g["signer"], g["spent"]) for g in listed["grants"]] == [(made["key"], 1000)]

    revoke = cli(
        capsys, "session-key", "revoke", "--owner", "owner", "--wallet", str(wallet), "--uninstall",
        "--relayer", "relayer", "--json", *chain,
    ).json()  # fmt: skip
    assert revoke["payer"] == account and len(revoke["txs"]) == 2
    after = cli(capsys, "account", "status", "--owner", "owner", "--json", *chain).json()
    assert after["session_keys"] == []
    assert_one_line_error(cli(capsys, "pay", f"{subagent}/hello", "--wallet", str(wallet)), "refused")
