"""The Redis-shared weight budget and 418 ban (``BINANCE_LIMITER_REDIS_URL``), on a real redis-server.

Unit tests drive :class:`RedisWeightLimiter` with a fake clock (Redis is real; only time is
simulated), and use a second limiter on its own connection pool as "another process's view".
The end-to-end tests run two OS processes, each with its own ``BinanceClient``, against a real
sandbox over HTTP.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import textwrap
import threading
import time
from collections import Counter

import pytest
import redis

from binance_provider.clients.archive import BinanceArchiveClient
from binance_provider.clients.rest import BinanceBanned, BinanceClient
from binance_provider.facts import HookSettings
from binance_provider.hooks.rate_limiter import (
    BanActive,
    BanRecord,
    WeightLimiter,
    shared_ban_record,
    shared_limiter,
)
from binance_provider.hooks.redis_limiter import (
    POLL_S,
    LimiterBackendUnavailable,
    RedisBanRecord,
    RedisWeightLimiter,
    redact_url,
    redis_client,
)
from include.binance_sandbox import SandboxServer
from tests.plugins.test_binance_hook import settled_stats
from tests.plugins.test_rate_limiter import FakeClock
from tests.services import free_port, start_redis

HOST = "http://127.0.0.1:9"  # only a key: no request goes there
HOUR_MS = 3_600_000


def other_view(url: str) -> redis.Redis:
    """A connection pool of its own: what another process sees in Redis."""
    return redis.Redis.from_url(url, decode_responses=True)


def make(url: str, budget: int = 10, window_s: float = 60.0, start: float = 1_000_000.0,
         client: redis.Redis | None = None, clock: FakeClock | None = None,
         host: str = HOST) -> tuple[RedisWeightLimiter, FakeClock]:
    clock = clock if clock is not None else FakeClock(start)
    return RedisWeightLimiter(url, host, budget, window_s, client=client, clock=clock, wait=clock.wait), clock


def two_views(url: str, **options) -> tuple[RedisWeightLimiter, RedisWeightLimiter, FakeClock]:
    """This process's limiter and another process's, on one (fake) clock."""
    mine, clock = make(url, **options)
    theirs, _ = make(url, client=other_view(url), clock=clock,
                     **{k: v for k, v in options.items() if k != "start"})
    return mine, theirs, clock


# -- unit: windows, budget, reconciliation ----------------------------------------------------------


def test_budget_fills_then_waits_in_short_polls_for_the_clock_aligned_window_end(redis_url):
    limiter, theirs, clock = two_views(redis_url, budget=10, window_s=60.0, start=1_000_025.5)
    for _ in range(5):
        limiter.release(limiter.acquire(2))
    assert clock.waits == []
    assert limiter.used() == theirs.used() == 10
    reservation = theirs.acquire(1)  # the other process is refused until the window turns
    # 1_000_025.5 lies in the window [1_000_020, 1_000_080): the wait ends exactly at its end,
    # in sleeps no longer than the poll interval (a ban set elsewhere is seen within one).
    assert clock.now == pytest.approx(1_000_080.0)
    assert clock.waits and max(clock.waits) <= POLL_S
    assert reservation.window == int(1_000_080.0 // 60)
    assert limiter.used() == theirs.used() == 1


def test_two_processes_take_from_one_budget(redis_url):
    mine, theirs, clock = two_views(redis_url, budget=10)
    taken = [mine.acquire(3), theirs.acquire(3), mine.acquire(2), theirs.acquire(2)]
    assert clock.waits == []
    assert mine.used() == 10
    for view, reservation in zip((mine, theirs, mine, theirs), taken):
        view.release(reservation)  # answered: nothing in flight to carry into the next window
    window = taken[0].window
    late = mine.acquire(1)  # 10 of 10 taken by the two: no room before the next window
    assert late.window == window + 1 and clock.waits


def test_server_weight_raises_the_shared_count_and_never_lowers_it(redis_url):
    mine, theirs, clock = two_views(redis_url, budget=10)
    mine.release(mine.acquire(1), used_weight=7)  # other tools on the IP used 6
    assert theirs.used() == 7
    theirs.release(theirs.acquire(1), used_weight=3)  # an older, lower reading
    assert mine.used() == 8
    mine.acquire(2)
    assert clock.waits == []
    theirs.acquire(1)  # 11 > 10: waits for the next window
    assert clock.waits


def test_server_weight_from_a_previous_window_is_ignored(redis_url):
    limiter, clock = make(redis_url, budget=10, window_s=60.0, start=1_000_019.0)
    reservation = limiter.acquire(2)
    clock.now += 5  # the answer arrives after the window turned
    limiter.release(reservation, used_weight=10)
    assert limiter.used() == 2  # the carried in-flight weight only, not the old window's count


def test_weight_in_flight_is_carried_into_the_next_window_for_every_process(redis_url):
    mine, theirs, clock = two_views(redis_url, budget=10, window_s=60.0, start=1_000_019.0)
    mine.acquire(4)  # still unanswered when the window turns
    clock.now += 2
    assert theirs.used() == 4
    for _ in range(3):
        theirs.release(theirs.acquire(2))
    assert clock.waits == []
    theirs.acquire(1)
    assert clock.waits
    # Unlike the per-process limiter, weight is carried one window only: a request is answered or
    # timed out long before a window ends, and a worker that died holding a reservation (it never
    # releases) costs the budget for two windows at most, not for ever.
    assert mine.used() == 1


def test_weight_above_budget_and_bad_settings_are_rejected(redis_url):
    limiter, _ = make(redis_url, budget=10)
    with pytest.raises(ValueError, match="exceeds the rate-limit budget 10"):
        limiter.acquire(20)
    for budget, window_s in ((0, 60.0), (10, 0.0)):
        with pytest.raises(ValueError):
            RedisWeightLimiter(redis_url, HOST, budget, window_s)


# -- unit: 429 pause and 418 ban ------------------------------------------------------------------


def test_pause_holds_every_process_until_its_end_and_never_shortens(redis_url):
    mine, theirs, clock = two_views(redis_url, budget=100, window_s=60.0, start=1_000_000.0)
    assert mine.pause_until(1_000_003.0) == 1_000_003.0
    assert theirs.pause_until(1_000_001.0) == 1_000_003.0  # a shorter one does not replace it
    assert theirs.paused_until == 1_000_003.0
    theirs.acquire(1)
    assert clock.now == pytest.approx(1_000_003.0) and max(clock.waits) <= POLL_S
    assert mine.paused_until is None


def test_pause_without_retry_after_lasts_to_the_window_end(redis_url):
    mine, theirs, clock = two_views(redis_url, budget=100, window_s=60.0, start=1_000_000.0)
    assert mine.pause_until() == 1_000_020.0
    theirs.acquire(1)
    assert clock.now == pytest.approx(1_000_020.0)


def test_ban_is_seen_by_another_process_which_refuses_at_once(redis_url):
    mine, theirs, clock = two_views(redis_url, budget=100)
    until = clock.now + 120.125
    mine.ban_until(until)
    with pytest.raises(BanActive) as info:
        theirs.acquire(1)
    assert info.value.until_s == until  # exactly, through Redis
    assert clock.waits == []
    assert theirs.banned_until == until
    assert RedisBanRecord(redis_url, HOST, client=other_view(redis_url)).until() == until
    mine.ban_until(until - 60)  # a shorter ban never replaces a longer one
    assert theirs.banned_until == until
    clock.now = until + 0.001
    assert theirs.banned_until is None
    theirs.acquire(1)


def test_ban_recorded_by_a_ban_record_stops_the_limiter(redis_url):
    limiter, clock = make(redis_url, budget=100, start=time.time())
    RedisBanRecord(redis_url, HOST, client=other_view(redis_url)).record(clock.now + 30)
    with pytest.raises(BanActive):
        limiter.acquire(1)


def test_ban_set_elsewhere_wakes_a_waiter_within_a_poll(redis_url):
    # Real clock: this process waits on a long pause; another process records a ban.
    waiter = RedisWeightLimiter(redis_url, HOST, 100, 60.0)
    waiter.pause_until(time.time() + 60)
    elsewhere = RedisWeightLimiter(redis_url, HOST, 100, 60.0, client=other_view(redis_url))
    outcome: list[BaseException] = []
    started = threading.Event()

    def wait_for_room() -> None:
        started.set()
        try:
            waiter.acquire(1)
        except BaseException as exc:  # noqa: BLE001 - recorded for the assertion
            outcome.append(exc)

    thread = threading.Thread(target=wait_for_room)
    thread.start()
    started.wait(5)
    elsewhere.ban_until(time.time() + 60)
    thread.join(10)  # a safety net, not a timing assertion: the pause alone would hold it 60 s
    assert not thread.is_alive()
    assert len(outcome) == 1 and isinstance(outcome[0], BanActive)


def test_hosts_are_independent(redis_url):
    a, clock = make(redis_url, budget=10, host="http://127.0.0.1:1")
    b, _ = make(redis_url, budget=10, host="http://127.0.0.1:2", clock=clock)
    a.ban_until(clock.now + 60)
    a_ = RedisWeightLimiter(redis_url, "http://127.0.0.1:1/", 10, 60.0, clock=clock)  # same host
    with pytest.raises(BanActive):
        a_.acquire(1)
    for _ in range(5):
        b.acquire(2)
    assert b.used() == 10 and clock.waits == []


# -- unit: Redis housekeeping, sharing, failures -------------------------------------------------


def test_every_key_expires_and_is_tagged_with_its_host(redis_url):
    limiter, clock = make(redis_url, budget=10, window_s=60.0, start=1_000_019.0)
    limiter.release(limiter.acquire(2), used_weight=5)
    limiter.acquire(3)
    clock.now += 2
    limiter.release(limiter.acquire(1), used_weight=4)
    limiter.pause_until(clock.now + 5)
    limiter.ban_until(clock.now + 120)
    view = other_view(redis_url)
    keys = view.keys("*")
    assert len(keys) >= 6
    for key in keys:
        assert key.startswith("binance:limiter:{127.0.0.1:9}:"), key
        ttl_ms = view.pttl(key)
        # window keys: up to one window past their end; pause/ban: up to a second past theirs
        assert 0 < ttl_ms <= 120_000 + 1000 + 10, (key, ttl_ms)


def test_shared_limiters_use_one_pool_per_url_and_follow_new_settings(redis_url):
    first = RedisWeightLimiter.shared(redis_url, "http://127.0.0.1:1/", 10, 60.0)
    assert RedisWeightLimiter.shared(redis_url, "http://127.0.0.1:1", 10, 60.0) is first
    other_host = RedisWeightLimiter.shared(redis_url, "http://127.0.0.1:2", 10, 60.0)
    assert other_host is not first
    assert other_host._redis.client is first._redis.client is redis_client(redis_url)
    assert RedisBanRecord.shared(redis_url, "http://127.0.0.1:1")._redis.client is first._redis.client
    again = RedisWeightLimiter.shared(redis_url, "http://127.0.0.1:1", 20, 30.0)
    assert again is first and (again.budget, again.window_s) == (20, 30.0)


def test_selection_follows_the_variable(redis_url, monkeypatch, tmp_path):
    monkeypatch.setenv("AIRFLOW_CONN_BINANCE_DEFAULT", '{"conn_type": "http", "host": "http://127.0.0.1:9"}')
    monkeypatch.setenv("AIRFLOW_CONN_BINANCE_ARCHIVE", '{"conn_type": "http", "host": "http://127.0.0.1:9"}')
    monkeypatch.delenv("BINANCE_LIMITER_REDIS_URL", raising=False)
    client, archive = BinanceClient(), BinanceArchiveClient()
    assert type(client.limiter) is WeightLimiter
    assert type(client.ban_record) is BanRecord and client.ban_record is client.ban_record
    assert type(archive.ban_record) is BanRecord

    monkeypatch.setenv("BINANCE_LIMITER_REDIS_URL", redis_url)
    assert type(client.limiter) is RedisWeightLimiter
    assert client.limiter is shared_limiter(client.source, 4800, 60.0)
    assert type(client.ban_record) is RedisBanRecord and type(archive.ban_record) is RedisBanRecord
    assert archive.ban_record is client.ban_record  # one host: one ban
    assert shared_ban_record(client.source) is client.ban_record


def test_without_the_variable_redis_is_never_imported(clean_sandbox, tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "BINANCE_LIMITER_REDIS_URL"}
    env["AIRFLOW_CONN_BINANCE_DEFAULT"] = json.dumps({"conn_type": "http", "host": clean_sandbox.url})
    env["BINANCE_BAN_DIR"] = str(tmp_path)
    env["LOG_LEVEL"] = "WARNING"
    script = textwrap.dedent("""
        import sys
        from binance_provider.clients.rest import BinanceClient
        client = BinanceClient()
        client.ping()
        print(type(client.limiter).__name__, type(client.ban_record).__name__, "redis" in sys.modules)
    """)
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.splitlines()[-1].split() == ["WeightLimiter", "BanRecord", "False"]


def test_unreachable_redis_fails_naming_the_variable_and_sends_nothing(clean_sandbox, monkeypatch):
    settled_stats(clean_sandbox)  # a previous test's last answer may still be being counted
    clean_sandbox.reset_stats()
    monkeypatch.setenv("AIRFLOW_CONN_BINANCE_DEFAULT", json.dumps({"conn_type": "http", "host": clean_sandbox.url}))
    monkeypatch.setenv("BINANCE_LIMITER_REDIS_URL", f"redis://:s3cret@127.0.0.1:{free_port()}/0")
    with pytest.raises(LimiterBackendUnavailable) as caught:
        BinanceClient(max_tries=2).ping()
    message = str(caught.value)
    assert "BINANCE_LIMITER_REDIS_URL=redis://:***@127.0.0.1:" in message and "unreachable" in message
    assert "s3cret" not in message
    assert settled_stats(clean_sandbox)["requests"] == 0  # no silent per-process fallback


def test_redis_lost_midway_fails_clearly_instead_of_falling_back(clean_sandbox, monkeypatch, tmp_path):
    url, stop = start_redis(tmp_path / "redis")
    try:
        monkeypatch.setenv("AIRFLOW_CONN_BINANCE_DEFAULT",
                           json.dumps({"conn_type": "http", "host": clean_sandbox.url}))
        monkeypatch.setenv("BINANCE_LIMITER_REDIS_URL", url)
        client = BinanceClient(max_tries=2)
        assert client.ping().status == 200
    finally:
        stop()
    with pytest.raises(LimiterBackendUnavailable, match=f"BINANCE_LIMITER_REDIS_URL={url}"):
        client.ping()


def test_redact_url():
    assert redact_url("redis://:pw@redis:6379/1") == "redis://:***@redis:6379/1"
    assert redact_url("rediss://user:pw@h/0") == "rediss://user:***@h/0"
    assert redact_url("redis://redis:6379/0") == "redis://redis:6379/0"


def test_concurrent_acquires_of_two_processes_never_exceed_the_budget_per_window(redis_url):
    budget, window_s, threads, per_thread = 10, 0.2, 4, 6
    views = [RedisWeightLimiter(redis_url, HOST, budget, window_s),
             RedisWeightLimiter(redis_url, HOST, budget, window_s, client=other_view(redis_url))]
    taken: Counter[int] = Counter()
    lock = threading.Lock()

    def worker(limiter: RedisWeightLimiter) -> None:
        for _ in range(per_thread):
            reservation = limiter.acquire(1)
            with lock:
                taken[reservation.window] += reservation.weight
            limiter.release(reservation, None)

    pool = [threading.Thread(target=worker, args=(view,)) for view in views for _ in range(threads)]
    for thread in pool:
        thread.start()
    for thread in pool:
        thread.join(30)
    assert sum(taken.values()) == 2 * threads * per_thread
    assert max(taken.values()) <= budget
    assert len(taken) >= 2 * threads * per_thread // budget


# -- through the client, in this process -----------------------------------------------------------


def test_a_429_pauses_through_redis_and_the_retry_waits(redis_url, monkeypatch):
    with SandboxServer(host="127.0.0.1", port=0, seed=42) as server:
        monkeypatch.setenv("AIRFLOW_CONN_BINANCE_DEFAULT", json.dumps({"conn_type": "http", "host": server.url}))
        monkeypatch.setenv("BINANCE_LIMITER_REDIS_URL", redis_url)
        server.set_faults({"storm_429": 1, "retry_after_s": 1})
        client = BinanceClient(max_tries=4, backoff_factor_s=0.01, backoff_cap_s=0.05)
        before = time.time()
        meta = client.ping()
        assert meta.retries == 1
        pause = float(other_view(redis_url).get("binance:limiter:{%s}:pause" % server.url.split("//")[1]))
        assert pause >= before + 1  # recorded in Redis for every worker
        # The sandbox bans a client that comes back before Retry-After: it did not.
        assert settled_stats(server, total=2)["by_status"] == {"429": 1, "200": 1}


# -- two OS processes against one sandbox -----------------------------------------------------------

_FETCHER = textwrap.dedent("""
    import hashlib, json, sys, time
    from binance_provider.clients.rest import BinanceClient

    client = BinanceClient(max_tries=4, backoff_factor_s=0.01, backoff_cap_s=0.05)
    print(json.dumps({"limiter": type(client.limiter).__name__}), flush=True)
    sys.stdin.readline()  # both processes start together
    start, end = int(sys.argv[1]), int(sys.argv[2])
    started = time.monotonic()
    rows, peak, retries = [], 0, 0
    for page in client.iter_klines("BTCUSDT", "1h", start, end, concurrency=4):
        rows.extend(page.rows)
        peak = max(peak, page.meta.used_weight or 0)
        retries += page.meta.retries
    digest = hashlib.sha256(json.dumps(rows).encode()).hexdigest()
    print(json.dumps({"rows": len(rows), "sha256": digest, "peak_header": peak, "retries": retries,
                      "wall_s": round(time.monotonic() - started, 3)}), flush=True)
""")


def _spawn(script: str, env: dict, *args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", script, *args], env=env, stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _finish(process: subprocess.Popen, timeout_s: float = 60) -> list[dict]:
    try:
        out, err = process.communicate(timeout=timeout_s)
    finally:
        if process.poll() is None:
            process.kill()  # our own child, by its pid
            process.wait(5)
    assert process.returncode == 0, err[-3000:]
    return [json.loads(line) for line in out.splitlines() if line.startswith("{")]


def _child_env(server: SandboxServer, redis_url: str, ban_dir, **settings: str) -> dict:
    env = dict(os.environ)
    env.update({"AIRFLOW_CONN_BINANCE_DEFAULT": json.dumps({"conn_type": "http", "host": server.url}),
                "BINANCE_LIMITER_REDIS_URL": redis_url, "BINANCE_BAN_DIR": str(ban_dir), "LOG_LEVEL": "WARNING"})
    env.update(settings)
    return env


def test_two_processes_share_one_budget_against_a_tight_sandbox(redis_url, tmp_path, capsys):
    # The sandbox allows 40 weight per 1 s window. Each process allows itself 80 % of it (32):
    # two full budgets (64) would exceed the limit; one shared budget cannot.
    limit, window_s, pages = 40, 1.0, 16
    with SandboxServer(host="127.0.0.1", port=0, seed=42, weight_limit=limit, window_s=window_s) as server:
        first = 1_514_764_800_000  # 2018-01-01: each process fetches 16 000 hours of its own
        spans = [(first + i * pages * 1000 * HOUR_MS, first + (i + 1) * pages * 1000 * HOUR_MS) for i in range(2)]
        truths = [server.truth("BTCUSDT", "1h", start, end) for start, end in spans]
        env = _child_env(server, redis_url, tmp_path / "bans", BINANCE_RATE_LIMIT_WEIGHT=str(limit),
                         BINANCE_RATE_LIMIT_WINDOW_S=str(window_s), BINANCE_RATE_LIMIT_SAFETY="0.8")
        children = [_spawn(_FETCHER, env, str(start), str(end)) for start, end in spans]
        try:
            for child in children:
                assert json.loads(child.stdout.readline()) == {"limiter": "RedisWeightLimiter"}
            started = time.monotonic()
            for child in children:
                child.stdin.write("go\n")
                child.stdin.flush()
            results = [_finish(child)[-1] for child in children]
        finally:
            for child in children:
                if child.poll() is None:
                    child.kill()
                    child.wait(5)
        wall_s = time.monotonic() - started
        stats = settled_stats(server, total=2 * pages)
    for result, truth in zip(results, truths):
        assert result["rows"] == len(truth)
        assert result["sha256"] == hashlib.sha256(json.dumps(truth).encode()).hexdigest()
    with capsys.disabled():
        print(f"\n[two processes, Redis-shared budget 32 of limit {limit}/{window_s:g}s] "
              f"requests={stats['requests']} peak_window_weight={stats['max_window_weight']} "
              f"429s={stats['rate_limited_429']} 418s={stats['banned_418']} wall={wall_s:.2f}s "
              f"children={[(r['rows'], r['wall_s'], r['retries']) for r in results]}")
    assert stats["rate_limited_429"] == 0 and stats["banned_418"] == 0
    assert stats["by_status"] == {"200": 2 * pages}  # one request per page, none repeated
    assert stats["max_window_weight"] <= limit
    assert all(result["retries"] == 0 for result in results)


_BLOCKED = textwrap.dedent("""
    import json, sys
    from binance_provider.clients.rest import BinanceBanned, BinanceClient
    from binance_provider.hooks.rate_limiter import BanActive

    client = BinanceClient(max_tries=2)
    for _ in range(4):  # budget 4: full for this (huge) window
        client.ping()
    print(json.dumps({"full": client.limiter.used()}), flush=True)
    outcome = {}
    try:
        client.ping()  # waits for room: the window will not turn during the test
    except BinanceBanned as exc:
        outcome["client_banned_until_ms"] = exc.until_ms
    try:
        client.limiter.acquire(1)
    except BanActive as exc:
        outcome["limiter_ban_until_s"] = exc.until_s
    try:
        BinanceClient(max_tries=2).ping()  # a new client (an Airflow retry's) is banned too
    except BinanceBanned as exc:
        outcome["new_client_banned_until_ms"] = exc.until_ms
    print(json.dumps(outcome), flush=True)
""")


def test_a_418_seen_by_one_process_stops_the_other_which_sends_nothing(redis_url, tmp_path, monkeypatch):
    window_s = "1000000"  # windows of ~11.6 days: the blocked process cannot get room by a window turn
    with SandboxServer(host="127.0.0.1", port=0, seed=42) as server:
        env = _child_env(server, redis_url, tmp_path / "their-bans", BINANCE_RATE_LIMIT_WEIGHT="5",
                         BINANCE_RATE_LIMIT_SAFETY="0.8", BINANCE_RATE_LIMIT_WINDOW_S=window_s)
        blocked = _spawn(_BLOCKED, env)
        try:
            line = blocked.stdout.readline()
            assert json.loads(line or "{}") == {"full": 4}, blocked.stderr.read() if not line else line
            assert settled_stats(server, total=4)["by_status"] == {"200": 4}

            # This process (a bigger budget on the same window) is the one that gets the 418.
            monkeypatch.setenv("AIRFLOW_CONN_BINANCE_DEFAULT", json.dumps({"conn_type": "http", "host": server.url}))
            monkeypatch.setenv("BINANCE_LIMITER_REDIS_URL", redis_url)
            my_bans = tmp_path / "my-bans"
            monkeypatch.setenv("BINANCE_BAN_DIR", str(my_bans))
            server.set_faults({"ban_418": 1, "ban_s": 30})
            settings = HookSettings(rate_limit_weight=6000, rate_limit_window_s=float(window_s))
            with pytest.raises(BinanceBanned) as caught:
                BinanceClient(settings=settings, max_tries=2).ping()
            outcome = _finish(blocked, timeout_s=30)[-1]
        finally:
            if blocked.poll() is None:
                blocked.kill()
                blocked.wait(5)
        stats = settled_stats(server, total=5)
    until_ms = caught.value.until_ms
    assert outcome == {"client_banned_until_ms": until_ms, "new_client_banned_until_ms": until_ms,
                       "limiter_ban_until_s": pytest.approx(until_ms / 1000, abs=1e-3)}
    assert stats["by_status"] == {"200": 4, "418": 1}  # the other process sent nothing after the ban
    assert not my_bans.exists() or not any(my_bans.iterdir())  # the ban went to Redis, not to a file
