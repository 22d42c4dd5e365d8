"""`agentpay devnet up --bundler`: the devnet also runs the Alto bundler (npm `@pimlico/alto`), its URL is in
the state file, an operation the devnet paymaster sponsors lands through it, `down` leaves no process."""

from __future__ import annotations

import subprocess
from pathlib import Path

import anyio
import pytest

from escrow import DevnetState
from escrow.accounts._account import AgentAccount
from escrow.accounts._bundler_rpc import BundlerRpc
from escrow.accounts._paymaster import SponsorService
from escrow.accounts._signers import OwnerKey
from escrow.accounts._userop import Call
from escrow.chain._rpc import Rpc
from escrow.devnet._node import pid_alive
from tests.test_cli import agentpay, assert_one_line_error, pgrep, state_file  # noqa: F401 (fixture)
from x402 import LocalSigner


async def _sponsored_operation(state: DevnetState) -> None:
    assert state.bundler_url is not None
    rpc = Rpc(state.rpc_url)
    bundler = BundlerRpc(state.bundler_url, chain_id=state.chain_id, node=rpc)
    try:
        assert await bundler.supported_entry_points() == [state.contracts["entrypoint"]]
        owner = OwnerKey(LocalSigner.random())
        account = await AgentAccount.counterfactual(
            rpc, factory=state.contracts["account_factory"], owner=owner.address
        )
        sponsor = SponsorService(
            paymaster=state.contracts["paymaster"],
            signer=LocalSigner(state.deployer.private_key),
            chain_id=state.chain_id,
        )
        result = await account.execute(
            [Call(owner.address, 0)], signer=owner, bundler=bundler, paymaster=sponsor
        )
        assert result.success and result.deployed
        assert await rpc.get_balance(account.address) == 0
    finally:
        await bundler.aclose()
        await rpc.aclose()


def test_up_with_the_bundler_then_down(state_file: Path) -> None:  # noqa: F811
    up = agentpay("devnet", "up", "--bundler", "--state", str(state_file))
    assert up.returncode == 0, up.stderr
    state = DevnetState.from_json(up.stdout)
    assert DevnetState.load(state_file) == state
    assert state.bundler_url is not None and state.bundler_pid is not None and pid_alive(state.bundler_pid)
    anyio.run(_sponsored_operation, state)

    status = agentpay("devnet", "status", "--state", str(state_file))
    assert status.returncode == 0 and DevnetState.from_json(status.stdout).bundler_url == state.bundler_url
    down = agentpay("devnet", "down", "--state", str(state_file))
    assert down.returncode == 0, down.stderr
    assert state.supervisor_pid is not None and not pid_alive(state.supervisor_pid)
    for pid in (state.pid, state.bundler_pid):  # reaped by the supervisor: not even zombies
        assert not pid_alive(pid) and not pgrep(pid, state_file.parent)
    leftovers = subprocess.run(["pgrep", "-f", state.bundler_url.rsplit(":", 1)[1]], capture_output=True)
    assert leftovers.returncode == 1, "no bundler process is left"


def test_the_bundler_needs_anvil(state_file: Path) -> None:  # noqa: F811
    result = agentpay("devnet", "up", "--bundler", "--backend", "pyevm", "--state", str(state_file))
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1] == "agentpay: error: the bundler needs the anvil backend"
    assert not state_file.exists()


@pytest.mark.parametrize("flag", ["--bundler=yes"])
def test_bundler_flag_takes_no_value(flag: str) -> None:
    assert_one_line_error(agentpay("devnet", "up", flag), "--bundler")
