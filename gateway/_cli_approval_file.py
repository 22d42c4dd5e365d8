"""The multichain approval file of `agentpay approval` and what `show` says about it (see `_cli_approval`).

    {"type": "multichainApproval", "owner", "root", "signature" (absent until signed), "entries": [{"action",
     "proof"}], "networks": [{"chainId", "network", "token", "tokenSymbol", "tokenDecimals"}]}

A signed one is also a `SignedMultichainApproval` file (`SignedMultichainApproval.load` ignores `type` and
`networks`). `networks` is display only (symbols and decimals) and outside the signature: `show --network
FILE` takes them from the owner's own descriptions instead, and a token the notes do not name is shown in
atomic units, never guessed.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import msgspec
from eth_abi.exceptions import EncodingError
from eth_utils.address import to_checksum_address
from eth_utils.crypto import keccak

from escrow import MultichainApproval, MultichainEntry, SignedMultichainApproval, load_network
from escrow._multichain import (
    EscrowGrantLeaf,
    EscrowRevokeLeaf,
    SessionKeyCancelLeaf,
    SessionKeyInstallLeaf,
    SessionKeyRevokeLeaf,
)
from escrow.accounts._policy import ArgCondition, CallPermission, SessionPolicy
from escrow.chain._merkle import MerkleTree, approval_digest, verify_proof
from x402 import Network, X402Error
from x402._signer import recover_hash

from ._cli_common import CliError, checked_address

__all__ = [
    "KIND",
    "Amounts",
    "ApprovalFile",
    "NetworkNote",
    "check_approval",
    "describe",
    "load_approval",
    "note",
    "notes_from",
    "raw",
    "unsigned",
    "write_approval",
]

FILE_TYPE = "multichainApproval"


class NetworkNote(msgspec.Struct, frozen=True, kw_only=True, rename="camel"):
    """How to show amounts on one chain (not signed: display only)."""

    chain_id: int
    network: str
    token: str
    token_symbol: str
    token_decimals: int


class ApprovalFile(msgspec.Struct, frozen=True, kw_only=True, rename="camel", omit_defaults=True):
    type: str = FILE_TYPE
    owner: str
    root: str
    signature: str | None = None
    entries: tuple[MultichainEntry, ...]
    networks: tuple[NetworkNote, ...] = ()

    def signed(self) -> SignedMultichainApproval:
        if self.signature is None:
            raise CliError("the approval is not signed yet: `agentpay approval sign FILE --key OWNER` first")
        return SignedMultichainApproval(
            owner=self.owner, root=self.root, signature=self.signature, entries=self.entries
        )


def raw(value: str) -> bytes:
    return bytes.fromhex(value.removeprefix("0x"))


def load_approval(path: str) -> ApprovalFile:
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise CliError(f"cannot read {path}: {exc.strerror}") from None
    try:
        approval = msgspec.json.decode(data, type=ApprovalFile)
        checked_address(approval.owner, "owner")
        [raw(p) for e in approval.entries for p in (approval.root, *e.proof)]
        [e.action.leaf() for e in approval.entries]  # every address and number encodes
    except (msgspec.DecodeError, ValueError, TypeError, EncodingError, CliError) as exc:
        raise CliError(f"{path}: not a multichain approval file: {exc}") from None
    # A `SignedMultichainApproval.dump` file has no `type`: it decodes with the default and is read too.
    if approval.type != FILE_TYPE or not approval.entries:
        raise CliError(f"{path}: not a multichain approval file (type {FILE_TYPE!r} with entries)")
    return approval


def write_approval(path: str, approval: ApprovalFile) -> None:
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(target.name + ".tmp")
    partial.write_bytes(msgspec.json.format(msgspec.json.encode(approval), indent=2) + b"\n")
    partial.replace(target)


def check_approval(path: str, approval: ApprovalFile) -> str | None:
    """Refuse a file whose leaves, proofs, root or signature disagree; returns the signer (None: unsigned)."""
    root = raw(approval.root)
    leaves = [e.action.leaf() for e in approval.entries]
    for i, (entry, leaf) in enumerate(zip(approval.entries, leaves, strict=True)):
        if not verify_proof([raw(p) for p in entry.proof], root, leaf):
            raise CliError(
                f"{path}: tampered or corrupt: leaf {i + 1} ({KIND[type(entry.action)]} on chain "
                f"{entry.action.chain_id}) is not under the root {approval.root}"
            )
    if len(set(leaves)) != len(leaves) or MerkleTree(leaves).root != root:
        raise CliError(f"{path}: the root commits to leaves this file does not list: refusing it")
    if approval.signature is None:
        return None
    try:
        signer = recover_hash(approval_digest(root), raw(approval.signature))
    except (ValueError, X402Error) as exc:
        raise CliError(f"{path}: the signature is malformed: {exc}") from None
    if signer.lower() != approval.owner.lower():
        raise CliError(f"{path}: the root is signed by {signer}, not by the owner {approval.owner}")
    return str(to_checksum_address(signer))


# -- describing leaves


KIND = {
    EscrowGrantLeaf: "escrow grant",
    EscrowRevokeLeaf: "escrow revoke",
    SessionKeyInstallLeaf: "session-key install",
    SessionKeyRevokeLeaf: "session-key revoke",
    SessionKeyCancelLeaf: "install cancel",
}
_SELECTORS = {
    "0x" + keccak(text=sig)[:4].hex(): sig
    for sig in (
        "transfer(address,uint256)",
        "approve(address,uint256)",
        "transferFrom(address,address,uint256)",
        "deposit(address,uint256)",
        "open(address,address,uint256,bytes32,address)",
    )
}


def _when(t: int) -> str:
    return datetime.fromtimestamp(t, UTC).strftime("%Y-%m-%d %H:%M UTC") if t else "no end"


class Amounts:
    """Token amounts in human units when a note names the token on that chain, else atomic units."""

    def __init__(self, notes: Sequence[NetworkNote]) -> None:
        self.notes = {n.chain_id: n for n in notes}

    def network(self, chain_id: int) -> str:
        note = self.notes.get(chain_id)
        return note.network if note else f"eip155:{chain_id}"

    def of(self, chain_id: int, token: str, atomic: int) -> str:
        note = self.notes.get(chain_id)
        if note is None or note.token.lower() != token.lower():
            return f"{atomic} atomic units of {token}"
        whole, frac = divmod(atomic, 10**note.token_decimals)
        text = f"{whole}.{frac:0{note.token_decimals}d}".rstrip("0").rstrip(".") if frac else str(whole)
        dollar = "$" if note.token_symbol.upper().startswith("USD") else ""
        return f"{dollar}{text} {note.token_symbol}"


def _word(value: str) -> str:
    number = int(value, 16)
    return to_checksum_address(f"0x{number:040x}") if 2**140 < number < 2**160 else str(number)


def _permission(p: CallPermission) -> str:
    call = _SELECTORS.get(p.selector.lower(), p.selector) if p.selector != "0x00000000" else "plain transfer"
    rules = []
    for r in p.rules:
        words = [_word(v) for v in r.values]
        op = {ArgCondition.EQUAL: "=", ArgCondition.LESS_OR_EQUAL: "<="}.get(r.condition, "in")
        rules.append(
            f"arg {r.offset // 32} {op} {words[0] if len(words) == 1 else '{' + ', '.join(words) + '}'}"
        )
    value = f", up to {p.value_limit} wei of ETH" if p.value_limit else ""
    return f"{call} on {p.target}" + (f" ({'; '.join(rules)})" if rules else "") + value


def _policy(policy: SessionPolicy) -> str:
    parts = [f"may call: {' | '.join(_permission(p) for p in policy.permissions)}"]
    parts.append(f"gas budget {policy.gas_budget / 10**18:g} ETH")
    parts.append(f"valid {_when(policy.valid_after)} to {_when(policy.valid_until)}")
    if policy.max_uses:
        parts.append(f"at most {policy.max_uses} uses")
    if policy.max_uses_per_interval:
        parts.append(f"{policy.max_uses_per_interval} uses per {policy.interval} s")
    return ", ".join(parts)


def describe(action: Any, amounts: Amounts, owner: str) -> str:
    """One leaf in plain terms: what the chain will do if it is relayed there."""
    c = action.chain_id
    if isinstance(action, EscrowGrantLeaf):
        g = action.grant
        payees = ", ".join(g.payees) if g.payees else "any payee"
        whose = "the owner" if g.payer.lower() == owner.lower() else "an account taking the owner's signature"
        return (
            f"key {g.signer} may spend from the escrow deposit of {g.payer} ({whose}): "
            f"{amounts.of(c, g.token, g.budget)} budget, {amounts.of(c, g.token, g.max_per_call)} per call, "
            f"payees: {payees}, "
            f"from {_when(g.valid_after)} until {_when(g.valid_until)}, epoch {g.epoch}"
        )
    if isinstance(action, EscrowRevokeLeaf):
        return (
            f"revoke every escrow grant of key {action.signer} by {action.payer} through epoch {action.epoch}"
        )
    if isinstance(action, SessionKeyInstallLeaf):
        return (
            f"install session key {action.key} on account {action.account}: {_policy(action.policy)}; "
            f"relayable until {_when(action.deadline)} (nonce {action.nonce})"
        )
    if isinstance(action, SessionKeyRevokeLeaf):
        until = _when(action.deadline)
        return f"remove session key {action.key} from account {action.account} (relayable until {until})"
    return (
        f"burn install nonce {action.nonce} on account {action.account} "
        "(an install with it, not yet relayed there, never lands)"
    )


def notes_from(paths: Sequence[str]) -> list[NetworkNote]:
    return [note(load_network(p)) for p in paths]


def note(network: Network) -> NetworkNote:
    return NetworkNote(
        chain_id=network.chain_id,
        network=network.network,
        token=network.token,
        token_symbol=network.token_symbol,
        token_decimals=network.token_decimals,
    )


def unsigned(owner: str, approval: MultichainApproval, notes: Sequence[NetworkNote]) -> ApprovalFile:
    tree = approval.tree()
    return ApprovalFile(
        owner=owner,
        root="0x" + tree.root.hex(),
        entries=tuple(
            MultichainEntry(action=a, proof=tuple("0x" + p.hex() for p in tree.proof(i)))
            for i, a in enumerate(approval.actions)
        ),
        networks=tuple(notes),
    )
