"""The async coordinator's inbox (FedBuff, docs/PROTOCOL.md section 6.1): replies checked against
invitations instead of one open round.

An async run has no rounds to close: a device is invited (named in a task of round r, which asks
for one update trained on global version r - 1 or newer) and holds its invitation, its "slot",
until it replies, goes offline or the deadline passes. An update names the version it was trained
on as `round - 1`; its staleness is the current version minus that. An update staler than
`max_staleness` is refused ("stale: ...") and frees the slot like any reply. The same interface as
`Inbox` (take, refuse, offline, close_round, progress), so the loop's `_take` serves both.

Counters run from one `close_round` to the next (one global version); what it remembers per device
is one invitation and the last sequence number, so it grows with the devices seen, not the updates.
"""

from __future__ import annotations

import logging
import threading
from collections import Counter
from collections.abc import Iterable

from edgeftl.coordinator.rounds.inbox import OFFLINE, Counted, DeviceFailure, ReceivedUpdate
from edgeftl.device.protocol.messages import ErrorReply, MessageError, Update, reason_kind, vector_of

log = logging.getLogger("edgeftl.coordinator")
LAPSED = "deadline"  # the failure code of an invitation that got no reply within --deadline-s


class AsyncInbox:
    """Invitations and the replies that end them; `progress()` may be read from another thread."""

    def __init__(self, run_id: str, bundle_sha256: str, size: int, max_staleness: int) -> None:
        self.run_id, self.bundle_sha256, self.size, self.max_staleness = run_id, bundle_sha256, size, max_staleness
        self._lock = threading.Lock()
        self.version = -1  # the newest global version published
        self.invited: dict[str, tuple[int, float]] = {}  # device -> (task round, when it was invited)
        self._last_seq: dict[str, int] = {}  # device -> seq of its last update taken (redeliveries repeat it)
        self._lapsed: set[str] = set()  # devices whose invitation ended without a reply: a reply now is late
        self.rejected: Counter[str] = Counter()
        self.rejected_places: Counter[str] = Counter()
        self.late = self.redelivered = 0
        self._taken = self._failed = 0  # updates and failures taken this version (live display)

    # ---- invitations ----------------------------------------------------------------------
    def invite(self, devices: Iterable[str], task_round: int, now: float) -> None:
        with self._lock:
            for device in devices:
                self.invited[device] = (task_round, now)
                self._lapsed.discard(device)

    def training(self) -> int:
        with self._lock:
            return len(self.invited)

    def idle(self, online: Iterable[str]) -> list[str]:
        """The online devices without an invitation, sorted (the candidates for free slots)."""
        with self._lock:
            return sorted(d for d in online if d not in self.invited)

    def expire(self, now: float, deadline_s: float) -> list[DeviceFailure]:
        """End the invitations older than `deadline_s`: their slots are free again."""
        with self._lock:
            old = [d for d, (_, since) in self.invited.items() if now - since >= deadline_s]
            for device in old:
                self._end(device)
        for device in old:
            log.warning("device %s did not reply within %g s of its invitation", device, deadline_s)
        return [DeviceFailure(d, LAPSED, f"no reply within {deadline_s:g} s of its invitation") for d in old]

    def _end(self, device: str) -> None:
        """Under the lock: the device's slot is free; a reply to the ended invitation is late."""
        del self.invited[device]
        self._lapsed.add(device)

    # ---- replies ------------------------------------------------------------------------------
    def take(self, message: Update | ErrorReply, nbytes: int) -> ReceivedUpdate | DeviceFailure | None:
        """The reply as the loop uses it, or None (late, redelivered, refused: counted)."""
        try:
            if message.run_id != self.run_id or message.bundle_sha256 != self.bundle_sha256:
                raise MessageError("wrong run or bundle: reply is for another federation")
            if isinstance(message, ErrorReply):
                return self._failure(message)
            return self._update(message, nbytes)
        except MessageError as exc:
            self.refuse("update", message.device_id, str(exc))
            return None

    def staleness(self, update: Update) -> int:
        """Versions published since the one the update was trained on (its round - 1)."""
        return self.version - (update.round - 1)

    def _update(self, update: Update, nbytes: int) -> ReceivedUpdate | None:
        device = update.device_id
        with self._lock:
            if update.seq <= self._last_seq.get(device, -1):
                self.redelivered += 1  # a QoS 1 redelivery (or an older update): never aggregated twice
                return None
            if self._is_late(device, update.round, "update"):
                return None
            base = update.round - 1
            if base > self.version:
                raise MessageError(f"bad round: update trained on version {base}, the newest is {self.version}")
            if self.staleness(update) > self.max_staleness:
                self._end(device)  # it replied: the slot is free, the update is not used
                self._last_seq[device] = update.seq
                raise MessageError(f"stale: update trained on version {base}, now {self.version} "
                                   f"({self.staleness(update)} behind, --max-staleness {self.max_staleness})")
        delta = vector_of(update, self.size)  # a bad vector is refused; the invitation stays open
        with self._lock:
            if device not in self.invited:  # ended while the vector was checked (another thread: never here)
                return None
            del self.invited[device]
            self._last_seq[device] = update.seq
            self._taken += 1
        return ReceivedUpdate(update, delta, nbytes)

    def _failure(self, reply: ErrorReply) -> DeviceFailure | None:
        device = reply.device_id
        with self._lock:
            if self._is_late(device, reply.round, "error reply"):
                return None
            del self.invited[device]
            self._failed += 1
        log.warning("device %s failed its async task (round %d): %s: %s", device, reply.round, reply.code,
                    reply.reason)
        return DeviceFailure(device, reply.code, reply.reason, reply)

    def _is_late(self, device: str, round_index: int, what: str) -> bool:
        """Under the lock: True (counted) for a reply to an ended or earlier invitation; raises for a
        device never invited."""
        invitation = self.invited.get(device)
        if invitation is None and device not in self._lapsed:
            raise MessageError(f"unknown device: {device!r} holds no invitation")
        if invitation is None or round_index < invitation[0]:
            self.late += 1
            log.info("late %s from %s for round %d", what, device, round_index)
            return True
        return False

    def offline(self, device: str) -> DeviceFailure | None:
        """An invited device's will: its slot is free (an update it still sends is late)."""
        with self._lock:
            if device not in self.invited:
                return None
            self._end(device)
        log.warning("device %s went offline while invited", device)
        return DeviceFailure(device, OFFLINE, "its status went offline before it replied to its invitation")

    def refuse(self, place: str | None, device: str | None, reason: str) -> None:
        with self._lock:
            self.rejected[reason_kind(reason)] += 1
            self.rejected_places[place or "other"] += 1
        log.warning("rejected a message on %s/%s: %s", place or "other", device or "-", reason)

    # ---- per version ----------------------------------------------------------------------
    def close_round(self) -> Counted:
        """What was counted since the previous call (one version's worth); counting starts afresh."""
        with self._lock:
            counted = Counted(self.late, self.redelivered, dict(self.rejected), dict(self.rejected_places))
            self.late, self.redelivered, self.rejected, self.rejected_places = 0, 0, Counter(), Counter()
            self._taken = self._failed = 0
            return counted

    def progress(self) -> dict:
        with self._lock:
            return {"round": self.version + 1, "selected": len(self.invited) + self._taken + self._failed,
                    "received": self._taken, "late": self.late, "rejected": sum(self.rejected.values()),
                    "failed": self._failed}
