"""Payment states as one transition table (in the manner of h11's `_state.py`).

    received ──verified──▶ verified ──claimed──▶ claimed ──served──▶ served ──settled──▶ settled
        │                      │                    │                   ├──queued───▶ queued
        └──rejected──▶ rejected└──replayed─▶ rejected└──handler_failed─▶ released
                                                                        ├──settle_failed─▶ failed
                                                                        └──recorded─▶ settling
                                    settling ──settled──▶ settled
                                        └──settle_failed─▶ failed

`rejected`: verification failed or the replay claim was already held (nothing was claimed).
`released`: the handler failed; the claim is dropped and the same payment may be presented again.
`failed`: the handler succeeded but settlement did not; the content is withheld.
`queued`: deferred settlement; the batching settler owns the payment from here.
`settling`: settled before the response; recorded in the store as in flight before the transaction leaves, so
recovery can tell from the chain what happened if the process dies now. The direct `served ──settled──▶`
edge is for callers that settle without such a record.
"""

from __future__ import annotations

from collections.abc import Callable
from enum import StrEnum
from typing import Final

from ._errors import InvalidTransition

__all__ = ["Event", "PaymentState", "TERMINAL", "TRANSITIONS", "Tracker"]


class PaymentState(StrEnum):
    RECEIVED = "received"
    VERIFIED = "verified"
    CLAIMED = "claimed"
    SERVED = "served"
    SETTLED = "settled"
    QUEUED = "queued"
    SETTLING = "settling"
    RELEASED = "released"
    REJECTED = "rejected"
    FAILED = "failed"


class Event(StrEnum):
    VERIFIED = "verified"
    REJECTED = "rejected"
    CLAIMED = "claimed"
    REPLAYED = "replayed"
    SERVED = "served"
    HANDLER_FAILED = "handler_failed"
    SETTLED = "settled"
    QUEUED = "queued"
    RECORDED = "recorded"
    SETTLE_FAILED = "settle_failed"


S, E = PaymentState, Event
TRANSITIONS: Final[dict[tuple[PaymentState, Event], PaymentState]] = {
    (S.RECEIVED, E.VERIFIED): S.VERIFIED,
    (S.RECEIVED, E.REJECTED): S.REJECTED,
    (S.VERIFIED, E.CLAIMED): S.CLAIMED,
    (S.VERIFIED, E.REPLAYED): S.REJECTED,
    (S.CLAIMED, E.SERVED): S.SERVED,
    (S.CLAIMED, E.HANDLER_FAILED): S.RELEASED,
    (S.SERVED, E.SETTLED): S.SETTLED,
    (S.SERVED, E.QUEUED): S.QUEUED,
    (S.SERVED, E.SETTLE_FAILED): S.FAILED,
    (S.SERVED, E.RECORDED): S.SETTLING,
    (S.SETTLING, E.SETTLED): S.SETTLED,
    (S.SETTLING, E.SETTLE_FAILED): S.FAILED,
}
del S, E

TERMINAL: Final = frozenset(
    {
        PaymentState.SETTLED,
        PaymentState.QUEUED,
        PaymentState.RELEASED,
        PaymentState.REJECTED,
        PaymentState.FAILED,
    }
)


class Tracker:
    """The state of one payment attempt; every change goes through the table.

    `listener`, when set, is called after each transition with the new state and the event (telemetry:
    `gateway._metrics.PaymentObserver`); it must be cheap and must not raise.
    """

    __slots__ = ("listener", "state")

    def __init__(self, listener: Callable[[PaymentState, Event], None] | None = None) -> None:
        self.state = PaymentState.RECEIVED
        self.listener = listener

    def fire(self, event: Event) -> PaymentState:
        try:
            self.state = TRANSITIONS[(self.state, event)]
        except KeyError:
            raise InvalidTransition(f"no transition from {self.state} on {event}") from None
        if self.listener is not None:
            self.listener(self.state, event)
        return self.state

    @property
    def terminal(self) -> bool:
        return self.state in TERMINAL
