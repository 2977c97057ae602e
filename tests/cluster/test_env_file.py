"""docker-compose.yaml and ``make cluster`` share one env file and cannot drift apart."""

from __future__ import annotations

import re
from pathlib import Path

import yaml

from include.cluster.manager import ENV_FILE, airflow_environment, read_env_file

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = yaml.safe_load((ROOT / "docker-compose.yaml").read_text())
AIRFLOW_SERVICES = [name for name in COMPOSE["services"] if name.startswith("airflow-")]
PORTS = {"postgres": 5001, "redis": 5002, "api": 5003, "sandbox": 5004}
SECRETS = {"api_secret_key": "a", "jwt_secret": "j", "fernet_key": "f"}


def _cluster_env(base: dict | None = None) -> dict:
    return airflow_environment(Path("/tmp/c"), PORTS, "http://b", "http://a", SECRETS, base=base or {})


def test_every_airflow_service_reads_the_env_file_and_restates_none_of_it():
    shared = read_env_file()
    for name in AIRFLOW_SERVICES:
        service = COMPOSE["services"][name]
        assert [str(ROOT / f) for f in service["env_file"]] == [str(ENV_FILE)], name
        restated = set(service.get("environment", {})) & set(shared)
        assert not restated, f"{name} sets {restated} itself: they belong in {ENV_FILE.name} only"


def test_make_cluster_runs_with_exactly_the_env_file_values():
    env = _cluster_env({"AIRFLOW__CORE__EXECUTOR": "LocalExecutor", "AIRFLOW__CORE__PARALLELISM": "32",
                        "BINANCE_SYMBOLS": "ETHUSDT", "PATH": "/usr/bin"})
    for key, value in read_env_file().items():
        expected = "ETHUSDT" if key == "BINANCE_SYMBOLS" else value
        assert env[key] == expected, key
    # a shell's own Airflow settings never leak in; the pipeline's settings may be overridden
    assert "AIRFLOW__CORE__PARALLELISM" not in env


def test_both_set_the_same_deployment_specific_keys():
    """What the env file leaves out (addresses, paths, secrets) is set by both, and nothing else."""
    compose_keys = set(COMPOSE["x-airflow-common"]["environment"])
    cluster_keys = set(_cluster_env()) - set(read_env_file()) - {"AIRFLOW_HOME", "PATH", "AIRFLOW__API__HOST",
                                                                 "AIRFLOW__API__PORT", "AIRFLOW__API__BASE_URL"}
    assert compose_keys == cluster_keys


def test_the_settings_the_scale_out_needs_are_in_force():
    shared = read_env_file()
    assert shared["AIRFLOW__CORE__EXECUTOR"] == "CeleryExecutor"
    assert int(shared["AIRFLOW__SCHEDULER__TASK_INSTANCE_HEARTBEAT_TIMEOUT"]) < 300  # Airflow's default
    assert shared["AIRFLOW__CORE__HOSTNAME_CALLABLE"] == "include.cluster.hostname.worker_hostname"
    assert shared["AIRFLOW__METRICS__LEGACY_NAMES_ON"] == "False"
    compose_env = COMPOSE["x-airflow-common"]["environment"]
    broker = compose_env["AIRFLOW__CELERY__BROKER_URL"]
    limiter = compose_env["BINANCE_LIMITER_REDIS_URL"]
    assert limiter.startswith("redis://") and limiter.split("@")[-1].split("/")[0] == broker.split("@")[-1].split("/")[0]
    assert limiter.rsplit("/", 1)[1] != broker.rsplit("/", 1)[1]  # its own database, beside Celery's
    cluster = _cluster_env()
    assert cluster["BINANCE_LIMITER_REDIS_URL"] == f"redis://127.0.0.1:{PORTS['redis']}/1"


def test_compose_builds_the_project_image_and_shares_one_data_volume():
    dockerfile = (ROOT / COMPOSE["x-airflow-common"]["build"]["dockerfile"]).read_text()
    assert re.search(r"^FROM apache/airflow:3\.3\.2\b", dockerfile, re.M)
    assert re.search(r"^RUN pip install .*-r /opt/airflow/requirements\.txt", dockerfile, re.M)
    assert "_PIP_ADDITIONAL_REQUIREMENTS" not in (ROOT / "docker-compose.yaml").read_text()
    data_mounts = set()
    for name in AIRFLOW_SERVICES:
        volumes = COMPOSE["services"][name].get("volumes", COMPOSE["x-airflow-common"]["volumes"])
        data_mounts |= {v for v in volumes if v.split(":")[1] == "/opt/airflow/data"}
    assert data_mounts == {"market-data:/opt/airflow/data"}
    assert "market-data" in COMPOSE["volumes"]
    paths = COMPOSE["x-airflow-common"]["environment"]
    for key in ("RAW_DATA_DIR", "CURATED_DATA_DIR", "SIGNAL_DATA_DIR", "BINANCE_BAN_DIR"):
        assert paths[key].startswith("/opt/airflow/data/"), key
