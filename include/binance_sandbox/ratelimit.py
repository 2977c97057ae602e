"""Binance's REQUEST_WEIGHT limit: fixed clock-aligned windows, 429 then 418 bans, per IP."""

from __future__ import annotations

import math
import threading
import time
from dataclasses import dataclass

MAX_BAN_S = 3 * 24 * 3600.0  # Binance's bans grow from 2 minutes up to 3 days
# A client that sleeps exactly Retry-After may arrive a hair early by the server's clock.
RETRY_TOLERANCE_S = 0.05
# A request on another connection arriving this soon after a 429 was sent may have been sent before
# the client read that 429 (its threads share one pause, but a thread past its pause check may still
# take a while to send; 0.1 s was once too short in ~60 runs of the fault matrix): it gets the 429
# too, not a ban. On the 429's own connection HTTP/1.1 sends the next
# request only after reading the answer: no grace.
IN_FLIGHT_GRACE_S = 0.5


@dataclass
class Admission:
    status: int  # 200 (go ahead), 429 or 418
    used_weight: int  # X-MBX-USED-WEIGHT-1M to report
    retry_after_s: int | None = None


@dataclass
class _ClientState:
    window: int = -1
    used: int = 0
    retry_until: float = 0.0  # a 429 told the client to wait until then
    told_at: float = 0.0  # when that 429 was sent
    told_connection: object = None  # and on which connection
    ban_until: float = 0.0
    bans: int = 0


class WeightLimiter:
    def __init__(self, weight_limit: int = 6000, window_s: float = 60.0, ban_s: float = 120.0, clock=time.time):
        if weight_limit < 1 or window_s <= 0 or ban_s <= 0:
            raise ValueError("weight_limit, window_s and ban_s must be positive")
        self.weight_limit = weight_limit
        self.window_s = window_s
        self.ban_s = ban_s
        self.clock = clock
        self._clients: dict[str, _ClientState] = {}
        self._lock = threading.Lock()
        self.max_window_weight = 0

    def _state(self, client: str, now: float) -> _ClientState:
        state = self._clients.setdefault(client, _ClientState())
        window = math.floor(now / self.window_s)
        if state.window != window:
            state.window, state.used = window, 0
        return state

    def admit(self, client: str, weight: int, arrived_s: float | None = None, connection: object = None) -> Admission:
        """Charge ``weight`` to the client's current window, or refuse with 429/418.

        A request that was already under way when a 429 was sent could not have backed off: one that
        arrived (``arrived_s``, the limiter's clock) before it, or on another ``connection`` within
        :data:`IN_FLIGHT_GRACE_S` after it, gets the 429 too, not a ban (Binance bans clients that
        keep calling *after* a 429, not the requests they had in flight)."""
        with self._lock:
            now = self.clock()
            state = self._state(client, now)
            if state.ban_until > now:
                return Admission(418, state.used, _whole_seconds(state.ban_until - now))
            waiting = state.retry_until - RETRY_TOLERANCE_S > now
            if waiting and arrived_s is not None and (
                    arrived_s <= state.told_at
                    or (connection != state.told_connection and arrived_s <= state.told_at + IN_FLIGHT_GRACE_S)):
                return Admission(429, state.used, _whole_seconds(state.retry_until - now))
            if state.retry_until - RETRY_TOLERANCE_S > now:
                state.bans += 1
                ban = min(self.ban_s * 2 ** (state.bans - 1), MAX_BAN_S)
                state.ban_until = now + ban
                state.retry_until = 0.0
                return Admission(418, state.used, _whole_seconds(ban))
            state.used += weight
            self.max_window_weight = max(self.max_window_weight, state.used)
            if state.used > self.weight_limit:
                window_end = (state.window + 1) * self.window_s
                retry = _whole_seconds(window_end - now)
                state.retry_until, state.told_at, state.told_connection = now + retry, now, connection
                return Admission(429, state.used, retry)
            return Admission(200, state.used)

    def told_to_wait(self, client: str, seconds: float, connection: object = None) -> None:
        """Record a 429 sent for another reason (an injected storm): hammering on is banned too."""
        with self._lock:
            now = self.clock()
            state = self._state(client, now)
            state.retry_until = max(state.retry_until, now + seconds)
            state.told_at, state.told_connection = now, connection

    def ban(self, client: str, seconds: float) -> None:
        """Record a 418 sent for another reason (an injected ban): the ban holds, as Binance's does."""
        with self._lock:
            now = self.clock()
            state = self._state(client, now)
            state.ban_until = max(state.ban_until, now + seconds)

    def used(self, client: str) -> int:
        with self._lock:
            return self._state(client, self.clock()).used

    def current_window_weight(self) -> int:
        """Highest weight used by any client in the current window."""
        with self._lock:
            now = self.clock()
            return max((self._state(c, now).used for c in list(self._clients)), default=0)

    def reset(self) -> None:
        """Forget windows, pending Retry-Afters and bans (a fresh IP, as far as Binance knows)."""
        with self._lock:
            self._clients.clear()
            self.max_window_weight = 0


def _whole_seconds(seconds: float) -> int:
    return max(1, math.ceil(seconds - 1e-9))
