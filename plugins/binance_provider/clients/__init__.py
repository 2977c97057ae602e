"""Binance clients without Airflow, and the one rule that picks a plain client or an Airflow hook.

:class:`~binance_provider.clients.rest.BinanceClient` and
:class:`~binance_provider.clients.archive.BinanceArchiveClient` hold all the request, limiter,
retry, klines and archive code; ``BinanceHook`` and ``BinanceArchiveHook`` are the same classes on
an Airflow connection. A plain client reads its connection from the ``AIRFLOW_CONN_<ID>``
variable only, so it is used only where that cannot miss a connection Airflow would find
(:func:`use_plain_client`); everywhere else, and always inside a task, the hook is used.
"""

from __future__ import annotations

import configparser
import os
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from binance_provider.clients.archive import BinanceArchiveClient
from binance_provider.clients.rest import BinanceClient
from binance_provider.facts import ARCHIVE_CONN_ID, BINANCE_CONN_ID
from binance_provider.hooks.transport import UnsupportedConnection, connection_base_url

__all__ = ["BinanceArchiveClient", "BinanceClient", "archive_client", "rest_client", "use_plain_client"]


def _secrets_backend_configured(env: Mapping[str, str]) -> bool:
    """Whether Airflow has a secrets backend, which it asks before the ``AIRFLOW_CONN_`` variables:
    ``AIRFLOW__SECRETS__BACKEND`` (or its ``_CMD``/``_SECRET`` forms), or ``[secrets] backend`` in
    ``$AIRFLOW_CONFIG`` (default ``$AIRFLOW_HOME/airflow.cfg``, ``~/airflow/airflow.cfg``)."""
    if any((env.get(f"AIRFLOW__SECRETS__BACKEND{form}") or "").strip() for form in ("", "_CMD", "_SECRET")):
        return True
    config = env.get("AIRFLOW_CONFIG") or os.path.join(
        env.get("AIRFLOW_HOME") or os.path.join(os.path.expanduser("~"), "airflow"), "airflow.cfg")
    if not Path(config).is_file():
        return False
    parser = configparser.ConfigParser(interpolation=None, strict=False)
    try:
        parser.read(config, encoding="utf-8")
    except (configparser.Error, OSError, UnicodeDecodeError):
        return True  # unreadable here: let Airflow read it
    return any(parser.get("secrets", key, fallback="").strip() for key in ("backend", "backend_cmd", "backend_secret"))


def use_plain_client(conn_id: str, env: Mapping[str, str] | None = None) -> bool:
    """
    Whether the plain client may stand in for the hook of connection ``conn_id``; true only when
    all of these hold:

    - Airflow is not loaded in this process (``"airflow" not in sys.modules``): inside a task, a
      DAG file or any process that imported Airflow, the hook is used, exactly as before;
    - the connection's ``AIRFLOW_CONN_<ID>`` variable is set, and holds only an address (JSON or
      URI form; a login, password or extra goes to the hook, which applies them): then Airflow
      would take this variable before the metadata DB, so the DB is never silently ignored;
    - no secrets backend is configured (Airflow would ask it before the variable).

    So an unset variable means the hook (which finds the connection in the DB, or falls back to
    the default host as before).
    """
    env = os.environ if env is None else env
    if "airflow" in sys.modules or _secrets_backend_configured(env):
        return False
    try:  # only whether the variable is set and readable: the client applies its own default host
        return connection_base_url(conn_id, "", env) is not None
    except UnsupportedConnection:
        return False


def rest_client(conn_id: str = BINANCE_CONN_ID, settings: Any = None, **options: Any) -> BinanceClient:
    """A :class:`BinanceClient` for ``conn_id`` when :func:`use_plain_client` allows it, else a
    ``BinanceHook`` (a subclass, same API); ``settings`` and ``options`` go to either."""
    if use_plain_client(conn_id):
        return BinanceClient(conn_id, settings=settings, **options)
    from binance_provider.hooks.binance import BinanceHook

    return BinanceHook(conn_id, settings=settings, **options)


def archive_client(conn_id: str = ARCHIVE_CONN_ID, settings: Any = None, **options: Any) -> BinanceArchiveClient:
    """A :class:`BinanceArchiveClient` for ``conn_id`` when :func:`use_plain_client` allows it, else a
    ``BinanceArchiveHook`` (a subclass, same API); ``settings`` and ``options`` go to either."""
    if use_plain_client(conn_id):
        return BinanceArchiveClient(conn_id, settings=settings, **options)
    from binance_provider.hooks.archive import BinanceArchiveHook

    return BinanceArchiveHook(conn_id, settings=settings, **options)
