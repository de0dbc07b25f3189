"""`edgeftl certs`: a CA, broker and client certificates, signing keys, MQTT passwords, a
Mosquitto password file and the device allowlist in one folder (coordinator/certs.py); with
--pin, write the coordinator's public signing key into a bundle's manifest."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from edgeftl.device.cli.common import csv_list, fail


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", type=Path, required=True, help="the folder to write (or, with --pin alone, to read)")
    p.add_argument("--devices", type=csv_list, default=(), help="device ids, comma-separated: id1,id2,...")
    p.add_argument("--host", action="append", default=[],
                   help="a name or address the broker is reached at (repeatable); localhost and 127.0.0.1 always")
    p.add_argument("--force", action="store_true", help="replace a folder that is not empty")
    p.add_argument("--pin", type=Path, default=None, metavar="BUNDLE",
                   help="pin --out's coordinator signing key in this bundle: its devices then refuse unsigned "
                        "tasks and globals (the bundle's sha256 changes: copy the pinned bundle everywhere)")


def run(args: argparse.Namespace) -> int:
    from edgeftl.coordinator.certs import COORDINATOR_USER, make_certs
    from edgeftl.device.protocol.manifest import BundleError, pin_coordinator_key

    try:
        if not args.devices and args.pin is None:
            raise ValueError("give --devices id1,id2,... to make a folder, or --pin BUNDLE to pin its key")
        summary: dict[str, object] = {}
        if args.devices:
            summary = make_certs(args.out, list(args.devices), args.host, args.force)
        if args.pin is not None:
            key = (args.out / COORDINATOR_USER / "signing.pub").read_text(encoding="utf-8").strip()
            summary.update(pinned=str(args.pin), coordinator_key=key, bundle_sha256=pin_coordinator_key(args.pin, key))
    except (ValueError, BundleError, OSError) as exc:
        return fail(str(exc))
    print(json.dumps(summary, indent=2))
    return 0
