"""How many /api/v3/klines requests per second the Binance sandbox serves.

The sandbox runs in its own process (as in a demo: the clients' GIL is not its GIL);
each client thread holds a requests.Session and asks for ``limit`` candles of
``interval`` at random positions in the synthetic history, for ``duration_s`` seconds.

    .venv/bin/python bench/sandbox_throughput.py [--threads 1,2,4] [--duration 5] [--interval 15m]
"""

from __future__ import annotations

import argparse
import random
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import requests

REPO_ROOT = Path(__file__).resolve().parents[1]
HISTORY_START_MS = 1_502_942_400_000  # BTCUSDT's first candle, 2017-08-17 04:00 UTC
INTERVAL_MS = {"1m": 60_000, "5m": 300_000, "15m": 900_000, "30m": 1_800_000, "1h": 3_600_000,
               "4h": 14_400_000, "1d": 86_400_000}


def measure_klines_throughput(
    url: str, threads: int, duration_s: float, interval: str = "15m", limit: int = 1000,
    symbol: str = "BTCUSDT", seed: int = 0,
) -> dict:
    """Hammer ``url`` with ``threads`` clients for ``duration_s``; returns the figures."""
    now_ms = int(time.time() * 1000)
    span_ms = INTERVAL_MS[interval] * limit
    latencies: list[float] = []
    bytes_read = [0]
    failures = [0]
    lock = threading.Lock()
    deadline = time.perf_counter() + duration_s

    def client(index: int):
        rng = random.Random(seed * 1000 + index)
        session = requests.Session()
        mine, size, bad = [], 0, 0
        while time.perf_counter() < deadline:
            start = rng.randrange(HISTORY_START_MS, now_ms - span_ms)
            params = {"symbol": symbol, "interval": interval, "startTime": start, "limit": limit}
            began = time.perf_counter()
            response = session.get(url + "/api/v3/klines", params=params, timeout=30)
            mine.append(time.perf_counter() - began)
            size += len(response.content)
            bad += response.status_code != 200
        session.close()
        with lock:
            latencies.extend(mine)
            bytes_read[0] += size
            failures[0] += bad

    workers = [threading.Thread(target=client, args=(i,)) for i in range(threads)]
    began = time.perf_counter()
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    elapsed = time.perf_counter() - began
    latencies.sort()
    count = len(latencies)
    return {
        "threads": threads,
        "requests": count,
        "failures": failures[0],
        "requests_per_s": count / elapsed,
        "candles_per_s": count * limit / elapsed,
        "mb_per_s": bytes_read[0] / elapsed / 1e6,
        "p50_ms": 1000 * statistics.median(latencies) if latencies else float("nan"),
        "p95_ms": 1000 * latencies[int(0.95 * (count - 1))] if latencies else float("nan"),
    }


def start_sandbox_process(*extra_args: str) -> tuple[subprocess.Popen, str]:
    """Run ``python -m include.binance_sandbox`` on a free port; returns (process, base URL)."""
    command = [sys.executable, "-m", "include.binance_sandbox", "--port", "0", *extra_args]
    process = subprocess.Popen(command, cwd=REPO_ROOT, stderr=subprocess.PIPE, text=True)
    banner = process.stderr.readline()  # "binance sandbox serving ... on http://127.0.0.1:PORT"
    if " on http://" not in banner:
        process.kill()
        raise RuntimeError(f"the sandbox did not start: {banner.strip() or process.stderr.read()}")
    return process, banner.rsplit(" on ", 1)[1].strip()


def warm_up(url: str, interval: str, seconds: float = 1.0) -> None:
    """One short run first, so the measured runs do not include imports and first-touch costs."""
    measure_klines_throughput(url, threads=1, duration_s=seconds, interval=interval, seed=999)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", default="1,2,4", help="comma list of client thread counts")
    parser.add_argument("--duration", type=float, default=5.0, help="seconds per thread count")
    parser.add_argument("--interval", default="15m", choices=sorted(INTERVAL_MS))
    parser.add_argument("--limit", type=int, default=1000)
    parser.add_argument("--url", help="measure a sandbox already running there instead of starting one")
    args = parser.parse_args(argv)
    counts = [int(n) for n in args.threads.split(",") if n.strip()]

    process = None
    url = args.url
    if url is None:
        # No weight limit in the way: this measures the server, not Binance's quota.
        process, url = start_sandbox_process("--weight-limit", str(10**12))
    try:
        warm_up(url, args.interval)
        print(f"sandbox {url}: GET /api/v3/klines interval={args.interval} limit={args.limit}, "
              f"random positions in history, {args.duration:g} s per run")
        print(f"{'threads':>7} {'requests':>8} {'fail':>4} {'req/s':>8} {'candles/s':>10} {'MB/s':>6} "
              f"{'p50 ms':>7} {'p95 ms':>7}")
        for threads in counts:
            r = measure_klines_throughput(url, threads, args.duration, args.interval, args.limit)
            print(f"{r['threads']:>7} {r['requests']:>8} {r['failures']:>4} {r['requests_per_s']:>8.1f} "
                  f"{r['candles_per_s']:>10.0f} {r['mb_per_s']:>6.2f} {r['p50_ms']:>7.1f} {r['p95_ms']:>7.1f}")
    finally:
        if process is not None:
            process.terminate()
            process.wait(timeout=10)
    return 0


if __name__ == "__main__":
    sys.exit(main())
