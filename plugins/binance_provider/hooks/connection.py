"""The hooks' connection handling: the Airflow connection instead of the plain clients' variable.

Mixed in before the plain client (``BinanceHook(AirflowConnection, BinanceClient, HttpHook)``), so
everything else is the client's code, run with Airflow's connection lookup, ``HttpHook``'s session
set-up (auth, extra, adapters), its URL joining and Airflow's task logger.
"""

from __future__ import annotations

from typing import Any

from requests import Session

from airflow.providers.http.hooks.http import HttpHook
from airflow.sdk.exceptions import AirflowNotFoundException


# The plain clients' keyword options; every other keyword argument of a hook goes to HttpHook.
CLIENT_OPTIONS = ("settings", "timeout_s", "max_tries", "max_time_s", "backoff_factor_s", "backoff_cap_s")


class AirflowConnection:
    """The Airflow connection named by the hook's ``conn_name_attr`` attribute, looked up once;
    when it does not exist the class's ``default_host`` is used.

    :meth:`_set_up` initialises both halves of ``Hook(AirflowConnection, Client, HttpHook)``: the
    client with its own options (their defaults live in one place, the client), HttpHook with the
    rest (``method`` is always GET)."""

    log = HttpHook.log
    url_from_endpoint = HttpHook.url_from_endpoint

    def _set_up(self, client: type, conn_id: str, kwargs: dict[str, Any]) -> None:
        """Initialise HttpHook and ``client`` (this hook's plain client class) from the hook's arguments."""
        client_options = {name: kwargs.pop(name) for name in CLIENT_OPTIONS if name in kwargs}
        kwargs.pop("method", None)
        HttpHook.__init__(self, method="GET", http_conn_id=conn_id, **kwargs)
        client.__init__(self, conn_id, **client_options)

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
