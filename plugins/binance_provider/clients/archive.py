"""Binance's public data archive (``data.binance.vision``): checksummed monthly and daily kline files.

Layout (spot klines; the archive names the calendar-month interval ``1mo``, the API ``1M``)::

    /data/spot/monthly/klines/<SYMBOL>/<iv>/<SYMBOL>-<iv>-<YYYY-MM>.zip
    /data/spot/daily/klines/<SYMBOL>/<iv>/<SYMBOL>-<iv>-<YYYY-MM-DD>.zip

each with ``<file>.CHECKSUM`` beside it, whose body is ``<sha256 hex>  <zip file name>``. A zip holds
one CSV of the 12 kline fields (no header, though some files have one), times in ms, or in µs from
2025-01-01 on.

:class:`BinanceArchiveClient` downloads one file, checks its sha256 against the CHECKSUM before a
row is read, unzips and parses it into rows of exactly the shape the REST client yields (ints for
times and trade count, the decimal strings as written), and checks them with the same
:func:`binance_provider.klines.validate_klines`: one row contract whatever the source. A file that
is not published yet is a 404: :meth:`BinanceArchiveClient.fetch` returns ``None``. A file that fails
its checksum or does not unzip and parse is fetched once more, then refused with
:class:`ArchiveFileRejected`; its rows are never handed out. What to do then (REST for its days,
a quality finding) is the caller's business.

No Airflow import: :class:`binance_provider.hooks.archive.BinanceArchiveHook` is this client on an
Airflow connection; :func:`binance_provider.clients.archive_client` picks one of the two.
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import io
import logging
import re
import threading
import time
import zipfile
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import date, datetime, timezone
from typing import TYPE_CHECKING, Any

import requests
from requests import Response

from binance_provider.clients.rest import DEFAULT_BAN_S
from binance_provider.facts import ARCHIVE_CONN_ID, DEFAULT_ARCHIVE_HOST, HookSettings, validate_symbol
from binance_provider.hooks.errors import BinanceAPIError, BinanceBanned, BinanceUnavailable
from binance_provider.hooks.intervals import BINANCE_INTERVALS
from binance_provider.hooks.rate_limiter import BanRecord, shared_ban_record
from binance_provider.hooks.transport import (
    _TRANSPORT_ERRORS,
    PerThreadSessions,
    RetryPolicy,
    _retry_after_s,
    _Transient,
    call_with_retries,
)
from binance_provider.klines import KLINE_FIELDS, KlineValidationError, RejectedRow, validate_klines
from binance_provider.metrics import emit as _emit

if TYPE_CHECKING:
    from binance_provider.hooks.redis_limiter import RedisBanRecord

__all__ = [
    "ArchiveFile",
    "ArchiveFileRejected",
    "BinanceArchiveClient",
    "archive_interval",
    "parse_kline_csv",
]

# The archive spells the calendar-month interval "1mo" (case-insensitive file systems), the API "1M".
_TO_ARCHIVE_INTERVAL = {"1M": "1mo"}
_FROM_ARCHIVE_INTERVAL = {value: key for key, value in _TO_ARCHIVE_INTERVAL.items()}
_PATH_RE = re.compile(
    r"^/data/spot/(?P<kind>monthly|daily)/klines/(?P<dir_symbol>[^/]+)/(?P<dir_interval>[^/]+)/"
    r"(?P<name>(?P<symbol>[^/-]+)-(?P<interval>[^/-]+)-(?P<period>\d{4}-\d{2}(?:-\d{2})?)\.zip)$"
)
_SHA256_RE = re.compile(r"^[0-9a-fA-F]{64}$")
# A time above this is in µs: 10**14 ms is the year 5138, 10**14 µs is 1973.
_MICROS_FROM = 10**14
_N_FIELDS = len(KLINE_FIELDS)


def archive_interval(interval: str) -> str:
    """The archive's directory name of an API interval (``1M`` is ``1mo``); ``ValueError`` if unknown."""
    if interval not in BINANCE_INTERVALS:
        raise ValueError(
            f"interval={interval!r} is not a Binance interval; expected one of {', '.join(BINANCE_INTERVALS)}"
        )
    return _TO_ARCHIVE_INTERVAL.get(interval, interval)


def _epoch_ms(day: date) -> int:
    return int(datetime(day.year, day.month, day.day, tzinfo=timezone.utc).timestamp()) * 1000


class ArchiveFileRejected(Exception):
    """An archive file failed its CHECKSUM, or did not unzip or parse, twice in a row: never used.

    :param url: the zip's URL.
    :param reason: what was wrong the second time (e.g. ``checksum mismatch``, ``corrupt zip: ...``).
    :param expected_sha256: the sha256 its ``.CHECKSUM`` announced (``None`` if unreadable).
    :param found_sha256: the sha256 of the bytes received.
    :param kind: ``checksum`` (mismatch or unreadable CHECKSUM) or ``corrupt`` (zip or CSV).
    """

    def __init__(self, url: str, reason: str, expected_sha256: str | None, found_sha256: str | None,
                 kind: str = "checksum") -> None:
        self.url = url
        self.reason = reason
        self.expected_sha256 = expected_sha256
        self.found_sha256 = found_sha256
        self.kind = kind
        super().__init__(f"archive file {url} rejected: {reason} "
                         f"(expected sha256 {expected_sha256}, found {found_sha256})")


@dataclass(frozen=True)
class ArchiveFile:
    """One archive file, checked and parsed: closed candles of ``[start_ms, end_ms)`` in time order."""

    url: str  # the zip's URL (provenance: the raw files' ``source``)
    sha256: str  # of the zip, equal to its CHECKSUM's
    rows: list[list]  # 12-field rows exactly as BinanceClient.iter_klines pages hold them
    # Well-formed rows that break a value rule (binance_provider.klines.ROW_RULES): left out of
    # ``rows``, their slots holes, as with REST.
    rejected: list[RejectedRow]
    fetched_at: str  # ISO-8601 UTC, when the zip arrived
    latency_ms: float  # CHECKSUM and zip downloads of the fetch that succeeded
    bytes: int  # size of the zip
    path: str  # e.g. /data/spot/monthly/klines/BTCUSDT/15m/BTCUSDT-15m-2024-01.zip
    symbol: str
    interval: str  # the API's name (1M, not 1mo)
    start_ms: int  # the file's period: first day 00:00 UTC
    end_ms: int  # the next period's start
    dropped_open: int = 0  # candles not closed at fetch time, left out of ``rows``
    retries: int = 0  # refetches after a bad checksum or a corrupt zip (0 or 1)


@dataclass(frozen=True)
class _FileSpec:
    path: str
    name: str
    symbol: str
    interval: str
    start_ms: int
    end_ms: int


class _Unusable(Exception):
    """This download of a file cannot be used: bad checksum, corrupt zip or CSV."""

    def __init__(self, reason: str, expected: str | None, found: str | None, kind: str) -> None:
        super().__init__(reason)
        self.reason = reason
        self.expected = expected
        self.found = found
        self.kind = kind


def _spec(path: str) -> _FileSpec:
    match = _PATH_RE.match(path)
    if match is None:
        raise ValueError(
            f"path={path!r} is not an archive kline file: expected "
            "/data/spot/{monthly,daily}/klines/<SYMBOL>/<interval>/<SYMBOL>-<interval>-<YYYY-MM[-DD]>.zip"
        )
    symbol, name_interval, period = match["symbol"], match["interval"], match["period"]
    if (match["dir_symbol"], match["dir_interval"]) != (symbol, name_interval):
        raise ValueError(f"path={path!r}: the directory and the file name disagree on symbol or interval")
    validate_symbol(symbol, "symbol")
    interval = _FROM_ARCHIVE_INTERVAL.get(name_interval, name_interval)
    if interval not in BINANCE_INTERVALS or archive_interval(interval) != name_interval:
        raise ValueError(f"path={path!r}: interval {name_interval!r} is not an archive interval")
    monthly = match["kind"] == "monthly"
    if monthly != (len(period) == 7):
        raise ValueError(f"path={path!r}: a {match['kind']} file names a {'month' if monthly else 'day'}")
    try:
        first = date.fromisoformat(period + "-01" if monthly else period)
    except ValueError:
        raise ValueError(f"path={path!r}: {period!r} is not a date") from None
    if monthly:
        after = date(first.year + first.month // 12, first.month % 12 + 1, 1)
    else:
        after = date.fromordinal(first.toordinal() + 1)
    return _FileSpec(path, match["name"], symbol, interval, _epoch_ms(first), _epoch_ms(after))


# -- CSV -------------------------------------------------------------------------------------------


def parse_kline_csv(text: str) -> list[list]:
    """Rows of an archive CSV in the REST client's shape: ``open_time``, ``close_time`` and
    ``number_of_trades`` as ints (times in ms), every other field the string as written.

    A first line whose first field is not an integer is a header and skipped; blank lines are
    skipped. Times in µs (the 2025+ files) are told apart per value (above ``10**14``) and turned
    into ms exactly: an open time must be a whole ms, a close time end in ``999`` µs (``…999999`` →
    ``…999``). Anything else raises :class:`KlineValidationError` naming the line.
    """
    # Binance never quotes a field; should a file do so, the csv module reads it right (2x slower).
    lines = csv.reader(io.StringIO(text)) if '"' in text else (line.split(",") for line in text.splitlines())
    rows: list[list] = []
    first = True
    for number, fields in enumerate(lines, 1):
        if not fields or fields == [""]:
            continue
        try:
            open_time = int(fields[0])
        except ValueError:
            if first:  # a header row
                first = False
                continue
            raise KlineValidationError(f"line {number}: open_time {fields[0]!r} is not an integer") from None
        first = False
        if len(fields) != _N_FIELDS:
            raise KlineValidationError(f"line {number}: {len(fields)} fields, expected {_N_FIELDS}")
        try:
            close_time, trades = int(fields[6]), int(fields[8])
        except ValueError:
            raise KlineValidationError(
                f"line {number}: close_time {fields[6]!r} or number_of_trades {fields[8]!r} is not an integer"
            ) from None
        if open_time >= _MICROS_FROM:
            if open_time % 1000:
                raise KlineValidationError(f"line {number}: open_time {open_time} µs is not a whole millisecond")
            open_time //= 1000
        if close_time >= _MICROS_FROM:
            if close_time % 1000 != 999:
                raise KlineValidationError(f"line {number}: close_time {close_time} µs does not end in 999 µs")
            close_time //= 1000
        fields[0] = open_time
        fields[6] = close_time
        fields[8] = trades
        rows.append(fields)
    return rows


def _read_zip(body: bytes) -> str:
    """The text of the zip's single ``.csv`` member; :class:`_Unusable`-worthy errors propagate."""
    with zipfile.ZipFile(io.BytesIO(body)) as archive:
        members = [info for info in archive.infolist() if not info.is_dir()]
        if len(members) != 1 or not members[0].filename.endswith(".csv"):
            raise zipfile.BadZipFile(f"expected exactly one .csv member, found {[m.filename for m in members]}")
        return archive.read(members[0]).decode("utf-8-sig")  # read() checks the CRC


def _parse_checksum(body: bytes, name: str, found: str) -> str:
    """The sha256 a ``.CHECKSUM`` body (``<sha256>  <file name>``) announces for ``name`` (whose
    bytes hash to ``found``)."""
    try:
        parts = body.decode("ascii").split()
    except UnicodeDecodeError:
        parts = []
    if not parts or not _SHA256_RE.match(parts[0]) or len(parts) > 2:
        raise _Unusable(f"unreadable CHECKSUM {body[:120]!r}", None, found, "checksum")
    if len(parts) == 2 and parts[1].lstrip("*") != name:
        raise _Unusable(f"CHECKSUM names {parts[1]!r}, not {name!r}", parts[0].lower(), found, "checksum")
    return parts[0].lower()


# -- the client --------------------------------------------------------------------------------------


class BinanceArchiveClient(PerThreadSessions):
    """
    Download checksummed kline files from Binance's public data archive (or a compatible server
    such as the local sandbox).

    Safe to call from several threads at once (one ``requests`` session per thread). Archive
    downloads carry no REST weight, so they do not go through the REST weight limiter; transient
    failures (5xx, 403, 429, timeouts, connection errors) are retried under the same bounded
    policy as :class:`~binance_provider.clients.rest.BinanceClient`
    (:func:`binance_provider.hooks.transport.call_with_retries`: ``max_tries`` attempts and
    ``max_time_s`` per request, exponential backoff with full jitter; a 429's ``Retry-After`` is
    waited at least).

    418 bans: the ban the REST client records is keyed by host, and so is the check here: the
    archive honours the ban record of the host it calls. The real archive is a CDN
    (``data.binance.vision``), another host than the REST API, whose REQUEST_WEIGHT ban does not
    cover it, so a REST ban does not stop archive downloads (they are how history is fetched
    without REST weight). Where both are served by one host (the sandbox), one ban stops both; and
    a 418 from the archive host is recorded for it and honoured until it ends.

    No Airflow: the host comes from the connection's ``AIRFLOW_CONN_<ID>`` variable (JSON or URI
    form), else ``https://data.binance.vision``.

    :param binance_archive_conn_id: the connection whose variable names the archive's base URL.
    :param settings: :class:`binance_provider.facts.HookSettings` (only its log level is used here);
        default: read from the client's own environment variables.
    :param timeout_s: connect and read timeout of each request.
    :param max_tries, max_time_s, backoff_factor_s, backoff_cap_s: the retry budget of each
        request, as in :class:`~binance_provider.clients.rest.BinanceClient`.
    """

    conn_name_attr = "binance_archive_conn_id"
    default_conn_name = ARCHIVE_CONN_ID
    hook_name = "Binance public data archive"
    default_host = DEFAULT_ARCHIVE_HOST

    def __init__(
        self,
        binance_archive_conn_id: str = ARCHIVE_CONN_ID,
        *,
        settings: HookSettings | None = None,
        timeout_s: float = 30.0,
        max_tries: int = 8,
        max_time_s: float = 300.0,
        backoff_factor_s: float = 0.5,
        backoff_cap_s: float = 30.0,
    ) -> None:
        if not timeout_s > 0:
            raise ValueError(f"timeout_s={timeout_s} must be > 0")
        self._init_sessions()
        self.binance_archive_conn_id = binance_archive_conn_id
        self.settings = settings if settings is not None else HookSettings.from_env()
        self._log_requests = logging.getLevelName(self.settings.log_level) <= logging.INFO
        self.timeout_s = timeout_s
        self.retry_policy = RetryPolicy(max_tries, max_time_s, backoff_factor_s, backoff_cap_s)
        self._ban_record: BanRecord | None = None
        self._pool_lock = threading.Lock()
        self._zip_pool: ThreadPoolExecutor | None = None

    def _pair_pool(self) -> ThreadPoolExecutor:
        """Threads that download zips while the caller's thread fetches their CHECKSUMs."""
        with self._pool_lock:
            if self._zip_pool is None:
                self._zip_pool = ThreadPoolExecutor(max_workers=16, thread_name_prefix="archive-zip")
            return self._zip_pool

    # -- layout --------------------------------------------------------------------------------

    @staticmethod
    def monthly_path(symbol: str, interval: str, year: int, month: int) -> str:
        """Path of the monthly file, e.g. ``/data/spot/monthly/klines/BTCUSDT/15m/BTCUSDT-15m-2024-01.zip``."""
        validate_symbol(symbol, "symbol")
        name = archive_interval(interval)
        if isinstance(month, bool) or not isinstance(month, int) or not 1 <= month <= 12:
            raise ValueError(f"month={month!r} must be an int in 1..12")
        if isinstance(year, bool) or not isinstance(year, int) or not 1970 <= year <= 9999:
            raise ValueError(f"year={year!r} must be an int in 1970..9999")
        return f"/data/spot/monthly/klines/{symbol}/{name}/{symbol}-{name}-{year:04d}-{month:02d}.zip"

    @staticmethod
    def daily_path(symbol: str, interval: str, day: date) -> str:
        """Path of the daily file, e.g. ``/data/spot/daily/klines/BTCUSDT/15m/BTCUSDT-15m-2024-01-31.zip``."""
        validate_symbol(symbol, "symbol")
        name = archive_interval(interval)
        if not isinstance(day, date) or isinstance(day, datetime):
            raise ValueError(f"day={day!r} must be a datetime.date (a UTC day)")
        return f"/data/spot/daily/klines/{symbol}/{name}/{symbol}-{name}-{day.isoformat()}.zip"

    def url(self, path: str) -> str:
        """The full URL of an archive path on this client's host."""
        self._resolve_connection()
        return self.url_from_endpoint(path)

    @property
    def ban_record(self) -> BanRecord | RedisBanRecord:
        """The record of a 418 ban for this client's host (see the class docstring): in Redis when
        ``BINANCE_LIMITER_REDIS_URL`` is set (every worker), else a file under ``BINANCE_BAN_DIR``."""
        record = shared_ban_record(self.source, self._ban_record)
        if isinstance(record, BanRecord):
            self._ban_record = record
        return record

    # -- files -----------------------------------------------------------------------------------

    def fetch_month(self, symbol: str, interval: str, year: int, month: int, *,
                    now_ms: int | None = None) -> ArchiveFile | None:
        """:meth:`fetch` of :meth:`monthly_path`."""
        return self.fetch(self.monthly_path(symbol, interval, year, month), now_ms=now_ms)

    def fetch_day(self, symbol: str, interval: str, day: date, *, now_ms: int | None = None) -> ArchiveFile | None:
        """:meth:`fetch` of :meth:`daily_path`."""
        return self.fetch(self.daily_path(symbol, interval, day), now_ms=now_ms)

    def fetch(self, path: str, *, now_ms: int | None = None) -> ArchiveFile | None:
        """
        Download ``path``'s ``.CHECKSUM`` and zip, check, unzip and parse it.

        :param path: an archive file path (:meth:`monthly_path`, :meth:`daily_path`).
        :param now_ms: candles whose ``close_time`` is not before it are dropped and counted
            (default: now; a published file holds none).
        :return: the file, or ``None`` when either download is a 404 (not published, or missing).
        :raises ArchiveFileRejected: the checksum did not match, or the zip or its CSV was
            unreadable, on the first download and again on one more.
        :raises BinanceUnavailable: a request's retry budget ran out on transient failures.
        :raises BinanceBanned: the archive host banned this IP (nothing is sent until it ends).
        :raises BinanceAPIError: another 4xx (never retried).
        """
        spec = _spec(path)
        for refetch in (0, 1):
            try:
                found = self._fetch_once(spec, refetch, now_ms)
            except _Unusable as problem:
                failure = problem
                self.log.warning("binance archive file unusable", symbol=spec.symbol, interval=spec.interval,
                                 endpoint=spec.path, url=self.url(spec.path), reason=problem.reason,
                                 expected_sha256=problem.expected, found_sha256=problem.found,
                                 attempt=refetch + 1, status="refetch" if refetch == 0 else "rejected")
                continue
            return found
        _emit("incr", "archive.file_rejected")
        if failure.kind == "checksum":
            _emit("incr", "archive.checksum_mismatch")
        raise ArchiveFileRejected(self.url(spec.path), failure.reason, failure.expected, failure.found, failure.kind)

    def _fetch_once(self, spec: _FileSpec, refetch: int, now_ms: int | None) -> ArchiveFile | None:
        fields = {"symbol": spec.symbol, "interval": spec.interval}
        started = time.perf_counter()
        # The zip and its CHECKSUM are asked for at once (one round trip, not two); the sha256 is
        # still checked before a byte of the zip is read.
        zip_download = self._pair_pool().submit(self._get, spec.path, fields)
        try:
            checksum = self._get(spec.path + ".CHECKSUM", fields)
        except BaseException:
            with contextlib.suppress(Exception):  # no download left running behind the failure
                zip_download.result()
            raise
        body = zip_download.result()
        if checksum is None or body is None:
            return None
        fetched_at = datetime.now(timezone.utc).isoformat(timespec="milliseconds")
        _emit("incr", "archive.download.count")
        _emit("timing", "archive.download.duration", round((time.perf_counter() - started) * 1000, 3))

        found = hashlib.sha256(body).hexdigest()
        expected = _parse_checksum(checksum, spec.name, found)
        if expected != found:
            raise _Unusable("checksum mismatch", expected, found, "checksum")
        try:
            rows = parse_kline_csv(_read_zip(body))
            checked = validate_klines(rows, spec.interval, spec.start_ms, spec.end_ms, limit=max(1, len(rows)))
        except (zipfile.BadZipFile, zlib.error, EOFError, NotImplementedError, ValueError) as exc:
            # ValueError: KlineValidationError (CSV) and UnicodeDecodeError are ValueErrors.
            raise _Unusable(f"corrupt zip: {type(exc).__name__}: {exc}"[:300], expected, found, "corrupt") from None

        for rejected in checked.rejected:
            self.log.warning("binance kline row rejected", symbol=spec.symbol, interval=spec.interval,
                             endpoint=spec.path, open_time=rejected.open_time_iso, open_time_ms=rejected.open_time,
                             rules=list(rejected.rules), reasons=list(rejected.messages), values=rejected.values())
        cutoff = int(time.time() * 1000) if now_ms is None else now_ms
        closed = [row for row in checked.rows if row[6] < cutoff]
        return ArchiveFile(
            url=self.url(spec.path),
            sha256=found,
            rows=closed,
            rejected=list(checked.rejected),
            fetched_at=fetched_at,
            latency_ms=round((time.perf_counter() - started) * 1000, 3),
            bytes=len(body),
            path=spec.path,
            symbol=spec.symbol,
            interval=spec.interval,
            start_ms=spec.start_ms,
            end_ms=spec.end_ms,
            dropped_open=len(checked.rows) - len(closed),
            retries=refetch,
        )

    # -- one GET with the shared retry policy ------------------------------------------------------

    def _get(self, path: str, log_fields: dict[str, Any]) -> bytes | None:
        """The body of ``path`` (``None`` on 404), transient failures retried within the policy."""
        retries = 0

        def on_retry(count: int) -> None:
            nonlocal retries
            retries = count
            _emit("incr", "archive.download.retry")

        def give_up(failure: Exception, spent: str) -> Exception:
            return BinanceUnavailable(failure.status, None, f"{failure.kind}: {failure.detail} ({spent})", path)

        return call_with_retries(lambda: self._attempt(path, log_fields, retries), self.retry_policy,
                                 give_up=give_up, on_retry=on_retry)

    def _attempt(self, path: str, log_fields: dict[str, Any], retries: int) -> bytes | None:
        banned_until = self.ban_record.until()
        if banned_until > time.time():
            raise BinanceBanned(int(banned_until * 1000), path, "not calling a host that banned this IP")
        url = self.url(path)
        line = dict(endpoint=path, url=url, **log_fields, retries=retries)
        started = time.perf_counter()
        try:
            response = self._session().get(url, timeout=self.timeout_s)
        except _TRANSPORT_ERRORS as exc:
            kind = "timeout" if isinstance(exc, requests.Timeout) else "connection"
            self._record(line, kind, started, error=f"{type(exc).__name__}: {exc}")
            raise _Transient(None, kind, f"{type(exc).__name__}: {exc}") from exc
        status = response.status_code
        if status == 200:
            self._record(line, status, started, bytes=len(response.content))
            return response.content
        detail = _text(response)
        self._record(line, status, started, error=detail)
        if status == 404:
            return None
        if status == 418:
            retry_after = _retry_after_s(response)
            until_s = time.time() + (retry_after if retry_after is not None else DEFAULT_BAN_S)
            self.ban_record.record(until_s)
            _emit("incr", "binance.banned")
            raise BinanceBanned(int(until_s * 1000), path, detail)
        if status >= 500 or status in (403, 429):  # 403: a CDN's WAF; 429: wait its Retry-After
            raise _Transient(status, f"HTTP {status}", detail, min_wait_s=_retry_after_s(response) or 0.0)
        raise BinanceAPIError(status, None, detail, path)

    def _record(self, line: dict[str, Any], status: int | str, started: float, *, error: str | None = None,
                **fields: Any) -> None:
        """Metrics and the one log line of a request."""
        latency_ms = round((time.perf_counter() - started) * 1000, 3)
        if error is None:
            if self._log_requests:
                self.log.info("binance archive request", **line, status=status, latency_ms=latency_ms, **fields)
        elif status == 404:  # an unpublished file is expected, not a failure
            if self._log_requests:
                self.log.info("binance archive file not published", **line, status=status, latency_ms=latency_ms)
        else:
            _emit("incr", f"archive.download.error.{status}")
            self.log.warning("binance archive request failed", **line, status=status, latency_ms=latency_ms,
                             error=error[:300])

    def test_connection(self) -> tuple[bool, str]:
        """Ask the host for a CHECKSUM (used by the Airflow UI's connection test): any HTTP answer will do."""
        path = self.monthly_path("BTCUSDT", "1d", 2017, 8) + ".CHECKSUM"
        try:
            response = self._session().get(self.url(path), timeout=self.timeout_s)
        except Exception as exc:  # noqa: BLE001 - the UI shows the message
            return False, str(exc)
        return True, f"{self.source} answered {response.status_code}"


def _text(response: Response) -> str:
    return response.text[:200] or response.reason or "no body"

