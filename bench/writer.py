"""How fast the raw writer is: ms per day file, and how many fsync calls it makes.

Two years of synthetic 15m candles (1460 day files, 96 rows each) written with
``RawStore.write`` into a temporary directory on a real disk (never tmpfs), in three cases:

1. new days      - an empty directory: every day file is created,
2. no-op rewrite - the same rows again: nothing changes, no file is rewritten,
3. merge         - each day holds the even candles, the odd ones are merged in.

Each case runs in two call shapes: one ``write`` per day (what ``write_staged`` did: one
commit per file, the "before" shape) and one ``write`` for all days (the group commit: every
day file fsynced, renamed, then the directory fsynced once). ``os.fsync`` is counted (files
and directories apart). Figures only, never a verdict on time.

    .venv/bin/python bench/writer.py [--days 1460] [--repeat 3] [--dir /var/tmp]

Measured on a shared 2-CPU VM (ext4), ms per day file, medians of 3, two alternating rounds:

    case     before (per-file commit, no directory fsync)   after (one write, group commit)
    new      1.89-2.10                                       0.71-0.95   (1460 file fsyncs, 1 dir fsync)
    no-op    1.30-1.36                                       0.44
    merge    6.95-8.03                                       1.60-1.75

Creating a file costs 0.1-1 ms of kernel time here, and that cost moves with other work on the
machine: compare figures from one run side by side, not across runs.
"""

from __future__ import annotations

import argparse
import inspect
import os
import shutil
import stat
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
for entry in (str(REPO_ROOT / "plugins"), str(REPO_ROOT)):
    if entry not in sys.path:
        sys.path.insert(0, entry)

os.environ.setdefault("LOG_LEVEL", "WARNING")

import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402
import pyarrow.compute as pc  # noqa: E402

from include.market_data.schema import DECIMAL_TYPE, RAW_SCHEMA, TIME_TYPE  # noqa: E402
from include.market_data.storage import RawStore  # noqa: E402
from include.market_data.timeframes import DAY_MS  # noqa: E402

INTERVAL, SYMBOL, STEP = "15m", "BTCUSDT", 900_000
START = 19_000 * DAY_MS  # 2022-01-08
PROVENANCE = {"source": "https://data-api.binance.vision", "endpoint": "/api/v3/klines",
              "fetched_at": "2024-01-01T00:00:00+00:00", "latency_ms": "50.0", "decimal_places": "8"}


def candles(days: int, seed: int = 7) -> pa.Table:
    """``days`` x 96 valid 15m candles (RAW_SCHEMA), a random walk with 8 decimal places."""
    n = days * 96
    rng = np.random.default_rng(seed)
    units = 10 ** 8
    close = (30_000 * units + np.cumsum(rng.integers(-2_000_000_000, 2_000_000_000, n))).astype(np.int64)
    open_ = np.concatenate([[close[0]], close[:-1]])
    high = np.maximum(open_, close) + rng.integers(0, 500_000_000, n)
    low = np.minimum(open_, close) - rng.integers(0, 500_000_000, n)
    volume = rng.integers(1, 500 * units, n)
    quote = volume // units * (close // units) * units + rng.integers(0, units, n)
    taker = volume // 2
    taker_quote = quote // 2

    def decimals(values: np.ndarray) -> pa.Array:
        text = [f"{v // units}.{v % units:08d}" for v in values.tolist()]
        return pc.cast(pa.array(text, pa.string()), DECIMAL_TYPE)

    times = START + np.arange(n, dtype=np.int64) * STEP
    arrays = {
        "open_time": pa.array(times).cast(TIME_TYPE), "open": decimals(open_), "high": decimals(high),
        "low": decimals(low), "close": decimals(close), "volume": decimals(volume),
        "close_time": pa.array(times + STEP - 1).cast(TIME_TYPE), "quote_asset_volume": decimals(quote),
        "number_of_trades": pa.array(rng.integers(1, 10_000, n)),
        "taker_buy_base_asset_volume": decimals(taker), "taker_buy_quote_asset_volume": decimals(taker_quote),
    }
    return pa.Table.from_pydict(arrays, schema=RAW_SCHEMA)


class FsyncCounter:
    """Wraps ``os.fsync``: counts calls on files and on directories."""

    def __init__(self):
        self.files = self.dirs = 0
        self._real = os.fsync

    def __call__(self, fd):
        if stat.S_ISDIR(os.fstat(fd).st_mode):
            self.dirs += 1
        else:
            self.files += 1
        return self._real(fd)

    def reset(self):
        self.files = self.dirs = 0


def split_days(table: pa.Table) -> list[pa.Table]:
    """One table per UTC day (the call shape of one ``write`` per day)."""
    days = pc.cast(table.column("open_time"), pa.int64()).to_numpy() // DAY_MS
    cuts = [0, *(np.flatnonzero(days[1:] != days[:-1]) + 1).tolist(), table.num_rows]
    return [table.slice(lo, hi - lo) for lo, hi in zip(cuts[:-1], cuts[1:])]


def write(store: RawStore, table: pa.Table, per_day: bool, day_provenance: bool) -> int:
    """Write ``table``; returns the number of day results."""
    parts = split_days(table) if per_day else [table]
    results = 0
    for part in parts:
        extra = {}
        if day_provenance and not per_day:
            days = range(START, START + (table.num_rows // 96) * DAY_MS, DAY_MS)
            extra["day_provenance"] = {d: {"source": f"https://data.binance.vision/{d}.zip", "sha256": "0" * 64}
                                       for d in days}
        results += len(store.write(INTERVAL, SYMBOL, part, PROVENANCE, validated=True, now=2 ** 62, **extra))
    return results


def run_case(base: Path, name: str, table: pa.Table, per_day: bool, repeat: int, counter: FsyncCounter,
             has_day_provenance: bool) -> dict:
    days = table.num_rows // 96
    evens = table.filter(pa.array(np.arange(table.num_rows) % 2 == 0))
    odds = table.filter(pa.array(np.arange(table.num_rows) % 2 == 1))
    timings, fsyncs = [], None
    for k in range(repeat):
        root = base / f"{name}-{'per-day' if per_day else 'grouped'}-{k}"
        store = RawStore(str(root))
        if name == "noop":
            write(store, table, per_day=False, day_provenance=False)
        elif name == "merge":
            write(store, evens, per_day=False, day_provenance=False)
        os.sync()  # the setup's dirty pages are not charged to the timed write
        rows = odds if name == "merge" else table
        counter.reset()
        began = time.perf_counter()
        n = write(store, rows, per_day, has_day_provenance)
        timings.append(time.perf_counter() - began)
        assert n == days, (n, days)
        fsyncs = (counter.files, counter.dirs)
        if name == "merge":
            assert store.read(INTERVAL, SYMBOL, START, START + days * DAY_MS).num_rows == table.num_rows
        shutil.rmtree(root)
    median = statistics.median(timings)
    return {"ms_per_file": median * 1000 / days, "total_s": median, "min_ms": min(timings) * 1000 / days,
            "max_ms": max(timings) * 1000 / days, "fsync_files": fsyncs[0], "fsync_dirs": fsyncs[1]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--days", type=int, default=1460, help="day files per case (default 1460: two years)")
    parser.add_argument("--repeat", type=int, default=3, help="runs per case; the median is printed")
    parser.add_argument("--dir", type=Path, default=None, help="parent of the temp dir (a real disk)")
    parser.add_argument("--cases", default="new,noop,merge")
    parser.add_argument("--shapes", default="per-day,grouped")
    args = parser.parse_args()

    has_day_provenance = "day_provenance" in inspect.signature(RawStore.write).parameters
    table = candles(args.days)
    counter = FsyncCounter()
    os.fsync = counter
    base = Path(tempfile.mkdtemp(prefix="bench_writer_", dir=args.dir))
    fs = os.statvfs(base)
    print(f"host: {os.cpu_count()} CPU(s), load average {' / '.join(f'{x:.2f}' for x in os.getloadavg())}; "
          f"dir {base} (block size {fs.f_bsize}); {args.days} day files of {INTERVAL}, 96 rows each; "
          f"median of {args.repeat}; day_provenance {'supported' if has_day_provenance else 'absent (old API)'}")
    print(f"{'case':<14}{'call shape':<22}{'ms/file':>9}{'(min..max)':>16}{'total s':>9}"
          f"{'fsync files':>13}{'fsync dirs':>12}")
    try:
        for name in args.cases.split(","):
            for shape in args.shapes.split(","):
                per_day = shape == "per-day"
                result = run_case(base, name, table, per_day, args.repeat, counter, has_day_provenance)
                label = "one write per day" if per_day else "one write, all days"
                print(f"{name:<14}{label:<22}{result['ms_per_file']:>9.3f}"
                      f"{'(' + format(result['min_ms'], '.2f') + '..' + format(result['max_ms'], '.2f') + ')':>16}"
                      f"{result['total_s']:>9.2f}{result['fsync_files']:>13}{result['fsync_dirs']:>12}")
    finally:
        shutil.rmtree(base, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
