"""The real connection: paho-mqtt 2 against any MQTT 3.1.1 or 5 broker.

QoS 1, a persistent session (MQTT 3.1.1 clean_session=0; MQTT 5 clean_start=0 plus a session
expiry) so messages published while a device is away are delivered when it returns, keepalive,
reconnect with exponential backoff (1 s doubling to 30 s), and a retained last will. TLS,
client certificates and credentials: security.py. Given the nodes of a broker cluster
(`mqtt://a:1,mqtt://b:2`, brokers.py), each attempt after a failed one or a lost connection goes to
the next node; the cluster keeps the session, so QoS 1 messages not yet acknowledged are sent again
there and what was queued for us is delivered there.
"""

from __future__ import annotations

import logging
import ssl
import threading
import time
from collections import deque
from collections.abc import Callable

import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from edgeftl.device.link.brokers import SCHEMES as SCHEMES  # re-exported: the URL forms live in brokers.py
from edgeftl.device.link.brokers import BrokerRing, parse_brokers
from edgeftl.device.link.brokers import parse_url as parse_url
from edgeftl.device.link.link import LinkError
from edgeftl.device.link.security import TransportSecurity, refusal
from edgeftl.device.protocol.topics import validate_filter

log = logging.getLogger("edgeftl.transport")

DEFAULT_SESSION_EXPIRY_S = 7 * 24 * 3600
RESUBSCRIBE_TRIES = 30  # a cluster node may refuse subscriptions while it elects stream leaders: retry 1 s apart


def check_client_id(client_id: str) -> str:
    if not isinstance(client_id, str) or not 1 <= len(client_id) <= 64 or not client_id.isprintable():
        raise ValueError(f"client id must be 1-64 printable characters, got {client_id!r}")
    return client_id


def deadline(timeout_s: float) -> Callable[[], float]:
    """Seconds left until now + timeout_s (never negative)."""
    end = time.monotonic() + timeout_s
    return lambda: max(0.0, end - time.monotonic())


class MqttConnection:
    """Moves frames through a real MQTT broker (paho-mqtt 2, network thread via loop_start).

    Args:
        url: mqtt://host[:port] (3.1.1, default port 1883) or mqtt5://host[:port]; or the nodes of one
            broker cluster, comma-separated (brokers.py): the client starts at one chosen by its id.
        client_id: the MQTT client id; the persistent session is keyed by it.
        keepalive: seconds between PINGREQs when idle; the broker drops us after 1.5x.
        clean_start: True discards the broker-side session at connect.
        version: "3.1.1" or "5"; overrides the URL scheme.
        session_expiry_s: MQTT 5 session expiry after a disconnect (3.1.1: the broker's setting).
        security: TLS files and credentials; plain MQTT is refused unless the host is loopback.
    """

    def __init__(self, url: str, client_id: str, keepalive: int = 30, clean_start: bool = False, *,
                 version: str | None = None, session_expiry_s: int = DEFAULT_SESSION_EXPIRY_S,
                 security: TransportSecurity | None = None) -> None:
        self.client_id = check_client_id(client_id)
        self.on_frame: Callable[[str, bytes], None] = lambda topic, frame: None
        self.ring = BrokerRing(parse_brokers(url), client_id)
        broker = self.ring.current
        self.version = version or broker.version
        if self.version not in ("3.1.1", "5"):
            raise ValueError(f"MQTT version must be '3.1.1' or '5', got {version!r}")
        if not 5 <= keepalive <= 65535:
            raise ValueError(f"keepalive must be 5..65535 s, got {keepalive}")
        self.brokers = url  # as given: one URL or the cluster's list (error lines name it)
        self.url, self.host, self.port, self.keepalive, self.tls = broker.url, broker.host, broker.port, keepalive, \
            broker.tls
        self.clean_start, self.session_expiry_s = clean_start, session_expiry_s
        v5 = self.version == "5"
        self._client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id,
                                   clean_session=None if v5 else clean_start,
                                   protocol=mqtt.MQTTv5 if v5 else mqtt.MQTTv311)
        security = security or TransportSecurity()
        for node in self.ring.brokers:
            security.check(node.host, node.tls)
        security.apply(self._client, broker.host, broker.tls, broker.username)
        self._client.reconnect = self._reconnect  # type: ignore[method-assign]  # keeps why a connect failed
        self._client.reconnect_delay_set(min_delay=1, max_delay=30)
        self._client.on_connect = self._on_connect
        self._client.on_disconnect = self._on_disconnect
        self._client.on_subscribe = self._on_subscribe
        self._client.on_unsubscribe = self._on_unsubscribe
        self._client.on_message = self._on_message
        self._lock = threading.Lock()
        self._filters: dict[str, int] = {}  # filter -> QoS, subscribed (again after every reconnect)
        self._stale: set[str] = set()  # unsubscribed while disconnected: sent at the next connect
        self._birth: tuple[str, bytes] | None = None  # published (retained) after every connect
        self._farewell: tuple[str, bytes] | None = None  # published by close() (a clean DISCONNECT drops the will)
        self._online = threading.Event()  # CONNACK received, not yet disconnected
        self._ready = threading.Event()  # online and the (re)subscriptions acknowledged
        self._acks: dict[int, list[str]] = {}  # (un)subscribe mid -> failure reasons ([] = fine)
        self._ack_cond = threading.Condition()
        self._pending: list[mqtt.MQTTMessageInfo] = []
        self._last_error = ""
        self._connacked = False  # a CONNACK accepted us at least once
        self._refused = threading.Event()  # the broker said no (credentials, ACL) or TLS failed: stop waiting
        self._started = self._closed = self._leaving = False
        self._attempts = 0  # connection attempts so far (the first goes to the ring's start node)
        self._resubscribe_tries = 0
        self._granted: set[str] = set()  # filters the broker acknowledged in the current session
        self._resubscribing: dict[int, list[str]] = {}  # a resubscription's mid -> its filters
        self._wills: deque[bytes] = deque(maxlen=16)  # the wills this connection set (one per card it had)
        self._watch_mid: int | None = None  # the SUBSCRIBE to our own status, acknowledged by nobody's wait
        self.connects = 0  # CONNACKs so far: more than 1 after a reconnect (the broker may have lost state)

    def _reconnect(self) -> mqtt.MQTTErrorCode:
        """paho's reconnect, remembering a socket or TLS error (paho retries and drops it). paho calls it
        for every attempt, the first included: with a cluster, each one after the first goes to the next node."""
        if self._attempts and len(self.ring) > 1:
            broker = self.ring.advance()
            # paho's host/port setters refuse while its state says "connecting" (after a failed attempt); reconnect()
            # reads these two, and no socket is open here
            self._client._host, self._client._port = broker.host, broker.port
            self.url, self.host, self.port = broker.url, broker.host, broker.port
        self._attempts += 1
        try:
            return mqtt.Client.reconnect(self._client)
        except OSError as exc:
            if isinstance(exc, ssl.SSLError):
                self._last_error = refusal(exc)
                self._refused.set()
            else:
                self._last_error = f"{type(exc).__name__}: {exc}"
            raise

    def presence(self, topic: str, online: bytes, offline: bytes, will: bytes | None = None) -> None:
        """Publish `online` (retained) after every connect; the broker publishes `will` (default:
        `offline`) if the connection dies; close() publishes `offline` itself (a clean DISCONNECT drops
        the will)."""
        if self._started:
            raise LinkError("presence must be set before connect()")
        self._set_presence(topic, online, offline, will)

    def update_presence(self, online: bytes, offline: bytes, will: bytes | None = None) -> None:
        """Replace what presence() set, on the same topic, without reconnecting: the new `online` is
        published now when connected (and after every reconnect), close() publishes the new `offline`;
        the new will takes effect at the next connect, since MQTT fixes the will at CONNECT."""
        if self._birth is None:
            raise LinkError("update_presence() needs presence() first")
        topic = self._birth[0]
        self._set_presence(topic, online, offline, will)
        if self.connected:
            self.send(topic, online, 1, True)

    def _set_presence(self, topic: str, online: bytes, offline: bytes, will: bytes | None) -> None:
        self._birth, self._farewell = (topic, online), (topic, offline)
        self._wills.append(offline if will is None else will)
        self._client.will_set(topic, self._wills[-1], qos=1, retain=True)

    @property
    def connected(self) -> bool:
        return self._online.is_set() and not self._closed

    def connect(self, timeout_s: float = 10.0) -> None:
        if self._closed or self._started:
            raise LinkError(f"connection {self.client_id!r} was already connected once; make a new one")
        properties = None
        if self.version == "5":
            properties = Properties(PacketTypes.CONNECT)
            properties.SessionExpiryInterval = 0 if self.clean_start else self.session_expiry_s
        self._client.connect_async(self.host, self.port, self.keepalive, clean_start=self.clean_start,
                                   properties=properties)
        self._started = True
        self._client.loop_start()  # retries the first connection too, with the backoff above
        left = deadline(timeout_s)
        while not self._ready.wait(min(0.05, left())) and not self._refused.is_set() and left() > 0:
            pass
        if not self._ready.is_set():
            self.close(abrupt=True)
            if self._refused.is_set():
                raise LinkError(f"MQTT broker {self.url} refused {self.client_id!r}: {self._last_error}")
            raise LinkError(f"could not connect to MQTT broker {self.brokers} as {self.client_id!r} within "
                          f"{timeout_s:g} s ({self._last_error or 'no CONNACK/SUBACK'})")

    def close(self, abrupt: bool = False) -> None:
        if self._closed:
            return
        self._leaving = True  # our farewell coming back is no stale status to answer
        if not abrupt and self.connected:
            if self._farewell is not None:
                self.send(self._farewell[0], self._farewell[1], 1, True)
            if not self.flush(10.0):
                log.warning("%s: closing with unacknowledged messages", self.client_id)
        self._closed = True
        if not abrupt and self._online.is_set():
            self._client.disconnect()
        if self._started:
            self._client.loop_stop()
        sock = self._client.socket()
        if sock is not None:  # abrupt: a TCP close without DISCONNECT, as a crash looks to the broker
            sock.close()
        self._online.clear()

    def flush(self, timeout_s: float = 10.0) -> bool:
        left = deadline(timeout_s)
        while True:
            with self._lock:
                self._pending = [info for info in self._pending if not info.is_published()]
                if not self._pending:
                    return True
            if left() <= 0:
                return False
            time.sleep(min(0.02, left()))

    # ---- frames -----------------------------------------------------------------------------

    def send(self, topic: str, payload: bytes, qos: int, retain: bool) -> None:
        """Publish one frame; while disconnected, QoS 1 frames are queued by paho for the reconnect."""
        info = self._client.publish(topic, payload, qos=qos, retain=retain)
        if info.rc == mqtt.MQTT_ERR_NO_CONN and qos > 0:
            info.rc = mqtt.MQTT_ERR_SUCCESS  # queued by paho; sent when the connection is back
        elif info.rc != mqtt.MQTT_ERR_SUCCESS:
            raise LinkError(f"publish to {topic!r} failed: {mqtt.error_string(info.rc)}")
        if qos > 0:
            with self._lock:
                self._pending.append(info)

    def subscribe(self, filters: list[str], qos: int = 1) -> None:
        """Add filters at `qos` (0 for retained state: Link's state_subscriptions); once connected,
        returns after the broker acknowledged them."""
        for topic_filter in filters:
            validate_filter(topic_filter)
        with self._lock:
            self._filters.update(dict.fromkeys(filters, qos))
        if self.connected:
            self._subscribe_now([(f, qos) for f in filters])

    def unsubscribe(self, filters: list[str]) -> None:
        """Drop filters; once connected, returns after the broker acknowledged it, so nothing
        published after this call arrives through them (paho sends from its own thread)."""
        with self._lock:
            self._filters = {f: q for f, q in self._filters.items() if f not in filters}
            self._granted.difference_update(filters)
            if not self.connected:  # a persistent session keeps them: drop them at the next connect
                self._stale.update(filters)
                return
        try:
            self._acknowledged(*self._client.unsubscribe(filters), f"unsubscribe {filters}", "UNSUBACK")
        except LinkError as exc:  # harmless: what still arrives through them is ignored by the reader
            log.warning("%s: %s", self.client_id, exc)

    def _subscribe_now(self, filters: list[tuple[str, int]]) -> None:
        self._acknowledged(*self._client.subscribe(filters), f"subscribe {[f for f, _ in filters]}", "SUBACK")
        with self._lock:
            self._granted.update(f for f, _ in filters)

    def _acknowledged(self, rc: int, mid: int | None, what: str, ack: str, timeout_s: float = 10.0) -> None:
        """Wait for the SUBACK/UNSUBACK of request `mid`. Raises LinkError if it fails or never comes."""
        if rc != mqtt.MQTT_ERR_SUCCESS or mid is None:
            raise LinkError(f"{what} failed: {mqtt.error_string(rc)}")
        with self._ack_cond:
            if not self._ack_cond.wait_for(lambda: mid in self._acks, timeout_s):
                raise LinkError(f"no {ack} from {self.url} for {what} within {timeout_s:g} s")
            failures = self._acks.pop(mid)
        if failures:
            raise LinkError(f"broker {self.url} refused {what}: {failures}")

    # ---- paho callbacks (network thread): never raise into paho -----------------------------

    def _on_connect(self, client: mqtt.Client, userdata: object, flags: mqtt.ConnectFlags,
                    reason: mqtt.ReasonCode, properties: Properties | None) -> None:
        try:
            if reason.is_failure:
                self._last_error = refusal(reason)
                self._refused.set()
                log.warning("%s: %s", self.client_id, self._last_error)
                return
            self._online.set()
            self._connacked = True
            self.connects += 1
            log.info("%s: connected to %s (session present: %s)", self.client_id, self.url, flags.session_present)
            with self._lock:
                # With the session present the broker kept what it granted: subscribing again would only make it
                # send every retained message again, and a NATS node whose copy of them lags behind sends stale
                # ones (a device's will after its new birth). Only what it never granted goes out.
                if not flags.session_present:
                    self._granted.clear()
                filters = [(f, q) for f, q in self._filters.items() if f not in self._granted]
                stale = sorted(self._stale - set(self._filters))
                self._stale.clear()
            if stale:
                client.unsubscribe(stale)
            if filters:
                self._resubscribe_tries = 0
                self._resubscribe(filters)
            else:
                self._ready.set()
            if self._birth is not None:
                # Our own status (see _on_message), at QoS 1: a NATS node hands QoS 1 subscribers messages in the
                # order its stream stored them, the order the coordinator reads them in. An ACL may refuse it.
                if not (flags.session_present and self._birth[0] in self._granted):
                    self._watch_mid = client.subscribe(self._birth[0], 1)[1]
                self.send(self._birth[0], self._birth[1], 1, True)
        except Exception as exc:
            self._last_error = f"{type(exc).__name__}: {exc}"
            log.exception("%s: on_connect failed", self.client_id)

    def _resubscribe(self, filters: list[tuple[str, int]]) -> None:
        """Subscribe `filters` ((filter, QoS)) again after a connect; the SUBACK marks the connection ready."""
        rc, mid = self._client.subscribe(filters)
        if rc != mqtt.MQTT_ERR_SUCCESS or mid is None:
            self._last_error = f"resubscribe failed: {mqtt.error_string(rc)}"
            return
        with self._ack_cond:
            self._acks.setdefault(mid, []).append("ready")  # marks the resubscription
            self._resubscribing[mid] = [f for f, _ in filters]

    def _resubscription_refused(self, failures: list[str]) -> None:
        """A node of a cluster may refuse while it elects stream leaders (NATS: 0x80 while a consumer
        cannot be created): try again 1 s later, RESUBSCRIBE_TRIES times. One broker: log it and go on."""
        self._resubscribe_tries += 1
        if len(self.ring) > 1 and self._resubscribe_tries < RESUBSCRIBE_TRIES and self.connected:
            log.warning("%s: %s refused resubscription (%s); retrying in 1 s", self.client_id, self.url, failures)
            with self._lock:
                filters = [(f, q) for f, q in self._filters.items() if f not in self._granted]
            timer = threading.Timer(1.0, lambda: self._resubscribe(filters) if self.connected else None)
            timer.daemon = True
            timer.start()
            return
        self._last_error = f"subscription refused: {failures}"
        log.error("%s: broker refused resubscription: %s", self.client_id, failures)
        self._ready.set()

    def _on_disconnect(self, client: mqtt.Client, userdata: object, flags: mqtt.DisconnectFlags,
                       reason: mqtt.ReasonCode, properties: Properties | None) -> None:
        self._online.clear()
        self._ready.clear()
        if not self._closed and not self._refused.is_set():  # a refusal's own line stays
            self._last_error = f"disconnected: {reason}"
            if self.tls and not self._connacked:
                self._last_error = ("the broker closed the TLS connection before answering (with mutual TLS: a missing "
                                    "or untrusted client certificate; see --cert/--key)")
            log.warning("%s: disconnected from %s (%s); reconnecting with backoff", self.client_id, self.url, reason)

    def _on_subscribe(self, client: mqtt.Client, userdata: object, mid: int,
                      reasons: list[mqtt.ReasonCode], properties: Properties | None) -> None:
        try:
            if mid == self._watch_mid:
                if self._birth is not None and not any(r.is_failure for r in reasons):
                    with self._lock:
                        self._granted.add(self._birth[0])
                return
            failures = [str(r) for r in reasons if r.is_failure]
            with self._ack_cond:
                if self._acks.get(mid) == ["ready"]:
                    del self._acks[mid]
                    filters = self._resubscribing.pop(mid, [])
                    if not failures:
                        with self._lock:
                            self._granted.update(filters)
                    if failures:
                        self._resubscription_refused(failures)
                    else:
                        self._ready.set()
                else:
                    self._acks[mid] = failures
                self._ack_cond.notify_all()
        except Exception:
            log.exception("%s: on_subscribe failed", self.client_id)

    def _on_unsubscribe(self, client: mqtt.Client, userdata: object, mid: int,
                        reasons: list[mqtt.ReasonCode], properties: Properties | None) -> None:
        with self._ack_cond:
            self._acks[mid] = [str(r) for r in reasons if r.is_failure]
            self._ack_cond.notify_all()

    def _on_message(self, client: mqtt.Client, userdata: object, message: mqtt.MQTTMessage) -> None:
        try:
            topic = message.topic
        except UnicodeDecodeError:
            log.warning("%s: dropped a message whose topic is not UTF-8", self.client_id)
            return
        birth = self._birth
        if birth is not None and topic == birth[0]:
            # Our own status, never passed on. One of our own wills arriving while we are connected is stale: the
            # broker published it late for a connection we already replaced (a NATS node does so after a failover,
            # once its JetStream answers); published again, the birth has the last word. Other statuses (another
            # process with our id, a clean farewell) are not ours to overrule.
            if message.payload in self._wills and self.connected and not self._leaving:
                log.info("%s: a stale status replaced our birth on %s; publishing it again", self.client_id, topic)
                self.send(birth[0], birth[1], 1, True)
            return
        self.on_frame(topic, bytes(message.payload))
