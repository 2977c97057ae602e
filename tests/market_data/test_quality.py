"""The quality report, the cross-timeframe check and the archive/REST reconciliation, on real files."""

from __future__ import annotations

import json
import shutil
from datetime import datetime, timezone
from decimal import Decimal

import pyarrow as pa
import pyarrow.compute as pc
import pytest

from include.market_data import observability, quality
from include.market_data.quality import (
    ARCHIVE_FILE_REJECTED, ARCHIVE_REST_MISMATCH, CROSS_TIMEFRAME_MISMATCH, Finding, QualityReport,
    check_range, cross_timeframe_check, decimal_text, file_rejected, reconcile, run_cross_timeframe,
)
from include.market_data.config import load_settings
from include.market_data.schema import rows_to_table
from include.market_data.storage import RawStore
from include.market_data.timeframes import DAY_MS, HOUR_MS, MINUTE_MS
from tests.market_data.klines import make_rows

SYMBOL = "BTCUSDT"
START = int(datetime(2024, 1, 4, tzinfo=timezone.utc).timestamp() * 1000)  # a Thursday
END = int(datetime(2024, 1, 22, tzinfo=timezone.utc).timestamp() * 1000)  # a Monday: 18 days
MONDAY_JAN_1 = START - 3 * DAY_MS
FUTURE = END + 365 * DAY_MS  # "now" for writes: every candle closed
PROVENANCE = {"source": "test", "endpoint": "/api/v3/klines", "fetched_at": "2024-02-01T00:00:00+00:00",
              "latency_ms": "1", "decimal_places": "8"}
STEP = {"15m": 15 * MINUTE_MS, "30m": 30 * MINUTE_MS, "1h": HOUR_MS, "4h": 4 * HOUR_MS, "1d": DAY_MS,
        "1w": 7 * DAY_MS}
LONGER = ("30m", "1h", "4h", "1d", "1w")


def _bucket(open_ms: int, interval: str) -> int:
    """Open time of the ``interval`` bar holding ``open_ms``, by the calendar (weeks from Monday)."""
    if interval == "1w":
        moment = datetime.fromtimestamp(open_ms / 1000, tz=timezone.utc)
        midnight = open_ms - open_ms % DAY_MS
        return midnight - moment.weekday() * DAY_MS
    return open_ms - open_ms % STEP[interval]


def _aggregate(rows: list[list], interval: str) -> list[list]:
    """Independent aggregation of Binance rows (Python Decimal) into ``interval`` rows."""
    groups: dict[int, list[list]] = {}
    for row in rows:
        groups.setdefault(_bucket(row[0], interval), []).append(row)
    out = []
    for opens, members in sorted(groups.items()):
        dec = lambda i: [Decimal(r[i]) for r in members]  # noqa: E731
        out.append([opens, members[0][1], f"{max(dec(2)):f}", f"{min(dec(3)):f}", members[-1][4], f"{sum(dec(5)):f}",
                    opens + STEP[interval] - 1, f"{sum(dec(7)):f}", sum(r[8] for r in members),
                    f"{sum(dec(9)):f}", f"{sum(dec(10)):f}", "0"])
    return out


def _series() -> dict[str, list[list]]:
    base = make_rows("15m", START, (END - START) // STEP["15m"], price="42000.00")
    for i, row in enumerate(base):  # vary the level so highs and lows move across buckets
        shift = Decimal((i * 37) % 101 - 50)
        for k in (1, 2, 3, 4):
            row[k] = f"{Decimal(row[k]) + shift:.8f}"
    return {"15m": base, **{iv: _aggregate(base, iv) for iv in LONGER}}


def _write(root, interval: str, rows: list[list]) -> None:
    RawStore(str(root)).write(interval, SYMBOL, rows_to_table(rows), PROVENANCE, now=FUTURE)


@pytest.fixture(scope="module")
def golden(tmp_path_factory):
    root = tmp_path_factory.mktemp("quality-golden")
    for interval, rows in _series().items():
        _write(root, interval, rows)
    return root


@pytest.fixture
def raw(golden, tmp_path, monkeypatch):
    """A private copy of the consistent series, RAW_DATA_DIR pointing at it."""
    root = tmp_path / "raw"
    shutil.copytree(golden, root)
    monkeypatch.setenv("RAW_DATA_DIR", str(root))
    return root


@pytest.fixture
def metrics(monkeypatch):
    counts: list[tuple[str, int]] = []
    monkeypatch.setattr(observability, "incr",
                        lambda name, count=1: counts.append((name, count)) if name.startswith("quality.") else None)
    return counts


def _replace(root, interval: str, open_ms: int, **values) -> list:
    """Rewrite the stored bar of ``interval`` opening at ``open_ms`` with changed ``values``."""
    rows = [r for r in _series()[interval] if r[0] == open_ms]
    assert rows, "no such bar"
    row = list(rows[0])
    names = {"open": 1, "high": 2, "low": 3, "close": 4, "volume": 5, "quote_asset_volume": 7,
             "number_of_trades": 8, "taker_buy_base_asset_volume": 9}
    for name, value in values.items():
        row[names[name]] = value
    _write(root, interval, [row])
    return row


# --- cross-timeframe ------------------------------------------------------------------------


def test_consistent_timeframes_give_no_finding(raw):
    store = RawStore(str(raw))
    expected_compared = {"30m": 864, "1h": 432, "4h": 108, "1d": 18, "1w": 2}
    for interval in LONGER:
        result = run_cross_timeframe(store, SYMBOL, interval, START - 7 * DAY_MS, END + 7 * DAY_MS)
        assert result.findings == [], interval
        assert result.compared == expected_compared[interval], interval
    # the week of Monday 2024-01-01 holds 1d bars from Thursday on only: skipped, not a mismatch
    assert run_cross_timeframe(store, SYMBOL, "1w", MONDAY_JAN_1, END).incomplete == 1


def test_a_changed_1h_high_is_found_in_1h_and_in_the_4h_bar_above_it(raw):
    bar = START + 5 * HOUR_MS
    original = next(r for r in _series()["1h"] if r[0] == bar)
    raised = f"{Decimal(original[2]) + Decimal('1000.00000001'):.8f}"
    _replace(raw, "1h", bar, high=raised)
    store = RawStore(str(raw))
    assert cross_timeframe_check(store, SYMBOL, "1h", START, END) == [
        Finding(CROSS_TIMEFRAME_MISMATCH, SYMBOL, "1h", bar, "high", decimal_text(Decimal(original[2])),
                decimal_text(Decimal(raised)), "30m")]
    four_hour = next(r for r in _series()["4h"] if r[0] == START + 4 * HOUR_MS)
    assert cross_timeframe_check(store, SYMBOL, "4h", START, END) == [
        Finding(CROSS_TIMEFRAME_MISMATCH, SYMBOL, "4h", START + 4 * HOUR_MS, "high", decimal_text(Decimal(raised)),
                decimal_text(Decimal(four_hour[2])), "1h")]
    assert cross_timeframe_check(store, SYMBOL, "30m", START, END) == []
    assert cross_timeframe_check(store, SYMBOL, "1d", START, END) == []


def test_a_changed_15m_volume_gives_one_finding_per_field_with_exact_text(raw):
    bar = START + 3 * DAY_MS + 15 * MINUTE_MS  # second half of the 00:00 30m bar
    original = next(r for r in _series()["15m"] if r[0] == bar)
    _replace(raw, "15m", bar, volume=f"{Decimal(original[5]) + Decimal('0.00000001'):.8f}", number_of_trades=999)
    thirty = next(r for r in _series()["30m"] if r[0] == START + 3 * DAY_MS)
    findings = cross_timeframe_check(RawStore(str(raw)), SYMBOL, "30m", START, END)
    assert [(f.open_time, f.field, f.expected, f.found) for f in findings] == [
        (START + 3 * DAY_MS, "volume", decimal_text(Decimal(thirty[5]) + Decimal("0.00000001")),
         decimal_text(Decimal(thirty[5]))),
        (START + 3 * DAY_MS, "number_of_trades", str(thirty[8] - original[8] + 999), str(thirty[8])),
    ]
    assert (findings[0].expected, findings[0].found) == ("5.24691357", "5.24691356")  # exact, plain text


def test_an_incomplete_bucket_is_skipped_not_reported(raw):
    bar = START + 2 * DAY_MS
    store = RawStore(str(raw))
    path = store.path("15m", SYMBOL, bar)
    kept = [r for r in _series()["15m"] if bar <= r[0] < bar + DAY_MS and r[0] != bar + 15 * MINUTE_MS]
    path.unlink()
    _write(raw, "15m", kept)  # a hole at 00:15
    _replace(raw, "30m", bar, close="1.00000000", low="1.00000000")  # wrong, but its bucket is incomplete
    result = run_cross_timeframe(store, SYMBOL, "30m", START, END)
    assert result.findings == [] and result.incomplete == 1 and result.compared == 863


def test_weeks_are_aligned_on_monday(raw):
    monday = MONDAY_JAN_1 + 7 * DAY_MS  # 2024-01-08
    assert datetime.fromtimestamp(monday / 1000, tz=timezone.utc).weekday() == 0
    week = next(r for r in _series()["1w"] if r[0] == monday)
    higher = f"{Decimal(week[2]) + 7:.8f}"  # Wednesday's high above the week's
    _replace(raw, "1d", monday + 2 * DAY_MS, high=higher)
    findings = cross_timeframe_check(RawStore(str(raw)), SYMBOL, "1w", START, END)
    assert [(f.open_time, f.field, f.expected, f.found) for f in findings] == [
        (monday, "high", decimal_text(Decimal(higher)), decimal_text(Decimal(week[2])))]
    assert cross_timeframe_check(RawStore(str(raw)), SYMBOL, "1d", START, END)[0].open_time == monday + 2 * DAY_MS


def test_an_unstored_source_interval_gives_nothing(tmp_path):
    _write(tmp_path, "1h", _series()["1h"])
    assert cross_timeframe_check(RawStore(str(tmp_path)), SYMBOL, "1h", START, END) == []
    with pytest.raises(ValueError, match="interval='15m' has no source interval"):
        cross_timeframe_check(RawStore(str(tmp_path)), SYMBOL, "15m", START, END)


def test_the_range_is_half_open_and_read_in_chunks(raw, monkeypatch):
    bar = START + 10 * DAY_MS
    _replace(raw, "1h", bar, high=f"{Decimal(next(r for r in _series()['1h'] if r[0] == bar)[2]) + 1:.8f}")
    store = RawStore(str(raw))
    assert cross_timeframe_check(store, SYMBOL, "1h", START, bar) == []
    assert len(cross_timeframe_check(store, SYMBOL, "1h", bar, bar + HOUR_MS)) == 1
    monkeypatch.setattr(quality, "CHUNK_DAYS", 1)  # many small chunks: same answer
    result = run_cross_timeframe(store, SYMBOL, "1h", START, END)
    assert result.compared == 432 and [f.open_time for f in result.findings] == [bar]


# --- reconciliation ------------------------------------------------------------------------


def test_reconcile_equal_data_gives_nothing_and_finds_value_and_presence_differences():
    rows = make_rows("1h", START, 48)
    archive = rows_to_table(rows)
    assert reconcile(SYMBOL, "1h", archive, rows_to_table(rows)) == []
    rest_rows = [list(r) for r in rows]
    rest_rows[3][4] = f"{Decimal(rest_rows[3][4]) + Decimal('0.01'):.8f}"  # REST close differs
    rest_rows[3][8] = rest_rows[3][8] + 1
    del rest_rows[10]  # archive only
    rest_rows.append(make_rows("1h", START + 48 * HOUR_MS, 1)[0])  # REST only
    url = "https://data.binance.vision/data/spot/daily/klines/BTCUSDT/1h/BTCUSDT-1h-2024-01-04.zip"
    findings = reconcile(SYMBOL, "1h", archive, rows_to_table(rest_rows), source=url)
    assert [(f.open_time, f.field, f.expected, f.found) for f in findings] == [
        (START + 3 * HOUR_MS, "close", decimal_text(Decimal(rest_rows[3][4])), decimal_text(Decimal(rows[3][4]))),
        (START + 3 * HOUR_MS, "number_of_trades", str(rows[3][8] + 1), str(rows[3][8])),
        (START + 10 * HOUR_MS, "presence", "missing", "present"),
        (START + 48 * HOUR_MS, "presence", "present", "missing"),
    ]
    assert {f.kind for f in findings} == {ARCHIVE_REST_MISMATCH} and {f.source for f in findings} == {url}
    # a window: only the open times inside it count
    assert reconcile(SYMBOL, "1h", archive, rows_to_table(rest_rows), start_ms=START + 4 * HOUR_MS,
                     end_ms=START + 48 * HOUR_MS)[0].field == "presence"


def test_decimal_text_is_exact():
    assert decimal_text(Decimal("30000.500000000000000000")) == "30000.5"
    assert decimal_text(Decimal("0E-18")) == "0"
    assert decimal_text(Decimal("12345678901234567890.123456789012345678")) == "12345678901234567890.123456789012345678"
    assert decimal_text(7) == "7"


# --- the report ------------------------------------------------------------------------


def _finding(open_ms: int, field: str = "high", expected: str = "2", found: str = "1") -> Finding:
    return Finding(CROSS_TIMEFRAME_MISMATCH, SYMBOL, "1h", open_ms, field, expected, found, "30m")


def test_report_merges_idempotently_unique_and_sorted(tmp_path, metrics):
    report = QualityReport(str(tmp_path))
    first = [_finding(START + 2 * HOUR_MS), _finding(START, "low"), _finding(START, "close")]
    assert report.record("1h", first, now=END) == 3
    table = report.read("1h")
    assert table.schema == quality.REPORT_SCHEMA and table.num_rows == 3
    assert pc.cast(table.column("open_time"), pa.int64()).to_pylist() == [START, START, START + 2 * HOUR_MS]
    assert report.path("1h") == tmp_path / "_quality" / "1h.parquet"

    assert report.record("1h", first, now=END + 1) == 0  # re-run: no duplicate, newest checked_at
    again = report.read("1h")
    assert again.drop_columns(["checked_at"]).equals(table.drop_columns(["checked_at"]))
    assert set(pc.cast(again.column("checked_at"), pa.int64()).to_pylist()) == {END + 1}

    assert report.record("1h", [_finding(START, "low", expected="3")], now=END + 2) == 1  # changed: new
    assert report.record("1h", [_finding(START, "low", expected="4")], now=END) == 0  # older check: not kept
    rows = report.read("1h").to_pylist()
    assert len(rows) == 3 and [r["expected"] for r in rows if r["field"] == "low"] == ["3"]
    assert report.record("1h", [], now=END + 3) == 0
    assert metrics == [("quality.1h.findings", 3), ("quality.1h.findings", 0), ("quality.1h.findings", 1),
                       ("quality.1h.findings", 0), ("quality.1h.findings", 0)]


def test_report_refuses_findings_off_the_grid_or_of_another_interval(tmp_path):
    report = QualityReport(str(tmp_path))
    with pytest.raises(ValueError, match="off the 1h grid"):
        report.record("1h", [_finding(START + 1)])
    with pytest.raises(ValueError, match="recorded in the 4h report"):
        report.record("4h", [_finding(START)])
    assert not report.path("1h").exists()


def test_a_rejected_archive_file_opens_on_the_grid():
    url = "https://data.binance.vision/data/spot/monthly/klines/BTCUSDT/1w/BTCUSDT-1w-2024-02.zip"
    february = int(datetime(2024, 2, 1, tzinfo=timezone.utc).timestamp() * 1000)  # a Thursday
    finding = file_rejected(SYMBOL, "1w", february, "checksum", "ab" * 32, "cd" * 32, url)
    assert finding.kind == ARCHIVE_FILE_REJECTED and finding.open_time == february + 4 * DAY_MS  # Monday 5th
    assert file_rejected(SYMBOL, "1h", february, "corrupt_zip", "", "", url).open_time == february


def test_check_range_records_findings_per_interval(raw, metrics):
    bar = START + 5 * HOUR_MS
    _replace(raw, "1h", bar, high=f"{Decimal(next(r for r in _series()['1h'] if r[0] == bar)[2]) + 1000:.8f}")
    settings = load_settings()
    counts = check_range(settings, settings.intervals, [SYMBOL], START, END, now=FUTURE)
    assert counts == {"30m": 0, "1h": 1, "4h": 1, "1d": 0, "1w": 0}
    report = QualityReport(str(raw))
    assert report.read("1h").column("field").to_pylist() == ["high"]
    assert report.read("30m").num_rows == 0 and not report.path("30m").exists()
    assert ("quality.1h.findings", 1) in metrics and ("quality.4h.findings", 1) in metrics
    check_range(settings, settings.intervals, [SYMBOL], START, END, now=FUTURE + 1)  # idempotent
    assert report.read("1h").num_rows == 1 and report.read("4h").num_rows == 1


# --- CLI ------------------------------------------------------------------------


def _json_line(capsys) -> dict:
    """The CLI's one JSON line (structlog's console renderer may write log lines to stdout too)."""
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    assert len(lines) == 1, lines
    return json.loads(lines[0])


def test_cli_prints_one_line_per_symbol_and_exits_by_findings(raw, capsys):
    assert quality.main(["1h", "2024-01-04", "2024-01-22"]) == 0
    line = _json_line(capsys)
    assert line["symbol"] == SYMBOL and line["findings"] == 0 and line["compared"] == 432
    assert line["source_interval"] == "30m" and line["start"] == "2024-01-04T00:00:00+00:00"
    bar = START + 5 * HOUR_MS
    _replace(raw, "1h", bar, high=f"{Decimal(next(r for r in _series()['1h'] if r[0] == bar)[2]) + 1:.8f}")
    assert quality.main(["1h", "2024-01-04", "2024-01-22", "--symbol", SYMBOL]) == 1
    line = _json_line(capsys)
    assert (line["findings"], line["new_findings"]) == (1, 1)
    assert quality.main(["1h", "2024-01-04", "2024-01-22"]) == 1  # still inconsistent, nothing new
    assert _json_line(capsys)["new_findings"] == 0


@pytest.mark.parametrize("argv, message", [
    (["2h", "2024-01-01", "2024-01-02"], "error: interval='2h' is not one of the configured intervals"),
    (["15m", "2024-01-01", "2024-01-02"], "error: interval='15m' has no source interval"),
    (["1h", "2024-13-01", "2024-01-02"], "error: start='2024-13-01' is not a valid time"),
    (["1h", "2024-01-02", "2024-01-02"], "error: start=2024-01-02T00:00:00+00:00 must be before end"),
    (["1h", "2024-01-01", "2024-01-02", "--symbol", "btc"], "error: symbol='btc'"),
    (["1h", "2024-01-01", "2024-01-02", "--symbol", "ETHUSDT"], "error: symbol='ETHUSDT' is not in BINANCE_SYMBOLS"),
])
def test_cli_bad_input_exits_2_with_one_line(raw, capsys, argv, message):
    with pytest.raises(SystemExit) as exit_info:
        quality.main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith(message) and err.count("\n") == 1


def test_cli_refuses_an_interval_whose_source_is_not_configured(raw, capsys, monkeypatch):
    monkeypatch.setenv("BINANCE_INTERVALS", "1h,4h")
    with pytest.raises(SystemExit) as exit_info:
        quality.main(["1h", "2024-01-01", "2024-01-02"])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err == "error: interval='1h': its source interval 30m is not in BINANCE_INTERVALS\n"
