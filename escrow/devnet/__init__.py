"""escrow.devnet: the local chain for development and tests.

`Devnet` runs anvil (or a py-evm node when anvil is absent) with EntryPoint v0.7 at its canonical address,
the contracts of `DEPLOYMENTS` and funded accounts, and describes it as a `DevnetState`; `start_detached` /
`stop_detached` run one under a small supervisor process that outlives its caller. Uses `escrow.chain` only.
"""

from ._daemon import devnet_running, start_detached, stop_detached
from ._devnet import (
    CREATE2_DEPLOYER,
    DEPLOYMENTS,
    ENTRYPOINT_ADDRESS,
    Deployment,
    Devnet,
    DevnetAccount,
    DevnetState,
)
from ._node import DevnetError

__all__ = [
    "CREATE2_DEPLOYER",
    "DEPLOYMENTS",
    "ENTRYPOINT_ADDRESS",
    "Deployment",
    "Devnet",
    "DevnetAccount",
    "DevnetError",
    "DevnetState",
    "devnet_running",
    "start_detached",
    "stop_detached",
]
