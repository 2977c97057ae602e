"""CLI: ``python -m include.binance_sandbox --port 8900 [--replay PATH] [--seed N] ...``

Besides /api/v3, the server answers Binance's public data archive layout (see ``archive.py``):
``/data/spot/{monthly,daily}/klines/<S>/<iv>/<S>-<iv>-<YYYY-MM[-DD]>.zip[.CHECKSUM]``.
"""

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


def _archive_spec(text: str):
    """TARGET[:TIMES[:MODE]] -> the archive fault spec {"file", "times"(, "mode")}."""
    target, _, rest = text.partition(":")
    times, _, mode = rest.partition(":")
    spec = {"file": target}
    if times:
        try:
            spec["times"] = int(times)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r}: TIMES must be an integer") from None
    if mode:
        spec["mode"] = mode
    return spec


def _time(text: str) -> int:
    try:
        return parse_time(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--now {text!r}: expected ms since the epoch or ISO-8601") from None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m include.binance_sandbox",
        description="Local Binance-spot-compatible REST server (synthetic or replayed klines, fault injection). "
                    "It also serves the public data archive's layout (data.binance.vision): "
                    "/data/spot/monthly/klines/<S>/<iv>/<S>-<iv>-<YYYY-MM>.zip and "
                    "/data/spot/daily/klines/<S>/<iv>/<S>-<iv>-<YYYY-MM-DD>.zip, each with .CHECKSUM, "
                    "from the same market (times in µs for periods from 2025-01-01); no REST weight.",
        epilog="Archive fault TARGET: a file name (BTCUSDT-15m-2024-03.zip), a month (2024-03: every monthly "
               "file of it) or a day (2024-03-05: every daily file of it); ':TIMES' limits the fault to the "
               "first TIMES downloads of each matching file (a zip and its CHECKSUM count as one), else always. "
               'At runtime: POST /sandbox/faults {"archive_missing": ["2024-03"], '
               '"archive_corrupt": [{"file": "BTCUSDT-1h-2024-05.zip", "times": 1, "mode": "garble"}], '
               '"archive_wrong_checksum": [...], "archive_header": true | [...], '
               '"archive_unpublished_after": "2026-09", "archive_publish_delay_s": 3600}; '
               "DELETE /sandbox/faults resets. Counters: GET /sandbox/stats (archive_requests, archive_by_kind, "
               "archive_by_status, archive_bytes; the REST counters and weight never include archive requests).",
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
    parser.add_argument("--archive-cache-mb", type=float, default=128,
                        help="memory for generated archive zips (a month of 15m is ~190 kB)")
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
    archive = parser.add_argument_group("archive faults (also settable at runtime: POST /sandbox/faults)")
    archive.add_argument("--archive-missing", type=_archive_spec, action="append", metavar="TARGET[:TIMES]",
                         help="answer 404 for the file(s)")
    archive.add_argument("--archive-wrong-checksum", type=_archive_spec, action="append",
                         metavar="TARGET[:TIMES]", help="serve a wrong sha256 in the CHECKSUM")
    archive.add_argument("--archive-corrupt", type=_archive_spec, action="append",
                         metavar="TARGET[:TIMES[:truncate|garble]]",
                         help="serve a damaged zip (its CHECKSUM matches the damaged bytes)")
    archive.add_argument("--archive-header", type=_archive_spec, action="append", nargs="?", const=True,
                         metavar="TARGET[:TIMES]", help="put a CSV header line first (no TARGET: every file)")
    archive.add_argument("--archive-unpublished-after", metavar="YYYY-MM",
                         help="monthly files of later months answer 404 even when the month is over")
    archive.add_argument("--archive-publish-delay-s", type=float, metavar="SECONDS",
                         help="files appear this long after their period is over (default 0)")
    parser.add_argument("-v", "--verbose", action="store_true", help="log one line per request to stderr")
    return parser


def faults_from_args(args) -> dict:
    """The fault settings the flags ask for (the shape POST /sandbox/faults takes)."""
    names = ("latency_ms", "jitter_ms", "error_rate", "hang_rate", "hang_s", "truncate_rate", "garbage_rate")
    faults = {name: getattr(args, name) for name in names if getattr(args, name) is not None}
    if args.outage:
        faults["outages"] = args.outage
    for name in ("archive_missing", "archive_wrong_checksum", "archive_corrupt"):
        if getattr(args, name):
            faults[name] = getattr(args, name)
    if args.archive_header:
        faults["archive_header"] = True if True in args.archive_header else args.archive_header
    for name in ("archive_unpublished_after", "archive_publish_delay_s"):
        if getattr(args, name) is not None:
            faults[name] = getattr(args, name)
    return faults


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    faults = faults_from_args(args)
    try:
        server = SandboxServer(
            host=args.host, port=args.port, seed=args.seed,
            symbols=tuple(s.strip().upper() for s in args.symbols.split(",") if s.strip()),
            replay=args.replay, weight_limit=args.weight_limit, window_s=args.window_s,
            ban_s=args.ban_s, now_ms=args.now, faults=faults, fault_seed=args.fault_seed,
            verbose=args.verbose, cache_days=args.cache_days, archive_cache_mb=args.archive_cache_mb,
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
