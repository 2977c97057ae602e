"""End to end on `airflow standalone`, as `make demo` runs it, through the public REST API v2 (and the
`airflow backfill create` CLI): the ingestion DAG's manual window, the daily signal, a backfill, deep
history; what each wrote is checked against the sandbox's truth; no task fails a try, start-up included."""

from __future__ import annotations

import json
from datetime import datetime, timedelta

import pytest

from include.market_data.quality import QualityReport
from include.market_data.signal_rule import HISTORY_NEEDED
from include.market_data.storage import RawStore
from include.market_data.timeframes import interval_ms, to_ms
from tests.e2e.helpers import assert_curated_equals_reference, assert_raw_equals_truth, run_cli

pytestmark = pytest.mark.slow

SYMBOL = "BTCUSDT"
# Three days of 1h, ending at the signal's 12:00 UTC cutoff of 2024-03-01.
WINDOW_1H = ("2024-02-27T12:00Z", "2024-03-01T12:00Z")
SIGNAL_DAY = "2024-03-01"
# `airflow backfill create` takes every logical date (for this timetable: data interval start) in
# [from, to], both ends included: two days of 4h are the 12 slots from 00:00 of the 28th to 20:00 of the 29th.
BACKFILL_4H = ("2024-02-28T00:00:00+00:00", "2024-02-29T20:00:00+00:00")
HISTORY = {"start": "2024-01-01", "end": "2024-02-01", "intervals": ["15m", "30m"]}


def test_ingest_signal_backfill_and_history_through_the_rest_api(standalone, sandbox):
    api, settings = standalone.api, standalone.settings
    raw = RawStore(settings.raw_data_dir)

    # 1. binance_klines_1h over three days (params start/end, as the trigger form sends them)
    run = api.trigger("binance_klines_1h", {"start": WINDOW_1H[0], "end": WINDOW_1H[1]})
    api.wait_for_success("binance_klines_1h", run["dag_run_id"])
    start, end = to_ms(WINDOW_1H[0]), to_ms(WINDOW_1H[1])
    truth_1h = assert_raw_equals_truth(sandbox, settings.raw_data_dir, "1h", SYMBOL, start, end)
    assert len(truth_1h) == 3 * 24
    assert raw.metadata("1h", SYMBOL, to_ms("2024-02-28"))["source"] == sandbox.url  # REST
    assert_curated_equals_reference(settings, "1h", SYMBOL, start, end)

    # 2. daily_signal of that day: the run whose data interval ends at its 12:00 cutoff. The 1h input
    #    is up to date but three days are short of what the rule needs, and there is no 1d/4h yet:
    #    a stale_data signal that says so, with no direction.
    cutoff = datetime.fromisoformat(f"{SIGNAL_DAY}T12:00:00+00:00")
    interval = ((cutoff - timedelta(days=1)).isoformat(), cutoff.isoformat())
    run = api.trigger("daily_signal", logical_date=interval[0], data_interval=interval)
    api.wait_for_success("daily_signal", run["dag_run_id"])
    signal_dir = standalone.data / "signals"
    signal = json.loads((signal_dir / f"signal_{SIGNAL_DAY.replace('-', '')}.json").read_text())
    newest_1h = truth_1h[-1]
    assert (signal["date"], signal["symbol"], signal["status"]) == (SIGNAL_DAY, SYMBOL, "stale_data")
    assert signal["direction"] is None and signal["confidence"] is None and signal["entry"] is None
    assert signal["inputs"]["1d"] is None and signal["inputs"]["4h"] is None
    assert to_ms(signal["inputs"]["1h"]["open_time"]) == newest_1h[0] == end - interval_ms("1h")
    assert float(signal["inputs"]["1h"]["close"]) == float(newest_1h[4])
    assert to_ms(signal["as_of"]) == newest_1h[6]
    assert signal["lag_seconds"] == {"1d": None, "4h": None, "1h": 0}
    for part in ("1d: no curated candle closed before the cutoff", "4h: no curated candle closed before the cutoff",
                 f"1h: {len(truth_1h)} closed candle(s), the rule needs {HISTORY_NEEDED['1h']}"):
        assert part in signal["reason"], signal["reason"]
    assert (signal_dir / f"signal_{SIGNAL_DAY.replace('-', '')}.png").stat().st_size > 10_000

    # 3. `airflow backfill create` of binance_klines_4h over two days: one run per 4h slot, all succeed
    run_cli(["backfill", "create", "--dag-id", "binance_klines_4h", "--from-date", BACKFILL_4H[0],
             "--to-date", BACKFILL_4H[1]], env=standalone.env())
    first, last = (datetime.fromisoformat(d) for d in BACKFILL_4H)
    expected = [first + timedelta(hours=4 * i) for i in range(int((last - first) / timedelta(hours=4)) + 1)]
    assert len(expected) == 2 * 24 // 4
    assert len(api.get("/backfills", dag_id="binance_klines_4h")["backfills"]) == 1
    runs = api.runs("binance_klines_4h", run_type="backfill")
    assert sorted(datetime.fromisoformat(r["logical_date"].replace("Z", "+00:00")) for r in runs) == expected
    finished = api.wait_for_runs("binance_klines_4h", [r["dag_run_id"] for r in runs], timeout=420)
    assert {r: f["state"] for r, f in finished.items()} == {r["dag_run_id"]: "success" for r in runs}, \
        [f"{r}: {api.describe('binance_klines_4h', r)}" for r, f in finished.items() if f["state"] != "success"]
    assert all(r["triggered_by"] == "backfill" for r in runs)
    start_4h, end_4h = to_ms(BACKFILL_4H[0]), to_ms(BACKFILL_4H[1]) + interval_ms("4h")
    assert len(assert_raw_equals_truth(sandbox, settings.raw_data_dir, "4h", SYMBOL, start_4h, end_4h)) == 12
    assert_curated_equals_reference(settings, "4h", SYMBOL, start_4h, end_4h)

    # 4. binance_history over one month of two intervals (source auto: the month's archive files)
    run = api.trigger("binance_history", HISTORY)
    api.wait_for_success("binance_history", run["dag_run_id"], timeout=420)
    chunks = [ti for ti in api.task_instances("binance_history", run["dag_run_id"]) if ti["task_id"] == "ingest_chunk"]
    assert len(chunks) == 2 and {ti["state"] for ti in chunks} == {"success"}
    month_start, month_end = to_ms(HISTORY["start"]), to_ms(HISTORY["end"])
    for iv in HISTORY["intervals"]:
        truth = assert_raw_equals_truth(sandbox, settings.raw_data_dir, iv, SYMBOL, month_start, month_end)
        assert len(truth) == 31 * 24 * 3_600_000 // interval_ms(iv)
        source = raw.metadata(iv, SYMBOL, to_ms("2024-01-15"))["source"]
        assert source.startswith(sandbox.url) and source.endswith(f"/{SYMBOL}-{iv}-2024-01.zip"), source
        assert_curated_equals_reference(settings, iv, SYMBOL, month_start, month_end)
        assert QualityReport(settings.raw_data_dir).read(iv).num_rows == 0

    # DESIGN's metric names reached StatsD from the workers (prefix "airflow.")
    names = standalone.statsd.names()
    expected_metrics = {
        "airflow.binance.request.duration", "airflow.binance.request.count", "airflow.binance.weight_used",
        "airflow.archive.download.count", "airflow.signal.stale",
        *(f"airflow.ingest.{i}.{m}" for i in ("1h", "4h") for m in ("candles", "gaps_found", "lag_seconds")),
        *(f"airflow.ingest.{i}.candles" for i in HISTORY["intervals"]),
        *(f"airflow.curate.{i}.{m}" for i in ("1h", "4h", *HISTORY["intervals"]) for m in ("rows", "duration")),
    }
    assert expected_metrics <= names, sorted(expected_metrics - names)

    # No task instance of the instance failed a try: ours, the backfill's, and the runs the scheduler
    # started in its first seconds, before the api-server answered.
    assert api.failed_tries() == []
