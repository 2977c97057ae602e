"""Binance kline intervals and how their candles align on the clock.

Kept separate from the client's own interval grid on purpose: the sandbox is an
independent reading of Binance, so a mistake shared with the client cannot hide.

Alignment as on Binance: intervals up to 1d and 3d are multiples of their length since
the epoch, weeks open Monday 00:00, months on the 1st. A ``timeZone`` offset shifts the
alignment (candles align in local time; startTime/endTime stay UTC).
"""

from __future__ import annotations

import calendar
import re
from datetime import datetime, timedelta, timezone

MINUTE_MS = 60_000
HOUR_MS = 60 * MINUTE_MS
DAY_MS = 24 * HOUR_MS
WEEK_MS = 7 * DAY_MS
MINUTES_PER_DAY = DAY_MS // MINUTE_MS
# 1970-01-05 was the first Monday after the epoch: weekly candles align to it.
WEEK_ORIGIN_MS = 4 * DAY_MS

FIXED_INTERVALS_MS = {
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
INTERVALS = tuple(FIXED_INTERVALS_MS) + ("1M",)
# The public-data archive spells the monthly interval "1mo" (case-insensitive file systems).
ARCHIVE_INTERVAL_NAMES = {"1mo": "1M"}

_EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)
_TIMEZONE_RE = re.compile(r"^([+-])?(\d{1,2})(?::(\d{2}))?$")


def parse_timezone(text: str) -> int:
    """Binance's ``timeZone`` parameter ('8', '-1:00', '05:45', '+08:00') as an offset in ms.

    Accepted range is [-12:00, +14:00]; raises ValueError otherwise.
    """
    match = _TIMEZONE_RE.match(text.strip())
    if not match:
        raise ValueError(text)
    sign, hours, minutes = match.group(1), int(match.group(2)), int(match.group(3) or 0)
    if minutes >= 60:
        raise ValueError(text)
    offset_minutes = hours * 60 + minutes
    if sign == "-":
        offset_minutes = -offset_minutes
    if not -12 * 60 <= offset_minutes <= 14 * 60:
        raise ValueError(text)
    return offset_minutes * MINUTE_MS


def _month_index(ts_ms: int) -> int:
    moment = datetime.fromtimestamp(ts_ms / 1000, tz=timezone.utc)
    return moment.year * 12 + moment.month - 1


def _month_start(index: int) -> int:
    year, month0 = divmod(index, 12)
    return calendar.timegm((year, month0 + 1, 1, 0, 0, 0)) * 1000


class Grid:
    """Candle boundaries of one interval under one time-zone offset."""

    def __init__(self, interval: str, offset_ms: int = 0):
        if interval not in INTERVALS:
            raise ValueError(interval)
        self.interval = interval
        self.offset_ms = offset_ms
        self.length_ms = FIXED_INTERVALS_MS.get(interval)  # None for 1M
        origin = WEEK_ORIGIN_MS if interval == "1w" else 0
        self._origin = origin - offset_ms

    @property
    def utc_aligned_within_day(self) -> bool:
        """True when every candle lies inside one UTC day and the day splits into whole candles."""
        return (
            self.length_ms is not None
            and self.length_ms <= DAY_MS
            and self.offset_ms % self.length_ms == 0
        )

    def floor(self, ts_ms: int) -> int:
        """Open time of the candle containing ``ts_ms``."""
        if self.length_ms is None:
            return _month_start(_month_index(ts_ms + self.offset_ms)) - self.offset_ms
        return ts_ms - (ts_ms - self._origin) % self.length_ms

    def next_open(self, open_ms: int) -> int:
        if self.length_ms is None:
            return _month_start(_month_index(open_ms + self.offset_ms) + 1) - self.offset_ms
        return open_ms + self.length_ms

    def prev_open(self, open_ms: int) -> int:
        if self.length_ms is None:
            return _month_start(_month_index(open_ms + self.offset_ms) - 1) - self.offset_ms
        return open_ms - self.length_ms

    def ceil(self, ts_ms: int) -> int:
        """First candle open at or after ``ts_ms``."""
        opened = self.floor(ts_ms)
        return opened if opened == ts_ms else self.next_open(opened)


def parse_time(value: int | float | str) -> int:
    """Milliseconds since the epoch from an int/float (ms) or an ISO-8601 string (naive = UTC)."""
    if isinstance(value, bool):
        raise ValueError(value)
    if isinstance(value, (int, float)):
        return int(value)
    text = str(value).strip()
    if re.fullmatch(r"-?\d+", text):
        return int(text)
    moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=timezone.utc)
    return (moment - _EPOCH) // timedelta(milliseconds=1)
