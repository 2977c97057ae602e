"""Candle grid arithmetic: interval lengths, alignment, UTC parsing.

Every time in this project is an ``int`` of epoch milliseconds (UTC) or a timezone-aware
``datetime`` in UTC. Windows are half-open ``[start, end)`` on ``open_time``.
"""

from __future__ import annotations

import calendar
from datetime import date, datetime, timedelta, timezone

from binance_provider.hooks.intervals import (  # noqa: F401 - re-exported: Binance's grid facts
    BINANCE_INTERVALS,
    BINANCE_INTERVALS_MS,
    DAY_MS,
    HOUR_MS,
    MINUTE_MS,
    WEEK_MS,
    WEEK_ORIGIN_MS,
    floor_to_grid,
    interval_ms,
)
from include.market_data.config import PIPELINE_INTERVALS  # noqa: F401 - re-exported


def ceil_to_grid(ts_ms: int, interval: str) -> int:
    """First grid open time ``>= ts_ms``."""
    floor = floor_to_grid(ts_ms, interval)
    return floor if floor == ts_ms else floor + interval_ms(interval)


def grid(start_ms: int, end_ms: int, interval: str) -> range:
    """Every grid open time in ``[start_ms, end_ms)``."""
    return range(ceil_to_grid(start_ms, interval), end_ms, interval_ms(interval))


def closed_end(now_ms: int, interval: str) -> int:
    """Exclusive window end covering every candle closed at ``now_ms``."""
    return floor_to_grid(now_ms, interval)


def to_utc(value: datetime | date | str | int | float) -> datetime:
    """Read a user-given time as UTC: a date alone is 00:00 UTC; a naive datetime is UTC.

    Strings are ISO-8601 (``2024-01-31``, ``2024-01-31T10:00``, ``...Z``, ``...+02:00``);
    numbers are epoch milliseconds.
    """
    if isinstance(value, bool):
        raise ValueError(f"not a time: {value!r}")
    if isinstance(value, (int, float)):
        return datetime.fromtimestamp(value / 1000, tz=timezone.utc)
    if isinstance(value, str):
        text = value.strip()
        if text.endswith(("Z", "z")):
            text = text[:-1] + "+00:00"
        try:
            value = datetime.fromisoformat(text)
        except ValueError:
            raise ValueError(
                f"{value!r} is not an ISO-8601 date or date-time (e.g. 2024-01-31 or 2024-01-31T10:00Z)"
            ) from None
    if isinstance(value, datetime):
        if value.tzinfo is None:
            return value.replace(tzinfo=timezone.utc)
        return value.astimezone(timezone.utc)
    if isinstance(value, date):
        return datetime(value.year, value.month, value.day, tzinfo=timezone.utc)
    raise ValueError(f"not a time: {value!r}")


def to_ms(value: datetime | date | str | int | float) -> int:
    """Epoch milliseconds of a user-given time (see :func:`to_utc`)."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    moment = to_utc(value)
    # Integer arithmetic (no float timestamp); works for datetime subclasses such as
    # pendulum's DateTime, which Airflow passes as data_interval_start/end.
    return calendar.timegm(moment.utctimetuple()) * 1000 + moment.microsecond // 1000


def ms_to_utc(ts_ms: int) -> datetime:
    return datetime(1970, 1, 1, tzinfo=timezone.utc) + timedelta(milliseconds=int(ts_ms))


def day_start_ms(ts_ms: int) -> int:
    return ts_ms // DAY_MS * DAY_MS


def day_key(day_ms: int) -> str:
    """``YYYYMMDD`` of the UTC day containing ``day_ms``."""
    return ms_to_utc(day_ms).strftime("%Y%m%d")


def now_ms() -> int:
    return int(datetime.now(timezone.utc).timestamp() * 1000)
