"""`agentpay approval`: one owner signature for a session key's grant and install on two chains, from a shell,
with the owner key offline (issue 14). On two anvils (`Devnets(2)`: chain ids 31337 and 31338) with the
network descriptions `agentpay devnet up --chains 2` writes: build -> show -> sign -> relay on each chain ->
live on both (read on chain) -> relay again sends nothing -> revoke everywhere -> dead on both. A tampered
file, a file hiding a leaf, a wrong owner key and a leaf sent to the other chain are refused in one line."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from escrow import (
    AgentAccount,
    AgentEscrow,
    Devnets,
    DevnetState,
    MultichainApproval,
    Rpc,
    write_devnet_networks,
)
from tests._cli_helpers import Result, assert_one_line_error, cli
from tests.conftest import unavailable
from x402 import LocalSigner

PAYEE = "0x" + "7a" * 20
POLICY = f"""\
payer = "account"
relay_within = "30m"

[grant]
max_per_call = "$0.01"
budget = "$5"
valid_for = "2h"
payees = ["{PAYEE}"]

[account]
valid_for = "1d"
gas_budget = "0.01 ether"

[[account.calls]]
target = "token"
function = "transfer(address,uint256)"
rules = [{{ arg = 1, max = "$0.5" }}]
"""


@pytest.fixture(scope="module")
def two_chains(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[DevnetState, list[Path]]]:
    with Devnets(2) as state:
        if state.backend != "anvil":
            unavailable("funds fresh keys with anvil_setBalance")
        path = tmp_path_factory.mktemp("devnet") / "devnet.json"
        written = write_devnet_networks(state, path)
        written.dump(path)  # what `agentpay devnet up --chains 2` writes
        yield written, [Path(c.network_file) for c in written.chains]


def _chain_call(rpc_url: str, reader: Any) -> Any:
    async def go() -> Any:
        rpc = Rpc(rpc_url)
        try:
            return await reader(rpc)
        finally:
            await rpc.aclose()

    return asyncio.run(go())


class World:
    """An owner and a relayer in a keystore, the owner's account deployed on both chains, a policy file."""

    def __init__(self, devnet: DevnetState, nets: list[Path], tmp: Path, capsys: Any) -> None:
        self.devnet, self.nets, self.tmp, self.capsys = devnet, nets, tmp, capsys
        phrase = tmp / "phrase"
        phrase.write_text("pw\n")
        self.keys = ["--keystore", str(tmp / "keys"), "--passphrase-file", str(phrase)]
        self.owner = self.ok("key", "new", "--name", "owner", "--light-kdf")["address"]
        self.relayer = self.ok("key", "new", "--name", "relayer", "--light-kdf")["address"]
        self.session = self.ok("key", "new", "--name", "agent", "--light-kdf")["address"]
        for chain in devnet.chains:
            _chain_call(
                chain.rpc_url, lambda rpc: rpc.request("anvil_setBalance", [self.relayer, hex(10**19)])
            )
        self.accounts = [
            self.ok("account", "deploy", "--owner", "owner", "--relayer", "relayer", "--network", str(n))[
                "account"
            ]
            for n in nets
        ]
        self.policy = tmp / "agent.toml"
        self.policy.write_text(POLICY)

    def run(self, *args: str) -> Result:
        return cli(self.capsys, *args, *self.keys)

    def ok(self, *args: str) -> Any:
        return self.run(*args, "--json").json()

    def relay(self, path: Path, i: int) -> Any:
        return self.ok("approval", "relay", str(path), "--network", str(self.nets[i]), "--relayer", "relayer")

    def grant(self, i: int, payer: str | None = None) -> Any:
        """The session key's grant on chain i, whose payer is the owner's account (or `payer`)."""
        chain, payer = self.devnet.chains[i], payer or self.accounts[i]
        return _chain_call(
            chain.rpc_url,
            lambda rpc: AgentEscrow(rpc, chain.contracts["escrow"]).grant_of(payer, self.session),
        )

    def installed(self, i: int) -> bool:
        chain = self.devnet.chains[i]

        async def read(rpc: Rpc) -> bool:
            account = AgentAccount(rpc, self.accounts[i], chain_id=chain.chain_id)
            return (await account.session_key(self.session)).installed

        return bool(_chain_call(chain.rpc_url, read))

    def eth(self, i: int) -> int:
        chain = self.devnet.chains[i]
        return int(_chain_call(chain.rpc_url, lambda rpc: rpc.get_balance(self.relayer)))

    def build(self, out: Path) -> Any:
        nets = [a for n in self.nets for a in ("--network", str(n))]
        return self.ok(
            "approval", "build", "--owner", "owner", "--key", "agent", *nets, "--policy", str(self.policy),
            "--out", str(out),
        )  # fmt: skip


@pytest.fixture
def world(
    two_chains: tuple[DevnetState, list[Path]], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> World:
    devnet, nets = two_chains
    return World(devnet, nets, tmp_path, capsys)


@pytest.mark.chain
def test_build_show_sign_relay_on_both_chains_then_revoke_everywhere(world: World) -> None:
    w = world
    ids = [c.chain_id for c in w.devnet.chains]
    unsigned = w.tmp / "approval.json"
    built = w.build(unsigned)
    assert built["signed"] is False and built["leaves"] == 4 and built["chain_ids"] == sorted(ids)
    assert w.accounts[0] == w.accounts[1]  # the same factory on both chains: the same account address

    # What the owner reads before signing: every leaf, in human units, and the root the wallet will show.
    shown = w.run("approval", "show", str(unsigned))
    assert shown.code == 0, shown.err
    text = shown.out
    assert "NOT signed" in text and built["root"] in text
    assert text.count("escrow grant on") == 2 and text.count("session-key install on") == 2
    for chain_id in ids:
        assert f"eip155:{chain_id} ({chain_id})" in text
    assert (
        f"key {w.session} may spend from the escrow deposit of {w.accounts[0]} (an account taking the "
        "owner's signature): $5 USDC budget, $0.01 USDC per call"
    ) in text
    assert f"payees: {PAYEE.lower()}" in text.lower()
    assert "transfer(address,uint256)" in text and "arg 1 <= 500000" in text
    # With the owner's own description of one chain only, the other chain's amounts are not guessed.
    mine = w.run("approval", "show", str(unsigned), "--network", str(w.nets[0])).out
    assert mine.count("$5 USDC budget") == 1 and mine.count("5000000 atomic units of 0x") == 1
    as_json = w.ok("approval", "show", str(unsigned))
    assert as_json["signer"] is None and len(as_json["entries"]) == 4
    assert {e["kind"] for e in as_json["entries"]} == {"escrow grant", "session-key install"}

    # Relaying an unsigned file is refused; signing needs the owner's key and no node.
    assert_one_line_error(
        w.run("approval", "relay", str(unsigned), "--network", str(w.nets[0]), "--relayer", "relayer"),
        "not signed",
    )
    signed = w.tmp / "approval.signed.json"
    made = w.ok("approval", "sign", str(unsigned), "--key", "owner", "--out", str(signed))
    assert made["signed"] is True and made["root"] == built["root"]
    assert w.ok("approval", "show", str(signed))["signer"] == w.owner

    before = [w.eth(i) for i in range(2)]
    for i in range(2):
        assert not w.grant(i).live and not w.installed(i)
        relayed = w.relay(signed, i)
        assert relayed["chain_id"] == ids[i]
        assert [r["kind"] for r in relayed["relayed"]] == ["escrow grant", "session-key install"]
        assert relayed["skipped"] == []
    for i in range(2):  # live on both chains, with the terms shown
        grant = w.grant(i)
        assert grant.live and (grant.budget, grant.max_per_call, grant.payee_count) == (5_000_000, 10_000, 1)
        assert w.installed(i)
    spent = [w.eth(i) for i in range(2)]
    assert all(s < b for s, b in zip(spent, before, strict=True))

    # Relaying again: nothing is sent, every leaf reported as already applied.
    for i in range(2):
        again = w.relay(signed, i)
        assert again["relayed"] == []
        assert [s["state"] for s in again["skipped"]] == ["already applied", "already applied"]
        assert w.eth(i) == spent[i]

    # Revoke everywhere: one more unsigned file (shown, signed), relayed on each chain.
    revoke = w.tmp / "revoke.json"
    assert w.ok("approval", "revoke", str(signed), "--out", str(revoke))["leaves"] == 6
    revoke_text = w.run("approval", "show", str(revoke)).out
    assert revoke_text.count("revoke every escrow grant of key") == 2
    assert revoke_text.count(f"remove session key {w.session}") == 2
    signed_revoke = w.tmp / "revoke.signed.json"
    w.ok("approval", "sign", str(revoke), "--key", "owner", "--out", str(signed_revoke))
    for i in range(2):
        sent = w.relay(signed_revoke, i)
        # The grant revoked and the key removed; the install's nonce is used already (no cancel to send).
        assert [r["kind"] for r in sent["relayed"]] == ["escrow revoke", "session-key revoke"]
        assert [s["kind"] for s in sent["skipped"]] == ["install cancel"]
    for i in range(2):
        assert not w.grant(i).live and not w.installed(i)
        assert w.relay(signed_revoke, i)["relayed"] == []
        # The original approval relayed once more stays dead: its grant is reported as revoked, not sent.
        late = w.relay(signed, i)
        assert late["relayed"] == [] and "revoked" in late["skipped"][0]["state"]
        assert not w.grant(i).live


@pytest.mark.chain
def test_tampered_or_misdirected_approvals_are_refused(world: World) -> None:
    w = world
    ids = [c.chain_id for c in w.devnet.chains]
    unsigned = w.tmp / "approval.json"
    w.build(unsigned)
    signed = w.tmp / "approval.signed.json"
    w.ok("approval", "sign", str(unsigned), "--key", "owner", "--out", str(signed))
    original = json.loads(signed.read_text())

    def variant(name: str, change: Any) -> Path:
        data = json.loads(json.dumps(original))
        change(data)
        path = w.tmp / name
        path.write_text(json.dumps(data))
        return path

    def bigger_budget(d: Any) -> None:
        d["entries"][0]["action"]["grant"]["budget"] = 10**12

    def to_other_chain(d: Any) -> None:  # chain A's grant leaf, relabelled for chain B
        d["entries"][0]["action"]["chainId"] = ids[1]

    def hide_a_leaf(d: Any) -> None:  # the signed root still covers it; the owner would not see it
        del d["entries"][1]
        del d["signature"]

    tampered = variant("tampered.json", bigger_budget)
    for path in (tampered, variant("moved.json", to_other_chain)):
        assert_one_line_error(w.run("approval", "show", str(path)), "tampered", "not under the root")
        for i in range(2):
            line = assert_one_line_error(
                w.run("approval", "relay", str(path), "--network", str(w.nets[i]), "--relayer", "relayer"),
                "refusing to relay",
            )
            assert "not under the root" in line
    hidden = variant("hidden.json", hide_a_leaf)
    assert_one_line_error(w.run("approval", "show", str(hidden)), "commits to leaves this file does not list")
    assert_one_line_error(w.run("approval", "sign", str(hidden), "--key", "owner"), "does not list")
    not_json = w.tmp / "garbage.json"
    not_json.write_text("{")
    assert_one_line_error(w.run("approval", "show", str(not_json)), "not a multichain approval file")

    # Only the owner's key signs it; a signed file is not signed twice.
    assert_one_line_error(
        w.run("approval", "sign", str(unsigned), "--key", "relayer"), "is not this approval's owner"
    )
    assert_one_line_error(w.run("approval", "sign", str(signed), "--key", "owner"), "already signed")

    # Chain A's leaves sent to chain B's node (a description of A pointed at B's RPC): refused before sending.
    line = assert_one_line_error(
        w.run(
            "approval",
            "relay",
            str(signed),
            "--network",
            str(w.nets[0]),
            "--rpc",
            w.devnet.chains[1].rpc_url,
            "--relayer",
            "relayer",
        ),  # fmt: skip
        f"serves chain {ids[1]}, but the network names chain {ids[0]}",
    )
    assert not w.grant(1).live and not w.installed(1) and not w.grant(0).live
    assert not w.grant(0, payer=w.owner).live


@pytest.mark.chain
def test_offline_grant_files_and_a_wallet_signature_make_one_approval(world: World) -> None:
    """The per-chain files `agentpay escrow grant --offline` writes become one approval (the same terms and
    epochs), signed by a wallet over `show --typed-data` (here eth-account's `sign_typed_data`)."""
    from eth_account import Account

    w = world
    ids = [c.chain_id for c in w.devnet.chains]
    files = []
    for i, net in enumerate(w.nets):
        path = w.tmp / f"grant-{i}.json"
        w.ok(
            "escrow", "grant", "--owner", "owner", "--key", w.session, "--max-per-call", "$0.02",
            "--budget", "$3", "--epoch", "7", "--network", str(net), "--offline", str(path),
        )  # fmt: skip
        files += ["--grant", str(path)]
    unsigned = w.tmp / "from-grants.json"
    nets = [a for n in w.nets for a in ("--network", str(n))]  # no terms: display notes only
    built = w.ok("approval", "build", "--owner", "owner", *files, *nets, "--out", str(unsigned))
    assert built["leaves"] == 2
    shown = w.run("approval", "show", str(unsigned)).out
    assert f"{w.owner} (the owner): $3 USDC budget, $0.02 USDC per call" in shown

    typed = w.ok("approval", "show", str(unsigned), "--typed-data")
    assert typed["domain"] == {"name": "AgentPay Multichain", "version": "1"}  # no chainId: one for all
    assert typed["message"]["root"] == built["root"]
    owner_key = w.ok("key", "show", "owner", "--reveal")["private_key"]
    signature = Account.sign_typed_data(owner_key, full_message=typed).signature.hex()
    wrong = Account.sign_typed_data("0x" + "11" * 32, full_message=typed).signature.hex()
    assert_one_line_error(w.run("approval", "sign", str(unsigned), "--signature", wrong), "not by the owner")
    signed = w.tmp / "from-grants.signed.json"
    w.ok("approval", "sign", str(unsigned), "--signature", signature, "--out", str(signed))
    # A several-chain devnet state names its chain with --chain (alone, --network beside it is ambiguous).
    state = str(Path(w.nets[0]).with_name("devnet.json"))
    assert_one_line_error(
        w.run("approval", "relay", str(signed), "--devnet", state, "--network", str(w.nets[1]), "--relayer",
              "relayer"),
        "has 2 chains", "--chain",
    )  # fmt: skip
    on_b = w.ok(
        "approval", "relay", str(signed), "--devnet", state, "--chain", str(ids[1]), "--relayer", "devnet:5"
    )
    assert on_b["chain_id"] == ids[1] and [r["kind"] for r in on_b["relayed"]] == ["escrow grant"]
    assert [r["kind"] for r in w.relay(signed, 0)["relayed"]] == ["escrow grant"]
    for i in range(2):
        grant = w.grant(i, payer=w.owner)
        assert grant.live and (grant.epoch, grant.budget, grant.max_per_call) == (7, 3_000_000, 20_000)
    # The single-chain file of the same grant is now spent (same epoch): at most one of the two ever lands.
    refused = w.run("relay", files[1], "--network", str(w.nets[0]), "--relayer", "relayer")
    assert_one_line_error(refused, "EscrowStaleEpoch")

    # Revoking on one chain only: the other stays live, and the revoke file has nothing for it.
    revoke = w.tmp / "revoke-a.json"
    assert (
        w.ok("approval", "revoke", str(signed), "--chain", str(ids[0]), "--out", str(revoke))["leaves"] == 1
    )
    w.ok("approval", "sign", str(revoke), "--key", "owner", "--out", str(revoke))
    assert [r["kind"] for r in w.relay(revoke, 0)["relayed"]] == ["escrow revoke"]
    assert not w.grant(0, payer=w.owner).live and w.grant(1, payer=w.owner).live
    assert_one_line_error(
        w.run("approval", "relay", str(revoke), "--network", str(w.nets[1]), "--relayer", "relayer"),
        f"has no leaf for chain {ids[1]}",
    )


def _python_api_file(path: Path) -> dict[str, Any]:
    """A signed approval from the Python API (`SignedMultichainApproval.dump`: no `type`, no notes)."""
    owner = LocalSigner.random()
    approval = MultichainApproval()
    for chain_id in (8453, 42161):
        approval.grant(
            chain_id=chain_id, escrow="0x" + "22" * 20, payer=owner.address, signer="0x" + "33" * 20,
            token="0x" + "44" * 20, max_per_call=1_000, budget=20_000, valid_until=2**32 - 1,
        )  # fmt: skip
    approval.sign(owner).dump(path)
    return dict(json.loads(path.read_text()))


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"signature": "0x1234"}, "the signature is malformed"),
        ({"root": "0x" + "00" * 32}, "is not under the root"),
        ({"escrow": "0xzz"}, "not a multichain approval file"),
        ({"budget": -1}, "not a multichain approval file"),
        ({"chainId": "8453"}, "not a multichain approval file"),
        ({"kind": "transfer"}, "not a multichain approval file"),
        ({"entries": []}, "not a multichain approval file"),
    ],
)
def test_show_refuses_malformed_files_in_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], change: dict[str, Any], message: str
) -> None:
    path = tmp_path / "approval.json"
    data = _python_api_file(path)
    shown = cli(capsys, "approval", "show", str(path))
    assert shown.code == 0 and "2 leaves on 2 chains" in shown.out  # the Python API's file is read as is
    assert "20000 atomic units of 0x4444" in shown.out  # no notes: no token is guessed
    [(name, value)] = change.items()
    action = data["entries"][0]["action"]
    target = data if name in data else action if name in action else action["grant"]
    target[name] = value
    path.write_text(json.dumps(data))
    assert_one_line_error(cli(capsys, "approval", "show", str(path)), message)
