"""The row contract of a kline (binance_provider.klines): structure, value rules, and that the
hook and the raw pandera schema judge rows by the same rules (ROW_RULES, written once).

Pure unit tests: no HTTP (the hook's use of these rules over real HTTP is in test_binance_hook.py).
"""

from __future__ import annotations

import json
from decimal import Decimal

import pandas as pd
import pandera.pandas as pa_schema
import pytest

from binance_provider.klines import (
    DECIMAL_FIELDS,
    KLINE_FIELDS,
    ROW_RULES,
    KlineValidationError,
    RejectedRow,
    RowRule,
    _validate_exact,
    broken_rules,
    validate_klines,
)
from include.market_data.schema import _grid_frame, raw_frame_schema, rows_to_table, validate_raw

HOUR_MS = 3_600_000
START = 1_700_002_800_000  # 2023-11-14T23:00Z, on the hour grid
RULES = {rule.name: rule for rule in ROW_RULES}


def row(slot: int = 0, **fields) -> list:
    """A valid 1h kline in slot ``slot`` after START; ``fields`` override values by name."""
    open_time = START + slot * HOUR_MS
    values = dict(open="10.00", high="12.00", low="9.00", close="11.00", volume="5.00000000",
                  quote_asset_volume="50.00000000", number_of_trades=3, taker_buy_base_asset_volume="2.00000000",
                  taker_buy_quote_asset_volume="20.00000000", open_time=open_time,
                  close_time=open_time + HOUR_MS - 1, ignore="0")
    values.update(fields)
    return [values[name] for name in KLINE_FIELDS]


# (label, overrides, names of the rules broken)
CASES = [
    ("valid", {}, set()),
    ("flat candle, everything equal", dict(open="10", high="10", low="10", close="10"), set()),
    ("zero volumes and trades", dict(volume="0", quote_asset_volume="0.00000000", number_of_trades=0,
                                     taker_buy_base_asset_volume="0", taker_buy_quote_asset_volume="0"), set()),
    ("every trade a taker buy", dict(taker_buy_base_asset_volume="5.00000000"), set()),
    ("taker buy above volume", dict(taker_buy_base_asset_volume="5.00000001"), {"taker_buy_base_within_volume"}),
    ("low above open", dict(low="10.01"), {"low_within_open_close"}),
    ("low above close", dict(open="11.50", low="11.01"), {"low_within_open_close"}),
    ("high below open", dict(open="12.01"), {"high_within_open_close"}),
    ("high below close", dict(close="12.50"), {"high_within_open_close"}),
    ("low and high swapped", dict(high="9.00", low="12.00"), {"low_within_open_close", "high_within_open_close"}),
    ("negative low", dict(low="-0.01"), {"low_non_negative"}),
    ("negative volume", dict(volume="-1", taker_buy_base_asset_volume="-2"),
     {"volume_non_negative", "taker_buy_base_asset_volume_non_negative"}),
    ("negative volume above the taker volume", dict(volume="-1", taker_buy_base_asset_volume="0"),
     {"volume_non_negative", "taker_buy_base_within_volume"}),
    ("negative quote volume", dict(quote_asset_volume="-0.00000001"), {"quote_asset_volume_non_negative"}),
    ("negative taker quote volume", dict(taker_buy_quote_asset_volume="-3"),
     {"taker_buy_quote_asset_volume_non_negative"}),
    ("negative trades", dict(number_of_trades=-1), {"number_of_trades_non_negative"}),
]


def test_row_rules_cover_the_contract():
    assert set(RULES) == {
        "low_non_negative", "low_within_open_close", "high_within_open_close", "volume_non_negative",
        "quote_asset_volume_non_negative", "taker_buy_base_asset_volume_non_negative",
        "taker_buy_quote_asset_volume_non_negative", "number_of_trades_non_negative",
        "taker_buy_base_within_volume",
    }
    assert RULES["low_within_open_close"].fields == ("low", "open", "close")
    assert RULES["taker_buy_base_within_volume"].fields == ("taker_buy_base_asset_volume", "volume")
    assert all(rule.message and rule.fields for rule in ROW_RULES)
    # The fields a rule reads are found from its check; a field that does not exist is refused at once.
    assert RowRule("x", "x", lambda r: r["close"] <= r["high"]).fields == ("close", "high")
    with pytest.raises(KeyError, match="not a kline field"):
        RowRule("typo", "typo", lambda r: r["volum"] >= 0)


@pytest.mark.parametrize(("label", "overrides", "broken"), CASES, ids=[c[0] for c in CASES])
def test_hook_and_schema_refuse_a_row_for_the_same_rules(label, overrides, broken):
    bad = row(1, **overrides)
    rows = [row(0), bad, row(2)]

    for check in (validate_klines, _validate_exact):  # the fast pass and the exact one
        checked = check(json.loads(json.dumps(rows)), "1h", START, START + 3 * HOUR_MS)
        assert {tuple(r) for r in checked.rows} == {tuple(r) for r in rows if r is not bad or not broken}
        rejected = {r.open_time: set(r.rules) for r in checked.rejected}
        assert rejected == ({bad[0]: broken} if broken else {})

    exact = {name: Decimal(bad[KLINE_FIELDS.index(name)]) if name in DECIMAL_FIELDS else bad[KLINE_FIELDS.index(name)]
             for name in KLINE_FIELDS if name != "ignore"}
    assert {rule.name for rule in broken_rules(exact)} == broken

    # The raw schema refuses exactly that row, for exactly those rules (the same messages).
    table = rows_to_table(rows)
    if not broken:
        validate_raw(table, "1h")
        return
    with pytest.raises(pa_schema.errors.SchemaErrors) as caught:
        raw_frame_schema("1h").validate(_grid_frame(table), lazy=True)
    cases = caught.value.failure_cases
    assert set(cases["index"]) == {1}
    assert set(cases["check"]) == {RULES[name].message for name in broken}


def test_the_schema_refuses_exactly_the_rows_the_hook_rejects_in_one_page():
    rows = [row(slot, **overrides) for slot, (_, overrides, _) in enumerate(CASES)]
    checked = validate_klines(json.loads(json.dumps(rows)), "1h", START, START + len(rows) * HOUR_MS)
    hook_verdict = {(r.open_time - START) // HOUR_MS: {RULES[name].message for name in r.rules}
                    for r in checked.rejected}
    assert hook_verdict == {slot: {RULES[name].message for name in broken}
                            for slot, (_, _, broken) in enumerate(CASES) if broken}
    assert len(checked.rows) + len(checked.rejected) == len(rows)

    with pytest.raises(pa_schema.errors.SchemaErrors) as caught:
        raw_frame_schema("1h").validate(_grid_frame(rows_to_table(rows)), lazy=True)
    cases = caught.value.failure_cases
    schema_verdict = {int(index): set(group["check"]) for index, group in cases.groupby("index")}
    assert schema_verdict == hook_verdict

    # What the hook keeps, the schema takes whole.
    validate_raw(rows_to_table(checked.rows), "1h")


def test_rules_work_on_scalars_and_on_pandas_columns_alike():
    rows = [row(slot, **overrides) for slot, (_, overrides, _) in enumerate(CASES)]
    frame = _grid_frame(rows_to_table(rows))
    for rule in ROW_RULES:
        column = rule.check(frame)
        assert isinstance(column, pd.Series)
        scalars = [rule.holds({name: Decimal(value) if name in DECIMAL_FIELDS else value
                               for name, value in zip(KLINE_FIELDS, r) if name != "ignore"}) for r in rows]
        assert column.tolist() == scalars, rule.name


def test_a_violation_finer_than_float_resolution_is_still_rejected():
    # Both strings round to the same float64: only the exact pass can tell them apart.
    volume, taker = "67108864.00000001", "67108864.00000002"
    assert float(volume) == float(taker) and Decimal(taker) > Decimal(volume)
    low, open_ = "67108864.00000002", "67108864.00000001"
    rows = [
        row(0, volume=volume, taker_buy_base_asset_volume=taker),
        row(1, open=open_, close=open_, high=low, low=low),
        row(2, open="0", close="0", high="0", low="-1E-400"),  # -1e-400 is -0.0 as a float
        row(3, volume=volume, taker_buy_base_asset_volume=volume),  # equal, and fine
    ]
    checked = validate_klines(rows, "1h", START, START + 4 * HOUR_MS)
    assert {r.open_time: r.rules for r in checked.rejected} == {
        rows[0][0]: ("taker_buy_base_within_volume",),
        rows[1][0]: ("low_within_open_close",),
        rows[2][0]: ("low_non_negative",),
    }
    assert checked.rows == [rows[3]]
    assert checked == _validate_exact(rows, "1h", START, START + 4 * HOUR_MS)


def test_rejected_row_names_its_slot_rules_and_values():
    bad = row(1, taker_buy_base_asset_volume="7.5", low="10.5")
    checked = validate_klines([row(0), bad], "1h", START, START + 2 * HOUR_MS)
    (rejected,) = checked.rejected
    assert isinstance(rejected, RejectedRow)
    assert rejected.open_time == bad[0] == START + HOUR_MS
    assert rejected.open_time_iso == "2023-11-15T00:00:00+00:00"
    assert rejected.row is bad
    assert rejected.rules == ("low_within_open_close", "taker_buy_base_within_volume")  # ROW_RULES order
    assert rejected.messages == ("low above open or close", "taker_buy_base_asset_volume above volume")
    values = rejected.values()
    assert values["taker_buy_base_asset_volume"] == "7.5" and values["low"] == "10.5"
    assert values["open_time"] == START + HOUR_MS and list(values) == list(KLINE_FIELDS)


def test_a_clean_page_comes_back_as_it_was():
    rows = [row(slot) for slot in range(5)]
    checked = validate_klines(rows, "1h", START, START + 5 * HOUR_MS)
    assert checked.rows is rows and checked.rejected == []
    assert validate_klines([], "1h", START, START + HOUR_MS) == ([], [])


WEEK_START = 1_700_438_400_000  # Monday 2023-11-20 00:00Z
MONTH_START = 1_698_796_800_000  # 2023-11-01 00:00Z


def _week(slot: int, **fields) -> list:
    open_time = WEEK_START + slot * 7 * 24 * HOUR_MS
    return row(open_time=open_time, close_time=open_time + 7 * 24 * HOUR_MS - 1, **fields)


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({"rows": []}, "expected a list of rows"),
        ([row(0)[:11]], "expected a list of 12 fields"),
        ([tuple(row(0))], "expected a list of 12 fields"),
        ([row(0, open_time=float(START))], "open_time"),
        ([row(0, number_of_trades=True)], "number_of_trades"),
        ([row(0, open=10.0)], "not a decimal string"),
        ([row(0, volume="12,5")], "not a decimal"),
        ([row(0, high="NaN")], "not finite"),
        ([row(0, high="Infinity", low="inf")], "not finite"),
        ([row(0, open_time=START + 1, close_time=START + HOUR_MS)], "not on the 1h grid"),
        ([row(0, close_time=START + HOUR_MS)], "close_time"),
        ([row(1), row(0)], "does not ascend"),
        ([row(0), row(0)], "does not ascend"),
        ([row(-1)], "before the window start"),
        ([row(3)], "at or after the window end"),
    ],
)
def test_a_structurally_malformed_body_raises(body, message):
    for check in (validate_klines, _validate_exact):
        with pytest.raises(KlineValidationError, match=message):
            check(body, "1h", START, START + 3 * HOUR_MS)


def test_more_rows_than_the_limit_is_malformed():
    with pytest.raises(KlineValidationError, match="more than limit=2"):
        validate_klines([row(0), row(1), row(2)], "1h", START, START + 3 * HOUR_MS, limit=2)


def test_week_and_month_grids():
    weeks = [_week(0), _week(1, low="99")]
    checked = validate_klines(weeks, "1w", WEEK_START, WEEK_START + 14 * 24 * HOUR_MS)
    assert checked.rows == weeks[:1] and [r.rules for r in checked.rejected] == [("low_within_open_close",)]
    with pytest.raises(KlineValidationError, match="not on the 1w grid"):
        validate_klines([row(open_time=START, close_time=START + 7 * 24 * HOUR_MS - 1)], "1w", START - 1, START + 1)

    december = 1_701_388_800_000  # 2023-12-01 00:00Z
    month = row(open_time=MONTH_START, close_time=december - 1)
    assert validate_klines([month], "1M", MONTH_START, december).rows == [month]
    with pytest.raises(KlineValidationError, match="close_time"):
        validate_klines([row(open_time=MONTH_START, close_time=MONTH_START + 31 * 24 * HOUR_MS - 1)],
                        "1M", MONTH_START, december)
