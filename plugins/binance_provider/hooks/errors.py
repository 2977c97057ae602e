"""Exceptions the Binance hook raises to its callers."""

from __future__ import annotations

from datetime import datetime, timezone


class BinanceAPIError(Exception):
    """Binance refused a request; a 4xx other than 429/418/403 is the caller's bug and is never retried.

    :param status: HTTP status (``None`` when no response arrived, e.g. timeouts).
    :param code: Binance's error code from the JSON body (e.g. ``-1121``), when it sent one.
    :param msg: Binance's message, or a description of what went wrong.
    :param endpoint: the API path, e.g. ``/api/v3/klines``.
    """

    def __init__(self, status: int | None, code: int | None, msg: str, endpoint: str) -> None:
        self.status = status
        self.code = code
        self.msg = msg
        self.endpoint = endpoint
        where = f"Binance {endpoint} answered {status}" if status is not None else f"Binance {endpoint}"
        detail = f"code {code}: {msg}" if code is not None else msg
        super().__init__(f"{where}: {detail}")


class BinanceRateLimited(BinanceAPIError):
    """The call's retry budget (``max_tries`` attempts, ``max_time_s``) ran out, the last failure a 429.

    The message says how many attempts were made and how long they took.
    """


class BinanceUnavailable(BinanceAPIError):
    """The call's retry budget ran out on a transient failure (5xx, 403 from Binance's WAF,
    timeout, connection error, malformed body); the message says how many attempts were made and
    how long they took."""


class BinanceBanned(BinanceAPIError):
    """The host banned this IP (418); no request is sent to it before ``until``."""

    def __init__(self, until_ms: int, endpoint: str, msg: str | None = None, *,
                 status: int | None = 418, code: int | None = None) -> None:
        self.until_ms = int(until_ms)
        self.until = datetime.fromtimestamp(self.until_ms / 1000, tz=timezone.utc)
        text = msg or "IP banned"
        super().__init__(status, code, f"{text} (until {self.until.isoformat()})", endpoint)
