"""`edgeftl report`: an HTML report (plots + tables) of one run folder, or several overlaid."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from edgeftl.device.cli.common import fail


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("runs", nargs="+", type=Path, metavar="RUN_DIR", help="folder with metrics.jsonl")
    p.add_argument("--out", type=Path, default=None,
                   help="HTML file (default: RUN_DIR/report.html; several runs: first RUN_DIR/report-compare.html)")
    p.add_argument("--budget-mib", type=float, default=None, help="device memory budget drawn on the memory plot")


def run(args: argparse.Namespace) -> int:
    from edgeftl.coordinator.report import ReportError, write_report

    try:
        report = write_report(args.runs, args.out, args.budget_mib)
    except ReportError as exc:
        return fail(str(exc))
    for warning in report.warnings:
        print(f"edgeftl: warning: {warning}", file=sys.stderr)
    print(report.html)
    return 0
