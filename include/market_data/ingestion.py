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
import contextlib
import shutil
import tempfile
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from datetime import date, datetime, timezone
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from binance_provider.hooks.errors import BinanceAPIError

from include.market_data import observability
from include.market_data.config import BINANCE_CONN_ID, Settings, load_settings
from include.market_data.gaps import (
    MAX_QUARANTINED_DAYS_PER_RUN, PUBLISH_GRACE_MS, PUBLISH_POLL_S, GapRegistry, GapSummary, SeriesState, gap_check,
    history_start_ms, newest_stored_close_ms, settle_quarantined,
)
from include.market_data.schema import RAW_COLUMNS, validate_raw
from include.market_data.sources import BinanceRestSource, KlineBatch, KlineSource
from include.market_data.staging import (
    PROGRESS_EVERY_S, STAGING_DIR, STAGING_SCHEMA, FetchSummary, StageSummary, _batch_table,
    fetch_to_staging, read_staged, stage_ranges, staged_exists, staging_root,
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


def write_staged(store: RawStore, symbol: str, interval: str, staged: list, *,
                 now: int | None = None) -> WriteSummary:
    """Merge staged rows into the day partitions, with each day's provenance as metadata."""
    return write_rows(store, symbol, interval, read_staged(staged), now=now)


def write_rows(store: RawStore, symbol: str, interval: str, table: pa.Table, *,
               now: int | None = None) -> WriteSummary:
    """Merge rows of STAGING_SCHEMA into the day partitions in one group commit; each day gets the
    provenance of its newest-fetched row (``source``, and ``sha256`` for a day from an archive file)."""
    summary = WriteSummary(symbol, interval)
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
    fetched_text = table.column("_fetched_at")
    fetched = pc.cast(pc.cast(fetched_text, pa.timestamp("us", tz="UTC")), pa.int64()).to_numpy()
    columns = {name: table.column(name) for name in ("_source", "_endpoint", "_latency_ms", "_decimal_places",
                                                      "_sha256")}
    day_provenance: dict[int, dict[str, str]] = {}
    for lo, hi in zip(np.concatenate([[0], boundaries]), np.concatenate([boundaries, [len(days)]])):
        lo, hi = int(lo), int(hi)
        newest = lo + int(np.argmax(fetched[lo:hi]))
        provenance = {
            "source": columns["_source"][newest].as_py(),
            "endpoint": columns["_endpoint"][newest].as_py(),
            "fetched_at": fetched_text[newest].as_py(),
            "latency_ms": f"{columns['_latency_ms'][newest].as_py():.1f}",
            "decimal_places": str(columns["_decimal_places"][newest].as_py()),
        }
        sha256 = columns["_sha256"][newest].as_py()
        if sha256:
            provenance["sha256"] = sha256
        day_provenance[int(days[lo])] = provenance
    for result in store.write(interval, symbol, rows, {}, validated=True, now=now, day_provenance=day_provenance):
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


# -- streaming: fetch, gap check and write a window month by month, overlapped ----------------
@dataclass
class StreamSummary:
    """What :func:`ingest_window` did, summed over its months."""

    symbol: str
    interval: str
    months: int = 0
    candles: int = 0
    pages: int = 0
    gaps_found: int = 0
    gaps_filled: int = 0
    known_gap_slots: int = 0
    written: WriteSummary | None = None
    not_in_archive: list[tuple[int, int]] = field(default_factory=list)


def _split_batch(batch: KlineBatch, end_ms: int) -> tuple[KlineBatch | None, KlineBatch | None]:
    """The rows of ``batch`` before ``end_ms`` and from it on (same provenance)."""
    if not batch.rows or batch.rows[-1][0] < end_ms:
        return batch, None
    if batch.rows[0][0] >= end_ms:
        return None, batch
    cut = next(i for i, row in enumerate(batch.rows) if row[0] >= end_ms)
    return (replace(batch, rows=batch.rows[:cut]), replace(batch, rows=batch.rows[cut:]))


def ingest_window(source: KlineSource, store: RawStore, registry: GapRegistry, symbol: str, window: Window, *,
                  now: int, history_start: int, staging_dir: Path, gap_source: KlineSource | None = None,
                  check_gaps: bool = True, quarantined_within: tuple[int, int] | None = None,
                  progress_label: str = "ingest progress") -> StreamSummary:
    """Ingest ``window`` one calendar month at a time: while a month is gap-checked and written
    (one group commit), the pages of the next months are already in flight. Memory holds a month
    or two, whatever the window's length.

    ``gap_source`` refetches holes (default ``source``); without ``check_gaps`` (the archive alone)
    what the source lacks is left as it is, never recorded as Binance's. The quarantine record's
    days are refetched with the last month (or those in ``quarantined_within``).
    """
    from include.market_data.archive import month_spans

    summary = StreamSummary(symbol, window.interval)
    written = summary.written = WriteSummary(symbol, window.interval)
    clipped = window.clipped_to(history_start)
    spans = month_spans(clipped.start_ms, clipped.end_ms)
    if not spans:
        return summary
    gap_source = gap_source or source
    started = last_report = time.monotonic()
    recorded_gaps: list[bool] = []  # per month: did its check record a known gap?

    def write_month(index: int, span: tuple[int, int], batches: list[KlineBatch]) -> None:
        month = Window(window.interval, *span)
        # A month's pages stay in memory (a month of 15m is ~3,000 rows): staged as a table.
        staged: list = [_batch_table(batch) for batch in batches if batch.rows]
        if check_gaps:
            last = index == len(spans) - 1
            within = quarantined_within if quarantined_within is not None else (None if last else (0, 0))
            gaps = gap_check(gap_source, store, registry, symbol, month, staged, lookback_days=0,
                             floor_ms=month.start_ms, now=now, history_start_ms=history_start,
                             path=staging_dir / f"refetch-{index:05d}.parquet", quarantined_within=within)
            staged += [p for p in [gaps.path] if p]
            summary.gaps_found += gaps.gaps_found
            summary.gaps_filled += gaps.gaps_filled
            recorded_gaps.append(gaps.known_gap_slots > 0)
        result = write_staged(store, symbol, window.interval, staged, now=now)
        written.days += result.days
        written.rows_added += result.rows_added
        written.rows_revised += result.rows_revised
        written.partitions_written += result.partitions_written
        written.newest_close_ms = result.newest_close_ms or written.newest_close_ms
        for path in staged:
            if not isinstance(path, pa.Table):
                Path(path).unlink(missing_ok=True)

    pages = iter(source.batches(symbol, window.interval, clipped.start_ms, clipped.end_ms))
    carry: KlineBatch | None = None
    with contextlib.closing(pages) if hasattr(pages, "close") else contextlib.nullcontext(), \
            ThreadPoolExecutor(max_workers=1, thread_name_prefix="raw-writer") as writer_pool:
        pending: deque[Future] = deque()
        for index, span in enumerate(spans):
            month_batches: list[KlineBatch] = []
            while True:
                if carry is not None:
                    batch, carry = carry, None
                else:
                    batch = next(pages, None)
                    if batch is None:
                        break
                    summary.pages += 1
                head, carry = _split_batch(batch, span[1])
                if head is not None:
                    month_batches.append(head)
                    summary.candles += len(head.rows)
                if carry is not None:
                    break
            pending.append(writer_pool.submit(write_month, index, span, month_batches))
            if len(pending) > 1:  # the writer is at most one month behind the fetch
                pending.popleft().result()
            summary.months += 1
            if time.monotonic() - last_report >= PROGRESS_EVERY_S:
                last_report = time.monotonic()
                elapsed = last_report - started
                done = index + 1
                log.info(progress_label, symbol=symbol, interval=window.interval, months=done,
                         months_total=len(spans), candles=summary.candles,
                         eta_s=round(elapsed / done * (len(spans) - done), 1))
        while pending:
            pending.popleft().result()
    if check_gaps:
        summary.gaps_filled += _resolve_gaps_across_months(store, registry, symbol, clipped)
        if any(recorded_gaps):  # counted once over the window (a gap may span months, merged into one)
            summary.known_gap_slots = sum(g.missing_slots for g in registry.load()
                                          if g.start_ms < clipped.end_ms and clipped.start_ms < g.end_ms)
    summary.not_in_archive = list(getattr(source, "not_in_archive", []))
    return summary


def _resolve_gaps_across_months(store: RawStore, registry: GapRegistry, symbol: str, window: Window) -> int:
    """A known gap spanning a month boundary lies inside no single month's check: once the window
    covering it is stored, forget it if every slot of it is there now (Binance published them)."""
    from include.market_data.archive import month_start_ms
    from include.market_data.gaps import missing_ranges

    filled = 0
    for gap in registry.load():
        inside = window.start_ms <= gap.start_ms and gap.end_ms <= window.end_ms
        if inside and month_start_ms(gap.start_ms) != month_start_ms(gap.end_ms - 1):
            stored = store.open_times(window.interval, symbol, gap.start_ms, gap.end_ms)
            holes = missing_ranges(stored, gap.start_ms, gap.end_ms, window.interval)
            filled += registry.resolve(holes, gap.start_ms, gap.end_ms)
    return filled


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
    source: str = "rest"
    not_in_archive: list[str] = field(default_factory=list)  # source=archive: what the archive lacked

    def as_dict(self) -> dict:
        return asdict(self)


class DataIngestion:
    """Ingest closed klines into raw Parquet from a plain Python shell or a task.

    >>> asyncio.run(DataIngestion().ingest_timeframe('1h', datetime.utcnow() - timedelta(days=7), datetime.utcnow()))

    ``source``: ``auto`` (default: Binance's public data archive for whole months and days that are
    published, REST for the rest), ``archive`` (the archive alone) or ``rest``. A ``KlineSource``
    given to the constructor stands for REST.
    """

    def __init__(self, settings: Settings | None = None, source: KlineSource | None = None,
                 conn_id: str = BINANCE_CONN_ID, archive_hook=None):
        self.settings = settings or load_settings()
        self._source = source
        self.conn_id = conn_id
        self.archive_hook = archive_hook
        self.store = RawStore(self.settings.raw_data_dir)

    @property
    def source(self) -> KlineSource:
        """The REST source."""
        if self._source is None:
            self._source = BinanceRestSource(self.settings, self.conn_id)
        return self._source

    def candle_source(self, kind: str) -> KlineSource:
        """The source ``kind`` names, reporting archive files it rejects and the archive/REST
        comparison of the newest archived day to the quality report."""
        from include.market_data.archive import make_source

        return make_source(kind, self.settings, rest=None if kind == "archive" else self.source,
                           archive_hook=self.archive_hook, on_rejected=self._report_rejection,
                           on_reconciled=self._report_reconciliation)

    def _report_rejection(self, rejection) -> None:
        from include.market_data.quality import QualityReport, file_rejected

        finding = file_rejected(rejection.symbol, rejection.interval, rejection.period_start_ms, rejection.reason,
                                rejection.expected_sha256 or "",
                                rejection.found_sha256 if rejection.reason == "checksum" else rejection.detail,
                                rejection.url)
        QualityReport(self.settings.raw_data_dir).record(rejection.interval, [finding], check="archive")

    def _report_reconciliation(self, symbol: str, interval: str, archive_rows: list, rest_rows: list,
                               url: str = "") -> None:
        """The newest archived day, compared candle by candle with REST (REST's rows are kept)."""
        from include.market_data.quality import QualityReport, reconcile
        from include.market_data.schema import rows_to_table

        findings = reconcile(symbol, interval, rows_to_table(archive_rows), rows_to_table(rest_rows), source=url)
        QualityReport(self.settings.raw_data_dir).record(interval, findings, check="archive_rest")

    async def ingest_timeframe(self, interval: str, start: datetime | date | str | int,
                               end: datetime | date | str | int, symbol: str | None = None,
                               source: str = "auto") -> IngestSummary:
        """Ingest ``[start, end)``; a coroutine so the seed's ``asyncio.run(...)`` line works."""
        return await asyncio.to_thread(self.ingest, interval, start, end, symbol, source=source)

    def ingest(self, interval: str, start, end, symbol: str | None = None, *,
               now: int | None = None, source: str = "auto") -> IngestSummary:
        """Ingest ``[start, end)`` of ``symbol`` (default: the first of BINANCE_SYMBOLS), a month at a time."""
        from include.market_data.archive import SOURCE_KINDS

        started = time.monotonic()
        symbol = configured_symbol(symbol, self.settings)
        if source not in SOURCE_KINDS:
            raise InvalidInput(f"source={source!r} is not one of {', '.join(SOURCE_KINDS)}")
        now = now_ms() if now is None else now
        window = resolve_window(interval, start, end, settings=self.settings, now=now)
        candles = self.candle_source(source)
        registry = GapRegistry(self.settings.raw_data_dir, symbol, interval)
        history = history_start_ms(candles, SeriesState(self.settings.raw_data_dir, symbol, interval),
                                   self.settings, symbol, interval)
        staging = Path(tempfile.mkdtemp(prefix=f"ingest_{symbol}_{interval}_"))
        try:
            streamed = ingest_window(candles, self.store, registry, symbol, window, now=now, history_start=history,
                                     staging_dir=staging, gap_source=None if source == "archive" else self.source,
                                     check_gaps=source != "archive")
            if source != "archive":
                settle_quarantined(self.store, registry, symbol, interval, history_start=history, now=now)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        written = streamed.written
        emit_ingest_metrics(interval, candles=streamed.candles,
                            gaps=GapSummary(symbol, interval, window.start_ms, window.end_ms,
                                            gaps_found=streamed.gaps_found, gaps_filled=streamed.gaps_filled),
                            newest_close_ms=written.newest_close_ms, now=now)
        summary = IngestSummary(
            symbol=symbol, interval=interval,
            start=ms_to_utc(window.start_ms).isoformat(), end=ms_to_utc(window.end_ms).isoformat(),
            candles_fetched=streamed.candles, pages=streamed.pages,
            rows_added=written.rows_added, rows_revised=written.rows_revised,
            days_touched=[ms_to_utc(d).date().isoformat() for d in written.days],
            gaps_found=streamed.gaps_found, gaps_filled=streamed.gaps_filled,
            known_gap_slots=streamed.known_gap_slots,
            seconds=round(time.monotonic() - started, 3),
            source=source,
            not_in_archive=[f"{ms_to_utc(s).isoformat()}/{ms_to_utc(e).isoformat()}"
                            for s, e in streamed.not_in_archive],
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
    parser.add_argument("--source", default="auto", choices=["auto", "archive", "rest"],
                        help="auto (default): the public data archive for published months and days, REST "
                             "for the rest; archive: the archive alone; rest: REST alone")
    parser.add_argument("--curate", action="store_true", help="curate the days written afterwards")
    args = parser.parse_args(argv)
    try:
        settings = load_settings()
        end = datetime.now(timezone.utc) if args.end == "now" else args.end
        for symbol in [args.symbol] if args.symbol else list(settings.symbols):
            summary = DataIngestion(settings).ingest(args.interval, args.start, end, symbol, source=args.source)
            print(json.dumps({k: v for k, v in summary.as_dict().items() if k != "days_touched"}))
            if args.curate:
                from include.market_data.curation import DataCuration

                print(DataCuration(settings).curate_timeframe(args.interval, symbol, args.start, end))
    except ValueError as exc:  # InvalidInput, ConfigError, CurationError: one line naming the input
        parser.exit(2, f"error: {exc}\n")
    except BinanceAPIError as exc:  # banned (with its end), unavailable, rate-limited: one line, no traceback
        parser.exit(1, f"error: {exc}\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
