"""Fixtures for DAG tests: a migrated Airflow metadata DB for ``dag.test()``.

The session-wide ``tests/conftest.py`` already points ``AIRFLOW_HOME`` at a throw-away
directory (SQLite DB inside) and ``AIRFLOW__CORE__DAGS_FOLDER`` at ``dags/``.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile

import pytest


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
def data_env(_dag_data_root, monkeypatch, clean_sandbox):
    """As the session-wide ``data_env``, but every DAG test uses the same (emptied) data dirs.

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
    return _dag_data_root
