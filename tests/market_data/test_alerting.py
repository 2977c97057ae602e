"""include/market_data/alerting.py: the failure callback of every DAG and daily_signal's deadline callback.

What reaches the wire is checked on a local UDP socket: a fresh interpreter configured as a worker is
(``AIRFLOW__METRICS__STATSD_*`` set before Airflow is imported, tags on through
``statsd_influxdb_enabled``), its log lines captured from structlog. ``statsd_capture`` does the
same inside this process for the DAG tests (tests/dags) that run the callbacks through Airflow.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import structlog

ROOT = Path(__file__).resolve().parents[2]


# -- StatsD on a local socket ------------------------------------------------------------------------


class StatsdListener:
    """A UDP socket on 127.0.0.1 collecting StatsD lines."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.lines: list[str] = []

    def env(self) -> dict[str, str]:
        return {"AIRFLOW__METRICS__STATSD_ON": "True", "AIRFLOW__METRICS__STATSD_HOST": "127.0.0.1",
                "AIRFLOW__METRICS__STATSD_PORT": str(self.port), "AIRFLOW__METRICS__STATSD_PREFIX": "airflow",
                "AIRFLOW__METRICS__STATSD_INFLUXDB_ENABLED": "True"}

    def received(self, timeout: float = 0.5) -> list[str]:
        """Every line received so far, waiting up to ``timeout`` for the next datagram."""
        self.sock.settimeout(timeout)
        try:
            while True:
                self.lines.extend(self.sock.recv(65535).decode().splitlines())
        except (socket.timeout, BlockingIOError):
            pass
        return self.lines

    def lines_of(self, name: str) -> list[str]:
        """The lines of metric ``airflow.<name>`` (tags included), e.g. ``airflow.task.failed,dag_id=d:1|c``."""
        return [line for line in self.received() if line.split(",")[0].split(":")[0] == f"airflow.{name}"]

    def close(self) -> None:
        self.sock.close()


@contextmanager
def statsd_capture() -> Iterator[StatsdListener]:
    """Inside this process, point Airflow's task-side stats backend at a local socket, as the task
    runner does in a worker (``stats.initialize`` from the ``[metrics]`` config), then put it back."""
    from airflow.sdk.configuration import conf
    from airflow.sdk.observability import stats
    from airflow.sdk.observability.metrics import stats_utils

    def initialize():  # as the task runner's main() does
        stats.initialize(factory=stats_utils.get_stats_factory(),
                         export_legacy_names=conf.getboolean("metrics", "legacy_names_on"))

    listener = StatsdListener()
    saved = {name: os.environ.get(name) for name in listener.env()}
    os.environ.update(listener.env())
    try:
        initialize()
        yield listener
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        initialize()
        listener.close()


def run_worker_like(code: str, listener: StatsdListener, tmp_path) -> subprocess.CompletedProcess:
    """``code`` in a fresh interpreter whose metrics go to ``listener``, configured before any import."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("AIRFLOW__METRICS__")}
    env.update(listener.env(), PYTHONPATH=str(ROOT), LOG_LEVEL="INFO")
    result = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=env, capture_output=True, text=True,
                            timeout=180, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


# Each scenario prints one JSON line: what structlog was given (capture_logs) and what the callback
# returned or raised. A broken context must not make the callback raise.
_SCENARIOS = """
    import asyncio, json, sys
    from types import SimpleNamespace
    from structlog.testing import capture_logs
    from include.market_data import alerting

    class Exploding:
        def __getattr__(self, name):
            raise RuntimeError("no " + name)

    class BadMapping(dict):
        def get(self, *args):
            raise KeyError("broken context")

    class Unprintable(Exception):
        def __str__(self):
            raise ValueError("cannot print me")

    ti = SimpleNamespace(dag_id="binance_klines_1h", task_id="fetch", run_id="manual__2024-03-01T00:00:00+00:00",
                         map_index=2, try_number=4)
    scenarios = {
        "final_failure": {"ti": ti, "task_instance": ti, "run_id": ti.run_id,
                          "exception": RuntimeError("Binance answered 503\\nafter 5 tries")},
        "none": None,
        "empty": {},
        "bad_mapping": BadMapping(),
        "exploding_ti": {"ti": Exploding(), "task_instance": Exploding(), "exception": Unprintable()},
        "scheduler_found": {"ti": SimpleNamespace(dag_id="daily_signal", task_id="generate_signal",
                                                  run_id="scheduled__2024-03-01T12:00:00+00:00", map_index=-1,
                                                  try_number=3)},
    }
    for name, context in scenarios.items():
        with capture_logs() as logs:
            try:
                returned, raised = alerting.on_task_failure(context), None
            except BaseException as exc:
                returned, raised = None, repr(exc)
        print(json.dumps({"scenario": name, "logs": logs, "returned": returned, "raised": raised}, default=str))

    deadline_context = {
        "dag_run": {"dag_run_id": "scheduled__2024-02-29T12:00:00+00:00", "dag_id": "daily_signal",
                    "run_type": "scheduled", "state": "running", "data_interval_end": "2024-03-01T12:00:00Z"},
        "deadline": {"id": "0192", "deadline_time": "2024-03-01T12:30:02+00:00"},
    }
    backfill_context = {"dag_run": {**deadline_context["dag_run"], "run_type": "backfill",
                                    "dag_run_id": "backfill__2024-02-10T12:00:00+00:00"},
                        "deadline": deadline_context["deadline"]}
    for name, context in {"deadline": deadline_context, "deadline_backfill": backfill_context,
                          "deadline_none": None, "deadline_bad": {"dag_run": Exploding(), "deadline": 7}}.items():
        with capture_logs() as logs:
            try:
                returned, raised = asyncio.run(alerting.on_signal_deadline_missed(context=context)), None
            except BaseException as exc:
                returned, raised = None, repr(exc)
        print(json.dumps({"scenario": name, "logs": logs, "returned": returned, "raised": raised}, default=str))
"""


@pytest.fixture(scope="module")
def worker_run(tmp_path_factory):
    """The scenarios above, run once in a worker-like interpreter: (results by scenario, StatsD lines)."""
    listener = StatsdListener()
    try:
        result = run_worker_like(_SCENARIOS, listener, tmp_path_factory.mktemp("alerting"))
        results = {}
        for line in result.stdout.splitlines():
            if line.startswith('{"scenario"'):
                record = json.loads(line)
                results[record.pop("scenario")] = record
        return results, listener.received(timeout=2.0)
    finally:
        listener.close()


FIELDS = ("dag_id", "task_id", "run_id", "map_index", "try_number", "error")


def test_a_final_failure_logs_one_line_naming_dag_task_run_and_error(worker_run):
    results, _ = worker_run
    record = results["final_failure"]
    assert record["raised"] is None
    (line,) = record["logs"]  # one line
    assert line["log_level"] == "error" and line["event"] == "task failed"
    assert {k: line[k] for k in FIELDS} == {
        "dag_id": "binance_klines_1h", "task_id": "fetch", "run_id": "manual__2024-03-01T00:00:00+00:00",
        "map_index": 2, "try_number": 4,
        "error": "RuntimeError: Binance answered 503 after 5 tries"}  # one line: the newline is gone


def test_task_failed_is_counted_with_dag_id_and_task_id_tags(worker_run):
    _, lines = worker_run
    failed = [line for line in lines if line.startswith("airflow.task.failed")]
    # one per call: the two real contexts, and "unknown" for the four broken ones
    assert sorted(failed) == sorted([
        "airflow.task.failed,dag_id=binance_klines_1h,task_id=fetch:1|c",
        "airflow.task.failed,dag_id=daily_signal,task_id=generate_signal:1|c",
    ] + ["airflow.task.failed,dag_id=unknown,task_id=unknown:1|c"] * 4)


@pytest.mark.parametrize("scenario", ["none", "empty", "bad_mapping", "exploding_ti"])
def test_a_broken_context_never_makes_the_callback_raise(worker_run, scenario):
    record = worker_run[0][scenario]
    assert record["raised"] is None and record["returned"] is None
    (line,) = record["logs"]
    assert line["event"] == "task failed"
    assert (line["dag_id"], line["task_id"], line["run_id"]) == ("unknown", "unknown", "unknown")
    expected_error = "Unprintable: <unprintable Unprintable>" if scenario == "exploding_ti" else "unknown"
    assert line["error"] == expected_error


def test_a_failure_found_by_the_scheduler_has_no_exception_in_its_context(worker_run):
    (line,) = worker_run[0]["scheduler_found"]["logs"]
    assert (line["dag_id"], line["task_id"], line["map_index"], line["try_number"], line["error"]) == (
        "daily_signal", "generate_signal", -1, 3, "unknown")


def test_a_missed_signal_deadline_logs_the_dag_run_and_deadline_and_counts_it(worker_run):
    results, lines = worker_run
    record = results["deadline"]
    assert record["raised"] is None
    (line,) = record["logs"]
    assert line["log_level"] == "error" and line["event"] == "signal deadline missed"
    assert {k: line[k] for k in ("dag_id", "run_id", "deadline", "run_type", "data_interval_end")} == {
        "dag_id": "daily_signal", "run_id": "scheduled__2024-02-29T12:00:00+00:00",
        "deadline": "2024-03-01T12:30:02+00:00", "run_type": "scheduled", "data_interval_end": "2024-03-01T12:00:00Z"}
    assert record["returned"] == ("signal deadline missed: dag_id=daily_signal "
                                  "run_id=scheduled__2024-02-29T12:00:00+00:00 deadline=2024-03-01T12:30:02+00:00")
    # counted once for the scheduled run, once for each broken context; the backfill run is not
    assert sorted(line for line in lines if line.startswith("airflow.signal.deadline_missed")) == sorted([
        "airflow.signal.deadline_missed,dag_id=daily_signal:1|c"] + [
        "airflow.signal.deadline_missed,dag_id=unknown:1|c"] * 2)


def test_a_backfill_run_past_its_deadline_is_logged_not_counted(worker_run):
    record = worker_run[0]["deadline_backfill"]
    (line,) = record["logs"]
    assert line["log_level"] == "info" and line["run_type"] == "backfill"
    assert line["run_id"] == "backfill__2024-02-10T12:00:00+00:00"


@pytest.mark.parametrize("scenario", ["deadline_none", "deadline_bad"])
def test_a_broken_deadline_context_never_makes_the_callback_raise(worker_run, scenario):
    record = worker_run[0][scenario]
    assert record["raised"] is None
    (line,) = record["logs"]
    assert line["event"] == "signal deadline missed" and line["dag_id"] == "unknown"


# -- in this process ---------------------------------------------------------------------------------


def test_a_broken_stats_backend_never_makes_the_callbacks_raise(monkeypatch):
    from airflow.sdk.observability import stats

    from include.market_data import alerting

    def broken(*_args, **_kwargs):
        raise RuntimeError("statsd is down")

    monkeypatch.setattr(stats, "incr", broken)
    with structlog.testing.capture_logs() as logs:
        alerting.on_task_failure({"exception": ValueError("boom")})
        asyncio.run(alerting.on_signal_deadline_missed(context={"dag_run": {"dag_id": "daily_signal"}}))
    assert [line["event"] for line in logs] == ["task failed", "signal deadline missed"]


def test_emit_passes_tags_to_airflows_stats_backend(monkeypatch):
    """The project's metrics helper hands ``tags`` on (the worker run above shows them on the wire)."""
    from airflow.sdk.observability import stats

    from binance_provider.metrics import emit
    from include.market_data import observability

    calls = []
    for kind in ("incr", "gauge", "timing"):
        monkeypatch.setattr(stats, kind, lambda name, *args, _kind=kind, **kwargs: calls.append((_kind, name, args,
                                                                                                 kwargs)))
    emit("incr", "task.failed", 1, tags={"dag_id": "d", "task_id": "t"})
    observability.gauge("ingest.1h.lag_seconds", 5.0, tags={"symbol": "BTCUSDT"})
    observability.timing("curate.1h.duration", 12.5)
    assert calls == [("incr", "task.failed", (1,), {"tags": {"dag_id": "d", "task_id": "t"}}),
                     ("gauge", "ingest.1h.lag_seconds", (5.0,), {"tags": {"symbol": "BTCUSDT"}}),
                     ("timing", "curate.1h.duration", (12.5,), {"tags": None})]
