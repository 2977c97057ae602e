"""One DAG per timeframe: binance_klines_<interval> — fetch -> gap_check -> write_raw -> curate.

Thin on purpose: the task bodies live in ``include.market_data.pipeline``; nothing heavy is
imported at parse time (they are imported inside the tasks).
"""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

from airflow.sdk import Asset, CronDataIntervalTimetable, Param, dag, get_parsing_context, task

from include.market_data.assets import curated_asset_uri
from include.market_data.config import SYMBOL_PATTERN, load_settings

SETTINGS = load_settings()

# Cron (UTC) per interval; each gives a real data interval (a bare cron string would not).
CLOSE_SCHEDULES = {
    "15m": "*/15 * * * *",
    "30m": "*/15 * * * *",
    "1h": "0 * * * *",
    "4h": "0 */4 * * *",
    "1d": "0 0 * * *",
    "1w": "0 0 * * 1",
}
SLOW_INTERVALS = ("4h", "1d", "1w")
# Partitions are merged under a file lock on local disks; object stores have none, so there
# the tasks that write (gap registry, raw, curated) run one at a time per DAG, backfill runs
# included (a backfill's own max_active_runs would not bound them).
ON_OBJECT_STORE = any("://" in d and not d.startswith("file://")
                      for d in (SETTINGS.raw_data_dir, SETTINGS.curated_data_dir))
MAX_ACTIVE_RUNS = 1 if ON_OBJECT_STORE else 4
WRITER = {"max_active_tis_per_dag": 1} if ON_OBJECT_STORE else {}
ISO_TIME_PATTERN = r"^\d{4}-\d{2}-\d{2}([T ]\d{2}:\d{2}(:\d{2}(\.\d{1,6})?)?(Z|[+-]\d{2}:?\d{2})?)?$"


def schedule_for(interval: str) -> str:
    if interval in SLOW_INTERVALS and SETTINGS.slow_intervals_schedule == "15m":
        return CLOSE_SCHEDULES["15m"]
    return CLOSE_SCHEDULES[interval]


def curated_asset(interval: str) -> Asset:
    return Asset(uri=curated_asset_uri(SETTINGS, interval), name=f"curated_{interval}")


def build_dag(interval: str):
    @dag(
        dag_id=f"binance_klines_{interval}",
        description=f"Binance {interval} klines: fetch -> gap_check -> write_raw -> curate",
        schedule=CronDataIntervalTimetable(schedule_for(interval), timezone="UTC"),
        start_date=datetime(SETTINGS.ingest_start.year, SETTINGS.ingest_start.month, SETTINGS.ingest_start.day,
                            tzinfo=timezone.utc),
        catchup=False,
        max_active_runs=MAX_ACTIVE_RUNS,
        max_active_tasks=8,
        dagrun_timeout=timedelta(hours=12),
        tags=["binance", "market-data", "ingestion", interval],
        default_args={
            "owner": "market-data",
            "retries": 3,
            "retry_delay": timedelta(minutes=1),
            "retry_exponential_backoff": True,
            "max_retry_delay": timedelta(minutes=15),
        },
        params={
            "start": Param(None, type=["null", "string"], pattern=ISO_TIME_PATTERN, title="start (UTC)",
                           description="Manual window start, inclusive: 2024-01-31 or 2024-01-31T10:00Z. "
                                       "Empty: the run's data interval."),
            "end": Param(None, type=["null", "string"], pattern=ISO_TIME_PATTERN, title="end (UTC)",
                         description="Manual window end, exclusive; clipped to the last closed candle."),
            "symbols": Param(list(SETTINGS.symbols), type="array", minItems=1, uniqueItems=True,
                             items={"type": "string", "pattern": SYMBOL_PATTERN, "enum": list(SETTINGS.symbols)},
                             title="symbols", description="Symbols to ingest (of BINANCE_SYMBOLS)"),
        },
        doc_md=__doc__,
    )
    def klines_dag():
        # A run whose window is not closed yet fails fast and retries shortly (WindowNotClosed).
        @task(pool=SETTINGS.pool, retries=12, retry_delay=timedelta(seconds=30), retry_exponential_backoff=False)
        def fetch(data_interval_start=None, data_interval_end=None, params=None, run_id=None) -> dict:
            from include.market_data import pipeline

            return pipeline.fetch(interval, data_interval_start, data_interval_end, dict(params or {}), run_id)

        @task(pool=SETTINGS.pool, **WRITER)
        def gap_check(fetched: dict) -> dict:
            from include.market_data import pipeline

            return pipeline.check_gaps(fetched)

        @task(**WRITER)
        def write_raw(checked: dict) -> dict:
            from include.market_data import pipeline

            return pipeline.write_raw(checked)

        @task(outlets=[curated_asset(interval)], **WRITER)
        def curate(written: dict) -> dict:
            from include.market_data import pipeline

            return pipeline.curate(written)

        curate(write_raw(gap_check(fetch())))

    return klines_dag()


_parsing = get_parsing_context()
for _interval in SETTINGS.intervals:
    _dag_id = f"binance_klines_{_interval}"
    if _parsing.dag_id is None or _parsing.dag_id == _dag_id:
        globals()[_dag_id] = build_dag(_interval)
