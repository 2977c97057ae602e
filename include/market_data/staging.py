"""Staging files: fetched candles parked as Parquet, with their provenance, until written.

Each staged row carries the metadata of the response it came from (:data:`STAGING_SCHEMA`), so
every day partition written later gets the provenance of its own rows.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field
from typing import Iterator

import pyarrow as pa
import pyarrow.parquet as pq

from include.market_data import observability
from include.market_data.config import Settings
from include.market_data.schema import RAW_SCHEMA, decimal_places, rows_to_table
from include.market_data.sources import KlineBatch, KlineSource
from include.market_data.storage import resolve_root
from include.market_data.timeframes import interval_ms
from include.market_data.windows import Window

log = observability.get_logger(__name__)

STAGING_DIR = "_staging"
PROGRESS_EVERY_S = 10.0
# Provenance travels with each staged row so each day partition gets the metadata of
# the response its rows came from.
STAGING_SCHEMA = RAW_SCHEMA.append(pa.field("_fetched_at", pa.string())).append(
    pa.field("_latency_ms", pa.float64())).append(pa.field("_source", pa.string())).append(
    pa.field("_endpoint", pa.string())).append(pa.field("_decimal_places", pa.int64())).append(
    pa.field("_sha256", pa.string()))


def staging_root(settings: Settings):
    return resolve_root(settings.raw_data_dir) / STAGING_DIR


def _batch_table(batch: KlineBatch) -> pa.Table:
    table = rows_to_table(batch.rows)
    n = table.num_rows
    return (table.append_column("_fetched_at", pa.array([batch.fetched_at] * n, pa.string()))
            .append_column("_latency_ms", pa.array([float(batch.latency_ms)] * n, pa.float64()))
            .append_column("_source", pa.array([batch.source] * n, pa.string()))
            .append_column("_endpoint", pa.array([batch.endpoint] * n, pa.string()))
            .append_column("_decimal_places", pa.array([decimal_places(batch.rows)] * n, pa.int64()))
            .append_column("_sha256", pa.array([batch.sha256] * n, pa.string())))


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


def read_staged(staged: list) -> pa.Table:
    """The rows of staging files (paths), or of tables staged in memory, as one STAGING_SCHEMA table."""
    tables = []
    for item in staged:
        if isinstance(item, pa.Table):
            tables.append(item)
            continue
        if not item:
            continue
        with resolve_root(item).open("rb") as handle:
            table = pq.read_table(handle)
        if "_sha256" not in table.column_names:  # staged before archive provenance existed
            table = table.append_column("_sha256", pa.nulls(table.num_rows, pa.string()))
        tables.append(table)
    return pa.concat_tables(tables) if tables else STAGING_SCHEMA.empty_table()


def staged_exists(location: str | None) -> bool:
    return bool(location) and resolve_root(location).exists()
