"""The fleet load generator's command line: N light devices against a broker (tools/fleet_load.py).

Start the coordinator as usual (`edgeftl coordinator --devices-per-round 50 --wait-devices N ...`),
then this; real device processes (`edgeftl device run`) can join the same run on the same topics.
Each process prints its final counts as one JSON line on stdout; progress goes to stderr.
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
from pathlib import Path

from edgeftl.coordinator.simulation.fleet import FleetConfig, run_fleet, spawn_helpers
from edgeftl.coordinator.simulation.light import Behaviour, Shared
from edgeftl.device.protocol.manifest import bundle_sha256, read_manifest


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fleet_load", description=__doc__.split("\n")[0])
    p.add_argument("--broker", required=True, help="mqtt://host[:port] (plain MQTT 3.1.1), or a cluster's nodes "
                   "comma-separated: each device starts at one (by a hash of its id) and moves to the next when "
                   "its connection is lost")
    p.add_argument("--bundle", type=Path, required=True, help="the run's bundle: its hash and trainable size")
    p.add_argument("--devices", type=int, required=True, help="light devices (across all --procs)")
    p.add_argument("--procs", type=int, default=1, help="processes sharing the devices (default: 1)")
    p.add_argument("--first", type=int, default=0, help="number of the first device id (default: 0)")
    p.add_argument("--name-prefix", default="light", help="device ids are NAME-PREFIX-N (default: light)")
    p.add_argument("--prefix", default="edgeftl", help="MQTT topic prefix (default: edgeftl)")
    p.add_argument("--delay-s", type=float, default=0.0, help="fastest device's reply delay (default: 0)")
    p.add_argument("--spread", type=float, default=10.0, help="slowest/fastest delay ratio (default: 10)")
    p.add_argument("--fail", type=float, default=0.0, help="chance of an error reply per sampled task")
    p.add_argument("--dropout", type=float, default=0.0, help="chance of vanishing (will sent) per sampled task")
    p.add_argument("--offline-s", type=float, default=30.0, help="how long a vanished device stays away")
    p.add_argument("--churn-per-min", type=float, default=0.0,
                   help="drops per connected device per minute, each for --offline-s (0.1: one per 10 min; default: 0)")
    p.add_argument("--samples", type=int, default=32, help="samples each update claims (default: 32)")
    p.add_argument("--connect-rate", type=float, default=500.0, help="new connections per second per process")
    p.add_argument("--duration-s", type=float, default=0.0, help="run this long; 0: until SIGTERM (default)")
    p.add_argument("--seed", type=int, default=0, help="seed of the synthetic delta")
    p.add_argument("--ack-log", type=Path, default=None,
                   help="append one JSON line per update the broker acknowledged (device, run_id, round, seq, time)")
    p.add_argument("--quiet", action="store_true", help="no progress lines")
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO, format="%(asctime)s %(message)s")
    if args.procs < 1 or args.devices < 1:
        print(f"fleet_load: --procs and --devices must be >= 1, got {args.procs} and {args.devices}", file=sys.stderr)
        return 2
    try:
        behaviour = Behaviour(args.delay_s, args.spread, args.fail, args.dropout, args.offline_s, args.samples)
        manifest = read_manifest(args.bundle)
        FleetConfig(args.broker, args.devices, churn_per_min=args.churn_per_min)  # bad flags fail before helpers start
        helpers, mine = spawn_helpers(_without_slice(argv), args.devices, args.procs) if args.procs > 1 \
            else ([], args.devices)
        config = FleetConfig(args.broker, mine, args.first, args.name_prefix, args.prefix, args.connect_rate,
                             args.duration_s, args.churn_per_min, behaviour, args.ack_log)
    except (ValueError, OSError) as exc:
        print(f"fleet_load: {exc}", file=sys.stderr)
        return 2
    shared = Shared(args.prefix, bundle_sha256(args.bundle), manifest.trainable_count, args.seed)
    counts = run_fleet(config, shared)
    for helper in helpers:  # this process was told to stop (or its duration ended): so are they
        if helper.poll() is None:
            helper.send_signal(signal.SIGTERM)
    print(json.dumps({"first": args.first, **counts}), flush=True)
    return max([0, *(helper.wait(timeout=60) for helper in helpers)])


def _without_slice(argv: list[str]) -> list[str]:
    """argv less --procs, --first and --devices (each helper gets its own)."""
    kept, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg in ("--procs", "--first", "--devices"):
            skip = True
        elif not arg.startswith(("--procs=", "--first=", "--devices=")):
            kept.append(arg)
    return kept


if __name__ == "__main__":
    sys.exit(main())
