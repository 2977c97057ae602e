"""The fault matrix (issue 15): every row of ``tests/reliability/matrix.py`` run once, printed as a
markdown table with the date and the commit; exits 1 if any row breaks an invariant (lost,
duplicated or invented candles, self-caused 418s, requests sent while told to wait) or its own
expectation. The tests in ``tests/reliability`` assert the same rows through the same engine.

    PYTHONPATH=. .venv/bin/python bench/fault_matrix.py [--row ID ...] [--list] [-v]

Each row starts its own sandbox on a free 127.0.0.1 port and its own temporary data dirs; the whole
table takes about a minute. Pipeline logs are dropped unless ``-v`` (then on stderr).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))


def _commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO_ROOT, capture_output=True,
                              text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--row", action="append", metavar="ID", help="run only this row (repeatable)")
    parser.add_argument("--list", action="store_true", help="list the row ids and exit")
    parser.add_argument("-v", "--verbose", action="store_true", help="pipeline logs to stderr")
    args = parser.parse_args(argv)

    import structlog

    structlog.configure(logger_factory=structlog.PrintLoggerFactory(
        file=sys.stderr if args.verbose else open(os.devnull, "w")))
    from tests.reliability import matrix

    if args.list:
        for spec in matrix.ROWS:
            print(f"{spec.id:24} {spec.label}")
        return 0
    unknown = sorted(set(args.row or ()) - set(matrix.ROW_IDS))
    if unknown:
        parser.error(f"unknown row(s) {', '.join(unknown)}; see --list")

    started = time.monotonic()
    rows = matrix.run_rows(args.row)
    seconds = time.monotonic() - started
    print(f"Fault matrix — {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC — commit {_commit()} — "
          f"{len(rows)} rows in {seconds:.0f} s\n")
    print(f"Each row: {', '.join(matrix.INTERVALS)} over [{matrix.WINDOW[0]}, {matrix.WINDOW[1]}) of {matrix.SYMBOL} "
          "through a fresh sandbox with the fault on.\n")
    print(matrix.markdown(rows))
    print()
    for row in rows:
        notes = [*(f"not proven: {w}" for w, ok in row.proofs if not ok), *(f"failed: {w}" for w, ok in row.checks
                                                                             if not ok), *row.notes]
        if notes:
            print(f"- **{row.fault}**: " + "; ".join(notes))
    failed = [row.fault for row in rows if not row.ok]
    print(f"\n{len(rows) - len(failed)}/{len(rows)} rows hold every invariant and expectation"
          + (f"; failing: {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
