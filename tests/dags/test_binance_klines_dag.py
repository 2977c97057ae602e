"""binance_klines_<interval>: DAG integrity (ids, schedules, pools, params, tags) and dag.test() runs."""

from __future__ import annotations

import os
import subprocess
import sys
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from include.market_data.config import load_settings
from include.market_data.schema import table_to_rows
from include.market_data.storage import CuratedStore, RawStore
from include.market_data.timeframes import PIPELINE_INTERVALS, floor_to_grid, interval_ms, to_ms

ROOT = Path(__file__).resolve().parents[2]
DAG_FILE = ROOT / "dags" / "binance_klines.py"
EXPECTED_CRON = {"15m": "*/15 * * * *", "30m": "*/15 * * * *", "1h": "0 * * * *",
                 "4h": "0 */4 * * *", "1d": "0 0 * * *", "1w": "0 0 * * 1"}
BINANCE_TASKS = {"fetch", "gap_check", "write_raw"}  # write_raw refetches when cleared after its staging is gone
PER_SYMBOL_TASKS = {"fetch", "gap_check", "write_raw"}


def _bag(path=DAG_FILE):
    from airflow.dag_processing.dagbag import DagBag

    bag = DagBag(dag_folder=str(path))
    assert bag.import_errors == {}, bag.import_errors
    return bag


def test_every_dag_file_imports_without_errors():
    from airflow.dag_processing.dagbag import DagBag

    bag = DagBag(dag_folder=str(ROOT / "dags"))
    assert bag.import_errors == {}
    assert {f"binance_klines_{i}" for i in PIPELINE_INTERVALS} <= set(bag.dag_ids)


def test_one_dag_per_interval_with_schedule_pool_params_and_tags():
    from airflow.sdk import CronDataIntervalTimetable

    bag = _bag()
    assert sorted(bag.dag_ids) == sorted(f"binance_klines_{i}" for i in PIPELINE_INTERVALS)
    for interval in PIPELINE_INTERVALS:
        dag = bag.dags[f"binance_klines_{interval}"]
        # A real data interval: a bare cron string would give an empty one in Airflow 3.
        assert isinstance(dag.timetable, CronDataIntervalTimetable)
        assert dag.timetable.expression == EXPECTED_CRON[interval]
        assert str(dag.timetable.timezone) == "UTC"
        assert dag.catchup is False and dag.max_active_runs >= 1
        assert {"binance", interval} <= set(dag.tags)
        assert dag.start_date == datetime(2017, 8, 17, tzinfo=timezone.utc)
        assert [t.task_id for t in dag.topological_sort()] == ["plan", "fetch", "gap_check", "write_raw", "curate",
                                                                "report"]
        # the work is per symbol: a bad symbol fails only its own task instances
        assert {t.task_id for t in dag.tasks if t.get_closest_mapped_task_group() is not None} == PER_SYMBOL_TASKS
        for task in dag.tasks:
            assert task.owner == "market-data" and task.retries >= 1
            assert (task.pool == "binance_api") == (task.task_id in BINANCE_TASKS), task.task_id
        # waiting for a candle to close happens inside fetch: Airflow's retries are for real failures
        assert dag.get_task("fetch").retries == 3 and dag.get_task("fetch").retry_delay == timedelta(minutes=1)
        curate = dag.get_task("curate")
        (asset,) = curate.outlets
        assert asset.uri.endswith(f"/curated/{interval}") and asset.name == f"curated_{interval}"
        assert set(dag.params.keys()) == {"start", "end", "symbols"}


@pytest.mark.parametrize("params, ok", [
    ({}, True),
    ({"start": "2024-03-01", "end": "2024-03-02T12:00Z"}, True),
    ({"symbols": ["BTCUSDT"]}, True),
    ({"symbols": ["ETHUSDT"]}, False),  # not in BINANCE_SYMBOLS: curation would not know it
    ({"symbols": ["btcusdt"]}, False),
    ({"symbols": ["../../etc"]}, False),
    ({"symbols": []}, False),
    ({"start": "yesterday"}, False),
    ({"end": "2024-13-01x"}, False),
])
def test_trigger_form_params_are_validated_by_json_schema(params, ok):
    from airflow.sdk.definitions.param import ParamsDict
    from airflow.sdk.exceptions import ParamValidationError

    dag = _bag().dags["binance_klines_1h"]
    merged = ParamsDict({**dag.params, **params} if not params else dag.params)
    for key, value in params.items():
        if ok:
            merged[key] = value
        else:
            with pytest.raises(ParamValidationError):
                merged[key] = value
    if ok:
        merged.validate()


def test_slow_intervals_can_run_with_the_15_minute_job(monkeypatch):
    monkeypatch.setenv("SLOW_INTERVALS_SCHEDULE", "15m")
    bag = _bag()
    for interval in ("4h", "1d", "1w"):
        assert bag.dags[f"binance_klines_{interval}"].timetable.expression == "*/15 * * * *"


def test_a_bad_config_fails_the_parse_naming_the_variable(monkeypatch):
    from airflow.dag_processing.dagbag import DagBag

    monkeypatch.setenv("BINANCE_INTERVALS", "1h,2m")
    bag = DagBag(dag_folder=str(DAG_FILE))
    (error,) = bag.import_errors.values()
    assert "BINANCE_INTERVALS" in error and "'2m'" in error


def test_parsing_imports_nothing_heavy():
    probe = (
        "import sys, runpy\n"
        "import airflow.sdk, include.market_data.config, include.market_data.assets\n"
        "before = set(sys.modules)\n"
        f"runpy.run_path({str(DAG_FILE)!r})\n"
        "heavy = ('pandas', 'pyarrow', 'requests', 'numpy', 'pandera')\n"
        "print(sorted(m for m in set(sys.modules) - before if m.split('.')[0] in heavy))\n"
    )
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().splitlines()[-1] == "[]"


# --- dag.test() against the sandbox -------------------------------------------------------------


def _run(interval: str, **kwargs):
    from airflow.utils.state import DagRunState

    dag = _bag().dags[f"binance_klines_{interval}"]
    for task in dag.tasks:  # a failing task fails the run at once instead of waiting for retries
        task.retries = 0
    run = dag.test(**kwargs)
    states = {ti.task_id: str(ti.state) for ti in run.get_task_instances()}
    assert run.state == DagRunState.SUCCESS, states
    return run


def _stored(interval, start_ms, end_ms, symbol="BTCUSDT"):
    table = RawStore(load_settings().raw_data_dir).read(interval, symbol, start_ms, end_ms)
    return table_to_rows(table, 8)


# Scheduled runs: logical dates whose data interval holds candles of each timeframe (the 15m
# job for 30m starts off its grid, so its window is the 30m candle that closed inside it).
SCHEDULED = {
    "15m": "2024-03-01T00:15:00Z",
    "30m": "2024-03-01T00:30:00Z",
    "1h": "2024-03-01T00:00:00Z",
    "4h": "2024-02-29T20:00:00Z",
    "1d": "2024-02-29T00:00:00Z",
    "1w": "2024-02-26T00:00:00Z",
}


@pytest.mark.parametrize("interval", PIPELINE_INTERVALS)
def test_a_scheduled_run_ingests_exactly_its_data_interval(airflow_db, data_env, sandbox, interval):
    run = _run(interval, logical_date=datetime.fromisoformat(SCHEDULED[interval]))
    start = floor_to_grid(to_ms(run.data_interval_start), interval)
    end = floor_to_grid(to_ms(run.data_interval_end), interval)
    assert end > start, (run.data_interval_start, run.data_interval_end)
    # gap_check also fills holes of the last GAP_CHECK_LOOKBACK_DAYS (here: all of it, the store was empty)
    checked_start = floor_to_grid(min(start, end - load_settings().gap_check_lookback_days * 86_400_000), interval)
    truth = sandbox.truth("BTCUSDT", interval, checked_start, end)
    assert truth[-1][0] == end - interval_ms(interval)  # the run's own candle is the newest
    assert _stored(interval, to_ms("2017-08-17"), to_ms("2100-01-01")) == truth
    # the curate task wrote the curated day(s) of every candle written
    curated = CuratedStore(load_settings().curated_data_dir).read(interval, checked_start, end, symbol="BTCUSDT")
    assert curated is not None and curated.num_rows == len(truth)


@pytest.mark.parametrize("interval, start, end", [
    ("15m", "2024-02-29T22:00:00Z", "2024-03-01T02:00:00Z"),  # across a UTC midnight
    ("1w", "2024-01-01", "2024-03-04"),  # across week boundaries (Mondays)
])
def test_a_manual_run_ingests_the_params_window_exactly(airflow_db, data_env, sandbox, interval, start, end):
    _run(interval, run_conf={"start": start, "end": end, "symbols": ["BTCUSDT"]})
    truth = sandbox.truth("BTCUSDT", interval, to_ms(start), to_ms(end))
    assert truth and _stored(interval, to_ms("2017-08-17"), to_ms("2100-01-01")) == truth
    days = RawStore(load_settings().raw_data_dir).days(interval, "BTCUSDT")
    assert days == sorted({row[0] // 86_400_000 * 86_400_000 for row in truth})  # one file per UTC day, no stray
    assert not list((data_env / "raw" / "_staging").rglob("*.parquet"))  # staging cleaned up


def test_a_manual_run_over_an_outage_records_the_gap_and_fills_the_rest(airflow_db, data_env, sandbox):
    from include.market_data.gaps import GapRegistry

    outage = (to_ms("2024-03-01T06:00Z"), to_ms("2024-03-01T08:00Z"))
    sandbox.set_faults({"outages": [{"start": outage[0], "end": outage[1]}]})
    _run("1h", run_conf={"start": "2024-02-29", "end": "2024-03-02"})
    truth = sandbox.truth("BTCUSDT", "1h", to_ms("2024-02-29"), to_ms("2024-03-02"))
    assert len(truth) == 48 - 2 and _stored("1h", to_ms("2024-02-29"), to_ms("2024-03-02")) == truth
    gaps = GapRegistry(load_settings().raw_data_dir, "BTCUSDT", "1h").load()
    assert [(g.start_ms, g.end_ms, g.missing_slots) for g in gaps] == [(*outage, 2)]
    # the curated row after the hole says so
    curated = CuratedStore(load_settings().curated_data_dir).read("1h", outage[1], outage[1] + interval_ms("1h"))
    assert curated.column("gap_before").to_pylist() == [2]


@pytest.mark.parametrize("conf, message, failing_task", [
    ({"start": "2024-03-02", "end": "2024-03-01"}, "start=2024-03-02T00:00:00+00:00 must be before end", "plan"),
    ({"start": "2016-01-01", "end": "2016-02-01"}, "start=2016-01-01T00:00:00+00:00 is before INGEST_START", "plan"),
    # configured, but Binance does not know it: -1121 is the caller's error, never retried
    ({"start": "2024-03-01", "end": "2024-03-02", "symbols": ["NOSUCHCOIN"]},
     "Binance /api/v3/exchangeInfo answered 400: code -1121: Invalid symbol.", "fetch"),
])
def test_a_manual_run_with_bad_input_fails_at_once_without_writing(airflow_db, data_env, sandbox, conf, message,
                                                                     failing_task, monkeypatch, capsys):
    from airflow.utils.state import DagRunState, TaskInstanceState

    monkeypatch.setenv("BINANCE_SYMBOLS", "BTCUSDT,NOSUCHCOIN")
    dag = _bag().dags["binance_klines_1h"]  # retries as configured: a user error must not be retried
    run = dag.test(run_conf=conf)
    assert run.state == DagRunState.FAILED
    (failed,) = [ti for ti in run.get_task_instances() if ti.task_id == failing_task]
    assert failed.state == TaskInstanceState.FAILED and failed.try_number == 1
    assert f"AirflowFailException: {message}" in capsys.readouterr().out  # one line naming the input
    assert not list((data_env / "raw").rglob("*.parquet"))
    assert sandbox.stats()["by_endpoint"].get("/api/v3/klines", 0) == 0


def test_a_bad_symbol_fails_only_its_own_task_instances(airflow_db, data_env, sandbox, monkeypatch, capsys):
    """BINANCE_SYMBOLS=BTCUSDT,ETHUSDT,NOSUCHCOIN: the -1121 of the third fails its own fetch (once,
    no retry); the other two are written and curated, and the run fails naming NOSUCHCOIN."""
    from airflow.utils.state import DagRunState, TaskInstanceState

    monkeypatch.setenv("BINANCE_SYMBOLS", "BTCUSDT,ETHUSDT,NOSUCHCOIN")
    dag = _bag().dags["binance_klines_1h"]
    for task in dag.tasks:  # the -1121 is not retried whatever the retries; others would wait in dag.test()
        task.retries = 0
    run = dag.test(run_conf={"start": "2024-03-01", "end": "2024-03-02"})
    assert run.state == DagRunState.FAILED
    tis = run.get_task_instances()
    states = {(ti.task_id, ti.map_index): (ti.state, ti.try_number) for ti in tis}
    index = {"BTCUSDT": 0, "ETHUSDT": 1, "NOSUCHCOIN": 2}  # the map index of each symbol
    assert {ti.rendered_map_index for ti in tis if ti.task_id == "write_raw" and ti.map_index != 2} == {
        "BTCUSDT", "ETHUSDT"}  # the UI names each instance by its symbol
    assert states[("fetch", index["NOSUCHCOIN"])] == (TaskInstanceState.FAILED, 1)
    assert states[("write_raw", index["NOSUCHCOIN"])][0] == TaskInstanceState.UPSTREAM_FAILED
    for symbol in ("BTCUSDT", "ETHUSDT"):
        assert states[("write_raw", index[symbol])][0] == TaskInstanceState.SUCCESS
        truth = sandbox.truth(symbol, "1h", to_ms("2024-03-01"), to_ms("2024-03-02"))
        assert len(truth) == 24 and _stored("1h", to_ms("2024-03-01"), to_ms("2024-03-02"), symbol) == truth
    assert states[("curate", -1)][0] == TaskInstanceState.SUCCESS
    assert states[("report", -1)][0] == TaskInstanceState.FAILED
    curated = CuratedStore(load_settings().curated_data_dir).read("1h", to_ms("2024-03-01"), to_ms("2024-03-02"))
    assert sorted(set(curated.column("symbol").to_pylist())) == ["BTCUSDT", "ETHUSDT"]
    assert "not ingested this run: NOSUCHCOIN" in capsys.readouterr().out


def test_now_is_never_past_the_last_closed_candle(airflow_db, data_env, sandbox):
    """A manual run up to now writes only closed candles."""
    now = datetime.now(timezone.utc)
    _run("15m", run_conf={"start": (now - timedelta(hours=2)).isoformat(), "end": now.isoformat()})
    rows = _stored("15m", to_ms("2017-08-17"), to_ms("2100-01-01"))
    assert rows and rows[-1][6] < to_ms(now)


def test_backfill_create_plans_one_run_per_candle_of_the_range(airflow_db, data_env):
    """``airflow backfill create`` (dry run) on the serialized DAG: one run per data interval.

    ``data_env``: reserializing registers the DAGs' Assets, named after the data dirs' URIs.
    """
    import re

    env = {**os.environ, "AIRFLOW__CORE__DAGS_FOLDER": str(ROOT / "dags")}
    for command in (["dags", "reserialize"],
                    ["backfill", "create", "--dag-id", "binance_klines_1h", "--from-date", "2024-01-01",
                     "--to-date", "2024-01-01T05:00", "--dry-run"]):
        result = subprocess.run([sys.executable, "-m", "airflow", *command], env=env, capture_output=True,
                                text=True, timeout=300, cwd=ROOT)
        assert result.returncode == 0, result.stderr[-3000:]
    planned = re.findall(r"\| (2024-01-01 \d\d:00:00\+00:00) \|", result.stdout)
    # logical date = data interval start: runs [00:00, 01:00) ... [05:00, 06:00)
    assert planned == [f"2024-01-01 {h:02d}:00:00+00:00" for h in range(6)]
    # the to-date's own interval is included: a day to the next midnight is 25 runs (the README says so)
    day = subprocess.run([sys.executable, "-m", "airflow", "backfill", "create", "--dag-id", "binance_klines_1h",
                          "--from-date", "2024-01-01", "--to-date", "2024-01-02", "--dry-run"], env=env,
                         capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert day.returncode == 0, day.stderr[-3000:]
    assert len(re.findall(r"\| (2024-01-0[12] \d\d:00:00\+00:00) \|", day.stdout)) == 25


WRITERS = ("gap_check", "write_raw", "curate")


def test_on_an_object_store_one_task_at_a_time_writes_each_partition(monkeypatch):
    local = _bag().dags.values()
    assert {dag.max_active_runs for dag in local} == {4}
    assert {dag.get_task(t).max_active_tis_per_dag for dag in local for t in WRITERS} == {None}
    monkeypatch.setenv("RAW_DATA_DIR", "s3://market-data/raw")
    remote = _bag().dags.values()
    assert {dag.max_active_runs for dag in remote} == {1}
    # backfill runs are not bound by max_active_runs: the writing tasks themselves are limited
    assert {dag.get_task(t).max_active_tis_per_dag for dag in remote for t in WRITERS} == {1}


# --- alerting: the failure callback (include/market_data/alerting.py) -------------------------------


def _callbacks(value) -> list:
    return list(value) if isinstance(value, (list, tuple)) else [value] if value else []


def test_every_task_of_every_dag_reports_its_final_failure():
    """Every DAG in dags/ (a new one too) has the failure callback in its default_args, so on every task."""
    from include.market_data.alerting import on_task_failure

    bag = _bag(ROOT / "dags")
    assert {f"binance_klines_{i}" for i in PIPELINE_INTERVALS} | {"binance_history", "daily_signal"} <= set(bag.dag_ids)
    for dag in bag.dags.values():
        assert dag.default_args["on_failure_callback"] is on_task_failure, dag.dag_id
        for task in dag.tasks:  # mapped ones too
            assert _callbacks(task.on_failure_callback) == [on_task_failure], (dag.dag_id, task.task_id)
            assert _callbacks(task.on_retry_callback) == [], (dag.dag_id, task.task_id)  # final failures only


def test_a_failed_task_in_dag_test_logs_one_line_and_counts_task_failed(airflow_db, data_env, sandbox, capsys):
    """A real failure (plan refuses start >= end, AirflowFailException: no retry) runs the callback in
    the task runner: its log line, and one ``task.failed{dag_id, task_id}`` per failed task instance."""
    from airflow.utils.state import DagRunState, TaskInstanceState

    from tests.market_data.test_alerting import statsd_capture

    dag = _bag().dags["binance_klines_1h"]
    with statsd_capture() as statsd:
        run = dag.test(run_conf={"start": "2024-03-02", "end": "2024-03-01"})
        counted = statsd.lines_of("task.failed")
    assert run.state == DagRunState.FAILED
    failed = [ti for ti in run.get_task_instances() if ti.state == TaskInstanceState.FAILED]
    assert "plan" in {ti.task_id for ti in failed}
    assert sorted(counted) == sorted(f"airflow.task.failed,dag_id=binance_klines_1h,task_id={ti.task_id}:1|c"
                                     for ti in failed)
    lines = [line for line in capsys.readouterr().out.splitlines() if "task failed" in line]
    assert len(lines) == len(failed)
    (plan_line,) = [line for line in lines if "task_id=plan" in line]
    for field in ("dag_id=binance_klines_1h", f"run_id={run.run_id}", "map_index=-1", "try_number=1",
                  "error='AirflowFailException: start=2024-03-02T00:00:00+00:00 must be before end"):
        assert field in plan_line, (field, plan_line)
