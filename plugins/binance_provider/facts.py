"""Binance facts the provider owns: hosts, connection ids, the symbol pattern, and the small
settings object the hook runs with (the pipeline's ``config.Settings`` builds one).

No Airflow import and nothing from ``include``: the domain uses the provider, never the other way.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass

DEFAULT_BINANCE_HOST = "https://data-api.binance.vision"
BINANCE_CONN_ID = "binance_default"
# The public data archive (monthly and daily kline zips with a .CHECKSUM beside each): a CDN host.
DEFAULT_ARCHIVE_HOST = "https://data.binance.vision"
ARCHIVE_CONN_ID = "binance_archive"
SYMBOL_PATTERN = r"^[A-Z0-9]{5,20}$"
_SYMBOL_RE = re.compile(SYMBOL_PATTERN)
# Weight of the heaviest request the pipeline sends (/api/v3/exchangeInfo of one symbol).
MAX_REQUEST_WEIGHT = 20


def validate_symbol(symbol: object, name: str = "symbol") -> str:
    """Return ``symbol`` if it is a Binance spot symbol, else ``ValueError`` naming ``name``."""
    if not isinstance(symbol, str) or not _SYMBOL_RE.match(symbol):
        raise ValueError(
            f"{name}={symbol!r} is not a Binance symbol: expected upper-case letters/digits "
            f"matching {SYMBOL_PATTERN} (e.g. BTCUSDT)"
        )
    return symbol


@dataclass(frozen=True)
class HookSettings:
    """What the hook needs: its weight budget per window, in-process concurrency, log level."""

    rate_limit_weight: int = 6000
    rate_limit_window_s: float = 60.0
    rate_limit_safety: float = 0.8
    max_concurrency: int = 4
    log_level: str = "INFO"

    @property
    def rate_limit_budget(self) -> int:
        """Weight the client allows itself per window."""
        return max(1, int(self.rate_limit_weight * self.rate_limit_safety))

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> "HookSettings":
        """The hook's own variables only (a bad unrelated pipeline variable never stops the hook);
        a bad one of these raises ``ValueError`` naming it."""
        env = os.environ if env is None else env

        def value(name: str, default, convert, valid) -> object:
            raw = (env.get(name) or "").strip()
            if not raw:
                return default
            try:
                parsed = convert(raw)
            except ValueError:
                raise ValueError(f"{name}={raw!r} is not a valid {convert.__name__}") from None
            if not valid(parsed):
                raise ValueError(f"{name}={raw!r} is out of range")
            return parsed

        return cls(
            rate_limit_weight=value("BINANCE_RATE_LIMIT_WEIGHT", cls.rate_limit_weight, int, lambda v: v >= 1),
            rate_limit_window_s=value("BINANCE_RATE_LIMIT_WINDOW_S", cls.rate_limit_window_s, float, lambda v: v > 0),
            rate_limit_safety=value("BINANCE_RATE_LIMIT_SAFETY", cls.rate_limit_safety, float,
                                    lambda v: 0 < v <= 1),
            max_concurrency=value("BINANCE_MAX_CONCURRENCY", cls.max_concurrency, int, lambda v: v >= 1),
            log_level=value("LOG_LEVEL", cls.log_level, str.upper,
                            lambda v: isinstance(logging.getLevelName(v), int)),
        )
