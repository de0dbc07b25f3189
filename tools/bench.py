#!/usr/bin/env python3
"""Run the benchmarks in tools/, then summarise them in docs/BENCHMARKS.md (`make bench`).

    python tools/bench.py --quick                 # a few minutes in all
    python tools/bench.py --only device,coordinator

A checkout's script: it finds tools/ and docs/ beside itself (or under --root), so the
installed library never reaches outside its package for them.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from edgeftl.device.cli.common import csv_list

import benchsuite

CHECKOUT = Path(__file__).resolve().parents[1]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="tools/bench.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="small settings: a few minutes in all")
    p.add_argument("--only", type=csv_list, default=tuple(benchsuite.BENCHMARKS),
                   help=f"comma-separated subset of {','.join(benchsuite.BENCHMARKS)}")
    p.add_argument("--dry-run", action="store_true", help="print the commands; run and write nothing")
    p.add_argument("--root", type=Path, default=CHECKOUT, help="checkout holding tools/ and docs/ (default: this one)")
    args = p.parse_args(argv)
    unknown = [n for n in args.only if n not in benchsuite.BENCHMARKS]
    if unknown or not args.only:
        p.error(f"--only {','.join(args.only)!r}: accepted names are {', '.join(benchsuite.BENCHMARKS)}")
    root, names = args.root, list(dict.fromkeys(args.only))
    if args.dry_run:
        for name, command in benchsuite.commands(root, names, args.quick).items():
            print(f"{name}: " + (f"(cd {shlex.quote(str(root))} && {shlex.join(command)})" if command
                                 else f"skipped: tools/{benchsuite.BENCHMARKS[name].script} not found"))
        return 0
    outcomes = benchsuite.run_all(root, names, args.quick)
    summary, table = benchsuite.summarise(root, outcomes, args.quick, benchsuite.machine())
    doc = benchsuite.write_docs(root, summary, table)
    print(table)
    print(f"wrote {root / 'docs' / 'bench_summary.json'} and the header of {doc}", file=sys.stderr)
    return 1 if any(o.exit_code for o in outcomes) else 0


if __name__ == "__main__":
    sys.exit(main())
