"""`agentpay key new|list|show`: encrypted keys in a keystore directory, one Web3 Secret Storage file each.

The files are what `eth_account.Account.encrypt` writes (version 3, scrypt), so geth, Foundry's `cast
wallet` and other wallets read them too. A key's name is its file name without `.json`. The passphrase comes
from `--passphrase-file`, `$AGENTPAY_PASSPHRASE` or a prompt; a private key is printed only with `--reveal`.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import secrets
from typing import Any

from eth_account import Account

from ._cli_common import (
    CliError,
    KeyRef,
    add_json,
    add_keystore_args,
    emit,
    handler,
    keystore_dir,
    read_passphrase,
    table,
)
from .cli import command

__all__: list[str] = []

# geth's `--lightkdf`: scrypt N=4096 instead of 262144, for throwaway keys (devnets, tests, CI).
LIGHT_SCRYPT_N = 4096
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


def _describe(key: KeyRef) -> dict[str, Any]:
    return {"name": key.name, "address": key.address, "file": str(key.path)}


@handler
def _key_new(args: argparse.Namespace) -> int:
    directory = keystore_dir(args)
    private_key = secrets.token_bytes(32)
    address = Account.from_key(private_key).address
    name = args.name or f"key-{address[2:10].lower()}"
    if not _NAME.match(name):
        raise CliError(f"key name {name!r}: use letters, digits, '.', '_' or '-' (at most 64)")
    path = directory / f"{name}.json"
    if path.exists():
        raise CliError(f"a key named {name!r} already exists ({path})")
    passphrase = read_passphrase(args, f"passphrase for the new key {name}: ", confirm=True)
    if not passphrase:
        raise CliError("refusing an empty passphrase")
    kdf_n = LIGHT_SCRYPT_N if args.light_kdf else None
    keystore = Account.encrypt(private_key, passphrase, kdf="scrypt", iterations=kdf_n)
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    # O_EXCL: two `key new --name x` at once cannot overwrite each other; 0600: the file is the key.
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as out:
        json.dump(keystore, out)
        out.write("\n")
    emit(args, _describe(KeyRef(path)))
    return 0


@handler
def _key_list(args: argparse.Namespace) -> int:
    directory = keystore_dir(args)
    keys = KeyRef.all(directory)
    result = {"keystore": str(directory), "keys": [_describe(k) for k in keys]}
    if not keys:
        emit(args, result, [("", f"no keys in {directory} (make one with `agentpay key new`)")])
    else:
        emit(args, result, table(("NAME", "ADDRESS"), ((k.name, k.address) for k in keys)))
    return 0


@handler
def _key_show(args: argparse.Namespace) -> int:
    key = KeyRef.find(keystore_dir(args), args.key)
    result = _describe(key)
    if args.reveal:
        passphrase = read_passphrase(args, f"passphrase for {key.name} ({key.address}): ")
        result["private_key"] = "0x" + key.decrypt(passphrase).hex()
    emit(args, result)
    return 0


@command("key", help="make, list and show encrypted keys (Web3 Secret Storage keystores)")
def _key(parser: argparse.ArgumentParser) -> None:
    actions = parser.add_subparsers(dest="action", required=True, metavar="{new,list,show}")
    new = actions.add_parser("new", help="make a key and store it encrypted")
    new.add_argument("--name", help="its name in the keystore (default: key-<address prefix>)")
    new.add_argument(
        "--light-kdf",
        action="store_true",
        help="scrypt N=4096 instead of 262144: fast, weaker; for devnet and test keys only",
    )
    new.set_defaults(func=_key_new)
    listing = actions.add_parser("list", help="the keys in the keystore (no passphrase needed)")
    listing.set_defaults(func=_key_list)
    show = actions.add_parser("show", help="a key's address; its private key only with --reveal")
    show.add_argument("key", help="a key's name, address, or keystore file")
    show.add_argument("--reveal", action="store_true", help="decrypt and print the private key")
    show.set_defaults(func=_key_show)
    for sub in (new, listing, show):
        add_keystore_args(sub)
        add_json(sub)
