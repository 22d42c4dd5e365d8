"""escrow.devnet: the local chain for development and tests.

`Devnet` runs anvil (or a py-evm node when anvil is absent) with EntryPoint v0.7 at its canonical address,
the contracts of `DEPLOYMENTS` and funded accounts, and describes it as a `DevnetState`. `Devnets` runs
several chains at once (`Devnets(2)`, or `Devnets(["base", "arbitrum"])`: chains that look like those real
networks, see `REAL_NETWORKS`). `start_detached` / `stop_detached` run them under a small supervisor process
that outlives its caller. Uses `escrow.chain` only.
"""

from ._daemon import devnet_running, start_detached, stop_detached
from ._devnet import (
    CREATE2_DEPLOYER,
    DEPLOYMENTS,
    ENTRYPOINT_ADDRESS,
    Deployment,
    Devnet,
    DevnetAccount,
    DevnetChain,
    DevnetState,
)
from ._devnets import Devnets
from ._networks import REAL_NETWORKS, ChainSpec, RealNetwork, parse_chains
from ._node import DevnetError

__all__ = [
    "CREATE2_DEPLOYER",
    "DEPLOYMENTS",
    "ENTRYPOINT_ADDRESS",
    "Deployment",
    "Devnet",
    "DevnetAccount",
    "DevnetChain",
    "DevnetError",
    "DevnetState",
    "Devnets",
    "REAL_NETWORKS",
    "ChainSpec",
    "RealNetwork",
    "parse_chains",
    "devnet_running",
    "start_detached",
    "stop_detached",
]
