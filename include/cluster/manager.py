"""``make cluster`` / ``make cluster-stop``: the topology of ``docker-compose.yaml`` as local processes.

PostgreSQL (a throwaway cluster, run as the ``postgres`` user when we are root: ``initdb`` refuses
root), Redis (no persistence), the Binance sandbox (unless a Binance host is given), and Airflow's
``api-server``, ``scheduler``, ``dag-processor``, ``triggerer`` and N Celery workers, all bound to
127.0.0.1 on free ports, from the project's ``.venv`` and Debian's packages. Every Airflow process
gets the environment of ``include/cluster/airflow.env`` (the file ``docker-compose.yaml`` reads
too) plus the addresses of this cluster. The metadata DB is migrated and the pool and both Binance
connections exist before the scheduler starts.

State lives in one directory (``.cluster/`` by default): ``cluster.json`` holds the pid, port and
log of everything started, written after each start, so ``stop`` can end exactly those processes
and their descendants (task processes run in their own process groups), never anything by name.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterable, Mapping
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
ENV_FILE = Path(__file__).with_name("airflow.env")
STATE_FILE = "cluster.json"
COMPONENTS = ("api-server", "scheduler", "dag-processor", "triggerer")
STOP_ORDER_LAST = ("sandbox", "redis", "postgres")  # after every Airflow process


class ClusterError(RuntimeError):
    """A cluster step failed; the message names the step and the log to read."""


# -- configuration ----------------------------------------------------------------------------------


def read_env_file(path: Path = ENV_FILE) -> dict[str, str]:
    """``KEY=VALUE`` lines of ``path`` (``#`` comments and blank lines skipped), as docker compose reads them."""
    values: dict[str, str] = {}
    for number, line in enumerate(path.read_text().splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        key, sep, value = line.partition("=")
        if not sep or not key.strip():
            raise ClusterError(f"{path}:{number}: not a KEY=VALUE line: {line!r}")
        values[key.strip()] = value.strip()
    return values


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def airflow_environment(root: Path, ports: Mapping[str, int], binance_host: str, archive_host: str,
                        secrets_: Mapping[str, str], overrides: Mapping[str, str] | None = None,
                        base: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment of every Airflow process of this cluster.

    The env file's values (the pipeline's own, not Airflow's, overridable from the caller's environment:
    ``BINANCE_SYMBOLS=ETHUSDT make cluster``); then this cluster's addresses and paths; then
    ``overrides``. The caller's ``AIRFLOW*`` variables are left out: a developer's own Airflow
    settings (or the Makefile's for ``make run``) must not leak into the cluster.
    """
    base = dict(os.environ if base is None else base)
    env = {key: value for key, value in base.items() if not key.startswith("AIRFLOW")}
    for key, value in read_env_file().items():
        env[key] = value if key.startswith("AIRFLOW") else base.get(key, value)
    db = f"airflow@127.0.0.1:{ports['postgres']}/airflow"
    data = root / "data"
    env.update({
        "AIRFLOW_HOME": str(root / "airflow"),
        "AIRFLOW__CORE__DAGS_FOLDER": str(ROOT / "dags"),
        "AIRFLOW__CORE__PLUGINS_FOLDER": str(ROOT / "plugins"),
        "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": f"postgresql+psycopg2://{db}",
        "AIRFLOW__CELERY__RESULT_BACKEND": f"db+postgresql://{db}",
        "AIRFLOW__CELERY__BROKER_URL": f"redis://127.0.0.1:{ports['redis']}/0",
        "AIRFLOW__API__HOST": "127.0.0.1",
        "AIRFLOW__API__PORT": str(ports["api"]),
        "AIRFLOW__API__BASE_URL": f"http://127.0.0.1:{ports['api']}",
        "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"http://127.0.0.1:{ports['api']}/execution/",
        "AIRFLOW__API__SECRET_KEY": secrets_["api_secret_key"],
        "AIRFLOW__API_AUTH__JWT_SECRET": secrets_["jwt_secret"],
        "AIRFLOW__CORE__FERNET_KEY": secrets_["fernet_key"],
        "AIRFLOW__METRICS__STATSD_HOST": "127.0.0.1",
        "BINANCE_LIMITER_REDIS_URL": f"redis://127.0.0.1:{ports['redis']}/1",
        "RAW_DATA_DIR": str(data / "raw"),
        "CURATED_DATA_DIR": str(data / "curated"),
        "SIGNAL_DATA_DIR": str(data / "signals"),
        "BINANCE_BAN_DIR": str(data / "binance_bans"),
        "BINANCE_HOST": binance_host,
        "BINANCE_ARCHIVE_HOST": archive_host,
        "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), base.get("PYTHONPATH")) if p),
        "PATH": os.pathsep.join((str(Path(sys.executable).parent), base.get("PATH", os.defpath))),
    })
    env.update(overrides or {})
    return env


def _postgres_bin(name: str) -> str:
    found = shutil.which(name)
    if found:
        return found
    candidates = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"),
                        key=lambda p: int(Path(p).parts[-3]) if Path(p).parts[-3].isdigit() else 0)
    if not candidates:
        raise ClusterError(f"{name} not found: install PostgreSQL (apt-get install -y --no-install-recommends postgresql)")
    return candidates[-1]


# -- processes --------------------------------------------------------------------------------------


class Cluster:
    """One local cluster rooted at ``root`` (see the module docstring)."""

    def __init__(self, root: Path | str) -> None:
        self.root = Path(root).resolve()
        self.state_path = self.root / STATE_FILE

    # state -------------------------------------------------------------------------------------

    def state(self) -> dict:
        try:
            return json.loads(self.state_path.read_text())
        except FileNotFoundError:
            return {}

    def _save(self, state: dict) -> None:
        temp = self.state_path.with_suffix(".tmp")
        temp.write_text(json.dumps(state, indent=2, sort_keys=True))
        os.replace(temp, self.state_path)

    def _spawn(self, state: dict, name: str, argv: list[str], env: Mapping[str, str] | None = None,
               user: str | None = None) -> subprocess.Popen:
        log = self.root / "logs" / f"{name}.log"
        with open(log, "ab") as out:
            process = subprocess.Popen(argv, env=dict(env) if env is not None else None, stdout=out,
                                       stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=ROOT,
                                       start_new_session=True, user=user)
        state.setdefault("processes", {})[name] = {"pid": process.pid, "log": str(log), "argv": argv}
        self._save(state)
        return process

    def _wait(self, what: str, ready, process: subprocess.Popen | None, log: Path | None,
              timeout_s: float = 180.0) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if process is not None and process.poll() is not None:
                raise ClusterError(f"{what} exited with {process.returncode} during start-up; see {log}")
            try:
                if ready():
                    return
            except Exception:  # noqa: BLE001 - not up yet
                pass
            time.sleep(0.3)
        raise ClusterError(f"{what} not ready after {timeout_s:.0f} s; see {log}")

    def _run(self, what: str, argv: list[str], env: Mapping[str, str] | None = None, user: str | None = None,
             timeout_s: float = 300.0) -> None:
        log = self.root / "logs" / f"{what}.log"
        with open(log, "ab") as out:
            result = subprocess.run(argv, env=dict(env) if env is not None else None, stdout=out,
                                    stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=ROOT, user=user,
                                    timeout=timeout_s)
        if result.returncode != 0:
            raise ClusterError(f"{what} failed ({result.returncode}): {' '.join(argv)}; see {log}\n"
                               + log.read_text()[-2000:])

    # start -------------------------------------------------------------------------------------

    def start(self, *, workers: int = 2, binance_host: str | None = None, archive_host: str | None = None,
              sandbox_args: Iterable[str] = (), overrides: Mapping[str, str] | None = None,
              worker_overrides: Mapping[str, Mapping[str, str]] | None = None, pool_slots: int | None = None) -> dict:
        """Start everything; returns the state (pids, ports, urls). On failure, stops what it started."""
        if self.state().get("processes"):
            raise ClusterError(f"a cluster is already recorded in {self.state_path}: stop it first (make cluster-stop)")
        # A fresh metadata DB and broker every time (a DB that outlived its Redis leaves adopted tasks stuck
        # in queued); the data under data/ is kept: every task is a transaction over its own files.
        if self.root.exists():
            for entry in self.root.iterdir():
                if entry.name != "data":
                    shutil.rmtree(entry) if entry.is_dir() else entry.unlink()
        (self.root / "logs").mkdir(parents=True)
        started = time.monotonic()
        ports = {name: free_port() for name in ("postgres", "redis", "api", "sandbox")}
        state: dict = {"root": str(self.root), "ports": ports, "processes": {}}
        self._save(state)
        try:
            self._start_postgres(state)
            self._start_redis(state)
            if binance_host is None:
                binance_host = archive_host = self._start_sandbox(state, list(sandbox_args))
            archive_host = archive_host or os.environ.get("BINANCE_ARCHIVE_HOST", "https://data.binance.vision")
            keys = {"api_secret_key": secrets.token_urlsafe(24), "jwt_secret": secrets.token_urlsafe(24),
                    "fernet_key": _fernet_key()}
            env = airflow_environment(self.root, ports, binance_host, archive_host, keys, overrides)
            for directory in ("airflow", "data/raw", "data/curated", "data/signals", "data/binance_bans"):
                (self.root / directory).mkdir(parents=True, exist_ok=True)
            state.update(binance_host=binance_host, archive_host=archive_host,
                         api_url=f"http://127.0.0.1:{ports['api']}", env=env)
            self._save(state)
            self._run("db-migrate", ["airflow", "db", "migrate"], env)
            self._run("setup", [sys.executable, "-m", "include.cluster.setup",
                                "--pool-slots", str(pool_slots or env["BINANCE_POOL_SLOTS"])], env)
            api = self._spawn(state, "api-server", ["airflow", "api-server", "--host", "127.0.0.1", "--port",
                                                     str(ports["api"]), "--workers", "1"], env)
            self._wait("api-server", lambda: _http_ok(f"{state['api_url']}/api/v2/monitor/health"), api,
                       Path(state["processes"]["api-server"]["log"]))
            for component in COMPONENTS[1:]:
                self._spawn(state, component, ["airflow", component], env)
            for index in range(1, workers + 1):
                name = f"w{index}"
                worker_env = {**env, "AIRFLOW_WORKER_NAME": name, **(worker_overrides or {}).get(name, {})}
                self._spawn(state, f"worker-{name}", [
                    "airflow", "celery", "worker", "--celery-hostname", f"{name}@%h", "--skip-serve-logs",
                    "--pid", str(self.root / f"worker-{name}.pid"),
                    "--concurrency", worker_env["AIRFLOW__CELERY__WORKER_CONCURRENCY"],
                ], worker_env)
            self._wait_components(state)
        except BaseException:
            self.stop()
            raise
        state["boot_s"] = round(time.monotonic() - started, 1)
        self._save(state)
        return state

    def _start_postgres(self, state: dict) -> None:
        data, run = self.root / "postgres", self.root / "postgres-run"
        data.mkdir()
        run.mkdir()
        log = self.root / "logs" / "postgres.log"
        user = None
        if os.geteuid() == 0:  # initdb refuses root: the cluster belongs to the postgres user
            user = "postgres"
            for path in (data, run):
                shutil.chown(path, user=user)
        self._run("initdb", [_postgres_bin("initdb"), "-D", str(data), "-U", "airflow", "-A", "trust",
                             "-E", "UTF8", "--no-instructions"], user=user)
        port = state["ports"]["postgres"]
        process = self._spawn(state, "postgres", [
            _postgres_bin("postgres"), "-D", str(data), "-p", str(port), "-k", str(run),
            "-c", "listen_addresses=127.0.0.1", "-c", "max_connections=200",
        ], user=user)

        def ready() -> bool:
            import psycopg2

            with psycopg2.connect(host="127.0.0.1", port=port, user="airflow", dbname="postgres") as conn:
                return conn is not None

        self._wait("postgres", ready, process, log)
        import psycopg2

        conn = psycopg2.connect(host="127.0.0.1", port=port, user="airflow", dbname="postgres")
        conn.autocommit = True
        with conn.cursor() as cursor:
            cursor.execute("CREATE DATABASE airflow")
        conn.close()

    def _start_redis(self, state: dict) -> None:
        if not shutil.which("redis-server"):
            raise ClusterError("redis-server not found: apt-get install -y --no-install-recommends redis-server")
        port = state["ports"]["redis"]
        (self.root / "redis").mkdir()
        process = self._spawn(state, "redis", [
            "redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
            "--daemonize", "no", "--dir", str(self.root / "redis"),
        ])

        def ready() -> bool:
            with socket.create_connection(("127.0.0.1", port), timeout=1) as conn:
                conn.sendall(b"PING\r\n")
                return conn.recv(16).startswith(b"+PONG")

        self._wait("redis", ready, process, Path(state["processes"]["redis"]["log"]))

    def _start_sandbox(self, state: dict, args: list[str]) -> str:
        port = state["ports"]["sandbox"]
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        process = self._spawn(state, "sandbox", [sys.executable, "-m", "include.binance_sandbox",
                                                 "--host", "127.0.0.1", "--port", str(port), *args], env)
        url = f"http://127.0.0.1:{port}"
        self._wait("sandbox", lambda: _http_ok(f"{url}/api/v3/ping"), process,
                   Path(state["processes"]["sandbox"]["log"]))
        return url

    def _wait_components(self, state: dict) -> None:
        """Every component is up: the scheduler, dag-processor and triggerer heartbeat (their jobs
        are running in the DB) and each worker answers a Celery ping."""
        env = state["env"]
        names = [name for name in state["processes"] if name.startswith("worker-")]
        probe = [sys.executable, "-m", "include.cluster.setup", "--check",
                 *[f"--worker={name.removeprefix('worker-')}" for name in names]]

        def ready() -> bool:
            for name in (*COMPONENTS[1:], *names):
                pid = state["processes"][name]["pid"]
                if not _alive(pid):
                    raise ClusterError(f"{name} exited during start-up; see {state['processes'][name]['log']}")
            return subprocess.run(probe, env=env, cwd=ROOT, capture_output=True, timeout=60).returncode == 0

        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:
            if ready():
                return
            time.sleep(1.0)
        raise ClusterError(f"cluster components not all up after 240 s; logs in {self.root / 'logs'}")

    # stop --------------------------------------------------------------------------------------

    def stop(self, timeout_s: float = 20.0) -> list[str]:
        """Stop every recorded process and its descendants: the Airflow processes together, then the
        sandbox, Redis and PostgreSQL (SIGTERM, SIGINT for PostgreSQL's fast shutdown; SIGKILL after
        ``timeout_s``)."""
        state = self.state()
        processes = state.get("processes", {})
        airflow = [name for name in processes if name not in STOP_ORDER_LAST]
        services = [name for name in STOP_ORDER_LAST if name in processes]
        stopped = []
        for group in (airflow, services):
            trees = {name: descendants(processes[name]["pid"]) for name in group}
            for name, tree in trees.items():
                _signal_tree(tree, signal.SIGINT if name == "postgres" else signal.SIGTERM)
            _reap([process for tree in trees.values() for process in tree], timeout_s)
            stopped += [name for name, tree in trees.items() if tree]
        if state:
            state["processes"] = {}
            self._save(state)
        return stopped


def _alive(pid: int) -> bool:
    import psutil

    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def descendants(pid: int) -> list:
    """``pid`` and every process below it (psutil objects), collected before anything is signalled:
    a child whose parent died is re-parented and could no longer be found from it."""
    import psutil

    try:
        root = psutil.Process(pid)
        return [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def _signal_tree(tree: list, first_signal: int) -> None:
    import psutil

    for index, process in enumerate(tree):
        try:
            process.send_signal(first_signal if index == 0 else signal.SIGTERM)
        except psutil.NoSuchProcess:
            pass


def _reap(processes: list, timeout_s: float) -> None:
    """Wait for ``processes`` to exit; SIGKILL whatever is left after ``timeout_s``."""
    import psutil

    _, alive = psutil.wait_procs(processes, timeout=timeout_s)
    for process in alive:
        try:
            process.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(alive, timeout=5)


def kill_tree(pid: int) -> int:
    """SIGKILL ``pid`` and all its descendants at once (a machine lost); returns how many."""
    tree = descendants(pid)
    for process in tree:
        try:
            process.kill()
        except Exception:  # noqa: BLE001 - already gone
            pass
    _reap(tree, 5)
    return len(tree)


def _http_ok(url: str) -> bool:
    with urllib.request.urlopen(url, timeout=2) as response:
        return response.status == 200


def _fernet_key() -> str:
    from cryptography.fernet import Fernet

    return Fernet.generate_key().decode()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m include.cluster", description=__doc__.split("\n\n")[0])
    parser.add_argument("command", choices=("start", "stop", "status"))
    parser.add_argument("--dir", default=str(ROOT / ".cluster"), help="state directory (default .cluster/)")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--binance-host", default=os.environ.get("BINANCE_HOST") or None,
                        help="real Binance (or another stand-in) instead of the local sandbox")
    parser.add_argument("--sandbox-arg", action="append", default=[], help="extra argument for the sandbox")
    args = parser.parse_args(argv)
    cluster = Cluster(args.dir)
    if args.command == "stop":
        stopped = cluster.stop()
        print(f"stopped: {', '.join(stopped) or 'nothing was running'}")
        return 0
    if args.command == "status":
        state = cluster.state()
        for name, process in state.get("processes", {}).items():
            print(f"{name:14} pid {process['pid']:>7} {'up' if _alive(process['pid']) else 'DOWN'}  {process['log']}")
        return 0
    try:
        state = cluster.start(workers=args.workers, binance_host=args.binance_host, sandbox_args=args.sandbox_arg)
    except ClusterError as error:
        print(f"make cluster: {error}", file=sys.stderr)
        return 1
    ports = state["ports"]
    print(f"cluster up in {state['boot_s']} s: Airflow UI {state['api_url']} (user admin, password in "
          f"{Path(args.dir) / 'airflow' / 'simple_auth_manager_passwords.json.generated'}), "
          f"PostgreSQL 127.0.0.1:{ports['postgres']}, Redis 127.0.0.1:{ports['redis']}, Binance {state['binance_host']}; "
          f"{args.workers} Celery workers; logs in {Path(args.dir) / 'logs'}; stop with make cluster-stop")
    return 0
