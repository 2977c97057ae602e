"""Deployment and observability files: docker-compose.yaml, the statsd-exporter mapping, Prometheus
and Grafana provisioning, and the dashboard.

The metric checks model statsd-exporter's matcher as it is implemented (pkg/mapper, pkg/mapper/fsm):
glob rules go through an FSM in which ``*`` matches exactly one dot-free component, the first rule in
file order wins, and a rule whose match is a component-prefix of (or equal to) an earlier rule's is
silently never matched; regex rules are tried, in file order, only when no glob rule matched. A plain
first-match reading of the file is run beside it: the two must agree, so no rule is shadowed and the
regex catch-all really is last. Airflow runs with ``legacy_names_on = False`` and
``statsd_influxdb_enabled = True``: its metrics come with bare names and their variables as tags,
which the exporter turns into labels (a rule's own label wins).
"""

from __future__ import annotations

import ast
import importlib
import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
COMPOSE = ROOT / "docker-compose.yaml"
MAPPING = ROOT / "include" / "statsd" / "mapping.yml"
PROMETHEUS = ROOT / "include" / "prometheus" / "prometheus.yml"
GRAFANA_DATASOURCE = ROOT / "include" / "grafana" / "provisioning" / "datasources" / "prometheus.yml"
GRAFANA_DASHBOARDS = ROOT / "include" / "grafana" / "provisioning" / "dashboards" / "dashboards.yml"
DASHBOARD = ROOT / "include" / "grafana" / "dashboards" / "market_data.json"

INTERVALS = ("15m", "30m", "1h", "4h", "1d", "1w")
AIRFLOW_IMAGE = "one-smart-trade-airflow:3.3.2"  # built by include/cluster/Dockerfile (FROM apache/airflow:3.3.2)
AIRFLOW_SERVICES = ("airflow-apiserver", "airflow-scheduler", "airflow-dag-processor", "airflow-triggerer",
                    "airflow-worker")
ALL_SERVICES = AIRFLOW_SERVICES + ("airflow-init", "postgres", "redis", "statsd-exporter", "prometheus",
                                   "grafana", "sandbox")

# DESIGN.md "Metrics and logs": (name after Airflow's "airflow." prefix, StatsD type, Prometheus
# metric the mapping must produce, its labels). Placeholders substituted with examples.
_STATUSES = ("429", "418", "500", "503", "400", "malformed", "timeout", "connection")
DESIGN_METRICS = (
    [("binance.request.duration", "observer", "airflow_binance_request_duration_seconds", {}),
     ("binance.request.count", "counter", "airflow_binance_requests_total", {}),
     ("binance.request.retry", "counter", "airflow_binance_request_retries_total", {}),
     ("binance.rate_limited", "counter", "airflow_binance_rate_limited_total", {}),
     ("binance.banned", "counter", "airflow_binance_banned_total", {}),
     ("binance.weight_used", "gauge", "airflow_binance_weight_used", {}),
     ("signal.generated", "counter", "airflow_signal_generated_total", {}),
     ("signal.stale", "counter", "airflow_signal_stale_total", {}),
     ("archive.download.count", "counter", "airflow_archive_downloads_total", {}),
     ("archive.checksum_mismatch", "counter", "airflow_archive_checksum_mismatch_total", {}),
     # from the failure callback (include/market_data/alerting.py), dag_id and task_id as tags
     ("task.failed", "counter", "airflow_task_failed_total", {"dag_id": "binance_klines_15m", "task_id": "fetch"})]
    + [(f"binance.request.error.{s}", "counter", "airflow_binance_request_errors_total", {"status": s})
       for s in _STATUSES]
    + [m for i in INTERVALS for m in (
        (f"ingest.{i}.candles", "counter", "airflow_ingest_candles_total", {"interval": i}),
        (f"ingest.{i}.gaps_found", "counter", "airflow_ingest_gaps_found_total", {"interval": i}),
        (f"ingest.{i}.gaps_filled", "counter", "airflow_ingest_gaps_filled_total", {"interval": i}),
        (f"ingest.{i}.lag_seconds", "gauge", "airflow_ingest_lag_seconds", {"interval": i}),
        (f"curate.{i}.rows", "counter", "airflow_curate_rows_total", {"interval": i}),
        (f"curate.{i}.duration", "observer", "airflow_curate_duration_seconds", {"interval": i}),
        (f"quality.{i}.findings", "counter", "airflow_quality_findings_total", {"interval": i}))]
)

# Emitted by the code beyond DESIGN's list (docs/metrics.md), checked like DESIGN_METRICS.
_ARCHIVE_STATUSES = ("403", "418", "429", "500", "503", "400", "timeout", "connection")
CODE_METRICS = (
    [("archive.download.duration", "observer", "airflow_archive_download_duration_seconds", {}),
     ("archive.download.retry", "counter", "airflow_archive_download_retries_total", {}),
     ("archive.file_rejected", "counter", "airflow_archive_files_rejected_total", {}),
     ("signal.deadline_missed", "counter", "airflow_signal_deadline_missed_total", {"dag_id": "daily_signal"})]
    + [(f"archive.download.error.{s}", "counter", "airflow_archive_download_errors_total", {"status": s})
       for s in _ARCHIVE_STATUSES]
    + [(f"ingest.{i}.rows_rejected", "counter", "airflow_ingest_rows_rejected_total", {"interval": i})
       for i in INTERVALS]
)
TASK_METRICS = DESIGN_METRICS + CODE_METRICS
# Labels of TASK_METRICS that the code sends as tags (the rest come from the mapping's captures).
TAG_LABELS = {"task.failed": ("dag_id", "task_id"), "signal.deadline_missed": ("dag_id",)}
# First components of the names task code emits (the code scanner's filter).
EMITTED_PREFIXES = ("archive", "binance", "curate", "ingest", "quality", "signal", "task")


def task_metric_tags(name, labels):
    return {k: labels[k] for k in TAG_LABELS.get(name, ())}


# Airflow's own metrics as Airflow 3.3.2 sends them with legacy_names_on = False: bare name and the
# tags its call sites pass (jobs/scheduler_job_runner.py, executors/base_executor.py, models/dagrun.py,
# sdk/execution_time/task_runner.py): (name, type, tags, Prometheus metric, labels); None: dropped.
_TI = {"dag_id": "binance_klines_1h", "task_id": "grp.fetch"}
AIRFLOW_METRICS = [
    ("pool.open_slots", "gauge", {"pool_name": "binance_api"}, "airflow_pool_open_slots", {"pool_name": "binance_api"}),
    ("pool.queued_slots", "gauge", {"pool_name": "binance_api"}, "airflow_pool_queued_slots", {"pool_name": "binance_api"}),
    ("pool.running_slots", "gauge", {"pool_name": "binance_api"}, "airflow_pool_running_slots", {"pool_name": "binance_api"}),
    ("pool.deferred_slots", "gauge", {"pool_name": "binance_api"}, "airflow_pool_deferred_slots", {"pool_name": "binance_api"}),
    ("pool.scheduled_slots", "gauge", {"pool_name": "binance_api"}, "airflow_pool_scheduled_slots",
     {"pool_name": "binance_api"}),
    ("pool.starving_tasks", "gauge", {"pool_name": "binance_api"}, "airflow_pool_starving_tasks", {"pool_name": "binance_api"}),
    ("dagrun.duration.success", "observer", {"dag_id": "binance_klines_15m", "run_type": "scheduled"},
     "airflow_dagrun_duration_seconds", {"dag_id": "binance_klines_15m", "run_type": "scheduled", "state": "success"}),
    ("dagrun.duration.failed", "observer", {"dag_id": "daily_signal", "run_type": "manual"},
     "airflow_dagrun_duration_seconds", {"dag_id": "daily_signal", "run_type": "manual", "state": "failed"}),
    ("ti_failures", "counter", _TI, "airflow_ti_failures_total", _TI),
    ("ti_successes", "counter", _TI, "airflow_ti_successes_total", _TI),
    ("ti.finish", "counter", {**_TI, "state": "failed"}, "airflow_ti_finish_total", {**_TI, "state": "failed"}),
    ("scheduler_heartbeat", "counter", {}, "airflow_scheduler_heartbeat_total", {}),
    ("dag_processing.import_errors", "gauge", {}, "airflow_dag_processing_import_errors", {}),
    ("executor.open_slots", "gauge", {"status": "open", "executor_class_name": "CeleryExecutor"},
     "airflow_executor_open_slots", {"status": "open", "executor_class_name": "CeleryExecutor"}),
    ("executor.queued_tasks", "gauge", {"status": "queued", "executor_class_name": "CeleryExecutor"},
     "airflow_executor_queued_tasks", {"status": "queued", "executor_class_name": "CeleryExecutor"}),
    ("executor.running_tasks", "gauge", {"status": "running", "executor_class_name": "CeleryExecutor"},
     "airflow_executor_running_tasks", {"status": "running", "executor_class_name": "CeleryExecutor"}),
    # several executors: Airflow appends the class name (and tags it too)
    ("executor.open_slots.CeleryExecutor", "gauge", {"status": "open", "executor_class_name": "CeleryExecutor"},
     "airflow_executor_open_slots", {"status": "open", "executor_class_name": "CeleryExecutor"}),
    # not needed by the dashboard or the alerts: dropped
    ("ti.start", "counter", _TI, None, None),
    ("task.duration", "observer", _TI, None, None),
    ("dagrun.schedule_delay", "observer", {"dag_id": "binance_klines_15m"}, None, None),
    ("schedulerjob_start", "counter", {}, None, None),
    ("dag_processing.last_num_of_db_queries.binance_klines_py", "gauge", {}, None, None),
    # legacy names (legacy_names_on = True): variables in the name
    ("ti.start.binance_klines_1h.fetch", "counter", {}, None, None),
    ("ti.finish.binance_klines_1h.fetch.failed", "counter", {}, None, None),
    ("pool.open_slots.binance_api", "gauge", {}, None, None),
    ("pool.scheduled_slots.binance_api", "gauge", {}, None, None),
    ("dag.binance_klines_1h.fetch.duration", "observer", {}, None, None),
    ("dagrun.duration.success.binance_klines_15m", "observer", {}, None, None),
    ("dagrun.schedule_delay.binance_klines_15m", "observer", {}, None, None),
    # a task metric with the wrong type
    ("ingest.15m.candles", "gauge", {}, None, None),
]
# Labels a Prometheus metric gets from tags (for the dashboard checks), from the lists above.
TAGGED_LABELS = {}
for _name, _type, _tags, _prom, _ in AIRFLOW_METRICS:
    if _prom:
        TAGGED_LABELS.setdefault(_prom, set()).update(_tags)
for _name, _type, _prom, _labels in TASK_METRICS:
    TAGGED_LABELS.setdefault(_prom, set()).update(task_metric_tags(_name, _labels))
# What the project calls its DAGs and its pool: never part of a metric name.
PROJECT_NAMES = ("binance_klines", "binance_history", "daily_signal", "binance_api")

STATSD_TYPES = {"c": "counter", "g": "gauge", "ms": "observer", "h": "observer", "d": "observer"}
PROMETHEUS_TARGET_LABELS = {"job", "instance", "deployment"}  # added by Prometheus / prometheus.yml
GRAFANA_BUILTINS = {"__rate_interval", "__range", "__interval", "__interval_ms", "__range_s", "__range_ms"}


# -- helpers: compose interpolation --------------------------------------------------------------

_INTERP = re.compile(r"(?<!\$)\$\{([A-Za-z_][A-Za-z0-9_]*)(?::?-([^}]*))?\}")


def interpolate(value, env=None):
    """Compose's ${VAR} / ${VAR:-default} on every string (after YAML parsing, as compose does)."""
    env = env or {}
    if isinstance(value, str):
        def sub(m):
            return env.get(m.group(1)) or (m.group(2) if m.group(2) is not None else "")
        return _INTERP.sub(sub, value).replace("$$", "$")
    if isinstance(value, dict):
        return {k: interpolate(v, env) for k, v in value.items()}
    if isinstance(value, list):
        return [interpolate(v, env) for v in value]
    return value


def load_compose(env=None):
    return interpolate(yaml.safe_load(COMPOSE.read_text()), env)


def service_env(service):
    """A service's environment as the container gets it: its env_file(s), then ``environment``."""
    env = {}
    files = service.get("env_file") or []
    for entry in [files] if isinstance(files, (str, dict)) else files:
        path = ROOT / (entry["path"] if isinstance(entry, dict) else entry)
        for line in path.read_text().splitlines():
            if line.strip() and not line.lstrip().startswith("#") and "=" in line:
                key, value = line.split("=", 1)
                env[key.strip()] = value.strip()
    environment = service.get("environment") or {}
    if isinstance(environment, list):
        environment = dict(item.split("=", 1) for item in environment)
    env.update({k: str(v) for k, v in environment.items()})
    return env


def bind_mounts(service):
    """(host path relative to the repo, container path) of a service's bind mounts."""
    out = []
    for volume in service.get("volumes", []):
        source, target = volume.split(":")[:2]
        if source.startswith("./"):
            out.append((source[2:], target))
    return out


# -- helpers: statsd-exporter mapping model ---------------------------------------------------

_METRIC_LINE_RE = re.compile(r"^(\*|[a-zA-Z_][a-zA-Z0-9_\-]*)(\.\*|\.[a-zA-Z0-9_][a-zA-Z0-9_\-]*)*$")
_METRIC_NAME_RE = re.compile(r"^([a-zA-Z_]|\$\{?\d+\}?)([a-zA-Z0-9_]|\$\{?\d+\}?)*$")
_LABEL_NAME_RE = re.compile(r"^[a-zA-Z_][a-zA-Z0-9_]+$")
_DEFAULTS_KEYS = {"observer_type", "match_type", "glob_disable_ordering", "ttl", "summary_options",
                  "histogram_options"}
_MAPPING_KEYS = {"match", "name", "labels", "honor_labels", "observer_type", "match_type", "help", "action",
                 "match_metric_type", "ttl", "summary_options", "histogram_options", "scale"}
_TYPES = ("counter", "gauge", "observer")


class _State:
    def __init__(self, remaining):
        self.transitions = {}
        self.min_rem = self.max_rem = remaining
        self.result = None
        self.priority = 0


class StatsdMapper:
    """statsd-exporter v0.28 mapping: glob FSM as implemented, then regex rules; plus a plain
    first-match reading of the file."""

    def __init__(self, config):
        self.defaults = config.get("defaults") or {}
        self.mappings = config["mappings"]
        self.roots = {t: _State(0) for t in _TYPES}
        for priority, rule in enumerate(self.mappings):
            if self.match_type(rule) != "glob":
                continue
            fields = rule["match"].split(".")
            types = [rule["match_metric_type"]] if rule.get("match_metric_type") else list(_TYPES)
            finals = []
            for metric_type in types:
                state = self.roots[metric_type]
                for i, field in enumerate(fields):
                    remaining = len(fields) - i - 1
                    nxt = state.transitions.get(field)
                    if nxt is None:
                        nxt = state.transitions[field] = _State(remaining)
                        if remaining == 0:
                            nxt.result = rule  # only a freshly created final state gets a result
                    else:
                        nxt.min_rem = min(nxt.min_rem, remaining)
                        nxt.max_rem = max(nxt.max_rem, remaining)
                    state = nxt
                finals.append(state)
            for state in finals:
                state.priority = priority

    def match_type(self, rule):
        return rule.get("match_type") or self.defaults.get("match_type") or "glob"

    def fsm_lookup(self, name, metric_type):
        fields = name.split(".")
        best = []

        def walk(state, i, captures):
            left = len(fields) - i - 1
            keys = [fields[i]] + (["*"] if fields[i] != "*" else [])
            for key in keys:
                nxt = state.transitions.get(key)
                if nxt is None or not nxt.min_rem <= left <= nxt.max_rem:
                    continue
                caps = captures + [fields[i]] if key == "*" else captures
                if left == 0:
                    if nxt.result is not None:
                        best.append((nxt.priority, nxt.result, caps))
                else:
                    walk(nxt, i + 1, caps)

        walk(self.roots[metric_type], 0, [])
        if not best:
            return None, []
        _, rule, caps = min(best, key=lambda item: item[0])
        return rule, caps

    def exporter_lookup(self, name, metric_type):
        """What the exporter does (mapper.GetMapping): the glob FSM, and only if it finds nothing,
        the regex rules in file order."""
        rule, caps = self.fsm_lookup(name, metric_type)
        if rule is not None:
            return rule, caps
        for rule in self.mappings:
            if self.match_type(rule) != "regex":
                continue
            m = re.search(rule["match"], name)
            if m and rule.get("match_metric_type") in (None, metric_type):
                return rule, list(m.groups())
        return None, []

    def regex_lookup(self, name, metric_type):
        """The file read top to bottom, first match wins (globs as regexes)."""
        for rule in self.mappings:
            if rule.get("match_metric_type") and rule["match_metric_type"] != metric_type:
                continue
            if self.match_type(rule) == "regex":
                m = re.search(rule["match"], name)
            else:
                m = re.match("^" + re.escape(rule["match"]).replace(r"\*", "([^.]*)") + "$", name)
            if m:
                return rule, list(m.groups())
        return None, []

    @staticmethod
    def _format(template, captures):
        return re.sub(r"\$\{?(\d+)\}?", lambda m: captures[int(m.group(1)) - 1], template)

    def map(self, name, metric_type, tags=None):
        """(rule, prometheus name, labels) of a StatsD name and its tags; (None, None, None) if
        unmatched. The rule's labels win over tags of the same name."""
        rule, caps = self.exporter_lookup(name, metric_type)
        if rule is None:
            return None, None, None
        labels = {**(tags or {}), **{k: self._format(str(v), caps) for k, v in (rule.get("labels") or {}).items()}}
        return rule, self._format(rule["name"], caps), labels

    def observer_type(self, rule):
        return rule.get("observer_type") or self.defaults.get("observer_type") or "summary"

    def produced_series(self, tagged_labels=None):
        """Prometheus series name -> label names, for every mapping rule (drops excluded), with the
        labels its tags add (``tagged_labels``: metric name -> label names)."""
        tagged_labels = tagged_labels or {}
        out = {}
        for rule in self.mappings:
            if rule.get("action") == "drop":
                continue
            name = rule["name"]
            labels = set(rule.get("labels") or {}) | set(tagged_labels.get(name, ()))
            if rule["match_metric_type"] == "observer":
                if self.observer_type(rule) == "histogram":
                    out[name + "_bucket"] = labels | {"le"}
                else:
                    out[name] = labels | {"quantile"}
                out[name + "_sum"] = labels
                out[name + "_count"] = labels
            else:
                out[name] = labels
        return out


@pytest.fixture(scope="module")
def mapper():
    return StatsdMapper(yaml.safe_load(MAPPING.read_text()))


@pytest.fixture(scope="module")
def dashboard():
    return json.loads(DASHBOARD.read_text())


def all_panels(dash):
    for panel in dash["panels"]:
        yield panel
        yield from panel.get("panels", [])


def all_exprs(dash):
    for panel in all_panels(dash):
        for target in panel.get("targets", []):
            if target.get("expr"):
                yield panel, target["expr"]


# -- helpers: PromQL -----------------------------------------------------------------------------

_PROMQL_KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "and", "or",
                    "unless", "offset", "inf", "nan", "atan2",
                    # aggregation operators, which may be followed by "by (...)" before their "("
                    "sum", "min", "max", "avg", "group", "stddev", "stdvar", "count", "count_values",
                    "bottomk", "topk", "quantile", "limitk", "limit_ratio"}
_SELECTOR = re.compile(r"([a-zA-Z_:][a-zA-Z0-9_:]*)\s*\{([^}]*)\}")
_GROUPING = re.compile(r"\b(by|without|on|ignoring|group_left|group_right)\s*\(([^)]*)\)")


def promql_parts(expr):
    """(metric names, {metric: matcher label names}, grouping label names) of a PromQL expression."""
    matchers = {}
    for metric, body in _SELECTOR.findall(expr):
        body = re.sub(r'"(?:[^"\\]|\\.)*"', '""', body)
        matchers.setdefault(metric, set()).update(re.findall(r"([a-zA-Z_][a-zA-Z0-9_]*)\s*(?:=~|!~|!=|=)", body))
    grouping = set()
    for _, labels in _GROUPING.findall(expr):
        grouping.update(label.strip() for label in labels.split(",") if label.strip())
    stripped = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    stripped = re.sub(r"\{[^}]*\}", " ", stripped)
    stripped = re.sub(r"\[[^\]]*\]", " ", stripped)
    stripped = _GROUPING.sub(r"\1 ", stripped)
    names = set()
    for m in re.finditer(r"(?<![\w$.])([a-zA-Z_:][a-zA-Z0-9_:]*)(\s*\()?", stripped):
        word, call = m.group(1), m.group(2)
        if call or word in _PROMQL_KEYWORDS:
            continue
        names.add(word)
    return names, matchers, grouping


def test_promql_parts_helper():
    names, matchers, grouping = promql_parts(
        'histogram_quantile(0.95, sum by (le, interval) (rate(a_b_bucket{interval=~"$interval"}[1h]))) '
        '/ ignoring(x) c_total or vector(6000 * 0.8)')
    assert names == {"a_b_bucket", "c_total"}
    assert matchers == {"a_b_bucket": {"interval"}}
    assert grouping == {"le", "interval", "x"}


# -- docker-compose.yaml ---------------------------------------------------------------------------

def test_compose_has_every_service_with_the_multi_machine_shape():
    compose = load_compose()
    services = compose["services"]
    assert set(ALL_SERVICES) <= set(services), set(ALL_SERVICES) - set(services)
    for name in AIRFLOW_SERVICES + ("airflow-init",):
        service = services[name]
        env = service_env(service)  # include/cluster/airflow.env, then the service's own environment
        assert service["image"] == AIRFLOW_IMAGE and service["build"]["dockerfile"] == "include/cluster/Dockerfile", name
        assert env["AIRFLOW__CORE__EXECUTOR"] == "CeleryExecutor", name
        assert env["AIRFLOW__CORE__EXECUTION_API_SERVER_URL"] == "http://airflow-apiserver:8080/execution/", name
        assert env["AIRFLOW__METRICS__STATSD_ON"] == "True", name
        assert env["AIRFLOW__METRICS__STATSD_HOST"] == "statsd-exporter", name
        assert env["AIRFLOW__METRICS__STATSD_PORT"] == "9125", name
        assert env.get("AIRFLOW__METRICS__STATSD_PREFIX", "airflow") == "airflow", name
        # the mapping relies on bare names with their variables as tags (include/statsd/mapping.yml)
        assert env.get("AIRFLOW__METRICS__LEGACY_NAMES_ON") == "False", name
        assert env.get("AIRFLOW__METRICS__STATSD_INFLUXDB_ENABLED") == "True", name
        assert env["PYTHONPATH"] == "/opt/airflow", name  # the provider is installed in the image
        for key in ("AIRFLOW__CORE__FERNET_KEY", "AIRFLOW__API__SECRET_KEY", "AIRFLOW__API_AUTH__JWT_SECRET"):
            assert key in env, (name, key)
        assert env["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"].startswith("postgresql"), name
        assert re.fullmatch(r"redis://(:@)?redis:6379/\d+", env["AIRFLOW__CELERY__BROKER_URL"]), name
        mounts = dict(bind_mounts(service))
        for src, dst in (("dags", "/opt/airflow/dags"), ("include", "/opt/airflow/include")):
            assert mounts.get(src) == dst, (name, src)
        assert "market-data:/opt/airflow/data" in service["volumes"], name
    # secrets shared by every Airflow container (tokens signed by one are checked by another)
    for key in ("AIRFLOW__API__SECRET_KEY", "AIRFLOW__API_AUTH__JWT_SECRET", "AIRFLOW__CORE__FERNET_KEY"):
        assert len({services[n]["environment"][key] for n in AIRFLOW_SERVICES}) == 1, key
    commands = {n: services[n].get("command") for n in AIRFLOW_SERVICES}
    assert commands == {"airflow-apiserver": "api-server", "airflow-scheduler": "scheduler",
                        "airflow-dag-processor": "dag-processor", "airflow-triggerer": "triggerer",
                        "airflow-worker": "celery worker"}
    assert services["airflow-apiserver"]["ports"][0].endswith(":8080")


def test_compose_healthchecks_and_dependencies():
    services = load_compose()["services"]
    for name, service in services.items():
        if name == "airflow-init":  # one-shot
            continue
        check = service.get("healthcheck")
        assert check and check["test"][0] in ("CMD", "CMD-SHELL"), f"{name} has no healthcheck"
        assert "interval" in check and "retries" in check, name
    for name, service in services.items():
        for dep, spec in (service.get("depends_on") or {}).items():
            assert dep in services, (name, dep)
            assert "demo" not in services[dep].get("profiles", []), f"{name} depends on optional {dep}"
            condition = spec["condition"]
            assert condition in ("service_started", "service_healthy", "service_completed_successfully")
            if condition == "service_healthy":
                assert "healthcheck" in services[dep], (name, dep)
            if condition == "service_completed_successfully":
                assert dep == "airflow-init", (name, dep)
    for name in AIRFLOW_SERVICES:
        deps = services[name]["depends_on"]
        assert deps["airflow-init"]["condition"] == "service_completed_successfully", name
        assert deps["postgres"]["condition"] == deps["redis"]["condition"] == "service_healthy", name
    assert services["airflow-worker"]["depends_on"]["airflow-apiserver"]["condition"] == "service_healthy"

    done = set()

    def visit(node, path):
        assert node not in path, f"dependency cycle {path + [node]}"
        if node in done:
            return
        for dep in services[node].get("depends_on") or {}:
            visit(dep, path + [node])
        done.add(node)

    for name in services:
        visit(name, [])


def test_compose_interpolations_all_have_defaults():
    for m in re.finditer(r"(?<!\$)\$\{([^}]*)\}", COMPOSE.read_text()):
        assert re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*:-[^}]*", m.group(1)), f"${{{m.group(1)}}} has no default"


def test_compose_init_migrates_and_creates_pool_and_connection():
    compose = load_compose()
    init = compose["services"]["airflow-init"]
    script = " ".join(init["command"])
    assert "airflow db migrate" in script
    assert 'airflow pools set "${BINANCE_POOL}" "${BINANCE_POOL_SLOTS}"' in script
    assert re.search(r'for conn in "binance_default \$\{BINANCE_HOST\}" "binance_archive \$\{BINANCE_ARCHIVE_HOST\}"',
                     script)
    assert 'connections add "$1" --conn-type http --conn-host "$2"' in script
    assert "db migrate" in script.split("pools set")[0], "migrate before creating the pool"
    env = service_env(init)  # what the script reads: the env file's pool, the deployment's hosts
    assert (env["BINANCE_POOL"], env["BINANCE_POOL_SLOTS"]) == ("binance_api", "4")
    assert env["BINANCE_HOST"] == "https://data-api.binance.vision"
    assert env["BINANCE_ARCHIVE_HOST"] == "https://data.binance.vision"
    overridden = service_env(load_compose({"BINANCE_HOST": "http://sandbox:8900"})["services"]["airflow-init"])
    assert overridden["BINANCE_HOST"] == "http://sandbox:8900"


def test_compose_sandbox_runs_the_real_cli_under_the_demo_profile():
    sandbox = load_compose()["services"]["sandbox"]
    assert sandbox["profiles"] == ["demo"]
    argv = list(sandbox["entrypoint"]) + list(sandbox["command"])
    assert argv[:3] == ["python", "-m", "include.binance_sandbox"]
    parser = importlib.import_module("include.binance_sandbox.__main__").build_parser()
    args = parser.parse_args(argv[3:])  # argparse exits (SystemExit) on an unknown flag
    assert (args.host, args.port) == ("0.0.0.0", 8900)
    assert sandbox["environment"]["PYTHONPATH"] == "/opt/airflow"
    assert ("include", "/opt/airflow/include") in bind_mounts(sandbox)
    assert any(p.endswith(":8900") for p in sandbox["ports"])


def test_compose_observability_services_mount_the_repo_files():
    services = load_compose()["services"]
    for name, service in services.items():
        for src, _ in bind_mounts(service):
            assert src == "data" or (ROOT / src).exists(), f"{name} mounts missing ./{src}"
    statsd = services["statsd-exporter"]
    assert statsd["image"].startswith("prom/statsd-exporter:")
    flags = dict(arg.split("=", 1) for arg in statsd["command"])
    assert dict(bind_mounts(statsd))["include/statsd/mapping.yml"] == flags["--statsd.mapping-config"]
    assert flags["--statsd.listen-udp"].endswith(":9125")
    assert flags["--web.listen-address"].endswith(":9102")
    prom = services["prometheus"]
    flags = dict(arg.split("=", 1) for arg in prom["command"] if "=" in arg)
    mounts = dict(bind_mounts(prom))  # the file itself, or include/prometheus (with alerts.yml) as its directory
    assert (mounts.get("include/prometheus/prometheus.yml") == flags["--config.file"]
            or mounts.get("include/prometheus") + "/prometheus.yml" == flags["--config.file"]), mounts
    grafana = dict(bind_mounts(services["grafana"]))
    assert grafana["include/grafana/provisioning"] == "/etc/grafana/provisioning"
    provider = yaml.safe_load(GRAFANA_DASHBOARDS.read_text())["providers"][0]
    assert grafana["include/grafana/dashboards"] == provider["options"]["path"]


def test_prometheus_loads_the_alert_rules_it_is_given():
    """prometheus.yml names alerts.yml relative to itself: compose must mount it beside the config
    (Prometheus silently loads no rule from a rule_files pattern matching nothing)."""
    config = yaml.safe_load(PROMETHEUS.read_text())
    assert config["rule_files"] == ["alerts.yml"]
    assert (PROMETHEUS.parent / "alerts.yml").exists()
    prom = load_compose()["services"]["prometheus"]
    flags = dict(arg.split("=", 1) for arg in prom["command"] if "=" in arg)
    config_dir = flags["--config.file"].rsplit("/", 1)[0]
    mounts = dict(bind_mounts(prom))
    rules = config_dir + "/alerts.yml"
    assert mounts.get("include/prometheus/alerts.yml") == rules or mounts.get("include/prometheus") == config_dir, \
        f"docker-compose.yaml does not mount include/prometheus/alerts.yml at {rules}: {mounts}"


def test_prometheus_scrapes_statsd_exporter():
    config = yaml.safe_load(PROMETHEUS.read_text())
    targets = [t for job in config["scrape_configs"] for sc in job.get("static_configs", []) for t in sc["targets"]]
    assert "statsd-exporter:9102" in targets
    extra = {k for job in config["scrape_configs"] for sc in job.get("static_configs", [])
             for k in sc.get("labels", {})}
    assert extra <= PROMETHEUS_TARGET_LABELS


def test_grafana_datasource_is_the_one_the_dashboard_uses(dashboard):
    datasource = yaml.safe_load(GRAFANA_DATASOURCE.read_text())["datasources"][0]
    assert datasource["type"] == "prometheus"
    assert datasource["url"] == "http://prometheus:9090"
    for panel in all_panels(dashboard):
        if panel["type"] == "row":
            continue
        for ds in [panel["datasource"]] + [t["datasource"] for t in panel["targets"]]:
            assert ds == {"type": "prometheus", "uid": datasource["uid"]}, panel["title"]


# -- statsd-exporter mapping ------------------------------------------------------------------------

def test_mapping_is_a_valid_statsd_exporter_config(mapper):
    config = yaml.safe_load(MAPPING.read_text())
    assert set(config) <= {"defaults", "mappings"}
    assert set(mapper.defaults) <= _DEFAULTS_KEYS  # the exporter unmarshals strictly
    assert mapper.defaults.get("match_type", "glob") == "glob"
    assert not mapper.defaults.get("glob_disable_ordering", False)
    *globs, catch_all = mapper.mappings
    # The last rule, and the only regex one, drops whatever no glob rule mapped. The exporter
    # consults regex rules only after the glob FSM missed, so it may not stand anywhere else (it would
    # look first-matching in the file and be last in the exporter).
    assert catch_all["match_type"] == "regex" and catch_all.get("action") == "drop", catch_all
    assert set(catch_all) <= _MAPPING_KEYS and _METRIC_NAME_RE.match(catch_all["name"])
    assert "match_metric_type" not in catch_all
    for name in ("airflow.ti.start.d.t", "x", "airflow.pool.open_slots.p", "a.b-c.d_e"):
        assert re.search(catch_all["match"], name), f"the catch-all misses {name}"
    kinds = {}
    for rule in globs:
        assert set(rule) <= _MAPPING_KEYS, rule
        assert rule.get("match_type", "glob") == "glob", rule
        assert _METRIC_LINE_RE.match(rule["match"]), f"invalid match {rule['match']}"
        assert rule["match"].startswith("airflow."), rule
        assert _METRIC_NAME_RE.match(rule["name"]), rule
        assert all(_LABEL_NAME_RE.match(k) for k in rule.get("labels") or {}), rule
        assert rule.get("action", "map") in ("map", "drop"), rule
        if rule.get("action") == "drop":
            continue
        metric_type = rule.get("match_metric_type")
        assert metric_type in _TYPES, f"{rule['match']}: set match_metric_type"
        assert mapper.observer_type(rule) in ("histogram", "summary")
        if metric_type == "counter":
            assert rule["name"].endswith("_total"), rule
        if metric_type == "observer":
            assert rule["name"].endswith("_seconds"), rule  # timers arrive in ms, exposed in seconds
        buckets = (rule.get("histogram_options") or mapper.defaults.get("histogram_options") or {}).get("buckets")
        if buckets:
            assert buckets == sorted(set(buckets)), rule
        # one Prometheus metric = one type and one label set (the rule's and its tags')
        kind = (metric_type, frozenset(set(rule.get("labels") or {}) | TAGGED_LABELS.get(rule["name"], set())))
        assert kinds.setdefault(rule["name"], kind) == kind, f"{rule['name']}: inconsistent type or labels"
    series = mapper.produced_series()
    bases = {r["name"] for r in mapper.mappings if r.get("action") != "drop"}
    assert not (set(series) - bases) & bases, "a histogram/summary suffix collides with another metric"


def test_every_rule_is_reachable(mapper):
    """The FSM ignores a rule whose match is a component-prefix of, or equal to, an earlier one."""
    for rule in mapper.mappings:
        if mapper.match_type(rule) != "glob":
            continue
        sample = rule["match"].replace("*", "sample_value")
        for metric_type in ([rule["match_metric_type"]] if rule.get("match_metric_type") else _TYPES):
            found, _ = mapper.fsm_lookup(sample, metric_type)
            assert found is rule, f"rule {rule['match']} is shadowed by {found and found['match']}"


def _check_mapping(mapper, full, metric_type, tags, prom_name, labels):
    exporter = mapper.exporter_lookup(full, metric_type)
    assert exporter == mapper.regex_lookup(full, metric_type), "exporter and first-match readings disagree"
    rule, got_name, got_labels = mapper.map(full, metric_type, tags)
    assert rule is not None, f"{full} is not matched by any rule"
    if prom_name is None:
        assert rule.get("action") == "drop", f"{full} should be dropped, got {got_name}"
        return
    assert rule.get("action", "map") == "map"
    assert (got_name, got_labels) == (prom_name, labels), f"{full} -> {got_name}{got_labels}"


@pytest.mark.parametrize("name, metric_type, prom_name, labels", TASK_METRICS, ids=[m[0] for m in TASK_METRICS])
def test_metric_is_mapped(mapper, name, metric_type, prom_name, labels):
    _check_mapping(mapper, f"airflow.{name}", metric_type, task_metric_tags(name, labels), prom_name, labels)


@pytest.mark.parametrize("name, metric_type, tags, prom_name, labels", AIRFLOW_METRICS,
                         ids=[m[0] for m in AIRFLOW_METRICS])
def test_airflow_metric_is_mapped_or_dropped(mapper, name, metric_type, tags, prom_name, labels):
    _check_mapping(mapper, f"airflow.{name}", metric_type, tags, prom_name, labels)


def _airflow_registry():
    """Airflow's metrics registry (metrics_template.yaml of the installed package)."""
    import airflow

    path = Path(airflow.__file__).parent / "_shared" / "observability" / "metrics" / "metrics_template.yaml"
    return yaml.safe_load(path.read_text())["metrics"]


def test_no_metric_name_embeds_a_dag_task_or_pool_name(mapper):
    """Variables (DAG, task, pool, file, job, executor...) only ever become labels: no rule puts a
    capture into a name, and every name of Airflow's registry that carries a variable -- its legacy
    name, or a "modern" one such as ``{job_name}_start`` -- is dropped."""
    for rule in mapper.mappings:
        if rule.get("action", "map") == "map":
            assert "$" not in rule["name"], f"{rule['match']}: a capture in the metric name {rule['name']}"
    for name in mapper.produced_series():
        for project_name in PROJECT_NAMES:
            assert project_name not in name, name
    samples = {"dag_id": "binance_klines_15m", "task_id": "fetch", "pool_name": "binance_api", "state": "failed",
               "queue": "default", "job_id": "17", "return_code": "1", "job_name": "SchedulerJob",
               "file_name": "binance_klines_py", "dag_file": "binance_klines_py", "bundle_name": "dags-folder",
               "executor_class_name": "CeleryExecutor", "hostname": "worker1", "operator_name": "PythonOperator",
               "task_type": "PythonOperator", "event_type": "start", "transport_type": "http",
               "worker_name": "edge1", "status": "ok"}
    types = {"counter": "counter", "gauge": "gauge", "timer": "observer"}
    registry = _airflow_registry()
    assert len(registry) > 50
    checked = 0
    for metric in registry:
        metric_type = types[metric["type"]]
        variables = metric.get("name_variables") or []
        names = []
        if metric.get("legacy_name", "-") != "-" and variables:
            names.append(metric["legacy_name"])
        if "{" in metric["name"]:
            names.append(metric["name"])
        for template in names:
            values = {v: samples[v] for v in variables}
            full = "airflow." + template.format(**values)
            rule, prom_name, labels = mapper.map(full, metric_type)
            assert rule is not None, full
            checked += 1
            if rule.get("action") == "drop":
                continue
            # mapped: only as a name free of the values, each variable in the name a label
            # (executor.open_slots.<executor>, the name Airflow uses with several executors)
            assert not any(v in prom_name for v in values.values()), f"{full} -> {prom_name}"
            in_name = [v for v in variables if "{" + v + "}" in template]
            assert all(labels.get(v) == values[v] for v in in_name), f"{full} -> {prom_name}{labels}"
    assert checked > 40


def test_design_metrics_are_on_the_dashboard(mapper, dashboard):
    used = set()
    for _, expr in all_exprs(dashboard):
        used |= promql_parts(expr)[0]
    for name, metric_type, prom_name, _ in TASK_METRICS:
        series = {prom_name} if metric_type != "observer" else \
            {prom_name + s for s in ("_bucket", "_sum", "_count", "")}
        assert series & used, f"{name} ({prom_name}) is on no dashboard panel"


def _emitted_names(tree):
    """Metric names passed to stats.incr/gauge/timing/timer or _emit(kind, name) in a module (a name
    may be a module-level string constant: ``TASK_FAILED_METRIC = "task.failed"``)."""
    kinds = {"incr": "counter", "decr": "counter", "gauge": "gauge", "timing": "observer", "timer": "observer"}
    constants = {target.id: node.value.value for node in getattr(tree, "body", [])
                 if isinstance(node, ast.Assign) and isinstance(node.value, ast.Constant)
                 and isinstance(node.value.value, str)
                 for target in node.targets if isinstance(target, ast.Name)}
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        func = node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", None)
        args = node.args
        if func == "_emit" and len(args) >= 2 and isinstance(args[0], ast.Constant):
            kind, arg = kinds.get(args[0].value), args[1]
        elif func in kinds and args:
            kind, arg = kinds[func], args[0]
        else:
            continue
        for name in _literal_names(arg, constants):
            yield name, kind


def _literal_names(arg, constants=None):
    """The names a metric-name argument can take: a string, a module-level string constant, an
    f-string (placeholders read "placeholder"), or either branch of ``a if cond else b``."""
    constants = constants or {}
    if isinstance(arg, ast.Constant) and isinstance(arg.value, str):
        yield arg.value
    elif isinstance(arg, ast.Name) and arg.id in constants:
        yield constants[arg.id]
    elif isinstance(arg, ast.JoinedStr):
        yield "".join(v.value if isinstance(v, ast.Constant) else "placeholder" for v in arg.values)
    elif isinstance(arg, ast.IfExp):
        yield from _literal_names(arg.body, constants)
        yield from _literal_names(arg.orelse, constants)


def _emitted_by_the_code():
    """(name, kind, file) of every task metric in plugins/, include/market_data/ and dags/; an
    f-string's placeholders read "placeholder"."""
    found = set()
    for folder in ("plugins", "include/market_data", "dags"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            for name, kind in _emitted_names(ast.parse(path.read_text(), str(path))):
                if name.split(".")[0] in EMITTED_PREFIXES:
                    found.add((name, kind, path.relative_to(ROOT).as_posix()))
    return found


def test_emitted_names_helper():
    tree = ast.parse(textwrap.dedent("""
        _emit("incr", "archive.download.count")
        _emit("timing", "archive.download.duration", 1.5)
        _emit("incr", f"archive.download.error.{status}")
        observability.incr(f"quality.{interval}.findings", 3)
        stats.gauge("binance.weight_used", 7)
        observability.incr("signal.generated" if ok else "signal.stale")
        self._emit(logging.INFO, "info", "event")
        TASK_FAILED_METRIC = "task.failed"
        observability.incr(TASK_FAILED_METRIC, tags={"dag_id": dag_id})
    """))
    assert sorted(_emitted_names(tree)) == [
        ("archive.download.count", "counter"), ("archive.download.duration", "observer"),
        ("archive.download.error.placeholder", "counter"), ("binance.weight_used", "gauge"),
        ("quality.placeholder.findings", "counter"), ("signal.generated", "counter"),
        ("signal.stale", "counter"), ("task.failed", "counter")]


def test_metric_names_emitted_by_the_code_are_mapped(mapper):
    found = _emitted_by_the_code()
    for prefix in EMITTED_PREFIXES:
        assert any(name.startswith(prefix + ".") for name, _, _ in found), f"scanner found no {prefix}.* metric"
    for name, kind, where in sorted(found):
        rule, prom_name, _ = mapper.map(f"airflow.{name}", kind)
        assert rule is not None and rule.get("action", "map") == "map", f"{where}: {kind} {name} is not mapped"


def _emitted_tags(tree):
    """(metric name, tag keys) of every stats call in a module that passes ``tags={...}``."""
    constants = {target.id: node.value.value for node in tree.body
                 if isinstance(node, ast.Assign) and isinstance(node.value, ast.Constant)
                 and isinstance(node.value.value, str)
                 for target in node.targets if isinstance(target, ast.Name)}
    for node in ast.walk(tree):
        if not (isinstance(node, ast.Call) and node.args):
            continue
        func = node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", None)
        tags = next((k.value for k in node.keywords if k.arg == "tags"), None)
        if func in ("incr", "decr", "gauge", "timing", "timer") and isinstance(tags, ast.Dict):
            for name in _literal_names(node.args[0], constants):
                yield name, {k.value for k in tags.keys if isinstance(k, ast.Constant)}


def test_tags_sent_by_the_code_are_the_listed_ones():
    """A tag becomes a label: the code tags a metric with exactly the labels TASK_METRICS lists (a run
    id or a symbol would multiply the series)."""
    found = {}
    for folder in ("plugins", "include/market_data", "dags"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            for name, keys in _emitted_tags(ast.parse(path.read_text(), str(path))):
                if name.split(".")[0] in EMITTED_PREFIXES:
                    found.setdefault(name, []).append((keys, path.relative_to(ROOT).as_posix()))
    assert "task.failed" in found, "the scanner found no tagged task.failed"
    for name, uses in found.items():
        for keys, where in uses:
            assert keys == set(TAG_LABELS.get(name, ())), f"{where}: {name} is tagged {sorted(keys)}"


def test_metric_names_emitted_by_the_code_are_listed():
    """Every emitted name is in DESIGN_METRICS or CODE_METRICS (so it is checked against the mapping,
    the dashboard and the wire), a placeholder standing for one name component."""
    listed = {(name, kind) for name, kind, _, _ in TASK_METRICS}
    for name, kind, where in sorted(_emitted_by_the_code()):
        pattern = re.compile("^" + re.escape(name).replace("placeholder", "[^.]+") + "$")
        assert any(pattern.match(n) and k == kind for n, k in listed), \
            f"{where}: {kind} {name} is in neither DESIGN_METRICS nor CODE_METRICS"


_PROBE = textwrap.dedent("""
    import datetime, json, os, socket, sys
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    sock.settimeout(2.0)
    os.environ["AIRFLOW__METRICS__STATSD_PORT"] = str(sock.getsockname()[1])
    from airflow.configuration import conf
    from airflow.sdk.observability import stats as task_stats       # what task code uses
    from airflow._shared.observability.metrics import stats as core_stats  # scheduler & co
    from airflow.observability.metrics import stats_utils
    core_stats.initialize(factory=stats_utils.get_stats_factory(),
                          export_legacy_names=conf.getboolean("metrics", "legacy_names_on"))
    for line in sys.stdin.read().splitlines():
        kind, name, tags = json.loads(line)
        kw = {"tags": tags} if tags else {}
        {"counter": lambda: task_stats.incr(name, **kw), "gauge": lambda: task_stats.gauge(name, 7.5, **kw),
         "observer": lambda: task_stats.timing(name, 12.5, **kw)}[kind]()
    core_stats.gauge("pool.open_slots", 3, tags={"pool_name": "binance_api"})
    core_stats.timing("dagrun.duration.success", dt=datetime.timedelta(seconds=5),
                      tags={"dag_id": "binance_klines_15m", "run_type": "scheduled"})
    core_stats.incr("ti_failures", tags={"dag_id": "binance_klines_15m", "task_id": "fetch"})
    task_stats.incr("ti.finish", tags={"dag_id": "binance_klines_15m", "task_id": "grp.fetch", "state": "failed"})
    task_stats.incr("ti.start", tags={"dag_id": "binance_klines_15m", "task_id": "grp.fetch"})
    while True:
        try:
            print(sock.recv(65535).decode())
        except socket.timeout:
            break
""")


def parse_statsd(line):
    """(name, tags, type) of one StatsD line with InfluxDB-style tags: ``name,k=v:1|c``."""
    head, rest = line.split(":", 1)
    name, *pairs = head.split(",")
    return name, dict(pair.split("=", 1) for pair in pairs), STATSD_TYPES[rest.split("|")[1]]


def test_what_airflow_really_sends_is_mapped(mapper, tmp_path):
    """Emit through Airflow 3.3.2's own stats backends, configured as the deployment is, to a UDP
    socket and map every line received."""
    env = dict(os.environ, AIRFLOW_HOME=str(tmp_path), AIRFLOW__METRICS__STATSD_ON="True",
               AIRFLOW__METRICS__STATSD_HOST="127.0.0.1", AIRFLOW__METRICS__STATSD_PREFIX="airflow",
               AIRFLOW__METRICS__LEGACY_NAMES_ON="False", AIRFLOW__METRICS__STATSD_INFLUXDB_ENABLED="True")
    lines = "\n".join(json.dumps([kind, name, task_metric_tags(name, labels)])
                      for name, kind, _, labels in TASK_METRICS)
    out = subprocess.run([sys.executable, "-c", _PROBE], input=lines, capture_output=True, text=True,
                         env=env, timeout=180, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-3000:]
    received = [parse_statsd(line) for line in out.stdout.split()]
    by_name = {}
    for name, tags, metric_type in received:
        by_name.setdefault(name, []).append((tags, metric_type))
    for name, metric_type, prom_name, labels in TASK_METRICS:
        assert by_name.get(f"airflow.{name}") == [(task_metric_tags(name, labels), metric_type)], \
            f"airflow.{name} not received once as {metric_type}: {by_name.get(f'airflow.{name}')}"
        assert mapper.map(f"airflow.{name}", metric_type, task_metric_tags(name, labels))[1:] == (prom_name, labels)
    wire = {
        "airflow.pool.open_slots": ("airflow_pool_open_slots", {"pool_name": "binance_api"}),
        "airflow.dagrun.duration.success":
            ("airflow_dagrun_duration_seconds", {"dag_id": "binance_klines_15m", "run_type": "scheduled",
                                                 "state": "success"}),
        "airflow.ti_failures": ("airflow_ti_failures_total", {"dag_id": "binance_klines_15m", "task_id": "fetch"}),
        "airflow.ti.finish":
            ("airflow_ti_finish_total", {"dag_id": "binance_klines_15m", "task_id": "grp.fetch", "state": "failed"}),
        "airflow.ti.start": None,
    }
    for name, expected in wire.items():
        assert len(by_name.get(name, [])) == 1, f"Airflow did not send {name} once; got {sorted(by_name)}"
        (tags, metric_type), = by_name[name]
        rule, prom_name, labels = mapper.map(name, metric_type, tags)
        if expected is None:
            assert rule is not None and rule.get("action") == "drop", name
        else:
            assert (prom_name, labels) == expected, name
    # no legacy twin ("pool.open_slots.binance_api", "ti.finish.<dag>.<task>.<state>", ...): no
    # name carries a DAG, task or pool name (Airflow adds a metric or two of its own, serde's timer)
    for name, _, _ in received:
        assert not re.search(r"binance_klines|binance_api|fetch", name), f"Airflow sent a legacy name: {name}"


# -- dashboard ---------------------------------------------------------------------------------------

def test_dashboard_structure(dashboard):
    assert dashboard["uid"] and dashboard["title"]
    assert dashboard["schemaVersion"] >= 39  # Grafana 11
    panels = list(all_panels(dashboard))
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids)), "duplicate panel ids"
    cells = {}
    for panel in panels:
        g = panel["gridPos"]
        assert 0 <= g["x"] and g["x"] + g["w"] <= 24 and g["h"] > 0, panel["title"]
        for x in range(g["x"], g["x"] + g["w"]):
            for y in range(g["y"], g["y"] + g["h"]):
                assert (x, y) not in cells, f"{panel['title']} overlaps {cells[(x, y)]}"
                cells[(x, y)] = panel["title"]
        if panel["type"] != "row":
            assert panel["type"] in ("timeseries", "stat", "bargauge", "gauge", "table", "barchart")
            refs = [t["refId"] for t in panel["targets"]]
            assert refs and len(refs) == len(set(refs)), panel["title"]
    variables = {v["name"] for v in dashboard["templating"]["list"]}
    for panel, expr in all_exprs(dashboard):
        for var in re.findall(r"\$\{?(\w+)", expr + panel["title"]):
            assert var in variables | GRAFANA_BUILTINS, f"{panel['title']}: unknown variable ${var}"
    interval_var = next(v for v in dashboard["templating"]["list"] if v["name"] == "interval")
    assert interval_var["query"].split(",") == list(INTERVALS)


def test_dashboard_promql_uses_only_mapped_metrics_and_labels(mapper, dashboard):
    series = mapper.produced_series(TAGGED_LABELS)
    for panel, expr in all_exprs(dashboard):
        where = f"{panel['title']}: {expr}"
        for open_, close in ("()", "[]", "{}"):
            assert expr.count(open_) == expr.count(close), f"unbalanced {open_}{close} in {where}"
        names, matchers, grouping = promql_parts(expr)
        unknown = names - set(series)
        assert not unknown, f"{where} uses metrics the mapping never produces: {unknown}"
        for metric, labels in matchers.items():
            assert labels <= series[metric] | PROMETHEUS_TARGET_LABELS, f"{where}: bad label matcher {labels}"
        available = set().union(*(series[n] for n in names)) | PROMETHEUS_TARGET_LABELS if names else set()
        assert grouping <= available, f"{where}: grouping by labels {grouping - available} that do not exist"


def test_dashboard_has_the_required_panels(dashboard):
    exprs = [expr for _, expr in all_exprs(dashboard)]
    joined = "\n".join(exprs)
    assert re.search(r"vector\(\s*6000\s*\*\s*0\.8\s*\)", joined), "weight budget line 6000*0.8"
    assert re.search(r"sum by \(status\) \(rate\(airflow_binance_request_errors_total", joined)
    assert re.search(r"histogram_quantile\(0\.5,.*airflow_binance_request_duration_seconds_bucket", joined)
    assert re.search(r"histogram_quantile\(0\.95,.*airflow_binance_request_duration_seconds_bucket", joined)
    assert re.search(r"histogram_quantile\(0\.95,.*airflow_archive_download_duration_seconds_bucket", joined)
    assert re.search(r"sum by \(interval\) \(increase\(airflow_quality_findings_total\{[^}]*\}\[\$__range\]\)\)", joined), \
        "quality findings per interval over the range"
    assert 'pool_name="$pool"' in joined
    pool_var = next(v for v in dashboard["templating"]["list"] if v["name"] == "pool")
    assert pool_var["query"] == "binance_api"
    lag_panels = [p for p in all_panels(dashboard)
                  if any("airflow_ingest_lag_seconds" in t.get("expr", "") for t in p.get("targets", []))]
    assert any(len(p["fieldConfig"]["defaults"]["thresholds"]["steps"]) >= 2 for p in lag_panels)
    per_interval = {o["matcher"]["options"] for p in lag_panels for o in p["fieldConfig"]["overrides"]
                    if any(prop["id"] == "thresholds" for prop in o["properties"])}
    assert per_interval == set(INTERVALS), "lag thresholds per interval"


def test_make_run_and_the_standalone_e2e_give_task_clients_the_same_start_up_retries():
    """The start-up race fix (tasks handed out before the api-server answers) is the Makefile's, and the
    e2e test on airflow standalone runs with exactly it."""
    from tests.e2e.helpers import EXECUTION_API_RETRY_ENV

    makefile = (ROOT / "Makefile").read_text()
    for key, value in EXECUTION_API_RETRY_ENV.items():
        assert re.search(rf"^export {key} \?= {value}$", makefile, re.M), key
