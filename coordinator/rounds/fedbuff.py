"""Asynchronous buffered aggregation (FedBuff, Nguyen et al. 2022): `edgeftl coordinator --mode async`.

Synchronous rounds wait for the slowest sampled device. Here at most C devices train at a time
(C = --devices-per-round, 0 = every online device); each was invited by a task and trains once on
the latest global it holds. Each reply frees its slot. The loop reads as a story per global version:
fill the free slots (one retained task per version names the newly invited devices, so fan-out is
one message per version, not per update), collect until the buffer holds K (--buffer) updates or
the deadline passes, weight each update by its samples times 1/sqrt(1 + staleness), aggregate with
the run's strategy, checkpoint, publish the new version, record it.

Staleness = versions published since the one an update was trained on; updates staler than
--max-staleness are refused (async_inbox.py). A device's delta is against its own base version and
is applied to the current global: that is FedBuff. Resume and secure aggregation are refused in
config.py (one line each, with the reason).
"""

from __future__ import annotations

import logging
import math
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import numpy as np

from edgeftl.coordinator.rounds import checkpoint
from edgeftl.coordinator.rounds.accumulate import Accepted, KeptUpdates
from edgeftl.coordinator.rounds.async_inbox import AsyncInbox
from edgeftl.coordinator.rounds.config import CoordinatorConfig
from edgeftl.coordinator.rounds.inbox import DeviceFailure, ReceivedUpdate
from edgeftl.coordinator.rounds.loop import Coordinator
from edgeftl.coordinator.rounds.sampling import OnlineDevices
from edgeftl.coordinator.rounds.strategy import Update as StrategyUpdate
from edgeftl.device.link import Link
from edgeftl.device.protocol.manifest import Manifest
from edgeftl.device.protocol.messages import Task

log = logging.getLogger("edgeftl.coordinator")


def staleness_weight(staleness: int) -> float:
    """FedBuff's polynomial staleness discount: a fresh update counts 1, one 3 versions old 0.5."""
    return 1.0 / math.sqrt(1.0 + staleness)


def staleness_summary(values: list[int]) -> dict:
    """What a version's record says about the staleness of the updates it used."""
    if not values:
        return {}
    return {"min": min(values), "median": float(np.median(values)), "max": max(values),
            "histogram": {str(s): n for s, n in sorted(Counter(values).items())}}


def buffered_updates(buffer: list[tuple[ReceivedUpdate, int]]) -> list[StrategyUpdate]:
    """The buffer as the strategy sees it: each delta weighted by samples x staleness_weight."""
    return [StrategyUpdate(r.delta, float(r.update.samples) * staleness_weight(s)) for r, s in buffer]


class FedBuffCoordinator(Coordinator):
    """Produces `config.rounds` global versions, each from `config.buffer` updates (fewer at the deadline)."""

    def __init__(self, link: Link, bundle: Path, manifest: Manifest, initial: np.ndarray,
                 config: CoordinatorConfig, evaluate: Callable[[np.ndarray], dict] | None = None,
                 on_round: Callable[[dict], None] | None = None) -> None:
        super().__init__(link, bundle, manifest, initial, config, evaluate, on_round)
        self.inbox = AsyncInbox(config.run_id, self.bundle_sha256, self.params.size,  # type: ignore[assignment]
                                config.max_staleness)
        self.async_inbox: AsyncInbox = self.inbox  # type: ignore[assignment]
        self.began = time.monotonic()
        self._warned_slots = False

    def run(self) -> list[dict]:
        self.began = time.monotonic()
        return [self.run_round(version) for version in range(self.start_round, self.config.rounds)]

    def run_round(self, round_index: int) -> dict:
        """Global version `round_index`: fill slots, buffer K updates, aggregate, checkpoint, publish."""
        started, version = time.monotonic(), round_index
        self.async_inbox.version = version - 1
        online = self._online_count()
        sent_before = self.link.bytes_sent
        invited = self._refill(version)
        buffer, failed = self._buffer(started + self.config.deadline_s)
        counted = self.inbox.close_round()
        self.guarded = {}
        aggregated, refused_globals = len(buffer) >= self.config.min_updates, None
        if aggregated:  # the buffer is K updates at most: kept whole (StreamingMean's cap needs the journal)
            refused_globals = self._aggregate(KeptUpdates(buffered_updates(buffer)), version, len(invited), online)
            aggregated = refused_globals is None
        delta = self._advance_reference()
        received = [Accepted.of(r.update.device_id, r.update.samples, r.update.metrics, r.payload_bytes)
                    for r, _ in buffer]
        record = self._record(version, invited, received, failed, counted, aggregated,
                              self.link.bytes_sent - sent_before, time.monotonic() - started)
        record.update(self._async_fields(version, buffer, counted.rejected.get("stale", 0)))
        if refused_globals:
            record["global_refused"] = refused_globals
        checkpoint.save(self.config.out, version, self.params, self.reference, self.strategy.state(),
                        {"run_id": self.config.run_id, "bundle_sha256": self.bundle_sha256, "mode": "async"}, record)
        record["bytes_published"] += self._publish_global(version, delta)
        self.async_inbox.version = version
        self._log(record)
        return record

    def _refill(self, version: int) -> list[str]:
        """Invite idle online devices into the free slots with one task (none when no slot is free).
        The task's round is `version`: it asks for an update on global version - 1 or newer."""
        online = self.online.online
        slots = self.config.devices_per_round or len(online)
        if slots < self.config.buffer and not self._warned_slots:
            self._warned_slots = True
            log.warning("only %d device(s) can train at a time for a buffer of %d: each version waits for the "
                        "deadline (%g s)", slots, self.config.buffer, self.config.deadline_s)
        free = slots - self.async_inbox.training()
        idle = self.async_inbox.idle(online)
        if free <= 0 or not idle:
            return []
        chosen = self.sampler.sample(idle_view(idle, self.online), free, version)  # --sample's mode
        c = self.config
        self.task = Task(c.run_id, version, self.bundle_sha256, tuple(chosen), c.deadline_s, c.round_lr(version),
                         c.codec, c.epochs, c.steps, c.batch, mode="async", framing=c.framing)
        self.async_inbox.invite(chosen, version, time.monotonic())
        self.link.send(self.task)
        return chosen

    def _buffer(self, deadline: float) -> tuple[list[tuple[ReceivedUpdate, int]], list[DeviceFailure]]:
        """Updates (with their staleness) until the buffer holds K or the deadline passes; the
        failures seen meanwhile (error replies, wills, invitations past the deadline)."""
        buffer: list[tuple[ReceivedUpdate, int]] = []
        failed: list[DeviceFailure] = []
        connects, next_expiry = self.link.connects, 0.0
        while len(buffer) < self.config.buffer and time.monotonic() < deadline:
            if self.link.connects != connects:  # a broker restart lost the retained messages: publish them again
                connects = self.link.connects
                self._publish_full(self.async_inbox.version)
                if hasattr(self, "task"):
                    self.link.send(self.task)
            if time.monotonic() >= next_expiry:  # a pass over the open invitations, twice a second at most
                failed += self.async_inbox.expire(time.monotonic(), self.config.deadline_s)
                next_expiry = time.monotonic() + 0.5
            reply = self._take(self.link.receive(timeout_s=max(0.0, min(0.5, deadline - time.monotonic()))))
            if isinstance(reply, DeviceFailure):
                failed.append(reply)
            elif reply is not None:
                buffer.append((reply, self.async_inbox.staleness(reply.update)))
        return buffer, failed

    def _async_fields(self, version: int, buffer: list[tuple[ReceivedUpdate, int]], refused_stale: int) -> dict:
        """What a version's record adds to a round's: the buffer's staleness, and time since the start."""
        return {"mode": "async", "version": version, "updates_used": len(buffer),
                "staleness": staleness_summary([s for _, s in buffer]), "refused_stale": refused_stale,
                "devices_training": self.async_inbox.training(), "elapsed_s": round(time.monotonic() - self.began, 3)}


def idle_view(idle: list[str], online: OnlineDevices) -> OnlineDevices:
    """The idle online devices as the sampler reads a fleet (their ids and reported memory)."""
    view = OnlineDevices()
    view.online, view.memory_mib = set(idle), online.memory_mib
    return view


def make_coordinator(link: Link, bundle: Path, manifest: Manifest, initial: np.ndarray, config: CoordinatorConfig,
                     evaluate: Callable[[np.ndarray], dict] | None = None,
                     on_round: Callable[[dict], None] | None = None) -> Coordinator:
    """The coordinator `config.mode` asks for: synchronous rounds, or FedBuff versions."""
    kind = FedBuffCoordinator if config.mode == "async" else Coordinator
    return kind(link, bundle, manifest, initial, config, evaluate, on_round)
