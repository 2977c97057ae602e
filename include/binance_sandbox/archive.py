"""Binance's public data archive (``data.binance.vision``) served from the sandbox's market.

Routes (no REST weight, no ``X-MBX-USED-WEIGHT-1M``; GET and HEAD):

    /data/spot/monthly/klines/<S>/<iv>/<S>-<iv>-<YYYY-MM>.zip[.CHECKSUM]
    /data/spot/daily/klines/<S>/<iv>/<S>-<iv>-<YYYY-MM-DD>.zip[.CHECKSUM]

``<iv>`` is any interval the sandbox serves, spelt as the archive spells it (``1mo`` for 1M).
The zip holds one member ``<S>-<iv>-<period>.csv``: no header, one line per candle with the
12 fields of ``/api/v3/klines`` (the same rows of the same market, so the decimal strings agree
byte for byte), times in ms — in µs (close time ``…999999``) for files whose period starts on or
after 2025-01-01, as Binance's are. The CHECKSUM body is ``<sha256 of the zip>  <zip name>\\n``.

A file holds the candles whose ``open_time`` lies in its period (a monthly 1w file: the weeks
opening that month, Mondays 00:00 UTC); holes (outage windows, replayed holes) stay holes.

Published, by the market's clock (``--now`` freezes it): a file exists once every candle opening
in its period has closed — the period is over (and, for 1w/1M, the last candle opening in it has
closed too) — plus ``archive_publish_delay_s`` (a fault setting, default 0: a month from the 1st
of the next month 00:00 UTC, a day from the next day 00:00 UTC). Before that, for a period without
candles (before the symbol's first candle, a daily 1w file for a Tuesday), or an unknown symbol,
interval or path: 404 with an S3-like XML body, as the real archive answers.

Archive faults (``archive_*`` settings, ``faults.py``): missing files, wrong checksums, corrupt
zips, header rows, months not yet published; only ``latency_ms``/``jitter_ms`` of the REST faults
apply here. Generated zips are kept in a byte-bounded LRU cache (``cache_bytes``).
"""

from __future__ import annotations

import calendar
import hashlib
import io
import re
import threading
import zipfile
from collections import OrderedDict
from dataclasses import dataclass
from datetime import datetime, timezone
from email.utils import formatdate

from .faults import ArchiveFaults, FaultInjector
from .intervals import ARCHIVE_INTERVAL_NAMES, DAY_MS, INTERVALS, Grid

PREFIX = "/data/"
MICROSECONDS_FROM_MS = 1_735_689_600_000  # 2025-01-01 00:00 UTC: files of periods from then are in µs
HEADER_LINE = (
    "open_time,open,high,low,close,volume,close_time,quote_volume,count,"
    "taker_buy_volume,taker_buy_quote_volume,ignore\n"
)
ZIP_TYPE = "application/zip"
CHECKSUM_TYPE = "text/plain"
XML_TYPE = "application/xml"
_FILE_RE = re.compile(
    r"^/data/spot/(?P<kind>monthly|daily)/klines/(?P<symbol>[A-Z0-9]+)/(?P<interval>[0-9A-Za-z]+)/"
    r"(?P<name>(?P=symbol)-(?P=interval)-(?P<period>\d{4}-\d{2}(?:-\d{2})?)\.zip)(?P<checksum>\.CHECKSUM)?$"
)
_ARCHIVE_NAMES = {v: k for k, v in ARCHIVE_INTERVAL_NAMES.items()}  # "1M" -> "1mo"
_INTERVAL_OF_NAME = {_ARCHIVE_NAMES.get(iv, iv): iv for iv in INTERVALS}  # archive spelling -> sandbox's
_ZIP_DATE_FLOOR = (1980, 1, 1, 0, 0, 0)


@dataclass(frozen=True)
class ArchiveFile:
    kind: str  # "monthly" | "daily"
    symbol: str
    interval: str  # the sandbox's name ("1M", not "1mo")
    period: str  # "YYYY-MM" | "YYYY-MM-DD"
    name: str  # the zip's file name
    start_ms: int
    end_ms: int  # exclusive

    @property
    def csv_name(self) -> str:
        return self.name.removesuffix(".zip") + ".csv"

    @property
    def microseconds(self) -> bool:
        return self.start_ms >= MICROSECONDS_FROM_MS


@dataclass(frozen=True)
class ArchiveResponse:
    status: int
    body: bytes
    content_type: str
    kind: str  # stats key: monthly_zip, monthly_checksum, daily_zip, daily_checksum, unknown
    headers: dict


def parse_path(path: str) -> tuple[ArchiveFile, bool] | None:
    """(file, is_checksum) for a well-formed archive kline path, else None."""
    match = _FILE_RE.match(path)
    if match is None:
        return None
    kind, period = match["kind"], match["period"]
    parts = [int(p) for p in period.split("-")]
    if (kind == "monthly") != (len(parts) == 2):
        return None
    try:
        if kind == "monthly":
            year, month = parts
            if not 1 <= month <= 12:
                return None
            start = calendar.timegm((year, month, 1, 0, 0, 0)) * 1000
            end = calendar.timegm((year + month // 12, month % 12 + 1, 1, 0, 0, 0)) * 1000
        else:
            start = calendar.timegm(datetime(*parts, tzinfo=timezone.utc).timetuple()) * 1000
            end = start + DAY_MS
    except ValueError:
        return None
    interval = _INTERVAL_OF_NAME.get(match["interval"])
    if interval is None:
        return None
    return ArchiveFile(kind, match["symbol"], interval, period, match["name"], start, end), bool(match["checksum"])


def _not_found(key: str) -> bytes:
    return (
        '<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>NoSuchKey</Code>'
        f"<Message>The specified key does not exist.</Message><Key>{key}</Key></Error>"
    ).encode()


def _csv(rows: list[list], micro: bool, header: bool) -> bytes:
    if micro:
        lines = [
            f"{r[0] * 1000},{r[1]},{r[2]},{r[3]},{r[4]},{r[5]},{r[6] * 1000 + 999},{r[7]},{r[8]},{r[9]},{r[10]},{r[11]}"
            for r in rows
        ]
    else:
        lines = [
            f"{r[0]},{r[1]},{r[2]},{r[3]},{r[4]},{r[5]},{r[6]},{r[7]},{r[8]},{r[9]},{r[10]},{r[11]}" for r in rows
        ]
    text = (HEADER_LINE if header else "") + "\n".join(lines) + "\n"
    return text.encode()


def _zip(member: str, data: bytes, end_ms: int) -> bytes:
    """A deterministic zip (fixed timestamp and attributes), so regenerating it gives the same sha256."""
    moment = datetime.fromtimestamp(end_ms / 1000, tz=timezone.utc)
    info = zipfile.ZipInfo(member, date_time=max(_ZIP_DATE_FLOOR, moment.timetuple()[:6]))
    info.compress_type = zipfile.ZIP_DEFLATED
    info.external_attr = 0o644 << 16
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr(info, data, compresslevel=1)  # fast: ~7 ms for a month of 15m
    return buffer.getvalue()


def corrupt(zip_bytes: bytes, mode: str) -> bytes:
    """``truncate``: the first half (no central directory: does not open). ``garble``: bytes of
    the compressed data flipped (opens; reading the member fails its CRC or inflate)."""
    if mode == "truncate":
        return zip_bytes[: max(1, len(zip_bytes) // 2)]
    damaged = bytearray(zip_bytes)
    name_length = int.from_bytes(zip_bytes[26:28], "little")
    extra_length = int.from_bytes(zip_bytes[28:30], "little")
    data_start = 30 + name_length + extra_length  # after the local file header
    size = int.from_bytes(zip_bytes[18:22], "little")  # compressed size in the local header
    first = data_start + size // 4
    for i in range(first, first + max(1, min(64, size // 2))):
        damaged[i] ^= 0x5A
    return bytes(damaged)


class _ByteLRU:
    """Thread-safe LRU bounded by the total size of its values (bytes, or None counted as 64)."""

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self._items: OrderedDict = OrderedDict()
        self._size = 0
        self._lock = threading.Lock()

    @staticmethod
    def _cost(value) -> int:
        return 64 if value is None else len(value[0]) + 64

    def get(self, key, compute):
        with self._lock:
            if key in self._items:
                self._items.move_to_end(key)
                return self._items[key]
        value = compute()
        cost = self._cost(value)
        with self._lock:
            if key not in self._items and cost <= self.max_bytes:
                self._items[key] = value
                self._size += cost
                while self._size > self.max_bytes:
                    _, old = self._items.popitem(last=False)
                    self._size -= self._cost(old)
        return value

    def __len__(self) -> int:
        return len(self._items)


class Archive:
    """Answers archive paths from ``market`` (the REST API's market), with ``faults``' archive faults."""

    def __init__(self, market, faults: FaultInjector, cache_bytes: int = 128 * 1024 * 1024):
        self.market = market
        self.faults = faults
        self._cache = _ByteLRU(cache_bytes)

    # -- publication ---------------------------------------------------------------------

    def available_at(self, file: ArchiveFile, delay_s: float = 0.0) -> int | None:
        """When ``file`` is published (ms), or None if no candle opens in its period."""
        grid = Grid(file.interval)
        last_open = grid.floor(file.end_ms - 1)
        if last_open < file.start_ms:
            return None
        return max(file.end_ms, grid.next_open(last_open)) + int(round(delay_s * 1000))

    def _published(self, file: ArchiveFile, now_ms: int) -> int | None:
        delay_s, unpublished_after = self.faults.archive_publishing()
        if file.kind == "monthly" and unpublished_after is not None and file.period > unpublished_after:
            return None
        ready = self.available_at(file, delay_s)
        return ready if ready is not None and now_ms >= ready else None

    # -- content -------------------------------------------------------------------------

    def rows(self, file: ArchiveFile, now_ms: int | None = None) -> list[list]:
        """The market's closed candles of ``file``'s period, as /api/v3/klines serves them (ms)."""
        now = self.market.now_ms() if now_ms is None else now_ms
        rows = self.market.klines(
            file.symbol, file.interval, file.start_ms, file.end_ms - 1, 10**12,
            outages=self.faults.outages, now_ms=now,
        )
        rows = [row for row in rows if row[6] < now]
        revisions = self.faults.archive_revisions()
        if revisions:
            rows = [list(row) for row in rows]
            for row in rows:
                for open_time, column, value in revisions:
                    if row[0] == open_time:
                        row[column] = int(value) if column == 8 else value
        return rows

    def zip_and_sha(self, file: ArchiveFile, header: bool = False, now_ms: int | None = None):
        """(zip bytes, sha256 hex) of a published file's content, or None if it holds no candle."""
        key = (file.symbol, file.interval, file.kind, file.period, self.faults.outages, header,
               self.faults.archive_revisions())

        def build():
            rows = self.rows(file, now_ms)
            if not rows:
                return None
            data = _zip(file.csv_name, _csv(rows, file.microseconds, header), file.end_ms)
            return data, hashlib.sha256(data).hexdigest()

        return self._cache.get(key, build)

    # -- requests ------------------------------------------------------------------------

    def handle(self, path: str, head: bool = False) -> ArchiveResponse:
        parsed = parse_path(path)
        if parsed is None:
            return ArchiveResponse(404, _not_found(path.lstrip("/")), XML_TYPE, "unknown", {})
        file, is_checksum = parsed
        kind = f"{file.kind}_{'checksum' if is_checksum else 'zip'}"
        missing = ArchiveResponse(404, _not_found(path.lstrip("/")), XML_TYPE, kind, {})
        if file.symbol not in self.market.symbols:
            return missing
        now = self.market.now_ms()
        ready = self._published(file, now)
        if ready is None:
            return missing
        plain = self.zip_and_sha(file, False, now)
        if plain is None:
            return missing
        faults: ArchiveFaults = self.faults.archive_faults(
            file.name, file.period, "checksum" if is_checksum else "zip", consume=not head
        )
        if faults.missing:
            return missing
        data, sha = self.zip_and_sha(file, True, now) if faults.header else plain
        if faults.corrupt:
            data = corrupt(data, faults.corrupt)
            sha = hashlib.sha256(data).hexdigest()
        headers = {"Last-Modified": formatdate(ready / 1000, usegmt=True)}
        if is_checksum:
            if faults.wrong_checksum:
                sha = hashlib.sha256(data + b"\0wrong").hexdigest()
            return ArchiveResponse(200, f"{sha}  {file.name}\n".encode(), CHECKSUM_TYPE, kind, headers)
        return ArchiveResponse(200, data, ZIP_TYPE, kind, headers)
