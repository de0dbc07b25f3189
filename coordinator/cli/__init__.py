"""The `edgeftl` console script: one entry point, one module per subcommand."""

from __future__ import annotations

import argparse
import importlib
import sys

# subcommand -> module under edgeftl.coordinator.cli; each module has add_parser() and run().
SUBCOMMANDS = {
    "build": "build",
    "inspect": "inspect",
    "device": "device",
    "coordinator": "coordinator",
    "simulate": "simulate",
    "report": "report",
    "bench": "bench",
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="edgeftl", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    modules = {}
    for name, module in SUBCOMMANDS.items():
        modules[name] = importlib.import_module(f"edgeftl.coordinator.cli.{module}")
        modules[name].add_parser(sub)
    args = parser.parse_args(argv)
    return int(modules[args.command].run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
