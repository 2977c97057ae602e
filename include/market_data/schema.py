"""The raw kline schema: Arrow types, Binance-row conversion and the pandera checks.

Prices and volumes are ``decimal128(38, 18)`` so Binance's decimal strings round-trip
exactly (no float rounding). ``decimal_places`` — how many fraction digits the source
strings had — is kept in the Parquet metadata so the original strings can be rebuilt.
"""

from __future__ import annotations

import functools

from decimal import Decimal
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from binance_provider.klines import ROW_RULES
from include.market_data.timeframes import WEEK_ORIGIN_MS, interval_ms

if TYPE_CHECKING:  # imported where used: a shell's first Binance request need not wait for them
    import pandas as pd
    import pandera.pandas as pa_schema

# 2: raw day files carry ``symbol`` and ``interval`` columns (any tool can query a glob of them);
# version-1 files, without them, still read and are rewritten as version 2 on their next merge.
SCHEMA_VERSION = "2"
DECIMAL_TYPE = pa.decimal128(38, 18)
TIME_TYPE = pa.timestamp("ms", tz="UTC")

DECIMAL_COLUMNS = (
    "open", "high", "low", "close", "volume",
    "quote_asset_volume", "taker_buy_base_asset_volume", "taker_buy_quote_asset_volume",
)
# Binance's field order (the 12th field, "ignore", is dropped).
RAW_COLUMNS = (
    "open_time", "open", "high", "low", "close", "volume", "close_time",
    "quote_asset_volume", "number_of_trades",
    "taker_buy_base_asset_volume", "taker_buy_quote_asset_volume",
)
RAW_SCHEMA = pa.schema(
    [
        pa.field(name, TIME_TYPE if name.endswith("_time")
                 else pa.int64() if name == "number_of_trades" else DECIMAL_TYPE, nullable=False)
        for name in RAW_COLUMNS
    ]
)


# Dictionary-encoded on disk: one value per file, so the two columns cost almost nothing.
SERIES_TYPE = pa.dictionary(pa.int32(), pa.string())
RAW_FILE_SCHEMA = RAW_SCHEMA.append(pa.field("symbol", SERIES_TYPE, nullable=False)).append(
    pa.field("interval", SERIES_TYPE, nullable=False))


def with_series_columns(table: pa.Table, symbol: str, interval: str) -> pa.Table:
    """RAW_SCHEMA rows -> the day file's columns (RAW_FILE_SCHEMA): ``symbol`` and ``interval`` added."""
    n = table.num_rows

    def constant(value: str) -> pa.DictionaryArray:
        return pa.DictionaryArray.from_arrays(pa.array(np.zeros(n, dtype=np.int32)), pa.array([value]))

    return pa.Table.from_arrays([*table.select(list(RAW_COLUMNS)).columns, constant(symbol), constant(interval)],
                                schema=RAW_FILE_SCHEMA)


class SchemaViolation(ValueError):
    """Rows that break the raw contract (types, grid, order, uniqueness, OHLC sanity)."""


def rows_to_table(rows: list[list]) -> pa.Table:
    """Binance kline rows (12 fields, decimals as strings) -> Arrow table in RAW_SCHEMA."""
    if not rows:
        return RAW_SCHEMA.empty_table()
    columns = list(zip(*rows))
    arrays = []
    for index, name in enumerate(RAW_COLUMNS):
        values = columns[index]
        if name.endswith("_time"):
            arrays.append(pa.array(values, type=pa.int64()).cast(TIME_TYPE))
        elif name == "number_of_trades":
            arrays.append(pa.array(values, type=pa.int64()))
        else:
            # Arrow parses decimal strings exactly; a float never touches them.
            arrays.append(pc.cast(pa.array(values, type=pa.string()), DECIMAL_TYPE))
    return pa.Table.from_arrays(arrays, schema=RAW_SCHEMA)


def decimal_places(rows: list[list]) -> int:
    """Fraction digits of the source strings (Binance uses a fixed count per symbol)."""
    digits = 0
    for row in rows[:50]:
        for value in (row[1], row[5]):
            text = str(value)
            if "." in text:
                digits = max(digits, len(text) - text.index(".") - 1)
    return digits


def table_to_rows(table: pa.Table, places: int) -> list[list]:
    """Arrow raw table -> Binance 12-field rows, decimals formatted with ``places`` digits."""
    quantum = Decimal(1).scaleb(-places)
    data = {name: table.column(name).to_pylist() for name in RAW_COLUMNS}
    rows = []
    for i in range(table.num_rows):
        row = []
        for name in RAW_COLUMNS:
            value = data[name][i]
            if name.endswith("_time"):
                row.append(int(value.timestamp() * 1000))
            elif name == "number_of_trades":
                row.append(int(value))
            else:
                row.append(f"{value.quantize(quantum):f}")
        row.append("0")
        rows.append(row)
    return rows


def _grid_frame(table: pa.Table) -> pd.DataFrame:
    """Numeric view used by the checks: times as int ms, decimals as float64.

    Decimal -> float is monotonic, so a value rule that holds on the exact values holds on the
    floats too: these checks never refuse a row the hook's exact checks passed.
    """
    import pandas as pd

    frame = {
        name: pc.cast(table.column(name), pa.int64()).to_numpy() if name.endswith("_time")
        else table.column(name).to_numpy()
        for name in ("open_time", "close_time", "number_of_trades")
    }
    for name in DECIMAL_COLUMNS:
        frame[name] = pc.cast(table.column(name), pa.float64()).to_numpy()
    return pd.DataFrame(frame)


@functools.lru_cache(maxsize=None)
def raw_frame_schema(interval: str) -> pa_schema.DataFrameSchema:
    """pandera schema of a raw partition's rows for ``interval`` (built once per interval).

    The structure (grid, order, uniqueness, close_time) is checked here; the value rules of a
    row are the provider's :data:`binance_provider.klines.ROW_RULES`, the same the hook applies
    to every row it receives, so a row the hook passes is never refused here.
    """
    import pandera.pandas as pa_schema

    step = interval_ms(interval)
    origin = WEEK_ORIGIN_MS if interval == "1w" else 0
    return pa_schema.DataFrameSchema(
        {
            "open_time": pa_schema.Column(
                "int64",
                [
                    pa_schema.Check(lambda s: (s - origin) % step == 0, error=f"open_time off the {interval} grid"),
                    pa_schema.Check(lambda s: s.is_monotonic_increasing, error="open_time not sorted"),
                ],
                unique=True,
            ),
            "close_time": pa_schema.Column("int64"),
            "number_of_trades": pa_schema.Column("int64"),
            **{name: pa_schema.Column("float64") for name in DECIMAL_COLUMNS},
        },
        checks=[
            pa_schema.Check(lambda df: df.close_time == df.open_time + step - 1,
                            error="close_time != open_time + interval - 1 ms"),
            *(pa_schema.Check(rule.check, name=rule.name, error=rule.message) for rule in ROW_RULES),
        ],
        strict=True,
        coerce=False,
    )


def validate_raw(table: pa.Table, interval: str) -> None:
    """Raise :class:`SchemaViolation` unless ``table`` meets the raw contract."""
    if table.schema.remove_metadata() != RAW_SCHEMA:
        raise SchemaViolation(f"raw table schema differs from RAW_SCHEMA: {table.schema}")
    if table.num_rows == 0:
        return
    import pandera.pandas as pa_schema

    try:
        raw_frame_schema(interval).validate(_grid_frame(table), lazy=True)
    except pa_schema.errors.SchemaErrors as exc:
        cases = exc.failure_cases
        problems = sorted({f"{col}: {check}" for col, check in zip(cases["column"].astype(str), cases["check"].astype(str))})
        raise SchemaViolation(f"{interval} rows break the raw contract ({len(cases)} failure(s)): "
                              + "; ".join(problems[:8])) from None
