"""Valid Binance kline rows for tests that need no server."""

from __future__ import annotations

from decimal import Decimal

from include.market_data.timeframes import interval_ms


def make_rows(interval: str, start_ms: int, count: int, *, price: str = "30000.00", skip: set[int] = frozenset(),
              places: int = 8) -> list[list]:
    """``count`` consecutive grid rows from ``start_ms`` (indexes in ``skip`` left out)."""
    step = interval_ms(interval)
    quantum = Decimal(1).scaleb(-places)
    base = Decimal(price)
    rows = []
    for i in range(count):
        if i in skip:
            continue
        tick = base / 1000
        open_ = base + tick * (i % 7 - 3)
        close = open_ + tick * ((i * 13) % 5 - 2)
        high = max(open_, close) + tick * Decimal("1.25")
        low = min(open_, close) - tick * Decimal("0.75")
        volume = Decimal(i % 11) + Decimal("0.12345678")
        quote = (volume * (open_ + close) / 2).quantize(quantum)
        taker = (volume / 2).quantize(quantum)
        fmt = lambda d: f"{d.quantize(quantum):f}"
        rows.append([start_ms + i * step, fmt(open_), fmt(high), fmt(low), fmt(close), fmt(volume),
                     start_ms + i * step + step - 1, fmt(quote), 10 + i, fmt(taker), fmt(quote / 2), "0"])
    return rows
