"""escrow.accounts: ERC-4337 smart accounts (`AgentAccount`) and what drives them.

Session-key policies and their typed data, signed install/revoke files, user operations (types, hashes,
signers, nonce lanes), the self-bundler and a bundler's JSON-RPC, and the paymaster. Uses `escrow.chain`
only.
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
from ._bundler_rpc import BundlerError, BundlerRpc, UserOpSubmitter
from ._channels import AccountChannelOpener, channel_session_calls, channel_session_policy
from ._paymaster import PaymasterMode, PaymasterRefused, PaymasterRpc, SponsorService
from ._self_bundler import Bundler, UserOpResult
from ._signers import NonceLanes, OwnerKey, SessionKey
from ._userop import Call, PackedUserOperation, PolicyViolation, UserOpRejected

__all__ = [
    "AccountChannelOpener",
    "UNLIMITED_GAS_BUDGET",
    "AgentAccount",
    "AgentAccountFactory",
    "ArgRule",
    "Bundler",
    "BundlerError",
    "BundlerRpc",
    "Call",
    "CallPermission",
    "NonceLanes",
    "OwnerKey",
    "PackedUserOperation",
    "PaymasterMode",
    "PaymasterRefused",
    "PaymasterRpc",
    "PolicyViolation",
    "SessionKey",
    "SessionPolicy",
    "SignedSessionKeyInstall",
    "SignedSessionKeyRevoke",
    "SponsorService",
    "UserOpRejected",
    "UserOpResult",
    "UserOpSubmitter",
    "channel_session_calls",
    "channel_session_policy",
    "sign_session_key_install_offline",
    "sign_session_key_revoke_offline",
]
