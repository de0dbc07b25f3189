"""`edgeftl coordinator`: run federated rounds for one bundle through an MQTT broker (torch-free)."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from edgeftl.device.cli.common import fail


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_round_flags(p)
    p.add_argument("--broker", required=True, help="mqtt://host:port (MQTT 3.1.1; mqtt5://host:port for v5)")
    p.add_argument("--bundle", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True, help="run folder: metrics.jsonl, checkpoint.npz")
    p.add_argument("--eval", type=Path, default=None, help="held-out file evaluated after every round")
    p.add_argument("--resume", action="store_true", help="continue after the checkpoint in --out")


def add_round_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--rounds", type=int, default=20)
    p.add_argument("--devices-per-round", type=int, default=0, help="0 = every online device")
    p.add_argument("--min-updates", type=int, default=1)
    p.add_argument("--deadline-s", type=float, default=300.0)
    p.add_argument("--wait-devices", type=int, default=1, help="online devices needed before round 0")
    p.add_argument("--wait-devices-s", type=float, default=120.0)
    p.add_argument("--epochs", type=int, default=None, help="local epochs per round")
    p.add_argument("--steps", type=int, default=None, help="local steps per round (default 10 if no --epochs)")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--codec", default="none", help="uplink codec, e.g. none | fp16 | int8 | topk:0.01+int8")
    p.add_argument("--downlink", default="none", help="codec of the per-round global delta")
    p.add_argument("--strategy", default="fedavg", help="fedavg | fedadam | fedyogi | lora-svd")
    p.add_argument("--server-lr", type=float, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--run-id", default="", help="default: a fresh id per run (--resume keeps the checkpoint's)")
    p.add_argument("--prefix", default="edgeftl", help="MQTT topic prefix")


def config_from(args: argparse.Namespace, out: Path):
    from edgeftl.coordinator.rounds.config import CoordinatorConfig

    steps = args.steps if args.steps is not None or args.epochs is not None else 10
    return CoordinatorConfig(
        out=out, rounds=args.rounds, devices_per_round=args.devices_per_round, min_updates=args.min_updates,
        deadline_s=args.deadline_s, wait_devices=args.wait_devices, wait_devices_s=args.wait_devices_s,
        epochs=args.epochs, steps=steps, batch=args.batch, lr=args.lr, codec=args.codec, downlink=args.downlink,
        strategy=args.strategy, server_lr=args.server_lr, seed=args.seed, run_id=args.run_id, prefix=args.prefix,
        resume=getattr(args, "resume", False))


def round_line(record: dict) -> str:
    from edgeftl.coordinator.cli.live import failed_suffix  # the live view's module, loaded once the rounds run

    acc = f" accuracy {record['accuracy']:.1%}" if "accuracy" in record else ""
    failed = failed_suffix(record.get("updates_failed", 0))  # records written before error replies lack it
    return (f"round {record['round']:3d}: {record['updates_received']}/{record['devices_selected']} updates"
            f" ({record['updates_late']} late, {record['updates_rejected']} rejected{failed}){acc}"
            f" loss {record.get('loss', float('nan')):.4f} up {record['bytes_up'] / 1024:.1f} KiB"
            f" device peak {record['device_peak_rss_mib']:.0f} MiB  {record['wall_s']:.1f} s")


def run(args: argparse.Namespace) -> int:
    from edgeftl.coordinator.rounds.evaluate import make_evaluator
    from edgeftl.coordinator.cli.live import LiveView
    from edgeftl.coordinator.rounds.loop import Coordinator
    from edgeftl.device.protocol.manifest import BundleError, verify_bundle
    from edgeftl.device.runtime import trainable_vector
    from edgeftl.device.link import MqttTransport, TransportError

    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        config = config_from(args, args.out)
        manifest = verify_bundle(args.bundle)
        initial = trainable_vector(args.bundle, manifest)
        evaluate = make_evaluator(args.bundle, args.eval) if args.eval else None
        transport = MqttTransport(args.broker, f"edgeftl-coordinator-{args.prefix}".replace("/", "-")[:64])
        view = LiveView(config.rounds, config.deadline_s, round_line)  # plain lines when not a terminal
        coordinator = Coordinator(transport, args.bundle, manifest, initial, config, evaluate, on_round=view.on_round)
        view.attach(coordinator)
        coordinator.connect()
    except (ValueError, BundleError, TransportError) as exc:
        return fail(str(exc))
    online = coordinator.wait_for_devices()
    print(f"{online} device(s) online; running rounds {coordinator.start_round}..{config.rounds - 1}", file=sys.stderr)
    try:
        with view:
            coordinator.run()
    finally:
        transport.close()
    return 0
