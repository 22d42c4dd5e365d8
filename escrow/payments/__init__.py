"""escrow.payments: what moves money.

`exact` (EIP-3009 `transferWithAuthorization`: `ExactEvm`, `ExactSettler`) and `escrow` (`AgentEscrow`
bindings, `EscrowVerifier`, `EscrowSettler`), AgentChannels channels (`AgentChannelsChain`,
`ChannelSettler`), grants and deposits signed offline and relayed, MPP session channels opened and
topped up by a relayer (`openWithAuthorization`), exposure
arithmetic, and the one settlement engine (`SettlementEngine`: lease, batch, backoff, dead letters) with a
small part per scheme (`SchemeSettlement`) over the queue protocol a store satisfies.
Uses `escrow.chain` and `escrow.accounts`.
"""

from ._channel_auth import (
    AuthorizationChannelOpener,
    PresignedChannelOpener,
    SignedChannelOpen,
    SignedChannelTopUp,
    relay_channel_open,
    relay_channel_top_up,
    sign_channel_open,
    sign_channel_top_up,
)
from ._channel_settler import ChannelSettler, ChannelVoucher
from ._channels import AgentChannelsChain, ChannelChain, ChannelInfo
from ._engine import EngineOptions, SchemeSettlement, SettlementEngine
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
from ._settler import EscrowSettler, SettleOutcome

__all__ = [
    "AgentChannelsChain",
    "AgentEscrow",
    "AuthorizationChannelOpener",
    "PresignedChannelOpener",
    "ChannelChain",
    "ChannelInfo",
    "ChannelSettler",
    "ChannelVoucher",
    "EngineOptions",
    "Erc20",
    "EscrowClaim",
    "EscrowRejected",
    "EscrowSettler",
    "EscrowVerifier",
    "ExactEvm",
    "ExactRejected",
    "ExactSettler",
    "GrantCache",
    "GrantInfo",
    "SchemeSettlement",
    "SettleOutcome",
    "SettlementEngine",
    "SignedChannelOpen",
    "SignedChannelTopUp",
    "SignedDeposit",
    "SignedGrant",
    "SignedRevoke",
    "deposit",
    "relay_channel_open",
    "relay_channel_top_up",
    "relay_deposit",
    "relay_grant",
    "relay_revoke",
    "sign_channel_open",
    "sign_channel_top_up",
    "sign_deposit_authorization",
    "sign_deposit_permit",
    "sign_grant_offline",
    "sign_revoke_offline",
]
