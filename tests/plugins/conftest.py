"""Provider tests: ``binance_provider`` is the installed package; the project root gives ``include``."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

_ROOT = Path(__file__).resolve().parents[2]
if str(_ROOT) not in sys.path:
    sys.path.insert(0, str(_ROOT))


@pytest.fixture(autouse=True)
def _fresh_shared_limiters():
    """Each test starts with no shared limiter state (a stopped server's port can be reused)."""
    from binance_provider.hooks.rate_limiter import WeightLimiter

    WeightLimiter.clear_shared()
    yield
    WeightLimiter.clear_shared()
