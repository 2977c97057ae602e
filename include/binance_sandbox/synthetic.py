"""Deterministic synthetic 1-minute candles, generated one UTC day at a time.

Two layers keep any day cheap to reach: a daily path (close, volatility, volume level
of every day, computed once per symbol for the whole horizon) and, per day, a 1-minute
Brownian bridge from the previous day's close to this day's close drawn from an RNG
seeded by (seed, symbol, day). A day therefore never depends on generating the days
before it, and paging through history always yields the same candles.

All values are integers: prices in cents (0.01 quote units), volumes in 1e-8 units.
"""

from __future__ import annotations

import math

import numpy as np

from .intervals import DAY_MS, HOUR_MS, MINUTES_PER_DAY
from .symbols import SymbolProfile

# BTCUSDT's first candle on Binance opened 2017-08-17 04:00 UTC; every synthetic symbol starts there.
HISTORY_START_MS = 1_502_942_400_000
FIRST_DAY_MS = HISTORY_START_MS - 4 * HOUR_MS  # 2017-08-17 00:00 UTC
FIRST_DAY_FIRST_MINUTE = 4 * 60
HORIZON_DAYS = 40 * 366  # the daily path is precomputed this far (to ~2057)
TREND_DAYS = 3_300  # the trend reaches profile.price_growth after ~9 years
VOLUME_RAMP_DAYS = 1_200

# Row order of a day's minute array.
OPEN, HIGH, LOW, CLOSE, VOLUME, QUOTE, TRADES, TAKER_BASE, TAKER_QUOTE = range(9)
FIELDS = 9


class DailyPath:
    """Close (cents), volatility and volume level of every day of the horizon."""

    def __init__(self, seed: int, profile: SymbolProfile):
        rng = np.random.default_rng([seed, profile.stable_id, 0])
        days = HORIZON_DAYS
        t = np.arange(days, dtype=np.float64)
        growth = math.log(profile.price_growth)
        trend = (
            math.log(profile.price_cents_start)
            + growth * np.minimum(t, TREND_DAYS) / TREND_DAYS
            + 0.0001 * np.maximum(t - TREND_DAYS, 0.0)
        )
        # Regimes of 30-200 days, each with its own drift and volatility.
        drift = np.empty(days)
        vol = np.empty(days)
        start = 0
        while start < days:
            length = int(rng.integers(30, 200))
            drift[start : start + length] = rng.normal(0.0, 0.004)
            vol[start : start + length] = rng.uniform(0.018, 0.055)
            start += length
        shocks = rng.standard_normal(days)
        deviation = np.empty(days)
        level = 0.0
        # Mean reversion towards the trend keeps nine years of noise within a sane band.
        for day in range(days):
            level = level * 0.99 + drift[day] + vol[day] * shocks[day]
            deviation[day] = level
        self.close_cents = np.maximum(np.rint(np.exp(trend + deviation)), 1).astype(np.int64)
        self.open_cents = np.concatenate(
            ([np.int64(profile.price_cents_start)], self.close_cents[:-1])
        )
        self.volatility = vol
        volume_trend = math.log(profile.daily_volume_start) + math.log(
            profile.daily_volume_end / profile.daily_volume_start
        ) * np.minimum(t, VOLUME_RAMP_DAYS) / VOLUME_RAMP_DAYS
        volume_noise = rng.normal(0.0, 0.25, days)
        self.daily_volume = np.exp(volume_trend + volume_noise) * (vol / 0.035)


def generate_day(seed: int, profile: SymbolProfile, path: DailyPath, day: int) -> np.ndarray:
    """The (9, 1440) int64 array of one day's 1-minute candles (all minutes, before masking)."""
    n = MINUTES_PER_DAY
    rng = np.random.default_rng([seed, profile.stable_id, 1, day])
    open_cents = int(path.open_cents[day])
    close_cents = int(path.close_cents[day])
    sigma = float(path.volatility[day]) / math.sqrt(n)

    steps = rng.standard_normal(n) * sigma
    steps *= np.where(rng.random(n) < 0.02, 3.0, 1.0)  # occasional fat-tailed minutes
    walk = np.cumsum(steps)
    fraction = np.arange(1, n + 1) / n
    bridge = walk - fraction * walk[-1]
    log_open, log_close = math.log(open_cents), math.log(close_cents)
    closes = np.maximum(np.rint(np.exp(log_open + fraction * (log_close - log_open) + bridge)), 1)
    closes = closes.astype(np.int64)
    closes[-1] = close_cents

    # A few minutes without trades; never the last one, so the day still closes on its path.
    idle = np.zeros(n, dtype=bool)
    idle[rng.integers(0, n - 1, size=rng.poisson(0.3))] = True
    if idle.any():
        index = np.arange(n)
        source = np.maximum.accumulate(np.where(idle, -1, index))
        closes = np.where(source >= 0, closes[np.maximum(source, 0)], open_cents)
    opens = np.concatenate(([open_cents], closes[:-1])).astype(np.int64)

    body_high = np.maximum(opens, closes)
    body_low = np.minimum(opens, closes)
    wick_up = np.abs(rng.standard_normal(n)) * sigma * 0.6
    wick_down = np.abs(rng.standard_normal(n)) * sigma * 0.6
    highs = np.maximum(np.ceil(body_high * np.exp(wick_up)).astype(np.int64), body_high)
    lows = np.minimum(np.floor(body_low * np.exp(-wick_down)).astype(np.int64), body_low)
    lows = np.maximum(lows, 1)
    highs = np.where(idle, opens, highs)
    lows = np.where(idle, opens, lows)

    step = profile.volume_step_units
    mean_units = float(path.daily_volume[day]) * 1e8 / n
    move = np.abs(np.log(closes / opens)) / max(sigma, 1e-12)
    activity = np.minimum(np.exp(rng.normal(-0.18, 0.6, n)) * (1.0 + 0.5 * move), 20.0)
    volume = np.maximum(np.rint(mean_units * activity / step), 1).astype(np.int64) * step
    volume = np.where(idle, 0, volume)

    trade_noise = np.exp(rng.normal(0.0, 0.2, n))
    trades = np.rint(volume / profile.trade_size_units * trade_noise).astype(np.int64)
    trades = np.clip(trades, 1, np.maximum(volume // step, 1))
    trades = np.where(idle, 0, trades)

    taker_share = rng.uniform(0.3, 0.7, n)
    taker_base = (np.floor(volume * taker_share / step).astype(np.int64)) * step
    # The candle's own VWAP lies inside [low, high]; quote volume = volume x VWAP, exact in 1e-8.
    vwap = lows + np.floor((highs - lows) * rng.uniform(0.2, 0.8, n)).astype(np.int64)
    quote = _units_times_cents(volume, vwap)
    taker_quote = _units_times_cents(taker_base, vwap)
    return np.stack(
        [opens, highs, lows, closes, volume, quote, trades, taker_base, taker_quote]
    ).astype(np.int64)


def _units_times_cents(units: np.ndarray, cents: np.ndarray) -> np.ndarray:
    """floor(units * cents / 100) without overflowing int64 on the product."""
    return (units // 100) * cents + (units % 100) * cents // 100


def day_start_ms(day: int) -> int:
    return FIRST_DAY_MS + day * DAY_MS


def day_of(ts_ms: int) -> int:
    return (ts_ms - FIRST_DAY_MS) // DAY_MS
