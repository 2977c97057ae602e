"""Missing grid slots, and the registry of holes Binance itself lacks.

A hole that stays empty after refetching is a *known gap*
(``RAW_DATA_DIR/_gaps/<SYMBOL>_<interval>.parquet``): it is never filled with invented
rows, and it is re-checked with a decaying frequency (1 h, 2 h, 4 h, ... capped at a
week) instead of on every run.

Beside it, :class:`SeriesState` (``_gaps/<SYMBOL>_<interval>.state.json``) keeps the rest of
what the gap check must remember about a series: the symbol's first candle on Binance
(nothing before it is history, nor a gap) and the days whose partition was quarantined,
until every slot of them is back or is a known gap.

The gap check itself lives here too (:func:`gap_check`): it finds the missing slots of a
window and its lookback, refetches them into staging and records what Binance still lacks.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from datetime import timedelta

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from include.market_data import observability
from include.market_data.config import Settings
from include.market_data.sources import KlineSource
from include.market_data.staging import STAGING_SCHEMA, _batch_table, _staging_writer, read_staged, stage_ranges
from include.market_data.storage import PartitionIO, RawStore, atomic_write
from include.market_data.timeframes import (
    DAY_MS, HOUR_MS, ceil_to_grid, closed_end, day_start_ms, floor_to_grid, grid, interval_ms, ms_to_utc, now_ms,
)
from include.market_data.windows import Window

log = observability.get_logger(__name__)

RECHECK_BASE_MS = HOUR_MS
RECHECK_CAP_MS = int(timedelta(days=7).total_seconds() * 1000)
GAPS_DIR = "_gaps"
MAX_RECHECKS_PER_RUN = 8

_TS = pa.timestamp("ms", tz="UTC")
GAP_SCHEMA = pa.schema(
    [
        ("start", _TS), ("end", _TS), ("missing_slots", pa.int64()),
        ("first_seen", _TS), ("last_checked", _TS), ("checks", pa.int64()),
    ]
)


def missing_ranges(open_times: np.ndarray, start_ms: int, end_ms: int, interval: str) -> list[tuple[int, int]]:
    """Half-open ranges of grid slots in ``[start_ms, end_ms)`` absent from ``open_times``."""
    step = interval_ms(interval)
    slots = grid(start_ms, end_ms, interval)
    if len(slots) == 0:
        return []
    expected = np.arange(slots.start, slots.stop, step, dtype=np.int64)
    missing = expected[~np.isin(expected, np.asarray(open_times, dtype=np.int64))]
    if missing.size == 0:
        return []
    breaks = np.flatnonzero(np.diff(missing) != step) + 1
    return [(int(run[0]), int(run[-1]) + step) for run in np.split(missing, breaks)]


def slot_count(ranges: list[tuple[int, int]], interval: str) -> int:
    step = interval_ms(interval)
    return sum((end - start) // step for start, end in ranges)


@dataclass(frozen=True)
class KnownGap:
    start_ms: int
    end_ms: int
    missing_slots: int
    first_seen_ms: int
    last_checked_ms: int
    checks: int

    def next_check_ms(self) -> int:
        wait = min(RECHECK_BASE_MS * 2 ** max(self.checks - 1, 0), RECHECK_CAP_MS)
        return self.last_checked_ms + wait

    def covers(self, start_ms: int, end_ms: int) -> bool:
        return self.start_ms <= start_ms and end_ms <= self.end_ms


def _merge_overlapping(gaps: list[KnownGap], step: int) -> list[KnownGap]:
    """Known gaps sorted by start, overlapping or touching ones joined (runs checking
    overlapping ranges would otherwise add one row each)."""
    merged: list[KnownGap] = []
    for gap in gaps:
        if merged and gap.start_ms <= merged[-1].end_ms:
            last = merged[-1]
            end = max(last.end_ms, gap.end_ms)
            merged[-1] = KnownGap(last.start_ms, end, (end - last.start_ms) // step,
                                  min(last.first_seen_ms, gap.first_seen_ms),
                                  max(last.last_checked_ms, gap.last_checked_ms), max(last.checks, gap.checks))
        else:
            merged.append(gap)
    return merged


class GapRegistry:
    """The known gaps of one symbol and interval, updated under a lock."""

    def __init__(self, raw_root: str, symbol: str, interval: str):
        self.io = PartitionIO(raw_root)
        self.symbol = symbol
        self.interval = interval
        self.path = self.io.root / GAPS_DIR / f"{symbol}_{interval}.parquet"

    def load(self) -> list[KnownGap]:
        table = self.io.read(self.path)
        if table is None:
            return []
        columns = {name: table.column(name).cast(pa.int64()).to_pylist() for name in GAP_SCHEMA.names}
        return [
            KnownGap(columns["start"][i], columns["end"][i], columns["missing_slots"][i],
                     columns["first_seen"][i], columns["last_checked"][i], columns["checks"][i])
            for i in range(table.num_rows)
        ]

    def to_refetch(self, ranges: list[tuple[int, int]], now_ms: int) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
        """Split missing ``ranges`` into (refetch now, known gap not yet due for a re-check)."""
        if not ranges:  # the usual scheduled run: no hole, so no need to read the registry
            return [], []
        known = self.load()
        refetch, skipped = [], []
        for start, end in ranges:
            holder = next((gap for gap in known if gap.covers(start, end)), None)
            if holder is not None and holder.next_check_ms() > now_ms:
                skipped.append((start, end))
            else:
                refetch.append((start, end))
        return refetch, skipped

    def due_outside(self, start_ms: int, end_ms: int, now_ms: int,
                    limit: int = MAX_RECHECKS_PER_RUN) -> list[tuple[int, int]]:
        """Known gaps outside ``[start_ms, end_ms)`` whose re-check is due, the longest-waiting
        first and at most ``limit`` of them: a run re-checks them too, so an old hole is retried
        at 1 h, 2 h, 4 h ... a week wherever it lies, without one run taking them all at once."""
        due = [g for g in self.load()
               if (g.end_ms <= start_ms or g.start_ms >= end_ms) and g.next_check_ms() <= now_ms]
        due.sort(key=KnownGap.next_check_ms)
        return [(g.start_ms, g.end_ms) for g in due[:limit]]

    def record(self, checked: list[tuple[int, int]], still_missing: list[tuple[int, int]], now_ms: int) -> list[KnownGap]:
        """After refetching ``checked`` ranges, store which of their slots Binance still lacks."""
        step = interval_ms(self.interval)
        with self.io.lock(self.path):
            known = self.load()
            kept = [g for g in known if not any(s <= g.start_ms and g.end_ms <= e for s, e in checked)]
            rechecked = [g for g in known if g not in kept]
            for start, end in still_missing:
                previous = [g for g in rechecked if g.start_ms < end and start < g.end_ms]
                kept.append(
                    KnownGap(
                        start, end, (end - start) // step,
                        first_seen_ms=min([g.first_seen_ms for g in previous], default=now_ms),
                        last_checked_ms=now_ms,
                        checks=max([g.checks for g in previous], default=0) + 1,
                    )
                )
            kept = _merge_overlapping(sorted(kept, key=lambda g: g.start_ms), step)
            if kept or known:
                self.io.write_atomic(self.path, self._table(kept), {"symbol": self.symbol, "interval": self.interval})
            return kept

    def resolve(self, holes: list[tuple[int, int]], start_ms: int, end_ms: int) -> int:
        """Forget known gaps inside ``[start_ms, end_ms)`` that no longer hold any of ``holes``
        (Binance published the candles after all); returns how many slots they had."""
        with self.io.lock(self.path):
            known = self.load()
            filled = [g for g in known if start_ms <= g.start_ms and g.end_ms <= end_ms
                      and not any(s < g.end_ms and g.start_ms < e for s, e in holes)]
            if filled:
                kept = [g for g in known if g not in filled]
                self.io.write_atomic(self.path, self._table(kept), {"symbol": self.symbol, "interval": self.interval})
            return sum(g.missing_slots for g in filled)

    @staticmethod
    def _table(gaps: list[KnownGap]) -> pa.Table:
        values = {
            "start": [g.start_ms for g in gaps], "end": [g.end_ms for g in gaps],
            "missing_slots": [g.missing_slots for g in gaps], "first_seen": [g.first_seen_ms for g in gaps],
            "last_checked": [g.last_checked_ms for g in gaps], "checks": [g.checks for g in gaps],
        }
        arrays = [pa.array(values[f.name], type=pa.int64()).cast(f.type) for f in GAP_SCHEMA]
        return pa.Table.from_arrays(arrays, schema=GAP_SCHEMA)


class SeriesState:
    """``_gaps/<SYMBOL>_<interval>.state.json``: the first candle of the series and the days whose
    partition was quarantined and is not whole again yet. Updated under a lock, written atomically."""

    def __init__(self, raw_root: str, symbol: str, interval: str):
        self.io = PartitionIO(raw_root)
        self.symbol = symbol
        self.interval = interval
        self.path = self.io.root / GAPS_DIR / f"{symbol}_{interval}.state.json"

    def load(self) -> dict:
        if not self.path.exists():
            return {}
        try:
            state = json.loads(self.path.read_bytes())
        except ValueError:  # unreadable: start over (the first candle is looked up again)
            return {}
        return state if isinstance(state, dict) else {}

    def _update(self, change) -> dict:
        # tier "record": a quarantine inside a partition merge updates this under the partition's lock
        with self.io.lock(self.path, tier="record"):
            state = self.load()
            if change(state) is False:
                return state
            body = json.dumps(state, sort_keys=True).encode()
            atomic_write(self.path, lambda handle: handle.write(body))
            return state

    @property
    def first_open_ms(self) -> int | None:
        value = self.load().get("first_open_ms")
        return value if isinstance(value, int) else None

    def set_first_open_ms(self, value: int) -> None:
        def change(state):
            if state.get("first_open_ms") == value:
                return False
            state["first_open_ms"] = int(value)
        self._update(change)

    def quarantined_days(self) -> list[int]:
        return sorted(int(d) for d in self.load().get("quarantined_days", []))

    def add_quarantined_day(self, day_ms: int) -> None:
        def change(state):
            days = set(state.get("quarantined_days", []))
            if day_ms in days:
                return False
            state["quarantined_days"] = sorted(days | {int(day_ms)})
        self._update(change)

    def settle_quarantined_days(self, complete) -> list[int]:
        """Drop the recorded days for which ``complete(day)`` holds, under the lock; returns them."""
        done: list[int] = []

        def change(state):
            before = state.get("quarantined_days", [])
            done.extend(d for d in before if complete(d))
            if not done:
                return False
            state["quarantined_days"] = [d for d in before if d not in done]
        self._update(change)
        return done


# -- gap detection: find missing slots, refetch them, record Binance's holes -----------------
# How long after a candle closes Binance may take to serve it before a hole counts as an outage;
# the gap check polls for such candles every PUBLISH_POLL_S until then (inside the task).
PUBLISH_GRACE_MS = 5 * 60_000
PUBLISH_POLL_S = 10.0
# Quarantined days one run refetches at most (each is one request or two): the rest wait for the next run.
MAX_QUARANTINED_DAYS_PER_RUN = 31
# Indirections so tests can run the bounded polls without waiting.
_sleep = time.sleep
_monotonic = time.monotonic


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
              history_start_ms: int | None = None,
              quarantined_within: tuple[int, int] | None = None) -> GapSummary:
    """Find missing slots in ``window`` plus the lookback, refetch them, record Binance's holes.

    ``floor_ms``: nothing before it is checked. ``history_start_ms``: where the series' history
    begins (its first candle): slots before it are no gap. Every run also refetches whole the
    days on the quarantine record, wherever they lie, and a scheduled run (``lookback_days``)
    the known gaps due for a re-check. ``quarantined_within``: only the recorded days in that range
    (a window streamed month by month takes each day with its own month, not with every month).
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
    recorded = store.quarantined_days(interval, symbol)
    if quarantined_within is not None:
        recorded = [d for d in recorded if quarantined_within[0] <= d < quarantined_within[1]]
    for day in recorded[:MAX_QUARANTINED_DAYS_PER_RUN]:
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
