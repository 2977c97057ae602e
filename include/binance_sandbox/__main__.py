"""CLI: ``python -m include.binance_sandbox --port 8900 [--replay PATH] [--seed N] ...``"""

from __future__ import annotations

import argparse
import sys

from .faults import FaultError, parse_outage
from .intervals import parse_time
from .server import SandboxServer


def _outage(text: str) -> dict:
    """START,END[,SYMBOL] with times in ms or ISO-8601."""
    parts = [p.strip() for p in text.split(",")]
    if len(parts) not in (2, 3):
        raise argparse.ArgumentTypeError(f"--outage {text!r}: expected START,END[,SYMBOL]")
    spec = {"start": parts[0], "end": parts[1]}
    if len(parts) == 3:
        spec["symbol"] = parts[2]
    try:
        parse_outage(spec)
    except FaultError as exc:
        raise argparse.ArgumentTypeError(f"--outage: {exc}") from None
    return spec


def _time(text: str) -> int:
    try:
        return parse_time(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--now {text!r}: expected ms since the epoch or ISO-8601") from None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m include.binance_sandbox",
        description="Local Binance-spot-compatible REST server (synthetic or replayed klines, fault injection).",
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8900)
    parser.add_argument("--seed", type=int, default=42, help="seed of the synthetic market")
    parser.add_argument("--symbols", default="BTCUSDT,ETHUSDT", help="comma list of synthetic symbols")
    parser.add_argument("--replay", help="archive CSV/zip file or directory, or a raw Parquet directory")
    parser.add_argument("--now", type=_time, help="freeze the market clock (ms or ISO-8601)")
    parser.add_argument("--weight-limit", type=int, default=6000)
    parser.add_argument("--window-s", type=float, default=60.0)
    parser.add_argument("--ban-s", type=float, default=120.0)
    parser.add_argument("--cache-days", type=int, default=384,
                        help="days of synthetic 1m data kept in memory (~104 kB each)")
    faults = parser.add_argument_group("faults (also settable at runtime: POST /sandbox/faults)")
    faults.add_argument("--latency-ms", type=float)
    faults.add_argument("--jitter-ms", type=float)
    faults.add_argument("--error-rate", type=float)
    faults.add_argument("--hang-rate", type=float)
    faults.add_argument("--hang-s", type=float)
    faults.add_argument("--truncate-rate", type=float)
    faults.add_argument("--garbage-rate", type=float)
    faults.add_argument("--outage", type=_outage, action="append", metavar="START,END[,SYMBOL]")
    faults.add_argument("--fault-seed", type=int, default=0)
    parser.add_argument("-v", "--verbose", action="store_true", help="log one line per request to stderr")
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    names = ("latency_ms", "jitter_ms", "error_rate", "hang_rate", "hang_s", "truncate_rate", "garbage_rate")
    faults = {name: getattr(args, name) for name in names if getattr(args, name) is not None}
    if args.outage:
        faults["outages"] = args.outage
    try:
        server = SandboxServer(
            host=args.host, port=args.port, seed=args.seed,
            symbols=tuple(s.strip().upper() for s in args.symbols.split(",") if s.strip()),
            replay=args.replay, weight_limit=args.weight_limit, window_s=args.window_s,
            ban_s=args.ban_s, now_ms=args.now, faults=faults, fault_seed=args.fault_seed,
            verbose=args.verbose, cache_days=args.cache_days,
        )
    except (FaultError, ValueError, OSError) as exc:
        print(f"binance sandbox: {exc}", file=sys.stderr)
        return 2
    server.start()
    print(f"binance sandbox serving {', '.join(server.market.symbols)} on {server.url}", file=sys.stderr)
    server.serve_forever()
    return 0


if __name__ == "__main__":
    sys.exit(main())
