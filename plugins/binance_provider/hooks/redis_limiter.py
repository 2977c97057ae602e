"""One Binance weight budget and one 418 ban per IP, shared by every process and worker through Redis.

:class:`~binance_provider.hooks.rate_limiter.WeightLimiter` keeps the threads of one process under
the budget; workers on one IP each holding a full budget would together exceed Binance's limit
(429s, then a 418 ban for the whole IP). When ``BINANCE_LIMITER_REDIS_URL`` is set,
:func:`binance_provider.hooks.rate_limiter.shared_limiter` hands out a :class:`RedisWeightLimiter`
instead: same interface, same window arithmetic, but the count, the 429 pause and the 418 ban live
in Redis, so every worker sees them.

Why redis-py primitives and not the ``limits`` library: ``limits`` offers fixed/moving window
counters that only go up by the caller's own hits. Binance's budget must also be *raised* to the
server's count (``X-MBX-USED-WEIGHT-1M`` includes weight this client never sent: other tools on
the IP), must carry weight still in flight into the next window, and must hold a 429 pause
(``Retry-After``) and a 418 ban that stop every worker before its next request. None of these is a
``limits`` operation, and composing them around it would not be atomic. Three short Lua scripts
(``register_script``: EVALSHA, loaded on first use) do each check-and-take atomically on the
server instead.

Keys, per host (``host:port`` of the base URL, as the file ban record is; the braces are a Redis
Cluster hash tag, so every key of a host lives in one slot and the scripts stay cluster-safe)::

    binance:limiter:{<host>}:w:<window_s>:<n>   weight counted against window n (int)
    binance:limiter:{<host>}:f:<window_s>:<n>   weight taken in window n, not yet answered (int)
    binance:limiter:{<host>}:pause              epoch seconds a 429 pause ends
    binance:limiter:{<host>}:ban                epoch seconds a 418 ban ends

Window ``n`` is ``[n * window_s, (n + 1) * window_s)`` in epoch seconds, as Binance's minutes are.
Every key expires (a window's keys one window after it ends, the pause and the ban a second after
they end), so Redis never fills. Time is the caller's clock (as for :class:`WeightLimiter`, and as
the ``Retry-After`` arithmetic of the client): workers' clocks should be NTP-synced; a small skew
only moves a window edge, which the safety fraction of the budget and the reconciliation with the
server's count absorb.

Waiting is a bounded sleep (at most :attr:`RedisWeightLimiter.poll_s`, 0.25 s) until the window
ends or the pause does, re-asking Redis after each, so a ban recorded by another worker is seen
within a poll; a ban or pause recorded in this process wakes its sleepers at once.

If Redis is configured but cannot be reached, every call fails with
:class:`LimiterBackendUnavailable` naming ``BINANCE_LIMITER_REDIS_URL``: the client never falls back
to a per-process budget on its own, since that is how a cluster of workers gets a 418.

``redis`` is imported only when a Redis limiter is first made (never without the variable).
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from binance_provider.hooks.rate_limiter import (
    LIMITER_REDIS_URL_VARIABLE,
    BanActive,
    Reservation,
    _condition_wait,
    checked_budget,
    host_of,
    registered,
)

KEY_PREFIX = "binance:limiter"
POLL_S = 0.25  # longest sleep between two looks at Redis while waiting for room
_TTL_MARGIN_MS = 1000  # keys outlive their meaning by this much (clock differences between workers)

# KEYS: window count, window in-flight, previous window in-flight, pause, ban
# ARGV: now (epoch s), weight, budget, ttl of the window keys (ms)
# -> {"ok", count} | {"full", count} | {"pause", until} | {"ban", until}
_ACQUIRE = """
local now = tonumber(ARGV[1])
local ban = redis.call('GET', KEYS[5])
if ban and tonumber(ban) > now then return {'ban', ban} end
local pause = redis.call('GET', KEYS[4])
if pause and tonumber(pause) > now then return {'pause', pause} end
local used = redis.call('GET', KEYS[1])
if used then
  used = tonumber(used)
else
  -- a new window starts with the weight still in flight from the previous one: those requests
  -- may reach the server after its window turned
  used = math.max(tonumber(redis.call('GET', KEYS[3]) or '0'), 0)
  redis.call('SET', KEYS[1], used, 'PX', ARGV[4])
end
local weight = tonumber(ARGV[2])
if used + weight > tonumber(ARGV[3]) then return {'full', tostring(used)} end
redis.call('INCRBY', KEYS[1], weight)
redis.call('INCRBY', KEYS[2], weight)
redis.call('PEXPIRE', KEYS[2], ARGV[4])
return {'ok', tostring(used + weight)}
"""

# KEYS: current window count, previous window in-flight, the reservation's window in-flight
# ARGV: weight, server's used weight ('' if none), ttl of the window keys (ms),
#       '1' if the reservation was taken in the current window
# -> the current window's count
_RELEASE = """
local used = redis.call('GET', KEYS[1])
if used then
  used = tonumber(used)
else
  used = math.max(tonumber(redis.call('GET', KEYS[2]) or '0'), 0)
  redis.call('SET', KEYS[1], used, 'PX', ARGV[3])
end
if redis.call('EXISTS', KEYS[3]) == 1 then redis.call('DECRBY', KEYS[3], ARGV[1]) end
if ARGV[4] == '1' and ARGV[2] ~= '' then
  local server = tonumber(ARGV[2])
  if server > used then
    redis.call('SET', KEYS[1], ARGV[2], 'KEEPTTL')
    used = server
  end
end
return tostring(used)
"""

# KEYS: pause or ban; ARGV: until (epoch s), ttl (ms) -> the end in force (a later one is kept)
_RAISE_UNTIL = """
local current = redis.call('GET', KEYS[1])
if current and tonumber(current) >= tonumber(ARGV[1]) then return current end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
return ARGV[1]
"""


class LimiterBackendUnavailable(RuntimeError):
    """``BINANCE_LIMITER_REDIS_URL`` is set but Redis cannot be used: no request is sent."""


def redact_url(url: str) -> str:
    """``url`` with any password replaced by ``***`` (for messages and logs)."""
    try:
        parts = urlsplit(url)
        if parts.password is None:
            return url
        user = parts.username or ""
        host = parts.hostname or ""
        if ":" in host:
            host = f"[{host}]"
        port = f":{parts.port}" if parts.port else ""
        return urlunsplit(parts._replace(netloc=f"{user}:***@{host}{port}"))
    except ValueError:
        return "<unparsable URL>"


def _failure(url: str, exc: BaseException) -> LimiterBackendUnavailable:
    return LimiterBackendUnavailable(
        f"{LIMITER_REDIS_URL_VARIABLE}={redact_url(url)}: Redis "
        f"{'is unreachable' if _is_connection_error(exc) else 'failed'} ({type(exc).__name__}: {exc}). "
        "The Binance weight budget and 418 ban are shared through it, so no request is sent without it; "
        f"fix Redis, or unset {LIMITER_REDIS_URL_VARIABLE} to give each process its own budget."
    )


_redis: Any = None


def _redis_module() -> Any:
    global _redis
    if _redis is None:
        import redis  # only here: a process without BINANCE_LIMITER_REDIS_URL never imports it

        _redis = redis
    return _redis


def _is_connection_error(exc: BaseException) -> bool:
    redis = _redis_module()
    return isinstance(exc, (redis.ConnectionError, redis.TimeoutError, OSError))


# -- one connection pool per process per URL -------------------------------------------------------

_clients: dict[str, Any] = {}
_clients_lock = threading.Lock()


def redis_client(url: str) -> Any:
    """This process's ``redis.Redis`` for ``url`` (one connection pool per URL), checked with a PING
    when first made; :class:`LimiterBackendUnavailable` if Redis cannot be reached."""
    with _clients_lock:
        client = _clients.get(url)
        if client is not None:
            return client
        redis = _redis_module()
        try:
            client = redis.Redis.from_url(url, decode_responses=True, socket_timeout=5.0,
                                          socket_connect_timeout=2.0, health_check_interval=30)
            client.ping()
        except (redis.RedisError, OSError, ValueError) as exc:  # ValueError: a malformed URL
            raise _failure(url, exc) from exc
        _clients[url] = client
        return client


def _ttl_ms(until_s: float, now_s: float) -> int:
    return max(0, math.ceil((until_s - now_s) * 1000)) + _TTL_MARGIN_MS


class _Keys:
    """Key names of one host (see the module docstring)."""

    def __init__(self, base_url: str) -> None:
        self.prefix = f"{KEY_PREFIX}:{{{host_of(base_url)}}}"
        self.pause = f"{self.prefix}:pause"
        self.ban = f"{self.prefix}:ban"

    def weight(self, window_s: float, window: int) -> str:
        return f"{self.prefix}:w:{window_s:g}:{window}"

    def in_flight(self, window_s: float, window: int) -> str:
        return f"{self.prefix}:f:{window_s:g}:{window}"


class _RedisState:
    """The Redis client, registered scripts and key names shared by a host's limiter and ban record."""

    def __init__(self, url: str, base_url: str, client: Any | None = None) -> None:
        self.url = url
        self.client = client if client is not None else redis_client(url)
        self.keys = _Keys(base_url)
        self.acquire = self.client.register_script(_ACQUIRE)
        self.release = self.client.register_script(_RELEASE)
        self.raise_until = self.client.register_script(_RAISE_UNTIL)

    def call(self, operation: Callable[[], Any]) -> Any:
        """Run ``operation``; any Redis failure becomes :class:`LimiterBackendUnavailable`."""
        redis = _redis_module()
        try:
            return operation()
        except (redis.RedisError, OSError) as exc:
            raise _failure(self.url, exc) from exc

    def get_until(self, key: str) -> float:
        raw = self.call(lambda: self.client.get(key))
        return float(raw) if raw else 0.0

    def set_until(self, key: str, until_s: float, now_s: float) -> float:
        until_s = float(until_s)
        result = self.call(lambda: self.raise_until(keys=[key], args=[repr(until_s), _ttl_ms(until_s, now_s)]))
        return float(result)


class RedisWeightLimiter:
    """:class:`~binance_provider.hooks.rate_limiter.WeightLimiter`'s interface, its state in Redis.

    :param url: the Redis URL (``BINANCE_LIMITER_REDIS_URL``), named in every failure.
    :param base_url: the Binance host this budget is for (keyed by ``host:port``).
    :param budget: weight this process lets itself use per window (limit x safety); every worker
        counts against the one shared total.
    :param window_s: window length; windows start at multiples of it since the epoch.
    :param client: a ``redis.Redis`` (``decode_responses=True``) to use instead of the process's
        pool for ``url`` (tests give a second one to see what another process sees).
    :param clock: epoch seconds now (injectable for tests).
    :param wait: blocks the calling thread for up to ``timeout_s`` while releasing ``condition``
        (held by the caller); the default waits on the condition, so a ban or pause recorded in
        this process wakes sleepers at once.
    :param poll_s: longest single wait before Redis is asked again.
    """

    def __init__(
        self,
        url: str,
        base_url: str,
        budget: int,
        window_s: float,
        *,
        client: Any | None = None,
        clock: Callable[[], float] = time.time,
        wait: Callable[[threading.Condition, float], None] = _condition_wait,
        poll_s: float = POLL_S,
    ) -> None:
        if not poll_s > 0:
            raise ValueError(f"poll_s must be > 0, got {poll_s}")
        self._condition = threading.Condition()
        self._clock = clock
        self._wait = wait
        self.poll_s = float(poll_s)
        self.configure(budget, window_s)
        self._redis = _RedisState(url, base_url, client)
        self.base_url = base_url

    def configure(self, budget: int, window_s: float) -> None:
        budget, window_s = checked_budget(budget, window_s)
        with self._condition:
            self.budget, self.window_s = budget, window_s
            self._condition.notify_all()

    # -- the process-wide registry: one limiter per Redis URL and host ----------------------------

    _shared: dict[tuple[str, str], RedisWeightLimiter] = {}
    _shared_lock = threading.Lock()

    @classmethod
    def shared(cls, url: str, base_url: str, budget: int, window_s: float) -> RedisWeightLimiter:
        """The limiter every client of this process uses for ``base_url`` through ``url``.

        Budget and window follow the latest caller's settings (the shared state is in Redis).
        """
        return registered(cls, (url, host_of(base_url)), lambda: cls(url, base_url, budget, window_s), budget,
                          window_s)

    @classmethod
    def clear_shared(cls) -> None:
        """Forget every shared limiter and ban record and close this process's Redis pools (tests)."""
        with cls._shared_lock:
            cls._shared.clear()
        with RedisBanRecord._shared_lock:
            RedisBanRecord._shared.clear()
        with _clients_lock:
            for client in _clients.values():
                client.close()
            _clients.clear()

    # -- accounting -------------------------------------------------------------------------------

    def _window_of(self, now_s: float) -> int:
        return int(now_s // self.window_s)

    def _window_keys_ttl_ms(self, window: int, now_s: float) -> int:
        # A window's keys outlive it by one window: its in-flight weight carries into the next.
        return _ttl_ms((window + 2) * self.window_s, now_s)

    def acquire(self, weight: int) -> Reservation:
        """Block until ``weight`` fits in the current window's shared count, then take it.

        Raises :class:`BanActive` (without waiting) while a ban is recorded, ``ValueError`` if
        ``weight`` can never fit, and :class:`LimiterBackendUnavailable` if Redis fails.
        """
        if weight > self.budget:
            raise ValueError(
                f"request weight {weight} exceeds the rate-limit budget {self.budget} per window "
                "(BINANCE_RATE_LIMIT_WEIGHT x BINANCE_RATE_LIMIT_SAFETY)"
            )
        keys, redis = self._redis.keys, self._redis
        while True:
            now = self._clock()
            window_s, budget = self.window_s, self.budget
            window = int(now // window_s)
            status, value = redis.call(lambda: redis.acquire(
                keys=[keys.weight(window_s, window), keys.in_flight(window_s, window),
                      keys.in_flight(window_s, window - 1), keys.pause, keys.ban],
                args=[repr(float(now)), int(weight), budget, self._window_keys_ttl_ms(window, now)],
            ))
            if status == "ok":
                return Reservation(weight=int(weight), window=window)
            if status == "ban":
                raise BanActive(float(value))
            # Paused until then, or room only comes back when the window turns.
            until = float(value) if status == "pause" else (window + 1) * window_s
            with self._condition:
                self._wait(self._condition, min(max(until - now, 1e-3), self.poll_s))

    def release(self, reservation: Reservation, used_weight: int | None = None) -> None:
        """The request of ``reservation`` was answered (``used_weight`` from its header) or failed.

        The server's count of the current window raises the shared count (never lowers it).
        """
        now = self._clock()
        window_s = self.window_s
        window = int(now // window_s)
        keys, redis = self._redis.keys, self._redis
        redis.call(lambda: redis.release(
            keys=[keys.weight(window_s, window), keys.in_flight(window_s, window - 1),
                  keys.in_flight(window_s, reservation.window)],
            args=[int(reservation.weight), "" if used_weight is None else int(used_weight),
                  self._window_keys_ttl_ms(window, now), "1" if reservation.window == window else "0"],
        ))

    def used(self) -> int:
        """Weight counted against the current window (by every process)."""
        now = self._clock()
        window_s = self.window_s
        window = int(now // window_s)
        keys, redis = self._redis.keys, self._redis
        count, carried = redis.call(lambda: redis.client.mget(
            keys.weight(window_s, window), keys.in_flight(window_s, window - 1)))
        if count is not None:
            return int(count)
        return max(int(carried or 0), 0)  # the window has not started: it will carry this

    # -- 429 pause and 418 ban --------------------------------------------------------------------

    def pause_until(self, until_s: float | None = None) -> float:
        """Stop every thread of every process from sending before ``until_s`` (default: the current
        window's end). Returns the pause end in force (a longer pause already set is kept)."""
        now = self._clock()
        target = (self._window_of(now) + 1) * self.window_s if until_s is None else until_s
        resume = self._redis.set_until(self._redis.keys.pause, target, now)
        with self._condition:
            self._condition.notify_all()
        return resume

    def ban_until(self, until_s: float) -> None:
        """Record a 418 ban for every process: :meth:`acquire` raises :class:`BanActive` until ``until_s``."""
        self._redis.set_until(self._redis.keys.ban, until_s, self._clock())
        with self._condition:
            self._condition.notify_all()

    @property
    def paused_until(self) -> float | None:
        until = self._redis.get_until(self._redis.keys.pause)
        return until if until > self._clock() else None

    @property
    def banned_until(self) -> float | None:
        """Epoch seconds the current ban ends, or ``None`` when not banned."""
        until = self._redis.get_until(self._redis.keys.ban)
        return until if until > self._clock() else None


class RedisBanRecord:
    """:class:`~binance_provider.hooks.rate_limiter.BanRecord`'s interface on the Redis ban key the
    host's :class:`RedisWeightLimiter` reads: a 418 seen by any worker stops them all."""

    _shared: dict[tuple[str, str], RedisBanRecord] = {}
    _shared_lock = threading.Lock()

    def __init__(self, url: str, base_url: str, *, client: Any | None = None) -> None:
        self._redis = _RedisState(url, base_url, client)
        self.key = self._redis.keys.ban

    @classmethod
    def shared(cls, url: str, base_url: str) -> RedisBanRecord:
        key = (url, host_of(base_url))
        with cls._shared_lock:
            record = cls._shared.get(key)
            if record is None:
                record = cls._shared[key] = cls(url, base_url)
            return record

    def until(self) -> float:
        """Epoch seconds the recorded ban ends (0 when none is recorded)."""
        return self._redis.get_until(self.key)

    def record(self, until_s: float) -> None:
        """Store a ban ending at ``until_s`` (a longer one already stored is kept)."""
        self._redis.set_until(self.key, until_s, time.time())
