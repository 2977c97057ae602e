"""Where candles come from: the :class:`KlineSource` seam and its Binance REST implementation.

A source pages closed candles of ``[start_ms, end_ms)`` as :class:`KlineBatch` es, each with the
provenance of the response it came from.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Protocol

from include.market_data import observability
from include.market_data.config import BINANCE_CONN_ID, Settings


@dataclass(frozen=True)
class KlineBatch:
    """Closed candles of one response, with its provenance."""

    rows: list[list]
    source: str
    endpoint: str
    fetched_at: str
    latency_ms: float
    sha256: str | None = None  # of the archive file the rows came from (checked before use)


class KlineSource(Protocol):
    """The seam for candle sources: Binance REST (here) and the public data archive
    (:mod:`include.market_data.archive`)."""

    def batches(self, symbol: str, interval: str, start_ms: int, end_ms: int) -> Iterator[KlineBatch]:
        """Closed candles with ``open_time`` in ``[start_ms, end_ms)``, in time order."""

    def first_open_ms(self, symbol: str, interval: str) -> int | None:
        """Open time of the symbol's first candle (``None``: no candle yet)."""

    def symbol_status(self, symbol: str) -> str | None:
        """The exchange's trading status of ``symbol`` (``TRADING``, ``BREAK``, ...)."""


class BinanceRestSource:
    """Candles from Binance's REST API through :class:`BinanceHook`."""

    def __init__(self, settings: Settings, conn_id: str = BINANCE_CONN_ID, hook=None):
        if hook is None:
            from binance_provider.clients import rest_client  # the hook, or the plain client outside Airflow

            hook = rest_client(conn_id, settings.hook_settings())
        self.hook = hook
        self.settings = settings

    def batches(self, symbol: str, interval: str, start_ms: int, end_ms: int) -> Iterator[KlineBatch]:
        for page in self.hook.iter_klines(symbol, interval, start_ms, end_ms,
                                          concurrency=self.settings.max_concurrency):
            meta = page.meta
            if getattr(page, "rejected", None):
                # Rows breaking the row contract (the hook logged each): their slots stay holes,
                # re-checked by the gap check like any other.
                observability.incr(f"ingest.{interval}.rows_rejected", len(page.rejected))
            yield KlineBatch(page.rows, meta.source, meta.endpoint, meta.fetched_at, meta.latency_ms)

    def first_open_ms(self, symbol: str, interval: str) -> int | None:
        return self.hook.first_open_ms(symbol, interval)

    def symbol_status(self, symbol: str) -> str | None:
        body, _ = self.hook.exchange_info(symbol)
        entry = next((s for s in body.get("symbols", []) if s.get("symbol") == symbol), None)
        return None if entry is None else entry.get("status")
