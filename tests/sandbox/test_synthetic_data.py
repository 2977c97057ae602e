"""The synthetic market: determinism, exact aggregation, alignment, paging and the open candle."""

from __future__ import annotations

from datetime import datetime, timezone
from decimal import Decimal

import pytest
import requests

from include.binance_sandbox import SandboxServer
from include.binance_sandbox.market import SyntheticMarket

NOW_MS = 1_780_000_030_000  # 2026-05-28 20:27:10 UTC
MINUTE, HOUR, DAY = 60_000, 3_600_000, 86_400_000
HISTORY_START = 1_502_942_400_000  # 2017-08-17 04:00 UTC


@pytest.fixture(scope="module")
def server():
    with SandboxServer(now_ms=NOW_MS, window_s=1e9, weight_limit=10**9) as srv:
        yield srv


def klines(server, **params) -> list:
    response = requests.get(server.url + "/api/v3/klines", params=params, timeout=30)
    assert response.status_code == 200, response.text
    return response.json()


def ms(*args) -> int:
    return int(datetime(*args, tzinfo=timezone.utc).timestamp() * 1000)


def aggregate(rows: list) -> list:
    """Binance's aggregation of consecutive candles, done independently with Decimal."""
    return [
        rows[0][1],
        max(rows, key=lambda r: Decimal(r[2]))[2],
        min(rows, key=lambda r: Decimal(r[3]))[3],
        rows[-1][4],
        sum(Decimal(r[5]) for r in rows),
        sum(Decimal(r[7]) for r in rows),
        sum(r[8] for r in rows),
        sum(Decimal(r[9]) for r in rows),
        sum(Decimal(r[10]) for r in rows),
    ]


def as_aggregate(row: list) -> list:
    return [row[1], row[2], row[3], row[4], Decimal(row[5]), Decimal(row[7]), row[8],
            Decimal(row[9]), Decimal(row[10])]


def test_same_seed_same_candles_and_two_servers_agree(server):
    start = ms(2021, 5, 19)
    with SandboxServer(now_ms=NOW_MS) as other:
        for interval in ("1m", "15m", "4h", "1w"):
            mine = klines(server, symbol="BTCUSDT", interval=interval, startTime=start, limit=40)
            theirs = klines(other, symbol="BTCUSDT", interval=interval, startTime=start, limit=40)
            assert mine == theirs
    again = SyntheticMarket(seed=42, now_ms=NOW_MS).klines("BTCUSDT", "15m", start, None, 300)
    assert again == klines(server, symbol="BTCUSDT", interval="15m", startTime=start, limit=300)


def test_other_seed_and_other_symbol_differ(server):
    start = ms(2021, 5, 19)
    base = SyntheticMarket(seed=42, now_ms=NOW_MS).klines("BTCUSDT", "1h", start, None, 24)
    other_seed = SyntheticMarket(seed=43, now_ms=NOW_MS).klines("BTCUSDT", "1h", start, None, 24)
    eth = SyntheticMarket(seed=42, now_ms=NOW_MS).klines("ETHUSDT", "1h", start, None, 24)
    assert [r[1:6] for r in base] != [r[1:6] for r in other_seed]
    assert [r[4] for r in base] != [r[4] for r in eth]


def test_generation_order_does_not_matter():
    """A day reached directly equals the same day reached after generating others."""
    direct = SyntheticMarket(now_ms=NOW_MS).klines("ETHUSDT", "5m", ms(2023, 2, 2), None, 288)
    warmed = SyntheticMarket(now_ms=NOW_MS)
    warmed.klines("ETHUSDT", "5m", ms(2019, 1, 1), None, 1000)
    assert warmed.klines("ETHUSDT", "5m", ms(2023, 2, 2), None, 288) == direct


def test_prices_look_like_btc(server):
    first = klines(server, symbol="BTCUSDT", interval="1d", startTime=0, limit=1)[0]
    assert 3_000 < Decimal(first[1]) < 6_000
    monthly = klines(server, symbol="BTCUSDT", interval="1M", limit=1000)
    highs = [Decimal(r[2]) for r in monthly]
    assert max(highs) > 20_000
    assert all(Decimal(r[3]) > 0 for r in monthly)


@pytest.mark.parametrize("symbol", ["BTCUSDT", "ETHUSDT"])
def test_minute_candles_are_consistent(server, symbol):
    rows = klines(server, symbol=symbol, interval="1m", startTime=ms(2022, 6, 13, 10), limit=1000)
    previous_close = None
    for row in rows:
        o, h, lo, c = (Decimal(x) for x in row[1:5])
        volume, quote, taker_base, taker_quote = (Decimal(row[i]) for i in (5, 7, 9, 10))
        assert lo <= min(o, c) <= max(o, c) <= h
        assert taker_base <= volume and taker_quote <= quote
        if volume:
            assert lo <= quote / volume <= h  # quote volume is price x volume
            assert row[8] >= 1
        if previous_close is not None:
            assert o == previous_close
        previous_close = c


def test_zero_volume_minutes_exist_and_are_flat(server):
    found = []
    day = ms(2024, 1, 1)
    for _ in range(30):
        for start in (day, day + 1000 * MINUTE):
            rows = klines(server, symbol="BTCUSDT", interval="1m", startTime=start, endTime=day + DAY - 1, limit=1000)
            found += [(r, prev) for prev, r in zip(rows, rows[1:]) if r[5] == "0.00000000"]
        if found:
            break
        day += DAY
    assert found, "no idle minute in 30 days"
    row, previous = found[0]
    assert row[1] == row[2] == row[3] == row[4] == previous[4]
    assert row[8] == 0 and row[7] == row[9] == row[10] == "0.00000000"


@pytest.mark.parametrize(
    "coarse, fine, count",
    [("1h", "15m", 4), ("1d", "1h", 24), ("4h", "1h", 4), ("30m", "3m", 10), ("1w", "1d", 7), ("3d", "1d", 3)],
)
def test_aggregation_is_exact(server, coarse, fine, count):
    big = klines(server, symbol="BTCUSDT", interval=coarse, endTime=ms(2025, 3, 1), limit=3)
    for row in big:
        parts = klines(server, symbol="BTCUSDT", interval=fine, startTime=row[0], endTime=row[6], limit=1000)
        assert len(parts) == count
        assert parts[0][0] == row[0] and parts[-1][6] == row[6]
        assert as_aggregate(row) == aggregate(parts)


def test_month_candles_open_on_the_first_and_sum_their_days(server):
    months = klines(server, symbol="ETHUSDT", interval="1M", startTime=ms(2024, 1, 1), limit=3)
    assert [r[0] for r in months] == [ms(2024, 1, 1), ms(2024, 2, 1), ms(2024, 3, 1)]
    assert months[1][6] == ms(2024, 3, 1) - 1
    days = klines(server, symbol="ETHUSDT", interval="1d", startTime=ms(2024, 2, 1), endTime=ms(2024, 2, 29), limit=100)
    assert len(days) == 29
    assert as_aggregate(months[1]) == aggregate(days)


def test_month_quote_volume_beyond_int64_is_exact():
    market = SyntheticMarket(seed=42, now_ms=NOW_MS)
    month = market.klines("BTCUSDT", "1M", ms(2024, 3, 1), ms(2024, 3, 1), 1)[0]
    days = market.klines("BTCUSDT", "1d", ms(2024, 3, 1), ms(2024, 3, 31), 100)
    assert Decimal(month[7]) == sum(Decimal(d[7]) for d in days)


def test_week_and_three_day_alignment(server):
    weeks = klines(server, symbol="BTCUSDT", interval="1w", startTime=0, limit=3)
    assert weeks[0][0] == ms(2017, 8, 14)  # the Monday before the first candle
    for row in weeks:
        assert datetime.fromtimestamp(row[0] / 1000, timezone.utc).weekday() == 0
        assert row[6] == row[0] + 7 * DAY - 1
    three = klines(server, symbol="BTCUSDT", interval="3d", startTime=0, limit=3)
    assert all(r[0] % (3 * DAY) == 0 for r in three)
    assert three[0][0] <= HISTORY_START < three[0][6]


def test_first_candles_of_history(server):
    first_1m = klines(server, symbol="BTCUSDT", interval="1m", startTime=0, limit=1)[0]
    first_1d = klines(server, symbol="BTCUSDT", interval="1d", startTime=0, limit=1)[0]
    first_4h = klines(server, symbol="BTCUSDT", interval="4h", startTime=0, limit=1)[0]
    assert first_1m[0] == HISTORY_START and first_4h[0] == HISTORY_START
    assert first_1d[0] == ms(2017, 8, 17) and first_1d[1] == first_1m[1]


def test_open_candle_is_served_and_truth_excludes_it(server):
    newest = klines(server, symbol="BTCUSDT", interval="1h", limit=2)
    open_candle = newest[-1]
    assert open_candle[0] <= NOW_MS < open_candle[6]
    # The open candle holds the minutes up to now's minute only.
    minutes = klines(server, symbol="BTCUSDT", interval="1m", startTime=open_candle[0], limit=1000)
    assert len(minutes) == (NOW_MS - open_candle[0]) // MINUTE + 1
    assert as_aggregate(open_candle) == aggregate(minutes)
    truth = server.truth("BTCUSDT", "1h", open_candle[0] - 5 * HOUR, open_candle[0] + HOUR)
    assert truth[-1] == newest[-2]
    assert len(truth) == 5


def test_truth_matches_served_rows(server):
    start, end = ms(2019, 6, 1), ms(2019, 6, 20)
    served = klines(server, symbol="ETHUSDT", interval="4h", startTime=start, endTime=end - 1, limit=1000)
    assert server.truth("ETHUSDT", "4h", start, end) == served


def test_paging_all_history_of_1h_is_contiguous(server):
    """Nine years of 1h in pages of 1000: every grid slot once, in order."""
    opens, start = [], 0
    for _ in range(200):  # bounded: ~77 pages expected
        page = klines(server, symbol="BTCUSDT", interval="1h", startTime=start, limit=1000)
        if not page:
            break
        opens += [r[0] for r in page]
        start = page[-1][0] + 1
    first = HISTORY_START
    last = NOW_MS - NOW_MS % HOUR
    assert opens == list(range(first, last + 1, HOUR))
