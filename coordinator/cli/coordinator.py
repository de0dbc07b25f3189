"""`edgeftl coordinator`: run federated rounds for one bundle through an MQTT broker (torch-free)."""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
from pathlib import Path

from edgeftl.coordinator.rounds.config import DEFAULT_STEPS, CoordinatorConfig
from edgeftl.coordinator.rounds.sampling import SAMPLE_MODES
from edgeftl.coordinator.rounds.strategy import STRATEGIES
from edgeftl.device.cli.common import add_security_flags, fail, security_from


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_round_flags(p)
    p.add_argument("--broker", required=True,
                   help="mqtt://host:port (MQTT 3.1.1; mqtt5://host:port for v5; mqtts:// for TLS)")
    p.add_argument("--bundle", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True, help="run folder: metrics.jsonl, checkpoint.npz")
    p.add_argument("--eval", type=Path, default=None, help="held-out file evaluated after every round")
    p.add_argument("--resume", action="store_true", help="continue after the checkpoint in --out")
    p.add_argument("--allowlist", type=Path, default=None,
                   help="JSON device id -> public key: only these devices take part, and only with signed messages")
    add_security_flags(p)
    p.add_argument("--secure-aggregation", action="store_true",
                   help="devices send masked updates; only the survivors' sum is unmasked (docs/SECAGG.md; "
                        "devices need --secure-aggregation too)")
    p.add_argument("--force", action="store_true", help="replace the run already in --out (default: refuse)")


# CoordinatorConfig field -> help. Flag names, types and defaults come from the dataclass itself,
# so the CLI and the library can never disagree.
ROUND_FLAGS = {
    "rounds": "federated rounds to run",
    "devices_per_round": "devices sampled per round; 0 = every online device",
    "sample": f"how they are drawn: {' | '.join(SAMPLE_MODES)} (uniform; by reported free memory; "
              "least recently sampled first)",
    "min_updates": "updates a round needs to aggregate",
    "deadline_s": "seconds a round waits for updates",
    "wait_devices": "online devices needed before round 0",
    "wait_devices_s": "seconds to wait for them",
    "epochs": "local epochs per round",
    "steps": f"local steps per round ({DEFAULT_STEPS} when neither --steps nor --epochs is given)",
    "batch": "local batch size",
    "lr": "local learning rate",
    "lr_final": "local learning rate of the last round: tasks decay geometrically from --lr to it (lora-xs at lr "
                "0.02 oscillates late without it); 0 = --lr in every round",
    "codec": "uplink codec, e.g. none | fp16 | int8 | sign | topk:0.01+int8",
    "downlink": "codec of the per-round global delta",
    "strategy": f"aggregation: {' | '.join(STRATEGIES)}",
    "server_lr": "server learning rate (strategy default when not given)",
    "clip_norm": "clip each update to this L2 norm before aggregating; 0 = no clipping",
    "max_step_norm": "refuse a new global that moves further than this L2 norm (kept: the previous); 0 = no bound",
    "max_weight_ratio": "cap each update's weight (claimed samples) at this many x the round's median; 0 = no cap",
    "trim_fraction": "trimmed-mean: share of values dropped from each side, per parameter",
    "byzantine": "krum, multi-krum: f, the attacking devices to tolerate (needs more than 2f + 2 updates a round)",
    "krum_select": "multi-krum: updates averaged; 0 = n - f",
    "dp_noise": "client-level DP: Gaussian noise multiplier z on the mean of the clipped updates (std z C / n, "
                "uniform weights; needs --clip-norm; noise seeded by --seed); 0 = off",
    "dp_delta": "the delta at which each round's record reports epsilon",
    "seed": "seed of the device sampling and of the DP noise",
    "run_id": "federation run id; default: a fresh one (--resume keeps the checkpoint's)",
    "prefix": "MQTT topic prefix",
    "mode": "sync: rounds that wait for every sampled device; async: FedBuff, a new global version every "
            "--buffer updates, devices training on the latest global they hold (--rounds counts versions, "
            "--devices-per-round caps the devices training at a time)",
    "buffer": "async: updates aggregated into each global version",
    "max_staleness": "async: refuse an update trained on a version more than this many versions old",
    "framing": "newest message version devices may reply in: 2, the compact framing (docs/PROTOCOL.md 4.2: a "
               "deflated header without the body hash, ~440 fewer bytes per update), or 1 for tools that read raw "
               "updates and know only version 1; devices that know only 1 send 1 either way",
}
_TYPES = {"int": int, "float": float, "str": str}


def add_round_flags(p: argparse.ArgumentParser) -> None:
    fields = {f.name: f for f in dataclasses.fields(CoordinatorConfig)}
    for name, help_text in ROUND_FLAGS.items():
        field = fields[name]
        kind = _TYPES[str(field.type).replace(" | None", "")]
        shown = "" if field.default in (None, "") else f" (default: {field.default})"
        p.add_argument(f"--{name.replace('_', '-')}", type=kind, default=field.default, help=help_text + shown)


def config_from(args: argparse.Namespace, out: Path) -> CoordinatorConfig:
    return CoordinatorConfig(out=out, resume=getattr(args, "resume", False), force=getattr(args, "force", False),
                             secure_aggregation=getattr(args, "secure_aggregation", False),
                             **{name: getattr(args, name) for name in ROUND_FLAGS})


def round_line(record: dict) -> str:
    from edgeftl.coordinator.cli.live import failed_suffix, measure_text  # loaded once the rounds run

    measured = "accuracy" in record or "perplexity" in record
    acc = " " + measure_text(record.get("accuracy"), record.get("perplexity")) if measured else ""
    acc += f" eps {record['dp_epsilon']:.2f}" if "dp_epsilon" in record else ""
    acc += f" loss {record['loss']:.4f}" if "loss" in record else ""  # held-out loss: only with --eval
    failed = failed_suffix(record.get("updates_failed", 0))  # records written before error replies lack it
    if record.get("mode") == "async":
        return version_line(record, acc, failed)
    return (f"round {record['round']:3d}: {record['updates_received']}/{record['devices_selected']} updates"
            f" ({record['updates_late']} late, {record['updates_rejected']} rejected{failed}){acc}"
            f" up {record['bytes_up'] / 1024:.1f} KiB"
            f" device peak {record['device_peak_rss_mib']:.0f} MiB  {record['wall_s']:.1f} s")


def version_line(record: dict, measured: str, failed: str) -> str:
    """An async run's line per global version: updates used, their staleness, refusals."""
    stale = record.get("staleness") or {}
    spread = f"staleness {stale.get('min')}..{stale.get('max')}" if stale else "no updates"
    return (f"version {record['round']:3d}: {record['updates_received']} updates ({spread}, "
            f"{record.get('refused_stale', 0)} stale refused, {record['updates_late']} late, "
            f"{record['updates_rejected']} rejected{failed}, {record.get('devices_training', 0)} training){measured}"
            f" up {record['bytes_up'] / 1024:.1f} KiB  {record.get('elapsed_s', 0.0):.1f} s")


def run(args: argparse.Namespace) -> int:
    from edgeftl.coordinator.cli.live import LiveView
    from edgeftl.coordinator.rounds.evaluate import make_evaluator
    from edgeftl.coordinator.rounds.fedbuff import make_coordinator
    from edgeftl.device.link import Link, LinkError, MqttConnection
    from edgeftl.device.protocol.auth import coordinator_keys
    from edgeftl.device.protocol.manifest import BundleError, verify_bundle
    from edgeftl.device.protocol.topics import coordinator_client_id
    from edgeftl.device.runtime import trainable_vector

    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        config = config_from(args, args.out)
        manifest = verify_bundle(args.bundle)
        initial = trainable_vector(args.bundle, manifest)
        evaluate = make_evaluator(args.bundle, args.eval) if args.eval else None
        keys = coordinator_keys(args.signing_key, args.allowlist, manifest.coordinator_key)
        connection = MqttConnection(args.broker, coordinator_client_id(args.prefix), security=security_from(args))
        link = Link.coordinator(connection, args.prefix, keys=keys)
        view = LiveView(config.rounds, config.deadline_s, round_line)  # plain lines when not a terminal
        coordinator = make_coordinator(link, args.bundle, manifest, initial, config, evaluate, on_round=view.on_round)
        view.attach(coordinator)
        coordinator.connect()
    except (ValueError, BundleError, LinkError) as exc:
        return fail(str(exc))
    online = coordinator.wait_for_devices()
    print(f"{online} device(s) online; running rounds {coordinator.start_round}..{config.rounds - 1}", file=sys.stderr)
    try:
        with view:
            coordinator.run()
    finally:
        link.close()
    return 0
