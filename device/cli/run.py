"""`edgeftl device run`: join a federation as one device (torch-free)."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import TYPE_CHECKING

from edgeftl.device.limits import TaskLimits

if TYPE_CHECKING:
    from edgeftl.device.agent import DeviceAgent


def add_run(p: argparse.ArgumentParser) -> None:
    from edgeftl.device.cli.common import add_security_flags

    p.add_argument("--broker", required=True, help="mqtt://host:port, or mqtts://host:port for TLS")
    p.add_argument("--bundle", type=Path, required=True)
    p.add_argument("--data", type=Path, required=True, help="local training data: CSV (text,label) or JSONL")
    p.add_argument("--id", required=True, help="device id: letters, digits, _ . - (at most 64)")
    p.add_argument("--prefix", default="edgeftl", help="MQTT topic prefix")
    p.add_argument("--state", type=Path, default=None, help="local state folder (error-feedback residual)")
    p.add_argument("--cache-dir", type=Path, default=None, help="lower-stack output cache for split bundles")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--micro-batch", type=int, default=None)
    p.add_argument("--rounds", type=int, default=None, help="exit after sending this many updates")
    p.add_argument("--package-id", default=None, help="the release this device runs, shown by `edgeftl fleet "
                   "status` (edgeftl flash passes it; default: the id of the edgeftl-package.json beside the bundle)")
    p.add_argument("--simulated-slowdown", type=float, default=1.0,
                   help="SIMULATION ONLY: after each local training, sleep (X - 1) x its duration, so this device "
                        "looks X times slower (benchmarks of fleets with mixed speeds on one machine; default 1)")
    limits = TaskLimits()
    for name in ("steps", "epochs", "batch"):
        p.add_argument(f"--max-{name}", type=int, default=getattr(limits, f"max_{name}"),
                       help=f"refuse tasks asking for more local {name} (default %(default)s)")
    add_security_flags(p)
    p.add_argument("--secure-aggregation", action="store_true",
                   help="send updates only masked, for a coordinator run with --secure-aggregation (docs/SECAGG.md)")
    p.add_argument("--peers", type=Path, default=None,
                   help="allowlist.json of `edgeftl certs`: with --secure-aggregation, refuse rosters holding keys "
                        "not signed by these devices")


def run_device(args: argparse.Namespace) -> dict:
    return serve(make_agent(args), args)


def make_agent(args: argparse.Namespace) -> DeviceAgent:
    """The connected-to-be agent the `run` flags describe (its link is not opened yet)."""
    from edgeftl.device.agent import AgentConfig, DeviceAgent
    from edgeftl.device.card import check_package_id
    from edgeftl.device.cli.common import security_from
    from edgeftl.device.link import Link, MqttConnection
    from edgeftl.device.protocol.auth import device_keys
    from edgeftl.device.protocol.manifest import read_manifest
    from edgeftl.device.protocol.topics import device_client_id

    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s {args.id} %(levelname)s %(message)s")
    if args.package_id is not None:
        check_package_id(args.package_id)  # before the bundle loads
    connection = MqttConnection(args.broker, device_client_id(args.id), security=security_from(args))
    keys = device_keys(args.signing_key, read_manifest(args.bundle).coordinator_key)
    link = Link.device(connection, args.prefix, args.id, keys=keys)
    limits = TaskLimits(args.max_steps, args.max_epochs, args.max_batch)
    return DeviceAgent(link, AgentConfig(args.id, args.bundle, args.data, args.state, args.cache_dir, args.threads,
                                         args.micro_batch, limits, args.secure_aggregation, args.peers,
                                         args.package_id, args.simulated_slowdown))


def serve(agent: DeviceAgent, args: argparse.Namespace) -> dict:
    """Connect the agent and answer tasks until --rounds updates are sent or the process is interrupted."""
    agent.start()
    logging.info("connected to %s as %s; waiting for tasks", args.broker, args.id)
    try:
        sent = agent.run(max_rounds=args.rounds)
    except KeyboardInterrupt:
        sent = -1
    finally:
        agent.close()
    return {"device_id": args.id, "updates_sent": sent}
