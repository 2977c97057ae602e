"""Replay of recorded klines: Binance public-data archive files or the project's raw Parquet.

Accepted inputs (a file or a directory searched recursively):

- ``<SYMBOL>-<interval>-<YYYY-MM>.csv`` / ``<SYMBOL>-<interval>-<YYYY-MM-DD>.csv``, plain or
  ``.zip``: 12 fields, no header (a header line is tolerated), times in ms or, as in the
  2025+ files, µs (detected by magnitude and converted to ms). ``1mo`` means ``1M``.
- ``<interval>/<SYMBOL>_<interval>_<YYYYMMDD>.parquet`` in the raw layout (timestamps in
  ms, decimal columns printed back with 8 decimals).

Each (symbol, interval) is served exactly as recorded, holes included; intervals not
recorded answer []; the newest recorded candle counts as closed.
"""

from __future__ import annotations

import bisect
import csv
import io
import re
import time
import zipfile
from decimal import Decimal
from pathlib import Path

from .intervals import ARCHIVE_INTERVAL_NAMES, DAY_MS, FIXED_INTERVALS_MS, INTERVALS
from .market import in_outage
from .symbols import profile_for

_ARCHIVE_RE = re.compile(r"^(?P<symbol>[A-Z0-9]+)-(?P<interval>\w+)-\d{4}-\d{2}(-\d{2})?\.(csv|zip)$")
_PARQUET_RE = re.compile(r"^(?P<symbol>[A-Z0-9]+)_(?P<interval>\w+)_\d{8}\.parquet$")
# Any time at or above this is in µs: ms reach it only in the year 5138.
_MICROSECOND_THRESHOLD = 100_000_000_000_000
_DECIMAL_COLUMNS = (
    "open", "high", "low", "close", "volume", "quote_asset_volume",
    "taker_buy_base_asset_volume", "taker_buy_quote_asset_volume",
)


class ReplayError(ValueError):
    """Replay input that cannot be used; the message names the file."""


def _interval_name(text: str, source: Path) -> str:
    interval = ARCHIVE_INTERVAL_NAMES.get(text, text)
    if interval not in INTERVALS:
        raise ReplayError(f"{source}: unknown interval {text!r}")
    return interval


def _to_ms(value: int) -> int:
    return value // 1000 if value >= _MICROSECOND_THRESHOLD else value


def _csv_rows(text: str, source: str) -> list[list]:
    rows = []
    for number, fields in enumerate(csv.reader(io.StringIO(text)), start=1):
        if not fields or not fields[0].strip().lstrip("-").isdigit():
            continue  # blank line or header
        if len(fields) < 11:
            raise ReplayError(f"{source} line {number}: expected 12 kline fields, got {len(fields)}")
        f = [x.strip() for x in fields]
        rows.append([
            _to_ms(int(f[0])), f[1], f[2], f[3], f[4], f[5], _to_ms(int(f[6])),
            f[7], int(f[8]), f[9], f[10], "0",
        ])
    return rows


def _archive_rows(path: Path) -> list[list]:
    if path.suffix == ".zip":
        rows = []
        with zipfile.ZipFile(path) as archive:
            for member in archive.namelist():
                if member.endswith(".csv"):
                    rows.extend(_csv_rows(archive.read(member).decode(), f"{path}:{member}"))
        return rows
    return _csv_rows(path.read_text(), str(path))


def _parquet_rows(path: Path) -> list[list]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pq.read_table(path)
    missing = {"open_time", "close_time", "number_of_trades", *_DECIMAL_COLUMNS} - set(table.column_names)
    if missing:
        raise ReplayError(f"{path}: missing columns {sorted(missing)}")

    def times(name):
        column = table.column(name)
        if pa.types.is_timestamp(column.type):
            column = column.cast(pa.timestamp("ms", tz=column.type.tz)).cast(pa.int64())
        return column.to_pylist()

    def decimals(name):
        return [format(Decimal(v), ".8f") for v in table.column(name).to_pylist()]

    o, h, lo, c, v, q, tb, tq = (decimals(name) for name in _DECIMAL_COLUMNS)
    opens, closes = times("open_time"), times("close_time")
    trades = table.column("number_of_trades").to_pylist()
    return [
        [opens[i], o[i], h[i], lo[i], c[i], v[i], closes[i], q[i], int(trades[i]), tb[i], tq[i], "0"]
        for i in range(table.num_rows)
    ]


class _Series:
    """One (symbol, interval) as recorded, sorted by open time, one row per open time."""

    def __init__(self, rows: list[list]):
        by_open = {row[0]: row for row in rows}
        self.opens = sorted(by_open)
        self.rows = [by_open[t] for t in self.opens]


class ReplayMarket:
    def __init__(self, series: dict[tuple[str, str], list[list]], now_ms: int | None = None):
        if not series:
            raise ReplayError("no klines found to replay")
        self._series = {key: _Series(rows) for key, rows in series.items()}
        self.symbols = tuple(sorted({symbol for symbol, _ in self._series}))
        self.profiles = {symbol: profile_for(symbol) for symbol in self.symbols}
        self.fixed_now_ms = now_ms

    @classmethod
    def load(cls, path, now_ms: int | None = None) -> "ReplayMarket":
        root = Path(path)
        if not root.exists():
            raise ReplayError(f"replay path {root} does not exist")
        files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
        series: dict[tuple[str, str], list[list]] = {}
        for file in files:
            archive = _ARCHIVE_RE.match(file.name)
            parquet = _PARQUET_RE.match(file.name)
            if archive:
                key = (archive["symbol"], _interval_name(archive["interval"], file))
                series.setdefault(key, []).extend(_archive_rows(file))
            elif parquet:
                key = (parquet["symbol"], _interval_name(parquet["interval"], file))
                series.setdefault(key, []).extend(_parquet_rows(file))
            elif root.is_file():
                raise ReplayError(
                    f"{file}: not a replay file (<SYMBOL>-<interval>-<YYYY-MM[-DD]>.csv|.zip "
                    "or <SYMBOL>_<interval>_<YYYYMMDD>.parquet)"
                )
        return cls(series, now_ms=now_ms)

    def now_ms(self) -> int:
        return self.fixed_now_ms if self.fixed_now_ms is not None else int(time.time() * 1000)

    def _rows(self, symbol, interval, lo, hi) -> tuple[list, int, int]:
        series = self._series.get((symbol, interval))
        if series is None:
            return [], 0, 0
        first = 0 if lo is None else bisect.bisect_left(series.opens, lo)
        end = len(series.opens) if hi is None else bisect.bisect_right(series.opens, hi)
        return series.rows, first, end

    def klines(self, symbol, interval, start_ms, end_ms, limit, offset_ms=0, outages=(), now_ms=None):
        """Recorded candles; ``offset_ms`` (timeZone) cannot re-align a recording and is ignored."""
        rows, first, end = self._rows(symbol, interval, start_ms, end_ms)
        relevant = tuple(o for o in outages if o.applies_to(symbol))
        picked = []
        indexes = range(end - 1, first - 1, -1) if start_ms is None else range(first, end)
        for i in indexes:
            if relevant and in_outage(rows[i][0], symbol, relevant):
                continue
            picked.append(rows[i])
            if len(picked) >= limit:
                break
        if start_ms is None:
            picked.reverse()
        return picked

    def truth(self, symbol, interval, start_ms, end_ms, outages=()) -> list:
        if symbol not in self.profiles:
            raise ValueError(f"unknown symbol {symbol!r}; the replay holds {list(self.symbols)}")
        return self.klines(symbol, interval, start_ms, end_ms - 1, 10**12, outages=outages)

    def _finest(self, symbol) -> str | None:
        recorded = [i for s, i in self._series if s == symbol]
        if not recorded:
            return None
        return min(recorded, key=lambda i: FIXED_INTERVALS_MS.get(i, 31 * DAY_MS))

    def last_row(self, symbol, outages=()) -> list | None:
        interval = self._finest(symbol)
        rows = self.klines(symbol, interval, None, None, 1, outages=outages) if interval else []
        return rows[-1] if rows else None

    def rolling_24h(self, symbol, outages=()) -> dict | None:
        """The 24 h before the newest recorded candle's close, from the finest recorded interval."""
        last = self.last_row(symbol, outages)
        if last is None:
            return None
        interval = self._finest(symbol)
        end = last[6] + 1
        window = self.klines(symbol, interval, end - DAY_MS, end, 10**12, outages=outages)
        before = self.klines(symbol, interval, None, end - DAY_MS - 1, 1, outages=outages)

        def total(index):
            return format(sum(Decimal(row[index]) for row in window), ".8f")

        low = min(window, key=lambda r: Decimal(r[3]))[3]
        high = max(window, key=lambda r: Decimal(r[2]))[2]
        last_price = Decimal(window[-1][4])
        tick = Decimal("0.01")
        return {
            "open": window[0][1], "high": high, "low": low, "last": window[-1][4],
            "prev_close": before[-1][4] if before else window[0][1],
            "volume": total(5), "quote_volume": total(7), "count": sum(r[8] for r in window),
            "open_time": end - DAY_MS, "close_time": end - 1,
            "bid": format(max(last_price - tick, tick), ".8f"), "ask": format(last_price + tick, ".8f"),
        }

