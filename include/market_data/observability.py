"""Metrics and structured logs for task code.

Metrics go through Airflow's stats backend so ``[metrics] statsd_*`` routes them
(DESIGN.md, "Metrics and logs"); logs go through structlog, which Airflow's task logging
renders as JSON lines with the key-value pairs as fields.
"""

from __future__ import annotations

import logging
import os

import structlog
from binance_provider.metrics import emit  # the project's one metrics helper


class _LevelFilteredLogger:
    """Drops calls below ``LOG_LEVEL`` before they reach Airflow's structlog pipeline."""

    def __init__(self, logger, level: int):
        self._logger = logger
        self._level = level

    def bind(self, **values) -> "_LevelFilteredLogger":
        return _LevelFilteredLogger(self._logger.bind(**values), self._level)

    def _emit(self, level: int, method: str, event: str, **fields) -> None:
        if level >= self._level:
            getattr(self._logger, method)(event, **fields)

    def debug(self, event: str, **fields) -> None:
        self._emit(logging.DEBUG, "debug", event, **fields)

    def info(self, event: str, **fields) -> None:
        self._emit(logging.INFO, "info", event, **fields)

    def warning(self, event: str, **fields) -> None:
        self._emit(logging.WARNING, "warning", event, **fields)

    def error(self, event: str, **fields) -> None:
        self._emit(logging.ERROR, "error", event, **fields)

    def exception(self, event: str, **fields) -> None:
        self._emit(logging.ERROR, "exception", event, **fields)


def get_logger(name: str) -> _LevelFilteredLogger:
    """A structlog logger honouring ``LOG_LEVEL`` (name it after the module, not the DAG file)."""
    level = getattr(logging, os.environ.get("LOG_LEVEL", "INFO").upper(), logging.INFO)
    return _LevelFilteredLogger(structlog.get_logger(name), level)


def incr(name: str, count: int = 1, tags: dict[str, str] | None = None) -> None:
    emit("incr", name, count, tags=tags)


def gauge(name: str, value: float, tags: dict[str, str] | None = None) -> None:
    emit("gauge", name, value, tags=tags)


def timing(name: str, milliseconds: float, tags: dict[str, str] | None = None) -> None:
    emit("timing", name, milliseconds, tags=tags)
