"""An in-process broker and connection with MQTT's semantics, for fast unit tests.

`InProcessConnection` moves frames as `MqttConnection` does (so a link over it sends the same
bytes), and the broker keeps what the protocol relies on: retained messages (an empty payload
deletes one), '+'/'#' filters, persistent sessions that queue QoS>0 messages while a client is
away, and the will published when a client vanishes (`close(abrupt=True)`). Frames are handed
to subscribers inline, in publish order; the link queues them for its reader.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field

from edgeftl.device.link.link import LinkError
from edgeftl.device.link.mqtt import check_client_id
from edgeftl.device.protocol.topics import topic_matches, validate_filter

MAX_SESSION_QUEUE = 10_000  # frames queued for an absent persistent client (oldest dropped)


@dataclass
class _Session:
    persistent: bool
    filters: set[str] = field(default_factory=set)
    client: InProcessConnection | None = None
    queued: list[tuple[str, bytes]] = field(default_factory=list)


class InProcessBroker:
    """A broker living in this process."""

    def __init__(self) -> None:
        self._lock = threading.RLock()
        self._sessions: dict[str, _Session] = {}
        self._retained: dict[str, bytes] = {}

    def retained(self) -> dict[str, bytes]:
        """A copy of the retained messages, topic -> payload (raw frames, chunks included)."""
        with self._lock:
            return dict(self._retained)

    # ---- called by InProcessConnection -------------------------------------------------------

    def _connect(self, client: InProcessConnection, clean_start: bool) -> list[tuple[str, bytes]]:
        with self._lock:
            session = self._sessions.get(client.client_id)
            if session is not None and session.client is not None:
                session.client._taken_over()
            if session is None or clean_start or not session.persistent:
                session = self._sessions[client.client_id] = _Session(persistent=not clean_start)
            session.client = client
            queued, session.queued = session.queued, []
            return queued

    def _disconnect(self, client: InProcessConnection, abrupt: bool) -> None:
        with self._lock:
            session = self._sessions.get(client.client_id)
            if session is None or session.client is not client:
                return
            session.client = None
            if not session.persistent:
                del self._sessions[client.client_id]
        if abrupt and client.will is not None:
            self._publish(client.will[0], client.will[1], 1, True)

    def _subscribe(self, client: InProcessConnection, filters: list[str]) -> list[tuple[str, bytes]]:
        """Add filters; return the retained messages they match (sent on every subscribe)."""
        with self._lock:
            session = self._session_of(client)
            session.filters.update(filters)
            return [(t, p) for t, p in self._retained.items() if any(topic_matches(f, t) for f in filters)]

    def _unsubscribe(self, client: InProcessConnection, filters: list[str]) -> None:
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
        for client in targets:  # outside the lock: a receiver may publish
            client.on_frame(topic, payload)

    def _session_of(self, client: InProcessConnection) -> _Session:
        session = self._sessions.get(client.client_id)
        if session is None or session.client is not client:
            raise LinkError(f"{client.client_id!r} is not connected to this broker")
        return session


class InProcessConnection:
    """Moves frames through an `InProcessBroker`; arguments as for `MqttConnection`."""

    def __init__(self, broker: InProcessBroker, client_id: str, clean_start: bool = False) -> None:
        self.broker, self.client_id, self.clean_start = broker, check_client_id(client_id), clean_start
        self.on_frame: Callable[[str, bytes], None] = lambda topic, frame: None
        self.will: tuple[str, bytes] | None = None  # what the broker publishes when we vanish
        self._birth: tuple[str, bytes] | None = None
        self._farewell: tuple[str, bytes] | None = None  # what close() publishes
        self._filters: list[str] = []
        self._online = self._used = False
        self._offline: list[tuple[str, bytes, int, bool]] = []  # QoS>0 frames sent while away

    @property
    def connected(self) -> bool:
        return self._online

    def presence(self, topic: str, online: bytes, offline: bytes, will: bytes | None = None) -> None:
        self._birth, self._farewell = (topic, online), (topic, offline)
        self.will = (topic, offline if will is None else will)

    def update_presence(self, online: bytes, offline: bytes, will: bytes | None = None) -> None:
        """As MqttConnection.update_presence; here the new will holds at once (no CONNECT to wait for)."""
        if self._birth is None:
            raise LinkError("update_presence() needs presence() first")
        self.presence(self._birth[0], online, offline, will)
        if self._online:
            self.send(self._birth[0], online, 1, True)

    def connect(self, timeout_s: float = 10.0) -> None:
        if self._used:
            raise LinkError(f"connection {self.client_id!r} was already connected once; make a new one")
        self._used = self._online = True
        queued = self.broker._connect(self, self.clean_start)
        if self._filters:
            self._subscribe_now(self._filters)
        for topic, payload in queued:
            self.on_frame(topic, payload)
        offline, self._offline = self._offline, []
        for topic, payload, qos, retain in offline:
            self.broker._publish(topic, payload, qos, retain)
        if self._birth is not None:
            self.send(self._birth[0], self._birth[1], 1, True)

    def close(self, abrupt: bool = False) -> None:
        if not self._online:
            return
        if not abrupt and self._farewell is not None:
            self.send(self._farewell[0], self._farewell[1], 1, True)
        self._online = False
        self.broker._disconnect(self, abrupt)

    def flush(self, timeout_s: float = 10.0) -> bool:
        return True  # delivery is inline

    def _taken_over(self) -> None:
        """Another connection with our client id replaced us (MQTT session takeover)."""
        self._online = False

    def send(self, topic: str, payload: bytes, qos: int, retain: bool) -> None:
        if self._online:
            self.broker._publish(topic, payload, qos, retain)
        elif qos > 0:
            self._offline.append((topic, payload, qos, retain))
        else:
            raise LinkError(f"{self.client_id!r} is not connected; a QoS 0 message would be lost")

    def subscribe(self, filters: list[str], qos: int = 1) -> None:
        for topic_filter in filters:
            validate_filter(topic_filter)
        self._filters += [f for f in filters if f not in self._filters]
        if self._online:
            self._subscribe_now(filters)

    def unsubscribe(self, filters: list[str]) -> None:
        self._filters = [f for f in self._filters if f not in filters]
        if self._online:
            self.broker._unsubscribe(self, filters)

    def _subscribe_now(self, filters: list[str]) -> None:
        for topic, payload in self.broker._subscribe(self, filters):
            self.on_frame(topic, payload)
