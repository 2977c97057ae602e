"""The Binance spot market-data endpoints: parameter validation, weights and answers.

Knows nothing of HTTP: takes a path, query parameters and headers, returns a status and
a JSON-able payload, so the server module stays plumbing only.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from decimal import Decimal

from .intervals import INTERVALS, parse_timezone
from .symbols import exchange_symbol

MAX_LIMIT = 1000
DEFAULT_LIMIT = 500
_SYMBOL_RE = re.compile(r"^[A-Z0-9\-_.]{1,20}$")
_INT_RE = re.compile(r"^-?[0-9]{1,20}$")
_SYMBOLS_RANGE = r'^\[("[A-Z0-9-_.]{1,20}"(,"[A-Z0-9-_.]{1,20}"){0,}){0,1}\]$'


class ApiError(Exception):
    """A Binance error answer: HTTP status plus {"code", "msg"}."""

    def __init__(self, code: int, msg: str, status: int = 400):
        super().__init__(msg)
        self.status, self.payload = status, {"code": code, "msg": msg}


def mandatory(name: str) -> ApiError:
    return ApiError(-1102, f"Mandatory parameter '{name}' was not sent, was empty/null, or malformed.")


def not_valid(name: str) -> ApiError:
    return ApiError(-1130, f"Data sent for parameter '{name}' is not valid.")


def illegal(name: str, legal: str = "^[0-9]{1,20}$") -> ApiError:
    return ApiError(-1100, f"Illegal characters found in parameter '{name}'; legal range is '{legal}'.")


INVALID_SYMBOL = ApiError(-1121, "Invalid symbol.")
INVALID_INTERVAL = ApiError(-1120, "Invalid interval.")
COMBINATION = ApiError(-1128, "Combination of optional parameters invalid.")


@dataclass(frozen=True)
class Request:
    path: str
    params: dict[str, str]
    time_unit_us: bool  # X-MBX-TIME-UNIT: MICROSECOND


def parse_time_unit(header: str | None) -> bool:
    if header is None or header.strip().upper() in ("", "MILLISECOND"):
        return False
    if header.strip().upper() == "MICROSECOND":
        return True
    raise ApiError(-1100, f"Invalid X-MBX-TIME-UNIT '{header}'; use MILLISECOND or MICROSECOND.")


def _int_param(params, name) -> int | None:
    text = params.get(name)
    if text is None:
        return None
    if not _INT_RE.match(text):
        raise illegal(name)
    return int(text)


def _symbol_list(params) -> list[str] | None:
    """``symbols=["BTCUSDT","ETHUSDT"]`` as Binance takes it (JSON array, no spaces required)."""
    text = params.get("symbols")
    if text is None:
        return None
    try:
        names = json.loads(text)
    except ValueError:
        raise illegal("symbols", _SYMBOLS_RANGE) from None
    if not isinstance(names, list) or not all(isinstance(n, str) and _SYMBOL_RE.match(n) for n in names):
        raise illegal("symbols", _SYMBOLS_RANGE)
    if not names:
        raise not_valid("symbols")
    return names


class BinanceApi:
    """Answers /api/v3/* from a market; outages come from the fault injector."""

    def __init__(self, market, limiter, faults):
        self.market = market
        self.limiter = limiter
        self.faults = faults
        self.routes = {
            "/api/v3/ping": (lambda p: 1, self.ping),
            "/api/v3/time": (lambda p: 1, self.time),
            "/api/v3/exchangeInfo": (lambda p: 20, self.exchange_info),
            "/api/v3/klines": (lambda p: 2, self.klines),
            "/api/v3/ticker/price": (self._ticker_price_weight, self.ticker_price),
            "/api/v3/ticker/24hr": (self._ticker_24hr_weight, self.ticker_24hr),
        }

    # -- weights -------------------------------------------------------------------------

    @staticmethod
    def _count_symbols(params) -> int | None:
        if "symbol" in params:
            return 1
        if "symbols" in params:
            try:
                names = json.loads(params["symbols"])
                return len(names) if isinstance(names, list) else None
            except ValueError:
                return None
        return None

    def _ticker_price_weight(self, params) -> int:
        return 2 if "symbol" in params else 4

    def _ticker_24hr_weight(self, params) -> int:
        count = self._count_symbols(params)
        if count is None:
            return 80
        if count <= 20:
            return 2
        return 40 if count <= 100 else 80

    def weight(self, path: str, params: dict) -> int | None:
        route = self.routes.get(path)
        return route[0](params) if route else None

    def handle(self, request: Request):
        """(status, payload) for a known path; raises ApiError for Binance error answers."""
        return 200, self.routes[request.path][1](request)

    # -- helpers -------------------------------------------------------------------------

    def _time(self, ms: int, request: Request) -> int:
        return ms * 1000 if request.time_unit_us else ms

    def _known_symbol(self, name: str) -> str:
        if not _SYMBOL_RE.match(name):
            raise illegal("symbol", "^[A-Z0-9-_.]{1,20}$")
        if name not in self.market.symbols:
            raise INVALID_SYMBOL
        return name

    def _selected_symbols(self, params) -> tuple[list[str], bool]:
        """Symbols named by ``symbol`` or ``symbols`` (all when neither); True if one was named singly."""
        if "symbol" in params and "symbols" in params:
            raise COMBINATION
        if "symbol" in params:
            if not params["symbol"]:
                raise mandatory("symbol")
            return [self._known_symbol(params["symbol"])], True
        names = _symbol_list(params)
        if names is None:
            return list(self.market.symbols), False
        for name in names:
            self._known_symbol(name)
        return names, False

    # -- endpoints -----------------------------------------------------------------------

    def ping(self, request: Request):
        return {}

    def time(self, request: Request):
        return {"serverTime": self._time(self.market.now_ms(), request)}

    def exchange_info(self, request: Request):
        names, _ = self._selected_symbols(request.params)
        window_s = self.limiter.window_s
        if window_s % 60 == 0:
            unit, num = "MINUTE", int(window_s // 60)
        else:
            unit, num = "SECOND", max(1, int(round(window_s)))
        return {
            "timezone": "UTC",
            "serverTime": self._time(self.market.now_ms(), request),
            "rateLimits": [
                {"rateLimitType": "REQUEST_WEIGHT", "interval": unit, "intervalNum": num,
                 "limit": self.limiter.weight_limit},
                {"rateLimitType": "ORDERS", "interval": "SECOND", "intervalNum": 10, "limit": 100},
                {"rateLimitType": "ORDERS", "interval": "DAY", "intervalNum": 1, "limit": 200000},
                {"rateLimitType": "RAW_REQUESTS", "interval": "MINUTE", "intervalNum": 5, "limit": 61000},
            ],
            "exchangeFilters": [],
            "symbols": [exchange_symbol(self.market.profiles[name]) for name in names],
        }

    def klines(self, request: Request):
        params = request.params
        if not params.get("symbol"):
            raise mandatory("symbol")
        if not params.get("interval"):
            raise mandatory("interval")
        start = _int_param(params, "startTime")
        end = _int_param(params, "endTime")
        limit = _int_param(params, "limit")
        limit = DEFAULT_LIMIT if limit is None else limit
        if not 1 <= limit <= MAX_LIMIT:
            raise not_valid("limit")
        offset_ms = 0
        if params.get("timeZone"):
            try:
                offset_ms = parse_timezone(params["timeZone"])
            except ValueError:
                raise not_valid("timeZone") from None
        if params["interval"] not in INTERVALS:
            raise INVALID_INTERVAL
        symbol = self._known_symbol(params["symbol"])
        if request.time_unit_us:
            # open_us >= start_us  <=>  open_ms >= ceil(start_us / 1000); end: floor.
            start = None if start is None else -(-start // 1000)
            end = None if end is None else end // 1000
        if start is not None and end is not None and start > end:
            return []
        rows = self.market.klines(
            symbol, params["interval"], start, end, limit, offset_ms, outages=self.faults.outages
        )
        if request.time_unit_us:
            rows = [[r[0] * 1000, *r[1:6], r[6] * 1000 + 999, *r[7:]] for r in rows]
        return rows

    def ticker_price(self, request: Request):
        names, single = self._selected_symbols(request.params)
        answers = []
        for name in names:
            row = self.market.last_row(name, outages=self.faults.outages)
            answers.append({"symbol": name, "price": row[4] if row else "0.00000000"})
        return answers[0] if single else answers

    def ticker_24hr(self, request: Request):
        kind = request.params.get("type", "FULL")
        if kind not in ("FULL", "MINI"):
            raise not_valid("type")
        names, single = self._selected_symbols(request.params)
        answers = [self._rolling_ticker(name, kind, request) for name in names]
        return answers[0] if single else answers

    def _rolling_ticker(self, symbol: str, kind: str, request: Request) -> dict:
        figures = self.market.rolling_24h(symbol, outages=self.faults.outages)
        now = self.market.now_ms()
        zero = "0.00000000"
        if figures is None:
            figures = {"open": zero, "high": zero, "low": zero, "last": zero, "prev_close": zero,
                       "volume": zero, "quote_volume": zero, "count": 0, "open_time": now - 86_400_000,
                       "close_time": now, "bid": zero, "ask": zero}
        open_price, last = Decimal(figures["open"]), Decimal(figures["last"])
        volume, quote = Decimal(figures["volume"]), Decimal(figures["quote_volume"])
        count = figures["count"]
        last_id = figures["close_time"] // 1000 if count else -1
        first_id = last_id - count + 1 if count else -1
        mini = {
            "symbol": symbol,
            "openPrice": figures["open"],
            "highPrice": figures["high"],
            "lowPrice": figures["low"],
            "lastPrice": figures["last"],
            "volume": figures["volume"],
            "quoteVolume": figures["quote_volume"],
            "openTime": self._time(figures["open_time"], request),
            "closeTime": self._time(figures["close_time"], request),
            "firstId": first_id,
            "lastId": last_id,
            "count": count,
        }
        if kind == "MINI":
            return mini
        change = last - open_price
        percent = (change / open_price * 100) if open_price else Decimal(0)
        weighted = (quote / volume) if volume else Decimal(0)
        return {
            "symbol": symbol,
            "priceChange": f"{change:.8f}",
            "priceChangePercent": f"{percent:.3f}",
            "weightedAvgPrice": f"{weighted:.8f}",
            "prevClosePrice": figures["prev_close"],
            "lastPrice": figures["last"],
            "lastQty": "0.00100000" if count else zero,
            "bidPrice": figures["bid"],
            "bidQty": "1.00000000",
            "askPrice": figures["ask"],
            "askQty": "1.00000000",
            "openPrice": figures["open"],
            "highPrice": figures["high"],
            "lowPrice": figures["low"],
            "volume": figures["volume"],
            "quoteVolume": figures["quote_volume"],
            "openTime": mini["openTime"],
            "closeTime": mini["closeTime"],
            "firstId": first_id,
            "lastId": last_id,
            "count": count,
        }
