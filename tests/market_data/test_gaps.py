"""The known-gap registry: overlapping checks merge, re-checks decay and are capped per run."""

import numpy as np

from include.market_data.gaps import MAX_RECHECKS_PER_RUN, GapRegistry, missing_ranges
from include.market_data.timeframes import HOUR_MS, to_ms

DAY0 = to_ms("2024-03-01")


def test_missing_ranges_are_half_open_runs_of_grid_slots():
    present = np.array([DAY0, DAY0 + HOUR_MS, DAY0 + 4 * HOUR_MS], dtype=np.int64)
    assert missing_ranges(present, DAY0, DAY0 + 6 * HOUR_MS, "1h") == [
        (DAY0 + 2 * HOUR_MS, DAY0 + 4 * HOUR_MS), (DAY0 + 5 * HOUR_MS, DAY0 + 6 * HOUR_MS)]


def test_overlapping_checks_of_one_hole_keep_one_row(tmp_path):
    """Hourly runs each check the last 3 days of a symbol without candles yet: one known gap, not one per run."""
    registry = GapRegistry(str(tmp_path), "NEWCOIN1", "1h")
    for run in range(48):
        end = DAY0 + (run + 1) * HOUR_MS
        hole = (end - 72 * HOUR_MS, end)
        registry.record([hole], [hole], now_ms=end + 60_000)
    (gap,) = registry.load()
    assert (gap.start_ms, gap.end_ms, gap.missing_slots) == (DAY0 - 71 * HOUR_MS, DAY0 + 48 * HOUR_MS, 119)
    assert gap.first_seen_ms == DAY0 + HOUR_MS + 60_000 and gap.last_checked_ms == DAY0 + 48 * HOUR_MS + 60_000


def test_due_rechecks_decay_and_are_capped_per_run(tmp_path):
    registry = GapRegistry(str(tmp_path), "BTCUSDT", "1h")
    holes = [(DAY0 + 2 * k * HOUR_MS, DAY0 + (2 * k + 1) * HOUR_MS) for k in range(20)]  # 20 separate holes
    registry.record(holes, holes, now_ms=DAY0 + 100 * HOUR_MS)
    later = DAY0 + 500 * HOUR_MS
    assert registry.due_outside(later, later + HOUR_MS, now_ms=DAY0 + 100 * HOUR_MS + 1) == []  # just checked
    due = registry.due_outside(later, later + HOUR_MS, now_ms=DAY0 + 101 * HOUR_MS)  # one hour on: due
    assert due == holes[:MAX_RECHECKS_PER_RUN]
    assert registry.due_outside(DAY0, later, now_ms=DAY0 + 101 * HOUR_MS) == []  # inside the checked range
