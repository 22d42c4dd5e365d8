"""escrow: the chain side of agentpay.

Contract artifacts (`load_artifact`), and the devnet: `Devnet` runs a local chain (anvil, or a py-evm node
when anvil is absent) with EntryPoint v0.7 at its canonical address, TestUSDC and funded accounts, and
describes it as a `DevnetState`; `start_detached` / `stop_detached` run one that outlives its caller.

`Chain` is the front door: a network description (`x402.Network`, from a file or a devnet), its node client
and relayer; the gateway takes its schemes, settlers and recovery from it, an owner opens session keys.
"""

from ._account import (
    UNLIMITED_GAS_BUDGET,
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
from ._chain import Chain, ChainConfigError, load_network, network_of_devnet
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
from ._exact_settler import ExactSettler
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
    Call,
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
    "Call",
    "CallPermission",
    "Chain",
    "ChainConfigError",
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
    "ExactSettler",
    "GrantCache",
    "GrantInfo",
    "load_artifact",
    "load_network",
    "network_of_devnet",
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
    "UNLIMITED_GAS_BUDGET",
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
