"""DataSignal on real pipeline data: sandbox klines -> DataIngestion -> DataCuration -> signal files.

One module-wide "golden" data set holds exactly what is closed at the 2024-03-01 12:00 UTC
cutoff: 70 days of 1d, 10.5 days of 4h and 1h. Each test gets its own copy under
``data_env``'s directories, so tests may add or delete candles freely.
"""

from __future__ import annotations

import io
import json
import shutil
from datetime import date, datetime, timedelta, timezone

import pandas as pd
import pytest

from include.market_data import observability
from include.market_data.config import load_settings
from include.market_data.curation import DataCuration
from include.market_data.ingestion import DataIngestion
from include.market_data.signal import JSON_KEYS, SIGNALS_TABLE, DataSignal
from include.market_data.signal_rule import SIGNAL_INTERVALS

SYMBOL = "BTCUSDT"
DAY = date(2024, 3, 1)
CUTOFF = datetime(2024, 3, 1, 12, tzinfo=timezone.utc)
MIDNIGHT = datetime(2024, 3, 1, tzinfo=timezone.utc)
NOW_1 = datetime(2024, 3, 1, 12, 0, 5, tzinfo=timezone.utc)
NOW_2 = datetime(2024, 3, 1, 12, 7, 30, tzinfo=timezone.utc)
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _ingest_and_curate(settings, windows) -> None:
    ingestion, curation = DataIngestion(settings), DataCuration(settings)
    for interval, start, end in windows:
        summary = ingestion.ingest(interval, start, end, SYMBOL)
        assert summary.candles_fetched > 0
        curation.curate_timeframe(interval, SYMBOL, start=start, end=end)


@pytest.fixture(scope="module")
def golden(tmp_path_factory, sandbox):
    """Raw + curated candles closed at the DAY cutoff, ingested once from the sandbox."""
    root = tmp_path_factory.mktemp("signal_golden")
    sandbox.clear_faults()
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("RAW_DATA_DIR", str(root / "raw"))
        patch.setenv("CURATED_DATA_DIR", str(root / "curated"))
        patch.setenv("AIRFLOW_CONN_BINANCE_DEFAULT", f'{{"conn_type": "http", "host": "{sandbox.url}"}}')
        start_fast = MIDNIGHT - timedelta(days=10)
        _ingest_and_curate(load_settings(), [
            ("1d", MIDNIGHT - timedelta(days=70), MIDNIGHT),
            ("4h", start_fast, CUTOFF),
            ("1h", start_fast, CUTOFF),
        ])
    return root


@pytest.fixture
def market(data_env, golden):
    """``data_env`` holding a private copy of the golden raw and curated data."""
    for name in ("raw", "curated"):
        shutil.copytree(golden / name, data_env / name)
    return data_env


@pytest.fixture
def metrics(monkeypatch):
    """The ``signal.*`` counters incremented during the test, in order."""
    names: list[str] = []
    monkeypatch.setattr(observability, "incr",
                        lambda name, count=1: names.append(name) if name.startswith("signal.") else None)
    return names


def _without_generated_at(signal: dict) -> dict:
    return {k: v for k, v in signal.items() if k != "generated_at"}


def _read_json(path) -> dict:
    return json.loads(path.read_text())


# --- an ok signal ------------------------------------------------------------------------------


def test_signal_is_written_and_deterministic(market, metrics):
    signals = DataSignal()
    first = signals.generate(DAY, now=NOW_1)
    json_path = market / "signals" / "signal_20240301.json"
    png_path = market / "signals" / "signal_20240301.png"
    assert _read_json(json_path) == first
    assert tuple(first) == JSON_KEYS
    assert first["date"] == "2024-03-01"
    assert first["generated_at"] == "2024-03-01T12:00:05.000Z"
    assert first["symbol"] == SYMBOL
    assert first["status"] == "ok" and first["reason"] is None
    assert first["direction"] in ("long", "short", "flat")
    assert 0.0 <= first["confidence"] <= 1.0
    # The newest candles closed before 12:00: 1h 11:00, 4h 08:00, 1d the day before.
    assert first["as_of"] == "2024-03-01T11:59:59.999Z"
    assert first["inputs"]["1h"]["open_time"] == "2024-03-01T11:00:00.000Z"
    assert first["inputs"]["4h"]["open_time"] == "2024-03-01T08:00:00.000Z"
    assert first["inputs"]["1d"]["open_time"] == "2024-02-29T00:00:00.000Z"
    assert first["lag_seconds"] == {"1d": 0.0, "4h": 0.0, "1h": 0.0}
    assert set(first["factors"]) >= {"trend_1d", "momentum_4h", "vwap_1h", "pivot_1h", "volatility_regime"}
    assert first["entry"] == first["inputs"]["1h"]["close"]
    if first["direction"] == "long":
        assert first["stop_loss"] < first["entry"] < first["take_profit"]
    elif first["direction"] == "short":
        assert first["take_profit"] < first["entry"] < first["stop_loss"]
    else:
        assert first["stop_loss"] is None and first["take_profit"] is None
    png_first = png_path.read_bytes()

    # Same curated data in -> same signal out, also after re-curating all of it from raw
    # and from a fresh DataSignal; only generated_at may differ.
    curation = DataCuration()
    for interval in SIGNAL_INTERVALS:
        curation.curate_timeframe(interval, SYMBOL)
    second = DataSignal().generate("2024-03-01", now=NOW_2)
    assert second["generated_at"] == "2024-03-01T12:07:30.000Z"
    assert _without_generated_at(second) == _without_generated_at(first)
    assert _read_json(json_path) == second
    assert png_path.read_bytes() == png_first
    assert metrics == ["signal.generated", "signal.generated"]


def test_candles_closing_after_the_cutoff_change_nothing(market, metrics):
    before = DataSignal().generate(DAY, now=NOW_1)
    png_before = (market / "signals" / "signal_20240301.png").read_bytes()
    freshness_before = DataSignal().freshness(DAY).as_dict()

    # The rest of the day arrives: the 12:00..23:00 1h candles, 12:00..20:00 4h candles and
    # the 1d candle of DAY itself (it opened before the cutoff but closes after it).
    next_midnight = MIDNIGHT + timedelta(days=1)
    _ingest_and_curate(load_settings(), [
        ("1h", CUTOFF, next_midnight), ("4h", CUTOFF, next_midnight), ("1d", MIDNIGHT, next_midnight),
    ])
    curation = DataCuration()
    for interval in SIGNAL_INTERVALS:
        rows = curation.read(interval, SYMBOL, MIDNIGHT, next_midnight)
        assert (rows["close_time"] > pd.Timestamp(CUTOFF)).any(), interval

    after = DataSignal().generate(DAY, now=NOW_2)
    assert _without_generated_at(after) == _without_generated_at(before)
    assert DataSignal().freshness(DAY).as_dict() == freshness_before
    assert (market / "signals" / "signal_20240301.png").read_bytes() == png_before


# --- stale inputs ------------------------------------------------------------------------------


def test_stale_1h_gives_a_stale_signal_without_direction(market, metrics):
    # The curated 1h day of DAY is missing: the newest 1h candle is 2024-02-29 23:00.
    (market / "curated" / "1h_curated_20240301.parquet").unlink()
    signals = DataSignal()

    check = signals.freshness(DAY)
    assert not check.fresh
    one_hour = check.timeframes["1h"]
    assert one_hour.expected_open_ms == int(datetime(2024, 3, 1, 11, tzinfo=timezone.utc).timestamp() * 1000)
    assert one_hour.newest_open_ms == int(datetime(2024, 2, 29, 23, tzinfo=timezone.utc).timestamp() * 1000)
    assert one_hour.lag_seconds == 12 * 3600
    assert check.timeframes["4h"].fresh and check.timeframes["1d"].fresh

    signal = signals.generate(DAY, now=NOW_1)
    assert tuple(signal) == JSON_KEYS
    assert signal["status"] == "stale_data"
    assert signal["direction"] is None
    assert signal["confidence"] is None and signal["entry"] is None
    assert signal["stop_loss"] is None and signal["take_profit"] is None
    assert "1h" in signal["reason"] and "12:00:00 behind" in signal["reason"]
    assert "4h" not in signal["reason"] and "1d" not in signal["reason"]
    assert signal["lag_seconds"] == {"1d": 0.0, "4h": 0.0, "1h": 43200.0}
    assert signal["inputs"]["1h"]["open_time"] == "2024-02-29T23:00:00.000Z"
    assert signal["as_of"] == "2024-03-01T11:59:59.999Z"  # the 4h candle, the newest seen
    assert _read_json(market / "signals" / "signal_20240301.json") == signal
    assert (market / "signals" / "signal_20240301.png").read_bytes().startswith(PNG_MAGIC)
    assert metrics == ["signal.stale"]


def test_a_day_without_its_data_is_stale_in_every_timeframe(market, metrics):
    # Data ends at the DAY cutoff: for the next day every timeframe is one day behind.
    signal = DataSignal().generate(DAY + timedelta(days=1), now=NOW_1 + timedelta(days=1))
    assert signal["status"] == "stale_data" and signal["direction"] is None
    assert signal["lag_seconds"] == {"1d": 86400.0, "4h": 86400.0, "1h": 86400.0}
    assert "1 day behind" in signal["reason"]
    assert (market / "signals" / "signal_20240302.json").exists()
    assert metrics == ["signal.stale"]


def test_no_data_and_short_history_are_stale(market, metrics):
    # 2024-01-15: 24 daily candles (from 2023-12-22; the rule needs 50), no 4h or 1h candle at all.
    signal = DataSignal().generate("2024-01-15", now=NOW_1)
    assert signal["status"] == "stale_data" and signal["direction"] is None
    assert signal["inputs"]["1h"] is None and signal["inputs"]["4h"] is None
    assert signal["inputs"]["1d"]["open_time"] == "2024-01-14T00:00:00.000Z"
    assert signal["lag_seconds"] == {"1d": 0.0, "4h": None, "1h": None}
    assert "1d: 24 closed candle(s), the rule needs 50" in signal["reason"]
    assert "1h: no curated candle" in signal["reason"]
    assert metrics == ["signal.stale"]


def test_poke_waits_for_fresh_data_until_the_deadline(market):
    signals = DataSignal()
    fresh = signals.poke(DAY, deadline=CUTOFF + timedelta(hours=1), now=NOW_1)
    assert fresh["done"] and fresh["fresh"] and not fresh["timed_out"]
    json.dumps(fresh)  # XCom-able

    (market / "curated" / "1h_curated_20240301.parquet").unlink()
    waiting = signals.poke(DAY, deadline=CUTOFF + timedelta(hours=1), now=NOW_1)
    assert not waiting["done"] and not waiting["fresh"]
    assert waiting["freshness"]["timeframes"]["1h"]["lag_seconds"] == 43200.0
    given_up = signals.poke(DAY, deadline=CUTOFF + timedelta(hours=1), now=CUTOFF + timedelta(hours=1))
    assert given_up["done"] and given_up["timed_out"] and not given_up["fresh"]
    assert given_up["deadline"] == "2024-03-01T13:00:00.000Z"


# --- signals.parquet -----------------------------------------------------------------------------


def test_rerunning_a_day_replaces_its_single_row(market, metrics):
    signals = DataSignal()
    signals.generate(DAY, now=NOW_1)
    signals.generate(DAY + timedelta(days=1), now=NOW_1 + timedelta(days=1))
    signals.generate(DAY, now=NOW_2)
    rows = pd.read_parquet(market / "signals" / SIGNALS_TABLE)
    assert len(rows) == 2
    assert not rows.duplicated(["date", "symbol"]).any()
    assert [str(d) for d in rows["date"]] == ["2024-03-01", "2024-03-02"]
    today = rows.iloc[0]
    assert today["generated_at"] == pd.Timestamp(NOW_2)
    assert today["status"] == "ok" and today["symbol"] == SYMBOL
    assert today["as_of"] == pd.Timestamp("2024-03-01T11:59:59.999Z")
    assert json.loads(today["inputs"])["1h"]["open_time"] == "2024-03-01T11:00:00.000Z"
    assert rows.iloc[1]["status"] == "stale_data" and pd.isna(rows.iloc[1]["direction"])

    # The day's data goes stale and the day is re-run: still one row, now the stale one.
    (market / "curated" / "1h_curated_20240301.parquet").unlink()
    signals.generate(DAY, now=NOW_2)
    rows = signals.read_signals()
    assert len(rows) == 2
    assert rows.iloc[0]["status"] == "stale_data"
    assert json.loads(rows.iloc[0]["lag_seconds"])["1h"] == 43200.0
    assert not list((market / "signals").glob(".*.tmp"))


def test_other_symbols_get_their_own_files(market, monkeypatch, metrics):
    monkeypatch.setenv("BINANCE_SYMBOLS", "BTCUSDT,ETHUSDT")
    signals = DataSignal()
    btc = signals.generate(DAY, now=NOW_1)
    eth = signals.generate(DAY, "ETHUSDT", now=NOW_1)  # nothing ingested for it: stale
    assert eth["symbol"] == "ETHUSDT" and eth["status"] == "stale_data"
    assert _read_json(market / "signals" / "signal_ETHUSDT_20240301.json") == eth
    assert _read_json(market / "signals" / "signal_20240301.json") == btc
    rows = signals.read_signals()
    assert sorted(rows["symbol"]) == ["BTCUSDT", "ETHUSDT"]


# --- the chart -----------------------------------------------------------------------------


def test_chart_is_a_sensible_png(market):
    from PIL import Image

    DataSignal().generate(DAY, now=NOW_1)
    data = (market / "signals" / "signal_20240301.png").read_bytes()
    assert data.startswith(PNG_MAGIC)
    assert len(data) > 20_000
    with Image.open(io.BytesIO(data)) as image:
        image.verify()
    with Image.open(io.BytesIO(data)) as image:
        assert image.format == "PNG"
        assert image.size == (1400, 800)
        # Not a blank canvas: candles, VWAP and levels in several colours.
        assert len(image.convert("RGB").getcolors(maxcolors=1 << 16) or []) > 20


# --- bad inputs ------------------------------------------------------------------------------


@pytest.mark.parametrize("value", ["2024-13-01", "yesterday", "", 20240301, None])
def test_bad_date_is_a_clear_error(market, value):
    with pytest.raises(ValueError, match=r"^date=.* is not a date"):
        DataSignal().generate(value)
    with pytest.raises(ValueError, match=r"^date="):
        DataSignal().freshness(value)
    assert not (market / "signals").exists()


@pytest.mark.parametrize("value, message", [
    ("btcusdt", r"^symbol='btcusdt' is not a Binance symbol"),
    ("BTC", r"^symbol='BTC' is not a Binance symbol"),
    ("ETHUSDT", r"^symbol='ETHUSDT' is not in BINANCE_SYMBOLS"),
])
def test_bad_symbol_is_a_clear_error(market, value, message):
    with pytest.raises(ValueError, match=message):
        DataSignal().generate(DAY, value, now=NOW_1)
    assert not (market / "signals").exists()


def test_a_cutoff_in_the_future_is_refused(market):
    with pytest.raises(ValueError, match=r"^date='2024-03-01': its cutoff 2024-03-01T12:00:00.000Z has not come"):
        DataSignal().generate(DAY, now=CUTOFF - timedelta(minutes=1))
    assert not (market / "signals").exists()


# --- object stores ---------------------------------------------------------------------------


def test_signal_files_go_to_an_object_store(market, monkeypatch, metrics, object_store):
    """``SIGNAL_DATA_DIR`` as a URL goes through ObjectStoragePath (fsspec's memory:// stands in for s3://)."""
    url, memory, bucket = object_store
    monkeypatch.setenv("SIGNAL_DATA_DIR", url)
    signals = DataSignal()
    signals.generate(DAY, now=NOW_1)
    signal = signals.generate(DAY, now=NOW_2)
    assert json.loads(memory.cat(f"{bucket}/signal_20240301.json")) == signal
    assert memory.cat(f"{bucket}/signal_20240301.png").startswith(PNG_MAGIC)
    assert len(signals.read_signals()) == 1
    assert sorted(p.rsplit("/", 1)[1] for p in memory.ls(bucket, detail=False)) == [
        "signal_20240301.json", "signal_20240301.png", SIGNALS_TABLE]
    assert not (market / "signals").exists()


def test_concurrent_signals_on_an_object_store_keep_every_row(market, monkeypatch, object_store):
    """Two generate() calls in threads of one process (object stores have no file lock): the
    read-modify-write of signals.parquet is serialized, so neither loses the other's row."""
    import threading

    from include.market_data.storage import PartitionIO

    url, memory, bucket = object_store
    monkeypatch.setenv("SIGNAL_DATA_DIR", url)
    both_read = threading.Barrier(2, timeout=1)
    real_read = PartitionIO.read

    def read_then_wait(self, path, columns=None):
        table = real_read(self, path, columns)
        if str(path).endswith(SIGNALS_TABLE):
            try:  # unserialized, both threads read the table before either writes it
                both_read.wait()
            except threading.BrokenBarrierError:
                pass
        return table

    monkeypatch.setattr(PartitionIO, "read", read_then_wait)
    days, errors = (DAY, DAY - timedelta(days=1)), []

    def generate(day):
        try:
            DataSignal().generate(day, now=NOW_1)
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    workers = [threading.Thread(target=generate, args=(day,)) for day in days]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(60)
    monkeypatch.setattr(PartitionIO, "read", real_read)
    assert errors == []
    rows = DataSignal().read_signals()
    assert sorted(str(d) for d in rows["date"]) == ["2024-02-29", "2024-03-01"]
