"""The one metrics helper of the project: Airflow's stats backend, so ``[metrics] statsd_*`` routes
every metric (the domain's ``observability`` emits through it too). A metrics outage never breaks
the caller."""

from __future__ import annotations

from typing import Any


def emit(kind: str, name: str, *args: Any) -> None:
    """``stats.<kind>(name, *args)``: ``incr``, ``gauge`` or ``timing``."""
    try:
        from airflow.sdk.observability import stats

        getattr(stats, kind)(name, *args)
    except Exception:  # noqa: BLE001 - plain Python without Airflow, or a metrics outage
        return
