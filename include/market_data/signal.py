"""The daily signal: curated 1d/4h/1h candles -> ``SIGNAL_DATA_DIR`` (DESIGN.md, "Signal").

For a UTC date the cutoff is that date at ``RECOMMENDATION_UPDATE_TIME`` (12:00 UTC by
default). Only candles that closed before the cutoff are read (``close_time < cutoff``), so
data arriving later can never change a day's signal. Before the rule runs, a freshness
check compares, per timeframe, the newest curated candle with the newest candle that must
have closed at the cutoff; when any timeframe lags (or lacks the history the rule needs)
the day gets a ``stale_data`` signal with the reason and no direction.

Outputs, written atomically through :mod:`storage` (local paths or ``s3://...``):

* ``signal_<YYYYMMDD>.json`` — the signal (see :data:`JSON_KEYS`);
* ``signal_<YYYYMMDD>.png`` — the chart (:mod:`signal_chart`);
* ``signals.parquet`` — one row per (date, symbol), replaced when a day is re-run.

The first configured symbol owns the DESIGN file names; another symbol's files carry it
in the name (``signal_<SYMBOL>_<YYYYMMDD>.json``) so symbols never overwrite each other.

From a plain shell::

    >>> DataSignal().generate("2024-03-01")          # doctest: +SKIP
    python -m include.market_data.signal 2024-03-01 [--symbol ETHUSDT]
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import date, datetime, timedelta, timezone
from typing import Mapping

import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from include.market_data import observability
from include.market_data.config import Settings, load_settings, validate_symbol
from include.market_data.curation import DataCuration
from include.market_data.signal_chart import render_chart_bytes
from include.market_data.signal_rule import (
    HISTORY_NEEDED,
    SIGNAL_INTERVALS,
    compute_signal,
    input_record,
    stale_signal,
)
from include.market_data.storage import PartitionIO, atomic_write
from include.market_data.timeframes import floor_to_grid, interval_ms, ms_to_utc, now_ms, to_ms, to_utc

log = observability.get_logger(__name__)

SIGNALS_TABLE = "signals.parquet"
SIGNALS_SCHEMA_VERSION = "1"

# Candles read beyond what the rule needs, so an exchange outage (a hole in the series)
# does not starve it. The 1h read also covers the chart's five days.
READ_MARGIN: dict[str, int] = {"1d": 14, "4h": 12, "1h": 24}

# The JSON file's keys, in order: DESIGN's fields plus ``reason`` (why a signal is
# stale, DESIGN: "stale_data with the reason") and ``lag_seconds`` (per timeframe, how
# far the newest curated candle is behind the one the cutoff requires; 0 when fresh).
JSON_KEYS: tuple[str, ...] = (
    "date", "generated_at", "symbol", "as_of", "status", "reason", "direction", "confidence",
    "entry", "stop_loss", "take_profit", "factors", "inputs", "lag_seconds",
)

_TIME = pa.timestamp("ms", tz="UTC")
SIGNALS_SCHEMA = pa.schema([
    pa.field("date", pa.date32(), nullable=False),
    pa.field("symbol", pa.string(), nullable=False),
    pa.field("generated_at", _TIME, nullable=False),
    pa.field("as_of", _TIME),
    pa.field("status", pa.string(), nullable=False),
    pa.field("reason", pa.string()),
    pa.field("direction", pa.string()),
    pa.field("confidence", pa.float64()),
    pa.field("entry", pa.float64()),
    pa.field("stop_loss", pa.float64()),
    pa.field("take_profit", pa.float64()),
    pa.field("factors", pa.string()),  # JSON text, as in the signal file
    pa.field("inputs", pa.string()),  # JSON text
    pa.field("lag_seconds", pa.string()),  # JSON text
])


# --- freshness ---------------------------------------------------------------------------


@dataclass(frozen=True)
class TimeframeFreshness:
    """How one timeframe's curated data stands at the cutoff."""

    interval: str
    expected_open_ms: int  # newest candle that must be closed at the cutoff
    newest_open_ms: int | None  # newest curated candle closed before the cutoff
    candles: int  # closed candles found in the read window
    needed: int  # closed candles the rule needs (HISTORY_NEEDED)

    @property
    def lag_seconds(self) -> float | None:
        """Seconds the newest curated candle is behind the expected one; ``None`` without data."""
        if self.newest_open_ms is None:
            return None
        return max(0, self.expected_open_ms - self.newest_open_ms) / 1000

    @property
    def up_to_date(self) -> bool:
        return self.newest_open_ms is not None and self.newest_open_ms >= self.expected_open_ms

    @property
    def enough_history(self) -> bool:
        return self.candles >= self.needed

    @property
    def fresh(self) -> bool:
        return self.up_to_date and self.enough_history

    def problem(self) -> str | None:
        """One phrase naming what is wrong, ``None`` when fresh."""
        expected = _iso_ms(self.expected_open_ms)
        if self.newest_open_ms is None:
            return f"{self.interval}: no curated candle closed before the cutoff (expected open_time {expected})"
        if not self.up_to_date:
            return (f"{self.interval}: newest curated candle opens {_iso_ms(self.newest_open_ms)}, expected "
                    f"{expected} ({_duration(self.lag_seconds)} behind)")
        if not self.enough_history:
            return f"{self.interval}: {self.candles} closed candle(s), the rule needs {self.needed}"
        return None

    def as_dict(self) -> dict:
        return {
            "expected_open_time": _iso_ms(self.expected_open_ms),
            "newest_open_time": None if self.newest_open_ms is None else _iso_ms(self.newest_open_ms),
            "lag_seconds": self.lag_seconds,
            "candles": self.candles,
            "needed": self.needed,
            "fresh": self.fresh,
        }


@dataclass(frozen=True)
class Freshness:
    """Per-timeframe freshness of one symbol's curated data at one day's cutoff."""

    date: date
    symbol: str
    cutoff_ms: int
    timeframes: Mapping[str, TimeframeFreshness]

    @property
    def fresh(self) -> bool:
        return all(tf.fresh for tf in self.timeframes.values())

    @property
    def lags(self) -> dict[str, float | None]:
        return {interval: tf.lag_seconds for interval, tf in self.timeframes.items()}

    @property
    def reason(self) -> str | None:
        problems = [p for p in (tf.problem() for tf in self.timeframes.values()) if p]
        if not problems:
            return None
        return f"inputs not fresh at the {_iso_ms(self.cutoff_ms)} cutoff: " + "; ".join(problems)

    def as_dict(self) -> dict:
        """JSON-able (for XCom and logs)."""
        return {
            "date": self.date.isoformat(),
            "symbol": self.symbol,
            "cutoff": _iso_ms(self.cutoff_ms),
            "fresh": self.fresh,
            "reason": self.reason,
            "timeframes": {interval: tf.as_dict() for interval, tf in self.timeframes.items()},
        }


# --- the shell/task API ------------------------------------------------------------------


class DataSignal:
    """Generate the daily signal from curated data; usable from a plain shell or a task.

    >>> DataSignal().generate("2024-03-01")  # doctest: +SKIP
    """

    def __init__(self, settings: Settings | None = None):
        self.settings = settings or load_settings()
        self.curation = DataCuration(self.settings)
        self.io = PartitionIO(self.settings.signal_data_dir)
        self.root = self.io.root

    # -- inputs ------------------------------------------------------------------------

    def signal_date(self, value) -> date:
        """The UTC date of ``value`` (a ``date``, a ``datetime`` or an ISO string); ``ValueError`` if none."""
        if isinstance(value, datetime):
            return to_utc(value).date()
        if isinstance(value, date):
            return value
        if isinstance(value, str):
            try:
                return to_utc(value).date()
            except ValueError:
                pass
        raise ValueError(f"date={value!r} is not a date: expected YYYY-MM-DD (UTC), a date or a datetime")

    def symbol(self, value: str | None = None) -> str:
        """``value`` checked against ``BINANCE_SYMBOLS``; the first configured symbol when ``None``."""
        if value is None:
            return self.settings.symbols[0]
        validate_symbol(value, "symbol")
        if value not in self.settings.symbols:
            raise ValueError(f"symbol={value!r} is not in BINANCE_SYMBOLS ({','.join(self.settings.symbols)}): "
                             f"no curated data is kept for it")
        return value

    def cutoff_ms(self, day: date) -> int:
        """``day`` at ``RECOMMENDATION_UPDATE_TIME`` UTC, in epoch ms."""
        moment = datetime(day.year, day.month, day.day, self.settings.recommendation_hour,
                          self.settings.recommendation_minute, tzinfo=timezone.utc)
        return to_ms(moment)

    def _load(self, day: date, symbol: str) -> tuple[dict[str, pd.DataFrame], Freshness]:
        """The closed candles each timeframe needs (plus margin) and the freshness they imply."""
        cutoff = self.cutoff_ms(day)
        frames: dict[str, pd.DataFrame] = {}
        timeframes: dict[str, TimeframeFreshness] = {}
        for interval in SIGNAL_INTERVALS:
            step = interval_ms(interval)
            # The candle opening at floor(cutoff) - step is the newest one closed at the cutoff
            # (it closes 1 ms before floor(cutoff) <= cutoff); reading [start, floor(cutoff))
            # cannot return a candle closing at or after the cutoff.
            end = floor_to_grid(cutoff, interval)
            expected = end - step
            start = end - (HISTORY_NEEDED[interval] + READ_MARGIN[interval]) * step
            frame = self.curation.read(interval, symbol, start, end)
            frame = frame[frame["close_time"] < pd.Timestamp(cutoff, unit="ms", tz="UTC")]
            frame = frame.sort_values("open_time", kind="stable").reset_index(drop=True)
            frames[interval] = frame
            newest = _ts_ms(frame["open_time"].iloc[-1]) if len(frame) else None
            timeframes[interval] = TimeframeFreshness(interval, expected, newest, len(frame),
                                                      HISTORY_NEEDED[interval])
        return frames, Freshness(day, symbol, cutoff, timeframes)

    # -- public -------------------------------------------------------------------------

    def freshness(self, date, symbol: str | None = None) -> Freshness:
        """Per timeframe: the candle that must be closed at the cutoff, the newest curated one, the lag."""
        day, symbol = self.signal_date(date), self.symbol(symbol)
        return self._load(day, symbol)[1]

    def poke(self, date, symbol: str | None = None, *, deadline, now=None) -> dict:
        """One sensor poke: done when the data is fresh or, stale, once ``deadline`` has passed.

        Returns ``{"done", "fresh", "timed_out", "deadline", "freshness"}`` (JSON-able).
        """
        check = self.freshness(date, symbol)
        now_value = now_ms() if now is None else to_ms(now)
        deadline_ms = to_ms(deadline)
        timed_out = not check.fresh and now_value >= deadline_ms
        if timed_out:
            log.warning("signal inputs still stale at the deadline: a stale_data signal follows",
                        symbol=check.symbol, date=check.date.isoformat(), reason=check.reason,
                        status="stale_data")
        return {
            "done": check.fresh or timed_out,
            "fresh": check.fresh,
            "timed_out": timed_out,
            "deadline": _iso_ms(deadline_ms),
            "freshness": check.as_dict(),
        }

    def generate(self, date, symbol: str | None = None, *, now=None) -> dict:
        """Compute, write and return the signal of ``date`` (UTC) for ``symbol``.

        Writes the JSON, the PNG chart and the ``signals.parquet`` row. ``now`` (default:
        the wall clock) only sets ``generated_at`` and rejects a cutoff still in the future.
        """
        day, symbol = self.signal_date(date), self.symbol(symbol)
        now_value = now_ms() if now is None else to_ms(now)
        cutoff = self.cutoff_ms(day)
        if cutoff > now_value:
            raise ValueError(f"date={day.isoformat()!r}: its cutoff {_iso_ms(cutoff)} has not come yet "
                             f"(now {_iso_ms(now_value)})")
        frames, check = self._load(day, symbol)
        if check.fresh:
            body = compute_signal(frames, symbol=symbol, cutoff=cutoff)
            body["lag_seconds"] = check.lags
        else:
            inputs = {interval: (input_record(frames[interval].iloc[-1]) if len(frames[interval]) else None)
                      for interval in SIGNAL_INTERVALS}
            body = stale_signal(symbol=symbol, reason=check.reason, lags=check.lags, inputs=inputs)
        signal = {"date": day.isoformat(), "generated_at": _iso_ms(now_value), **body}
        signal = {key: signal.get(key) for key in JSON_KEYS}

        json_path, png_path = self.json_path(day, symbol), self.chart_path(day, symbol)
        text = json.dumps(signal, indent=2, allow_nan=False) + "\n"
        atomic_write(json_path, lambda handle: handle.write(text.encode()))
        chart = render_chart_bytes(frames["1h"], signal)
        atomic_write(png_path, lambda handle: handle.write(chart))
        self._upsert_row(signal)

        ok = signal["status"] == "ok"
        observability.incr("signal.generated" if ok else "signal.stale")
        fields = dict(symbol=symbol, date=signal["date"], status=signal["status"], direction=signal["direction"],
                      confidence=signal["confidence"], as_of=signal["as_of"], path=str(json_path))
        if ok:
            log.info("signal generated", **fields)
        else:
            log.warning("stale signal written", reason=signal["reason"], lag_seconds=signal["lag_seconds"], **fields)
        return signal

    # -- outputs ------------------------------------------------------------------------

    def _stem(self, day: date, symbol: str) -> str:
        key = day.strftime("%Y%m%d")
        return f"signal_{key}" if symbol == self.settings.symbols[0] else f"signal_{symbol}_{key}"

    def json_path(self, date, symbol: str | None = None):
        return self.root / f"{self._stem(self.signal_date(date), self.symbol(symbol))}.json"

    def chart_path(self, date, symbol: str | None = None):
        return self.root / f"{self._stem(self.signal_date(date), self.symbol(symbol))}.png"

    @property
    def table_path(self):
        return self.root / SIGNALS_TABLE

    def read_signals(self) -> pd.DataFrame:
        """Every row of ``signals.parquet`` (empty frame when there is none)."""
        table = self.io.read(self.table_path)
        return (table if table is not None else SIGNALS_SCHEMA.empty_table()).to_pandas()

    def _upsert_row(self, signal: Mapping) -> None:
        """Replace the (date, symbol) row of ``signals.parquet`` under its lock, atomically.

        Locally the lock is a file lock (processes and threads); on an object store it serializes
        this process's threads only, and the ``daily_signal`` DAG runs one ``generate_signal`` at a time.
        """
        row = _signal_row(signal)
        path = self.table_path
        with self.io.lock(path):
            existing = self.io.read(path)
            if existing is not None:
                try:
                    existing = existing.replace_schema_metadata(None).select(SIGNALS_SCHEMA.names).cast(SIGNALS_SCHEMA)
                except (KeyError, pa.ArrowInvalid, pa.ArrowNotImplementedError) as exc:
                    raise ValueError(f"{path} does not hold the signals schema: {exc}") from None
                same = pc.and_(pc.equal(existing.column("date"), row.column("date")[0]),
                               pc.equal(existing.column("symbol"), row.column("symbol")[0]))
                existing = existing.filter(pc.invert(same))
                row = pa.concat_tables([existing, row])
            row = row.sort_by([("date", "ascending"), ("symbol", "ascending")])
            self.io.write_atomic(path, row, {"content": "daily trade signals",
                                             "schema_version": SIGNALS_SCHEMA_VERSION})


def freshness(date, symbol: str | None = None, *, settings: Settings | None = None) -> Freshness:
    """Shortcut for ``DataSignal(settings).freshness(date, symbol)``."""
    return DataSignal(settings).freshness(date, symbol)


def generate(date, symbol: str | None = None, *, settings: Settings | None = None, now=None) -> dict:
    """Shortcut for ``DataSignal(settings).generate(date, symbol)``."""
    return DataSignal(settings).generate(date, symbol, now=now)


def _signal_row(signal: Mapping) -> pa.Table:
    def moment(value):
        return None if value is None else pd.Timestamp(value).to_pydatetime()

    def text(value):
        return json.dumps(value, sort_keys=True, allow_nan=False)

    values = {
        "date": date.fromisoformat(signal["date"]),
        "symbol": signal["symbol"],
        "generated_at": moment(signal["generated_at"]),
        "as_of": moment(signal["as_of"]),
        "status": signal["status"],
        "reason": signal["reason"],
        "direction": signal["direction"],
        "confidence": signal["confidence"],
        "entry": signal["entry"],
        "stop_loss": signal["stop_loss"],
        "take_profit": signal["take_profit"],
        "factors": text(signal["factors"]),
        "inputs": text(signal["inputs"]),
        "lag_seconds": text(signal["lag_seconds"]),
    }
    return pa.Table.from_pylist([values], schema=SIGNALS_SCHEMA)


def _ts_ms(value) -> int:
    return int(pd.Timestamp(value).value // 1_000_000)


def _iso_ms(ms: int) -> str:
    """``2024-03-01T12:00:00.000Z``, the format of the signal's times."""
    moment = ms_to_utc(int(ms))
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    return str(timedelta(seconds=seconds)).replace(", 0:00:00", "")


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(description="Write the daily signal of a UTC date.")
    parser.add_argument("date", help="UTC date, YYYY-MM-DD")
    parser.add_argument("--symbol", default=None, help="default: the first of BINANCE_SYMBOLS")
    args = parser.parse_args(argv)
    try:
        signal = DataSignal().generate(args.date, args.symbol)
    except ValueError as exc:
        parser.exit(2, f"error: {exc}\n")
    print(json.dumps(signal, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
