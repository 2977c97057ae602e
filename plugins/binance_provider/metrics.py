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


def emit(kind: str, name: str, *args: Any) -> None:
    """``stats.<kind>(name, *args)``: ``incr``, ``gauge`` or ``timing``."""
    if "airflow" not in sys.modules and not _statsd_on():
        return
    try:
        from airflow.sdk.observability import stats

        getattr(stats, kind)(name, *args)
    except Exception:  # noqa: BLE001 - plain Python without Airflow, or a metrics outage
        return
