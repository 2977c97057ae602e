"""The plain clients (no Airflow) and the rule that picks them or the hooks.

A shell's seed API must not pay for importing Airflow before its first Binance request: outside
Airflow, with the connection in its ``AIRFLOW_CONN_<ID>`` variable, ``rest_client`` and
``archive_client`` hand out the plain clients; everywhere else the hooks. Processes that must not
have imported Airflow are run as subprocesses against the session sandbox.
"""

from __future__ import annotations

import importlib
import json
import os
import socket
import subprocess
import sys
import textwrap

import pytest
import structlog

from binance_provider.clients import BinanceArchiveClient, BinanceClient, archive_client, rest_client, use_plain_client
from binance_provider.facts import DEFAULT_ARCHIVE_HOST, DEFAULT_BINANCE_HOST, HookSettings
from binance_provider.hooks.archive import BinanceArchiveHook
from binance_provider.hooks.binance import BinanceHook
from binance_provider.hooks.transport import UnsupportedConnection, connection_base_url

FAST = dict(timeout_s=5.0, max_tries=2, backoff_factor_s=0.01, backoff_cap_s=0.05)


def as_json(url: str) -> str:
    return json.dumps({"conn_type": "http", "host": url})


def run_plain(code: str, tmp_path, **env: str) -> subprocess.CompletedProcess:
    """``code`` in a fresh interpreter with an empty AIRFLOW_HOME (no airflow.cfg), ``env`` added."""
    base = {k: v for k, v in os.environ.items()
            if not k.startswith(("AIRFLOW_CONN_", "AIRFLOW__METRICS__", "AIRFLOW__SECRETS__"))}
    base.update(AIRFLOW_HOME=str(tmp_path / "airflow_home"), **env)
    result = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=base, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


@pytest.fixture
def no_airflow(monkeypatch):
    """This process as if Airflow were not loaded (only ``use_plain_client``'s check looks)."""
    monkeypatch.delitem(sys.modules, "airflow", raising=False)
    for name in ("AIRFLOW__SECRETS__BACKEND", "AIRFLOW__SECRETS__BACKEND_CMD", "AIRFLOW__SECRETS__BACKEND_SECRET",
                 "AIRFLOW_CONFIG"):
        monkeypatch.delenv(name, raising=False)


# -- no Airflow in a plain process -----------------------------------------------------------------


@pytest.mark.parametrize("form", ["json", "uri"])
def test_the_plain_clients_import_no_airflow(clean_sandbox, tmp_path, form):
    value = as_json(clean_sandbox.url) if form == "json" else clean_sandbox.url
    result = run_plain("""
        import sys
        from binance_provider.clients import archive_client, rest_client
        client = rest_client()
        client.ping()
        pages = list(client.iter_klines("BTCUSDT", "1h", 1704067200000, 1706745600000))
        archive = archive_client()
        month = archive.fetch_month("BTCUSDT", "1h", 2024, 1)
        print(type(client).__name__, type(archive).__name__, client.source, sum(len(p.rows) for p in pages),
              len(month.rows), "airflow" in sys.modules)
    """, tmp_path, AIRFLOW_CONN_BINANCE_DEFAULT=value, AIRFLOW_CONN_BINANCE_ARCHIVE=value,
        BINANCE_BAN_DIR=str(tmp_path / "bans"))
    assert result.stdout.splitlines()[-1].split() == ["BinanceClient", "BinanceArchiveClient", clean_sandbox.url, "744",
                                                      "744", "False"]
    assert not (tmp_path / "airflow_home").exists()  # Airflow never even made its home


def test_without_the_variable_the_factory_gives_the_hook(tmp_path):
    result = run_plain("""
        import sys
        from binance_provider.clients import archive_client, rest_client
        print(type(rest_client()).__name__, type(archive_client()).__name__, "airflow" in sys.modules)
    """, tmp_path)
    assert result.stdout.splitlines()[-1].split() == ["BinanceHook", "BinanceArchiveHook", "True"]


def test_metrics_are_dropped_without_importing_airflow(tmp_path):
    result = run_plain("""
        import sys
        from binance_provider.metrics import emit
        emit("incr", "binance.request.count")
        emit("timing", "binance.request.duration", 1.5)
        print("airflow" in sys.modules)
    """, tmp_path, AIRFLOW__METRICS__STATSD_ON="False")
    assert result.stdout.split() == ["False"]


def test_metrics_are_sent_when_statsd_is_on(tmp_path):
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.1", 0))
        sock.settimeout(10)
        result = run_plain("""
            import sys
            from binance_provider.metrics import emit
            emit("incr", "binance.request.count")
            print("airflow" in sys.modules)
        """, tmp_path, AIRFLOW__METRICS__STATSD_ON="True", AIRFLOW__METRICS__STATSD_HOST="127.0.0.1",
            AIRFLOW__METRICS__STATSD_PORT=str(sock.getsockname()[1]), AIRFLOW__METRICS__STATSD_PREFIX="airflow")
        assert result.stdout.split()[-1] == "True"
        received = []
        while "airflow.binance.request.count:1|c" not in received:  # Airflow sends its own too
            received.append(sock.recv(65535).decode())


# -- the rule ------------------------------------------------------------------------------------------


def test_with_airflow_loaded_the_factory_always_gives_the_hook(monkeypatch, clean_sandbox):
    importlib.import_module("airflow")  # loaded, as in any task

    monkeypatch.setenv("AIRFLOW_CONN_BINANCE_DEFAULT", as_json(clean_sandbox.url))
    monkeypatch.setenv("AIRFLOW_CONN_BINANCE_ARCHIVE", as_json(clean_sandbox.url))
    assert not use_plain_client("binance_default")
    client = rest_client(settings=HookSettings(), **FAST)
    assert type(client) is BinanceHook and client.timeout_s == 5.0
    assert type(archive_client()) is BinanceArchiveHook


def test_outside_airflow_the_variable_decides(no_airflow, monkeypatch, clean_sandbox):
    monkeypatch.delenv("AIRFLOW_CONN_BINANCE_DEFAULT", raising=False)
    assert not use_plain_client("binance_default")  # the metadata DB may hold it: the hook looks
    monkeypatch.setenv("AIRFLOW_CONN_BINANCE_DEFAULT", "  ")
    assert not use_plain_client("binance_default")
    monkeypatch.setenv("AIRFLOW_CONN_BINANCE_DEFAULT", as_json(clean_sandbox.url))
    assert use_plain_client("binance_default")
    monkeypatch.setenv("AIRFLOW_CONN_MY_ARCHIVE", clean_sandbox.url)
    client = archive_client("my_archive", HookSettings())
    assert type(client) is BinanceArchiveClient and client.source == clean_sandbox.url
    client = rest_client(settings=HookSettings(max_concurrency=2), **FAST)
    assert type(client) is BinanceClient and client.settings.max_concurrency == 2 and client.max_tries == 2


@pytest.mark.parametrize("value", [
    '{"conn_type": "http", "host": "http://127.0.0.1:1", "login": "me", "password": "secret"}',
    '{"conn_type": "http", "host": "http://127.0.0.1:1", "extra": {"proxies": {"https": "http://proxy:3128"}}}',
    "http://me:secret@127.0.0.1:1",
    "http://127.0.0.1:1?verify=false",
    "{not json",
])
def test_a_connection_beyond_an_address_goes_to_the_hook(no_airflow, monkeypatch, value):
    monkeypatch.setenv("AIRFLOW_CONN_BINANCE_DEFAULT", value)
    assert not use_plain_client("binance_default")
    with pytest.raises(UnsupportedConnection, match="AIRFLOW_CONN_BINANCE_DEFAULT"):
        BinanceClient().source  # built directly, the plain client refuses it rather than drop a setting


def test_a_secrets_backend_goes_to_the_hook(no_airflow, monkeypatch, tmp_path):
    monkeypatch.setenv("AIRFLOW_CONN_BINANCE_DEFAULT", "http://127.0.0.1:1")
    monkeypatch.setenv("AIRFLOW_HOME", str(tmp_path))
    assert use_plain_client("binance_default")
    (tmp_path / "airflow.cfg").write_text("[secrets]\nbackend = my.secrets.Backend\nbackend_kwargs = {\"a\": \"%s\"}\n")
    assert not use_plain_client("binance_default")
    (tmp_path / "airflow.cfg").write_text("[secrets]\nbackend =\n")
    assert use_plain_client("binance_default")
    monkeypatch.setenv("AIRFLOW__SECRETS__BACKEND", "my.secrets.Backend")
    assert not use_plain_client("binance_default")


# -- the same connection forms, the same host ----------------------------------------------------


@pytest.mark.parametrize("value", [
    '{"conn_type": "http", "host": "http://127.0.0.1:8900"}',
    '{"conn_type": "http", "host": "127.0.0.1", "port": 8900, "schema": "http"}',
    '{"conn_type": "http", "host": "example.com", "port": "8443", "schema": "https"}',
    '{"conn_type": "http", "host": "https://example.com/"}',
    '{"conn_type": "http"}',
    "http://127.0.0.1:8900",
    "http://https://example.com",
    "https://example.com",  # Airflow: conn type https, host example.com -> http://example.com
    "http://example.com:8080/",
])
def test_the_client_reads_each_form_as_the_hook_does(monkeypatch, value):
    monkeypatch.setenv("AIRFLOW_CONN_BINANCE_DEFAULT", value)
    monkeypatch.setenv("AIRFLOW_CONN_BINANCE_ARCHIVE", value)
    assert BinanceClient().source == BinanceHook(settings=HookSettings()).source
    assert BinanceArchiveClient().source == BinanceArchiveHook().source


def test_no_variable_means_the_default_hosts(monkeypatch):
    monkeypatch.delenv("AIRFLOW_CONN_BINANCE_DEFAULT", raising=False)
    monkeypatch.delenv("AIRFLOW_CONN_BINANCE_ARCHIVE", raising=False)
    assert connection_base_url("binance_default", DEFAULT_BINANCE_HOST) is None
    assert BinanceClient().source == DEFAULT_BINANCE_HOST
    assert BinanceArchiveClient().url("/data/x.zip") == DEFAULT_ARCHIVE_HOST + "/data/x.zip"


# -- one code, two classes ---------------------------------------------------------------------------


def test_the_hooks_are_the_clients_on_an_airflow_connection():
    assert issubclass(BinanceHook, BinanceClient) and issubclass(BinanceArchiveHook, BinanceArchiveClient)
    for hook, client in ((BinanceHook, BinanceClient), (BinanceArchiveHook, BinanceArchiveClient)):
        public = {name for name in dir(client) if not name.startswith("_")}
        # Every method of the client is the hook's, unchanged (only the connection layer differs).
        assert {name for name in public if getattr(hook, name) is not getattr(client, name)} <= {
            "log", "url_from_endpoint", "get_conn", "conn_name_attr", "default_conn_name", "hook_name"}


def test_the_plain_client_logs_the_same_fields(monkeypatch, clean_sandbox):
    monkeypatch.setenv("AIRFLOW_CONN_BINANCE_DEFAULT", clean_sandbox.url)
    client = BinanceClient(settings=HookSettings(), **FAST)
    hook = BinanceHook(settings=HookSettings(), **FAST)
    with structlog.testing.capture_logs() as logs:
        client.klines("BTCUSDT", "1h", 1704067200000, 1704153600000)
        hook.klines("BTCUSDT", "1h", 1704067200000, 1704153600000)
    plain, airflow = [entry for entry in logs if entry["event"] == "binance request"]
    assert set(plain) == set(airflow) >= {"endpoint", "symbol", "interval", "status", "latency_ms", "used_weight",
                                          "retries"}
    assert plain["endpoint"] == "/api/v3/klines" and plain["status"] == 200
