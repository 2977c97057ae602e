"""Make ``plugins/`` importable as Airflow does (``binance_provider``) and the project root as ``include``."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

_ROOT = Path(__file__).resolve().parents[2]
for _path in (str(_ROOT), str(_ROOT / "plugins")):
    if _path not in sys.path:
        sys.path.insert(0, _path)


@pytest.fixture(autouse=True)
def _fresh_shared_limiters():
    """Each test starts with no shared limiter state (a stopped server's port can be reused)."""
    from binance_provider.hooks.rate_limiter import WeightLimiter

    WeightLimiter.clear_shared()
    yield
    WeightLimiter.clear_shared()
