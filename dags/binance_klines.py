"""One DAG per timeframe: binance_klines_<interval> — plan -> fetch -> gap_check -> write_raw -> curate -> report.

``fetch``, ``gap_check`` and ``write_raw`` are mapped over the run's symbols (``plan`` names
them), so a bad or delisted symbol fails only its own task instances; ``curate`` takes every
symbol that was written, and ``report`` fails the run naming the symbols that were not.

Thin on purpose: the task bodies live in ``include.market_data.pipeline``; nothing heavy is
imported at parse time (they are imported inside the tasks).
"""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

from airflow.sdk import Asset, CronDataIntervalTimetable, Param, dag, get_parsing_context, task, task_group

from include.market_data.alerting import binance_task_defaults
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


# Mapped task instances are named after their symbol in the UI (set from inside the task: a
# template over op_kwargs is not resolved yet inside a mapped task group).
SYMBOL_LABEL = "{{ symbol_label }}"


def _label(symbol: str) -> None:
    from airflow.sdk import get_current_context

    get_current_context()["symbol_label"] = symbol


def schedule_for(interval: str) -> str:
    if interval in SLOW_INTERVALS and SETTINGS.slow_intervals_schedule == "15m":
        return CLOSE_SCHEDULES["15m"]
    return CLOSE_SCHEDULES[interval]


def curated_asset(interval: str) -> Asset:
    return Asset(uri=curated_asset_uri(SETTINGS, interval), name=f"curated_{interval}")


def build_dag(interval: str):
    @dag(
        dag_id=f"binance_klines_{interval}",
        description=f"Binance {interval} klines: plan -> fetch -> gap_check -> write_raw (per symbol) -> curate -> report",
        schedule=CronDataIntervalTimetable(schedule_for(interval), timezone="UTC"),
        start_date=datetime(SETTINGS.ingest_start.year, SETTINGS.ingest_start.month, SETTINGS.ingest_start.day,
                            tzinfo=timezone.utc),
        catchup=False,
        max_active_runs=MAX_ACTIVE_RUNS,
        max_active_tasks=8,
        dagrun_timeout=timedelta(hours=12),
        tags=["binance", "market-data", "ingestion", interval],
        default_args=binance_task_defaults(),
        params={
            "start": Param(None, type=["null", "string"], pattern=ISO_TIME_PATTERN, title="start (UTC)",
                           description="Window start, inclusive, UTC: 2024-01-31 or 2024-01-31T10:00Z. "
                                       "Empty: the run's data interval."),
            "end": Param(None, type=["null", "string"], pattern=ISO_TIME_PATTERN, title="end (UTC)",
                         description="Window end, exclusive, UTC: 2024-02-01 or 2024-02-01T00:00Z "
                                     "(clipped to the last closed candle). Empty: the run's data interval."),
            "symbols": Param(list(SETTINGS.symbols), type="array", minItems=1, uniqueItems=True,
                             items={"type": "string", "pattern": SYMBOL_PATTERN, "enum": list(SETTINGS.symbols)},
                             title="symbols",
                             description="Symbols to ingest, one or more of BINANCE_SYMBOLS: BTCUSDT, ETHUSDT. "
                                         "Default: all of them."),
        },
        doc_md=__doc__,
    )
    def klines_dag():
        @task
        def plan(data_interval_start=None, data_interval_end=None, params=None) -> list[str]:
            from include.market_data import pipeline

            return pipeline.plan(interval, data_interval_start, data_interval_end, dict(params or {}))

        # One task instance per symbol (a mapped task group, below); the UI names each by its symbol.
        @task(pool=SETTINGS.pool, map_index_template=SYMBOL_LABEL)
        def fetch(symbol: str, data_interval_start=None, data_interval_end=None, params=None, run_id=None) -> dict:
            from include.market_data import pipeline

            _label(symbol)
            return pipeline.fetch(interval, symbol, data_interval_start, data_interval_end, dict(params or {}), run_id)

        @task(pool=SETTINGS.pool, map_index_template=SYMBOL_LABEL, **WRITER)
        def gap_check(fetched: dict) -> dict:
            from include.market_data import pipeline

            _label(fetched["symbol"])
            return pipeline.check_gaps(fetched)

        # In the Binance pool too: cleared after its staging was removed, it fetches again.
        @task(pool=SETTINGS.pool, map_index_template=SYMBOL_LABEL, **WRITER)
        def write_raw(checked: dict) -> dict:
            from include.market_data import pipeline

            _label(checked["symbol"])
            return pipeline.write_raw(checked)

        # all_done: the symbols that were written are curated even when another symbol failed.
        @task(outlets=[curated_asset(interval)], trigger_rule="all_done", **WRITER)
        def curate(written) -> dict:
            from include.market_data import pipeline

            return pipeline.curate(interval, written)

        @task(trigger_rule="all_done")
        def report(planned: list[str], written, curated) -> dict:
            from include.market_data import pipeline

            return pipeline.report(interval, planned, written, curated)

        # A mapped task group: each symbol's gap_check and write_raw depend on its own fetch only.
        @task_group(prefix_group_id=False)
        def ingest_symbol(symbol: str):
            return write_raw(gap_check(fetch(symbol)))

        symbols = plan()
        written = ingest_symbol.expand(symbol=symbols)
        report(symbols, written, curate(written))

    return klines_dag()


_parsing = get_parsing_context()
for _interval in SETTINGS.intervals:
    _dag_id = f"binance_klines_{_interval}"
    if _parsing.dag_id is None or _parsing.dag_id == _dag_id:
        globals()[_dag_id] = build_dag(_interval)
