"""HTTP transport helpers of the Binance hooks: reading one ``requests`` response, the one
bounded retry policy both hooks (REST and archive) run their requests under, and their shared
connection handling (default host when the connection is missing, one session per thread).

The transport errors worth a retry, the parsing of a response's body and headers (JSON body,
used weight, ``Date``, ``Retry-After``, Binance's error body) into plain values, and
:func:`call_with_retries`: at most ``max_tries`` attempts, none starting later than ``max_time_s``
after the first, exponential backoff with full jitter between transient failures.
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from email.utils import parsedate_to_datetime
from typing import Any, TypeVar

import requests
from requests import Response, Session

from airflow.sdk.exceptions import AirflowNotFoundException

from binance_provider.klines import KlineValidationError


class PerThreadSessions:
    """Connection handling shared by the Binance hooks (mixed in before ``HttpHook``).

    The Airflow connection named by the hook's ``conn_name_attr`` attribute is looked up once;
    when it does not exist the class's ``default_host`` is used. ``requests.Session`` is not
    thread-safe, so :meth:`_session` gives each thread its own (reused for keep-alive): one hook
    may be called from many threads at once.
    """

    default_host: str
    default_headers: dict[str, str] = {}

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._setup_lock = threading.Lock()
        self._connection_resolved = False
        self._connection: Any = None
        self._sessions = threading.local()

    def _resolve_connection(self) -> Any:
        """The Airflow connection, looked up once; ``None`` (default host) when it does not exist."""
        with self._setup_lock:
            if not self._connection_resolved:
                conn_id = getattr(self, self.conn_name_attr)
                try:
                    self._connection = self.get_connection(conn_id)
                except AirflowNotFoundException:
                    self._connection = None
                    self.log.info(f"Connection not found; using the default {self.hook_name} host",
                                  conn_id=conn_id, host=self.default_host)
                if self._connection is None:
                    self.base_url = self.default_host.rstrip("/")
                    self._base_url_initialized = True
                else:
                    self._set_base_url(self._connection)
                    self.base_url = self.base_url.rstrip("/")
                self._connection_resolved = True
            return self._connection

    def get_conn(
        self, headers: dict[Any, Any] | None = None, extra_options: dict[str, Any] | None = None
    ) -> Session:
        """
        Create a Requests session for the hook's host.

        :param headers: additional headers for every request of the session.
        :param extra_options: options as in :class:`HttpHook` (proxies, verify, ...).
        :return: a configured ``requests.Session``; ``self.base_url`` is set.
        """
        session = Session()
        connection = self._resolve_connection()
        extra_options = extra_options or {}
        if connection is not None:
            session = self._configure_session_from_auth(session, connection)
            if connection.extra or extra_options:
                session = self._configure_session_from_extra(session, connection, extra_options)
        session = self._configure_session_from_mount_adapters(session)
        session.headers.update(self.default_headers)
        if headers:
            session.headers.update(headers)
        return session

    def _session(self) -> Session:
        session = getattr(self._sessions, "session", None)
        if session is None:
            session = self._sessions.session = self.get_conn()
        return session

    @property
    def source(self) -> str:
        """Base URL requests go to."""
        self._resolve_connection()
        return self.base_url


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


# -- the one bounded retry policy ----------------------------------------------------------------


class _Transient(Exception):
    """A failure worth retrying with backoff: 5xx, 403 (WAF), timeout, connection error, malformed body.

    ``min_wait_s``: the next attempt waits at least this long (a server's ``Retry-After``).
    """

    def __init__(self, status: int | None, kind: str, detail: str, *, min_wait_s: float = 0.0) -> None:
        super().__init__(detail)
        self.status = status
        self.kind = kind
        self.detail = detail
        self.min_wait_s = min_wait_s


class _RetryAfter(Exception):
    """A 429: the shared limiter now holds every thread until ``resume_s`` (epoch seconds), so the
    retry loop does not sleep itself: the next attempt waits in the limiter."""

    def __init__(self, code: int | None, msg: str, resume_s: float) -> None:
        super().__init__(msg)
        self.code = code
        self.msg = msg
        self.resume_s = resume_s


@dataclass(frozen=True)
class RetryPolicy:
    """One call's retry budget: ``max_tries`` attempts in total and ``max_time_s`` (no attempt
    starts later than that after the first); backoff steps start at ``backoff_factor_s`` and
    double up to ``backoff_cap_s``, each wait drawn uniformly from ``[0, step]`` (full jitter)."""

    max_tries: int = 8
    max_time_s: float = 300.0
    backoff_factor_s: float = 0.5
    backoff_cap_s: float = 30.0

    def __post_init__(self) -> None:
        if self.max_tries < 1:
            raise ValueError(f"max_tries={self.max_tries} must be >= 1")

    def backoff_s(self, retries: int) -> float:
        """The jittered wait before retry number ``retries + 1``."""
        step = min(self.backoff_cap_s, self.backoff_factor_s * 2 ** min(retries, 60))
        return random.uniform(0, step)


_T = TypeVar("_T")


def call_with_retries(
    attempt: Callable[[], _T],
    policy: RetryPolicy,
    *,
    give_up: Callable[[_Transient | _RetryAfter, str], Exception],
    on_retry: Callable[[int], None] = lambda retries: None,
) -> _T:
    """Run ``attempt`` until it returns, retrying :class:`_Transient` and :class:`_RetryAfter`
    failures within ``policy``; any other exception goes straight to the caller.

    :param give_up: builds the exception raised when the budget runs out, from the last failure
        and a text saying how many attempts were made in how long (raised ``from`` the failure).
    :param on_retry: called with the number of retries so far just before each retry's wait.
    """
    started = time.monotonic()
    deadline = started + policy.max_time_s
    retries = 0
    while True:
        try:
            return attempt()
        except (_Transient, _RetryAfter) as exc:
            failure = exc
        attempts = retries + 1
        if isinstance(failure, _RetryAfter):
            wait_s = max(0.0, failure.resume_s - time.time())
        else:
            wait_s = max(policy.backoff_s(retries), failure.min_wait_s)
        now = time.monotonic()
        if attempts >= policy.max_tries or now + wait_s >= deadline:
            limit = (f"max_tries={policy.max_tries}" if attempts >= policy.max_tries
                     else f"max_time_s={policy.max_time_s:g}")
            spent = (f"gave up after {attempts} attempt{'s' if attempts != 1 else ''} "
                     f"in {now - started:.1f} s, {limit} reached")
            raise give_up(failure, spent) from failure
        retries += 1
        on_retry(retries)
        if isinstance(failure, _Transient):
            time.sleep(wait_s)
