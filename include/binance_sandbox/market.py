"""Candle sources behind the server: the synthetic market and what both markets share.

A market answers kline selections the way Binance does. Bounds are on ``open_time``,
inclusive, either may be None; ``from_end`` picks the most recent ``limit`` candles
instead of the oldest. Rows are Binance's 12-field arrays with ms times.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np

from . import synthetic as syn
from .intervals import DAY_MS, MINUTE_MS, MINUTES_PER_DAY, Grid
from .symbols import SymbolProfile, profile_for

_MASK32 = (1 << 32) - 1
_I64_MIN = np.iinfo(np.int64).min
_I64_MAX = np.iinfo(np.int64).max


@dataclass(frozen=True)
class Outage:
    """Minutes whose open time lies in [start_ms, end_ms) do not exist (for one symbol or all)."""

    start_ms: int
    end_ms: int
    symbol: str | None = None

    def applies_to(self, symbol: str) -> bool:
        return self.symbol is None or self.symbol == symbol

    def as_dict(self) -> dict:
        return {"symbol": self.symbol, "start": self.start_ms, "end": self.end_ms}


def price_text(cents: int) -> str:
    return f"{cents // 100}.{cents % 100:02d}000000"


def units_text(units: int) -> str:
    return f"{units // 100_000_000}.{units % 100_000_000:08d}"


def in_outage(open_ms: int, symbol: str, outages: tuple[Outage, ...]) -> bool:
    return any(o.applies_to(symbol) and o.start_ms <= open_ms < o.end_ms for o in outages)


class _LRU:
    """A small thread-safe LRU cache; the value is computed outside the lock."""

    def __init__(self, maxsize: int):
        self.maxsize = maxsize
        self._items: OrderedDict = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key, compute):
        with self._lock:
            if key in self._items:
                self._items.move_to_end(key)
                return self._items[key]
        value = compute()
        with self._lock:
            self._items[key] = value
            while len(self._items) > self.maxsize:
                self._items.popitem(last=False)
        return value


# A candle's aggregate in integer units: open, high, low, close (cents), volume, quote,
# trades, taker base, taker quote (1e-8 units; quote sums are Python ints, never overflow).
Aggregate = tuple[int, int, int, int, int, int, int, int, int]


def _combine(parts: list[Aggregate]) -> Aggregate | None:
    if not parts:
        return None
    if len(parts) == 1:
        return parts[0]
    return (
        parts[0][0],
        max(p[1] for p in parts),
        min(p[2] for p in parts),
        parts[-1][3],
        sum(p[4] for p in parts),
        sum(p[5] for p in parts),
        sum(p[6] for p in parts),
        sum(p[7] for p in parts),
        sum(p[8] for p in parts),
    )


def _exact_sum(values: np.ndarray, axis: int | None = None):
    """Exact sum of non-negative int64 values as Python int(s), even when it exceeds int64."""
    high = (values >> 32).sum(axis=axis)
    low = (values & _MASK32).sum(axis=axis)
    if axis is None:
        return (int(high) << 32) + int(low)
    return [(h << 32) + lo for h, lo in zip(high.tolist(), low.tolist())]


def _aggregate_groups(minutes: np.ndarray, mask: np.ndarray, per_group: int):
    """Aggregate consecutive minutes into groups of ``per_group``.

    Returns (group indexes present, list of Aggregate) using only minutes where mask is set.
    """
    groups = mask.size // per_group
    m = mask.reshape(groups, per_group)
    present = m.any(axis=1)
    rows = np.arange(groups)
    first = m.argmax(axis=1)
    last = per_group - 1 - m[:, ::-1].argmax(axis=1)
    shaped = minutes.reshape(syn.FIELDS, groups, per_group)
    opens = shaped[syn.OPEN][rows, first]
    closes = shaped[syn.CLOSE][rows, last]
    highs = np.where(m, shaped[syn.HIGH], _I64_MIN).max(axis=1)
    lows = np.where(m, shaped[syn.LOW], _I64_MAX).min(axis=1)
    masked = np.where(m, shaped[[syn.VOLUME, syn.QUOTE, syn.TRADES, syn.TAKER_BASE, syn.TAKER_QUOTE]], 0)
    volume = masked[0].sum(axis=1).tolist()
    trades = masked[2].sum(axis=1).tolist()
    taker_base = masked[3].sum(axis=1).tolist()
    quote = _exact_sum(masked[1], axis=1)
    taker_quote = _exact_sum(masked[4], axis=1)
    index = np.flatnonzero(present).tolist()
    o, h, lo, c = opens.tolist(), highs.tolist(), lows.tolist(), closes.tolist()
    return index, [
        (o[g], h[g], lo[g], c[g], volume[g], quote[g], trades[g], taker_base[g], taker_quote[g])
        for g in index
    ]


def _aggregate_range(minutes: np.ndarray, mask: np.ndarray, lo: int, hi: int) -> Aggregate | None:
    """Aggregate the present minutes of [lo, hi) of one day."""
    sel = np.flatnonzero(mask[lo:hi]) + lo
    if sel.size == 0:
        return None
    part = minutes[:, sel]
    return (
        int(part[syn.OPEN, 0]),
        int(part[syn.HIGH].max()),
        int(part[syn.LOW].min()),
        int(part[syn.CLOSE, -1]),
        int(part[syn.VOLUME].sum()),
        _exact_sum(part[syn.QUOTE]),
        int(part[syn.TRADES].sum()),
        int(part[syn.TAKER_BASE].sum()),
        _exact_sum(part[syn.TAKER_QUOTE]),
    )


_ROW_TEXT = "|".join(["%d.%02d000000"] * 4 + ["%d.%08d"] * 4)
_UNIT = 100_000_000


def format_row(open_ms: int, close_ms: int, agg: Aggregate) -> list:
    """Binance's 12-field kline row; one %-format for all eight decimals (the hot path)."""
    o, h, lo, c, volume, quote, trades, taker_base, taker_quote = agg
    u = _UNIT
    texts = (_ROW_TEXT % (
        o // 100, o % 100, h // 100, h % 100, lo // 100, lo % 100, c // 100, c % 100,
        volume // u, volume % u, quote // u, quote % u,
        taker_base // u, taker_base % u, taker_quote // u, taker_quote % u,
    )).split("|")
    return [open_ms, texts[0], texts[1], texts[2], texts[3], texts[4], close_ms, texts[5], trades,
            texts[6], texts[7], "0"]


class SyntheticMarket:
    """Seeded BTC-like markets for the given symbols, from 2017-08-17 04:00 UTC up to now."""

    def __init__(self, seed: int = 42, symbols=("BTCUSDT", "ETHUSDT"), now_ms: int | None = None,
                 cache_days: int = 384):
        self.seed = seed
        self.symbols = tuple(symbols)
        self.profiles: dict[str, SymbolProfile] = {s: profile_for(s) for s in self.symbols}
        self.fixed_now_ms = now_ms
        self._paths: dict[str, syn.DailyPath] = {}
        self._paths_lock = threading.Lock()
        # One (9, 1440) int64 array per day, ~104 kB: 384 days ~ 40 MB; a full-history backfill
        # of a sub-day interval touches ~3400 days, so benchmarks raise it (--cache-days 4000).
        self._minutes = _LRU(maxsize=cache_days)
        self._day_totals = _LRU(maxsize=100_000)

    # -- clock and existence -------------------------------------------------------------

    def now_ms(self) -> int:
        return self.fixed_now_ms if self.fixed_now_ms is not None else int(time.time() * 1000)

    def _path(self, symbol: str) -> syn.DailyPath:
        with self._paths_lock:
            path = self._paths.get(symbol)
            if path is None:
                path = self._paths[symbol] = syn.DailyPath(self.seed, self.profiles[symbol])
            return path

    def _day_minutes(self, symbol: str, day: int) -> np.ndarray:
        if day >= syn.HORIZON_DAYS:
            raise ValueError(f"the synthetic market ends after {syn.HORIZON_DAYS} days")
        return self._minutes.get(
            (symbol, day),
            lambda: syn.generate_day(self.seed, self.profiles[symbol], self._path(symbol), day),
        )

    def _day_key(self, symbol: str, day: int, now_ms: int, outages: tuple[Outage, ...]):
        """What decides which minutes of a day exist: (first, end, holes) or None if none do."""
        start = syn.day_start_ms(day)
        if day < 0 or start > now_ms:
            return None
        lo = syn.FIRST_DAY_FIRST_MINUTE if day == 0 else 0
        hi = min(MINUTES_PER_DAY, (now_ms - start) // MINUTE_MS + 1)
        holes = []
        for outage in outages:
            if not outage.applies_to(symbol) or outage.end_ms <= start or outage.start_ms >= start + DAY_MS:
                continue
            a = max(lo, -((start - outage.start_ms) // MINUTE_MS))  # ceil of minutes into the day
            b = min(hi, -((start - outage.end_ms) // MINUTE_MS))
            if a < b:
                holes.append((a, b))
        holes.sort()
        present = hi - lo - _covered(holes)
        if present <= 0:
            return None
        return lo, hi, tuple(holes)

    @staticmethod
    def _mask(key) -> np.ndarray:
        lo, hi, holes = key
        mask = np.zeros(MINUTES_PER_DAY, dtype=bool)
        mask[lo:hi] = True
        for a, b in holes:
            mask[a:b] = False
        return mask

    def _day_total(self, symbol: str, day: int, key) -> Aggregate | None:
        def compute():
            return _aggregate_range(self._day_minutes(symbol, day), self._mask(key), 0, MINUTES_PER_DAY)

        return self._day_totals.get((symbol, day, key), compute)

    def _span(self, symbol: str, start_ms: int, end_ms: int, now_ms: int, outages) -> Aggregate | None:
        """Aggregate of the existing minutes opening in [start_ms, end_ms)."""
        parts = []
        day = syn.day_of(start_ms)
        while syn.day_start_ms(day) < end_ms:
            day_start = syn.day_start_ms(day)
            key = self._day_key(symbol, day, now_ms, outages)
            if key is not None:
                lo = max(0, -((day_start - start_ms) // MINUTE_MS))
                hi = min(MINUTES_PER_DAY, -((day_start - end_ms) // MINUTE_MS))
                if lo == 0 and hi == MINUTES_PER_DAY:
                    part = self._day_total(symbol, day, key)
                else:
                    part = _aggregate_range(self._day_minutes(symbol, day), self._mask(key), lo, hi)
                if part is not None:
                    parts.append(part)
            day += 1
        return _combine(parts)

    # -- selections ----------------------------------------------------------------------

    def klines(self, symbol, interval, start_ms, end_ms, limit, offset_ms=0, outages=(), now_ms=None):
        now = self.now_ms() if now_ms is None else now_ms
        grid = Grid(interval, offset_ms)
        first_open = grid.floor(syn.HISTORY_START_MS)
        last_open = grid.floor(now)
        lo = first_open if start_ms is None else max(start_ms, first_open)
        hi = last_open if end_ms is None else min(end_ms, last_open)
        if lo > hi or limit <= 0:
            return []
        from_end = start_ms is None
        if grid.utc_aligned_within_day:
            return self._select_by_day(symbol, grid, lo, hi, limit, from_end, now, outages)
        return self._select_by_candle(symbol, grid, lo, hi, limit, from_end, now, outages)

    def _day_rows(self, symbol, grid, day, lo, hi, need, from_end, now_ms, outages) -> list:
        """Formatted candles of one UTC day opening in [lo, hi]: the first (or last) ``need``."""
        key = self._day_key(symbol, day, now_ms, outages)
        if key is None:
            return []
        day_start = syn.day_start_ms(day)
        length = grid.length_ms
        if length == DAY_MS:
            if not lo <= day_start <= hi:
                return []
            return [format_row(day_start, day_start + DAY_MS - 1, self._day_total(symbol, day, key))]
        per_group = length // MINUTE_MS
        groups = MINUTES_PER_DAY // per_group
        first = max(0, -((day_start - lo) // length))  # ceil: first candle opening at or after lo
        end = min(groups, (hi - day_start) // length + 1)
        if first >= end:
            return []
        mask = self._mask(key)
        present = np.flatnonzero(mask.reshape(groups, per_group)[first:end].any(axis=1)) + first
        if present.size > need:
            present = present[-need:] if from_end else present[:need]
        if present.size == 0:
            return []
        a, b = int(present[0]) * per_group, (int(present[-1]) + 1) * per_group
        index, aggregates = _aggregate_groups(self._day_minutes(symbol, day)[:, a:b], mask[a:b], per_group)
        base = day_start + a * MINUTE_MS
        return [
            format_row(base + g * length, base + (g + 1) * length - 1, agg)
            for g, agg in zip(index, aggregates)
        ]

    def _select_by_day(self, symbol, grid, lo, hi, limit, from_end, now_ms, outages) -> list:
        first_day, last_day = max(syn.day_of(lo), 0), syn.day_of(hi)
        chunks, count = [], 0
        days = range(last_day, first_day - 1, -1) if from_end else range(first_day, last_day + 1)
        for day in days:
            rows = self._day_rows(symbol, grid, day, lo, hi, limit - count, from_end, now_ms, outages)
            chunks.append(rows)
            count += len(rows)
            if count >= limit:
                break
        if from_end:
            chunks.reverse()
        return [row for chunk in chunks for row in chunk]

    def _select_by_candle(self, symbol, grid, lo, hi, limit, from_end, now_ms, outages) -> list:
        rows = []
        if from_end:
            open_ms = grid.floor(hi)
            while open_ms >= lo and len(rows) < limit:
                close_ms = grid.next_open(open_ms)
                agg = self._span(symbol, open_ms, close_ms, now_ms, outages)
                if agg is not None:
                    rows.append(format_row(open_ms, close_ms - 1, agg))
                open_ms = grid.prev_open(open_ms)
            rows.reverse()
            return rows
        open_ms = grid.ceil(lo)
        while open_ms <= hi and len(rows) < limit:
            close_ms = grid.next_open(open_ms)
            agg = self._span(symbol, open_ms, close_ms, now_ms, outages)
            if agg is not None:
                rows.append(format_row(open_ms, close_ms - 1, agg))
            open_ms = close_ms
        return rows

    def truth(self, symbol, interval, start_ms, end_ms, outages=()) -> list:
        """Closed candles (close_time < now) with open_time in [start_ms, end_ms), as served."""
        if symbol not in self.profiles:
            raise ValueError(f"unknown symbol {symbol!r}; the sandbox serves {list(self.symbols)}")
        now = self.now_ms()
        rows = self.klines(symbol, interval, start_ms, end_ms - 1, 10**12, outages=outages, now_ms=now)
        return [row for row in rows if row[6] < now]

    # -- tickers -------------------------------------------------------------------------

    def last_row(self, symbol, outages=()) -> list | None:
        rows = self.klines(symbol, "1m", None, None, 1, outages=outages)
        return rows[-1] if rows else None

    def rolling_24h(self, symbol, outages=()) -> dict | None:
        """Figures of the 24 h window ending with the current minute (as ticker/24hr reports)."""
        now = self.now_ms()
        current = now - now % MINUTE_MS
        start = current - (MINUTES_PER_DAY - 1) * MINUTE_MS
        agg = self._span(symbol, start, current + MINUTE_MS, now, outages)
        if agg is None:
            return None
        before = self.klines(symbol, "1m", None, start - 1, 1, outages=outages, now_ms=now)
        o, h, lo, c, volume, quote, trades, _, _ = agg
        return {
            "open": price_text(o), "high": price_text(h), "low": price_text(lo), "last": price_text(c),
            "prev_close": before[-1][4] if before else price_text(o),
            "volume": units_text(volume), "quote_volume": units_text(quote), "count": trades,
            "open_time": start, "close_time": now,
            "bid": price_text(max(c - 1, 1)), "ask": price_text(c + 1),
        }


def _covered(holes) -> int:
    """Minutes covered by sorted, possibly overlapping [a, b) ranges."""
    covered, reach = 0, None
    for a, b in holes:
        if reach is None or a >= reach:
            covered += b - a
            reach = b
        elif b > reach:
            covered += b - reach
            reach = b
    return covered
