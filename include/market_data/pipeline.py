"""The task bodies of ``binance_klines_<interval>``, as plain functions over JSON values.

DAG files only wire these together. ``plan`` checks the run's inputs and names its symbols;
``fetch``, ``check_gaps`` and ``write_raw`` work on one symbol each (the DAG maps them over the
symbols, so one bad symbol fails only its own task instances); ``curate`` takes whatever the
symbols wrote; ``report`` fails the run when a symbol was not ingested. Each returns paths,
counts and ranges (what goes through XCom) — never kline data.

Every task is a transaction over its partition: cleared and re-run, whatever became of the run
since, it redoes its work and leaves the same files. A task whose staging file is gone (written
and removed, or cleaned up as abandoned) fetches its ranges again.
"""

from __future__ import annotations

import contextlib
import functools
import re
import shutil
import time
from pathlib import Path

from airflow.sdk.exceptions import AirflowFailException, AirflowSkipException
from binance_provider.hooks.errors import BinanceAPIError

from include.market_data import observability
from include.market_data.config import ConfigError, Settings, load_settings
from include.market_data.curation import CurationError, DataCuration
from include.market_data.gaps import (
    GapRegistry, SeriesState, gap_check, history_start_ms, newest_stored_close_ms, settle_quarantined,
)
from include.market_data.ingestion import emit_ingest_metrics, write_staged
from include.market_data.sources import BinanceRestSource, KlineSource
from include.market_data.staging import fetch_to_staging, stage_ranges, staged_exists, staging_root
from include.market_data.storage import OpenCandleRefused, RawStore, prune_quarantine, resolve_root
from include.market_data.timeframes import floor_to_grid, ms_to_utc, now_ms, to_ms
from include.market_data.windows import (
    InvalidInput, Window, WindowNotClosed, check_interval, check_symbol, resolve_window,
)

log = observability.get_logger(__name__)

# A scheduled run may start a moment before its last candle closes (clock skew, a 15m job
# running a 30m DAG): fetch waits that long inside the task. A window further off is an error.
MAX_CLOSE_WAIT_S = 300.0
# A run's staging dir is removed by write_raw; one older than this belongs to a run that failed
# (DAG runs time out after 12 h). Removing it is safe: a cleared task fetches again.
ABANDONED_STAGING_S = 2 * 24 * 3600
_sleep = time.sleep  # tests run the bounded waits without waiting


def fail_fast_on_user_error(task_body):
    """A wrong input — bad params or config, a symbol Binance does not know — fails the task
    at once with one message naming it: retrying cannot fix it. Transient trouble (5xx, 429,
    a ban) still raises as is, for Airflow's retries."""

    @functools.wraps(task_body)
    def wrapper(*args, **kwargs):
        try:
            return task_body(*args, **kwargs)
        except (InvalidInput, ConfigError, CurationError, OpenCandleRefused) as exc:
            raise AirflowFailException(str(exc)) from None
        except BinanceAPIError as exc:
            if type(exc) is BinanceAPIError:  # a 4xx other than 429/418/403: the request is wrong
                raise AirflowFailException(str(exc)) from None
            raise

    return wrapper


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", name)[:200]


def _run_dir(settings: Settings, interval: str, run_id: str):
    return staging_root(settings) / interval / _safe(run_id)


def _symbol_dir(settings: Settings, interval: str, run_id: str, symbol: str):
    return _run_dir(settings, interval, run_id) / symbol


def _remove_tree(path) -> None:
    if isinstance(path, Path):
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists():
        path.fs.rm(path.path, recursive=True)


def _drop_abandoned_staging(settings: Settings, interval: str, now_s: float | None = None) -> None:
    """Remove run staging dirs untouched for ABANDONED_STAGING_S, on local disks and object stores."""
    root = staging_root(settings) / interval
    if not root.exists():
        return
    cutoff = (time.time() if now_s is None else now_s) - ABANDONED_STAGING_S
    for run_dir in root.iterdir():
        if not run_dir.is_dir():
            continue
        if _newest_mtime(run_dir) < cutoff:
            _remove_tree(run_dir)
            log.info("abandoned staging removed", interval=interval, path=str(run_dir), status="cleaned")


def _newest_mtime(run_dir) -> float:
    """When anything under a run's staging dir last changed (object stores: the objects' mtimes;
    a dir with no file at all counts as old there, since object stores keep no empty dirs' times)."""
    if isinstance(run_dir, Path):
        times = []
        for path in [run_dir, *run_dir.rglob("*")]:
            with contextlib.suppress(FileNotFoundError):  # another task is removing it
                times.append(path.stat().st_mtime)
        return max(times, default=time.time())
    times = []
    for info in run_dir.fs.find(run_dir.path, detail=True).values():
        modified = info.get("LastModified") or info.get("mtime") or info.get("created")
        if hasattr(modified, "timestamp"):
            times.append(modified.timestamp())
        elif isinstance(modified, (int, float)):
            times.append(float(modified))
    return max(times, default=0.0)


def run_window(interval: str, data_interval_start, data_interval_end, params: dict | None, *,
               settings: Settings, now: int | None = None) -> tuple[Window, str]:
    """The window a run ingests, and where it came from (``params`` or ``data_interval``).

    ``start``/``end`` params (a manual trigger): candles whose open_time is in ``[start, end)``,
    ``end`` clipped to the last closed candle; they win over the run's data interval. Otherwise
    the run's data interval (scheduled, backfill, or a manual run's given or inferred one): the
    candles that closed inside it (both ends floored to the grid — for 15m/1h/4h/1d/1w runs this
    is exactly the candles opening inside it); :class:`WindowNotClosed` if they have not closed.
    """
    params = params or {}
    if params.get("start") or params.get("end"):
        if not (params.get("start") and params.get("end")):
            raise InvalidInput("params start and end must be given together")
        return resolve_window(interval, params["start"], params["end"], settings=settings, now=now), "params"
    if data_interval_start is None or data_interval_end is None:
        raise InvalidInput("the run has no data interval: give params start and end")
    start = floor_to_grid(to_ms(data_interval_start), interval)
    end = floor_to_grid(to_ms(data_interval_end), interval)
    if start == end:
        return Window(interval, start, end), "data_interval"
    return resolve_window(interval, start, end, settings=settings, now=now, require_closed=True), "data_interval"


def _closed_run_window(interval, data_interval_start, data_interval_end, params, *, settings: Settings,
                       now: int | None) -> tuple[Window, str, int]:
    """:func:`run_window`, waiting inside the task (bounded) for a last candle about to close:
    waiting is not failing, so no red try and no Airflow retry for it. Returns the clock used."""
    clock = now_ms() if now is None else now
    try:
        window, origin = run_window(interval, data_interval_start, data_interval_end, params,
                                    settings=settings, now=clock)
        return window, origin, clock
    except WindowNotClosed as exc:
        wait_s = (exc.closes_at_ms - clock) / 1000 + 1.0
        if wait_s > MAX_CLOSE_WAIT_S:
            raise InvalidInput(f"{exc}: more than {MAX_CLOSE_WAIT_S:.0f} s away, so this run's window is "
                               f"not closed yet") from None
        log.info("waiting for the window's last candle to close", interval=interval, wait_s=round(wait_s, 1),
                 status="waiting")
        _sleep(wait_s)
        clock += int(wait_s * 1000)
        window, origin = run_window(interval, data_interval_start, data_interval_end, params,
                                    settings=settings, now=clock)
        return window, origin, clock


def run_symbols(params: dict | None, settings: Settings) -> list[str]:
    symbols = (params or {}).get("symbols") or list(settings.symbols)
    if isinstance(symbols, str):
        symbols = [s.strip() for s in symbols.split(",") if s.strip()]
    symbols = [check_symbol(s) for s in symbols]
    unknown = [s for s in symbols if s not in settings.symbols]
    if unknown:  # curation (and the signal) only know the configured symbols
        raise InvalidInput(f"symbols {unknown} are not in BINANCE_SYMBOLS ({','.join(settings.symbols)})")
    return symbols


def _lookback_days(params: dict | None, settings: Settings) -> int:
    # A params window is exactly what the user asked for; other runs also re-check the last
    # GAP_CHECK_LOOKBACK_DAYS for holes.
    manual = bool((params or {}).get("start") or (params or {}).get("end"))
    return 0 if manual else settings.gap_check_lookback_days


@fail_fast_on_user_error
def plan(interval: str, data_interval_start, data_interval_end, params: dict | None, *,
         settings: Settings | None = None, now: int | None = None) -> list[str]:
    """Check the run's inputs once (config, params, window) and return the symbols to map over."""
    settings = settings or load_settings()
    check_interval(interval, settings)
    symbols = run_symbols(params, settings)
    try:
        window, origin = run_window(interval, data_interval_start, data_interval_end, params,
                                    settings=settings, now=now)
        log.info("run planned", interval=interval, symbols=symbols, window=window.describe(), window_from=origin,
                 status="ok")
    except WindowNotClosed as exc:  # fetch waits for it
        log.info("run planned", interval=interval, symbols=symbols, window_from="data_interval",
                 note=str(exc), status="ok")
    return symbols


def warn_unless_trading(source: KlineSource, symbol: str, interval: str) -> str | None:
    """Log a warning naming the symbol when the exchange does not list it as TRADING (a break or a
    delisting): its candles may stop. An unknown symbol raises Binance's -1121 here, before paging."""
    status = source.symbol_status(symbol)
    if status != "TRADING":
        log.warning("symbol not trading", symbol=symbol, interval=interval, symbol_status=status,
                    status="not_trading")
    return status


@fail_fast_on_user_error
def fetch(interval: str, symbol: str, data_interval_start, data_interval_end, params: dict | None, run_id: str, *,
          settings: Settings | None = None, source: KlineSource | None = None, now: int | None = None) -> dict:
    """Page the run's window of one symbol into its staging file."""
    settings = settings or load_settings()
    check_interval(interval, settings)
    (symbol,) = run_symbols({"symbols": [symbol]}, settings)
    window, origin, now = _closed_run_window(interval, data_interval_start, data_interval_end, params,
                                             settings=settings, now=now)
    _drop_abandoned_staging(settings, interval)
    prune_quarantine(settings.raw_data_dir, settings.quarantine_retention_days)
    source = source or BinanceRestSource(settings)
    warn_unless_trading(source, symbol, interval)
    history = history_start_ms(source, SeriesState(settings.raw_data_dir, symbol, interval), settings, symbol,
                               interval)
    summary = fetch_to_staging(source, symbol, window.clipped_to(history),
                               _symbol_dir(settings, interval, run_id, symbol) / "fetch.parquet")
    emit_ingest_metrics(interval, candles=summary.candles)
    log.info("fetch done", interval=interval, symbol=symbol, window=window.describe(), window_from=origin,
             pages=summary.pages, candles=summary.candles, status="ok")
    return {"interval": interval, "symbol": symbol, "run_id": run_id, "start_ms": window.start_ms,
            "end_ms": window.end_ms, "window_from": origin, "history_start_ms": history,
            "lookback_days": _lookback_days(params, settings), "path": summary.path,
            "pages": summary.pages, "candles": summary.candles}


def _lazy_source(settings: Settings, source: KlineSource | None):
    """The source, built on first use: a task whose staging is there never starts a hook (Airflow's
    start-up costs seconds)."""
    made = [source] if source is not None else []

    def get() -> KlineSource:
        if not made:
            made.append(BinanceRestSource(settings))
        return made[0]

    return get


def _restage(source_factory, item: dict, path_key: str, ranges: list[tuple[int, int]]) -> str | None:
    """The staging file ``item[path_key]``, fetched again into place when it is gone (the task was
    cleared after its run removed it): a cleared task redoes its work instead of failing."""
    location = item.get(path_key)
    if not location or staged_exists(location) or not ranges:
        return location
    log.info("staging gone; fetching again", interval=item["interval"], symbol=item["symbol"], path=location,
             ranges=[f"{ms_to_utc(s).isoformat()}/{ms_to_utc(e).isoformat()}" for s, e in ranges],
             status="refetching")
    stage_ranges(source_factory(), item["symbol"], item["interval"], ranges, resolve_root(location))
    return location


def _fetched_ranges(item: dict) -> list[tuple[int, int]]:
    """What ``fetch`` paged: the window from the series' first candle on."""
    window = Window(item["interval"], item["start_ms"], item["end_ms"]).clipped_to(
        item.get("history_start_ms") or item["start_ms"])
    return [(window.start_ms, window.end_ms)] if window.slots else []


@fail_fast_on_user_error
def check_gaps(fetched: dict, *, settings: Settings | None = None, source: KlineSource | None = None,
               now: int | None = None) -> dict:
    """Refetch one symbol's holes in the window and the lookback; record what Binance really lacks."""
    settings = settings or load_settings()
    interval, symbol = fetched["interval"], fetched["symbol"]
    window = Window(interval, fetched["start_ms"], fetched["end_ms"])
    get_source = _lazy_source(settings, source)

    staged = _restage(get_source, fetched, "path", _fetched_ranges(fetched))
    store = RawStore(settings.raw_data_dir)
    now = now_ms() if now is None else now
    summary = gap_check(
        get_source(), store, GapRegistry(settings.raw_data_dir, symbol, interval), symbol, window,
        [staged] if staged else [], lookback_days=fetched["lookback_days"],
        floor_ms=floor_to_grid(settings.ingest_start_ms, interval), now=now,
        history_start_ms=fetched.get("history_start_ms"),
        path=_symbol_dir(settings, interval, fetched["run_id"], symbol) / "refetch.parquet",
    )
    emit_ingest_metrics(interval, gaps=summary)
    log.info("gap check done", interval=interval, symbol=symbol, gaps_found=summary.gaps_found,
             gaps_filled=summary.gaps_filled, known_gap_slots=summary.known_gap_slots,
             skipped_known_slots=summary.skipped_known_slots,
             quarantined_days=[ms_to_utc(d).date().isoformat() for d in summary.quarantined_days], status="ok")
    return {**fetched, "refetch_path": summary.path, "refetched_ranges": summary.refetched_ranges,
            "gaps_found": summary.gaps_found, "gaps_filled": summary.gaps_filled,
            "known_gap_slots": summary.known_gap_slots, "checked_start_ms": summary.checked_start_ms,
            "checked_end_ms": summary.checked_end_ms}


@fail_fast_on_user_error
def write_raw(checked: dict, *, settings: Settings | None = None, source: KlineSource | None = None,
              now: int | None = None) -> dict:
    """Merge one symbol's staged rows into the day partitions; drop its staging files."""
    settings = settings or load_settings()
    interval, symbol = checked["interval"], checked["symbol"]
    get_source = _lazy_source(settings, source)

    staged = [_restage(get_source, checked, "path", _fetched_ranges(checked)),
              _restage(get_source, checked, "refetch_path", [tuple(r) for r in checked.get("refetched_ranges", [])])]
    store = RawStore(settings.raw_data_dir)
    now = now_ms() if now is None else now
    summary = write_staged(store, symbol, interval, [p for p in staged if p], now=now)
    history = checked.get("history_start_ms") or floor_to_grid(settings.ingest_start_ms, interval)
    settle_quarantined(store, GapRegistry(settings.raw_data_dir, symbol, interval), symbol, interval,
                       history_start=history, now=now)
    newest = newest_stored_close_ms(store, symbol, interval, since_day_ms=max(summary.days, default=None), now=now)
    emit_ingest_metrics(interval, newest_close_ms=newest, now=now)
    log.info("write done", interval=interval, symbol=symbol, days=len(summary.days),
             rows_added=summary.rows_added, rows_revised=summary.rows_revised, status="ok")
    _remove_tree(_symbol_dir(settings, interval, checked["run_id"], symbol))
    run_dir = _run_dir(settings, interval, checked["run_id"])
    if isinstance(run_dir, Path):  # the run's last symbol leaves no empty dir behind
        with contextlib.suppress(OSError):
            run_dir.rmdir()
    return {"interval": interval, "symbol": symbol, "days": summary.days, "rows_added": summary.rows_added,
            "rows_revised": summary.rows_revised}


def _items(written) -> list[dict]:
    """The results of the mapped write_raw: Airflow hands a lone instance's result unwrapped."""
    if written is None:
        return []
    return [written] if isinstance(written, dict) else list(written)


@fail_fast_on_user_error
def curate(interval: str, written, *, settings: Settings | None = None) -> dict:
    """Recompute the curated days the symbols that were written touched (and the days whose warm-up
    changed). A symbol whose ingestion failed this run is simply not in ``written``."""
    settings = settings or load_settings()
    curation = DataCuration(settings)
    result = {"interval": interval, "symbols": []}
    if not _items(written):  # nothing written (every symbol failed): no curated Asset event
        raise AirflowSkipException(f"{interval}: no symbol was written, nothing to curate")
    for item in _items(written):
        summary = curation.curate_days(interval, item["symbol"], item["days"])
        result["symbols"].append({"symbol": item["symbol"], "days_written": len(summary.days_written),
                                  "rows": summary.rows, "skipped": summary.skipped})
    return result


def report(interval: str, planned: list[str] | None, written, curated: dict | None = None) -> dict:
    """Fail the run, naming them, when some of its symbols were not ingested (their own task
    instances failed): the others were written and curated, but the run must not look green."""
    if not planned:  # plan failed: its own message says why
        raise AirflowFailException(f"{interval}: the run was not planned (see the plan task's log); nothing ingested")
    done = sorted({item["symbol"] for item in _items(written)})
    missing = [s for s in planned if s not in done]
    if done and curated is None:  # curate failed: the run's leaf must say so
        raise AirflowFailException(f"{interval}: {', '.join(done)} written but not curated (see the curate log)")
    if missing:
        raise AirflowFailException(
            f"{interval}: not ingested this run: {', '.join(missing)} (see their fetch/gap_check/write_raw "
            f"logs); written and curated: {', '.join(done) or 'none'}")
    return {"interval": interval, "symbols": done}
