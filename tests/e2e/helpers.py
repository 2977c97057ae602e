"""Shared by the end-to-end tests: processes we start and stop by process group, the Airflow CLI,
``airflow standalone`` in a temporary AIRFLOW_HOME with its REST API v2 client, StatsD capture, and
the checks of stored data against the sandbox's truth."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path
from urllib.parse import quote

import psutil
import pytest
import requests

ROOT = Path(__file__).resolve().parents[2]
VENV_BIN = Path(sys.executable).parent
ARTIFACTS = Path(__file__).resolve().parent / "artifacts"  # screenshots (git-ignored)

# The cure for the start-up race, exported by the Makefile for `make run` / `make demo` exactly so.
# `airflow standalone` starts the scheduler, dag-processor, api-server and triggerer at once; the
# scheduler hands out due task instances before the api-server answers, and each task's first call
# (PATCH /execution/task-instances/<id>/run) gave up after Airflow's default 5 attempts (4-15 s of
# random back-off) with httpx.ConnectError / ReadTimeout: a failed try. With these, a task keeps
# calling every 5-10 s for at least 2 minutes (at most 4) before its try can fail.
EXECUTION_API_RETRY_ENV = {
    "AIRFLOW__WORKERS__EXECUTION_API_RETRIES": "25",
    "AIRFLOW__WORKERS__EXECUTION_API_RETRY_WAIT_MIN": "5",
    "AIRFLOW__WORKERS__EXECUTION_API_RETRY_WAIT_MAX": "10",
}


TERMINAL_RUN_STATES = {"success", "failed"}
UNHEALTHY_FOR = 120  # seconds a component may report unhealthy before a wait gives up
FAILED_TRY_STATES = {"failed", "up_for_retry", "upstream_failed"}


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def log_tail(path: Path, lines: int = 60) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError as exc:
        return f"(no log at {path}: {exc})"


# --- processes --------------------------------------------------------------------------------


class ProcessGroup:
    """A command started as the leader of its own process group, stopped with every process it
    started: the group gets SIGTERM, then SIGKILL after ``grace`` seconds; descendants that left the
    group (Airflow puts each task runner in a group of its own) are stopped by pid the same way."""

    def __init__(self, args: list[str], *, env: dict, log_path: Path, cwd: Path = ROOT):
        self.log_path = log_path
        self._log = open(log_path, "ab")
        try:
            self.proc = subprocess.Popen(args, env=env, cwd=cwd, stdin=subprocess.DEVNULL, stdout=self._log,
                                         stderr=subprocess.STDOUT, start_new_session=True)
        except BaseException:
            self._log.close()
            raise
        self.pgid = self.proc.pid  # start_new_session: the child leads a new group, pgid == pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def _tree(self) -> list[psutil.Process]:
        try:
            leader = psutil.Process(self.proc.pid)
            return [leader, *leader.children(recursive=True)]
        except psutil.NoSuchProcess:
            return []

    def _group_alive(self) -> bool:
        try:
            os.killpg(self.pgid, 0)
            return True
        except ProcessLookupError:
            return False
        except PermissionError:
            return True

    def _signal_group(self, sig: int) -> None:
        try:
            os.killpg(self.pgid, sig)
        except ProcessLookupError:
            pass

    def stop(self, grace: float = 30.0) -> None:
        tree = self._tree()  # snapshot first: once the leader is gone, its children are unreachable
        self._signal_group(signal.SIGTERM)
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline:
            self.proc.poll()  # reap the leader (a zombie still counts as a group member)
            if not self._group_alive() and not any(_running(p) for p in tree):
                break
            time.sleep(0.25)
        self._signal_group(signal.SIGKILL)
        for process in tree:
            try:
                if process.is_running():  # is_running() also checks the pid was not reused
                    process.kill()
            except psutil.NoSuchProcess:
                pass
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass
        psutil.wait_procs(tree, timeout=5)
        self._log.close()


def _running(process: psutil.Process) -> bool:
    try:
        return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def run_airflow(args: list[str], *, env: dict, timeout: float = 300, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    """``airflow <args>`` in its own process group, killed whole if it outlives ``timeout``."""
    proc = subprocess.Popen([str(VENV_BIN / "airflow"), *args], env=env, cwd=cwd, stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except BaseException:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.communicate()
        raise
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def run_cli(args: list[str], *, env: dict, timeout: float = 300, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    """As :func:`run_airflow`; fails the test unless it exits 0."""
    result = run_airflow(args, env=env, timeout=timeout, cwd=cwd)
    assert result.returncode == 0, (f"airflow {' '.join(args)} exited {result.returncode}:\n"
                                    f"{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    return result


# --- StatsD -----------------------------------------------------------------------------------


class StatsdListener:
    """Collects StatsD lines sent to 127.0.0.1:<port> until stopped."""

    def __init__(self) -> None:
        self.socket = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.socket.bind(("127.0.0.1", 0))
        self.socket.settimeout(0.2)
        self.port = self.socket.getsockname()[1]
        self.lines: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                packet = self.socket.recv(65536)
            except socket.timeout:
                continue
            self.lines.extend(packet.decode(errors="replace").splitlines())

    def names(self) -> set[str]:
        """Metric names seen, without InfluxDB-style tags (``name,tag=value:1|c``)."""
        return {line.split(":", 1)[0].split(",", 1)[0] for line in list(self.lines)}

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self.socket.close()


# --- stored data against the sandbox --------------------------------------------------------


def stored_rows(raw_dir: str, interval: str, symbol: str, start_ms: int, end_ms: int) -> list[list]:
    """Raw rows of ``[start_ms, end_ms)`` as Binance's 12 fields (8 decimal places, as the sandbox serves them)."""
    from include.market_data.schema import table_to_rows
    from include.market_data.storage import RawStore

    return table_to_rows(RawStore(raw_dir).read(interval, symbol, start_ms, end_ms), 8)


def assert_raw_equals_truth(sandbox, raw_dir: str, interval: str, symbol: str, start_ms: int, end_ms: int) -> list:
    """The day files touching ``[start_ms, end_ms)`` hold exactly the sandbox's closed candles of that
    window: every candle, each field exact, and nothing else on those days. Returns the truth."""
    from include.market_data.timeframes import DAY_MS, day_start_ms

    truth = sandbox.truth(symbol, interval, start_ms, end_ms)
    assert truth, f"the sandbox has no {symbol} {interval} candles in the window"
    days_start, days_end = day_start_ms(start_ms), day_start_ms(end_ms - 1) + DAY_MS
    stored = stored_rows(raw_dir, interval, symbol, days_start, days_end)
    assert stored == truth, (f"{interval}: {len(stored)} stored rows vs {len(truth)} in the sandbox; first "
                             f"difference at {next((i for i, (a, b) in enumerate(zip(stored, truth)) if a != b), None)}")
    return truth


def assert_curated_equals_reference(settings, interval: str, symbol: str, start_ms: int, end_ms: int) -> None:
    """The curated rows of ``[start_ms, end_ms)`` equal DESIGN's features recomputed independently
    (tests/market_data's reference implementation) over the whole raw series the DAGs stored."""
    import pandas as pd
    import pyarrow as pa
    import pyarrow.compute as pc

    from include.market_data.curation import DataCuration
    from include.market_data.storage import RawStore
    from tests.market_data.test_curation import PRICE_COLUMNS, assert_same_features, reference_features

    raw = RawStore(settings.raw_data_dir)
    table = raw.read_days(interval, symbol, raw.days(interval, symbol)).sort_by("open_time")
    series = pd.DataFrame({"open_time": table.column("open_time").to_pandas(),
                           **{name: pc.cast(table.column(name), pa.float64()).to_numpy() for name in PRICE_COLUMNS}})
    want = reference_features(series, interval)
    lo, hi = pd.Timestamp(start_ms, unit="ms", tz="UTC"), pd.Timestamp(end_ms, unit="ms", tz="UTC")
    want = want[(want.open_time >= lo) & (want.open_time < hi)].reset_index(drop=True)
    got = DataCuration(settings).read(interval, symbol, start_ms, end_ms).reset_index(drop=True)
    assert_same_features(got, want)


# --- airflow standalone and its REST API v2 -----------------------------------------------------


class AirflowApi:
    """The public REST API v2 with a bearer token from ``POST /auth/token``."""

    def __init__(self, base_url: str, username: str, password: str):
        self.base_url = base_url
        self.session = requests.Session()
        response = self.session.post(f"{base_url}/auth/token", json={"username": username, "password": password},
                                     timeout=30)
        assert response.status_code == 201, f"POST /auth/token: {response.status_code} {response.text[:500]}"
        self.session.headers["Authorization"] = f"Bearer {response.json()['access_token']}"

    def request(self, method: str, path: str, expect: tuple[int, ...] = (200,), **kwargs) -> requests.Response:
        # On SQLite under load the api-server answers 500 "Database error" (database is locked) now
        # and then: a request is sent again a few times (a trigger carries its own run id, so a
        # repeated one cannot create a second run).
        for wait in (2, 4, 8, 8, None):
            response = self.session.request(method, f"{self.base_url}/api/v2{path}", timeout=60, **kwargs)
            if response.status_code < 500 or wait is None:
                break
            time.sleep(wait)
        assert response.status_code in expect, f"{method} {path}: {response.status_code} {response.text[:1000]}"
        return response

    def get(self, path: str, **params) -> dict:
        return self.request("GET", path, params=params or None).json()

    def paged(self, path: str, key: str, **params) -> list[dict]:
        """Every item of a list endpoint (the API caps a page at 100)."""
        items: list[dict] = []
        while True:
            page = self.get(path, limit=100, offset=len(items), **params)
            items.extend(page[key])
            if not page[key] or len(items) >= page["total_entries"]:
                return items

    def trigger(self, dag_id: str, conf: dict | None = None, *, logical_date: str | None = None,
                data_interval: tuple[str, str] | None = None) -> dict:
        run_id = f"e2e__{uuid.uuid4().hex[:12]}"
        body: dict = {"dag_run_id": run_id, "logical_date": logical_date, "conf": conf or {}}
        if data_interval:
            body["data_interval_start"], body["data_interval_end"] = data_interval
        response = self.request("POST", f"/dags/{dag_id}/dagRuns", expect=(200, 409), json=body)
        return response.json() if response.status_code == 200 else self.run(dag_id, run_id)  # 409: a repeat

    def run(self, dag_id: str, run_id: str) -> dict:
        return self.get(f"/dags/{dag_id}/dagRuns/{quote(run_id, safe='')}")

    def runs(self, dag_id: str, **params) -> list[dict]:
        return self.paged(f"/dags/{dag_id}/dagRuns", "dag_runs", **params)

    def task_instances(self, dag_id: str = "~", run_id: str = "~") -> list[dict]:
        return self.paged(f"/dags/{dag_id}/dagRuns/{quote(run_id, safe='~')}/taskInstances", "task_instances")

    def tries(self, ti: dict) -> list[dict]:
        path = f"/dags/{ti['dag_id']}/dagRuns/{quote(ti['dag_run_id'], safe='')}/taskInstances/{ti['task_id']}"
        if ti["map_index"] >= 0:
            path += f"/{ti['map_index']}"
        return self.get(path + "/tries")["task_instances"]

    def describe(self, dag_id: str, run_id: str) -> str:
        return ", ".join(f"{ti['task_id']}[{ti['map_index']}]={ti['state']}"
                         for ti in self.task_instances(dag_id, run_id))

    def wait_for_runs(self, dag_id: str, run_ids: list[str], timeout: float) -> dict[str, dict]:
        """Poll until every run is success or failed; fails the test (naming each task's state) on timeout."""
        deadline = time.monotonic() + timeout
        done: dict[str, dict] = {}
        sick_since = None
        while True:
            for run_id in run_ids:
                if run_id not in done:
                    run = self.run(dag_id, run_id)
                    if run["state"] in TERMINAL_RUN_STATES:
                        done[run_id] = run
            if len(done) == len(run_ids):
                return done
            # A crashed component (standalone runs on without it) would leave the runs waiting for ever;
            # on a loaded machine a heartbeat may lag past the health threshold for a while.
            sick = {name: part for name, part in self.get("/monitor/health").items() if part.get("status") != "healthy"}
            sick_since = (sick_since or time.monotonic()) if sick else None
            if sick and time.monotonic() - sick_since > UNHEALTHY_FOR:
                pytest.fail(f"waiting for {dag_id}: components unhealthy for {UNHEALTHY_FOR} s: {sick}")
            if time.monotonic() > deadline:
                waiting = [r for r in run_ids if r not in done]
                pytest.fail(f"{dag_id}: {len(waiting)} run(s) not finished after {timeout:.0f} s: "
                            + "; ".join(f"{r}: {self.describe(dag_id, r)}" for r in waiting[:3]))
            time.sleep(2)

    def wait_for_success(self, dag_id: str, run_id: str, timeout: float = 300) -> dict:
        run = self.wait_for_runs(dag_id, [run_id], timeout)[run_id]
        assert run["state"] == "success", f"{dag_id} {run_id}: {run['state']}; {self.describe(dag_id, run_id)}"
        return run

    def failed_tries(self) -> list[str]:
        """Every try of every task instance of the instance (start-up runs included) that failed or
        was retried, as '<dag>/<run>/<task>[<map>] try <n>: <state>'; empty when none did."""
        found = []
        for ti in self.task_instances():
            name = f"{ti['dag_id']}/{ti['dag_run_id']}/{ti['task_id']}[{ti['map_index']}]"
            if ti["try_number"] > 1:  # we never clear: a second try means the first one failed
                found.append(f"{name} is on try {ti['try_number']}")
            if ti["try_number"] == 0:
                continue  # not started yet: no tries recorded
            for attempt in self.tries(ti):
                if attempt["state"] in FAILED_TRY_STATES:
                    found.append(f"{name} try {attempt['try_number']}: {attempt['state']}")
        return found


@dataclasses.dataclass
class Standalone:
    """`airflow standalone` as `make demo` runs it, in a temporary AIRFLOW_HOME on free ports, against the
    sandbox; the Makefile's environment plus: free ports, the data dirs and the connections in ``home``."""

    home: Path
    sandbox_url: str
    statsd: StatsdListener
    port: int = dataclasses.field(default_factory=free_port)
    log_ports: tuple[int, int] = dataclasses.field(default_factory=lambda: (free_port(), free_port()))
    process: ProcessGroup | None = None
    api: AirflowApi | None = None

    @property
    def url(self) -> str:
        return f"http://localhost:{self.port}"

    @property
    def log_path(self) -> Path:
        return self.home / "standalone.log"

    @property
    def data(self) -> Path:
        return self.home / "data"

    @property
    def settings(self):
        from include.market_data.config import load_settings

        return dataclasses.replace(load_settings(), raw_data_dir=str(self.data / "raw"),
                                   curated_data_dir=str(self.data / "curated"),
                                   signal_data_dir=str(self.data / "signals"))

    @property
    def password(self) -> str:
        return json.loads((self.home / "simple_auth_manager_passwords.json.generated").read_text())["admin"]

    def env(self) -> dict:
        env = {k: v for k, v in os.environ.items()
               if not k.startswith(("AIRFLOW", "BINANCE_")) and k not in ("RAW_DATA_DIR", "CURATED_DATA_DIR",
                                                                          "SIGNAL_DATA_DIR", "PYTHONPATH")}
        connection = json.dumps({"conn_type": "http", "host": self.sandbox_url})
        env.update({
            # as the Makefile exports them for make run (AIRFLOW_PORT=<port>)
            "AIRFLOW_HOME": str(self.home),
            "AIRFLOW__CORE__DAGS_FOLDER": str(ROOT / "dags"),
            "AIRFLOW__CORE__PLUGINS_FOLDER": str(ROOT / "plugins"),
            "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
            "AIRFLOW__CORE__PARALLELISM": "4",
            "AIRFLOW__API__PORT": str(self.port),
            "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"http://localhost:{self.port}/execution/",
            **EXECUTION_API_RETRY_ENV,
            "AIRFLOW__METRICS__STATSD_ON": "True",
            "AIRFLOW__METRICS__STATSD_HOST": "127.0.0.1",
            "AIRFLOW__METRICS__STATSD_PORT": str(self.statsd.port),
            "AIRFLOW__METRICS__LEGACY_NAMES_ON": "False",
            "AIRFLOW__METRICS__STATSD_INFLUXDB_ENABLED": "True",
            "AIRFLOW__LOGGING__LOGGING_LEVEL": "INFO",
            "PYTHONPATH": str(ROOT),
            "PATH": os.pathsep.join([str(VENV_BIN), os.environ.get("PATH", "")]),
            # as make demo: DAGs run at once, both connections on the sandbox
            "AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION": "False",
            "AIRFLOW_CONN_BINANCE_DEFAULT": connection,
            "AIRFLOW_CONN_BINANCE_ARCHIVE": connection,
            # this test's own: the log servers off their fixed ports 8793/8794, data and bans in the home
            "AIRFLOW__LOGGING__WORKER_LOG_SERVER_PORT": str(self.log_ports[0]),
            "AIRFLOW__LOGGING__TRIGGER_LOG_SERVER_PORT": str(self.log_ports[1]),
            "RAW_DATA_DIR": str(self.data / "raw"),
            "CURATED_DATA_DIR": str(self.data / "curated"),
            "SIGNAL_DATA_DIR": str(self.data / "signals"),
            "BINANCE_BAN_DIR": str(self.home / "binance_bans"),
        })
        return env

    def start(self, healthy_within: float = 240) -> None:
        env = self.env()
        self.data.mkdir(parents=True, exist_ok=True)
        # make airflow-setup: the metadata DB and the pool, before the scheduler starts
        run_cli(["db", "migrate"], env=env)
        run_cli(["pools", "set", "binance_api", "4", "Binance REST (every task calling Binance)"], env=env)
        # The DAGs already in the DB, unpaused, as on a second `make demo`: the scheduler creates
        # their due runs and hands out their first tasks in its first loop, seconds before the
        # api-server answers - the start-up race's setting in every run (without the retry settings
        # above, some of those first tries failed in about half the runs on this loaded machine).
        run_cli(["dags", "reserialize"], env=env)
        self.process = ProcessGroup([str(VENV_BIN / "airflow"), "standalone"], env=env, log_path=self.log_path)
        deadline = time.monotonic() + healthy_within
        while True:
            if not self.process.alive():
                pytest.fail(f"airflow standalone exited {self.process.proc.returncode}:\n{log_tail(self.log_path)}")
            try:
                health = requests.get(f"{self.url}/api/v2/monitor/health", timeout=5)
                if health.status_code == 200 and all(
                        part.get("status") == "healthy" for part in health.json().values()):
                    break
            except requests.RequestException:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"airflow standalone not healthy after {healthy_within:.0f} s:\n{log_tail(self.log_path)}")
            time.sleep(1)
        self.api = AirflowApi(self.url, "admin", self.password)

    def stop(self) -> None:
        if self.process is not None:
            self.process.stop()

