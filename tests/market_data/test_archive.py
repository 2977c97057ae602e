"""Candles from the public data archive (and ``auto``: archive + REST) against the sandbox over real HTTP."""

from __future__ import annotations

import pytest

from include.market_data.archive import Unit, month_spans, plan_units
from include.market_data.config import load_settings
from include.market_data.ingestion import DataIngestion, InvalidInput
from include.market_data.quality import QualityReport
from include.market_data.schema import table_to_rows
from include.market_data.storage import RawStore
from include.market_data.timeframes import DAY_MS, to_ms


def stored(interval, start, end, symbol="BTCUSDT"):
    store = RawStore(load_settings().raw_data_dir)
    return table_to_rows(store.read(interval, symbol, to_ms(start), to_ms(end)), 8)


def raw_day_metadata(interval, day, symbol="BTCUSDT"):
    return RawStore(load_settings().raw_data_dir).metadata(interval, symbol, to_ms(day))


def findings(interval):
    return QualityReport(load_settings().raw_data_dir).read(interval).to_pylist()


# -- planning ---------------------------------------------------------------------------------
def test_whole_months_go_to_monthly_files_whole_days_to_daily_files_the_rest_to_rest():
    now = to_ms("2024-03-10T05:00Z")
    units = plan_units(to_ms("2024-01-15T12:00Z"), to_ms("2024-03-10T04:00Z"), now)
    kinds = [(u.kind, u.start_ms, u.end_ms) for u in units]
    assert kinds[0] == ("rest", to_ms("2024-01-15T12:00Z"), to_ms("2024-01-16"))
    assert ("daily", to_ms("2024-01-16"), to_ms("2024-01-17")) in kinds
    assert ("monthly", to_ms("2024-02-01"), to_ms("2024-03-01")) in kinds
    assert [u for u in units if u.kind == "daily" and u.start_ms >= to_ms("2024-03-01")][-1] == \
        Unit("daily", to_ms("2024-03-09"), to_ms("2024-03-10"))
    assert units[-1] == Unit("rest", to_ms("2024-03-10"), to_ms("2024-03-10T04:00Z"))  # today: not published yet
    # the units tile the window exactly
    assert all(a.end_ms == b.start_ms for a, b in zip(units, units[1:]))


def test_a_month_that_is_not_over_is_never_asked_for_as_a_monthly_file():
    now = to_ms("2024-03-31T23:00Z")
    units = plan_units(to_ms("2024-03-01"), to_ms("2024-03-31T23:00Z"), now)
    assert {u.kind for u in units} == {"daily", "rest"}
    assert month_spans(to_ms("2024-01-31"), to_ms("2024-03-02")) == [
        (to_ms("2024-01-31"), to_ms("2024-02-01")), (to_ms("2024-02-01"), to_ms("2024-03-01")),
        (to_ms("2024-03-01"), to_ms("2024-03-02"))]


# -- sources, end to end ----------------------------------------------------------------------
@pytest.mark.parametrize("interval", ["15m", "1h", "1d"])
def test_auto_gives_the_same_raw_as_rest_from_archive_files_with_their_checksum(data_env, sandbox, interval):
    start, end = "2024-01-01", "2024-03-04"
    auto = DataIngestion().ingest(interval, start, end, source="auto")
    truth = sandbox.truth("BTCUSDT", interval, to_ms(start), to_ms(end))
    assert stored(interval, start, end) == truth and auto.rows_added == len(truth)
    stats = sandbox.stats()
    assert stats["archive_by_kind"].get("monthly_zip") == 2  # January and February
    assert stats["by_endpoint"].get("/api/v3/klines", 0) <= 1  # the first-candle lookup only
    january = raw_day_metadata(interval, "2024-01-15")
    assert january["source"].endswith(f"/data/spot/monthly/klines/BTCUSDT/{interval}/BTCUSDT-{interval}-2024-01.zip")
    assert len(january["sha256"]) == 64
    march = raw_day_metadata(interval, "2024-03-02")
    assert march["source"].endswith(f"BTCUSDT-{interval}-2024-03-02.zip")


def test_rest_and_auto_store_identical_values(data_env, sandbox, tmp_path, monkeypatch):
    DataIngestion().ingest("1h", "2024-02-01", "2024-03-03", source="auto")
    from_archive = stored("1h", "2024-02-01", "2024-03-03")
    monkeypatch.setenv("RAW_DATA_DIR", str(tmp_path / "raw-rest"))
    DataIngestion().ingest("1h", "2024-02-01", "2024-03-03", source="rest")
    assert stored("1h", "2024-02-01", "2024-03-03") == from_archive
    assert raw_day_metadata("1h", "2024-02-10")["source"] == sandbox.url and "sha256" not in raw_day_metadata(
        "1h", "2024-02-10")


def test_microsecond_files_from_2025_give_the_same_raw_as_millisecond_rest(data_env, sandbox):
    start, end = "2024-12-01", "2025-02-01"  # December in ms, January in µs
    DataIngestion().ingest("15m", start, end, source="auto")
    assert stored("15m", start, end) == sandbox.truth("BTCUSDT", "15m", to_ms(start), to_ms(end))
    assert raw_day_metadata("15m", "2025-01-20")["source"].endswith("BTCUSDT-15m-2025-01.zip")


def test_a_header_row_is_tolerated(data_env, sandbox):
    sandbox.set_faults({"archive_header": True})
    DataIngestion().ingest("1h", "2024-01-01", "2024-02-01", source="archive")
    assert stored("1h", "2024-01-01", "2024-02-01") == sandbox.truth("BTCUSDT", "1h", to_ms("2024-01-01"),
                                                                     to_ms("2024-02-01"))


@pytest.mark.parametrize("fault", ["archive_wrong_checksum", "archive_corrupt"])
def test_a_refused_file_is_never_written_its_days_come_from_rest_and_it_is_reported(data_env, sandbox, fault):
    sandbox.set_faults({fault: ["BTCUSDT-1h-2024-02.zip"]})
    DataIngestion().ingest("1h", "2024-01-01", "2024-04-01", source="auto")
    assert stored("1h", "2024-01-01", "2024-04-01") == sandbox.truth("BTCUSDT", "1h", to_ms("2024-01-01"),
                                                                     to_ms("2024-04-01"))
    february = raw_day_metadata("1h", "2024-02-10")
    assert february["source"] == sandbox.url and "sha256" not in february  # from REST, not the bad file
    assert raw_day_metadata("1h", "2024-01-10")["source"].endswith("2024-01.zip")
    stats = sandbox.stats()
    assert stats["archive_by_kind"]["monthly_zip"] == 2 + 2  # the bad one fetched once more
    (finding,) = findings("1h")
    assert finding["kind"] == "archive_file_rejected" and finding["source"].endswith("BTCUSDT-1h-2024-02.zip")
    assert finding["field"] == ("checksum" if fault == "archive_wrong_checksum" else "corrupt")


def test_a_file_bad_once_is_used_after_one_more_fetch(data_env, sandbox):
    sandbox.set_faults({"archive_wrong_checksum": [{"file": "BTCUSDT-1h-2024-02.zip", "times": 1}]})
    DataIngestion().ingest("1h", "2024-02-01", "2024-03-01", source="auto")
    assert raw_day_metadata("1h", "2024-02-10")["source"].endswith("2024-02.zip")
    assert findings("1h") == []


def test_a_missing_month_falls_back_to_its_daily_files_then_to_rest(data_env, sandbox):
    sandbox.set_faults({"archive_missing": ["2024-02", "2024-02-10"]})
    DataIngestion().ingest("1h", "2024-01-01", "2024-04-01", source="auto")
    assert stored("1h", "2024-01-01", "2024-04-01") == sandbox.truth("BTCUSDT", "1h", to_ms("2024-01-01"),
                                                                     to_ms("2024-04-01"))
    assert raw_day_metadata("1h", "2024-02-09")["source"].endswith("BTCUSDT-1h-2024-02-09.zip")
    assert raw_day_metadata("1h", "2024-02-10")["source"] == sandbox.url
    assert raw_day_metadata("1h", "2024-03-10")["source"].endswith("BTCUSDT-1h-2024-03.zip")
    assert findings("1h") == []  # a missing file is no finding


def test_an_unpublished_month_is_served_by_daily_files(data_env, sandbox):
    sandbox.set_faults({"archive_unpublished_after": "2024-01"})
    DataIngestion().ingest("4h", "2024-01-01", "2024-03-01", source="auto")
    assert stored("4h", "2024-01-01", "2024-03-01") == sandbox.truth("BTCUSDT", "4h", to_ms("2024-01-01"),
                                                                     to_ms("2024-03-01"))
    assert raw_day_metadata("4h", "2024-02-20")["source"].endswith("BTCUSDT-4h-2024-02-20.zip")


def test_archive_alone_spends_no_rest_weight_and_lists_what_it_lacks(data_env, sandbox):
    sandbox.set_faults({"archive_missing": ["2024-02-01", "2024-02-02"]})  # two daily files
    summary = DataIngestion().ingest("1d", "2024-01-01", "2024-02-03", source="archive")
    assert sandbox.stats()["requests"] == 0  # not one REST request
    truth = sandbox.truth("BTCUSDT", "1d", to_ms("2024-01-01"), to_ms("2024-02-01"))
    assert stored("1d", "2024-01-01", "2024-02-03") == truth  # February's two days are not in the archive
    assert summary.not_in_archive == ["2024-02-01T00:00:00+00:00/2024-02-02T00:00:00+00:00",
                                      "2024-02-02T00:00:00+00:00/2024-02-03T00:00:00+00:00"]


def test_the_newest_archived_day_is_compared_with_rest_and_rest_wins(data_env, sandbox):
    from include.market_data.timeframes import now_ms

    today = now_ms() // DAY_MS * DAY_MS
    start = today - 3 * DAY_MS
    # the archive's copy of yesterday differs from REST in one candle's trade count
    sandbox.set_faults({"archive_revised": [{"open_time": today - DAY_MS + 3600_000, "field": "number_of_trades",
                                             "value": "12345"}]})
    DataIngestion().ingest("1h", start, today + 3600_000, source="auto")
    truth = sandbox.truth("BTCUSDT", "1h", start, today + 3600_000)
    assert stored("1h", start, today + 3600_000) == truth  # REST's values are stored for yesterday
    (finding,) = findings("1h")
    assert finding["kind"] == "archive_rest_mismatch" and finding["field"] == "number_of_trades"
    assert finding["found"] == "12345" and to_ms(finding["open_time"]) == today - DAY_MS + 3600_000


def test_an_unknown_source_is_refused_naming_it(data_env):
    with pytest.raises(InvalidInput, match="source='ftp'"):
        DataIngestion().ingest("1h", "2024-01-01", "2024-01-02", source="ftp")
