"""Every setting of the pipeline, read from the environment, with its default.

This is the one place defaults live (DESIGN.md, "Configuration"). A bad value raises
:class:`ConfigError` naming the variable, before anything runs.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from datetime import date, datetime, timezone
from typing import Mapping

from binance_provider.facts import (  # Binance facts belong to the provider; re-exported for the domain
    BINANCE_CONN_ID,
    DEFAULT_BINANCE_HOST,
    MAX_REQUEST_WEIGHT,
    SYMBOL_PATTERN,
    HookSettings,
    validate_symbol,
)
from binance_provider.hooks.intervals import BINANCE_INTERVALS_MS

# The six timeframes this pipeline ingests and curates.
PIPELINE_INTERVALS: tuple[str, ...] = ("15m", "30m", "1h", "4h", "1d", "1w")

LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")


class ConfigError(ValueError):
    """A configuration value a user set is wrong; the message names the variable."""


@dataclass(frozen=True)
class Settings:
    symbols: tuple[str, ...] = ("BTCUSDT",)
    intervals: tuple[str, ...] = PIPELINE_INTERVALS
    rate_limit_weight: int = HookSettings.rate_limit_weight
    rate_limit_window_s: float = HookSettings.rate_limit_window_s
    rate_limit_safety: float = HookSettings.rate_limit_safety
    max_concurrency: int = HookSettings.max_concurrency
    pool: str = "binance_api"
    pool_slots: int = 4
    raw_data_dir: str = "data/raw"
    curated_data_dir: str = "data/curated"
    signal_data_dir: str = "data/signals"
    slow_intervals_schedule: str = "close"
    ingest_start: date = date(2017, 8, 17)
    gap_check_lookback_days: int = 3
    recommendation_hour: int = 12
    recommendation_minute: int = 0
    log_level: str = "INFO"
    quarantine_retention_days: int = 30

    @property
    def rate_limit_budget(self) -> int:
        """Weight the client allows itself per window."""
        return self.hook_settings().rate_limit_budget

    def hook_settings(self) -> HookSettings:
        """The provider's settings object: what the hook needs of this configuration."""
        return HookSettings(rate_limit_weight=self.rate_limit_weight, rate_limit_window_s=self.rate_limit_window_s,
                            rate_limit_safety=self.rate_limit_safety, max_concurrency=self.max_concurrency,
                            log_level=self.log_level)

    @property
    def ingest_start_ms(self) -> int:
        return int(datetime(self.ingest_start.year, self.ingest_start.month, self.ingest_start.day,
                            tzinfo=timezone.utc).timestamp() * 1000)


def _get(env: Mapping[str, str], name: str, default: str) -> str:
    value = env.get(name)
    return default if value is None or value.strip() == "" else value.strip()


def _int(env: Mapping[str, str], name: str, default: int, minimum: int) -> int:
    raw = _get(env, name, str(default))
    try:
        value = int(raw)
    except ValueError:
        raise ConfigError(f"{name}={raw!r} is not an integer") from None
    if value < minimum:
        raise ConfigError(f"{name}={raw!r} must be >= {minimum}")
    return value


def _float(env: Mapping[str, str], name: str, default: float, low: float, high: float | None = None) -> float:
    raw = _get(env, name, str(default))
    try:
        value = float(raw)
    except ValueError:
        raise ConfigError(f"{name}={raw!r} is not a number") from None
    if not value > low or (high is not None and value > high):
        bound = f"in ({low}, {high}]" if high is not None else f"> {low}"
        raise ConfigError(f"{name}={raw!r} must be {bound}")
    return value


def _list(env: Mapping[str, str], name: str, default: str) -> tuple[str, ...]:
    items = tuple(part.strip() for part in _get(env, name, default).split(",") if part.strip())
    if not items:
        raise ConfigError(f"{name} is empty")
    if len(set(items)) != len(items):
        raise ConfigError(f"{name}={','.join(items)!r} lists a value twice")
    return items


def load_settings(env: Mapping[str, str] | None = None) -> Settings:
    """Read :class:`Settings` from ``env`` (default ``os.environ``)."""
    env = os.environ if env is None else env

    symbols = _list(env, "BINANCE_SYMBOLS", "BTCUSDT")
    for symbol in symbols:
        try:
            validate_symbol(symbol, "BINANCE_SYMBOLS")
        except ValueError as exc:
            raise ConfigError(str(exc)) from None

    intervals = _list(env, "BINANCE_INTERVALS", ",".join(PIPELINE_INTERVALS))
    unknown = [i for i in intervals if i not in PIPELINE_INTERVALS]
    if unknown:
        raise ConfigError(
            f"BINANCE_INTERVALS has unknown interval(s) {', '.join(map(repr, unknown))}; "
            f"supported: {','.join(PIPELINE_INTERVALS)}"
        )
    assert all(i in BINANCE_INTERVALS_MS for i in intervals)

    slow = _get(env, "SLOW_INTERVALS_SCHEDULE", "close")
    if slow not in ("close", "15m"):
        raise ConfigError(f"SLOW_INTERVALS_SCHEDULE={slow!r} must be 'close' or '15m'")

    raw_start = _get(env, "INGEST_START", "2017-08-17")
    try:
        ingest_start = date.fromisoformat(raw_start)
    except ValueError:
        raise ConfigError(f"INGEST_START={raw_start!r} is not a date (YYYY-MM-DD)") from None

    raw_time = _get(env, "RECOMMENDATION_UPDATE_TIME", "12:00")
    match = re.fullmatch(r"(\d{1,2}):(\d{2})", raw_time)
    if not match or int(match[1]) > 23 or int(match[2]) > 59:
        raise ConfigError(f"RECOMMENDATION_UPDATE_TIME={raw_time!r} is not a UTC time HH:MM")

    log_level = _get(env, "LOG_LEVEL", "INFO").upper()
    if log_level not in LOG_LEVELS:
        raise ConfigError(f"LOG_LEVEL={log_level!r} must be one of {', '.join(LOG_LEVELS)}")

    pool = _get(env, "BINANCE_POOL", "binance_api")
    if not re.fullmatch(r"[A-Za-z0-9_.-]{1,256}", pool):
        raise ConfigError(f"BINANCE_POOL={pool!r} is not a valid pool name")

    settings = Settings(
        symbols=symbols,
        intervals=intervals,
        rate_limit_weight=_int(env, "BINANCE_RATE_LIMIT_WEIGHT", 6000, 1),
        rate_limit_window_s=_float(env, "BINANCE_RATE_LIMIT_WINDOW_S", 60.0, 0.0),
        rate_limit_safety=_float(env, "BINANCE_RATE_LIMIT_SAFETY", 0.8, 0.0, 1.0),
        max_concurrency=_int(env, "BINANCE_MAX_CONCURRENCY", 4, 1),
        pool=pool,
        pool_slots=_int(env, "BINANCE_POOL_SLOTS", 4, 1),
        raw_data_dir=_get(env, "RAW_DATA_DIR", "data/raw"),
        curated_data_dir=_get(env, "CURATED_DATA_DIR", "data/curated"),
        signal_data_dir=_get(env, "SIGNAL_DATA_DIR", "data/signals"),
        slow_intervals_schedule=slow,
        ingest_start=ingest_start,
        gap_check_lookback_days=_int(env, "GAP_CHECK_LOOKBACK_DAYS", 3, 0),
        recommendation_hour=int(match[1]),
        recommendation_minute=int(match[2]),
        log_level=log_level,
        quarantine_retention_days=_int(env, "QUARANTINE_RETENTION_DAYS", 30, 0),
    )
    if settings.rate_limit_budget < MAX_REQUEST_WEIGHT:
        raise ConfigError(
            f"BINANCE_RATE_LIMIT_WEIGHT x BINANCE_RATE_LIMIT_SAFETY = {settings.rate_limit_budget} is below "
            f"{MAX_REQUEST_WEIGHT}, the weight of the heaviest request the pipeline sends (exchangeInfo)"
        )
    return settings
