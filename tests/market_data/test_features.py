"""Curated features against hand-computed numbers and an independent row-by-row reference."""

from __future__ import annotations

import math
import time
from decimal import Decimal

import numpy as np
import pandas as pd
import pytest

from include.market_data.features import (
    FEATURE_COLUMNS,
    PERIODS_PER_YEAR,
    RV_WINDOW,
    WARMUP_CANDLES,
    compute_features,
)
from include.market_data.timeframes import DAY_MS, HOUR_MS, PIPELINE_INTERVALS, WEEK_MS, WEEK_ORIGIN_MS, interval_ms

FLOAT_FEATURES = [name for name in FEATURE_COLUMNS if name != "gap_before"]
PIVOT_COLUMNS = ["pivot", "r1", "r2", "r3", "s1", "s2", "s3"]
DAY0_MS = 1_704_067_200_000  # 2024-01-01 00:00 UTC, a Monday (so also a 1w grid point)
assert (DAY0_MS - WEEK_ORIGIN_MS) % WEEK_MS == 0


# --------------------------------------------------------------------------- helpers


def frame(open_ms: list[int], ohlcv: list[tuple[float, float, float, float, float, float]]) -> pd.DataFrame:
    """Candles from (open, high, low, close, volume, quote_asset_volume) tuples."""
    columns = ["open", "high", "low", "close", "volume", "quote_asset_volume"]
    data = pd.DataFrame(ohlcv, columns=columns, dtype="float64")
    data.insert(0, "open_time", pd.to_datetime(open_ms, unit="ms", utc=True).as_unit("ms"))
    return data


def random_candles(
    seed: int,
    interval: str,
    rows: int,
    *,
    start_ms: int = DAY0_MS,
    missing_slots: tuple[tuple[int, int], ...] = (),
) -> pd.DataFrame:
    """A geometric random walk with a 10x volatility regime change half way, some
    zero-volume candles, and the given (first slot, count) ranges of slots left out."""
    rng = np.random.default_rng(seed)
    slots = rows + sum(count for _, count in missing_slots)
    open_ms = start_ms + np.arange(slots, dtype=np.int64) * interval_ms(interval)
    keep = np.ones(slots, dtype=bool)
    for first, count in missing_slots:
        keep[first : first + count] = False
    sigma = np.where(np.arange(slots) < slots // 2, 0.002, 0.02)
    close = 30_000.0 * np.exp(np.cumsum(rng.normal(0.0, sigma)))
    open_ = np.concatenate([[30_000.0], close[:-1]]) * np.exp(rng.normal(0.0, sigma / 4))
    high = np.maximum(open_, close) * (1 + np.abs(rng.normal(0.0, sigma)))
    low = np.minimum(open_, close) * (1 - np.abs(rng.normal(0.0, sigma)))
    volume = rng.lognormal(2.0, 1.0, slots)
    volume[rng.random(slots) < 0.05] = 0.0
    quote = volume * rng.uniform(low, high)
    data = frame(
        open_ms[keep].tolist(),
        list(zip(open_[keep], high[keep], low[keep], close[keep], volume[keep], quote[keep])),
    )
    data["number_of_trades"] = rng.integers(0, 1000, keep.sum())
    return data


def reference_features(candles: pd.DataFrame, interval: str, starts_history: bool) -> dict[str, list]:
    """Every feature by plain loops over rows, straight from the DESIGN.md table."""
    step = interval_ms(interval)
    window = RV_WINDOW[interval]
    per_year = PERIODS_PER_YEAR[interval]
    period_ms, origin = (WEEK_MS, WEEK_ORIGIN_MS) if interval == "1w" else (DAY_MS, 0)
    times = [int(t.value // 1_000_000) for t in candles["open_time"]]
    high = [float(x) for x in candles["high"]]
    low = [float(x) for x in candles["low"]]
    close = [float(x) for x in candles["close"]]
    volume = [Decimal(repr(float(x))) for x in candles["volume"]]
    quote = [Decimal(repr(float(x))) for x in candles["quote_asset_volume"]]
    rows = len(times)
    out: dict[str, list] = {name: [None] * rows for name in FEATURE_COLUMNS}

    for i in range(rows):
        if i > 0:
            out["return"][i] = close[i] / close[i - 1] - 1
            out["log_return"][i] = math.log(close[i] / close[i - 1])
            out["true_range"][i] = max(
                high[i] - low[i], abs(high[i] - close[i - 1]), abs(low[i] - close[i - 1])
            )
            out["gap_before"][i] = (times[i] - times[i - 1]) // step - 1
        else:
            out["true_range"][i] = high[i] - low[i] if starts_history else None
            out["gap_before"][i] = 0

    atr = None
    for i in range(14, rows):
        if i == 14:
            atr = sum(out["true_range"][1:15]) / 14
        else:
            atr = (atr * 13 + out["true_range"][i]) / 14
        out["atr_14"][i] = atr

    session_day, session_quote, session_volume = None, Decimal(0), Decimal(0)
    first_day_partial = not starts_history and times[0] % DAY_MS != 0
    for i in range(rows):
        out["candle_vwap"][i] = float(quote[i] / volume[i]) if volume[i] != 0 else close[i]
        day = times[i] // DAY_MS
        if day != session_day:
            session_day, session_quote, session_volume = day, Decimal(0), Decimal(0)
        session_quote += quote[i]
        session_volume += volume[i]
        if first_day_partial and day == times[0] // DAY_MS:
            out["vwap"][i] = None
        else:
            out["vwap"][i] = float(session_quote / session_volume) if session_volume != 0 else close[i]

    for i in range(rows):
        returns = out["log_return"][i - window + 1 : i + 1] if i >= window - 1 else []
        if len(returns) == window and all(r is not None for r in returns):
            out["realized_volatility"][i] = math.sqrt(per_year / window * math.fsum(r * r for r in returns))

    period_hlc: dict[int, list[float]] = {}
    for i in range(rows):
        key = (times[i] - origin) // period_ms
        if key in period_hlc:
            hlc = period_hlc[key]
            period_hlc[key] = [max(hlc[0], high[i]), min(hlc[1], low[i]), close[i]]
        else:
            period_hlc[key] = [high[i], low[i], close[i]]
    first_key = (times[0] - origin) // period_ms
    if not starts_history and (times[0] - origin) % period_ms != 0:
        del period_hlc[first_key]  # only partly in the frame
    for i in range(rows):
        previous = period_hlc.get((times[i] - origin) // period_ms - 1)
        if previous is None:
            continue
        h, l, c = previous
        p = (h + l + c) / 3
        out["pivot"][i] = p
        out["r1"][i], out["s1"][i] = 2 * p - l, 2 * p - h
        out["r2"][i], out["s2"][i] = p + (h - l), p - (h - l)
        out["r3"][i], out["s3"][i] = h + 2 * (p - l), l - 2 * (h - p)

    for i in range(20, rows):
        out["support"][i] = min(low[i - 20 : i])
        out["resistance"][i] = max(high[i - 20 : i])
    return out


def as_float_array(values: list) -> np.ndarray:
    return np.array([np.nan if v is None else v for v in values], dtype=np.float64)


def assert_matches_reference(result: pd.DataFrame, reference: dict[str, list], rtol: float) -> None:
    for name in FLOAT_FEATURES:
        np.testing.assert_allclose(
            result[name].to_numpy(), as_float_array(reference[name]), rtol=rtol, atol=0, equal_nan=True, err_msg=name
        )
    assert result["gap_before"].tolist() == reference["gap_before"]


# --------------------------------------------------------------------------- hand-computed cases


def test_returns_true_range_vwap_and_gap_by_hand():
    candles = frame(
        [DAY0_MS, DAY0_MS + HOUR_MS, DAY0_MS + 2 * HOUR_MS, DAY0_MS + 4 * HOUR_MS],  # 03:00 missing
        [
            (100, 110, 95, 105, 2, 205),
            (105, 108, 101, 102, 0, 0),
            (102, 115, 104, 112, 3, 330),
            (112, 113, 100, 101, 1, 105),
        ],
    )
    result = compute_features(candles, "1h", starts_history=True)

    np.testing.assert_allclose(result["return"], [np.nan, 102 / 105 - 1, 112 / 102 - 1, 101 / 112 - 1], equal_nan=True)
    np.testing.assert_allclose(
        result["log_return"], [np.nan, math.log(102 / 105), math.log(112 / 102), math.log(101 / 112)], equal_nan=True
    )
    # row 0: 110-95; row 1: max(7, |108-105|, |101-105|); row 2: |115-102|; row 3: 113-100 beats |100-112|
    assert result["true_range"].tolist() == [15.0, 7.0, 13.0, 13.0]
    assert result["candle_vwap"].tolist() == [102.5, 102.0, 110.0, 105.0]  # zero volume -> close
    np.testing.assert_allclose(result["vwap"], [205 / 2, 205 / 2, 535 / 5, 640 / 6])
    # the close before the missing slot is still the previous close
    assert result["gap_before"].tolist() == [0, 0, 0, 1]
    assert result["gap_before"].dtype == np.int64
    assert result[["atr_14", "realized_volatility", "support", "resistance", *PIVOT_COLUMNS]].isna().all().all()


def test_session_vwap_resets_at_midnight_and_survives_zero_volume():
    candles = frame(
        [DAY0_MS + 16 * HOUR_MS, DAY0_MS + 20 * HOUR_MS, DAY0_MS + 24 * HOUR_MS, DAY0_MS + 28 * HOUR_MS],
        [
            (100, 101, 99, 100, 1, 100),
            (100, 100, 98, 99, 0, 0),
            (99, 99, 97, 98, 0, 0),  # new day, nothing traded yet -> close
            (98, 102, 97, 101, 3, 300),
        ],
    )
    result = compute_features(candles, "4h", starts_history=True)
    assert result["vwap"].tolist() == [100.0, 100.0, 98.0, 100.0]
    assert np.isfinite(result["vwap"]).all() and np.isfinite(result["candle_vwap"]).all()


def test_floor_pivots_by_hand_and_null_when_previous_day_absent():
    candles = frame(
        [
            DAY0_MS,
            DAY0_MS + HOUR_MS,
            DAY0_MS + 2 * HOUR_MS,
            DAY0_MS + DAY_MS,  # day 2: pivots from day 1
            DAY0_MS + 3 * DAY_MS + HOUR_MS,  # day 4: day 3 has no candles at all
        ],
        [
            (95, 110, 90, 100, 1, 100),
            (100, 120, 95, 105, 1, 100),
            (105, 115, 100, 108, 1, 100),
            (108, 109, 107, 108, 1, 108),
            (108, 109, 107, 108, 1, 108),
        ],
    )
    result = compute_features(candles, "1h", starts_history=True)
    # day 1: H=120 L=90 C=108 -> P=106
    expected_day2 = {"pivot": 106, "r1": 122, "s1": 92, "r2": 136, "s2": 76, "r3": 152, "s3": 62}
    for name, value in expected_day2.items():
        assert result[name].iloc[3] == pytest.approx(value, rel=1e-15), name
    assert result[PIVOT_COLUMNS].iloc[[0, 1, 2, 4]].isna().all().all()
    assert result["gap_before"].tolist() == [0, 0, 0, 21, 48]


def test_daily_and_weekly_pivots_come_from_the_previous_candle():
    for interval in ("1d", "1w"):
        step = interval_ms(interval)
        candles = frame(
            [DAY0_MS, DAY0_MS + step, DAY0_MS + 3 * step],
            [(10, 12, 6, 9, 1, 9), (9, 11, 8, 10, 1, 10), (10, 11, 9, 10, 0, 0)],
        )
        result = compute_features(candles, interval, starts_history=True)
        # row 1 from (H=12, L=6, C=9): P=9, R1=12, S1=6, R2=15, S2=3, R3=18, S3=0
        assert [result[name].iloc[1] for name in PIVOT_COLUMNS] == [9, 12, 15, 18, 6, 3, 0], interval
        assert result[PIVOT_COLUMNS].iloc[[0, 2]].isna().all().all(), interval  # row 2: previous absent
        assert result["gap_before"].tolist() == [0, 0, 1]
        assert result["vwap"].tolist() == result["candle_vwap"].tolist() == [9.0, 10.0, 10.0]


def test_atr_first_value_is_mean_of_true_ranges_1_to_14():
    # close 100 throughout and high/low = 100 +- i/2, so true_range[i] = i
    candles = frame(
        [DAY0_MS + i * HOUR_MS for i in range(17)],
        [(100, 100 + i / 2, 100 - i / 2, 100, 1, 100) for i in range(17)],
    )
    result = compute_features(candles, "1h", starts_history=True)
    assert result["true_range"].tolist() == [float(i) for i in range(17)]
    assert result["atr_14"].iloc[:14].isna().all()
    assert result["atr_14"].iloc[14] == pytest.approx(105 / 14, rel=1e-15)  # (1+..+14)/14, not (0+..+13)/14
    assert result["atr_14"].iloc[15] == pytest.approx((7.5 * 13 + 15) / 14, rel=1e-15)
    assert result["atr_14"].iloc[16] == pytest.approx((((7.5 * 13 + 15) / 14) * 13 + 16) / 14, rel=1e-15)


def test_support_and_resistance_exclude_the_current_candle():
    candles = frame(
        [DAY0_MS + i * HOUR_MS for i in range(22)],
        [(100, 100 + i, 100 - i, 100, 1, 100) for i in range(22)],
    )
    result = compute_features(candles, "1h", starts_history=True)
    assert result["support"].iloc[:20].isna().all() and result["resistance"].iloc[:20].isna().all()
    assert result["support"].iloc[20] == 100 - 19 and result["resistance"].iloc[20] == 100 + 19
    assert result["support"].iloc[21] == 100 - 20 and result["resistance"].iloc[21] == 100 + 20


def test_realized_volatility_needs_a_full_window_of_log_returns():
    closes = [100 * 1.01 ** ((-1) ** i * (i % 3)) for i in range(8)]  # 4h: W = 6
    candles = frame(
        [DAY0_MS + i * 4 * HOUR_MS for i in range(8)], [(c, c * 1.01, c * 0.99, c, 1, c) for c in closes]
    )
    result = compute_features(candles, "4h", starts_history=True)
    assert result["realized_volatility"].iloc[:6].isna().all()  # rows 0..5 hold at most 5 log returns
    for row in (6, 7):
        squares = [math.log(closes[i] / closes[i - 1]) ** 2 for i in range(row - 5, row + 1)]
        assert result["realized_volatility"].iloc[row] == pytest.approx(math.sqrt(2190 / 6 * sum(squares)), rel=1e-12)


# --------------------------------------------------------------------------- randomized vs reference


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_wilder_recursion_matches_a_plain_loop(seed):
    candles = random_candles(seed, "15m", 1500)
    result = compute_features(candles, "15m", starts_history=True)
    true_range = result["true_range"].tolist()
    expected = [None] * 14 + [sum(true_range[1:15]) / 14]
    for tr in true_range[15:]:
        expected.append((expected[-1] * 13 + tr) / 14)
    np.testing.assert_allclose(result["atr_14"], as_float_array(expected), rtol=1e-12, atol=0, equal_nan=True)


@pytest.mark.parametrize("interval", PIPELINE_INTERVALS)
@pytest.mark.parametrize("starts_history", [True, False])
def test_every_feature_matches_the_reference(interval, starts_history):
    rows = 600 if interval in ("1d", "1w") else 1200
    # a multi-slot outage, and for intraday intervals whole missing days
    outage = (300, 3) if interval in ("1d", "1w") else (300, 3 * DAY_MS // interval_ms(interval))
    start = DAY0_MS + (5 * HOUR_MS if starts_history is False and interval in ("15m", "30m", "1h") else 0)
    candles = random_candles(11, interval, rows, start_ms=start, missing_slots=(outage,))
    result = compute_features(candles, interval, starts_history=starts_history)
    assert_matches_reference(result, reference_features(candles, interval, starts_history), rtol=1e-12)


def test_first_day_of_history_has_nulls_only_where_history_is_short():
    candles = random_candles(5, "15m", 200)
    result = compute_features(candles, "15m", starts_history=True)
    assert np.isnan(result["return"].iloc[0]) and np.isnan(result["log_return"].iloc[0])
    assert result["return"].iloc[1:].notna().all()
    assert result["true_range"].iloc[0] == candles["high"].iloc[0] - candles["low"].iloc[0]
    assert result["atr_14"].iloc[:14].isna().all() and result["atr_14"].iloc[14:].notna().all()
    assert result["realized_volatility"].iloc[:96].isna().all() and result["realized_volatility"].iloc[96:].notna().all()
    assert result["support"].iloc[:20].isna().all() and result["support"].iloc[20:].notna().all()
    first_day = result["open_time"] < pd.Timestamp(DAY0_MS + DAY_MS, unit="ms", tz="UTC")
    assert result.loc[first_day, PIVOT_COLUMNS].isna().all().all()
    assert result.loc[~first_day, PIVOT_COLUMNS].notna().all().all()
    assert result[["candle_vwap", "vwap", "true_range"]].notna().all().all()


def test_a_frame_that_does_not_start_history_has_no_first_row_true_range():
    candles = random_candles(6, "1h", 40)
    result = compute_features(candles, "1h", starts_history=False)
    assert np.isnan(result["true_range"].iloc[0])
    assert result["atr_14"].iloc[14] == pytest.approx(result["true_range"].iloc[1:15].mean(), rel=1e-15)


def test_gap_keeps_previous_close_and_counts_missing_slots():
    candles = random_candles(7, "30m", 200, missing_slots=((100, 7),))
    result = compute_features(candles, "30m", starts_history=True)
    assert result["gap_before"].iloc[100] == 7
    assert (result["gap_before"].drop(index=100) == 0).all()
    close_before_gap = candles["close"].iloc[99]
    assert result["return"].iloc[100] == pytest.approx(candles["close"].iloc[100] / close_before_gap - 1, rel=1e-15)


# --------------------------------------------------------------------------- incremental curation


def _day_rows(candles: pd.DataFrame, day_ms: int) -> pd.Series:
    open_ms = candles["open_time"].astype("int64")
    return (open_ms >= day_ms) & (open_ms < day_ms + DAY_MS)


INCREMENTAL_SERIES = {
    # interval: (rows, missing (first slot, count)) - a multi-hour outage inside every series
    "15m": (40 * 96, ((2000, 24),)),
    "30m": (40 * 48, ((1000, 12),)),
    "1h": (60 * 24, ((700, 30),)),
    "4h": (200 * 6, ((600, 9),)),
    "1d": (800, ((700, 2),)),
    "1w": (700, ((660, 1),)),
}


@pytest.mark.parametrize("interval", PIPELINE_INTERVALS)
def test_incremental_curation_equals_full_history(interval):
    rows, missing = INCREMENTAL_SERIES[interval]
    candles = random_candles(21, interval, rows, missing_slots=missing)
    full = compute_features(candles, interval, starts_history=True)
    warmup = WARMUP_CANDLES[interval]
    open_ms = candles["open_time"].astype("int64")
    days = sorted(set((open_ms // DAY_MS * DAY_MS).tolist()))
    after_gap = int(open_ms[full["gap_before"] > 0].iloc[0]) // DAY_MS * DAY_MS
    targets = {days[-1], after_gap, days[-3]}
    checked = 0
    for day_ms in sorted(targets):
        target = _day_rows(candles, day_ms)
        first_target = int(np.flatnonzero(target.to_numpy())[0])
        if first_target < warmup:
            continue
        window = candles.iloc[first_target - warmup : int(np.flatnonzero(target.to_numpy())[-1]) + 1]
        partial = compute_features(window, interval, starts_history=False)
        for name in FLOAT_FEATURES:
            np.testing.assert_allclose(
                partial.loc[target[target].index, name].to_numpy(),
                full.loc[target, name].to_numpy(),
                rtol=1e-9,
                atol=0,
                equal_nan=True,
                err_msg=f"{interval} {name} day {day_ms}",
            )
        assert partial.loc[target[target].index, "gap_before"].tolist() == full.loc[target, "gap_before"].tolist()
        checked += 1
    assert checked >= 2, f"{interval}: series too short to test incremental curation"


def test_too_short_a_warmup_would_be_caught():
    # proves the incremental test above can fail: 30 warm-up rows leave ATR's seed error visible
    candles = random_candles(21, "15m", 40 * 96)
    full = compute_features(candles, "15m", starts_history=True)
    partial = compute_features(candles.iloc[-96 - 30 :], "15m", starts_history=False)
    difference = np.abs(partial["atr_14"].iloc[-96:] / full["atr_14"].iloc[-96:] - 1)
    assert difference.max() > 1e-9


def test_warmup_covers_every_need():
    for interval in PIPELINE_INTERVALS:
        rows_per_pivot_period = (WEEK_MS if interval == "1w" else DAY_MS) // interval_ms(interval)
        assert WARMUP_CANDLES[interval] >= 14 + 500
        assert WARMUP_CANDLES[interval] >= max(RV_WINDOW[interval], 20, rows_per_pivot_period)


# --------------------------------------------------------------------------- input handling


def test_decimal_input_other_columns_and_index_pass_through():
    candles = random_candles(8, "1h", 60)
    candles.index = pd.RangeIndex(1000, 1060)
    candles["symbol"] = "BTCUSDT"
    as_decimal = candles.copy()
    for name in ("open", "high", "low", "close", "volume", "quote_asset_volume"):
        as_decimal[name] = [Decimal(repr(x)) for x in candles[name]]
    as_decimal["atr_14"] = -1.0  # a stale feature column is replaced, not duplicated
    result = compute_features(as_decimal, "1h", starts_history=True)
    expected = compute_features(candles, "1h", starts_history=True)
    assert list(result.columns) == [c for c in as_decimal.columns if c != "atr_14"] + list(FEATURE_COLUMNS)
    assert result.index.equals(candles.index)
    pd.testing.assert_frame_equal(result[list(FEATURE_COLUMNS)], expected[list(FEATURE_COLUMNS)])
    assert result["open"].tolist() == as_decimal["open"].tolist()  # input columns unchanged
    assert result["symbol"].eq("BTCUSDT").all() and result["number_of_trades"].equals(candles["number_of_trades"])
    assert all(result[name].dtype == np.float64 for name in FLOAT_FEATURES)


def test_empty_frame_gives_empty_features():
    result = compute_features(random_candles(9, "1h", 3).iloc[:0], "1h", starts_history=True)
    assert len(result) == 0 and set(FEATURE_COLUMNS) <= set(result.columns)


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda c: c.iloc[::-1], "sorted"),
        (lambda c: pd.concat([c, c.iloc[[-1]]]), "unique"),
        (lambda c: c.assign(open_time=c["open_time"] + pd.Timedelta(minutes=1)), "grid"),
        (lambda c: c.drop(columns="quote_asset_volume"), "quote_asset_volume"),
        (lambda c: c.assign(close=c["close"].where(c.index != 2)), "'close'"),
        (lambda c: c.assign(low=0.0), "'low'"),
        (lambda c: c.assign(volume=-1.0), "'volume'"),
    ],
)
def test_bad_input_is_refused_with_a_clear_message(mutate, message):
    with pytest.raises(ValueError, match=message):
        compute_features(mutate(random_candles(10, "1h", 10)), "1h", starts_history=True)


def test_unknown_interval_is_refused():
    with pytest.raises(ValueError, match="'1M'"):
        compute_features(random_candles(10, "1h", 10), "1M", starts_history=True)


# --------------------------------------------------------------------------- speed sanity


def test_vectorised_on_ten_years_of_15m_candles():
    candles = random_candles(12, "15m", 330_000)
    started = time.perf_counter()
    result = compute_features(candles, "15m", starts_history=True)
    elapsed = time.perf_counter() - started
    print(f"compute_features: {len(candles):,} 15m rows in {elapsed:.2f} s")
    assert len(result) == 330_000 and result["atr_14"].iloc[14:].notna().all()
