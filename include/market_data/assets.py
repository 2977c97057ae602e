"""Airflow Asset URIs of the curated datasets (light: imported by DAG files at parse time)."""

from __future__ import annotations

from pathlib import Path

from include.market_data.config import Settings


def curated_asset_uri(settings: Settings, interval: str) -> str:
    """``<curated dir as URI>/<interval>``: one Asset per interval, for data-aware scheduling."""
    location = settings.curated_data_dir
    base = location if "://" in location else Path(location).absolute().as_uri()
    return f"{base.rstrip('/')}/{interval}"
