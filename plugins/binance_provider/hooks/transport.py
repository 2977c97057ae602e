"""HTTP transport helpers of the Binance hook: reading one ``requests`` response.

The transport errors worth a retry, and the parsing of a response's body and headers (JSON body,
used weight, ``Date``, ``Retry-After``, Binance's error body) into plain values.
"""

from __future__ import annotations

from email.utils import parsedate_to_datetime
from typing import Any

import requests
from requests import Response

from binance_provider.klines import KlineValidationError

_TRANSPORT_ERRORS = (
    requests.Timeout,
    requests.ConnectionError,
    requests.exceptions.ChunkedEncodingError,
    requests.exceptions.ContentDecodingError,
)


def _json_body(response: Response) -> Any:
    try:
        return response.json()
    except ValueError as exc:
        raise KlineValidationError(f"body is not JSON ({exc}): {response.text[:120]!r}") from None


def _used_weight(response: Response) -> int | None:
    raw = response.headers.get("X-MBX-USED-WEIGHT-1M")
    try:
        return int(raw) if raw is not None else None
    except ValueError:
        return None


def _server_date_ms(response: Response) -> int:
    """The response's ``Date`` header in epoch ms (a large value when absent or unreadable)."""
    try:
        return int(parsedate_to_datetime(response.headers["Date"]).timestamp()) * 1000
    except (KeyError, TypeError, ValueError, IndexError):
        return 2**62


def _retry_after_s(response: Response) -> float | None:
    raw = response.headers.get("Retry-After")
    try:
        return max(0.0, float(raw)) if raw is not None else None
    except ValueError:
        return None


def _error_body(response: Response) -> tuple[int | None, str]:
    """Binance's ``{"code": -1121, "msg": "Invalid symbol."}``, or the raw text when it is not that."""
    try:
        body = response.json()
    except ValueError:
        body = None
    if isinstance(body, dict) and "msg" in body:
        code = body.get("code")
        return (code if isinstance(code, int) else None), str(body["msg"])
    return None, (response.text[:200] or response.reason or "no body")


def _require(condition: bool, what: str) -> None:
    if not condition:
        raise KlineValidationError(what)
