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
for _entry in (str(REPO_ROOT / "plugins"), str(REPO_ROOT)):
    if _entry not in sys.path:
        sys.path.insert(0, _entry)
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


def measure_hook_pages(url: str, concurrency: int, pages: int, interval: str = "15m") -> dict:
    """Pages/s of ``BinanceHook.iter_klines`` over ``pages`` full pages of ``interval``."""
    import os

    os.environ["AIRFLOW_CONN_BINANCE_DEFAULT"] = f'{{"conn_type": "http", "host": "{url}"}}'
    os.environ.setdefault("LOG_LEVEL", "WARNING")
    from binance_provider.hooks.binance import BinanceHook
    from binance_provider.hooks.rate_limiter import WeightLimiter

    from include.market_data.config import Settings

    WeightLimiter.clear_shared()
    hook = BinanceHook(settings=Settings(rate_limit_weight=10**9, max_concurrency=concurrency, log_level="WARNING"))
    start = HISTORY_START_MS + 86_400_000  # whole days of history, well before now
    end = start + pages * 1000 * INTERVAL_MS[interval]
    began = time.perf_counter()
    fetched = sum(1 for _ in hook.iter_klines("BTCUSDT", interval, start, end, concurrency=concurrency))
    elapsed = time.perf_counter() - began
    return {"pages": fetched, "seconds": elapsed, "pages_per_s": fetched / elapsed}


def set_latency(url: str, latency_ms: float) -> None:
    if latency_ms:
        requests.post(f"{url}/sandbox/faults", json={"latency_ms": latency_ms}, timeout=10).raise_for_status()
    else:
        requests.delete(f"{url}/sandbox/faults", timeout=10).raise_for_status()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", default="1,2,4", help="comma list of client thread counts")
    parser.add_argument("--duration", type=float, default=5.0, help="seconds per thread count")
    parser.add_argument("--interval", default="15m", choices=sorted(INTERVAL_MS))
    parser.add_argument("--limit", type=int, default=1000)
    parser.add_argument("--url", help="measure a sandbox already running there instead of starting one")
    parser.add_argument("--hook-pages", type=int, default=40, help="pages per BinanceHook run")
    parser.add_argument("--concurrency", type=int, default=4, help="BINANCE_MAX_CONCURRENCY for the hook runs")
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

        print(f"\nBinanceHook.iter_klines, {args.hook_pages} pages of {args.interval} (limit 1000), "
              f"sequential vs concurrency {args.concurrency}, side by side:")
        print(f"{'latency':>8} {'sequential p/s':>15} {f'x{args.concurrency} p/s':>10} {'speed-up':>9}")
        speedups = {}
        for latency_ms in (0, 50):
            set_latency(url, latency_ms)
            measure_hook_pages(url, 1, 2, args.interval)  # warm the pages' data and the session
            sequential = measure_hook_pages(url, 1, args.hook_pages, args.interval)
            parallel = measure_hook_pages(url, args.concurrency, args.hook_pages, args.interval)
            speedups[latency_ms] = parallel["pages_per_s"] / sequential["pages_per_s"]
            print(f"{latency_ms:>6} ms {sequential['pages_per_s']:>15.1f} {parallel['pages_per_s']:>10.1f} "
                  f"{speedups[latency_ms]:>8.2f}x")
        set_latency(url, 0)
        print(f"SUMMARY sandbox_throughput: hook x{args.concurrency} vs sequential: {speedups[0]:.2f}x at 0 ms, "
              f"{speedups[50]:.2f}x at 50 ms added latency")
    finally:
        if process is not None:
            process.terminate()
            process.wait(timeout=10)
    return 0


if __name__ == "__main__":
    sys.exit(main())
