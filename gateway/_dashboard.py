"""The operator's dashboard: a Starlette app over a `PaymentStore` (`agentpay dashboard --store URL`, or
mounted in an app with `Mount("/ops", dashboard_app(store))`).

It shows what the store knows about the payments it recorded, newest first, over the last `window` rows:
earnings per payee, spend per payer and per escrow grant (payer → session key), the receipts ledger (each
payment with its `payment_id`, the id its log records carry), the settlement queue and the dead letters
with a requeue button, and a chart of paid calls and settlements over time (inline SVG: no script, no CDN).
Given the middleware's `Metrics` (same process), it also shows calls and earnings per route, which the
store does not record.

Read-only except `POST /requeue` (form field `key`), which puts a dead or retry-waiting settlement back in
the queue; it is refused (403) when the browser says the form came from another origin. `GET /api/summary`
is the page's data as JSON. Amounts are atomic units, shown with `decimals`/`symbol` (default USDC's 6).
"""

from __future__ import annotations

import contextlib
import time
from collections import defaultdict
from collections.abc import AsyncIterator
from decimal import Decimal
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import msgspec
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from starlette.routing import Route

from ._dashboard_html import render_page
from ._metrics import Metrics, payment_id
from ._store import PaymentStore, Settlement
from ._stores import open_store

__all__ = ["dashboard_app"]

_OPEN = ("queued", "leased", "failed")


class Row(msgspec.Struct, frozen=True, kw_only=True):
    """One payment as the dashboard shows it."""

    key: str
    payment_id: str
    kind: str
    payer: str
    payee: str
    grant: str  # "payer → session key (epoch n)" for escrow; "" for a direct transfer
    amount: int
    created_at: float
    settled_at: float | None
    state: str
    tx_hash: str
    attempts: int
    error: str


def _row(item: Settlement) -> Row:
    payee, grant = "", ""
    base = item.kind.partition(":")[0].partition("@")[0]  # `exact@8453:now` -> exact
    try:
        if base == "exact":
            from escrow.payments._exact_settler import decode_payment

            payee = decode_payment(item.payload).payload.authorization.to
        elif base == "escrow":
            from escrow.payments._settler import decode_claim

            claim = decode_claim(item.payload)
            p = claim.payload.payment
            payee, grant = p.payee, f"{p.payer} → {claim.signer} (epoch {p.epoch})"
    except (msgspec.DecodeError, msgspec.ValidationError):
        payee = "(unreadable payload)"
    return Row(
        key=item.key,
        payment_id=payment_id(item.key),
        kind=item.kind,
        payer=item.payer,
        payee=payee,
        grant=grant,
        amount=item.amount,
        created_at=item.created_at,
        settled_at=item.settled_at,
        state=item.state,
        tx_hash=item.tx_hash or "",
        attempts=item.attempts,
        error=item.error or "",
    )


class Totals(msgspec.Struct, kw_only=True):
    calls: int = 0
    settled: int = 0  # atomic units settled on chain
    pending: int = 0  # queued, leased or waiting for a retry
    dead: int = 0


def _totals(rows: list[Row], key: str) -> list[tuple[str, Totals]]:
    out: dict[str, Totals] = defaultdict(Totals)
    for row in rows:
        name = getattr(row, key)
        if not name:
            continue
        t = out[name]
        t.calls += 1
        if row.state == "settled":
            t.settled += row.amount
        elif row.state == "dead":
            t.dead += row.amount
        else:
            t.pending += row.amount
    return sorted(out.items(), key=lambda kv: (-kv[1].settled - kv[1].pending, kv[0]))


def _series(rows: list[Row], now: float, *, buckets: int = 24) -> dict[str, Any]:
    """Paid calls (by when they were served) and settlements (by when they settled) per time bucket, from
    the oldest row shown to now."""
    start = min((r.created_at for r in rows), default=now - 3600.0)
    span = max(now - start, 60.0)
    width = span / buckets
    calls, settled = [0] * buckets, [0] * buckets

    def bucket(ts: float) -> int:
        return max(0, min(int((ts - start) / width), buckets - 1))

    for r in rows:
        calls[bucket(r.created_at)] += 1
        if r.state == "settled":
            settled[bucket(r.settled_at or r.created_at)] += 1
    return {"start": start, "width": width, "calls": calls, "settled": settled}


def _routes(metrics: Metrics | None) -> list[dict[str, Any]]:
    """Calls and earnings per route from the middleware's counters (this process, since it started)."""
    if metrics is None:
        return []
    served: dict[str, float] = defaultdict(float)
    earned: dict[str, float] = defaultdict(float)
    for family in metrics.registry.collect():
        for sample in family.samples:
            if sample.name == "agentpay_payments_served_total":
                served[sample.labels["route"]] += sample.value
            elif sample.name == "agentpay_payments_amount_total":
                earned[sample.labels["route"]] += sample.value
    return [{"route": r, "calls": int(served[r]), "amount": int(earned[r])} for r in sorted(served)]


async def summary(
    store: PaymentStore, *, window: int, metrics: Metrics | None, payer: str | None = None
) -> dict[str, Any]:
    now = time.time()
    stats = await store.stats()
    rows = [_row(item) for item in await store.list_settlements(payer=payer, limit=window)]
    dead = [_row(item) for item in await store.list_settlements(states=["dead"], limit=100)]
    waiting = [
        _row(item) for item in await store.list_settlements(states=_OPEN, limit=100, oldest_first=True)
    ]
    return {
        "now": now,
        "stats": msgspec.to_builtins(stats),
        "oldest_waiting": (now - waiting[0].created_at) if waiting else 0.0,
        "rows": rows,
        "dead": dead,
        "waiting": waiting,
        "payees": _totals(rows, "payee"),
        "payers": _totals(rows, "payer"),
        "grants": _totals(rows, "grant"),
        "routes": _routes(metrics),
        "series": _series(rows, now),
        "window": window,
        "payer_filter": payer or "",
    }


def _same_origin(request: Request) -> bool:
    """A browser names the page a form was posted from; only this dashboard's own pages may requeue."""
    origin = request.headers.get("origin") or request.headers.get("referer")
    if not origin or origin == "null":
        return origin is None  # no header: a script or curl, not a cross-site form
    return urlsplit(origin).netloc == request.headers.get("host", "")


def dashboard_app(
    store: PaymentStore | str,
    *,
    metrics: Metrics | None = None,
    window: int = 500,
    decimals: int = 6,
    symbol: str = "USDC",
    title: str = "agentpay",
) -> Starlette:
    """The dashboard over `store` (a store, or a URL opened at startup and closed at shutdown)."""
    holder: dict[str, PaymentStore] = {}
    if not isinstance(store, str):
        holder["store"] = store
    scale = Decimal(10) ** -decimals

    def fmt(amount: int) -> str:
        return f"{(Decimal(amount) * scale).normalize():f} {symbol}"

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        opened = None
        if isinstance(store, str):
            opened = holder["store"] = await open_store(store)
        try:
            yield
        finally:
            if opened is not None:
                await opened.close()

    async def page(request: Request) -> Response:
        payer = request.query_params.get("payer") or None
        data = await summary(holder["store"], window=window, metrics=metrics, payer=payer)
        notice = request.query_params.get("requeued")
        html = render_page(data, fmt=fmt, title=title, base=request.scope.get("root_path", ""), notice=notice)
        return HTMLResponse(html, headers={"cache-control": "no-store"})

    async def api(request: Request) -> Response:
        data = await summary(holder["store"], window=window, metrics=metrics)
        return JSONResponse(msgspec.to_builtins(data))

    async def requeue(request: Request) -> Response:
        if not _same_origin(request):
            return _problem(403, "requeue must be posted from this dashboard")
        body = (await request.body())[:4096].decode("utf-8", "replace")
        key = dict(parse_qsl(body)).get("key", "")
        if not key:
            return _problem(400, "form field `key` is required")
        if not await holder["store"].requeue(key):
            return _problem(409, "no dead or retry-waiting settlement has that key")
        base = request.scope.get("root_path", "")
        return RedirectResponse(f"{base}/?requeued={payment_id(key)}", status_code=303)

    return Starlette(
        routes=[
            Route("/", page),
            Route("/api/summary", api),
            Route("/requeue", requeue, methods=["POST"]),
        ],
        lifespan=lifespan,
    )


def _problem(status: int, detail: str) -> Response:
    titles = {400: "Bad Request", 403: "Forbidden", 409: "Conflict"}
    body = {"type": "about:blank", "title": titles[status], "status": status, "detail": detail}
    return JSONResponse(body, status_code=status, media_type="application/problem+json")
