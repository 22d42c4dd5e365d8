"""Discovery documents, generated from the route table: `/openapi.json`, `/llms.txt`, `/discovery/resources`.

Opt-in on the middleware (`PaymentMiddleware(..., discovery=True)` or `discovery=Discovery(...)`). All three
are built from the same routes, prices and schemes the paywall charges with, so what is advertised is what
a 402 asks for:

- `/openapi.json` (OpenAPI 3.1): every paid operation carries `x-payment-info` (the MPP discovery
  extension: flat `{amount, currency, description, intent, method}` for one offer, `{offers: [...]}` for
  several, never both) and a `402` response, which is what `mppx validate` checks.
- `/llms.txt`: the same list in Markdown, for agents that read prose.
- `/discovery/resources`: the x402 bazaar listing (`{x402Version, items, pagination}`), filtered by `type`,
  `payTo`, `scheme`, `network` and paged by `limit` (1..100, default 20) / `offset`.

A route priced by a function of the request has no fixed amount: `x-payment-info.amount` is `null` and the
bazaar's requirements leave `amount` out (`metadata.dynamicPrice` is true); its 402 names the real price.
The documents use the request's own origin (and root path) unless `Discovery.base_url` is set.
"""

from __future__ import annotations

import re
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qsl

import msgspec
from starlette.types import Scope, Send

from ._pricing import Quote, route_path
from ._scheme import Offer

if TYPE_CHECKING:
    from ._pipeline import Paywall
    from ._pricing import RouteTable

__all__ = ["Discovery", "DiscoveryDocuments"]

_CONVERTOR = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)(?::[A-Za-z_]+)?\}")
_BODY_METHODS = ("POST", "PUT", "PATCH")


class Discovery(msgspec.Struct, frozen=True, kw_only=True):
    """What the discovery documents say about the service beyond its routes.

    `operations` adds OpenAPI fields to one operation, keyed like the route (`"POST /summarize"`), e.g. a
    `requestBody` with an `example`, which `mppx validate` sends when a bodiless request gets a 400.
    """

    title: str = "agentpay service"
    version: str = "1.0.0"
    description: str = "A paid API: every priced route answers 402 with x402 (v1, v2) and MPP offers."
    base_url: str | None = None  # e.g. "https://api.example.com"; default: the request's origin
    categories: tuple[str, ...] = ()
    operations: Mapping[str, Mapping[str, Any]] = msgspec.field(default_factory=dict)
    openapi_path: str = "/openapi.json"
    llms_path: str = "/llms.txt"
    resources_path: str = "/discovery/resources"


class _Paid(msgspec.Struct, frozen=True, kw_only=True):
    key: str  # the route key, e.g. "GET /hello"
    method: str  # upper case; a route for any method is listed as GET
    path: str  # OpenAPI template: "/items/{id}"
    description: str
    mime_type: str
    dynamic: bool
    offers: tuple[Offer, ...]


class _BadQuery(Exception):
    pass


def _json(obj: Any) -> bytes:
    return msgspec.json.encode(obj)


class DiscoveryDocuments:
    """Serves the three documents for one middleware; `handle` answers a request for one of them."""

    def __init__(self, config: Discovery, routes: RouteTable, paywall: Paywall) -> None:
        self.config = config
        self.routes = routes
        self.paywall = paywall
        self.paths = {config.openapi_path, config.llms_path, config.resources_path}
        self.built_at = int(time.time())

    # -- the route table, as offers ------------------------------------------------------------------------

    def paid_routes(self, origin: str) -> list[_Paid]:
        out: list[_Paid] = []
        for entry in self.routes.entries:
            route = entry.route
            assert route.asset is not None and route.pay_to is not None  # resolved by RouteTable
            method, _, raw_path = entry.key.partition(" ") if " " in entry.key else ("GET", "", entry.key)
            path = _CONVERTOR.sub(r"{\1}", raw_path.strip())
            quote = Quote(
                route=entry.key,
                method=method.upper(),
                path=path,
                url=origin + path,
                amount=entry.static if entry.static is not None else 0,
                asset=route.asset,
                pay_to=route.pay_to,
                description=route.description,
                mime_type=route.mime_type,
                max_timeout_seconds=route.max_timeout_seconds,
                schemes=route.schemes,
                assets=entry.assets,  # every network it is priced on
            )
            out.append(
                _Paid(
                    key=entry.key,
                    method=method.upper(),
                    path=path,
                    description=route.description or f"{method.upper()} {path}",
                    mime_type=route.mime_type,
                    dynamic=entry.static is None,
                    offers=tuple(self.paywall.offers(quote)),
                )
            )
        return out

    # -- documents -----------------------------------------------------------------------------------------

    def openapi(self, origin: str) -> dict[str, Any]:
        config = self.config
        paths: dict[str, dict[str, Any]] = {}
        for paid in self.paid_routes(origin):
            infos = [_payment_info(paid, offer) for offer in paid.offers if offer.mpp is not None]
            operation: dict[str, Any] = {
                "operationId": _operation_id(paid),
                "summary": paid.description,
                "responses": {
                    "200": {"description": "The paid content", "content": {paid.mime_type: {}}},
                    "402": {
                        "description": "Payment Required: pay with one of the offers in WWW-Authenticate "
                        "(MPP) or PAYMENT-REQUIRED (x402 v2), then repeat the request with the credential",
                        "content": {"application/problem+json": {}},
                    },
                },
            }
            if infos:
                operation["x-payment-info"] = infos[0] if len(infos) == 1 else {"offers": infos}
            params = [
                {"name": name, "in": "path", "required": True, "schema": {"type": "string"}}
                for name in re.findall(r"\{([^}]+)\}", paid.path)
            ]
            if params:
                operation["parameters"] = params
            if paid.method in _BODY_METHODS:
                operation["requestBody"] = {
                    "required": True,
                    "content": {"application/json": {"schema": {"type": "object"}}},
                }
            operation.update(config.operations.get(paid.key, {}))
            paths.setdefault(paid.path, {})[paid.method.lower()] = operation
        service: dict[str, Any] = {"docs": {"llms": config.llms_path}}
        if config.categories:
            service["categories"] = list(config.categories)
        return {
            "openapi": "3.1.0",
            "info": {"title": config.title, "version": config.version, "description": config.description},
            "servers": [{"url": origin}],
            "x-service-info": service,
            "paths": paths,
        }

    def llms_txt(self, origin: str) -> str:
        config = self.config
        lines = [f"# {config.title}", "", f"> {config.description}", "", "## Paid endpoints", ""]
        for paid in self.paid_routes(origin):
            lines.append(f"- [{paid.method} {paid.path}]({origin}{paid.path}): {paid.description}")
            for offer in paid.offers:
                r = offer.requirements
                price = "priced per request (see its 402)" if paid.dynamic else f"{r.amount} atomic units"
                lines.append(f"  - {offer.scheme} on {r.network}: {price} of {r.asset}, paid to {r.pay_to}")
        lines += [
            "",
            "## How to pay",
            "",
            "Call the endpoint; the 402 answer carries every offer (x402 v2 `PAYMENT-REQUIRED`,",
            "x402 v1 body, MPP `WWW-Authenticate: Payment`). Sign one and repeat the request with",
            "`PAYMENT-SIGNATURE`, `X-PAYMENT` or `Authorization: Payment`; the receipt comes back in",
            "`PAYMENT-RESPONSE` or `Payment-Receipt`.",
            "",
            "## Discovery",
            "",
            f"- [OpenAPI]({origin}{config.openapi_path})",
            f"- [x402 resources]({origin}{config.resources_path})",
            "",
        ]
        return "\n".join(lines)

    def resources(self, origin: str, query: Mapping[str, str]) -> dict[str, Any]:
        limit = _bounded(query.get("limit"), "limit", default=20, low=1, high=100)
        offset = _bounded(query.get("offset"), "offset", default=0, low=0, high=1 << 31)
        kind = query.get("type")
        items: list[dict[str, Any]] = []
        for paid in self.paid_routes(origin):
            accepts = [
                _requirements(offer, paid.dynamic)
                for offer in paid.offers
                if _keep(offer, query.get("scheme"), query.get("network"), query.get("payTo"))
            ]
            if not accepts or kind not in (None, "http"):
                continue
            items.append(
                {
                    "resource": origin + paid.path,
                    "type": "http",
                    "x402Version": 2,
                    "accepts": accepts,
                    "lastUpdated": self.built_at,
                    "metadata": {
                        "method": paid.method,
                        "description": paid.description,
                        "mimeType": paid.mime_type,
                        "dynamicPrice": paid.dynamic,
                    },
                }
            )
        page = items[offset : offset + limit]
        return {
            "x402Version": 2,
            "items": page,
            "pagination": {"limit": limit, "offset": offset, "total": len(items)},
        }

    # -- ASGI ----------------------------------------------------------------------------------------------

    async def handle(self, scope: Scope, send: Send) -> bool:
        """Answer `scope` if it asks for a discovery document (GET/HEAD); False to let it pass on."""
        path = route_path(scope)
        if path not in self.paths or scope["method"] not in ("GET", "HEAD"):
            return False
        origin = self.config.base_url or _origin(scope)
        origin = origin.rstrip("/")
        status, content_type = 200, b"application/json"
        if path == self.config.openapi_path:
            body = _json(self.openapi(origin))
        elif path == self.config.llms_path:
            body, content_type = self.llms_txt(origin).encode(), b"text/markdown; charset=utf-8"
        else:
            query = dict(parse_qsl(scope.get("query_string", b"").decode("latin-1")))
            try:
                body = _json(self.resources(origin, query))
            except _BadQuery as exc:
                status, content_type = 400, b"application/problem+json"
                body = _json(
                    {"type": "about:blank", "title": "Bad Request", "status": 400, "detail": str(exc)}
                )
        headers = [(b"content-type", content_type), (b"content-length", str(len(body)).encode())]
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": b"" if scope["method"] == "HEAD" else body})
        return True


def _payment_info(paid: _Paid, offer: Offer) -> dict[str, Any]:
    assert offer.mpp is not None
    request = offer.mpp.request
    return {
        "amount": None if paid.dynamic else str(request["amount"]),
        "currency": request["currency"],
        "description": paid.description,
        "intent": offer.mpp.intent,
        "method": offer.mpp.method,
    }


def _requirements(offer: Offer, dynamic: bool) -> dict[str, Any]:
    out: dict[str, Any] = msgspec.to_builtins(offer.requirements)
    if dynamic:
        out.pop("amount", None)
    return out


def _keep(offer: Offer, scheme: str | None, network: str | None, pay_to: str | None) -> bool:
    r = offer.requirements
    return (
        (scheme is None or r.scheme == scheme)
        and (network is None or r.network == network)
        and (pay_to is None or r.pay_to.lower() == pay_to.lower())
    )


def _bounded(raw: str | None, name: str, *, default: int, low: int, high: int) -> int:
    if raw is None:
        return default
    # ASCII digits only ("²".isdigit() is true; int() refuses it, and more than 4300 digits)
    if not (raw.isascii() and raw.isdigit()) or len(raw) > 18 or not low <= int(raw) <= high:
        raise _BadQuery(f"{name} must be an integer from {low} to {high}")
    return int(raw)


def _operation_id(paid: _Paid) -> str:
    words = re.sub(r"[^A-Za-z0-9]+", "_", paid.path).strip("_") or "root"
    return f"{paid.method.lower()}_{words}"


def _origin(scope: Scope) -> str:
    host = None
    for name, value in scope["headers"]:
        if name == b"host":
            host = value.decode("latin-1")
            break
    if host is None:
        server = scope.get("server")
        host = f"{server[0]}:{server[1]}" if server else "localhost"
    return f"{scope.get('scheme', 'http')}://{host}{scope.get('root_path', '')}"
