"""DataIngestion against the Binance sandbox over real HTTP."""

import asyncio
from datetime import datetime, timedelta, timezone

import pytest

from include.market_data.config import load_settings
from include.market_data.gaps import GapRegistry
from include.market_data.ingestion import DataIngestion, InvalidInput, WindowNotClosed, resolve_window
from include.market_data.schema import table_to_rows
from include.market_data.storage import RawStore
from include.market_data.timeframes import HOUR_MS, now_ms, to_ms, to_utc


def stored_rows(interval, start, end, symbol="BTCUSDT"):
    store = RawStore(load_settings().raw_data_dir)
    return table_to_rows(store.read(interval, symbol, to_ms(start), to_ms(end)), 8)


def partition_bytes(interval):
    root = RawStore(load_settings().raw_data_dir).root / interval
    return {p.name: p.read_bytes() for p in sorted(root.glob("*.parquet"))}


WINDOWS = {  # each crosses a UTC midnight; 1w crosses week boundaries (Mondays)
    "15m": ("2024-02-28T20:00Z", "2024-03-01T04:00Z"),
    "30m": ("2024-02-28T20:00Z", "2024-03-01T04:00Z"),
    "1h": ("2024-02-27T12:00Z", "2024-03-01T12:00Z"),
    "4h": ("2024-02-20", "2024-03-01"),
    "1d": ("2023-12-25", "2024-03-01"),
    "1w": ("2023-10-01", "2024-03-01"),
}


@pytest.mark.parametrize("interval", list(WINDOWS))
def test_ingested_rows_equal_the_sandbox_truth_exactly(data_env, sandbox, interval):
    start, end = WINDOWS[interval]
    summary = asyncio.run(DataIngestion().ingest_timeframe(interval, start, end))
    truth = sandbox.truth("BTCUSDT", interval, to_ms(start), to_ms(end))
    assert truth and stored_rows(interval, start, end) == truth
    assert summary.rows_added == len(truth) and summary.gaps_found == 0
    # nothing outside the half-open window
    assert stored_rows(interval, "2017-08-17", "2030-01-01") == truth


def test_rerunning_a_window_leaves_partitions_byte_identical(data_env, sandbox):
    ingestion = DataIngestion()
    ingestion.ingest("15m", "2024-02-29", "2024-03-02")
    before = partition_bytes("15m")
    again = ingestion.ingest("15m", "2024-02-29", "2024-03-02")
    assert again.rows_added == 0 and again.rows_revised == 0
    assert partition_bytes("15m") == before and len(before) == 2


def test_full_history_of_1d_pages_through_every_year(data_env, sandbox):
    summary = DataIngestion().ingest("1d", "2017-08-17", datetime.now(timezone.utc))
    truth = sandbox.truth("BTCUSDT", "1d", to_ms("2017-08-17"), now_ms())
    assert summary.pages >= 4 and len(truth) > 3000
    assert stored_rows("1d", "2017-08-17", "2100-01-01") == truth


def test_the_open_candle_is_never_written(data_env, sandbox):
    DataIngestion().ingest("15m", datetime.now(timezone.utc) - timedelta(hours=3), datetime.now(timezone.utc))
    rows = stored_rows("15m", "2017-08-17", "2100-01-01")
    assert rows and rows[-1][6] < now_ms()
    assert len(rows) in (11, 12)  # 3 h of closed 15m candles, depending on where now falls


def test_an_outage_is_recorded_as_a_known_gap_and_not_refetched_every_run(data_env, sandbox):
    """REST alone: the archive would serve the whole day from one daily file."""
    outage = (to_ms("2024-03-01T06:00Z"), to_ms("2024-03-01T09:00Z"))
    sandbox.set_faults({"outages": [{"start": outage[0], "end": outage[1]}]})
    ingestion = DataIngestion()
    first = ingestion.ingest("1h", "2024-03-01", "2024-03-02", source="rest")
    truth = sandbox.truth("BTCUSDT", "1h", to_ms("2024-03-01"), to_ms("2024-03-02"))
    assert len(truth) == 21 and stored_rows("1h", "2024-03-01", "2024-03-02") == truth
    assert (first.gaps_found, first.gaps_filled, first.known_gap_slots) == (3, 0, 3)
    gaps = GapRegistry(load_settings().raw_data_dir, "BTCUSDT", "1h").load()
    assert [(g.start_ms, g.end_ms, g.missing_slots, g.checks) for g in gaps] == [(*outage, 3, 1)]
    # a second run within the re-check delay does not ask Binance for the hole again
    sandbox.reset_stats()
    second = ingestion.ingest("1h", "2024-03-01", "2024-03-02", source="rest")
    assert second.gaps_found == 3 and second.known_gap_slots == 0
    assert sandbox.stats()["by_endpoint"]["/api/v3/klines"] == 1  # the window page only
    # once the re-check is due and Binance has the candles, the hole is filled and forgotten
    sandbox.clear_faults()
    later = ingestion.ingest("1h", "2024-03-01", "2024-03-02", now=now_ms() + 2 * HOUR_MS, source="rest")
    assert later.gaps_filled == 3
    assert len(stored_rows("1h", "2024-03-01", "2024-03-02")) == 24
    assert GapRegistry(load_settings().raw_data_dir, "BTCUSDT", "1h").load() == []


@pytest.mark.parametrize("kwargs, name", [
    ({"interval": "2h"}, "interval"),
    ({"symbol": "../../etc"}, "symbol"),
    ({"symbol": "btcusdt"}, "symbol"),
    ({"symbol": ""}, "symbol"),
    ({"start": "2024-03-02", "end": "2024-03-01"}, "start"),
    ({"end": "2999-01-01"}, "end"),
    ({"start": "2016-01-01"}, "INGEST_START"),
    ({"start": "next tuesday"}, "start"),
])
def test_bad_input_names_the_parameter_and_writes_nothing(data_env, sandbox, kwargs, name):
    args = {"interval": "1h", "start": "2024-03-01", "end": "2024-03-02", "symbol": "BTCUSDT", **kwargs}
    with pytest.raises(InvalidInput, match=name):
        DataIngestion().ingest(args["interval"], args["start"], args["end"], args["symbol"])
    assert not (data_env / "raw").exists() or not list((data_env / "raw").rglob("*.parquet"))
    assert sandbox.stats()["by_endpoint"].get("/api/v3/klines", 0) == 0


def test_window_clipping_and_retry_when_not_closed():
    settings = load_settings({})
    now = to_ms("2024-03-01T10:07Z")
    window = resolve_window("15m", "2024-03-01T09:00Z", "2024-03-01T10:07Z", settings=settings, now=now)
    assert (window.start_ms, window.end_ms) == (to_ms("2024-03-01T09:00Z"), to_ms("2024-03-01T10:00Z"))
    with pytest.raises(WindowNotClosed):
        resolve_window("1h", "2024-03-01T09:00Z", "2024-03-01T11:00Z", settings=settings,
                       now=to_ms("2024-03-01T10:59:59Z"), require_closed=True)
    aligned = resolve_window("1h", "2024-03-01T09:30", "2024-03-01T10:00", settings=settings, now=now)
    assert aligned.slots == 0  # the 09:00 candle opens before start: not in [09:30, 10:00)


def test_history_starts_at_the_first_candle_not_a_gap(data_env, sandbox):
    """BTCUSDT opened 2017-08-17 04:00: the 1w candle of that week (opening Monday 08-14) is
    ingested, and the hours before the listing are not recorded as an exchange outage."""
    weekly = DataIngestion().ingest("1w", "2017-08-14", "2017-09-04")
    truth = sandbox.truth("BTCUSDT", "1w", to_ms("2017-08-14"), to_ms("2017-09-04"))
    assert truth[0][0] == to_ms("2017-08-14") and stored_rows("1w", "2017-08-14", "2017-09-04") == truth
    assert weekly.gaps_found == 0
    hourly = DataIngestion().ingest("1h", "2017-08-17", "2017-08-18")
    assert hourly.candles_fetched == 20 and hourly.gaps_found == 0
    assert GapRegistry(load_settings().raw_data_dir, "BTCUSDT", "1h").load() == []


def test_a_scheduled_run_after_airflow_was_down_longer_than_the_lookback_catches_up(data_env, sandbox):
    from include.market_data import pipeline

    DataIngestion().ingest("1h", "2024-02-20", "2024-02-25")  # then Airflow is down for 5 days
    now = to_ms("2024-03-01T00:00:30Z")
    fetched = pipeline.fetch("1h", "BTCUSDT", to_utc("2024-02-29T23:00Z"), to_utc("2024-03-01T00:00Z"), {},
                             "scheduled_x", now=now)
    assert fetched["lookback_days"] == 3
    checked = pipeline.check_gaps(fetched, now=now)
    assert checked["checked_start_ms"] == to_ms("2024-02-25")  # not 02-26: resumes after the newest
    pipeline.write_raw(checked, now=now)
    truth = sandbox.truth("BTCUSDT", "1h", to_ms("2024-02-20"), to_ms("2024-03-01"))
    assert stored_rows("1h", "2024-02-20", "2024-03-01") == truth and len(truth) == 10 * 24


def test_a_run_refuses_symbols_outside_binance_symbols(data_env, sandbox):
    from airflow.sdk.exceptions import AirflowFailException

    from include.market_data import pipeline

    with pytest.raises(AirflowFailException, match=r"symbols \['ETHUSDT'\] are not in BINANCE_SYMBOLS"):
        pipeline.plan("1h", None, None, {"start": "2024-03-01", "end": "2024-03-02", "symbols": ["ETHUSDT"]})
    with pytest.raises(AirflowFailException, match=r"symbols \['ETHUSDT'\] are not in BINANCE_SYMBOLS"):
        pipeline.fetch("1h", "ETHUSDT", None, None, {"start": "2024-03-01", "end": "2024-03-02"}, "m")
    assert sandbox.stats()["by_endpoint"].get("/api/v3/klines", 0) == 0


def damage_day_file(interval, day, symbol="BTCUSDT") -> RawStore:
    """Overwrite one stored day file with bytes that do not parse (the next read quarantines it)."""
    store = RawStore(load_settings().raw_data_dir)
    store.path(interval, symbol, to_ms(day)).write_bytes(b"not parquet")
    return store


def _scheduled_run(interval, start, end, now):
    from include.market_data import pipeline

    fetched = pipeline.fetch(interval, "BTCUSDT", to_utc(start), to_utc(end), {}, f"scheduled_{start}", now=now)
    checked = pipeline.check_gaps(fetched, now=now)
    pipeline.write_raw(checked, now=now)
    return checked


def test_a_scheduled_run_refetches_a_quarantined_day_outside_its_lookback(data_env, sandbox):
    DataIngestion().ingest("1h", "2024-02-01", "2024-03-01")
    store = damage_day_file("1h", "2024-02-10")
    assert store.read("1h", "BTCUSDT", to_ms("2024-02-10"), to_ms("2024-02-11")).num_rows == 0  # quarantined
    assert store.quarantined_days("1h", "BTCUSDT") == [to_ms("2024-02-10")]
    checked = _scheduled_run("1h", "2024-02-29T23:00Z", "2024-03-01T00:00Z", now=to_ms("2024-03-01T00:00:30Z"))
    assert checked["gaps_found"] == 24 and checked["gaps_filled"] == 24
    truth = sandbox.truth("BTCUSDT", "1h", to_ms("2024-02-01"), to_ms("2024-03-01"))
    assert stored_rows("1h", "2024-02-01", "2024-03-01") == truth
    assert store.quarantined_days("1h", "BTCUSDT") == []


def test_an_old_known_gap_is_rechecked_when_due_even_outside_the_lookback(data_env, sandbox):
    outage = (to_ms("2024-02-10T06:00Z"), to_ms("2024-02-10T08:00Z"))
    sandbox.set_faults({"outages": [{"start": outage[0], "end": outage[1]}]})
    DataIngestion().ingest("1h", "2024-02-01", "2024-03-01", now=to_ms("2024-03-01T00:00:30Z"))
    registry = GapRegistry(load_settings().raw_data_dir, "BTCUSDT", "1h")
    assert [(g.start_ms, g.end_ms) for g in registry.load()] == [outage]
    sandbox.clear_faults()  # Binance publishes the candles after all
    not_due = _scheduled_run("1h", "2024-02-29T23:00Z", "2024-03-01T00:00Z", now=to_ms("2024-03-01T00:10Z"))
    assert not_due["gaps_found"] == 0 and registry.load()  # first re-check is due an hour later
    due = _scheduled_run("1h", "2024-03-01T00:00Z", "2024-03-01T01:00Z", now=to_ms("2024-03-01T01:00:40Z"))
    assert due["gaps_found"] == 2 and due["gaps_filled"] == 2 and registry.load() == []
    assert len(stored_rows("1h", "2024-02-01", "2024-03-01")) == 29 * 24


def test_staging_left_by_a_failed_run_is_removed_after_two_days(data_env, sandbox):
    import os
    import time

    from include.market_data import pipeline
    from include.market_data.ingestion import staging_root

    root = staging_root(load_settings()) / "1h"
    abandoned, recent = root / "manual__failed_long_ago", root / "manual__still_running"
    for run_dir in (abandoned, recent):
        run_dir.mkdir(parents=True)
        (run_dir / "BTCUSDT_fetch.parquet").write_bytes(b"partial")
    three_days_ago = time.time() - 3 * 86_400
    for path in (abandoned / "BTCUSDT_fetch.parquet", abandoned):  # nothing in it changed for three days
        os.utime(path, (three_days_ago, three_days_ago))
    pipeline.fetch("1h", "BTCUSDT", None, None, {"start": "2024-03-01", "end": "2024-03-01T02:00Z"}, "manual__now")
    assert not abandoned.exists() and recent.exists() and (root / "manual__now").exists()


# --- issue 11: correctness under real use ----------------------------------------------------


def test_a_quarantined_day_partly_rewritten_is_still_refetched_whole(data_env, sandbox):
    """A manual 2-hour window touching a quarantined day must not leave the rest of the day lost."""
    DataIngestion().ingest("1h", "2024-02-09", "2024-02-12")
    store = damage_day_file("1h", "2024-02-10")
    assert store.read("1h", "BTCUSDT", to_ms("2024-02-10"), to_ms("2024-02-11")).num_rows == 0  # quarantined
    assert store.quarantined_days("1h", "BTCUSDT") == [to_ms("2024-02-10")]
    # the first writer after the quarantine asks for two hours of that day only
    DataIngestion().ingest("1h", "2024-02-10T10:00Z", "2024-02-10T12:00Z")
    truth = sandbox.truth("BTCUSDT", "1h", to_ms("2024-02-09"), to_ms("2024-02-12"))
    assert stored_rows("1h", "2024-02-09", "2024-02-12") == truth and len(truth) == 72
    assert store.quarantined_days("1h", "BTCUSDT") == []  # whole again: off the record


def test_a_quarantined_day_stays_on_the_record_until_whole_and_any_run_refetches_it(data_env, sandbox):
    DataIngestion().ingest("1h", "2024-02-10", "2024-02-11")
    store = damage_day_file("1h", "2024-02-10")
    store.read_day("1h", "BTCUSDT", to_ms("2024-02-10"))
    # Binance is down for the refetch: a partial day is written, the day stays on the record
    sandbox.set_faults({"outages": [{"start": to_ms("2024-02-10T05:00Z"), "end": to_ms("2024-02-11")}]})
    DataIngestion().ingest("1h", "2024-03-01", "2024-03-01T01:00Z", now=to_ms("2024-03-02"))  # another window
    assert len(stored_rows("1h", "2024-02-10", "2024-02-11")) == 5
    # the outage is a known gap now, so the day counts as whole: every slot is back or a known gap
    assert store.quarantined_days("1h", "BTCUSDT") == []
    assert [(g.start_ms, g.end_ms) for g in GapRegistry(load_settings().raw_data_dir, "BTCUSDT", "1h").load()] == [
        (to_ms("2024-02-10T05:00Z"), to_ms("2024-02-11"))]


def test_a_symbol_listed_after_ingest_start_has_no_gap_before_its_first_candle(data_env, tmp_path, monkeypatch):
    """The first candle is looked up once (klines?startTime=0&limit=1) and kept with the gap
    registry: nothing before it is requested or recorded as a gap."""
    from include.binance_sandbox import SandboxServer
    from include.market_data.gaps import SeriesState

    truth = [row for row in _late_listing_rows()]
    replay = tmp_path / "replay"
    replay.mkdir()
    (replay / "NEWCOINUSDT-1h-2024-03.csv").write_text("\n".join(",".join(map(str, r)) for r in truth) + "\n")
    with SandboxServer(host="127.0.0.1", port=0, replay=str(replay)) as late:
        monkeypatch.setenv("AIRFLOW_CONN_BINANCE_DEFAULT", f'{{"conn_type": "http", "host": "{late.url}"}}')
        monkeypatch.setenv("BINANCE_SYMBOLS", "NEWCOINUSDT")
        first = DataIngestion().ingest("1h", "2023-01-01", "2024-03-03", source="rest")
        assert first.gaps_found == 0 and first.rows_added == 48
        requests_first = late.stats()["by_endpoint"]["/api/v3/klines"]
        assert requests_first == 2  # the first-candle lookup and one page from the listing on, not a year of pages
        assert GapRegistry(load_settings().raw_data_dir, "NEWCOINUSDT", "1h").load() == []
        assert SeriesState(load_settings().raw_data_dir, "NEWCOINUSDT", "1h").first_open_ms == to_ms("2024-03-01")
        again = DataIngestion().ingest("1h", "2023-06-01", "2024-03-03", source="rest")
        assert again.gaps_found == 0
        assert late.stats()["by_endpoint"]["/api/v3/klines"] == requests_first + 1  # looked up once only
    assert stored_rows("1h", "2023-01-01", "2024-03-03", symbol="NEWCOINUSDT") == truth


def _late_listing_rows():
    """48 hourly candles of a symbol listed 2024-03-01 00:00 UTC, in Binance's archive CSV shape."""
    rows = []
    for hour in range(48):
        open_ms = to_ms("2024-03-01") + hour * HOUR_MS
        rows.append([open_ms, "1.00000000", "1.20000000", "0.90000000", "1.10000000", "10.00000000",
                     open_ms + HOUR_MS - 1, "11.00000000", 5, "4.00000000", "4.40000000", "0"])
    return rows


def test_storage_refuses_an_open_candle_whatever_the_source(data_env):
    from include.market_data.schema import rows_to_table
    from include.market_data.storage import OpenCandleRefused

    store = RawStore(load_settings().raw_data_dir)
    now = to_ms("2024-03-01T10:30Z")
    closed = [to_ms("2024-03-01T09:00Z"), "1", "2", "0.5", "1.5", "3", to_ms("2024-03-01T10:00Z") - 1, "4", 1, "1", "1", "0"]
    still_open = [to_ms("2024-03-01T10:00Z"), "1", "2", "0.5", "1.5", "3", to_ms("2024-03-01T11:00Z") - 1, "4", 1, "1", "1", "0"]
    with pytest.raises(OpenCandleRefused, match="2024-03-01T10:00:00"):
        store.write("1h", "BTCUSDT", rows_to_table([closed, still_open]), {"source": "test"}, now=now)
    assert store.days("1h", "BTCUSDT") == []  # nothing written, not even the closed row
    store.write("1h", "BTCUSDT", rows_to_table([closed]), {"source": "test"}, now=now)
    assert store.read("1h", "BTCUSDT", 0, now).num_rows == 1


def test_the_seed_api_follows_binance_symbols(data_env, sandbox, monkeypatch):
    from include.market_data.curation import DataCuration

    monkeypatch.setenv("BINANCE_SYMBOLS", "ETHUSDT")
    summary = asyncio.run(DataIngestion().ingest_timeframe("1h", "2024-03-01", "2024-03-02"))
    assert summary.symbol == "ETHUSDT" and summary.rows_added == 24
    assert stored_rows("1h", "2024-03-01", "2024-03-02", symbol="ETHUSDT") == sandbox.truth(
        "ETHUSDT", "1h", to_ms("2024-03-01"), to_ms("2024-03-02"))
    curated = DataCuration().curate_timeframe("1h")
    assert curated.symbol == "ETHUSDT" and curated.rows == 24
    sandbox.reset_stats()
    with pytest.raises(InvalidInput, match=r"symbol='BTCUSDT' is not in BINANCE_SYMBOLS \(ETHUSDT\)"):
        DataIngestion().ingest("1h", "2024-03-01", "2024-03-02", "BTCUSDT")
    assert sandbox.stats()["by_endpoint"].get("/api/v3/klines", 0) == 0


def test_a_row_breaking_the_row_contract_leaves_a_hole_and_the_rest_is_written(data_env, sandbox, monkeypatch):
    """The hook and the raw schema share one row contract: a row Binance serves with taker buy
    volume above volume is reported and left out, the rest of the window is written, and the slot
    is a hole re-checked like any other (not a whole run refused and retried for nothing)."""
    from tests.plugins.test_binance_hook import ScriptedServer

    bad_open = to_ms("2024-03-01T05:00Z")

    def taker_above_volume(rows):
        for row in rows:
            if row[0] == bad_open:
                row[9] = f"{float(row[5]) + 1:.8f}"
        return rows

    with ScriptedServer(sandbox.url, rewrite=taker_above_volume) as server:
        monkeypatch.setenv("AIRFLOW_CONN_BINANCE_DEFAULT", f'{{"conn_type": "http", "host": "{server.url}"}}')
        summary = DataIngestion().ingest("1h", "2024-03-01", "2024-03-02", source="rest")
    truth = sandbox.truth("BTCUSDT", "1h", to_ms("2024-03-01"), to_ms("2024-03-02"))
    assert stored_rows("1h", "2024-03-01", "2024-03-02") == [row for row in truth if row[0] != bad_open]
    assert summary.gaps_found == 1 and summary.known_gap_slots == 1
    gaps = GapRegistry(load_settings().raw_data_dir, "BTCUSDT", "1h").load()
    assert [(g.start_ms, g.end_ms) for g in gaps] == [(bad_open, bad_open + HOUR_MS)]


def test_a_known_gap_across_a_month_boundary_is_forgotten_once_binance_has_it(data_env, sandbox):
    """Windows are checked a month at a time: a hole spanning midnight of a month's end is still
    recorded as one known gap, and forgotten when a later run finds every slot of it."""
    outage = (to_ms("2024-02-29T22:00Z"), to_ms("2024-03-01T02:00Z"))
    sandbox.set_faults({"outages": [{"start": outage[0], "end": outage[1]}]})
    first = DataIngestion().ingest("1h", "2024-02-28", "2024-03-03", source="rest")
    assert first.known_gap_slots == 4
    registry = GapRegistry(load_settings().raw_data_dir, "BTCUSDT", "1h")
    assert [(g.start_ms, g.end_ms, g.missing_slots) for g in registry.load()] == [(*outage, 4)]
    sandbox.clear_faults()
    DataIngestion().ingest("1h", "2024-02-28", "2024-03-03", source="rest", now=now_ms() + 2 * HOUR_MS)
    assert registry.load() == []
    assert stored_rows("1h", "2024-02-28", "2024-03-03") == sandbox.truth("BTCUSDT", "1h", to_ms("2024-02-28"),
                                                                         to_ms("2024-03-03"))
