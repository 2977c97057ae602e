"""How fast curation is: all history of 15m at once, and the one new day a DAG run adds.

Raw data: ~9 years of synthetic-but-realistic BTCUSDT 15m candles (~325k rows, one
Parquet partition per UTC day) ingested from the Binance sandbox with ``DataIngestion``
into a temporary ``RAW_DATA_DIR``, except the last day. Then:

1. full curation of all history into an empty ``CURATED_DATA_DIR`` (goal <= 6 s: features and
   the group-committed day files together),
2. re-curation of all history when nothing changed (idempotent: no file rewritten),
3. the DAG's incremental path: ingest the last day, ``curate_days([last_day])``
   (goal <= 0.5 s), then a few more runs of the same day for a median.

If a goal is missed, the slow step is profiled (cProfile) and the top entries printed.

    .venv/bin/python bench/curation.py [--years 9] [--raw-cache DIR] [--profile]

``--raw-cache DIR`` keeps the ingested raw partitions in DIR and reuses them next time.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import os
import pstats
import shutil
import statistics
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
for entry in (str(REPO_ROOT / "plugins"), str(REPO_ROOT)):
    if entry not in sys.path:
        sys.path.insert(0, entry)

FULL_GOAL_S = 6.0
INCREMENTAL_GOAL_S = 0.5
INTERVAL = "15m"
SYMBOL = "BTCUSDT"
HISTORY_START = datetime(2017, 8, 17, tzinfo=UTC)  # BTCUSDT's first candle


def verdict(seconds: float, goal: float) -> str:
    return f"goal <= {goal:g} s: {'MET' if seconds <= goal else 'MISSED'}"


def profile(label: str, call, top: int = 25) -> None:
    profiler = cProfile.Profile()
    profiler.enable()
    call()
    profiler.disable()
    out = io.StringIO()
    stats = pstats.Stats(profiler, stream=out).strip_dirs().sort_stats("cumulative")
    stats.print_stats(top)
    print(f"\n--- cProfile of {label} (top {top} by cumulative time) ---")
    print(out.getvalue())
    out = io.StringIO()
    pstats.Stats(profiler, stream=out).strip_dirs().sort_stats("tottime").print_stats(15)
    print(f"--- cProfile of {label} (top 15 by own time) ---")
    print(out.getvalue())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--years", type=float, default=9.0, help="years of 15m history (default 9)")
    parser.add_argument("--raw-cache", type=Path, help="keep/reuse the ingested raw partitions here")
    parser.add_argument("--profile", action="store_true", help="profile even when the goals are met")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="bench_curation_"))
    raw_dir = args.raw_cache.absolute() if args.raw_cache else work / "raw"
    curated_dir = work / "curated"
    # Everything the market_data modules read at import time is set before importing them.
    os.environ.update({
        "AIRFLOW_HOME": str(work / "airflow"), "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "AIRFLOW__METRICS__STATSD_ON": "False", "LOG_LEVEL": "WARNING",
        "RAW_DATA_DIR": str(raw_dir), "CURATED_DATA_DIR": str(curated_dir), "BINANCE_SYMBOLS": SYMBOL,
    })
    os.environ.pop("BINANCE_INTERVALS", None)

    from include.binance_sandbox import SandboxServer

    today = datetime.now(UTC).replace(hour=0, minute=0, second=0, microsecond=0)
    end = min(today, HISTORY_START + timedelta(days=round(args.years * 365.25)))
    last_day = end - timedelta(days=1)
    print(f"host: {os.cpu_count()} CPU(s), load average {' / '.join(f'{x:.2f}' for x in os.getloadavg())} "
          f"(1/5/15 min) - figures scale with other work on the machine")
    try:
        with SandboxServer(host="127.0.0.1", port=0, seed=42) as sandbox:
            os.environ["AIRFLOW_CONN_BINANCE_DEFAULT"] = json.dumps({"conn_type": "http", "host": sandbox.url})
            from include.market_data.config import load_settings
            from include.market_data.curation import DataCuration
            from include.market_data.ingestion import DataIngestion
            from include.market_data.storage import RawStore
            from include.market_data.timeframes import to_ms

            settings = load_settings()
            ingestion = DataIngestion(settings)
            raw = RawStore(settings.raw_data_dir)
            have = raw.days(INTERVAL, SYMBOL)
            began = time.perf_counter()
            if not have or have[0] > to_ms(HISTORY_START) or have[-1] < to_ms(last_day) - 86_400_000:
                ingested = ingestion.ingest(INTERVAL, HISTORY_START, last_day, SYMBOL, source="rest")
                print(f"ingested {ingested.candles_fetched} {INTERVAL} candles in {ingested.pages} pages "
                      f"({len(ingested.days_touched)} day partitions) in {time.perf_counter() - began:.1f} s")
            else:
                print(f"reusing raw partitions in {raw_dir}")
            # the newest day is ingested later, as a scheduled run would
            newest = raw.path(INTERVAL, SYMBOL, to_ms(last_day))
            if newest.exists():
                newest.unlink()

            curation = DataCuration(settings)
            began = time.perf_counter()
            full = curation.curate_timeframe(INTERVAL, SYMBOL)
            full_s = time.perf_counter() - began
            print(f"\nhistory: {HISTORY_START.date()} .. {last_day.date()} (exclusive), "
                  f"{full.rows} rows in {len(full.days_written)} day files")
            print(f"full curation:        {full_s:7.3f} s  {full.rows / full_s:>10,.0f} rows/s   "
                  f"{verdict(full_s, FULL_GOAL_S)}")

            began = time.perf_counter()
            again = curation.curate_timeframe(INTERVAL, SYMBOL)
            again_s = time.perf_counter() - began
            print(f"re-curation (no-op):  {again_s:7.3f} s  {again.rows / again_s:>10,.0f} rows/s   "
                  f"(nothing changed, no file rewritten)")

            ingestion.ingest(INTERVAL, last_day, end, SYMBOL, source="rest")
            day_ms = to_ms(last_day)
            began = time.perf_counter()
            day = curation.curate_days(INTERVAL, SYMBOL, [day_ms])
            first_s = time.perf_counter() - began
            assert day.days_written == [last_day.date().isoformat()], day
            repeats = []
            curated_file = curation.curated.path(INTERVAL, day_ms)
            for _ in range(5):
                curated_file.unlink()  # so each run really computes, validates and writes the day
                began = time.perf_counter()
                curation.curate_days(INTERVAL, SYMBOL, [day_ms])
                repeats.append(time.perf_counter() - began)
            median_s = statistics.median(repeats)
            print(f"incremental new day:  {first_s:7.3f} s first run, {median_s:.3f} s median of "
                  f"{len(repeats)} more ({day.rows} rows)   {verdict(max(first_s, median_s), INCREMENTAL_GOAL_S)}")

            if args.profile or full_s > FULL_GOAL_S:
                shutil.rmtree(curated_dir, ignore_errors=True)
                profile("full curation", lambda: DataCuration(settings).curate_timeframe(INTERVAL, SYMBOL))
            if args.profile or max(first_s, median_s) > INCREMENTAL_GOAL_S:
                def incremental():
                    curated_file.unlink(missing_ok=True)
                    curation.curate_days(INTERVAL, SYMBOL, [day_ms])
                profile("incremental day", incremental)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
