"""The daily rule on hand-built markets: direction, levels, look-ahead, determinism, NaNs."""

from __future__ import annotations

import json
from datetime import datetime

import numpy as np
import pandas as pd
import pytest

from include.market_data.signal_rule import (
    DIRECTION_THRESHOLD,
    FACTOR_WEIGHTS,
    HIGH_VOL_DAMPER,
    HISTORY_NEEDED,
    KEY_LEVELS_1H,
    KEY_LEVELS_4H,
    SIGNAL_INTERVALS,
    SIGNAL_KEYS,
    compute_signal,
    stale_signal,
)

SYMBOL = "BTCUSDT"
START = pd.Timestamp("2024-01-01", tz="UTC")
DAY_HOURS = 24
# 60 full days of history, then the recommendation at 12:00 UTC of day 61 (2024-03-01).
CUTOFF = START + pd.Timedelta(days=60, hours=12)
LAST_HOUR = 62 * DAY_HOURS  # the markets run two days past the cutoff: rows the rule must ignore

RV_WINDOW = {"1h": 24, "4h": 6, "1d": 30}
CANDLES_PER_YEAR = {"1h": 8760, "4h": 2190, "1d": 365}

UP = [(0, 0.0), (LAST_HOUR, 0.62)]  # +1 % a day in log price
DOWN = [(0, 0.0), (LAST_HOUR, -0.62)]
# Up for 59.5 days, a 4 % slide to 04:00 on the signal day, a partial rebound by 12:00:
# the daily trend and the session VWAP say up, 4h momentum and the pivot say down.
PULLBACK = [
    (0, 0.0),
    (59 * DAY_HOURS + 12, 0.59),
    (60 * DAY_HOURS + 4, 0.55),
    (60 * DAY_HOURS + 12, 0.565),
    (LAST_HOUR, 0.6),
]


# --- a small synthetic market with roughly curated features ---------------------------------


def hourly_path(knots, *, noise=0.0002, noise_from=None, noise_scale=1.0, seed=7, base=40_000.0):
    """Price at every hour: piecewise-linear log price through (hour, change) knots plus seeded noise."""
    hours = np.arange(knots[-1][0] + 1)
    log_price = np.interp(hours, [k[0] for k in knots], [k[1] for k in knots])
    shocks = np.random.default_rng(seed).normal(0.0, noise, hours.size)
    if noise_from is not None:
        shocks[noise_from:] *= noise_scale
    return base * np.exp(log_price + np.cumsum(shocks))


def hourly_candles(path: np.ndarray) -> pd.DataFrame:
    opens, closes = path[:-1], path[1:]
    count = closes.size
    open_time = START + pd.to_timedelta(np.arange(count), unit="h")
    wick = np.abs(closes - opens) * 0.3 + closes * 0.0008
    volume = 10.0 + (np.arange(count) % 5)
    frame = pd.DataFrame(
        {
            "symbol": SYMBOL,
            "open_time": open_time.astype("datetime64[ms, UTC]"),
            "close_time": (open_time + pd.Timedelta(hours=1, milliseconds=-1)).astype(
                "datetime64[ms, UTC]"
            ),
            "open": opens,
            "high": np.maximum(opens, closes) + wick,
            "low": np.minimum(opens, closes) - wick,
            "close": closes,
            "volume": volume,
            "quote_asset_volume": volume * (opens + closes) / 2,
            "number_of_trades": np.full(count, 100, dtype="int64"),
        }
    )
    frame["taker_buy_base_asset_volume"] = frame["volume"] / 2
    frame["taker_buy_quote_asset_volume"] = frame["quote_asset_volume"] / 2
    return frame


def aggregate(hourly: pd.DataFrame, hours: int) -> pd.DataFrame:
    grouped = hourly.groupby(hourly["open_time"].dt.floor(f"{hours}h"), sort=True)
    return pd.DataFrame(
        {
            "symbol": grouped["symbol"].first(),
            "open_time": grouped["open_time"].first(),
            "close_time": grouped["close_time"].last(),
            "open": grouped["open"].first(),
            "high": grouped["high"].max(),
            "low": grouped["low"].min(),
            "close": grouped["close"].last(),
            "volume": grouped["volume"].sum(),
            "quote_asset_volume": grouped["quote_asset_volume"].sum(),
            "taker_buy_base_asset_volume": grouped["taker_buy_base_asset_volume"].sum(),
            "taker_buy_quote_asset_volume": grouped["taker_buy_quote_asset_volume"].sum(),
            "number_of_trades": grouped["number_of_trades"].sum(),
        }
    ).reset_index(drop=True)


def wilder_atr(true_range: np.ndarray, period: int = 14) -> np.ndarray:
    atr = np.full(true_range.size, np.nan)
    if true_range.size > period:
        atr[period] = true_range[1 : period + 1].mean()
        for i in range(period + 1, true_range.size):
            atr[i] = (atr[i - 1] * (period - 1) + true_range[i]) / period
    return atr


def with_features(frame: pd.DataFrame, interval: str) -> pd.DataFrame:
    frame = frame.copy()
    previous_close = frame["close"].shift()
    frame["return"] = frame["close"] / previous_close - 1
    frame["log_return"] = np.log(frame["close"] / previous_close)
    frame["true_range"] = pd.concat(
        [
            frame["high"] - frame["low"],
            (frame["high"] - previous_close).abs(),
            (frame["low"] - previous_close).abs(),
        ],
        axis=1,
    ).max(axis=1)
    frame["atr_14"] = wilder_atr(frame["true_range"].to_numpy())
    frame["candle_vwap"] = frame["quote_asset_volume"] / frame["volume"]
    day = frame["open_time"].dt.floor("D")
    if interval == "1d":
        frame["vwap"] = frame["candle_vwap"]
    else:
        by_day = frame.groupby(day)
        frame["vwap"] = by_day["quote_asset_volume"].cumsum() / by_day["volume"].cumsum()
    window = RV_WINDOW[interval]
    squares = (frame["log_return"] ** 2).rolling(window, min_periods=window).sum()
    frame["realized_volatility"] = np.sqrt(CANDLES_PER_YEAR[interval] / window * squares)
    previous_day = (
        frame.groupby(day).agg(H=("high", "max"), L=("low", "min"), C=("close", "last")).shift()
    )
    high, low, close = (day.map(previous_day[k]).to_numpy(float) for k in ("H", "L", "C"))
    pivot = (high + low + close) / 3
    frame["pivot"], frame["r1"], frame["s1"] = pivot, 2 * pivot - low, 2 * pivot - high
    frame["r2"], frame["s2"] = pivot + (high - low), pivot - (high - low)
    frame["r3"], frame["s3"] = high + 2 * (pivot - low), low - 2 * (high - pivot)
    frame["support"] = frame["low"].rolling(20).min().shift()
    frame["resistance"] = frame["high"].rolling(20).max().shift()
    frame["gap_before"] = np.zeros(len(frame), dtype="int64")
    return frame


def market(knots=UP, **path_options) -> dict[str, pd.DataFrame]:
    hourly = hourly_candles(hourly_path(knots, **path_options))
    return {
        "1h": with_features(hourly, "1h"),
        "4h": with_features(aggregate(hourly, 4), "4h"),
        "1d": with_features(aggregate(hourly, 24), "1d"),
    }


def signal_of(frames, cutoff=CUTOFF):
    return compute_signal(frames, symbol=SYMBOL, cutoff=cutoff.to_pydatetime())


def closed_before(frames, cutoff=CUTOFF):
    return {i: f[f["close_time"] < cutoff].reset_index(drop=True) for i, f in frames.items()}


def last_closed_index(frame, cutoff=CUTOFF):
    return frame.index[frame["close_time"] < cutoff][-1]


def dumps(signal) -> str:
    return json.dumps(signal, sort_keys=True, allow_nan=False)


def score_of(signal) -> float:
    factors = signal["factors"]
    return sum(FACTOR_WEIGHTS[n] * factors[n]["vote"] for n in FACTOR_WEIGHTS) / sum(
        FACTOR_WEIGHTS.values()
    )


# --- direction ------------------------------------------------------------------------------


def test_clear_uptrend_is_long_with_stop_below_and_target_above():
    signal = signal_of(market(UP))

    assert signal["status"] == "ok"
    assert signal["direction"] == "long"
    assert {n: signal["factors"][n]["vote"] for n in FACTOR_WEIGHTS} == dict.fromkeys(FACTOR_WEIGHTS, 1)
    assert signal["confidence"] == 1.0
    assert signal["stop_loss"] < signal["entry"] < signal["take_profit"]
    risk = signal["entry"] - signal["stop_loss"]
    assert signal["take_profit"] - signal["entry"] >= 1.5 * risk - 1e-6


def test_clear_downtrend_is_short_with_target_below_and_stop_above():
    signal = signal_of(market(DOWN))

    assert signal["direction"] == "short"
    assert {n: signal["factors"][n]["vote"] for n in FACTOR_WEIGHTS} == dict.fromkeys(FACTOR_WEIGHTS, -1)
    assert signal["take_profit"] < signal["entry"] < signal["stop_loss"]
    risk = signal["stop_loss"] - signal["entry"]
    assert signal["entry"] - signal["take_profit"] >= 1.5 * risk - 1e-6


def test_conflicting_factors_give_flat_with_entry_only():
    signal = signal_of(market(PULLBACK))
    votes = {name: factor["vote"] for name, factor in signal["factors"].items()}

    assert votes["trend_1d"] == 1 and votes["vwap_1h"] == 1
    assert votes["momentum_4h"] == -1 and votes["pivot_1h"] == -1
    assert abs(score_of(signal)) < DIRECTION_THRESHOLD
    assert signal["direction"] == "flat"
    assert signal["entry"] == pytest.approx(signal["inputs"]["1h"]["close"])
    assert signal["stop_loss"] is None and signal["take_profit"] is None


def test_high_volatility_damps_confidence_but_not_direction():
    calm = signal_of(market(UP))
    # The last day and a half hourly shocks 25x larger: realized vol far above its 5-day median.
    stormy = signal_of(market(UP, noise_from=59 * DAY_HOURS, noise_scale=25))
    regime = stormy["factors"]["volatility_regime"]

    assert calm["factors"]["volatility_regime"]["value"] < 1.5
    assert regime["value"] >= 1.5 and "high regime" in regime["detail"]
    assert regime["vote"] == 0 and regime["weight"] == 0.0
    assert stormy["direction"] == "long"
    assert stormy["confidence"] == pytest.approx(abs(score_of(stormy)) * HIGH_VOL_DAMPER, abs=1e-4)


def test_entry_is_last_1h_close_and_inputs_are_newest_closed_candles():
    frames = market(UP)
    signal = signal_of(frames)
    last_1h = frames["1h"].loc[last_closed_index(frames["1h"])]

    assert signal["entry"] == last_1h["close"]
    assert signal["as_of"] == "2024-03-01T11:59:59.999Z"
    assert signal["inputs"]["1h"] == {
        "open_time": "2024-03-01T11:00:00.000Z",
        "close_time": "2024-03-01T11:59:59.999Z",
        "close": last_1h["close"],
    }
    assert signal["inputs"]["4h"]["open_time"] == "2024-03-01T08:00:00.000Z"
    # Today's daily candle closes at midnight, after the cutoff: yesterday's is the newest.
    assert signal["inputs"]["1d"]["close_time"] == "2024-02-29T23:59:59.999Z"


# --- stop and target ------------------------------------------------------------------------


def _set_levels(frames, values_1h: dict, values_4h: dict):
    i1, i4 = last_closed_index(frames["1h"]), last_closed_index(frames["4h"])
    for name in KEY_LEVELS_1H:
        frames["1h"].loc[i1, name] = values_1h.get(name, np.nan)
    for name in KEY_LEVELS_4H:
        frames["4h"].loc[i4, name] = values_4h.get(name, np.nan)
    return frames["1h"].loc[i1, "close"], frames["4h"].loc[i4, "atr_14"]


def test_without_nearby_levels_stop_is_one_and_a_half_atr_and_target_two_r():
    frames = market(UP)
    entry, atr = _set_levels(frames, {}, {})
    signal = signal_of(frames)

    assert signal["direction"] == "long"  # pivot is null now, the other three still vote up
    assert signal["factors"]["pivot_1h"]["detail"] == "insufficient data"
    assert signal["stop_loss"] == pytest.approx(entry - 1.5 * atr, rel=1e-9)
    assert signal["take_profit"] == pytest.approx(entry + 2 * 1.5 * atr, rel=1e-9)


def test_stop_goes_beyond_nearest_level_and_target_to_nearest_level_at_enough_reward():
    frames = market(UP)
    entry, atr = _set_levels(frames, {}, {})
    risk = 1.1 * atr  # a support 1.0 ATR below, stop 0.1 ATR beyond it
    _set_levels(
        frames,
        {
            "support": entry - 0.3 * atr,  # too close: inside the noise, ignored
            "s1": entry - 1.0 * atr,
            "s2": entry - 2.0 * atr,  # farther than s1: not the nearest
            "r1": entry + 1.2 * risk,  # less than 1.5 R of reward: ignored
            "r2": entry + 2.2 * risk,
            "r3": entry + 2.8 * risk,
        },
        {"resistance": entry + 4.0 * risk},  # beyond 3 R: ignored
    )
    signal = signal_of(frames)

    assert signal["stop_loss"] == pytest.approx(entry - 1.1 * atr, rel=1e-9)
    assert signal["take_profit"] == pytest.approx(entry + 2.2 * risk, rel=1e-9)


def test_short_stop_uses_resistance_from_the_4h_frame():
    frames = market(DOWN)
    entry, atr = _set_levels(frames, {}, {})
    _set_levels(frames, {"s2": entry - 1.9 * 2.0 * atr}, {"resistance": entry + 1.9 * atr})
    signal = signal_of(frames)

    assert signal["direction"] == "short"
    assert signal["stop_loss"] == pytest.approx(entry + 2.0 * atr, rel=1e-9)
    assert signal["take_profit"] == pytest.approx(entry - 3.8 * atr, rel=1e-9)


def test_risk_unit_falls_back_to_twice_the_1h_atr():
    frames = market(UP)
    entry, _ = _set_levels(frames, {}, {})
    frames["4h"].loc[last_closed_index(frames["4h"]), "atr_14"] = np.nan
    atr_1h = frames["1h"].loc[last_closed_index(frames["1h"]), "atr_14"]
    signal = signal_of(frames)

    assert signal["factors"]["momentum_4h"]["vote"] == 0
    assert signal["stop_loss"] == pytest.approx(entry - 1.5 * 2 * atr_1h, rel=1e-9)


# --- determinism and look-ahead -------------------------------------------------------------


def test_same_inputs_give_identical_signal():
    first = dumps(signal_of(market(PULLBACK)))
    second = dumps(signal_of(market(PULLBACK)))
    assert first == second


def test_candles_closing_at_or_after_cutoff_change_nothing():
    frames = market(UP)
    reference = dumps(signal_of(closed_before(frames)))

    wild = {interval: frame.copy() for interval, frame in frames.items()}
    for frame in wild.values():
        later = frame["close_time"] >= CUTOFF
        assert later.any()
        numeric = frame.columns[frame.dtypes == "float64"]
        frame.loc[later, numeric] = frame.loc[later, numeric] * 37.0
    # Shuffled rows too: the rule sorts, then filters.
    shuffled = {i: f.sample(frac=1.0, random_state=3) for i, f in wild.items()}

    assert dumps(signal_of(wild)) == reference
    assert dumps(signal_of(shuffled)) == reference


def test_a_candle_closing_one_millisecond_before_cutoff_is_used():
    frames = market(UP)
    # The 11:00 candle closes at 11:59:59.999: in with a 12:00 cutoff, out with 11:59:59.999.
    at_noon = signal_of(frames, CUTOFF)
    a_tick_earlier = signal_of(frames, CUTOFF - pd.Timedelta(milliseconds=1))

    assert at_noon["inputs"]["1h"]["open_time"] == "2024-03-01T11:00:00.000Z"
    assert a_tick_earlier["inputs"]["1h"]["open_time"] == "2024-03-01T10:00:00.000Z"


def test_naive_cutoff_means_utc():
    frames = market(UP)
    naive = compute_signal(frames, symbol=SYMBOL, cutoff=datetime(2024, 3, 1, 12, 0))
    assert dumps(naive) == dumps(signal_of(frames))


def test_rows_of_other_symbols_are_ignored():
    frames = market(UP)
    noise = {i: f.assign(symbol="ETHUSDT", close=f["close"] / 20.0) for i, f in frames.items()}
    mixed = {i: pd.concat([frames[i], noise[i]], ignore_index=True) for i in frames}
    assert dumps(signal_of(mixed)) == dumps(signal_of(frames))


# --- missing history and null features ------------------------------------------------------


@pytest.mark.parametrize("interval", SIGNAL_INTERVALS)
def test_too_little_history_raises_naming_the_timeframe(interval):
    frames = closed_before(market(UP))
    frames[interval] = frames[interval].iloc[-(HISTORY_NEEDED[interval] - 1) :]
    with pytest.raises(ValueError, match=f"^{interval}: .*needs {HISTORY_NEEDED[interval]}"):
        signal_of(frames)


def test_exactly_the_history_needed_is_enough():
    frames = closed_before(market(UP))
    trimmed = {i: f.iloc[-HISTORY_NEEDED[i] :] for i, f in frames.items()}
    assert signal_of(trimmed)["status"] == "ok"


def test_rows_after_cutoff_do_not_count_as_history():
    frames = market(UP)
    # Noon of the 50th day: 49 daily candles have closed, the 50th closes at midnight.
    early_cutoff = START + pd.Timedelta(days=HISTORY_NEEDED["1d"] - 1, hours=12)
    with pytest.raises(ValueError, match=f"^1d: {HISTORY_NEEDED['1d'] - 1} BTCUSDT candle"):
        signal_of(frames, early_cutoff)


def test_missing_frame_or_column_raises_a_clear_error():
    frames = market(UP)
    with pytest.raises(ValueError, match="no 4h frame"):
        signal_of({k: v for k, v in frames.items() if k != "4h"})
    with pytest.raises(ValueError, match="1h frame lacks column.*vwap"):
        signal_of({**frames, "1h": frames["1h"].drop(columns=["vwap"])})


def test_duplicate_candles_are_rejected():
    frames = market(UP)
    doubled = pd.concat([frames["4h"], frames["4h"].iloc[[10]]], ignore_index=True)
    with pytest.raises(ValueError, match="4h frame holds duplicate open_time"):
        signal_of({**frames, "4h": doubled})


def test_null_features_make_their_factor_vote_zero():
    frames = market(UP)
    i1, i4, i1d = (last_closed_index(frames[i]) for i in ("1h", "4h", "1d"))
    frames["1h"].loc[i1, "vwap"] = np.nan
    frames["4h"].loc[i4 - 2, "log_return"] = np.nan
    frames["1d"].loc[i1d, "atr_14"] = np.nan
    frames["1h"].loc[i1, "realized_volatility"] = np.nan
    signal = signal_of(frames)
    factors = signal["factors"]

    for name in ("vwap_1h", "momentum_4h", "trend_1d"):
        assert factors[name] == {
            "value": None, "vote": 0, "weight": FACTOR_WEIGHTS[name], "detail": "insufficient data"
        }
    assert factors["volatility_regime"]["value"] is None
    assert factors["pivot_1h"]["vote"] == 1
    # Null factors keep their weight: only the pivot's 1.0 of 5.5 votes, below the threshold.
    assert signal["direction"] == "flat"
    assert signal["confidence"] == pytest.approx(1.0 / 5.5, abs=1e-4)
    dumps(signal)


def test_no_atr_at_all_raises_for_a_directional_signal():
    frames = market(UP)
    frames["4h"].loc[last_closed_index(frames["4h"]), "atr_14"] = np.nan
    frames["1h"].loc[last_closed_index(frames["1h"]), "atr_14"] = np.nan
    with pytest.raises(ValueError, match="ATR"):
        signal_of(frames)


# --- output shape ---------------------------------------------------------------------------


@pytest.mark.parametrize("knots", [UP, DOWN, PULLBACK], ids=["up", "down", "pullback"])
def test_output_is_strict_json_with_the_signal_fields(knots):
    signal = signal_of(market(knots))

    assert tuple(signal) == SIGNAL_KEYS
    assert json.loads(dumps(signal)) == signal
    assert 0.0 <= signal["confidence"] <= 1.0
    assert signal["direction"] in ("long", "short", "flat")
    assert set(signal["inputs"]) == set(SIGNAL_INTERVALS)
    for factor in signal["factors"].values():
        assert set(factor) == {"value", "vote", "weight", "detail"}
        assert factor["vote"] in (-1, 0, 1)
    assert signal["reason"] is None and signal["lag_seconds"] is None


def test_stale_signal_gives_no_direction_and_keeps_reason_lags_and_inputs():
    inputs = {
        "1d": {"open_time": "2024-02-28T00:00:00.000Z", "close_time": "2024-02-28T23:59:59.999Z", "close": 1.5},
        "4h": {"open_time": "2024-03-01T04:00:00.000Z", "close_time": "2024-03-01T07:59:59.999Z", "close": 2.5},
        "1h": None,
    }
    signal = stale_signal(
        symbol=SYMBOL,
        reason="1h: no candle; 1d: newest closed 2024-02-28",
        lags={"1d": 129600.0, "4h": 14400.0, "1h": float("nan")},
        inputs=inputs,
    )

    assert tuple(signal) == SIGNAL_KEYS
    assert signal["status"] == "stale_data"
    assert signal["reason"] == "1h: no candle; 1d: newest closed 2024-02-28"
    for key in ("direction", "confidence", "entry", "stop_loss", "take_profit"):
        assert signal[key] is None
    assert signal["factors"] == {}
    assert signal["lag_seconds"] == {"1d": 129600.0, "4h": 14400.0, "1h": None}
    assert signal["inputs"] == inputs
    assert signal["as_of"] == "2024-03-01T07:59:59.999Z"
    dumps(signal)
