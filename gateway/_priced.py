"""Prices of calls that are not HTTP routes (MCP tools, A2A tasks), charged through a route paywall.

`PricedCalls` maps a name (a tool, an agent skill) to a price, resolves its payee and asset against the
paywall's defaults, and makes the `Quote` the pipeline verifies and settles against; the paywall itself
(a `PaymentMiddleware`, whose store it opens, or a bare `Paywall`) is looked up at each call.
"""

from __future__ import annotations

import inspect
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, TypeAlias

import msgspec
from eth_utils.address import to_checksum_address

from ._errors import ConfigurationError
from ._middleware import PaymentMiddleware
from ._pipeline import Paywall
from ._pricing import Amount, Asset, PaidRoute, Quote, to_atomic

__all__ = ["CallPrice", "CallPriceFunction", "PaywallSource", "PricedCalls"]

PaywallSource: TypeAlias = Paywall | PaymentMiddleware
#: A price computed from the call's input (tool arguments, task text), sync or async: the metering hook.
CallPriceFunction: TypeAlias = Callable[[Any], Amount | Awaitable[Amount]]
CallPrice: TypeAlias = Amount | CallPriceFunction


class _Priced(msgspec.Struct, frozen=True):
    route: PaidRoute
    static: int | None


class PricedCalls:
    """Named calls and their prices; `bind` a paywall before quoting."""

    def __init__(
        self,
        prices: Mapping[str, PaidRoute | CallPrice],
        *,
        what: str,
        paywall: PaywallSource | None = None,
        pay_to: str | None = None,
        asset: Asset | None = None,
    ) -> None:
        self.what = what
        self.specs = dict(prices)
        self._pay_to, self._asset = pay_to, asset
        self._source: PaywallSource | None = None
        self._priced: dict[str, _Priced] = {}
        if paywall is not None:
            self.bind(paywall)
        elif pay_to is not None and asset is not None:
            self._resolve(pay_to, asset)

    def _resolve(self, pay_to: str | None, asset: Asset | None) -> None:
        priced: dict[str, _Priced] = {}
        for name, spec in self.specs.items():
            route = spec if isinstance(spec, PaidRoute) else PaidRoute(price=spec)
            to, token = route.pay_to or pay_to, route.asset or asset
            if token is None or to is None:
                raise ConfigurationError(f"paid {self.what} {name!r} needs a pay_to address and an asset")
            token = msgspec.structs.replace(token, address=to_checksum_address(token.address))
            route = msgspec.structs.replace(route, asset=token, pay_to=to_checksum_address(to))
            static = None if callable(route.price) else to_atomic(route.price, token.decimals)
            priced[name] = _Priced(route, static)
        self._priced = priced

    def bind(self, paywall: PaywallSource) -> None:
        """Charge through `paywall` from now on (its `pay_to` and `asset` are the defaults)."""
        pay_to, asset = self._pay_to, self._asset
        if isinstance(paywall, PaymentMiddleware):
            pay_to, asset = pay_to or paywall.routes.pay_to, asset or paywall.routes.asset
        self._resolve(pay_to, asset)
        self._source = paywall

    @property
    def bound(self) -> bool:
        return self._source is not None and bool(self._priced) == bool(self.specs)

    @property
    def paywall(self) -> Paywall:
        # Looked up per call: a middleware replaces its paywall's store when it opens the configured one.
        source = self._source
        if source is None:
            raise ConfigurationError(f"paid {self.what}s have no paywall: bind one first")
        return source.paywall if isinstance(source, PaymentMiddleware) else source

    async def quote(self, name: str, call_input: Any, *, method: str, url: str, description: str) -> Quote:
        """What the call `name` with `call_input` costs; its MPP challenges are bound to `method` + `name`."""
        priced = self._priced[name]
        route = priced.route
        asset, pay_to = route.asset, route.pay_to
        assert asset is not None and pay_to is not None  # resolved by `_resolve`
        amount = priced.static
        if amount is None:
            out = route.price(call_input)
            amount = to_atomic(await out if inspect.isawaitable(out) else out, asset.decimals)
        return Quote(
            route=f"{method} {name}",
            method=method,
            path=name,
            url=url,
            amount=amount,
            asset=asset,
            pay_to=pay_to,
            description=route.description or description,
            mime_type=route.mime_type,
            max_timeout_seconds=route.max_timeout_seconds,
            schemes=route.schemes,
        )
