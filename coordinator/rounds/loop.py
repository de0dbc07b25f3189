"""The coordinator's round loop: sample, publish the task, collect until the deadline,
aggregate, publish the next global, checkpoint, log. Torch-free: numpy, onnxruntime, paho-mqtt.

It reads typed messages from its link (statuses, updates, error replies, refusals) on one
thread, in arrival order; nothing here sees bytes or topics.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from edgeftl.coordinator.rounds import checkpoint, records
from edgeftl.coordinator.rounds.config import CoordinatorConfig
from edgeftl.coordinator.rounds.inbox import DeviceFailure, Inbox, ReceivedUpdate
from edgeftl.coordinator.rounds.privacy.mechanism import ClientDp
from edgeftl.coordinator.rounds.strategy import Update as StrategyUpdate
from edgeftl.coordinator.rounds.strategy import make_strategy
from edgeftl.coordinator.rounds.strategy.guard import clip_updates
from edgeftl.device.link import Incoming, Link, Refused
from edgeftl.device.protocol.codecs import Encoded, ErrorFeedback, parse_codec
from edgeftl.device.protocol.manifest import Manifest, bundle_sha256
from edgeftl.device.protocol.messages import ErrorReply, Global, Status, Task, Update, apply_delta, params_sha256

log = logging.getLogger("edgeftl.coordinator")


class Coordinator:
    """Runs `config.rounds` federated rounds over `link` for one bundle."""

    def __init__(self, link: Link, bundle: Path, manifest: Manifest, initial: np.ndarray,
                 config: CoordinatorConfig, evaluate: Callable[[np.ndarray], dict] | None = None,
                 on_round: Callable[[dict], None] | None = None) -> None:
        self.link, self.config, self.evaluate, self.on_round = link, config, evaluate, on_round
        self.bundle_sha256 = bundle_sha256(bundle)
        self.strategy = make_strategy(config.strategy, manifest.trainable, config.server_lr)
        self.params = initial.astype(np.float32).copy()  # the server's global parameters
        self.reference = self.params.copy()  # what devices hold (differs when the downlink is lossy)
        self.downlink = ErrorFeedback(parse_codec(config.downlink), self.params.size)
        self.inbox = Inbox(config.run_id, self.bundle_sha256, self.params.size)
        self.online: dict[str, bool] = {}
        self.platforms: dict[str, dict] = {}  # device -> its platform_* metrics
        self.rng = np.random.default_rng(config.seed)
        self.privacy = (ClientDp(config.clip_norm, config.dp_noise, config.dp_delta, config.seed)
                        if config.dp_noise > 0 else None)  # None: not one step of the round changes
        self.start_round = 0
        config.out.mkdir(parents=True, exist_ok=True)

    def connect(self) -> None:
        self.link.connect()
        if self.config.resume and (self.config.out / checkpoint.CHECKPOINT).is_file():
            last, self.params, self.reference, state, meta = checkpoint.load(self.config.out)
            if meta.get("bundle_sha256") != self.bundle_sha256:
                raise ValueError(f"checkpoint in {str(self.config.out)!r} is for another bundle; "
                                 "use a new --out or the bundle it was made with")
            self.strategy.load_state(state)
            if self.privacy is not None:
                self.privacy.load_state(meta)
            self.config.run_id = self.inbox.run_id = meta.get("run_id", self.config.run_id)
            self.start_round = last + 1
            log.info("resuming after round %d", last)
        self._publish_full(self.start_round - 1)

    def wait_for_devices(self) -> int:
        """Read statuses until `wait_devices` devices are online or the wait runs out."""
        end = time.monotonic() + self.config.wait_devices_s
        while time.monotonic() < end and self._online_count() < self.config.wait_devices:
            self._take(self.link.receive(timeout_s=min(0.1, max(0.0, end - time.monotonic()))))
        return self._online_count()

    def _online_count(self) -> int:
        return sum(self.online.values())

    # ---- the rounds ---------------------------------------------------------------------
    def run(self) -> list[dict]:
        return [self.run_round(round_index) for round_index in range(self.start_round, self.config.rounds)]

    def run_round(self, round_index: int) -> dict:
        started = time.monotonic()
        selected, online = self._sample(), self._online_count()
        sent_before = self.link.bytes_sent
        self.inbox.open_round(round_index, selected)
        self._publish_task(round_index, selected)
        received, failed = self._collect(selected, started + self.config.deadline_s)
        late, rejected = self.inbox.close_round()
        aggregated = len(received) >= self.config.min_updates
        if aggregated:
            updates, _norms = clip_updates([StrategyUpdate(r.delta, float(r.update.samples)) for r in received],
                                           self.config.clip_norm)
            if self.privacy is not None:  # the strategy sees one noisy mean, never a device's update
                updates = [self.privacy.noisy_mean(updates, round_index, len(selected), online)]
            self.params = self.strategy.aggregate(self.reference, updates)
        self._publish_global(round_index)
        checkpoint.save(self.config.out, round_index, self.params, self.reference, self.strategy.state(),
                        {"run_id": self.config.run_id, "bundle_sha256": self.bundle_sha256,
                         **(self.privacy.state() if self.privacy is not None else {})})
        record = self._record(round_index, selected, received, failed, late, rejected, aggregated,
                              self.link.bytes_sent - sent_before, time.monotonic() - started)
        self._log(record)
        return record

    def _sample(self) -> list[str]:
        online = sorted(d for d, up in self.online.items() if up)
        count = self.config.devices_per_round or len(online)
        if len(online) <= count:
            return online
        return sorted(self.rng.choice(online, size=count, replace=False).tolist())

    def _collect(self, selected: list[str], deadline: float) -> tuple[list[ReceivedUpdate], list[DeviceFailure]]:
        """Updates and error replies until every sampled device has replied or the deadline passes."""
        received: list[ReceivedUpdate] = []
        failed: list[DeviceFailure] = []
        while len(received) + len(failed) < len(selected) and time.monotonic() < deadline:
            reply = self._take(self.link.receive(timeout_s=min(0.5, deadline - time.monotonic())))
            if isinstance(reply, DeviceFailure):
                failed.append(reply)
            elif reply is not None:
                received.append(reply)
        return received, failed

    def _take(self, item: Incoming | Refused | None) -> ReceivedUpdate | DeviceFailure | None:
        """One item from the link: a status updates who is online, a reply goes to the inbox."""
        if isinstance(item, Refused):
            if item.place == "update":
                self.inbox.refuse(f"update/{item.device_id}", item.reason)
            return None
        if item is None:
            return None
        message = item.message
        if isinstance(message, Status):
            self.online[message.device_id] = message.online
        elif isinstance(message, (Update, ErrorReply)):
            return self.inbox.take(message, item.nbytes)
        return None

    # ---- publishing -----------------------------------------------------------------------
    def _publish_task(self, round_index: int, selected: list[str]) -> None:
        c = self.config
        self.link.send(Task(c.run_id, round_index, self.bundle_sha256, tuple(selected), c.deadline_s, c.lr, c.codec,
                            c.epochs, c.steps, c.batch))

    def _publish_full(self, round_index: int) -> None:
        """Retained full parameters (fp32): how late joiners and reconnecting devices sync."""
        vector = Encoded("none", self.reference.size, {"values": self.reference})
        self.link.send(Global(self.config.run_id, round_index, self.bundle_sha256, vector))

    def _publish_global(self, round_index: int) -> None:
        """Delta against the previous global, compressed with server-side error feedback."""
        encoded, decoded = self.downlink.encode(self.params - self.reference)
        self.reference = apply_delta(self.reference, decoded)  # exactly what devices compute
        self.link.send(Global(self.config.run_id, round_index, self.bundle_sha256, encoded, round_index - 1,
                              params_sha256(self.reference)))
        self._publish_full(round_index)

    # ---- records ----------------------------------------------------------------------------
    def _record(self, round_index: int, selected: list[str], received: list[ReceivedUpdate],
                failed: list[DeviceFailure], late: int, rejected: dict[str, int], aggregated: bool, sent: int,
                wall_s: float) -> dict:
        metrics: dict[str, dict] = {}
        for r in received:  # devices describe their platform once; every record carries it
            known = self.platforms.setdefault(r.update.device_id, {})
            known.update({k: v for k, v in r.update.metrics.items() if k.startswith("platform_")})
            metrics[r.update.device_id] = {**known, **r.update.metrics}
        record = {
            "format": records.METRICS_FORMAT,
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
            "bytes_down": int(sum(m.get("bytes_down", 0) for m in metrics.values())),
            "bytes_published": sent,
            "device_peak_rss_mib": max((m.get("peak_rss_mib", 0.0) for m in metrics.values()), default=0.0),
            "devices": metrics,
            "wall_s": round(wall_s, 3),
        }
        report = self.strategy.report()
        if report:
            record["strategy_report"] = report
        if self.privacy is not None:
            record.update(self.privacy.record())
        if self.evaluate is not None:
            record.update(self.evaluate(self.reference))
        return record

    def _log(self, record: dict) -> None:
        records.append(self.config.out, record)
        if self.on_round is not None:
            self.on_round(record)
