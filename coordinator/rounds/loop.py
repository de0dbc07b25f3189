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

from edgeftl.coordinator.rounds import checkpoint, journal, records
from edgeftl.coordinator.rounds.accumulate import Accepted, KeptUpdates, StreamingMean
from edgeftl.coordinator.rounds.config import CoordinatorConfig
from edgeftl.coordinator.rounds.inbox import Counted, DeviceFailure, Inbox, ReceivedUpdate
from edgeftl.coordinator.rounds.privacy.mechanism import ClientDp
from edgeftl.coordinator.rounds.sampling import OnlineDevices, Sampler
from edgeftl.coordinator.rounds.secure import SecureRounds
from edgeftl.coordinator.rounds.strategy import make_strategy
from edgeftl.device.failpoint import failpoint
from edgeftl.device.link import Incoming, Link, Refused
from edgeftl.device.protocol.codecs import Encoded, ErrorFeedback, parse_codec
from edgeftl.device.protocol.manifest import Manifest, bundle_sha256
from edgeftl.device.protocol.messages import (
    ErrorReply,
    Global,
    MessageError,
    Status,
    Task,
    Update,
    apply_delta,
    decode,
    largest_update_bytes,
    one_line,
    params_sha256,
    vector_of,
)

log = logging.getLogger("edgeftl.coordinator")
# A global with a parameter beyond float16's range is refused: no honest fine-tuning gets there,
# the fp16 codec could not carry it, and a float32-max update (which stays finite) would.
MAX_PARAM_ABS = 65504.0


class Coordinator:
    """Runs `config.rounds` federated rounds over `link` for one bundle."""

    def __init__(self, link: Link, bundle: Path, manifest: Manifest, initial: np.ndarray,
                 config: CoordinatorConfig, evaluate: Callable[[np.ndarray], dict] | None = None,
                 on_round: Callable[[dict], None] | None = None) -> None:
        self.link, self.config, self.evaluate, self.on_round = link, config, evaluate, on_round
        self.bundle_sha256 = bundle_sha256(bundle)
        self.strategy = make_strategy(config.strategy, manifest.trainable, config.server_lr,
                                      trim_fraction=config.trim_fraction, byzantine=config.byzantine,
                                      krum_select=config.krum_select)
        self.guarded: dict = {}  # what the guards did to the last round's updates, for its record
        self.params = initial.astype(np.float32).copy()  # the server's global parameters
        self.reference = self.params.copy()  # what devices hold (differs when the downlink is lossy)
        self.downlink = ErrorFeedback(parse_codec(config.downlink), self.params.size)
        self.inbox = Inbox(config.run_id, self.bundle_sha256, self.params.size)
        self.online = OnlineDevices()
        self.platforms: dict[str, dict] = {}  # device -> its platform_* metrics
        self.rng = np.random.default_rng(config.seed)
        self.sampler = Sampler(config.sample, self.rng)
        self.privacy = (ClientDp(config.clip_norm, config.dp_noise, config.dp_delta, config.seed)
                        if config.dp_noise > 0 else None)  # None: not one step of the round changes
        self.start_round = 0
        self._losses_seen: dict[str, int] = {}
        link.limit_message_bytes(largest_update_bytes(self.params.size))
        self.secure = SecureRounds(link, self._take, self.inbox, self.online, self.bundle_sha256, self.params.size,
                                   config.deadline_s / 4) if config.secure_aggregation else None
        self.reopened: list[str] | None = None  # devices of the round a killed coordinator left open
        self.pending: list[ReceivedUpdate | DeviceFailure] = []  # its replies, taken before it restarts
        config.out.mkdir(parents=True, exist_ok=True)
        if config.force:
            checkpoint.start_fresh(config.out)
        elif not config.resume:
            checkpoint.refuse_old_run(config.out)

    def connect(self) -> None:
        """Connect; with `resume`, continue after the checkpoint (CheckpointError if it is unusable)."""
        if self.config.resume:
            self._resume()
        self.link.connect()
        self._publish_full(self.start_round - 1)

    def _resume(self) -> None:
        out = self.config.out
        last, self.params, self.reference, state, meta = checkpoint.load(out, self.params.size, self.bundle_sha256)
        try:
            self.strategy.load_state(state)
            if isinstance(meta.get("sampler"), dict):  # the same device sampling as an uninterrupted run
                self.rng.bit_generator.state = meta["sampler"]
            self.sampler.load_state(meta)
            if self.privacy is not None:  # the budget already spent
                self.privacy.load_state(meta)
        except (ValueError, KeyError, TypeError) as exc:
            raise checkpoint.CheckpointError(f"checkpoint {str(out / checkpoint.CHECKPOINT)!r} has server state "
                                             f"this coordinator cannot load ({exc}); resume with the same "
                                             "--strategy, or start over with --force") from None
        self.config.run_id = self.inbox.run_id = str(meta.get("run_id", self.config.run_id))
        self.start_round = last + 1
        appended = checkpoint.reconcile_records(out, meta)
        journaled = journal.read(out, self.config.run_id, self.start_round)
        if journaled is not None:  # open it now: replies queued by the broker arrive as soon as we connect
            self.reopened = journaled.devices
            self._restore_sampler(journaled)
            self.inbox.open_round(self.start_round, journaled.devices)
            self.pending = [r for r in map(self._take_journaled, journaled.updates) if r is not None]
        log.warning("resuming after round %d (%d record restored from the checkpoint, %s)", last, appended,
                    f"{len(self.pending)} journaled replies of round {self.start_round}"
                    if journaled else "no open round")

    def _restore_sampler(self, journaled: journal.Journaled) -> None:
        """The sampling state as it was once the reopened round's devices were drawn, so the rounds
        after it draw what an uninterrupted run would have (a journal without it: the devices
        are at least remembered as sampled)."""
        try:
            if journaled.sampler is not None:
                self.rng.bit_generator.state = journaled.sampler["rng"]
                self.sampler.load_state(journaled.sampler)
                return
        except (ValueError, KeyError, TypeError) as exc:
            log.warning("journaled sampler state unusable (%s); sampling goes on from the checkpoint's", exc)
        self.sampler.note_sampled(journaled.devices, self.start_round)

    def wait_for_devices(self) -> int:
        """Read statuses until `wait_devices` devices are online or the wait runs out (replies to a
        round reopened by `connect()` are kept for it)."""
        end = time.monotonic() + self.config.wait_devices_s
        while time.monotonic() < end and self._online_count() < self.config.wait_devices:
            reply = self._take(self.link.receive(timeout_s=min(0.1, max(0.0, end - time.monotonic()))))
            if reply is not None:  # only while a resumed round is open
                self.pending.append(reply)
        return self._online_count()

    def _online_count(self) -> int:
        return self.online.count

    # ---- the rounds ---------------------------------------------------------------------
    def run(self) -> list[dict]:
        return [self.run_round(round_index) for round_index in range(self.start_round, self.config.rounds)]

    def run_round(self, round_index: int) -> dict:
        """One round. Its checkpoint (with its record) is written before its global is published
        and its record appended, so a kill at any point loses neither (module checkpoint)."""
        started = time.monotonic()
        selected = self._open_round(round_index)
        online = self._online_count()
        sent_before = self.link.bytes_sent
        self._publish_task(round_index, selected)
        secure = self.secure.run(round_index, selected, started + self.config.deadline_s) if self.secure else None
        received: list[Accepted] = []
        gathered: KeptUpdates | StreamingMean
        if secure is not None:  # only the survivors' mean is known: one update
            failed, gathered, count = secure.failed, KeptUpdates(secure.updates), secure.count
        else:
            gathered = self._gathering()
            received, failed = self._collect(selected, started + self.config.deadline_s, gathered)
            count = len(received)
        collected = time.monotonic()  # the round's last reply (or its deadline): the rest is the coordinator's
        counted = self.inbox.close_round()
        refused_globals = None
        self.guarded = {}
        aggregated = count >= self.config.min_updates and len(gathered) > 0
        if aggregated:
            refused_globals = self._aggregate(gathered, round_index, len(selected), online)
            aggregated = refused_globals is None
        failpoint("before_checkpoint", round_index)
        delta = self._advance_reference()
        recording = time.monotonic()
        record = self._record(round_index, selected, received, failed, counted, aggregated,
                              self.link.bytes_sent - sent_before, time.monotonic() - started)
        evaluating_s = time.monotonic() - recording  # the held-out evaluation, mostly
        if refused_globals:
            record["global_refused"] = refused_globals
        if secure is not None:
            record.update(updates_received=secure.count, bytes_up=secure.bytes_up, secure_aggregation=secure.report)
        checkpoint.save(self.config.out, round_index, self.params, self.reference, self.strategy.state(),
                        {"run_id": self.config.run_id, "bundle_sha256": self.bundle_sha256,
                         "sampler": self.rng.bit_generator.state, **self.sampler.state(),
                         **(self.privacy.state() if self.privacy is not None else {})}, record)
        journal.clear(self.config.out)
        failpoint("after_checkpoint", round_index)
        record["bytes_published"] += self._publish_global(round_index, delta)
        # Closing the round without its evaluation: aggregate, checkpoint, publish the global
        record["close_s"] = round(time.monotonic() - collected - evaluating_s, 3)
        self._log(record)
        return record

    def _gathering(self) -> KeptUpdates | StreamingMean:
        """Where the round's updates go as they arrive: one running sum when the strategy (or DP's
        noisy mean, which stands in for it) needs only their mean, else the list of them all."""
        c = self.config
        if self.strategy.streams_mean or self.privacy is not None:
            return StreamingMean(self.params.size, c.clip_norm, c.max_weight_ratio, self.privacy is not None,
                                 self._reload)
        return KeptUpdates()

    def _reload(self, device_id: str) -> np.ndarray:
        """An accepted update's delta read back from the round's journal (the weight cap's correction)."""
        message = decode(journal.reply(self.config.out, device_id), self.link.max_message_bytes)
        if not isinstance(message, Update):
            raise MessageError(f"journaled reply of {device_id!r} is not its update")
        return vector_of(message, self.params.size)

    def _aggregate(self, gathered: KeptUpdates | StreamingMean, round_index: int, sampled: int,
                   online: int) -> str | None:
        """Aggregate the round's updates into self.params; None, or why the new global was refused
        (not finite, out of range, or a step above --max-step-norm), in which case params and the
        strategy's state stay as they were and the round counts as not aggregated."""
        closed = gathered.close(self.config.clip_norm, self.config.max_weight_ratio, self.privacy, round_index,
                                sampled, online)
        self.guarded = closed.guarded
        saved = {k: v.copy() for k, v in self.strategy.state().items()}
        candidate = self.strategy.aggregate(self.reference, closed.updates)
        problem = global_problem(candidate, self.reference, self.config.max_step_norm)
        if problem is None:
            self.params = candidate
            return None
        self.strategy.load_state(saved)
        log.error("round's new global refused: %s; keeping the previous one", problem)
        return problem

    def _open_round(self, round_index: int) -> list[str]:
        """The round's devices: a fresh sample, journaled, or those of the round `connect()` reopened."""
        if self.reopened is not None:
            selected, self.reopened = self.reopened, None
            return selected
        selected = self.sampler.sample(self.online, self.config.devices_per_round, round_index)
        self.inbox.open_round(round_index, selected)
        journal.open_round(self.config.out, self.config.run_id, round_index, selected,
                           {"rng": self.rng.bit_generator.state, **self.sampler.state()})
        return selected

    def _collect(self, selected: list[str], deadline: float,
                 gathered: KeptUpdates | StreamingMean) -> tuple[list[Accepted], list[DeviceFailure]]:
        """Updates (into `gathered`) and error replies (those taken before the round, then new ones)
        until every sampled device has replied (or gone offline) or the deadline passes."""
        received: list[Accepted] = []
        failed: list[DeviceFailure] = []
        for early in self.pending:
            self._add(early, received, failed, gathered)
        self.pending = []
        connects = self.link.connects
        while len(received) + len(failed) < len(selected) and time.monotonic() < deadline:
            if self.link.connects != connects:  # a broker restarted without persistence lost the retained
                connects = self.link.connects  # messages and the replies in flight: devices answer again
                self._publish_full(self.task.round - 1)
                self.link.send(self.task)
            reply = self._take(self.link.receive(timeout_s=min(0.5, deadline - time.monotonic())))
            if reply is not None:
                self._add(reply, received, failed, gathered)
        return received, failed

    def _add(self, reply: ReceivedUpdate | DeviceFailure, received: list[Accepted], failed: list[DeviceFailure],
             gathered: KeptUpdates | StreamingMean) -> None:
        """Journal one accepted reply (a resumed coordinator reloads the journal) and count it; an
        update's vector goes to `gathered`, and only what the record needs of it is kept here."""
        kept = reply.update if isinstance(reply, ReceivedUpdate) else reply.reply  # None: its will
        if kept is not None:
            journal.keep(self.config.out, kept)
        if isinstance(reply, DeviceFailure):
            failed.append(reply)
            return
        device = reply.update.device_id  # an update after the device's will replaces its failure: back in time
        failed[:] = [f for f in failed if f.device_id != device]
        gathered.add(device, reply.delta, float(reply.update.samples))
        received.append(Accepted.of(device, reply.update.samples, reply.update.metrics, reply.payload_bytes))

    def _take_journaled(self, payload: bytes) -> ReceivedUpdate | DeviceFailure | None:
        try:
            message = decode(payload, self.link.max_message_bytes)
        except MessageError as exc:
            log.warning("journaled reply unusable (%s); waiting for that device again", exc)
            return None
        return self.inbox.take(message, len(payload)) if isinstance(message, (Update, ErrorReply)) else None

    def _take(self, item: Incoming | Refused | None) -> ReceivedUpdate | DeviceFailure | None:
        """One item from the link: a status updates who is online, a reply goes to the inbox,
        a refusal is counted (whatever its topic, between rounds too)."""
        if isinstance(item, Refused):
            self.inbox.refuse(item.place, item.device_id, item.reason)
            return None
        if item is None:
            return None
        message = item.message
        if isinstance(message, Status):
            self.online.note(message)
            return None if message.online else self.inbox.offline(message.device_id)
        if isinstance(message, (Update, ErrorReply)):
            return self.inbox.take(message, item.nbytes)
        return None

    # ---- publishing -----------------------------------------------------------------------
    def _publish_task(self, round_index: int, selected: list[str]) -> None:
        c = self.config
        self.task = Task(c.run_id, round_index, self.bundle_sha256, tuple(selected), c.deadline_s,
                         c.round_lr(round_index), c.codec, c.epochs, c.steps, c.batch,
                         start_sha256=params_sha256(self.reference), framing=c.framing)
        self.link.send(self.task)

    def _publish_full(self, round_index: int) -> int:
        """Retained full parameters (fp32): how late joiners and reconnecting devices sync."""
        vector = Encoded("none", self.reference.size, {"values": self.reference})
        return self.link.send(Global(self.config.run_id, round_index, self.bundle_sha256, vector))

    def _advance_reference(self) -> Encoded:
        """The global delta, compressed with server-side error feedback; the reference moves by
        exactly what devices will compute from it."""
        encoded, decoded = self.downlink.encode(self.params - self.reference)
        self.reference = apply_delta(self.reference, decoded)
        return encoded

    def _publish_global(self, round_index: int, delta: Encoded) -> int:
        """Publish the round's delta and the retained full vector; returns the bytes sent."""
        sent = self.link.send(Global(self.config.run_id, round_index, self.bundle_sha256, delta, round_index - 1,
                                     params_sha256(self.reference)))
        return sent + self._publish_full(round_index)

    # ---- records ----------------------------------------------------------------------------
    def _record(self, round_index: int, selected: list[str], received: list[Accepted],
                failed: list[DeviceFailure], counted: Counted, aggregated: bool, sent: int, wall_s: float) -> dict:
        metrics: dict[str, dict] = {}
        for r in received:  # devices describe their platform once; every record carries it
            known = self.platforms.setdefault(r.device_id, {})
            known.update({k: v for k, v in r.metrics.items() if k.startswith("platform_")})
            metrics[r.device_id] = {**known, **r.metrics}
        record = {
            "format": records.METRICS_FORMAT,
            "round": round_index,
            "devices_online": self._online_count(),
            "devices_selected": len(selected),
            "sample_mode": self.sampler.mode,
            "updates_received": len(received),
            "updates_late": counted.late,
            "updates_redelivered": counted.redelivered,
            "updates_rejected": sum(counted.rejected.values()),
            "rejected_reasons": counted.rejected,
            "rejected_places": counted.rejected_places,
            **self._link_losses(),
            "updates_failed": len(failed),
            "failures": {f.device_id: {"code": f.code, "reason": f.reason} for f in failed},
            "aggregated": aggregated,
            "bytes_up": sum(r.payload_bytes for r in received),
            "bytes_down": int(sum(records.number(m.get("bytes_down")) for m in metrics.values())),
            "bytes_published": sent,
            "device_peak_rss_mib": max((records.number(m.get("peak_rss_mib")) for m in metrics.values()),
                                       default=0.0),
            **self.guarded,
            "devices": metrics,
            "wall_s": round(wall_s, 3),
        }
        report = self.strategy.report()
        if report:
            record["strategy_report"] = report
        if self.privacy is not None:
            record.update(self.privacy.record())
        if self.evaluate is not None:
            record.update(self._evaluate())
        return record

    def _evaluate(self) -> dict:
        """Held-out results of the current global; an evaluation that fails or gives NaN/Inf is
        noted in the record instead of ending the run."""
        assert self.evaluate is not None
        try:
            result = self.evaluate(self.reference)
        except Exception as exc:  # a broken evaluation must not stop the federation
            log.exception("evaluation failed")
            return {"eval_error": one_line(f"{type(exc).__name__}: {exc}")}
        bad = sorted(k for k, v in result.items() if not records.is_number(v))
        return {**{k: v for k, v in result.items() if k not in bad},
                **({"eval_error": f"not finite: {', '.join(bad)}"} if bad else {})}

    def _link_losses(self) -> dict[str, int]:
        """What the link dropped since the last record: queue overflow, and partial chunked
        messages evicted (idle, or to keep memory bounded)."""
        stats = self.link.stats()
        now = {"link_dropped": stats["dropped"],
               "chunks_evicted": stats.get("chunks_evicted_stale", 0) + stats.get("chunks_evicted_overflow", 0)}
        since = {k: v - self._losses_seen.get(k, 0) for k, v in now.items()}
        self._losses_seen = now
        return since

    def _log(self, record: dict) -> None:
        records.append(self.config.out, record)
        if self.on_round is not None:
            self.on_round(record)


def global_problem(candidate: np.ndarray, reference: np.ndarray, max_step_norm: float) -> str | None:
    """Why a new global must not be published or checkpointed, or None: NaN/Inf anywhere, a value
    beyond MAX_PARAM_ABS, or a step longer than max_step_norm (0 = unbounded)."""
    if not np.isfinite(candidate).all():
        return "not finite: the aggregate holds NaN or Inf"
    largest = float(np.abs(candidate).max(initial=0.0))
    if largest > MAX_PARAM_ABS:
        return f"out of range: a parameter reaches {largest:.3g}, beyond {MAX_PARAM_ABS:g} (float16's largest)"
    step = float(np.linalg.norm(candidate.astype(np.float64) - reference.astype(np.float64)))
    if max_step_norm > 0 and step > max_step_norm:
        return f"step too large: the global would move by L2 {step:.4g}, above --max-step-norm {max_step_norm:g}"
    return None
