"""`agentpay key new|list|show`, run as the console script: encrypted keystores in the standard format, and a
private key printed only with `--reveal`."""

from __future__ import annotations

import json
import os
import pty
import select
import stat
import time
from pathlib import Path

from eth_account import Account

from tests._cli_helpers import AGENTPAY, ROOT, agentpay, assert_one_line_error


def test_keys_made_listed_and_shown_without_their_private_key(tmp_path: Path) -> None:
    keystore = tmp_path / "keys"
    env = {"AGENTPAY_KEYSTORE": str(keystore), "AGENTPAY_PASSPHRASE": "correct horse"}

    made = agentpay("key", "new", "--name", "owner", "--light-kdf", "--json", env=env).json()
    other = agentpay("key", "new", "--light-kdf", "--json", env=env).json()

    # the file is a Web3 Secret Storage keystore, only its owner can read it, and eth-account opens it
    path = keystore / "owner.json"
    assert made == {"name": "owner", "address": made["address"], "file": str(path)}
    document = json.loads(path.read_text())
    assert document["version"] == 3 and document["crypto"]["kdf"] == "scrypt"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    private_key = Account.decrypt(document, "correct horse")
    assert Account.from_key(private_key).address == made["address"]
    secret = private_key.hex().removeprefix("0x")

    (keystore / "notes.json").write_text('{"not": "a key"}')  # other files beside the keys are skipped
    listed = agentpay("key", "list", "--json", env=env).json()
    assert {(k["name"], k["address"]) for k in listed["keys"]} == {
        ("owner", made["address"]),
        (other["name"], other["address"]),
    }
    table = agentpay("key", "list", env=env)
    assert made["address"] in table.out and "owner" in table.out

    for ref in ("owner", made["address"], str(path)):  # by name, by address, by file
        shown = agentpay("key", "show", ref, env=env)
        assert shown.code == 0 and made["address"] in shown.out
        assert secret not in shown.out.lower() and secret not in shown.err.lower()

    revealed = agentpay("key", "show", "owner", "--reveal", "--json", env=env).json()
    assert revealed["private_key"].removeprefix("0x") == secret


def test_passphrase_from_a_file_and_wrong_passphrases(tmp_path: Path) -> None:
    keystore = str(tmp_path / "keys")
    phrase = tmp_path / "phrase"
    phrase.write_text("from a file\n")
    made = agentpay(
        "key",
        "new",
        "--name",
        "a",
        "--light-kdf",
        "--keystore",
        keystore,
        "--passphrase-file",
        str(phrase),
        "--json",
    ).json()
    shown = agentpay(
        "key", "show", "a", "--reveal", "--keystore", keystore, "--passphrase-file", str(phrase), "--json"
    ).json()
    assert Account.from_key(shown["private_key"]).address == made["address"]

    wrong = agentpay(
        "key", "show", "a", "--reveal", "--keystore", keystore, env={"AGENTPAY_PASSPHRASE": "nope"}
    )
    assert_one_line_error(wrong, "wrong passphrase", "a")
    assert wrong.out == ""


def test_bad_key_input_is_one_line(tmp_path: Path) -> None:
    keystore = str(tmp_path / "keys")
    env = {"AGENTPAY_PASSPHRASE": "x"}
    assert agentpay("key", "new", "--name", "k", "--light-kdf", "--keystore", keystore, env=env).code == 0
    assert_one_line_error(
        agentpay("key", "new", "--name", "k", "--light-kdf", "--keystore", keystore, env=env),
        "already exists",
    )
    assert_one_line_error(agentpay("key", "show", "missing", "--keystore", keystore), "no key 'missing'")
    assert_one_line_error(
        agentpay("key", "show", str(tmp_path / "nowhere.json"), "--keystore", keystore), "cannot read"
    )
    assert_one_line_error(
        agentpay("key", "new", "--name", "../escape", "--keystore", keystore, env=env), "key name"
    )
    no_source = agentpay("key", "new", "--keystore", keystore, env={"AGENTPAY_PASSPHRASE": ""})
    assert_one_line_error(no_source, "empty passphrase")
    missing_file = agentpay(
        "key", "show", "k", "--reveal", "--keystore", keystore, "--passphrase-file", "/no/such"
    )
    assert_one_line_error(missing_file, "cannot read the passphrase file")


def _on_a_terminal(args: list[str], answers: list[tuple[bytes, bytes]]) -> tuple[int, bytes]:
    """Run `agentpay ARGS` on a pseudo-terminal (its controlling terminal, as a person's shell), answering
    each prompt as it appears; returns the exit status and everything the terminal showed."""
    env = {k: v for k, v in os.environ.items() if k != "AGENTPAY_PASSPHRASE"}
    env["PYTHONPATH"] = str(ROOT)
    pid, terminal = pty.fork()
    if pid == 0:  # the child: a new session whose controlling terminal is the pty
        os.execve(AGENTPAY, [AGENTPAY, *args], env)
    shown, pending = b"", list(answers)
    deadline = time.monotonic() + 120
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([terminal], [], [], 1.0)
            if not ready:
                continue
            try:
                chunk = os.read(terminal, 4096)
            except OSError:  # EIO: the program exited and everything was read
                break
            if not chunk:
                break
            shown += chunk
            if pending and shown.rstrip().endswith(pending[0][0].rstrip()):
                os.write(terminal, pending.pop(0)[1])
    finally:
        os.close(terminal)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status), shown


def test_passphrase_prompts_on_a_terminal(tmp_path: Path) -> None:
    keystore = str(tmp_path / "keys")
    code, shown = _on_a_terminal(
        ["key", "new", "--name", "typed", "--light-kdf", "--keystore", keystore, "--json"],
        [(b"passphrase for the new key typed:", b"by hand\n"), (b"again:", b"by hand\n")],
    )
    assert code == 0, shown
    assert b"by hand" not in shown  # not echoed
    address = json.loads(shown[shown.index(b"{") :].decode())["address"]
    document = json.loads((tmp_path / "keys" / "typed.json").read_text())
    assert Account.from_key(Account.decrypt(document, "by hand")).address == address

    code, shown = _on_a_terminal(
        ["key", "show", "typed", "--reveal", "--keystore", keystore],
        [(b"passphrase for typed (" + address.encode() + b"):", b"not it\n")],
    )
    assert code == 1 and b"agentpay: error: wrong passphrase for the key typed" in shown

    code, shown = _on_a_terminal(
        ["key", "new", "--name", "mistyped", "--keystore", keystore],
        [(b"passphrase for the new key mistyped:", b"one\n"), (b"again:", b"two\n")],
    )
    assert code == 1 and b"agentpay: error: the passphrases differ" in shown
    assert not (tmp_path / "keys" / "mistyped.json").exists()
