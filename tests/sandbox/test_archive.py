"""The public data archive layout (data.binance.vision) served by the sandbox over HTTP."""

from __future__ import annotations

import calendar
import hashlib
import io
import time
import zipfile
import zlib
from datetime import datetime, timezone

import pytest
import requests

from include.binance_sandbox import SandboxServer
from include.binance_sandbox.__main__ import build_parser, faults_from_args
from include.binance_sandbox.archive import HEADER_LINE, Archive, parse_path

DAY = 86_400_000
WEEK = 7 * DAY
WEIGHT = "X-MBX-USED-WEIGHT-1M"
REST_INTERVAL = {"1mo": "1M"}


def ms(text: str) -> int:
    return calendar.timegm(datetime.fromisoformat(text).timetuple()) * 1000


def period_range(period: str) -> tuple[int, int]:
    parts = [int(p) for p in period.split("-")]
    if len(parts) == 3:
        start = calendar.timegm((*parts, 0, 0, 0)) * 1000
        return start, start + DAY
    year, month = parts
    return (calendar.timegm((year, month, 1, 0, 0, 0)) * 1000,
            calendar.timegm((year + month // 12, month % 12 + 1, 1, 0, 0, 0)) * 1000)


def file_path(symbol: str, interval: str, period: str) -> str:
    kind = "daily" if period.count("-") == 2 else "monthly"
    return f"/data/spot/{kind}/klines/{symbol}/{interval}/{symbol}-{interval}-{period}.zip"


def fetch(srv, symbol, interval, period, session=None, checksum_first=True):
    """(status of the zip, zip bytes, CHECKSUM text or None) of one archive file."""
    get = (session or requests).get
    url = srv.url + file_path(symbol, interval, period)
    if checksum_first:
        check = get(url + ".CHECKSUM", timeout=10)
        answer = get(url, timeout=10)
    else:
        answer = get(url, timeout=10)
        check = get(url + ".CHECKSUM", timeout=10)
    assert check.status_code == answer.status_code
    return answer.status_code, answer.content, check.text if check.status_code == 200 else None


def csv_lines(zip_bytes: bytes, member: str) -> list[str]:
    with zipfile.ZipFile(io.BytesIO(zip_bytes)) as archive:
        assert archive.namelist() == [member]
        return archive.read(member).decode().splitlines()


def archive_rows(srv, symbol, interval, period) -> list[list[str]]:
    status, data, checksum = fetch(srv, symbol, interval, period)
    assert status == 200
    name = f"{symbol}-{interval}-{period}.zip"
    assert checksum == f"{hashlib.sha256(data).hexdigest()}  {name}\n"
    return [line.split(",") for line in csv_lines(data, name.replace(".zip", ".csv"))]


def rest_rows(srv, symbol, interval, start, end, micro=False) -> list[list[str]]:
    """/api/v3/klines for open_time in [start, end), every field as its text."""
    rows, session = [], requests.Session()
    headers = {"X-MBX-TIME-UNIT": "MICROSECOND"} if micro else None
    unit = 1000 if micro else 1
    cursor = start * unit
    while True:
        page = session.get(srv.url + "/api/v3/klines", headers=headers, timeout=10, params={
            "symbol": symbol, "interval": REST_INTERVAL.get(interval, interval),
            "startTime": cursor, "endTime": end * unit - 1, "limit": 1000,
        }).json()
        rows.extend([str(v) for v in row] for row in page)
        if len(page) < 1000:
            return rows
        cursor = page[-1][0] + 1


@pytest.fixture
def srv(clean_sandbox):
    return clean_sandbox


# -- content ---------------------------------------------------------------------------------


@pytest.mark.parametrize("interval", ["15m", "1h", "4h", "1d", "1w", "1mo"])
def test_monthly_file_equals_rest_row_for_row(srv, interval):
    start, end = period_range("2024-12")
    served = archive_rows(srv, "BTCUSDT", interval, "2024-12")
    assert served and served == rest_rows(srv, "BTCUSDT", interval, start, end)
    assert all(len(row) == 12 and int(row[0]) < 10**13 for row in served)  # 2024: ms


def test_2025_files_are_in_microseconds(srv):
    start, end = period_range("2025-01")
    served = archive_rows(srv, "BTCUSDT", "15m", "2025-01")
    assert len(served) == 31 * 96
    assert served == rest_rows(srv, "BTCUSDT", "15m", start, end, micro=True)
    in_ms = rest_rows(srv, "BTCUSDT", "15m", start, end)
    assert [int(r[0]) for r in served] == [int(r[0]) * 1000 for r in in_ms]
    assert [int(r[6]) for r in served] == [int(r[6]) * 1000 + 999 for r in in_ms]
    assert served[0][0] == "1735689600000000" and served[0][6] == "1735690499999999"
    assert [r[1:6] + r[7:] for r in served] == [r[1:6] + r[7:] for r in in_ms]


@pytest.mark.parametrize("symbol, interval, day", [("BTCUSDT", "15m", "2024-02-29"), ("ETHUSDT", "1h", "2025-03-15"),
                                                   ("BTCUSDT", "1d", "2023-07-04")])
def test_daily_file_equals_rest(srv, symbol, interval, day):
    start, end = period_range(day)
    served = archive_rows(srv, symbol, interval, day)
    micro = start >= ms("2025-01-01T00:00:00")
    assert served == rest_rows(srv, symbol, interval, start, end, micro=micro)
    assert len(served) == {"15m": 96, "1h": 24, "1d": 1}[interval]


def test_monthly_weekly_file_holds_the_weeks_opening_that_month(srv):
    served = archive_rows(srv, "BTCUSDT", "1w", "2024-07")
    opens = [int(r[0]) for r in served]
    assert opens == [ms("2024-07-01T00:00:00") + i * WEEK for i in range(5)]  # Mondays Jul 1 .. Jul 29
    assert all(datetime.fromtimestamp(t / 1000, tz=timezone.utc).weekday() == 0 for t in opens)
    assert int(served[-1][6]) == ms("2024-08-05T00:00:00") - 1  # the last week runs into August


def test_first_month_starts_with_the_first_candle(srv):
    served = archive_rows(srv, "BTCUSDT", "1h", "2017-08")
    first = requests.get(srv.url + "/api/v3/klines", timeout=10,
                         params={"symbol": "BTCUSDT", "interval": "1h", "startTime": 0, "limit": 1}).json()[0]
    assert served[0] == [str(v) for v in first]
    assert int(served[0][0]) == ms("2017-08-17T04:00:00")


def test_outage_holes_stay_holes(srv):
    srv.set_faults({"outages": [{"start": "2024-05-10T02:00:00", "end": "2024-05-10T05:00:00"}]})
    served = archive_rows(srv, "BTCUSDT", "1h", "2024-05-10")
    hours = [(int(r[0]) - ms("2024-05-10T00:00:00")) // 3_600_000 for r in served]
    assert hours == [h for h in range(24) if h not in (2, 3, 4)]
    assert served == rest_rows(srv, "BTCUSDT", "1h", *period_range("2024-05-10"))
    monthly = archive_rows(srv, "BTCUSDT", "1h", "2024-05")
    assert len(monthly) == 31 * 24 - 3


def test_regenerated_zip_is_byte_identical(srv):
    file, _ = parse_path(file_path("ETHUSDT", "30m", "2023-02"))
    tiny = Archive(srv.market, srv._faults, cache_bytes=1)  # nothing stays cached
    first, second = tiny.zip_and_sha(file), tiny.zip_and_sha(file)
    assert first == second and first[1] == sha(first[0])
    assert fetch(srv, "ETHUSDT", "30m", "2023-02")[1] == first[0]


# -- publication and 404s --------------------------------------------------------------------


@pytest.fixture(scope="module")
def frozen():
    """A sandbox whose clock stops at 2024-08-01 00:00:00.000 UTC."""
    with SandboxServer(now_ms=ms("2024-08-01T00:00:00")) as server:
        yield server


@pytest.fixture
def frozen_srv(frozen):
    frozen.clear_faults()
    yield frozen
    frozen.clear_faults()


def test_published_once_the_period_is_over(frozen_srv):
    status = lambda iv, period: fetch(frozen_srv, "BTCUSDT", iv, period)[0]  # noqa: E731
    assert status("15m", "2024-07") == 200  # published from the 1st of the next month 00:00 UTC
    assert status("15m", "2024-08") == 404  # the month is not over
    assert status("1h", "2024-07-31") == 200
    assert status("1h", "2024-08-01") == 404  # the day is not over
    assert status("1w", "2024-07") == 404  # its last week (from Jul 29) closes on Aug 5
    assert status("1w", "2024-06") == 200
    assert status("1mo", "2024-07") == 200
    frozen_srv.set_faults({"archive_publish_delay_s": 3600})
    assert status("15m", "2024-07") == 404 and status("1h", "2024-07-31") == 404
    assert status("15m", "2024-06") == 200 and status("1h", "2024-07-30") == 200


def test_current_month_and_day_are_404_on_the_live_clock(srv):
    now = datetime.now(timezone.utc)
    assert fetch(srv, "BTCUSDT", "1h", now.strftime("%Y-%m"))[0] == 404
    assert fetch(srv, "BTCUSDT", "1h", now.strftime("%Y-%m-%d"))[0] == 404


@pytest.mark.parametrize("path", [
    file_path("BTCUSDT", "1h", "2017-07"),  # before the first candle
    file_path("BTCUSDT", "1h", "2017-08-16"),
    file_path("BTCUSDT", "1w", "2024-07-02"),  # a Tuesday: no week opens that day
    file_path("XYZUSDT", "1h", "2024-01"),  # unknown symbol
    file_path("BTCUSDT", "7m", "2024-01"),  # unknown interval
    file_path("BTCUSDT", "1M", "2024-01"),  # the archive spells it 1mo
    file_path("BTCUSDT", "1h", "2024-13"),
    file_path("BTCUSDT", "1h", "2023-02-29"),
    "/data/spot/monthly/klines/BTCUSDT/1h/BTCUSDT-1h-2024-01-05.zip",  # a day in the monthly tree
    "/data/spot/monthly/klines/BTCUSDT/1h/ETHUSDT-1h-2024-01.zip",
    "/data/spot/monthly/trades/BTCUSDT/BTCUSDT-trades-2024-01.zip",
])
def test_missing_keys_are_404_with_xml(srv, path):
    for url in (srv.url + path, srv.url + path + ".CHECKSUM"):
        answer = requests.get(url, timeout=10)
        assert answer.status_code == 404
        assert answer.headers["Content-Type"] == "application/xml" and b"<Code>NoSuchKey</Code>" in answer.content
        assert WEIGHT not in answer.headers


def test_head_gives_length_without_body(srv):
    url = srv.url + file_path("BTCUSDT", "1h", "2024-03")
    whole = requests.get(url, timeout=10)
    head = requests.head(url, timeout=10)
    assert head.status_code == 200 and head.content == b""
    assert int(head.headers["Content-Length"]) == len(whole.content)
    assert head.headers["Content-Type"] == "application/zip"
    assert requests.head(srv.url + file_path("BTCUSDT", "1h", "2017-01"), timeout=10).status_code == 404


# -- weight, counters, REST faults -----------------------------------------------------------


def test_archive_requests_carry_no_weight_and_are_counted_apart(srv):
    session = requests.Session()
    answers = [session.get(srv.url + file_path("BTCUSDT", "15m", p) + suffix, timeout=10)
               for p in ("2024-01", "2024-02") for suffix in ("", ".CHECKSUM")]
    answers.append(session.get(srv.url + file_path("BTCUSDT", "15m", "2016-01"), timeout=10))
    answers.append(session.get(srv.url + file_path("BTCUSDT", "1h", "2024-02-02"), timeout=10))
    answers.append(session.head(srv.url + file_path("BTCUSDT", "15m", "2024-01"), timeout=10))
    assert all(WEIGHT not in a.headers for a in answers)
    stats = session.get(srv.url + "/sandbox/stats", timeout=10).json()
    assert stats["requests"] == 0 and stats["by_endpoint"] == {} and stats["by_status"] == {}
    assert stats["current_window_weight"] == 0 and stats["max_window_weight"] == 0
    assert stats["archive_requests"] == 7
    assert stats["archive_by_status"] == {"200": 6, "404": 1}
    assert stats["archive_by_kind"] == {"monthly_zip": 4, "monthly_checksum": 2, "daily_zip": 1}
    assert stats["archive_bytes"] == sum(len(a.content) for a in answers)
    # the REST weight goes on exactly as if no archive request had been made
    rest = session.get(srv.url + "/api/v3/klines", params={"symbol": "BTCUSDT", "interval": "1h"}, timeout=10)
    assert int(rest.headers[WEIGHT]) == 2
    assert session.delete(srv.url + "/sandbox/stats", timeout=10).json()["archive_requests"] == 0


def test_archive_requests_in_flight_are_counted_until_answered(srv):
    """A test can act while a download is under way (the cluster test kills a worker mid-download)."""
    import threading

    srv.set_faults({"latency_ms": 1500, "endpoints": ["archive"]})
    before = srv.stats()
    answer = {}
    download = threading.Thread(target=lambda: answer.update(
        r=requests.get(srv.url + file_path("BTCUSDT", "15m", "2024-01"), timeout=10)))
    download.start()
    seen = []
    for _ in range(100):  # bounded: 10 s
        seen.append(srv.stats()["archive_in_flight"] - before["archive_in_flight"])
        if seen[-1] == 1 or not download.is_alive():
            break
        time.sleep(0.1)
    download.join(timeout=10)
    after = srv.stats()
    assert seen[-1] == 1 and answer["r"].status_code == 200
    assert after["archive_in_flight"] == before["archive_in_flight"]
    assert after["archive_requests"] == before["archive_requests"] + 1


def test_rest_faults_and_bans_do_not_touch_the_archive(srv):
    srv.set_faults({"error_rate": 1.0, "garbage_rate": 1.0, "truncate_rate": 1.0, "hang_rate": 1.0})
    assert archive_rows(srv, "BTCUSDT", "1d", "2024-01")
    srv.set_faults({"error_rate": 0.0, "garbage_rate": 0.0, "truncate_rate": 0.0, "hang_rate": 0.0, "ban_418": 1})
    assert requests.get(srv.url + "/api/v3/ping", timeout=10).status_code == 418
    assert requests.get(srv.url + "/api/v3/ping", timeout=10).status_code == 418  # the ban holds for REST
    assert archive_rows(srv, "BTCUSDT", "1d", "2024-01")  # another host, as far as Binance is concerned


def test_latency_applies_to_archive_requests(srv):
    srv.set_faults({"latency_ms": 150})
    started = time.perf_counter()
    assert requests.get(srv.url + file_path("BTCUSDT", "1d", "2024-01"), timeout=10).status_code == 200
    assert time.perf_counter() - started >= 0.15
    srv.set_faults({"endpoints": ["klines"]})  # scoped to REST klines: the archive is not delayed
    started = time.perf_counter()
    requests.get(srv.url + file_path("BTCUSDT", "1d", "2024-01"), timeout=10)
    assert time.perf_counter() - started < 0.15


# -- archive faults --------------------------------------------------------------------------


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def post_faults(srv, faults: dict) -> dict:
    answer = requests.post(srv.url + "/sandbox/faults", json=faults, timeout=10)
    assert answer.status_code == 200, answer.text
    return answer.json()


def test_wrong_checksum_always(srv):
    post_faults(srv, {"archive_wrong_checksum": ["BTCUSDT-1h-2024-03.zip"]})
    for _ in range(2):
        status, data, checksum = fetch(srv, "BTCUSDT", "1h", "2024-03")
        digest, name = checksum.split()
        assert status == 200 and len(digest) == 64 and digest != sha(data) and name == "BTCUSDT-1h-2024-03.zip"
        assert csv_lines(data, "BTCUSDT-1h-2024-03.csv")  # the zip itself is whole
    assert archive_rows(srv, "BTCUSDT", "1h", "2024-04")  # other files untouched


@pytest.mark.parametrize("checksum_first", [True, False])
def test_wrong_checksum_once_then_ok(srv, checksum_first):
    post_faults(srv, {"archive_wrong_checksum": [{"file": "BTCUSDT-1h-2024-03", "times": 1}]})
    _, data, checksum = fetch(srv, "BTCUSDT", "1h", "2024-03", checksum_first=checksum_first)
    assert checksum.split()[0] != sha(data)
    for _ in range(2):
        _, data, checksum = fetch(srv, "BTCUSDT", "1h", "2024-03", checksum_first=checksum_first)
        assert checksum.split()[0] == sha(data)


def test_corrupt_zip_truncated_matches_its_checksum(srv):
    post_faults(srv, {"archive_corrupt": ["ETHUSDT-4h-2024-03.zip"]})
    for _ in range(2):
        status, data, checksum = fetch(srv, "ETHUSDT", "4h", "2024-03")
        assert status == 200 and checksum.split()[0] == sha(data)
        with pytest.raises(zipfile.BadZipFile):
            zipfile.ZipFile(io.BytesIO(data))


def test_corrupt_zip_garbled_opens_but_fails_to_read(srv):
    post_faults(srv, {"archive_corrupt": [{"file": "2024-03", "mode": "garble"}]})
    status, data, checksum = fetch(srv, "BTCUSDT", "15m", "2024-03")
    assert status == 200 and checksum.split()[0] == sha(data)
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        with pytest.raises((zipfile.BadZipFile, zlib.error)):
            archive.read("BTCUSDT-15m-2024-03.csv")
    assert archive_rows(srv, "BTCUSDT", "15m", "2024-03-05")  # the month's daily files are whole


@pytest.mark.parametrize("checksum_first", [True, False])
def test_corrupt_once_then_ok_in_either_order(srv, checksum_first):
    post_faults(srv, {"archive_corrupt": [{"file": "BTCUSDT-1h-2024-03.zip", "times": 1}]})
    _, bad, checksum = fetch(srv, "BTCUSDT", "1h", "2024-03", checksum_first=checksum_first)
    assert checksum.split()[0] == sha(bad)  # the pair agrees: unzipping is what fails
    with pytest.raises(zipfile.BadZipFile):
        zipfile.ZipFile(io.BytesIO(bad))
    _, good, checksum = fetch(srv, "BTCUSDT", "1h", "2024-03", checksum_first=checksum_first)
    assert checksum.split()[0] == sha(good) and csv_lines(good, "BTCUSDT-1h-2024-03.csv")
    srv.clear_faults()
    assert fetch(srv, "BTCUSDT", "1h", "2024-03")[1] == good


def test_zip_only_downloads_each_count_as_a_round(srv):
    post_faults(srv, {"archive_corrupt": [{"file": "BTCUSDT-1h-2024-03.zip", "times": 2}]})
    url = srv.url + file_path("BTCUSDT", "1h", "2024-03")
    bodies = [requests.get(url, timeout=10).content for _ in range(3)]
    assert len(bodies[0]) < len(bodies[2]) and len(bodies[1]) < len(bodies[2])
    assert csv_lines(bodies[2], "BTCUSDT-1h-2024-03.csv")


def test_missing_month_in_the_middle(srv):
    post_faults(srv, {"archive_missing": ["2024-03"]})
    for symbol, interval in (("BTCUSDT", "15m"), ("BTCUSDT", "1d"), ("ETHUSDT", "1h")):
        assert fetch(srv, symbol, interval, "2024-03")[0] == 404
        assert fetch(srv, symbol, interval, "2024-02")[0] == 200 and fetch(srv, symbol, interval, "2024-04")[0] == 200
    assert fetch(srv, "BTCUSDT", "15m", "2024-03-10")[0] == 200  # its days are still published


def test_missing_once_then_found(srv):
    post_faults(srv, {"archive_missing": [{"file": "BTCUSDT-1h-2024-03-10.zip", "times": 1}]})
    assert fetch(srv, "BTCUSDT", "1h", "2024-03-10")[0] == 404
    assert fetch(srv, "BTCUSDT", "1h", "2024-03-10")[0] == 200
    assert fetch(srv, "BTCUSDT", "1h", "2024-03-10")[0] == 200


def test_header_rows_for_all_or_some_files(srv):
    plain = archive_rows(srv, "BTCUSDT", "1h", "2024-03")
    post_faults(srv, {"archive_header": True})
    status, data, checksum = fetch(srv, "BTCUSDT", "1h", "2024-03")
    assert checksum.split()[0] == sha(data)
    lines = csv_lines(data, "BTCUSDT-1h-2024-03.csv")
    assert lines[0] + "\n" == HEADER_LINE
    assert lines[0] == ("open_time,open,high,low,close,volume,close_time,quote_volume,count,"
                        "taker_buy_volume,taker_buy_quote_volume,ignore")
    assert [line.split(",") for line in lines[1:]] == plain
    post_faults(srv, {"archive_header": [{"file": "BTCUSDT-1h-2024-04.zip", "times": 1}]})
    assert csv_lines(fetch(srv, "BTCUSDT", "1h", "2024-03")[1], "BTCUSDT-1h-2024-03.csv")[0][0].isdigit()
    assert csv_lines(fetch(srv, "BTCUSDT", "1h", "2024-04")[1], "BTCUSDT-1h-2024-04.csv")[0].startswith("open_time")
    assert csv_lines(fetch(srv, "BTCUSDT", "1h", "2024-04")[1], "BTCUSDT-1h-2024-04.csv")[0][0].isdigit()


def test_unpublished_after(srv):
    post_faults(srv, {"archive_unpublished_after": "2024-06"})
    assert fetch(srv, "BTCUSDT", "1h", "2024-06")[0] == 200
    assert fetch(srv, "BTCUSDT", "1h", "2024-07")[0] == 404
    assert fetch(srv, "BTCUSDT", "1h", "2025-01")[0] == 404
    assert fetch(srv, "BTCUSDT", "1h", "2024-07-15")[0] == 200  # days of an unpublished month are there
    requests.delete(srv.url + "/sandbox/faults", timeout=10)
    assert fetch(srv, "BTCUSDT", "1h", "2024-07")[0] == 200


def test_archive_faults_show_and_reset(srv):
    shown = post_faults(srv, {"archive_missing": ["BTCUSDT-1h-2024-03", "2024-05-01"],
                              "archive_corrupt": [{"file": "2024-02", "times": 2, "mode": "garble"}]})
    assert shown["archive_missing"] == [{"file": "BTCUSDT-1h-2024-03.zip", "times": None},
                                        {"file": "2024-05-01", "times": None}]
    assert shown["archive_corrupt"] == [{"file": "2024-02", "times": 2, "mode": "garble"}]
    cleared = requests.delete(srv.url + "/sandbox/faults", timeout=10).json()
    assert cleared["archive_missing"] == [] and cleared["archive_corrupt"] == []
    assert cleared["archive_header"] is False and cleared["archive_unpublished_after"] is None
    assert fetch(srv, "BTCUSDT", "1h", "2024-03")[0] == 200


@pytest.mark.parametrize("bad", [
    {"archive_missing": "2024-03"}, {"archive_missing": ["2024-3"]}, {"archive_missing": [{"times": 1}]},
    {"archive_wrong_checksum": [{"file": "2024-03", "times": 0}]},
    {"archive_corrupt": [{"file": "2024-03", "mode": "melt"}]},
    {"archive_header": [{"file": "2024-03", "count": 1}]}, {"archive_header": "yes"},
    {"archive_unpublished_after": "2024"}, {"archive_publish_delay_s": -1},
])
def test_bad_archive_fault_settings_rejected(srv, bad):
    answer = requests.post(srv.url + "/sandbox/faults", json=bad, timeout=10)
    assert answer.status_code == 400 and next(iter(bad)) in answer.json()["msg"]


def test_cli_flags_give_the_same_faults():
    args = build_parser().parse_args([
        "--archive-missing", "2024-03", "--archive-missing", "BTCUSDT-1h-2024-05.zip:1",
        "--archive-corrupt", "2024-02:2:garble", "--archive-wrong-checksum", "2024-01-05",
        "--archive-header", "--archive-unpublished-after", "2026-09", "--archive-publish-delay-s", "7200",
    ])
    faults = faults_from_args(args)
    assert faults == {
        "archive_missing": [{"file": "2024-03"}, {"file": "BTCUSDT-1h-2024-05.zip", "times": 1}],
        "archive_corrupt": [{"file": "2024-02", "times": 2, "mode": "garble"}],
        "archive_wrong_checksum": [{"file": "2024-01-05"}],
        "archive_header": True, "archive_unpublished_after": "2026-09", "archive_publish_delay_s": 7200.0,
    }
    with SandboxServer(faults=faults) as server:  # accepted as they are
        assert server.faults()["archive_corrupt"] == [{"file": "2024-02", "times": 2, "mode": "garble"}]
    some = faults_from_args(build_parser().parse_args(["--archive-header", "2024-03:1"]))
    assert some["archive_header"] == [{"file": "2024-03", "times": 1}]
