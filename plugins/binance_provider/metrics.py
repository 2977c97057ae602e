"""The one metrics helper of the project: Airflow's stats backend, so ``[metrics] statsd_*`` routes every
metric (the domain's ``observability`` emits through it too). A metrics outage never breaks the caller.

In a plain Python process that has not loaded Airflow (the shell's seed API on the plain clients),
metrics are dropped without importing Airflow, unless ``AIRFLOW__METRICS__STATSD_ON`` is true in the
environment: then Airflow's stats backend is loaded and they are sent as in a task.
"""

from __future__ import annotations

import os
import sys
from typing import Any


def _statsd_on() -> bool:
    """``AIRFLOW__METRICS__STATSD_ON`` as Airflow's ``getboolean`` reads it (``t``, ``true``, ``1``)."""
    return os.environ.get("AIRFLOW__METRICS__STATSD_ON", "").strip().lower() in ("t", "true", "1")


def emit(kind: str, name: str, *args: Any, tags: dict[str, str] | None = None) -> None:
    """``stats.<kind>(name, *args, tags=tags)``: ``incr``, ``gauge`` or ``timing``.

    ``tags`` go to Airflow's backend as they are: plain StatsD drops them, ``[metrics]
    statsd_influxdb_enabled`` appends them to the name (``name,k=v``: statsd-exporter turns them into
    labels), Datadog and OpenTelemetry send them as tags. Keep their values bounded and free of ``,``,
    ``=``, ``:`` and ``|`` (Airflow drops a tag holding ``,`` or ``=``; ``:`` or ``|`` would break the
    StatsD line).
    """
    if "airflow" not in sys.modules and not _statsd_on():
        return
    try:
        from airflow.sdk.observability import stats

        getattr(stats, kind)(name, *args, tags=tags)
    except Exception:  # noqa: BLE001 - plain Python without Airflow, or a metrics outage
        return
