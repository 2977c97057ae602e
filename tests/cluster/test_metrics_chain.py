"""The metrics chain without an Airflow cluster: Airflow's StatsD client -> the statsd-exporter
stand-in applying include/statsd/mapping.yml -> real Prometheus (Debian's 2.42) with the alert rules
of include/prometheus/alerts.yml -> every PromQL expression of the Grafana dashboard.

* promtool checks the rules and the configs, and runs the rules' unit tests (alerts_test.yml), each
  alert tested firing and quiet;
* real StatsD packets, sent through Airflow's own stats clients (the project's ``emit`` helper for
  task metrics, Airflow's core client for the scheduler's metrics) with the settings the deployment
  uses (``legacy_names_on = False``, ``statsd_influxdb_enabled = True``), come out of Prometheus with
  the names, labels and values the mapping promises; legacy / unmapped names never reach it; every
  dashboard expression returns data; alerts fire through the whole chain.
"""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
import textwrap
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

from tests.cluster import prometheus as prom
from tests.cluster import statsd_standin
from tests.test_deployment import TASK_METRICS, task_metric_tags

ROOT = Path(__file__).resolve().parents[2]
ALERTS = ROOT / "include" / "prometheus" / "alerts.yml"
ALERTS_TEST = Path(__file__).with_name("alerts_test.yml")
MAPPING = ROOT / "include" / "statsd" / "mapping.yml"
PERIOD_S = {"15m": 900, "30m": 1800, "1h": 3600, "4h": 14400, "1d": 86400, "1w": 604800}

pytestmark = pytest.mark.skipif(not (Path(prom.PROMETHEUS_BIN).exists() and Path(prom.PROMTOOL_BIN).exists()),
                                reason="needs Prometheus and promtool (apt-get install prometheus)")


def promtool(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([prom.PROMTOOL_BIN, *args], capture_output=True, text=True, timeout=120, cwd=ROOT)


def alert_rules() -> list[dict]:
    return [r for g in yaml.safe_load(ALERTS.read_text())["groups"] for r in g["rules"] if "alert" in r]


def all_rules() -> list[dict]:
    return [r for g in yaml.safe_load(ALERTS.read_text())["groups"] for r in g["rules"]]


# -- promtool ------------------------------------------------------------------------------------

def test_promtool_checks_the_alert_rules():
    out = promtool("check", "rules", str(ALERTS))
    assert out.returncode == 0, out.stdout + out.stderr
    assert f"SUCCESS: {len(all_rules())} rules found" in out.stdout


def test_promtool_checks_the_deployed_and_the_local_config(tmp_path):
    out = promtool("check", "config", str(prom.PROMETHEUS_CONFIG))  # rule_files relative to it
    assert out.returncode == 0, out.stdout + out.stderr
    assert "SUCCESS: 1 rule files found" in out.stdout
    local = tmp_path / "prometheus.yml"
    local.write_text(yaml.safe_dump(prom.local_config("127.0.0.1:9102", "127.0.0.1:9090")))
    out = promtool("check", "config", str(local))
    assert out.returncode == 0, out.stdout + out.stderr
    assert str(ALERTS) in out.stdout


def test_alert_rules_pass_their_unit_tests():
    out = promtool("test", "rules", str(ALERTS_TEST))
    assert out.returncode == 0, out.stdout + out.stderr
    assert "SUCCESS" in out.stdout


def test_every_alert_has_a_firing_and_a_quiet_case():
    cases = [c for t in yaml.safe_load(ALERTS_TEST.read_text())["tests"] for c in t.get("alert_rule_test", [])]
    for name in {r["alert"] for r in alert_rules()}:
        mine = [c for c in cases if c["alertname"] == name]
        assert any(c.get("exp_alerts") for c in mine), f"{name}: no test case where it fires"
        assert any(not c.get("exp_alerts") for c in mine), f"{name}: no test case where it must stay quiet"


def test_alert_annotations_name_the_labels():
    for rule in alert_rules():
        annotations = rule.get("annotations") or {}
        assert annotations.get("summary") and annotations.get("description"), rule["alert"]
        text = annotations["summary"] + annotations["description"]
        kept = {label.strip() for group in re.findall(r"\bby \(([^)]*)\)", rule["expr"]) for label in group.split(",")}
        kept |= set(rule.get("labels") or {}) - {"severity"}
        for label in kept:
            assert f"$labels.{label}" in text, f"{rule['alert']}: annotations do not name {label}"
        assert rule["labels"]["severity"] in ("warning", "critical"), rule["alert"]
    # the alerts a user expects (issue 14)
    names = {r["alert"] for r in alert_rules()}
    assert {"IngestLagOverFreshnessLimit", "IngestStalled", "BinanceBanned", "BinanceRateLimitedSustained",
            "TaskFailed", "SignalStale", "SignalMissing"} <= names


def _freshness_limits() -> dict[str, int]:
    record = next(r for r in all_rules() if r.get("record") == "market_data:ingest_freshness_limit_seconds")
    found = re.findall(r'label_replace\(vector\((\d+)\), "interval", "(\w+)", "", ""\)', record["expr"])
    return {interval: int(value) for value, interval in found}


def test_freshness_limits_are_two_periods_plus_15_min_everywhere():
    limits = _freshness_limits()
    assert limits == {i: 2 * p + 900 for i, p in PERIOD_S.items()}
    # IngestStalled: one rule per interval, its window (range and offset) = the interval's limit
    stalled = [r for r in alert_rules() if r["alert"] == "IngestStalled"]
    assert sorted(r["labels"]["interval"] for r in stalled) == sorted(PERIOD_S)
    template = None
    for rule in stalled:
        interval = rule["labels"]["interval"]
        windows = re.findall(r"\[(\w+)\]|offset (\w+)", rule["expr"])
        assert len(windows) == 2, rule["expr"]
        for window in (w[0] or w[1] for w in windows):
            assert prom._seconds(window) == limits[interval], (interval, window)
        assert re.findall(r'interval="(\w+)"', rule["expr"]) == [interval] * 3
        shape = re.sub(r'interval="\w+"|\[\w+\]|offset \w+', "_", rule["expr"])
        assert template in (None, shape), "the six IngestStalled rules differ beyond interval and window"
        template = shape
    # the dashboard's lag panel turns red at the same limit
    board = json.loads(prom.DASHBOARD.read_text())
    panel = next(p for p in board["panels"] if p.get("title", "").startswith("Ingest lag (now"))
    red = {o["matcher"]["options"]: o["properties"][0]["value"]["steps"][-1]["value"]
           for o in panel["fieldConfig"]["overrides"]}
    assert red == limits


# -- the stand-in on its own -----------------------------------------------------------------------

def _exposed(exporter) -> dict[str, float]:
    out = {}
    for line in exporter.exposition().splitlines():
        if line and not line.startswith("#"):
            key, value = line.rsplit(" ", 1)
            out[key] = float(value)
    return out


def test_standin_follows_the_exporter_where_the_mapping_relies_on_it():
    mapping = {"defaults": {"observer_type": "histogram", "histogram_options": {"buckets": [0.1, 1]}},
               "mappings": [
                   {"match": "^app\\.(\\w+)\\.hits$", "match_type": "regex", "name": "regex_${1}_total"},
                   {"match": "app.*.hits", "name": "glob_hits_total", "match_metric_type": "counter",
                    "labels": {"page": "$1", "source": "rule"}},
                   {"match": "app.skip", "name": "dropped", "action": "drop"}]}
    exporter = statsd_standin.Exporter(statsd_standin.Mapper(mapping))
    for line in ("app.home.hits,source=tag,user=u1:2|c",  # glob before regex; the rule's label wins
                 "app.home.hits,user=u1:1|c|@0.5",  # sampled: counts 2
                 "app.home.hits:1|g",  # a gauge: the glob rule is for counters, the regex maps it
                 "app.skip:1|c", "legacy.ti.start.my-dag.my_task:1|c",  # dropped; unmapped, escaped
                 "app.lat:250|ms\napp.lat:1500|ms", "app.level:5|g\napp.level:-2|g", "app.tags:1|c|#k:v"):
        exporter.handle_datagram(line.encode())
    got = _exposed(exporter)
    assert got['glob_hits_total{page="home",source="rule",user="u1"}'] == 4
    assert got['regex_home_total'] == 1
    assert got["legacy_ti_start_my_dag_my_task"] == 1
    assert got['app_lat_bucket{le="0.1"}'] == 0 and got['app_lat_bucket{le="1"}'] == 1
    assert got['app_lat_bucket{le="+Inf"}'] == got["app_lat_count"] == 2 and got["app_lat_sum"] == 1.75
    assert got["app_level"] == 3
    assert got['app_tags{k="v"}'] == 1
    assert got['statsd_exporter_events_actions_total{action="drop"}'] == 1
    assert got["statsd_exporter_events_unmapped_total"] == 6  # legacy 1, app.lat 2, app.level 2, app.tags 1
    with pytest.raises(ValueError, match="not implemented"):
        statsd_standin.Mapper({"mappings": [{"match": "a.b", "name": "x", "ttl": "1m"}],
                               "defaults": {"observer_type": "histogram"}})


# -- the chain: Airflow's clients -> stand-in -> Prometheus ------------------------------------------

_EMITTER = textwrap.dedent("""
    import datetime, json, sys
    from airflow.sdk.observability import stats as sdk_stats                 # task code's client
    from airflow._shared.observability.metrics import stats as core_stats    # scheduler & co
    from airflow.observability.metrics import stats_utils
    from airflow.configuration import conf
    from binance_provider.metrics import emit                                # the project's one helper
    core_stats.initialize(factory=stats_utils.get_stats_factory(),
                          export_legacy_names=conf.getboolean("metrics", "legacy_names_on"))
    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        batch = json.loads(line)
        for m in batch:
            kind, name, value, tags = m["kind"], m["name"], m["value"], m.get("tags")
            if m["client"] == "project":
                emit(kind, name, value, tags=tags)
            else:
                client = core_stats if m["client"] == "core" else sdk_stats
                if kind == "timing":
                    value = datetime.timedelta(milliseconds=value)
                getattr(client, kind)(name, value, **({"tags": tags} if tags else {}))
        print(json.dumps({"sent": len(batch)}), flush=True)
""")


class Emitter:
    """One Python process with Airflow's stats clients configured by environment, as in a worker."""

    def __init__(self, airflow_env: dict[str, str], airflow_home: Path):
        assert airflow_env["AIRFLOW__METRICS__LEGACY_NAMES_ON"] == "False"
        assert airflow_env["AIRFLOW__METRICS__STATSD_INFLUXDB_ENABLED"] == "True"
        env = dict(os.environ, AIRFLOW_HOME=str(airflow_home), **airflow_env)
        self.process = subprocess.Popen([sys.executable, "-c", _EMITTER], cwd=ROOT, env=env, text=True,
                                        stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        assert json.loads(self.process.stdout.readline()) == {"ready": True}

    def send(self, batch: list[dict]) -> None:
        self.process.stdin.write(json.dumps(batch) + "\n")
        self.process.stdin.flush()
        line = self.process.stdout.readline()
        assert line, f"emitter died: exit code {self.process.poll()}"
        assert json.loads(line) == {"sent": len(batch)}

    def close(self) -> None:
        self.process.stdin.close()
        self.process.wait(30)


class Chain:
    """:func:`prom.start_chain` (what the cluster test uses) and an :class:`Emitter` configured with
    its ``airflow_env``."""

    def __init__(self, tmp: Path):
        self.metrics = prom.start_chain(tmp, MAPPING)
        self.standin, self.prometheus = self.metrics.standin, self.metrics.prometheus
        try:
            self.emitter = Emitter(self.metrics.airflow_env, tmp / "airflow-home")
        except BaseException:
            self.metrics.stop()
            raise

    def value(self, expr: str) -> float | None:
        rows = prom.query(self.prometheus.url, expr)
        assert len(rows) <= 1, f"{expr}: {rows}"
        return rows[0]["value"] if rows else None

    def wait_for(self, expr: str, ok, timeout: float = 30):
        deadline = time.monotonic() + timeout
        while True:
            value = self.value(expr)
            if value is not None and ok(value):
                return value
            assert time.monotonic() < deadline, f"{expr} = {value} after {timeout} s"
            time.sleep(0.3)

    def served(self, series: str) -> float:
        """A value the stand-in serves right now (not yet scraped)."""
        with urllib.request.urlopen(self.standin.url, timeout=10) as response:
            for line in response.read().decode().splitlines():
                if line.startswith(series + " "):
                    return float(line.rsplit(" ", 1)[1])
        return 0.0

    def send(self, batch: list[dict]) -> None:
        """Send; wait until the stand-in has received all of it and Prometheus has scraped it since."""
        before = self.served("statsd_exporter_samples_total")
        self.emitter.send(batch)
        deadline = time.monotonic() + 30
        while (now := self.served("statsd_exporter_samples_total")) < before + len(batch):
            assert time.monotonic() < deadline, f"the stand-in received {now - before} of {len(batch)} samples"
            time.sleep(0.1)
        self.wait_for("statsd_exporter_samples_total", lambda v: v >= now)

    def stop(self) -> None:
        try:
            self.emitter.close()
        finally:
            self.metrics.stop()


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    chain = Chain(tmp_path_factory.mktemp("metrics-chain"))
    yield chain
    chain.stop()


def _selector(name: str, labels: dict[str, str]) -> str:
    return name + "{" + ",".join(f'{k}="{v}"' for k, v in sorted(labels.items())) + "}"


AIRFLOW_OWN = [  # as the scheduler, executor and task runner of Airflow 3.3.2 call them (tags included)
    {"client": "core", "kind": "gauge", "name": "pool.open_slots", "value": 3, "tags": {"pool_name": "binance_api"}},
    {"client": "core", "kind": "gauge", "name": "pool.queued_slots", "value": 2, "tags": {"pool_name": "binance_api"}},
    {"client": "core", "kind": "gauge", "name": "pool.running_slots", "value": 1, "tags": {"pool_name": "binance_api"}},
    {"client": "core", "kind": "gauge", "name": "pool.deferred_slots", "value": 0, "tags": {"pool_name": "binance_api"}},
    {"client": "core", "kind": "gauge", "name": "pool.scheduled_slots", "value": 4, "tags": {"pool_name": "binance_api"}},
    {"client": "core", "kind": "gauge", "name": "pool.starving_tasks", "value": 5, "tags": {"pool_name": "binance_api"}},
    {"client": "core", "kind": "gauge", "name": "executor.open_slots", "value": 12,
     "tags": {"status": "open", "executor_class_name": "CeleryExecutor"}},
    {"client": "core", "kind": "gauge", "name": "executor.queued_tasks", "value": 1,
     "tags": {"status": "queued", "executor_class_name": "CeleryExecutor"}},
    {"client": "core", "kind": "gauge", "name": "executor.running_tasks", "value": 4,
     "tags": {"status": "running", "executor_class_name": "CeleryExecutor"}},
    {"client": "core", "kind": "incr", "name": "scheduler_heartbeat", "value": 1},
    {"client": "core", "kind": "gauge", "name": "dag_processing.import_errors", "value": 0},
    {"client": "core", "kind": "timing", "name": "dagrun.duration.success", "value": 42_000,
     "tags": {"dag_id": "binance_klines_15m", "run_type": "scheduled"}},
    {"client": "core", "kind": "incr", "name": "ti_failures", "value": 1,
     "tags": {"dag_id": "binance_klines_15m", "task_id": "fetch"}},
    {"client": "sdk", "kind": "incr", "name": "ti_successes", "value": 1,
     "tags": {"dag_id": "binance_klines_15m", "task_id": "write_raw"}},
    {"client": "sdk", "kind": "incr", "name": "ti.finish", "value": 1,
     "tags": {"dag_id": "binance_klines_15m", "task_id": "fetch", "state": "failed"}},
]  # (task.failed and signal.deadline_missed, tagged too, are among TASK_METRICS)
# (Prometheus series, labels, expected increase or value) of AIRFLOW_OWN
AIRFLOW_OWN_EXPECTED = [
    ("airflow_pool_open_slots", {"pool_name": "binance_api"}, 3),
    ("airflow_pool_scheduled_slots", {"pool_name": "binance_api"}, 4),
    ("airflow_pool_starving_tasks", {"pool_name": "binance_api"}, 5),
    ("airflow_executor_open_slots", {"status": "open", "executor_class_name": "CeleryExecutor"}, 12),
    ("airflow_dagrun_duration_seconds_sum", {"dag_id": "binance_klines_15m", "run_type": "scheduled",
                                             "state": "success"}, 42),
    ("airflow_ti_failures_total", {"dag_id": "binance_klines_15m", "task_id": "fetch"}, 1),
    ("airflow_ti_finish_total", {"dag_id": "binance_klines_15m", "task_id": "fetch", "state": "failed"}, 1),
]
# What must never reach Prometheus: legacy names (variables in the name), Airflow metrics nobody
# mapped, a project metric sent with the wrong type.
UNMAPPED = [
    {"client": "core", "kind": "incr", "name": "ti.start.mydag.mytask", "value": 1},
    {"client": "core", "kind": "gauge", "name": "pool.open_slots.mypool", "value": 3},
    {"client": "core", "kind": "gauge", "name": "pool.scheduled_slots.mypool", "value": 3},
    {"client": "core", "kind": "timing", "name": "dag.mydag.mytask.duration", "value": 5},
    {"client": "core", "kind": "timing", "name": "dagrun.schedule_delay.mydag", "value": 5},
    {"client": "core", "kind": "incr", "name": "schedulerjob_start", "value": 1},
    {"client": "sdk", "kind": "incr", "name": "ti.start", "value": 1, "tags": {"dag_id": "mydag", "task_id": "mytask"}},
    {"client": "project", "kind": "gauge", "name": "ingest.15m.candles", "value": 1},
]


def _task_batch() -> tuple[list[dict], list[tuple[str, dict, float, str]]]:
    """Every DESIGN/CODE metric once (distinct values; tagged ones with their tags), and what
    Prometheus must show for each: (series, labels, expected, "increase" | "value")."""
    batch, expected = [], []
    for i, (name, metric_type, prom_name, labels) in enumerate(TASK_METRICS):
        sent = {"client": "project", "name": name, "tags": task_metric_tags(name, labels)}
        if metric_type == "counter":
            count = i % 4 + 1
            batch.append({**sent, "kind": "incr", "value": count})
            expected.append((prom_name, labels, count, "increase"))
        elif metric_type == "gauge":
            value = 100.5 + i
            batch.append({**sent, "kind": "gauge", "value": value})
            expected.append((prom_name, labels, value, "value"))
        else:
            batch += [{**sent, "kind": "timing", "value": ms} for ms in (250, 1500)]
            expected += [(prom_name + "_count", labels, 2, "increase"), (prom_name + "_sum", labels, 1.75, "increase"),
                         (prom_name + "_bucket", {**labels, "le": "+Inf"}, 2, "increase")]
    return batch, expected


def _mapped_series_names() -> set[str]:
    names = set()
    for rule in yaml.safe_load(MAPPING.read_text())["mappings"]:
        if rule.get("action") == "drop":
            continue
        if rule.get("match_metric_type") == "observer":
            names |= {rule["name"] + s for s in ("_bucket", "_sum", "_count")}
        else:
            names.add(rule["name"])
    return names


def test_metrics_sent_by_airflow_reach_prometheus_mapped(chain):
    batch, expected = _task_batch()
    own_expected = [(s, labels, v, "value" if not s.endswith(("_total", "_sum")) else "increase")
                    for s, labels, v in AIRFLOW_OWN_EXPECTED]
    checks = expected + own_expected
    before = {(s, json.dumps(labels, sort_keys=True)): chain.value(_selector(s, labels)) or 0
              for s, labels, _, kind in checks if kind == "increase"}
    drops_before = chain.served('statsd_exporter_events_actions_total{action="drop"}')
    chain.send(batch + AIRFLOW_OWN + UNMAPPED)
    for series, labels, want, kind in checks:
        got = chain.value(_selector(series, labels))
        assert got is not None, f"{_selector(series, labels)} is not in Prometheus"
        if kind == "increase":
            got -= before[(series, json.dumps(labels, sort_keys=True))]
        assert math.isclose(got, want, rel_tol=1e-9), f"{_selector(series, labels)}: {got}, expected {want}"
    # labels: exactly the mapping's and the tags', plus the target labels Prometheus adds
    rows = prom.query(chain.prometheus.url, 'airflow_ingest_candles_total{interval="15m"}')
    assert set(rows[0]["metric"]) == {"__name__", "interval", "job", "instance", "deployment"}
    rows = prom.query(chain.prometheus.url, "airflow_task_failed_total")
    assert {frozenset(r["metric"]) for r in rows} == {
        frozenset({"__name__", "dag_id", "task_id", "job", "instance", "deployment"})}

    # nothing unmapped got through, yet it all arrived: the exporter dropped each sample
    drops = chain.served('statsd_exporter_events_actions_total{action="drop"}') - drops_before
    assert drops == len(UNMAPPED)
    assert chain.value("statsd_exporter_events_unmapped_total") == 0
    names = {r["metric"]["__name__"] for r in prom.query(chain.prometheus.url, 'group by (__name__) ({job="airflow-statsd"})')}
    scrape = {"up", "scrape_duration_seconds", "scrape_samples_scraped", "scrape_samples_post_metric_relabeling",
              "scrape_series_added"}
    assert names - scrape - _mapped_series_names() == {n for n in names if n.startswith("statsd_exporter_")}
    leaked = prom.query(chain.prometheus.url,
                        'group by (__name__) ({__name__=~".*(mydag|mytask|mypool|binance_api|binance_klines|'
                        'daily_signal|schedulerjob|ti_start|schedule_delay).*"})')
    assert leaked == [], f"a DAG, task or pool name in a metric name: {leaked}"
    assert prom.query(chain.prometheus.url, '{dag_id="mydag"}') == []


def test_every_dashboard_expression_returns_data(chain):
    """With every metric of the dashboard sent once, each of its expressions, fallbacks stripped,
    returns series from real Prometheus (a second scrape first, for rate() and increase())."""
    batch, _ = _task_batch()
    chain.send(batch + AIRFLOW_OWN)
    chain.send([{"client": "project", "kind": "incr", "name": "binance.request.count", "value": 1}])
    results = chain.metrics.evaluate_dashboard(strict=True)
    assert len(results) >= 40
    empty = [expr for expr, n in results.items() if n == 0]
    assert not empty, "dashboard expressions without data:\n" + "\n".join(empty)


def test_alerts_fire_through_the_whole_chain(chain):
    """A 418 and a failed task, each counted twice a scrape apart: Prometheus fires BinanceBanned and
    TaskFailed (with the DAG and task as labels) from the rules it loaded."""
    groups = prom.api(chain.prometheus.url, "rules")["groups"]
    loaded = [r for g in groups for r in g["rules"]]
    assert len(loaded) == len(all_rules())
    assert all(r["health"] == "ok" and not r.get("lastError") for r in loaded), loaded
    events = [{"client": "project", "kind": "incr", "name": "binance.banned", "value": 1},
              {"client": "project", "kind": "incr", "name": "task.failed", "value": 1,
               "tags": {"dag_id": "binance_klines_1h", "task_id": "gap_check"}}]
    chain.send(events)
    time.sleep(1.5)  # at least one scrape in between
    chain.send(events)
    chain.wait_for('count(ALERTS{alertname="BinanceBanned", alertstate="firing"})', lambda v: v == 1)
    chain.wait_for('count(ALERTS{alertname="TaskFailed", alertstate="firing", dag_id="binance_klines_1h",'
                   ' task_id="gap_check"})', lambda v: v == 1)
    alerts = prom.api(chain.prometheus.url, "alerts")["alerts"]
    failed = next(a for a in alerts if a["labels"]["alertname"] == "TaskFailed"
                  and a["labels"].get("task_id") == "gap_check")
    assert failed["annotations"]["summary"] == "Task binance_klines_1h.gap_check failed"
