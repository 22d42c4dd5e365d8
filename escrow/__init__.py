"""escrow: the chain side of agentpay.

Contract artifacts (`load_artifact`), and the devnet: `Devnet` runs a local chain (anvil, or a py-evm node
when anvil is absent) with EntryPoint v0.7 at its canonical address, TestUSDC and funded accounts, and
describes it as a `DevnetState`; `start_detached` / `stop_detached` run one that outlives its caller.
"""

from ._account import (
    AgentAccount,
    AgentAccountFactory,
    ArgRule,
    CallPermission,
    SessionPolicy,
    SignedSessionKeyInstall,
    SignedSessionKeyRevoke,
)
from ._account import sign_install_offline as sign_session_key_install_offline
from ._account import sign_revoke_offline as sign_session_key_revoke_offline
from ._artifacts import Artifact, ArtifactError, EscrowError, artifact_exists, load_artifact
from ._bundler_rpc import BundlerError, BundlerRpc, UserOpSubmitter
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
from ._escrow import AgentEscrow, Erc20, GrantInfo
from ._escrow_verify import EscrowClaim, EscrowRejected, EscrowVerifier, GrantCache
from ._exact import ExactEvm, ExactRejected
from ._grants import (
    SignedDeposit,
    SignedGrant,
    SignedRevoke,
    deposit,
    relay_deposit,
    relay_grant,
    relay_revoke,
    sign_deposit_authorization,
    sign_deposit_permit,
    sign_grant_offline,
    sign_revoke_offline,
)
from ._paymaster import PaymasterMode, PaymasterRefused, PaymasterRpc, SponsorService
from ._rpc import ChainError, Receipt, RevertError, Rpc, TransactionFailed, TxSender
from ._settler import EscrowSettler, SettleOutcome
from ._userop import (
    Bundler,
    NonceLanes,
    OwnerKey,
    PackedUserOperation,
    PolicyViolation,
    SessionKey,
    UserOpRejected,
    UserOpResult,
)

__all__ = [
    "CREATE2_DEPLOYER",
    "DEPLOYMENTS",
    "ENTRYPOINT_ADDRESS",
    "AgentAccount",
    "AgentAccountFactory",
    "AgentEscrow",
    "ArgRule",
    "Artifact",
    "artifact_exists",
    "ArtifactError",
    "Bundler",
    "BundlerError",
    "BundlerRpc",
    "CallPermission",
    "ChainError",
    "Deployment",
    "deposit",
    "Devnet",
    "devnet_running",
    "DevnetAccount",
    "DevnetError",
    "DevnetState",
    "Erc20",
    "EscrowClaim",
    "EscrowError",
    "EscrowRejected",
    "EscrowSettler",
    "EscrowVerifier",
    "ExactEvm",
    "ExactRejected",
    "GrantCache",
    "GrantInfo",
    "load_artifact",
    "NonceLanes",
    "OwnerKey",
    "PackedUserOperation",
    "PaymasterMode",
    "PaymasterRefused",
    "PaymasterRpc",
    "PolicyViolation",
    "Receipt",
    "relay_deposit",
    "relay_grant",
    "relay_revoke",
    "RevertError",
    "Rpc",
    "SessionKey",
    "SessionPolicy",
    "SettleOutcome",
    "sign_deposit_authorization",
    "sign_deposit_permit",
    "sign_grant_offline",
    "sign_revoke_offline",
    "sign_session_key_install_offline",
    "sign_session_key_revoke_offline",
    "SignedDeposit",
    "SignedGrant",
    "SignedRevoke",
    "SignedSessionKeyInstall",
    "SignedSessionKeyRevoke",
    "SponsorService",
    "start_detached",
    "stop_detached",
    "TransactionFailed",
    "TxSender",
    "UserOpRejected",
    "UserOpResult",
    "UserOpSubmitter",
]
