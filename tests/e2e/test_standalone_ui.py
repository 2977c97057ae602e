"""The Airflow UI of the same `airflow standalone`, in a real browser (Debian's chromium driven by
Playwright): log in, trigger binance_klines_1h from the trigger form and watch the run reach Success,
see the form refuse a malformed symbol (and no run created), read the window line in the fetch log.
Screenshots go to tests/e2e/artifacts/."""

from __future__ import annotations

import re
from contextlib import contextmanager
from urllib.parse import unquote

import pytest

from include.market_data.timeframes import to_ms
from tests.e2e.helpers import ARTIFACTS, assert_raw_equals_truth

pytestmark = pytest.mark.slow

DAG_ID = "binance_klines_1h"
WINDOW = ("2024-03-05", "2024-03-06")  # one day, after the API test's window
CHROMIUM = "/usr/bin/chromium"  # Debian's; never a downloaded browser build
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--no-first-run", "--disable-sync"]


@contextmanager
def browser_page():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1920, "height": 1080})
            page.set_default_timeout(60_000)
            yield page
        finally:
            browser.close()


def screenshot(page, name: str) -> None:
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / f"{name}.png"), full_page=True)


def open_trigger_form(page, base_url: str, start: str, end: str, symbols: str | None = None):
    page.goto(f"{base_url}/dags/{DAG_ID}")
    page.get_by_role("button", name="Trigger Dag").click()
    page.locator("input#element_start").fill(start)
    page.locator("input#element_end").fill(end)
    if symbols is not None:
        page.locator("textarea#element_symbols").fill(symbols)  # an array param: one item per line


def test_trigger_refuse_and_read_the_log_in_the_browser(standalone, sandbox):
    from playwright.sync_api import expect

    api, base = standalone.api, standalone.url
    with browser_page() as page:
        page.goto(f"{base}/")
        page.get_by_label("Username").fill("admin")
        page.get_by_label("Password").fill(standalone.password)
        page.get_by_role("button", name="Sign in").click()
        expect(page.get_by_role("button", name="Sign in")).to_have_count(0)

        # Trigger from the form with start/end; the UI moves to the new run, which reaches Success.
        runs_before = {r["dag_run_id"] for r in api.runs(DAG_ID)}
        open_trigger_form(page, base, *WINDOW)
        page.get_by_test_id("trigger-dag-submit").click()
        page.wait_for_url(re.compile(rf"/dags/{DAG_ID}/runs/[^/]+$"))
        run_id = unquote(page.url.rsplit("/runs/", 1)[1])
        assert run_id not in runs_before
        badge = page.get_by_role("heading", name=run_id).locator(
            "xpath=following-sibling::*[@data-testid='state-badge'][1]")
        expect(badge).to_have_text(re.compile(r"^\s*(Success|Failed)\s*$"), timeout=300_000)
        assert badge.inner_text().strip() == "Success", api.describe(DAG_ID, run_id)
        task_count = len(api.task_instances(DAG_ID, run_id))
        expect(page.locator("[data-testid=table-cell-state] [data-testid=state-badge]", has_text="Success")) \
            .to_have_count(task_count, timeout=60_000)  # the run page's task table catches up too
        screenshot(page, "1-run-success")
        run = api.run(DAG_ID, run_id)
        assert run["state"] == "success" and run["conf"] == {"start": WINDOW[0], "end": WINDOW[1],
                                                               "symbols": ["BTCUSDT"]}
        truth = assert_raw_equals_truth(sandbox, standalone.settings.raw_data_dir, "1h", "BTCUSDT",
                                        to_ms(WINDOW[0]), to_ms(WINDOW[1]))

        # A malformed symbol: the dialog shows the validation error, stays open, and no run is created.
        runs_before = {r["dag_run_id"] for r in api.runs(DAG_ID)}
        open_trigger_form(page, base, *WINDOW, symbols="btc-usdt")
        page.get_by_test_id("trigger-dag-submit").click()
        dialog = page.get_by_role("dialog").filter(has=page.get_by_test_id("trigger-dag-submit"))
        expect(dialog.get_by_text("Invalid input for param symbols")).to_be_visible(timeout=60_000)
        expect(dialog.get_by_text(re.compile(r"'btc-usdt' does not match"))).to_be_visible()
        screenshot(page, "2-malformed-symbol-refused")
        assert page.url.endswith(f"/dags/{DAG_ID}")
        assert {r["dag_run_id"] for r in api.runs(DAG_ID)} == runs_before

        # The fetch log of the run names its window, half-open, in UTC, and the candles it got.
        page.goto(f"{base}/dags/{DAG_ID}/runs/{run_id}/tasks/fetch/mapped/0")
        line = page.locator("[data-testid^=virtualized-item-]", has_text="fetch done")
        expect(line.locator("[data-key=window] [data-value]")).to_have_text(
            f"[{WINDOW[0]}T00:00:00+00:00, {WINDOW[1]}T00:00:00+00:00)")
        expect(line.locator("[data-key=candles] [data-value]")).to_have_text(str(len(truth)))
        screenshot(page, "3-fetch-log-window")

    assert api.failed_tries() == []
