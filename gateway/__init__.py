"""gateway: the server side of agentpay.

`PaymentMiddleware` puts a paywall (x402 v1/v2 and MPP at once) in front of an ASGI app; schemes such as
`ExactScheme` (EIP-3009) plug in through the `Scheme` protocol; shared state lives behind `PaymentStore`.
With `chain=` (an `escrow.Chain`) the middleware builds the schemes itself and runs their settlers and
recovery in its lifespan, tuned by `SettlementOptions`.
"""

from ._answers import Answer, Challenger, v1_network
from ._chain_payments import SettlementOptions
from ._dashboard import dashboard_app
from ._discovery import Discovery
from ._errors import ConfigurationError, GatewayError, InvalidTransition, PaymentFailed
from ._exact import ExactChain, ExactScheme
from ._facilitator import facilitator_app
from ._metrics import Metrics, payment_id
from ._middleware import PaymentMiddleware
from ._pipeline import Attempt, Paywall, SettleMode
from ._pricing import Amount, Asset, PaidRoute, Price, PriceFunction, Quote, RouteTable, to_atomic
from ._scheme import Dialect, MppOffer, Offer, Presented, Scheme, Verified
from ._state import TERMINAL, TRANSITIONS, Event, PaymentState, Tracker
from ._store import (
    ClaimLost,
    PaymentStore,
    Purged,
    QueueStats,
    Settlement,
    SettlementState,
    StoreConfigError,
    StoreError,
    StoreSchemaError,
    StoreUnavailable,
    backoff,
)
from ._stores import open_store
from ._stores.memory import MemoryStore

__all__ = [
    "TERMINAL",
    "TRANSITIONS",
    "Amount",
    "Answer",
    "Asset",
    "Attempt",
    "Challenger",
    "ClaimLost",
    "ConfigurationError",
    "Dialect",
    "Discovery",
    "Event",
    "ExactChain",
    "ExactScheme",
    "GatewayError",
    "InvalidTransition",
    "MemoryStore",
    "Metrics",
    "MppOffer",
    "Offer",
    "PaidRoute",
    "PaymentFailed",
    "PaymentMiddleware",
    "PaymentState",
    "PaymentStore",
    "Paywall",
    "Presented",
    "Price",
    "PriceFunction",
    "Purged",
    "QueueStats",
    "Quote",
    "RouteTable",
    "Scheme",
    "Settlement",
    "SettleMode",
    "SettlementOptions",
    "SettlementState",
    "StoreConfigError",
    "StoreError",
    "StoreSchemaError",
    "StoreUnavailable",
    "Tracker",
    "Verified",
    "backoff",
    "dashboard_app",
    "facilitator_app",
    "open_store",
    "payment_id",
    "to_atomic",
    "v1_network",
]
