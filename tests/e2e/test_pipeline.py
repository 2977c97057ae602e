"""End to end, as a user runs it: `airflow dags test` of the ingestion DAGs and of daily_signal
against the Binance sandbox, with StatsD on, and the metrics caught on a UDP socket."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
# What the signal of 2024-03-01 needs: 50+ closed 1d candles, a day of 4h, five days of 1h.
RUNS = [
    ("binance_klines_1d", {"start": "2023-12-01", "end": "2024-03-01"}),
    ("binance_klines_4h", {"start": "2024-02-25", "end": "2024-03-01T12:00Z"}),
    ("binance_klines_1h", {"start": "2024-02-24", "end": "2024-03-01T12:00Z"}),
]


class StatsdListener:
    """Collects StatsD lines sent to 127.0.0.1:<port> until stopped."""

    def __init__(self) -> None:
        self.socket = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.socket.bind(("127.0.0.1", 0))
        self.socket.settimeout(0.2)
        self.port = self.socket.getsockname()[1]
        self.lines: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                packet = self.socket.recv(65536)
            except socket.timeout:
                continue
            self.lines.extend(packet.decode(errors="replace").splitlines())

    def names(self) -> set[str]:
        return {line.split(":", 1)[0] for line in self.lines}

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self.socket.close()


@pytest.fixture
def statsd():
    listener = StatsdListener()
    yield listener
    listener.stop()


def _airflow(*args: str, env: dict) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, "-m", "airflow", *args], env=env, capture_output=True, text=True,
                            timeout=600, cwd=ROOT)
    assert result.returncode == 0, f"airflow {' '.join(args)}:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result


def test_ingest_curate_and_signal_through_the_airflow_cli(airflow_db, dag_data_env, sandbox, statsd):
    env = {
        **os.environ,
        "AIRFLOW__METRICS__STATSD_ON": "True",
        "AIRFLOW__METRICS__STATSD_HOST": "127.0.0.1",
        "AIRFLOW__METRICS__STATSD_PORT": str(statsd.port),
        "AIRFLOW__CORE__DAGS_FOLDER": str(ROOT / "dags"),
    }
    for dag_id, conf in RUNS:
        _airflow("dags", "test", dag_id, "--conf", json.dumps(conf), env=env)
    _airflow("dags", "test", "daily_signal", "2024-03-01T12:00:00+00:00", "--conf", '{"max_wait_minutes": 0}',
             env=env)

    signal = json.loads((dag_data_env / "signals" / "signal_20240301.json").read_text())
    assert signal["status"] == "ok" and signal["direction"] in ("long", "short", "flat")
    assert signal["as_of"] == "2024-03-01T11:59:59.999Z"  # the 11:00 1h candle: nothing after 12:00
    assert (dag_data_env / "signals" / "signal_20240301.png").stat().st_size > 10_000
    for interval in ("1d", "4h", "1h"):
        assert list((dag_data_env / "curated").glob(f"{interval}_curated_*.parquet"))

    # DESIGN's metric names reached StatsD through Airflow's stats backend (prefix "airflow.")
    expected = {
        "airflow.binance.request.duration", "airflow.binance.request.count", "airflow.binance.weight_used",
        "airflow.signal.generated",
        *(f"airflow.ingest.{i}.{m}" for i in ("1d", "4h", "1h") for m in ("candles", "gaps_found", "lag_seconds")),
        *(f"airflow.curate.{i}.{m}" for i in ("1d", "4h", "1h") for m in ("rows", "duration")),
    }
    assert expected <= statsd.names(), sorted(expected - statsd.names())
    assert "airflow.signal.stale" not in statsd.names()
