"""`edgeftl broker-config`: a mosquitto.conf (TLS listener, password file, per-device ACL,
persistence) for the folder `edgeftl certs` made (coordinator/broker_config.py); or, with
--bridge-to, a site gateway's mosquitto.conf bridging the federation's topics to a central broker
(coordinator/bridge_config.py)."""

from __future__ import annotations

import argparse
from pathlib import Path

from edgeftl.device.cli.common import fail


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--certs", type=Path, default=None, help="the folder `edgeftl certs` wrote (the central broker)")
    p.add_argument("--bridge-to", default=None, metavar="URL",
                   help="write a site gateway's configuration instead: bridge to this central broker (mqtt:// or "
                        "mqtts://; a cluster's nodes comma-separated)")
    p.add_argument("--site", default=None, help="with --bridge-to: the site's name (the bridge's client id)")
    p.add_argument("--port", type=int, default=None,
                   help="the listener's port (default: 8883 with --certs, 1883 for a gateway's devices)")
    p.add_argument("--bind", default=None, help="address to listen on (default: every interface with --certs, "
                   "127.0.0.1 for a gateway)")
    p.add_argument("--mtls", action="store_true", help="also require a client certificate signed by the CA")
    p.add_argument("--prefix", default="edgeftl", help="the federation's MQTT topic prefix (the ACL, the bridge)")
    p.add_argument("--out", type=Path, required=True, help="the mosquitto.conf to write (FILE.acl beside it)")
    p.add_argument("--run-as", default=None, help="the user mosquitto runs as when started as root (default: "
                   "mosquitto's own, 'mosquitto'); it must own passwords and broker.key")
    p.add_argument("--ca-file", type=Path, default=None, help="with --bridge-to mqtts://: the central broker's CA")
    p.add_argument("--username", default=None, help="with --bridge-to: the bridge's user on the central broker")
    p.add_argument("--password-file", type=Path, default=None,
                   help="with --bridge-to: its password (first line; copied into the 0600 configuration)")


def run(args: argparse.Namespace) -> int:
    from edgeftl.coordinator.bridge_config import write_bridge_config
    from edgeftl.coordinator.broker_config import write_broker_config

    if (args.certs is None) == (args.bridge_to is None):
        return fail("give --certs DIR (the central broker) or --bridge-to URL --site NAME (a site gateway)")
    try:
        if args.bridge_to is not None:
            if args.site is None:
                return fail("--bridge-to needs --site NAME (names the bridge on the central broker)")
            conf = write_bridge_config(args.bridge_to, args.site, args.port or 1883, args.out, args.prefix,
                                       args.bind or "127.0.0.1", args.ca_file, args.username, args.password_file)
            print(f"wrote {conf}; start the site gateway with: mosquitto -c {conf}")
            return 0
        conf, acl = write_broker_config(args.certs, args.port or 8883, args.out, args.mtls, args.prefix, args.bind,
                                        args.run_as)
    except (ValueError, OSError) as exc:
        return fail(str(exc))
    print(f"wrote {conf} and {acl}; start the broker with: mosquitto -c {conf}")
    return 0
