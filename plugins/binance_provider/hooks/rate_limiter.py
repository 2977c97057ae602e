"""Weight-aware client-side rate limiting for Binance's REQUEST_WEIGHT quota.

Binance counts request weight per IP in fixed windows aligned to the clock (one minute) and
reports the running total in ``X-MBX-USED-WEIGHT-1M``. :class:`WeightLimiter` keeps every
thread of a process under a budget (a safety fraction of the limit) by combining its own
accounting with the server's count, which also includes other processes on the same IP.
It also holds the two pieces of state every caller of a host must share: the pause after a
429 (``Retry-After``) and the ban after a 418; :class:`BanRecord` keeps the ban in a file so the
other processes of the machine (and an Airflow retry) honour it too.

That budget is per process. With ``BINANCE_LIMITER_REDIS_URL`` set, :func:`shared_limiter` and
:func:`shared_ban_record` hand out the Redis-backed ones of
:mod:`binance_provider.hooks.redis_limiter` instead (one budget and one ban per host for every
process and worker); without it, they are :meth:`WeightLimiter.shared` and a :class:`BanRecord`.
"""

from __future__ import annotations

import fcntl
import os
import re
import tempfile
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

# Request weight of each endpoint the hook uses (Binance spot API docs, checked 2025).
# Entries are (weight with ``symbol`` given, weight without it).
ENDPOINT_WEIGHTS: dict[str, tuple[int, int]] = {
    "/api/v3/ping": (1, 1),
    "/api/v3/time": (1, 1),
    "/api/v3/exchangeInfo": (20, 20),
    "/api/v3/klines": (2, 2),
    "/api/v3/ticker/price": (2, 4),
    "/api/v3/ticker/24hr": (2, 80),
}


LIMITER_REDIS_URL_VARIABLE = "BINANCE_LIMITER_REDIS_URL"


def limiter_redis_url(env: Mapping[str, str] | None = None) -> str | None:
    """``BINANCE_LIMITER_REDIS_URL`` (``None`` when unset or empty)."""
    value = ((os.environ if env is None else env).get(LIMITER_REDIS_URL_VARIABLE) or "").strip()
    return value or None


def host_of(base_url: str) -> str:
    """``host:port`` of a base URL: what Binance's per-IP limits (and so the ban records) key on."""
    return urlsplit(base_url).netloc or base_url


def normalize_endpoint(endpoint: str | None) -> str:
    """``api/v3/klines`` and ``/api/v3/klines?x=1`` both become ``/api/v3/klines``."""
    path = (endpoint or "").split("?", 1)[0]
    return path if path.startswith("/") else f"/{path}"


def request_weight(endpoint: str | None, params: Mapping[str, Any] | None = None) -> int:
    """Weight Binance charges for one request; ``ValueError`` for an endpoint not in the table."""
    path = normalize_endpoint(endpoint)
    try:
        with_symbol, without_symbol = ENDPOINT_WEIGHTS[path]
    except KeyError:
        raise ValueError(
            f"endpoint {path!r} has no known request weight; known: {', '.join(ENDPOINT_WEIGHTS)} "
            "(pass weight=N to run() for another endpoint)"
        ) from None
    has_symbol = bool(params) and params.get("symbol") not in (None, "")
    return with_symbol if has_symbol else without_symbol


def checked_budget(budget: int, window_s: float) -> tuple[int, float]:
    """``(budget, window_s)`` of a limiter, or ``ValueError`` naming the bad one."""
    if budget < 1:
        raise ValueError(f"rate-limit budget must be >= 1, got {budget}")
    if not window_s > 0:
        raise ValueError(f"rate-limit window must be > 0 s, got {window_s}")
    return int(budget), float(window_s)


def registered(cls, key, make: Callable[[], Any], budget: int, window_s: float):
    """The limiter ``cls._shared[key]`` (made by ``make`` the first time), following the latest
    caller's budget and window; its pause and ban state are kept."""
    with cls._shared_lock:
        limiter = cls._shared.get(key)
        if limiter is None:
            limiter = cls._shared[key] = make()
        elif (limiter.budget, limiter.window_s) != (int(budget), float(window_s)):
            limiter.configure(budget, window_s)
        return limiter


class BanActive(Exception):
    """The host banned this IP (418); no request may be sent before ``until_s`` (epoch seconds)."""

    def __init__(self, until_s: float) -> None:
        super().__init__(f"banned until epoch {until_s:.3f}")
        self.until_s = until_s


@dataclass(frozen=True)
class Reservation:
    """Weight taken by one request; hand it back to :meth:`WeightLimiter.release`."""

    weight: int
    window: int


def _condition_wait(condition: threading.Condition, timeout_s: float) -> None:
    condition.wait(timeout_s)


class WeightLimiter:
    """Thread-safe budget of request weight per fixed clock-aligned window.

    :param budget: weight this process lets itself use per window (limit × safety).
    :param window_s: window length in seconds; windows start at multiples of it since the epoch,
        as Binance's minutes do.
    :param clock: epoch seconds now (injectable for tests).
    :param wait: blocks the calling thread for up to ``timeout_s`` while releasing ``condition``;
        the default waits on the condition, so a ban or pause wakes sleepers at once.
    """

    def __init__(
        self,
        budget: int,
        window_s: float,
        *,
        clock: Callable[[], float] = time.time,
        wait: Callable[[threading.Condition, float], None] = _condition_wait,
    ) -> None:
        self._condition = threading.Condition()
        self._clock = clock
        self._wait = wait
        self.configure(budget, window_s)
        self._window = self._window_of(clock())
        # Weight counted against the current window: the server's latest X-MBX-USED-WEIGHT-1M
        # (which includes other processes on the IP) plus everything sent since, never less
        # than what this process sent itself.
        self._used = 0
        self._in_flight = 0  # weight of requests sent but not yet answered
        self._paused_until = 0.0
        self._banned_until = 0.0

    def configure(self, budget: int, window_s: float) -> None:
        budget, window_s = checked_budget(budget, window_s)
        with self._condition:
            self.budget, self.window_s = budget, window_s
            self._condition.notify_all()

    # -- the process-wide registry: one limiter per base URL ------------------------------------

    _shared: dict[str, WeightLimiter] = {}
    _shared_lock = threading.Lock()

    @classmethod
    def shared(cls, base_url: str, budget: int, window_s: float) -> WeightLimiter:
        """The limiter every hook of this process uses for ``base_url``.

        Budget and window follow the latest caller's settings; pause and ban state are kept.
        """
        return registered(cls, base_url.rstrip("/"), lambda: cls(budget, window_s), budget, window_s)

    @classmethod
    def clear_shared(cls) -> None:
        """Forget every shared limiter (tests start each server with a clean slate)."""
        with cls._shared_lock:
            cls._shared.clear()

    # -- accounting -------------------------------------------------------------------------------

    def _window_of(self, now_s: float) -> int:
        return int(now_s // self.window_s)

    def _roll(self, now_s: float) -> None:
        window = self._window_of(now_s)
        if window != self._window:
            self._window = window
            # Requests still in flight may reach the server after its window turned, so they
            # count against the new window until they are answered.
            self._used = self._in_flight

    def _window_end(self) -> float:
        return (self._window + 1) * self.window_s

    def acquire(self, weight: int) -> Reservation:
        """Block until ``weight`` fits in the current window, then take it.

        Raises :class:`BanActive` (without waiting) while a ban is recorded, and ``ValueError``
        if ``weight`` can never fit.
        """
        if weight > self.budget:
            raise ValueError(
                f"request weight {weight} exceeds the rate-limit budget {self.budget} per window "
                "(BINANCE_RATE_LIMIT_WEIGHT x BINANCE_RATE_LIMIT_SAFETY)"
            )
        with self._condition:
            while True:
                now = self._clock()
                self._roll(now)
                if self._banned_until > now:
                    raise BanActive(self._banned_until)
                if self._paused_until > now:
                    self._wait(self._condition, self._paused_until - now)
                    continue
                if self._used + weight <= self.budget:
                    self._used += weight
                    self._in_flight += weight
                    return Reservation(weight=weight, window=self._window)
                # Room only comes back when the window turns.
                self._wait(self._condition, max(self._window_end() - now, 1e-3))

    def release(self, reservation: Reservation, used_weight: int | None = None) -> None:
        """The request of ``reservation`` was answered (``used_weight`` from its header) or failed."""
        with self._condition:
            self._roll(self._clock())  # before forgetting it: it may have landed in a new window
            self._in_flight -= reservation.weight
            if used_weight is not None and reservation.window == self._window:
                self._used = max(self._used, used_weight)

    def used(self) -> int:
        """Weight counted against the current window."""
        with self._condition:
            self._roll(self._clock())
            return self._used

    # -- 429 pause and 418 ban --------------------------------------------------------------------

    def pause_until(self, until_s: float | None = None) -> float:
        """Stop every thread from sending before ``until_s`` (default: the current window's end).

        Returns the pause end actually in force (a longer pause already set is kept).
        """
        with self._condition:
            self._roll(self._clock())
            target = self._window_end() if until_s is None else until_s
            self._paused_until = max(self._paused_until, target)
            self._condition.notify_all()
            return self._paused_until

    def ban_until(self, until_s: float) -> None:
        """Record a 418 ban: :meth:`acquire` raises :class:`BanActive` until ``until_s``."""
        with self._condition:
            self._banned_until = max(self._banned_until, until_s)
            self._condition.notify_all()

    @property
    def paused_until(self) -> float | None:
        with self._condition:
            return self._paused_until if self._paused_until > self._clock() else None

    @property
    def banned_until(self) -> float | None:
        """Epoch seconds the current ban ends, or ``None`` when not banned."""
        with self._condition:
            return self._banned_until if self._banned_until > self._clock() else None


class BanRecord:
    """A 418 ban, kept in a small file so every process on this machine sees it.

    Bans are per IP and outlive the process that got one: an Airflow retry is a new process
    with a fresh limiter, and calling during the ban lengthens it (2 minutes up to 3 days).
    One file per host under ``directory`` (default ``$BINANCE_BAN_DIR``, else
    ``$AIRFLOW_HOME/binance_bans``) holds the ban's end in epoch seconds; it is re-read only
    when it changes (one ``stat`` per request).
    """

    def __init__(self, base_url: str, directory: str | os.PathLike | None = None) -> None:
        if directory is None:
            directory = os.environ.get("BINANCE_BAN_DIR") or Path(
                os.environ.get("AIRFLOW_HOME") or Path(tempfile.gettempdir()) / "airflow") / "binance_bans"
        root = Path(directory)
        host = host_of(base_url)
        self.path = root / (re.sub(r"[^A-Za-z0-9_.-]", "_", host) + ".ban")
        self._seen: tuple[int, int] | None = None
        self._until_s = 0.0

    def until(self) -> float:
        """Epoch seconds the recorded ban ends (0 when none was recorded)."""
        try:
            stat = self.path.stat()
        except OSError:
            return 0.0
        seen = (stat.st_mtime_ns, stat.st_size)
        if seen != self._seen:
            try:
                self._until_s = float(self.path.read_text().strip() or 0)
            except (OSError, ValueError):  # half-read or garbled: ignore it, the server will tell
                self._until_s = 0.0
            self._seen = seen
        return self._until_s

    def record(self, until_s: float) -> None:
        """Store a ban ending at ``until_s`` (a longer one already stored is kept)."""
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.path.with_name(self.path.name + ".lock"), "a+b") as lock:
                fcntl.flock(lock.fileno(), fcntl.LOCK_EX)  # read-max-write: a longer ban is never lost
                until_s = max(until_s, self.until())
                temp = self.path.with_name(f".{self.path.name}.{os.getpid()}.{threading.get_ident()}")
                temp.write_text(f"{until_s!r}\n")
                os.replace(temp, self.path)  # readers see the old ban or the new one, never a part
        except OSError:
            pass  # the in-process limiter still holds the ban


# -- which limiter and ban record a client uses ---------------------------------------------------


def shared_limiter(base_url: str, budget: int, window_s: float) -> Any:
    """The limiter of ``base_url`` for this process: the Redis-backed one shared by every process
    when ``BINANCE_LIMITER_REDIS_URL`` is set, else :meth:`WeightLimiter.shared`.

    With Redis configured but unreachable this raises
    :class:`~binance_provider.hooks.redis_limiter.LimiterBackendUnavailable`: never a silent
    per-process budget.
    """
    url = limiter_redis_url()
    if url is None:
        return WeightLimiter.shared(base_url, budget, window_s)
    from binance_provider.hooks.redis_limiter import RedisWeightLimiter

    return RedisWeightLimiter.shared(url, base_url, budget, window_s)


def shared_ban_record(base_url: str, file_record: BanRecord | None = None) -> Any:
    """The 418 record of ``base_url``: in Redis when ``BINANCE_LIMITER_REDIS_URL`` is set, else
    ``file_record`` (the caller's cached :class:`BanRecord`) or a new one."""
    url = limiter_redis_url()
    if url is None:
        return file_record if file_record is not None else BanRecord(base_url)
    from binance_provider.hooks.redis_limiter import RedisBanRecord

    return RedisBanRecord.shared(url, base_url)
