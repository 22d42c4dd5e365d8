"""What a settler needs of the gateway's store: escrow/ does not import gateway/, so it names the part it
uses as Protocols that `gateway.PaymentStore` satisfies."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

__all__ = ["QueuedItem", "SettlementQueue"]


class QueuedItem(Protocol):
    """One leased settlement (`gateway.Settlement`)."""

    @property
    def key(self) -> str: ...
    @property
    def payload(self) -> bytes: ...
    @property
    def attempts(self) -> int: ...
    @property
    def created_at(self) -> float: ...
    @property
    def error(self) -> str | None: ...
    @property
    def lease_token(self) -> str | None: ...


class SettlementQueue(Protocol):
    """Lease due settlements of one kind, then record each outcome under the item's `lease_token`: an
    outcome is refused (False / left out of the returned keys) once the lease went to another settler."""

    async def lease(self, kind: str, *, limit: int, lease_seconds: float) -> Sequence[QueuedItem]: ...
    async def renew_lease(self, keys: list[str], *, lease: str, lease_seconds: float) -> list[str]: ...
    async def mark_settled(self, keys: list[str], *, tx_hash: str, lease: str | None = None) -> list[str]: ...
    async def mark_failed(
        self, key: str, *, error: str, retry_at: float | None, lease: str | None = None
    ) -> bool: ...
