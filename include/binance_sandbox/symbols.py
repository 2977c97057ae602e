"""What the sandbox knows about a trading pair: assets, precisions, filters, and the
shape of its synthetic market (start price, growth, volume level)."""

from __future__ import annotations

import zlib
from dataclasses import dataclass

# Longest first, so "FDUSD" wins over "USD"-like suffixes.
QUOTE_ASSETS = ("FDUSD", "USDT", "USDC", "BUSD", "TUSD", "EUR", "TRY", "BRL", "BTC", "ETH", "BNB")


@dataclass(frozen=True)
class SymbolProfile:
    symbol: str
    base_asset: str
    quote_asset: str
    tick_size: str  # PRICE_FILTER tickSize, 8 decimals as Binance prints it
    step_size: str  # LOT_SIZE stepSize
    price_cents_start: int  # first synthetic price, in 0.01 quote units
    price_growth: float  # trend multiple reached after TREND_DAYS
    daily_volume_start: float  # base units per day at the start
    daily_volume_end: float  # base units per day once the market has grown
    volume_step_units: int  # smallest volume increment, in 1e-8 base units
    trade_size_units: int  # typical trade size, in 1e-8 base units

    @property
    def stable_id(self) -> int:
        """A seed component for this symbol that does not depend on PYTHONHASHSEED."""
        return zlib.crc32(self.symbol.encode())


KNOWN_PROFILES = {
    "BTCUSDT": SymbolProfile(
        "BTCUSDT", "BTC", "USDT", "0.01000000", "0.00001000",
        price_cents_start=426_148, price_growth=14.0,
        daily_volume_start=400.0, daily_volume_end=35_000.0,
        volume_step_units=1_000, trade_size_units=2_000_000,
    ),
    "ETHUSDT": SymbolProfile(
        "ETHUSDT", "ETH", "USDT", "0.01000000", "0.00010000",
        price_cents_start=30_113, price_growth=9.0,
        daily_volume_start=3_000.0, daily_volume_end=400_000.0,
        volume_step_units=10_000, trade_size_units=50_000_000,
    ),
}


def split_symbol(symbol: str) -> tuple[str, str]:
    for quote in QUOTE_ASSETS:
        if symbol.endswith(quote) and len(symbol) > len(quote):
            return symbol[: -len(quote)], quote
    return symbol[:-3], symbol[-3:]


def profile_for(symbol: str) -> SymbolProfile:
    """The known profile, or a generic one whose start price is derived from the name."""
    if symbol in KNOWN_PROFILES:
        return KNOWN_PROFILES[symbol]
    base, quote = split_symbol(symbol)
    start_cents = 100 + zlib.crc32(symbol.encode()) % 20_000  # 1.00 .. 200.99
    return SymbolProfile(
        symbol, base, quote, "0.01000000", "0.00100000",
        price_cents_start=start_cents, price_growth=5.0,
        daily_volume_start=50_000.0, daily_volume_end=2_000_000.0,
        volume_step_units=100_000, trade_size_units=2_000_000_000,
    )


def exchange_symbol(profile: SymbolProfile) -> dict:
    """One entry of exchangeInfo's ``symbols``, shaped like Binance's spot answer."""
    return {
        "symbol": profile.symbol,
        "status": "TRADING",
        "baseAsset": profile.base_asset,
        "baseAssetPrecision": 8,
        "quoteAsset": profile.quote_asset,
        "quotePrecision": 8,
        "quoteAssetPrecision": 8,
        "baseCommissionPrecision": 8,
        "quoteCommissionPrecision": 8,
        "orderTypes": [
            "LIMIT", "LIMIT_MAKER", "MARKET", "STOP_LOSS", "STOP_LOSS_LIMIT",
            "TAKE_PROFIT", "TAKE_PROFIT_LIMIT",
        ],
        "icebergAllowed": True,
        "ocoAllowed": True,
        "otoAllowed": True,
        "quoteOrderQtyMarketAllowed": True,
        "allowTrailingStop": True,
        "cancelReplaceAllowed": True,
        "amendAllowed": True,
        "pegInstructionsAllowed": True,
        "isSpotTradingAllowed": True,
        "isMarginTradingAllowed": True,
        "filters": [
            {"filterType": "PRICE_FILTER", "minPrice": profile.tick_size,
             "maxPrice": "1000000.00000000", "tickSize": profile.tick_size},
            {"filterType": "LOT_SIZE", "minQty": profile.step_size,
             "maxQty": "9000.00000000", "stepSize": profile.step_size},
            {"filterType": "ICEBERG_PARTS", "limit": 10},
            {"filterType": "MARKET_LOT_SIZE", "minQty": "0.00000000",
             "maxQty": "100.00000000", "stepSize": "0.00000000"},
            {"filterType": "TRAILING_DELTA", "minTrailingAboveDelta": 10,
             "maxTrailingAboveDelta": 2000, "minTrailingBelowDelta": 10,
             "maxTrailingBelowDelta": 2000},
            {"filterType": "PERCENT_PRICE_BY_SIDE", "bidMultiplierUp": "5",
             "bidMultiplierDown": "0.2", "askMultiplierUp": "5",
             "askMultiplierDown": "0.2", "avgPriceMins": 5},
            {"filterType": "NOTIONAL", "minNotional": "5.00000000", "applyMinToMarket": True,
             "maxNotional": "9000000.00000000", "applyMaxToMarket": False, "avgPriceMins": 5},
            {"filterType": "MAX_NUM_ORDERS", "maxNumOrders": 200},
            {"filterType": "MAX_NUM_ALGO_ORDERS", "maxNumAlgoOrders": 5},
        ],
        "permissions": [],
        "permissionSets": [["SPOT", "MARGIN"]],
        "defaultSelfTradePreventionMode": "EXPIRE_MAKER",
        "allowedSelfTradePreventionModes": [
            "NONE", "EXPIRE_TAKER", "EXPIRE_MAKER", "EXPIRE_BOTH", "DECREMENT",
        ],
    }
