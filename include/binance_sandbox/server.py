"""HTTP plumbing of the sandbox: a threading HTTP/1.1 server in front of ``BinanceApi``
(and of ``Archive``, the public-data archive under ``/data/``), with Binance's weight limit,
injected faults, control endpoints and counters."""

from __future__ import annotations

import json
import sys
import threading
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qsl, urlsplit

from .api import ApiError, BinanceApi, Request, parse_time_unit
from .archive import PREFIX as ARCHIVE_PREFIX
from .archive import Archive
from .faults import GARBAGE_BODY, FaultError, FaultInjector
from .market import SyntheticMarket
from .ratelimit import WeightLimiter

WEIGHT_HEADER = "X-MBX-USED-WEIGHT-1M"
JSON_TYPE = "application/json"


def _json(payload) -> bytes:
    return json.dumps(payload, separators=(",", ":")).encode()


class _Stats:
    def __init__(self):
        self._lock = threading.Lock()
        self.archive_in_flight = 0  # archive requests received and not yet answered (a gauge: reset keeps it)
        self.reset()

    def reset(self):
        with self._lock:
            self.by_endpoint: Counter = Counter()
            self.by_status: Counter = Counter()
            self.archive_by_kind: Counter = Counter()
            self.archive_by_status: Counter = Counter()
            self.archive_bytes = 0

    def archive_started(self, delta: int = 1):
        with self._lock:
            self.archive_in_flight += delta

    def record(self, path: str, status: int):
        with self._lock:
            self.by_endpoint[path] += 1
            self.by_status[str(status)] += 1

    def record_archive(self, kind: str, status: int, body_bytes: int):
        """An archive request: counted apart from the REST ones (it carries no weight)."""
        with self._lock:
            self.archive_by_kind[kind] += 1
            self.archive_by_status[str(status)] += 1
            self.archive_bytes += body_bytes

    def snapshot(self) -> dict:
        with self._lock:
            return {
                "requests": sum(self.by_endpoint.values()),
                "by_endpoint": dict(self.by_endpoint),
                "by_status": dict(self.by_status),
                "rate_limited_429": self.by_status.get("429", 0),
                "banned_418": self.by_status.get("418", 0),
                "archive_requests": sum(self.archive_by_kind.values()),
                "archive_by_kind": dict(self.archive_by_kind),
                "archive_by_status": dict(self.archive_by_status),
                "archive_bytes": self.archive_bytes,
                "archive_in_flight": self.archive_in_flight,
            }


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as clients' sessions expect
    disable_nagle_algorithm = True  # headers and body go out in separate writes: no 40 ms stalls
    server_version = "binance-sandbox"
    sys_version = ""

    @property
    def sandbox(self) -> "SandboxServer":
        return self.server.sandbox

    def parse_request(self) -> bool:
        # when the request reached us, before anything (a test's hold, a latency fault) delays it
        self.arrived_s = self.sandbox._limiter.clock()
        return super().parse_request()

    def log_message(self, format, *args):
        if self.sandbox.verbose:
            sys.stderr.write(f"{self.address_string()} - {format % args}\n")

    def do_GET(self):
        self._dispatch("GET")

    def do_POST(self):
        self._dispatch("POST")

    def do_DELETE(self):
        self._dispatch("DELETE")

    def do_PUT(self):
        self._dispatch("PUT")

    def do_HEAD(self):
        if urlsplit(self.path).path.startswith(ARCHIVE_PREFIX):
            self._dispatch("HEAD")
        else:
            self.send_error(501, "Unsupported method ('HEAD')")

    # -- plumbing ------------------------------------------------------------------------

    def _send(self, status: int, body: bytes, headers: dict | None = None, path: str | None = None,
              content_type: str = JSON_TYPE, head: bool = False):
        try:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            for name, value in (headers or {}).items():
                self.send_header(name, str(value))
            self.end_headers()
            if not head:
                self.wfile.write(body)
            self.wfile.flush()
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True
        if path is not None:
            self.sandbox._stats.record(path, status)

    def _read_body(self) -> bytes:
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length > 0 else b""

    def _dispatch(self, method: str):
        url = urlsplit(self.path)
        if url.path.startswith("/sandbox/"):
            self._control(method, url.path)
            return
        self._read_body()
        if url.path.startswith(ARCHIVE_PREFIX):
            self._archive(method, url.path)
            return
        self._api(method, url.path, url.query)

    # -- control endpoints (no weight, never faulted) ------------------------------------

    def _control(self, method: str, path: str):
        sandbox = self.sandbox
        body = self._read_body()
        try:
            if path == "/sandbox/faults" and method == "GET":
                payload = sandbox.faults()
            elif path == "/sandbox/faults" and method == "POST":
                try:
                    changes = json.loads(body or b"{}")
                except ValueError:
                    raise FaultError("the body must be a JSON object of fault settings") from None
                payload = sandbox.set_faults(changes)
            elif path == "/sandbox/faults" and method == "DELETE":
                sandbox.clear_faults()
                payload = sandbox.faults()
            elif path == "/sandbox/stats" and method == "GET":
                payload = sandbox.stats()
            elif path == "/sandbox/stats" and method == "DELETE":
                sandbox.reset_stats()
                payload = sandbox.stats()
            elif path == "/sandbox/limits" and method == "DELETE":
                sandbox.reset_limits()
                payload = {}
            else:
                self._send(404, _json({"code": -1, "msg": f"No sandbox endpoint {method} {path}."}))
                return
        except FaultError as exc:
            self._send(400, _json({"code": -1, "msg": str(exc)}))
            return
        self._send(200, _json(payload))

    # -- the public-data archive (no weight; only added latency applies) ------------------

    def _archive(self, method: str, path: str):
        sandbox = self.sandbox
        sandbox._stats.archive_started()
        try:
            self._archive_answer(method, path)
        finally:
            sandbox._stats.archive_started(-1)

    def _archive_answer(self, method: str, path: str):
        sandbox = self.sandbox
        delay = sandbox._faults.archive_delay_s()
        if delay > 0:
            sandbox._stopping.wait(delay)
        head = method == "HEAD"
        if method in ("GET", "HEAD"):
            answer = sandbox._archive.handle(path, head=head)
            status, body, content_type, kind = answer.status, answer.body, answer.content_type, answer.kind
            headers = answer.headers
        else:
            status, body, content_type, kind, headers = 405, b"", "text/plain", "unknown", {"Allow": "GET, HEAD"}
        # counted before it is sent: a client that has its answer also sees it in /sandbox/stats
        sandbox._stats.record_archive(kind, status, 0 if head else len(body))
        self._send(status, body, headers, content_type=content_type, head=head)

    # -- Binance endpoints ---------------------------------------------------------------

    def _api(self, method: str, path: str, query: str):
        sandbox = self.sandbox
        api = sandbox._api
        client = self.client_address[0]
        pairs = parse_qsl(query, keep_blank_values=True)
        params = dict(pairs)
        known = method == "GET" and path in api.routes
        weight = api.weight(path, params) if known else 0

        connection = self.client_address[1]
        admission = sandbox._limiter.admit(client, weight, self.arrived_s, connection)
        headers = {WEIGHT_HEADER: admission.used_weight}
        if admission.status != 200:
            headers["Retry-After"] = admission.retry_after_s
            self._send(admission.status, _json(sandbox._limit_error(admission)), headers, path)
            return
        if not known:
            self._send(404, _json({"code": -1, "msg": f"Unknown endpoint {method} {path}."}), headers, path)
            return

        plan = sandbox._faults.plan(path)
        if plan.ban or plan.storm_retry_after_s is not None:
            if plan.storm_retry_after_s is not None:
                retry = plan.storm_retry_after_s
                sandbox._limiter.told_to_wait(client, retry, connection)
                status, message = 429, sandbox._limit_message(429)
            else:
                retry = plan.ban_s if plan.ban_s is not None else int(sandbox._limiter.ban_s)
                sandbox._limiter.ban(client, max(1, retry))
                status, message = 418, sandbox._limit_message(418)
            headers["Retry-After"] = max(1, retry)
            self._send(status, _json({"code": -1003, "msg": message}), headers, path)
            return
        if plan.delay_s > 0:
            sandbox._stopping.wait(plan.delay_s)
        if plan.hang_s > 0:
            sandbox._stopping.wait(plan.hang_s)
        if plan.error_status is not None:
            self._send(plan.error_status, plan.error_body, headers, path)
            return
        if plan.garbage:
            self._send(200, GARBAGE_BODY, headers, path)
            return

        try:
            if len(pairs) != len(params):
                raise ApiError(-1101, "Duplicate values for a parameter detected.")
            request = Request(path, params, parse_time_unit(self.headers.get("X-MBX-TIME-UNIT")))
            status, payload = api.handle(request)
        except ApiError as exc:
            status, payload = exc.status, exc.payload
        body = _json(payload)
        if plan.truncate and status == 200:
            body = body[: max(1, len(body) // 2)]  # cut mid-document: never valid JSON
        self._send(status, body, headers, path)


class _HTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 128


class SandboxServer:
    """A local Binance-spot-compatible REST server (see the package docstring)."""

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        seed: int = 42,
        symbols=("BTCUSDT", "ETHUSDT"),
        replay=None,
        weight_limit: int = 6000,
        window_s: float = 60.0,
        ban_s: float = 120.0,
        now_ms: int | None = None,
        faults: dict | None = None,
        fault_seed: int = 0,
        verbose: bool = False,
        cache_days: int = 384,
        archive_cache_mb: float = 128,
    ):
        self.host, self.port = host, port
        self.verbose = verbose
        if replay is not None:
            from .replay import ReplayMarket

            self.market = ReplayMarket.load(replay, now_ms=now_ms)
        else:
            self.market = SyntheticMarket(seed=seed, symbols=tuple(s.upper() for s in symbols), now_ms=now_ms,
                                          cache_days=cache_days)
        self._limiter = WeightLimiter(weight_limit, window_s, ban_s)
        self._faults = FaultInjector(faults, seed=fault_seed)
        self._api = BinanceApi(self.market, self._limiter, self._faults)
        self._archive = Archive(self.market, self._faults, cache_bytes=int(archive_cache_mb * 1024 * 1024))
        self._stats = _Stats()
        self._stopping = threading.Event()
        self._httpd: _HTTPServer | None = None
        self._thread: threading.Thread | None = None

    # -- lifecycle -----------------------------------------------------------------------

    def start(self) -> "SandboxServer":
        if self._httpd is not None:
            return self
        self._stopping.clear()
        self._httpd = _HTTPServer((self.host, self.port), _Handler)
        self._httpd.sandbox = self
        self.port = self._httpd.server_address[1]
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, kwargs={"poll_interval": 0.1},
            name=f"binance-sandbox-{self.port}", daemon=True,
        )
        self._thread.start()
        return self

    def serve_forever(self) -> None:
        """Serve in the calling thread until interrupted (the CLI's way)."""
        self.start()
        try:
            self._thread.join()
        except KeyboardInterrupt:
            pass
        finally:
            self.stop()

    def stop(self) -> None:
        if self._httpd is None:
            return
        self._stopping.set()  # wakes injected hangs and latencies
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(timeout=5)
        self._httpd = self._thread = None

    def __enter__(self) -> "SandboxServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    # -- control -------------------------------------------------------------------------

    def set_faults(self, faults: dict) -> dict:
        """Merge ``faults`` into the current ones; returns all current settings."""
        return self._faults.update(faults)

    def clear_faults(self) -> None:
        self._faults.clear()

    def faults(self) -> dict:
        return self._faults.current()

    def stats(self) -> dict:
        snapshot = self._stats.snapshot()
        snapshot.update(
            max_window_weight=self._limiter.max_window_weight,
            current_window_weight=self._limiter.current_window_weight(),
            weight_limit=self._limiter.weight_limit,
            window_s=self._limiter.window_s,
        )
        return snapshot

    def reset_stats(self) -> None:
        self._stats.reset()
        self._limiter.max_window_weight = self._limiter.current_window_weight()

    def reset_limits(self) -> None:
        """Forget used weight, pending Retry-Afters and bans."""
        self._limiter.reset()

    def truth(self, symbol: str, interval: str, start_ms: int, end_ms: int) -> list[list]:
        """The rows /api/v3/klines serves for open_time in [start_ms, end_ms), closed candles only."""
        return self.market.truth(symbol.upper(), interval, start_ms, end_ms, outages=self._faults.outages)

    # -- messages ------------------------------------------------------------------------

    def _limit_message(self, status: int) -> str:
        limiter = self._limiter
        if status == 429:
            window = (
                f"{limiter.window_s // 60:g} MINUTE" if limiter.window_s % 60 == 0 else f"{limiter.window_s:g} SECOND"
            )
            return (
                f"Too much request weight used; current limit is {limiter.weight_limit} request weight "
                f"per {window}. Please use WebSocket Streams for live updates to avoid polling the API."
            )
        return "Way too much request weight used; IP banned. Please use WebSocket Streams for live updates to avoid bans."

    def _limit_error(self, admission) -> dict:
        return {"code": -1003, "msg": self._limit_message(admission.status)}
