import os
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
