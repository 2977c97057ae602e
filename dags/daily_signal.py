"""daily_signal — once a day at RECOMMENDATION_UPDATE_TIME (12:00 UTC): wait_for_fresh_data -> generate_signal.

The run whose data interval ends at 12:00 UTC of day D writes the signal of D
(`SIGNAL_DATA_DIR/signal_<YYYYMMDD>.json`, the `.png` chart and its row of `signals.parquet`)
from the curated 1d/4h/1h candles that closed before 12:00 of D.

* **wait_for_fresh_data** — a reschedule-mode sensor (frees its worker slot between pokes)
  that checks the curated data: per timeframe, is the newest candle that must be closed at
  12:00 there yet (the 11:00 1h, the 08:00 4h and yesterday's 1d candle)? It succeeds as
  soon as it is, or — still stale — once the deadline passes:
  `max(12:00 of D + max_wait_minutes, the run's start)` (a run param, default 60: a backfill
  of a past day looks once). It then
  hands `fresh: false` on instead of failing, so the day still gets a file.
* **generate_signal** — writes the signal; when the inputs are still stale it writes a
  `stale_data` signal (reason and per-timeframe lag, no direction), logs a warning and
  increments `signal.stale`, so a stale day is visible to the quant engine, in the metrics
  and in the logs rather than a silently failed run.

Why time-based, not Asset-scheduled: DESIGN fixes the signal time at 12:00 UTC. The curated
1h Asset updates every hour and 4h/1d at other times, so an Asset schedule would fire at the
wrong times (or, with an AND of the three, at the first time all three happened to update).
The curated Assets are listed as inlets (lineage) and the sensor does the "is the data
there" part; the signal table is an outlet Asset others may schedule on.

Thin on purpose: the logic lives in `include.market_data.signal` and is imported inside the
tasks (no pandas/pyarrow at parse time).
"""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

from airflow.sdk import (Asset, AsyncCallback, CronDataIntervalTimetable, DeadlineAlert, DeadlineReference, Param,
                         dag, task)

from include.market_data.alerting import (SIGNAL_DEADLINE_AFTER, on_signal_deadline_missed, on_task_failure,
                                          without_deadline_in_dag_test)
from include.market_data.assets import curated_asset_uri, signal_asset_uri
from include.market_data.config import load_settings

SETTINGS = load_settings()

SCHEDULE = f"{SETTINGS.recommendation_minute} {SETTINGS.recommendation_hour} * * *"
# The rule needs 50 closed 1d candles (signal_rule.HISTORY_NEEDED["1d"]); the first run
# worth scheduling comes that long after INGEST_START, plus a margin for exchange outages.
FIRST_SIGNAL_AFTER_DAYS = 64
DEFAULT_MAX_WAIT_MINUTES = 60
MAX_WAIT_LIMIT_MINUTES = 360
POKE_INTERVAL_S = 60
# A backstop only: the sensor gives up by itself at its deadline, which is at most
# MAX_WAIT_LIMIT_MINUTES after its first poke. Should this still fire (pokes could not run
# for hours), the sensor fails and the run fails loudly.
SENSOR_TIMEOUT = timedelta(minutes=MAX_WAIT_LIMIT_MINUTES + 30)
SIGNAL_INTERVALS = ("1d", "4h", "1h")  # as include.market_data.signal_rule.SIGNAL_INTERVALS


def _signal_asset() -> Asset:
    return Asset(uri=signal_asset_uri(SETTINGS), name="daily_signal")


def _curated_asset(interval: str) -> Asset:
    # Same name and URI as the outlets of binance_klines_<interval>.
    return Asset(uri=curated_asset_uri(SETTINGS, interval), name=f"curated_{interval}")


# No signal out 30 minutes after RECOMMENDATION_UPDATE_TIME: the scheduler, once the deadline has passed
# and the run has not succeeded, queues on_signal_deadline_missed on the triggerer (an AsyncCallback).
# A run that succeeded before its deadline has its deadline deleted (DagRun.update_state ->
# Deadline.prune_deadlines), so it never fires; a run that failed keeps it, and it fires on time.
#
# Reference: DAGRUN_QUEUED_AT, "30 minutes after the run was queued". The wanted time is
# data_interval_end + 30 min (data_interval_end is RECOMMENDATION_UPDATE_TIME of the signal day, see
# signal_date), and no built-in reference reads data_interval_end:
# * a scheduled run is queued when its data interval ends (the scheduler creates it then, QUEUED), so
#   queued_at + 30 min is data_interval_end + 30 min, give or take the scheduler's loop;
# * a manual run is queued when triggered, at or after the end of the interval it infers from its logical
#   date: its deadline is 30 minutes after the trigger (data_interval_end + 30 min when triggered at
#   RECOMMENDATION_UPDATE_TIME), so a re-run of a past day gets 30 minutes instead of firing at once;
# * DAGRUN_LOGICAL_DATE would be wrong: a scheduled run's logical date is its data_interval_start, the day
#   before, so "+30 min" would have passed before the run even exists and fire every day; a manual run's
#   logical date is its trigger time, or none at all (then no deadline).
# The exact time needs a custom reference on DagRun.data_interval_end, which Airflow only accepts when an
# AirflowPlugin registers it in every scheduler (a scheduler without it fails to create the runs).
# Backfill runs (all queued at once) get deadlines too; the callback logs but does not count them.
SIGNAL_DEADLINE = DeadlineAlert(
    name="signal_out",
    reference=DeadlineReference.DAGRUN_QUEUED_AT,
    interval=SIGNAL_DEADLINE_AFTER,
    callback=AsyncCallback(on_signal_deadline_missed),
)


def signal_date(data_interval_end: datetime) -> str:
    """The UTC date whose signal a run writes: the day its data interval ends (at the cutoff)."""
    return data_interval_end.astimezone(timezone.utc).date().isoformat()


@dag(
    dag_id="daily_signal",
    description="Daily trade signal at RECOMMENDATION_UPDATE_TIME UTC from curated 1d/4h/1h candles",
    schedule=CronDataIntervalTimetable(SCHEDULE, timezone="UTC"),
    start_date=datetime(SETTINGS.ingest_start.year, SETTINGS.ingest_start.month, SETTINGS.ingest_start.day,
                        tzinfo=timezone.utc) + timedelta(days=FIRST_SIGNAL_AFTER_DAYS),
    catchup=False,
    # signals.parquet is read-modify-written under a file lock; object stores have none, so there one
    # run at a time (and one generate_signal at a time, backfills included: see binance_klines.py)
    max_active_runs=1 if "://" in SETTINGS.signal_data_dir.removeprefix("file://") else 4,
    dagrun_timeout=timedelta(hours=12),
    tags=["binance", "market-data", "signal"],
    default_args={
        "owner": "market-data",
        "retries": 2,
        "retry_delay": timedelta(minutes=2),
        # final failures only (not retried tries): see include/market_data/alerting.py
        "on_failure_callback": on_task_failure,
    },
    deadline=SIGNAL_DEADLINE,
    params={
        "symbol": Param(SETTINGS.symbols[0], type="string", enum=list(SETTINGS.symbols), title="symbol",
                        description="Symbol of the signal, one of BINANCE_SYMBOLS: BTCUSDT."),
        "max_wait_minutes": Param(DEFAULT_MAX_WAIT_MINUTES, type="integer", minimum=0,
                                  maximum=MAX_WAIT_LIMIT_MINUTES, title="max wait (minutes)",
                                  description="Minutes past the signal time (RECOMMENDATION_UPDATE_TIME, "
                                              "12:00 UTC) to wait for fresh curated data before writing a "
                                              "stale_data signal: 30 (0 to 360). 0: look once."),
    },
    doc_md=__doc__,
)
def daily_signal():
    @task.sensor(poke_interval=POKE_INTERVAL_S, timeout=SENSOR_TIMEOUT.total_seconds(), mode="reschedule",
                 soft_fail=False)
    def wait_for_fresh_data(data_interval_end=None, dag_run=None, params=None):
        from airflow.sdk import PokeReturnValue

        from include.market_data.signal import DataSignal

        params = dict(params or {})
        started = getattr(dag_run, "start_date", None) or data_interval_end
        # Wait up to max_wait_minutes past the cutoff; a backfill of a past day (started long
        # after it) gets one look, since waiting cannot make old data fresher.
        deadline = max(data_interval_end + timedelta(minutes=int(params["max_wait_minutes"])), started)
        result = DataSignal().poke(signal_date(data_interval_end), params["symbol"], deadline=deadline)
        return PokeReturnValue(is_done=result["done"], xcom_value=result)

    @task(inlets=[_curated_asset(interval) for interval in SIGNAL_INTERVALS], outlets=[_signal_asset()],
          max_active_tis_per_dag=1 if "://" in SETTINGS.signal_data_dir.removeprefix("file://") else None)
    def generate_signal(waited: dict, data_interval_end=None, params=None) -> dict:
        from include.market_data.signal import DataSignal

        signals = DataSignal()
        # Freshness is checked again here: data that arrived after the sensor gave up still counts.
        signal = signals.generate(signal_date(data_interval_end), dict(params or {})["symbol"])
        return {
            "date": signal["date"],
            "symbol": signal["symbol"],
            "status": signal["status"],
            "direction": signal["direction"],
            "confidence": signal["confidence"],
            "sensor_timed_out": bool(waited.get("timed_out")),
            "path": str(signals.json_path(signal["date"], signal["symbol"])),
        }

    generate_signal(wait_for_fresh_data())


# dag.test() / `airflow dags test` crash on a DAG with a deadline in Airflow 3.3.2 (see without_deadline_in_dag_test).
daily_signal_dag = without_deadline_in_dag_test(daily_signal())

if __name__ == "__main__":
    daily_signal_dag.test()
