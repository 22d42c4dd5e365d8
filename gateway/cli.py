"""The `agentpay` command line (also `python -m gateway`).

Each top-level subcommand is one function decorated with `@command`, which receives its own argparse parser
to fill in and sets `func` (a `(args) -> exit status` handler) on it. Adding a subcommand is one decorated
function in this module, or in a module imported here.

Every failure the user can cause (bad flags, a missing or corrupt state file, a busy port, a devnet that
will not start) prints one `agentpay: error: ...` line on stderr and exits non-zero, never a traceback.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NoReturn

import msgspec

from escrow import (
    DevnetError,
    DevnetState,
    EscrowError,
    devnet_running,
    parse_chains,
    start_detached,
    stop_detached,
    write_devnet_networks,
)

from ._errors import GatewayError
from ._stores import open_store

__all__ = ["command", "main"]

Configure = Callable[[argparse.ArgumentParser], None]
_COMMANDS: dict[str, tuple[str, Configure]] = {}


def command(name: str, help: str) -> Callable[[Configure], Configure]:
    """Register a top-level subcommand: `configure(parser)` adds its arguments and sets `func`."""

    def register(configure: Configure) -> Configure:
        _COMMANDS[name] = (help, configure)
        return configure

    return register


class _Parser(argparse.ArgumentParser):
    """argparse prints its usage block on errors; one line with a pointer to --help reads better."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"agentpay: error: {message} (see `{self.prog} --help`)\n")


def _fail(message: str) -> int:
    print(f"agentpay: error: {message}", file=sys.stderr)
    return 1


# -- agentpay devnet


def _default_state() -> str:
    return os.environ.get("AGENTPAY_DEVNET_STATE", ".agentpay/devnet.json")


def _load_if_present(path: Path) -> DevnetState | None:
    return DevnetState.load(path) if path.exists() else None


def _devnet_up(args: argparse.Namespace) -> int:
    path = Path(args.state)
    old = _load_if_present(path)
    if old is not None and devnet_running(old):
        return _fail(
            f"a devnet is already running: {old.backend} at {old.rpc_url} (pid {old.pid}, state {path}); "
            f"stop it with `agentpay devnet down --state {path}`"
        )
    state = start_detached(
        log_path=path.with_suffix(".log"),
        backend=args.backend,
        port=args.port,
        accounts=args.accounts,
        bundler=args.bundler,
        chains=args.chains,
    )
    try:
        state = write_devnet_networks(state, path)
        state.dump(path)
    except OSError as exc:
        stop_detached(state)
        raise GatewayError(f"cannot write {path}: {exc.strerror}", code="cli_state_unwritable") from None
    sys.stdout.write(state.to_json().decode() + "\n")
    return 0


def _devnet_down(args: argparse.Namespace) -> int:
    path = Path(args.state)
    state = DevnetState.load(path)
    stopped = stop_detached(state)
    for chain in state.chains:
        if chain.network_file:
            Path(chain.network_file).unlink(missing_ok=True)
    path.unlink(missing_ok=True)
    where = (
        state.rpc_url
        if len(state.chains) == 1
        else ", ".join(f"{c.label} at {c.rpc_url}" for c in state.chains)
    )
    pids = ", ".join(str(c.pid) for c in state.chains)
    if stopped:
        print(f"stopped the {state.backend} devnet at {where} (pid {pids})")
    else:
        print(f"no devnet was running (pid {pids}); removed the stale {path}")
    return 0


def _devnet_status(args: argparse.Namespace) -> int:
    path = Path(args.state)
    state = DevnetState.load(path)
    if not devnet_running(state):
        pids = ", ".join(str(c.pid) for c in state.chains)
        return _fail(f"the devnet in {path} is not running (pid {pids})")
    sys.stdout.write(state.to_json().decode() + "\n")
    return 0


def _port(value: str) -> int:
    if not value.isdigit() or not 0 < int(value) < 65536:
        raise argparse.ArgumentTypeError(f"not a TCP port: {value!r}")
    return int(value)


def _chains(value: str) -> str:
    try:
        parse_chains(value)
    except DevnetError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return value


def _count(value: str) -> int:
    if not value.isdigit() or not 0 < int(value) <= 1000:
        raise argparse.ArgumentTypeError(f"not a number of accounts (1-1000): {value!r}")
    return int(value)


@command("devnet", help="run a local chain with EntryPoint v0.7, TestUSDC and funded accounts")
def _devnet(parser: argparse.ArgumentParser) -> None:
    actions = parser.add_subparsers(dest="action", required=True, metavar="{up,down,status}")
    state_help = "state file (default: $AGENTPAY_DEVNET_STATE or .agentpay/devnet.json)"
    up = actions.add_parser("up", help="start a devnet in the background and print its state as JSON")
    up.add_argument("--port", type=_port, help="RPC port on 127.0.0.1 (default: a free one)")
    up.add_argument("--backend", choices=["auto", "anvil", "pyevm"], help="default: anvil if installed")
    up.add_argument("--accounts", type=_count, default=10, help="funded test accounts (default: 10)")
    up.add_argument(
        "--bundler",
        action="store_true",
        help="also run the Alto ERC-4337 bundler (npm @pimlico/alto; anvil only); state gains bundler_url",
    )
    up.add_argument(
        "--chains",
        type=_chains,
        default="1",
        help="several chains: a count (2: chain ids 31337, 31338) or names and chain ids, comma-separated "
        "(base,arbitrum: look-alikes of those networks, with USDC at its address there; also base-sepolia, "
        "arbitrum-sepolia). Default: one chain, 31337",
    )
    up.set_defaults(func=_devnet_up)
    down = actions.add_parser("down", help="stop the devnet (every chain) and remove its state file")
    down.set_defaults(func=_devnet_down)
    status = actions.add_parser("status", help="print the running devnet's state; exit 1 if none runs")
    status.set_defaults(func=_devnet_status)
    for sub in (up, down, status):
        sub.add_argument("--state", default=_default_state(), help=state_help)


# -- agentpay settlements


def _limit(value: str) -> int:
    if not value.isdigit() or not 0 < int(value) <= 10_000:
        raise argparse.ArgumentTypeError(f"not a number of dead letters (1-10000): {value!r}")
    return int(value)


_WEEK = 7 * 86400.0


def _seconds(value: str) -> float:
    try:
        seconds = float(value)
    except ValueError:
        seconds = -1.0
    if not 0 <= seconds < float("inf"):
        raise argparse.ArgumentTypeError(f"not a number of seconds (>= 0): {value!r}")
    return seconds


async def _queue_report(args: argparse.Namespace) -> tuple[dict[str, Any], list[str]]:
    store = await open_store(args.store)
    purged = None
    try:
        requeued = {key: await store.requeue(key) for key in args.requeue}
        if args.purge:
            purged = await store.purge(retention=args.retention)
        stats = await store.stats()
        dead = await store.dead_letters(kind=args.kind, limit=args.limit)
    finally:
        await store.close()
    fields = ("key", "kind", "payer", "amount", "attempts", "error", "tx_hash", "created_at")
    report: dict[str, Any] = {
        "stats": msgspec.to_builtins(stats),
        "pending": stats.queued + stats.leased + stats.failed,
        "dead_letters": [{name: getattr(item, name) for name in fields} for item in dead],
    }
    if requeued:
        report["requeued"] = requeued
    if purged is not None:
        report["purged"] = {**msgspec.to_builtins(purged), "retention_seconds": args.retention}
    return report, [key for key, done in requeued.items() if not done]


def _settlements_run(args: argparse.Namespace) -> int:
    try:
        report, missing = asyncio.run(_queue_report(args))
    except GatewayError:
        raise
    except Exception as exc:  # a driver's own error (authentication, bad database name, ...)
        raise GatewayError(f"cannot read the store: {type(exc).__name__}: {exc}", code="cli_store") from None
    sys.stdout.write(json.dumps(report) + "\n")
    if "purged" in report:  # the human line goes to stderr: stdout stays one JSON document
        p = report["purged"]
        print(
            f"purged {p['claims']} claim(s), {p['receipts']} receipt(s) and {p['settlements']} settled"
            f" row(s) past {args.retention:g} s of retention and their payments' validity",
            file=sys.stderr,
        )
    if missing:
        return _fail(
            f"nothing to requeue under {', '.join(missing)} (only dead or retry-waiting items can be)"
        )
    return 0


@command("settlements", help="show a store's settlement queue (counts per state, dead letters) as JSON")
def _settlements(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--store",
        default=os.environ.get("AGENTPAY_STORE"),
        required="AGENTPAY_STORE" not in os.environ,
        help="store URL: sqlite:///payments.db, postgresql://host/db?schema=x (default: $AGENTPAY_STORE)",
    )
    parser.add_argument(
        "--requeue",
        action="append",
        default=[],
        metavar="KEY",
        help="put a dead (or retry-waiting) settlement back in the queue, due now; repeatable",
    )
    parser.add_argument("--kind", help="list only dead letters of this kind (exact, escrow, exact:now, ...)")
    parser.add_argument("--limit", type=_limit, default=100, help="most dead letters listed (default: 100)")
    parser.add_argument(
        "--purge",
        action="store_true",
        help="delete expired claims, and finalized claims, their receipts and settled rows that are past"
        ' --retention and their payment\'s validity; reports the counts under "purged"',
    )
    parser.add_argument(
        "--retention",
        type=_seconds,
        default=_WEEK,
        metavar="SECONDS",
        help=f"how long finalized claims and settled rows are kept at least (default: {_WEEK:g}, a week)",
    )
    parser.set_defaults(func=_settlements_run)


# -- agentpay mcp


def _mcp_run(args: argparse.Namespace) -> int:
    from x402 import X402Error

    from ._wallet_mcp import load_wallet_tools  # needs the `mcp` package: imported only here

    try:
        tools = load_wallet_tools(
            args.wallet, rpc_url=args.rpc, max_per_call=args.max_per_call, budget=args.budget
        )
    except X402Error as exc:  # a bad wallet file or amount: one error line, like every other failure
        raise GatewayError(exc.message, code=exc.code) from None
    tools.server().run("stdio")  # stdout is the protocol's: nothing else is printed
    return 0


@command(
    "mcp", help="serve a session-key wallet to MCP hosts over stdio (fetch_paid, list_offers, spend_status)"
)
def _mcp(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--wallet", required=True, help="session wallet file the owner wrote (keep it private)"
    )
    parser.add_argument("--rpc", help="node URL for the escrow deposit and grant (default: the wallet's)")
    parser.add_argument(
        "--max-per-call", help="a tighter per-call cap than the grant's ($0.01 or atomic units)"
    )
    parser.add_argument("--budget", help="a tighter total budget than the grant's ($1 or atomic units)")
    parser.set_defaults(func=_mcp_run)


# -- agentpay dashboard


def _listen_port(value: str) -> int:
    if not value.isdigit() or int(value) > 65535:
        raise argparse.ArgumentTypeError(f"not a TCP port (0-65535): {value!r}")
    return int(value)


def _dashboard_run(args: argparse.Namespace) -> int:
    import socket

    import uvicorn

    from ._dashboard import dashboard_app

    async def check() -> None:  # a store that cannot be opened is one error line now, not a failed startup
        store = await open_store(args.store)
        await store.close()

    asyncio.run(check())
    sock = socket.socket(socket.AF_INET6 if ":" in args.host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((args.host, args.port))
    except OSError as exc:
        sock.close()
        return _fail(f"cannot listen on {args.host}:{args.port}: {exc.strerror or exc}")
    sock.listen(128)
    port = sock.getsockname()[1]
    print(f"agentpay dashboard on http://{args.host}:{port}/", flush=True)
    app = dashboard_app(args.store, decimals=args.decimals, symbol=args.symbol)
    with sock:
        # The socket object itself, not its fd: uvicorn takes a bare fd for a UNIX socket, and on a TCP one
        # that leaves Nagle on, so every keep-alive response waited ~40 ms for the client's delayed ACK.
        uvicorn.Server(uvicorn.Config(app, log_level="warning")).run(sockets=[sock])
    return 0


@command("dashboard", help="serve a web dashboard of a store's payments, settlement queue and dead letters")
def _dashboard(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--store",
        default=os.environ.get("AGENTPAY_STORE"),
        required="AGENTPAY_STORE" not in os.environ,
        help="store URL: sqlite:///payments.db, postgresql://host/db?schema=x (default: $AGENTPAY_STORE)",
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1)")
    parser.add_argument(
        "--port", type=_listen_port, default=8403, help="port (default: 8403; 0 picks a free one)"
    )
    parser.add_argument("--decimals", type=int, default=6, help="token decimals for display (default: 6)")
    parser.add_argument("--symbol", default="USDC", help="token symbol for display (default: USDC)")
    parser.set_defaults(func=_dashboard_run)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="agentpay", description="agentpay: agent-to-agent payments over x402 and MPP")
    commands = parser.add_subparsers(dest="command", required=True, metavar="{" + ",".join(_COMMANDS) + "}")
    for name, (help_text, configure) in _COMMANDS.items():
        configure(commands.add_parser(name, help=help_text, description=help_text))
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        status: int = args.func(args)
    except (EscrowError, GatewayError) as exc:
        return _fail(str(exc))
    except OSError as exc:  # e.g. a state directory that cannot be created
        return _fail(f"{exc.filename or 'I/O error'}: {exc.strerror or exc}")
    except KeyboardInterrupt:
        return 130
    return status


from . import _cli_account, _cli_approval, _cli_escrow, _cli_keys, _cli_pay, _cli_relay  # noqa: E402,F401

if __name__ == "__main__":
    sys.exit(main())
