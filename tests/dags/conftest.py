"""DAG tests run DAGs: they use the shared DAG data dirs (see ``dag_data_env`` in tests/conftest.py)."""

import pytest


@pytest.fixture
def data_env(dag_data_env):
    return dag_data_env
