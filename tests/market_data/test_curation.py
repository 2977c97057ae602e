"""Curation end to end: sandbox klines -> raw partitions -> curated day files.

The formulas themselves are unit-tested in ``test_features.py`` on synthetic frames; here
the whole path runs (real HTTP ingestion from the sandbox, Parquet on disk, merges, locks)
and the curated files are checked against

* a full recomputation of all history (incremental == full, within 1e-9 relative),
* an independent row-by-row reference written below from DESIGN.md's table,
* the storage contract: idempotent, symbol-preserving, race-safe, atomic, and refusing
  bad input with a message that names it.
"""

from __future__ import annotations

import dataclasses
import math
import re
import shutil
from decimal import Decimal
from multiprocessing import get_context
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from include.market_data.config import Settings, load_settings
from include.market_data.curation import CurationError, DataCuration
from include.market_data.features import FEATURE_COLUMNS
from include.market_data.ingestion import DataIngestion
from include.market_data.schema import rows_to_table, table_to_rows
from include.market_data.storage import QUARANTINE_DIR, CuratedStore, RawStore
from include.market_data.timeframes import DAY_MS, HOUR_MS, interval_ms, to_ms

SYMBOLS = ("BTCUSDT", "ETHUSDT")
START, END = "2024-01-01", "2024-03-01"  # 60 UTC days, [start, end)
LAST_DAY = "2024-02-29"
# A long outage in the middle (Jan 30 21:00 -> Feb 1 02:00: Jan 31 has no candles at all)
# and a 2-hour one (two 1h slots, eight 15m slots).
LONG_OUTAGE = ("2024-01-30T21:00Z", "2024-02-01T02:00Z")
SHORT_OUTAGE = ("2024-02-15T10:00Z", "2024-02-15T12:00Z")
AFTER_GAP_DAY = "2024-02-01"
OUTAGES = {"outages": [{"start": to_ms(a), "end": to_ms(b)} for a, b in (LONG_OUTAGE, SHORT_OUTAGE)]}
INTERVALS = ("1h", "15m")
PRICE_COLUMNS = ["open", "high", "low", "close", "volume", "quote_asset_volume"]
PROVENANCE = {"source": "test", "endpoint": "/api/v3/klines", "fetched_at": "2024-03-02T00:00:00+00:00",
              "latency_ms": "1.0"}

# Written from DESIGN.md, not imported from features.py (an independent reference).
RV_WINDOW = {"15m": 96, "30m": 48, "1h": 24, "4h": 6}
PERIODS_PER_YEAR = {"15m": 35040.0, "30m": 17520.0, "1h": 8760.0, "4h": 2190.0}


# --------------------------------------------------------------------------- fixtures / helpers


def make_settings(root: Path, raw: Path | None = None, curated: str = "curated") -> Settings:
    return Settings(symbols=SYMBOLS, raw_data_dir=str(raw or root / "raw"), curated_data_dir=str(root / curated))


def ingest_history(sandbox, raw_dir: Path, intervals, symbols, start=START, end=END) -> None:
    """Ingest ``[start, end)`` from the sandbox, with the outages injected first."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("AIRFLOW_CONN_BINANCE_DEFAULT", f'{{"conn_type": "http", "host": "{sandbox.url}"}}')
        sandbox.clear_faults()
        sandbox.set_faults(OUTAGES)
        try:
            ingestion = DataIngestion(Settings(symbols=SYMBOLS, raw_data_dir=str(raw_dir)))
            for interval in intervals:
                for symbol in symbols:
                    ingestion.ingest(interval, start, end, symbol)
        finally:
            sandbox.clear_faults()


@pytest.fixture(scope="module")
def raw_history(tmp_path_factory, sandbox):
    """60 days of sandbox 1h and 15m BTCUSDT (and 1h ETHUSDT) with the outages, ingested once."""
    raw = tmp_path_factory.mktemp("curation_raw") / "raw"
    ingest_history(sandbox, raw, ["1h"], SYMBOLS)
    ingest_history(sandbox, raw, ["15m"], ["BTCUSDT"])
    return raw


@pytest.fixture
def env(tmp_path, raw_history):
    """A private copy of the raw history and settings pointing at it (curated dir empty)."""
    shutil.copytree(raw_history, tmp_path / "raw")
    return make_settings(tmp_path)


def curated_frame(settings: Settings, interval: str, symbol: str = "BTCUSDT", start=START, end=END) -> pd.DataFrame:
    return DataCuration(settings).read(interval, symbol, start, end).reset_index(drop=True)


def full_recomputation(settings: Settings, interval: str, symbol: str = "BTCUSDT") -> pd.DataFrame:
    """All history curated at once, from the same raw dir into a fresh curated dir."""
    fresh = dataclasses.replace(settings, curated_data_dir=settings.curated_data_dir + "_full")
    shutil.rmtree(fresh.curated_data_dir, ignore_errors=True)
    DataCuration(fresh).curate_timeframe(interval, symbol)
    return curated_frame(fresh, interval, symbol)


def day_rows(frame: pd.DataFrame, day: str) -> pd.DataFrame:
    start = pd.Timestamp(day, tz="UTC")
    selected = frame[(frame.open_time >= start) & (frame.open_time < start + pd.Timedelta(days=1))]
    return selected.reset_index(drop=True)


def assert_same_features(actual: pd.DataFrame, expected: pd.DataFrame, rtol: float = 1e-9) -> None:
    """Same candles, identical nulls, every feature within ``rtol`` relative."""
    assert len(actual) == len(expected) > 0
    assert (actual.open_time.to_numpy() == expected.open_time.to_numpy()).all()
    for name in PRICE_COLUMNS:
        assert (actual[name].to_numpy() == expected[name].to_numpy()).all(), name
    for name in FEATURE_COLUMNS:
        got, want = actual[name].to_numpy(dtype=float), expected[name].to_numpy(dtype=float)
        assert (np.isnan(got) == np.isnan(want)).all(), f"{name}: nulls differ"
        np.testing.assert_allclose(got[~np.isnan(got)], want[~np.isnan(want)], rtol=rtol, atol=0, err_msg=name)


def curated_bytes(settings: Settings) -> dict[str, bytes]:
    root = Path(settings.curated_data_dir)
    return {p.name: p.read_bytes() for p in sorted(root.glob("*.parquet"))}


def symbol_rows(settings: Settings, interval: str, day: str, symbol: str) -> pa.Table:
    table = pq.read_table(CuratedStore(settings.curated_data_dir).path(interval, to_ms(day)))
    return table.filter(pc.equal(table.column("symbol"), symbol)).replace_schema_metadata(None)


def revise_candle(settings: Settings, interval: str, day: str, index: int, factor: str,
                  symbol: str = "BTCUSDT") -> None:
    """Binance revises one candle of ``day``: its close (and high/low to stay consistent)."""
    store = RawStore(settings.raw_data_dir)
    rows = table_to_rows(store.read_day(interval, symbol, to_ms(day)), 8)
    row = rows[index]
    close = (Decimal(row[4]) * Decimal(factor)).quantize(Decimal("0.01"))
    row[4] = f"{close:f}"
    row[2] = f"{max(Decimal(row[2]), close):f}"
    row[3] = f"{min(Decimal(row[3]), close):f}"
    results = store.write(interval, symbol, rows_to_table([row]), PROVENANCE)
    assert results[0].revised == 1


def reference_features(frame: pd.DataFrame, interval: str) -> pd.DataFrame:
    """DESIGN.md's feature table, computed row by row with plain Python over one symbol's
    full history (sorted by open_time, the first row being the first candle ever)."""
    step = interval_ms(interval)
    t = [ts.value // 10**6 for ts in frame.open_time]  # Timestamp.value is always ns
    high, low, close = frame.high.tolist(), frame.low.tolist(), frame.close.tolist()
    vol, quote = frame.volume.tolist(), frame.quote_asset_volume.tolist()
    n, nan = len(frame), math.nan
    out = {name: [nan] * n for name in FEATURE_COLUMNS}

    # previous UTC day's high / low / close
    day_hlc: dict[int, list[float]] = {}
    for i in range(n):
        d = t[i] // DAY_MS
        if d not in day_hlc:
            day_hlc[d] = [high[i], low[i], close[i]]
        else:
            day_hlc[d] = [max(day_hlc[d][0], high[i]), min(day_hlc[d][1], low[i]), close[i]]

    window, periods = RV_WINDOW[interval], PERIODS_PER_YEAR[interval]
    cum_q = cum_v = 0.0
    atr = None
    for i in range(n):
        prev = close[i - 1] if i else None
        if prev is not None:
            out["return"][i] = close[i] / prev - 1
            out["log_return"][i] = math.log(close[i] / prev)
            out["true_range"][i] = max(high[i] - low[i], abs(high[i] - prev), abs(low[i] - prev))
        else:
            out["true_range"][i] = high[i] - low[i]
        if i == 14:
            atr = sum(out["true_range"][1:15]) / 14
        elif i > 14:
            atr = (atr * 13 + out["true_range"][i]) / 14
        if i >= 14:
            out["atr_14"][i] = atr
        out["candle_vwap"][i] = quote[i] / vol[i] if vol[i] > 0 else close[i]
        if i == 0 or t[i] // DAY_MS != t[i - 1] // DAY_MS:
            cum_q = cum_v = 0.0
        cum_q += quote[i]
        cum_v += vol[i]
        out["vwap"][i] = cum_q / cum_v if cum_v > 0 else close[i]
        if i >= window:  # needs W log returns, i.e. W previous closes
            out["realized_volatility"][i] = math.sqrt(
                periods / window * sum(r * r for r in out["log_return"][i - window + 1 : i + 1]))
        hlc = day_hlc.get(t[i] // DAY_MS - 1)
        if hlc is not None:
            h, l, c = hlc
            p = (h + l + c) / 3
            levels = {"pivot": p, "r1": 2 * p - l, "s1": 2 * p - h, "r2": p + (h - l), "s2": p - (h - l),
                      "r3": h + 2 * (p - l), "s3": l - 2 * (h - p)}
            for name, value in levels.items():
                out[name][i] = value
        if i >= 20:
            out["support"][i] = min(low[i - 20 : i])
            out["resistance"][i] = max(high[i - 20 : i])
        out["gap_before"][i] = (t[i] - t[i - 1]) // step - 1 if i else 0
    result = frame[["open_time", *PRICE_COLUMNS]].copy()
    for name in FEATURE_COLUMNS:
        result[name] = np.array(out[name], dtype=float)
    return result


def _curate_in_process(raw_dir: str, curated_dir: str, interval: str, symbol: str, barrier) -> None:
    settings = Settings(symbols=SYMBOLS, raw_data_dir=raw_dir, curated_data_dir=curated_dir)
    curation = DataCuration(settings)
    days = curation.raw.days(interval, symbol)
    barrier.wait(60)
    # one day at a time, the two processes walking in opposite directions, so they meet
    # on the same files with many separate read-merge-write cycles
    for day in (days if symbol == "BTCUSDT" else days[::-1]):
        curation.curate_days(interval, symbol, [day], follow_warmup=False)


# --------------------------------------------------------------------------- incremental == full


@pytest.mark.parametrize("interval", INTERVALS)
def test_incremental_day_equals_full_recomputation_after_an_outage(env, interval):
    full = full_recomputation(env, interval)
    assert full.gap_before.max() > 0  # the outages really are in the data
    for day in (LAST_DAY, AFTER_GAP_DAY):
        incremental = dataclasses.replace(env, curated_data_dir=f"{env.curated_data_dir}_{day}")
        summary = DataCuration(incremental).curate_days(interval, "BTCUSDT", [to_ms(day)], follow_warmup=False)
        assert summary.days_written == [day] and not summary.skipped
        got = curated_frame(incremental, interval)
        assert_same_features(got, day_rows(full, day))
        # computed from warm-up only: the file holds that one day, nothing before it
        assert sorted(p.name for p in Path(incremental.curated_data_dir).glob("*.parquet")) == [
            f"{interval}_curated_{day.replace('-', '')}.parquet"]
    after_gap = day_rows(full, AFTER_GAP_DAY)
    assert after_gap.open_time[0] == pd.Timestamp(LONG_OUTAGE[1])
    assert after_gap.gap_before[0] == (to_ms(LONG_OUTAGE[1]) - to_ms(LONG_OUTAGE[0])) // interval_ms(interval)
    assert after_gap[["pivot", "r1", "s3"]].isna().all().all()  # Jan 31 has no candles: no pivots
    assert after_gap.atr_14.notna().all() and after_gap.realized_volatility.notna().all()


@pytest.mark.parametrize("interval", INTERVALS)
def test_dag_path_ingest_then_curate_the_new_day_equals_full_recomputation(data_env, sandbox, interval):
    settings = make_settings(data_env)
    curation = DataCuration(settings)
    ingest_history(sandbox, Path(settings.raw_data_dir), [interval], ["BTCUSDT"], START, LAST_DAY)
    first = curation.curate_timeframe(interval)
    assert len(first.days_written) == 58  # 59 days, Jan 31 lost to the outage
    before = curated_bytes(settings)

    ingest_history(sandbox, Path(settings.raw_data_dir), [interval], ["BTCUSDT"], LAST_DAY, END)
    summary = curation.curate_days(interval, "BTCUSDT", [to_ms(LAST_DAY)])
    assert summary.days_written == [LAST_DAY]
    assert summary.rows == DAY_MS // interval_ms(interval)

    after = curated_bytes(settings)
    assert {k: v for k, v in after.items() if k in before} == before  # earlier days untouched
    assert_same_features(curated_frame(settings, interval), full_recomputation(settings, interval))


# --------------------------------------------------------------------------- independent reference


@pytest.mark.parametrize("interval", INTERVALS)
def test_curated_output_matches_an_independent_reference(env, interval):
    DataCuration(env).curate_timeframe(interval)
    got = curated_frame(env, interval)
    want = reference_features(got, interval)
    assert_same_features(got, want)


def test_reference_features_spelled_out_on_1h(env):
    DataCuration(env).curate_timeframe("1h")
    c = curated_frame(env, "1h")
    ms = np.array([ts.value // 10**6 for ts in c.open_time])

    # return / log_return across a UTC day boundary use the previous day's last close
    i = int(np.flatnonzero(ms == to_ms("2024-01-02"))[0])
    assert ms[i - 1] == to_ms("2024-01-01T23:00Z")
    assert c["return"][i] == pytest.approx(c.close[i] / c.close[i - 1] - 1, rel=1e-12)
    assert c.log_return[i] == pytest.approx(math.log(c.close[i] / c.close[i - 1]), rel=1e-12)

    # candle VWAP; session VWAP restarts at 00:00 UTC and accumulates within the day
    assert np.allclose(c.candle_vwap, c.quote_asset_volume / c.volume, rtol=1e-12, atol=0)
    midnights = ms % DAY_MS == 0
    assert midnights.sum() >= 55 and np.allclose(c.vwap[midnights], c.candle_vwap[midnights], rtol=1e-12)
    day = day_rows(c, "2024-01-02")
    assert day.vwap[5] == pytest.approx(day.quote_asset_volume[:6].sum() / day.volume[:6].sum(), rel=1e-12)

    # true range with the previous close; ATR: null x14, seed at the 15th, then Wilder
    k = i
    assert c.true_range[k] == pytest.approx(max(c.high[k] - c.low[k], abs(c.high[k] - c.close[k - 1]),
                                                abs(c.low[k] - c.close[k - 1])), rel=1e-12)
    assert c.atr_14[:14].isna().all()
    assert c.atr_14[14] == pytest.approx(c.true_range[1:15].mean(), rel=1e-12)
    for k in (15, 16, 500, len(c) - 1):
        assert c.atr_14[k] == pytest.approx((c.atr_14[k - 1] * 13 + c.true_range[k]) / 14, rel=1e-12)

    # realized volatility over the trailing 24 log returns (the first needs 25 closes)
    assert c.realized_volatility[:24].isna().all()
    for k in (24, 300):
        window = c.log_return[k - 23 : k + 1]
        assert c.realized_volatility[k] == pytest.approx(math.sqrt(8760 / 24 * (window ** 2).sum()), rel=1e-12)

    # pivots from the previous UTC day's H/L/C
    prev, today = day_rows(c, "2024-01-09"), day_rows(c, "2024-01-10")
    h, l, cl = prev.high.max(), prev.low.min(), prev.close.iloc[-1]
    p = (h + l + cl) / 3
    assert (today["pivot"] == today["pivot"][0]).all()
    assert today["pivot"][0] == pytest.approx(p, rel=1e-12)
    assert (today.r1[0], today.s1[0]) == (pytest.approx(2 * p - l), pytest.approx(2 * p - h))
    assert (today.r2[0], today.s2[0]) == (pytest.approx(p + h - l), pytest.approx(p - (h - l)))
    assert (today.r3[0], today.s3[0]) == (pytest.approx(h + 2 * (p - l)), pytest.approx(l - 2 * (h - p)))

    # support / resistance over the previous 20 candles, not the current one
    assert c.support[:20].isna().all() and c.resistance[:20].isna().all()
    assert c.support[20] == c.low[:20].min() and c.resistance[20] == c.high[:20].max()
    assert c.support[700] == c.low[680:700].min() and c.resistance[700] == c.high[680:700].max()

    # a 2-slot outage
    j = int(np.flatnonzero(ms == to_ms(SHORT_OUTAGE[1]))[0])
    assert ms[j - 1] == to_ms(SHORT_OUTAGE[0]) - HOUR_MS
    assert c.gap_before[j] == 2 and c.gap_before[j - 1] == 0 and c.gap_before[j + 1] == 0
    assert c["return"][j] == pytest.approx(c.close[j] / c.close[j - 1] - 1, rel=1e-12)
    assert set(c.gap_before.unique()) == {0, 2, 29}

    # first day of history: null exactly where the warm-up is missing
    first = day_rows(c, START)
    assert first["return"].isna().tolist() == [True] + [False] * 23
    assert first.log_return.isna().sum() == 1
    assert first.true_range[0] == first.high[0] - first.low[0]
    assert first.atr_14.isna().sum() == 14 and first.support.isna().sum() == 20
    assert first.realized_volatility.isna().all()  # 24 log returns need 25 candles
    assert first[["pivot", "r1", "r2", "r3", "s1", "s2", "s3"]].isna().all().all()
    assert first[["candle_vwap", "vwap", "true_range", "gap_before"]].notna().all().all()
    second = day_rows(c, "2024-01-02")
    assert second.drop(columns=["open_time"]).notna().all().all()


# --------------------------------------------------------------------------- idempotence, revisions


def test_recurating_is_idempotent_byte_for_byte(env):
    curation = DataCuration(env)
    first = curation.curate_timeframe("1h")
    before = curated_bytes(env)
    assert len(before) == len(first.days_written) == 59
    again = curation.curate_timeframe("1h")
    assert again.rows == first.rows and again.days_written == first.days_written
    curation.curate_days("1h", "BTCUSDT", [to_ms("2024-01-10"), to_ms(LAST_DAY)])
    assert curated_bytes(env) == before
    assert not list(Path(env.curated_data_dir).glob(".*.tmp"))


def test_revised_candle_recomputes_the_days_whose_warmup_holds_it(env):
    curation = DataCuration(env)
    curation.curate_timeframe("1h")
    before = curated_bytes(env)
    revise_candle(env, "1h", "2024-02-05", 10, "1.03")
    summary = curation.curate_days("1h", "BTCUSDT", [to_ms("2024-02-05")])
    # 614 warm-up candles reach 25.6 days past the revised day: Feb 5 .. Feb 29 (the end)
    assert summary.days_written[0] == "2024-02-05" and summary.days_written[-1] == LAST_DAY
    assert len(summary.days_written) == 25
    after = curated_bytes(env)
    changed = [k for k in before if before[k] != after[k]]
    # later days change only as far as ATR's decayed memory of the revision still shows
    assert changed[:2] == ["1h_curated_20240205.parquet", "1h_curated_20240206.parquet"]
    assert set(changed) <= {f"1h_curated_202402{d:02d}.parquet" for d in range(5, 30)}
    assert_same_features(curated_frame(env, "1h"), full_recomputation(env, "1h"))


def test_revisions_on_two_far_apart_days_recompute_both_warmup_spans(env):
    """The DAG hands over every day it wrote (gap_check's lookback can add an older day)."""
    curation = DataCuration(env)
    curation.curate_timeframe("1h")
    revise_candle(env, "1h", "2024-01-05", 3, "0.97")
    revise_candle(env, "1h", LAST_DAY, 20, "1.02")
    curation.curate_days("1h", "BTCUSDT", [to_ms("2024-01-05"), to_ms(LAST_DAY)])
    assert_same_features(curated_frame(env, "1h"), full_recomputation(env, "1h"))


def test_backfilling_an_outage_recomputes_later_days(env, sandbox):
    curation = DataCuration(env)
    curation.curate_timeframe("1h")
    assert not CuratedStore(env.curated_data_dir).path("1h", to_ms("2024-01-31")).exists()
    with pytest.MonkeyPatch.context() as mp:  # the outage is over: refetch its window
        mp.setenv("AIRFLOW_CONN_BINANCE_DEFAULT", f'{{"conn_type": "http", "host": "{sandbox.url}"}}')
        sandbox.clear_faults()
        written = DataIngestion(env).ingest("1h", "2024-01-30", "2024-02-02")
    assert written.rows_added == 29
    summary = curation.curate_days("1h", "BTCUSDT", [to_ms(d) for d in written.days_touched])
    assert "2024-01-31" in summary.days_written and "2024-02-20" in summary.days_written
    got = curated_frame(env, "1h")
    assert set(got.gap_before.unique()) == {0, 2} and len(day_rows(got, "2024-01-31")) == 24
    assert_same_features(got, full_recomputation(env, "1h"))


# --------------------------------------------------------------------------- two symbols, one file


def test_curating_one_symbol_keeps_the_other_symbols_rows(env):
    curation = DataCuration(env)
    curation.curate_timeframe("1h", "ETHUSDT")
    days = ["2024-01-01", "2024-02-01", LAST_DAY]
    eth_before = {d: symbol_rows(env, "1h", d, "ETHUSDT") for d in days}
    curation.curate_timeframe("1h", "BTCUSDT")
    revise_candle(env, "1h", LAST_DAY, 0, "1.01")
    curation.curate_days("1h", "BTCUSDT", [to_ms(LAST_DAY)])
    for d in days:
        assert symbol_rows(env, "1h", d, "ETHUSDT").equals(eth_before[d])
        table = pq.read_table(CuratedStore(env.curated_data_dir).path("1h", to_ms(d)))
        assert table.column("symbol").to_pylist() == sorted(table.column("symbol").to_pylist())
    assert len(symbol_rows(env, "1h", LAST_DAY, "BTCUSDT")) == 24
    btc, eth = curated_frame(env, "1h", "BTCUSDT"), curated_frame(env, "1h", "ETHUSDT")
    assert len(btc) == len(eth) == 1409 and not np.allclose(btc.close, eth.close)
    assert_same_features(eth, full_recomputation(env, "1h", "ETHUSDT"))


def test_concurrent_curation_of_two_symbols_loses_nothing(env, tmp_path):
    sequential = dataclasses.replace(env, curated_data_dir=str(tmp_path / "sequential"))
    for symbol in SYMBOLS:
        DataCuration(sequential).curate_timeframe("1h", symbol)
    ctx = get_context("spawn")
    barrier = ctx.Barrier(2)
    workers = [ctx.Process(target=_curate_in_process,
                           args=(env.raw_data_dir, env.curated_data_dir, "1h", symbol, barrier))
               for symbol in SYMBOLS]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(300)
        assert worker.exitcode == 0
    concurrent, expected = curated_bytes(env), curated_bytes(sequential)
    assert sorted(concurrent) == sorted(expected) and len(expected) == 59
    for name in expected:
        got = pq.read_table(Path(env.curated_data_dir) / name).replace_schema_metadata(None)
        want = pq.read_table(Path(sequential.curated_data_dir) / name).replace_schema_metadata(None)
        assert got.equals(want), name
        assert set(got.column("symbol").to_pylist()) == set(SYMBOLS)


# --------------------------------------------------------------------------- missing / corrupt raw, bad input


def test_missing_raw_partition_is_a_recorded_skip(env):
    summary = DataCuration(env).curate_days("1h", "BTCUSDT", [to_ms("2024-01-31"), to_ms("2024-03-05")])
    assert summary.skipped == {"2024-01-31": "no raw partition", "2024-03-05": "no raw partition"}
    assert summary.days_written == [] and summary.rows == 0
    assert curated_bytes(env) == {}
    assert "skipped 2 day(s)" in str(summary) and "2024-01-31 (no raw partition)" in str(summary)
    # a full run simply has no file for the day the outage emptied
    full = DataCuration(env).curate_timeframe("1h")
    assert "2024-01-31" not in full.days_written and not full.skipped


def test_corrupt_raw_partition_is_quarantined_and_skipped(env):
    curation = DataCuration(env)
    raw_path = RawStore(env.raw_data_dir).path("1h", "BTCUSDT", to_ms("2024-02-10"))
    raw_path.write_bytes(b"PAR1 this is not parquet \x00\xff" * 10)

    summary = curation.curate_timeframe("1h")
    assert "quarantined" in summary.skipped["2024-02-10"]
    assert "2024-02-10" not in summary.days_written and len(summary.days_written) == 58
    assert "skipped 1 day(s): 2024-02-10" in str(summary)
    assert not raw_path.exists()
    assert [p.name.split(".parquet")[0] for p in (Path(env.raw_data_dir) / QUARANTINE_DIR).iterdir()] == [
        "BTCUSDT_1h_20240210"]
    curated_dir = Path(env.curated_data_dir)
    assert not (curated_dir / "1h_curated_20240210.parquet").exists()
    assert not list(curated_dir.glob(".*.tmp"))
    for path in curated_dir.glob("*.parquet"):  # every written file is whole and readable
        assert pq.read_table(path).num_rows > 0
    # the next day sees the hole as missing candles, not invented ones
    assert day_rows(curated_frame(env, "1h"), "2024-02-11").gap_before[0] == 24


def test_corrupt_raw_partition_leaves_an_existing_curated_day_untouched(env):
    curation = DataCuration(env)
    curation.curate_timeframe("1h")
    curated_path = CuratedStore(env.curated_data_dir).path("1h", to_ms("2024-02-10"))
    before = curated_path.read_bytes()
    RawStore(env.raw_data_dir).path("1h", "BTCUSDT", to_ms("2024-02-10")).write_bytes(b"\x00garbage")
    summary = curation.curate_days("1h", "BTCUSDT", [to_ms("2024-02-10")], follow_warmup=False)
    assert summary.days_written == [] and "quarantined" in summary.skipped["2024-02-10"]
    assert curated_path.read_bytes() == before


def test_a_failing_write_never_leaves_a_half_written_curated_file(env, monkeypatch):
    curation = DataCuration(env)
    curation.curate_timeframe("1h", start="2024-01-01", end="2024-01-03")
    before = curated_bytes(env)
    revise_candle(env, "1h", "2024-01-02", 5, "1.05")

    def broken_write(table, handle, **kwargs):
        handle.write(b"PAR1 half a file")
        raise OSError("disk full")

    monkeypatch.setattr("include.market_data.storage.pq.write_table", broken_write)
    with pytest.raises(OSError, match="disk full"):
        curation.curate_days("1h", "BTCUSDT", [to_ms("2024-01-02"), to_ms("2024-01-03")])
    assert curated_bytes(env) == before  # old Jan 2 intact, no Jan 3 file at all
    assert not list(Path(env.curated_data_dir).glob(".*.tmp"))


@pytest.mark.parametrize(
    "call, names",
    [
        (lambda c: c.curate_timeframe("2h"), "'2h'"),
        (lambda c: c.curate_days("3m", "BTCUSDT", [to_ms("2024-01-02")]), "'3m'"),
        (lambda c: c.curate_timeframe("1h", "DOGEUSDT"), "DOGEUSDT"),
        (lambda c: c.curate_days("1h", "btcusdt", [to_ms("2024-01-02")]), "btcusdt"),
        (lambda c: c.curate_timeframe("1h", start="2024-02-01", end="2024-01-01"), "start="),
        (lambda c: c.curate_timeframe("1h", start="2024-02-01", end="2024-02-01"), "start="),
        (lambda c: c.curate_timeframe("1h", start="not a date", end="2024-02-01"), "start/end"),
    ],
)
def test_bad_input_raises_curation_error_naming_it(env, call, names):
    with pytest.raises(CurationError, match=re.escape(names)):
        call(DataCuration(env))
    assert curated_bytes(env) == {}


def test_an_interval_not_configured_is_refused(env):
    only_1h = dataclasses.replace(env, intervals=("1h",))
    with pytest.raises(CurationError, match="interval='15m'"):
        DataCuration(only_1h).curate_timeframe("15m")


# --------------------------------------------------------------------------- shell API


def test_summary_prints_days_and_rows_from_a_plain_shell(data_env, monkeypatch, raw_history, capsys):
    shutil.copytree(raw_history, data_env / "raw", dirs_exist_ok=True)
    print(DataCuration().curate_timeframe("1h"))
    out = capsys.readouterr().out
    assert "curated 1h BTCUSDT: 59 day(s), 1409 rows" in out
    assert "2024-01-01T00:00:00+00:00 .. 2024-02-29T23:00:00+00:00" in out
    assert (data_env / "curated" / "1h_curated_20240229.parquet").exists()

    window = DataCuration().curate_timeframe("1h", start="2024-02-27T12:00Z", end="2024-02-29")
    assert window.days_written == ["2024-02-27", "2024-02-28"] and window.rows == 48
    assert window.as_dict()["rows"] == 48
    empty = DataCuration().curate_timeframe("1h", start="2023-01-01", end="2023-02-01")
    assert "0 day(s), 0 rows, no rows" in str(empty)


def test_a_slow_curate_never_overwrites_a_newer_one_with_older_raw(tmp_path, monkeypatch):
    """Run A reads 6 raw candles and is slow to write; run B adds a 7th and curates. B must wait
    for A (one critical section per interval and symbol), so the day ends with all 7."""
    import threading

    from tests.market_data.klines import make_rows

    settings = load_settings({"RAW_DATA_DIR": str(tmp_path / "raw"), "CURATED_DATA_DIR": str(tmp_path / "cur")})
    raw = RawStore(settings.raw_data_dir)
    day = to_ms("2024-03-01")
    rows = make_rows("1h", day, 7)
    raw.write("1h", "BTCUSDT", rows_to_table(rows[:6]), {"source": "test"})

    write_days = CuratedStore.write_days
    a_is_writing, release_a = threading.Event(), threading.Event()

    def slow_for_a(self, *args, **kwargs):
        if threading.current_thread().name == "A":
            a_is_writing.set()
            release_a.wait(timeout=30)
        return write_days(self, *args, **kwargs)

    monkeypatch.setattr(CuratedStore, "write_days", slow_for_a)
    run_a = threading.Thread(target=lambda: DataCuration(settings).curate_days("1h", "BTCUSDT", [day]), name="A")
    run_a.start()
    assert a_is_writing.wait(timeout=30)
    raw.write("1h", "BTCUSDT", rows_to_table(rows[6:]), {"source": "test"})
    run_b = threading.Thread(target=lambda: DataCuration(settings).curate_days("1h", "BTCUSDT", [day]), name="B")
    run_b.start()
    run_b.join(timeout=1)
    assert run_b.is_alive()  # B waits for A's critical section
    release_a.set()
    run_a.join(timeout=30)
    run_b.join(timeout=30)
    curated = CuratedStore(settings.curated_data_dir).read("1h", day, day + DAY_MS)
    assert curated.num_rows == 7


def _two_symbols_curated(tmp_path, hours: int) -> tuple[Settings, int]:
    """BTCUSDT and ETHUSDT, ``hours`` 1h candles each from 2024-03-01, raw and curated."""
    from tests.market_data.klines import make_rows

    settings = load_settings({"RAW_DATA_DIR": str(tmp_path / "raw"), "CURATED_DATA_DIR": str(tmp_path / "cur"),
                              "BINANCE_SYMBOLS": "BTCUSDT,ETHUSDT"})
    raw, day = RawStore(settings.raw_data_dir), to_ms("2024-03-01")
    for symbol in settings.symbols:
        raw.write("1h", symbol, rows_to_table(make_rows("1h", day, hours)), {"source": "test"})
        DataCuration(settings).curate_days("1h", symbol, list(range(day, day + hours * HOUR_MS, DAY_MS)))
    return settings, day


def test_a_corrupt_curated_file_is_rebuilt_for_every_symbol(tmp_path):
    settings, day = _two_symbols_curated(tmp_path, hours=24)
    curated = CuratedStore(settings.curated_data_dir)
    curated.path("1h", day).write_bytes(b"garbage")
    DataCuration(settings).curate_days("1h", "BTCUSDT", [day])
    table = curated.read("1h", day, day + DAY_MS)
    assert sorted(set(table.column("symbol").to_pylist())) == ["BTCUSDT", "ETHUSDT"] and table.num_rows == 48


def test_a_curated_day_quarantined_by_a_reader_is_rebuilt_by_the_next_curation(tmp_path):
    settings, day = _two_symbols_curated(tmp_path, hours=48)
    curated = CuratedStore(settings.curated_data_dir)
    curated.path("1h", day).write_bytes(b"garbage")
    assert curated.read("1h", day, day + DAY_MS) is None  # a reader (the signal) quarantines it
    assert curated.quarantined_days("1h") == [day]
    DataCuration(settings).curate_days("1h", "BTCUSDT", [day + DAY_MS])  # the next scheduled curation
    table = curated.read("1h", day, day + DAY_MS)
    assert sorted(set(table.column("symbol").to_pylist())) == ["BTCUSDT", "ETHUSDT"] and table.num_rows == 48
    assert curated.quarantined_days("1h") == []


# --------------------------------------------------------------------------- schema changes, housekeeping


def _tamper_eth(table: pa.Table, value: float) -> pa.Table:
    """``table`` with ETHUSDT's atr_14 set to ``value``: proves whether the rows were recomputed."""
    eth = pc.equal(table.column("symbol"), "ETHUSDT")
    index = table.schema.get_field_index("atr_14")
    return table.set_column(index, "atr_14", pc.if_else(eth, pa.scalar(value), table.column("atr_14")))


@pytest.mark.parametrize("change, rebuilt", [
    ("a feature column missing, older version", True),
    ("an extra column, current version", True),
    ("same columns, older version", True),
    ("same columns, current version", False),
])
def test_an_outdated_curated_day_is_rebuilt_whole_for_every_symbol(tmp_path, change, rebuilt):
    from include.market_data.curation import CURATED_SCHEMA, CURATED_SCHEMA_VERSION

    settings, day = _two_symbols_curated(tmp_path, hours=48)
    target = day + DAY_MS  # the second day: its warm-up comes from the first
    path = CuratedStore(settings.curated_data_dir).path("1h", target)
    table = pq.read_table(path)
    metadata = dict(table.schema.metadata)
    assert metadata[b"schema_version"] == CURATED_SCHEMA_VERSION.encode()
    table = _tamper_eth(table, 0.0)
    if change.startswith("a feature column missing"):
        table = table.drop_columns(["support"])
    elif change.startswith("an extra column"):
        table = table.append_column("obsolete", pa.array([1.0] * table.num_rows))
    if "older version" in change:
        metadata[b"schema_version"] = b"0"
    pq.write_table(table.replace_schema_metadata(metadata), path)

    # the next incremental curation of one symbol touches that day
    summary = DataCuration(settings).curate_days("1h", "BTCUSDT", [target])
    assert summary.days_written == ["2024-03-02"] and summary.rows == 24

    after = pq.read_table(path)
    symbols = after.column("symbol").to_pylist()
    assert sorted(set(symbols)) == list(SYMBOLS) and after.num_rows == 48 and symbols == sorted(symbols)
    full = dataclasses.replace(settings, curated_data_dir=str(tmp_path / "full"))
    for symbol in SYMBOLS:
        DataCuration(full).curate_timeframe("1h", symbol)
    eth = curated_frame(settings, "1h", "ETHUSDT", "2024-03-02", "2024-03-03")
    if rebuilt:  # the file now has today's columns and every symbol's rows equal a full curation
        assert after.schema.names == CURATED_SCHEMA.names
        assert after.schema.metadata[b"schema_version"] == CURATED_SCHEMA_VERSION.encode()
        for symbol in SYMBOLS:
            assert_same_features(curated_frame(settings, "1h", symbol, "2024-03-02", "2024-03-03"),
                                 curated_frame(full, "1h", symbol, "2024-03-02", "2024-03-03"))
    else:  # a current file is merged: the other symbol's rows are kept as they are
        assert (eth.atr_14 == 0.0).all()
        assert_same_features(curated_frame(settings, "1h", "BTCUSDT", "2024-03-02", "2024-03-03"),
                             curated_frame(full, "1h", "BTCUSDT", "2024-03-02", "2024-03-03"))


def test_incremental_curation_prunes_quarantined_curated_files_past_the_retention(tmp_path):
    from datetime import datetime, timedelta, timezone

    settings, day = _two_symbols_curated(tmp_path, hours=24)
    assert settings.quarantine_retention_days == 30
    quarantine = Path(settings.curated_data_dir) / QUARANTINE_DIR
    quarantine.mkdir()

    def stamp(days_ago: int) -> str:  # as PartitionIO.quarantine names the files
        return (datetime.now(timezone.utc) - timedelta(days=days_ago)).strftime("%Y%m%dT%H%M%S%fZ")

    old = quarantine / f"1h_curated_20240301.parquet.{stamp(31)}"
    recent = quarantine / f"1h_curated_20240301.parquet.{stamp(1)}"
    old.write_bytes(b"garbage")
    recent.write_bytes(b"garbage")
    DataCuration(settings).curate_days("1h", "BTCUSDT", [day])
    assert not old.exists() and recent.exists()
    DataCuration(dataclasses.replace(settings, quarantine_retention_days=0)).curate_days("1h", "BTCUSDT", [day])
    assert not recent.exists()
    # a curation of a given range (the shell API) leaves the quarantine alone
    kept = quarantine / f"1h_curated_20240301.parquet.{stamp(40)}"
    kept.write_bytes(b"garbage")
    DataCuration(settings).curate_timeframe("1h", "BTCUSDT")
    assert kept.exists()
