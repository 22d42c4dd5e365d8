"""The plug-in point for payment schemes.

A scheme turns a `Quote` into an `Offer` (what the 402 advertises in x402 v2, v1 and MPP), checks a
presented payment against that offer (`verify`), and moves the money (`settle` now, or `settlement` for the
durable queue a batching settler drains). The pipeline owns everything shared between schemes: decoding the
three wire forms, matching `accepted` / MPP challenges to offers, the replay claim, and the answers.

Four methods are optional (the pipeline looks for them; see `Reserves`, `Releases`, `ChoosesSettlement`):
`reserve(verified)` holds what the payment needs once its replay claim is taken (so a replay never holds
anything), `release(verified)` gives back what `verify` or `reserve` held when the payment ends up not
charged (handler failed, settlement refused), `settle_now(verified)` asks for this one payment to be
settled before the response even under `settle="deferred"` (a payer past its credit limit), and
`use_store(store)` hands the scheme the middleware's store (`ExactScheme` keeps its reservations there),
again whenever the middleware opens it.

A payment settled before its response is first recorded in the store under `in_flight_kind(kind)`
(`exact:now`, ...), so that recovery can find it if the process dies while its transaction is out.

`exact` (EIP-3009) is `gateway._exact.ExactScheme`; an escrow scheme is one more class with these methods.

Metered settlement (`Meters`, optional): a scheme whose payments are signed for a MAXIMUM can settle an
actual charge at or below it (`escrow`, `upto`). The interface the usage-pricing pipeline calls:

- `Verified.amount` is always the signed maximum; it never changes.
- `await scheme.settle(verified, actual=n)` settles `n` now and returns the transaction hash ("" when
  `n == 0`: nothing is sent, and every reservation `verify` took is given back, as by `release`).
- `scheme.settlement(verified, now=t, actual=n)` is the queue item for a deferred settlement of `n`;
  `Settlement.amount` is `n` (the settler pays exactly that; an item of 0 is closed without a transaction).
- `actual=None` (the default) means the full maximum, so fixed-price callers are unchanged.
- `0 <= actual <= verified.amount`, else the scheme raises `ValueError` before anything moves (the
  pipeline clamps a handler's over-report to the maximum and logs it before calling).
- `metered` (a class attribute, True) tells the pipeline the scheme can do this; `exact` has none and must
  be settled for its full amount.
"""

from __future__ import annotations

from typing import Any, Literal, Protocol

import msgspec

from x402 import MppChallenge, PaymentRequirements

from ._pricing import Quote
from ._store import Settlement

__all__ = [
    "ChoosesSettlement",
    "Dialect",
    "MppOffer",
    "Offer",
    "Presented",
    "Meters",
    "Releases",
    "Reserves",
    "Scheme",
    "Verified",
    "check_actual",
    "in_flight_kind",
]

Dialect = Literal["x402v2", "x402v1", "mpp"]


class MppOffer(msgspec.Struct, frozen=True, kw_only=True):
    """The MPP side of an offer: `method`/`intent` and the `request` object (before JCS + base64url)."""

    method: str
    intent: str
    request: dict[str, Any]


class Offer(msgspec.Struct, frozen=True, kw_only=True):
    """One accepted way to pay for a quote, in every protocol the scheme speaks."""

    scheme: str
    requirements: PaymentRequirements  # the x402 v2 `accepts[]` entry (v1 is derived from it)
    mpp: MppOffer | None = None


class Presented(msgspec.Struct, frozen=True, kw_only=True):
    """A decoded credential, reduced to what a scheme needs.

    `payload` is the scheme payload: x402's `payload` object, or the MPP credential's `payload`.
    For MPP, `challenge` is the echoed (already HMAC-checked) challenge and `bindings` the values one of
    which the scheme must find in the signed payment (the evm/charge `challengeHash`).
    """

    dialect: Dialect
    payload: dict[str, Any]
    challenge: MppChallenge | None = None
    bindings: tuple[bytes, ...] = ()
    source: str | None = None


class Verified(msgspec.Struct, frozen=True, kw_only=True):
    """A payment that passed every check; `key` is its replay key (one claim per key, ever).

    `expires_at`: when the signed payment stops being valid (its deadline, `validBefore`); the store keeps
    the key finalized at least that long. None: unknown, kept forever.

    `resume`: the very credential of an earlier request whose settlement before its response did not
    finish in time (`settlement_pending`) and which was never served. The pipeline takes the claim
    `<key>#resume` instead of `key`, confirms the settlement (`settle`), and serves it once.
    """

    scheme: str
    key: str
    payer: str
    amount: int
    network: str
    state: Any = None  # the scheme's own data for `settle` / `settlement`
    expires_at: float | None = None
    resume: bool = False


class Scheme(Protocol):
    """A payment scheme the middleware can offer and accept."""

    @property
    def name(self) -> str:
        """The x402 scheme name (`exact`, `escrow`, ...)."""
        ...

    def offer(self, quote: Quote) -> Offer:
        """What the 402 advertises for `quote`."""
        ...

    async def verify(self, offer: Offer, presented: Presented, *, now: float) -> Verified:
        """Check a payment against its offer; raise X402Error, EscrowError or PaymentFailed."""
        ...

    async def settle(self, verified: Verified) -> str:
        """Move the money now; returns the transaction hash."""
        ...

    def settlement(self, verified: Verified, *, now: float) -> Settlement:
        """The durable queue item for deferred settlement by a batching settler."""
        ...


class Meters(Protocol):
    """Optional: a scheme that settles an actual charge at or below the signed maximum (see module doc)."""

    metered: bool  # True

    async def settle(self, verified: Verified, *, actual: int | None = None) -> str:
        """Settle `actual` (None: the maximum) now; "" and nothing sent when it is 0."""
        ...

    def settlement(self, verified: Verified, *, now: float, actual: int | None = None) -> Settlement:
        """The durable queue item settling `actual` (None: the maximum); `Settlement.amount == actual`."""
        ...


def check_actual(verified: Verified, actual: int | None) -> int:
    """The charge a metered settlement pays: `actual`, or the maximum when None; refuses out of range."""
    if actual is None:
        return verified.amount
    if not 0 <= actual <= verified.amount:
        raise ValueError(f"actual charge {actual} outside [0, {verified.amount}] (the signed maximum)")
    return actual


class Reserves(Protocol):
    """Optional: a scheme that holds something (a payer's balance) once the replay claim is taken."""

    async def reserve(self, verified: Verified) -> None:
        """Hold what `verified` needs, or raise (X402Error / PaymentFailed) to refuse it."""
        ...


class Releases(Protocol):
    """Optional: a scheme whose `verify` reserves something (budget, credit) to give back."""

    async def release(self, verified: Verified) -> None:
        """The payment will not be charged (handler failed, settlement refused): undo `verify`'s holds."""
        ...


class ChoosesSettlement(Protocol):
    """Optional: a scheme that may need one payment settled before its response under "deferred"."""

    def settle_now(self, verified: Verified) -> bool:
        """True: settle this payment before the response even though the middleware defers."""
        ...


def in_flight_kind(kind: str) -> str:
    """The queue kind under which a payment being settled before its response is recorded."""
    return kind + ":now"
