"""Curated feature columns for one symbol and one interval (pure, vectorised).

The formulas are the contract in DESIGN.md ("Data contracts" -> "Curated"). This module
does no I/O: curation reads the candles (with warm-up history) and writes the result.

Nulls are ``NaN`` in the float64 feature columns (``pyarrow.Table.from_pandas`` stores them
as Parquet nulls). A value is null whenever the history it needs is not in the frame;
nothing is interpolated or borrowed from further back.

Incremental curation: computing a target day from only ``WARMUP_CANDLES[interval]`` rows
before it (``starts_history=False``) gives the same numbers as computing all history at once,
within 1e-9 relative (ATR differs by the decayed seed error only; every other column is
computed over exactly the same rows in the same order).
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from include.market_data.timeframes import (
    DAY_MS,
    PIPELINE_INTERVALS,
    WEEK_MS,
    WEEK_ORIGIN_MS,
    interval_ms,
)

FEATURE_COLUMNS: tuple[str, ...] = (
    "return",
    "log_return",
    "true_range",
    "atr_14",
    "candle_vwap",
    "vwap",
    "realized_volatility",
    "pivot",
    "r1",
    "r2",
    "r3",
    "s1",
    "s2",
    "s3",
    "support",
    "resistance",
    "gap_before",
)

PRICE_COLUMNS: tuple[str, ...] = ("open", "high", "low", "close")
VOLUME_COLUMNS: tuple[str, ...] = ("volume", "quote_asset_volume")
REQUIRED_COLUMNS: tuple[str, ...] = ("open_time", *PRICE_COLUMNS, *VOLUME_COLUMNS)

ATR_PERIOD = 14
SUPPORT_WINDOW = 20
# Wilder's ATR forgets its seed as (13/14)^n: after 600 steps the factor is ~5e-20, so even
# a seed 10^6 times off the true ATR leaves an error far below the 1e-9 contract.
ATR_DECAY_STEPS = 600

# Trailing window of realized volatility: one day of candles (1d: 30 days, 1w: 12 weeks).
RV_WINDOW: dict[str, int] = {"15m": 96, "30m": 48, "1h": 24, "4h": 6, "1d": 30, "1w": 12}

# Candles per 365-day year.
PERIODS_PER_YEAR: dict[str, float] = {
    "15m": 35040.0,
    "30m": 17520.0,
    "1h": 8760.0,
    "4h": 2190.0,
    "1d": 365.0,
    "1w": 365.0 / 7.0,
}


def _pivot_period(interval: str) -> tuple[int, int]:
    """(length, origin) in ms of the period pivots are taken from: the UTC day, or the
    Monday-aligned week for weekly candles."""
    return (WEEK_MS, WEEK_ORIGIN_MS) if interval == "1w" else (DAY_MS, 0)


def _warmup_candles(interval: str) -> int:
    # Each need is "rows before the first target row", so the largest one covers all:
    # ATR seed (14 rows) plus its decay; RV's W log returns; support's 20 previous rows;
    # the whole previous pivot period (its candle count) so its H/L/C are complete.
    period_ms, _ = _pivot_period(interval)
    rows_per_pivot_period = max(1, period_ms // interval_ms(interval))
    return max(
        ATR_PERIOD + ATR_DECAY_STEPS,
        RV_WINDOW[interval],
        SUPPORT_WINDOW,
        rows_per_pivot_period,
    )


# Rows of history to load before the first target row when curating incrementally.
WARMUP_CANDLES: dict[str, int] = {interval: _warmup_candles(interval) for interval in PIPELINE_INTERVALS}


def compute_features(candles: pd.DataFrame, interval: str, *, starts_history: bool) -> pd.DataFrame:
    """Return ``candles`` (every column unchanged, same index and order) plus FEATURE_COLUMNS.

    ``candles``: one symbol's rows, sorted by ``open_time``, unique and on the interval's
    grid, with ``open_time`` (datetime64, UTC; naive means UTC) and ``open, high, low, close,
    volume, quote_asset_volume`` (float64, or anything convertible such as Decimal).
    ``starts_history``: the first row is the first candle of the symbol's history (its true
    range is ``high - low`` and ATR is seeded at row 14). When False the first rows are only
    warm-up: whatever depends on rows before the frame is null there, and the caller drops them.
    Feature columns already present in ``candles`` are replaced.
    """
    if interval not in RV_WINDOW:
        raise ValueError(
            f"interval {interval!r} has no curated features; expected one of {', '.join(RV_WINDOW)}"
        )
    missing = [name for name in REQUIRED_COLUMNS if name not in candles.columns]
    if missing:
        raise ValueError(f"candles lack column(s) {', '.join(missing)} needed for features")

    step_ms = interval_ms(interval)
    open_ms = _open_time_ms(candles["open_time"], interval, step_ms)
    high = _as_float(candles, "high")
    low = _as_float(candles, "low")
    close = _as_float(candles, "close")
    _as_float(candles, "open")  # validated only: no feature uses the open price
    volume = _as_float(candles, "volume")
    quote_volume = _as_float(candles, "quote_asset_volume")

    rows = len(candles)
    close_prev = np.full(rows, np.nan)
    close_prev[1:] = close[:-1]

    features: dict[str, np.ndarray] = {}
    features["return"] = close / close_prev - 1.0
    features["log_return"] = np.log(close / close_prev)

    true_range = np.fmax.reduce([high - low, np.abs(high - close_prev), np.abs(low - close_prev)])
    if rows and not starts_history:
        true_range[0] = np.nan  # the candle before the frame is unknown
    features["true_range"] = true_range
    features["atr_14"] = _wilder_atr(true_range, ATR_PERIOD)

    features["candle_vwap"] = _ratio_or_close(quote_volume, volume, close)
    features["vwap"] = _session_vwap(open_ms, quote_volume, volume, close, starts_history)
    features["realized_volatility"] = _realized_volatility(
        features["log_return"], RV_WINDOW[interval], PERIODS_PER_YEAR[interval]
    )

    period_ms, period_origin = _pivot_period(interval)
    # Outside history, the frame's first period is complete only if the frame opens at its start.
    first_period_complete = starts_history or rows == 0 or (open_ms[0] - period_origin) % period_ms == 0
    features.update(_floor_pivots(open_ms, high, low, close, period_ms, period_origin, first_period_complete))

    previous_lows = pd.Series(low).shift(1)
    previous_highs = pd.Series(high).shift(1)
    features["support"] = previous_lows.rolling(SUPPORT_WINDOW, min_periods=SUPPORT_WINDOW).min().to_numpy()
    features["resistance"] = previous_highs.rolling(SUPPORT_WINDOW, min_periods=SUPPORT_WINDOW).max().to_numpy()

    gap_before = np.zeros(rows, dtype=np.int64)
    gap_before[1:] = np.diff(open_ms) // step_ms - 1
    features["gap_before"] = gap_before

    result = candles.drop(columns=[name for name in FEATURE_COLUMNS if name in candles.columns])
    feature_frame = pd.DataFrame(
        {name: features[name] for name in FEATURE_COLUMNS}, index=candles.index
    ).astype({name: "float64" for name in FEATURE_COLUMNS if name != "gap_before"})
    return pd.concat([result, feature_frame], axis=1)


def _open_time_ms(open_time: pd.Series, interval: str, step_ms: int) -> np.ndarray:
    """Epoch ms of each open time, checked sorted, unique and on the interval's grid."""
    if pd.api.types.is_integer_dtype(open_time.dtype):
        open_ms = open_time.to_numpy(dtype=np.int64)
    elif pd.api.types.is_datetime64_any_dtype(open_time.dtype):
        times = pd.DatetimeIndex(open_time)
        times = times.tz_localize("UTC") if times.tz is None else times.tz_convert("UTC")
        open_ms = times.as_unit("ms").asi8.copy()
    else:
        raise ValueError(f"open_time must be datetime64 (UTC) or epoch ms, not {open_time.dtype}")
    if len(open_ms) > 1 and not (np.diff(open_ms) > 0).all():
        raise ValueError("candles must be sorted by open_time with unique open times")
    origin = WEEK_ORIGIN_MS if interval == "1w" else 0
    off_grid = (open_ms - origin) % step_ms != 0
    if off_grid.any():
        bad = pd.Timestamp(int(open_ms[off_grid][0]), unit="ms", tz="UTC")
        raise ValueError(f"open_time {bad.isoformat()} is not on the {interval} candle grid")
    return open_ms


def _as_float(candles: pd.DataFrame, name: str) -> np.ndarray:
    try:
        values = candles[name].astype("float64").to_numpy(dtype=np.float64, na_value=np.nan)
    except (TypeError, ValueError) as error:
        raise ValueError(f"column {name!r} is not numeric: {error}") from None
    if not np.isfinite(values).all():
        raise ValueError(f"column {name!r} holds null or non-finite values")
    if name in PRICE_COLUMNS and (values <= 0).any():
        raise ValueError(f"column {name!r} holds prices that are not positive")
    if name in VOLUME_COLUMNS and (values < 0).any():
        raise ValueError(f"column {name!r} holds negative volumes")
    return values


def _ratio_or_close(quote_volume: np.ndarray, volume: np.ndarray, close: np.ndarray) -> np.ndarray:
    """quote/volume, or the close where no volume traded (no inf/NaN from 0/0)."""
    traded = volume > 0
    return np.where(traded, quote_volume / np.where(traded, volume, 1.0), close)


def _wilder_atr(true_range: np.ndarray, period: int) -> np.ndarray:
    """TA-Lib ATR: null for rows 0..period-1, mean of true_range[1..period] at row ``period``,
    then ``atr = (atr_prev*(period-1) + tr)/period``.

    An ``ewm(alpha=1/period, adjust=False)`` whose first non-null input is the seed runs
    exactly that recursion (``y = (1-a)*y_prev + a*x``) in compiled code.
    """
    atr = np.full(len(true_range), np.nan)
    if len(true_range) <= period:
        return atr
    seeded = true_range.copy()
    seeded[:period] = np.nan
    seeded[period] = true_range[1 : period + 1].mean()
    atr[period:] = pd.Series(seeded[period:]).ewm(alpha=1.0 / period, adjust=False).mean().to_numpy()
    return atr


def _session_vwap(
    open_ms: np.ndarray,
    quote_volume: np.ndarray,
    volume: np.ndarray,
    close: np.ndarray,
    starts_history: bool,
) -> np.ndarray:
    """cumsum(quote)/cumsum(volume) since 00:00 UTC of each candle's open day; the close while
    nothing has traded. A 1d or 1w candle is alone in its day, so this is its candle VWAP."""
    day = open_ms // DAY_MS
    cumulative_quote = pd.Series(quote_volume).groupby(day).cumsum().to_numpy()
    cumulative_volume = pd.Series(volume).groupby(day).cumsum().to_numpy()
    vwap = _ratio_or_close(cumulative_quote, cumulative_volume, close)
    if len(open_ms) and not starts_history and open_ms[0] % DAY_MS != 0:
        vwap[day == day[0]] = np.nan  # the session's earlier candles are before the frame
    return vwap


def _realized_volatility(log_return: np.ndarray, window: int, periods_per_year: float) -> np.ndarray:
    """sqrt(P/W * sum of the last W squared log returns); null unless all W exist.

    Each window is summed on its own (not a running sum), so the value does not depend on
    where the frame starts - incremental and full curation agree bit for bit.
    """
    volatility = np.full(len(log_return), np.nan)
    if len(log_return) < window:
        return volatility
    windows = np.lib.stride_tricks.sliding_window_view(log_return * log_return, window)
    volatility[window - 1 :] = np.sqrt(periods_per_year / window * windows.sum(axis=1))
    return volatility


def _floor_pivots(
    open_ms: np.ndarray,
    high: np.ndarray,
    low: np.ndarray,
    close: np.ndarray,
    period_ms: int,
    period_origin: int,
    first_period_complete: bool,
) -> dict[str, np.ndarray]:
    """Classic floor pivots from the H/L/C of the period right before each candle's period.

    Null when that period has no candles in the frame (outage, or before the frame), and
    when it is the frame's first period but only partly in the frame.
    """
    rows = len(open_ms)
    if rows == 0:
        return {name: np.full(0, np.nan) for name in ("pivot", "r1", "r2", "r3", "s1", "s2", "s3")}
    period = (open_ms - period_origin) // period_ms
    period_ids, first_rows = np.unique(period, return_index=True)
    last_rows = np.append(first_rows[1:], rows) - 1
    period_high = np.maximum.reduceat(high, first_rows)
    period_low = np.minimum.reduceat(low, first_rows)
    period_close = close[last_rows]
    usable = np.ones(len(period_ids), dtype=bool)
    usable[0] = first_period_complete

    position = np.searchsorted(period_ids, period - 1)
    position_clipped = np.minimum(position, len(period_ids) - 1)
    found = (period_ids[position_clipped] == period - 1) & usable[position_clipped]
    prev_high = np.where(found, period_high[position_clipped], np.nan)
    prev_low = np.where(found, period_low[position_clipped], np.nan)
    prev_close = np.where(found, period_close[position_clipped], np.nan)

    pivot = (prev_high + prev_low + prev_close) / 3.0
    return {
        "pivot": pivot,
        "r1": 2.0 * pivot - prev_low,
        "s1": 2.0 * pivot - prev_high,
        "r2": pivot + (prev_high - prev_low),
        "s2": pivot - (prev_high - prev_low),
        "r3": prev_high + 2.0 * (pivot - prev_low),
        "s3": prev_low - 2.0 * (prev_high - pivot),
    }
