"""The coordinator's round loop: sample, publish the task, collect until the deadline,
aggregate, publish the next global, checkpoint, log. Torch-free: numpy, onnxruntime, paho-mqtt.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from edgeftl.coordinator.rounds import checkpoint
from edgeftl.coordinator.rounds.config import CoordinatorConfig
from edgeftl.coordinator.rounds.inbox import DeviceFailure, Inbox
from edgeftl.coordinator.rounds.strategy import Update, make_strategy
from edgeftl.device.protocol import wire
from edgeftl.device.protocol.codecs import ErrorFeedback, parse_codec
from edgeftl.device.protocol.manifest import Manifest, sha256_file
from edgeftl.device.protocol.messages import GlobalHeader, Task, header_of
from edgeftl.device.link import Topics, Transport

log = logging.getLogger("edgeftl.coordinator")
METRICS = "metrics.jsonl"
METRICS_FORMAT = 1


class Coordinator:
    """Runs `config.rounds` federated rounds over `transport` for one bundle."""

    def __init__(self, transport: Transport, bundle: Path, manifest: Manifest, initial: np.ndarray,
                 config: CoordinatorConfig, evaluate: Callable[[np.ndarray], dict] | None = None,
                 on_round: Callable[[dict], None] | None = None) -> None:
        self.transport, self.config, self.evaluate, self.on_round = transport, config, evaluate, on_round
        self.topics = Topics(config.prefix)
        self.bundle_sha256 = sha256_file(Path(bundle) / "manifest.json")
        self.layout = [{"name": p.name, "shape": p.shape, "offset": p.offset} for p in manifest.trainable]
        self.strategy = make_strategy(config.strategy, self.layout, config.server_lr)
        self.params = initial.astype(np.float32).copy()  # the server's global parameters
        self.reference = self.params.copy()  # what devices hold (differs when the downlink is lossy)
        self.downlink = ErrorFeedback(parse_codec(config.downlink), self.params.size)
        self.inbox = Inbox(config.run_id, self.bundle_sha256, self.params.size, config.max_message_bytes)
        self.online: dict[str, bool] = {}
        self.platforms: dict[str, dict] = {}  # device -> its platform_* metrics
        self.rng = np.random.default_rng(config.seed)
        self.start_round = 0
        config.out.mkdir(parents=True, exist_ok=True)

    # ---- wiring -------------------------------------------------------------------------
    def connect(self) -> None:
        self.transport.on_reject = self.inbox.on_transport_reject
        self.transport.subscribe(self.topics.updates_filter, self.inbox.on_message)
        self.transport.subscribe(self.topics.status_filter, self._on_status)
        self.transport.connect()
        if self.config.resume and (self.config.out / checkpoint.CHECKPOINT).is_file():
            last, self.params, self.reference, state, meta = checkpoint.load(self.config.out)
            if meta.get("bundle_sha256") != self.bundle_sha256:
                raise ValueError(f"checkpoint in {str(self.config.out)!r} is for another bundle; "
                                 "use a new --out or the bundle it was made with")
            self.strategy.load_state(state)
            self.config.run_id = self.inbox.run_id = meta.get("run_id", self.config.run_id)
            self.start_round = last + 1
            log.info("resuming after round %d", last)
        self._publish_full(self.start_round - 1)

    def _on_status(self, topic: str, payload: bytes) -> None:
        device = topic.rsplit("/", 1)[-1]
        text = payload[:256].decode("utf-8", "replace")
        online = text.startswith("online") or '"online"' in text
        self.online[device] = online

    def wait_for_devices(self) -> int:
        """Block until `wait_devices` devices are online or the wait runs out."""
        end = time.monotonic() + self.config.wait_devices_s
        while time.monotonic() < end and self._online_count() < self.config.wait_devices:
            time.sleep(0.1)
        return self._online_count()

    def _online_count(self) -> int:
        return sum(self.online.values())

    # ---- the rounds ---------------------------------------------------------------------
    def run(self) -> list[dict]:
        records = []
        for round_index in range(self.start_round, self.config.rounds):
            records.append(self.run_round(round_index))
        return records

    def run_round(self, round_index: int) -> dict:
        started = time.monotonic()
        selected = self._sample()
        sent_before = self.transport.bytes_sent
        self.inbox.open_round(round_index, selected)
        self._publish_task(round_index, selected)
        received, failed = self._collect(selected, started + self.config.deadline_s)
        late, rejected = self.inbox.close_round()
        aggregated = len(received) >= self.config.min_updates
        if aggregated:
            updates = [Update(r.delta, float(r.header.samples)) for r in received]
            self.params = self.strategy.aggregate(self.reference, updates)
        self._publish_global(round_index)
        checkpoint.save(self.config.out, round_index, self.params, self.reference, self.strategy.state(),
                        {"run_id": self.config.run_id, "bundle_sha256": self.bundle_sha256})
        record = self._record(round_index, selected, received, failed, late, rejected, aggregated,
                              self.transport.bytes_sent - sent_before, time.monotonic() - started)
        self._log(record)
        return record

    def _sample(self) -> list[str]:
        online = sorted(d for d, up in self.online.items() if up)
        count = self.config.devices_per_round or len(online)
        if len(online) <= count:
            return online
        return sorted(self.rng.choice(online, size=count, replace=False).tolist())

    def _collect(self, selected: list[str], deadline: float) -> tuple[list, list[DeviceFailure]]:
        """Updates and error replies until every sampled device has replied or the deadline passes."""
        received, failed = [], []
        while len(received) + len(failed) < len(selected) and time.monotonic() < deadline:
            item = self.inbox.get(timeout_s=min(0.5, deadline - time.monotonic()))
            if isinstance(item, DeviceFailure):
                failed.append(item)
            elif item is not None:
                received.append(item)
        return received, failed

    # ---- publishing -----------------------------------------------------------------------
    def _publish_task(self, round_index: int, selected: list[str]) -> None:
        c = self.config
        task = Task(run_id=c.run_id, round=round_index, bundle_sha256=self.bundle_sha256, devices=selected,
                    deadline_s=c.deadline_s, lr=c.lr, codec=c.codec, epochs=c.epochs, steps=c.steps, batch=c.batch)
        self.transport.publish(self.topics.task, wire.encode_message(header_of(task), {}), qos=1, retain=True)

    def _publish_full(self, round_index: int) -> None:
        """Retained full parameters (fp32): how late joiners and reconnecting devices sync."""
        header = GlobalHeader(self.config.run_id, round_index, self.bundle_sha256, "none", self.reference.size)
        payload = wire.encode_message(header_of(header), {"values": self.reference})
        self.transport.publish(self.topics.global_params, payload, qos=1, retain=True)

    def _publish_global(self, round_index: int) -> None:
        """Delta against the previous global, compressed with server-side error feedback."""
        encoded, decoded = self.downlink.encode(self.params - self.reference)
        self.reference = (self.reference + decoded).astype(np.float32)
        header = GlobalHeader(self.config.run_id, round_index, self.bundle_sha256, encoded.codec, encoded.size,
                              base_round=round_index - 1)
        self.transport.publish(self.topics.global_delta, wire.encode_message(header_of(header), encoded.arrays), qos=1)
        self._publish_full(round_index)

    # ---- records ----------------------------------------------------------------------------
    def _record(self, round_index: int, selected: list[str], received: list, failed: list[DeviceFailure],
                late: int, rejected: dict[str, int], aggregated: bool, sent: int, wall_s: float) -> dict:
        for r in received:  # devices describe their platform once; every record carries it
            known = self.platforms.setdefault(r.header.device_id, {})
            known.update({k: v for k, v in r.header.metrics.items() if k.startswith("platform_")})
            r.header.metrics = {**known, **r.header.metrics}
        metrics = [r.header.metrics for r in received]
        record = {
            "format": METRICS_FORMAT,
            "round": round_index,
            "devices_online": self._online_count(),
            "devices_selected": len(selected),
            "updates_received": len(received),
            "updates_late": late,
            "updates_rejected": sum(rejected.values()),
            "rejected_reasons": rejected,
            "updates_failed": len(failed),
            "failures": {f.device_id: {"code": f.code, "reason": f.reason} for f in failed},
            "aggregated": aggregated,
            "bytes_up": sum(r.payload_bytes for r in received),
            "bytes_down": int(sum(m.get("bytes_down", 0) for m in metrics)),
            "bytes_published": sent,
            "device_peak_rss_mib": max((m.get("peak_rss_mib", 0.0) for m in metrics), default=0.0),
            "devices": {r.header.device_id: r.header.metrics for r in received},
            "wall_s": round(wall_s, 3),
        }
        if getattr(self.strategy, "last_report", None):
            record["strategy_report"] = self.strategy.last_report
        if self.evaluate is not None:
            record.update(self.evaluate(self.reference))
        return record

    def _log(self, record: dict) -> None:
        with open(self.config.out / METRICS, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(record, sort_keys=True) + "\n")
        if self.on_round is not None:
            self.on_round(record)
