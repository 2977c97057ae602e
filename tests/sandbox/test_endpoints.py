"""Shapes, validation errors, weights and headers of every sandbox endpoint."""

from __future__ import annotations

import json
from decimal import Decimal

import pytest
import requests

from include.binance_sandbox import SandboxServer

NOW_MS = 1_780_000_030_000  # 2026-05-28 20:27:10 UTC: mid-minute, so a candle is open
HOUR = 3_600_000
WEIGHT = "X-MBX-USED-WEIGHT-1M"


@pytest.fixture(scope="module")
def server():
    with SandboxServer(now_ms=NOW_MS) as srv:
        yield srv


@pytest.fixture
def get(server):
    """GET an /api/v3 path on a fresh weight window (limits reset), returning the response."""
    session = requests.Session()

    def _get(path, headers=None, **params):
        server.reset_limits()
        return session.get(f"{server.url}/api/v3/{path}", params=params, headers=headers, timeout=10)

    yield _get
    session.close()


def _error(response, status, code):
    assert response.status_code == status, response.text
    assert response.headers["Content-Type"] == "application/json"
    body = response.json()
    assert body["code"] == code, body
    return body["msg"]


@pytest.mark.parametrize(
    "path, params, weight",
    [
        ("ping", {}, 1),
        ("time", {}, 1),
        ("exchangeInfo", {}, 20),
        ("klines", {"symbol": "BTCUSDT", "interval": "1h", "limit": 1000}, 2),
        ("ticker/price", {"symbol": "BTCUSDT"}, 2),
        ("ticker/price", {}, 4),
        ("ticker/24hr", {"symbol": "BTCUSDT"}, 2),
        ("ticker/24hr", {}, 80),
        ("ticker/24hr", {"symbols": '["BTCUSDT","ETHUSDT"]'}, 2),
    ],
)
def test_weights_and_headers(get, path, params, weight):
    response = get(path, **params)
    assert response.status_code == 200
    assert response.headers["Content-Type"] == "application/json"
    assert int(response.headers[WEIGHT]) == weight
    assert int(response.headers["Content-Length"]) == len(response.content)


def test_weight_header_accumulates_and_errors_carry_it(server, get):
    first = get("ping")
    session = requests.Session()
    second = session.get(f"{server.url}/api/v3/klines", params={"symbol": "NOPE", "interval": "1h"})
    third = session.get(f"{server.url}/api/v3/time")
    assert int(first.headers[WEIGHT]) == 1
    assert second.status_code == 400 and int(second.headers[WEIGHT]) == 3
    assert int(third.headers[WEIGHT]) == 4


def test_ping_time(get):
    assert get("ping").json() == {}
    assert get("time").json() == {"serverTime": NOW_MS}
    assert get("time", headers={"X-MBX-TIME-UNIT": "MICROSECOND"}).json() == {"serverTime": NOW_MS * 1000}


def test_unknown_path_is_json_404(get):
    response = get("depthx")
    assert response.status_code == 404
    assert response.headers["Content-Type"] == "application/json"
    assert WEIGHT in response.headers
    assert "code" in response.json()


def test_exchange_info_shape(get):
    body = get("exchangeInfo").json()
    assert body["timezone"] == "UTC" and body["serverTime"] == NOW_MS
    limits = {(r["rateLimitType"], r["interval"]): r for r in body["rateLimits"]}
    assert limits[("REQUEST_WEIGHT", "MINUTE")]["limit"] == 6000
    assert limits[("REQUEST_WEIGHT", "MINUTE")]["intervalNum"] == 1
    assert ("RAW_REQUESTS", "MINUTE") in limits and ("ORDERS", "SECOND") in limits
    symbols = {s["symbol"]: s for s in body["symbols"]}
    assert set(symbols) == {"BTCUSDT", "ETHUSDT"}
    btc = symbols["BTCUSDT"]
    assert (btc["status"], btc["baseAsset"], btc["quoteAsset"]) == ("TRADING", "BTC", "USDT")
    assert btc["isSpotTradingAllowed"] is True and btc["permissionSets"]
    filters = {f["filterType"]: f for f in btc["filters"]}
    assert filters["PRICE_FILTER"]["tickSize"] == "0.01000000"
    assert filters["LOT_SIZE"]["stepSize"] == "0.00001000"
    assert {"NOTIONAL", "MARKET_LOT_SIZE"} <= set(filters)


def test_exchange_info_symbol_filters(get):
    one = get("exchangeInfo", symbol="ETHUSDT").json()
    assert [s["symbol"] for s in one["symbols"]] == ["ETHUSDT"]
    both = get("exchangeInfo", symbols='["BTCUSDT","ETHUSDT"]').json()
    assert [s["symbol"] for s in both["symbols"]] == ["BTCUSDT", "ETHUSDT"]
    _error(get("exchangeInfo", symbol="DOGEUSDT"), 400, -1121)
    _error(get("exchangeInfo", symbols='["BTCUSDT","XXXUSDT"]'), 400, -1121)
    _error(get("exchangeInfo", symbols="BTCUSDT"), 400, -1100)


def test_exchange_info_reports_configured_limit():
    with SandboxServer(now_ms=NOW_MS, weight_limit=1200) as srv:
        body = requests.get(srv.url + "/api/v3/exchangeInfo", timeout=10).json()
    weight = [r for r in body["rateLimits"] if r["rateLimitType"] == "REQUEST_WEIGHT"]
    assert weight == [{"rateLimitType": "REQUEST_WEIGHT", "interval": "MINUTE", "intervalNum": 1, "limit": 1200}]


def test_klines_row_shape(get):
    rows = get("klines", symbol="BTCUSDT", interval="15m", limit=5).json()
    assert len(rows) == 5
    for row in rows:
        assert len(row) == 12
        assert all(isinstance(row[i], int) for i in (0, 6, 8))
        assert all(isinstance(row[i], str) for i in (1, 2, 3, 4, 5, 7, 9, 10, 11))
        for i in (1, 2, 3, 4, 5, 7, 9, 10):
            whole, _, frac = row[i].partition(".")
            assert whole.isdigit() and len(frac) == 8 and frac.isdigit(), row[i]
        assert row[6] == row[0] + 15 * 60_000 - 1
        assert row[11] == "0"


@pytest.mark.parametrize(
    "params, code, fragment",
    [
        ({"interval": "1h"}, -1102, "'symbol'"),
        ({"symbol": "", "interval": "1h"}, -1102, "'symbol'"),
        ({"symbol": "BTCUSDT"}, -1102, "'interval'"),
        ({"symbol": "BTCUSDT", "interval": "1y"}, -1120, "Invalid interval."),
        ({"symbol": "BTCUSDT", "interval": "1s"}, -1120, "Invalid interval."),
        ({"symbol": "XRPUSDT", "interval": "1h"}, -1121, "Invalid symbol."),
        ({"symbol": "BTCUSDT", "interval": "1h", "limit": 1001}, -1130, "'limit'"),
        ({"symbol": "BTCUSDT", "interval": "1h", "limit": 0}, -1130, "'limit'"),
        ({"symbol": "BTCUSDT", "interval": "1h", "limit": "ten"}, -1100, "'limit'"),
        ({"symbol": "BTCUSDT", "interval": "1h", "startTime": "1.5"}, -1100, "'startTime'"),
        ({"symbol": "BTCUSDT", "interval": "1h", "endTime": "2024-01-01"}, -1100, "'endTime'"),
        ({"symbol": "BTCUSDT", "interval": "1h", "timeZone": "25"}, -1130, "'timeZone'"),
        ({"symbol": "btcusdt", "interval": "1h"}, -1100, "'symbol'"),
    ],
)
def test_klines_validation(get, params, code, fragment):
    assert fragment in _error(get("klines", **params), 400, code)


def test_klines_exact_messages(get):
    assert get("klines", interval="1h").json() == {
        "code": -1102,
        "msg": "Mandatory parameter 'symbol' was not sent, was empty/null, or malformed.",
    }
    assert get("klines", symbol="BTCUSDT", interval="1h", limit=5000).json() == {
        "code": -1130, "msg": "Data sent for parameter 'limit' is not valid.",
    }
    assert get("klines", symbol="FOOBAR", interval="1h").json() == {"code": -1121, "msg": "Invalid symbol."}


def test_klines_limits_and_default(get):
    assert len(get("klines", symbol="BTCUSDT", interval="1m").json()) == 500
    assert len(get("klines", symbol="BTCUSDT", interval="1m", limit=1000).json()) == 1000
    assert len(get("klines", symbol="BTCUSDT", interval="1m", limit=1).json()) == 1


def test_klines_selection_semantics(get):
    start = NOW_MS - NOW_MS % HOUR - 100 * HOUR
    end = start + 50 * HOUR
    newest = get("klines", symbol="BTCUSDT", interval="1h", limit=3).json()
    assert newest[-1][0] == NOW_MS - NOW_MS % HOUR  # the open candle is served
    assert newest[-1][6] > NOW_MS

    from_start = get("klines", symbol="BTCUSDT", interval="1h", startTime=start + 1, limit=3).json()
    assert [r[0] for r in from_start] == [start + HOUR, start + 2 * HOUR, start + 3 * HOUR]

    up_to_end = get("klines", symbol="BTCUSDT", interval="1h", endTime=end, limit=3).json()
    assert [r[0] for r in up_to_end] == [end - 2 * HOUR, end - HOUR, end]

    both = get("klines", symbol="BTCUSDT", interval="1h", startTime=start, endTime=end, limit=1000).json()
    assert [r[0] for r in both] == [start + i * HOUR for i in range(51)]
    first_five = get("klines", symbol="BTCUSDT", interval="1h", startTime=start, endTime=end, limit=5).json()
    assert first_five == both[:5]

    assert get("klines", symbol="BTCUSDT", interval="1h", startTime=end, endTime=start).json() == []
    assert get("klines", symbol="BTCUSDT", interval="1h", startTime=NOW_MS + HOUR).json() == []
    before_history = get("klines", symbol="BTCUSDT", interval="1h", endTime=1_500_000_000_000).json()
    assert before_history == []


def test_klines_start_zero_gives_first_candle(get):
    first_1m = get("klines", symbol="BTCUSDT", interval="1m", startTime=0, limit=1).json()
    assert first_1m[0][0] == 1_502_942_400_000  # 2017-08-17 04:00 UTC
    first_1d = get("klines", symbol="ETHUSDT", interval="1d", startTime=0, limit=1).json()
    assert first_1d[0][0] == 1_502_928_000_000  # 2017-08-17 00:00 UTC, data from 04:00


def test_klines_microseconds(get):
    start = NOW_MS - NOW_MS % HOUR - 10 * HOUR
    in_ms = get("klines", symbol="BTCUSDT", interval="1h", startTime=start, limit=3).json()
    in_us = get(
        "klines", headers={"X-MBX-TIME-UNIT": "MICROSECOND"},
        symbol="BTCUSDT", interval="1h", startTime=start * 1000 + 1, limit=3,
    ).json()
    # start + 1 µs excludes the candle opening at start.
    assert [r[0] for r in in_us] == [r[0] * 1000 for r in in_ms[1:]] + [(start + 3 * HOUR) * 1000]
    assert in_us[0][6] == in_ms[1][6] * 1000 + 999
    assert in_us[0][1:6] == in_ms[1][1:6]
    _error(get("klines", headers={"X-MBX-TIME-UNIT": "NANO"}, symbol="BTCUSDT", interval="1h"), 400, -1100)


def test_klines_time_zone_shifts_daily_alignment(get):
    utc = get("klines", symbol="BTCUSDT", interval="1d", limit=3).json()
    plus8 = get("klines", symbol="BTCUSDT", interval="1d", limit=3, timeZone="8").json()
    assert all(r[0] % 86_400_000 == 0 for r in utc)
    assert all((r[0] + 8 * HOUR) % 86_400_000 == 0 for r in plus8)
    hourly_utc = get("klines", symbol="BTCUSDT", interval="1h", limit=5).json()
    hourly_plus8 = get("klines", symbol="BTCUSDT", interval="1h", limit=5, timeZone="+08:00").json()
    assert hourly_utc == hourly_plus8  # whole-hour offsets leave hourly candles alone
    # A +8 day is the UTC hours 16:00 (previous day) .. 15:59 aggregated.
    day_open = plus8[-2][0]
    hours = get("klines", symbol="BTCUSDT", interval="1h", startTime=day_open, endTime=day_open + 23 * HOUR,
                limit=24).json()
    assert len(hours) == 24
    assert plus8[-2][1] == hours[0][1] and plus8[-2][4] == hours[-1][4]
    assert plus8[-2][8] == sum(h[8] for h in hours)


def test_ticker_price(get):
    one = get("ticker/price", symbol="BTCUSDT").json()
    last_minute = get("klines", symbol="BTCUSDT", interval="1m", limit=1).json()[0]
    assert one == {"symbol": "BTCUSDT", "price": last_minute[4]}
    every = get("ticker/price").json()
    assert [t["symbol"] for t in every] == ["BTCUSDT", "ETHUSDT"]
    assert every[0] == one
    _error(get("ticker/price", symbol="NOPEUSDT"), 400, -1121)
    _error(get("ticker/price", symbol="BTCUSDT", symbols='["BTCUSDT"]'), 400, -1128)


def test_ticker_24hr(get):
    full = get("ticker/24hr", symbol="BTCUSDT").json()
    expected_keys = {
        "symbol", "priceChange", "priceChangePercent", "weightedAvgPrice", "prevClosePrice", "lastPrice",
        "lastQty", "bidPrice", "bidQty", "askPrice", "askQty", "openPrice", "highPrice", "lowPrice",
        "volume", "quoteVolume", "openTime", "closeTime", "firstId", "lastId", "count",
    }
    assert set(full) == expected_keys
    minutes = get("klines", symbol="BTCUSDT", interval="1m", limit=1000).json()
    minutes = get("klines", symbol="BTCUSDT", interval="1m", endTime=minutes[0][0] - 1, limit=440).json() + minutes
    assert len(minutes) == 1440
    assert full["openPrice"] == minutes[0][1] and full["lastPrice"] == minutes[-1][4]
    assert full["count"] == sum(m[8] for m in minutes)
    assert full["closeTime"] == NOW_MS
    assert Decimal(full["volume"]) == sum(Decimal(m[5]) for m in minutes)
    assert Decimal(full["highPrice"]) == max(Decimal(m[2]) for m in minutes)
    mini = get("ticker/24hr", symbol="ETHUSDT", type="MINI").json()
    assert "priceChange" not in mini and mini["symbol"] == "ETHUSDT"
    assert [t["symbol"] for t in get("ticker/24hr").json()] == ["BTCUSDT", "ETHUSDT"]
    _error(get("ticker/24hr", symbol="BTCUSDT", type="HUGE"), 400, -1130)
    _error(get("ticker/24hr", symbol="ZZZUSDT"), 400, -1121)


def test_duplicate_parameter_rejected(server):
    server.reset_limits()
    response = requests.get(f"{server.url}/api/v3/klines?symbol=BTCUSDT&symbol=ETHUSDT&interval=1h", timeout=10)
    _error(response, 400, -1101)


def test_sandbox_endpoints_cost_no_weight(server):
    server.reset_limits()
    for _ in range(3):
        requests.get(server.url + "/sandbox/stats", timeout=10)
        requests.get(server.url + "/sandbox/faults", timeout=10)
    assert server.stats()["current_window_weight"] == 0
    assert json.loads(requests.get(server.url + "/sandbox/nothing", timeout=10).text)["code"] == -1
