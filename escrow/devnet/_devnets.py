"""`Devnets`: several devnet chains at once, one node each, described by one `DevnetState`.

    with Devnets(["base", "arbitrum"]) as state:      # or Devnets(2): chain ids 31337 and 31338
        for chain in state.chains:
            print(chain.label, chain.chain_id, chain.rpc_url, chain.contracts["usdc"])

Every chain gets the same deployment table from the same deployer, so the contracts other than a
look-alike's token sit at the same addresses on each. The state's top-level fields describe the first chain,
so code written for one chain keeps working on the first.
"""

from __future__ import annotations

from collections.abc import Sequence
from types import TracebackType
from typing import IO

import msgspec

from ._bundler import BundlerProcess
from ._devnet import Devnet, DevnetState
from ._networks import ChainSpec, parse_chains
from ._node import DevnetError, NodeProcess

__all__ = ["Devnets"]


class Devnets:
    """Start one node per chain, deploy on each, and describe them all; `stop()` ends every node.

    `chains` is a count (`2`: chain ids 31337, 31338, ...), a comma-separated string or a sequence of real
    network names and chain ids (`"base,arbitrum"`, `["base-sepolia", 31337]`); see `parse_chains`. With
    `port`, chain i listens on `port + i`. The bundler, if asked for, serves the first chain only.
    """

    def __init__(
        self,
        chains: int | str | Sequence[str | int] = 2,
        *,
        backend: str | None = None,
        port: int | None = None,
        accounts: int = 10,
        usdc_each: int = 1_000_000,
        log: IO[bytes] | None = None,
        bundler: bool = False,
    ) -> None:
        self.specs: tuple[ChainSpec, ...] = parse_chains(chains)
        self._devnets = [
            Devnet(
                chain=spec,
                backend=backend,
                port=None if port is None else port + i,
                accounts=accounts,
                usdc_each=usdc_each,
                log=log,
                bundler=bundler and i == 0,
            )
            for i, spec in enumerate(self.specs)
        ]
        self._state: DevnetState | None = None

    @property
    def state(self) -> DevnetState:
        if self._state is None:
            raise DevnetError("the devnet is not running", code="devnet_not_running")
        return self._state

    @property
    def nodes(self) -> list[NodeProcess]:
        return [d.node for d in self._devnets if d.node is not None]

    @property
    def bundler(self) -> BundlerProcess | None:
        return self._devnets[0].bundler

    def start(self) -> DevnetState:
        if self._state is not None:
            return self._state
        try:
            states = [devnet.start() for devnet in self._devnets]
        except BaseException:
            self.stop()
            raise
        first = states[0]
        self._state = msgspec.structs.replace(first, chains=tuple(s.chains[0] for s in states))
        return self._state

    def stop(self) -> None:
        for devnet in reversed(self._devnets):
            devnet.stop()
        self._state = None

    def __enter__(self) -> DevnetState:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()
