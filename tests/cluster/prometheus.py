"""Real Prometheus (Debian's 2.42, ``/usr/bin/prometheus``) for the metrics-chain tests, and the
dashboard's PromQL evaluated by it.

* :func:`start` runs Prometheus on a free ``127.0.0.1`` port with a config generated from
  ``include/prometheus/prometheus.yml`` (same jobs, job names and target labels; the ``airflow-statsd``
  job pointed at the given StatsD target, everything scraped and every rule evaluated each second,
  ``rule_files`` = ``include/prometheus/alerts.yml``) and its TSDB in a temporary directory; stopped
  by its pid.
* :func:`query` runs one instant query.
* :func:`dashboard_expressions` lists every PromQL ``expr`` of
  ``include/grafana/dashboards/market_data.json`` with Grafana's variables resolved, and
  :func:`evaluate_dashboard` evaluates each one: ``{expr: number of series returned}``.
* :func:`start_chain` starts the whole chain for a test that runs Airflow: the StatsD stand-in
  (tests/cluster/statsd_standin.py) and Prometheus scraping it; its ``airflow_env`` are the settings
  every Airflow process needs, and its ``evaluate_dashboard()`` evaluates the dashboard over
  everything since the chain started.
"""

from __future__ import annotations

import json
import math
import re
import shutil
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]
PROMETHEUS_CONFIG = ROOT / "include" / "prometheus" / "prometheus.yml"
ALERTS = ROOT / "include" / "prometheus" / "alerts.yml"
DASHBOARD = ROOT / "include" / "grafana" / "dashboards" / "market_data.json"
PROMETHEUS_BIN = shutil.which("prometheus") or "/usr/bin/prometheus"
PROMTOOL_BIN = shutil.which("promtool") or "/usr/bin/promtool"
STATSD_JOB = "airflow-statsd"  # the job of include/prometheus/prometheus.yml that scrapes statsd-exporter
SELF_JOB = "prometheus"


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def local_config(statsd_target: str, self_target: str, *, interval: str = "1s",
                rule_files: tuple[Path, ...] = (ALERTS,)) -> dict:
    """include/prometheus/prometheus.yml with local targets, ``interval`` for scrapes and rule
    evaluation, and absolute ``rule_files``."""
    config = yaml.safe_load(PROMETHEUS_CONFIG.read_text())
    config["global"].update(scrape_interval=interval, evaluation_interval=interval, scrape_timeout=interval)
    config["rule_files"] = [str(Path(p).resolve()) for p in rule_files]
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    for name, target in ((STATSD_JOB, statsd_target), (SELF_JOB, self_target)):
        jobs[name]["static_configs"] = [dict(sc, targets=[target]) for sc in jobs[name]["static_configs"]]
    return config


@dataclass
class Prometheus:
    process: subprocess.Popen
    port: int
    workdir: Path
    config_path: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def query(self, expr: str, at: float | None = None) -> list[dict]:
        return query(self.url, expr, at)

    def stop(self, timeout: float = 20) -> None:
        if self.process.poll() is None:
            self.process.terminate()  # SIGTERM to this pid only
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout)
        if self.log.exists() and self.process.returncode not in (0, None):
            print(self.log.read_text()[-4000:])

    @property
    def log(self) -> Path:
        return self.workdir / "prometheus.log"

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()


def start(statsd_target: str, workdir: Path | None = None, *, interval: str = "1s",
          rule_files: tuple[Path, ...] = (ALERTS,), timeout: float = 60) -> Prometheus:
    """Start Prometheus scraping ``statsd_target`` (``host:port``) and wait until it is ready."""
    workdir = Path(workdir or tempfile.mkdtemp(prefix="osm-prometheus-"))
    workdir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    config_path = workdir / "prometheus.yml"
    config_path.write_text(yaml.safe_dump(local_config(statsd_target, f"127.0.0.1:{port}", interval=interval,
                                                      rule_files=rule_files), sort_keys=False))
    log = (workdir / "prometheus.log").open("w")
    process = subprocess.Popen(
        [PROMETHEUS_BIN, f"--config.file={config_path}", f"--storage.tsdb.path={workdir / 'tsdb'}",
         f"--web.listen-address=127.0.0.1:{port}", "--storage.tsdb.retention.time=1d", "--log.level=warn"],
        stdout=log, stderr=subprocess.STDOUT, cwd=workdir)
    log.close()
    prom = Prometheus(process, port, workdir, config_path)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"prometheus exited with {process.returncode}: {prom.log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(f"{prom.url}/-/ready", timeout=2) as response:
                if response.status == 200:
                    return prom
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        time.sleep(0.2)
    prom.stop()
    raise RuntimeError(f"prometheus not ready after {timeout} s: {prom.log.read_text()[-3000:]}")


def api(prom_url: str, path: str, **params) -> dict:
    """``GET /api/v1/<path>``; the ``data`` of a successful answer, else RuntimeError with Prometheus' error."""
    url = f"{prom_url}/api/v1/{path}"
    if params:
        url += "?" + urllib.parse.urlencode({k: v for k, v in params.items() if v is not None})
    try:
        with urllib.request.urlopen(url, timeout=30) as response:
            body = json.load(response)
    except urllib.error.HTTPError as err:
        body = json.load(err)
    if body.get("status") != "success":
        raise RuntimeError(f"{path} {params}: {body.get('errorType')}: {body.get('error')}")
    return body["data"]


def query(prom_url: str, expr: str, at: float | None = None) -> list[dict]:
    """Instant query: ``[{"metric": {labels}, "value": float}, ...]`` (a scalar is one labelless row)."""
    data = api(prom_url, "query", query=expr, time=at)
    if data["resultType"] in ("scalar", "string"):
        return [{"metric": {}, "value": float(data["result"][1])}]
    if data["resultType"] == "matrix":
        return [{"metric": r["metric"], "value": float(r["values"][-1][1])} for r in data["result"]]
    return [{"metric": r["metric"], "value": float(r["value"][1])} for r in data["result"]]


# -- the dashboard ---------------------------------------------------------------------------------

_DURATION = re.compile(r"(\d+)(ms|s|m|h|d|w|y)")
_UNIT_S = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800, "y": 31536000}


def _seconds(duration: str) -> float:
    parts = _DURATION.findall(duration)
    if not parts or "".join(n + u for n, u in parts) != duration:
        raise ValueError(f"not a duration: {duration!r}")
    return sum(int(n) * _UNIT_S[u] for n, u in parts)


def _panels(dashboard: dict):
    for panel in dashboard["panels"]:
        yield panel
        yield from panel.get("panels", [])


def _variable_values(dashboard: dict, overrides: dict[str, str]) -> dict[str, str]:
    """Each template variable as Grafana interpolates it into a Prometheus query."""
    values = {}
    for var in dashboard.get("templating", {}).get("list", []):
        name = var["name"]
        if name in overrides:
            values[name] = overrides[name]
            continue
        current = (var.get("current") or {}).get("value", var.get("query", ""))
        selected = current if isinstance(current, list) else [current]
        if "$__all" in selected:
            options = [o["value"] for o in var.get("options", []) if o["value"] != "$__all"]
            values[name] = var.get("allValue") or "(" + "|".join(options) + ")"
        elif len(selected) > 1:
            values[name] = "(" + "|".join(selected) + ")"
        else:
            values[name] = str(selected[0])
    return values


def _interpolate(expr: str, values: dict[str, str]) -> str:
    def sub(m):
        name = m.group(1) or m.group(2) or m.group(3)
        if name not in values:
            raise KeyError(f"unknown dashboard variable ${name} in {expr}")
        return values[name]

    return re.sub(r"\$\{(\w+)(?::\w+)?\}|\[\[(\w+)\]\]|\$(\w+)", sub, expr)


def dashboard_queries(window: str = "15m", range_: str | None = None, variables: dict[str, str] | None = None,
                      dashboard: Path = DASHBOARD) -> list[tuple[str, str, str]]:
    """(panel title, refId, expr) for every target of the dashboard, variables resolved:

    * the dashboard's own variables take their saved value (``interval``: All, its ``allValue``
      ``.*``; ``pool``: ``binance_api``), or the one given in ``variables``;
    * ``$__interval`` and ``$__rate_interval``: ``window``, or the panel's minimum interval when that
      is longer (Grafana never goes below it); ``$__range``: ``range_`` (default ``window``); the
      ``_s`` / ``_ms`` forms in seconds / milliseconds.
    """
    board = json.loads(Path(dashboard).read_text())
    own = _variable_values(board, variables or {})
    out = []
    for panel in _panels(board):
        step = window
        if panel.get("interval") and _seconds(panel["interval"]) > _seconds(window):
            step = panel["interval"]
        rng = range_ or window
        builtins = {"__interval": step, "__rate_interval": step, "__range": rng,
                    "__interval_ms": str(int(_seconds(step) * 1000)), "__range_s": str(int(_seconds(rng))),
                    "__range_ms": str(int(_seconds(rng) * 1000))}
        for target in panel.get("targets", []):
            if target.get("expr"):
                out.append((panel.get("title", ""), target.get("refId", ""),
                            _interpolate(target["expr"], {**own, **builtins})))
    return out


def dashboard_expressions(window: str = "15m", range_: str | None = None,
                          variables: dict[str, str] | None = None) -> list[str]:
    """Every PromQL expression of the dashboard, in panel order, variables resolved (see
    :func:`dashboard_queries`)."""
    return [expr for _, _, expr in dashboard_queries(window, range_, variables)]


_FALLBACK = re.compile(r"\s+or\s+vector\(\s*[0-9.eE+\-*/ ]+\)")


def without_fallback(expr: str) -> str:
    """``expr`` without its ``or vector(<constant>)`` fallbacks (which make a panel show 0 instead of
    "No data"): what is left returns data only if the metrics it reads exist."""
    stripped = _FALLBACK.sub("", expr)
    return stripped if stripped.strip() else expr


def evaluate_dashboard(prom_url: str, *, window: str = "15m", range_: str | None = None, at: float | None = None,
                       variables: dict[str, str] | None = None, strict: bool = False) -> dict[str, int]:
    """``{expr: number of series}`` for every expression of :func:`dashboard_expressions`, evaluated by
    the Prometheus at ``prom_url`` (an instant query at ``at``, default now).

    As Grafana runs them by default; ``strict`` evaluates each without its ``or vector(0)``
    fallbacks, so a stat panel counts only if its metric really arrived (the keys stay the
    dashboard's expressions). Pick ``window`` (the range of ``rate`` / ``increase``) to cover the
    run being checked. A constant expression (``vector(6000)``, the weight-limit line) reads no
    metric and always has one series.
    """
    results = {}
    for expr in dashboard_expressions(window, range_, variables):
        results[expr] = len(query(prom_url, without_fallback(expr) if strict else expr, at))
    return results


# -- the whole chain, for a test that runs Airflow ---------------------------------------------------

@dataclass
class MetricsChain:
    """The StatsD stand-in and Prometheus scraping it (stop() stops both, by pid)."""

    standin: object  # tests.cluster.statsd_standin.StandIn
    prometheus: Prometheus
    started: float

    @property
    def airflow_env(self) -> dict[str, str]:
        """What every Airflow process (scheduler, dag-processor, triggerer, workers, api-server) must
        run with for its metrics to come through the mapping: StatsD to the stand-in, bare names,
        variables as InfluxDB-style tags."""
        return {"AIRFLOW__METRICS__STATSD_ON": "True",
                "AIRFLOW__METRICS__STATSD_HOST": self.standin.host,
                "AIRFLOW__METRICS__STATSD_PORT": str(self.standin.udp_port),
                "AIRFLOW__METRICS__STATSD_PREFIX": "airflow",
                "AIRFLOW__METRICS__LEGACY_NAMES_ON": "False",
                "AIRFLOW__METRICS__STATSD_INFLUXDB_ENABLED": "True"}

    @property
    def url(self) -> str:
        return self.prometheus.url

    def query(self, expr: str, at: float | None = None) -> list[dict]:
        return query(self.prometheus.url, expr, at)

    def since_start(self) -> str:
        """A PromQL range covering everything since the chain started (whole minutes, one more)."""
        return f"{math.ceil((time.time() - self.started) / 60) + 1}m"

    def evaluate_dashboard(self, *, window: str | None = None, strict: bool = False, **kwargs) -> dict[str, int]:
        """:func:`evaluate_dashboard` now, ``rate`` / ``increase`` / ``$__range`` over everything
        since the chain started unless ``window`` is given."""
        return evaluate_dashboard(self.prometheus.url, window=window or self.since_start(), strict=strict, **kwargs)

    def stop(self) -> None:
        try:
            self.prometheus.stop()
        finally:
            self.standin.stop()


def start_chain(workdir: Path, mapping: Path | None = None) -> MetricsChain:
    """Start the stand-in (free UDP and HTTP ports on 127.0.0.1, ``mapping`` defaulting to
    include/statsd/mapping.yml) and Prometheus (its TSDB under ``workdir``) scraping it every second."""
    from tests.cluster import statsd_standin

    standin = statsd_standin.start(mapping or statsd_standin.MAPPING)
    try:
        prometheus = start(standin.target, Path(workdir) / "prometheus")
    except BaseException:
        standin.stop()
        raise
    return MetricsChain(standin, prometheus, time.time())
