"""End-to-end fixtures: one `airflow standalone` for every standalone test of this package (API and
browser), started on first use and stopped - every process of it - after the package's last test,
whatever happened."""

from __future__ import annotations

import pytest

from tests.e2e.helpers import Standalone, StatsdListener


@pytest.fixture
def statsd():
    listener = StatsdListener()
    yield listener
    listener.stop()


@pytest.fixture(scope="package")
def standalone(tmp_path_factory, sandbox):
    """A healthy `airflow standalone` (see helpers.Standalone) against the session's sandbox,
    with a StatsD listener on its metrics port, and an API client logged in as admin."""
    sandbox.clear_faults()
    sandbox.reset_limits()
    listener = StatsdListener()
    instance = Standalone(home=tmp_path_factory.mktemp("standalone-home"), sandbox_url=sandbox.url, statsd=listener)
    try:
        instance.start()
        yield instance
    finally:
        try:
            instance.stop()
        finally:
            listener.stop()
