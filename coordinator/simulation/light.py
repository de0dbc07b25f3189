"""Light devices: the device protocol without training, for fleets of thousands (docs/PROTOCOL.md).

A `LightDevice` does what `device/agent.py` does on the wire (birth and will statuses with a card,
task and global-delta subscriptions, the retained full global while it catches up, one reply per
sampled round, error replies, the same reply again when the retained task comes again) but its
update is a precomputed synthetic delta of the bundle's trainable size, encoded with the task's
codec (an async task, docs/PROTOCOL.md section 6.1.1: "trained" on the newest global held,
and named so in the update's round). It tracks which global round it holds from the globals'
headers (no vector arithmetic, so no params_sha256 check: its update does not depend on the
parameters). It owns no socket: a `Port` moves its frames (fleet.py drives thousands of them over
paho-mqtt clients in one selectors loop; tests use a recording port). `Shared` holds what every
light device of a process has in common: the bundle's identity, decoded messages (each distinct
task or global is checked and decoded once per process, not once per client) and encoded deltas.
"""

from __future__ import annotations

import zlib
from collections import OrderedDict, deque
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from edgeftl.device.agent import GLOBAL_WAIT_S
from edgeftl.device.link.framing import Framer
from edgeftl.device.link.link import DEFAULT_MAX_CHUNK, DEFAULT_MAX_MESSAGE_BYTES
from edgeftl.device.protocol.codecs import Encoded, parse_codec
from edgeftl.device.protocol.messages import (
    ErrorReply,
    Global,
    Message,
    MessageError,
    Status,
    Task,
    Update,
    check_place,
    decode,
    encode,
    one_line,
    reply_version,
    status_payload,
)
from edgeftl.device.protocol.topics import Topics

DECODED_KEPT = 16  # distinct task/global payloads remembered per process (a round brings two or three)


@dataclass(frozen=True)
class Behaviour:
    """How light devices behave: reply delays spread over `spread`x (log-uniform from `delay_s`),
    and per sampled task the chance of an error reply (`fail`) or of vanishing (`dropout`: the
    connection drops, the broker sends the will, the device comes back after `offline_s`)."""

    delay_s: float = 0.0
    spread: float = 10.0
    fail: float = 0.0
    dropout: float = 0.0
    offline_s: float = 30.0
    samples: int = 32

    def __post_init__(self) -> None:
        if not (self.delay_s >= 0 and self.spread >= 1 and self.offline_s >= 0 and self.samples >= 1):
            raise ValueError(f"need delay_s >= 0, spread >= 1, offline_s >= 0, samples >= 1; got {self}")
        if not (0 <= self.fail <= 1 and 0 <= self.dropout <= 1 and self.fail + self.dropout <= 1):
            raise ValueError(f"fail ({self.fail}) and dropout ({self.dropout}) are probabilities summing to <= 1")


class Port(Protocol):
    """What a light device needs from its connection."""

    def publish(self, topic: str, payload: bytes, retain: bool) -> None: ...

    def subscribe(self, filters: list[str]) -> None: ...

    def unsubscribe(self, filters: list[str]) -> None: ...

    def drop(self, offline_s: float) -> None:
        """Close the connection abruptly (no DISCONNECT: the will goes out) and reconnect later."""


class Shared:
    """One process's common knowledge: the bundle, the topics, decoded messages, encoded deltas."""

    def __init__(self, prefix: str, bundle_sha256: str, size: int, seed: int = 0) -> None:
        self.topics, self.bundle_sha256, self.size = Topics(prefix), bundle_sha256, size
        self.delta = (np.random.default_rng(seed).standard_normal(size) * 1e-3).astype(np.float32)
        self._encoded: dict[str, Encoded] = {}
        self._decoded: OrderedDict[bytes, Message | None] = OrderedDict()

    def encoded(self, codec: str) -> Encoded:
        """The synthetic delta under `codec` (a real codec's payload; encoded once per codec)."""
        spec = parse_codec(codec).spec
        if spec not in self._encoded:
            self._encoded[spec] = parse_codec(spec).encode(self.delta)
        return self._encoded[spec]

    def message(self, topic: str, payload: bytes) -> Message | None:
        """The task or global these bytes carry, checked as a device's link checks it; None if refused."""
        if payload in self._decoded:
            self._decoded.move_to_end(payload)
            return self._decoded[payload]
        place = self.topics.parse(topic)
        message: Message | None = None
        if place is not None and place[0] in ("task", "global", "delta"):
            try:
                message = decode(payload, DEFAULT_MAX_MESSAGE_BYTES)
                check_place(place[0], place[1], message)
            except MessageError:
                message = None
        self._decoded[payload] = message
        while len(self._decoded) > DECODED_KEPT:
            self._decoded.popitem(last=False)
        return message


class LightDevice:
    """One light device: feed it frames (`on_frame`) and the clock (`tick`); it answers through `port`."""

    def __init__(self, device_id: str, shared: Shared, behaviour: Behaviour, port: Port) -> None:
        self.device_id, self.shared, self.behaviour, self.port = device_id, shared, behaviour, port
        self.rng = np.random.default_rng(zlib.crc32(device_id.encode()))
        self.delay_s = behaviour.delay_s * float(behaviour.spread ** self.rng.random())
        self.framer = Framer(DEFAULT_MAX_CHUNK, DEFAULT_MAX_MESSAGE_BYTES)
        self.card: dict[str, str | int | float] = {"platform_machine": "light", "bundle_sha256": shared.bundle_sha256,
                                                   "rounds_done": 0, "mem_available_mib": self.memory_mib()}
        self.run_id: str | None = None
        self.global_round: int | None = None
        self.syncing = False
        self.waiting: tuple[Task, float] | None = None  # a task whose global has not arrived, and until when
        self.due: tuple[Task, float] | None = None  # a task being "trained", and when its reply goes out
        self.acted: tuple[str, int] | None = None
        self.trained_on: int | None = None  # the global version the task being "trained" started from
        self.reply: Update | ErrorReply | None = None
        self.seq = self.updates_sent = self.errors_sent = 0
        self.leaving = False  # goodbye() said: its own offline status coming back is not answered
        self.wills: deque[bytes] = deque(maxlen=16)  # the wills its connections were given (will())

    def memory_mib(self) -> int:
        """The free memory this light device claims, spread log-uniformly over 256-4096 MiB (fixed
        per device id), so that `--sample memory` has a fleet of phones and boards to choose from."""
        return int(256 * 16 ** float(np.random.default_rng(zlib.crc32(b"mem:" + self.device_id.encode())).random()))

    # ---- presence -----------------------------------------------------------------------------
    def presence(self) -> tuple[str, bytes, bytes]:
        """(status topic, birth, will) as the link's device presence makes them, the card included."""
        birth = status_payload(Status(self.device_id, True, self.card))
        will = status_payload(Status(self.device_id, False, {**self.card, "will": 1}))
        return self.shared.topics.status(self.device_id), birth, will

    def on_connect(self) -> None:
        """Subscriptions, then the birth (retained): a broker handles one client's packets in order, so
        whoever sees this device online can reach it (a NATS node creates the subscriptions' stream
        consumers first). The retained full global is read until it arrives."""
        t = self.shared.topics
        self.port.subscribe([f for name in (t.task, t.global_delta, t.global_params) for f in Framer.filters(name)])
        self.syncing = True
        topic, birth, _ = self.presence()
        self.port.subscribe([topic])  # its own status: a stale will there is answered (on_frame)
        self.port.publish(topic, birth, True)

    def will(self) -> tuple[str, bytes]:
        """(status topic, will) for the next connection, remembered: that will coming back while this device
        is connected is stale (a broker published it late for a connection already replaced)."""
        topic, _, will = self.presence()
        self.wills.append(will)
        return topic, will

    def goodbye(self) -> bytes:
        """The offline status a graceful leave publishes (retained); from now on it is not answered."""
        self.leaving = True
        return status_payload(Status(self.device_id, False, self.card))

    # ---- incoming -----------------------------------------------------------------------------
    def on_frame(self, topic: str, frame: bytes, now: float) -> None:
        own, birth, _ = self.presence()
        if topic == own:  # connected, yet one of its wills is its status (the broker sent it late): birth again
            if frame in self.wills and not self.leaving:
                self.port.publish(own, birth, True)
            return
        try:
            done = self.framer.receive(topic, frame)
        except ValueError:  # a bad chunk: a device ignores it, the deadline covers the rest
            return
        message = None if done is None else self.shared.message(*done)
        if isinstance(message, Global):
            self._on_global(message)
        elif isinstance(message, Task):
            self._on_task(message, now)

    def _on_global(self, message: Global) -> None:
        if message.bundle_sha256 != self.shared.bundle_sha256:
            return
        if message.run_id != self.run_id:
            self.run_id, self.global_round = message.run_id, None
        if not message.is_delta:
            if self.global_round is None or message.round > self.global_round:
                self.global_round = message.round
            self._sync(False)
        elif message.base_round == self.global_round is not None:
            self.global_round = message.round
        else:
            self._sync(True)  # missed a round: read the retained full global once

    def _sync(self, on: bool) -> None:
        if on != self.syncing:
            self.syncing = on
            filters = Framer.filters(self.shared.topics.global_params)
            (self.port.subscribe if on else self.port.unsubscribe)(filters)

    def _on_task(self, task: Task, now: float) -> None:
        if self.device_id not in task.devices:
            return
        if self.acted is not None and self.acted[0] == task.run_id and task.round <= self.acted[1]:
            reply = self.reply  # the retained task again (after a reconnect): the same reply, if the round is open
            if reply is not None and reply.run_id == task.run_id and \
                    (reply.round == task.round or (task.is_async and reply.round > task.round)) and \
                    (self.global_round is None or self.global_round < reply.round):
                self._send(reply, task)
            return
        if task.bundle_sha256 != self.shared.bundle_sha256:
            self._error(task, "bundle_mismatch", f"this device holds bundle {self.shared.bundle_sha256}, the task is "
                        f"for bundle {task.bundle_sha256}")
            return
        self.acted, self.waiting = (task.run_id, task.round), (task, now + GLOBAL_WAIT_S)
        if task.run_id != self.run_id or self.global_round != task.round - 1:
            self._sync(True)  # as the agent does: read the retained full global (a delta may have been lost)
        self.tick(now)
        if self.waiting is not None:  # as the agent does: fetch the retained full global (a new run's, say)
            self._sync(True)

    # ---- the clock ------------------------------------------------------------------------------
    def next_due(self) -> float | None:
        """When `tick` has something to do next (None: nothing pending)."""
        if self.due is not None:
            return self.due[1]
        return self.waiting[1] if self.waiting is not None else None

    def tick(self, now: float) -> None:
        """Start a waiting task once its global is held (or give up: no_global); send a reply that is due."""
        if self.waiting is not None:
            task, until = self.waiting
            if self._holds_start_of(task):
                self.waiting, self.due = None, (task, now + self.delay_s)
                self.trained_on = self.global_round
            elif now >= until:
                self.waiting = None
                self._error(task, "no_global", f"the global parameters of round {task.round - 1} did not arrive")
        if self.due is not None and now >= self.due[1]:
            task, self.due = self.due[0], None
            self._answer(task)

    def _holds_start_of(self, task: Task) -> bool:
        """Sync: global round - 1 is held. Async (FedBuff): round - 1 or any newer version."""
        if task.run_id != self.run_id or self.global_round is None:
            return False
        return self.global_round >= task.round - 1 if task.is_async else self.global_round == task.round - 1

    def _answer(self, task: Task) -> None:
        draw = self.rng.random()
        if draw < self.behaviour.dropout:
            self.port.drop(self.behaviour.offline_s)
        elif draw < self.behaviour.dropout + self.behaviour.fail:
            self._error(task, "train_failed", "SimulatedFailure: the light device's failure draw")
        else:
            self._send(self.update(task), task)
            self.updates_sent += 1
            self._announce(task.round)

    # ---- replies --------------------------------------------------------------------------------
    def update(self, task: Task) -> Update:
        """This device's update for `task`: the shared synthetic delta under the task's codec, with
        the metrics a real device reports (the platform ones with its first update)."""
        encoded = self.shared.encoded(task.codec)
        loss = 1.0 + float(self.rng.random())
        metrics: dict[str, float | int | str] = {
            "samples": self.behaviour.samples, "first_loss": round(loss, 4), "last_loss": round(loss * 0.9, 4),
            "train_time_s": round(self.delay_s, 3), "update_bytes": encoded.nbytes}
        if self.seq == 0:
            metrics["platform_machine"] = "light"
        self.seq += 1
        # async: the update names the version it was "trained" on (+ 1), the newest held when it started
        trained_on = task.round if not task.is_async or self.trained_on is None else self.trained_on + 1
        self.reply = Update(task.run_id, trained_on, self.shared.bundle_sha256, self.device_id,
                            self.behaviour.samples, self.seq, encoded, metrics)
        return self.reply

    def _error(self, task: Task, code: str, reason: str) -> None:
        self.acted = (task.run_id, task.round)
        self.reply = ErrorReply(task.run_id, task.round, task.bundle_sha256, self.device_id, code, one_line(reason))
        self._send(self.reply, task)
        self.errors_sent += 1
        self._announce(task.round)

    def _send(self, reply: Update | ErrorReply, task: Task) -> None:
        payload = encode(reply, version=reply_version(task))  # as the Python device answers (PROTOCOL 4.2)
        for topic, frame in self.framer.frames(self.shared.topics.update(self.device_id), payload, False):
            self.port.publish(topic, frame, False)

    def _announce(self, round_index: int) -> None:
        """The card after an answered round, published with the online status (retained)."""
        self.card = {**self.card, "last_round": round_index, "rounds_done": self.updates_sent}
        topic, birth, _ = self.presence()
        self.port.publish(topic, birth, True)
