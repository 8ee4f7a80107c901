"""`ava-report RUN_DIR [RUN_DIR ...] [--out FILE.html] [--log-scale]`: one self-contained page."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional

from ava.observe.report.build import REPORT_FILE, default_out, write_runs
from ava.observe.report.records import ReportError
from ava.observe.report.runs import load_runs


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        prog="ava-report", description="Draw a training run (or several, overlaid) as one HTML page "
        "that opens offline: loss with incidents, LR, gradient norm, throughput, memory, experts.")
    parser.add_argument("run_dirs", nargs="+", type=Path, metavar="RUN_DIR",
                        help="a run directory, or a Hydra sweep directory (multirun/...): its runs overlay")
    parser.add_argument("--out", type=Path, default=None,
                        help=f"the page to write (default: RUN_DIR/{REPORT_FILE} for one directory, "
                             f"./{REPORT_FILE} for several)")
    parser.add_argument("--log-scale", action="store_true", help="loss and gradient norm on a log scale")
    args = parser.parse_args(argv)
    try:
        runs = load_runs(args.run_dirs)
        for run in runs:  # unreadable lines: one warning per file, then the page
            for path in sorted({b.path for b in run.bad_lines}):
                lines = [b for b in run.bad_lines if b.path == path]
                print(f"ava-report: warning: {path}: {len(lines)} unreadable line(s) skipped "
                      f"(first: line {lines[0].line}: {lines[0].reason})", file=sys.stderr)
        out = write_runs(runs, args.out or default_out(args.run_dirs), log_scale=args.log_scale)
    except (ReportError, OSError) as err:
        print(f"ava-report: error: {err}", file=sys.stderr)
        return 2
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
