"""Parquet partitions: raw klines and curated features, one file per UTC day.

Writes are atomic (temp file + ``os.replace`` locally, a single object PUT on object
stores) and merge with what the partition holds, under a per-partition file lock, so
re-running a window is idempotent and two runs writing the same day never lose each
other's rows. A partition that cannot be read is moved to ``_quarantine/`` and treated
as absent, so its candles are fetched again rather than crash-looping.

A write of many days is one group commit (:class:`GroupCommit`): each day file is written to a
temp file beside it and fsynced (its bytes are on disk before its rename makes it visible), then
renamed into place, and each directory touched is fsynced once, before the write returns —
instead of a commit per file. Days are merged in chunks of :data:`GROUP_LOCK_DAYS`: a chunk's
stripes are taken in sorted order (so two group writers never wait on each other in a cycle), its
days read and merged, the merged partitions that keep existing rows validated in one call, then
committed; a new day is neither read nor merged nor validated again.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import io
import os
import re
import threading
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import date, datetime, timedelta, timezone
from pathlib import Path
from typing import BinaryIO, Callable, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from include.market_data import observability
from include.market_data.schema import RAW_COLUMNS, RAW_SCHEMA, SCHEMA_VERSION, validate_raw, with_series_columns
from include.market_data.timeframes import DAY_MS, day_key, day_start_ms, now_ms

log = observability.get_logger(__name__)

QUARANTINE_DIR = "_quarantine"
LOCK_DIR = "_locks"
_PARTITION_RE = re.compile(r"^(?P<symbol>[A-Z0-9]{5,20})_(?P<interval>[0-9]+[smhdwM])_(?P<day>\d{8})\.parquet$")
_CURATED_RE = re.compile(r"^(?P<interval>[0-9]+[smhdwM])_curated_(?P<day>\d{8})\.parquet$")

# Days merged under one set of locks (and validated in one call): bounds the stripes a group write
# holds at once (and how long it keeps other writers of those stripes waiting, ~0.1 s) while the
# per-call cost of validation is spread over many days.
GROUP_LOCK_DAYS = 64


def resolve_root(location: str):
    """A local ``Path`` for plain paths, an Airflow ``ObjectStoragePath`` for URLs (``s3://...``)."""
    if "://" in location and not location.startswith("file://"):
        from airflow.sdk import ObjectStoragePath  # deferred: heavy, and only needed for object stores

        return ObjectStoragePath(location)
    return Path(location.removeprefix("file://")).absolute()


def _is_local(path) -> bool:
    return isinstance(path, Path)


def _temp_path(path: Path) -> Path:
    return path.parent / f".{path.name}.{uuid.uuid4().hex}.tmp"


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# Threads that fsync a group's temp files together: concurrent fsyncs on one file system share
# journal commits (ext4 here: 145-180 us a file one after another, ~55 us with 8 threads, 400 files).
FSYNC_THREADS = 8
# Threads that encode and write a group's temp files (Parquet encoding and file creation release
# the GIL, so two overlap on two cores): 1460 new 15m day files 1.23 -> 0.99 ms a file, merges
# 1.94 -> 1.66 ms (bench/writer.py, median of 5 alternating runs).
ENCODE_THREADS = 2


class _Staged:
    __slots__ = ("path", "temp", "fd", "job", "data")

    def __init__(self, path, temp=None, fd=None, job=None, data=None):
        self.path, self.temp, self.fd, self.job, self.data = path, temp, fd, job, data


class GroupCommit:
    """Atomic replacement of many files, made durable together.

    Locally :meth:`stage` writes each new file to a temp file in its target's directory (with
    ``threads``, in the background: encoding and creating files overlap); :meth:`publish` fsyncs
    every staged temp file (concurrently: the journal commits are shared), and only then renames
    each over its target (readers see the old file or the new one, and no rename can make
    unflushed bytes visible); :meth:`sync` — once, at the end — fsyncs each directory touched
    once, which makes the renames durable. On an object store a file is published by one PUT of
    its whole content (atomic there) and there is nothing to sync. A failure leaves each target
    old or new: the temp files not yet renamed are removed. Use it as a context manager (or call
    :meth:`close`): the directories are synced and the threads stopped on the way out.
    """

    def __init__(self, threads: bool = False):
        self._staged: list[_Staged] = []
        self._dirs: dict[str, Path] = {}  # touched, not yet synced
        self._made: set[str] = set()  # directories known to exist
        self._threads = threads
        self._encoders = self._syncers = None

    def __enter__(self) -> GroupCommit:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        try:
            self.abort()
            self.sync()
        finally:
            for pool in (self._encoders, self._syncers):
                if pool is not None:
                    pool.shutdown(wait=True)
            self._encoders = self._syncers = None

    def _pool(self, which: str):
        from concurrent.futures import ThreadPoolExecutor  # deferred: only group writes need it

        if which == "encode":
            if self._encoders is None:
                self._encoders = ThreadPoolExecutor(ENCODE_THREADS, thread_name_prefix="encode")
            return self._encoders
        if self._syncers is None:
            self._syncers = ThreadPoolExecutor(FSYNC_THREADS, thread_name_prefix="fsync")
        return self._syncers

    def _prepare_dir(self, path: Path) -> None:
        parent = str(path.parent)
        if parent not in self._made:
            path.parent.mkdir(parents=True, exist_ok=True)
            self._made.add(parent)

    @staticmethod
    def _write_temp(temp: Path, data) -> int:
        fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o666)
        try:
            view, written = memoryview(data), 0
            while written < len(view):
                written += os.write(fd, view[written:])
        except BaseException:
            os.close(fd)
            with contextlib.suppress(FileNotFoundError):
                os.unlink(temp)
            raise
        return fd

    def stage(self, path, data) -> None:
        """Queue ``path``'s new content, the bytes ``data`` (bytes or a pyarrow Buffer)."""
        self._stage(path, lambda: data)

    def stage_table(self, path, table: pa.Table, metadata: Mapping[str, str]) -> None:
        """Queue ``path``'s new content: ``table`` as Parquet (:func:`serialize`)."""
        self._stage(path, lambda: serialize(table, metadata))

    def _stage(self, path, make: Callable[[], object]) -> None:
        if not _is_local(path):
            data = make()
            self._staged.append(_Staged(path, data=data.to_pybytes() if isinstance(data, pa.Buffer) else bytes(data)))
            return
        self._prepare_dir(path)
        item = _Staged(path, temp=_temp_path(path))
        if self._threads and ENCODE_THREADS > 0:
            item.job = self._pool("encode").submit(lambda: self._write_temp(item.temp, make()))
        else:
            item.fd = self._write_temp(item.temp, make())
        self._staged.append(item)

    def _settle(self) -> None:
        """Wait for the background writes; the first failure raises (after all have ended)."""
        error = None
        for item in self._staged:
            if item.job is not None:
                try:
                    item.fd = item.job.result()
                except BaseException as exc:  # noqa: BLE001 - re-raised below, once every write ended
                    error = error or exc
                item.job = None
        if error is not None:
            raise error

    def publish(self) -> None:
        """Make the staged files visible: every temp file fsynced, then each renamed into place."""
        self._settle()
        staged, done = self._staged, 0
        try:
            fds = [item.fd for item in staged if item.fd is not None]
            if len(fds) > 1 and self._threads:
                list(self._pool("fsync").map(os.fsync, fds))
            else:
                for fd in fds:
                    os.fsync(fd)
            for item in staged:
                if item.temp is None:
                    item.path.parent.mkdir(parents=True, exist_ok=True)
                    item.path.write_bytes(item.data)
                    done += 1
                else:
                    os.replace(item.temp, item.path)
                    done += 1  # renamed: its descriptor is closed here, never again by abort()
                    self._dirs[str(item.path.parent)] = item.path.parent
                    os.close(item.fd)
        finally:
            self._staged = staged[done:]
            self.abort()  # what was not renamed is removed: its target stays as it was

    def replace(self, path, data) -> None:
        """Replace ``path`` with the bytes ``data`` now (:meth:`stage` then :meth:`publish`)."""
        self.stage(path, data)
        self.publish()

    def replace_with(self, path, write: Callable[[BinaryIO], object]) -> None:
        """Replace ``path`` with what ``write(handle)`` writes. The whole file is in memory first (on
        an object store fsspec uploads on close even when the writer raised: a part would replace it)."""
        buffer = io.BytesIO()
        write(buffer)
        self.replace(path, buffer.getbuffer())

    def abort(self) -> None:
        """Drop what is staged and not published (temp files removed)."""
        with contextlib.suppress(BaseException):
            self._settle()
        staged, self._staged = self._staged, []
        for item in staged:
            if item.fd is not None:
                with contextlib.suppress(OSError):
                    os.close(item.fd)
            if item.temp is not None and item.data is None:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(item.temp)

    def sync(self) -> None:
        """fsync each directory a rename touched since the last sync, once."""
        while self._dirs:
            _, directory = self._dirs.popitem()
            _fsync_dir(directory)


def atomic_write(path, write: Callable[[BinaryIO], object]) -> None:
    """Replace ``path`` with what ``write(handle)`` writes, in one step: readers see the old
    file or the new one, never a part (temp file fsynced + ``os.replace`` + directory fsync
    locally, one PUT on S3/GCS)."""
    with GroupCommit() as commit:
        commit.replace_with(path, write)


_EPOCH_ORDINAL = date(1970, 1, 1).toordinal()


def day_from_key(key: str) -> int:
    """'YYYYMMDD' -> epoch ms of that UTC midnight (no strptime: it runs once per partition file)."""
    return (date(int(key[:4]), int(key[4:6]), int(key[6:8])).toordinal() - _EPOCH_ORDINAL) * DAY_MS


def _names(directory) -> list[str]:
    """File names in ``directory`` (one C-level readdir locally; no Path object per entry)."""
    return os.listdir(directory) if _is_local(directory) else [entry.name for entry in directory.iterdir()]


# -- locks ------------------------------------------------------------------------------
# A bounded set of lock files: the lock of a path is one of LOCK_STRIPES stripes of its tier,
# ``_locks/<tier>-<nn>.lock``, picked by a hash of the path relative to the root. Tiers order the
# nesting: a thread blocks on a lock only when every lock it holds is of an earlier tier (a
# curation's section, then a partition, then a record kept beside partitions), so no cycle of
# waits can form however the stripes collide. A lock on a stripe the thread already holds is
# granted at once (two partitions on one stripe nest; flock on a second descriptor of the same
# file would wait for itself). Any other nested lock waits at most NESTED_LOCK_WAIT_S, then raises
# LockTimeout rather than risk a deadlock. Object stores have no file lock: there the stripes are
# in-process locks, which serialize the threads of one process (the DAGs that write to an object
# store run one writing task at a time).
LOCK_STRIPES = 256
LOCK_TIERS = ("section", "stripe", "record")
NESTED_LOCK_WAIT_S = 300.0


class LockTimeout(TimeoutError):
    """A lock nested out of tier order was not free in time (waiting on could deadlock)."""


def lock_stripe(relative: str) -> int:
    """The stripe (0 .. LOCK_STRIPES - 1) of a path relative to its root, the same in every process."""
    digest = hashlib.blake2b(relative.replace(os.sep, "/").encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") % LOCK_STRIPES


_thread_locks = threading.local()  # .held: this thread's locks, key -> tier rank
_process_locks: dict[str, threading.Lock] = {}  # object stores: one per stripe key
_process_locks_guard = threading.Lock()


def _held() -> dict[str, int]:
    held = getattr(_thread_locks, "held", None)
    if held is None:
        held = _thread_locks.held = {}
    return held


def _after_fork_in_child() -> None:  # a forked child has none of its parent's threads, nor their locks
    global _thread_locks, _process_locks_guard
    _thread_locks, _process_locks_guard = threading.local(), threading.Lock()
    _process_locks.clear()


os.register_at_fork(after_in_child=_after_fork_in_child)


def _wait_until(attempt: Callable[[], bool], wait_s: float, what: str) -> None:
    deadline, pause = time.monotonic() + wait_s, 0.001
    while not attempt():
        if time.monotonic() >= deadline:
            raise LockTimeout(f"{what} was not free within {wait_s:g}s, and this thread holds a lock of the "
                              f"same or a later tier (nest locks in the order {' -> '.join(LOCK_TIERS)})")
        time.sleep(pause)
        pause = min(pause * 2, 0.05)


@contextlib.contextmanager
def _file_lock(lock_path: Path, wait_s: float | None, what: str) -> Iterator[None]:
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "a+b") as handle:
        if wait_s is None:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        else:
            def attempt() -> bool:
                try:
                    fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
                    return True
                except BlockingIOError:
                    return False

            _wait_until(attempt, wait_s, what)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


@contextlib.contextmanager
def _thread_lock(key: str, wait_s: float | None, what: str) -> Iterator[None]:
    with _process_locks_guard:
        lock = _process_locks.setdefault(key, threading.Lock())
    if wait_s is None:
        lock.acquire()
    else:
        _wait_until(lambda: lock.acquire(timeout=0.05), wait_s, what)
    try:
        yield
    finally:
        lock.release()


@dataclass(frozen=True)
class MergeResult:
    path: str
    day_ms: int
    rows_before: int
    rows_after: int
    added: int
    revised: int


class PartitionIO:
    """Read, lock, merge and atomically replace Parquet files under one root."""

    def __init__(self, root: str, on_quarantine: Callable[[object], None] | None = None):
        self.root = resolve_root(root)
        self.quarantined: list[str] = []
        self.on_quarantine = on_quarantine  # told the path of each partition moved aside

    # -- low level ---------------------------------------------------------------------
    def lock_name(self, path, tier: str = "stripe") -> str:
        """The lock file under ``_locks/`` that stands for ``path`` in ``tier``: ``<tier>-<nn>.lock``."""
        if tier not in LOCK_TIERS:
            raise ValueError(f"tier={tier!r} is not one of {LOCK_TIERS}")
        base, text = str(self.root), str(path)
        relative = text[len(base):].lstrip("/" + os.sep) if text.startswith(base) else text
        return f"{tier}-{lock_stripe(relative):02x}.lock"

    def _lock_key(self, name: str) -> str:
        return str(self.root / LOCK_DIR / name) if _is_local(self.root) else f"{self.root}#{name}"

    @contextlib.contextmanager
    def _acquire(self, name: str, tier: str, what: str, wait_s: float | None) -> Iterator[None]:
        key, held = self._lock_key(name), _held()
        if key in held:  # this thread holds the stripe already (maybe for another path): nest freely
            yield
            return
        local = _is_local(self.root)
        with _file_lock(self.root / LOCK_DIR / name, wait_s, what) if local else _thread_lock(key, wait_s, what):
            held[key] = LOCK_TIERS.index(tier)
            try:
                yield
            finally:
                del held[key]

    @staticmethod
    def _nested_wait(tier: str) -> float | None:
        """How long a lock of ``tier`` may be waited for now: unbounded unless this thread holds a
        lock of the same or a later tier (then NESTED_LOCK_WAIT_S, see LOCK_TIERS)."""
        rank = LOCK_TIERS.index(tier)
        return NESTED_LOCK_WAIT_S if any(r >= rank for r in _held().values()) else None

    @contextlib.contextmanager
    def lock(self, path, *, tier: str = "stripe") -> Iterator[None]:
        """Exclusive lock on ``path`` (on its stripe, see LOCK_TIERS): across processes on local
        disks (flock), across the threads of this process everywhere (object stores included;
        between processes they rely on the DAGs running one writer at a time, see the README)."""
        name = self.lock_name(path, tier)
        with self._acquire(name, tier, f"lock {name} (for {path})", self._nested_wait(tier)):
            yield

    @contextlib.contextmanager
    def lock_many(self, paths, *, tier: str = "stripe") -> Iterator[None]:
        """The locks of all ``paths`` at once, their stripes taken in sorted order.

        Every thread that holds several stripes of a tier took them in this one order, so no cycle
        of waits can form between them: each stripe is waited for without a bound — unless this
        thread held a lock of the same or a later tier before the call (then each wait is bounded,
        as for any nested lock). A stripe this thread already holds is not taken again.
        """
        names = sorted({self.lock_name(path, tier) for path in paths})
        wait_s = self._nested_wait(tier)
        with contextlib.ExitStack() as stack:
            for name in names:
                stack.enter_context(self._acquire(name, tier, f"lock {name} (of {len(names)} for a group write)",
                                                  wait_s))
            yield

    def read(self, path, columns: list[str] | None = None) -> pa.Table | None:
        """The table in ``path``; ``None`` when absent or not Parquet (then quarantined).

        Only a file that does not parse is quarantined; an I/O error (a permission, a flaky
        object store) raises, so a healthy partition is never moved aside by a transient fault.
        """
        if _is_local(path):
            try:
                handle = path.open("rb")
            except FileNotFoundError:
                return None
        elif not path.exists():
            return None
        else:
            handle = path.open("rb")
        with handle:
            data = handle.read()  # an I/O error raises here
        try:
            return _parse(data, columns)
        except (pa.ArrowException, OSError, ValueError) as exc:  # the bytes are in memory: these mean corrupt
            self.quarantine(path, reason=f"{type(exc).__name__}: {exc}")
            return None

    def read_metadata(self, path) -> dict[str, str]:
        with path.open("rb") as handle:
            raw = pq.read_schema(handle).metadata or {}
        return {k.decode(): v.decode() for k, v in raw.items() if not k.startswith(b"ARROW")}

    def quarantine(self, path, reason: str) -> None:
        stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S%fZ")
        target_dir = self.root / QUARANTINE_DIR
        target_dir.mkdir(parents=True, exist_ok=True)
        target = target_dir / f"{path.name}.{stamp}"
        if self.on_quarantine is not None:  # on the record first: a crash after the move loses nothing
            self.on_quarantine(path)
        path.rename(target)
        self.quarantined.append(str(path))
        log.warning("partition quarantined", path=str(path), moved_to=str(target), reason=reason[:300],
                    status="quarantined")

    def write_atomic(self, path, table: pa.Table, metadata: dict[str, str]) -> None:
        """Replace ``path`` with ``table`` in one step; readers see the old or the new file."""
        with GroupCommit() as commit:
            commit.replace(path, serialize(table, metadata))

    def merge(
        self,
        path,
        day_ms: int,
        new: pa.Table,
        metadata: dict[str, str],
        replaces: Callable[[pa.Table], np.ndarray],
        sort_keys: list[tuple[str, str]],
        validate: Callable[[pa.Table], None],
        new_validated: bool = False,
        rebuild: Callable[[pa.Table], pa.Table | None] | None = None,
    ) -> MergeResult:
        """Merge ``new`` into the partition at ``path`` under its lock.

        ``replaces(existing)`` marks the existing rows that ``new`` supersedes. Nothing is
        written when the merge changes no row, so re-running leaves the file untouched.
        ``validate`` checks the merged partition; with ``new_validated`` (the caller already
        validated ``new``) it is skipped when no existing row survives the merge, which
        keeps a full-history backfill from validating thousands of one-day files one by one.
        ``rebuild(existing)`` (the file's table, with its metadata) may return the whole
        partition to write instead of a merge (a file of an outdated schema); ``None`` merges.
        Without it, a file whose columns differ from ``new``'s is read as ``new``'s columns
        (a missing column null, an extra one dropped) instead of failing the merge.
        """
        part = Part(path, day_ms, new, metadata, replaces, rebuild)
        return self.merge_many([part], sort_keys=sort_keys, validate=validate, new_validated=new_validated)[0]

    def merge_many(self, parts: Sequence[Part], *, sort_keys: list[tuple[str, str]],
                   validate: Callable[[pa.Table], None], new_validated: bool = False,
                   new_sorted: bool = False) -> list[MergeResult]:
        """:meth:`merge` of each part (distinct paths), as one group commit; one result per part.

        Parts are taken in chunks of GROUP_LOCK_DAYS: the chunk's locks (stripes in sorted order,
        see :meth:`lock_many`), then each part read and merged — a part whose file is absent is
        only sorted — then ``validate`` once over the merged partitions that need it
        (concatenated in the given order: pass parts in ``sort_keys`` order, e.g. by day), then each
        changed partition replaced (temp file fsynced, renamed) before the locks go. Every directory
        touched is fsynced once before this returns, also when it raises. A chunk that fails
        validation writes nothing; the chunks before it stay written. ``new_sorted``: every
        ``part.new`` is sorted by ``sort_keys`` already.
        """
        results = []
        with GroupCommit(threads=len(parts) > 1 and _is_local(self.root)) as commit:
            for at in range(0, len(parts), GROUP_LOCK_DAYS):
                chunk = parts[at:at + GROUP_LOCK_DAYS]
                with self.lock_many([part.path for part in chunk]):
                    merged = [self._merged(part, sort_keys, new_sorted) for part in chunk]
                    _validate_together([m.table for m in merged if m.kept_rows or not new_validated], validate)
                    for part, m in zip(chunk, merged):
                        if not m.unchanged:
                            commit.stage_table(part.path, m.table, part.metadata)
                    commit.publish()  # before the chunk's locks go
                    results.extend(m.result for m in merged)
        return results

    def _merged(self, part: Part, sort_keys: list[tuple[str, str]], new_sorted: bool) -> _Merged:
        """``part`` merged with its file (read under the caller's lock): the table to write, if any."""
        existing = self.read(part.path)
        new = part.new if new_sorted else part.new.sort_by(sort_keys)
        whole = None if existing is None or part.rebuild is None else part.rebuild(existing)
        if whole is not None:  # replaced whole, so checked whole
            merged = whole.replace_schema_metadata(None).sort_by(sort_keys)
            unchanged, revised, kept_rows = False, 0, merged.num_rows
        elif existing is None:
            merged, unchanged, revised, kept_rows = new, False, 0, 0
        else:
            existing = existing.replace_schema_metadata(None)
            if set(existing.column_names) != set(new.column_names):
                existing = _conform(existing, new.schema)
            superseded = np.asarray(part.replaces(existing), dtype=bool)
            kept_rows = int(existing.num_rows - np.count_nonzero(superseded))
            new = new.cast(existing.schema)
            if kept_rows == 0:  # every existing row is superseded (re-writing a day): no concat, no sort
                merged = new
                unchanged = existing.equals(new)  # files are written sorted: mostly decided here
                old = existing if unchanged else existing.sort_by(sort_keys)
                unchanged = unchanged or old.equals(new)
            else:
                kept = existing.filter(pa.array(~superseded))
                old = existing.filter(pa.array(superseded)).sort_by(sort_keys)
                merged = pa.concat_tables([kept, new]).sort_by(sort_keys)  # ``new`` alone is sorted already
                unchanged = old.equals(new)
            revised = 0 if unchanged else _count_revised(old, new, sort_keys)
        rows_before = 0 if existing is None else existing.num_rows
        result = MergeResult(str(part.path), part.day_ms, rows_before, merged.num_rows,
                             merged.num_rows - rows_before, revised)
        return _Merged(merged, unchanged, kept_rows, result)


@dataclass(frozen=True)
class Part:
    """One partition of a group write (:meth:`PartitionIO.merge_many`): see :meth:`PartitionIO.merge`."""

    path: object
    day_ms: int
    new: pa.Table
    metadata: Mapping[str, str]
    replaces: Callable[[pa.Table], np.ndarray]
    rebuild: Callable[[pa.Table], pa.Table | None] | None = None


@dataclass(frozen=True)
class _Merged:
    table: pa.Table
    unchanged: bool
    kept_rows: int
    result: MergeResult


def _validate_together(tables: list[pa.Table], validate: Callable[[pa.Table], None]) -> None:
    """``validate`` over ``tables`` concatenated (one call per schema: partitions of other columns apart).

    For the partitions of a group (distinct days, in order) this is the same check as one call per
    partition: order, uniqueness and the grid hold across them iff they hold in each."""
    groups: dict[pa.Schema, list[pa.Table]] = {}
    for table in tables:
        groups.setdefault(table.schema.remove_metadata(), []).append(table.replace_schema_metadata(None))
    for same in groups.values():
        validate(same[0] if len(same) == 1 else pa.concat_tables(same))


def _parse(data: bytes, columns: list[str] | None) -> pa.Table:
    """A Parquet file's bytes -> table. ``ParquetFile.read`` single-threaded: ~0.13 ms for a day file
    against ~0.6 ms through ``pq.read_table`` (its dataset machinery and thread pool cost more than
    decoding 96 rows). A requested column the file lacks raises as ``pq.read_table`` does."""
    parquet = pq.ParquetFile(pa.BufferReader(data))
    if columns is not None and not set(columns) <= set(parquet.schema_arrow.names):
        return pq.read_table(pa.BufferReader(data), columns=columns)
    return parquet.read(columns=columns, use_threads=False)


def serialize(table: pa.Table, metadata: Mapping[str, str]) -> pa.Buffer:
    """``table`` as the bytes of a Parquet day file, with ``metadata`` as key-value metadata.

    Options chosen by measurement (pyarrow 26, one 96-row day file, median of 1000; bench/writer.py
    prints the effect on whole writes):

    ====================================================  ==================  ==================
    variant                                               raw day (15.3 kB)   curated day (32 kB)
    ====================================================  ==================  ==================
    before: ``pq.write_table`` to a Python file handle    214 us              404 us
    to an Arrow ``BufferOutputStream``, one write         190 us              346 us
    ``pq.ParquetWriter`` instead of ``pq.write_table``    190 us              344 us (same)
    dictionary for every column (pyarrow's default)       210 us, +8 % size   406 us, +10 %
    statistics on the time (and symbol) columns only      159 us, 13.9 kB     286 us, 28.9 kB
    no statistics at all                                  160 us              287 us
    ``store_schema=False``                                176 us              320 us
    data page 1 MB / page format 2.0                      189 / 239 us        379 / 345 us
    ====================================================  ==================  ==================

    Kept: snappy (the contract), Arrow's schema stored (readers get the dictionary, decimal and
    UTC-timestamp types back exactly), dictionary encoding for text only (times, prices and
    volumes hardly repeat), one row group. Statistics only where a reader prunes with them:
    ``open_time``/``close_time`` (DuckDB and pyarrow filter on time) and ``symbol``/``interval``;
    min/max of 8 decimal128 columns cost 16 % of the write and no query filters on them.
    Serialized into memory, then written with one call.
    """
    schema_meta = {**(table.schema.metadata or {}), **{k.encode(): str(v).encode() for k, v in metadata.items()}}
    table = table.replace_schema_metadata(schema_meta)
    names = table.schema.names
    text_columns = [field.name for field in table.schema if pa.types.is_string(field.type)]
    stats = [name for name in _STATISTICS_COLUMNS if name in names]
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, compression="snappy", use_dictionary=text_columns,
                   write_statistics=stats or True)  # another table (a report, signals): pyarrow's default
    return sink.getvalue()


_STATISTICS_COLUMNS = ("open_time", "close_time", "symbol", "interval")


def _conform(table: pa.Table, schema: pa.Schema) -> pa.Table:
    """``table`` with exactly ``schema``'s columns: its own cast, nulls for those it lacks."""
    columns = [table.column(field.name).cast(field.type) if field.name in table.column_names
               else pa.nulls(table.num_rows, field.type) for field in schema]
    return pa.Table.from_arrays(columns, schema=schema)


def _count_revised(old: pa.Table, new: pa.Table, keys: list[tuple[str, str]]) -> int:
    """Rows of ``old`` whose replacement in ``new`` differs (a revised candle)."""
    if old.num_rows == 0:
        return 0
    key_names = [name for name, _ in keys]
    joined = old.join(new, keys=key_names, right_suffix="__new", join_type="inner")
    revised = 0
    for name in old.column_names:
        if name in key_names or f"{name}__new" not in joined.column_names:
            continue
        left, right = joined.column(name), joined.column(f"{name}__new").cast(joined.column(name).type)
        revised = max(revised, int(pc.sum(pc.not_equal(left, right)).as_py() or 0))
    return revised


class OpenCandleRefused(ValueError):
    """Rows whose candle has not closed yet: raw storage never holds them, whatever the source."""


class RawStore:
    """``RAW_DATA_DIR/<interval>/<SYMBOL>_<interval>_<YYYYMMDD>.parquet``."""

    def __init__(self, root: str):
        self.location = root
        self.io = PartitionIO(root, on_quarantine=self._record_quarantined)
        self.root = self.io.root

    def _state(self, symbol: str, interval: str):
        from include.market_data.gaps import SeriesState  # gaps builds on storage

        return SeriesState(self.location, symbol, interval)

    def _record_quarantined(self, path) -> None:
        """A quarantined day stays on the series' record until it is whole again (see gap_check)."""
        match = _PARTITION_RE.match(path.name)
        if match:
            self._state(match["symbol"], match["interval"]).add_quarantined_day(day_from_key(match["day"]))

    def path(self, interval: str, symbol: str, day_ms: int):
        return self.root / interval / f"{symbol}_{interval}_{day_key(day_ms)}.parquet"

    def days(self, interval: str, symbol: str) -> list[int]:
        """Start (ms) of each UTC day that has a partition, ascending."""
        directory = self.root / interval
        if not directory.exists():
            return []
        prefix = f"{symbol}_{interval}_"
        start, size = len(prefix), len(prefix) + len("YYYYMMDD.parquet")
        keys = [name[start:start + 8] for name in _names(directory)
                if len(name) == size and name.startswith(prefix) and name.endswith(".parquet")
                and name[start:start + 8].isdigit()]
        return sorted(day_from_key(key) for key in keys)

    def quarantined_days(self, interval: str, symbol: str) -> list[int]:
        """Days whose partition was quarantined and that are not whole again yet: the series'
        record, which a partial rewrite of the day does not clear (the whole day is refetched)."""
        recorded = self._state(symbol, interval).quarantined_days()
        return sorted(set(recorded) | set(self._quarantined_before_the_record(interval, symbol)))

    def _quarantined_before_the_record(self, interval: str, symbol: str) -> list[int]:
        """Days quarantined by a version that kept no record: a file in ``_quarantine/`` and no partition."""
        directory = self.root / QUARANTINE_DIR
        if not directory.exists():
            return []
        prefix = f"{symbol}_{interval}_"
        keys = {name[len(prefix):len(prefix) + 8] for name in _names(directory) if name.startswith(prefix)}
        days = sorted(day_from_key(key) for key in keys if key.isdigit())
        present = set(self.existing_days(interval, symbol, days))
        return [day for day in days if day not in present]

    def settle_quarantined(self, interval: str, symbol: str, complete: Callable[[int], bool]) -> list[int]:
        """Take off the record the quarantined days for which ``complete(day)`` holds (judged under the
        record's lock, so a day quarantined again meanwhile stays on it); returns them."""
        return self._state(symbol, interval).settle_quarantined_days(complete)

    def existing_days(self, interval: str, symbol: str, days) -> list[int]:
        """Those of ``days`` (UTC day starts, in the given order) that have a partition: one stat
        each and no listing, so a run touching a few days costs the same with 10 or 3000 files.
        On an object store (a request per check) one listing is cheaper."""
        if _is_local(self.root):
            return [day for day in days if os.path.exists(self.path(interval, symbol, day))]
        present = set(self.days(interval, symbol))
        return [day for day in days if day in present]

    def read_day(self, interval: str, symbol: str, day_ms: int, columns: list[str] | None = None) -> pa.Table | None:
        """One day's rows in RAW_SCHEMA (or ``columns``), whatever the file's schema version."""
        table = self.io.read(self.path(interval, symbol, day_ms), columns=columns)
        if table is None or columns is not None:
            return table
        return table.select(list(RAW_COLUMNS))

    def read(self, interval: str, symbol: str, start_ms: int, end_ms: int,
             columns: list[str] | None = None) -> pa.Table:
        """Rows with ``open_time`` in ``[start_ms, end_ms)``, sorted, across partitions."""
        parts = []
        for day in range(day_start_ms(start_ms), end_ms, DAY_MS):
            table = self.read_day(interval, symbol, day, columns=columns)
            if table is not None:
                parts.append(table.replace_schema_metadata(None))
        schema = RAW_SCHEMA if columns is None else pa.schema([RAW_SCHEMA.field(c) for c in columns])
        if not parts:
            return schema.empty_table()
        table = pa.concat_tables(parts)
        times = pc.cast(table.column("open_time"), pa.int64())
        mask = pc.and_(pc.greater_equal(times, start_ms), pc.less(times, end_ms))
        return table.filter(mask)

    def read_days(self, interval: str, symbol: str, days: list[int]) -> pa.Table:
        """Every row of the given day partitions, concatenated in day order (absent days skipped;
        an unreadable one quarantined and skipped).

        File by file, single-threaded (see :func:`_parse`): 3287 15m day files in 0.6-0.8 s, against
        0.9-1.2 s for one multi-threaded ``pyarrow.dataset`` scan on two cores."""
        parts, columns = [], list(RAW_COLUMNS)
        for day in sorted(days):
            table = self.io.read(self.path(interval, symbol, day), columns=columns)
            if table is not None:
                table = table.select(columns).replace_schema_metadata(None)
                parts.append(table if table.schema == RAW_SCHEMA else table.cast(RAW_SCHEMA))
        return pa.concat_tables(parts) if parts else RAW_SCHEMA.empty_table()

    def open_times(self, interval: str, symbol: str, start_ms: int, end_ms: int) -> np.ndarray:
        table = self.read(interval, symbol, start_ms, end_ms, columns=["open_time"])
        return pc.cast(table.column("open_time"), pa.int64()).to_numpy()

    def metadata(self, interval: str, symbol: str, day_ms: int) -> dict[str, str]:
        return self.io.read_metadata(self.path(interval, symbol, day_ms))

    def write(self, interval: str, symbol: str, table: pa.Table, provenance: Mapping[str, str], *,
              validated: bool = False, now: int | None = None,
              day_provenance: Mapping[int, Mapping[str, str]] | None = None) -> list[MergeResult]:
        """Merge ``table`` (RAW_SCHEMA rows, any number of days) into its day partitions, as one
        group commit (see :class:`GroupCommit`); returns one result per day, in day order.

        ``provenance`` is every day's metadata; ``day_provenance[day_ms]`` (UTC day start) overrides
        and extends it for that day (e.g. the archive file's URL as ``source`` and its ``sha256``);
        a day without rows in ``table`` is ignored. ``symbol``, ``interval`` and ``schema_version``
        are the store's. ``validated``: the caller already ran :func:`validate_raw` on these rows
        (sorted); then a new day is written without being checked again, and only days that keep
        rows of their file are validated (all of a chunk of days in one call).
        Raises :class:`OpenCandleRefused`, writing nothing, if a row's ``close_time`` is not past ``now``.
        """
        if table.num_rows == 0:
            return []
        table = table.replace_schema_metadata(None)
        refuse_open_candles(table, interval, symbol, now_ms() if now is None else now)
        times = pc.cast(table.column("open_time"), pa.int64()).to_numpy()
        if len(times) > 1 and not (np.diff(times) >= 0).all():
            table = table.sort_by("open_time")
            times = pc.cast(table.column("open_time"), pa.int64()).to_numpy()
        if not validated:
            validate_raw(table, interval)
        rows_all = with_series_columns(table, symbol, interval)
        store_keys = {"symbol": symbol, "interval": interval, "schema_version": SCHEMA_VERSION}
        base = {**provenance, **store_keys}
        per_day = day_provenance or {}
        parts = []
        for day, lo, hi in _day_slices(times):
            rows, new_times = rows_all.slice(lo, hi - lo), times[lo:hi]
            metadata = {**provenance, **per_day[day], **store_keys} if day in per_day else base

            def upgrade(existing: pa.Table, new=rows, times=new_times) -> pa.Table | None:
                """A version-1 file (no symbol/interval columns) is rewritten whole as version 2."""
                if "symbol" in existing.column_names:
                    return None
                old = with_series_columns(existing.replace_schema_metadata(None), symbol, interval)
                kept = ~np.isin(pc.cast(old.column("open_time"), pa.int64()).to_numpy(), times)
                return pa.concat_tables([old.filter(pa.array(kept)), new])

            parts.append(Part(
                self.path(interval, symbol, day), day, rows, metadata,
                replaces=lambda existing, t=new_times: np.isin(
                    pc.cast(existing.column("open_time"), pa.int64()).to_numpy(), t),
                rebuild=upgrade,
            ))
        return self.io.merge_many(
            parts,
            sort_keys=[("open_time", "ascending")],
            validate=lambda merged: validate_raw(merged.select(list(RAW_COLUMNS)), interval),
            new_validated=True,
            new_sorted=True,
        )


def _day_slices(times: np.ndarray) -> list[tuple[int, int, int]]:
    """(UTC day start, first row, end row) of each day in sorted epoch-ms ``times``."""
    days = times // DAY_MS * DAY_MS
    cuts = np.flatnonzero(days[1:] != days[:-1]) + 1
    starts = np.concatenate([[0], cuts])
    ends = np.concatenate([cuts, [len(times)]])
    return [(int(days[lo]), int(lo), int(hi)) for lo, hi in zip(starts, ends)]


def refuse_open_candles(table: pa.Table, interval: str, symbol: str, now: int) -> None:
    """Raise :class:`OpenCandleRefused` if any row's candle is still open at ``now`` (epoch ms)."""
    newest = pc.max(pc.cast(table.column("close_time"), pa.int64())).as_py()
    if newest is not None and newest >= now:
        closes = pc.cast(table.column("close_time"), pa.int64()).to_numpy()
        first = int(np.flatnonzero(closes >= now)[0])
        opens = pc.cast(table.column("open_time"), pa.int64())[first].as_py()

        def iso(ms: int) -> str:
            return datetime.fromtimestamp(ms / 1000, tz=timezone.utc).isoformat()

        raise OpenCandleRefused(f"{symbol} {interval}: refusing to store the candle opening {iso(opens)}: "
                                f"it is still open (closes {iso(int(closes[first]) + 1)}, now {iso(now)})")


class CuratedStore:
    """``CURATED_DATA_DIR/<interval>_curated_<YYYYMMDD>.parquet``: every symbol of a day in one file."""

    def __init__(self, root: str):
        self.io = PartitionIO(root)
        self.root = self.io.root

    def path(self, interval: str, day_ms: int):
        return self.root / f"{interval}_curated_{day_key(day_ms)}.parquet"

    def quarantined_days(self, interval: str) -> list[int]:
        """Days whose curated file was quarantined (unreadable) and has not been written again."""
        directory = self.root / QUARANTINE_DIR
        if not directory.exists():
            return []
        prefix = f"{interval}_curated_"
        keys = {name[len(prefix):len(prefix) + 8] for name in _names(directory) if name.startswith(prefix)}
        return sorted(day for day in (day_from_key(k) for k in keys if k.isdigit())
                      if not self.path(interval, day).exists())

    @staticmethod
    def day_of_path(path: str) -> int | None:
        """The UTC day of a curated file's path (``None`` for another file)."""
        match = _CURATED_RE.match(str(path).rsplit("/", 1)[-1])
        return day_from_key(match["day"]) if match else None

    def days(self, interval: str) -> list[int]:
        if not self.root.exists():
            return []
        found = []
        for entry in self.root.iterdir():
            match = _CURATED_RE.match(entry.name)
            if match and match["interval"] == interval:
                found.append(day_from_key(match["day"]))
        return sorted(found)

    def read(self, interval: str, start_ms: int, end_ms: int, symbol: str | None = None) -> pa.Table | None:
        """Curated rows with ``open_time`` in ``[start_ms, end_ms)`` (one symbol or all); ``None`` if no file."""
        parts = []
        for day in range(day_start_ms(start_ms), end_ms, DAY_MS):
            table = self.io.read(self.path(interval, day))
            if table is not None:
                parts.append(table.replace_schema_metadata(None))
        if not parts:
            return None
        table = pa.concat_tables(parts, promote_options="permissive")
        times = pc.cast(table.column("open_time"), pa.int64())
        mask = pc.and_(pc.greater_equal(times, start_ms), pc.less(times, end_ms))
        if symbol is not None:
            mask = pc.and_(mask, pc.equal(table.column("symbol"), symbol))
        return table.filter(mask)

    def write_day(self, interval: str, symbol: str, day_ms: int, rows: pa.Table,
                  metadata: dict[str, str], validate: Callable[[pa.Table], None],
                  new_validated: bool = False, rebuild: Callable[[], pa.Table] | None = None) -> MergeResult:
        """Replace ``symbol``'s rows of one day, keeping the other symbols' rows (see :meth:`write_days`)."""
        return self.write_days(interval, symbol, {day_ms: rows}, metadata, validate, new_validated=new_validated,
                               rebuild=None if rebuild is None else (lambda day: rebuild()))[0]

    def write_days(self, interval: str, symbol: str, days: Mapping[int, pa.Table], metadata: Mapping[str, str],
                   validate: Callable[[pa.Table], None], *, new_validated: bool = False,
                   rebuild: Callable[[int], pa.Table] | None = None) -> list[MergeResult]:
        """Replace ``symbol``'s rows of each day of ``days`` (UTC day start -> that day's rows, sorted by
        ``open_time``), keeping the other symbols' rows, as one group commit (see :class:`GroupCommit`);
        one result per day, in day order.

        ``metadata["schema_version"]`` is the curated schema version of the rows. A day file of an
        older version, or whose columns differ from the rows', is not merged but replaced whole by
        ``rebuild(day_ms)`` (every symbol's rows of that day), under the same lock. ``validate`` checks
        the merged day files that keep other symbols' rows (several days in one call); with
        ``new_validated`` a day whose file held only this symbol's rows, or no file, is not checked
        again.
        """
        version = str(metadata.get("schema_version", ""))
        file_metadata = {**metadata, "interval": interval}

        def is_symbol(existing: pa.Table) -> np.ndarray:
            return pc.equal(existing.column("symbol"), symbol).to_numpy(zero_copy_only=False)

        parts = []
        for day_ms in sorted(days):
            rows = days[day_ms]

            def outdated(existing: pa.Table, day_ms=day_ms, rows=rows) -> pa.Table | None:
                found = (existing.schema.metadata or {}).get(b"schema_version", b"").decode()
                if _older_version(found, version) or set(existing.column_names) != set(rows.column_names):
                    log.warning("curated day file outdated: rebuilt whole", interval=interval, symbol=symbol,
                                path=str(self.path(interval, day_ms)), schema_version=found, current=version,
                                status="rebuilt")
                    return rebuild(day_ms)
                return None

            parts.append(Part(self.path(interval, day_ms), day_ms, rows, file_metadata, replaces=is_symbol,
                              rebuild=None if rebuild is None else outdated))
        # one symbol's rows sorted by open_time are sorted by (symbol, open_time)
        return self.io.merge_many(parts, sort_keys=[("symbol", "ascending"), ("open_time", "ascending")],
                                  validate=validate, new_validated=new_validated,
                                  new_sorted=all(_sorted_times(rows) for rows in days.values()))


def _sorted_times(rows: pa.Table) -> bool:
    times = pc.cast(rows.column("open_time"), pa.int64()).to_numpy()
    symbols = rows.column("symbol")
    one_symbol = rows.num_rows == 0 or pc.count_distinct(symbols).as_py() == 1
    return one_symbol and bool((np.diff(times) > 0).all())


def _older_version(found: str, current: str) -> bool:
    """Whether schema version ``found`` (of a file) is older than ``current``; unknown counts as older."""
    try:
        return int(found) < int(current)
    except ValueError:
        return found != current


_QUARANTINE_STAMP_RE = re.compile(r"\.(?P<stamp>\d{8}T\d{12})Z$")


def prune_quarantine(root, retention_days: int, now=None) -> list[str]:
    """Delete the files of ``root/_quarantine/`` quarantined more than ``retention_days`` ago.

    Age is read from the UTC stamp :meth:`PartitionIO.quarantine` appends to the name
    (``<file>.<YYYYMMDDTHHMMSSffffff>Z``), never from mtimes (copies and object stores change
    those); a file without a stamp is left alone. ``root`` is a location (local path or URL) or
    a resolved root; ``now`` (default: the clock) a time as :func:`timeframes.to_utc` reads it.
    Returns the paths removed, each also logged.
    """
    from include.market_data.timeframes import to_utc

    root = resolve_root(root) if isinstance(root, str) else root
    directory = root / QUARANTINE_DIR
    if retention_days < 0:
        raise ValueError(f"retention_days={retention_days!r} must be >= 0")
    if not directory.exists():
        return []
    cutoff = (datetime.now(timezone.utc) if now is None else to_utc(now)) - timedelta(days=retention_days)
    removed = []
    for name in sorted(_names(directory)):
        match = _QUARANTINE_STAMP_RE.search(name)
        if not match:
            continue
        stamped = datetime.strptime(match["stamp"], "%Y%m%dT%H%M%S%f").replace(tzinfo=timezone.utc)
        if stamped < cutoff:
            path = directory / name
            try:
                path.unlink()
            except FileNotFoundError:  # another task pruned it first
                continue
            removed.append(str(path))
            log.info("quarantined file removed", path=str(path), quarantined_at=stamped.isoformat(),
                     retention_days=retention_days, status="pruned")
    return removed
