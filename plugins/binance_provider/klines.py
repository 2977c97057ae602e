"""What a Binance kline row is: its 12 fields, its structure, and the value rules it must keep.

The value rules (:data:`ROW_RULES`) are written once, here, and used in two places: the hook
checks every row it receives with them (exactly, on ``Decimal``), and the raw store's pandera
schema (``include/market_data/schema.py``) builds its row checks from them (on float64 columns).
So a row the hook passes is never refused when it is written.

Two kinds of bad rows, handled differently by :func:`validate_klines`:

- a **structurally** malformed body (not a list, a row that is not 12 fields, wrong types, a
  string that is not a finite decimal, an open time off the grid, not ascending or outside the
  window, a wrong ``close_time``) means the response itself is broken: it raises
  :class:`KlineValidationError`, and the hook retries the request;
- a well-formed row that breaks a **value** rule (e.g. ``low`` above ``open``) is what Binance
  really serves for that slot: retrying would fetch it again. It is left out of the rows and
  reported as a :class:`RejectedRow`; its slot stays a hole for the gap check.

Here too: a response's page of klines (:class:`KlinePage`, with its :class:`ResponseMeta`) and
the split of a window into requests (:func:`page_windows`).

No Airflow and no third-party imports: the raw schema imports this module too.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from decimal import Decimal, InvalidOperation
from itertools import combinations, compress, count, islice, repeat
from typing import Any, NamedTuple

from binance_provider.hooks.intervals import BINANCE_INTERVALS_MS, WEEK_ORIGIN_MS, grid_open, next_open

__all__ = [
    "DECIMAL_FIELDS",
    "KLINE_FIELDS",
    "KlineCheck",
    "KlinePage",
    "KlineValidationError",
    "MAX_KLINES_LIMIT",
    "ROW_RULES",
    "RejectedRow",
    "ResponseMeta",
    "RowRule",
    "broken_rules",
    "page_windows",
    "parse_decimal",
    "validate_klines",
]

MAX_KLINES_LIMIT = 1000
# Binance's field order of a ``/api/v3/klines`` row (and of the public archive's CSV files).
KLINE_FIELDS = (
    "open_time", "open", "high", "low", "close", "volume", "close_time", "quote_asset_volume",
    "number_of_trades", "taker_buy_base_asset_volume", "taker_buy_quote_asset_volume", "ignore",
)
DECIMAL_FIELDS = (
    "open", "high", "low", "close", "volume", "quote_asset_volume",
    "taker_buy_base_asset_volume", "taker_buy_quote_asset_volume",
)
INT_FIELDS = ("open_time", "close_time", "number_of_trades")
_POSITION = {name: index for index, name in enumerate(KLINE_FIELDS)}
_DECIMAL_POSITIONS = tuple(_POSITION[name] for name in DECIMAL_FIELDS)
_INT_POSITIONS = tuple(_POSITION[name] for name in INT_FIELDS)


class KlineValidationError(ValueError):
    """A kline response breaks Binance's contract (the hook treats it as a malformed body)."""


class _Column:
    """A column of floats or ints with element-wise comparisons and ``&``/``|`` (pure Python)."""

    __slots__ = ("values",)
    __hash__ = None  # type: ignore[assignment]  # __eq__ is element-wise

    def __init__(self, values: Any) -> None:
        self.values = values


def _elementwise(op: Callable[[Any, Any], Any]) -> Callable[[_Column, Any], _Column]:
    def method(self: _Column, other: Any) -> _Column:
        if type(other) is _Column:
            return _Column(list(map(op, self.values, other.values)))
        return _Column(list(map(op, self.values, repeat(other))))

    return method


for _name, _op in (("__le__", operator.le), ("__ge__", operator.ge), ("__lt__", operator.lt),
                   ("__gt__", operator.gt), ("__eq__", operator.eq), ("__ne__", operator.ne),
                   ("__and__", operator.and_), ("__rand__", operator.and_),
                   ("__or__", operator.or_), ("__ror__", operator.or_)):
    setattr(_Column, _name, _elementwise(_op))
del _name, _op


# -- the value rules -----------------------------------------------------------------------------


class _Recorder(dict):
    """A mapping that notes which fields a rule reads (see :class:`RowRule`)."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[str] = []

    def __missing__(self, key: str) -> _Column:
        if key not in KLINE_FIELDS:
            raise KeyError(f"{key!r} is not a kline field; expected one of {', '.join(KLINE_FIELDS)}")
        self.seen.append(key)
        return _Column([0])


@dataclass(frozen=True)
class RowRule:
    """One value rule of a kline row.

    ``check`` takes a mapping from field names to values and returns whether the rule holds.
    Write it with comparisons (``<=``, ``>=``, ``<``, ``>``, ``==``) between fields or with ``0``,
    combined with ``&`` and ``|`` (never ``and``/``or``/``not``/``~``): then the same function
    works on ``Decimal`` scalars (one row, exactly), on pandas/numpy columns (the raw schema) and
    on the hook's float columns. ``fields`` (the fields it reads) is found by running it once.
    """

    name: str
    message: str
    check: Callable[[Mapping[str, Any]], Any]
    fields: tuple[str, ...] = field(init=False)

    def __post_init__(self) -> None:
        recorder = _Recorder()
        self.check(recorder)
        object.__setattr__(self, "fields", tuple(dict.fromkeys(recorder.seen)))

    def holds(self, values: Mapping[str, Any]) -> bool:
        """Whether the rule holds for one row's values (scalars)."""
        return bool(self.check(values))


def _non_negative(name: str) -> RowRule:
    return RowRule(f"{name}_non_negative", f"{name} below 0", lambda r: r[name] >= 0)


ROW_RULES: tuple[RowRule, ...] = (
    RowRule("low_non_negative", "low below 0", lambda r: r["low"] >= 0),
    RowRule("low_within_open_close", "low above open or close",
            lambda r: (r["low"] <= r["open"]) & (r["low"] <= r["close"])),
    RowRule("high_within_open_close", "high below open or close",
            lambda r: (r["high"] >= r["open"]) & (r["high"] >= r["close"])),
    _non_negative("volume"),
    _non_negative("quote_asset_volume"),
    _non_negative("taker_buy_base_asset_volume"),
    _non_negative("taker_buy_quote_asset_volume"),
    _non_negative("number_of_trades"),
    RowRule("taker_buy_base_within_volume", "taker_buy_base_asset_volume above volume",
            lambda r: r["taker_buy_base_asset_volume"] <= r["volume"]),
)
_RULE_FIELDS = tuple(dict.fromkeys(name for rule in ROW_RULES for name in rule.fields))
_RULE_DECIMALS = tuple(name for name in _RULE_FIELDS if name in DECIMAL_FIELDS)
# Pairs of decimal fields some rule compares: where their floats tie, floats cannot order them.
_TIE_PAIRS = tuple(dict.fromkeys(
    pair
    for rule in ROW_RULES
    for pair in combinations([name for name in rule.fields if name in DECIMAL_FIELDS], 2)
))


def broken_rules(values: Mapping[str, Any]) -> tuple[RowRule, ...]:
    """The rules of :data:`ROW_RULES` one row's values (``Decimal``/``int`` scalars) break."""
    return tuple(rule for rule in ROW_RULES if not rule.holds(values))


@dataclass(frozen=True)
class RejectedRow:
    """A well-formed kline row that breaks value rules: left out of the page, its slot a hole."""

    open_time: int  # epoch ms
    row: list  # the 12 fields as Binance sent them
    rules: tuple[str, ...]  # names of the broken rules
    messages: tuple[str, ...]  # what each broken rule says

    @property
    def open_time_iso(self) -> str:
        return datetime.fromtimestamp(self.open_time / 1000, tz=timezone.utc).isoformat()

    def values(self) -> dict[str, Any]:
        """The row's fields by name (decimals as the strings Binance sent), for logs."""
        return dict(zip(KLINE_FIELDS, self.row))


# -- parsing helpers -----------------------------------------------------------------------------


def parse_decimal(value: Any, name: str, index: int) -> Decimal:
    """A finite decimal from a decimal string; :class:`KlineValidationError` naming row and field."""
    if type(value) is not str:
        raise KlineValidationError(f"row {index}: {name}={value!r} is not a decimal string")
    try:
        number = Decimal(value)
    except InvalidOperation:
        raise KlineValidationError(f"row {index}: {name}={value!r} is not a decimal") from None
    if not number.is_finite():
        raise KlineValidationError(f"row {index}: {name}={value!r} is not finite")
    return number


def _int(value: Any, name: str, index: int) -> int:
    if type(value) is not int:  # bool and float are not accepted
        raise KlineValidationError(f"row {index}: {name}={value!r} is not an integer")
    return value


def _exact_values(row: list, index: int) -> dict[str, Any]:
    """A 12-field row's times, trade count and decimals by name, exactly (``int`` and ``Decimal``)."""
    values: dict[str, Any] = {name: _int(row[position], name, index)
                              for position, name in zip(_INT_POSITIONS, INT_FIELDS)}
    for position, name in zip(_DECIMAL_POSITIONS, DECIMAL_FIELDS):
        values[name] = parse_decimal(row[position], name, index)
    return values


def _rejected(row: list, broken: tuple[RowRule, ...]) -> RejectedRow:
    return RejectedRow(
        open_time=row[0],
        row=row,
        rules=tuple(rule.name for rule in broken),
        messages=tuple(rule.message for rule in broken),
    )


class KlineCheck(NamedTuple):
    """A checked ``/api/v3/klines`` body: the rows kept (Binance's order) and those rejected."""

    rows: list[list]
    rejected: list[RejectedRow]


# -- validation: a fast pass on columns, exact checks where it has doubts ------------------------


class _Doubt(Exception):
    """The fast pass cannot vouch for the body's structure: run the exact pass."""


def validate_klines(rows: Any, interval: str, start_ms: int, end_ms: int,
                    limit: int = MAX_KLINES_LIMIT) -> KlineCheck:
    """Check a ``/api/v3/klines`` body for open times in ``[start_ms, end_ms)``.

    Raises :class:`KlineValidationError` when the body is structurally malformed (see the module
    docstring); rows that break a value rule of :data:`ROW_RULES` come back in ``rejected``.

    The fast pass checks the structure column by column and the rules on floats. Decimal to
    float is monotonic, so a rule that fails on floats fails exactly too, and one that holds on
    floats holds exactly unless two of its values tie as floats (or one rounds to 0) while their
    strings differ. Only rows with a failed rule or such a tie go through the exact ``Decimal``
    check; a body whose structure the fast pass doubts goes through :func:`_validate_exact`,
    which names the offending row.
    """
    if type(rows) is not list or len(rows) > limit:
        return _validate_exact(rows, interval, start_ms, end_ms, limit)
    if not rows:
        return KlineCheck(rows, [])
    try:
        suspects = _fast_suspects(rows, interval, start_ms, end_ms)
    except _Doubt:
        return _validate_exact(rows, interval, start_ms, end_ms, limit)
    if not suspects:
        return KlineCheck(rows, [])
    rejected: dict[int, RejectedRow] = {}
    for index in sorted(suspects):
        broken = broken_rules(_exact_values(rows[index], index))  # may raise: a non-finite decimal
        if broken:
            rejected[index] = _rejected(rows[index], broken)
    if not rejected:
        return KlineCheck(rows, [])
    kept = [row for index, row in enumerate(rows) if index not in rejected]
    return KlineCheck(kept, list(rejected.values()))


def _fast_suspects(rows: list, interval: str, start_ms: int, end_ms: int) -> set[int]:
    """Indices of rows whose value rules need the exact check; :class:`_Doubt` on structure."""
    if set(map(type, rows)) != {list} or set(map(len, rows)) != {len(KLINE_FIELDS)}:
        raise _Doubt
    columns = list(zip(*rows))
    for position in _INT_POSITIONS:
        if set(map(type, columns[position])) != {int}:
            raise _Doubt
    for position in _DECIMAL_POSITIONS:
        if set(map(type, columns[position])) != {str}:
            raise _Doubt
    opens, closes = columns[_POSITION["open_time"]], columns[_POSITION["close_time"]]
    if opens[0] < start_ms or opens[-1] >= end_ms or not all(map(operator.lt, opens, islice(opens, 1, None))):
        raise _Doubt
    step = BINANCE_INTERVALS_MS.get(interval)
    if step is not None:
        origin = WEEK_ORIGIN_MS if interval == "1w" else 0
        if any(map(step.__rmod__, map((-origin).__add__, opens))):  # (open - origin) % step
            raise _Doubt
        if not all(map(operator.eq, closes, map((step - 1).__add__, opens))):
            raise _Doubt
    else:  # calendar months
        for open_time, close_time in zip(opens, closes):
            if grid_open(open_time, interval) != open_time or close_time != next_open(open_time, interval) - 1:
                raise _Doubt

    texts = {name: columns[_POSITION[name]] for name in DECIMAL_FIELDS}
    floats: dict[str, list[float]] = {}
    for name, column in texts.items():
        try:
            values = list(map(float, column))
        except ValueError:
            raise _Doubt from None
        if not math.isfinite(sum(values)):  # inf or nan (or an overflowing sum): let Decimal judge
            raise _Doubt
        floats[name] = values
    view = {name: _Column(floats[name] if name in floats else columns[_POSITION[name]]) for name in _RULE_FIELDS}

    suspects: set[int] = set()
    for rule in ROW_RULES:
        holds = rule.check(view).values
        if not all(holds):
            suspects.update(compress(count(), map(operator.not_, holds)))
    for first, second in _TIE_PAIRS:
        first_texts, second_texts = texts[first], texts[second]
        for index in compress(count(), map(operator.eq, floats[first], floats[second])):
            if first_texts[index] != second_texts[index]:
                suspects.add(index)
    for name in _RULE_DECIMALS:
        values = floats[name]
        if 0.0 in values:  # a tiny non-zero decimal can round to 0.0 (or -0.0)
            column = texts[name]
            suspects.update(index for index in compress(count(), map(operator.not_, values))
                            if column[index].strip("+-0."))
    return suspects


def _validate_exact(rows: Any, interval: str, start_ms: int, end_ms: int,
                    limit: int = MAX_KLINES_LIMIT) -> KlineCheck:
    """:func:`validate_klines`, row by row with ``Decimal``; raises naming the first malformed row.

    Each row has 12 fields; times and trade counts are ints; prices and volumes are finite
    decimal strings (read as ``Decimal``, never float); ``open_time`` is on the interval's grid
    inside ``[start_ms, end_ms)``, ``close_time`` is one millisecond before the next open, and
    open times strictly ascend. Rows that break a value rule are rejected.
    """
    if type(rows) is not list:
        raise KlineValidationError(f"klines body is {type(rows).__name__}, expected a list of rows")
    if len(rows) > limit:
        raise KlineValidationError(f"klines body has {len(rows)} rows, more than limit={limit}")
    kept: list[list] = []
    rejected: list[RejectedRow] = []
    previous_open = start_ms - 1
    for index, row in enumerate(rows):
        if type(row) is not list or len(row) != len(KLINE_FIELDS):
            raise KlineValidationError(f"row {index}: expected a list of {len(KLINE_FIELDS)} fields, got {row!r:.200}")
        values = _exact_values(row, index)
        open_time, close_time = values["open_time"], values["close_time"]
        if open_time <= previous_open:
            if open_time < start_ms:
                raise KlineValidationError(f"row {index}: open_time {open_time} before the window start {start_ms}")
            raise KlineValidationError(f"row {index}: open_time {open_time} does not ascend (after {previous_open})")
        if open_time >= end_ms:
            raise KlineValidationError(f"row {index}: open_time {open_time} at or after the window end {end_ms}")
        previous_open = open_time
        if grid_open(open_time, interval) != open_time:
            raise KlineValidationError(f"row {index}: open_time {open_time} is not on the {interval} grid")
        expected_close = next_open(open_time, interval) - 1
        if close_time != expected_close:
            raise KlineValidationError(
                f"row {index}: close_time {close_time} != open_time + {interval} - 1 ms ({expected_close})"
            )
        broken = broken_rules(values)
        if broken:
            rejected.append(_rejected(row, broken))
        else:
            kept.append(row)
    return KlineCheck(kept, rejected)


# -- pages: what one klines request answers, and how a window is split into requests ----------
@dataclass(frozen=True)
class ResponseMeta:
    """Provenance of one successful response."""

    source: str  # base URL
    endpoint: str  # e.g. /api/v3/klines
    latency_ms: float
    fetched_at: str  # ISO-8601 UTC
    used_weight: int | None  # X-MBX-USED-WEIGHT-1M
    status: int
    retries: int


@dataclass(frozen=True)
class KlinePage:
    """Closed candles of one request for the half-open window ``[start_ms, end_ms)`` on open_time."""

    symbol: str
    interval: str
    start_ms: int
    end_ms: int
    rows: list[list]  # 12-field rows as Binance sent them
    meta: ResponseMeta
    dropped_open: int  # candles still open at fetch time, left out of ``rows``
    # Well-formed rows that break a value rule (binance_provider.klines.ROW_RULES): left out of
    # ``rows`` and not retried (Binance would serve them again); their slots stay holes.
    rejected: list[RejectedRow] = field(default_factory=list)


def page_windows(start_ms: int, end_ms: int, interval: str, page_size: int = MAX_KLINES_LIMIT) -> Iterator[tuple[int, int]]:
    """Split ``[start_ms, end_ms)`` into consecutive windows of at most ``page_size`` grid slots.

    Boundaries after the first fall on the interval's grid; windows holding no grid slot are
    skipped, so every window yields one request that can be answered in full.
    """
    first_open = grid_open(start_ms, interval)
    if first_open < start_ms:
        first_open = next_open(first_open, interval)
    window_start = start_ms
    boundary = first_open
    while boundary < end_ms:
        boundary = next_open(boundary, interval, page_size)
        window_end = min(boundary, end_ms)
        yield window_start, window_end
        window_start = window_end
