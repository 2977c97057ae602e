"""The fault matrix (issue 15) as tests: one row per fault, each through a fresh sandbox and fresh
data dirs (the engine is ``tests/reliability/matrix.py``; ``bench/fault_matrix.py`` prints the
same rows as a table).

Per row: lost = duplicated = invented = 0, self-caused 418s = 0, requests sent while told to wait
= 0, plus the row's own expected outcome. ``test_the_fault_happened`` checks apart, and never as
an expected failure, that each row's fault really happened.
"""

from __future__ import annotations

import pytest

from tests.reliability import matrix

pytestmark = pytest.mark.slow


@pytest.fixture(scope="session")
def fault_matrix():
    """Runs a row once per session (several tests look at the same row)."""
    done: dict[str, matrix.Row] = {}

    def row(row_id: str) -> matrix.Row:
        if row_id not in done:
            done[row_id] = matrix.ROW_IDS[row_id].run()
        return done[row_id]

    return row


@pytest.mark.parametrize("row_id", [spec.id for spec in matrix.ROWS])
def test_fault_matrix_row(fault_matrix, row_id):
    row = fault_matrix(row_id)
    print(row.describe())
    assert row.proof_failures() == [], row.describe()
    assert row.invariant_failures() == [], row.describe()
    assert row.check_failures() == [], row.describe()


@pytest.mark.parametrize("row_id", [spec.id for spec in matrix.ROWS])
def test_the_fault_happened(fault_matrix, row_id):
    row = fault_matrix(row_id)
    assert row.proof_failures() == [], row.describe()


def test_a_banned_cli_run_fails_with_one_line(fault_matrix):
    cli = fault_matrix("418-ban").details["cli_during_ban"]
    lines = cli.stderr.strip().splitlines()
    assert cli.returncode not in (0, None)
    assert "Traceback" not in cli.stderr and len(lines) == 1 and lines[0].startswith("error: "), cli.stderr


# -- the engine's own detectors: each can see what the invariants forbid -------------------------
def test_the_comparison_sees_lost_duplicated_invented_and_misplaced_candles(tmp_path):
    import pyarrow.parquet as pq

    from include.market_data.schema import rows_to_table

    sandbox = matrix.Sandbox()
    try:
        truth = sandbox.truth("1h", matrix.WINDOW_MS[0], matrix.WINDOW_MS[0] + 2 * 86_400_000)
    finally:
        sandbox.close()
    first_day, second_day = [list(r) for r in truth[:24]], [list(r) for r in truth[24:]]
    first_day[3][4] = first_day[3][4][:-1] + str((int(first_day[3][4][-1]) + 1) % 10)  # close off by 1e-8
    first_day[7][8] += 1  # one trade more
    del first_day[10]  # a candle missing
    first_day.append(list(first_day[0]))  # a copy of the first
    second_day.insert(0, list(truth[11]))  # the candle of 11:00 on day 1, also in day 2's file
    directory = tmp_path / "1h"
    directory.mkdir()
    for rows, day in ((first_day, "20240401"), (second_day, "20240402")):
        pq.write_table(rows_to_table(rows), directory / f"BTCUSDT_1h_{day}.parquet")
    (directory / ".BTCUSDT_1h_20240403.parquet.0123.tmp").write_bytes(b"half a file")
    (directory / "BTCUSDT_1h_20240404.parquet").write_bytes(b"not parquet")

    series = matrix.compare(tmp_path, "1h", truth, sandbox)
    assert (series.expected, series.stored) == (48, 49)
    assert series.lost == 3  # the missing one and the two altered ones
    assert series.duplicated == 2  # the copy of 00:00 and 11:00 stored twice
    assert series.invented == 2  # the altered close and the altered trade count
    assert series.misplaced == 1 and series.unreadable == ["BTCUSDT_1h_20240404.parquet"]
    assert series.temp_files == [".BTCUSDT_1h_20240403.parquet.0123.tmp"]
    assert matrix.compare(tmp_path, "1h", [], sandbox).invented == 49  # where nothing may be stored


def _request(arrived, port, status=200, retry_after=None, query="q", sent=None):
    return matrix.Request(arrived=arrived, sent=arrived if sent is None else sent, ip="127.0.0.1", port=port,
                          path="/api/v3/klines", query=query, status=status, retry_after=retry_after, body_json=True)


def test_the_wait_tally_counts_every_request_received_while_a_retry_after_runs():
    log = [
        _request(100.0, port=1, status=429, retry_after=1, query="a"),  # the notice, on connection 1
        _request(100.05, port=2, query="b"),  # first on another connection, just after: maybe in flight
        _request(100.3, port=2, query="b2"),  # the same connection again: the client knew
        _request(100.5, port=1, query="a"),  # the notice's own connection, before the second ran out
        _request(101.2, port=1, query="a"),  # after it: fine
        _request(200.0, port=3, status=418, retry_after=3, query="c"),  # a ban
        _request(201.0, port=4, status=418, retry_after=2, query="d"),  # answered during the ban
        _request(203.5, port=4, query="d"),  # after it
    ]
    tally = matrix.waits(log)
    assert (tally.notices, tally.sent_while_told, tally.in_flight, tally.new_bans) == (3, 4, 1, 1)
    assert matrix.waits([r for r in log if r.arrived in (100.0, 101.2)]).sent_while_told == 0


def test_retries_are_repeats_of_a_request_within_a_run():
    log = [_request(1.0, 1, query="a"), _request(1.1, 1, query="a"), _request(1.2, 2, query="b"),
           _request(5.0, 1, query="a"), _request(5.1, 2, query="a")]
    one_run_each = [matrix._Phase(0.5, 2.0), matrix._Phase(4.5, 6.0)]
    assert matrix.retries(log, one_run_each) == 2  # "a" twice in the first run, twice in the second
    assert matrix.retries(log, [matrix._Phase(0.5, 2.0), matrix._Phase(4.5, 6.0, runs=2)]) == 1
