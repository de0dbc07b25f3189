"""The coordinator's inbox: what the round loop does with each update or error reply it receives.

The link has already checked the bytes, the header fields and that the sender named in the
message is the device whose topic it came on. Here the message is checked against the round:
run id and bundle, round, sampled device, one reply per device, then the vector (codec, length,
finiteness). A refusal is counted under its reason (`reason: details`) and logged; a QoS 1
redelivery of an update already taken is dropped quietly (docs/PROTOCOL.md sections 7 and 8).

Counters (refused, late, redelivered) run from one `close_round` to the next, so what arrives
between rounds is reported with the next round instead of being lost; the duplicate check
remembers the open round's updates only, so it never grows with the run.
"""

from __future__ import annotations

import logging
import threading
from collections import Counter
from dataclasses import dataclass, field

import numpy as np

from edgeftl.device.protocol.messages import ErrorReply, MessageError, Update, reason_kind, vector_of

log = logging.getLogger("edgeftl.coordinator")


@dataclass
class ReceivedUpdate:
    update: Update
    delta: np.ndarray
    payload_bytes: int


@dataclass
class DeviceFailure:
    device_id: str
    code: str
    reason: str
    reply: ErrorReply | None = field(default=None, compare=False)  # None when the coordinator noted it (OFFLINE)


OFFLINE = "offline"  # the failure code of a sampled device whose will arrived before its reply


@dataclass
class Counted:
    """What the inbox counted between two `close_round` calls, for the round record."""

    late: int
    redelivered: int
    rejected: dict[str, int]  # reason -> count
    rejected_places: dict[str, int]  # topic place (update, status, ...) -> count


class Inbox:
    """Checks replies against the open round; `progress()` may be read from another thread."""

    def __init__(self, run_id: str, bundle_sha256: str, size: int) -> None:
        self.run_id, self.bundle_sha256, self.size = run_id, bundle_sha256, size
        self._lock = threading.Lock()
        self._round = -1
        self._selected: set[str] = set()
        self._seen: set[tuple[str, int]] = set()  # (device, seq) of updates taken in the open round
        self._accepted: set[str] = set()
        self.failures: dict[str, dict[str, str]] = {}  # device -> {"code", "reason"}, this round
        self.rejected: Counter[str] = Counter()  # reason -> count, since the last close_round
        self.rejected_places: Counter[str] = Counter()  # topic place (update, status, ...) -> count
        self.late = self.redelivered = 0

    def open_round(self, round_index: int, selected: list[str]) -> None:
        with self._lock:
            self._round, self._selected = round_index, set(selected)
            self._accepted, self.failures, self._seen = set(), {}, set()

    def close_round(self) -> Counted:
        """Stop accepting for this round; return what was counted since the previous close and
        start counting afresh."""
        with self._lock:
            self._round = -1
            counted = Counted(self.late, self.redelivered, dict(self.rejected), dict(self.rejected_places))
            self.late, self.redelivered, self.rejected, self.rejected_places = 0, 0, Counter(), Counter()
            return counted

    def progress(self) -> dict:
        """The round in progress: its index (-1 between rounds) and counters, for live displays."""
        with self._lock:
            return {"round": self._round, "selected": len(self._selected), "received": len(self._accepted),
                    "late": self.late, "rejected": sum(self.rejected.values()), "failed": len(self.failures)}

    def take(self, message: Update | ErrorReply, nbytes: int) -> ReceivedUpdate | DeviceFailure | None:
        """The reply as the round uses it, or None (late, redelivered, refused: counted)."""
        try:
            if isinstance(message, ErrorReply):
                return self._failure(message)
            return self._update(message, nbytes)
        except MessageError as exc:
            self.refuse("update", message.device_id, str(exc))
            return None

    def refuse(self, place: str | None, device: str | None, reason: str) -> None:
        """Count a refusal under its reason (the text before the first ':') and its topic's place."""
        with self._lock:
            self.rejected[reason_kind(reason)] += 1
            self.rejected_places[place or "other"] += 1
        log.warning("rejected a message on %s/%s: %s", place or "other", device or "-", reason)

    def _update(self, update: Update, nbytes: int) -> ReceivedUpdate | None:
        device = self._check_federation(update, "update")
        key = (device, update.seq)
        with self._lock:
            if key in self._seen:
                self.redelivered += 1  # a QoS 1 redelivery: dropped quietly, never aggregated twice
                return None
            if self._is_late(device, update.round, "update"):
                return None
            if device in self._accepted or self.failures.get(device, {}).get("code", OFFLINE) != OFFLINE:
                raise MessageError(f"second update: {device!r} already replied for round {update.round}")
        delta = vector_of(update, self.size)
        with self._lock:
            self.failures.pop(device, None)  # back after its will, in time: its update counts
            self._seen.add(key)  # only valid updates: a bad message must not shadow a good one
            self._accepted.add(device)
        return ReceivedUpdate(update, delta, nbytes)

    def _failure(self, reply: ErrorReply) -> DeviceFailure | None:
        """An error reply: the same checks as an update, then recorded once per device and round."""
        device = self._check_federation(reply, "error reply")
        failure = {"code": reply.code, "reason": reply.reason}
        with self._lock:
            if self._is_late(device, reply.round, "error reply"):
                return None
            if self.failures.get(device) == failure:
                self.redelivered += 1  # a QoS 1 redelivery of the same reply
                return None
            if device in self._accepted or device in self.failures:
                raise MessageError(f"second reply: {device!r} already replied for round {reply.round}")
            self.failures[device] = failure
        log.warning("device %s failed round %d: %s: %s", device, reply.round, reply.code, reply.reason)
        return DeviceFailure(device, reply.code, reply.reason, reply)

    def offline(self, device: str) -> DeviceFailure | None:
        """A sampled device's will arrived before its reply: stop waiting for it (an update that
        still comes this round is taken and replaces the failure)."""
        with self._lock:
            if self._round < 0 or device not in self._selected or device in self._accepted or device in self.failures:
                return None
            reason = f"its status went offline before it replied to round {self._round}"
            self.failures[device] = {"code": OFFLINE, "reason": reason}
        log.warning("device %s went offline during round %d", device, self._round)
        return DeviceFailure(device, OFFLINE, reason)

    def _check_federation(self, message: Update | ErrorReply, what: str) -> str:
        if message.run_id != self.run_id or message.bundle_sha256 != self.bundle_sha256:
            raise MessageError(f"wrong run or bundle: {what} is for another federation")
        return message.device_id

    def _is_late(self, device: str, round_index: int, what: str) -> bool:
        """True (and counted) for another round's reply; raises for a device not sampled. Under the lock."""
        if round_index != self._round:
            self.late += 1
            log.info("late %s from %s for round %d (now %d)", what, device, round_index, self._round)
            return True
        if device not in self._selected:
            raise MessageError(f"unknown device: {device!r} was not selected for round {round_index}")
        return False
