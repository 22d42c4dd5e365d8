"""Offline-signed files and `agentpay relay FILE...`.

An owner signs on one machine (`--offline FILE`) and anyone with gas relays from another. What a relayer
sends is fixed by the owner's signature: it can pay the gas, or not send at all, and nothing else. The files:

- escrow grant (`grant`, `signature`), from `escrow grant --offline` and `session-key new`: `grantWithSig`;
- escrow revoke (`payer`, `signer`, `epoch`), from `escrow revoke` and `session-key revoke`: `revokeWithSig`;
- escrow deposit (`kind`: authorization or permit), from `escrow deposit`: `depositWithAuthorization`;
- `installSessionKey` / `revokeSessionKey`, from `session-key new` / `revoke`: `...SessionKeyWithSig`;
- `transaction`, a signed raw transaction from `escrow withdraw`: broadcast as is (its sender pays gas);
- `bundle` (`items`: any of the above), from `session-key new` / `revoke`: each item in order.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import msgspec
from eth_utils.address import to_checksum_address

from escrow import (
    AgentAccount,
    Chain,
    RevertError,
    SignedDeposit,
    SignedGrant,
    SignedRevoke,
    SignedSessionKeyInstall,
    SignedSessionKeyRevoke,
    relay_deposit,
    relay_grant,
    relay_revoke,
)
from escrow.accounts._userop import ENTRYPOINT_V07

from ._cli_common import (
    CliError,
    add_chain_args,
    add_json,
    add_keystore_args,
    emit,
    handler,
    open_chain,
    progress,
    run,
    table,
)
from .cli import command

__all__ = ["SignedTransaction", "Signed", "load_signed", "relay_one", "send_or_write", "write_signed"]


class SignedTransaction(msgspec.Struct, frozen=True, kw_only=True, rename="camel", tag="transaction"):
    """A transaction the owner signed offline (its nonce and fees fixed at signing); its sender pays gas."""

    chain_id: int
    sender: str
    to: str
    description: str
    raw: str


Signed = (
    SignedGrant
    | SignedRevoke
    | SignedDeposit
    | SignedSessionKeyInstall
    | SignedSessionKeyRevoke
    | SignedTransaction
)

_KINDS: dict[type[Any], str] = {
    SignedGrant: "escrow grant",
    SignedRevoke: "escrow revoke",
    SignedDeposit: "escrow deposit",
    SignedSessionKeyInstall: "session key install",
    SignedSessionKeyRevoke: "session key revoke",
    SignedTransaction: "transaction",
}


def kind_of(item: Signed) -> str:
    return _KINDS[type(item)]


def _as_builtins(item: Signed) -> Any:
    return msgspec.to_builtins(item)


def write_signed(path: str | Path, items: Sequence[Signed]) -> None:
    """One signed item as its own file, several as a `bundle` relayed in order."""
    target = Path(path)
    body: Any = (
        _as_builtins(items[0])
        if len(items) == 1
        else {"type": "bundle", "items": [_as_builtins(i) for i in items]}
    )
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(target.name + ".tmp")
    partial.write_text(json.dumps(body, indent=2) + "\n")
    partial.replace(target)


def _decode(path: str, entry: Any) -> Signed:
    if not isinstance(entry, dict):
        raise CliError(f"{path}: not an offline-signed agentpay file")
    tagged: dict[str, type[Any]] = {
        "installSessionKey": SignedSessionKeyInstall,
        "revokeSessionKey": SignedSessionKeyRevoke,
        "transaction": SignedTransaction,
    }
    kind: type[Any] | None = tagged.get(str(entry.get("type")))
    if kind is None:
        if "grant" in entry:
            kind = SignedGrant
        elif "kind" in entry:
            kind = SignedDeposit
        elif {"payer", "signer", "epoch"} <= entry.keys():
            kind = SignedRevoke
        else:
            raise CliError(f"{path}: not an offline-signed agentpay file (no grant, revoke, deposit, ...)")
    try:
        return msgspec.convert(entry, type=kind)
    except (msgspec.ValidationError, ValueError) as exc:
        raise CliError(f"{path}: invalid {_KINDS[kind]} file: {exc}") from None


def load_signed(path: str) -> list[Signed]:
    try:
        data = json.loads(Path(path).read_text())
    except OSError as exc:
        raise CliError(f"cannot read {path}: {exc.strerror}") from None
    except ValueError:
        raise CliError(f"{path}: not JSON") from None
    if isinstance(data, dict) and data.get("type") == "bundle":
        items = data.get("items")
        if not isinstance(items, list) or not items:
            raise CliError(f"{path}: a bundle needs a non-empty list of items")
        return [_decode(path, entry) for entry in items]
    return [_decode(path, data)]


def _account(chain: Chain, address: str) -> AgentAccount:
    return AgentAccount(
        chain.rpc,
        address,
        chain_id=chain.network.chain_id,
        entry_point=chain.network.entrypoint or ENTRYPOINT_V07,
    )


def _revert_reason(chain: Chain, exc: RevertError) -> str:
    decoded = chain.escrow.abi.decode_error(exc.data) if chain.network.escrow else None
    if decoded is None:
        return str(exc)
    name, values = decoded
    return f"{name}({', '.join(map(str, values))})"


async def relay_one(chain: Chain, item: Signed) -> str:
    """Send one signed item with the chain's relayer; returns the transaction hash once it landed."""
    chain_id = chain.network.chain_id
    if item.chain_id != chain_id:
        raise CliError(f"this {kind_of(item)} was signed for chain {item.chain_id}, not {chain_id}")
    try:
        if isinstance(item, SignedGrant):
            receipt = await relay_grant(chain.escrow, chain.relayer, item)
        elif isinstance(item, SignedRevoke):
            receipt = await relay_revoke(chain.escrow, chain.relayer, item)
        elif isinstance(item, SignedDeposit):
            receipt = await relay_deposit(chain.escrow, chain.relayer, item)
        elif isinstance(item, SignedSessionKeyInstall):
            receipt = await _account(chain, item.account).relay_install(item, chain.relayer)
        elif isinstance(item, SignedSessionKeyRevoke):
            receipt = await _account(chain, item.account).relay_revoke(item, chain.relayer)
        else:
            tx_hash = await chain.rpc.send_raw_transaction(bytes.fromhex(item.raw.removeprefix("0x")))
            receipt = await chain.rpc.wait_for_receipt(tx_hash, timeout=60)
            if not receipt.ok:
                raise CliError(f"the signed transaction ({item.description}) {tx_hash} reverted")
    except RevertError as exc:
        raise CliError(f"relaying the {kind_of(item)} would revert: {_revert_reason(chain, exc)}") from None
    return receipt.transaction_hash


def send_or_write(args: argparse.Namespace, items: list[Signed], result: dict[str, Any]) -> None:
    """Write `items` to `--offline FILE`, or relay them now with `--relayer`; then print `result`."""
    if args.offline:
        write_signed(args.offline, items)
        result["offline"] = args.offline
    else:

        async def send() -> list[str]:
            async with open_chain(args, args.relayer) as chain:
                hashes = []
                for item in items:
                    progress(f"relaying: {describe(item)} ...")
                    hashes.append(await relay_one(chain, item))
                return hashes

        result["txs"] = run(send())
    rows = [(k, v) for k, v in result.items() if not isinstance(v, list | dict)]
    emit(args, result, [*rows, *(("tx", tx) for tx in result.get("txs", []))])


def describe(item: Signed) -> str:
    if isinstance(item, SignedGrant):
        g = item.grant
        return f"grant {g.signer} by {g.payer}: {g.max_per_call}/call, budget {g.budget}, epoch {g.epoch}"
    if isinstance(item, SignedRevoke):
        return f"revoke {item.signer} by {item.payer} through epoch {item.epoch}"
    if isinstance(item, SignedDeposit):
        return f"deposit {item.amount} for {item.payer}"
    if isinstance(item, SignedSessionKeyInstall):
        return f"install session key {item.key} on {item.account}"
    if isinstance(item, SignedSessionKeyRevoke):
        return f"revoke session key {item.key} on {item.account}"
    return f"{item.description} from {to_checksum_address(item.sender)}"


@handler
def _relay(args: argparse.Namespace) -> int:
    batches = [(path, load_signed(path)) for path in args.files]  # all files checked before sending any
    needs_gas = [kind_of(i) for _, items in batches for i in items if not isinstance(i, SignedTransaction)]
    if needs_gas and args.relayer is None:
        raise CliError(f"relaying a {needs_gas[0]} takes a key that pays the gas: pass --relayer KEY")

    async def send_all() -> list[dict[str, Any]]:
        sent: list[dict[str, Any]] = []
        async with open_chain(args, args.relayer) as chain:
            for path, items in batches:
                for item in items:
                    progress(f"relaying {path}: {describe(item)} ...")
                    tx = await relay_one(chain, item)
                    progress(f"landed in {tx}")
                    sent.append({"file": path, "kind": kind_of(item), "what": describe(item), "tx": tx})
        return sent

    sent = run(send_all())
    rows = table(("FILE", "WHAT", "TX"), ((s["file"], s["what"], s["tx"]) for s in sent))
    emit(args, {"relayed": sent}, rows)
    return 0


@command(
    "relay", help="send offline-signed files (grants, revokes, deposits, session keys) with any funded key"
)
def _relay_command(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("files", nargs="+", metavar="FILE", help="files written with --offline, in order")
    parser.add_argument(
        "--relayer",
        help="the key that pays the gas (name, address or devnet:N); signed transactions need none",
    )
    add_chain_args(parser)
    add_keystore_args(parser)
    add_json(parser)
    parser.set_defaults(func=_relay)
