"""The coordinator's inbox: every update from the network is validated here, then queued.

A sampled device that cannot train sends an error reply instead (`messages.ErrorReply`); it is
checked the same way and queued as a `DeviceFailure`, so the round stops waiting for that device.

Anything a device or the network sends is untrusted: size is checked before parsing (wire),
header fields and types (messages), run id, bundle hash, round, the device id against the topic,
the codec and vector length, finiteness, duplicates. A message that fails is counted under its
reason and logged; nothing here raises into the transport thread.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections import Counter
from dataclasses import dataclass

import numpy as np

from edgeftl.device.protocol import wire
from edgeftl.device.protocol.messages import ErrorReply, MessageError, UpdateHeader, decode_vector, parse_header

log = logging.getLogger("edgeftl.coordinator")


@dataclass
class ReceivedUpdate:
    header: UpdateHeader
    delta: np.ndarray
    payload_bytes: int


@dataclass
class DeviceFailure:
    device_id: str
    code: str
    reason: str


class Inbox:
    """Validates update messages for the current round and hands the good ones to the loop."""

    def __init__(self, run_id: str, bundle_sha256: str, size: int, max_message_bytes: int) -> None:
        self.run_id, self.bundle_sha256, self.size = run_id, bundle_sha256, size
        self.max_message_bytes = max_message_bytes
        self._lock = threading.Lock()
        self._queue: queue.Queue[ReceivedUpdate | DeviceFailure] = queue.Queue()
        self._round = -1
        self._selected: set[str] = set()
        self._seen: set[tuple[str, int, int]] = set()
        self._accepted: set[str] = set()
        self.rejected: Counter[str] = Counter()
        self.late = 0
        self.failures: dict[str, dict[str, str]] = {}  # device -> {"code", "reason"}, this round
        self._transport_reasons: set[str] = set()

    def open_round(self, round_index: int, selected: list[str]) -> None:
        with self._lock:
            self._round, self._selected = round_index, set(selected)
            self._accepted, self.failures = set(), {}
            self.rejected, self.late, self._transport_reasons = Counter(), 0, set()
            while not self._queue.empty():
                self._queue.get_nowait()

    def close_round(self) -> tuple[int, dict[str, int]]:
        """Stop accepting for this round; return (late count, rejected counts by reason)."""
        with self._lock:
            self._round = -1
            return self.late, dict(self.rejected)

    def progress(self) -> dict:
        """The round in progress: its index (-1 between rounds) and counters, for live displays."""
        with self._lock:
            return {"round": self._round, "selected": len(self._selected), "received": len(self._accepted),
                    "late": self.late, "rejected": sum(self.rejected.values()), "failed": len(self.failures)}

    def get(self, timeout_s: float) -> ReceivedUpdate | DeviceFailure | None:
        try:
            return self._queue.get(timeout=max(0.0, timeout_s))
        except queue.Empty:
            return None

    def on_message(self, topic: str, payload: bytes) -> None:
        """Transport callback for `<prefix>/update/<device>`; never raises."""
        try:
            update = self._validate(topic, payload)
        except (wire.WireError, MessageError, ValueError) as exc:
            self._reject(topic, str(exc))
            return
        except Exception as exc:  # a bug here must not take the coordinator down
            log.exception("unexpected error while validating %s", topic)
            self._reject(topic, f"internal error {type(exc).__name__}")
            return
        if update is not None:
            self._queue.put(update)

    def on_transport_reject(self, topic: str, reason: str) -> None:
        """Transport callback for messages refused below the inbox (e.g. oversized chunked ones)."""
        if "/update/" not in topic:
            return
        with self._lock:  # the transport reports each chunk of a refused message; count it once
            if reason in self._transport_reasons:
                return
            self._transport_reasons.add(reason)
        self._reject(topic, reason)

    def _reject(self, topic: str, reason: str) -> None:
        kind = reason.split(":")[0].split("(")[0].strip()[:60]
        with self._lock:
            self.rejected[kind] += 1
        log.warning("rejected update on %s: %s", topic, reason)

    def _validate(self, topic: str, payload: bytes) -> ReceivedUpdate | DeviceFailure | None:
        header_dict, arrays = wire.decode_message(payload, self.max_message_bytes)
        if isinstance(header_dict, dict) and header_dict.get("kind") == "error":
            return self._failure(topic, parse_header(header_dict, ErrorReply))
        header = parse_header(header_dict, UpdateHeader)
        device = self._sender(topic, header, "update")
        with self._lock:
            key = (device, header.round, header.seq)
            if key in self._seen:
                # A QoS 1 redelivery or a replay: harmless, never aggregated twice; counted.
                raise MessageError(f"duplicate: update ({device}, round {header.round}, seq {header.seq}) seen before")
            if header.round != self._round:
                self._seen.add(key)
                self.late += 1
                log.info("late update from %s for round %d (now %d)", device, header.round, self._round)
                return None
            if device not in self._selected:
                raise MessageError(f"unknown device: {device!r} was not selected for round {header.round}")
            if device in self._accepted or device in self.failures:
                raise MessageError(f"second update: {device!r} already replied for round {header.round}")
        delta = decode_vector(header.codec, header.size, arrays, self.size)
        with self._lock:
            self._seen.add(key)  # only valid updates: a bad message must not shadow a good one
            if header.round != self._round:
                self.late += 1
                return None
            self._accepted.add(device)
        return ReceivedUpdate(header, delta, len(payload))

    def _sender(self, topic: str, header: UpdateHeader | ErrorReply, what: str) -> str:
        """The sending device, once the header's device id matches the topic and it is for this federation."""
        device = topic.rsplit("/", 1)[-1]
        if header.device_id != device:
            raise MessageError(f"device id mismatch: header says {header.device_id!r}, topic says {device!r}")
        if header.run_id != self.run_id or header.bundle_sha256 != self.bundle_sha256:
            raise MessageError(f"wrong run or bundle: {what} is for another federation")
        return device

    def _failure(self, topic: str, reply: ErrorReply) -> DeviceFailure | None:
        """An error reply: the same identity checks as an update, then recorded once per device and round."""
        device = self._sender(topic, reply, "error reply")
        failure = {"code": reply.code, "reason": reply.reason}
        with self._lock:
            if reply.round != self._round:
                self.late += 1
                log.info("late error reply from %s for round %d (now %d)", device, reply.round, self._round)
                return None
            if device not in self._selected:
                raise MessageError(f"unknown device: {device!r} was not selected for round {reply.round}")
            if self.failures.get(device) == failure:
                return None  # a QoS 1 redelivery of the same reply
            if device in self._accepted or device in self.failures:
                raise MessageError(f"second reply: {device!r} already replied for round {reply.round}")
            self.failures[device] = failure
        log.warning("device %s failed round %d: %s: %s", device, reply.round, reply.code, reply.reason)
        return DeviceFailure(device, reply.code, reply.reason)
