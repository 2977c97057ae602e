from datetime import date, datetime, timedelta, timezone

import pytest

from include.market_data.timeframes import (
    DAY_MS, HOUR_MS, ceil_to_grid, closed_end, floor_to_grid, grid, interval_ms,
    to_ms, to_utc,
)

MONDAY = to_ms("2024-01-01")  # a Monday


def test_weeks_open_on_monday_and_days_at_midnight():
    wednesday_noon = MONDAY + 2 * DAY_MS + 12 * HOUR_MS
    assert floor_to_grid(wednesday_noon, "1w") == MONDAY
    assert floor_to_grid(wednesday_noon, "1d") == MONDAY + 2 * DAY_MS
    assert floor_to_grid(wednesday_noon + 1, "4h") == wednesday_noon
    assert ceil_to_grid(wednesday_noon, "1w") == MONDAY + 7 * DAY_MS
    assert ceil_to_grid(MONDAY, "1w") == MONDAY


def test_grid_is_half_open():
    slots = grid(MONDAY, MONDAY + HOUR_MS, "15m")
    assert list(slots) == [MONDAY + i * 15 * 60_000 for i in range(4)]
    assert list(grid(MONDAY + 1, MONDAY + HOUR_MS + 1, "1h")) == [MONDAY + HOUR_MS]


def test_closed_candles():
    now = MONDAY + 10 * HOUR_MS + 5 * 60_000
    assert closed_end(now, "1h") == MONDAY + 10 * HOUR_MS
    assert closed_end(MONDAY + 10 * HOUR_MS, "1h") == MONDAY + 10 * HOUR_MS  # the 09:00 candle closed at 09:59:59.999


def test_user_times_are_utc():
    assert to_utc("2024-01-31") == datetime(2024, 1, 31, tzinfo=timezone.utc)
    assert to_utc(date(2024, 1, 31)) == datetime(2024, 1, 31, tzinfo=timezone.utc)
    assert to_utc(datetime(2024, 1, 31, 10)) == datetime(2024, 1, 31, 10, tzinfo=timezone.utc)  # naive is UTC
    assert to_utc("2024-01-31T12:00+02:00") == datetime(2024, 1, 31, 10, tzinfo=timezone.utc)
    assert to_utc("2024-01-31T10:00Z") == datetime(2024, 1, 31, 10, tzinfo=timezone.utc)
    tz = timezone(timedelta(hours=-5))
    assert to_ms(datetime(2024, 1, 31, 5, tzinfo=tz)) == to_ms("2024-01-31T10:00Z")


@pytest.mark.parametrize("bad", ["yesterday", "2024-02-30", "", True])
def test_bad_times_are_rejected(bad):
    with pytest.raises(ValueError):
        to_utc(bad)


def test_unknown_interval():
    with pytest.raises(ValueError, match="2m"):
        interval_ms("2m")


def test_to_ms_reads_pendulum_datetimes_as_airflow_passes_them():
    import pendulum

    moment = pendulum.datetime(2024, 3, 1, 0, 15, 0, 123000, tz="Europe/Paris")
    assert to_ms(moment) == to_ms("2024-02-29T23:15:00.123Z")
