"""Windows of candles: user- or scheduler-given bounds validated and aligned to the candle grid.

Also the checks of an interval and a symbol against the configuration, raising
:class:`InvalidInput` with a message naming the bad parameter.
"""

from __future__ import annotations

from dataclasses import dataclass

from include.market_data.config import Settings, validate_symbol
from include.market_data.timeframes import (
    ceil_to_grid, closed_end, floor_to_grid, interval_ms, ms_to_utc, now_ms, to_ms,
)


class InvalidInput(ValueError):
    """A user-given parameter is wrong; the message names it."""


class WindowNotClosed(RuntimeError):
    """The window's last candle has not closed yet: wait for it instead of finishing short."""

    def __init__(self, message: str, closes_at_ms: int | None = None):
        super().__init__(message)
        self.closes_at_ms = closes_at_ms


@dataclass(frozen=True)
class Window:
    """Grid-aligned half-open window ``[start_ms, end_ms)`` on ``open_time``."""

    interval: str
    start_ms: int
    end_ms: int

    @property
    def slots(self) -> int:
        return max(0, (self.end_ms - self.start_ms) // interval_ms(self.interval))

    def describe(self) -> str:
        return f"[{ms_to_utc(self.start_ms).isoformat()}, {ms_to_utc(self.end_ms).isoformat()})"

    def clipped_to(self, history_start_ms: int) -> "Window":
        """The part of the window from the series' first candle on (nothing before it is requested)."""
        start = max(self.start_ms, ceil_to_grid(history_start_ms, self.interval))
        return Window(self.interval, min(start, self.end_ms), self.end_ms)


def check_interval(interval: str, settings: Settings) -> str:
    if interval not in settings.intervals:
        raise InvalidInput(f"interval={interval!r} is not one of the configured intervals "
                           f"{','.join(settings.intervals)} (BINANCE_INTERVALS)")
    return interval


def check_symbol(symbol: str) -> str:
    try:
        return validate_symbol(symbol, "symbol")
    except ValueError as exc:
        raise InvalidInput(str(exc)) from None


def configured_symbol(symbol: str | None, settings: Settings) -> str:
    """``symbol`` (default: the first of BINANCE_SYMBOLS), refused unless it is configured: curation
    and the signal only know the configured symbols."""
    symbol = check_symbol(settings.symbols[0] if symbol is None else symbol)
    if symbol not in settings.symbols:
        raise InvalidInput(f"symbol={symbol!r} is not in BINANCE_SYMBOLS ({','.join(settings.symbols)})")
    return symbol


def _parse_time(value, name: str) -> int:
    try:
        return to_ms(value)
    except (ValueError, TypeError, OverflowError) as exc:
        raise InvalidInput(f"{name}={value!r} is not a valid time: {exc}") from None


def resolve_window(interval: str, start, end, *, settings: Settings, now: int | None = None,
                   require_closed: bool = False) -> Window:
    """Validate a user- or scheduler-given window and align it to the candle grid.

    ``end`` up to now is clipped to the last closed candle (or, with ``require_closed``,
    raises :class:`WindowNotClosed` so the run retries instead of finishing short).
    """
    check_interval(interval, settings)
    now = now_ms() if now is None else now
    start_ms, end_ms = _parse_time(start, "start"), _parse_time(end, "end")
    if start_ms >= end_ms:
        raise InvalidInput(f"start={ms_to_utc(start_ms).isoformat()} must be before end={ms_to_utc(end_ms).isoformat()}")
    if start_ms < floor_to_grid(settings.ingest_start_ms, interval):  # 1w: the week holding INGEST_START
        raise InvalidInput(f"start={ms_to_utc(start_ms).isoformat()} is before INGEST_START="
                           f"{settings.ingest_start.isoformat()}")
    if end_ms > now and not require_closed:
        raise InvalidInput(f"end={ms_to_utc(end_ms).isoformat()} is in the future (now {ms_to_utc(now).isoformat()})")
    last_closed_end = closed_end(now, interval)
    aligned_start = ceil_to_grid(start_ms, interval)
    aligned_end = ceil_to_grid(end_ms, interval)
    if aligned_end > last_closed_end:
        if require_closed:
            raise WindowNotClosed(
                f"{interval} window ends {ms_to_utc(aligned_end).isoformat()} but the newest closed candle "
                f"ends {ms_to_utc(last_closed_end).isoformat()}", closes_at_ms=aligned_end)
        aligned_end = last_closed_end
    return Window(interval, aligned_start, max(aligned_start, aligned_end))
