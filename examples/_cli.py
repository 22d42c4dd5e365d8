"""The command line the small example servers share: which devnet, where to listen, who gets paid."""

from __future__ import annotations

import argparse

from escrow import Chain


def devnet_server_args(doc: str | None, port: int, argv: list[str] | None) -> argparse.Namespace:
    """`--devnet FILE --host H --port P --payee N|0x.. --store URL`, parsed."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--devnet", required=True, help="devnet state file (agentpay devnet up writes one)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=port)
    parser.add_argument("--payee", default="2", help="devnet account index (or 0x address) that gets paid")
    parser.add_argument("--store", default=None, help="payment store URL (default: $AGENTPAY_STORE)")
    return parser.parse_args(argv)


def devnet_chain_and_payee(args: argparse.Namespace) -> tuple[Chain, str]:
    """The devnet's `Chain` and the payee's address (`--payee` as an account index or an address)."""
    chain = Chain.from_devnet(args.devnet)
    payee = str(args.payee)
    return chain, payee if payee.startswith("0x") else chain.accounts[int(payee)].address
