"""`agentpay approval build|show|sign|relay|revoke`: one owner signature for grants and session keys on
many chains (`escrow.MultichainApproval`), with the owner key offline.

A wallet shows the owner only the Merkle root it signs, so the approval file lists every leaf, and `show`
prints each one in plain terms and proves that the root commits to exactly those leaves: it rebuilds the
tree from the listed leaves (leaves are hashed twice, so no inner node can pass for a hidden leaf) and checks
every proof, and for a signed file the signer. `sign` signs only a root it recomputed itself. The file
format is in `_cli_approval_file`. `relay` sends one chain's leaves and first reads what that chain already
has, so running it twice reports the applied leaves and sends nothing.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import msgspec

from escrow import (
    AgentAccount,
    AgentAccountFactory,
    AgentEscrow,
    Chain,
    MultichainApproval,
    Rpc,
    SignedGrant,
    SignedMultichainApproval,
    SignedSessionKeyInstall,
    load_network,
    relay_multichain,
)
from escrow._multichain import (
    EscrowGrantLeaf,
    EscrowRevokeLeaf,
    SessionKeyInstallLeaf,
    SessionKeyRevokeLeaf,
)
from escrow.chain._merkle import approval_digest, approval_typed_data
from x402 import Network

from ._cli_approval_file import (
    KIND,
    Amounts,
    ApprovalFile,
    check_approval,
    describe,
    load_approval,
    note,
    notes_from,
    raw,
    unsigned,
    write_approval,
)
from ._cli_common import (
    CliError,
    add_chain_args,
    add_json,
    add_keystore_args,
    address_of,
    checked_address,
    emit,
    handler,
    load_signer,
    open_chain,
    parse_duration,
    progress,
    run,
    table,
    unix_now,
)
from ._cli_policy import PolicySpec, load_policy
from ._cli_relay import kind_of, load_signed
from .cli import command

__all__: list[str] = []


# -- build


async def _account_address(network: Network, owner: str) -> str:
    """The owner's counterfactual `AgentAccount` on `network` (salt 0; the same address on every chain the
    factory has the same address on)."""
    if not network.account_factory or not network.rpc_url:
        raise CliError(
            f"{network.network}: no account factory or node to find the owner's account: set account_address"
        )
    rpc = Rpc(network.rpc_url)
    try:
        return str(await AgentAccountFactory(rpc, network.account_factory).get_address(owner))
    finally:
        await rpc.aclose()


def _grant_flags(args: argparse.Namespace, network: Network, now: int) -> dict[str, Any]:
    if args.max_per_call is None or args.budget is None:
        raise CliError("say what the key may spend: --policy FILE, or --max-per-call and --budget")
    return {
        "token": network.token,
        "max_per_call": network.atomic(args.max_per_call),
        "budget": network.atomic(args.budget),
        "valid_after": now - 60,  # a minute of slack for block time and skewed clocks
        "valid_until": now + parse_duration(args.valid_for, "--valid-for"),
        "payees": [checked_address(p, "--payee") for p in args.payee],
        "epoch": args.epoch or now,
    }


def _add_chain(
    approval: MultichainApproval,
    args: argparse.Namespace,
    network: Network,
    owner: str,
    key: str,
    spec: PolicySpec | None,
    now: int,
) -> None:
    if not network.escrow:
        raise CliError(f"{network.network} has no escrow in its description")

    def account() -> str:  # the owner's AgentAccount here: named, or the factory's for this owner
        named = args.account if args.account != "auto" else None
        return checked_address(named or (spec and spec.account) or run(_account_address(network, owner)))

    if spec is None:
        grant = _grant_flags(args, network, now)
        payer = owner if args.account is None else account()
    else:
        g = spec.grant
        grant = {
            "token": g.token,
            "max_per_call": g.max_per_call,
            "budget": g.budget,
            "valid_after": g.valid_after,
            "valid_until": g.valid_until,
            "payees": list(g.payees),
            "epoch": args.epoch or g.epoch,
        }
        payer = account() if spec.payer == "account" else owner
    approval.grant(chain_id=network.chain_id, escrow=network.escrow, payer=payer, signer=key, **grant)
    if spec is not None and spec.account_policy is not None:
        approval.install_session_key(
            chain_id=network.chain_id,
            account=account(),
            key=key,
            policy=spec.account_policy,
            deadline=now + spec.relay_within,
        )


def _summary(path: str, approval: ApprovalFile) -> dict[str, Any]:
    return {
        "file": path,
        "owner": approval.owner,
        "root": approval.root,
        "signed": approval.signature is not None,
        "leaves": len(approval.entries),
        "chain_ids": sorted({e.action.chain_id for e in approval.entries}),
    }


def _from_signed_files(approval: MultichainApproval, paths: Sequence[str]) -> set[int]:
    """The grants and installs of offline-signed files (`escrow grant --offline`, `session-key new
    --offline`), as leaves with the same terms, epoch and nonce: the single-chain file and the leaf are the
    same action, so at most one of them ever lands. Returns the chain ids they name."""
    chains: set[int] = set()
    for path in paths:
        for item in load_signed(path):
            if isinstance(item, SignedGrant):
                g = item.grant  # its payer: the owner, or the owner's account (`show` says which)
                approval.grant(
                    chain_id=item.chain_id,
                    escrow=item.escrow,
                    payer=g.payer,
                    signer=g.signer,
                    token=g.token,
                    max_per_call=g.max_per_call,
                    budget=g.budget,
                    valid_after=g.valid_after,
                    valid_until=g.valid_until,
                    payees=g.payees,
                    epoch=g.epoch,
                )
            elif isinstance(item, SignedSessionKeyInstall):
                approval.install_session_key(
                    chain_id=item.chain_id,
                    account=item.account,
                    key=item.key,
                    policy=item.policy,
                    deadline=item.deadline,
                    nonce=item.nonce,
                )
            else:
                raise CliError(f"{path}: a {kind_of(item)} cannot go in a multichain approval")
            chains.add(item.chain_id)
    return chains


@handler
def _build(args: argparse.Namespace) -> int:
    if not args.network and not args.grant:
        raise CliError("name the chains: --network FILE once per chain, or --grant FILE (offline-signed)")
    networks = [_network(p) for p in args.network]
    ids = [n.chain_id for n in networks]
    if len(set(ids)) != len(ids):
        raise CliError(f"a chain named twice: chain ids {ids}")
    if args.policy and len(args.policy) not in (1, len(networks)):
        raise CliError(f"give one --policy for every chain, or one for all ({len(networks)} chains)")
    owner = address_of(args, args.owner)
    now = unix_now()
    approval = MultichainApproval()
    from_files = _from_signed_files(approval, args.grant)
    # With --grant files and no terms, --network files only say how to show amounts on their chains.
    if networks and (args.policy or args.budget or args.max_per_call or not from_files):
        if from_files & set(ids):
            raise CliError(f"chain {sorted(from_files & set(ids))[0]} is named by both --grant and --network")
        if args.key is None:
            raise CliError("which session key: --key ADDRESS (or a key name)")
        key = address_of(args, args.key)
        for i, network in enumerate(networks):
            spec = None
            if args.policy:
                spec = load_policy(args.policy[i if len(args.policy) > 1 else 0], network, now=now)
            _add_chain(approval, args, network, owner, key, spec, now)
    built = unsigned(owner, approval, [note(n) for n in networks])
    write_approval(args.out, built)
    emit(args, _summary(args.out, built))
    return 0


def _network(path: str) -> Network:
    if not Path(path).is_file():
        raise CliError(f"unknown network {path!r}: no such description file")
    return load_network(path)


# -- show / sign


def _leaves(approval: ApprovalFile, amounts: Amounts) -> list[dict[str, Any]]:
    return [
        {
            "index": i + 1,
            "chain_id": e.action.chain_id,
            "network": amounts.network(e.action.chain_id),
            "kind": KIND[type(e.action)],
            "contract": e.action.contract,
            "what": describe(e.action, amounts, approval.owner),
            "leaf": "0x" + e.action.leaf().hex(),
            "action": msgspec.to_builtins(e.action),
        }
        for i, e in enumerate(approval.entries)
    ]


@handler
def _show(args: argparse.Namespace) -> int:
    approval = load_approval(args.file)
    signer = check_approval(args.file, approval)
    if args.typed_data:  # for a wallet that signs EIP-712 itself (`sign --signature` takes its answer)
        typed = approval_typed_data(raw(approval.root))
        typed["message"] = {"root": approval.root}
        sys.stdout.write(json.dumps(typed) + "\n")
        return 0
    amounts = Amounts(notes_from(args.network) if args.network else approval.networks)
    leaves = _leaves(approval, amounts)
    result = {
        **_summary(args.file, approval),
        "signer": signer,
        "digest": "0x" + approval_digest(raw(approval.root)).hex(),
        "entries": leaves,
    }
    status = f"signed by {signer}" if signer else "NOT signed"
    rows: list[tuple[str, Any]] = [
        ("approval", f"{args.file} ({status})"),
        ("owner", approval.owner),
        ("root", f"{approval.root}  <- what the wallet shows (MultichainApproval, no chain id)"),
        ("digest", f"{result['digest']}  <- the EIP-712 hash a blind-signing device shows"),
        (
            "amounts",
            "in the units of your --network files"
            if args.network
            else "token symbols and decimals from the file (unsigned notes; --network FILE: yours)",
        ),
        (
            "checked",
            f"{len(leaves)} leaves on {len(result['chain_ids'])} chains; the root commits to exactly these",
        ),
    ]
    for leaf in leaves:
        rows.append(
            (
                "",
                f"[{leaf['index']}] {leaf['network']} ({leaf['chain_id']}) "
                f"{leaf['kind']} on {leaf['contract']}",
            )
        )
        rows.append(("", f"    {leaf['what']}"))
    emit(args, result, rows)
    return 0


@handler
def _sign(args: argparse.Namespace) -> int:
    approval = load_approval(args.file)
    if check_approval(args.file, approval) is not None:
        raise CliError(f"{args.file} is already signed by {approval.owner}")
    rebuilt = MultichainApproval()
    rebuilt.actions = [e.action for e in approval.entries]
    root = rebuilt.tree().root  # recomputed here: what is signed is the tree of the listed leaves
    if args.signature:  # made elsewhere (a hardware wallet, over `show --typed-data`); checked below
        signature = raw(args.signature)
    else:
        owner = load_signer(args, args.owner_key, "owner")
        if owner.address.lower() != approval.owner.lower():
            raise CliError(f"the key {owner.address} is not this approval's owner {approval.owner}")
        signature = owner.sign_hash(approval_digest(root))
    signed = msgspec.structs.replace(approval, root="0x" + root.hex(), signature="0x" + signature.hex())
    out = args.out or str(Path(args.file).with_suffix("")) + ".signed.json"
    check_approval(out, signed)
    write_approval(out, signed)
    emit(args, _summary(out, signed))
    return 0


# -- relay


async def _applied(chain: Chain, action: Any) -> str | None:
    """What this chain already shows of `action` (a reason not to send it), or None: send it."""
    if await chain.rpc.request("eth_getCode", [action.contract, "latest"]) in ("0x", "0x0"):
        return None  # relay_multichain refuses it with its own clear error
    if isinstance(action, EscrowGrantLeaf | EscrowRevokeLeaf):
        is_grant = isinstance(action, EscrowGrantLeaf)
        if isinstance(action, EscrowGrantLeaf):
            payer, signer, epoch = action.grant.payer, action.grant.signer, action.grant.epoch
        else:
            payer, signer, epoch = action.payer, action.signer, action.epoch
        now = await AgentEscrow(chain.rpc, action.escrow).grant_of(payer, signer)
        if is_grant:
            if now.epoch == epoch and now.live:
                return "already applied"
            if now.epoch >= epoch:
                return f"superseded: epoch {now.epoch} is {'live' if now.live else 'revoked'} here"
            return None
        if now.epoch == epoch and not now.live:
            return "already applied"
        return f"superseded: a grant of epoch {now.epoch} is live here" if now.epoch > epoch else None
    account = AgentAccount(chain.rpc, action.account, chain_id=chain.network.chain_id)
    if isinstance(action, SessionKeyInstallLeaf):
        if not await account.approval_nonce_used(action.nonce):
            return None
        installed = (await account.session_key(action.key)).installed
        return (
            "already applied" if installed else "its nonce is used here (cancelled, or installed and removed)"
        )
    if isinstance(action, SessionKeyRevokeLeaf):
        return (
            None
            if (await account.session_key(action.key)).installed
            else "not installed here: nothing to remove"
        )
    return "already applied (nonce used)" if await account.approval_nonce_used(action.nonce) else None


@handler
def _relay(args: argparse.Namespace) -> int:
    approval = load_approval(args.file)
    try:
        check_approval(args.file, approval)
    except CliError as exc:
        raise CliError(f"refusing to relay: {exc.message}") from None
    signed = approval.signed()
    amounts = Amounts(approval.networks)

    async def send() -> dict[str, Any]:
        async with open_chain(args, args.relayer) as chain:
            chain_id = chain.network.chain_id
            served = int(await chain.rpc.request("eth_chainId", []), 16)
            if served != chain_id:
                raise CliError(
                    f"the node {chain.network.rpc_url} serves chain {served}, but the network names chain "
                    f"{chain_id}: refusing to send chain {chain_id}'s leaves there"
                )
            mine = [(i, e) for i, e in enumerate(signed.entries) if e.action.chain_id == chain_id]
            if not mine:
                raise CliError(
                    f"{args.file} has no leaf for chain {chain_id} (it has chains {signed.chain_ids})"
                )
            relayed, skipped = [], []
            for i, entry in mine:
                state = await _applied(chain, entry.action)  # read just before: earlier leaves count
                what = {
                    "index": i + 1,
                    "kind": KIND[type(entry.action)],
                    "what": describe(entry.action, amounts, signed.owner),
                }
                if state is None:
                    progress(f"relaying leaf {i + 1} ({what['kind']}) on chain {chain_id} ...")
                    receipts = await relay_multichain(chain.relayer, signed, entries=[entry])
                    if receipts:
                        relayed.append({**what, "tx": receipts[0].transaction_hash})
                        continue
                    state = "already applied (nothing to do)"
                skipped.append({**what, "state": state})
            return {
                "file": args.file,
                "network": chain.network.network,
                "chain_id": chain_id,
                "relayed": relayed,
                "skipped": skipped,
            }

    result = run(send())
    rows = [("network", f"{result['network']} ({result['chain_id']})")]
    rows += table(
        ("LEAF", "KIND", "TX OR STATE"),
        [(r["index"], r["kind"], r["tx"]) for r in result["relayed"]]
        + [(s["index"], s["kind"], s["state"]) for s in result["skipped"]],
    )
    emit(args, result, rows)
    return 0


# -- revoke


@handler
def _revoke(args: argparse.Namespace) -> int:
    approval = load_approval(args.file)
    check_approval(args.file, approval)
    entries = [e for e in approval.entries if not args.chain or e.action.chain_id in args.chain]
    kept = [e for e in entries if isinstance(e.action, EscrowGrantLeaf | SessionKeyInstallLeaf)]
    if not kept:
        raise CliError(
            f"{args.file} grants nothing to revoke" + (f" on chains {args.chain}" if args.chain else "")
        )
    source = SignedMultichainApproval(
        owner=approval.owner, root=approval.root, signature="0x", entries=tuple(kept)
    )
    revoking = MultichainApproval.revoking(source, deadline=unix_now() + parse_duration(args.relay_within))
    built = unsigned(approval.owner, revoking, approval.networks)
    write_approval(args.out, built)
    emit(args, _summary(args.out, built))
    return 0


@command(
    "approval",
    help="one owner signature for grants and session keys on many chains (build, show, sign, relay)",
)
def _approval(parser: argparse.ArgumentParser) -> None:
    actions = parser.add_subparsers(dest="action", required=True, metavar="{build,show,sign,relay,revoke}")
    build = actions.add_parser("build", help="an UNSIGNED approval: a grant (and install) per chain")
    build.add_argument(
        "--owner", required=True, help="the owner (key name, address or devnet:N); no passphrase"
    )
    build.add_argument("--key", help="the session key's address (or a key name), with --network")
    build.add_argument(
        "--network", action="append", default=[], metavar="FILE",
        help="a chain's network description (e.g. devnet.31337.network.json); once per chain",
    )  # fmt: skip
    build.add_argument(
        "--policy", action="append", default=[], metavar="FILE",
        help="a session-key policy (docs/policies.md): one for all chains, or one per --network in order",
    )  # fmt: skip
    build.add_argument(
        "--max-per-call", help="without --policy: the largest single payment ($0.01 or atomic)"
    )
    build.add_argument("--budget", help="without --policy: all payments together")
    build.add_argument(
        "--grant", action="append", default=[], metavar="FILE",
        help="an offline-signed grant or session-key file (`escrow grant --offline`, `session-key new "
        "--offline`): its grant and install become leaves, same terms; repeatable",
    )  # fmt: skip
    build.add_argument(
        "--valid-for", default="24h", help="without --policy: the grant's window (default 24h)"
    )
    build.add_argument("--payee", action="append", default=[], help="without --policy: allow only this payee")
    build.add_argument("--epoch", type=int, help="the grants' epoch on every chain (default: now)")
    build.add_argument(
        "--account",
        nargs="?",
        const="auto",
        metavar="ADDRESS",
        help="the owner's AgentAccount (default: the factory's); without --policy, it is also the payer",
    )
    build.add_argument("--out", required=True, metavar="FILE", help="write the unsigned approval here")
    build.add_argument("--devnet", metavar="FILE", help="a devnet state file, for devnet:N references")
    build.set_defaults(func=_build)

    show = actions.add_parser("show", help="every leaf in plain terms and the root; checks the file")
    show.add_argument("file", metavar="FILE")
    show.add_argument(
        "--network", action="append", default=[], metavar="FILE",
        help="take token symbols and decimals from these descriptions, not from the file",
    )  # fmt: skip
    show.add_argument(
        "--typed-data", action="store_true", help="print only the EIP-712 typed data to sign (checked first)"
    )
    show.set_defaults(func=_show)

    sign = actions.add_parser("sign", help="sign the root offline with the owner's key (no node)")
    sign.add_argument("file", metavar="FILE")
    who = sign.add_mutually_exclusive_group(required=True)
    who.add_argument("--key", "--owner", dest="owner_key", help="the owner's key (name or devnet:N)")
    who.add_argument(
        "--signature", metavar="HEX", help="the owner's signature of `show --typed-data`, made elsewhere"
    )
    sign.add_argument("--out", metavar="FILE", help="default: FILE with .signed.json")
    sign.add_argument("--devnet", metavar="FILE", help="a devnet state file, for devnet:N keys")
    sign.set_defaults(func=_sign)

    relay = actions.add_parser("relay", help="send one chain's leaves (already applied ones are skipped)")
    relay.add_argument("file", metavar="FILE")
    relay.add_argument(
        "--relayer", required=True, help="the key that pays the gas (name, address or devnet:N)"
    )
    add_chain_args(relay)
    relay.set_defaults(func=_relay)

    revoke = actions.add_parser("revoke", help="an UNSIGNED approval revoking everything FILE granted")
    revoke.add_argument("file", metavar="FILE")
    revoke.add_argument("--out", required=True, metavar="FILE", help="write the unsigned revoke here")
    revoke.add_argument("--chain", action="append", type=int, default=[], help="only on this chain id")
    revoke.add_argument("--relay-within", default="1h", help="how long the revokes may wait (default 1h)")
    revoke.set_defaults(func=_revoke)
    for sub in (build, show, sign, relay, revoke):
        add_keystore_args(sub)  # key names resolve the same way in every subcommand
        add_json(sub)
