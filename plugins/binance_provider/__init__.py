"""Binance provider: ``BinanceHook`` for Binance's spot REST API (``binance_provider.hooks.binance``)
and ``BinanceArchiveHook`` for its public data archive (``binance_provider.hooks.archive``).

Kept import-light: Airflow's plugin manager and DAG parsing import this package.
"""

from __future__ import annotations


def get_provider_info() -> dict:
    """Provider metadata, registered through the ``apache_airflow_provider`` entry point (plugins/pyproject.toml)."""
    return {
        "package-name": "binance-provider",
        "versions": ["0.1.0"],
        "name": "Binance",
        "description": "Binance spot REST API: klines, tickers and exchange info with weight-aware rate limiting; "
                       "the public data archive's checksummed monthly and daily kline files.",
        "integrations": [
            {"integration-name": "Binance", "external-doc-url": "https://developers.binance.com/docs/binance-spot-api-docs"}
        ],
        "hooks": [{"integration-name": "Binance",
                   "python-modules": ["binance_provider.hooks.binance", "binance_provider.hooks.archive"]}],
        # Both hooks use a plain HTTP connection (conn_type "http"; binance_default: host = API base URL,
        # binance_archive: host = archive base URL), a type the HTTP provider registers already:
        # declaring it again would be ignored with a warning.
        "connection-types": [],
    }
