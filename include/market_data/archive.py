"""Candles from Binance's public data archive, and the ``auto`` source composing it with REST.

:class:`ArchiveSource` serves a window from the archive: monthly files for whole months that are
over, daily files for whole days that are over (and for the days of a month whose monthly file is
missing). Alone (``archive``) that is all; given a REST source (``auto``) it takes REST for the rest: partial days,
days not published yet, files that are missing (404) and files the archive client rejected (a
CHECKSUM mismatch or a corrupt zip, fetched once more by the client) — those are never used, and
each rejection is reported to the quality report. Where archive and REST both cover a day (the
newest archived day before a REST tail) the two are compared candle by candle and REST wins.

Files are downloaded ``2 × BINANCE_MAX_CONCURRENCY`` at a time (each zip beside its CHECKSUM) and
handed on in time order, so the writer works on one month while the next ones are in flight.
"""

from __future__ import annotations

import calendar
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from datetime import date, datetime, timezone
from typing import Callable, Iterator

from binance_provider.facts import ARCHIVE_CONN_ID
from include.market_data import observability
from include.market_data.config import Settings
from include.market_data.sources import BinanceRestSource, KlineBatch, KlineSource
from include.market_data.timeframes import DAY_MS, now_ms
from include.market_data.windows import InvalidInput

log = observability.get_logger(__name__)

SOURCE_KINDS = ("auto", "archive", "rest")


def month_start_ms(ts_ms: int) -> int:
    moment = datetime.fromtimestamp(ts_ms / 1000, tz=timezone.utc)
    return calendar.timegm((moment.year, moment.month, 1, 0, 0, 0)) * 1000


def next_month_ms(ts_ms: int) -> int:
    moment = datetime.fromtimestamp(month_start_ms(ts_ms) / 1000, tz=timezone.utc)
    year, month = (moment.year + 1, 1) if moment.month == 12 else (moment.year, moment.month + 1)
    return calendar.timegm((year, month, 1, 0, 0, 0)) * 1000


def month_spans(start_ms: int, end_ms: int) -> list[tuple[int, int]]:
    """``[start_ms, end_ms)`` cut at calendar month boundaries (UTC)."""
    spans, cursor = [], start_ms
    while cursor < end_ms:
        stop = min(next_month_ms(cursor), end_ms)
        spans.append((cursor, stop))
        cursor = stop
    return spans


@dataclass(frozen=True)
class Unit:
    """One piece of a window and where it is taken from: ``monthly``/``daily`` file, or ``rest``."""

    kind: str
    start_ms: int
    end_ms: int


def plan_units(start_ms: int, end_ms: int, now: int, *, allow_rest: bool = True) -> list[Unit]:
    """Monthly files for whole months that are over, daily files for whole days that are over,
    REST (or nothing, without ``allow_rest``) for the rest; in time order."""
    units: list[Unit] = []

    def rest(lo: int, hi: int) -> None:
        if not allow_rest or lo >= hi:
            return
        if units and units[-1].kind == "rest" and units[-1].end_ms == lo:
            units[-1] = Unit("rest", units[-1].start_ms, hi)
        else:
            units.append(Unit("rest", lo, hi))

    for lo, hi in month_spans(start_ms, end_ms):
        month_lo, month_hi = month_start_ms(lo), next_month_ms(lo)
        if lo == month_lo and hi == month_hi and month_hi <= now:
            units.append(Unit("monthly", lo, hi))
            continue
        cursor = lo
        while cursor < hi:
            day_lo = cursor // DAY_MS * DAY_MS
            day_hi = day_lo + DAY_MS
            if cursor == day_lo and day_hi <= hi and day_hi <= now:
                units.append(Unit("daily", day_lo, day_hi))
            else:
                rest(cursor, min(day_hi, hi))
            cursor = min(day_hi, hi)
    return units


def _period(unit_start_ms: int) -> date:
    return datetime.fromtimestamp(unit_start_ms / 1000, tz=timezone.utc).date()


@dataclass
class ArchiveRejection:
    """A file the archive client refused twice (checksum or zip): its days went elsewhere."""

    symbol: str
    interval: str
    url: str
    reason: str
    period_start_ms: int
    expected_sha256: str | None
    found_sha256: str | None
    detail: str = ""


class ArchiveSource:
    """Closed candles from the public data archive only (what it lacks is left out and listed in
    :attr:`not_in_archive`). ``rest``: a :class:`KlineSource` for what the archive cannot give —
    then this is the ``auto`` composition (see :class:`AutoSource`)."""

    def __init__(self, settings: Settings, *, hook=None, rest: KlineSource | None = None,
                 on_rejected: Callable[[ArchiveRejection], None] | None = None,
                 on_reconciled: Callable[[str, str, list, list, str], None] | None = None,
                 conn_id: str = ARCHIVE_CONN_ID):
        if hook is None:
            from binance_provider.clients import archive_client  # the hook, or the plain client outside Airflow

            hook = archive_client(conn_id, settings.hook_settings())
        self.hook = hook
        self.rest = rest
        self.settings = settings
        self.on_rejected = on_rejected
        self.on_reconciled = on_reconciled  # (symbol, interval, archive_rows, rest_rows, file URL) of a day both cover
        self.not_in_archive: list[tuple[int, int]] = []
        self._unreachable: str | None = None

    # -- the seam ------------------------------------------------------------------------
    def first_open_ms(self, symbol: str, interval: str) -> int | None:
        if self.rest is None:
            return None  # the archive cannot tell; nothing is clipped
        return self.rest.first_open_ms(symbol, interval)

    def symbol_status(self, symbol: str) -> str | None:
        return None if self.rest is None else self.rest.symbol_status(symbol)

    def batches(self, symbol: str, interval: str, start_ms: int, end_ms: int) -> Iterator[KlineBatch]:
        now = now_ms()
        self.not_in_archive, self._unreachable = [], None  # this window's
        units = plan_units(start_ms, end_ms, now, allow_rest=self.rest is not None)
        if self.rest is None:
            covered = [(u.start_ms, u.end_ms) for u in units]
            self._note_uncovered(start_ms, end_ms, covered)
        # The newest archived day before a REST tail is fetched from both and reconciled.
        reconcile_after = None
        if self.rest is not None and units and units[-1].kind == "rest":
            archived = [u for u in units if u.kind != "rest"]
            if archived:
                reconcile_after = archived[-1]
        # Archive files carry no REST weight: twice BINANCE_MAX_CONCURRENCY of them are in flight.
        workers = max(1, 2 * self.settings.max_concurrency)
        executor = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="binance-archive")
        try:
            pending: deque[tuple[Unit, Future]] = deque()
            for unit in units:
                if unit.kind == "rest":  # in order, after the files before it
                    while pending:
                        yield from self._finish(*pending.popleft(), symbol, interval, reconcile_after)
                    yield from self._rest(symbol, interval, unit.start_ms, unit.end_ms)
                    continue
                pending.append((unit, executor.submit(self._files, symbol, interval, unit, now)))
                if len(pending) > workers:
                    yield from self._finish(*pending.popleft(), symbol, interval, reconcile_after)
            while pending:
                yield from self._finish(*pending.popleft(), symbol, interval, reconcile_after)
        finally:  # closed early (an error downstream): files not started are not fetched any more
            executor.shutdown(wait=False, cancel_futures=True)

    # -- internals -----------------------------------------------------------------------
    def _note_uncovered(self, start_ms: int, end_ms: int, covered: list[tuple[int, int]]) -> None:
        cursor = start_ms
        for lo, hi in covered:
            if lo > cursor:
                self.not_in_archive.append((cursor, lo))
            cursor = max(cursor, hi)
        if cursor < end_ms:
            self.not_in_archive.append((cursor, end_ms))

    def _rest(self, symbol: str, interval: str, start_ms: int, end_ms: int) -> Iterator[KlineBatch]:
        if start_ms >= end_ms:
            return
        if self.rest is None:
            self.not_in_archive.append((start_ms, end_ms))
            return
        yield from self.rest.batches(symbol, interval, start_ms, end_ms)

    def _files(self, symbol: str, interval: str, unit: Unit, now: int) -> list[tuple[Unit, object]]:
        """Download a unit's file (a month falls back to its days' files when missing): a list of
        ``(unit, ArchiveFile | ArchiveRejection | None)`` in time order, ``None`` for missing."""
        from binance_provider.clients.archive import ArchiveFileRejected
        from binance_provider.hooks.errors import BinanceAPIError

        if self._unreachable is not None:  # the archive is down: the rest of the window goes to REST
            return [(unit, None)]
        period = _period(unit.start_ms)
        path = (self.hook.monthly_path(symbol, interval, period.year, period.month) if unit.kind == "monthly"
                else self.hook.daily_path(symbol, interval, period))
        try:
            found = self.hook.fetch(path)
        except ArchiveFileRejected as exc:
            return [(unit, ArchiveRejection(symbol, interval, exc.url, exc.kind, unit.start_ms,
                                            exc.expected_sha256, exc.found_sha256, exc.reason))]
        except BinanceAPIError as exc:  # down, banned, or refusing us: REST can still serve (auto)
            if self.rest is None:
                raise
            self._unreachable = str(exc)
            log.warning("archive unreachable: REST serves the rest of the window", symbol=symbol,
                        interval=interval, reason=str(exc)[:300], status="unavailable")
            return [(unit, None)]
        if found is not None or unit.kind == "daily":
            return [(unit, found)]
        days = [Unit("daily", day, day + DAY_MS) for day in range(unit.start_ms, unit.end_ms, DAY_MS)
                if day + DAY_MS <= now]
        return [item for day in days for item in self._files(symbol, interval, day, now)]

    def _finish(self, unit: Unit, future: Future, symbol: str, interval: str,
                reconcile_after: Unit | None) -> Iterator[KlineBatch]:
        parts = future.result()
        for index, (part, found) in enumerate(parts):
            if found is None:
                log.info("not in the archive", symbol=symbol, interval=interval, status="missing",
                         period=_period(part.start_ms).isoformat(), kind=part.kind)
                yield from self._rest(symbol, interval, part.start_ms, part.end_ms)
                continue
            if isinstance(found, ArchiveRejection):
                log.warning("archive file rejected", symbol=symbol, interval=interval, url=found.url,
                            reason=found.detail or found.reason, status="rejected")
                if self.on_rejected is not None:
                    self.on_rejected(found)
                yield from self._rest(symbol, interval, part.start_ms, part.end_ms)
                continue
            if found.rejected:  # rows breaking the row contract: their slots stay holes for the gap check
                observability.incr(f"ingest.{interval}.rows_rejected", len(found.rejected))
            rows = [row for row in found.rows if part.start_ms <= row[0] < part.end_ms]
            # The newest archived day before a REST tail: taken from REST too, compared, REST wins.
            overlap_ms = None
            if unit == reconcile_after and index == len(parts) - 1:
                overlap_ms = (part.end_ms - 1) // DAY_MS * DAY_MS
                archived_day = [row for row in rows if row[0] >= overlap_ms]
                rows = [row for row in rows if row[0] < overlap_ms]
            if rows:
                yield KlineBatch(rows, found.url, _endpoint(found.url), found.fetched_at, found.latency_ms,
                                 sha256=found.sha256)
            if overlap_ms is not None:
                rest_batches = list(self._rest(symbol, interval, overlap_ms, part.end_ms))
                rest_day = [r for b in rest_batches for r in b.rows]
                if self.on_reconciled is not None:
                    self.on_reconciled(symbol, interval, archived_day, rest_day, found.url)
                yield from rest_batches
                served = {row[0] for row in rest_day}
                only_archived = [row for row in archived_day if row[0] not in served]
                if only_archived:  # reported as a presence finding; the archive's candle is not thrown away
                    yield KlineBatch(only_archived, found.url, _endpoint(found.url), found.fetched_at,
                                     found.latency_ms, sha256=found.sha256)


def _endpoint(url: str) -> str:
    """``/data/spot/monthly/klines`` of a file URL (the part before the symbol)."""
    marker = "/klines/"
    index = url.find(marker)
    path = url[url.find("/data/"):] if "/data/" in url else url
    return path[: path.find(marker) + len(marker) - 1] if index >= 0 else path


def make_source(kind: str, settings: Settings, *, rest: KlineSource | None = None, hook=None,
                archive_hook=None, on_rejected=None, on_reconciled=None) -> KlineSource:
    """The source named ``kind`` (``auto``, ``archive`` or ``rest``; see SOURCE_KINDS)."""
    if kind not in SOURCE_KINDS:
        raise InvalidInput(f"source={kind!r} is not one of {', '.join(SOURCE_KINDS)}")
    if kind != "archive" and rest is None:
        rest = BinanceRestSource(settings, hook=hook)
    if kind == "rest":
        return rest
    return ArchiveSource(settings, hook=archive_hook, rest=rest if kind == "auto" else None,
                         on_rejected=on_rejected, on_reconciled=on_reconciled)

