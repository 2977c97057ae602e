"""Binance's weight limit: fixed clock windows, 429 with Retry-After, then 418 bans."""

from __future__ import annotations

import pytest
import requests

from include.binance_sandbox import SandboxServer
from include.binance_sandbox.ratelimit import WeightLimiter

# A window of ~31 years aligned to the epoch: no window boundary can pass during a test.
NEVER_ROLLS_S = 1e9


class FakeClock:
    def __init__(self, now: float):
        self.now = now

    def __call__(self) -> float:
        return self.now


def test_windows_are_aligned_to_the_clock():
    clock = FakeClock(120.0 + 50.0)  # 50 s into the minute [120, 180)
    limiter = WeightLimiter(weight_limit=10, window_s=60, ban_s=120, clock=clock)
    assert limiter.admit("ip", 6).status == 200
    refused = limiter.admit("ip", 6)
    assert (refused.status, refused.used_weight, refused.retry_after_s) == (429, 12, 10)
    clock.now = 180.0  # the next window starts with nothing used
    fresh = limiter.admit("ip", 6)
    assert (fresh.status, fresh.used_weight) == (200, 6)


def test_retry_after_is_at_least_one_second():
    clock = FakeClock(59.9)
    limiter = WeightLimiter(weight_limit=1, window_s=60, ban_s=120, clock=clock)
    limiter.admit("ip", 1)
    assert limiter.admit("ip", 1).retry_after_s == 1


def test_hammering_after_429_gets_banned_and_bans_double():
    clock = FakeClock(1000.0)
    limiter = WeightLimiter(weight_limit=2, window_s=60, ban_s=120, clock=clock)
    limiter.admit("ip", 2)
    first = limiter.admit("ip", 1)
    assert first.status == 429 and first.retry_after_s == 20  # window ends at 1020
    clock.now += 1
    ban = limiter.admit("ip", 1)
    assert (ban.status, ban.retry_after_s) == (418, 120)
    clock.now += 100
    during = limiter.admit("ip", 1)
    assert (during.status, during.retry_after_s) == (418, 20)
    clock.now += 20  # ban over (t=1121, a new window): requests pass again
    assert limiter.admit("ip", 1).status == 200
    limiter.admit("ip", 5)  # over the limit again -> 429
    clock.now += 0.5
    second_ban = limiter.admit("ip", 1)
    assert (second_ban.status, second_ban.retry_after_s) == (418, 240)


def test_requests_in_flight_when_a_429_is_sent_get_the_429_not_a_ban():
    """Binance bans clients that keep calling after a 429, not the requests they had under way."""
    from include.binance_sandbox.ratelimit import IN_FLIGHT_GRACE_S

    clock = FakeClock(1000.0)
    limiter = WeightLimiter(weight_limit=2, window_s=60, ban_s=120, clock=clock)
    limiter.admit("ip", 2, 1000.0, "c1")
    told = limiter.admit("ip", 1, 1000.0, "c1")  # the 429, sent at 1000.0 on connection c1
    assert told.status == 429
    clock.now = 1000.02
    # arrived before the 429 went out (it waited in the server), on any connection: 429 again
    assert limiter.admit("ip", 1, 999.99, "c2").status == 429
    # on another connection just after it: could not have been read yet
    assert limiter.admit("ip", 1, 1000.0 + IN_FLIGHT_GRACE_S / 2, "c3").status == 429
    # on the 429's own connection, the client had read the 429 before it sent this: banned
    assert limiter.admit("ip", 1, 1000.01, "c1").status == 418


def test_another_connection_well_after_a_429_is_banned():
    from include.binance_sandbox.ratelimit import IN_FLIGHT_GRACE_S

    clock = FakeClock(1000.0)
    limiter = WeightLimiter(weight_limit=2, window_s=60, ban_s=120, clock=clock)
    limiter.admit("ip", 2, 1000.0, "c1")
    assert limiter.admit("ip", 1, 1000.0, "c1").status == 429
    clock.now = 1000.0 + 2 * IN_FLIGHT_GRACE_S
    assert limiter.admit("ip", 1, clock.now, "c2").status == 418


def test_waiting_out_retry_after_is_not_punished():
    clock = FakeClock(30.0)
    limiter = WeightLimiter(weight_limit=1, window_s=60, ban_s=120, clock=clock)
    limiter.admit("ip", 1)
    refused = limiter.admit("ip", 1)
    clock.now += refused.retry_after_s
    assert limiter.admit("ip", 1).status == 200


def test_clients_are_counted_separately():
    clock = FakeClock(0.0)
    limiter = WeightLimiter(weight_limit=3, window_s=60, ban_s=120, clock=clock)
    assert limiter.admit("a", 3).status == 200
    assert limiter.admit("b", 3).status == 200
    assert limiter.admit("a", 1).status == 429


def test_bad_settings_rejected():
    with pytest.raises(ValueError):
        WeightLimiter(weight_limit=0)
    with pytest.raises(ValueError):
        WeightLimiter(window_s=0)


def test_http_429_then_418_escalation():
    with SandboxServer(now_ms=1_780_000_030_000, weight_limit=45, window_s=NEVER_ROLLS_S, ban_s=7) as srv:
        session = requests.Session()
        url = srv.url + "/api/v3/exchangeInfo"  # weight 20
        assert session.get(url).status_code == 200
        second = session.get(url)
        assert second.status_code == 200 and second.headers["X-MBX-USED-WEIGHT-1M"] == "40"
        limited = session.get(url)
        assert limited.status_code == 429
        assert limited.headers["X-MBX-USED-WEIGHT-1M"] == "60"
        assert int(limited.headers["Retry-After"]) >= 1
        assert limited.json()["code"] == -1003
        assert limited.json()["msg"].startswith("Too much request weight used;")
        banned = session.get(srv.url + "/api/v3/ping")
        assert banned.status_code == 418
        assert banned.headers["Retry-After"] == "7"
        assert banned.json()["code"] == -1003
        still = session.get(srv.url + "/api/v3/time")
        assert still.status_code == 418 and 1 <= int(still.headers["Retry-After"]) <= 7
        assert session.get(srv.url + "/sandbox/stats").status_code == 200  # control never limited
        stats = srv.stats()
        assert stats["rate_limited_429"] == 1 and stats["banned_418"] == 2
        assert stats["max_window_weight"] == 60
        srv.reset_limits()
        assert session.get(srv.url + "/api/v3/ping").status_code == 200


def test_stats_count_endpoints_and_reset():
    with SandboxServer(now_ms=1_780_000_030_000, window_s=NEVER_ROLLS_S) as srv:
        session = requests.Session()
        session.get(srv.url + "/api/v3/ping")
        session.get(srv.url + "/api/v3/klines", params={"symbol": "BTCUSDT", "interval": "1h"})
        session.get(srv.url + "/api/v3/klines", params={"symbol": "BTCUSDT"})
        stats = session.get(srv.url + "/sandbox/stats").json()
        assert stats["by_endpoint"] == {"/api/v3/ping": 1, "/api/v3/klines": 2}
        assert stats["by_status"] == {"200": 2, "400": 1}
        assert stats["current_window_weight"] == 5 and stats["max_window_weight"] == 5
        assert session.delete(srv.url + "/sandbox/stats").json()["requests"] == 0
