"""The device agent: wait for tasks, train locally, send a compressed update.

It reads typed messages from its link, one at a time on its own thread (ORT is only ever
touched from there): globals update the parameters it holds, a task for this device runs once
the global it starts from is held, or gets an error reply when that global does not arrive.
An async task (FedBuff, docs/PROTOCOL.md section 6.1.1) is an invitation to train once on the
newest global held; the device is idle again after its update until a newer task names it.
"""

from __future__ import annotations

import logging
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from edgeftl.device.card import device_card, with_progress
from edgeftl.device.data import read_examples
from edgeftl.device.failpoint import failpoint
from edgeftl.device.files import atomic_path
from edgeftl.device.limits import TaskLimits
from edgeftl.device.link import Incoming, Link, Refused
from edgeftl.device.measure import peak_rss_mib, platform_info
from edgeftl.device.protocol.auth import read_allowlist, verifier
from edgeftl.device.protocol.codecs import ErrorFeedback, parse_codec
from edgeftl.device.protocol.manifest import bundle_sha256
from edgeftl.device.protocol.messages import (
    ErrorReply,
    Global,
    MessageError,
    SecAgg,
    Task,
    Update,
    apply_delta,
    decode,
    encode,
    one_line,
    params_sha256,
    reply_version,
    vector_of,
)
from edgeftl.device.runtime import BundleRuntime
from edgeftl.device.secagg.session import DeviceSecAgg
from edgeftl.device.train import TrainConfig, data_inputs, train

log = logging.getLogger("edgeftl.device")
AGENT_STATE = "agent_state.npz"
GLOBAL_WAIT_S = 10.0  # how long a task waits for the global it starts from before an error reply


@dataclass
class AgentConfig:
    device_id: str
    bundle: Path
    data: Path
    state_dir: Path | None = None
    cache_dir: Path | None = None
    threads: int | None = None
    micro_batch: int | None = None
    limits: TaskLimits = field(default_factory=TaskLimits)
    secure_aggregation: bool = False  # send updates only masked (docs/SECAGG.md), never in the clear
    peers: Path | None = None  # allowlist.json: the devices whose signed keys a secure-aggregation roster may hold
    package_id: str | None = None  # the release it runs (flash passes it); None: the package beside the bundle
    # Simulation only (benchmarks of heterogeneous fleets on one machine): after training, sleep
    # (simulated_slowdown - 1) x the training time, so this device looks that many times slower.
    simulated_slowdown: float = 1.0

    def __post_init__(self) -> None:
        if not 1.0 <= self.simulated_slowdown <= 1000.0:
            raise ValueError(f"--simulated-slowdown must be in 1..1000 (x the real training time), "
                             f"got {self.simulated_slowdown}")


class DeviceAgent:
    """One device of a federation."""

    def __init__(self, link: Link, config: AgentConfig) -> None:
        self.link, self.config = link, config
        self.runtime = BundleRuntime(config.bundle, threads=config.threads)  # checks the bundle first
        self.bundle_sha256 = bundle_sha256(config.bundle)
        self.examples = read_examples(config.data, self.runtime.manifest.task, self.runtime.manifest.labels or None)
        self.inputs, self._closers = data_inputs(self.runtime, self.examples, config.data, config.cache_dir,
                                                 progress=False)
        self.reference = self.runtime.get_flat()  # the global parameters this device holds
        self.bundle_start = self.reference.copy()  # the bundle's own trainable values, and their hash
        self.bundle_start_sha256 = params_sha256(self.bundle_start)
        self.global_round: int | None = None
        self.run_id: str | None = None
        self.feedback: ErrorFeedback | None = None
        self.waiting: tuple[Task, float] | None = None  # a task whose global has not arrived, and until when
        self.acted: tuple[str, int] | None = None  # (run, round) of the last task answered: the retained
        # task comes again after every reconnect, and a device acts on each round at most once
        self.reply: Update | ErrorReply | None = None  # what it answered acted: sent again if the task comes again
        self._received_mark = 0
        self._seq = 0
        self._syncing = False
        self._platform_sent = False
        self._saved = self._read_state()  # applied once the run it belongs to shows up
        self.secagg = self._secure_aggregation() if config.secure_aggregation else None
        self.card = device_card(config.bundle, self.bundle_sha256, config.package_id)  # its status's info
        self.updates_sent = 0

    def _secure_aggregation(self) -> DeviceSecAgg:
        """Its key advertisements signed with this device's key (when it has one), and the roster's
        checked against `peers` (when given), so a coordinator cannot swap in keys of its own."""
        signing = self.link.keys.signing
        verify = verifier(read_allowlist(self.config.peers)) if self.config.peers else None
        return DeviceSecAgg(self.link.send, self.config.device_id, self.bundle_sha256,
                            signing.sign if signing is not None else None, verify)

    # ---- the loop ---------------------------------------------------------------------------
    def start(self, timeout_s: float = 30.0) -> None:
        # No full global yet: the first task may start from the bundle's own values (start_sha256),
        # and a task or delta it cannot start from fetches the full vector then (_on_task, _on_global).
        self.link.announce(self.card)  # its birth, will and offline status carry the card
        self.link.connect(timeout_s)

    def run(self, stop_after_s: float | None = None, max_rounds: int | None = None) -> int:
        """Handle messages until stopped; returns the number of updates sent."""
        sent, end = 0, (time.monotonic() + stop_after_s) if stop_after_s else None
        while (end is None or time.monotonic() < end) and (max_rounds is None or sent < max_rounds):
            item = self.link.receive(timeout_s=0.2)
            if isinstance(item, Incoming):
                sent += self.handle(item.message)
            elif isinstance(item, Refused):
                log.warning("%s: ignored a message on %s: %s", self.config.device_id, item.topic, item.reason)
            sent += self._run_waiting()
        return sent

    def handle(self, message: object) -> int:
        """Act on one message; returns the number of updates sent (0 or 1)."""
        try:
            if isinstance(message, Global):
                self._on_global(message)
                return self._run_waiting()
            if isinstance(message, Task):
                return self._on_task(message)
            if isinstance(message, SecAgg) and self.secagg is not None:
                done = self.secagg.handle(message)  # 1 once its masked update is in
                if done:
                    self._announce(message.round, done)
                return done
        except MessageError as exc:
            log.warning("%s: ignored %s: %s", self.config.device_id, type(message).__name__, exc)
        return 0

    # ---- globals ----------------------------------------------------------------------------
    def _on_global(self, message: Global) -> None:
        if message.bundle_sha256 != self.bundle_sha256:
            return  # another bundle's federation
        if message.run_id != self.run_id:
            self.run_id, self.global_round, self.feedback = message.run_id, None, None
            self._restore_state()
        if not message.is_delta:
            if self.global_round is None or message.round > self.global_round:
                self.reference = vector_of(message, self.reference.size)
                self.global_round = message.round
            self._stop_sync()
        elif message.base_round == self.global_round is not None:
            applied = apply_delta(self.reference, vector_of(message, self.reference.size))
            if not np.isfinite(applied).all() or message.params_sha256 not in (None, params_sha256(applied)):
                log.warning("%s: parameters after round %d's delta differ from the coordinator's; fetching the "
                            "full vector", self.config.device_id, message.round)
                self.global_round = None  # what it holds is no longer a known round
                if not self._syncing:
                    self._resync()
                return
            self.reference, self.global_round = applied, message.round
        elif not self._syncing:
            self._resync()  # missed a round: fetch the retained full global once

    def _resync(self) -> None:
        """Read the retained full global until it arrives; deltas alone after that."""
        self._syncing = True
        self.link.follow_full_global(True)

    def _stop_sync(self) -> None:
        if self._syncing:
            self._syncing = False
            self.link.follow_full_global(False)

    # ---- tasks ------------------------------------------------------------------------------
    def _on_task(self, task: Task) -> int:
        if self.config.device_id not in task.devices:
            return 0
        if self._acted_on(task):  # answered already (a redelivery, or the retained task after a reconnect)
            self._answer_again(task)
            return 0
        if task.bundle_sha256 != self.bundle_sha256:
            self.acted = (task.run_id, task.round)
            self._reply_error(task, "bundle_mismatch", f"this device holds bundle {self.bundle_sha256}, the task "
                              f"is for bundle {task.bundle_sha256}")
            return 0
        breach = self.config.limits.breach(task)
        if breach is not None:
            self.acted = (task.run_id, task.round)
            log.warning("%s: refused round %d: %s", self.config.device_id, task.round, breach)
            self._reply_error(task, "task_limits", breach)
            return 0
        self._start_from_bundle(task)
        if self._acted_on(task):  # starting from the bundle restored this run's saved state: answered already
            self._answer_again(task)
            return 0
        if not self._holds_start_of(task):
            if not self._syncing:
                self._resync()
            self.waiting = (task, time.monotonic() + GLOBAL_WAIT_S)  # a newer task replaces an older one
            return 0
        return self._run(task)

    def _start_from_bundle(self, task: Task) -> None:
        """Hold the bundle's own trainable values as the global of `task.round - 1` when the task says
        the round starts from values with their hash (round 0 of a run: the initial parameters are
        the bundle's), instead of downloading the full vector: 4 bytes per parameter per device saved.
        The hash makes it exact: a device holds these bits, or fetches the vector as before."""
        if task.start_sha256 != self.bundle_start_sha256 or self._holds_start_of(task):
            return
        if task.run_id != self.run_id:  # as a global of a new run would (_on_global)
            self.run_id, self.feedback = task.run_id, None
            self._restore_state()
        self.reference, self.global_round = self.bundle_start.copy(), task.round - 1
        self._stop_sync()

    def _acted_on(self, task: Task) -> bool:
        return self.acted is not None and self.acted[0] == task.run_id and task.round <= self.acted[1]

    def _holds_start_of(self, task: Task) -> bool:
        """Sync: it holds global round - 1. Async (FedBuff): round - 1 or any newer version."""
        if task.run_id != self.run_id or self.global_round is None:
            return False
        return self.global_round >= task.round - 1 if task.is_async else self.global_round == task.round - 1

    def _run_waiting(self) -> int:
        """Run the waiting task once its global is held; reply no_global when the wait runs out."""
        if self.waiting is None:
            return 0
        task, until = self.waiting
        if self._holds_start_of(task):
            self.waiting = None
            if self._acted_on(task):  # known once the run's global restored the saved state
                self._answer_again(task)
                return 0
            return self._run(task)
        if time.monotonic() >= until:
            self.waiting, self.acted = None, (task.run_id, task.round)
            log.warning("%s: no global for round %d, skipping it", self.config.device_id, task.round - 1)
            self._reply_error(task, "no_global", f"the global parameters of round {task.round - 1} did not arrive")
        return 0

    def _answer_again(self, task: Task) -> None:
        """Send the reply to this round again, unchanged (same seq: a coordinator that has it drops
        it), while the round is still open as far as this device knows: a coordinator resumed after
        a kill, or a broker restarted, may have lost it; retraining would break error feedback."""
        reply = self.reply
        if reply is None or reply.run_id != task.run_id or not (
                reply.round == task.round or (task.is_async and reply.round > task.round)):
            return
        if self.global_round is not None and self.global_round >= reply.round:
            return  # the round has closed: its global is here
        log.info("%s: round %d's task came again; sending the same reply again", self.config.device_id, task.round)
        self._send(reply, task)

    def _run(self, task: Task) -> int:
        self.acted = (task.run_id, task.round)
        failpoint("before_train", task.round)
        try:
            if self.secagg is not None:
                self.secagg.begin(task)  # keys go out before training
            sent = self._train_and_send(task)
        except Exception as exc:  # one failed round must not end the device's part in the run
            log.exception("%s: round %d failed", self.config.device_id, task.round)
            if self.secagg is not None:
                self.secagg.abandon()
            self._reply_error(task, error_code(exc), f"{type(exc).__name__}: {exc}")
            return 0
        self._announce(task.round, sent)
        return sent

    def _reply_error(self, task: Task, code: str, reason: str) -> None:
        """Tell the coordinator this round will bring no update, so it stops waiting for this device."""
        # the task's bundle hash, so the coordinator takes it even from a device with another bundle
        self.reply = ErrorReply(task.run_id, task.round, task.bundle_sha256, self.config.device_id, code,
                                one_line(reason))
        self._send(self.reply, task)
        self._announce(task.round, 0)

    def _announce(self, round_index: int, sent: int) -> None:
        """Publish the card after an answered round (retained, with its online status): the round,
        the updates sent so far and the peak memory, for `edgeftl fleet status`."""
        self.updates_sent += sent
        self.card = with_progress(self.card, round_index, self.updates_sent)
        try:
            self.link.announce(self.card)
        except Exception:  # the card is for people watching; the round's reply went out already
            log.exception("%s: could not publish its status after round %d", self.config.device_id, round_index)

    def _send(self, reply: Update | ErrorReply, task: Task) -> None:
        try:
            self.link.send(reply, reply_version(task))
        except Exception:  # the link may be what failed; the deadline covers it then
            log.exception("%s: could not send its reply for round %d", self.config.device_id, reply.round)

    def _train_and_send(self, task: Task) -> int:
        self.runtime.set_flat(self.reference)
        config = TrainConfig(epochs=task.epochs, steps=task.steps, batch=task.batch, lr=task.lr,
                             seed=zlib.crc32(f"{self.config.device_id}:{task.round}".encode()),
                             threads=self.config.threads, micro_batch=self.config.micro_batch)
        began = time.perf_counter()
        summary = train(self.runtime, self.examples, config, progress=False, inputs=self.inputs)
        train_time = time.perf_counter() - began
        if self.config.simulated_slowdown > 1.0:  # simulation only: see AgentConfig
            time.sleep((self.config.simulated_slowdown - 1.0) * train_time)
        delta = self.runtime.get_flat() - self.reference
        if self.secagg is not None:
            return self.secagg.submit(task, delta, max(1, len(self.examples)))
        if self.feedback is None or self.feedback.codec.spec != parse_codec(task.codec).spec:
            self.feedback = ErrorFeedback(parse_codec(task.codec), delta.size)
        encoded, _ = self.feedback.encode(delta)
        received = self.link.bytes_received
        # Only what the coordinator cannot see itself: the sample count is the header's `samples`
        # and the update's size its message's; each key costs ~15 header bytes in every update, which
        # at a 1-bit codec on a lora-xs bundle is ~1/20 of the update.
        measured = {
            "first_loss": summary["first_loss"], "last_loss": summary["last_loss"],
            "train_time_s": round(train_time, 3), "peak_rss_mib": peak_rss_mib(),
            "bytes_down": received - self._received_mark,
        }
        metrics = {k: v for k, v in measured.items() if v is not None}  # no loss without a step
        if not self._platform_sent:  # the coordinator remembers it; later updates stay lean
            metrics.update({k: v for k, v in platform_info().items() if isinstance(v, (int, float, str))})
            self._platform_sent = True
        self._received_mark = received
        self._seq += 1
        # async: the update names the version it was trained on (+ 1), the newest this device held
        trained_on = task.round if not task.is_async or self.global_round is None else self.global_round + 1
        self.reply = Update(task.run_id, trained_on, self.bundle_sha256, self.config.device_id,
                            max(1, len(self.examples)), self._seq, encoded, metrics)
        self._save_state()  # before sending: a device killed in between sends this same update again
        self.link.send(self.reply, reply_version(task))
        return 1

    # ---- local state across restarts ----------------------------------------------------
    def _save_state(self) -> None:
        if self.config.state_dir is None or self.feedback is None:
            return
        folder = Path(self.config.state_dir)
        folder.mkdir(parents=True, exist_ok=True)
        with atomic_path(folder / AGENT_STATE) as tmp, open(tmp, "wb") as handle:
            np.savez(handle, residual=self.feedback.state(), codec=np.array(self.feedback.codec.spec),
                     seq=np.array(self._seq), bundle=np.array(self.bundle_sha256), run=np.array(self.run_id or ""),
                     acted=np.array(self.acted[1] if self.acted else -1),
                     reply=np.frombuffer(encode(self.reply) if self.reply else b"", dtype=np.uint8))

    def _read_state(self) -> dict | None:
        """The saved error-feedback residual and sequence number, if they are for this bundle."""
        path = Path(self.config.state_dir or "/nonexistent") / AGENT_STATE
        if not path.is_file():
            return None
        try:
            with np.load(path, allow_pickle=False) as data:
                saved = {key: data[key] for key in ("residual", "codec", "seq", "bundle", "run")}
                saved["acted"] = data["acted"] if "acted" in data else np.array(-1)  # states saved before it
                saved["reply"] = data["reply"] if "reply" in data else np.zeros(0, np.uint8)
        except (OSError, ValueError, KeyError) as exc:
            log.warning("%s: local state %s unusable (%s); starting fresh", self.config.device_id, path, exc)
            return None
        return saved if str(saved["bundle"]) == self.bundle_sha256 else None

    def _restore_state(self) -> None:
        """Resume the residual of the same run only: another run's residual is another model's error."""
        saved = self._saved
        if saved is None or str(saved["run"]) != self.run_id:
            return
        self.feedback = ErrorFeedback(parse_codec(str(saved["codec"])), self.reference.size)
        self.feedback.load(saved["residual"])
        self._seq = int(saved["seq"])
        if int(saved["acted"]) >= 0:
            self.acted = (str(saved["run"]), int(saved["acted"]))
        if saved["reply"].size:
            try:
                reply = decode(saved["reply"].tobytes(), len(saved["reply"]))
            except MessageError as exc:
                log.warning("%s: saved reply unusable (%s)", self.config.device_id, exc)
                return
            if isinstance(reply, (Update, ErrorReply)) and reply.run_id == self.run_id:
                self.reply = reply

    def close(self) -> None:
        for close in self._closers:
            close()
        self.link.close()


def error_code(exc: BaseException) -> str:
    """The protocol's code for a failed round (messages.ERROR_CODES)."""
    text = str(exc).lower()
    if isinstance(exc, MemoryError) or "failed to allocate memory" in text or "bad_alloc" in text:
        return "out_of_memory"
    return "train_failed"
