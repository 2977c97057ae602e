"""Backtest of the daily signal rule on sandbox data (honest figures, no tuning).

For each UTC day D in ``[start, end)`` the rule (``signal_rule.compute_signal``) runs at the
recommendation time (12:00 UTC) on the curated 1d/4h/1h candles closed before it, after the
same freshness check as ``DataSignal`` (a lagging timeframe gives a ``stale`` day, no trade).
A long or short is then walked over the 1h candles opening at or after 12:00 D, for
``--horizon-days``: the first candle whose range reaches the stop or the target ends the
trade (a candle reaching both counts as the stop: conservative); otherwise it exits at the
last close of the horizon. Outcome in R: ``(exit - entry) / (entry - stop)``, which is signed
for the side (a short's entry - stop is negative).

Data: a seeded synthetic Binance sandbox in this process, ingested and curated into temp
directories through the pipeline's own ``DataIngestion`` and ``DataCuration``.

    .venv/bin/python bench/signal_backtest.py [--start 2023-01-01] [--end 2024-01-01] [--horizon-days 5] [--seed 42]
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import tempfile
import time
from collections import Counter
from datetime import UTC, date, datetime, timedelta
from pathlib import Path

import numpy as np

REPO_ROOT = Path(__file__).resolve().parents[1]
for _path in (REPO_ROOT, REPO_ROOT / "plugins"):  # `make bench` runs the script without PYTHONPATH
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

SYMBOL = "BTCUSDT"
DAILY_LEAD_DAYS = 80  # 1d history before the range: SMA50 plus the read margin
INTRADAY_LEAD_DAYS = 10  # 4h and 1h history before the range (1h: 120 candles + margin)
TAIL_DAYS = 10  # candles after the range end, for the last trades' horizons
HOUR_MS = 3_600_000


def evaluate_trade(side: int, entry: float, stop: float, target: float,
                   opens, highs, lows, closes) -> dict:
    """Walk one trade over consecutive candles (arrays in time order, first = first candle after entry).

    ``side`` is +1 long, -1 short. The first candle whose range reaches the stop or the target
    ends the trade; one reaching both is a stop (we cannot know which came first). A candle
    opening beyond the stop (a gap) fills at its open, not at the better stop price; a gap
    beyond the target fills at the target. Without either, the trade exits at the last close.
    Returns ``{"outcome": "target"|"stop"|"timeout", "exit", "r", "bars"}`` with
    ``r = (exit - entry) / (entry - stop)``; ``ValueError`` when the stop or the target is not on
    its side of the entry, or there is no candle.
    """
    if side not in (1, -1):
        raise ValueError(f"side must be +1 or -1, not {side!r}")
    if not side * (entry - stop) > 0:
        raise ValueError(f"stop {stop} is not on the losing side of entry {entry} for side {side:+d}")
    if not side * (target - entry) > 0:
        raise ValueError(f"target {target} is not on the winning side of entry {entry} for side {side:+d}")
    if len(closes) == 0:
        raise ValueError("no candle to walk")
    risk = entry - stop
    for i, (o, h, lo) in enumerate(zip(opens, highs, lows)):
        adverse, favourable = (lo, h) if side == 1 else (h, lo)
        if side * (adverse - stop) <= 0:  # the stop was reached (or gapped through)
            exit_price = o if side * (o - stop) < 0 else stop
            return {"outcome": "stop", "exit": float(exit_price), "r": (exit_price - entry) / risk, "bars": i + 1}
        if side * (favourable - target) >= 0:
            return {"outcome": "target", "exit": float(target), "r": (target - entry) / risk, "bars": i + 1}
    exit_price = float(closes[-1])
    return {"outcome": "timeout", "exit": exit_price, "r": (exit_price - entry) / risk, "bars": len(closes)}


def _configure_env(url: str, root: Path) -> None:
    """Point the pipeline at the sandbox and temp dirs (before include.market_data is imported)."""
    for name in ("RAW_DATA_DIR", "CURATED_DATA_DIR", "SIGNAL_DATA_DIR"):
        path = root / name.split("_")[0].lower()
        path.mkdir()
        os.environ[name] = str(path)
    os.environ["AIRFLOW_CONN_BINANCE_DEFAULT"] = f'{{"conn_type":"http","host":"{url}"}}'
    os.environ["BINANCE_SYMBOLS"] = SYMBOL
    # The per-request and per-step INFO lines would drown the report; warnings still show.
    os.environ.setdefault("LOG_LEVEL", "WARNING")
    os.environ.setdefault("AIRFLOW__LOGGING__LOGGING_LEVEL", "WARNING")


def _prepare_data(start: date, end: date, horizon_days: int) -> tuple:
    """Ingest and curate 1d/4h/1h around ``[start, end)``; returns (settings, curated frames read once)."""
    from include.market_data.config import load_settings
    from include.market_data.curation import DataCuration
    from include.market_data.ingestion import DataIngestion

    settings = load_settings()
    ingestion, curation = DataIngestion(settings), DataCuration(settings)
    tail_end = end + timedelta(days=max(TAIL_DAYS, horizon_days + 1))
    frames = {}
    for interval, lead in (("1d", DAILY_LEAD_DAYS), ("4h", INTRADAY_LEAD_DAYS), ("1h", INTRADAY_LEAD_DAYS)):
        first = start - timedelta(days=lead)
        ingestion.ingest(interval, first, tail_end, SYMBOL, source="rest")
        curation.curate_timeframe(interval, SYMBOL)
        frames[interval] = curation.read(interval, SYMBOL, first, tail_end)
    return settings, frames


def _open_ms(frame) -> np.ndarray:
    import pandas as pd

    times = pd.DatetimeIndex(pd.to_datetime(frame["open_time"], utc=True))
    return times.as_unit("ms").asi8


def _fmt(value: float | None, spec: str = "+.3f") -> str:
    return "n/a" if value is None or not math.isfinite(value) else format(value, spec)


def run(start: date, end: date, horizon_days: int) -> dict:
    """The backtest on the curated frames now in the configured dirs (see :func:`main`)."""
    import pandas as pd

    from include.market_data.signal import READ_MARGIN, TimeframeFreshness
    from include.market_data.signal_rule import (
        HISTORY_NEEDED,
        SIGNAL_INTERVALS,
        compute_signal,
    )
    from include.market_data.timeframes import floor_to_grid, interval_ms

    settings, frames = _prepare_data(start, end, horizon_days)
    opens_ms = {interval: _open_ms(frames[interval]) for interval in SIGNAL_INTERVALS}
    close_ts = {interval: pd.to_datetime(frames[interval]["close_time"], utc=True) for interval in SIGNAL_INTERVALS}
    hourly = frames["1h"]
    h_open = hourly["open"].to_numpy(dtype="float64")
    h_high = hourly["high"].to_numpy(dtype="float64")
    h_low = hourly["low"].to_numpy(dtype="float64")
    h_close = hourly["close"].to_numpy(dtype="float64")

    counts: Counter = Counter()
    trades: list[dict] = []
    anomalies: list[str] = []
    day = start
    while day < end:
        cutoff = int(datetime(day.year, day.month, day.day, settings.recommendation_hour,
                              settings.recommendation_minute, tzinfo=UTC).timestamp() * 1000)
        cutoff_ts = pd.Timestamp(cutoff, unit="ms", tz="UTC")
        # DataSignal._load on the in-memory frames: the same read window, the same freshness.
        day_frames, fresh = {}, True
        for interval in SIGNAL_INTERVALS:
            step = interval_ms(interval)
            window_end = floor_to_grid(cutoff, interval)
            window_start = window_end - (HISTORY_NEEDED[interval] + READ_MARGIN[interval]) * step
            lo, hi = np.searchsorted(opens_ms[interval], [window_start, window_end])
            rows = frames[interval].iloc[lo:hi]
            rows = rows[(close_ts[interval].iloc[lo:hi] < cutoff_ts).to_numpy()]
            newest = int(opens_ms[interval][lo:hi][-1]) if len(rows) else None
            check = TimeframeFreshness(interval, window_end - step, newest, len(rows), HISTORY_NEEDED[interval])
            fresh = fresh and check.fresh
            day_frames[interval] = rows
        counts["days"] += 1
        if not fresh:
            counts["stale"] += 1
            day += timedelta(days=1)
            continue
        try:
            signal = compute_signal(day_frames, symbol=SYMBOL, cutoff=cutoff)
        except ValueError as exc:
            counts["error"] += 1
            anomalies.append(f"{day}: compute_signal raised {exc}")
            day += timedelta(days=1)
            continue
        direction = signal["direction"]
        counts[direction] += 1
        confidence = signal["confidence"]
        if confidence is None or not 0.0 <= confidence <= 1.0:
            anomalies.append(f"{day}: confidence {confidence!r}")
        if direction == "flat":
            day += timedelta(days=1)
            continue
        side = 1 if direction == "long" else -1
        entry, stop, target = signal["entry"], signal["stop_loss"], signal["take_profit"]
        if any(v is None or not math.isfinite(v) for v in (entry, stop, target)):
            anomalies.append(f"{day}: {direction} with entry/stop/target {entry}/{stop}/{target}")
            counts["unevaluated"] += 1
            day += timedelta(days=1)
            continue
        reward_risk = (target - entry) / (entry - stop) if entry != stop else float("nan")
        if not 1.5 - 1e-6 <= reward_risk <= 3.0 + 1e-6:
            anomalies.append(f"{day}: {direction} reward/risk {reward_risk:.3f} outside [1.5, 3]")
        lo, hi = np.searchsorted(opens_ms["1h"], [cutoff, cutoff + horizon_days * 24 * HOUR_MS])
        if hi - lo < horizon_days * 24:
            counts["short_horizon"] += 1  # holes in the 1h series (or the data ends): fewer candles walked
        try:
            result = evaluate_trade(side, entry, stop, target, h_open[lo:hi], h_high[lo:hi], h_low[lo:hi], h_close[lo:hi])
        except ValueError as exc:
            anomalies.append(f"{day}: {direction} not evaluated: {exc}")
            counts["unevaluated"] += 1
            day += timedelta(days=1)
            continue
        trades.append({"day": day, "direction": direction, "confidence": confidence,
                       "risk_pct": 100 * abs(entry - stop) / entry, **result})
        day += timedelta(days=1)
    at = f"{settings.recommendation_hour:02d}:{settings.recommendation_minute:02d}"
    return {"counts": counts, "trades": trades, "anomalies": anomalies, "at": at}


def report(result: dict, args, seconds: float) -> None:
    counts, trades = result["counts"], result["trades"]
    r = [t["r"] for t in trades]
    n = len(trades)
    outcomes = Counter(t["outcome"] for t in trades)
    winners = [t["confidence"] for t in trades if t["r"] > 0]
    losers = [t["confidence"] for t in trades if t["r"] <= 0]

    def share(k: str) -> str:
        return f"{100 * outcomes[k] / n:5.1f}% ({outcomes[k]})" if n else "n/a"

    def mean(values) -> float | None:
        return statistics.fmean(values) if values else None

    print(f"signal backtest {SYMBOL} {args.start}..{args.end} (end exclusive), signal at {result['at']} UTC, "
          f"horizon {args.horizon_days} d of 1h candles, sandbox seed {args.seed}")
    print(f"days            {counts['days']}")
    print(f"signals         long {counts['long']}  short {counts['short']}  flat {counts['flat']}  "
          f"stale {counts['stale']}" + (f"  error {counts['error']}" if counts["error"] else ""))
    print(f"trades          {n}" + (f"  (unevaluated {counts['unevaluated']})" if counts["unevaluated"] else "")
          + (f"  (short horizon {counts['short_horizon']})" if counts["short_horizon"] else ""))
    print(f"hit rate        {share('target')}   (target reached)")
    print(f"stop rate       {share('stop')}")
    print(f"timeout rate    {share('timeout')}")
    print(f"R               avg {_fmt(mean(r))}  median {_fmt(statistics.median(r) if r else None)}  "
          f"total {_fmt(sum(r) if r else None, '+.2f')}")
    for direction in ("long", "short"):
        side = [t for t in trades if t["direction"] == direction]
        if side:
            hits = sum(t["outcome"] == "target" for t in side)
            print(f"  {direction:<5}         n {len(side)}  hit {100 * hits / len(side):.1f}%  "
                  f"avg R {_fmt(mean([t['r'] for t in side]))}  total R {_fmt(sum(t['r'] for t in side), '+.2f')}")
    if trades:
        print(f"risk (stop)     median {statistics.median(t['risk_pct'] for t in trades):.2f}% of entry; "
              f"median bars held {statistics.median(t['bars'] for t in trades):g} h")
    print(f"confidence      winners (R>0) {_fmt(mean(winners), '.3f')} (n {len(winners)})  "
          f"losers (R<=0) {_fmt(mean(losers), '.3f')} (n {len(losers)})")
    anomalies = result["anomalies"]
    print(f"rule anomalies  {len(anomalies)}")
    for line in anomalies[:10]:
        print(f"  {line}")
    print(f"wall time       {seconds:.1f} s")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--start", type=date.fromisoformat, default=date(2023, 1, 1), help="first day (UTC)")
    parser.add_argument("--end", type=date.fromisoformat, default=date(2024, 1, 1), help="day after the last (UTC)")
    parser.add_argument("--horizon-days", type=int, default=5, help="days a trade may stay open")
    parser.add_argument("--seed", type=int, default=42, help="seed of the sandbox's synthetic market")
    args = parser.parse_args(argv)
    if args.start >= args.end:
        parser.error("--start must be before --end")
    if args.horizon_days < 1:
        parser.error("--horizon-days must be >= 1")
    tail = datetime(args.end.year, args.end.month, args.end.day, tzinfo=UTC) + timedelta(
        days=max(TAIL_DAYS, args.horizon_days + 1))
    if tail > datetime.now(UTC):
        parser.error(f"--end {args.end} leaves no room for the horizon: candles up to {tail.date()} must be closed")

    began = time.perf_counter()
    from include.binance_sandbox import SandboxServer

    with tempfile.TemporaryDirectory(prefix="signal_backtest_") as tmp, \
            SandboxServer(host="127.0.0.1", port=0, seed=args.seed) as sandbox:
        _configure_env(sandbox.url, Path(tmp))
        result = run(args.start, args.end, args.horizon_days)
    report(result, args, time.perf_counter() - began)
    return 0


if __name__ == "__main__":
    sys.exit(main())
