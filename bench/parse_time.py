"""How long Airflow takes to parse each DAG file in dags/.

1. ``airflow dags report -o json`` (the CLI's own per-file parse duration: one DagBag
   parsing every file in turn, so the first file also pays for imports shared with the
   others), run ``--repeats`` times in a throw-away AIRFLOW_HOME (``airflow db migrate``
   first); the median per file is reported. Goal: the files' total <= 0.1 s.
2. Each file alone, in a fresh interpreter that has already imported Airflow's DagBag and
   ``airflow.sdk`` (as a DAG processor has): what one file costs when nothing of the
   project is imported yet. Also the median of ``--repeats``.

Falls back to (2) only if the CLI fails.

    .venv/bin/python bench/parse_time.py [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
DAGS = REPO_ROOT / "dags"
GOAL_S = 0.1

# Run in a child: parse one file with DagBag, print its FileLoadStat as JSON.
_ISOLATED = """
import json, sys, time
import airflow.sdk  # noqa: F401 - loaded before timing, as in a DAG processor
from airflow.dag_processing.dagbag import DagBag
bag = DagBag(dag_folder=sys.argv[1], load_op_links=False)
stats = [{"file": s.file, "duration_s": s.duration.total_seconds(), "dags": s.dag_num, "tasks": s.task_num}
         for s in bag.dagbag_stats]
print(json.dumps({"stats": stats, "errors": {k: v[-300:] for k, v in bag.import_errors.items()}}))
"""


def airflow_env(home: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.update({
        "AIRFLOW_HOME": str(home),
        "AIRFLOW__CORE__DAGS_FOLDER": str(DAGS),
        "AIRFLOW__CORE__PLUGINS_FOLDER": str(REPO_ROOT / "plugins"),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "AIRFLOW__METRICS__STATSD_ON": "False",
        "AIRFLOW__LOGGING__LOGGING_LEVEL": "ERROR",
        "PYTHONPATH": os.pathsep.join(p for p in (str(REPO_ROOT), str(REPO_ROOT / "plugins"),
                                                  os.environ.get("PYTHONPATH")) if p),
        "PYTHONWARNINGS": "ignore",
    })
    return env


def airflow_cli() -> list[str]:
    candidate = Path(sys.executable).with_name("airflow")
    return [str(candidate)] if candidate.exists() else [sys.executable, "-m", "airflow"]


def _seconds(text: str) -> float:
    """'0:00:00.058857' -> 0.058857"""
    hours, minutes, seconds = text.split(":")
    return int(hours) * 3600 + int(minutes) * 60 + float(seconds)


def cli_report(env: dict[str, str]) -> dict[str, float]:
    result = subprocess.run([*airflow_cli(), "dags", "report", "-o", "json"], env=env, cwd=REPO_ROOT,
                            capture_output=True, text=True, timeout=300, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"airflow dags report failed ({result.returncode}): {result.stderr[-500:]}")
    # Warnings may share stdout with the JSON: take the last line that is a JSON array.
    line = next(l for l in reversed(result.stdout.splitlines()) if l.startswith("["))
    return {row["file"]: _seconds(row["duration"]) for row in json.loads(line)}


def isolated(env: dict[str, str], path: Path) -> dict:
    result = subprocess.run([sys.executable, "-c", _ISOLATED, str(path)], env=env, cwd=REPO_ROOT,
                            capture_output=True, text=True, timeout=300, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"DagBag on {path.name} failed: {result.stderr[-500:]}")
    answer = json.loads(result.stdout.strip().splitlines()[-1])
    if answer["errors"]:
        raise RuntimeError(f"import errors in {path.name}: {answer['errors']}")
    return answer["stats"][0]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    files = sorted(p for p in DAGS.glob("*.py") if not p.name.startswith("_"))
    home = Path(tempfile.mkdtemp(prefix="bench_parse_home_"))
    env = airflow_env(home)
    try:
        cli: dict[str, list[float]] = {}
        cli_error = None
        try:
            migrate = subprocess.run([*airflow_cli(), "db", "migrate"], env=env, cwd=REPO_ROOT,
                                     capture_output=True, text=True, timeout=300, check=False)
            if migrate.returncode != 0:
                raise RuntimeError(f"airflow db migrate failed: {migrate.stderr[-500:]}")
            for _ in range(args.repeats):
                for name, seconds in cli_report(env).items():
                    cli.setdefault(name, []).append(seconds)
        except (RuntimeError, subprocess.TimeoutExpired, StopIteration, ValueError) as exc:
            cli_error = str(exc)
            print(f"airflow dags report unusable ({cli_error[:200]}); falling back to DagBag per file")

        alone: dict[str, list[float]] = {}
        counts: dict[str, tuple[int, int]] = {}
        for path in files:
            for _ in range(args.repeats):
                stat = isolated(env, path)
                alone.setdefault(path.name, []).append(stat["duration_s"])
                counts[path.name] = (stat["dags"], stat["tasks"])

        print(f"DAG parse time, median of {args.repeats}, seconds (load average {os.getloadavg()[0]:.1f} "
              f"on {os.cpu_count()} cores)")
        print(f"  {'file':<22} {'dags':>4} {'tasks':>5} {'dags report':>12} {'alone':>8}")
        for path in files:
            dags, tasks = counts[path.name]
            in_cli = f"{statistics.median(cli[path.name]):>12.3f}" if path.name in cli else f"{'-':>12}"
            print(f"  {path.name:<22} {dags:>4} {tasks:>5} {in_cli} {statistics.median(alone[path.name]):>8.3f}")
        total_alone = sum(statistics.median(v) for v in alone.values())
        if cli:
            total = sum(statistics.median(v) for v in cli.values())
            source = "dags report"
        else:
            total, source = total_alone, "DagBag per file"
        print(f"  {'total':<22} {'':>4} {'':>5} "
              + (f"{total:>12.3f}" if cli else f"{'-':>12}") + f" {total_alone:>8.3f}")
        print(f"SUMMARY parse_time: all DAG files {total:.3f} s ({source}; each alone: {total_alone:.3f} s) "
              f"{'met' if total <= GOAL_S else 'MISSED'} (<={GOAL_S:g} s)")
    finally:
        shutil.rmtree(home, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
