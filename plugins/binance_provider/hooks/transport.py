"""HTTP transport helpers of the Binance clients and hooks: reading one ``requests`` response, the
one bounded retry policy both (REST and archive) run their requests under, and their shared
connection handling (one session per thread; the address from ``AIRFLOW_CONN_<ID>`` or the default host).

The transport errors worth a retry, the parsing of a response's body and headers (JSON body,
used weight, ``Date``, ``Retry-After``, Binance's error body) into plain values, and
:func:`call_with_retries`: at most ``max_tries`` attempts, none starting later than ``max_time_s``
after the first, exponential backoff with full jitter between transient failures.

No Airflow import: the plain clients (:mod:`binance_provider.clients`) run on this module alone.
"""

from __future__ import annotations

import json
import os
import random
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from email.utils import parsedate_to_datetime
from typing import Any, TypeVar
from urllib.parse import parse_qsl, unquote, urlsplit

import requests
import structlog
from requests import Response, Session

from binance_provider.klines import KlineValidationError

CONN_ENV_PREFIX = "AIRFLOW_CONN_"


def connection_variable(conn_id: str) -> str:
    """The environment variable Airflow reads connection ``conn_id`` from (``AIRFLOW_CONN_<ID>``)."""
    return CONN_ENV_PREFIX + conn_id.upper()


class UnsupportedConnection(ValueError):
    """The connection's variable holds more than an address (login, password, extra) or cannot be
    read: only the Airflow hook applies such a connection."""


def _uri_fields(uri: str) -> dict[str, Any]:
    """The fields of a connection URI, as Airflow's ``Connection.from_uri`` reads them
    (``http://host:8900``, ``http://https://host``, ``conn-type://login:password@host:port/schema?extra``)."""
    if uri.count("://") > 2:
        raise UnsupportedConnection(f"invalid connection URI {uri!r}")
    with_protocol = uri.count("://") == 2
    conn_type = urlsplit(uri).scheme
    rest = uri.replace(f"{conn_type}://", "" if with_protocol else "//")
    if with_protocol and ("@" in rest.split("://", 1)[0] or ":" in rest.split("://", 1)[0]):
        raise UnsupportedConnection(f"invalid connection URI {uri!r}")
    parts = urlsplit(rest)
    host = unquote(parts.hostname or "")
    if "/" in host:  # Airflow's _parse_netloc_to_hostname
        host = unquote(parts.netloc.rsplit("@", 1)[-1].split(":", 1)[0])
    if with_protocol and host:
        host = f"{parts.scheme}://{host}"
    return {"host": host, "schema": unquote(parts.path[1:]), "login": parts.username,
            "password": parts.password, "port": parts.port, "extra": dict(parse_qsl(parts.query, keep_blank_values=True)) or None}


def connection_base_url(conn_id: str, default_host: str, env: Mapping[str, str] | None = None) -> str | None:
    """The base URL of connection ``conn_id`` from its ``AIRFLOW_CONN_<ID>`` variable, built as
    ``HttpHook`` builds it (a host with ``://`` is taken as it is, else ``<schema or http>://host``,
    then ``:port``; an empty host is ``default_host``), or ``None`` when the variable is unset or empty.

    Both of Airflow's forms are read: JSON (``{"conn_type": "http", "host": "http://127.0.0.1:8900"}``)
    and URI (``http://127.0.0.1:8900``; note that, as in Airflow, ``https://host`` names the conn
    type ``https`` and gives ``http://host``: write ``http://https://host`` or the JSON form).

    :raises UnsupportedConnection: the variable sets a login, password or extra, or is unreadable.
    """
    name = connection_variable(conn_id)
    raw = ((os.environ if env is None else env).get(name) or "").strip()
    if not raw:
        return None
    try:
        fields = json.loads(raw) if raw.startswith("{") else _uri_fields(raw)
        if not isinstance(fields, dict):
            raise ValueError("not a JSON object")
        port = int(fields["port"]) if fields.get("port") else None
    except (ValueError, TypeError) as exc:
        raise UnsupportedConnection(f"{name} is not a readable connection: {exc}") from None
    beyond = [key for key in ("login", "password", "extra") if fields.get(key)]
    if beyond:
        raise UnsupportedConnection(f"{name} sets {', '.join(beyond)}: only the Airflow hook applies it")
    host = fields.get("host") or default_host
    base_url = host if "://" in host else f"{fields.get('schema') or 'http'}://{host}"
    if port:
        base_url = f"{base_url}:{port}"
    if not urlsplit(base_url).scheme:
        raise UnsupportedConnection(f"{name}: missing scheme in {base_url}")
    return base_url.rstrip("/")


class PerThreadSessions:
    """Connection handling shared by the Binance clients and hooks.

    The address is resolved once: for the plain clients from the ``AIRFLOW_CONN_<ID>`` variable
    of the connection named by the class's ``conn_name_attr`` attribute (see
    :func:`connection_base_url`), the class's ``default_host`` when the variable is unset; the
    hooks look the connection up through Airflow instead
    (:class:`binance_provider.hooks.connection.AirflowConnection`). ``requests.Session`` is not
    thread-safe, so :meth:`_session` gives each thread its own (reused for keep-alive): one client
    may be called from many threads at once. Logs go through structlog (the hooks: Airflow's
    ``self.log``, also structlog), with the same fields.
    """

    conn_name_attr: str
    hook_name: str
    default_host: str
    default_headers: dict[str, str] = {}
    base_url: str = ""

    def _init_sessions(self) -> None:
        self._setup_lock = threading.Lock()
        self._connection_resolved = False
        self._connection: Any = None
        self._sessions = threading.local()

    @property
    def log(self) -> Any:
        """A structlog logger named after the class (as Airflow names a hook's)."""
        logger = self.__dict__.get("_client_log")
        if logger is None:
            logger = self.__dict__["_client_log"] = structlog.get_logger(
                f"{type(self).__module__}.{type(self).__name__}")
        return logger

    def _resolve_connection(self) -> Any:
        """The address from the connection's variable, resolved once (default host when it is unset)."""
        with self._setup_lock:
            if not self._connection_resolved:
                conn_id = getattr(self, self.conn_name_attr)
                base_url = connection_base_url(conn_id, self.default_host)
                if base_url is None:
                    self.log.info(f"Connection not found; using the default {self.hook_name} host",
                                  conn_id=conn_id, host=self.default_host)
                    base_url = self.default_host.rstrip("/")
                self.base_url = base_url
                self._connection_resolved = True
            return None

    def get_conn(self, headers: dict[Any, Any] | None = None) -> Session:
        """A Requests session for the client's host (``self.base_url`` is set), with ``headers``."""
        self._resolve_connection()
        session = Session()
        session.headers.update(self.default_headers)
        if headers:
            session.headers.update(headers)
        return session

    def url_from_endpoint(self, endpoint: str | None) -> str:
        """The base URL joined with ``endpoint`` (as ``HttpHook`` joins them)."""
        if not self._connection_resolved:
            self._resolve_connection()
        if self.base_url and not self.base_url.endswith("/") and endpoint and not endpoint.startswith("/"):
            return f"{self.base_url}/{endpoint}"
        return self.base_url + (endpoint or "")

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
