"""The device agent: wait for tasks over MQTT, train locally, send a compressed update.

Transport callbacks only enqueue what arrived; the main thread applies globals and runs tasks
in arrival order, so ORT is only ever touched from one thread.
"""

from __future__ import annotations

import logging
import os
import queue
import tempfile
import time
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edgeftl.device.protocol import wire
from edgeftl.device.protocol.codecs import ErrorFeedback, parse_codec
from edgeftl.device.data import read_examples
from edgeftl.device.protocol.manifest import sha256_file
from edgeftl.device.measure import peak_rss_mib, platform_info, rss_mib
from edgeftl.device.protocol.messages import (
    MAX_REASON_CHARS,
    ErrorReply,
    GlobalHeader,
    MessageError,
    Task,
    UpdateHeader,
    decode_vector,
    header_of,
    parse_header,
)
from edgeftl.device.runtime import BundleRuntime
from edgeftl.device.train import TrainConfig, data_inputs, train
from edgeftl.device.link import Topics, Transport

log = logging.getLogger("edgeftl.device")
AGENT_STATE = "agent_state.npz"


@dataclass
class AgentConfig:
    device_id: str
    bundle: Path
    data: Path
    prefix: str = "edgeftl"
    state_dir: Path | None = None
    cache_dir: Path | None = None
    threads: int | None = None
    micro_batch: int | None = None
    max_message_bytes: int = 64 * 1024 * 1024


class DeviceAgent:
    """One device of a federation."""

    def __init__(self, transport: Transport, config: AgentConfig) -> None:
        self.transport, self.config = transport, config
        self.topics = Topics(config.prefix)
        self.bundle_sha256 = sha256_file(Path(config.bundle) / "manifest.json")
        self.runtime = BundleRuntime(config.bundle, threads=config.threads)
        self.examples = read_examples(config.data, self.runtime.manifest.task, self.runtime.manifest.labels or None)
        self.inputs, self._closers = data_inputs(self.runtime, self.examples, config.data, config.cache_dir,
                                                 progress=False)
        self.reference = self.runtime.get_flat()  # the global parameters this device holds
        self.global_round: int | None = None
        self.run_id: str | None = None
        self.feedback: ErrorFeedback | None = None
        self.events: queue.Queue[tuple[str, bytes]] = queue.Queue()
        self._received_mark = 0
        self._seq = 0
        self._syncing = False
        self._platform_sent = False
        self._saved = self._read_state()  # applied once the run it belongs to shows up

    # ---- wiring ---------------------------------------------------------------------------
    def start(self, timeout_s: float = 30.0) -> None:
        for topic in (self.topics.task, self.topics.global_delta):
            self.transport.subscribe(topic, self._enqueue)
        self._resync()
        self.transport.connect(timeout_s)

    def _enqueue(self, topic: str, payload: bytes) -> None:
        self.events.put((topic, payload))

    def _resync(self) -> None:
        """Subscribe to the retained full global until it arrives; deltas alone after that."""
        self._syncing = True
        self.transport.subscribe(self.topics.global_params, self._enqueue)

    def run(self, stop_after_s: float | None = None, max_rounds: int | None = None) -> int:
        """Process events until stopped; returns the number of updates sent."""
        sent, end = 0, (time.monotonic() + stop_after_s) if stop_after_s else None
        while (end is None or time.monotonic() < end) and (max_rounds is None or sent < max_rounds):
            try:
                topic, payload = self.events.get(timeout=0.5)
            except queue.Empty:
                continue
            try:
                sent += self.handle(topic, payload)
            except (wire.WireError, MessageError, ValueError) as exc:
                log.warning("%s: ignored message on %s: %s", self.config.device_id, topic, exc)
        return sent

    def handle(self, topic: str, payload: bytes) -> int:
        header, arrays = wire.decode_message(payload, self.config.max_message_bytes)
        kind = header.get("kind") if isinstance(header, dict) else None
        if kind == "global":
            self._apply_global(topic, header, arrays)
            return 0
        if kind == "task":
            return self._on_task(parse_header(header, Task))
        raise MessageError(f"unexpected message kind {kind!r}")

    # ---- globals ----------------------------------------------------------------------------
    def _apply_global(self, topic: str, header: dict, arrays: dict) -> None:
        self._on_global(parse_header(header, GlobalHeader), arrays, full=topic == self.topics.global_params)

    def _on_global(self, header: GlobalHeader, arrays: dict, full: bool) -> None:
        if header.bundle_sha256 != self.bundle_sha256:
            return  # another bundle's federation
        if header.run_id != self.run_id:
            self.run_id, self.global_round, self.feedback = header.run_id, None, None
            self._restore_state()
        if full:
            if self.global_round is not None and header.round <= self.global_round:
                self._stop_sync()  # already up to date
                return
            vector = decode_vector(header.codec, header.size, arrays, self.reference.size)
        elif header.base_round == self.global_round and self.global_round is not None:
            vector = self.reference + decode_vector(header.codec, header.size, arrays, self.reference.size)
        else:
            if not self._syncing:
                self._resync()  # missed a round: fetch the retained full global once
            return
        self.reference = vector.astype(np.float32)
        self.global_round = header.round
        self.runtime.set_flat(self.reference)
        if full:
            self._stop_sync()

    def _stop_sync(self) -> None:
        if self._syncing:
            self._syncing = False
            self.transport.unsubscribe(self.topics.global_params)

    # ---- tasks ------------------------------------------------------------------------------
    def _on_task(self, task: Task) -> int:
        me = self.config.device_id
        if task.bundle_sha256 != self.bundle_sha256 or me not in task.devices:
            return 0
        if task.run_id != self.run_id or self.global_round != task.round - 1:
            if not self._syncing:
                self._resync()
            self._wait_for_global(task)
        if task.run_id != self.run_id or self.global_round != task.round - 1:
            log.warning("%s: no global for round %d, skipping it", me, task.round - 1)
            self._reply_error(task, "no_global", f"the global parameters of round {task.round - 1} did not arrive")
            return 0
        try:
            return self._train_and_send(task)
        except Exception as exc:  # one failed round must not end the device's part in the run
            log.exception("%s: round %d failed", me, task.round)
            self._reply_error(task, error_code(exc), f"{type(exc).__name__}: {exc}")
            return 0

    def _reply_error(self, task: Task, code: str, reason: str) -> None:
        """Tell the coordinator this round will bring no update, so it stops waiting for this device."""
        reply = ErrorReply(task.run_id, task.round, self.bundle_sha256, self.config.device_id, code,
                           " ".join(reason.split())[:MAX_REASON_CHARS])
        try:
            self.transport.publish(self.topics.update(self.config.device_id),
                                   wire.encode_message(header_of(reply), {}), qos=1)
        except Exception:  # the link may be what failed; the deadline covers it then
            log.exception("%s: could not send the error reply for round %d", self.config.device_id, task.round)

    def _wait_for_global(self, task: Task, timeout_s: float = 10.0) -> None:
        end, later = time.monotonic() + timeout_s, []
        while time.monotonic() < end and not (task.run_id == self.run_id and self.global_round == task.round - 1):
            try:
                topic, payload = self.events.get(timeout=0.2)
            except queue.Empty:
                continue
            try:
                header, arrays = wire.decode_message(payload, self.config.max_message_bytes)
                if header.get("kind") != "global":
                    later.append((topic, payload))  # tasks keep their order, after this one
                    continue
                self._apply_global(topic, header, arrays)
            except (wire.WireError, MessageError, ValueError) as exc:
                # A bad message must not drop the tasks already set aside in `later`.
                log.warning("%s: ignored message on %s: %s", self.config.device_id, topic, exc)
        for item in later:
            self.events.put(item)

    def _train_and_send(self, task: Task) -> int:
        self.runtime.set_flat(self.reference)
        config = TrainConfig(epochs=task.epochs, steps=task.steps, batch=task.batch, lr=task.lr,
                             seed=zlib.crc32(f"{self.config.device_id}:{task.round}".encode()), threads=self.config.threads,
                             micro_batch=self.config.micro_batch)
        began = time.perf_counter()
        summary = train(self.runtime, self.examples, config, progress=False, inputs=self.inputs)
        train_time = time.perf_counter() - began
        delta = self.runtime.get_flat() - self.reference
        if self.feedback is None or self.feedback.codec.spec != parse_codec(task.codec).spec:
            self.feedback = ErrorFeedback(parse_codec(task.codec), delta.size)
        encoded, _ = self.feedback.encode(delta)
        received = self.transport.bytes_received
        metrics = {
            "samples": summary["samples"], "first_loss": summary["first_loss"], "last_loss": summary["last_loss"],
            "train_time_s": round(train_time, 3), "peak_rss_mib": peak_rss_mib(), "rss_mib": rss_mib(),
            "bytes_down": received - self._received_mark, "update_bytes": encoded.nbytes,
        }
        if not self._platform_sent:  # the coordinator remembers it; later updates stay lean
            metrics.update({k: v for k, v in platform_info().items() if isinstance(v, (int, float, str))})
            self._platform_sent = True
        self._received_mark = received
        self._seq += 1
        header = UpdateHeader(task.run_id, task.round, self.bundle_sha256, self.config.device_id, encoded.codec,
                              encoded.size, max(1, len(self.examples)), seq=self._seq, metrics=metrics)
        self.transport.publish(self.topics.update(self.config.device_id),
                               wire.encode_message(header_of(header), encoded.arrays), qos=1)
        self._save_state()
        return 1

    # ---- local state across restarts ----------------------------------------------------
    def _save_state(self) -> None:
        if self.config.state_dir is None or self.feedback is None:
            return
        folder = Path(self.config.state_dir)
        folder.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=".agent.", suffix=".npz")
        with os.fdopen(fd, "wb") as handle:
            np.savez(handle, residual=self.feedback.state(), codec=np.array(self.feedback.codec.spec),
                     seq=np.array(self._seq), bundle=np.array(self.bundle_sha256), run=np.array(self.run_id or ""))
        os.replace(tmp, folder / AGENT_STATE)

    def _read_state(self) -> dict | None:
        """The saved error-feedback residual and sequence number, if they are for this bundle."""
        path = Path(self.config.state_dir or "/nonexistent") / AGENT_STATE
        if not path.is_file():
            return None
        try:
            with np.load(path, allow_pickle=False) as data:
                saved = {key: data[key] for key in ("residual", "codec", "seq", "bundle", "run")}
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


    def close(self) -> None:
        for close in self._closers:
            close()
        self.transport.close()


def error_code(exc: BaseException) -> str:
    """The protocol's code for a failed round (messages.ERROR_CODES)."""
    text = str(exc).lower()
    if isinstance(exc, MemoryError) or "failed to allocate memory" in text or "bad_alloc" in text:
        return "out_of_memory"
    return "train_failed"
