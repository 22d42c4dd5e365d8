"""The policy file of `agentpay session-key new`: the example in docs/policies.md means what it says."""

from __future__ import annotations

import re
from pathlib import Path

from escrow import ArgRule, CallPermission
from gateway._cli_policy import load_policy
from x402 import Network

ROOT = Path(__file__).resolve().parents[1]
NETWORK = Network(
    network="eip155:31337",
    chain_id=31337,
    token="0xe7f1725E7734CE288F8367e1Bb143E90bb3F0512",
    token_name="USDC",
    token_version="2",
    escrow="0x9fE46736679d2D9a65F0992F2272dE9f3c7fa6e0",
)
NOW = 1_800_000_000


def test_the_documented_example_parses_into_the_documented_limits(tmp_path: Path) -> None:
    [example] = re.findall(r"```toml\n(.*?)```", (ROOT / "docs" / "policies.md").read_text(), re.DOTALL)
    path = tmp_path / "agent.toml"
    path.write_text(example)

    spec = load_policy(str(path), NETWORK, now=NOW)

    assert spec.payer == "account" and spec.account is None and spec.relay_within == 3600
    grant = spec.grant
    assert (grant.max_per_call, grant.budget, grant.token) == (10_000, 5_000_000, NETWORK.token)
    assert (grant.valid_after, grant.valid_until, grant.payees, grant.epoch) == (
        NOW - 60,
        NOW + 86400,
        (),
        NOW,
    )
    policy = spec.account_policy
    assert policy is not None
    assert (policy.valid_until, policy.max_uses, policy.interval, policy.max_uses_per_interval) == (
        NOW + 7 * 86400,
        1000,
        60,
        10,
    )
    assert policy.gas_budget == 5 * 10**16
    payee = "0x3C44CdDdB6a900fa2b585dd299e03d12FA4293BC"
    assert policy.permissions == (
        CallPermission.to(
            NETWORK.token,
            "transfer(address,uint256)",
            ArgRule.one_of(0, [payee]),
            ArgRule.less_or_equal(1, 500_000),
        ),
    )
