import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from multiprocessing import get_context
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from include.market_data.schema import SchemaViolation, decimal_places, rows_to_table, table_to_rows
from include.market_data.storage import RawStore
from include.market_data.timeframes import DAY_MS
from tests.market_data.klines import make_rows

DAY = 19_700 * DAY_MS  # 2023-12-09
PROVENANCE = {"source": "http://127.0.0.1:1", "endpoint": "/api/v3/klines", "fetched_at": "2024-01-01T00:00:00+00:00",
              "latency_ms": "12.5", "decimal_places": "8"}


def test_decimal_strings_round_trip_exactly(tmp_path):
    rows = make_rows("15m", DAY, 96, price="0.00001234")
    store = RawStore(str(tmp_path))
    store.write("15m", "BTCUSDT", rows_to_table(rows), PROVENANCE)
    back = store.read("15m", "BTCUSDT", DAY, DAY + DAY_MS)
    assert table_to_rows(back, decimal_places(rows)) == rows


def test_partition_layout_and_metadata(tmp_path):
    rows = make_rows("1h", DAY - 2 * 3_600_000, 5)  # crosses midnight: two partitions
    results = RawStore(str(tmp_path)).write("1h", "BTCUSDT", rows_to_table(rows), PROVENANCE)
    names = sorted(p.name for p in (tmp_path / "1h").iterdir())
    assert names == ["BTCUSDT_1h_20231208.parquet", "BTCUSDT_1h_20231209.parquet"]
    assert [r.rows_after for r in results] == [2, 3]
    meta = pq.read_schema(tmp_path / "1h" / names[1]).metadata
    for key in ("source", "endpoint", "symbol", "interval", "fetched_at", "latency_ms", "schema_version"):
        assert key.encode() in meta
    assert pq.ParquetFile(tmp_path / "1h" / names[1]).metadata.row_group(0).column(0).compression == "SNAPPY"


def test_rewrite_is_idempotent_and_leaves_the_file_untouched(tmp_path):
    store = RawStore(str(tmp_path))
    table = rows_to_table(make_rows("15m", DAY, 96))
    store.write("15m", "BTCUSDT", table, PROVENANCE)
    path = store.path("15m", "BTCUSDT", DAY)
    before = (path.read_bytes(), path.stat().st_mtime_ns)
    result = store.write("15m", "BTCUSDT", table, {**PROVENANCE, "fetched_at": "2025-01-01T00:00:00+00:00"})
    assert result[0].added == 0 and result[0].revised == 0
    assert (path.read_bytes(), path.stat().st_mtime_ns) == before


def test_merge_keeps_rows_of_both_writes_and_counts_revisions(tmp_path):
    store = RawStore(str(tmp_path))
    rows = make_rows("15m", DAY, 96)
    store.write("15m", "BTCUSDT", rows_to_table(rows[:50]), PROVENANCE)
    store.write("15m", "BTCUSDT", rows_to_table(rows[40:]), PROVENANCE)
    assert table_to_rows(store.read("15m", "BTCUSDT", DAY, DAY + DAY_MS), 8) == rows
    revised = [list(r) for r in rows[10:11]]
    revised[0][5] = "999.00000000"
    result = store.write("15m", "BTCUSDT", rows_to_table(revised), PROVENANCE)
    assert result[0].revised == 1 and result[0].added == 0


@pytest.mark.parametrize("breakage", ["off_grid", "high_below_low", "duplicate"])
def test_rows_breaking_the_contract_write_nothing(tmp_path, breakage):
    rows = make_rows("15m", DAY, 4)
    if breakage == "off_grid":
        rows[2][0] += 1
        rows[2][6] += 1
    elif breakage == "high_below_low":
        rows[1][2] = "1.00000000"
    else:
        rows.append(list(rows[0]))
    with pytest.raises(SchemaViolation):
        RawStore(str(tmp_path)).write("15m", "BTCUSDT", rows_to_table(rows), PROVENANCE)
    assert not (tmp_path / "15m").exists() or not list((tmp_path / "15m").glob("*.parquet"))


def test_corrupt_partition_is_quarantined_and_read_as_absent(tmp_path):
    store = RawStore(str(tmp_path))
    store.write("15m", "BTCUSDT", rows_to_table(make_rows("15m", DAY, 96)), PROVENANCE)
    path = store.path("15m", "BTCUSDT", DAY)
    path.write_bytes(b"PAR1 this is not parquet")
    assert store.read("15m", "BTCUSDT", DAY, DAY + DAY_MS).num_rows == 0
    assert not path.exists()
    assert len(list((tmp_path / "_quarantine").iterdir())) == 1
    assert store.io.quarantined == [str(path)]
    # the day can be written again afterwards
    store.write("15m", "BTCUSDT", rows_to_table(make_rows("15m", DAY, 96)), PROVENANCE)
    assert store.read("15m", "BTCUSDT", DAY, DAY + DAY_MS).num_rows == 96


@pytest.mark.parametrize("damage", ["data pages", "footer"])
def test_a_partition_damaged_inside_is_quarantined_too(tmp_path, damage):
    """Flipped bytes in a data page or the footer raise OSError in pyarrow, not ArrowInvalid."""
    store = RawStore(str(tmp_path))
    store.write("15m", "BTCUSDT", rows_to_table(make_rows("15m", DAY, 96)), PROVENANCE)
    path = store.path("15m", "BTCUSDT", DAY)
    data = bytearray(path.read_bytes())
    at = 200 if damage == "data pages" else len(data) - 300
    data[at:at + 40] = bytes(b ^ 0xFF for b in data[at:at + 40])
    path.write_bytes(bytes(data))
    assert store.read("15m", "BTCUSDT", DAY, DAY + DAY_MS).num_rows == 0
    assert not path.exists() and store.io.quarantined == [str(path)]


def test_an_io_error_is_raised_not_quarantined(tmp_path, monkeypatch):
    store = RawStore(str(tmp_path))
    store.write("15m", "BTCUSDT", rows_to_table(make_rows("15m", DAY, 96)), PROVENANCE)
    path = store.path("15m", "BTCUSDT", DAY)
    real_open = Path.open

    def flaky_open(self, *args, **kwargs):
        if self == path:
            raise PermissionError(13, "Permission denied", str(path))
        return real_open(self, *args, **kwargs)

    monkeypatch.setattr(Path, "open", flaky_open)
    with pytest.raises(PermissionError):
        store.read("15m", "BTCUSDT", DAY, DAY + DAY_MS)
    monkeypatch.undo()
    assert path.exists() and store.read("15m", "BTCUSDT", DAY, DAY + DAY_MS).num_rows == 96


def _write_half(root: str, which: int, rounds: int) -> None:
    rows = make_rows("15m", DAY, 96)
    mine = [r for i, r in enumerate(rows) if i % 2 == which]
    store = RawStore(root)
    for k in range(rounds):
        store.write("15m", "BTCUSDT", rows_to_table(mine[k::rounds]), PROVENANCE)


def test_two_processes_writing_the_same_day_lose_nothing(tmp_path):
    ctx = get_context("spawn")
    workers = [ctx.Process(target=_write_half, args=(str(tmp_path), which, 12)) for which in (0, 1)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(120)
        assert worker.exitcode == 0
    stored = RawStore(str(tmp_path)).read("15m", "BTCUSDT", DAY, DAY + DAY_MS)
    assert table_to_rows(stored, 8) == make_rows("15m", DAY, 96)


def test_kill_9_mid_write_leaves_the_previous_partition_readable(tmp_path):
    root = Path(__file__).resolve().parents[2]
    store = RawStore(str(tmp_path))
    store.write("15m", "BTCUSDT", rows_to_table(make_rows("15m", DAY, 48)), PROVENANCE)
    script = textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(root)!r})
        from include.market_data.schema import rows_to_table
        from include.market_data.storage import RawStore
        from tests.market_data.klines import make_rows
        store = RawStore({str(tmp_path)!r})
        print("ready", flush=True)
        k = 0
        while True:  # rewrite the day with a changing row so every round really writes
            rows = make_rows("15m", {DAY}, 96, price=str(30000 + k % 50))
            store.write("15m", "BTCUSDT", rows_to_table(rows), {PROVENANCE!r})
            k += 1
    """)
    for attempt in range(5):
        proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE)
        assert proc.stdout.readline().strip() == b"ready"
        time.sleep(0.2 + 0.13 * attempt)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)
        table = store.read_day("15m", "BTCUSDT", DAY)
        assert table is not None and table.num_rows in (48, 96)
        assert store.io.quarantined == []


def test_partitions_on_an_object_store_round_trip_and_merge(object_store):
    """RAW_DATA_DIR as a URL (memory:// standing in for s3://) goes through ObjectStoragePath."""
    url, memory, bucket = object_store
    store = RawStore(url)
    rows = make_rows("1h", DAY, 24)
    store.write("1h", "BTCUSDT", rows_to_table(rows[:12]), PROVENANCE)
    store.write("1h", "BTCUSDT", rows_to_table(rows[12:]), PROVENANCE)
    assert memory.ls(f"{bucket}/1h", detail=False) == [f"{bucket}/1h/BTCUSDT_1h_20231209.parquet"]
    assert table_to_rows(store.read("1h", "BTCUSDT", DAY, DAY + DAY_MS), 8) == rows
    assert store.metadata("1h", "BTCUSDT", DAY)["symbol"] == "BTCUSDT"
    assert store.write("1h", "BTCUSDT", rows_to_table(rows), PROVENANCE)[0].added == 0  # idempotent


def test_a_failed_write_leaves_an_object_untouched(object_store):
    from include.market_data.storage import atomic_write, resolve_root

    url, memory, bucket = object_store
    target = resolve_root(url) / "day.parquet"
    atomic_write(target, lambda handle: handle.write(b"GOOD-OLD-CONTENT"))

    def fails_half_way(handle):
        handle.write(b"PARTIAL")
        raise RuntimeError("writer died")

    with pytest.raises(RuntimeError):
        atomic_write(target, fails_half_way)
    assert memory.cat(f"{bucket}/day.parquet") == b"GOOD-OLD-CONTENT"


# --- housekeeping: a bounded set of lock files, and locks that nest without deadlocking ---------


def _colliding(io, stem: str, count: int = 2, tier: str = "stripe") -> list:
    """``count`` different paths under ``io.root`` whose locks share one stripe file."""
    by_stripe: dict[str, list] = {}
    for i in range(100_000):
        path = io.root / f"{stem}_{i}.parquet"
        same = by_stripe.setdefault(io.lock_name(path, tier), [])
        same.append(path)
        if len(same) == count:
            return same
    raise AssertionError("no collision found")


def test_a_thousand_partitions_leave_a_bounded_set_of_lock_files(tmp_path):
    from include.market_data.storage import LOCK_STRIPES

    start = 18_000 * DAY_MS  # 2019-04-14: 1000 closed daily candles, one partition each
    results = RawStore(str(tmp_path)).write("1d", "BTCUSDT", rows_to_table(make_rows("1d", start, 1000)), PROVENANCE)
    assert len(results) == 1000 and len(list((tmp_path / "1d").iterdir())) == 1000
    locks = sorted(p.name for p in (tmp_path / "_locks").iterdir())
    assert 0 < len(locks) <= LOCK_STRIPES == 256
    assert all(re.fullmatch(r"stripe-[0-9a-f]{2}\.lock", name) for name in locks), locks[:5]


def test_nested_locks_that_collide_on_a_stripe_neither_deadlock_nor_let_go_early(tmp_path):
    import threading

    from include.market_data.storage import PartitionIO

    io = PartitionIO(str(tmp_path))
    first, second = _colliding(io, "day")
    assert first != second and io.lock_name(first) == io.lock_name(second)
    inner_done, release, other_got_it = threading.Event(), threading.Event(), threading.Event()

    def nested():
        with io.lock(first):
            with io.lock(second):  # same stripe, same thread: must not wait for itself
                pass
            inner_done.set()
            release.wait(10)  # still holding ``first``: leaving the inner lock let nothing go

    def other():
        with io.lock(second):
            other_got_it.set()

    holder = threading.Thread(target=nested, daemon=True)
    holder.start()
    assert inner_done.wait(10), "nested locks on one stripe deadlocked"
    rival = threading.Thread(target=other, daemon=True)
    rival.start()
    assert not other_got_it.wait(0.5), "the stripe was released when the inner lock was left"
    release.set()
    holder.join(10)
    assert other_got_it.wait(10) and not holder.is_alive()
    rival.join(10)


def test_sections_around_partition_locks_never_deadlock_on_shared_stripes(tmp_path):
    """Two curations hold their (interval, symbol) section while merging a day: section A's stripe
    number is day B's and the other way round. One stripe set for both would deadlock here."""
    import threading

    from include.market_data.storage import LOCK_STRIPES, PartitionIO

    io = PartitionIO(str(tmp_path))
    names = {}
    for i in range(100_000):
        path = io.root / f"day_{i}.parquet"
        names.setdefault(io.lock_name(path)[len("stripe-"):], path)
        if len(names) == LOCK_STRIPES:
            break
    section_a, section_b = io.root / "1h_BTCUSDT.curate", io.root / "15m_ETHUSDT.curate"
    number = lambda p: io.lock_name(p, "section")[len("section-"):]  # noqa: E731
    assert number(section_a) != number(section_b)
    day_a, day_b = names[number(section_b)], names[number(section_a)]
    both_in, done = threading.Barrier(2, timeout=10), []

    def curate(section, day):
        with io.lock(section, tier="section"):
            both_in.wait()
            with io.lock(day):
                done.append(day)

    workers = [threading.Thread(target=curate, args=args, daemon=True)
               for args in ((section_a, day_a), (section_b, day_b))]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(20)
    assert sorted(map(str, done)) == sorted(map(str, (day_a, day_b))), "deadlocked"


def test_threads_merging_one_day_on_an_object_store_lose_nothing(object_store, monkeypatch):
    """Object stores have no file lock: inside a process, a lock per path serializes the
    read-merge-write, so two threads writing the same day keep each other's rows."""
    import threading

    from include.market_data.storage import PartitionIO

    url, memory, bucket = object_store
    rows = make_rows("15m", DAY, 96)
    both_read = threading.Barrier(2, timeout=1)
    real_read = PartitionIO.read

    def read_then_wait(self, path, columns=None):
        table = real_read(self, path, columns)
        try:  # without a lock both threads read the same (empty) day before either writes
            both_read.wait()
        except threading.BrokenBarrierError:
            pass
        return table

    monkeypatch.setattr(PartitionIO, "read", read_then_wait)
    errors = []

    def write(which):
        try:
            RawStore(url).write("15m", "BTCUSDT", rows_to_table(rows[which::2]), PROVENANCE)
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    workers = [threading.Thread(target=write, args=(which,)) for which in (0, 1)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(30)
    monkeypatch.setattr(PartitionIO, "read", real_read)
    assert errors == []
    assert table_to_rows(RawStore(url).read("15m", "BTCUSDT", DAY, DAY + DAY_MS), 8) == rows


def test_a_merge_into_a_file_with_other_columns_does_not_crash(tmp_path):
    import numpy as np
    import pyarrow as pa

    from include.market_data.storage import PartitionIO

    io = PartitionIO(str(tmp_path))
    path = io.root / "table.parquet"
    keys = [("key", "ascending")]
    old = pa.table({"key": [1, 2], "a": [1.0, 2.0], "gone": ["x", "y"]})
    io.write_atomic(path, old, {})
    new = pa.table({"key": [2, 3], "a": [20.0, 30.0], "added": [0.5, 0.7]})
    result = io.merge(path, 0, new, {}, replaces=lambda t: np.isin(t.column("key").to_numpy(), [2, 3]),
                      sort_keys=keys, validate=lambda t: None)
    merged = pq.read_table(path).replace_schema_metadata(None)
    assert merged.column_names == ["key", "a", "added"]  # the new rows' columns
    assert merged.to_pydict() == {"key": [1, 2, 3], "a": [1.0, 20.0, 30.0], "added": [None, 0.5, 0.7]}
    assert (result.rows_before, result.rows_after) == (2, 3)


# --- housekeeping: quarantine retention ---------------------------------------------------------

NOW = "2024-03-31T12:00:00Z"
QUARANTINED = {
    "BTCUSDT_1h_20240101.parquet.20240201T000000000000Z": True,   # 59.5 days old: pruned
    "BTCUSDT_1h_20240102.parquet.20240301T115959999999Z": True,   # 30 days + 1 µs old: pruned
    "BTCUSDT_1h_20240103.parquet.20240301T120000000001Z": False,  # just inside 30 days: kept
    "1h_curated_20240104.parquet.20240330T080000123456Z": False,  # a day old: kept
    "notes.txt": False,                                           # no stamp: never touched
}


def test_prune_quarantine_deletes_what_is_older_than_the_retention_by_its_stamp(tmp_path, monkeypatch):
    from include.market_data import storage
    from include.market_data.storage import QUARANTINE_DIR, prune_quarantine

    directory = tmp_path / QUARANTINE_DIR
    directory.mkdir()
    for name, old in QUARANTINED.items():
        (directory / name).write_bytes(b"x")
        # the file's mtime says the opposite of its stamp: only the stamp counts
        stamp = time.time() - (0 if old else 400 * 86400)
        os.utime(directory / name, (stamp, stamp))
    logged = []
    monkeypatch.setattr(storage.log, "info", lambda event, **fields: logged.append((event, fields)))
    removed = prune_quarantine(str(tmp_path), 30, now=NOW)
    expected = sorted(str(directory / n) for n, old in QUARANTINED.items() if old)
    assert sorted(removed) == expected
    assert sorted(p.name for p in directory.iterdir()) == sorted(n for n, old in QUARANTINED.items() if not old)
    assert sorted(fields["path"] for event, fields in logged if event == "quarantined file removed") == expected
    assert prune_quarantine(str(tmp_path), 30, now=NOW) == []  # nothing left to do
    assert len(prune_quarantine(str(tmp_path), 0, now=NOW)) == 2  # retention 0: every stamped file
    assert [p.name for p in directory.iterdir()] == ["notes.txt"]
    assert prune_quarantine(str(tmp_path / "nowhere"), 30) == []  # no _quarantine/ at all


def test_prune_quarantine_on_an_object_store(object_store):
    from include.market_data.storage import QUARANTINE_DIR, prune_quarantine

    url, memory, bucket = object_store
    for name in QUARANTINED:
        memory.pipe(f"{bucket}/{QUARANTINE_DIR}/{name}", b"x")
    removed = prune_quarantine(url, 30, now=NOW)
    assert sorted(r.rsplit("/", 1)[1] for r in removed) == sorted(n for n, old in QUARANTINED.items() if old)
    left = sorted(p.rsplit("/", 1)[1] for p in memory.ls(f"{bucket}/{QUARANTINE_DIR}", detail=False))
    assert left == sorted(n for n, old in QUARANTINED.items() if not old)


# --- group commit: many days in one write -----------------------------------------------------

def _days_table(days: int, start: int = DAY, price: str = "30000.00"):
    return rows_to_table(make_rows("15m", start, 96 * days, price=price))


def _archive_provenance(days):
    return {day: {"source": f"https://data.binance.vision/data/spot/daily/klines/BTCUSDT/15m/{day}.zip",
                  "sha256": f"{day:064x}"} for day in days}


def test_a_multi_day_write_lands_every_day_with_its_own_provenance(tmp_path):
    store = RawStore(str(tmp_path))
    days = [DAY + k * DAY_MS for k in range(5)]
    archived = _archive_provenance(days[:3])
    results = store.write("15m", "BTCUSDT", _days_table(5), PROVENANCE, day_provenance=archived)
    assert [r.day_ms for r in results] == days and all(r.rows_after == r.added == 96 for r in results)
    for day in days:
        meta = store.metadata("15m", "BTCUSDT", day)
        expected = {**PROVENANCE, **archived.get(day, {})}
        assert {k: meta[k] for k in expected} == expected
        assert (meta["symbol"], meta["interval"], meta["schema_version"]) == ("BTCUSDT", "15m", "2")
        assert ("sha256" in meta) == (day in archived)
    assert table_to_rows(store.read("15m", "BTCUSDT", days[0], days[-1] + DAY_MS), 8) == make_rows("15m", DAY, 480)
    assert not [p for p in (tmp_path / "15m").iterdir() if p.name.startswith(".")]  # no temp file left


def test_a_multi_day_rewrite_leaves_every_file_byte_identical(tmp_path):
    store = RawStore(str(tmp_path))
    table = _days_table(4)
    store.write("15m", "BTCUSDT", table, PROVENANCE, day_provenance=_archive_provenance([DAY]))
    paths = [store.path("15m", "BTCUSDT", DAY + k * DAY_MS) for k in range(4)]
    before = [(p.read_bytes(), p.stat().st_mtime_ns, p.stat().st_ino) for p in paths]
    again = store.write("15m", "BTCUSDT", table, {**PROVENANCE, "fetched_at": "2030-01-01T00:00:00+00:00"},
                        validated=True, day_provenance=_archive_provenance([DAY + DAY_MS]))
    assert [(r.added, r.revised, r.rows_after) for r in again] == [(0, 0, 96)] * 4
    assert [(p.read_bytes(), p.stat().st_mtime_ns, p.stat().st_ino) for p in paths] == before


def test_a_new_day_is_neither_validated_again_nor_merged(tmp_path, monkeypatch):
    from include.market_data import storage

    checked = []
    monkeypatch.setattr(storage, "validate_raw", lambda table, interval: checked.append(table.num_rows))
    store = RawStore(str(tmp_path))
    store.write("15m", "BTCUSDT", _days_table(3), PROVENANCE, validated=True)
    assert checked == []  # new days: the caller's validation stands
    rows = make_rows("15m", DAY, 96 * 3)
    store.write("15m", "BTCUSDT", rows_to_table(rows[40:200]), PROVENANCE, validated=True)
    assert checked == [96 + 96]  # the two days that keep rows of their files, in one call


def test_a_crash_between_files_leaves_each_old_or_new_and_a_rerun_completes(tmp_path, monkeypatch):
    store = RawStore(str(tmp_path))
    days = [DAY + k * DAY_MS for k in range(6)]
    store.write("15m", "BTCUSDT", _days_table(3, price="30000.00"), PROVENANCE)  # days 0-2 exist (old)
    old = {d: store.read_day("15m", "BTCUSDT", d) for d in days[:3]}
    new_table = _days_table(6, price="31000.00")  # revises days 0-2, adds days 3-5
    real_replace, calls = os.replace, []

    def crash_on_the_third(src, dst, *args, **kwargs):
        calls.append(dst)
        if len(calls) == 3:
            raise OSError(5, "Input/output error (injected)")
        return real_replace(src, dst, *args, **kwargs)

    monkeypatch.setattr(os, "replace", crash_on_the_third)
    with pytest.raises(OSError, match="injected"):
        store.write("15m", "BTCUSDT", new_table, PROVENANCE)
    monkeypatch.setattr(os, "replace", real_replace)
    expected_new = {d: new_table.slice(k * 96, 96) for k, d in enumerate(days)}
    for k, day in enumerate(days):
        table = store.read_day("15m", "BTCUSDT", day)
        if k < 2:
            assert table.equals(expected_new[day])  # renamed before the crash
        elif day in old:
            assert table.equals(old[day])  # left as it was
        else:
            assert table is None  # never made visible
    assert store.io.quarantined == []
    assert not [p for p in (tmp_path / "15m").iterdir() if p.name.startswith(".")]  # temp files removed
    store.write("15m", "BTCUSDT", new_table, PROVENANCE)  # the rerun completes
    assert all(store.read_day("15m", "BTCUSDT", d).equals(expected_new[d]) for d in days)


def _fsync_spy(monkeypatch):
    """Spies on os.fsync (from any thread) and os.replace: one event per call, in order."""
    import stat
    import threading

    events, guard = [], threading.Lock()
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        kind = "dir" if stat.S_ISDIR(os.fstat(fd).st_mode) else "file"
        target = os.readlink(f"/proc/self/fd/{fd}")
        real_fsync(fd)
        with guard:
            events.append(("fsync", kind, target))

    def replace(src, dst, *args, **kwargs):
        with guard:
            events.append(("replace", str(src), str(dst)))
        return real_replace(src, dst, *args, **kwargs)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    return events


@pytest.mark.skipif(not Path("/proc/self/fd").exists(), reason="needs /proc to name a descriptor's file")
def test_a_group_write_fsyncs_each_temp_file_before_its_rename_and_each_directory_once(tmp_path, monkeypatch):
    store = RawStore(str(tmp_path))
    store.write("15m", "BTCUSDT", _days_table(2), PROVENANCE)  # two days to merge into, three new ones
    events = _fsync_spy(monkeypatch)
    revised = _days_table(5, price="32000.00")
    results = store.write("15m", "BTCUSDT", revised, PROVENANCE)
    assert len(results) == 5
    renames = [(i, src) for i, (what, src, _) in enumerate(events) if what == "replace"]
    assert len(renames) == 5
    for at, src in renames:  # each temp file's bytes were on disk before its rename made it visible
        assert ("fsync", "file", src) in events[:at], src
    dir_syncs = [i for i, event in enumerate(events) if event[:2] == ("fsync", "dir")]
    assert [events[i][2] for i in dir_syncs] == [str(tmp_path / "15m")]  # once, for the one directory
    assert dir_syncs[0] > renames[-1][0]  # after the last rename, before write returned
    assert sum(1 for e in events if e[:2] == ("fsync", "file")) == 5

    events.clear()
    store.write("15m", "BTCUSDT", revised, PROVENANCE)  # nothing changes: nothing to sync
    assert events == []


@pytest.mark.skipif(not Path("/proc/self/fd").exists(), reason="needs /proc to name a descriptor's file")
def test_curated_days_are_one_group_commit_and_keep_the_other_symbols_rows(tmp_path, monkeypatch):
    import pyarrow as pa

    from include.market_data.storage import CuratedStore

    store = CuratedStore(str(tmp_path))
    days = [DAY + k * DAY_MS for k in range(3)]

    def rows(symbol, day, value):
        table = rows_to_table(make_rows("1h", day, 24))
        return table.add_column(0, "symbol", pa.array([symbol] * 24)).append_column("x", pa.array([value] * 24))

    checked = []
    validate = lambda merged: checked.append(merged.num_rows)  # noqa: E731
    meta = {"schema_version": "1"}
    store.write_days("1h", "BTCUSDT", {d: rows("BTCUSDT", d, 1.0) for d in days}, meta, validate, new_validated=True)
    assert checked == []
    events = _fsync_spy(monkeypatch)
    results = store.write_days("1h", "ETHUSDT", {d: rows("ETHUSDT", d, 2.0) for d in days[1:]}, meta, validate,
                               new_validated=True)
    assert [(r.rows_before, r.rows_after) for r in results] == [(24, 48), (24, 48)]
    assert checked == [96]  # both merged days in one validation
    assert [e[2] for e in events if e[:2] == ("fsync", "dir")] == [str(tmp_path)]
    table = store.read("1h", days[0], days[-1] + DAY_MS)
    assert sorted(set(zip(table.column("symbol").to_pylist(), table.column("x").to_pylist()))) == [
        ("BTCUSDT", 1.0), ("ETHUSDT", 2.0)]
    assert table.num_rows == 24 * 3 + 24 * 2


def test_a_chunk_that_fails_validation_writes_nothing_of_it(tmp_path, monkeypatch):
    from include.market_data import storage

    monkeypatch.setattr(storage, "GROUP_LOCK_DAYS", 2)
    store = RawStore(str(tmp_path))
    store.write("15m", "BTCUSDT", _days_table(4), PROVENANCE)
    before = {p.name: p.read_bytes() for p in (tmp_path / "15m").iterdir()}

    def refuse_day_3(table, interval):
        times = table.column("open_time").cast("int64").to_pylist()
        if any(DAY + 2 * DAY_MS <= t < DAY + 3 * DAY_MS for t in times):
            raise SchemaViolation("injected")

    monkeypatch.setattr(storage, "validate_raw", refuse_day_3)
    rows = make_rows("15m", DAY, 96 * 4, price="33000.00")
    partial = [r for i, r in enumerate(rows) if i % 96 < 48]  # half of each day: existing rows survive
    with pytest.raises(SchemaViolation, match="injected"):
        store.write("15m", "BTCUSDT", rows_to_table(partial), PROVENANCE, validated=True)
    after = {p.name: p.read_bytes() for p in (tmp_path / "15m").iterdir()}
    changed = sorted(name for name in before if after[name] != before[name])
    assert changed == ["BTCUSDT_15m_20231209.parquet", "BTCUSDT_15m_20231210.parquet"]  # the first chunk only


def _write_days_in_rounds(root: str, which: int, ways: int, rounds: int, days: int) -> None:
    rows = make_rows("15m", DAY, 96 * days)
    mine = [r for i, r in enumerate(rows) if i % ways == which]
    store = RawStore(root)
    for k in range(rounds):  # each round spans every day; the days overlap with the other writers'
        store.write("15m", "BTCUSDT", rows_to_table(mine[k::rounds]), PROVENANCE, validated=(k % 2 == 0))


def test_threads_group_writing_overlapping_days_lose_nothing(tmp_path, monkeypatch):
    import threading

    from include.market_data import storage

    monkeypatch.setattr(storage, "GROUP_LOCK_DAYS", 3)  # several chunks, each holding several stripes
    errors = []

    def run(which):
        try:
            _write_days_in_rounds(str(tmp_path), which, 4, 3, 10)
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    workers = [threading.Thread(target=run, args=(which,)) for which in range(4)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(120)
    assert errors == [] and not any(w.is_alive() for w in workers)
    stored = RawStore(str(tmp_path)).read("15m", "BTCUSDT", DAY, DAY + 10 * DAY_MS)
    assert table_to_rows(stored, 8) == make_rows("15m", DAY, 960)


def test_processes_group_writing_overlapping_days_lose_nothing(tmp_path):
    ctx = get_context("spawn")
    workers = [ctx.Process(target=_write_days_in_rounds, args=(str(tmp_path), which, 2, 6, 20)) for which in (0, 1)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(120)
        assert worker.exitcode == 0
    stored = RawStore(str(tmp_path)).read("15m", "BTCUSDT", DAY, DAY + 20 * DAY_MS)
    assert table_to_rows(stored, 8) == make_rows("15m", DAY, 96 * 20)


def test_a_multi_day_write_on_an_object_store(object_store):
    url, memory, bucket = object_store
    store = RawStore(url)
    rows = make_rows("1h", DAY, 72)
    archived = _archive_provenance([DAY + DAY_MS])
    store.write("1h", "BTCUSDT", rows_to_table(rows[::2]), PROVENANCE)
    results = store.write("1h", "BTCUSDT", rows_to_table(rows[1::2]), PROVENANCE, day_provenance=archived)
    assert [(r.rows_before, r.rows_after) for r in results] == [(12, 24)] * 3
    assert sorted(memory.ls(f"{bucket}/1h", detail=False)) == [
        f"{bucket}/1h/BTCUSDT_1h_2023120{d}.parquet" for d in (9,)] + [
        f"{bucket}/1h/BTCUSDT_1h_202312{d}.parquet" for d in (10, 11)]
    assert table_to_rows(store.read("1h", "BTCUSDT", DAY, DAY + 3 * DAY_MS), 8) == rows
    assert store.metadata("1h", "BTCUSDT", DAY + DAY_MS)["sha256"] == archived[DAY + DAY_MS]["sha256"]
    assert "sha256" not in store.metadata("1h", "BTCUSDT", DAY)
    before = {p: memory.cat(p) for p in memory.ls(f"{bucket}/1h", detail=False)}
    assert all(r.added == 0 for r in store.write("1h", "BTCUSDT", rows_to_table(rows), PROVENANCE,
                                                 day_provenance=archived))
    assert {p: memory.cat(p) for p in memory.ls(f"{bucket}/1h", detail=False)} == before
