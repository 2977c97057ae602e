"""Klines from a source into raw partitions: fetch -> gap_check -> write_raw.

Each step is a plain function over paths so the DAG tasks stay thin and only paths,
counts and ranges cross XCom. ``DataIngestion`` runs the three steps in one call for
shell use (the seed's ``asyncio.run(DataIngestion().ingest_timeframe(...))``).
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field
from datetime import date, datetime, timezone
from pathlib import Path
from typing import Iterator, Protocol

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from include.market_data import observability
from include.market_data.config import BINANCE_CONN_ID, Settings, load_settings, validate_symbol
from include.market_data.gaps import GapRegistry, SeriesState, missing_ranges, slot_count
from include.market_data.schema import RAW_COLUMNS, RAW_SCHEMA, decimal_places, rows_to_table, validate_raw
from include.market_data.storage import RawStore, refuse_open_candles, resolve_root
from include.market_data.timeframes import (
    DAY_MS, ceil_to_grid, closed_end, day_start_ms, floor_to_grid, interval_ms, ms_to_utc, now_ms, to_ms,
)

log = observability.get_logger(__name__)

STAGING_DIR = "_staging"
PROGRESS_EVERY_S = 10.0
# How long after a candle closes Binance may take to serve it before a hole counts as an outage;
# the gap check polls for such candles every PUBLISH_POLL_S until then (inside the task).
PUBLISH_GRACE_MS = 5 * 60_000
PUBLISH_POLL_S = 10.0
# Quarantined days one run refetches at most (each is one request or two): the rest wait for the next run.
MAX_QUARANTINED_DAYS_PER_RUN = 31
# Indirections so tests can run the bounded polls without waiting.
_sleep = time.sleep
_monotonic = time.monotonic
# Provenance travels with each staged row so each day partition gets the metadata of
# the response its rows came from.
STAGING_SCHEMA = RAW_SCHEMA.append(pa.field("_fetched_at", pa.string())).append(
    pa.field("_latency_ms", pa.float64())).append(pa.field("_source", pa.string())).append(
    pa.field("_endpoint", pa.string())).append(pa.field("_decimal_places", pa.int64()))


class InvalidInput(ValueError):
    """A user-given parameter is wrong; the message names it."""


class WindowNotClosed(RuntimeError):
    """The window's last candle has not closed yet: wait for it instead of finishing short."""

    def __init__(self, message: str, closes_at_ms: int | None = None):
        super().__init__(message)
        self.closes_at_ms = closes_at_ms


# -- where candles come from ---------------------------------------------------------------
@dataclass(frozen=True)
class KlineBatch:
    """Closed candles of one response, with its provenance."""

    rows: list[list]
    source: str
    endpoint: str
    fetched_at: str
    latency_ms: float


class KlineSource(Protocol):
    """The seam for candle sources (Binance REST today; the public-data archive later)."""

    def batches(self, symbol: str, interval: str, start_ms: int, end_ms: int) -> Iterator[KlineBatch]:
        """Closed candles with ``open_time`` in ``[start_ms, end_ms)``, in time order."""

    def first_open_ms(self, symbol: str, interval: str) -> int | None:
        """Open time of the symbol's first candle (``None``: no candle yet)."""

    def symbol_status(self, symbol: str) -> str | None:
        """The exchange's trading status of ``symbol`` (``TRADING``, ``BREAK``, ...)."""


class BinanceRestSource:
    """Candles from Binance's REST API through :class:`BinanceHook`."""

    def __init__(self, settings: Settings, conn_id: str = BINANCE_CONN_ID, hook=None):
        if hook is None:
            from binance_provider.hooks.binance import BinanceHook  # deferred: imports Airflow

            hook = BinanceHook(binance_conn_id=conn_id, settings=settings.hook_settings())
        self.hook = hook
        self.settings = settings

    def batches(self, symbol: str, interval: str, start_ms: int, end_ms: int) -> Iterator[KlineBatch]:
        for page in self.hook.iter_klines(symbol, interval, start_ms, end_ms,
                                          concurrency=self.settings.max_concurrency):
            meta = page.meta
            if getattr(page, "rejected", None):
                # Rows breaking the row contract (the hook logged each): their slots stay holes,
                # re-checked by the gap check like any other.
                observability.incr(f"ingest.{interval}.rows_rejected", len(page.rejected))
            yield KlineBatch(page.rows, meta.source, meta.endpoint, meta.fetched_at, meta.latency_ms)

    def first_open_ms(self, symbol: str, interval: str) -> int | None:
        return self.hook.first_open_ms(symbol, interval)

    def symbol_status(self, symbol: str) -> str | None:
        body, _ = self.hook.exchange_info(symbol)
        entry = next((s for s in body.get("symbols", []) if s.get("symbol") == symbol), None)
        return None if entry is None else entry.get("status")


# -- windows -----------------------------------------------------------------------------
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


# -- staging -----------------------------------------------------------------------------
def staging_root(settings: Settings):
    return resolve_root(settings.raw_data_dir) / STAGING_DIR


def _batch_table(batch: KlineBatch) -> pa.Table:
    table = rows_to_table(batch.rows)
    n = table.num_rows
    return (table.append_column("_fetched_at", pa.array([batch.fetched_at] * n, pa.string()))
            .append_column("_latency_ms", pa.array([float(batch.latency_ms)] * n, pa.float64()))
            .append_column("_source", pa.array([batch.source] * n, pa.string()))
            .append_column("_endpoint", pa.array([batch.endpoint] * n, pa.string()))
            .append_column("_decimal_places", pa.array([decimal_places(batch.rows)] * n, pa.int64())))


@contextlib.contextmanager
def _staging_writer(path) -> Iterator[pq.ParquetWriter]:
    """A Parquet writer of staged rows; a failure part-way leaves no staging file behind."""
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        with path.open("wb") as handle, pq.ParquetWriter(handle, STAGING_SCHEMA, compression="snappy") as writer:
            yield writer
    except BaseException:
        if path.exists():
            path.unlink()
        raise


@dataclass
class StageSummary:
    path: str | None
    pages: int = 0
    candles: int = 0
    open_times: list[int] = field(default_factory=list)


def stage_ranges(source: KlineSource, symbol: str, interval: str, ranges: list[tuple[int, int]], path,
                 *, progress: bool = False, keep_times: bool = False) -> StageSummary:
    """Page ``ranges`` (half-open, on ``open_time``) from ``source`` into one staging file at ``path``
    (``keep_times``: also list the open times staged, for the gap check)."""
    summary = StageSummary(str(path))
    step = interval_ms(interval)
    total_pages = sum(-(-((end - start) // step) // 1000) for start, end in ranges) or 1
    started = last_report = time.monotonic()
    with _staging_writer(path) as writer:
        for start, end in ranges:
            for batch in source.batches(symbol, interval, start, end):
                summary.pages += 1
                if batch.rows:
                    writer.write_table(_batch_table(batch))
                    summary.candles += len(batch.rows)
                    if keep_times:
                        summary.open_times.extend(row[0] for row in batch.rows)
                if progress and time.monotonic() - last_report >= PROGRESS_EVERY_S:
                    last_report = time.monotonic()
                    elapsed = last_report - started
                    fraction = min(summary.pages / total_pages, 1.0)
                    log.info("fetch progress", symbol=symbol, interval=interval,
                             pages=summary.pages, pages_total=total_pages, candles=summary.candles,
                             percent=round(100 * fraction, 1),
                             eta_s=round(elapsed / fraction - elapsed, 1) if fraction else None)
    return summary


@dataclass
class FetchSummary:
    symbol: str
    interval: str
    start_ms: int
    end_ms: int
    path: str | None
    pages: int = 0
    candles: int = 0


def fetch_to_staging(source: KlineSource, symbol: str, window: Window, path) -> FetchSummary:
    """Page ``window`` from ``source`` into a staging Parquet file at ``path``."""
    summary = FetchSummary(symbol, window.interval, window.start_ms, window.end_ms, str(path))
    if window.slots == 0:
        summary.path = None
        return summary
    staged = stage_ranges(source, symbol, window.interval, [(window.start_ms, window.end_ms)], path, progress=True)
    summary.pages, summary.candles = staged.pages, staged.candles
    return summary


def read_staged(paths: list[str]) -> pa.Table:
    tables = []
    for location in paths:
        if location:
            with resolve_root(location).open("rb") as handle:
                tables.append(pq.read_table(handle))
    return pa.concat_tables(tables) if tables else STAGING_SCHEMA.empty_table()


def staged_exists(location: str | None) -> bool:
    return bool(location) and resolve_root(location).exists()


# -- where a series' history begins ------------------------------------------------------
def history_start_ms(source: KlineSource, state: SeriesState, settings: Settings, symbol: str,
                     interval: str) -> int:
    """Where the series' history begins: the symbol's first candle on Binance (looked up once, then
    kept with the gap registry), never before INGEST_START's grid slot. Nothing before it is a gap
    and nothing before it is requested."""
    floor = floor_to_grid(settings.ingest_start_ms, interval)
    first = state.first_open_ms
    if first is None:
        lookup = getattr(source, "first_open_ms", None)
        first = lookup(symbol, interval) if lookup is not None else None
        if first is None:  # no candle yet (or a source that cannot tell): nothing to remember
            return floor
        state.set_first_open_ms(first)
        log.info("first candle", symbol=symbol, interval=interval, first_open=ms_to_utc(first).isoformat(),
                 status="ok")
    return max(floor, first)


# -- gap check ---------------------------------------------------------------------------
@dataclass
class GapSummary:
    symbol: str
    interval: str
    checked_start_ms: int
    checked_end_ms: int
    gaps_found: int = 0
    gaps_filled: int = 0
    known_gap_slots: int = 0
    skipped_known_slots: int = 0
    refetched_ranges: list[tuple[int, int]] = field(default_factory=list)
    quarantined_days: list[int] = field(default_factory=list)
    path: str | None = None


def gap_check(source: KlineSource, store: RawStore, registry: GapRegistry, symbol: str, window: Window,
              staged: list[str], *, lookback_days: int, floor_ms: int, now: int, path,
              history_start_ms: int | None = None) -> GapSummary:
    """Find missing slots in ``window`` plus the lookback, refetch them, record Binance's holes.

    ``floor_ms``: nothing before it is checked. ``history_start_ms``: where the series' history
    begins (its first candle): slots before it are no gap. Every run also refetches whole the
    days on the quarantine record, wherever they lie, and a scheduled run (``lookback_days``)
    the known gaps due for a re-check.
    """
    interval = window.interval
    checked_end = window.end_ms
    checked_start = min(window.start_ms, checked_end - lookback_days * DAY_MS)
    if lookback_days:
        # Airflow down for longer than the lookback (catchup is off): resume from the newest
        # stored candle, or those candles would never be fetched.
        newest = _newest_close_before(store, symbol, interval, max(floor_ms, checked_start))
        if newest is not None:
            checked_start = min(checked_start, newest + 1)
    series_start = floor_ms if history_start_ms is None else history_start_ms
    checked_start = ceil_to_grid(max(floor_ms, series_start, checked_start), interval)
    summary = GapSummary(symbol, interval, checked_start, checked_end, path=None)
    holes: list[tuple[int, int]] = []
    if checked_end > checked_start:
        staged_times = pc.cast(read_staged(staged).column("open_time"), pa.int64()).to_numpy()
        stored_times = store.open_times(interval, symbol, checked_start, checked_end)
        holes = missing_ranges(np.concatenate([staged_times, stored_times]), checked_start, checked_end, interval)
        summary.gaps_filled = registry.resolve(holes, checked_start, checked_end)
    if lookback_days:
        # Known gaps due for a re-check, wherever they lie (never before the series' first candle).
        holes += [(max(s, series_start), e) for s, e in registry.due_outside(checked_start, checked_end, now)
                  if e > series_start]
    # A quarantined day is refetched whole, whoever touches it first: the record keeps it until
    # every slot is back or is a known gap (see settle_quarantined).
    last_closed = closed_end(now, interval)
    for day in store.quarantined_days(interval, symbol)[:MAX_QUARANTINED_DAYS_PER_RUN]:
        day_start, day_end = ceil_to_grid(max(day, series_start), interval), min(day + DAY_MS, last_closed)
        if day_start < day_end:
            summary.quarantined_days.append(day)
            holes += missing_ranges(np.empty(0, np.int64), day_start, day_end, interval)
    holes = _merged(holes)
    summary.gaps_found = slot_count(holes, interval)
    refetch, skipped = registry.to_refetch(holes, now)
    summary.skipped_known_slots = slot_count(skipped, interval)
    summary.refetched_ranges = refetch
    if not refetch:
        return summary
    staged_refetch = stage_ranges(source, symbol, interval, refetch, path, keep_times=True)
    summary.path = str(path)
    found = np.asarray(staged_refetch.open_times, dtype=np.int64)
    still_missing = [r for start, end in refetch for r in missing_ranges(found, start, end, interval)]
    still_missing = _wait_for_publication(source, symbol, interval, still_missing, checked_end, now, path)
    summary.gaps_filled += summary.gaps_found - summary.skipped_known_slots - slot_count(still_missing, interval)
    known = registry.record(refetch, still_missing, now)
    summary.known_gap_slots = sum(g.missing_slots for g in known
                                  if g.start_ms < checked_end and checked_start < g.end_ms)
    if still_missing:
        log.warning("binance lacks candles", symbol=symbol, interval=interval, status="known_gap",
                    ranges=[f"{ms_to_utc(s).isoformat()}/{ms_to_utc(e).isoformat()}" for s, e in still_missing])
    return summary


def _wait_for_publication(source: KlineSource, symbol: str, interval: str, still_missing: list[tuple[int, int]],
                          checked_end: int, now: int, path) -> list[tuple[int, int]]:
    """Candles that closed under PUBLISH_GRACE_MS ago may not be served yet: that is no outage.
    Poll for them (inside the task: waiting is not failing) until they arrive or the grace has
    passed; then what is still missing is a hole. Arrivals are appended to the staging file."""
    tail = [r for r in still_missing if r[1] >= checked_end]  # (a quarantined day may reach past the window)
    if not tail:
        return still_missing
    started = _monotonic()
    elapsed_ms = 0.0
    extra = STAGING_SCHEMA.empty_table()
    while tail and now + elapsed_ms - checked_end < PUBLISH_GRACE_MS:
        log.info("waiting for just-closed candles", symbol=symbol, interval=interval, status="waiting",
                 missing_from=ms_to_utc(tail[0][0]).isoformat(), poll_s=PUBLISH_POLL_S)
        _sleep(PUBLISH_POLL_S)
        elapsed_ms = (_monotonic() - started) * 1000
        start, end = tail[0]
        arrived = [batch for batch in source.batches(symbol, interval, start, end) if batch.rows]
        if arrived:
            extra = pa.concat_tables([extra, *(_batch_table(b) for b in arrived)])
            times = np.asarray([row[0] for b in arrived for row in b.rows], dtype=np.int64)
            tail = missing_ranges(times, start, end, interval)
    if extra.num_rows:
        table = pa.concat_tables([read_staged([str(path)]), extra])
        with _staging_writer(path) as writer:
            writer.write_table(table)
    return [r for r in still_missing if r[1] < checked_end] + tail


def settle_quarantined(store: RawStore, registry: GapRegistry, symbol: str, interval: str, *,
                       history_start: int, now: int) -> list[int]:
    """Take off the quarantine record the days whose every slot (from the series' first candle up to
    the last closed one) is stored or is a known gap; returns them."""
    known = registry.load() if store.quarantined_days(interval, symbol) else []
    last_closed = closed_end(now, interval)

    def complete(day: int) -> bool:
        start, end = max(day, history_start), min(day + DAY_MS, last_closed)
        if start >= end:  # nothing of the day is history (before the first candle) or closed yet
            return True
        holes = missing_ranges(store.open_times(interval, symbol, start, end), start, end, interval)
        return all(any(g.start_ms <= s and e <= g.end_ms for g in known) for s, e in holes)

    done = store.settle_quarantined(interval, symbol, complete)
    if done:
        log.info("quarantined days whole again", symbol=symbol, interval=interval, status="restored",
                 days=[ms_to_utc(d).date().isoformat() for d in done])
    return done


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


def _merged(ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Sorted, overlapping or touching ranges joined."""
    merged: list[tuple[int, int]] = []
    for start, end in sorted(ranges):
        if merged and start <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], end))
        else:
            merged.append((start, end))
    return merged


def _newest_close_before(store: RawStore, symbol: str, interval: str, before_ms: int) -> int | None:
    """Newest stored close time, looking first at the day just before ``before_ms`` (one stat on
    a store kept up to date) and listing every partition only when that day is missing."""
    day = day_start_ms(before_ms - 1)
    if store.existing_days(interval, symbol, [day]):
        table = store.read_day(interval, symbol, day, columns=["close_time"])
        if table is not None and table.num_rows:
            return int(pc.max(pc.cast(table.column("close_time"), pa.int64())).as_py())
    return newest_stored_close_ms(store, symbol, interval)


def newest_stored_close_ms(store: RawStore, symbol: str, interval: str, *, since_day_ms: int | None = None,
                           now: int | None = None) -> int | None:
    """Close time of the newest stored candle. ``since_day_ms``: a day known to hold candles (one this
    run wrote): only the days from today back to it are probed, instead of listing every partition."""
    if since_day_ms is not None:
        today = day_start_ms(now_ms() if now is None else now)
        days = store.existing_days(interval, symbol, range(today, since_day_ms - 1, -DAY_MS))
    else:
        days = reversed(store.days(interval, symbol))
    for day in days:
        table = store.read_day(interval, symbol, day, columns=["close_time"])
        if table is not None and table.num_rows:
            return int(pc.max(pc.cast(table.column("close_time"), pa.int64())).as_py())
    return None


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


__all__ = [
    "BinanceRestSource", "DataIngestion", "FetchSummary", "GapSummary", "IngestSummary", "InvalidInput",
    "KlineBatch", "KlineSource", "StageSummary", "Window", "WindowNotClosed", "WriteSummary", "check_interval",
    "check_symbol", "configured_symbol", "emit_ingest_metrics", "fetch_to_staging", "gap_check", "history_start_ms",
    "newest_stored_close_ms", "read_staged", "resolve_window", "settle_quarantined", "stage_ranges",
    "staged_exists", "staging_root", "write_staged",
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
