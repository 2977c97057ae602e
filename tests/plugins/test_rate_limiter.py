"""WeightLimiter: windows, server weight, pauses, bans, thread safety; the endpoint weight table."""

from __future__ import annotations

import threading
from collections import Counter

import pytest

from binance_provider.hooks.rate_limiter import (
    BanActive,
    WeightLimiter,
    normalize_endpoint,
    request_weight,
)


class FakeClock:
    """Epoch seconds that only move when the limiter waits; records every wait."""

    def __init__(self, start: float) -> None:
        self.now = start
        self.waits: list[float] = []

    def __call__(self) -> float:
        return self.now

    def wait(self, _condition: threading.Condition, timeout_s: float) -> None:
        self.waits.append(timeout_s)
        self.now += timeout_s


def make_limiter(budget: int = 10, window_s: float = 60.0, start: float = 1_000_000.0) -> tuple[WeightLimiter, FakeClock]:
    clock = FakeClock(start)
    return WeightLimiter(budget, window_s, clock=clock, wait=clock.wait), clock


def test_budget_fills_then_waits_for_the_clock_aligned_window_end():
    limiter, clock = make_limiter(budget=10, window_s=60.0, start=1_000_025.5)  # window [999_960, 1_000_020)+60
    for _ in range(5):
        limiter.release(limiter.acquire(2))
    assert clock.waits == []
    assert limiter.used() == 10
    reservation = limiter.acquire(1)
    # 1_000_025.5 lies in the window [1_000_020, 1_000_080): the wait ends exactly at its end.
    assert clock.now == pytest.approx(1_000_080.0)
    assert reservation.window == int(1_000_080.0 // 60)
    assert limiter.used() == 1


def test_server_weight_counts_when_higher_than_own():
    limiter, clock = make_limiter(budget=10)
    limiter.release(limiter.acquire(1), used_weight=9)  # other processes on the IP used 8
    assert limiter.used() == 9
    limiter.acquire(1)
    assert clock.waits == []
    limiter.acquire(1)
    assert len(clock.waits) == 1


def test_server_weight_of_the_current_window_is_recorded_and_never_lowered():
    limiter, _ = make_limiter(budget=10)
    limiter.release(limiter.acquire(1), used_weight=7)  # other processes on the IP used 6
    assert limiter.used() == 7
    limiter.release(limiter.acquire(1), used_weight=3)  # an older, lower reading never lowers the count
    assert limiter.used() == 8


def test_server_weight_from_a_previous_window_is_ignored():
    limiter, clock = make_limiter(budget=10, window_s=60.0, start=1_000_019.0)
    reservation = limiter.acquire(2)
    clock.now += 5  # the answer arrives after the window turned
    limiter.release(reservation, used_weight=10)
    assert limiter.used() == 2  # carried in-flight weight only, not the old window's server count


def test_in_flight_weight_is_carried_into_the_next_window():
    limiter, clock = make_limiter(budget=10, window_s=60.0, start=1_000_019.0)
    limiter.acquire(4)  # still in flight when the window turns
    clock.now += 2
    assert limiter.used() == 4
    for _ in range(3):
        limiter.release(limiter.acquire(2))
    assert clock.waits == []
    limiter.acquire(1)
    assert len(clock.waits) == 1
    assert limiter.used() == 5  # the next window again starts with the 4 still in flight


def test_pause_holds_every_acquire_until_its_end():
    limiter, clock = make_limiter(budget=100, start=1_000_000.0)
    resume = limiter.pause_until(1_000_003.0)
    assert resume == 1_000_003.0
    assert limiter.paused_until == 1_000_003.0
    limiter.acquire(1)
    assert clock.now == pytest.approx(1_000_003.0)
    assert limiter.paused_until is None


def test_pause_without_retry_after_lasts_to_the_window_end_and_never_shortens():
    limiter, clock = make_limiter(budget=100, window_s=60.0, start=1_000_000.0)
    assert limiter.pause_until() == 1_000_020.0
    assert limiter.pause_until(1_000_005.0) == 1_000_020.0
    limiter.acquire(1)
    assert clock.now == pytest.approx(1_000_020.0)


def test_ban_refuses_at_once_until_it_ends():
    limiter, clock = make_limiter(budget=100)
    limiter.ban_until(clock.now + 120)
    with pytest.raises(BanActive) as info:
        limiter.acquire(1)
    assert info.value.until_s == clock.now + 120
    assert clock.waits == []
    assert limiter.banned_until == clock.now + 120
    clock.now += 121
    assert limiter.banned_until is None
    limiter.acquire(1)


def test_weight_above_budget_is_rejected():
    limiter, _ = make_limiter(budget=10)
    with pytest.raises(ValueError, match="exceeds the rate-limit budget 10"):
        limiter.acquire(20)


@pytest.mark.parametrize(("budget", "window_s"), [(0, 60.0), (10, 0.0)])
def test_bad_configuration_is_rejected(budget, window_s):
    with pytest.raises(ValueError):
        WeightLimiter(budget, window_s)


def test_shared_limiter_is_one_per_base_url_and_follows_new_settings():
    first = WeightLimiter.shared("http://127.0.0.1:1/", 10, 60.0)
    assert WeightLimiter.shared("http://127.0.0.1:1", 10, 60.0) is first
    assert WeightLimiter.shared("http://127.0.0.1:2", 10, 60.0) is not first
    first.ban_until(first._clock() + 60)
    again = WeightLimiter.shared("http://127.0.0.1:1", 20, 30.0)
    assert again is first and (again.budget, again.window_s) == (20, 30.0)
    assert again.banned_until is not None


def test_ban_wakes_a_thread_waiting_on_a_pause():
    limiter = WeightLimiter(100, 60.0)
    limiter.pause_until(limiter._clock() + 60)
    outcome: list[BaseException] = []
    started = threading.Event()

    def waiter() -> None:
        started.set()
        try:
            limiter.acquire(1)
        except BaseException as exc:  # noqa: BLE001 - recorded for the assertion
            outcome.append(exc)

    thread = threading.Thread(target=waiter)
    thread.start()
    started.wait(5)
    limiter.ban_until(limiter._clock() + 60)
    thread.join(10)
    assert not thread.is_alive()
    assert len(outcome) == 1 and isinstance(outcome[0], BanActive)


def test_concurrent_acquires_never_exceed_the_budget_per_window():
    budget, window_s, threads, per_thread = 10, 0.2, 8, 6
    limiter = WeightLimiter(budget, window_s)
    taken: Counter[int] = Counter()
    lock = threading.Lock()

    def worker() -> None:
        for _ in range(per_thread):
            reservation = limiter.acquire(1)
            with lock:
                taken[reservation.window] += reservation.weight
            limiter.release(reservation, None)

    pool = [threading.Thread(target=worker) for _ in range(threads)]
    for thread in pool:
        thread.start()
    for thread in pool:
        thread.join(30)
    assert sum(taken.values()) == threads * per_thread
    assert max(taken.values()) <= budget
    assert len(taken) >= threads * per_thread // budget


@pytest.mark.parametrize(
    ("endpoint", "params", "weight"),
    [
        ("/api/v3/ping", None, 1),
        ("/api/v3/time", None, 1),
        ("/api/v3/exchangeInfo", None, 20),
        ("/api/v3/exchangeInfo", {"symbol": "BTCUSDT"}, 20),
        ("api/v3/klines", {"symbol": "BTCUSDT", "limit": 1000}, 2),
        ("/api/v3/ticker/price", {"symbol": "BTCUSDT"}, 2),
        ("/api/v3/ticker/price", {}, 4),
        ("/api/v3/ticker/24hr", {"symbol": "ETHUSDT"}, 2),
        ("/api/v3/ticker/24hr", None, 80),
    ],
)
def test_request_weight_table(endpoint, params, weight):
    assert request_weight(endpoint, params) == weight


def test_unknown_endpoint_weight_names_the_endpoint():
    with pytest.raises(ValueError, match="/api/v3/depth"):
        request_weight("/api/v3/depth?symbol=BTCUSDT")


def test_normalize_endpoint():
    assert normalize_endpoint("api/v3/klines?symbol=X") == "/api/v3/klines"
    assert normalize_endpoint("/api/v3/ping") == "/api/v3/ping"


def test_without_a_redis_url_the_shared_limiter_and_ban_record_are_the_per_process_ones(monkeypatch, tmp_path):
    from binance_provider.hooks.rate_limiter import BanRecord, limiter_redis_url, shared_ban_record, shared_limiter

    monkeypatch.setenv("BINANCE_LIMITER_REDIS_URL", "  ")  # empty counts as unset
    assert limiter_redis_url() is None
    limiter = shared_limiter("http://127.0.0.1:1/", 10, 60.0)
    assert limiter is WeightLimiter.shared("http://127.0.0.1:1", 10, 60.0)
    record = shared_ban_record("http://127.0.0.1:1", None)
    assert type(record) is BanRecord and shared_ban_record("http://127.0.0.1:1", record) is record
    assert record.path.name == "127.0.0.1_1.ban"
    monkeypatch.setenv("BINANCE_LIMITER_REDIS_URL", " redis://r:6379/2 ")
    assert limiter_redis_url() == "redis://r:6379/2"
