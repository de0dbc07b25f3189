"""The message-level link between devices and the coordinator: typed messages in and out.

Above this module nothing sees bytes, topics or chunks (Flower's `Grid` in MQTT terms). A `Link`
composes a `Connection` (moves MQTT frames: `MqttConnection` through a broker,
`InProcessConnection` inside one process) with a `Framer` (chunking and reassembly) and holds the
side's one queue. Frames arrive on the connection's thread and are only reassembled and queued
there; `receive()` decodes, checks and types them on the caller's thread, so the agent and the
round loop each read one queue in order. With `Keys` (protocol/auth.py) it signs what it sends
and refuses what its trusted keys did not sign.

    link = Link.device(MqttConnection(url, "edgeftl-dev-3"), "edgeftl/run1", "dev-3")
    link.connect()
    link.send(update)
    item = link.receive(timeout_s=0.5)   # Incoming(message, device_id, nbytes) | Refused | None
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import Counter, OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from edgeftl.device.link.framing import Framer
from edgeftl.device.protocol import wire
from edgeftl.device.protocol.auth import Keys
from edgeftl.device.protocol.messages import (
    DEVICE_PLACES,
    MAX_DEVICE_HEADER_BYTES,
    ErrorReply,
    Global,
    Message,
    MessageError,
    SecAgg,
    Status,
    StatusInfo,
    Task,
    Update,
    check_place,
    decode,
    reason_kind,
    status_from_payload,
    status_payload,
)
from edgeftl.device.protocol.topics import Topics, split_chunk_topic, validate_device_id
from edgeftl.device.secagg.messages import UP_STAGES as SECAGG_UP_STAGES

log = logging.getLogger("edgeftl.link")
MAX_QUEUE = 10_000  # received messages waiting for the reader; beyond that they are dropped and counted
MAX_QUEUE_BYTES = 128 * 1024 * 1024  # ... and their bytes: the queue is bounded by both
MAX_QUEUED_PER_SENDER = 16  # one sender (a device's topic) cannot crowd the others out of the queue
EXPIRE_EVERY_S = 1.0  # partial chunked messages are expired this often, not only when a chunk arrives
DEFAULT_MAX_CHUNK = 256 * 1024
DEFAULT_MAX_MESSAGE_BYTES = 64 * 1024 * 1024


class LinkError(RuntimeError):
    """The broker cannot be reached, refused us, or did not acknowledge in time."""


class Connection(Protocol):
    """Moves MQTT frames (QoS 1): what `MqttConnection` and `InProcessConnection` provide."""

    client_id: str
    on_frame: Callable[[str, bytes], None]  # set by the link; called from any thread

    @property
    def connected(self) -> bool: ...

    def presence(self, topic: str, online: bytes, offline: bytes, will: bytes | None = None) -> None:
        """Birth published (retained) on every connect; `will` (default `offline`) if we vanish;
        offline on close()."""

    def update_presence(self, online: bytes, offline: bytes, will: bytes | None = None) -> None:
        """Replace the three of presence(), at any time: a new birth goes out at once when connected."""

    def connect(self, timeout_s: float) -> None: ...

    def close(self, abrupt: bool = False) -> None: ...

    def send(self, topic: str, payload: bytes, qos: int, retain: bool) -> None: ...

    def subscribe(self, filters: list[str], qos: int = 1) -> None: ...

    def unsubscribe(self, filters: list[str]) -> None: ...

    def flush(self, timeout_s: float) -> bool: ...


@dataclass(frozen=True)
class Incoming:
    """A message that passed every check: its sender (from the topic, for device messages) and
    its size as received (chunk headers excluded)."""

    message: Message
    device_id: str | None
    nbytes: int


@dataclass(frozen=True)
class Refused:
    """Something that arrived and failed a check; `reason` is "<reason>: <details>". `place` is
    what the topic is for (task, global, delta, update, status; None for no protocol topic) and
    `device_id` the device whose topic it came on; `topic` is kept for logs."""

    topic: str
    place: str | None
    device_id: str | None
    reason: str

    @property
    def kind(self) -> str:
        return reason_kind(self.reason)


class Link:
    """One side's end of the federation: send and receive typed messages.

    Use `Link.device(...)` or `Link.coordinator(...)`; they subscribe to what that role reads.
    """

    def __init__(self, connection: Connection, prefix: str, subscriptions: list[str], *,
                 max_chunk: int = DEFAULT_MAX_CHUNK, max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
                 max_queue: int = MAX_QUEUE, keys: Keys | None = None) -> None:
        self.connection, self.topics = connection, Topics(prefix)
        self.keys = keys or Keys()
        self.device_id: str | None = None  # a device's link: whose status its presence is
        self.max_message_bytes = max_message_bytes
        self.framer = Framer(max_chunk, max_message_bytes)
        self._lock = threading.Lock()
        self._queue: queue.Queue[tuple[str, bytes] | Refused] = queue.Queue(max_queue)
        self._queued_bytes = 0
        self._queued_per_sender: Counter[str] = Counter()
        self._next_expiry = 0.0
        self._refused_recently: OrderedDict[tuple[str, str], None] = OrderedDict()
        self._counts = dict.fromkeys(("bytes_sent", "bytes_received", "frames_sent", "frames_received",
                                      "messages_sent", "delivered", "refused", "dropped", "unmatched"), 0)
        connection.on_frame = self._on_frame
        for topic_filter in subscriptions:
            connection.subscribe(self.framer.filters(topic_filter))

    @classmethod
    def device(cls, connection: Connection, prefix: str, device_id: str, keys: Keys | None = None,
               **limits: int) -> Link:
        """A device's link: reads tasks and global deltas; its presence is its status topic (the
        text form until `announce` gives it a card, and a signed status message when it has a signing key)."""
        topics, device_id = Topics(prefix), validate_device_id(device_id)
        link = cls(connection, prefix, [topics.task, topics.global_delta, topics.secagg_down(device_id)],
                   keys=keys, **limits)
        link.device_id = device_id
        connection.presence(topics.status(device_id), *link._presence({}))
        return link

    @classmethod
    def coordinator(cls, connection: Connection, prefix: str, keys: Keys | None = None, **limits: int) -> Link:
        """The coordinator's link: reads updates, error replies and statuses of every device."""
        topics = Topics(prefix)
        link = cls(connection, prefix, [topics.updates_filter, topics.secagg_up_filter], keys=keys, **limits)
        link.subscribe_state(topics.status_filter)
        return link

    def subscribe_state(self, topic_filter: str) -> None:
        """Read a filter of retained state (device statuses) at QoS 0. The broker then writes the
        retained messages straight out instead of queueing QoS 1 copies per client, which Mosquitto
        caps at max_queued_messages (1,000 by default: a coordinator that subscribed at QoS 1 after
        2,000 or 10,000 devices were online learned of 1,020). QoS 0 drops a live status only when
        the broker's queue to this client is full anyway; the reader then holds a stale state for
        that device (at worst it samples one that does not reply, which the round's deadline already
        handles) until the retained copy, always the latest, comes again at the next (re)subscribe."""
        self.connection.subscribe(self.framer.filters(topic_filter), qos=0)

    # ---- the interface ----------------------------------------------------------------------

    def connect(self, timeout_s: float = 10.0) -> None:
        """Connect and subscribe within `timeout_s`. Raises LinkError naming the broker."""
        self.connection.connect(timeout_s)

    def close(self, abrupt: bool = False) -> None:
        """Leave: graceful (offline status published, acknowledgements awaited) or, with
        abrupt=True, a dropped connection as a crash would leave it (the broker sends the will)."""
        self.connection.close(abrupt)

    @property
    def connected(self) -> bool:
        return self.connection.connected

    def send(self, message: Message, version: int = wire.FORMAT_VERSION) -> int:
        """Publish one message on its topic (QoS 1; tasks, full globals and statuses retained), in
        message `version` (2: the compact framing, to a reader that said it reads it).

        Returns:
            Bytes handed to the network: the MQTT payloads, chunk headers included.
        """
        topic, retain = self._route(message)
        frames = self.framer.frames(topic, self.keys.sign(message, version), retain)
        for frame_topic, frame in frames:
            self.connection.send(frame_topic, frame, 1, retain)
        sent = sum(len(frame) for _, frame in frames)
        with self._lock:
            self._counts["bytes_sent"] += sent
            self._counts["frames_sent"] += len(frames)
            self._counts["messages_sent"] += 1
        return sent

    def receive(self, timeout_s: float) -> Incoming | Refused | None:
        """The next message, checked and typed, or what was refused; None after `timeout_s` (or
        sooner, for a frame on a topic the protocol does not use, which is counted as unmatched)."""
        self._expire()
        try:
            item = self._queue.get(timeout=max(0.0, timeout_s))
        except queue.Empty:
            return None
        if isinstance(item, Refused):
            return item
        self._dequeued(*item)
        return self._open(*item)

    def announce(self, card: StatusInfo) -> None:
        """A device's card (its status's `info`, PROTOCOL.md section 6.4) from now on: published with
        its online status now when connected (else at connect), carried by the offline status it
        publishes when it closes, and, marked `"will": 1`, by its will from the next connect on.

        Raises:
            LinkError: not a device's link.
            MessageError: a card the protocol refuses (too large, a bad key or value).
        """
        if self.device_id is None:
            raise LinkError("only a device's link has a status to announce")
        self.connection.update_presence(*self._presence(card))

    def limit_message_bytes(self, max_bytes: int) -> None:
        """Refuse received messages above `max_bytes` (a coordinator knows how large an honest update
        can be), before they are buffered; what this side sends is not limited by it."""
        self.max_message_bytes = max_bytes
        with self._lock:
            self.framer.reassembler.limit(max_bytes)

    def follow_full_global(self, follow: bool) -> None:
        """Also read the retained full global (a device catching up), or stop reading it."""
        filters = self.framer.filters(self.topics.global_params)
        if follow:
            self.connection.subscribe(filters)
        else:
            self.connection.unsubscribe(filters)

    def flush(self, timeout_s: float = 10.0) -> bool:
        """Wait until everything sent so far is acknowledged; False on timeout."""
        return self.connection.flush(timeout_s)

    @property
    def connects(self) -> int:
        """Connections made so far (a connection that cannot reconnect, like the in-process one: 0)."""
        return int(getattr(self.connection, "connects", 0))

    @property
    def bytes_sent(self) -> int:
        return self._counts["bytes_sent"]

    @property
    def bytes_received(self) -> int:
        return self._counts["bytes_received"]

    def stats(self) -> dict[str, int]:
        """Counters: bytes and frames each way, delivered, refused, dropped, unmatched, chunks_*."""
        with self._lock:
            return {**self._counts, **self.framer.stats(), "queued": self._queue.qsize()}

    # ---- internals --------------------------------------------------------------------------

    def _route(self, message: Message) -> tuple[str, bool]:
        topics = self.topics
        if isinstance(message, Task):
            return topics.task, True
        if isinstance(message, Global):
            return (topics.global_delta, False) if message.is_delta else (topics.global_params, True)
        if isinstance(message, (Update, ErrorReply)):
            return topics.update(message.device_id), False
        if isinstance(message, SecAgg):
            up = message.stage in SECAGG_UP_STAGES
            return (topics.secagg_up if up else topics.secagg_down)(message.device_id), False
        return topics.status(message.device_id), True

    def _presence(self, card: StatusInfo) -> tuple[bytes, bytes, bytes]:
        """The online, offline and will payloads of this device's status carrying `card`; the will's
        card says `"will": 1`, so a reader can tell a device that vanished from one that left."""
        device = str(self.device_id)
        statuses = (Status(device, True, card), Status(device, False, card),
                    Status(device, False, {**card, "will": 1} if card else {}))
        if self.keys.signing is None:
            online, offline, will = (status_payload(status) for status in statuses)
        else:
            online, offline, will = (self.keys.sign(status) for status in statuses)
        return online, offline, will

    def _on_frame(self, topic: str, frame: bytes) -> None:
        """From the connection's thread: reassemble and queue; never raises."""
        try:
            with self._lock:
                self._counts["bytes_received"] += len(frame)
                self._counts["frames_received"] += 1
                done = self.framer.receive(topic, frame)
        except wire.WireError as exc:
            self._queue_refusal(topic, str(exc))
            return
        except Exception:  # a bug here must not take the network thread down
            log.exception("%s: failed to handle a frame on %r", self.connection.client_id, topic)
            return
        if done is not None:
            self._put(done)

    def _open(self, topic: str, payload: bytes) -> Incoming | Refused | None:
        place = self.topics.parse(topic)
        if place is None:
            self._bump("unmatched")
            return None
        where, device = place
        try:
            if where == "status":
                message: Message = status_from_payload(payload, str(device), self.max_message_bytes)
            else:
                max_header = MAX_DEVICE_HEADER_BYTES if where in DEVICE_PLACES else wire.MAX_HEADER_BYTES
                message = decode(payload, self.max_message_bytes, max_header)
            check_place(where, device, message)
            self.keys.check(payload, message)
        except MessageError as exc:
            return self._refused(topic, where, device, str(exc))
        self._bump("delivered")
        return Incoming(message, device, len(payload))

    def _queue_refusal(self, topic: str, reason: str) -> None:
        """A chunk-level refusal, queued once per (message topic, reason) among the last 1024: every
        later chunk of a refused message would otherwise report it again. Reasons that name the
        message id count once per message; those that cannot (a chunk too broken to name one)
        count once per topic and reason, which also keeps a flood from filling the queue."""
        message_topic = (split_chunk_topic(topic) or (topic, 0))[0]
        with self._lock:
            if (message_topic, reason) in self._refused_recently:
                return
            self._refused_recently[(message_topic, reason)] = None
            while len(self._refused_recently) > 1024:
                self._refused_recently.popitem(last=False)
        place = self.topics.parse(message_topic)
        where, device = place if place else (None, None)
        self._put(self._refused(message_topic, where, device, reason))

    def _refused(self, topic: str, place: str | None, device: str | None, reason: str) -> Refused:
        self._bump("refused")
        log.debug("%s: refused a message on %r: %s", self.connection.client_id, topic, reason)
        return Refused(topic, place, device, reason)

    def _put(self, item: tuple[str, bytes] | Refused) -> None:
        """Queue for the reader, within the queue's count, its bytes and the sender's share;
        what does not fit is dropped and counted (`dropped` in stats, in the round record)."""
        topic, size = (item.topic, 0) if isinstance(item, Refused) else (item[0], len(item[1]))
        with self._lock:
            full = (self._queued_bytes + size > MAX_QUEUE_BYTES
                    or self._queued_per_sender[topic] >= MAX_QUEUED_PER_SENDER)
            if not full:
                try:
                    self._queue.put_nowait(item)
                except queue.Full:
                    full = True
            if full:
                self._counts["dropped"] += 1
            elif size:
                self._queued_bytes += size
                self._queued_per_sender[topic] += 1
        if full:
            log.warning("%s: dropped a message on %r (the reader is %d messages, %d bytes behind)",
                        self.connection.client_id, topic, self._queue.qsize(), self._queued_bytes)

    def _dequeued(self, topic: str, payload: bytes) -> None:
        with self._lock:
            self._queued_bytes -= len(payload)
            self._queued_per_sender[topic] -= 1
            if not self._queued_per_sender[topic]:
                del self._queued_per_sender[topic]

    def _expire(self) -> None:
        """Drop partial chunked messages idle past their time, on the reader's schedule."""
        now = time.monotonic()
        if now < self._next_expiry:
            return
        self._next_expiry = now + EXPIRE_EVERY_S
        with self._lock:
            self.framer.reassembler.expire()

    def _bump(self, key: str) -> None:
        with self._lock:
            self._counts[key] += 1
