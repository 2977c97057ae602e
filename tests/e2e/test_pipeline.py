"""End to end with `airflow dags test` (the CLI a user runs to try a DAG without a scheduler): enough 1d,
4h and 1h history from the sandbox for a real, directional daily signal, with StatsD on.

What the standalone tests (test_standalone*.py) already prove is not repeated here: raw and curated
against the sandbox, backfill, history, the ingestion and curation metric names, no failed tries. This
one keeps what they cannot reach with a few days of data: an `ok` signal with its chart, counted as
`signal.generated`."""

from __future__ import annotations

import json
import os

from tests.e2e.helpers import ROOT, run_cli

# What the signal of 2024-03-01 needs: 50+ closed 1d candles, a day of 4h, five days of 1h.
RUNS = [
    ("binance_klines_1d", {"start": "2023-12-01", "end": "2024-03-01"}),
    ("binance_klines_4h", {"start": "2024-02-25", "end": "2024-03-01T12:00Z"}),
    ("binance_klines_1h", {"start": "2024-02-24", "end": "2024-03-01T12:00Z"}),
]


def test_an_ok_signal_from_dags_tested_through_the_airflow_cli(airflow_db, dag_data_env, sandbox, statsd):
    env = {
        **os.environ,
        "AIRFLOW__METRICS__STATSD_ON": "True",
        "AIRFLOW__METRICS__STATSD_HOST": "127.0.0.1",
        "AIRFLOW__METRICS__STATSD_PORT": str(statsd.port),
        "AIRFLOW__CORE__DAGS_FOLDER": str(ROOT / "dags"),
    }
    for dag_id, conf in RUNS:
        run_cli(["dags", "test", dag_id, "--conf", json.dumps(conf)], env=env, timeout=600)
    run_cli(["dags", "test", "daily_signal", "2024-03-01T12:00:00+00:00", "--conf", '{"max_wait_minutes": 0}'],
            env=env, timeout=600)

    signal = json.loads((dag_data_env / "signals" / "signal_20240301.json").read_text())
    assert signal["status"] == "ok" and signal["direction"] in ("long", "short", "flat"), signal.get("reason")
    assert signal["as_of"] == "2024-03-01T11:59:59.999Z"  # the 11:00 1h candle: nothing after 12:00
    assert set(signal["inputs"]) == {"1d", "4h", "1h"} and all(signal["inputs"].values())
    assert (dag_data_env / "signals" / "signal_20240301.png").stat().st_size > 10_000
    assert "airflow.signal.generated" in statsd.names() and "airflow.signal.stale" not in statsd.names()
