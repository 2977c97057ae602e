"""The task bodies of ``binance_klines_<interval>``, as plain functions over JSON values.

DAG files only wire these together. Each returns paths, counts and ranges (what goes
through XCom) — never kline data.
"""

from __future__ import annotations

import functools
import re
import shutil
import time
from pathlib import Path

from airflow.sdk.exceptions import AirflowFailException
from binance_provider.hooks.errors import BinanceAPIError

from include.market_data import observability
from include.market_data.config import ConfigError, Settings, load_settings
from include.market_data.curation import CurationError, DataCuration
from include.market_data.gaps import GapRegistry
from include.market_data.ingestion import (
    BinanceRestSource, InvalidInput, KlineSource, Window, check_interval, check_symbol, emit_ingest_metrics,
    fetch_to_staging, gap_check, newest_stored_close_ms, resolve_window, staging_root, write_staged,
)
from include.market_data.storage import RawStore
from include.market_data.timeframes import floor_to_grid, now_ms, to_ms

log = observability.get_logger(__name__)


def fail_fast_on_user_error(task_body):
    """A wrong input — bad params or config, a symbol Binance does not know — fails the task
    at once with one message naming it: retrying cannot fix it. Transient trouble (5xx, 429,
    a ban, a window not closed yet) still raises as is, for Airflow's retries."""

    @functools.wraps(task_body)
    def wrapper(*args, **kwargs):
        try:
            return task_body(*args, **kwargs)
        except (InvalidInput, ConfigError, CurationError) as exc:
            raise AirflowFailException(str(exc)) from None
        except BinanceAPIError as exc:
            if type(exc) is BinanceAPIError:  # a 4xx other than 429/418: the request is wrong
                raise AirflowFailException(str(exc)) from None
            raise

    return wrapper


def _run_dir(settings: Settings, interval: str, run_id: str):
    safe = re.sub(r"[^A-Za-z0-9_.-]", "_", run_id)[:200]
    return staging_root(settings) / interval / safe


# A run's staging dir is removed by write_raw; one older than this belongs to a run that failed
# for good (DAG runs time out after 12 h).
ABANDONED_STAGING_S = 2 * 24 * 3600


def _drop_abandoned_staging(settings: Settings, interval: str) -> None:
    root = staging_root(settings) / interval
    if not isinstance(root, Path) or not root.exists():
        return
    cutoff = time.time() - ABANDONED_STAGING_S
    for run_dir in root.iterdir():
        if run_dir.is_dir() and run_dir.stat().st_mtime < cutoff:
            shutil.rmtree(run_dir, ignore_errors=True)
            log.info("abandoned staging removed", interval=interval, path=str(run_dir), status="cleaned")


def run_window(interval: str, data_interval_start, data_interval_end, params: dict | None, *,
               settings: Settings, now: int | None = None) -> Window:
    """The window a run ingests.

    Manual ``start``/``end`` params: candles whose open_time is in ``[start, end)``, ``end``
    clipped to the last closed candle. Otherwise the run's data interval: the candles that
    closed inside it (both ends floored to the grid — for 15m/1h/4h/1d/1w runs this is
    exactly the candles opening inside it), and the run retries until they have closed.
    """
    params = params or {}
    if params.get("start") or params.get("end"):
        if not (params.get("start") and params.get("end")):
            raise InvalidInput("params start and end must be given together")
        return resolve_window(interval, params["start"], params["end"], settings=settings, now=now)
    start = floor_to_grid(to_ms(data_interval_start), interval)
    end = floor_to_grid(to_ms(data_interval_end), interval)
    if start == end:
        return Window(interval, start, end)
    return resolve_window(interval, start, end, settings=settings, now=now, require_closed=True)


def run_symbols(params: dict | None, settings: Settings) -> list[str]:
    symbols = (params or {}).get("symbols") or list(settings.symbols)
    if isinstance(symbols, str):
        symbols = [s.strip() for s in symbols.split(",") if s.strip()]
    symbols = [check_symbol(s) for s in symbols]
    unknown = [s for s in symbols if s not in settings.symbols]
    if unknown:  # curation (and the signal) only know the configured symbols
        raise InvalidInput(f"symbols {unknown} are not in BINANCE_SYMBOLS ({','.join(settings.symbols)})")
    return symbols


@fail_fast_on_user_error
def fetch(interval: str, data_interval_start, data_interval_end, params: dict | None, run_id: str, *,
          settings: Settings | None = None, source: KlineSource | None = None, now: int | None = None) -> dict:
    """Page the run's window of every symbol into staging files."""
    settings = settings or load_settings()
    check_interval(interval, settings)
    symbols = run_symbols(params, settings)
    window = run_window(interval, data_interval_start, data_interval_end, params, settings=settings, now=now)
    _drop_abandoned_staging(settings, interval)
    source = source or BinanceRestSource(settings)
    staged = []
    for symbol in symbols:
        summary = fetch_to_staging(source, symbol, window, _run_dir(settings, interval, run_id) / f"{symbol}_fetch.parquet")
        emit_ingest_metrics(interval, candles=summary.candles)
        log.info("fetch done", interval=interval, symbol=symbol, window=window.describe(),
                 pages=summary.pages, candles=summary.candles, status="ok")
        staged.append({"symbol": symbol, "path": summary.path, "pages": summary.pages, "candles": summary.candles})
    # A manual window is exactly what the user asked for; scheduled runs also re-check the
    # last GAP_CHECK_LOOKBACK_DAYS for holes.
    manual = bool((params or {}).get("start") or (params or {}).get("end"))
    return {"interval": interval, "run_id": run_id, "start_ms": window.start_ms, "end_ms": window.end_ms,
            "lookback_days": 0 if manual else settings.gap_check_lookback_days, "symbols": staged}


@fail_fast_on_user_error
def check_gaps(fetched: dict, *, settings: Settings | None = None, source: KlineSource | None = None,
               now: int | None = None) -> dict:
    """Refetch holes in the window and the lookback; record what Binance really lacks."""
    settings = settings or load_settings()
    interval = fetched["interval"]
    window = Window(interval, fetched["start_ms"], fetched["end_ms"])
    source = source or BinanceRestSource(settings)
    store = RawStore(settings.raw_data_dir)
    now = now_ms() if now is None else now
    result = {**fetched, "symbols": []}
    for item in fetched["symbols"]:
        symbol = item["symbol"]
        summary = gap_check(
            source, store, GapRegistry(settings.raw_data_dir, symbol, interval), symbol, window,
            [item["path"]] if item["path"] else [], lookback_days=fetched["lookback_days"],
            floor_ms=floor_to_grid(settings.ingest_start_ms, interval), now=now,
            history_start_ms=floor_to_grid(settings.ingest_start_ms, interval),
            path=_run_dir(settings, interval, fetched["run_id"]) / f"{symbol}_refetch.parquet",
        )
        emit_ingest_metrics(interval, gaps=summary)
        log.info("gap check done", interval=interval, symbol=symbol, gaps_found=summary.gaps_found,
                 gaps_filled=summary.gaps_filled, known_gap_slots=summary.known_gap_slots,
                 skipped_known_slots=summary.skipped_known_slots, status="ok")
        result["symbols"].append({
            **item, "refetch_path": summary.path, "gaps_found": summary.gaps_found,
            "gaps_filled": summary.gaps_filled, "known_gap_slots": summary.known_gap_slots,
            "checked_start_ms": summary.checked_start_ms, "checked_end_ms": summary.checked_end_ms,
        })
    return result


@fail_fast_on_user_error
def write_raw(checked: dict, *, settings: Settings | None = None, now: int | None = None) -> dict:
    """Merge the staged rows into the day partitions; drop the staging files."""
    settings = settings or load_settings()
    interval = checked["interval"]
    store = RawStore(settings.raw_data_dir)
    result = {"interval": interval, "symbols": []}
    for item in checked["symbols"]:
        symbol = item["symbol"]
        staged = [p for p in (item.get("path"), item.get("refetch_path")) if p]
        summary = write_staged(store, symbol, interval, staged)
        newest = newest_stored_close_ms(store, symbol, interval, since_day_ms=max(summary.days, default=None), now=now)
        emit_ingest_metrics(interval, newest_close_ms=newest, now=now)
        log.info("write done", interval=interval, symbol=symbol, days=len(summary.days),
                 rows_added=summary.rows_added, rows_revised=summary.rows_revised, status="ok")
        result["symbols"].append({"symbol": symbol, "days": summary.days, "rows_added": summary.rows_added,
                                  "rows_revised": summary.rows_revised})
    run_dir = _run_dir(settings, interval, checked["run_id"])
    if isinstance(run_dir, Path):
        shutil.rmtree(run_dir, ignore_errors=True)
    elif run_dir.exists():
        run_dir.fs.rm(run_dir.path, recursive=True)
    return result


@fail_fast_on_user_error
def curate(written: dict, *, settings: Settings | None = None) -> dict:
    """Recompute the curated days this run touched (and the days whose warm-up changed)."""
    settings = settings or load_settings()
    interval = written["interval"]
    curation = DataCuration(settings)
    result = {"interval": interval, "symbols": []}
    for item in written["symbols"]:
        summary = curation.curate_days(interval, item["symbol"], item["days"])
        result["symbols"].append({"symbol": item["symbol"], "days_written": len(summary.days_written),
                                  "rows": summary.rows, "skipped": summary.skipped})
    return result
