"""Alerting: the failure callback of every DAG and the missed-signal deadline of ``daily_signal``.

* :func:`on_task_failure` is every DAG's ``on_failure_callback`` (through ``default_args``): one
  ERROR log line naming the DAG, task, run, map index, try and error, and the counter
  ``task.failed`` tagged ``dag_id`` and ``task_id``.
* :func:`on_signal_deadline_missed` is the callback of ``daily_signal``'s ``DeadlineAlert``: one
  ERROR log line naming the DAG, run and deadline, and the counter ``signal.deadline_missed``.

Neither ever raises: a broken callback must not hide, or replace, the failure it reports. Both are
light (no pandas/pyarrow): DAG files import this module at parse time, and the deadline callback
runs in the triggerer.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from datetime import datetime, timedelta
from typing import Any

from include.market_data import observability

log = observability.get_logger(__name__)

TASK_FAILED_METRIC = "task.failed"
SIGNAL_DEADLINE_MISSED_METRIC = "signal.deadline_missed"
# How long after RECOMMENDATION_UPDATE_TIME the day's signal must be out (issue 14).
SIGNAL_DEADLINE_AFTER = timedelta(minutes=30)
MAX_ERROR_CHARS = 2000
UNKNOWN = "unknown"


def _get(source: Any, key: str) -> Any:
    """``source[key]`` of a mapping or ``source.key`` of an object; None when it is not there or
    reading it fails (a callback reads whatever context it is given)."""
    try:
        if isinstance(source, Mapping):
            return source.get(key)
        return getattr(source, key, None)
    except Exception:  # noqa: BLE001 - a broken context must not break the callback
        return None


def _text(value: Any, limit: int = 250) -> str:
    """A value as one short line of text."""
    try:
        text = " ".join(str(value).split())
    except Exception:  # noqa: BLE001 - even str() of a foreign object can raise
        text = f"<unprintable {type(value).__name__}>"
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _error_text(error: Any) -> str:
    if error is None:
        return UNKNOWN
    if isinstance(error, BaseException):
        message = _text(error, MAX_ERROR_CHARS)
        return f"{type(error).__name__}: {message}" if message else type(error).__name__
    return _text(error, MAX_ERROR_CHARS) or UNKNOWN


def _int_or_none(value: Any) -> int | None:
    try:
        return None if value is None else int(value)
    except Exception:  # noqa: BLE001
        return None


def _failure_fields(context: Any) -> dict[str, Any]:
    ti = _get(context, "task_instance") or _get(context, "ti")
    dag_id = _get(ti, "dag_id") or _get(_get(context, "dag"), "dag_id")
    task_id = _get(ti, "task_id") or _get(_get(context, "task"), "task_id")
    run_id = _get(ti, "run_id") or _get(context, "run_id") or _get(_get(context, "dag_run"), "run_id")
    # The task runner puts the exception in the context; a failure found by the scheduler (a worker
    # lost, a heartbeat timeout) reaches the callback through the DAG processor without one.
    error = _get(context, "exception") or _get(context, "reason")
    return {
        "dag_id": _text(dag_id) if dag_id else UNKNOWN,
        "task_id": _text(task_id) if task_id else UNKNOWN,
        "run_id": _text(run_id) if run_id else UNKNOWN,
        "map_index": _int_or_none(_get(ti, "map_index")),
        "try_number": _int_or_none(_get(ti, "try_number")),
        "error": _error_text(error),
    }


def on_task_failure(context: Any) -> None:
    """``on_failure_callback`` of every task: one log line and ``task.failed{dag_id, task_id}``.

    On the final failure only. Airflow calls ``on_failure_callback`` when a task instance ends
    FAILED — its last try failed, or it failed without retry (``AirflowFailException``, a user
    error) — and ``on_retry_callback`` for a failed try that will be retried. This is deliberately
    not an ``on_retry_callback``: a try that is retried is routine here (Binance 5xx, 429 storms,
    a candle not closed yet) and is already visible as ``binance.request.retry`` and in the task
    log; someone alerting on failed tasks wants the failures that need a person, counted once per
    task instance. ``try_number`` in the line says how many tries it took.
    """
    try:
        fields = _failure_fields(context)
    except Exception:  # noqa: BLE001 - never raise from a failure callback
        fields = {"dag_id": UNKNOWN, "task_id": UNKNOWN, "run_id": UNKNOWN, "map_index": None,
                  "try_number": None, "error": UNKNOWN}
    try:
        log.error("task failed", status="failed", **fields)
    except Exception:  # noqa: BLE001
        pass
    # emit() already swallows a metrics outage; the tags are the DAG and task only (bounded; a
    # run id would make one series per run, and its ':' breaks the StatsD line).
    observability.incr(TASK_FAILED_METRIC, tags={"dag_id": fields["dag_id"], "task_id": fields["task_id"]})


def _iso(value: Any) -> str | None:
    if value is None:
        return None
    if isinstance(value, datetime):
        return value.isoformat()
    return _text(value)


async def on_signal_deadline_missed(context: Any = None, **kwargs: Any) -> str:
    """Callback of ``daily_signal``'s ``DeadlineAlert`` (an ``AsyncCallback``: the triggerer runs it).

    The scheduler queues it once the deadline has passed and the run has not succeeded (it failed,
    or is still running or queued). It is called with the context Airflow builds for deadline
    callbacks — ``{"dag_run": <the run, as the REST API's DAGRun JSON>, "deadline": {"id": ...,
    "deadline_time": ...}}`` — and logs one line and counts ``signal.deadline_missed{dag_id}``.
    A backfill run is logged (at INFO) but not counted: it writes signals of past days nobody is
    waiting for, and a backfill queues all its runs at once, so most of them would pass a deadline
    counted from their queueing. The returned line is what Airflow stores as the callback's output.
    """
    try:
        dag_run = _get(context, "dag_run") or {}
        deadline = _get(context, "deadline") or {}
        dag_id = _get(dag_run, "dag_id") or UNKNOWN
        run_type = _get(dag_run, "run_type")
        run_type = _text(_get(run_type, "value") or run_type) if run_type else UNKNOWN
        fields = {
            "dag_id": _text(dag_id),
            "run_id": _text(_get(dag_run, "dag_run_id") or _get(dag_run, "run_id") or UNKNOWN),
            "deadline": _iso(_get(deadline, "deadline_time")),
            "run_type": run_type,
            "run_state": _text(_get(dag_run, "state") or UNKNOWN),
            "data_interval_end": _iso(_get(dag_run, "data_interval_end")),
        }
    except Exception:  # noqa: BLE001 - never raise from an alert callback
        fields = {"dag_id": UNKNOWN, "run_id": UNKNOWN, "deadline": None, "run_type": UNKNOWN,
                  "run_state": UNKNOWN, "data_interval_end": None}
    counted = fields["run_type"] != "backfill"
    event = "signal deadline missed" if counted else "signal deadline passed on a backfill run (not counted)"
    try:
        if counted:
            log.error(event, status="deadline_missed", **fields)
        else:
            log.info(event, status="deadline_passed", **fields)
    except Exception:  # noqa: BLE001
        pass
    if counted:
        observability.incr(SIGNAL_DEADLINE_MISSED_METRIC, tags={"dag_id": fields["dag_id"]})
    return f"{event}: dag_id={fields['dag_id']} run_id={fields['run_id']} deadline={fields['deadline']}"


def without_deadline_in_dag_test(dag: Any) -> Any:
    """Make ``dag.test()`` (and so ``airflow dags test``) run ``dag`` without its ``deadline``; returns ``dag``.

    Works around an Airflow 3.3.2 bug (reproduced here; tests/dags/test_daily_signal_dag.py keeps a
    guard that fails once it is fixed): ``dag.test()`` builds its scheduler DAG by an in-memory
    serialization round trip, which leaves the encoded alerts in ``deadline`` where ``DagRun.update_state`` expects ``deadline_alert`` ids, so once
    the run succeeds it raises ``'dict' object has no attribute 'hex'``. Nothing is lost: ``dag.test()``
    never makes a deadline (its run starts RUNNING, with no ``queued_at``, and no scheduler loop looks for
    missed deadlines). The DAG processor, the scheduler and the serialized DAG keep the deadline.
    """
    run_test = dag.test

    @functools.wraps(run_test)
    def test(*args: Any, **kwargs: Any) -> Any:
        deadline = dag.deadline
        dag.deadline = None
        try:
            return run_test(*args, **kwargs)
        finally:
            dag.deadline = deadline

    dag.test = test
    return dag


def binance_task_defaults() -> dict[str, Any]:
    """``default_args`` of the DAGs that call Binance (``binance_klines_*``, ``binance_history``): retries
    with exponential backoff for transient trouble, and :func:`on_task_failure` on a final failure."""
    return {
        "owner": "market-data",
        "retries": 3,
        "retry_delay": timedelta(minutes=1),
        "retry_exponential_backoff": True,
        "max_retry_delay": timedelta(minutes=15),
        # final failures only (not retried tries): see on_task_failure
        "on_failure_callback": on_task_failure,
    }
