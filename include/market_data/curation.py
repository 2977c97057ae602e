"""Raw day partitions -> curated daily datasets with features (DESIGN.md, "Curated").

Curating a set of days reads, in one pass, the raw candles of those days plus the
warm-up each feature needs before them (``features.WARMUP_CANDLES`` rows) and computes
the features over the whole stretch, so curating one day gives the same numbers as
curating all history (within 1e-9 relative). Days after a touched day whose warm-up
contains the touched rows are recomputed too.
"""

from __future__ import annotations

import bisect
import functools
import time
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import pandera.pandas as pa_schema
import pyarrow as pa
import pyarrow.compute as pc

from include.market_data import observability
from include.market_data.config import Settings, load_settings
from include.market_data.features import FEATURE_COLUMNS, WARMUP_CANDLES, compute_features
from include.market_data.schema import DECIMAL_COLUMNS, RAW_COLUMNS, TIME_TYPE
from include.market_data.storage import CuratedStore, RawStore, prune_quarantine
from include.market_data.timeframes import DAY_MS, WEEK_ORIGIN_MS, day_start_ms, interval_ms, ms_to_utc, to_ms

log = observability.get_logger(__name__)

# The curated files' own schema version (the ``schema_version`` metadata of each day file), apart
# from raw's. Bump it when CURATED_SCHEMA's columns change: a day file of an older version (or with
# other columns) is then rebuilt whole, for every configured symbol, by the next curation touching it.
CURATED_SCHEMA_VERSION = "1"

CURATED_SCHEMA = pa.schema(
    [pa.field("symbol", pa.string(), nullable=False)]
    + [pa.field(name, TIME_TYPE if name.endswith("_time") else pa.int64() if name == "number_of_trades"
                else pa.decimal128(38, 18), nullable=False) for name in RAW_COLUMNS]
    + [pa.field(name, pa.int64() if name == "gap_before" else pa.float64()) for name in FEATURE_COLUMNS]
)


class CurationError(ValueError):
    """A curation request that cannot be honoured; the message names the input."""


@functools.lru_cache(maxsize=None)
def _curated_frame_schema(interval: str) -> pa_schema.DataFrameSchema:
    step = interval_ms(interval)
    origin = WEEK_ORIGIN_MS if interval == "1w" else 0
    return pa_schema.DataFrameSchema(
        {
            "symbol": pa_schema.Column(str),
            "open_time_ms": pa_schema.Column("int64", pa_schema.Check(lambda s: (s - origin) % step == 0,
                                                                      error=f"open_time off the {interval} grid")),
            **{name: pa_schema.Column("float64", nullable=True) for name in FEATURE_COLUMNS if name != "gap_before"},
            "gap_before": pa_schema.Column("int64", pa_schema.Check.ge(0)),
        },
        checks=[pa_schema.Check(lambda df: ~df.duplicated(["symbol", "open_time_ms"]), error="duplicate rows"),
                pa_schema.Check(lambda df: (df.atr_14.isna() | (df.atr_14 >= 0)), error="negative ATR")],
        strict=False,
    )


def validate_curated(table: pa.Table, interval: str) -> None:
    frame = pd.DataFrame({
        "symbol": table.column("symbol").to_pylist(),
        "open_time_ms": pc.cast(table.column("open_time"), pa.int64()).to_numpy(),
        **{name: table.column(name).to_numpy(zero_copy_only=False) for name in FEATURE_COLUMNS},
    })
    _curated_frame_schema(interval).validate(frame, lazy=True)
    for symbol in set(frame.symbol):
        times = frame.open_time_ms[frame.symbol == symbol].to_numpy()
        if not (np.diff(times) > 0).all():
            raise CurationError(f"curated {interval} rows of {symbol} are not sorted by open_time")


@dataclass
class CurationSummary:
    interval: str
    symbol: str
    days_written: list[str] = field(default_factory=list)
    rows: int = 0
    first_open_time: str | None = None
    last_open_time: str | None = None
    skipped: dict[str, str] = field(default_factory=dict)
    seconds: float = 0.0

    def __str__(self) -> str:
        span = f"{self.first_open_time} .. {self.last_open_time}" if self.rows else "no rows"
        text = (f"curated {self.interval} {self.symbol}: {len(self.days_written)} day(s), {self.rows} rows, "
                f"{span}, {self.seconds:.2f}s")
        if self.skipped:
            text += f"; skipped {len(self.skipped)} day(s): " + ", ".join(f"{d} ({r})" for d, r in self.skipped.items())
        return text

    def as_dict(self) -> dict:
        return {"interval": self.interval, "symbol": self.symbol, "days_written": self.days_written,
                "rows": self.rows, "first_open_time": self.first_open_time, "last_open_time": self.last_open_time,
                "skipped": self.skipped, "seconds": self.seconds}


def _to_frame(table: pa.Table) -> pd.DataFrame:
    """Float view of raw candles for the feature maths (exact decimals stay in the table)."""
    frame = {"open_time": table.column("open_time").to_pandas()}
    for name in ("open", "high", "low", "close", "volume", "quote_asset_volume"):
        frame[name] = pc.cast(table.column(name), pa.float64()).to_numpy()
    return pd.DataFrame(frame)


# Above this many days of span, one directory listing is cheaper than a stat per day.
PROBE_MAX_DAYS = 1000


class _Probed(list):
    """Partitions found by probing a span of days: complete inside that span only."""


def _warmup_days(interval: str) -> tuple[int, int, int]:
    """(warm-up candles, most candles per day file, day files the warm-up reads first)."""
    needed = WARMUP_CANDLES[interval]
    per_day = max(1, DAY_MS // interval_ms(interval))
    return needed, per_day, -(-needed // per_day) + 1


class DataCuration:
    """Build curated day files from raw partitions; usable from a plain shell or a task.

    >>> print(DataCuration().curate_timeframe('1h'))
    """

    def __init__(self, settings: Settings | None = None):
        self.settings = settings or load_settings()
        self.raw = RawStore(self.settings.raw_data_dir)
        self.curated = CuratedStore(self.settings.curated_data_dir)

    def curate_timeframe(self, interval: str, symbol: str | None = None, start=None, end=None) -> CurationSummary:
        """Curate every raw day of ``symbol`` (default: the first of BINANCE_SYMBOLS) in ``[start, end)``
        (all days when no range)."""
        symbol = self.settings.symbols[0] if symbol is None else symbol
        self._check(interval, symbol)
        days = self.raw.days(interval, symbol)
        if start is not None or end is not None:
            try:
                start_ms = to_ms(start) if start is not None else None
                end_ms = to_ms(end) if end is not None else None
            except (ValueError, TypeError) as exc:
                raise CurationError(f"start/end: {exc}") from None
            if start_ms is not None and end_ms is not None and start_ms >= end_ms:
                raise CurationError(f"start={start!r} must be before end={end!r}")
            days = [d for d in days if (start_ms is None or d + DAY_MS > start_ms) and (end_ms is None or d < end_ms)]
        return self.curate_days(interval, symbol, days, follow_warmup=False)

    def curate_days(self, interval: str, symbol: str, days: list[int], *, follow_warmup: bool = True) -> CurationSummary:
        """Recompute the curated files of ``days`` (UTC day starts, ms).

        With ``follow_warmup``, later days whose warm-up holds any of these days' candles
        are recomputed as well (a backfilled or revised candle changes them).
        """
        self._check(interval, symbol)
        if follow_warmup:
            self._rebuild_quarantined_days(interval)
        started = time.monotonic()
        summary = CurationSummary(interval, symbol)
        wanted = sorted({day_start_ms(d) for d in days})
        # Read raw -> compute -> write is one critical section per (interval, symbol): a slower
        # run that read older raw must not overwrite a newer run's result.
        with self.curated.io.lock(self.curated.root / f"{interval}_{symbol}.curate", tier="section"):
            available = self._available_near(interval, symbol, wanted, follow_warmup)
            available_set = set(available)
            for day in wanted:
                if day not in available_set:
                    summary.skipped[ms_to_utc(day).date().isoformat()] = "no raw partition"
            targets = [d for d in wanted if d in available_set]
            if targets and follow_warmup:
                # every touched day (not only the last) reaches the days whose warm-up holds it
                reach = DAY_MS + WARMUP_CANDLES[interval] * interval_ms(interval)
                followed = set(targets)
                for touched in targets:
                    followed.update(available[bisect.bisect_right(available, touched):
                                              bisect.bisect_left(available, touched + reach)])
                targets = sorted(followed)
            if targets:
                self._curate_span(interval, symbol, targets, available, summary)
        self._restore_other_symbols(interval, symbol)
        if follow_warmup:
            self._prune_quarantine()
        summary.seconds = round(time.monotonic() - started, 3)
        observability.incr(f"curate.{interval}.rows", summary.rows)
        observability.timing(f"curate.{interval}.duration", summary.seconds * 1000)
        log.info("curate done", interval=interval, symbol=symbol, days=len(summary.days_written),
                 rows=summary.rows, skipped=len(summary.skipped), latency_ms=round(summary.seconds * 1000, 1),
                 status="ok")
        return summary

    def _rebuild_quarantined_days(self, interval: str) -> None:
        """Curated day files quarantined by a reader (the signal, a shell) are rebuilt for every
        configured symbol by the next incremental curation of the interval."""
        lost = self.curated.quarantined_days(interval)
        if lost:
            log.warning("rebuilding quarantined curated days", interval=interval,
                        days=[ms_to_utc(d).date().isoformat() for d in lost], status="restored")
            for each in self.settings.symbols:
                self.curate_days(interval, each, lost, follow_warmup=False)

    def _prune_quarantine(self) -> None:
        """Housekeeping of an incremental curation (the DAG's ``curate``): curated files quarantined
        more than QUARANTINE_RETENTION_DAYS ago are deleted. It never fails the curation."""
        try:
            prune_quarantine(self.curated.root, self.settings.quarantine_retention_days)
        except OSError as exc:
            log.warning("quarantine pruning failed", path=str(self.curated.root), error=str(exc), status="error")

    def _restore_other_symbols(self, interval: str, symbol: str) -> None:
        """A curated day file that could not be read was quarantined and rewritten with this
        symbol's rows only: curate the other configured symbols of those days again."""
        lost = sorted({day for day in map(self.curated.day_of_path, self.curated.io.quarantined) if day is not None})
        self.curated.io.quarantined.clear()
        for other in self.settings.symbols:
            if other != symbol and lost:
                log.warning("re-curating after a quarantined curated file", interval=interval, symbol=other,
                            days=[ms_to_utc(d).date().isoformat() for d in lost], status="restored")
                self.curate_days(interval, other, lost, follow_warmup=False)

    def _available_near(self, interval: str, symbol: str, wanted: list[int], follow_warmup: bool) -> list[int]:
        """Raw partitions curating ``wanted`` can touch: from the warm-up before the first day to the
        reach after the last. Probed day by day when that span is short (a scheduled run: ~10 stat
        calls instead of listing every partition of the history), else listed."""
        if not wanted:
            return []
        _, _, take = _warmup_days(interval)
        reach = DAY_MS + WARMUP_CANDLES[interval] * interval_ms(interval)
        first = wanted[0] - (take + 1) * DAY_MS
        last = wanted[-1] + (reach if follow_warmup else DAY_MS)
        if (last - first) // DAY_MS > PROBE_MAX_DAYS:
            return self.raw.days(interval, symbol)
        return _Probed(self.raw.existing_days(interval, symbol, range(first, last, DAY_MS)))

    def _check(self, interval: str, symbol: str) -> None:
        if interval not in self.settings.intervals:
            raise CurationError(f"interval={interval!r} is not one of the configured intervals "
                                f"{','.join(self.settings.intervals)}")
        if symbol not in self.settings.symbols:
            raise CurationError(f"symbol={symbol!r} is not in BINANCE_SYMBOLS ({','.join(self.settings.symbols)})")

    def _read_with_warmup(self, interval: str, symbol: str, first_target: int, last_target: int,
                          available: list[int]) -> tuple[pa.Table, bool]:
        """Raw rows from far enough before ``first_target`` to hold the warm-up, to ``last_target``'s end."""
        needed, per_day, take = _warmup_days(interval)
        before = [d for d in available if d < first_target]
        if isinstance(available, _Probed) and len(before) <= take:
            # The probed days do not settle the warm-up (a hole, or history starts here): list them all.
            before = [d for d in self.raw.days(interval, symbol) if d < first_target]
        # Rows per day are at most DAY_MS / interval (1w: one per week file); walk back until
        # the warm-up is covered or history begins.
        while True:
            chosen = before[-take:] if take < len(before) else before
            warm = self.raw.read_days(interval, symbol, chosen)
            if warm.num_rows >= needed + per_day or len(chosen) == len(before):
                break
            take *= 2
        span_days = [d for d in available if first_target <= d <= last_target]
        body = self.raw.read_days(interval, symbol, span_days)
        starts_history = len(chosen) == len(before)
        return pa.concat_tables([warm, body]), starts_history

    def _compute(self, interval: str, symbol: str, targets: list[int],
                 available: list[int]) -> tuple[pa.Table, np.ndarray] | None:
        """Curated rows (CURATED_SCHEMA) from the warm-up before ``targets[0]`` to the end of
        ``targets[-1]``, sorted by open_time, and each row's UTC day; ``None`` without raw rows."""
        table, starts_history = self._read_with_warmup(interval, symbol, targets[0], targets[-1], available)
        table = table.sort_by("open_time")
        if table.num_rows == 0:
            return None
        features = compute_features(_to_frame(table), interval, starts_history=starts_history)
        times = pc.cast(table.column("open_time"), pa.int64()).to_numpy()
        columns = {"symbol": pa.array([symbol] * table.num_rows, pa.string())}
        columns.update({name: table.column(name) for name in RAW_COLUMNS})
        for name in FEATURE_COLUMNS:
            values = features[name].to_numpy()
            columns[name] = pa.array(values, pa.int64() if name == "gap_before" else pa.float64(),
                                     from_pandas=True)
        return pa.Table.from_pydict(columns, schema=CURATED_SCHEMA), times // DAY_MS * DAY_MS

    def _whole_day(self, interval: str, day: int, symbol: str, rows: pa.Table) -> pa.Table:
        """Every configured symbol's curated rows of ``day``: ``rows`` for ``symbol``, the others'
        computed afresh from raw (called under the day file's lock, so no newer write is lost)."""
        parts = [rows]
        for other in self.settings.symbols:
            if other == symbol:
                continue
            available = self._available_near(interval, other, [day], follow_warmup=False)
            if day not in available:
                continue  # no raw for that symbol and day: it has no curated rows either
            computed = self._compute(interval, other, [day], available)
            if computed is not None:
                curated, row_days = computed
                lo, hi = np.searchsorted(row_days, [day, day + DAY_MS])
                parts.append(curated.slice(int(lo), int(hi - lo)))
        return pa.concat_tables(parts)

    def _curate_span(self, interval: str, symbol: str, targets: list[int], available: list[int],
                     summary: CurationSummary) -> None:
        computed = self._compute(interval, symbol, targets, available)
        if computed is None:
            return
        curated, row_days = computed
        times = pc.cast(curated.column("open_time"), pa.int64()).to_numpy()
        target_set = set(targets)
        present = {d for d in np.unique(row_days).tolist()}
        for day in targets:
            if day not in present:
                summary.skipped[ms_to_utc(day).date().isoformat()] = "raw partition unreadable (quarantined)"
        if not target_set & present:
            return  # every target day was unreadable (quarantined): nothing to write
        targeted = curated.filter(pa.array(np.isin(row_days, sorted(target_set & present))))
        validate_curated(targeted, interval)  # once for the stretch; merges re-check only shared days
        metadata = {"symbol": symbol, "source": str(self.raw.root), "schema_version": CURATED_SCHEMA_VERSION,
                    "curated_at": ms_to_utc(int(time.time() * 1000)).isoformat()}
        days, spans = {}, {}
        for day in sorted(target_set & present):
            # rows are sorted by open_time, so each day is one contiguous slice
            lo, hi = (int(i) for i in np.searchsorted(row_days, [day, day + DAY_MS]))
            days[day], spans[day] = curated.slice(lo, hi - lo), (lo, hi)
        # every day in one group commit (one directory fsync); merges re-check only shared days
        self.curated.write_days(interval, symbol, days, metadata,
                                validate=lambda merged: validate_curated(merged, interval), new_validated=True,
                                rebuild=lambda day: self._whole_day(interval, day, symbol, days[day]))
        for day, (lo, hi) in spans.items():
            summary.days_written.append(ms_to_utc(day).date().isoformat())
            summary.rows += hi - lo
            first, last = times[lo], times[hi - 1]
            if summary.first_open_time is None:
                summary.first_open_time = ms_to_utc(int(first)).isoformat()
            summary.last_open_time = ms_to_utc(int(last)).isoformat()

    def read(self, interval: str, symbol: str, start, end, *, as_float: bool = True) -> pd.DataFrame:
        """Curated rows of ``symbol`` with ``open_time`` in ``[start, end)`` as a DataFrame."""
        table = self.curated.read(interval, to_ms(start), to_ms(end), symbol=symbol)
        if table is None:
            table = CURATED_SCHEMA.empty_table()
        table = table.sort_by("open_time")
        if as_float:
            table = table.cast(pa.schema([pa.field(f.name, pa.float64()) if f.name in DECIMAL_COLUMNS else f
                                          for f in table.schema]))
        return table.to_pandas()
