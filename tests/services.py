"""Real services for tests, started as child processes on 127.0.0.1 and stopped by their pid.

``start_redis(tmp_dir)`` runs Debian's ``redis-server`` (no persistence) on a free port.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

_PING = b"*1\r\n$4\r\nPING\r\n"


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listened on a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _pong(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5) as conn:
            conn.sendall(_PING)
            return conn.recv(64).startswith(b"+PONG")
    except OSError:
        return False


def _stop(process: subprocess.Popen) -> None:
    """SIGTERM to the server's own process group (its pid is the group id), SIGKILL if it lingers."""
    if process.poll() is not None:
        return
    for sig, grace_s in ((signal.SIGTERM, 5.0), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            return
        try:
            process.wait(timeout=grace_s)
            return
        except subprocess.TimeoutExpired:
            continue


def start_redis(tmp_dir: str | os.PathLike, *, attempts: int = 3,
                timeout_s: float = 10.0) -> tuple[str, Callable[[], None]]:
    """Start ``redis-server --port <free port> --bind 127.0.0.1 --save "" --appendonly no`` in its
    own process group, working in ``tmp_dir``; return ``(url, stop)`` once it answers PING.

    ``stop()`` ends that process (by its pid) and is safe to call twice. Where util-linux's
    ``setpriv`` exists the server also gets SIGTERM if the process that started it dies without
    calling ``stop`` (call this from the thread that lives as long as the server should).
    """
    binary = shutil.which("redis-server") or "/usr/bin/redis-server"
    if not os.path.exists(binary):
        raise RuntimeError("redis-server is not installed (apt-get install --no-install-recommends redis-server)")
    work = Path(tmp_dir)
    work.mkdir(parents=True, exist_ok=True)
    prefix = [shutil.which("setpriv"), "--pdeathsig", "TERM"] if shutil.which("setpriv") else []
    log = work / "redis.log"
    for _ in range(attempts):  # another process may take the free port before redis binds it
        port = free_port()
        command = prefix + [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                            "--appendonly", "no", "--dir", str(work), "--logfile", str(log)]
        process = subprocess.Popen(command, cwd=work, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                   stderr=subprocess.DEVNULL, start_new_session=True)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline and process.poll() is None:
            if _pong(port):
                return f"redis://127.0.0.1:{port}/0", lambda process=process: _stop(process)
            time.sleep(0.02)
        _stop(process)
    tail = log.read_text(errors="replace")[-2000:] if log.exists() else "(no log)"
    raise RuntimeError(f"redis-server did not answer PING after {attempts} attempts:\n{tail}")
