"""Session-wide test setup: import paths, an isolated AIRFLOW_HOME, the Binance sandbox."""

from __future__ import annotations

import atexit
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # include.*; binance_provider is an installed package (make venv)
    sys.path.insert(0, str(ROOT))

# Airflow reads its configuration when first imported: point it at a throw-away home
# before any test module imports it, so tests never touch a developer's .airflow/.
_AIRFLOW_HOME = tempfile.mkdtemp(prefix="osm-airflow-home-")
atexit.register(shutil.rmtree, _AIRFLOW_HOME, ignore_errors=True)
os.environ["AIRFLOW_HOME"] = _AIRFLOW_HOME
os.environ["AIRFLOW__CORE__LOAD_EXAMPLES"] = "False"
os.environ["AIRFLOW__CORE__DAGS_FOLDER"] = str(ROOT / "dags")
os.environ["AIRFLOW__CORE__PLUGINS_FOLDER"] = str(ROOT / "plugins")
os.environ["AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION"] = "False"
os.environ["AIRFLOW__METRICS__STATSD_ON"] = "False"
os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
for name in ("BINANCE_SYMBOLS", "BINANCE_INTERVALS", "RAW_DATA_DIR", "CURATED_DATA_DIR", "SIGNAL_DATA_DIR",
             "BINANCE_RATE_LIMIT_WEIGHT", "BINANCE_RATE_LIMIT_WINDOW_S", "BINANCE_RATE_LIMIT_SAFETY",
             "BINANCE_MAX_CONCURRENCY", "INGEST_START", "GAP_CHECK_LOOKBACK_DAYS", "LOG_LEVEL"):
    os.environ.pop(name, None)


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "slow: the cluster, standalone + browser and fault-matrix suites (make test-fast skips them)")


@pytest.fixture(scope="session")
def sandbox():
    """One Binance sandbox on a free 127.0.0.1 port for the whole session."""
    from include.binance_sandbox import SandboxServer

    with SandboxServer(host="127.0.0.1", port=0, seed=42) as server:
        yield server


@pytest.fixture
def clean_sandbox(sandbox):
    """The session sandbox with no faults and zeroed counters, reset again afterwards."""
    sandbox.clear_faults()
    sandbox.reset_limits()
    sandbox.reset_stats()
    yield sandbox
    sandbox.clear_faults()
    sandbox.reset_limits()  # a test that got banned must not ban the next one


@pytest.fixture
def data_env(tmp_path, monkeypatch, clean_sandbox):
    """Data dirs under ``tmp_path`` and ``binance_default`` pointing at the sandbox."""
    monkeypatch.setenv("RAW_DATA_DIR", str(tmp_path / "raw"))
    monkeypatch.setenv("CURATED_DATA_DIR", str(tmp_path / "curated"))
    monkeypatch.setenv("SIGNAL_DATA_DIR", str(tmp_path / "signals"))
    monkeypatch.setenv("AIRFLOW_CONN_BINANCE_DEFAULT", f'{{"conn_type": "http", "host": "{clean_sandbox.url}"}}')
    monkeypatch.setenv("AIRFLOW_CONN_BINANCE_ARCHIVE", f'{{"conn_type": "http", "host": "{clean_sandbox.url}"}}')
    return tmp_path


@pytest.fixture
def object_store(monkeypatch):
    """A fresh fsspec ``memory://`` bucket, reachable through Airflow's ObjectStoragePath
    (standing in for ``s3://``); yields ``(url, filesystem, bucket path)``."""
    import uuid

    import airflow.sdk.io.fs as airflow_fs
    from fsspec.implementations.memory import MemoryFileSystem

    registered = airflow_fs._register_filesystems
    monkeypatch.setattr(airflow_fs, "_register_filesystems",
                        lambda: {**registered(), "memory": lambda conn_id, options=None: MemoryFileSystem()})
    bucket = f"/bucket-{uuid.uuid4().hex}"
    memory = MemoryFileSystem()
    try:
        yield f"memory:/{bucket}", memory, bucket
    finally:
        if memory.exists(bucket):
            memory.rm(bucket, recursive=True)


@pytest.fixture(autouse=True)
def _own_ban_record(tmp_path_factory, monkeypatch):
    """Each test keeps its own machine-wide 418 record (a test that gets banned by the session
    sandbox must not ban the tests after it)."""
    monkeypatch.setenv("BINANCE_BAN_DIR", str(tmp_path_factory.mktemp("bans")))


# --- running DAGs: a migrated metadata DB and data dirs shared by every DAG run ---------------


@pytest.fixture(scope="session")
def airflow_db():
    """Migrate the temporary AIRFLOW_HOME's metadata DB once per session (needed by ``dag.test()``)."""
    home = os.environ["AIRFLOW_HOME"]
    if not os.path.realpath(home).startswith(os.path.realpath(tempfile.gettempdir()) + os.sep):
        pytest.fail(f"refusing to migrate AIRFLOW_HOME={home!r}: tests/conftest.py should point it at a temp dir")
    result = subprocess.run([sys.executable, "-m", "airflow", "db", "migrate"], env=os.environ.copy(),
                            capture_output=True, text=True, timeout=300)
    if result.returncode != 0:
        pytest.fail(f"airflow db migrate failed ({result.returncode}):\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    return home


@pytest.fixture(scope="session")
def _dag_data_root(tmp_path_factory):
    return tmp_path_factory.mktemp("dag-data")


@pytest.fixture
def dag_data_env(_dag_data_root, monkeypatch, clean_sandbox):
    """As ``data_env``, but every test running DAGs uses the same (emptied) data dirs.

    The DAGs' Assets are named after the curated/signal dirs' URIs, and Airflow keeps one URI
    per Asset name in its metadata DB: a new dir per test would make the Asset of the next
    dag.test() inactive.
    """
    for entry in _dag_data_root.iterdir():
        shutil.rmtree(entry)
    monkeypatch.setenv("RAW_DATA_DIR", str(_dag_data_root / "raw"))
    monkeypatch.setenv("CURATED_DATA_DIR", str(_dag_data_root / "curated"))
    monkeypatch.setenv("SIGNAL_DATA_DIR", str(_dag_data_root / "signals"))
    monkeypatch.setenv("AIRFLOW_CONN_BINANCE_DEFAULT", f'{{"conn_type": "http", "host": "{clean_sandbox.url}"}}')
    monkeypatch.setenv("AIRFLOW_CONN_BINANCE_ARCHIVE", f'{{"conn_type": "http", "host": "{clean_sandbox.url}"}}')
    return _dag_data_root
