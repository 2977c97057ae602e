"""Injected failures: what they are, how they are set, and what each request suffers.

Rates draw from one seeded RNG so a run is reproducible; ``*_next`` counters and the
429/418 storms are deterministic whatever the seed.
"""

from __future__ import annotations

import random
import threading
from dataclasses import dataclass

from .intervals import parse_time
from .market import Outage

DEFAULTS = {
    "latency_ms": 0.0,
    "jitter_ms": 0.0,
    "error_rate": 0.0,
    "hang_rate": 0.0,
    "hang_s": 15.0,
    "truncate_rate": 0.0,
    "garbage_rate": 0.0,
    "storm_429": 0,
    "retry_after_s": 1,
    "ban_418": 0,
    "ban_s": None,  # None: the server's ban length
    "error_next": 0,
    "hang_next": 0,
    "truncate_next": 0,
    "garbage_next": 0,
    "outages": [],
    "endpoints": None,  # None: every /api/v3 endpoint
}
_RATES = ("error_rate", "hang_rate", "truncate_rate", "garbage_rate")
_COUNTS = ("storm_429", "ban_418", "error_next", "hang_next", "truncate_next", "garbage_next")
_DURATIONS = ("latency_ms", "jitter_ms", "hang_s")

ERROR_STATUSES = (500, 502, 503, 504)
_JSON_ERROR = b'{"code":-1001,"msg":"Internal error; unable to process your request. Please try again."}'
_HTML_ERROR = (
    "<html>\r\n<head><title>{status} {reason}</title></head>\r\n<body>\r\n"
    "<center><h1>{status} {reason}</h1></center>\r\n<hr><center>CloudFront</center>\r\n</body>\r\n</html>\r\n"
)
_REASONS = {500: "Internal Server Error", 502: "Bad Gateway", 503: "Service Unavailable", 504: "Gateway Timeout"}
GARBAGE_BODY = b"<html><body><h1>Maintenance</h1><p>Please come back later.</p></body></html>"


class FaultError(ValueError):
    """A fault setting that cannot be used; the message names it."""


def parse_outage(spec) -> Outage:
    """{"symbol": optional, "start": ms or ISO, "end": ms or ISO} -> Outage."""
    if not isinstance(spec, dict) or "start" not in spec or "end" not in spec:
        raise FaultError(f"outage {spec!r} must be an object with 'start' and 'end'")
    try:
        start, end = parse_time(spec["start"]), parse_time(spec["end"])
    except (TypeError, ValueError) as exc:
        raise FaultError(f"outage {spec!r}: start/end must be ms or ISO-8601 ({exc})") from None
    if start >= end:
        raise FaultError(f"outage {spec!r}: start must be before end")
    symbol = spec.get("symbol")
    if symbol is not None and not isinstance(symbol, str):
        raise FaultError(f"outage {spec!r}: symbol must be a string")
    return Outage(start, end, symbol.upper() if symbol else None)


def _endpoint_name(text: str) -> str:
    """'/api/v3/klines' and 'klines' both name the klines endpoint."""
    return text.strip().removeprefix("/").removeprefix("api/v3/").strip("/")


@dataclass
class FaultPlan:
    """What to do to one request, decided before it is served."""

    ban_s: int | None = None
    storm_retry_after_s: int | None = None
    delay_s: float = 0.0
    hang_s: float = 0.0
    error_status: int | None = None
    error_body: bytes = b""
    garbage: bool = False
    truncate: bool = False


class FaultInjector:
    def __init__(self, faults: dict | None = None, seed: int = 0):
        self._lock = threading.Lock()
        self._rng = random.Random(seed)
        self._settings = dict(DEFAULTS)
        self._outages: tuple[Outage, ...] = ()
        if faults:
            self.update(faults)

    def update(self, changes: dict) -> dict:
        """Merge ``changes`` into the current faults (all validated before any applies)."""
        if not isinstance(changes, dict):
            raise FaultError("faults must be a JSON object")
        unknown = sorted(set(changes) - set(DEFAULTS))
        if unknown:
            raise FaultError(f"unknown fault setting(s) {unknown}; known: {sorted(DEFAULTS)}")
        validated, outages = {}, None
        for key, value in changes.items():
            if key in _RATES:
                validated[key] = _number(key, value, 0.0, 1.0)
            elif key in _DURATIONS:
                validated[key] = _number(key, value, 0.0, None)
            elif key in _COUNTS or key == "retry_after_s":
                validated[key] = _count(key, value)
            elif key == "ban_s":
                validated[key] = None if value is None else _count(key, value)
            elif key == "outages":
                if not isinstance(value, list):
                    raise FaultError("outages must be a list of {symbol?, start, end}")
                outages = tuple(parse_outage(spec) for spec in value)
                validated[key] = [o.as_dict() for o in outages]
            elif key == "endpoints":
                if value is not None and (
                    not isinstance(value, list) or not all(isinstance(v, str) for v in value)
                ):
                    raise FaultError("endpoints must be a list of endpoint paths, e.g. ['/api/v3/klines']")
                validated[key] = None if value is None else [_endpoint_name(v) for v in value]
        with self._lock:
            self._settings.update(validated)
            if outages is not None:
                self._outages = outages
            return dict(self._settings)

    def clear(self) -> None:
        with self._lock:
            self._settings = dict(DEFAULTS)
            self._outages = ()

    def current(self) -> dict:
        with self._lock:
            return dict(self._settings)

    @property
    def outages(self) -> tuple[Outage, ...]:
        return self._outages

    def plan(self, endpoint: str) -> FaultPlan:
        """Decide the faults for one request to ``endpoint`` (e.g. 'klines'); consumes counters."""
        plan = FaultPlan()
        with self._lock:
            s = self._settings
            if s["endpoints"] is not None and _endpoint_name(endpoint) not in s["endpoints"]:
                return plan
            if s["ban_418"] > 0:
                s["ban_418"] -= 1
                plan.ban_s = s["ban_s"]
                return plan
            if s["storm_429"] > 0:
                s["storm_429"] -= 1
                plan.storm_retry_after_s = max(1, s["retry_after_s"])
                return plan
            rng = self._rng
            plan.delay_s = (s["latency_ms"] + rng.random() * s["jitter_ms"]) / 1000.0
            if self._take(s, "hang_next", "hang_rate"):
                plan.hang_s = s["hang_s"]
            if self._take(s, "error_next", "error_rate"):
                status = rng.choice(ERROR_STATUSES)
                plan.error_status = status
                if rng.random() < 0.5:
                    plan.error_body = _JSON_ERROR
                else:
                    plan.error_body = _HTML_ERROR.format(status=status, reason=_REASONS[status]).encode()
            elif self._take(s, "garbage_next", "garbage_rate"):
                plan.garbage = True
            elif self._take(s, "truncate_next", "truncate_rate"):
                plan.truncate = True
        return plan

    def _take(self, settings: dict, counter: str, rate: str) -> bool:
        if settings[counter] > 0:
            settings[counter] -= 1
            return True
        return settings[rate] > 0 and self._rng.random() < settings[rate]


def _number(key, value, low, high) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise FaultError(f"{key} must be a number, got {value!r}")
    if value < low or (high is not None and value > high):
        bounds = f"between {low} and {high}" if high is not None else f">= {low}"
        raise FaultError(f"{key} must be {bounds}, got {value!r}")
    return float(value)


def _count(key, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise FaultError(f"{key} must be a non-negative integer, got {value!r}")
    return value
