"""Provider tests: ``binance_provider`` is the installed package; the project root gives ``include``."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

_ROOT = Path(__file__).resolve().parents[2]
if str(_ROOT) not in sys.path:
    sys.path.insert(0, str(_ROOT))


def _clear_shared_limiters() -> None:
    from binance_provider.hooks.rate_limiter import WeightLimiter
    from binance_provider.hooks.redis_limiter import RedisWeightLimiter  # imports no redis by itself

    WeightLimiter.clear_shared()
    RedisWeightLimiter.clear_shared()


@pytest.fixture(autouse=True)
def _fresh_shared_limiters():
    """Each test starts with no shared limiter state (a stopped server's port can be reused)."""
    _clear_shared_limiters()
    yield
    _clear_shared_limiters()


@pytest.fixture(scope="session")
def _redis_server(tmp_path_factory):
    """One real ``redis-server`` on a free 127.0.0.1 port for the session (see tests/services.py)."""
    from tests.services import start_redis

    url, stop = start_redis(tmp_path_factory.mktemp("redis"))
    try:
        yield url
    finally:
        stop()


@pytest.fixture
def redis_url(_redis_server):
    """The session's Redis URL, its data flushed before the test; set it as
    ``BINANCE_LIMITER_REDIS_URL`` (monkeypatch) where the test wants the shared limiter."""
    import redis

    client = redis.Redis.from_url(_redis_server)
    try:
        client.flushall()
    finally:
        client.close()
    return _redis_server
