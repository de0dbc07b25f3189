"""One round's secure aggregation over the link: the coordinator's half of docs/SECAGG.md.

The round loop publishes the task as usual, then `SecureRounds.run` drives the four stages with
a SecAggServer: collect each stage from the devices still in the round, close it, send each
device its answer, and finally unmask the sum. Nothing here sees a single device's update: the
result is the survivors' weighted mean, handed to the strategy as one update.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from edgeftl.coordinator.rounds.inbox import DeviceFailure, Inbox, ReceivedUpdate
from edgeftl.coordinator.rounds.sampling import OnlineDevices
from edgeftl.coordinator.rounds.strategy import Update as StrategyUpdate
from edgeftl.device.link import Incoming, Link, Refused
from edgeftl.device.protocol.messages import SecAgg
from edgeftl.device.secagg import SecAggError, crypto
from edgeftl.device.secagg.fixedpoint import FixedPoint
from edgeftl.device.secagg.messages import Stage, from_payload, to_payload
from edgeftl.device.secagg.server import SecAggServer

log = logging.getLogger("edgeftl.coordinator")
STRATEGIES = ("fedavg", "fedadam", "fedyogi")  # those that only need the weighted mean of the updates
# stage collected -> the server method that takes it, and the one that closes it (None: the last)
_STAGES = (("advertise", "advertise", "roster"), ("share", "share", "ciphertexts"),
           ("masked", "masked", "survivors"), ("unmask", "unmask", None))


@dataclass
class SecureOutcome:
    updates: list[StrategyUpdate]  # the survivors' weighted mean as one update; empty when the round failed
    count: int  # devices whose masked update is in that mean
    failed: list[DeviceFailure] = field(default_factory=list)
    bytes_up: int = 0
    report: dict = field(default_factory=dict)


class SecureRounds:
    """Runs the stages of each round for the coordinator.

    Args:
        link: the coordinator's link.
        take: the loop's handler for everything that is not a secagg message (statuses, error replies).
        inbox: counts refusals in the round record; its run id is the run's.
        online: the registered devices, kept current by `take`.
        grace_s: how long a stage still waits once the round's deadline has passed.
    """

    def __init__(self, link: Link, take: Callable[[Incoming | Refused | None], ReceivedUpdate | DeviceFailure | None],
                 inbox: Inbox, online: OnlineDevices, bundle_sha256: str, size: int, grace_s: float) -> None:
        self.link, self.take, self.inbox, self.online = link, take, inbox, online
        self.bundle_sha256, self.size, self.grace_s = bundle_sha256, size, grace_s

    @property
    def run_id(self) -> str:
        return self.inbox.run_id  # the inbox's: a resumed run takes the checkpoint's id

    def run(self, round_index: int, selected: list[str], deadline: float) -> SecureOutcome:
        ctx = crypto.context(self.run_id, round_index, self.bundle_sha256)
        server = SecAggServer(ctx, selected, self.size, FixedPoint(max_devices=max(2, len(selected))))
        outcome, waiting = SecureOutcome([], 0), set(selected)
        try:
            for stage, receive, close in _STAGES:
                self._collect(server, round_index, stage, getattr(server, receive), waiting, deadline, outcome)
                if close is not None:
                    answers: dict[str, Stage] = getattr(server, close)()
                    for device, answer in answers.items():
                        self._send(round_index, device, answer)
                    waiting = set(answers)
            mean, weight = server.aggregate()
        except SecAggError as exc:
            log.warning("secure aggregation of round %d failed: %s", round_index, exc)
            outcome.report = self._report(server, str(exc))
            return outcome
        outcome.updates, outcome.count = [StrategyUpdate(mean, float(weight))], len(server.inputs)
        outcome.report = {**self._report(server, None), "total_weight": weight,
                          "max_error": server.fixed.max_error(len(server.inputs), weight)}
        return outcome

    def _collect(self, server: SecAggServer, round_index: int, stage: str, receive: Callable[[str, Stage], None],
                 waiting: set[str], deadline: float, outcome: SecureOutcome) -> None:
        """Take `stage` replies until every device still in the round sent one, failed or went offline."""
        end = max(deadline, time.monotonic() + self.grace_s)
        done: set[str] = set()
        while time.monotonic() < end and not waiting <= done | self._gone(outcome):
            item = self.link.receive(timeout_s=min(0.5, max(0.0, end - time.monotonic())))
            if isinstance(item, Refused) and item.place == "secagg_up":
                self.inbox.refuse(item.place, item.device_id, item.reason)
                continue
            if not (isinstance(item, Incoming) and isinstance(item.message, SecAgg)):
                result = self.take(item)
                if isinstance(result, DeviceFailure):
                    outcome.failed.append(result)
                elif isinstance(result, ReceivedUpdate):
                    self.inbox.refuse("update", result.update.device_id, "plain update: the round is secure; "
                                      "devices must send masked vectors")
                continue
            message = item.message
            if (message.run_id, message.bundle_sha256) != (self.run_id, self.bundle_sha256) or \
                    message.round != round_index:
                self.inbox.refuse("secagg_up", message.device_id, f"late or foreign: secagg {message.stage} "
                                  f"for round {message.round} of another run, bundle or round")
                continue
            try:
                if message.stage != stage:
                    raise SecAggError(f"wrong stage: {message.stage} while the round collects {stage}")
                receive(message.device_id, from_payload(message.stage, message.payload, message.masked))
            except SecAggError as exc:
                self.inbox.refuse("secagg_up", message.device_id, str(exc))
                continue
            done.add(message.device_id)
            outcome.bytes_up += item.nbytes

    def _gone(self, outcome: SecureOutcome) -> set[str]:
        return {f.device_id for f in outcome.failed} | self.online.offline

    def _send(self, round_index: int, device: str, answer: Stage) -> None:
        name, payload, masked = to_payload(answer)
        self.link.send(SecAgg(self.run_id, round_index, self.bundle_sha256, device, name, payload, masked))

    @staticmethod
    def _report(server: SecAggServer, error: str | None) -> dict:
        params = server.params
        return {"advertised": len(server.keys), "shared": len(server.sealed), "masked": len(server.inputs),
                "unmasked": len(server.unmasks), "threshold": params.threshold if params else None,
                "error": error}
