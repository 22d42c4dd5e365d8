"""escrow.chain: the chain client every other room builds on.

`Rpc` (async, batched JSON-RPC), `TxSender` (nonces, fee bumping of stuck transactions), the compiled
contract artifacts and their ABIs (`load_artifact`, `ContractAbi`), and the package's error root
`EscrowError`; `KeepAliveTransport`, the lean httpx transport payers use for many small calls. Imports
nothing from `escrow.devnet`, `escrow.accounts` or `escrow.payments`.
"""

from ._abi import ContractAbi, EscrowEvent
from ._artifacts import Artifact, ArtifactError, EscrowError, artifact_exists, load_artifact
from ._rpc import ChainError, Receipt, RevertError, Rpc, TransactionFailed, TxSender
from ._transport import KeepAliveTransport

__all__ = [
    "Artifact",
    "ArtifactError",
    "ChainError",
    "ContractAbi",
    "EscrowError",
    "EscrowEvent",
    "KeepAliveTransport",
    "Receipt",
    "RevertError",
    "Rpc",
    "TransactionFailed",
    "TxSender",
    "artifact_exists",
    "load_artifact",
]
