"""Does a scheduled 15m run cost the same with 9 years of history on disk as with 1 week?

One scheduled run = the DAG's four task bodies from ``include.market_data.pipeline``
(fetch -> check_gaps -> write_raw -> curate) for one 15-minute data interval, called in
process with the same arguments the tasks pass (data_interval_start/end, the DAG's
params, a run_id), against an in-process Binance sandbox without latency or limits.

Two stores are filled first (untimed) through DataIngestion from the sandbox:
``1w`` holds the 7 days before T0, ``9y`` everything from 2017-08-17 to T0 (~3400 day
files of 15m). Each store also gets its last 7 days curated, so a run merges into an
existing curated day file in both cases (nothing in the run lists the curated folder).
Then run k (k = 0..N) processes the data interval [T0 + 15 min * k, T0 + 15 min * (k+1))
in each store, the stores alternating so machine-load drift hits both alike; k = 0 is an
untimed warm-up (imports, first-touch caches). Goal: median(9y) / median(1w) <= 1.1.

    .venv/bin/python bench/incremental.py [--repeats 15] [--history-days 3390]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
for _entry in (str(REPO_ROOT / "plugins"), str(REPO_ROOT)):
    if _entry not in sys.path:
        sys.path.insert(0, _entry)

INTERVAL = "15m"
SYMBOL = "BTCUSDT"
SLOT_MS = 15 * 60_000
DAY_MS = 86_400_000
TASKS = ("fetch", "check_gaps", "write_raw", "curate")


def setup_env(workdir: Path) -> None:
    """What Airflow and market_data read at import time; call before importing them."""
    os.environ.update({
        "AIRFLOW_HOME": str(workdir / "airflow_home"),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "AIRFLOW__METRICS__STATSD_ON": "False",
        "AIRFLOW__LOGGING__LOGGING_LEVEL": "WARNING",
        "LOG_LEVEL": "ERROR",  # the 9y fill records the 4 h before BTCUSDT's first candle as a known gap
        "RAW_DATA_DIR": str(workdir / "unused_raw"),
        "CURATED_DATA_DIR": str(workdir / "unused_curated"),
        "SIGNAL_DATA_DIR": str(workdir / "unused_signals"),
        "BINANCE_INTERVALS": INTERVAL,
    })


def fill(settings, start_ms: int, t0_ms: int) -> dict:
    """Raw history [start, T0) through DataIngestion, and the last 7 days curated."""
    from include.market_data.curation import DataCuration
    from include.market_data.ingestion import DataIngestion

    began = time.perf_counter()
    summary = DataIngestion(settings).ingest(INTERVAL, start_ms, t0_ms, SYMBOL, source="rest")
    last_day = (t0_ms - 1) // DAY_MS * DAY_MS
    DataCuration(settings).curate_days(INTERVAL, SYMBOL, [last_day - i * DAY_MS for i in range(7)],
                                       follow_warmup=False)
    files = sum(1 for _ in (Path(settings.raw_data_dir) / INTERVAL).glob("*.parquet"))
    return {"rows": summary.rows_added, "files": files, "seconds": time.perf_counter() - began}


def scheduled_run(settings, slot_start_ms: int, run_id: str) -> dict[str, float]:
    """The task bodies (plan, then one symbol's) for the data interval [slot_start, slot_start + 15 min), timed each."""
    from include.market_data import pipeline

    start = datetime.fromtimestamp(slot_start_ms / 1000, tz=UTC)
    end = datetime.fromtimestamp((slot_start_ms + SLOT_MS) / 1000, tz=UTC)
    params = {"start": None, "end": None, "symbols": [SYMBOL]}  # the DAG's defaults
    times = {}
    began = time.perf_counter()
    symbols = pipeline.plan(INTERVAL, start, end, params, settings=settings)
    fetched = pipeline.fetch(INTERVAL, symbols[0], start, end, params, run_id, settings=settings)
    times["fetch"] = time.perf_counter() - began
    mark = time.perf_counter()
    checked = pipeline.check_gaps(json.loads(json.dumps(fetched)), settings=settings)  # through "XCom"
    times["check_gaps"] = time.perf_counter() - mark
    mark = time.perf_counter()
    written = pipeline.write_raw(json.loads(json.dumps(checked)), settings=settings)
    times["write_raw"] = time.perf_counter() - mark
    mark = time.perf_counter()
    curated = pipeline.curate(INTERVAL, [json.loads(json.dumps(written))], settings=settings)
    times["curate"] = time.perf_counter() - mark
    times["total"] = time.perf_counter() - began
    rows = written["rows_added"]
    if rows != 1 or curated["symbols"][0]["days_written"] < 1:
        raise RuntimeError(f"run {run_id} added {rows} rows, curated {curated}: expected one new candle")
    return times


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=15, help="timed runs per store (after one warm-up)")
    parser.add_argument("--history-days", type=int, default=None,
                        help="days of history in the big store (default: all since 2017-08-17)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary data directory")
    args = parser.parse_args(argv)

    workdir = Path(tempfile.mkdtemp(prefix="bench_incremental_"))
    setup_env(workdir)
    from include.binance_sandbox import SandboxServer

    server = SandboxServer(host="127.0.0.1", port=0, seed=42, weight_limit=10**12)
    server.start()
    os.environ["AIRFLOW_CONN_BINANCE_DEFAULT"] = json.dumps({"conn_type": "http", "host": server.url})
    try:
        from include.market_data.config import load_settings
        from include.market_data.timeframes import now_ms, to_ms

        base = load_settings()
        # Every slot a run processes must be closed now: T0 leaves room for the warm-up and the repeats.
        t0 = (now_ms() // SLOT_MS - (args.repeats + 2)) * SLOT_MS
        history_start = to_ms("2017-08-17") if args.history_days is None else t0 - args.history_days * DAY_MS
        stores = {
            "1w": (replace(base, raw_data_dir=str(workdir / "1w" / "raw"),
                           curated_data_dir=str(workdir / "1w" / "curated")), t0 - 7 * DAY_MS),
            "9y": (replace(base, raw_data_dir=str(workdir / "9y" / "raw"),
                           curated_data_dir=str(workdir / "9y" / "curated")), history_start),
        }
        load0 = os.getloadavg()[0]
        for name, (settings, start) in stores.items():
            filled = fill(settings, start, t0)
            print(f"store {name}: {filled['rows']} rows of {INTERVAL} in {filled['files']} day files "
                  f"(filled in {filled['seconds']:.1f} s, untimed)")

        times: dict[str, list[dict]] = {name: [] for name in stores}
        for k in range(args.repeats + 1):
            order = list(stores) if k % 2 == 0 else list(reversed(stores))
            for name in order:
                settings, _ = stores[name]
                result = scheduled_run(settings, t0 + k * SLOT_MS, f"scheduled__bench_{name}_{k}")
                if k > 0:
                    times[name].append(result)

        print(f"one scheduled {INTERVAL} run (fetch -> check_gaps -> write_raw -> curate), "
              f"median of {args.repeats} after a warm-up, seconds:")
        print(f"  {'store':>5} " + " ".join(f"{t:>10}" for t in (*TASKS, "total")) + f" {'min':>7} {'max':>7}")
        medians = {}
        for name, runs in times.items():
            med = {key: statistics.median(r[key] for r in runs) for key in (*TASKS, "total")}
            medians[name] = med
            totals = [r["total"] for r in runs]
            print(f"  {name:>5} " + " ".join(f"{med[t]:>10.3f}" for t in (*TASKS, "total"))
                  + f" {min(totals):>7.3f} {max(totals):>7.3f}")
        ratio = medians["9y"]["total"] / medians["1w"]["total"]
        extra = {t: medians["9y"][t] - medians["1w"][t] for t in TASKS}
        print("  9y - 1w per task: " + ", ".join(f"{t} {1000 * v:+.0f} ms" for t, v in extra.items()))
        print(f"  ratio 9y / 1w = {ratio:.2f} (goal <= 1.1); load average {load0:.1f} -> {os.getloadavg()[0]:.1f} "
              f"on {os.cpu_count()} cores")
        print(f"SUMMARY incremental: 15m run {medians['1w']['total']:.3f} s (1w) vs {medians['9y']['total']:.3f} s "
              f"(9y), ratio {ratio:.2f} {'met' if ratio <= 1.1 else 'MISSED'} (<=1.1)")
    finally:
        server.stop()
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
