"""The fault matrix (issue 15): one function per row, shared by ``tests/reliability`` and
``bench/fault_matrix.py``.

Every row starts a fresh Binance sandbox (the in-process :class:`SandboxServer` the test suite uses,
on a free 127.0.0.1 port) and fresh data dirs, turns one fault on, ingests 30 days of 15m and 1h
(April 2024: one whole calendar month) through it — in-process, or as the CLI
``python -m include.market_data.ingestion <interval> <start> <end> --source ...`` where a process
matters (kill -9, two runs at once, hostile parameters, a second process during a ban) — then reads
the raw Parquet back on its own (pyarrow, not the pipeline's reader) and compares it with the
sandbox's truth (``SandboxServer.truth``: the rows ``/api/v3/klines`` serves, outages removed).

What a row counts, and where each figure comes from:

- ``requests``, ``429s``, ``418s``: the sandbox's ``/sandbox/stats`` (REST only; archive downloads
  are counted apart and named in the notes).
- ``retries``: measured at the sandbox, as requests minus distinct requests (path + query) within
  each run; where k runs of the same window were started together (two runs at once), a request
  asked up to k times is no retry. A gap-check refetch asks another range, so it is no retry.
- ``sent while told to wait``: requests the sandbox received from an IP while a ``Retry-After``
  it had sent to that IP (a 429, or a 418 ban) was still running. The sandbox has no counter of
  its own: its limiter answers each such request with a 418 but does not tell them apart from
  injected bans, and it keeps no request log. So the engine logs every ``/api/v3`` request on its
  own sandbox instance (a subclass of the sandbox's request handler, set on that server only;
  the sandbox's code is not changed): arrival time, connection (client port), query, status,
  ``Retry-After`` and the moment the answer was sent. A request counts when it arrived after a
  notice was sent and before the notice's ``Retry-After`` ran out, except those that were in
  flight when told (the next column): the first request on *another* connection, arriving within
  ``IN_FLIGHT_S`` of the notice, may have been sent before the client had it (on the notice's own
  connection HTTP/1.1 sends the next request only after reading the answer). The sandbox applies
  the same rule: it answers such in-flight requests with the 429, not with a ban.
- ``self-caused 418s``: bans the sandbox started on its own (new bans — 418s not answered during an
  earlier ban — minus the bans the row injected, read from the sandbox's fault counter).
- ``expected``: truth rows of the window; ``stored``: rows in the raw day files of the series;
  ``lost``: truth candles of the window with no identical stored row; ``duplicated``: stored rows
  beyond the first for an ``open_time``; ``invented``: stored rows that are not in the truth or
  differ from it in any field (decimals compared as the exact strings the sandbox served).

Every row must end with lost = duplicated = invented = 0, self-caused 418s = 0 and requests sent
while told to wait = 0 (and every day file readable, each row in its own day's file); each row
also proves its fault really happened (``proofs``) and checks its own expected outcome (``checks``).

Where a row needs "these requests were in flight together when the fault began" (a storm or a ban
mid-run, two runs at once), the sandbox holds the matching requests until all have arrived, turns
the fault on, then answers them one at a time (:meth:`Sandbox.hold`): the race is made certain
instead of likely, so the row's outcome does not depend on thread timing.

Decision for the 418 row: the pipeline **fails clearly** (``BinanceBanned`` naming the ban's end)
instead of waiting a ban out inside the task: bans last 2 minutes to 3 days, and an Airflow retry
after the ban is the designed recovery. The row checks that nothing is sent during the ban (by
the banned process, by a new run in it, by a new CLI process) and that a rerun after the ban
completes the data.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import datetime, timezone
from decimal import Decimal
from pathlib import Path
from typing import Callable, Iterator
from urllib.parse import parse_qsl, urlsplit

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from include.binance_sandbox import SandboxServer
from include.binance_sandbox import server as sandbox_server

ROOT = Path(__file__).resolve().parents[2]
SYMBOL = "BTCUSDT"
INTERVALS = ("15m", "1h")
WINDOW = ("2024-04-01", "2024-05-01")  # 30 days: exactly April 2024, so `auto` takes one monthly file
INTERVAL_MS = {"15m": 15 * 60_000, "1h": 60 * 60_000}
PAGE_LIMIT = 1000  # Binance's klines limit: the pipeline pages with it
SEED = 42
BAN_S = 3  # the sandbox's ban length (self-caused bans; injected ones set their own)
KEEP_ENV = "FAULT_MATRIX_KEEP"  # set to keep each row's workspace (debugging)

# Variables that would change what a row does: cleared for every run (the defaults apply).
_CLEARED = ("BINANCE_SYMBOLS", "BINANCE_INTERVALS", "BINANCE_RATE_LIMIT_WEIGHT", "BINANCE_RATE_LIMIT_WINDOW_S",
            "BINANCE_RATE_LIMIT_SAFETY", "BINANCE_MAX_CONCURRENCY", "BINANCE_LIMITER_REDIS_URL", "INGEST_START",
            "GAP_CHECK_LOOKBACK_DAYS", "QUARANTINE_RETENTION_DAYS")


def _ms(text: str) -> int:
    moment = datetime.fromisoformat(text)
    moment = moment.replace(tzinfo=timezone.utc) if moment.tzinfo is None else moment
    return int(moment.timestamp() * 1000)


WINDOW_MS = (_ms(WINDOW[0]), _ms(WINDOW[1]))


def pages(interval: str) -> int:
    """Page requests the pipeline sends for the window (at most 1000 grid slots each)."""
    return math.ceil((WINDOW_MS[1] - WINDOW_MS[0]) // INTERVAL_MS[interval] / PAGE_LIMIT)


# -- the sandbox, with a request log ------------------------------------------------------------
@dataclass(frozen=True)
class Request:
    """One ``/api/v3`` request as the sandbox saw it (times: epoch seconds, this machine's clock)."""

    arrived: float
    sent: float  # when the answer started to go out
    ip: str
    port: int  # the client's port: one per connection
    path: str
    query: str
    status: int
    retry_after: float | None
    body_json: bool  # the body parses as JSON

    @property
    def key(self) -> tuple[str, str]:
        return self.path, self.query


class _Hold:
    """Holds the first ``count`` requests matching ``match`` until all have arrived (or ``timeout_s``),
    then turns ``faults`` on and lets them through one at a time, in arrival order: a deterministic
    "these requests were all in flight when the fault began"."""

    def __init__(self, sandbox: "Sandbox", match: Callable[[str, dict], bool], count: int, faults: dict | None,
                 timeout_s: float):
        self.sandbox, self.match, self.count, self.faults, self.timeout_s = sandbox, match, count, faults, timeout_s
        self.cond = threading.Condition()
        self.arrived = self.served = 0
        self.filled: bool | None = None  # True: all arrived; False: timed out first

    def enter(self, path: str, params: dict) -> int | None:
        if not self.match(path, params):
            return None
        with self.cond:
            if self.arrived >= self.count:
                return None
            ticket, self.arrived = self.arrived, self.arrived + 1
            if self.arrived == self.count:
                self._open(True)
            deadline = time.monotonic() + self.timeout_s
            while self.filled is None and time.monotonic() < deadline:
                self.cond.wait(max(0.0, deadline - time.monotonic()))
            if self.filled is None:
                self._open(False)
            while self.served != ticket:
                self.cond.wait()
            return ticket

    def _open(self, filled: bool) -> None:
        self.filled = filled
        if self.faults:
            self.sandbox.set_faults(self.faults)
        self.cond.notify_all()

    def leave(self) -> None:
        with self.cond:
            self.served += 1
            self.cond.notify_all()


class _LoggingHandler(sandbox_server._Handler):
    """The sandbox's own request handler, logging each /api/v3 request (installed on one server)."""

    def _dispatch(self, method):
        matrix: Sandbox = self.server.matrix
        self._arrived = time.time()
        url = urlsplit(self.path)
        holds: list[_Hold] = []
        with matrix.in_progress():
            if url.path.startswith("/api/"):
                params = dict(parse_qsl(url.query, keep_blank_values=True))
                for hold in matrix.holds:
                    if hold.enter(url.path, params) is not None:
                        holds.append(hold)
                        break
            try:
                super()._dispatch(method)
            finally:
                for hold in holds:
                    hold.leave()

    def _send(self, status, body, headers=None, path=None, **kwargs):
        sent = time.time()
        super()._send(status, body, headers, path, **kwargs)
        if path is None:  # archive and control answers: not REST requests
            return
        try:
            json.loads(body)
            body_json = True
        except ValueError:
            body_json = False
        retry_after = (headers or {}).get("Retry-After")
        url = urlsplit(self.path)
        self.server.matrix.record(Request(
            arrived=self._arrived, sent=sent, ip=self.client_address[0], port=self.client_address[1],
            path=url.path, query=url.query, status=int(status),
            retry_after=None if retry_after is None else float(retry_after), body_json=body_json))


@dataclass
class _Phase:
    start: float
    end: float | None = None
    runs: int = 1


class Sandbox:
    """A fresh in-process sandbox on a free port, every /api/v3 request logged (see the module doc)."""

    def __init__(self, *, ban_s: float = BAN_S, fault_seed: int = 0):
        self.server = SandboxServer(host="127.0.0.1", port=0, seed=SEED, ban_s=ban_s, fault_seed=fault_seed).start()
        self.server._httpd.matrix = self
        self.server._httpd.RequestHandlerClass = _LoggingHandler  # before anyone knows the port
        self._lock = threading.Lock()
        self._log: list[Request] = []
        self._busy = 0
        self._idle = threading.Condition(self._lock)
        self.holds: list[_Hold] = []
        self.phases: list[_Phase] = []
        self._bans_armed = 0  # ban_418 as last set
        self._bans_done = 0  # injected 418s answered before that

    @property
    def url(self) -> str:
        return self.server.url

    # -- faults -----------------------------------------------------------------------------
    def _count_bans(self, faults: dict) -> None:
        """Before ``ban_418`` changes: the injected bans answered so far are the armed ones not left."""
        if "ban_418" in faults:
            self._bans_done += self._bans_armed - int(self.server.faults()["ban_418"])
            self._bans_armed = int(faults["ban_418"])

    def set_faults(self, faults: dict) -> None:
        with self._lock:
            self._count_bans(faults)
            self.server.set_faults(faults)

    def clear_faults(self) -> None:
        with self._lock:
            self._count_bans({"ban_418": 0})
            self.server.clear_faults()

    def injected_bans(self) -> int:
        """418s the row's faults made the sandbox send (its ``ban_418`` counter used up)."""
        with self._lock:
            return self._bans_done + self._bans_armed - int(self.server.faults()["ban_418"])

    def hold(self, match: Callable[[str, dict], bool], count: int, faults: dict | None = None,
             timeout_s: float = 5.0) -> _Hold:
        hold = _Hold(self, match, count, faults, timeout_s)
        self.holds.append(hold)
        return hold

    # -- the log ----------------------------------------------------------------------------
    @contextlib.contextmanager
    def in_progress(self) -> Iterator[None]:
        with self._lock:
            self._busy += 1
        try:
            yield
        finally:
            with self._lock:
                self._busy -= 1
                self._idle.notify_all()

    def record(self, request: Request) -> None:
        with self._lock:
            self._log.append(request)

    def settle(self, timeout_s: float = 30.0) -> None:
        """Wait until no request is being answered (a hung one answers after its hang)."""
        deadline = time.monotonic() + timeout_s
        with self._lock:
            while self._busy and time.monotonic() < deadline:
                self._idle.wait(0.05)

    def requests(self) -> list[Request]:
        with self._lock:
            return sorted(self._log, key=lambda r: r.arrived)

    def stats(self) -> dict:
        return self.server.stats()

    def truth(self, interval: str, start_ms: int = WINDOW_MS[0], end_ms: int = WINDOW_MS[1]) -> list[list]:
        return self.server.truth(SYMBOL, interval, start_ms, end_ms)

    @contextlib.contextmanager
    def phase(self, runs: int = 1) -> Iterator[None]:
        """Requests of one run (or of ``runs`` identical runs started together): retries are counted per phase."""
        phase = _Phase(time.time(), runs=runs)
        self.phases.append(phase)
        try:
            yield
        finally:
            phase.end = time.time()

    def waits_over_at(self) -> float:
        """When the last Retry-After (429 or 418) the sandbox sent runs out (epoch seconds)."""
        return max((r.sent + r.retry_after for r in self.requests() if r.retry_after is not None), default=0.0)

    def close(self) -> None:
        for hold in self.holds:  # nothing may stay held
            with hold.cond:
                if hold.filled is None:
                    hold._open(False)
        self.server.stop()


# -- what the log says -------------------------------------------------------------------------
# how late after a notice a request on another connection may arrive and still have been sent before
# the client read it: the sandbox's own grace (it answers such requests 429, not with a ban)
from include.binance_sandbox.ratelimit import IN_FLIGHT_GRACE_S as IN_FLIGHT_S  # noqa: E402


@dataclass
class WaitTally:
    notices: int = 0  # answers carrying Retry-After (429 and 418)
    sent_while_told: int = 0  # received while a Retry-After was running
    in_flight: int = 0  # of those, maybe sent before the client had the notice
    new_bans: int = 0


def waits(log: list[Request]) -> WaitTally:
    """Requests received while a Retry-After was running (see the module doc), and the bans begun."""
    tally = WaitTally()
    notices = [r for r in log if r.status in (429, 418) and r.retry_after is not None]
    tally.notices = len(notices)
    by_connection: dict[tuple[str, int], list[Request]] = defaultdict(list)
    for request in log:
        by_connection[(request.ip, request.port)].append(request)

    def first_since(request: Request, notice: Request) -> bool:
        earlier = [r for r in by_connection[(request.ip, request.port)] if notice.sent < r.arrived < request.arrived]
        return not earlier

    for request in log:
        active = [n for n in notices if n is not request and n.ip == request.ip
                  and n.sent < request.arrived < n.sent + n.retry_after]
        if not active:
            continue
        tally.sent_while_told += 1
        tally.in_flight += all(n.port != request.port and request.arrived - n.sent <= IN_FLIGHT_S
                               and first_since(request, n) for n in active)
    bans = sorted((r for r in log if r.status == 418), key=lambda r: r.sent)
    for ban in bans:
        during = any(b is not ban and b.ip == ban.ip and b.retry_after is not None
                     and b.sent < ban.sent < b.sent + b.retry_after for b in bans)
        tally.new_bans += not during
    return tally


def retries(log: list[Request], phases: list[_Phase]) -> int:
    """Requests minus distinct requests (path + query) per phase: in a phase of ``runs`` runs started
    together, a request asked up to ``runs`` times is no retry. Requests outside every phase form one
    more phase."""
    groups: dict[int, list[Request]] = defaultdict(list)
    for request in log:
        index = next((i for i, p in enumerate(phases)
                      if p.start <= request.arrived and (p.end is None or request.arrived <= p.end)), -1)
        groups[index].append(request)
    total = 0
    for index, requests in groups.items():
        runs = phases[index].runs if index >= 0 else 1
        asked: dict[tuple[str, str], int] = defaultdict(int)
        for request in requests:
            asked[request.key] += 1
        total += sum(max(0, n - runs) for n in asked.values())
    return total


# -- data dirs, environment, runs --------------------------------------------------------------
class Workspace:
    """Fresh dirs for one row: ``data/{raw,curated,signals}``, ``bans``, a ``cwd`` and a ``tmp`` for the
    CLI, ``logs`` for its output."""

    def __init__(self, label: str):
        slug = re.sub(r"[^a-z0-9]+", "-", label.lower()).strip("-")[:40]
        self.root = Path(tempfile.mkdtemp(prefix=f"fault-matrix-{slug}-"))
        self.data = self.root / "data"
        self.raw, self.curated, self.signals = self.data / "raw", self.data / "curated", self.data / "signals"
        self.bans, self.cwd, self.tmp, self.logs = (self.root / name for name in ("bans", "cwd", "tmp", "logs"))
        for directory in (self.cwd, self.tmp, self.logs):
            directory.mkdir()

    def env(self, sandbox: Sandbox) -> dict[str, str]:
        connection = json.dumps({"conn_type": "http", "host": sandbox.url})
        return {"RAW_DATA_DIR": str(self.raw), "CURATED_DATA_DIR": str(self.curated),
                "SIGNAL_DATA_DIR": str(self.signals), "BINANCE_BAN_DIR": str(self.bans),
                "AIRFLOW_CONN_BINANCE_DEFAULT": connection, "AIRFLOW_CONN_BINANCE_ARCHIVE": connection,
                "LOG_LEVEL": "WARNING"}

    def snapshot(self) -> set[str]:
        """Every path under the root but ``logs`` (what a refused run must leave as it was)."""
        return {str(p.relative_to(self.root)) for p in self.root.rglob("*") if p.parts[len(self.root.parts)] != "logs"}

    def close(self) -> None:
        if not os.environ.get(KEEP_ENV):
            shutil.rmtree(self.root, ignore_errors=True)


@contextlib.contextmanager
def environ(values: dict[str, str]) -> Iterator[None]:
    """``os.environ`` with ``values`` set and the variables of ``_CLEARED`` unset, restored afterwards."""
    saved = {name: os.environ.get(name) for name in (*values, *_CLEARED)}
    try:
        for name in _CLEARED:
            os.environ.pop(name, None)
        os.environ.update(values)
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


@dataclass
class Run:
    """One ingestion: in-process (``summary`` or ``error``) or a CLI process (``returncode``, output)."""

    label: str
    summary: dict | None = None
    error: BaseException | None = None
    error_text: str = ""
    returncode: int | None = None
    stdout: str = ""
    stderr: str = ""

    @property
    def ok(self) -> bool:
        return self.error is None and self.returncode in (None, 0) and (self.summary is not None)

    def describe(self) -> str:
        if self.ok:
            return f"{self.label}: ok"
        if self.error is not None:
            return f"{self.label}: {type(self.error).__name__}: {str(self.error)[:300]}"
        last = (self.stderr.strip().splitlines() or [""])[-1]
        return f"{self.label}: exit {self.returncode}: {last[:300]}"


def _summary_line(stdout: str) -> dict | None:
    for line in reversed(stdout.splitlines()):
        if line.startswith("{"):
            with contextlib.suppress(ValueError):
                return json.loads(line)
    return None


class Rig:
    """One row's sandbox, workspace, runs and checks."""

    def __init__(self, label: str, **sandbox_options):
        from binance_provider.hooks.rate_limiter import WeightLimiter

        WeightLimiter.clear_shared()  # a port may be reused: no pause or ban from an earlier row
        self.label = label
        self.sandbox = Sandbox(**sandbox_options)
        self.ws = Workspace(label)
        self.runs: list[Run] = []
        self.processes: list[subprocess.Popen] = []
        self.proofs: list[tuple[str, bool]] = []
        self.checks: list[tuple[str, bool]] = []
        self.notes: list[str] = []
        self.details: dict = {}

    def __enter__(self) -> "Rig":
        return self

    def __exit__(self, *exc) -> None:
        for process in self.processes:  # a row that raised between spawn and finish
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
        self.sandbox.close()
        self.ws.close()

    def prove(self, what: str, ok: bool) -> bool:
        """Evidence that the row's fault really happened (else the row proves nothing)."""
        self.proofs.append((what, bool(ok)))
        return bool(ok)

    def check(self, what: str, ok: bool) -> bool:
        """The row's own expected outcome, beside the invariants."""
        self.checks.append((what, bool(ok)))
        return bool(ok)

    # -- runs -------------------------------------------------------------------------------
    def ingest(self, interval: str, *, source: str = "rest", timeout_s: float | None = None,
               label: str | None = None, failure_expected: bool = False) -> Run:
        """One in-process ingestion of the window (the seed API's ``DataIngestion.ingest``).
        Runs are listed in the row's notes when they fail, unless ``failure_expected``."""
        from binance_provider.clients import rest_client
        from include.market_data.config import BINANCE_CONN_ID, load_settings
        from include.market_data.ingestion import DataIngestion
        from include.market_data.sources import BinanceRestSource

        run = Run(label or f"{interval} {source}")
        with self.sandbox.phase(), environ(self.ws.env(self.sandbox)):
            try:
                settings = load_settings()
                rest = None
                if timeout_s is not None:  # the client's documented option, through the REST seam
                    rest = BinanceRestSource(settings, hook=rest_client(BINANCE_CONN_ID, settings.hook_settings(),
                                                                        timeout_s=timeout_s))
                summary = DataIngestion(settings, source=rest).ingest(interval, *WINDOW, SYMBOL, source=source)
                run.summary = summary.as_dict()
            except Exception as exc:  # noqa: BLE001 - a failed run is what some rows measure
                run.error, run.error_text = exc, traceback.format_exc()
        if not failure_expected:
            self.runs.append(run)
        return run

    def cli_env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if k not in _CLEARED}
        env.update(self.ws.env(self.sandbox))
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
        env["TMPDIR"] = str(self.ws.tmp)  # the staging dir too stays where a row can see it
        return env

    def spawn(self, *args: str, name: str) -> subprocess.Popen:
        """``python -m include.market_data.ingestion ARGS`` in its own process group, output to logs/."""
        out = open(self.ws.logs / f"{name}.out", "w")
        err = open(self.ws.logs / f"{name}.err", "w")
        try:
            process = subprocess.Popen([sys.executable, "-m", "include.market_data.ingestion", *args],
                                       cwd=self.ws.cwd, env=self.cli_env(), stdout=out, stderr=err,
                                       start_new_session=True)
            self.processes.append(process)
            return process
        finally:
            out.close()
            err.close()

    def finish(self, process: subprocess.Popen, name: str, timeout_s: float = 120,
               failure_expected: bool = False) -> Run:
        try:
            process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
        run = Run(name, returncode=process.returncode,
                  stdout=(self.ws.logs / f"{name}.out").read_text(), stderr=(self.ws.logs / f"{name}.err").read_text())
        run.summary = _summary_line(run.stdout)
        if not failure_expected:
            self.runs.append(run)
        return run

    def cli(self, *args: str, name: str, failure_expected: bool = False) -> Run:
        with self.sandbox.phase():
            return self.finish(self.spawn(*args, name=name), name, failure_expected=failure_expected)

    def wait_for_waits(self, until_s: float = 0.0) -> None:
        """Sleep until every Retry-After the sandbox sent (and ``until_s``) has run out."""
        end = max(self.sandbox.waits_over_at(), until_s) + 0.1
        time.sleep(max(0.0, end - time.time()))

    # -- the row ------------------------------------------------------------------------------
    def row(self, *, truth: Callable[[str], list[list]] | None = None) -> "Row":
        """Count everything (after the sandbox settled); ``truth(interval)`` overrides the sandbox's truth
        (a refused run must store nothing: its truth is empty)."""
        self.sandbox.settle()
        log = self.sandbox.requests()
        stats = self.sandbox.stats()
        tally = waits(log)
        row = Row(fault=self.label, requests=stats["requests"], retries=retries(log, self.sandbox.phases),
                  r429=stats["rate_limited_429"], r418=stats["banned_418"],
                  self_caused_418=tally.new_bans - self.sandbox.injected_bans(),
                  sent_while_told=tally.sent_while_told, in_flight=tally.in_flight,
                  archive_requests=stats["archive_requests"], proofs=list(self.proofs), checks=list(self.checks),
                  notes=list(self.notes))
        row.proofs.insert(0, ("every request the sandbox counted is in the log", len(log) == stats["requests"]))
        for interval in INTERVALS:
            expected = self.sandbox.truth(interval) if truth is None else truth(interval)
            series = compare(self.ws.raw, interval, expected, self.sandbox)
            row.per_interval[interval] = series
        row.notes.extend(run.describe() for run in self.runs if not run.ok)
        row.details.update(self.details)
        return row


# -- reading the raw files back, and comparing with the truth ------------------------------------
_DECIMALS = (1, 2, 3, 4, 5, 7, 9, 10)  # positions of decimal strings in a kline row


def _partition_re(interval: str) -> re.Pattern:
    return re.compile(rf"^{SYMBOL}_{re.escape(interval)}_(\d{{8}})\.parquet$")


@dataclass
class Series:
    expected: int = 0
    stored: int = 0
    lost: int = 0
    duplicated: int = 0
    invented: int = 0
    unreadable: list[str] = field(default_factory=list)  # day files that do not parse
    misplaced: int = 0  # rows in the file of another UTC day
    temp_files: list[str] = field(default_factory=list)  # anything else in the interval's directory


def read_raw(raw: Path, interval: str) -> tuple[list[tuple], list[str], int, list[str]]:
    """Every row of the series' day files (pyarrow, file by file), the unreadable files, the rows in
    another day's file, and the other names in the directory."""
    directory, pattern = raw / interval, _partition_re(interval)
    rows, unreadable, misplaced, others = [], [], 0, []
    names = sorted(os.listdir(directory)) if directory.is_dir() else []
    for name in names:
        match = pattern.match(name)
        if not match:
            others.append(name)
            continue
        try:
            table = pq.read_table(directory / name)
        except Exception:  # noqa: BLE001 - any file that does not parse
            unreadable.append(name)
            continue
        day = _ms(f"{match[1][:4]}-{match[1][4:6]}-{match[1][6:]}")
        columns = {}
        for column in ("open_time", "close_time"):
            columns[column] = pc.cast(table.column(column), pa.int64()).to_pylist()
        for column in ("open", "high", "low", "close", "volume", "quote_asset_volume", "number_of_trades",
                       "taker_buy_base_asset_volume", "taker_buy_quote_asset_volume"):
            columns[column] = table.column(column).to_pylist()
        for i in range(table.num_rows):
            row = (columns["open_time"][i], columns["open"][i], columns["high"][i], columns["low"][i],
                   columns["close"][i], columns["volume"][i], columns["close_time"][i],
                   columns["quote_asset_volume"][i], columns["number_of_trades"][i],
                   columns["taker_buy_base_asset_volume"][i], columns["taker_buy_quote_asset_volume"][i])
            misplaced += not (day <= row[0] < day + 86_400_000)
            rows.append(row)
    return rows, unreadable, misplaced, others


def same_candle(stored: tuple, truth: list) -> bool:
    """Every field equal; decimals as the exact string the sandbox served."""
    if stored[0] != truth[0] or stored[6] != truth[6] or stored[8] != int(truth[8]):
        return False
    for i in _DECIMALS:
        text, value = truth[i], stored[i]
        if not isinstance(value, Decimal) or value != Decimal(text) or f"{value.quantize(Decimal(text)):f}" != text:
            return False
    return True


def compare(raw: Path, interval: str, expected: list[list], sandbox: Sandbox) -> Series:
    rows, unreadable, misplaced, others = read_raw(raw, interval)
    series = Series(expected=len(expected), stored=len(rows), unreadable=unreadable, misplaced=misplaced,
                    temp_files=others)
    by_time: dict[int, list[tuple]] = defaultdict(list)
    for row in rows:
        by_time[row[0]].append(row)
    series.duplicated = sum(len(copies) - 1 for copies in by_time.values())
    series.lost = sum(1 for t in expected if not any(same_candle(s, t) for s in by_time.get(t[0], [])))
    # truth over every stored time (a row outside the window is invented only if the truth lacks it)
    known = {t[0]: t for t in expected}
    outside = [r[0] for r in rows if r[0] not in known]
    if outside and expected:  # (an empty truth: nothing may be stored at all)
        for t in sandbox.truth(interval, min(outside), max(outside) + 1):
            known.setdefault(t[0], t)
    series.invented = sum(1 for r in rows if r[0] not in known or not same_candle(r, known[r[0]]))
    return series


# -- a row's result ----------------------------------------------------------------------------
@dataclass
class Row:
    fault: str
    requests: int = 0
    retries: int = 0
    r429: int = 0
    r418: int = 0
    self_caused_418: int = 0
    sent_while_told: int = 0
    in_flight: int = 0
    archive_requests: int = 0
    per_interval: dict[str, Series] = field(default_factory=dict)
    proofs: list[tuple[str, bool]] = field(default_factory=list)  # the fault really happened
    checks: list[tuple[str, bool]] = field(default_factory=list)  # the row's own expected outcome
    notes: list[str] = field(default_factory=list)
    details: dict = field(default_factory=dict)

    def total(self, name: str) -> int:
        return sum(getattr(s, name) for s in self.per_interval.values())

    expected = property(lambda self: self.total("expected"))
    stored = property(lambda self: self.total("stored"))
    lost = property(lambda self: self.total("lost"))
    duplicated = property(lambda self: self.total("duplicated"))
    invented = property(lambda self: self.total("invented"))

    def invariant_failures(self) -> list[str]:
        failures = [f"{name} = {value}" for name, value in (
            ("lost", self.lost), ("duplicated", self.duplicated), ("invented", self.invented),
            ("self-caused 418s", self.self_caused_418),
            ("requests sent while told to wait", self.sent_while_told - self.in_flight))
            if value != 0]
        for interval, series in self.per_interval.items():
            if series.unreadable:
                failures.append(f"{interval}: unreadable day files {series.unreadable}")
            if series.misplaced:
                failures.append(f"{interval}: {series.misplaced} rows in another day's file")
        return failures

    def proof_failures(self) -> list[str]:
        return [f"not proven: {what}" for what, ok in self.proofs if not ok]

    def check_failures(self) -> list[str]:
        return [what for what, ok in self.checks if not ok]

    @property
    def ok(self) -> bool:
        return not (self.invariant_failures() or self.proof_failures() or self.check_failures())

    def cells(self) -> list[str]:
        result = "ok" if self.ok else "FAIL: " + "; ".join(
            self.invariant_failures() + self.proof_failures() + self.check_failures())
        return [self.fault, *(str(v) for v in (
            self.requests, self.retries, self.r429, self.r418, self.self_caused_418,
            self.sent_while_told - self.in_flight, self.in_flight, self.expected, self.stored, self.lost, self.duplicated, self.invented)), result]

    def describe(self) -> str:
        """The row as one table plus its checks and notes (what a test prints)."""
        lines = [markdown([self])]
        lines += [f"- fault {'ok  ' if ok else 'FAIL'} {what}" for what, ok in self.proofs]
        lines += [f"- check {'ok  ' if ok else 'FAIL'} {what}" for what, ok in self.checks]
        lines += [f"- note: {note}" for note in self.notes]
        for interval, series in self.per_interval.items():
            lines.append(f"- {interval}: expected {series.expected}, stored {series.stored}, lost {series.lost}, "
                         f"duplicated {series.duplicated}, invented {series.invented}, other files "
                         f"{series.temp_files or 'none'}")
        return "\n".join(lines)


HEADER = ("fault", "requests", "retries", "429s", "418s", "self-caused 418s", "sent while told to wait",
          "(in flight when told)", "expected", "stored", "lost", "duplicated", "invented", "result")


def markdown(rows: list[Row]) -> str:
    lines = ["| " + " | ".join(HEADER) + " |", "|" + "|".join(["---"] + ["---:"] * (len(HEADER) - 2) + ["---"]) + "|"]
    lines += ["| " + " | ".join(cell.replace("|", "\\|") for cell in row.cells()) + " |" for row in rows]
    return "\n".join(lines)


# -- helpers of the rows -----------------------------------------------------------------------
def page_requests(interval: str) -> Callable[[str, dict], bool]:
    """Matches the page requests of ``interval`` (not the first-candle lookup, ``limit=1``)."""
    return lambda path, params: (path == "/api/v3/klines" and params.get("interval") == interval
                                 and params.get("limit") == str(PAGE_LIMIT))


def statuses(sandbox: Sandbox, predicate: Callable[[Request], bool]) -> int:
    return sum(1 for r in sandbox.requests() if predicate(r))


def _ingest_every_interval(rig: Rig, **options) -> list[Run]:
    return [rig.ingest(interval, **options) for interval in INTERVALS]


def _all_ok(rig: Rig, runs: list[Run]) -> None:
    rig.check("every run finished", all(run.ok for run in runs))


# -- the rows ----------------------------------------------------------------------------------
def row_429_storm() -> Row:
    """Two 429s with Retry-After 1 s on the first requests of each run: the client waits them out."""
    with Rig("429 storm, Retry-After 1 s") as rig:
        runs = []
        for interval in INTERVALS:
            rig.sandbox.set_faults({"storm_429": 2, "retry_after_s": 1})
            runs.append(rig.ingest(interval))
            rig.sandbox.clear_faults()
        _all_ok(rig, runs)
        rig.prove("the sandbox sent 429s (2 per run)", rig.sandbox.stats()["rate_limited_429"] == 2 * len(INTERVALS))
        return rig.row()


def row_429_storm_in_flight() -> Row:
    """A 429 storm that begins while every page request of the run is in flight (the sandbox holds the
    pages until all have arrived, then answers the first with a 429 and the others after it)."""
    with Rig("429 storm, pages in flight") as rig:
        runs = []
        for interval in INTERVALS:
            hold = rig.sandbox.hold(page_requests(interval), pages(interval),
                                    {"storm_429": pages(interval), "retry_after_s": 1})
            runs.append(rig.ingest(interval))
            rig.prove(f"{interval}: all {pages(interval)} page requests were in flight together", hold.filled is True)
            rig.sandbox.clear_faults()
            rig.wait_for_waits()  # the next interval starts with no wait running
        _all_ok(rig, runs)
        rig.prove("the sandbox sent 429s", rig.sandbox.stats()["rate_limited_429"] > 0)
        return rig.row()


def row_418_ban() -> Row:
    """A 418 (ban of 3 s) on the first page while every page of the run is in flight.

    The run fails clearly (BinanceBanned naming the ban's end); a second run in the same process and
    a new CLI process during the ban send nothing; a rerun after the ban completes the data."""
    ban_s = 3
    with Rig(f"418 ban {ban_s} s, pages in flight") as rig:
        first = INTERVALS[0]
        hold = rig.sandbox.hold(page_requests(first), pages(first), {"ban_418": 1, "ban_s": ban_s})
        banned = rig.ingest(first, label=f"{first} (banned)", failure_expected=True)
        rig.prove("all page requests were in flight together", hold.filled is True)
        rig.check("the run failed with BinanceBanned", type(banned.error).__name__ == "BinanceBanned")
        until = getattr(banned.error, "until", None)
        ban_notice = next((r for r in rig.sandbox.requests() if r.status == 418), None)
        ban_end = None if ban_notice is None else ban_notice.sent + ban_notice.retry_after

        def names_the_end(moment: datetime | None) -> bool:
            """Not before the sandbox's ban ends (that would call during it), and at most the rounding of
            a Retry-After (whole seconds) and the answers' transit after it."""
            return moment is not None and ban_end is not None and ban_end - 0.05 <= moment.timestamp() <= ban_end + 1.5

        rig.check("the error names the ban's end", names_the_end(until))
        rig.check("it is one error, not a retry loop: one 418 notice per held request",
                  rig.sandbox.stats()["banned_418"] == pages(first))
        before = rig.sandbox.stats()["requests"]
        others = [rig.ingest(interval, label=f"{interval} during the ban", failure_expected=True)
                  for interval in INTERVALS[1:]]
        cli = rig.cli(first, *WINDOW, "--source", "rest", name="cli-during-ban", failure_expected=True)
        rig.details["cli_during_ban"] = cli
        rig.details["ban_until"] = until
        rig.check("runs during the ban failed with BinanceBanned",
                  all(type(run.error).__name__ == "BinanceBanned" for run in others) and cli.returncode not in (0, None))
        rig.check("nothing was sent during the ban (same process, new process)",
                  rig.sandbox.stats()["requests"] == before)
        named = re.search(r"\(until (\S+)\)\s*$", cli.stderr)
        rig.check("the CLI's error names the ban's end",
                  named is not None and names_the_end(datetime.fromisoformat(named[1])))
        rig.sandbox.clear_faults()
        recorded = [datetime.fromisoformat(named[1]).timestamp()] if named else []
        rig.wait_for_waits(max([until.timestamp() if until else 0.0, *recorded]))
        reruns = [rig.ingest(interval, label=f"{interval} rerun after the ban") for interval in INTERVALS]
        rig.notes.append(f"banned run: {banned.describe()}")
        rig.notes.append(f"CLI during the ban: exit {cli.returncode}, stderr {len(cli.stderr.splitlines())} lines, "
                         f"last: {(cli.stderr.strip().splitlines() or [''])[-1][:120]}")
        _all_ok(rig, reruns)
        rig.prove("the sandbox sent the injected 418", rig.sandbox.injected_bans() == 1)
        return rig.row()


def row_5xx() -> Row:
    with Rig("30 % 5xx", fault_seed=10) as rig:
        rig.sandbox.set_faults({"error_rate": 0.3})
        _all_ok(rig, _ingest_every_interval(rig))
        served = statuses(rig.sandbox, lambda r: r.status >= 500)
        rig.notes.append(f"5xx answers: {served}")
        rig.prove("the sandbox answered 5xx", served > 0)
        return rig.row()


def row_hang(timeout_s: float = 2.0, hang_s: float = 4.0) -> Row:
    """Requests that hang past the client's timeout (the client's ``timeout_s`` option set to 2 s so a
    hang costs seconds, not the default 10 s)."""
    with Rig("hangs past the timeout", fault_seed=5) as rig:
        rig.sandbox.set_faults({"hang_rate": 0.3, "hang_s": hang_s})
        _all_ok(rig, _ingest_every_interval(rig, timeout_s=timeout_s))
        rig.sandbox.settle(hang_s + 5)
        hung = statuses(rig.sandbox, lambda r: r.sent - r.arrived >= hang_s * 0.9)
        rig.notes.append(f"hung requests: {hung} (client timeout {timeout_s:g} s, hang {hang_s:g} s)")
        rig.prove("requests hung past the timeout", hung > 0)
        return rig.row()


def _malformed_row(label: str, fault: str, seed: int) -> Row:
    with Rig(label, fault_seed=seed) as rig:
        rig.sandbox.set_faults({fault: 0.3})
        _all_ok(rig, _ingest_every_interval(rig))
        bad = statuses(rig.sandbox, lambda r: r.status == 200 and not r.body_json)
        rig.notes.append(f"malformed 200 bodies: {bad}")
        rig.prove("the sandbox sent bodies that are not JSON", bad > 0)
        return rig.row()


def row_truncated() -> Row:
    return _malformed_row("truncated bodies", "truncate_rate", seed=2)


def row_non_json() -> Row:
    return _malformed_row("non-JSON bodies", "garbage_rate", seed=2)


OUTAGE = (_ms("2024-04-10T22:00:00"), _ms("2024-04-11T02:00:00"))  # across a UTC midnight


def row_outage() -> Row:
    """An exchange outage: no candles for 4 h; recorded as a known gap, nothing invented."""
    with Rig("outage window 4 h") as rig:
        rig.sandbox.set_faults({"outages": [{"start": OUTAGE[0], "end": OUTAGE[1]}]})
        runs = _ingest_every_interval(rig)
        _all_ok(rig, runs)
        for interval, run in zip(INTERVALS, runs):
            slots = (OUTAGE[1] - OUTAGE[0]) // INTERVAL_MS[interval]
            served = {t[0] for t in rig.sandbox.truth(interval)}
            rig.prove(f"{interval}: the truth lacks the {slots} outage slots",
                      not any(OUTAGE[0] <= t < OUTAGE[1] for t in served)
                      and len(served) == (WINDOW_MS[1] - WINDOW_MS[0]) // INTERVAL_MS[interval] - slots)
            gaps = known_gaps(rig.ws.raw, interval)
            rig.check(f"{interval}: the known-gap registry holds exactly the outage ({slots} slots)",
                      gaps == [(OUTAGE[0], OUTAGE[1], slots)])
            rig.check(f"{interval}: the run reported {slots} known gap slots",
                      run.summary is not None and run.summary["known_gap_slots"] == slots)
        return rig.row()


def known_gaps(raw: Path, interval: str) -> list[tuple[int, int, int]]:
    """(start, end, missing_slots) of the registry the ingestion writes (``_gaps/<SYMBOL>_<iv>.parquet``)."""
    path = raw / "_gaps" / f"{SYMBOL}_{interval}.parquet"
    if not path.exists():
        return []
    table = pq.read_table(path)
    starts = pc.cast(table.column("start"), pa.int64()).to_pylist()
    ends = pc.cast(table.column("end"), pa.int64()).to_pylist()
    return list(zip(starts, ends, table.column("missing_slots").to_pylist()))


def _temp_files(raw: Path, interval: str) -> list[str]:
    directory = raw / interval
    pattern = re.compile(rf"^\.{SYMBOL}_{re.escape(interval)}_\d{{8}}\.parquet\..*\.tmp$")
    with contextlib.suppress(FileNotFoundError):
        return [name for name in os.listdir(directory) if pattern.match(name)]
    return []


def kill_during_write(rig: Rig, interval: str, attempts: int = 5, poll_s: float = 0.0005) -> bool:
    """Start the CLI, SIGSTOP its process group as soon as a day file's temp file appears under the
    raw dir, and SIGKILL it if one is still there (a write in progress); else try again (fresh dir)."""
    for attempt in range(attempts):
        name = f"kill-{interval}-{attempt}"
        with rig.sandbox.phase():
            process = rig.spawn(interval, *WINDOW, "--source", "rest", name=name)
            deadline = time.monotonic() + 120
            caught = False
            while process.poll() is None and time.monotonic() < deadline:
                if _temp_files(rig.ws.raw, interval):
                    os.killpg(process.pid, signal.SIGSTOP)
                    caught = bool(_temp_files(rig.ws.raw, interval))
                    os.killpg(process.pid, signal.SIGKILL)
                    break
                time.sleep(poll_s)
            run = rig.finish(process, name, failure_expected=True)
        if caught and run.returncode == -signal.SIGKILL:
            present = len([n for n in os.listdir(rig.ws.raw / interval) if _partition_re(interval).match(n)])
            rig.notes.append(f"{interval}: killed during write_raw (attempt {attempt + 1}): {present} day files "
                             f"renamed, {len(_temp_files(rig.ws.raw, interval))} temp files left")
            return True
        shutil.rmtree(rig.ws.raw / interval, ignore_errors=True)  # missed the write: start over
    return False


def row_kill_9() -> Row:
    """kill -9 of the CLI while write_raw has day files half-written, then a rerun."""
    from include.market_data.storage import RawStore

    with Rig("kill -9 during write_raw, rerun") as rig:
        for interval in INTERVALS:
            rig.prove(f"{interval}: killed while a day file's temp file was on disk", kill_during_write(rig, interval))
        reruns = [rig.cli(interval, *WINDOW, "--source", "rest", name=f"rerun-{interval}") for interval in INTERVALS]
        _all_ok(rig, reruns)
        store = RawStore(str(rig.ws.raw))
        for interval in INTERVALS:
            left = _temp_files(rig.ws.raw, interval)
            listed = store.days(interval, SYMBOL)
            expected_days = (WINDOW_MS[1] - WINDOW_MS[0]) // 86_400_000
            rig.check(f"{interval}: no temp file is left, or the pipeline's reader ignores them "
                      f"({len(left)} left; it lists {len(listed)} day files)",
                      not left or len(listed) == expected_days)
            if left:
                rig.notes.append(f"{interval}: {len(left)} temp files of the killed run stay on disk after the rerun")
        return rig.row()


def row_concurrent() -> Row:
    """Two CLI runs of the same window at once, per interval (four processes; the sandbox holds their
    page requests until both runs of an interval are fetching)."""
    with Rig("two runs, same days, at once") as rig:
        holds = {interval: rig.sandbox.hold(page_requests(interval), 2 * pages(interval), timeout_s=20)
                 for interval in INTERVALS}
        with rig.sandbox.phase(runs=2):
            processes = [(interval, f"{interval}-{n}", rig.spawn(interval, *WINDOW, "--source", "rest",
                                                                 name=f"{interval}-{n}"))
                         for interval in INTERVALS for n in "ab"]
            runs = [(interval, rig.finish(process, name)) for interval, name, process in processes]
        _all_ok(rig, [run for _, run in runs])
        for interval in INTERVALS:
            rig.prove(f"{interval}: both runs were fetching at once", holds[interval].filled is True)
            added = [run.summary["rows_added"] for iv, run in runs if iv == interval and run.summary]
            expected = len(rig.sandbox.truth(interval))
            rig.check(f"{interval}: the two runs added each row once ({added} = {expected})",
                      len(added) == 2 and sum(added) == expected)
        return rig.row()


CORRUPT_DAY = "2024-04-15"


def row_corrupt_partition() -> Row:
    """A stored day file overwritten with garbage, then a rerun: quarantined, refetched, whole again."""
    with Rig("corrupt partition on disk") as rig:
        first = _ingest_every_interval(rig)
        for interval in INTERVALS:
            damaged = rig.ws.raw / interval / f"{SYMBOL}_{interval}_{CORRUPT_DAY.replace('-', '')}.parquet"
            damaged.write_bytes(b"PAR1 this is not a parquet file")
            rig.prove(f"{interval}: {damaged.name} is unreadable now", damaged.name in read_raw(rig.ws.raw, interval)[1])
        second = _ingest_every_interval(rig)
        _all_ok(rig, first + second)
        for interval in INTERVALS:
            name = f"{SYMBOL}_{interval}_{CORRUPT_DAY.replace('-', '')}.parquet"
            quarantine = rig.ws.raw / "_quarantine"
            moved = [p.name for p in quarantine.iterdir() if p.name.startswith(name)] if quarantine.exists() else []
            rig.check(f"{interval}: the damaged file was detected (moved to _quarantine/)", len(moved) == 1)
            state = rig.ws.raw / "_gaps" / f"{SYMBOL}_{interval}.state.json"
            recorded = json.loads(state.read_text()).get("quarantined_days", []) if state.exists() else None
            rig.check(f"{interval}: the day is off the quarantine record (whole again)", recorded == [])
        return rig.row()


def _archive_row(label: str, fault: dict, field_name: str) -> Row:
    """``auto`` over a whole published month whose monthly files are bad: never used, reported, REST instead."""
    with Rig(label) as rig:
        rig.sandbox.set_faults(fault)
        _all_ok(rig, _ingest_every_interval(rig, source="auto"))
        month = WINDOW[0][:7]
        for interval in INTERVALS:
            bad = f"{SYMBOL}-{interval}-{month}.zip"
            findings = quality_findings(rig.ws.raw, interval)
            rig.check(f"{interval}: the refused {bad} is in the quality report",
                      any(f["kind"] == "archive_file_rejected" and f["field"] == field_name
                          and str(f.get("source", "")).endswith(bad) for f in findings))
            sources = day_sources(rig.ws.raw, interval)
            rig.check(f"{interval}: no stored day came from {bad}",
                      bool(sources) and not any(s.endswith(bad) for s in sources))
        stats = rig.sandbox.stats()
        rig.notes.append(f"archive downloads: {stats['archive_requests']} {stats['archive_by_kind']}")
        rig.prove("the sandbox served the bad monthly files", stats["archive_by_kind"].get("monthly_zip", 0) > 0)
        rig.check("each bad file was fetched once more, then left",
                  stats["archive_by_kind"].get("monthly_zip", 0) == 2 * len(INTERVALS))
        return rig.row()


def quality_findings(raw: Path, interval: str) -> list[dict]:
    path = raw / "_quality" / f"{interval}.parquet"
    return pq.read_table(path).to_pylist() if path.exists() else []


def day_sources(raw: Path, interval: str) -> list[str]:
    """The ``source`` metadata of every stored day file of the series."""
    directory, pattern = raw / interval, _partition_re(interval)
    sources = []
    for name in sorted(os.listdir(directory)) if directory.is_dir() else []:
        if pattern.match(name):
            metadata = pq.read_schema(directory / name).metadata or {}
            sources.append(metadata.get(b"source", b"").decode())
    return sources


def row_archive_checksum() -> Row:
    month = WINDOW[0][:7]
    return _archive_row("archive: wrong checksum", {"archive_wrong_checksum": [month]}, "checksum")


def row_archive_corrupt_zip() -> Row:
    month = WINDOW[0][:7]
    return _archive_row("archive: corrupt zip", {"archive_corrupt": [month]}, "corrupt")


# Hostile parameters: (row label, [(CLI arguments, text the one-line error must hold)]).
HOSTILE = {
    "hostile: ../../etc": [
        *(([iv, *WINDOW, "--symbol", "../../etc"], "symbol='../../etc'") for iv in INTERVALS),
        (["../../etc", *WINDOW], "interval='../../etc'"),
    ],
    "hostile: btcusdt": [([iv, *WINDOW, "--symbol", "btcusdt"], "symbol='btcusdt'") for iv in INTERVALS],
    "hostile: start after end": [([iv, WINDOW[1], WINDOW[0]], "start=") for iv in INTERVALS],
    "hostile: far future": [([iv, "2999-01-01", "2999-02-01"], "end=2999-02-01") for iv in INTERVALS],
    "hostile: 20-year window": [
        *(([iv, "2017-08-17", "2037-08-17"], "end=2037-08-17") for iv in INTERVALS),  # ends in the future
        *(([iv, "2006-11-01", "2026-11-01"], "start=2006-11-01") for iv in INTERVALS),  # begins before INGEST_START
    ],
}


def hostile_row(label: str) -> Row:
    """Each input refused by the CLI with exit code 2 and one line naming it; nothing written anywhere
    (the whole workspace, data dirs, cwd and TMPDIR included, is as it was) and nothing asked of Binance."""
    with Rig(label) as rig:
        before = rig.ws.snapshot()
        for n, (args, named) in enumerate(HOSTILE[label]):
            run = rig.cli(*args, name=f"hostile-{n}", failure_expected=True)
            lines = run.stderr.strip().splitlines()
            rig.check(f"`{' '.join(args)}`: exit 2, one line `error: ...{named}...`, no traceback, no output",
                      run.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: ")
                      and named in lines[0] and "Traceback" not in run.stderr and run.stdout == "")
            if lines:
                rig.notes.append(f"{' '.join(args)} -> {lines[-1][:140]}")
        rig.check("nothing was created anywhere (workspace unchanged)", rig.ws.snapshot() == before)
        stats = rig.sandbox.stats()
        rig.check("nothing was asked of Binance", stats["requests"] == 0 and stats["archive_requests"] == 0)
        return rig.row(truth=lambda interval: [])


@dataclass(frozen=True)
class RowSpec:
    id: str
    label: str
    run: Callable[[], Row]


ROWS: list[RowSpec] = [
    RowSpec("429-storm", "429 storm, Retry-After 1 s", row_429_storm),
    RowSpec("429-storm-in-flight", "429 storm, pages in flight", row_429_storm_in_flight),
    RowSpec("418-ban", "418 ban 3 s, pages in flight", row_418_ban),
    RowSpec("5xx", "30 % 5xx", row_5xx),
    RowSpec("hang", "hangs past the timeout", row_hang),
    RowSpec("truncated", "truncated bodies", row_truncated),
    RowSpec("non-json", "non-JSON bodies", row_non_json),
    RowSpec("outage", "outage window 4 h", row_outage),
    RowSpec("kill-9", "kill -9 during write_raw, rerun", row_kill_9),
    RowSpec("concurrent", "two runs, same days, at once", row_concurrent),
    RowSpec("corrupt-partition", "corrupt partition on disk", row_corrupt_partition),
    RowSpec("archive-checksum", "archive: wrong checksum", row_archive_checksum),
    RowSpec("archive-corrupt-zip", "archive: corrupt zip", row_archive_corrupt_zip),
    *(RowSpec("hostile-" + re.sub(r"[^a-z0-9]+", "-", label.split(": ", 1)[1].lower()).strip("-") or "x", label,
              (lambda label=label: hostile_row(label))) for label in HOSTILE),
]
ROW_IDS = {spec.id: spec for spec in ROWS}


def run_rows(ids: list[str] | None = None) -> list[Row]:
    return [spec.run() for spec in ROWS if ids is None or spec.id in ids]
