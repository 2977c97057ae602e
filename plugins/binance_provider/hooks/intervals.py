"""Binance's kline intervals and their candle grid (an API fact, so it lives with the hook).

Times are ``int`` epoch milliseconds, UTC. Fixed-length intervals are aligned to the epoch,
except weeks, which open on Monday 00:00 UTC; ``1M`` candles open on the 1st of each month.
"""

from __future__ import annotations

from datetime import datetime, timezone

MINUTE_MS = 60_000
HOUR_MS = 60 * MINUTE_MS
DAY_MS = 24 * HOUR_MS
WEEK_MS = 7 * DAY_MS
# 1970-01-01 was a Thursday; Binance weeks open on Monday 00:00 UTC (1970-01-05).
WEEK_ORIGIN_MS = 4 * DAY_MS

# Every fixed-length interval Binance serves; 1M (calendar month) is handled apart.
BINANCE_INTERVALS_MS: dict[str, int] = {
    "1s": 1_000,
    "1m": MINUTE_MS,
    "3m": 3 * MINUTE_MS,
    "5m": 5 * MINUTE_MS,
    "15m": 15 * MINUTE_MS,
    "30m": 30 * MINUTE_MS,
    "1h": HOUR_MS,
    "2h": 2 * HOUR_MS,
    "4h": 4 * HOUR_MS,
    "6h": 6 * HOUR_MS,
    "8h": 8 * HOUR_MS,
    "12h": 12 * HOUR_MS,
    "1d": DAY_MS,
    "3d": 3 * DAY_MS,
    "1w": WEEK_MS,
}
BINANCE_INTERVALS: tuple[str, ...] = (*BINANCE_INTERVALS_MS, "1M")


def interval_ms(interval: str) -> int:
    """Length of one candle in ms; ``ValueError`` naming the interval when unknown."""
    try:
        return BINANCE_INTERVALS_MS[interval]
    except KeyError:
        raise ValueError(
            f"interval {interval!r} is not a fixed-length Binance interval; "
            f"expected one of {', '.join(BINANCE_INTERVALS_MS)}"
        ) from None


def floor_to_grid(ts_ms: int, interval: str) -> int:
    """Open time of the fixed-length candle containing ``ts_ms``."""
    step = interval_ms(interval)
    origin = WEEK_ORIGIN_MS if interval == "1w" else 0
    return (ts_ms - origin) // step * step + origin


def _month_index_start(index: int) -> int:
    moment = datetime(index // 12, index % 12 + 1, 1, tzinfo=timezone.utc)
    return int(moment.timestamp()) * 1000


def grid_open(ts_ms: int, interval: str) -> int:
    """Open time of the candle containing ``ts_ms`` (calendar months for ``1M``)."""
    if interval != "1M":
        return floor_to_grid(ts_ms, interval)
    moment = datetime.fromtimestamp(ts_ms / 1000, tz=timezone.utc)
    return _month_index_start(moment.year * 12 + moment.month - 1)


def next_open(open_ms: int, interval: str, candles: int = 1) -> int:
    """Open time ``candles`` candles after the candle opening at ``open_ms``."""
    if interval != "1M":
        return open_ms + candles * interval_ms(interval)
    moment = datetime.fromtimestamp(open_ms / 1000, tz=timezone.utc)
    return _month_index_start(moment.year * 12 + moment.month - 1 + candles)
