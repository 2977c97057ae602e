"""The task bodies of binance_klines_<interval> (include/market_data/pipeline.py) against the sandbox."""

import os
import time

import pytest

from include.market_data import gaps, ingestion, pipeline
from include.market_data.config import load_settings
from include.market_data.ingestion import KlineBatch
from include.market_data.schema import table_to_rows
from include.market_data.storage import RawStore
from include.market_data.timeframes import to_ms, to_utc


def raw_files(interval="1h"):
    root = RawStore(load_settings().raw_data_dir).root / interval
    return {p.name: p.read_bytes() for p in sorted(root.glob("*.parquet"))}


def stored(interval, start, end, symbol="BTCUSDT"):
    return table_to_rows(RawStore(load_settings().raw_data_dir).read(interval, symbol, to_ms(start), to_ms(end)), 8)


def run_tasks(interval, start, end, run_id, now):
    fetched = pipeline.fetch(interval, "BTCUSDT", to_utc(start), to_utc(end), {}, run_id, now=now)
    checked = pipeline.check_gaps(fetched, now=now)
    written = pipeline.write_raw(checked, now=now)
    return fetched, checked, written


def test_cleared_gap_check_and_write_raw_of_a_succeeded_run_redo_their_work(data_env, sandbox):
    """write_raw removed the run's staging; clearing gap_check or write_raw refetches it and
    leaves the very same files."""
    outage = (to_ms("2024-02-29T03:00Z"), to_ms("2024-02-29T05:00Z"))
    sandbox.set_faults({"outages": [{"start": outage[0], "end": outage[1]}]})
    now = to_ms("2024-03-01T00:00:30Z")
    fetched, checked, _ = run_tasks("1h", "2024-02-29T23:00Z", "2024-03-01T00:00Z", "scheduled__a", now)
    assert checked["refetched_ranges"] and not os.path.exists(fetched["path"])  # staging gone after write_raw
    before = raw_files()
    again_checked = pipeline.check_gaps(fetched, now=now)  # cleared gap_check
    # the window is refetched; only the known gap is missing, and its re-check is not due yet
    assert again_checked["gaps_found"] == checked["known_gap_slots"] == 2 and not again_checked["refetched_ranges"]
    again_written = pipeline.write_raw(again_checked, now=now)  # and the write_raw after it
    assert again_written["rows_added"] == again_written["rows_revised"] == 0 and raw_files() == before
    pipeline.write_raw(checked, now=now)  # write_raw cleared alone: both staging files are gone
    assert raw_files() == before
    truth = sandbox.truth("BTCUSDT", "1h", to_ms("2024-02-27"), to_ms("2024-03-01"))  # the outage left out
    assert stored("1h", "2024-02-27", "2024-03-01") == truth and len(truth) == 3 * 24 - 2


def test_a_cleared_task_of_a_failed_run_older_than_two_days_redoes_its_work(data_env, sandbox):
    now = to_ms("2024-03-01T00:00:30Z")
    fetched = pipeline.fetch("1h", "BTCUSDT", to_utc("2024-02-29T23:00Z"), to_utc("2024-03-01T00:00Z"), {},
                             "scheduled__old", now=now)
    run_dir = os.path.dirname(os.path.dirname(fetched["path"]))
    four_days_ago = time.time() - 4 * 86_400
    for dirpath, _, files in os.walk(run_dir):
        for name in files + [""]:
            os.utime(os.path.join(dirpath, name) if name else dirpath, (four_days_ago, four_days_ago))
    # the run failed; days later another run's fetch cleans abandoned staging ...
    pipeline.fetch("1h", "BTCUSDT", None, None, {"start": "2024-02-01", "end": "2024-02-01T01:00Z"}, "manual__x")
    assert not os.path.exists(run_dir)
    # ... and the old run's gap_check and write_raw are cleared and run again
    checked = pipeline.check_gaps(fetched, now=now)
    pipeline.write_raw(checked, now=now)
    assert stored("1h", "2024-02-27", "2024-03-01") == sandbox.truth("BTCUSDT", "1h", to_ms("2024-02-27"),
                                                                     to_ms("2024-03-01"))


def test_a_manual_run_without_params_ingests_its_data_interval_and_params_win(data_env, sandbox, caplog):
    """A data interval given in the trigger form ("Specify Manually") is the window; start/end
    params, when given, win, and the fetch log says which was used."""
    given = pipeline.fetch("1h", "BTCUSDT", to_utc("2024-02-01"), to_utc("2024-02-04"), {}, "manual__given")
    assert (given["start_ms"], given["end_ms"], given["window_from"]) == (to_ms("2024-02-01"), to_ms("2024-02-04"),
                                                                          "data_interval")
    assert given["candles"] == 72
    params = pipeline.fetch("1h", "BTCUSDT", to_utc("2024-02-01"), to_utc("2024-02-04"),
                            {"start": "2024-03-01", "end": "2024-03-01T05:00Z"}, "manual__params")
    assert (params["start_ms"], params["end_ms"], params["window_from"]) == (to_ms("2024-03-01"),
                                                                             to_ms("2024-03-01T05:00Z"), "params")


def test_fetch_waits_for_a_last_candle_about_to_close_instead_of_failing(data_env, sandbox, monkeypatch):
    waited = []
    monkeypatch.setattr(pipeline, "_sleep", waited.append)
    early = to_ms("2024-03-01T00:00Z") - 20_000  # the scheduler ran 20 s before the candle closed
    fetched = pipeline.fetch("1h", "BTCUSDT", to_utc("2024-02-29T23:00Z"), to_utc("2024-03-01T00:00Z"), {},
                             "scheduled__early", now=early)
    assert waited == [pytest.approx(21.0)] and fetched["candles"] == 1
    with pytest.raises(Exception, match="not closed yet"):  # far off: an error, not an hour of retries
        pipeline.fetch("1h", "BTCUSDT", to_utc("2024-02-29T23:00Z"), to_utc("2024-03-01T00:00Z"), {},
                       "scheduled__far", now=to_ms("2024-02-29T23:10Z"))


class _PublishesLate:
    """A source whose newest candle appears only on the third ask (Binance publishing late)."""

    def __init__(self, rows):
        self.rows, self.asks = rows, 0

    def batches(self, symbol, interval, start_ms, end_ms):
        self.asks += 1
        rows = [r for r in self.rows if start_ms <= r[0] < end_ms and (self.asks >= 3 or r[0] < self.rows[-1][0])]
        yield KlineBatch(rows, "http://late", "/api/v3/klines", "2024-03-01T00:00:01.000+00:00", 1.0)

    def first_open_ms(self, symbol, interval):
        return None

    def symbol_status(self, symbol):
        return "TRADING"


def test_gap_check_polls_for_just_closed_candles_inside_the_task(data_env, sandbox, monkeypatch):
    monkeypatch.setattr(gaps, "_sleep", lambda s: None)  # the gap check's bounded poll lives in gaps
    clock = iter(range(0, 10_000, 10))
    monkeypatch.setattr(gaps, "_monotonic", lambda: next(clock))
    rows = sandbox.truth("BTCUSDT", "1h", to_ms("2024-02-29T22:00Z"), to_ms("2024-03-01T00:00Z"))
    source = _PublishesLate(rows)
    now = to_ms("2024-03-01T00:00:05Z")
    fetched = pipeline.fetch("1h", "BTCUSDT", None, None, {"start": "2024-02-29T22:00Z", "end": "2024-02-29T23:59Z"},
                             "manual__late", source=source, now=now)
    fetched["end_ms"] = to_ms("2024-03-01T00:00Z")  # the window ends at the candle just closed
    checked = pipeline.check_gaps(fetched, source=source, now=now)
    assert checked["known_gap_slots"] == 0  # no outage recorded: it arrived while the task waited
    pipeline.write_raw(checked, source=source, now=now)
    assert stored("1h", "2024-02-29T22:00Z", "2024-03-01") == rows


def test_fetch_warns_when_a_symbol_is_not_trading(capsys):
    class OnBreak(_PublishesLate):
        def symbol_status(self, symbol):
            return "BREAK"

    assert pipeline.warn_unless_trading(OnBreak([]), "BTCUSDT", "1h") == "BREAK"
    (line,) = [line for line in capsys.readouterr().out.splitlines() if "symbol not trading" in line]
    assert "symbol=BTCUSDT" in line and "symbol_status=BREAK" in line and "warning" in line


def test_abandoned_staging_is_removed_on_object_stores_too(object_store):
    from dataclasses import replace

    url, memory, bucket = object_store
    settings = replace(load_settings({}), raw_data_dir=f"{url}/raw")
    run_dir = ingestion.staging_root(settings) / "1h" / "scheduled__failed"
    (run_dir / "BTCUSDT").mkdir(parents=True, exist_ok=True)
    (run_dir / "BTCUSDT" / "fetch.parquet").write_bytes(b"partial")
    pipeline._drop_abandoned_staging(settings, "1h", now_s=time.time() + 3600)  # an hour later: kept
    assert memory.exists(f"{bucket}/raw/_staging/1h/scheduled__failed/BTCUSDT/fetch.parquet")
    pipeline._drop_abandoned_staging(settings, "1h", now_s=time.time() + 3 * 86_400)  # three days later
    assert not memory.exists(f"{bucket}/raw/_staging/1h/scheduled__failed/BTCUSDT/fetch.parquet")


def test_report_fails_the_run_when_a_symbol_or_the_curation_is_missing():
    from airflow.sdk.exceptions import AirflowFailException

    written = [{"symbol": "BTCUSDT", "days": []}, {"symbol": "ETHUSDT", "days": []}]
    assert pipeline.report("1h", ["BTCUSDT", "ETHUSDT"], written, {"symbols": []})["symbols"] == ["BTCUSDT", "ETHUSDT"]
    assert pipeline.report("1h", ["BTCUSDT"], written[0], {"symbols": []})["symbols"] == ["BTCUSDT"]  # a lone result
    with pytest.raises(AirflowFailException, match="not ingested this run: ETHUSDT"):
        pipeline.report("1h", ["BTCUSDT", "ETHUSDT"], written[:1], {"symbols": []})
    with pytest.raises(AirflowFailException, match="written but not curated"):
        pipeline.report("1h", ["BTCUSDT", "ETHUSDT"], written, None)  # curate failed
    with pytest.raises(AirflowFailException, match="not planned"):
        pipeline.report("1h", None, None, None)  # plan failed
