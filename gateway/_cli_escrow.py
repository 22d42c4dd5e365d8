"""`agentpay escrow deposit|withdraw|grant|revoke|status`: the owner's side of the escrow, from a shell.

Every command that changes something either sends it (`--relayer KEY` pays the gas; the owner only signs)
or writes an offline-signed file (`--offline FILE`) for `agentpay relay` on another machine. `--account`
makes the payer the owner's `AgentAccount` instead of the owner's own address (the owner then signs through
ERC-1271). Epochs default to the signing time in seconds, the counter `docs/schemes/escrow.md` recommends:
a revoke signed now covers every grant signed before it, with no chain state needed to sign either.
"""

from __future__ import annotations

import argparse
from decimal import Decimal
from typing import Any

from eth_account import Account

from escrow import sign_deposit_authorization, sign_grant_offline, sign_revoke_offline
from escrow.chain._abi import ContractAbi
from escrow.payments._escrow import escrow_artifact
from x402 import Network

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
    load_private_key,
    load_signer,
    network_of,
    open_chain,
    parse_duration,
    progress,
    run,
    table,
    unix_now,
)
from ._cli_relay import SignedTransaction, relay_one, send_or_write, write_signed
from .cli import command

__all__: list[str] = []


def _account_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--account",
        nargs="?",
        const="auto",
        metavar="ADDRESS",
        help="the payer is the owner's AgentAccount (its address; computed from the chain if omitted)",
    )


async def _payer(args: argparse.Namespace, owner: str) -> str | None:
    """The smart account paying for `owner` when `--account` is given (None: the owner pays itself)."""
    if args.account is None:
        return None
    if args.account != "auto":
        return checked_address(args.account, "--account")
    async with open_chain(args) as chain:
        return await account_of(chain, owner)


def _send_args(parser: argparse.ArgumentParser, *, relayed: bool = True) -> None:
    target = parser.add_mutually_exclusive_group(required=relayed)
    if relayed:
        target.add_argument("--relayer", help="send now; this key pays the gas (name, address or devnet:N)")
    target.add_argument(
        "--offline", metavar="FILE", help="write the signed file for `agentpay relay` instead"
    )


def _common(parser: argparse.ArgumentParser) -> None:
    add_chain_args(parser)
    add_keystore_args(parser)
    add_json(parser)


# -- deposit


@handler
def _deposit(args: argparse.Namespace) -> int:
    network = network_of(args)
    owner = load_signer(args, args.owner, "owner")
    account = run(_payer(args, owner.address))
    amount = network.atomic(args.amount)
    if amount <= 0:
        raise CliError("the deposit amount must be positive")
    signed = sign_deposit_authorization(
        owner,
        network.token_domain,
        escrow=_escrow_address(network),
        amount=amount,
        valid_before=unix_now() + parse_duration(args.valid_for, "--valid-for"),
        account=account,
    )
    result = {"payer": signed.payer, "token": signed.token, "amount": amount}
    send_or_write(args, [signed], result)
    return 0


def _escrow_address(network: Network) -> str:
    if not network.escrow:
        raise CliError(f"{network.network} has no escrow in its description")
    return network.escrow


# -- grant / revoke


@handler
def _grant(args: argparse.Namespace) -> int:
    network = network_of(args)
    owner = load_signer(args, args.owner, "owner")
    account = run(_payer(args, owner.address))
    now = unix_now()
    signed = sign_grant_offline(
        owner,
        chain_id=network.chain_id,
        escrow=_escrow_address(network),
        signer=checked_address(args.key, "--key"),
        token=checked_address(args.token, "--token") if args.token else network.token,
        max_per_call=network.atomic(args.max_per_call),
        budget=network.atomic(args.budget),
        valid_after=now - 60,  # a minute of slack for block time and skewed clocks
        valid_until=now + parse_duration(args.valid_for, "--valid-for"),
        payees=[checked_address(p, "--payee") for p in args.payee],
        epoch=args.epoch or now,
        account=account,
    )
    g = signed.grant
    result = {
        "payer": g.payer,
        "signer": g.signer,
        "max_per_call": g.max_per_call,
        "budget": g.budget,
        "valid_until": g.valid_until,
        "epoch": g.epoch,
    }
    send_or_write(args, [signed], result)
    return 0


@handler
def _revoke(args: argparse.Namespace) -> int:
    network = network_of(args)
    owner = load_signer(args, args.owner, "owner")
    account = run(_payer(args, owner.address))
    signed = sign_revoke_offline(
        owner,
        chain_id=network.chain_id,
        escrow=_escrow_address(network),
        signer=checked_address(args.key, "--key"),
        epoch=args.epoch or unix_now(),
        account=account,
    )
    result = {"payer": signed.payer, "signer": signed.signer, "epoch": signed.epoch}
    send_or_write(args, [signed], result)
    return 0


# -- withdraw (the payer itself must call: an owner-signed transaction)


@handler
def _withdraw(args: argparse.Namespace) -> int:
    if args.account is not None:
        raise CliError("withdrawing a smart account's deposit takes a user operation; not supported here yet")
    if args.amount is None and not (args.cancel or args.complete):
        raise CliError("say what to withdraw: --amount AMOUNT, --complete or --cancel")
    network = network_of(args)
    escrow = _escrow_address(network)
    private_key = load_private_key(args, args.owner, "owner")
    abi = ContractAbi(escrow_artifact().abi)  # encoding needs no node
    if args.complete:
        data, what = abi.encode("withdraw", network.token), "withdraw the requested amount"
    else:
        amount = 0 if args.cancel else network.atomic(args.amount)
        data = abi.encode("requestWithdrawal", network.token, amount)
        what = f"request a withdrawal of {amount}" if amount else "cancel the withdrawal request"
    sender = Account.from_key(private_key)

    async def build() -> SignedTransaction:
        if args.nonce is not None and args.max_fee_gwei is not None:
            nonce, max_fee = args.nonce, int(Decimal(args.max_fee_gwei) * 10**9)
        else:
            async with open_chain(args) as chain:
                nonce = await chain.rpc.get_transaction_count(sender.address, "pending")
                max_fee = 2 * await chain.rpc.gas_price() + 10**9
        tx = {
            "type": 2,
            "chainId": network.chain_id,
            "nonce": nonce,
            "to": escrow,
            "value": 0,
            "data": data,
            "gas": 150_000,
            "maxFeePerGas": max_fee,
            "maxPriorityFeePerGas": min(10**9, max_fee),
        }
        raw = "0x" + bytes(sender.sign_transaction(tx).raw_transaction).hex()
        return SignedTransaction(
            chain_id=network.chain_id, sender=sender.address, to=escrow, description=what, raw=raw
        )

    signed = run(build())
    result: dict[str, Any] = {"payer": sender.address, "action": what}
    if args.offline:
        write_signed(args.offline, [signed])
        result["offline"] = args.offline
        emit(args, result)
        return 0

    async def send() -> str:
        async with open_chain(args) as chain:
            progress(f"sending: {what} ...")
            return await relay_one(chain, signed)

    result["txs"] = [run(send())]
    emit(args, result, [("payer", sender.address), ("action", what), ("tx", result["txs"][0])])
    return 0


# -- status


@handler
def _status(args: argparse.Namespace) -> int:
    from x402.client_escrow import SessionWalletFile

    signers = [checked_address(k, "--key") for k in args.key]
    payer_ref = args.payer
    if args.wallet:
        wallet = SessionWalletFile.load(args.wallet)
        payer_ref = payer_ref or wallet.grant.payer
        signers.append(wallet.grant.signer)
    if not payer_ref:
        raise CliError("whose escrow: --payer KEY|ADDRESS, or --wallet FILE")
    owner = address_of(args, payer_ref)

    async def read() -> dict[str, Any]:
        async with open_chain(args) as chain:
            payer = owner if args.account is None else await _payer(args, owner) or owner
            escrow, token = chain.escrow, chain.network.token
            deposit = await escrow.deposit_of(payer, token)
            withdrawal, ready_at = await escrow.withdrawal_of(payer, token)
            keys = list(dict.fromkeys(signers))
            if not keys:  # every key this payer ever granted, from its GrantIssued events
                events = await escrow.logs(
                    ["GrantIssued"], from_block=0, topics=["0x" + "00" * 12 + payer[2:].lower()]
                )
                keys = list(dict.fromkeys(str(e.args["signer"]) for e in events))
            grants = []
            for key in keys:
                g = await escrow.grant_of(payer, key)
                grants.append(
                    {
                        "signer": checked_address(key),
                        "live": g.live,
                        "epoch": g.epoch,
                        "max_per_call": g.max_per_call,
                        "budget": g.budget,
                        "spent": g.spent,
                        "remaining": g.remaining if g.live else 0,
                        "valid_after": g.valid_after,
                        "valid_until": g.valid_until,
                    }
                )
            return {
                "network": chain.network.network,
                "escrow": escrow.address,
                "payer": payer,
                "token": token,
                "deposit": deposit,
                "withdrawal": {"amount": withdrawal, "ready_at": ready_at},
                "grants": grants,
            }

    result = run(read())
    network = network_of(args)
    rows: list[tuple[str, Any]] = [
        ("payer", result["payer"]),
        ("deposit", human(result["deposit"], network)),
        (
            "withdrawal",
            human(result["withdrawal"]["amount"], network) if result["withdrawal"]["amount"] else "none",
        ),
    ]
    rows += table(
        ("SIGNER", "STATE", "PER CALL", "SPENT", "BUDGET", "EPOCH"),
        (
            (
                g["signer"],
                "live" if g["live"] else "revoked",
                human(g["max_per_call"], network),
                human(g["spent"], network),
                human(g["budget"], network),
                g["epoch"],
            )
            for g in result["grants"]
        ),
    )
    emit(args, result, rows)
    return 0


@command("escrow", help="deposit, withdraw, grant and revoke session keys on the escrow; show what was spent")
def _escrow(parser: argparse.ArgumentParser) -> None:
    actions = parser.add_subparsers(
        dest="action", required=True, metavar="{deposit,withdraw,grant,revoke,status}"
    )
    owner_help = "the owner's key (name, address or devnet:N): whose deposit"

    deposit = actions.add_parser(
        "deposit", help="move tokens into the escrow (an EIP-3009 authorisation, relayed)"
    )
    deposit.add_argument("--owner", required=True, help=owner_help)
    deposit.add_argument("--amount", required=True, help="atomic units, or like $5")
    deposit.add_argument(
        "--valid-for", default="1h", help="how long the signed deposit may wait (default 1h)"
    )
    _account_flag(deposit)
    _send_args(deposit)
    deposit.set_defaults(func=_deposit)

    withdraw = actions.add_parser(
        "withdraw", help="request a withdrawal (--amount), cancel it, or complete it"
    )
    withdraw.add_argument(
        "--owner", required=True, help=owner_help + "; it sends (and pays for) the transaction"
    )
    what = withdraw.add_mutually_exclusive_group()
    what.add_argument("--amount", help="request this much (the escrow's withdrawal delay starts)")
    what.add_argument("--cancel", action="store_true", help="cancel the pending request")
    what.add_argument(
        "--complete", action="store_true", help="withdraw what was requested, once the delay is over"
    )
    withdraw.add_argument("--nonce", type=int, help="with --offline and no node: the owner's next nonce")
    withdraw.add_argument("--max-fee-gwei", help="with --offline and no node: the fee cap")
    _account_flag(withdraw)
    _send_args(withdraw, relayed=False)
    withdraw.set_defaults(func=_withdraw)

    grant = actions.add_parser("grant", help="grant a session key: per-call cap, budget, window, payees")
    grant.add_argument("--owner", required=True, help=owner_help)
    grant.add_argument("--key", required=True, help="the session key's address")
    grant.add_argument(
        "--max-per-call", required=True, help="the largest single payment (atomic, or like $0.01)"
    )
    grant.add_argument("--budget", required=True, help="all payments together")
    grant.add_argument("--valid-for", default="24h", help="the grant's window from now (default 24h)")
    grant.add_argument("--payee", action="append", default=[], help="allow only this payee; repeatable")
    grant.add_argument("--token", help="default: the network's token")
    grant.add_argument("--epoch", type=int, help="the grant's version (default: now, in seconds)")
    _account_flag(grant)
    _send_args(grant)
    grant.set_defaults(func=_grant)

    revoke = actions.add_parser("revoke", help="revoke a session key through an epoch (default: now)")
    revoke.add_argument("--owner", required=True, help=owner_help)
    revoke.add_argument("--key", required=True, help="the session key's address")
    revoke.add_argument("--epoch", type=int, help="revoke every grant numbered up to this (default: now)")
    _account_flag(revoke)
    _send_args(revoke)
    revoke.set_defaults(func=_revoke)

    status = actions.add_parser("status", help="a payer's deposit, withdrawal and grants (budget, spent)")
    status.add_argument("--payer", help="whose escrow: a key or an address")
    status.add_argument("--wallet", help="a session wallet file: its payer and key")
    status.add_argument(
        "--key",
        action="append",
        default=[],
        help="show this session key; repeatable (default: every key the payer granted, from its events)",
    )
    _account_flag(status)
    status.set_defaults(func=_status)

    for sub in (deposit, withdraw, grant, revoke, status):
        _common(sub)
