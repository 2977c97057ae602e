"""Fixtures for DAG tests: a migrated Airflow metadata DB for ``dag.test()``.

The session-wide ``tests/conftest.py`` already points ``AIRFLOW_HOME`` at a throw-away
directory (SQLite DB inside) and ``AIRFLOW__CORE__DAGS_FOLDER`` at ``dags/``.
"""

from __future__ import annotations

import os
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
