"""The dashboard in a real headless Chromium (Debian's `chromium` + `chromium-driver`, driven by Selenium).

The store is a SQLite file holding real payments made through the real middleware on the session devnet:
settled before their response, queued for the batching settler, settled by it, and one dead letter made
the way a payer makes one (the payer spends the same EIP-3009 nonce elsewhere first, so the settler finds
it used by another transfer). `agentpay dashboard --store URL` serves the page from its own process; the
test reads what a person would read, clicks Requeue, and keeps a screenshot that must not be blank.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from PIL import Image
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.remote.webdriver import WebDriver
from selenium.webdriver.support import expected_conditions
from selenium.webdriver.support.ui import WebDriverWait
from starlette.applications import Starlette
from starlette.routing import Mount

from escrow import DevnetState
from escrow.chain._rpc import Rpc
from escrow.payments._exact_settler import ExactSettler, decode_payment
from gateway import Metrics, PaymentStore, dashboard_app, open_store, payment_id
from tests._ops_world import HELLO, REPORT, Shop
from x402 import LocalSigner, sign_transfer_authorization

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = os.environ.get("AGENTPAY_CHROMIUM", "/usr/bin/chromium")
CHROMEDRIVER = os.environ.get("AGENTPAY_CHROMEDRIVER", "/usr/bin/chromedriver")


class Payments:
    """What the store holds after `_make_payments`, to compare with what the page shows."""

    def __init__(self) -> None:
        self.a = LocalSigner.random()  # placeholders, replaced by funded payers
        self.b = LocalSigner.random()
        self.payee_now = ""
        self.payee_later = ""
        self.dead_key = ""
        self.queued_key = ""
        self.metrics: Metrics | None = None


async def _make_payments(devnet: DevnetState, url: str) -> Payments:
    out = Payments()
    rpc = Rpc(devnet.rpc_url)
    store: PaymentStore = await open_store(url)
    now = Shop(devnet, rpc, store, settle="before-response", metrics=Metrics())
    later = Shop(devnet, rpc, store, settle="deferred", metrics=Metrics())
    try:
        out.payee_now, out.payee_later, out.metrics = now.payee, later.payee, now.metrics
        out.a, out.b = await now.payer(), await now.payer()
        async with now.paying(out.a) as client:  # settled before their responses
            for path in ("/hello", "/hello", "/report"):
                assert (await client.get(path)).status_code == 200
        async with later.paying(out.b) as client:  # queued for the settler
            for path in ("/report", "/report", "/hello"):
                assert (await client.get(path)).status_code == 200
        queued = await store.list_settlements(states=["queued"])
        (doomed,) = [item for item in queued if item.amount == HELLO]
        out.dead_key = doomed.key
        # B spends that authorization's nonce on another transfer first: the queued payment can never land
        paid = decode_payment(doomed.payload)
        auth = paid.payload.authorization
        elsewhere = sign_transfer_authorization(
            out.b,
            paid.domain,
            to=out.b.address,
            value=1,
            valid_before=int(time.time()) + 300,
            nonce=auth.nonce,
        )
        await now.exact.settle(paid.domain, elsewhere)
        outcomes = await ExactSettler(store, now.exact, max_age=0).drain()  # the relayer of `now` sends
        assert sorted(o.status for o in outcomes) == ["dead", "settled", "settled"]
        async with later.paying(out.a) as client:  # one more, left in the queue
            assert (await client.get("/report")).status_code == 200
        (last,) = await store.list_settlements(states=["queued"])
        out.queued_key = last.key
    finally:
        await now.aclose()
        await later.aclose()
        await store.close()
        await rpc.aclose()
    return out


@pytest.fixture
def paid_store(devnet: DevnetState, tmp_path: Path) -> tuple[str, Payments]:
    url = f"sqlite:///{tmp_path}/payments.db"
    return url, asyncio.run(_make_payments(devnet, url))


@pytest.fixture
def dashboard(paid_store: tuple[str, Payments]) -> Iterator[str]:
    """`agentpay dashboard --store URL --port 0` in its own process; yields its base URL."""
    url, _ = paid_store
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "gateway", "dashboard", "--store", url, "--port", "0"],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line.startswith("agentpay dashboard on http://127.0.0.1:"), line + (
            proc.stderr.read() if proc.stderr else ""
        )
        base = line.split(" on ", 1)[1].strip().rstrip("/")
        deadline = time.monotonic() + 20
        while True:
            try:
                if httpx.get(base + "/api/summary", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "the dashboard did not start"
            time.sleep(0.1)
        yield base
    finally:
        proc.terminate()
        proc.wait(timeout=20)


@pytest.fixture
def browser() -> Iterator[WebDriver]:
    assert shutil.which(CHROMIUM) or Path(CHROMIUM).exists(), f"{CHROMIUM} missing: apt-get install chromium"
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--window-size=1400,2200",
    ):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    try:
        yield driver
    finally:
        driver.quit()


def _text(driver: WebDriver, css: str) -> str:
    return str(driver.find_element(By.CSS_SELECTOR, css).text)


def _cells(driver: WebDriver, table: str, name: str) -> list[str]:
    row = driver.find_element(By.CSS_SELECTOR, f'#{table} tr[data-name="{name}"]')
    return [str(td.text) for td in row.find_elements(By.TAG_NAME, "td")]


def test_dashboard_in_headless_chromium_shows_the_payments_and_requeues_a_dead_letter(
    paid_store: tuple[str, Payments], dashboard: str, browser: WebDriver, tmp_path: Path
) -> None:
    url, p = paid_store
    browser.get(dashboard + "/")
    assert browser.title == "agentpay dashboard"
    # the cards: 7 paid calls; settled 3 + 2 payments; one waiting; one dead
    assert _text(browser, "#card-calls b") == "7"
    assert _text(browser, "#card-settled b") == "0.0095 USDC"  # (1000 + 1000 + 2500) + 2 * 2500
    assert _text(browser, "#card-pending b") == "0.0025 USDC"
    assert _text(browser, "#card-queue b") == "1 / 0 / 0"
    assert _text(browser, "#card-dead b") == "1"
    # earnings per payee and spend per payer: calls, settled, pending, dead
    assert _cells(browser, "payees", p.payee_now)[1:] == ["3", "0.0045 USDC", "0 USDC", "0 USDC"]
    assert _cells(browser, "payees", p.payee_later)[1:] == ["4", "0.005 USDC", "0.0025 USDC", "0.001 USDC"]
    assert _cells(browser, "payers", p.a.address)[1:] == ["4", "0.0045 USDC", "0.0025 USDC", "0 USDC"]
    assert _cells(browser, "payers", p.b.address)[1:] == ["3", "0.005 USDC", "0 USDC", "0.001 USDC"]
    assert browser.find_elements(By.ID, "grants-empty")  # exact payments use no escrow grant
    # the receipts ledger: every payment, with the id its log records carry
    ledger = browser.find_elements(By.CSS_SELECTOR, "#ledger tr[data-payment-id]")
    assert len(ledger) == 7
    states = sorted(str(row.get_attribute("data-state")) for row in ledger)
    assert states == ["dead", "queued"] + ["settled"] * 5
    ids = {row.get_attribute("data-payment-id") for row in ledger}
    assert {payment_id(p.dead_key), payment_id(p.queued_key)} <= ids
    for row in ledger:
        if row.get_attribute("data-state") == "settled":
            assert "0x" in row.text  # its transaction
    # the chart: 7 paid calls, 5 settled, drawn as bars
    calls = browser.find_elements(By.CSS_SELECTOR, "#chart rect.bar-calls")
    settled = browser.find_elements(By.CSS_SELECTOR, "#chart rect.bar-settled")
    assert sum(int(str(r.get_attribute("data-count"))) for r in calls) == 7
    assert sum(int(str(r.get_attribute("data-count"))) for r in settled) == 5
    assert any(float(str(r.get_attribute("height"))) > 0 for r in calls)
    # the queue (oldest first) and the dead letter, with the reason the settler recorded
    queue = browser.find_elements(By.CSS_SELECTOR, "#queue tr[data-payment-id]")
    assert [row.get_attribute("data-payment-id") for row in queue] == [payment_id(p.queued_key)]
    (dead,) = browser.find_elements(By.CSS_SELECTOR, "#dead tr[data-payment-id]")
    assert dead.get_attribute("data-payment-id") == payment_id(p.dead_key)
    assert "dead" in dead.text and "0.001 USDC" in dead.text
    before = tmp_path / "dashboard.png"
    assert browser.save_screenshot(str(before))
    _assert_not_blank(before)

    dead.find_element(By.CSS_SELECTOR, "button.requeue").click()
    WebDriverWait(browser, 10).until(expected_conditions.presence_of_element_located((By.ID, "notice")))
    assert _text(browser, "#notice") == f"Requeued {payment_id(p.dead_key)}"
    assert browser.find_elements(By.ID, "dead-empty")
    assert _text(browser, "#card-dead b") == "0"
    assert _text(browser, "#card-queue b") == "2 / 0 / 0"
    queue = browser.find_elements(By.CSS_SELECTOR, "#queue tr[data-payment-id]")
    assert {row.get_attribute("data-payment-id") for row in queue} == {
        payment_id(p.dead_key),
        payment_id(p.queued_key),
    }
    after = tmp_path / "dashboard-requeued.png"
    assert browser.save_screenshot(str(after))
    _assert_not_blank(after)
    shots = os.environ.get("AGENTPAY_SCREENSHOTS")  # keep them somewhere to look at (CI artifacts)
    if shots:
        Path(shots).mkdir(parents=True, exist_ok=True)
        shutil.copy(before, Path(shots) / before.name)
        shutil.copy(after, Path(shots) / after.name)

    async def state_in_store() -> Any:
        store = await open_store(url)
        try:
            item = await store.get_settlement(p.dead_key)
            assert item is not None
            return item.state, item.attempts
        finally:
            await store.close()

    assert asyncio.run(state_in_store()) == ("queued", 0)  # due again, for the settler to retry


def _assert_not_blank(png: Path) -> None:
    """A rendered page, not an empty canvas: many distinct colours (text, bars, table rules)."""
    assert png.stat().st_size > 20_000
    with Image.open(png) as image:
        assert image.size[0] >= 1000
        colors = image.convert("RGB").getcolors(maxcolors=1 << 20)
        assert colors is not None and len(colors) > 50


def test_requeue_refuses_other_origins_unknown_keys_and_empty_forms(
    paid_store: tuple[str, Payments], dashboard: str
) -> None:
    url, p = paid_store
    form = {"key": p.dead_key}
    evil = httpx.post(dashboard + "/requeue", data=form, headers={"origin": "http://evil.example"})
    assert evil.status_code == 403 and evil.headers["content-type"] == "application/problem+json"
    assert httpx.get(dashboard + "/api/summary").json()["stats"]["dead"] == 1  # untouched
    missing = httpx.post(dashboard + "/requeue", data={"key": "exact:no-such-key"})
    assert missing.status_code == 409
    assert httpx.post(dashboard + "/requeue", data={}).status_code == 400
    done = httpx.post(dashboard + "/requeue", data=form)
    assert done.status_code == 303 and done.headers["location"] == f"/?requeued={payment_id(p.dead_key)}"
    again = httpx.post(dashboard + "/requeue", data=form)
    assert again.status_code == 409  # no longer a dead letter


def test_dashboard_mounted_in_an_app_shows_earnings_per_route(paid_store: tuple[str, Payments]) -> None:
    url, p = paid_store

    async def main() -> None:
        store = await open_store(url)
        try:
            app = Starlette(routes=[Mount("/ops", dashboard_app(store, metrics=p.metrics))])
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://shop.test") as client:
                page = await client.get("/ops/")
                assert page.status_code == 200
                html = page.text
                assert '<tr data-name="GET /hello"><td>GET /hello</td><td class="num">2</td>' in html
                assert f'data-amount="{REPORT}">0.0025 USDC' in html  # GET /report, once
                assert 'action="/ops/requeue"' in html  # the form posts back under the mount
                data = (await client.get("/ops/api/summary")).json()
                assert data["stats"] == {"queued": 1, "leased": 0, "settled": 5, "failed": 0, "dead": 1}
                assert len(data["rows"]) == 7
        finally:
            await store.close()

    asyncio.run(main())


@pytest.mark.parametrize(
    ("args", "status", "message"),
    [
        (["--store", "nosuch://x"], 1, "agentpay: error: unknown store URL scheme 'nosuch'"),
        (["--store", "memory://", "--port", "-1"], 2, "agentpay: error: argument --port: not a TCP port"),
        (["--store", "memory://", "--port", "BUSY"], 1, "agentpay: error: cannot listen on 127.0.0.1:"),
    ],
)
def test_dashboard_command_errors_are_one_line(args: list[str], status: int, message: str) -> None:
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen(1)
    args = [str(busy.getsockname()[1]) if a == "BUSY" else a for a in args]
    with busy:
        run = subprocess.run(
            [sys.executable, "-m", "gateway", "dashboard", *args],
            cwd=ROOT,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
            capture_output=True,
            text=True,
            timeout=60,
        )
    assert run.returncode == status
    assert run.stderr.startswith(message), run.stderr
    assert run.stderr.count("\n") == 1 and "Traceback" not in run.stderr
