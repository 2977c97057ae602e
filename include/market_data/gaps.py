"""Missing grid slots, and the registry of holes Binance itself lacks.

A hole that stays empty after refetching is a *known gap*
(``RAW_DATA_DIR/_gaps/<SYMBOL>_<interval>.parquet``): it is never filled with invented
rows, and it is re-checked with a decaying frequency (1 h, 2 h, 4 h, ... capped at a
week) instead of on every run.

Beside it, :class:`SeriesState` (``_gaps/<SYMBOL>_<interval>.state.json``) keeps the rest of
what the gap check must remember about a series: the symbol's first candle on Binance
(nothing before it is history, nor a gap) and the days whose partition was quarantined,
until every slot of them is back or is a known gap.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import timedelta

import numpy as np
import pyarrow as pa

from include.market_data.storage import PartitionIO, atomic_write
from include.market_data.timeframes import HOUR_MS, grid, interval_ms

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
