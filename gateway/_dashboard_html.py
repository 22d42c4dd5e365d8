"""The dashboard's one HTML page: server-rendered tables and an inline SVG chart, no script, no CDN.

Every value from the store is escaped; sections and cells carry `id`s / `data-*` so a browser test (and a
person with the inspector) can find them.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from html import escape
from typing import Any
from urllib.parse import quote

__all__ = ["render_page"]

_CSS = """
body{font:14px/1.4 system-ui,sans-serif;margin:0;background:#f5f6f8;color:#1d2330}
header{background:#1d2330;color:#fff;padding:12px 24px}header h1{margin:0;font-size:20px}
main{padding:16px 24px}section{background:#fff;border-radius:8px;padding:12px 16px;margin:0 0 16px;
box-shadow:0 1px 2px #0002}h2{font-size:16px;margin:0 0 8px}
.cards{display:flex;gap:12px;flex-wrap:wrap}.card{background:#fff;border-radius:8px;padding:10px 16px;
box-shadow:0 1px 2px #0002;min-width:150px}.card b{display:block;font-size:22px}
table{border-collapse:collapse;width:100%}
th,td{text-align:left;padding:4px 8px;border-bottom:1px solid #e4e6eb;font-family:ui-monospace,monospace;
font-size:12px;white-space:nowrap}th{font-family:system-ui;color:#555}
td.num{text-align:right}.grid{display:grid;grid-template-columns:1fr 1fr;gap:16px}
.state-settled{color:#137333}.state-dead{color:#b3261e;font-weight:bold}.state-failed{color:#b06000}
.notice{background:#e6f4ea;border:1px solid #137333;padding:8px 12px;border-radius:6px;margin-bottom:12px}
button{background:#1a73e8;color:#fff;border:0;border-radius:4px;padding:3px 10px;cursor:pointer}
.empty{color:#777;font-style:italic}
"""


def _short(value: str, keep: int = 10) -> str:
    return value if len(value) <= 2 * keep + 1 else f"{value[:keep]}…{value[-6:]}"


def _when(ts: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(ts))


def _totals_table(table_id: str, label: str, items: list[tuple[str, Any]], fmt: Callable[[int], str]) -> str:
    if not items:
        return f'<p class="empty" id="{table_id}-empty">none yet</p>'
    rows = "".join(
        f'<tr data-name="{escape(name)}"><td title="{escape(name)}">{escape(_short(name, 14))}</td>'
        f'<td class="num">{t.calls}</td>'
        f'<td class="num" data-settled="{t.settled}">{escape(fmt(t.settled))}</td>'
        f'<td class="num" data-pending="{t.pending}">{escape(fmt(t.pending))}</td>'
        f'<td class="num">{escape(fmt(t.dead))}</td></tr>'
        for name, t in items
    )
    head = f"<tr><th>{label}</th><th>calls</th><th>settled</th><th>pending</th><th>dead</th></tr>"
    return f'<table id="{table_id}">{head}{rows}</table>'


def _chart(series: dict[str, Any]) -> str:
    calls, settled = series["calls"], series["settled"]
    width, height, pad = 720, 180, 28
    top = max(max(calls, default=0), 1)
    step = (width - 2 * pad) / len(calls)
    bars: list[str] = []
    for i, (c, s) in enumerate(zip(calls, settled, strict=True)):
        x = pad + i * step
        for value, color, offset, kind in ((c, "#1a73e8", 0.1, "calls"), (s, "#34a853", 0.5, "settled")):
            h = (height - 2 * pad) * value / top
            bars.append(
                f'<rect class="bar-{kind}" data-count="{value}" x="{x + step * offset:.1f}" '
                f'y="{height - pad - h:.1f}" width="{step * 0.4:.1f}" height="{h:.1f}" fill="{color}"/>'
            )
    start, span = series["start"], series["width"] * len(calls)
    labels = (
        f'<text x="{pad}" y="{height - 8}" font-size="11">{_when(start)[11:]}</text>'
        f'<text x="{width - pad}" y="{height - 8}" font-size="11" text-anchor="end">'
        f"{_when(start + span)[11:]} UTC</text>"
        f'<text x="{pad - 4}" y="{pad}" font-size="11" text-anchor="end">{top}</text>'
        f'<line x1="{pad}" y1="{height - pad}" x2="{width - pad}" y2="{height - pad}" stroke="#999"/>'
        f'<rect x="{width - 190}" y="6" width="10" height="10" fill="#1a73e8"/>'
        f'<text x="{width - 176}" y="15" font-size="11">paid calls</text>'
        f'<rect x="{width - 100}" y="6" width="10" height="10" fill="#34a853"/>'
        f'<text x="{width - 86}" y="15" font-size="11">settled</text>'
    )
    return (
        f'<svg id="chart" role="img" aria-label="paid calls and settlements over time" '
        f'width="100%" viewBox="0 0 {width} {height}">{labels}{"".join(bars)}</svg>'
    )


def _ledger_rows(rows: list[Any], fmt: Callable[[int], str], *, requeue: bool, base: str) -> str:
    out: list[str] = []
    for r in rows:
        action = ""
        if requeue:
            action = (
                f'<td><form method="post" action="{escape(base)}/requeue">'
                f'<input type="hidden" name="key" value="{escape(r.key)}"/>'
                f'<button type="submit" class="requeue">Requeue</button></form></td>'
            )
        tx = escape(_short(r.tx_hash)) if r.tx_hash else "—"
        out.append(
            f'<tr data-payment-id="{r.payment_id}" data-state="{escape(r.state)}">'
            f"<td>{_when(r.created_at)}</td><td>{r.payment_id}</td><td>{escape(r.kind)}</td>"
            f'<td title="{escape(r.payer)}">{escape(_short(r.payer))}</td>'
            f'<td title="{escape(r.payee)}">{escape(_short(r.payee))}</td>'
            f'<td class="num" data-amount="{r.amount}">{escape(fmt(r.amount))}</td>'
            f'<td class="state-{escape(r.state)}">{escape(r.state)}</td>'
            f'<td title="{escape(r.tx_hash)}">{tx}</td><td class="num">{r.attempts}</td>'
            f'<td title="{escape(r.error)}">{escape(_short(r.error, 24))}</td>'
            f"{action}</tr>"
        )
    return "".join(out)


def _ledger(table_id: str, rows: list[Any], fmt: Callable[[int], str], *, requeue: bool, base: str) -> str:
    if not rows:
        return f'<p class="empty" id="{table_id}-empty">none</p>'
    head = (
        "<tr><th>created (UTC)</th><th>payment id</th><th>kind</th><th>payer</th><th>payee</th>"
        "<th>amount</th>"
        "<th>state</th><th>tx</th><th>attempts</th><th>error</th>"
        + ("<th></th>" if requeue else "")
        + "</tr>"
    )
    return f'<table id="{table_id}">{head}{_ledger_rows(rows, fmt, requeue=requeue, base=base)}</table>'


def render_page(
    data: dict[str, Any], *, fmt: Callable[[int], str], title: str, base: str, notice: str | None
) -> str:
    stats = data["stats"]
    rows = data["rows"]
    settled = sum(r.amount for r in rows if r.state == "settled")
    pending = sum(r.amount for r in rows if r.state in ("queued", "leased", "failed"))
    cards = [
        ("calls", "paid calls shown", str(len(rows))),
        ("settled", "settled", fmt(settled)),
        ("pending", "pending settlement", fmt(pending)),
        (
            "queue",
            "queue (queued / leased / retrying)",
            f"{stats['queued']} / {stats['leased']} / {stats['failed']}",
        ),
        ("oldest", "oldest waiting", f"{data['oldest_waiting']:.0f} s"),
        ("dead", "dead letters", str(stats["dead"])),
    ]
    card_html = "".join(
        f'<div class="card" id="card-{cid}"><span>{escape(label)}</span><b>{escape(value)}</b></div>'
        for cid, label, value in cards
    )
    filt = data["payer_filter"]
    filter_note = (
        f'<p id="filter">payer {escape(filt)} — <a href="{escape(base)}/">show all</a></p>' if filt else ""
    )
    routes = data["routes"]
    route_html = ""
    if routes:
        route_rows = "".join(
            f'<tr data-name="{escape(r["route"])}"><td>{escape(r["route"])}</td>'
            f'<td class="num">{r["calls"]}</td>'
            f'<td class="num" data-amount="{r["amount"]}">{escape(fmt(r["amount"]))}</td></tr>'
            for r in routes
        )
        route_html = (
            "<section><h2>Earnings per route <small>(this process, since it started)</small></h2>"
            '<table id="routes"><tr><th>route</th><th>calls</th><th>earned</th></tr>'
            f"{route_rows}</table></section>"
        )
    payer_links = "".join(
        f'<a class="payer-filter" href="{escape(base)}/?payer={quote(name)}">{escape(_short(name))}</a> '
        for name, _ in data["payers"][:10]
    )
    banner = f'<div class="notice" id="notice">Requeued {escape(notice)}</div>' if notice else ""
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{escape(title)} dashboard</title>
<style>{_CSS}</style></head>
<body><header><h1>{escape(title)} — payments</h1><small>as of {_when(data["now"])} UTC; the last
{data["window"]} payments in the store</small></header><main>{banner}{filter_note}
<div class="cards" id="cards">{card_html}</div><br/>
<section><h2>Paid calls and settlements over time</h2>{_chart(data["series"])}</section>
<div class="grid">
<section><h2>Earnings per payee</h2>{_totals_table("payees", "payee", data["payees"], fmt)}</section>
<section><h2>Spend per payer</h2>{_totals_table("payers", "payer", data["payers"], fmt)}
<p>filter: {payer_links}</p></section>
<section><h2>Spend per grant <small>(escrow: payer → session key)</small></h2>
{_totals_table("grants", "grant", data["grants"], fmt)}</section>
{route_html}
</div>
<section><h2>Dead letters</h2>{_ledger("dead", data["dead"], fmt, requeue=True, base=base)}</section>
<section><h2>Settlement queue <small>(queued, leased, waiting for a retry; oldest first)</small></h2>
{_ledger("queue", data["waiting"], fmt, requeue=False, base=base)}</section>
<section><h2>Receipts ledger</h2>{_ledger("ledger", rows, fmt, requeue=False, base=base)}</section>
</main></body></html>"""
