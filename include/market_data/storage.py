"""Parquet partitions: raw klines and curated features, one file per UTC day.

Writes are atomic (temp file + ``os.replace`` locally, a single object PUT on object
stores) and merge with what the partition holds, under a per-partition file lock, so
re-running a window is idempotent and two runs writing the same day never lose each
other's rows. A partition that cannot be read is moved to ``_quarantine/`` and treated
as absent, so its candles are fetched again rather than crash-looping.
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
from dataclasses import dataclass
from datetime import date, datetime, timedelta, timezone
from pathlib import Path
from typing import BinaryIO, Callable, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pds
import pyarrow.parquet as pq

from include.market_data import observability
from include.market_data.schema import RAW_COLUMNS, RAW_SCHEMA, SCHEMA_VERSION, validate_raw, with_series_columns
from include.market_data.timeframes import DAY_MS, day_key, day_start_ms, now_ms

log = observability.get_logger(__name__)

QUARANTINE_DIR = "_quarantine"
LOCK_DIR = "_locks"
_PARTITION_RE = re.compile(r"^(?P<symbol>[A-Z0-9]{5,20})_(?P<interval>[0-9]+[smhdwM])_(?P<day>\d{8})\.parquet$")
_CURATED_RE = re.compile(r"^(?P<interval>[0-9]+[smhdwM])_curated_(?P<day>\d{8})\.parquet$")


def resolve_root(location: str):
    """A local ``Path`` for plain paths, an Airflow ``ObjectStoragePath`` for URLs (``s3://...``)."""
    if "://" in location and not location.startswith("file://"):
        from airflow.sdk import ObjectStoragePath  # deferred: heavy, and only needed for object stores

        return ObjectStoragePath(location)
    return Path(location.removeprefix("file://")).absolute()


def _is_local(path) -> bool:
    return isinstance(path, Path)


def atomic_write(path, write: Callable[[BinaryIO], object]) -> None:
    """Replace ``path`` with what ``write(handle)`` writes, in one step: readers see the old
    file or the new one, never a part (temp file + ``os.replace`` locally, one PUT on S3/GCS)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if not _is_local(path):
        # Whole file in memory first: fsspec uploads on close even when the writer raised, so
        # writing through path.open would replace the object with a part.
        buffer = io.BytesIO()
        write(buffer)
        path.write_bytes(buffer.getvalue())
        return
    temp = path.parent / f".{path.name}.{uuid.uuid4().hex}.tmp"
    try:
        with open(temp, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temp, path)
    finally:
        if temp.exists():
            temp.unlink()


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

    @contextlib.contextmanager
    def lock(self, path, *, tier: str = "stripe") -> Iterator[None]:
        """Exclusive lock on ``path`` (on its stripe, see LOCK_TIERS): across processes on local
        disks (flock), across the threads of this process everywhere (object stores included;
        between processes they rely on the DAGs running one writer at a time, see the README)."""
        name = self.lock_name(path, tier)
        local = _is_local(self.root)
        key = str(self.root / LOCK_DIR / name) if local else f"{self.root}#{name}"
        held = _held()
        if key in held:  # this thread holds the stripe already (maybe for another path): nest freely
            yield
            return
        rank = LOCK_TIERS.index(tier)
        wait_s = NESTED_LOCK_WAIT_S if any(r >= rank for r in held.values()) else None
        what = f"lock {name} (for {path})"
        with _file_lock(self.root / LOCK_DIR / name, wait_s, what) if local else _thread_lock(key, wait_s, what):
            held[key] = rank
            try:
                yield
            finally:
                del held[key]

    def read(self, path, columns: list[str] | None = None) -> pa.Table | None:
        """The table in ``path``; ``None`` when absent or not Parquet (then quarantined).

        Only a file that does not parse is quarantined; an I/O error (a permission, a flaky
        object store) raises, so a healthy partition is never moved aside by a transient fault.
        """
        if not path.exists():
            return None
        with path.open("rb") as handle:
            data = handle.read()  # an I/O error raises here
        try:
            return pq.read_table(pa.BufferReader(data), columns=columns)
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
        schema_meta = {**(table.schema.metadata or {}), **{k.encode(): str(v).encode() for k, v in metadata.items()}}
        table = table.replace_schema_metadata(schema_meta)
        # Dictionary encoding only for text (symbol): prices, volumes and times hardly repeat, and
        # skipping it makes each day file ~10 % smaller and ~35 % faster to write.
        text_columns = [field.name for field in table.schema if pa.types.is_string(field.type)]
        atomic_write(path, lambda handle: pq.write_table(table, handle, compression="snappy",
                                                         use_dictionary=text_columns))

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
        with self.lock(path):
            existing = self.read(path)
            new = new.sort_by(sort_keys)
            whole = None if existing is None or rebuild is None else rebuild(existing)
            if whole is not None:  # replaced whole, so checked whole
                merged = whole.replace_schema_metadata(None).sort_by(sort_keys)
                unchanged, revised, kept_rows = False, 0, merged.num_rows
            elif existing is None:
                merged, unchanged, revised, kept_rows = new, False, 0, 0
            else:
                existing = existing.replace_schema_metadata(None)
                if set(existing.column_names) != set(new.column_names):
                    existing = _conform(existing, new.schema)
                superseded = replaces(existing)
                kept = existing.filter(pa.array(~superseded))
                kept_rows = kept.num_rows
                old = existing.filter(pa.array(superseded)).sort_by(sort_keys)
                new = new.cast(existing.schema)
                merged = pa.concat_tables([kept, new])
                unchanged = old.equals(new)
                revised = 0 if unchanged else _count_revised(old, new, sort_keys)
                merged = merged.sort_by(sort_keys)  # ``new`` alone is sorted already
            if kept_rows or not new_validated:
                validate(merged)
            rows_before = 0 if existing is None else existing.num_rows
            result = MergeResult(str(path), day_ms, rows_before, merged.num_rows,
                                 merged.num_rows - rows_before, revised)
            if not unchanged:
                self.write_atomic(path, merged, metadata)
            return result


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


def _split_by_day(table: pa.Table) -> dict[int, pa.Table]:
    times = pc.cast(table.column("open_time"), pa.int64()).to_numpy()
    days = times // DAY_MS * DAY_MS
    return {int(day): table.filter(pa.array(days == day)) for day in np.unique(days)}


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
        """Every row of the given day partitions, concatenated in day order (absent days skipped)."""
        paths = [p for p in (self.path(interval, symbol, d) for d in sorted(days)) if p.exists()]
        if _is_local(self.root) and len(paths) > 1:
            try:  # one multi-threaded scan; an unreadable file falls back to per-file reads, which quarantine
                return pds.dataset([str(p) for p in paths], format="parquet", schema=RAW_SCHEMA).to_table()
            except (pa.ArrowException, OSError, ValueError):
                pass
        parts = []
        for day in days:
            table = self.read_day(interval, symbol, day)
            if table is not None:
                parts.append(table.replace_schema_metadata(None))
        return pa.concat_tables(parts) if parts else RAW_SCHEMA.empty_table()

    def open_times(self, interval: str, symbol: str, start_ms: int, end_ms: int) -> np.ndarray:
        table = self.read(interval, symbol, start_ms, end_ms, columns=["open_time"])
        return pc.cast(table.column("open_time"), pa.int64()).to_numpy()

    def metadata(self, interval: str, symbol: str, day_ms: int) -> dict[str, str]:
        return self.io.read_metadata(self.path(interval, symbol, day_ms))

    def write(self, interval: str, symbol: str, table: pa.Table, provenance: dict[str, str], *,
              validated: bool = False, now: int | None = None) -> list[MergeResult]:
        """Merge ``table`` (RAW_SCHEMA rows) into its day partitions; returns one result per day.

        ``validated``: the caller already ran :func:`validate_raw` on these rows (sorted).
        Raises :class:`OpenCandleRefused`, writing nothing, if a row's ``close_time`` is not past ``now``.
        """
        if table.num_rows == 0:
            return []
        table = table.replace_schema_metadata(None)
        refuse_open_candles(table, interval, symbol, now_ms() if now is None else now)
        if not validated:
            validate_raw(table.sort_by("open_time"), interval)
        metadata = {**provenance, "symbol": symbol, "interval": interval, "schema_version": SCHEMA_VERSION}
        results = []
        for day, rows in sorted(_split_by_day(table).items()):
            new_times = pc.cast(rows.column("open_time"), pa.int64()).to_numpy()
            rows = with_series_columns(rows, symbol, interval)

            def upgrade(existing: pa.Table, new=rows, times=new_times) -> pa.Table | None:
                """A version-1 file (no symbol/interval columns) is rewritten whole as version 2."""
                if "symbol" in existing.column_names:
                    return None
                old = with_series_columns(existing.replace_schema_metadata(None), symbol, interval)
                kept = ~np.isin(pc.cast(old.column("open_time"), pa.int64()).to_numpy(), times)
                return pa.concat_tables([old.filter(pa.array(kept)), new])

            results.append(
                self.io.merge(
                    self.path(interval, symbol, day),
                    day,
                    rows,
                    metadata,
                    replaces=lambda existing, t=new_times: np.isin(
                        pc.cast(existing.column("open_time"), pa.int64()).to_numpy(), t),
                    sort_keys=[("open_time", "ascending")],
                    validate=lambda merged: validate_raw(merged.select(list(RAW_COLUMNS)), interval),
                    new_validated=True,
                    rebuild=upgrade,
                )
            )
        return results


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
        """Replace ``symbol``'s rows of one day, keeping the other symbols' rows.

        ``metadata["schema_version"]`` is the curated schema version of ``rows``. A day file of an
        older version, or whose columns differ from ``rows``', is not merged but replaced whole by
        ``rebuild()`` (every symbol's rows of the day), under the same lock.
        """
        version = str(metadata.get("schema_version", ""))

        def outdated(existing: pa.Table) -> pa.Table | None:
            found = (existing.schema.metadata or {}).get(b"schema_version", b"").decode()
            if _older_version(found, version) or set(existing.column_names) != set(rows.column_names):
                log.warning("curated day file outdated: rebuilt whole", interval=interval, symbol=symbol,
                            path=str(self.path(interval, day_ms)), schema_version=found, current=version,
                            status="rebuilt")
                return rebuild()
            return None

        return self.io.merge(
            self.path(interval, day_ms),
            day_ms,
            rows,
            {**metadata, "interval": interval},
            replaces=lambda existing: pc.equal(existing.column("symbol"), symbol).to_numpy(zero_copy_only=False),
            sort_keys=[("symbol", "ascending"), ("open_time", "ascending")],
            validate=validate,
            new_validated=new_validated,
            rebuild=None if rebuild is None else outdated,
        )


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
