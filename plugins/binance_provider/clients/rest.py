"""Binance spot REST client without Airflow: weight-aware rate limiting, one bounded retry policy,
validated klines.

The client speaks HTTP only: it pages through ``/api/v3/klines`` and hands back Binance's rows
(validated by :mod:`binance_provider.klines`, open candles dropped, rows that break a value rule
set apart in ``rejected``) with provenance in :class:`ResponseMeta`. What happens to the rows is
the caller's business. :class:`binance_provider.hooks.binance.BinanceHook` is this client on an
Airflow connection; :func:`binance_provider.clients.rest_client` picks one of the two.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import TYPE_CHECKING, Any

import requests
from requests import Response

from binance_provider.facts import BINANCE_CONN_ID, DEFAULT_BINANCE_HOST, HookSettings, validate_symbol
from binance_provider.hooks.errors import (
    BinanceAPIError,
    BinanceBanned,
    BinanceRateLimited,
    BinanceUnavailable,
)
from binance_provider.hooks.intervals import BINANCE_INTERVALS
from binance_provider.hooks.rate_limiter import (
    BanActive,
    BanRecord,
    WeightLimiter,
    normalize_endpoint,
    request_weight,
    shared_ban_record,
    shared_limiter,
)
from binance_provider.hooks.transport import (
    _TRANSPORT_ERRORS,
    PerThreadSessions,
    RetryPolicy,
    _error_body,
    _json_body,
    _require,
    _retry_after_s,
    _RetryAfter,
    _server_date_ms,
    _Transient,
    _used_weight,
    call_with_retries,
)
from binance_provider.klines import (
    MAX_KLINES_LIMIT,
    KlineCheck,
    KlinePage,
    KlineValidationError,
    RejectedRow,
    ResponseMeta,
    page_windows,
    parse_decimal,
    validate_klines,
)
from binance_provider.metrics import emit as _emit

if TYPE_CHECKING:
    from binance_provider.hooks.redis_limiter import RedisBanRecord, RedisWeightLimiter

__all__ = [
    "BinanceAPIError",
    "BinanceBanned",
    "BinanceClient",
    "BinanceRateLimited",
    "BinanceUnavailable",
    "KlineCheck",
    "KlinePage",
    "KlineValidationError",
    "RejectedRow",
    "ResponseMeta",
    "page_windows",
    "validate_klines",
]

KLINES_ENDPOINT = "/api/v3/klines"
_FAR_FUTURE_MS = 2**53  # an open-ended window for validate_klines
# Binance bans start at two minutes; used only if a 418 comes without Retry-After.
DEFAULT_BAN_S = 120.0


def _check_interval(interval: Any) -> str:
    if interval not in BINANCE_INTERVALS:
        raise ValueError(
            f"interval={interval!r} is not a Binance interval; expected one of {', '.join(BINANCE_INTERVALS)}"
        )
    return interval


_EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)
_ONE_MS = timedelta(milliseconds=1)


def _epoch_ms(value: Any, name: str = "value") -> int:
    """``value`` as epoch milliseconds: an int is taken as it is, a timezone-aware ``datetime``
    (pendulum's and pandas' included, e.g. Airflow's ``data_interval_start``) is converted exactly.

    A time between two milliseconds is rounded up: candles open on whole milliseconds, so the
    half-open window ``[start, end)`` holds the same open times either way. A naive datetime is
    refused (it is never read as local time), as is anything else.
    """
    if isinstance(value, datetime):
        if value.tzinfo is None or value.utcoffset() is None:
            raise ValueError(
                f"{name}={value!r} is a naive datetime: give it a timezone (e.g. tzinfo=timezone.utc), "
                f"it is not read as local time"
            )
        utc = value.astimezone(timezone.utc)
        # Rebuilt as a plain datetime: the arithmetic stays datetime's own (exact, integer).
        plain = datetime(utc.year, utc.month, utc.day, utc.hour, utc.minute, utc.second, utc.microsecond,
                         tzinfo=timezone.utc)
        elapsed = plain - _EPOCH
        whole_ms = elapsed // _ONE_MS
        below_ms = elapsed - whole_ms * _ONE_MS > timedelta(0) or bool(getattr(value, "nanosecond", 0))
        return whole_ms + 1 if below_ms else whole_ms
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name}={value!r} must be an int of epoch milliseconds or a timezone-aware datetime")
    return value


def _check_window(start_ms: Any, end_ms: Any) -> tuple[int, int]:
    """``(start_ms, end_ms)`` as epoch ms ints (see :func:`_epoch_ms`), checked to be a window."""
    start_ms, end_ms = _epoch_ms(start_ms, "start_ms"), _epoch_ms(end_ms, "end_ms")
    if start_ms < 0:
        raise ValueError(f"start_ms={start_ms} must be >= 0")
    if start_ms >= end_ms:
        raise ValueError(f"start_ms={start_ms} must be < end_ms={end_ms} (half-open window [start, end))")
    return start_ms, end_ms


# -- retry plumbing (the loop itself is transport.call_with_retries) --------------------------


@dataclass
class _Call:
    endpoint: str
    params: dict[str, Any]
    weight: int
    parse: Callable[[Response], Any]
    log_fields: dict[str, Any]
    headers: dict[str, Any] | None = None
    timeout_s: float | None = None
    retries: int = 0


class BinanceClient(PerThreadSessions):
    """
    Talk to Binance's spot REST API (or a compatible server such as the local sandbox).

    Every request goes through a weight-aware limiter shared by all clients and hooks of the
    process that talk to the same host, retries transient failures (5xx, 403, timeouts, connection
    errors, malformed bodies) with exponential backoff and full jitter, honours ``Retry-After`` on
    429 for every thread, and stops calling a host that answered 418 until the ban ends. Transient
    failures and 429s share one budget per call: ``max_tries`` attempts and ``max_time_s``.

    No Airflow: the host comes from the connection's ``AIRFLOW_CONN_<ID>`` variable (JSON or URI
    form, see :func:`binance_provider.hooks.transport.connection_base_url`), else
    ``https://data-api.binance.vision``. Metrics go through :mod:`binance_provider.metrics`.

    :param binance_conn_id: the connection whose variable names the API base URL.
    :param settings: :class:`binance_provider.facts.HookSettings` (rate-limit budget, window,
        concurrency, log level); default: read from the client's own environment variables.
    :param timeout_s: connect and read timeout of each request.
    :param max_tries: attempts per call in total, 429s and transient failures counted together.
    :param max_time_s: no attempt of a call starts later than this many seconds after its first
        (a retry whose backoff or Retry-After would end later is not made).
    :param backoff_factor_s: first backoff step; steps double up to ``backoff_cap_s``, each
        drawn uniformly from ``[0, step]`` (full jitter).
    """

    conn_name_attr = "binance_conn_id"
    default_conn_name = BINANCE_CONN_ID
    hook_name = "Binance"
    default_host = DEFAULT_BINANCE_HOST
    default_headers = {"Accept": "application/json"}

    def __init__(
        self,
        binance_conn_id: str = BINANCE_CONN_ID,
        *,
        settings: HookSettings | None = None,
        timeout_s: float = 10.0,
        max_tries: int = 8,
        max_time_s: float = 300.0,
        backoff_factor_s: float = 0.5,
        backoff_cap_s: float = 30.0,
    ) -> None:
        RetryPolicy(max_tries, max_time_s, backoff_factor_s, backoff_cap_s)  # checks them
        if not timeout_s > 0:
            raise ValueError(f"timeout_s={timeout_s} must be > 0")
        self._init_sessions()
        self.binance_conn_id = binance_conn_id
        # Anything with HookSettings' attributes (the pipeline passes config.Settings.hook_settings()).
        self.settings = settings if settings is not None else HookSettings.from_env()
        # One info line per request, unless LOG_LEVEL asks for less (failures always log).
        self._log_requests = logging.getLevelName(self.settings.log_level) <= logging.INFO
        self.timeout_s = timeout_s
        self.max_tries = max_tries
        self.max_time_s = max_time_s
        self.backoff_factor_s = backoff_factor_s
        self.backoff_cap_s = backoff_cap_s
        self._ban_record: BanRecord | None = None

    @property
    def limiter(self) -> WeightLimiter | RedisWeightLimiter:
        """The limiter for this client's host: shared by every process and worker through Redis
        when ``BINANCE_LIMITER_REDIS_URL`` is set, else by the threads of this process
        (:func:`binance_provider.hooks.rate_limiter.shared_limiter`)."""
        return shared_limiter(self.source, self.settings.rate_limit_budget, self.settings.rate_limit_window_s)

    @property
    def ban_record(self) -> BanRecord | RedisBanRecord:
        """The record of a 418 ban for this client's host: in Redis when ``BINANCE_LIMITER_REDIS_URL``
        is set (every worker), else a file under ``BINANCE_BAN_DIR`` (every process of the machine)."""
        record = shared_ban_record(self.source, self._ban_record)
        if isinstance(record, BanRecord):
            self._ban_record = record
        return record

    # -- one request with limiter, retries and status handling -------------------------------

    def run(
        self,
        endpoint: str | None = None,
        data: dict[str, Any] | None = None,
        headers: dict[str, Any] | None = None,
        extra_options: dict[str, Any] | None = None,
        **request_kwargs: Any,
    ) -> Response:
        """
        GET ``endpoint`` through the limiter with retries; return the successful response.

        :param endpoint: API path, e.g. ``/api/v3/ticker/price``.
        :param data: query parameters.
        :param headers: additional headers for this request.
        :param extra_options: ``{"timeout": seconds}`` overrides ``timeout_s``; ``check_response``
            is ignored (statuses are always handled here).
        :param request_kwargs: ``weight=N`` for an endpoint missing from the weight table.
        :raises BinanceAPIError: a 4xx other than 429/418/403 (never retried).
        :raises BinanceRateLimited: the retry budget ran out on a 429.
        :raises BinanceBanned: a 418, or a ban still in force (then nothing is sent).
        :raises BinanceUnavailable: the retry budget ran out on a transient failure.
        """
        _, response, _ = self._call(
            endpoint,
            dict(data or {}),
            parse=_json_body,
            headers=headers,
            timeout_s=(extra_options or {}).get("timeout"),
            weight=request_kwargs.pop("weight", None),
        )
        return response

    def _call(
        self,
        endpoint: str | None,
        params: dict[str, Any],
        *,
        parse: Callable[[Response], Any],
        log_fields: Mapping[str, Any] | None = None,
        headers: dict[str, Any] | None = None,
        timeout_s: float | None = None,
        weight: int | None = None,
    ) -> tuple[Any, Response, ResponseMeta]:
        path = normalize_endpoint(endpoint)
        call = _Call(
            endpoint=path,
            params=params,
            weight=request_weight(path, params) if weight is None else int(weight),
            parse=parse,
            log_fields=dict(log_fields or {}),
            headers=headers,
            timeout_s=timeout_s,
        )

        # One budget for every kind of retry: at most max_tries attempts, none starting later than
        # max_time_s after the first. A transient failure backs off exponentially with full
        # jitter; after a 429 the shared limiter holds every thread until Retry-After has passed,
        # so the next attempt simply waits there.
        def give_up(failure: _Transient | _RetryAfter, spent: str) -> Exception:
            if isinstance(failure, _RetryAfter):
                return BinanceRateLimited(429, failure.code, f"{failure.msg} ({spent})", path)
            return BinanceUnavailable(failure.status, None, f"{failure.kind}: {failure.detail} ({spent})", path)

        def on_retry(retries: int) -> None:
            call.retries = retries
            _emit("incr", "binance.request.retry")

        return call_with_retries(lambda: self._attempt(call), self.retry_policy, give_up=give_up, on_retry=on_retry)

    @property
    def retry_policy(self) -> RetryPolicy:
        """This client's retry budget (its ``max_tries``, ``max_time_s`` and backoff settings)."""
        return RetryPolicy(self.max_tries, self.max_time_s, self.backoff_factor_s, self.backoff_cap_s)

    def _attempt(self, call: _Call) -> tuple[Any, Response, ResponseMeta]:
        session = self._session()
        url = self.url_from_endpoint(call.endpoint)
        timeout = call.timeout_s if call.timeout_s is not None else self.timeout_s
        limiter = self.limiter
        recorded_ban = self.ban_record.until()
        if recorded_ban > time.time():  # another process of this machine was banned
            limiter.ban_until(recorded_ban)
        try:
            reservation = limiter.acquire(call.weight)
        except BanActive as exc:
            raise BinanceBanned(
                int(exc.until_s * 1000), call.endpoint, "not calling a host that banned this IP"
            ) from None
        recorded_ban = self.ban_record.until()
        if recorded_ban > time.time():  # banned elsewhere while this thread waited for room
            limiter.ban_until(recorded_ban)
            limiter.release(reservation, None)
            raise BinanceBanned(int(recorded_ban * 1000), call.endpoint, "not calling a host that banned this IP")
        used_weight: int | None = None
        started = time.perf_counter()
        try:
            response = session.get(url, params=call.params, headers=call.headers, timeout=timeout)
            used_weight = _used_weight(response)
        except _TRANSPORT_ERRORS as exc:
            kind = "timeout" if isinstance(exc, requests.Timeout) else "connection"
            self._record(call, kind, started, None, error=str(exc))
            raise _Transient(None, kind, f"{type(exc).__name__}: {exc}") from exc
        finally:
            limiter.release(reservation, used_weight)

        status = response.status_code
        if 200 <= status < 300:
            try:
                payload = call.parse(response)
            except KlineValidationError as exc:
                self._record(call, status, started, used_weight, error=f"malformed: {exc}", metric_status="malformed")
                raise _Transient(status, "malformed body", str(exc)) from None
            latency_ms = self._record(call, status, started, used_weight)
            meta = ResponseMeta(
                source=self.base_url,
                endpoint=call.endpoint,
                latency_ms=latency_ms,
                fetched_at=datetime.now(timezone.utc).isoformat(timespec="milliseconds"),
                used_weight=used_weight,
                status=status,
                retries=call.retries,
            )
            return payload, response, meta

        code, msg = _error_body(response)
        if status == 429:
            retry_after = _retry_after_s(response)
            resume = limiter.pause_until(time.time() + retry_after if retry_after is not None else None)
            _emit("incr", "binance.rate_limited")
            self._record(call, status, started, used_weight, error=msg, retry_after_s=retry_after,
                         paused_until=datetime.fromtimestamp(resume, tz=timezone.utc).isoformat())
            raise _RetryAfter(code, msg, resume)
        if status == 418:
            retry_after = _retry_after_s(response)
            until_s = time.time() + (retry_after if retry_after is not None else DEFAULT_BAN_S)
            limiter.ban_until(until_s)
            self.ban_record.record(until_s)
            _emit("incr", "binance.banned")
            self._record(call, status, started, used_weight, error=msg, retry_after_s=retry_after)
            raise BinanceBanned(int(until_s * 1000), call.endpoint, msg, code=code)
        self._record(call, status, started, used_weight, error=msg)
        if status >= 500 or status == 403:  # 403: Binance's WAF, which "can indicate a rate limit violation"
            raise _Transient(status, f"HTTP {status}", msg)
        raise BinanceAPIError(status, code, msg, call.endpoint)

    def _record(
        self,
        call: _Call,
        status: int | str,
        started: float,
        used_weight: int | None,
        *,
        error: str | None = None,
        metric_status: str | None = None,
        **fields: Any,
    ) -> float:
        """Metrics and the one log line of a request; returns its latency in ms."""
        latency_ms = round((time.perf_counter() - started) * 1000, 3)
        _emit("timing", "binance.request.duration", latency_ms)
        _emit("incr", "binance.request.count")
        if error is not None:
            _emit("incr", f"binance.request.error.{metric_status or status}")
        if used_weight is not None:
            _emit("gauge", "binance.weight_used", used_weight)
        line = dict(
            endpoint=call.endpoint,
            **call.log_fields,
            status=status,
            latency_ms=latency_ms,
            used_weight=used_weight,
            retries=call.retries,
            **fields,
        )
        if error is None:
            if self._log_requests:
                self.log.info("binance request", **line)
        else:
            self.log.warning("binance request failed", error=error[:300], **line)
        return latency_ms

    def test_connection(self) -> tuple[bool, str]:
        """Ping the host (used by the Airflow UI's connection test)."""
        try:
            meta = self.ping()
        except Exception as exc:  # noqa: BLE001 - the UI shows the message
            return False, str(exc)
        return True, f"Binance answered ping in {meta.latency_ms:.0f} ms"

    # -- endpoints ---------------------------------------------------------------------------

    def ping(self) -> ResponseMeta:
        """``GET /api/v3/ping`` (weight 1)."""

        def parse(response: Response) -> Any:
            body = _json_body(response)
            _require(isinstance(body, dict), f"ping body is {body!r:.100}, expected {{}}")
            return body

        return self._call("/api/v3/ping", {}, parse=parse)[2]

    def server_time(self) -> tuple[int, ResponseMeta]:
        """``GET /api/v3/time`` (weight 1): the server's clock in epoch ms."""

        def parse(response: Response) -> int:
            body = _json_body(response)
            value = body.get("serverTime") if isinstance(body, dict) else None
            _require(isinstance(value, int) and not isinstance(value, bool), f"time body {body!r:.100} lacks serverTime")
            return value

        server_ms, _, meta = self._call("/api/v3/time", {}, parse=parse)
        return server_ms, meta

    def exchange_info(self, symbol: str | None = None) -> tuple[dict, ResponseMeta]:
        """``GET /api/v3/exchangeInfo`` (weight 20), optionally for one symbol."""
        params = {} if symbol is None else {"symbol": validate_symbol(symbol, "symbol")}

        def parse(response: Response) -> dict:
            body = _json_body(response)
            _require(isinstance(body, dict) and isinstance(body.get("symbols"), list),
                     f"exchangeInfo body lacks a symbols list: {body!r:.100}")
            return body

        body, _, meta = self._call("/api/v3/exchangeInfo", params, parse=parse, log_fields=params)
        return body, meta

    def _ticker(self, endpoint: str, symbol: str, required: tuple[str, ...]) -> tuple[dict, ResponseMeta]:
        validate_symbol(symbol, "symbol")

        def parse(response: Response) -> dict:
            body = _json_body(response)
            _require(isinstance(body, dict) and body.get("symbol") == symbol,
                     f"{endpoint} body is not the ticker of {symbol}: {body!r:.100}")
            for field in required:
                parse_decimal(body.get(field), field, 0)
            return body

        body, _, meta = self._call(endpoint, {"symbol": symbol}, parse=parse, log_fields={"symbol": symbol})
        return body, meta

    def ticker_price(self, symbol: str) -> tuple[dict, ResponseMeta]:
        """``GET /api/v3/ticker/price`` for one symbol (weight 2): ``{"symbol", "price"}``."""
        return self._ticker("/api/v3/ticker/price", symbol, ("price",))

    def ticker_24hr(self, symbol: str) -> tuple[dict, ResponseMeta]:
        """``GET /api/v3/ticker/24hr`` for one symbol (weight 2)."""
        return self._ticker("/api/v3/ticker/24hr", symbol, ("lastPrice", "volume"))

    def klines(
        self,
        symbol: str,
        interval: str,
        start_ms: int | datetime,
        end_ms: int | datetime,
        limit: int = MAX_KLINES_LIMIT,
        *,
        now_ms: int | None = None,
    ) -> KlinePage:
        """
        One ``/api/v3/klines`` request for open times in ``[start_ms, end_ms)``.

        ``start_ms`` and ``end_ms`` are epoch milliseconds or timezone-aware datetimes (such as
        a task's ``data_interval_start``/``data_interval_end``); a naive datetime is refused with
        a ``ValueError``. The page's ``start_ms``/``end_ms`` are always epoch ms ints.

        The body is validated by :func:`binance_provider.klines.validate_klines`: a structurally
        malformed one is retried like any transient failure; a well-formed row that breaks a value
        rule is left out of ``rows``, logged (one warning per row) and listed in ``rejected``,
        without a retry. Candles still open at ``now_ms`` (default: when the response arrives)
        are dropped and counted.
        """
        validate_symbol(symbol, "symbol")
        _check_interval(interval)
        start_ms, end_ms = _check_window(start_ms, end_ms)
        if isinstance(limit, bool) or not isinstance(limit, int) or not 1 <= limit <= MAX_KLINES_LIMIT:
            raise ValueError(f"limit={limit!r} must be an int in 1..{MAX_KLINES_LIMIT}")
        params = {
            "symbol": symbol,
            "interval": interval,
            "startTime": start_ms,
            "endTime": end_ms - 1,  # Binance's endTime is inclusive
            "limit": limit,
        }
        checked, response, meta = self._call(
            KLINES_ENDPOINT,
            params,
            parse=lambda response: validate_klines(_json_body(response), interval, start_ms, end_ms, limit),
            log_fields={"symbol": symbol, "interval": interval},
        )
        rows = checked.rows
        for rejected in checked.rejected:
            self.log.warning(
                "binance kline row rejected",
                symbol=symbol,
                interval=interval,
                open_time=rejected.open_time_iso,
                open_time_ms=rejected.open_time,
                rules=list(rejected.rules),
                reasons=list(rejected.messages),
                values=rejected.values(),
            )
        if now_ms is None:
            # "Closed" is the server's call: with our clock ahead of Binance's, a candle Binance
            # still builds would look closed. The Date header (whole seconds) keeps us on the safe side.
            now_ms = min(int(time.time() * 1000), _server_date_ms(response))
        cutoff = now_ms
        closed = [row for row in rows if row[6] < cutoff]
        return KlinePage(
            symbol=symbol,
            interval=interval,
            start_ms=start_ms,
            end_ms=end_ms,
            rows=closed,
            meta=meta,
            dropped_open=len(rows) - len(closed),
            rejected=list(checked.rejected),
        )

    def first_open_ms(self, symbol: str, interval: str) -> int | None:
        """
        Open time (epoch ms) of ``symbol``'s first ``interval`` candle, or ``None`` when Binance
        has none: one ``/api/v3/klines?startTime=0&limit=1`` request (weight 2), through the same
        limiter and retry budget as every call. Nothing before it is history, nor a gap.
        """
        validate_symbol(symbol, "symbol")
        _check_interval(interval)
        params = {"symbol": symbol, "interval": interval, "startTime": 0, "limit": 1}

        def parse(response: Response) -> int | None:
            checked = validate_klines(_json_body(response), interval, 0, _FAR_FUTURE_MS, limit=1)
            # A first candle that breaks a value rule still tells when the symbol's history starts.
            opens = [row[0] for row in checked.rows] + [row.open_time for row in checked.rejected]
            return opens[0] if opens else None

        first, _, _ = self._call(KLINES_ENDPOINT, params, parse=parse,
                                 log_fields={"symbol": symbol, "interval": interval})
        return first

    def iter_klines(
        self,
        symbol: str,
        interval: str,
        start_ms: int | datetime,
        end_ms: int | datetime,
        *,
        concurrency: int | None = None,
        now_ms: int | None = None,
    ) -> Iterator[KlinePage]:
        """
        Page through ``[start_ms, end_ms)`` with ``limit=1000``, yielding pages in time order.

        ``start_ms`` and ``end_ms`` are epoch milliseconds or timezone-aware datetimes, as in
        :meth:`klines`.

        Page windows hold at most 1000 grid slots, so each is one request; up to ``concurrency``
        (default ``settings.max_concurrency``; 1 is sequential) run at once and at most twice
        that many pages are held before the caller takes them. Windows with holes simply
        return fewer rows.
        """
        validate_symbol(symbol, "symbol")
        _check_interval(interval)
        start_ms, end_ms = _check_window(start_ms, end_ms)
        workers = self.settings.max_concurrency if concurrency is None else concurrency
        if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
            raise ValueError(f"concurrency={concurrency!r} must be an int >= 1")
        return self._iter_pages(symbol, interval, page_windows(start_ms, end_ms, interval), workers, now_ms)

    def _iter_pages(
        self,
        symbol: str,
        interval: str,
        windows: Iterator[tuple[int, int]],
        workers: int,
        now_ms: int | None,
    ) -> Iterator[KlinePage]:
        if workers == 1:
            for window_start, window_end in windows:
                yield self.klines(symbol, interval, window_start, window_end, now_ms=now_ms)
            return
        executor = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="binance-klines")
        pending: deque[Future[KlinePage]] = deque()
        try:
            for window_start, window_end in windows:
                pending.append(executor.submit(self.klines, symbol, interval, window_start, window_end, now_ms=now_ms))
                if len(pending) >= 2 * workers:
                    yield pending.popleft().result()
            while pending:
                yield pending.popleft().result()
        finally:
            # Early exit or an error: drop queued pages, let in-flight requests finish.
            for future in pending:
                future.cancel()
            executor.shutdown(wait=True, cancel_futures=True)
