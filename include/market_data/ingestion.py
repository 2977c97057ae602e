"""Klines from a source into raw partitions: fetch -> gap_check -> write_raw.

Each step is a plain function over paths so the DAG tasks stay thin and only paths,
counts and ranges cross XCom. ``DataIngestion`` runs the three steps in one call for
shell use (the seed's ``asyncio.run(DataIngestion().ingest_timeframe(...))``).

The steps live where their job is named: :mod:`~include.market_data.sources`, :mod:`~include.market_data.windows`,
:mod:`~include.market_data.staging` and :mod:`~include.market_data.gaps` (the gap check); this module writes
the staged rows and re-exports the rest, so its old import paths keep working.
"""

from __future__ import annotations

import asyncio
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field
from datetime import date, datetime, timezone
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from include.market_data import observability
from include.market_data.config import BINANCE_CONN_ID, Settings, load_settings
from include.market_data.gaps import (
    MAX_QUARANTINED_DAYS_PER_RUN, PUBLISH_GRACE_MS, PUBLISH_POLL_S, GapRegistry, GapSummary, SeriesState, gap_check,
    history_start_ms, newest_stored_close_ms, settle_quarantined,
)
from include.market_data.schema import RAW_COLUMNS, validate_raw
from include.market_data.sources import BinanceRestSource, KlineBatch, KlineSource
from include.market_data.staging import (
    PROGRESS_EVERY_S, STAGING_DIR, STAGING_SCHEMA, FetchSummary, StageSummary, fetch_to_staging, read_staged,
    stage_ranges, staged_exists, staging_root,
)
from include.market_data.storage import RawStore, refuse_open_candles
from include.market_data.timeframes import DAY_MS, interval_ms, ms_to_utc, now_ms
from include.market_data.windows import (
    InvalidInput, Window, WindowNotClosed, check_interval, check_symbol, configured_symbol, resolve_window,
)

log = observability.get_logger(__name__)


# -- write -------------------------------------------------------------------------------
@dataclass
class WriteSummary:
    symbol: str
    interval: str
    days: list[int] = field(default_factory=list)
    rows_added: int = 0
    rows_revised: int = 0
    partitions_written: int = 0
    newest_close_ms: int | None = None


def write_staged(store: RawStore, symbol: str, interval: str, staged: list[str], *,
                 now: int | None = None) -> WriteSummary:
    """Merge staged rows into the day partitions, with each day's provenance as metadata."""
    summary = WriteSummary(symbol, interval)
    table = read_staged(staged)
    if table.num_rows == 0:
        return summary
    table = table.sort_by([("open_time", "ascending"), ("_fetched_at", "descending")])
    times = pc.cast(table.column("open_time"), pa.int64()).to_numpy()
    first_of_each = np.concatenate([[True], times[1:] != times[:-1]])  # newest fetch wins
    table = table.filter(pa.array(first_of_each))
    times = times[first_of_each]
    rows = table.select(list(RAW_COLUMNS))
    refuse_open_candles(rows, interval, symbol, now_ms() if now is None else now)  # before any day is written
    validate_raw(rows, interval)  # once for all days, not per partition
    days = times // DAY_MS * DAY_MS
    boundaries = np.flatnonzero(np.diff(days)) + 1
    for lo, hi in zip(np.concatenate([[0], boundaries]), np.concatenate([boundaries, [len(days)]])):
        part = table.slice(int(lo), int(hi - lo))
        newest = int(np.argmax(pc.cast(pc.cast(part.column("_fetched_at"), pa.timestamp("us", tz="UTC")),
                                       pa.int64()).to_numpy()))
        provenance = {
            "source": part.column("_source")[newest].as_py(),
            "endpoint": part.column("_endpoint")[newest].as_py(),
            "fetched_at": part.column("_fetched_at")[newest].as_py(),
            "latency_ms": f"{part.column('_latency_ms')[newest].as_py():.1f}",
            "decimal_places": str(part.column("_decimal_places")[newest].as_py()),
        }
        for result in store.write(interval, symbol, part.select(list(RAW_COLUMNS)), provenance, validated=True,
                                  now=now):
            summary.days.append(result.day_ms)
            summary.rows_added += max(result.added, 0)
            summary.rows_revised += result.revised
            summary.partitions_written += 1
    summary.newest_close_ms = int(times[-1]) + interval_ms(interval) - 1
    return summary


def emit_ingest_metrics(interval: str, *, candles: int | None = None, gaps: GapSummary | None = None,
                        newest_close_ms: int | None = None, now: int | None = None) -> None:
    if candles is not None:
        observability.incr(f"ingest.{interval}.candles", candles)
    if gaps is not None:
        observability.incr(f"ingest.{interval}.gaps_found", gaps.gaps_found)
        observability.incr(f"ingest.{interval}.gaps_filled", gaps.gaps_filled)
    if newest_close_ms is not None:
        lag_s = ((now_ms() if now is None else now) - newest_close_ms) / 1000
        observability.gauge(f"ingest.{interval}.lag_seconds", round(lag_s, 3))


# -- the shell API -----------------------------------------------------------------------
@dataclass
class IngestSummary:
    symbol: str
    interval: str
    start: str
    end: str
    candles_fetched: int
    pages: int
    rows_added: int
    rows_revised: int
    days_touched: list[str]
    gaps_found: int
    gaps_filled: int
    known_gap_slots: int
    seconds: float

    def as_dict(self) -> dict:
        return asdict(self)


class DataIngestion:
    """Ingest closed klines into raw Parquet from a plain Python shell or a task.

    >>> asyncio.run(DataIngestion().ingest_timeframe('1h', datetime.utcnow() - timedelta(days=7), datetime.utcnow()))
    """

    def __init__(self, settings: Settings | None = None, source: KlineSource | None = None,
                 conn_id: str = BINANCE_CONN_ID):
        self.settings = settings or load_settings()
        self._source = source
        self.conn_id = conn_id
        self.store = RawStore(self.settings.raw_data_dir)

    @property
    def source(self) -> KlineSource:
        if self._source is None:
            self._source = BinanceRestSource(self.settings, self.conn_id)
        return self._source

    async def ingest_timeframe(self, interval: str, start: datetime | date | str | int,
                               end: datetime | date | str | int, symbol: str | None = None) -> IngestSummary:
        """Ingest ``[start, end)``; a coroutine so the seed's ``asyncio.run(...)`` line works."""
        return await asyncio.to_thread(self.ingest, interval, start, end, symbol)

    def ingest(self, interval: str, start, end, symbol: str | None = None, *,
               now: int | None = None) -> IngestSummary:
        """Ingest ``[start, end)`` of ``symbol`` (default: the first of BINANCE_SYMBOLS)."""
        started = time.monotonic()
        symbol = configured_symbol(symbol, self.settings)
        now = now_ms() if now is None else now
        window = resolve_window(interval, start, end, settings=self.settings, now=now)
        registry = GapRegistry(self.settings.raw_data_dir, symbol, interval)
        history = history_start_ms(self.source, SeriesState(self.settings.raw_data_dir, symbol, interval),
                                   self.settings, symbol, interval)
        staging = Path(tempfile.mkdtemp(prefix=f"ingest_{symbol}_{interval}_"))
        try:
            fetched = fetch_to_staging(self.source, symbol, window.clipped_to(history), staging / "fetch.parquet")
            staged = [p for p in [fetched.path] if p]
            gaps = gap_check(self.source, self.store, registry, symbol, window, staged, lookback_days=0,
                             floor_ms=window.start_ms, now=now, history_start_ms=history,
                             path=staging / "refetch.parquet")
            staged += [p for p in [gaps.path] if p]
            written = write_staged(self.store, symbol, interval, staged, now=now)
            settle_quarantined(self.store, registry, symbol, interval, history_start=history, now=now)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        emit_ingest_metrics(interval, candles=fetched.candles, gaps=gaps,
                            newest_close_ms=written.newest_close_ms, now=now)
        summary = IngestSummary(
            symbol=symbol, interval=interval,
            start=ms_to_utc(window.start_ms).isoformat(), end=ms_to_utc(window.end_ms).isoformat(),
            candles_fetched=fetched.candles, pages=fetched.pages,
            rows_added=written.rows_added, rows_revised=written.rows_revised,
            days_touched=[ms_to_utc(d).date().isoformat() for d in written.days],
            gaps_found=gaps.gaps_found, gaps_filled=gaps.gaps_filled, known_gap_slots=gaps.known_gap_slots,
            seconds=round(time.monotonic() - started, 3),
        )
        log.info("ingest done", **{k: v for k, v in summary.as_dict().items() if k != "days_touched"},
                 days=len(summary.days_touched), status="ok")
        return summary


# Besides its own names, the module re-exports the steps it chains (moved to sources, windows,
# staging and gaps), so ``from include.market_data.ingestion import X`` keeps working.
__all__ = [
    "MAX_QUARANTINED_DAYS_PER_RUN", "PROGRESS_EVERY_S", "PUBLISH_GRACE_MS", "PUBLISH_POLL_S", "STAGING_DIR",
    "STAGING_SCHEMA", "BinanceRestSource", "DataIngestion", "FetchSummary", "GapSummary", "IngestSummary",
    "InvalidInput", "KlineBatch", "KlineSource", "StageSummary", "Window", "WindowNotClosed", "WriteSummary",
    "check_interval", "check_symbol", "configured_symbol", "emit_ingest_metrics", "fetch_to_staging", "gap_check",
    "history_start_ms", "newest_stored_close_ms", "read_staged", "resolve_window", "settle_quarantined",
    "stage_ranges", "staged_exists", "staging_root", "write_staged",
]



def main(argv: list[str] | None = None) -> int:
    """``python -m include.market_data.ingestion 1h 2024-01-01 2024-02-01 [--symbol X] [--curate]``."""
    import argparse
    import json

    parser = argparse.ArgumentParser(description="Ingest closed klines of [start, end) into raw Parquet.")
    parser.add_argument("interval", help="one of BINANCE_INTERVALS, e.g. 1h")
    parser.add_argument("start", help="UTC date or date-time, inclusive (2024-01-31 or 2024-01-31T10:00Z)")
    parser.add_argument("end", help="UTC date or date-time, exclusive; 'now' for the last closed candle")
    parser.add_argument("--symbol", default=None, help="default: every symbol of BINANCE_SYMBOLS")
    parser.add_argument("--curate", action="store_true", help="curate the days written afterwards")
    args = parser.parse_args(argv)
    try:
        settings = load_settings()
        end = datetime.now(timezone.utc) if args.end == "now" else args.end
        for symbol in [args.symbol] if args.symbol else list(settings.symbols):
            summary = DataIngestion(settings).ingest(args.interval, args.start, end, symbol)
            print(json.dumps({k: v for k, v in summary.as_dict().items() if k != "days_touched"}))
            if args.curate:
                from include.market_data.curation import DataCuration

                print(DataCuration(settings).curate_timeframe(args.interval, symbol, args.start, end))
    except ValueError as exc:  # InvalidInput, ConfigError, CurationError: one line naming the input
        parser.exit(2, f"error: {exc}\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
