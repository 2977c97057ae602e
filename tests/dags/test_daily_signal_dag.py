"""The daily_signal DAG: parses cleanly and lightly, runs at 12:00 UTC, and dag.test() writes the signal."""

from __future__ import annotations

import json
import runpy
import subprocess
import sys
from datetime import date, datetime, timedelta, timezone
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DAG_FILE = ROOT / "dags" / "daily_signal.py"
SYMBOL = "BTCUSDT"
MIDNIGHT = datetime(2024, 3, 1, tzinfo=timezone.utc)
CUTOFF = datetime(2024, 3, 1, 12, tzinfo=timezone.utc)
# The run whose data interval is [2024-02-29 12:00, 2024-03-01 12:00) writes the 2024-03-01 signal.
LOGICAL_DATE = CUTOFF


def _load_dag():
    from airflow.dag_processing.dagbag import DagBag

    bag = DagBag(dag_folder=str(DAG_FILE))
    assert bag.import_errors == {}, bag.import_errors
    return bag.dags["daily_signal"]  # get_dag() would consult the metadata DB


def test_dag_file_imports_without_errors_or_heavy_modules():
    from airflow.dag_processing.dagbag import DagBag

    bag = DagBag(dag_folder=str(DAG_FILE))
    assert bag.import_errors == {}
    assert list(bag.dag_ids) == ["daily_signal"]

    # Parse time stays light: no pandas/pyarrow/requests/matplotlib beyond what Airflow loads itself.
    probe = (
        "import sys, runpy\n"
        "import airflow.sdk, include.market_data.config, include.market_data.assets\n"
        "before = set(sys.modules)\n"
        f"runpy.run_path({str(DAG_FILE)!r})\n"
        "heavy = ('pandas', 'pyarrow', 'requests', 'matplotlib', 'numpy')\n"
        "print(sorted(m for m in set(sys.modules) - before if m.split('.')[0] in heavy))\n"
    )
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120,
                            cwd=ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().splitlines()[-1] == "[]"


def test_schedule_tags_and_shape():
    from airflow.sdk import CronDataIntervalTimetable
    from airflow.serialization.encoders import coerce_to_core_timetable

    from include.market_data.signal_rule import HISTORY_NEEDED, SIGNAL_INTERVALS

    dag = _load_dag()
    timetable = dag.timetable
    assert isinstance(timetable, CronDataIntervalTimetable)
    assert timetable.expression == "0 12 * * *"
    assert str(timetable.timezone) == "UTC"
    # A run triggered at 12:07 covers the day ending at 12:00 UTC.
    interval = coerce_to_core_timetable(timetable).infer_manual_data_interval(run_after=datetime(2024, 3, 1, 12, 7, tzinfo=timezone.utc))
    assert interval.end == CUTOFF and interval.start == CUTOFF - timedelta(days=1)

    assert set(dag.tags) == {"binance", "market-data", "signal"}
    assert dag.catchup is False
    assert dag.start_date.date() - date(2017, 8, 17) >= timedelta(days=HISTORY_NEEDED["1d"])
    assert dag.default_args["owner"] == "market-data" and dag.default_args["retries"] >= 1

    sensor, generate = dag.get_task("wait_for_fresh_data"), dag.get_task("generate_signal")
    assert generate.upstream_task_ids == {"wait_for_fresh_data"}
    assert sensor.mode == "reschedule" and sensor.soft_fail is False
    assert sensor.timeout > dag.params["max_wait_minutes"] * 60
    # The DAG file cannot import signal_rule (pandas) at parse time: its copy must agree.
    assert tuple(runpy.run_path(str(DAG_FILE))["SIGNAL_INTERVALS"]) == SIGNAL_INTERVALS


def test_schedule_follows_recommendation_update_time(monkeypatch):
    monkeypatch.setenv("RECOMMENDATION_UPDATE_TIME", "06:30")
    dag = _load_dag()
    assert dag.timetable.expression == "30 6 * * *"


# --- dag.test() against sandbox data -----------------------------------------------------------


@pytest.fixture
def curated_market(data_env):
    """Curated 1d/4h/1h BTCUSDT candles, closed at the 2024-03-01 12:00 UTC cutoff, from the sandbox."""
    from include.market_data.config import load_settings
    from include.market_data.curation import DataCuration
    from include.market_data.ingestion import DataIngestion

    settings = load_settings()
    ingestion, curation = DataIngestion(settings), DataCuration(settings)
    for interval, start in (("1d", MIDNIGHT - timedelta(days=60)), ("4h", MIDNIGHT - timedelta(days=7)),
                            ("1h", MIDNIGHT - timedelta(days=7))):
        end = MIDNIGHT if interval == "1d" else CUTOFF
        assert ingestion.ingest(interval, start, end, SYMBOL).candles_fetched > 0
        curation.curate_timeframe(interval, SYMBOL)
    return data_env


def _run_dag(**kwargs):
    """``dag.test()`` without Airflow retries: a failing task fails the run at once."""
    dag = _load_dag()
    for task in dag.tasks:
        task.retries = 0
    return dag.test(logical_date=LOGICAL_DATE, **kwargs)


def _task_states(run) -> dict[str, str]:
    return {ti.task_id: str(ti.state) for ti in run.get_task_instances()}


def test_dag_test_writes_the_signal(airflow_db, curated_market):
    from airflow.utils.state import DagRunState

    run = _run_dag()
    assert run.state == DagRunState.SUCCESS, _task_states(run)
    signal = json.loads((curated_market / "signals" / "signal_20240301.json").read_text())
    assert signal["status"] == "ok"
    assert signal["date"] == "2024-03-01" and signal["symbol"] == SYMBOL
    assert signal["direction"] in ("long", "short", "flat")
    assert signal["as_of"] == "2024-03-01T11:59:59.999Z"
    assert (curated_market / "signals" / "signal_20240301.png").stat().st_size > 10_000
    assert (curated_market / "signals" / "signals.parquet").exists()


def test_dag_test_writes_a_stale_signal_once_the_wait_is_over(airflow_db, curated_market):
    from airflow.utils.state import DagRunState

    (curated_market / "curated" / "1h_curated_20240301.parquet").unlink()
    run = _run_dag(run_conf={"max_wait_minutes": 0})
    assert run.state == DagRunState.SUCCESS, _task_states(run)
    sensor = next(ti for ti in run.get_task_instances() if ti.task_id == "wait_for_fresh_data")
    waited = sensor.xcom_pull(task_ids="wait_for_fresh_data")
    assert waited["timed_out"] is True and waited["fresh"] is False
    signal = json.loads((curated_market / "signals" / "signal_20240301.json").read_text())
    assert signal["status"] == "stale_data" and signal["direction"] is None
    assert signal["lag_seconds"]["1h"] == 12 * 3600
    assert "1h" in signal["reason"]


def test_on_an_object_store_one_signal_write_at_a_time(monkeypatch):
    """signals.parquet is read-modify-written under a file lock, which object stores lack: with
    SIGNAL_DATA_DIR on one, one run at a time and one generate_signal at a time (backfills too)."""
    local = _load_dag()
    assert local.max_active_runs == 4
    assert local.get_task("generate_signal").max_active_tis_per_dag is None
    monkeypatch.setenv("SIGNAL_DATA_DIR", "s3://market-data/signals")
    remote = _load_dag()
    assert remote.max_active_runs == 1
    assert remote.get_task("generate_signal").max_active_tis_per_dag == 1
    assert remote.get_task("wait_for_fresh_data").max_active_tis_per_dag is None  # it only reads
