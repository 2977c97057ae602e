"""The README's DuckDB queries run as written on a small dataset in the project's layout."""

import re
from decimal import Decimal
from pathlib import Path

import duckdb
import pytest

from include.market_data.config import load_settings
from include.market_data.curation import DataCuration
from include.market_data.ingestion import DataIngestion
from include.market_data.schema import rows_to_table
from include.market_data.signal import DataSignal
from include.market_data.storage import RawStore
from include.market_data.timeframes import to_ms

README = Path(__file__).resolve().parents[2] / "README.md"


def readme_queries() -> list[str]:
    section = README.read_text().split("### Querying the data", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```sql\n(.*?)```", section, flags=re.S)


@pytest.fixture
def dataset(data_env, sandbox, monkeypatch):
    """Two symbols of 1h candles (raw and curated) from 2024-02-28 to 2024-03-03, and two signals;
    one ETHUSDT day file is of schema version 1 (no symbol/interval columns)."""
    monkeypatch.setenv("BINANCE_SYMBOLS", "BTCUSDT,ETHUSDT")
    for symbol in ("BTCUSDT", "ETHUSDT"):
        DataIngestion().ingest("1h", "2024-02-28", "2024-03-03", symbol)
        DataCuration().curate_timeframe("1h", symbol)
    for day in ("2024-03-01", "2024-03-02"):
        DataSignal().generate(day)
    store = RawStore(load_settings().raw_data_dir)
    v1 = store.read_day("1h", "ETHUSDT", to_ms("2024-03-02"))
    store.io.write_atomic(store.path("1h", "ETHUSDT", to_ms("2024-03-02")), v1, {"schema_version": "1"})
    return data_env


def run(query: str, root: Path):
    return duckdb.sql(query.replace("'data/", f"'{root}/")).fetchall()


def test_the_readme_has_three_queries():
    assert len(readme_queries()) == 3


def test_all_1h_candles_of_a_month_across_symbols(dataset, sandbox):
    rows = run(readme_queries()[0], dataset)
    march = {s: sandbox.truth(s, "1h", to_ms("2024-03-01"), to_ms("2024-03-03")) for s in ("BTCUSDT", "ETHUSDT")}
    assert len(rows) == 2 * 48
    by_symbol = {}
    for symbol, open_time, *_ in rows:
        by_symbol.setdefault(symbol, []).append(open_time)
    assert len(by_symbol["BTCUSDT"]) == 48
    assert len(by_symbol["ETHUSDT"]) == 24 and len(by_symbol[None]) == 24  # the version-1 day has no symbol column
    first = next(r for r in rows if r[0] == "BTCUSDT")
    assert first[2] == Decimal(march["BTCUSDT"][0][1])  # an exact decimal, as Binance sent it


def test_the_daily_vwap_from_curated(dataset):
    rows = run(readme_queries()[1], dataset)
    days = sorted({str(day) for _, day, _ in rows})
    assert days == ["2024-02-28", "2024-02-29", "2024-03-01", "2024-03-02"]  # UTC days, whatever the local zone
    curated = DataCuration().curated.read("1h", to_ms("2024-03-01"), to_ms("2024-03-02"), symbol="BTCUSDT")
    expected = curated.column("vwap")[-1].as_py()  # the 23:00 candle's session VWAP
    (vwap,) = [v for s, d, v in rows if s == "BTCUSDT" and str(d) == "2024-03-01"]
    assert vwap == pytest.approx(expected, rel=1e-12)


def test_the_last_30_signals(dataset):
    rows = run(readme_queries()[2], dataset)
    assert [(str(r[0]), r[1]) for r in rows] == [("2024-03-02", "BTCUSDT"), ("2024-03-01", "BTCUSDT")]
    assert {r[2] for r in rows} <= {"ok", "stale_data"}


def test_a_version_1_raw_file_still_reads_and_is_rewritten_as_version_2(data_env):
    import pyarrow.parquet as pq

    store = RawStore(load_settings().raw_data_dir)
    hour, day = 3_600_000, to_ms("2024-03-01")
    rows = [[day + i * hour, "1", "2", "0.5", "1.5", "3", day + (i + 1) * hour - 1, "4", 1, "1", "1", "0"]
            for i in range(3)]
    path = store.path("1h", "BTCUSDT", day)
    store.io.write_atomic(path, rows_to_table(rows[:2]), {"schema_version": "1"})  # the old layout
    assert store.read("1h", "BTCUSDT", day, day + 86_400_000).num_rows == 2
    store.write("1h", "BTCUSDT", rows_to_table(rows[2:]), {"source": "test"}, now=day + 10 * hour)
    table = pq.read_table(path)
    assert table.schema.metadata[b"schema_version"] == b"2" and table.num_rows == 3
    assert set(table.column("symbol").to_pylist()) == {"BTCUSDT"} and set(table.column("interval").to_pylist()) == {"1h"}
    assert str(table.schema.field("symbol").type).startswith("dictionary")
