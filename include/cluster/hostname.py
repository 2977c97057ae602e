"""``[core] hostname_callable`` for several Celery workers on one machine.

Airflow records ``ti.hostname`` from this callable; by default it is the machine's name, so two
workers on one host (``make cluster``) are indistinguishable in the UI and the metadata DB. A
worker started with ``AIRFLOW_WORKER_NAME=w1`` reports ``w1@<fqdn>`` (the Celery node-name
convention); without it, the machine's name as Airflow's default does (one worker per container).
"""

from __future__ import annotations

import os
import socket


def worker_hostname() -> str:
    name = os.environ.get("AIRFLOW_WORKER_NAME", "").strip()
    fqdn = socket.getfqdn()
    return f"{name}@{fqdn}" if name else fqdn
