"""BinanceHook over real HTTP against the Binance sandbox: contract, data, validation, faults,
rate limiting and metrics.

No request is mocked: every call goes through ``requests`` to a ``SandboxServer`` on 127.0.0.1
(the session one from ``tests/conftest.py``, or a private one when a test needs its own budget,
clock or client state). Timeouts and backoff are tiny so the whole file runs in seconds.
"""

from __future__ import annotations

import json
import re
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import datetime, timedelta, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import requests
import structlog

from binance_provider.hooks.binance import (
    BinanceAPIError,
    BinanceBanned,
    BinanceHook,
    BinanceRateLimited,
    BinanceUnavailable,
    KlinePage,
    RejectedRow,
    ResponseMeta,
)
from include.binance_sandbox import SandboxServer
from include.market_data.config import DEFAULT_BINANCE_HOST, Settings

KLINES = "/api/v3/klines"
MINUTE_MS = 60_000
HOUR_MS = 60 * MINUTE_MS
DAY_MS = 24 * HOUR_MS
HISTORY_START_MS = 1_502_928_000_000  # 2017-08-17 00:00 UTC, BTCUSDT's first day
# A fixed clock for private sandboxes whose answers must not move while a test runs.
FIXED_NOW_MS = 1_780_000_030_000  # 2026-05-28T20:27:10Z


def ms(text: str) -> int:
    """ISO-8601 (naive = UTC) to epoch ms."""
    moment = datetime.fromisoformat(text)
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=timezone.utc)
    return int(moment.timestamp() * 1000)


def now_ms() -> int:
    return int(time.time() * 1000)


def make_hook(settings: Settings | None = None, **options) -> BinanceHook:
    """A hook with small timeouts and backoff (tests must stay fast)."""
    defaults = dict(timeout_s=10.0, max_tries=4, backoff_factor_s=0.01, backoff_cap_s=0.05)
    defaults.update(options)
    return BinanceHook(settings=settings if settings is not None else Settings(), **defaults)


def point_conn_at(monkeypatch: pytest.MonkeyPatch, url: str) -> None:
    monkeypatch.setenv("AIRFLOW_CONN_BINANCE_DEFAULT", json.dumps({"conn_type": "http", "host": url}))


def settled_stats(server: SandboxServer, total: int | None = None) -> dict:
    """The sandbox's counters once they stop moving.

    The sandbox counts a request just after writing its answer, so a client can see the answer
    a moment before the counter moves: wait for ``total`` requests (if given), then until two
    reads 30 ms apart agree.
    """
    deadline = time.monotonic() + 5
    snapshot = server.stats()
    while total is not None and snapshot["requests"] < total and time.monotonic() < deadline:
        time.sleep(0.005)
        snapshot = server.stats()
    while True:
        time.sleep(0.03)
        again = server.stats()
        if again["requests"] == snapshot["requests"] or time.monotonic() > deadline:
            return again
        snapshot = again


def requests_to(server: SandboxServer, endpoint: str | None = None, total: int | None = None) -> int:
    """Requests the sandbox answered (settled), all or to one endpoint."""
    snapshot = settled_stats(server, total)
    if endpoint is None:
        return snapshot["requests"]
    return snapshot["by_endpoint"].get(endpoint, 0)


@contextmanager
def private_sandbox(monkeypatch: pytest.MonkeyPatch, **options) -> Iterator[SandboxServer]:
    """A second sandbox (own limiter, clock and faults) that ``binance_default`` points at."""
    options.setdefault("seed", 42)
    with SandboxServer(host="127.0.0.1", port=0, **options) as server:
        point_conn_at(monkeypatch, server.url)
        yield server


class _ScriptedHandler(BaseHTTPRequestHandler):
    timeout = 5  # a client that stops talking cannot hold a handler thread

    def log_message(self, format, *args):  # noqa: A002 - BaseHTTPRequestHandler's signature
        pass

    def do_GET(self):
        owner: ScriptedServer = self.server.owner
        with owner.lock:
            step = owner.script.pop(0) if owner.script else None
        if step is None:
            upstream = requests.get(owner.upstream + self.path, timeout=5)
            status, body = upstream.status_code, upstream.content
            headers = {k: v for k, v in upstream.headers.items() if k in ("Content-Type", "X-MBX-USED-WEIGHT-1M")}
            if owner.rewrite is not None and status == 200:
                body = json.dumps(owner.rewrite(upstream.json())).encode()
        else:
            status, headers, body = step
        with owner.lock:  # counted before the answer goes out: a client never sees it first
            owner.answered.append(status)
        self.send_response(status)
        for name, value in headers.items():
            self.send_header(name, str(value))
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


class ScriptedServer:
    """A narrow HTTP server on 127.0.0.1 in front of a sandbox, for answers the sandbox cannot
    inject: the first requests get ``script``'s ``(status, headers, body)`` in turn, the rest are
    forwarded to ``upstream`` (JSON bodies passed through ``rewrite`` when given). ``answered``
    lists the status of every answer."""

    def __init__(self, upstream: str, script: list[tuple[int, dict, bytes]] = (),
                 rewrite: Callable[[list], list] | None = None) -> None:
        self.upstream = upstream
        self.script = list(script)
        self.rewrite = rewrite
        self.answered: list[int] = []
        self.lock = threading.Lock()
        self._httpd: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        host, port = self._httpd.server_address[:2]
        return f"http://{host}:{port}"

    def __enter__(self) -> ScriptedServer:
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), _ScriptedHandler)
        self._httpd.daemon_threads = True
        self._httpd.owner = self
        self._thread = threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05},
                                        name="scripted-binance", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        try:
            self._httpd.shutdown()
        finally:
            self._httpd.server_close()
            self._thread.join(timeout=5)


@contextmanager
def scripted(monkeypatch: pytest.MonkeyPatch, upstream: SandboxServer, script=(),
             rewrite=None) -> Iterator[ScriptedServer]:
    """A :class:`ScriptedServer` in front of ``upstream`` that ``binance_default`` points at."""
    with ScriptedServer(upstream.url, script, rewrite) as server:
        point_conn_at(monkeypatch, server.url)
        yield server


# What Binance's WAF (CloudFront) answers when it blocks a request.
WAF_403 = (403, {"Content-Type": "text/html"},
           b"<html><head><title>403 Forbidden</title></head><body><h1>403 Forbidden</h1></body></html>")
GAVE_UP = re.compile(r"gave up after (\d+) attempts? in (\d+\.\d) s")


def gave_up(error: BaseException) -> tuple[int, float]:
    """(attempts, seconds) from a final error's message."""
    found = GAVE_UP.search(str(error))
    assert found, f"no attempt count and duration in {str(error)!r}"
    return int(found.group(1)), float(found.group(2))


@pytest.fixture
def sb(clean_sandbox, monkeypatch):
    """The session sandbox, clean, with ``binance_default`` pointing at it."""
    settled_stats(clean_sandbox)  # a previous test's last answer may still be being counted
    clean_sandbox.reset_stats()
    point_conn_at(monkeypatch, clean_sandbox.url)
    return clean_sandbox


class Metrics:
    """What the hook sent to Airflow's stats backend."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, str, tuple]] = []

    def names(self, kind: str | None = None) -> list[str]:
        return [name for k, name, _ in list(self.calls) if kind is None or k == kind]

    def values(self, kind: str, name: str) -> list:
        return [args[0] for k, n, args in list(self.calls) if k == kind and n == name]

    def count(self, name: str) -> int:
        return self.names().count(name)


@pytest.fixture
def metrics(monkeypatch) -> Metrics:
    """Replace incr/timing/gauge of ``airflow.sdk.observability.stats`` with a recorder."""
    from airflow.sdk.observability import stats

    recorder = Metrics()
    for kind in ("incr", "timing", "gauge"):
        def record(name, *args, _kind=kind, **kwargs):
            recorder.calls.append((_kind, name, args))

        monkeypatch.setattr(stats, kind, record)
    return recorder


# -- class contract and connection ---------------------------------------------------------------


def test_class_attributes_follow_the_provider_contract():
    assert BinanceHook.conn_name_attr == "binance_conn_id"
    assert BinanceHook.default_conn_name == "binance_default"
    assert BinanceHook.conn_type == "http"
    assert BinanceHook.hook_name == "Binance"
    from airflow.providers.http.hooks.http import HttpHook

    assert issubclass(BinanceHook, HttpHook)


def test_method_is_get_even_if_post_is_asked(sb):
    assert make_hook().method == "GET"
    assert BinanceHook(settings=Settings(), method="POST").method == "GET"


def test_missing_connection_falls_back_to_the_public_data_host(monkeypatch):
    monkeypatch.delenv("AIRFLOW_CONN_BINANCE_DEFAULT", raising=False)
    hook = make_hook()
    # Only resolve the host: nothing is sent to Binance.
    assert hook.source == DEFAULT_BINANCE_HOST == "https://data-api.binance.vision"
    assert hook.base_url == DEFAULT_BINANCE_HOST
    assert hook.url_from_endpoint("/api/v3/ping") == "https://data-api.binance.vision/api/v3/ping"
    assert hook.limiter is BinanceHook(settings=Settings()).limiter  # shared per host


def test_connection_host_is_used(sb):
    hook = make_hook()
    assert hook.source == sb.url
    assert hook.test_connection()[0] is True
    assert requests_to(sb, "/api/v3/ping", total=1) == 1


@pytest.mark.parametrize("form", ["uri", "host_and_port"])
def test_other_connection_forms(monkeypatch, sb, form):
    if form == "uri":
        value = sb.url
    else:
        value = json.dumps({"conn_type": "http", "host": sb.host, "port": sb.port, "schema": "http"})
    monkeypatch.setenv("AIRFLOW_CONN_BINANCE_DEFAULT", value)
    hook = make_hook()
    assert hook.source == sb.url
    assert hook.ping().source == sb.url


def test_named_connection(monkeypatch, sb):
    monkeypatch.setenv("AIRFLOW_CONN_MY_BINANCE", json.dumps({"conn_type": "http", "host": sb.url}))
    monkeypatch.delenv("AIRFLOW_CONN_BINANCE_DEFAULT")
    hook = BinanceHook("my_binance", settings=Settings(), timeout_s=5)
    assert hook.binance_conn_id == "my_binance"
    assert hook.source == sb.url
    hook.ping()
    assert requests_to(sb, total=1) == 1


# -- simple endpoints and ResponseMeta -------------------------------------------------------------


def _check_meta(meta: ResponseMeta, server: SandboxServer, endpoint: str, used_weight: int) -> None:
    assert meta.source == server.url
    assert meta.endpoint == endpoint
    assert meta.status == 200
    assert meta.retries == 0
    assert isinstance(meta.latency_ms, float) and 0 < meta.latency_ms < 5_000
    fetched = datetime.fromisoformat(meta.fetched_at)
    assert fetched.utcoffset() == timedelta(0)
    assert abs((datetime.now(timezone.utc) - fetched).total_seconds()) < 5
    assert meta.used_weight == used_weight


def test_endpoints_return_values_and_provenance(monkeypatch):
    # A private sandbox with a frozen clock and an endless weight window: answers and the
    # X-MBX-USED-WEIGHT-1M running total are exact.
    with private_sandbox(monkeypatch, now_ms=FIXED_NOW_MS, window_s=1e9) as server:
        hook = make_hook()

        meta = hook.ping()
        _check_meta(meta, server, "/api/v3/ping", used_weight=1)

        server_ms, meta = hook.server_time()
        assert server_ms == FIXED_NOW_MS
        _check_meta(meta, server, "/api/v3/time", used_weight=2)

        price, meta = hook.ticker_price("BTCUSDT")
        raw = requests.get(server.url + "/api/v3/ticker/price", params={"symbol": "BTCUSDT"}, timeout=5)
        assert price == raw.json()
        assert set(price) == {"symbol", "price"} and price["symbol"] == "BTCUSDT"
        assert isinstance(price["price"], str) and float(price["price"]) > 0
        _check_meta(meta, server, "/api/v3/ticker/price", used_weight=4)  # 2 + 2; the raw GET adds 2 more

        ticker, meta = hook.ticker_24hr("ETHUSDT")
        raw24 = requests.get(server.url + "/api/v3/ticker/24hr", params={"symbol": "ETHUSDT"}, timeout=5)
        assert ticker == raw24.json()
        assert ticker["symbol"] == "ETHUSDT" and isinstance(ticker["lastPrice"], str)
        _check_meta(meta, server, "/api/v3/ticker/24hr", used_weight=8)

        info, meta = hook.exchange_info()
        assert {s["symbol"] for s in info["symbols"]} == {"BTCUSDT", "ETHUSDT"}
        assert info["serverTime"] == FIXED_NOW_MS
        _check_meta(meta, server, "/api/v3/exchangeInfo", used_weight=30)  # +2 raw, +20

        one, meta = hook.exchange_info("BTCUSDT")
        assert [s["symbol"] for s in one["symbols"]] == ["BTCUSDT"]
        assert meta.used_weight == 50

        # The limiter learned the server's count, including weight this hook did not send.
        assert hook.limiter.used() >= 50
        assert settled_stats(server, total=8)["by_status"] == {"200": 8}


def test_run_returns_the_response_and_needs_a_weight_for_unknown_endpoints(sb):
    hook = make_hook()
    start = ms("2024-03-01")
    response = hook.run(KLINES, {"symbol": "BTCUSDT", "interval": "1h", "startTime": start, "limit": 5})
    assert response.status_code == 200
    assert response.json() == sb.truth("BTCUSDT", "1h", start, start + 5 * HOUR_MS)
    with pytest.raises(ValueError, match="no known request weight"):
        hook.run("/api/v3/avgPrice", {"symbol": "BTCUSDT"})
    assert requests_to(sb, total=1) == 1
    with pytest.raises(BinanceAPIError) as caught:
        hook.run("/api/v3/avgPrice", {"symbol": "BTCUSDT"}, weight=2)
    assert caught.value.status == 404 and type(caught.value) is BinanceAPIError
    assert requests_to(sb, total=2) == 2


# -- klines data --------------------------------------------------------------------------------------


def test_klines_rows_equal_the_truth_exactly(sb):
    hook = make_hook()
    start, end = ms("2021-05-10"), ms("2021-05-10T12:00")
    page = hook.klines("BTCUSDT", "15m", start, end)
    assert isinstance(page, KlinePage)
    truth = sb.truth("BTCUSDT", "15m", start, end)
    assert len(truth) == 48
    assert page.rows == truth
    assert (page.symbol, page.interval, page.start_ms, page.end_ms, page.dropped_open) == ("BTCUSDT", "15m", start, end, 0)
    for row in page.rows:
        assert len(row) == 12
        assert all(type(row[i]) is str for i in (1, 2, 3, 4, 5, 7, 9, 10, 11))  # decimal strings untouched
        assert all(type(row[i]) is int for i in (0, 6, 8))
    assert page.meta.endpoint == KLINES and page.meta.source == sb.url
    assert requests_to(sb, KLINES, total=1) == 1


def test_klines_window_is_half_open_and_snaps_to_the_grid(sb):
    hook = make_hook()
    t = ms("2022-06-01T06:00")
    page = hook.klines("BTCUSDT", "1h", t, t + 3 * HOUR_MS)
    assert [r[0] for r in page.rows] == [t, t + HOUR_MS, t + 2 * HOUR_MS]  # the candle opening at end is not in
    misaligned = hook.klines("BTCUSDT", "1h", t + 30 * MINUTE_MS, t + 3 * HOUR_MS)
    assert misaligned.rows == page.rows[1:]
    limited = hook.klines("BTCUSDT", "1h", t, t + 3 * HOUR_MS, limit=2)
    assert limited.rows == page.rows[:2]


@pytest.mark.parametrize(
    ("interval", "start", "end", "expected_rows"),
    [
        ("15m", "2024-01-31T22:00", "2024-02-01T02:00", 16),  # UTC midnight and month end
        ("1h", "2023-12-31T20:00", "2024-01-01T04:00", 8),  # year end
        ("4h", "2024-02-28T00:00", "2024-03-02T00:00", 18),  # leap day, month end
        ("1d", "2024-01-29", "2024-02-04", 6),
        ("1w", "2023-12-18", "2024-01-15", 4),  # Monday-opened weeks across the year
    ],
)
def test_window_across_midnight_and_month_boundaries(sb, interval, start, end, expected_rows):
    hook = make_hook()
    start_ms, end_ms = ms(start), ms(end)
    page = hook.klines("BTCUSDT", interval, start_ms, end_ms)
    assert page.rows == sb.truth("BTCUSDT", interval, start_ms, end_ms)
    assert len(page.rows) == expected_rows
    opens = [r[0] for r in page.rows]
    step = opens[1] - opens[0]
    assert all(b - a == step for a, b in zip(opens, opens[1:]))
    assert all(r[6] == r[0] + step - 1 for r in page.rows)
    if interval != "1w":
        assert any(datetime.fromtimestamp(o / 1000, tz=timezone.utc).day == 1
                   and datetime.fromtimestamp(o / 1000, tz=timezone.utc).hour == 0 for o in opens)


def _pages_key(pages: list[KlinePage]) -> list[tuple]:
    return [(p.start_ms, p.end_ms, p.rows, p.dropped_open) for p in pages]


def _check_pages(pages: list[KlinePage], start_ms: int, end_ms: int, step_ms: int) -> list[list]:
    assert pages[0].start_ms == start_ms and pages[-1].end_ms == end_ms
    assert all(a.end_ms == b.start_ms for a, b in zip(pages, pages[1:]))  # contiguous windows
    rows = [row for page in pages for row in page.rows]
    opens = [r[0] for r in rows]
    assert all(b - a == step_ms for a, b in zip(opens, opens[1:]))  # contiguous, in time order, no dupes
    assert all(len(page.rows) <= 1000 for page in pages)
    return rows


def test_iter_klines_full_daily_history(sb):
    hook = make_hook()
    end = now_ms()
    pages = list(hook.iter_klines("BTCUSDT", "1d", HISTORY_START_MS, end, concurrency=1))
    assert len(pages) >= 4
    rows = _check_pages(pages, HISTORY_START_MS, end, DAY_MS)
    assert rows[0][0] == HISTORY_START_MS
    assert rows == sb.truth("BTCUSDT", "1d", HISTORY_START_MS, end)
    assert rows[-1][6] < end  # today's open candle is not among them...
    assert pages[-1].dropped_open == 1 and sum(p.dropped_open for p in pages) == 1  # ...but counted
    assert requests_to(sb, KLINES, total=len(pages)) == len(pages)

    concurrent = list(hook.iter_klines("BTCUSDT", "1d", HISTORY_START_MS, end, concurrency=4, now_ms=end))
    assert _pages_key(concurrent) == _pages_key(pages)


def test_iter_klines_multi_year_hourly_sequential_and_concurrent(sb):
    hook = make_hook()
    start, end = ms("2019-01-01"), ms("2022-01-01")
    sequential = list(hook.iter_klines("BTCUSDT", "1h", start, end, concurrency=1))
    assert len(sequential) == 27  # 26 304 hours in pages of 1000
    rows = _check_pages(sequential, start, end, HOUR_MS)
    assert len(rows) == 26_304
    assert rows == sb.truth("BTCUSDT", "1h", start, end)
    assert all(p.dropped_open == 0 for p in sequential)

    # Random latency makes responses finish out of order; pages still come back in order.
    sb.set_faults({"jitter_ms": 40})
    settled_stats(sb)
    sb.reset_stats()
    concurrent = list(hook.iter_klines("BTCUSDT", "1h", start, end, concurrency=4))
    assert _pages_key(concurrent) == _pages_key(sequential)
    assert requests_to(sb, KLINES, total=27) == 27


def test_iter_klines_stops_fetching_when_the_caller_stops(sb):
    hook = make_hook()
    start = ms("2020-01-01")
    pages = hook.iter_klines("BTCUSDT", "1m", start, start + 40_000 * MINUTE_MS, concurrency=2)
    first = next(pages)
    assert first.rows == sb.truth("BTCUSDT", "1m", start, start + 1000 * MINUTE_MS)
    pages.close()  # drops the queued pages, waits for those in flight
    sent = requests_to(sb, KLINES)
    assert sent <= 2 * 2 + 1  # read-ahead is bounded by twice the concurrency
    time.sleep(0.1)
    assert requests_to(sb, KLINES) == sent  # nothing more after close


def test_iter_klines_uses_settings_concurrency_and_validates_it(sb):
    hook = make_hook(settings=Settings(max_concurrency=3))
    start = ms("2020-01-01")
    pages = list(hook.iter_klines("BTCUSDT", "1m", start, start + 2500 * MINUTE_MS))
    assert [len(p.rows) for p in pages] == [1000, 1000, 500]
    for bad in (0, -1, True, 1.5):
        with pytest.raises(ValueError, match="concurrency"):
            hook.iter_klines("BTCUSDT", "1m", start, start + MINUTE_MS, concurrency=bad)


def test_open_candle_is_dropped_and_counted(sb):
    hook = make_hook()
    today = now_ms() // DAY_MS * DAY_MS
    start, end = today - 5 * DAY_MS, today + DAY_MS  # the window reaches past now
    page = hook.klines("BTCUSDT", "1d", start, end)
    assert page.dropped_open == 1
    assert len(page.rows) == 5 and page.rows[-1][0] == today - DAY_MS
    assert page.rows[-1][6] < now_ms()
    assert page.rows == sb.truth("BTCUSDT", "1d", start, end)

    # The same with the hour grid, and with an explicit clock: candles with close_time >= now_ms are open.
    hour = now_ms() // HOUR_MS * HOUR_MS
    page = hook.klines("BTCUSDT", "1h", hour - 3 * HOUR_MS, hour + HOUR_MS)
    assert page.dropped_open == 1 and page.rows[-1][0] == hour - HOUR_MS
    past = hook.klines("BTCUSDT", "1h", hour - 3 * HOUR_MS, hour, now_ms=hour - HOUR_MS)
    assert past.dropped_open == 1 and [r[0] for r in past.rows] == [hour - 3 * HOUR_MS, hour - 2 * HOUR_MS]


# -- value rules: a row that breaks one is dropped and reported, not retried ---------------------


def test_a_row_breaking_a_value_rule_is_dropped_and_reported_without_retry(sb, monkeypatch, metrics):
    start = ms("2024-04-02")
    end = start + 8 * HOUR_MS
    truth = sb.truth("BTCUSDT", "1h", start, end)
    bad_open = truth[3][0]

    def taker_above_volume(rows: list) -> list:
        for row in rows:
            if row[0] == bad_open:
                row[9] = f"{float(row[5]) + 1:.8f}"  # taker_buy_base_asset_volume > volume
        return rows

    with scripted(monkeypatch, sb, rewrite=taker_above_volume) as server:
        hook = make_hook()
        with structlog.testing.capture_logs() as logs:
            page = hook.klines("BTCUSDT", "1h", start, end)
        assert server.answered == [200]  # no retry: Binance would send the same row again
    assert page.meta.retries == 0 and metrics.count("binance.request.retry") == 0
    assert page.rows == truth[:3] + truth[4:]  # the rest of the page, untouched
    assert page.dropped_open == 0
    (rejected,) = page.rejected
    assert isinstance(rejected, RejectedRow)
    assert rejected.open_time == bad_open
    assert rejected.rules == ("taker_buy_base_within_volume",)
    assert rejected.messages == ("taker_buy_base_asset_volume above volume",)
    assert rejected.row[:9] == truth[3][:9] and float(rejected.row[9]) > float(rejected.row[5])

    warnings = [e for e in logs if e["event"] == "binance kline row rejected"]
    assert len(warnings) == 1
    warning = warnings[0]
    assert warning["log_level"] == "warning"
    assert (warning["symbol"], warning["interval"]) == ("BTCUSDT", "1h")
    assert warning["open_time_ms"] == bad_open
    assert warning["open_time"] == "2024-04-02T03:00:00+00:00"
    assert warning["rules"] == ["taker_buy_base_within_volume"]
    assert warning["values"]["taker_buy_base_asset_volume"] == rejected.row[9]
    assert warning["values"]["volume"] == truth[3][5]


def test_a_structurally_malformed_row_is_still_retried(sb, monkeypatch, metrics):
    start = ms("2024-04-02")
    end = start + 8 * HOUR_MS
    answers = []

    def break_first_answer(rows: list) -> list:
        answers.append(len(rows))
        if len(answers) == 1:
            rows[2][6] += 1  # close_time off by a millisecond: the body is broken, not the market
        return rows

    with scripted(monkeypatch, sb, rewrite=break_first_answer) as server:
        page = make_hook().klines("BTCUSDT", "1h", start, end)
        assert server.answered == [200, 200]
    assert page.meta.retries == 1 and page.rejected == []
    assert page.rows == sb.truth("BTCUSDT", "1h", start, end)
    assert metrics.count("binance.request.error.malformed") == 1


# -- a symbol's first candle ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("interval", "first_open"),
    [
        ("1m", "2017-08-17T04:00"),  # the sandbox's (and Binance's) first BTCUSDT candle
        ("1h", "2017-08-17T04:00"),
        ("1d", "2017-08-17T00:00"),
        ("1w", "2017-08-14T00:00"),  # weeks open on Mondays
    ],
)
def test_first_open_ms_is_the_first_candle_of_the_symbol(sb, interval, first_open):
    hook = make_hook()
    first = hook.first_open_ms("BTCUSDT", interval)
    assert first == ms(first_open)
    assert first == sb.truth("BTCUSDT", interval, 0, first + 1)[0][0]
    assert requests_to(sb, KLINES, total=1) == 1


def test_first_open_ms_weight_retries_and_errors(monkeypatch, metrics):
    # Frozen clock and endless weight window: the weight used is exact.
    with private_sandbox(monkeypatch, now_ms=FIXED_NOW_MS, window_s=1e9) as server:
        hook = make_hook()
        server.set_faults({"error_next": 1})
        assert hook.first_open_ms("ETHUSDT", "1d") == HISTORY_START_MS
        assert metrics.count("binance.request.retry") == 1  # through the same retry path
        assert settled_stats(server, total=2)["current_window_weight"] == 4  # 2 per klines request
        with pytest.raises(BinanceAPIError) as caught:
            hook.first_open_ms("NOSUCHCOIN", "1d")
        assert caught.value.code == -1121
        with pytest.raises(ValueError, match="interval"):
            hook.first_open_ms("BTCUSDT", "2m")
        assert requests_to(server, total=3) == 3


def test_first_open_ms_is_none_when_binance_has_no_candle(monkeypatch):
    # A sandbox whose clock is before any listing: Binance answers an empty list.
    with private_sandbox(monkeypatch, now_ms=ms("2017-01-01")) as server:
        assert make_hook().first_open_ms("BTCUSDT", "1h") is None
        assert settled_stats(server, total=1)["by_status"] == {"200": 1}


# -- validation before any request -----------------------------------------------------------------


@pytest.mark.parametrize("symbol", ["btcusdt", "../../etc", "", None, "BTC", "BTC USDT"])
def test_bad_symbol_is_refused_without_a_request(sb, symbol):
    hook = make_hook()
    start = ms("2024-01-01")
    expected = f"symbol={symbol!r}"
    with pytest.raises(ValueError) as caught:
        hook.klines(symbol, "1h", start, start + HOUR_MS)
    assert expected in str(caught.value)
    with pytest.raises(ValueError, match="symbol"):
        hook.iter_klines(symbol, "1h", start, start + HOUR_MS)
    with pytest.raises(ValueError, match="symbol"):
        hook.ticker_price(symbol)
    with pytest.raises(ValueError, match="symbol"):
        hook.ticker_24hr(symbol)
    if symbol is not None:
        with pytest.raises(ValueError, match="symbol"):
            hook.exchange_info(symbol)
    assert requests_to(sb, total=0) == 0


@pytest.mark.parametrize("interval", ["2m", "", "1H", "1mo", None])
def test_bad_interval_is_refused_without_a_request(sb, interval):
    hook = make_hook()
    start = ms("2024-01-01")
    with pytest.raises(ValueError) as caught:
        hook.klines("BTCUSDT", interval, start, start + HOUR_MS)
    assert f"interval={interval!r}" in str(caught.value)
    with pytest.raises(ValueError, match="interval"):
        hook.iter_klines("BTCUSDT", interval, start, start + HOUR_MS)
    assert requests_to(sb, total=0) == 0


@pytest.mark.parametrize(
    ("start", "end", "limit", "named"),
    [
        (10, 10, 1000, "start_ms"),
        (20, 10, 1000, "start_ms"),
        (-5, 10, 1000, "start_ms"),
        (1.5, 10, 1000, "start_ms"),
        ("0", 10, 1000, "start_ms"),
        (0, None, 1000, "end_ms"),
        (0, 10, 0, "limit"),
        (0, 10, 1001, "limit"),
        (0, 10, True, "limit"),
    ],
)
def test_bad_window_or_limit_is_refused_without_a_request(sb, start, end, limit, named):
    hook = make_hook()
    with pytest.raises(ValueError, match=named):
        hook.klines("BTCUSDT", "1h", start, end, limit)
    assert requests_to(sb, total=0) == 0


# -- windows given as datetimes (what Airflow hands a task as data_interval_start/end) -------------


def _page_key(page: KlinePage) -> tuple:
    return (page.symbol, page.interval, page.start_ms, page.end_ms, page.rows, page.dropped_open, page.rejected)


def test_aware_datetimes_give_the_same_page_as_epoch_ms(sb):
    import pendulum

    hook = make_hook()
    start, end = datetime(2021, 5, 10, tzinfo=timezone.utc), datetime(2021, 5, 10, 12, tzinfo=timezone.utc)
    by_ms = hook.klines("BTCUSDT", "15m", ms("2021-05-10"), ms("2021-05-10T12:00"))
    by_datetime = hook.klines("BTCUSDT", "15m", start, end)
    by_name = hook.klines("BTCUSDT", "15m", start_ms=start, end_ms=end)
    mixed = hook.klines("BTCUSDT", "15m", start, ms("2021-05-10T12:00"))
    # Airflow's data_interval_start/end are pendulum DateTimes.
    by_pendulum = hook.klines("BTCUSDT", "15m", pendulum.instance(start), pendulum.instance(end))
    assert len(by_ms.rows) == 48
    assert type(by_datetime.start_ms) is int and type(by_datetime.end_ms) is int
    assert (by_datetime.start_ms, by_datetime.end_ms) == (ms("2021-05-10"), ms("2021-05-10T12:00"))
    for page in (by_datetime, by_name, mixed, by_pendulum):
        assert _page_key(page) == _page_key(by_ms)

    pages_by_ms = list(hook.iter_klines("BTCUSDT", "1h", ms("2021-01-01"), ms("2021-03-01"), concurrency=1))
    pages_by_datetime = list(hook.iter_klines(
        "BTCUSDT", "1h", start_ms=datetime(2021, 1, 1, tzinfo=timezone.utc),
        end_ms=datetime(2021, 3, 1, tzinfo=timezone.utc), concurrency=1,
    ))
    assert len(pages_by_ms) == 2  # 1416 hours in pages of 1000
    assert [_page_key(p) for p in pages_by_datetime] == [_page_key(p) for p in pages_by_ms]


def test_non_utc_aware_datetimes_are_converted_exactly(sb):
    hook = make_hook()
    plus_two = timezone(timedelta(hours=2))
    # 12:00+02:00 is 10:00 UTC.
    page = hook.klines("BTCUSDT", "1h", datetime(2024, 1, 31, 12, tzinfo=plus_two),
                       datetime(2024, 1, 31, 15, tzinfo=plus_two))
    start, end = ms("2024-01-31T10:00"), ms("2024-01-31T13:00")
    assert (page.start_ms, page.end_ms) == (start, end)
    assert [row[0] for row in page.rows] == [start, start + HOUR_MS, start + 2 * HOUR_MS]
    assert page.rows == sb.truth("BTCUSDT", "1h", start, end)
    # West of UTC and across midnight: 2024-01-31 20:00-05:00 is 2024-02-01 01:00 UTC.
    minus_five = timezone(timedelta(hours=-5))
    west = hook.klines("BTCUSDT", "1h", datetime(2024, 1, 31, 20, tzinfo=minus_five),
                       datetime(2024, 1, 31, 22, tzinfo=minus_five))
    assert (west.start_ms, west.end_ms) == (ms("2024-02-01T01:00"), ms("2024-02-01T03:00"))
    assert west.rows == sb.truth("BTCUSDT", "1h", ms("2024-02-01T01:00"), ms("2024-02-01T03:00"))
    # Whole milliseconds stay exact; a time between two is rounded up (same open times either way).
    t = datetime(2024, 1, 31, 10, 0, 0, 1000, tzinfo=timezone.utc)
    assert hook.klines("BTCUSDT", "1h", t, t + timedelta(hours=2)).start_ms == start + 1
    assert hook.klines("BTCUSDT", "1h", t - timedelta(microseconds=999), t + timedelta(hours=2)).start_ms == start + 1


@pytest.mark.parametrize("named", ["start_ms", "end_ms"])
@pytest.mark.parametrize("call", ["klines", "iter_klines"])
def test_naive_datetime_is_refused_naming_the_parameter(sb, call, named):
    hook = make_hook()
    window = {"start_ms": datetime(2024, 1, 31, 10, tzinfo=timezone.utc),
              "end_ms": datetime(2024, 1, 31, 12, tzinfo=timezone.utc)}
    window[named] = window[named].replace(tzinfo=None)
    with pytest.raises(ValueError, match=rf"^{named}=.*naive datetime") as caught:
        getattr(hook, call)("BTCUSDT", "1h", **window)
    assert "local time" in str(caught.value)
    with pytest.raises(ValueError, match=rf"^{named}=.*naive datetime"):  # positionally as well
        getattr(hook, call)("BTCUSDT", "1h", window["start_ms"], window["end_ms"])
    assert requests_to(sb, total=0) == 0


def test_datetime_window_is_checked_like_epoch_ms(sb):
    hook = make_hook()
    t = datetime(2024, 1, 31, 10, tzinfo=timezone.utc)
    with pytest.raises(ValueError, match="start_ms=.* must be < end_ms"):
        hook.klines("BTCUSDT", "1h", t, t.astimezone(timezone(timedelta(hours=2))))  # the same instant
    with pytest.raises(ValueError, match="start_ms=.* must be >= 0"):
        hook.klines("BTCUSDT", "1h", datetime(1969, 12, 31, tzinfo=timezone.utc), t)
    with pytest.raises(ValueError, match="end_ms=.*int of epoch milliseconds or a timezone-aware datetime"):
        hook.iter_klines("BTCUSDT", "1h", t, t.date())
    assert requests_to(sb, total=0) == 0


def test_binance_error_is_raised_at_once_without_retry(sb, metrics):
    hook = make_hook()
    start = ms("2024-01-01")
    with pytest.raises(BinanceAPIError) as caught:
        hook.klines("NOSUCHCOIN", "1h", start, start + HOUR_MS)
    error = caught.value
    assert type(error) is BinanceAPIError  # not Unavailable/RateLimited/Banned
    assert (error.status, error.code, error.endpoint) == (400, -1121, KLINES)
    assert "Invalid symbol" in error.msg and "-1121" in str(error)
    assert requests_to(sb, total=1) == 1  # a 4xx is the caller's bug: never retried
    assert metrics.count("binance.request.error.400") == 1
    assert metrics.count("binance.request.retry") == 0

    with pytest.raises(BinanceAPIError) as caught:
        hook.ticker_price("NOSUCHCOIN")
    assert caught.value.code == -1121
    assert requests_to(sb, total=2) == 2


# -- transient faults and retries ------------------------------------------------------------------


def test_5xx_then_success_counts_retries(sb, metrics):
    hook = make_hook()
    sb.set_faults({"error_next": 3})
    start = ms("2023-03-01")
    page = hook.klines("BTCUSDT", "1h", start, start + 24 * HOUR_MS)
    assert page.meta.retries == 3
    assert page.rows == sb.truth("BTCUSDT", "1h", start, start + 24 * HOUR_MS)
    snapshot = settled_stats(sb, total=4)
    assert snapshot["requests"] == 4 and snapshot["by_status"]["200"] == 1
    errors = [n for n in metrics.names("incr") if n.startswith("binance.request.error.")]
    assert len(errors) == 3 and all(n.rsplit(".", 1)[1] in {"500", "502", "503", "504"} for n in errors)
    assert metrics.count("binance.request.retry") == 3
    assert metrics.count("binance.request.count") == 4


def test_hang_past_the_timeout_is_retried(monkeypatch):
    # A private sandbox: a hung handler records its request only when it ends (on stop here),
    # so it cannot leak into another test's counters.
    with private_sandbox(monkeypatch) as server:
        hook = make_hook(timeout_s=0.5)
        server.set_faults({"hang_next": 1, "hang_s": 3})
        started = time.monotonic()
        server_ms, meta = hook.server_time()
        elapsed = time.monotonic() - started
        assert meta.retries == 1
        assert 0.5 <= elapsed < 2.5  # waited for the timeout, not for the hang
        assert abs(server_ms - now_ms()) < 5_000
        assert settled_stats(server, total=1)["by_status"] == {"200": 1}  # the hung one is still hanging


@pytest.mark.parametrize("fault", ["garbage_next", "truncate_next"])
def test_malformed_body_is_retried(sb, metrics, fault):
    hook = make_hook()
    sb.set_faults({fault: 2})
    start = ms("2023-07-01")
    page = hook.klines("BTCUSDT", "4h", start, start + 10 * DAY_MS)
    assert page.meta.retries == 2
    assert page.rows == sb.truth("BTCUSDT", "4h", start, start + 10 * DAY_MS)
    assert requests_to(sb, KLINES, total=3) == 3
    assert metrics.count("binance.request.error.malformed") == 2


def test_retries_exhausted_raise_unavailable(sb, metrics):
    hook = make_hook(max_tries=3)
    sb.set_faults({"error_rate": 1.0})
    start = ms("2023-07-01")
    with pytest.raises(BinanceUnavailable) as caught:
        hook.klines("BTCUSDT", "1h", start, start + HOUR_MS)
    assert caught.value.status in (500, 502, 503, 504)
    assert caught.value.endpoint == KLINES
    assert "3 attempts" in str(caught.value)
    assert requests_to(sb, KLINES, total=3) == 3
    assert metrics.count("binance.request.retry") == 2

    sb.set_faults({"error_rate": 0.0, "garbage_rate": 1.0})
    settled_stats(sb)
    sb.reset_stats()
    with pytest.raises(BinanceUnavailable, match="malformed"):
        hook.ping()
    assert requests_to(sb, total=3) == 3


def test_timeouts_exhausted_raise_unavailable(monkeypatch, metrics):
    with private_sandbox(monkeypatch) as server:
        hook = make_hook(timeout_s=0.3, max_tries=2)
        server.set_faults({"hang_next": 2, "hang_s": 3})
        with pytest.raises(BinanceUnavailable) as caught:
            hook.ping()
        assert caught.value.status is None and "timeout" in str(caught.value)
        assert "2 attempts" in str(caught.value)
        assert server.faults()["hang_next"] == 0  # both attempts reached the server
        assert metrics.count("binance.request.error.timeout") == 2
        assert metrics.count("binance.request.retry") == 1


def test_connection_refused_is_unavailable(monkeypatch):
    with SandboxServer(port=0) as server:
        url = server.url
    point_conn_at(monkeypatch, url)  # nothing listens there any more
    hook = make_hook(max_tries=2, timeout_s=0.5)
    with pytest.raises(BinanceUnavailable, match="connection"):
        hook.ping()


# -- 429 and 418 ------------------------------------------------------------------------------------


def test_429_waits_retry_after_then_succeeds(monkeypatch, metrics):
    with private_sandbox(monkeypatch) as server:
        hook = make_hook()
        server.set_faults({"storm_429": 1, "retry_after_s": 1})
        start = ms("2024-05-01")
        started = time.monotonic()
        page = hook.klines("BTCUSDT", "1h", start, start + 6 * HOUR_MS)
        elapsed = time.monotonic() - started
        assert elapsed >= 1.0 - 0.05  # honoured Retry-After
        assert page.meta.retries == 1
        assert page.rows == server.truth("BTCUSDT", "1h", start, start + 6 * HOUR_MS)
        snapshot = settled_stats(server, total=2)
        # The sandbox bans a client that comes back before Retry-After: it did not.
        assert snapshot["by_status"] == {"429": 1, "200": 1}
        assert metrics.count("binance.rate_limited") == 1
        assert metrics.count("binance.request.error.429") == 1
        assert metrics.count("binance.request.retry") == 1


def test_429_pause_holds_every_thread_and_every_hook_of_the_host(monkeypatch):
    with private_sandbox(monkeypatch) as server:
        server.set_faults({"storm_429": 1, "retry_after_s": 2, "endpoints": ["/api/v3/time"]})
        first_hook = make_hook()
        outcome: dict = {}

        def rate_limited_call():
            outcome["time"] = first_hook.server_time()

        caller = threading.Thread(target=rate_limited_call)
        caller.start()
        deadline = time.monotonic() + 5
        while first_hook.limiter.paused_until is None and time.monotonic() < deadline:
            time.sleep(0.005)
        paused_until = first_hook.limiter.paused_until
        assert paused_until is not None and settled_stats(server, total=1)["rate_limited_429"] == 1

        # Another hook for the same host, in this thread: it must not send before the pause ends.
        other_hook = make_hook()
        meta = other_hook.ping()
        assert time.time() >= paused_until - 0.01
        assert meta.retries == 0
        caller.join(timeout=10)
        assert outcome["time"][1].retries == 1
        assert settled_stats(server, total=3)["by_status"] == {"429": 1, "200": 2}  # no 418 for hammering


def test_429_storm_outlasting_the_retries_raises_rate_limited(monkeypatch):
    with private_sandbox(monkeypatch) as server:
        hook = make_hook(max_tries=2)
        server.set_faults({"storm_429": 5, "retry_after_s": 1})
        started = time.monotonic()
        with pytest.raises(BinanceRateLimited) as caught:
            hook.ping()
        assert time.monotonic() - started >= 0.95
        assert caught.value.status == 429 and caught.value.code == -1003
        assert settled_stats(server, total=2)["by_status"] == {"429": 2}


def test_418_bans_and_later_calls_send_nothing(sb, metrics):
    hook = make_hook()
    sb.set_faults({"ban_418": 1, "ban_s": 30})
    before = time.time()
    with pytest.raises(BinanceBanned) as caught:
        hook.ping()
    ban = caught.value
    assert ban.status == 418 and ban.code == -1003
    assert ban.until > datetime.now(timezone.utc) + timedelta(seconds=25)
    assert ban.until_ms == pytest.approx((before + 30) * 1000, abs=2_000)
    assert requests_to(sb, total=1) == 1
    assert metrics.count("binance.banned") == 1
    assert metrics.count("binance.request.error.418") == 1

    sb.clear_faults()
    settled_stats(sb)
    sb.reset_stats()
    start = ms("2024-01-01")
    for call in (hook.ping, lambda: hook.klines("BTCUSDT", "1h", start, start + HOUR_MS),
                 lambda: list(hook.iter_klines("BTCUSDT", "1h", start, start + 5000 * HOUR_MS, concurrency=4)),
                 make_hook().server_time):  # a new hook for the same host is banned too
        with pytest.raises(BinanceBanned) as again:
            call()
        assert again.value.until_ms == ban.until_ms
        assert again.value.until > datetime.now(timezone.utc)
    assert requests_to(sb, total=0) == 0  # nothing was sent while banned
    assert metrics.count("binance.request.count") == 1


# -- one retry budget: 429s and transient failures share max_tries and max_time_s -------------------


def test_one_retry_budget_counts_429s_and_5xx_together(monkeypatch, metrics):
    with private_sandbox(monkeypatch) as server:
        hook = make_hook(max_tries=4)
        server.set_faults({"storm_429": 2, "retry_after_s": 1, "error_rate": 1.0})  # 429, 429, then 5xx
        started = time.monotonic()
        with pytest.raises(BinanceUnavailable) as caught:
            hook.klines("BTCUSDT", "1h", ms("2024-05-01"), ms("2024-05-02"))
        elapsed = time.monotonic() - started
        snapshot = settled_stats(server, total=4)
        assert snapshot["requests"] == 4  # four attempts in all, not four of each kind
        assert snapshot["by_status"].get("429") == 2
        assert sum(n for status, n in snapshot["by_status"].items() if status.startswith("5")) == 2
        attempts, seconds = gave_up(caught.value)
        assert attempts == 4 and "max_tries=4" in str(caught.value)
        assert 1.9 <= seconds <= elapsed + 0.05  # both Retry-Afters were honoured, and counted
        assert caught.value.status in (500, 502, 503, 504)
        assert metrics.count("binance.request.retry") == 3
        assert metrics.count("binance.request.count") == 4


def test_a_budget_ending_on_a_429_raises_rate_limited(sb, monkeypatch, metrics):
    script = [(503, {}, b"Service Unavailable"), WAF_403,
              (429, {"Retry-After": "1", "Content-Type": "application/json"},
               b'{"code":-1003,"msg":"Too much request weight used."}')]
    with scripted(monkeypatch, sb, script) as server:
        hook = make_hook(max_tries=3)
        with pytest.raises(BinanceRateLimited) as caught:
            hook.server_time()
        assert server.answered == [503, 403, 429]
    error = caught.value
    assert (error.status, error.code) == (429, -1003)
    attempts, seconds = gave_up(error)
    assert attempts == 3 and seconds < 1.0  # gave up at once: no attempt was left to wait for
    assert metrics.count("binance.request.retry") == 2
    assert requests_to(sb) == 0


def test_max_time_s_bounds_transient_retries(sb, metrics):
    hook = make_hook(max_tries=1000, max_time_s=0.5, backoff_factor_s=0.02, backoff_cap_s=0.05)
    sb.set_faults({"error_rate": 1.0})
    started = time.monotonic()
    with pytest.raises(BinanceUnavailable) as caught:
        hook.ping()
    elapsed = time.monotonic() - started
    attempts, seconds = gave_up(caught.value)
    assert "max_time_s=0.5" in str(caught.value)
    assert elapsed < 0.5 + 0.3  # the budget, plus at most one request that started inside it
    assert 0.4 <= seconds <= elapsed + 0.05
    assert 3 <= attempts < 1000
    assert requests_to(sb, "/api/v3/ping", total=attempts) == attempts
    assert metrics.count("binance.request.retry") == attempts - 1


def test_max_time_s_stops_before_a_retry_after_that_ends_past_it(monkeypatch):
    with private_sandbox(monkeypatch) as server:
        hook = make_hook(max_tries=5, max_time_s=1.0)
        server.set_faults({"storm_429": 5, "retry_after_s": 2})
        started = time.monotonic()
        with pytest.raises(BinanceRateLimited) as caught:
            hook.ping()
        elapsed = time.monotonic() - started
        # Waiting 2 s for Retry-After cannot fit in a 1 s budget: no second attempt, no wait.
        assert elapsed < 0.5
        assert gave_up(caught.value)[0] == 1 and "max_time_s=1" in str(caught.value)
        assert settled_stats(server, total=1)["by_status"] == {"429": 1}
        assert hook.limiter.paused_until is not None  # other threads still honour the Retry-After


def test_403_is_transient_and_retried_until_it_clears(sb, monkeypatch, metrics):
    start = ms("2023-03-01")
    with scripted(monkeypatch, sb, [WAF_403, WAF_403]) as server:
        hook = make_hook()
        page = hook.klines("BTCUSDT", "1h", start, start + 24 * HOUR_MS)
        assert server.answered == [403, 403, 200]
    assert page.meta.retries == 2
    assert page.rows == sb.truth("BTCUSDT", "1h", start, start + 24 * HOUR_MS)
    assert metrics.count("binance.request.error.403") == 2
    assert metrics.count("binance.request.retry") == 2
    assert requests_to(sb, KLINES, total=1) == 1


def test_403_outlasting_the_budget_raises_unavailable(sb, monkeypatch, metrics):
    with scripted(monkeypatch, sb, [WAF_403] * 10) as server:
        hook = make_hook(max_tries=3)
        with pytest.raises(BinanceUnavailable) as caught:
            hook.ticker_price("BTCUSDT")
        assert server.answered == [403, 403, 403]
    error = caught.value
    assert error.status == 403 and type(error) is BinanceUnavailable
    assert "HTTP 403" in str(error) and gave_up(error)[0] == 3
    assert metrics.count("binance.request.retry") == 2
    assert requests_to(sb) == 0


# -- the weight limiter under concurrent use ---------------------------------------------------------


def test_concurrent_klines_stay_under_the_weight_budget(monkeypatch):
    # Sandbox limit 40 per 1 s window; the hook allows itself 80 % of it (32 = 16 klines calls).
    with private_sandbox(monkeypatch, weight_limit=40, window_s=1.0) as server:
        settings = Settings(rate_limit_weight=40, rate_limit_window_s=1.0, rate_limit_safety=0.8)
        hook = make_hook(settings=settings)
        assert hook.limiter.budget == 32
        start = ms("2024-02-01")
        server.truth("BTCUSDT", "1h", start, start + DAY_MS)  # warm the synthetic data
        threads, calls_each = 8, 6
        metas: list[ResponseMeta] = []
        errors: list[BaseException] = []
        barrier = threading.Barrier(threads)

        def worker(index: int) -> None:
            barrier.wait()
            try:
                for call in range(calls_each):
                    offset = ((index * calls_each + call) % 20) * HOUR_MS
                    metas.append(hook.klines("BTCUSDT", "1h", start + offset, start + offset + 4 * HOUR_MS).meta)
            except BaseException as exc:  # noqa: BLE001 - reported below
                errors.append(exc)

        pool = [threading.Thread(target=worker, args=(i,)) for i in range(threads)]
        started = time.monotonic()
        for thread in pool:
            thread.start()
        for thread in pool:
            thread.join(timeout=20)
        elapsed = time.monotonic() - started
        assert not errors
        assert len(metas) == threads * calls_each
        snapshot = settled_stats(server, total=threads * calls_each)
        assert snapshot["by_status"] == {"200": threads * calls_each}  # never a 429 (or 418)
        assert snapshot["max_window_weight"] <= hook.limiter.budget
        assert max(m.used_weight for m in metas) <= hook.limiter.budget
        assert all(m.retries == 0 for m in metas)
        # 96 weight needs at least three 32-weight windows: the limiter did hold threads back.
        assert elapsed >= 1.0


def test_limiter_counts_weight_other_clients_used(monkeypatch):
    # Another process on the same IP already used most of the window: the hook waits for the next one.
    with private_sandbox(monkeypatch, weight_limit=40, window_s=1.0) as server:
        hook = make_hook(settings=Settings(rate_limit_weight=40, rate_limit_window_s=1.0, rate_limit_safety=0.8))
        # Start early in a window so the setup below lands in a single one.
        time.sleep(1.0 - time.time() % 1.0 + 0.02)
        for _ in range(14):
            assert requests.get(server.url + "/api/v3/ping", timeout=5).status_code == 200
        metas = [hook.ping() for _ in range(25)]  # 14 + 25 = 39 > 32: must spill into the next window
        snapshot = settled_stats(server, total=39)
        assert snapshot["by_status"] == {"200": 39}
        assert snapshot["max_window_weight"] <= 32
        assert metas[0].used_weight == 15
        # The hook stopped at its budget (15 + 17 = 32) and went on in the next window.
        assert [m.used_weight for m in metas[:18]] == list(range(15, 33))
        assert all(m.used_weight <= 7 for m in metas[18:])


# -- metrics --------------------------------------------------------------------------------------


def test_metrics_of_a_successful_request(sb, metrics):
    hook = make_hook()
    meta = hook.ping()
    assert metrics.count("binance.request.count") == 1
    durations = metrics.values("timing", "binance.request.duration")
    assert len(durations) == 1 and durations[0] == pytest.approx(meta.latency_ms)
    assert metrics.values("gauge", "binance.weight_used") == [meta.used_weight]
    assert not [n for n in metrics.names() if n.startswith("binance.request.error") or n in
                ("binance.request.retry", "binance.rate_limited", "binance.banned")]


def test_a_broken_stats_backend_never_breaks_a_request(sb, monkeypatch):
    from airflow.sdk.observability import stats

    def broken(*_args, **_kwargs):
        raise RuntimeError("statsd is down")

    for kind in ("incr", "timing", "gauge"):
        monkeypatch.setattr(stats, kind, broken)
    assert make_hook().ping().status == 200


def test_a_ban_stops_other_processes_and_airflow_retries_too(sb):
    """An Airflow retry is a new process with a fresh limiter: the ban must reach it anyway."""
    import subprocess
    import sys
    import textwrap

    sb.set_faults({"ban_418": 1, "ban_s": 30})
    with pytest.raises(BinanceBanned) as caught:
        make_hook().ping()
    sb.clear_faults()
    settled_stats(sb)
    sb.reset_stats()
    retry = textwrap.dedent("""
        from binance_provider.hooks.binance import BinanceBanned, BinanceHook
        try:
            BinanceHook().ping()
        except BinanceBanned as exc:
            print("banned until", exc.until_ms)
    """)
    result = subprocess.run([sys.executable, "-c", retry], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert f"banned until {caught.value.until_ms}" in result.stdout
    assert requests_to(sb, total=0) == 0  # the other process sent nothing
