"""Route prices: which requests cost what, in which asset, paid to whom.

A price is atomic units (`int`), a human amount (`"$0.001"`, `"0.001"`, `Decimal`) converted with the
asset's decimals, or a function of the request (sync or async) returning either. Route keys are
`"METHOD /path"` or `"/path"` (any method); paths may hold Starlette `{param}` segments.

A route is matched the way Starlette's router would route the request, so nothing the app serves escapes its
price: the path is the one Starlette routes on (the scope's `path` minus its `root_path`, which covers
`uvicorn --root-path` and apps mounted under a prefix), and a `GET` price also covers `HEAD` (Starlette runs
the `GET` endpoint for a `HEAD` request and returns its headers).
"""

from __future__ import annotations

import inspect
import re
from collections.abc import Awaitable, Callable, Mapping, Sequence
from decimal import Decimal
from typing import Any, TypeAlias

import msgspec
from eth_utils.address import to_checksum_address
from starlette.requests import Request
from starlette.routing import compile_path
from starlette.types import Scope

from x402 import InvalidAmount, to_atomic_units

from ._errors import ConfigurationError

__all__ = ["Asset", "Amount", "PaidRoute", "Price", "PriceFunction", "Quote", "RouteTable", "to_atomic"]

Amount: TypeAlias = int | str | Decimal
PriceFunction: TypeAlias = Callable[[Request], Amount | Awaitable[Amount]]
Price: TypeAlias = Amount | PriceFunction

_ADDRESS = re.compile(r"^0x[0-9a-fA-F]{40}$")


class Asset(msgspec.Struct, frozen=True, kw_only=True):
    """An EIP-3009 token on one chain. `name`/`version` must equal the token's on-chain EIP-712 domain."""

    address: str
    chain_id: int
    name: str
    version: str
    decimals: int = 6
    symbol: str = "USDC"

    @property
    def network(self) -> str:
        return f"eip155:{self.chain_id}"


class PaidRoute(msgspec.Struct, frozen=True, kw_only=True):
    """One paid route. Unset `pay_to`/`asset` fall back to the middleware's defaults."""

    price: Any  # Price; typed loosely because msgspec cannot describe callables
    pay_to: str | None = None
    asset: Asset | None = None
    description: str = ""
    mime_type: str = "application/json"
    max_timeout_seconds: int = 60
    schemes: tuple[str, ...] | None = None  # None: every scheme the middleware knows
    #: `price` is a maximum: the handler reports the actual charge (`charge()`, `Settlement-Overrides`);
    #: offered only in schemes that can settle for less (see gateway._metering).
    metered: bool = False


class Quote(msgspec.Struct, frozen=True, kw_only=True):
    """What one request costs: the priced route, resolved against its defaults."""

    route: str  # the route key that matched, e.g. "GET /hello"
    method: str
    path: str  # the request path (MPP scope binding)
    url: str  # absolute resource URL (x402 `resource.url`)
    amount: int
    asset: Asset
    pay_to: str
    description: str
    mime_type: str
    max_timeout_seconds: int
    schemes: tuple[str, ...] | None
    metered: bool = False
    #: Every network the route is priced on, `asset` first, when there are several (a gateway on several
    #: chains); empty: `asset` alone. The paywall offers each scheme once per network.
    assets: tuple[Asset, ...] = ()

    def on(self, asset: Asset) -> Quote:
        """This quote on one of its networks."""
        return msgspec.structs.replace(self, asset=asset, assets=())


def to_atomic(amount: Amount, decimals: int) -> int:
    """Atomic units of `amount`: ints are atomic already; strings and Decimals are human amounts."""
    try:
        return to_atomic_units(amount, decimals)
    except InvalidAmount as exc:  # a price is the operator's configuration, not the payer's input
        raise ConfigurationError(f"price: {exc.message}") from None


async def resolve(price: Price, request: Request, decimals: int) -> int:
    if callable(price):
        out = price(request)
        if inspect.isawaitable(out):
            out = await out
        return to_atomic(out, decimals)
    return to_atomic(price, decimals)


def route_path(scope: Scope) -> str:
    """The path Starlette's router matches routes against: `path` without the `root_path` prefix.

    ASGI servers put the root path in front of `path` (`uvicorn --root-path /svc` serves `/svc/x` with
    `root_path="/svc"`), and `Mount` passes a sub-app the full path with its prefix added to `root_path`.
    The prefix is removed only on a segment boundary, as Starlette does; a path outside it is kept whole.
    """
    path: str = scope["path"]
    root = scope.get("root_path", "")
    if not root or not path.startswith(root):
        return path
    if path == root:
        return ""
    return path[len(root) :] if path[len(root)] == "/" else path


class _Entry(msgspec.Struct, frozen=True):
    key: str
    method: str | None
    regex: re.Pattern[str]
    route: PaidRoute
    static: int | None  # atomic price when it does not depend on the request
    assets: tuple[Asset, ...] = ()  # every network the route is priced on, when several


def _checksummed(asset: Asset) -> Asset:
    # Offers carry EIP-55 addresses: clients echo them and x402 compares `accepted` as strings.
    return msgspec.structs.replace(asset, address=to_checksum_address(asset.address))


#: Distinct requests (route, method, URL) whose static-price quote is kept; past it the cache starts over,
#: so a client making up query strings cannot grow it without bound.
_QUOTE_LIMIT = 1024


def _url_key(scope: Scope) -> tuple[Any, ...]:
    """Everything of the scope that `Request.url` and `Request.method` are made from."""
    host = None
    for name, value in scope["headers"]:
        if name == b"host":
            host = value
            break
    server = scope.get("server")
    return (
        scope["method"],
        scope.get("scheme", "http"),
        None if server is None else tuple(server),
        scope.get("root_path", ""),
        scope["path"],
        scope.get("query_string", b""),
        host,
    )


class RouteTable:
    """Matches requests to paid routes and prices them."""

    def __init__(
        self,
        routes: Mapping[str, PaidRoute | Price],
        *,
        pay_to: str | None,
        asset: Asset | None,
        assets: Sequence[Asset] = (),
    ) -> None:
        """`asset` is the default of routes naming none; `assets` (several networks, `asset` among them)
        prices those routes on every network at once. They must share decimals: one price, one amount."""
        self.pay_to = pay_to
        self.asset = asset
        others = [a for a in assets if a != asset]
        if others and asset is None:
            raise ConfigurationError("several networks need a default asset")
        if any(a.decimals != asset.decimals for a in others if asset is not None):
            raise ConfigurationError("the assets of a route priced on several networks must share decimals")
        self._defaults: tuple[Asset, ...] = () if not others or asset is None else (asset, *others)
        self._entries: list[_Entry] = []
        # A static price makes the quote a function of the URL: built once per URL instead of parsing the
        # URL (starlette's `Request.url`) on every request.
        self._quotes: dict[tuple[Any, ...], Quote] = {}
        for key, spec in routes.items():
            route = spec if isinstance(spec, PaidRoute) else PaidRoute(price=spec)
            method, _, path = key.partition(" ") if " " in key else ("", "", key)
            regex, _, _ = compile_path(path.strip())
            asset_ = route.asset or asset
            if asset_ is None or not _ADDRESS.match(asset_.address):
                raise ConfigurationError(f"route {key!r} needs an asset with an address, got {asset_!r}")
            to = route.pay_to or pay_to
            if to is None or not _ADDRESS.match(to):
                raise ConfigurationError(f"route {key!r} needs a pay_to address, got {to!r}")
            several = () if route.asset is not None else tuple(map(_checksummed, self._defaults))
            asset_ = _checksummed(asset_)
            route = msgspec.structs.replace(route, asset=asset_, pay_to=to_checksum_address(to))
            static = None if callable(route.price) else to_atomic(route.price, asset_.decimals)
            self._entries.append(_Entry(key, method.upper() or None, regex, route, static, several))

    def match(self, scope: Scope) -> _Entry | None:
        method, path = scope["method"], route_path(scope)
        # Starlette adds HEAD to every route that allows GET, so a HEAD request runs a GET endpoint.
        methods = (method, "GET") if method == "HEAD" else (method,)
        for entry in self._entries:
            if (entry.method is None or entry.method in methods) and entry.regex.match(path):
                return entry
        return None

    async def quote(self, entry: _Entry, request: Request) -> Quote:
        if entry.static is None:
            return await self._quote(entry, request)
        key = (entry.key, *_url_key(request.scope))
        quote = self._quotes.get(key)
        if quote is None:
            if len(self._quotes) >= _QUOTE_LIMIT:
                self._quotes.clear()
            quote = self._quotes[key] = await self._quote(entry, request)
        return quote

    async def _quote(self, entry: _Entry, request: Request) -> Quote:
        route = entry.route
        asset, pay_to = route.asset, route.pay_to
        assert asset is not None and pay_to is not None  # resolved in __init__
        amount = (
            entry.static if entry.static is not None else await resolve(route.price, request, asset.decimals)
        )
        return Quote(
            route=entry.key,
            method=request.method,
            path=request.url.path + (f"?{request.url.query}" if request.url.query else ""),
            url=str(request.url),
            amount=amount,
            asset=asset,
            pay_to=pay_to,
            description=route.description,
            mime_type=route.mime_type,
            max_timeout_seconds=route.max_timeout_seconds,
            schemes=route.schemes,
            metered=route.metered,
            assets=entry.assets,
        )

    @property
    def entries(self) -> tuple[_Entry, ...]:
        """The paid routes in match order (discovery documents are generated from them)."""
        return tuple(self._entries)
