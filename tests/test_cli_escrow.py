"""The owner's escrow from a shell, on the devnet: an owner's grant signed offline by one key and relayed by
another, a session key's spend visible in `agentpay escrow status` after `agentpay pay` against a paid
sub-agent, and a revoke that stops the next payment."""

from __future__ import annotations

import json
import os
import pty
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from escrow import DevnetState, GrantInfo, network_of_devnet
from tests._cli_helpers import (
    AGENTPAY,
    ROOT,
    Result,
    agentpay,
    assert_one_line_error,
    cli,
    fund,
    read_chain,
    serve_subagent,
)

PRICE = 1000  # GET /hello on examples.subagent: $0.001


class World:
    """Two keystore keys (owner, relayer) on the devnet, and the flags every command of the test takes."""

    def __init__(self, devnet: DevnetState, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
        self.devnet, self.tmp, self.capsys = devnet, tmp_path, capsys
        self.state = tmp_path / "devnet.json"
        devnet.dump(self.state)
        phrase = tmp_path / "phrase"
        phrase.write_text("s3cret\n")
        self.keys = ["--keystore", str(tmp_path / "keys"), "--passphrase-file", str(phrase)]
        self.owner = self.run("key", "new", "--name", "owner", "--light-kdf", "--json").json()["address"]
        self.relayer = self.run("key", "new", "--name", "relayer", "--light-kdf", "--json").json()["address"]
        fund(devnet, self.relayer, eth=10**18)

    def run(self, *args: str) -> Result:
        return cli(self.capsys, *args, *self.keys)

    def on_chain(self, *args: str) -> Result:
        return self.run(*args, "--devnet", str(self.state))

    def grant(self, signer: str) -> GrantInfo:
        return read_chain(self.devnet, lambda chain: chain.escrow.grant_of(self.owner, signer))  # type: ignore[no-any-return]

    def eth(self, who: str) -> int:
        return read_chain(self.devnet, lambda chain: chain.rpc.get_balance(who))  # type: ignore[no-any-return]


@pytest.fixture
def world(devnet: DevnetState, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> World:
    return World(devnet, tmp_path, capsys)


def _offline_network(devnet: DevnetState, tmp_path: Path) -> Path:
    """The devnet's network description with a node nobody listens on: signing must not need one."""
    network = network_of_devnet(devnet)
    path = tmp_path / "offline-network.json"
    described = json.loads(network.to_json())
    described["rpc_url"] = "http://127.0.0.1:9"
    path.write_text(json.dumps(described))
    return path


def test_grant_signed_offline_by_the_owner_is_relayed_by_another_key(
    world: World, devnet: DevnetState
) -> None:
    session_key = "0x" + "5e" * 20
    network = _offline_network(devnet, world.tmp)
    signed = world.tmp / "grant.json"

    made = world.run(
        "escrow", "grant", "--owner", "owner", "--key", session_key, "--max-per-call", "$0.01",
        "--budget", "$0.25", "--valid-for", "2h", "--network", str(network), "--offline", str(signed),
        "--json",
    ).json()  # fmt: skip
    assert made["offline"] == str(signed) and made["payer"] == world.owner
    assert not world.grant(session_key).live  # nothing sent yet

    relayer_before, owner_before = world.eth(world.relayer), world.eth(world.owner)
    relaying = world.on_chain("relay", str(signed), "--relayer", "relayer", "--json")
    relayed = relaying.json()
    assert relaying.err == ""  # progress notes are for terminals only

    assert [r["kind"] for r in relayed["relayed"]] == ["escrow grant"]
    grant = world.grant(session_key)
    assert (
        grant.live
        and grant.max_per_call == 10_000
        and grant.budget == 250_000
        and grant.epoch == made["epoch"]
    )
    assert world.eth(world.relayer) < relayer_before  # the relayer paid the gas
    assert world.eth(world.owner) == owner_before == 0  # the owner has no ETH and needed none

    # A relayer can change nothing: the same file with a bigger budget is refused, and nothing moves.
    tampered = json.loads(signed.read_text())
    tampered["grant"]["budget"] = 10**12
    tampered["grant"]["epoch"] += 1
    forged = world.tmp / "forged.json"
    forged.write_text(json.dumps(tampered))
    refused = world.on_chain("relay", str(forged), "--relayer", "relayer")
    assert_one_line_error(refused, "revert")
    assert world.grant(session_key) == grant

    # the revoke is signed offline too, through the grant's epoch, and relayed by the same relayer
    revoke = world.tmp / "revoke.json"
    world.run(
        "escrow", "revoke", "--owner", "owner", "--key", session_key, "--epoch", str(made["epoch"]),
        "--network", str(network), "--offline", str(revoke),
    )  # fmt: skip
    assert world.grant(session_key).live
    assert world.on_chain("relay", str(revoke), "--relayer", "relayer").code == 0
    assert not world.grant(session_key).live


@pytest.fixture
def subagent(devnet: DevnetState) -> Iterator[str]:
    with serve_subagent(devnet) as url:
        yield url


def _status(world: World, wallet: Path) -> dict[str, Any]:
    result: dict[str, Any] = world.on_chain("escrow", "status", "--wallet", str(wallet), "--json").json()
    return result


def test_session_key_spend_shows_in_status_and_a_revoke_stops_the_next_payment(
    world: World, devnet: DevnetState, subagent: str
) -> None:
    fund(devnet, world.owner, usdc=2_000_000)
    deposit = world.on_chain(
        "escrow", "deposit", "--owner", "owner", "--amount", "$1", "--relayer", "relayer", "--json"
    ).json()
    assert deposit["amount"] == 1_000_000 and len(deposit["txs"]) == 1

    policy = world.tmp / "policy.toml"
    policy.write_text('[grant]\nmax_per_call = "$0.002"\nbudget = "$0.01"\nvalid_for = "2h"\n')
    wallet, authorization = world.tmp / "agent.session.json", world.tmp / "authorization.json"
    made = world.on_chain(
        "session-key", "new", "--policy", str(policy), "--owner", "owner",
        "--wallet", str(wallet), "--offline", str(authorization), "--json",
    ).json()  # fmt: skip
    assert made["payer"] == world.owner and made["budget"] == 10_000
    assert world.on_chain("relay", str(authorization), "--relayer", "relayer").code == 0

    before = _status(world, wallet)
    assert before["deposit"] == 1_000_000
    assert [(g["signer"], g["live"], g["spent"]) for g in before["grants"]] == [(made["key"], True, 0)]

    # the real console script, as an agent would run it: the body on stdout, the receipt on stderr
    paid = agentpay("pay", f"{subagent}/hello", "--wallet", str(wallet), "--max", "$0.002")
    assert paid.code == 0, paid.err
    assert json.loads(paid.out)["message"] == "hello, orchestrator"
    assert "paid 0.001 USDC (escrow" in paid.err and "settlement: 0x" in paid.err
    paid_json = cli(world.capsys, "pay", f"{subagent}/hello", "--wallet", str(wallet), "--json").json()
    assert paid_json["status"] == 200 and paid_json["paid"]["scheme"] == "escrow"
    assert paid_json["receipt"]["success"] is True and paid_json["receipt"]["transaction"].startswith("0x")

    text = "a" * 150  # POST /summarize costs $0.0001 per started 100 characters: 200 units
    body = json.dumps({"text": text})
    summary = cli(world.capsys, "pay", f"{subagent}/summarize", "-d", body, "--wallet", str(wallet))
    assert summary.code == 0 and json.loads(summary.out)["chars"] == 150

    after = _status(world, wallet)
    spent = 2 * PRICE + 200
    assert after["grants"][0]["spent"] == spent
    assert after["grants"][0]["remaining"] == 10_000 - spent
    assert after["deposit"] == 1_000_000 - spent
    shown = world.on_chain("escrow", "status", "--wallet", str(wallet))
    assert "0.0022 USDC" in shown.out and made["key"] in shown.out  # the table a person reads

    revoked = world.on_chain(
        "session-key", "revoke", "--owner", "owner", "--wallet", str(wallet), "--relayer", "relayer", "--json"
    ).json()
    assert revoked["key"] == made["key"] and revoked["epoch"] >= made["epoch"]

    refused = cli(world.capsys, "pay", f"{subagent}/hello", "--wallet", str(wallet))
    assert_one_line_error(refused, "refused", "revoked")
    assert refused.out == ""
    final = _status(world, wallet)
    assert final["grants"][0]["live"] is False
    assert final["deposit"] == 1_000_000 - spent  # the refused call cost nothing


def test_withdrawal_requested_offline_and_broadcast_by_relay(world: World, devnet: DevnetState) -> None:
    fund(devnet, world.owner, eth=10**17, usdc=500_000)
    deposit = world.tmp / "deposit.json"
    offline = ("--offline", str(deposit), "--network", str(_offline_network(devnet, world.tmp)))
    assert world.run("escrow", "deposit", "--owner", "owner", "--amount", "$0.5", *offline).code == 0
    assert world.on_chain("relay", str(deposit), "--relayer", "relayer").code == 0
    assert _payer_status(world)["deposit"] == 500_000
    signed = world.tmp / "withdraw.json"
    assert (
        world.on_chain(
            "escrow", "withdraw", "--owner", "owner", "--amount", "$0.2", "--offline", str(signed)
        ).code
        == 0
    )
    assert json.loads(signed.read_text())["type"] == "transaction"
    before = _payer_status(world)
    assert before["withdrawal"]["amount"] == 0

    assert world.on_chain("relay", str(signed)).code == 0  # the owner's own transaction: no relayer needed
    assert _payer_status(world)["withdrawal"]["amount"] == 200_000
    assert world.on_chain("escrow", "withdraw", "--owner", "owner", "--cancel").code == 0
    assert _payer_status(world)["withdrawal"]["amount"] == 0


def grant_args(world: World, key: str) -> tuple[str, ...]:
    return ("escrow", "grant", "--owner", "owner", "--key", key, "--max-per-call", "1", "--budget", "2")


def _payer_status(world: World) -> dict[str, Any]:
    result: dict[str, Any] = world.on_chain("escrow", "status", "--payer", "owner", "--json").json()
    return result


def test_bad_input_is_one_line_and_changes_nothing(world: World, devnet: DevnetState) -> None:
    wallet = str(world.tmp / "w.json")
    policy = world.tmp / "policy.toml"
    new = (
        "session-key",
        "new",
        "--owner",
        "owner",
        "--wallet",
        wallet,
        "--offline",
        str(world.tmp / "a.json"),
    )

    assert_one_line_error(
        world.on_chain(*new, "--policy", str(world.tmp / "none.toml")), "cannot read the policy"
    )
    policy.write_text("[grant\nmax_per_call = 1\n")
    assert_one_line_error(world.on_chain(*new, "--policy", str(policy)), "not TOML")
    policy.write_text('[grant]\nmax_per_call = "$0.01"\nbudget = "$1"\nmax_per_cal = 5\n')
    assert_one_line_error(world.on_chain(*new, "--policy", str(policy)), "unknown key 'max_per_cal'")
    policy.write_text('[grant]\nmax_per_call = "a lot"\nbudget = "$1"\n')
    assert_one_line_error(world.on_chain(*new, "--policy", str(policy)), "[grant].max_per_call")
    policy.write_text(
        '[grant]\nmax_per_call = "$0.01"\nbudget = "$1"\n'
        '[[account.calls]]\ntarget = "token"\nfunction = "transfer(address,uint256)"\n'
    )
    assert_one_line_error(world.on_chain(*new, "--policy", str(policy)), "gas_budget", "required")
    assert not Path(wallet).exists()

    policy.write_text('[grant]\nmax_per_call = "$0.01"\nbudget = "$1"\n')
    keystore = world.keys[:2]
    wrong_phrase = ["--passphrase-file", str(policy)]
    wrong = cli(
        world.capsys, *new, "--policy", str(policy), "--devnet", str(world.state), *keystore, *wrong_phrase
    )
    assert_one_line_error(wrong, "wrong passphrase", "owner")
    assert not Path(wallet).exists()

    unknown = world.run(
        "escrow", "status", "--payer", world.owner, "--network", str(world.tmp / "base-mainnet.toml")
    )
    assert_one_line_error(unknown, "unknown network")
    bad_network = world.tmp / "bad.toml"
    bad_network.write_text(
        'network = "eip155:1"\nchain_id = 2\ntoken = "0x0"\ntoken_name = "x"\ntoken_version = "1"\n'
    )
    assert_one_line_error(
        world.run("escrow", "status", "--payer", world.owner, "--network", str(bad_network))
    )
    assert_one_line_error(
        world.on_chain("relay", str(world.tmp / "missing.json"), "--relayer", "relayer"), "cannot read"
    )
    assert_one_line_error(world.on_chain("relay", str(policy), "--relayer", "relayer"), "not JSON")
    grant_file = world.tmp / "g.json"
    world.run(
        *grant_args(world, "0x" + "11" * 20), "--devnet", str(world.state), "--offline", str(grant_file)
    )
    assert_one_line_error(world.on_chain("relay", str(grant_file)), "--relayer")
    assert_one_line_error(
        world.on_chain(
            "escrow", "grant", "--owner", "owner", "--key", "0x12", "--max-per-call", "1", "--budget", "1",
            "--relayer", "relayer",
        ),
        "--key",
    )  # fmt: skip
    assert_one_line_error(
        world.on_chain(
            "escrow", "deposit", "--owner", "owner", "--amount", "$0.0000001", "--relayer", "relayer"
        ),
        "decimals",
    )
    assert_one_line_error(
        cli(world.capsys, "pay", "http://127.0.0.1:9/x", "--wallet", str(world.tmp / "none.json")), "wallet"
    )
    assert_one_line_error(world.on_chain("escrow", "grant", "--owner", "owner"), "required")


def test_progress_shows_on_a_terminal(world: World, devnet: DevnetState) -> None:
    signed = world.tmp / "grant.json"
    world.run(
        "escrow", "grant", "--owner", "owner", "--key", "0x" + "7a" * 20, "--max-per-call", "1",
        "--budget", "5", "--devnet", str(world.state), "--offline", str(signed),
    )  # fmt: skip
    terminal, stderr = pty.openpty()
    try:
        done = subprocess.run(
            [
                AGENTPAY,
                "relay",
                str(signed),
                "--relayer",
                "relayer",
                "--devnet",
                str(world.state),
                *world.keys,
            ],
            stdout=subprocess.PIPE,
            stderr=stderr,
            stdin=subprocess.DEVNULL,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
            timeout=120,
        )
        os.close(stderr)
        shown = b""
        while True:
            try:
                chunk = os.read(terminal, 4096)
            except OSError:  # EIO: the terminal's other end is closed and everything was read
                break
            if not chunk:
                break
            shown += chunk
    finally:
        os.close(terminal)
    assert done.returncode == 0
    assert b"agentpay: relaying" in shown and b"landed in 0x" in shown
    assert b"landed" not in done.stdout and b"grant" in done.stdout  # stdout keeps the table only
