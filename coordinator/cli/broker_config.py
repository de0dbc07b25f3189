"""`edgeftl broker-config`: a mosquitto.conf (TLS listener, password file, per-device ACL,
persistence) for the folder `edgeftl certs` made (coordinator/broker_config.py)."""

from __future__ import annotations

import argparse
from pathlib import Path

from edgeftl.device.cli.common import fail


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--certs", type=Path, required=True, help="the folder `edgeftl certs` wrote")
    p.add_argument("--port", type=int, default=8883, help="the TLS listener's port (default: 8883)")
    p.add_argument("--bind", default=None, help="address to listen on (default: every interface)")
    p.add_argument("--mtls", action="store_true", help="also require a client certificate signed by the CA")
    p.add_argument("--prefix", default="edgeftl", help="the federation's MQTT topic prefix (the ACL names it)")
    p.add_argument("--out", type=Path, required=True, help="the mosquitto.conf to write (FILE.acl beside it)")
    p.add_argument("--run-as", default=None, help="the user mosquitto runs as when started as root (default: "
                   "mosquitto's own, 'mosquitto'); it must own passwords and broker.key")


def run(args: argparse.Namespace) -> int:
    from edgeftl.coordinator.broker_config import write_broker_config

    try:
        conf, acl = write_broker_config(args.certs, args.port, args.out, args.mtls, args.prefix, args.bind,
                                        args.run_as)
    except (ValueError, OSError) as exc:
        return fail(str(exc))
    print(f"wrote {conf} and {acl}; start the broker with: mosquitto -c {conf}")
    return 0
