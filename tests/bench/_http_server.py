"""Our half of `python -m tests.bench.http`: the example sub-agent under uvicorn (uvloop + httptools).

    python -m tests.bench._http_server --devnet FILE --store URL --settle stub|chain --fd N

`examples.subagent.build_app` with its routes and prices, paid to devnet account 2. `--settle chain` settles
every payment on the devnet before its response (relayer: devnet account 3), as the sub-agent does by
default; `--settle stub` swaps in the throughput benchmark's `StubChain` (the EIP-3009 signature recovered
and checked, nothing sent) into its `exact` scheme, like the official side's verifying stub facilitator.
"""

from __future__ import annotations

import argparse
import socket

import uvicorn

from escrow import Chain
from examples.subagent import build_app
from gateway import ExactScheme

from .throughput import StubChain


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--devnet", required=True)
    parser.add_argument("--store", required=True)
    parser.add_argument("--settle", choices=["stub", "chain"], default="stub")
    parser.add_argument("--fd", type=int, required=True)
    args = parser.parse_args()
    chain = Chain.from_devnet(args.devnet, relayer=3)
    app = build_app(chain, pay_to=chain.accounts[2].address, store=args.store)
    if args.settle == "stub":  # the same app, its `exact` scheme checking signatures against no chain
        exact = app.paywall.schemes["exact"]
        assert isinstance(exact, ExactScheme)
        exact.chain = StubChain()
    config = uvicorn.Config(app, loop="uvloop", http="httptools", log_level="warning", access_log=False)
    uvicorn.Server(config).run(sockets=[socket.socket(fileno=args.fd)])


if __name__ == "__main__":
    main()
