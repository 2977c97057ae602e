"""Replay of recorded klines: archive CSV/zip (ms and µs) and raw-layout Parquet."""

from __future__ import annotations

import zipfile
from datetime import datetime, timezone
from decimal import Decimal

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import requests

from include.binance_sandbox import SandboxServer
from include.binance_sandbox.replay import ReplayError

HOUR = 3_600_000
JAN_2024 = 1_704_067_200_000  # 2024-01-01 00:00 UTC
JAN_2025 = 1_735_689_600_000  # 2025-01-01 00:00 UTC


def recorded_row(open_ms: int, length_ms: int, price: int) -> list:
    return [
        open_ms, f"{price}.10000000", f"{price + 5}.00000000", f"{price - 5}.25000000", f"{price + 1}.00000000",
        "12.34567000", open_ms + length_ms - 1, f"{price * 12}.98765432", 321, "6.00001000", f"{price * 6}.5", "0",
    ]


def csv_text(rows: list, micro: bool = False, header: bool = False) -> str:
    lines = ["open_time,open,high,low,close,volume,close_time,quote_volume,count,"
             "taker_buy_volume,taker_buy_quote_volume,ignore"] if header else []
    for row in rows:
        values = list(row)
        if micro:
            values[0], values[6] = values[0] * 1000, values[6] * 1000 + 999
        lines.append(",".join(str(v) for v in values))
    return "\n".join(lines) + "\n"


@pytest.fixture
def archive_dir(tmp_path):
    # BTCUSDT 1h for 2024-01 in a monthly zip (ms, header line), hours 5 and 6 missing.
    hourly = [recorded_row(JAN_2024 + h * HOUR, HOUR, 42_000 + h) for h in range(12) if h not in (5, 6)]
    with zipfile.ZipFile(tmp_path / "BTCUSDT-1h-2024-01.zip", "w") as archive:
        archive.writestr("BTCUSDT-1h-2024-01.csv", csv_text(hourly, header=True))
    # A 2025 daily file in µs, plain CSV.
    micro = [recorded_row(JAN_2025 + h * HOUR, HOUR, 93_000 + h) for h in range(3)]
    (tmp_path / "BTCUSDT-1h-2025-01-01.csv").write_text(csv_text(micro, micro=True))
    # Monthly candles under the archive's "1mo" name.
    (tmp_path / "ETHUSDT-1mo-2024-01.csv").write_text(csv_text([recorded_row(JAN_2024, 31 * 24 * HOUR, 2_300)]))
    return tmp_path, hourly, micro


def test_archive_replay_served_exactly_with_holes(archive_dir):
    path, hourly, micro = archive_dir
    with SandboxServer(replay=path) as srv:
        get = requests.Session().get
        served = get(srv.url + "/api/v3/klines",
                     params={"symbol": "BTCUSDT", "interval": "1h", "startTime": JAN_2024, "limit": 1000}).json()
        assert served == hourly + micro  # µs converted to ms, hole kept
        assert get(srv.url + "/api/v3/klines",
                   params={"symbol": "BTCUSDT", "interval": "1h", "endTime": JAN_2024 + 6 * HOUR, "limit": 2}
                   ).json() == hourly[3:5]
        assert get(srv.url + "/api/v3/klines", params={"symbol": "BTCUSDT", "interval": "4h"}).json() == []
        monthly = get(srv.url + "/api/v3/klines", params={"symbol": "ETHUSDT", "interval": "1M"}).json()
        assert monthly[0][0] == JAN_2024 and monthly[0][4] == "2301.00000000"
        symbols = [s["symbol"] for s in get(srv.url + "/api/v3/exchangeInfo").json()["symbols"]]
        assert symbols == ["BTCUSDT", "ETHUSDT"]
        bad = get(srv.url + "/api/v3/klines", params={"symbol": "SOLUSDT", "interval": "1h"})
        assert bad.json() == {"code": -1121, "msg": "Invalid symbol."}
        price = get(srv.url + "/api/v3/ticker/price", params={"symbol": "BTCUSDT"}).json()
        assert price == {"symbol": "BTCUSDT", "price": micro[-1][4]}
        ticker = get(srv.url + "/api/v3/ticker/24hr", params={"symbol": "BTCUSDT"}).json()
        assert ticker["lastPrice"] == micro[-1][4] and ticker["count"] == 3 * 321
        # The newest recorded candle counts as closed.
        assert srv.truth("BTCUSDT", "1h", JAN_2024, JAN_2025 + 3 * HOUR) == hourly + micro
        srv.set_faults({"outages": [{"start": JAN_2024, "end": JAN_2024 + 2 * HOUR}]})
        assert srv.truth("BTCUSDT", "1h", JAN_2024, JAN_2024 + 12 * HOUR) == hourly[2:]


def test_single_file_replay(archive_dir):
    path, hourly, _ = archive_dir
    with SandboxServer(replay=path / "BTCUSDT-1h-2024-01.zip") as srv:
        assert srv.market.symbols == ("BTCUSDT",)
        assert srv.truth("BTCUSDT", "1h", 0, JAN_2025) == hourly


def write_raw_day(root, symbol, interval, length_ms, rows):
    day = pa.array([r[0] for r in rows], pa.timestamp("ms", tz="UTC"))
    decimal = pa.decimal128(38, 18)

    def column(index):
        return pa.array([Decimal(r[index]) for r in rows], decimal)

    table = pa.table({
        "open_time": day,
        "open": column(1), "high": column(2), "low": column(3), "close": column(4), "volume": column(5),
        "close_time": pa.array([r[6] for r in rows], pa.timestamp("ms", tz="UTC")),
        "quote_asset_volume": column(7),
        "number_of_trades": pa.array([r[8] for r in rows], pa.int64()),
        "taker_buy_base_asset_volume": column(9),
        "taker_buy_quote_asset_volume": column(10),
    })
    stamp = datetime.fromtimestamp(rows[0][0] / 1000, timezone.utc).strftime("%Y%m%d")
    folder = root / interval
    folder.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, folder / f"{symbol}_{interval}_{stamp}.parquet")


def test_parquet_raw_layout_replay(tmp_path):
    quarter = 15 * 60_000
    day_one = [recorded_row(JAN_2024 + i * quarter, quarter, 42_000 + i) for i in range(96) if i != 40]
    day_two = [recorded_row(JAN_2024 + 86_400_000 + i * quarter, quarter, 43_000 + i) for i in range(10)]
    for row in day_one + day_two:
        row[10] = f"{Decimal(row[10]):.8f}"  # the raw layout keeps values, Binance prints 8 decimals
    write_raw_day(tmp_path, "BTCUSDT", "15m", quarter, day_one)
    write_raw_day(tmp_path, "BTCUSDT", "15m", quarter, day_two)
    with SandboxServer(replay=tmp_path) as srv:
        served = requests.get(srv.url + "/api/v3/klines",
                              params={"symbol": "BTCUSDT", "interval": "15m", "startTime": 0, "limit": 1000}).json()
        assert served == day_one + day_two
        assert len(served) == 95 + 10
        assert requests.get(srv.url + "/api/v3/klines",
                            params={"symbol": "BTCUSDT", "interval": "1h"}).json() == []


def test_replay_errors_name_the_input(tmp_path):
    with pytest.raises(ReplayError, match="does not exist"):
        SandboxServer(replay=tmp_path / "missing")
    with pytest.raises(ReplayError, match="no klines"):
        SandboxServer(replay=tmp_path)
    odd = tmp_path / "BTCUSDT-7x-2024-01.csv"
    odd.write_text("1,2\n")
    with pytest.raises(ReplayError, match="7x"):
        SandboxServer(replay=odd)
