"""An in-process broker and transport with MQTT's semantics, for fast unit tests.

Same `Transport` interface and the same chunking as `MqttTransport` (so byte counts match),
plus what the protocol relies on: retained messages (an empty payload deletes one), '+'/'#'
filters, persistent sessions that queue QoS>0 messages while a client is away, and the will
published when a client vanishes (`close(abrupt=True)`). Delivery is at most once per client
and message, in publish order per publisher.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

from edgeftl.device.link.base import RejectCallback, Transport, TransportError, deadline
from edgeftl.device.protocol.topics import topic_matches

MAX_SESSION_QUEUE = 10_000  # messages queued for an absent persistent client (oldest dropped)


@dataclass
class _Session:
    persistent: bool
    filters: set[str] = field(default_factory=set)
    client: InProcessTransport | None = None
    queued: list[tuple[str, bytes]] = field(default_factory=list)


class InProcessBroker:
    """A broker living in this process.

    Args:
        synchronous: run subscribers' callbacks inline, inside `publish` (deterministic
            tests); by default each transport runs them on its own dispatcher thread, as
            `MqttTransport` does, and `drain()` waits for them.
    """

    def __init__(self, synchronous: bool = False) -> None:
        self.synchronous = synchronous
        self._lock = threading.RLock()
        self._sessions: dict[str, _Session] = {}
        self._retained: dict[str, bytes] = {}

    def retained(self) -> dict[str, bytes]:
        """A copy of the retained messages, topic -> payload (raw frames, chunks included)."""
        with self._lock:
            return dict(self._retained)

    def drain(self, timeout_s: float = 10.0) -> bool:
        """Wait until every connected client has run the callbacks of what it received."""
        left = deadline(timeout_s)
        while left() > 0:
            with self._lock:
                clients = [s.client for s in self._sessions.values() if s.client is not None]
            if all(c.wait_idle(left()) for c in clients) and all(c.wait_idle(0) for c in clients):
                return True
        return False

    # ---- called by InProcessTransport --------------------------------------------------------

    def _connect(self, client: InProcessTransport, clean_start: bool) -> list[tuple[str, bytes]]:
        with self._lock:
            session = self._sessions.get(client.client_id)
            if session is not None and session.client is not None:
                session.client._taken_over()
            if session is None or clean_start or not session.persistent:
                session = self._sessions[client.client_id] = _Session(persistent=not clean_start)
            session.client = client
            queued, session.queued = session.queued, []
            return queued

    def _disconnect(self, client: InProcessTransport, abrupt: bool) -> None:
        with self._lock:
            session = self._sessions.get(client.client_id)
            if session is None or session.client is not client:
                return
            session.client = None
            if not session.persistent:
                del self._sessions[client.client_id]
        if abrupt and client.will is not None:
            self._publish(client.will[0], client.will[1], 1, True)

    def _subscribe(self, client: InProcessTransport, filters: list[str]) -> list[tuple[str, bytes]]:
        """Add filters; return the retained messages they match (sent on every subscribe)."""
        with self._lock:
            session = self._session_of(client)
            session.filters.update(filters)
            return [(t, p) for t, p in self._retained.items() if any(topic_matches(f, t) for f in filters)]

    def _unsubscribe(self, client: InProcessTransport, filters: list[str]) -> None:
        with self._lock:
            self._session_of(client).filters.difference_update(filters)

    def _publish(self, topic: str, payload: bytes, qos: int, retain: bool) -> None:
        with self._lock:
            if retain and payload:
                self._retained[topic] = payload
            elif retain:
                self._retained.pop(topic, None)
            targets = []
            for session in self._sessions.values():
                if not any(topic_matches(f, topic) for f in session.filters):
                    continue
                if session.client is not None:
                    targets.append(session.client)
                elif session.persistent and qos > 0:
                    session.queued.append((topic, payload))
                    del session.queued[:-MAX_SESSION_QUEUE]
        for client in targets:  # outside the lock: synchronous callbacks may publish
            client._receive(topic, payload)

    def _session_of(self, client: InProcessTransport) -> _Session:
        session = self._sessions.get(client.client_id)
        if session is None or session.client is not client:
            raise TransportError(f"{client.client_id!r} is not connected to this broker")
        return session


class InProcessTransport(Transport):
    """`Transport` through an `InProcessBroker`; arguments as for `MqttTransport`."""

    def __init__(self, broker: InProcessBroker, client_id: str, will: tuple[str, bytes] | None = None,
                 max_chunk: int = 256 * 1024, max_message_bytes: int = 64 * 1024 * 1024,
                 clean_start: bool = False, *, birth: tuple[str, bytes] | None = None,
                 on_reject: RejectCallback | None = None) -> None:
        super().__init__(client_id, max_chunk=max_chunk, max_message_bytes=max_message_bytes, will=will,
                         birth=birth, on_reject=on_reject, synchronous=broker.synchronous)
        self.broker, self.clean_start = broker, clean_start
        self._online = self._used = False
        self._offline: list[tuple[str, bytes, int, bool]] = []  # QoS>0 frames published while away

    @property
    def connected(self) -> bool:
        return self._online

    def connect(self, timeout_s: float = 10.0) -> None:
        if self._used:
            raise TransportError(f"transport {self.client_id!r} was already connected once; make a new one")
        self._used = self._online = True
        queued = self.broker._connect(self, self.clean_start)
        filters = self._all_raw_filters()
        if filters:
            self._send_subscribe(filters)
        for topic, payload in queued:
            self._receive(topic, payload)
        offline, self._offline = self._offline, []
        for topic, payload, qos, retain in offline:
            self.broker._publish(topic, payload, qos, retain)
        if self.birth is not None:
            self.publish(self.birth[0], self.birth[1], qos=1, retain=True)

    def close(self, abrupt: bool = False) -> None:
        if not self._online:
            self._stop_dispatcher()
            return
        if not abrupt and self.will is not None:
            self.publish(self.will[0], self.will[1], qos=1, retain=True)
        self._online = False
        self.broker._disconnect(self, abrupt)
        self._stop_dispatcher()

    def _taken_over(self) -> None:
        """Another connection with our client id replaced us (MQTT session takeover)."""
        self._online = False

    def _send(self, topic: str, payload: bytes, qos: int, retain: bool) -> None:
        if self._online:
            self.broker._publish(topic, payload, qos, retain)
        elif qos > 0:
            self._offline.append((topic, payload, qos, retain))
        else:
            raise TransportError(f"{self.client_id!r} is not connected; a QoS 0 message would be lost")

    def _send_subscribe(self, filters: list[str]) -> None:
        for topic, payload in self.broker._subscribe(self, filters):
            self._receive(topic, payload)

    def _send_unsubscribe(self, filters: list[str]) -> None:
        self.broker._unsubscribe(self, filters)
