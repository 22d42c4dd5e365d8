"""escrow: the chain side of agentpay.

Contract artifacts (`load_artifact`), and the devnet: `Devnet` runs a local chain (anvil, or a py-evm node
when anvil is absent) with EntryPoint v0.7 at its canonical address, TestUSDC and funded accounts, and
describes it as a `DevnetState`; `start_detached` / `stop_detached` run one that outlives its caller.
"""

from ._artifacts import Artifact, ArtifactError, EscrowError, artifact_exists, load_artifact
from ._devnet import (
    CREATE2_DEPLOYER,
    DEPLOYMENTS,
    ENTRYPOINT_ADDRESS,
    Deployment,
    Devnet,
    DevnetAccount,
    DevnetState,
)
from ._devnet_daemon import devnet_running, start_detached, stop_detached
from ._devnet_node import DevnetError

__all__ = [
    "CREATE2_DEPLOYER",
    "DEPLOYMENTS",
    "ENTRYPOINT_ADDRESS",
    "Artifact",
    "ArtifactError",
    "Deployment",
    "Devnet",
    "DevnetAccount",
    "DevnetError",
    "DevnetState",
    "EscrowError",
    "artifact_exists",
    "devnet_running",
    "load_artifact",
    "start_detached",
    "stop_detached",
]
