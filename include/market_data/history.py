"""The task bodies of ``binance_history``: deep history as chunks of symbol x interval x month.

``plan`` checks the params and splits ``[start, end)`` into chunks, packed so that no more are
mapped than ``[core] max_map_length`` allows; ``ingest_chunk`` ingests one chunk (each of its
months streamed, fetched and written overlapped) from the source asked for; ``curate`` recomputes
an interval's touched days once; ``quality`` runs the cross-timeframe check over the range (the
archive/REST comparison happened while ingesting); ``report`` fails the run naming the chunks that
failed. A chunk is a transaction over its own months: retried or cleared, it redoes only itself.
"""

from __future__ import annotations

import math
import shutil
import tempfile
import time
from pathlib import Path

from include.market_data import observability
from include.market_data.archive import SOURCE_KINDS, month_spans
from include.market_data.config import Settings, load_settings
from include.market_data.timeframes import ms_to_utc, now_ms, to_ms
from include.market_data.windows import InvalidInput, check_interval, check_symbol, resolve_window

log = observability.get_logger(__name__)

DEFAULT_MAX_MAP_LENGTH = 1024  # Airflow 3.3's [core] max_map_length
PROGRESS_DIR = "history"


def max_map_length() -> int:
    """``[core] max_map_length`` of this Airflow (the planning task fails above it)."""
    try:
        from airflow.configuration import conf

        return conf.getint("core", "max_map_length", fallback=DEFAULT_MAX_MAP_LENGTH)
    except Exception:  # noqa: BLE001 - outside Airflow: its default
        return DEFAULT_MAX_MAP_LENGTH


def _iso(ms: int) -> str:
    return ms_to_utc(ms).isoformat().replace("+00:00", "Z")


def plan(params: dict, *, settings: Settings | None = None, now: int | None = None,
         limit: int | None = None) -> dict:
    """Chunks of the range (symbol x interval x calendar month), packed into at most ``limit``
    mapped items (default ``[core] max_map_length``): consecutive months of one series share an
    item when there are too many. Returns ``{"chunks": [...], "intervals": [...], ...}``."""
    settings = settings or load_settings()
    now = now_ms() if now is None else now
    limit = max_map_length() if limit is None else limit
    source = params.get("source") or "auto"
    if source not in SOURCE_KINDS:
        raise InvalidInput(f"source={source!r} is not one of {', '.join(SOURCE_KINDS)}")
    intervals = list(params.get("intervals") or settings.intervals)
    for interval in intervals:
        check_interval(interval, settings)
    symbols = [check_symbol(s) for s in (params.get("symbols") or settings.symbols)]
    unknown = [s for s in symbols if s not in settings.symbols]
    if unknown:
        raise InvalidInput(f"symbols={unknown} are not in BINANCE_SYMBOLS ({','.join(settings.symbols)})")
    if not params.get("start"):
        raise InvalidInput("start is required (UTC date, e.g. 2017-08-17)")
    end = params.get("end") or ms_to_utc(now)
    segments = []  # (symbol, interval, start_ms, end_ms), one per month of each series
    windows = {}
    for interval in intervals:
        window = resolve_window(interval, params["start"], end, settings=settings, now=now)
        windows[interval] = window
        for symbol in symbols:
            segments += [(symbol, interval, lo, hi) for lo, hi in month_spans(window.start_ms, window.end_ms)]
    if not segments:
        raise InvalidInput(f"start={params['start']!r} .. end={end!r} holds no closed candle")
    per_item = math.ceil(len(segments) / limit)
    chunks = []
    for first in range(0, len(segments), per_item):
        group = segments[first:first + per_item]
        chunks.append({"segments": [{"symbol": s, "interval": iv, "start": _iso(lo), "end": _iso(hi)}
                                    for s, iv, lo, hi in group],
                       "source": source})
    for index, chunk in enumerate(chunks):
        chunk.update(index=index, total=len(chunks))
    log.info("history planned", chunks=len(chunks), months=len(segments), months_per_chunk=per_item,
             intervals=intervals, symbols=symbols, source=source, max_map_length=limit, status="ok")
    return {"chunks": chunks, "intervals": intervals, "symbols": symbols, "source": source,
            "start": _iso(min(w.start_ms for w in windows.values())),
            "end": _iso(max(w.end_ms for w in windows.values()))}


def span(chunks: list[dict]) -> dict:
    """What a list of chunks covers: ``{"chunks", "intervals", "symbols", "start", "end"}`` (for the
    tasks after ``plan``, which Airflow hands only its list of chunks)."""
    segments = [segment for chunk in chunks for segment in chunk["segments"]]
    return {"chunks": chunks,
            "intervals": list(dict.fromkeys(s["interval"] for s in segments)),
            "symbols": list(dict.fromkeys(s["symbol"] for s in segments)),
            "start": min(s["start"] for s in segments), "end": max(s["end"] for s in segments)}


def label(chunk: dict) -> str:
    """``BTCUSDT 15m 2024-01`` (or ``... 2024-01..2024-03`` for a packed chunk): the UI's name for it."""
    first, last = chunk["segments"][0], chunk["segments"][-1]
    span = first["start"][:7] if first["start"][:7] == last["start"][:7] else f"{first['start'][:7]}..{last['start'][:7]}"
    series = {(s["symbol"], s["interval"]) for s in chunk["segments"]}
    who = f"{first['symbol']} {first['interval']}" if len(series) == 1 else f"{len(series)} series"
    return f"{who} {span}"


def _progress_dir(settings: Settings, run_id: str):
    from include.market_data.staging import staging_root

    safe = "".join(c if c.isalnum() or c in "._-" else "_" for c in run_id)[:200]
    return staging_root(settings) / PROGRESS_DIR / safe


def ingest_chunk(chunk: dict, run_id: str = "manual", run_started_s: float | None = None, *,
                 settings: Settings | None = None, ingestion=None, now: int | None = None) -> dict:
    """Ingest every segment of ``chunk`` (a month of one series each); returns the days written."""
    from include.market_data.gaps import GapRegistry, SeriesState, history_start_ms, settle_quarantined
    from include.market_data.ingestion import DataIngestion, emit_ingest_metrics, ingest_window
    from include.market_data.windows import Window

    settings = settings or load_settings()
    ingestion = ingestion or DataIngestion(settings)
    now = now_ms() if now is None else now
    source_kind = chunk.get("source", "auto")
    source = ingestion.candle_source(source_kind)
    started = time.monotonic()
    written: dict[str, dict] = {}
    candles = 0
    staging = Path(tempfile.mkdtemp(prefix="history_chunk_"))
    try:
        for segment in chunk["segments"]:
            symbol, interval = segment["symbol"], segment["interval"]
            window = Window(interval, to_ms(segment["start"]), to_ms(segment["end"]))
            registry = GapRegistry(settings.raw_data_dir, symbol, interval)
            history = history_start_ms(source, SeriesState(settings.raw_data_dir, symbol, interval),
                                       settings, symbol, interval)
            streamed = ingest_window(source, ingestion.store, registry, symbol, window, now=now,
                                     history_start=history, staging_dir=staging,
                                     gap_source=None if source_kind == "archive" else ingestion.source,
                                     check_gaps=source_kind != "archive",
                                     quarantined_within=(window.start_ms, window.end_ms))
            if source_kind != "archive":
                settle_quarantined(ingestion.store, registry, symbol, interval, history_start=history, now=now)
            emit_ingest_metrics(interval, candles=streamed.candles)
            candles += streamed.candles
            entry = written.setdefault(f"{symbol}|{interval}", {"symbol": symbol, "interval": interval, "days": []})
            entry["days"] += streamed.written.days
            if streamed.not_in_archive:
                log.warning("not in the archive", symbol=symbol, interval=interval, status="missing",
                            ranges=[f"{_iso(s)}/{_iso(e)}" for s, e in streamed.not_in_archive])
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    done, total = _mark_done(settings, run_id, chunk)
    elapsed = time.monotonic() - started
    since_run = (time.time() - run_started_s) if run_started_s else None
    eta = round(since_run / done * (total - done), 1) if since_run and done else None
    log.info("history progress", chunk=label(chunk), chunks_done=done, chunks_total=total, candles=candles,
             seconds=round(elapsed, 2), eta_s=eta, source=source_kind, status="ok")
    return {"index": chunk["index"], "label": label(chunk), "candles": candles, "written": list(written.values())}


def _mark_done(settings: Settings, run_id: str, chunk: dict) -> tuple[int, int]:
    """Leave a marker for this chunk and count the run's markers: chunks done so far, and of how many."""
    directory = _progress_dir(settings, run_id)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / f"chunk-{chunk['index']:05d}.done").write_text(label(chunk))
    return len([p for p in directory.iterdir() if p.name.endswith(".done")]), chunk["total"]


def _items(results) -> list[dict]:
    if results is None:
        return []
    return [results] if isinstance(results, dict) else [r for r in results if r]


def curate(interval: str, results, *, settings: Settings | None = None) -> dict:
    """One curation of ``interval`` over every day the chunks wrote, per symbol."""
    from include.market_data.curation import DataCuration

    settings = settings or load_settings()
    days: dict[str, set[int]] = {}
    for result in _items(results):
        for entry in result["written"]:
            if entry["interval"] == interval:
                days.setdefault(entry["symbol"], set()).update(entry["days"])
    curation = DataCuration(settings)
    summary = {"interval": interval, "symbols": []}
    for symbol, touched in sorted(days.items()):
        curated = curation.curate_days(interval, symbol, sorted(touched))
        summary["symbols"].append({"symbol": symbol, "days_written": len(curated.days_written), "rows": curated.rows})
    return summary


def quality(planned: dict, *, settings: Settings | None = None) -> dict:
    """The cross-timeframe check over the run's range, findings to the quality report."""
    from airflow.sdk.exceptions import AirflowFailException

    from include.market_data.quality import check_range

    if not planned or not planned.get("chunks"):
        raise AirflowFailException("binance_history: the run was not planned (see the plan task's log)")
    settings = settings or load_settings()
    return check_range(settings, planned["intervals"], planned["symbols"], to_ms(planned["start"]),
                       to_ms(planned["end"]))


def report(planned: dict | None, results, curated=None, checked=None, run_id: str = "manual", *,
           settings: Settings | None = None) -> dict:
    """Fail the run naming the chunks that were not ingested (or a curation or the quality check
    that failed); clean the run's progress markers."""
    from airflow.sdk.exceptions import AirflowFailException

    settings = settings or load_settings()
    if not planned:
        raise AirflowFailException("binance_history: the run was not planned (see the plan task's log)")
    done = {item["index"] for item in _items(results)}
    missing = [label(c) for c in planned["chunks"] if c["index"] not in done]
    progress = _progress_dir(settings, run_id)
    if progress.exists() and not missing:
        shutil.rmtree(progress, ignore_errors=True) if isinstance(progress, Path) else progress.fs.rm(
            progress.path, recursive=True)
    if missing:
        shown = ", ".join(missing[:10]) + (f" and {len(missing) - 10} more" if len(missing) > 10 else "")
        raise AirflowFailException(f"binance_history: {len(missing)} of {len(planned['chunks'])} chunks not "
                                   f"ingested: {shown} (clear them to retry)")
    curated_intervals = {item["interval"] for item in _items(curated)}
    not_curated = [iv for iv in planned["intervals"] if iv not in curated_intervals]
    if not_curated:
        raise AirflowFailException(f"binance_history: ingested but not curated: {', '.join(not_curated)} "
                                   f"(see the curate logs)")
    if checked is None:
        raise AirflowFailException("binance_history: ingested and curated, but the quality check failed (see its log)")
    candles = sum(item["candles"] for item in _items(results))
    return {"chunks": len(done), "candles": candles, "quality_findings": checked}
