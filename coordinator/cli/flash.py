"""`edgeftl flash ARCHIVE --target ssh://user@host[:port]/path ... --broker URL`: install a package made by
`edgeftl package` on boards over SSH and start their device agents (coordinator/fleet/flash.py).

Only files a board lacks are copied; the board verifies every file before the new release goes
live; the agent starts only when the memory plan, measured on the board, fits its free memory
(--force overrides). Credentials travel as files (--certs from `edgeftl certs`, or --ca-file,
--password-file, ...) and land 0600 on the board, never on a command line. Exit status 0 when
every target was flashed, 1 when any failed (the table says which and why), 2 for bad arguments.
"""

from __future__ import annotations

import argparse
import json
import threading
from pathlib import Path

from edgeftl.device.cli.common import fail


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("archive", type=Path, help="the .tar.gz that `edgeftl package` wrote")
    add_target_flags(p)
    p.add_argument("--broker", required=True, help="the broker as the devices reach it: mqtts://host:8883 or "
                   "mqtt://...; a broker cluster's nodes comma-separated")
    p.add_argument("--prefix", default="edgeftl", help="MQTT topic prefix of the federation")
    agent = p.add_argument_group("the device agent")
    agent.add_argument("--data", default="{root}/data/train.csv",
                       help="the board's training data, a path there ({root} is the target's folder)")
    agent.add_argument("--batch", type=int, default=16,
                       help="the batch size the coordinator will ask for (for the memory plan)")
    agent.add_argument("--seq", type=int, default=None, help="tokens per example for the plan (default: the bundle's)")
    agent.add_argument("--micro-batch", type=int, default=None)
    agent.add_argument("--threads", type=int, default=None)
    agent.add_argument("--rounds", type=int, default=None, help="the agent exits after this many rounds")
    agent.add_argument("--service", default="auto", choices=("auto", "systemd", "supervised"),
                       help="systemd where the board runs it (auto), else a supervised background process")
    creds = p.add_argument_group("credentials (files, copied 0600 to each board)")
    creds.add_argument("--certs", type=Path, default=None,
                       help="an `edgeftl certs` folder: each board gets devices/<its id>/ (TLS, password, signing key)")
    for flag, text in (("--ca-file", "CA certificate of the broker"), ("--cert", "client certificate"),
                       ("--key", "client certificate's key"), ("--password-file", "MQTT password file"),
                       ("--signing-key", "Ed25519 key the device signs updates with")):
        creds.add_argument(flag, type=Path, default=None, help=f"{text}, the same for every board")
    creds.add_argument("--username", default=None, help="MQTT username (default with --certs: the device id)")
    creds.add_argument("--insecure", action="store_true", help="let devices use plain mqtt:// to a non-loopback broker")
    p.add_argument("--force", action="store_true", help="start even when the memory plan does not fit")
    p.add_argument("--json", type=Path, default=None, help="also write the results as JSON to this file")


def add_target_flags(p: argparse.ArgumentParser) -> None:
    """The boards and how ssh reaches them (`edgeftl flash`, `edgeftl fleet stop|logs`)."""
    p.add_argument("--target", action="append", default=[], metavar="URL",
                   help="ssh://user@host[:port]/path[?id=DEVICE&data=/path/on/board] (repeatable)")
    p.add_argument("--targets-file", type=Path, default=None, help="a file with one target URL per line (# comments)")
    p.add_argument("--identity", type=Path, default=None, help="ssh private key (default: ssh's own keys and agent)")
    p.add_argument("--known-hosts", type=Path, default=None,
                   help="ssh known_hosts file (default ssh's; a new host's key is remembered, a changed one refused)")
    p.add_argument("--parallel", type=int, default=8, help="targets handled at once (default 8)")


def targets_of(args: argparse.Namespace) -> list:
    """The parsed targets of --target and --targets-file.

    Raises:
        ValueError: none given, or one that is not an ssh:// target URL (TargetError).
    """
    from edgeftl.coordinator.fleet.ssh import parse_target

    urls = [*args.target, *_read_targets(args.targets_file)]
    if not urls:
        raise ValueError("give at least one --target ssh://user@host/path (or --targets-file)")
    if args.parallel < 1:
        raise ValueError(f"--parallel must be a positive integer, got {args.parallel}")
    return [parse_target(url) for url in urls]


def run(args: argparse.Namespace) -> int:
    from edgeftl.coordinator.fleet.archive import ArchiveError, open_archive
    from edgeftl.coordinator.fleet.flash import FlashConfig, flash, table
    from edgeftl.coordinator.fleet.ssh import TargetError
    from edgeftl.device.link.brokers import parse_brokers
    from edgeftl.device.link.security import is_loopback

    try:
        targets = targets_of(args)
        nodes = parse_brokers(args.broker)  # one URL, or a broker cluster's nodes (docs/BROKERS.md)
        if nodes[0].version != "3.1.1":
            raise ValueError(f"--broker {args.broker!r} must be mqtt://host:port or mqtts://host:port")
        for node in nodes:
            if not node.tls and not args.insecure and not is_loopback(node.host):
                raise ValueError(f"devices refuse plain mqtt:// to {node.host}: use mqtts:// with --certs or "
                                 "--ca-file, or pass --insecure")
        credentials = {flag: getattr(args, flag[2:].replace("-", "_")) for flag in
                       ("--ca-file", "--cert", "--key", "--password-file", "--signing-key")}
        config = FlashConfig(broker=args.broker, prefix=args.prefix, batch=args.batch, seq=args.seq,
                             micro_batch=args.micro_batch, threads=args.threads, rounds=args.rounds, data=args.data,
                             identity=args.identity, known_hosts=args.known_hosts, certs=args.certs,
                             credentials={k: v for k, v in credentials.items() if v is not None},
                             username=args.username, insecure=args.insecure, force=args.force,
                             service=args.service, parallel=args.parallel)
        package = open_archive(args.archive)
    except (ValueError, TargetError, ArchiveError, OSError) as exc:
        return fail(str(exc))
    print(f"flashing {args.archive.name} (release {package.id}, {package.manifest.platform}, Python "
          f"{package.manifest.python}) onto {len(targets)} target(s), {min(args.parallel, len(targets))} at a time",
          flush=True)
    lock = threading.Lock()

    def say(target, line: str) -> None:
        with lock:
            print(f"[{target.label}] {line}", flush=True)

    results = flash(package, targets, config, say)
    print("\n" + table(results), flush=True)
    if args.json is not None:
        from dataclasses import asdict

        from edgeftl.device.files import atomic_write

        atomic_write(args.json, json.dumps([asdict(r) for r in results], indent=2) + "\n")
    return 0 if all(r.ok for r in results) else 1


def _read_targets(path: Path | None) -> list[str]:
    if path is None:
        return []
    lines = (line.split("#", 1)[0].strip() for line in path.read_text(encoding="utf-8").splitlines())
    return [line for line in lines if line]
