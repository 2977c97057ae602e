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


class AirflowConnection:
    """The Airflow connection named by the hook's ``conn_name_attr`` attribute, looked up once;
    when it does not exist the class's ``default_host`` is used."""

    log = HttpHook.log
    url_from_endpoint = HttpHook.url_from_endpoint

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
