"""Injected failures: what they are, how they are set, and what each request suffers.

Rates draw from one seeded RNG so a run is reproducible; ``*_next`` counters and the
429/418 storms are deterministic whatever the seed.

Archive faults (``archive_*``, the public-data archive routes of ``archive.py``; the REST
faults above never touch those routes, only ``latency_ms``/``jitter_ms`` do):

    "archive_missing":        [SPEC, ...]  the file (zip and CHECKSUM) answers 404
    "archive_wrong_checksum": [SPEC, ...]  the CHECKSUM carries a wrong (well-formed) sha256
    "archive_corrupt":        [SPEC, ...]  the zip is damaged; its CHECKSUM is the sha256 of the
                                           damaged bytes (so unzipping is what fails);
                                           SPEC may add "mode": "truncate" (default: first half
                                           only, no central directory) or "garble" (bytes of the
                                           compressed data flipped: opens, fails on read)
    "archive_header":         true | false | [SPEC, ...]  a CSV header line first (true: every file)
    "archive_unpublished_after": "YYYY-MM" | null  monthly files of later months are 404
    "archive_publish_delay_s": 0            files appear this long after their period is over
    "archive_revised":        [{"open_time": MS, "field": "volume", "value": "1.00000000"}, ...]
                                           the archive's copy of that candle holds another value than
                                           REST (as when Binance revises a candle after publishing)

    SPEC = TARGET | {"file": TARGET, "times": N}
    TARGET = a file name "BTCUSDT-15m-2024-03.zip" (".zip" optional) | a month "2024-03" (every
             monthly file of that month) | a day "2024-03-05" (every daily file of that day)

``times`` absent or null: always; N: the first N downloads of each matching file only, then it
is served whole. A download is one *round*: a zip and its CHECKSUM requested in either order
share the same fate (a round ends when the zip or the CHECKSUM is asked for a second time), so
"fails once, then fetch both once more" works whichever the client fetches first. Setting a
list replaces it and restarts its counts; ``DELETE /sandbox/faults`` clears everything.
"""

from __future__ import annotations

import random
import re
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
    "endpoints": None,  # None: every /api/v3 endpoint ("archive" names the archive routes)
    "archive_missing": [],
    "archive_wrong_checksum": [],
    "archive_corrupt": [],
    "archive_header": False,
    "archive_unpublished_after": None,
    "archive_publish_delay_s": 0.0,
    "archive_revised": [],
}
_REVISABLE = ("open", "high", "low", "close", "volume", "quote_asset_volume", "number_of_trades",
              "taker_buy_base_asset_volume", "taker_buy_quote_asset_volume")
_ARCHIVE_LISTS = ("archive_missing", "archive_wrong_checksum", "archive_corrupt", "archive_header")
_CORRUPT_MODES = ("truncate", "garble")
_PERIOD_RE = re.compile(r"^\d{4}-(0[1-9]|1[0-2])(-(0[1-9]|[12]\d|3[01]))?$")
_MONTH_RE = re.compile(r"^\d{4}-(0[1-9]|1[0-2])$")
_FILE_RE = re.compile(r"^[A-Z0-9]+-[0-9A-Za-z]+-\d{4}-\d{2}(-\d{2})?(\.zip)?(\.CHECKSUM)?$")
_RATES = ("error_rate", "hang_rate", "truncate_rate", "garbage_rate")
_COUNTS = ("storm_429", "ban_418", "error_next", "hang_next", "truncate_next", "garbage_next")
_DURATIONS = ("latency_ms", "jitter_ms", "hang_s", "archive_publish_delay_s")

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

    ban: bool = False  # an injected 418
    ban_s: int | None = None  # its length; None: the server's ban length
    storm_retry_after_s: int | None = None
    delay_s: float = 0.0
    hang_s: float = 0.0
    error_status: int | None = None
    error_body: bytes = b""
    garbage: bool = False
    truncate: bool = False


@dataclass(frozen=True)
class ArchiveFaults:
    """What to do to one archive file in one download round."""

    missing: bool = False
    wrong_checksum: bool = False
    corrupt: str | None = None  # "truncate" | "garble"
    header: bool = False


NO_ARCHIVE_FAULTS = ArchiveFaults()


@dataclass
class _Round:
    faults: ArchiveFaults
    seen: set  # "zip" and/or "checksum"


def _archive_target(key: str, value) -> str:
    if not isinstance(value, str) or not (_PERIOD_RE.match(value) or _FILE_RE.match(value)):
        raise FaultError(
            f"{key}: {value!r} is not a file name (BTCUSDT-15m-2024-03.zip), a month (2024-03) or a day (2024-03-05)"
        )
    if _PERIOD_RE.match(value):
        return value
    name = value.removesuffix(".CHECKSUM")
    return name if name.endswith(".zip") else name + ".zip"


def parse_archive_specs(key: str, value) -> list[dict]:
    """[TARGET | {"file": TARGET, "times": N, "mode"?}] -> [{"file", "times"(, "mode")}]."""
    if key == "archive_header" and isinstance(value, bool):
        return value
    if not isinstance(value, list):
        allowed = "true, false or a list" if key == "archive_header" else "a list"
        raise FaultError(f"{key} must be {allowed} of file names, months or {{file, times}} objects")
    specs = []
    for item in value:
        if isinstance(item, str):
            item = {"file": item}
        if not isinstance(item, dict) or "file" not in item:
            raise FaultError(f"{key}: {item!r} must be a target string or an object with 'file'")
        allowed = {"file", "times", "mode"} if key == "archive_corrupt" else {"file", "times"}
        extra = sorted(set(item) - allowed)
        if extra:
            raise FaultError(f"{key}: unknown field(s) {extra} in {item!r}; known: {sorted(allowed)}")
        times = item.get("times")
        if times is not None and (isinstance(times, bool) or not isinstance(times, int) or times < 1):
            raise FaultError(f"{key}: times must be a positive integer or null (always), got {times!r}")
        spec = {"file": _archive_target(key, item["file"]), "times": times}
        if key == "archive_corrupt":
            mode = item.get("mode", "truncate")
            if mode not in _CORRUPT_MODES:
                raise FaultError(f"{key}: mode must be one of {list(_CORRUPT_MODES)}, got {mode!r}")
            spec["mode"] = mode
        specs.append(spec)
    return specs


class FaultInjector:
    def __init__(self, faults: dict | None = None, seed: int = 0):
        self._lock = threading.Lock()
        self._rng = random.Random(seed)
        self._settings = dict(DEFAULTS)
        self._outages: tuple[Outage, ...] = ()
        self._archive_used: dict[tuple[str, int, str], int] = {}  # (setting, spec index, file) -> rounds hit
        self._archive_rounds: dict[str, _Round] = {}
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
            elif key in _ARCHIVE_LISTS:
                validated[key] = parse_archive_specs(key, value)
            elif key == "archive_revised":
                if not isinstance(value, list) or not all(
                        isinstance(v, dict) and set(v) == {"open_time", "field", "value"}
                        and isinstance(v["open_time"], int) and v["field"] in _REVISABLE
                        and isinstance(v["value"], str) for v in value):
                    raise FaultError("archive_revised must be a list of {open_time: ms, field: one of "
                                     f"{', '.join(_REVISABLE)}, value: decimal string}}")
                validated[key] = [dict(v) for v in value]
            elif key == "archive_unpublished_after":
                if value is not None and (not isinstance(value, str) or not _MONTH_RE.match(value)):
                    raise FaultError(f"archive_unpublished_after must be 'YYYY-MM' or null, got {value!r}")
                validated[key] = value
        with self._lock:
            self._settings.update(validated)
            if outages is not None:
                self._outages = outages
            restarted = set(validated) & set(_ARCHIVE_LISTS)
            if restarted:
                self._archive_used = {k: n for k, n in self._archive_used.items() if k[0] not in restarted}
                self._archive_rounds.clear()
            return dict(self._settings)

    def clear(self) -> None:
        with self._lock:
            self._settings = dict(DEFAULTS)
            self._outages = ()
            self._archive_used.clear()
            self._archive_rounds.clear()

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
                plan.ban, plan.ban_s = True, s["ban_s"]
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

    # -- the public-data archive ---------------------------------------------------------

    def archive_delay_s(self) -> float:
        """Added latency of one archive request (``latency_ms`` + jitter; scoped by ``endpoints``)."""
        with self._lock:
            s = self._settings
            if s["endpoints"] is not None and "archive" not in s["endpoints"]:
                return 0.0
            jitter = self._rng.random() * s["jitter_ms"] if s["jitter_ms"] > 0 else 0.0
            return (s["latency_ms"] + jitter) / 1000.0

    def archive_revisions(self) -> tuple[tuple[int, int, str], ...]:
        """(open_time, column index in a kline row, value) of each ``archive_revised`` entry."""
        with self._lock:
            return tuple((r["open_time"], 1 + _REVISABLE.index(r["field"]) + (r["field"] in _REVISABLE[5:]),
                          r["value"]) for r in self._settings["archive_revised"])

    def archive_publishing(self) -> tuple[float, str | None]:
        """(archive_publish_delay_s, archive_unpublished_after)."""
        with self._lock:
            return self._settings["archive_publish_delay_s"], self._settings["archive_unpublished_after"]

    def archive_faults(self, file_name: str, period: str, part: str, consume: bool = True) -> ArchiveFaults:
        """The faults of an existing archive file for one request of ``part`` ('zip' or 'checksum').

        The zip and its CHECKSUM share a round (see the module docstring); ``consume=False``
        (HEAD) looks without starting a round or using up ``times``.
        """
        with self._lock:
            s = self._settings
            if not (s["archive_header"] is True or any(s[key] for key in _ARCHIVE_LISTS)):
                return NO_ARCHIVE_FAULTS
            round_ = self._archive_rounds.get(file_name)
            if round_ is None or part in round_.seen:
                faults = self._archive_decide(file_name, period, consume)
                if not consume:
                    return faults
                round_ = self._archive_rounds[file_name] = _Round(faults, set())
            if consume:
                round_.seen.add(part)
            return round_.faults

    def _archive_decide(self, file_name: str, period: str, consume: bool) -> ArchiveFaults:
        def hit(key):
            specs = self._settings[key]
            for index, spec in enumerate(specs if isinstance(specs, list) else ()):
                if spec["file"] not in (file_name, period):
                    continue
                used_key = (key, index, file_name)
                used = self._archive_used.get(used_key, 0)
                if spec["times"] is None or used < spec["times"]:
                    if consume:
                        self._archive_used[used_key] = used + 1
                    return spec
            return None

        corrupt = hit("archive_corrupt")
        return ArchiveFaults(
            missing=hit("archive_missing") is not None,
            wrong_checksum=hit("archive_wrong_checksum") is not None,
            corrupt=corrupt["mode"] if corrupt else None,
            header=self._settings["archive_header"] is True or hit("archive_header") is not None,
        )

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
