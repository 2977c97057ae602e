"""BinanceArchiveHook over real HTTP: checksummed zips served by a tiny server on 127.0.0.1.

The server is built here (not the project's sandbox): it serves the zips and CHECKSUMs each test
publishes, and answers a scripted fault (wrong checksum, corrupt zip, 404, 500, 418) for a path's
next requests. Backoff is tiny so the whole file runs in seconds.
"""

from __future__ import annotations

import hashlib
import io
import json
import random
import threading
import time
import zipfile
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import date, datetime, timedelta, timezone
from decimal import Decimal
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import structlog

from binance_provider.facts import ARCHIVE_CONN_ID, DEFAULT_ARCHIVE_HOST, HookSettings
from binance_provider.hooks.archive import (
    ArchiveFile,
    ArchiveFileRejected,
    BinanceArchiveHook,
    parse_kline_csv,
)
from binance_provider.hooks.binance import BinanceBanned, BinanceUnavailable
from binance_provider.hooks.rate_limiter import BanRecord

MINUTE_MS = 60_000
INTERVAL_MS = {"15m": 15 * MINUTE_MS, "1h": 60 * MINUTE_MS, "1d": 24 * 60 * MINUTE_MS}


def ms(day: date) -> int:
    return int(datetime(day.year, day.month, day.day, tzinfo=timezone.utc).timestamp()) * 1000


# -- data: REST-shaped rows and the archive files holding them -------------------------------------


def kline_rows(interval: str, start: date, end: date, seed: int = 7) -> list[list]:
    """Deterministic rows for open times in ``[start, end)``, exactly as BinanceHook pages hold them:
    ints for the times and the trade count, decimal strings (8 places, as Binance writes them)."""
    rng = random.Random(seed)
    step = INTERVAL_MS[interval]
    price = Decimal("42000")
    rows = []
    for open_time in range(ms(start), ms(end), step):
        open_ = price
        close = open_ + Decimal(rng.randint(-5000, 5000)) / 100
        high = max(open_, close) + Decimal(rng.randint(0, 3000)) / 100
        low = min(open_, close) - Decimal(rng.randint(0, 3000)) / 100
        volume = Decimal(rng.randint(1, 10**9)) / 10**5
        taker = volume * Decimal(rng.randint(0, 100)) / 100
        vwap = (low + high) / 2
        rows.append([open_time, f"{open_:.8f}", f"{high:.8f}", f"{low:.8f}", f"{close:.8f}", f"{volume:.8f}",
                     open_time + step - 1, f"{volume * vwap:.8f}", rng.randint(1, 90_000), f"{taker:.8f}",
                     f"{taker * vwap:.8f}", "0"])
        price = close
    return rows


def to_csv(rows: list[list], *, micros: bool = False, header: bool = False) -> str:
    """An archive CSV: no header unless asked, times in ms or (2025+ files) in µs."""
    lines = ["open_time,open,high,low,close,volume,close_time,quote_volume,count,taker_buy_volume,"
             "taker_buy_quote_volume,ignore"] if header else []
    for row in rows:
        fields = list(row)
        if micros:
            fields[0], fields[6] = row[0] * 1000, row[6] * 1000 + 999
        lines.append(",".join(map(str, fields)))
    return "\r\n".join(lines) + "\r\n"


def make_zip(csv_text: str, member: str, *, stored: bool = False, extra_member: str | None = None) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_STORED if stored else zipfile.ZIP_DEFLATED) as archive:
        archive.writestr(member, csv_text)
        if extra_member:
            archive.writestr(extra_member, csv_text)
    return buffer.getvalue()


def checksum_body(body: bytes, name: str) -> bytes:
    return f"{hashlib.sha256(body).hexdigest()}  {name}\n".encode()


# -- the server ------------------------------------------------------------------------------------


class _Handler(BaseHTTPRequestHandler):
    timeout = 5

    def log_message(self, format, *args):  # noqa: A002 - BaseHTTPRequestHandler's signature
        pass

    def do_GET(self):
        owner: ArchiveServer = self.server.owner
        path = self.path.split("?", 1)[0]
        with owner.lock:
            owner.hits[path] += 1
            script = owner.script.get(path)
            step = script.pop(0) if script else None
            if step is None:
                body = owner.files.get(path)
                step = (200, {}, body) if body is not None else (404, {}, b"<Error><Code>NoSuchKey</Code></Error>")
        status, headers, body = step
        self.send_response(status)
        for name, value in headers.items():
            self.send_header(name, str(value))
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


class ArchiveServer:
    """Serves ``files`` (path → bytes; 404 for any other path); ``script[path]`` answers the path's
    next requests with ``(status, headers, body)`` in turn. ``hits`` counts requests per path."""

    def __init__(self) -> None:
        self.files: dict[str, bytes] = {}
        self.script: dict[str, list[tuple[int, dict, bytes]]] = {}
        self.hits: Counter[str] = Counter()
        self.lock = threading.Lock()
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
        self._httpd.daemon_threads = True
        self._httpd.owner = self
        self._thread = threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05},
                                        name="archive-server", daemon=True)

    @property
    def url(self) -> str:
        host, port = self._httpd.server_address[:2]
        return f"http://{host}:{port}"

    def publish(self, path: str, csv_text: str, **zip_options) -> bytes:
        """Store the zip of ``csv_text`` at ``path`` and its CHECKSUM beside it; returns the zip."""
        name = path.rsplit("/", 1)[1]
        body = make_zip(csv_text, name[: -len(".zip")] + ".csv", **zip_options)
        self.files[path] = body
        self.files[path + ".CHECKSUM"] = checksum_body(body, name)
        return body

    def fault(self, path: str, *steps: tuple[int, dict, bytes]) -> None:
        self.script.setdefault(path, []).extend(steps)

    def __enter__(self) -> ArchiveServer:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        try:
            self._httpd.shutdown()
        finally:
            self._httpd.server_close()
            self._thread.join(timeout=5)


@pytest.fixture
def server(monkeypatch, tmp_path) -> Iterator[ArchiveServer]:
    """An archive server that ``binance_archive`` points at; bans recorded under ``tmp_path``."""
    monkeypatch.setenv("BINANCE_BAN_DIR", str(tmp_path / "bans"))
    with ArchiveServer() as running:
        monkeypatch.setenv("AIRFLOW_CONN_BINANCE_ARCHIVE", json.dumps({"conn_type": "http", "host": running.url}))
        yield running


def make_hook(**options) -> BinanceArchiveHook:
    defaults = dict(settings=HookSettings(), timeout_s=5.0, max_tries=4, backoff_factor_s=0.01, backoff_cap_s=0.05)
    defaults.update(options)
    return BinanceArchiveHook(**defaults)


class Metrics:
    """What the hook sent to Airflow's stats backend."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, str, tuple]] = []

    def names(self, kind: str | None = None) -> list[str]:
        return [name for k, name, _ in list(self.calls) if kind is None or k == kind]

    def count(self, name: str) -> int:
        return self.names().count(name)


@pytest.fixture
def metrics(monkeypatch) -> Metrics:
    """Replace incr/timing/gauge of ``airflow.sdk.observability.stats`` with a recorder."""
    from airflow.sdk.observability import stats

    recorder = Metrics()
    for kind in ("incr", "timing", "gauge"):
        def record(name, *args, _kind=kind, **kwargs):
            recorder.calls.append((_kind, name, args))

        monkeypatch.setattr(stats, kind, record)
    return recorder


JAN_2024 = BinanceArchiveHook.monthly_path("BTCUSDT", "1h", 2024, 1)
JAN_2024_ROWS = kline_rows("1h", date(2024, 1, 1), date(2024, 2, 1))


# -- class contract, connection and layout -----------------------------------------------------------


def test_class_attributes_follow_the_provider_contract():
    from airflow.providers.http.hooks.http import HttpHook

    assert BinanceArchiveHook.conn_name_attr == "binance_archive_conn_id"
    assert BinanceArchiveHook.default_conn_name == ARCHIVE_CONN_ID == "binance_archive"
    assert BinanceArchiveHook.conn_type == "http"
    assert BinanceArchiveHook.hook_name == "Binance public data archive"
    assert issubclass(BinanceArchiveHook, HttpHook)
    assert BinanceArchiveHook(method="POST").method == "GET"


def test_missing_connection_falls_back_to_the_public_archive_host(monkeypatch):
    monkeypatch.delenv("AIRFLOW_CONN_BINANCE_ARCHIVE", raising=False)
    hook = make_hook()
    # Only resolve the host: nothing is sent.
    assert hook.source == DEFAULT_ARCHIVE_HOST == "https://data.binance.vision"
    assert hook.url(JAN_2024) == (
        "https://data.binance.vision/data/spot/monthly/klines/BTCUSDT/1h/BTCUSDT-1h-2024-01.zip")


def test_the_connection_overrides_the_host(server):
    hook = make_hook()
    assert hook.source == server.url
    assert hook.url(JAN_2024) == server.url + JAN_2024
    assert hook.test_connection() == (True, f"{server.url} answered 404")


def test_paths_follow_the_archive_layout():
    hook = BinanceArchiveHook
    assert hook.monthly_path("BTCUSDT", "15m", 2017, 8) == (
        "/data/spot/monthly/klines/BTCUSDT/15m/BTCUSDT-15m-2017-08.zip")
    assert hook.daily_path("ETHUSDT", "1d", date(2025, 1, 1)) == (
        "/data/spot/daily/klines/ETHUSDT/1d/ETHUSDT-1d-2025-01-01.zip")
    assert hook.monthly_path("BTCUSDT", "1M", 2024, 12).endswith("/BTCUSDT/1mo/BTCUSDT-1mo-2024-12.zip")


@pytest.mark.parametrize("call, named", [
    (lambda: BinanceArchiveHook.monthly_path("btcusdt", "1h", 2024, 1), "symbol"),
    (lambda: BinanceArchiveHook.monthly_path("BTCUSDT", "2m", 2024, 1), "interval"),
    (lambda: BinanceArchiveHook.monthly_path("BTCUSDT", "1h", 2024, 13), "month"),
    (lambda: BinanceArchiveHook.daily_path("BTCUSDT", "1h", "2024-01-01"), "day"),
    (lambda: BinanceArchiveHook(settings=HookSettings()).fetch("/data/spot/monthly/klines/BTCUSDT/1h/x.zip"), "path"),
    (lambda: BinanceArchiveHook(settings=HookSettings()).fetch(
        "/data/spot/daily/klines/BTCUSDT/1h/BTCUSDT-1h-2024-01.zip"), "path"),
])
def test_bad_arguments_are_refused_without_a_request(server, call, named):
    with pytest.raises(ValueError, match=named):
        call()
    assert sum(server.hits.values()) == 0


# -- good files --------------------------------------------------------------------------------------


def test_a_good_file_gives_exactly_the_rows_rest_would(server, metrics):
    body = server.publish(JAN_2024, to_csv(JAN_2024_ROWS))
    before = datetime.now(timezone.utc)
    found = make_hook().fetch(JAN_2024)
    assert isinstance(found, ArchiveFile)
    assert found.rows == JAN_2024_ROWS and len(found.rows) == 31 * 24
    # Types exactly as BinanceHook's pages: ints for times and trade count, strings as written.
    assert [type(value) for value in found.rows[0]] == [int, str, str, str, str, str, int, str, int, str, str, str]
    assert found.rejected == [] and found.dropped_open == 0 and found.retries == 0
    assert found.url == server.url + JAN_2024
    assert found.sha256 == hashlib.sha256(body).hexdigest() and found.bytes == len(body)
    assert (found.symbol, found.interval, found.path) == ("BTCUSDT", "1h", JAN_2024)
    assert (found.start_ms, found.end_ms) == (ms(date(2024, 1, 1)), ms(date(2024, 2, 1)))
    fetched = datetime.fromisoformat(found.fetched_at)
    assert fetched.utcoffset() == timedelta(0) and before - timedelta(seconds=1) <= fetched
    assert 0 < found.latency_ms < 5_000
    assert server.hits == {JAN_2024 + ".CHECKSUM": 1, JAN_2024: 1}
    assert metrics.count("archive.download.count") == 1
    assert metrics.names("timing") == ["archive.download.duration"]
    assert not [name for name in metrics.names() if "error" in name or "mismatch" in name or "retry" in name]


def test_fetch_month_and_fetch_day_build_the_path(server):
    day = date(2024, 1, 31)
    rows = kline_rows("15m", day, day + timedelta(days=1))
    server.publish(BinanceArchiveHook.daily_path("BTCUSDT", "15m", day), to_csv(rows))
    server.publish(JAN_2024, to_csv(JAN_2024_ROWS))
    hook = make_hook()
    assert hook.fetch_day("BTCUSDT", "15m", day).rows == rows
    assert hook.fetch_month("BTCUSDT", "1h", 2024, 1).rows == JAN_2024_ROWS


def test_microsecond_and_millisecond_files_give_identical_rows(server):
    day = date(2025, 1, 1)
    rows = kline_rows("1h", day, day + timedelta(days=1))
    in_ms, in_us = (BinanceArchiveHook.daily_path(symbol, "1h", day) for symbol in ("BTCUSDT", "ETHUSDT"))
    server.publish(in_ms, to_csv(rows))
    server.publish(in_us, to_csv(rows, micros=True))
    assert b"1735689600000000," in zipfile.ZipFile(io.BytesIO(server.files[in_us])).read("ETHUSDT-1h-2025-01-01.csv")
    hook = make_hook()
    assert hook.fetch(in_us).rows == hook.fetch(in_ms).rows == rows
    # A close time in µs ends in 999999; whole-ms division gives REST's ...999.
    assert 1735689599999999 // 1000 == 1735689599999 == ms(day) - 1
    assert to_csv(rows[:1], micros=True).split(",")[6] == "1735693199999999"
    assert parse_kline_csv(to_csv(rows[:1], micros=True))[0][6] == rows[0][6] == 1735693199999


def test_a_header_row_is_tolerated(server):
    server.publish(JAN_2024, to_csv(JAN_2024_ROWS, header=True))
    assert make_hook().fetch(JAN_2024).rows == JAN_2024_ROWS


def test_csv_parsing_keeps_decimal_strings_exactly():
    text = "1704067200000,0.00001000,1.10000000,0.00000001,1E-8,0,1704070799999,12.5,3,0.0,0.00,0\n"
    assert parse_kline_csv(text) == [[1704067200000, "0.00001000", "1.10000000", "0.00000001", "1E-8", "0",
                                      1704070799999, "12.5", 3, "0.0", "0.00", "0"]]
    assert parse_kline_csv('"1704067200000","1.0","1.0","1.0","1.0","1",1704070799999,"1",1,"0","0","0"\n')[0][0] \
        == 1704067200000  # a quoted file is read by the csv module
    assert parse_kline_csv("") == []


def test_a_row_breaking_the_row_contract_goes_to_rejected(server, metrics):
    rows = [list(row) for row in JAN_2024_ROWS]
    bad = rows[5]
    bad[3] = f"{Decimal(bad[1]) + 1:.8f}"  # low above open
    server.publish(JAN_2024, to_csv(rows))
    with structlog.testing.capture_logs() as logs:
        found = make_hook().fetch(JAN_2024)
    assert found.rows == rows[:5] + rows[6:]
    assert [(r.open_time, r.row, r.rules) for r in found.rejected] == [(bad[0], bad, ("low_within_open_close",))]
    warned = [line for line in logs if line["event"] == "binance kline row rejected"]
    assert len(warned) == 1 and warned[0]["symbol"] == "BTCUSDT" and warned[0]["endpoint"] == JAN_2024
    assert server.hits[JAN_2024] == 1  # not refetched: the archive would serve it again
    assert metrics.count("archive.file_rejected") == 0


def test_candles_not_closed_at_fetch_time_are_dropped(server):
    server.publish(JAN_2024, to_csv(JAN_2024_ROWS))
    found = make_hook().fetch(JAN_2024, now_ms=JAN_2024_ROWS[10][6])
    assert found.rows == JAN_2024_ROWS[:10] and found.dropped_open == len(JAN_2024_ROWS) - 10


# -- files that are not there, or not right ----------------------------------------------------------


def test_an_unpublished_file_is_none(server, metrics):
    assert make_hook().fetch(JAN_2024) is None
    # the zip is asked for beside its CHECKSUM (one round trip), and both answered 404
    assert server.hits == {JAN_2024 + ".CHECKSUM": 1, JAN_2024: 1}
    server.files[JAN_2024 + ".CHECKSUM"] = b"0" * 64 + b"  BTCUSDT-1h-2024-01.zip\n"
    assert make_hook().fetch(JAN_2024) is None  # a CHECKSUM without its zip: missing
    assert not [name for name in metrics.names() if "error" in name]  # a 404 is an answer, not a failure


def test_a_wrong_checksum_is_fetched_twice_then_rejected(server, metrics):
    server.publish(JAN_2024, to_csv(JAN_2024_ROWS))
    good = server.files[JAN_2024]
    server.files[JAN_2024 + ".CHECKSUM"] = b"ab" * 32 + b"  BTCUSDT-1h-2024-01.zip\n"
    with structlog.testing.capture_logs() as logs:
        with pytest.raises(ArchiveFileRejected) as caught:
            make_hook().fetch(JAN_2024)
    rejected = caught.value
    assert (rejected.url, rejected.kind) == (server.url + JAN_2024, "checksum")
    assert rejected.reason == "checksum mismatch"
    assert rejected.expected_sha256 == "ab" * 32 and rejected.found_sha256 == hashlib.sha256(good).hexdigest()
    assert server.hits[JAN_2024] == 2 and server.hits[JAN_2024 + ".CHECKSUM"] == 2
    assert metrics.count("archive.checksum_mismatch") == 1 and metrics.count("archive.file_rejected") == 1
    assert metrics.count("archive.download.count") == 2
    unusable = [line for line in logs if line["event"] == "binance archive file unusable"]
    assert [line["status"] for line in unusable] == ["refetch", "rejected"]


def test_a_wrong_checksum_once_then_a_good_one_gives_the_rows(server, metrics):
    server.publish(JAN_2024, to_csv(JAN_2024_ROWS))
    server.fault(JAN_2024 + ".CHECKSUM", (200, {}, b"cd" * 32 + b"  BTCUSDT-1h-2024-01.zip\n"))
    found = make_hook().fetch(JAN_2024)
    assert found.rows == JAN_2024_ROWS and found.retries == 1
    assert server.hits[JAN_2024] == 2
    assert metrics.count("archive.checksum_mismatch") == 0 and metrics.count("archive.file_rejected") == 0


def test_a_checksum_for_another_file_or_unreadable_is_a_mismatch(server):
    server.publish(JAN_2024, to_csv(JAN_2024_ROWS))
    sha = hashlib.sha256(server.files[JAN_2024]).hexdigest()
    server.files[JAN_2024 + ".CHECKSUM"] = f"{sha}  BTCUSDT-1h-2023-12.zip\n".encode()
    with pytest.raises(ArchiveFileRejected, match="CHECKSUM names"):
        make_hook().fetch(JAN_2024)
    server.files[JAN_2024 + ".CHECKSUM"] = b"<html>oops</html>"
    with pytest.raises(ArchiveFileRejected, match="unreadable CHECKSUM") as caught:
        make_hook().fetch(JAN_2024)
    assert (caught.value.expected_sha256, caught.value.found_sha256) == (None, sha)


def _corrupt(kind: str, csv_text: str) -> bytes:
    member = "BTCUSDT-1h-2024-01.csv"
    if kind == "not_a_zip":
        return b"PK\x03\x04 this is not a zip"
    if kind == "truncated":
        return make_zip(csv_text, member)[:-200]
    if kind == "crc":
        body = bytearray(make_zip(csv_text, member, stored=True))
        body[len(body) // 2] ^= 0xFF  # inside the stored CSV: its CRC-32 no longer matches
        return bytes(body)
    if kind == "two_members":
        return make_zip(csv_text, member, extra_member="other.csv")
    if kind == "no_csv_member":
        return make_zip(csv_text, "BTCUSDT-1h-2024-01.txt")
    if kind == "unparseable_csv":
        return make_zip(csv_text.replace("\r\n", "\r\nnot,a,kline\r\n", 1), member)
    if kind == "off_grid_us":  # a µs open time that is not a whole ms
        return make_zip(to_csv(JAN_2024_ROWS[:1], micros=True).replace("000000,", "000123,", 1), member)
    raise AssertionError(kind)


CORRUPTIONS = ["not_a_zip", "truncated", "crc", "two_members", "no_csv_member", "unparseable_csv", "off_grid_us"]


@pytest.mark.parametrize("kind", CORRUPTIONS)
def test_a_corrupt_zip_is_fetched_twice_then_rejected(server, metrics, kind):
    csv_text = to_csv(JAN_2024_ROWS)
    server.publish(JAN_2024, csv_text)
    corrupt = _corrupt(kind, csv_text)
    # The CHECKSUM matches the corrupt bytes: the checksum passes, the zip does not.
    server.files[JAN_2024] = corrupt
    server.files[JAN_2024 + ".CHECKSUM"] = checksum_body(corrupt, "BTCUSDT-1h-2024-01.zip")
    with pytest.raises(ArchiveFileRejected) as caught:
        make_hook().fetch(JAN_2024)
    assert caught.value.kind == "corrupt" and caught.value.reason.startswith("corrupt zip")
    assert caught.value.expected_sha256 == caught.value.found_sha256 == hashlib.sha256(corrupt).hexdigest()
    assert server.hits[JAN_2024] == 2
    assert metrics.count("archive.file_rejected") == 1 and metrics.count("archive.checksum_mismatch") == 0


@pytest.mark.parametrize("kind", ["crc", "unparseable_csv"])
def test_a_corrupt_zip_once_then_a_good_one_gives_the_rows(server, kind):
    csv_text = to_csv(JAN_2024_ROWS)
    server.publish(JAN_2024, csv_text)
    corrupt = _corrupt(kind, csv_text)
    server.fault(JAN_2024 + ".CHECKSUM", (200, {}, checksum_body(corrupt, "BTCUSDT-1h-2024-01.zip")))
    server.fault(JAN_2024, (200, {}, corrupt))
    found = make_hook().fetch(JAN_2024)
    assert found.rows == JAN_2024_ROWS and found.retries == 1 and server.hits[JAN_2024] == 2


# -- transient failures and bans ---------------------------------------------------------------------


def test_a_500_once_is_retried(server, metrics):
    server.publish(JAN_2024, to_csv(JAN_2024_ROWS))
    server.fault(JAN_2024, (500, {}, b"oops"))
    server.fault(JAN_2024 + ".CHECKSUM", (503, {}, b"busy"))
    assert make_hook().fetch(JAN_2024).rows == JAN_2024_ROWS
    assert server.hits == {JAN_2024 + ".CHECKSUM": 2, JAN_2024: 2}
    assert metrics.count("archive.download.retry") == 2
    assert metrics.count("archive.download.error.500") == metrics.count("archive.download.error.503") == 1
    assert metrics.count("archive.download.count") == 1  # one zip downloaded


def test_5xx_outlasting_the_budget_raises_unavailable(server, metrics):
    server.publish(JAN_2024, to_csv(JAN_2024_ROWS))
    server.fault(JAN_2024 + ".CHECKSUM", *[(500, {}, b"down")] * 10)
    with pytest.raises(BinanceUnavailable, match=r"gave up after 3 attempts"):
        make_hook(max_tries=3).fetch(JAN_2024)
    assert server.hits[JAN_2024 + ".CHECKSUM"] == 3 and server.hits[JAN_2024] == 1  # asked for once, beside it


def test_a_429_waits_its_retry_after(server):
    server.publish(JAN_2024, to_csv(JAN_2024_ROWS))
    server.fault(JAN_2024, (429, {"Retry-After": "0.3"}, b"slow down"))
    started = time.monotonic()
    assert make_hook().fetch(JAN_2024).rows == JAN_2024_ROWS
    assert time.monotonic() - started >= 0.3


def test_a_connection_refused_is_unavailable(monkeypatch):
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    monkeypatch.setenv("AIRFLOW_CONN_BINANCE_ARCHIVE", json.dumps({"conn_type": "http", "host": f"http://127.0.0.1:{port}"}))
    with pytest.raises(BinanceUnavailable, match="connection"):
        make_hook(max_tries=2).fetch(JAN_2024)


def test_a_418_from_the_archive_host_is_honoured_and_a_rest_ban_elsewhere_is_not(server, metrics):
    server.publish(JAN_2024, to_csv(JAN_2024_ROWS))
    BanRecord("https://data-api.binance.vision").record(time.time() + 600)  # the REST host, not ours
    assert make_hook().fetch(JAN_2024).rows == JAN_2024_ROWS
    server.fault(JAN_2024 + ".CHECKSUM", (418, {"Retry-After": "60"}, b"banned"))
    with pytest.raises(BinanceBanned):
        make_hook().fetch(JAN_2024)
    assert metrics.count("binance.banned") == 1
    hits = sum(server.hits.values())
    with pytest.raises(BinanceBanned):  # a new hook (another process alike) sends nothing
        make_hook().fetch(JAN_2024)
    assert sum(server.hits.values()) == hits
    assert BanRecord(server.url).until() > time.time() + 50


# -- concurrency and speed ---------------------------------------------------------------------------


def test_fetch_from_many_threads_at_once(server):
    months = [(2023, month) for month in range(1, 13)]
    expected = {}
    for year, month in months:
        path = BinanceArchiveHook.monthly_path("BTCUSDT", "1h", year, month)
        after = date(year + month // 12, month % 12 + 1, 1)
        expected[path] = kline_rows("1h", date(year, month, 1), after, seed=month)
        server.publish(path, to_csv(expected[path]))
    server.fault(next(iter(expected)), (500, {}, b"once"))
    hook = make_hook()
    with ThreadPoolExecutor(max_workers=6) as pool:
        found = dict(zip(expected, pool.map(hook.fetch, expected)))
    assert {path: file.rows for path, file in found.items()} == expected
    # requests.Session is not thread-safe: each thread has its own, reused by its later calls.
    together = threading.Barrier(3)

    def session_of_this_thread(_):
        session = hook._session()
        together.wait(timeout=5)  # three threads alive at once
        return id(session)

    with ThreadPoolExecutor(max_workers=3) as pool:
        assert len(set(pool.map(session_of_this_thread, range(3)))) == 3
    assert hook._session() is hook._session()


def test_parsing_a_month_of_15m_is_fast():
    rows = kline_rows("15m", date(2024, 1, 1), date(2024, 2, 1))
    assert len(rows) == 2976
    for micros in (False, True):
        text = to_csv(rows, micros=micros)
        assert parse_kline_csv(text) == rows
        best = min(_timed(parse_kline_csv, text) for _ in range(5))
        print(f"parse a month of 15m ({'µs' if micros else 'ms'}): {best * 1000:.1f} ms")
        assert best < 0.05  # ~3-5 ms here; generous for a loaded CI machine


def _timed(function, *args) -> float:
    started = time.perf_counter()
    function(*args)
    return time.perf_counter() - started
