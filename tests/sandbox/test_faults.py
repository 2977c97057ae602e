"""Injected faults: each one, their control endpoints, scoping and reproducibility."""

from __future__ import annotations

import json
import threading
import time

import pytest
import requests

from include.binance_sandbox import SandboxServer
from include.binance_sandbox.faults import FaultError, FaultInjector

NOW_MS = 1_780_000_030_000
KLINES = "/api/v3/klines?symbol=BTCUSDT&interval=1h&limit=50"


@pytest.fixture(scope="module")
def server():
    with SandboxServer(now_ms=NOW_MS, window_s=1e9) as srv:
        yield srv


@pytest.fixture
def srv(server):
    server.clear_faults()
    server.reset_limits()
    yield server
    server.clear_faults()


def test_error_next_gives_5xx_then_recovers(srv):
    srv.set_faults({"error_next": 4})
    statuses = [requests.get(srv.url + KLINES, timeout=10).status_code for _ in range(5)]
    assert all(s in (500, 502, 503, 504) for s in statuses[:4])
    assert statuses[4] == 200


def test_error_bodies_are_json_or_html(srv):
    srv.set_faults({"error_rate": 1.0})
    bodies = [requests.get(srv.url + "/api/v3/ping", timeout=10).text for _ in range(12)]
    assert any(b.startswith("{") for b in bodies) and any(b.startswith("<html>") for b in bodies)


def test_garbage_is_200_without_json(srv):
    srv.set_faults({"garbage_next": 1})
    response = requests.get(srv.url + KLINES, timeout=10)
    assert response.status_code == 200
    with pytest.raises(ValueError):
        response.json()
    assert requests.get(srv.url + KLINES, timeout=10).json()


def test_truncate_cuts_the_body_with_matching_length(srv):
    whole = requests.get(srv.url + KLINES, timeout=10).content
    srv.set_faults({"truncate_next": 1})
    cut = requests.get(srv.url + KLINES, timeout=10)
    assert cut.status_code == 200
    assert int(cut.headers["Content-Length"]) == len(cut.content) < len(whole)
    assert whole.startswith(cut.content)
    with pytest.raises(ValueError):
        json.loads(cut.content)


def test_storm_429_with_retry_after(srv):
    srv.set_faults({"storm_429": 2, "retry_after_s": 1})
    session = requests.Session()
    first = session.get(srv.url + "/api/v3/ping")
    assert (first.status_code, first.headers["Retry-After"]) == (429, "1")
    assert first.json()["code"] == -1003
    time.sleep(1.05)  # honour Retry-After: the second storm answer is a 429, not a ban
    second = session.get(srv.url + "/api/v3/ping")
    assert second.status_code == 429
    time.sleep(1.05)
    assert session.get(srv.url + "/api/v3/ping").status_code == 200


def test_ignoring_a_storm_retry_after_gets_banned(srv):
    srv.set_faults({"storm_429": 1, "retry_after_s": 30})
    session = requests.Session()
    assert session.get(srv.url + "/api/v3/ping").status_code == 429
    banned = session.get(srv.url + "/api/v3/ping")
    assert banned.status_code == 418 and banned.headers["Retry-After"] == "120"


def test_an_injected_418_bans_as_binance_does(srv):
    srv.set_faults({"ban_418": 1, "ban_s": 9})
    answers = [requests.get(srv.url + "/api/v3/time", timeout=10) for _ in range(3)]
    # the ban holds after the injected answer: calling on meets 418 until it ends
    assert [a.status_code for a in answers] == [418, 418, 418]
    assert answers[0].headers["Retry-After"] == "9" and 1 <= int(answers[2].headers["Retry-After"]) <= 9
    srv.reset_limits()  # a new IP, as far as the sandbox knows
    assert requests.get(srv.url + "/api/v3/time", timeout=10).status_code == 200


def test_latency_delays_answers(srv):
    srv.set_faults({"latency_ms": 150, "jitter_ms": 20})
    started = time.perf_counter()
    assert requests.get(srv.url + "/api/v3/ping", timeout=10).status_code == 200
    assert time.perf_counter() - started >= 0.15


def test_hang_outlasts_client_timeout_and_server_stays_responsive(srv):
    srv.set_faults({"hang_next": 1, "hang_s": 3})
    outcome = {}

    def hanging_call():
        try:
            requests.get(srv.url + "/api/v3/ping", timeout=1.0)
            outcome["result"] = "answered"
        except requests.exceptions.ReadTimeout:
            outcome["result"] = "timeout"

    caller = threading.Thread(target=hanging_call)
    caller.start()
    time.sleep(0.2)
    # Another connection is served while the first one hangs.
    assert requests.get(srv.url + "/api/v3/time", timeout=5).status_code == 200
    assert caller.is_alive()
    caller.join(timeout=10)
    assert outcome["result"] == "timeout"


def test_faults_restricted_to_endpoints(srv):
    srv.set_faults({"error_rate": 1.0, "endpoints": ["/api/v3/klines"]})
    assert requests.get(srv.url + "/api/v3/ping", timeout=10).status_code == 200
    assert requests.get(srv.url + KLINES, timeout=10).status_code >= 500


def test_sandbox_endpoints_are_never_faulted(srv):
    srv.set_faults({"error_rate": 1.0, "garbage_rate": 1.0})
    assert requests.get(srv.url + "/sandbox/stats", timeout=10).json()["requests"] >= 0


def test_control_endpoints_merge_show_and_clear(srv):
    url = srv.url + "/sandbox/faults"
    assert requests.post(url, json={"latency_ms": 5}, timeout=10).json()["latency_ms"] == 5
    merged = requests.post(url, json={"error_rate": 0.25}, timeout=10).json()
    assert merged["latency_ms"] == 5 and merged["error_rate"] == 0.25
    assert requests.get(url, timeout=10).json() == merged
    cleared = requests.delete(url, timeout=10).json()
    assert cleared["latency_ms"] == 0 and cleared["error_rate"] == 0


@pytest.mark.parametrize(
    "bad",
    [{"eror_rate": 0.5}, {"error_rate": 2}, {"storm_429": -1}, {"outages": [{"start": 5}]},
     {"outages": [{"start": 10, "end": 5}]}, {"endpoints": "klines"}],
)
def test_bad_fault_settings_rejected(srv, bad):
    response = requests.post(srv.url + "/sandbox/faults", json=bad, timeout=10)
    assert response.status_code == 400
    assert next(iter(bad)).split("_")[0].rstrip("s") in response.json()["msg"]
    with pytest.raises(FaultError):
        srv.set_faults(bad)


def test_fault_seed_makes_runs_reproducible():
    def decisions(seed):
        injector = FaultInjector({"error_rate": 0.3, "hang_rate": 0.2, "jitter_ms": 50}, seed=seed)
        return [injector.plan("/api/v3/klines") for _ in range(50)]

    assert decisions(7) == decisions(7)
    assert decisions(7) != decisions(8)


def test_outage_removes_minutes_in_every_interval(srv):
    hour = 3_600_000
    base = NOW_MS - NOW_MS % hour - 48 * hour
    before = srv.truth("BTCUSDT", "1h", base, base + 4 * hour)
    # 15 minutes missing inside the second hour, and the whole third hour.
    srv.set_faults({"outages": [
        {"start": base + hour + 15 * 60_000, "end": base + hour + 30 * 60_000},
        {"symbol": "BTCUSDT", "start": base + 2 * hour, "end": base + 3 * hour},
    ]})
    after_rows = requests.get(
        srv.url + "/api/v3/klines",
        params={"symbol": "BTCUSDT", "interval": "1h", "startTime": base, "endTime": base + 3 * hour},
        timeout=10,
    ).json()
    assert [r[0] for r in after_rows] == [base, base + hour, base + 3 * hour]
    assert after_rows[0] == before[0] and after_rows[2] == before[3]
    partial = after_rows[1]
    minutes = srv.truth("BTCUSDT", "1m", base + hour, base + 2 * hour)
    assert len(minutes) == 45
    assert partial[8] == sum(m[8] for m in minutes) < before[1][8]
    # ETHUSDT only loses the window that names no symbol.
    eth = srv.truth("ETHUSDT", "1h", base, base + 4 * hour)
    assert [r[0] for r in eth] == [base + i * hour for i in range(4)]


def test_outage_given_in_iso(srv):
    srv.set_faults({"outages": [{"start": "2020-03-12T00:00:00Z", "end": "2020-03-13T00:00:00"}]})
    day = 1_583_971_200_000  # 2020-03-12
    assert srv.truth("ETHUSDT", "1d", day - 86_400_000, day + 2 * 86_400_000)[1][0] == day + 86_400_000
