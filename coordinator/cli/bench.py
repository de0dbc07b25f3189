"""`edgeftl bench`: run the benchmarks in tools/, then summarise them in docs/BENCHMARKS.md."""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

from edgeftl.coordinator.cli._common import csv_list, fail


def add_parser(sub: argparse._SubParsersAction) -> None:
    from edgeftl.coordinator.report.bench import BENCHMARKS

    p = sub.add_parser("bench", help="run the benchmarks and refresh docs/BENCHMARKS.md", description=__doc__)
    p.add_argument("--quick", action="store_true", help="small settings: a few minutes in all")
    p.add_argument("--only", type=csv_list, default=tuple(BENCHMARKS),
                   help=f"comma-separated subset of {','.join(BENCHMARKS)}")
    p.add_argument("--dry-run", action="store_true", help="print the commands; run and write nothing")
    p.add_argument("--root", type=Path, default=None, help="source checkout holding tools/ and docs/")


def run(args: argparse.Namespace) -> int:
    from edgeftl.coordinator.report import bench

    unknown = [n for n in args.only if n not in bench.BENCHMARKS]
    if unknown or not args.only:
        return fail(f"--only {','.join(args.only)!r}: accepted names are {', '.join(bench.BENCHMARKS)}")
    root = args.root or _checkout()
    if root is None or not (root / "tools").is_dir():
        return fail(f"no tools/ folder in {root or Path.cwd()}: run edgeftl bench in a source checkout or give --root")
    names = list(dict.fromkeys(args.only))
    if args.dry_run:
        for name, command in bench.commands(root, names, args.quick).items():
            print(f"{name}: " + (f"(cd {shlex.quote(str(root))} && {shlex.join(command)})" if command
                                 else f"skipped: tools/{bench.BENCHMARKS[name].script} not found"))
        return 0
    outcomes = bench.run_all(root, names, args.quick)
    summary, table = bench.summarise(root, outcomes, args.quick, bench.machine())
    doc = bench.write_docs(root, summary, table)
    print(table)
    print(f"wrote {root / 'docs' / 'bench_summary.json'} and the header of {doc}", file=sys.stderr)
    return 1 if any(o.exit_code for o in outcomes) else 0


def _checkout() -> Path | None:
    """The source checkout this edgeftl runs from (editable install), else the working directory."""
    import edgeftl.coordinator

    for candidate in (Path(edgeftl.coordinator.__file__).resolve().parents[1], Path.cwd()):
        if (candidate / "tools").is_dir():
            return candidate
    return None
