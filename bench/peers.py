"""The project's seed API against the peers: python-binance and ccxt, on the same sandbox.

Full history of BTCUSDT (2017-08-17 -> 2024-01-01) of 15m and 1h, from a Binance sandbox that
adds ``--latency-ms`` (50) to every request, by each client as its users run it, each in a FRESH
PROCESS (timed from process start to exit, imports included), each writing one snappy Parquet
file per UTC day into its own temporary directory:

- project        ``DataIngestion().ingest(interval, start, end, source="rest")`` (REST like the peers; its
                 raw layout; RAW_DATA_DIR and AIRFLOW_CONN_BINANCE_DEFAULT point at the temp dir and the
                 sandbox)
- python-binance ``Client.get_historical_klines`` (its base URL pointed at the sandbox; it sleeps
                 1 s after every third call by design: that is the library as users run it)
- ccxt           a ``binance().fetch_ohlcv(since=..., limit=1000)`` loop (public spot URL pointed at
                 the sandbox, spot markets only, ``enableRateLimit`` at its default)
- project auto   the same as project with ``source="auto"`` (archive files, then REST)

Peers write their natural values (python-binance: the 12 fields as returned, decimals as strings;
ccxt: [ms, open, high, low, close, volume] floats). After the runs the datasets are compared:
the same open_times per interval, python-binance's strings equal to the project's decimals
(exactly, and rebuilt as strings with the file's ``decimal_places``), ccxt's floats equal to
``float(Decimal)`` of the project's values. The sandbox runs in its own process group, its
history is fetched once untimed before the runs (a warm server for every client), and the
request counters are read from ``/sandbox/stats`` and reset between runs.

    .venv/bin/python bench/peers.py [--latency-ms 50] [--start 2017-08-17] [--end 2024-01-01]
        [--intervals 15m,1h] [--quick] [--keep]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
SYMBOL = "BTCUSDT"
CCXT_SYMBOL = "BTC/USDT"
DAY_MS = 86_400_000
INTERVAL_MS = {"1m": 60_000, "5m": 300_000, "15m": 900_000, "30m": 1_800_000, "1h": 3_600_000,
               "4h": 14_400_000, "1d": 86_400_000}
# Binance's REQUEST_WEIGHT of the endpoints the clients here use (for the sandbox's counts).
ENDPOINT_WEIGHT = {"/api/v3/klines": 2, "/api/v3/ping": 1, "/api/v3/time": 1, "/api/v3/exchangeInfo": 20,
                   "/api/v3/ticker/price": 2, "/api/v3/ticker/24hr": 2}
DECIMALS = ("open", "high", "low", "close", "volume", "quote_asset_volume", "taker_buy_base_asset_volume",
            "taker_buy_quote_asset_volume")
# python-binance's row order (the 12 fields of /api/v3/klines)
BINANCE_FIELDS = ("open_time", "open", "high", "low", "close", "volume", "close_time", "quote_asset_volume",
                  "number_of_trades", "taker_buy_base_asset_volume", "taker_buy_quote_asset_volume", "ignore")
CCXT_FIELDS = ("open_time", "open", "high", "low", "close", "volume")


def to_ms(text: str) -> int:
    value = datetime.fromisoformat(text)
    if value.tzinfo is None:
        value = value.replace(tzinfo=timezone.utc)
    return int(value.timestamp() * 1000)


def iso_day(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, timezone.utc).strftime("%Y-%m-%d")


# -- the sandbox: its own process and process group, stopped by its pid ---------------------------
class Sandbox:
    """``python -m include.binance_sandbox --port 0 ...`` in a new session (pgid == pid)."""

    def __init__(self, *flags: str, workdir: Path):
        self.log_path = workdir / "sandbox.log"
        self._log = open(self.log_path, "w")
        command = [sys.executable, "-m", "include.binance_sandbox", "--port", "0", *flags]
        self.process = subprocess.Popen(command, cwd=REPO_ROOT, stdout=self._log, stderr=self._log,
                                        env=child_env({}), start_new_session=True)
        self.url = self._wait_for_banner()

    def _wait_for_banner(self, timeout_s: float = 60.0) -> str:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            text = self.log_path.read_text()
            if " on http://" in text:
                return text.split(" on ", 1)[1].split()[0].strip()
            if self.process.poll() is not None:
                break
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"the sandbox did not start: {self.log_path.read_text().strip()}")

    def _call(self, method: str, path: str, body: dict | None = None) -> dict:
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(self.url + path, data=data, method=method,
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=30) as response:
            return json.loads(response.read() or b"{}")

    def stats(self) -> dict:
        return self._call("GET", "/sandbox/stats")

    def reset(self) -> None:
        """Zero the counters and forget used weight, Retry-Afters and bans: every run starts equal."""
        self._call("DELETE", "/sandbox/limits")
        self._call("DELETE", "/sandbox/stats")

    def set_faults(self, faults: dict) -> dict:
        return self._call("POST", "/sandbox/faults", faults)

    def stop(self) -> None:
        if self.process.poll() is None:
            try:
                os.killpg(self.process.pid, signal.SIGTERM)  # its own group: pgid == its pid
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(timeout=10)
            except ProcessLookupError:
                pass
        self._log.close()


def weight_of(stats: dict) -> int:
    return sum(ENDPOINT_WEIGHT.get(path, 0) * count for path, count in stats["by_endpoint"].items()
               if path.startswith("/api/"))


def rest_requests(stats: dict) -> int:
    return sum(count for path, count in stats["by_endpoint"].items() if path.startswith("/api/"))


def archive_requests(stats: dict) -> int:
    """Archive downloads (zips and CHECKSUMs), which the sandbox counts apart from REST."""
    if "archive_requests" in stats:
        return stats["archive_requests"]
    return sum(count for path, count in stats["by_endpoint"].items() if path.startswith("/data/"))


def warm_sandbox(sandbox: Sandbox, intervals, start_ms: int, end_ms: int, threads: int = 4) -> tuple[int, float]:
    """Ask every page of every interval once (untimed): the sandbox synthesizes each day on first touch."""
    jobs = []
    for interval in intervals:
        step = INTERVAL_MS[interval] * 1000
        jobs += [(interval, a, min(a + step, end_ms)) for a in range(start_ms, end_ms, step)]

    def get(job):
        interval, a, b = job
        url = (f"{sandbox.url}/api/v3/klines?symbol={SYMBOL}&interval={interval}&startTime={a}"
               f"&endTime={b - 1}&limit=1000")
        with urllib.request.urlopen(url, timeout=120) as response:
            response.read()

    began = time.perf_counter()
    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(get, jobs))
    return len(jobs), time.perf_counter() - began


# -- fresh child processes ------------------------------------------------------------------------
def child_env(extra: dict) -> dict:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("BINANCE_", "RAW_DATA_DIR", "CURATED_DATA_DIR", "SIGNAL_DATA_DIR",
                                "AIRFLOW_CONN_BINANCE"))}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), os.environ.get("PYTHONPATH", "")) if p)
    env.update(extra)
    return env


def project_env(workdir: Path, url: str, extra: dict | None = None) -> dict:
    """What the project reads at import: its data dirs, the sandbox as binance_default (and the archive)."""
    connection = json.dumps({"conn_type": "http", "host": url})
    return child_env({
        "AIRFLOW_HOME": str(workdir / "airflow_home"),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "AIRFLOW__METRICS__STATSD_ON": "False",
        "AIRFLOW__LOGGING__LOGGING_LEVEL": "WARNING",
        "LOG_LEVEL": "WARNING",  # one JSON line per request would be the terminal's time, not the client's
        "RAW_DATA_DIR": str(workdir / "raw"),
        "CURATED_DATA_DIR": str(workdir / "curated"),
        "SIGNAL_DATA_DIR": str(workdir / "signals"),
        "AIRFLOW_CONN_BINANCE_DEFAULT": connection,
        "AIRFLOW_CONN_BINANCE_ARCHIVE": connection,  # the sandbox serves the archive layout too
        **(extra or {}),
    })


def run_child(args: list[str], env: dict, log_path: Path) -> dict:
    """Run ``python bench/peers.py --child ...``: wall from spawn to exit, its own peak RSS, its answer."""
    command = [sys.executable, str(Path(__file__).resolve()), *args]
    with open(log_path, "w") as log:
        began = time.perf_counter()
        process = subprocess.Popen(command, cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=log, text=True)
        out = process.stdout.read()
        _, status, usage = os.wait4(process.pid, 0)  # this child's own rusage (RUSAGE_CHILDREN is a max)
        wall = time.perf_counter() - began
    process.returncode = os.waitstatus_to_exitcode(status)
    answer = {}
    for line in out.splitlines()[::-1]:
        if line.startswith("{"):
            answer = json.loads(line)
            break
    return {"wall_s": wall, "rc": process.returncode, "maxrss_mb": usage.ru_maxrss / 1024,
            "cpu_s": usage.ru_utime + usage.ru_stime, "answer": answer, "log": log_path}


def child_failure(result: dict) -> str:
    tail = result["log"].read_text().strip().splitlines()[-15:]
    return f"exit {result['rc']}:\n    " + "\n    ".join(tail)


# -- the clients (run in the child process) -------------------------------------------------------
def day_groups(rows: list, time_index: int = 0):
    """Consecutive runs of rows (sorted by open time) that share a UTC day."""
    begin = 0
    for i in range(1, len(rows) + 1):
        if i == len(rows) or rows[i][time_index] // DAY_MS != rows[begin][time_index] // DAY_MS:
            yield rows[begin][time_index] // DAY_MS * DAY_MS, rows[begin:i]
            begin = i


def write_days(out: Path, interval: str, rows: list, schema) -> int:
    import pyarrow as pa
    import pyarrow.parquet as pq

    directory = out / interval
    directory.mkdir(parents=True, exist_ok=True)
    files = 0
    for day_ms, group in day_groups(rows):
        columns = list(zip(*group))
        table = pa.Table.from_arrays([pa.array(c, type=f.type) for c, f in zip(columns, schema)], schema=schema)
        stamp = iso_day(day_ms).replace("-", "")
        pq.write_table(table, directory / f"{SYMBOL}_{interval}_{stamp}.parquet", compression="snappy")
        files += 1
    return files


def child_python_binance(url: str, out: Path, intervals, start_ms: int, end_ms: int) -> dict:
    import pyarrow as pa
    from binance.client import Client

    client = Client(None, None, ping=False)  # its default ping goes to api.binance.com
    client.API_URL = url + "/api"  # python-binance's REST base (API_URL.format(base_endpoint, tld) at init)
    assert client.ping() == {}, "python-binance's ping failed against the sandbox"
    schema = pa.schema([(name, pa.int64() if name in ("open_time", "close_time", "number_of_trades")
                         else pa.string()) for name in BINANCE_FIELDS])
    rows_total = files = 0
    for interval in intervals:
        rows = client.get_historical_klines(SYMBOL, interval, start_ms, end_ms - 1)  # its end is inclusive
        rows = [r for r in rows if start_ms <= r[0] < end_ms]
        rows_total += len(rows)
        files += write_days(out, interval, rows, schema)
    return {"rows": rows_total, "files": files}


def child_ccxt(url: str, out: Path, intervals, start_ms: int, end_ms: int) -> dict:
    import ccxt
    import pyarrow as pa

    exchange = ccxt.binance({
        "urls": {"api": {"public": url + "/api/v3"}},  # the public spot API (klines, exchangeInfo)
        "options": {"fetchMarkets": {"types": ["spot"]}},
    })
    schema = pa.schema([("open_time", pa.int64())] + [(name, pa.float64()) for name in CCXT_FIELDS[1:]])
    rows_total = files = 0
    for interval in intervals:
        step = INTERVAL_MS[interval]
        rows, since = [], start_ms
        while since < end_ms:
            batch = exchange.fetch_ohlcv(CCXT_SYMBOL, interval, since=since, limit=1000)
            if not batch:
                break
            rows += [r for r in batch if r[0] < end_ms]
            since = batch[-1][0] + step
        rows_total += len(rows)
        files += write_days(out, interval, rows, schema)
    return {"rows": rows_total, "files": files, "enableRateLimit": exchange.enableRateLimit,
            "rateLimit_ms": exchange.rateLimit}


def child_project(intervals, start_ms: int, end_ms: int, source: str) -> dict:
    """``DataIngestion().ingest(interval, start, end, source=source)`` per interval."""
    from include.market_data.ingestion import DataIngestion

    ingestion = DataIngestion()
    candles = days = pages = 0
    for interval in intervals:
        summary = ingestion.ingest(interval, start_ms, end_ms, source=source)
        candles += summary.candles_fetched
        pages += summary.pages
        days += len(summary.days_touched)
    return {"rows": candles, "files": days, "pages": pages}


def child_main(args) -> int:
    intervals = args.intervals.split(",")
    start_ms, end_ms = to_ms(args.start), to_ms(args.end)
    out = Path(args.out) if args.out else None
    if args.child == "python-binance":
        answer = child_python_binance(args.url, out, intervals, start_ms, end_ms)
    elif args.child == "ccxt":
        answer = child_ccxt(args.url, out, intervals, start_ms, end_ms)
    elif args.child == "project":
        answer = child_project(intervals, start_ms, end_ms, args.source)
    elif args.child == "imports":  # untimed: the OS page cache holds every client's modules afterwards
        import importlib

        for module in ("ccxt", "pyarrow.parquet", "binance.client", "include.market_data.ingestion"):
            importlib.import_module(module)
        answer = {}
    else:
        raise SystemExit(f"unknown child {args.child!r}")
    print(json.dumps(answer), flush=True)
    return 0


# -- reading the datasets back and comparing ------------------------------------------------------
def read_dataset(directory: Path, interval: str, *, with_places: bool = False):
    """All day files of one interval, concatenated in open_time order (and each row's decimal_places)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    tables, places = [], []
    for path in sorted((directory / interval).glob(f"{SYMBOL}_{interval}_*.parquet")):
        parquet = pq.ParquetFile(path)
        table = parquet.read()
        tables.append(table)
        if with_places:
            meta = parquet.schema_arrow.metadata or {}
            places.append((int(meta.get(b"decimal_places", b"-1")), table.num_rows))
    table = pa.concat_tables(tables) if tables else None
    return (table, places) if with_places else table


def open_times(table) -> list[int]:
    import pyarrow as pa
    import pyarrow.compute as pc

    column = table.column("open_time")
    if pa.types.is_timestamp(column.type):
        column = pc.cast(column, pa.int64())
    return column.to_pylist()


def compare_python_binance(project, places, peer) -> dict:
    """Exact: strings parsed as decimal128(38, 18) equal the project's decimals, and the project's
    decimals printed with the file's decimal_places equal python-binance's strings."""
    import pyarrow as pa
    import pyarrow.compute as pc

    checked = 0
    for name in DECIMALS:
        mine = project.column(name)
        theirs = peer.column(name)
        parsed = pc.cast(theirs, mine.type)
        equal = pc.all(pc.equal(mine, parsed)).as_py()
        assert equal, f"python-binance {name}: values differ from the project's decimals"
        # rebuild the strings: each file's rows with that file's decimal_places
        offset, rebuilt = 0, []
        for dp, rows in places:
            part = mine.slice(offset, rows)
            offset += rows
            assert dp >= 0, "a project day file has no decimal_places metadata"
            rebuilt.append(pc.cast(pc.cast(part, pa.decimal128(38, dp)), pa.string()))
        strings = pa.chunked_array([c for r in rebuilt for c in r.chunks], type=pa.string())
        assert strings.equals(theirs.cast(pa.string())), \
            f"python-binance {name}: the project's decimals with decimal_places are not the same strings"
        checked += len(mine)
    for name in ("close_time", "number_of_trades"):
        mine = project.column(name)
        if pa.types.is_timestamp(mine.type):
            mine = pc.cast(mine, pa.int64())
        assert mine.to_pylist() == peer.column(name).to_pylist(), f"python-binance {name} differs"
    return {"values": checked}


def compare_ccxt(project, peer) -> dict:
    """ccxt's floats equal float(Decimal) of the project's values (Python's correctly rounded float)."""
    checked = 0
    for name in CCXT_FIELDS[1:]:
        mine = [float(d) for d in project.column(name).to_pylist()]
        theirs = peer.column(name).to_pylist()
        assert mine == theirs, f"ccxt {name}: floats differ from float(Decimal) of the project's values"
        checked += len(mine)
    return {"values": checked}


def compare_projects(a, b) -> None:
    for name in ("open_time", "close_time", "number_of_trades", *DECIMALS):
        assert a.column(name).equals(b.column(name)), f"project source=auto {name} differs from source=rest"


def check_datasets(dirs: dict, intervals) -> list[str]:
    lines = []
    for interval in intervals:
        project, places = read_dataset(dirs["project"], interval, with_places=True)
        assert project is not None and project.num_rows, f"the project wrote no {interval} rows"
        times = open_times(project)
        binance_ = read_dataset(dirs["python-binance"], interval)
        ccxt_ = read_dataset(dirs["ccxt"], interval)
        assert open_times(binance_) == times, f"{interval}: python-binance's open_times differ from the project's"
        assert open_times(ccxt_) == times, f"{interval}: ccxt's open_times differ from the project's"
        b = compare_python_binance(project, places, binance_)
        c = compare_ccxt(project, ccxt_)
        auto = read_dataset(dirs["project auto"], interval)
        assert auto is not None and open_times(auto) == times, f"{interval}: source=auto open_times differ"
        compare_projects(project, auto)
        lines.append(f"  {interval}: {len(times)} open_times equal in all datasets; python-binance "
                     f"{b['values']} decimal strings exact; ccxt {c['values']} floats == float(Decimal); "
                     f"source=auto identical to REST")
    return lines


# -- the parent -----------------------------------------------------------------------------------
CLIENTS = ("project", "python-binance", "ccxt", "project auto")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--latency-ms", type=float, default=50.0)
    parser.add_argument("--start", default="2017-08-17")
    parser.add_argument("--end", default="2024-01-01")
    parser.add_argument("--intervals", default="15m,1h")
    parser.add_argument("--quick", action="store_true", help="60 days from --start (a smoke run)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--url", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    parser.add_argument("--source", default="auto", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.quick:
        args.end = iso_day(to_ms(args.start) + 60 * DAY_MS)
    if args.child:
        return child_main(args)

    intervals = [i.strip() for i in args.intervals.split(",") if i.strip()]
    start_ms, end_ms = to_ms(args.start), to_ms(args.end)
    workdir = Path(tempfile.mkdtemp(prefix="bench_peers_"))
    cache_days = (end_ms - start_ms) // DAY_MS + 30  # the whole range stays synthesized
    sandbox = Sandbox("--latency-ms", f"{args.latency_ms:g}", "--cache-days", str(cache_days), workdir=workdir)
    try:
        pages, seconds = warm_sandbox(sandbox, intervals, start_ms, end_ms)
        run_child(["--child", "imports"], project_env(workdir / "imports", sandbox.url), workdir / "imports.log")
        print(f"sandbox {sandbox.url} (own process group, +{args.latency_ms:g} ms per request); warm-up "
              f"{pages} pages in {seconds:.1f} s, untimed; {SYMBOL} {', '.join(intervals)} "
              f"[{args.start}, {args.end}); data in {workdir}")
        print(f"load average before: {' '.join(f'{x:.2f}' for x in os.getloadavg())} on {os.cpu_count()} cores")
        common = ["--intervals", ",".join(intervals), "--start", args.start, "--end", args.end]
        results, dirs = {}, {}
        for client in CLIENTS:
            out = workdir / client.replace(" ", "_")
            if client.startswith("project"):
                source = "auto" if client == "project auto" else "rest"  # REST, as the peers
                child_args = ["--child", "project", *common, "--source", source]
                env = project_env(out, sandbox.url)
                data_dir = out / "raw"
            else:
                child_args = ["--child", client, "--url", sandbox.url, "--out", str(out), *common]
                env = child_env({})
                data_dir = out
            sandbox.reset()
            result = run_child(child_args, env, workdir / f"{client.replace(' ', '_')}.log")
            result["stats"] = sandbox.stats()
            if result["rc"] != 0:
                raise RuntimeError(f"{client} failed, {child_failure(result)}")
            dirs[client] = data_dir
            results[client] = result
        print(f"load average after: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")

        print(f"\n{'client':<15} {'wall s':>8} {'requests':>9} {'weight':>7} {'archive':>8} {'day files':>10} "
              f"{'RSS MB':>7} {'CPU s':>6} {'vs ccxt':>9} {'vs p-binance':>13}")
        ccxt_wall = results["ccxt"]["wall_s"]
        binance_wall = results["python-binance"]["wall_s"]
        for client in CLIENTS:
            r = results[client]
            s = r["stats"]
            files = r["answer"].get("files", 0)
            if client.startswith("project"):
                ratios = f"{ccxt_wall / r['wall_s']:>8.2f}x {binance_wall / r['wall_s']:>12.2f}x"
            else:
                ratios = f"{'':>9} {'':>13}"
            print(f"{client:<15} {r['wall_s']:>8.2f} {s['requests']:>9} {weight_of(s):>7} {archive_requests(s):>8} "
                  f"{files:>10} {r['maxrss_mb']:>7.0f} {r['cpu_s']:>6.1f} {ratios}")
        print("  (wall: process start to exit, imports included; requests/weight: REST as the sandbox counted "
              "them; 'vs X': X's wall / this wall, i.e. x faster)")
        for client in CLIENTS:
            r = results[client]
            print(f"  {client}: by endpoint {_endpoints(r['stats'])}; by status {r['stats']['by_status']}")

        print("\ndata check:")
        for line in check_datasets(dirs, intervals):
            print(line)
        project = results["project"]["wall_s"]
        auto = results["project auto"]["wall_s"]
        auto_text = f"source=auto {ccxt_wall / auto:.2f}x / {binance_wall / auto:.2f}x"
        print(f"SUMMARY peers: project {project:.1f} s, {ccxt_wall / project:.2f}x faster than ccxt "
              f"({ccxt_wall:.1f} s), {binance_wall / project:.2f}x faster than python-binance ({binance_wall:.1f} s); "
              f"{auto_text}; datasets equal")
    finally:
        sandbox.stop()
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
    return 0


def _endpoints(stats: dict) -> dict:
    out: dict[str, int] = {}
    for path, count in stats["by_endpoint"].items():
        key = "/data/... (archive)" if path.startswith("/data/") else path
        out[key] = out.get(key, 0) + count
    return out


if __name__ == "__main__":
    sys.exit(main())
