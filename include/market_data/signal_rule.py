"""The daily trade rule: curated 1d, 4h and 1h candles of one symbol in, one recommendation out.

A pure function of the rows it is given: no I/O, no clock, no randomness, so the same
curated data always gives the same signal. Only candles that closed before ``cutoff``
are read, whatever the caller passes, so a candle closing after the recommendation time
cannot change it.

The rule (documented for the README in the same words):

* Four factors each cast a vote in {-1, 0, +1} with a fixed weight:
  ``trend_1d`` (2.0) last 1d close vs its 20- and 50-day simple moving averages, +1 only
  when ``close > SMA20 > SMA50``, -1 only when ``close < SMA20 < SMA50``, each gap wider
  than 0.1 x 1d ATR;
  ``momentum_4h`` (1.5) sum of the last six 4h log returns (24 hours) against a dead band
  of half a 4h ATR (as a fraction of the close);
  ``vwap_1h`` (1.0) last 1h close vs the session VWAP, dead band 0.1 x 1h ATR;
  ``pivot_1h`` (1.0) last 1h close vs today's floor pivot, dead band 0.1 x 1h ATR.
  A factor whose inputs are null votes 0 ("insufficient data") but keeps its weight.
* ``score = sum(weight * vote) / sum(weight)`` in [-1, 1]; long when score >= 0.25, short
  when score <= -0.25, flat otherwise.
* ``volatility_regime`` does not vote (weight 0): the 1h realized volatility over its own
  median of the last 120 hours; at 1.5x or more the regime is high and the confidence is
  multiplied by 0.6. ``confidence = |score| x damper``.
* Entry is the last 1h close. Risk unit A is the 4h ATR(14) (2 x 1h ATR when the 4h one is
  null). The stop goes 0.1 A beyond the nearest key level (today's pivots, 1h and 4h
  support/resistance) lying 0.5 A to 2.4 A away on the losing side, else at 1.5 A.
  With R the entry-stop distance, the target is the nearest key level on the winning side
  between 1.5 R and 3 R away, else 2 R. Flat signals carry the entry only.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from datetime import datetime

import numpy as np
import pandas as pd

from include.market_data.timeframes import to_utc

SIGNAL_INTERVALS: tuple[str, ...] = ("1d", "4h", "1h")

TREND_FAST_DAYS = 20
TREND_SLOW_DAYS = 50
MOMENTUM_CANDLES_4H = 6  # 24 hours
VOL_REGIME_CANDLES_1H = 120  # 5 days: also what the chart shows

# Closed candles of each timeframe the rule reads (after the cutoff filter). Callers should
# load a few candles more so that an exchange outage does not starve the rule.
HISTORY_NEEDED: dict[str, int] = {
    "1d": TREND_SLOW_DAYS,
    "4h": MOMENTUM_CANDLES_4H,
    "1h": VOL_REGIME_CANDLES_1H,
}

FACTOR_WEIGHTS: dict[str, float] = {
    "trend_1d": 2.0,
    "momentum_4h": 1.5,
    "vwap_1h": 1.0,
    "pivot_1h": 1.0,
}
DIRECTION_THRESHOLD = 0.25
MOMENTUM_BAND_ATR = 0.5  # of the 4h ATR, as a fraction of the 4h close
PRICE_BAND_ATR = 0.1  # of the 1h ATR, for the vwap and pivot factors
TREND_BAND_ATR = 0.1  # of the 1d ATR, for each gap of close > SMA20 > SMA50
HIGH_VOL_RATIO = 1.5
HIGH_VOL_DAMPER = 0.6
MIN_VOL_SAMPLES = 24  # finite realized-vol values needed for a median worth the name

STOP_ATR = 1.5
STOP_LEVEL_MIN_ATR = 0.5  # a closer level would be inside the noise
STOP_LEVEL_MAX_ATR = 2.4  # with the buffer, the stop is never more than 2.5 A away
STOP_BUFFER_ATR = 0.1
MIN_REWARD_RISK = 1.5
MAX_REWARD_RISK = 3.0
DEFAULT_REWARD_RISK = 2.0

KEY_LEVELS_1H = ("pivot", "r1", "r2", "r3", "s1", "s2", "s3", "support", "resistance")
KEY_LEVELS_4H = ("support", "resistance")

REQUIRED_COLUMNS: dict[str, tuple[str, ...]] = {
    "1d": ("open_time", "close_time", "close", "atr_14"),
    "4h": ("open_time", "close_time", "close", "log_return", "atr_14", "support", "resistance"),
    "1h": (
        "open_time", "close_time", "close", "atr_14", "vwap", "realized_volatility",
        *KEY_LEVELS_1H,
    ),
}

# Every signal dict, ok or stale, has exactly these keys in this order.
SIGNAL_KEYS: tuple[str, ...] = (
    "symbol", "as_of", "status", "reason", "direction", "confidence",
    "entry", "stop_loss", "take_profit", "factors", "inputs", "lag_seconds",
)

INSUFFICIENT = "insufficient data"


def compute_signal(
    frames: Mapping[str, pd.DataFrame], *, symbol: str, cutoff: datetime | str | int
) -> dict:
    """The recommendation for ``symbol`` from candles that closed before ``cutoff``.

    ``frames`` maps each of :data:`SIGNAL_INTERVALS` to that timeframe's curated rows
    (other symbols' rows and rows closing at or after ``cutoff`` are ignored; a naive
    ``cutoff`` is UTC). The result has the keys :data:`SIGNAL_KEYS`; ``reason`` and
    ``lag_seconds`` are left ``None`` for the caller, who knows the freshness.
    Raises ``ValueError`` naming the timeframe when a frame is missing, lacks a column,
    holds duplicate candles or fewer closed candles than :data:`HISTORY_NEEDED`, and when
    a directional signal finds no ATR to size its stop.
    """
    cutoff_ts = pd.Timestamp(to_utc(cutoff))
    closed = {
        interval: _closed_rows(frames, interval, symbol, cutoff_ts)
        for interval in SIGNAL_INTERVALS
    }
    daily, four_hour, hourly = closed["1d"], closed["4h"], closed["1h"]
    last_1h = hourly.iloc[-1]
    entry = _finite(last_1h["close"])
    if entry is None:
        raise ValueError(f"1h: the newest {symbol} close is not a finite number")
    atr_1h = _finite(last_1h["atr_14"])

    factors = {
        "trend_1d": _trend_factor(
            daily["close"].to_numpy(dtype="float64"), _finite(daily.iloc[-1]["atr_14"])
        ),
        "momentum_4h": _momentum_factor(four_hour),
        "vwap_1h": _price_vs_level_factor(entry, _finite(last_1h["vwap"]), atr_1h, "session VWAP"),
        "pivot_1h": _price_vs_level_factor(entry, _finite(last_1h["pivot"]), atr_1h, "today's pivot"),
    }
    for name, weight in FACTOR_WEIGHTS.items():
        factors[name]["weight"] = weight
    volatility, damper = _volatility_regime(hourly["realized_volatility"].to_numpy(dtype="float64"))
    factors["volatility_regime"] = volatility

    score = sum(FACTOR_WEIGHTS[n] * factors[n]["vote"] for n in FACTOR_WEIGHTS) / sum(
        FACTOR_WEIGHTS.values()
    )
    if score >= DIRECTION_THRESHOLD:
        direction = "long"
    elif score <= -DIRECTION_THRESHOLD:
        direction = "short"
    else:
        direction = "flat"
    confidence = min(1.0, max(0.0, round(abs(score) * damper, 4)))

    stop_loss = take_profit = None
    if direction != "flat":
        risk_unit = _risk_unit(_finite(four_hour.iloc[-1]["atr_14"]), atr_1h)
        levels = _key_levels(last_1h, four_hour.iloc[-1])
        side = 1 if direction == "long" else -1
        stop_loss, take_profit = _stop_and_target(entry, side, risk_unit, levels)

    inputs = {interval: _input_record(closed[interval].iloc[-1]) for interval in SIGNAL_INTERVALS}
    as_of = max(closed[interval].iloc[-1]["close_time"] for interval in SIGNAL_INTERVALS)
    return _signal(
        symbol=symbol,
        as_of=_iso(as_of),
        status="ok",
        direction=direction,
        confidence=confidence,
        entry=entry,
        stop_loss=_price(stop_loss),
        take_profit=_price(take_profit),
        factors={name: _json_safe_factor(f) for name, f in factors.items()},
        inputs=inputs,
    )


def stale_signal(
    *, symbol: str, reason: str, lags: Mapping[str, float | None], inputs: Mapping
) -> dict:
    """A signal that gives no direction because the inputs are not fresh.

    ``inputs`` is per timeframe the newest candle seen (as in an ok signal) or ``None``;
    ``as_of`` is the newest ``close_time`` among them, ``None`` when there is none.
    """
    close_times = [
        record["close_time"]
        for record in inputs.values()
        if isinstance(record, Mapping) and record.get("close_time")
    ]
    return _signal(
        symbol=symbol,
        as_of=max(close_times) if close_times else None,
        status="stale_data",
        reason=reason,
        inputs={interval: (dict(r) if isinstance(r, Mapping) else None) for interval, r in inputs.items()},
        lag_seconds={interval: _finite(lag) for interval, lag in lags.items()},
    )


def input_record(row: Mapping) -> dict:
    """``{"open_time", "close_time", "close"}`` of one candle, as in a signal's ``inputs``."""
    return _input_record(row)


# --- factors -------------------------------------------------------------------------------


def _factor(value: float | None, vote: int, detail: str, weight: float = 0.0) -> dict:
    return {"value": value, "vote": vote, "weight": weight, "detail": detail}


def _trend_factor(daily_close: np.ndarray, atr: float | None) -> dict:
    close = _finite(daily_close[-1])
    fast = _finite(daily_close[-TREND_FAST_DAYS:].mean())
    slow = _finite(daily_close[-TREND_SLOW_DAYS:].mean())
    if close is None or fast is None or slow is None or atr is None:
        return _factor(None, 0, INSUFFICIENT)
    band = TREND_BAND_ATR * atr
    if close - fast > band and fast - slow > band:
        vote, verdict = 1, "close > SMA20 > SMA50: uptrend"
    elif fast - close > band and slow - fast > band:
        vote, verdict = -1, "close < SMA20 < SMA50: downtrend"
    else:
        vote, verdict = 0, "not stacked: no trend"
    detail = (
        f"1d close {_fmt(close)}, SMA20 {_fmt(fast)}, SMA50 {_fmt(slow)}, "
        f"gaps must exceed {_fmt(band)} ({TREND_BAND_ATR} x 1d ATR); {verdict}"
    )
    return _factor(close / slow - 1.0, vote, detail)


def _momentum_factor(four_hour: pd.DataFrame) -> dict:
    returns = four_hour["log_return"].to_numpy(dtype="float64")[-MOMENTUM_CANDLES_4H:]
    last = four_hour.iloc[-1]
    atr, close = _finite(last["atr_14"]), _finite(last["close"])
    if not np.isfinite(returns).all() or atr is None or not close:
        return _factor(None, 0, INSUFFICIENT)
    momentum = float(returns.sum())
    band = MOMENTUM_BAND_ATR * atr / close
    vote = _vote(momentum, band)
    detail = (
        f"sum of last {MOMENTUM_CANDLES_4H} 4h log returns {momentum:+.4f} "
        f"vs dead band ±{band:.4f} ({MOMENTUM_BAND_ATR} x 4h ATR / close)"
    )
    return _factor(momentum, vote, detail)


def _price_vs_level_factor(price: float, level: float | None, atr: float | None, name: str) -> dict:
    if level is None or atr is None or level <= 0:
        return _factor(None, 0, INSUFFICIENT)
    vote = _vote(price - level, PRICE_BAND_ATR * atr)
    where = {1: "above", -1: "below", 0: "within the dead band of"}[vote]
    detail = (
        f"1h close {_fmt(price)} {where} {name} {_fmt(level)} "
        f"(dead band ±{_fmt(PRICE_BAND_ATR * atr)} = {PRICE_BAND_ATR} x 1h ATR)"
    )
    return _factor(price / level - 1.0, vote, detail)


def _volatility_regime(realized_vol: np.ndarray) -> tuple[dict, float]:
    """The regime factor (never votes) and the confidence damper it implies."""
    window = realized_vol[-VOL_REGIME_CANDLES_1H:]
    current = _finite(window[-1])
    history = window[np.isfinite(window)]
    if current is None or history.size < MIN_VOL_SAMPLES or np.median(history) <= 0:
        return _factor(None, 0, f"{INSUFFICIENT}; confidence not damped"), 1.0
    median = float(np.median(history))
    ratio = current / median
    high = ratio >= HIGH_VOL_RATIO
    damper = HIGH_VOL_DAMPER if high else 1.0
    detail = (
        f"1h realized volatility {current:.1%} vs {VOL_REGIME_CANDLES_1H}h median {median:.1%} "
        f"(x{ratio:.2f}): {'high' if high else 'normal'} regime, confidence x{damper}"
    )
    return _factor(ratio, 0, detail), damper


def _vote(value: float, band: float) -> int:
    if value > band:
        return 1
    if value < -band:
        return -1
    return 0


# --- stop and target -----------------------------------------------------------------------


def _risk_unit(atr_4h: float | None, atr_1h: float | None) -> float:
    if atr_4h is not None and atr_4h > 0:
        return atr_4h
    if atr_1h is not None and atr_1h > 0:
        # ATR grows roughly with the square root of time: 4h ~ 2 x 1h.
        return 2.0 * atr_1h
    raise ValueError("neither the 4h nor the 1h ATR(14) is available for the newest candle")


def _key_levels(last_1h: pd.Series, last_4h: pd.Series) -> list[float]:
    values = [last_1h[name] for name in KEY_LEVELS_1H] + [last_4h[name] for name in KEY_LEVELS_4H]
    return sorted({v for v in (_finite(x) for x in values) if v is not None and v > 0})


def _stop_and_target(entry: float, side: int, atr: float, levels: list[float]) -> tuple[float, float]:
    """``side`` is +1 for long, -1 for short; distances are measured in the trade's favour."""
    below_or_above = [(side * (entry - level), level) for level in levels]
    stop_levels = [
        (distance, level)
        for distance, level in below_or_above
        if STOP_LEVEL_MIN_ATR * atr <= distance <= STOP_LEVEL_MAX_ATR * atr
    ]
    if stop_levels:
        _, level = min(stop_levels)
        stop = level - side * STOP_BUFFER_ATR * atr
    else:
        stop = entry - side * STOP_ATR * atr
    risk = side * (entry - stop)
    target_levels = [
        (-distance, level)
        for distance, level in below_or_above
        if MIN_REWARD_RISK * risk <= -distance <= MAX_REWARD_RISK * risk
    ]
    if target_levels:
        _, target = min(target_levels)
    else:
        target = entry + side * DEFAULT_REWARD_RISK * risk
    return stop, target


# --- input handling and output shape -------------------------------------------------------


def _closed_rows(
    frames: Mapping[str, pd.DataFrame], interval: str, symbol: str, cutoff: pd.Timestamp
) -> pd.DataFrame:
    frame = frames.get(interval)
    if frame is None:
        raise ValueError(f"no {interval} frame given; the signal needs {', '.join(SIGNAL_INTERVALS)}")
    missing = [c for c in REQUIRED_COLUMNS[interval] if c not in frame.columns]
    if missing:
        raise ValueError(f"{interval} frame lacks column(s) {', '.join(missing)}")
    if "symbol" in frame.columns:
        frame = frame[frame["symbol"] == symbol]
    close_time = _utc_times(frame["close_time"])
    rows = frame[(close_time < cutoff).to_numpy()]
    rows = rows.assign(
        open_time=_utc_times(rows["open_time"]), close_time=_utc_times(rows["close_time"])
    ).sort_values("open_time", kind="stable")
    if rows["open_time"].duplicated().any():
        raise ValueError(f"{interval} frame holds duplicate open_time rows for {symbol}")
    needed = HISTORY_NEEDED[interval]
    if len(rows) < needed:
        raise ValueError(
            f"{interval}: {len(rows)} {symbol} candle(s) closed before {_iso(cutoff)}, "
            f"the signal needs {needed}"
        )
    return rows.reset_index(drop=True)


def _utc_times(column: pd.Series) -> pd.Series:
    if pd.api.types.is_numeric_dtype(column):
        return pd.to_datetime(column, unit="ms", utc=True)
    return pd.to_datetime(column, utc=True)


def _input_record(row: Mapping) -> dict:
    return {
        "open_time": _iso(pd.Timestamp(row["open_time"])),
        "close_time": _iso(pd.Timestamp(row["close_time"])),
        "close": float(row["close"]),
    }


def _signal(**fields) -> dict:
    unknown = set(fields) - set(SIGNAL_KEYS)
    if unknown:
        raise TypeError(f"not signal fields: {', '.join(sorted(unknown))}")
    signal = {key: fields.get(key) for key in SIGNAL_KEYS}
    if signal["factors"] is None:
        signal["factors"] = {}
    if signal["inputs"] is None:
        signal["inputs"] = {}
    return signal


def _json_safe_factor(factor: dict) -> dict:
    value = _finite(factor["value"])
    return {
        "value": None if value is None else round(value, 6),
        "vote": int(factor["vote"]),
        "weight": float(factor["weight"]),
        "detail": factor["detail"],
    }


def _iso(ts: pd.Timestamp) -> str:
    """ISO-8601 UTC with milliseconds, e.g. ``2024-05-01T11:59:59.999Z``."""
    ts = pd.Timestamp(ts)
    ts = ts.tz_localize("UTC") if ts.tzinfo is None else ts.tz_convert("UTC")
    return ts.strftime("%Y-%m-%dT%H:%M:%S.") + f"{ts.microsecond // 1000:03d}Z"


def _finite(value) -> float | None:
    if value is None:
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def _price(value: float | None) -> float | None:
    """A computed level to 10 significant digits: finer than any Binance tick, free of float noise."""
    value = _finite(value)
    return None if value is None else float(f"{value:.10g}")


def _fmt(value: float) -> str:
    return f"{value:.8g}"
