"""Full-history backfill of all six timeframes through DataIngestion, against the sandbox.

Two timed runs, each into a fresh RAW_DATA_DIR, of BTCUSDT from INGEST_START
(2017-08-17) to now for 15m 30m 1h 4h 1d 1w:

A. latency  - the sandbox adds ``--latency-ms`` (50) to every request, its weight limit is
   Binance's 6000/min (never binding here). Intervals run one after another, each paging
   with BINANCE_MAX_CONCURRENCY (4) requests in flight: so at most ``concurrency`` requests
   are ever in flight and ``requests x latency / concurrency`` is a true lower bound
   ("floor") on the wall time. Goal: wall / floor <= 1.25. Fetching, gap checks and
   writes (one Parquet file per day) overlap, a month at a time; the client's CPU seconds are printed.
B. budget   - sandbox limit and client BINANCE_RATE_LIMIT_WEIGHT lowered (300 per 5 s window,
   client safety 0.8 -> budget 240) so the client's limiter binds. The six intervals run
   concurrently (as six DAGs would; they share the process-wide limiter), so one interval's
   write phase does not idle the budget. Weight per window is counted by the sandbox
   (what it would report in X-MBX-USED-WEIGHT-1M); the windows strictly between the first
   and the last request are "full" windows. Goals: mean used / budget >= 90 %, no 418.

Fairness of the sandbox: it runs in its own process (its GIL is not the client's, as in a
demo), and it synthesizes candles on demand (a day of 1-minute data per first touch, kept
in an LRU of 384 days). The child process enlarges that LRU to hold the whole history and
every page is fetched once, untimed and without latency, before the runs: the timed runs
then measure the client plus a warm server. Server and client CPU seconds are printed.

    .venv/bin/python bench/backfill.py [--latency-ms 50] [--intervals 15m,30m,1h,4h,1d,1w]
        [--budget-weight 300 --budget-window-s 5] [--skip-latency] [--skip-budget]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
for _entry in (str(REPO_ROOT / "plugins"), str(REPO_ROOT)):
    if _entry not in sys.path:
        sys.path.insert(0, _entry)

SYMBOL = "BTCUSDT"
INTERVALS = ("15m", "30m", "1h", "4h", "1d", "1w")
HISTORY_START = "2017-08-17"
# The synthetic market caches one (9 x 1440) int64 array per day (~104 kB): 5000 days ~ 0.5 GB.
SANDBOX_CACHE_DAYS = 5000
WARM_THREADS = 2


# -- the sandbox child process ------------------------------------------------------------------
def serve_sandbox(cache_days: int) -> int:
    """Child: a sandbox on a free port, driven by one-line commands on stdin (answers on stdout)."""
    from include.binance_sandbox import SandboxServer

    server = SandboxServer(host="127.0.0.1", port=0, seed=42, weight_limit=10**12, window_s=60.0,
                           cache_days=cache_days)  # keep every synthesized day (see docstring)
    limiter = server._limiter
    per_window: dict[int, int] = {}  # window index -> weight the server counted in it
    lock = threading.Lock()
    admit = limiter.admit

    def counting_admit(client, weight, *args, **kwargs):
        admission = admit(client, weight, *args, **kwargs)
        window = limiter._clients[client].window
        with lock:
            per_window[window] = max(per_window.get(window, 0), admission.used_weight)
        return admission

    limiter.admit = counting_admit
    server.start()
    print(server.url, flush=True)
    for line in sys.stdin:
        command, _, arg = line.strip().partition(" ")
        if command == "configure":  # {"weight_limit", "window_s", "latency_ms"}: a fresh IP, zero counters
            spec = json.loads(arg)
            limiter.weight_limit = int(spec["weight_limit"])
            limiter.window_s = float(spec["window_s"])
            server.reset_limits()
            server.clear_faults()
            if spec.get("latency_ms"):
                server.set_faults({"latency_ms": float(spec["latency_ms"])})
            server.reset_stats()
            with lock:
                per_window.clear()
            answer = {"ok": True}
        elif command == "report":
            times = os.times()
            with lock:
                windows = dict(per_window)
            answer = {"stats": server.stats(), "windows": windows, "cpu_s": times.user + times.system}
        else:
            answer = {"error": f"unknown command {command!r}"}
        print(json.dumps(answer), flush=True)
    server.stop()
    return 0


class SandboxProcess:
    def __init__(self, cache_days: int = SANDBOX_CACHE_DAYS):
        command = [sys.executable, str(Path(__file__).resolve()), "--serve-sandbox", "--cache-days", str(cache_days)]
        self.process = subprocess.Popen(command, cwd=REPO_ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                        text=True, env={**os.environ, "PYTHONPATH": _pythonpath()})
        self.url = self.process.stdout.readline().strip()
        if not self.url.startswith("http://"):
            self.process.kill()
            raise RuntimeError(f"the sandbox did not start (said {self.url!r})")

    def ask(self, command: str, arg=None) -> dict:
        self.process.stdin.write(command + ("" if arg is None else " " + json.dumps(arg)) + "\n")
        self.process.stdin.flush()
        return json.loads(self.process.stdout.readline())

    def close(self) -> None:
        try:
            self.process.stdin.close()
            self.process.wait(timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            self.process.kill()
            self.process.wait(timeout=10)


def _pythonpath() -> str:
    parts = [str(REPO_ROOT), str(REPO_ROOT / "plugins"), os.environ.get("PYTHONPATH", "")]
    return os.pathsep.join(p for p in parts if p)


# -- the client side ------------------------------------------------------------------------------
def setup_env(workdir: Path, url: str) -> None:
    """Everything Airflow and market_data read at import time; call before importing them."""
    os.environ.update({
        "AIRFLOW_HOME": str(workdir / "airflow_home"),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "AIRFLOW__METRICS__STATSD_ON": "False",
        "AIRFLOW__LOGGING__LOGGING_LEVEL": "WARNING",  # one info line per request would flood the output
        "LOG_LEVEL": "ERROR",  # the known gap before BTCUSDT's first candle is counted in the table instead
        "RAW_DATA_DIR": str(workdir / "raw"),
        "CURATED_DATA_DIR": str(workdir / "curated"),
        "SIGNAL_DATA_DIR": str(workdir / "signals"),
        "AIRFLOW_CONN_BINANCE_DEFAULT": json.dumps({"conn_type": "http", "host": url}),
    })


def warm_sandbox(url: str, intervals, end_ms: int) -> tuple[int, float]:
    """Fetch every page of every interval once (no latency): the server's caches hold all history."""
    import requests
    from binance_provider.klines import page_windows

    from include.market_data.timeframes import to_ms

    start_ms = to_ms(HISTORY_START)
    jobs = [(i, a, b) for i in intervals for a, b in page_windows(start_ms, end_ms, i)]
    local = threading.local()

    def get(job):
        interval, a, b = job
        session = getattr(local, "session", None) or requests.Session()
        local.session = session
        response = session.get(url + "/api/v3/klines", params={
            "symbol": SYMBOL, "interval": interval, "startTime": a, "endTime": b - 1, "limit": 1000}, timeout=60)
        response.raise_for_status()

    began = time.perf_counter()
    with ThreadPoolExecutor(WARM_THREADS) as pool:
        list(pool.map(get, jobs))
    return len(jobs), time.perf_counter() - began


def run_backfill(settings, intervals, *, parallel: bool) -> dict:
    from include.market_data.ingestion import DataIngestion
    from include.market_data.timeframes import now_ms

    summaries = {}
    cpu0 = os.times()
    began = time.perf_counter()

    def one(interval):
        summaries[interval] = DataIngestion(settings).ingest(interval, HISTORY_START, now_ms(), SYMBOL, source="rest")

    if parallel:
        with ThreadPoolExecutor(len(intervals)) as pool:
            list(pool.map(one, intervals))
    else:
        for interval in intervals:
            one(interval)
    wall = time.perf_counter() - began
    cpu1 = os.times()
    return {"wall_s": wall, "summaries": summaries,
            "cpu_s": (cpu1.user - cpu0.user) + (cpu1.system - cpu0.system)}


def print_intervals(result: dict, intervals) -> None:
    # Fetching, gap checks and writes overlap (a month is written while the next ones are fetched):
    # each interval's total is what there is to show.
    print(f"  {'interval':>8} {'pages':>6} {'candles':>8} {'days':>5} {'total s':>8} {'known gap slots':>15}")
    for interval in intervals:
        s = result["summaries"][interval]
        print(f"  {interval:>8} {s.pages:>6} {s.candles_fetched:>8} {len(s.days_touched):>5} "
              f"{s.seconds:>8.2f} {s.known_gap_slots:>15}")


def latency_run(sandbox: SandboxProcess, base_settings, workdir: Path, intervals, latency_ms: float) -> dict:
    settings = replace(base_settings, raw_data_dir=str(workdir / "raw_latency"))
    concurrency = settings.max_concurrency
    sandbox.ask("configure", {"weight_limit": 6000, "window_s": 60.0, "latency_ms": latency_ms})
    server_cpu0 = sandbox.ask("report")["cpu_s"]
    result = run_backfill(settings, intervals, parallel=False)
    report = sandbox.ask("report")
    stats = report["stats"]
    requests_ = stats["requests"]
    floor = requests_ * latency_ms / 1000 / concurrency
    pages = {i: result["summaries"][i].pages for i in intervals}
    strict_floor = sum(math.ceil(p / concurrency) for p in pages.values()) * latency_ms / 1000
    print(f"A. latency run: {latency_ms:g} ms added per request, intervals one after another, "
          f"BINANCE_MAX_CONCURRENCY={concurrency}, sandbox limit 6000/60 s")
    print_intervals(result, intervals)
    print(f"  wall {result['wall_s']:.2f} s; requests {requests_} (by status {stats['by_status']}); "
          f"429s {stats['rate_limited_429']}; 418s {stats['banned_418']}")
    print(f"  latency floor = {requests_} x {latency_ms:g} ms / {concurrency} = {floor:.2f} s "
          f"(per-interval ceil(pages/{concurrency}) floor {strict_floor:.2f} s)")
    print(f"  wall / floor = {result['wall_s'] / floor:.2f} (goal <= 1.25)")
    print(f"  CPU: client {result['cpu_s']:.1f} s, sandbox {report['cpu_s'] - server_cpu0:.1f} s "
          f"over {result['wall_s']:.1f} s wall on {os.cpu_count()} cores")
    return {"wall_s": result["wall_s"], "floor_s": floor, "cpu_s": result["cpu_s"], "requests": requests_,
            "r429": stats["rate_limited_429"], "r418": stats["banned_418"]}


def budget_run(sandbox: SandboxProcess, base_settings, workdir: Path, intervals, weight: int, window_s: float,
               latency_ms: float) -> dict:
    settings = replace(base_settings, raw_data_dir=str(workdir / "raw_budget"), rate_limit_weight=weight,
                       rate_limit_window_s=window_s)
    budget = settings.rate_limit_budget
    sandbox.ask("configure", {"weight_limit": weight, "window_s": window_s, "latency_ms": latency_ms})
    result = run_backfill(settings, intervals, parallel=True)
    report = sandbox.ask("report")
    stats = report["stats"]
    windows = sorted((int(k), v) for k, v in report["windows"].items())
    full = windows[1:-1]  # the first and last windows are only partly inside the run
    shares = [used / budget for _, used in full]
    mean_share = sum(shares) / len(shares) if shares else float("nan")
    total_weight = sum(v for _, v in windows)
    print(f"B. budget run: sandbox limit {weight} per {window_s:g} s, client BINANCE_RATE_LIMIT_WEIGHT={weight} "
          f"x safety {settings.rate_limit_safety:g} = budget {budget}, {latency_ms:g} ms latency, "
          f"intervals concurrently, {settings.max_concurrency} in flight each")
    print_intervals(result, intervals)
    print(f"  wall {result['wall_s']:.2f} s; requests {stats['requests']} (by status {stats['by_status']}); "
          f"429s {stats['rate_limited_429']}; 418s {stats['banned_418']}; weight {total_weight}; "
          f"budget-bound floor {total_weight / budget * window_s:.1f} s")
    print("  weight per window: " + " ".join(str(v) for _, v in windows)
          + f"  (max {stats['max_window_weight']}, server limit {weight})")
    if shares:
        print(f"  full windows: {len(full)}; used / budget mean {100 * mean_share:.1f} %, "
              f"min {100 * min(shares):.1f} %, max {100 * max(shares):.1f} % (goal >= 90 %); "
              f"mean used / server limit {100 * mean_share * budget / weight:.1f} %")
    else:
        print("  too few windows to judge: lengthen the run (lower --budget-weight or --budget-window-s)")
    return {"share": mean_share, "r429": stats["rate_limited_429"], "r418": stats["banned_418"],
            "wall_s": result["wall_s"]}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--intervals", default=",".join(INTERVALS))
    parser.add_argument("--latency-ms", type=float, default=50.0)
    parser.add_argument("--budget-weight", type=int, default=300)
    parser.add_argument("--budget-window-s", type=float, default=5.0)
    parser.add_argument("--budget-latency-ms", type=float, default=50.0)
    parser.add_argument("--skip-latency", action="store_true")
    parser.add_argument("--skip-budget", action="store_true")
    parser.add_argument("--keep", action="store_true", help="keep the temporary data directory")
    parser.add_argument("--serve-sandbox", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--cache-days", type=int, default=SANDBOX_CACHE_DAYS, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve_sandbox:
        return serve_sandbox(args.cache_days)
    intervals = tuple(i.strip() for i in args.intervals.split(",") if i.strip())

    workdir = Path(tempfile.mkdtemp(prefix="bench_backfill_"))
    sandbox = SandboxProcess()
    try:
        setup_env(workdir, sandbox.url)
        from include.market_data.config import load_settings
        from include.market_data.timeframes import now_ms

        settings = load_settings()
        requests_, seconds = warm_sandbox(sandbox.url, intervals, now_ms())
        print(f"sandbox {sandbox.url} (own process, day cache {SANDBOX_CACHE_DAYS} days); warm-up: "
              f"{requests_} pages fetched once in {seconds:.1f} s, untimed; data in {workdir}")
        print(f"load average before the runs: {' '.join(f'{x:.1f}' for x in os.getloadavg())} on {os.cpu_count()} cores")
        verdicts = []
        if not args.skip_latency:
            a = latency_run(sandbox, settings, workdir, intervals, args.latency_ms)
            ratio = a["wall_s"] / a["floor_s"]
            verdicts.append(f"wall/floor {ratio:.2f} {'met' if ratio <= 1.25 else 'MISSED'} (<=1.25; client CPU "
                            f"{a['cpu_s']:.1f} s over {a['wall_s']:.1f} s wall)")
        if not args.skip_budget:
            b = budget_run(sandbox, settings, workdir, intervals, args.budget_weight, args.budget_window_s,
                           args.budget_latency_ms)
            share_ok = b["share"] >= 0.9
            verdicts.append(f"budget used {100 * b['share']:.0f}% {'met' if share_ok else 'MISSED'} (>=90%)")
            verdicts.append(f"418s {b['r418']} {'met' if b['r418'] == 0 else 'MISSED'} (0); 429s {b['r429']}")
        print(f"load average after the runs: {' '.join(f'{x:.1f}' for x in os.getloadavg())}")
        print("SUMMARY backfill: " + "; ".join(verdicts))
    finally:
        sandbox.close()
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
