"""binance_history: DAG integrity and a dag.test() run over two months of two intervals against the sandbox."""

from __future__ import annotations

from pathlib import Path

import pytest

from include.market_data.config import load_settings
from include.market_data.schema import table_to_rows
from include.market_data.storage import CuratedStore, RawStore
from include.market_data.timeframes import to_ms

ROOT = Path(__file__).resolve().parents[2]
DAG_FILE = ROOT / "dags" / "binance_history.py"


def _dag():
    from airflow.dag_processing.dagbag import DagBag

    bag = DagBag(dag_folder=str(DAG_FILE))
    assert bag.import_errors == {}, bag.import_errors
    return bag.dags["binance_history"]


def test_manual_only_with_params_pool_and_tags():
    dag = _dag()
    assert type(dag.timetable).__name__ == "NullTimetable"  # manual only
    assert dag.catchup is False and dag.max_active_runs == 1
    assert {"binance", "history"} <= set(dag.tags)
    assert set(dag.params.keys()) == {"start", "end", "intervals", "symbols", "source"}
    assert dag.params.get_param("source").value == "auto"
    assert [t.task_id for t in dag.topological_sort()] == ["plan", "ingest_chunk", "intervals", "curate",
                                                                "quality", "report"]
    for task in dag.tasks:
        assert task.owner == "market-data" and task.retries >= 1
        assert (task.pool == "binance_api") == (task.task_id == "ingest_chunk"), task.task_id
    assert dag.get_task("ingest_chunk").is_mapped and dag.get_task("curate").is_mapped


def test_every_task_reports_its_final_failure():
    from include.market_data.alerting import on_task_failure

    dag = _dag()
    assert dag.default_args["on_failure_callback"] is on_task_failure
    for task in dag.tasks:  # mapped ones keep the callable as given
        callbacks = task.on_failure_callback
        assert (callbacks if isinstance(callbacks, list) else [callbacks]) == [on_task_failure], task.task_id
        assert not task.on_retry_callback, task.task_id


@pytest.mark.parametrize("params, ok", [
    ({"start": "2024-01-01", "end": "2024-03-01", "intervals": ["15m", "1h"], "source": "archive"}, True),
    ({"start": "2024-01-01", "source": "ftp"}, False),
    ({"start": "2024-01-01", "intervals": ["2h"]}, False),
    ({"start": "yesterday"}, False),
    ({"start": "2024-01-01", "symbols": ["btcusdt"]}, False),
])
def test_trigger_form_params_are_validated(params, ok):
    import copy

    dag = _dag()
    merged = copy.deepcopy(dag.params)
    try:
        for key, value in params.items():
            merged[key] = value
        merged.validate()
        valid = True
    except Exception:  # noqa: BLE001 - ParamValidationError or ValueError
        valid = False
    assert valid is ok


def test_two_months_of_two_intervals_equal_the_sandbox_truth(airflow_db, dag_data_env, sandbox):
    from airflow.utils.state import DagRunState

    dag = _dag()
    for task in dag.tasks:
        task.retries = 0
    # February's 30m monthly file is refused (wrong checksum): its days come from REST
    sandbox.set_faults({"archive_wrong_checksum": ["BTCUSDT-30m-2024-02.zip"]})
    run = dag.test(run_conf={"start": "2024-01-01", "end": "2024-03-01", "intervals": ["15m", "30m"]})
    states = {(ti.task_id, ti.map_index): str(ti.state) for ti in run.get_task_instances()}
    assert run.state == DagRunState.SUCCESS, states
    assert sum(1 for task_id, _ in states if task_id == "ingest_chunk") == 4  # 2 intervals x 2 months
    settings = load_settings()
    raw, curated = RawStore(settings.raw_data_dir), CuratedStore(settings.curated_data_dir)
    start, end = to_ms("2024-01-01"), to_ms("2024-03-01")
    for interval in ("15m", "30m"):
        truth = sandbox.truth("BTCUSDT", interval, start, end)
        assert table_to_rows(raw.read(interval, "BTCUSDT", start, to_ms("2030-01-01")), 8) == truth
        assert curated.read(interval, start, end, symbol="BTCUSDT").num_rows == len(truth)
    assert raw.metadata("30m", "BTCUSDT", to_ms("2024-02-10"))["source"] == sandbox.url
    assert raw.metadata("15m", "BTCUSDT", to_ms("2024-02-10"))["source"].endswith("BTCUSDT-15m-2024-02.zip")
    from include.market_data.quality import QualityReport

    report = QualityReport(settings.raw_data_dir)
    # the refused file is on the report; the cross-timeframe check of 30m (from 15m) found nothing
    assert [r["kind"] for r in report.read("30m").to_pylist()] == ["archive_file_rejected"]
