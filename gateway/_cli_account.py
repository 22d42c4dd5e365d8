"""`agentpay account address|deploy|status` and `agentpay session-key new|revoke`.

An owner's `AgentAccount` is counterfactual: its address (from the factory, per owner) exists before the
account does, and anyone can deploy it (`--relayer` pays; the owner is in the CREATE2 salt, so the address
can only ever hold this owner's account).

`session-key new --policy FILE` makes a fresh key and writes two files: the agent's wallet file (what
`SessionKeyWallet.load` and `agentpay pay --wallet` read; it holds the key, mode 0600) and the owner-signed
authorisation (the escrow grant, and the account's session-key install when the policy has `[account]`),
which `agentpay relay` sends from any funded key. `--relayer KEY` sends it at once instead.
"""

from __future__ import annotations

import argparse
import secrets
from pathlib import Path
from typing import Any

from escrow import (
    AgentAccount,
    Chain,
    sign_grant_offline,
    sign_revoke_offline,
    sign_session_key_install_offline,
    sign_session_key_revoke_offline,
)
from escrow.accounts._userop import ENTRYPOINT_V07
from x402 import LocalSigner
from x402.client_escrow import SessionWalletFile

from ._cli_common import (
    CliError,
    account_of,
    add_chain_args,
    add_json,
    add_keystore_args,
    address_of,
    checked_address,
    emit,
    handler,
    human,
    load_signer,
    network_of,
    open_chain,
    progress,
    run,
    table,
    unix_now,
)
from ._cli_policy import load_policy
from ._cli_relay import Signed, send_or_write
from .cli import command

__all__: list[str] = []


async def _counterfactual(chain: Chain, owner: str) -> AgentAccount:
    if not chain.network.account_factory:
        raise CliError(f"{chain.network.network} has no account factory in its description")
    return await AgentAccount.counterfactual(
        chain.rpc,
        factory=chain.network.account_factory,
        owner=owner,
        entry_point=chain.network.entrypoint or ENTRYPOINT_V07,
    )


def _common(parser: argparse.ArgumentParser) -> None:
    add_chain_args(parser)
    add_keystore_args(parser)
    add_json(parser)


# -- account


@handler
def _address(args: argparse.Namespace) -> int:
    owner = address_of(args, args.owner)

    async def read() -> dict[str, Any]:
        async with open_chain(args) as chain:
            account = await _counterfactual(chain, owner)
            return {"owner": owner, "account": account.address, "deployed": await account.is_deployed()}

    emit(args, run(read()))
    return 0


@handler
def _deploy(args: argparse.Namespace) -> int:
    owner = address_of(args, args.owner)

    async def deploy() -> dict[str, Any]:
        async with open_chain(args, args.relayer) as chain:
            account = await _counterfactual(chain, owner)
            progress(f"deploying the account {account.address} of {owner} ...")
            receipt = await account.deploy(chain.relayer)
            tx = None if receipt is None else receipt.transaction_hash
            return {
                "owner": owner,
                "account": account.address,
                "deployed": True,
                "tx": tx or "already deployed",
            }

    emit(args, run(deploy()))
    return 0


@handler
def _status(args: argparse.Namespace) -> int:
    owner = address_of(args, args.owner)

    async def read() -> dict[str, Any]:
        async with open_chain(args) as chain:
            account = await _counterfactual(chain, owner)
            deployed = await account.is_deployed()
            keys = []
            for key in await account.session_keys() if deployed else []:
                state = await account.session_key(key)
                keys.append(
                    {
                        "key": key,
                        "uses": state.uses,
                        "max_uses": state.max_uses,
                        "valid_after": state.valid_after,
                        "valid_until": state.valid_until,
                        "gas_spent": state.gas_spent,
                        "gas_budget": state.gas_budget,
                    }
                )
            escrow = chain.escrow.address if chain.network.escrow else None
            return {
                "owner": owner,
                "account": account.address,
                "deployed": deployed,
                "eth": await chain.rpc.get_balance(account.address),
                "token": await chain.token.balance_of(account.address),
                "escrow_deposit": 0
                if escrow is None
                else await chain.escrow.deposit_of(account.address, chain.network.token),
                "session_keys": keys,
            }

    result = run(read())
    network = network_of(args)
    rows: list[tuple[str, Any]] = [
        ("account", result["account"]),
        ("owner", result["owner"]),
        ("deployed", "yes" if result["deployed"] else "no"),
        ("eth", f"{result['eth'] / 10**18:.6f} ETH"),
        ("token", human(result["token"], network)),
        ("escrow deposit", human(result["escrow_deposit"], network)),
    ]
    rows += table(
        ("SESSION KEY", "USES", "VALID UNTIL", "GAS SPENT/BUDGET (wei)"),
        (
            (
                k["key"],
                f"{k['uses']}/{k['max_uses'] or '-'}",
                k["valid_until"] or "-",
                f"{k['gas_spent']}/{k['gas_budget']}",
            )
            for k in result["session_keys"]
        ),
    )
    emit(args, result, rows)
    return 0


# -- session-key


def _refuse_overwrite(*paths: str) -> None:
    for path in paths:
        if Path(path).exists():
            raise CliError(f"{path} exists: refusing to overwrite it (a wallet file holds a key)")


@handler
def _session_new(args: argparse.Namespace) -> int:
    network = network_of(args)
    spec = load_policy(args.policy, network)
    if not network.escrow:
        raise CliError(f"{network.network} has no escrow in its description")
    _refuse_overwrite(args.wallet, *([args.offline] if args.offline else []))
    owner = load_signer(args, args.owner, "owner")
    account = spec.account
    if account is None and (spec.payer == "account" or spec.account_policy is not None):

        async def compute() -> str:
            async with open_chain(args) as chain:
                return await account_of(chain, owner.address)

        account = run(compute())
    private_key = secrets.token_bytes(32)
    session = LocalSigner(private_key)
    items: list[Signed] = []
    if spec.account_policy is not None and account is not None:
        items.append(
            sign_session_key_install_offline(
                owner,
                chain_id=network.chain_id,
                account=account,
                key=session.address,
                policy=spec.account_policy,
                deadline=unix_now() + spec.relay_within,
            )
        )
    g = spec.grant
    grant = sign_grant_offline(
        owner,
        chain_id=network.chain_id,
        escrow=network.escrow,
        signer=session.address,
        token=g.token,
        max_per_call=g.max_per_call,
        budget=g.budget,
        valid_after=g.valid_after,
        valid_until=g.valid_until,
        payees=g.payees,
        epoch=g.epoch,
        account=account if spec.payer == "account" else None,
    )
    items.append(grant)
    wallet = SessionWalletFile(network=network, session_key="0x" + private_key.hex(), grant=grant.grant)
    Path(args.wallet).parent.mkdir(parents=True, exist_ok=True)
    wallet.dump(args.wallet)
    result: dict[str, Any] = {
        "key": session.address,
        "payer": grant.grant.payer,
        "wallet": args.wallet,
        "max_per_call": g.max_per_call,
        "budget": g.budget,
        "valid_until": g.valid_until,
        "epoch": g.epoch,
        "account_policy": spec.account_policy is not None,
    }
    send_or_write(args, items, result)
    return 0


@handler
def _session_revoke(args: argparse.Namespace) -> int:
    network = network_of(args)
    if not network.escrow:
        raise CliError(f"{network.network} has no escrow in its description")
    owner = load_signer(args, args.owner, "owner")
    payer, floor = owner.address, 0
    if args.wallet:
        held = SessionWalletFile.load(args.wallet).grant
        key, payer, floor = held.signer, held.payer, held.epoch
    elif args.key:
        key = checked_address(args.key, "--key")
    else:
        raise CliError("which key: --key ADDRESS or --wallet FILE")
    if args.account is not None:
        payer = checked_address(args.account, "--account")
    account = None if payer.lower() == owner.address.lower() else payer
    epoch = args.epoch or max(unix_now(), floor)
    items: list[Signed] = [
        sign_revoke_offline(
            owner, chain_id=network.chain_id, escrow=network.escrow, signer=key, epoch=epoch, account=account
        )
    ]
    if args.uninstall:
        if account is None:
            raise CliError(
                "--uninstall removes the key from the owner's account: the payer is the owner itself"
            )
        items.append(
            sign_session_key_revoke_offline(
                owner, chain_id=network.chain_id, account=account, key=key, deadline=unix_now() + 3600
            )
        )
    result = {"key": key, "payer": payer, "epoch": epoch, "uninstall": args.uninstall}
    send_or_write(args, items, result)
    return 0


def _send(parser: argparse.ArgumentParser, offline_help: str) -> None:
    target = parser.add_mutually_exclusive_group(required=True)
    target.add_argument("--relayer", help="send now; this key pays the gas (name, address or devnet:N)")
    target.add_argument("--offline", metavar="FILE", help=offline_help)


@command(
    "account", help="the owner's smart account: its address, deploying it, its balances and session keys"
)
def _account(parser: argparse.ArgumentParser) -> None:
    actions = parser.add_subparsers(dest="action", required=True, metavar="{address,deploy,status}")
    owner_help = "the owner: a key (name or devnet:N) or an address; no passphrase needed"
    address = actions.add_parser("address", help="the owner's counterfactual account address")
    address.set_defaults(func=_address)
    deploy = actions.add_parser("deploy", help="deploy the owner's account (a relayer pays)")
    deploy.add_argument("--relayer", required=True, help="the key that pays the gas")
    deploy.set_defaults(func=_deploy)
    status = actions.add_parser("status", help="balances, escrow deposit and installed session keys")
    status.set_defaults(func=_status)
    for sub in (address, deploy, status):
        sub.add_argument("--owner", required=True, help=owner_help)
        _common(sub)


@command(
    "session-key",
    help="make a session key from a policy file (wallet + owner-signed authorisation), revoke it",
)
def _session_key(parser: argparse.ArgumentParser) -> None:
    actions = parser.add_subparsers(dest="action", required=True, metavar="{new,revoke}")
    new = actions.add_parser("new", help="a fresh key, its wallet file, and the owner's signed authorisation")
    new.add_argument("--policy", required=True, help="the policy file (TOML, see docs/policies.md)")
    new.add_argument("--owner", required=True, help="the owner's key (name, address or devnet:N)")
    new.add_argument("--wallet", required=True, metavar="FILE", help="write the agent's wallet file here")
    _send(new, "write the owner-signed authorisation here, for `agentpay relay`")
    new.set_defaults(func=_session_new)
    revoke = actions.add_parser("revoke", help="revoke a session key's escrow grant (and uninstall it)")
    revoke.add_argument("--owner", required=True, help="the owner's key")
    revoke.add_argument("--key", help="the session key's address")
    revoke.add_argument("--wallet", metavar="FILE", help="the key's wallet file (its key, payer and epoch)")
    revoke.add_argument("--account", metavar="ADDRESS", help="the payer is this account of the owner's")
    revoke.add_argument("--epoch", type=int, help="revoke through this epoch (default: now)")
    revoke.add_argument(
        "--uninstall", action="store_true", help="also remove the key from the owner's account"
    )
    _send(revoke, "write the signed revoke here, for `agentpay relay`")
    revoke.set_defaults(func=_session_revoke)
    for sub in (new, revoke):
        _common(sub)
