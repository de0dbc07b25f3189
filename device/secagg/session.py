"""A device's secure aggregation over the link: one SecAggClient per task, stages as SecAgg messages.

The agent calls `begin(task)` before it trains (stage 0 goes out at once), `submit(...)` with the
trained delta instead of sending an Update, and `handle(message)` for each SecAgg message. A
refused stage ends this device's part in the round (logged); it never falls back to a plain update.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from edgeftl.device.protocol.messages import SecAgg, Task
from edgeftl.device.secagg import crypto
from edgeftl.device.secagg.client import SecAggClient
from edgeftl.device.secagg.errors import SecAggError
from edgeftl.device.secagg.messages import Ciphertexts, Roster, Stage, Survivors, from_payload, to_payload

log = logging.getLogger("edgeftl.device")


@dataclass
class _Round:
    task: Task
    client: SecAggClient
    update: tuple[np.ndarray, int] | None = None  # (delta, samples) once trained
    ciphertexts: Ciphertexts | None = None  # once stage 1 closed


class DeviceSecAgg:
    """Secure aggregation for one device across rounds.

    Args:
        send: the link's send (a SecAgg message to the coordinator).
        device_id: this device.
        bundle_sha256: the bundle every message must name.
        sign, verify: the identity-key hooks of SecAggClient (signed advertisements; docs/SECAGG.md section 8).
    """

    def __init__(self, send: Callable[[SecAgg], object], device_id: str, bundle_sha256: str,
                 sign: Callable[[bytes], bytes] | None = None,
                 verify: Callable[[str, bytes, bytes], bool] | None = None) -> None:
        self.send, self.device_id, self.bundle_sha256 = send, device_id, bundle_sha256
        self.sign, self.verify = sign, verify
        self.current: _Round | None = None

    def begin(self, task: Task) -> None:
        """Open the round: fresh keys, advertised before training so the coordinator can build the roster."""
        ctx = crypto.context(task.run_id, task.round, self.bundle_sha256)
        self.current = _Round(task, SecAggClient(self.device_id, ctx, self.sign, self.verify))
        self._send(self.current.client.advertise())

    def submit(self, task: Task, delta: np.ndarray, samples: int) -> int:
        """The trained delta; it goes out masked once stage 1 has closed. Returns updates completed (0)."""
        if self.current is None or self.current.task != task:
            log.warning("%s: no secure-aggregation session for round %d; the update is not sent",
                        self.device_id, task.round)
            return 0
        self.current.update = (delta, samples)
        return self._try_mask()

    def abandon(self) -> None:
        """Leave the round (training failed): later stages for it are ignored, so the device drops out."""
        self.current = None

    def handle(self, message: SecAgg) -> int:
        """Answer one stage from the coordinator; returns 1 when this device's part in the round is done."""
        now = self.current
        if (now is None or message.run_id != now.task.run_id or message.round != now.task.round
                or message.bundle_sha256 != self.bundle_sha256 or message.device_id != self.device_id):
            log.info("%s: ignored a secagg %s for another round", self.device_id, message.stage)
            return 0
        try:
            stage = from_payload(message.stage, message.payload, message.masked)
            if isinstance(stage, Roster):
                self._send(now.client.share(stage))
            elif isinstance(stage, Ciphertexts):
                now.client.receive(stage)
                now.ciphertexts = stage
                return self._try_mask()
            elif isinstance(stage, Survivors):
                self._send(now.client.unmask(stage))
                self.current = None
                return 1
            else:
                raise SecAggError(f"bad stage: {message.stage!r} is not sent to devices")
        except SecAggError as exc:
            log.warning("%s: secure aggregation of round %d stopped: %s", self.device_id, now.task.round, exc)
            self.current = None
        return 0

    def _try_mask(self) -> int:
        now = self.current
        if now is None or now.update is None or now.ciphertexts is None:
            return 0
        delta, samples = now.update
        try:
            self._send(now.client.mask(delta, samples))
        except SecAggError as exc:
            log.warning("%s: could not mask round %d: %s", self.device_id, now.task.round, exc)
            self.current = None
        now.update = None  # the plain delta is not kept once masked
        return 0

    def _send(self, stage: Stage) -> None:
        assert self.current is not None
        task = self.current.task
        name, payload, masked = to_payload(stage)
        self.send(SecAgg(task.run_id, task.round, self.bundle_sha256, self.device_id, name, payload, masked))
