"""Airflow Asset URIs of the curated datasets (light: imported by DAG files at parse time)."""

from __future__ import annotations

from pathlib import Path

from include.market_data.config import Settings


def _as_uri(location: str) -> str:
    return (location if "://" in location else Path(location).absolute().as_uri()).rstrip("/")


def curated_asset_uri(settings: Settings, interval: str) -> str:
    """``<curated dir as URI>/<interval>``: one Asset per interval, for data-aware scheduling."""
    return f"{_as_uri(settings.curated_data_dir)}/{interval}"


def signal_asset_uri(settings: Settings) -> str:
    """``<signal dir as URI>/signals.parquet``: the daily signal table."""
    return f"{_as_uri(settings.signal_data_dir)}/signals.parquet"
