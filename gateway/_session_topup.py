"""A payer's own top-up (a `topUp` credential of type `hash`): checked cheaply, answered privately.

A `hash` top-up is signed by no one: anyone who knows a channel id can send one. So it must cost the gateway
little and teach the sender nothing:
- the named transaction must be a mined, successful top-up of THIS channel on this escrow (its
  `ChannelToppedUp` log, one receipt read), checked before the channel's lock is taken, and the deposit it
  made is taken from that log: no `getChannel` read, ever, for a top-up;
- a hash already checked is answered from memory (`TOP_UP_MEMORY` hashes) with no chain read at all;
- receipt reads of hashes not seen yet are limited per channel (`TOP_UP_READS` per `TOP_UP_WINDOW` seconds;
  past it 429 `rate-limited`);
- the 204 carries a receipt without `acceptedCumulative` / `spent` (and a problem carries no channel state):
  those are told only to a credential the channel's signer signed (a voucher or close);
- a `topUp` naming no hash is answered 204 with no chain read: the payer's next voucher above the cached
  deposit re-reads the channel (a signed credential) anyway.
"""

from __future__ import annotations

import re
import time
from collections import deque

import msgspec

from x402 import MalformedPayment
from x402._session import SessionAction

from ._channels import ChannelChain
from ._session_state import Channel, SessionProblem

__all__ = ["SessionTopUps"]

_HASH = re.compile(r"0x[0-9a-f]{64}")


class SessionTopUps:
    """Mixed into `SessionPaywall`: the `hash` top-up."""

    chain: ChannelChain
    #: Top-up transactions remembered (hash -> channel and the deposit it made), and channels rate-limited.
    TOP_UP_MEMORY = 4096
    #: Receipt reads of not-yet-seen top-up hashes allowed per channel in `TOP_UP_WINDOW` seconds.
    TOP_UP_READS = 4
    TOP_UP_WINDOW = 10.0
    _top_ups: dict[str, tuple[str, int]]
    _top_up_reads: dict[str, deque[float]]
    #: How many top-up receipts were read from the chain (a metric: each unseen, admitted hash is one).
    top_up_receipt_reads: int

    async def _top_up_deposit(self, action: SessionAction) -> int | None:
        """The channel's deposit after the top-up `action.hash` names (None: no hash named). Reads the chain
        at most once per hash, before any channel lock; refuses a hash that did not top up this channel."""
        if action.hash is None:
            return None
        tx = action.hash.lower()
        if not _HASH.fullmatch(tx):
            raise MalformedPayment("a topUp hash must be a 32-byte hex transaction hash")
        seen = self._top_ups.get(tx)
        if seen is None:
            self._admit_read(action.channel)
            self.top_up_receipt_reads += 1
            deposit = await self.chain.topped_up(tx, action.channel)
            if deposit is None:
                raise SessionProblem(
                    "transaction-not-found",
                    "the hash is not a mined top-up of this channel",
                    state={"channelId": action.channel},
                )
            seen = self._top_ups[tx] = (action.channel, deposit)
            while len(self._top_ups) > self.TOP_UP_MEMORY:
                del self._top_ups[next(iter(self._top_ups))]
        if seen[0] != action.channel:
            raise SessionProblem(
                "transaction-not-found",
                "the hash is not a mined top-up of this channel",
                state={"channelId": action.channel},
            )
        return seen[1]

    def _admit_read(self, channel: str, now: float | None = None) -> None:
        """Count one receipt read for `channel`, or refuse it (429): a sliding window per channel, the
        least recently used channels forgotten past `TOP_UP_MEMORY` (`now`: a monotonic clock, for tests)."""
        now = time.monotonic() if now is None else now
        reads = self._top_up_reads.pop(channel, None) or deque(maxlen=self.TOP_UP_READS)
        self._top_up_reads[channel] = reads  # re-inserted: the dict's order is least recently used first
        while len(self._top_up_reads) > self.TOP_UP_MEMORY:
            del self._top_up_reads[next(iter(self._top_up_reads))]
        if len(reads) == self.TOP_UP_READS and now - reads[0] < self.TOP_UP_WINDOW:
            raise SessionProblem(
                "rate-limited",
                f"at most {self.TOP_UP_READS} top-up hashes a channel are read per {self.TOP_UP_WINDOW:g} s",
                status=429,
                state={"channelId": channel},
            )
        reads.append(now)

    @staticmethod
    async def _apply_top_up(ch: Channel, deposit: int) -> None:
        """Take the deposit a mined top-up made (its log): a top-up also cancels a pending close request, so
        a cached state older than it (a lower deposit: deposits only grow) is the one to replace."""
        async with ch.lock:
            if deposit > ch.info.deposit:
                ch.info = msgspec.structs.replace(ch.info, deposit=deposit, close_requested_at=0)
                ch.changed.notify_all()
