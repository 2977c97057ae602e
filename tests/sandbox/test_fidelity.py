"""Real Binance clients, unmodified but for their base URL, read the sandbox correctly."""

from __future__ import annotations

import ccxt
import pytest
from binance.client import Client

from include.binance_sandbox import SandboxServer

NOW_MS = 1_780_000_030_000
HOUR, DAY = 3_600_000, 86_400_000


@pytest.fixture(scope="module")
def server():
    with SandboxServer(now_ms=NOW_MS) as srv:
        yield srv


@pytest.fixture
def fresh(server):
    server.reset_limits()
    return server


def test_python_binance(fresh):
    client = Client(ping=False)
    client.API_URL = fresh.url + "/api"  # python-binance's base URL attribute
    assert client.ping() == {}
    assert client.get_server_time() == {"serverTime": NOW_MS}

    newest = client.get_klines(symbol="BTCUSDT", interval=Client.KLINE_INTERVAL_1HOUR, limit=5)
    closed = fresh.truth("BTCUSDT", "1h", newest[0][0], newest[-1][0])
    assert newest[:-1] == closed  # the last one is the open candle, not in the truth
    assert newest[-1][6] > NOW_MS

    start = 1_700_000_000_000 - 1_700_000_000_000 % DAY
    history = client.get_historical_klines("ETHUSDT", Client.KLINE_INTERVAL_4HOUR, start, start + 5 * DAY - 1)
    assert history == fresh.truth("ETHUSDT", "4h", start, start + 5 * DAY)
    assert len(history) == 30

    price = client.get_symbol_ticker(symbol="BTCUSDT")
    open_minute = client.get_klines(symbol="BTCUSDT", interval=Client.KLINE_INTERVAL_1MINUTE, limit=1)[-1]
    assert price == {"symbol": "BTCUSDT", "price": open_minute[4]}
    last_closed = fresh.truth("BTCUSDT", "1m", NOW_MS - 2 * 60_000, NOW_MS)[-1]
    assert last_closed[0] == open_minute[0] - 60_000 and open_minute[1] == last_closed[4]
    ticker = client.get_ticker(symbol="BTCUSDT")
    assert ticker["lastPrice"] == price["price"]
    assert ticker["closeTime"] == NOW_MS


def test_ccxt(fresh):
    exchange = ccxt.binance({
        "urls": {"api": {"public": fresh.url + "/api/v3"}},
        "options": {"fetchMarkets": {"types": ["spot"]}},
    })
    markets = exchange.load_markets()
    assert {"BTC/USDT", "ETH/USDT"} <= set(markets)
    btc = markets["BTC/USDT"]
    assert btc["spot"] and btc["active"]
    assert btc["precision"]["price"] == 0.01 and btc["limits"]["amount"]["min"] == 0.00001

    since = 1_650_000_000_000 - 1_650_000_000_000 % HOUR
    ohlcv = exchange.fetch_ohlcv("BTC/USDT", "1h", since=since, limit=48)
    truth = fresh.truth("BTCUSDT", "1h", since, since + 48 * HOUR)
    assert len(ohlcv) == 48
    assert ohlcv == [[r[0], float(r[1]), float(r[2]), float(r[3]), float(r[4]), float(r[5])] for r in truth]

    ticker = exchange.fetch_ticker("ETH/USDT")
    assert ticker["symbol"] == "ETH/USDT"
    assert ticker["timestamp"] == NOW_MS
    assert ticker["close"] == float(exchange.fetch_ohlcv("ETH/USDT", "1m", limit=1)[-1][4])
