"""Deep history: the public-data archive against REST, and memory against the length of history.

A. budget  - a sandbox whose REQUEST_WEIGHT limit is lowered to ``--weight-limit`` (240) per minute,
   the client told the same (BINANCE_RATE_LIMIT_WEIGHT=240; its safety factor leaves it 192), with
   ``--latency-ms`` (50) added to every request; full history of BTCUSDT 15m + 1h
   (2017-08-17 -> 2024-01-01) by ``DataIngestion().ingest(interval, start, end, source=...)``,
   ``source="rest"`` then ``source="auto"``, each in a fresh process (wall from process start to exit,
   imports included). Printed: wall, the REST weight and requests the sandbox counted, archive
   downloads (zips and CHECKSUMs: no weight), 429s, 418s, the ratio rest/auto. The two datasets
   are asserted equal.
B. memory  - peak RSS (the child's own ``ru_maxrss`` from ``wait4``) of one 15m history of nine years
   (2017-08-17 -> 2026-08-01) against two years (2024-08-01 -> 2026-08-01), source rest and auto,
   each in a fresh process, against a sandbox with Binance's default limit and no added latency.

The sandbox runs in its own process group (stopped by its pid) with every day of the range kept
synthesized; before the timed runs each range is read once, untimed, through the archive (no weight,
so the lowered limit is untouched): both sources then read a warm server. Counters come from
``/sandbox/stats`` and are reset (with the used weight and any ban) between runs.

    .venv/bin/python bench/history.py [--weight-limit 240] [--latency-ms 50] [--quick]
        [--skip-budget] [--skip-memory] [--keep]
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from peers import (  # noqa: E402  (bench/ is not a package)
    DAY_MS, SYMBOL, Sandbox, archive_requests, child_failure, compare_projects, iso_day, open_times,
    project_env, read_dataset, rest_requests, run_child, to_ms, weight_of,
)


def months(start_ms: int, end_ms: int):
    year, month = map(int, iso_day(start_ms)[:7].split("-"))
    while True:
        label = f"{year:04d}-{month:02d}"
        if to_ms(label + "-01") >= end_ms:
            return
        yield label
        year, month = (year + 1, 1) if month == 12 else (year, month + 1)


def warm_through_archive(sandbox: Sandbox, intervals, start_ms: int, end_ms: int, threads: int = 4) -> tuple[int, float]:
    """Download each monthly zip of the range once (no REST weight): the sandbox synthesizes every day."""
    urls = [f"{sandbox.url}/data/spot/monthly/klines/{SYMBOL}/{interval}/{SYMBOL}-{interval}-{month}.zip"
            for interval in intervals for month in months(start_ms, end_ms)]

    def get(url):
        try:
            with urllib.request.urlopen(url, timeout=300) as response:
                response.read()
        except urllib.error.HTTPError:  # an unpublished month (the current one): nothing to warm
            pass

    began = time.perf_counter()
    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(get, urls))
    return len(urls), time.perf_counter() - began


def run_project(sandbox: Sandbox, workdir: Path, name: str, intervals, start: str, end: str, source: str,
                extra_env: dict | None = None) -> dict:
    out = workdir / name
    args = ["--child", "project", "--intervals", ",".join(intervals), "--start", start, "--end", end,
            "--source", source]
    sandbox.reset()
    result = run_child(args, project_env(out, sandbox.url, extra_env), workdir / f"{name}.log")
    result["stats"] = sandbox.stats()
    result["dir"] = out / "raw"
    if result["rc"] != 0:
        raise RuntimeError(f"{name} failed, {child_failure(result)}")
    return result


def assert_same(a: dict, b: dict, intervals) -> str:
    """The rest and auto datasets hold the same candles with the same values."""
    rows = 0
    for interval in intervals:
        x, y = read_dataset(a["dir"], interval), read_dataset(b["dir"], interval)
        assert x is not None and y is not None, f"{interval}: a run wrote nothing"
        assert open_times(x) == open_times(y), f"{interval}: open_times differ between rest and auto"
        compare_projects(x, y)
        rows += x.num_rows
    return f"rest and auto datasets equal ({rows} rows)"


def budget_bench(args, workdir: Path) -> str:
    intervals = ("15m", "1h")
    start, end = ("2023-01-01", "2024-01-01") if args.quick else (args.start, args.end)
    start_ms, end_ms = to_ms(start), to_ms(end)
    sandbox = Sandbox("--weight-limit", str(args.weight_limit), "--latency-ms", f"{args.latency_ms:g}",
                      "--cache-days", str((end_ms - start_ms) // DAY_MS + 60), workdir=workdir / "budget_sandbox")
    try:
        files, seconds = warm_through_archive(sandbox, intervals, start_ms, end_ms)
        env = {"BINANCE_RATE_LIMIT_WEIGHT": str(args.weight_limit)}
        print(f"A. archive vs REST under a binding weight budget: sandbox {sandbox.url} limit {args.weight_limit} "
              f"weight / 60 s, +{args.latency_ms:g} ms; client BINANCE_RATE_LIMIT_WEIGHT={args.weight_limit}; "
              f"{SYMBOL} {' + '.join(intervals)} [{start}, {end}); warm-up {files} archive files in {seconds:.1f} s")
        results = {source: run_project(sandbox, workdir, f"budget_{source}", intervals, start, end, source, env)
                   for source in ("rest", "auto")}
    finally:
        sandbox.stop()
    print(f"  {'source':<18} {'wall s':>8} {'REST weight':>12} {'REST req':>9} {'archive req':>12} {'429s':>5} "
          f"{'418s':>5} {'max weight/window':>18} {'day files':>10}")
    for source, r in results.items():
        s = r["stats"]
        print(f"  {source:<18} {r['wall_s']:>8.1f} {weight_of(s):>12} {rest_requests(s):>9} "
              f"{archive_requests(s):>12} {s['rate_limited_429']:>5} {s['banned_418']:>5} "
              f"{s['max_window_weight']:>18} {r['answer'].get('files', 0):>10}")
    same = assert_same(results["rest"], results["auto"], intervals)
    print(f"  data: {same}")
    ratio = results["rest"]["wall_s"] / results["auto"]["wall_s"]
    rest_weight, auto_weight = weight_of(results["rest"]["stats"]), weight_of(results["auto"]["stats"])
    print(f"  rest / auto wall: {ratio:.1f}x; REST weight {rest_weight} vs {auto_weight}")
    return (f"budget {args.weight_limit}/min: rest {results['rest']['wall_s']:.1f} s, auto "
            f"{results['auto']['wall_s']:.1f} s ({ratio:.1f}x), REST weight {rest_weight} vs {auto_weight}")


def memory_bench(args, workdir: Path) -> str:
    interval = "15m"
    if args.quick:
        long_, short = ("2025-08-01", "2026-08-01"), ("2026-05-01", "2026-08-01")
    else:
        long_, short = (args.start, "2026-08-01"), ("2024-08-01", "2026-08-01")
    spans = {"long": long_, "short": short}
    years = {k: (to_ms(b) - to_ms(a)) / DAY_MS / 365.25 for k, (a, b) in spans.items()}
    start_ms, end_ms = to_ms(long_[0]), to_ms(long_[1])
    sandbox = Sandbox("--cache-days", str((end_ms - start_ms) // DAY_MS + 60), "--archive-cache-mb", "256",
                      workdir=workdir / "memory_sandbox")
    results = {}
    try:
        files, seconds = warm_through_archive(sandbox, [interval], start_ms, end_ms)
        print(f"\nB. peak RSS against the length of history: {SYMBOL} {interval}, {years['long']:.1f} years "
              f"[{long_[0]}, {long_[1]}) vs {years['short']:.1f} years [{short[0]}, {short[1]}); sandbox "
              f"{sandbox.url}, limit 6000/min, no added latency; warm-up {files} archive files in {seconds:.1f} s")
        for source in ("rest", "auto"):
            for key, (a, b) in spans.items():
                results[(source, key)] = run_project(sandbox, workdir, f"memory_{source}_{key}", [interval], a, b,
                                                     source)
    finally:
        sandbox.stop()
    long_head, short_head = f"{years['long']:.1f}y RSS MB", f"{years['short']:.1f}y RSS MB"
    print(f"  {'source':<18} {long_head:>12} {short_head:>12} "
          f"{'ratio':>6} {'long wall s':>12} {'short wall s':>13} {'long rows':>10}")
    summary = []
    for source in ("rest", "auto"):
        long_r, short_r = results[(source, "long")], results[(source, "short")]
        ratio = long_r["maxrss_mb"] / short_r["maxrss_mb"]
        print(f"  {source:<18} {long_r['maxrss_mb']:>12.0f} {short_r['maxrss_mb']:>12.0f} "
              f"{ratio:>6.2f} {long_r['wall_s']:>12.1f} {short_r['wall_s']:>13.1f} "
              f"{long_r['answer'].get('rows', 0):>10}")
        summary.append(f"{source} {long_r['maxrss_mb']:.0f}/{short_r['maxrss_mb']:.0f} MB ({ratio:.2f}x)")
    print(f"  data ({years['long']:.0f}y): {assert_same(results[('rest', 'long')], results[('auto', 'long')], [interval])}")
    return f"peak RSS {years['long']:.1f}y/{years['short']:.1f}y: " + ", ".join(summary)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--weight-limit", type=int, default=240, help="sandbox and client weight per minute")
    parser.add_argument("--latency-ms", type=float, default=50.0, help="added latency of the budget runs")
    parser.add_argument("--start", default="2017-08-17")
    parser.add_argument("--end", default="2024-01-01", help="end of the budget runs")
    parser.add_argument("--quick", action="store_true", help="shorter ranges (a smoke run)")
    parser.add_argument("--skip-budget", action="store_true")
    parser.add_argument("--skip-memory", action="store_true")
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory")
    args = parser.parse_args(argv)
    workdir = Path(tempfile.mkdtemp(prefix="bench_history_"))
    for name in ("budget_sandbox", "memory_sandbox"):
        (workdir / name).mkdir()
    print(f"load average before: {' '.join(f'{x:.2f}' for x in os.getloadavg())} on {os.cpu_count()} cores; "
          f"data in {workdir}")
    summary = []
    try:
        if not args.skip_budget:
            summary.append(budget_bench(args, workdir))
        if not args.skip_memory:
            summary.append(memory_bench(args, workdir))
    finally:
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
    print(f"load average after: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    print("SUMMARY history: " + "; ".join(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
