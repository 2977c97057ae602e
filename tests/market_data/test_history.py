"""The task bodies of binance_history: planning within max_map_length, chunks that redo only themselves."""

from __future__ import annotations

import pytest

from include.market_data import history
from include.market_data.config import Settings, load_settings
from include.market_data.schema import table_to_rows
from include.market_data.storage import RawStore
from include.market_data.timeframes import to_ms
from include.market_data.windows import InvalidInput

NOW = to_ms("2026-08-01T00:00Z")


def test_one_chunk_per_symbol_interval_and_month():
    planned = history.plan({"start": "2024-01-15", "end": "2024-03-01", "intervals": ["15m", "1h"]},
                           settings=Settings(), now=NOW, limit=1024)
    labels = [history.label(c) for c in planned["chunks"]]
    assert labels == ["BTCUSDT 15m 2024-01", "BTCUSDT 15m 2024-02", "BTCUSDT 1h 2024-01", "BTCUSDT 1h 2024-02"]
    first = planned["chunks"][0]["segments"]
    assert first == [{"symbol": "BTCUSDT", "interval": "15m", "start": "2024-01-15T00:00:00Z",
                      "end": "2024-02-01T00:00:00Z"}]
    assert [c["index"] for c in planned["chunks"]] == [0, 1, 2, 3] and planned["chunks"][0]["total"] == 4
    assert planned["source"] == "auto" and planned["intervals"] == ["15m", "1h"]


def test_nine_years_of_six_intervals_stay_within_max_map_length_and_cover_every_month():
    settings = Settings(symbols=("BTCUSDT", "ETHUSDT"))
    planned = history.plan({"start": "2017-08-17"}, settings=settings, now=NOW, limit=1024)
    months = [seg for chunk in planned["chunks"] for seg in chunk["segments"]]
    assert len(months) == 2 * 6 * 108  # 2017-08 .. 2026-07, every series
    assert len(planned["chunks"]) <= 1024
    assert len({(m["symbol"], m["interval"], m["start"]) for m in months}) == len(months)  # no month twice
    small = history.plan({"start": "2017-08-17"}, settings=settings, now=NOW, limit=100)
    assert len(small["chunks"]) <= 100
    assert [s for c in small["chunks"] for s in c["segments"]] == months


@pytest.mark.parametrize("params, name", [
    ({"start": "2024-01-01", "source": "ftp"}, "source"),
    ({"start": "2024-01-01", "intervals": ["2h"]}, "interval"),
    ({"start": "2024-01-01", "symbols": ["../../etc"]}, "symbol"),
    ({"start": "2024-01-01", "symbols": ["ETHUSDT"]}, "BINANCE_SYMBOLS"),
    ({"start": "2024-03-01", "end": "2024-02-01"}, "start"),
    ({"start": "2024-01-01", "end": "2099-01-01"}, "future"),
    ({"start": "2010-01-01"}, "INGEST_START"),
    ({}, "start"),
])
def test_bad_params_are_refused_naming_them(params, name):
    with pytest.raises(InvalidInput, match=name):
        history.plan(params, settings=Settings(), now=NOW, limit=1024)


def _day_files(interval):
    root = RawStore(load_settings().raw_data_dir).root / interval
    return {p.name: p.stat().st_mtime_ns for p in root.glob("*.parquet")}


def test_a_chunk_run_again_redoes_only_its_own_month(data_env, sandbox):
    planned = history.plan({"start": "2024-01-01", "end": "2024-03-01", "intervals": ["1h"]})
    results = [history.ingest_chunk(chunk, "run-1") for chunk in planned["chunks"]]
    truth = sandbox.truth("BTCUSDT", "1h", to_ms("2024-01-01"), to_ms("2024-03-01"))
    store = RawStore(load_settings().raw_data_dir)
    assert table_to_rows(store.read("1h", "BTCUSDT", to_ms("2024-01-01"), to_ms("2024-03-01")), 8) == truth
    assert [len(r["written"][0]["days"]) for r in results] == [31, 29]
    before = _day_files("1h")
    for name in ("BTCUSDT_1h_20240210.parquet", "BTCUSDT_1h_20240211.parquet"):
        (store.root / "1h" / name).unlink()  # February's chunk failed half-way, say
    sandbox.reset_stats()
    again = history.ingest_chunk(planned["chunks"][1], "run-1")
    after = _day_files("1h")
    assert set(after) == set(before)
    changed = {name for name in after if after[name] != before[name]}
    assert changed == {"BTCUSDT_1h_20240210.parquet", "BTCUSDT_1h_20240211.parquet"}  # the rest untouched
    assert sandbox.stats()["archive_by_kind"] == {"monthly_zip": 1, "monthly_checksum": 1}  # February only
    assert len(again["written"][0]["days"]) == 29  # February's days merged (27 of them no-ops, untouched)
    assert table_to_rows(store.read("1h", "BTCUSDT", to_ms("2024-01-01"), to_ms("2024-03-01")), 8) == truth


def test_report_names_the_chunks_that_failed(data_env):
    from airflow.sdk.exceptions import AirflowFailException

    planned = history.plan({"start": "2024-01-01", "end": "2024-03-01", "intervals": ["1h"]})
    done = {"index": 0, "label": "BTCUSDT 1h 2024-01", "candles": 744, "written": []}
    with pytest.raises(AirflowFailException, match=r"1 of 2 chunks not ingested: BTCUSDT 1h 2024-02"):
        history.report(planned, [done], [{"interval": "1h"}], {"1h": 0})
    second = {**done, "index": 1}
    assert history.report(planned, [done, second], [{"interval": "1h"}], {"1h": 0})["chunks"] == 2
