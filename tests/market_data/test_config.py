import pytest

from include.market_data.config import ConfigError, load_settings


def test_defaults_match_the_design():
    s = load_settings({})
    assert s.symbols == ("BTCUSDT",)
    assert s.intervals == ("15m", "30m", "1h", "4h", "1d", "1w")
    assert (s.rate_limit_weight, s.rate_limit_window_s, s.rate_limit_safety) == (6000, 60.0, 0.8)
    assert s.rate_limit_budget == 4800
    assert (s.max_concurrency, s.pool, s.pool_slots) == (4, "binance_api", 4)
    assert (s.raw_data_dir, s.curated_data_dir, s.signal_data_dir) == ("data/raw", "data/curated", "data/signals")
    assert s.ingest_start.isoformat() == "2017-08-17" and s.gap_check_lookback_days == 3
    assert (s.recommendation_hour, s.recommendation_minute) == (12, 0)
    assert s.slow_intervals_schedule == "close" and s.log_level == "INFO"
    assert s.quarantine_retention_days == 30


def test_values_are_read_from_the_environment():
    s = load_settings({"BINANCE_SYMBOLS": "BTCUSDT, ETHUSDT", "BINANCE_INTERVALS": "1h,1d",
                       "RECOMMENDATION_UPDATE_TIME": "08:30", "LOG_LEVEL": "warning"})
    assert s.symbols == ("BTCUSDT", "ETHUSDT") and s.intervals == ("1h", "1d")
    assert (s.recommendation_hour, s.recommendation_minute) == (8, 30) and s.log_level == "WARNING"


@pytest.mark.parametrize("name, value", [
    ("BINANCE_SYMBOLS", "btcusdt"), ("BINANCE_SYMBOLS", "../../etc"), ("BINANCE_SYMBOLS", "BTCUSDT,BTCUSDT"),
    ("BINANCE_INTERVALS", "15m,2m"), ("BINANCE_RATE_LIMIT_WINDOW_S", "0"), ("BINANCE_RATE_LIMIT_WEIGHT", "x"),
    ("BINANCE_RATE_LIMIT_SAFETY", "1.5"), ("BINANCE_MAX_CONCURRENCY", "0"), ("INGEST_START", "2017-13-01"),
    ("RECOMMENDATION_UPDATE_TIME", "25:00"), ("RECOMMENDATION_UPDATE_TIME", "noon"), ("LOG_LEVEL", "LOUD"),
    ("SLOW_INTERVALS_SCHEDULE", "hourly"), ("GAP_CHECK_LOOKBACK_DAYS", "-1"),
    ("BINANCE_RATE_LIMIT_WEIGHT", "20"),  # x 0.8 = 16: below exchangeInfo's weight of 20
    ("QUARANTINE_RETENTION_DAYS", "-1"), ("QUARANTINE_RETENTION_DAYS", "a week"),
    ("QUARANTINE_RETENTION_DAYS", "1.5"),
])
def test_a_bad_value_names_its_variable(name, value):
    with pytest.raises(ConfigError, match=name):
        load_settings({name: value})


@pytest.mark.parametrize("value, days", [("7", 7), ("0", 0), (" 365 ", 365), ("", 30)])
def test_quarantine_retention_days_is_read_from_the_environment(value, days):
    assert load_settings({"QUARANTINE_RETENTION_DAYS": value}).quarantine_retention_days == days
