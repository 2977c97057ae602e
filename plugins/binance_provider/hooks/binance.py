"""Binance spot REST hook: :class:`binance_provider.clients.rest.BinanceClient` on an Airflow connection.

The hook speaks HTTP only: it pages through ``/api/v3/klines`` and hands back Binance's rows
(validated by :mod:`binance_provider.klines`, open candles dropped, rows that break a value rule
set apart in ``rejected``) with provenance in :class:`ResponseMeta`. What happens to the rows is
the caller's business. All of that is the plain client's code; the hook adds Airflow's connection
lookup, ``HttpHook``'s session set-up and the provider contract.
"""

from __future__ import annotations

from typing import Any

from airflow.providers.http.hooks.http import HttpHook
from binance_provider.clients.rest import (
    DEFAULT_BAN_S,
    KLINES_ENDPOINT,
    BinanceAPIError,
    BinanceBanned,
    BinanceClient,
    BinanceRateLimited,
    BinanceUnavailable,
    KlineCheck,
    KlinePage,
    KlineValidationError,
    RejectedRow,
    ResponseMeta,
    page_windows,
    validate_klines,
)
from binance_provider.facts import BINANCE_CONN_ID
from binance_provider.hooks.connection import AirflowConnection

__all__ = [
    "DEFAULT_BAN_S",
    "KLINES_ENDPOINT",
    "BinanceAPIError",
    "BinanceBanned",
    "BinanceHook",
    "BinanceRateLimited",
    "BinanceUnavailable",
    "KlineCheck",
    "KlinePage",
    "KlineValidationError",
    "RejectedRow",
    "ResponseMeta",
    "page_windows",
    "validate_klines",
]


class BinanceHook(AirflowConnection, BinanceClient, HttpHook):
    """
    Talk to Binance's spot REST API (or a compatible server such as the local sandbox): every
    method and behaviour of :class:`~binance_provider.clients.rest.BinanceClient` (limiter,
    retries, 429/418 handling, klines, tickers, exchange info), on an Airflow connection.

    :param binance_conn_id: Airflow HTTP connection whose host is the API base URL; when it does
        not exist, ``https://data-api.binance.vision`` is used.
    :param settings, timeout_s, max_tries, max_time_s, backoff_factor_s, backoff_cap_s: as in
        :class:`~binance_provider.clients.rest.BinanceClient`.
    :param kwargs: passed to :class:`HttpHook` (``method`` is always GET).
    """

    conn_name_attr = "binance_conn_id"
    default_conn_name = BINANCE_CONN_ID
    conn_type = "http"
    hook_name = "Binance"

    def __init__(self, binance_conn_id: str = default_conn_name, **kwargs: Any) -> None:
        self._set_up(BinanceClient, binance_conn_id, kwargs)
