"""Usage pricing: a route declares a maximum, its handler reports the actual charge after the work.

The handler reports in one of two ways, as the official x402 SDKs do:
- the response header `Settlement-Overrides: {"amount": "<atomic>"}` (also `"$0.05"` and `"50%"` of the
  maximum, as the TypeScript SDK accepts); the gateway strips it before the response leaves;
- `charge(request, amount)` from Python, before the response starts.

The gateway charges `min(actual, maximum)`: never more than the payer signed. A handler that reports more
is charged the maximum and logged as an error (an operator's bug, not the payer's). A handler that reports
nothing is charged the maximum. Zero is a valid charge: nothing is settled for it.

`exact` (EIP-3009) binds the value it transfers, so it cannot settle for less: a metered route is offered
only in schemes that implement `gateway._scheme.Meters` (`metered = True`).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from decimal import Decimal, InvalidOperation
from typing import Any

import msgspec
from starlette.requests import Request
from starlette.types import Message, Scope, Send

from ._errors import ConfigurationError
from ._pricing import Amount, RouteTable, to_atomic

__all__ = [
    "OVERRIDES_HEADER",
    "PAID_SCOPE_KEY",
    "Meter",
    "can_meter",
    "check_metered_routes",
    "actual_charge",
    "charge",
    "meter_of",
    "parse_override",
]

log = logging.getLogger("agentpay.gateway.metering")

OVERRIDES_HEADER = "settlement-overrides"
_OVERRIDES_RAW = OVERRIDES_HEADER.encode()
_SCOPE_KEY = "agentpay.meter"
#: Set (True) in the scope of a request an outer paywall has charged (a `SessionPaywall` pricing a route a
#: `PaymentMiddleware` inside it prices too): the inner paywall lets it through to the app, whose `charge()`
#: reaches the outer paywall's meter. Only server code writes the scope: a client cannot set it.
PAID_SCOPE_KEY = "agentpay.paid"


def check_metered_routes(routes: RouteTable, schemes: Mapping[str, object]) -> None:
    """Refuse (ConfigurationError) a metered route no configured scheme can settle for less."""
    for entry in routes.entries:
        if not entry.route.metered:
            continue
        names = entry.route.schemes or tuple(schemes)
        if not any(name in schemes and can_meter(schemes[name]) for name in names):
            raise ConfigurationError(
                f"route {entry.key!r} is metered, but none of its schemes ({', '.join(names)}) can settle"
                " less than was signed (`exact` cannot): add a metered scheme (escrow, upto)"
            )


def can_meter(scheme: object) -> bool:
    """Whether `scheme` settles an actual charge below the signed maximum (`gateway._scheme.Meters`)."""
    return getattr(scheme, "metered", False) is True


class Meter:
    """The actual charge of one metered request; lives in the request scope (`scope["agentpay.meter"]`)."""

    __slots__ = ("decimals", "maximum", "reported")

    def __init__(self, maximum: int, decimals: int) -> None:
        self.maximum = maximum
        self.decimals = decimals
        self.reported: int | None = None

    def report(self, atomic: int) -> None:
        if atomic < 0:
            raise ValueError("a charge cannot be negative")
        self.reported = atomic

    @property
    def actual(self) -> int:
        return actual_charge(self.maximum, self.reported)

    def install(self, scope: Scope) -> None:
        scope[_SCOPE_KEY] = self

    def take_override(self, message: Message) -> Message:
        """The response start without `Settlement-Overrides`, whose amount (if readable) is reported."""
        kept = []
        for name, value in message.get("headers", ()):
            if name.lower() == _OVERRIDES_RAW:
                amount = parse_override(value.decode("latin-1"), self.maximum, self.decimals)
                if amount is not None:
                    self.report(amount)
                continue
            kept.append((name, value))
        return {**message, "headers": kept}

    def wrap_send(self, send: Send) -> Send:
        """A `send` that reads and strips `Settlement-Overrides` from the response start."""

        async def metered_send(message: Message) -> None:
            if message["type"] == "http.response.start":
                message = self.take_override(message)
            await send(message)

        return metered_send


def meter_of(request: Request | Scope) -> Meter | None:
    scope = request.scope if isinstance(request, Request) else request
    meter = scope.get(_SCOPE_KEY)
    return meter if isinstance(meter, Meter) else None


def charge(request: Request, amount: Amount) -> int:
    """Report the actual charge of this metered request (atomic int, or a human amount like "$0.0003").

    Returns the atomic amount reported. Raises ValueError on a route that is not metered.
    """
    meter = meter_of(request)
    if meter is None:
        raise ValueError("charge() is only for metered routes (PaidRoute(metered=True) or a session route)")
    atomic = to_atomic(amount, meter.decimals)
    meter.report(atomic)
    return atomic


def actual_charge(maximum: int, reported: int | None) -> int:
    """What is charged: the report, bounded by the maximum (a larger report is logged as an error)."""
    if reported is None:
        return maximum
    if reported > maximum:
        log.error(
            "handler reported a charge of %d above the route maximum %d: charged the maximum",
            reported,
            maximum,
        )
        return maximum
    return reported


def parse_override(value: str, maximum: int, decimals: int) -> int | None:
    """The amount of a `Settlement-Overrides` header value; None (logged) when it cannot be read."""
    try:
        obj: Any = msgspec.json.decode(value)
        raw = obj["amount"] if isinstance(obj, dict) else None
        text = str(raw).strip() if isinstance(raw, (str, int)) and not isinstance(raw, bool) else ""
        if text.endswith("%"):
            percent = Decimal(text[:-1])
            if not 0 <= percent <= 100 or percent != percent.quantize(Decimal("0.01")):
                raise ValueError(text)
            return int(maximum * percent / 100)
        if text.startswith("$"):
            return to_atomic(text[1:], decimals)
        if text.isdigit():
            return int(text)
        raise ValueError(text)
    except (msgspec.DecodeError, KeyError, ValueError, InvalidOperation, Exception):
        log.error("unreadable Settlement-Overrides header %r: charged the maximum", value[:100])
        return None
