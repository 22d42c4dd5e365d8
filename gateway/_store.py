"""The one interface behind which the gateway keeps every piece of shared state.

Replay claims, receipts, the settlement queue, pending spend and channel high-water marks (with their latest
vouchers) all live behind `PaymentStore`, so one gateway process (SQLite), many replicas (PostgreSQL,
optionally with a Redis claim cache in front) and unit tests (memory) run the same pipeline. Every method is
atomic on its own; `complete`, `complete_settled` and `sub_pending_once` are multi-step operations, each
atomic as a whole, so a served payment can never be finalized without its settlement being queued (or
recorded settled), nor a reservation given back twice. Backends (`gateway/_stores`, `MemoryStore` among
them) are picked by URL with `gateway._stores.open_store`; this module imports none of them.

Claims and leases are bound to their holder: `claim` and `lease` hand out a fresh random token, and only
that token may `renew`/`release`/`complete` the claim (else `ClaimLost`) or record a leased settlement's
outcome, so a request that outlived its claim, or a settler that outlived its lease, cannot finish what a
newer holder now owns. `purge` keeps the store from growing forever: it drops settled rows and finalized
claims once both their retention and the payment's own validity (`keep_until` / `Settlement.expires_at`)
have passed, never earlier: a finalized claim forgotten while its authorization is still valid would make
that payment replayable.

Times are Unix seconds from the caller's clock (`time.time()`); replicas need clocks in sync to well
under a claim's TTL. Amounts are non-negative integers of any size (uint256 fits).
"""

from __future__ import annotations

import random
import secrets
from collections.abc import Sequence
from typing import Literal, Protocol

import msgspec

from gateway._errors import GatewayError

__all__ = [
    "ClaimLost",
    "PaymentStore",
    "Purged",
    "QueueStats",
    "Settlement",
    "SettlementState",
    "StoreConfigError",
    "StoreError",
    "StoreSchemaError",
    "StoreUnavailable",
    "backoff",
    "new_token",
]

SettlementState = Literal["queued", "leased", "settled", "failed", "dead"]


class StoreError(GatewayError):
    """Root of the store's errors (a `GatewayError`: stable `code`, HTTP `status_hint`)."""

    default_code = "store_error"


class StoreConfigError(StoreError):
    """A store URL or option that cannot be used (unknown scheme, bad schema name, ...)."""

    default_code = "store_config_invalid"


class StoreUnavailable(StoreError):
    """The backing database or cache cannot be reached or is locked; retrying later may succeed."""

    default_code = "store_unavailable"
    default_status = 503


class StoreSchemaError(StoreError):
    """The database carries migrations newer than this code knows: refuse rather than corrupt it."""

    default_code = "store_schema_too_new"


class ClaimLost(StoreError):
    """The caller no longer holds the claim it names: it expired (and may now be someone else's), was
    released, or was finalized. Nothing was written; the payment must not be served by this caller."""

    default_code = "claim_lost"
    default_status = 409


def new_token() -> str:
    """A fresh holder token for a claim or a lease (unguessable, so no other caller can forge it)."""
    return secrets.token_hex(16)


class Settlement(msgspec.Struct, frozen=True, kw_only=True):
    """One served payment waiting to reach the chain.

    `key` is the replay key of the payment (unique); `kind` names the settler that handles it (`exact`,
    `escrow`, ...); `payload` is the settler's own encoding of the signed payment; `expires_at` the end of
    the payment's validity (None: unknown, then the row is never purged). `attempts` counts leases handed
    out; `retry_at` / `lease_until` / `lease_token` (whose lease it is) / `settled_at` are set by the queue.
    """

    key: str
    kind: str
    payload: bytes
    payer: str
    amount: int
    created_at: float
    attempts: int = 0
    state: SettlementState = "queued"
    tx_hash: str | None = None
    error: str | None = None
    retry_at: float | None = None
    lease_until: float | None = None
    lease_token: str | None = None
    settled_at: float | None = None
    expires_at: float | None = None


class Purged(msgspec.Struct, frozen=True, kw_only=True):
    """What one `purge` removed: claims (expired unfinalized ones, and finalized ones past retention and
    validity), the receipts of those finalized claims, and settled queue rows past retention and validity."""

    claims: int
    receipts: int
    settlements: int


class QueueStats(msgspec.Struct, frozen=True, kw_only=True):
    """What an operator sees: how many settlements sit in each state (`failed` = waiting for a retry)."""

    queued: int
    leased: int
    settled: int
    failed: int
    dead: int


class PaymentStore(Protocol):
    """Shared gateway state. Implementations: memory (tests), SQLite (default), PostgreSQL, Redis in front."""

    async def claim(self, key: str, *, ttl: float) -> str | None:
        """Atomically claim `key` unless a live or finalized claim holds it (an expired claim may be taken).

        Returns the holder token that `renew`, `release` and `complete` need, or None when refused.
        """
        ...

    async def renew(self, key: str, holder: str, *, ttl: float) -> None:
        """Keep a live claim alive for `ttl` more seconds; `ClaimLost` unless `holder` still holds it."""
        ...

    async def release(self, key: str, holder: str) -> None:
        """Drop a live claim that was never finalized (nothing is charged); `ClaimLost` unless `holder`
        still holds it (then nothing changes: an expired claim may already be another request's)."""
        ...

    async def finalize(self, key: str, *, keep_until: float | None = None) -> None:
        """Make `key` permanently unclaimable, whoever holds it (recovery, count-once markers).

        `keep_until` is when the payment stops being valid anyway (its deadline): `purge` keeps the key at
        least that long. None: kept forever.
        """
        ...

    async def is_finalized(self, key: str) -> bool:
        """True once `finalize` (or `complete`) ran for `key`."""
        ...

    async def complete(
        self,
        key: str,
        holder: str | None,
        *,
        receipt: bytes,
        settlement: Settlement | None = None,
        keep_until: float | None = None,
    ) -> None:
        """`finalize` + `put_receipt` + `enqueue` (when given) as one atomic step, in one round trip.

        Refused with `ClaimLost` (writing nothing) unless `holder` still holds a live claim on `key`; a
        None `holder` finalizes unconditionally, as `finalize` does. Prefer it to the three calls: a crash
        between them could leave a served payment finalized but never queued for settlement.
        """
        ...

    async def complete_settled(
        self, key: str, holder: str | None, *, receipt: bytes, tx_hash: str, keep_until: float | None = None
    ) -> None:
        """`complete` (no new settlement) + `mark_settled([key], tx_hash=tx_hash)` as one atomic step.

        Closes a payment settled before its response: the claim is finalized, the receipt stored and the
        in-flight record (enqueued before the transaction left) marked settled, in one round trip. Refused
        with `ClaimLost` (writing nothing; the record stays open, for recovery to judge from the chain)
        unless `holder` still holds a live claim on `key`; a None `holder` finalizes unconditionally, as in
        `complete` (the Redis cache checks the live claims it holds, then closes the durable part so).
        """
        ...

    async def purge_expired_claims(self) -> int:
        """Delete claims that expired unfinalized (housekeeping); returns how many went."""
        ...

    async def purge(self, *, retention: float) -> Purged:
        """Delete what is no longer needed: expired unfinalized claims; finalized claims (and their
        receipts) and settled rows once `retention` seconds have passed since they were finalized/settled
        *and* the payment's validity (`keep_until`, `expires_at`) has ended. Rows of unknown validity stay."""
        ...

    async def put_receipt(self, key: str, receipt: bytes) -> None:
        """Record the receipt sent for the payment `key` (a second put replaces it)."""
        ...

    async def get_receipt(self, key: str) -> bytes | None:
        """The receipt recorded for `key`, if any."""
        ...

    async def enqueue(self, item: Settlement) -> None:
        """Durably queue a settlement (as `queued`, 0 attempts); a second enqueue of the key is a no-op."""
        ...

    async def lease(self, kind: str, *, limit: int, lease_seconds: float) -> list[Settlement]:
        """Lease up to `limit` due settlements of `kind` (queued, retry due, or lease expired), oldest first.

        Each leased item has `attempts` incremented and carries this lease's `lease_token`. No item is
        handed to two leasers at once; an item whose lease ran out (its settler crashed) is due again.
        """
        ...

    async def renew_lease(self, keys: list[str], *, lease: str, lease_seconds: float) -> list[str]:
        """Keep the items of `keys` still leased under `lease` ours for `lease_seconds` more; returns the keys
        renewed (a settler renews while it sends a batch and awaits its receipts, so a slow chain cannot let
        the lease lapse and another settler send the same payment again)."""
        ...

    async def mark_settled(self, keys: list[str], *, tx_hash: str, lease: str | None = None) -> list[str]:
        """Record that `keys` settled in transaction `tx_hash` (final); returns the keys recorded.

        With `lease`, only items still leased under that token are recorded: a settler whose lease ran
        out and was handed to another must not finish that one's work. Without, any unsettled item is.
        """
        ...

    async def mark_failed(
        self, key: str, *, error: str, retry_at: float | None, lease: str | None = None
    ) -> bool:
        """Record a failure: retry at `retry_at` (see `backoff`), or a dead letter when None.

        Ignored (False) for a settled item, since a late failure report never undoes a settlement, and,
        with `lease`, for an item no longer leased under that token.
        """
        ...

    async def get_settlement(self, key: str) -> Settlement | None:
        """The settlement queued under `key`, in its current state."""
        ...

    async def dead_letters(self, *, kind: str | None = None, limit: int = 100) -> list[Settlement]:
        """Settlements given up on (oldest first), for an operator to inspect and `requeue`."""
        ...

    async def requeue(self, key: str) -> bool:
        """Operator action: put a dead (or retry-waiting) item back as due now with 0 attempts."""
        ...

    async def stats(self) -> QueueStats:
        """Counts per state, for operators and metrics."""
        ...

    async def add_pending(self, account: str, amount: int, *, limit: int) -> bool:
        """Atomically add `amount` to `account`'s pending spend unless the total would pass `limit`."""
        ...

    async def sub_pending(self, account: str, amount: int) -> None:
        """Remove settled (or released) spend from `account`'s pending total (never below 0)."""
        ...

    async def sub_pending_once(self, marker: str, account: str, amount: int, *, ttl: float) -> bool:
        """`sub_pending(account, amount)` exactly once per `marker`, as one atomic step; True when it moved.

        The marker is a claim on `marker` (held `ttl` seconds; make it outlive every report of the payment):
        taken here, or already held or finalized, and then the counter is left alone. So a reservation
        reported released twice (the gateway, a settler, recovery) is given back once, and a crash can
        never leave the marker taken with the counter unmoved.
        """
        ...

    async def get_pending(self, account: str) -> int:
        """The unsettled amount currently counted against `account`."""
        ...

    async def raise_high_water(
        self, channel_id: str, cumulative: int, *, voucher: bytes | None = None
    ) -> bool:
        """Atomically move a channel's high-water mark up to `cumulative`; False if it is not higher.

        With `voucher` (the caller's encoding of a signed voucher), it is stored with the mark in the same
        atomic step, replacing the one stored; without, the stored voucher stays. A refused raise stores
        nothing. So a restarted gateway can still settle what it served on vouchers.
        """
        ...

    async def channel_voucher(self, channel_id: str) -> tuple[int, bytes | None]:
        """A channel's high-water mark and the voucher last stored with it (None if none was)."""
        ...

    async def high_water(self, channel_id: str) -> int:
        """The highest cumulative voucher amount accepted on a channel (0 if none)."""
        ...

    async def list_channel_vouchers(
        self, *, after: str = "", limit: int = 500
    ) -> list[tuple[str, int, bytes]]:
        """Every stored voucher, `(channel_id, mark, voucher)` in key order, keys after `after`, paged: a
        restarted gateway finds what it served and never settled (marks without a voucher are left out)."""
        ...

    async def close(self) -> None:
        """Release connections and files."""
        ...

    async def list_settlements(
        self,
        *,
        states: Sequence[str] | None = None,
        kind: str | None = None,
        payer: str | None = None,
        since: float | None = None,
        limit: int = 100,
        offset: int = 0,
        oldest_first: bool = False,
    ) -> list[Settlement]:
        """Read-only: settlements matching every filter given, newest first (or `oldest_first`), paged.

        `states`: any of these states; `kind`: exactly this kind (`exact`, `exact:now`, ...); `payer`: this
        payer address (any case); `since`: created at or after this time. For dashboards and metrics.
        """
        ...


def backoff(attempts: int, *, base: float = 1.0, cap: float = 300.0, jitter: float = 0.0) -> float:
    """Seconds to wait before retry number `attempts` (1 after the first failure): base·2^(n-1), capped.

    `jitter` in [0, 1] shaves up to that fraction off at random so replicas do not retry in lockstep.
    Use: `retry_at = time.time() + backoff(item.attempts)`.
    """
    delay = min(cap, base * 2.0 ** min(max(attempts - 1, 0), 62))
    return delay * (1.0 - jitter * random.random()) if jitter else delay
