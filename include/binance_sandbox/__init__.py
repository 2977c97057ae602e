"""A local Binance-spot-compatible REST server for offline demos, tests and benchmarks.

    from include.binance_sandbox import SandboxServer
    with SandboxServer(port=0, now_ms=...) as srv:
        requests.get(srv.url + "/api/v3/klines", params={"symbol": "BTCUSDT", "interval": "1h"})

Serves /api/v3/{ping,time,exchangeInfo,klines,ticker/price,ticker/24hr} with Binance's
shapes, errors, weights and headers, from deterministic synthetic 1-minute candles
(every interval aggregated from them) or from replayed archive/Parquet files; injects
faults on demand (``/sandbox/faults``). Imports nothing from the pipeline it stands in for.

It also serves the public data archive's layout (``archive.py``) from the same market:
/data/spot/{monthly,daily}/klines/<S>/<iv>/<S>-<iv>-<YYYY-MM[-DD]>.zip and .zip.CHECKSUM,
published once the period is over, µs times from 2025-01-01, no REST weight, with archive
faults (missing, wrong checksum, corrupt zip, header rows, month not yet published).
"""

from .server import SandboxServer

__all__ = ["SandboxServer"]
