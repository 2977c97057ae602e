"""Binance's public data archive (``data.binance.vision``): checksummed monthly and daily kline files.

:class:`BinanceArchiveHook` is :class:`binance_provider.clients.archive.BinanceArchiveClient` (the
download, checksum, unzip, parse and retry code, documented there) on an Airflow connection.
"""

from __future__ import annotations

from typing import Any

from airflow.providers.http.hooks.http import HttpHook
from binance_provider.clients.archive import (
    ArchiveFile,
    ArchiveFileRejected,
    BinanceArchiveClient,
    archive_interval,
    parse_kline_csv,
)
from binance_provider.facts import ARCHIVE_CONN_ID
from binance_provider.hooks.connection import AirflowConnection

__all__ = [
    "ArchiveFile",
    "ArchiveFileRejected",
    "BinanceArchiveHook",
    "archive_interval",
    "parse_kline_csv",
]


class BinanceArchiveHook(AirflowConnection, BinanceArchiveClient, HttpHook):
    """
    Download checksummed kline files from Binance's public data archive: every method and
    behaviour of :class:`~binance_provider.clients.archive.BinanceArchiveClient`, on an Airflow
    connection.

    :param binance_archive_conn_id: Airflow HTTP connection whose host is the archive's base URL;
        when it does not exist, ``https://data.binance.vision`` is used.
    :param settings, timeout_s, max_tries, max_time_s, backoff_factor_s, backoff_cap_s: as in
        :class:`~binance_provider.clients.archive.BinanceArchiveClient`.
    :param kwargs: passed to :class:`HttpHook` (``method`` is always GET).
    """

    conn_name_attr = "binance_archive_conn_id"
    default_conn_name = ARCHIVE_CONN_ID
    conn_type = "http"
    hook_name = "Binance public data archive"

    def __init__(self, binance_archive_conn_id: str = default_conn_name, **kwargs: Any) -> None:
        self._set_up(BinanceArchiveClient, binance_archive_conn_id, kwargs)
