"""The transport seam: publish/subscribe of byte payloads, chunked and reassembled transparently.

`Transport` holds everything that does not depend on the network: splitting large payloads
into chunks (on the sub-topics T/_c/i), reassembling and verifying them on receipt, byte
counters, and running callbacks on one dispatcher thread so that a slow callback (a device
training for minutes) never blocks the network thread. Subclasses only move frames:
`MqttTransport` through a real broker, `InProcessTransport` through an in-process one.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from abc import ABC, abstractmethod
from collections import deque
from collections.abc import Callable

from edgeftl.device.protocol import wire
from edgeftl.device.protocol.topics import (
    chunk_filter, chunk_topic, split_chunk_topic, topic_matches, validate_filter, validate_topic,
)

log = logging.getLogger("edgeftl.transport")

Callback = Callable[[str, bytes], None]
RejectCallback = Callable[[str, str], None]  # (topic, reason)
MAX_CALLBACK_QUEUE = 10_000  # delivered messages waiting for the dispatcher thread


class TransportError(RuntimeError):
    """The broker cannot be reached, refused us, or did not acknowledge in time."""


class _Dispatcher:
    """Runs callbacks in order on one daemon thread (or inline when `synchronous`)."""

    def __init__(self, name: str, on_error: Callable[[], None], synchronous: bool = False,
                 max_queue: int = MAX_CALLBACK_QUEUE) -> None:
        self.name, self.on_error, self.synchronous, self.max_queue = name, on_error, synchronous, max_queue
        self._items: deque[tuple[Callable[..., None], tuple]] = deque()
        self._cond = threading.Condition()
        self._busy = self._stopping = False
        self._thread: threading.Thread | None = None

    def submit(self, fn: Callable[..., None], *args: object) -> bool:
        """Queue fn(*args); False when dropped (queue full or stopped)."""
        if self.synchronous:
            self._run(fn, args)
            return True
        with self._cond:
            if self._stopping or len(self._items) >= self.max_queue:
                return False
            self._items.append((fn, args))
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, name=self.name, daemon=True)
                self._thread.start()
            self._cond.notify_all()
        return True

    def _loop(self) -> None:
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._items or self._stopping)
                if not self._items:
                    return
                fn, args = self._items.popleft()
                self._busy = True
            self._run(fn, args)
            with self._cond:
                self._busy = False
                self._cond.notify_all()

    def _run(self, fn: Callable[..., None], args: tuple) -> None:
        try:
            fn(*args)
        except Exception:
            log.exception("%s: callback %s raised", self.name, getattr(fn, "__name__", fn))
            self.on_error()

    def wait_idle(self, timeout_s: float) -> bool:
        with self._cond:
            return self._cond.wait_for(lambda: not self._items and not self._busy, timeout_s)

    def stop(self, timeout_s: float) -> None:
        """Run what is queued, then end the thread (bounded wait; never joins itself)."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout_s)


class Transport(ABC):
    """Publish/subscribe of byte payloads with transparent chunking.

    Payloads longer than `max_chunk` travel as format-1 chunks on T/_c/0..n-1 and reach the
    callback of a filter matching T once, reassembled and sha256-verified. Retained payloads
    are published so that exactly one retained message per topic can be completed by a late
    subscriber (see docs/PROTOCOL.md, "Chunks"). Zero-length payloads are retained-message
    deletions and never reach callbacks. Callbacks run on one dispatcher thread, in arrival
    order; an exception in one is logged and counted in `callback_errors`. Delivery is at
    least once (QoS 1): callbacks must tolerate duplicates.
    """

    def __init__(self, client_id: str, *, max_chunk: int, max_message_bytes: int,
                 will: tuple[str, bytes] | None = None, birth: tuple[str, bytes] | None = None,
                 on_reject: RejectCallback | None = None, synchronous: bool = False) -> None:
        if not isinstance(client_id, str) or not 1 <= len(client_id) <= 64 or not client_id.isprintable():
            raise ValueError(f"client id must be 1-64 printable characters, got {client_id!r}")
        if max_chunk < wire.MIN_CHUNK or max_message_bytes < max_chunk:
            raise ValueError(f"need {wire.MIN_CHUNK} <= max_chunk ({max_chunk}) <= max_message_bytes "
                             f"({max_message_bytes})")
        for name, pair in (("will", will), ("birth", birth)):
            if pair is not None and (not pair[1] or len(pair[1]) > max_chunk):
                raise ValueError(f"{name} payload must be 1..max_chunk ({max_chunk}) bytes")
            if pair is not None:
                self._check_topic(pair[0])
        self.client_id, self.max_chunk, self.max_message_bytes = client_id, max_chunk, max_message_bytes
        self.will, self.birth, self.on_reject = will, birth, on_reject
        self._lock = threading.RLock()
        self._subs: dict[str, Callback] = {}
        self._retained_chunks: dict[str, int] = {}  # topic -> chunks of our last retained publish
        self._reassembler = wire.Reassembler(max_message_bytes)
        self._counts = dict.fromkeys(("bytes_sent", "bytes_received", "frames_sent", "frames_received",
                                      "deliveries", "callback_errors", "rejected", "dropped",
                                      "unmatched", "empty"), 0)
        self._dispatch = _Dispatcher(f"edgeftl-transport-{client_id}", self._callback_failed, synchronous)

    # ---- the interface ----------------------------------------------------------------------

    @abstractmethod
    def connect(self, timeout_s: float = 10.0) -> None:
        """Connect (subscriptions registered before are made first) within `timeout_s`.

        Raises:
            TransportError: naming the broker when it cannot be reached in time.
        """

    @abstractmethod
    def close(self, abrupt: bool = False) -> None:
        """Leave. Graceful: publish the will (retained) ourselves, wait for pending QoS 1
        acknowledgements, disconnect. abrupt=True: drop the connection without DISCONNECT,
        as a crash would, so the broker publishes the will."""

    @property
    @abstractmethod
    def connected(self) -> bool: ...

    def flush(self, timeout_s: float = 10.0) -> bool:
        """Wait until every QoS>0 publish so far is acknowledged; False on timeout."""
        return True

    def publish(self, topic: str, payload: bytes, qos: int = 1, retain: bool = False) -> int:
        """Send `payload` on `topic`, chunked when longer than `max_chunk`.

        QoS>0 messages published while disconnected are queued and sent on reconnect.

        Returns:
            Bytes handed to the network: the MQTT PUBLISH payloads, chunk headers included.

        Raises:
            ValueError: a bad topic or qos, an empty payload or one above `max_message_bytes`.
            TransportError: the client refused the message.
        """
        self._check_topic(topic)
        if qos not in (0, 1, 2):
            raise ValueError(f"qos must be 0, 1 or 2, got {qos!r}")
        if not payload or len(payload) > self.max_message_bytes:
            raise ValueError(f"payload must be 1..{self.max_message_bytes} bytes, got {len(payload)}")
        frames = self._frames(topic, bytes(payload), retain)
        for frame_topic, frame in frames:
            self._send(frame_topic, frame, qos, retain)
        sent = sum(len(frame) for _, frame in frames)
        with self._lock:
            self._counts["bytes_sent"] += sent
            self._counts["frames_sent"] += len(frames)
        return sent

    def subscribe(self, topic_filter: str, callback: Callback) -> None:
        """Call `callback(topic, payload)` for every message on a topic matching the filter.

        Register subscriptions before `connect()` to receive what a persistent session queued
        while away; once connected, this returns after the broker acknowledged.
        """
        validate_filter(topic_filter)
        with self._lock:
            self._subs[topic_filter] = callback
        if self.connected:
            self._send_subscribe(self._raw_filters([topic_filter]))

    def unsubscribe(self, topic_filter: str) -> None:
        with self._lock:
            self._subs.pop(topic_filter, None)
        if self.connected:
            self._send_unsubscribe(self._raw_filters([topic_filter]))

    def wait_idle(self, timeout_s: float = 10.0) -> bool:
        """Wait until every delivered message's callbacks have run; False on timeout."""
        return self._dispatch.wait_idle(timeout_s)

    @property
    def bytes_sent(self) -> int:
        return self._counts["bytes_sent"]

    @property
    def bytes_received(self) -> int:
        return self._counts["bytes_received"]

    @property
    def callback_errors(self) -> int:
        return self._counts["callback_errors"]

    def stats(self) -> dict[str, int]:
        """Counters (bytes_*, frames_*, rejected, dropped, ...) plus reassembly counters."""
        with self._lock:
            chunks = {f"chunks_{k}": v for k, v in self._reassembler.stats.items()}
            return {**self._counts, **chunks, "chunks_pending": self._reassembler.pending}

    # ---- for subclasses ---------------------------------------------------------------------

    @abstractmethod
    def _send(self, topic: str, payload: bytes, qos: int, retain: bool) -> None: ...

    @abstractmethod
    def _send_subscribe(self, filters: list[str]) -> None: ...

    @abstractmethod
    def _send_unsubscribe(self, filters: list[str]) -> None: ...

    def _all_raw_filters(self) -> list[str]:
        with self._lock:
            return self._raw_filters(list(self._subs))

    def _receive(self, topic: str, payload: bytes) -> None:
        """Handle one incoming frame, from any thread; never raises."""
        try:
            self._handle(topic, payload)
        except Exception:
            log.exception("%s: failed to handle a message on %r", self.client_id, topic)
            self._callback_failed()

    # ---- internals --------------------------------------------------------------------------

    @staticmethod
    def _raw_filters(filters: list[str]) -> list[str]:
        raw = []
        for f in filters:
            raw += [f] + ([chunk_filter(f)] if chunk_filter(f) else [])
        return raw

    @staticmethod
    def _check_topic(topic: str) -> None:
        validate_topic(topic)
        if split_chunk_topic(topic):
            raise ValueError(f"topic {topic!r} ends in a chunk sub-topic (.../_c/N), which is reserved")

    def _frames(self, topic: str, payload: bytes, retain: bool) -> list[tuple[str, bytes]]:
        if len(payload) <= self.max_chunk:
            frames, count = [(topic, payload)], 0
        else:
            chunks = wire.split(payload, self.max_chunk, uuid.uuid4().hex)
            frames, count = [(chunk_topic(topic, i), c) for i, c in enumerate(chunks)], len(chunks)
        if retain:
            # Exactly one retained message per topic must be completable by a late subscriber:
            # a chunked one first clears the plain topic; an unchunked one clears chunk 0, without
            # which an older chunked message can never complete. Leftover chunks we know of go too.
            with self._lock:
                previous = self._retained_chunks.get(topic, 0)
                self._retained_chunks[topic] = count
            frames = [(topic, b"")] + frames if count else frames + [(chunk_topic(topic, 0), b"")]
            frames += [(chunk_topic(topic, i), b"") for i in range(max(count, 1), previous)]
        return frames

    def _handle(self, topic: str, payload: bytes) -> None:
        with self._lock:
            self._counts["bytes_received"] += len(payload)
            self._counts["frames_received"] += 1
            if not payload:
                self._counts["empty"] += 1
                return
            parsed = split_chunk_topic(topic)
            try:
                if parsed:
                    topic = parsed[0]
                    payload = self._reassembler.add(topic, payload)
                    if payload is None:
                        return
                elif len(payload) > self.max_message_bytes:
                    raise wire.WireError(f"oversized message: {len(payload)} bytes, limit {self.max_message_bytes}")
            except wire.WireError as exc:
                self._counts["rejected"] += 1
                reason = str(exc)
            else:
                reason = ""
            callbacks = [cb for f, cb in self._subs.items() if topic_matches(f, topic)]
        if reason:
            log.warning("%s: rejected a message on %r: %s", self.client_id, topic, reason)
            if self.on_reject is not None:
                self._submit(self.on_reject, topic, reason)
            return
        if not callbacks:
            self._bump("unmatched")
        for callback in callbacks:
            self._submit(callback, topic, payload)

    def _submit(self, fn: Callable[..., None], topic: str, data: object) -> None:
        if self._dispatch.submit(fn, topic, data):
            self._bump("deliveries")
        else:
            self._bump("dropped")
            log.warning("%s: dropped a message on %r (callback queue full or transport closed)",
                        self.client_id, topic)

    def _bump(self, key: str) -> None:
        with self._lock:
            self._counts[key] += 1

    def _callback_failed(self) -> None:
        self._bump("callback_errors")

    def _stop_dispatcher(self, timeout_s: float = 5.0) -> None:
        self._dispatch.stop(timeout_s)


def deadline(timeout_s: float) -> Callable[[], float]:
    """Seconds left until now + timeout_s (never negative)."""
    end = time.monotonic() + timeout_s
    return lambda: max(0.0, end - time.monotonic())
