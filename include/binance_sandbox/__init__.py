"""A local Binance-spot-compatible REST server for offline demos, tests and benchmarks.

    from include.binance_sandbox import SandboxServer
    with SandboxServer(port=0, now_ms=...) as srv:
        requests.get(srv.url + "/api/v3/klines", params={"symbol": "BTCUSDT", "interval": "1h"})

Serves /api/v3/{ping,time,exchangeInfo,klines,ticker/price,ticker/24hr} with Binance's
shapes, errors, weights and headers, from deterministic synthetic 1-minute candles
(every interval aggregated from them) or from replayed archive/Parquet files; injects
faults on demand (``/sandbox/faults``). Imports nothing from the pipeline it stands in for.
"""

from .server import SandboxServer

__all__ = ["SandboxServer"]
