"""What the operator's commands share: output (`--json` or a short table), one-line errors, progress on a
terminal, keystores and passphrases, and naming a chain (`--devnet FILE`, or `--network FILE [--rpc URL]`).

Every handler is wrapped by `handler`, which turns the errors a user can cause (a malformed amount, a
network description that contradicts itself, an unreachable server, a bad TOML file) into `CliError`, so
`gateway.cli.main` prints them as one `agentpay: error: ...` line and exits 1.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import getpass
import json
import os
import re
import sys
import time
from collections.abc import Callable, Coroutine, Iterable, Sequence
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import msgspec
from eth_account import Account
from eth_utils.address import is_address, to_checksum_address

from escrow import AgentAccountFactory, Chain, DevnetState, EscrowError, load_network, network_of_devnet
from x402 import LocalSigner, Network, X402Error

from ._errors import GatewayError

__all__ = [
    "CliError",
    "KeyRef",
    "account_of",
    "add_chain_args",
    "add_json",
    "add_keystore_args",
    "address_of",
    "emit",
    "handler",
    "human",
    "keystore_dir",
    "load_private_key",
    "load_signer",
    "network_of",
    "open_chain",
    "parse_duration",
    "progress",
    "run",
]

DEFAULT_KEYSTORE = "~/.agentpay/keys"


class CliError(GatewayError):
    """A command that cannot do what was asked; the message is the whole story, shown on one line."""

    def __init__(self, message: str, *, code: str = "cli_error") -> None:
        super().__init__(message, code=code)


def handler(run_command: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    """`run_command`, with every error a user can cause raised as a one-line `CliError`."""

    @functools.wraps(run_command)
    def wrapped(args: argparse.Namespace) -> int:
        try:
            return run_command(args)
        except (EscrowError, GatewayError):
            raise
        except X402Error as exc:
            raise CliError(exc.message, code=exc.code) from None
        except httpx.HTTPError as exc:
            where = f" ({exc.request.url})" if _has_request(exc) else ""
            raise CliError(f"HTTP request failed{where}: {exc or type(exc).__name__}") from None
        except (ValueError, msgspec.DecodeError) as exc:  # malformed addresses, keys, amounts, ...
            raise CliError(str(exc)) from None

    return wrapped


def _has_request(exc: httpx.HTTPError) -> bool:
    try:
        exc.request  # noqa: B018 - raises RuntimeError when the error has no request
    except RuntimeError:
        return False
    return True


def run(coroutine: Coroutine[Any, Any, Any]) -> Any:
    return asyncio.run(coroutine)


# -- output


def add_json(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print one JSON object on stdout")


def emit(args: argparse.Namespace, result: dict[str, Any], rows: Iterable[tuple[str, Any]] = ()) -> None:
    """`result` as one JSON object (`--json`), or `rows` (default: `result`'s scalar fields) as a table."""
    if getattr(args, "json", False):
        sys.stdout.write(json.dumps(result, default=str) + "\n")
        return
    lines = list(rows) or [(k, v) for k, v in result.items() if not isinstance(v, list | dict)]
    width = max((len(name) for name, _ in lines), default=0)
    for name, value in lines:
        sys.stdout.write(f"{name.ljust(width)}  {value}\n" if name else f"{value}\n")


def table(headers: Sequence[str], records: Iterable[Sequence[Any]]) -> list[tuple[str, str]]:
    """Rows of a column table, as `emit` prints them (an empty name prints the line alone)."""
    cells = [list(map(str, headers)), *([str(v) for v in record] for record in records)]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    return [("", "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip()) for row in cells]


def progress(message: str) -> None:
    """A progress note for a person watching: shown only when stderr is a terminal."""
    if sys.stderr.isatty():
        sys.stderr.write(f"agentpay: {message}\n")
        sys.stderr.flush()


# -- durations and addresses

_DURATION = re.compile(r"^\s*([0-9]+)\s*(s|m|h|d|w)?\s*$")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800, None: 1}


def parse_duration(value: object, what: str = "duration") -> int:
    """Seconds from `3600`, `"90s"`, `"15m"`, `"24h"`, `"7d"`, `"2w"`."""
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    match = _DURATION.match(value) if isinstance(value, str) else None
    if match is None:
        raise CliError(f"{what} {value!r} is not a duration (seconds, or like 90s, 15m, 24h, 7d)")
    return int(match.group(1)) * _UNITS[match.group(2)]


def checked_address(value: str, what: str = "address") -> str:
    if not is_address(value) or not value.startswith("0x"):
        raise CliError(f"{what} {value!r} is not a 0x-prefixed 20-byte address")
    return str(to_checksum_address(value))


# -- keystores (Web3 Secret Storage files, one per key)


def add_keystore_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--keystore",
        default=os.environ.get("AGENTPAY_KEYSTORE", DEFAULT_KEYSTORE),
        help=f"keystore directory (default: $AGENTPAY_KEYSTORE or {DEFAULT_KEYSTORE})",
    )
    parser.add_argument(
        "--passphrase-file",
        help="read the passphrase from this file (else $AGENTPAY_PASSPHRASE, else a prompt)",
    )


def keystore_dir(args: argparse.Namespace) -> Path:
    return Path(os.path.expanduser(args.keystore))


def _read_keystore(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except OSError as exc:
        raise CliError(f"cannot read the keystore {path}: {exc.strerror}") from None
    except ValueError:
        raise CliError(f"{path} is not a keystore file (not JSON)") from None
    if not isinstance(data, dict) or "crypto" not in data and "Crypto" not in data or "address" not in data:
        raise CliError(f"{path} is not a Web3 Secret Storage keystore")
    return data


class KeyRef:
    """One key in the keystore: its file, name and address (readable without the passphrase)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.data = _read_keystore(path)
        self.name = path.stem
        self.address = str(to_checksum_address("0x" + str(self.data["address"]).removeprefix("0x")))

    @staticmethod
    def all(directory: Path) -> list[KeyRef]:
        if not directory.is_dir():
            return []
        keys = []
        for path in sorted(directory.glob("*.json")):
            try:
                keys.append(KeyRef(path))
            except CliError:  # another file kept beside the keys: not ours to list, nor to fail on
                continue
        return keys

    @staticmethod
    def find(directory: Path, ref: str) -> KeyRef:
        """`ref` is a key's name, its address, or the path of a keystore file."""
        if ref.endswith(".json") or os.sep in ref:
            return KeyRef(Path(ref))
        named = directory / f"{ref}.json"
        if named.is_file():
            return KeyRef(named)
        if is_address(ref):
            for key in KeyRef.all(directory):
                if key.address.lower() == ref.lower():
                    return key
        raise CliError(f"no key {ref!r} in the keystore {directory} (see `agentpay key list`)")

    def decrypt(self, passphrase: str) -> bytes:
        try:
            return bytes(Account.decrypt(self.data, passphrase))
        except ValueError:  # eth-keyfile's "MAC mismatch"
            raise CliError(f"wrong passphrase for the key {self.name} ({self.path})") from None


def read_passphrase(args: argparse.Namespace, prompt: str, *, confirm: bool = False) -> str:
    """The passphrase from `--passphrase-file`, `$AGENTPAY_PASSPHRASE`, or a prompt on a terminal."""
    if getattr(args, "passphrase_file", None):
        try:
            return Path(args.passphrase_file).read_text().rstrip("\r\n")
        except OSError as exc:
            raise CliError(
                f"cannot read the passphrase file {args.passphrase_file}: {exc.strerror}"
            ) from None
    if "AGENTPAY_PASSPHRASE" in os.environ:
        return os.environ["AGENTPAY_PASSPHRASE"]
    if not sys.stdin.isatty():
        raise CliError("no passphrase: use --passphrase-file, $AGENTPAY_PASSPHRASE, or run on a terminal")
    first = getpass.getpass(prompt)
    if confirm and getpass.getpass("again: ") != first:
        raise CliError("the passphrases differ")
    return first


def load_private_key(args: argparse.Namespace, ref: str, role: str = "key") -> str:
    """The private key (0x hex) `ref` names: a keystore key (decrypted), or `devnet:N` with `--devnet`."""
    if ref.startswith("devnet:"):
        return _devnet_state(args, ref).accounts[_devnet_index(args, ref)].private_key
    key = KeyRef.find(keystore_dir(args), ref)
    passphrase = read_passphrase(args, f"passphrase for {role} {key.name} ({key.address}): ")
    return "0x" + key.decrypt(passphrase).hex()


def load_signer(args: argparse.Namespace, ref: str, role: str = "key") -> LocalSigner:
    return LocalSigner(load_private_key(args, ref, role))


def address_of(args: argparse.Namespace, ref: str) -> str:
    """The address `ref` names, with no passphrase: an address, a keystore key, or `devnet:N`."""
    if is_address(ref) and ref.startswith("0x") and len(ref) == 42:
        return str(to_checksum_address(ref))
    if ref.startswith("devnet:"):
        return _devnet_state(args, ref).accounts[_devnet_index(args, ref)].address
    return KeyRef.find(keystore_dir(args), ref).address


def _devnet_state(args: argparse.Namespace, ref: str) -> DevnetState:
    if not getattr(args, "devnet", None):
        raise CliError(f"{ref} names a devnet account: pass --devnet FILE")
    return DevnetState.load(args.devnet)


def _devnet_index(args: argparse.Namespace, ref: str) -> int:
    index = ref.removeprefix("devnet:")
    count = len(_devnet_state(args, ref).accounts)
    if not index.isdigit() or int(index) >= count:
        raise CliError(f"{ref}: the devnet has accounts devnet:0 to devnet:{count - 1}")
    return int(index)


# -- chains


def add_chain_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("chain")
    group.add_argument("--devnet", metavar="FILE", help="a devnet state file (`agentpay devnet up`)")
    group.add_argument(
        "--network",
        metavar="FILE",
        default=os.environ.get("AGENTPAY_NETWORK"),
        help="a network description, JSON or TOML (default: $AGENTPAY_NETWORK)",
    )
    group.add_argument("--rpc", metavar="URL", help="the node to use (default: the description's rpc_url)")
    group.add_argument(
        "--chain",
        metavar="ID",
        help="with --devnet: which chain of a several-chain devnet (chain id or label; default: the first)",
    )


def network_of(args: argparse.Namespace) -> Network:
    """The network named on the command line; reads files only, never the node."""
    if args.devnet:
        state, chain = DevnetState.load(args.devnet), getattr(args, "chain", None)
        if chain is None and args.network and len(state.chains) > 1:
            raise CliError(
                f"--devnet {args.devnet} has {len(state.chains)} chains and --network is ignored with it: "
                "name one with --chain ID, or drop --devnet"
            )
        network = network_of_devnet(state, chain=int(chain) if chain and chain.isdigit() else chain)
    elif args.network:
        if not Path(args.network).is_file():
            raise CliError(f"unknown network {args.network!r}: no such description file")
        network = load_network(args.network)
    else:
        raise CliError("name a chain: --devnet FILE, or --network FILE [--rpc URL]")
    if args.rpc:
        network = msgspec.structs.replace(network, rpc_url=args.rpc)
    return network


def open_chain(args: argparse.Namespace, relayer: str | None = None) -> Chain:
    """The chain, with `relayer` (a key reference) as the key that pays gas."""
    network = network_of(args)
    if not network.rpc_url:
        raise CliError(f"no node for {network.network}: pass --rpc URL")
    key = None if relayer is None else load_private_key(args, relayer, "relayer")
    return Chain(network, relayer_key=key)


def unix_now() -> int:
    return int(time.time())


def human(atomic: int, network: Network) -> str:
    """`2000` -> `0.002` in the token's decimals (for tables; JSON keeps atomic units)."""
    text = format(Decimal(atomic).scaleb(-network.token_decimals), "f")
    return (text.rstrip("0").rstrip(".") if "." in text else text) + f" {network.token_symbol}"


async def account_of(chain: Chain, owner: str) -> str:
    """The owner's counterfactual `AgentAccount` address (salt 0), from the network's factory."""
    if not chain.network.account_factory:
        raise CliError(f"{chain.network.network} has no account factory in its description")
    return await AgentAccountFactory(chain.rpc, chain.network.account_factory).get_address(owner)
